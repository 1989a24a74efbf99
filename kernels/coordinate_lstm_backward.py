"""Differentiable step of the coordinatewise LSTM rule (:class:`learnedopt.nn.CoordinateLSTM`) for
meta-training: a Triton forward kernel, a Triton backward kernel, and the autograd wrapper.

Split. The rule is ``x, moments = rule.features(grad, param, state)`` (the preprocessed gradient,
momenta, rms-normalised gradients, the parameter: a few elementwise ops) followed by
``rule.step_from_features(x, h, c)`` (the LSTM stack and the head: nearly all of the work and of
the state traffic). The kernels here replace the second part only. The features stay in PyTorch,
where autograd differentiates them, so every feature set (``momentum_decays``, ``rms_decays``,
``param_input``) runs on the kernels with one kernel per direction and no feature-specific
derivative code; the price is writing and reading ``x`` (``4K`` bytes per coordinate each way,
``K`` = 2 to 11 features) beside the ~1.1 KB the backward must move anyway.

:func:`coordinate_lstm_step` computes ``(step, new_h, new_c) = rule.step_from_features(x, h,
c)`` NOT in place, as :class:`CoordinateLSTMStepFunction`, so that a meta-loss built on ``step``
and the new states back-propagates into

- the meta-parameters: every LSTM weight and bias (``bias_ih`` and ``bias_hh`` get the same
  gradient, they enter as a sum) and the head's weight and bias;
- the incoming states ``h`` and ``c``;
- the input features ``x`` (only when they require grad: without ``stop_optimizee_grad`` in the
  unroll, or with ``param_input``, whose parameter feature depends on earlier steps; autograd
  takes ``d x`` on through :meth:`~learnedopt.nn.CoordinateLSTM.features` to the gradient, the
  moments and the parameter, and the gradient's own graph carries the second-order terms).

It is FIRST-ORDER only: the backward is itself a Triton kernel that autograd cannot see through,
so a backward through it with ``create_graph=True`` (the first half of any double backward, e.g. a
Hessian-vector product through the rule) raises ``RuntimeError`` at once. (``once_differentiable``
alone would raise only when the incoming gradients require grad, and otherwise hand back
gradients that silently lack this function's second-order terms.) Meta-training needs only one
backward through each rule call; the optimizee's own ``create_graph`` gradients, taken
w.r.t. the parameters the rule produced, never run this backward. For the same reason it
refuses ``torch.func`` transforms (``grad``, ``vmap``, ...) and forward-mode dual tensors, each
with a ``RuntimeError`` that names the step (use ``torch.autograd.grad``, and a loop for ``vmap``).

Forward kernel. The LSTM math of :mod:`learnedopt.kernels.coordinate_lstm_step` (it reuses that
module's ``_preactivations`` and ``_cell``, with the portable activations), but layer 0 reads the ``K``
features as a zero-padded ``(BLOCK, KP)`` tile (``KP`` = ``K`` rounded up to a power of two >= 16,
``tl.dot``'s minimum) and projects them like any other layer input, and it writes the step (fp32,
``(N,)``) and the new states to fresh ``(L, N, H)`` fp32 tensors instead of updating the states
and the parameter in place: autograd needs the old states and must not see them change.

Save vs recompute. The forward saves nothing beyond tensors autograd keeps alive anyway: its
inputs (``x``, ``h``, ``c``), one of its outputs (``new_h``) and the packed weights. The
backward kernel recomputes each layer's gate pre-activations from the layer's input (``x`` for
layer 0, ``new_h[l - 1]`` above; the forward's fp32 values bit for bit) and its old ``h``, one
layer at a time. Saving the four gates instead would add ``4 L H`` floats per coordinate (twice
the state memory) to every unrolled step of a meta-training graph, and their store and reload
(``32 L H`` bytes per coordinate) to the traffic, to save one layer's products per layer (not
measured against each other: no GPU); recomputing from ``new_h`` rather than re-running the
stack from ``x`` keeps the extra work to one forward, not ``O(L^2)``.

Backward kernel. Each program walks tiles of ``BLOCK`` coordinates (tile ``pid``,
``pid + P``, ...; ``P`` programs, at most ``max_programs``), from the head down through the
layers: per layer it recomputes the gates, back-propagates through the cell, stores ``dh`` and
``dc`` of the old states, and passes ``d input = dpre @ W_ih`` to the layer below (for layer 0:
stores it as ``d x``, when ``x`` needs a gradient). All layers share one code path
(``_layer_backward``), layer 0 with ``K`` inputs and the others with ``H``. Per-coordinate
products use ``tl.dot`` or broadcast sums (``USE_DOT``, as in the forward). The weight gradients
are sums over coordinates, ``dW += dpre^T @ x``, always a ``tl.dot`` over the tile (``K = BLOCK``):
each program adds them into its OWN row of fp32 ``(P, ...)`` partial-sum buffers (read-modify-
write, so there are no atomics) and ``torch.sum`` over the ``P`` rows finishes the reduction: the
result is deterministic and does not depend on scheduling. Bounding ``P`` (a few programs per SM
on CUDA) keeps those buffers small enough to stay in L2 (``P x 20 KB`` for 2 layers of 20 units)
however large ``N`` is.

Scope. fp32 math; ``h`` and ``c`` must be float32 (a bfloat16-state variant would have to
recompute from rounded ``new_h`` or keep fp32 copies; not built); ``x`` may be float16,
bfloat16, float32 or float64 (read as fp32; its gradient is returned in its dtype). No
``maximize`` (negate the gradient before :meth:`~learnedopt.nn.CoordinateLSTM.features`) and no
``fast_tanh`` (the approximate tanh would make the gradients inconsistent with the forward to
~1e-3). Runs on CUDA tensors, or on CPU tensors in the Triton interpreter (``TRITON_INTERPRET=1``
set before import). Block sizes, warps and ``max_programs`` on the GPU are untuned defaults: no
GPU was available when this was written.

Register budget (H = 20 padded to 32, two layers, sm_90; an OFFLINE compile only, never run or
timed on a GPU): ``triton.compile(ASTSource(fn=..., signature=..., constexprs=...),
target=GPUTarget("cuda", 90, 32), options={"num_warps": w})`` with Triton 3.9
(``TRITON_INTERPRET`` unset), then its ``asm["ptx"]`` through the bundled ``ptxas-blackwell -v
--regAllocOptLevel=2 --gpu-name=sm_90a`` (Triton's own flags), reading "Used N registers" and the
stack frame. Measured on the feature-input kernels, for K = 2 and K = 10 alike (within 40 B):
the forward kernel at BLOCK 64 / 4 warps uses 255 registers and 408 B of stack; the backward
kernel 255 registers and 40 B at BLOCK 16 / 4 warps, 1.2 KB at 32 / 4 (the default: 3.2 KB of
spill stores, 4.6 KB of loads), 160-168 B at 32 / 8, 1.9 KB at 64 / 8, while 64 / 4 collapses to
32 registers and 12 KB ("32 registers" is ptxas -O3 giving up on the pressure; the PTX has no
``.maxnreg``). The backward runs gate by gate (both products and both weight-gradient dots of one
gate, then the next) because grouping by product kept all four gate gradients live: that order
spilled 9.8 KB at 32 / 4 in an earlier version of this kernel. BLOCK 16 / 4 warps nearly removes
the spill but doubles the partial-sum read-modify-writes per coordinate; the defaults stay 32 / 4,
untuned: profile on a GPU (``kernel_bench.py``) before relying on its speed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd import forward_ad
from torch.autograd.function import FunctionCtx

from ..values import check_bool, check_positive_integer
from .coordinate_lstm_step import (
    GRAD_DTYPES,
    INPUT_PRECISIONS,
    PackedWeights,
    _cell,
    _fp32_product_sum,
    _preactivations,
    _sigmoid,
    _tanh,
    _zero_padding,
    check_launch_device,
    check_packed,
    check_power_of_two,
    is_interpreted,
    pack_weights,
    packed_shapes,
    padded_hidden_size,
)

if TYPE_CHECKING:  # the configs are plain dataclasses; the kernels only read their fields
    from ..nn import CoordinateLSTMConfig

__all__ = [
    "CoordinateLSTMStepFunction",
    "KernelOptions",
    "coordinate_lstm_backward",
    "coordinate_lstm_forward",
    "coordinate_lstm_step",
]


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(ptr, rows, row_mask, K: tl.constexpr, KP: tl.constexpr):
    """Rows ``rows`` of a contiguous ``(N, K)`` tensor as a zero-padded fp32 ``(BLOCK, KP)`` tile."""
    cols = tl.arange(0, KP)
    mask = row_mask[:, None] & (cols < K)[None, :]
    return tl.load(ptr + rows[:, None] * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)


# ----------------------------------------------------------------------------------------------
# Forward kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def coordinate_lstm_forward_kernel(
    x_ptr,  # (N, K) any float, contiguous: the input features
    h_ptr,  # (L, N, H) fp32, contiguous: old states, read only
    c_ptr,  # (L, N, H) fp32, contiguous
    h_out_ptr,  # (L, N, H) fp32, contiguous: new states
    c_out_ptr,  # (L, N, H) fp32, contiguous
    step_ptr,  # (N,) fp32
    w_ih0_ptr,  # (4H, K)
    w_ih_ptr,  # (max(L - 1, 1), 4H, H)
    w_hh_ptr,  # (L, 4H, H)
    bias_ptr,  # (L, 4H): b_ih + b_hh
    head_w_ptr,  # (H,)
    head_b_ptr,  # (1,)
    n_coords,
    output_scale,
    NUM_LAYERS: tl.constexpr,
    K: tl.constexpr,
    KP: tl.constexpr,
    H: tl.constexpr,
    HP: tl.constexpr,
    USE_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    row_mask = rows < n_coords
    cols = tl.arange(0, HP)
    tile_mask = row_mask[:, None] & (cols < H)[None, :]
    tile = rows[:, None] * H + cols[None, :]
    # int64: L * N * H overflows int32 from about 50M coordinates at H = 20
    layer_stride = (pid.to(tl.int64) * 0 + n_coords) * H

    x = _load_rows(x_ptr, rows, row_mask, K, KP)
    h = tl.load(h_ptr + tile, mask=tile_mask, other=0.0)
    c = tl.load(c_ptr + tile, mask=tile_mask, other=0.0)
    pre_i, pre_f, pre_g, pre_o = _preactivations(
        x, h, w_ih0_ptr, w_hh_ptr, bias_ptr, K, KP, H, HP, USE_DOT, INPUT_PRECISION
    )
    h, c = _cell(pre_i, pre_f, pre_g, pre_o, c, False)
    h = _zero_padding(h, H, HP)
    tl.store(h_out_ptr + tile, h, mask=tile_mask)
    tl.store(c_out_ptr + tile, c, mask=tile_mask)

    for layer in tl.static_range(1, NUM_LAYERS):
        offset = layer * layer_stride + tile
        x = h
        h = tl.load(h_ptr + offset, mask=tile_mask, other=0.0)
        c = tl.load(c_ptr + offset, mask=tile_mask, other=0.0)
        pre_i, pre_f, pre_g, pre_o = _preactivations(
            x,
            h,
            w_ih_ptr + (layer - 1) * 4 * H * H,
            w_hh_ptr + layer * 4 * H * H,
            bias_ptr + layer * 4 * H,
            H,
            HP,
            H,
            HP,
            USE_DOT,
            INPUT_PRECISION,
        )
        h, c = _cell(pre_i, pre_f, pre_g, pre_o, c, False)
        h = _zero_padding(h, H, HP)
        tl.store(h_out_ptr + offset, h, mask=tile_mask)
        tl.store(c_out_ptr + offset, c, mask=tile_mask)

    head_w = tl.load(head_w_ptr + cols, mask=cols < H, other=0.0)
    step = (tl.sum(h * head_w[None, :], axis=1) + tl.load(head_b_ptr)) * output_scale
    tl.store(step_ptr + rows, step, mask=row_mask)


# ----------------------------------------------------------------------------------------------
# Backward kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _cell_backward(pre_i, pre_f, pre_g, pre_o, c, dh, dc):
    """Back through one LSTM cell: from ``d new_h`` and ``d new_c`` to the gate pre-activations'
    gradients and ``d old_c``; recomputes the gates from their pre-activations."""
    i = _sigmoid(pre_i, False)
    f = _sigmoid(pre_f, False)
    gg = _tanh(pre_g, False)
    o = _sigmoid(pre_o, False)
    c_new = f * c + i * gg
    tc = _tanh(c_new, False)
    dc = dc + dh * o * (1.0 - tc * tc)
    d_i = dc * gg * i * (1.0 - i)
    d_f = dc * c * f * (1.0 - f)
    d_g = dc * i * (1.0 - gg * gg)
    d_o = dh * tc * o * (1.0 - o)
    return d_i, d_f, d_g, d_o, dc * f


@triton.jit
def _project_back(
    d,
    w_ptr,
    gate: tl.constexpr,
    K: tl.constexpr,
    KP: tl.constexpr,
    H: tl.constexpr,
    HP: tl.constexpr,
    USE_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """``d @ W[gate*H:(gate+1)*H, :]`` for a row-major ``(4H, K)`` ``W``: ``(BLOCK, HP)`` in,
    ``(BLOCK, KP)`` out."""
    j = tl.arange(0, HP)[:, None]  # the gate's unit: row of the block
    k = tl.arange(0, KP)[None, :]  # input
    w = tl.load(w_ptr + (gate * H + j) * K + k, mask=(j < H) & (k < K), other=0.0)
    if USE_DOT:
        y = tl.dot(d, w, input_precision=INPUT_PRECISION)
    else:
        y = _fp32_product_sum(d, w)
    return y


@triton.jit
def _add_outer(
    part_ptr,
    d,
    x,
    gate: tl.constexpr,
    K: tl.constexpr,
    KP: tl.constexpr,
    H: tl.constexpr,
    HP: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """``part[gate*H + j, k] += sum_n d[n, j] x[n, k]`` in a row-major ``(4H, K)`` partial sum."""
    j = tl.arange(0, HP)[:, None]
    k = tl.arange(0, KP)[None, :]
    ptrs = part_ptr + (gate * H + j) * K + k
    mask = (j < H) & (k < K)
    update = tl.dot(tl.trans(d), x, input_precision=INPUT_PRECISION)
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + update, mask=mask)


@triton.jit
def _add_vector(ptr, v, mask):
    tl.store(ptr, tl.load(ptr, mask=mask, other=0.0) + v, mask=mask)


@triton.jit
def _gate_backward(
    d,
    gate: tl.constexpr,
    x,
    h,
    d_x,
    d_h,
    w_ih_ptr,
    w_hh_ptr,
    part_ih_ptr,
    part_hh_ptr,
    part_bias_ptr,
    K: tl.constexpr,
    KP: tl.constexpr,
    H: tl.constexpr,
    HP: tl.constexpr,
    USE_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    NEED_D_X: tl.constexpr,
):
    """One gate's share of a layer's backward, from its pre-activation gradient ``d``: adds to
    the weight and bias partial sums, and returns ``d_x`` and ``d_h`` with its terms added."""
    cols = tl.arange(0, HP)
    _add_vector(part_bias_ptr + gate * H + cols, tl.sum(d, axis=0), cols < H)
    _add_outer(part_ih_ptr, d, x, gate, K, KP, H, HP, INPUT_PRECISION)
    _add_outer(part_hh_ptr, d, h, gate, H, HP, H, HP, INPUT_PRECISION)
    d_h += _project_back(d, w_hh_ptr, gate, H, HP, H, HP, USE_DOT, INPUT_PRECISION)
    if NEED_D_X:
        d_x += _project_back(d, w_ih_ptr, gate, K, KP, H, HP, USE_DOT, INPUT_PRECISION)
    return d_x, d_h


@triton.jit
def _layer_backward(
    x,
    h,
    c,
    dh,
    dc,
    w_ih_ptr,
    w_hh_ptr,
    bias_ptr,
    part_ih_ptr,
    part_hh_ptr,
    part_bias_ptr,
    K: tl.constexpr,
    KP: tl.constexpr,
    H: tl.constexpr,
    HP: tl.constexpr,
    USE_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    NEED_D_X: tl.constexpr,
):
    """Back through one layer from ``d new_h`` and ``d new_c``: recomputes its gates from ``x``
    and the old ``h`` and ``c``, adds its weight gradients to the partial sums and returns
    ``(d x, d old_h, d old_c)`` (``d x`` is zero unless ``NEED_D_X``).

    Gate by gate (both products and both weight-gradient dots of one gate, then the next), so
    that one gate's dot operands are live at a time; see "Register budget" in the module
    docstring. Every sum keeps the gate order i, f, g, o.
    """
    pre_i, pre_f, pre_g, pre_o = _preactivations(
        x, h, w_ih_ptr, w_hh_ptr, bias_ptr, K, KP, H, HP, USE_DOT, INPUT_PRECISION
    )
    d_i, d_f, d_g, d_o, dc = _cell_backward(pre_i, pre_f, pre_g, pre_o, c, dh, dc)
    d_x = tl.zeros_like(x)
    d_h = tl.zeros_like(h)
    for gate in tl.static_range(4):
        d = d_i if gate == 0 else (d_f if gate == 1 else (d_g if gate == 2 else d_o))
        d_x, d_h = _gate_backward(
            d,
            gate,
            x,
            h,
            d_x,
            d_h,
            w_ih_ptr,
            w_hh_ptr,
            part_ih_ptr,
            part_hh_ptr,
            part_bias_ptr,
            K,
            KP,
            H,
            HP,
            USE_DOT,
            INPUT_PRECISION,
            NEED_D_X,
        )
    return d_x, d_h, dc


@triton.jit
def _input_layer_backward(
    x_ptr,
    h_ptr,
    c_ptr,
    d_x_ptr,
    d_h_ptr,
    d_c_ptr,
    rows,
    row_mask,
    tile,
    tile_mask,
    dh,
    dc,
    w_ih_ptr,
    w_hh_ptr,
    bias_ptr,
    part_ih_ptr,
    part_hh_ptr,
    part_bias_ptr,
    K: tl.constexpr,
    KP: tl.constexpr,
    H: tl.constexpr,
    HP: tl.constexpr,
    USE_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    STORE_D_X: tl.constexpr,
):
    """:func:`_layer_backward` of the layer that reads the ``(N, K)`` features ``x``, loading its
    inputs and storing ``d c`` and ``d h`` of its old states and (``STORE_D_X``) ``d x``."""
    dx, dh_old, dc = _layer_backward(
        _load_rows(x_ptr, rows, row_mask, K, KP),
        tl.load(h_ptr + tile, mask=tile_mask, other=0.0),
        tl.load(c_ptr + tile, mask=tile_mask, other=0.0),
        dh,
        dc,
        w_ih_ptr,
        w_hh_ptr,
        bias_ptr,
        part_ih_ptr,
        part_hh_ptr,
        part_bias_ptr,
        K,
        KP,
        H,
        HP,
        USE_DOT,
        INPUT_PRECISION,
        STORE_D_X,
    )
    tl.store(d_c_ptr + tile, dc, mask=tile_mask)
    tl.store(d_h_ptr + tile, dh_old, mask=tile_mask)
    if STORE_D_X:
        feats = tl.arange(0, KP)
        tl.store(
            d_x_ptr + rows[:, None] * K + feats[None, :],
            dx,
            mask=row_mask[:, None] & (feats < K)[None, :],
        )


@triton.jit
def coordinate_lstm_backward_kernel(
    x_ptr,  # (N, K) any float, contiguous: the forward's input features
    h_ptr,  # (L, N, H) fp32, contiguous: the forward's old states
    c_ptr,  # (L, N, H) fp32
    h_new_ptr,  # (L, N, H) fp32: the forward's new h (layer inputs, top layer for the head)
    d_step_ptr,  # (N,) fp32: incoming gradients
    d_h_new_ptr,  # (L, N, H) fp32, contiguous
    d_c_new_ptr,  # (L, N, H) fp32, contiguous
    d_x_ptr,  # (N, K) fp32 out (written only when STORE_D_X)
    d_h_ptr,  # (L, N, H) fp32 out
    d_c_ptr,  # (L, N, H) fp32 out
    w_ih0_ptr,  # (4H, K)
    w_ih_ptr,  # (max(L - 1, 1), 4H, H)
    w_hh_ptr,  # (L, 4H, H)
    bias_ptr,  # (L, 4H)
    head_w_ptr,  # (H,)
    part_ih0_ptr,  # (P, 4H, K) fp32 zeros: per-program partial sums, accumulated in place
    part_ih_ptr,  # (P, max(L - 1, 1), 4H, H)
    part_hh_ptr,  # (P, L, 4H, H)
    part_bias_ptr,  # (P, L, 4H)
    part_head_w_ptr,  # (P, H)
    part_head_b_ptr,  # (P,)
    n_coords,
    num_programs,
    part_ih_stride,  # max(L - 1, 1) * 4H * H
    output_scale,
    NUM_LAYERS: tl.constexpr,
    K: tl.constexpr,
    KP: tl.constexpr,
    H: tl.constexpr,
    HP: tl.constexpr,
    USE_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    STORE_D_X: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    pid64 = pid.to(tl.int64)
    cols = tl.arange(0, HP)
    col_mask = cols < H
    layer_stride = (pid64 * 0 + n_coords) * H  # int64
    # this program's rows of the partial-sum buffers
    part_ih0 = part_ih0_ptr + pid64 * (4 * H * K)
    part_ih = part_ih_ptr + pid64 * part_ih_stride
    part_hh = part_hh_ptr + pid64 * (NUM_LAYERS * 4 * H * H)
    part_bias = part_bias_ptr + pid64 * (NUM_LAYERS * 4 * H)
    part_head_w = part_head_w_ptr + pid64 * H
    head_w = tl.load(head_w_ptr + cols, mask=col_mask, other=0.0)

    for t in range(pid, tl.cdiv(n_coords, BLOCK), num_programs):
        # int64; written so because t is a plain int in the interpreter
        rows = (pid64 * 0 + t) * BLOCK + tl.arange(0, BLOCK)
        row_mask = rows < n_coords
        tile_mask = row_mask[:, None] & col_mask[None, :]
        tile = rows[:, None] * H + cols[None, :]
        # Rows past N load zero incoming gradients, so every gradient they produce is zero and
        # they add nothing to the weight sums.

        # ---- head: step = s * (w . h_top + b)
        ds = tl.load(d_step_ptr + rows, mask=row_mask, other=0.0) * output_scale
        top = (NUM_LAYERS - 1) * layer_stride + tile
        h_top = tl.load(h_new_ptr + top, mask=tile_mask, other=0.0)
        _add_vector(part_head_w + cols, tl.sum(ds[:, None] * h_top, axis=0), col_mask)
        tl.store(part_head_b_ptr + pid64, tl.load(part_head_b_ptr + pid64) + tl.sum(ds, axis=0))
        dh = ds[:, None] * head_w[None, :]  # d new_h of the current layer, from above

        # ---- layers L-1 .. 1, top down; each layer's input is the new h of the layer below
        for k in tl.static_range(NUM_LAYERS - 1):
            layer = NUM_LAYERS - 1 - k
            offset = layer * layer_stride + tile
            dh += tl.load(d_h_new_ptr + offset, mask=tile_mask, other=0.0)
            dc = tl.load(d_c_new_ptr + offset, mask=tile_mask, other=0.0)
            dh, dh_old, dc = _layer_backward(
                tl.load(h_new_ptr + (layer - 1) * layer_stride + tile, mask=tile_mask, other=0.0),
                tl.load(h_ptr + offset, mask=tile_mask, other=0.0),
                tl.load(c_ptr + offset, mask=tile_mask, other=0.0),
                dh,
                dc,
                w_ih_ptr + (layer - 1) * 4 * H * H,
                w_hh_ptr + layer * 4 * H * H,
                bias_ptr + layer * 4 * H,
                part_ih + (layer - 1) * 4 * H * H,
                part_hh + layer * 4 * H * H,
                part_bias + layer * 4 * H,
                H,
                HP,
                H,
                HP,
                USE_DOT,
                INPUT_PRECISION,
                True,
            )
            tl.store(d_c_ptr + offset, dc, mask=tile_mask)
            tl.store(d_h_ptr + offset, dh_old, mask=tile_mask)
            dh = _zero_padding(dh, H, HP)

        # ---- layer 0: the input features
        dh += tl.load(d_h_new_ptr + tile, mask=tile_mask, other=0.0)
        dc = tl.load(d_c_new_ptr + tile, mask=tile_mask, other=0.0)
        _input_layer_backward(
            x_ptr,
            h_ptr,
            c_ptr,
            d_x_ptr,
            d_h_ptr,
            d_c_ptr,
            rows,
            row_mask,
            tile,
            tile_mask,
            dh,
            dc,
            w_ih0_ptr,
            w_hh_ptr,
            bias_ptr,
            part_ih0,
            part_hh,
            part_bias,
            K,
            KP,
            H,
            HP,
            USE_DOT,
            INPUT_PRECISION,
            STORE_D_X,
        )
        # the next tile's read-modify-write of the partial sums must see this one's stores from
        # every thread of the program
        tl.debug_barrier()


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelOptions:
    """Launch options of the forward and backward kernels.

    Attributes:
        use_dot: ``tl.dot`` (True) or broadcast multiply + sum for the per-coordinate products
            (the backward's weight-gradient sums always use ``tl.dot``).
        block: coordinates per forward program, a power of two >= 16; ``None``: 1024 in the
            interpreter, 64 on GPUs (capped at the next power of two above ``N``).
        backward_block: coordinates per backward tile; ``None``: 1024 in the interpreter, 32 on
            GPUs (it holds more live tiles than the forward; untuned).
        num_warps: warps per program (GPU only).
        input_precision: ``tl.dot`` precision for fp32 operands: "ieee" (exact fp32), "tf32x3"
            or "tf32".
        max_programs: most backward programs ``P`` (each owns one row of the weight-gradient
            partial sums); ``None``: 4 per SM on CUDA, one per tile in the interpreter.
    """

    use_dot: bool = True
    block: int | None = None
    backward_block: int | None = None
    num_warps: int = 4
    input_precision: str = "ieee"
    max_programs: int | None = None

    def __post_init__(self) -> None:
        # integers, not bools or floats: 32.0 failed the power-of-two test with a TypeError, and
        # max_programs=2.5 passed here and failed at the first backward
        check_bool("use_dot", self.use_dot)
        for name in ("block", "backward_block"):
            if getattr(self, name) is not None:
                check_power_of_two(name, getattr(self, name), 16)
        check_power_of_two("num_warps", self.num_warps)
        if self.input_precision not in INPUT_PRECISIONS:
            raise ValueError(
                f"input_precision must be one of {INPUT_PRECISIONS}, got {self.input_precision!r}"
            )
        if self.max_programs is not None:
            check_positive_integer("max_programs", self.max_programs)


def _block(requested: int | None, gpu_default: int, n: int) -> int:
    block = requested or (1024 if is_interpreted() else gpu_default)
    # tiny inputs: no point computing (and, in the interpreter, paying for) empty rows
    return min(block, max(16, triton.next_power_of_2(max(n, 1))))


def _backward_grid(options: KernelOptions, n: int, device: torch.device) -> tuple[int, int]:
    """``(BLOCK, P)`` of a backward launch over ``n`` coordinates: ``P`` programs walk the tiles,
    at most ``options.max_programs`` (default 4 per SM on CUDA, one per tile elsewhere)."""
    block = _block(options.backward_block, 32, n)
    tiles = triton.cdiv(n, block)
    limit = options.max_programs
    if limit is None and device.type == "cuda":
        limit = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return block, max(1, min(tiles, limit or tiles))


def _check_fp32_state(name: str, t: Tensor, shape: tuple[int, ...], layout: str = "") -> None:
    """Raise ``ValueError`` unless the state ``t`` is a float32 tensor of ``shape`` (``layout``
    names its dimensions in the message)."""
    if not isinstance(t, Tensor) or tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {layout}{shape}, got {getattr(t, 'shape', type(t))}")
    if t.dtype != torch.float32:
        raise ValueError(
            f"{name} must be float32 for the differentiable kernel (bfloat16 states are "
            f"supported only by the in-place optimizer step), got {t.dtype}"
        )


def _refuse_double_backward(step_name: str) -> None:
    """Raise ``RuntimeError`` when a backward runs with ``create_graph=True``: the backward
    kernels are opaque to autograd, so their own derivatives would be missing."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"the Triton {step_name} step is differentiable to first order only: its backward "
            "cannot run with create_graph=True (double backward, Hessian-vector products); use "
            "the PyTorch path (backend='torch') for higher-order gradients"
        )


def _refuse_transforms(step_name: str, tensors: Sequence[object]) -> None:
    """Raise ``RuntimeError`` under a ``torch.func`` transform or for a forward-mode dual among
    ``tensors`` (other values are left to the input checks): the step is a classic
    ``autograd.Function`` whose first-order backward is a kernel, and PyTorch's own errors there
    address the function's author."""
    if torch._C._are_functorch_transforms_active():
        raise RuntimeError(
            f"the Triton {step_name} step does not run under torch.func transforms (grad, vmap, "
            "jvp, jacrev): its backward is a first-order kernel in a classic "
            "torch.autograd.Function; use torch.autograd.grad, and a loop instead of vmap"
        )
    if any(isinstance(t, Tensor) and forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise RuntimeError(
            f"the Triton {step_name} step has no forward-mode derivative "
            "(torch.autograd.forward_ad dual tensors): use torch.autograd.grad"
        )


def _check_inputs(x: Tensor, h: Tensor, c: Tensor, packed: PackedWeights) -> tuple[int, int]:
    """Validate; returns ``(L, H)``."""
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(
            f"x must be a 2-D (N, K) tensor of input features, got {getattr(x, 'shape', type(x))}"
        )
    if x.dtype not in GRAD_DTYPES:
        raise ValueError(f"x dtype must be one of {GRAD_DTYPES}, got {x.dtype}")
    if not isinstance(packed.w_hh, Tensor) or packed.w_hh.dim() != 3:
        raise ValueError(
            f"packed weights' w_hh must be (L, 4H, H), got {getattr(packed.w_hh, 'shape', type(packed.w_hh))}"
        )
    num_layers, _, hidden = packed.w_hh.shape
    # the friendlier error for a 2-D w_ih0 of other columns; check_packed refuses every other shape
    if isinstance(packed.w_ih0, Tensor) and packed.w_ih0.dim() == 2 and x.shape[1] != packed.w_ih0.shape[1]:
        raise ValueError(
            f"x has {x.shape[1]} features per coordinate but the weights take "
            f"{packed.w_ih0.shape[1]} inputs (the rule's config.num_inputs)"
        )
    check_packed(packed, packed_shapes(num_layers, hidden, x.shape[1]))
    for name, t in (("h", h), ("c", c)):
        _check_fp32_state(name, t, (num_layers, x.shape[0], hidden), "(L, N, H) = ")
    check_launch_device({"x": x, "h": h, "c": c, **packed._asdict()})
    return num_layers, hidden


def _sizes(num_layers: int, x: Tensor, hidden: int) -> dict[str, int]:
    """The kernels' size constants."""
    k = x.shape[1]
    return {
        "NUM_LAYERS": num_layers,
        "K": k,
        "KP": padded_hidden_size(k),
        "H": hidden,
        "HP": padded_hidden_size(hidden),
    }


def coordinate_lstm_forward(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    packed: PackedWeights,
    *,
    output_scale: float,
    options: KernelOptions = KernelOptions(),
) -> tuple[Tensor, Tensor, Tensor]:
    """The rule's LSTM stack and head over ``N`` coordinates, not in place (no autograd: see
    :func:`coordinate_lstm_step`).

    Args:
        x: ``(N, K)`` input features (:meth:`CoordinateLSTM.features`), float16/bfloat16/
            float32/float64 (read as fp32; made contiguous if it is not).
        h, c: ``(L, N, H)`` float32 old states (made contiguous if they are not).
        packed: :func:`pack_weights` of the rule's parameters (fp32, ``num_inputs=K``).
        output_scale: the head's output multiplier.
        options: launch options.

    Returns:
        ``step (N,)``, ``new_h (L, N, H)``, ``new_c (L, N, H)``, all float32 and contiguous.
    """
    num_layers, hidden = _check_inputs(x, h, c, packed)
    x, h, c = x.contiguous(), h.contiguous(), c.contiguous()
    n = x.shape[0]
    step = torch.empty(n, dtype=torch.float32, device=x.device)
    h_new, c_new = torch.empty_like(h), torch.empty_like(c)
    if n == 0:
        return step, h_new, c_new
    block = _block(options.block, 64, n)
    coordinate_lstm_forward_kernel[(triton.cdiv(n, block),)](
        x,
        h,
        c,
        h_new,
        c_new,
        step,
        *(t.detach() for t in packed),
        n,
        float(output_scale),
        **_sizes(num_layers, x, hidden),
        USE_DOT=options.use_dot,
        INPUT_PRECISION=options.input_precision,
        BLOCK=block,
        num_warps=options.num_warps,
    )
    return step, h_new, c_new


def coordinate_lstm_backward(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    h_new: Tensor,
    packed: PackedWeights,
    d_step: Tensor,
    d_h_new: Tensor,
    d_c_new: Tensor,
    *,
    output_scale: float,
    need_d_x: bool = True,
    options: KernelOptions = KernelOptions(),
) -> tuple[Tensor | None, Tensor, Tensor, PackedWeights]:
    """Gradients of one forward (:func:`coordinate_lstm_forward`) from those of its outputs.

    Args:
        x, h, c: the forward's inputs (``(N, K)``, ``(L, N, H)`` float32).
        h_new: the forward's ``new_h`` ``(L, N, H)``.
        packed: the forward's packed weights.
        d_step: ``(N,)``; d_h_new, d_c_new: ``(L, N, H)``: gradients of the outputs (any float
            dtype, converted to contiguous fp32).
        output_scale: as in the forward.
        need_d_x: compute the gradient of ``x`` (else ``None`` is returned for it).
        options: launch options (``backward_block``, ``max_programs``, ``use_dot``, ...).

    Returns:
        ``d_x`` (``(N, K)`` in ``x``'s dtype, or ``None``), ``d_h``, ``d_c`` ``(L, N, H)``
        float32, and the weights' gradients as a :class:`PackedWeights` (``bias``'s gradient is
        that of ``bias_ih`` and of ``bias_hh``; ``w_ih``'s is zero when ``L == 1``).
    """
    num_layers, hidden = _check_inputs(x, h, c, packed)
    n = x.shape[0]
    shape = (num_layers, n, hidden)
    if (
        tuple(h_new.shape) != shape
        or tuple(d_h_new.shape) != shape
        or tuple(d_c_new.shape) != shape
    ):
        raise ValueError(f"h_new, d_h_new and d_c_new must have shape {shape}")
    if tuple(d_step.shape) != (n,):
        raise ValueError(f"d_step must have shape ({n},), got {tuple(d_step.shape)}")
    device = check_launch_device(
        {"x": x, "h_new": h_new, "d_step": d_step, "d_h_new": d_h_new, "d_c_new": d_c_new}
    )
    f32 = {"dtype": torch.float32, "device": device}
    x, h, c = x.contiguous(), h.contiguous(), c.contiguous()
    h_new = h_new.contiguous().float()
    d_step = d_step.contiguous().float()
    d_h_new = d_h_new.contiguous().float()
    d_c_new = d_c_new.contiguous().float()
    d_x = torch.empty(x.shape, **f32) if need_d_x else None
    d_h, d_c = torch.empty(shape, **f32), torch.empty(shape, **f32)

    block, programs = _backward_grid(options, n, device)
    weights = [t.detach() for t in packed]
    parts = [torch.zeros((programs, *t.shape), **f32) for t in weights]
    part_head_b = parts[5].view(programs)
    if n > 0:
        coordinate_lstm_backward_kernel[(programs,)](
            x,
            h,
            c,
            h_new,
            d_step,
            d_h_new,
            d_c_new,
            d_x if need_d_x else d_step,  # a placeholder pointer, never written
            d_h,
            d_c,
            *weights[:5],
            *parts[:5],
            part_head_b,
            n,
            programs,
            parts[1].stride(0),
            float(output_scale),
            **_sizes(num_layers, x, hidden),
            USE_DOT=options.use_dot,
            INPUT_PRECISION=options.input_precision,
            STORE_D_X=need_d_x,
            BLOCK=block,
            num_warps=options.num_warps,
        )
    # a fixed-order sum over the programs' rows: deterministic
    d_weights = PackedWeights(*(part.sum(dim=0) for part in parts))
    if d_x is not None:
        d_x = d_x.to(x.dtype)
    return d_x, d_h, d_c, d_weights


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------


class CoordinateLSTMStepFunction(torch.autograd.Function):
    """``(step, new_h, new_c)`` of the coordinatewise LSTM rule's LSTM stack and head, Triton
    forward and backward.

    Inputs to :meth:`apply`: ``x (N, K)``, ``h, c (L, N, H)`` fp32, the six
    :class:`PackedWeights` tensors (``w_ih0, w_ih, w_hh, bias, head_w, head_b``), then
    ``output_scale`` and a :class:`KernelOptions`. First-order only: the backward raises
    ``RuntimeError`` under ``create_graph=True``. Prefer :func:`coordinate_lstm_step`.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        h: Tensor,
        c: Tensor,
        w_ih0: Tensor,
        w_ih: Tensor,
        w_hh: Tensor,
        bias: Tensor,
        head_w: Tensor,
        head_b: Tensor,
        output_scale: float,
        options: KernelOptions,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``step (N,)``, ``new_h, new_c (L, N, H)`` (float32) of :func:`coordinate_lstm_forward`
        on ``x (N, K)``, ``h, c (L, N, H)`` and the six :class:`PackedWeights` tensors; saves the
        inputs and ``new_h`` for :meth:`backward`."""
        packed = PackedWeights(w_ih0, w_ih, w_hh, bias, head_w, head_b)
        step, h_new, c_new = coordinate_lstm_forward(
            x, h, c, packed, output_scale=output_scale, options=options
        )
        ctx.save_for_backward(x, h, c, h_new, *packed)
        ctx.constants = (output_scale, options)
        return step, h_new, c_new

    @staticmethod
    def backward(
        ctx: FunctionCtx, d_step: Tensor, d_h_new: Tensor, d_c_new: Tensor
    ) -> tuple[Tensor | None, ...]:
        """Gradients of :meth:`forward`'s inputs, in their order, from ``d_step (N,)`` and
        ``d_h_new, d_c_new (L, N, H)`` (:func:`coordinate_lstm_backward`): ``d_x (N, K)`` (``None``
        unless ``x`` needs it), ``d_h, d_c (L, N, H)``, the six weights' (each of its weight's
        shape), and ``None`` for ``output_scale`` and ``options``.

        Raises:
            RuntimeError: under ``create_graph=True`` (first order only).
        """
        _refuse_double_backward("coordinate-LSTM")  # create_graph=True: a double backward
        x, h, c, h_new, *weights = ctx.saved_tensors
        output_scale, options = ctx.constants
        d_x, d_h, d_c, d_weights = coordinate_lstm_backward(
            x,
            h,
            c,
            h_new,
            PackedWeights(*weights),
            d_step,
            d_h_new,
            d_c_new,
            output_scale=output_scale,
            need_d_x=ctx.needs_input_grad[0],
            options=options,
        )
        return (d_x, d_h, d_c, *d_weights, None, None)


def coordinate_lstm_step(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    weights: Mapping[str, Tensor] | PackedWeights,
    config: CoordinateLSTMConfig,
    *,
    options: KernelOptions | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Differentiable ``CoordinateLSTM.step_from_features`` by Triton kernels.

    Equal (to fp32 rounding) to ``rule.step_from_features(x, h, c)`` of a
    :class:`~learnedopt.nn.CoordinateLSTM` ``rule`` with ``config`` and these weights, and
    differentiable (first order) with respect to ``x``, ``h``, ``c`` and the weights. With
    ``x, moments = rule.features(grad, param, state)`` in front (PyTorch, differentiated by
    autograd) it is the rule's whole forward, for every feature set.

    Args:
        x: ``(N, K)`` input features, ``K = config.num_inputs`` (float16/bfloat16/float32/
            float64, computed in fp32).
        h, c: ``(L, N, H)`` float32 states.
        weights: the rule's parameters by ``state_dict`` name, fp32 and contiguous, e.g.
            ``dict(rule.named_parameters())`` (NOT :func:`rule_weights`, which detaches), or
            their :func:`pack_weights` result.
        config: the rule's :class:`~learnedopt.nn.CoordinateLSTMConfig`.
        options: launch options (default :class:`KernelOptions`).

    Returns:
        ``step (N,)``, ``new_h (L, N, H)``, ``new_c (L, N, H)``, float32: the rule's step (add
        ``lr * step`` to the parameter) and new states.

    Raises:
        ValueError: for a shape, dtype or device the kernels do not take (CPU without the
            interpreter), or weights that do not fit ``config``.
    """
    _refuse_transforms("coordinate-LSTM", [x, h, c, *(weights if isinstance(weights, PackedWeights) else weights.values())])
    packed = (
        weights
        if isinstance(weights, PackedWeights)
        else pack_weights(
            weights,
            num_layers=config.num_layers,
            hidden_size=config.hidden_size,
            num_inputs=config.num_inputs,
        )
    )
    expected = (config.num_layers, 4 * config.hidden_size, config.hidden_size)
    # weights of other sizes named here; of another rank, refused by the forward's check_packed
    ranked = all(isinstance(t, Tensor) and t.dim() == d for t, d in ((packed.w_hh, 3), (packed.w_ih0, 2)))
    if ranked and (packed.w_hh.shape != expected or packed.w_ih0.shape[1] != config.num_inputs):
        raise ValueError(
            f"packed weights are for L={packed.w_hh.shape[0]}, H={packed.w_hh.shape[2]}, "
            f"K={packed.w_ih0.shape[1]} inputs, not L={config.num_layers}, "
            f"H={config.hidden_size}, K={config.num_inputs}"
        )
    return CoordinateLSTMStepFunction.apply(
        x, h, c, *packed, float(config.output_scale), options or KernelOptions()
    )
