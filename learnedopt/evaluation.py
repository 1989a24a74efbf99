"""Evaluation harness for learned optimizers on held-out optimizees (``learnedopt evaluate optimizers``).

A :class:`Problem` is one optimizee: a model built from a seed, the loss of minibatch ``t`` and a
number of steps. Every run of every optimizer on ``(problem, seed)`` starts from the same initial
parameters and sees the same minibatch sequence, because both are drawn from generators seeded by
``(seed, ...)`` (:func:`learnedopt.meta.tasks.generator_for`), never from the global RNG.

Baselines (SGD, SGD with Nesterov momentum, RMSprop, Adam) get their learning rate tuned on a log
grid over separate tuning seeds (criterion: mean final training loss, a NaN/Inf run counting as
+inf); they are then run with the chosen lr on fresh evaluation seeds. Learned optimizers run
untuned (``lr=1.0``) on the same evaluation seeds.

Definitions used in every report:

- *final loss* of a run: mean training (minibatch) loss over its last 10 steps;
- *mean loss* of a run: mean training loss over all its steps;
- statistics over seeds (mean, sample std, median, quartiles) are over the runs that stayed
  finite; ``nonfinite`` counts the runs in which a NaN/Inf loss or gradient appeared (a run stops
  at that step, the rest of its curve is NaN).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .meta.tasks import (
    META_TRAIN_ACTIVATIONS,
    MNIST_SPLIT,
    MNIST_SPLIT_SEED,
    MLPArchitecture,
    generator_for,
    mlp_module,
)
from .models import TinyTransformer
from .optim import LearnedOptimizer, LSTMOptimizer, MetaLSTMOptimizer, NonFiniteGradientError
from .weights import UntrainedWeightsWarning, read_header

#: steps averaged for a run's final loss
FINAL_WINDOW = 10
#: default lr grid of the baselines: half-decades from 1e-4 to 10
DEFAULT_LRS: tuple[float, ...] = tuple(10.0 ** (e / 2) for e in range(-8, 3))
#: the --quick grid
QUICK_LRS: tuple[float, ...] = (1e-3, 1e-2, 1e-1)
QUICK_STEPS = 20
# Seed offsets: tuning seeds never coincide with evaluation seeds (0 .. seeds-1).
TUNING_SEED_OFFSET = 1_000_000
STABILITY_SEED = 2_000_000
# Second key of generator_for: which stream of a seed a generator draws.
_INIT_STREAM, _BATCH_STREAM, _TASK_STREAM = 0, 1, 2


# ----------------------------------------------------------------------------- problems
class Problem(ABC):
    """One optimizee: ``model(seed)`` builds it, ``loss(model, seed, step)`` is minibatch ``step``'s loss.

    Attributes:
        name: what ``--problems`` accepts.
        steps: optimizer steps of one run.
        description: one line for the report.
    """

    name: str
    steps: int
    description: str

    @abstractmethod
    def model(self, seed: int) -> nn.Module:
        """A fresh model whose initial parameters are a function of ``seed`` only."""

    @abstractmethod
    def loss(self, model: nn.Module, seed: int, step: int) -> Tensor:
        """Scalar training loss of ``model`` on the minibatch of ``(seed, step)``; differentiable."""

    def with_steps(self, steps: int) -> Problem:
        """A copy that runs ``steps`` steps (for ``--quick``)."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__, steps=steps)
        return clone


def _init_default_(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """PyTorch's default init, drawn from ``generator``: Linear/Conv U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    Embedding N(0, 1), LayerNorm weight 1 and bias 0.

    Raises:
        TypeError: a module holds parameters of its own and is none of these (it would keep
            whatever memory its parameters were created in).
    """
    with torch.no_grad():
        for module in model.modules():
            # a layer built without bias (or, for LayerNorm, without affine parameters) has None there
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                bound = 1.0 / math.sqrt(module.weight[0].numel())
                for p in (module.weight, module.bias):
                    if p is not None:
                        p.copy_(torch.rand(p.shape, generator=generator) * (2 * bound) - bound)
            elif isinstance(module, nn.Embedding):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator))
            elif isinstance(module, nn.LayerNorm):
                if module.weight is not None:
                    module.weight.fill_(1.0)
                if module.bias is not None:
                    module.bias.zero_()
            elif any(True for _ in module.parameters(recurse=False)):
                raise TypeError(f"no seeded init for the parameters of {type(module).__name__}")
    return model


class ClassificationProblem(Problem):
    """Cross-entropy of a classifier on minibatches drawn uniformly with replacement from a pool.

    Args:
        inputs: ``(N, *features)`` float examples; ``labels``: ``(N,)`` int64 classes.
        pool: int64 indices of the examples this problem may draw (e.g. MNIST's held-out part).
        architecture: builds the (uninitialised) model; its Linear/Conv2d layers get the default init.
        batch_size: examples per minibatch.
    """

    def __init__(
        self,
        name: str,
        description: str,
        steps: int,
        inputs: Tensor,
        labels: Tensor,
        pool: Tensor,
        architecture: Callable[[], nn.Module],
        batch_size: int,
    ) -> None:
        self.name, self.description, self.steps = name, description, steps
        self.inputs, self.labels, self.pool = inputs, labels, pool
        self.architecture, self.batch_size = architecture, batch_size

    def model(self, seed: int) -> nn.Module:
        with torch.device("meta"):
            model = self.architecture()
        model = model.to_empty(device="cpu")
        return _init_default_(model, generator_for(seed, _INIT_STREAM))

    def minibatch(self, seed: int, step: int) -> tuple[Tensor, Tensor]:
        """``(batch_size, *features)`` inputs and ``(batch_size,)`` labels of ``(seed, step)``."""
        draw = torch.randint(
            len(self.pool), (self.batch_size,), generator=generator_for(seed, _BATCH_STREAM, step)
        )
        idx = self.pool[draw]
        return self.inputs[idx], self.labels[idx]

    def loss(self, model: nn.Module, seed: int, step: int) -> Tensor:
        x, y = self.minibatch(seed, step)
        return F.cross_entropy(model(x), y)


class QuadraticModel(nn.Module):
    """``f(theta) = ||W theta - y||^2`` with ``W`` ``(d, d)`` and ``y`` ``(d,)`` buffers, ``theta`` ``(d,)``."""

    def __init__(self, weight: Tensor, target: Tensor, theta: Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("target", target)
        self.theta = nn.Parameter(theta)

    def forward(self) -> Tensor:
        return (self.weight @ self.theta - self.target).square().sum()


class QuadraticProblem(Problem):
    """Random quadratics of dimension ``dim`` (Andrychowicz et al. 2016, section 3.1), one per seed.

    ``W``, ``y`` and ``theta_0`` are i.i.d. N(0, 1); the loss is deterministic (no minibatches).
    """

    def __init__(self, name: str, dim: int, steps: int) -> None:
        self.name, self.dim, self.steps = name, dim, steps
        self.description = (
            f"||W theta - y||^2, W {dim}x{dim} and y, theta_0 i.i.d. N(0, 1) per seed, no minibatches "
            f"(meta-training uses dim 10)"
        )

    def model(self, seed: int) -> nn.Module:
        task = generator_for(seed, _TASK_STREAM)
        weight, target = (
            torch.randn(self.dim, self.dim, generator=task),
            torch.randn(self.dim, generator=task),
        )
        theta = torch.randn(self.dim, generator=generator_for(seed, _INIT_STREAM))
        return QuadraticModel(weight, target, theta)

    def loss(self, model: nn.Module, seed: int, step: int) -> Tensor:
        return model()


def small_convnet() -> nn.Sequential:
    """Input ``(B, 1, 28, 28)``: conv 8 3x3/2 -> ReLU -> conv 16 3x3/2 -> ReLU -> linear 16*6*6 -> 10."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 6 * 6, 10),
    )


def synthetic_classification(
    name: str,
    steps: int,
    *,
    features: int = 16,
    hidden: int = 32,
    classes: int = 4,
    examples: int = 1024,
    batch_size: int = 64,
    data_seed: int = 0,
) -> ClassificationProblem:
    """An MLP ``features-hidden-classes`` (tanh) on Gaussian inputs labelled by a fixed random teacher.

    The data set (``examples`` inputs ``(examples, features)``, labels = argmax of a random linear
    teacher) is fixed by ``data_seed``; seeds vary the initialisation and the minibatch sequence.
    """
    g = torch.Generator().manual_seed(data_seed)
    inputs = torch.randn(examples, features, generator=g)
    labels = (inputs @ torch.randn(features, classes, generator=g)).argmax(dim=1)
    return ClassificationProblem(
        name,
        f"MLP {features}-{hidden}-{classes} tanh on {examples} Gaussian inputs labelled by a random linear "
        f"teacher, batch {batch_size} (never seen in meta-training)",
        steps,
        inputs,
        labels,
        torch.arange(examples),
        lambda: mlp_module((features, hidden, classes), nn.Tanh),
        batch_size,
    )


def markov_sequences(count: int, length: int, vocab: int, generator: torch.Generator) -> Tensor:
    """``(count, length + 1)`` int64 token sequences of one random Markov chain over ``vocab`` tokens.

    The chain's transition rows are ``softmax(3 z)`` of standard normal ``z`` (most of a row's mass on
    a few tokens), the first token uniform; the chain and the sequences come from ``generator``.
    """
    transition = torch.softmax(3.0 * torch.randn(vocab, vocab, generator=generator), dim=1)
    tokens = torch.empty(count, length + 1, dtype=torch.int64)
    tokens[:, 0] = torch.randint(vocab, (count,), generator=generator)
    for t in range(length):
        tokens[:, t + 1] = torch.multinomial(transition[tokens[:, t]], 1, generator=generator).squeeze(1)
    return tokens


def markov_transformer(
    name: str,
    steps: int,
    *,
    vocab: int = 16,
    seq_len: int = 16,
    sequences: int = 2048,
    batch_size: int = 32,
    data_seed: int = 0,
) -> ClassificationProblem:
    """:class:`~learnedopt.models.TinyTransformer` learning the next token of Markov-chain text.

    The sequences (:func:`markov_sequences`, fixed by ``data_seed``) are the pool; an example's
    input is its first ``seq_len`` tokens and its labels the ``seq_len`` tokens after each; the
    loss is the mean cross-entropy over positions. Seeds vary the initialisation and the minibatch
    sequence. Attention, embeddings and LayerNorm appear in no meta-training task.
    """
    tokens = markov_sequences(sequences, seq_len, vocab, torch.Generator().manual_seed(data_seed))
    size = sum(p.numel() for p in TinyTransformer(vocab, seq_len).parameters())
    return ClassificationProblem(
        name,
        f"one-block causal transformer (width 32, 2 heads, LayerNorm first, GELU MLP; {size:,} "
        f"parameters) predicting the next token of {sequences} sequences of {seq_len} tokens from a "
        f"fixed random Markov chain over {vocab} tokens, batch {batch_size}, cross-entropy per token "
        "(never seen in meta-training: no task there has attention, embeddings or LayerNorm)",
        steps,
        tokens[:, :-1],
        tokens[:, 1:],
        torch.arange(sequences),
        lambda: TinyTransformer(vocab, seq_len),
        batch_size,
    )


@cache
def _mnist_held_out(data: str | None) -> tuple[Tensor, Tensor, Tensor]:
    """``(inputs (10000, 784) in [0, 1], labels (10000,), held-out pool indices)`` of MNIST t10k."""
    from .data import load_mnist, split_indices

    images, labels = load_mnist(data, "t10k")
    pool = split_indices(len(images), MNIST_SPLIT, seed=MNIST_SPLIT_SEED)["held_out"]
    return images.reshape(len(images), -1).float() / 255.0, labels, pool


def _mnist_problem(
    name: str,
    steps: int,
    what: str,
    architecture: Callable[[], nn.Module],
    image: bool,
    data: str | None,
) -> ClassificationProblem:
    inputs, labels, pool = _mnist_held_out(data)
    if image:
        inputs = inputs.view(-1, 1, 28, 28)
    return ClassificationProblem(
        name,
        f"{what} on MNIST t10k's held_out part ({len(pool)} images, pixels/255, "
        f"split {MNIST_SPLIT} seed {MNIST_SPLIT_SEED}), batch 128, cross-entropy",
        steps,
        inputs,
        labels,
        pool,
        architecture,
        128,
    )


def _mnist_mlp(
    sizes: tuple[int, ...], act: type[nn.Module], steps: int, label: str
) -> Callable[[str | None, str], Problem]:
    widths = "-".join(map(str, sizes))
    return lambda data, name: _mnist_problem(
        name, steps, f"MLP {widths} {label}", lambda: mlp_module(sizes, act), False, data
    )


class ScaledClassificationProblem(ClassificationProblem):
    """A :class:`ClassificationProblem` whose minibatch inputs are multiplied by ``input_scale``
    and whose default init is multiplied by ``init_scale`` (as in
    :class:`~learnedopt.meta.tasks.RandomMLPTask`)."""

    def __init__(self, *args: Any, input_scale: float, init_scale: float) -> None:
        super().__init__(*args)
        self.input_scale, self.init_scale = input_scale, init_scale

    def model(self, seed: int) -> nn.Module:
        model = super().model(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(self.init_scale)
        return model

    def minibatch(self, seed: int, step: int) -> tuple[Tensor, Tensor]:
        x, y = super().minibatch(seed, step)
        return x * self.input_scale, y


#: The held-out member of ``mlp-random``: its activation is outside the family's meta-training
#: activations; widths, batch size and scales lie inside the family's ranges.
MLP_RANDOM_HELD_OUT = MLPArchitecture((48, 24), "elu", 64)
MLP_RANDOM_HELD_OUT_SCALES = {"input_scale": 2.0, "init_scale": 0.7}


def _mlp_random_held_out(data: str | None, name: str) -> Problem:
    """A member of the ``mlp-random`` task family never seen in meta-training (held-out activation
    ELU, MNIST's held-out images); the family's other draws are fixed to values inside its ranges."""
    inputs, labels, pool = _mnist_held_out(data)
    arch, scales = MLP_RANDOM_HELD_OUT, MLP_RANDOM_HELD_OUT_SCALES
    assert arch.activation not in META_TRAIN_ACTIVATIONS
    widths = "-".join(map(str, (784, *arch.hidden, 10)))
    return ScaledClassificationProblem(
        name,
        f"mlp-random member never seen in meta-training: MLP {widths} {arch.activation} (not "
        f"among the family's meta-training activations {', '.join(META_TRAIN_ACTIVATIONS)}), "
        f"inputs x{scales['input_scale']:g}, default init x{scales['init_scale']:g}, on MNIST "
        f"t10k's held_out part ({len(pool)} images, pixels/255), batch {arch.batch_size}, "
        "cross-entropy",
        200,
        inputs,
        labels,
        pool,
        lambda: arch.module(784, 10),
        arch.batch_size,
        **MLP_RANDOM_HELD_OUT_SCALES,
    )


#: name -> factory(data_dir, name); the MNIST factories raise FileNotFoundError without the data.
PROBLEMS: dict[str, Callable[[str | None, str], Problem]] = {
    "mnist-mlp-100": _mnist_mlp((784, 20, 10), nn.Sigmoid, 100, "sigmoid"),
    "mnist-mlp-200": _mnist_mlp((784, 20, 10), nn.Sigmoid, 200, "sigmoid"),
    "mnist-mlp-1000": _mnist_mlp((784, 20, 10), nn.Sigmoid, 1000, "sigmoid"),
    "mnist-mlp-40": _mnist_mlp((784, 40, 10), nn.Sigmoid, 200, "sigmoid (40 hidden units)"),
    "mnist-mlp-20-20": _mnist_mlp(
        (784, 20, 20, 10), nn.Sigmoid, 200, "sigmoid (two hidden layers)"
    ),
    "mnist-mlp-relu": _mnist_mlp((784, 20, 10), nn.ReLU, 200, "ReLU"),
    "mnist-conv": lambda data, name: _mnist_problem(
        name,
        200,
        "conv 8 3x3/2 -> ReLU -> conv 16 3x3/2 -> ReLU -> linear 576-10",
        small_convnet,
        True,
        data,
    ),
    "quadratic-20": lambda data, name: QuadraticProblem(name, 20, 100),
    "synthetic-mlp": lambda data, name: synthetic_classification(name, 200),
    "mlp-random-held-out": _mlp_random_held_out,
    "transformer-markov": lambda data, name: markov_transformer(name, 200),
}
#: problems run only when named with ``--problems`` (added after the suite's reported runs)
EXTRA_PROBLEMS: tuple[str, ...] = ("transformer-markov",)
DEFAULT_PROBLEMS: tuple[str, ...] = tuple(p for p in PROBLEMS if p not in EXTRA_PROBLEMS)


def make_problem(name: str, data: str | os.PathLike[str] | None = None) -> Problem:
    """The problem called ``name`` (a key of :data:`PROBLEMS`).

    Raises:
        ValueError: unknown name.
        FileNotFoundError: a data-backed problem whose data is missing.
    """
    if name not in PROBLEMS:
        raise ValueError(f"unknown problem {name!r}; choose from {', '.join(PROBLEMS)}")
    return PROBLEMS[name](None if data is None else str(data), name)


# ----------------------------------------------------------------------------- optimizers
OptimizerFactory = Callable[[Iterable[nn.Parameter], float], torch.optim.Optimizer]

BASELINES: dict[str, OptimizerFactory] = {
    "SGD": lambda params, lr: torch.optim.SGD(params, lr=lr),
    "Nesterov": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True),
    "RMSprop": lambda params, lr: torch.optim.RMSprop(params, lr=lr),
    "Adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
}


@dataclass(frozen=True)
class LearnedSpec:
    """A learned optimizer to evaluate: its label, class and ``weights=`` (preset name or file)."""

    label: str
    optimizer: type[LearnedOptimizer]
    weights: str

    def factory(self) -> OptimizerFactory:
        def build(params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
            with warnings.catch_warnings():
                warnings.simplefilter(
                    "ignore", UntrainedWeightsWarning
                )  # reported once, in the header
                return self.optimizer(params, weights=self.weights, lr=lr)

        return build

    def header(self) -> dict[str, Any]:
        """The weights' header (kind, preset, trained, ...)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UntrainedWeightsWarning)
            return dict(
                self.optimizer([nn.Parameter(torch.zeros(1))], weights=self.weights).weights_header
            )


DEFAULT_LEARNED: tuple[LearnedSpec, ...] = (
    LearnedSpec("LSTMOptimizer (l2l-random, default)", LSTMOptimizer, "l2l-random"),
    LearnedSpec("LSTMOptimizer (l2l-mnist)", LSTMOptimizer, "l2l-mnist"),
    LearnedSpec("LSTMOptimizer (l2l-mix)", LSTMOptimizer, "l2l-mix"),
    LearnedSpec("LSTMOptimizer (l2l-short)", LSTMOptimizer, "l2l-short"),
    LearnedSpec("MetaLSTMOptimizer (meta-lstm-mnist)", MetaLSTMOptimizer, "meta-lstm-mnist"),
    LearnedSpec("MetaLSTMOptimizer (meta-lstm-adam-mnist, default)", MetaLSTMOptimizer, "meta-lstm-adam-mnist"),
    LearnedSpec("LSTMOptimizer (l2l-2016, untrained)", LSTMOptimizer, "l2l-2016"),
    LearnedSpec("MetaLSTMOptimizer (meta-lstm-2017, untrained)", MetaLSTMOptimizer, "meta-lstm-2017"),
    LearnedSpec("MetaLSTMOptimizer (meta-lstm-adam, untrained)", MetaLSTMOptimizer, "meta-lstm-adam"),
)


def learned_from_file(path: str | os.PathLike[str]) -> LearnedSpec:
    """A :class:`LearnedSpec` for a weight file, choosing the optimizer class from its header's kind."""
    kind = read_header(path)["kind"]
    for cls in (LSTMOptimizer, MetaLSTMOptimizer):
        if cls.rule_kind == kind:
            return LearnedSpec(f"{cls.__name__} ({Path(path).name})", cls, str(path))
    raise ValueError(f"{path}: no optimizer runs update rules of kind {kind!r}")


# ----------------------------------------------------------------------------- runs
def run_optimizer(
    problem: Problem, seed: int, factory: OptimizerFactory, lr: float, steps: int | None = None
) -> np.ndarray:
    """Train ``problem.model(seed)`` with ``factory(params, lr)``.

    Returns:
        ``(steps,)`` float64 training losses, entry ``t`` measured on minibatch ``t`` before step
        ``t``'s update. At the first NaN/Inf loss or gradient the run stops and the rest is NaN.
    """
    steps = problem.steps if steps is None else steps
    model = problem.model(seed)
    optimizer = factory(model.parameters(), lr)
    learned = isinstance(optimizer, LearnedOptimizer)
    losses = np.full(steps, np.nan)
    for t in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = problem.loss(model, seed, t)
        value = loss.item()
        losses[t] = value
        if not math.isfinite(value):
            break
        loss.backward()
        if learned:
            try:
                optimizer.step(loss=loss.detach())
            except NonFiniteGradientError:
                losses[t] = np.nan  # the gradient was non-finite: flag the run
                break
        else:
            optimizer.step()
    return losses


def final_loss(curve: np.ndarray, window: int = FINAL_WINDOW) -> float:
    """Mean of the last ``window`` entries of a ``(steps,)`` curve (NaN if any is NaN)."""
    return float(np.mean(curve[-window:]))


def tuning_score(curves: Sequence[np.ndarray]) -> float:
    """Tuning criterion: mean final loss over seeds, a non-finite run counting as +inf."""
    if any(not np.isfinite(c).all() for c in curves):
        return math.inf
    return float(np.mean([final_loss(c) for c in curves]))


def select_lr(scores: Mapping[float, float]) -> float:
    """The lr with the lowest score (NaN counts as +inf; ties go to the smaller lr)."""
    if not scores:
        raise ValueError("select_lr needs at least one lr")
    return min(sorted(scores), key=lambda lr: math.inf if math.isnan(scores[lr]) else scores[lr])


def tune_lr(
    problem: Problem, factory: OptimizerFactory, lrs: Sequence[float], seeds: Sequence[int]
) -> tuple[float, dict[float, float]]:
    """Run every lr of ``lrs`` on ``seeds``; return the best lr and ``{lr: score}`` (:func:`tuning_score`)."""
    scores = {
        lr: tuning_score([run_optimizer(problem, s, factory, lr) for s in seeds]) for lr in lrs
    }
    return select_lr(scores), scores


def _plot_precision(curve: np.ndarray) -> list[float]:
    """A per-step curve rounded to 4 significant digits: enough for a plot, and a quarter of
    the digits in the JSON report (the statistics are computed at full precision)."""
    return [float(f"{x:.4g}") for x in curve.tolist()]


def summarize(curves: np.ndarray) -> dict[str, Any]:
    """Statistics over seeds of ``(seeds, steps)`` loss curves (see the module docstring).

    Returns:
        ``final_mean``, ``final_std`` (sample std, 0 for one run), ``final_median``, ``final_q1``,
        ``final_q3``, ``mean_loss`` (mean over seeds of each run's mean loss), ``finals`` (per seed),
        ``nonfinite`` (runs with a NaN/Inf), ``runs``, and per-step ``curve_median``, ``curve_q1``,
        ``curve_q3`` over the finite runs, to 4 significant digits (None when there is none). Statistics are NaN when no run
        stayed finite.
    """
    curves = np.asarray(curves, dtype=np.float64)
    finite = np.isfinite(curves).all(axis=1)
    good = curves[finite]
    finals = np.array([final_loss(c) for c in curves])
    nan = float("nan")
    stats: dict[str, Any] = {
        "runs": len(curves),
        "nonfinite": int((~finite).sum()),
        "finals": finals.tolist(),
    }
    if len(good):
        good_finals = finals[finite]
        q1, med, q3 = np.percentile(good_finals, [25, 50, 75])
        cq1, cmed, cq3 = np.percentile(good, [25, 50, 75], axis=0)
        stats.update(
            final_mean=float(good_finals.mean()),
            final_std=float(good_finals.std(ddof=1)) if len(good) > 1 else 0.0,
            final_median=float(med),
            final_q1=float(q1),
            final_q3=float(q3),
            mean_loss=float(good.mean(axis=1).mean()),
            curve_median=_plot_precision(cmed),
            curve_q1=_plot_precision(cq1),
            curve_q3=_plot_precision(cq3),
        )
    else:
        stats.update(
            final_mean=nan,
            final_std=nan,
            final_median=nan,
            final_q1=nan,
            final_q3=nan,
            mean_loss=nan,
            curve_median=None,
            curve_q1=None,
            curve_q3=None,
        )
    return stats


# ----------------------------------------------------------------------------- harness
@dataclass
class EvalConfig:
    """What :func:`evaluate_optimizers` runs.

    Attributes:
        problems: names of :data:`PROBLEMS`, or :class:`Problem` objects.
        weights: extra learned-optimizer weight files (run beside the default presets).
        seeds: evaluation seeds per problem (seeds ``0 .. seeds-1``).
        tuning_seeds: lr-tuning seeds per problem (disjoint from the evaluation seeds).
        long_tuning_seeds: tuning seeds for problems of >= ``long_steps`` steps (None: ``tuning_seeds``).
        lrs: the baselines' lr grid.
        stability_steps: steps of the learned optimizers' stability run on MNIST MLP 784-20-10 (0 skips).
        steps: override every problem's step count (``--quick``), or None.
        include_default_learned: run the preset learned optimizers.
        data: MNIST folder (None: the default search).
    """

    problems: Sequence[str | Problem] = DEFAULT_PROBLEMS
    weights: Sequence[str] = ()
    seeds: int = 10
    tuning_seeds: int = 3
    long_tuning_seeds: int | None = None
    long_steps: int = 1000
    lrs: Sequence[float] = DEFAULT_LRS
    stability_steps: int = 10_000
    steps: int | None = None
    include_default_learned: bool = True
    data: str | None = None
    quick: bool = False

    def __post_init__(self) -> None:
        for key in ("seeds", "tuning_seeds"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.long_tuning_seeds is not None and self.long_tuning_seeds < 1:
            raise ValueError(f"long_tuning_seeds must be >= 1, got {self.long_tuning_seeds}")
        if self.stability_steps < 0:
            raise ValueError(f"stability_steps must be >= 0, got {self.stability_steps}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not self.lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in self.lrs):
            raise ValueError(
                f"lrs must be a non-empty list of positive finite numbers, got {list(self.lrs)}"
            )
        if not self.problems:
            raise ValueError("no problems given")
        for p in self.problems:
            if isinstance(p, str) and p not in PROBLEMS:
                raise ValueError(f"unknown problem {p!r}; choose from {', '.join(PROBLEMS)}")

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


def evaluate_optimizers(
    config: EvalConfig, log: Callable[[str], None] = _log, workers: int = 1
) -> dict[str, Any]:
    """Run the harness; returns the report (JSON-serialisable) that :func:`write_report` writes.

    Problems whose data is missing are skipped; the report's ``skipped`` maps them to the reason.
    ``workers > 1`` runs the problems and the stability check in that many processes (each with
    this process's torch thread count, logging to stderr instead of ``log``); every run is a
    function of its seed alone, so the report's numbers are those of ``workers=1``.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    learned = [
        *(DEFAULT_LEARNED if config.include_default_learned else ()),
        *map(learned_from_file, config.weights),
    ]
    report: dict[str, Any] = {
        "config": {k: v for k, v in asdict(config).items() if k != "problems"}
        | {"problems": [p if isinstance(p, str) else p.name for p in config.problems]},
        "definitions": {
            "final_loss": f"mean training (minibatch) loss over the last {FINAL_WINDOW} steps of a run",
            "mean_loss": "mean training loss over all steps of a run, averaged over seeds",
            "statistics": "over the evaluation seeds whose run stayed finite; final_std is the sample std",
            "tuning": "baselines: lr with the lowest mean final loss over the tuning seeds (a NaN/Inf run = +inf); "
            "learned optimizers: untuned, lr=1.0",
        },
        "learned": {
            spec.label: {"weights": spec.weights, "header": spec.header()} for spec in learned
        },
        "problems": {},
        "skipped": {},
    }
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
    jobs: list[tuple[Callable[..., Any], tuple[Any, ...]]] = [
        (_evaluate_problem, (problem if workers == 1 else entry, config, learned))
        for problem, entry in zip(problems, entries, strict=True)
    ]
    if config.stability_steps:
        jobs.append((_stability, (config, learned)))
    if workers == 1:
        outputs = [job(*args, log) for job, args in jobs]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        def steps(i: int) -> int:
            return config.stability_steps if i == len(problems) else problems[i].steps

        order = sorted(range(len(jobs)), key=steps, reverse=True)  # longest first: none starts last
        with ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=torch.set_num_threads,
            initargs=(torch.get_num_threads(),),
        ) as pool:
            futures = {i: pool.submit(jobs[i][0], *jobs[i][1], _log) for i in order}
            outputs = [futures[i].result() for i in range(len(jobs))]
    for problem, output in zip(problems, outputs, strict=False):
        report["problems"][problem.name] = output
    report["stability"] = outputs[-1] if config.stability_steps else None
    report["seconds"] = time.perf_counter() - start
    return report


def _build_problem(entry: str | Problem, config: EvalConfig) -> Problem:
    problem = make_problem(entry, config.data) if isinstance(entry, str) else entry
    return problem if config.steps is None else problem.with_steps(config.steps)


def _evaluate_problem(
    entry: str | Problem, config: EvalConfig, learned: Sequence[LearnedSpec], log: Callable[[str], None]
) -> dict[str, Any]:
    """One problem's report entry: every baseline tuned and run, every learned optimizer run.
    ``entry``: the built problem, or a name to build (in a worker process)."""
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
        lr, scores = tune_lr(problem, factory, config.lrs, tune_seeds)
        curves = np.stack([run_optimizer(problem, s, factory, lr) for s in eval_seeds])
        results[label] = {
            "kind": "baseline",
            "lr": lr,
            "tuning_scores": {repr(k): v for k, v in scores.items()},
            "lr_at_grid_edge": lr in (min(config.lrs), max(config.lrs)),
        } | summarize(curves)
        log(f"{problem.name} {label}: lr {lr:.3g}, final {results[label]['final_mean']:.4g}")
    for spec in learned:
        curves = np.stack([run_optimizer(problem, s, spec.factory(), 1.0) for s in eval_seeds])
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
    config: EvalConfig, learned: Sequence[LearnedSpec], log: Callable[[str], None]
) -> dict[str, Any]:
    """Run each learned optimizer ``stability_steps`` steps on MNIST MLP 784-20-10 (one seed)."""
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
        curve = run_optimizer(problem, STABILITY_SEED, spec.factory(), 1.0)
        bad = np.flatnonzero(np.isnan(curve) | ~np.isfinite(curve))
        out["results"][spec.label] = {
            "nonfinite": bool(len(bad)),
            "first_nonfinite_step": int(bad[0]) if len(bad) else None,
            "final_loss": final_loss(curve),
            "min_loss": float(np.nanmin(curve)) if len(bad) < len(curve) else None,
        }
        log(f"stability {spec.label}: nonfinite={bool(len(bad))} final {final_loss(curve):.4g}")
    return out


# ----------------------------------------------------------------------------- output
def _fmt(x: float) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{x:.4g}"


def markdown_tables(report: Mapping[str, Any]) -> str:
    """The report as Markdown: settings, one table per problem, the stability check."""
    c = report["config"]
    lines = [
        "Held-out optimizee suite: learned optimizers (untuned, lr=1.0) against baselines with tuned lr.",
        "",
        (
            f"- evaluation seeds: {c['seeds']} per problem (0..{c['seeds'] - 1}); "
            f"tuning seeds: {c['tuning_seeds']} (problems of >= {c['long_steps']} steps: "
            f"{c['long_tuning_seeds'] or c['tuning_seeds']}), disjoint from the evaluation seeds"
        ),
        f"- baseline lr grid: {', '.join(f'{lr:.3g}' for lr in c['lrs'])}; criterion: {report['definitions']['tuning']}",
        "- baselines: SGD; SGD + Nesterov momentum 0.9; RMSprop (alpha 0.99); Adam (0.9, 0.999); other settings torch defaults",
        (
            f"- final loss: {report['definitions']['final_loss']}; {report['definitions']['statistics']}; "
            "NaN column: runs (of all seeds) in which a NaN/Inf loss or gradient appeared"
        ),
        "- every optimizer sees the same initial parameters and minibatch sequence for a given seed",
        f"- quick mode: {c['quick']}"
        + (f" (every problem cut to {c['steps']} steps)" if c["steps"] else ""),
        "",
    ]
    for label, info in report["learned"].items():
        h = info["header"]
        state = (
            "UNTRAINED preset"
            if h.get("trained") is False
            else f"trained on {h.get('trained_on')!r}"
        )
        lines.append(f"- {label}: weights `{info['weights']}` ({state})")
    for name, reason in report["skipped"].items():
        lines.append(f"- skipped {name}: {reason}")
    for name, prob in report["problems"].items():
        lines += [
            "",
            f"## {name} ({prob['steps']} steps, {prob['seconds']:.0f} s)",
            "",
            prob["description"],
            "",
            "| optimizer | lr | final loss mean +- std | median [q1, q3] | mean loss | NaN | seeds below tuned Adam |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        adam = prob["results"].get("Adam")
        for label, r in prob["results"].items():
            lr = (
                f"{r['lr']:.3g}" + (" (grid edge)" if r.get("lr_at_grid_edge") else "")
                if r["kind"] == "baseline"
                else "1 (untuned)"
            )
            lines.append(
                f"| {label} | {lr} | {_fmt(r['final_mean'])} +- {_fmt(r['final_std'])} | "
                f"{_fmt(r['final_median'])} [{_fmt(r['final_q1'])}, {_fmt(r['final_q3'])}] | {_fmt(r['mean_loss'])} | "
                f"{'yes' if r['nonfinite'] else 'no'} ({r['nonfinite']}/{r['runs']}) | "
                f"{'-' if adam is None or r is adam else seeds_below(r['finals'], adam['finals'])} |"
            )
    lines.append(
        "\nSeeds below tuned Adam: on how many evaluation seeds (of those where both runs stayed finite) "
        "a run's final loss is below tuned Adam's on the same seed, with the same initialisation and "
        "minibatches: a paired comparison, finer than the spreads across seeds."
    )
    stab = report.get("stability")
    if stab:
        lines += ["", "## Stability check", ""]
        if "skipped" in stab:
            lines.append(f"Skipped: {stab['skipped']}")
        else:
            lines += [
                f"{stab['problem']}, {stab['steps']} steps, seed {stab['seed']}, lr 1.0.",
                "",
                "| optimizer | NaN/Inf | first NaN/Inf step | final loss | min loss |",
                "|---|---|---:|---:|---:|",
            ]
            for label, r in stab["results"].items():
                lines.append(
                    f"| {label} | {'yes' if r['nonfinite'] else 'no'} | {r['first_nonfinite_step'] if r['nonfinite'] else '-'} "
                    f"| {_fmt(r['final_loss'])} | {_fmt(r['min_loss'])} |"
                )
    lines += ["", f"Total time: {report['seconds']:.0f} s."]
    return "\n".join(lines)


def seeds_below(finals: Sequence[float], reference: Sequence[float]) -> str:
    """``"k/n"``: of the ``n`` seeds where both final losses are finite, ``k`` where ``finals`` is
    below ``reference`` (both indexed by evaluation seed)."""
    pairs = [(a, b) for a, b in zip(finals, reference, strict=True) if math.isfinite(a) and math.isfinite(b)]
    return f"{sum(a < b for a, b in pairs)}/{len(pairs)}"


def plot_curves(report: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Loss curves: per-step median and quartile band over finite seeds, one subplot per problem, log y."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = report["problems"]
    n = max(1, len(problems))
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, (name, prob) in zip(axes.flat, problems.items()):
        for label, r in prob["results"].items():
            if r["curve_median"] is None:
                continue
            steps = np.arange(len(r["curve_median"]))
            (line,) = ax.plot(
                steps,
                r["curve_median"],
                label=label,
                lw=1.2,
                ls="-" if r["kind"] == "baseline" else "--",
            )
            ax.fill_between(
                steps, r["curve_q1"], r["curve_q3"], color=line.get_color(), alpha=0.2, lw=0
            )
        ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
    for ax in list(axes.flat)[len(problems) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3) or 1, fontsize=8)
    fig.tight_layout(rect=(0, 0.02 + 0.03 * math.ceil(len(labels) / 3), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


WriteResults = Callable[[str, dict, str], None]


def write_report(
    report: dict[str, Any],
    out_dir: str | os.PathLike[str],
    name: str = "optimizee_eval",
    write_results: WriteResults | None = None,
) -> list[Path]:
    """Write ``<name>.json``, ``<name>.md`` and ``<name>.png`` into ``out_dir``.

    ``write_results(name, payload, table)`` writes the JSON and Markdown (the benchmark passes
    ``benchmarks/common.write_results``, which writes into its results folder); by default they are
    written here with the command and a short machine description.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_tables(report)
    if write_results is None:
        payload = {
            "command": " ".join(["learnedopt", *sys.argv[1:]]),
            "machine": {
                "cpu": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
        } | report
        (out / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
        header = f"# {name}\n\nCommand: `{payload['command']}`  \nMachine: {payload['machine']}\n\n"
        (out / f"{name}.md").write_text(header + table + "\n")
    else:
        write_results(name, report, table)
    plot_curves(report, out / f"{name}.png")
    return [out / f"{name}.{ext}" for ext in ("json", "md", "png")]


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``evaluate optimizers`` arguments (shared with ``benchmarks/optimizee_eval.py``)."""
    parser.add_argument(
        "--problems",
        nargs="+",
        default=None,
        metavar="NAME",
        help=f"problems to run (default all): {', '.join(PROBLEMS)}",
    )
    parser.add_argument(
        "--weights",
        nargs="+",
        default=[],
        metavar="FILE",
        help="extra learned-optimizer weight files (.safetensors), run beside the presets",
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
        help="baseline lr grid (default 1e-4 .. 1e0 in half-decades)",
    )
    parser.add_argument(
        "--stability-steps",
        type=int,
        default=None,
        help="steps of the learned optimizers' NaN/Inf check on the MNIST MLP (default 10000; 0 skips)",
    )
    parser.add_argument(
        "--data", default=None, help="MNIST folder (default: the LEARNEDOPT_DATA search)"
    )
    # The models are tiny: more threads only add synchronisation (measured 2-10x slower with 2 threads on a busy 2-core machine).
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1; 0 keeps torch's choice)",
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
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK_STEPS} steps, 2 seeds, 1 tuning seed, lrs {QUICK_LRS}",
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
        )
        if getattr(args, attr) is not None
    }
    given["weights"] = list(args.weights)
    for path in given["weights"]:
        if not Path(path).is_file():
            raise ValueError(f"weight file not found: {path}")
    return EvalConfig.quick_config(**given) if args.quick else EvalConfig(**given)


def run_cli(
    args: argparse.Namespace,
    out_dir: str | os.PathLike[str],
    write_results: WriteResults | None = None,
) -> int:
    """Parse-args-to-files: build the config, run the harness, write the report, print the paths."""
    try:
        config = config_from_args(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.workers < 1:
        print(f"error: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    report = evaluate_optimizers(config, workers=args.workers)
    for path in write_report(report, out_dir, name=args.name, write_results=write_results):
        print(path)
    return 0


def add_evaluate_optimizers_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``optimizers`` on ``learnedopt evaluate``'s subparsers."""
    parser = sub.add_parser(
        "optimizers",
        help="learned optimizers against tuned SGD/Nesterov/RMSprop/Adam on held-out optimizees",
    )
    add_arguments(parser)
    parser.add_argument(
        "--out", default="benchmarks/results", help="output folder (default benchmarks/results)"
    )
    parser.set_defaults(func=lambda args: run_cli(args, args.out))
    return parser
