"""This folder's table and clauses 1-3 from its suite run (written before the run's results existed).

    python benchmarks/results/l2l_interpolate/compare.py benchmarks/results/l2l_interpolate/optimizee_eval.json \
        benchmarks/results/l2l_soup/optimizee_eval.json

The first report holds the interpolations (``--weights`` files), the second the shipped default's
file measured on the same host (``shipped.safetensors``). Prints, per problem, each
interpolation's mean final loss, the shipped default's, ``l2l-short``'s (reused preset column) and
tuned Adam's; the counts at or below tuned Adam; clauses 1-3 of the README for ``mid``. Writes
``compare.json`` beside the first report.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

FILES = ("quarter", "mid", "three_quarters")


def main(path: str, shipped_path: str) -> None:
    report, shipped_report = (json.loads(Path(p).read_text()) for p in (path, shipped_path))
    names = [*FILES, "shipped", "l2l-short"]
    counts = dict.fromkeys(names, 0)
    above, table = [], {}
    print("| problem | " + " | ".join(names) + " | tuned Adam |\n|---|" + "---:|" * (len(names) + 1))
    for problem, entry in report["problems"].items():
        results = entry["results"]
        cols = {n: results[f"LSTMOptimizer ({n}.safetensors)"] for n in FILES}
        cols["shipped"] = shipped_report["problems"][problem]["results"]["LSTMOptimizer (shipped.safetensors)"]
        cols["l2l-short"] = results["LSTMOptimizer (l2l-short)"]
        adam = results["Adam"]["final_mean"]
        table[problem] = {n: {"mean": c["final_mean"], "std": c["final_std"]} for n, c in cols.items()} | {"adam": adam}
        for n, c in cols.items():
            counts[n] += c["final_mean"] <= adam
        mid, ship = cols["mid"], cols["shipped"]
        if mid["final_mean"] - ship["final_mean"] > max(mid["final_std"], ship["final_std"]):
            above.append(problem)
        print(f"| {problem} | " + " | ".join(f"{cols[n]['final_mean']:.4g}" for n in names) + f" | {adam:.4g} |")
    finite = {n: not report["stability"]["results"][f"LSTMOptimizer ({n}.safetensors)"]["nonfinite"] for n in FILES}
    clauses = {"1 finite": finite["mid"], "2 at or below tuned Adam on as many as shipped": counts["mid"] >= counts["shipped"],
               "3 nowhere above shipped beyond the larger std": not above}  # fmt: skip
    print(f"\nAt or below tuned Adam's mean final loss (of {len(table)}): " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"Finite over the 10,000-step check: {finite}\nClauses 1-3 for mid: {clauses}; above shipped beyond the std on: {above}")
    out = {"problems": table, "at_or_below_tuned_adam": counts, "finite": finite, "above_shipped_beyond_std": above,
           "clauses_1_to_3": clauses, "run_headline_check": all(clauses.values())}  # fmt: skip
    (Path(path).parent / "compare.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
