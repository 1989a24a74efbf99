"""The cosine_schedule comparison (fixed with the plan in README.md, before the runs' results).

    python benchmarks/results/cosine_schedule/compare.py

Reads ``optimizee_eval_cosine.json`` and ``optimizee_eval_constant_regression.json`` (this folder)
and ``../optimizee_eval_blend.json`` (the constant-lr suite); prints, per problem, the mean final
loss (± std) of the learned presets and of tuned Adam and the best tuned baseline under each
schedule, the counts the plan names, and the plan's verdict; writes ``compare.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT = "LSTMOptimizer (l2l-blend, default)"
LEARNED = (DEFAULT, "LSTMOptimizer (l2l-random)", "MetaLSTMOptimizer (meta-lstm-adam-mnist, default)")
BASELINES = ("SGD", "Nesterov", "RMSprop", "Adam")
SUITE = ("mnist-mlp-100", "mnist-mlp-200", "mnist-mlp-1000", "mnist-mlp-40", "mnist-mlp-20-20", "mnist-mlp-relu",
         "mnist-conv", "quadratic-20", "synthetic-mlp", "mlp-random-held-out")
DETERMINISTIC = ("quadratic-20", "regression-1000")


def load(path: Path) -> dict:
    return json.loads(path.read_text())["problems"]


def entry(results: dict, label: str) -> tuple[float, float]:
    r = results[label]
    return r["final_mean"], r["final_std"]


def main() -> None:
    cosine = load(HERE / "optimizee_eval_cosine.json")
    constant = load(HERE.parent / "optimizee_eval_blend.json") | load(HERE / "optimizee_eval_constant_regression.json")
    rows, counts = {}, {s: {"at_or_below_adam": [], "below_best_baseline": []} for s in ("constant", "cosine")}
    for problem in (*SUITE, "regression-1000"):
        rows[problem] = {}
        for schedule, report in (("constant", constant), ("cosine", cosine)):
            results = report[problem]["results"]
            best = min(BASELINES, key=lambda b: results[b]["final_mean"])
            row = {label: entry(results, label) for label in (*LEARNED, "Adam")}
            row["best baseline"] = (best, *entry(results, best))
            row["Adam lr"] = results["Adam"]["lr"]
            rows[problem][schedule] = row
            mine = row[DEFAULT][0]
            if mine <= row["Adam"][0]:
                counts[schedule]["at_or_below_adam"].append(problem)
            if mine < row["best baseline"][1]:
                counts[schedule]["below_best_baseline"].append(problem)
    print("| problem | l2l-blend, constant | Adam, constant | l2l-blend, cosine | Adam, cosine | best baseline, cosine |")
    print("|---|---:|---:|---:|---:|---:|")
    for problem, by in rows.items():
        c, k = by["constant"], by["cosine"]
        print(f"| {problem} | {c[DEFAULT][0]:.4g} ± {c[DEFAULT][1]:.2g} | {c['Adam'][0]:.4g} ± {c['Adam'][1]:.2g} "
              f"| {k[DEFAULT][0]:.4g} ± {k[DEFAULT][1]:.2g} | {k['Adam'][0]:.4g} ± {k['Adam'][1]:.2g} "
              f"| {k['best baseline'][0]} {k['best baseline'][1]:.4g} |")
    for schedule, c in counts.items():
        suite = [p for p in c["at_or_below_adam"] if p in SUITE]
        best = [p for p in c["below_best_baseline"] if p in SUITE]
        print(f"\n{schedule}: at or below tuned Adam on {len(suite)} of 10 suite problems "
              f"({len(c['at_or_below_adam'])} of 11 with regression-1000); below every tuned baseline on "
              f"{len(best)} of 10 ({len(c['below_best_baseline'])} of 11)")
    lower = {p: rows[p]["cosine"][DEFAULT][0] < rows[p]["constant"][DEFAULT][0] for p in DETERMINISTIC}
    n = {s: len([p for p in counts[s]["at_or_below_adam"] if p in SUITE]) for s in counts}
    verdict = n["cosine"] >= n["constant"] and all(lower.values())
    print(f"\ncosine below constant for l2l-blend on the deterministic problems: {lower}")
    print(f"plan's condition (cosine count >= constant count, and both deterministic problems lower): {verdict}")
    (HERE / "compare.json").write_text(json.dumps({"rows": rows, "counts": counts, "deterministic_lower": lower,
                                                    "recommend_decay": verdict}, indent=1) + "\n")


if __name__ == "__main__":
    main()
