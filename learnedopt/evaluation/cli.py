"""``learnedopt evaluate optimizers`` and ``benchmarks/optimizee_eval.py``: arguments to report files."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch

from ..cli import MAX_THREADS, most_threads
from ..data.paths import create_output_folder
from ..meta.loop import OutputLock
from ..nn.lstm_step import check_settings
from ..plugins import entry_point_path
from ..values import path_arg
from ..weights import PRESETS
from .harness import QUICK_LRS, QUICK_STEPS, EvalConfig, check_config, evaluate_optimizers, run_settings
from .problems import DEFAULT_PROBLEMS, EXTRA_PROBLEMS
from .records import RecordError, RecordWriteError, RunRecords, records_folder
from .report import WriteResults, check_report_name, write_report
from .runs import LR_SCHEDULES

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``evaluate optimizers`` arguments (shared with ``benchmarks/optimizee_eval.py``)."""
    parser.add_argument(
        "--problems",
        nargs="+",
        default=None,
        metavar="NAME",
        help=f"problems to run (default the suite: {', '.join(DEFAULT_PROBLEMS)}; only when named: {', '.join(EXTRA_PROBLEMS)}; "
        "or your own learnedopt.evaluation.Problem as module:Class)",
    )
    parser.add_argument(
        "--weights",
        type=path_arg,
        nargs="+",
        default=[],
        metavar="FILE",
        help="extra learned-optimizer weight files (.safetensors), run beside the presets",
    )
    parser.add_argument(
        "--rules",
        nargs="+",
        default=[],
        metavar="MODULE:CLASS",
        help="your own UpdateRule classes that --weights files of their kinds need, as module:Class "
        "(as meta-train --rule took them), imported and registered before the run (the module must be importable)",
    )
    parser.add_argument(
        "--seeds", type=int, default=None, help="evaluation seeds per problem (default 10)"
    )
    parser.add_argument(
        "--tuning-seeds", type=int, default=None, help="lr-tuning seeds per problem (default 3)"
    )
    parser.add_argument(
        "--long-tuning-seeds",
        type=int,
        default=None,
        help="tuning seeds for problems of >= 1000 steps (default: --tuning-seeds)",
    )
    parser.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        default=None,
        help="baseline lr grid (default 1e-4 .. 10 in half-decades, 11 values; each positive, at most 1e37)",
    )
    parser.add_argument(
        "--stability-steps",
        type=int,
        default=None,
        help="steps of the learned optimizers' NaN/Inf check on the MNIST MLP (default 10000, or 0 when "
        "--problems names only problems of your own; 0 skips)",
    )
    parser.add_argument(
        "--presets",
        nargs="*",
        default=None,
        metavar="NAME",
        help="run only these of the suite's learned presets (default all; e.g. l2l-blend meta-lstm-adam-mnist); "
        "--presets with no name runs none, e.g. to evaluate only --weights files",
    )
    parser.add_argument(
        "--lr-schedule",
        choices=sorted(LR_SCHEDULES),
        default=None,
        help="lr schedule of every run, baselines (tuned under it) and learned optimizers alike: "
        f"constant (default) or cosine, {LR_SCHEDULES['cosine'].formula} at step t of T",
    )
    parser.add_argument(
        "--data", type=path_arg, default=None, help="the MNIST folder, or a folder with mnist/ (default: the LEARNEDOPT_DATA search)"
    )
    # The models are tiny: more threads only add synchronisation (measured 2-10x slower with 2 threads on a busy 2-core machine).
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help=f"torch CPU threads, at most {MAX_THREADS} or the CPU count if larger (default 1; 0 keeps torch's choice)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes running problems side by side (default 1); the numbers do not depend on it",
    )
    parser.add_argument(
        "--name",
        default="optimizee_eval",
        help="file name stem of the report: NAME.json, NAME.md, NAME.png (default optimizee_eval)",
    )
    parser.add_argument(
        "--reuse",
        type=path_arg,
        default=None,
        metavar="REPORT",
        help="take the baselines' and presets' results from this earlier report (JSON) of the same "
        "settings instead of rerunning them; --weights files always run",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the unfinished evaluation of this --name in this output folder (killed, stopped or "
        "failed), running only the runs it had not finished; the settings must be the same",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: every problem cut to {QUICK_STEPS} steps, 2 seeds, 1 tuning seed, lrs {QUICK_LRS}",
    )


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """An :class:`EvalConfig` from parsed :func:`add_arguments` arguments (explicit flags beat ``--quick``)."""
    given = {
        key: getattr(args, attr)
        for key, attr in (
            ("problems", "problems"),
            ("seeds", "seeds"),
            ("tuning_seeds", "tuning_seeds"),
            ("long_tuning_seeds", "long_tuning_seeds"),
            ("lrs", "lrs"),
            ("stability_steps", "stability_steps"),
            ("data", "data"),
            ("reuse", "reuse"),
            ("presets", "presets"),
            ("lr_schedule", "lr_schedule"),
        )
        if getattr(args, attr) is not None
    }
    if "stability_steps" not in given and "problems" in given and all(entry_point_path(p) for p in given["problems"]):
        # the check trains the suite's MNIST MLP for minutes per learned optimizer: a run of one's
        # own problems alone does not ask for it
        given["stability_steps"] = 0
    given["weights"] = list(args.weights)
    given["rules"] = list(args.rules)
    for path in given["weights"]:
        if Path(path).is_dir():
            raise ValueError(f"--weights {path} is a folder, not a weight file")
        if not Path(path).is_file():
            hint = " (a preset: give it to --presets)" if path in PRESETS else ""
            raise ValueError(f"weight file not found: {path}{hint}")
    if args.reuse is not None and Path(args.reuse).is_dir():
        raise ValueError(f"--reuse {args.reuse} is a folder, not a report (NAME.json)")
    if args.reuse is not None and not Path(args.reuse).is_file():
        raise ValueError(f"report to reuse not found: {args.reuse}")
    check_settings()  # LEARNEDOPT_COMPILE, LEARNEDOPT_CPU_KERNEL: read at the first step otherwise
    try:
        return EvalConfig.quick_config(**given) if args.quick else EvalConfig(**given)
    except ValueError as err:  # EvalConfig names its field ("seeds must be >= 1"): name the option
        field, _, rest = str(err).partition(" ")
        if field in given:
            raise ValueError(f"--{field.replace('_', '-')} {rest}") from None
        raise


def run_cli(
    args: argparse.Namespace,
    out_dir: str | os.PathLike[str],
    write_results: WriteResults | None = None,
    *,
    prog: str = "learnedopt evaluate optimizers",
) -> int:
    """Parse-args-to-files: build the config, run the harness, write the report, print the paths.

    Every check that can fail runs before the first training run (a bad setting, weight file,
    report to reuse, data folder or output folder, or records of runs that do not fit
    ``--resume``, is one line ``"<prog>: error: ..."`` on stderr and exit code 2), so that no
    compute is lost to it.

    Each training run is recorded in ``<out_dir>/<name>.runs`` as it ends
    (:class:`~learnedopt.evaluation.records.RunRecords`); ``args.resume`` takes the recorded runs
    instead of running them again. The folder is removed once the report is written; where a kill
    came between the two, the report is whole and newer than every record, and a run without
    ``args.resume`` removes the stale runs and starts afresh (:meth:`RunRecords.reported_in`)."""
    lock = OutputLock("evaluate optimizers")
    try:
        config = config_from_args(args)
        if args.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {args.workers}")
        if args.threads < 0:
            raise ValueError(f"--threads must be >= 0 (0 keeps torch's choice), got {args.threads}")
        if args.threads > (most := most_threads()):  # as learnedopt.cli.thread_count bounds the benchmarks' threads
            raise ValueError(f"--threads must be <= {most}, got {args.threads}")
        check_report_name(out_dir, args.name)
        setup = check_config(config)
        records = RunRecords(records_folder(out_dir, args.name))
        settings = run_settings(config, setup)
        report_path = Path(out_dir) / f"{args.name}.json"
        stale = records.check(settings, args.resume, report_path)
        create_output_folder(out_dir)  # after the checks, so that a refused run leaves no folder
        try:  # a folder that exists but cannot be written (read-only; /sys, where os.access says it can)
            records.folder.mkdir(exist_ok=True)
        except OSError as err:
            raise ValueError(f"--out {out_dir}: cannot create {records.folder}, where the runs are recorded "
                             f"({err.strerror or err})") from None  # fmt: skip
        lock.acquire(records.folder)  # two processes would run every run twice, writing the same files
    except ValueError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    with lock:
        if stale:  # killed between writing the report and removing its runs: this run starts afresh
            print(f"removed the {records.count()} runs in {records.folder}: {report_path} was written from them "
                  "(its evaluation was stopped before it removed them)", file=sys.stderr)  # fmt: skip
            records.clear()
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.resume:
            print(f"--resume: continuing from the {records.count()} runs recorded in {records.folder}", file=sys.stderr)
        try:
            records.begin(settings)
        except RecordWriteError as err:  # a full disk before the first run
            print(f"{prog}: error: {err}", file=sys.stderr)
            return 1
        try:
            report = evaluate_optimizers(config, workers=args.workers, setup=setup, records=records)
        except KeyboardInterrupt:
            done = records.count()
            kept = (f"the {done} runs finished are recorded in {records.folder}: --resume continues from them" if done
                    else "no run had finished")  # fmt: skip
            print(f"{prog}: interrupted; no report was written (it is written once every run is done); {kept}", file=sys.stderr)
            return 130
        except RecordError as err:  # a damaged record (2), or one that cannot be written (1)
            print(f"{prog}: error: {err}", file=sys.stderr)
            return 1 if isinstance(err, RecordWriteError) else 2
        try:
            paths = write_report(report, out_dir, name=args.name, write_results=write_results)
        except KeyboardInterrupt:  # each file is whole, old or new (written atomically); the runs are kept
            print(f"{prog}: interrupted while writing the report; every run is recorded in {records.folder}: "
                  "--resume writes the report from them, running nothing", file=sys.stderr)  # fmt: skip
            return 130
        except OSError as err:  # a full disk, a folder made read-only since: after every run, which are kept
            print(f"{prog}: error: cannot write the report in {out_dir} ({err.strerror or err}); every run is recorded in "
                  f"{records.folder}: --resume writes the report from them, running nothing", file=sys.stderr)  # fmt: skip
            return 1
        for path in paths:
            print(path)
        shutil.rmtree(records.folder)  # the report holds what they were kept for
    return 0


def add_evaluate_optimizers_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``optimizers`` on ``learnedopt evaluate``'s subparsers."""
    parser = sub.add_parser(
        "optimizers",
        help="learned optimizers against tuned SGD/Nesterov/RMSprop/Adam on held-out optimizees",
    )
    add_arguments(parser)
    parser.add_argument(
        "--out", type=path_arg, default=".", help="output folder (default: the current directory)"
    )
    parser.set_defaults(func=lambda args: run_cli(args, args.out))
    return parser
