"""One task's computation run over a meta-batch of tasks, as ``MAML`` and the meta-lstm few-shot
learner run their inner loops: one ``torch.func.vmap`` over the tasks, through the rewrites of
:mod:`.autograd_fixes` that PyTorch's functions need under it, or, for a model that cannot run
under ``vmap`` (a norm layer updating its running statistics in place, ``nn.LSTM``,
``spectral_norm``), a loop over the tasks."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.func import vmap

from .autograd_fixes import AffineAfterNorm, PaddingRowWithoutGradient, PlainWeightNorm, compiled_eagerly, may_embed, may_normalise_weights

T = TypeVar("T")


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``; False for a device autocast does not know,
    such as ``meta`` (a shape-only run), where ``torch.is_autocast_enabled`` raised "unknown
    device type for autocast"."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def vmap_tasks(model: nn.Module, one: Callable[..., T], inputs: tuple[Any, ...], *, second_order: bool) -> T:
    """``vmap(one, randomness="different")(*inputs)``: ``one`` called on each task's slice of
    ``inputs`` (tensors, or tuples, lists and dicts of them, batched over their first dimension),
    each task drawing its own random numbers (its own dropout masks), through the rewrites
    ``model``'s functions need under ``vmap``:

    - :class:`~.autograd_fixes.AffineAfterNorm` where ``second_order`` (a graph for a second
      derivative is built) or under autocast: the norms' batched second derivatives are wrong,
      and their batched backward fails under autocast at the first order too ("expected scalar
      type BFloat16 but found Float": the low-precision input beside the float32 weight);
    - :class:`~.autograd_fixes.PaddingRowWithoutGradient` where ``model`` may embed: the batching
      rule gave the padding row of every task but the first a gradient, first- and second-order;
    - :class:`~.autograd_fixes.PlainWeightNorm` at the first order where ``model`` may
      normalise a weight: ``torch._weight_norm`` has no batching rule (``vmap`` ran it task by
      task, with PyTorch's "performance drop" warning; the second order has the plain ops
      already);
    - ``model``'s compiled modules run eagerly (:func:`~.autograd_fixes.compiled_eagerly`).

    Each rewrite costs a Python call per op of the vmapped forward (10-20% of a sinusoid MLP's
    MAML meta-step for the padding one), so each applies only where needed."""
    leaves = pytree.tree_leaves(inputs)
    autocast = bool(leaves) and autocast_enabled(leaves[0].device.type)
    padding = PaddingRowWithoutGradient() if may_embed(model) else contextlib.nullcontext()
    norms = AffineAfterNorm() if second_order or autocast else contextlib.nullcontext()
    weight_norm = PlainWeightNorm() if not second_order and may_normalise_weights(model) else contextlib.nullcontext()
    with norms, padding, weight_norm, compiled_eagerly(model):
        return vmap(one, randomness="different")(*inputs)


def vmap_or_loop(
    model: nn.Module, vmapped: Callable[[], T], looped: Callable[[], T], vectorize: bool | str, who: str
) -> tuple[T, bool]:
    """``(vmapped(), True)``, or ``(looped(), False)``: the tasks under ``vmap`` or in a loop.

    ``vectorize``: ``True`` runs ``vmapped`` and lets its error through; ``False`` runs
    ``looped``; ``"auto"`` runs ``vmapped`` and, where it raises a RuntimeError (a model that
    cannot run under ``vmap``), puts ``model``'s buffers back as they were (an attempt that
    failed part-way may have updated some in place, as ``spectral_norm``'s power iteration does)
    and runs ``looped``, then warns, naming ``who`` and the error: a bad input fails in the loop
    too, with its own message, before any warning. Where the second item is False after
    ``"auto"``, the caller keeps to the loop from then on."""
    if vectorize not in (True, False, "auto"):
        raise ValueError(f"vectorize must be True, False or 'auto', got {vectorize!r}")
    if not vectorize:
        return looped(), False
    buffers = {name: b.clone() for name, b in model.named_buffers()} if vectorize == "auto" else {}
    try:
        return vmapped(), True
    except RuntimeError as err:
        running = _running_stats_failure(model, err)
        if vectorize is True:
            if running is None:
                raise
            raise RuntimeError(
                f"{who}(vectorize=True): {running}: use vectorize='auto' or False (a loop over the tasks), or "
                "track_running_stats=False (the same outputs in training, no statistics kept)"
            ) from err
        reason = f": {running}" if running is not None else f" ({err})"
    with torch.no_grad():
        for name, value in model.named_buffers():
            if name in buffers:
                value.copy_(buffers[name])
    result = looped()
    warnings.warn(f"{who}: vmap over tasks failed{reason}; looping over tasks", stacklevel=3)
    return result, False


def _running_stats_failure(model: nn.Module, err: RuntimeError) -> str | None:
    """Where ``err`` is vmap's refusal of a norm layer updating its running statistics in place
    ("Batch norm got a batched tensor as input while the running_mean or running_var, which will
    be updated in place, were not batched. If you are using a module ...", three lines naming no
    layer, and "Batch norm" for an InstanceNorm too), the layers of ``model`` that do so (norm
    layers in training with ``track_running_stats=True``), named in one line; else None."""
    if "running_mean or running_var" not in str(err):
        return None
    layers = [
        f"{name!r} ({type(m).__name__}, track_running_stats=True)"
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats
    ]
    if not layers:  # a function of the user's own calling F.batch_norm or F.instance_norm
        return None
    if len(layers) == 1:
        return f"layer {layers[0]} updates its running statistics in place in training, which vmap cannot batch"
    return f"layers {', '.join(layers)} update their running statistics in place in training, which vmap cannot batch"
