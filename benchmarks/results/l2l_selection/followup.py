"""The follow-up's table (written before its suite run finished).

    python benchmarks/results/l2l_selection/followup.py benchmarks/results/l2l_selection/optimizee_eval.json benchmarks/results/l2l_selection/optimizee_eval_select16.json

Per problem, the mean final loss of seed 9's weights selected on 16 tasks (second report) beside
its last and its 4-task-selected weights and tuned Adam (first report).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(first: str, second: str) -> None:
    a, b = (json.loads(Path(p).read_text())["problems"] for p in (first, second))
    name = lambda stem: f"LSTMOptimizer ({stem}.safetensors)"  # noqa: E731
    print("| problem | seed 9 selected on 16 tasks | seed 9 last | seed 9 selected on 4 tasks | tuned Adam |")
    print("|---|---:|---:|---:|---:|")
    better = 0
    for problem, entry in a.items():
        new = b[problem]["results"][name("seed9_select16")]["final_mean"]
        last, four = (entry["results"][name(s)]["final_mean"] for s in ("seed9_last", "seed9_selected"))
        better += new < last
        print(f"| {problem} | {new:.4g} | {last:.4g} | {four:.4g} | {entry['results']['Adam']['final_mean']:.4g} |")
    print(f"\nSelected on 16 tasks below the last weights on {better}/{len(a)} problems")


if __name__ == "__main__":
    main(*sys.argv[1:])
