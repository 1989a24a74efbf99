"""backend="triton": the optimizer's fused path (Triton interpreter on CPU) against the torch path."""

import copy
import os

import pytest
import torch

from helpers import make_params, set_grads
from learnedopt import LSTMOptimizer, kernels

pytestmark = pytest.mark.skipif(
    not kernels.FUSED_UPDATES_AVAILABLE or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs Triton, run in interpreter mode (tests/conftest.py sets TRITON_INTERPRET=1)",
)

# Same fp32 math as the torch path; only the order of fp32 reductions differs (see
# tests/test_kernel_coordinate_lstm.py), so parameters agree to ~1e-6 relative.
TOL = dict(rtol=2e-5, atol=2e-6)
# the kernel implements the paper's architecture (2 inputs); the default preset has richer inputs
PAPER = "l2l-2016"


def run(backend, shapes, dtype=torch.float32, state_dtype=torch.float32, steps=3, **options):
    params = make_params(shapes, dtype=dtype, noncontiguous=options.pop("noncontiguous", ()))
    opt = LSTMOptimizer(params, PAPER, backend=backend, state_dtype=state_dtype, **options)
    for t in range(steps):
        set_grads(params, seed=t, skip=options.get("skip", ()))
        opt.step()
    return params, opt


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_fused_matches_torch_across_tensors(state_dtype) -> None:
    shapes = [(30, 20), (1,), (0,), (257,), (8, 9)]
    fused, fopt = run("triton", shapes, state_dtype=state_dtype, noncontiguous=(4,))
    ref, ropt = run("torch", shapes, state_dtype=state_dtype, noncontiguous=(4,))
    tol = TOL if state_dtype == torch.float32 else dict(rtol=2e-2, atol=2e-4)  # bf16 states round each step
    for p, q in zip(fused, ref):
        torch.testing.assert_close(p, q, **tol)
    for p, q in zip(fused, ref):
        assert fopt.state[p]["h"].dtype == state_dtype
        torch.testing.assert_close(fopt.state[p]["h"].float(), ropt.state[q]["h"].float(), **tol)


def test_fused_with_low_precision_parameters_and_maximize() -> None:
    fused, _ = run("triton", [(40,), (3, 5)], dtype=torch.bfloat16, maximize=True)
    ref, _ = run("torch", [(40,), (3, 5)], dtype=torch.bfloat16, maximize=True)
    for p, q in zip(fused, ref):
        torch.testing.assert_close(p.float(), q.float(), rtol=1e-2, atol=1e-3)  # one bf16 ulp


def test_fused_resume_is_bit_identical() -> None:
    params = make_params([(50,), (7, 3)], dtype=torch.float32)
    opt = LSTMOptimizer(params, PAPER, backend="triton")
    for t in range(2):
        set_grads(params, seed=t)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    snapshot = [p.detach().clone() for p in params]
    for t in range(2, 4):
        set_grads(params, seed=t)
        opt.step()
    resumed = [s.clone().requires_grad_(True) for s in snapshot]
    fresh = LSTMOptimizer(resumed, PAPER, backend="triton")
    fresh.load_state_dict(saved)
    for t in range(2, 4):
        set_grads(resumed, seed=t)
        fresh.step()
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)


def test_explicit_triton_refuses_what_the_kernel_cannot_do() -> None:
    params = make_params([(4,)], dtype=torch.float64)
    opt = LSTMOptimizer(params, PAPER, backend="triton")
    set_grads(params, 0)
    with pytest.raises(RuntimeError, match="float64 parameters"):
        opt.step()
    with pytest.raises(ValueError, match="fused kernel only for CoordinateLSTM rules with the default inputs"):
        LSTMOptimizer(make_params([(4,)]), backend="triton")  # the default preset's richer inputs


def test_auto_never_uses_the_interpreter() -> None:
    auto, _ = run("auto", [(6,)])
    torch_, _ = run("torch", [(6,)])
    assert torch.equal(auto[0], torch_[0])
