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
    too, with its own message, before any warning. A model with a layer known not to run under
    ``vmap`` (:func:`unbatchable_layers`) is not tried: ``"auto"`` loops at once and warns
    naming the layer, ``True`` raises a RuntimeError naming it, in one line. Where the second
    item is False after ``"auto"``, the caller keeps to the loop from then on."""
    if vectorize not in (True, False, "auto"):
        raise ValueError(f"vectorize must be True, False or 'auto', got {vectorize!r}")
    if not vectorize:
        return looped(), False
    known = unbatchable_layers(model)
    if known is not None:
        reason, remedy = known
        if vectorize is True:
            raise RuntimeError(f"{who}(vectorize=True): {reason}: use vectorize='auto' or False (a loop over the tasks), or {remedy}")
        result = looped()
        warnings.warn(f"{who}: {reason}; looping over tasks", stacklevel=3)
        return result, False
    buffers = {name: b.clone() for name, b in model.named_buffers()} if vectorize == "auto" else {}
    try:
        return vmapped(), True
    except RuntimeError as err:
        if vectorize is True:
            raise
        vmap_error = err
    with torch.no_grad():
        for name, value in model.named_buffers():
            if name in buffers:
                value.copy_(buffers[name])
    result = looped()
    warnings.warn(f"{who}: vmap over tasks failed ({vmap_error}); looping over tasks", stacklevel=3)
    return result, False


def unbatchable_layers(model: nn.Module) -> tuple[str, str] | None:
    """``(reason, remedy)`` naming the layers of ``model`` that cannot run under ``vmap`` as
    they are, each phrase one line; None where there is none.

    - A norm layer in training with ``track_running_stats=True`` (``nn.InstanceNorm2d``; MAML's
      and the learners' BatchNorm layers are replaced before): it updates its running
      statistics in place, which ``vmap`` refused in three lines naming no layer ("Batch norm
      got a batched tensor as input while the running_mean or running_var, which will be
      updated in place, were not batched. If you are using a module ...").
    - An ``nn.Embedding`` or ``nn.EmbeddingBag`` with ``max_norm``: it renormalises the rows it
      looks up in place, which ``vmap`` refused ("aten::embedding_renorm_ ... is not possible")
      after renormalising its inputs in place: the meta-lstm learner's per-task parameters,
      whose loop then failed.
    """
    found: list[tuple[str, str, str]] = []  # (layer, what it does, remedy)
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats:
            found.append((f"{name!r} ({type(m).__name__}, track_running_stats=True)",
                          "updates its running statistics in place in training, which vmap cannot batch",
                          "track_running_stats=False (the same outputs in training, no statistics kept)"))  # fmt: skip
        elif isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None:
            found.append((f"{name!r} ({type(m).__name__}, max_norm={m.max_norm})",
                          "renormalises its weight in place, which vmap cannot run", "max_norm=None"))  # fmt: skip
    if not found:
        return None
    layer, does, remedy = found[0]
    more = f" (and {len(found) - 1} more layer{'s' if len(found) > 2 else ''} that vmap cannot run)" if len(found) > 1 else ""
    return f"layer {layer} {does}{more}", remedy
