"""The precision a rule's math runs in, whatever the parameters' dtype and the caller's autocast.

The optimizers and the functional updates (:func:`learnedopt.meta.learned_step`,
:func:`learnedopt.meta.unroll`) share it, so that they take the same step.
"""

from __future__ import annotations

import torch


def math_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype a rule's math runs in for parameters of ``param_dtype``: float64 for float64,
    float32 for every other (float32, bfloat16, float16: an LSTM's gates and a moving average
    lose too much in a half-precision dtype). Parameters and gradients are read in it, and the
    new parameters written back in their own dtype."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32
