"""Pure per-coordinate math shared by the update-rule networks.

Every function works on a batch of coordinates: row ``n`` of each input belongs to one parameter
element. Nothing here holds state or knows about optimizers.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import torch
from torch import Tensor

from ..values import is_number

#: The largest preprocessing constant ``p``: the gradient preprocessing (``nn.functional.preprocess``)
#: multiplies by ``e^p`` and clamps at ``e^-p``, which must be a normal float32 number (a ``p`` of
#: 100 made a zero gradient's feature ``0 * e^100 = 0 * Inf = NaN``).
MAX_PREPROCESS_P = -math.log(torch.finfo(torch.float32).tiny)
#: divides ``log|g|`` (at most log of float32's largest value, 88.7) by ``p``, which must keep it
#: finite in float32 (``p = 1e-300`` is 0 there, and every step turned the parameters NaN)
MIN_PREPROCESS_P = math.log(torch.finfo(torch.float32).max) / torch.finfo(torch.float32).max


def check_preprocess_p(value: Any) -> None:
    """Raise ValueError unless ``value`` is a preprocessing constant in ``[MIN_PREPROCESS_P,
    MAX_PREPROCESS_P]`` (about 2.6e-37 to 87.3; the papers use 10)."""
    if not (is_number(value) and 0 < value <= MAX_PREPROCESS_P):
        raise ValueError(f"preprocess_p must be in (0, {MAX_PREPROCESS_P:.4g}] (e^p finite in float32), got {value!r}")
    if value < MIN_PREPROCESS_P:
        raise ValueError(f"preprocess_p must be at least {MIN_PREPROCESS_P:.3g} (log|g| / p finite in float32), got {value!r}")


def preprocess(x: Tensor, p: float) -> Tensor:
    """Andrychowicz et al. (2016) input preprocessing of a gradient (or any signed value).

    ``x -> (log|x| / p, sign x)`` when ``|x| >= e^-p``, else ``(-1, e^p x)``.

    Written as ``(log(max(|x|, e^-p)) / p, clamp(e^p x, -1, 1))``, which is the same function on
    both sides of the threshold and has no ``log(0)``, so it stays finite under autograd.

    Args:
        x: ``(n,)`` values.
        p: the preprocessing constant (10 in the paper).

    Returns:
        ``(n, 2)`` features, in the dtype of ``x``.
    """
    return torch.stack(preprocess_parts(x, p), dim=-1)


def preprocess_parts(x: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """:func:`preprocess`'s two features apart: ``(magnitude (n,), direction (n,))``."""
    if p <= 0:
        raise ValueError(f"preprocessing constant p must be positive, got {p}")
    magnitude = torch.log(x.abs().clamp_min(math.exp(-p))) / p
    direction = (x * math.exp(p)).clamp(-1.0, 1.0)
    return magnitude, direction


#: added to the root of the second moment wherever a gradient is RMS-normalised
RMS_EPS = 1e-8


def rms_denominator(second_moment: Tensor) -> Tensor:
    """``sqrt(second_moment) + 1e-8``, the denominator of an RMS-normalised gradient ``(n,)``.

    The same values as ``second_moment.sqrt() + RMS_EPS``, but differentiable at a zero second
    moment (a coordinate whose gradients were all exactly 0, e.g. a weight on an always-zero
    input): there ``sqrt``'s derivative is infinite and, times the zero gradient, would make the
    meta-gradient NaN when it flows through the optimizee's gradient (``--second-order``). The
    normalised gradient ``g / denominator`` is 0 in a neighbourhood's limit there, so the masked
    derivative, 0, is the right one. A NaN or negative second moment (a corrupted state) gives
    NaN, as ``sqrt`` and the fused kernels do, rather than a silent ``1e-8``.
    """
    if not _may_differentiate(second_moment):
        # no derivative wanted (meta-training stops the optimizee's gradient by default): the
        # same bits in two passes where the masked form takes six
        return second_moment.sqrt() + RMS_EPS
    positive = second_moment != 0
    root = torch.where(positive, second_moment, torch.ones_like(second_moment)).sqrt()
    return torch.where(positive, root, torch.zeros_like(root)) + RMS_EPS


def _may_differentiate(x: Tensor) -> bool:
    """Whether a derivative through ``x`` may be taken: autograd records it, or ``x`` is inside a
    ``torch.func`` transform (``grad``, ``jvp``, ``vmap``), whose tensors it cannot see into."""
    return (x.requires_grad and torch.is_grad_enabled()) or torch._C._functorch.is_functorch_wrapped_tensor(x)


def bounded_gradient(x: Tensor) -> Tensor:
    """``x`` ``(n,)`` saturated at ``±`` half its dtype's largest finite value (about ``±1.7e38``
    in float32): the gradient a moving average (``lerp(g, m, beta)``) reads.

    ``lerp`` computes ``m - g``, which overflowed for a finite ``g`` and an average ``m`` near the
    largest value of opposite signs (``+3e38`` then ``-3e38`` made ``m`` Inf, and the parameter
    NaN at the next step). Saturated, ``|m - g| <= max`` wherever ``|m| <= max / 2``, and every
    average is a convex combination of such gradients, so that holds at every step. Values of
    ordinary size pass unchanged, bit for bit; NaN stays NaN.
    """
    bound = torch.finfo(x.dtype).max / 2
    return x.clamp(-bound, bound)


def bounded_square(x: Tensor) -> Tensor:
    """``x ** 2`` ``(n,)``, saturated at the dtype's largest finite value.

    A finite gradient over ``sqrt(max)`` (about 1.8e19 in float32) squares to Inf, and a second
    moment that once held Inf turns NaN at the next ``lerp`` (``Inf - Inf``) and stays NaN: a
    finite gradient must not corrupt the state for the rest of the run. Saturated, the second
    moment stays finite and the normalised gradient of that step is ``g / sqrt(max)``. NaN stays NaN.
    """
    return x.square().clamp_max(torch.finfo(x.dtype).max)


def below_one_in_float32(decay: float) -> bool:
    """Whether ``decay`` (a number in (0, 1)) is still below 1 rounded to float32, the dtype of
    the rules' math (rounded without torch, so that a rule built on the meta device can check
    it): a :func:`debiased_ema` decay of ``1 - 1e-9`` is 1.0 there, which keeps the bias
    correction's weight at 0, and every step divides 0 by 0."""
    return struct.unpack("f", struct.pack("f", decay))[0] < 1.0


def debiased_ema(x: Tensor, state: Tensor, decay: float) -> tuple[Tensor, Tensor]:
    """An exponential moving average with Adam's bias correction, counted per coordinate.

    Args:
        x: ``(n,)`` new values.
        state: ``(2, n)``: the running average ``a_{t-1}`` and its weight ``w_{t-1} = 1 - decay^(t-1)``
            (both 0 before the first value).
        decay: ``beta`` in (0, 1).

    Returns:
        ``a_t / w_t`` ``(n,)`` (``x`` itself at the first step), saturated at the dtype's largest
        finite value, and the new state ``(2, n)``: ``a_t = beta a_{t-1} + (1 - beta) x``,
        ``w_t = beta w_{t-1} + (1 - beta)``. An average of values at that largest value (squared
        gradients, ``bounded_square``) is that value only up to rounding, and ``a_t / w_t``
        rounded past it to Inf (at ``decay`` 0.999 within 16 steps), making the Adam direction
        ``m / (sqrt(v) + eps)`` 0 however large the gradient; saturated, it is finite. NaN stays NaN.
    """
    state = torch.lerp(torch.stack((x, torch.ones_like(x))), state, decay)
    largest = torch.finfo(state.dtype).max
    return (state[0] / state[1]).clamp(-largest, largest), state
