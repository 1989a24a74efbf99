"""Checks of plain values (numbers from a command line, a JSON header, a Python call) and the
seeding of random draws, shared by every layer of the library: the networks, the data readers,
meta-training and evaluation."""

from __future__ import annotations

import argparse
import contextlib
import math
import numbers
import random
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

#: The most elements a tensor of learnedopt may have: 2**31 - 1, the largest 32-bit signed integer
#: (the index type of many of torch's kernels and C interfaces). A float32 tensor of that many is
#: 8 GiB and a run keeps several, so no run that fits a machine is refused; beyond it an option's
#: count (or a data reader's ``image_size``) failed deep in torch, numpy or Pillow with a
#: traceback, or tried to allocate terabytes before the first step. Counts of meta-steps
#: (``--meta-steps``, ``--checkpoint-every``, ...) size no tensor and have no bound.
MAX_ELEMENTS = 2**31 - 1


def check_elements(settings: str, elements: int, tensor: str, error: type[ValueError] = ValueError) -> None:
    """Raise ``error`` (a ValueError, or the command line's ``ConfigError``) where ``tensor``, which
    ``settings`` size (e.g. ``"--horizon 100 and --meta-batch 8"``, ``"image_size 100000"``),
    would have more than :data:`MAX_ELEMENTS` elements."""
    if elements > MAX_ELEMENTS:
        raise error(
            f"{settings}: {tensor} would have {elements:,} elements; learnedopt's tensors have at most "
            f"{MAX_ELEMENTS:,} (2**31 - 1)"
        )


def path_arg(text: str) -> str:
    """``type=`` of an argparse option that names a file or folder: the text as given, unless it
    is empty (``--out "$DIR"`` with ``DIR`` unset), which ``Path("")`` would take as the current
    folder; then argparse's one-line ``argument --X: must be a non-empty path`` error."""
    if not text:
        raise argparse.ArgumentTypeError(f"must be a non-empty path, got {text!r}")
    return text


def check_positive_integer(name: str, value: Any) -> None:
    """Raise ValueError unless ``value`` is an integer >= 1 (:func:`is_integer`)."""
    if not is_integer(value) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    """Raise ValueError unless ``value`` is ``True`` or ``False``: a switch given as a string
    (``"false"``, a config file's) would be true, and ``1`` or ``None`` are not switches."""
    if type(value) is not bool:
        raise ValueError(f"{name} must be True or False, got {value!r}")


def is_integer(value: Any) -> bool:
    """Whether ``value`` is an integer; a bool (JSON ``true``) is not one, though Python would
    count it as 1."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """Whether ``value`` is a real number; a bool (JSON ``true``) or a string (``"0.9"`` in a
    hand-edited weight-file header) is not one."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def real_as_float(value: numbers.Real) -> float:
    """``float(value)`` of a real number (see :func:`is_number`), where one beyond float64's
    range (a Python int or ``Fraction`` over 1.8e308, finite: ``float`` raises OverflowError on
    it) is saturated at the largest float64 of its sign."""
    try:
        return float(value)
    except OverflowError:
        return math.copysign(sys.float_info.max, 1.0 if value > 0 else -1.0)


def finite_in_float32(value: Any) -> bool:
    """Whether ``value`` is a real number (see :func:`is_number`) that is finite in float32, the
    dtype of the rules' math: a weight-file header's ``1e300`` is a finite JSON double, but an
    output scale of it set every float32 parameter to -Inf at the first step."""
    return is_number(value) and math.isfinite(value) and abs(value) <= torch.finfo(torch.float32).max


_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def seeded_generator(seed: Any) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed``: an integer from -2**63 to 2**64 - 1 (the
    range ``manual_seed`` takes; a negative one wraps modulo 2**64), numpy's and a 0-d integer
    tensor's too; else a one-line ValueError naming the seed. ``manual_seed`` refused a
    numpy integer with 'an integer is required', a float or a string with 'manual_seed expected a
    long', and seeded ``True`` as 1."""
    if isinstance(seed, torch.Tensor) and seed.dim() == 0 and seed.dtype in _INTEGER_DTYPES:
        seed = seed.item()
    if not is_integer(seed) or not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed must be an integer from -2**63 to 2**64 - 1, got {seed!r}")
    return torch.Generator().manual_seed(int(seed))


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: torch.device | str) -> Iterator[None]:
    """Inside: the global random generators seeded with ``seed`` (an integer; modulo 2**64 for numpy):
    torch's (the CPU's, and ``device``'s where it is a CUDA device), numpy's (``np.random.*``) and
    Python's (``random.*``); after: each as it was, as ``torch.random.fork_rng`` leaves torch's.
    For the draws a run's code makes from a global RNG during a meta-step or an evaluation run (a
    network's or a task's dropout masks, a task's minibatches), which a checkpoint does not hold:
    seeded from the run's seed and the step, they are the same after ``--resume``, and in
    whichever process or order the runs go. A generator the code makes itself without a seed
    (``np.random.default_rng()``) is not one of them.

    Not thread-safe: the generators are process-wide, so another thread drawing from one of them
    inside changes the seeded draws (and takes seeded ones), and what it draws is rolled back
    when they are restored."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    word = int(seed) % 2**64
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=[device] if cuda else []):
            torch.default_generator.manual_seed(seed)
            if cuda:
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(seed)
            np.random.seed([word & 0xFFFFFFFF, word >> 32])  # numpy's legacy seed takes 32-bit words
            random.seed(word)
            yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
