"""One LSTM layer step, forward and backward, as fused CPU code (``lstm_layer_cpu.cpp``).

An update rule's LSTM runs one time step on ``n`` coordinates (tens of thousands to millions)
with a small hidden size ``H`` (20). Run as separate operations, each step writes and rereads
its ``(n, 4H)`` gates several times (the product, the pointwise cell, its gradient, two more
products), and at that shape the passes over memory, not the arithmetic, set the time. This
kernel does a layer's whole forward, or whole backward, for four rows at a time, their gates in
vector registers: the forward reads ``x``, ``h``, ``c`` and writes ``h'``, ``c'`` (and, for the
backward, the gate activations and ``tanh(c')``, by non-temporal stores on AVX and AVX-512: read
only by the backward, steps later, they would otherwise fill the cache the next step reads
from; so is ``c'``, read next by the next step); the backward reads those and writes the
gradients of ``x``, ``h`` and ``c``, accumulating the weight and bias gradients (those of ``h``
and ``c`` by non-temporal stores too: read next by the previous step's backward). Optionally the
forward also applies a linear head to ``h'`` (the update rule's output layer, one number per row)
and the backward takes the head's gradient, so that the rule's output needs no pass of its own.

Same math as ``torch.nn.LSTM`` (gate order ``i, f, g, o``) for float32 CPU tensors with ``4H`` a
multiple of 16, equal to rounding: ``exp`` is a polynomial of about 1 ulp and the products sum
in another order than BLAS's. The library's step (:mod:`learnedopt.nn.lstm_step`) uses it where
:func:`applies` and falls back to BLAS products and compiled pointwise code otherwise.

Build: compiled at first use per ``(inputs, hidden)`` with the C++ compiler that
``torch.compile`` also needs (``$CXX``, which may carry a wrapper and arguments such as ``ccache
g++``, else ``c++``, ``g++`` or ``clang++``) for this CPU
(``-march=native``), into ``$LEARNEDOPT_CACHE_DIR`` (default ``$XDG_CACHE_HOME/learnedopt``, else
``~/.cache/learnedopt``: :func:`cache_dir`; the first step of a process with empty caches, building two, took 0.96 s:
``benchmarks/results/first_step.md``), with its SHA-256 beside it: a file that does not match (truncated by a crash, a
partial copy) is built again, never loaded. A kernel is compiled in a temporary folder, then
copied there; where that folder cannot be written (read-only, or a full disk) or its libraries
cannot be loaded (mounted ``noexec``), each process builds into a temporary folder, with one
warning naming why. A compile that does not finish within ``$LEARNEDOPT_CXX_TIMEOUT`` seconds
(default 300: :func:`compiler_timeout`) is killed and fails the build. If no compiler works, :func:`applies` is False
from then on, with one warning (:func:`failed`: the LSTM step then leaves torch.compile's failure
on the CPU, which needs a working C++ compiler too, unwarned).
``LEARNEDOPT_CPU_KERNEL=0`` turns it off.

Threads: rows are split into ``torch.get_num_threads()`` contiguous parts (at least
:data:`MIN_ROWS_PER_THREAD` rows each), run by OpenMP threads, each accumulating its own weight
gradient, summed in a fixed order: results depend on the thread count but not on timing. The
kernel links the ``libgomp.so.1`` that torch has loaded where torch's Linux wheels ship it under
that name, so that both share one team of threads: with two teams, the threads torch's last
operation left spinning would take the cores from the kernel's. Where OpenMP does not build, one
thread runs it, and so in a forked child (``multiprocessing``'s ``fork``), where GNU OpenMP's
threads of the parent are gone and a parallel region would wait for them forever (torch's own
operations do, unless the child calls ``torch.set_num_threads(1)``, as DataLoader workers do).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

from ..switches import env_switch

SOURCE = Path(__file__).with_name("lstm_layer_cpu.cpp")
#: Rows per part below which a call is not split over threads.
MIN_ROWS_PER_THREAD = 4096
#: Seconds one compile may take, unless ``LEARNEDOPT_CXX_TIMEOUT`` says otherwise (:func:`compiler_timeout`).
COMPILER_TIMEOUT = 300.0
_libraries: dict[tuple[int, int], ctypes.CDLL] = {}
_failed = False
_warned_unwritable = False
_lock = threading.Lock()


def enabled() -> bool:
    """``LEARNEDOPT_CPU_KERNEL``: ``1`` (default) or ``0``; any other value raises ValueError."""
    return env_switch("LEARNEDOPT_CPU_KERNEL", on="the fused CPU LSTM layer", off="the LSTM step without it")


def applies(*tensors: Tensor, hidden: int) -> bool:
    """Whether the kernel can run a layer of hidden size ``hidden`` on ``tensors`` (the layer's
    inputs, states and weights, of any shape): all float32 CPU tensors, ``4 * hidden`` a multiple
    of 16, enabled and not failed to build."""
    return (
        not _failed
        and (4 * hidden) % 16 == 0
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and enabled()
    )


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$LEARNEDOPT_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/learnedopt``, else ``~/.cache/learnedopt`` (a leading ``~`` expanded)."""
    if os.environ.get("LEARNEDOPT_CACHE_DIR"):
        return Path(os.environ["LEARNEDOPT_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "learnedopt"


def _cpu_identity() -> str:
    """What ``-march=native`` compiles for: the CPU's model and instruction set where Linux
    says them (x86: ``vendor_id``, ``model name``, ``flags``; ARM: the implementer, part, variant
    and ``Features``; POWER: ``cpu``; RISC-V: ``isa`` and ``uarch``; s390: ``features``)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    wanted = (
        "vendor_id", "model name", "flags", "Features", "CPU implementer", "CPU architecture", "CPU variant",
        "CPU part", "cpu", "isa", "uarch", "features",
    )  # fmt: skip
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))


def _product_lanes() -> int:
    """The kernel's ``XL``: 16 on Intel CPUs with AVX-512, which run 16 floats in one slot, else 8
    (a 16-float operation takes two slots, and 8 wastes less padding: on an AMD EPYC (AVX-512)
    host the backward with input gradients ran 1.09x and 1.03x faster for layers of 2 and 20
    inputs, ``benchmarks/results/lstm_layer_cpu.md``)."""
    identity = _cpu_identity()
    return 16 if "GenuineIntel" in identity and "avx512f" in identity.split() else 8


def _compiler() -> list[str] | None:
    """The compiler's command: ``$CXX`` (a command line, e.g. ``ccache g++``), else the first of
    ``c++``, ``g++``, ``clang++`` on the PATH (a ``$CXX`` that names no program there, or does
    not split as a command line, is passed over); None if none is found."""
    for command in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        try:
            words = shlex.split(command) if command else []
        except ValueError:  # an unclosed quote
            words = []
        if words and shutil.which(words[0]):
            return [shutil.which(words[0]), *words[1:]]
    return None


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load(path: Path) -> ctypes.CDLL:
    # absolute: a path without a "/" (the cache folder ".") is searched for in the system's
    # library folders, not the working directory
    library = ctypes.CDLL(os.path.abspath(path))
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    # n, parts, then x's pointer and its two strides, then the other tensors' pointers
    library.lstm_layer_forward.argtypes = [size, ctypes.c_int, pointer, size, size] + [pointer] * 11
    library.lstm_layer_forward.restype = None
    library.lstm_layer_backward.argtypes = [size, ctypes.c_int, pointer, size, size] + [pointer] * 15
    library.lstm_layer_backward.restype = None
    return library


def compiler_timeout() -> float:
    """``LEARNEDOPT_CXX_TIMEOUT``: the seconds one compile of a kernel may take before the build
    counts as failed (:data:`COMPILER_TIMEOUT` where unset or empty); a value that is not a
    number above 0 raises ValueError."""
    value = os.environ.get("LEARNEDOPT_CXX_TIMEOUT", "").strip()
    if not value:
        return COMPILER_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise ValueError(
            f"LEARNEDOPT_CXX_TIMEOUT={value!r}: use the seconds one compile of the CPU LSTM kernel may take, "
            f"a number above 0 (default {COMPILER_TIMEOUT:g})"
        )
    return seconds


def _compile(compiler: list[str], flags: list[str], path: Path) -> str | None:
    """Compile into ``path``; returns the compiler's first error line, or None when built.

    Raises:
        RuntimeError: the compiler did not finish within :func:`compiler_timeout` seconds (a
            ``ccache`` on a stuck network mount, a wrapper waiting for a licence): it is killed,
            with all it started (it runs in a session of its own), and the compiler reaped.
    """
    timeout = compiler_timeout()
    command = [*compiler, *flags, str(SOURCE), "-o", str(path)]
    # in the C locale: gcc translates its messages otherwise (``Fehler:``), and the line naming
    # the error, found by the word "error", would not be found
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    # its messages as UTF-8, any other byte (a path in a Latin-1 file name) replaced: an error
    # decoding them would escape ready() from every step
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "encoding": "utf-8", "errors": "replace"}
    with subprocess.Popen(command, **pipes, env=env, start_new_session=True) as process:
        try:
            # (capped at what poll() takes, 24 days)
            _, stderr = process.communicate(timeout=min(timeout, 2_000_000))
        except BaseException as err:  # the timeout, or Ctrl-C while it compiles
            try:
                if hasattr(os, "killpg"):
                    os.killpg(process.pid, signal.SIGKILL)
                else:  # no process groups (Windows): the compiler alone
                    process.kill()
            except ProcessLookupError:  # all of its session has exited
                pass
            process.wait()  # reaped (leaving the with block closes its pipes)
            if isinstance(err, subprocess.TimeoutExpired):
                raise RuntimeError(
                    f"{' '.join(compiler)} did not finish within {timeout:g} s; set LEARNEDOPT_CXX_TIMEOUT "
                    "to the seconds a compile may take"
                ) from None
            raise
    if process.returncode != 0:
        return _first_error(stderr) or f"status {process.returncode}"
    if not path.is_file() or path.stat().st_size == 0:  # a wrapper that exits 0 without compiling
        return f"wrote no library to {path}"
    return None


#: A linker's own diagnostic (``/usr/bin/ld: final link failed: No space left on device``,
#: ``ld.lld: error: ...``), which comes before the compiler driver's summary of it
_LINKER_LINE = re.compile(r"^(?:\S*/)?(?:ld|ld\.\w+|ld64(?:\.\w+)?|lld|mold): (?!warning)")


def _first_error(stderr: str) -> str | None:
    """The compiler's first line naming an error, or the linker's, whichever comes first (the
    driver's summary, ``collect2: error: ld returned 1 exit status``, says nothing of why), in
    English: :func:`_compile` runs the compiler in the C locale."""
    return next((line for line in stderr.strip().splitlines() if "error" in line or _LINKER_LINE.match(line)), None)


def _store(built: Path, path: Path) -> None:
    """Copy the kernel ``built`` to ``path`` in the cache, with its digest beside it,
    ``path.sha256``; raises OSError where the cache cannot be written (a read-only or full disk).

    Both are written in a folder of their own beside their final names, then renamed: processes
    storing it at once each rename a complete file, and the digest, renamed last, vouches for it.
    They are made by ``open``, so with the modes the umask gives (the cache may be shared)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a file of that name
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path.parent)) from None
    storing = Path(tempfile.mkdtemp(prefix=".storing-", dir=path.parent))
    try:
        temporary, digest = storing / path.name, storing / f"{path.name}.sha256"
        shutil.copyfile(built, temporary)
        os.chmod(temporary, os.stat(built).st_mode & 0o777)  # the compiler's: executable
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
        digest.write_text(_digest(temporary))
        os.replace(temporary, path)
        os.replace(digest, f"{path}.sha256")
    finally:
        shutil.rmtree(storing, ignore_errors=True)


def _intact(path: Path) -> bool:
    """Whether ``path`` is a kernel this module built whole: loading a truncated or otherwise
    damaged file (a crash before the disk had it, a partial copy) can kill the process (SIGBUS).
    The digest file is compared as bytes: damaged into bytes that are not text, it is a mismatch."""
    try:
        return Path(f"{path}.sha256").read_bytes().strip() == _digest(path).encode()
    except OSError:
        return False


def _flags(inputs: int, hidden: int, variant: list[str]) -> list[str]:
    """The compiler's flags for a layer of these sizes, ``variant`` (target and OpenMP flags) among them."""
    return ["-O3", "-std=c++17", "-ffp-contract=fast", "-shared", "-fPIC", *variant, f"-DIN={inputs}", f"-DHID={hidden}", f"-DXL={_product_lanes()}"]


def _build(inputs: int, hidden: int) -> ctypes.CDLL:
    compiler_timeout()  # a bad value is an error, found or built
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found ($CXX, c++, g++ or clang++)")
    source = SOURCE.read_bytes()
    errors = []
    folder = cache_dir()
    # compiled in a temporary folder (where the compiler writes its own intermediate files),
    # removed once loaded: the loaded library stays mapped
    with tempfile.TemporaryDirectory(prefix="learnedopt-") as scratch:
        # -march=native where the compiler takes it (gcc, clang on x86), else the default
        # target; OpenMP where it builds
        variants = [[*arch, *openmp] for openmp in (["-fopenmp"], []) for arch in (["-march=native"], ["-mcpu=native"], [])]
        builds, identity = [], _cpu_identity().encode()
        for variant in variants:
            flags = _flags(inputs, hidden, variant)
            key = hashlib.sha256(b"\0".join([source, " ".join(compiler).encode(), " ".join(flags).encode(), identity]))
            builds.append((flags, f"lstm_layer_cpu_{inputs}_{hidden}_{key.hexdigest()[:16]}.so"))
        # the first variant in the cache, before compiling any: one that does not build here
        # (OpenMP without its library) would otherwise be compiled again by every process
        unloadable = None  # the cache's libraries cannot be loaded (a file system mounted noexec)
        for _, name in builds:
            if _intact(folder / name):
                try:
                    return _load(folder / name)
                except OSError as err:
                    unloadable = err
                    break
        for flags, name in builds:
            built = Path(scratch) / name
            error = _compile(compiler, flags, built)
            if error is not None:
                errors.append(error)
                continue
            if unloadable is None:
                try:
                    _store(built, folder / name)
                except OSError as err:  # a read-only or full disk, HOME unset in a container
                    _warn_cache(f"cannot write the kernel cache {folder} ({err.strerror or err})")
                    return _load(built)
                try:
                    return _load(folder / name)
                except OSError as err:
                    unloadable = err
            _warn_cache(f"cannot load kernels from the cache {folder} ({unloadable})")
            return _load(built)
        raise RuntimeError(f"{' '.join(compiler)} failed: {errors[0]}")


def _warn_cache(problem: str) -> None:
    """Warn, once per process, that the kernel is built for this process only."""
    global _warned_unwritable
    if not _warned_unwritable:
        _warned_unwritable = True
        warnings.warn(
            f"lstm_layer_cpu: {problem}; building into a temporary folder, again in every process: set "
            "LEARNEDOPT_CACHE_DIR to a writable folder whose libraries can be loaded (not mounted noexec) to keep the build",
            stacklevel=6,
        )


def ready(inputs: int, hidden: int) -> bool:
    """Whether the kernel for a layer of these sizes is built, building it if need be. If it
    cannot be built: False, and :func:`applies` False from then on, with one warning.

    Raises:
        ValueError: ``LEARNEDOPT_CXX_TIMEOUT`` is not a number of seconds (:func:`compiler_timeout`).
    """
    global _failed
    with _lock:
        if (inputs, hidden) not in _libraries and not _failed:
            try:
                _libraries[inputs, hidden] = _build(inputs, hidden)
            except (OSError, RuntimeError) as err:
                _failed = True
                warnings.warn(
                    f"the fused CPU LSTM layer could not be built ({err}); the LSTM step runs as "
                    "BLAS products and pointwise code, compiled by torch.compile where it can be, else "
                    "eagerly (slower; the same math, other rounding)",
                    stacklevel=4,
                )
        return (inputs, hidden) in _libraries


def failed() -> bool:
    """Whether a build failed (no C++ compiler, or none that works) and :func:`ready` warned that
    the LSTM step falls back."""
    return _failed


def _built(inputs: int, hidden: int) -> ctypes.CDLL:
    if (inputs, hidden) not in _libraries:
        raise RuntimeError(f"lstm_layer_cpu: no kernel built for {inputs} inputs and hidden size {hidden} (call ready() first)")
    return _libraries[inputs, hidden]


def _parts(n: int) -> int:
    """Into how many parts (threads) the kernel splits ``n`` rows: one in a forked child."""
    if _forked:
        return 1
    return max(1, min(torch.get_num_threads(), n // MIN_ROWS_PER_THREAD))


def _after_fork_in_child() -> None:
    # GNU OpenMP's threads do not survive fork(): a parallel region in a child of a process
    # that had started them waits for them forever (Hogwild training, a forked DataLoader worker).
    # The build lock is new too: one held by another thread of the parent at the fork (building
    # a kernel) would be held in the child forever, by a thread the child does not have
    global _forked, _lock
    _forked = True
    _lock = threading.Lock()


_forked = False
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _pointer(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _checked(t: Tensor, shape: tuple[int, ...], name: str) -> Tensor:
    if tuple(t.shape) != shape or not t.is_contiguous():
        raise ValueError(f"lstm_layer_cpu: {name} must be contiguous of shape {shape}, got {tuple(t.shape)}")
    return t


def lstm_layer_forward(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    weight: Tensor,
    bias: Tensor,
    h_out: Tensor,
    c_out: Tensor,
    *,
    save: bool,
    head_weight: Tensor | None = None,
    head_bias: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """One step of one layer: ``h', c' = LSTMCell(x, (h, c))``, written into ``h_out``, ``c_out``,
    and optionally a linear head on ``h'``.

    Args:
        x: ``(n, in)``, at any strides (read in place: an update rule's features, feature-major,
            need no copy); h, c: ``(n, H)``.
        weight: ``(4H, in + H)``, ``[weight_ih, weight_hh]``; bias: ``(4H,)``.
        h_out, c_out: contiguous ``(n, H)`` outputs.
        save: also return what :func:`lstm_layer_backward` needs.
        head_weight, head_bias: ``(H,)`` and ``(1,)``, or None (no head). Each row's head,
            ``h' . head_weight + head_bias``, sums in the same order whatever ``n``.

    Returns:
        ``(activations (n, 4H), tanh(c') (n, H))`` when ``save``, else ``(None, None)``; then the
        head ``(n,)`` or None.

    Raises:
        RuntimeError: the kernel for these sizes is not built (:func:`ready` was False).
    """
    n, inputs = x.shape
    hidden = h.shape[1]
    library = _built(inputs, hidden)
    h, c = h.contiguous(), c.contiguous()
    for t, name in ((h, "h"), (c, "c"), (h_out, "h_out"), (c_out, "c_out")):
        _checked(t, (n, hidden), name)
    _checked(weight, (4 * hidden, inputs + hidden), "weight")
    weight_t = weight.detach().t().contiguous()
    bias = _checked(bias.detach().contiguous(), (4 * hidden,), "bias")
    act = x.new_empty(n, 4 * hidden) if save else None
    tanh_c = x.new_empty(n, hidden) if save else None
    head = None
    if head_weight is not None:
        head_weight = _checked(head_weight.detach().reshape(-1).contiguous(), (hidden,), "head_weight")
        head_bias = _checked(head_bias.detach().reshape(-1).contiguous(), (1,), "head_bias")
        head = x.new_empty(n)
    tensors = (h, c, weight_t, bias, act, tanh_c, h_out, c_out, head_weight, head_bias, head)
    library.lstm_layer_forward(n, _parts(n), x.data_ptr(), *x.stride(), *(_pointer(t) for t in tensors))
    return act, tanh_c, head


def lstm_layer_backward(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    weight: Tensor,
    activations: Tensor,
    tanh_c: Tensor,
    grad_h: Tensor | None,
    grad_h_more: Tensor | None,
    grad_c: Tensor | None,
    grad_c_out: Tensor,
    grad_h_out: Tensor | None,
    need_x: bool,
    grad_head: Tensor | None = None,
    head_weight: Tensor | None = None,
) -> tuple[Tensor | None, Tensor, Tensor, Tensor | None, Tensor | None]:
    """The gradient of :func:`lstm_layer_forward` (its inputs, outputs and saved tensors).

    Args:
        grad_h, grad_h_more: two parts of ``h'``'s gradient ``(n, H)`` (None: zero).
        grad_c: ``c'``'s gradient ``(n, H)`` (None: zero).
        grad_c_out: contiguous ``(n, H)``, written with ``c``'s gradient.
        grad_h_out: contiguous ``(n, H)`` written with ``h``'s gradient, or None (not wanted).
        need_x: whether to compute ``x``'s gradient.
        grad_head, head_weight: the head's gradient ``(n,)`` (None: zero) and the forward's
            ``head_weight`` (None: the forward had no head).

    Returns:
        ``(grad_x (n, in) or None, grad_weight (4H, in + H), grad_bias (4H,), grad_head_weight
        (H,), grad_head_bias (1,))``, the last two None without a head.
    """
    n, inputs = x.shape
    hidden = h.shape[1]
    library = _built(inputs, hidden)
    gates, width = 4 * hidden, inputs + hidden
    padded = -(-width // 16) * 16
    weight_padded = x.new_zeros(gates, padded)
    weight_padded[:, :width] = weight.detach()
    _checked(grad_c_out, (n, hidden), "grad_c_out")
    if grad_h_out is not None:
        _checked(grad_h_out, (n, hidden), "grad_h_out")
    grads = [None if g is None else _checked(g.contiguous(), (n, hidden), "a gradient") for g in (grad_h, grad_h_more, grad_c)]
    grad_x = x.new_empty(n, inputs) if need_x else None
    if head_weight is not None:
        head_weight = _checked(head_weight.detach().reshape(-1).contiguous(), (hidden,), "head_weight")
        if grad_head is not None:
            grad_head = _checked(grad_head.contiguous(), (n,), "grad_head")
    else:
        grad_head = None
    parts = _parts(n)
    grad_weight_t = x.new_zeros(parts, width, gates)
    # per part: the bias's gradient (4H), the head weight's (H), the head bias's (1)
    grad_sums = x.new_zeros(parts, gates + hidden + 1)
    h, c = h.contiguous(), c.contiguous()
    tensors = (h, c, activations, tanh_c, *grads, grad_head, head_weight, weight_padded, grad_weight_t, grad_sums, grad_x, grad_h_out, grad_c_out)
    library.lstm_layer_backward(n, parts, x.data_ptr(), *x.stride(), *(_pointer(t) for t in tensors))
    # summed in a fixed order, so the same bits for the same number of parts
    sums = grad_sums.sum(0)
    head_grads = (sums[gates:-1], sums[-1:]) if head_weight is not None else (None, None)
    return grad_x, grad_weight_t.sum(0).t(), sums[:gates], *head_grads
