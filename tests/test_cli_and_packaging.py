import importlib.util
import subprocess
import sys

from learnedopt.cli import main


def test_help_and_presets(capsys) -> None:
    assert main([]) == 0
    assert "presets" in capsys.readouterr().out
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "l2l-2016" in out and "meta-lstm-2017" in out


def test_console_script_help_runs() -> None:
    result = subprocess.run([sys.executable, "-m", "learnedopt", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "learnedopt" in result.stdout


def test_demo_runs_and_prints_each_optimizer(capsys) -> None:
    assert main(["demo", "--steps", "20"]) == 0
    out = capsys.readouterr().out
    for name in ("LSTMOptimizer", "MetaLSTMOptimizer", "Adam"):
        assert name in out


def test_kernels_are_installed_under_learnedopt_only() -> None:
    import learnedopt.kernels

    assert learnedopt.kernels.__name__ == "learnedopt.kernels"
    assert importlib.util.find_spec("kernels") is None or "learnedopt" not in str(importlib.util.find_spec("kernels").origin)
