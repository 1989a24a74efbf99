"""Few-shot meta-training for ``learnedopt meta-train --algo maml|fomaml|reptile|meta-lstm``, the
model file of a meta-trained few-shot learner, and ``learnedopt evaluate omniglot-runs``.

Algorithms (all train the model's parameters as the learned initialisation):

- ``maml`` / ``fomaml``: :class:`learnedopt.meta.MAML` (second- / first-order), Adam outer
  optimizer; ``--learn-inner-lr`` learns a step size per parameter element (Meta-SGD).
- ``reptile``: :class:`learnedopt.meta.Reptile`, outer step size ``--meta-lr`` annealed linearly
  to 0 over ``--meta-steps``; inner optimizer SGD (sinusoid) or Adam with betas (0, 0.999)
  (Omniglot, Nichol et al. 2018), learning rate ``--inner-lr``. As in Nichol et al.'s Omniglot
  runs, meta-training tasks have ``--train-shots`` examples per class (10), each inner step reads
  a minibatch of ``--inner-batch`` of them (shuffled, without replacement until all are used),
  and adapting after training takes 50 full-batch steps on the ``--shots``-shot support set.
- ``meta-lstm``: Ravi & Larochelle 2017. The inner loop is :class:`learnedopt.nn.MetaLSTMCell`'s
  update (``MetaLSTMOptimizer``'s) run by :func:`learnedopt.meta.unroll.unroll` on each task's
  support set, from the learned initial parameters; the meta-loss is the query loss at the
  adapted parameters; Adam trains the model's parameters and the rule's together. As in the
  paper, the optimizee gradients the rule reads are detached (no second-order terms), and the
  meta-gradient norm is clipped (``--clip``). ``--rule CoordinateLSTM`` puts
  ``LSTMOptimizer``'s update in the inner loop instead.

Tasks: ``sinusoid`` (K-shot regression of Finn et al. 2017, MLP 1-40-40-1 with ReLU, MSE) and
``omniglot`` (N-way K-shot classification, :func:`learnedopt.models.conv4`, cross-entropy).
Omniglot classes are split by whole alphabets (:data:`OMNIGLOT_SPLIT`, seed
:data:`OMNIGLOT_SPLIT_SEED`, so every run holds out the same alphabets); meta-training uses the
meta-train alphabets with rotated classes, validation the meta-valid alphabets unrotated, and the
meta-test alphabets are never read. Every BatchNorm is transductive
(:class:`learnedopt.meta.maml.BatchStatNorm`): a forward pass normalises with its own batch.

Randomness: the model's initialisation comes from ``(seed, 0)`` (the meta-lstm rule's from
``(seed, 0, 1)``), meta-step ``s``'s tasks from ``(seed, 1, s)`` and the validation tasks from
``(seed, 2)``; nothing depends on the global RNG, so a resumed run repeats an uninterrupted one
bit for bit.

The artefact of a run is ``model.safetensors``: the model's tensors (``model.*``), learned inner
step sizes (``inner_lr.*``) and rule weights (``rule.*``), with a JSON header in the safetensors
metadata (key ``"learnedopt_model"``) holding everything :func:`load_learner` needs to rebuild and
adapt the learner. Loading never unpickles.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.func import functional_call, vmap

from ..nn import RULES, MetaLSTMCell, UpdateRule
from .distributed import SINGLE, Workers
from .loop import (
    CARD_NAME,
    ConfigError,
    check_rule_config,
    check_run,
    clip_meta_gradient_,
    last_record,
    processes_note,
    model_card,
    refuse_options,
    train_loop,
    write_text_atomic,
)
from .maml import MAML, replace_batchnorm_
from .reptile import Reptile
from .tasks import TaskBatch, derive_seed, generator_for
from .train import LSTM_ONLY
from .unroll import UnrollResult, num_coordinates, unroll

Params = dict[str, Tensor]

FEWSHOT_ALGOS: tuple[str, ...] = ("maml", "fomaml", "reptile", "meta-lstm")
FEWSHOT_TASKS: tuple[str, ...] = ("sinusoid", "omniglot")
#: options only the few-shot algorithms read (argparse dest names)
FEWSHOT_ONLY: tuple[str, ...] = (
    "ways", "shots", "queries", "inner_steps", "inner_lr", "test_inner_steps", "learn_inner_lr",
    "hidden", "image_size", "same_alphabet", "same_rotation", "augment", "val_tasks", "train_shots", "inner_batch",
    "zero_head",
)  # fmt: skip
_OMNIGLOT_ONLY = ("ways", "hidden", "image_size", "same_alphabet", "same_rotation", "augment")
MODEL_NAME = "model.safetensors"
MODEL_FORMAT = 1
_HEADER_KEY = "learnedopt_model"
#: Omniglot classes are split by whole alphabets (8 in the two small background sets: 5, 1, 2)
OMNIGLOT_SPLIT: dict[str, float] = {"meta_train": 5 / 8, "meta_valid": 1 / 8, "meta_test": 2 / 8}
OMNIGLOT_SPLIT_SEED = 0
SINUSOID_MLP = (1, 40, 40, 1)
SINUSOID_VALID_QUERIES = 100  # query points per validation task (Finn et al. test with 100)
LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "mse": nn.functional.mse_loss,
    "cross_entropy": nn.functional.cross_entropy,
}
_TRAIN_STREAM, _VALID_STREAM, _MINIBATCH_STREAM = 1, 2, 3


# ----------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class FewShotConfig:
    """Everything that determines a few-shot meta-training run (defaults: :func:`fewshot_defaults`).

    Attributes:
        algo: ``maml``, ``fomaml``, ``reptile`` or ``meta-lstm``.
        task: ``sinusoid`` or ``omniglot``.
        ways: classes per Omniglot episode (None for sinusoid).
        shots: support examples per class (points per sinusoid task).
        queries: query examples per class (points per sinusoid task).
        inner_steps: inner-loop steps during meta-training.
        inner_lr: inner step size (MAML, Reptile); None for meta-lstm, whose rule sets the step.
        test_inner_steps: inner steps when adapting after meta-training (validation, evaluation).
        learn_inner_lr: Meta-SGD step sizes (maml, fomaml).
        zero_head: start every task's output layer at zero instead of a learned value (maml,
            fomaml; ``MAML(zero_init=...)``, Kao et al. 2022's zeroing trick).
        meta_batch: tasks per meta-step.
        meta_steps: meta-steps in total.
        meta_lr: Adam learning rate; for Reptile the initial outer step size.
        clip: meta-gradient norm clip (meta-lstm; None otherwise).
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
        data: folder of the Omniglot zips (None: the default search).
        rule: meta-lstm's update rule, a key of :data:`learnedopt.nn.RULES` (None:
            ``MetaLSTMCell``); None for the other algorithms.
        rule_config: meta-lstm: the rule's config fields that differ from its class's defaults,
            e.g. ``{"input_bias_init": [-0.5, -0.3]}`` to start from a larger step (None: the
            paper's); None for the other algorithms.
        train_shots: support examples per class of the meta-training tasks (None: ``shots``);
            validation and evaluation use ``shots``.
        inner_batch: Reptile's examples per inner step, drawn from the support set without
            replacement (None: the whole support set every step).
        device: where meta-training runs, ``"cpu"`` or ``"cuda[:N]"`` (tasks are drawn on the
            CPU, so it changes results only by rounding; a run may resume on another device).
    """

    algo: str
    task: str
    ways: int | None
    shots: int
    queries: int
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

    RESUMABLE_CHANGES = ("meta_steps", "data", "device")

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad setting."""
        if self.algo not in FEWSHOT_ALGOS:
            raise ConfigError(f"unknown few-shot algo {self.algo!r}; choose from {', '.join(FEWSHOT_ALGOS)}")
        if self.task not in FEWSHOT_TASKS:
            raise ConfigError(
                f"--algo {self.algo} trains on --task {' or '.join(FEWSHOT_TASKS)}, not {self.task!r}"
            )
        names = ["shots", "queries", "inner_steps", "test_inner_steps", "meta_batch", "meta_steps", "val_tasks"]
        names += ["ways", "hidden", "image_size"] if self.task == "omniglot" else []
        names += [n for n in ("train_shots", "inner_batch") if getattr(self, n) is not None]
        for name in names:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        if self.task == "omniglot" and self.ways < 2:
            raise ConfigError(f"--ways must be at least 2, got {self.ways}")
        if self.seed < 0:
            raise ConfigError(f"--seed must be a non-negative integer, got {self.seed}")
        if self.inner_batch is not None and self.algo != "reptile":
            raise ConfigError(f"--inner-batch sets Reptile's inner minibatch, not --algo {self.algo}'s (its inner steps read the whole support set)")
        if self.zero_head and self.algo not in ("maml", "fomaml"):
            raise ConfigError(f"--zero-head sets how MAML starts each task's output layer, not --algo {self.algo}'s")
        if self.rule is not None and self.algo != "meta-lstm":
            raise ConfigError(f"--rule chooses the learned update of --algo meta-lstm (and lstm), not --algo {self.algo}")
        if self.rule is not None and self.rule not in RULES:
            raise ConfigError(f"unknown rule {self.rule!r}; choose from {', '.join(sorted(RULES))}")
        if self.rule_config is not None:
            if self.algo != "meta-lstm":
                raise ConfigError(f"--rule-config sets the learned update of --algo meta-lstm (and lstm), not --algo {self.algo}")
            check_rule_config(self.rule or MetaLSTMCell.kind, self.rule_config)
        for name in ("meta_lr", "inner_lr", "clip"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive number, got {value}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def fewshot_defaults(algo: str, task: str, ways: int | None) -> dict[str, Any]:
    """Default settings of ``algo`` on ``task``: those of the papers (MAML: Finn et al. 2017;
    Reptile: Nichol et al. 2018; meta-lstm: Ravi & Larochelle 2017), scaled like the benchmarks."""
    sinusoid = task == "sinusoid"
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
        "shots": 10 if sinusoid else 1,
        "queries": 10 if sinusoid else 5,
        "inner_steps": inner[0],
        "inner_lr": inner[1],
        "test_inner_steps": inner[2],
        "learn_inner_lr": False,
        "zero_head": False,
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
    }


def config_from_args(args: argparse.Namespace) -> FewShotConfig:
    """The few-shot configuration of parsed ``meta-train`` arguments; refuses options that do not
    apply to the chosen algorithm or task."""
    algo = args.algo
    own = ("rule", "rule_config") if algo == "meta-lstm" else ()
    refuse_options(args, [n for n in LSTM_ONLY if n not in own], f"--algo {algo}", "--algo lstm")
    task = args.task or "sinusoid"
    if task not in FEWSHOT_TASKS:
        raise ConfigError(f"--algo {algo} trains on --task {' or '.join(FEWSHOT_TASKS)}, not {task!r}")
    if task == "sinusoid":
        refuse_options(args, _OMNIGLOT_ONLY, "--task sinusoid", "--task omniglot")
    if algo != "meta-lstm":
        refuse_options(args, ("clip",), f"--algo {algo}", "--algo lstm, meta-lstm")
    else:
        refuse_options(args, ("inner_lr",), "--algo meta-lstm (its rule learns the step)", "maml, fomaml, reptile")
    if algo not in ("maml", "fomaml"):
        refuse_options(args, ("learn_inner_lr", "zero_head"), f"--algo {algo}", "--algo maml, fomaml")
    if algo != "reptile":
        refuse_options(args, ("inner_batch",), f"--algo {algo}", "--algo reptile")
    values = fewshot_defaults(algo, task, args.ways)
    values.update(
        {k: getattr(args, k) for k in (*FEWSHOT_ONLY, "meta_batch", "meta_steps", "meta_lr", "clip")
         if getattr(args, k) is not None}
    )  # fmt: skip
    rule, rule_config = (args.rule, args.rule_config) if algo == "meta-lstm" else (None, None)
    device = args.device or FewShotConfig.device
    return FewShotConfig(algo=algo, task=task, seed=args.seed, data=args.data, rule=rule, rule_config=rule_config,
                         device=device, **values)  # fmt: skip


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
    group.add_argument("--hidden", type=int, help="omniglot: conv-4 filters (default 64)")
    group.add_argument("--image-size", type=int, help="omniglot: image side in pixels (default 28)")
    group.add_argument("--same-alphabet", action="store_true", default=None, help="omniglot: each episode within one alphabet")
    group.add_argument("--same-rotation", action="store_true", default=None,
                       help="omniglot: each training episode's characters share one rotation, as in the upright test episodes")  # fmt: skip
    group.add_argument("--augment", action="store_true", default=None,
                       help="omniglot: distort each training image by a random affine map (rotation, shear, scale, shift)")  # fmt: skip
    group.add_argument("--val-tasks", type=int, help="validation tasks for the final metric (default 100)")
    group.add_argument("--train-shots", type=int, help="support examples per class in meta-training (default: --shots; reptile on omniglot: 10)")
    group.add_argument("--inner-batch", type=int, help="reptile: examples per inner step (default: the whole support set; omniglot: 10, 20 for more than 5 ways)")


def canonical_command(config: FewShotConfig, out: str | os.PathLike[str], checkpoint_every: int) -> str:
    """The ``learnedopt meta-train`` command line that runs ``config`` from scratch, every setting explicit."""
    words = ["learnedopt", "meta-train"]
    for key, value in config.to_dict().items():
        if value is None or value is False or (key == "device" and value == FewShotConfig.device):
            continue
        text = json.dumps(value, sort_keys=True) if isinstance(value, dict) else str(value)
        words += [f"--{key.replace('_', '-')}"] + ([] if value is True else [text])
    words += ["--out", str(out), "--checkpoint-every", str(checkpoint_every)]
    return shlex.join(words)


# ----------------------------------------------------------------------------- the learner
@dataclass(frozen=True)
class LearnerSpec:
    """How to rebuild and adapt a few-shot learner (the JSON header of ``model.safetensors``).

    Attributes:
        algo: the algorithm that trained it.
        architecture: ``{"kind": "mlp", "sizes": [...], "activation": "relu"}`` or
            ``{"kind": "conv4", "in_channels": 1, "ways": N, "hidden": H, "image_size": S}``.
        loss: a key of :data:`LOSSES`.
        inner_steps: inner steps in meta-training.
        test_inner_steps: inner steps when adapting after meta-training.
        inner_lr: inner step size (None for meta-lstm).
        learn_inner_lr: whether the file holds learned step sizes (``inner_lr.*``).
        zero_head: whether every task starts its output layer (the last ``nn.Linear``) at zero.
        inner_optimizer: Reptile's inner optimizer, ``"sgd"`` or ``"adam"`` (None otherwise).
        rule: ``{"kind": ..., "config": {...}}`` of the meta-lstm rule (None otherwise).
    """

    algo: str
    architecture: dict[str, Any]
    loss: str
    inner_steps: int
    test_inner_steps: int
    inner_lr: float | None = None
    learn_inner_lr: bool = False
    zero_head: bool = False
    inner_optimizer: str | None = None
    rule: dict[str, Any] | None = None

    @classmethod
    def for_config(cls, config: FewShotConfig) -> LearnerSpec:
        if config.task == "sinusoid":
            architecture: dict[str, Any] = {"kind": "mlp", "sizes": list(SINUSOID_MLP), "activation": "relu"}
        else:
            architecture = {"kind": "conv4", "in_channels": 1, "ways": config.ways, "hidden": config.hidden,
                            "image_size": config.image_size}  # fmt: skip
        return cls(
            algo=config.algo,
            architecture=architecture,
            loss="mse" if config.task == "sinusoid" else "cross_entropy",
            inner_steps=config.inner_steps,
            test_inner_steps=config.test_inner_steps,
            inner_lr=config.inner_lr,
            learn_inner_lr=config.learn_inner_lr,
            zero_head=config.zero_head,
            inner_optimizer=("sgd" if config.task == "sinusoid" else "adam") if config.algo == "reptile" else None,
            rule=_rule_spec(RULES[config.rule or MetaLSTMCell.kind], config.rule_config) if config.algo == "meta-lstm" else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _rule_spec(rule_class: type[UpdateRule], overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``{"kind", "config"}`` of a rule class's architecture: its defaults with ``overrides``."""
    return {"kind": rule_class.kind, "config": rule_class.from_config_dict(dict(overrides or {})).config_dict()}


def build_model(architecture: Mapping[str, Any]) -> nn.Module:
    """The network of an architecture dict (see :class:`LearnerSpec`), BatchNorm made transductive.

    Input/output: MLP ``(N, sizes[0]) -> (N, sizes[-1])``; conv-4 ``(N, C, S, S) -> (N, ways)``.
    """
    from ..models import conv4

    if architecture["kind"] == "mlp":
        sizes = architecture["sizes"]
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.ReLU()]
        return nn.Sequential(*layers[:-1])
    if architecture["kind"] == "conv4":
        model = conv4(architecture["in_channels"], architecture["ways"], architecture["hidden"], architecture["image_size"])
        return replace_batchnorm_(model)
    raise ValueError(f"unknown architecture kind {architecture['kind']!r}")


def output_layer_name(model: nn.Module) -> str:
    """The module name of ``model``'s last ``nn.Linear`` (its output layer)."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ValueError("the model has no nn.Linear output layer")
    return names[-1]


class FewShotLearner:
    """A learned initialisation (``model``), with learned step sizes (Meta-SGD) or a learned update
    rule (meta-lstm) where the algorithm has them, and its algorithm's way of adapting to a task.

    Args:
        spec: what to build.
        seed: initialise the model from ``(seed, 0)`` and the rule from ``(seed, 0, 1)``; None
            leaves PyTorch's default initialisation (e.g. before loading tensors).
    """

    def __init__(self, spec: LearnerSpec, seed: int | None = None) -> None:
        self.spec = spec
        with torch.random.fork_rng(devices=[]):  # the global RNG is left as it was
            if seed is not None:
                torch.manual_seed(derive_seed(seed, 0))
            self.model = build_model(spec.architecture)
        self.loss_fn = LOSSES[spec.loss]
        self.maml: MAML | None = None
        self.rule: UpdateRule | None = None
        if spec.algo in ("maml", "fomaml"):
            self.maml = MAML(
                self.model,
                inner_lr=spec.inner_lr,
                inner_steps=spec.inner_steps,
                first_order=spec.algo == "fomaml",
                learn_inner_lr=spec.learn_inner_lr,
                loss_fn=self.loss_fn,
                vectorize="auto",  # conv-4 on CPU: a loop over the tasks, faster than vmap there
                zero_init=(output_layer_name(self.model),) if spec.zero_head else (),
            )
        elif spec.algo == "meta-lstm":
            self.rule = RULES[spec.rule["kind"]].from_config_dict(spec.rule["config"])
            self.rule.reset_parameters(generator=None if seed is None else generator_for(seed, 0, 1))
        elif spec.algo == "reptile":
            self.reptile = Reptile(self.model, spec.inner_steps, self.inner_optimizer, loss_fn=self.loss_fn)

    def to(self, device: torch.device | str) -> FewShotLearner:
        """Move every learned tensor to ``device`` (in place); returns ``self``."""
        for module in (self.maml if self.maml is not None else self.model, self.rule):
            if module is not None:
                module.to(device)
        return self

    def inner_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """Reptile's inner optimizer on ``params``."""
        if self.spec.inner_optimizer == "adam":
            return torch.optim.Adam(params, lr=self.spec.inner_lr, betas=(0.0, 0.999))
        return torch.optim.SGD(params, lr=self.spec.inner_lr)

    def meta_parameters(self) -> list[nn.Parameter]:
        """What the outer optimizer trains: the model's parameters, then learned step sizes or
        the rule's parameters."""
        params = list(self.model.parameters())
        if self.maml is not None and self.maml.inner_lrs is not None:
            params += list(self.maml.inner_lrs.parameters())
        if self.rule is not None:
            params += list(self.rule.parameters())
        return params

    def tensors(self) -> dict[str, Tensor]:
        """Every learned tensor, named ``model.*``, ``inner_lr.*`` and ``rule.*``."""
        out = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        if self.maml is not None and self.maml.inner_lrs is not None:
            out.update({f"inner_lr.{k}": v for k, v in self.maml.inner_lrs.state_dict().items()})
        if self.rule is not None:
            out.update({f"rule.{k}": v for k, v in self.rule.state_dict().items()})
        return out

    def load_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        """Load :meth:`tensors`' output; raises ValueError if the names or shapes differ."""
        expected = {k: tuple(v.shape) for k, v in self.tensors().items()}
        found = {k: tuple(v.shape) for k, v in tensors.items()}
        if expected != found:
            raise ValueError(
                f"tensors do not fit the {self.spec.algo} learner (missing {sorted(set(expected) - set(found))}, "
                f"unexpected {sorted(set(found) - set(expected))}, "
                f"wrong shape {sorted(k for k in set(expected) & set(found) if expected[k] != found[k])})"
            )
        with torch.no_grad():
            for name, value in self.tensors().items():
                value.copy_(tensors[name])

    # ---------------------------------------------------------------- inner loops
    def meta_loss(self, x_s: Tensor, y_s: Tensor, x_q: Tensor, y_q: Tensor) -> Tensor:
        """Mean query loss after ``inner_steps`` of adaptation, differentiable w.r.t. the
        meta-parameters (MAML, meta-lstm). Inputs ``(B, N_support, ...)`` and ``(B, N_query, ...)``."""
        if self.maml is not None:
            return self.maml(x_s, y_s, x_q, y_q)
        if self.rule is not None:
            return self._unroll(x_s, y_s, x_q, y_q, self.spec.inner_steps, self.rule).losses[-1].mean()
        raise ValueError(f"--algo {self.spec.algo} has no differentiable meta-loss")

    def _unroll(
        self, x_s: Tensor, y_s: Tensor, x_q: Tensor | None, y_q: Tensor | None, steps: int, rule: UpdateRule
    ) -> UnrollResult:
        """The meta-lstm inner loop on B tasks: ``steps`` rule updates on the support sets from
        the model's parameters (shared by the tasks, so the meta-gradient reaches them); the last
        entry of ``losses`` is the query loss at the adapted parameters (the support loss when no
        query set is given)."""
        batch = _SupportQueryBatch(self.model, self.loss_fn, x_s, y_s, x_q, y_q, steps)
        params = {k: p.unsqueeze(0).expand(len(batch), *p.shape) for k, p in self.model.named_parameters()}
        state = rule.init_state(num_coordinates(params), dtype=x_s.dtype, device=x_s.device)
        return unroll(rule, batch, params, state, steps, stop_optimizee_grad=True)

    def adapt(self, x_support: Tensor, y_support: Tensor, steps: int | None = None) -> Params:
        """Adapted parameters (detached) for ONE task, ``x_support`` ``(N, ...)``, after ``steps``
        (default ``test_inner_steps``) of the algorithm's inner loop."""
        steps = self.spec.test_inner_steps if steps is None else steps
        if self.maml is not None:
            return self.maml.adapt(x_support, y_support, steps=steps)
        if self.rule is not None:
            with torch.enable_grad():
                result = self._unroll(x_support[None], y_support[None], None, None, steps, self.rule)
            return {k: v[0].detach() for k, v in result.params.items()}
        worker = self.reptile.adapt([(x_support, y_support)], steps=steps)
        return {k: v.detach().clone() for k, v in worker.named_parameters()}

    def predict(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """The model's outputs at ``params`` for ``x`` ``(N, ...)`` (normalised with x's own
        batch statistics)."""
        return functional_call(self.model, dict(params), (x,))

    def evaluate(self, x_s: Tensor, y_s: Tensor, x_q: Tensor, y_q: Tensor, steps: int | None = None) -> dict[str, float]:
        """Mean query loss (and accuracy in %, for classification) over B tasks after adapting
        each on its support set. Inputs ``(B, N, ...)``."""
        losses, correct = [], []
        for b in range(x_s.shape[0]):
            params = self.adapt(x_s[b], y_s[b], steps)
            with torch.no_grad():
                outputs = self.predict(params, x_q[b])
                losses.append(float(self.loss_fn(outputs, y_q[b])))
                if self.spec.loss == "cross_entropy":
                    correct.append(float((outputs.argmax(1) == y_q[b]).float().mean()))
        metrics = {"loss": sum(losses) / len(losses)}
        if correct:
            metrics["accuracy"] = 100.0 * sum(correct) / len(correct)
        return metrics


class _SupportQueryBatch(TaskBatch):
    """B few-shot tasks as a :class:`TaskBatch` for :func:`unroll`: the loss of step index
    ``t < steps`` is each task's support loss, of step ``steps`` its query loss (one ``vmap`` of
    ``functional_call`` over the tasks)."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], x_s: Tensor, y_s: Tensor,
                 x_q: Tensor | None, y_q: Tensor | None, steps: int) -> None:  # fmt: skip
        # TaskBatch's per-task objects are not needed: the loss below is batched
        self.model, self.loss_fn, self.steps = model, loss_fn, steps
        self.support = (x_s, y_s)
        self.query = (x_s, y_s) if x_q is None else (x_q, y_q)

    def __len__(self) -> int:
        return self.support[0].shape[0]

    def loss(self, params: Mapping[str, Tensor], step_index: int) -> Tensor:
        x, y = self.support if step_index < self.steps else self.query

        def one(p: Params, xb: Tensor, yb: Tensor) -> Tensor:
            return self.loss_fn(functional_call(self.model, p, (xb,)), yb)

        return vmap(one)(dict(params), x, y)


# ----------------------------------------------------------------------------- the model file
def save_learner(learner: FewShotLearner, path: str | os.PathLike[str], extra: Mapping[str, Any] | None = None) -> None:
    """Write ``learner`` to a safetensors file with its :class:`LearnerSpec` (plus ``extra``)
    as the JSON header; atomic (temporary file, then ``os.replace``)."""
    from .. import __version__

    header = {"format": MODEL_FORMAT, **learner.spec.to_dict(), "library_version": __version__, **(extra or {})}
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in learner.tensors().items()}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={_HEADER_KEY: json.dumps(header)})
    os.replace(tmp, path)


def load_learner(path: str | os.PathLike[str]) -> tuple[FewShotLearner, dict[str, Any]]:
    """Rebuild the learner of a ``model.safetensors`` file (no unpickling).

    Returns:
        ``(learner, header)``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a learnedopt few-shot model file, or tensors that do not fit its header.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ValueError(f"{path}: not a readable safetensors file: {err}") from None
    if _HEADER_KEY not in metadata:
        raise ValueError(f"{path}: no learnedopt few-shot model header (is it an update-rule weight file?)")
    header = json.loads(metadata[_HEADER_KEY])
    if header.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path}: unsupported model format {header.get('format')!r} (this library reads {MODEL_FORMAT})")
    fields = {f.name for f in dataclasses.fields(LearnerSpec)}
    learner = FewShotLearner(LearnerSpec(**{k: v for k, v in header.items() if k in fields}))
    try:
        learner.load_tensors(tensors)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return learner, header


# ----------------------------------------------------------------------------- task sources
class SinusoidSource:
    """Sinusoid regression tasks (:class:`learnedopt.data.SinusoidTasks`); inputs/targets ``(B, K, 1)``."""

    def __init__(self, shots: int, queries: int) -> None:
        self.shots, self.queries = shots, queries

    def batch(self, size: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(x_support, y_support, x_query, y_query)`` of ``size`` tasks drawn from ``seed``."""
        from ..data import SinusoidTasks

        return SinusoidTasks(seed).sample_tasks(size, self.shots, self.queries)[:4]

    def describe(self) -> str:
        return (
            f"sinusoid regression y = A sin(x - phase), A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5]; "
            f"{self.shots} support and {self.queries} query points per task; MSE"
        )


class OmniglotSource:
    """N-way K-shot Q-query episodes of some Omniglot classes; images ``(B, N*K, 1, S, S)``,
    labels ``(B, N*K)`` (0..N-1, grouped by way).

    ``same_alphabet`` / ``same_rotation`` draw each episode's classes from one alphabet / one
    rotation (both: one rotated alphabet); ``augment`` distorts every image it returns by its own
    random affine map, drawn from the batch's seed.
    """

    def __init__(self, data: Any, classes: Tensor, ways: int, shots: int, queries: int, same_alphabet: bool,
                 part: str, same_rotation: bool = False, augment: bool = False) -> None:  # fmt: skip
        from ..data import EpisodeSampler

        self.data, self.part, self.classes, self.same_alphabet = data, part, classes, same_alphabet
        self.same_rotation, self.augment = same_rotation, augment
        rotation_index = data.rotation_of_class // 90
        groups = data.alphabet_of_class * 4 * same_alphabet + rotation_index * same_rotation
        try:
            self.sampler = EpisodeSampler(data.labels, classes, ways, shots, queries, groups=groups,
                                          same_group=same_alphabet or same_rotation)  # fmt: skip
        except ValueError as err:
            raise ConfigError(f"--task omniglot, {part} classes: {err}") from None

    def batch(self, size: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``size`` episodes drawn from ``seed`` (the sampler's generator is reset to it; the
        distortions, with ``augment``, come from the key ``(seed, 1)``)."""
        from ..data import random_affine, stack_episodes

        self.sampler.load_state_dict({"generator": torch.Generator().manual_seed(seed).get_state()})
        x_s, y_s, x_q, y_q = stack_episodes(self.data.images, [self.sampler.sample() for _ in range(size)])
        if self.augment:
            generator = generator_for(seed, 1)
            x_s, x_q = random_affine(x_s, generator), random_affine(x_q, generator)
        return x_s, y_s, x_q, y_q

    def alphabets(self) -> list[str]:
        return [self.data.alphabets[i] for i in torch.unique(self.data.alphabet_of_class[self.classes]).tolist()]

    def describe(self) -> str:
        rotated = bool((self.data.rotation_of_class[self.classes] != 0).any())
        s = self.sampler
        return (
            f"Omniglot {s.n_way}-way {s.k_shot}-shot {s.q_query}-query episodes from the {self.part} alphabets "
            f"({', '.join(self.alphabets())}; {len(self.classes)} classes{', with rotations' if rotated else ', unrotated'})"
            f"{', each episode within one alphabet' if self.same_alphabet else ''}"
            f"{', each episode within one rotation' if self.same_rotation else ''}"
            f"{', every image distorted by a random affine map' if self.augment else ''}"
        )


def make_sources(config: FewShotConfig) -> tuple[Any, Any, dict[str, list[str]]]:
    """``(meta-train source, validation source, alphabets of each split part)``; the split is
    empty for sinusoid. Raises :class:`ConfigError` when Omniglot is missing or too small."""
    train_shots = config.train_shots or config.shots
    if config.task == "sinusoid":
        return (SinusoidSource(train_shots, config.queries),
                SinusoidSource(config.shots, SINUSOID_VALID_QUERIES), {})  # fmt: skip
    from ..data import load_omniglot
    from ..data.omniglot import DEFAULT_ZIPS

    try:
        if config.data is None:
            data = load_omniglot(image_size=config.image_size, rotations=True)
        else:
            root = Path(config.data)
            sources = [root / name for name in DEFAULT_ZIPS if (root / name).is_file()] or [root]
            data = load_omniglot(sources, image_size=config.image_size, rotations=True)
    except (FileNotFoundError, ValueError, ImportError) as err:
        raise ConfigError(f"--task omniglot needs the Omniglot zips: {err}") from None
    parts = omniglot_class_splits(data)
    train = OmniglotSource(data, parts["meta_train"], config.ways, train_shots, config.queries,
                           config.same_alphabet, "meta_train", config.same_rotation, config.augment)  # fmt: skip
    valid = OmniglotSource(data, parts["meta_valid"], config.ways, config.shots, config.queries,
                           config.same_alphabet, "meta_valid")  # fmt: skip
    split = {
        name: sorted({data.alphabets[i] for i in data.alphabet_of_class[part].tolist()})
        for name, part in parts.items()
    }
    return train, valid, split


def omniglot_class_splits(data: Any) -> dict[str, Tensor]:
    """The class ids of each part of :data:`OMNIGLOT_SPLIT` (whole alphabets, seed
    :data:`OMNIGLOT_SPLIT_SEED`): ``meta_train`` keeps the rotated classes, ``meta_valid`` and
    ``meta_test`` only the unrotated characters."""
    from ..data import class_splits

    parts = class_splits(data.num_classes, OMNIGLOT_SPLIT, seed=OMNIGLOT_SPLIT_SEED, groups=data.alphabet_of_class)
    unrotated = data.rotation_of_class == 0
    return {name: ids if name == "meta_train" else ids[unrotated[ids]] for name, ids in parts.items()}


# ----------------------------------------------------------------------------- meta-training
def inner_minibatches(
    x: Tensor, y: Tensor, batch: int | None, steps: int, generator: torch.Generator
) -> list[tuple[Tensor, Tensor]]:
    """The ``steps`` inner minibatches of one task's support set ``x`` ``(N, ...)``, ``y`` ``(N,)``:
    ``batch`` examples each, in a random order drawn from ``generator``, without replacement until
    every example has been used once (then a new order); ``batch=None`` (or ``>= N``) gives the
    whole set every step, in its own order."""
    n = x.shape[0]
    if batch is None or batch >= n:
        return [(x, y)] * steps
    orders = torch.cat([torch.randperm(n, generator=generator) for _ in range(-(-steps * batch // n))])
    picks = orders[: steps * batch].view(steps, batch)
    return [(x[i], y[i]) for i in picks]


class FewShotTrainer:
    """The :class:`learnedopt.meta.train.Trainer` of the few-shot algorithms.

    With several ``workers`` every rank draws the whole meta-batch and adapts on its share of
    the tasks; MAML and meta-lstm average the meta-gradients over the ranks, Reptile sums the
    parameter moves, so each rank makes the update one process would make on the whole batch.
    """

    def __init__(self, config: FewShotConfig, workers: Workers = SINGLE) -> None:
        self.config, self.workers = config, workers
        self.source, self.valid_source, self.split = make_sources(config)
        self.device = torch.device(config.device)
        self.learner = FewShotLearner(LearnerSpec.for_config(config), seed=config.seed).to(self.device)
        if config.algo == "reptile":
            self.reptile = Reptile(
                self.learner.model,
                config.inner_steps,
                self.learner.inner_optimizer,
                outer_stepsize=config.meta_lr,
                final_outer_stepsize=0.0,
                total_steps=config.meta_steps,
                loss_fn=self.learner.loss_fn,
            )
        else:
            self.meta_optimizer = torch.optim.Adam(self.learner.meta_parameters(), lr=config.meta_lr)

    def step(self, step: int) -> dict[str, float]:
        """Meta-step ``step``. Logged ``meta_loss``: the mean query loss after adaptation
        (MAML, meta-lstm); for Reptile, which has no meta-loss, the mean support loss at the
        initialisation before the update."""
        config, workers = self.config, self.workers
        batch = self.source.batch(config.meta_batch, derive_seed(config.seed, _TRAIN_STREAM, step))
        part = workers.share(config.meta_batch)
        x_s, y_s, x_q, y_q = (t[part].to(self.device) for t in batch)
        if config.algo == "reptile":
            with torch.no_grad():
                loss = sum(self.learner.loss_fn(self.learner.model(x), y) for x, y in zip(x_s, y_s, strict=True))
            # each task's minibatch order has its own key, so a rank's tasks do not depend on the others'
            tasks = [inner_minibatches(x, y, config.inner_batch, config.inner_steps,
                                       generator_for(config.seed, _MINIBATCH_STREAM, step, part.start + b))
                     for b, (x, y) in enumerate(zip(x_s, y_s, strict=True))]  # fmt: skip
            eps = self.reptile.meta_step(tasks, all_reduce_sum_=workers.all_reduce_sum_)
            return {"meta_loss": workers.mean(float(loss) / len(x_s)), "outer_stepsize": eps}
        loss = self.learner.meta_loss(x_s, y_s, x_q, y_q)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the meta-loss is {loss.item()}")
        self.meta_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = self.learner.meta_parameters()
        workers.average_gradients_(params)
        norm = clip_meta_gradient_(list(params), config.clip)
        self.meta_optimizer.step()
        return {"meta_loss": workers.mean(float(loss.detach())), "grad_norm": norm}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"algo": self.config.algo, "learner": self.learner.tensors()}
        if self.config.algo == "reptile":
            state["reptile"] = self.reptile.state_dict()
        else:
            state["meta_optimizer"] = self.meta_optimizer.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.learner.load_tensors(state["learner"])
        if self.config.algo == "reptile":
            self.reptile.load_state_dict(state["reptile"])
        else:
            self.meta_optimizer.load_state_dict(state["meta_optimizer"])

    def validate(self, learner: FewShotLearner) -> dict[str, float]:
        """Metrics of ``learner`` on the fixed validation tasks (``(seed, 2)``), adapted with
        ``test_inner_steps``."""
        tasks = self.valid_source.batch(self.config.val_tasks, derive_seed(self.config.seed, _VALID_STREAM))
        return learner.evaluate(*(t.to(self.device) for t in tasks))


@dataclass
class FewShotResult:
    """What :func:`meta_train_fewshot` returns: the learner, the meta-steps done, this process's
    log records, whether the run finished, and (when finished) validation metrics
    ``{"initial": {...}, "final": {...}}``."""

    learner: FewShotLearner
    step: int
    log: list[dict[str, Any]]
    finished: bool
    validation: dict[str, dict[str, float]] | None = None


def meta_train_fewshot(
    config: FewShotConfig,
    out: str | os.PathLike[str],
    *,
    checkpoint_every: int = 10,
    resume: bool = False,
    command: str | None = None,
    max_steps: int | None = None,
    progress: bool = True,
    workers: Workers | None = None,
) -> FewShotResult:
    """Meta-train a few-shot learner as ``learnedopt meta-train --algo ...`` does: ``log.jsonl``,
    ``checkpoint.pt`` and at the end ``model.safetensors`` and ``MODEL_CARD.md`` in ``out``.
    Arguments as :func:`learnedopt.meta.train.meta_train` (ranks other than 0 return without
    validation or files).

    Raises:
        ConfigError: bad configuration, missing data, or a resume that does not fit.
        DistributedError: another rank failed.
    """
    workers = check_run(config, checkpoint_every, workers)
    out = Path(out)
    command = command or "learnedopt.meta.fewshot.meta_train_fewshot(...)"
    trainer = FewShotTrainer(config, workers)
    hint = "lower --meta-lr" + (" or --clip" if config.clip is not None else "")
    done, log = train_loop(config, trainer, out, checkpoint_every=checkpoint_every, resume=resume,
                           max_steps=max_steps, progress=progress, hint=hint, workers=workers)  # fmt: skip
    if done < config.meta_steps or not workers.is_main:
        return FewShotResult(trainer.learner, done, log, finished=done >= config.meta_steps)
    initial = FewShotLearner(trainer.learner.spec, seed=config.seed).to(trainer.device)  # the same seeded draw
    validation = {"initial": trainer.validate(initial), "final": trainer.validate(trainer.learner)}
    extra = {
        "task": config.task,
        "command": command,
        "meta_train_config": config.to_dict(),
        "final_meta_loss": last_record(out, log)["meta_loss"],
        "validation": validation,
        "omniglot_split": trainer.split or None,
    }
    save_learner(trainer.learner, out / MODEL_NAME, extra)
    _write_card(out / CARD_NAME, config, command, trainer, extra)
    return FewShotResult(trainer.learner, config.meta_steps, log, finished=True, validation=validation)


def _write_card(path: Path, config: FewShotConfig, command: str, trainer: FewShotTrainer, extra: Mapping[str, Any]) -> None:
    spec = trainer.learner.spec
    metrics = "\n".join(
        f"| validation {name} after {config.test_inner_steps} inner steps | {extra['validation']['initial'][name]:.6g} "
        f"| {extra['validation']['final'][name]:.6g} |"
        for name in extra["validation"]["final"]
    )
    if trainer.split:
        split = (
            f"Classes are split by whole alphabets (`class_splits(groups=alphabet_of_class)`, fractions "
            f"{OMNIGLOT_SPLIT}, seed {OMNIGLOT_SPLIT_SEED}):\n\n"
            + "\n".join(f"- {name}: {', '.join(alphabets) or '(none)'}" for name, alphabets in trainer.split.items())
            + f"\n\nHeld out from meta-training: {', '.join(trainer.split['meta_valid'] + trainer.split['meta_test'])} "
            "(meta_valid is used for the validation metric below; meta_test is never read)."
        )
    else:
        split = "Tasks are drawn fresh from the task distribution; validation tasks are a fixed draw (key (seed, 2))."
    text = model_card(
        f"Meta-trained few-shot learner: {config.algo} on {config.task}",
        f' Load it with\n`learnedopt.meta.fewshot.load_learner("{MODEL_NAME}")`.'
        + processes_note(trainer.workers.world_size),
        command,
        config.to_dict(),
        f"Learner: `{json.dumps(spec.to_dict())}`.",
        f"Meta-training tasks: {trainer.source.describe()}.\n\n"
        f"Validation tasks ({config.val_tasks}): {trainer.valid_source.describe()}.\n\n{split}",
        "| metric | initialisation | meta-trained |\n|---|---:|---:|\n"
        f"{metrics}\n\nMean meta-loss of the last meta-step: {extra['final_meta_loss']:.6g}. "
        "Per-step metrics are in `log.jsonl`.",
    )
    write_text_atomic(path, text)


def run_fewshot(args: argparse.Namespace, workers: Workers = SINGLE) -> str | None:
    """``learnedopt meta-train --algo maml|fomaml|reptile|meta-lstm``: run and return the line to
    print when finished (None when stopped early, or on ranks other than 0). Raises
    :class:`ConfigError`."""
    config = config_from_args(args)
    result = meta_train_fewshot(
        config,
        args.out,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        command=canonical_command(config, args.out, args.checkpoint_every),
        max_steps=args.stop_after,
        progress=not args.quiet,
        workers=workers,
    )
    if not result.finished or result.validation is None:
        return None
    initial, final = result.validation["initial"], result.validation["final"]
    shown = ", ".join(f"{k} {initial[k]:.4g} -> {final[k]:.4g}" for k in final)
    return f"wrote {Path(args.out) / MODEL_NAME} and {CARD_NAME}: validation {shown} (initialisation -> meta-trained)"


# ----------------------------------------------------------------------------- test-time adaptation
def classify_task(
    learners: FewShotLearner | Sequence[FewShotLearner],
    x_support: Tensor,
    y_support: Tensor,
    x_query: Tensor,
    steps: int | None = None,
    support_copies: int = 0,
    query_copies: int = 0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Class probabilities ``(Q, C)`` of ONE classification task's query images, with test-time
    augmentation and ensembling.

    Each learner adapts (``steps`` inner steps, default its own test-time steps) on the support
    set ``x_support`` ``(N, C_in, H, W)``, ``y_support`` ``(N,)`` plus ``support_copies`` randomly
    distorted copies of each image (:func:`~learnedopt.data.augment_support`); it then classifies
    ``x_query`` ``(Q, C_in, H, W)`` and ``query_copies`` distorted views of it, each view a batch
    of its own (so normalised with its own batch statistics, as the originals are). The softmax
    outputs are averaged over the views, then over the learners (an ensemble).

    Distortions are drawn from ``generator`` (default: seeded 0) in this order: the first
    learner's support copies, its query views, then the next learner's. With one learner and no
    copies this is the softmax of :meth:`FewShotLearner.predict` after :meth:`FewShotLearner.adapt`.
    """
    from ..data import augment_support, random_affine

    learners = [learners] if isinstance(learners, FewShotLearner) else list(learners)
    if not learners:
        raise ValueError("classify_task needs at least one learner")
    if query_copies < 0:
        raise ValueError(f"query_copies must be >= 0, got {query_copies}")
    generator = torch.Generator().manual_seed(0) if generator is None else generator
    total = None
    for learner in learners:
        with torch.enable_grad():
            params = learner.adapt(*augment_support(x_support, y_support, support_copies, generator), steps)
        with torch.no_grad():
            views = [x_query] + [random_affine(x_query, generator) for _ in range(query_copies)]
            probabilities = sum(learner.predict(params, view).softmax(-1) for view in views) / len(views)
        if total is not None and total.shape != probabilities.shape:
            raise ValueError(f"the learners disagree on the output shape: {tuple(total.shape)} and {tuple(probabilities.shape)}")
        total = probabilities if total is None else total + probabilities
    return total / len(learners)


# ----------------------------------------------------------------------------- evaluate omniglot-runs
def predict_runs(
    learners: FewShotLearner | Sequence[FewShotLearner],
    runs: list[Any],
    steps: int | None = None,
    support_copies: int = 0,
    seed: int = 0,
    query_copies: int = 0,
) -> list[Tensor]:
    """For each one-shot run: adapt on its C training images (labels 0..C-1 in sorted file order)
    and classify its test images with :func:`classify_task` (``support_copies`` and
    ``query_copies`` distortions drawn from one generator seeded ``seed``; several learners: an
    ensemble); returns int64 ``(T,)`` predicted training-image indices per run."""
    generator = torch.Generator().manual_seed(seed)
    return [
        classify_task(learners, run.train_images, torch.arange(run.train_images.shape[0]), run.test_images, steps,
                      support_copies, query_copies, generator).argmax(1)  # fmt: skip
        for run in runs
    ]


def add_omniglot_runs_parser(evaluate_sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``learnedopt evaluate omniglot-runs`` on the ``evaluate`` subparsers."""
    parser = evaluate_sub.add_parser(
        "omniglot-runs",
        help="error rates of a meta-trained 20-way model on the official Omniglot one-shot runs",
        description="Adapt a meta-trained 20-way few-shot model (learnedopt meta-train --algo ... "
        "--task omniglot --ways 20) on each official one-shot run's 20 training images and "
        "classify its 20 test images; prints each run's error rate and the mean.",
    )
    parser.add_argument("--runs", required=True, metavar="DIR", help="folder holding run01 ... run20 (all_runs.zip, unpacked)")
    parser.add_argument("--checkpoint", required=True, nargs="+", metavar="CKPT",
                        help="model.safetensors of a meta-train run; several: an ensemble (softmax outputs averaged)")
    parser.add_argument("--steps", type=int, default=None, metavar="N", help="inner steps of adaptation (default: the model's test-time steps)")
    parser.add_argument("--support-copies", type=int, default=0, metavar="K",
                        help="adapt on K randomly distorted copies of each training image too (test-time augmentation; default 0)")
    parser.add_argument("--query-copies", type=int, default=0, metavar="K",
                        help="average the predictions over K randomly distorted views of the test images too (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the distortions of --support-copies and --query-copies (default 0)")
    parser.set_defaults(func=run_omniglot_runs)
    return parser


def run_omniglot_runs(args: argparse.Namespace) -> int:
    """Handler of ``learnedopt evaluate omniglot-runs``: 0, or 2 after a one-line error."""
    from ..data import load_runs, score_runs

    try:
        if args.steps is not None and args.steps < 1:
            raise ValueError(f"--steps must be a positive integer, got {args.steps}")
        for flag in ("support_copies", "query_copies"):
            if getattr(args, flag) < 0:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
        learners = [load_learner(checkpoint)[0] for checkpoint in args.checkpoint]
        for checkpoint, learner in zip(args.checkpoint, learners, strict=True):
            arch = learner.spec.architecture
            if arch["kind"] != "conv4" or arch["ways"] != 20:
                what = f"{arch['ways']}-way" if arch["kind"] == "conv4" else f"{arch['kind']} regression"
                raise ValueError(
                    f"{checkpoint} is a {what} model; the one-shot runs are 20-way "
                    "(meta-train one with --task omniglot --ways 20)"
                )
        sizes = {learner.spec.architecture["image_size"] for learner in learners}
        if len(sizes) > 1:
            raise ValueError(f"the checkpoints take different image sizes ({sorted(sizes)}); an ensemble needs one")
        runs = load_runs(args.runs, image_size=sizes.pop())
        wrong = [run.name for run in runs if run.train_images.shape[0] != 20]
        if wrong:
            raise ValueError(f"runs {wrong} do not have 20 training images")
    except (FileNotFoundError, ValueError) as err:
        print(f"learnedopt evaluate omniglot-runs: error: {err}", file=sys.stderr)
        return 2
    errors, mean = score_runs(runs, predict_runs(learners, runs, args.steps, args.support_copies, args.seed,
                                                 args.query_copies))
    for run, error in zip(runs, errors, strict=True):
        print(f"{run.name}  error {error:.1f}%")
    print(f"mean error {mean:.2f}% over {len(runs)} runs")
    return 0
