"""The evaluation harness: every baseline tuned and run, every learned optimizer run, on each
problem (in worker processes if asked), and the long stability check."""

from __future__ import annotations

import ctypes
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ..data.idx import mnist_sha256
from ..values import MAX_ELEMENTS, is_integer, is_number
from ..plugins import entry_point_path
from .problems import DEFAULT_PROBLEMS, PROBLEMS, Problem, check_problem, make_problem
from .records import RunRecords
from .report import check_result, check_stability_result
from .runs import (
    BASELINES,
    DEFAULT_LEARNED,
    DEFAULT_LRS,
    FINAL_WINDOW,
    LR_SCHEDULES,
    LearnedSpec,
    OptimizerFactory,
    check_lr_schedule,
    final_loss,
    import_rules,
    learned_from_files,
    run_optimizer,
    summarize,
    tune_lr,
)

#: the --quick grid
QUICK_LRS: tuple[float, ...] = (1e-3, 1e-2, 1e-1)
QUICK_STEPS = 20
#: the largest lr of the baselines' grid: Adam's first step is lr / (1 - 0.9), about 10 lr, which
#: torch converts to the parameters' dtype (float32 in the suite); from float32's largest value
#: / 10 up, the step failed with "value cannot be converted to type float without overflow"
MAX_LR = 1e37
# Seed offsets: tuning seeds never coincide with evaluation seeds (0 .. seeds-1).
TUNING_SEED_OFFSET = 1_000_000
STABILITY_SEED = 2_000_000


def _check_given_once(field: str, values: Sequence[Any], show: Callable[[Any], str] = str) -> None:
    """Raise ValueError naming ``field`` and the values (written by ``show``) that ``values``
    holds more than once, in sorted order."""
    repeated = sorted({value for value in values if list(values).count(value) > 1})
    if repeated:
        raise ValueError(f"{field} given more than once: {', '.join(map(show, repeated))}")


@dataclass
class EvalConfig:
    """What :func:`evaluate_optimizers` runs.

    Attributes:
        problems: names of :data:`PROBLEMS`, or :class:`Problem` objects.
        weights: extra learned-optimizer weight files (run beside the default presets).
        rules: your own update-rule classes as ``module:Class``, imported and registered (in
            every worker process too) so that ``weights`` files of their kinds run.
        seeds: evaluation seeds per problem (seeds ``0 .. seeds-1``).
        tuning_seeds: lr-tuning seeds per problem (disjoint from the evaluation seeds).
        long_tuning_seeds: tuning seeds for problems of >= ``long_steps`` steps (None: ``tuning_seeds``).
        lrs: the baselines' lr grid (a sequence or array of real numbers, kept as Python floats;
            numpy's counts for the integer fields are kept as ints, for the JSON report).
        stability_steps: steps of the learned optimizers' stability run on MNIST MLP 784-20-10 (0 skips).
        steps: cut every problem longer than this to this many steps (``--quick``), or None.
        include_default_learned: run the preset learned optimizers.
        presets: which of them, by preset name (None: all of :data:`DEFAULT_LEARNED`).
        lr_schedule: a name of :data:`~learnedopt.evaluation.runs.LR_SCHEDULES`, applied alike to
            every run: the baselines are tuned and run under it, the learned optimizers run with
            it on their lr of 1.0.
        data: MNIST folder (None: the default search).
        reuse: an earlier report (JSON, as :func:`write_report` writes it) of the same settings
            whose baseline and preset results are taken instead of rerun (see
            :func:`reusable_results`); weight files given in ``weights`` always run.
    """

    problems: Sequence[str | Problem] = DEFAULT_PROBLEMS
    weights: Sequence[str] = ()
    rules: Sequence[str] = ()
    seeds: int = 10
    tuning_seeds: int = 3
    long_tuning_seeds: int | None = None
    long_steps: int = 1000
    lrs: Sequence[float] = DEFAULT_LRS
    stability_steps: int = 10_000
    steps: int | None = None
    include_default_learned: bool = True
    presets: Sequence[str] | None = None
    lr_schedule: str = "constant"
    data: str | None = None
    quick: bool = False
    reuse: str | None = None

    def __post_init__(self) -> None:
        # numpy's numbers (a grid from np.logspace, an np.int64 count) as Python's: the report is
        # JSON, which took none of them, and failed to be written after every run
        for key in ("seeds", "tuning_seeds", "long_tuning_seeds", "long_steps", "stability_steps", "steps"):
            value = getattr(self, key)
            if value is not None:
                if not is_integer(value):
                    raise ValueError(f"{key} must be an integer, got {value!r}")
                setattr(self, key, int(value))
        lrs = tuple(self.lrs) if isinstance(self.lrs, Iterable) and not isinstance(self.lrs, (str, bytes)) else None
        if lrs is not None and all(is_number(lr) for lr in lrs):
            self.lrs = tuple(float(lr) for lr in lrs)
        for key in ("seeds", "tuning_seeds"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.long_tuning_seeds is not None and self.long_tuning_seeds < 1:
            raise ValueError(f"long_tuning_seeds must be >= 1, got {self.long_tuning_seeds}")
        # the seed ranges must not meet: evaluation 0.., tuning TUNING_SEED_OFFSET.., stability STABILITY_SEED
        if self.seeds > TUNING_SEED_OFFSET:
            raise ValueError(f"seeds must be <= {TUNING_SEED_OFFSET} (the tuning seeds start there), got {self.seeds}")
        for key in ("tuning_seeds", "long_tuning_seeds"):
            if (getattr(self, key) or 0) > STABILITY_SEED - TUNING_SEED_OFFSET:
                raise ValueError(
                    f"{key} must be <= {STABILITY_SEED - TUNING_SEED_OFFSET} (the stability seed follows), got {getattr(self, key)}"
                )
        if self.stability_steps < 0:
            raise ValueError(f"stability_steps must be >= 0, got {self.stability_steps}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        for key in ("stability_steps", "steps"):  # a run's (steps,) loss curve is one array
            if (getattr(self, key) or 0) > MAX_ELEMENTS:
                raise ValueError(f"{key} must be <= {MAX_ELEMENTS:,} (2**31 - 1, the most elements of a run's loss curve), "
                                 f"got {getattr(self, key)}")  # fmt: skip
        if lrs is None or not lrs or any(not (is_number(lr) and lr > 0 and math.isfinite(lr)) for lr in lrs):
            raise ValueError(
                f"lrs must be a non-empty list of positive finite numbers, got {list(lrs) if lrs is not None else self.lrs!r}"
            )
        if max(self.lrs) > MAX_LR:
            raise ValueError(f"lrs must be at most {MAX_LR:g} (Adam's first step, about 10 lr, must fit a float32 parameter), "
                             f"got {max(self.lrs):g}")  # fmt: skip
        # the grid's runs would be repeated for nothing, and the report list the lr twice
        _check_given_once("lrs", [float(lr) for lr in self.lrs], lambda lr: f"{lr:g}")
        if not self.problems:
            raise ValueError("no problems given")
        for name in self.rules:
            if entry_point_path(name) is None:
                raise ValueError(
                    f"rules takes your own UpdateRule classes as module:Class, got {name!r} (the library's rules need none)"
                )
        _check_given_once("rules", self.rules)  # listed twice in the report's config: a --resume naming it once differed
        check_lr_schedule(self.lr_schedule)
        known = [spec.weights for spec in DEFAULT_LEARNED]
        unknown = [name for name in self.presets or () if name not in known]
        if unknown:
            raise ValueError(f"unknown preset {', '.join(unknown)}; the suite's presets are {', '.join(known)}")
        _check_given_once("presets", self.presets or ())  # run once, but listed twice in the config, as rules
        for p in self.problems:
            if isinstance(p, str) and p not in PROBLEMS and entry_point_path(p) is None:
                raise ValueError(f"unknown problem {p!r}; choose from {', '.join(PROBLEMS)}, or your own as module:Class")
        # a report keys results by problem name: the second would run for nothing
        _check_given_once("problems", [p if isinstance(p, str) else p.name for p in self.problems])

    @classmethod
    def quick_config(cls, **overrides: Any) -> EvalConfig:
        """``--quick``: 20 steps, 2 seeds, 1 tuning seed, 3 lrs, 100 stability steps.

        By default it leaves out mnist-mlp-200 and mnist-mlp-1000, which at 20 steps are mnist-mlp-100.
        """
        problems = tuple(
            p for p in DEFAULT_PROBLEMS if p not in ("mnist-mlp-200", "mnist-mlp-1000")
        )
        base = {
            "problems": problems,
            "seeds": 2,
            "tuning_seeds": 1,
            "lrs": QUICK_LRS,
            "steps": QUICK_STEPS,
            "stability_steps": 100,
            "quick": True,
        }
        return cls(**{**base, **overrides})


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def report_config(config: EvalConfig) -> dict[str, Any]:
    """The report's ``config``: ``config``'s fields, problems by name."""
    return {k: v for k, v in asdict(config).items() if k != "problems"} | {
        "problems": [p if isinstance(p, str) else p.name for p in config.problems]
    }


def run_settings(config: EvalConfig, setup: RunSetup) -> dict[str, Any]:
    """What a run's numbers depend on besides the code, for :meth:`RunRecords.check`: the report's
    config, the MNIST files' SHA-256 and each learned optimizer's weights' SHA-256."""
    return {
        "config": report_config(config),
        "mnist_sha256": setup.data_sha256,
        "weights_sha256": {label: record["sha256"] for label, record in setup.records.items()},
    }


def evaluate_optimizers(
    config: EvalConfig,
    log: Callable[[str], None] = _log,
    workers: int = 1,
    setup: RunSetup | None = None,
    records: RunRecords | None = None,
) -> dict[str, Any]:
    """Run the harness; returns the report (JSON-serialisable) that :func:`write_report` writes.

    ``setup``: what :func:`check_config` returned for ``config``, if called before (else it is
    done here). ``records``: where each training run's curve is recorded as it ends and taken
    from instead of run when already recorded (a resumed evaluation; a :class:`RunRecords`
    checked and begun); the report is the same either way.

    Problems whose data is missing are skipped; the report's ``skipped`` maps them to the reason.
    ``workers > 1`` runs the problems and the stability check in that many processes (each with
    this process's torch thread count, logging to stderr instead of ``log``, and ending when this
    process ends, killed or not); every run is a function of its seed alone, so the report's
    numbers are those of ``workers=1``.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    learned, learned_records, data_sha256, reused = setup or check_config(config)
    report: dict[str, Any] = {
        "config": report_config(config),
        "definitions": {
            "final_loss": f"mean training (minibatch) loss over the last {FINAL_WINDOW} steps of a run "
            "(over all its steps where it has fewer)",
            "mean_loss": "mean training loss over all steps of a run, averaged over seeds",
            "statistics": "over the evaluation seeds whose run stayed finite; final_std is the sample std",
            "tuning": "baselines: lr with the lowest mean final loss over the tuning seeds (a NaN/Inf run = +inf; "
            "ties, every lr diverging among them, go to the smallest lr); learned optimizers: untuned, lr=1.0",
            "lr_schedule": "constant lr"
            if config.lr_schedule == "constant"
            else f"{config.lr_schedule}: at step t of a T-step run every optimizer's lr (the learned ones' 1.0) is multiplied by "
            + LR_SCHEDULES[config.lr_schedule].formula,
        },
        "learned": learned_records,
        "mnist_sha256": data_sha256,
        "problems": {},
        "skipped": {},
    }
    if reused is not None:
        report["reused"] = {"from": config.reuse, "commit": reused.commit, "results": {}}
    if workers > 1 and not all(isinstance(entry, str) for entry in config.problems):
        raise ValueError("workers > 1 needs every problem given by name (Problem objects do not pickle)")
    start = time.perf_counter()
    problems, entries = [], []
    for entry in config.problems:
        try:
            problems.append(_build_problem(entry, config))
        except FileNotFoundError as err:
            report["skipped"][entry] = f"data missing: {err}"
            log(f"skipping {entry}: data missing: {err}")
            continue
        entries.append(entry)
    # a worker builds its problem from the name (problems hold lambdas, which do not pickle)
    taken = [reused.for_problem(problem) if reused else {} for problem in problems]
    if reused is not None:
        report["reused"]["results"] = {p.name: list(t) for p, t in zip(problems, taken, strict=True) if t}
    jobs: list[tuple[Callable[..., Any], tuple[Any, ...]]] = [
        (_evaluate_problem, (problem if workers == 1 else entry, config, learned, t, records))
        for problem, entry, t in zip(problems, entries, taken, strict=True)
    ]
    stability = bool(config.stability_steps and learned)  # a check of no learned optimizer is an empty table
    if stability:
        stable = reused.stability if reused else {}
        if reused is not None and stable:
            report["reused"]["results"]["stability"] = list(stable)
        jobs.append((_stability, (config, learned, stable, records)))
    if workers == 1:
        outputs = [job(*args, log) for job, args in jobs]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        def steps(i: int) -> int:
            return config.stability_steps if i == len(problems) else problems[i].steps

        order = sorted(range(len(jobs)), key=steps, reverse=True)  # longest first: none starts last
        # PR_SET_PDEATHSIG (_end_with_parent) fires when the thread that started a worker ends: the
        # pool starts them in submit, in this thread, which outlives the pool
        with ProcessPoolExecutor(
            min(workers, max(len(jobs), 1)),  # a process per job at most: more would start none
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(torch.get_num_threads(), os.getpid()),
        ) as pool:
            futures = {i: pool.submit(jobs[i][0], *jobs[i][1], _log) for i in order}
            outputs = [futures[i].result() for i in range(len(jobs))]
    for problem, output in zip(problems, outputs, strict=False):
        report["problems"][problem.name] = output
    report["stability"] = outputs[-1] if stability else None
    report["seconds"] = time.perf_counter() - start
    return report


#: seconds between a worker's checks that its parent lives, where the OS cannot signal its death
PARENT_POLL_S = 0.5
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _start_worker(threads: int, parent: int) -> None:
    """A worker process's initializer: ``threads`` torch threads, and :func:`_end_with_parent`."""
    torch.set_num_threads(threads)
    _end_with_parent(parent)


def _end_with_parent(parent: int) -> None:
    """End this process as soon as the process ``parent`` (its parent) ends, killed or not.

    A worker outliving a killed evaluation would go on running, and recording, runs beside the
    ``--resume`` of it, which the parent's lock on the records folder no longer stops. On Linux
    the kernel SIGKILLs it when the parent dies (``PR_SET_PDEATHSIG``); elsewhere a daemon thread
    sees its parent change (``os.getppid``) within :data:`PARENT_POLL_S` seconds.
    """
    if sys.platform.startswith("linux") and _parent_death_signal(signal.SIGKILL):
        if os.getppid() != parent:  # the parent died before the signal was set
            os._exit(1)
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="end-with-parent", daemon=True).start()


def _parent_death_signal(sig: int) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent dies; False where it cannot."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    args = (ctypes.c_ulong(sig), *(ctypes.c_ulong(0) for _ in range(3)))  # unsigned long, as the kernel reads them
    return prctl(ctypes.c_int(_PR_SET_PDEATHSIG), *args) == 0


def _build_problem(entry: str | Problem, config: EvalConfig) -> Problem:
    problem = make_problem(entry, config.data) if isinstance(entry, str) else entry
    # cut, never lengthened: a problem of one's own may have a loss for its own steps only
    return problem if config.steps is None or problem.steps <= config.steps else problem.with_steps(config.steps)


def _run(
    records: RunRecords | None, problem: Problem, label: str, seed: int, factory: OptimizerFactory, lr: float, schedule: str
) -> np.ndarray:
    """:func:`run_optimizer`'s curve, taken from ``records`` where recorded, else run (and recorded)."""
    if records is None:
        return run_optimizer(problem, seed, factory, lr, schedule=schedule)
    key = records.key(problem, label, lr, seed, schedule)
    curve = records.load(key)
    if curve is None:
        curve = run_optimizer(problem, seed, factory, lr, schedule=schedule)
        records.save(key, curve)
    return curve


def _evaluate_problem(
    entry: str | Problem,
    config: EvalConfig,
    learned: Sequence[LearnedSpec],
    reused: Mapping[str, Any],
    records: RunRecords | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """One problem's report entry: every baseline tuned and run, every learned optimizer run.
    ``entry``: the built problem, or a name to build (in a worker process); ``reused``: results
    (label -> entry) taken from an earlier report instead of run; ``records``: see
    :func:`evaluate_optimizers`."""
    problem = _build_problem(entry, config) if isinstance(entry, str) else entry
    n_tune = (
        config.long_tuning_seeds
        if problem.steps >= config.long_steps and config.long_tuning_seeds
        else config.tuning_seeds
    )
    tune_seeds = [TUNING_SEED_OFFSET + i for i in range(n_tune)]
    eval_seeds = list(range(config.seeds))
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    for label, factory in BASELINES.items():
        if label in reused:
            results[label] = reused[label]
            log(f"{problem.name} {label}: reused, final {results[label]['final_mean']:.4g}")
            continue
        def run(lr: float, seed: int, label: str = label, factory: OptimizerFactory = factory) -> np.ndarray:
            return _run(records, problem, label, seed, factory, lr, config.lr_schedule)

        # without records, tune_lr's own runs (as before)
        lr, scores = tune_lr(problem, factory, config.lrs, tune_seeds, config.lr_schedule, run=None if records is None else run)
        curves = np.stack([run(lr, s) for s in eval_seeds])
        results[label] = {
            "kind": "baseline",
            "lr": lr,
            "tuning_scores": {repr(k): v for k, v in scores.items()},
            "lr_at_grid_edge": lr in (min(config.lrs), max(config.lrs)),
        } | summarize(curves)
        log(f"{problem.name} {label}: lr {lr:.3g}, final {results[label]['final_mean']:.4g}")
    for spec in learned:
        if spec.label in reused:
            results[spec.label] = reused[spec.label]
            log(f"{problem.name} {spec.label}: reused, final {results[spec.label]['final_mean']:.4g}")
            continue
        curves = np.stack(
            [_run(records, problem, spec.label, s, spec.factory(), 1.0, config.lr_schedule) for s in eval_seeds]
        )
        results[spec.label] = {"kind": "learned", "lr": 1.0} | summarize(curves)
        log(f"{problem.name} {spec.label}: final {results[spec.label]['final_mean']:.4g}")
    return {
        "description": problem.description,
        "steps": problem.steps,
        "tuning_seeds": tune_seeds,
        "eval_seeds": eval_seeds,
        "seconds": time.perf_counter() - t0,
        "results": results,
    }


def _stability(
    config: EvalConfig,
    learned: Sequence[LearnedSpec],
    reused: Mapping[str, Any],
    records: RunRecords | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Run each learned optimizer ``stability_steps`` steps on MNIST MLP 784-20-10 (one seed);
    ``reused``: results (label -> entry) taken from an earlier report instead of run;
    ``records``: see :func:`evaluate_optimizers`."""
    try:
        problem = make_problem("mnist-mlp-100", config.data).with_steps(config.stability_steps)
    except FileNotFoundError as err:
        log(f"skipping the stability check: data missing: {err}")
        return {"skipped": f"data missing: {err}"}
    out: dict[str, Any] = {
        "problem": "MNIST MLP 784-20-10 sigmoid, held-out part, batch 128",
        "steps": config.stability_steps,
        "seed": STABILITY_SEED,
        "results": {},
    }
    for spec in learned:
        if spec.label in reused:
            out["results"][spec.label] = reused[spec.label]
            log(f"stability {spec.label}: reused")
            continue
        key = (problem, spec.label, 1.0, STABILITY_SEED, config.lr_schedule)
        curve = None if records is None else records.load(records.key(*key))
        if curve is None:
            # minutes per optimizer at the default 10,000 steps: say so before, not only after
            log(f"stability {spec.label}: {config.stability_steps} steps on the MNIST MLP ...")
            curve = _run(records, problem, spec.label, STABILITY_SEED, spec.factory(), 1.0, config.lr_schedule)
        else:
            log(f"stability {spec.label}: {config.stability_steps} steps on the MNIST MLP: recorded, read back (not run again)")
        bad = np.flatnonzero(np.isnan(curve) | ~np.isfinite(curve))
        out["results"][spec.label] = {
            "nonfinite": bool(len(bad)),
            "first_nonfinite_step": int(bad[0]) if len(bad) else None,
            "final_loss": final_loss(curve),
            "min_loss": float(np.nanmin(curve)) if len(bad) < len(curve) else None,
        }
        log(f"stability {spec.label}: nonfinite={bool(len(bad))} final {final_loss(curve):.4g}")
    return out


#: settings of a report that decide its numbers; a reused report must match every one
_SETTINGS = ("seeds", "tuning_seeds", "long_tuning_seeds", "long_steps", "lrs", "steps", "quick", "data", "lr_schedule")
#: what a report from before a setting existed ran
_SETTING_BEFORE = {"lr_schedule": "constant"}


@dataclass
class ReusableResults:
    """Results of an earlier report that :func:`evaluate_optimizers` takes instead of rerunning.

    Attributes:
        commit: the commit the earlier report names (None when it names none).
        problems: problem name -> (steps, description, {label: result entry}).
        stability: label -> stability-check entry (empty when the settings differ).
    """

    commit: str | None
    problems: dict[str, tuple[int, str, dict[str, Any]]] = field(default_factory=dict)
    stability: dict[str, Any] = field(default_factory=dict)

    def for_problem(self, problem: Problem) -> dict[str, Any]:
        """The reusable entries of ``problem``: none unless the earlier report ran a problem of
        that name with the same step count and description."""
        steps, description, results = self.problems.get(problem.name, (None, None, {}))
        return dict(results) if (steps, description) == (problem.steps, problem.description) else {}


class RunSetup(NamedTuple):
    """What a run is set up from: the learned optimizers, their report records, the MNIST files'
    SHA-256 (None without them) and the results to reuse (None without ``--reuse``)."""

    learned: list[LearnedSpec]
    records: dict[str, Any]
    data_sha256: str | None
    reused: ReusableResults | None


def data_mnist_sha256(data: str | None) -> str | None:
    """:func:`~learnedopt.data.idx.mnist_sha256` of the MNIST files that ``data`` (a ``--data``
    option; None: the ``LEARNEDOPT_DATA`` search) names; a folder named explicitly must hold MNIST,
    whether or not a problem reads it (no silent skipping, no ignored option): else ValueError
    ``data: ...``."""
    try:
        return mnist_sha256(data, required=data is not None)
    except FileNotFoundError as err:
        raise ValueError(f"data: {err}") from None


def check_config(config: EvalConfig) -> RunSetup:
    """The checks :func:`evaluate_optimizers` starts with, before any run: your own rules
    (``module:Class``, imported and registered here, their ``forward`` tried once), the weight
    files, the report to reuse, an explicitly named data folder, that some problem has its data
    (one without MNIST is skipped, but not all), and your own problems (``module:Class``, built
    here to see that they import, are problems that pass
    :func:`~learnedopt.evaluation.problems.check_problem` and can be cut to ``config.steps``);
    returns what they read, for :func:`evaluate_optimizers`'s ``setup``.

    Raises:
        ValueError: the first problem found (a one-line message).
    """
    wanted = config.presets if config.include_default_learned else ()
    presets = [spec for spec in DEFAULT_LEARNED if wanted is None or spec.weights in wanted]
    import_rules(config.rules)
    learned = [*presets, *learned_from_files(config.weights)]
    for spec in learned:
        spec.check_rule()
    records = {spec.label: spec.record() for spec in learned}
    data_sha256 = data_mnist_sha256(config.data)
    if data_sha256 is None and all(isinstance(p, str) and _missing_data(p, config.data) for p in config.problems):
        # each would be skipped: a report of nothing, written as if the evaluation had run
        raise ValueError(f"no problem given can run: {', '.join(map(str, config.problems))} "
                         f"{'needs' if len(config.problems) == 1 else 'need'} MNIST, not found "
                         f"({_missing_data(config.problems[0], config.data)})")  # fmt: skip
    for entry in config.problems:
        if isinstance(entry, str) and entry_point_path(entry) is not None:
            problem = make_problem(entry, config.data)
            check_problem(problem)
            if _build_problem(problem, config).steps != min(problem.steps, config.steps or problem.steps):
                # a steps property: it ran uncut, in a report that said every problem was cut
                raise ValueError(f"{entry}: its steps ({problem.steps}) cannot be cut to {config.steps} (--quick): "
                                 "make steps a plain attribute")  # fmt: skip
    reused = reusable_results(config, records, data_sha256) if config.reuse else None
    return RunSetup(learned, records, data_sha256, reused)


def _missing_data(name: str, data: str | None) -> str | None:
    """Why the problem ``name`` cannot be built for want of its data (a one-line reason), or None."""
    try:
        make_problem(name, data)
    except FileNotFoundError as err:
        return str(err)
    return None


def reusable_results(
    config: EvalConfig, records: Mapping[str, Mapping[str, Any]], data_sha256: str | None = None
) -> ReusableResults:
    """What of the report ``config.reuse`` this run may take instead of rerunning.

    Every run of the harness is a function of its seed (the suite reproduces bitwise on one
    machine and code), so an earlier report of the same settings already holds the baselines'
    tuning and runs and the presets' runs. ``records``: this run's learned optimizers, label ->
    :meth:`LearnedSpec.record`. Taken: each baseline, and each preset whose weights are those the
    earlier report ran (the same SHA-256 of the weight tensors and the same kind and
    architecture in the header; a report older than that record: the same header), on every
    problem of the same name, step count and description; weight files (``config.weights``)
    always run.

    Raises:
        ValueError: the report is unreadable, or one of its settings (seeds, tuning seeds, lr
            grid, step override, quick mode, the MNIST files by content (where it read any): ``data_sha256`` against
            the report's; in a report from before that was recorded, the data folder's name)
            differs from ``config``'s (named in the message).
    """
    try:
        return _reusable_results(config, records, data_sha256)
    except (KeyError, TypeError, AttributeError) as err:  # a JSON file of another shape
        raise ValueError(f"cannot reuse {config.reuse}: not a report of this harness ({type(err).__name__}: {err})") from None


def _reusable_results(
    config: EvalConfig, records: Mapping[str, Mapping[str, Any]], data_sha256: str | None
) -> ReusableResults:
    path = config.reuse
    try:
        old = json.loads(Path(path).read_text())
        old_config = old["config"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"cannot reuse {path}: not a report of this harness ({type(err).__name__}: {err})") from None
    ours = asdict(config)
    if "mnist_sha256" in old:  # the files' content decides, not how the folder was named
        # a report made without MNIST read none (its MNIST problems and stability check skipped)
        if old["mnist_sha256"] is not None and old["mnist_sha256"] != data_sha256:
            raise ValueError(f"cannot reuse {path}: it ran on other MNIST files (SHA-256 {str(old['mnist_sha256'])[:12]}, these {str(data_sha256)[:12]})")
    for key in _SETTINGS:
        if key == "data" and "mnist_sha256" in old:
            continue
        theirs = old_config.get(key, _SETTING_BEFORE.get(key))
        mine = ours[key]
        if key == "lrs":
            if not (isinstance(theirs, list) and all(is_number(x) for x in theirs)):
                raise ValueError(f"cannot reuse {path}: its lrs are {theirs!r}, not a list of numbers")
            theirs, mine = [float(x) for x in theirs], [float(x) for x in mine]
        if theirs != mine:
            raise ValueError(f"cannot reuse {path}: its {key} is {theirs!r}, this run's is {mine!r}")
    preset_names = {spec.weights for spec in DEFAULT_LEARNED}  # a weight file's spec never names one

    def same_weights(label: str, record: Mapping[str, Any]) -> bool:
        recorded = old.get("learned", {}).get(label)
        if record["weights"] not in preset_names or not recorded:
            return False
        header = _jsonable(record["header"])
        if "sha256" in recorded:  # the tensors' hash; the kind and architecture are the header's
            old_header = recorded.get("header") or {}
            return recorded["sha256"] == record["sha256"] and all(
                old_header.get(key) == header.get(key) for key in ("kind", "config")
            )
        return recorded.get("header") == header

    presets = {label for label, record in records.items() if same_weights(label, record)}
    labels = set(BASELINES) | presets
    reused = ReusableResults(commit=old.get("machine", {}).get("commit"))
    for name, entry in old.get("problems", {}).items():
        taken = {k: v for k, v in entry["results"].items() if k in labels}
        for label, result in taken.items():  # what this run's report will show as its own
            try:
                check_result(result, config.seeds)
            except ValueError as err:
                raise ValueError(f"cannot reuse {path}: its {label} result on {name}: {err}") from None
        reused.problems[name] = (entry["steps"], entry["description"], taken)
    stability = old.get("stability") or {}
    if old_config.get("stability_steps") == config.stability_steps and "results" in stability:
        reused.stability = {k: v for k, v in stability["results"].items() if k in presets}
        for label, result in reused.stability.items():
            try:
                check_stability_result(result)
            except ValueError as err:
                raise ValueError(f"cannot reuse {path}: its {label} stability result: {err}") from None
    return reused


def _jsonable(value: Any) -> Any:
    """``value`` as it reads back from the report's JSON (tuples become lists)."""
    return json.loads(json.dumps(value))
