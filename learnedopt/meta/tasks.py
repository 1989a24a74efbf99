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

import inspect
import itertools
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from ..values import check_positive_integer, is_integer, is_number
from ..plugins import (
    call_entry_point,
    entry_point_path,
    family_arguments,
    load_entry_point,
)

Params = dict[str, Tensor]


def derive_seed(*keys: int) -> int:
    """A 63-bit seed mixed from non-negative integer keys (e.g. ``(seed, step)``) by numpy's SeedSequence.

    Key tuples that differ other than by trailing zeros give unrelated seeds, so generators seeded
    this way are independent. Trailing zeros do not count (SeedSequence pads its entropy with
    zeros): ``(5, 1)`` and ``(5, 1, 0)`` give one seed. The library's streams are laid out so that
    no two of its uses meet this way (e.g. a stream keyed ``(seed, 1, step)`` beside no
    ``(seed, 1)``); changing the mixing would change every seeded result on record.
    """
    words = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def generator_for(*keys: int) -> torch.Generator:
    """A fresh CPU generator seeded with :func:`derive_seed` of ``keys``."""
    return torch.Generator().manual_seed(derive_seed(*keys))


def check_generator(owner: str, generator: object) -> None:
    """Raise unless ``generator`` is a ``torch.Generator`` on the CPU, the one the built-in families
    and their tasks draw from (``owner``, e.g. ``"QuadraticFamily.sample"``, names the caller).

    Raises:
        TypeError: it is not a generator: ``None`` would draw from the global RNG, so the tasks
            would be those of no seed.
        ValueError: it is on another device: the draws are made on the CPU whatever the family's
            device, so that every device draws the same tasks.
    """
    if not isinstance(generator, torch.Generator):
        got = "None (the global RNG, which no seed given here fixes)" if generator is None else f"a {type(generator).__name__}"
        raise TypeError(
            f"{owner}: generator must be a torch.Generator on the CPU, e.g. learnedopt.meta.generator_for(seed), got {got}"
        )
    if generator.device.type != "cpu":
        raise ValueError(
            f"{owner}: generator must be on the CPU, got one on {generator.device}: tasks and initial parameters are "
            "drawn on the CPU whatever the family's device (its .to(device) moves them), so every device draws the same"
        )


def _check_float_dtype(owner: str, dtype: torch.dtype) -> None:
    """Raise ValueError unless ``dtype``, that of a family's data and parameters, is a floating-point
    dtype (an integer one has no random normal draws, and MNIST's pixels / 255 come out float32)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{owner}: dtype must be a floating-point dtype, got {dtype!r}")


class Task(ABC):
    """One optimizee: initial parameters and a minibatch loss."""

    @abstractmethod
    def init_params(self, generator: torch.Generator) -> Params:
        """Fresh initial parameters, drawn from ``generator``, on the device and in the dtype of
        the task's data (those :meth:`loss` computes with). The built-in tasks draw them from a
        CPU generator whatever the device, so every device starts from the same values."""

    @abstractmethod
    def loss(self, params: Mapping[str, Tensor], step_index: int) -> Tensor:
        """Scalar loss of ``params`` on the minibatch of step ``step_index``; differentiable."""


class TaskBatch:
    """``B`` tasks of one family, parameters stacked over a leading meta-batch dimension."""

    #: whether :func:`~learnedopt.meta.unroll` gives a parameter that the loss does not use a zero
    #: gradient (as ``MAML`` does, and the meta-lstm few-shot learner's batches) rather than
    #: refusing it with a ValueError naming it (every parameter ``init_params`` returns is meant
    #: to take part in the loss)
    unused_params_get_zero_grad: bool = False

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
        """``(B, *shape)`` per name: each task's :meth:`Task.init_params`, in task order, stacked
        (so copied, and detached: the initial parameters are a starting point, not meta-parameters).

        Raises:
            ValueError: a task's parameters are not a non-empty dict of floating-point tensors, or
                differ from the first task's in names, shapes, dtype or device (a batch is one stack).
        """
        per_task = [_checked_params(task.init_params(generator), b) for b, task in enumerate(self.tasks)]
        first = per_task[0]
        for b, params in enumerate(per_task[1:], 1):
            if set(params) != set(first):
                raise ValueError(
                    f"task {b}'s init_params has parameters {sorted(params)}, task 0's {sorted(first)}: the tasks of a "
                    "batch are unrolled as one stack, so they need the same names, shapes and dtype"
                )
            for k, v in params.items():
                ref = first[k]
                if (v.shape, v.dtype, v.device) != (ref.shape, ref.dtype, ref.device):
                    raise ValueError(
                        f"task {b}'s init_params gives {k!r} {_describe_tensor(v)}, task 0's {_describe_tensor(ref)}: the "
                        "tasks of a batch are unrolled as one stack, so they need the same names, shapes and dtype "
                        "(draw differently shaped tasks in different batches, in TaskFamily.sample_batch)"
                    )
        return {k: torch.stack([p[k] for p in per_task]).detach() for k in first}

    def loss(self, params: Mapping[str, Tensor], step_index: int) -> Tensor:
        """``(B,)`` losses; ``params`` is ``(B, *shape)`` per name.

        Raises:
            ValueError: a task's :meth:`Task.loss` is not a 0-dim floating-point tensor.
        """
        losses = []
        for b, task in enumerate(self.tasks):
            loss = task.loss({k: v[b] for k, v in params.items()}, step_index)
            if not isinstance(loss, Tensor) or loss.dim() != 0 or not loss.is_floating_point():
                raise ValueError(
                    f"task {b}'s loss at step {step_index} is {describe_value(loss)}: Task.loss must return a scalar floating-point "
                    "tensor computed from params (reduce per-example losses, e.g. with .mean())"
                )
            losses.append(loss)
        return torch.stack(losses)


def describe_value(value: object) -> str:
    """``"a tensor of shape (8,) and dtype torch.float32"``, or ``"a list"`` for a value that is not
    a tensor: what a user's function returned, for error messages."""
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"a {type(value).__name__}"


def _describe_tensor(t: Tensor) -> str:
    """``"of shape (3, 4), float32 on cpu"``, for error messages."""
    return f"of shape {tuple(t.shape)}, {str(t.dtype).removeprefix('torch.')} on {t.device}"


def _checked_params(params: object, index: int) -> Params:
    """Task ``index``'s :meth:`Task.init_params` result, once checked to be a non-empty dict of
    floating-point tensors by name; raises ValueError naming what is wrong."""
    if not isinstance(params, Mapping) or not params:
        got = "an empty dict" if isinstance(params, Mapping) else f"a {type(params).__name__}"
        raise ValueError(f"task {index}'s init_params gave {got}: it must return a dict of parameter name -> tensor")
    for k, v in params.items():
        if not isinstance(k, str) or not isinstance(v, Tensor):
            raise ValueError(
                f"task {index}'s init_params gave {k!r}: {type(v).__name__}: it must return a dict of parameter name (str) -> tensor"
            )
        if not v.is_floating_point():
            raise ValueError(
                f"task {index}'s init_params gives {k!r} as {v.dtype}: parameters must be floating-point (the rule's dtype)"
            )
    return dict(params)


class TaskFamily(ABC):
    """A distribution over tasks. Random draws use CPU generators whatever the device, so a
    family gives the same tasks on every device; :meth:`to` moves where their data lives. The
    built-in families and their tasks refuse any other generator, ``None`` included
    (:func:`check_generator`)."""

    #: the name ``--task`` accepts
    name: str
    #: where the tasks' data tensors and initial parameters live (both are drawn on the CPU)
    device: torch.device = torch.device("cpu")

    def to(self, device: torch.device | str) -> TaskFamily:
        """Keep the tasks' data, and the initial parameters their :meth:`Task.init_params` gives,
        on ``device`` from now on (as a module's ``.to`` moves all it owns); returns ``self``.

        Raises:
            TypeError: ``device`` is a dtype: a family's dtype is given when it is built (its data
                is made in it), e.g. ``QuadraticFamily(dtype=torch.float64)``.
        """
        if isinstance(device, torch.dtype):
            raise TypeError(
                f"{type(self).__name__}.to() takes a device, got the dtype {device}: a family's data is made in its "
                f"dtype, so give it when building the family (dtype={device}, as make_family and the built-in families take)"
            )
        self.device = torch.device(device)
        return self

    @abstractmethod
    def sample(self, generator: torch.Generator) -> Task:
        """Draw one task."""

    def sample_batch(self, size: int, generator: torch.Generator) -> TaskBatch:
        """Draw ``size`` tasks (in order, from ``generator``)."""
        check_positive_integer("size", size)
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
        check_generator(f"{type(self).__name__}.init_params", generator)
        d = self.target.shape[0]
        theta = torch.randn(d, generator=generator, dtype=self.target.dtype)
        return {"theta": theta.to(self.target.device)}

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
        check_positive_integer("QuadraticFamily: dim", dim)
        _check_float_dtype("QuadraticFamily", dtype)
        self.dim, self.dtype = dim, dtype

    def sample(self, generator: torch.Generator) -> QuadraticTask:
        check_generator(f"{type(self).__name__}.sample", generator)
        weight = torch.randn(self.dim, self.dim, generator=generator, dtype=self.dtype)
        target = torch.randn(self.dim, generator=generator, dtype=self.dtype)
        return QuadraticTask(weight.to(self.device), target.to(self.device))

    def sample_batch(self, size: int, generator: torch.Generator) -> QuadraticBatch:
        check_positive_integer("size", size)
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


def default_linear_init(module: nn.Module, generator: torch.Generator, dtype: torch.dtype) -> Params:
    """PyTorch's default ``nn.Linear`` init of ``module``'s parameters (an MLP of :func:`mlp_module`),
    drawn from ``generator``: weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    params = {}
    for name, p in module.named_parameters():
        fan_in = module.get_submodule(name.rsplit(".", 1)[0]).in_features
        bound = 1.0 / math.sqrt(fan_in)
        params[name] = (torch.rand(p.shape, generator=generator, dtype=dtype) * 2 - 1) * bound
    return params


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
        """PyTorch's default ``nn.Linear`` init (:func:`default_linear_init`), drawn on the CPU
        and moved to the inputs' device."""
        check_generator(f"{type(self).__name__}.init_params", generator)
        return {k: v.to(self.inputs.device) for k, v in self._cpu_init_params(generator).items()}

    def _cpu_init_params(self, generator: torch.Generator) -> Params:
        """:meth:`init_params`' values, on the CPU (where ``generator`` draws them)."""
        return default_linear_init(self.module, generator, self.inputs.dtype)

    def minibatch(self, step_index: int) -> tuple[Tensor, Tensor]:
        """``(batch_size, features)`` inputs and ``(batch_size,)`` labels of step ``step_index``."""
        draw = torch.randint(
            len(self.pool), (self.batch_size,), generator=generator_for(self.seed, step_index)
        )
        idx = self.pool[draw].to(self.inputs.device)
        # index_select, not inputs[idx]: the same rows, gathered 5x faster on CPU (a (128, 784)
        # MNIST batch, 13 us against 70 us in an unrecorded timing), a step of every unroll
        return self.inputs.index_select(0, idx), self.labels.index_select(0, idx)

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


class ExampleFamily(TaskFamily):
    """A family whose tasks draw minibatches from one pool of examples, ``inputs``
    ``(N, features)`` and ``labels`` ``(N,)``, kept on the family's device."""

    inputs: Tensor
    labels: Tensor

    def to(self, device: torch.device | str) -> ExampleFamily:
        super().to(device)
        self.inputs, self.labels = self.inputs.to(self.device), self.labels.to(self.device)
        return self


class MnistMLPFamily(ExampleFamily):
    """Andrychowicz et al.'s MNIST task: an MLP 784-20-10 with sigmoid, minibatches of 128.

    Tasks differ in their initial parameters and minibatch sequence. Images are the 10,000 of
    ``t10k`` (pixel / 255), divided by :data:`MNIST_SPLIT` with seed :data:`MNIST_SPLIT_SEED`;
    a family reads one part only.

    Args:
        data: MNIST folder (default: :func:`learnedopt.data.resolve_data_dir`'s search).
        split: a part of :data:`MNIST_SPLIT`: ``"meta_train"`` (meta-training), ``"meta_valid"``
            (evaluation) or ``"held_out"``.
        hidden: widths of the hidden layers.
        batch_size: examples per minibatch.
        dtype: float dtype of the inputs and parameters.

    Raises:
        ValueError: a bad argument (one-line message).
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

        if isinstance(hidden, str) or not isinstance(hidden, Sequence):
            raise ValueError(f"MnistMLPFamily: hidden must be a sequence of widths, got {hidden!r}")
        _check_float_dtype("MnistMLPFamily", dtype)
        for what, value in (("batch_size", batch_size), *(("hidden width", width) for width in hidden)):
            check_positive_integer(f"MnistMLPFamily: {what}", value)
        if split not in MNIST_SPLIT:
            raise ValueError(f"unknown MNIST split {split!r}; parts: {sorted(MNIST_SPLIT)}")
        images, labels = load_mnist(data, "t10k")
        self.inputs = images.reshape(len(images), -1).to(dtype) / 255.0
        self.labels = labels
        self.split = split
        # a few images leave meta_valid empty; the part read is checked here, naming its family
        self.pool = split_indices(len(images), MNIST_SPLIT, seed=MNIST_SPLIT_SEED, allow_empty=True)[split]
        if len(self.pool) == 0:
            raise ValueError(f"the {split!r} part of {len(images)} MNIST images is empty")
        self.sizes = (self.inputs.shape[1], *hidden, 10)
        self.module = mlp_module(self.sizes)
        self.batch_size = batch_size

    def sample(self, generator: torch.Generator) -> MLPTask:
        check_generator(f"{type(self).__name__}.sample", generator)
        seed = int(torch.randint(2**62, (), generator=generator))
        return MLPTask(self.module, self.inputs, self.labels, self.pool, self.batch_size, seed)

    def sample_batch(self, size: int, generator: torch.Generator) -> MLPBatch:
        check_positive_integer("size", size)
        return MLPBatch([self.sample(generator) for _ in range(size)])

    def describe(self) -> str:
        widths = "-".join(str(s) for s in self.sizes)
        return (
            f"mnist-mlp: MLP {widths} with sigmoid hidden units, cross-entropy, minibatches of "
            f"{self.batch_size} drawn with replacement; MNIST t10k ({len(self.inputs)} images, pixels/255) "
            f"split by learnedopt.data.split_indices({len(self.inputs)}, {MNIST_SPLIT}, seed={MNIST_SPLIT_SEED}); "
            f"this family reads only the {self.split!r} part ({len(self.pool)} images)"
        )


# ----------------------------------------------------------------------------- randomised MLPs
#: Activation names :class:`RandomMLPFamily` accepts, and their modules.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
    "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU,
}
#: The activations ``mlp-random`` meta-trains on; the other :data:`ACTIVATIONS` are left for
#: held-out evaluation (:mod:`learnedopt.evaluation`'s ``mlp-random-held-out`` uses ELU).
META_TRAIN_ACTIVATIONS: tuple[str, ...] = ("sigmoid", "tanh", "relu", "gelu")
#: The synthetic data set: as many examples as MNIST t10k (so the split's parts have the same
#: sizes), their input dimension, classes, and the hidden width of the random teacher.
SYNTHETIC_EXAMPLES = 10_000
SYNTHETIC_FEATURES = 64
SYNTHETIC_CLASSES = 10
SYNTHETIC_TEACHER_HIDDEN = 32


@dataclass(frozen=True)
class MLPArchitecture:
    """What every task of one ``mlp-random`` meta-batch shares (so their parameters stack).

    Attributes:
        hidden: widths of the hidden layers, input side first, integers >= 1 (any sequence of
            them is kept as a tuple; none: a linear classifier).
        activation: a key of :data:`ACTIVATIONS`, between every two linear layers.
        batch_size: examples per minibatch, an integer >= 1.

    Raises:
        ValueError: a width or batch size below 1 or not an integer (a zero-width layer has no
            init, an empty minibatch a NaN loss), or an unknown activation.
    """

    hidden: tuple[int, ...]
    activation: str
    batch_size: int

    def __post_init__(self) -> None:
        if isinstance(self.hidden, str) or not isinstance(self.hidden, Sequence):
            raise ValueError(f"MLPArchitecture: hidden must be a sequence of widths, got {self.hidden!r}")
        hidden = tuple(self.hidden)
        if not all(is_integer(w) and w >= 1 for w in hidden):
            raise ValueError(f"MLPArchitecture: hidden widths must be integers >= 1, got {hidden!r}")
        object.__setattr__(self, "hidden", hidden)  # hashable, so a batch can compare architectures
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"MLPArchitecture: unknown activation {self.activation!r}; choose from {', '.join(ACTIVATIONS)}")
        check_positive_integer("MLPArchitecture: batch_size", self.batch_size)

    def module(self, features: int, classes: int) -> nn.Sequential:
        """The MLP ``features-hidden...-classes`` on the meta device (see :func:`mlp_module`)."""
        return mlp_module((features, *self.hidden, classes), ACTIVATIONS[self.activation])

    def __str__(self) -> str:
        widths = "-".join(str(w) for w in self.hidden)
        return f"hidden {widths} {self.activation}, batch {self.batch_size}"


class RandomMLPTask(MLPTask):
    """An :class:`MLPTask` with its inputs multiplied by ``input_scale`` and its default init by
    ``init_scale`` (weights and biases).

    Args:
        architecture: the architecture ``module`` was built from.
        input_scale: factor on every minibatch's inputs (dimensionless).
        init_scale: factor on :meth:`MLPTask.init_params`' draw.
        Others: as :class:`MLPTask`.
    """

    def __init__(
        self,
        module: nn.Module,
        inputs: Tensor,
        labels: Tensor,
        pool: Tensor,
        seed: int,
        *,
        architecture: MLPArchitecture,
        input_scale: float,
        init_scale: float,
    ) -> None:
        super().__init__(module, inputs, labels, pool, architecture.batch_size, seed)
        self.architecture, self.input_scale, self.init_scale = architecture, input_scale, init_scale

    def _cpu_init_params(self, generator: torch.Generator) -> Params:
        return {k: v * self.init_scale for k, v in super()._cpu_init_params(generator).items()}

    def minibatch(self, step_index: int) -> tuple[Tensor, Tensor]:
        x, y = super().minibatch(step_index)
        return x * self.input_scale, y


class RandomMLPBatch(MLPBatch):
    """``mlp-random`` tasks of one architecture and input size, batched as :class:`MLPBatch`.

    Raises:
        ValueError: tasks that are not :class:`RandomMLPTask` or do not share one architecture.
    """

    def __init__(self, tasks: Sequence[RandomMLPTask]) -> None:
        super().__init__(tasks)
        if not all(isinstance(t, RandomMLPTask) for t in self.tasks):
            raise ValueError("a RandomMLPBatch holds RandomMLPTask tasks only")
        kinds = {(t.architecture, t.inputs.shape[1:]) for t in self.tasks}
        if len(kinds) != 1:
            raise ValueError(
                "the tasks of a RandomMLPBatch must share one architecture and input size, got "
                + "; ".join(sorted(f"{a} on inputs {tuple(s)}" for a, s in kinds))
            )
        self.architecture: MLPArchitecture = self.tasks[0].architecture


def synthetic_classification_data(
    seed: int = 0,
    *,
    examples: int = SYNTHETIC_EXAMPLES,
    features: int = SYNTHETIC_FEATURES,
    classes: int = SYNTHETIC_CLASSES,
    teacher_hidden: int = SYNTHETIC_TEACHER_HIDDEN,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """A fixed classification data set: inputs N(0, I), labelled by a random teacher network.

    The teacher is ``argmax(tanh(x W1) W2)`` with ``W1`` ``(features, teacher_hidden)``
    N(0, 1/features) and ``W2`` ``(teacher_hidden, classes)`` N(0, 1), so the classes are not
    linearly separable.

    Returns:
        ``(inputs (examples, features), labels (examples,) int64)``, a function of the arguments.
    """
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(examples, features, generator=g, dtype=torch.float64)
    w1 = torch.randn(features, teacher_hidden, generator=g, dtype=torch.float64)
    w1 = w1 / math.sqrt(features)
    w2 = torch.randn(teacher_hidden, classes, generator=g, dtype=torch.float64)
    labels = (torch.tanh(inputs @ w1) @ w2).argmax(dim=1)
    return inputs.to(dtype), labels


def _is_sequence(value: object) -> bool:
    """Whether ``value`` is a sequence other than a string (whose characters would be its items)."""
    return isinstance(value, Sequence) and not isinstance(value, str)


def _range(
    name: str, bounds: Sequence[float], *, integer: bool, positive: bool
) -> tuple[float, float]:
    """``bounds`` as a checked ``(low, high)`` pair (integers >= 1, or positive finite floats)."""
    if not (_is_sequence(bounds) or isinstance(bounds, np.ndarray)) or len(bounds) != 2:
        raise ValueError(f"{name} must be a (low, high) pair, got {bounds!r}")
    if not all(is_number(b) for b in bounds):
        raise ValueError(f"{name} must be a (low, high) pair of numbers, got {bounds!r}")
    low, high = bounds
    if integer and not all(isinstance(b, int) and not isinstance(b, bool) for b in (low, high)):
        raise ValueError(f"{name} must be integers, got {bounds!r}")
    if not all(math.isfinite(b) for b in (low, high)) or low > high:
        raise ValueError(f"{name} must be finite with low <= high, got {bounds!r}")
    if (positive and low <= 0) or (integer and low < 1):
        raise ValueError(f"{name} must be {'>= 1' if integer else '> 0'}, got {bounds!r}")
    return low, high


def _log_uniform(low: float, high: float, generator: torch.Generator) -> float:
    """``exp(U(log low, log high))``, kept in ``[low, high]`` (``exp(log(8))`` rounds below 8)."""
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    return min(high, max(low, math.exp(math.log(low) + u * (math.log(high) - math.log(low)))))


def _log_uniform_int(low: int, high: int, generator: torch.Generator) -> int:
    """An integer in ``[low, high]`` with ``P(k)`` proportional to ``log((k + 1) / k)``
    (the floor of a log-uniform draw on ``[low, high + 1)``, so both ends are as likely as
    their neighbours)."""
    return min(high, int(_log_uniform(low, high + 1, generator)))  # >= low: _log_uniform keeps to its range


class RandomMLPFamily(ExampleFamily):
    """Randomised MLP classification tasks, for optimizers that generalise (``--task mlp-random``).

    Each meta-batch draws one :class:`MLPArchitecture`: the number of hidden layers uniform in
    ``depth``, each width log-uniform in ``width``, the activation uniform over ``activations``
    and the minibatch size log-uniform in ``batch_size``. Each task of the batch then draws its
    own input scale and init scale (log-uniform in ``input_scale`` and ``init_scale``) and its
    minibatch seed. All draws come from the generator passed to :meth:`sample_batch`, in that order.

    Data: MNIST t10k (pixels / 255, the part ``split`` of :data:`MNIST_SPLIT`, as
    :class:`MnistMLPFamily`) with ``source="mnist"``; with ``source="synthetic"``,
    :func:`synthetic_classification_data` (``synthetic_seed``), divided by the same fractions.
    There is no silent fallback from MNIST to synthetic data: a run's model card must name the
    data it trained on.

    Args:
        data: MNIST folder, ``source="mnist"`` only (default:
            :func:`learnedopt.data.resolve_data_dir`'s search).
        split: a part of :data:`MNIST_SPLIT`; meta-training reads ``"meta_train"``.
        source: ``"mnist"`` or ``"synthetic"``.
        depth: ``(low, high)`` hidden layers, integers >= 1.
        width: ``(low, high)`` hidden widths, integers >= 1.
        activations: non-empty sequence of :data:`ACTIVATIONS` keys.
        batch_size: ``(low, high)`` examples per minibatch, integers >= 1.
        input_scale: ``(low, high)`` factor on the inputs, > 0.
        init_scale: ``(low, high)`` factor on PyTorch's default init, > 0.
        synthetic_seed: seed of the synthetic data set, ``source="synthetic"`` only (default 0).
        dtype: float dtype of the inputs and parameters.

    Raises:
        ValueError: a bad argument (one-line message).
        FileNotFoundError: ``source="mnist"`` without MNIST files.
    """

    name = "mlp-random"

    def __init__(
        self,
        data: str | os.PathLike[str] | None = None,
        split: str = "meta_train",
        *,
        source: str = "mnist",
        depth: tuple[int, int] = (1, 3),
        width: tuple[int, int] = (8, 64),
        activations: Sequence[str] = META_TRAIN_ACTIVATIONS,
        batch_size: tuple[int, int] = (32, 256),
        input_scale: tuple[float, float] = (0.1, 10.0),
        init_scale: tuple[float, float] = (0.5, 2.0),
        synthetic_seed: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        from ..data import split_indices

        if split not in MNIST_SPLIT:
            raise ValueError(f"unknown split {split!r}; parts: {sorted(MNIST_SPLIT)}")
        if source not in ("mnist", "synthetic"):
            raise ValueError(f"unknown source {source!r}; choose 'mnist' or 'synthetic'")
        if source == "synthetic" and data is not None:
            raise ValueError("data is the MNIST folder; it cannot be given with source='synthetic'")
        if source == "mnist" and synthetic_seed is not None:
            raise ValueError("synthetic_seed seeds the synthetic data; it cannot be given with source='mnist'")
        _check_float_dtype("RandomMLPFamily", dtype)
        self.depth = _range("depth", depth, integer=True, positive=True)
        self.width = _range("width", width, integer=True, positive=True)
        self.batch_size = _range("batch_size", batch_size, integer=True, positive=True)
        self.input_scale = _range("input_scale", input_scale, integer=False, positive=True)
        self.init_scale = _range("init_scale", init_scale, integer=False, positive=True)
        if not _is_sequence(activations) or not activations:
            raise ValueError(
                f"activations must be a non-empty sequence of names, got {activations!r}"
            )
        unknown = [a for a in activations if a not in ACTIVATIONS]
        if unknown:
            raise ValueError(
                f"unknown activation(s) {unknown}; choose from {', '.join(ACTIVATIONS)}"
            )
        self.activations = tuple(activations)
        self.split, self.source = split, source
        self.synthetic_seed = 0 if synthetic_seed is None else synthetic_seed

        if source == "mnist":
            from ..data import load_mnist

            images, labels = load_mnist(data, "t10k")
            self.inputs = images.reshape(len(images), -1).to(dtype) / 255.0
            self.labels = labels
        else:
            self.inputs, self.labels = synthetic_classification_data(self.synthetic_seed, dtype=dtype)
        self.pool = split_indices(len(self.inputs), MNIST_SPLIT, seed=MNIST_SPLIT_SEED, allow_empty=True)[split]
        if len(self.pool) == 0:
            raise ValueError(f"the {split!r} part of {len(self.inputs)} {source} examples is empty")
        self.classes = SYNTHETIC_CLASSES if source == "synthetic" else 10

    def sample_architecture(self, generator: torch.Generator) -> MLPArchitecture:
        """Draw depth, then each width, then the activation, then the minibatch size."""
        check_generator(f"{type(self).__name__}.sample_architecture", generator)
        depth = int(torch.randint(self.depth[0], self.depth[1] + 1, (), generator=generator))
        hidden = tuple(_log_uniform_int(*self.width, generator) for _ in range(depth))
        activation = self.activations[
            int(torch.randint(len(self.activations), (), generator=generator))
        ]
        return MLPArchitecture(hidden, activation, _log_uniform_int(*self.batch_size, generator))

    def sample_tasks(
        self, architecture: MLPArchitecture, size: int, generator: torch.Generator
    ) -> RandomMLPBatch:
        """``size`` tasks of ``architecture``: per task, input scale, init scale, then seed."""
        check_positive_integer("size", size)
        check_generator(f"{type(self).__name__}.sample_tasks", generator)
        module = architecture.module(self.inputs.shape[1], self.classes)
        tasks = []
        for _ in range(size):
            input_scale = _log_uniform(*self.input_scale, generator)
            init_scale = _log_uniform(*self.init_scale, generator)
            seed = int(torch.randint(2**62, (), generator=generator))
            tasks.append(
                RandomMLPTask(
                    module,
                    self.inputs,
                    self.labels,
                    self.pool,
                    seed,
                    architecture=architecture,
                    input_scale=input_scale,
                    init_scale=init_scale,
                )
            )
        return RandomMLPBatch(tasks)

    def sample(self, generator: torch.Generator) -> RandomMLPTask:
        """One task with its own architecture (a batch of one)."""
        return self.sample_batch(1, generator).tasks[0]

    def sample_batch(self, size: int, generator: torch.Generator) -> RandomMLPBatch:
        """One architecture, then ``size`` tasks of it (:meth:`sample_tasks`)."""
        check_positive_integer("size", size)
        return self.sample_tasks(self.sample_architecture(generator), size, generator)

    def describe(self) -> str:
        n = len(self.inputs)
        split = f"split_indices({n}, {MNIST_SPLIT}, seed={MNIST_SPLIT_SEED})"
        if self.source == "mnist":
            data = f"MNIST t10k ({n} images, pixels/255) split by learnedopt.data.{split}"
        else:
            data = (
                "synthetic data (learnedopt.meta.tasks.synthetic_classification_data("
                f"seed={self.synthetic_seed}): {n} N(0, I) inputs of dimension "
                f"{self.inputs.shape[1]} labelled into {self.classes} classes by a random "
                f"{SYNTHETIC_TEACHER_HIDDEN}-unit tanh teacher), split by {split}"
            )
        return (
            f"mlp-random: MLP classifiers, cross-entropy, minibatches drawn with replacement. Each "
            f"meta-batch shares one architecture: {self.depth[0]}-{self.depth[1]} hidden layers "
            f"(uniform), each width log-uniform in [{self.width[0]}, {self.width[1]}], activation "
            f"uniform over {', '.join(self.activations)}, minibatch size log-uniform in "
            f"[{self.batch_size[0]}, {self.batch_size[1]}]; each task draws its own input scale "
            f"log-uniform in [{self.input_scale[0]:g}, {self.input_scale[1]:g}] (multiplying the "
            f"inputs), init scale log-uniform in [{self.init_scale[0]:g}, {self.init_scale[1]:g}] "
            f"(multiplying PyTorch's default U(+-1/sqrt(fan_in)) init) and minibatch seed. Data: "
            f"{data}; this family reads only the {self.split!r} part ({len(self.pool)} examples)"
        )


# ----------------------------------------------------------------------------- regression
def regression_draw(
    generator: torch.Generator, points: int, features: int, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """Inputs ``x`` ``(points, features)`` i.i.d. N(0, 1), then a direction ``w`` ``(features, 1)``
    i.i.d. N(0, 1/features), drawn from ``generator`` in that order; a regression's targets are
    ``sin(frequency * x w)``."""
    x = torch.randn(points, features, generator=generator, dtype=dtype)
    w = torch.randn(features, 1, generator=generator, dtype=dtype) / math.sqrt(features)
    return x, w


class RegressionTask(Task):
    """Full-batch regression by an MLP: mean squared error over all ``n`` points at every step
    (no minibatches, a deterministic loss, like the quadratic).

    Args:
        module: the MLP, ``features`` inputs to 1 output (see :func:`mlp_module`).
        inputs: ``(n, features)``; ``targets``: ``(n, 1)``.
        init_scale: factor on the default init (weights and biases).
    """

    def __init__(self, module: nn.Module, inputs: Tensor, targets: Tensor, init_scale: float) -> None:
        self.module, self.inputs, self.targets, self.init_scale = module, inputs, targets, init_scale

    def init_params(self, generator: torch.Generator) -> Params:
        """The default init (:func:`default_linear_init`) times ``init_scale``, drawn on the CPU
        and moved to the inputs' device."""
        check_generator(f"{type(self).__name__}.init_params", generator)
        init = default_linear_init(self.module, generator, self.inputs.dtype)
        return {k: (v * self.init_scale).to(self.inputs.device) for k, v in init.items()}

    def loss(self, params: Mapping[str, Tensor], step_index: int) -> Tensor:
        return F.mse_loss(functional_call(self.module, dict(params), (self.inputs,)), self.targets)


class RegressionBatch(TaskBatch):
    """Regression tasks of one architecture and size, run as one ``vmap`` over the tasks."""

    def __init__(self, tasks: Sequence[RegressionTask]) -> None:
        super().__init__(tasks)
        self.inputs = torch.stack([t.inputs for t in tasks])  # (B, n, features)
        self.targets = torch.stack([t.targets for t in tasks])  # (B, n, 1)

    def loss(self, params: Mapping[str, Tensor], step_index: int) -> Tensor:
        module = self.tasks[0].module
        predictions = vmap(lambda p, x: functional_call(module, p, (x,)))(dict(params), self.inputs)
        return (predictions - self.targets).square().mean(dim=(1, 2))


class RegressionFamily(TaskFamily):
    """Random full-batch regressions, for rules that must also converge where no minibatch noise
    sets a floor (``--task regression``).

    Each meta-batch draws its input dimension log-uniform in ``features``, then, as ``mlp-random``
    does, its hidden layers (number uniform in ``depth``, widths log-uniform in ``width``, the
    activation uniform over ``activations``). Each task then draws ``points`` inputs ``x`` i.i.d.
    N(0, 1), a direction ``w`` i.i.d. N(0, 1/features), a frequency log-uniform in ``frequency``
    (targets ``y = sin(frequency * x w)``) and an init scale log-uniform in ``init_scale``, from
    the generator passed to :meth:`sample_batch`, in that order. The data is generated, so the
    family has no split: meta-training and its evaluation episode differ by their generators.
    ``regression-1000`` of ``learnedopt evaluate optimizers`` (16 inputs, one hidden layer of 64
    tanh units, frequency 3, 512 points) is a member.
    """

    name = "regression"

    def __init__(
        self,
        *,
        points: int = 512,
        features: tuple[int, int] = (4, 32),
        depth: tuple[int, int] = (1, 2),
        width: tuple[int, int] = (16, 128),
        activations: Sequence[str] = META_TRAIN_ACTIVATIONS,
        frequency: tuple[float, float] = (1.0, 4.0),
        init_scale: tuple[float, float] = (0.5, 2.0),
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if isinstance(points, bool) or not isinstance(points, int) or points < 1:
            raise ValueError(f"points must be an integer >= 1, got {points!r}")
        _check_float_dtype("RegressionFamily", dtype)
        self.points, self.dtype = points, dtype
        self.features = _range("features", features, integer=True, positive=True)
        self.depth = _range("depth", depth, integer=True, positive=True)
        self.width = _range("width", width, integer=True, positive=True)
        self.frequency = _range("frequency", frequency, integer=False, positive=True)
        self.init_scale = _range("init_scale", init_scale, integer=False, positive=True)
        unknown = [a for a in activations if a not in ACTIVATIONS] if _is_sequence(activations) else None
        if not _is_sequence(activations) or not activations or unknown:
            raise ValueError(f"activations must be a non-empty sequence of {', '.join(ACTIVATIONS)}, got {activations!r}")
        self.activations = tuple(activations)

    def sample(self, generator: torch.Generator) -> RegressionTask:
        """One task with its own architecture (a batch of one)."""
        return self.sample_batch(1, generator).tasks[0]

    def sample_batch(self, size: int, generator: torch.Generator) -> RegressionBatch:
        check_positive_integer("size", size)
        check_generator(f"{type(self).__name__}.sample_batch", generator)
        features = _log_uniform_int(*self.features, generator)
        depth = int(torch.randint(self.depth[0], self.depth[1] + 1, (), generator=generator))
        hidden = tuple(_log_uniform_int(*self.width, generator) for _ in range(depth))
        activation = self.activations[int(torch.randint(len(self.activations), (), generator=generator))]
        module = mlp_module((features, *hidden, 1), ACTIVATIONS[activation])
        tasks = []
        for _ in range(size):
            x, w = regression_draw(generator, self.points, features, self.dtype)
            frequency = _log_uniform(*self.frequency, generator)
            init_scale = _log_uniform(*self.init_scale, generator)
            y = torch.sin(frequency * (x @ w))
            tasks.append(RegressionTask(module, x.to(self.device), y.to(self.device), init_scale))
        return RegressionBatch(tasks)

    def describe(self) -> str:
        return (
            f"regression: full-batch regression of y = sin(frequency * x w) by an MLP, mean squared error "
            f"over all {self.points} points (no minibatches). Each meta-batch shares its input dimension "
            f"(log-uniform in [{self.features[0]}, {self.features[1]}]) and architecture: "
            f"{self.depth[0]}-{self.depth[1]} hidden layers (uniform), each width log-uniform in "
            f"[{self.width[0]}, {self.width[1]}], activation uniform over {', '.join(self.activations)}; each "
            f"task draws x i.i.d. N(0, 1), w i.i.d. N(0, 1/dim), frequency log-uniform in "
            f"[{self.frequency[0]:g}, {self.frequency[1]:g}] and an init scale log-uniform in "
            f"[{self.init_scale[0]:g}, {self.init_scale[1]:g}] (multiplying PyTorch's default init); generated data"
        )


# ----------------------------------------------------------------------------- mixtures
class MixtureFamily(TaskFamily):
    """Several families, one per meta-batch: each :meth:`sample_batch` first draws a member from
    ``generator``, with probability proportional to its weight, and then the whole batch from that
    member (a batch is unrolled as one stack of parameters, so its tasks must share their shapes).
    ``--task a+b`` names an equal mixture, ``--task a:3+b`` one that draws ``a`` three times as
    often as ``b``.

    Loss scales differ across members (a 10-dim quadratic's loss starts near 100, a 10-class
    classifier's near 2.3); meta-gradient clipping bounds each meta-step whatever the member.

    Args:
        members: two or more families.
        weights: a positive integer per member (default 1 each).
    """

    def __init__(self, members: Sequence[TaskFamily], weights: Sequence[int] | None = None) -> None:
        if len(members) < 2:
            raise ValueError(f"a mixture needs at least two families, got {len(members)}")
        weights = [1] * len(members) if weights is None else list(weights)
        if len(weights) != len(members):
            raise ValueError(f"a mixture needs a weight per member, got {len(weights)} for {len(members)}")
        check_mixture_weights(weights)
        for i, member in enumerate(members):
            if not isinstance(member, TaskFamily):
                what = f"the class {member.__name__}, not one built" if inspect.isclass(member) else f"a {type(member).__name__}"
                raise ValueError(f"a mixture's members must be TaskFamily instances, got member {i}: {what}")
        self.members, self.weights = list(members), weights
        self.name = MIXTURE_SEPARATOR.join(
            m.name if w == 1 else f"{m.name}{WEIGHT_SEPARATOR}{w}" for m, w in zip(self.members, weights)
        )

    def to(self, device: torch.device | str) -> MixtureFamily:
        super().to(device)  # first: it refuses a dtype in the mixture's name
        for member in self.members:
            member.to(device)
        return self

    def sample(self, generator: torch.Generator) -> Task:
        return self._draw(generator).sample(generator)

    def sample_batch(self, size: int, generator: torch.Generator) -> TaskBatch:
        return self._draw(generator).sample_batch(size, generator)

    def _draw(self, generator: torch.Generator) -> TaskFamily:
        check_generator(f"{type(self).__name__}.sample", generator)
        ticket = int(torch.randint(sum(self.weights), (), generator=generator))
        for member, weight in zip(self.members, self.weights):
            if ticket < weight:
                return member
            ticket -= weight
        raise AssertionError("unreachable: the ticket is below the total weight")

    def describe(self) -> str:
        total = sum(self.weights)
        parts = "; ".join(
            f"({i + 1}, drawn with probability {w}/{total}) {m.describe()}"
            for i, (m, w) in enumerate(zip(self.members, self.weights))
        )
        return f"mixture {self.name}: each meta-batch is drawn whole from one member: {parts}"


TASK_FAMILIES: tuple[str, ...] = ("quadratic", "mnist-mlp", "mlp-random", "regression")
#: the families that read the MNIST folder (``data=``, ``--data``); the others generate their tasks
DATA_FAMILIES: tuple[str, ...] = ("mnist-mlp", "mlp-random")
#: joins family names into a mixture's name, e.g. ``mlp-random+quadratic``
MIXTURE_SEPARATOR = "+"
#: gives a mixture member a weight, e.g. ``mlp-random:3+quadratic``
WEIGHT_SEPARATOR = ":"
#: the largest total weight of a mixture (its member is drawn by one ``torch.randint`` below it)
MAX_MIXTURE_WEIGHT = 10**6
#: the task names a family can have, for error messages
TASK_NAME_SYNTAX = (
    f"{', '.join(TASK_FAMILIES)} or a mixture of them joined by {MIXTURE_SEPARATOR!r} (distinct families, "
    f"each optionally weighted by a positive integer after {WEIGHT_SEPARATOR!r}: mlp-random+quadratic, or "
    "mlp-random:3+quadratic to draw mlp-random three times as often), or your own TaskFamily class "
    "as module:Class (e.g. mytasks:LogisticFamily)"
)


#: why a mixture refuses an imported member (``{member}``: its name)
IMPORTED_NOT_MIXED = (
    "your own family {member} cannot be a mixture member (mixtures are of the built-in families); "
    "to mix, have your family draw from several"
)


def import_family(name: str, *, data: str | os.PathLike[str] | None = None, split: str = "meta_train") -> TaskFamily:
    """The family of an imported task name (``module:Class``, :func:`learnedopt.plugins.entry_point_path`): its class (or factory)
    called with ``split=`` if it takes that parameter (``"meta_train"`` for meta-training,
    ``"meta_valid"`` for the run's validation and selection; a family without it draws both from
    one distribution, with different seeds) and ``data=`` if given.

    Raises:
        ValueError: the module does not import (whatever it raises: ImportError, SyntaxError, ...),
            lacks the name, names a :class:`Task` or an abstract class, the callable refuses
            ``data``, needs arguments it is not given, raises, or what it returns is not a
            :class:`TaskFamily`.
    """
    factory = load_entry_point(name)
    if inspect.isclass(factory) and issubclass(factory, Task):
        raise ValueError(f"{name} is a Task (one optimizee); --task takes the TaskFamily that samples it")
    if inspect.isabstract(factory):
        missing = ", ".join(sorted(getattr(factory, "__abstractmethods__", ())))
        raise ValueError(f"{name} does not define {missing}, which every TaskFamily must")
    kwargs = family_arguments(name, factory, split, {"data": (data, "--data")})
    family = call_entry_point(name, factory, kwargs, "it is called with split= if it takes it and data= with --data")
    if not isinstance(family, TaskFamily):
        fewshot = all(hasattr(family, member) for member in ("sample", "model", "loss", "describe"))
        hint = " (a few-shot family, with sample, model and loss, is for --algo maml, fomaml, reptile, meta-lstm)"
        raise ValueError(f"{name}() gave a {type(family).__name__}, not a learnedopt.meta.TaskFamily{hint if fewshot else ''}")
    return family


def parse_mixture(name: str) -> list[tuple[str, int]] | None:
    """``(family, weight)`` per member of a mixture name such as ``mlp-random:3+quadratic``; None
    when ``name`` is not a valid mixture (a single family is not one)."""
    members = []
    for part in name.split(MIXTURE_SEPARATOR):
        family, separator, weight = part.partition(WEIGHT_SEPARATOR)
        # ASCII digits only: str.isdigit() also holds for "³", which int() refuses
        if family not in TASK_FAMILIES or (separator and not (weight.isascii() and weight.isdigit() and int(weight) >= 1)):
            return None
        members.append((family, int(weight) if weight else 1))
    if len(members) < 2 or len({f for f, _ in members}) != len(members):
        return None
    return members


def canonical_task_name(name: str) -> str:
    """``name`` as :class:`MixtureFamily` names the family it builds, where it is a mixture (no
    weight of 1, no leading zeros: ``mlp-random:1+quadratic:02`` is ``mlp-random+quadratic:2``,
    the same draws); any other name as it is."""
    members = parse_mixture(name)
    if members is None:
        return name
    return MIXTURE_SEPARATOR.join(f if w == 1 else f"{f}{WEIGHT_SEPARATOR}{w}" for f, w in members)


def check_mixture_weights(weights: Sequence[int]) -> None:
    """Raise ValueError unless ``weights`` are positive integers summing to at most
    :data:`MAX_MIXTURE_WEIGHT`."""
    if any(not is_integer(w) or w < 1 for w in weights):
        raise ValueError(f"a mixture needs a positive integer weight per member, got {list(weights)}")
    if sum(weights) > MAX_MIXTURE_WEIGHT:
        raise ValueError(f"a mixture's weights must sum to at most {MAX_MIXTURE_WEIGHT:,}, got {list(weights)}")


def imported_mixture_member(name: str) -> str | None:
    """The first member of the mixture-like ``name`` (``a+b``) that is an imported family
    (``module:Class``, possibly weighted: ``module:Class:2``), which a mixture cannot hold; None
    when there is none."""
    if MIXTURE_SEPARATOR not in name:
        return None
    for part in name.split(MIXTURE_SEPARATOR):
        family, _, weight = part.rpartition(WEIGHT_SEPARATOR)
        member = family if weight.isascii() and weight.isdigit() else part
        if entry_point_path(member) is not None:
            return member
    return None


def is_task_family(name: str) -> bool:
    """Whether ``name`` is one of :data:`TASK_FAMILIES`, a mixture of distinct ones (``a+b``,
    ``a:3+b``), or has the form of an imported family (``module:Class``; whether it imports is
    known once :func:`make_family` imports it)."""
    return name in TASK_FAMILIES or parse_mixture(name) is not None or entry_point_path(name) is not None


def reads_data(name: str) -> bool:
    """Whether the task ``name`` (a family, or a mixture as :func:`is_task_family` accepts) reads
    the MNIST folder: it is, or has a member in, :data:`DATA_FAMILIES`. An imported family may
    read a data folder of its own: :func:`import_family` checks that it takes ``data``."""
    if entry_point_path(name) is not None:
        return True
    return any(family in DATA_FAMILIES for family, _ in parse_mixture(name) or [(name, 1)])


def make_family(
    name: str,
    *,
    data: str | os.PathLike[str] | None = None,
    split: str = "meta_train",
    dtype: torch.dtype = torch.float32,
) -> TaskFamily:
    """The task family called ``name``: one of :data:`TASK_FAMILIES`, several joined by ``+``
    for a :class:`MixtureFamily` (e.g. ``mlp-random+quadratic``, or ``mlp-random:3+quadratic`` to
    draw ``mlp-random`` three times as often), or your own as ``module:Class``
    (:func:`import_family`; ``dtype`` does not apply to it).

    ``split`` chooses the data part of data-backed families (see :data:`MNIST_SPLIT`); ``data``
    is their MNIST folder, and is refused by a task that reads none (it would be ignored).
    """
    if split not in MNIST_SPLIT:
        raise ValueError(f"unknown split {split!r}; parts: {sorted(MNIST_SPLIT)}")
    if data is not None and is_task_family(name) and not reads_data(name):
        raise ValueError(f"data is the MNIST folder of {' and '.join(DATA_FAMILIES)}; task {name!r} reads none")
    if entry_point_path(name) is not None:
        return import_family(name, data=data, split=split)
    if MIXTURE_SEPARATOR in name:
        if (member := imported_mixture_member(name)) is not None:
            raise ValueError(f"{name!r}: {IMPORTED_NOT_MIXED.format(member=member)}")
        members = parse_mixture(name)
        if members is None:
            raise ValueError(f"unknown task {name!r}; choose from {TASK_NAME_SYNTAX}")
        return MixtureFamily(
            [make_family(f, data=data if f in DATA_FAMILIES else None, split=split, dtype=dtype) for f, _ in members],
            [w for _, w in members],
        )
    if name == "quadratic":
        return QuadraticFamily(dtype=dtype)
    if name == "mnist-mlp":
        return MnistMLPFamily(data, split=split, dtype=dtype)
    if name == "mlp-random":
        return RandomMLPFamily(data, split=split, dtype=dtype)
    if name == "regression":
        return RegressionFamily(dtype=dtype)
    raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASK_FAMILIES)}")
