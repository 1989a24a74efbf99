"""The differentiable Triton step of :class:`MetaLSTMCell` (forward and backward kernels) against
autograd through :meth:`MetaLSTMCell.step_from_features`, and ``unroll(..., backend="triton")``
of a ``MetaLSTMCell`` against ``backend="torch"``.

The reference runs in float64 on the same fp32-representable inputs and weights, so the measured
error is the kernels' own. In the Triton interpreter every program instance costs milliseconds
to tens of milliseconds: the cases use 10^3 coordinates and large blocks.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip(
    "triton", reason="the fused kernels need Triton (Linux x86-64/aarch64 wheels only)"
)

from helpers import assert_refuses_transforms, record_options, strided_like  # noqa: E402
from learnedopt.kernels import meta_lstm_backward as meta_backward_module
from learnedopt.kernels.coordinate_lstm_backward import KernelOptions
from learnedopt.kernels.meta_lstm_backward import (
    MetaLSTMStepFunction,
    meta_lstm_backward,
    meta_lstm_forward,
    meta_lstm_step,
)
from learnedopt.kernels.meta_lstm_step import is_interpreted, pack_weights

from learnedopt.meta import QuadraticFamily, generator_for, num_coordinates, unroll
from learnedopt.nn import MetaLSTMCell

INTERPRETED = is_interpreted()
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu")
if DEVICE.type == "cpu" and not INTERPRETED:
    pytest.skip(
        "no CUDA device and TRITON_INTERPRET is off: nothing can run the kernels",
        allow_module_level=True,
    )
F64 = torch.float64
P = 10.0
# Max-norm relative tolerance per tensor, as in test_kernel_coordinate_lstm_backward: the kernels
# do the reference's fp32 operations in another order (a few ulps per value; the weight
# gradients sum over N coordinates). Measured in the interpreter: at most 1.8e-6 against float64.
# The bound is 2e-5; on GPUs FMA contraction and approximate exp/div add a few ulps.
REL_TOL = 2e-5 if INTERPRETED else 1e-4
#: torch.autograd.gradcheck's bounds in fp32 (see test_gradcheck_against_its_own_forward)
GRADCHECK_TOL = {"atol": 1e-5, "rtol": 1e-3} if INTERPRETED else {"atol": 1e-4, "rtol": 1e-2}
NAMES = ["x", "grad", "param", "h", "c", "fi"]


def make_rule(hidden_size: int, seed: int = 0, **config) -> MetaLSTMCell:
    """A float32 rule whose every weight matters, gates away from saturation."""
    g = torch.Generator().manual_seed(seed)
    rule = MetaLSTMCell(hidden_size=hidden_size, preprocess_p=P, **config)
    rule.reset_parameters(generator=g)
    with torch.no_grad():
        for q in rule.parameters():
            q.add_(torch.randn(q.shape, generator=g) * 0.3)
        rule.bias_fi.copy_(torch.tensor([1.0, -1.0]))
    return rule.to(DEVICE)


def make_inputs(rule: MetaLSTMCell, n: int, seed: int = 1):
    """fp32 inputs ``x, grad, param, h, c, fi`` (``x`` from :meth:`MetaLSTMCell.features` with one
    loss per coordinate) and cotangents ``d_step, d_h, d_c, d_fi``."""
    g = torch.Generator().manual_seed(seed)
    hidden = rule.config.hidden_size
    grad = torch.randn(n, generator=g) * torch.logspace(-6, 0, n)[torch.randperm(n, generator=g)]
    loss = torch.rand(n, generator=g) * 3
    x = rule.features(grad, loss)
    param = torch.randn(n, generator=g)
    h = torch.randn(1, n, hidden, generator=g) * 0.5
    c = torch.randn(1, n, hidden, generator=g) * 1.5
    fi = torch.rand(2, n, generator=g)
    cotangents = [
        torch.randn(n, generator=g),
        torch.randn(1, n, hidden, generator=g),
        torch.randn(1, n, hidden, generator=g),
        torch.randn(2, n, generator=g),
    ]
    inputs = [x.detach(), grad, param, h, c, fi]
    return [t.to(DEVICE) for t in inputs], [t.to(DEVICE) for t in cotangents]


def reference(rule, inputs, cotangents):
    ref = MetaLSTMCell(rule.config).to(DEVICE, F64)
    ref.load_state_dict(rule.state_dict())
    leaves = [t.double().requires_grad_(True) for t in inputs]
    outputs = ref.step_from_features(*leaves)
    grads = torch.autograd.grad(outputs, [*leaves, *ref.parameters()], cotangents)
    return [o.detach() for o in outputs], list(grads)


def triton_step(rule, inputs, cotangents, options=None, weights=None):
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    outputs = meta_lstm_step(
        *leaves, weights or dict(rule.named_parameters()), rule.config, options=options
    )
    grads = torch.autograd.grad(outputs, [*leaves, *rule.parameters()], cotangents)
    return [o.detach() for o in outputs], list(grads)


def check(rule, got, want) -> None:
    names = ["step", "new_h", "new_c", "new_fi", *(f"d {k}" for k in NAMES)]
    names += [f"d {k}" for k, _ in rule.named_parameters()]
    for name, a, b in zip(names, [*got[0], *got[1]], [*want[0], *want[1]], strict=True):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        scale = b.abs().max().item()
        torch.testing.assert_close(
            a.double(), b, rtol=1e-4, atol=REL_TOL * scale, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.parametrize("use_dot", [True, False], ids=["dot", "sum"])
@pytest.mark.parametrize("hidden_size", [20, 5])
@pytest.mark.parametrize("n", [1, 2001])
def test_matches_float64_autograd(n: int, hidden_size: int, use_dot: bool) -> None:
    rule = make_rule(hidden_size)
    inputs, cotangents = make_inputs(rule, n)
    got = triton_step(rule, inputs, cotangents, KernelOptions(use_dot=use_dot))
    check(rule, got, reference(rule, inputs, cotangents))


def test_gradcheck_against_its_own_forward() -> None:
    # torch.autograd.gradcheck of the Function on a few coordinates, every input and weight: the
    # backward kernel's Jacobian (random projections, fast mode) against central differences of
    # the forward kernel. Both run in fp32, hence eps = 1e-2 rather than float64's 1e-6. Measured
    # (seeds 5-7): it passes at atol 1e-6, rtol 1e-4; at the bounds here, 10x that, any one of the
    # eleven gradients scaled by 1.02 fails it.
    # On GPUs (FMA contraction, approximate exp/div; not measured there) bounds 10x wider.
    rule = make_rule(3, seed=5)
    inputs, _ = make_inputs(rule, 3, seed=5)
    packed = pack_weights({k: v.detach() for k, v in rule.named_parameters()}, hidden_size=3)
    leaves = [t.clone().requires_grad_(True) for t in (*inputs, *packed)]
    options = KernelOptions(block=16, backward_block=16)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Input #", UserWarning)  # float32 inputs, on purpose
        assert torch.autograd.gradcheck(
            lambda *args: MetaLSTMStepFunction.apply(*args, options), leaves, eps=1e-2, fast_mode=True, **GRADCHECK_TOL
        )


def test_no_coordinates() -> None:
    # N = 0: empty outputs and input gradients, zero weight gradients, no launch
    rule = make_rule(5)
    inputs, cotangents = make_inputs(rule, 0)
    assert inputs[0].shape == (0, 4)
    got = triton_step(rule, inputs, cotangents)
    want = reference(rule, inputs, cotangents)
    for a, b in zip([*got[0], *got[1]], [*want[0], *want[1]], strict=True):
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert not a.any()


def test_tiles_programs_and_determinism() -> None:
    # 12 tiles over 5 programs (uneven grid-stride loops) and a tail; bit-identical reruns
    rule = make_rule(20, seed=3)
    inputs, cotangents = make_inputs(rule, 2900, seed=3)
    options = KernelOptions(block=256, backward_block=256, max_programs=5)
    first = triton_step(rule, inputs, cotangents, options)
    check(rule, first, reference(rule, inputs, cotangents))
    second = triton_step(rule, inputs, cotangents, options)
    for a, b in zip(first[1], second[1], strict=True):
        assert torch.equal(a, b)
    # pre-packed weights (pack_weights of the parameters is differentiable)
    packed = pack_weights(dict(rule.named_parameters()), hidden_size=20)
    third = triton_step(rule, inputs, cotangents, options, weights=packed)
    for a, b in zip(first[1], third[1], strict=True):
        assert torch.equal(a, b)


def test_options_reach_both_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = record_options(monkeypatch, meta_backward_module, ("meta_lstm_forward", "meta_lstm_backward"))
    rule = make_rule(5)
    inputs, cotangents = make_inputs(rule, 40)
    options = KernelOptions(use_dot=False, block=16, backward_block=32, max_programs=1)
    triton_step(rule, inputs, cotangents, options)
    assert seen == [options, options]


def test_first_order_only_and_partial_outputs() -> None:
    rule = make_rule(8)
    inputs, (d_step, *_) = make_inputs(rule, 300)
    x, grad, param, h, c, fi = inputs
    param = param.requires_grad_(True)
    weights = dict(rule.named_parameters())
    step, *_ = meta_lstm_step(x, grad, param, h, c, fi, weights, rule.config)
    with pytest.raises(RuntimeError, match="first order only"):
        torch.autograd.grad((step * d_step).sum(), [param], create_graph=True)
    # only the step used: the other outputs' gradients count as zero
    step, *_ = meta_lstm_step(x, grad, param, h, c, fi, weights, rule.config)
    got = torch.autograd.grad((step * d_step).sum(), [param, *rule.parameters()])
    zeros = [torch.zeros_like(t) for t in (h, c, fi)]
    want = reference(rule, [x, grad, param.detach(), h, c, fi], [d_step, zeros[0], zeros[1], zeros[2]])
    for a, b in zip(got, [want[1][2], *want[1][6:]], strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=REL_TOL * b.abs().max().item())
    # x requiring grad, param not: d x still comes back
    xr = x.detach().requires_grad_(True)
    step, *_ = meta_lstm_step(xr, grad, param.detach(), h, c, fi, weights, rule.config)
    (got,) = torch.autograd.grad((step * d_step).sum(), [xr])
    torch.testing.assert_close(got.double(), want[1][0], rtol=1e-4, atol=REL_TOL * want[1][0].abs().max().item())


def test_torch_func_transforms_and_forward_mode_raise_a_clear_error() -> None:
    """As for the coordinate-LSTM step: PyTorch's errors under ``torch.func`` and forward-mode
    duals spoke to the function's author; they now name the step and what to use instead."""
    rule = make_rule(8)
    (x, grad, param, h, c, fi), _ = make_inputs(rule, 20)
    weights = {k: v.detach() for k, v in rule.named_parameters()}
    assert_refuses_transforms(lambda p: meta_lstm_step(x, grad, p, h, c, fi, weights, rule.config)[0], param, "meta-LSTM")


def test_invalid_arguments() -> None:
    rule = make_rule(8)
    (x, grad, param, h, c, fi), _ = make_inputs(rule, 32)
    weights = dict(rule.named_parameters())
    cfg = rule.config
    with pytest.raises(ValueError, match=r"\(N, 4\) features"):
        meta_lstm_step(x[:, :2], grad, param, h, c, fi, weights, cfg)
    with pytest.raises(ValueError, match=r"param must have shape \(N,\) = \(32,\)"):
        meta_lstm_step(x, grad, param[:31], h, c, fi, weights, cfg)
    with pytest.raises(ValueError, match=r"fi must have shape \(2, 32\)"):
        meta_lstm_step(x, grad, param, h, c, fi[:1], weights, cfg)
    with pytest.raises(ValueError, match="h must be float32"):
        meta_lstm_step(x, grad, param, h.bfloat16(), c, fi, weights, cfg)
    with pytest.raises(ValueError, match="not H=20"):
        meta_lstm_step(x, grad, param, h, c, fi, pack_weights(weights, hidden_size=8), MetaLSTMCell().config)
    # not tensors: an AttributeError of the dtype check ("'float' object has no attribute 'dtype'"),
    # where x, h, c and fi got a ValueError
    with pytest.raises(ValueError, match=r"grad must be a tensor of shape \(N,\) = \(32,\), got <class 'NoneType'>"):
        meta_lstm_step(x, None, param, h, c, fi, weights, cfg)
    with pytest.raises(ValueError, match=r"param must be a tensor of shape \(N,\) = \(32,\), got <class 'float'>"):
        meta_lstm_step(x, grad, 0.5, h, c, fi, weights, cfg)


def test_backward_refuses_output_gradients_of_another_shape() -> None:
    rule = make_rule(8)
    (x, grad, param, h, c, fi), (d_step, d_h, d_c, d_fi) = make_inputs(rule, 40)
    packed = pack_weights(dict(rule.named_parameters()), hidden_size=8)
    inputs = (x, grad, param, h, c, fi, h, packed)  # h stands for h_new: only shapes are checked before the launch
    with pytest.raises(ValueError, match=r"d_fi_new must have shape \(2, 40\), got \(1, 40\)"):
        meta_lstm_backward(*inputs, d_step, d_h, d_c, d_fi[:1])
    with pytest.raises(ValueError, match=r"d_step must have shape \(40,\), got \(10,\)"):
        meta_lstm_backward(*inputs, d_step[:10], d_h, d_c, d_fi)


def test_non_contiguous_inputs_and_output_gradients() -> None:
    # every input and output gradient in another layout gives bit for bit the contiguous result
    rule = make_rule(8)
    inputs, cotangents = make_inputs(rule, 300)
    want = triton_step(rule, inputs, cotangents)
    strided = [strided_like(t) for t in (*inputs, *cotangents)]
    assert not any(t.is_contiguous() for t in strided)
    got = triton_step(rule, strided[:6], strided[6:])
    for a, b in zip([*got[0], *got[1]], [*want[0], *want[1]], strict=True):
        assert torch.equal(a, b)


def test_backward_gives_the_gradients_of_x_grad_and_param_in_their_dtypes() -> None:
    rule = make_rule(8)
    (x, grad, param, h, c, fi), cotangents = make_inputs(rule, 40)
    packed = pack_weights(dict(rule.named_parameters()), hidden_size=8)
    _, h_new, _, _ = meta_lstm_forward(x, grad, param, h, c, fi, packed)
    want = meta_lstm_backward(x, grad, param, h, c, fi, h_new, packed, *cotangents)
    # the fp32 values are exact in float64 and, as fp32 is what the kernel reads, give the same result
    got = meta_lstm_backward(x.double(), grad.double(), param.double(), h, c, fi, h_new, packed, *cotangents)
    for name, a, b in zip(("d_x", "d_grad", "d_param"), got[:3], want[:3], strict=True):
        assert a.dtype == F64 and b.dtype == torch.float32, name
        assert torch.equal(a, b.double()), name
    assert all(t.dtype == torch.float32 for t in got[3:6])


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the task families build CPU tensors")
@pytest.mark.parametrize(
    "stop_optimizee_grad, config",
    [(True, {}), (False, {}), (False, {"momentum_decay": 0.9, "rms_decay": 0.999, "step_scale": 0.5})],
    ids=["first-order", "exact", "exact-adam-direction"],
)
def test_unroll_triton_matches_torch(stop_optimizee_grad: bool, config: dict) -> None:
    # A 3-step unroll of 3 quadratic tasks (each with its own loss) in fp32 on both paths: the
    # meta-gradient flows through the parameter (the meta-learner's cell state) from step to
    # step. Measured max-norm relative differences: triton - torch 2.2e-7, triton - float64
    # 5.0e-7, torch - float64 2.8e-7; the bound is 1e-4. With Adam's direction the kernels get
    # MetaLSTMCell.direction's output as their gradient input, and autograd carries the
    # meta-gradient through the moments.
    def meta_grad(dtype, backend):
        rule = make_rule(6, seed=4, **config).to(dtype)
        g = generator_for(0)
        tasks = QuadraticFamily(dim=3, dtype=dtype).sample_batch(3, g)
        params = {k: v * 0.3 for k, v in tasks.init_params(g).items()}
        state = rule.init_state(num_coordinates(params), dtype=dtype, device="cpu")
        result = unroll(
            rule,
            tasks,
            params,
            state,
            3,
            lr=1.0,
            backend=backend,
            stop_optimizee_grad=stop_optimizee_grad,
        )
        result.meta_loss.backward()
        return torch.cat([p.grad.reshape(-1) for p in rule.parameters()])

    want = meta_grad(torch.float32, "torch")
    got = meta_grad(torch.float32, "triton")
    exact = meta_grad(F64, "torch")
    assert want.abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    torch.testing.assert_close(got.double(), exact, rtol=1e-4, atol=1e-4 * exact.abs().max().item())


@pytest.mark.parametrize(
    "field, bad, match",
    [
        ("bias", lambda t: t[:4].clone(), r"packed weights' bias has shape \(4,\), expected \(32,\)"),
        ("w_fi", lambda t: t[:, :2].clone(), r"packed weights' w_fi has shape \(2, 2\), expected \(2, 10\)"),
        ("w_ih", lambda t: t.double(), r"packed weights' w_ih must be float32, got torch.float64"),
        ("w_hh", lambda t: t.t().contiguous().t(), r"packed weights' w_hh must be contiguous"),
        # meta_lstm_step named its H by shape[1]: an IndexError
        ("w_hh", lambda t: t[0].clone(), r"packed weights' w_hh must be \(4H, H\), got torch.Size\(\[8\]\)"),
    ],
)
def test_prepacked_weights_of_another_layout_are_refused(field, bad, match) -> None:
    rule = make_rule(8)
    inputs, (d_step, d_h, d_c, d_fi) = make_inputs(rule, 20)
    good = pack_weights({k: v.detach() for k, v in rule.named_parameters()}, hidden_size=8)
    packed = good._replace(**{field: bad(getattr(good, field))})
    with pytest.raises(ValueError, match=match):
        meta_lstm_step(*inputs, packed, rule.config)
    with pytest.raises(ValueError, match=match):
        meta_lstm_forward(*inputs, packed)
    h = inputs[3]
    with pytest.raises(ValueError, match=match):
        meta_lstm_backward(*inputs, h, packed, d_step, d_h, d_c, d_fi)


@pytest.mark.parametrize("which", ["d_step", "d_h_new", "d_c_new", "d_fi_new"])
def test_backward_refuses_output_gradients_on_another_device(which: str) -> None:
    # only d_step's device was checked: a gradient of new_h, new_c or new_fi elsewhere reached the
    # launch (on a GPU, a host pointer the kernel would read); "meta" tensors stand for the other
    # device on any machine
    rule = make_rule(8)
    inputs, cotangents = make_inputs(rule, 20)
    packed = pack_weights({k: v.detach() for k, v in rule.named_parameters()}, hidden_size=8)
    cotangents = dict(zip(["d_step", "d_h_new", "d_c_new", "d_fi_new"], cotangents, strict=True))
    cotangents[which] = cotangents[which].to("meta")
    with pytest.raises(ValueError, match=rf"all tensors must be on one device, got .*'{which}': 'meta'"):
        meta_lstm_backward(*inputs, inputs[3], packed, *cotangents.values())
