"""The benchmark scripts' own checks: the meta-gradient comparisons of ``meta_train_throughput.py``
and ``fewshot.py higher`` fail when one side computes something else, and every script refuses a
bad option with a one-line error before it runs anything."""

from __future__ import annotations

import importlib
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from helpers import needs_compiler

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import common  # noqa: E402
import lr_sensitivity  # noqa: E402 - imported before any test redirects common.RESULTS
import meta_train_throughput  # noqa: E402
import optimizee_eval  # noqa: E402

TINY = ["--task", "quadratic", "--meta-batch", "1", "--unroll", "2", "--repeats", "1"]


def run_main(module, monkeypatch, *argv: str) -> None:
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *argv])
    module.main()


@pytest.fixture
def results(tmp_path: Path, monkeypatch) -> Path:
    """Results written under ``tmp_path``, pointwise LSTM parts eager (no compile time)."""
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setenv("LEARNEDOPT_COMPILE", "0")
    return tmp_path


def test_meta_train_throughput_writes_agreeing_json_and_markdown(results: Path, monkeypatch) -> None:
    run_main(meta_train_throughput, monkeypatch, *TINY, "--tag", "t")
    row = json.loads((results / "meta_train_throughput_t.json").read_text())["rows"][0]
    md = (results / "meta_train_throughput_t.md").read_text()
    assert row["meta_grad_rel_diff"] <= meta_train_throughput.TOLERANCE
    assert "cpu" in json.loads((results / "meta_train_throughput_t.json").read_text())["machine"]
    seconds = row["seconds"]
    speedups = [float(x) for x in re.findall(r"\| [\d.]+ \| [\d.]+ \| ([\d.]+)x \|", md)]
    assert speedups == [round(seconds[row["baseline"]] / s, 2) for s in seconds.values()]


@pytest.mark.parametrize("wrong", ["scaled", "nan"])
def test_meta_train_throughput_refuses_different_meta_gradients(results: Path, monkeypatch, wrong: str) -> None:
    # the per-tensor baseline's LSTM (torch.nn.LSTM) computes something else
    original = common.through_nn_lstm

    def broken(lstm, x, h, c):
        top, h, c = original(lstm, x, h, c)
        return top * (1.1 if wrong == "scaled" else math.nan), h, c

    monkeypatch.setattr(common, "through_nn_lstm", broken)
    with pytest.raises(SystemExit) as exit_:
        run_main(meta_train_throughput, monkeypatch, *TINY)
    assert "do not compute the same meta-gradient" in str(exit_.value.code)
    assert list(results.iterdir()) == []


def test_param_groups_writes_agreeing_json_and_markdown(results: Path, monkeypatch) -> None:
    import param_groups

    run_main(param_groups, monkeypatch, "--tensors", "4", "--sizes", "3", "--groups", "1", "4", "--repeats", "1", "--tag", "t")
    rows = json.loads((results / "param_groups_t.json").read_text())["rows"]
    md = (results / "param_groups_t.md").read_text()
    assert [(r["optimizer"], r["groups"]) for r in rows] == [(name, g) for name in ("LSTMOptimizer", "MetaLSTMOptimizer") for g in (1, 4)]
    speedups = [float(x) for x in re.findall(r"\| ([\d.]+)x \| [\d.]+x slower \|", md)]
    assert speedups == [round(r["speedup_vs_per_group"], 2) for r in rows]


def test_param_groups_table_names_the_threads_it_ran_on(results: Path, monkeypatch) -> None:
    # the table said "one thread unless OMP_NUM_THREADS says otherwise", but the script sets no
    # thread count: without OMP_NUM_THREADS torch runs on every core
    import param_groups

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_main(param_groups, monkeypatch, "--tensors", "2", "--sizes", "3", "--groups", "1", "--optimizers", "lstm",
                 "--repeats", "1", "--tag", "t")  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    md = (results / "param_groups_t.md").read_text()
    assert "one thread" not in md
    assert "2 threads" in md


def test_meta_gradient_difference_does_not_hide_a_nan() -> None:
    g = [torch.ones(3)]
    grads = {"per-tensor": g, "batched": [torch.full((3,), math.nan)], "batched-nn-lstm": [g[0] * (1 + 1e-7)]}
    assert math.isnan(meta_train_throughput.meta_gradient_difference(grads, "per-tensor"))
    grads["batched"] = [g[0] * (1 + 1e-2)]
    assert meta_train_throughput.meta_gradient_difference(grads, "per-tensor") == pytest.approx(1e-2)


def test_fewshot_higher_refuses_different_meta_gradients(results: Path, monkeypatch) -> None:
    pytest.importorskip("higher")
    import fewshot

    original = fewshot._ours_meta_grad
    monkeypatch.setattr(fewshot, "_ours_meta_grad", lambda model, batch, lr, *a, **k: original(model, batch, lr * 1.05, *a, **k))
    monkeypatch.setattr(common, "time_call", lambda *a, **k: pytest.fail("timed before the meta-gradients were checked"))
    with pytest.raises(SystemExit) as exit_:
        run_main(fewshot, monkeypatch, "higher", "--repeats", "1", "--threads", "1", "--results-dir", str(results))
    assert "do not compute the same meta-gradient" in str(exit_.value.code)
    assert list(results.iterdir()) == []


def test_fewshot_higher_checks_the_forced_vmap_and_loop_it_times_too(results: Path, monkeypatch) -> None:
    """The table times learnedopt's MAML with vectorize 'auto' and forced to vmap and to a loop,
    but only 'auto' (vmap for the MLP, a loop for conv-4 on CPU) was checked against higher: a
    wrong meta-gradient of the other path was timed and reported."""
    pytest.importorskip("higher")
    import fewshot

    original = fewshot._ours_meta_grad

    def loop_wrong(model, batch, lr, steps, loss_fn, vectorize="auto"):
        return original(model, batch, lr * (1.05 if vectorize is False else 1), steps, loss_fn, vectorize)

    monkeypatch.setattr(fewshot, "_ours_meta_grad", loop_wrong)
    monkeypatch.setattr(common, "time_call", lambda *a, **k: pytest.fail("timed before the meta-gradients were checked"))
    with pytest.raises(SystemExit) as exit_:
        run_main(fewshot, monkeypatch, "higher", "--repeats", "1", "--threads", "1", "--results-dir", str(results))
    assert "do not compute the same meta-gradient" in str(exit_.value.code)
    assert "vectorize=False" in str(exit_.value.code)
    assert list(results.iterdir()) == []


def test_fewshot_higher_meta_gradients_agree() -> None:
    pytest.importorskip("higher")
    import fewshot

    for name, make_model, make_batch, lr, steps, loss_fn in fewshot._higher_cases():
        assert fewshot._meta_grad_difference(make_model, make_batch, lr, steps, loss_fn) <= fewshot.HIGHER_TOLERANCE, name


BAD_OPTIONS = [
    ("cpu_step", ["--layouts", "0"]),
    ("cpu_step", ["--repeats", "0"]),
    ("cpu_step", ["--sizes", "150", "--layouts", "1", "100"]),  # ran 100 parameters, reported 150
    ("param_groups", ["--tensors", "300", "--groups", "7"]),  # 294 tensors timed, 300 reported
    ("param_groups", ["--repeats", "0"]),
    ("lstm_chunk", ["--chunk", "0"]),  # wrote a table of 0 GFLOP/s over the committed one
    ("lstm_chunk", ["--threads", "0"]),
    ("lstm_step_parts", ["--coordinates", "0"]),
    ("lstm_layer_cpu", ["--hidden", "5"]),  # the kernel takes 4 x hidden in vectors of 16
    ("lstm_layer_cpu", ["--threads", "0"]),
    ("first_step", ["--threads", "0"]),
    ("maml_memory", ["--steps", "0"]),
    # ran twice; the JSON kept one, the table showed two rows
    ("maml_memory", ["--steps", "1", "1", "--modes", "first-order", "--meta-batch", "1", "--ways", "2", "--shots", "1"]),
    ("distributed_scaling", ["--configs", "1y1"]),
    ("distributed_scaling", ["--configs", "0x1"]),
    ("distributed_scaling", ["--configs", "1x1", "1x1"]),  # the second run found the first's folder
    ("distributed_scaling", ["--configs", "1x1", "--task", "bogus"]),  # torchrun's 40 lines of traceback
    ("meta_train_throughput", ["--repeats", "0"]),
    ("revision_ab", ["--against", "HEAD", "--rounds", "0"]),
    ("truncation_worker", ["--task", "quadratic", "--meta-batch", "0"]),  # ran, and timed empty meta-batches
    ("truncation_worker", ["--task", "quadratic", "--threads", "0"]),
    ("freed_memory", ["--meta-steps", "1"]),  # its only meta-step would be left out
    ("freed_memory", ["--task", "bogus", "--meta-steps", "2", "--rounds", "1"]),
    ("meta_train_throughput", ["--task", "bogus"]),
    ("fewshot", ["higher", "--repeats", "0"]),
    ("fewshot", ["higher", "--device", "bogus"]),
    # torch takes these as devices: each stopped the benchmark with a traceback once it ran
    ("fewshot", ["higher", "--device", "meta"]),
    ("fewshot", ["higher", "--device", "mps"]),
    ("fewshot", ["higher", "--device", "cuda:99"]),
    ("kernel_case_conditioning", ["--help-me"]),  # took no options: ran and overwrote its results
    ("kernel_bench", ["--repeats", "0"]),  # a statistics traceback after the setup
    ("kernel_bench", ["--sizes", "-5"]),  # a negative-dimension traceback
    ("kernel_bench", ["--hidden-size", "0"]),
    ("kernel_bench", ["--block", "48"]),  # the launcher's ValueError mid-run on a GPU
    ("kernel_bench", ["--num-warps", "3"]),
    ("kernel_bench", ["--backward-max-size", "0"]),  # read as "not given": the default's 10^6 ran
    ("lstm_fused_gemm", ["--preset", "bogus"]),  # a traceback
    ("fewshot", ["sinusoid", "--iterations", "1", "--test-tasks", "0"]),  # a mean of no tasks
    ("fewshot", ["sinusoid", "--iterations", "1", "--shots", "0"]),
    ("fewshot", ["sinusoid", "--iterations", "0"]),
    ("fewshot", ["omniglot", "--methods", "bogus"]),  # its job's process died; the parent waited for it forever
    ("fewshot", ["omniglot", "--ways", "0"]),
    ("fewshot", ["omniglot", "--threads-per-job", "0"]),
    ("fewshot", ["omniglot-model", "m.safetensors", "--tag", "t", "--adapt", "x,1"]),  # a traceback after loading
    ("fewshot", ["omniglot-model", "m.safetensors", "--tag", "t", "--adapt", "5,-1"]),
    ("fewshot", ["omniglot-model", "m.safetensors", "--tag", "t", "--test-episodes", "0"]),
    # a results name that is a path or too long: a FileNotFoundError / "File name too long" traceback
    # once the benchmark had run, its results lost
    ("param_groups", ["--tensors", "2", "--sizes", "10", "--groups", "1", "--repeats", "1", "--optimizers", "lstm", "--tag", "a/b"]),
    ("param_groups", ["--tensors", "2", "--sizes", "10", "--groups", "1", "--repeats", "1", "--optimizers", "lstm", "--tag", "x" * 300]),
    ("maml_memory", ["--steps", "1", "--modes", "first-order", "--meta-batch", "1", "--ways", "2", "--shots", "1", "--name", "a/b"]),
    ("maml_memory", ["--steps", "1", "--modes", "first-order", "--meta-batch", "1", "--ways", "2", "--shots", "1", "--name", ""]),
    # a missing model, or a weight file of another kind, was load_learner's traceback
    ("fewshot", ["omniglot-model", "missing.safetensors", "--tag", "t"]),
    ("fewshot", ["omniglot-model", str(Path(__file__).resolve().parents[1] / "learnedopt/pretrained/l2l-mnist.safetensors"), "--tag", "t"]),
    # a value given twice ran (or scored) twice: rows repeated in the table, one kept in the JSON where keyed
    ("cpu_step", ["--sizes", "100", "100", "--layouts", "1", "--repeats", "1"]),
    ("param_groups", ["--tensors", "2", "--sizes", "10", "--groups", "1", "1", "--repeats", "1", "--optimizers", "lstm"]),
    ("param_groups", ["--tensors", "2", "--sizes", "10", "--groups", "1", "--repeats", "1", "--optimizers", "lstm", "lstm"]),
    ("fewshot", ["sinusoid", "--iterations", "1", "--test-tasks", "1", "--shots", "1", "1"]),
    ("fewshot", ["omniglot", "--ways", "5", "5"]),
    ("fewshot", ["omniglot", "--methods", "maml", "maml"]),
    ("fewshot", ["omniglot-model", "m.safetensors", "--tag", "t", "--adapt", "5,1", "5,1,0"]),
    ("fewshot", ["omniglot-model", "m.safetensors", "--tag", "t", "--cells", "1-shot", "1-shot"]),
    ("lstm_layer_cpu", ["--inputs", "2", "2"]),
    ("kernel_bench", ["--sizes", "100", "100"]),
    ("kernel_bench", ["--results-dir", __file__]),  # a file: FileExistsError once the results were written
    ("fewshot", ["higher", "--results-dir", __file__]),
    # numpy's SeedSequence refused a negative seed ("expected non-negative integer"), torch.manual_seed one
    # past 2**64 ("Overflow when unpacking long long"): tracebacks, the second after the training
    ("meta_train_throughput", [*TINY, "--seed", "-1"]),
    ("fewshot", ["sinusoid", "--iterations", "1", "--test-tasks", "1", "--shots", "1", "--seed", "100000000000000000000000000"]),
    ("fewshot", ["omniglot", "--seed", "-1"]),
    ("fewshot", ["omniglot-model", "m.safetensors", "--tag", "t", "--seed", "-1"]),
    ("revision_ab", ["--against", "HEAD", "--seed", "-1"]),
    # torch.set_num_threads' "Overflow when unpacking long long" traceback (10**5 exhausted memory)
    ("first_step", ["--threads", "10000000000000000000000"]),
    ("lstm_chunk", ["--threads", "10000000000000000000000"]),
    ("lstm_layer_cpu", ["--threads", "10000000000000000000000"]),
    ("lstm_step_parts", ["--threads", "10000000000000000000000"]),
    ("meta_train_throughput", ["--threads", "10000000000000000000000"]),
    ("freed_memory", ["--threads", "10000000000000000000000"]),
    ("revision_ab", ["--against", "HEAD", "--threads", "10000000000000000000000"]),
    ("fewshot", ["higher", "--threads", "10000000000000000000000"]),
    ("fewshot", ["omniglot", "--threads-per-job", "10000000000000000000000"]),
    ("fewshot", ["omniglot-model", "m.safetensors", "--tag", "t", "--threads", "10000000000000000000000"]),
]


@pytest.mark.parametrize("script, argv", BAD_OPTIONS, ids=[f"{s} {' '.join(a)}" for s, a in BAD_OPTIONS])
def test_bad_option_is_refused_in_one_line(script: str, argv: list[str], results: Path, monkeypatch, capsys) -> None:
    module = importlib.import_module(script)
    monkeypatch.setattr(module, "write_results", lambda *a, **k: pytest.fail("wrote results"), raising=False)
    with pytest.raises(SystemExit) as exit_:
        run_main(module, monkeypatch, *argv)
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"{script}.py") and "error: " in error, error


EMPTY_PATHS = [
    ("fewshot", ["higher", "--results-dir", ""], "--results-dir"),  # wrote its results into the current folder
    ("kernel_bench", ["--results-dir", ""], "--results-dir"),
    ("fewshot", ["omniglot-model", "", "--tag", "t"], "model"),
    ("lr_sensitivity", ["--problems", "quadratic-20", "--name", "x", "--reference", ""], "--reference"),  # "cannot read ."
    ("lr_sensitivity", ["--problems", "quadratic-20", "--name", "x", "--data", ""], "--data"),
    ("reproduction_check", ["a.safetensors", "", "--out", "out"], "rerun"),
    ("reproduction_check", ["a.safetensors", "b.safetensors", "--out", "out", "--data", ""], "--data"),
    ("readme_table", ["", "Adam=Adam"], "report"),
]


@pytest.mark.parametrize("script, argv, option", EMPTY_PATHS, ids=[f"{s} {o}" for s, _, o in EMPTY_PATHS])
def test_an_empty_path_is_refused_naming_its_option(script: str, argv: list[str], option: str, results: Path, monkeypatch, capsys) -> None:
    """As the CLI's options that name a file or folder (learnedopt.values.path_arg): ``""`` is not ``.``."""
    module = importlib.import_module(script)
    monkeypatch.setattr(module, "write_results", lambda *a, **k: pytest.fail("wrote results"), raising=False)
    with pytest.raises(SystemExit) as exit_:
        run_main(module, monkeypatch, *argv)
    assert exit_.value.code == 2
    assert f"error: argument {option}: must be a non-empty path, got ''" in capsys.readouterr().err


FAKE_PYTHON = """#!/usr/bin/env bash
# every check passes (CUDA, the kernels, xdist, higher); each run is recorded with its directory
echo "$PWD :: $*" >> "$CALLS"
case "$*" in *fewshot.py*) exit "$HIGHER_RC" ;; esac
exit 0
"""


@pytest.mark.parametrize("higher_rc", [0, 1])
def test_run_gpu_writes_under_a_relative_out_and_fails_with_higher(tmp_path: Path, higher_rc: int) -> None:
    import os
    import subprocess

    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    calls = tmp_path / "calls.log"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "run_gpu.sh"
    env = {**os.environ, "PYTHON": str(python), "OUT": "out", "CALLS": str(calls), "HIGHER_RC": str(higher_rc)}
    done = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    runs = calls.read_text().splitlines()
    bench = next(line for line in runs if "kernel_bench.py" in line)
    higher = next(line for line in runs if "fewshot.py higher" in line)
    results = tmp_path / "out" / "results"
    for line in (bench, higher):  # the results go under $OUT, taken from the caller's directory
        words = line.split()
        assert Path(words[words.index("--results-dir") + 1]) == results, line
    assert (tmp_path / "out" / "summary.txt").is_file()
    assert (done.returncode != 0) == bool(higher_rc), done.stdout[-2000:]


@needs_compiler  # the fused CPU kernel, or torch.compile's C++ code
def test_kernel_ab_tells_same_bits_from_other_rounding(tmp_path: Path, monkeypatch) -> None:
    """``kernel_ab.py`` loads two kernel builds side by side: the working tree's source against
    itself gives the same meta-gradient bits; a source whose sigmoid is off by 1e-7 does not."""
    import kernel_ab

    from learnedopt.kernels import lstm_layer_cpu

    results = tmp_path
    monkeypatch.setattr(common, "RESULTS", results)
    monkeypatch.delenv("LEARNEDOPT_COMPILE", raising=False)  # the kernel runs where the step may compile

    source = lstm_layer_cpu.SOURCE.read_text()
    sigmoid = "bc(1.0f) / (bc(1.0f) + vexp(-z))"
    assert sigmoid in source
    for name, baseline, same in (("same", source, True), ("other", source.replace(sigmoid, f"({sigmoid} + bc(1e-7f))"), False)):
        monkeypatch.setattr(kernel_ab, "source_at", lambda revision, text=baseline: text)
        run_main(kernel_ab, monkeypatch, "--against", "REV", "--task", "quadratic", "--unroll", "2", "--rounds", "1", "--tag", name)
        row = json.loads((results / f"kernel_ab_{name}.json").read_text())["rows"][0]
        assert row["same_meta_gradient_bits"] is same
        assert ("the same bits" in (results / f"kernel_ab_{name}.md").read_text()) is same
    assert lstm_layer_cpu.SOURCE.read_text() == source  # the working tree's kernel is back in use


@needs_compiler  # the fused CPU kernel, or torch.compile's C++ code
def test_kernel_ab_refuses_a_revision_of_another_c_interface(monkeypatch, capsys) -> None:
    """The working tree's launcher calls both builds: a baseline whose extern "C" parameters
    differ (the source before x's strides were passed) would get its pointers shifted."""
    import kernel_ab

    from learnedopt.kernels import lstm_layer_cpu

    source = lstm_layer_cpu.SOURCE.read_text()
    strides = "const float* x, int64_t x_row, int64_t x_col,"
    assert source.count(strides) == 2
    monkeypatch.setattr(kernel_ab, "source_at", lambda revision: source.replace(strides, "const float* x,"))
    with pytest.raises(SystemExit) as exit_:
        run_main(kernel_ab, monkeypatch, "--against", "OLD", "--task", "quadratic")
    assert exit_.value.code == 2
    assert "the kernel's C interface at 'OLD' is not the working tree's" in capsys.readouterr().err


def test_kernel_ab_refuses_an_unknown_revision(monkeypatch, capsys) -> None:
    import kernel_ab

    with pytest.raises(SystemExit) as exit_:
        run_main(kernel_ab, monkeypatch, "--against", "no-such-revision-xyz", "--task", "quadratic")
    assert exit_.value.code == 2
    assert "no kernels/lstm_layer_cpu.cpp at 'no-such-revision-xyz'" in capsys.readouterr().err


def copy_of_library(folder: Path, replace: tuple[str, str] | None = None) -> None:
    """The working tree's library and kernels under ``folder``, with one text replaced in the
    rule's module (a stand-in for another revision's tree)."""
    import shutil

    root = Path(__file__).resolve().parents[1]
    shutil.copytree(root / "kernels", folder / "kernels")
    shutil.copytree(root / "learnedopt", folder / "learnedopt", symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    if replace:
        module = folder / "learnedopt" / "nn" / "coordinate_lstm.py"
        text = module.read_text()
        assert replace[0] in text
        module.write_text(text.replace(*replace))


def test_revision_ab_runs_each_side_in_its_own_library_and_tells_same_bits(results: Path, monkeypatch) -> None:
    """``revision_ab.py`` runs each side in a process that imports that side's tree: the working
    tree against a copy of itself gives the same meta-gradient bits; against a copy whose rule
    scales its step by 1 + 2**-20, other bits (so the baseline really ran the other tree)."""
    import revision_ab

    scale = "head * self.config.output_scale"
    for name, replace, same in (("same", None, True), ("other", (scale, f"{scale} * (1 + 2**-20)"), False)):
        monkeypatch.setattr(revision_ab, "tree_at", lambda revision, folder, r=replace: copy_of_library(folder, r))
        run_main(revision_ab, monkeypatch, "--against", "REV", "--task", "quadratic", "--unroll", "2", "--rounds", "2", "--tag", name)
        row = json.loads((results / f"revision_ab_{name}.json").read_text())["rows"][0]
        assert row["same_meta_gradient_bits"] is same
        assert len(row["seconds"]["baseline"]) == len(row["seconds"]["working tree"]) == 2
        assert ("the same bits" in (results / f"revision_ab_{name}.md").read_text()) is same


def test_revision_ab_tree_at_writes_the_revisions_library(tmp_path: Path) -> None:
    """The baseline's tree from ``git archive``: the library and its kernels (``learnedopt/kernels``
    is a symlink to ``../kernels``, kept as one)."""
    import revision_ab

    revision_ab.tree_at("HEAD", tmp_path)
    assert (tmp_path / "learnedopt" / "__init__.py").is_file()
    assert (tmp_path / "learnedopt" / "kernels" / "lstm_layer_cpu.py").is_file()


def test_revision_ab_refuses_an_unknown_revision(monkeypatch, capsys) -> None:
    import revision_ab

    with pytest.raises(SystemExit) as exit_:
        run_main(revision_ab, monkeypatch, "--against", "no-such-revision-xyz", "--task", "quadratic")
    assert exit_.value.code == 2
    assert "no revision 'no-such-revision-xyz'" in capsys.readouterr().err


def test_freed_memory_runs_both_settings_and_finds_the_same_metrics(results: Path, monkeypatch) -> None:
    import freed_memory

    run_main(freed_memory, monkeypatch, "--task", "quadratic", "--meta-steps", "2", "--rounds", "1", "--tag", "t")
    payload = json.loads((results / "freed_memory_t.json").read_text())
    assert set(payload["settings"]) == {"keep", "default malloc"} and payload["same_metrics"]
    for side in payload["settings"].values():
        assert len(side["seconds"]) == 1 and len(side["seconds"][0]) == 1  # the first meta-step left out


def test_write_results_leaves_an_earlier_result_whole_when_a_write_is_cut_short(results: Path, monkeypatch) -> None:
    # each file was written in place: a kill or a full disk while a committed result was rewritten
    # (optimizee_eval.py's report, after an hour of runs) left it cut short
    common.write_results("r", {"a": 1}, "table")
    before = {p.name: p.read_text() for p in results.iterdir()}
    real = Path.write_text

    def cut_short(self: Path, text: str, *args, **kwargs) -> int:
        real(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", cut_short)
    with pytest.raises(OSError, match="No space left"):
        common.write_results("r", {"a": 2}, "another table")
    monkeypatch.setattr(Path, "write_text", real)
    assert {p.name: p.read_text() for p in results.iterdir()} == before


def test_write_results_quotes_the_command_for_the_shell(results: Path, monkeypatch) -> None:
    # joined with spaces, optimizee_eval.py's --weights or --data with a space in it read back as two
    # arguments (learnedopt evaluate optimizers quotes its report's command)
    import shlex

    argv = ["benchmarks/optimizee_eval.py", "--weights", "my weights.safetensors", "--name", "it's", "--resume"]
    monkeypatch.setattr(sys, "argv", argv)
    common.write_results("r", {"a": 1}, "table")
    command = json.loads((results / "r.json").read_text())["command"]
    assert shlex.split(command) == ["python", *argv[:-1]]  # --resume left out, as before
    assert f"Command: `{command}`" in (results / "r.md").read_text()


@pytest.mark.parametrize("where", ["venv", "relative PYTHON"])
def test_run_gpu_runs_every_part_with_a_relative_python(tmp_path: Path, where: str) -> None:
    """The default ``.venv/bin/python`` (relative to the repository) and a ``PYTHON`` relative to
    the caller's directory: the kernel benchmark and the comparison with higher run from
    ``benchmarks/``, where a relative path named no file (exit 127, each part failed)."""
    import os
    import shutil
    import subprocess

    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    shutil.copy(Path(__file__).resolve().parents[1] / "benchmarks" / "run_gpu.sh", repo / "benchmarks")
    caller = tmp_path / "caller"
    caller.mkdir()
    python = repo / ".venv" / "bin" / "python" if where == "venv" else caller / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    calls = tmp_path / "calls.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    env.update(OUT=str(tmp_path / "out"), CALLS=str(calls), HIGHER_RC="0")
    if where != "venv":
        env["PYTHON"] = "bin/python"
    done = subprocess.run(["bash", str(repo / "benchmarks" / "run_gpu.sh")], cwd=caller, env=env, capture_output=True, text=True, timeout=60)
    runs = calls.read_text().splitlines()
    assert any("kernel_bench.py" in line for line in runs), done.stdout[-2000:]
    assert any("fewshot.py higher" in line for line in runs), done.stdout[-2000:]
    assert done.returncode == 0, done.stdout[-2000:]


def test_run_gpu_benchmarks_import_learnedopt_where_it_is_not_installed(tmp_path: Path) -> None:
    """The device machine's python3 has torch but not learnedopt: the import check ran from the
    repository root (on ``sys.path`` there) and skipped the install, so ``kernel_bench.py`` and
    ``fewshot.py``, run from ``benchmarks/``, failed at ``from learnedopt.cli import ...``. Here
    a virtual environment sees this one's packages but not its (editable) install of learnedopt,
    and each benchmark part runs its script's imports as the script would."""
    import os
    import subprocess
    import sysconfig
    import venv

    bare = tmp_path / "bare"
    venv.EnvBuilder(with_pip=False).create(bare)
    real = bare / "bin" / "python"
    site = subprocess.run([str(real), "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True, text=True, check=True)
    Path(site.stdout.strip(), "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # a plain path: its .pth files are not run
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    if subprocess.run([str(real), "-c", "import learnedopt"], cwd=tmp_path, env=env, capture_output=True).returncode == 0:
        pytest.skip("learnedopt is installed into site-packages itself here")
    python = tmp_path / "python"
    python.write_text(
        '#!/usr/bin/env bash\n'
        'case "$*" in *kernel_bench.py*|*fewshot.py*) exec "$REAL" -c "import common, learnedopt.kernels.coordinate_lstm_step" ;; esac\n'
        'exit 0\n'
    )
    python.chmod(0o755)
    env.update(PYTHON=str(python), REAL=str(real), OUT=str(tmp_path / "out"))
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "run_gpu.sh"
    done = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "benchmark rc=0" in summary and "MAML against higher rc=0" in summary, (tmp_path / "out" / "run.log").read_text()[-2000:]
    assert done.returncode == 0


def test_run_gpu_names_each_test_as_it_finishes(tmp_path: Path) -> None:
    """A lease cuts the tests short: ``-q`` logged dots, so run.log did not say which tests had
    passed and which had not finished (the H200 runs, ``gpu_tests_h200.md``). Each finished test
    is named in run.log even when its part is killed."""
    import os
    import shutil
    import subprocess

    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    (repo / "tests").mkdir()
    shutil.copy(Path(__file__).resolve().parents[1] / "benchmarks" / "run_gpu.sh", repo / "benchmarks")
    (repo / "tests" / "test_kernel_coordinate_lstm.py").write_text(
        "import time\n\ndef test_sum_passes():\n    pass\n\ndef test_momentum_and_rms_inputs_hangs():\n    time.sleep(600)\n"
    )
    for name in ("kernel_coordinate_lstm_backward", "kernel_meta_lstm", "kernel_meta_lstm_backward", "meta_train_device"):
        (repo / "tests" / f"test_{name}.py").write_text("def test_other_passes():\n    pass\n")
    python = tmp_path / "python"  # CUDA and the kernels are there; no xdist; the tests really run
    python.write_text(
        '#!/usr/bin/env bash\n'
        'case "$*" in *"import xdist"*) exit 1 ;; "-m pytest"*) exec "$REAL" "$@" ;; esac\n'
        'exit 0\n'
    )
    python.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS")}
    env.update(PYTHON=str(python), REAL=sys.executable, OUT=str(tmp_path / "out"), PRIORITY_TIMEOUT="15")
    subprocess.run(["bash", str(repo / "benchmarks" / "run_gpu.sh")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    log = (tmp_path / "out" / "run.log").read_text()
    assert "test_kernel_coordinate_lstm.py::test_sum_passes PASSED" in log, log[-2000:]
    for name in ("kernel_coordinate_lstm_backward", "kernel_meta_lstm", "kernel_meta_lstm_backward", "meta_train_device"):
        assert f"test_{name}.py::test_other_passes PASSED" in log, log[-2000:]


def test_run_gpu_ends_within_its_total_time_and_writes_its_summary(tmp_path: Path) -> None:
    """The parts' limits (570 s) left nothing for the checks and installs around them (each a
    Python start importing torch, slow on a fresh machine): the device tool's 600 s could kill the
    script before its last part and its summary. TOTAL_TIMEOUT bounds the whole script; a part
    gets its own limit or what is left, whichever is less. Here every part would hang."""
    import os
    import subprocess
    import time

    python = tmp_path / "python"  # the checks pass at once; every part hangs
    python.write_text('#!/usr/bin/env bash\ncase "$*" in -c*) exit 0 ;; esac\nexec sleep 600\n')
    python.chmod(0o755)
    env = {**os.environ, "PYTHON": str(python), "OUT": str(tmp_path / "out"), "TOTAL_TIMEOUT": "6"}
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "run_gpu.sh"
    start = time.monotonic()
    try:
        done = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("run_gpu.sh ran past 60 s with TOTAL_TIMEOUT=6")
    assert time.monotonic() - start < 30
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "kernel tests rc=124" in summary and done.returncode != 0, summary


def test_run_gpu_runs_first_the_tests_that_failed_on_the_h200_and_their_float64_check(tmp_path: Path) -> None:
    """The first part, alone (a lease cut both H200 runs short), selects every kernel test that
    failed on the H200 but the two test bugs fixed since (``gpu_h200_test_failures.log.gz``), and
    ``test_pytorch_path_is_near_float64_over_steps``, added to tell which side of the unexplained
    failures is off on the GPU: it ran in the second part, the one a lease cuts. Collected here in
    the interpreter: the tests' names are the same on CUDA."""
    import gzip
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    python = tmp_path / "python"  # records each call's arguments, one a line
    python.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" "--" >> "$CALLS"\nexit 0\n')
    python.chmod(0o755)
    calls = tmp_path / "calls"
    env = {**os.environ, "PYTHON": str(python), "OUT": str(tmp_path / "out"), "CALLS": str(calls)}
    subprocess.run(["bash", str(root / "benchmarks" / "run_gpu.sh")], env=env, capture_output=True, timeout=60)
    args = next(a for a in "\n".join(calls.read_text().splitlines()).split("\n--\n") if a.startswith("-m\npytest") and "\n-k\n" in a).split("\n")
    files = [a for a in args if a.startswith("tests/")]
    selection = args[args.index("-k") + 1]
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"} | {"TRITON_INTERPRET": "1"}
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:benchmark", *files, "-k", selection],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )
    selected = {line for line in collected.stdout.splitlines() if "::" in line}
    log = gzip.decompress((root / "benchmarks" / "results" / "gpu_h200_test_failures.log.gz").read_bytes()).decode()
    failed = {line.split()[1] for line in log.splitlines() if line.startswith("=== ")}
    want = {t for t in failed if "::test_invalid_arguments[" not in t}
    assert len(want) == 27 and want <= selected, sorted(want - selected)
    near = {t for t in selected if "::test_pytorch_path_is_near_float64_over_steps[" in t}
    assert len(near) == 2, collected.stdout[-2000:]


def test_run_gpu_times_short_sizes_without_the_sweep_by_default(tmp_path: Path) -> None:
    """The benchmark part's default (``--no-compile --tune``, sizes up to 10^7) did not fit its
    170 s: the H200 run was cut during 10^7 with 200 s, so that size was never written, and the
    block x warps sweep alone compiles 54 kernels (a step kernel compiled here for sm_90 in 3 to
    19 s). By default it now times 10^5 and 10^6 coordinates without the sweep; BENCH_ARGS still
    replaces the options."""
    import os
    import subprocess

    python = tmp_path / "python"  # records each call's arguments, one a line
    python.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" "--" >> "$CALLS"\nexit 0\n')
    python.chmod(0o755)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "run_gpu.sh"
    for bench_args, want in ((None, ["--no-compile", "--sizes", "100000", "1000000"]), ("--tune --repeats 2", ["--tune", "--repeats", "2"])):
        calls = tmp_path / f"calls{bool(bench_args)}"
        env = {k: v for k, v in os.environ.items() if k != "BENCH_ARGS"}
        env.update(PYTHON=str(python), OUT=str(tmp_path / "out"), CALLS=str(calls), **({"BENCH_ARGS": bench_args} if bench_args else {}))
        subprocess.run(["bash", str(script)], env=env, capture_output=True, timeout=60)
        bench = next(c for c in calls.read_text().split("\n--\n") if c.startswith("kernel_bench.py")).split("\n")
        assert bench[bench.index("--results-dir") + 2:] == want, bench


def test_run_gpu_names_the_card_in_its_log_and_summary(tmp_path: Path) -> None:
    """Timings compare only on the same card, and a lent machine may be an H100 or an H200: the
    card was named only in nvidia-smi.txt, not in run.log or the summary the device tool's reply
    ends with."""
    import os
    import subprocess

    bin_ = tmp_path / "bin"
    bin_.mkdir()
    smi = bin_ / "nvidia-smi"
    smi.write_text('#!/usr/bin/env bash\ncase "$*" in *--query-gpu*) echo "NVIDIA H100 80GB HBM3, 580.159.04, 81559 MiB" ;; *) echo table ;; esac\n')
    smi.chmod(0o755)
    python = tmp_path / "python"
    python.write_text("#!/usr/bin/env bash\nexit 0\n")
    python.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "PYTHON": str(python), "OUT": str(tmp_path / "out")}
    done = subprocess.run(["bash", str(Path(__file__).resolve().parents[1] / "benchmarks" / "run_gpu.sh")], env=env, capture_output=True, text=True, timeout=60)
    card = "NVIDIA H100 80GB HBM3, 580.159.04, 81559 MiB"
    assert card in (tmp_path / "out" / "run.log").read_text().splitlines()[0]
    assert card in (tmp_path / "out" / "summary.txt").read_text() and card in done.stdout.splitlines()[-1]


@pytest.mark.parametrize("argv", [["--blocks", "48"], ["--warps", "0"], ["--arch", "0"]])
def test_kernel_resources_refuses_a_bad_option_in_one_line(tmp_path: Path, argv: list[str]) -> None:
    """A block or warp count the launchers refuse was compiled, reported as "did not compile" and
    written over the results (exit 1); in a subprocess: the script does not import under
    ``TRITON_INTERPRET=1``."""
    import os
    import subprocess

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_resources.py"
    done = subprocess.run(
        [sys.executable, str(script), "--no-differentiable", *argv, "--results-dir", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("kernel_resources.py: error: argument "), done.stderr
    assert list(tmp_path.iterdir()) == []


@needs_compiler  # the fused CPU kernel, or torch.compile's C++ code
def test_lstm_step_parts_compares_the_step_it_names(results: Path, monkeypatch) -> None:
    """The whole two-layer step's 'after' is ``LSTMStackStep``'s products and compiled pointwise
    functions, which 'before' ran per layer with the same bits; with the fused CPU kernel on (the
    library's default since), 'after' timed that kernel and the bits differed."""
    import lstm_step_parts

    monkeypatch.delenv("LEARNEDOPT_COMPILE")  # as the script runs: compiled, the kernel on
    monkeypatch.delenv("LEARNEDOPT_CPU_KERNEL", raising=False)
    monkeypatch.setattr(lstm_step_parts, "time_call", lambda fn: (fn(), 1e-3)[1])
    run_main(lstm_step_parts, monkeypatch, "--coordinates", "64")
    payload = json.loads((results / "lstm_step_parts.json").read_text())
    assert payload["two_layer_step_same_bits"] is True
    assert "are bitwise equal before and after" in (results / "lstm_step_parts.md").read_text()


def test_lstm_fused_gemm_runs_the_candidate_it_times(results: Path, monkeypatch) -> None:
    """The candidate replaces ``lstm_step._layer_forward``, which the step calls only with the
    fused CPU kernel off: with it on (the library's default since), both sides ran that kernel
    and the candidate never ran."""
    import lstm_fused_gemm

    monkeypatch.delenv("LEARNEDOPT_COMPILE")  # as the script runs: compiled, the kernel on
    monkeypatch.delenv("LEARNEDOPT_CPU_KERNEL", raising=False)
    calls = []

    def candidate(*args):  # the candidate's computation, eager (max_autotune compiles for minutes)
        calls.append(1)
        return lstm_fused_gemm.fused_layer(*args)

    monkeypatch.setattr(lstm_fused_gemm, "_fused", candidate)
    try:
        run_main(lstm_fused_gemm, monkeypatch, "--meta-batch", "1", "--unroll", "1", "--repeats", "1", "--tag", "t")
    except SystemExit as exit_:  # no MNIST here
        pytest.skip(str(exit_.code))
    assert calls
    payload = json.loads((results / "lstm_fused_gemm_t.json").read_text())
    assert len(payload["seconds"]) == 2 and all(len(s) == 1 for s in payload["seconds"].values())


def test_fewshot_omniglot_exits_when_a_job_fails(tmp_path: Path) -> None:
    """Each method runs in its own process; one that failed (here: no Omniglot data) never put
    its row, and the parent waited for it forever."""
    import os
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "fewshot.py"
    env = {**os.environ, "LEARNEDOPT_DATA": str(tmp_path)}
    command = [sys.executable, str(script), "omniglot", "--methods", "maml", "--ways", "2", "--iterations", "1"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("fewshot.py: error: the maml 2-way job exited"), done.stderr[-2000:]


TAGGED = [
    ("lstm_chunk", ["--chunk", "64", "--threads", "1"], "time_call"),
    ("lstm_step_parts", ["--coordinates", "64"], "time_call"),
    ("first_step", ["--threads", "1"], "first_steps"),
    ("distributed_scaling", ["--configs", "1x1", "2x1", "--meta-steps", "2"], "run"),
]


COMPILED = {"lstm_chunk", "lstm_step_parts"}  # they time torch.compile's C++ code or the fused CPU kernel


@pytest.mark.parametrize(
    "script, argv, slow", [pytest.param(*t, id=t[0], marks=needs_compiler if t[0] in COMPILED else ()) for t in TAGGED]
)
def test_tag_names_the_results_files(script: str, argv: list[str], slow: str, results: Path, monkeypatch) -> None:
    """Without ``--tag`` every run of these (a smaller ``--chunk``, another host) wrote over the
    committed results; the timing itself is stubbed here."""
    module = importlib.import_module(script)
    stubs = {
        "time_call": lambda fn, **kwargs: (fn(), 1e-3)[1],
        "first_steps": lambda env, threads: [1.0, 2e-3, 1e-3],
        "run": lambda procs, threads, args, out: {"seconds_per_meta_step": 1.0 / procs, "meta_steps_per_s": float(procs),
                                                  "wall_s": 3.0, "per_step_seconds": [2.0, 1.0 / procs]},
    }  # fmt: skip
    monkeypatch.setattr(module, slow, stubs[slow])
    run_main(module, monkeypatch, *argv, "--tag", "t")
    assert sorted(p.name for p in results.iterdir()) == [f"{script}_t.json", f"{script}_t.md"]


def test_fewshot_sinusoid_writes_every_file_under_results_with_its_tag(results: Path, monkeypatch) -> None:
    """The plot went to the folder ``common.RESULTS`` named at import (the committed one) whatever
    it was at the run, and without ``--tag`` a small run replaced the committed files."""
    import fewshot

    run_main(fewshot, monkeypatch, "sinusoid", "--iterations", "1", "--test-tasks", "1", "--shots", "1", "--tag", "t")
    assert sorted(p.name for p in results.iterdir()) == [f"fewshot_sinusoid_t.{ext}" for ext in ("json", "md", "png")]


def test_lr_sensitivity_and_optimizee_eval_write_where_common_results_says(results: Path, monkeypatch, capsys) -> None:
    """Both took the results folder that ``common.RESULTS`` named at import: ``optimizee_eval.py``
    kept its run records there (and ``lr_sensitivity.py`` checked ``--name`` and said it wrote
    there) while the report went to ``common.RESULTS`` at the run (both imported at the top of
    this file, before ``results`` redirected it)."""
    seen = []
    monkeypatch.setattr(optimizee_eval, "run_cli", lambda args, out_dir, **kwargs: seen.append(Path(out_dir)) or 0)
    monkeypatch.setattr(sys, "argv", ["optimizee_eval.py", "--problems", "quadratic-20"])
    optimizee_eval.main()
    assert seen == [results]

    reference = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "optimizee_eval.json"
    run_main(lr_sensitivity, monkeypatch, "--problems", "quadratic-20", "--seeds", "10", "--lrs", "1", "--name", "p",
             "--reference", str(reference))  # fmt: skip
    assert sorted(p.name for p in results.iterdir()) == ["p.json", "p.md"]
    assert f"wrote {results / 'p'}.json and .md" in capsys.readouterr().out


def test_write_results_keeps_a_command_with_a_backtick_in_one_code_span(results: Path, monkeypatch) -> None:
    """An argument with a backtick (a weight file or ``--tag`` named so) ended the command's
    inline code early, and the rest of the command showed as Markdown; the span's fence is
    now longer than any backtick run in the command."""
    argv = ["benchmarks/optimizee_eval.py", "--weights", "my`weights.safetensors", "--name", "r"]
    monkeypatch.setattr(sys, "argv", argv)
    common.write_results("r", {"a": 1}, "table")
    command = json.loads((results / "r.json").read_text())["command"]
    assert f"Command: ``{command}``  " in (results / "r.md").read_text().splitlines()


def test_write_ab_results_keeps_a_revision_preset_and_task_with_backticks_in_their_code_spans(results: Path) -> None:
    """``kernel_ab.py``/``revision_ab.py`` put ``--against``, ``--preset`` and ``--task`` (a
    ``module:Class`` of one's own, a weight file) in inline code as given: a backtick ended it."""
    import argparse

    args = argparse.Namespace(against="rev`1", preset="my`rule.safetensors", task="quadratic", meta_batch=2, unroll=2,
                              rounds=1, threads=1, tag=None)  # fmt: skip
    common.write_ab_results("ab", args, {"baseline": [2.0], "working tree": [1.0]}, True, "against it", "source")
    text = (results / "ab.md").read_text()
    assert "of preset ``my`rule.safetensors`` meta-training on `quadratic`," in text, text
    assert "the source at ``rev`1`` against it, 1 rounds." in text, text


def test_fewshot_omniglot_model_scores_on_the_alphabets_its_model_file_records(results: Path, monkeypatch) -> None:
    """``fewshot.py omniglot-model`` drew the library's fixed split again (``torch.randperm`` with
    its seed) instead of reading the alphabets the model file records: a torch whose randperm
    changed would score a model on alphabets it was trained on. The recorded ones are used."""
    from types import SimpleNamespace

    import fewshot

    import learnedopt.data
    import learnedopt.meta.fewshot

    recorded = {"meta_train": ["Greek"], "meta_valid": ["Latin"], "meta_test": ["Sanskrit"]}
    header = dict(
        architecture={"ways": 5, "image_size": 28, "hidden": 64},
        meta_train_config={"meta_steps": 1, "meta_batch": 1, "same_alphabet": False, "val_tasks": 1},
        omniglot_split=recorded, test_inner_steps=1, algo="maml", command="learnedopt meta-train ...",
        validation={"initial": {}, "final": {}},
    )  # fmt: skip
    monkeypatch.setattr(learnedopt.meta.fewshot, "load_learner", lambda path: (object(), header))
    monkeypatch.setattr(fewshot, "_adapter", lambda *args: None)
    data = SimpleNamespace(alphabets=["Greek", "Latin", "Sanskrit"], alphabet_of_class=torch.tensor([0, 1, 2]))
    monkeypatch.setattr(learnedopt.data, "load_omniglot", lambda **kwargs: data)
    named = []

    def splits(data, valid, test):
        named.append((valid, test))
        return {"meta_train": torch.tensor([0]), "meta_valid": torch.tensor([1]), "meta_test": torch.tensor([2])}

    monkeypatch.setattr(fewshot, "omniglot_class_splits", splits)
    monkeypatch.setattr(fewshot, "_evaluate_omniglot", lambda *args: (50.0, 1.0))
    run_main(fewshot, monkeypatch, "omniglot-model", "model.safetensors", "--tag", "t", "--test-episodes", "1")
    assert named == [(["Latin"], ["Sanskrit"])]


def test_write_ab_results_median_of_an_even_number_of_rounds(results: Path) -> None:
    """The median of each side's rounds was ``sorted(t)[len(t) // 2]``: for an even ``--rounds``
    the upper of the two middle values (for 2 rounds, the slower), not the median."""
    import argparse

    args = argparse.Namespace(against="REV", preset=None, task="quadratic", meta_batch=2, unroll=2, rounds=4, threads=1, tag=None)
    times = {"baseline": [4.0, 1.0, 2.0, 3.0], "working tree": [1.0, 2.0, 1.0, 2.0]}
    common.write_ab_results("ab", args, times, True, "against it", "source")
    row = json.loads((results / "ab.json").read_text())["rows"][0]
    assert row["median_seconds"] == {"baseline": 2.5, "working tree": 1.5}
    assert row["median_speedup"] == 2.5 / 1.5
    text = (results / "ab.md").read_text()
    assert "| baseline | 1.000 | 2.500 |" in text and "| working tree | 1.000 | 1.500 |" in text
    assert f"{2.5 / 1.5:.2f}x (median)" in text


def test_machine_records_the_commit_of_the_benchmarks_repository_from_any_directory(tmp_path: Path, monkeypatch) -> None:
    """``git`` ran in the current directory: a benchmark started from outside the repository
    (``python /path/to/benchmarks/X.py``) recorded no commit, and one started from another
    repository recorded that repository's commit (and its dirt) as the code that ran."""
    import subprocess

    root = Path(common.__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    here = common.machine()["commit"]
    other = tmp_path / "other"
    other.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=other, check=True)
    for folder in (tmp_path, other):
        monkeypatch.chdir(folder)
        commit = common.machine()["commit"]
        assert commit == here and commit.split("+")[0] == head, (folder, commit)


def test_distributed_scaling_refuses_a_single_meta_step(results: Path, monkeypatch, capsys) -> None:
    """The first meta-step (warm-up) is dropped, but with ``--meta-steps 1`` there was nothing
    else: the warm-up was reported as the steady meta-step under a table saying 'first dropped'."""
    import distributed_scaling

    monkeypatch.setattr(distributed_scaling, "run", lambda *args: pytest.fail("ran a job"))
    with pytest.raises(SystemExit) as exit_:
        run_main(distributed_scaling, monkeypatch, "--configs", "1x1", "--meta-steps", "1")
    assert exit_.value.code == 2
    assert "--meta-steps must be at least 2" in capsys.readouterr().err


def test_fewshot_omniglot_records_the_threads_its_jobs_ran_on(results: Path, monkeypatch) -> None:
    """Each method trains and is tested in a job process of ``--threads-per-job`` threads; the
    results' machine record took the parent's count (torch's default: every core), so a run of
    1-thread jobs on a 2-core host was recorded as run on 2 threads."""
    import multiprocessing
    import queue as queues
    from types import SimpleNamespace

    import fewshot

    class InProcess:  # the job runs here, at once; it sets no thread count of its own
        def __init__(self, target, args):
            self.target, self.args, self.exitcode = target, args, 0

        def start(self):
            self.target(*self.args)

        def is_alive(self):
            return False

        def join(self):
            pass

    def job(method, ways, args, queue):
        queue.put(dict(method=method, ways=ways, seconds_per_meta_step=1.0, peak_rss_mb=1.0, config={},
                       accuracy={f"{ways}-way 1-shot": {"mean": 50.0, "ci95": 1.0}}, test_alphabets=["Latin"]))  # fmt: skip

    monkeypatch.setattr(multiprocessing, "get_context", lambda method: SimpleNamespace(Queue=queues.Queue, Process=InProcess))
    monkeypatch.setattr(fewshot, "_omniglot_job", job)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_main(fewshot, monkeypatch, "omniglot", "--methods", "maml", "--ways", "5", "--threads-per-job", "1", "--tag", "t")
    finally:
        torch.set_num_threads(before)
    payload = json.loads((results / "fewshot_omniglot_t.json").read_text())
    assert payload["machine"]["threads"] == 1
    assert "'threads': 1" in (results / "fewshot_omniglot_t.md").read_text()


def test_kernel_ab_refuses_a_baseline_that_computes_another_meta_gradient(tmp_path: Path, monkeypatch, capsys) -> None:
    """Any difference in the meta-gradients' bits was reported as "differ (other rounding)" and
    both builds timed as the same work, however large: a baseline kernel whose sigmoid is off by
    0.1 computes another meta-gradient, and nothing is written."""
    import kernel_ab

    from learnedopt.kernels import lstm_layer_cpu

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.delenv("LEARNEDOPT_COMPILE", raising=False)
    source = lstm_layer_cpu.SOURCE.read_text()
    sigmoid = "bc(1.0f) / (bc(1.0f) + vexp(-z))"
    monkeypatch.setattr(kernel_ab, "source_at", lambda revision: source.replace(sigmoid, f"({sigmoid} + bc(0.1f))"))
    with pytest.raises(SystemExit) as exit_:
        run_main(kernel_ab, monkeypatch, "--against", "REV", "--task", "quadratic", "--unroll", "2", "--rounds", "1")
    assert exit_.value.code not in (0, None)
    assert "do not compute the same meta-gradient; nothing written" in str(exit_.value.code)
    assert list(tmp_path.iterdir()) == []
    assert lstm_layer_cpu.SOURCE.read_text() == source


def test_revision_ab_refuses_a_baseline_that_computes_another_meta_gradient(results: Path, monkeypatch) -> None:
    """Any difference in the meta-gradients' bits was reported as "differ (other rounding)" and
    both sides timed as the same work, however large: a baseline whose rule scales its step by
    1.1 computes another meta-gradient, and nothing is written."""
    import revision_ab

    scale = "head * self.config.output_scale"
    monkeypatch.setattr(revision_ab, "tree_at", lambda revision, folder: copy_of_library(folder, (scale, f"{scale} * 1.1")))
    with pytest.raises(SystemExit) as exit_:
        run_main(revision_ab, monkeypatch, "--against", "REV", "--task", "quadratic", "--unroll", "2", "--rounds", "1")
    assert "do not compute the same meta-gradient; nothing written" in str(exit_.value.code)
    assert list(results.iterdir()) == []


def test_relative_difference_of_meta_gradients() -> None:
    """Rounding passes, a NaN or weights of another rule do not (``kernel_ab``/``revision_ab``)."""
    a = [torch.tensor([1.0, 2.0]), torch.zeros(3)]
    assert common.relative_difference(a, a) == 0.0  # a weight without a gradient on both sides
    assert 0 < common.relative_difference([a[0] * (1 + 1e-6), a[1]], a) <= common.AB_TOLERANCE
    assert math.isnan(common.relative_difference([a[0] * math.nan, a[1]], a))
    assert common.relative_difference([a[0]], a) == math.inf
    assert common.relative_difference([a[0], torch.zeros(4)], a) == math.inf


def test_maml_memory_records_the_one_thread_its_cells_ran_on(results: Path, monkeypatch) -> None:
    """Each cell runs in a process of one thread; the results' machine record took the parent's
    count (torch's default without OMP_NUM_THREADS: every core)."""
    import subprocess
    from types import SimpleNamespace

    import maml_memory

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: SimpleNamespace(stdout='{"peak_rise_mb": 1.0, "seconds": 0.5}\n'))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_main(maml_memory, monkeypatch, "--steps", "1", "--modes", "first-order", "--name", "m")
    finally:
        torch.set_num_threads(before)
    payload = json.loads((results / "m.json").read_text())
    assert payload["results"] == {"first-order": {"1": {"peak_rise_mb": 1.0, "seconds": 0.5}}}
    assert payload["machine"]["threads"] == 1


def test_write_ab_results_records_the_commit_the_baseline_revision_named(results: Path) -> None:
    """``--against`` was recorded as given: a branch name or ``HEAD~1`` named another commit once
    the branch moved, and the results no longer said which code was the baseline."""
    import argparse
    import subprocess

    root = Path(common.__file__).resolve().parents[1]
    parent = subprocess.run(["git", "rev-parse", "--short", "HEAD~1"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    for against, commit in (("HEAD~1", parent), ("no-such-revision-xyz", None)):
        args = argparse.Namespace(against=against, preset=None, task="quadratic", meta_batch=2, unroll=2, rounds=1, threads=1, tag=None)
        common.write_ab_results("ab", args, {"baseline": [2.0], "working tree": [1.0]}, True, "against it", "source")
        row = json.loads((results / "ab.json").read_text())["rows"][0]
        assert row["against"] == against and row["against_commit"] == commit
        assert (f"at `{against}` (`{commit}`)" in (results / "ab.md").read_text()) is (commit is not None)


def test_results_tag_refuses_what_cannot_end_a_results_file_name(results: Path) -> None:
    """``--tag`` is checked when parsed, not when the results are written after the run."""
    import argparse

    parse = common.results_tag("cpu_step")
    assert parse("") == "" and parse("host2") == "host2"
    for tag, message in (("a/b", "a suffix of the results file name, not a path: 'a/b'"),
                         ("x" * 300, "the results file name is too long: 309 bytes"),  # with the prefix cpu_step_
                         ("dir", "is a folder, where the report's json file would be written")):  # fmt: skip
        (results / "cpu_step_dir.json").mkdir(exist_ok=True)
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
            parse(tag)


@pytest.mark.parametrize("argv, message", [
    (["--task", "bogus"], "unknown task 'bogus'; choose from quadratic"),
    (["--task", "quadratic", "--preset", "bogus"], "unknown preset 'bogus'"),
])
def test_revision_ab_refuses_a_bad_task_or_preset_before_a_worker_starts(argv: list[str], message: str, results: Path, monkeypatch, capsys) -> None:
    """They were found in the workers, each ending in a traceback above 'a truncation worker ended'."""
    import revision_ab

    monkeypatch.setattr(revision_ab, "tree_at", lambda *a: pytest.fail("checked out the baseline"))
    monkeypatch.setattr(revision_ab, "Side", lambda *a: pytest.fail("started a worker"))
    with pytest.raises(SystemExit) as exit_:
        run_main(revision_ab, monkeypatch, "--against", "HEAD", *argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("revision_ab.py: error: ") and message in err, err


def test_distinct_names_the_values_given_more_than_once(capsys) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="bench.py")
    parser.add_argument("--sizes", type=int, nargs="+", action=common.Distinct)
    assert parser.parse_args(["--sizes", "3", "1", "2"]).sizes == [3, 1, 2]
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--sizes", "3", "1", "3", "1", "2"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == "bench.py: error: argument --sizes: each value once, got 1, 3 more than once"


def test_fewshot_omniglot_model_refuses_an_ensemble_holding_one_model_twice(tmp_path: Path, results: Path, monkeypatch, capsys) -> None:
    """As ``learnedopt evaluate omniglot-runs``: the ensemble's average would weigh it double."""
    import fewshot

    from learnedopt.meta.fewshot import FewShotLearner, LearnerSpec, save_learner

    spec = LearnerSpec(algo="maml", architecture={"kind": "conv4", "in_channels": 1, "ways": 5, "hidden": 4, "image_size": 28},
                       loss="cross_entropy", inner_steps=1, test_inner_steps=1, inner_lr=0.4)  # fmt: skip
    model = tmp_path / "model.safetensors"
    save_learner(FewShotLearner(spec, seed=0), model)
    monkeypatch.setattr(fewshot, "omniglot_model", lambda *a, **k: pytest.fail("scored the ensemble"))
    with pytest.raises(SystemExit) as exit_:
        run_main(fewshot, monkeypatch, "omniglot-model", str(model), str(model), "--tag", "t")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{model} holds the same model as {model}: given twice, it would weigh double" in err, err


def test_distributed_scaling_configs_are_bounded_thread_counts_in_one_spelling() -> None:
    """``--configs PxT``: P processes (torchrun's --nproc_per_node) and T threads (OMP_NUM_THREADS)
    took any count, 10**20 processes included, and ``1x01`` ran ``1x1`` again as another config."""
    import argparse

    import distributed_scaling

    from learnedopt.cli import most_threads

    assert distributed_scaling.pxt("2x1") == "2x1" and distributed_scaling.pxt("01x002") == "1x2"
    for text in ("0x1", "1x0", "1y1", "x1", f"{most_threads() + 1}x1", "1x100000000000000000000"):
        with pytest.raises(argparse.ArgumentTypeError, match="is not PxT"):
            distributed_scaling.pxt(text)


def test_results_dir_is_a_folder_made_with_its_parents(tmp_path: Path, monkeypatch) -> None:
    """``--results-dir`` (fewshot.py higher, kernel_bench.py, kernel_resources.py) was first used
    when the results were written, after the run: a file there stopped it with FileExistsError, a
    folder in a missing one with FileNotFoundError. A file is refused when parsed; missing folders
    are made."""
    import argparse

    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(argparse.ArgumentTypeError, match="a_file is a file, not a folder"):
        common.results_dir(str(a_file))
    assert common.results_dir(str(tmp_path / "new" / "results")) == tmp_path / "new" / "results"
    monkeypatch.setattr(common, "RESULTS", tmp_path / "new" / "results")
    common.write_results("x", {}, "table")
    assert (tmp_path / "new" / "results" / "x.json").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--hidden", "1000000000"], "--hidden 1000000000: the conv-4's (hidden, hidden, 3, 3) weights would have"),
    (["--meta-batch", "1000000000000000000000"], "--meta-batch 1000000000000000000000 and --shots 1"),
])
def test_fewshot_omniglot_refuses_a_bad_setting_before_a_job_starts(argv: list[str], message: str, results: Path, monkeypatch, capsys) -> None:
    """Each (method, ways) job validated its settings itself: a bad one ended the job in a
    ConfigError traceback, then 'the job exited without a result'. They are validated first."""
    import fewshot

    monkeypatch.setattr(fewshot, "_omniglot_job", lambda *a: pytest.fail("started a job"))
    with pytest.raises(SystemExit) as exit_:
        run_main(fewshot, monkeypatch, "omniglot", "--methods", "maml", "--ways", "5", *argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fewshot.py omniglot: error: ") and message in err, err


@pytest.mark.parametrize(("seed", "cell_seeds"), [(0, [1, 1, 2]), (2**64 - 2, [2**64 - 1, 2**64 - 1, 0]), (2**64 - 1, [0, 0, 1])])
def test_fewshot_omniglot_test_cells_take_every_seed_the_option_takes(monkeypatch, seed: int, cell_seeds: list[int]) -> None:
    """``--seed`` (common.seed_arg) takes 0 .. 2**64 - 1, but the test cells sampled episodes with
    ``seed + 1`` and ``seed + 2``: 2**64 - 1 or 2**64 - 2 stopped ``fewshot.py omniglot`` in
    EpisodeSampler ('seed must be an integer from -2**63 to 2**64 - 1') after the whole training
    (``omniglot-model`` in its first cell). The cells' seeds wrap modulo 2**64; others are unchanged."""
    from types import SimpleNamespace

    import fewshot

    import learnedopt.data
    from learnedopt.values import seeded_generator

    data = SimpleNamespace(alphabets=["Greek"], alphabet_of_class=torch.tensor([0, 0]))
    monkeypatch.setattr(learnedopt.data, "load_omniglot", lambda **kwargs: data)
    monkeypatch.setattr(fewshot, "omniglot_class_splits", lambda data, *named: {"meta_test": torch.tensor([0, 1])})
    seen = []

    def evaluate(adapt, data, classes, ways, shots, episodes, seed, same_alphabet):
        seeded_generator(seed)  # what EpisodeSampler seeds its generator with: refuses a seed out of range
        seen.append(seed)
        return 50.0, 1.0

    monkeypatch.setattr(fewshot, "_evaluate_omniglot", evaluate)
    fewshot._test_cells(None, 20, 1, seed)
    assert seen == cell_seeds
