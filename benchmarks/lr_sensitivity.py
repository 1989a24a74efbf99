"""How a learned optimizer's ``lr`` (the factor on its learned step) moves its final loss.

The held-out suite runs learned optimizers untuned (``lr=1``). This runs one preset or weight file
at several ``lr`` on chosen problems of the suite, on the suite's evaluation seeds, and sets the
result beside the tuned baselines of a committed suite report (same problems, same seeds):

    python benchmarks/lr_sensitivity.py --weights l2l-random --lrs 0.5 1 2 4 10 \\
        --problems quadratic-20 mnist-mlp-relu synthetic-mlp --name lr_sensitivity_l2l_random

Writes ``results/NAME.json`` and ``results/NAME.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402

from learnedopt import LSTMOptimizer  # noqa: E402
from learnedopt.evaluation import (  # noqa: E402
    BASELINES,
    LearnedSpec,
    best_baseline,
    learned_from_file,
    make_problem,
    run_optimizer,
    summarize,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default="l2l-random", help="an LSTMOptimizer preset or a weight file")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0, 10.0])
    parser.add_argument("--problems", nargs="+", required=True)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--reference", type=Path, default=RESULTS / "optimizee_eval.json",
                        help="suite report whose tuned baselines are shown beside (same seeds)")
    parser.add_argument("--data", default=None)
    parser.add_argument("--name", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    spec = learned_from_file(args.weights) if Path(args.weights).is_file() else LearnedSpec(args.weights, LSTMOptimizer, args.weights)
    reference = json.loads(args.reference.read_text())["problems"]
    start = time.perf_counter()
    rows: dict[str, dict] = {}
    for name in args.problems:
        problem = make_problem(name, args.data)
        runs = {}
        for lr in args.lrs:
            curves = np.stack([run_optimizer(problem, s, spec.factory(), lr) for s in range(args.seeds)])
            stats = summarize(curves)
            runs[repr(lr)] = {k: stats[k] for k in ("final_mean", "final_std", "finals", "nonfinite")}
            print(f"{name} lr {lr:g}: {stats['final_mean']:.4g}", flush=True)
        tuned = reference[name]["results"]
        best = best_baseline(tuned)
        if tuned["Adam"]["runs"] != args.seeds:
            raise SystemExit(f"{args.reference} ran {tuned['Adam']['runs']} seeds on {name}, not {args.seeds}")
        rows[name] = {"learned": runs,
                      "tuned": {b: {k: tuned[b][k] for k in ("lr", "final_mean", "final_std")} for b in BASELINES},
                      "best_baseline": best}  # fmt: skip
    seconds = time.perf_counter() - start
    lines = [
        f"`{spec.label}` at several `lr` (untuned default: 1), mean final loss +- std over "
        f"{args.seeds} evaluation seeds of the held-out suite; tuned Adam and the best tuned baseline "
        f"from `{args.reference.name}` on the same seeds. {seconds / 60:.1f} minutes, 1 thread.",
        "",
        "| problem | " + " | ".join(f"lr {lr:g}" for lr in args.lrs) + " | tuned Adam (lr) | best tuned baseline (lr) |",
        "|---|" + "---:|" * (len(args.lrs) + 2),
    ]
    for name, row in rows.items():
        cells = [f"{r['final_mean']:.3g} +- {r['final_std']:.2g}" + (f" ({r['nonfinite']} NaN)" if r["nonfinite"] else "")
                 for r in row["learned"].values()]  # fmt: skip
        adam, best = row["tuned"]["Adam"], row["tuned"][row["best_baseline"]]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {adam['final_mean']:.3g} ({adam['lr']:.3g}) | "
                     f"{row['best_baseline']} {best['final_mean']:.3g} ({best['lr']:.3g}) |")  # fmt: skip
    write_results(args.name, {"weights": args.weights, "lrs": args.lrs, "seeds": args.seeds,
                              "reference": str(args.reference), "seconds": seconds, "problems": rows}, "\n".join(lines))  # fmt: skip
    print(f"wrote {RESULTS / args.name}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
