"""The coordinatewise LSTM optimizer of Andrychowicz et al. (2016),
"Learning to learn by gradient descent by gradient descent"."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .base import State, StateSpec, UpdateRule

from ..values import check_positive_integer, finite_in_float32, is_number
from .functional import below_one_in_float32, bounded_gradient, bounded_square, check_preprocess_p, preprocess_parts, rms_denominator
from .lstm_step import lstm_step


@dataclass(frozen=True)
class CoordinateLSTMConfig:
    """Architecture of :class:`CoordinateLSTM`. The defaults are the paper's.

    Attributes:
        hidden_size: LSTM hidden units per layer (20).
        num_layers: stacked LSTM layers (2).
        preprocess_p: gradient preprocessing constant ``p`` (10).
        output_scale: the linear head's output is multiplied by this (0.1; nonzero, as the
            initialisation divides by it).
        momentum_decays: extra inputs: the preprocessed exponential moving average of the
            gradient at each of these decays (none in the paper).
        rms_decays: extra inputs: the gradient divided by the root of its exponential moving
            second moment at each of these decays (none in the paper).
        param_input: extra input: the parameter value itself.
    """

    hidden_size: int = 20
    num_layers: int = 2
    preprocess_p: float = 10.0
    output_scale: float = 0.1
    momentum_decays: tuple[float, ...] = ()
    rms_decays: tuple[float, ...] = ()
    param_input: bool = False

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers"):
            check_positive_integer(name, getattr(self, name))
        if type(self.param_input) is not bool:
            raise ValueError(f"param_input must be true or false, got {self.param_input!r}")
        check_preprocess_p(self.preprocess_p)
        if not finite_in_float32(self.output_scale):
            raise ValueError(f"output_scale must be finite in float32, got {self.output_scale!r}")
        # reset_parameters divides by it (0 was a ZeroDivisionError, a subnormal one a float32 overflow)
        if abs(self.output_scale) < torch.finfo(torch.float32).tiny:
            raise ValueError(
                f"output_scale must be nonzero, at least {torch.finfo(torch.float32).tiny:.3g} in magnitude, got {self.output_scale!r}"
            )
        for name in ("momentum_decays", "rms_decays"):
            decays = getattr(self, name)
            if not isinstance(decays, (tuple, list)):
                raise ValueError(f"{name} must be a list of decays, got {decays!r}")
            for beta in decays:
                if not (is_number(beta) and 0.0 <= beta < 1.0):
                    raise ValueError(f"{name}: decays must be in [0, 1), got {beta!r}")
                # the math rounds it to float32 (also the kernels): at 1 there, v stayed 0 and the
                # RMS feature g / 1e-8 overflowed for a finite gradient of 1e31; m stayed 0
                if not below_one_in_float32(beta):
                    raise ValueError(f"{name}: decays must be below 1 in float32, got {beta!r}")

    @property
    def num_inputs(self) -> int:
        """Features per coordinate of layer 0's input (2 in the paper)."""
        return 2 + 2 * len(self.momentum_decays) + len(self.rms_decays) + int(self.param_input)


class CoordinateLSTM(UpdateRule):
    """A stack of LSTM cells shared by every coordinate, then a linear head.

    ``step = output_scale * head(h_top)`` with a linear ``head``; the optimizer adds ``lr * step`` to the
    parameter. Per-coordinate state: ``h`` and ``c`` of shape ``(num_layers, n, hidden_size)``,
    plus ``m`` ``(len(momentum_decays), n)`` and ``v`` ``(len(rms_decays), n)`` when those
    features are on.

    A fresh module is initialised by :meth:`reset_parameters` (see there) so that, untrained, it
    already behaves as sign descent with momentum rather than as a random rule.
    """

    kind = "CoordinateLSTM"
    config_class = CoordinateLSTMConfig

    def __init__(self, config: CoordinateLSTMConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        config = self.config
        # torch's LSTM holds the weights (gate rows ordered input, forget, cell, output;
        # weight_ih_l{k}, weight_hh_l{k}, bias_ih_l{k}, bias_hh_l{k}), so that they load and save
        # as usual; the step runs as lstm_step, which was faster than the module's own forward
        # (oneDNN's fused cell) on the CPU host where both were timed (benchmarks/lstm_chunk.py)
        self.lstm = nn.LSTM(config.num_inputs, config.hidden_size, config.num_layers)
        self.head = nn.Linear(config.hidden_size, 1)
        self.reset_parameters()

    @classmethod
    def weight_shapes(cls, values: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        """As :meth:`UpdateRule.weight_shapes`, by arithmetic: building ``num_layers`` layers,
        even on the meta device, took seconds per thousand."""
        config = cls.config_from_dict(values)
        gates = 4 * config.hidden_size
        shapes: dict[str, tuple[int, ...]] = {}
        for layer in range(config.num_layers):
            below = config.num_inputs if layer == 0 else config.hidden_size
            shapes |= {f"lstm.weight_ih_l{layer}": (gates, below), f"lstm.weight_hh_l{layer}": (gates, config.hidden_size),
                       f"lstm.bias_ih_l{layer}": (gates,), f"lstm.bias_hh_l{layer}": (gates,)}  # fmt: skip
        return shapes | {"head.weight": (1, config.hidden_size), "head.bias": (1,)}

    @classmethod
    def weight_count(cls, values: dict[str, Any]) -> int:
        """As :meth:`UpdateRule.weight_count`: four LSTM tensors per layer, and the head's two."""
        return 4 * cls.config_from_dict(values).num_layers + 2

    def reset_parameters(self, generator: torch.Generator | None = None, lr: float = 0.01) -> None:
        """Initialise as sign descent with momentum, plus small random weights elsewhere.

        Hidden unit 0 of layer 0 keeps an exponential average (forget gate sigmoid(2.2) = 0.9) of
        ``tanh(2 sign g)``; unit 0 of each later layer squashes the unit below; the head reads unit
        0 only, scaled so the step is about ``-lr * sign(momentum)``. The other units start with
        PyTorch's usual LSTM init, U(-1/sqrt(H), 1/sqrt(H)), and do not reach the output until
        meta-training moves the head. Deterministic for a given ``generator``.
        """
        hidden = self.config.hidden_size
        bound = 1.0 / math.sqrt(hidden)
        with torch.no_grad():
            for param in self.parameters():
                param.uniform_(-bound, bound, generator=generator)
            i, f, g, o = 0, hidden, 2 * hidden, 3 * hidden  # row of unit 0 in each gate block
            for layer in range(self.config.num_layers):
                w_ih, w_hh = getattr(self.lstm, f"weight_ih_l{layer}"), getattr(self.lstm, f"weight_hh_l{layer}")
                b, b_hh = getattr(self.lstm, f"bias_ih_l{layer}"), getattr(self.lstm, f"bias_hh_l{layer}")
                for row in (i, f, g, o):
                    w_ih[row].zero_()
                    w_hh[row].zero_()
                    b_hh[row] = 0.0
                b[i], b[o], b[g] = 5.0, 5.0, 0.0
                b[f] = math.log(0.9 / 0.1) if layer == 0 else -5.0
                # layer 0 reads sign(g) (feature 1); later layers read unit 0 below
                w_ih[g, 1 if layer == 0 else 0] = 2.0
            # steady-state |h_top| under a gradient of constant sign, to calibrate the head
            sig = lambda z: 1.0 / (1.0 + math.exp(-z))
            top = sig(5.0) * math.tanh(sig(5.0) * math.tanh(2.0) / (1.0 - 0.9))
            for _ in range(1, self.config.num_layers):
                top = sig(5.0) * math.tanh(sig(5.0) * math.tanh(2.0 * top) / (1.0 - sig(-5.0)))
            self.head.weight.zero_()
            self.head.weight[0, 0] = -lr / (self.config.output_scale * top)
            self.head.bias.zero_()

    @property
    def reads_param(self) -> bool:
        return self.config.param_input

    def state_spec(self) -> dict[str, StateSpec]:
        cfg = self.config
        spec = {
            "h": StateSpec((cfg.num_layers,), (cfg.hidden_size,)),
            "c": StateSpec((cfg.num_layers,), (cfg.hidden_size,)),
        }
        if cfg.momentum_decays:
            spec["m"] = StateSpec((len(cfg.momentum_decays),), moving_average=True)
        if cfg.rms_decays:
            spec["v"] = StateSpec((len(cfg.rms_decays),), moving_average=True)
        return spec

    def features(self, grad: Tensor, param: Tensor, state: State) -> tuple[Tensor, State]:
        """Layer 0's input features and the advanced moment states.

        Args:
            grad, param: ``(n,)``.
            state: the rule's state (only ``m`` and ``v`` are read).

        Returns:
            ``x`` ``(n, num_inputs)``: the preprocessed gradient (2 columns), each preprocessed
            momentum (2 each), each rms-normalised gradient, the parameter (``param_input``), in
            that order, feature-major (the transpose of a contiguous ``(num_inputs, n)``); and
            ``{"m": (M, n), "v": (R, n)}`` for the feature sets that have them.
        """
        cfg = self.config
        # each feature a contiguous row, stacked (a copy of whole rows), x their transpose: the
        # fused CPU kernel reads x at its strides. Gathered column by column into a contiguous
        # (n, F) (a strided write per feature), the default's meta-training truncation took
        # 1.02x-1.05x longer (benchmarks/results/meta_train_throughput_*featmajor*.md)
        new_state: State = {}
        signed = grad.unsqueeze(0)  # (1 + M, n): the gradient, then each momentum
        # what the moving averages read: the gradient saturated at half the largest value, so
        # that lerp's m - g cannot overflow (bounded_gradient); the same values in ordinary use
        averaged = bounded_gradient(grad) if cfg.momentum_decays or cfg.rms_decays else grad
        if cfg.momentum_decays:
            betas = grad.new_tensor(cfg.momentum_decays).unsqueeze(1)
            m = torch.lerp(averaged.unsqueeze(0), state["m"], betas)
            new_state["m"] = m
            signed = torch.cat((signed, m))
        # preprocessed in one pass per operation, not one per row, then interleaved: the
        # magnitude and direction of each row (with the other trims of that commit, the default's
        # truncation 1.01x-1.02x faster: benchmarks/results/revision_ab_trims_keep_l2l-blend.md)
        magnitude, direction = preprocess_parts(signed, cfg.preprocess_p)
        features = [part for pair in zip(magnitude, direction, strict=True) for part in pair]
        if cfg.rms_decays:
            betas = grad.new_tensor(cfg.rms_decays).unsqueeze(1)
            v = torch.lerp(bounded_square(averaged).unsqueeze(0), state["v"], betas)
            new_state["v"] = v
            features += (grad / rms_denominator(v)).unbind()
        if cfg.param_input:
            features.append(param)
        return torch.stack(features).t(), new_state

    def step_from_features(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The LSTM stack and the head on :meth:`features`' ``x`` ``(n, num_inputs)`` and the
        states ``h, c`` ``(num_layers, n, hidden_size)``: ``(step (n,), new_h, new_c)``."""
        # the head (a per-row sum, whatever the batching) in the LSTM's own pass where it can
        head, h, c = lstm_step(self.lstm, x, h, c, head=self.head)
        return head * self.config.output_scale, h, c

    def forward(
        self, grad: Tensor, param: Tensor, state: State, loss: Tensor | None = None
    ) -> tuple[Tensor, State]:
        x, new_state = self.features(grad, param, state)
        step, new_state["h"], new_state["c"] = self.step_from_features(x, state["h"], state["c"])
        return step, new_state
