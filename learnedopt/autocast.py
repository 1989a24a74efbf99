"""Turning the caller's autocast off where the library's own math must keep its dtype.

A user's ``torch.autocast`` region often covers a whole training step, the optimizer's too. A
rule runs in its math dtype (:func:`learnedopt.nn.precision.math_dtype`), as it was
meta-trained, and the NaN/Inf check (:mod:`learnedopt.finite`) stacks norms of one dtype, which
autocast refused for bfloat16 ones in a float16 region (or the reverse).
"""

from __future__ import annotations

import contextlib

import torch


def without_autocast(device_types: set[str]) -> contextlib.ExitStack:
    """A context with autocast off for each of ``device_types`` (``"cpu"``, ``"cuda"``: those
    autocast exists for; others are skipped)."""
    stack = contextlib.ExitStack()
    for device_type in sorted(device_types):
        if torch.amp.is_autocast_available(device_type):
            stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack
