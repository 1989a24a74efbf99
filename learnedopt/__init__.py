"""learnedopt: learned optimizers for PyTorch."""

__version__ = "0.1.0"

from .nn import CoordinateLSTM, CoordinateLSTMConfig, MetaLSTMCell, MetaLSTMConfig, UpdateRule  # noqa: E402
from .optim import LSTMOptimizer, MetaLSTMOptimizer, NonFiniteGradientError  # noqa: E402
from .weights import PRESETS, UntrainedWeightsWarning, load_weights, save_weights  # noqa: E402

__all__ = [
    "PRESETS",
    "CoordinateLSTM",
    "CoordinateLSTMConfig",
    "LSTMOptimizer",
    "MetaLSTMCell",
    "MetaLSTMConfig",
    "MetaLSTMOptimizer",
    "NonFiniteGradientError",
    "UntrainedWeightsWarning",
    "UpdateRule",
    "__version__",
    "load_weights",
    "save_weights",
]
