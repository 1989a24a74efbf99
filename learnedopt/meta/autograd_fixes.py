"""PyTorch functions whose gradients under ``vmap`` or whose double backward are wrong or missing
(torch 2.13), and the function modes and backends MAML runs them through instead, each exact
(tested against the autograd loop or a plain-ops model in tests/test_maml.py)."""

from __future__ import annotations

import contextlib
import sys

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils.parametrizations import _WeightNorm
from torch.nn.utils.weight_norm import WeightNorm
from torch.overrides import TorchFunctionMode

from .batchnorm import is_library_layer


class _Rewrite(TorchFunctionMode):
    """A function mode that runs the functions of ``_FUNCTIONS`` (function -> what
    :meth:`rewrite` needs to know of its arguments) by :meth:`rewrite`, every other as it is."""

    _FUNCTIONS: dict = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func not in self._FUNCTIONS:
            return func(*args, **(kwargs or {}))
        return self.rewrite(func, self._FUNCTIONS[func], list(args), dict(kwargs or {}))

    def rewrite(self, func, found, args: list, kwargs: dict):  # noqa: ANN201 - the function's own result
        raise NotImplementedError


class AffineAfterNorm(_Rewrite):
    """Runs ``layer_norm``, ``instance_norm`` and ``batch_norm`` (``torch.nn.functional``'s and
    ``torch``'s own) without their weight and bias, then applies them with plain ops.

    Under ``vmap``, these kernels' second-order gradients with a weight are wrong (the batching
    rule of their backward, pytorch/functorch#534): second-order MAML meta-gradients through
    ``nn.LayerNorm``, an affine ``nn.InstanceNorm1d``, ``F.batch_norm`` or a direct
    ``torch.layer_norm`` came out 0.5-4% off the autograd loop's (torch 2.13, float64), silently.
    Without the affine parameters they are exact. (``group_norm`` and ``rms_norm`` are exact.)
    """

    # function -> (where the affine parameters broadcast, position of the weight; the bias follows it)
    _FUNCTIONS = {
        nn.functional.layer_norm: ("trailing", 2),
        torch.layer_norm: ("trailing", 2),
        nn.functional.instance_norm: ("channel", 3),
        torch.instance_norm: ("channel", 1),
        nn.functional.batch_norm: ("channel", 3),
        torch.batch_norm: ("channel", 1),
    }

    def rewrite(self, func, found, args: list, kwargs: dict):  # noqa: ANN201
        where, weight_at = found
        affine = []
        for name, at in (("weight", weight_at), ("bias", weight_at + 1)):
            if name in kwargs:
                affine.append(kwargs.pop(name))
            elif at < len(args):
                affine.append(args[at])
                args[at] = None
            else:
                affine.append(None)
        out = func(*args, **kwargs)
        weight, bias = affine
        if where == "channel":  # (C,) against an input (N, C, *spatial); layer_norm's broadcast as they are
            shape = [1, -1] + [1] * (out.dim() - 2)
            weight, bias = (None if t is None else t.view(shape) for t in (weight, bias))
        if weight is not None:
            out = out * weight
        if bias is not None:
            out = out + bias
        return out


class PaddingRowWithoutGradient(_Rewrite):
    """Runs ``embedding`` with a ``padding_idx`` (``torch.nn.functional``'s and ``torch``'s own) on
    the weight with its padding row detached: the same output, and no gradient to that row.

    Under ``vmap`` over per-task weights, the embedding's batching rule looks the tasks' indices
    up in one table of the stacked weights, where ``padding_idx`` is the first task's row only:
    a backward outside ``vmap`` (MAML's meta-gradient) gave every other task's padding row a
    gradient, and meta-gradients of ``nn.Embedding(..., padding_idx=0)`` came out 40% off the
    loop's, first- and second-order (torch 2.13, float64), silently.
    """

    # function -> (position of the weight, position of padding_idx); torch.embedding's -1 is "none"
    _FUNCTIONS = {nn.functional.embedding: (1, 2), torch.embedding: (0, 2)}

    def rewrite(self, func, found, args: list, kwargs: dict):  # noqa: ANN201
        weight_at, padding_at = found
        padding = kwargs.get("padding_idx", args[padding_at] if padding_at < len(args) else None)
        if padding is None or (func is torch.embedding and padding < 0):
            return func(*args, **kwargs)
        weight = kwargs["weight"] if "weight" in kwargs else args[weight_at]
        row = padding + weight.shape[0] if padding < 0 else padding  # F.embedding counts from the end
        padding_row = torch.arange(weight.shape[0], device=weight.device) == row
        weight = torch.where(padding_row.unsqueeze(1), weight.detach(), weight)
        if "weight" in kwargs:
            kwargs["weight"] = weight
        else:
            args[weight_at] = weight
        return func(*args, **kwargs)


def may_embed(model: nn.Module) -> bool:
    """Whether ``model`` may call an embedding (so a padding index): it has an ``nn.Embedding``,
    or a module of a class of its own, whose forward could call ``F.embedding``. A model of
    ``torch.nn``'s other layers (and MAML's batch-norm replacements) cannot."""
    return any(isinstance(m, nn.Embedding) or not is_library_layer(m) for m in model.modules())


def twice_differentiable_attention(enabled: bool = True) -> contextlib.AbstractContextManager:
    """Runs ``F.scaled_dot_product_attention`` by its math backend while ``enabled``. Its fused
    kernels (flash attention on CPU, flash and memory-efficient on CUDA) have no double backward
    ("derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
    implemented"), so second-order MAML through attention needs it."""
    return sdpa_kernel(SDPBackend.MATH) if enabled else contextlib.nullcontext()


class PlainWeightNorm(_Rewrite):
    """Runs ``torch._weight_norm`` (weight normalisation: ``torch.nn.utils.parametrizations``'
    and the deprecated ``torch.nn.utils.weight_norm``'s) by plain ops: ``v * (g / norm)``, the
    norm over every dimension but ``dim`` (over all for ``dim=-1``), as its unfused branch.

    The fused kernel it takes for ``dim`` 0 or the last has a wrong double backward (its
    ``gradgradcheck`` fails; torch 2.13): second-order MAML meta-gradients through
    ``weight_norm`` came out 28% off those of a plain model computing the same weight, on every
    path, silently. The plain ops are exact (``norm_except_dim`` would be too, but has no
    batching rule: ``vmap`` would loop over it).
    """

    _FUNCTIONS = {torch._weight_norm: None}

    def rewrite(self, func, found, args: list, kwargs: dict):  # noqa: ANN201
        bound = {**dict(zip(("v", "g", "dim"), args)), **kwargs}
        v, g, dim = bound["v"], bound["g"], bound.get("dim", 0)
        if dim == -1:
            return v * (g / torch.linalg.vector_norm(v))
        dim %= v.dim()
        shape = [-1 if d == dim else 1 for d in range(v.dim())]
        return v * (g / torch.linalg.vector_norm(v.movedim(dim, 0).reshape(v.shape[dim], -1), dim=1).view(shape))


def may_normalise_weights(model: nn.Module) -> bool:
    """Whether ``model`` may call ``torch._weight_norm``: it has weight normalisation (either
    ``weight_norm``), or a module of a class of its own, whose forward could call it directly
    (second-order meta-gradients through such a call were 7% off, silently). A model of
    ``torch.nn``'s other layers (and MAML's batch-norm replacements) cannot."""
    return any(
        isinstance(m, _WeightNorm)
        or any(isinstance(hook, WeightNorm) for hook in m._forward_pre_hooks.values())
        or not is_library_layer(m)
        for m in model.modules()
    )


def compiled_eagerly(model: nn.Module, enabled: bool = True) -> contextlib.AbstractContextManager:
    """Runs the ``torch.compile``'d modules of ``model`` (``torch.compile(model)``, or a compiled
    submodule) eagerly while ``enabled``. torch.compile has no double backward ("torch.compile
    with aot_autograd does not currently support double backward", raised in the meta-backward)
    and does not trace under ``vmap``: Dynamo then runs the forward eagerly and skips its code
    for good, so every compiled ``torch.nn`` layer of the process ran uncompiled afterwards."""
    dynamo = sys.modules.get("torch._dynamo")  # imported by torch.compile: without it nothing is compiled
    compiled = enabled and dynamo is not None and any(isinstance(m, dynamo.eval_frame.OptimizedModule) for m in model.modules())
    return torch.compiler.set_stance("force_eager") if compiled else contextlib.nullcontext()


def twice_differentiable(model: nn.Module, enabled: bool) -> contextlib.ExitStack:
    """While ``enabled`` (a second-order graph is built): attention by its math backend
    (:func:`twice_differentiable_attention`), where ``model`` may normalise a weight
    (:func:`may_normalise_weights`), that by plain ops (:class:`PlainWeightNorm`), and its compiled
    modules eagerly (:func:`compiled_eagerly`)."""
    stack = contextlib.ExitStack()
    stack.enter_context(twice_differentiable_attention(enabled))
    if enabled and may_normalise_weights(model):
        stack.enter_context(PlainWeightNorm())
    stack.enter_context(compiled_eagerly(model, enabled))
    return stack
