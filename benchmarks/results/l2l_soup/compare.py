"""This folder's table and decision from its suite run (written before the run's results existed).

    python benchmarks/results/l2l_soup/compare.py benchmarks/results/l2l_soup/optimizee_eval.json \
        benchmarks/results/l2l_selection/optimizee_eval.json

The first report is this folder's run (the soups, the shipped file and the AMD members, as
``--weights`` files); the second holds the Xeon members (same host). Prints, per held-out problem,
each file's mean final loss over the evaluation seeds, and tuned Adam's; the counts of problems
at or below tuned Adam; the agreement counts fixed in the README; and the four clauses of the
decision. Writes ``compare.json`` beside the first report.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SOUPS = ("soup_xeon", "soup_amd", "soup_all6")
AMD = ("amd_seed9", "amd_seed10", "amd_seed11")
# the Xeon members: seed 10's selected weights are its last
XEON = {"xeon_seed9": "seed9_last", "xeon_seed10": "seed10_selected", "xeon_seed11": "seed11_last"}


def column(results: dict, stem: str) -> dict:
    return results[f"LSTMOptimizer ({stem}.safetensors)"]


def within(value: float, centre: dict) -> bool:
    """Whether ``value`` lies within ``centre``'s mean final loss ± its std over evaluation seeds."""
    return abs(value - centre["final_mean"]) <= centre["final_std"]


def main(path: str, xeon_path: str) -> None:
    report, xeon = (json.loads(Path(p).read_text()) for p in (path, xeon_path))
    names = [*SOUPS, "shipped", *AMD, *XEON]
    problems = list(report["problems"])
    out: dict = {"problems": {}, "at_or_below_tuned_adam": dict.fromkeys(names, 0)}
    agree = {"soup_amd within soup_xeon": 0, "shipped within soup_xeon": 0}
    agree.update({f"{a} within {b}": 0 for a in XEON for b in XEON if a != b})
    agree.update({f"{a} within shipped": 0 for a in XEON})
    worse_than_shipped = []  # clause 3's failures
    rows = ["| problem | " + " | ".join(names) + " | tuned Adam |", "|---|" + "---:|" * (len(names) + 1)]
    for problem in problems:
        results = report["problems"][problem]["results"]
        cols = {n: column(results, n) for n in (*SOUPS, "shipped", *AMD)}
        cols.update({n: column(xeon["problems"][problem]["results"], stem) for n, stem in XEON.items()})
        adam = results["Adam"]["final_mean"]
        out["problems"][problem] = {n: {"mean": c["final_mean"], "std": c["final_std"]} for n, c in cols.items()}
        out["problems"][problem]["adam"] = adam
        for n, c in cols.items():
            out["at_or_below_tuned_adam"][n] += c["final_mean"] <= adam
        agree["soup_amd within soup_xeon"] += within(cols["soup_amd"]["final_mean"], cols["soup_xeon"])
        agree["shipped within soup_xeon"] += within(cols["shipped"]["final_mean"], cols["soup_xeon"])
        for a in XEON:
            agree[f"{a} within shipped"] += within(cols[a]["final_mean"], cols["shipped"])
            for b in XEON:
                if a != b:
                    agree[f"{a} within {b}"] += within(cols[a]["final_mean"], cols[b])
        soup, shipped = cols["soup_xeon"], cols["shipped"]
        if soup["final_mean"] - shipped["final_mean"] > max(soup["final_std"], shipped["final_std"]):
            worse_than_shipped.append(problem)
        rows.append(f"| {problem} | " + " | ".join(f"{cols[n]['final_mean']:.4g}" for n in names) + f" | {adam:.4g} |")
    stability = report["stability"]["results"]
    finite = {n: not stability[f"LSTMOptimizer ({n}.safetensors)"]["nonfinite"] for n in (*SOUPS, "shipped", *AMD)}
    counts = out["at_or_below_tuned_adam"]
    clauses = {
        "1 finite for 10,000 steps": finite["soup_xeon"],
        "2 at or below tuned Adam on as many problems as the shipped weights": counts["soup_xeon"] >= counts["shipped"],
        "3 on no problem above the shipped weights by more than the larger std": not worse_than_shipped,
        "4 soup_amd within soup_xeon's mean ± std on every problem": agree["soup_amd within soup_xeon"] == len(problems),
    }
    out.update(agreement=agree, finite=finite, above_shipped_beyond_std=worse_than_shipped, clauses=clauses,
               replace_default=all(clauses.values()))  # fmt: skip
    print("\n".join(rows))
    print(f"\nAt or below tuned Adam's mean final loss (of {len(problems)}): " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"Within mean ± std over evaluation seeds (of {len(problems)}): " + ", ".join(f"{k} {v}" for k, v in agree.items()))
    print("Finite over the 10,000-step check: " + ", ".join(f"{k} {v}" for k, v in finite.items()))
    print("Clauses: " + "; ".join(f"{k}: {v}" for k, v in clauses.items()) + f"\nReplace the default: {all(clauses.values())}")
    if worse_than_shipped:
        print("soup_xeon above the shipped weights beyond the larger std on: " + ", ".join(worse_than_shipped))
    (Path(path).parent / "compare.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
