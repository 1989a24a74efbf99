"""The selection score of each run's start, ``l2l-short`` (written after the runs: commit
b129eaa, which ran them, kept that score only where the start was the best).

    python benchmarks/results/l2l_selection/initial_scores.py RUNS_DIR

For each ``RUNS_DIR/seedS``, the score ``--select-every`` gives the initial rule: the
quadratically weighted mean loss of the run's fixed selection episode (``meta_valid`` tasks drawn
by ``(seed, 3)``, ``--horizon`` steps), on one process. Prints JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from learnedopt.meta.train import _SELECT_STREAM, MetaTrainConfig, _family, evaluate, initial_rule
from learnedopt.weights import read_header


def main(runs: str) -> None:
    torch.set_num_threads(1)
    scores = {}
    for run in sorted(p for p in Path(runs).glob("seed*") if p.is_dir()):
        config = MetaTrainConfig(**read_header(run / "weights.safetensors")["meta_train_config"])
        family = _family(config, "meta_valid")
        scores[run.name] = evaluate(initial_rule(config), family, config, stream=_SELECT_STREAM, weighted=True)
    print(json.dumps(scores, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:])
