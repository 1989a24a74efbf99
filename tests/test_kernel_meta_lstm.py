"""The fused Triton step of :class:`MetaLSTMCell` against the PyTorch path, and
``MetaLSTMOptimizer(backend="triton")`` against ``backend="torch"``.

References: :meth:`MetaLSTMCell.forward` on fp32 inputs (plus ``param + lr * step``), and for
16-bit states or parameters the optimizer's batched path,
:func:`learnedopt.optim.update.flat_update_` with ``compute_dtype=torch.float32``, which reads
everything as fp32 and writes back in the storage dtypes, as the kernel does.

On CPU the kernel runs in the Triton interpreter (``TRITON_INTERPRET=1``, set by
``conftest.py``); every program instance costs tens of milliseconds there, so these tests use
``block=1024`` with 10^3-10^4 coordinates. With CUDA and ``TRITON_INTERPRET=0`` (see
``benchmarks/run_gpu.sh``) the same tests run compiled on the GPU with the default block.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip(
    "triton", reason="the fused kernels need Triton (Linux x86-64/aarch64 wheels only)"
)

from helpers import make_params, set_grads, to_device_keeping_strides
from learnedopt.kernels import meta_lstm_step as meta_kernel
from learnedopt.kernels.meta_lstm_step import (
    is_interpreted,
    loss_features,
    meta_lstm_step_,
    pack_weights,
    rule_weights,
)
from test_kernel_coordinate_lstm import assert_within_one_ulp

from learnedopt import MetaLSTMOptimizer
from learnedopt.nn import MetaLSTMCell
from learnedopt.optim.update import flat_update_

INTERPRETED = is_interpreted()
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu")
if DEVICE.type == "cpu" and not INTERPRETED:
    pytest.skip(
        "no CUDA device and TRITON_INTERPRET is off: nothing can run the kernel",
        allow_module_level=True,
    )
BLOCK = 1024 if INTERPRETED else 64

# Tolerances for fp32 states and parameters. Kernel and reference do the same fp32 operations and
# differ only in the order of the reductions (the H recurrent terms and 4 input terms of each LSTM
# gate, the H-term per-row sum of each meta gate), the pre-summed LSTM biases and
# tanh(x) = 2 sigmoid(2x) - 1 (~1 ulp of 1): a few ulps per value. Measured: at most 7e-7
# absolute on |c| up to ~6, 2.4e-7 on the parameter and h, 1.2e-7 on the gates; the fp32
# reference is itself ~5e-7 from a float64 computation. The bound is ~3x the measured error. On
# GPUs, FMA contraction, approximate exp/div and cuDNN's summation order add a few ulps more.
FP32_TOL = {"rtol": 2e-6, "atol": 2e-6} if INTERPRETED else {"rtol": 2e-5, "atol": 2e-5}
P = 10.0
LOSS = 0.731


def fp32_cudnn():
    """Run references with cuDNN's fp32 (not TF32) math: on GPUs ``torch.backends.cudnn`` allows
    TF32 by default, whose ~1e-3 errors would swamp the comparison. No effect on CPU."""
    return torch.backends.cudnn.flags(enabled=True, allow_tf32=False)


#: MetaLSTMCell configurations beyond the paper's: Adam's direction (and its parts) and a scale
DIRECTIONS = {
    "adam": {"momentum_decay": 0.9, "rms_decay": 0.999, "step_scale": 0.25},
    "rms": {"rms_decay": 0.3},  # a decay below 0.5 takes lerp's other formula
    "momentum": {"momentum_decay": 0.6},
}


def make_rule(hidden_size: int = 20, seed: int = 0, **config) -> MetaLSTMCell:
    """A rule whose every weight matters (the paper's init makes the cell weights tiny and the
    forget gate saturate near 1, which would hide errors in the gate inputs)."""
    g = torch.Generator().manual_seed(seed)
    rule = MetaLSTMCell(hidden_size=hidden_size, preprocess_p=P, **config)
    rule.reset_parameters(generator=g)
    with torch.no_grad():
        for q in rule.parameters():
            q.add_(torch.randn(q.shape, generator=g) * 0.3)
        rule.bias_fi.copy_(torch.tensor([1.0, -1.0]))  # gates away from saturation
    return rule.to(DEVICE)


def make_inputs(
    n: int,
    hidden_size: int = 20,
    *,
    param_dtype: torch.dtype = torch.float32,
    state_dtype: torch.dtype = torch.float32,
    seed: int = 1,
) -> tuple[torch.Tensor, ...]:
    """``grad, param (n,)`` in ``param_dtype``; ``h, c (1, n, H)`` and ``fi (2, n)`` in
    ``state_dtype``. Gradient magnitudes span 1e-8..10 so both preprocessing branches are taken;
    exact zeros and the threshold e^-p itself are included."""
    g = torch.Generator().manual_seed(seed)
    grad = (
        torch.randn(n, generator=g, dtype=torch.float64)
        * torch.logspace(-8, 1, n, dtype=torch.float64)[torch.randperm(n, generator=g)]
    )
    grad[::97] = 0.0
    grad[5::101] = torch.tensor(P).neg().exp()
    param = torch.randn(n, generator=g, dtype=torch.float64)
    h = torch.randn(1, n, hidden_size, generator=g) * 0.5
    c = torch.randn(1, n, hidden_size, generator=g) * 1.5
    fi = torch.rand(2, n, generator=g)
    return (
        grad.to(DEVICE, param_dtype),
        param.to(DEVICE, param_dtype),
        h.to(DEVICE, state_dtype),
        c.to(DEVICE, state_dtype),
        fi.to(DEVICE, state_dtype),
    )


def cell_reference(rule, grad, param, h, c, fi, *, lr, maximize, loss=LOSS):
    """``MetaLSTMCell.forward`` in the rule's dtype on the signed gradient and loss, then
    ``param + lr * step``: ``(param_out, h, c, fi)``."""
    sign = -1.0 if maximize else 1.0
    dtype = next(rule.parameters()).dtype
    with torch.no_grad(), fp32_cudnn():
        p = param.to(dtype)
        step, new = rule(
            sign * grad.to(dtype),
            p,
            {"h": h.to(dtype), "c": c.to(dtype), "fi": fi.to(dtype)},
            torch.tensor(sign * loss, dtype=dtype, device=DEVICE),
        )
    return p + lr * step, new["h"], new["c"], new["fi"]


def flat_reference(rule, grad, param, h, c, fi, *, lr, maximize, loss=LOSS):
    """What the optimizer's batched path writes, in the inputs' dtypes."""
    p, hr, cr, fr = param.clone(), h.clone(), c.clone(), fi.clone()
    signed_loss = torch.tensor(-loss if maximize else loss, device=DEVICE)
    with torch.no_grad(), fp32_cudnn():
        flat_update_(
            rule,
            [p],
            [grad],
            {"h": hr, "c": cr, "fi": fr},
            [0],
            lr=lr,
            loss=signed_loss,
            maximize=maximize,
            compute_dtype=torch.float32,
        )
    return p, hr, cr, fr


def fused(rule, grad, param, h, c, fi, *, lr, maximize, loss=LOSS, block=BLOCK, **kw):
    """The kernel on copies: ``(param_out, h, c, fi)``."""
    p_out, hk, ck, fk = torch.empty_like(param), h.clone(), c.clone(), fi.clone()
    cfg = rule.config
    meta_lstm_step_(
        grad,
        param,
        p_out,
        hk,
        ck,
        fk,
        rule_weights(rule),
        loss=loss,
        hidden_size=cfg.hidden_size,
        preprocess_p=cfg.preprocess_p,
        lr=lr,
        maximize=maximize,
        block=block,
        **kw,
    )
    return p_out, hk, ck, fk


def assert_matches(got, want, tol=None) -> None:
    for name, k, r in zip(("param", "h", "c", "fi"), got, want, strict=True):
        assert k.dtype == r.dtype, name
        if k.dtype == torch.float32:
            torch.testing.assert_close(
                k, r, **(tol or FP32_TOL), msg=lambda m, name=name: f"{name}: {m}"
            )
        else:
            assert_within_one_ulp(k, r)


@pytest.mark.parametrize("use_dot", [True, False], ids=["dot", "sum"])
@pytest.mark.parametrize("hidden_size", [20, 8])
@pytest.mark.parametrize("n", [1, 3001])
def test_matches_cell_forward(n: int, hidden_size: int, use_dot: bool) -> None:
    rule = make_rule(hidden_size)
    inputs = make_inputs(n, hidden_size)
    got = fused(rule, *inputs, lr=0.3, maximize=False, use_dot=use_dot)
    want = cell_reference(rule, *inputs, lr=0.3, maximize=False)
    assert_matches(got, want)
    # against float64: the kernel is as close to the exact result as the fp32 reference is
    exact = cell_reference(rule.double(), *inputs, lr=0.3, maximize=False)
    for k, r, e in zip(got, want, exact, strict=True):
        kernel_err = (k.double() - e).abs().max().item()
        reference_err = (r.double() - e).abs().max().item()
        assert kernel_err <= 2 * reference_err + 3e-7, (kernel_err, reference_err)


def _moments(n: int, rule: MetaLSTMCell, state_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {
        k: v.to(DEVICE)
        for k, v in rule.init_state(n, dtype=state_dtype, device="cpu").items()
        if k in ("m", "v")
    }


def _step_both_ways(rule, grad, param, h, c, fi, moments) -> tuple[dict, dict]:
    """One step of the kernel and one of the optimizer's PyTorch path (``flat_update_``, fp32),
    each on its own copies of the states: ``(kernel, reference)``, dicts of the new states."""
    got = {"param": param.clone(), "h": h.clone(), "c": c.clone(), "fi": fi.clone(), **{k: v.clone() for k, v in moments.items()}}
    ref = {k: v.clone() for k, v in got.items()}
    cfg = rule.config
    meta_lstm_step_(
        grad, got["param"], got["param"], got["h"], got["c"], got["fi"], rule_weights(rule), loss=LOSS,
        hidden_size=cfg.hidden_size, preprocess_p=cfg.preprocess_p, lr=0.5, maximize=False,
        step_scale=cfg.step_scale, momentum_decay=cfg.momentum_decay, rms_decay=cfg.rms_decay, block=BLOCK,
        **{k: got[k] for k in moments},
    )  # fmt: skip
    with torch.no_grad(), fp32_cudnn():
        flat_update_(
            rule, [ref["param"]], [grad], {k: v for k, v in ref.items() if k != "param"}, [0], lr=0.5,
            loss=torch.tensor(LOSS, device=DEVICE), maximize=False, compute_dtype=torch.float32,
        )  # fmt: skip
    return got, ref


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_each_state_in_its_own_dtype_and_any_gradient_dtype(grad_dtype: torch.dtype) -> None:
    # h, c, fi, m and v are each read and stored in their own dtype (float32 h and v beside
    # bfloat16 c, fi and m), and the gradient in any float dtype is read as fp32, as the
    # optimizer's PyTorch path does with the same buffers
    rule = make_rule(**DIRECTIONS["adam"])
    grad, param, h, c, fi = make_inputs(40)
    moments = _moments(40, rule, torch.float32)
    c, fi, moments["m"] = c.to(torch.bfloat16), fi.to(torch.bfloat16), moments["m"].to(torch.bfloat16)
    got, ref = _step_both_ways(rule, grad.to(grad_dtype), param, h, c, fi, moments)
    assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in ref.items()}
    assert got["c"].dtype == got["fi"].dtype == got["m"].dtype == torch.bfloat16 and got["v"].dtype == torch.float32
    for name, want in ref.items():
        if want.dtype == torch.float32:
            torch.testing.assert_close(got[name], want, **FP32_TOL, msg=lambda m, k=name: f"{k}: {m}")
        else:
            assert_within_one_ulp(got[name], want)


def test_a_nan_or_negative_second_moment_propagates_like_pytorch() -> None:
    """The kernel's sqrt gives NaN there; the optimizer's PyTorch path used to divide by its
    epsilon instead, a huge finite step."""
    rule = make_rule(**DIRECTIONS["rms"])
    n = 16
    grad, param, h, c, fi = make_inputs(n)
    moments = _moments(n, rule, torch.float32)
    moments["v"][0, 7] = float("nan")
    moments["v"][0, 3] = -100.0
    got, ref = _step_both_ways(rule, grad, param, h, c, fi, moments)
    torch.testing.assert_close(got["param"], ref["param"], **FP32_TOL, equal_nan=True)
    assert got["param"][[3, 7]].isnan().all() and got["param"][[0, 1, 2, 4, 5, 6]].isfinite().all()


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")  # numpy, in the interpreter
def test_huge_finite_gradients_saturate_the_second_moment_like_pytorch() -> None:
    # g^2 over the fp32 range saturates at its largest finite value, as the PyTorch path's
    # bounded_square does: the second moment stays finite and the step is not zero
    rule = make_rule(**DIRECTIONS["adam"])
    n = 16
    grad, param, h, c, fi = make_inputs(n)
    grad[[3, 7, 11]] = torch.tensor([1e20, -3e38, 2e19], device=DEVICE)
    got, ref = _step_both_ways(rule, grad, param, h, c, fi, _moments(n, rule, torch.float32))
    for name, want in ref.items():
        torch.testing.assert_close(got[name], want, **FP32_TOL, msg=lambda m, k=name: f"{k}: {m}")
    assert got["v"].isfinite().all() and got["param"].isfinite().all()


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")  # numpy, in the interpreter
def test_huge_opposite_gradients_keep_the_moments_finite_like_pytorch() -> None:
    # the moving average's lerp computes a - g, which overflowed fp32 for an average near its
    # largest value and a gradient of the other sign: the average became Inf and the parameter
    # NaN. Both sides saturate the gradient the averages read at +-fp32 max / 2.
    big = torch.finfo(torch.float32).max
    rule = make_rule(**DIRECTIONS["adam"])
    n = 16
    grad, param, h, c, fi = make_inputs(n)
    moments = _moments(n, rule, torch.float32)
    grad[[3, 7, 11]] = torch.tensor([-3e38, big, 1e38], device=DEVICE)
    # averages the rule itself could have written (it keeps |a| <= max / 2), of the other sign
    moments["m"][:, [3, 7, 11]] = torch.tensor([[1.7e38, -1.7e38, -1.7e38], [1.0, 1.0, 1.0]], device=DEVICE)
    moments["v"][:, [3, 7, 11]] = torch.tensor([[big, big, 1.0], [1.0, 1.0, 1.0]], device=DEVICE)
    got, ref = _step_both_ways(rule, grad, param, h, c, fi, moments)
    for name, want in ref.items():
        torch.testing.assert_close(got[name], want, **FP32_TOL, msg=lambda m, k=name: f"{k}: {m}")
        assert got[name].isfinite().all(), name


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")  # numpy, in the interpreter
def test_a_saturated_second_moment_keeps_the_adam_direction_like_pytorch() -> None:
    # gradients over ~1.8e19 square to fp32's largest value; their bias-corrected average
    # rounded past it, to Inf, within 16 steps at rms_decay 0.999 (the shipped weights'), and the
    # direction m / (sqrt(Inf) + eps) was 0: the step ignored the gradient. Both sides saturate
    # the bias-corrected averages at the largest value.
    rule = make_rule(**DIRECTIONS["adam"])
    n = 16
    _, param, h, c, fi = make_inputs(n)
    moments = _moments(n, rule, torch.float32)
    got = {"param": param, "h": h, "c": c, "fi": fi, **moments}
    ref = {k: v.clone() for k, v in got.items()}
    grad = torch.full((n,), 1e20, device=DEVICE)
    grad[1::2] = -3e38
    for _ in range(20):
        with torch.no_grad():
            direction, _ = rule.direction(grad, {k: ref[k] for k in moments})
        assert direction.isfinite().all() and (direction != 0).all(), direction
        # each step from the same parameters: one of 1e18 would make the comparison of (f - 1) * theta
        # ill-conditioned, the gates' last-ulp differences multiplied by it
        got, _ = _step_both_ways(rule, grad, param, got["h"], got["c"], got["fi"], {k: got[k] for k in moments})
        _, ref = _step_both_ways(rule, grad, param, ref["h"], ref["c"], ref["fi"], {k: ref[k] for k in moments})
        for name, want in ref.items():
            torch.testing.assert_close(got[name], want, **FP32_TOL, msg=lambda m, k=name: f"{k}: {m}")


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_adam_direction_matches_the_optimizer_path_over_steps(
    direction: str, state_dtype: torch.dtype
) -> None:
    """``momentum_decay``, ``rms_decay`` and ``step_scale``: three steps from zero moments with
    fresh gradients (the bias correction matters most early), every state compared after each
    step against the optimizer's PyTorch path, which rounds states as the kernel does."""
    config = DIRECTIONS[direction]
    rule = make_rule(**config)
    n = 2000
    _, param, h, c, fi = make_inputs(n, state_dtype=state_dtype)
    moments = _moments(n, rule, state_dtype)
    assert set(moments) == {name for name, key in (("m", "momentum_decay"), ("v", "rms_decay")) if key in config}
    ref = {"param": param.clone(), "h": h.clone(), "c": c.clone(), "fi": fi.clone(), **{k: v.clone() for k, v in moments.items()}}
    cfg = rule.config
    for t in range(3):
        grad = make_inputs(n, seed=10 + t)[0]
        meta_lstm_step_(
            grad, param, param, h, c, fi, rule_weights(rule), loss=LOSS / (t + 1),
            hidden_size=cfg.hidden_size, preprocess_p=cfg.preprocess_p, lr=0.5, maximize=False,
            step_scale=cfg.step_scale, momentum_decay=cfg.momentum_decay, rms_decay=cfg.rms_decay,
            block=BLOCK, **moments,
        )  # fmt: skip
        with torch.no_grad(), fp32_cudnn():
            flat_update_(
                rule, [ref["param"]], [grad], {k: v for k, v in ref.items() if k != "param"}, [0],
                lr=0.5, loss=torch.tensor(LOSS / (t + 1), device=DEVICE), maximize=False,
                compute_dtype=torch.float32,
            )  # fmt: skip
        got = {"param": param, "h": h, "c": c, "fi": fi, **moments}
        for name, want in ref.items():
            # bf16 states: a state rounded one ulp (2^-8 relative) apart where its fp32 value lies
            # next to a rounding boundary (rare), which changes the later steps a little
            tol = FP32_TOL if state_dtype == torch.float32 else {"rtol": 2**-7, "atol": 2e-3}
            torch.testing.assert_close(got[name].float(), want.float(), **tol, msg=lambda m, k=name: f"step {t}, {k}: {m}")
    # the options matter: the same weights in the paper's configuration end elsewhere
    plain = make_rule()
    paper_param, paper_h, paper_c, paper_fi = make_inputs(n, state_dtype=state_dtype)[1:]
    for t in range(3):
        meta_lstm_step_(
            make_inputs(n, seed=10 + t)[0], paper_param, paper_param, paper_h, paper_c, paper_fi,
            rule_weights(plain), loss=LOSS / (t + 1), hidden_size=20, preprocess_p=P, lr=0.5,
            maximize=False, block=BLOCK,
        )  # fmt: skip
    assert not torch.allclose(paper_param, param)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_state_and_param_dtypes(state_dtype: torch.dtype, param_dtype: torch.dtype) -> None:
    # 16-bit storage: the reference also reads it as fp32 and rounds its results into it, so both
    # sides see identical inputs and round values ~1e-7 apart (assert_within_one_ulp)
    rule = make_rule()
    inputs = make_inputs(2500, param_dtype=param_dtype, state_dtype=state_dtype)
    got = fused(rule, *inputs, lr=0.5, maximize=False)
    assert_matches(got, flat_reference(rule, *inputs, lr=0.5, maximize=False))
    assert (got[0] != inputs[1]).float().mean() > 0.5  # the step moves even 16-bit parameters


def test_bfloat16_stores_round_to_nearest_even() -> None:
    # bf16-exact inputs into fp32 and bf16 state buffers give identical fp32 values in the
    # kernel, so the bf16 run must hold exactly torch's rounding of the fp32 run
    rule = make_rule()
    grad, param, h, c, fi = make_inputs(2048, state_dtype=torch.bfloat16)
    p32, *s32 = fused(rule, grad, param, h.float(), c.float(), fi.float(), lr=0.1, maximize=False)
    p16, *s16 = fused(rule, grad, param, h, c, fi, lr=0.1, maximize=False)
    assert torch.equal(p16, p32)
    for a, b in zip(s16, s32, strict=True):
        assert torch.equal(a, b.to(torch.bfloat16))


@pytest.mark.parametrize("use_dot", [True, False], ids=["dot", "sum"])
def test_maximize_negates_gradient_and_loss(use_dot: bool) -> None:
    rule = make_rule()
    inputs = make_inputs(1500)
    got = fused(rule, *inputs, lr=0.3, maximize=True, use_dot=use_dot)
    assert_matches(got, cell_reference(rule, *inputs, lr=0.3, maximize=True))
    assert not torch.allclose(got[0], fused(rule, *inputs, lr=0.3, maximize=False)[0])
    # the loss is negated too: not the same as the negated gradient with the positive loss
    grad, *rest = inputs
    flipped = fused(rule, -grad, *rest, lr=0.3, maximize=False)
    assert not torch.allclose(got[1], flipped[1])
    assert_matches(got, fused(rule, -grad, *rest, lr=0.3, maximize=False, loss=-LOSS))


def test_loss_features_and_prepacked_weights() -> None:
    rule = make_rule()
    inputs = make_inputs(700)
    want = fused(rule, *inputs, lr=0.3, maximize=True)
    features = loss_features(torch.tensor(LOSS, dtype=torch.float64), P, maximize=True)
    packed = pack_weights(rule_weights(rule), hidden_size=20)
    got = fused(rule, *inputs, lr=0.3, maximize=True, loss=features)
    assert_matches(got, want)
    p_out, h, c, fi = torch.empty_like(inputs[1]), *(t.clone() for t in inputs[2:])
    kw = {"hidden_size": 20, "preprocess_p": P, "lr": 0.3, "maximize": True, "block": BLOCK}
    meta_lstm_step_(inputs[0], inputs[1], p_out, h, c, fi, packed, loss=LOSS, **kw)
    assert_matches((p_out, h, c, fi), want)
    # the small-loss branch of the preprocessing (|L| < e^-p) and an empty range
    tiny = fused(rule, *inputs, lr=0.3, maximize=False, loss=1e-6)
    assert_matches(tiny, cell_reference(rule, *inputs, lr=0.3, maximize=False, loss=1e-6))
    empty = torch.empty(0, device=DEVICE)
    meta_lstm_step_(
        empty,
        empty,
        empty,
        torch.empty(1, 0, 20, device=DEVICE),
        torch.empty(1, 0, 20, device=DEVICE),
        torch.empty(2, 0, device=DEVICE),
        packed,
        loss=LOSS,
        **kw,
    )


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # sigmoid(-huge)
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_lr_zero_leaves_param_bitwise(param_dtype: torch.dtype) -> None:
    rule = make_rule()
    grad, param, h, c, fi = make_inputs(1100, param_dtype=param_dtype)
    param[:4] = torch.tensor([-0.0, 0.0, 1e-30, -65504.0])  # -0.0 + 0 * step would become +0.0
    got = fused(rule, grad, param, h, c, fi, lr=0.0, maximize=False)
    assert torch.equal(got[0].view(torch.uint8), param.view(torch.uint8))
    want = flat_reference(rule, grad, param, h, c, fi, lr=0.0, maximize=False)
    assert_matches((param, *got[1:]), (param, *want[1:]))  # the states still advance


@pytest.mark.parametrize("n, block", [(100, 16), (15, 16), (17, 16), (64, 64), (1000, 256)])
def test_blocks_and_tails(n: int, block: int) -> None:
    rule = make_rule()
    inputs = make_inputs(n)
    assert_matches(
        fused(rule, *inputs, lr=0.3, maximize=False, block=block),
        cell_reference(rule, *inputs, lr=0.3, maximize=False),
    )


def test_in_place_and_views_of_a_larger_buffer() -> None:
    # param_out may be param itself; h, c and fi may be buf[:, a:b] of bigger flat buffers (the
    # optimizer's layout: fi's row stride is the buffer's length), and nothing outside [a, b)
    # is touched
    rule = make_rule()
    grad, param, h_all, c_all, fi_all = make_inputs(3000)
    a, b = 700, 2900
    window = (grad[a:b], param[a:b], h_all[:, a:b], c_all[:, a:b], fi_all[:, a:b])
    want = cell_reference(rule, *window, lr=0.3, maximize=False)
    bufs = [t.clone() for t in (h_all, c_all, fi_all)]
    p = param[a:b].clone()
    meta_lstm_step_(
        grad[a:b],
        p,
        p,
        *(t[:, a:b] for t in bufs),
        rule_weights(rule),
        loss=LOSS,
        hidden_size=20,
        preprocess_p=P,
        lr=0.3,
        maximize=False,
        block=BLOCK,
    )
    assert_matches((p, *(t[:, a:b] for t in bufs)), want)
    for buf, orig in zip(bufs, (h_all, c_all, fi_all), strict=True):
        assert torch.equal(buf[:, :a], orig[:, :a]) and torch.equal(buf[:, b:], orig[:, b:])


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # numpy, in the interpreter
def test_non_finite_gradients_propagate_like_pytorch() -> None:
    rule = make_rule(8)
    grad, *rest = make_inputs(64, 8)
    grad[[3, 10, 20]] = torch.tensor([float("nan"), float("inf"), -float("inf")], device=DEVICE)
    got = fused(rule, grad, *rest, lr=0.3, maximize=False)
    want = cell_reference(rule, grad, *rest, lr=0.3, maximize=False)
    for k, r in zip(got, want, strict=True):
        torch.testing.assert_close(k, r, **FP32_TOL, equal_nan=True)
    assert got[0][3].isnan()


def _call(**overrides) -> None:
    rule = make_rule()
    grad, param, h, c, fi = make_inputs(32)
    args = {
        "grad": grad, "param": param, "param_out": torch.empty_like(param), "h": h, "c": c, "fi": fi,
        "weights": rule_weights(rule),
    }  # fmt: skip
    kw = {
        "loss": LOSS,
        "hidden_size": 20,
        "preprocess_p": P,
        "lr": 0.1,
        "maximize": False,
        "block": BLOCK,
    }
    for key, value in overrides.items():
        (args if key in args else kw)[key] = value
    meta_lstm_step_(*args.values(), **kw)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"h": torch.zeros(1, 31, 20)}, r"h has shape"),
        ({"c": torch.zeros(2, 32, 20)}, r"c has shape"),
        ({"fi": torch.zeros(32, 2).t()}, r"fi must have unit stride"),
        ({"fi": torch.zeros(2, 32, dtype=torch.float16)}, r"fi must be one of"),
        ({"c": torch.zeros(1, 20, 32).transpose(1, 2)}, r"contiguous \(N, H\) slab"),
        # unit stride along H, but rows 2H apart: the first H columns of a wider buffer
        ({"h": torch.zeros(1, 32, 40)[:, :, :20]}, r"h must have a contiguous \(N, H\) slab"),
        ({"grad": torch.zeros(64)[::2]}, r"grad must be a contiguous 1-D"),
        ({"param": torch.zeros(32, dtype=torch.float64)}, r"param dtype must be one of"),
        ({"loss": torch.zeros(2)}, r"loss must be a scalar"),
        ({"hidden_size": 8}, r"h has shape"),
        ({"block": 48}, r"power of two"),
        ({"preprocess_p": -1.0}, r"preprocess_p must be positive"),
        ({"preprocess_p": 100.0}, r"preprocess_p must be in \(0, 87.34\] \(e\^p finite in float32\), got 100.0"),
        ({"preprocess_p": 1e-300}, r"preprocess_p must be at least"),
        ({"fast_tanh": True}, r"fast_tanh"),
        ({"weights": {}}, r"weights lack"),
        ({"momentum_decay": 0.9}, r"m \(2, N\) is required with momentum_decay"),
        ({"rms_decay": 0.999, "v": torch.zeros(2, 31)}, r"v has shape"),
        ({"rms_decay": 1.0, "v": torch.zeros(2, 32)}, r"rms_decay must be in \(0, 1\)"),
        ({"momentum_decay": 0.0, "m": torch.zeros(2, 32)}, r"momentum_decay must be in \(0, 1\)"),
        # below 1, but 1.0 in float32: the bias correction's weight stayed 0, every step NaN (the
        # rule refuses it, MetaLSTMConfig; the launcher took it)
        ({"momentum_decay": 1 - 1e-9, "m": torch.zeros(2, 32)}, r"momentum_decay must be in \(0, 1\) in float32, got 0.999999999$"),
        ({"rms_decay": 1 - 1e-9, "v": torch.zeros(2, 32)}, r"rms_decay must be in \(0, 1\) in float32, got 0.999999999$"),
        ({"step_scale": 0.0}, r"step_scale must be positive"),
        ({"step_scale": float("inf")}, r"step_scale must be positive and finite"),
        # integers and switches of another type, as for the coordinate kernel
        ({"block": 32.0}, r"block must be an integer power of two >= 16, got 32.0"),
        ({"num_warps": True}, r"num_warps must be an integer power of two, got True"),
        ({"maximize": "no"}, r"maximize must be True or False, got 'no'"),
        ({"use_dot": "no"}, r"use_dot must be True or False, got 'no'"),
    ],
)
def test_invalid_arguments(overrides: dict, match: str) -> None:
    overrides = {
        k: (to_device_keeping_strides(v, DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in overrides.items()
    }
    if "fast_tanh" in overrides and not INTERPRETED:
        pytest.skip("fast_tanh is valid on GPUs")
    with pytest.raises(ValueError, match=match):
        _call(**overrides)


def test_overlapping_in_place_buffers_are_refused() -> None:
    """As for the coordinate kernel: h is c put parameters 0.27 off, and fi's two rows sharing
    memory let the input gate overwrite the forget gate. Only param_out is param may alias."""
    grad, param, h, c, fi = make_inputs(32)
    with pytest.raises(ValueError, match="h and c share memory"):
        _call(h=h, c=h)
    with pytest.raises(ValueError, match="fi's slabs overlap"):
        _call(fi=fi[:1].clone().expand(2, 32))
    with pytest.raises(ValueError, match="param_out and fi share memory"):
        _call(fi=fi, param_out=fi[0])
    with pytest.raises(ValueError, match="fi and m share memory"):
        _call(fi=fi, momentum_decay=0.9, m=fi)
    _call(param=param, param_out=param)  # the in-place update itself


def test_rejects_mismatched_and_non_contiguous_weights() -> None:
    # weights packed for H=20 given to an H=8 step (larger, so that a launch that skipped the
    # check would read garbage, not past their end), and a weight with the right shape and
    # values stored column-major (the kernel indexes its rows as contiguous)
    packed = pack_weights(rule_weights(make_rule()), hidden_size=20)
    states = {k: torch.zeros(1, 32, 8, device=DEVICE) for k in ("h", "c")}
    with pytest.raises(ValueError, match=r"packed weights are for \(80, 20\), not H=8"):
        _call(weights=packed, hidden_size=8, **states)
    weights = rule_weights(make_rule())
    weights["lstm.weight_ih_l0"] = weights["lstm.weight_ih_l0"].t().contiguous().t()
    with pytest.raises(ValueError, match=r"weights\['lstm.weight_ih_l0'\] must be contiguous"):
        _call(weights=weights)
    # a weight elsewhere ("meta" tensors: a second device on any machine)
    weights = {**rule_weights(make_rule()), "bias_fi": torch.zeros(2, device="meta")}
    with pytest.raises(ValueError, match="weights are on several devices"):
        _call(weights=weights)


@pytest.mark.parametrize("wide", ["m", "v"])
def test_moments_with_their_own_row_strides(wide: str) -> None:
    # m and v are read and written with their own row strides, not fi's: one of them a coordinate
    # range of a wider (2, 3n) buffer, fi and the other contiguous, gives bit for bit the
    # all-contiguous step, and the wider buffer is untouched outside the range
    rule = make_rule(**DIRECTIONS["adam"])
    cfg = rule.config
    n = 40
    grad, param, h, c, fi = make_inputs(n)
    g = torch.Generator().manual_seed(3)
    moments = {"m": torch.randn(2, n, generator=g).to(DEVICE), "v": torch.rand(2, n, generator=g).to(DEVICE)}

    def step(m: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        p_out, hk, ck, fk = torch.empty_like(param), h.clone(), c.clone(), fi.clone()
        meta_lstm_step_(
            grad, param, p_out, hk, ck, fk, rule_weights(rule), loss=LOSS, hidden_size=20,
            preprocess_p=P, lr=0.3, maximize=False, step_scale=cfg.step_scale,
            momentum_decay=cfg.momentum_decay, rms_decay=cfg.rms_decay, m=m, v=v, block=BLOCK,
        )  # fmt: skip
        return p_out, hk, ck, fk, m, v

    want = step(*(t.clone() for t in moments.values()))
    big = torch.rand(2, 3 * n, device=DEVICE)
    big[:, n : 2 * n] = moments[wide]
    before = big.clone()
    views = {k: t.clone() for k, t in moments.items()}
    views[wide] = big[:, n : 2 * n]
    assert views[wide].stride(0) == 3 * n != fi.stride(0)
    got = step(views["m"], views["v"])
    for name, k, r in zip(("param", "h", "c", "fi", "m", "v"), got, want, strict=True):
        assert torch.equal(k, r), name
    assert not torch.equal(got[4 if wide == "m" else 5], moments[wide])  # the moment moved
    assert torch.equal(big[:, :n], before[:, :n]) and torch.equal(big[:, 2 * n :], before[:, 2 * n :])


# ---------------------------------------------------------------------------------- optimizer
def run_optimizer(
    backend, shapes, *, dtype=torch.float32, steps=3, noncontiguous=(), skip=(), rule_config=None, **options
):
    """``steps`` steps of ``MetaLSTMOptimizer`` on fresh parameters; ``skip`` tensors get no
    gradient in step 2. Returns ``(params, optimizer)``."""
    params = [
        p.detach().to(DEVICE).requires_grad_(True)  # .to keeps the transposed views' strides
        for p in make_params(shapes, dtype=dtype, noncontiguous=noncontiguous)
    ]
    assert all(not params[i].is_contiguous() for i in noncontiguous)
    shadows = [torch.empty(p.shape, dtype=dtype) for p in params]  # set_grads makes CPU grads
    opt = MetaLSTMOptimizer(params, weights=make_rule(**(rule_config or {})), backend=backend, **options)
    for t in range(steps):
        set_grads(shadows, seed=t, skip=skip if t == 1 else ())
        for p, s in zip(params, shadows, strict=True):
            p.grad = None if s.grad is None else s.grad.to(DEVICE)
        with fp32_cudnn():
            opt.step(loss=torch.tensor(1.5 / (t + 1)))
    return params, opt


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "maximize, direction", [(False, None), (True, None), (True, "adam")], ids=["min", "max", "max-adam"]
)
def test_optimizer_fused_matches_torch(
    state_dtype: torch.dtype, maximize: bool, direction: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # several tensors in one group (one run per step, gathered and scattered), a 1-element and an
    # empty one, a non-contiguous one, and a skipped tensor in step 2 (two runs)
    launches: list[int] = []
    real = meta_kernel.meta_lstm_step_
    monkeypatch.setattr(
        meta_kernel,
        "meta_lstm_step_",
        lambda grad, *args, **kw: (launches.append(grad.numel()), real(grad, *args, **kw)),
    )
    shapes = [(30, 20), (1,), (0,), (257,), (8, 9)]
    kw = {
        "state_dtype": state_dtype,
        "maximize": maximize,
        "noncontiguous": (4,),
        "skip": (1,),
        "lr": 0.7,
        "rule_config": DIRECTIONS.get(direction),
    }
    fused_params, fopt = run_optimizer("triton", shapes, **kw)
    # one launch per run of adjacent tensors: all 930 coordinates, then 600 + 329 around the
    # skipped tensor, then all again
    assert launches == [930, 600, 329, 930]
    ref_params, ropt = run_optimizer("torch", shapes, **kw)
    # fp32: per-step differences of a few ulps (FP32_TOL above), compounded over 3 steps
    # (measured: 3e-7 on the states). bf16 states: a state rounded one bf16 ulp apart (rare)
    # changes later steps; measured: states one ulp (2^-8 relative) apart, parameters 1e-3
    tol = (
        {"rtol": 1e-5, "atol": 1e-5}
        if state_dtype == torch.float32
        else {"rtol": 5e-3, "atol": 2e-3}
    )
    for p, q in zip(fused_params, ref_params, strict=True):
        torch.testing.assert_close(p, q, **tol)
        names = ("h", "c", "fi", "m", "v") if direction else ("h", "c", "fi")
        assert set(fopt.state[p]) == {"step", *names}
        for name in names:
            # the moving averages m and v stay float32 under bfloat16 states
            expected_dtype = torch.float32 if name in ("m", "v") else state_dtype
            assert fopt.state[p][name].dtype == ropt.state[q][name].dtype == expected_dtype
            torch.testing.assert_close(
                fopt.state[p][name].float(), ropt.state[q][name].float(), **tol
            )
    # the step moved the parameters
    start = make_params(shapes, dtype=torch.float32)
    assert not torch.allclose(fused_params[0].detach().cpu(), start[0])


def test_optimizer_fused_low_precision_parameters() -> None:
    fused_params, _ = run_optimizer("triton", [(40,), (3, 5)], dtype=torch.bfloat16, lr=0.7)
    ref_params, _ = run_optimizer("torch", [(40,), (3, 5)], dtype=torch.bfloat16, lr=0.7)
    for p, q in zip(fused_params, ref_params, strict=True):
        torch.testing.assert_close(p.float(), q.float(), rtol=1e-2, atol=1e-3)  # one bf16 ulp


def test_optimizer_auto_keeps_the_torch_path_on_cpu() -> None:
    if DEVICE.type == "cuda":
        pytest.skip("on CUDA, auto follows kernels.GPU_VALIDATED")
    auto, _ = run_optimizer("auto", [(6,)])
    ref, _ = run_optimizer("torch", [(6,)])
    assert torch.equal(auto[0], ref[0])


def test_optimizer_triton_refuses_float64_clearly() -> None:
    param = torch.zeros(4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    param.grad = torch.ones_like(param)
    opt = MetaLSTMOptimizer([param], backend="triton")
    with pytest.raises(RuntimeError, match="backend='triton' cannot run this step: float64"):
        opt.step(loss=1.0)


@pytest.mark.parametrize(
    "field, bad, match",
    [
        ("bias", lambda t: t[:4].clone(), r"packed weights' bias has shape \(4,\), expected \(32,\)"),
        ("w_fi", lambda t: t[:, :2].clone(), r"packed weights' w_fi has shape \(2, 2\), expected \(2, 10\)"),
        ("b_fi", lambda t: t[:0], r"packed weights' b_fi has shape \(0,\), expected \(2,\)"),
        ("w_ih", lambda t: t.double(), r"packed weights' w_ih must be float32, got torch.float64"),
        ("w_ih", lambda t: t.t().contiguous().t(), r"packed weights' w_ih must be contiguous"),
        ("b_fi", lambda t: t.to("meta"), r"packed weights are on several devices"),
    ],
)
def test_prepacked_weights_of_another_layout_are_refused(field, bad, match) -> None:
    # only w_hh's shape was checked: a short tensor elsewhere was read past its end, one of
    # another dtype or strides misread (or failed deep in Triton)
    good = pack_weights(rule_weights(make_rule(8)), hidden_size=8)
    packed = good._replace(**{field: bad(getattr(good, field))})
    grad, param, h, c, fi = make_inputs(20, 8)
    before = [t.clone() for t in (param, h, c, fi)]
    with pytest.raises(ValueError, match=match):
        meta_lstm_step_(
            grad, param, param, h, c, fi, packed, loss=LOSS, hidden_size=8, preprocess_p=P,
            lr=0.1, maximize=False, block=16,
        )  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip((param, h, c, fi), before, strict=True))
