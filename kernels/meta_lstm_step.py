"""Fused optimizer step of Ravi & Larochelle's meta-learner (:class:`learnedopt.nn.MetaLSTMCell`).

Design: one launch per call over a flat range of ``N`` coordinates, in ONE pass over memory, like
:mod:`learnedopt.kernels.coordinate_lstm_step` (whose jit helpers ``_preprocess``, ``_project``,
``_cell``, ``_sigmoid``, ``_zero_padding`` and ``_store_rounded`` it reuses). Each program takes ``BLOCK``
consecutive coordinates and, entirely in registers,

1. loads the gradient (any float dtype, converted to fp32) and negates it under ``maximize``;
2. preprocesses it into ``(log(max(|g|, e^-p)) / p, clamp(e^p g, -1, 1))``;
3. runs the input LSTM (``nn.LSTM(4, H)``, torch gate order i, f, g, o) on those two features and
   the two loss features, loading ``h`` and ``c`` (float32 or bfloat16, converted to fp32) and
   storing the new ones in place in their own dtype;
4. computes the meta-learner's gates from the new hidden state ``x_t``, the parameter
   ``theta_{t-1}`` and the previous gate values (loaded from ``fi``)::

       f = sigmoid(b_f + sum_k x_t[k] W_f[k] + theta W_f[H] + f_prev W_f[H + 1])
       i = sigmoid(b_i + sum_k x_t[k] W_i[k] + theta W_i[H] + i_prev W_i[H + 1])

   with the ``x_t`` part a per-row sum (``tl.sum``), as :meth:`MetaLSTMCell.forward` computes it,
   and stores ``f, i`` back into ``fi``;
5. computes what the input gate scales, ``d`` (:meth:`MetaLSTMCell.direction`): the gradient
   in the paper's configuration, or Adam's direction ``m_hat / (sqrt(v_hat) + 1e-8)`` from the
   bias-corrected moving averages in ``m`` and ``v`` (each ``(2, N)``: the average and its weight
   ``1 - beta^t``; ``lerp`` with torch's two formulas, IEEE-rounded division and ``sqrt``), times
   ``step_scale``, storing the new averages in place;
6. writes ``param_out = param + lr * step`` with ``step = (f - 1) * param - i * d`` in the
   parameter's dtype.

That is what :meth:`MetaLSTMCell.forward` followed by ``param.add_(step, alpha=lr)`` computes in
:func:`learnedopt.optim.update.flat_update_` with ``compute_dtype=torch.float32``, up to the
order of fp32 reductions and the pre-summed LSTM biases (a few ulps).

The loss. :class:`MetaLSTMCell` feeds the scalar optimizee loss, preprocessed like the gradient,
to every coordinate. It is one value per launch, so the launcher preprocesses it on the host (with
:func:`learnedopt.nn.functional.preprocess` on a float32 tensor, the reference's own function and
dtype) and passes the two features as fp32 scalars; a CUDA loss tensor costs one host sync, which
the optimizer's finiteness check of the loss already pays. Each program folds them with the input
weights' loss columns and the biases into one per-gate ``(HP,)`` vector. Under ``maximize`` the
rule sees ``-grad`` and ``-loss``, as :class:`learnedopt.MetaLSTMOptimizer` does.

Layout. ``h`` and ``c`` are ``(1, N, H)`` with a contiguous ``(N, H)`` slab; ``fi`` is ``(2, N)``
with unit stride along ``N`` and any row stride, so coordinate ranges ``buf[:, a:b]`` of the
optimizer's bigger flat state buffers are passed without copies. ``H`` is padded to ``HP`` (a
power of two, at least 16) with masks, as in the other kernel: padded units keep ``h = c = 0``
and, with zero-loaded weights, never reach the real ones or the gates.

Products. Only the recurrent product ``h @ W_hh^T`` is a matrix product per coordinate
(``(BLOCK, HP) x (HP, HP)`` per gate): ``tl.dot`` with ``USE_DOT`` (``INPUT_PRECISION`` "ieee",
fp32-exact, by default), else a broadcast multiply and ``tl.sum``. The four input features are
below ``tl.dot``'s minimum inner dimension of 16 and are broadcast multiply-adds. Per coordinate:
``2 x 4H x (4 + H) + 2 x 2 x (H + 2)`` useful FLOPs (3,928 at H = 20) and ``3 + 4H + 4`` values
moved (grad; param in/out; ``h``, ``c`` in/out; ``fi`` in/out): 348 B at H = 20 with fp32
states and parameters, 180 B with bf16 states. Adam's direction adds ``m`` and ``v`` in and out
(8 values, 32 B in fp32) and about 20 FLOPs.

Activations and rounding: as in :mod:`learnedopt.kernels.coordinate_lstm_step` (portable
``2 sigmoid(2x) - 1`` tanh by default, PTX ``tanh.approx.f32`` behind ``FAST_TANH`` on NVIDIA GPUs
only; bfloat16 stores round to nearest even with integer arithmetic so that the interpreter and
GPUs both match ``torch.Tensor.to(torch.bfloat16)``).

Supports: hidden sizes >= 1, any ``p > 0``; float32/bfloat16/float16 parameters (float64 ones stay
on the PyTorch path: the update is computed in fp32); float16/bfloat16/float32/float64 gradients;
float32 or bfloat16 states (each of ``h``, ``c``, ``fi`` in either); any ``N`` (masked tails);
``lr = 0`` leaves the parameter bit for bit. Non-contiguous parameters and several tensors per
group are the caller's business (:func:`learnedopt.optim.update.fused_update_` gathers a run of
tensors into one flat range). Forward only, in place: the differentiable step for meta-training
is :mod:`learnedopt.kernels.meta_lstm_backward`.

Register budget (H = 20 padded to 32, sm_90, compiled offline with Triton 3.9's bundled ptxas and
read with ``cuobjdump``; never run or timed on a GPU, none was available): with
``INPUT_PRECISION="ieee"`` BLOCK 64 / 4 warps uses 255 registers plus 296 B of spill stack
(64 / 8 warps: 8 B; 32 / 4 warps: 254 registers, no spill; 128 / 4 warps: 7.6 KB), while
"tf32x3" and "tf32" at 64 / 4 warps do not spill (247 and 200 registers). Adam's direction
(``meta-lstm-adam``) compiles to the same 255 registers and 296 B of stack at BLOCK 64 / 4 warps.
The launcher keeps the other kernel's BLOCK 64 / 4 warps / "ieee" default (exact, not tuned for
speed): tune on the GPU with ``benchmarks/kernel_bench.py``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from torch import Tensor

from ..nn.functional import RMS_EPS, below_one_in_float32, preprocess
from .coordinate_lstm_step import (
    STATE_DTYPES,
    _bounded_gradient,
    _bounded_square,
    _cell,
    _fp32_decays,
    _lerp,
    _preprocess,
    _project,
    _sigmoid,
    _store_rounded,
    _zero_padding,
    check_launch_device,
    check_kernel_tensor,
    check_no_overlap,
    check_packed,
    check_step_arguments,
    mark_written,
    padded_hidden_size,
)

__all__ = [
    "MetaPackedWeights",
    "loss_features",
    "meta_lstm_step_",
    "pack_weights",
    "rule_weights",
]


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _input_gate(
    x_mag,
    x_dir,
    w_ih_ptr,
    bias_ptr,
    l_mag,
    l_dir,
    gate: tl.constexpr,
    H: tl.constexpr,
    HP: tl.constexpr,
):
    """The input part of one gate's pre-activation, ``(BLOCK, HP)``: the gradient features times
    their weight columns (broadcast), plus the per-launch constant loss term and bias."""
    cols = tl.arange(0, HP)
    col_mask = cols < H
    row = (gate * H + cols) * 4  # W_ih is (4H, 4) row-major: columns g_mag, g_dir, l_mag, l_dir
    w_mag = tl.load(w_ih_ptr + row, mask=col_mask, other=0.0)
    w_dir = tl.load(w_ih_ptr + row + 1, mask=col_mask, other=0.0)
    w_lmag = tl.load(w_ih_ptr + row + 2, mask=col_mask, other=0.0)
    w_ldir = tl.load(w_ih_ptr + row + 3, mask=col_mask, other=0.0)
    const = (
        l_mag * w_lmag
        + l_dir * w_ldir
        + tl.load(bias_ptr + gate * H + cols, mask=col_mask, other=0.0)
    )
    return x_mag[:, None] * w_mag[None, :] + x_dir[:, None] * w_dir[None, :] + const[None, :]


@triton.jit
def _meta_gate(
    x,
    theta,
    prev,
    w_fi_ptr,
    b_fi_ptr,
    row: tl.constexpr,
    H: tl.constexpr,
    HP: tl.constexpr,
    FAST_TANH: tl.constexpr,
):
    """``sigmoid(b + sum_k x[:, k] w[k] + theta w[H] + prev w[H + 1])`` for row ``row`` of the
    ``(2, H + 2)`` gate weights, in :meth:`MetaLSTMCell.forward`'s order of additions."""
    cols = tl.arange(0, HP)
    w = tl.load(w_fi_ptr + row * (H + 2) + cols, mask=cols < H, other=0.0)
    w_theta = tl.load(w_fi_ptr + row * (H + 2) + H)
    w_prev = tl.load(w_fi_ptr + row * (H + 2) + H + 1)
    pre = tl.load(b_fi_ptr + row) + tl.sum(x * w[None, :], axis=1)
    pre = pre + theta * w_theta
    pre = pre + prev * w_prev
    return _sigmoid(pre, FAST_TANH)


@triton.jit
def _debiased_ema(x, ptr, rows, row_mask, row_stride, DECAY: tl.constexpr):
    """:func:`learnedopt.nn.functional.debiased_ema` of ``x`` on the ``(2, N)`` state at ``ptr``
    (average, weight), stored back in place: the bias-corrected average, saturated at fp32's
    largest finite value as there (``where``s, so that NaN stays NaN)."""
    average = tl.load(ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    weight = tl.load(ptr + row_stride + rows, mask=row_mask, other=0.0).to(tl.float32)
    average = _lerp(x, average, DECAY)
    weight = _lerp(1.0, weight, DECAY)
    _store_rounded(ptr + rows, average, row_mask)
    _store_rounded(ptr + row_stride + rows, weight, row_mask)
    corrected = tl.div_rn(average, weight)
    corrected = tl.where(corrected > 3.4028234663852886e38, 3.4028234663852886e38, corrected)
    return tl.where(corrected < -3.4028234663852886e38, -3.4028234663852886e38, corrected)


@triton.jit
def meta_lstm_step_kernel(
    grad_ptr,  # (N,) any float
    param_ptr,  # (N,) fp32 / bf16 / fp16
    param_out_ptr,  # (N,) param's dtype; may alias param_ptr
    h_ptr,  # (1, N, H) fp32 / bf16, contiguous (N, H) slab, updated in place
    c_ptr,  # (1, N, H) fp32 / bf16, contiguous (N, H) slab, updated in place
    fi_ptr,  # (2, N) fp32 / bf16, unit stride along N, row stride fi_row_stride, updated in place
    m_ptr,  # (2, N) like fi, with MOMENTUM_DECAY (else a dummy, never read)
    v_ptr,  # (2, N) like fi, with RMS_DECAY (else a dummy, never read)
    w_ih_ptr,  # (4H, 4) fp32: input LSTM input weights
    w_hh_ptr,  # (4H, H) fp32: input LSTM recurrent weights
    bias_ptr,  # (4H,) fp32: b_ih + b_hh
    w_fi_ptr,  # (2, H + 2) fp32: forget / input gate weights
    b_fi_ptr,  # (2,) fp32
    n_coords,
    fi_row_stride,
    m_row_stride,
    v_row_stride,
    mag_floor,  # e^-p
    p,  # preprocessing constant
    dir_scale,  # e^p
    loss_mag,  # preprocessed (signed) loss, feature 0
    loss_dir,  # preprocessed (signed) loss, feature 1
    rms_eps,  # added to sqrt(v_hat)
    step_scale,
    lr,
    MOMENTUM_DECAY: tl.constexpr,  # () or (beta_1,)
    RMS_DECAY: tl.constexpr,  # () or (beta_2,)
    SCALED: tl.constexpr,  # step_scale != 1
    H: tl.constexpr,
    HP: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    USE_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    FAST_TANH: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: N * H overflows int32 early
    row_mask = rows < n_coords
    cols = tl.arange(0, HP)
    tile_mask = row_mask[:, None] & (cols < H)[None, :]
    tile = rows[:, None] * H + cols[None, :]

    # ---- preprocessing (learnedopt.nn.functional.preprocess), NaN-propagating like torch.clamp
    g = tl.load(grad_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    if MAXIMIZE:
        g = -g
    x_mag, x_dir = _preprocess(g, mag_floor, p, dir_scale)

    # ---- the input LSTM, one layer
    h = tl.load(h_ptr + tile, mask=tile_mask, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + tile, mask=tile_mask, other=0.0).to(tl.float32)
    pre_i = _project(h, w_hh_ptr, 0, H, HP, H, HP, USE_DOT, INPUT_PRECISION)
    pre_f = _project(h, w_hh_ptr, 1, H, HP, H, HP, USE_DOT, INPUT_PRECISION)
    pre_g = _project(h, w_hh_ptr, 2, H, HP, H, HP, USE_DOT, INPUT_PRECISION)
    pre_o = _project(h, w_hh_ptr, 3, H, HP, H, HP, USE_DOT, INPUT_PRECISION)
    pre_i += _input_gate(x_mag, x_dir, w_ih_ptr, bias_ptr, loss_mag, loss_dir, 0, H, HP)
    pre_f += _input_gate(x_mag, x_dir, w_ih_ptr, bias_ptr, loss_mag, loss_dir, 1, H, HP)
    pre_g += _input_gate(x_mag, x_dir, w_ih_ptr, bias_ptr, loss_mag, loss_dir, 2, H, HP)
    pre_o += _input_gate(x_mag, x_dir, w_ih_ptr, bias_ptr, loss_mag, loss_dir, 3, H, HP)
    h, c = _cell(pre_i, pre_f, pre_g, pre_o, c, FAST_TANH)
    h = _zero_padding(h, H, HP)
    _store_rounded(h_ptr + tile, h, tile_mask)
    _store_rounded(c_ptr + tile, c, tile_mask)

    # ---- the meta-learner cell: gates from x_t = h, theta_{t-1} and the previous gates
    theta = tl.load(param_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    f_prev = tl.load(fi_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    i_prev = tl.load(fi_ptr + fi_row_stride + rows, mask=row_mask, other=0.0).to(tl.float32)
    forget = _meta_gate(h, theta, f_prev, w_fi_ptr, b_fi_ptr, 0, H, HP, FAST_TANH)
    input_gate = _meta_gate(h, theta, i_prev, w_fi_ptr, b_fi_ptr, 1, H, HP, FAST_TANH)
    _store_rounded(fi_ptr + rows, forget, row_mask)
    _store_rounded(fi_ptr + fi_row_stride + rows, input_gate, row_mask)

    # ---- what the input gate scales (MetaLSTMCell.direction), then the update
    # the averages read g saturated at +-fp32 max / 2, as MetaLSTMCell.direction does
    d = g
    g_avg = _bounded_gradient(g)
    for _ in tl.static_range(len(MOMENTUM_DECAY)):
        d = _debiased_ema(g_avg, m_ptr, rows, row_mask, m_row_stride, MOMENTUM_DECAY[0])
    for _ in tl.static_range(len(RMS_DECAY)):
        second = _debiased_ema(_bounded_square(g_avg), v_ptr, rows, row_mask, v_row_stride, RMS_DECAY[0])
        d = tl.div_rn(d, tl.sqrt_rn(second) + rms_eps)
    if SCALED:
        d = d * step_scale
    step = (forget - 1.0) * theta - input_gate * d
    # lr == 0 must leave the parameter bit for bit (also -0.0, and under a non-finite step)
    new = tl.where(lr == 0.0, theta, theta + lr * step)
    _store_rounded(param_out_ptr + rows, new, row_mask)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


class MetaPackedWeights(NamedTuple):
    """A :class:`MetaLSTMCell`'s weights as the kernel reads them; all fp32, contiguous, one device.

    Attributes:
        w_ih: ``(4H, 4)`` input LSTM input weights (columns: gradient magnitude and sign, loss
            magnitude and sign).
        w_hh: ``(4H, H)`` input LSTM recurrent weights.
        bias: ``(4H,)``, ``bias_ih + bias_hh``.
        w_fi: ``(2, H + 2)`` forget / input gate weights.
        b_fi: ``(2,)`` forget / input gate biases.
    """

    w_ih: Tensor
    w_hh: Tensor
    bias: Tensor
    w_fi: Tensor
    b_fi: Tensor


def rule_weights(
    rule: torch.nn.Module, device: torch.device | str | None = None
) -> dict[str, Tensor]:
    """A :class:`MetaLSTMCell`'s ``state_dict`` as the fp32 contiguous tensors the launcher takes."""
    return {
        name: t.detach().to(device=device, dtype=torch.float32).contiguous()
        for name, t in rule.state_dict().items()
    }


def packed_shapes(hidden_size: int) -> dict[str, tuple[int, ...]]:
    """The shape of each :class:`MetaPackedWeights` tensor for ``H`` units (what
    :func:`pack_weights` makes)."""
    H = hidden_size
    return {"w_ih": (4 * H, 4), "w_hh": (4 * H, H), "bias": (4 * H,), "w_fi": (2, H + 2), "b_fi": (2,)}


def pack_weights(weights: Mapping[str, Tensor], *, hidden_size: int) -> MetaPackedWeights:
    """Validate a :class:`MetaLSTMCell` ``state_dict`` and pack it for the kernel.

    Args:
        weights: ``lstm.weight_ih_l0`` ``(4H, 4)``, ``lstm.weight_hh_l0`` ``(4H, H)``,
            ``lstm.bias_ih_l0`` and ``lstm.bias_hh_l0`` ``(4H,)``, ``weight_fi`` ``(2, H + 2)`` and
            ``bias_fi`` ``(2,)``; fp32, contiguous, one device.
        hidden_size: ``H``.

    Raises:
        ValueError: on a missing key, a wrong shape, dtype or device, or a non-contiguous tensor.
    """
    if hidden_size < 1:
        raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
    H = hidden_size
    expected = {
        "lstm.weight_ih_l0": (4 * H, 4),
        "lstm.weight_hh_l0": (4 * H, H),
        "lstm.bias_ih_l0": (4 * H,),
        "lstm.bias_hh_l0": (4 * H,),
        "weight_fi": (2, H + 2),
        "bias_fi": (2,),
    }
    missing = [k for k in expected if k not in weights]
    if missing:
        raise ValueError(f"weights lack {missing} (expected a MetaLSTMCell state_dict)")
    devices = {weights[k].device for k in expected}
    if len(devices) != 1:
        raise ValueError(f"weights are on several devices: {sorted(map(str, devices))}")
    for name, shape in expected.items():
        check_kernel_tensor(f"weights[{name!r}]", weights[name], shape, f" (H={H})")
    return MetaPackedWeights(
        w_ih=weights["lstm.weight_ih_l0"],
        w_hh=weights["lstm.weight_hh_l0"],
        bias=weights["lstm.bias_ih_l0"] + weights["lstm.bias_hh_l0"],
        w_fi=weights["weight_fi"],
        b_fi=weights["bias_fi"],
    )


def loss_features(
    loss: Tensor | float, preprocess_p: float, *, maximize: bool = False
) -> tuple[float, float]:
    """The two preprocessed loss features the rule sees, as Python floats (exact fp32 values), of
    a scalar ``loss`` (a number or a one-element tensor, of any shape).

    Computed like :meth:`MetaLSTMCell.forward` does with ``compute_dtype=torch.float32``: the loss
    is rounded to fp32, negated under ``maximize``, and preprocessed in fp32. A CUDA tensor costs
    one host sync.

    Raises:
        ValueError: if ``loss`` has more than one element.
    """
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(f"loss must be a scalar, got shape {tuple(loss.shape)}")
        loss = loss.detach().reshape(1).to("cpu", torch.float32)
    else:
        loss = torch.tensor([float(loss)], dtype=torch.float32, device="cpu")
    if maximize:
        loss = -loss
    magnitude, direction = preprocess(loss, preprocess_p)[0].tolist()
    return magnitude, direction


def is_interpreted() -> bool:
    """Whether the kernel runs in the Triton interpreter (TRITON_INTERPRET set at import time)."""
    return isinstance(meta_lstm_step_kernel, InterpretedFunction)


def _check_state(name: str, t: Tensor, shape: tuple[int, ...], slab: bool) -> None:
    """A state is ``shape``, fp32/bf16, with unit stride along N (and a contiguous (N, H) slab)."""
    if not isinstance(t, Tensor) or tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(getattr(t, 'shape', ()))}, expected {shape}")
    if t.dtype not in STATE_DTYPES:
        raise ValueError(f"{name} must be one of {STATE_DTYPES}, got {t.dtype}")
    n = shape[1]
    if n == 0:
        return
    if slab and (t.stride(2) != 1 or (n > 1 and t.stride(1) != shape[2])):
        raise ValueError(
            f"{name} must have a contiguous (N, H) slab (strides (*, {shape[2]}, 1)), got strides {t.stride()}"
        )
    if not slab and n > 1 and t.stride(1) != 1:
        raise ValueError(
            f"{name} must have unit stride along N (strides (*, 1)), got strides {t.stride()}"
        )


def meta_lstm_step_(
    grad: Tensor,
    param: Tensor,
    param_out: Tensor,
    h: Tensor,
    c: Tensor,
    fi: Tensor,
    weights: Mapping[str, Tensor] | MetaPackedWeights,
    *,
    loss: Tensor | float | tuple[float, float],
    hidden_size: int,
    preprocess_p: float,
    lr: float,
    maximize: bool,
    step_scale: float = 1.0,
    momentum_decay: float | None = None,
    rms_decay: float | None = None,
    m: Tensor | None = None,
    v: Tensor | None = None,
    use_dot: bool = True,
    block: int = 64,
    num_warps: int = 4,
    input_precision: str = "ieee",
    fast_tanh: bool = False,
) -> None:
    """One fused step of :class:`MetaLSTMCell` over ``N`` flat coordinates.

    Writes the new states into ``h``, ``c``, ``fi`` (and ``m``, ``v``) and ``param + lr * step``
    into ``param_out``, where ``step = (f - 1) * param - i * d`` and ``d`` is
    :meth:`MetaLSTMCell.direction` (``grad`` in the paper's configuration). Autograd counts each
    tensor written as modified in place (``coordinate_lstm_step.mark_written``).

    Args:
        grad: ``(N,)`` contiguous gradient, float16/bfloat16/float32/float64 (read as fp32).
        param: ``(N,)`` contiguous parameter values ``theta_{t-1}``, float16/bfloat16/float32.
        param_out: ``(N,)`` contiguous, ``param``'s dtype; may be ``param`` itself.
        h, c: ``(1, N, H)`` float32 or bfloat16 states of the input LSTM, each a contiguous
            ``(N, H)`` slab (``buffer[:, a:b]`` views work); updated in place.
        fi: ``(2, N)`` float32 or bfloat16 previous forget and input gates, unit stride along
            ``N`` (any row stride that keeps the rows apart); updated in place. No in-place
            buffer may share memory with another argument (``param_out`` may be ``param``).
        weights: a :class:`MetaLSTMCell` ``state_dict`` of fp32 contiguous tensors (see
            :func:`rule_weights`), or its :func:`pack_weights` result to skip re-packing it.
        loss: the optimizee's loss (a float or one-element tensor; not negated by the caller), or
            its two features from :func:`loss_features` (which then already include
            ``maximize``).
        hidden_size: ``H`` of the rule.
        preprocess_p: the preprocessing constant ``p``, in the rule's bounds (``nn.functional.check_preprocess_p``: about 2.6e-37 to 87.3).
        lr: multiplier of the step (0 leaves ``param_out`` equal to ``param`` bit for bit).
        maximize: the rule sees ``-grad`` and ``-loss`` (as ``MetaLSTMOptimizer(maximize=True)``).
        step_scale, momentum_decay, rms_decay: the rule's :class:`~learnedopt.nn.MetaLSTMConfig`
            fields of those names.
        m, v: ``(2, N)`` float32 or bfloat16 moving-average states (average, weight) for
            ``momentum_decay`` and ``rms_decay`` (required with them, else ignored), laid out like
            ``fi``; updated in place.
        use_dot: ``tl.dot`` (True) or broadcast multiply + sum (False) for the recurrent product.
        block: coordinates per program, a power of two >= 16.
        num_warps: warps per program (GPU only).
        input_precision: ``tl.dot`` precision for fp32 operands: "ieee" (exact fp32), "tf32x3"
            or "tf32".
        fast_tanh: use PTX ``tanh.approx.f32`` (NVIDIA GPUs only; not in the interpreter).

    Raises:
        ValueError: on any shape, dtype, device, layout or option the kernel does not support.
    """
    if hidden_size < 1:
        raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
    n = check_step_arguments(
        grad, param, param_out, preprocess_p=preprocess_p, block=block, num_warps=num_warps,
        input_precision=input_precision,
        switches={"maximize": maximize, "use_dot": use_dot, "fast_tanh": fast_tanh},
    )
    _check_state("h", h, (1, n, hidden_size), slab=True)
    _check_state("c", c, (1, n, hidden_size), slab=True)
    _check_state("fi", fi, (2, n), slab=False)
    moments = {}
    for name, option, decay, state in (("m", "momentum_decay", momentum_decay, m), ("v", "rms_decay", rms_decay, v)):
        if decay is None:
            continue
        if not 0.0 < decay < 1.0:
            raise ValueError(f"{option} must be in (0, 1), got {decay}")
        if not below_one_in_float32(decay):  # as MetaLSTMConfig: the bias correction would divide 0 by 0
            raise ValueError(f"{option} must be in (0, 1) in float32, got {decay}")
        if state is None:
            raise ValueError(f"{name} (2, N) is required with {option}")
        _check_state(name, state, (2, n), slab=False)
        moments[name] = state
    if not (math.isfinite(step_scale) and step_scale > 0):
        raise ValueError(f"step_scale must be positive and finite, got {step_scale}")
    packed = (
        weights
        if isinstance(weights, MetaPackedWeights)
        else pack_weights(weights, hidden_size=hidden_size)
    )
    if packed.w_hh.shape != (4 * hidden_size, hidden_size):
        raise ValueError(f"packed weights are for {tuple(packed.w_hh.shape)}, not H={hidden_size}")
    check_packed(packed, packed_shapes(hidden_size))
    if isinstance(loss, tuple):
        if len(loss) != 2:
            raise ValueError(f"loss features must be two floats, got {loss!r}")
        l_mag, l_dir = (float(v) for v in loss)
    else:
        l_mag, l_dir = loss_features(loss, preprocess_p, maximize=maximize)
    tensors = {
        "grad": grad,
        "param": param,
        "param_out": param_out,
        "h": h,
        "c": c,
        "fi": fi,
        **moments,
        "weights": packed.w_hh,
    }
    check_launch_device(tensors, fast_tanh=fast_tanh)
    check_no_overlap({"param_out": param_out, "h": h, "c": c, "fi": fi, **moments}, {"grad": grad, "param": param})
    if n == 0:
        return

    grid = (triton.cdiv(n, block),)
    meta_lstm_step_kernel[grid](
        grad,
        param,
        param_out,
        h,
        c,
        fi,
        moments.get("m", fi),  # a dummy where there are none: never read
        moments.get("v", fi),
        packed.w_ih,
        packed.w_hh,
        packed.bias,
        packed.w_fi,
        packed.b_fi,
        n,
        fi.stride(0),
        moments["m"].stride(0) if "m" in moments else 0,
        moments["v"].stride(0) if "v" in moments else 0,
        math.exp(-preprocess_p),
        float(preprocess_p),
        math.exp(preprocess_p),
        l_mag,
        l_dir,
        RMS_EPS,
        float(step_scale),
        float(lr),
        MOMENTUM_DECAY=_fp32_decays("momentum_decay", () if momentum_decay is None else (momentum_decay,)),
        RMS_DECAY=_fp32_decays("rms_decay", () if rms_decay is None else (rms_decay,)),
        SCALED=step_scale != 1.0,
        H=hidden_size,
        HP=padded_hidden_size(hidden_size),
        MAXIMIZE=bool(maximize),
        USE_DOT=bool(use_dot),
        INPUT_PRECISION=input_precision,
        FAST_TANH=bool(fast_tanh),
        BLOCK=block,
        num_warps=num_warps,
    )
    mark_written([param_out, h, c, fi, *moments.values()])
