"""Update-rule networks: pure per-coordinate math, no optimizer state."""

from .base import State, StateSpec, UpdateRule
from .coordinate_lstm import CoordinateLSTM, CoordinateLSTMConfig
from .functional import preprocess
from .meta_lstm import MetaLSTMCell, MetaLSTMConfig

RULES: dict[str, type[UpdateRule]] = {cls.kind: cls for cls in (CoordinateLSTM, MetaLSTMCell)}

__all__ = [
    "RULES",
    "CoordinateLSTM",
    "CoordinateLSTMConfig",
    "MetaLSTMCell",
    "MetaLSTMConfig",
    "State",
    "StateSpec",
    "UpdateRule",
    "preprocess",
]
