"""Reptile (Nichol, Achiam & Schulman 2018): a learned initialisation trained by moving it towards
the weights that ordinary training reaches on each task."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..values import check_positive_integer, is_integer, is_number
from .batchnorm import apply_batchnorm_policy_
from .model_calls import (
    Inputs,
    LossFn,
    check_initialised,
    check_inputs,
    check_same_examples,
    check_steps,
    default_loss,
    model_arguments,
    outside_inference,
    scalar_loss,
)

OptimizerFactory = Callable[[Iterable[nn.Parameter]], Optimizer]


class Reptile:
    """Reptile with any ``torch.optim`` optimizer in the inner loop.

    One meta-step: for each task, a working copy of the model starts from the initialisation
    ``theta``, a fresh inner optimizer (from ``inner_optimizer``) trains it for ``inner_steps``
    steps, giving ``phi_i``; then ``theta <- theta + eps_t * mean_i(phi_i - theta)``, where
    ``eps_t`` is annealed linearly from ``outer_stepsize`` at step 0 to ``final_outer_stepsize`` at
    ``total_steps``.

    BatchNorm: as in Nichol et al.'s code, statistics are *transductive*: BatchNorm layers are
    replaced in place by :class:`~learnedopt.meta.batchnorm.BatchStatNorm` (the same affine parameters),
    which normalises every batch with its own statistics, in training and in ``eval()`` mode
    alike, and keeps no running statistics (which Reptile would not learn: each task's copy
    would update its own and drop them). ``batchnorm="running"`` replaces them by
    :class:`~learnedopt.meta.batchnorm.RunningStatNorm` instead, which normalises every example with
    the running statistics the layer holds (a pretrained network's), kept as they are.
    ``batchnorm="error"`` refuses models with BatchNorm.
    Other buffers are not meta-learned: a meta-step moves only the parameters, so a buffer that
    the copies update in their forward (an ``InstanceNorm`` with running statistics, a counter)
    keeps its value.

    The inner optimizer is stepped with a closure, so optimizers that read the loss
    (``MetaLSTMOptimizer``) work. To run a learned optimizer inside, pass its rule once so it is not
    rebuilt per task, e.g. ``lambda p: LSTMOptimizer(p, weights=rule)``.

    Args:
        model: the network whose parameters are the initialisation (updated in place).
        inner_steps: optimizer steps per task.
        inner_optimizer: builds the inner optimizer from parameters; default SGD(lr=0.02).
        outer_stepsize, final_outer_stepsize, total_steps: the annealed outer step size; with
            ``total_steps=None`` it stays at ``outer_stepsize``.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (a tensor of one element); default cross-entropy (:func:`~learnedopt.meta.model_calls.default_loss`).
        batchnorm: ``"transductive"`` (default), ``"running"`` or ``"error"``, as above.
    """

    def __init__(
        self,
        model: nn.Module,
        inner_steps: int,
        inner_optimizer: OptimizerFactory | None = None,
        *,
        outer_stepsize: float = 0.1,
        final_outer_stepsize: float = 0.0,
        total_steps: int | None = None,
        loss_fn: LossFn | None = None,
        batchnorm: str = "transductive",
    ) -> None:
        check_positive_integer("inner_steps", inner_steps)
        if inner_optimizer is not None and not callable(inner_optimizer):  # an optimizer, not its factory
            raise TypeError(
                "inner_optimizer is a function of the parameters that returns an optimizer, e.g. "
                f"lambda params: torch.optim.SGD(params, lr=0.02), got a {type(inner_optimizer).__name__}"
            )
        # a string was math.isfinite's TypeError; a bool read as a step of 1 or one meta-step
        if not all(is_number(eps) and math.isfinite(eps) and eps >= 0 for eps in (outer_stepsize, final_outer_stepsize)):
            raise ValueError(f"outer step sizes must be >= 0 and finite, got {outer_stepsize!r} and {final_outer_stepsize!r}")
        if total_steps is not None and not (is_integer(total_steps) and total_steps >= 1):
            raise ValueError(f"total_steps must be >= 1, got {total_steps!r} (an integer)")
        self.model = apply_batchnorm_policy_(model, batchnorm)
        self.inner_steps = inner_steps
        self.inner_optimizer = inner_optimizer or (lambda params: torch.optim.SGD(params, lr=0.02))
        self.outer_stepsize = outer_stepsize
        self.final_outer_stepsize = final_outer_stepsize
        self.total_steps = total_steps
        self.loss_fn = loss_fn or default_loss
        self.step_count = 0

    def current_outer_stepsize(self) -> float:
        """``eps_t`` for the next meta-step."""
        if self.total_steps is None:
            return self.outer_stepsize
        frac = min(self.step_count / self.total_steps, 1.0)
        return (1 - frac) * self.outer_stepsize + frac * self.final_outer_stepsize

    def _checked_batches(self, batches: Sequence[tuple[Inputs, Inputs]]) -> list[tuple[Inputs, Inputs]]:
        """A task's ``(inputs, targets)`` batches checked (:meth:`adapt`), a mapping of inputs as a
        plain dict; raises TypeError or ValueError naming the batch at fault."""
        batches = list(batches)  # read once: an empty generator passed `not batches`, then divided by zero
        if not batches:
            raise ValueError("a task needs at least one (inputs, targets) batch")
        checked = []
        for i, batch in enumerate(batches):
            # a task given as one (x, y) pair would be read as batches x and y, and a row of x
            # unpacked as an (inputs, targets) pair: silently wrong where x has two rows
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                found = (f"a Tensor of shape {tuple(batch.shape)}" if isinstance(batch, Tensor)
                         else f"a {type(batch).__name__}")  # fmt: skip
                raise TypeError(
                    f"a task is a sequence of (inputs, targets) batches, but its item {i} is {found}; for one batch "
                    "per task pass [(x, y)], and to meta_step a list of such tasks: [[(x1, y1)], [(x2, y2)], ...]"
                )
            x, y = batch
            first, label = x, "inputs"
            if isinstance(x, (tuple, list, Mapping)):  # any other input is the model's one argument
                # a mapping as a plain dict (a UserDict, e.g. a tokenizer's output): outside_inference maps over it
                x, first, label = check_inputs(x, "inputs", 1, f"Reptile (batch {i})")
            if isinstance(first, Tensor) and first.dim() and not len(first):
                # the mean loss over no examples is NaN with a zero gradient: a step that moved nothing
                raise ValueError(f"Reptile (batch {i}) needs at least one example, got {label} of shape {tuple(first.shape)}")
            check_same_examples(first, label, y, "targets", 0, f"Reptile (batch {i}): the")
            checked.append((x, y))
        return checked

    def _check_model(self) -> None:
        """Raise ValueError when no parameter of the model requires grad (an optimizer of no
        gradients), or one is a lazy module's, not yet initialised (each task's copy drew it afresh
        at random, and a meta-step failed in PyTorch's own error): before anything is trained."""
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError("Reptile: no parameter of the model requires grad, so an inner step has nothing to adapt")
        check_initialised(dict(self.model.named_parameters()), "Reptile")

    def adapt(self, batches: Sequence[tuple[Inputs, Inputs]], steps: int | None = None) -> nn.Module:
        """A copy of the model trained from the initialisation on one task.

        Args:
            batches: ``(inputs, targets)`` minibatches, used in turn (cycled if fewer than steps).
                ``inputs`` is one tensor ``(N, ...)``, the model's one argument, or a tuple or
                list (its positional arguments, ``model(*inputs)``) or dict (its keyword
                arguments, ``model(**inputs)``) of tensors with the same ``N``, as in
                :meth:`MAML.query_losses <learnedopt.meta.MAML.query_losses>`; ``targets`` go
                to ``loss_fn`` as they are (one tensor of another ``N`` than the inputs is refused).
            steps: inner steps (default ``inner_steps``).

        Returns:
            A fresh copy of the model as it is now (its modules, their settings and its
            initialisation), trained on the task; also under ``torch.no_grad`` or
            ``inference_mode`` (evaluation), as :meth:`MAML.adapt <learnedopt.meta.MAML.adapt>`.
        """
        checked = self._checked_batches(batches)
        steps = self.inner_steps if steps is None else steps
        check_steps(steps)
        self._check_model()
        # inference_mode's tensors have no graph and autograd saves none of them: train outside it
        with torch.inference_mode(False), torch.enable_grad():
            # a copy per task, not one reused: it follows every later change to the model (a swapped
            # layer, a module's attribute, a frozen parameter), and costs little beside the inner loop
            worker = copy.deepcopy(self.model)
            for p in worker.parameters():
                p.grad = None
            optimizer = self.inner_optimizer(worker.parameters())
            for t in range(steps):
                x, y = outside_inference(checked[t % len(checked)])
                args, kwargs = model_arguments(x)

                def closure(args: tuple = args, kwargs: dict = kwargs, y: Inputs = y) -> Tensor:
                    optimizer.zero_grad()
                    loss = scalar_loss(self.loss_fn(worker(*args, **kwargs), y))
                    loss.backward()
                    return loss

                optimizer.step(closure)
        return worker

    def meta_step(
        self,
        tasks: Iterable[Sequence[tuple[Inputs, Inputs]]],
        *,
        all_reduce_sum_: Callable[[Sequence[Tensor]], None] | None = None,
    ) -> float:
        """One Reptile update of the initialisation from a meta-batch of tasks.

        Args:
            tasks: for each task, its ``(inputs, targets)`` minibatches (see :meth:`adapt`); a list,
                or any iterable (a generator), read once.
            all_reduce_sum_: for data-parallel meta-training, sums tensors over the processes in
                place (e.g. :meth:`learnedopt.meta.distributed.Workers.all_reduce_sum_`); each
                process passes its own tasks and the update averages over all of them.

        Returns:
            The outer step size used.

        Raises:
            FloatingPointError: a task's trained weights are not finite; nothing is changed.
        """
        # read once: a generator of tasks was trained in full, then failed on len(tasks)
        tasks = list(tasks)
        if not tasks:
            raise ValueError("meta_step needs at least one task")
        checked = [self._checked_batches(batches) for batches in tasks]  # every task before training any
        self._check_model()
        params = [p for p in self.model.parameters() if p.requires_grad]
        total = [torch.zeros_like(p) for p in params]
        for batches in checked:
            worker = self.adapt(batches)
            adapted = [q for q, p in zip(worker.parameters(), self.model.parameters(), strict=True) if p.requires_grad]
            for acc, phi, theta in zip(total, adapted, params, strict=True):
                acc.add_(phi.detach() - theta.detach())
        count = total[0].new_tensor([float(len(tasks))]) if total else None
        if all_reduce_sum_ is not None and total:
            all_reduce_sum_([*total, count])
        shape_only = bool(total) and total[0].is_meta  # meta tensors, as the learned optimizers take: no values to read
        if total and not shape_only and not bool(torch.stack([torch.isfinite(acc).all() for acc in total]).all()):
            half = sorted({str(p.dtype) for p in params if p.dtype in (torch.float16, torch.bfloat16)})
            hint = (
                f"; the model is {', '.join(half)}, where an inner optimizer's small numbers can round to 0 "
                "(torch.optim.Adam's eps=1e-8 is 0 in float16, so a zero second moment divides by 0): "
                "train in float32, or give the inner optimizer a larger eps" if half else ""
            )
            raise FloatingPointError(
                f"a task's trained weights hold NaN or Inf (the initialisation was left unchanged){hint}"
            )
        eps = self.current_outer_stepsize()
        with torch.no_grad():
            for theta, acc in zip(params, total, strict=True):
                theta.add_(acc, alpha=eps / (len(tasks) if shape_only else float(count)))
        self.step_count += 1
        return eps

    def state_dict(self) -> dict[str, Any]:
        """The meta-step counter (the initialisation is the model's own state dict)."""
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the meta-step counter from :meth:`state_dict`'s output."""
        self.step_count = int(state["step_count"])
