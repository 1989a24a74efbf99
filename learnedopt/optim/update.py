"""Functional learned updates, in the style of ``torch.optim.adam``'s ``_single_tensor_adam`` /
``_multi_tensor_adam`` / ``_fused_adam``: the optimizer classes own state and dispatch, these
functions do the step.

Each applies ``param += lr * step`` where ``step`` is the update rule's output, run the
rule in ``compute_dtype`` whatever the parameter and state dtypes, and write the new states back
in their storage dtype. They are meant to run under ``torch.no_grad()``.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..nn import CoordinateLSTM, MetaLSTMCell, State, UpdateRule

#: Coordinates per chunk in the batched path: small enough that one chunk's gate temporaries
#: (4 x hidden values per coordinate) stay in cache, large enough to amortise op overheads.
DEFAULT_CHUNK = 8192
#: Param groups' partitions of at most this many coordinates stepped share their rule calls
#: (:func:`grouped_flat_update_`): a call's fixed cost (tens of small torch operations, about 0.3 ms
#: on one CPU thread) dwarfs the work of a small group, while a large one amortises it over its own
#: chunks, and sharing adds a copy of its states. Measured on one thread over 30 one-tensor groups of
#: ``n`` coordinates (``LSTMOptimizer`` / ``MetaLSTMOptimizer``), sharing was 3.7x / 3.2x faster at
#: n = 10, 1.8x / 1.9x at 1,000, 1.17x / 1.28x at 2,048, 0.90x / 1.12x at 4,096 and 0.94x / 0.94x at
#: 8,192 (``benchmarks/param_groups.py`` times whole steps).
DEFAULT_GROUP_BATCH = 2048


def _signed(grad: Tensor, maximize: bool) -> Tensor:
    return -grad if maximize else grad


def single_tensor_update_(
    rule: UpdateRule,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[State],
    *,
    lr: float,
    loss: Tensor | None,
    maximize: bool,
    compute_dtype: torch.dtype,
    before_write: Callable[[], None] | None = None,
) -> None:
    """The plain reference: run the rule on each parameter tensor separately.

    Args:
        params, grads: parameter tensors (any shape, any strides) and their dense gradients.
        states: for each parameter, the rule's states of shape ``spec.shape(param.numel())``;
            updated in place.
        lr: multiplier of the learned step (0 leaves the parameters unchanged).
        loss: scalar optimizee loss for rules that need it.
        maximize: step on the negated gradients (maximise the objective, as ``torch.optim``'s
            ``maximize``).
        compute_dtype: the dtype the rule's math runs in (:func:`learnedopt.nn.precision.math_dtype`
            of the parameters'): gradients, parameters and states are read in it, and the new
            states and parameters written back in their own dtypes.
        before_write: if given, called before each tensor's states and value are written, so
            that a caller can tell an error before any write from one after some.
    """
    names = list(rule.state_spec())
    for param, grad, state in zip(params, grads, states, strict=True):
        g = _signed(grad, maximize).reshape(-1).to(compute_dtype)
        p = param.detach().reshape(-1).to(compute_dtype)
        step, new_state = rule(g, p, {k: state[k].to(compute_dtype) for k in names}, loss)
        if before_write is not None:
            before_write()
        for k in names:
            _store_(state[k], new_state[k])
        if lr != 0:  # lr 0 leaves the parameter as it is, even where the step is not finite
            param.add_(step.view(param.shape), alpha=lr)


def _store_(target: Tensor, value: Tensor) -> None:
    """Write a rule's new state into its buffer. Into a dtype of a narrower exponent range than
    the math's it saturates at that dtype's largest value, so that a square that fits the math
    dtype does not become Inf there, and NaN at the next moving average (``lerp`` of Inf): float16
    (65504: a gradient over 256), or float32 from the float64 math of float64 parameters (3.4e38:
    a gradient over 1.8e19). bfloat16 shares float32's range, so float32 math needs no clamp."""
    if _max_exponent(target.dtype) < _max_exponent(value.dtype):
        largest = torch.finfo(target.dtype).max
        value = value.clamp(-largest, largest)
    target.copy_(value)


def _store_all_(targets: list[Tensor], values: list[Tensor]) -> None:
    """:func:`_store_` of each value into its target: one ``torch._foreach_copy_`` where none
    needs saturating (the targets of one state share a dtype), not one copy per target."""
    if len(targets) > 1 and all(_max_exponent(t.dtype) >= _max_exponent(v.dtype) for t, v in zip(targets, values, strict=True)):
        torch._foreach_copy_(targets, values)
        return
    for target, value in zip(targets, values, strict=True):
        _store_(target, value)


@functools.cache
def _max_exponent(dtype: torch.dtype) -> int:
    """The binary exponent of ``dtype``'s largest value (16 for float16, 128 for bfloat16 and
    float32, 1024 for float64)."""
    return math.frexp(torch.finfo(dtype).max)[1]


def flat_update_(
    rule: UpdateRule,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    buffers: State,
    offsets: Sequence[int],
    *,
    lr: float,
    loss: Tensor | None,
    maximize: bool,
    compute_dtype: torch.dtype,
    chunk: int = DEFAULT_CHUNK,
    before_write: Callable[[], None] | None = None,
) -> None:
    """The batched path: run the rule over all coordinates of many tensors in cache-sized chunks.

    The states of all tensors live in flat buffers: ``buffers[name]`` has shape
    ``spec.shape(N)`` and parameter ``i``'s state is its slice ``offsets[i]:offsets[i] +
    params[i].numel()`` along the coordinate dimension ``len(spec.lead)`` (``buffers[name][:,
    offsets[i]:offsets[i] + params[i].numel()]`` for one leading dimension). The coordinates of all tensors
    stepped run through the rule as one stream of chunks, so each LSTM layer is one matrix
    product per chunk however many tensors a chunk spans (:func:`grouped_flat_update_` of one
    segment).

    Args:
        params, grads: in increasing ``offsets`` order; gaps between them (parameters skipped this
            step) are left untouched.
        buffers, offsets: the flat states, updated in place.
        lr, loss, maximize, compute_dtype: as for :func:`single_tensor_update_`.
        chunk: coordinates per chunk.
        before_write: if given, called before each chunk's states (and, after the last chunk,
            the parameters) are written: an error raised before its first call changed nothing,
            one after it left earlier chunks' states stepped and later ones not.
    """
    segment = Segment(params, grads, buffers, offsets, lr, maximize)
    grouped_flat_update_(rule, [segment], loss=loss, compute_dtype=compute_dtype, chunk=chunk, before_write=before_write)


@dataclass
class Segment:
    """One param group's part of a :func:`grouped_flat_update_`: its parameters and gradients in
    increasing ``offsets`` order in its flat ``buffers`` (as :func:`flat_update_` takes them), and
    its own ``lr`` and ``maximize``."""

    params: Sequence[Tensor]
    grads: Sequence[Tensor]
    buffers: State
    offsets: Sequence[int]
    lr: float
    maximize: bool


def grouped_flat_update_(
    rule: UpdateRule,
    segments: Sequence[Segment],
    *,
    loss: Tensor | None,
    compute_dtype: torch.dtype,
    chunk: int = DEFAULT_CHUNK,
    before_write: Callable[[], None] | None = None,
) -> None:
    """:func:`flat_update_` of several param groups' parts in one stream of rule calls: the
    coordinates of every segment, each gradient signed by its own segment's ``maximize``, are
    concatenated and run through the rule in chunks of ``chunk`` (one call for many small groups,
    where :func:`flat_update_` per group makes one call each); each segment's states are gathered
    from and written back into its own buffers, and its parameters take ``param += lr * step`` with
    its own ``lr``.

    The rule's contract (coordinate ``i``'s step and states depend on row ``i`` of its inputs and
    the loss alone) makes this the per-segment :func:`flat_update_`: bit for bit where the rule
    computes its rows independently of the number of rows (the float32 CPU kernel of the LSTM
    step), to rounding otherwise. The loss is one for every segment: segments whose rule reads
    ``-loss`` (``maximize``) and those reading ``loss`` need separate calls.

    Args:
        segments: the parts; their buffers are distinct.
        loss, compute_dtype, chunk, before_write: as for :func:`flat_update_`.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    dims = {k: len(spec.lead) for k, spec in rule.state_spec().items()}
    # (segment, run, first coordinate in the buffers, coordinates): the pieces of the stream in order
    pieces: list[tuple[Segment, list[int], int, int]] = []
    # the pieces that are whole buffers (a group of one run, as one-tensor groups are), read and
    # written as they are rather than through one narrowed view per state
    whole: set[int] = set()
    for segment in segments:
        length = next((buf.shape[dims[k]] for k, buf in segment.buffers.items()), None)
        for run in _runs(segment.params, segment.offsets):
            total = sum(segment.params[i].numel() for i in run)
            if total:
                if segment.offsets[run[0]] == 0 and total == length:
                    whole.add(len(pieces))
                pieces.append((segment, run, segment.offsets[run[0]], total))
    if not pieces:
        return
    g = _flatten([_signed(s.grads[i], s.maximize) for s, run, _, _ in pieces for i in run], compute_dtype)
    p = _flatten([s.params[i].detach() for s, run, _, _ in pieces for i in run], compute_dtype)
    total = g.shape[0]
    step = torch.empty(total, dtype=compute_dtype, device=g.device)
    starts = list(itertools.accumulate((size for *_, size in pieces), initial=0))
    for a in range(0, total, chunk):
        b = min(a + chunk, total)
        # the state slices of the pieces [a, b) overlaps, in stream order
        first = bisect.bisect_right(starts, a) - 1
        views: list[State] = []
        sizes: list[int] = []
        for number in range(first, len(pieces)):
            segment, _, start, _ = pieces[number]
            lo, hi = max(a, starts[number]), min(b, starts[number + 1])
            if lo >= hi:
                break
            if number in whole and lo == starts[number] and hi == starts[number + 1]:
                views.append(segment.buffers)
            else:
                here = start + lo - starts[number]
                views.append({k: buf.narrow(dims[k], here, hi - lo) for k, buf in segment.buffers.items()})
            sizes.append(hi - lo)
        state = {
            k: views[0][k].to(compute_dtype) if len(views) == 1 else torch.cat([v[k].to(compute_dtype) for v in views], dim=dims[k])
            for k in dims
        }
        s, new_state = _padded_rule_call(rule, g[a:b], p[a:b], state, loss)
        if before_write is not None:
            before_write()
        for k in dims:
            parts = (new_state[k],) if len(views) == 1 else new_state[k].split(sizes, dim=dims[k])
            _store_all_([v[k] for v in views], list(parts))
        step[a:b] = s
    if before_write is not None and any(segment.lr != 0 for segment in segments):
        before_write()
    stepped = [(segment, segment.params[i]) for segment, run, _, _ in pieces for i in run]
    for (segment, param), part in zip(stepped, step.split([param.numel() for _, param in stepped]), strict=True):
        if segment.lr != 0:  # as in single_tensor_update_
            param.add_(part.view(param.shape), alpha=segment.lr)


#: Chunks are padded to a multiple of this many coordinates. PyTorch's CPU elementwise kernels
#: run the last ``numel % vector width`` elements through a scalar loop whose transcendental
#: functions (e.g. sigmoid's exp) can round differently from the vectorised ones; padding keeps
#: every coordinate on the vectorised path, so a coordinate's update does not depend on where it
#: falls in a chunk, and a step over a shard of the coordinates (FSDP) equals the unsharded step
#: bit for bit.
ROW_PAD = 64


def _padded_rule_call(
    rule: UpdateRule, grad: Tensor, param: Tensor, state: State, loss: Tensor | None
) -> tuple[Tensor, State]:
    """``rule(grad, param, state, loss)`` on ``(m,)`` coordinates, run on ``m`` rounded up to a
    multiple of :data:`ROW_PAD` (zero padding, results cut back to ``m``)."""
    m = grad.shape[0]
    extra = -m % ROW_PAD
    if extra == 0:
        return rule(grad, param, state, loss)
    dims = {k: len(spec.lead) for k, spec in rule.state_spec().items()}
    step, new_state = rule(
        _pad_along(grad, 0, extra),
        _pad_along(param, 0, extra),
        {k: _pad_along(v, dims[k], extra) for k, v in state.items()},
        loss,
    )
    return step[:m], {k: v.narrow(dims[k], 0, m) for k, v in new_state.items()}


def _pad_along(t: Tensor, dim: int, extra: int) -> Tensor:
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def _runs(params: Sequence[Tensor], offsets: Sequence[int]) -> list[list[int]]:
    """Indices of parameters grouped into runs that are contiguous in the flat buffers."""
    runs: list[list[int]] = []
    end = None
    for i, (param, offset) in enumerate(zip(params, offsets, strict=True)):
        if end is not None and offset < end:
            raise ValueError("parameters must be given in increasing, non-overlapping offset order")
        if end == offset and runs:
            runs[-1].append(i)
        else:
            runs.append([i])
        end = offset + param.numel()
    return runs


def _common_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """The tensors' dtype if they share one, else float32."""
    dtypes = {t.dtype for t in tensors}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _flatten(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    """One contiguous ``(sum numel,)`` vector; a view (no copy) when there is nothing to gather."""
    if len(tensors) == 1:
        return tensors[0].reshape(-1).to(dtype)
    return torch.cat([t.reshape(-1) if t.dtype == dtype else t.reshape(-1).to(dtype) for t in tensors])


def fused_update_(
    rule: CoordinateLSTM | MetaLSTMCell,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    buffers: State,
    offsets: Sequence[int],
    *,
    lr: float,
    maximize: bool,
    weights: object,
    block: int,
    loss: Tensor | float | None = None,
    done: list[int] | None = None,
) -> None:
    """The fused Triton path: :class:`CoordinateLSTM` (any feature set), or
    :class:`MetaLSTMCell`.

    Same layout and result as :func:`flat_update_` (fp32 math), but each run of adjacent
    parameters is one kernel launch that reads every gradient, parameter and state once and
    writes them once; gathering a multi-tensor run and scattering its result are one launch each.

    Args:
        weights: the rule's weights packed by its kernel module's ``pack_weights``
            (``learnedopt.kernels.coordinate_lstm_step`` or ``learnedopt.kernels.meta_lstm_step``)
            on the parameters' device.
        block: coordinates per kernel program.
        loss: the optimizee's scalar loss, for :class:`MetaLSTMCell` (ignored otherwise). Unlike
            :func:`flat_update_`'s, it is NOT pre-negated: under ``maximize`` the rule sees
            ``-grad`` and ``-loss``, the kernel negating both.
        done: if given, the indices into ``params`` of the tensors updated are appended to it as
            each run finishes, so that a caller whose launch failed part-way (a kernel variant that
            does not compile) can update the rest, and only the rest, another way.
    """
    launch = _fused_launcher(rule, lr=lr, maximize=maximize, weights=weights, block=block, loss=loss)
    for run in _runs(params, offsets):
        start = offsets[run[0]]
        total = sum(params[i].numel() for i in run)
        if total == 0:
            continue
        members = [params[i] for i in run]
        run_grads = [grads[i] for i in run]
        # one contiguous parameter is updated where it lies; otherwise gather, update, scatter
        in_place = len(run) == 1 and members[0].is_contiguous()
        flat_param = members[0].view(-1) if in_place else _flatten([p.detach() for p in members], _common_dtype(members)).contiguous()
        flat_grad = _flatten(run_grads, _common_dtype(run_grads)).contiguous()
        launch(flat_grad, flat_param, {k: buf[:, start : start + total] for k, buf in buffers.items()})
        if not in_place:
            pieces = flat_param.split([p.numel() for p in members])
            torch._foreach_copy_(members, [piece.view(p.shape) for piece, p in zip(pieces, members, strict=True)])
        if done is not None:
            done.extend(run)


def _fused_launcher(
    rule: UpdateRule, *, lr: float, maximize: bool, weights: object, block: int, loss: Tensor | float | None
) -> Callable[[Tensor, Tensor, State], None]:
    """``launch(grad, param, states)``: the rule's kernel, updating one flat ``(n,)`` range of
    coordinates in place (``param`` and the ``buffer[:, a:b]`` views in ``states``)."""
    if isinstance(rule, MetaLSTMCell):
        from ..kernels.meta_lstm_step import loss_features, meta_lstm_step_

        if loss is None:
            raise ValueError("MetaLSTMCell needs the optimizee's loss")
        cfg = rule.config
        # one value per step: preprocessed (and synced) once, not once per run
        features = loss_features(loss, cfg.preprocess_p, maximize=maximize)

        def launch(grad: Tensor, param: Tensor, states: State) -> None:
            meta_lstm_step_(
                grad, param, param, states["h"], states["c"], states["fi"], weights,
                loss=features, hidden_size=cfg.hidden_size, preprocess_p=cfg.preprocess_p,
                lr=lr, maximize=maximize, step_scale=cfg.step_scale, momentum_decay=cfg.momentum_decay,
                rms_decay=cfg.rms_decay, m=states.get("m"), v=states.get("v"), block=block,
            )  # fmt: skip

        return launch
    if isinstance(rule, CoordinateLSTM):
        from ..kernels.coordinate_lstm_step import coordinate_lstm_step_

        cfg = rule.config

        def launch(grad: Tensor, param: Tensor, states: State) -> None:
            coordinate_lstm_step_(
                grad, param, param, states["h"], states["c"], weights,
                num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, preprocess_p=cfg.preprocess_p,
                output_scale=cfg.output_scale, lr=lr, maximize=maximize,
                momentum_decays=cfg.momentum_decays, rms_decays=cfg.rms_decays,
                param_input=cfg.param_input, m=states.get("m"), v=states.get("v"), block=block,
            )  # fmt: skip

        return launch
    raise ValueError(f"no fused kernel for {type(rule).__name__}")
