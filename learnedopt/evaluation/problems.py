"""Held-out optimizees: a :class:`Problem` builds a model from a seed and gives the loss of
minibatch ``t``; :func:`make_problem` builds one by its ``--problems`` name.

Every draw (initial parameters, minibatches, a task's data) comes from a generator seeded by
``(seed, stream, ...)`` (:func:`learnedopt.meta.tasks.generator_for`), never from the global RNG,
so every optimizer run on ``(problem, seed)`` starts alike and sees the same minibatches.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from ..meta.tasks import (
    META_TRAIN_ACTIVATIONS,
    MNIST_SPLIT,
    MNIST_SPLIT_SEED,
    MLPArchitecture,
    describe_value,
    generator_for,
    mlp_module,
    regression_draw,
)
from ..models import TinyTransformer, small_resnet
from ..plugins import call_entry_point, entry_point_path, load_entry_point, takes_parameter
from ..values import MAX_ELEMENTS

# Second key of generator_for: which stream of a seed a generator draws.
_INIT_STREAM, _BATCH_STREAM, _TASK_STREAM = 0, 1, 2


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
    Embedding N(0, 1), LayerNorm and BatchNorm weight 1 and bias 0 (BatchNorm's running statistics
    reset).

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
            elif isinstance(module, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm)):
                if module.weight is not None:
                    module.weight.fill_(1.0)
                if module.bias is not None:
                    module.bias.zero_()
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.reset_running_stats()  # built on the meta device: the buffers hold garbage
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

    #: how the loss reads in a problem's description
    loss_description = "cross-entropy"

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
        idx = self.pool[draw].to(self.inputs.device)
        return self.inputs.index_select(0, idx), self.labels.index_select(0, idx)  # as MLPTask.minibatch

    def loss(self, model: nn.Module, seed: int, step: int) -> Tensor:
        x, y = self.minibatch(seed, step)
        return F.cross_entropy(model(x), y)


class ReconstructionProblem(ClassificationProblem):
    """A :class:`ClassificationProblem`'s pool and minibatches with the labels unused: the loss is
    the mean squared error of the model's output ``(batch_size, *features)`` against its input."""

    loss_description = "squared error of the reconstruction"

    def loss(self, model: nn.Module, seed: int, step: int) -> Tensor:
        x, _ = self.minibatch(seed, step)
        return F.mse_loss(model(x), x)


class QuadraticModel(nn.Module):
    """``f(theta) = ||W theta - y||^2`` with ``W`` ``(d, d)`` and ``y`` ``(d,)`` buffers, ``theta`` ``(d,)``."""

    def __init__(self, weight: Tensor, target: Tensor, theta: Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("target", target)
        self.theta = nn.Parameter(theta)

    def forward(self) -> Tensor:
        """The loss ``||W theta - y||^2`` at the current ``theta``, a 0-d tensor."""
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


def regression_data(generator: torch.Generator, n: int = 512, dim: int = 16) -> tuple[Tensor, Tensor]:
    """Inputs ``x`` ``(n, dim)`` i.i.d. N(0, 1) and targets ``y = sin(3 x w)`` ``(n, 1)``, with
    ``w`` ``(dim, 1)`` i.i.d. N(0, 1/dim), drawn from ``generator`` in that order (the demo's data)."""
    x, w = regression_draw(generator, n, dim)
    return x, torch.sin(3 * x @ w)


class RegressionProblem(Problem):
    """Full-batch regression of ``sin(3 x w)`` (:func:`regression_data`, one draw per seed) by a
    ``dim``-64-1 tanh MLP with the default init, mean squared error over all ``n`` points: a
    deterministic loss, like the quadratic, which a rule trained on minibatches never saw."""

    def __init__(self, name: str, steps: int, n: int = 512, dim: int = 16) -> None:
        self.name, self.steps, self.n, self.dim = name, steps, n, dim
        self._data: dict[int, tuple[Tensor, Tensor]] = {}
        self.description = (
            f"full-batch regression: y = sin(3 x w), x ({n}, {dim}) and w N(0, 1/{dim}) drawn per seed, "
            f"MLP {dim}-64-1 tanh, mean squared error over all {n} points, no minibatches (the demo's problem)"
        )

    def data(self, seed: int) -> tuple[Tensor, Tensor]:
        """``(x (n, dim), y (n, 1))`` of ``seed``."""
        if seed not in self._data:
            self._data[seed] = regression_data(generator_for(seed, _TASK_STREAM), self.n, self.dim)
        return self._data[seed]

    def model(self, seed: int) -> nn.Module:
        with torch.device("meta"):  # every weight drawn from the seed below, none from the global RNG
            model = nn.Sequential(nn.Linear(self.dim, 64), nn.Tanh(), nn.Linear(64, 1))
        return _init_default_(model.to_empty(device="cpu"), generator_for(seed, _INIT_STREAM))

    def loss(self, model: nn.Module, seed: int, step: int) -> Tensor:
        x, y = self.data(seed)
        return F.mse_loss(model(x), y)


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


def _mnist_held_out(data: str | None) -> tuple[Tensor, Tensor, Tensor]:
    """``(inputs (10000, 784) in [0, 1], labels (10000,), held-out pool indices)`` of MNIST t10k,
    read once per folder (the one ``data`` names or the default search finds now)."""
    from ..data.paths import resolve_data_dir

    return _mnist_held_out_at(str(resolve_data_dir(data, "mnist")))


@cache
def _mnist_held_out_at(directory: str) -> tuple[Tensor, Tensor, Tensor]:
    from ..data import load_mnist, split_indices

    images, labels = load_mnist(directory, "t10k")
    pool = split_indices(len(images), MNIST_SPLIT, seed=MNIST_SPLIT_SEED, allow_empty=True)["held_out"]  # held_out only
    return images.reshape(len(images), -1).float() / 255.0, labels, pool


def _mnist_problem(
    name: str,
    steps: int,
    what: str,
    architecture: Callable[[], nn.Module],
    image: bool,
    data: str | None,
    batch_size: int = 128,
    kind: type[ClassificationProblem] = ClassificationProblem,
) -> ClassificationProblem:
    inputs, labels, pool = _mnist_held_out(data)
    if image:
        inputs = inputs.view(-1, 1, 28, 28)
    return kind(
        name,
        f"{what} on MNIST t10k's held_out part ({len(pool)} images, pixels/255, "
        f"split {MNIST_SPLIT} seed {MNIST_SPLIT_SEED}), batch {batch_size}, {kind.loss_description}",
        steps,
        inputs,
        labels,
        pool,
        architecture,
        batch_size,
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
    "regression-1000": lambda data, name: RegressionProblem(name, 1000),
    "mnist-mlp-wide": _mnist_mlp(
        (784, 256, 256, 10), nn.ReLU, 500, "ReLU (4x meta-training's widest layer, 269,322 parameters)"
    ),
    "mnist-resnet-bn": lambda data, name: _mnist_problem(
        name,
        200,
        "residual conv net with BatchNorm (models.small_resnet: stem 16 3x3/2, basic block, "
        "32 3x3/2, basic block, average pool, linear; BatchNorm in training mode)",
        small_resnet,
        True,
        data,
        batch_size=64,
    ),
    "mnist-autoencoder": lambda data, name: _mnist_problem(
        name,
        500,
        "autoencoder MLP 784-128-32-128-784, ReLU, sigmoid output",
        lambda: nn.Sequential(mlp_module((784, 128, 32, 128, 784), nn.ReLU), nn.Sigmoid()),
        False,
        data,
        kind=ReconstructionProblem,
    ),
}
#: problems run only when named with ``--problems`` (added after the suite's reported runs)
EXTRA_PROBLEMS: tuple[str, ...] = (
    "transformer-markov",
    "regression-1000",
    "mnist-mlp-wide",
    "mnist-resnet-bn",
    "mnist-autoencoder",
)
DEFAULT_PROBLEMS: tuple[str, ...] = tuple(p for p in PROBLEMS if p not in EXTRA_PROBLEMS)


def check_problem(problem: Problem) -> None:
    """Refuse, in one line, a problem whose runs would fail part-way with a traceback, or whose
    report would mean nothing: its ``model(0)`` is not an ``nn.Module`` with trainable
    floating-point parameters; a second ``model(0)`` holds trainable parameters in the first's
    memory (a cached module) or other values (an unseeded init); its ``loss(model, 0, 0)`` is not
    a one-element floating-point tensor with a gradient for them (e.g. per-example losses, left
    unreduced), is not finite or has a non-finite gradient (every run would stop at step 0), or has
    a sparse gradient (an ``nn.Embedding(sparse=True)``'s). Runs in a fork of the global RNG, so a
    problem that seeds it leaves the runs as they would be without the check. Not thread-safe:
    the problem's own code may draw from or seed torch's global generator, so its state is saved
    and restored (``torch.random.fork_rng``), which rolls back what another thread draws from it
    meanwhile.

    Raises:
        ValueError: naming the problem and what is wrong.
    """
    with torch.random.fork_rng(devices=[]):
        model = problem.model(0)
        if not isinstance(model, nn.Module):
            raise ValueError(f"{problem.name}: model(seed) must return an nn.Module, got a {type(model).__name__}")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params or not all(p.is_floating_point() for p in params):
            raise ValueError(f"{problem.name}: model(0) has no trainable floating-point parameters to optimize")
        _check_fresh_and_seeded(problem, model)
        loss = problem.loss(model, 0, 0)
        if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.is_floating_point():
            raise ValueError(
                f"{problem.name}: loss(model, seed, step) gave {describe_value(loss)}; it must be the minibatch's scalar "
                "floating-point loss (reduce per-example losses, e.g. with .mean())"
            )
        if not loss.requires_grad:
            raise ValueError(f"{problem.name}: loss(model, 0, 0) has no gradient: compute it from model's parameters")
        if not math.isfinite(value := loss.item()):
            raise ValueError(f"{problem.name}: loss(model(0), 0, 0) is {value}, before any step: every optimizer's run would stop there")
        loss.backward()
        nonfinite = [name for name, p in model.named_parameters()
                     if p.grad is not None and not p.grad.is_sparse and not bool(torch.isfinite(p.grad).all())]  # fmt: skip
        if nonfinite:
            raise ValueError(f"{problem.name}: the gradient of {', '.join(nonfinite)} at seed 0, step 0 holds NaN or Inf, before any "
                             "step: every optimizer's run would stop there")  # fmt: skip
        sparse = [name for name, p in model.named_parameters() if p.grad is not None and p.grad.is_sparse]
        if sparse:  # each run failed at its first step, in the check of its gradient or the optimizer's own
            raise ValueError(f"{problem.name}: the gradient of {', '.join(sparse)} is sparse (an nn.Embedding(sparse=True)?); "
                             "Adam, RMSprop and the learned optimizers take dense gradients")  # fmt: skip


def _check_fresh_and_seeded(problem: Problem, model: nn.Module) -> None:
    """Raise ``ValueError`` where ``problem.model(0)`` called again holds a parameter in the memory
    of one of ``model``'s (its first call's: a cached module, or ``nn.Parameter(t)`` of a tensor
    ``t`` the problem keeps, which each run would go on training from where the run before it
    stopped) or holds other parameters or buffers (drawn from an unseeded RNG:
    every optimizer would start from other ones, the paired comparisons comparing nothing)."""
    again = problem.model(0)
    if not isinstance(again, nn.Module):
        raise ValueError(f"{problem.name}: model(seed) must return an nn.Module, got a {type(again).__name__}")
    # a frozen part (a pretrained embedding kept once) may be shared: no run changes it
    first_memory = frozenset().union(*(_memory(q) for q in model.parameters() if q.requires_grad))
    shared = [name for name, p in again.named_parameters() if p.requires_grad and _memory(p) & first_memory]
    if shared:
        raise ValueError(f"{problem.name}: model(0) called again gave parameters in the memory of the first call's "
                         f"({', '.join(shared)}); model(seed) must build a fresh module, as each run trains its own "
                         "(nn.Parameter(t) keeps t's memory: clone t)")  # fmt: skip
    first, second = model.state_dict(), again.state_dict()
    differ = sorted(set(first) ^ set(second)) + [
        key for key in first if key in second and isinstance(first[key], Tensor)
        and not (is_lazy(first[key]) or is_lazy(second[key]))  # a lazy module's: drawn at its first forward
        and not _same_tensor(first[key], second[key])
    ]  # fmt: skip
    if differ:
        raise ValueError(f"{problem.name}: model(0) called again gave other initial parameters or buffers ({', '.join(differ)}); "
                         "they must be a function of the seed (draw them from a generator seeded by it), so that every "
                         "optimizer starts alike")  # fmt: skip


def _memory(p: Tensor) -> frozenset[int]:
    """Where ``p``'s values are stored: the address of its storage, for the parameters of two
    modules to be compared (the same object, or a view of the same memory); empty for a lazy
    module's uninitialized parameter or one of no elements."""
    if is_lazy(p) or p.untyped_storage().nbytes() == 0:
        return frozenset()
    return frozenset([p.untyped_storage().data_ptr()])


def _same_tensor(a: Tensor, b: Any) -> bool:
    """Whether ``b`` is a tensor of ``a``'s shape, dtype and values (NaN equal to NaN)."""
    if not isinstance(b, Tensor) or a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                      and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))))  # fmt: skip


def make_problem(name: str, data: str | os.PathLike[str] | None = None) -> Problem:
    """The problem called ``name``: a key of :data:`PROBLEMS`, or your own as ``module:Class`` (a
    :class:`Problem` subclass, or a function returning one, called with ``data=`` if it takes
    that parameter; the problem is renamed ``name``, the key of its results in a report).

    Raises:
        ValueError: unknown name, or an own problem that does not import or is not a
            :class:`Problem` with a positive integer ``steps`` (at most ``2**31 - 1``) and a ``description``.
        FileNotFoundError: a data-backed problem whose data is missing.
    """
    if entry_point_path(name) is not None:
        try:
            factory = load_entry_point(name)
            kwargs = {"data": str(data)} if data is not None and takes_parameter(factory, "data") else {}
            problem = call_entry_point(name, factory, kwargs, "it is called with data= if it takes it")
        except ValueError as err:
            raise ValueError(f"problem {name}: {err}") from None
        if not isinstance(problem, Problem):
            raise ValueError(f"{name}() gave a {type(problem).__name__}, not a learnedopt.evaluation.Problem")
        steps, description = getattr(problem, "steps", None), getattr(problem, "description", None)
        # at most MAX_ELEMENTS: a run's (steps,) loss curve is one array (10**20 was numpy's
        # "Maximum allowed dimension exceeded" at the first run)
        if not (isinstance(steps, int) and not isinstance(steps, bool) and 1 <= steps <= MAX_ELEMENTS) or not isinstance(description, str):
            raise ValueError(
                f"{name}: a Problem needs steps (a positive integer, at most {MAX_ELEMENTS:,}) and description (a string), "
                f"got {steps!r} and {description!r}"
            )
        try:
            problem.name = name
        except AttributeError as err:  # a read-only property
            raise ValueError(f"{name}: its name cannot be set ({err}): the harness names a problem by its --problems entry; "
                             "make name a plain attribute") from None  # fmt: skip
        return problem
    if name not in PROBLEMS:
        raise ValueError(f"unknown problem {name!r}; choose from {', '.join(PROBLEMS)}, or your own as module:Class")
    return PROBLEMS[name](None if data is None else str(data), name)
