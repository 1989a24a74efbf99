"""Reproduction check: do two weight files of one learned optimizer train the held-out problems alike?

A model card's command, rerun, should give weights whose evaluation numbers match the shipped
ones within the reported spread (float32 results can differ in the last bits between machines
and thread counts, so bitwise equality is reported but not required). This runs both files, untuned
(lr 1.0), on the same evaluation seeds of the held-out suite as ``optimizee_eval.py`` and writes
the mean final loss +- sample std of each, the largest per-seed difference, and the largest
difference between the weight tensors:

    python benchmarks/reproduction_check.py SHIPPED.safetensors RERUN.safetensors --out DIR [--problems ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from learnedopt.evaluation import DEFAULT_PROBLEMS, learned_from_file, make_problem, run_optimizer, summarize  # noqa: E402


def weight_difference(a: str, b: str) -> dict[str, float | bool]:
    """Largest absolute difference between same-named tensors of two weight files, and whether
    every tensor is bitwise equal. Raises ``ValueError`` when the files hold different tensors."""
    ta, tb = load_file(a), load_file(b)
    if ta.keys() != tb.keys() or any(ta[k].shape != tb[k].shape for k in ta):
        raise ValueError(f"{a} and {b} hold different tensors: {sorted(ta)} vs {sorted(tb)}")
    return {
        "bitwise_equal": all(torch.equal(ta[k], tb[k]) for k in ta),
        "max_abs_diff": max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta),
        "max_abs_value": max(float(ta[k].abs().max()) for k in ta),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("shipped")
    parser.add_argument("rerun")
    parser.add_argument("--problems", nargs="+", default=list(DEFAULT_PROBLEMS))
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--data", default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    specs = {"shipped": learned_from_file(args.shipped), "rerun": learned_from_file(args.rerun)}
    report: dict = {"command": "python benchmarks/reproduction_check.py " + " ".join(
        [args.shipped, args.rerun, "--out", str(args.out), "--problems", *args.problems]),
        "machine": machine(), "weights": weight_difference(args.shipped, args.rerun), "problems": {}}
    start = time.perf_counter()
    for name in args.problems:
        problem = make_problem(name, args.data)
        row = {}
        for key, spec in specs.items():
            curves = np.stack([run_optimizer(problem, s, spec.factory(), 1.0) for s in range(args.seeds)])
            stats = summarize(curves)
            row[key] = {k: stats[k] for k in ("final_mean", "final_std", "finals", "nonfinite")}
        row["max_seed_diff"] = float(np.nanmax(np.abs(np.subtract(row["shipped"]["finals"], row["rerun"]["finals"]))))
        report["problems"][name] = row
        print(f"{name}: shipped {row['shipped']['final_mean']:.4g}, rerun {row['rerun']['final_mean']:.4g}", flush=True)
    report["seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reproduction.json").write_text(json.dumps(report, indent=1))
    w = report["weights"]
    lines = [
        "# Reproduction check", "", f"Command: `{report['command']}`  ", f"Machine: {report['machine']}", "",
        f"Weights: bitwise equal: {w['bitwise_equal']}; largest absolute difference {w['max_abs_diff']:.3g} "
        f"(largest entry {w['max_abs_value']:.3g}). Mean final loss over {args.seeds} evaluation seeds "
        f"(+- sample std), untuned; {report['seconds'] / 60:.1f} minutes.", "",
        "| problem | shipped | rerun | largest per-seed difference |", "|---|---:|---:|---:|",
    ]
    for name, row in report["problems"].items():
        a, b = row["shipped"], row["rerun"]
        lines.append(f"| {name} | {a['final_mean']:.4g} +- {a['final_std']:.2g} | {b['final_mean']:.4g} +- "
                     f"{b['final_std']:.2g} | {row['max_seed_diff']:.2g} |")
    (args.out / "reproduction.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
