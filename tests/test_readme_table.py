"""``benchmarks/readme_table.py``: the README's summary table from a generated suite report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from readme_table import difference_table, main, paired_table, table  # noqa: E402


def result(kind: str, final: float, mean: float, lr: float = 1.0, finals: tuple = ()) -> dict:
    return {"kind": kind, "final_mean": final, "mean_loss": mean, "lr": lr, "finals": list(finals)}


REPORT = {
    "learned": {"L (a)": {}, "L (b)": {}},
    "problems": {
        "mnist-mlp-100": {
            "results": {
                "SGD": result("baseline", 0.30, 0.70, 3.16, (0.3, 0.3, 0.3)),
                "Adam": result("baseline", 0.20, 0.50, 0.0316, (0.1, 0.2, 0.3)),
                "L (a)": result("learned", 0.15, 0.60, finals=(0.05, 0.25, 0.15)),  # final below both, mean not below Adam
                "L (b)": result("learned", 0.20, 0.40, finals=(0.2, 0.2, 0.2)),  # final level with Adam: not below
            }
        },
        "quadratic-20": {
            "results": {
                "SGD": result("baseline", 2.0, 8.0, 0.01, (1.0, 3.0, 2.0)),
                "Adam": result("baseline", 1.0, 22.0, 1.0, (0.5, 2.0, 0.5)),
                "L (a)": result("learned", 9.2, 36.0, finals=(9.0, 1.5, float("nan"))),
                "L (b)": result("learned", 3.0e5, 1.0e-5, finals=(3e5, 3e5, 3e5)),
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


def test_paired_counts_against_adam_and_the_best_baseline_per_seed() -> None:
    lines = paired_table(REPORT, [("L (a)", "`a`"), ("L (b)", "`b`")]).splitlines()
    assert lines[0] == "| problem | best tuned baseline | `a` | `b` |"
    # 100 steps: Adam is the best baseline; a is below it on seeds 0 and 2, b only on seed 2
    assert lines[2] == "| MNIST MLP, 100 steps | Adam | 2/3 / 2/3 | 1/3 / 1/3 |"
    # quadratic: a's NaN seed is left out of its counts
    assert lines[3] == "| quadratic, 20-dim (never seen) | Adam | 1/2 / 1/2 | 0/3 / 0/3 |"


def test_differences_from_the_best_baseline_are_paired_and_bold_only_when_the_interval_is_below_zero() -> None:
    shifted = json.loads(json.dumps(REPORT))
    shifted["problems"]["mnist-mlp-100"]["results"]["L (b)"]["finals"] = [0.05, 0.15, 0.25]  # Adam's - 0.05
    lines = difference_table(shifted, [("L (a)", "`a`"), ("L (b)", "`b`")]).splitlines()
    assert lines[0] == "| problem | best tuned baseline (final loss) | `a` | `b` |"
    a, b = lines[2].split(" | ")[2:4]
    # a: -0.05, +0.05, -0.15 against Adam, mixed signs, so its interval straddles 0
    assert a.startswith("-0.05 [") and a.endswith("(n=3)") and "**" not in a
    assert b == "**-0.05 [-0.05, -0.05] (n=3)** |"
    # quadratic: a's NaN seed is left out
    assert lines[3].split(" | ")[2].startswith("+4 [") and "(n=2)" in lines[3]


def test_differences_against_a_named_baseline() -> None:
    lines = difference_table(REPORT, [("L (b)", "`b`")], against="SGD").splitlines()
    assert lines[0] == "| problem | tuned SGD (final loss) | `b` |"
    # b - SGD on 100 steps: -0.1, -0.1, -0.1 on every seed
    assert lines[2] == "| MNIST MLP, 100 steps | SGD 0.3 | **-0.1 [-0.1, -0.1] (n=3)** |"


def test_an_unknown_baseline_to_compare_against_is_a_clear_error(tmp_path: Path, capsys) -> None:
    path = tmp_path / "report.json"
    path.write_text(json.dumps(REPORT))
    with pytest.raises(SystemExit):
        main([str(path), "L (a)=`a`", "--difference", "--against", "Adagrad"])
    assert "--against must be one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(path), "L (a)=`a`", "--against", "Adam"])
    assert "--against needs --difference" in capsys.readouterr().err
