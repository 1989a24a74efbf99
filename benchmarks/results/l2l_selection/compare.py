"""This folder's table from its suite run (written before the run's results existed).

    python benchmarks/results/l2l_selection/compare.py benchmarks/results/l2l_selection/optimizee_eval.json

Prints, per held-out problem, the mean final loss over the evaluation seeds of each run's
selected and last weights (``seedS_selected`` / ``seedS_last``; a run whose selection kept its
last weights has one file, ``seedS_selected``, whose numbers fill both columns), the range over the three seeds of each kind,
the shipped default, its start ``l2l-short`` and tuned Adam, and how many problems each file is at or
below tuned Adam on; writes ``compare.json`` beside the report.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SEEDS = (9, 10, 11)
KINDS = ("selected", "last")
SHIPPED, START = "LSTMOptimizer (l2l-random, default)", "LSTMOptimizer (l2l-short)"


def label(seed: int, kind: str, results: dict) -> str:
    name = f"LSTMOptimizer (seed{seed}_{kind}.safetensors)"
    return name if name in results else f"LSTMOptimizer (seed{seed}_selected.safetensors)"


def main(path: str) -> None:
    report = json.loads(Path(path).read_text())
    files = [(s, k) for s in SEEDS for k in KINDS]
    out: dict = {"problems": {}, "at_or_below_tuned_adam": {f"seed{s}_{k}": 0 for s, k in files}}
    header = "| problem | " + " | ".join(f"seed {s} {k}" for s, k in files)
    header += " | selected: [min, max] over seeds | last: [min, max] | shipped | l2l-short | tuned Adam |"
    rows = [header, "|---|" + "---:|" * (len(files) + 5)]
    for problem, entry in report["problems"].items():
        results = entry["results"]
        values = {f"seed{s}_{k}": results[label(s, k, results)]["final_mean"] for s, k in files}
        adam = results["Adam"]["final_mean"]
        spans = {k: [min(values[f"seed{s}_{k}"] for s in SEEDS), max(values[f"seed{s}_{k}"] for s in SEEDS)] for k in KINDS}
        out["problems"][problem] = {**values, **{f"{k}_range": spans[k] for k in KINDS}, "adam": adam,
                                    "shipped": results[SHIPPED]["final_mean"], "l2l_short": results[START]["final_mean"]}  # fmt: skip
        for name, value in values.items():
            out["at_or_below_tuned_adam"][name] += value <= adam
        cells = [f"{values[f'seed{s}_{k}']:.4g}" for s, k in files]
        cells += [f"[{spans[k][0]:.4g}, {spans[k][1]:.4g}]" for k in KINDS]
        cells += [f"{results[SHIPPED]['final_mean']:.4g}", f"{results[START]['final_mean']:.4g}", f"{adam:.4g}"]
        rows.append(f"| {problem} | " + " | ".join(cells) + " |")
    print("\n".join(rows))
    counts = out["at_or_below_tuned_adam"]
    print("\nAt or below tuned Adam's mean final loss: " + ", ".join(f"{k} {v}/{len(report['problems'])}" for k, v in counts.items()))
    if report.get("stability") and "results" in report["stability"]:
        stability = report["stability"]["results"]
        out["stability"] = {f"seed{s}_{k}": stability[label(s, k, stability)] for s, k in files}
    (Path(path).parent / "compare.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
