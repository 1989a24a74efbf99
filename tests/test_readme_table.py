"""``benchmarks/readme_table.py``: the README's summary table from a generated suite report."""

from __future__ import annotations

import json
import re
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from readme_table import difference_table, main, paired_table, table  # noqa: E402


def result(kind: str, final: float, mean: float, lr: float = 1.0, finals: tuple = ()) -> dict:
    """An entry as ``summarize()`` writes it: ``nonfinite`` counts the seeds whose run diverged."""
    return {"kind": kind, "final_mean": final, "mean_loss": mean, "lr": lr, "finals": list(finals),
            "nonfinite": sum(not math.isfinite(f) for f in finals), "runs": len(finals), "final_std": 0.0,
            "final_median": final, "final_q1": final, "final_q3": final, "curve_median": None, "curve_q1": None,
            "curve_q3": None}  # fmt: skip


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
        "| quadratic, 20-dim (never seen) | Adam 1 / 22 (1) | 1 / 22 | 9.2 / 36 (1 NaN) | 3e+05 / **1e-05** |"
    )


def test_a_mean_loss_is_bold_only_below_every_baselines_mean_not_only_the_best_baselines() -> None:
    # Adam is the best baseline by final loss, but SGD has the lower mean loss over the run: a mean
    # between the two is below Adam's and not below every baseline's, so it is not bold
    report = {"learned": {"L (a)": {}}, "problems": {"quadratic-20": {"results": {
        "SGD": result("baseline", 2.0, 8.0, 0.01, (1.0, 3.0)),
        "Adam": result("baseline", 1.0, 22.0, 1.0, (0.5, 1.5)),
        "L (a)": result("learned", 3.0, 10.0, finals=(3.0, 3.0)),
    }}}}  # fmt: skip
    results = report["problems"]["quadratic-20"]["results"]
    every_mean = min(r["mean_loss"] for r in results.values() if r["kind"] == "baseline")
    assert every_mean < results["L (a)"]["mean_loss"] < results["Adam"]["mean_loss"]
    assert table(report, [("L (a)", "`a`")]).splitlines()[2].endswith("| 3 / 10 |")


def test_unknown_column_is_a_clear_error(tmp_path: Path, capsys) -> None:
    path = tmp_path / "report.json"
    path.write_text(json.dumps(REPORT))
    with pytest.raises(SystemExit):
        main([str(path), "L (c)=`c`"])
    assert "LABEL one of ['L (a)', 'L (b)']; got ['L (c)=`c`']" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a known label without its header
        main([str(path), "L (a)"])
    assert "columns must be LABEL=HEADER with LABEL one of ['L (a)', 'L (b)']; got ['L (a)']" in capsys.readouterr().err


def test_a_report_whose_entries_are_not_results_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    # each was a traceback in the table (a null entry, a string for a number, finals shorter than
    # the reference's, no Adam)
    path = tmp_path / "report.json"
    quadratic = REPORT["problems"]["quadratic-20"]["results"]
    for results, message in (
        ({**quadratic, "Adam": None}, "its Adam result on quadratic-20: it is a NoneType, not a result entry"),
        ({**quadratic, "SGD": {**quadratic["SGD"], "final_mean": "2.0"}}, "its SGD result on quadratic-20: its final_mean is missing"),
        ({**quadratic, "SGD": {**quadratic["SGD"], "finals": [1.0]}}, "its finals are not a list of 3 numbers"),
        ({k: v for k, v in quadratic.items() if k != "Adam"}, "has no Adam result on quadratic-20"),
    ):  # fmt: skip
        path.write_text(json.dumps({**REPORT, "problems": {"quadratic-20": {"results": results}}}))
        for mode in ([], ["--paired"], ["--difference"]):
            with pytest.raises(SystemExit):
                main([*mode, str(path), "L (a)=`a`"])
            err = capsys.readouterr().err
            assert message in err and err.count("\n") == 1, err


def test_paired_counts_against_adam_and_the_best_baseline_per_seed() -> None:
    lines = paired_table(REPORT, [("L (a)", "`a`"), ("L (b)", "`b`")]).splitlines()
    assert lines[0] == "| problem | best tuned baseline | `a` | `b` |"
    # 100 steps: Adam is the best baseline; a is below it on seeds 0 and 2, b only on seed 2
    assert lines[2] == "| MNIST MLP, 100 steps | Adam | 2/3 / 2/3 | 1/3 / 1/3 |"
    # quadratic: a's NaN seed is left out of its counts, and shown
    assert lines[3] == "| quadratic, 20-dim (never seen) | Adam | 1/2 / 1/2 (1 NaN) | 0/3 / 0/3 |"


def test_paired_counts_against_adam_when_another_baseline_is_the_best() -> None:
    report = {"learned": {"L (a)": {}}, "problems": {"quadratic-20": {"results": {
        "SGD": result("baseline", 0.5, 8.0, 0.01, (0.4, 0.5, 0.6)),
        "Adam": result("baseline", 1.0, 22.0, 1.0, (1.0, 1.0, 1.0)),
        "L (a)": result("learned", 0.45, 5.0, finals=(0.45, 0.2, 0.7)),
    }}}}  # fmt: skip
    # below Adam on every seed; below SGD, the best, on the second only
    assert paired_table(report, [("L (a)", "`a`")]).splitlines()[2] == "| quadratic, 20-dim (never seen) | SGD | 3/3 / 1/3 |"


def test_the_adam_column_is_tuned_adams_when_another_baseline_is_the_best() -> None:
    report = {"learned": {"L (a)": {}}, "problems": {"quadratic-20": {"results": {
        "SGD": result("baseline", 0.5, 8.0, 0.01, (0.4, 0.6)),
        "Adam": result("baseline", 1.0, 22.0, 1.0, (1.0, 1.0)),
        "L (a)": result("learned", 0.45, 5.0, finals=(0.45, 0.45)),
    }}}}  # fmt: skip
    cells = table(report, [("L (a)", "`a`")]).splitlines()[2].split(" | ")
    assert cells[1:3] == ["SGD 0.5 / 8 (0.01)", "1 / 22"]


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


NAN = float("nan")


def test_a_diverged_baseline_is_never_the_best_and_the_minimums_are_over_finite_values() -> None:
    # SGD diverged on every seed (NaN statistics, as summarize() writes them) and comes first
    report = {"learned": {"L (a)": {}}, "problems": {"quadratic-20": {"results": {
        "SGD": result("baseline", NAN, NAN, 1.0, (NAN, NAN)),
        "Adam": result("baseline", 1.0, 22.0, 1.0, (0.5, 1.5)),
        "L (a)": result("learned", 0.5, 20.0, finals=(0.25, 0.75)),
    }}}}  # fmt: skip
    lines = table(report, [("L (a)", "`a`")]).splitlines()
    assert lines[2] == "| quadratic, 20-dim (never seen) | Adam 1 / 22 (1) | 1 / 22 | **0.5** / **20** |"
    assert paired_table(report, [("L (a)", "`a`")]).splitlines()[2] == "| quadratic, 20-dim (never seen) | Adam | 2/2 / 2/2 |"


def test_a_run_that_diverged_on_a_seed_is_marked_and_never_bold() -> None:
    # diverged on seed 0; summarize() takes its statistics over the finite seed alone
    report = {"learned": {"L (a)": {}}, "problems": {"quadratic-20": {"results": {
        "SGD": result("baseline", 2.0, 8.0, 0.01, (1.0, 3.0)),
        "Adam": result("baseline", 1.0, 22.0, 1.0, (0.5, 1.5)),
        "L (a)": result("learned", 0.2, 5.0, finals=(NAN, 0.2)),
    }}}}  # fmt: skip
    assert report["problems"]["quadratic-20"]["results"]["L (a)"]["nonfinite"] == 1
    lines = table(report, [("L (a)", "`a`")]).splitlines()
    assert lines[2] == "| quadratic, 20-dim (never seen) | Adam 1 / 22 (1) | 1 / 22 | 0.2 / 5 (1 NaN) |"
    lines = paired_table(report, [("L (a)", "`a`")]).splitlines()
    assert lines[2] == "| quadratic, 20-dim (never seen) | Adam | 1/1 / 1/1 (1 NaN) |"


@pytest.mark.parametrize("content", [None, "{not json", "[1, 2]", '{"learned": {}}'])
def test_a_missing_or_malformed_report_is_a_one_line_error(tmp_path: Path, capsys, content: str | None) -> None:
    path = tmp_path / "report.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exit_:
        main([str(path), "L (a)=`a`"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ": error: " in err and str(path) in err


def unescaped_pipes(line: str) -> int:
    """The ``|`` of a Markdown table row that separate cells (those not written ``\\|``)."""
    return len(re.findall(r"(?<!\\)\|", line))


def test_labels_with_a_pipe_or_a_line_break_stay_in_their_cell() -> None:
    """A preset name, weight file stem or problem name with ``|`` (or a line break) in it split
    its cell in two and shifted the rest of the row (a line break ended the row); every cell
    the script writes now has ``|`` as ``\\|`` and line breaks as spaces, in every table."""
    odd = {"learned": {"L|a": {}}, "problems": {"odd|problem\nname": REPORT["problems"]["mnist-mlp-100"]}}
    results = odd["problems"]["odd|problem\nname"]["results"] = dict(odd["problems"]["odd|problem\nname"]["results"])
    results["L|a"] = results["L (a)"]
    columns = [("L|a", "`a|b`")]
    for lines in (table(odd, columns).splitlines(), paired_table(odd, columns).splitlines(),
                  difference_table(odd, columns).splitlines()):  # fmt: skip
        assert len(lines) == 3, lines
        assert {unescaped_pipes(line) for line in lines} == {unescaped_pipes(lines[1])}, lines
        assert lines[0].endswith(r"| `a\|b` |") and lines[2].startswith(r"| odd\|problem name |"), lines


def test_a_label_with_an_equals_sign_can_be_a_column(tmp_path: Path, capsys) -> None:
    """``LABEL=HEADER`` was split at its first ``=``, so a label with one (a weight file
    ``lr=3.safetensors``) could not be named: the column was refused as unknown. The split is
    now after the longest known label."""
    label = "LSTMOptimizer (lr=3.safetensors)"
    report = json.loads(json.dumps(REPORT))
    report["learned"] = {label: {}, "LSTMOptimizer (lr": {}}
    for problem in report["problems"].values():
        problem["results"][label] = problem["results"]["L (a)"]
        problem["results"]["LSTMOptimizer (lr"] = problem["results"]["L (b)"]
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    assert main([str(path), f"{label}=`x=1`"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("| `x=1` |") and lines[2].endswith("| **0.15** / 0.6 |"), lines
