"""The meta-learner LSTM of Ravi & Larochelle (2017), "Optimization as a Model for Few-Shot
Learning": an LSTM whose cell state is the parameter itself."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .base import State, StateSpec, UpdateRule

from ..values import check_positive_integer, finite_in_float32, is_number
from .functional import below_one_in_float32, bounded_gradient, bounded_square, check_preprocess_p, debiased_ema, preprocess_parts, rms_denominator
from .lstm_step import lstm_step


@dataclass(frozen=True)
class MetaLSTMConfig:
    """Architecture of :class:`MetaLSTMCell`. The defaults are the paper's.

    Attributes:
        hidden_size: hidden units of the first, input LSTM (20).
        preprocess_p: preprocessing constant for the gradient and loss inputs (10).
        step_scale: the largest step size: the cell writes ``step_scale * i_t * d_t`` with the
            input gate ``i_t`` in (0, 1) (1, the paper).
        momentum_decay, rms_decay: what the cell writes, ``d_t``. Both None (the paper): the
            gradient ``g_t``. Otherwise Adam's direction: ``d_t = m_t / (sqrt(v_t) + 1e-8)``, where
            ``m_t`` is the bias-corrected moving average of ``g`` at ``momentum_decay`` (``g_t``
            itself when None) and ``v_t`` that of ``g^2`` at ``rms_decay`` (no division when None);
            see :func:`~learnedopt.nn.functional.debiased_ema`. With both, the input gate is a
            learned per-coordinate Adam step size, and the forget gate a learned weight decay.
        forget_bias_init, input_bias_init: the ranges ``(low, high)`` of the uniform
            initialisation of the forget and input gate biases ((4, 6) and (-5, -4)). The paper
            describes them qualitatively (a large forget bias, so ``f`` starts near 1; a small
            input bias, so the step starts small); these ranges are those of the common PyTorch
            port (markdtw/meta-learning-lstm-pytorch), while the authors' Lua code
            (twitter-research/meta-learning-lstm) draws the forget bias from U(4, 5).
    """

    hidden_size: int = 20
    preprocess_p: float = 10.0
    step_scale: float = 1.0
    momentum_decay: float | None = None
    rms_decay: float | None = None
    forget_bias_init: tuple[float, float] = (4.0, 6.0)
    input_bias_init: tuple[float, float] = (-5.0, -4.0)

    def __post_init__(self) -> None:
        check_positive_integer("hidden_size", self.hidden_size)
        check_preprocess_p(self.preprocess_p)
        if not (finite_in_float32(self.step_scale) and self.step_scale > 0):
            raise ValueError(f"step_scale must be positive and finite in float32, got {self.step_scale!r}")
        for name in ("momentum_decay", "rms_decay"):
            decay = getattr(self, name)
            if decay is not None and not (is_number(decay) and 0.0 < decay < 1.0):
                raise ValueError(f"{name} must be None or in (0, 1), got {decay!r}")
            # a decay that rounds to 1 in float32 keeps the bias correction's weight at 0: 0/0
            if decay is not None and not below_one_in_float32(decay):
                raise ValueError(f"{name} must be None or in (0, 1) in float32, got {decay!r}")
        for name in ("forget_bias_init", "input_bias_init"):
            low_high = getattr(self, name)
            if not (
                isinstance(low_high, (tuple, list))
                and len(low_high) == 2
                and all(finite_in_float32(v) for v in low_high)
                and low_high[0] <= low_high[1]
            ):
                raise ValueError(f"{name} must be a range (low, high) of finite numbers in float32 with low <= high, got {low_high!r}")


class MetaLSTMCell(UpdateRule):
    """Ravi & Larochelle's meta-learner, shared by every coordinate.

    A first LSTM (hidden ``H``) reads the preprocessed gradient and loss, ``(n, 4)``; its hidden
    state ``x_t`` drives the meta-learner cell::

        f_t = sigmoid(W_f . [x_t, theta_{t-1}, f_{t-1}] + b_f)     # learned decay
        i_t = sigmoid(W_i . [x_t, theta_{t-1}, i_{t-1}] + b_i)     # learned step size
        theta_t = f_t * theta_{t-1} - i_t * d_t

    where ``d_t`` is :meth:`direction`: the gradient in the paper, optionally scaled
    (``step_scale``) and replaced by Adam's direction (``momentum_decay``, ``rms_decay``), see
    :class:`MetaLSTMConfig`.

    :meth:`forward` returns ``step = theta_t - theta_{t-1}``. Per-coordinate state: ``h``, ``c``
    of shape ``(1, n, H)`` for the first LSTM, ``fi`` ``(2, n)`` holding ``f_{t-1}, i_{t-1}``,
    and with ``momentum_decay`` / ``rms_decay`` ``m`` / ``v`` ``(2, n)``, each a moving average
    and its weight. ``f_{t-1}`` and ``i_{t-1}`` are the previous gate *values* (in (0, 1); 0
    before the first step), as in the paper's equations; the authors' Lua code (and the common
    PyTorch port) feed back the gates' pre-sigmoid values instead. The shipped weights were
    meta-trained with the gate values, so that stays.

    Initialised by the paper's rule so that it starts as plain gradient descent with a small
    step: forget bias U(4, 6) (f ~ 0.99), input bias U(-5, -4) (step size ~ 0.01), gate weights
    ``weight_fi`` U(-0.01, 0.01) (the bias ranges are configurable; on where they come from, see
    :class:`MetaLSTMConfig`); the input LSTM has PyTorch's usual LSTM initialisation,
    U(-1/sqrt(H), 1/sqrt(H)), where the authors' code draws it from U(-0.01, 0.01) too.
    """

    kind = "MetaLSTMCell"
    needs_loss = True
    config_class = MetaLSTMConfig

    def __init__(self, config: MetaLSTMConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        config = self.config
        hidden = config.hidden_size
        # the input LSTM reads (log|g|/p, sign g, log|L|/p, sign L); see CoordinateLSTM on nn.LSTM
        self.lstm = nn.LSTM(4, hidden, 1)
        # rows: forget gate, input gate; columns: x_t (H), theta_{t-1}, previous gate value
        self.weight_fi = nn.Parameter(torch.empty(2, hidden + 2))
        self.bias_fi = nn.Parameter(torch.empty(2))
        self.reset_parameters()

    @classmethod
    def weight_shapes(cls, values: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        """As :meth:`UpdateRule.weight_shapes`, by arithmetic: a hidden size of 10**9 overflowed
        torch's size calculation even on the meta device."""
        hidden = cls.config_from_dict(values).hidden_size
        gates = 4 * hidden
        return {"weight_fi": (2, hidden + 2), "bias_fi": (2,), "lstm.weight_ih_l0": (gates, 4),
                "lstm.weight_hh_l0": (gates, hidden), "lstm.bias_ih_l0": (gates,), "lstm.bias_hh_l0": (gates,)}  # fmt: skip

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """The initialisation of the class docstring (the paper's rule: forget gate near 1, small
        input gate). Deterministic for a generator."""
        bound = 1.0 / math.sqrt(self.config.hidden_size)
        with torch.no_grad():
            for param in self.lstm.parameters():
                param.uniform_(-bound, bound, generator=generator)
            self.weight_fi.uniform_(-0.01, 0.01, generator=generator)
            self.bias_fi[0].uniform_(*self.config.forget_bias_init, generator=generator)
            self.bias_fi[1].uniform_(*self.config.input_bias_init, generator=generator)

    @property
    def reads_param(self) -> bool:
        return True  # theta_{t-1} is the cell state

    def state_spec(self) -> dict[str, StateSpec]:
        hidden = self.config.hidden_size
        spec = {
            "h": StateSpec((1,), (hidden,)),
            "c": StateSpec((1,), (hidden,)),
            "fi": StateSpec((2,)),
        }
        if self.config.momentum_decay is not None:
            spec["m"] = StateSpec((2,), moving_average=True)
        if self.config.rms_decay is not None:
            spec["v"] = StateSpec((2,), moving_average=True)
        return spec

    def features(self, grad: Tensor, loss: Tensor) -> Tensor:
        """The input LSTM's features ``(n, 4)``: the preprocessed gradient ``(n,)`` and loss,
        feature-major (the transpose of a contiguous ``(4, n)``, as
        :meth:`CoordinateLSTM.features <learnedopt.nn.CoordinateLSTM.features>` gives its own).

        ``loss`` is one value for every coordinate (shape ``()`` or ``(1,)``) or one per
        coordinate ``(n,)`` (several tasks batched, each coordinate with its task's loss).
        """
        p = self.config.preprocess_p
        n = grad.shape[0]
        loss_magnitude, loss_direction = preprocess_parts(loss.to(grad.dtype).reshape(-1), p)
        return torch.stack((*preprocess_parts(grad, p), loss_magnitude.expand(n), loss_direction.expand(n))).t()

    def direction(self, grad: Tensor, state: State) -> tuple[Tensor, State]:
        """What the input gate scales, ``d_t`` ``(n,)``, from the gradient ``(n,)``, and the
        advanced ``m`` and ``v`` states (an empty dict in the paper's configuration); see
        :class:`MetaLSTMConfig`."""
        cfg = self.config
        new_state: State = {}
        direction = grad
        # the moving averages read the gradient saturated at half the largest value, so that
        # lerp's a - g cannot overflow (bounded_gradient); the same values in ordinary use
        averaged = bounded_gradient(grad) if cfg.momentum_decay is not None or cfg.rms_decay is not None else grad
        if cfg.momentum_decay is not None:
            direction, new_state["m"] = debiased_ema(averaged, state["m"], cfg.momentum_decay)
        if cfg.rms_decay is not None:
            second, new_state["v"] = debiased_ema(bounded_square(averaged), state["v"], cfg.rms_decay)
            direction = direction / rms_denominator(second)
        if cfg.step_scale != 1.0:
            direction = direction * cfg.step_scale
        return direction, new_state

    def step_from_features(
        self, x: Tensor, grad: Tensor, param: Tensor, h: Tensor, c: Tensor, fi: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The input LSTM and the meta-learner cell on :meth:`features`' ``x`` ``(n, 4)``.

        Args:
            x: ``(n, 4)`` features; grad: ``(n,)`` what the input gate scales (the gradient, or
                :meth:`direction`); param: ``(n,)``; h, c: ``(1, n, H)``; fi: ``(2, n)`` the
                previous forget and input gate values.

        Returns:
            ``(step (n,), new_h, new_c, new_fi)``.
        """
        h, h_all, c_all = lstm_step(self.lstm, x, h, c)
        hidden = self.config.hidden_size
        # gate pre-activations: the h_t part as a per-row sum (not a BLAS product, whose rounding
        # of a row can depend on the number of rows: a coordinate's update must not depend on
        # how coordinates were batched), then the two per-row scalar terms
        pre = self.bias_fi + (h.unsqueeze(1) * self.weight_fi[:, :hidden]).sum(dim=2)
        pre = pre + param.unsqueeze(1) * self.weight_fi[:, hidden] + fi.t() * self.weight_fi[:, hidden + 1]
        fi = torch.sigmoid(pre)
        forget, input_gate = fi[:, 0], fi[:, 1]
        step = (forget - 1.0) * param - input_gate * grad
        return step, h_all, c_all, fi.t()

    def forward(
        self, grad: Tensor, param: Tensor, state: State, loss: Tensor | None = None
    ) -> tuple[Tensor, State]:
        if loss is None:
            raise ValueError("MetaLSTMCell needs the optimizee's loss")
        x = self.features(grad, loss.reshape(1))
        direction, new_state = self.direction(grad, state)
        step, h, c, fi = self.step_from_features(x, direction, param, state["h"], state["c"], state["fi"])
        return step, {"h": h, "c": c, "fi": fi, **new_state}
