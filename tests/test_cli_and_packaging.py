import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from learnedopt.cli import main


def test_help_and_presets(capsys) -> None:
    assert main([]) == 0
    assert "presets" in capsys.readouterr().out
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "l2l-2016" in out and "meta-lstm-2017" in out


def test_presets_lists_which_presets_are_trained(capsys) -> None:
    assert main(["presets"]) == 0
    rows = [line.split(maxsplit=3) for line in capsys.readouterr().out.splitlines()]
    states = {name: state for name, _, state, _ in rows}
    assert set(states.values()) == {"trained", "untrained"} and len(states) >= 10
    # the README's presets table: these three are not meta-trained, every other preset is
    untrained = {name for name, state in states.items() if state == "untrained"}
    assert untrained == {"l2l-2016", "meta-lstm-2017", "meta-lstm-adam"}
    assert states["l2l-blend"] == states["meta-lstm-adam-mnist"] == "trained"


def test_console_script_help_runs() -> None:
    result = subprocess.run([sys.executable, "-m", "learnedopt", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "learnedopt" in result.stdout


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
def test_output_piped_into_a_reader_that_stops_early_ends_without_a_traceback(buffered: bool) -> None:
    # as `learnedopt presets | head -3`: the pipe's read end is closed before the first write.
    # Buffered (a pipe's default) the output is written at the end, where the interpreter's own
    # flush at exit printed "Exception ignored ... BrokenPipeError" and exited with status 120;
    # under PYTHONUNBUFFERED (set in some environments) each print raises inside the command
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    process = subprocess.Popen(
        [sys.executable, "-m", "learnedopt", "presets"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait() == 1
    assert stderr == ""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
def test_output_that_cannot_be_written_ends_in_one_line(buffered: bool) -> None:
    """``learnedopt presets > /dev/full`` (a full disk): the write error ended in an OSError
    traceback (or, buffered, Python's "Exception ignored" at exit); now one line and status 1."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "learnedopt", "presets"], stdout=full, stderr=subprocess.PIPE, text=True, env=env)
    assert result.returncode == 1
    assert result.stderr == "learnedopt: cannot write the output: No space left on device\n"


def test_demo_runs_and_prints_each_optimizer_and_only_learnedopts_warnings(capsys, monkeypatch) -> None:
    import warnings

    from learnedopt import demo

    original = demo.train

    def train_with_a_foreign_warning(*args, **kwargs):
        # what torch does when torch.compile first imports torch.utils.mkldnn
        warnings.warn_explicit("`torch.jit.script_method` is deprecated", DeprecationWarning, "/elsewhere/torch/jit/_script.py", 365)
        return original(*args, **kwargs)

    monkeypatch.setattr(demo, "train", train_with_a_foreign_warning)
    assert main(["demo", "--steps", "20", "--minibatch-steps", "12"]) == 0
    out = capsys.readouterr().out
    for name in ("LSTMOptimizer", "MetaLSTMOptimizer", "Adam", "Nesterov (tuned"):
        assert name in out
    assert "1. A minibatch problem" in out and "2. A full-batch problem" in out
    assert "UNTRAINED weights (preset 'l2l-2016')" in out  # learnedopt's own warning is shown
    assert "script_method" not in out


def test_demo_table_row_shows_the_loss_at_a_tenth_of_the_steps() -> None:
    from learnedopt.demo import _header, _row

    losses = [float(v) for v in range(100, 0, -1)]  # loss 100 - t at step t
    header, row = _header(100).split(), _row("SGD", losses, 1.5).split()
    assert header == ["optimizer", "loss@0", "loss@10", "final10", "time"]
    # loss@0, loss@10 and the mean of the last 10 losses (10 .. 1)
    assert row == ["SGD", "100.0000", "90.0000", "5.5000", "1.50s"]
    assert _row("SGD", losses[:35], 0.0).split()[2] == "97.0000"  # step 35 // 10


@pytest.mark.parametrize("option", ["--steps", "--minibatch-steps"])
def test_demo_refuses_fewer_steps_than_its_table_reports(option, capsys) -> None:
    """Under 10 steps, "loss@<steps // 10>" would be a second loss@0 and "final10" a mean of fewer."""
    assert main(["demo", option, "9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"learnedopt demo: error: {option} must be at least 10, got 9") and "\n" not in err


@pytest.mark.parametrize("option", ["--steps", "--minibatch-steps"])
def test_demo_refuses_more_steps_than_a_loss_curve_holds_before_it_runs(option, capsys, monkeypatch) -> None:
    """--minibatch-steps 10**13 printed the first table's header, then stopped with numpy's
    traceback (72.8 TiB for the loss curve), 10**20 with numpy's "Maximum allowed dimension
    exceeded"; --steps of as many ran on. Both are bounded as evaluate optimizers' steps are."""
    from learnedopt import demo

    monkeypatch.setattr(demo, "run_minibatch", lambda *a, **k: pytest.fail("the demo ran"))
    assert main(["demo", option, str(2**31)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (f"learnedopt demo: error: {option} must be at most 2,147,483,647 (2**31 - 1, the most "
                            f"elements of a loss curve), got {2**31}\n")  # fmt: skip
    with pytest.raises(ValueError, match="minibatch_steps must be at most 2,147,483,647"):
        demo.run_demo(minibatch_steps=2**31)


def test_kernels_are_installed_under_learnedopt_only() -> None:
    import learnedopt.kernels

    assert learnedopt.kernels.__name__ == "learnedopt.kernels"
    assert importlib.util.find_spec("kernels") is None or "learnedopt" not in str(importlib.util.find_spec("kernels").origin)


def _wheel_names(wheel: Path) -> set[str]:
    import zipfile

    return set(zipfile.ZipFile(wheel).namelist())


def _pip_wheel(source: Path, out: Path) -> Path:
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(source)],
        capture_output=True, text=True,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = out.glob("learnedopt-*.whl")
    return wheel


def test_the_wheel_and_the_sdist_hold_every_module_the_kernels_their_sources_the_weights_and_the_license(tmp_path) -> None:
    # pyproject.toml lists the packages by hand: a subpackage left out of that list works in the
    # editable install the tests run on and is missing from an installed wheel
    import shutil
    import tarfile
    import zipfile

    root = Path(__file__).resolve().parents[1]
    # built from a copy: setuptools reuses a build/ folder, whose stale files would hide a package left out
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("learnedopt", "kernels", "tests"):
        shutil.copytree(root / folder, source / folder, symlinks=True, ignore=ignore)
    shutil.copytree(root / "benchmarks", source / "benchmarks", ignore=shutil.ignore_patterns("results", "__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "Makefile"):
        if (root / name).exists():
            shutil.copy(root / name, source / name)
    wheel = _pip_wheel(source, tmp_path / "wheel")
    names = _wheel_names(wheel)
    kernels = root / "kernels"
    expected = {
        *(p.relative_to(root).as_posix() for p in (root / "learnedopt").rglob("*.py") if kernels.resolve() not in p.resolve().parents),
        *(f"learnedopt/kernels/{p.relative_to(kernels).as_posix()}" for p in kernels.rglob("*.py")),
        *(f"learnedopt/kernels/{p.relative_to(kernels).as_posix()}" for p in kernels.rglob("*.cpp")),  # compiled at first use
        *(p.relative_to(root).as_posix() for p in (root / "learnedopt" / "pretrained").iterdir() if p.suffix in (".md", ".safetensors")),
    }
    assert expected - names == set()
    assert any(n.startswith("learnedopt/kernels/") for n in names)
    assert not any(n.startswith("kernels/") for n in names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    # nothing beside the package and its metadata: no tests, benchmarks or build leftovers
    dist_info = f"{wheel.name.split('-py3')[0]}.dist-info/"
    assert {n for n in names if not n.startswith(("learnedopt/", dist_info))} == set()
    entry_points = zipfile.ZipFile(wheel).read(dist_info + "entry_points.txt").decode()
    assert "[console_scripts]\nlearnedopt = learnedopt.cli:run" in entry_points
    # pyproject.toml and learnedopt/__init__.py each hold the version: pip's and `learnedopt --version`'s
    import learnedopt

    metadata = zipfile.ZipFile(wheel).read(dist_info + "METADATA").decode()
    assert f"\nVersion: {learnedopt.__version__}\n" in metadata

    # the sdist (as `python -m build --sdist` makes it, without its isolated environment): the
    # package's sources and the build files only. setuptools added tests/test_*.py by default but
    # not conftest.py or helpers.py, which 26 of them import: a test suite that could not run
    built = subprocess.run(
        [sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(tmp_path / 'sdist')!r})"],
        cwd=source, capture_output=True, text=True,
    )
    assert built.returncode == 0, built.stderr
    (sdist,) = (tmp_path / "sdist").glob("learnedopt-*.tar.gz")
    with tarfile.open(sdist) as archive:
        members = {m.name.split("/", 1)[1] for m in archive.getmembers() if m.isfile()}
        archive.extractall(tmp_path / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    sources = {n.replace("learnedopt/kernels/", "kernels/", 1) for n in expected}
    assert sources - members == set()
    assert {n.split("/")[0] for n in members} - {"learnedopt", "kernels", "learnedopt.egg-info"} <= {
        "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "PKG-INFO", "setup.cfg"
    }
    # and the wheel built from it holds the same files as the one built from the checkout
    (unpacked,) = (tmp_path / "unpacked").iterdir()
    assert _wheel_names(_pip_wheel(unpacked, tmp_path / "from-sdist")) == names


def test_demo_baselines_use_the_suites_tuned_learning_rates() -> None:
    import json
    import math

    from learnedopt.demo import TUNED_LRS

    report = json.loads((Path(__file__).resolve().parents[1] / "benchmarks/results/optimizee_eval_blend.json").read_text())
    for problem, lrs in TUNED_LRS.items():
        for name, lr in lrs.items():
            assert math.isclose(lr, report["problems"][problem]["results"][name]["lr"], rel_tol=1e-12), (problem, name)


def test_demo_falls_back_to_generated_data_without_mnist(tmp_path, monkeypatch) -> None:
    from learnedopt.demo import minibatch_problem

    (tmp_path / "mnist").mkdir()
    monkeypatch.setenv("LEARNEDOPT_DATA", str(tmp_path))  # the default search finds no MNIST files
    assert minibatch_problem().name == "synthetic-mlp"
    with pytest.raises(FileNotFoundError, match="t10k"):  # a folder named explicitly must hold MNIST
        minibatch_problem(tmp_path)


def test_demo_without_mnist_says_where_it_looked(tmp_path, monkeypatch, capsys) -> None:
    """The note said only "pass --data or set LEARNEDOPT_DATA", also to a user whose
    LEARNEDOPT_DATA was set, to a file or a folder without MNIST."""
    from learnedopt import demo

    shown = []
    monkeypatch.setattr(demo, "run_minibatch", lambda problem, steps: shown.append(problem.name) or {})
    monkeypatch.setattr(demo, "run_regression", lambda steps: {})
    (tmp_path / "a_file").write_text("")
    (tmp_path / "data" / "mnist").mkdir(parents=True)
    for root, reason in (("a_file", f"LEARNEDOPT_DATA={tmp_path / 'a_file'} is a file, not a folder"),
                         ("data", "neither t10k-images-idx3-ubyte.gz nor t10k-images-idx3-ubyte found in")):  # fmt: skip
        monkeypatch.setenv("LEARNEDOPT_DATA", str(tmp_path / root))
        assert main(["demo"]) == 0
        first = capsys.readouterr().out.splitlines()[0]
        assert first.startswith(f"(MNIST not found: {reason}") and first.endswith("; generated data instead)"), first
    assert shown == ["synthetic-mlp"] * 2


def test_demo_stopped_with_ctrl_c_says_so_in_one_line(monkeypatch, capsys) -> None:
    """Ctrl-C during the demo printed a traceback of whatever step it hit (the other commands
    stop with one line and exit code 130); the tables printed so far stay."""
    from learnedopt import demo

    def interrupted(steps):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_minibatch", lambda problem, steps: print("a table") or {})
    monkeypatch.setattr(demo, "run_regression", interrupted)
    assert main(["demo"]) == 130
    captured = capsys.readouterr()
    assert "a table" in captured.out
    assert captured.err == "learnedopt demo: interrupted\n"


def test_demo_and_average_weights_refuse_bad_arguments_in_one_line(tmp_path, capsys) -> None:

    for value in ("0", "x"):  # not "invalid _positive_int value": argparse's message names the function
        with pytest.raises(SystemExit) as exit_info:
            main(["demo", "--steps", value])
        assert exit_info.value.code == 2
        assert f"argument --steps: must be a positive integer, got '{value}'" in capsys.readouterr().err
    assert main(["demo", "--data", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["average-weights", "l2l-short", "l2l-random", "--out", str(tmp_path)]) == 2  # a folder
    assert "cannot write" in capsys.readouterr().err
    assert not tmp_path.with_name(tmp_path.name + ".tmp").exists()  # no half-written file left beside it


def test_importing_the_library_leaves_dtensor_for_when_a_parameter_is_sharded() -> None:
    # torch.distributed.tensor was 0.5 s of `import learnedopt`'s 0.6 s and of every `learnedopt`
    # command's start (building any torch.optim optimizer imports it anyway, through torch._dynamo)
    script = (
        "import sys, torch, learnedopt, learnedopt.meta, learnedopt.evaluation, learnedopt.data, learnedopt.cli\n"
        "learnedopt.cli.build_parser()\n"
        "from learnedopt.optim import sharding\n"
        "assert not sharding.is_sharded(torch.zeros(1))  # no DTensor yet: a plain tensor, asked without importing it\n"
        "assert 'torch.distributed.tensor' not in sys.modules, 'imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-1500:]


@pytest.mark.parametrize(
    "argv",
    [
        ["meta-train", "--task", "quadratic", "--unroll", "1", "--horizon", "2", "--meta-batch", "1", "--meta-steps", "1",
         "--quiet", "--stop-after", "0", "--out", ""],
        ["evaluate", "optimizers", "--quick", "--presets", "--problems", "quadratic-20", "--out", ""],
        ["average-weights", "l2l-short", "--out", ""],
    ],
    ids=["meta-train", "evaluate-optimizers", "average-weights"],
)
def test_an_empty_out_is_refused_not_taken_as_the_current_folder(argv, tmp_path, monkeypatch, capsys) -> None:
    """``--out "$DIR"`` with ``DIR`` unset: meta-train wrote its run (config.json, log.jsonl,
    checkpoints) and evaluate optimizers its report into the current folder, as ``Path("")`` is
    ``.``; average-weights said ``cannot write : . is a folder``. Now argparse's one line."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "error: argument --out: must be a non-empty path, got ''" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--data", ""],
        ["meta-train", "--task", "mnist-mlp", "--out", "run", "--data", ""],
        ["evaluate", "optimizers", "--data", ""],
        ["evaluate", "optimizers", "--weights", ""],
        ["evaluate", "optimizers", "--reuse", ""],
        ["evaluate", "omniglot-runs", "--runs", "", "--checkpoint", "model.safetensors"],
        ["evaluate", "omniglot-runs", "--runs", "runs", "--checkpoint", ""],
    ],
    ids=["demo --data", "meta-train --data", "optimizers --data", "optimizers --weights", "optimizers --reuse",
         "omniglot-runs --runs", "omniglot-runs --checkpoint"],
)
def test_an_empty_path_is_refused_naming_its_option(argv, tmp_path, monkeypatch, capsys) -> None:
    """An empty file or folder option was ``.``, and the error named that instead of the option
    (``neither t10k-images-idx3-ubyte.gz ... found in '.'``, ``--weights  is a folder``,
    ``few-shot model file not found: . (. is a folder)``); now argparse's one line."""
    monkeypatch.chdir(tmp_path)
    option = argv[argv.index("") - 1]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert f"error: argument {option}: must be a non-empty path, got ''" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_thread_count_is_bounded_as_evaluate_optimizers_bounds_its_threads() -> None:
    """The benchmarks' ``--threads`` (positive_int) took any count: torch.set_num_threads raised
    'Overflow when unpacking long long' past 2**63, and 10**5 threads exhausted memory, where
    ``evaluate optimizers --threads`` stops at max(1024, the CPU count)."""
    import argparse
    import os

    from learnedopt.cli import most_threads, thread_count

    assert most_threads() == max(1024, os.cpu_count() or 1)
    assert thread_count("1") == 1 and thread_count(str(most_threads())) == most_threads()
    for text in ("0", "-1", "x", "", str(most_threads() + 1), "10000000000000000000000"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"must be a thread count from 1 to {most_threads()}, got '{text}'"):
            thread_count(text)


def test_seed_arg_takes_what_torch_and_numpy_seeds_both_take() -> None:
    """The benchmarks' ``--seed`` (``type=int``) took a negative seed, which numpy's SeedSequence
    (the library's ``generator_for``) refuses, and one past 2**64 - 1, which ``torch.manual_seed``
    refuses: tracebacks, some only after the training had run."""
    import argparse

    import numpy as np
    import torch

    from learnedopt.cli import seed_arg

    for text in ("0", "7", str(2**64 - 1)):
        seed = seed_arg(text)
        torch.Generator().manual_seed(seed)
        np.random.SeedSequence(seed)
    for text in ("-1", str(2**64), "1.5", "", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"must be an integer from 0 to 2\\*\\*64 - 1, got '{text}'"):
            seed_arg(text)
