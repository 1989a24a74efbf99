"""The precision a rule's math runs in, whatever the parameters' dtype and the caller's autocast.

The optimizers and the functional updates (:func:`learnedopt.meta.learned_step`,
:func:`learnedopt.meta.unroll`) share it, so that they take the same step.
"""

from __future__ import annotations

import contextlib

import torch


def math_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype a rule's math runs in for parameters of ``param_dtype``: float64 for float64,
    float32 for every other (float32, bfloat16, float16: an LSTM's gates and a moving average
    lose too much in a half-precision dtype). Parameters and gradients are read in it, and the
    new parameters written back in their own dtype."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def without_autocast(device_types: set[str]) -> contextlib.ExitStack:
    """A context with autocast off for each of ``device_types`` (those autocast exists for): the
    user's autocast region (often a whole training step) must not run a rule's matrix products
    in float16 or bfloat16, since it runs in :func:`math_dtype`, as it was meta-trained."""
    stack = contextlib.ExitStack()
    for device_type in sorted(device_types):
        if torch.amp.is_autocast_available(device_type):
            stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack
