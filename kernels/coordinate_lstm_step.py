"""Fused optimizer step of the coordinatewise LSTM update rule (:class:`learnedopt.nn.CoordinateLSTM`).

Design: one launch per call over a flat range of ``N`` coordinates, in ONE pass over memory.
Each program takes ``BLOCK`` consecutive coordinates and, entirely in registers,

1. loads the gradient (any float dtype, converted to fp32) and negates it under ``maximize``;
2. preprocesses it into the two features ``(log(max(|g|, e^-p)) / p, clamp(e^p g, -1, 1))``;
   with ``momentum_decays`` / ``rms_decays``, it also advances each moving average
   ``m_k = lerp(s, m_k, beta_k)`` and ``v_k = lerp(min(s^2, fp32 max), v_k, beta_k)``, ``s`` the gradient
   saturated at ``+-fp32 max / 2`` (``bounded_gradient``; ``g`` itself in ordinary use) (states ``(M, N)`` and
   ``(R, N)``, float32 or bfloat16, stored back in place in their dtype) and appends the features
   ``preprocess(m_k)`` (two each) and then ``g / (sqrt(v_k) + 1e-8)``, in the order of
   :meth:`CoordinateLSTM.features`;
3. runs every LSTM layer (torch gate order i, f, g, o), loading that layer's ``h`` and ``c``
   (float32 or bfloat16, converted to fp32), and stores the new ``h`` and ``c`` back in place in
   their own dtype;
4. applies the linear head, ``step = output_scale * (w . h_top + b)``;
5. writes ``param_out = param + lr * step`` in the parameter's dtype.

That is exactly what :meth:`CoordinateLSTM.forward` followed by ``param.add_(step, alpha=lr)``
computes in :func:`learnedopt.optim.update.flat_update_` with ``compute_dtype=torch.float32``,
up to the order of fp32 reductions. Every feature set is supported; with ``param_input`` the
parameter value (read as fp32, before the update) is the last feature, as in
:meth:`CoordinateLSTM.features`, and is not negated under ``maximize``. The decays are compile-time constants (one compilation per feature set), taken in fp32 as the
PyTorch path's weight tensor holds them, and ``lerp`` uses ``torch.lerp``'s formula on either
side of 0.5; moments and rms features use IEEE-rounded ``sqrt`` and division, as torch does.

Layout. ``h`` and ``c`` are ``(L, N, H)`` with a contiguous ``(N, H)`` slab per layer; the layer
stride may be larger than ``N * H``, so a coordinate range ``buf[:, a:b]`` of a bigger flat state
buffer can be passed without a copy. Likewise ``m`` and ``v`` have a contiguous ``(N,)`` row per
decay and any row stride. The hidden size ``H`` is padded to ``HP`` (a power of two, at least
16, the smallest ``tl.dot`` operand) with masks: padded weight rows and columns load as zero, so
padded units keep ``c = 0`` and ``h = sigmoid(0) * tanh(0) = 0`` and never reach the real ones.

Products. For each layer and gate, ``(BLOCK, in) x (in, HP)``: with ``USE_DOT`` by ``tl.dot``
(fp32 operands, ``INPUT_PRECISION`` "ieee" by default so the result is fp32-exact; "tf32x3" or
"tf32" trade accuracy for tensor-core speed on GPUs), otherwise by a broadcast multiply and
``tl.sum``, written ``sum(fma(a, b, 0))`` because Triton turns ``sum(a * b)`` of broadcast
operands into a TF32 ``tl.dot`` (it did on an H200). The four gates are four products rather
than one ``(in, 4*HP)`` product because Triton cannot slice a register tile into column blocks; the FLOPs are the same. Layer 0's input
has ``K = 2 + 2M + R`` features (2 for the paper's rule, 10 for the default preset), below
``tl.dot``'s minimum inner dimension of 16, so its input projection is ``K`` broadcast
multiply-adds, unrolled over the constant feature count (the first two exactly as for ``K = 2``);
its recurrent projection uses ``tl.dot``.

Activations. The portable ``tanh(x) = 2 sigmoid(2x) - 1`` is the default; ``FAST_TANH`` uses the
PTX ``tanh.approx.f32`` instruction (about 2^-11 relative error, NVIDIA GPUs only) for tanh and
for sigmoid (``sigmoid(x) = 0.5 + 0.5 tanh(x / 2)``). The Triton interpreter cannot run inline
assembly, so the switch stays off there.

Rounding. fp32 -> bfloat16 stores round to nearest even with integer arithmetic rather than
``.to(tl.bfloat16)``, because the Triton interpreter truncates that conversion while GPUs round
to nearest even; this way both match ``torch.Tensor.to(torch.bfloat16)`` bit for bit.

Register budget (H = 20 padded to 32, two layers, sm_90, Triton 3.6: the offline compile of
``benchmarks/kernel_resources.py``, ``benchmarks/results/kernel_resources.md``): with
``INPUT_PRECISION="ieee"`` the fp32 products lower to FMAs, and BLOCK 64 / 4 warps uses 255
registers plus 488 B of spill stack per thread (744 B with the default preset's inputs), BLOCK
32 / 8 warps no spill. The sum path at BLOCK 64 / 4 warps compiles to 32 registers and a 9-20 KB
stack, the pattern that ran 7.9x slower on an H200 (there, for the dot path at 2 warps), and
spills nothing at BLOCK 32 / 8 warps. The launcher's default ("ieee", exact, BLOCK 64, 4 warps)
is chosen for correctness, not speed: on an H200 (``benchmarks/results/kernel_bench_h200.md``)
it ran at 5% of the fp32 rate, "tf32x3" 4.1x faster, the spill-free BLOCK 32 / 8 warps 1.8x
slower. Tune ``block``, ``num_warps`` and ``input_precision`` on the GPU with
``benchmarks/kernel_bench.py --tune`` (both feature sets). In the interpreter every program
instance costs tens of milliseconds, so tests there use a large BLOCK instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from torch import Tensor

from ..nn.functional import RMS_EPS, below_one_in_float32, check_preprocess_p
from ..values import is_integer

if TYPE_CHECKING:
    from .meta_lstm_step import MetaPackedWeights

#: Dtypes of the ``h``, ``c``, ``m`` and ``v`` state buffers the kernel reads and writes.
STATE_DTYPES = (torch.float32, torch.bfloat16)
#: Parameter dtypes (the update ``param + lr * step`` is computed in fp32; float64 parameters
#: would lose precision in that, so they stay on the PyTorch path).
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Gradient dtypes (converted to fp32, as the PyTorch path does).
GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
#: ``tl.dot`` input precisions accepted by the launcher.
INPUT_PRECISIONS = ("ieee", "tf32x3", "tf32")


def padded_hidden_size(hidden_size: int) -> int:
    """``HP``: the hidden size rounded up to a power of two, at least 16 (``20 -> 32``), the
    smallest ``tl.dot`` operand; the differentiable kernels pad their input features so too."""
    return max(16, triton.next_power_of_2(hidden_size))


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tanh(x, FAST: tl.constexpr):
    if FAST:
        y = tl.inline_asm_elementwise(
            "tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        y = 2.0 * tl.sigmoid(2.0 * x) - 1.0
    return y


@triton.jit
def _sigmoid(x, FAST: tl.constexpr):
    if FAST:
        y = 0.5 + 0.5 * _tanh(0.5 * x, FAST)
    else:
        y = tl.sigmoid(x)
    return y


@triton.jit
def _store_rounded(ptr, x, mask):
    """Store fp32 ``x`` at ``ptr`` in the pointer's dtype, rounding to nearest even."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        # a NaN whose payload sits in the low half would round to inf: keep a quiet NaN instead
        bits = tl.where(x == x, bits >> 16, 0x7FC0)
        tl.store(ptr, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _preprocess(g, mag_floor, p, dir_scale):
    """``(log(max(|g|, e^-p)) / p, clamp(e^p g, -1, 1))``, NaN-propagating like torch."""
    x_mag = tl.log(tl.maximum(tl.abs(g), mag_floor, propagate_nan=tl.PropagateNan.ALL)) / p
    x_dir = tl.clamp(g * dir_scale, -1.0, 1.0, propagate_nan=tl.PropagateNan.ALL)
    return x_mag, x_dir


@triton.jit
def _lerp(start, end, WEIGHT: tl.constexpr):
    """``torch.lerp(start, end, WEIGHT)`` for a constant fp32 weight, with torch's two formulas
    (the second is the accurate one for weights near 1, and ``1 - WEIGHT`` is exact there)."""
    if WEIGHT < 0.5:
        y = start + WEIGHT * (end - start)
    else:
        y = end - (end - start) * (1.0 - WEIGHT)
    return y


@triton.jit
def _bounded_gradient(g):
    """:func:`learnedopt.nn.functional.bounded_gradient` in fp32: ``g`` saturated at half fp32's
    largest finite value, what the moving averages read (``where``s, so that NaN stays NaN)."""
    g = tl.where(g > 1.7014117331926443e38, 1.7014117331926443e38, g)
    return tl.where(g < -1.7014117331926443e38, -1.7014117331926443e38, g)


@triton.jit
def _bounded_square(g):
    """:func:`learnedopt.nn.functional.bounded_square` in fp32: ``g * g`` saturated at fp32's
    largest finite value (a ``where``, not ``minimum``, so that NaN stays NaN as in torch)."""
    gg = g * g
    return tl.where(gg > 3.4028234663852886e38, 3.4028234663852886e38, gg)


@triton.jit
def _input_weights(
    w_ih0_ptr,
    gate: tl.constexpr,
    feature,
    NUM_INPUTS: tl.constexpr,
    H: tl.constexpr,
    HP: tl.constexpr,
):
    """``(1, HP)``: column ``feature`` of the gate's block of layer 0's row-major ``(4H,
    NUM_INPUTS)`` input weights, zero-padded."""
    cols = tl.arange(0, HP)
    w = tl.load(w_ih0_ptr + (gate * H + cols) * NUM_INPUTS + feature, mask=cols < H, other=0.0)
    return w[None, :]


@triton.jit
def _add_input(
    pre_i,
    pre_f,
    pre_g,
    pre_o,
    x,
    w_ih0_ptr,
    feature,
    NUM_INPUTS: tl.constexpr,
    H: tl.constexpr,
    HP: tl.constexpr,
):
    """Add input feature ``feature`` of layer 0, ``x`` ``(BLOCK,)``, times its weights to the four
    gate pre-activations ``(BLOCK, HP)``."""
    x = x[:, None]
    pre_i += x * _input_weights(w_ih0_ptr, 0, feature, NUM_INPUTS, H, HP)
    pre_f += x * _input_weights(w_ih0_ptr, 1, feature, NUM_INPUTS, H, HP)
    pre_g += x * _input_weights(w_ih0_ptr, 2, feature, NUM_INPUTS, H, HP)
    pre_o += x * _input_weights(w_ih0_ptr, 3, feature, NUM_INPUTS, H, HP)
    return pre_i, pre_f, pre_g, pre_o


@triton.jit
def _fp32_product_sum(a, b):
    """``sum(a[:, :, None] * b[None, :, :], axis=1)`` in fp32: ``(M, K) x (K, N) -> (M, N)``.

    Written as ``fma(a, b, 0)``, which rounds like the product: Triton rewrites a sum of
    broadcast products into ``tl.dot`` with TF32 inputs (seen on an H200: errors of 1e-4 to 1e-3),
    which is not the fp32 arithmetic this path promises (``tests/test_kernel_compile.py``).
    """
    a3, b3 = tl.broadcast(a[:, :, None], b[None, :, :])
    return tl.sum(tl.fma(a3, b3, 0.0), axis=1)


@triton.jit
def _project(
    x,
    w_ptr,
    gate: tl.constexpr,
    K: tl.constexpr,
    KP: tl.constexpr,
    H: tl.constexpr,
    HP: tl.constexpr,
    USE_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """``x @ W[gate*H:(gate+1)*H, :]^T`` for a row-major ``(4H, K)`` fp32 matrix ``W``.

    ``x`` is ``(BLOCK, KP)`` fp32 with zeros in the padded columns; returns ``(BLOCK, HP)``.
    ``K = H`` for the recurrent weights and the input weights of layers above 0.
    """
    k = tl.arange(0, KP)
    j = tl.arange(0, HP)
    # wt[k, j] = W[gate*H + j, k]: the gate's block, transposed, zero-padded to (KP, HP)
    wt = tl.load(
        w_ptr + (gate * H + j[None, :]) * K + k[:, None],
        mask=(k[:, None] < K) & (j[None, :] < H),
        other=0.0,
    )
    if USE_DOT:
        y = tl.dot(x, wt, input_precision=INPUT_PRECISION)
    else:
        y = _fp32_product_sum(x, wt)
    return y


@triton.jit
def _preactivations(
    x,
    h,
    w_ih_ptr,
    w_hh_ptr,
    bias_ptr,
    K: tl.constexpr,
    KP: tl.constexpr,
    H: tl.constexpr,
    HP: tl.constexpr,
    USE_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """A layer's gate pre-activations ``(BLOCK, HP)`` from its input ``x`` ``(BLOCK, KP)`` (``K``
    features for layer 0, the ``H`` units of the layer below above it) and its old ``h``."""
    cols = tl.arange(0, HP)
    col_mask = cols < H
    pre_i = _project(x, w_ih_ptr, 0, K, KP, H, HP, USE_DOT, INPUT_PRECISION)
    pre_f = _project(x, w_ih_ptr, 1, K, KP, H, HP, USE_DOT, INPUT_PRECISION)
    pre_g = _project(x, w_ih_ptr, 2, K, KP, H, HP, USE_DOT, INPUT_PRECISION)
    pre_o = _project(x, w_ih_ptr, 3, K, KP, H, HP, USE_DOT, INPUT_PRECISION)
    pre_i += _project(h, w_hh_ptr, 0, H, HP, H, HP, USE_DOT, INPUT_PRECISION)
    pre_f += _project(h, w_hh_ptr, 1, H, HP, H, HP, USE_DOT, INPUT_PRECISION)
    pre_g += _project(h, w_hh_ptr, 2, H, HP, H, HP, USE_DOT, INPUT_PRECISION)
    pre_o += _project(h, w_hh_ptr, 3, H, HP, H, HP, USE_DOT, INPUT_PRECISION)
    pre_i += tl.load(bias_ptr + 0 * H + cols, mask=col_mask, other=0.0)[None, :]
    pre_f += tl.load(bias_ptr + 1 * H + cols, mask=col_mask, other=0.0)[None, :]
    pre_g += tl.load(bias_ptr + 2 * H + cols, mask=col_mask, other=0.0)[None, :]
    pre_o += tl.load(bias_ptr + 3 * H + cols, mask=col_mask, other=0.0)[None, :]
    return pre_i, pre_f, pre_g, pre_o


@triton.jit
def _cell(pre_i, pre_f, pre_g, pre_o, c, FAST_TANH: tl.constexpr):
    """One LSTM cell from the gate pre-activations; returns ``(h, c)``."""
    c = _sigmoid(pre_f, FAST_TANH) * c + _sigmoid(pre_i, FAST_TANH) * _tanh(pre_g, FAST_TANH)
    h = _sigmoid(pre_o, FAST_TANH) * _tanh(c, FAST_TANH)
    return h, c


@triton.jit
def _zero_padding(x, H: tl.constexpr, HP: tl.constexpr):
    """Zero the padded columns of a ``(BLOCK, HP)`` tile.

    They are zero for finite inputs anyway, but an infinite gradient makes ``inf * 0 = NaN`` there,
    which the next layer's product would spread into the real units.
    """
    if HP != H:
        x = tl.where((tl.arange(0, HP) < H)[None, :], x, 0.0)
    return x


@triton.jit
def coordinate_lstm_step_kernel(
    grad_ptr,  # (N,) any float
    param_ptr,  # (N,) fp32 / bf16 / fp16
    param_out_ptr,  # (N,) param's dtype; may alias param_ptr
    h_ptr,  # (L, N, H) fp32 / bf16, layer stride h_layer_stride, updated in place
    c_ptr,  # (L, N, H) fp32 / bf16, layer stride c_layer_stride, updated in place
    m_ptr,  # (M, N) fp32 / bf16, row stride m_stride, updated in place (unused when M = 0)
    v_ptr,  # (R, N) fp32 / bf16, row stride v_stride, updated in place (unused when R = 0)
    w_ih0_ptr,  # (4H, NUM_INPUTS) fp32: layer 0 input weights
    w_ih_ptr,  # (max(L - 1, 1), 4H, H) fp32: input weights of layers 1..L-1
    w_hh_ptr,  # (L, 4H, H) fp32: recurrent weights
    bias_ptr,  # (L, 4H) fp32: b_ih + b_hh
    head_w_ptr,  # (H,) fp32
    head_b_ptr,  # (1,) fp32
    n_coords,
    h_layer_stride,
    c_layer_stride,
    m_stride,
    v_stride,
    mag_floor,  # e^-p
    p,  # preprocessing constant
    dir_scale,  # e^p
    rms_eps,  # added to sqrt(v) in the rms features
    output_scale,
    lr,
    NUM_LAYERS: tl.constexpr,
    H: tl.constexpr,
    HP: tl.constexpr,
    MOMENTUM_DECAYS: tl.constexpr,  # tuple of M fp32-exact floats in [0, 1)
    RMS_DECAYS: tl.constexpr,  # tuple of R fp32-exact floats in [0, 1)
    PARAM_INPUT: tl.constexpr,  # the parameter value is the last input feature
    NUM_INPUTS: tl.constexpr,  # 2 + 2M + R (+ 1 with PARAM_INPUT)
    MAXIMIZE: tl.constexpr,
    USE_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    FAST_TANH: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    # int64: L * N * H overflows int32 from about 50M coordinates at H = 20
    rows = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    row_mask = rows < n_coords
    cols = tl.arange(0, HP)
    col_mask = cols < H
    tile_mask = row_mask[:, None] & col_mask[None, :]
    tile = rows[:, None] * H + cols[None, :]

    # ---- preprocessing (learnedopt.nn.functional.preprocess), NaN-propagating like torch.clamp
    g = tl.load(grad_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    if MAXIMIZE:
        g = -g
    x_mag, x_dir = _preprocess(g, mag_floor, p, dir_scale)

    # ---- layer 0: input features (broadcast), recurrent product (dot or broadcast)
    h = tl.load(h_ptr + tile, mask=tile_mask, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + tile, mask=tile_mask, other=0.0).to(tl.float32)
    pre_i = _project(h, w_hh_ptr, 0, H, HP, H, HP, USE_DOT, INPUT_PRECISION)
    pre_f = _project(h, w_hh_ptr, 1, H, HP, H, HP, USE_DOT, INPUT_PRECISION)
    pre_g = _project(h, w_hh_ptr, 2, H, HP, H, HP, USE_DOT, INPUT_PRECISION)
    pre_o = _project(h, w_hh_ptr, 3, H, HP, H, HP, USE_DOT, INPUT_PRECISION)
    b_i = tl.load(bias_ptr + 0 * H + cols, mask=col_mask, other=0.0)
    b_f = tl.load(bias_ptr + 1 * H + cols, mask=col_mask, other=0.0)
    b_g = tl.load(bias_ptr + 2 * H + cols, mask=col_mask, other=0.0)
    b_o = tl.load(bias_ptr + 3 * H + cols, mask=col_mask, other=0.0)
    w_mag_i = _input_weights(w_ih0_ptr, 0, 0, NUM_INPUTS, H, HP)
    w_mag_f = _input_weights(w_ih0_ptr, 1, 0, NUM_INPUTS, H, HP)
    w_mag_g = _input_weights(w_ih0_ptr, 2, 0, NUM_INPUTS, H, HP)
    w_mag_o = _input_weights(w_ih0_ptr, 3, 0, NUM_INPUTS, H, HP)
    w_dir_i = _input_weights(w_ih0_ptr, 0, 1, NUM_INPUTS, H, HP)
    w_dir_f = _input_weights(w_ih0_ptr, 1, 1, NUM_INPUTS, H, HP)
    w_dir_g = _input_weights(w_ih0_ptr, 2, 1, NUM_INPUTS, H, HP)
    w_dir_o = _input_weights(w_ih0_ptr, 3, 1, NUM_INPUTS, H, HP)
    xm = x_mag[:, None]
    xd = x_dir[:, None]
    pre_i += xm * w_mag_i + xd * w_dir_i + b_i[None, :]
    pre_f += xm * w_mag_f + xd * w_dir_f + b_f[None, :]
    pre_g += xm * w_mag_g + xd * w_dir_g + b_g[None, :]
    pre_o += xm * w_mag_o + xd * w_dir_o + b_o[None, :]
    # the extra features in CoordinateLSTM.features' order: each momentum m_k = lerp(g, m_k,
    # beta_k), preprocessed (features 2 + 2k and 3 + 2k), then g / (sqrt(v_k) + eps) for each
    # second moment v_k = lerp(g^2, v_k, beta_k). The new moments are stored in place and the
    # features read their fp32 values, as on the PyTorch path.
    # the averages read g saturated at +-fp32 max / 2, as CoordinateLSTM.features does (lerp's
    # m - g cannot overflow)
    g_avg = _bounded_gradient(g)
    m_base = m_ptr
    for k in tl.static_range(len(MOMENTUM_DECAYS)):
        m = tl.load(m_base + rows, mask=row_mask, other=0.0).to(tl.float32)
        m = _lerp(g_avg, m, MOMENTUM_DECAYS[k])
        _store_rounded(m_base + rows, m, row_mask)
        m_mag, m_dir = _preprocess(m, mag_floor, p, dir_scale)
        pre_i, pre_f, pre_g, pre_o = _add_input(
            pre_i, pre_f, pre_g, pre_o, m_mag, w_ih0_ptr, 2 + 2 * k, NUM_INPUTS, H, HP
        )
        pre_i, pre_f, pre_g, pre_o = _add_input(
            pre_i, pre_f, pre_g, pre_o, m_dir, w_ih0_ptr, 3 + 2 * k, NUM_INPUTS, H, HP
        )
        m_base += m_stride
    v_base = v_ptr
    for k in tl.static_range(len(RMS_DECAYS)):
        v = tl.load(v_base + rows, mask=row_mask, other=0.0).to(tl.float32)
        v = _lerp(_bounded_square(g_avg), v, RMS_DECAYS[k])
        _store_rounded(v_base + rows, v, row_mask)
        # IEEE-rounded sqrt and division, as torch's (a GPU's default ones are approximate)
        x_rms = tl.div_rn(g, tl.sqrt_rn(v) + rms_eps)
        feature = 2 + 2 * len(MOMENTUM_DECAYS) + k
        pre_i, pre_f, pre_g, pre_o = _add_input(
            pre_i, pre_f, pre_g, pre_o, x_rms, w_ih0_ptr, feature, NUM_INPUTS, H, HP
        )
        v_base += v_stride
    if PARAM_INPUT:
        theta = tl.load(param_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        pre_i, pre_f, pre_g, pre_o = _add_input(
            pre_i, pre_f, pre_g, pre_o, theta, w_ih0_ptr, NUM_INPUTS - 1, NUM_INPUTS, H, HP
        )
    h, c = _cell(pre_i, pre_f, pre_g, pre_o, c, FAST_TANH)
    h = _zero_padding(h, H, HP)
    _store_rounded(h_ptr + tile, h, tile_mask)
    _store_rounded(c_ptr + tile, c, tile_mask)

    # ---- layers 1..L-1: input is the (BLOCK, HP) hidden state of the layer below
    h_base = h_ptr
    c_base = c_ptr
    for layer in tl.static_range(1, NUM_LAYERS):
        x = h
        # one stride per step: layer * stride could overflow int32 where the stride does not
        h_base += h_layer_stride
        c_base += c_layer_stride
        h_layer = h_base + tile
        c_layer = c_base + tile
        h = tl.load(h_layer, mask=tile_mask, other=0.0).to(tl.float32)
        c = tl.load(c_layer, mask=tile_mask, other=0.0).to(tl.float32)
        w_ih = w_ih_ptr + (layer - 1) * 4 * H * H
        w_hh = w_hh_ptr + layer * 4 * H * H
        bias = bias_ptr + layer * 4 * H
        pre_i, pre_f, pre_g, pre_o = _preactivations(
            x, h, w_ih, w_hh, bias, H, HP, H, HP, USE_DOT, INPUT_PRECISION
        )
        h, c = _cell(pre_i, pre_f, pre_g, pre_o, c, FAST_TANH)
        h = _zero_padding(h, H, HP)
        _store_rounded(h_layer, h, tile_mask)
        _store_rounded(c_layer, c, tile_mask)

    # ---- head and update
    head_w = tl.load(head_w_ptr + cols, mask=col_mask, other=0.0)
    step = (tl.sum(h * head_w[None, :], axis=1) + tl.load(head_b_ptr)) * output_scale
    old = tl.load(param_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    # lr == 0 must leave the parameter bit for bit (also -0.0, and under a non-finite step)
    new = tl.where(lr == 0.0, old, old + lr * step)
    _store_rounded(param_out_ptr + rows, new, row_mask)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


class PackedWeights(NamedTuple):
    """The rule's weights as the kernel reads them; all fp32, contiguous, on one device.

    Attributes:
        w_ih0: ``(4H, K)`` layer 0 input weights, ``K = 2 + 2M + R`` for ``M`` momentum and ``R``
            rms decays.
        w_ih: ``(max(L - 1, 1), 4H, H)`` input weights of layers 1.. (a zero dummy when L = 1).
        w_hh: ``(L, 4H, H)`` recurrent weights.
        bias: ``(L, 4H)``, ``bias_ih + bias_hh``.
        head_w: ``(H,)`` head weight.
        head_b: ``(1,)`` head bias.
    """

    w_ih0: Tensor
    w_ih: Tensor
    w_hh: Tensor
    bias: Tensor
    head_w: Tensor
    head_b: Tensor


def rule_weights(
    rule: torch.nn.Module, device: torch.device | str | None = None
) -> dict[str, Tensor]:
    """A :class:`CoordinateLSTM`'s ``state_dict`` as the fp32 contiguous tensors the launcher takes."""
    return {
        name: t.detach().to(device=device, dtype=torch.float32).contiguous()
        for name, t in rule.state_dict().items()
    }


def feature_count(
    momentum_decays: Sequence[float] = (), rms_decays: Sequence[float] = (), param_input: bool = False
) -> int:
    """``K``: the input features of layer 0 the kernel computes, ``2 + 2M + R (+ 1)`` (the
    preprocessed gradient, each preprocessed momentum, each rms-normalised gradient, the
    parameter value with ``param_input``)."""
    return 2 + 2 * len(momentum_decays) + len(rms_decays) + int(param_input)


def _input_count_error(got: int, expected: int) -> ValueError:
    return ValueError(
        f"the weights have {got} layer-0 inputs, but the feature set has {expected}: the fused "
        f"kernel reads the preprocessed gradient (2 inputs), 2 per momentum decay, 1 per rms "
        f"decay and 1 for the parameter value (pass the rule's momentum_decays, rms_decays and "
        f"param_input)"
    )


def pack_weights(
    weights: Mapping[str, Tensor], *, num_layers: int, hidden_size: int, num_inputs: int = 2
) -> PackedWeights:
    """Validate a :class:`CoordinateLSTM` ``state_dict`` and stack it for the kernel.

    Args:
        weights: ``lstm.weight_ih_l{k}`` ``(4H, in)``, ``lstm.weight_hh_l{k}`` ``(4H, H)``,
            ``lstm.bias_ih_l{k}`` and ``lstm.bias_hh_l{k}`` ``(4H,)`` for each layer ``k``,
            ``head.weight`` ``(1, H)`` and ``head.bias`` ``(1,)``; fp32, contiguous, one device.
            ``in`` must be ``num_inputs`` for layer 0 and ``H`` above.
        num_layers, hidden_size: ``L`` and ``H``.
        num_inputs: ``K``, layer 0's input features (the rule's ``config.num_inputs``;
            :func:`feature_count` of its decays for the in-place step kernel).

    Raises:
        ValueError: on a missing key, a wrong shape, dtype or device, a non-contiguous tensor, or
            weights with another number of input features.
    """
    if num_layers < 1 or hidden_size < 1:
        raise ValueError(
            f"num_layers and hidden_size must be >= 1, got {num_layers}, {hidden_size}"
        )
    L, H = num_layers, hidden_size
    expected: dict[str, tuple[int, ...]] = {}
    for k in range(L):
        expected[f"lstm.weight_ih_l{k}"] = (4 * H, num_inputs if k == 0 else H)
        expected[f"lstm.weight_hh_l{k}"] = (4 * H, H)
        expected[f"lstm.bias_ih_l{k}"] = (4 * H,)
        expected[f"lstm.bias_hh_l{k}"] = (4 * H,)
    expected["head.weight"] = (1, H)
    expected["head.bias"] = (1,)
    missing = [k for k in expected if k not in weights]
    if missing:
        raise ValueError(
            f"weights lack {missing} (expected a CoordinateLSTM state_dict with {L} layers)"
        )
    devices = {weights[k].device for k in expected}
    if len(devices) != 1:
        raise ValueError(f"weights are on several devices: {sorted(map(str, devices))}")
    w0 = weights["lstm.weight_ih_l0"]
    if w0.dim() == 2 and w0.shape[0] == 4 * H and w0.shape[1] != num_inputs:
        raise ValueError(
            f"the weights have {w0.shape[1]} layer-0 inputs, but num_inputs is {num_inputs} "
            f"(the rule's config.num_inputs)"
        )
    for name, shape in expected.items():
        check_kernel_tensor(f"weights[{name!r}]", weights[name], shape, f" (L={L}, H={H})")
    w_hh = torch.stack([weights[f"lstm.weight_hh_l{k}"] for k in range(L)])
    if L > 1:
        w_ih = torch.stack([weights[f"lstm.weight_ih_l{k}"] for k in range(1, L)])
    else:
        w_ih = w_hh.new_zeros(1, 4 * H, H)
    bias = torch.stack(
        [weights[f"lstm.bias_ih_l{k}"] + weights[f"lstm.bias_hh_l{k}"] for k in range(L)]
    )
    return PackedWeights(
        w_ih0=w0,
        w_ih=w_ih,
        w_hh=w_hh,
        bias=bias,
        head_w=weights["head.weight"].reshape(H),
        head_b=weights["head.bias"],
    )


def packed_shapes(num_layers: int, hidden_size: int, num_inputs: int) -> dict[str, tuple[int, ...]]:
    """The shape of each :class:`PackedWeights` tensor for ``L`` layers of ``H`` units and ``K``
    layer-0 inputs (what :func:`pack_weights` makes)."""
    L, H = num_layers, hidden_size
    return {
        "w_ih0": (4 * H, num_inputs),
        "w_ih": (max(L - 1, 1), 4 * H, H),
        "w_hh": (L, 4 * H, H),
        "bias": (L, 4 * H),
        "head_w": (H,),
        "head_b": (1,),
    }


def check_packed(packed: PackedWeights | MetaPackedWeights, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raise ValueError unless every tensor of ``packed`` (a :class:`PackedWeights`, or the meta
    kernel's ``MetaPackedWeights``) has its shape in ``shapes`` and is float32, contiguous and on
    one device: the kernels index each by that layout, so a tensor of another shape would be
    read past its end, and one of another dtype or strides misread. (:func:`pack_weights` makes
    them so; this catches packed weights made or altered by hand.)"""
    fields = packed._asdict()
    for name, shape in shapes.items():
        check_kernel_tensor(f"packed weights' {name}", fields[name], shape)
    devices = {t.device for t in fields.values()}
    if len(devices) != 1:
        raise ValueError(f"packed weights are on several devices: {sorted(map(str, devices))}")


def check_kernel_tensor(label: str, t: object, shape: tuple[int, ...], context: str = "") -> None:
    """Raise ValueError, naming ``label`` (and ``context`` after an unexpected shape), unless ``t``
    is a float32 contiguous tensor of ``shape``, the layout by which a kernel indexes a weight
    tensor: the check of :func:`pack_weights`'s inputs and :func:`check_packed`'s fields (the meta
    kernel's too)."""
    if not isinstance(t, Tensor) or tuple(t.shape) != shape:
        raise ValueError(f"{label} has shape {tuple(getattr(t, 'shape', ()))}, expected {shape}{context}")
    if t.dtype != torch.float32:
        raise ValueError(f"{label} must be float32, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{label} must be contiguous, got strides {t.stride()}")


def check_power_of_two(name: str, value: object, minimum: int = 1) -> None:
    """Raise ValueError unless ``value`` is an integer power of two ``>= minimum``: an integer
    (:func:`~learnedopt.values.is_integer`), not a float (``32.0`` failed the bit test with a
    TypeError) nor a bool (``num_warps=True`` ran as one warp). A launch option's check
    (``block``, ``num_warps``; :class:`KernelOptions`'s too)."""
    if not is_integer(value) or value < minimum or value & (value - 1):  # type: ignore[operator]
        at_least = f" >= {minimum}" if minimum > 1 else ""
        raise ValueError(f"{name} must be an integer power of two{at_least}, got {value!r}")


def check_step_arguments(
    grad: Tensor,
    param: Tensor,
    param_out: Tensor,
    *,
    preprocess_p: float,
    block: int,
    num_warps: int,
    input_precision: str,
    switches: Mapping[str, object] | None = None,
) -> int:
    """The checks a fused step launcher makes of its coordinate tensors and launch options;
    returns the number of coordinates ``n``.

    ``grad`` and ``param`` must be contiguous 1-D tensors of ``n`` elements (``(N,)``), in a
    gradient and a parameter dtype, and ``param_out`` a contiguous tensor of ``param``'s shape
    and dtype (``param`` itself for an in-place update). ``block`` and ``num_warps`` must be
    integers (not bools), and each of ``switches`` (name: value) True or False, as the
    optimizers take ``maximize``: a string such as ``"no"`` would otherwise count as true.

    Raises:
        ValueError: the first problem found.
    """
    for name, value in (switches or {}).items():
        if isinstance(value, Tensor) or value not in (True, False):
            raise ValueError(f"{name} must be True or False, got {value!r}")
    if not preprocess_p > 0:
        raise ValueError(f"preprocess_p must be positive, got {preprocess_p}")
    # the rule's own bounds: e^p and log|g| / p must be finite in float32 (p = 100 made a zero
    # gradient's direction feature 0 * Inf = NaN)
    check_preprocess_p(preprocess_p)
    check_power_of_two("block", block, 16)
    check_power_of_two("num_warps", num_warps)
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(
            f"input_precision must be one of {INPUT_PRECISIONS}, got {input_precision!r}"
        )
    for name, t, dtypes in (("grad", grad, GRAD_DTYPES), ("param", param, PARAM_DTYPES)):
        if not isinstance(t, Tensor) or t.dim() != 1 or not t.is_contiguous():
            raise ValueError(
                f"{name} must be a contiguous 1-D tensor, got {getattr(t, 'shape', type(t))}"
            )
        if t.dtype not in dtypes:
            raise ValueError(f"{name} dtype must be one of {dtypes}, got {t.dtype}")
    n = param.numel()
    if grad.numel() != n:
        raise ValueError(f"grad has {grad.numel()} elements, param has {n}")
    if (
        not isinstance(param_out, Tensor)
        or param_out.shape != param.shape
        or not param_out.is_contiguous()
    ):
        raise ValueError(f"param_out must be a contiguous tensor of shape {tuple(param.shape)}")
    if param_out.dtype != param.dtype:
        raise ValueError(
            f"param_out dtype {param_out.dtype} differs from param dtype {param.dtype}"
        )
    return n


def check_no_overlap(written: Mapping[str, Tensor], read: Mapping[str, Tensor]) -> None:
    """Raise ValueError if a buffer the kernel writes in place (each ``(K, ...)`` with a
    contiguous ``t[k]``) overlaps itself or the memory of another argument: programs would read
    values another has already overwritten. ``param_out`` may be ``param`` itself (an in-place
    update); any other sharing, even partial, is refused.
    """

    def span(t: Tensor) -> tuple[int, int]:
        extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
        return t.data_ptr(), t.data_ptr() + extent * t.element_size()

    live = {name: t for name, t in {**written, **read}.items() if t.numel() > 0}
    for name, t in written.items():
        if t.numel() > 0 and t.dim() > 1 and t.shape[0] > 1 and t.stride(0) < t[0].numel():
            raise ValueError(f"{name}'s slabs overlap (strides {t.stride()}): each must have memory of its own")
    names = list(live)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if a not in written and b not in written:
                continue
            if {a, b} == {"param", "param_out"} and live[a].data_ptr() == live[b].data_ptr():
                continue  # the in-place update
            (a0, a1), (b0, b1) = span(live[a]), span(live[b])
            if a0 < b1 and b0 < a1:
                raise ValueError(f"{a} and {b} share memory; the kernel writes {a if a in written else b} in place")


def check_launch_device(tensors: Mapping[str, Tensor], *, fast_tanh: bool = False) -> torch.device:
    """The one device of a launch's ``tensors`` (named for the error messages).

    Raises:
        ValueError: tensors on several devices, CPU tensors without the Triton interpreter, or
            ``fast_tanh`` (PTX inline assembly) anywhere but on CUDA.
    """
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        raise ValueError(
            f"all tensors must be on one device, got { {k: str(t.device) for k, t in tensors.items()} }"
        )
    device = devices.pop()
    interpreted = is_interpreted()
    if device.type == "cpu" and not interpreted:
        raise ValueError(
            "CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1 before importing triton)"
        )
    if fast_tanh and (interpreted or device.type != "cuda"):
        raise ValueError("fast_tanh uses PTX inline assembly: NVIDIA GPUs only, not the interpreter")
    return device


def mark_written(tensors: Sequence[Tensor]) -> None:
    """Count ``tensors`` (of any shape) as modified in place, as a PyTorch in-place operation
    would: a kernel writes them through their pointers, which autograd does not see, so a graph
    that saved one before the launch would otherwise back-propagate silently with the new values
    where PyTorch raises its "modified by an inplace operation" error."""
    torch.autograd.graph.increment_version(list(tensors))


def is_interpreted() -> bool:
    """Whether the kernel runs in the Triton interpreter (TRITON_INTERPRET set at import time)."""
    return isinstance(coordinate_lstm_step_kernel, InterpretedFunction)


def _check_states(
    name: str, t: Tensor | None, shape: tuple[int, ...], dims: str, slab: str
) -> None:
    """A state buffer: ``shape`` (``dims`` names it), a state dtype, and each ``t[k]`` contiguous
    (``slab`` names it) with any stride between them, so ``buffer[:, a:b]`` views work (that
    they do not overlap is :func:`check_no_overlap`'s)."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a tensor of shape {dims} = {shape}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {dims} = {shape}")
    if t.dtype not in STATE_DTYPES:
        raise ValueError(f"{name} must be one of {STATE_DTYPES}, got {t.dtype}")
    if t.numel() > 0 and not t[0].is_contiguous():
        raise ValueError(f"{name} must have a contiguous {slab}, got strides {t.stride()}")


def _fp32_decays(name: str, decays: Sequence[float]) -> tuple[float, ...]:
    """The decays rounded to fp32, as the PyTorch path's weight tensor holds them (the kernel
    takes them as constants, and ``1 - beta`` is then exact in Python as in fp32)."""
    if not all(0.0 <= beta < 1.0 for beta in decays):
        raise ValueError(f"{name} must be in [0, 1), got {tuple(decays)}")
    if not all(below_one_in_float32(beta) for beta in decays):  # the moment would never move (v / 1e-8 overflowing)
        raise ValueError(f"{name} must be below 1 in fp32, got {tuple(decays)}")
    return tuple(torch.tensor(decays, dtype=torch.float32, device="cpu").tolist())


def coordinate_lstm_step_(
    grad: Tensor,
    param: Tensor,
    param_out: Tensor,
    h: Tensor,
    c: Tensor,
    weights: Mapping[str, Tensor] | PackedWeights,
    *,
    num_layers: int,
    hidden_size: int,
    preprocess_p: float,
    output_scale: float,
    lr: float,
    maximize: bool,
    momentum_decays: Sequence[float] = (),
    rms_decays: Sequence[float] = (),
    param_input: bool = False,
    m: Tensor | None = None,
    v: Tensor | None = None,
    use_dot: bool = True,
    block: int = 64,
    num_warps: int = 4,
    input_precision: str = "ieee",
    fast_tanh: bool = False,
) -> None:
    """One fused step of the coordinatewise LSTM rule over ``N`` flat coordinates.

    Writes the new states into ``h``, ``c`` (and ``m``, ``v``) and ``param + lr * step`` into
    ``param_out``; autograd counts each as modified in place (:func:`mark_written`).

    Args:
        grad: ``(N,)`` contiguous gradient, float16/bfloat16/float32/float64 (read as fp32).
        param: ``(N,)`` contiguous parameter values, float16/bfloat16/float32.
        param_out: ``(N,)`` contiguous, ``param``'s dtype; may be ``param`` itself.
        h, c: ``(L, N, H)`` float32 or bfloat16 states, each layer a contiguous ``(N, H)`` slab
            (any layer stride that keeps the layers apart, so ``buffer[:, a:b]`` views work); updated
            in place. No in-place buffer may share memory with another argument (``param_out``
            may be ``param``).
        weights: a :class:`CoordinateLSTM` ``state_dict`` of fp32 contiguous tensors (see
            :func:`rule_weights`), or its :func:`pack_weights` result to skip re-stacking it.
        num_layers, hidden_size: ``L`` and ``H`` of the rule.
        preprocess_p: the preprocessing constant ``p``, in the rule's bounds (``nn.functional.check_preprocess_p``: about 2.6e-37 to 87.3).
        output_scale: the head's output multiplier.
        lr: multiplier of the step (0 leaves ``param_out`` equal to ``param`` bit for bit).
        maximize: negate the gradient first.
        momentum_decays, rms_decays, param_input: the rule's extra inputs
            (``CoordinateLSTMConfig``'s fields of those names), ``M`` and ``R`` decays in [0, 1).
        m: ``(M, N)`` float32 or bfloat16 momenta, each row contiguous (any row stride); updated
            in place. Required iff ``momentum_decays`` is not empty.
        v: ``(R, N)`` second moments for ``rms_decays``, likewise.
        use_dot: ``tl.dot`` (True) or broadcast multiply + sum (False) for the layer products.
        block: coordinates per program, a power of two >= 16.
        num_warps: warps per program (GPU only).
        input_precision: ``tl.dot`` precision for fp32 operands: "ieee" (exact fp32), "tf32x3"
            or "tf32".
        fast_tanh: use PTX ``tanh.approx.f32`` (NVIDIA GPUs only; not in the interpreter).

    Raises:
        ValueError: on any shape, dtype, device, layout or option the kernel does not support.
    """
    if num_layers < 1 or hidden_size < 1:
        raise ValueError(
            f"num_layers and hidden_size must be >= 1, got {num_layers}, {hidden_size}"
        )
    n = check_step_arguments(
        grad, param, param_out, preprocess_p=preprocess_p, block=block, num_warps=num_warps,
        input_precision=input_precision,
        switches={"maximize": maximize, "use_dot": use_dot, "param_input": param_input, "fast_tanh": fast_tanh},
    )
    for name, t in (("h", h), ("c", c)):
        _check_states(name, t, (num_layers, n, hidden_size), "(L, N, H)", "(N, H) slab per layer")
    momentum_decays = _fp32_decays("momentum_decays", momentum_decays)
    rms_decays = _fp32_decays("rms_decays", rms_decays)
    moments: dict[str, Tensor] = {}
    for name, t, decays, dims in (
        ("m", m, momentum_decays, "(M, N)"),
        ("v", v, rms_decays, "(R, N)"),
    ):
        if decays:
            _check_states(name, t, (len(decays), n), dims, "(N,) row per decay")
            moments[name] = t
        elif t is not None:
            raise ValueError(f"{name} is given, but its decays are empty")
    k = feature_count(momentum_decays, rms_decays, param_input)
    if isinstance(weights, PackedWeights):
        packed = weights
    else:
        w0 = weights.get("lstm.weight_ih_l0")
        if isinstance(w0, Tensor) and w0.dim() == 2 and w0.shape[1] != k:
            raise _input_count_error(w0.shape[1], k)
        packed = pack_weights(weights, num_layers=num_layers, hidden_size=hidden_size, num_inputs=k)
    if packed.w_hh.shape != (num_layers, 4 * hidden_size, hidden_size):
        raise ValueError(
            f"packed weights are for {tuple(packed.w_hh.shape)}, not L={num_layers}, H={hidden_size}"
        )
    # the friendlier error for a 2-D w_ih0 of other columns; check_packed refuses every other shape
    if isinstance(packed.w_ih0, Tensor) and packed.w_ih0.dim() == 2 and packed.w_ih0.shape[1] != k:
        raise _input_count_error(packed.w_ih0.shape[1], k)
    check_packed(packed, packed_shapes(num_layers, hidden_size, k))
    tensors = {
        "grad": grad,
        "param": param,
        "param_out": param_out,
        "h": h,
        "c": c,
        **moments,
        "weights": packed.w_hh,
    }
    check_launch_device(tensors, fast_tanh=fast_tanh)
    check_no_overlap({"param_out": param_out, "h": h, "c": c, **moments}, {"grad": grad, "param": param})
    if n == 0:
        return

    grid = (triton.cdiv(n, block),)
    coordinate_lstm_step_kernel[grid](
        grad,
        param,
        param_out,
        h,
        c,
        moments.get("m", grad),  # a dummy where there are none: never read
        moments.get("v", grad),
        packed.w_ih0,
        packed.w_ih,
        packed.w_hh,
        packed.bias,
        packed.head_w,
        packed.head_b,
        n,
        h.stride(0),
        c.stride(0),
        m.stride(0) if momentum_decays else 0,
        v.stride(0) if rms_decays else 0,
        math.exp(-preprocess_p),
        float(preprocess_p),
        math.exp(preprocess_p),
        RMS_EPS,
        float(output_scale),
        float(lr),
        NUM_LAYERS=num_layers,
        H=hidden_size,
        HP=padded_hidden_size(hidden_size),
        MOMENTUM_DECAYS=momentum_decays,
        RMS_DECAYS=rms_decays,
        PARAM_INPUT=bool(param_input),
        NUM_INPUTS=k,
        MAXIMIZE=bool(maximize),
        USE_DOT=bool(use_dot),
        INPUT_PRECISION=input_precision,
        FAST_TANH=bool(fast_tanh),
        BLOCK=block,
        num_warps=num_warps,
    )
    mark_written([param_out, h, c, *moments.values()])
