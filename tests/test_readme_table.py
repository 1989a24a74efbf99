"""``benchmarks/readme_table.py``: the README's summary table from a generated suite report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from readme_table import main, table  # noqa: E402


def result(kind: str, final: float, mean: float, lr: float = 1.0) -> dict:
    return {"kind": kind, "final_mean": final, "mean_loss": mean, "lr": lr}


REPORT = {
    "learned": {"L (a)": {}, "L (b)": {}},
    "problems": {
        "mnist-mlp-100": {
            "results": {
                "SGD": result("baseline", 0.30, 0.70, 3.16),
                "Adam": result("baseline", 0.20, 0.50, 0.0316),
                "L (a)": result("learned", 0.15, 0.60),  # final below both, mean not below Adam
                "L (b)": result("learned", 0.20, 0.40),  # final level with Adam: not below
            }
        },
        "quadratic-20": {
            "results": {
                "SGD": result("baseline", 2.0, 8.0, 0.01),
                "Adam": result("baseline", 1.0, 22.0),
                "L (a)": result("learned", 9.2, 36.0),
                "L (b)": result("learned", 3.0e5, 1.0e-5),
            }
        },
    },
}


def test_best_baseline_adam_and_bold_only_below_every_baseline() -> None:
    lines = table(REPORT, [("L (a)", "`a`"), ("L (b)", "`b`")]).splitlines()
    assert lines[0] == "| problem | best tuned baseline (lr) | Adam (tuned) | `a` | `b` |"
    assert lines[2] == "| MNIST MLP, 100 steps | Adam 0.2 / 0.5 (0.0316) | 0.2 / 0.5 | **0.15** / 0.6 | 0.2 / **0.4** |"
    assert lines[3] == (
        "| quadratic, 20-dim (never seen) | Adam 1 / 22 (1) | 1 / 22 | 9.2 / 36 | 3e+05 / **1e-05** |"
    )


def test_unknown_column_is_a_clear_error(tmp_path: Path, capsys) -> None:
    path = tmp_path / "report.json"
    path.write_text(json.dumps(REPORT))
    with pytest.raises(SystemExit):
        main([str(path), "L (c)=`c`"])
    assert "LABEL one of ['L (a)', 'L (b)']" in capsys.readouterr().err
