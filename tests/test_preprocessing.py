import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learnedopt.nn import preprocess
from learnedopt.nn.functional import bounded_gradient, bounded_square, debiased_ema, rms_denominator


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


# ----------------------------------------------------------------------------- properties
FLOATS = st.floats(allow_nan=False, allow_infinity=False, width=64)


@settings(max_examples=20, deadline=None)
@given(values=st.lists(FLOATS.filter(lambda x: abs(x) < 1e150), min_size=1, max_size=8), p=st.floats(0.5, 30.0))
def test_preprocess_is_the_papers_rule_for_any_value_and_constant(values: list[float], p: float) -> None:
    g = torch.tensor(values, dtype=torch.float64)
    torch.testing.assert_close(preprocess(g, p), literal(g, p), rtol=1e-12, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(
    rows=st.lists(st.lists(st.floats(-1e3, 1e3), min_size=3, max_size=3), min_size=1, max_size=6),
    decay=st.floats(0.01, 0.999),
    starts=st.lists(st.integers(0, 3), min_size=3, max_size=3),
)
def test_debiased_ema_is_adams_bias_corrected_average_counted_per_coordinate(rows, decay: float, starts: list[int]) -> None:
    """``a_t / w_t`` is Adam's ``m_t / (1 - beta^t)``, ``t`` each coordinate's own count of values
    (a coordinate that starts later, its state still zero, is at its first value), and the
    average of a constant is that constant."""
    state = torch.zeros(2, 3, dtype=torch.float64)
    m, count = [0.0] * 3, [0] * 3
    for t, row in enumerate(rows):
        x = torch.tensor(row, dtype=torch.float64)
        live = torch.tensor([t >= s for s in starts])
        out, new_state = debiased_ema(x, state, decay)
        state = torch.where(live, new_state, state)  # a coordinate not started keeps its zero state
        for j in range(3):
            if not live[j]:
                continue
            m[j] = decay * m[j] + (1 - decay) * row[j]
            count[j] += 1
            expected = m[j] / (1 - decay ** count[j])
            assert out[j].item() == pytest.approx(expected, rel=1e-9, abs=1e-9 * max(1.0, abs(row[j])))
    constant = torch.full((3,), 2.5, dtype=torch.float64)
    state = torch.zeros(2, 3, dtype=torch.float64)
    for _ in range(5):
        out, state = debiased_ema(constant, state, decay)
        torch.testing.assert_close(out, constant, rtol=1e-13, atol=0)


@settings(max_examples=20, deadline=None)
@given(values=st.lists(st.floats(min_value=0.0, allow_infinity=True, width=64), min_size=1, max_size=8))
def test_rms_denominator_gives_the_same_bits_with_and_without_a_derivative(values: list[float]) -> None:
    v = torch.tensor(values, dtype=torch.float64)
    plain = rms_denominator(v)
    masked = rms_denominator(v.clone().requires_grad_(True))
    assert torch.equal(plain, masked.detach())
    assert torch.equal(plain, v.sqrt() + 1e-8)


@settings(max_examples=20, deadline=None)
@given(values=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=8))
def test_bounded_square_saturates_at_the_largest_float_and_keeps_nan(values: list[float]) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    got = bounded_square(x)
    largest = torch.finfo(torch.float32).max
    exact = x.double().square()
    assert torch.equal(got.isnan(), x.isnan())
    fine = ~x.isnan()
    assert torch.equal(got[fine], exact[fine].clamp_max(largest).float())


@settings(max_examples=30, deadline=None)
@given(values=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=8))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bounded_gradient_saturates_at_half_the_largest_float_and_keeps_the_rest(values: list[float], dtype: torch.dtype) -> None:
    """What the moving averages read: every value of at most half the largest finite value in
    magnitude bit for bit, larger ones (and infinities) that half with their sign, NaN as NaN."""
    x = torch.tensor(values, dtype=dtype)
    half = torch.finfo(dtype).max / 2
    got = bounded_gradient(x)
    assert got.dtype == dtype
    assert torch.equal(got.isnan(), x.isnan())
    fine = ~x.isnan()
    inside = fine & (x.abs() <= half)
    assert torch.equal(got[inside], x[inside])
    beyond = fine & (x.abs() > half)
    assert torch.equal(got[beyond], x[beyond].sign() * half)
    # the sum and the difference of any two of them are finite: lerp's m - g cannot overflow
    assert (got[fine].unsqueeze(0) - got[fine].unsqueeze(1)).isfinite().all()


@pytest.mark.parametrize("decay", [0.3, 0.7, 0.99, 0.999, 0.9999])
def test_debiased_ema_of_the_largest_float_stays_finite(decay: float) -> None:
    """The average of squared gradients saturated at float32's largest value (bounded_square):
    ``a_t / w_t`` rounded past it, to Inf (at decay 0.7 at the second value, 0.999 at the 16th),
    and the Adam direction ``m / (sqrt(Inf) + eps)`` was 0 however large the gradient. The
    quotient saturates at that largest value; NaN stays NaN."""
    largest = torch.finfo(torch.float32).max
    x = torch.tensor([largest, -largest, 1.0, float("nan")])
    state = torch.zeros(2, 4)
    for _ in range(40):
        out, state = debiased_ema(x, state, decay)
        assert out[:3].isfinite().all(), out
        assert out[3].isnan()
        assert out[:2].abs().max() <= largest and out[2] == pytest.approx(1.0, rel=1e-5)
