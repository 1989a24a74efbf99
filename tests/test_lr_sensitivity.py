"""``benchmarks/lr_sensitivity.py``: a learned optimizer at several lr beside a suite report's tuned baselines."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import common  # noqa: E402
import lr_sensitivity  # noqa: E402

from learnedopt import LSTMOptimizer  # noqa: E402
from learnedopt.evaluation import BASELINES, make_problem, run_optimizer  # noqa: E402


def reference(path: Path, seeds: int) -> Path:
    entry = {"lr": 0.1, "final_mean": 1.0, "final_std": 0.5, "runs": seeds, "kind": "baseline"}
    results = {b: dict(entry, final_mean=1.0 + i) for i, b in enumerate(BASELINES)}
    path.write_text(json.dumps({"problems": {"quadratic-20": {"results": results}}}))
    return path


def test_each_lr_column_is_the_suite_run_at_that_lr(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    ref = reference(tmp_path / "suite.json", seeds=2)
    assert lr_sensitivity.main(["--weights", "l2l-2016", "--lrs", "0.5", "2", "--problems", "quadratic-20",
                                "--seeds", "2", "--reference", str(ref), "--name", "out"]) == 0  # fmt: skip
    data = json.loads((tmp_path / "out.json").read_text())
    row = data["problems"]["quadratic-20"]
    problem = make_problem("quadratic-20")
    for lr in (0.5, 2.0):
        expected = [run_optimizer(problem, s, lambda p, lr: LSTMOptimizer(p, weights="l2l-2016", lr=lr), lr)[-10:].mean()
                    for s in range(2)]  # fmt: skip
        assert row["learned"][repr(lr)]["finals"] == pytest.approx(expected, rel=1e-12)
    assert row["best_baseline"] == next(iter(BASELINES))  # the lowest final_mean of the reference
    md = (tmp_path / "out.md").read_text()
    assert "| quadratic-20 |" in md and "tuned Adam (lr)" in md


def test_a_reference_with_other_seeds_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    ref = reference(tmp_path / "suite.json", seeds=10)
    with pytest.raises(SystemExit, match="ran 10 seeds on quadratic-20, not 2"):
        lr_sensitivity.main(["--lrs", "1", "--problems", "quadratic-20", "--seeds", "2", "--reference", str(ref),
                             "--name", "out"])  # fmt: skip
    assert not (tmp_path / "out.json").exists()
