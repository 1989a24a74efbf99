"""``benchmarks/lr_sensitivity.py``: a learned optimizer at several lr beside a suite report's tuned baselines."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import common  # noqa: E402
import lr_sensitivity  # noqa: E402

from learnedopt import LSTMOptimizer  # noqa: E402
from learnedopt.evaluation import BASELINES, make_problem, run_optimizer  # noqa: E402


def reference(path: Path, seeds: int, steps: int = 100, **report) -> Path:
    """A suite report of the tuned baselines on quadratic-20 (100 steps), with ``report``'s keys added."""
    entry = {"lr": 0.1, "final_mean": 1.0, "final_std": 0.5, "runs": seeds, "kind": "baseline"}
    results = {b: dict(entry, final_mean=1.0 + i) for i, b in enumerate(BASELINES)}
    path.write_text(json.dumps({"problems": {"quadratic-20": {"steps": steps, "results": results}}, **report}))
    return path


def no_run(*args, **kwargs):
    raise AssertionError("a run started before the inputs were checked")


def refused(tmp_path: Path, monkeypatch, capsys, *args: str) -> str:
    """``main(args)``'s one-line error (exit status 2), checking that nothing ran or was written."""
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(lr_sensitivity, "run_optimizer", no_run)
    with pytest.raises(SystemExit) as exit_:
        lr_sensitivity.main([*args, "--name", "out"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: " in err
    assert not (tmp_path / "out.json").exists()
    return err


def test_a_name_that_is_not_a_file_name_stem_is_refused_before_any_run(tmp_path: Path, monkeypatch, capsys) -> None:
    # "" wrote results/.json and said it wrote results.json; "a/b" was a traceback after every run
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(lr_sensitivity, "run_optimizer", no_run)
    ref = reference(tmp_path / "suite.json", seeds=2)
    for name, message in (("", "--name is a file name stem, not a path: ''"), ("a/b", "not a path: 'a/b'"),
                          ("x" * 250, "--name is too long")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            lr_sensitivity.main(["--lrs", "1", "--problems", "quadratic-20", "--seeds", "2", "--reference", str(ref), "--name", name])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["suite.json"]


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


def test_each_loss_scale_column_is_the_run_on_the_scaled_loss(tmp_path: Path, monkeypatch) -> None:
    """A column per (loss scale, lr); the scale-1 columns keep their keys (the lr alone) and
    values; a scaled run is ``run_optimizer``'s with that ``loss_scale``, unlike the unscaled one
    for a rule that reads the gradient's magnitude."""
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    ref = reference(tmp_path / "suite.json", seeds=2)
    assert lr_sensitivity.main(["--weights", "l2l-2016", "--lrs", "2", "--loss-scales", "1", "0.001", "--problems",
                                "quadratic-20", "--seeds", "2", "--reference", str(ref), "--name", "out"]) == 0  # fmt: skip
    learned = json.loads((tmp_path / "out.json").read_text())["problems"]["quadratic-20"]["learned"]
    assert list(learned) == ["2.0", "2.0 loss_scale=0.001"]
    problem = make_problem("quadratic-20")
    factory = lambda p, lr: LSTMOptimizer(p, weights="l2l-2016", lr=lr)  # noqa: E731
    for key, scale in (("2.0", 1.0), ("2.0 loss_scale=0.001", 0.001)):
        expected = [run_optimizer(problem, s, factory, 2.0, loss_scale=scale)[-10:].mean() for s in range(2)]
        assert learned[key]["finals"] == pytest.approx(expected, rel=1e-12)
        assert learned[key]["loss_scale"] == scale
    assert learned["2.0"]["finals"] != learned["2.0 loss_scale=0.001"]["finals"]
    assert "| lr 2 | lr 2, loss x0.001 |" in (tmp_path / "out.md").read_text()


def test_a_reference_with_other_seeds_is_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    ref = reference(tmp_path / "suite.json", seeds=10)
    err = refused(tmp_path, monkeypatch, capsys, "--lrs", "1", "--problems", "quadratic-20", "--seeds", "2",
                  "--reference", str(ref))  # fmt: skip
    assert "ran 10 seeds on quadratic-20, not 2" in err


def test_a_reference_that_ran_other_evaluation_seeds_is_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    ref = tmp_path / "suite.json"
    report = json.loads(reference(ref, seeds=2).read_text())
    report["problems"]["quadratic-20"]["eval_seeds"] = [1, 2]  # as many seeds, but not this script's 0..1
    ref.write_text(json.dumps(report))
    err = refused(tmp_path, monkeypatch, capsys, "--lrs", "1", "--problems", "quadratic-20", "--seeds", "2",
                  "--reference", str(ref))  # fmt: skip
    assert "ran quadratic-20 on evaluation seeds [1, 2], not 0..1" in err
    report["problems"]["quadratic-20"]["eval_seeds"] = 2  # was list(2): a TypeError traceback
    ref.write_text(json.dumps(report))
    err = refused(tmp_path, monkeypatch, capsys, "--lrs", "1", "--problems", "quadratic-20", "--seeds", "2",
                  "--reference", str(ref))  # fmt: skip
    assert "ran quadratic-20 on evaluation seeds 2, not 0..1" in err


@pytest.mark.parametrize(
    ("problem", "steps", "report", "message"),
    [
        ("synthetic-mlp", 100, {}, "has no results for synthetic-mlp; it ran quadratic-20"),
        ("quadratic-20", 50, {}, "ran quadratic-20 for 50 steps, not 100"),
        ("quadratic-20", 100, {"config": {"lr_schedule": "cosine"}}, "lr schedule of 'cosine'"),
        ("quadratic-20", 100, {"mnist_sha256": "0" * 64}, "ran on other MNIST files"),
    ],
)
def test_a_reference_that_ran_something_else_is_refused_before_any_run(
    tmp_path: Path, monkeypatch, capsys, problem: str, steps: int, report: dict, message: str
) -> None:
    monkeypatch.setattr(lr_sensitivity, "mnist_sha256", lambda data: "f" * 64)
    ref = reference(tmp_path / "suite.json", seeds=2, steps=steps, **report)
    err = refused(tmp_path, monkeypatch, capsys, "--lrs", "1", "--problems", problem, "--seeds", "2",
                  "--reference", str(ref))  # fmt: skip
    assert message in err


def test_a_reference_of_the_same_settings_is_taken(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(lr_sensitivity, "mnist_sha256", lambda data: "f" * 64)
    monkeypatch.setattr(lr_sensitivity, "run_optimizer", lambda problem, seed, factory, lr, **options: np.full(problem.steps, 0.5))
    ref = reference(tmp_path / "suite.json", seeds=2, config={"lr_schedule": "constant"}, mnist_sha256="f" * 64)
    assert lr_sensitivity.main(["--lrs", "1", "--problems", "quadratic-20", "--seeds", "2", "--reference", str(ref),
                                "--name", "out"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "out.json").read_text())["problems"]["quadratic-20"]["learned"]["1.0"]["final_mean"] == 0.5


def test_a_baseline_that_diverged_on_every_seed_is_never_the_best(tmp_path: Path, monkeypatch) -> None:
    # the first baseline's statistics are NaN (no finite run), as summarize() writes them
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(lr_sensitivity, "run_optimizer", lambda problem, seed, factory, lr, **options: np.full(problem.steps, 0.5))
    ref = reference(tmp_path / "suite.json", seeds=2)
    report = json.loads(ref.read_text())
    results = report["problems"]["quadratic-20"]["results"]
    first = next(iter(BASELINES))
    results[first]["final_mean"] = float("nan")
    ref.write_text(json.dumps(report))
    lr_sensitivity.main(["--lrs", "1", "--problems", "quadratic-20", "--seeds", "2", "--reference", str(ref), "--name", "out"])
    finite = {b: r["final_mean"] for b, r in results.items() if r["final_mean"] == r["final_mean"]}
    assert first not in finite
    best = json.loads((tmp_path / "out.json").read_text())["problems"]["quadratic-20"]["best_baseline"]
    assert best == min(finite, key=finite.get)


def test_diverged_runs_are_counted_in_the_table(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    curves = iter([np.full(100, np.nan), np.full(100, 0.5)])
    monkeypatch.setattr(lr_sensitivity, "run_optimizer", lambda problem, seed, factory, lr, **options: next(curves))
    ref = reference(tmp_path / "suite.json", seeds=2)
    lr_sensitivity.main(["--lrs", "1", "--problems", "quadratic-20", "--seeds", "2", "--reference", str(ref), "--name", "out"])
    assert "| quadratic-20 | 0.5 +- 0 (1 NaN) |" in (tmp_path / "out.md").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seeds", "0"], "--seeds must be >= 1, got 0"),
        (["--lrs", "-1"], "--lrs must be positive and finite, got -1"),
        (["--lrs", "1", "nan"], "--lrs must be positive and finite, got nan"),
        # the optimizer refused it at its construction, a traceback after the runs of the lrs before it
        (["--lrs", "1", "1e39"], "--lrs must be at most float32's largest value (3.403e+38), the dtype of the problems' "
                                 "parameters, got 1e+39"),
        (["--loss-scales", "0"], "--loss-scales must be positive and finite, got 0"),
        # the scaled float32 loss was Inf (every run NaN at step 0) or 0 (no run moved): no rule saw the scale
        (["--loss-scales", "1", "1e39"], "--loss-scales must lie in float32's normal range (1.175e-38 to 3.403e+38), the dtype "
                                         "of the problems' losses, got 1e+39"),
        (["--loss-scales", "1e-46"], "float32's normal range (1.175e-38 to 3.403e+38), the dtype of the problems' losses, got 1e-46"),
        # read only by MNIST problems: a --data of no MNIST was ignored where no problem read it
        (["--data", "/nonexistent/mnist-folder"], "data: data directory '/nonexistent/mnist-folder' does not exist"),
    ],
)
def test_bad_seeds_or_lrs_are_one_line_errors(tmp_path: Path, monkeypatch, capsys, args: list, message: str) -> None:
    ref = reference(tmp_path / "suite.json", seeds=2)
    err = refused(tmp_path, monkeypatch, capsys, "--problems", "quadratic-20", "--reference", str(ref), *args)
    assert message in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # ran 1 twice and wrote a table of more lr columns than cells
        (["--lrs", "1", "2", "1.0", "2"], "argument --lrs: each value once, got 1.0, 2.0 more than once"),
        # the scale's runs twice; its own check named no value
        (["--loss-scales", "1", "1e-3", "0.001"], "argument --loss-scales: each value once, got 0.001 more than once"),
        # run once (the results keyed by problem), yet the recorded command named it twice
        (["--problems", "quadratic-20", "quadratic-20"], "argument --problems: each value once, got quadratic-20 more than once"),
    ],
)
def test_a_value_given_twice_is_refused_as_every_benchmark_list_option(tmp_path: Path, monkeypatch, capsys, args: list, message: str) -> None:
    """common.Distinct's refusal, as the other benchmarks' list options (not checks of the script's own)."""
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(lr_sensitivity, "run_optimizer", no_run)
    ref = reference(tmp_path / "suite.json", seeds=2)
    argv = ["--problems", "quadratic-20", "--seeds", "2", "--reference", str(ref), *args, "--name", "out"]
    with pytest.raises(SystemExit) as exit_:
        lr_sensitivity.main(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: {message}")
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("content", [None, "{not json", "[]"])
def test_a_missing_or_malformed_reference_is_a_one_line_error(tmp_path: Path, monkeypatch, capsys, content) -> None:
    ref = tmp_path / "suite.json"
    if content is not None:
        ref.write_text(content)
    err = refused(tmp_path, monkeypatch, capsys, "--problems", "quadratic-20", "--seeds", "2", "--reference", str(ref))
    assert str(ref) in err


def test_a_reference_entry_with_a_string_for_a_number_is_a_one_line_error(tmp_path: Path, monkeypatch, capsys) -> None:
    # it was a traceback formatting the table, after every run
    ref = reference(tmp_path / "suite.json", seeds=2)
    report = json.loads(ref.read_text())
    report["problems"]["quadratic-20"]["results"]["Adam"]["final_mean"] = "1.0"
    ref.write_text(json.dumps(report))
    err = refused(tmp_path, monkeypatch, capsys, "--lrs", "1", "--problems", "quadratic-20", "--seeds", "2", "--reference", str(ref))
    assert "its Adam entry on quadratic-20 lacks lr, final_mean, final_std or kind (the first three numbers)" in err



def test_a_weight_file_of_a_rule_of_ones_own_is_refused_without_naming_an_option_it_lacks(tmp_path: Path, monkeypatch, capsys) -> None:
    """The shared message said "give --rules module:Class", an option this script does not have."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from learnedopt.nn import CoordinateLSTM
    from learnedopt.weights import save_weights

    library, own = tmp_path / "library.safetensors", tmp_path / "own.safetensors"
    save_weights(CoordinateLSTM(), library)
    with safe_open(str(library), "pt") as f:
        header = json.loads(f.metadata()["learnedopt"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    save_file(tensors, str(own), metadata={"learnedopt": json.dumps(dict(header, kind="MyOwnRule"))})
    ref = reference(tmp_path / "suite.json", seeds=2)
    err = refused(tmp_path, monkeypatch, capsys, "--weights", str(own), "--lrs", "1", "--problems", "quadratic-20",
                  "--seeds", "2", "--reference", str(ref))  # fmt: skip
    assert "its update rule kind 'MyOwnRule' is your own; this command runs the library's rules only" in err
    assert "--rules" not in err


def test_a_weight_file_and_a_reference_named_with_backticks_stay_in_their_code_spans(tmp_path: Path, monkeypatch) -> None:
    """The table's heading put the weights' label and the reference's file name in inline code
    as they were: a backtick in either ended its span early."""
    from learnedopt.weights import build_preset, save_weights

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(lr_sensitivity, "run_optimizer", lambda problem, seed, factory, lr, **options: np.full(100, 0.5))
    weights = tmp_path / "my`rule.safetensors"
    save_weights(build_preset("l2l-2016")[0], weights)
    ref = reference(tmp_path / "suite`1.json", seeds=2)
    lr_sensitivity.main(["--weights", str(weights), "--lrs", "1", "--problems", "quadratic-20", "--seeds", "2",
                         "--reference", str(ref), "--name", "out"])  # fmt: skip
    heading = (tmp_path / "out.md").read_text().split("\n\n")[2]
    assert heading.startswith("``LSTMOptimizer (my`rule.safetensors)`` at several `lr`"), heading
    assert "from ``suite`1.json`` on the same seeds" in heading, heading


def test_the_recorded_command_is_the_one_main_was_given(tmp_path: Path, monkeypatch) -> None:
    """``main(argv)`` ran ``argv`` but recorded ``sys.argv`` as the command (here: pytest's), so a
    run from Python recorded a command that does not rerun it."""
    import shlex

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(sys, "argv", ["pytest", "-k", "something"])
    ref = reference(tmp_path / "suite.json", seeds=2)
    argv = ["--weights", "l2l-2016", "--lrs", "2", "--problems", "quadratic-20", "--seeds", "2", "--reference", str(ref), "--name", "out"]
    assert lr_sensitivity.main(argv) == 0
    command = json.loads((tmp_path / "out.json").read_text())["command"]
    assert shlex.split(command)[2:] == argv and shlex.split(command)[1].endswith("lr_sensitivity.py"), command
    assert command in (tmp_path / "out.md").read_text()
