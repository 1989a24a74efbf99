"""Clauses 1-4 of this folder's decision (README.md), written before the runs' results.

    python benchmarks/results/l2l_mix_blend/compare.py [--dir DIR --candidate NAME=LABEL ... --beside LABEL]

Reads ``optimizee_eval.json`` (the suite) and ``optimizee_eval_regression.json`` in ``DIR`` (default:
this folder); prints each candidate's mean final loss beside the default's, the ``--beside``
preset's (default l2l-mix) and tuned Adam's, and the clauses; writes ``DIR/compare.json``. With
``--dir`` and ``--candidate`` it checks the same clauses for another folder's candidates
(``../l2l_blend_regression/`` uses it so).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT = "LSTMOptimizer (l2l-blend, default)"
MIX = "LSTMOptimizer (l2l-mix)"
CANDIDATES = {"third": "LSTMOptimizer (third.safetensors)", "half": "LSTMOptimizer (half.safetensors)"}
SUITE = ("mnist-mlp-100", "mnist-mlp-200", "mnist-mlp-1000", "mnist-mlp-40", "mnist-mlp-20-20", "mnist-mlp-relu",
         "mnist-conv", "quadratic-20", "synthetic-mlp", "mlp-random-held-out")
FULL_BATCH = ("quadratic-20", "regression-1000")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=HERE)
    parser.add_argument("--candidate", action="append", metavar="NAME=LABEL", help="default: third and half")
    parser.add_argument("--beside", default=MIX, help="a preset's label shown beside (default l2l-mix)")
    args = parser.parse_args()
    candidates = dict(c.split("=", 1) for c in args.candidate) if args.candidate else CANDIDATES
    here = args.dir
    suite = json.loads((here / "optimizee_eval.json").read_text())
    problems = suite["problems"] | json.loads((here / "optimizee_eval_regression.json").read_text())["problems"]
    stat = lambda p, label: (problems[p]["results"][label]["final_mean"], problems[p]["results"][label]["final_std"])  # noqa: E731
    beside = args.beside.removeprefix("LSTMOptimizer (").removesuffix(")")
    print(f"| problem | tuned Adam | l2l-blend (default) | {beside} | " + " | ".join(candidates) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(candidates))
    for p in (*SUITE, "regression-1000"):
        cells = [f"{m:.4g} ± {s:.2g}" for m, s in (stat(p, "Adam"), stat(p, DEFAULT), stat(p, args.beside), *(stat(p, c) for c in candidates.values()))]
        print(f"| {p} | " + " | ".join(cells) + " |")
    verdicts = {}
    default_count = sum(stat(p, DEFAULT)[0] <= stat(p, "Adam")[0] for p in SUITE)
    for name, label in candidates.items():
        stability = suite["stability"]["results"][label]
        count = sum(stat(p, label)[0] <= stat(p, "Adam")[0] for p in SUITE)
        worse = [p for p in SUITE if stat(p, label)[0] - stat(p, DEFAULT)[0] > max(stat(p, label)[1], stat(p, DEFAULT)[1])]
        better = {p: stat(p, DEFAULT)[0] - stat(p, label)[0] > max(stat(p, label)[1], stat(p, DEFAULT)[1]) for p in FULL_BATCH}
        clauses = {
            "1 finite over 10,000 steps": not stability["nonfinite"],
            f"2 at or below tuned Adam on >= 9 of 10 (has {count}; default {default_count})": count >= 9,
            f"3 nowhere above the default beyond the larger std (above on: {worse or 'none'})": not worse,
            f"4 below the default beyond the larger std on both full-batch problems ({better})": all(better.values()),
        }
        verdicts[name] = {"clauses": clauses, "count": count, "stability_final": stability["final_loss"]}
        print(f"\n{name}: 10,000-step final {stability['final_loss']:.3g}")
        for clause, ok in clauses.items():
            print(f"  {'PASS' if ok else 'FAIL'} {clause}")
    (here / "compare.json").write_text(json.dumps(verdicts, indent=1) + "\n")


if __name__ == "__main__":
    main()
