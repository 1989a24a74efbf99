"""Table of one Omniglot learner's command scored on several held-out folds, and the average.

    python benchmarks/results/omniglot_folds/folds.py FOLD0.json FOLD1.json ... > folds.md

Each argument is a ``benchmarks/fewshot.py omniglot-model`` results file; its first row is
used (the model's own test-time settings, or the first ``--adapt`` setting it was scored with).
The table has the cells that every file holds. The average of the folds' accuracies weighs every
fold alike, whatever its episode count; its 95% CI is ``sqrt(sum ci_k^2) / K``, the folds'
episodes being independent draws.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def main(paths: list[str]) -> None:
    results = [json.loads(Path(path).read_text()) for path in paths]
    rows = [result["rows"][0] for result in results]
    cells = [c for c in rows[0]["accuracy"] if all(c in r["accuracy"] for r in rows)]
    if not cells:
        sys.exit("error: the files have no cell in common")
    print("| fold | meta-test alphabets | episodes | " + " | ".join(cells) + " |")
    print("|---|---|---:|" + "---:|" * len(cells))
    for k, (path, result, row) in enumerate(zip(paths, results, rows, strict=True)):
        accuracy = row["accuracy"]
        print(f"| {k} (`{path.rsplit('/', 1)[-1]}`) | {', '.join(row['test_alphabets'])} | "
              f"{result['config']['test_episodes']} | "
              + " | ".join(f"{accuracy[c]['mean']:.1f} +- {accuracy[c]['ci95']:.1f}" for c in cells) + " |")
    means = {c: sum(r["accuracy"][c]["mean"] for r in rows) / len(rows) for c in cells}
    cis = {c: math.sqrt(sum(r["accuracy"][c]["ci95"] ** 2 for r in rows)) / len(rows) for c in cells}
    print(f"| average of {len(rows)} | | | " + " | ".join(f"{means[c]:.1f} +- {cis[c]:.1f}" for c in cells) + " |")
    print()
    print("Error (100 - accuracy) of the average: "
          + "; ".join(f"{c}: {100 - means[c]:.1f}% +- {cis[c]:.1f}" for c in cells))


if __name__ == "__main__":
    main(sys.argv[1:])
