"""Reproduction check: do two weight files of one learned optimizer train the held-out problems alike?

A model card's command, rerun, should give weights whose evaluation numbers match the shipped
ones within the reported spread (float32 results can differ in the last bits between machines
and thread counts, so bitwise equality is reported but not required). This runs both files, untuned
(lr 1.0), on the same evaluation seeds of the held-out suite as ``optimizee_eval.py`` and writes
the mean final loss +- sample std of each over the seeds whose run stayed finite (with ``(k NaN)``
when ``k`` runs diverged), the largest per-seed difference (``inf`` when a seed diverged in one run
and not in the other; seeds that diverged in both are left out), and the largest difference
between the weight tensors. "Bitwise equal" compares the files' whole
:func:`learnedopt.weights.fingerprint`: kind, architecture config and weights:

    python benchmarks/reproduction_check.py SHIPPED.safetensors RERUN.safetensors --out DIR [--problems ...]
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Distinct, fail, machine, nan_note, path_arg, results_dir  # noqa: E402

from learnedopt import markdown  # noqa: E402
from learnedopt.evaluation import DEFAULT_PROBLEMS, learned_from_file, make_problem, run_optimizer, summarize  # noqa: E402
from learnedopt.evaluation.harness import data_mnist_sha256  # noqa: E402
from learnedopt.evaluation.report import results_header  # noqa: E402
from learnedopt.weights import fingerprint, load_weights  # noqa: E402


def weight_difference(a: str, b: str) -> dict[str, float | bool]:
    """Compare two weight files of one kind of update rule: ``bitwise_equal`` (the whole
    :func:`~learnedopt.weights.fingerprint` is equal: kind, architecture config and the SHA-256 of
    the weights), ``same_config`` (the architecture configs are equal), and the largest absolute
    difference between same-named tensors and the largest absolute entry.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: a file is not a weight file, the files hold update rules of different kinds,
            or they hold different tensors (names or shapes).
    """
    (rule_a, _), (rule_b, _) = load_weights(a), load_weights(b)
    fa, fb = fingerprint(rule_a), fingerprint(rule_b)
    if fa["kind"] != fb["kind"]:
        raise ValueError(f"{a} holds a {fa['kind']} update rule and {b} a {fb['kind']}: not two runs of one learned optimizer")
    ta, tb = rule_a.state_dict(), rule_b.state_dict()
    if ta.keys() != tb.keys() or any(ta[k].shape != tb[k].shape for k in ta):
        raise ValueError(f"{a} and {b} hold different tensors: {sorted(ta)} vs {sorted(tb)}")
    return {
        "bitwise_equal": fa == fb,
        "same_config": fa["config"] == fb["config"],
        "max_abs_diff": max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta),
        "max_abs_value": max(float(ta[k].abs().max()) for k in ta),
    }


def max_seed_diff(a: Sequence[float], b: Sequence[float]) -> float:
    """Largest ``|a - b|`` over seeds (final losses indexed by seed): ``inf`` when a seed is finite
    in one and not the other; a seed non-finite in both is left out (NaN when every seed is)."""
    diffs = [
        abs(x - y) if math.isfinite(x) and math.isfinite(y) else math.inf
        for x, y in zip(a, b, strict=True)
        if math.isfinite(x) or math.isfinite(y)
    ]
    return max(diffs, default=math.nan)


def build_parser() -> argparse.ArgumentParser:
    """The script's options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("shipped", type=path_arg)
    parser.add_argument("rerun", type=path_arg)
    parser.add_argument("--problems", nargs="+", action=Distinct, default=list(DEFAULT_PROBLEMS))  # results keyed by problem
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--data", type=path_arg, default=None)
    parser.add_argument("--out", type=results_dir, required=True)  # a folder (not a file, nor "")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.seeds < 1:
        fail(parser, f"--seeds must be >= 1, got {args.seeds}")
    try:  # every input checked before any run
        weights = weight_difference(args.shipped, args.rerun)
        specs = {"shipped": learned_from_file(args.shipped), "rerun": learned_from_file(args.rerun)}
        data_mnist_sha256(args.data)  # a --data of no MNIST, where no problem reads it, was ignored
        problems = {name: make_problem(name, args.data) for name in args.problems}
    except (OSError, ValueError) as err:
        fail(parser, str(err))
    torch.set_num_threads(1)
    # every option, quoted for the shell: the command reruns this check as it ran
    command = [args.shipped, args.rerun, "--out", str(args.out), "--problems", *args.problems, "--seeds", str(args.seeds)]
    command += ["--data", args.data] if args.data is not None else []
    report: dict = {"command": shlex.join(["python", "benchmarks/reproduction_check.py", *command]),
        "machine": machine(), "weights": weights, "problems": {}}
    start = time.perf_counter()
    for name, problem in problems.items():
        row = {}
        for key, spec in specs.items():
            curves = np.stack([run_optimizer(problem, s, spec.factory(), 1.0) for s in range(args.seeds)])
            stats = summarize(curves)
            row[key] = {k: stats[k] for k in ("final_mean", "final_std", "finals", "nonfinite")}
        row["max_seed_diff"] = max_seed_diff(row["shipped"]["finals"], row["rerun"]["finals"])
        report["problems"][name] = row
        print(f"{name}: shipped {row['shipped']['final_mean']:.4g}, rerun {row['rerun']['final_mean']:.4g}", flush=True)
    report["seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reproduction.json").write_text(json.dumps(report, indent=1))
    w = report["weights"]
    lines = [
        results_header("Reproduction check", report["command"], report["machine"]) + f"Weights: bitwise equal: {w['bitwise_equal']}"
        + ("" if w["same_config"] else " (the architecture configs differ)")
        + f"; largest absolute difference {w['max_abs_diff']:.3g} "
        f"(largest entry {w['max_abs_value']:.3g}). Mean final loss over {args.seeds} evaluation seeds "
        f"(+- sample std), untuned; {report['seconds'] / 60:.1f} minutes.", "",
        "| problem | shipped | rerun | largest per-seed difference |", "|---|---:|---:|---:|",
    ]
    for name, row in report["problems"].items():
        a, b = row["shipped"], row["rerun"]
        lines.append(markdown.row([name, f"{a['final_mean']:.4g} +- {a['final_std']:.2g}{nan_note(a['nonfinite'])}",
                                   f"{b['final_mean']:.4g} +- {b['final_std']:.2g}{nan_note(b['nonfinite'])}",
                                   f"{row['max_seed_diff']:.2g}"]))
    (args.out / "reproduction.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
