"""Few-shot benchmarks: MAML, first-order MAML, Reptile (and on Omniglot meta-LSTM) against a
pretrained baseline.

    python benchmarks/fewshot.py sinusoid [--iterations 20000] [--test-tasks 600] [--tag NAME]
    python benchmarks/fewshot.py higher [--tag NAME] [--device cuda]   # needs `pip install higher`
    python benchmarks/fewshot.py omniglot [--iterations 1000] [--ways 5 20] [--tag NAME]
    python benchmarks/fewshot.py omniglot-model RUN/model.safetensors [MORE.safetensors] --tag NAME \
        [--adapt STEPS,COPIES,QUERY_COPIES ...] [--part meta_valid]
    python benchmarks/fewshot.py plot-omniglot

``higher`` first checks, in float64, that learnedopt's MAML (each way it is timed: vectorize
'auto', forced vmap, forced loop) and ``higher`` give the same meta-gradient on each case, and
exits with an error, writing nothing, when they differ by more than ``HIGHER_TOLERANCE`` relative.

``omniglot-model`` scores a learner that ``learnedopt meta-train --task omniglot`` wrote (long
runs belong there: they checkpoint and resume) on the same test episodes as ``omniglot``, once
per ``--adapt`` setting; several models are scored as an ensemble (softmax outputs averaged).

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
import functools
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import Distinct, fail, path_arg, positive_int, results_dir, results_tag, seed_arg, thread_count, write_results  # noqa: E402

from learnedopt.data import SinusoidTasks, stack_episodes  # noqa: E402
from learnedopt.meta.fewshot import FEWSHOT_ALGOS, omniglot_class_splits, parse_alphabets  # noqa: E402
from learnedopt.meta.loop import ConfigError, check_device  # noqa: E402
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
    name = "fewshot_sinusoid" + (f"_{args.tag}" if args.tag else "")
    write_results(name, {"config": config, "rows": rows, "curves": curves}, "\n".join(table))
    _plot(curves, common.RESULTS / f"{name}.png")


def _plot(curves: dict[str, list[float]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
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


def _ours_meta_grad(model: nn.Module, batch, inner_lr: float, steps: int, loss_fn, vectorize="auto") -> None:
    MAML(model, inner_lr=inner_lr, inner_steps=steps, loss_fn=loss_fn, vectorize=vectorize)(*batch).backward()


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


def _conv_share(self_ms: dict[str, float]) -> float:
    """The share of self CPU time spent in convolution operators (forward, backward and their
    derivatives: every operator whose name contains "conv")."""
    total = sum(self_ms.values())
    return sum(ms for name, ms in self_ms.items() if "conv" in name.lower()) / total


def _functional_model(make_model, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """A fresh model of the case, in ``dtype`` on ``device``, its BatchNorm layers without running
    statistics."""
    model = make_model().to(device=device, dtype=dtype)
    torch.func.replace_all_batch_norm_modules_(model)
    return model


#: largest relative difference of learnedopt's and higher's float64 meta-gradients that counts as
#: equal (the recorded runs: 2e-16; a wrong meta-gradient differs by far more)
HIGHER_TOLERANCE = 1e-9


def _meta_grad_difference(make_model, make_batch, lr: float, steps: int, loss_fn, device: str = "cpu", vectorize="auto") -> float:
    """``|ours - higher's| / |higher's|`` (2-norms over all the model's parameters) of the two MAML
    meta-gradients, ours with ``vectorize``, computed in float64 from the same initial model and
    batch (NaN when either is not finite)."""
    grads = []
    for run in (lambda *args: _ours_meta_grad(*args, vectorize=vectorize), _higher_meta_grad):
        model = _functional_model(make_model, torch.float64, device)
        run(model, make_batch(torch.float64), lr, steps, loss_fn)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return ((grads[0] - grads[1]).norm() / grads[1].norm()).item()


#: learnedopt's MAML as the table times it: ``vectorize`` of each column (checked against higher each)
VECTORIZE = {"learnedopt MAML": "auto", "learnedopt MAML, vmap": True, "learnedopt MAML, loop": False}


def against_higher(args: argparse.Namespace) -> None:
    from common import gflop_count, matmul_gflops, require_equal_gradients, self_cpu_ms, time_call

    if args.results_dir is not None:
        common.RESULTS = args.results_dir
    rows, device = [], args.device
    cuda = torch.device(device).type == "cuda"
    cases = [(*case, lambda dtype, make=case[2]: tuple(t.to(device) for t in make(dtype))) for case in _higher_cases()]
    # equal meta-gradients, checked in float64 on the same model, data and settings, before any timing
    # (each way the table times learnedopt's MAML: 'auto' is one of the forced two, which differ per case)
    rels, forced_rels = {}, {}
    for name, make_model, _, lr, steps, loss_fn, make_batch in cases:
        for label, vectorize in VECTORIZE.items():
            rel = _meta_grad_difference(make_model, make_batch, lr, steps, loss_fn, device, vectorize)
            require_equal_gradients(f"MAML (vectorize={vectorize!r}) against higher on {name}", rel, HIGHER_TOLERANCE)
            if vectorize == "auto":
                rels[name] = rel
            else:
                forced_rels.setdefault(name, {})["vmap" if vectorize else "loop"] = rel
    # the best dense float32 rate this thread (or GPU) reaches, as the hardware limit to compare against
    peak = matmul_gflops(device=device)
    for name, make_model, _, lr, steps, loss_fn, make_batch in cases:
        rel = rels[name]
        gflop, gflop_ours = (
            gflop_count(lambda run=run: run(_functional_model(make_model, device=device), make_batch(torch.float32), lr, steps, loss_fn))
            for run in (_higher_meta_grad, _ours_meta_grad)
        )
        timings, conv_shares = {}, {}
        variants = (
            *((label, lambda *a, v=vectorize: _ours_meta_grad(*a, vectorize=v)) for label, vectorize in VECTORIZE.items()),
            ("higher (task loop)", _higher_meta_grad),
        )
        for label, run in variants:
            model = _functional_model(make_model, device=device)
            batch = make_batch(torch.float32)

            def meta_step(model=model, batch=batch, run=run) -> None:
                model.zero_grad()
                run(model, batch, lr, steps, loss_fn)
                if cuda:  # the host clock times the device's work only once it is done
                    torch.cuda.synchronize(device)

            timings[label] = time_call(meta_step, repeats=args.repeats, min_time=0.5)
            if not cuda and label in ("learnedopt MAML", "higher (task loop)"):  # CPU time: a CPU's profile
                conv_shares[label] = _conv_share(self_cpu_ms(meta_step))
        ours, theirs = timings["learnedopt MAML"], timings["higher (task loop)"]
        floor = gflop / peak
        # Amdahl: were everything but its convolutions free, learnedopt's meta-step would take
        # ours * share; no batching or fusing of the rest beats higher by more than this
        share = conv_shares.get("learnedopt MAML")
        conv_bound = theirs / (ours * share) if share else None
        rows.append(dict(case=name, ours_ms=ours * 1e3, vmap_ms=timings["learnedopt MAML, vmap"] * 1e3,
                         loop_ms=timings["learnedopt MAML, loop"] * 1e3, higher_ms=theirs * 1e3,
                         speedup=theirs / ours, meta_grad_rel_diff=rel, meta_grad_rel_diff_forced=forced_rels[name], gflop=gflop, gflop_learnedopt=gflop_ours,
                         ours_gflops=gflop / ours, floor_ms=floor * 1e3, speedup_bound=theirs / floor,
                         conv_share=share, higher_conv_share=conv_shares.get("higher (task loop)"),
                         conv_bound=conv_bound))
        print(rows[-1], flush=True)
    device_name = torch.cuda.get_device_name(device) if cuda else "cpu"
    table = [
        "Second-order MAML meta-step (forward + backward, no optimizer step), float32, learnedopt's MAML "
        "with its default vectorize='auto' (vmap over tasks for the MLP; a task loop for conv-4 on CPU), median of "
        f"{args.repeats} timings, both in this run; meta-gradients compared in float64 on the same data.\n",
        f"Device: {device_name}.\n",
        f"Hardware limit: a 2048x2048 float32 matmul ran at {peak:.1f} GFLOP/s on this {'GPU' if cuda else 'thread'} in this run. "
        "GFLOP counts the meta-step's convolutions and matrix products (forward, backward, second-order "
        "terms; `torch.utils.flop_counter`), counted on `higher`'s meta-step (learnedopt's: `gflop_learnedopt` "
        "in the JSON). Floor = GFLOP at the matmul rate: the time of an implementation that ran them as fast as "
        "that matmul; the last column, higher's time over the floor, is the speed-up over `higher` such an "
        "implementation would reach on this thread.\n",
        "Convolutions' share: the share of self CPU time in convolution operators (forward, backward, "
        "double backward; any operator whose name contains 'conv') in one profiled meta-step of each "
        "(`torch.profiler`). Bound if only convolutions cost: higher's time over learnedopt's time "
        "times its share, the speed-up over `higher` if everything but the convolutions took no time "
        "(Amdahl), which batching the tasks or fusing the rest cannot pass without faster convolutions.\n",
        "| case | learnedopt MAML (auto) ms | forced vmap ms | forced loop ms | higher ms | speed-up (auto vs higher) "
        "| meta-gradient rel. difference | GFLOP / meta-step | learnedopt GFLOP/s | floor ms | higher / floor "
        "| convolutions' share, learnedopt / higher | bound if only convolutions cost |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        bound = "-" if r["conv_bound"] is None else f"{r['conv_bound']:.2f}x"
        shares = "-" if r["conv_share"] is None else f"{100 * r['conv_share']:.0f}% / {100 * r['higher_conv_share']:.0f}%"
        table.append(f"| {r['case']} | {r['ours_ms']:.1f} | {r['vmap_ms']:.1f} | {r['loop_ms']:.1f} | {r['higher_ms']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['meta_grad_rel_diff']:.1e} | {r['gflop']:.3g} | {r['ours_gflops']:.1f} | "
                     f"{r['floor_ms']:.2g} | {r['speedup_bound']:.1f}x | "
                     f"{shares} | {bound} |")
    name = "fewshot_vs_higher" + (f"_{args.tag}" if args.tag else "")
    common.write_results(
        name, {"rows": rows, "device": device_name, "threads": torch.get_num_threads(), "matmul_gflops": peak}, "\n".join(table)
    )


# ---------------------------------------------------------------------------- Omniglot
def _episode_batch(data, sampler, batch: int):
    return stack_episodes(data.images, [sampler.sample() for _ in range(batch)])


def _omniglot_config(method: str, ways: int, args):
    """The ``FewShotConfig`` a job meta-trains ``method`` on ``ways``-way Omniglot with: the
    paper defaults of ``learnedopt meta-train --algo METHOD --task omniglot``
    (``fewshot_defaults``) and the benchmark's options."""
    from learnedopt.meta.fewshot import FewShotConfig, fewshot_defaults

    values = fewshot_defaults(method, "omniglot", ways)
    values.update(ways=ways, meta_steps=args.iterations, meta_batch=args.meta_batch, queries=args.queries,
                  hidden=args.hidden, val_tasks=args.val_tasks)  # fmt: skip
    return FewShotConfig(algo=method, task="omniglot", seed=args.seed, **values)


def _train_omniglot(method: str, ways: int, args):
    """Meta-train one method with the library's trainer (what ``learnedopt meta-train --algo
    METHOD --task omniglot`` runs, :func:`_omniglot_config`); returns an ``adapt(x_s, y_s) ->
    predict`` function of the trained learner."""
    import dataclasses
    import tempfile

    from learnedopt.meta.fewshot import meta_train_fewshot

    config = _omniglot_config(method, ways, args)
    with tempfile.TemporaryDirectory() as out:
        learner = meta_train_fewshot(config, out, checkpoint_every=max(1, args.iterations // 10), progress=False).learner
    adapt = _adapter(learner)
    adapt.config = dataclasses.asdict(config)
    return adapt


def _adapter(learners, steps: int | None = None, support_copies: int = 0, query_copies: int = 0, seed: int = 0):
    """``adapt(x_s, y_s) -> predict``: the predictor of one task's class probabilities by
    :func:`~learnedopt.meta.fewshot.classify_task` (``steps`` inner steps, default each learner's;
    ``support_copies`` / ``query_copies`` distortions drawn from one generator seeded ``seed``;
    several learners: an ensemble)."""
    from learnedopt.meta.fewshot import classify_task

    generator = torch.Generator().manual_seed(seed)

    def adapt(x_s, y_s):
        return lambda x: classify_task(learners, x_s, y_s, x, steps, support_copies, query_copies, generator)

    return adapt


def _evaluate_omniglot(adapt, data, classes, ways: int, shots: int, episodes: int, seed: int, same_alphabet: bool):
    from learnedopt.data import EpisodeSampler

    sampler = EpisodeSampler(data.labels, classes, ways, shots, 5, seed=seed, groups=data.alphabet_of_class, same_group=same_alphabet)
    accuracies = []
    for _ in range(episodes):
        xs, ys, xq, yq = _episode_batch(data, sampler, 1)
        predict = adapt(xs[0], ys[0])
        with torch.no_grad():
            accuracies.append((predict(xq[0]).argmax(1) == yq[0]).float().mean())
    return ci95(torch.stack(accuracies) * 100)


CELLS = ("1-shot", "5-shot", "within")


def _test_cells(adapt, ways: int, episodes: int, seed: int, image_size: int = 28, part: str = "meta_test",
                cells: tuple[str, ...] = CELLS, config: dict | None = None, split: dict | None = None) -> dict:  # fmt: skip
    """Accuracy (mean, 95% CI) on the alphabets of ``part`` (the meta-test ones by default) of
    the split meta-training used (``split``, the alphabets a model file records, else
    ``config``'s named alphabets, else the library's fixed split): ``ways``-way 1- and 5-shot
    episodes mixing alphabets, and for 20 ways also 1-shot episodes within one alphabet (those of
    ``cells``); plus the alphabets."""
    from learnedopt.data import load_omniglot

    data = load_omniglot(image_size=image_size, rotations=True)
    if split:  # as recorded: the fixed split drawn again could move if torch's randperm changed
        named = [split["meta_valid"], split["meta_test"]]
    else:
        named = [parse_alphabets((config or {}).get(k)) for k in ("valid_alphabets", "test_alphabets")]
    test = omniglot_class_splits(data, *named)[part]
    results = {}
    # the cells' seeds, modulo 2**64: --seed takes up to 2**64 - 1, which EpisodeSampler takes, not one more
    mixed, within = (seed + 1) % 2**64, (seed + 2) % 2**64
    for shots in (1, 5):
        if f"{shots}-shot" in cells:
            results[f"{ways}-way {shots}-shot"] = _evaluate_omniglot(adapt, data, test, ways, shots, episodes, mixed, False)
    if ways == 20 and "within" in cells:
        results["20-way 1-shot within alphabet"] = _evaluate_omniglot(adapt, data, test, 20, 1, episodes, within, True)
    return dict(accuracy={k: {"mean": m, "ci95": c} for k, (m, c) in results.items()},
                test_alphabets=[data.alphabets[i] for i in torch.unique(data.alphabet_of_class[test]).tolist()])


def _omniglot_job(method: str, ways: int, args, queue) -> None:
    """One method and way count, in its own process so peak memory is its own."""
    from learnedopt.meta.loop import peak_rss_mb

    torch.set_num_threads(args.threads_per_job)
    start = time.perf_counter()
    adapt = _train_omniglot(method, ways, args)
    seconds = time.perf_counter() - start
    cells = _test_cells(adapt, ways, args.test_episodes, args.seed)
    peak_mb = peak_rss_mb()
    queue.put(dict(method=method, ways=ways, seconds_per_meta_step=seconds / args.iterations, peak_rss_mb=peak_mb,
                   config=adapt.config, **cells))


def _job_row(job, queue, what: str) -> dict:
    """The row that ``job`` (an :func:`_omniglot_job` process) puts on ``queue``; exits with a
    one-line error when the job ends without one (its own error printed above), where a plain
    ``queue.get()`` waited forever."""
    import queue as queues

    while True:
        try:
            return queue.get(timeout=5)
        except queues.Empty:
            if not job.is_alive():
                try:  # a row put just before the job ended
                    return queue.get(timeout=1)
                except queues.Empty:
                    raise SystemExit(
                        f"fewshot.py: error: the {what} job exited (status {job.exitcode}) without a result; its error is above"
                    ) from None


def omniglot(args: argparse.Namespace) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    # the jobs train and test on --threads-per-job threads; this process only waits for them, and
    # its count is what the results' machine record says (torch's default here: every core)
    torch.set_num_threads(args.threads_per_job)
    rows = []
    for ways in args.ways:
        for method in args.methods:
            queue = ctx.Queue()
            job = ctx.Process(target=_omniglot_job, args=(method, ways, args, queue))
            job.start()
            row = _job_row(job, queue, f"{method} {ways}-way")
            job.join()
            rows.append(row)
            print(row, flush=True)
    table = [
        f"Omniglot, meta-trained on the two small background sets with whole alphabets held out; test alphabets: "
        f"{', '.join(rows[0]['test_alphabets'])}. conv-4 ({args.hidden} filters), transductive batch statistics, "
        f"{args.iterations} meta-steps of {args.meta_batch} tasks, {args.test_episodes} test episodes per cell, "
        "accuracy % with 95% CI. Every method is trained by the library's `meta_train_fewshot` (what `learnedopt "
        "meta-train --algo METHOD --task omniglot` runs) with its defaults (`fewshot_defaults`; settings in the JSON).\n",
        "| method | setting | accuracy | s / meta-step | peak RSS (MB) |",
        "|---|---|---:|---:|---:|",
    ]
    table += _table_rows(rows)
    config = {k: v for k, v in vars(args).items() if k != "func"}
    name = "fewshot_omniglot" + (f"_{args.tag}" if args.tag else "")
    write_results(name, {"config": config, "rows": rows}, "\n".join(table))


METHOD_NAMES = {"maml": "MAML", "fomaml": "first-order MAML", "reptile": "Reptile",
                "meta-lstm": "meta-LSTM (learned init + learned update)"}  # fmt: skip


def _table_rows(rows: list[dict]) -> list[str]:
    def number(value, fmt):
        return "n/a" if value is None else format(value, fmt)

    def trained(row: dict) -> str:
        rule = (row.get("config") or {}).get("rule")
        if row["method"] == "meta-lstm" and rule not in (None, "MetaLSTMCell"):
            return f"learned init + learned update ({rule}, `--algo meta-lstm --rule {rule}`)"
        name = METHOD_NAMES[row["method"]]
        if (row.get("config") or {}).get("head_only"):
            name = f"ANIL ({name} adapting only the output layer, `--head-only`)"
        if (row.get("config") or {}).get("zero_head"):
            return f"{name}, output layer zero at every task's start (`--zero-head`)"
        return name

    def method(row: dict) -> str:
        if "test_inner_steps" not in row:
            return trained(row)
        copies = f" plus {row['support_copies']} distorted copies of each image" if row["support_copies"] else ""
        views, members = "", ""
        if row.get("query_copies"):
            views = f", predictions averaged over each query image and {row['query_copies']} distorted views of it"
        if row.get("ensemble"):
            members = f"; ensemble of {1 + len(row['ensemble'])} learners (softmax outputs averaged)"
        return f"{trained(row)}; adapted in {row['test_inner_steps']} steps on the support set{copies}{views}{members}"

    return [
        f"| {method(r)} | {setting} | {acc['mean']:.1f} +- {acc['ci95']:.1f} | "
        f"{number(r['seconds_per_meta_step'], '.2f')} | {number(r['peak_rss_mb'], '.0f')} |"
        for r in rows
        for setting, acc in r["accuracy"].items()
    ]


def _adaptation(text: str) -> tuple[int | None, int, int]:
    """``STEPS,COPIES[,QUERY_COPIES]`` (``model,...``: the model's test-time steps) ->
    ``(steps, copies, query_copies)``;
    ``type=`` of ``--adapt``: anything else is argparse's one-line error."""
    parts = text.split(",")
    try:
        if not 1 <= len(parts) <= 3:
            raise ValueError
        steps, copies, query_copies = (parts + ["0", "0"])[:3]
        values = (None if steps == "model" else int(steps)), int(copies or 0), int(query_copies or 0)
    except ValueError:
        values = None
    if values is None or any(v is not None and v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"must be STEPS,COPIES[,QUERY_COPIES] (STEPS a count or 'model', counts >= 0), got {text!r}")
    return values


def omniglot_model(args: argparse.Namespace, loaded: list[tuple[Any, dict]]) -> None:
    """Score a ``learnedopt meta-train --task omniglot`` learner on the meta-test alphabets (or,
    for choosing test-time settings, the meta-validation one), once per ``--adapt`` setting;
    ``loaded``: ``load_learner`` of each of ``args.model`` (several: an ensemble, described by the first)."""
    import json
    import statistics

    learners, (_, header) = [learner for learner, _ in loaded], loaded[0]
    arch, config = header["architecture"], header["meta_train_config"]
    for path, (_, other) in zip(args.model[1:], loaded[1:]):
        if other["architecture"] != arch:
            raise SystemExit(f"{path} has another architecture than {args.model[0]}; an ensemble needs one")
    log = Path(args.model[0]).with_name("log.jsonl")  # the run's per-step wall-clock and memory, where kept
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    seconds = [r["seconds"] for r in records]
    peaks = [r["peak_rss_mb"] for r in records if "peak_rss_mb" in r]
    rows = []
    for steps, copies, query_copies in args.adapt:
        steps = header["test_inner_steps"] if steps is None else steps
        start = time.perf_counter()
        cells = _test_cells(_adapter(learners, steps, copies, query_copies, args.seed), arch["ways"], args.test_episodes, args.seed,
                            arch["image_size"], args.part, tuple(args.cells), config, header.get("omniglot_split"))  # fmt: skip
        rows.append(dict(method=header["algo"], ways=arch["ways"], config=config, command=header["command"],
                         seconds_per_meta_step=statistics.median(seconds) if seconds else None,
                         peak_rss_mb=max(peaks) if peaks else None, validation=header["validation"],
                         part=args.part, test_inner_steps=steps, support_copies=copies, query_copies=query_copies,
                         ensemble=[other["command"] for _, other in loaded[1:]],
                         scoring_seconds=time.perf_counter() - start, **cells))  # fmt: skip
        print(rows[-1]["test_inner_steps"], copies, query_copies, rows[-1]["accuracy"], flush=True)
    where = "meta-test" if args.part == "meta_test" else "meta-VALIDATION (for choosing test-time settings; not a test score)"
    table = [
        f"Omniglot, meta-trained by `{header['command']}` (the two small background sets; whole alphabets held out); "
        f"{where} alphabets: {', '.join(rows[0]['test_alphabets'])}. conv-4 ({arch['hidden']} filters), transductive batch "
        f"statistics, {config['meta_steps']} meta-steps of {config['meta_batch']} tasks"
        f"{', each within one alphabet' if config['same_alphabet'] else ''}"
        f"{', each within one rotation' if config.get('same_rotation') else ''}"
        f"{', every training image randomly distorted' if config.get('augment') else ''}"
        f"{', the output layer zero at the start of every task' if config.get('zero_head') else ''}"
        f"{', only the output layer adapted in the inner loop (ANIL)' if config.get('head_only') else ''}; adapted with "
        f"the model's {header['test_inner_steps']} test-time inner steps unless the row says otherwise; "
        f"{args.test_episodes} test episodes per cell, accuracy % with 95% CI. s / meta-step and peak "
        "RSS of the training process: median and maximum of the run's log (n/a: not logged by that version). "
        f"The run's own end-of-training validation on its meta-valid alphabets ({config['val_tasks']} tasks of "
        f"its training setting): accuracy {header['validation']['initial'].get('accuracy', float('nan')):.1f}% "
        f"at the initialisation, {header['validation']['final'].get('accuracy', float('nan')):.1f}% meta-trained."
        + "".join(f" Ensembled with the learner of `{other['command']}` (its own validation "
                  f"{other['validation']['final'].get('accuracy', float('nan')):.1f}%); s / meta-step and peak RSS "
                  "are the first learner's." for _, other in loaded[1:])  # fmt: skip
        + "\n",
        "| method | setting | accuracy | s / meta-step | peak RSS (MB) |",
        "|---|---|---:|---:|---:|",
        *_table_rows(rows),
    ]
    write_results(f"fewshot_omniglot_{args.tag}", {"config": {k: v for k, v in vars(args).items() if k != "func"},
                                                   "rows": rows}, "\n".join(table))  # fmt: skip


def plot_omniglot(args: argparse.Namespace) -> None:
    """One bar chart of every ``results/fewshot_omniglot*.json``: accuracy with its 95% CI."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = []
    for path in sorted(common.RESULTS.glob("fewshot_omniglot*.json")):
        run = path.stem.removeprefix("fewshot_omniglot").lstrip("_") or "default"  # the results file's tag
        payload = json.loads(path.read_text())
        for row in payload["rows"]:
            if row.get("part", "meta_test") != "meta_test":
                continue  # scores on the meta-validation alphabet, for choosing settings
            steps = row["config"]["meta_steps"] if "config" in row else payload["config"]["iterations"]
            for setting, acc in row["accuracy"].items():
                bars.append((f"{row['method']}, {steps} steps [{run}]\n{setting}", acc["mean"], acc["ci95"]))
    if not bars:
        raise SystemExit("no fewshot_omniglot*.json results to plot")
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(bars)), 4))
    ax.bar(range(len(bars)), [b[1] for b in bars], yerr=[b[2] for b in bars], capsize=3)
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=6, rotation=60, ha="right")
    ax.set_ylabel("test accuracy % (95% CI)")
    ax.set_title("Omniglot, held-out alphabets")
    fig.tight_layout()
    fig.savefig(common.RESULTS / "fewshot_omniglot.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="benchmark", required=True)
    sin = sub.add_parser("sinusoid", help="MAML / FOMAML / Reptile / pretrained on sinusoid regression")
    sin.add_argument("--iterations", type=positive_int, default=20_000)
    sin.add_argument("--test-tasks", type=positive_int, default=600)
    sin.add_argument("--shots", type=positive_int, nargs="+", action=Distinct, default=[5, 10])
    sin.add_argument("--seed", type=seed_arg, default=0)
    sin.add_argument("--tag", type=results_tag("fewshot_sinusoid"), default="", help="suffix of the results file names")
    sin.set_defaults(func=sinusoid, threads=1)  # tiny models: threads cost more than they give
    hig = sub.add_parser("higher", help="MAML meta-step throughput and meta-gradients against `higher` (pip install higher)")
    hig.add_argument("--repeats", type=positive_int, default=5)
    hig.add_argument("--threads", type=thread_count, default=None, help="torch threads (default: torch's)")
    hig.add_argument("--tag", type=results_tag("fewshot_vs_higher"), default="", help="suffix of the results file name (e.g. for another host)")
    hig.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu; on CUDA no convolution shares)")
    hig.add_argument("--results-dir", type=results_dir, default=None, help="where to write the results (default benchmarks/results)")
    hig.set_defaults(func=against_higher)
    omn = sub.add_parser("omniglot", help="MAML / FOMAML / Reptile / meta-LSTM on Omniglot with held-out alphabets")
    omn.add_argument("--methods", nargs="+", action=Distinct, choices=FEWSHOT_ALGOS, default=list(FEWSHOT_ALGOS))
    omn.add_argument("--ways", type=positive_int, nargs="+", action=Distinct, default=[5, 20])
    omn.add_argument("--iterations", type=positive_int, default=1000)
    omn.add_argument("--meta-batch", type=positive_int, default=8)
    omn.add_argument("--queries", type=positive_int, default=5, help="query images per class in meta-training")
    omn.add_argument("--hidden", type=positive_int, default=64)
    omn.add_argument("--test-episodes", type=positive_int, default=600)
    omn.add_argument("--val-tasks", type=positive_int, default=20, help="validation tasks of the trainer's end-of-run metric")
    omn.add_argument("--threads-per-job", type=thread_count, default=2)
    omn.add_argument("--seed", type=seed_arg, default=0)
    omn.add_argument("--tag", type=results_tag("fewshot_omniglot"), default="", help="suffix of the results file name")
    omn.set_defaults(func=omniglot, threads=None)
    mod = sub.add_parser("omniglot-model", help="score a `learnedopt meta-train --task omniglot` learner on the held-out alphabets")
    mod.add_argument("model", type=path_arg, nargs="+", help="the run's model.safetensors; several: an ensemble (softmax outputs averaged)")
    mod.add_argument("--tag", type=results_tag("fewshot_omniglot"), required=True, help="suffix of the results file name")
    mod.add_argument("--test-episodes", type=positive_int, default=600)
    mod.add_argument("--seed", type=seed_arg, default=0)
    mod.add_argument("--adapt", type=_adaptation, nargs="+", action=Distinct, default=[(None, 0, 0)], metavar="STEPS,COPIES[,QUERY_COPIES]",
                     help="test-time settings, one row each: inner steps ('model': the model's), randomly "
                          "distorted copies of each support image to adapt on too, and distorted views of each "
                          "query image to average the predictions over (default: model,0,0)")  # fmt: skip
    mod.add_argument("--part", choices=["meta_test", "meta_valid"], default="meta_test",
                     help="alphabets to score on (meta_valid: for choosing test-time settings)")
    mod.add_argument("--cells", nargs="+", action=Distinct, choices=CELLS, default=list(CELLS), help="which cells to score (default all)")
    mod.add_argument("--threads", type=thread_count, default=1)
    mod.set_defaults(func=omniglot_model)
    plot = sub.add_parser("plot-omniglot", help="bar chart of the Omniglot results files")
    plot.set_defaults(func=plot_omniglot, threads=None)
    args = parser.parse_args()
    if args.benchmark == "higher":
        try:  # as meta-train checks it: torch takes meta, mps, a missing GPU as devices, to fail once run
            check_device(args.device)
        except ConfigError as err:
            hig.error(str(err))
    if args.benchmark == "omniglot":
        try:  # each job's settings, before any starts: a job's ConfigError was a traceback above "exited without a result"
            for ways in args.ways:
                for method in args.methods:
                    _omniglot_config(method, ways, args).validate()
        except ValueError as err:  # ConfigError too
            fail(omn, str(err))
    if args.benchmark == "omniglot-model":
        from learnedopt.meta.fewshot import load_learner
        from learnedopt.meta.fewshot.learner import check_ensemble

        try:  # before the run, in one line: a missing file, or one of another kind, was a traceback
            loaded = [load_learner(path) for path in args.model]
            check_ensemble(args.model, [learner for learner, _ in loaded])
        except (OSError, ValueError) as err:
            fail(mod, str(err))
        args.func = functools.partial(omniglot_model, loaded=loaded)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.func(args)


if __name__ == "__main__":
    main()
