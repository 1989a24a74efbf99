"""Meta-training throughput: the library's unroll against a straightforward implementation.

The library's unroll (:func:`learnedopt.meta.unroll.unroll`) runs the update rule once per step
on all coordinates of all tasks of a meta-batch, and under autograd its LSTM step is
:func:`learnedopt.nn.lstm_step.lstm_step` (hand-written backward, pointwise parts compiled with
``torch.compile``). The baseline is the straightforward way: the same unroll, but the rule runs
separately on every parameter tensor of every task, its LSTM as ``torch.nn.LSTM`` with autograd
through it. A third row, all coordinates at once through ``torch.nn.LSTM``, separates the gain of
batching from the gain of the LSTM step, and a fourth runs the library's step with its
pointwise functions compiled for symbolic shapes from the first call (what the library did before
it kept the first call's shapes constant). For ``CoordinateLSTM``, a row with its linear head in
torch operations after the LSTM step (before the head joined the fused kernel); for both rules,
one with the features gathered column by column into a contiguous ``(n, F)`` (before they came
feature-major). Two more rows: the per-tensor baseline with its LSTM
written as the textbook cell in plain torch ops under autograd (another reading of "a
straightforward implementation"; on the Intel Xeon host as fast as the ``torch.nn.LSTM`` one,
which stays the baseline), and the batched unroll
with the LSTM replaced by a linear step (the work besides the LSTM's). All but the last compute
the same meta-gradient (checked here: the script exits with an error, writing nothing, when one
differs from the baseline's by more than ``TOLERANCE`` relative);
the script times one truncation (forward unroll of T steps + backward) of each, in one run,
after one untimed warm-up truncation each (which also compiles), in rounds of one timed
truncation of each implementation (each right after an untimed one of its own), best of
``--repeats`` rounds.

Against the hardware: the library's truncation's matrix products are counted
(``torch.utils.flop_counter``; the ``torch.nn.LSTM`` rows run oneDNN's fused cell, which the
counter does not see, but do the same products) and a 2048x2048 matmul is timed in the same run.
At that rate the products alone would take ``floor`` seconds, which bounds the speed-up any
implementation of the same arithmetic could reach over the baseline (if it cannot run skinny
products faster than a large square one).

    python benchmarks/meta_train_throughput.py [--rule CoordinateLSTM | --preset NAME] [--task mnist-mlp] [--meta-batch 2] [--unroll 20]

``--preset`` times a preset's rule (its architecture and weights; e.g. the default ``l2l-blend``,
whose LSTM also reads momenta and RMS-normalised gradients) instead of ``--rule``'s paper default.

Freed memory is kept mapped, as ``learnedopt meta-train`` keeps it
(:func:`learnedopt.freed_memory.keep_freed_memory`; ``LEARNEDOPT_KEEP_FREED_MEMORY=0`` runs
without), for every implementation alike.

With ``--rule MetaLSTMCell`` (called once per task with that task's loss) there is no per-tensor
row, and the baseline is the batched unroll through ``torch.nn.LSTM``. Each row also records the
truncation's minor page faults and system CPU time; ``--tag`` names the results file of a run
under other settings, e.g. ``THP_MEM_ALLOC_ENABLE=1 ... --tag thp`` (torch's 2 MiB pages, which
the results' machine record notes).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    fail,
    gflop_count,
    lstm_step_as,
    matmul_gflops,
    positive_int,
    require_equal_gradients,
    results_tag,
    seed_arg,
    self_cpu_ms,
    thread_count,
    through_cell_ops,
    torch_lstm,
    without_cpu_kernel,
    write_results,
)
from truncation_worker import truncation  # noqa: E402

from learnedopt.meta import generator_for, make_family  # noqa: E402
from learnedopt.nn import RULES, CoordinateLSTM, MetaLSTMCell, State, UpdateRule  # noqa: E402
from learnedopt.nn.functional import bounded_square, preprocess, rms_denominator  # noqa: E402
from learnedopt.nn import lstm_step  # noqa: E402
from learnedopt.nn.lstm_step import compile_enabled  # noqa: E402
from learnedopt.freed_memory import keep_freed_memory  # noqa: E402


def _forward_symbolic(*args):
    return lstm_step.cell_forward_into(*args)


def _backward_symbolic(*args):
    return lstm_step.cell_backward_into(*args)


# Own functions, not cell_forward itself: Dynamo keeps compiled code per code object, and the
# library's constant-shape call would otherwise find this symbolic code in the same cache.
_SYMBOLIC = (
    lstm_step._Compiled(_forward_symbolic, dynamic=True),
    lstm_step._Compiled(_backward_symbolic, dynamic=True),
)


@contextlib.contextmanager
def symbolic_shapes():
    """Within: the LSTM step's pointwise functions run compiled with the batch size symbolic from
    the first call (``dynamic=True``: what the library did before it kept the first call's shapes
    constant)."""
    originals = lstm_step._cell_forward, lstm_step._cell_backward
    lstm_step._cell_forward, lstm_step._cell_backward = _SYMBOLIC
    try:
        with without_cpu_kernel():
            yield
    finally:
        lstm_step._cell_forward, lstm_step._cell_backward = originals


def features_gathered(self: CoordinateLSTM, grad: torch.Tensor, param: torch.Tensor, state: State):
    """``CoordinateLSTM.features`` as the library had it before its features came feature-major:
    the same values, gathered column by column into a contiguous ``(n, F)``."""
    cfg = self.config
    features = [preprocess(grad, cfg.preprocess_p)]
    new_state: State = {}
    if cfg.momentum_decays:
        betas = grad.new_tensor(cfg.momentum_decays).unsqueeze(1)
        m = torch.lerp(grad.unsqueeze(0), state["m"], betas)
        new_state["m"] = m
        features += [preprocess(row, cfg.preprocess_p) for row in m]
    if cfg.rms_decays:
        betas = grad.new_tensor(cfg.rms_decays).unsqueeze(1)
        v = torch.lerp(bounded_square(grad).unsqueeze(0), state["v"], betas)
        new_state["v"] = v
        features.append((grad / rms_denominator(v)).t())
    if cfg.param_input:
        features.append(param.unsqueeze(1))
    return (features[0] if len(features) == 1 else torch.cat(features, dim=1)), new_state


def meta_lstm_features_gathered(self: MetaLSTMCell, grad: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """``MetaLSTMCell.features`` as the library had it before its features came feature-major."""
    p = self.config.preprocess_p
    loss_features = preprocess(loss.to(grad.dtype).reshape(-1), p)
    return torch.cat((preprocess(grad, p), loss_features.expand(grad.shape[0], 2)), dim=1)


@contextlib.contextmanager
def gathered_features() -> Iterator[None]:
    """Runs the rules' features as :func:`features_gathered` and :func:`meta_lstm_features_gathered`."""
    originals = CoordinateLSTM.features, MetaLSTMCell.features
    CoordinateLSTM.features, MetaLSTMCell.features = features_gathered, meta_lstm_features_gathered
    try:
        yield
    finally:
        CoordinateLSTM.features, MetaLSTMCell.features = originals


class PerTensorRule(UpdateRule):
    """Runs ``inner`` separately on consecutive coordinate blocks of the given sizes (the baseline)."""

    kind = "PerTensor"

    def __init__(self, inner: UpdateRule, sizes: list[int]) -> None:
        torch.nn.Module.__init__(self)
        self.inner, self.sizes, self.config = inner, sizes, inner.config

    def state_spec(self):
        return self.inner.state_spec()

    def forward(self, grad, param, state: State, loss=None):
        dims = {k: len(spec.lead) for k, spec in self.inner.state_spec().items()}
        steps, states, start = [], [], 0
        while start < grad.shape[0]:
            for size in self.sizes:
                sl = slice(start, start + size)
                piece = {k: v.narrow(dims[k], start, size) for k, v in state.items()}
                step, new = self.inner(grad[sl], param[sl], piece, loss)
                steps.append(step)
                states.append(new)
                start += size
        return torch.cat(steps), {k: torch.cat([s[k] for s in states], dim=dims[k]) for k in state}


class WithoutLSTM(UpdateRule):
    """``inner``'s features (a :class:`CoordinateLSTM`'s) with its LSTM stack and head replaced by
    one linear map per coordinate: every cost of the unroll but the LSTM's. Its truncation's time
    bounds what any implementation of the LSTM could gain (Amdahl: the LSTM for free)."""

    kind = "WithoutLSTM"

    def __init__(self, inner: UpdateRule) -> None:
        torch.nn.Module.__init__(self)
        self.config = inner.config
        self._features = inner.features  # not a submodule: its LSTM's weights get no gradient here
        self.weight = torch.nn.Parameter(torch.full((inner.lstm.input_size,), 1e-3))
        self._spec = inner.state_spec()

    def state_spec(self):
        return self._spec

    def forward(self, grad, param, state: State, loss=None):
        x, new_state = self._features(grad, param, state)
        new_state["h"], new_state["c"] = state["h"], state["c"]
        return (x @ self.weight) * self.config.output_scale, new_state


#: largest relative meta-gradient difference (2-norm, per rule weight) from the baseline that counts
#: as the same meta-gradient: float32 rounding of the different LSTM implementations gave up to
#: 1e-5 in the recorded runs; a wrong implementation gives 1e-2 and more
TOLERANCE = 1e-3


def meta_gradient_difference(grads: dict[str, list[torch.Tensor]], baseline: str) -> float:
    """Largest relative difference ``|a - b| / |b|`` (2-norms, over the rule's weights) of each
    implementation's meta-gradient ``a`` in ``grads`` (name -> one tensor per rule weight, in
    the same order) from the baseline's ``b``; NaN when any is not finite, so that a NaN on one
    side cannot hide behind ``max``."""
    reference = grads[baseline]
    diffs = [
        ((a - b).norm() / b.norm()).item()
        for name, grad in grads.items()
        if name not in (baseline, "without-lstm")
        for a, b in zip(grad, reference, strict=True)
    ]
    return max(diffs, default=0.0) if all(math.isfinite(d) for d in diffs) else math.nan


def os_counters() -> tuple[int, float]:
    """This process's minor page faults and system CPU seconds so far (0, 0.0 where the OS does
    not say). A first touch of freshly mapped memory is a page fault; how often the allocator
    returns memory to the OS and maps it again differs by host and settings
    (``THP_MEM_ALLOC_ENABLE=1``: 2 MiB pages), and so does a truncation's time."""
    try:
        import resource
    except ImportError:  # Windows
        return 0, 0.0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt, usage.ru_stime


def profile_shares(rule: UpdateRule, family, args, top: int = 5) -> dict[str, float]:
    """Percent of self CPU time of the ``top`` most expensive operators in one truncation
    (``torch.profiler``), the rest summed as ``"other"``."""
    times = self_cpu_ms(lambda: truncation(rule, family, args))
    total = sum(times.values())
    shares = {name[:60]: round(100 * ms / total, 1) for name, ms in list(times.items())[:top]}
    shares["other"] = round(100 - sum(shares.values()), 1)
    return shares


IMPLEMENTATIONS = {
    "batched": "batched unroll, `lstm_step` (learnedopt)",
    "batched-torch-head": "batched unroll, `lstm_step` with the rule's linear head in torch operations (the library before the head joined the kernel)",
    "batched-gathered-features": "batched unroll, `lstm_step`, the rule's features gathered column by column into a contiguous (n, F) (the library before they came feature-major)",
    "batched-products": "batched unroll, `lstm_step` as BLAS products and compiled pointwise code (the library before its fused CPU kernel)",
    "batched-symbolic": "the same, compiled with symbolic shapes",
    "batched-nn-lstm": "batched unroll, `torch.nn.LSTM`",
    "per-tensor": "per-tensor rule calls, `torch.nn.LSTM` (baseline)",
    "per-tensor-cell-ops": "per-tensor rule calls, the textbook LSTM cell in plain torch ops with autograd",
    "without-lstm": "batched unroll, the LSTM replaced by a linear step (all the work but the LSTM's)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="mnist-mlp")
    parser.add_argument("--rule", default="CoordinateLSTM", choices=sorted(RULES),
                        help="MetaLSTMCell has no per-tensor row: it runs once per task with that task's loss")  # fmt: skip
    parser.add_argument("--preset", default=None, help="time this preset's rule (architecture and weights) instead of --rule's default")
    parser.add_argument("--meta-batch", type=positive_int, default=2)
    parser.add_argument("--unroll", type=positive_int, default=20)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--seed", type=seed_arg, default=0)
    parser.add_argument("--threads", type=thread_count, default=1, help="torch threads (default 1)")
    parser.add_argument("--tag", type=results_tag("meta_train_throughput"), help="suffix of the results file name (e.g. for a run under other settings)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kept = keep_freed_memory()  # as learnedopt meta-train does, for every implementation alike
    try:  # an unknown task or preset, or missing data: a one-line error
        family = make_family(args.task, split="meta_train")
        if args.preset:
            from learnedopt.weights import build_preset

            rule = build_preset(args.preset)[0]
            args.rule = rule.kind
        else:
            rule = RULES[args.rule]()
    except (OSError, ValueError) as err:
        fail(parser, str(err))
    rule.requires_grad_(True)
    g = generator_for(args.seed, 1, 1)
    params = family.sample_batch(args.meta_batch, g).init_params(g)
    sizes = [v[0].numel() for v in params.values()]
    runs = {"batched": (rule, contextlib.nullcontext)}
    if rule.kind == "CoordinateLSTM":  # the rule with a head
        runs["batched-torch-head"] = (rule, lambda: lstm_step_as(lstm_step.lstm_step))
    runs["batched-gathered-features"] = (rule, gathered_features)
    runs["batched-products"] = (rule, without_cpu_kernel)
    if compile_enabled():
        runs["batched-symbolic"] = (rule, symbolic_shapes)
    runs["batched-nn-lstm"] = (rule, torch_lstm)
    if not rule.needs_loss:
        runs["per-tensor"] = (PerTensorRule(rule, sizes), torch_lstm)
        runs["per-tensor-cell-ops"] = (PerTensorRule(rule, sizes), lambda: lstm_step_as(through_cell_ops))
    baseline = "per-tensor" if "per-tensor" in runs else "batched-nn-lstm"
    if rule.kind == "CoordinateLSTM":  # its features(grad, param, state); MetaLSTMCell's take the loss too
        runs["without-lstm"] = (WithoutLSTM(rule), contextlib.nullcontext)
    for r, context in runs.values():
        with context():
            truncation(r, family, args)  # warm-up (and torch.compile of the LSTM step's pointwise parts)
    times = {name: [] for name in runs}
    os_costs = {name: [] for name in runs}  # (minor page faults, system CPU s) of each timed truncation
    grads = {}
    # round by round, each implementation once per round, so that a slow spell of a shared
    # machine (minutes long on the VMs these ran on: one row's seven repeats in a row came out
    # 1.3x slower than in the run before, files not kept) falls on every row alike; each timed truncation right
    # after an untimed one of the same implementation, since the first truncation after another
    # implementation can pay for mapping memory that one released (tens of thousands of page
    # faults), and the best of the repeats should not carry that
    for _ in range(args.repeats):
        for name, (r, context) in runs.items():
            with context():
                truncation(r, family, args)
                before = os_counters()
                seconds, grads[name] = truncation(r, family, args)
                after = os_counters()
            times[name].append(seconds)
            os_costs[name].append((after[0] - before[0], after[1] - before[1]))
    diff = meta_gradient_difference(grads, baseline)
    require_equal_gradients(f"{args.rule} on {args.task} against the {baseline} baseline", diff, TOLERANCE)
    profiles = {}
    for name in ("batched", "batched-nn-lstm"):
        r, context = runs[name]
        with context():
            profiles[name] = profile_shares(r, family, args)
    best = {k: min(v) for k, v in times.items()}
    # of the fastest (reported) truncation of each implementation
    faults, system = ({k: os_costs[k][v.index(best[k])][i] for k, v in times.items()} for i in (0, 1))
    with without_cpu_kernel():  # the fused kernel's products are not torch operators to count
        gflop = gflop_count(lambda: truncation(rule, family, args))
    peak = matmul_gflops()
    floor = gflop / peak
    row = dict(
        task=args.task, rule=args.rule, preset=args.preset, meta_batch=args.meta_batch, unroll=args.unroll, tensors_per_task=len(sizes),
        coordinates=sum(sizes) * args.meta_batch, seconds={k: best[k] for k in runs}, baseline=baseline,
        speedup=best[baseline] / best["batched"], meta_grad_rel_diff=diff, threads=torch.get_num_threads(),
        compiled=compile_enabled(), profile_self_cpu_percent=profiles, gflop_per_truncation=gflop,
        matmul_gflops=peak, floor_seconds=floor, speedup_bound=best[baseline] / floor,
        batched_gflops=gflop / best["batched"],
        free_lstm_bound=best[baseline] / best["without-lstm"] if "without-lstm" in best else None,
        minor_page_faults=faults, system_seconds={k: round(v, 3) for k, v in system.items()}, keep_freed_memory=kept,
    )
    print(row)
    lines = [
        f"One truncation (unroll of T={args.unroll} steps + backward) of `{args.rule}`"
        + (f" (preset `{args.preset}`: {rule.config})" if args.preset else "")
        + " meta-training on "
        f"`{args.task}`, meta-batch {args.meta_batch} ({row['coordinates']:,} coordinates in "
        f"{len(sizes) * args.meta_batch} tensors), best of {args.repeats} rounds (implementations alternated) after a warm-up, {row['threads']} "
        f"threads, pointwise parts {'compiled' if row['compiled'] else 'eager (LEARNEDOPT_COMPILE=0)'}, freed memory "
        + ("kept mapped (as `learnedopt meta-train`)" if kept else "returned to the OS as malloc chooses") + ".\n",
        "| implementation | seconds / truncation | truncations / s | speed-up vs baseline | minor page faults | system CPU s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in runs:
        label = IMPLEMENTATIONS[name] + (" (baseline)" if name == baseline and "baseline" not in IMPLEMENTATIONS[name] else "")
        lines.append(
            f"| {label} | {best[name]:.2f} | {1 / best[name]:.3f} | {best[baseline] / best[name]:.2f}x "
            f"| {faults[name]:,} | {system[name]:.2f} |"
        )
    lines.append(
        "\nPage faults and system CPU time are those of the reported (fastest) truncation: the kernel's "
        "share of it, mostly mapping fresh memory on first touch."
    )
    lines.append(f"\nLargest relative meta-gradient difference from the baseline: {diff:.1e}.")
    lines.append(
        f"\nAgainst the hardware: one truncation's matrix products are {gflop:.2f} GFLOP (counted on the "
        f"library's truncation by `torch.utils.flop_counter`; pointwise work not counted), and a 2048x2048 "
        f"float32 matmul ran at {peak:.1f} GFLOP/s in this run. At that rate the products alone take "
        f"{floor:.2f} s, so an implementation of the same arithmetic that runs these skinny products no "
        f"faster than a large square one is at most {best[baseline] / floor:.1f}x faster than the baseline. "
        f"The library's truncation runs at {gflop / best['batched']:.1f} GFLOP/s "
        f"({100 * floor / best['batched']:.0f}% of that rate)."
    )
    if row["free_lstm_bound"] is not None:
        lines.append(
            f"\nWithout the LSTM: the same unroll with the LSTM stack and head replaced by one linear map per "
            f"coordinate (the features, the optimizee's forward and backward, the updates, the meta-loss and "
            f"its backward) takes {best['without-lstm']:.2f} s, so an implementation whose LSTM cost nothing "
            f"would be {row['free_lstm_bound']:.1f}x faster than the baseline (Amdahl); the library's LSTM "
            f"takes the other {best['batched'] - best['without-lstm']:.2f} s of its truncation."
        )
    for name, shares in profiles.items():
        ops = ", ".join(f"`{op}` {share}%" for op, share in shares.items())
        lines.append(f"\nSelf CPU time in one profiled truncation, {IMPLEMENTATIONS[name]}: {ops}.")
    suffix = (f"_{args.preset}" if args.preset else "" if args.rule == "CoordinateLSTM" else f"_{args.rule}") + (
        f"_{args.tag}" if args.tag else ""
    )
    write_results("meta_train_throughput" + suffix, {"rows": [row]}, "\n".join(lines))


if __name__ == "__main__":
    main()
