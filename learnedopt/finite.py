"""The NaN/Inf check of many tensors at once, shared by the optimizers' steps and
``load_state_dict`` (:mod:`learnedopt.optim`), ``learned_step(nan_policy="raise")``
(:mod:`learnedopt.meta.unroll`, which the optimizers do not import) and the evaluation's baseline
runs (:mod:`learnedopt.evaluation.runs`).

One ``torch._foreach_norm`` per device and dtype, read with one host sync per device: the 2-norm,
NaN or Inf wherever a tensor holds a NaN or an Inf. It makes no copy (a ``dtype=torch.float64``
norm would) and on the CPU is far faster than the infinity norm or ``isfinite().all()`` (by
timings during its development, not recorded as a benchmark).
Its sum of squares also overflows where every value is finite (float16 values whose norm passes
65504, float32 ones of 1e20), so each tensor it flags is looked at again, exactly, by its
extremes (``aminmax``: NaN where it holds a NaN, else ±Inf where it holds an Inf), with one more
host sync per device that has one: rare (a NaN or Inf, or such large values). The verdicts are ``isfinite().all()``'s.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd import forward_ad

from .autocast import without_autocast


def non_finite(tensors: Sequence[Tensor]) -> list[str | None]:
    """For each tensor: ``"NaN"`` where it holds a NaN, else ``"Inf"`` where it holds an Inf,
    else None; None too for a ``meta`` or empty tensor (no values to check) and for an integer or
    bool one (never NaN or Inf). A sparse tensor is judged by its values (a COO tensor's
    coalesced: duplicate entries summed, as an optimizer reads them). Plain tensors only: the
    optimizers pass a ``DTensor``'s local part. Reads no gradient (under ``torch.no_grad``) and no
    forward-mode tangent (``torch.func.jvp``, ``forward_ad`` duals): there the tensors are detached."""
    with torch.no_grad():
        # detached under forward-mode AD: no_grad stops no forward-mode derivative, and
        # _foreach_norm's failed under torch.func.jvp and forward_ad duals ("Trying to set a forward
        # gradient that has a different size"); the values, not their tangents, are judged. Only
        # there: the optimizers check every gradient at every step, and a detach each cost ~0.4 us
        detach = _forward_ad_active()
        values = [_values(t.detach() if detach else t) for t in tensors]
        by_dtype: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, t in enumerate(values):
            if not t.is_meta and t.numel() and (t.is_floating_point() or t.is_complex()):
                by_dtype.setdefault((t.device, t.dtype), []).append(i)
        with without_autocast({device.type for device, _ in by_dtype}):
            return _judge(values, by_dtype)


def _forward_ad_active() -> bool:
    """Whether a forward-mode derivative may be attached to a tensor here: inside a
    ``torch.autograd.forward_ad.dual_level`` (``torch.func.jvp`` and ``jacfwd`` enter one too) or
    any ``torch.func`` transform."""
    return forward_ad._current_level >= 0 or torch._C._functorch.maybe_current_level() is not None


def _judge(values: list[Tensor], by_dtype: dict[tuple[torch.device, torch.dtype], list[int]]) -> list[str | None]:
    """:func:`non_finite`'s verdicts on ``values`` (strided tensors); ``by_dtype`` indexes those
    with values to check (float or complex, not empty or ``meta``) by device and dtype."""
    # every device's reductions are queued before the first is read
    by_device: dict[torch.device, list[tuple[list[int], Tensor]]] = {}
    for (device, _), indices in by_dtype.items():
        norms = torch.stack(torch._foreach_norm([values[i] for i in indices], ord=2))
        by_device.setdefault(device, []).append((indices, torch.isfinite(norms)))
    flagged = []
    for pairs in by_device.values():
        oks = (pairs[0][1] if len(pairs) == 1 else torch.cat([ok for _, ok in pairs])).tolist()
        indices = [i for i, ok in zip((i for indices, _ in pairs for i in indices), oks, strict=True) if not ok]
        if indices:
            flagged.append((indices, torch.stack([_nan_inf(values[i]) for i in indices])))
    found: list[str | None] = [None] * len(values)
    for indices, verdicts in flagged:
        for i, (nan, inf) in zip(indices, verdicts.tolist(), strict=True):
            found[i] = "NaN" if nan else "Inf" if inf else None
    return found


def all_finite(tensors: Sequence[Tensor]) -> list[bool]:
    """Whether each tensor is free of NaN/Inf (:func:`non_finite`), as ``bool(torch.isfinite(t).all())``
    would say (which a sparse tensor does not support); True for ``meta`` and empty tensors."""
    return [found is None for found in non_finite(tensors)]


def _values(t: Tensor) -> Tensor:
    """The values ``t`` holds: itself where it is strided; a sparse tensor's stored values (a COO
    one's once coalesced, so that duplicate entries are summed as every reader of it sums them)."""
    if t.layout == torch.strided:
        return t
    if t.layout == torch.sparse_coo:
        return t.coalesce().values()
    return t.values()  # CSR, CSC, BSR, BSC


def _nan_inf(t: Tensor) -> Tensor:
    """Whether ``t`` holds a NaN and whether it holds an Inf, as a two-element bool tensor on its
    device (no host sync), read from its extremes: ``aminmax`` propagates a NaN, and otherwise
    one of them is ±Inf where ``t`` holds an Inf (a complex tensor's real and imaginary parts)."""
    low, high = torch.aminmax(torch.view_as_real(t.resolve_conj()) if t.is_complex() else t)
    return torch.stack([low.isnan() | high.isnan(), low.isinf() | high.isinf()])
