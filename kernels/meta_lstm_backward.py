"""Differentiable step of Ravi & Larochelle's meta-learner (:class:`learnedopt.nn.MetaLSTMCell`)
for meta-training: a Triton forward kernel, a Triton backward kernel, and the autograd wrapper.

Split, as in :mod:`learnedopt.kernels.coordinate_lstm_backward`: ``x = rule.features(grad,
loss)`` (the preprocessed gradient and loss, ``(N, 4)``) stays in PyTorch and autograd;
:func:`meta_lstm_step` computes ``rule.step_from_features(x, grad, param, h, c, fi)``, that is
the input LSTM (one layer, ``H`` units) on ``x`` and the meta-learner cell::

    f = sigmoid(b_f + W_f[:H] . h_new + W_f[H] theta + W_f[H + 1] f_prev)
    i = sigmoid(b_i + W_i[:H] . h_new + W_i[H] theta + W_i[H + 1] i_prev)
    step = (f - 1) theta - i grad

returning ``(step (N,), new_h (1, N, H), new_c (1, N, H), new_fi (2, N))`` without touching its
inputs, differentiable (first order) with respect to ``x``, ``grad``, ``param`` (``theta``), the
states ``h``, ``c``, ``fi`` and every weight: the input LSTM's (``bias_ih`` and ``bias_hh`` get
the same gradient) and ``weight_fi``, ``bias_fi``. In the meta-training unroll the parameter is
the previous step's output, so its gradient is what carries the meta-gradient through the
parameter path (the cell state of the paper), even first-order.

Forward kernel: the LSTM layer with this package's ``_preactivations`` (``K = 4`` features padded
to 16) and ``_cell``, then the gates with :mod:`learnedopt.kernels.meta_lstm_step`'s
``_meta_gate`` (the same order of additions as the PyTorch path), all in fp32 with the portable
activations. Backward kernel: per tile of ``BLOCK`` coordinates, the gates are recomputed from the
saved ``new_h`` (an output autograd keeps anyway), the step and gate derivatives are taken in
registers, ``d new_h`` gets the gates' terms, and the input LSTM's backward is
``coordinate_lstm_backward``'s ``_input_layer_backward`` (gate by gate, ``tl.dot`` for the products
and the weight-gradient sums). Weight gradients are per-program partial sums (``P`` rows, no
atomics) summed in a fixed order afterwards: deterministic.

Scope: float32 states (``h``, ``c``, ``fi``); ``x``, ``grad`` and ``param`` in float16,
bfloat16, float32 or float64 (read as fp32, gradients returned in their dtype); no
``maximize`` (negate the gradient and the loss first) and no ``fast_tanh``. First-order only, as
the other differentiable kernel: a backward under ``create_graph=True`` raises. CUDA tensors, or
CPU tensors in the Triton interpreter. Never run on a GPU (none was available): block sizes and
warps are untuned defaults (:class:`~learnedopt.kernels.coordinate_lstm_backward.KernelOptions`).

Register budget (H = 20 padded to 32, sm_90, an OFFLINE compile with Triton 3.9 and its bundled
``ptxas-blackwell``, as described in :mod:`learnedopt.kernels.coordinate_lstm_backward`; not run
or timed): the backward kernel uses 255 registers and 1.1 KB of stack per thread at its default
BLOCK 32 / 4 warps (112 B at 32 / 8, 136 B at 16 / 4; 64 / 4 collapses to 32 registers and
11 KB); the forward kernel 255 registers and 784 B at BLOCK 64 / 4 warps (328 B at 64 / 8).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import FunctionCtx

from .coordinate_lstm_backward import (
    KernelOptions,
    _add_vector,
    _backward_grid,
    _block,
    _input_layer_backward,
    _load_rows,
    _refuse_transforms,
    _check_fp32_state,
    _refuse_double_backward,
)
from .coordinate_lstm_step import (
    GRAD_DTYPES,
    _cell,
    _preactivations,
    _zero_padding,
    check_launch_device,
    check_packed,
    padded_hidden_size,
)
from .meta_lstm_step import MetaPackedWeights, _meta_gate, pack_weights, packed_shapes

if TYPE_CHECKING:  # the configs are plain dataclasses; the kernels only read their fields
    from ..nn import MetaLSTMConfig

__all__ = [
    "MetaLSTMStepFunction",
    "meta_lstm_backward",
    "meta_lstm_forward",
    "meta_lstm_step",
]

#: input features of the input LSTM: gradient magnitude and sign, loss magnitude and sign
NUM_FEATURES = 4


# ----------------------------------------------------------------------------------------------
# Forward kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def meta_lstm_forward_kernel(
    x_ptr,  # (N, 4) any float, contiguous
    grad_ptr,  # (N,) any float
    param_ptr,  # (N,) any float
    h_ptr,  # (1, N, H) fp32, contiguous: old states, read only
    c_ptr,  # (1, N, H) fp32, contiguous
    fi_ptr,  # (2, N) fp32, contiguous
    h_out_ptr,  # (1, N, H) fp32: new states
    c_out_ptr,  # (1, N, H) fp32
    fi_out_ptr,  # (2, N) fp32
    step_ptr,  # (N,) fp32
    w_ih_ptr,  # (4H, 4)
    w_hh_ptr,  # (4H, H)
    bias_ptr,  # (4H,): b_ih + b_hh
    w_fi_ptr,  # (2, H + 2)
    b_fi_ptr,  # (2,)
    n_coords,
    K: tl.constexpr,
    KP: tl.constexpr,
    H: tl.constexpr,
    HP: tl.constexpr,
    USE_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: N * H overflows int32 early
    row_mask = rows < n_coords
    cols = tl.arange(0, HP)
    tile_mask = row_mask[:, None] & (cols < H)[None, :]
    tile = rows[:, None] * H + cols[None, :]

    x = _load_rows(x_ptr, rows, row_mask, K, KP)
    h = tl.load(h_ptr + tile, mask=tile_mask, other=0.0)
    c = tl.load(c_ptr + tile, mask=tile_mask, other=0.0)
    pre_i, pre_f, pre_g, pre_o = _preactivations(
        x, h, w_ih_ptr, w_hh_ptr, bias_ptr, K, KP, H, HP, USE_DOT, INPUT_PRECISION
    )
    h, c = _cell(pre_i, pre_f, pre_g, pre_o, c, False)
    h = _zero_padding(h, H, HP)
    tl.store(h_out_ptr + tile, h, mask=tile_mask)
    tl.store(c_out_ptr + tile, c, mask=tile_mask)

    g = tl.load(grad_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    theta = tl.load(param_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    f_prev = tl.load(fi_ptr + rows, mask=row_mask, other=0.0)
    i_prev = tl.load(fi_ptr + n_coords + rows, mask=row_mask, other=0.0)
    forget = _meta_gate(h, theta, f_prev, w_fi_ptr, b_fi_ptr, 0, H, HP, False)
    input_gate = _meta_gate(h, theta, i_prev, w_fi_ptr, b_fi_ptr, 1, H, HP, False)
    tl.store(fi_out_ptr + rows, forget, mask=row_mask)
    tl.store(fi_out_ptr + n_coords + rows, input_gate, mask=row_mask)
    tl.store(step_ptr + rows, (forget - 1.0) * theta - input_gate * g, mask=row_mask)


# ----------------------------------------------------------------------------------------------
# Backward kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _meta_gate_backward(
    d_gate,
    gate,
    h_new,
    theta,
    prev,
    w_fi_ptr,
    part_w_fi_ptr,
    part_b_fi_ptr,
    row: tl.constexpr,
    H: tl.constexpr,
    HP: tl.constexpr,
):
    """Back through gate ``row`` (``sigmoid`` of its pre-activation) from ``d gate`` ``(BLOCK,)``:
    adds its weight and bias gradients to the partial sums and returns ``(d pre, d h_new part
    (BLOCK, HP), d theta part, d prev)``."""
    cols = tl.arange(0, HP)
    col_mask = cols < H
    d_pre = d_gate * gate * (1.0 - gate)
    w = tl.load(w_fi_ptr + row * (H + 2) + cols, mask=col_mask, other=0.0)
    w_theta = tl.load(w_fi_ptr + row * (H + 2) + H)
    w_prev = tl.load(w_fi_ptr + row * (H + 2) + H + 1)
    part = part_w_fi_ptr + row * (H + 2)
    _add_vector(part + cols, tl.sum(d_pre[:, None] * h_new, axis=0), col_mask)
    tl.store(part + H, tl.load(part + H) + tl.sum(d_pre * theta, axis=0))
    tl.store(part + H + 1, tl.load(part + H + 1) + tl.sum(d_pre * prev, axis=0))
    tl.store(part_b_fi_ptr + row, tl.load(part_b_fi_ptr + row) + tl.sum(d_pre, axis=0))
    return d_pre[:, None] * w[None, :], d_pre * w_theta, d_pre * w_prev


@triton.jit
def meta_lstm_backward_kernel(
    x_ptr,  # (N, 4) any float: the forward's inputs
    grad_ptr,  # (N,) any float
    param_ptr,  # (N,) any float
    h_ptr,  # (1, N, H) fp32
    c_ptr,  # (1, N, H) fp32
    fi_ptr,  # (2, N) fp32
    h_new_ptr,  # (1, N, H) fp32: the forward's new h
    d_step_ptr,  # (N,) fp32: incoming gradients
    d_h_new_ptr,  # (1, N, H) fp32
    d_c_new_ptr,  # (1, N, H) fp32
    d_fi_new_ptr,  # (2, N) fp32
    d_x_ptr,  # (N, 4) fp32 out (written only when STORE_D_X)
    d_grad_ptr,  # (N,) fp32 out
    d_param_ptr,  # (N,) fp32 out
    d_h_ptr,  # (1, N, H) fp32 out
    d_c_ptr,  # (1, N, H) fp32 out
    d_fi_ptr,  # (2, N) fp32 out
    w_ih_ptr,  # (4H, 4)
    w_hh_ptr,  # (4H, H)
    bias_ptr,  # (4H,)
    w_fi_ptr,  # (2, H + 2)
    b_fi_ptr,  # (2,)
    part_ih_ptr,  # (P, 4H, 4) fp32 zeros: per-program partial sums, accumulated in place
    part_hh_ptr,  # (P, 4H, H)
    part_bias_ptr,  # (P, 4H)
    part_w_fi_ptr,  # (P, 2, H + 2)
    part_b_fi_ptr,  # (P, 2)
    n_coords,
    num_programs,
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
    part_ih = part_ih_ptr + pid64 * (4 * H * K)
    part_hh = part_hh_ptr + pid64 * (4 * H * H)
    part_bias = part_bias_ptr + pid64 * (4 * H)
    part_w_fi = part_w_fi_ptr + pid64 * (2 * (H + 2))
    part_b_fi = part_b_fi_ptr + pid64 * 2

    for t in range(pid, tl.cdiv(n_coords, BLOCK), num_programs):
        # int64; written so because t is a plain int in the interpreter
        rows = (pid64 * 0 + t) * BLOCK + tl.arange(0, BLOCK)
        row_mask = rows < n_coords
        tile_mask = row_mask[:, None] & col_mask[None, :]
        tile = rows[:, None] * H + cols[None, :]
        # rows past N load zero incoming gradients and add nothing to the weight sums

        # ---- the meta-learner cell, recomputed from the saved new h
        h_new = tl.load(h_new_ptr + tile, mask=tile_mask, other=0.0)
        g = tl.load(grad_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        theta = tl.load(param_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        f_prev = tl.load(fi_ptr + rows, mask=row_mask, other=0.0)
        i_prev = tl.load(fi_ptr + n_coords + rows, mask=row_mask, other=0.0)
        forget = _meta_gate(h_new, theta, f_prev, w_fi_ptr, b_fi_ptr, 0, H, HP, False)
        input_gate = _meta_gate(h_new, theta, i_prev, w_fi_ptr, b_fi_ptr, 1, H, HP, False)

        # step = (f - 1) theta - i g
        ds = tl.load(d_step_ptr + rows, mask=row_mask, other=0.0)
        d_forget = ds * theta + tl.load(d_fi_new_ptr + rows, mask=row_mask, other=0.0)
        d_input = -ds * g + tl.load(d_fi_new_ptr + n_coords + rows, mask=row_mask, other=0.0)
        tl.store(d_grad_ptr + rows, -ds * input_gate, mask=row_mask)
        dh_f, d_theta_f, d_f_prev = _meta_gate_backward(
            d_forget, forget, h_new, theta, f_prev, w_fi_ptr, part_w_fi, part_b_fi, 0, H, HP
        )
        dh_i, d_theta_i, d_i_prev = _meta_gate_backward(
            d_input, input_gate, h_new, theta, i_prev, w_fi_ptr, part_w_fi, part_b_fi, 1, H, HP
        )
        tl.store(d_param_ptr + rows, ds * (forget - 1.0) + d_theta_f + d_theta_i, mask=row_mask)
        tl.store(d_fi_ptr + rows, d_f_prev, mask=row_mask)
        tl.store(d_fi_ptr + n_coords + rows, d_i_prev, mask=row_mask)

        # ---- the input LSTM
        dh = tl.load(d_h_new_ptr + tile, mask=tile_mask, other=0.0) + dh_f + dh_i
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
            w_ih_ptr,
            w_hh_ptr,
            bias_ptr,
            part_ih,
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
        # the next tile's read-modify-write of the partial sums must see this one's stores
        tl.debug_barrier()


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _check_inputs(
    x: Tensor,
    grad: Tensor,
    param: Tensor,
    h: Tensor,
    c: Tensor,
    fi: Tensor,
    packed: MetaPackedWeights,
) -> int:
    """Validate; returns ``H``."""
    if not isinstance(packed.w_hh, Tensor) or packed.w_hh.dim() != 2:
        raise ValueError(
            f"packed weights' w_hh must be (4H, H), got {getattr(packed.w_hh, 'shape', type(packed.w_hh))}"
        )
    hidden = packed.w_hh.shape[1]
    check_packed(packed, packed_shapes(hidden))
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != NUM_FEATURES:
        raise ValueError(
            f"x must be the (N, 4) features of MetaLSTMCell.features, got "
            f"{getattr(x, 'shape', type(x))}"
        )
    n = x.shape[0]
    for name, t in (("grad", grad), ("param", param)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a tensor of shape (N,) = ({n},), got {type(t)}")
    for name, t in (("x", x), ("grad", grad), ("param", param)):
        if t.dtype not in GRAD_DTYPES:
            raise ValueError(f"{name} dtype must be one of {GRAD_DTYPES}, got {t.dtype}")
    for name, t in (("grad", grad), ("param", param)):
        if tuple(t.shape) != (n,):
            raise ValueError(f"{name} must have shape (N,) = ({n},), got {tuple(t.shape)}")
    for name, t, shape in (("h", h, (1, n, hidden)), ("c", c, (1, n, hidden)), ("fi", fi, (2, n))):
        _check_fp32_state(name, t, shape)
    check_launch_device(
        {"x": x, "grad": grad, "param": param, "h": h, "c": c, "fi": fi, **packed._asdict()}
    )
    return hidden


def _sizes(hidden: int) -> dict[str, int]:
    return {
        "K": NUM_FEATURES,
        "KP": padded_hidden_size(NUM_FEATURES),
        "H": hidden,
        "HP": padded_hidden_size(hidden),
    }


def meta_lstm_forward(
    x: Tensor,
    grad: Tensor,
    param: Tensor,
    h: Tensor,
    c: Tensor,
    fi: Tensor,
    packed: MetaPackedWeights,
    *,
    options: KernelOptions = KernelOptions(),
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``rule.step_from_features`` over ``N`` coordinates, not in place (no autograd: see
    :func:`meta_lstm_step`).

    Args:
        x: ``(N, 4)`` features; grad, param: ``(N,)`` (any float dtype, read as fp32).
        h, c: ``(1, N, H)``; fi: ``(2, N)``: float32 old states.
        packed: :func:`~learnedopt.kernels.meta_lstm_step.pack_weights` of the rule's parameters.
        options: launch options.

    Returns:
        ``step (N,)``, ``new_h (1, N, H)``, ``new_c (1, N, H)``, ``new_fi (2, N)``, float32.
    """
    hidden = _check_inputs(x, grad, param, h, c, fi, packed)
    x, grad, param = x.contiguous(), grad.contiguous(), param.contiguous()
    h, c, fi = h.contiguous(), c.contiguous(), fi.contiguous()
    n = x.shape[0]
    step = torch.empty(n, dtype=torch.float32, device=x.device)
    h_new, c_new, fi_new = torch.empty_like(h), torch.empty_like(c), torch.empty_like(fi)
    if n == 0:
        return step, h_new, c_new, fi_new
    block = _block(options.block, 64, n)
    meta_lstm_forward_kernel[(triton.cdiv(n, block),)](
        x,
        grad,
        param,
        h,
        c,
        fi,
        h_new,
        c_new,
        fi_new,
        step,
        *(t.detach() for t in packed),
        n,
        **_sizes(hidden),
        USE_DOT=options.use_dot,
        INPUT_PRECISION=options.input_precision,
        BLOCK=block,
        num_warps=options.num_warps,
    )
    return step, h_new, c_new, fi_new


def meta_lstm_backward(
    x: Tensor,
    grad: Tensor,
    param: Tensor,
    h: Tensor,
    c: Tensor,
    fi: Tensor,
    h_new: Tensor,
    packed: MetaPackedWeights,
    d_step: Tensor,
    d_h_new: Tensor,
    d_c_new: Tensor,
    d_fi_new: Tensor,
    *,
    need_d_x: bool = True,
    options: KernelOptions = KernelOptions(),
) -> tuple[Tensor | None, Tensor, Tensor, Tensor, Tensor, Tensor, MetaPackedWeights]:
    """Gradients of one forward (:func:`meta_lstm_forward`) from those of its outputs.

    Args:
        x, grad, param, h, c, fi: the forward's inputs; h_new: its ``new_h``.
        packed: the forward's packed weights.
        d_step ``(N,)``, d_h_new, d_c_new ``(1, N, H)``, d_fi_new ``(2, N)``: gradients of the
            outputs (converted to contiguous fp32).
        need_d_x: compute the gradient of ``x`` (else ``None`` is returned for it).
        options: launch options.

    Returns:
        ``d_x`` (``(N, 4)`` in ``x``'s dtype, or ``None``), ``d_grad`` and ``d_param`` (in their
        dtypes), ``d_h``, ``d_c``, ``d_fi`` (float32), and the weights' gradients as a
        :class:`~learnedopt.kernels.meta_lstm_step.MetaPackedWeights` (``bias``'s is that of
        ``bias_ih`` and of ``bias_hh``).
    """
    hidden = _check_inputs(x, grad, param, h, c, fi, packed)
    n = x.shape[0]
    for name, t, shape in (
        ("h_new", h_new, h.shape),
        ("d_h_new", d_h_new, h.shape),
        ("d_c_new", d_c_new, h.shape),
        ("d_fi_new", d_fi_new, fi.shape),
        ("d_step", d_step, (n,)),
    ):
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    device = check_launch_device(
        {"x": x, "h_new": h_new, "d_step": d_step, "d_h_new": d_h_new, "d_c_new": d_c_new, "d_fi_new": d_fi_new}
    )
    f32 = {"dtype": torch.float32, "device": device}
    x, grad, param = x.contiguous(), grad.contiguous(), param.contiguous()
    h, c, fi = h.contiguous(), c.contiguous(), fi.contiguous()
    h_new = h_new.contiguous().float()
    d_step, d_h_new = d_step.contiguous().float(), d_h_new.contiguous().float()
    d_c_new, d_fi_new = d_c_new.contiguous().float(), d_fi_new.contiguous().float()
    d_x = torch.empty(x.shape, **f32) if need_d_x else None
    d_grad, d_param = torch.empty(n, **f32), torch.empty(n, **f32)
    d_h, d_c, d_fi = torch.empty(h.shape, **f32), torch.empty(c.shape, **f32), torch.empty(fi.shape, **f32)

    block, programs = _backward_grid(options, n, device)
    weights = [t.detach() for t in packed]
    parts = [torch.zeros((programs, *t.shape), **f32) for t in weights]
    if n > 0:
        meta_lstm_backward_kernel[(programs,)](
            x,
            grad,
            param,
            h,
            c,
            fi,
            h_new,
            d_step,
            d_h_new,
            d_c_new,
            d_fi_new,
            d_x if need_d_x else d_step,  # a placeholder pointer, never written
            d_grad,
            d_param,
            d_h,
            d_c,
            d_fi,
            *weights,
            *parts,
            n,
            programs,
            **_sizes(hidden),
            USE_DOT=options.use_dot,
            INPUT_PRECISION=options.input_precision,
            STORE_D_X=need_d_x,
            BLOCK=block,
            num_warps=options.num_warps,
        )
    # a fixed-order sum over the programs' rows: deterministic
    d_weights = MetaPackedWeights(*(part.sum(dim=0) for part in parts))
    if d_x is not None:
        d_x = d_x.to(x.dtype)
    return d_x, d_grad.to(grad.dtype), d_param.to(param.dtype), d_h, d_c, d_fi, d_weights


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------


class MetaLSTMStepFunction(torch.autograd.Function):
    """``(step, new_h, new_c, new_fi)`` of :meth:`MetaLSTMCell.step_from_features`, Triton
    forward and backward.

    Inputs to :meth:`apply`: ``x (N, 4)``, ``grad``, ``param`` ``(N,)``, ``h, c (1, N, H)``,
    ``fi (2, N)`` (fp32 states), the five :class:`MetaPackedWeights` tensors (``w_ih, w_hh,
    bias, w_fi, b_fi``), then a :class:`KernelOptions`. First-order only. Prefer
    :func:`meta_lstm_step`.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        grad: Tensor,
        param: Tensor,
        h: Tensor,
        c: Tensor,
        fi: Tensor,
        w_ih: Tensor,
        w_hh: Tensor,
        bias: Tensor,
        w_fi: Tensor,
        b_fi: Tensor,
        options: KernelOptions,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``step (N,)``, ``new_h, new_c (1, N, H)``, ``new_fi (2, N)`` (float32) of
        :func:`meta_lstm_forward` on ``x (N, 4)``, ``grad, param (N,)``, ``h, c (1, N, H)``,
        ``fi (2, N)`` and the five :class:`MetaPackedWeights` tensors; saves the inputs and
        ``new_h`` for :meth:`backward`."""
        packed = MetaPackedWeights(w_ih, w_hh, bias, w_fi, b_fi)
        step, h_new, c_new, fi_new = meta_lstm_forward(
            x, grad, param, h, c, fi, packed, options=options
        )
        ctx.save_for_backward(x, grad, param, h, c, fi, h_new, *packed)
        ctx.options = options
        return step, h_new, c_new, fi_new

    @staticmethod
    def backward(
        ctx: FunctionCtx, d_step: Tensor, d_h_new: Tensor, d_c_new: Tensor, d_fi_new: Tensor
    ) -> tuple[Tensor | None, ...]:
        """Gradients of :meth:`forward`'s inputs, in their order, from ``d_step (N,)``,
        ``d_h_new, d_c_new (1, N, H)`` and ``d_fi_new (2, N)`` (:func:`meta_lstm_backward`):
        ``d_x (N, 4)`` (``None`` unless ``x`` needs it), ``d_grad, d_param (N,)``, ``d_h, d_c
        (1, N, H)``, ``d_fi (2, N)``, the five weights' (each of its weight's shape), and
        ``None`` for ``options``.

        Raises:
            RuntimeError: under ``create_graph=True`` (first order only).
        """
        _refuse_double_backward("meta-LSTM")  # create_graph=True: a double backward
        x, grad, param, h, c, fi, h_new, *weights = ctx.saved_tensors
        d_x, d_grad, d_param, d_h, d_c, d_fi, d_weights = meta_lstm_backward(
            x,
            grad,
            param,
            h,
            c,
            fi,
            h_new,
            MetaPackedWeights(*weights),
            d_step,
            d_h_new,
            d_c_new,
            d_fi_new,
            need_d_x=ctx.needs_input_grad[0],
            options=ctx.options,
        )
        return (d_x, d_grad, d_param, d_h, d_c, d_fi, *d_weights, None)


def meta_lstm_step(
    x: Tensor,
    grad: Tensor,
    param: Tensor,
    h: Tensor,
    c: Tensor,
    fi: Tensor,
    weights: Mapping[str, Tensor] | MetaPackedWeights,
    config: MetaLSTMConfig,
    *,
    options: KernelOptions | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Differentiable ``MetaLSTMCell.step_from_features`` by Triton kernels.

    Equal (to fp32 rounding) to ``rule.step_from_features(x, grad, param, h, c, fi)`` of a
    :class:`~learnedopt.nn.MetaLSTMCell` ``rule`` with ``config`` and these weights, and
    differentiable (first order) with respect to every input and weight.

    Args:
        x: ``(N, 4)`` features (``rule.features(grad, loss)``); grad, param: ``(N,)``.
        h, c: ``(1, N, H)``; fi: ``(2, N)``: float32 states.
        weights: the rule's parameters by ``state_dict`` name (e.g.
            ``dict(rule.named_parameters())``), fp32 and contiguous, or their packed form.
        config: the rule's :class:`~learnedopt.nn.MetaLSTMConfig`.
        options: launch options (default :class:`KernelOptions`).

    Returns:
        ``step (N,)``, ``new_h``, ``new_c``, ``new_fi``, float32.

    Raises:
        ValueError: for a shape, dtype or device the kernels do not take, or weights that do
            not fit ``config``.
    """
    _refuse_transforms(
        "meta-LSTM", [x, grad, param, h, c, fi, *(weights if isinstance(weights, MetaPackedWeights) else weights.values())]
    )
    packed = (
        weights
        if isinstance(weights, MetaPackedWeights)
        else pack_weights(weights, hidden_size=config.hidden_size)
    )
    # weights of another H named here; of another rank, refused by the forward's check
    ranked = isinstance(packed.w_hh, Tensor) and packed.w_hh.dim() == 2
    if ranked and packed.w_hh.shape != (4 * config.hidden_size, config.hidden_size):
        raise ValueError(
            f"packed weights are for H={packed.w_hh.shape[1]}, not H={config.hidden_size}"
        )
    return MetaLSTMStepFunction.apply(
        x, grad, param, h, c, fi, *packed, options or KernelOptions()
    )
