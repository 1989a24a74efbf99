"""``learnedopt evaluate optimizers --resume``: each training run recorded as it ends, a killed
evaluation continued to the report of an uninterrupted one, and a changed configuration refused."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import folder_locked_by_another_run, importable_module

from learnedopt.evaluation import QuadraticProblem, add_evaluate_optimizers_parser, harness
from learnedopt.evaluation.records import RunRecords, records_folder
from learnedopt.evaluation.report import dumps_report

REPO = Path(__file__).resolve().parents[1]
RUN_OPTIMIZER = harness.run_optimizer
#: two problems by name, cut to 20 steps; the four baselines and one preset; 2 seeds, 1 tuning seed, 2 lrs
ARGS = ["--quick", "--problems", "quadratic-20", "synthetic-mlp", "--presets", "l2l-blend", "--lrs", "0.01", "0.1",
        "--stability-steps", "12"]  # fmt: skip
#: runs of ARGS: per problem 4 baselines x (2 lrs x 1 tuning seed + 2 seeds) + 2 of the preset; 1 stability run
RUNS = 2 * (4 * (2 + 2) + 2) + 1


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _stability_without_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stability check trains the MNIST MLP: a quadratic stands in for it (no data needed)."""
    real = harness.make_problem

    def make_problem(name, data=None):  # noqa: ANN001, ANN202 - make_problem's own signature
        return QuadraticProblem("stand-in", 3, 5) if name == "mnist-mlp-100" else real(name, data)

    monkeypatch.setattr(harness, "make_problem", make_problem)


def evaluate(argv: list[str], out: Path) -> int:
    """``learnedopt evaluate optimizers ARGV --out OUT`` in this process; its exit code."""
    parser = argparse.ArgumentParser()
    add_evaluate_optimizers_parser(parser.add_subparsers())
    args = parser.parse_args(["optimizers", *argv, "--out", str(out)])
    return args.func(args)


def count_runs(monkeypatch: pytest.MonkeyPatch, stop_after: int | None = None) -> list[int]:
    """Count the harness's training runs (a one-item list); with ``stop_after``, Ctrl-C arrives
    as run ``stop_after + 1`` starts."""
    done = [0]
    real = RUN_OPTIMIZER

    def run(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - run_optimizer's own
        if done[0] == stop_after:
            raise KeyboardInterrupt
        done[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(harness, "run_optimizer", run)
    return done


def report_without_times(path: Path) -> str:
    """The report's JSON text with its wall-clock fields (``seconds``) removed."""

    def strip(value):  # noqa: ANN001, ANN202
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "seconds"}
        return value

    # NaN and Infinity kept as their tokens: a float NaN is unequal to itself
    return dumps_report(strip(json.loads(path.read_text(), parse_constant=lambda token: token)))


@pytest.mark.parametrize(("stop_after", "workers"), [(1, 1), (13, 2), (RUNS - 1, 1)])
def test_a_killed_evaluation_resumes_to_the_report_of_an_uninterrupted_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], stop_after: int, workers: int
) -> None:
    # stopped after its first run, in the middle of a baseline's lr tuning (resumed in worker
    # processes, which read and write the records too), before the stability run
    argv = ARGS if workers == 1 else [*ARGS, "--stability-steps", "0"]  # workers make the real stability problem
    command = ["learnedopt", "evaluate", "optimizers", *argv, *(["--workers", "2"] if workers == 2 else [])]
    monkeypatch.setattr(sys, "argv", command)  # the report's command, as the shell gave it
    assert evaluate(argv, tmp_path / "whole") == 0
    assert not records_folder(tmp_path / "whole", "optimizee_eval").exists()  # removed with the report written
    capsys.readouterr()

    done = count_runs(monkeypatch, stop_after=stop_after)
    assert evaluate(argv, tmp_path / "resumed") == 130
    err = capsys.readouterr().err
    folder = records_folder(tmp_path / "resumed", "optimizee_eval")
    assert f"the {stop_after} runs finished are recorded in {folder}: --resume continues from them" in err
    assert RunRecords(folder).count() == stop_after and not (tmp_path / "resumed" / "optimizee_eval.json").exists()

    done = count_runs(monkeypatch)
    monkeypatch.setattr(sys, "argv", [*command, "--resume"])  # reported as the command without it
    assert evaluate([*argv, "--resume", "--workers", str(workers)], tmp_path / "resumed") == 0
    if workers == 1:  # the count sees this process's runs
        assert done[0] == RUNS - stop_after  # only the runs not recorded
    assert f"--resume: continuing from the {stop_after} runs recorded in {folder}" in capsys.readouterr().err
    whole, resumed = (report_without_times(tmp_path / out / "optimizee_eval.json") for out in ("whole", "resumed"))
    assert resumed == whole
    assert not folder.exists()


def test_a_resume_of_another_configuration_is_refused_naming_the_option(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    count_runs(monkeypatch, stop_after=5)
    assert evaluate(ARGS, tmp_path) == 130
    capsys.readouterr()
    monkeypatch.setattr(harness, "run_optimizer", lambda *a, **k: pytest.fail("a run started"))
    folder = records_folder(tmp_path, "optimizee_eval")
    for argv, message in (
        ([*ARGS, "--seeds", "3", "--resume"], "--resume: the configuration differs from the recorded runs' (--seeds: 2 -> 3)"),
        ([*ARGS, "--lrs", "0.01", "0.2", "--resume"], "(--lrs: [0.01, 0.1] -> [0.01, 0.2])"),
        ([*ARGS, "--lr-schedule", "cosine", "--resume"], "(--lr-schedule: 'constant' -> 'cosine')"),
        ([*ARGS, "--presets", "--resume"], "(--presets: ['l2l-blend'] -> [])"),
        # a run of this name and folder without --resume would start again over 5 finished runs
        (ARGS, f"{folder} holds the runs of an unfinished evaluation (5 recorded): pass --resume to continue it"),
        ([*ARGS, "--resume", "--name", "other"], f"--resume: no unfinished evaluation to continue ({tmp_path / 'other.runs'} does not exist"),
    ):  # fmt: skip
        assert evaluate(argv, tmp_path) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)
    assert RunRecords(folder).count() == 5
    if sys.platform != "win32":  # a second process on the same records (launched twice, or a --resume of a live run)
        with folder_locked_by_another_run(folder):
            assert evaluate([*ARGS, "--resume"], tmp_path) == 2
        assert f"{folder} is in use by another evaluate optimizers process" in capsys.readouterr().err
    # the weights and the MNIST files by content: the same paths may hold other ones
    records = RunRecords(folder)
    saved = json.loads((folder / "settings.json").read_text())
    settings = {k: v for k, v in saved.items() if k != "format"}
    records.check(settings, resume=True)
    label = "LSTMOptimizer (l2l-blend, default)"
    other = {**settings, "weights_sha256": {label: "f" * 64}}
    with pytest.raises(ValueError, match=re.escape(f"--resume: the weights of {label} differ from those the recorded runs used (SHA-256 ")):
        records.check(other, resume=True)
    with pytest.raises(ValueError, match="--resume: the recorded runs read other MNIST files"):
        records.check({**settings, "mnist_sha256": "0" * 64}, resume=True)
    # where MNIST is read from may change; what it holds decides
    records.check({**settings, "config": {**settings["config"], "data": "elsewhere"}}, resume=True)


def test_a_kill_after_the_report_before_removing_its_runs_leaves_no_unfinished_evaluation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Killed between writing the report and removing NAME.runs/: the plain command again was
    refused as an unfinished evaluation. Its report is whole and newer than every record, so the
    runs are stale: the plain command removes them and runs afresh (and --resume still rewrites the
    report from them); runs recorded after a report are an unfinished evaluation's, still refused."""
    from learnedopt.evaluation import cli as evaluate_cli

    class Killed(BaseException):
        pass

    def killed(path: object) -> None:
        raise Killed

    folder = records_folder(tmp_path, "optimizee_eval")
    report = tmp_path / "optimizee_eval.json"
    rmtree = shutil.rmtree
    monkeypatch.setattr(evaluate_cli.shutil, "rmtree", killed)
    with pytest.raises(Killed):
        evaluate(ARGS, tmp_path)
    monkeypatch.setattr(evaluate_cli.shutil, "rmtree", rmtree)
    assert RunRecords(folder).count() == RUNS and report.is_file() and report.with_suffix(".md").is_file()
    first = report_without_times(report)
    capsys.readouterr()

    done = count_runs(monkeypatch)
    assert evaluate(ARGS, tmp_path) == 0
    assert done[0] == RUNS  # all run again, none taken from the stale records
    err = capsys.readouterr().err
    assert f"removed the {RUNS} runs in {folder}: {report} was written from them (its evaluation was stopped before it removed them)" in err
    assert not folder.exists() and report_without_times(report) == first

    # the same kill, then --resume: the report again from the records, nothing run
    monkeypatch.setattr(evaluate_cli.shutil, "rmtree", killed)
    with pytest.raises(Killed):
        evaluate(ARGS, tmp_path)
    monkeypatch.setattr(evaluate_cli.shutil, "rmtree", rmtree)
    done = count_runs(monkeypatch)
    assert evaluate([*ARGS, "--resume"], tmp_path) == 0
    assert done[0] == 0 and not folder.exists() and report_without_times(report) == first

    # an evaluation killed after recording runs newer than a report of the same name is unfinished
    count_runs(monkeypatch, stop_after=3)
    assert evaluate(ARGS, tmp_path) == 130
    capsys.readouterr()
    assert evaluate(ARGS, tmp_path) == 2
    assert f"{folder} holds the runs of an unfinished evaluation (3 recorded): pass --resume" in capsys.readouterr().err
    # as is one whose report was cut short by the kill
    report.write_text(report.read_text()[:100])
    os.utime(report.with_suffix(".md"))
    assert evaluate(ARGS, tmp_path) == 2


def test_a_damaged_record_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    count_runs(monkeypatch, stop_after=2)
    assert evaluate(ARGS, tmp_path) == 130
    monkeypatch.setattr(harness, "run_optimizer", RUN_OPTIMIZER)
    folder = records_folder(tmp_path, "optimizee_eval")
    damaged = sorted(p for p in folder.glob("*.json") if p.name != "settings.json")[0]
    good = damaged.read_text()
    damaged.write_text(good[:50])
    capsys.readouterr()
    assert evaluate([*ARGS, "--resume"], tmp_path) == 2
    err = capsys.readouterr().err
    assert f"error: {damaged} is not a run record (JSONDecodeError" in err and "remove it, and --resume runs it again" in err
    assert err.count("\n") == 2  # the --resume line and the error
    # a curve of nulls was read as NaN, a diverged run in a report that looked whole; "0.5" as 0.5
    steps = len(json.loads(good)["curve"])
    for curve in ([None] * steps, ["0.5"] * steps):
        damaged.write_text(json.dumps({**json.loads(good), "curve": curve}))
        assert evaluate([*ARGS, "--resume"], tmp_path) == 2
        assert f"error: {damaged} is not a run record (TypeError: its curve is not a list of numbers)" in capsys.readouterr().err


def test_damaged_settings_of_the_runs_are_refused_in_one_line_naming_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The settings file of the recorded runs left as bytes that are not UTF-8 (an OS crash, a
    disk's damage) was refused with Python's decoding error alone, naming no file; now as a cut one is."""
    count_runs(monkeypatch, stop_after=2)
    assert evaluate(ARGS, tmp_path) == 130
    monkeypatch.setattr(harness, "run_optimizer", RUN_OPTIMIZER)
    settings = records_folder(tmp_path, "optimizee_eval") / "settings.json"
    good = settings.read_bytes()
    capsys.readouterr()
    for damaged, error in ((good[:30], "JSONDecodeError"), (b'{"format": \xff\xfe', "UnicodeDecodeError")):
        settings.write_bytes(damaged)
        assert evaluate([*ARGS, "--resume"], tmp_path) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"learnedopt evaluate optimizers: error: --resume: {settings} is not the settings of an "
                              f"evaluation's runs ({error}: "), err  # fmt: skip
        assert err.count("\n") == 1
    settings.write_bytes(good)
    assert evaluate([*ARGS, "--resume"], tmp_path) == 0


KILLED = '''
import os
import signal

from learnedopt.evaluation import QuadraticProblem


class Killed(QuadraticProblem):
    """quadratic-4 of 8 steps whose process SIGKILLs itself as it builds its KILL_AT-th model."""

    built = 0

    def __init__(self):
        super().__init__("killed", 4, 8)

    def model(self, seed):
        type(self).built += 1
        if type(self).built == int(os.environ.get("KILL_AT", "0")):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().model(seed)
'''


@pytest.fixture
def killed_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An importable module of :data:`KILLED`; returns its name."""
    yield from importable_module(tmp_path, monkeypatch, "killed_problem", KILLED)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="SIGKILL is POSIX's")
def test_an_evaluation_killed_by_sigkill_resumes_to_the_uninterrupted_report(tmp_path: Path, killed_problem: str) -> None:
    module = killed_problem
    argv = ["--problems", f"{module}:Killed", "--seeds", "2", "--tuning-seeds", "1", "--lrs", "0.01", "0.1", "--presets"]
    runs = 4 * (2 + 2)  # 4 baselines x (2 lrs x 1 tuning seed + 2 seeds); no stability check for one's own problem
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "modules"), str(REPO)]), "OMP_NUM_THREADS": "1",
           "KILL_AT": "11"}  # fmt: skip
    killed = subprocess.run(
        [sys.executable, "-m", "learnedopt", "evaluate", "optimizers", *argv, "--out", str(tmp_path / "resumed")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # the 11th model: the two its check builds, then 8 runs ended and recorded, the 9th killed
    folder = records_folder(tmp_path / "resumed", "optimizee_eval")
    assert RunRecords(folder).count() == 8 and not list(folder.glob("*.tmp"))

    assert evaluate([*argv, "--resume"], tmp_path / "resumed") == 0
    assert sys.modules[module].Killed.built == 2 + runs - 8  # the check's two models, and one per run not recorded
    assert evaluate(argv, tmp_path / "whole") == 0
    whole, resumed = (report_without_times(tmp_path / out / "optimizee_eval.json") for out in ("whole", "resumed"))
    assert resumed == whole


def test_two_processes_writing_one_record_at_once_each_rename_a_whole_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker of a killed evaluation may still be writing the record that a worker of its
    ``--resume`` writes. Here the other writes the whole record between this one's write and its
    rename: with one temporary name for both, this rename found no file (its own was renamed by
    the other) and failed the run; in the other order a rename took a file still being written."""
    records = RunRecords(tmp_path)
    key = records.key(QuadraticProblem("q", 3, 5), "Adam", 0.1, 0, "constant")
    curve = torch.arange(5.0, dtype=torch.float64).numpy()
    real_replace = os.replace

    def replace(src, dst):  # noqa: ANN001, ANN202 - os.replace's own
        monkeypatch.setattr(os, "replace", real_replace)
        records.save(key, curve)  # the other process's write, whole
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    records.save(key, curve)
    assert records.load(key).tolist() == curve.tolist()
    assert sorted(p.name for p in tmp_path.iterdir()) == [records.path(key).name]


SLOW = '''
import os
import time
from pathlib import Path

from learnedopt.evaluation import QuadraticProblem


class Slow(QuadraticProblem):
    """quadratic-4 of 400 steps of 50 ms each; a process that builds a model of it creates the
    file $PIDS/<its pid>."""

    def __init__(self, name="slow"):
        super().__init__(name, 4, 400)

    def model(self, seed):
        (Path(os.environ["PIDS"]) / str(os.getpid())).touch()
        return super().model(seed)

    def loss(self, model, seed, step):
        time.sleep(0.05)
        return super().loss(model, seed, step)


class Slow2(Slow):
    def __init__(self):
        super().__init__("slow-2")
'''


@pytest.fixture
def slow_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An importable module of :data:`SLOW`; returns its name."""
    yield from importable_module(tmp_path, monkeypatch, "slow_problem", SLOW)


def running(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, ended and not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the processes' states from /proc (Linux)")
def test_the_workers_of_an_evaluation_killed_by_sigkill_end_with_it(tmp_path: Path, slow_problem: str) -> None:
    """Orphaned workers went on running (and recording) runs beside the ``--resume`` of their
    evaluation; they end within seconds of their parent, here killed mid-run."""
    module = slow_problem
    pids = tmp_path / "pids"
    pids.mkdir()
    argv = ["--problems", f"{module}:Slow", f"{module}:Slow2", "--seeds", "1", "--tuning-seeds", "1", "--lrs", "0.1",
            "--presets", "--workers", "2"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "modules"), str(REPO)]), "OMP_NUM_THREADS": "1",
           "PIDS": str(pids)}  # fmt: skip
    with (tmp_path / "stderr").open("w") as stderr:
        parent = subprocess.Popen(
            [sys.executable, "-m", "learnedopt", "evaluate", "optimizers", *argv, "--out", str(tmp_path / "out")],
            env=env, stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while len(workers) < 2 and parent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
            workers = {int(p.name) for p in pids.iterdir()} - {parent.pid}  # the parent builds one to check it
        assert len(workers) == 2, (tmp_path / "stderr").read_text()
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 5
        while any(map(running, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in workers if running(pid)], "workers outlived their killed parent"
    finally:
        parent.kill()
        parent.wait()
        for pid in workers:
            if running(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_recorded_stability_run_is_reported_read_back_not_announced_as_run(tmp_path: Path) -> None:
    """A resumed evaluation announced "10000 steps on the MNIST MLP ..." for a stability run it
    only reads back from the records."""
    config = harness.EvalConfig(problems=["quadratic-20"], stability_steps=5)
    learned = [spec for spec in harness.DEFAULT_LEARNED if spec.weights == "l2l-blend"]
    logs: list[list[str]] = [[], []]
    first, again = (harness._stability(config, learned, {}, RunRecords(tmp_path), log.append) for log in logs)
    label = learned[0].label
    assert logs[0][0] == f"stability {label}: 5 steps on the MNIST MLP ..."
    assert logs[1][0] == f"stability {label}: 5 steps on the MNIST MLP: recorded, read back (not run again)"
    assert again == first and len(logs[1]) == 2  # and the result line


ORPHAN = """
import os, sys, time
from learnedopt.evaluation import harness
if sys.argv[1] == "poll":  # the way where there is no PR_SET_PDEATHSIG
    harness._parent_death_signal = lambda sig: False
harness._end_with_parent(os.getppid())
print(os.getpid(), flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("way", ["pdeathsig", "poll"])
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the processes' states from /proc (Linux)")
def test_a_process_that_asked_to_end_with_its_parent_ends_when_it_is_killed(tmp_path: Path, way: str) -> None:
    """Both ways of :func:`harness._end_with_parent`: the kernel's signal, and the thread that
    polls ``os.getppid`` (the one of systems without it, tried here on Linux)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    child = [sys.executable, "-c", ORPHAN, way]
    # the parent: starts the child, passes on its pid, and waits
    parent_code = f"import subprocess, sys, time; subprocess.Popen({child!r}); time.sleep(60)"
    parent = subprocess.Popen([sys.executable, "-c", parent_code], env=env, stdout=subprocess.PIPE, text=True)
    pid = None
    try:
        pid = int(parent.stdout.readline())
        assert running(pid)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 5
        while running(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not running(pid), "the child outlived its killed parent"
    finally:
        parent.kill()
        parent.wait()
        if pid is not None and running(pid):
            os.kill(pid, signal.SIGKILL)


def test_ctrl_c_while_the_report_is_written_keeps_the_runs_for_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # it was a KeyboardInterrupt traceback, which did not say that --resume writes the report
    from learnedopt.evaluation import cli

    real = cli.write_report

    def interrupted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - write_report's own
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "write_report", interrupted)
    assert evaluate(ARGS, tmp_path) == 130
    folder = records_folder(tmp_path, "optimizee_eval")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"learnedopt evaluate optimizers: interrupted while writing the report; every run is recorded in {folder}: "
                   "--resume writes the report from them, running nothing")  # fmt: skip
    assert RunRecords(folder).count() == RUNS
    monkeypatch.setattr(cli, "write_report", real)
    monkeypatch.setattr(harness, "run_optimizer", lambda *a, **k: pytest.fail("a recorded run ran again"))
    assert evaluate([*ARGS, "--resume"], tmp_path) == 0
    assert (tmp_path / "optimizee_eval.json").is_file() and not folder.exists()


def test_a_report_that_cannot_be_written_keeps_the_runs_for_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # a full disk when the report was written, after every run: an OSError traceback that did not
    # say the runs are kept and --resume writes the report
    from learnedopt.evaluation import cli

    real = cli.write_report

    def disk_full(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - write_report's own
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli, "write_report", disk_full)
    assert evaluate(ARGS, tmp_path) == 1
    folder = records_folder(tmp_path, "optimizee_eval")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"learnedopt evaluate optimizers: error: cannot write the report in {tmp_path} (No space left on device); "
                   f"every run is recorded in {folder}: --resume writes the report from them, running nothing")  # fmt: skip
    assert RunRecords(folder).count() == RUNS
    monkeypatch.setattr(cli, "write_report", real)
    monkeypatch.setattr(harness, "run_optimizer", lambda *a, **k: pytest.fail("a recorded run ran again"))
    assert evaluate([*ARGS, "--resume"], tmp_path) == 0
    assert (tmp_path / "optimizee_eval.json").is_file() and not folder.exists()


def test_a_run_that_cannot_be_recorded_is_one_line_and_resume_continues(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # a full disk while a run was recorded: an OSError traceback mid-evaluation
    from learnedopt.evaluation import records as records_module

    real = records_module.write_atomically
    saved = [0]

    def fills_up(path, write, **kwargs):  # noqa: ANN001, ANN003, ANN202 - write_atomically's own
        if path.name != "settings.json":
            if saved[0] == 5:
                raise OSError(28, "No space left on device")
            saved[0] += 1
        return real(path, write, **kwargs)

    monkeypatch.setattr(records_module, "write_atomically", fills_up)
    assert evaluate(ARGS, tmp_path) == 1  # as a report or meta-train file that cannot be written
    folder = records_folder(tmp_path, "optimizee_eval")
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"learnedopt evaluate optimizers: error: cannot record a run in {folder} (No space left on device): "
                              "the 5 runs finished before it are recorded; --resume continues from them"), err[-1]  # fmt: skip
    assert RunRecords(folder).count() == 5
    monkeypatch.setattr(records_module, "write_atomically", real)
    ran = count_runs(monkeypatch)
    assert evaluate([*ARGS, "--resume"], tmp_path) == 0
    assert ran[0] == RUNS - 5 and not folder.exists()


@pytest.mark.parametrize("resume", [False, True])
def test_settings_that_cannot_be_recorded_are_one_line_before_any_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], resume: bool
) -> None:
    # a full disk as the settings were written, before the first run: an OSError traceback
    from learnedopt.evaluation import records as records_module

    if resume:
        count_runs(monkeypatch, stop_after=3)
        assert evaluate(ARGS, tmp_path) == 130
    real = records_module.write_atomically

    def full_disk(path, write, **kwargs):  # noqa: ANN001, ANN003, ANN202 - write_atomically's own
        if path.name == "settings.json":
            raise OSError(28, "No space left on device")
        return real(path, write, **kwargs)

    monkeypatch.setattr(records_module, "write_atomically", full_disk)
    ran = count_runs(monkeypatch)
    capsys.readouterr()
    assert evaluate([*ARGS, "--resume"] if resume else ARGS, tmp_path) == 1
    folder = records_folder(tmp_path, "optimizee_eval")
    kept = ("the 3 runs finished before it are recorded; --resume continues from them" if resume
            else "no run has started: run the command again once it can write")  # fmt: skip
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"learnedopt evaluate optimizers: error: cannot record the settings of the runs in {folder} "
        f"(No space left on device): {kept}"
    )
    assert ran == [0] and RunRecords(folder).count() == (3 if resume else 0)
    monkeypatch.setattr(records_module, "write_atomically", real)
    assert evaluate([*ARGS, "--resume"] if resume else ARGS, tmp_path) == 0
    assert ran[0] == RUNS - (3 if resume else 0)


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs the git checkout")
def test_the_runs_of_an_unfinished_benchmark_evaluation_are_ignored_by_git() -> None:
    # benchmarks/optimizee_eval.py records its runs in benchmarks/results/NAME.runs/ (some 16 MB for
    # the suite): a killed run left them untracked beside the committed results, one `git add` from a commit
    folder = records_folder(REPO / "benchmarks" / "results", "optimizee_eval")
    ignored = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", str(folder / "0123abcd.json")], check=False)
    assert ignored.returncode == 0
