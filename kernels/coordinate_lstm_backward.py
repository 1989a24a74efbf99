"""Differentiable step of the coordinatewise LSTM rule (:class:`learnedopt.nn.CoordinateLSTM`) for
meta-training: a Triton forward kernel, a Triton backward kernel, and the autograd wrapper.

:func:`coordinate_lstm_step` computes ``(step, new_h, new_c) = CoordinateLSTM.forward(grad, _,
{h, c})`` for the default feature set (the preprocessed gradient alone, ``num_inputs == 2``), NOT
in place, as :class:`CoordinateLSTMStepFunction`, so that a meta-loss built on ``step`` and the new
states back-propagates into

- the meta-parameters: every LSTM weight and bias (``bias_ih`` and ``bias_hh`` get the same
  gradient, they enter as a sum) and the head's weight and bias;
- the incoming states ``h`` and ``c``;
- the gradient input ``grad`` (only when it requires grad, e.g. the meta-training unroll without
  ``stop_optimizee_grad``; its own graph then carries the second-order terms).

It is FIRST-ORDER only: the backward is itself a Triton kernel that autograd cannot see through,
so a backward through it with ``create_graph=True`` (the first half of any double backward, e.g. a
Hessian-vector product through the rule) raises ``RuntimeError`` at once. (``once_differentiable``
alone would raise only when the incoming gradients require grad, and otherwise hand back
gradients that silently lack this function's second-order terms.) Meta-training needs only one
backward through each rule call; the optimizee's own ``create_graph`` gradients, taken
w.r.t. the parameters the rule produced, never run this backward.

Forward kernel. The math of :mod:`learnedopt.kernels.coordinate_lstm_step` (it reuses that
module's ``_project`` and ``_cell``, with the portable activations), but it writes the step
(fp32, ``(N,)``) and the new states to fresh ``(L, N, H)`` fp32 tensors instead of updating the
states and the parameter in place: autograd needs the old states and must not see them change.

Save vs recompute. The forward saves nothing beyond tensors autograd keeps alive anyway: its
inputs (``grad``, ``h``, ``c``), one of its outputs (``new_h``) and the packed weights. The
backward kernel recomputes each layer's gate pre-activations from the layer's input (the
preprocessed gradient for layer 0, ``new_h[l - 1]`` above; the forward's fp32 values bit for
bit) and its old ``h``, one layer at a time. Saving the four gates instead would add ``4 L H``
floats per coordinate (twice the state memory) to every unrolled step of a meta-training graph,
and their store and reload (``32 L H`` bytes per coordinate) to the traffic, to save one layer's
products per layer (not measured against each other: no GPU); recomputing from ``new_h`` rather
than re-running the stack from the gradient keeps the extra work to one forward, not ``O(L^2)``.

Backward kernel. Each program walks tiles of ``BLOCK`` coordinates (tile ``pid``,
``pid + P``, ...; ``P`` programs, at most ``max_programs``), from the head down through the
layers: per layer it recomputes the gates, back-propagates through the cell, stores ``dh`` and
``dc`` of the old states, and passes ``d input = dpre @ W_ih`` to the layer below (for layer 0,
through the preprocessing's derivative into ``d grad``, with torch's conventions at the kinks:
``clamp`` passes the gradient at its bounds, ``abs`` has derivative 0 at 0). Per-coordinate
products use ``tl.dot`` or broadcast sums (``USE_DOT``, as in the forward). The weight gradients
are sums over coordinates, ``dW += dpre^T @ x``, always a ``tl.dot`` over the tile (``K = BLOCK``):
each program adds them into its OWN row of fp32 ``(P, ...)`` partial-sum buffers (read-modify-
write, so there are no atomics) and ``torch.sum`` over the ``P`` rows finishes the reduction: the
result is deterministic and does not depend on scheduling. Bounding ``P`` (a few programs per SM
on CUDA) keeps those buffers small enough to stay in L2 (``P x 20 KB`` for 2 layers of 20 units)
however large ``N`` is.

Scope. fp32 math; ``h`` and ``c`` must be float32 (a bfloat16-state variant would have to
recompute from rounded ``new_h`` or keep fp32 copies; not built); ``grad`` may be float16,
bfloat16, float32 or float64 (read as fp32; its gradient is returned in its dtype). No
``maximize`` and no ``fast_tanh`` (the approximate tanh would make the gradients inconsistent with
the forward to ~1e-3). Runs on CUDA tensors, or on CPU tensors in the Triton interpreter
(``TRITON_INTERPRET=1`` set before import). Block sizes, warps and ``max_programs`` on the GPU are
untuned defaults: no GPU was available when this was written.

Register budget (H = 20 padded to 32, two layers, sm_90; an OFFLINE compile only, never run or
timed on a GPU): ``triton.compile(ASTSource(fn=coordinate_lstm_backward_kernel, signature=...,
constexprs=...), target=GPUTarget("cuda", 90, 32), options={"num_warps": w})`` with Triton 3.9
(``TRITON_INTERPRET`` unset), then its ``asm["ptx"]`` through the bundled ``ptxas-blackwell -v
--regAllocOptLevel=2 --gpu-name=sm_90a`` (Triton's own flags), reading "Used N registers" and the
stack frame. The forward kernel at BLOCK 64 / 4 warps is like the in-place one (255 registers, 872
B of stack). The backward kernel used to report 32 registers and 6.8 KB (BLOCK 16 / 4 warps), 9.8
KB (32 / 4, the default: 28 KB of spill stores, 47 KB of loads), 7.8 KB (32 / 8), 20 KB (64 / 4) or
8.8 KB (64 / 8) of stack per thread. Cause: the layers' backward ran its products grouped by
product (the four gates' ``dpre`` through ``W_hh``, then all four weight-gradient dots against
``x``, against ``h``, then through ``W_ih``), so the four gate gradients (and, presumably, their
copies in the dot-operand layouts) stayed live across all of it; the PTX has no ``.maxnreg`` (only
``.reqntid``), and "32 registers" is ptxas -O3 giving up on that pressure (the same PTX at -O1: 255
registers, 6.5 KB; ``NUM_LAYERS = 1``, without the upper-layer block: 255 registers, 248 B). The
backward now runs gate by gate (both products and both weight-gradient dots of one gate, then the
next; the same operations and the same order of every sum, so bit-identical in the interpreter):
255 registers and 584 B of stack at the default BLOCK 32 / 4 warps (1.2 KB spill stores, 1.6 KB
loads), 40 B at 16 / 4, 816 B at 32 / 8, 1.9 KB at 64 / 8, 680 B at 16 / 2; 64 / 4 still collapses
to 32 registers (13 KB). ``USE_DOT`` off gives the same numbers. BLOCK 16 / 4 warps nearly removes
the spill but doubles the partial-sum read-modify-writes per coordinate; the default stays 32 / 4,
untuned: profile on a GPU before relying on its speed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .coordinate_lstm_step import (
    GRAD_DTYPES,
    INPUT_PRECISIONS,
    PackedWeights,
    _cell,
    _preprocess,
    _project,
    _sigmoid,
    _tanh,
    _zero_padding,
    check_launch_device,
    is_interpreted,
    pack_weights,
    padded_hidden_size,
)

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
def _preactivations_0(
    xm,
    xd,
    h,
    w_ih0_ptr,
    w_hh_ptr,
    bias_ptr,
    H: tl.constexpr,
    HP: tl.constexpr,
    USE_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Layer 0's gate pre-activations from the two features ``xm, xd`` ``(BLOCK,)`` and ``h``.

    The same operations in the same order as the in-place step kernel, so the backward's
    recomputation reproduces the forward bit for bit.
    """
    cols = tl.arange(0, HP)
    col_mask = cols < H
    pre_i = _project(h, w_hh_ptr, 0, H, HP, USE_DOT, INPUT_PRECISION)
    pre_f = _project(h, w_hh_ptr, 1, H, HP, USE_DOT, INPUT_PRECISION)
    pre_g = _project(h, w_hh_ptr, 2, H, HP, USE_DOT, INPUT_PRECISION)
    pre_o = _project(h, w_hh_ptr, 3, H, HP, USE_DOT, INPUT_PRECISION)
    w_mag_i = tl.load(w_ih0_ptr + (0 * H + cols) * 2, mask=col_mask, other=0.0)
    w_mag_f = tl.load(w_ih0_ptr + (1 * H + cols) * 2, mask=col_mask, other=0.0)
    w_mag_g = tl.load(w_ih0_ptr + (2 * H + cols) * 2, mask=col_mask, other=0.0)
    w_mag_o = tl.load(w_ih0_ptr + (3 * H + cols) * 2, mask=col_mask, other=0.0)
    w_dir_i = tl.load(w_ih0_ptr + (0 * H + cols) * 2 + 1, mask=col_mask, other=0.0)
    w_dir_f = tl.load(w_ih0_ptr + (1 * H + cols) * 2 + 1, mask=col_mask, other=0.0)
    w_dir_g = tl.load(w_ih0_ptr + (2 * H + cols) * 2 + 1, mask=col_mask, other=0.0)
    w_dir_o = tl.load(w_ih0_ptr + (3 * H + cols) * 2 + 1, mask=col_mask, other=0.0)
    b_i = tl.load(bias_ptr + 0 * H + cols, mask=col_mask, other=0.0)
    b_f = tl.load(bias_ptr + 1 * H + cols, mask=col_mask, other=0.0)
    b_g = tl.load(bias_ptr + 2 * H + cols, mask=col_mask, other=0.0)
    b_o = tl.load(bias_ptr + 3 * H + cols, mask=col_mask, other=0.0)
    xm = xm[:, None]
    xd = xd[:, None]
    pre_i += xm * w_mag_i[None, :] + xd * w_dir_i[None, :] + b_i[None, :]
    pre_f += xm * w_mag_f[None, :] + xd * w_dir_f[None, :] + b_f[None, :]
    pre_g += xm * w_mag_g[None, :] + xd * w_dir_g[None, :] + b_g[None, :]
    pre_o += xm * w_mag_o[None, :] + xd * w_dir_o[None, :] + b_o[None, :]
    return pre_i, pre_f, pre_g, pre_o


@triton.jit
def _preactivations(
    x,
    h,
    w_ih_ptr,
    w_hh_ptr,
    bias_ptr,
    H: tl.constexpr,
    HP: tl.constexpr,
    USE_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Gate pre-activations of a layer above 0 from its input ``x`` and old ``h`` ``(BLOCK, HP)``."""
    cols = tl.arange(0, HP)
    col_mask = cols < H
    pre_i = _project(x, w_ih_ptr, 0, H, HP, USE_DOT, INPUT_PRECISION)
    pre_f = _project(x, w_ih_ptr, 1, H, HP, USE_DOT, INPUT_PRECISION)
    pre_g = _project(x, w_ih_ptr, 2, H, HP, USE_DOT, INPUT_PRECISION)
    pre_o = _project(x, w_ih_ptr, 3, H, HP, USE_DOT, INPUT_PRECISION)
    pre_i += _project(h, w_hh_ptr, 0, H, HP, USE_DOT, INPUT_PRECISION)
    pre_f += _project(h, w_hh_ptr, 1, H, HP, USE_DOT, INPUT_PRECISION)
    pre_g += _project(h, w_hh_ptr, 2, H, HP, USE_DOT, INPUT_PRECISION)
    pre_o += _project(h, w_hh_ptr, 3, H, HP, USE_DOT, INPUT_PRECISION)
    pre_i += tl.load(bias_ptr + 0 * H + cols, mask=col_mask, other=0.0)[None, :]
    pre_f += tl.load(bias_ptr + 1 * H + cols, mask=col_mask, other=0.0)[None, :]
    pre_g += tl.load(bias_ptr + 2 * H + cols, mask=col_mask, other=0.0)[None, :]
    pre_o += tl.load(bias_ptr + 3 * H + cols, mask=col_mask, other=0.0)[None, :]
    return pre_i, pre_f, pre_g, pre_o


# ----------------------------------------------------------------------------------------------
# Forward kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def coordinate_lstm_forward_kernel(
    grad_ptr,  # (N,) any float
    h_ptr,  # (L, N, H) fp32, contiguous: old states, read only
    c_ptr,  # (L, N, H) fp32, contiguous
    h_out_ptr,  # (L, N, H) fp32, contiguous: new states
    c_out_ptr,  # (L, N, H) fp32, contiguous
    step_ptr,  # (N,) fp32
    w_ih0_ptr,  # (4H, 2)
    w_ih_ptr,  # (max(L - 1, 1), 4H, H)
    w_hh_ptr,  # (L, 4H, H)
    bias_ptr,  # (L, 4H): b_ih + b_hh
    head_w_ptr,  # (H,)
    head_b_ptr,  # (1,)
    n_coords,
    mag_floor,  # e^-p
    p,
    dir_scale,  # e^p
    output_scale,
    NUM_LAYERS: tl.constexpr,
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

    g = tl.load(grad_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    x_mag, x_dir = _preprocess(g, mag_floor, p, dir_scale)

    h = tl.load(h_ptr + tile, mask=tile_mask, other=0.0)
    c = tl.load(c_ptr + tile, mask=tile_mask, other=0.0)
    pre_i, pre_f, pre_g, pre_o = _preactivations_0(
        x_mag, x_dir, h, w_ih0_ptr, w_hh_ptr, bias_ptr, H, HP, USE_DOT, INPUT_PRECISION
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
    H: tl.constexpr,
    HP: tl.constexpr,
    USE_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """``d @ W[gate*H:(gate+1)*H, :]`` for a row-major ``(4H, H)`` ``W``: ``(BLOCK, HP)`` in and out."""
    j = tl.arange(0, HP)[:, None]  # the gate's unit: row of the block
    k = tl.arange(0, HP)[None, :]  # input unit
    w = tl.load(w_ptr + (gate * H + j) * H + k, mask=(j < H) & (k < H), other=0.0)
    if USE_DOT:
        y = tl.dot(d, w, input_precision=INPUT_PRECISION)
    else:
        y = tl.sum(d[:, :, None] * w[None, :, :], axis=1)
    return y


@triton.jit
def _add_outer(
    part_ptr,
    d,
    x,
    gate: tl.constexpr,
    H: tl.constexpr,
    HP: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """``part[gate*H + j, k] += sum_n d[n, j] x[n, k]`` in a row-major ``(4H, H)`` partial sum."""
    j = tl.arange(0, HP)[:, None]
    k = tl.arange(0, HP)[None, :]
    ptrs = part_ptr + (gate * H + j) * H + k
    mask = (j < H) & (k < H)
    update = tl.dot(tl.trans(d), x, input_precision=INPUT_PRECISION)
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + update, mask=mask)


@triton.jit
def _add_vector(ptr, v, mask):
    tl.store(ptr, tl.load(ptr, mask=mask, other=0.0) + v, mask=mask)


@triton.jit
def _add_bias_grads(part_ptr, d_i, d_f, d_g, d_o, H: tl.constexpr, HP: tl.constexpr):
    cols = tl.arange(0, HP)
    col_mask = cols < H
    _add_vector(part_ptr + 0 * H + cols, tl.sum(d_i, axis=0), col_mask)
    _add_vector(part_ptr + 1 * H + cols, tl.sum(d_f, axis=0), col_mask)
    _add_vector(part_ptr + 2 * H + cols, tl.sum(d_g, axis=0), col_mask)
    _add_vector(part_ptr + 3 * H + cols, tl.sum(d_o, axis=0), col_mask)


@triton.jit
def coordinate_lstm_backward_kernel(
    grad_ptr,  # (N,) any float: the forward's gradient input
    h_ptr,  # (L, N, H) fp32, contiguous: the forward's old states
    c_ptr,  # (L, N, H) fp32
    h_new_ptr,  # (L, N, H) fp32: the forward's new h (layer inputs, top layer for the head)
    d_step_ptr,  # (N,) fp32: incoming gradients
    d_h_new_ptr,  # (L, N, H) fp32, contiguous
    d_c_new_ptr,  # (L, N, H) fp32, contiguous
    d_grad_ptr,  # (N,) fp32 out (written only when STORE_D_GRAD)
    d_h_ptr,  # (L, N, H) fp32 out
    d_c_ptr,  # (L, N, H) fp32 out
    w_ih0_ptr,  # (4H, 2)
    w_ih_ptr,  # (max(L - 1, 1), 4H, H)
    w_hh_ptr,  # (L, 4H, H)
    bias_ptr,  # (L, 4H)
    head_w_ptr,  # (H,)
    part_ih0_ptr,  # (P, 4H, 2) fp32 zeros: per-program partial sums, accumulated in place
    part_ih_ptr,  # (P, max(L - 1, 1), 4H, H)
    part_hh_ptr,  # (P, L, 4H, H)
    part_bias_ptr,  # (P, L, 4H)
    part_head_w_ptr,  # (P, H)
    part_head_b_ptr,  # (P,)
    n_coords,
    num_programs,
    part_ih_stride,  # max(L - 1, 1) * 4H * H
    mag_floor,  # e^-p
    p,
    dir_scale,  # e^p
    output_scale,
    NUM_LAYERS: tl.constexpr,
    H: tl.constexpr,
    HP: tl.constexpr,
    USE_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    STORE_D_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    pid64 = pid.to(tl.int64)
    cols = tl.arange(0, HP)
    col_mask = cols < H
    layer_stride = (pid64 * 0 + n_coords) * H  # int64
    # this program's rows of the partial-sum buffers
    part_ih0 = part_ih0_ptr + pid64 * (4 * H * 2)
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
        g = tl.load(grad_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        x_mag, x_dir = _preprocess(g, mag_floor, p, dir_scale)

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
            below = (layer - 1) * layer_stride + tile
            dh += tl.load(d_h_new_ptr + offset, mask=tile_mask, other=0.0)
            dc = tl.load(d_c_new_ptr + offset, mask=tile_mask, other=0.0)
            x = tl.load(h_new_ptr + below, mask=tile_mask, other=0.0)
            h = tl.load(h_ptr + offset, mask=tile_mask, other=0.0)
            c = tl.load(c_ptr + offset, mask=tile_mask, other=0.0)
            w_ih = w_ih_ptr + (layer - 1) * 4 * H * H
            w_hh = w_hh_ptr + layer * 4 * H * H
            pre_i, pre_f, pre_g, pre_o = _preactivations(
                x, h, w_ih, w_hh, bias_ptr + layer * 4 * H, H, HP, USE_DOT, INPUT_PRECISION
            )
            d_i, d_f, d_g, d_o, dc = _cell_backward(pre_i, pre_f, pre_g, pre_o, c, dh, dc)
            tl.store(d_c_ptr + offset, dc, mask=tile_mask)
            _add_bias_grads(part_bias + layer * 4 * H, d_i, d_f, d_g, d_o, H, HP)
            part_ih_l = part_ih + (layer - 1) * 4 * H * H
            part_hh_l = part_hh + layer * 4 * H * H
            # gate by gate, so that one gate's dot operands are live at a time (the sums keep
            # their gate order i, f, g, o; see "Register budget" in the module docstring)
            dh_old = _project_back(d_i, w_hh, 0, H, HP, USE_DOT, INPUT_PRECISION)
            dh = _project_back(d_i, w_ih, 0, H, HP, USE_DOT, INPUT_PRECISION)
            _add_outer(part_ih_l, d_i, x, 0, H, HP, INPUT_PRECISION)
            _add_outer(part_hh_l, d_i, h, 0, H, HP, INPUT_PRECISION)
            dh_old += _project_back(d_f, w_hh, 1, H, HP, USE_DOT, INPUT_PRECISION)
            dh += _project_back(d_f, w_ih, 1, H, HP, USE_DOT, INPUT_PRECISION)
            _add_outer(part_ih_l, d_f, x, 1, H, HP, INPUT_PRECISION)
            _add_outer(part_hh_l, d_f, h, 1, H, HP, INPUT_PRECISION)
            dh_old += _project_back(d_g, w_hh, 2, H, HP, USE_DOT, INPUT_PRECISION)
            dh += _project_back(d_g, w_ih, 2, H, HP, USE_DOT, INPUT_PRECISION)
            _add_outer(part_ih_l, d_g, x, 2, H, HP, INPUT_PRECISION)
            _add_outer(part_hh_l, d_g, h, 2, H, HP, INPUT_PRECISION)
            dh_old += _project_back(d_o, w_hh, 3, H, HP, USE_DOT, INPUT_PRECISION)
            dh += _project_back(d_o, w_ih, 3, H, HP, USE_DOT, INPUT_PRECISION)
            _add_outer(part_ih_l, d_o, x, 3, H, HP, INPUT_PRECISION)
            _add_outer(part_hh_l, d_o, h, 3, H, HP, INPUT_PRECISION)
            tl.store(d_h_ptr + offset, dh_old, mask=tile_mask)
            dh = _zero_padding(dh, H, HP)

        # ---- layer 0: the two preprocessed features
        dh += tl.load(d_h_new_ptr + tile, mask=tile_mask, other=0.0)
        dc = tl.load(d_c_new_ptr + tile, mask=tile_mask, other=0.0)
        h = tl.load(h_ptr + tile, mask=tile_mask, other=0.0)
        c = tl.load(c_ptr + tile, mask=tile_mask, other=0.0)
        pre_i, pre_f, pre_g, pre_o = _preactivations_0(
            x_mag, x_dir, h, w_ih0_ptr, w_hh_ptr, bias_ptr, H, HP, USE_DOT, INPUT_PRECISION
        )
        d_i, d_f, d_g, d_o, dc = _cell_backward(pre_i, pre_f, pre_g, pre_o, c, dh, dc)
        tl.store(d_c_ptr + tile, dc, mask=tile_mask)
        _add_bias_grads(part_bias, d_i, d_f, d_g, d_o, H, HP)
        dh_old = _project_back(d_i, w_hh_ptr, 0, H, HP, USE_DOT, INPUT_PRECISION)
        _add_outer(part_hh, d_i, h, 0, H, HP, INPUT_PRECISION)
        dh_old += _project_back(d_f, w_hh_ptr, 1, H, HP, USE_DOT, INPUT_PRECISION)
        _add_outer(part_hh, d_f, h, 1, H, HP, INPUT_PRECISION)
        dh_old += _project_back(d_g, w_hh_ptr, 2, H, HP, USE_DOT, INPUT_PRECISION)
        _add_outer(part_hh, d_g, h, 2, H, HP, INPUT_PRECISION)
        dh_old += _project_back(d_o, w_hh_ptr, 3, H, HP, USE_DOT, INPUT_PRECISION)
        _add_outer(part_hh, d_o, h, 3, H, HP, INPUT_PRECISION)
        tl.store(d_h_ptr + tile, dh_old, mask=tile_mask)
        xm = x_mag[:, None]
        xd = x_dir[:, None]
        _add_vector(part_ih0 + (0 * H + cols) * 2, tl.sum(d_i * xm, axis=0), col_mask)
        _add_vector(part_ih0 + (1 * H + cols) * 2, tl.sum(d_f * xm, axis=0), col_mask)
        _add_vector(part_ih0 + (2 * H + cols) * 2, tl.sum(d_g * xm, axis=0), col_mask)
        _add_vector(part_ih0 + (3 * H + cols) * 2, tl.sum(d_o * xm, axis=0), col_mask)
        _add_vector(part_ih0 + (0 * H + cols) * 2 + 1, tl.sum(d_i * xd, axis=0), col_mask)
        _add_vector(part_ih0 + (1 * H + cols) * 2 + 1, tl.sum(d_f * xd, axis=0), col_mask)
        _add_vector(part_ih0 + (2 * H + cols) * 2 + 1, tl.sum(d_g * xd, axis=0), col_mask)
        _add_vector(part_ih0 + (3 * H + cols) * 2 + 1, tl.sum(d_o * xd, axis=0), col_mask)

        if STORE_D_GRAD:
            w_mag_i = tl.load(w_ih0_ptr + (0 * H + cols) * 2, mask=col_mask, other=0.0)
            w_mag_f = tl.load(w_ih0_ptr + (1 * H + cols) * 2, mask=col_mask, other=0.0)
            w_mag_g = tl.load(w_ih0_ptr + (2 * H + cols) * 2, mask=col_mask, other=0.0)
            w_mag_o = tl.load(w_ih0_ptr + (3 * H + cols) * 2, mask=col_mask, other=0.0)
            w_dir_i = tl.load(w_ih0_ptr + (0 * H + cols) * 2 + 1, mask=col_mask, other=0.0)
            w_dir_f = tl.load(w_ih0_ptr + (1 * H + cols) * 2 + 1, mask=col_mask, other=0.0)
            w_dir_g = tl.load(w_ih0_ptr + (2 * H + cols) * 2 + 1, mask=col_mask, other=0.0)
            w_dir_o = tl.load(w_ih0_ptr + (3 * H + cols) * 2 + 1, mask=col_mask, other=0.0)
            d_mag = tl.sum(
                d_i * w_mag_i[None, :]
                + d_f * w_mag_f[None, :]
                + d_g * w_mag_g[None, :]
                + d_o * w_mag_o[None, :],
                axis=1,
            )
            d_dir = tl.sum(
                d_i * w_dir_i[None, :]
                + d_f * w_dir_f[None, :]
                + d_g * w_dir_g[None, :]
                + d_o * w_dir_o[None, :],
                axis=1,
            )
            # torch's derivatives: clamp_min and clamp pass the gradient at their bounds
            # (inclusive), abs has derivative sign(g) (0 at 0)
            a = tl.abs(g)
            mag_slope = tl.where(a >= mag_floor, 1.0 / (tl.maximum(a, mag_floor) * p), 0.0)
            mag_slope = tl.where(g < 0.0, -mag_slope, mag_slope)
            dir_slope = tl.where(tl.abs(g * dir_scale) <= 1.0, dir_scale, 0.0)
            tl.store(d_grad_ptr + rows, d_mag * mag_slope + d_dir * dir_slope, mask=row_mask)
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
        for name in ("block", "backward_block"):
            b = getattr(self, name)
            if b is not None and (b < 16 or b & (b - 1)):
                raise ValueError(f"{name} must be a power of two >= 16, got {b}")
        if self.num_warps < 1 or self.num_warps & (self.num_warps - 1):
            raise ValueError(f"num_warps must be a power of two, got {self.num_warps}")
        if self.input_precision not in INPUT_PRECISIONS:
            raise ValueError(
                f"input_precision must be one of {INPUT_PRECISIONS}, got {self.input_precision!r}"
            )
        if self.max_programs is not None and self.max_programs < 1:
            raise ValueError(f"max_programs must be >= 1, got {self.max_programs}")


def _block(requested: int | None, gpu_default: int, n: int) -> int:
    block = requested or (1024 if is_interpreted() else gpu_default)
    # tiny inputs: no point computing (and, in the interpreter, paying for) empty rows
    return min(block, max(16, triton.next_power_of_2(max(n, 1))))


def _check_inputs(grad: Tensor, h: Tensor, c: Tensor, packed: PackedWeights) -> tuple[int, int]:
    """Validate; returns ``(L, H)``."""
    if not isinstance(grad, Tensor) or grad.dim() != 1:
        raise ValueError(f"grad must be a 1-D tensor, got {getattr(grad, 'shape', type(grad))}")
    if grad.dtype not in GRAD_DTYPES:
        raise ValueError(f"grad dtype must be one of {GRAD_DTYPES}, got {grad.dtype}")
    num_layers, _, hidden = packed.w_hh.shape
    if packed.w_ih0.shape[1] != 2:
        raise ValueError(
            f"the differentiable kernels support only the default feature set (num_inputs=2), "
            f"got weights with {packed.w_ih0.shape[1]} inputs: use the PyTorch path"
        )
    expected = (num_layers, grad.numel(), hidden)
    for name, t in (("h", h), ("c", c)):
        if not isinstance(t, Tensor) or tuple(t.shape) != expected:
            raise ValueError(
                f"{name} must have shape (L, N, H) = {expected}, got {getattr(t, 'shape', type(t))}"
            )
        if t.dtype != torch.float32:
            raise ValueError(
                f"{name} must be float32 for the differentiable kernel (bfloat16 states are "
                f"supported only by the in-place optimizer step), got {t.dtype}"
            )
    check_launch_device({"grad": grad, "h": h, "c": c, **packed._asdict()})
    return num_layers, hidden


def _constants(preprocess_p: float) -> tuple[float, float, float]:
    if not preprocess_p > 0:
        raise ValueError(f"preprocess_p must be positive, got {preprocess_p}")
    return math.exp(-preprocess_p), float(preprocess_p), math.exp(preprocess_p)


def coordinate_lstm_forward(
    grad: Tensor,
    h: Tensor,
    c: Tensor,
    packed: PackedWeights,
    *,
    preprocess_p: float,
    output_scale: float,
    options: KernelOptions = KernelOptions(),
) -> tuple[Tensor, Tensor, Tensor]:
    """The rule's forward over ``N`` coordinates, not in place (no autograd: see
    :func:`coordinate_lstm_step`).

    Args:
        grad: ``(N,)`` gradient, float16/bfloat16/float32/float64 (read as fp32).
        h, c: ``(L, N, H)`` float32 old states (made contiguous if they are not).
        packed: :func:`pack_weights` of the rule's parameters (fp32).
        preprocess_p: the preprocessing constant ``p`` (> 0).
        output_scale: the head's output multiplier.
        options: launch options.

    Returns:
        ``step (N,)``, ``new_h (L, N, H)``, ``new_c (L, N, H)``, all float32 and contiguous.
    """
    num_layers, hidden = _check_inputs(grad, h, c, packed)
    mag_floor, p, dir_scale = _constants(preprocess_p)
    grad, h, c = grad.contiguous(), h.contiguous(), c.contiguous()
    n = grad.numel()
    step = torch.empty(n, dtype=torch.float32, device=grad.device)
    h_new, c_new = torch.empty_like(h), torch.empty_like(c)
    if n == 0:
        return step, h_new, c_new
    block = _block(options.block, 64, n)
    coordinate_lstm_forward_kernel[(triton.cdiv(n, block),)](
        grad,
        h,
        c,
        h_new,
        c_new,
        step,
        *(t.detach() for t in packed),
        n,
        mag_floor,
        p,
        dir_scale,
        float(output_scale),
        NUM_LAYERS=num_layers,
        H=hidden,
        HP=padded_hidden_size(hidden),
        USE_DOT=options.use_dot,
        INPUT_PRECISION=options.input_precision,
        BLOCK=block,
        num_warps=options.num_warps,
    )
    return step, h_new, c_new


def coordinate_lstm_backward(
    grad: Tensor,
    h: Tensor,
    c: Tensor,
    h_new: Tensor,
    packed: PackedWeights,
    d_step: Tensor,
    d_h_new: Tensor,
    d_c_new: Tensor,
    *,
    preprocess_p: float,
    output_scale: float,
    need_d_grad: bool = True,
    options: KernelOptions = KernelOptions(),
) -> tuple[Tensor | None, Tensor, Tensor, PackedWeights]:
    """Gradients of one forward (:func:`coordinate_lstm_forward`) from those of its outputs.

    Args:
        grad, h, c: the forward's inputs (``(N,)``, ``(L, N, H)`` float32).
        h_new: the forward's ``new_h`` ``(L, N, H)``.
        packed: the forward's packed weights.
        d_step: ``(N,)``; d_h_new, d_c_new: ``(L, N, H)``: gradients of the outputs (any float
            dtype, converted to contiguous fp32).
        preprocess_p, output_scale: as in the forward.
        need_d_grad: compute the gradient of ``grad`` (else ``None`` is returned for it).
        options: launch options (``backward_block``, ``max_programs``, ``use_dot``, ...).

    Returns:
        ``d_grad`` (``(N,)`` in ``grad``'s dtype, or ``None``), ``d_h``, ``d_c`` ``(L, N, H)``
        float32, and the weights' gradients as a :class:`PackedWeights` (``bias``'s gradient is
        that of ``bias_ih`` and of ``bias_hh``; ``w_ih``'s is zero when ``L == 1``).
    """
    num_layers, hidden = _check_inputs(grad, h, c, packed)
    mag_floor, p, dir_scale = _constants(preprocess_p)
    n = grad.numel()
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
        {"grad": grad, "h_new": h_new, "d_step": d_step, "d_h_new": d_h_new, "d_c_new": d_c_new}
    )
    f32 = {"dtype": torch.float32, "device": device}
    grad, h, c = grad.contiguous(), h.contiguous(), c.contiguous()
    h_new = h_new.contiguous().float()
    d_step = d_step.contiguous().float()
    d_h_new = d_h_new.contiguous().float()
    d_c_new = d_c_new.contiguous().float()
    d_grad = torch.empty(n, **f32) if need_d_grad else None
    d_h, d_c = torch.empty(shape, **f32), torch.empty(shape, **f32)

    block = _block(options.backward_block, 32, n)
    tiles = triton.cdiv(n, block)
    limit = options.max_programs
    if limit is None and device.type == "cuda":
        limit = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    programs = max(1, min(tiles, limit or tiles))
    weights = [t.detach() for t in packed]
    parts = [torch.zeros((programs, *t.shape), **f32) for t in weights]
    part_head_b = parts[5].view(programs)
    if n > 0:
        coordinate_lstm_backward_kernel[(programs,)](
            grad,
            h,
            c,
            h_new,
            d_step,
            d_h_new,
            d_c_new,
            d_grad if need_d_grad else d_step,  # a placeholder pointer, never written
            d_h,
            d_c,
            *weights[:5],
            *parts[:5],
            part_head_b,
            n,
            programs,
            parts[1].stride(0),
            mag_floor,
            p,
            dir_scale,
            float(output_scale),
            NUM_LAYERS=num_layers,
            H=hidden,
            HP=padded_hidden_size(hidden),
            USE_DOT=options.use_dot,
            INPUT_PRECISION=options.input_precision,
            STORE_D_GRAD=need_d_grad,
            BLOCK=block,
            num_warps=options.num_warps,
        )
    # a fixed-order sum over the programs' rows: deterministic
    d_weights = PackedWeights(*(part.sum(dim=0) for part in parts))
    if d_grad is not None:
        d_grad = d_grad.to(grad.dtype)
    return d_grad, d_h, d_c, d_weights


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------


class CoordinateLSTMStepFunction(torch.autograd.Function):
    """``(step, new_h, new_c)`` of the coordinatewise LSTM rule, Triton forward and backward.

    Inputs to :meth:`apply`: ``grad (N,)``, ``h, c (L, N, H)`` fp32, the six
    :class:`PackedWeights` tensors (``w_ih0, w_ih, w_hh, bias, head_w, head_b``), then
    ``preprocess_p``, ``output_scale`` and a :class:`KernelOptions`. First-order only: the
    backward raises ``RuntimeError`` under ``create_graph=True``. Prefer
    :func:`coordinate_lstm_step`.
    """

    @staticmethod
    def forward(
        ctx,
        grad: Tensor,
        h: Tensor,
        c: Tensor,
        w_ih0: Tensor,
        w_ih: Tensor,
        w_hh: Tensor,
        bias: Tensor,
        head_w: Tensor,
        head_b: Tensor,
        preprocess_p: float,
        output_scale: float,
        options: KernelOptions,
    ) -> tuple[Tensor, Tensor, Tensor]:
        packed = PackedWeights(w_ih0, w_ih, w_hh, bias, head_w, head_b)
        step, h_new, c_new = coordinate_lstm_forward(
            grad,
            h,
            c,
            packed,
            preprocess_p=preprocess_p,
            output_scale=output_scale,
            options=options,
        )
        ctx.save_for_backward(grad, h, c, h_new, *packed)
        ctx.constants = (preprocess_p, output_scale, options)
        return step, h_new, c_new

    @staticmethod
    def backward(ctx, d_step: Tensor, d_h_new: Tensor, d_c_new: Tensor) -> tuple:
        if torch.is_grad_enabled():  # create_graph=True: a double backward is being prepared
            raise RuntimeError(
                "the Triton coordinate-LSTM step is differentiable to first order only: its "
                "backward cannot run with create_graph=True (double backward, Hessian-vector "
                "products); use the PyTorch path (backend='torch') for higher-order gradients"
            )
        grad, h, c, h_new, *weights = ctx.saved_tensors
        preprocess_p, output_scale, options = ctx.constants
        d_grad, d_h, d_c, d_weights = coordinate_lstm_backward(
            grad,
            h,
            c,
            h_new,
            PackedWeights(*weights),
            d_step,
            d_h_new,
            d_c_new,
            preprocess_p=preprocess_p,
            output_scale=output_scale,
            need_d_grad=ctx.needs_input_grad[0],
            options=options,
        )
        # d_head_b: head_b is (1,)
        return (d_grad, d_h, d_c, *d_weights, None, None, None)


def coordinate_lstm_step(
    grad: Tensor,
    h: Tensor,
    c: Tensor,
    weights: Mapping[str, Tensor] | PackedWeights,
    config,
    *,
    options: KernelOptions | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Differentiable ``CoordinateLSTM.forward`` on the default inputs, by Triton kernels.

    Equal (to fp32 rounding) to ``rule(grad, param, {"h": h, "c": c})`` of a
    :class:`~learnedopt.nn.CoordinateLSTM` ``rule`` with ``config`` and these weights, and
    differentiable (first order) with respect to ``grad``, ``h``, ``c`` and the weights.

    Args:
        grad: ``(N,)`` gradient (float16/bfloat16/float32/float64, computed in fp32).
        h, c: ``(L, N, H)`` float32 states.
        weights: the rule's parameters by ``state_dict`` name, fp32 and contiguous, e.g.
            ``dict(rule.named_parameters())`` (NOT :func:`rule_weights`, which detaches), or
            their :func:`pack_weights` result.
        config: the rule's :class:`~learnedopt.nn.CoordinateLSTMConfig` (``num_inputs`` must
            be 2: no momentum, rms or parameter features).
        options: launch options (default :class:`KernelOptions`).

    Returns:
        ``step (N,)``, ``new_h (L, N, H)``, ``new_c (L, N, H)``, float32: the rule's step (add
        ``lr * step`` to the parameter) and new states.

    Raises:
        ValueError: for an unsupported config, shape, dtype or device (CPU without the
            interpreter).
    """
    if config.num_inputs != 2:
        raise ValueError(
            f"the Triton kernels support only the default feature set (num_inputs=2), got a "
            f"config with {config.num_inputs} inputs: use the PyTorch path"
        )
    packed = (
        weights
        if isinstance(weights, PackedWeights)
        else pack_weights(weights, num_layers=config.num_layers, hidden_size=config.hidden_size)
    )
    if packed.w_hh.shape != (config.num_layers, 4 * config.hidden_size, config.hidden_size):
        raise ValueError(
            f"packed weights are for {tuple(packed.w_hh.shape)}, not L={config.num_layers}, "
            f"H={config.hidden_size}"
        )
    return CoordinateLSTMStepFunction.apply(
        grad,
        h,
        c,
        *packed,
        float(config.preprocess_p),
        float(config.output_scale),
        options or KernelOptions(),
    )
