import math

import pytest
import torch

from learnedopt.nn import preprocess


def literal(g: torch.Tensor, p: float) -> torch.Tensor:
    """The paper's rule, written case by case."""
    rows = []
    for x in g.tolist():
        if abs(x) >= math.exp(-p):
            rows.append((math.log(abs(x)) / p, math.copysign(1.0, x)))
        else:
            rows.append((-1.0, math.exp(p) * x))
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("p", [10.0, 3.0])
def test_both_sides_of_threshold(p: float) -> None:
    t = math.exp(-p)
    g = torch.tensor(
        [0.0, t * 0.5, -t * 0.5, t * 0.999, -t * 0.999, t * 1.001, -t * 1.001, 1e-2, -3.0, 1e3, -1e-30],
        dtype=torch.float64,
    )
    torch.testing.assert_close(preprocess(g, p), literal(g, p), rtol=1e-12, atol=1e-12)


def test_exactly_at_threshold_and_continuity() -> None:
    p = 10.0
    t = torch.tensor([math.exp(-p)], dtype=torch.float64)
    torch.testing.assert_close(preprocess(t, p), torch.tensor([[-1.0, 1.0]], dtype=torch.float64))
    below = preprocess(t * (1 - 1e-9), p)
    above = preprocess(t * (1 + 1e-9), p)
    assert torch.allclose(below, above, atol=1e-8)


def test_random_magnitudes_and_dtype() -> None:
    g = torch.randn(1000, dtype=torch.float64) * torch.logspace(-8, 2, 1000, dtype=torch.float64)
    out = preprocess(g, 10.0)
    assert out.shape == (1000, 2) and out.dtype == torch.float64
    torch.testing.assert_close(out, literal(g, 10.0), rtol=1e-12, atol=1e-12)


def test_gradient_is_finite_at_zero() -> None:
    g = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    preprocess(g, 10.0).sum().backward()
    assert torch.isfinite(g.grad).all()


def test_rejects_nonpositive_p() -> None:
    with pytest.raises(ValueError, match="positive"):
        preprocess(torch.ones(2), 0.0)


def test_rms_denominator_equals_sqrt_plus_eps_and_is_differentiable_at_zero() -> None:
    from learnedopt.nn.functional import RMS_EPS, rms_denominator

    v = torch.tensor([0.0, 1e-30, 2.5, 4.0, float("inf")], requires_grad=True)
    got = rms_denominator(v)
    assert torch.equal(got, v.detach().sqrt() + RMS_EPS)
    got.sum().backward()
    # sqrt's derivative where v > 0; 0 (not inf) at v == 0
    assert v.grad[0] == 0.0
    torch.testing.assert_close(v.grad[2:4], 0.5 / v.detach()[2:4].sqrt())


def test_rms_denominator_differentiable_at_zero_under_torch_func_transforms() -> None:
    """Inside ``torch.func.jvp`` and ``grad`` a tensor does not say ``requires_grad`` to autograd
    as it does outside: the masked form must still run there, not the plain ``sqrt`` the
    no-derivative fast path takes (whose derivative at 0 is infinite, the tangent then NaN)."""
    from learnedopt.nn.functional import RMS_EPS, rms_denominator

    v = torch.tensor([0.0, 2.5, 4.0])
    expected = torch.tensor([0.0, 0.5 / 2.5**0.5, 0.25])
    value, tangent = torch.func.jvp(rms_denominator, (v,), (torch.ones(3),))
    assert torch.equal(value, v.sqrt() + RMS_EPS)
    torch.testing.assert_close(tangent, expected)
    torch.testing.assert_close(torch.func.grad(lambda s: rms_denominator(s).sum())(v), expected)
    # and the fast path (no derivative wanted) gives the masked form's bits
    with torch.no_grad():
        fast = rms_denominator(v.clone().requires_grad_(True))
    assert torch.equal(fast, rms_denominator(v.clone().requires_grad_(True)).detach())


def test_rms_denominator_of_a_nan_or_negative_second_moment_is_nan() -> None:
    """A corrupted state shows as NaN, as in the fused kernels, not as a denominator of 1e-8
    (which turned the normalised gradient into a huge finite number)."""
    from learnedopt.nn.functional import rms_denominator

    got = rms_denominator(torch.tensor([float("nan"), -1.0, 0.0, 4.0]))
    assert got[:2].isnan().all() and got[2:].isfinite().all()
