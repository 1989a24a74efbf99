"""This folder's weight files from the three runs (written before the runs finished).

    python benchmarks/results/l2l_selection/weight_files.py RUNS_DIR OUT_DIR

For each ``RUNS_DIR/seedS``: copies its ``weights.safetensors`` (the selected weights) to
``OUT_DIR/seedS_selected.safetensors`` and, when they differ from those, writes the last
meta-step's weights, from the checkpoint, to ``OUT_DIR/seedS_last.safetensors`` (selection does
not change the training, so these are the weights the run would have saved without
``--select-every``). Prints each run's selected meta-step and whether it was the last.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from learnedopt.weights import load_weights, read_header, save_weights


def main(runs: str, out: str) -> None:
    summary = {}
    for run in sorted(p for p in Path(runs).glob("seed*") if p.is_dir()):
        header = read_header(run / "weights.safetensors")
        selected, _ = load_weights(run / "weights.safetensors")
        last = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
        assert last["step"] == header["meta_train_config"]["meta_steps"], "the run has not finished"
        rule, _ = load_weights(run / "weights.safetensors")
        rule.load_state_dict(last["rule"])
        shutil.copyfile(run / "weights.safetensors", Path(out) / f"{run.name}_selected.safetensors")
        same = all(torch.equal(a, b) for a, b in zip(selected.state_dict().values(), rule.state_dict().values()))
        if not same:
            save_weights(rule, Path(out) / f"{run.name}_last.safetensors", trained_on=header["trained_on"],
                         extra={"command": header["command"], "note": "the last meta-step's weights, from the run's checkpoint"})  # fmt: skip
        summary[run.name] = {"selected_step": header["selected_step"], "select_loss": header["select_loss"],
                             "selected_is_last": same}  # fmt: skip
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:])
