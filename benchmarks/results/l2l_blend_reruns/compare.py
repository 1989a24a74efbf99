"""This folder's table and counts from its suite run (written before the run's results existed).

    python benchmarks/results/l2l_blend_reruns/compare.py benchmarks/results/l2l_blend_reruns/optimizee_eval.json

Prints, per problem, each file's mean final loss, `l2l-blend`'s mean ± std and tuned Adam's; then
per file the number of problems within `l2l-blend`'s mean ± std and at or below tuned Adam.
Writes ``compare.json`` beside the report.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

FILES = ("blend_amd9", "blend_amd10", "blend_amd11", "blend_xeon9", "blend_xeon10", "blend_xeon11",
         "blend_soup_amd", "blend_soup_xeon")  # fmt: skip
DEFAULT = "LSTMOptimizer (l2l-blend, default)"


def main(path: str) -> None:
    report = json.loads(Path(path).read_text())
    within, below_adam, table = dict.fromkeys(FILES, 0), dict.fromkeys(FILES, 0), {}
    print("| problem | " + " | ".join(FILES) + " | `l2l-blend` ± std | tuned Adam |\n|---|" + "---:|" * (len(FILES) + 2))
    for problem, entry in report["problems"].items():
        results = entry["results"]
        ref, adam = results[DEFAULT], results["Adam"]["final_mean"]
        means = {f: results[f"LSTMOptimizer ({f}.safetensors)"]["final_mean"] for f in FILES}
        for f, m in means.items():
            within[f] += abs(m - ref["final_mean"]) <= ref["final_std"]
            below_adam[f] += m <= adam
        table[problem] = {**means, "l2l-blend": ref["final_mean"], "l2l-blend_std": ref["final_std"], "adam": adam}
        cells = " | ".join(f"{means[f]:.4g}" for f in FILES)
        print(f"| {problem} | {cells} | {ref['final_mean']:.4g} ± {ref['final_std']:.2g} | {adam:.4g} |")
    n = len(table)
    print(f"\nWithin l2l-blend's mean ± std (of {n}): " + ", ".join(f"{f} {v}" for f, v in within.items()))
    print(f"At or below tuned Adam (of {n}): " + ", ".join(f"{f} {v}" for f, v in below_adam.items()))
    stability = report["stability"]["results"]
    finite = {f: not stability[f"LSTMOptimizer ({f}.safetensors)"]["nonfinite"] for f in FILES}
    print(f"Finite over the 10,000-step check: {finite}")
    out = {"problems": table, "within_l2l_blend_std": within, "at_or_below_tuned_adam": below_adam, "finite": finite}
    (Path(path).parent / "compare.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
