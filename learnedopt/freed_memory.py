"""Keeping freed memory mapped, for meta-training's long loops of same-sized allocations.

A meta-training truncation allocates and frees several hundred MB of tensors of a few megabytes
each (the LSTM's saved activations, one set per step). By default glibc's ``malloc`` hands the
freed top of its heap back to the operating system once it passes a threshold, and serves large
requests with fresh ``mmap``\\ s, so the next truncation touches new pages: in six meta-steps
of the default's MNIST meta-training, about 250,000 more page faults (nearly twice the run's total kept
mapped) and each meta-step 1.04x slower (``benchmarks/freed_memory.py``,
benchmarks/results/freed_memory.md). ``learnedopt meta-train`` calls :func:`keep_freed_memory`
first; the library itself never changes how the process allocates (a program of your own can
call it, or set ``GLIBC_TUNABLES`` to the same effect).
"""

from __future__ import annotations

import ctypes
import platform

from .switches import env_switch

#: glibc's ``mallopt`` parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: the largest mmap threshold glibc accepts on 64-bit (``HEAP_MAX_SIZE / 2``): requests up to it
#: come from the heap and are reused; larger ones are still mapped afresh
MMAP_THRESHOLD = 32 * 2**20
#: the largest trim threshold ``mallopt`` takes (an ``int``): the heap keeps up to 2 GiB it no
#: longer uses
TRIM_THRESHOLD = 2**31 - 1

#: ``LEARNEDOPT_KEEP_FREED_MEMORY=0`` leaves ``malloc`` as it is
SWITCH = "LEARNEDOPT_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Ask glibc's ``malloc`` to keep freed memory mapped for reuse: requests up to 32 MiB from the
    heap (not fresh mappings), and up to 2 GiB of free heap kept rather than returned. The
    process's resident memory then stays near its peak. Process-wide and for the rest of the
    process; values are unchanged, only where tensors are placed.

    Returns:
        Whether it was applied: False off glibc (macOS, Windows, musl), or where
        ``LEARNEDOPT_KEEP_FREED_MEMORY=0``. Raises ValueError on another value of that variable.
    """
    if not env_switch(SWITCH, on="keep freed memory mapped for reuse", off="leave malloc as it is"):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    # mallopt returns 1 on success, 0 on a value it refuses
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) & bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
