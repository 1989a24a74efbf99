"""The seed-spread table of this folder's README from its suite run (written before the run's
results existed).

    python benchmarks/results/l2l_random_seed_spread/spread.py benchmarks/results/l2l_random_seed_spread/optimizee_eval.json

Prints a Markdown table (mean final loss over the 10 evaluation seeds per problem: the shipped
default, the three reruns of its last command, their mean and range, tuned Adam) and writes
``spread.json`` beside the report.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SHIPPED = "LSTMOptimizer (l2l-random, default)"
RERUNS = {
    "seed 9 (abe623e)": "LSTMOptimizer (weights.safetensors)",
    "seed 10": "LSTMOptimizer (seed10.safetensors)",
    "seed 11": "LSTMOptimizer (seed11.safetensors)",
}


def main(path: str) -> None:
    report = json.loads(Path(path).read_text())
    rows, out = [], {}
    at_or_below_adam = {name: 0 for name in ["shipped", *RERUNS]}
    for problem, entry in report["problems"].items():
        results = entry["results"]
        adam = results["Adam"]["final_mean"]
        shipped = results[SHIPPED]["final_mean"]
        reruns = {name: results[label]["final_mean"] for name, label in RERUNS.items()}
        values = list(reruns.values())
        mean = sum(values) / len(values)
        out[problem] = {"shipped": shipped, "shipped_std_over_eval_seeds": results[SHIPPED]["final_std"],
                        "reruns": reruns, "rerun_mean": mean, "rerun_min": min(values), "rerun_max": max(values),
                        "adam": adam, "shipped_rank_among_all_four": sorted([shipped, *values]).index(shipped) + 1}
        at_or_below_adam["shipped"] += shipped <= adam
        for name, value in reruns.items():
            at_or_below_adam[name] += value <= adam
        rows.append(
            f"| {problem} | {shipped:.4g} ± {results[SHIPPED]['final_std']:.2g} | "
            + " | ".join(f"{v:.4g}" for v in values)
            + f" | {mean:.4g} [{min(values):.4g}, {max(values):.4g}] | {out[problem]['shipped_rank_among_all_four']} | {adam:.4g} |"
        )
    out["at_or_below_tuned_adam"] = at_or_below_adam
    out["stability"] = {
        label: report["stability"]["results"][label] for label in [SHIPPED, *RERUNS.values()]
    } if report.get("stability") and "results" in report["stability"] else None
    print("| problem | shipped (seed 9) ± std over eval seeds | " + " | ".join(f"rerun {n}" for n in RERUNS)
          + " | reruns: mean [min, max] | shipped's rank of 4 | tuned Adam |")
    print("|---|---:|" + "---:|" * len(RERUNS) + "---:|---:|---:|")
    print("\n".join(rows))
    print("\nAt or below tuned Adam's mean final loss: " + ", ".join(f"{k} {v}/10" for k, v in at_or_below_adam.items()))
    # added after the results existed: how far the reruns sit from the shipped weights' spread
    # across evaluation seeds, and from their starting point l2l-short
    start = "LSTMOptimizer (l2l-short)"
    above = {name: 0 for name in RERUNS}
    below_start = {name: 0 for name in RERUNS}
    for problem, entry in report["problems"].items():
        results, row = entry["results"], out[problem]
        row["l2l_short"] = results[start]["final_mean"]
        for name, value in row["reruns"].items():
            above[name] += value > row["shipped"] + row["shipped_std_over_eval_seeds"]
            below_start[name] += value < row["l2l_short"]
    out["above_shipped_mean_plus_std"] = above
    out["below_l2l_short"] = below_start
    print("Above the shipped weights' mean + std over evaluation seeds: "
          + ", ".join(f"{k} on {v}/10" for k, v in above.items()))
    print("Below their start l2l-short: " + ", ".join(f"{k} on {v}/10" for k, v in below_start.items()))
    (Path(path).parent / "spread.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
