"""``LSTMOptimizer``: a drop-in optimizer driven by a coordinatewise LSTM (Andrychowicz et al. 2016)."""

from __future__ import annotations

from ..nn import CoordinateLSTM
from .learned_optimizer import LearnedOptimizer


class LSTMOptimizer(LearnedOptimizer):
    """Train any model with a meta-learned coordinatewise LSTM, like ``torch.optim.Adam``::

        optimizer = LSTMOptimizer(model.parameters())
        for x, y in data:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()

    Args:
        params: parameters or param groups (as for any ``torch.optim`` optimizer).
        weights: a preset name (see ``learnedopt presets``), a weight file path, or a
            :class:`~learnedopt.nn.CoordinateLSTM`. Default: the library's default preset.
        lr, maximize, weight_decay, state_dtype, nan_policy, backend, foreach: see
            :class:`~learnedopt.optim.learned_optimizer.LearnedOptimizer`.

    Per-parameter state: ``step`` and the LSTM's ``h``, ``c`` of shape
    ``(num_layers, param.numel(), hidden_size)`` (plus feature moments when configured).
    """

    rule_kind = CoordinateLSTM.kind
    default_preset = "l2l-blend"
