"""Checks of plain values (numbers from a command line, a JSON header, a Python call) shared by
every layer of the library: the networks, the data readers, meta-training and evaluation."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch


def check_positive_integer(name: str, value: Any) -> None:
    """Raise ValueError unless ``value`` is an integer >= 1 (:func:`is_integer`)."""
    if not is_integer(value) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def is_integer(value: Any) -> bool:
    """Whether ``value`` is an integer; a bool (JSON ``true``) is not one, though Python would
    count it as 1."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """Whether ``value`` is a real number; a bool (JSON ``true``) or a string (``"0.9"`` in a
    hand-edited weight-file header) is not one."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def finite_in_float32(value: Any) -> bool:
    """Whether ``value`` is a real number (see :func:`is_number`) that is finite in float32, the
    dtype of the rules' math: a weight-file header's ``1e300`` is a finite JSON double, but an
    output scale of it set every float32 parameter to -Inf at the first step."""
    return is_number(value) and math.isfinite(value) and abs(value) <= torch.finfo(torch.float32).max
