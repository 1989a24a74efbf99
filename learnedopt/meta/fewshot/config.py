"""The configuration of a few-shot meta-training run: :class:`FewShotConfig`, the per-algorithm
and per-task defaults, and the ``meta-train`` options only the few-shot algorithms read."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
from dataclasses import dataclass
from typing import Any


from ...nn import RULES, MetaLSTMCell
from ...plugins import entry_point_path
from ...values import is_integer
from ...weights import load_weights
from ..loop import (
    PATH_FIELDS,
    ConfigError,
    check_elements,
    check_rule_config,
    check_select_every,
    default_rule_config,
    path_string,
    refuse_options,
    rule_config_given,
)

FEWSHOT_ALGOS: tuple[str, ...] = ("maml", "fomaml", "reptile", "meta-lstm")
FEWSHOT_TASKS: tuple[str, ...] = ("sinusoid", "omniglot")
#: the task names the few-shot algorithms take, for error messages
TASK_SYNTAX = f"{' or '.join(FEWSHOT_TASKS)}, or your own few-shot family as module:attribute (e.g. mytasks:LineFamily)"
#: options only the few-shot algorithms read (argparse dest names)
FEWSHOT_ONLY: tuple[str, ...] = (
    "ways", "shots", "queries", "inner_steps", "inner_lr", "test_inner_steps", "learn_inner_lr",
    "hidden", "image_size", "same_alphabet", "same_rotation", "augment", "val_tasks", "train_shots", "inner_batch",
    "zero_head", "head_only", "valid_alphabets", "test_alphabets", "multi_step_loss", "first_order_until",
)  # fmt: skip
SINUSOID_VALID_QUERIES = 100  # query points per validation task (Finn et al.'s code tests on K: noisier)
_OMNIGLOT_ONLY = ("ways", "hidden", "image_size", "same_alphabet", "same_rotation", "augment", "valid_alphabets",
                  "test_alphabets", "data")  # fmt: skip


@dataclass(frozen=True)
class FewShotConfig:
    """Everything that determines a few-shot meta-training run (defaults: :func:`fewshot_defaults`).

    Attributes:
        algo: ``maml``, ``fomaml``, ``reptile`` or ``meta-lstm``.
        task: ``sinusoid``, ``omniglot``, or your own
            :class:`~learnedopt.meta.fewshot.FewShotFamily` as ``module:attribute``.
        ways: classes per Omniglot episode (None for sinusoid and your own family).
        shots: support examples per class (points per sinusoid task); your own family: given to
            it as ``shots=`` (None: not given, the family's own size).
        queries: query examples per class (points per sinusoid task); your own family: as
            ``shots``.
        inner_steps: inner-loop steps during meta-training.
        inner_lr: inner step size (MAML, Reptile); None for meta-lstm, whose rule sets the step.
        test_inner_steps: inner steps when adapting after meta-training (validation, evaluation).
        learn_inner_lr: Meta-SGD step sizes (maml, fomaml).
        zero_head: start every task's output layer at zero instead of a learned value (maml,
            fomaml; ``MAML(zero_init=...)``, Kao et al. 2022's zeroing trick).
        head_only: adapt only the output layer in the inner loop; the rest of the network is
            meta-learned but not adapted (maml, fomaml; ``MAML(adapt_only=...)``, ANIL, Raghu et
            al. 2020).
        multi_step_loss: maml, fomaml: MAML++'s annealed multi-step loss over the first this many
            meta-steps (:func:`learnedopt.meta.maml.multi_step_loss_weights`; the logged
            meta-loss is then the weighted one); None: the last inner step's loss only.
        first_order_until: maml: first-order meta-gradients for the first this many meta-steps,
            second-order after (MAML++'s derivative-order annealing); None: second-order
            throughout.
        meta_batch: tasks per meta-step.
        meta_steps: meta-steps in total.
        meta_lr: Adam learning rate; for Reptile the initial outer step size.
        clip: meta-gradient norm clip, None for none (default 0.25 for meta-lstm, none for maml
            and fomaml; reptile, without a meta-gradient, refuses it).
        hidden: conv-4 filters (Omniglot).
        image_size: Omniglot image side in pixels.
        same_alphabet: draw every episode's classes from one alphabet.
        same_rotation: draw every meta-training episode's classes from one rotation (0, 90, 180
            or 270 degrees), so that, as in the unrotated validation and test episodes, its
            characters share an orientation; with ``same_alphabet``, one rotated alphabet.
        augment: distort every meta-training image by its own random affine map
            (:func:`learnedopt.data.augment.random_affine`, Koch et al. 2015's ranges);
            validation and evaluation images are never distorted.
        val_tasks: validation tasks (a fixed draw) for the end-of-run metric.
        seed: the root of every random draw.
        data: folder of the Omniglot zips (None: the default search); omniglot only. A
            ``pathlib.Path`` here or in ``preset`` is held as its string.
        rule: meta-lstm's update rule, a key of :data:`learnedopt.nn.RULES` (None:
            ``MetaLSTMCell``); None for the other algorithms.
        preset: meta-lstm: a preset or weight file whose rule (architecture and weights) the
            learned update starts from, instead of ``rule``'s seeded initialisation.
        rule_config: meta-lstm: the rule's config fields that differ from its class's defaults,
            e.g. ``{"input_bias_init": [-0.5, -0.3]}`` to start from a larger step (None: the
            paper's; an empty one becomes None); None for the other algorithms.
        train_shots: support examples per class of the meta-training tasks (None: ``shots``);
            validation and evaluation use ``shots``.
        inner_batch: Reptile's examples per inner step, drawn from the support set without
            replacement (None: the whole support set every step).
        device: where meta-training runs, ``"cpu"`` or ``"cuda[:N]"`` (under several processes
            ``"cuda"``, each rank's GPU; tasks are drawn on the CPU, so it changes results only by
            rounding, but for the network's draws from torch's global RNG, e.g. dropout: on a GPU
            from its generator; a run may resume on another device).
        valid_alphabets, test_alphabets: Omniglot: comma-separated alphabet names of the
            meta-valid and meta-test parts, the other alphabets meta-training's (both or
            neither; None: the fixed split :data:`~learnedopt.meta.fewshot.sources.OMNIGLOT_SPLIT`,
            seed 0), e.g. to hold out
            each alphabet once across several runs.
        select_every: score the learner every this many meta-steps (and before the first and at
            the last) by its mean query loss on a fixed draw of ``val_tasks`` validation tasks
            (not the card's) and keep the best (:class:`learnedopt.meta.loop.Selection`); 0: keep
            the last.
    """

    algo: str
    task: str
    ways: int | None
    shots: int | None
    queries: int | None
    inner_steps: int
    inner_lr: float | None
    test_inner_steps: int
    learn_inner_lr: bool
    meta_batch: int
    meta_steps: int
    meta_lr: float
    clip: float | None
    hidden: int | None
    image_size: int | None
    same_alphabet: bool
    val_tasks: int
    seed: int = 0
    data: str | None = None
    rule: str | None = None
    train_shots: int | None = None
    inner_batch: int | None = None
    device: str = "cpu"
    same_rotation: bool = False
    augment: bool = False
    rule_config: dict[str, Any] | None = None
    zero_head: bool = False
    head_only: bool = False
    valid_alphabets: str | None = None
    test_alphabets: str | None = None
    select_every: int = 0
    multi_step_loss: int | None = None
    first_order_until: int | None = None
    preset: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "rule_config", default_rule_config(self.rule_config))
        for name in PATH_FIELDS:  # a pathlib.Path of the API, which the checkpoint and config.json could not record
            object.__setattr__(self, name, path_string(getattr(self, name)))

    @property
    def meta_steps_shape_the_run(self) -> bool:
        """Reptile anneals its outer step over ``meta_steps``; ``select_every`` scores the last step."""
        return self.algo == "reptile" or self.select_every > 0

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad setting."""
        if self.algo not in FEWSHOT_ALGOS:
            raise ConfigError(f"unknown few-shot algo {self.algo!r}; choose from {', '.join(FEWSHOT_ALGOS)}")
        own = entry_point_path(self.task) is not None
        if self.task not in FEWSHOT_TASKS and not own:
            raise ConfigError(f"--algo {self.algo} trains on --task {TASK_SYNTAX}, not {self.task!r}")
        names = ["inner_steps", "test_inner_steps", "meta_batch", "meta_steps", "val_tasks"]
        names += ["ways", "hidden", "image_size"] if self.task == "omniglot" else []
        optional = ("shots", "queries", "train_shots", "inner_batch", "multi_step_loss", "first_order_until")
        names += [n for n in optional if getattr(self, n) is not None]
        if not own and (self.shots is None or self.queries is None):
            raise ConfigError(f"--task {self.task} needs --shots and --queries, got {self.shots} and {self.queries}")
        for name in names:
            # the API's float or None (the command line gives integers) failed later, naming another option
            if not is_integer(getattr(self, name)) or getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        if self.task == "omniglot" and self.ways < 2:
            raise ConfigError(f"--ways must be at least 2, got {self.ways}")
        self._check_sizes()
        if not is_integer(self.seed) or self.seed < 0:  # derive_seed took int(0.5): seed 0's draws
            raise ConfigError(f"--seed must be a non-negative integer, got {self.seed}")
        check_select_every(self.select_every)
        if self.inner_batch is not None and self.algo != "reptile":
            raise ConfigError(f"--inner-batch sets Reptile's inner minibatch, not --algo {self.algo}'s (its inner steps read the whole support set)")
        if self.zero_head and self.algo not in ("maml", "fomaml"):
            raise ConfigError(f"--zero-head sets how MAML starts each task's output layer, not --algo {self.algo}'s")
        if self.head_only and self.algo not in ("maml", "fomaml"):
            raise ConfigError(f"--head-only sets which layers MAML's inner loop adapts, not --algo {self.algo}'s")
        if self.first_order_until is not None and self.algo != "maml":
            raise ConfigError(
                f"--first-order-until anneals MAML's meta-gradient from first to second order, not --algo {self.algo}'s"
                + (" (first-order throughout)" if self.algo == "fomaml" else "")
            )
        if self.multi_step_loss is not None and self.algo not in ("maml", "fomaml"):
            raise ConfigError(f"--multi-step-loss weighs MAML's query losses after each inner step, not --algo {self.algo}'s")
        # the command line refuses these first; the API's configuration must too, or the run
        # ignores them while the model file and card record them
        if self.learn_inner_lr and self.algo not in ("maml", "fomaml"):
            raise ConfigError(f"--learn-inner-lr learns MAML's inner step sizes (Meta-SGD), not --algo {self.algo}'s")
        if self.inner_lr is not None and self.algo == "meta-lstm":
            raise ConfigError("--inner-lr sets the inner step size of MAML and Reptile, not --algo meta-lstm's (its rule learns the step)")
        if self.clip is not None and self.algo == "reptile":
            raise ConfigError("--clip clips a meta-gradient, and --algo reptile has none (its outer step is --meta-lr)")
        if self.task != "omniglot":
            given = [name for name in _OMNIGLOT_ONLY if getattr(self, name) is not None and getattr(self, name) is not False
                     and not (own and name == "data")]  # fmt: skip
            if given:
                raise ConfigError(f"--{given[0].replace('_', '-')} is an Omniglot setting; --task {self.task} does not read it")
        if (self.valid_alphabets is None) != (self.test_alphabets is None):
            raise ConfigError("--valid-alphabets and --test-alphabets choose the split together: give both or neither")
        if self.rule is not None and self.algo != "meta-lstm":
            raise ConfigError(f"--rule chooses the learned update of --algo meta-lstm (and lstm), not --algo {self.algo}")
        if self.rule is not None and self.rule not in RULES:
            own = " (your own rule as module:Class is for --algo lstm)" if ":" in self.rule else ""
            raise ConfigError(f"unknown rule {self.rule!r}; choose from {', '.join(sorted(RULES))}{own}")
        if self.preset is not None:
            if self.algo != "meta-lstm":
                raise ConfigError(f"--preset starts the learned update of --algo meta-lstm (and lstm), not --algo {self.algo}")
            if self.rule is not None or self.rule_config is not None:
                raise ConfigError("--preset brings its rule's architecture and weights: give --rule and --rule-config, or --preset")
            try:
                load_weights(self.preset)
            except (ValueError, OSError) as err:
                raise ConfigError(f"--preset: {err}") from None
        if self.rule_config is not None:
            if self.algo != "meta-lstm":
                raise ConfigError(f"--rule-config sets the learned update of --algo meta-lstm (and lstm), not --algo {self.algo}")
            check_rule_config(self.rule or MetaLSTMCell.kind, self.rule_config)
        for name in ("meta_lr", "inner_lr", "clip"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive number, got {value}")

    def _check_sizes(self) -> None:
        """Raise :class:`ConfigError` where the counts (positive already) would size a tensor of a
        meta-step beyond :data:`~learnedopt.values.MAX_ELEMENTS`: the inner loops' per-step
        losses and minibatches, a meta-batch's or the validation draw's examples (Omniglot:
        ``(tasks, ways * examples, 1, S, S)`` images), the conv-4's ``(hidden, hidden, 3, 3)``
        weights. Counts of meta-steps (``meta_steps``, ``multi_step_loss``, ...) size none."""
        for name in ("inner_steps", "test_inner_steps"):
            check_elements(f"--{name.replace('_', '-')} {getattr(self, name)}", getattr(self, name),
                           "an inner loop's per-step losses")  # fmt: skip
        if self.inner_batch is not None:
            check_elements(f"--inner-steps {self.inner_steps} and --inner-batch {self.inner_batch}",
                           self.inner_steps * self.inner_batch, "Reptile's (steps, batch) inner minibatches")  # fmt: skip
        omniglot = self.task == "omniglot"
        pixels, ways = (self.image_size**2, self.ways) if omniglot else (1, 1)
        train_shots = ("--train-shots", self.train_shots) if self.train_shots is not None else ("--shots", self.shots)
        valid_queries = ("validation queries", SINUSOID_VALID_QUERIES) if self.task == "sinusoid" else ("--queries", self.queries)
        draws = [(("--meta-batch", self.meta_batch), examples) for examples in (train_shots, ("--queries", self.queries))]
        draws += [(("--val-tasks", self.val_tasks), examples) for examples in (("--shots", self.shots), valid_queries)]
        for (tasks_option, tasks), (examples_option, examples) in draws:
            options = f"{tasks_option} {tasks}" + ("" if examples is None else f" and {examples_option} {examples}")
            examples = examples or 1  # None: your own family's own size, at least one example
            options += f" (with --ways {ways} and --image-size {self.image_size})" if omniglot else ""
            check_elements(options, tasks * ways * examples * pixels, "the tasks' examples")
        if omniglot:
            check_elements(f"--hidden {self.hidden}", self.hidden**2 * 9, "the conv-4's (hidden, hidden, 3, 3) weights")

    def to_dict(self) -> dict[str, Any]:
        """Every field by name, as the checkpoint and the model card record the configuration."""
        return dataclasses.asdict(self)

    def same_run_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` as a resume compares it with the run's: ``train_shots`` as the run takes
        it (``shots`` for None), meta-lstm's ``rule`` (``MetaLSTMCell`` for None) and its
        ``rule_config`` without the class's defaults
        (:func:`~learnedopt.meta.loop.rule_config_given`), the Omniglot alphabets as a sorted
        list (the split takes them as a set), so that a setting the run took by default, or in
        another spelling, may be given so."""
        from .sources import parse_alphabets  # sources imports this module

        d = self.to_dict()
        d["train_shots"] = self.shots if self.train_shots is None else self.train_shots
        if self.algo == "meta-lstm" and self.preset is None:
            d["rule"] = self.rule or MetaLSTMCell.kind
            d["rule_config"] = rule_config_given(d["rule"], self.rule_config)
        for name in ("valid_alphabets", "test_alphabets"):
            names = parse_alphabets(getattr(self, name))
            d[name] = None if names is None else ",".join(sorted(names))
        return d


def fewshot_defaults(algo: str, task: str, ways: int | None) -> dict[str, Any]:
    """Default settings of ``algo`` on ``task``: those of the papers (MAML: Finn et al. 2017;
    Reptile: Nichol et al. 2018; meta-lstm: Ravi & Larochelle 2017), scaled like the benchmarks.
    Your own family (``module:attribute``) takes sinusoid's, but no ``shots`` and ``queries``
    (the family's own sizes)."""
    own = entry_point_path(task) is not None
    sinusoid = task != "omniglot"
    many_ways = (ways or 5) > 5
    train_shots = inner_batch = None
    if algo in ("maml", "fomaml"):
        inner = (1, 0.01, 10) if sinusoid else ((5, 0.1, 5) if many_ways else (1, 0.4, 3))
        meta_lr = 1e-3
    elif algo == "reptile":
        # Omniglot: Nichol et al.'s runs (1-shot: 10 train shots, minibatches of 10 / 20 ways)
        inner = (5, 0.02, 10) if sinusoid else ((10, 5e-4, 50) if many_ways else (5, 1e-3, 50))
        meta_lr = 0.1 if sinusoid else 1.0
        if not sinusoid:
            train_shots, inner_batch = 10, (20 if many_ways else 10)
    else:
        inner, meta_lr = (5, None, 5), 1e-3
    return {
        "ways": None if sinusoid else 5,
        "shots": None if own else (10 if sinusoid else 1),
        "queries": None if own else (10 if sinusoid else 5),
        "inner_steps": inner[0],
        "inner_lr": inner[1],
        "test_inner_steps": inner[2],
        "learn_inner_lr": False,
        "zero_head": False,
        "head_only": False,
        "multi_step_loss": None,
        "first_order_until": None,
        "meta_batch": (1 if algo == "reptile" else 25) if sinusoid else (5 if algo == "reptile" else 8),
        "meta_steps": 20_000 if sinusoid else 1000,
        "meta_lr": meta_lr,
        "clip": 0.25 if algo == "meta-lstm" else None,
        "hidden": None if sinusoid else 64,
        "image_size": None if sinusoid else 28,
        "same_alphabet": False,
        "same_rotation": False,
        "augment": False,
        "val_tasks": 100,
        "train_shots": train_shots,
        "inner_batch": inner_batch,
        "valid_alphabets": None,
        "test_alphabets": None,
    }


def config_from_args(args: argparse.Namespace) -> FewShotConfig:
    """The few-shot configuration of parsed ``meta-train`` arguments; refuses options that do not
    apply to the chosen few-shot algorithm or task (:mod:`learnedopt.meta.command` has already
    refused the update-rule-only options)."""
    algo = args.algo
    task = "sinusoid" if args.task is None else args.task
    own = entry_point_path(task) is not None
    if task not in FEWSHOT_TASKS and not own:
        raise ConfigError(f"--algo {algo} trains on --task {TASK_SYNTAX}, not {task!r}")
    if task == "sinusoid":
        refuse_options(args, _OMNIGLOT_ONLY, "--task sinusoid", "--task omniglot")
    if own:  # --data goes to the family, which refuses it if it takes none
        refuse_options(args, [n for n in _OMNIGLOT_ONLY if n != "data"], f"--task {task} (your own family)", "--task omniglot")
    if algo == "reptile":
        refuse_options(args, ("clip",), "--algo reptile (it has no meta-gradient)", "--algo lstm, maml, fomaml, meta-lstm")
    if algo == "meta-lstm":
        refuse_options(args, ("inner_lr",), "--algo meta-lstm (its rule learns the step)", "--algo maml, fomaml, reptile")
    if algo not in ("maml", "fomaml"):
        refuse_options(args, ("learn_inner_lr", "zero_head", "head_only", "multi_step_loss"), f"--algo {algo}", "--algo maml, fomaml")
    if algo != "maml":
        refuse_options(args, ("first_order_until",), f"--algo {algo}", "--algo maml")
    if algo != "reptile":
        refuse_options(args, ("inner_batch",), f"--algo {algo}", "--algo reptile")
    values = fewshot_defaults(algo, task, args.ways)
    values.update(
        {k: getattr(args, k) for k in (*FEWSHOT_ONLY, "meta_batch", "meta_steps", "meta_lr", "clip")
         if getattr(args, k) is not None}
    )  # fmt: skip
    rule, rule_config, preset = (args.rule, args.rule_config, args.preset) if algo == "meta-lstm" else (None, None, None)
    device = FewShotConfig.device if args.device is None else args.device
    return FewShotConfig(algo=algo, task=task, seed=args.seed, data=args.data, rule=rule, rule_config=rule_config, preset=preset,
                         device=device, select_every=args.select_every or 0, **values)  # fmt: skip


def add_fewshot_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of the few-shot algorithms to the ``meta-train`` parser (all default None:
    unset options take :func:`fewshot_defaults`)."""
    group = parser.add_argument_group("few-shot algorithms (--algo maml, fomaml, reptile, meta-lstm)")
    group.add_argument("--ways", type=int, metavar="N", help="omniglot: classes per episode (default 5)")
    group.add_argument("--shots", type=int, metavar="K", help="support examples per class (default 1; sinusoid: 10 points)")
    group.add_argument("--queries", type=int, metavar="Q", help="query examples per class (default 5; sinusoid: 10 points)")
    group.add_argument("--inner-steps", type=int, help="inner-loop steps in meta-training (default: the paper's)")
    group.add_argument("--inner-lr", type=float, help="inner step size of MAML and Reptile (default: the paper's)")
    group.add_argument("--test-inner-steps", type=int, help="inner steps when adapting after training (default: the paper's)")
    group.add_argument("--learn-inner-lr", action="store_true", default=None, help="maml, fomaml: learn a step size per parameter (Meta-SGD)")
    group.add_argument("--zero-head", action="store_true", default=None,
                       help="maml, fomaml: start every task's output layer at zero, not at a learned value (zeroing trick)")  # fmt: skip
    group.add_argument("--head-only", action="store_true", default=None,
                       help="maml, fomaml: adapt only the output layer in the inner loop; the rest is meta-learned only (ANIL)")  # fmt: skip
    group.add_argument("--first-order-until", type=int, metavar="STEPS",
                       help="maml: first-order meta-gradients for the first STEPS meta-steps, then second-order (MAML++)")  # fmt: skip
    group.add_argument("--multi-step-loss", type=int, metavar="STEPS",
                       help="maml, fomaml: MAML++'s multi-step loss, annealed to the last inner step's over the first STEPS meta-steps")  # fmt: skip
    group.add_argument("--hidden", type=int, help="omniglot: conv-4 filters (default 64)")
    group.add_argument("--image-size", type=int, help="omniglot: image side in pixels (default 28)")
    group.add_argument("--same-alphabet", action="store_true", default=None, help="omniglot: each episode within one alphabet")
    group.add_argument("--same-rotation", action="store_true", default=None,
                       help="omniglot: each training episode's characters share one rotation, as in the upright test episodes")  # fmt: skip
    group.add_argument("--augment", action="store_true", default=None,
                       help="omniglot: distort each training image by a random affine map (rotation, shear, scale, shift)")  # fmt: skip
    group.add_argument("--valid-alphabets", metavar="NAMES",
                       help="omniglot: comma-separated meta-valid alphabets (with --test-alphabets; default: the fixed split)")  # fmt: skip
    group.add_argument("--test-alphabets", metavar="NAMES",
                       help="omniglot: comma-separated meta-test alphabets, never read in meta-training (with --valid-alphabets)")  # fmt: skip
    group.add_argument("--val-tasks", type=int, help="validation tasks for the final metric (default 100)")
    group.add_argument("--train-shots", type=int, help="support examples per class in meta-training (default: --shots; reptile on omniglot: 10)")
    group.add_argument("--inner-batch", type=int, help="reptile: examples per inner step (default: the whole support set; omniglot: 10, 20 for more than 5 ways)")


def canonical_command(config: FewShotConfig, out: str | os.PathLike[str], checkpoint_every: int) -> str:
    """The ``learnedopt meta-train`` command line that runs ``config`` from scratch: every setting
    explicit except those that are None or False and the default ``--device cpu`` and
    ``--select-every 0``."""
    words = ["learnedopt", "meta-train"]
    for key, value in config.to_dict().items():
        if value is None or value is False or (key in ("device", "select_every") and value == getattr(FewShotConfig, key)):
            continue
        text = json.dumps(value, sort_keys=True) if isinstance(value, dict) else str(value)
        words += [f"--{key.replace('_', '-')}"] + ([] if value is True else [text])
    words += ["--out", str(out), "--checkpoint-every", str(checkpoint_every)]
    return shlex.join(words)
