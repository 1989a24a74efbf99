"""``MetaLSTMOptimizer``: the meta-learner LSTM of Ravi & Larochelle (2017) as an optimizer."""

from __future__ import annotations

from ..nn import MetaLSTMCell
from .learned_optimizer import LearnedOptimizer


class MetaLSTMOptimizer(LearnedOptimizer):
    """An optimizer whose update is ``theta <- f * theta - i * grad`` with learned, per-coordinate
    forget (decay) and input (step-size) gates.

    The rule reads the loss, so pass it: ``optimizer.step(closure)`` with a closure that returns
    the loss, or ``optimizer.step(loss=loss)``; a step without either raises ValueError where a
    parameter has a gradient (but for the zero-gradient one by which torch's checkpoint helpers
    initialise the state: see :meth:`~learnedopt.optim.learned_optimizer.LearnedOptimizer.step`),
    and does nothing where none has one, as ``torch.optim.Adam``'s step.

    Args:
        params: parameters or param groups.
        weights: a preset name, a weight file path or a :class:`~learnedopt.nn.MetaLSTMCell`.
        lr, maximize, weight_decay, state_dtype, nan_policy, backend, foreach: see
            :class:`~learnedopt.optim.learned_optimizer.LearnedOptimizer`; ``lr`` scales the
            learned change ``theta_t - theta_{t-1}``.

    Per-parameter state: ``step``, the input LSTM's ``h``, ``c`` of shape
    ``(1, param.numel(), hidden_size)`` and ``fi`` ``(2, param.numel())``, the previous forget
    and input gates; for rules that write Adam's direction (``momentum_decay`` / ``rms_decay``
    in :class:`~learnedopt.nn.MetaLSTMConfig`) also ``m`` / ``v`` ``(2, param.numel())``, each a
    moving average and its bias-correction weight.
    """

    rule_kind = MetaLSTMCell.kind
    default_preset = "meta-lstm-adam-mnist"
