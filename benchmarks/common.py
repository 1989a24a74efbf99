"""Helpers shared by the benchmark scripts: timing and writing results."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from learnedopt.cli import path_arg as path_arg  # the scripts take paths as the CLI does
from learnedopt.cli import positive_int as positive_int  # the scripts count things as the CLI does
from learnedopt.cli import seed_arg as seed_arg  # and take seeds
from learnedopt.cli import thread_count as thread_count  # and bound their threads as it does
from learnedopt.evaluation.report import check_report_name, cpu_name, dumps_report, results_header
from learnedopt.files import write_atomically
from learnedopt.markdown import code

RESULTS = Path(__file__).resolve().parent / "results"
#: environment variables that change a benchmark's speed: torch's 2 MiB pages for large CPU
#: tensors, this library's compile switch, OpenMP threads, glibc's allocator settings
SPEED_ENV = ("THP_MEM_ALLOC_ENABLE", "LEARNEDOPT_COMPILE", "OMP_NUM_THREADS", "GLIBC_TUNABLES", "LEARNEDOPT_KEEP_FREED_MEMORY")


def power_of_two(least: int) -> Callable[[str], int]:
    """``type=`` of a Triton launch option (a block size, a warp count): a power of two of at least
    ``least``, else argparse's one-line error (the launchers refuse any other value mid-run)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < least or value & (value - 1):
            raise argparse.ArgumentTypeError(f"must be a power of two >= {least}, got {text!r}")
        return value

    return parse


def time_call(fn: Callable[[], object], *, repeats: int = 5, min_time: float = 0.2) -> float:
    """Median seconds per call over ``repeats`` measurements of at least ``min_time`` each."""
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_time:
                break
        samples.append(elapsed / calls)
    return statistics.median(samples)


def matmul_gflops(size: int = 2048, dtype: torch.dtype = torch.float32, device: str = "cpu") -> float:
    """Achieved GFLOP/s of a square ``torch.matmul`` on ``device``, now (random inputs; on CUDA
    synchronized after each product, in float32 without TF32 unless torch allows it)."""
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))

    def product() -> None:
        torch.matmul(a, b)
        if a.device.type == "cuda":
            torch.cuda.synchronize(a.device)

    seconds = time_call(product)
    return 2 * size**3 / seconds / 1e9


def gflop_count(fn: Callable[[], object]) -> float:
    """GFLOP of the matrix products and convolutions one call of ``fn`` runs (forward, backward,
    and higher-order terms when ``fn`` runs them), counted by ``torch.utils.flop_counter``;
    pointwise work is not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def self_cpu_ms(fn: Callable[[], object]) -> dict[str, float]:
    """Self CPU milliseconds of each operator in one call of ``fn`` (``torch.profiler``), most
    expensive first (the profiler's own overhead included, so compare shares, not sums)."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return {e.key: e.self_cpu_time_total / 1e3 for e in events}


def machine() -> dict[str, object]:
    info: dict[str, object] = {
        "cpu": cpu_name(),
        # the vector ISA torch's kernels dispatch to (AVX2, AVX512, ...): one model name
        # ("AMD EPYC") has covered hosts on which oneDNN's LSTM ran 3.5x apart
        # (results/lstm_chunk.md against results/earlier_hosts/lstm_chunk.md)
        "isa": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": _git_commit(),
    }
    env = {k: os.environ[k] for k in SPEED_ENV if os.environ.get(k)}
    if env:  # recorded only when set, so that results of default runs read as before
        info["env"] = env
    return info


def _git_commit() -> str | None:
    """The short commit hash of the repository these scripts are in, with ``+dirty`` when tracked
    files differ from it (asked there, not in the current directory: a run started elsewhere
    recorded no commit, or another repository's)."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True,
                               check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def revision_commit(revision: str) -> str | None:
    """The short hash of the commit a git revision (``HEAD~1``, a branch, a hash) names now in the
    repository these scripts are in; None where git does not know it."""
    try:
        done = subprocess.run(["git", "rev-parse", "--verify", "--quiet", "--short", f"{revision}^{{commit}}"],
                              cwd=Path(__file__).resolve().parent, capture_output=True, text=True)  # fmt: skip
    except OSError:
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


#: what a results cell names as the best tuned baseline when none of them stayed finite
NO_FINITE_BASELINE = "none (no baseline run stayed finite)"


def nan_note(nonfinite: int) -> str:
    """What a results cell adds for runs (of its seeds) in which a NaN/Inf appeared: ``" (k NaN)"``,
    or nothing when every run stayed finite (its statistics are over the finite runs only)."""
    return f" ({nonfinite} NaN)" if nonfinite else ""


class Distinct(argparse.Action):
    """``action=`` of a list option (``nargs="+"``) whose every value is a run, a row or a column
    of the results: a value given more than once (which ran again for nothing, and showed twice in
    a table keyed once in the JSON) is argparse's one-line error naming it."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:  # fmt: skip
        repeated = [value for i, value in enumerate(values) if values.count(value) > 1 and values.index(value) == i]
        if repeated:
            shown = ", ".join(sorted(map(str, repeated)))
            parser.error(f"argument {option_string or self.metavar or self.dest}: each value once, got {shown} more than once")
        setattr(namespace, self.dest, values)


def results_tag(script: str) -> Callable[[str], str]:
    """``type=`` of ``--tag``, the suffix of the results file name ``<script>_<tag>`` (``""``: none):
    a tag that is a path, or makes a name too long for :data:`RESULTS`' file system, is argparse's
    one-line error when the options are parsed, not a traceback when the results are written
    after the run (:func:`~learnedopt.evaluation.check_report_name`)."""

    def parse(text: str) -> str:
        if not text:
            return text
        if Path(text).name != text or text in (".", ".."):
            raise argparse.ArgumentTypeError(f"must be a suffix of the results file name, not a path: {text!r}")
        try:
            check_report_name(RESULTS, f"{script}_{text}", ("json", "md"), option="the results file name")
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return text

    return parse


def path_option(text: str) -> Path:
    """``type=`` of an option that names a file or folder, as a :class:`~pathlib.Path`: an empty
    one is argparse's one-line error (:func:`~learnedopt.values.path_arg`), not the current folder."""
    return Path(path_arg(text))


def results_dir(text: str) -> Path:
    """``type=`` of ``--results-dir``: a folder, made with its parents when the results are
    written (:func:`write_results`); an empty path or an existing file is argparse's one-line
    error when parsed, not a traceback after the run."""
    path = path_option(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    return path


def fail(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """Exit with status 2 and the one-line ``PROG: error: MESSAGE`` on stderr (as argparse's own
    errors, without the usage lines)."""
    parser.exit(2, f"{parser.prog}: error: {' '.join(str(message).split())}\n")


def require_equal_gradients(what: str, rel_diff: float, tolerance: float) -> None:
    """Exit with status 1 and a one-line error, before anything is written, when the relative
    difference ``rel_diff`` of two meta-gradients that should be equal is above ``tolerance`` or
    not finite (a NaN on either side): a benchmark must not time and report two implementations
    that compute different things."""
    if not rel_diff <= tolerance:  # NaN fails too
        raise SystemExit(
            f"{Path(sys.argv[0]).name}: error: {what}: relative meta-gradient difference {rel_diff:.1e} "
            f"(tolerance {tolerance:.0e}): the implementations do not compute the same meta-gradient; nothing written"
        )


#: largest relative meta-gradient difference (2-norm, per rule weight) of an A/B run's two sides
#: (``kernel_ab.py``, ``revision_ab.py``) that counts as other rounding of the same meta-gradient,
#: as ``meta_train_throughput.TOLERANCE``: reordered float32 work gives 1e-5 and less, a side that
#: computes something else 1e-2 and more
AB_TOLERANCE = 1e-3


def relative_difference(grads: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    """Largest ``|a - b| / |b|`` (2-norms) over the paired tensors of ``grads`` and ``reference``
    (one per rule weight, in the same order): 0 where a pair is equal (a weight without a
    gradient on both sides), NaN when any is not finite, infinite where the two are not of one
    rule (other counts or shapes of weights: not the same meta-gradient either)."""
    if len(grads) != len(reference) or any(a.shape != b.shape for a, b in zip(grads, reference)):
        return math.inf
    diffs = [0.0 if torch.equal(a, b) else ((a - b).norm() / b.norm()).item() for a, b in zip(grads, reference, strict=True)]
    return max(diffs, default=0.0) if all(math.isfinite(d) for d in diffs) else math.nan


def read_json(path: str | os.PathLike[str]) -> Any:
    """The JSON value in the file at ``path``.

    Raises:
        ValueError: a one-line message when the file is missing, unreadable or not JSON.
    """
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err.strerror or err}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a JSON file: {err}") from None


def write_results(name: str, payload: dict, table: str, argv: Sequence[str] | None = None) -> None:
    """Write ``results/<name>.json`` and ``results/<name>.md`` (the command is in the payload:
    ``python`` and ``argv``, the script and its arguments, by default ``sys.argv``; a script
    whose ``main(argv)`` ran other arguments passes them)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    # optimizee_eval.py --resume gives the report of the command without it
    words = sys.argv if argv is None else argv
    payload = {"command": shlex.join(["python", *(arg for arg in words if arg != "--resume")]), "machine": machine(), **payload}
    # through a temporary file and a rename, as `learnedopt evaluate optimizers` writes its report: a
    # kill or a full disk while a committed result is rewritten leaves it whole
    text = dumps_report(payload) + "\n"
    write_atomically(RESULTS / f"{name}.json", lambda tmp: tmp.write_text(text))
    header = results_header(name, payload["command"], payload["machine"])
    write_atomically(RESULTS / f"{name}.md", lambda tmp: tmp.write_text(header + table + "\n"))


def ab_parser(script: str, description: str, against: str) -> argparse.ArgumentParser:
    """The options of an A/B run of meta-training truncations (``kernel_ab.py``,
    ``revision_ab.py``, named ``script`` in the results file name); ``against`` is the help of
    ``--against``, the baseline's revision."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--against", required=True, help=against)
    parser.add_argument("--preset", default=None, help="time this preset's rule instead of the paper's CoordinateLSTM")
    parser.add_argument("--task", default="mnist-mlp")
    parser.add_argument("--meta-batch", type=positive_int, default=2)
    parser.add_argument("--unroll", type=positive_int, default=20)
    parser.add_argument("--seed", type=seed_arg, default=0)
    parser.add_argument("--rounds", type=positive_int, default=9)
    parser.add_argument("--threads", type=thread_count, default=1)
    parser.add_argument("--tag", type=results_tag(script), help="suffix of the results file name")
    return parser


def ab_inputs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[Any, Any]:
    """The working tree's task family of an A/B run's ``--task`` (its meta-train split) and rule of
    its ``--preset`` (``truncation_worker.build_rule``); a bad one is the parser's one-line error
    before any build or worker starts (a worker's was a traceback)."""
    from truncation_worker import build_rule

    from learnedopt.meta import make_family

    try:
        return make_family(args.task, split="meta_train"), build_rule(args.preset)
    except (OSError, ValueError) as err:
        fail(parser, str(err))


def write_ab_results(script: str, args: argparse.Namespace, times: dict[str, list[float]], same_bits: bool, compared: str, side: str,
                     rel_diff: float | None = None) -> None:  # fmt: skip
    """Write an A/B run's results (``kernel_ab.py``, ``revision_ab.py``): ``times`` holds the
    seconds of each round for ``"baseline"`` and ``"working tree"``; ``compared`` says what ran
    against what (after "the ... at `REV`"), ``side`` names what differs (the table's heading);
    ``rel_diff``: the largest relative difference of the two meta-gradients (checked by the
    caller against :data:`AB_TOLERANCE`), where known."""
    best = {name: min(t) for name, t in times.items()}
    median = {name: statistics.median(t) for name, t in times.items()}
    # the commit --against names: a branch or HEAD~1, recorded as given, names another once it moves
    commit = revision_commit(args.against)  # of an even count: the mean of the middle two
    row = dict(
        against=args.against, against_commit=commit, preset=args.preset, task=args.task, meta_batch=args.meta_batch, unroll=args.unroll, rounds=args.rounds,
        threads=args.threads, best_seconds=best, median_seconds=median, seconds=times,
        speedup=best["baseline"] / best["working tree"], median_speedup=median["baseline"] / median["working tree"],
        same_meta_gradient_bits=same_bits, meta_grad_rel_diff=rel_diff,
    )  # fmt: skip
    print(row)
    what = f"preset {code(args.preset)}" if args.preset else "the paper's `CoordinateLSTM`"
    lines = [
        f"One truncation (unroll of T={args.unroll} steps + backward) of {what} meta-training on {code(args.task)}, "
        f"meta-batch {args.meta_batch}, {args.threads} thread(s): the {side} at {code(args.against)}{'' if commit is None else f' ({code(commit)})'} {compared}, {args.rounds} rounds.\n",
        f"| {side} | best s | median s |",
        "|---|---:|---:|",
        *(f"| {name} | {best[name]:.3f} | {median[name]:.3f} |" for name in times),
        f"\nWorking tree faster by {row['speedup']:.2f}x (best), {row['median_speedup']:.2f}x (median); meta-gradients "
        + ("the same bits." if same_bits else "differ (other rounding"
           + ("" if rel_diff is None else f": largest relative difference {rel_diff:.1e}") + ")."),
    ]
    write_results(script + (f"_{args.tag}" if args.tag else ""), {"rows": [row]}, "\n".join(lines))


def through_nn_lstm(lstm: torch.nn.LSTM, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
    """:func:`learnedopt.nn.lstm_step.lstm_step`'s contract, run as ``torch.nn.LSTM`` (oneDNN's
    fused cell on CPU, with its own fused backward)."""
    top, (h, c) = lstm(x.unsqueeze(0), (h, c))
    return top[0], h, c


def through_cell_ops(lstm: torch.nn.LSTM, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
    """:func:`learnedopt.nn.lstm_step.lstm_step`'s contract, run as the textbook LSTM cell in plain
    torch ops (two ``linear`` products, ``sigmoid``/``tanh`` per gate) with autograd through them."""
    hs, cs, layer_input = [], [], x
    for layer in range(lstm.num_layers):
        w_ih, w_hh, b_ih, b_hh = (getattr(lstm, f"{name}_l{layer}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        gates = torch.nn.functional.linear(layer_input, w_ih, b_ih) + torch.nn.functional.linear(h[layer], w_hh, b_hh)
        i, f, g, o = gates.chunk(4, dim=1)
        c_new = torch.sigmoid(f) * c[layer] + torch.sigmoid(i) * torch.tanh(g)
        layer_input = torch.sigmoid(o) * torch.tanh(c_new)
        hs.append(layer_input)
        cs.append(c_new)
    return layer_input, torch.stack(hs), torch.stack(cs)


@contextlib.contextmanager
def lstm_step_as(step: Callable) -> Iterator[None]:
    """Within: both rules run their LSTM step as ``step`` (:func:`through_nn_lstm`: as the
    optimizer's no-grad step did before it ran :func:`learnedopt.nn.lstm_step.lstm_step` too;
    :func:`through_cell_ops`) instead of ``lstm_step``."""
    from learnedopt.nn import coordinate_lstm, meta_lstm

    from learnedopt.nn.lstm_step import linear_head

    def step_and_head(lstm, x, h, c, head=None):
        top, h, c = step(lstm, x, h, c)
        return (top if head is None else linear_head(top, head.weight, head.bias)), h, c

    modules = (coordinate_lstm, meta_lstm)
    originals = [m.lstm_step for m in modules]
    for m in modules:
        m.lstm_step = step_and_head
    try:
        yield
    finally:
        for m, original in zip(modules, originals, strict=True):
            m.lstm_step = original


@contextlib.contextmanager
def without_cpu_kernel() -> Iterator[None]:
    """Within: the LSTM step runs as BLAS products and compiled pointwise functions, not as the
    fused CPU kernel :mod:`learnedopt.kernels.lstm_layer_cpu` (what the library did before it)."""
    before = os.environ.get("LEARNEDOPT_CPU_KERNEL")
    os.environ["LEARNEDOPT_CPU_KERNEL"] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["LEARNEDOPT_CPU_KERNEL"]
        else:
            os.environ["LEARNEDOPT_CPU_KERNEL"] = before


def torch_lstm() -> contextlib.AbstractContextManager[None]:
    """Within: both rules run their LSTM step as ``torch.nn.LSTM`` (:func:`through_nn_lstm`)."""
    return lstm_step_as(through_nn_lstm)
