"""``benchmarks/reproduction_check.py``'s weight comparison and report on generated weight files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import reproduction_check  # noqa: E402
from reproduction_check import weight_difference  # noqa: E402

from learnedopt.nn import RULES  # noqa: E402
from learnedopt.weights import build_preset, save_weights  # noqa: E402


def weight_file(path: Path, preset: str = "meta-lstm-2017", shift: float = 0.0, **config) -> str:
    """A weight file of ``preset``'s untrained rule, with ``config`` overrides (the same tensors where
    their shapes allow) and ``shift`` added to its first tensor's first entry."""
    rule, _ = build_preset(preset)
    if config:
        other = RULES[rule.kind].from_config_dict({**rule.config_dict(), **config})
        if all(v.shape == other.state_dict()[k].shape for k, v in rule.state_dict().items()):
            other.load_state_dict(rule.state_dict())
        rule = other
    with torch.no_grad():
        next(iter(rule.parameters())).view(-1)[0] += shift
    save_weights(rule, path)
    return str(path)


def test_weight_difference_reports_bitwise_equality_and_the_largest_difference(tmp_path: Path) -> None:
    a = weight_file(tmp_path / "a.safetensors")
    same = weight_difference(a, weight_file(tmp_path / "same.safetensors"))
    assert same["bitwise_equal"] is True and same["same_config"] is True and same["max_abs_diff"] == 0.0
    assert same["max_abs_value"] > 0
    other = weight_difference(a, weight_file(tmp_path / "other.safetensors", shift=0.25))
    assert other["bitwise_equal"] is False and other["max_abs_diff"] == pytest.approx(0.25, rel=1e-6)


def test_weight_difference_compares_the_whole_fingerprint(tmp_path: Path) -> None:
    # the same tensors, but another architecture: the rule writes twice its step
    a = weight_file(tmp_path / "a.safetensors")
    scaled = weight_file(tmp_path / "scaled.safetensors", step_scale=2.0)
    diff = weight_difference(a, scaled)
    assert diff["max_abs_diff"] == 0.0
    assert diff["bitwise_equal"] is False and diff["same_config"] is False


def test_weight_difference_refuses_files_with_other_tensors(tmp_path: Path) -> None:
    a = weight_file(tmp_path / "a.safetensors")
    b = weight_file(tmp_path / "b.safetensors", hidden_size=10)
    with pytest.raises(ValueError, match="hold different tensors"):
        weight_difference(a, b)


def run_main(monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["reproduction_check.py", *args])
    reproduction_check.main()


def test_files_of_different_kinds_are_a_one_line_error(tmp_path: Path, monkeypatch, capsys) -> None:
    a = weight_file(tmp_path / "a.safetensors")
    b = weight_file(tmp_path / "b.safetensors", preset="l2l-2016")
    with pytest.raises(ValueError, match="MetaLSTMCell update rule and .* a CoordinateLSTM"):
        weight_difference(a, b)
    with pytest.raises(SystemExit) as exit_:
        run_main(monkeypatch, a, b, "--problems", "quadratic-20", "--seeds", "1", "--out", str(tmp_path / "out"))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: " in err and "CoordinateLSTM" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [None, b"not a safetensors file"])
def test_a_missing_or_unreadable_weight_file_is_a_one_line_error(tmp_path: Path, monkeypatch, capsys, content) -> None:
    a = weight_file(tmp_path / "a.safetensors")
    b = tmp_path / "b.safetensors"
    if content is not None:
        b.write_bytes(content)
    with pytest.raises(SystemExit) as exit_:
        run_main(monkeypatch, a, str(b), "--problems", "quadratic-20", "--seeds", "1", "--out", str(tmp_path / "out"))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: " in err and str(b) in err


def test_the_report_counts_diverged_seeds_and_a_seed_diverged_in_one_run_differs_most(
    tmp_path: Path, monkeypatch
) -> None:
    a = weight_file(tmp_path / "a.safetensors")
    b = weight_file(tmp_path / "b.safetensors", shift=0.25)
    # final losses per seed: shipped 0.2, 0.4; rerun diverged on seed 0, then 0.5
    curves = iter([np.full(20, 0.2), np.full(20, 0.4), np.full(20, np.nan), np.full(20, 0.5)])
    monkeypatch.setattr(reproduction_check, "run_optimizer", lambda problem, seed, factory, lr: next(curves))
    run_main(monkeypatch, a, b, "--problems", "quadratic-20", "--seeds", "2", "--out", str(tmp_path / "out"))
    row = json.loads((tmp_path / "out" / "reproduction.json").read_text())["problems"]["quadratic-20"]
    assert row["rerun"]["nonfinite"] == 1 and row["shipped"]["nonfinite"] == 0
    assert row["max_seed_diff"] == float("inf")
    md = (tmp_path / "out" / "reproduction.md").read_text()
    assert "| quadratic-20 | 0.3 +- 0.14 | 0.5 +- 0 (1 NaN) | inf |" in md


def test_both_files_run_on_the_suites_evaluation_seeds_in_order(tmp_path: Path, monkeypatch) -> None:
    # each file runs on seeds 0..n-1 (the suite's evaluation seeds) and finals[i] is seed i's
    a = weight_file(tmp_path / "a.safetensors")
    b = weight_file(tmp_path / "b.safetensors", shift=0.25)
    seen = []

    def run(problem, seed, factory, lr):
        seen.append(seed)
        return np.full(20, 1.0 + seed)

    monkeypatch.setattr(reproduction_check, "run_optimizer", run)
    run_main(monkeypatch, a, b, "--problems", "quadratic-20", "--seeds", "3", "--out", str(tmp_path / "out"))
    assert seen == [0, 1, 2] * 2
    row = json.loads((tmp_path / "out" / "reproduction.json").read_text())["problems"]["quadratic-20"]
    assert row["shipped"]["finals"] == row["rerun"]["finals"] == [1.0, 2.0, 3.0]


def test_seeds_that_diverged_in_both_runs_are_left_out_of_the_largest_difference() -> None:
    nan = float("nan")
    assert reproduction_check.max_seed_diff([nan, 0.2, 0.4], [nan, 0.25, 0.3]) == pytest.approx(0.1)
    assert np.isnan(reproduction_check.max_seed_diff([nan], [nan]))


def test_a_plain_safetensors_file_is_not_a_weight_file(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(3)}, tmp_path / "plain.safetensors")
    a = weight_file(tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="not a learnedopt weight file"):
        weight_difference(a, str(tmp_path / "plain.safetensors"))


def test_the_recorded_command_reruns_the_check(tmp_path: Path, monkeypatch) -> None:
    # the command left out --seeds and --data, and joined the words with spaces: rerun as
    # written, a 3-seed check ran on 10 seeds, and a path with a space read as two arguments
    import shlex

    a = weight_file(tmp_path / "a b.safetensors")
    b = weight_file(tmp_path / "b.safetensors", shift=0.25)
    monkeypatch.setattr(reproduction_check, "run_optimizer", lambda problem, seed, factory, lr: np.full(20, 1.0))
    out = str(tmp_path / "out")
    run_main(monkeypatch, a, b, "--problems", "quadratic-20", "--seeds", "3", "--out", out)
    command = json.loads((tmp_path / "out" / "reproduction.json").read_text())["command"]
    words = shlex.split(command)
    assert words[:2] == ["python", "benchmarks/reproduction_check.py"]
    parsed = reproduction_check.build_parser().parse_args(words[2:])
    assert (parsed.shipped, parsed.rerun, parsed.seeds, parsed.problems, str(parsed.out)) == (a, b, 3, ["quadratic-20"], out)
    assert f"Command: `{command}`" in (tmp_path / "out" / "reproduction.md").read_text()


def test_a_weight_file_named_with_a_backtick_keeps_the_command_in_one_code_span(tmp_path: Path, monkeypatch) -> None:
    """A backtick in a weight file's path ended the report's inline code of the command early."""
    a = weight_file(tmp_path / "a`b.safetensors")
    b = weight_file(tmp_path / "b.safetensors", shift=0.25)
    monkeypatch.setattr(reproduction_check, "run_optimizer", lambda problem, seed, factory, lr: np.full(20, 1.0))
    run_main(monkeypatch, a, b, "--problems", "quadratic-20", "--seeds", "2", "--out", str(tmp_path / "out"))
    command = json.loads((tmp_path / "out" / "reproduction.json").read_text())["command"]
    assert f"Command: ``{command}``  " in (tmp_path / "out" / "reproduction.md").read_text().splitlines()


def test_an_empty_out_is_refused_before_any_run(tmp_path: Path, monkeypatch, capsys) -> None:
    """``--out ""`` (an unset shell variable) wrote reproduction.json and .md into the current
    folder after every run, as ``Path("")`` is ``.``; now argparse's error, as the CLI's ``--out``."""
    a = weight_file(tmp_path / "a.safetensors")
    b = weight_file(tmp_path / "b.safetensors", shift=1.0)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(SystemExit) as exit_:
        run_main(monkeypatch, a, b, "--problems", "quadratic-20", "--seeds", "1", "--out", "")
    assert exit_.value.code == 2
    assert "argument --out: must be a non-empty path, got ''" in capsys.readouterr().err
    assert list(work.iterdir()) == []


def test_a_data_folder_without_mnist_is_refused_though_no_problem_reads_it(tmp_path: Path, monkeypatch, capsys) -> None:
    """As evaluate optimizers --data: a folder named explicitly must hold MNIST (it was ignored
    where every problem given needs none, and the report's command recorded it)."""
    a = weight_file(tmp_path / "a.safetensors")
    b = weight_file(tmp_path / "b.safetensors", shift=1.0)
    with pytest.raises(SystemExit) as exit_:
        run_main(monkeypatch, a, b, "--problems", "quadratic-20", "--seeds", "1", "--out", str(tmp_path / "out"),
                 "--data", str(tmp_path / "none"))  # fmt: skip
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"data: data directory '{tmp_path / 'none'}' does not exist" in err, err
    assert not (tmp_path / "out").exists()


def test_an_out_that_is_a_file_is_refused_before_any_run(tmp_path: Path, monkeypatch, capsys) -> None:
    """``--out`` was first used after every run: a file there stopped the check with
    FileExistsError from mkdir, the runs lost."""
    a = weight_file(tmp_path / "a.safetensors")
    b = weight_file(tmp_path / "b.safetensors", shift=1.0)
    out = tmp_path / "out"
    out.write_text("")
    monkeypatch.setattr(reproduction_check, "run_optimizer", lambda *a, **k: pytest.fail("ran"))
    with pytest.raises(SystemExit) as exit_:
        run_main(monkeypatch, a, b, "--problems", "quadratic-20", "--seeds", "1", "--out", str(out))
    assert exit_.value.code == 2
    assert f"argument --out: {out} is a file, not a folder" in capsys.readouterr().err


def test_a_problem_given_twice_is_refused_before_any_run(tmp_path: Path, monkeypatch, capsys) -> None:
    """It ran once (the results are keyed by problem) while the recorded command named it twice;
    common.Distinct refuses it, as every benchmark list option and evaluate optimizers --problems."""
    a = weight_file(tmp_path / "a.safetensors")
    monkeypatch.setattr(reproduction_check, "run_optimizer", lambda *args, **kwargs: pytest.fail("a run started"))
    with pytest.raises(SystemExit) as exit_:
        run_main(monkeypatch, a, a, "--problems", "quadratic-20", "quadratic-20", "--seeds", "1", "--out", str(tmp_path / "out"))
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith("error: argument --problems: each value once, got quadratic-20 more than once")
    assert not (tmp_path / "out").exists()
