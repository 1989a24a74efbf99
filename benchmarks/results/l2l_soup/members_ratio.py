"""Each soup's mean final loss over the mean of its three members' (written after the results).

    python benchmarks/results/l2l_soup/members_ratio.py benchmarks/results/l2l_soup/compare.json

Prints one line per problem: ``soup_xeon`` and ``soup_amd`` against the mean of their members'
mean final losses, and the ratio.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MEMBERS = {"soup_xeon": ("xeon_seed9", "xeon_seed10", "xeon_seed11"), "soup_amd": ("amd_seed9", "amd_seed10", "amd_seed11")}


def main(path: str) -> None:
    for problem, entry in json.loads(Path(path).read_text())["problems"].items():
        cells = []
        for soup, members in MEMBERS.items():
            mean = sum(entry[m]["mean"] for m in members) / len(members)
            cells.append(f"{soup} {entry[soup]['mean']:.4g} vs {mean:.4g} ({entry[soup]['mean'] / mean:.2f}x)")
        print(problem, "; ".join(cells))


if __name__ == "__main__":
    main(*sys.argv[1:])
