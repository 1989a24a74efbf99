"""The learned optimizers (``torch.optim.Optimizer`` subclasses) and their functional updates."""

from .learned_optimizer import LearnedOptimizer, NonFiniteGradientError
from .lstm_optimizer import LSTMOptimizer
from .meta_lstm_optimizer import MetaLSTMOptimizer
from .update import flat_update_, single_tensor_update_

__all__ = [
    "LSTMOptimizer",
    "LearnedOptimizer",
    "MetaLSTMOptimizer",
    "NonFiniteGradientError",
    "flat_update_",
    "single_tensor_update_",
]
