"""The differentiable Triton step of the coordinatewise LSTM rule (forward and backward kernels)
against autograd through the PyTorch reference :class:`CoordinateLSTM`, and ``unroll(...,
backend="triton")`` against ``backend="torch"``.

The reference runs in float64 on the same (fp32-representable) inputs and weights, so it is the
exact answer up to ~1e-16 and the measured error is the kernels' own. On CPU the kernels run in the
Triton interpreter (``TRITON_INTERPRET=1``, set by ``conftest.py``), where every program instance
costs milliseconds to tens of milliseconds: the cases use 10^3-10^4 coordinates and large blocks.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip(
    "triton", reason="the fused kernels need Triton (Linux x86-64/aarch64 wheels only)"
)

from learnedopt.kernels.coordinate_lstm_backward import (
    CoordinateLSTMStepFunction,
    KernelOptions,
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
from learnedopt.nn import CoordinateLSTM, MetaLSTMCell

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


def make_rule(num_layers: int, hidden_size: int, seed: int = 0) -> CoordinateLSTM:
    """A float32 rule whose every weight matters (the default init zeroes many of them)."""
    g = torch.Generator().manual_seed(seed)
    rule = CoordinateLSTM(num_layers=num_layers, hidden_size=hidden_size, preprocess_p=P)
    rule.reset_parameters(generator=g)
    with torch.no_grad():
        for q in rule.parameters():
            q.add_(torch.randn(q.shape, generator=g) * 0.3)
    return rule.to(DEVICE)


def make_inputs(n: int, num_layers: int, hidden_size: int, seed: int = 1):
    """fp32 ``grad (n,)``, ``h, c (L, n, H)`` and cotangents ``d_step, d_h, d_c``.

    Gradient magnitudes span 1e-8..10, so both sides of the preprocessing threshold (e^-10 ~
    4.5e-5) and of the direction clamp are taken; exact zeros are included. Values at exactly the
    threshold are left to :func:`test_preprocessing_kinks`: fp32 and float64 may round them to
    opposite sides.
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


def reference(rule, grad, h, c, d_step, d_h, d_c, dtype=F64):
    """Outputs ``(step, new_h, new_c)`` and gradients ``(d grad, d h, d c, *d params)`` by
    autograd through :meth:`CoordinateLSTM.forward` in ``dtype``."""
    ref = CoordinateLSTM(rule.config).to(DEVICE, dtype)
    ref.load_state_dict(rule.state_dict())
    inputs = [t.to(dtype).requires_grad_(True) for t in (grad, h, c)]
    step, state = ref(inputs[0], inputs[0], {"h": inputs[1], "c": inputs[2]})
    outputs = (step, state["h"], state["c"])
    grads = torch.autograd.grad(outputs, [*inputs, *ref.parameters()], (d_step, d_h, d_c))
    return [o.detach() for o in outputs], list(grads)


def triton_step(rule, grad, h, c, d_step, d_h, d_c, options=None):
    """The same through :func:`coordinate_lstm_step`."""
    inputs = [t.clone().requires_grad_(True) for t in (grad, h, c)]
    outputs = coordinate_lstm_step(
        *inputs, dict(rule.named_parameters()), rule.config, options=options
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


def check_all(rule, grad, got, want) -> None:
    """Outputs and gradients within :data:`REL_TOL`; ``grad`` is the rule's gradient input."""
    names = ["step", "new_h", "new_c"]
    for name, a, b in zip(names, got[0], want[0], strict=True):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        assert_rel_close(a, b, name)
    names = ["d grad", "d h", "d c", *(f"d {k}" for k, _ in rule.named_parameters())]
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


@pytest.mark.parametrize(
    "n, num_layers, hidden_size, block, max_programs",
    [
        (5000, 2, 20, 512, 3),  # 10 tiles over 3 programs: uneven grid-stride loops, a tail
        (1024, 2, 20, 256, None),  # tiles fill the range exactly
        (700, 3, 5, 128, 2),  # three layers (the top-down loop), hidden 5 padded to 16
        (17, 1, 20, 16, None),  # the smallest block, a one-row tail
    ],
)
def test_tiles_tails_and_programs(n, num_layers, hidden_size, block, max_programs) -> None:
    rule = make_rule(num_layers, hidden_size, seed=n)
    inputs = make_inputs(n, num_layers, hidden_size, seed=n)
    options = KernelOptions(block=block, backward_block=block, max_programs=max_programs)
    got = triton_step(rule, *inputs, options=options)
    check_all(rule, inputs[0], got, reference(rule, *inputs))


def test_preprocessing_kinks() -> None:
    # At the threshold |g| = e^-p (where log(max(|g|, e^-p)) bends), at the direction clamp's
    # bounds e^p g = +-1 (the same points) and at 0, the gradient follows torch's conventions:
    # clamp passes it at the bounds, abs has derivative 0 at 0. fp32 autograd is the reference
    # here, as it rounds e^-p exactly as the kernels do.
    rule = make_rule(2, 20)
    floor = torch.tensor(math.exp(-P), dtype=torch.float32).item()
    values = [0.0, floor, -floor, floor * (1 + 2**-22), -floor * (1 - 2**-22), 1e-30, -3.0, 2e-5]
    grad, h, c, d_step, d_h, d_c = make_inputs(64, 2, 20)
    grad[: len(values)] = torch.tensor(values, device=DEVICE)
    inputs = (grad, h, c, d_step, d_h, d_c)
    got = triton_step(rule, *inputs)
    want = reference(rule, *inputs, dtype=torch.float32)
    check_all(rule, grad, got, want)


def test_directional_derivative_of_its_own_forward() -> None:
    # gradcheck-style, kernels only: the backward's directional derivative equals central
    # differences of the Triton forward along a random direction in every input and weight.
    # fp32 forward with eps = 1e-2: truncation error ~eps^2 (1e-4 relative) and rounding
    # ~1e-7 / eps (1e-5); the bound is 3e-3. Gradients stay away from the preprocessing's kinks
    # (|g| in [1e-3, 1e-1]: above the threshold and beyond the clamp, where the function is smooth).
    rule = make_rule(2, 8)
    n = 400
    g = torch.Generator().manual_seed(3)
    grad = (torch.rand(n, generator=g) * 0.099 + 0.001) * torch.randn(n, generator=g).sign()
    _, h, c, d_step, d_h, d_c = make_inputs(n, 2, 8)
    weights = {k: v.detach().clone() for k, v in rule.named_parameters()}
    primals = [grad.to(DEVICE), h, c, *weights.values()]
    directions = [torch.randn(t.shape, generator=g).to(DEVICE) for t in primals]
    directions[0] *= primals[0].abs() * 0.1  # stay on the same side of the kinks

    def loss(tensors) -> float:
        x, hh, cc, *ws = tensors
        step, h_new, c_new = coordinate_lstm_step(
            x, hh, cc, dict(zip(weights, ws, strict=True)), rule.config
        )
        return sum(
            (o.double() * w.double()).sum().item()
            for o, w in zip((step, h_new, c_new), (d_step, d_h, d_c), strict=True)
        )

    eps = 1e-2
    plus = loss([p + eps * d for p, d in zip(primals, directions, strict=True)])
    minus = loss([p - eps * d for p, d in zip(primals, directions, strict=True)])
    numeric = (plus - minus) / (2 * eps)

    leaves = [t.clone().requires_grad_(True) for t in primals]
    x, hh, cc, *ws = leaves
    outs = coordinate_lstm_step(x, hh, cc, dict(zip(weights, ws, strict=True)), rule.config)
    grads = torch.autograd.grad(outs, leaves, (d_step, d_h, d_c))
    analytic = sum(
        (gr.double() * d.double()).sum().item() for gr, d in zip(grads, directions, strict=True)
    )
    assert abs(numeric) > 1.0
    assert abs(analytic - numeric) <= 3e-3 * abs(numeric)


def test_double_backward_raises_and_partial_requires_grad() -> None:
    rule = make_rule(1, 8)
    grad, h, c, d_step, d_h, d_c = make_inputs(100, 1, 8)
    h = h.requires_grad_(True)
    weights = dict(rule.named_parameters())
    step, _, _ = coordinate_lstm_step(grad, h, c, weights, rule.config)
    # preparing a double backward fails loudly, also where the second-order terms would
    # otherwise be silently missing (a differentiable term beside the kernel's)
    with pytest.raises(RuntimeError, match="first order only"):
        torch.autograd.grad((step * d_step).sum() + h.pow(3).sum(), [h], create_graph=True)
    step, _, _ = coordinate_lstm_step(grad, h, c, weights, rule.config)
    with pytest.raises(RuntimeError, match="first order only"):
        torch.autograd.grad(step.pow(2).sum(), [h], create_graph=True)
    # only some outputs used, grad not requiring grad: the unused outputs count as zero
    want = reference(
        rule, grad, h.detach(), c, d_step, torch.zeros_like(d_h), torch.zeros_like(d_c)
    )
    step, _, _ = coordinate_lstm_step(grad, h, c, weights, rule.config)
    got = torch.autograd.grad((step * d_step).sum(), [h, *rule.parameters()])
    for a, b in zip(got, [want[1][1], *want[1][3:]], strict=True):
        assert_rel_close(a, b, "partial")
    # under no_grad it is a plain forward
    with torch.no_grad():
        out = coordinate_lstm_step(grad, h, c, weights, rule.config)
    assert not any(o.requires_grad for o in out)


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
    step, _, _ = CoordinateLSTMStepFunction.apply(
        inputs[0], inputs[1], inputs[2], *packed, P, rule.config.output_scale, options
    )
    got = torch.autograd.grad((step * inputs[3]).sum(), list(rule.parameters()))
    want = reference(rule, *inputs[:4], torch.zeros_like(inputs[4]), torch.zeros_like(inputs[5]))
    for a, b in zip(got, want[1][3:], strict=True):
        assert_rel_close(a, b, "prepacked")


def test_invalid_arguments() -> None:
    rule = make_rule(2, 20)
    grad, h, c, *_ = make_inputs(32, 2, 20)
    weights = dict(rule.named_parameters())
    with pytest.raises(ValueError, match="must be float32"):
        coordinate_lstm_step(grad, h.bfloat16(), c, weights, rule.config)
    with pytest.raises(ValueError, match=r"shape \(L, N, H\)"):
        coordinate_lstm_step(grad, h[:1], c, weights, rule.config)
    with pytest.raises(ValueError, match="default feature set"):
        extra = CoordinateLSTM(momentum_decays=(0.9,))
        coordinate_lstm_step(grad, h, c, dict(extra.named_parameters()), extra.config)
    # weights packed for the step kernel's extra inputs, with a default config
    extra_weights = {k: t.detach().to(DEVICE) for k, t in extra.named_parameters()}
    packed = pack_weights(extra_weights, num_layers=2, hidden_size=20, num_inputs=4)
    with pytest.raises(ValueError, match="default feature set"):
        coordinate_lstm_step(grad, h, c, packed, rule.config)
    with pytest.raises(ValueError, match="power of two"):
        KernelOptions(backward_block=48)
    with pytest.raises(ValueError, match="max_programs"):
        KernelOptions(max_programs=0)


# ----------------------------------------------------------------------------- the unroll
def unroll_setup(dtype: torch.dtype = torch.float32):
    """A rule, 2 quadratic tasks of dimension 3 and their start, in ``dtype`` (the same
    fp32-representable values in either dtype)."""
    rule = make_rule(2, 8, seed=4).to(dtype)
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
@pytest.mark.parametrize("stop_optimizee_grad", [True, False], ids=["first-order", "exact"])
def test_unroll_triton_matches_torch(stop_optimizee_grad: bool) -> None:
    # Both paths in fp32 on a 3-step unroll of 2 quadratic tasks. Without stop_optimizee_grad
    # the rule's gradient input carries the Hessian terms, through the kernels' d grad. The paths
    # differ by fp32 rounding (~1e-7 per step) amplified by the unroll: measured max-norm
    # relative differences 5e-8 (triton - torch, and either - float64); the bound is 1e-4.
    rule, tasks, params = unroll_setup()
    kw = {"stop_optimizee_grad": stop_optimizee_grad}
    want = unroll_meta_grad(rule, tasks, params, "torch", **kw)
    got = unroll_meta_grad(rule, tasks, params, "triton", **kw)
    assert want.abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    # and the float64 PyTorch meta-gradient is within the same bound of both
    rule64, tasks64, params64 = unroll_setup(F64)
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
    # "triton" refuses what the kernels cannot run; "auto" falls back to PyTorch on CPU
    rule64, tasks64, params64 = unroll_setup(F64)
    state64 = rule64.init_state(num_coordinates(params64), dtype=F64, device="cpu")
    with pytest.raises(ValueError, match="float32 only"):
        unroll(rule64, tasks64, params64, state64, 2, backend="triton")
    unroll(rule64, tasks64, params64, state64, 2, backend="auto")
    meta = MetaLSTMCell(hidden_size=2)
    meta_state = meta.init_state(num_coordinates(params), dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="only CoordinateLSTM"):
        unroll(meta, tasks, params, meta_state, 2, backend="triton")
    unroll(meta, tasks, params, meta_state, 2, backend="auto")
