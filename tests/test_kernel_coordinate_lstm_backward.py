"""The differentiable Triton step of the coordinatewise LSTM rule (forward and backward kernels)
against autograd through the PyTorch reference :class:`CoordinateLSTM`, and ``unroll(...,
backend="triton")`` against ``backend="torch"``.

The reference runs in float64 on the same (fp32-representable) inputs and weights, so it is the
exact answer up to ~1e-16 and the measured error is the kernels' own. On CPU the kernels run in the
Triton interpreter (``TRITON_INTERPRET=1``, set by ``conftest.py``), where every program instance
costs milliseconds to tens of milliseconds: the cases use 10^3-10^4 coordinates and large blocks.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip(
    "triton", reason="the fused kernels need Triton (Linux x86-64/aarch64 wheels only)"
)

from helpers import assert_refuses_transforms, record_options, strided_like  # noqa: E402
from learnedopt.kernels import coordinate_lstm_backward as coordinate_backward_module
from learnedopt.kernels.coordinate_lstm_backward import (
    CoordinateLSTMStepFunction,
    KernelOptions,
    _backward_grid,
    coordinate_lstm_backward,
    coordinate_lstm_forward,
    coordinate_lstm_step,
)
from learnedopt.kernels.coordinate_lstm_step import is_interpreted, pack_weights

from learnedopt.meta import (
    QuadraticFamily,
    generator_for,
    num_coordinates,
    truncated_unroll,
    unroll,
)
from learnedopt.meta.tasks import QuadraticBatch, QuadraticTask
from learnedopt.nn import CoordinateLSTM, MetaLSTMConfig, UpdateRule

INTERPRETED = is_interpreted()
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu")
if DEVICE.type == "cpu" and not INTERPRETED:
    pytest.skip(
        "no CUDA device and TRITON_INTERPRET is off: nothing can run the kernels",
        allow_module_level=True,
    )
F64 = torch.float64
P = 10.0

# Tolerance, as a fraction of the largest reference value of each tensor (a max-norm relative
# error), plus an elementwise relative bound. The kernels do the reference's fp32 operations in
# another order: per value a few ulps (~1e-7 relative) through two layers, and the weight
# gradients are sums over N <= 10^4 coordinates whose fp32 rounding grows like sqrt(N) ulps
# (~1e-5 worst case, ~1e-6 typical). Measured in the interpreter: at most 1.7e-6 for every
# output and gradient against float64. The bound is 2e-5, 12x that and 50x below 1e-3. On GPUs
# FMA contraction and approximate exp/div add a few ulps; tf32 is not used ("ieee" products).
REL_TOL = 2e-5 if INTERPRETED else 1e-4
#: torch.autograd.gradcheck's bounds in fp32 (see test_gradcheck_against_its_own_forward)
GRADCHECK_TOL = {"atol": 1e-5, "rtol": 1e-3} if INTERPRETED else {"atol": 1e-4, "rtol": 1e-2}


#: feature sets: the paper's (2 inputs), the default preset's kind (momenta and rms), and one
#: that reads the parameter (K = 2 + 4 + 1 + 1 = 8)
FEATURES = {
    "grad": {},
    "rich": {"momentum_decays": (0.5, 0.9), "rms_decays": (0.99,)},
    "param": {"momentum_decays": (0.9,), "rms_decays": (0.999,), "param_input": True},
}


def make_rule(num_layers: int, hidden_size: int, seed: int = 0, **features) -> CoordinateLSTM:
    """A float32 rule whose every weight matters (the default init zeroes many of them)."""
    g = torch.Generator().manual_seed(seed)
    rule = CoordinateLSTM(
        num_layers=num_layers, hidden_size=hidden_size, preprocess_p=P, **features
    )
    rule.reset_parameters(generator=g)
    with torch.no_grad():
        for q in rule.parameters():
            q.add_(torch.randn(q.shape, generator=g) * 0.3)
    return rule.to(DEVICE)


def make_inputs(n: int, num_layers: int, hidden_size: int, seed: int = 1):
    """fp32 ``grad (n,)``, ``h, c (L, n, H)`` and cotangents ``d_step, d_h, d_c``.

    Gradient magnitudes span 1e-8..10, so both sides of the preprocessing threshold (e^-10 ~
    4.5e-5) and of the direction clamp are taken; exact zeros are included.
    """
    g = torch.Generator().manual_seed(seed)
    grad = (
        torch.randn(n, generator=g, dtype=F64)
        * torch.logspace(-8, 1, n, dtype=F64)[torch.randperm(n, generator=g)]
    )
    grad[::97] = 0.0
    h = torch.randn(num_layers, n, hidden_size, generator=g) * 0.5
    c = torch.randn(num_layers, n, hidden_size, generator=g) * 1.5
    d_step = torch.randn(n, generator=g)
    d_h = torch.randn(num_layers, n, hidden_size, generator=g)
    d_c = torch.randn(num_layers, n, hidden_size, generator=g)
    return [t.to(DEVICE, torch.float32) for t in (grad, h, c, d_step, d_h, d_c)]


def make_features(n: int, k: int, seed: int = 2) -> torch.Tensor:
    """fp32 ``(n, k)`` input features of the sizes :meth:`CoordinateLSTM.features` gives (the
    preprocessed gradient lies in [-1, 1], the rms features are O(1))."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, k, generator=g) * 2 - 1).to(DEVICE)


def moment_state(rule: CoordinateLSTM, n: int, seed: int = 3) -> dict[str, torch.Tensor]:
    """Random fp32 moment states ``m (M, n)`` and ``v (R, n)`` of the rule's feature set."""
    g = torch.Generator().manual_seed(seed)
    cfg = rule.config
    state = {}
    if cfg.momentum_decays:
        state["m"] = torch.randn(len(cfg.momentum_decays), n, generator=g) * 1e-2
    if cfg.rms_decays:
        state["v"] = torch.rand(len(cfg.rms_decays), n, generator=g) * 1e-3
    return {k: v.to(DEVICE) for k, v in state.items()}


def float64_rule(rule: CoordinateLSTM, dtype=F64) -> CoordinateLSTM:
    ref = CoordinateLSTM(rule.config).to(DEVICE, dtype)
    ref.load_state_dict(rule.state_dict())
    return ref


def reference(rule, grad, h, c, d_step, d_h, d_c, dtype=F64, moments=None):
    """Outputs ``(step, new_h, new_c)`` and gradients ``(d grad, d h, d c, *d moments, *d
    params)`` by autograd through :meth:`CoordinateLSTM.forward` in ``dtype`` (the gradient
    doubles as the parameter input)."""
    ref = float64_rule(rule, dtype)
    moments = moments or {}
    inputs = [t.to(dtype).requires_grad_(True) for t in (grad, h, c, *moments.values())]
    state = {"h": inputs[1], "c": inputs[2], **dict(zip(moments, inputs[3:], strict=True))}
    step, new = ref(inputs[0], inputs[0], state)
    outputs = (step, new["h"], new["c"])
    grads = torch.autograd.grad(outputs, [*inputs, *ref.parameters()], (d_step, d_h, d_c))
    return [o.detach() for o in outputs], list(grads)


def triton_step(rule, grad, h, c, d_step, d_h, d_c, options=None, moments=None):
    """The same with the LSTM stack and head through :func:`coordinate_lstm_step` (the unroll's
    ``backend="triton"``)."""
    moments = moments or {}
    inputs = [t.clone().requires_grad_(True) for t in (grad, h, c, *moments.values())]
    x, _ = rule.features(inputs[0], inputs[0], dict(zip(moments, inputs[3:], strict=True)))
    outputs = coordinate_lstm_step(
        x, inputs[1], inputs[2], dict(rule.named_parameters()), rule.config, options=options
    )
    grads = torch.autograd.grad(outputs, [*inputs, *rule.parameters()], (d_step, d_h, d_c))
    return [o.detach() for o in outputs], list(grads)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    expected = expected.to(actual.dtype) if expected.dtype != F64 else expected
    scale = expected.abs().max().item()
    torch.testing.assert_close(
        actual.to(expected.dtype),
        expected,
        rtol=1e-4,
        atol=REL_TOL * scale,
        msg=lambda m: f"{name}: {m}",
    )


def check_all(rule, grad, got, want, moments=()) -> None:
    """Outputs and gradients within :data:`REL_TOL`; ``grad`` is the rule's gradient input."""
    names = ["step", "new_h", "new_c"]
    for name, a, b in zip(names, got[0], want[0], strict=True):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        assert_rel_close(a, b, name)
    names = [
        "d grad",
        "d h",
        "d c",
        *(f"d {k}" for k in moments),
        *(f"d {k}" for k, _ in rule.named_parameters()),
    ]
    for name, a, b in zip(names, got[1], want[1], strict=True):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        assert_rel_close(a, b, name)
    # d grad spans orders of magnitude (the preprocessing's slope is 1 / (p |g|) above the
    # threshold, e^p below it), so the max-norm check above says little about coordinates with
    # large |g|. Scaled by max(|g|, e^-p) every coordinate's value is O(d features): check that too.
    weight = grad.abs().clamp_min(math.exp(-P)).double()
    assert_rel_close(got[1][0] * weight, want[1][0] * weight, "d grad * max(|g|, e^-p)")


@pytest.mark.parametrize("use_dot", [True, False], ids=["dot", "sum"])
@pytest.mark.parametrize("num_layers, hidden_size", [(2, 20), (1, 8)])
@pytest.mark.parametrize("n", [1, 3001])
def test_matches_float64_autograd(n: int, num_layers: int, hidden_size: int, use_dot: bool) -> None:
    rule = make_rule(num_layers, hidden_size)
    inputs = make_inputs(n, num_layers, hidden_size)
    got = triton_step(rule, *inputs, options=KernelOptions(use_dot=use_dot))
    check_all(rule, inputs[0], got, reference(rule, *inputs))


@pytest.mark.parametrize("features", ["rich", "param"])
def test_every_feature_set_matches_autograd(features: str) -> None:
    # The moments' and the parameter's gradients reach them through the kernels' d x and
    # autograd through CoordinateLSTM.features. Those features are computed in fp32 on both
    # paths, and their rounding alone puts the fp32 PyTorch path up to 2e-5 (max-norm relative,
    # measured: new h, d m) from float64; the kernels then differ from that path by at most
    # 3e-6 (measured). So: within REL_TOL of the fp32 PyTorch path, within 5 REL_TOL of float64.
    rule = make_rule(2, 20, **FEATURES[features])
    n = 1500
    inputs = make_inputs(n, 2, 20, seed=5)
    moments = moment_state(rule, n)
    got = triton_step(rule, *inputs, moments=moments)
    check_all(rule, inputs[0], got, reference(rule, *inputs, torch.float32, moments), moments)
    want = reference(rule, *inputs, moments=moments)
    for a, b in zip([*got[0], *got[1]], [*want[0], *want[1]], strict=True):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=5 * REL_TOL * b.abs().max().item())


def kernel_reference(rule, x, h, c, d_step, d_h, d_c):
    """Outputs and gradients ``(d x, d h, d c, *d params)`` of
    :meth:`CoordinateLSTM.step_from_features` by float64 autograd."""
    ref = float64_rule(rule)
    inputs = [t.double().requires_grad_(True) for t in (x, h, c)]
    outputs = ref.step_from_features(*inputs)
    grads = torch.autograd.grad(outputs, [*inputs, *ref.parameters()], (d_step, d_h, d_c))
    return [o.detach() for o in outputs], list(grads)


def kernel_step(rule, x, h, c, d_step, d_h, d_c, options=None):
    inputs = [t.clone().requires_grad_(True) for t in (x, h, c)]
    outputs = coordinate_lstm_step(
        *inputs, dict(rule.named_parameters()), rule.config, options=options
    )
    grads = torch.autograd.grad(outputs, [*inputs, *rule.parameters()], (d_step, d_h, d_c))
    return [o.detach() for o in outputs], list(grads)


def check_kernel(rule, got, want) -> None:
    names = ["step", "new_h", "new_c", "d x", "d h", "d c"]
    names += [f"d {k}" for k, _ in rule.named_parameters()]
    for name, a, b in zip(names, [*got[0], *got[1]], [*want[0], *want[1]], strict=True):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        assert_rel_close(a, b, name)


@pytest.mark.parametrize(
    "n, num_layers, hidden_size, momenta, block, max_programs",
    [
        # 10 tiles over 3 programs: uneven grid-stride loops, a tail; K = 10 (padded to 16)
        (5000, 2, 20, 3, 512, 3),
        (1024, 2, 20, 0, 256, None),  # tiles fill the range exactly; K = 2
        (700, 3, 5, 8, 128, 2),  # three layers, hidden 5 padded to 16, K = 18 padded to 32
        (17, 1, 20, 1, 16, None),  # the smallest block, a one-row tail
    ],
)
def test_tiles_tails_and_programs(n, num_layers, hidden_size, momenta, block, max_programs) -> None:
    decays = tuple(0.1 * (k + 1) for k in range(momenta))
    rule = make_rule(num_layers, hidden_size, seed=n, momentum_decays=decays)
    _, h, c, d_step, d_h, d_c = make_inputs(n, num_layers, hidden_size, seed=n)
    x = make_features(n, rule.config.num_inputs, seed=n)
    options = KernelOptions(block=block, backward_block=block, max_programs=max_programs)
    got = kernel_step(rule, x, h, c, d_step, d_h, d_c, options=options)
    check_kernel(rule, got, kernel_reference(rule, x, h, c, d_step, d_h, d_c))


def test_no_coordinates() -> None:
    # N = 0: empty outputs and input gradients, zero weight gradients, no launch
    rule = make_rule(2, 8, **FEATURES["rich"])
    _, h, c, d_step, d_h, d_c = make_inputs(0, 2, 8)
    x = make_features(0, rule.config.num_inputs)
    got = kernel_step(rule, x, h, c, d_step, d_h, d_c)
    want = kernel_reference(rule, x, h, c, d_step, d_h, d_c)
    for a, b in zip([*got[0], *got[1]], [*want[0], *want[1]], strict=True):
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert not a.any()


def test_directional_derivative_of_its_own_forward() -> None:
    # gradcheck-style, kernels only: the backward's directional derivative equals central
    # differences of the Triton forward along a random direction in every input and weight.
    # fp32 forward with eps = 3e-3: truncation error ~eps^2 f''' / f' (measured 3.5e-3 relative at
    # eps = 1e-2; 3.1e-4 here) and rounding ~1e-7 / eps (~3e-5); the bound is 2e-3.
    rule = make_rule(2, 8, **FEATURES["rich"])
    n = 400
    g = torch.Generator().manual_seed(3)
    x = make_features(n, rule.config.num_inputs)
    _, h, c, d_step, d_h, d_c = make_inputs(n, 2, 8)
    weights = {k: v.detach().clone() for k, v in rule.named_parameters()}
    primals = [x, h, c, *weights.values()]
    directions = [torch.randn(t.shape, generator=g).to(DEVICE) for t in primals]

    def loss(tensors) -> float:
        xx, hh, cc, *ws = tensors
        step, h_new, c_new = coordinate_lstm_step(
            xx, hh, cc, dict(zip(weights, ws, strict=True)), rule.config
        )
        return sum(
            (o.double() * w.double()).sum().item()
            for o, w in zip((step, h_new, c_new), (d_step, d_h, d_c), strict=True)
        )

    eps = 3e-3
    plus = loss([p + eps * d for p, d in zip(primals, directions, strict=True)])
    minus = loss([p - eps * d for p, d in zip(primals, directions, strict=True)])
    numeric = (plus - minus) / (2 * eps)

    leaves = [t.clone().requires_grad_(True) for t in primals]
    xx, hh, cc, *ws = leaves
    outs = coordinate_lstm_step(xx, hh, cc, dict(zip(weights, ws, strict=True)), rule.config)
    grads = torch.autograd.grad(outs, leaves, (d_step, d_h, d_c))
    analytic = sum(
        (gr.double() * d.double()).sum().item() for gr, d in zip(grads, directions, strict=True)
    )
    assert abs(numeric) > 1.0
    assert abs(analytic - numeric) <= 2e-3 * abs(numeric)


def test_gradcheck_against_its_own_forward() -> None:
    # torch.autograd.gradcheck of the Function on a few coordinates of two layers, every input and
    # packed weight (w_ih of the second layer too): the backward kernel's Jacobian (random
    # projections, fast mode) against central differences of the forward kernel, in fp32, hence
    # eps = 1e-2; the bounds are those of the meta-learner's test (test_kernel_meta_lstm_backward).
    # On GPUs (FMA contraction, approximate exp/div; not measured there) bounds 10x wider.
    rule = make_rule(2, 3, seed=5, **FEATURES["param"])
    _, h, c, *_ = make_inputs(3, 2, 3, seed=5)
    x = make_features(3, rule.config.num_inputs, seed=5)
    packed = pack_weights(
        {k: v.detach() for k, v in rule.named_parameters()}, num_layers=2, hidden_size=3, num_inputs=rule.config.num_inputs
    )
    leaves = [t.clone().requires_grad_(True) for t in (x, h, c, *packed)]
    options = KernelOptions(block=16, backward_block=16)
    scale = rule.config.output_scale
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Input #", UserWarning)  # float32 inputs, on purpose
        assert torch.autograd.gradcheck(
            lambda *args: CoordinateLSTMStepFunction.apply(*args, scale, options), leaves, eps=1e-2, fast_mode=True, **GRADCHECK_TOL
        )


def test_options_reach_both_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = record_options(monkeypatch, coordinate_backward_module, ("coordinate_lstm_forward", "coordinate_lstm_backward"))
    rule = make_rule(1, 8)
    options = KernelOptions(use_dot=False, block=16, backward_block=32, max_programs=1)
    kernel_step(rule, make_features(40, 2), *make_inputs(40, 1, 8)[1:], options=options)
    assert seen == [options, options]


def test_double_backward_raises_and_partial_requires_grad() -> None:
    rule = make_rule(1, 8)
    grad, h, c, d_step, d_h, d_c = make_inputs(100, 1, 8)
    x, _ = rule.features(grad, grad, {})
    h = h.requires_grad_(True)
    weights = dict(rule.named_parameters())
    step, _, _ = coordinate_lstm_step(x, h, c, weights, rule.config)
    # preparing a double backward fails loudly, also where the second-order terms would
    # otherwise be silently missing (a differentiable term beside the kernel's)
    with pytest.raises(RuntimeError, match="first order only"):
        torch.autograd.grad((step * d_step).sum() + h.pow(3).sum(), [h], create_graph=True)
    step, _, _ = coordinate_lstm_step(x, h, c, weights, rule.config)
    with pytest.raises(RuntimeError, match="first order only"):
        torch.autograd.grad(step.pow(2).sum(), [h], create_graph=True)
    # only some outputs used, x not requiring grad: the unused outputs count as zero
    want = reference(
        rule, grad, h.detach(), c, d_step, torch.zeros_like(d_h), torch.zeros_like(d_c)
    )
    step, _, _ = coordinate_lstm_step(x, h, c, weights, rule.config)
    got = torch.autograd.grad((step * d_step).sum(), [h, *rule.parameters()])
    for a, b in zip(got, [want[1][1], *want[1][3:]], strict=True):
        assert_rel_close(a, b, "partial")
    # x requiring grad, h and c not: d x still comes back
    xr = x.detach().requires_grad_(True)
    step, _, _ = coordinate_lstm_step(xr, h.detach(), c, weights, rule.config)
    (got,) = torch.autograd.grad((step * d_step).sum(), [xr])
    zeros = torch.zeros_like(d_h)
    want = kernel_reference(rule, x.detach(), h.detach(), c, d_step, zeros, zeros)
    assert_rel_close(got, want[1][0], "d x alone")
    # under no_grad it is a plain forward
    with torch.no_grad():
        out = coordinate_lstm_step(x, h, c, weights, rule.config)
    assert not any(o.requires_grad for o in out)


def test_torch_func_transforms_and_forward_mode_raise_a_clear_error() -> None:
    """The step is a classic ``autograd.Function`` with a first-order Triton backward: under a
    ``torch.func`` transform PyTorch refused it with advice for the function's author ("it must
    override the setup_context staticmethod"), and a forward-mode dual with "You must implement
    the jvp function"; both now say what does not run there and what to use, as the CPU path's
    LSTM step does (tests/test_lstm_step.py)."""
    rule = make_rule(1, 8)
    grad, h, c, *_ = make_inputs(20, 1, 8)
    x = rule.features(grad, grad, {})[0].detach()
    weights = {k: v.detach() for k, v in rule.named_parameters()}
    assert_refuses_transforms(lambda x: coordinate_lstm_step(x, h, c, weights, rule.config)[0], x, "coordinate-LSTM")


def test_deterministic_and_prepacked() -> None:
    # the weight gradients are per-program partial sums added in a fixed order: bit-identical
    # on every run (no atomics)
    rule = make_rule(2, 20)
    inputs = make_inputs(3000, 2, 20)
    options = KernelOptions(backward_block=512, max_programs=2)
    first = triton_step(rule, *inputs, options=options)
    second = triton_step(rule, *inputs, options=options)
    for a, b in zip(first[1], second[1], strict=True):
        assert torch.equal(a, b)
    # pack_weights of the parameters is differentiable too
    packed = pack_weights(dict(rule.named_parameters()), num_layers=2, hidden_size=20)
    x, _ = rule.features(inputs[0], inputs[0], {})
    step, _, _ = CoordinateLSTMStepFunction.apply(
        x, inputs[1], inputs[2], *packed, rule.config.output_scale, options
    )
    got = torch.autograd.grad((step * inputs[3]).sum(), list(rule.parameters()))
    want = reference(rule, *inputs[:4], torch.zeros_like(inputs[4]), torch.zeros_like(inputs[5]))
    for a, b in zip(got, want[1][3:], strict=True):
        assert_rel_close(a, b, "prepacked")


def test_invalid_arguments() -> None:
    rule = make_rule(2, 20)
    grad, h, c, *_ = make_inputs(32, 2, 20)
    x, _ = rule.features(grad, grad, {})
    weights = dict(rule.named_parameters())
    with pytest.raises(ValueError, match="must be float32"):
        coordinate_lstm_step(x, h.bfloat16(), c, weights, rule.config)
    with pytest.raises(ValueError, match=r"shape \(L, N, H\)"):
        coordinate_lstm_step(x, h[:1], c, weights, rule.config)
    with pytest.raises(ValueError, match="2-D"):
        coordinate_lstm_step(grad, h, c, weights, rule.config)
    with pytest.raises(ValueError, match="x dtype must be one of .*got torch.int32"):
        coordinate_lstm_step(x.int(), h, c, weights, rule.config)
    with pytest.raises(ValueError, match="x has 3 features per coordinate but the weights take 2"):
        coordinate_lstm_step(torch.cat([x, x[:, :1]], dim=1), h, c, weights, rule.config)
    # weights of another feature set than the config's
    extra = CoordinateLSTM(momentum_decays=(0.9,))
    extra_weights = {k: t.detach().to(DEVICE) for k, t in extra.named_parameters()}
    with pytest.raises(ValueError, match="4 layer-0 inputs, but num_inputs is 2"):
        coordinate_lstm_step(x, h, c, extra_weights, rule.config)
    packed = pack_weights(extra_weights, num_layers=2, hidden_size=20, num_inputs=4)
    with pytest.raises(ValueError, match="K=4 inputs, not L=2, H=20, K=2"):
        coordinate_lstm_step(x, h, c, packed, rule.config)
    with pytest.raises(ValueError, match="power of two"):
        KernelOptions(backward_block=48)
    with pytest.raises(ValueError, match="block must be an integer power of two >= 16, got 8"):
        KernelOptions(block=8)
    with pytest.raises(ValueError, match="max_programs"):
        KernelOptions(max_programs=0)
    with pytest.raises(ValueError, match="num_warps must be an integer power of two, got 3"):
        KernelOptions(num_warps=3)
    with pytest.raises(ValueError, match="input_precision must be one of .*got 'fp8'"):
        KernelOptions(input_precision="fp8")


@pytest.mark.parametrize(
    "options, match",
    [
        # accepted, then the backward's partial-sum buffers failed in torch.zeros (2.5 programs),
        # after the forward had run: in meta-training, at the first backward
        (dict(max_programs=2.5), r"max_programs must be an integer >= 1, got 2.5"),
        (dict(max_programs=True), r"max_programs must be an integer >= 1, got True"),
        # a TypeError of the power-of-two check ("unsupported operand type(s) for &")
        (dict(block=32.0), r"block must be an integer power of two >= 16, got 32.0"),
        (dict(backward_block=64.0), r"backward_block must be an integer power of two >= 16, got 64.0"),
        (dict(num_warps=4.0), r"num_warps must be an integer power of two, got 4.0"),
        (dict(num_warps=True), r"num_warps must be an integer power of two, got True"),  # ran as 1 warp
        # a switch given as a string was taken as true
        (dict(use_dot="no"), r"use_dot must be True or False, got 'no'"),
    ],
)
def test_kernel_options_of_another_type_are_refused(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        KernelOptions(**options)


def test_backward_programs_are_bounded_by_max_programs() -> None:
    # (BLOCK, P): P programs walk the tiles, at most max_programs of them and at most one per tile
    cpu = torch.device("cpu")
    assert _backward_grid(KernelOptions(backward_block=16, max_programs=3), 1000, cpu) == (16, 3)
    assert _backward_grid(KernelOptions(backward_block=16, max_programs=3), 40, cpu) == (16, 3)
    assert _backward_grid(KernelOptions(backward_block=16, max_programs=8), 40, cpu) == (16, 3)
    assert _backward_grid(KernelOptions(backward_block=16), 1000, cpu) == (16, 63)


def test_backward_refuses_output_gradients_of_another_shape() -> None:
    rule = make_rule(2, 8)
    grad, h, c, d_step, d_h, d_c = make_inputs(40, 2, 8)
    x, _ = rule.features(grad, grad, {})
    packed = pack_weights(dict(rule.named_parameters()), num_layers=2, hidden_size=8)
    args = (x.detach(), h, c, h, packed)  # h stands for h_new: only shapes are checked before the launch
    with pytest.raises(ValueError, match=r"d_step must have shape \(40,\), got \(10,\)"):
        coordinate_lstm_backward(*args, d_step[:10], d_h, d_c, output_scale=rule.config.output_scale)
    with pytest.raises(ValueError, match=r"d_h_new and d_c_new must have shape \(2, 40, 8\)"):
        coordinate_lstm_backward(*args, d_step, d_h, d_c[:1], output_scale=rule.config.output_scale)


def test_non_contiguous_inputs_and_output_gradients() -> None:
    # x, h, c and the outputs' gradients in other layouts (an unroll's expand or transpose
    # backward hands such gradients on) give bit for bit the contiguous result
    rule = make_rule(2, 8, **FEATURES["rich"])
    _, h, c, d_step, d_h, d_c = make_inputs(300, 2, 8)
    x = make_features(300, rule.config.num_inputs)
    want = kernel_step(rule, x, h, c, d_step, d_h, d_c)
    strided = [strided_like(t) for t in (x, h, c, d_step, d_h, d_c)]
    assert not any(t.is_contiguous() for t in strided)
    got = kernel_step(rule, *strided)
    for a, b in zip([*got[0], *got[1]], [*want[0], *want[1]], strict=True):
        assert torch.equal(a, b)


def test_backward_gives_the_gradient_of_x_in_its_dtype() -> None:
    rule = make_rule(1, 8)
    grad, h, c, d_step, d_h, d_c = make_inputs(40, 1, 8)
    x, _ = rule.features(grad, grad, {})
    packed = pack_weights(dict(rule.named_parameters()), num_layers=1, hidden_size=8)
    _, h_new, _ = coordinate_lstm_forward(x.detach(), h, c, packed, output_scale=rule.config.output_scale)
    kw = {"output_scale": rule.config.output_scale}
    want = coordinate_lstm_backward(x.detach(), h, c, h_new, packed, d_step, d_h, d_c, **kw)
    got = coordinate_lstm_backward(x.detach().double(), h, c, h_new, packed, d_step, d_h, d_c, **kw)
    assert got[0].dtype == F64 and torch.equal(got[0], want[0].double())
    assert got[1].dtype == got[2].dtype == torch.float32
    # and none where it is not needed
    assert coordinate_lstm_backward(x.detach(), h, c, h_new, packed, d_step, d_h, d_c, need_d_x=False, **kw)[0] is None


# ----------------------------------------------------------------------------- the unroll
def unroll_setup(dtype: torch.dtype = torch.float32, features: str = "grad"):
    """A rule, 2 quadratic tasks of dimension 3 and their start, in ``dtype`` (the same
    fp32-representable values in either dtype)."""
    rule = make_rule(2, 8, seed=4, **FEATURES[features]).to(dtype)
    g = generator_for(0)
    tasks = QuadraticFamily(dim=3, dtype=torch.float32).sample_batch(2, g)
    params = {k: (v * 0.3).to(dtype) for k, v in tasks.init_params(g).items()}
    tasks = QuadraticBatch(
        [QuadraticTask(t.weight.to(dtype), t.target.to(dtype)) for t in tasks.tasks]
    )
    return rule, tasks, params


def unroll_meta_grad(rule, tasks, params, backend: str, **kwargs) -> torch.Tensor:
    rule.zero_grad(set_to_none=True)
    dtype = next(rule.parameters()).dtype
    state = rule.init_state(num_coordinates(params), dtype=dtype, device="cpu")
    unroll(rule, tasks, params, state, 3, lr=0.5, backend=backend, **kwargs).meta_loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in rule.parameters()])


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the task families build CPU tensors")
@pytest.mark.parametrize(
    "stop_optimizee_grad, features",
    [(True, "grad"), (False, "grad"), (True, "rich"), (False, "param")],
    ids=["first-order", "exact", "first-order-rich", "exact-param-input"],
)
def test_unroll_triton_matches_torch(stop_optimizee_grad: bool, features: str) -> None:
    # Both paths in fp32 on a 3-step unroll of 2 quadratic tasks. Without stop_optimizee_grad
    # the rule's gradient input carries the Hessian terms, through the kernels' d x. With
    # param_input the parameter feature carries the path through the unrolled parameters even
    # first-order. The paths differ by fp32 rounding (~1e-7 per step) amplified by the unroll:
    # measured max-norm relative differences 5e-8 (triton - torch, and either - float64); the
    # bound is 1e-4.
    rule, tasks, params = unroll_setup(features=features)
    kw = {"stop_optimizee_grad": stop_optimizee_grad}
    want = unroll_meta_grad(rule, tasks, params, "torch", **kw)
    got = unroll_meta_grad(rule, tasks, params, "triton", **kw)
    assert want.abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    # and the float64 PyTorch meta-gradient is within the same bound of both
    rule64, tasks64, params64 = unroll_setup(F64, features)
    exact = unroll_meta_grad(rule64, tasks64, params64, "torch", **kw)
    torch.testing.assert_close(got.double(), exact, rtol=1e-4, atol=1e-4 * exact.abs().max().item())


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the task families build CPU tensors")
def test_unroll_backend_dispatch() -> None:
    rule, tasks, params = unroll_setup()
    state = rule.init_state(num_coordinates(params), dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        unroll(rule, tasks, params, state, 2, backend="cuda")
    # truncated_unroll threads it through: same losses as the torch path
    kw = {"horizon": 3, "truncation": 2}
    losses_t = truncated_unroll(rule, tasks, params, state, backend="triton", **kw)
    losses_p = truncated_unroll(rule, tasks, params, state, backend="torch", **kw)
    torch.testing.assert_close(losses_t, losses_p, rtol=1e-5, atol=1e-6)
    # "torch" runs the PyTorch module even where the kernels could run (here: interpreted)
    calls = []
    forward = rule.forward
    rule.forward = lambda *args: calls.append(1) or forward(*args)
    unroll(rule, tasks, params, state, 2, backend="torch")
    del rule.forward
    assert len(calls) == 2
    # "triton" refuses what the kernels cannot run; "auto" falls back to PyTorch on CPU
    rule64, tasks64, params64 = unroll_setup(F64)
    state64 = rule64.init_state(num_coordinates(params64), dtype=F64, device="cpu")
    with pytest.raises(ValueError, match="float32 only"):
        unroll(rule64, tasks64, params64, state64, 2, backend="triton")
    unroll(rule64, tasks64, params64, state64, 2, backend="auto")
    # nor bfloat16 states beside float32 parameters, nor the rule on another device: refused
    # for every backend, before the kernels are asked
    state16 = rule.init_state(num_coordinates(params), dtype=torch.bfloat16, device="cpu")
    with pytest.raises(ValueError, match=r"one dtype .*torch\.float32 \(params\['theta'\]\), torch\.bfloat16 \(state"):
        unroll(rule, tasks, params, state16, 2, backend="triton")
    with pytest.raises(ValueError, match=r"one device .*cpu \(params\['theta'\]\).*meta \(rule weight"):
        unroll(copy.deepcopy(rule).to("meta"), tasks, params, state, 2, backend="triton")


    class PlainSGD(UpdateRule):
        """A rule the kernels know nothing of."""

        kind = "PlainSGD"
        config_class = MetaLSTMConfig  # any config dataclass; unused

        def state_spec(self):
            return {}

        def forward(self, grad, param, state, loss=None):
            return -grad, {}

    sgd = PlainSGD()
    with pytest.raises(ValueError, match="only CoordinateLSTM and MetaLSTMCell, not PlainSGD"):
        unroll(sgd, tasks, params, {}, 2, backend="triton")
    unroll(sgd, tasks, params, {}, 2, backend="auto")


def test_unroll_triton_on_cpu_without_the_interpreter_is_refused_clearly() -> None:
    # without TRITON_INTERPRET (a user's CPU machine), backend="triton" names what is missing for
    # either rule before any step, and "auto" runs the PyTorch path
    script = """
import torch
from learnedopt.meta import QuadraticFamily, generator_for, num_coordinates, unroll
from learnedopt.nn import CoordinateLSTM, MetaLSTMCell
tasks = QuadraticFamily(dim=3, dtype=torch.float32).sample_batch(2, generator_for(0))
params = tasks.init_params(generator_for(1))
for rule in (CoordinateLSTM(), MetaLSTMCell()):
    state = rule.init_state(num_coordinates(params), dtype=torch.float32, device="cpu")
    try:
        unroll(rule, tasks, params, state, 2, backend="triton")
    except ValueError as err:
        print("raised:", err)
    result = unroll(rule, tasks, params, state, 2, backend="auto")
    print("auto:", bool(torch.isfinite(result.meta_loss)))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    refusal = (
        "raised: backend='triton' cannot run this update: CPU tensors need the Triton interpreter "
        "(TRITON_INTERPRET=1 set before Triton is imported); otherwise use CUDA tensors"
    )
    assert out.stdout.splitlines() == [refusal, "auto: True"] * 2, out.stdout


@pytest.mark.parametrize(
    "field, bad, match",
    [
        ("bias", lambda t: t[:1].clone(), r"packed weights' bias has shape \(1, 32\), expected \(2, 32\)"),
        ("head_w", lambda t: t[:1].clone(), r"packed weights' head_w has shape \(1,\), expected \(8,\)"),
        ("w_ih", lambda t: t.double(), r"packed weights' w_ih must be float32, got torch.float64"),
        ("w_hh", lambda t: t.transpose(1, 2).contiguous().transpose(1, 2), r"packed weights' w_hh must be contiguous"),
        # its column count was read before any check: an IndexError
        ("w_ih0", lambda t: t[0].clone(), r"packed weights' w_ih0 has shape \(\d+,\), expected \(32, \d+\)"),
    ],
)
def test_prepacked_weights_of_another_layout_are_refused(field, bad, match) -> None:
    # the forward and the backward read every packed tensor by its expected layout: one of
    # another shape was read past its end, one of another dtype or layout misread
    rule = make_rule(2, 8)
    grad, h, c, d_step, d_h, d_c = make_inputs(20, 2, 8)
    x, _ = rule.features(grad, grad, {})
    x = x.detach()
    good = pack_weights({k: v.detach() for k, v in rule.named_parameters()}, num_layers=2, hidden_size=8)
    packed = good._replace(**{field: bad(getattr(good, field))})
    with pytest.raises(ValueError, match=match):
        coordinate_lstm_step(x, h, c, packed, rule.config)
    with pytest.raises(ValueError, match=match):
        coordinate_lstm_forward(x, h, c, packed, output_scale=rule.config.output_scale)
    with pytest.raises(ValueError, match=match):
        coordinate_lstm_backward(x, h, c, h, packed, d_step, d_h, d_c, output_scale=rule.config.output_scale)
