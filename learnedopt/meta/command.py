"""``learnedopt meta-train`` (also ``python -m learnedopt.train`` and ``python -m
learnedopt.meta.train``): the one command line of every meta-training algorithm.

``--algo`` chooses what is meta-trained: ``lstm`` (the default) an update rule by truncated
unrolls (:mod:`learnedopt.meta.train`); ``maml``, ``fomaml``, ``reptile`` and ``meta-lstm`` a
few-shot learner (:mod:`learnedopt.meta.fewshot`). This module parses the arguments, refuses the
options of the other kind of algorithm, joins a ``torchrun`` job when there is one, and hands the
run to the chosen algorithm; every algorithm then runs through
:func:`learnedopt.meta.loop.train_loop`, so they share the progress bar, the log, the atomic
checkpoints, the exact resume and the one-line errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..freed_memory import keep_freed_memory
from ..nn import RULES
from ..values import path_arg
from ..weights import PRESETS
from . import distributed
from .distributed import DEFAULT_TIMEOUT_S, DistributedError, Workers
from .fewshot import FEWSHOT_ONLY, FEWSHOT_TASKS, add_fewshot_arguments, fewshot_defaults, run_fewshot
from .loop import (
    CARD_NAME,
    CHECKPOINT_NAME,
    LOG_NAME,
    WEIGHTS_NAME,
    ConfigError,
    RunInterrupted,
    RunTerminated,
    RunWriteError,
    refuse_options,
)
from .tasks import TASK_FAMILIES
from .train import LSTM_ONLY, MetaTrainConfig, canonical_command, config_from_args, meta_train
from .unroll import LOSS_WEIGHTINGS

#: what ``--algo`` accepts: update-rule training, then the few-shot learners of :mod:`learnedopt.meta.fewshot`
ALGOS: tuple[str, ...] = ("lstm", "maml", "fomaml", "reptile", "meta-lstm")


def add_meta_train_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``meta-train`` subcommand on ``learnedopt``'s subparsers."""
    parser = sub.add_parser(
        "meta-train", help="meta-train an update rule, or a few-shot learner (--algo)"
    )
    configure_parser(parser)
    return parser


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``meta-train`` arguments to ``parser`` and set its handler.

    Options whose default depends on ``--algo`` (or that only one algorithm reads) default to
    None here; :func:`config_from_args` and :func:`learnedopt.meta.fewshot.config_from_args`
    fill them in.
    """
    d = MetaTrainConfig()
    parser.add_argument(
        "--algo",
        default="lstm",
        help=f"what to meta-train: {', '.join(ALGOS)} (default lstm: an update rule by truncated "
        "unrolls; the others: a few-shot learner, see --task sinusoid|omniglot)",
    )
    # --rule and --preset exclude each other (MetaTrainConfig.validate), but for a weight file of your
    # own rule, whose class --rule module:Class names
    parser.add_argument(
        "--rule",
        help=f"the update rule, {' or '.join(sorted(RULES))}: for lstm the rule to train from its seeded "
        f"init (default {d.rule}), or your own UpdateRule as module:Class (with --preset: the class of its weight "
        "file); for meta-lstm the learned inner-loop update (default MetaLSTMCell)",
    )
    parser.add_argument(
        "--preset",
        help=f"lstm: start from a preset's weights ({', '.join(sorted(PRESETS))}) or a weight file's (of your own "
        "rule: with --rule module:Class); meta-lstm: start the learned inner-loop update from them",
    )
    parser.add_argument(
        "--rule-config",
        type=_json_object,
        metavar="JSON",
        help="lstm, meta-lstm: architecture of --rule as a JSON object of its config fields, e.g. "
        "'{\"momentum_decays\": [0.9, 0.99], \"rms_decays\": [0.999]}' (default: the class's)",
    )
    parser.add_argument(
        "--task",
        help=f"task family: for lstm {', '.join(TASK_FAMILIES)}, or a mixture such as "
        "mlp-random+quadratic (each meta-batch from one member, drawn uniformly; "
        f"mlp-random:3+quadratic draws mlp-random three times as often; default {d.task}), or your "
        "own TaskFamily as module:Class; "
        "for the few-shot algos sinusoid or omniglot (default sinusoid), or your own FewShotFamily "
        "as module:attribute",
    )
    parser.add_argument(
        "--unroll", type=int, metavar="T", help=f"lstm: truncation length (default {d.unroll})"
    )
    parser.add_argument(
        "--horizon",
        type=int,
        metavar="H",
        help=f"lstm: optimizee steps per episode (default {d.horizon})",
    )
    parser.add_argument(
        "--meta-batch",
        type=int,
        metavar="B",
        help=f"tasks per meta-step (default {d.meta_batch} for lstm; {_fewshot_default('meta_batch')})",
    )
    parser.add_argument(
        "--meta-steps",
        type=int,
        metavar="S",
        help=f"meta-steps to run (default {d.meta_steps} for lstm; {_fewshot_default('meta_steps')})",
    )
    parser.add_argument(
        "--meta-lr",
        type=float,
        help=f"Adam learning rate; Reptile's outer step size (default {d.meta_lr} for lstm; "
        f"{_fewshot_default('meta_lr')})",
    )
    parser.add_argument(
        "--clip",
        type=float,
        help=f"lstm, maml, fomaml, meta-lstm: meta-gradient norm clip (default {d.clip} for lstm, "
        "0.25 for meta-lstm, none for maml and fomaml)",
    )
    parser.add_argument(
        "--lr", type=float, help=f"lstm: multiplier of the rule's step (default {d.lr})"
    )
    parser.add_argument(
        "--second-order",
        action="store_true",
        default=None,
        help="lstm: keep second-order terms (do not detach optimizee gradients)",
    )
    parser.add_argument(
        "--random-horizon",
        action="store_true",
        default=None,
        help="lstm: each training episode runs a horizon drawn uniformly from [T, H] (default: H)",
    )
    parser.add_argument(
        "--loss-weighting",
        help=f"lstm: weight of each step's loss in the meta-loss: {', '.join(LOSS_WEIGHTINGS)} "
        f"(linear: 2t/(H+1) for step t of H, leaning toward the final loss; quadratic: "
        f"6t^2/((H+1)(2H+1)), leaning further; default {d.loss_weighting})",
    )
    parser.add_argument(
        "--select-every",
        type=int,
        metavar="N",
        help="score the learner every N meta-steps (and before the first and at the last) on fixed "
        "held-out tasks (lstm: an episode of meta_valid tasks; few-shot: validation tasks) and save "
        f"the best weights, not the last (default {d.select_every}: no selection)",
    )
    parser.add_argument(
        "--select-tasks",
        type=int,
        metavar="K",
        help="lstm: tasks of the --select-every episode (default: --meta-batch; few-shot algorithms "
        "score on --val-tasks)",
    )
    add_fewshot_arguments(parser)
    parser.add_argument(
        "--seed", type=int, default=d.seed, help=f"seed of every random draw (default {d.seed})"
    )
    parser.add_argument(
        "--out",
        type=path_arg,
        required=True,
        metavar="DIR",
        help="output folder (log, checkpoints, weights, model card)",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=10,
        metavar="N",
        help="checkpoint every N meta-steps (default 10)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    parser.add_argument(
        "--data",
        type=path_arg,
        metavar="PATH",
        help="MNIST folder (or a folder holding mnist/) for --task mnist-mlp and mlp-random (and mixtures with them), folder of the Omniglot zips (or a folder holding omniglot/) for --task omniglot "
        "(default: LEARNEDOPT_DATA, then ../shared/data, then shared/data beside the repository of a source checkout); "
        "given as data= to your own family (--task module:Class or module:attribute) where it takes one",
    )
    parser.add_argument(
        "--dist-timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help="under torchrun: fail the job when a rank has not reached a collective after this "
        f"long, e.g. because it died or hangs (default {DEFAULT_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--device",
        help=f"where meta-training runs: cpu or cuda[:N] (default {d.device}; under torchrun, cuda is "
        "each rank's own GPU and cuda:N is refused)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument(
        "--stop-after", type=int, default=None, help=argparse.SUPPRESS
    )  # tests: simulated kill
    # not an option, refused by _run in one line: argparse took it for its abbreviation
    # --first-order-until ("expected one argument"; "--first-order 100" ran that silently); a
    # value given it is taken too, so that the refusal says why, not "unrecognized arguments: 100"
    parser.add_argument("--first-order", nargs="?", const=True, default=None, help=argparse.SUPPRESS)  # given at all: refused
    parser.set_defaults(func=run_meta_train)


def _fewshot_default(field: str) -> str:
    """The few-shot algorithms' defaults of ``field`` for the help, from
    :func:`~learnedopt.meta.fewshot.fewshot_defaults` itself, so the two cannot disagree."""
    parts = []
    for task in FEWSHOT_TASKS:
        by_algo: dict[Any, list[str]] = {}
        for algo in ALGOS[1:]:
            by_algo.setdefault(fewshot_defaults(algo, task, None)[field], []).append(algo)
        if len(by_algo) == 1:
            parts.append(f"{task}: {next(iter(by_algo)):g}")
        else:
            parts.append(f"{task}: " + ", ".join(f"{'/'.join(algos)} {value:g}" for value, algos in by_algo.items()))
    return "; ".join(parts)


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text}")
    return value


def run_meta_train(args: argparse.Namespace) -> int:
    """Handler of ``learnedopt meta-train``: returns 0, or 2 after a one-line error on stderr
    (bad configuration), or 1 (another rank of a ``torchrun`` job failed, or a file of the run
    cannot be written, a full disk: one line naming it), or 130 after Ctrl-C, with
    one line that says where ``--resume`` continues from, or 143 after SIGTERM, once the meta-step
    in progress is finished and checkpointed.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) it joins the process group first (gloo on CPU, see
    :mod:`learnedopt.meta.distributed`) and leaves it at the end.
    """
    try:  # in a single process too, where it is not used: a value no torchrun job could take
        distributed.check_timeout(args.dist_timeout)
    except ValueError as err:
        print(f"learnedopt meta-train: error: --dist-timeout {err}", file=sys.stderr)
        return 2
    try:
        keep_freed_memory()  # before the first truncation allocates
    except ValueError as err:
        print(f"learnedopt meta-train: error: {err}", file=sys.stderr)
        return 2
    try:
        workers = distributed.init_from_env(args.dist_timeout)
    except (RuntimeError, ValueError) as err:
        print(f"learnedopt meta-train: error: cannot join the torchrun job: {err}", file=sys.stderr)
        return 1
    finished = False
    try:
        code = _run(args, workers)
        finished = True
        return code
    except ConfigError as err:
        if workers.is_main:  # every rank fails the same check; one line is enough
            print(f"learnedopt meta-train: error: {err}", file=sys.stderr)
        return 2
    except RunWriteError as err:  # a full disk: one line, not torch's or safetensors' traceback
        print(f"learnedopt meta-train: error: {err}", file=sys.stderr)
        return 1
    except DistributedError as err:
        print(f"learnedopt meta-train: error: {err}; continue the job from the last checkpoint "
              f"with --resume", file=sys.stderr)  # fmt: skip
        return 1
    except RunTerminated as err:
        if workers.is_main:
            print(f"learnedopt meta-train: {err}", file=sys.stderr)
        return 143  # 128 + SIGTERM, as a shell reports a process that SIGTERM ended
    except KeyboardInterrupt as err:
        if workers.is_main:
            print(f"learnedopt meta-train: {_interrupted(err, Path(args.out))}", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports a process that Ctrl-C ended
    finally:
        distributed.shutdown(wait_for_all=finished)


def _interrupted(err: KeyboardInterrupt, out: Path) -> str:
    """The one line for Ctrl-C: :class:`RunInterrupted`'s own (during the meta-steps), else what
    ``out`` holds, so the user knows whether ``--resume`` has anything to continue."""
    if isinstance(err, RunInterrupted):
        return str(err)
    if (out / CHECKPOINT_NAME).exists() or (out / LOG_NAME).exists():
        return f"interrupted; continue the run in {out} with --resume"
    return f"interrupted before the run wrote anything to {out}: run the command again, without --resume"


#: the refusal of ``--first-order`` (no option: first-order MAML is an algorithm of its own) by ``--algo``
_FIRST_ORDER = {
    "lstm": "--first-order is not an option: --algo lstm is first-order already (the optimizee's gradients are detached; "
            "--second-order keeps their second-order terms)",
    "maml": "--first-order is not an option: first-order MAML is --algo fomaml "
            "(--first-order-until STEPS makes --algo maml first-order for its first STEPS meta-steps)",
    "fomaml": "--first-order is not an option: --algo fomaml is first-order MAML already",
    "reptile": "--first-order is not an option: --algo reptile is first-order by construction (it has no meta-gradient)",
    "meta-lstm": "--first-order is not an option: --algo meta-lstm is first-order already (its rule reads detached gradients)",
}


def _run(args: argparse.Namespace, workers: Workers) -> int:
    if args.algo not in ALGOS:
        raise ConfigError(f"unknown algo {args.algo!r}; choose from {', '.join(ALGOS)}")
    if args.first_order is not None:  # with any value, "" (--first-order=) too
        raise ConfigError(_FIRST_ORDER[args.algo])  # every algo has its line
    if args.algo != "lstm":
        # meta-lstm's inner loop is an update rule: --rule and --rule-config are its options too
        rule_options = ("rule", "rule_config", "preset")
        if args.algo != "meta-lstm":
            refuse_options(args, rule_options, f"--algo {args.algo}", "--algo lstm, meta-lstm")
        refuse_options(args, [n for n in LSTM_ONLY if n not in rule_options], f"--algo {args.algo}", "--algo lstm")
        message = run_fewshot(args, workers)
        if message and workers.is_main:
            print(message)
        return 0
    if args.task in FEWSHOT_TASKS:  # before the options it refuses, which would name a lesser mistake
        raise ConfigError(
            f"--task {args.task} is a few-shot task: meta-train it with --algo {', '.join(ALGOS[1:])} "
            f"(the default --algo lstm trains update rules on {', '.join(TASK_FAMILIES)})"
        )
    refuse_options(args, FEWSHOT_ONLY, "--algo lstm", "--algo " + ", ".join(ALGOS[1:]))
    config = config_from_args(args)
    command = canonical_command(config, args.out, args.checkpoint_every)
    result = meta_train(
        config,
        args.out,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        command=command,
        max_steps=args.stop_after,
        progress=not args.quiet,
        workers=workers,
    )
    if result.finished and workers.is_main:
        print(
            f"wrote {Path(args.out) / WEIGHTS_NAME} and {CARD_NAME}: evaluation loss "
            f"{result.eval['initial']:.6g} (initial rule) -> {result.eval['final']:.6g} (meta-trained"
            + (f", selected at meta-step {result.selected_step})" if config.select_every else ")")
        )
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "python -m learnedopt.meta.train") -> int:
    """``python -m learnedopt.meta.train ARGS`` (the same as ``learnedopt meta-train ARGS``);
    ``prog`` names the command in the help and usage text."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Meta-train an update rule or a few-shot learner.",
    )
    configure_parser(parser)
    return run_meta_train(parser.parse_args(argv))

