"""The ``learnedopt`` command line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, NoReturn

from .values import path_arg as path_arg  # the options that name a file or folder (here, meta-train, evaluate)


def _presets(args: argparse.Namespace) -> int:
    from .weights import PRESETS

    for preset in PRESETS.values():
        state = "trained" if preset.file else "untrained"
        print(f"{preset.name:21s} {preset.kind:15s} {state:10s} {preset.description}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    import sys

    from .demo import run_demo, steps_refused

    for flag, count in (("--steps", args.steps), ("--minibatch-steps", args.minibatch_steps)):
        if count is not None and (refused := steps_refused(count)):  # run_demo's check would name its parameter
            print(f"learnedopt demo: error: {flag} {refused}", file=sys.stderr)
            return 2
    try:
        run_demo(steps=args.steps, minibatch_steps=args.minibatch_steps, data=args.data)
    except (FileNotFoundError, ValueError) as err:  # a --data folder without (valid) MNIST
        print(f"learnedopt demo: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: it writes nothing but its tables, so there is nothing to keep
        print("learnedopt demo: interrupted", file=sys.stderr)
        return 130
    return 0


def positive_int(text: str) -> int:
    """``type=`` of an argparse option that counts something (steps, sizes, repeats): an int of at
    least 1, else argparse's one-line ``argument --X: must be a positive integer`` error."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:  # argparse would name the function in its own message
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


#: The most threads a ``--threads`` option takes where the machine has fewer CPUs: more than that
#: many on fewer cores only oversubscribe (allowed, so that a run recorded on a larger machine
#: reruns), and each thread reserves a stack (10**5 exhausted memory; past 2**63 torch's
#: ``set_num_threads`` raised an overflow)
MAX_THREADS = 1024


def most_threads() -> int:
    """The largest thread count a command takes: :data:`MAX_THREADS`, or the CPU count if larger."""
    import os

    return max(MAX_THREADS, os.cpu_count() or 1)


def thread_count(text: str) -> int:
    """``type=`` of an argparse option that sets torch's CPU threads: an int from 1 to
    :func:`most_threads`, else argparse's one-line ``argument --X: must be a thread count`` error."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 1 <= value <= most_threads():
        raise argparse.ArgumentTypeError(f"must be a thread count from 1 to {most_threads()}, got {text!r}")
    return value


def seed_arg(text: str) -> int:
    """``type=`` of a ``--seed`` option: an int from 0 to 2**64 - 1, what both ``torch.manual_seed``
    and numpy's ``SeedSequence`` (the library's ``generator_for``) take, else argparse's one-line
    ``argument --seed: must be an integer from 0 to 2**64 - 1`` error."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2**64 - 1, got {text!r}")
    return value


def _same_file(a: str, b: str) -> bool:
    """Whether the paths ``a`` and ``b`` both exist and are one file (through links, ``./``)."""
    import os

    try:
        return os.path.samefile(a, b)
    except OSError:  # either one missing, or unreadable
        return False


def _average_weights(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from .weights import average_weights, save_weights

    # --out naming a member would replace it with the soup, whose header lists that path with the
    # member's SHA-256 (a preset's name is no file here: save_weights refuses that name itself)
    member = next((f for f in args.files if _same_file(f, args.out)), None)
    if member is not None:
        print(f"learnedopt average-weights: error: --out {args.out} is the file {member}, one of those averaged", file=sys.stderr)
        return 2
    try:
        rule, members = average_weights(args.files)
    except (ValueError, FileNotFoundError) as err:
        print(f"learnedopt average-weights: error: {err}", file=sys.stderr)
        return 2
    trained_on = "average of " + "; ".join(str(m["trained_on"]) for m in members)
    command = shlex.join(["learnedopt", "average-weights", *map(str, args.files), "--out", str(args.out)])
    try:
        save_weights(rule, args.out, trained_on=trained_on, extra={"command": command, "averaged_from": members})
    except Exception as err:  # noqa: BLE001 - any unwritable --out (missing folder, a directory, ...) in one line
        print(f"learnedopt average-weights: error: cannot write {args.out}: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: " + (f"the mean of {len(members)} weight files" if len(members) > 1 else "a copy of the one weight file given"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``learnedopt`` argument parser with every subcommand registered."""
    from .version import __version__

    parser = argparse.ArgumentParser(
        prog="learnedopt",
        description="Learned optimizers for PyTorch: coordinatewise LSTM optimizers and meta-learning.",
    )
    parser.add_argument("--version", action="version", version=f"learnedopt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    presets = sub.add_parser("presets", help="list the named update rules and whether they are trained")
    presets.set_defaults(func=_presets)
    demo = sub.add_parser(
        "demo", help="train small models with the learned optimizers beside tuned baselines: a minibatch and a full-batch problem"
    )
    demo.add_argument("--steps", type=positive_int, default=300, help="the full-batch problem's steps (default 300)")
    demo.add_argument(
        "--minibatch-steps", type=positive_int, default=None, help="the minibatch problem's steps (default: its own, 200)"
    )
    demo.add_argument(
        "--data",
        type=path_arg,
        default=None,
        help="the MNIST folder, or a folder with mnist/ (default: LEARNEDOPT_DATA, then ../shared/data, then shared/data "
        "beside the repository of a source checkout; "
        "where none is found, the minibatch problem is an MLP on generated data)",
    )
    demo.set_defaults(func=_demo)
    average = sub.add_parser(
        "average-weights",
        help="write the uniform average of weight files of one architecture (runs fine-tuned from one start)",
    )
    average.add_argument("files", nargs="+", metavar="FILE", help="weight files (.safetensors) or trained preset names")
    average.add_argument("--out", type=path_arg, required=True, help="the averaged weight file to write")
    average.set_defaults(func=_average_weights)
    from .meta.command import add_meta_train_parser

    add_meta_train_parser(sub)
    evaluate = sub.add_parser("evaluate", help="evaluate learned optimizers or meta-trained models")
    evaluate_sub = evaluate.add_subparsers(dest="evaluate_command", metavar="WHAT", required=True)
    # each evaluation registers its own subcommand here
    from .meta.fewshot import add_omniglot_runs_parser
    add_omniglot_runs_parser(evaluate_sub)
    from .evaluation import add_evaluate_optimizers_parser

    add_evaluate_optimizers_parser(evaluate_sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``learnedopt ARGV`` (default: ``sys.argv[1:]``) and return its exit status (0 after
    printing the help when no command is given)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)


class _OutputError(OSError):
    """Writing the command's standard output failed (a full disk, ``> /dev/full``)."""


class _GuardedOutput:
    """Standard output whose write errors are :class:`_OutputError`, told apart from the
    commands' own file errors; everything else is the wrapped stream's."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            raise
        except OSError as err:
            raise _OutputError(err.errno, err.strerror) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise
        except OSError as err:
            raise _OutputError(err.errno, err.strerror) from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def run() -> NoReturn:
    """The ``learnedopt`` console script: :func:`main`, then the process exits with its status
    (see :func:`learnedopt.meta.distributed.exit_process` for how under ``torchrun``); status 1,
    with no traceback, when the reader of its output closed the pipe early, and with one line
    when the output cannot be written (``> /dev/full``)."""
    import os
    import sys

    from .meta.distributed import exit_process

    sys.stdout = _GuardedOutput(sys.stdout)
    try:
        status = main()
        sys.stdout.flush()  # here, so that a reader gone by now is caught below, not at exit
    except (BrokenPipeError, _OutputError) as err:
        # the reader of the output has gone (`learnedopt presets | head -3`): end quietly, as Unix
        # tools do, instead of a traceback; stdout goes to devnull so that the interpreter's final
        # flush of what is left does not raise again (the recipe of Python's `signal` docs)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if isinstance(err, _OutputError):
            print(f"learnedopt: cannot write the output: {err.strerror}", file=sys.stderr)
        status = 1
    exit_process(status)


if __name__ == "__main__":
    run()
