"""Update-rule networks: pure per-coordinate math, no optimizer state."""

import dataclasses

from .base import State, StateSpec, UpdateRule
from .coordinate_lstm import CoordinateLSTM, CoordinateLSTMConfig
from .functional import preprocess
from .meta_lstm import MetaLSTMCell, MetaLSTMConfig

#: Each rule kind (``UpdateRule.kind``, as weight files name it) and its class; your own are
#: added by :func:`register_rule`.
RULES: dict[str, type[UpdateRule]] = {cls.kind: cls for cls in (CoordinateLSTM, MetaLSTMCell)}


def register_rule(cls: type[UpdateRule]) -> type[UpdateRule]:
    """Add a rule class of your own to :data:`RULES`, so that weight files of its ``kind`` load
    (``load_weights``, ``weights="file.safetensors"``); returns ``cls`` (use it as a decorator).

    Registering the same class again (or a class of the same module and name, as a re-run
    notebook cell defines) is allowed; a ``kind`` another class holds is refused, so that a file
    never loads as another rule than the one saved.

    Raises:
        TypeError: ``cls`` is not an :class:`UpdateRule` subclass with a string ``kind`` and a
            dataclass ``config_class``.
        ValueError: its ``kind`` belongs to another registered class.
    """
    if not (isinstance(cls, type) and issubclass(cls, UpdateRule)):
        raise TypeError(f"register_rule takes an UpdateRule subclass, got {cls!r}")
    kind = cls.__dict__.get("kind")
    if not isinstance(kind, str) or not kind:
        raise TypeError(f"{cls.__name__} must set its own kind (a non-empty string naming it in weight files)")
    config_class = getattr(cls, "config_class", None)
    if not (isinstance(config_class, type) and dataclasses.is_dataclass(config_class)):
        raise TypeError(f"{cls.__name__}.config_class must be a dataclass (its architecture), got {config_class!r}")
    held = RULES.get(kind)
    if held is not None and held is not cls and (held.__module__, held.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"rule kind {kind!r} is already {held.__module__}.{held.__qualname__}'s: give {cls.__name__} a kind of its own")
    RULES[kind] = cls
    return cls


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
    "register_rule",
]
