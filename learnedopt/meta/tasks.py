"""Task families for meta-training: optimizees whose loss the unroll differentiates.

A :class:`TaskFamily` samples tasks; a :class:`Task` gives initial parameters (a dict of tensors)
and the minibatch loss at any step index; a :class:`TaskBatch` is ``B`` tasks with the same
parameter shapes, whose parameters are stacked ``(B, *shape)`` and whose losses come as ``(B,)``.
The base ``TaskBatch`` loops over its tasks; families override it with a batched loss.

The minibatch of step ``t`` of a task is a fixed function of the task and ``t`` (it is drawn
from a generator seeded by the task's seed and ``t``), not of a shared generator's position.
So a loss can be evaluated twice on the same minibatch (the end of one truncation and the start
of the next), and a run resumed from a checkpoint sees exactly the minibatches it would have.
"""

from __future__ import annotations

import itertools
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

Params = dict[str, Tensor]


def derive_seed(*keys: int) -> int:
    """A 63-bit seed mixed from non-negative integer keys (e.g. ``(seed, step)``) by numpy's SeedSequence.

    Distinct key tuples give unrelated seeds, so generators seeded this way are independent.
    """
    words = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def generator_for(*keys: int) -> torch.Generator:
    """A fresh CPU generator seeded with :func:`derive_seed` of ``keys``."""
    return torch.Generator().manual_seed(derive_seed(*keys))


class Task(ABC):
    """One optimizee: initial parameters and a minibatch loss."""

    @abstractmethod
    def init_params(self, generator: torch.Generator) -> Params:
        """Fresh initial parameters, drawn from ``generator``."""

    @abstractmethod
    def loss(self, params: Mapping[str, Tensor], step_index: int) -> Tensor:
        """Scalar loss of ``params`` on the minibatch of step ``step_index``; differentiable."""


class TaskBatch:
    """``B`` tasks of one family, parameters stacked over a leading meta-batch dimension."""

    def __init__(self, tasks: Sequence[Task]) -> None:
        if not tasks:
            raise ValueError("a task batch needs at least one task")
        self.tasks = list(tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    def subset(self, part: slice) -> TaskBatch:
        """The tasks ``part`` of this batch, as a batch of the same class (a rank's share of a
        meta-batch). Subclasses whose constructor is not ``(tasks)`` override it."""
        return type(self)(self.tasks[part])

    def init_params(self, generator: torch.Generator) -> Params:
        """``(B, *shape)`` per name: each task's :meth:`Task.init_params`, in task order."""
        per_task = [task.init_params(generator) for task in self.tasks]
        return {k: torch.stack([p[k] for p in per_task]) for k in per_task[0]}

    def loss(self, params: Mapping[str, Tensor], step_index: int) -> Tensor:
        """``(B,)`` losses; ``params`` is ``(B, *shape)`` per name."""
        return torch.stack(
            [
                task.loss({k: v[b] for k, v in params.items()}, step_index)
                for b, task in enumerate(self.tasks)
            ]
        )


class TaskFamily(ABC):
    """A distribution over tasks."""

    #: the name ``--task`` accepts
    name: str

    @abstractmethod
    def sample(self, generator: torch.Generator) -> Task:
        """Draw one task."""

    def sample_batch(self, size: int, generator: torch.Generator) -> TaskBatch:
        """Draw ``size`` tasks (in order, from ``generator``)."""
        return TaskBatch([self.sample(generator) for _ in range(size)])

    @abstractmethod
    def describe(self) -> str:
        """One paragraph: the family, its sampling and (for data tasks) the data split."""


# ----------------------------------------------------------------------------- quadratic
class QuadraticTask(Task):
    """``f(theta) = ||W theta - y||^2`` (Andrychowicz et al. 2016, section 3.1); no minibatches.

    Args:
        weight: ``(d, d)`` matrix ``W``.
        target: ``(d,)`` vector ``y``.
    """

    def __init__(self, weight: Tensor, target: Tensor) -> None:
        self.weight, self.target = weight, target

    def init_params(self, generator: torch.Generator) -> Params:
        d = self.target.shape[0]
        return {"theta": torch.randn(d, generator=generator, dtype=self.target.dtype)}

    def loss(self, params: Mapping[str, Tensor], step_index: int) -> Tensor:
        return (self.weight @ params["theta"] - self.target).square().sum()


class QuadraticBatch(TaskBatch):
    """Quadratic tasks with one batched matrix product per loss."""

    def __init__(self, tasks: Sequence[QuadraticTask]) -> None:
        super().__init__(tasks)
        self.weight = torch.stack([t.weight for t in tasks])  # (B, d, d)
        self.target = torch.stack([t.target for t in tasks])  # (B, d)

    def loss(self, params: Mapping[str, Tensor], step_index: int) -> Tensor:
        residual = torch.bmm(self.weight, params["theta"].unsqueeze(2)).squeeze(2) - self.target
        return residual.square().sum(dim=1)


class QuadraticFamily(TaskFamily):
    """Random quadratics: ``W`` ``(dim, dim)`` and ``y`` ``(dim,)`` i.i.d. N(0, 1); ``theta_0`` ~ N(0, 1)."""

    name = "quadratic"

    def __init__(self, dim: int = 10, dtype: torch.dtype = torch.float32) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim, self.dtype = dim, dtype

    def sample(self, generator: torch.Generator) -> QuadraticTask:
        weight = torch.randn(self.dim, self.dim, generator=generator, dtype=self.dtype)
        target = torch.randn(self.dim, generator=generator, dtype=self.dtype)
        return QuadraticTask(weight, target)

    def sample_batch(self, size: int, generator: torch.Generator) -> QuadraticBatch:
        return QuadraticBatch([self.sample(generator) for _ in range(size)])

    def describe(self) -> str:
        return (
            f"quadratic: f(theta) = ||W theta - y||^2 with W ({self.dim}x{self.dim}) and y ({self.dim}) "
            "i.i.d. N(0, 1) per task, theta_0 ~ N(0, 1); deterministic loss (no minibatches)"
        )


# ----------------------------------------------------------------------------- MNIST MLP
#: How the 10,000 MNIST test images (``t10k``) are divided, and the seed of the division
#: (:func:`learnedopt.data.split_indices`). Meta-training reads only ``meta_train``; the end-of-run
#: evaluation reads ``meta_valid``; ``held_out`` is never read by meta-training.
MNIST_SPLIT: dict[str, float] = {"meta_train": 0.6, "meta_valid": 0.1, "held_out": 0.3}
MNIST_SPLIT_SEED = 0


def mlp_module(sizes: Sequence[int], activation: type[nn.Module] = nn.Sigmoid) -> nn.Sequential:
    """Linear layers of the given widths with ``activation`` between them, on the meta device
    (structure only: run it with ``functional_call``, or ``to_empty`` it and initialise).
    Parameter names ``"0.weight"``, ``"0.bias"``, ``"2.weight"``, ...; input ``(B, sizes[0])``."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        if i:
            layers.append(activation())
        layers.append(nn.Linear(fan_in, fan_out, device="meta"))
    return nn.Sequential(*layers)


class MLPTask(Task):
    """Classification by an MLP on a fixed pool of examples, cross-entropy on random minibatches.

    Args:
        module: the architecture (``functional_call`` runs it with the given parameters).
        inputs: ``(N, features)`` float examples; ``labels``: ``(N,)`` int64 classes.
        pool: int64 indices into ``inputs`` this task may draw from.
        batch_size: examples per minibatch (drawn uniformly with replacement).
        seed: the task's seed; step ``t``'s minibatch is drawn from ``generator_for(seed, t)``.
    """

    def __init__(
        self,
        module: nn.Module,
        inputs: Tensor,
        labels: Tensor,
        pool: Tensor,
        batch_size: int,
        seed: int,
    ) -> None:
        self.module, self.inputs, self.labels, self.pool = module, inputs, labels, pool
        self.batch_size, self.seed = batch_size, seed

    def init_params(self, generator: torch.Generator) -> Params:
        """PyTorch's default ``nn.Linear`` init: weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        params = {}
        for name, p in self.module.named_parameters():
            fan_in = self.module.get_submodule(name.rsplit(".", 1)[0]).in_features
            bound = 1.0 / math.sqrt(fan_in)
            params[name] = (
                torch.rand(p.shape, generator=generator, dtype=self.inputs.dtype) * 2 - 1
            ) * bound
        return params

    def minibatch(self, step_index: int) -> tuple[Tensor, Tensor]:
        """``(batch_size, features)`` inputs and ``(batch_size,)`` labels of step ``step_index``."""
        draw = torch.randint(
            len(self.pool), (self.batch_size,), generator=generator_for(self.seed, step_index)
        )
        idx = self.pool[draw]
        return self.inputs[idx], self.labels[idx]

    def loss(self, params: Mapping[str, Tensor], step_index: int) -> Tensor:
        x, y = self.minibatch(step_index)
        return F.cross_entropy(functional_call(self.module, dict(params), (x,)), y)


class MLPBatch(TaskBatch):
    """MLP tasks of one architecture, run as one ``vmap`` of ``functional_call`` over the tasks."""

    def loss(self, params: Mapping[str, Tensor], step_index: int) -> Tensor:
        batches = [task.minibatch(step_index) for task in self.tasks]
        x = torch.stack([b[0] for b in batches])  # (B, batch, features)
        y = torch.stack([b[1] for b in batches])  # (B, batch)
        module = self.tasks[0].module
        logits = vmap(lambda p, xb: functional_call(module, p, (xb,)))(dict(params), x)
        per_example = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
        return per_example.view(y.shape).mean(dim=1)


class MnistMLPFamily(TaskFamily):
    """Andrychowicz et al.'s MNIST task: an MLP 784-20-10 with sigmoid, minibatches of 128.

    Tasks differ in their initial parameters and minibatch sequence. Images are the 10,000 of
    ``t10k`` (pixel / 255), divided by :data:`MNIST_SPLIT` with seed :data:`MNIST_SPLIT_SEED`;
    a family reads one part only.

    Args:
        data: MNIST folder (default: :func:`learnedopt.data.resolve_data_dir`'s search).
        split: ``"meta_train"`` (meta-training) or ``"meta_valid"`` (evaluation).
        hidden: widths of the hidden layers.
        batch_size: examples per minibatch.

    Raises:
        FileNotFoundError: no MNIST folder / files (one-line message).
    """

    name = "mnist-mlp"

    def __init__(
        self,
        data: str | os.PathLike[str] | None = None,
        split: str = "meta_train",
        hidden: Sequence[int] = (20,),
        batch_size: int = 128,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        from ..data import load_mnist, split_indices

        if split not in MNIST_SPLIT:
            raise ValueError(f"unknown MNIST split {split!r}; parts: {sorted(MNIST_SPLIT)}")
        images, labels = load_mnist(data, "t10k")
        self.inputs = images.reshape(len(images), -1).to(dtype) / 255.0
        self.labels = labels
        self.split = split
        self.pool = split_indices(len(images), MNIST_SPLIT, seed=MNIST_SPLIT_SEED)[split]
        if len(self.pool) == 0:
            raise ValueError(f"the {split!r} part of {len(images)} MNIST images is empty")
        self.sizes = (self.inputs.shape[1], *hidden, 10)
        self.module = mlp_module(self.sizes)
        self.batch_size = batch_size

    def sample(self, generator: torch.Generator) -> MLPTask:
        seed = int(torch.randint(2**62, (), generator=generator))
        return MLPTask(self.module, self.inputs, self.labels, self.pool, self.batch_size, seed)

    def sample_batch(self, size: int, generator: torch.Generator) -> MLPBatch:
        return MLPBatch([self.sample(generator) for _ in range(size)])

    def describe(self) -> str:
        widths = "-".join(str(s) for s in self.sizes)
        return (
            f"mnist-mlp: MLP {widths} with sigmoid hidden units, cross-entropy, minibatches of "
            f"{self.batch_size} drawn with replacement; MNIST t10k ({len(self.inputs)} images, pixels/255) "
            f"split by learnedopt.data.split_indices({len(self.inputs)}, {MNIST_SPLIT}, seed={MNIST_SPLIT_SEED}); "
            f"this family reads only the {self.split!r} part ({len(self.pool)} images)"
        )


TASK_FAMILIES: tuple[str, ...] = ("quadratic", "mnist-mlp")


def make_family(
    name: str,
    *,
    data: str | os.PathLike[str] | None = None,
    split: str = "meta_train",
    dtype: torch.dtype = torch.float32,
) -> TaskFamily:
    """The task family called ``name`` (one of :data:`TASK_FAMILIES`).

    ``split`` chooses the data part of data-backed families (see :data:`MNIST_SPLIT`).
    """
    if name == "quadratic":
        return QuadraticFamily(dtype=dtype)
    if name == "mnist-mlp":
        return MnistMLPFamily(data, split=split, dtype=dtype)
    raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASK_FAMILIES)}")
