"""Meta-training over several processes with ``torch.distributed`` (``torchrun``).

Meta-training is data-parallel over the tasks of a meta-batch: every rank draws the same global
meta-batch from the same seed (drawing tasks is cheap), unrolls its contiguous share of it, and
the ranks average their meta-gradients (or, for Reptile, sum their parameter moves) with one
all-reduce before the identical meta-update on every rank. ``--meta-batch`` is therefore the
global batch whatever the number of ranks, a run's results do not depend on how many ranks ran
it (up to the order of floating-point sums), and a checkpoint written by a run of W ranks
resumes on any number of ranks that divides the meta-batch.

Rank 0 alone writes the log, the checkpoints, the weights and the model card.

:class:`Workers` is the view the trainers use: the rank, the world size and the collectives.
:data:`SINGLE` is the one-process view (no collectives, no ``torch.distributed`` needed).
:func:`current` returns the view of an initialised default process group, so library callers
that set up ``torch.distributed`` themselves get distributed meta-training from the same API;
:func:`init_from_env` is what ``learnedopt meta-train`` calls under ``torchrun``.
"""

from __future__ import annotations

import datetime
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import Tensor

#: seconds a collective waits for the other ranks before the job fails (``--dist-timeout``)
DEFAULT_TIMEOUT_S = 300.0
#: the longest collective timeout: what a ``datetime.timedelta`` holds (999,999,999 days), which
#: ``init_process_group`` takes it as
MAX_TIMEOUT_S = datetime.timedelta.max.total_seconds()


class DistributedError(RuntimeError):
    """A collective failed: another rank died, or did not reach it within the timeout."""


@dataclass(frozen=True)
class Workers:
    """The processes meta-training runs on, seen from one of them.

    Attributes:
        rank: this process's index, ``0 <= rank < world_size``.
        world_size: number of processes.
        timeout_s: the process group's collective timeout in seconds, when known (for error
            messages).
    """

    rank: int = 0
    world_size: int = 1
    timeout_s: float | None = None

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the one that writes files."""
        return self.rank == 0

    def share(self, size: int, what: str = "--meta-batch") -> slice:
        """This rank's contiguous part of ``size`` items split evenly over the ranks.

        Raises:
            ValueError: ``size`` is not a multiple of the world size.
        """
        if size % self.world_size:
            raise ValueError(
                f"{what} {size} does not split evenly over {self.world_size} processes; "
                f"use a multiple of {self.world_size}"
            )
        part = size // self.world_size
        return slice(self.rank * part, (self.rank + 1) * part)

    def all_reduce_sum_(self, tensors: Sequence[Tensor]) -> None:
        """Sum ``tensors`` (each of any shape, the same on every rank) over the ranks, in place
        (one collective for all of them)."""
        if self.world_size == 1 or not tensors:
            return
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        self._all_reduce(flat)
        for t, piece in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
            t.copy_(piece.view_as(t))

    def average_gradients_(self, params: Sequence[Tensor]) -> None:
        """Replace each parameter's ``.grad`` (of the parameter's shape) by its mean over the ranks
        (missing: zeros).

        A frozen parameter (``requires_grad=False``, the same on every rank) is left out and keeps
        ``.grad is None``: a zero gradient would make a meta-optimizer with weight decay or
        momentum move it."""
        if self.world_size == 1:
            return
        params = [p for p in params if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        self.all_reduce_sum_(grads)
        torch._foreach_div_(grads, float(self.world_size))

    def mean(self, value: float) -> float:
        """The mean of a per-rank number over the ranks (for the log)."""
        if self.world_size == 1:
            return value
        total = torch.tensor([value], dtype=torch.float64)
        self._all_reduce(total)
        return float(total) / self.world_size

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (one collective under several ranks)."""
        if self.world_size == 1:
            return flag
        return self.mean(float(flag)) > 0.0

    def require_finite(self, what: str, value: Tensor | float) -> None:
        """Raise FloatingPointError on every rank where ``value`` (a number or a tensor of any shape,
        e.g. a scalar loss) holds NaN/Inf on any rank (one collective, so that the ranks stop
        together), naming ``what`` and this rank's value."""
        value = torch.as_tensor(value).detach()
        finite = bool(torch.isfinite(value).all())
        # a scalar as a number; a tensor of several values as torch prints it
        shown = float(value) if value.numel() == 1 else value.cpu().tolist()
        if self.world_size == 1:
            if not finite:
                raise FloatingPointError(f"{what} is {shown}")
        elif self.mean(float(finite)) != 1.0:
            raise FloatingPointError(f"{what} is not finite on every rank (rank {self.rank}'s: {shown})")

    def gather(self, value: object) -> list[object]:
        """Every rank's ``value`` (any picklable object), in rank order (one collective under
        several ranks)."""
        if self.world_size == 1:
            return [value]
        gathered: list[object] = [None] * self.world_size
        self._collective(dist.all_gather_object, gathered, value)
        return gathered

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.world_size > 1:
            self._collective(dist.barrier)

    def _all_reduce(self, tensor: Tensor) -> None:
        self._collective(dist.all_reduce, tensor)

    def _collective(self, fn: Callable[..., object], *args: object) -> None:
        try:
            fn(*args)
        except RuntimeError as err:  # gloo and NCCL raise subclasses of RuntimeError
            first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
            within = "its timeout" if self.timeout_s is None else f"{self.timeout_s:g} s"
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: a collective failed (another rank died, "
                f"or did not arrive within {within}): {first_line}"
            ) from None


SINGLE = Workers()
_timeout_s: float | None = None  # of the group init_from_env created
_owns_group = False  # whether init_from_env created the default group


def current() -> Workers:
    """The view of the initialised default process group, else :data:`SINGLE`."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return Workers(dist.get_rank(), dist.get_world_size(), _timeout_s)


def launched_by_torchrun() -> bool:
    """Whether the environment describes a multi-process job (``torchrun`` sets ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def default_backend() -> str:
    """``"gloo"``, and with CUDA ``"cpu:gloo,cuda:nccl"``: each collective then runs on NCCL or
    gloo according to its tensors' device."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def check_timeout(timeout_s: float) -> None:
    """Raise ValueError (``must be ...``, to follow the option's name) unless ``timeout_s`` is a
    number of seconds above 0 and at most :data:`MAX_TIMEOUT_S`."""
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"must be a positive number of seconds, got {timeout_s}")
    if timeout_s > MAX_TIMEOUT_S:
        raise ValueError(f"must be at most {MAX_TIMEOUT_S:g} seconds (the longest datetime.timedelta), got {timeout_s:g}")


def init_from_env(timeout_s: float = DEFAULT_TIMEOUT_S) -> Workers:
    """Join the job ``torchrun`` described in the environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``), with the backend of :func:`default_backend` and
    collectives that fail after ``timeout_s`` seconds; one process without ``torchrun``.

    An already initialised default group is used as it is.
    """
    if dist.is_available() and dist.is_initialized():
        return current()
    if not launched_by_torchrun():
        return SINGLE
    try:
        check_timeout(timeout_s)
    except ValueError as err:
        raise ValueError(f"timeout_s {err}") from None
    if not dist.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    backend = default_backend()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # each rank on its own GPU; more processes than GPUs (a CPU run on a 1-GPU machine, or one
    # GPU bound to each process) pin none; a --device cuda run where ranks would share one is
    # refused (loop.check_device, loop.agree_checks)
    if torch.cuda.is_available() and local_rank < torch.cuda.device_count():
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    global _timeout_s, _owns_group
    _timeout_s, _owns_group = timeout_s, True
    return current()


def shutdown(*, wait_for_all: bool = True) -> None:
    """Leave the default process group if :func:`init_from_env` created it (a group the caller
    set up is the caller's to destroy).

    With ``wait_for_all`` every rank first waits at a barrier, so that no rank tears the group
    down while another still works (rank 0 evaluates and writes the weights alone); a barrier
    that fails (a rank is gone, or rank 0 took longer than the timeout) is ignored. Pass
    ``False`` after an error, when another rank may never arrive.
    """
    global _owns_group
    if _owns_group and dist.is_initialized():
        if wait_for_all:
            try:
                current().barrier()
            except DistributedError:
                pass  # a rank is gone: nothing left to wait for
        dist.destroy_process_group()
    _owns_group = False


def exit_process(code: int) -> NoReturn:
    """End a command-line process with exit status ``code``.

    In a ``torchrun`` job the process ends with :func:`os._exit` once stdout and stderr are
    flushed, skipping the interpreter's finalisation: a ``torch.distributed`` background thread
    that releases a tensor while the interpreter shuts down can abort the process ("terminate
    called without an active exception", seen on a loaded 2-core machine after the run had
    finished and written everything), and torchrun would report the finished job as failed.
    Everything of the run is on disk by then: files are closed by their ``with`` blocks.
    Outside ``torchrun``, :func:`sys.exit`.
    """
    if launched_by_torchrun():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
