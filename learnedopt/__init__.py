"""learnedopt: learned optimizers for PyTorch."""

from .meta import MAML, Reptile
from .nn import CoordinateLSTM, CoordinateLSTMConfig, MetaLSTMCell, MetaLSTMConfig, UpdateRule
from .optim import LSTMOptimizer, MetaLSTMOptimizer, NonFiniteGradientError
from .version import __version__
from .weights import PRESETS, UntrainedWeightsWarning, average_weights, load_weights, save_weights

__all__ = [
    "MAML",
    "PRESETS",
    "CoordinateLSTM",
    "CoordinateLSTMConfig",
    "LSTMOptimizer",
    "MetaLSTMCell",
    "MetaLSTMConfig",
    "MetaLSTMOptimizer",
    "NonFiniteGradientError",
    "Reptile",
    "UntrainedWeightsWarning",
    "UpdateRule",
    "__version__",
    "average_weights",
    "load_weights",
    "save_weights",
]
