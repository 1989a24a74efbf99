"""Few-shot benchmarks: MAML, first-order MAML and Reptile against a pretrained baseline.

    python benchmarks/fewshot.py sinusoid [--iterations 20000] [--test-tasks 600]
    python benchmarks/fewshot.py higher      # needs `pip install higher`

Sinusoid regression (Finn et al. 2017): MLP 1-40-40-1 ReLU. MAML and first-order MAML train with
one inner SGD step of 0.01 on K support points and a query set of K points, meta-batch 25,
Adam(1e-3). Reptile trains with 5 inner SGD steps of 0.02 on the K points, one task per meta-step,
outer step size 0.1 annealed linearly to 0. The pretrained baseline is one model trained by Adam on
the pooled tasks (meta-batch 25, K points each). Every method is then tested the same way on the
same fresh tasks: starting from its learned initialisation, SGD with step 0.01 on the K support
points for up to 10 steps, MSE on 100 query points. The tables give the mean over the test tasks
with a 95% confidence interval (1.96 standard errors).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402

from learnedopt.data import SinusoidTasks  # noqa: E402
from learnedopt.meta.maml import MAML  # noqa: E402
from learnedopt.meta.reptile import Reptile  # noqa: E402

mse = nn.functional.mse_loss


def sine_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))


def train_maml(k: int, iterations: int, first_order: bool, seed: int) -> nn.Module:
    net = sine_net(seed)
    maml = MAML(net, inner_lr=0.01, inner_steps=1, first_order=first_order, loss_fn=mse, vectorize=True)
    opt = torch.optim.Adam(maml.parameters(), lr=1e-3)
    tasks = SinusoidTasks(seed)
    for _ in range(iterations):
        xs, ys, xq, yq, _, _ = tasks.sample_tasks(25, k, k)
        opt.zero_grad()
        maml(xs, ys, xq, yq).backward()
        opt.step()
    return net


def train_reptile(k: int, iterations: int, seed: int) -> nn.Module:
    net = sine_net(seed)
    reptile = Reptile(
        net,
        inner_steps=5,
        inner_optimizer=lambda p: torch.optim.SGD(p, lr=0.02),
        outer_stepsize=0.1,
        final_outer_stepsize=0.0,
        total_steps=iterations,
        loss_fn=mse,
    )
    tasks = SinusoidTasks(seed)
    for _ in range(iterations):
        xs, ys, _, _, _, _ = tasks.sample_tasks(1, k, 0)
        reptile.meta_step([[(xs[0], ys[0])]])
    return net


def train_pretrained(k: int, iterations: int, seed: int) -> nn.Module:
    net = sine_net(seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    tasks = SinusoidTasks(seed)
    for _ in range(iterations):
        xs, ys, _, _, _, _ = tasks.sample_tasks(25, k, 0)
        opt.zero_grad()
        mse(net(xs), ys).backward()
        opt.step()
    return net


def evaluate(net: nn.Module, k: int, test_tasks: int, steps: int = 10, lr: float = 0.01) -> torch.Tensor:
    """``(test_tasks, steps + 1)`` query MSE after 0..steps SGD steps on the K support points."""
    tasks = SinusoidTasks(seed=10_000 + k)  # the same test tasks for every method
    xs, ys, xq, yq, _, _ = tasks.sample_tasks(test_tasks, k, 100)
    maml = MAML(net, inner_lr=lr, inner_steps=steps, loss_fn=mse, vectorize=True)
    with torch.no_grad():
        before = torch.stack([mse(net(xq[i]), yq[i]) for i in range(test_tasks)])
    after = maml.query_losses(xs, ys, xq, yq, steps=steps).detach()
    return torch.cat([before.unsqueeze(1), after], dim=1)


def ci95(values: torch.Tensor) -> tuple[float, float]:
    return values.mean().item(), 1.96 * values.std().item() / math.sqrt(values.numel())


def sinusoid(args: argparse.Namespace) -> None:
    methods = {
        "MAML": lambda k: train_maml(k, args.iterations, False, args.seed),
        "first-order MAML": lambda k: train_maml(k, args.iterations, True, args.seed),
        "Reptile": lambda k: train_reptile(k, args.iterations, args.seed),
        "pretrained (joint)": lambda k: train_pretrained(k, args.iterations, args.seed),
    }
    rows, curves = [], {}
    for k in args.shots:
        for name, train in methods.items():
            start = time.perf_counter()
            net = train(k)
            seconds = time.perf_counter() - start
            losses = evaluate(net, k, args.test_tasks)
            m1, c1 = ci95(losses[:, 1])
            m10, c10 = ci95(losses[:, 10])
            rows.append(
                dict(method=name, k=k, mse_1_step=m1, ci_1_step=c1, mse_10_steps=m10, ci_10_steps=c10,
                     train_seconds=seconds, ms_per_meta_step=seconds / args.iterations * 1e3)
            )
            curves[f"{name} K={k}"] = losses.mean(0).tolist()
            print(rows[-1], flush=True)
    table = [
        f"Sinusoid regression, {args.iterations} meta-iterations per method, {args.test_tasks} test tasks, "
        "test-time SGD step 0.01 on K points, MSE on 100 query points, mean +- 95% CI.\n",
        "| method | K | MSE after 1 step | MSE after 10 steps |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        table.append(
            f"| {r['method']} | {r['k']} | {r['mse_1_step']:.3f} +- {r['ci_1_step']:.3f} | "
            f"{r['mse_10_steps']:.3f} +- {r['ci_10_steps']:.3f} |"
        )
    config = {k: v for k, v in vars(args).items() if k != "func"}
    write_results("fewshot_sinusoid", {"config": config, "rows": rows, "curves": curves}, "\n".join(table))
    _plot(curves, RESULTS / "fewshot_sinusoid.png")


def _plot(curves: dict[str, list[float]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install learnedopt[plots])")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in curves.items():
        ax.plot(range(len(values)), values, marker="o", markersize=3, label=name)
    ax.set_xlabel("SGD steps (lr 0.01) on the K support points")
    ax.set_ylabel("query MSE (mean over test tasks)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title("Sinusoid few-shot regression")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _higher_meta_grad(model: nn.Module, batch, inner_lr: float, steps: int, loss_fn) -> None:
    """MAML's meta-gradient with ``higher.innerloop_ctx``, the usual way: a loop over tasks."""
    import higher

    xs, ys, xq, yq = batch
    inner_opt = torch.optim.SGD(model.parameters(), lr=inner_lr)
    for b in range(xs.shape[0]):
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(loss_fn(fmodel(xs[b]), ys[b]))
            (loss_fn(fmodel(xq[b]), yq[b]) / xs.shape[0]).backward()


def _ours_meta_grad(model: nn.Module, batch, inner_lr: float, steps: int, loss_fn) -> None:
    MAML(model, inner_lr=inner_lr, inner_steps=steps, loss_fn=loss_fn, vectorize=True)(*batch).backward()


def _seeded(factory, *args):
    torch.manual_seed(0)
    return factory(*args)


def _higher_cases():
    """(name, model factory, batch maker, inner lr, inner steps, loss) for the throughput comparison."""
    def sine_batch(dtype):
        xs, ys, xq, yq, _, _ = SinusoidTasks(0).sample_tasks(25, 10, 10)
        return tuple(t.to(dtype) for t in (xs, ys, xq, yq))

    def omniglot_batch(dtype, tasks=8, n_way=5, shots=1, queries=15):
        g = torch.Generator().manual_seed(0)
        xs = torch.rand(tasks, n_way * shots, 1, 28, 28, generator=g, dtype=dtype)
        xq = torch.rand(tasks, n_way * queries, 1, 28, 28, generator=g, dtype=dtype)
        ys = torch.arange(n_way).repeat_interleave(shots).expand(tasks, -1).contiguous()
        yq = torch.arange(n_way).repeat_interleave(queries).expand(tasks, -1).contiguous()
        return xs, ys, xq, yq

    from learnedopt.models import conv4

    return [
        ("sinusoid MLP 1-40-40-1, 25 tasks, K=10, 1 inner step", lambda: sine_net(0), sine_batch, 0.01, 1, mse),
        ("conv-4 (64 filters), 8 tasks of 5-way 1-shot 15-query, 1 inner step", lambda: _seeded(conv4, 1, 5), omniglot_batch, 0.4, 1, nn.functional.cross_entropy),
    ]


def against_higher(args: argparse.Namespace) -> None:
    from common import time_call

    from learnedopt import __version__  # noqa: F401  (import check)

    rows = []
    for name, make_model, make_batch, lr, steps, loss_fn in _higher_cases():
        # equal meta-gradients, checked in float64 on the same model, data and settings
        grads = []
        for run in (_ours_meta_grad, _higher_meta_grad):
            model = make_model().double()
            torch.func.replace_all_batch_norm_modules_(model)
            run(model, make_batch(torch.float64), lr, steps, loss_fn)
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        rel = ((grads[0] - grads[1]).norm() / grads[1].norm()).item()
        timings = {}
        for label, run in (("learnedopt MAML (vmap)", _ours_meta_grad), ("higher (task loop)", _higher_meta_grad)):
            model = make_model()
            torch.func.replace_all_batch_norm_modules_(model)
            batch = make_batch(torch.float32)

            def meta_step(model=model, batch=batch, run=run) -> None:
                model.zero_grad()
                run(model, batch, lr, steps, loss_fn)

            timings[label] = time_call(meta_step, repeats=args.repeats, min_time=0.5)
        ours, theirs = timings["learnedopt MAML (vmap)"], timings["higher (task loop)"]
        rows.append(dict(case=name, ours_ms=ours * 1e3, higher_ms=theirs * 1e3, speedup=theirs / ours, meta_grad_rel_diff=rel))
        print(rows[-1], flush=True)
    table = [
        "Second-order MAML meta-step (forward + backward, no optimizer step), float32, median of "
        f"{args.repeats} timings, both in this run; meta-gradients compared in float64 on the same data.\n",
        "| case | learnedopt MAML ms | higher ms | speed-up | meta-gradient rel. difference |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        table.append(f"| {r['case']} | {r['ours_ms']:.1f} | {r['higher_ms']:.1f} | {r['speedup']:.2f}x | {r['meta_grad_rel_diff']:.1e} |")
    write_results("fewshot_vs_higher", {"rows": rows, "threads": torch.get_num_threads()}, "\n".join(table))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="benchmark", required=True)
    sin = sub.add_parser("sinusoid", help="MAML / FOMAML / Reptile / pretrained on sinusoid regression")
    sin.add_argument("--iterations", type=int, default=20_000)
    sin.add_argument("--test-tasks", type=int, default=600)
    sin.add_argument("--shots", type=int, nargs="+", default=[5, 10])
    sin.add_argument("--seed", type=int, default=0)
    sin.set_defaults(func=sinusoid, threads=1)  # tiny models: threads cost more than they give
    hig = sub.add_parser("higher", help="MAML meta-step throughput and meta-gradients against `higher` (pip install higher)")
    hig.add_argument("--repeats", type=int, default=5)
    hig.set_defaults(func=against_higher, threads=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.func(args)


if __name__ == "__main__":
    main()
