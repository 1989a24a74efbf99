"""The run machinery every ``learnedopt meta-train`` algorithm shares.

:func:`train_loop` drives any :class:`Trainer` (update-rule training in :mod:`.train`, the
few-shot learners of :mod:`.fewshot`) through its meta-steps, with one progress bar, one JSONL log,
atomic checkpoints every N steps and an exact ``--resume``; the checks every run starts with, the
model card layout and the one-line :class:`ConfigError` are here too, so that the algorithms
behave the same on the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import filecmp
import hashlib
import io
import json
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor

from .. import markdown
from ..data.paths import create_output_folder
from ..files import write_atomically
from ..nn import RULES, UpdateRule, register_rule
from ..nn.lstm_step import check_settings
from ..plugins import entry_point_path, load_entry_point, one_line
from ..values import MAX_ELEMENTS, seeded_global_rng
from ..values import check_elements as check_tensor_elements
from ..version import __version__
from ..weights import PRESETS, blank_rule
from . import distributed
from .distributed import SINGLE, Workers
from .tasks import derive_seed

CHECKPOINT_FORMAT = 1
CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.jsonl"
WEIGHTS_NAME = "weights.safetensors"  # an update rule's run
MODEL_NAME = "model.safetensors"  # a few-shot learner's run
CARD_NAME = "MODEL_CARD.md"
#: a copy of the run's ``--preset`` weight file, which ``--resume`` reads in its place
START_NAME = "start.safetensors"
#: the configuration a run began with, written before its first meta-step: what ``--resume``
#: compares with while the run has no checkpoint yet
CONFIG_NAME = "config.json"
#: the files a finished run leaves
RESULT_NAMES = (WEIGHTS_NAME, MODEL_NAME, CARD_NAME)


class ConfigError(ValueError):
    """A bad meta-training configuration; the CLI prints it on one line and exits with code 2."""


def refuse_other_data(
    saved: str | None, current: str | None, what: str, data: str | None, whose: str = "the checkpoint's run"
) -> None:
    """Raise ConfigError where a run read data of SHA-256 ``saved`` (as its checkpoint or, before
    the first, :data:`CONFIG_NAME` records it) and ``--resume`` finds other data (``current``):
    ``--data`` may name another folder on resume, not other files, since the steps before the
    checkpoint read the first ones. ``what``: e.g. "MNIST files"; ``data``: the ``--data``
    given; ``whose``: the run as the refusal names it. Not checked where either is None (a
    record from before the hash was recorded, a run that reads no data files)."""
    if saved is not None and current is not None and saved != current:
        raise ConfigError(
            f"--resume: {whose} read other {what} (SHA-256 {saved[:12]}) than those "
            f"{'in --data ' + data if data else 'found'} (SHA-256 {current[:12]}): resume it on the files it began with"
        )


def refuse_other_architecture(what: str, saved: Mapping[str, Any] | None, built: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` where the architecture a checkpoint records (``saved``, a dict
    of settings, nested or not; None in a checkpoint that does not record it: not checked) is
    not the one the resumed run built (``built``): a class's or the library's default changed
    since the run began. With the same tensor shapes the checkpoint would load into the other
    learner, and the run go on silently as another one. ``what`` names the learner, e.g. ``"a
    CoordinateLSTM"``; the message names each differing setting (``a.b: old -> new``)."""
    if not isinstance(saved, Mapping):
        return
    changed = _differences(saved, built)
    if changed:
        raise ConfigError(f"--resume: the checkpoint holds {what} of another architecture than this run builds "
                          f"({', '.join(changed)}): its class or defaults changed since the run began; resume it with "
                          "them as they were, or start over in another --out without --resume")  # fmt: skip


def _differences(saved: Mapping[str, Any], built: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``"key: saved -> built"`` for each setting of ``saved`` that differs, nested dicts by dotted
    keys; equal by value, or by repr where a value is not equal to itself (a NaN). A setting
    ``saved`` lacks is not compared: the class gained it since, its default keeping the old
    behaviour (as :func:`_load_checkpoint` takes a run configuration's new field)."""
    found = []
    for key in sorted(saved, key=str):
        old, new = saved.get(key), built.get(key)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            found += _differences(old, new, f"{prefix}{key}.")
        elif old != new and repr(old) != repr(new):
            found.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return found


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during the meta-steps; its message says where ``--resume`` continues from.
    A ``KeyboardInterrupt``, so a caller that stops on Ctrl-C still does; the CLI prints it on
    one line and exits with code 130."""


class RunTerminated(RuntimeError):
    """SIGTERM (a scheduler's preemption, ``kill``, ``torchrun`` stopping its workers) during the
    meta-steps: the run finished the meta-step it was in, checkpointed it and stopped, so
    ``--resume`` runs nothing again. The CLI prints its message on one line and exits with code 143."""


class RunWriteError(OSError):
    """A file of the run could not be written (a full disk, a file size limit, a folder made
    read-only): one line naming the file and the OS's reason. Every file written before it is
    whole (each is written atomically, the log a line at a time), so ``--resume`` continues the
    run once the file can be written. The CLI prints it and exits with code 1."""

    def __init__(self, path: Path, err: OSError) -> None:
        super().__init__(err.errno, err.strerror or str(err), str(path))
        self.path = path

    def __str__(self) -> str:
        return (f"cannot write {self.path} ({self.strerror}); the run's files written before it are kept whole: "
                "--resume continues the run once it can write")  # fmt: skip


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Within the block, which writes ``path``, an ``OSError`` is a :class:`RunWriteError` naming
    ``path`` (not the temporary file beside it, nor none, as a failed flush names)."""
    try:
        yield
    except RunWriteError:
        raise
    except OSError as err:
        raise RunWriteError(path, err) from None


def terminated_message(out: Path, step: int, total: int) -> str:
    """What a run stopped by SIGTERM after meta-step ``step`` (checkpointed there) tells its user."""
    then = "writes its results" if step == total else f"continues from meta-step {step + 1}"
    return (f"stopped by SIGTERM after meta-step {step} of {total}, checkpointed in {out}: --resume {then}, "
            "running nothing again")  # fmt: skip


class _TerminationRequest:
    """Whether SIGTERM has arrived since :func:`_catch_sigterm` began."""

    requested = False


@contextlib.contextmanager
def _catch_sigterm() -> Iterator[_TerminationRequest]:
    """Within the block, SIGTERM sets the request's flag instead of ending the process, so the
    meta-step in progress can finish and be checkpointed. Only where SIGTERM has its default
    action and this is the main thread (Python's rule for handlers): a handler or SIG_IGN the
    caller installed is left alone. The previous action is restored on exit."""
    request = _TerminationRequest()
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield request
        return

    def handler(signum: int, frame: object) -> None:
        request.requested = True

    signal.signal(signal.SIGTERM, handler)
    try:
        yield request
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def interrupted_message(out: Path, step: int, total: int, saved: int | None, saving: bool) -> str:
    """What a run stopped by Ctrl-C during meta-step ``step`` tells its user: the meta-step of
    the checkpoint in ``out`` (``saved``, ``None`` before the first; while ``saving`` the new one
    may or may not have replaced it) and what ``--resume`` runs again."""
    where = f"interrupted during meta-step {step} of {total}"
    if saved is None and not saving:
        return f"{where}, before the run's first checkpoint: --resume starts it again from meta-step 0"
    if saving:
        return (f"{where}, while writing its checkpoint to {out}: continue with --resume (from meta-step {step}, "
                f"or {saved or 0} if that write did not finish)")  # fmt: skip
    again = f" (meta-step {step} runs again)" if step == saved + 1 else f" (meta-steps {saved + 1} to {step} run again)"
    return f"{where}; the checkpoint in {out} is at meta-step {saved}: continue with --resume{again}"


class AfterMetaUpdates(FloatingPointError):
    """A NaN or Inf met after some of a meta-step's meta-updates (truncations) were taken: the
    meta-parameters are no longer those the meta-step began with, so a first meta-step's
    divergence is not the optimizee settings' alone."""


def clip_meta_gradient_(params: list[Tensor], clip: float | None) -> float:
    """Clip the meta-gradient of ``params`` to norm ``clip`` (None: measure only) in place.

    Returns:
        the norm before clipping.

    Raises:
        FloatingPointError: the norm is NaN or Inf; the caller must not take the meta-step, so
            the meta-parameters stay as they were (and the last checkpoint stays valid).
    """
    # max_norm=inf measures the norm and scales the gradients by exactly 1.0
    norm = float(torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else math.inf))
    if not math.isfinite(norm):
        raise FloatingPointError(f"the meta-gradient norm is {norm} (the meta-parameters were left unchanged)")
    return norm


# ----------------------------------------------------------------------------- the shared loop
class RunConfig(Protocol):
    """What :func:`train_loop` needs of a configuration (:class:`learnedopt.meta.train.MetaTrainConfig`
    and :class:`learnedopt.meta.fewshot.FewShotConfig` have it)."""

    meta_steps: int
    seed: int

    def to_dict(self) -> dict[str, Any]: ...

    def same_run_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` in the form a resume compares with the run's: each setting that runs
        as another value does (a value equal to what None stands for, another spelling of the
        same task) in one form, so that it may be given either way."""
        ...

    @property
    def meta_steps_shape_the_run(self) -> bool:
        """Whether ``meta_steps`` changes finished steps (an annealed outer step, a score of the
        last step), so that a resumed run may not change it."""
        ...


C = TypeVar("C", bound=RunConfig)


def seeded_meta_step(
    seed: int, stream: int, step: int, workers: Workers, meta_batch: int, device: torch.device | str
) -> contextlib.AbstractContextManager[None]:
    """The global RNGs (:func:`~learnedopt.values.seeded_global_rng`) seeded for meta-step ``step``
    of a :class:`Trainer` whose draws stream is ``stream``: from ``derive_seed(seed, stream, 0,
    step, the first task of this rank's share of meta_batch)``, so that what a meta-step draws from
    them (dropout, a loss's minibatches) is the same after ``--resume`` and depends on no other
    rank's tasks. Each trainer's ``step`` enters it, so that the trainer called on its own (not
    through :func:`train_loop`) draws the same."""
    return seeded_global_rng(derive_seed(seed, stream, 0, step, workers.share(meta_batch).start), device)


class Trainer(Protocol):
    """One algorithm's meta-training state, driven by :func:`train_loop`.

    ``step(s)`` runs meta-step ``s`` (1-based), drawing its randomness from ``(seed, stream, s)``
    only (what it draws from the global RNGs inside :func:`seeded_meta_step`), and returns the log
    fields of that step (``meta_loss`` first; plain numbers). Its ``state_dict`` is everything a
    checkpoint must hold for a resumed run to repeat an uninterrupted one bit for bit. A trainer
    that reads data files may say their SHA-256 as ``data_sha256`` and what they are as
    ``data_kind`` (e.g. ``"MNIST files"``), which the run records before its first checkpoint, so
    that a ``--resume`` on other files is refused then too.
    """

    def step(self, step: int) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def rule_class(name: str) -> type[UpdateRule]:
    """The update-rule class ``--rule`` names: a kind of :data:`~learnedopt.nn.RULES`, or your own
    ``UpdateRule`` subclass as ``module:Class``, imported and registered
    (:func:`~learnedopt.nn.register_rule`, so that its weight files load in this process).

    Raises:
        ConfigError: an unknown kind, a module that fails to import, or a class that is not an
            ``UpdateRule`` with a kind of its own and a dataclass config.
    """
    if name in RULES:
        return RULES[name]
    if entry_point_path(name) is None:
        raise ConfigError(f"unknown rule {name!r}; choose from {', '.join(sorted(RULES))}, or your own UpdateRule as module:Class")
    try:
        return register_rule(load_entry_point(name))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--rule {name}: {one_line(err)}") from None


def check_elements(options: str, elements: int, tensor: str) -> None:
    """Raise :class:`ConfigError` where ``tensor``, which the settings ``options`` size (e.g.
    ``"--horizon 100 and --meta-batch 8"``), would have more than :data:`MAX_ELEMENTS` elements
    (:func:`learnedopt.values.check_elements`, which the data readers' ``image_size`` meets too)."""
    check_tensor_elements(options, elements, tensor, ConfigError)


#: The most weight tensors (``state_dict`` entries) a rule of ``--rule-config`` may have: a
#: CoordinateLSTM of 10**8 one-unit layers has under 2**31 weights but 4 * 10**8 tensors, and
#: building them would take hours: its 9,998 tensors of 2,499 layers built in 0.6 s, 99,998 in 42 s
#: (a dev timing, unrecorded; the time grows faster than the count).
MAX_WEIGHT_TENSORS = 10_000


def default_rule_config(rule_config: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """``rule_config`` as a configuration records it: None for an empty one, which sets no field
    (the rule class's defaults, as None does), so that ``--rule-config '{}'`` and no
    ``--rule-config`` are the same run on ``--resume``, in its command and in its files."""
    return None if isinstance(rule_config, Mapping) and not rule_config else rule_config


def rule_config_given(rule: str, rule_config: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """``rule_config`` without the settings equal to the defaults of rule class ``rule`` (None
    where none is left), its tuples as lists (as JSON and :meth:`UpdateRule.config_dict` give
    them): the form a resume compares, since ``{"hidden_size": 20}`` builds the rule that no
    ``--rule-config`` does where 20 is the default. Only the tuples made lists where the class
    is unknown or has no defaults to compare with."""
    if not rule_config:
        return default_rule_config(rule_config)

    def plain(value: Any) -> Any:
        return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value

    try:
        defaults = {k: plain(v) for k, v in dataclasses.asdict(rule_class(rule).config_class()).items()}
    except Exception:  # noqa: BLE001 - an unknown rule or one of your own without defaults: compared as given
        defaults = {}
    given = {k: plain(v) for k, v in rule_config.items()}
    return {k: v for k, v in given.items() if k not in defaults or v != defaults[k]} or None


#: the configuration fields that name files or folders (``--data``, ``--preset``), held as strings
PATH_FIELDS: tuple[str, ...] = ("data", "preset")


def path_string(value: Any) -> Any:
    """``value`` as a configuration holds a path: a ``pathlib.Path`` (or other ``os.PathLike``)
    given through the API as its string, which the checkpoint (read with ``weights_only``), the
    run's ``config.json`` and the weight file's header can record; anything else as it is."""
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def check_rule_config(rule: str, rule_config: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` when ``rule_config`` is not a valid config of rule kind ``rule``
    (a ``module:Class`` too: :func:`rule_class`): one the class refuses, a count (``hidden_size``,
    ``num_layers``, ...) beyond :data:`MAX_ELEMENTS`, which built layers for hours or failed in
    torch with a traceback, more than :data:`MAX_WEIGHT_TENSORS` weight tensors (where the rule
    says its count, :meth:`~learnedopt.nn.UpdateRule.weight_count`, before it is built), or one
    whose weights cannot be allocated. Draws nothing from torch's global generator (as
    :func:`~learnedopt.weights.blank_rule`), so a seeded script's later draws are as without it."""
    for key, value in rule_config.items():
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_ELEMENTS:
            raise ConfigError(f"--rule-config: {key} must be at most {MAX_ELEMENTS:,} (2**31 - 1, the most elements of a "
                              f"run's tensors), got {value}")  # fmt: skip
    try:
        count = rule_class(rule).weight_count(dict(rule_config))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--rule-config: {err}") from None
    if count is not None and count > MAX_WEIGHT_TENSORS:
        raise ConfigError(
            f"--rule-config: {rule} {dict(rule_config)} would have {count:,} weight tensors; a rule has at most "
            f"{MAX_WEIGHT_TENSORS:,}"
        )
    try:  # built blank (weights allocated, not initialised): a check draws nothing from torch's global generator
        blank_rule(rule_class(rule), dict(rule_config))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"--rule-config: {err}") from None
    except RuntimeError as err:  # torch's allocator: weights too large for this machine
        raise ConfigError(f"--rule-config: {rule} cannot be built: {one_line(err)}") from None


def check_run(config: Any, checkpoint_every: int, workers: Workers | None, *, resume: bool = False) -> Workers:
    """The checks every algorithm's run starts with: the configuration (``config.validate()``),
    its ``device`` for this process (:func:`check_device`, with torchrun's ``LOCAL_RANK`` and
    ``LOCAL_WORLD_SIZE``), ``checkpoint_every``, ``LEARNEDOPT_COMPILE``, and a meta-batch (and a selection episode of
    ``select_tasks``, where the config has one) that splits over the workers (default:
    :func:`learnedopt.meta.distributed.current`), which are returned. With ``resume`` those
    sizes are the run's own, so a refusal names the numbers of processes that can continue it.

    Raises:
        ConfigError: the first problem found.
    """
    config.validate()
    workers = distributed.current() if workers is None else workers
    local_rank, local_world_size = os.environ.get("LOCAL_RANK"), os.environ.get("LOCAL_WORLD_SIZE")
    check_device(config.device, world_size=workers.world_size,
                 local_rank=None if local_rank is None else int(local_rank),
                 local_world_size=None if local_world_size is None else int(local_world_size))  # fmt: skip
    check_checkpoint_every(checkpoint_every)
    try:  # read at the first LSTM step: a bad value stopped meta-step 1 with a traceback, a log begun
        check_settings()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if resume:
        sizes = {"--meta-batch": config.meta_batch}
        if getattr(config, "select_every", 0) and getattr(config, "select_tasks", None) is not None:
            sizes["--select-tasks"] = config.select_tasks
        for option, size in sizes.items():
            if size % workers.world_size:
                counts = [n for n in range(1, min(sizes.values()) + 1) if all(s % n == 0 for s in sizes.values())]
                shown = ", ".join(map(str, counts[:-1])) + f" or {counts[-1]}" if len(counts) > 1 else str(counts[0])
                raise ConfigError(f"--resume: the run's {option} {size} does not split evenly over {workers.world_size} "
                                  f"processes: continue it on {shown} processes")  # fmt: skip
    check_shares(config.meta_batch, workers)
    return workers


#: the configuration fields the ranks of one job may be given differently: where each reads the
#: data (compared by content instead, where the trainer reads data files) and the preset weight
#: file, and the device, of which only the kind (CPU or CUDA) must agree: collectives on CPU
#: tensors run on gloo, on CUDA tensors on NCCL
RANK_LOCAL_FIELDS: tuple[str, ...] = ("data", "preset", "device")


def run_identity(config: RunConfig, trainer: Trainer) -> dict[str, Any]:
    """What every rank of a job must run the same: the configuration but
    :data:`RANK_LOCAL_FIELDS`, the kind of device (``cpu`` or ``cuda``), the SHA-256 of the data
    files where the trainer reads some, and a fingerprint of the trainer's state (the
    meta-parameters a ``--preset`` or the resumed checkpoint gave it, and the meta-optimizer's
    state); and under ``"gpu"`` the GPU this rank runs on (:func:`gpu_identity`), which every rank
    must have of its own instead (see :func:`agree_checks`)."""
    identity = {k: v for k, v in config.to_dict().items() if k not in RANK_LOCAL_FIELDS}
    identity["device"] = torch.device(config.device).type
    identity["gpu"] = gpu_identity(config.device)
    identity["data_sha256"] = getattr(trainer, "data_sha256", None)
    identity["state"] = state_fingerprint(trainer.state_dict())
    return identity


def gpu_identity(device: str) -> str | None:
    """The UUID of the GPU that ``device`` (a checked ``--device``) runs on in this process
    (``cuda``: torch's current CUDA device), the same whichever GPUs the process sees and on
    whichever machine; None on the CPU. Where torch gives no UUID: the host and the GPU's PCI
    address (as unique), else the host and the index this process sees it at."""
    parsed = torch.device(device)
    if parsed.type != "cuda":
        return None
    index = torch.cuda.current_device() if parsed.index is None else parsed.index
    properties = torch.cuda.get_device_properties(index)
    uuid = getattr(properties, "uuid", None)  # absent from some builds
    if uuid is not None:
        return str(uuid)
    pci = [getattr(properties, f"pci_{part}_id", None) for part in ("domain", "bus", "device")]
    if None not in pci:
        return f"{socket.gethostname()}/pci:{pci[0]:04x}:{pci[1]:02x}:{pci[2]:02x}"
    return f"{socket.gethostname()}/cuda:{index}"


def state_fingerprint(state: Any) -> str:
    """SHA-256 (hex) of a nested state (mappings, sequences, tensors, plain values): tensors by
    dtype, shape and values wherever they are (so the same on CPU and any CUDA device)."""
    digest = hashlib.sha256()

    def add(value: Any) -> None:
        if isinstance(value, Tensor):
            flat = value.detach().to("cpu").contiguous().reshape(-1)
            digest.update(f"tensor {value.dtype} {tuple(value.shape)}:".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
        elif isinstance(value, Mapping):
            digest.update(f"dict {len(value)}:".encode())
            for key in sorted(value, key=repr):
                add(key)
                add(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(f"list {len(value)}:".encode())
            for item in value:
                add(item)
        elif isinstance(value, torch.device):
            digest.update(b"device")  # where a rank runs is its own (RANK_LOCAL_FIELDS)
        else:
            digest.update(f"{type(value).__name__} {value!r};".encode())

    add(state)
    return digest.hexdigest()


#: how a refusal names the entries of a run's identity that are no option
_IDENTITY_NAMES = {
    "data_sha256": "the data files' SHA-256",
    "start": "the meta-step the checkpoint in --out is at",
    "state": "the meta-parameters and meta-training state: a --preset or checkpoint of other content",
}


def _ranks(ranks: Sequence[int], world_size: int) -> str:
    return f"rank{'s' * (len(ranks) > 1)} {', '.join(map(str, ranks))} of {world_size}"


def agree_checks(workers: Workers, problem: ConfigError | None, identity: Mapping[str, Any] | None = None) -> None:
    """Make the ranks' checks of a run one verdict: a collective that every rank reaches once,
    with the refusal its own checks ended in (``problem``), else what it runs (``identity``, see
    :func:`run_identity`).

    A check can fail on some ranks only (a checkpoint or data files missing where ``--out`` or
    ``--data`` is not shared between machines), and rank 0 alone prints refusals: every rank
    raises the same :class:`ConfigError`, whose message is that of every failing rank (named by
    its ranks unless all failed alike), names the options the ranks were given differently, or
    the ranks that would share a GPU.
    One process: ``problem`` is raised as it is.
    """
    if workers.world_size == 1:
        if problem is not None:
            raise problem
        return
    reports = workers.gather((None if problem is None else str(problem), identity))
    failed: dict[str, list[int]] = {}
    for rank, (message, _) in enumerate(reports):
        if message is not None:
            failed.setdefault(message, []).append(rank)
    if failed:
        if len(failed) == 1 and len(next(iter(failed.values()))) == workers.world_size:
            message = next(iter(failed))
        else:
            message = "; ".join(f"{_ranks(ranks, workers.world_size)}: {m}" for m, ranks in failed.items())
        raise _agreed(ConfigError(message))
    identities = [dict(identity or {}) for _, identity in reports]
    by_gpu: dict[str, list[int]] = {}
    for rank, i in enumerate(identities):
        if i.get("gpu") is not None:
            by_gpu.setdefault(i["gpu"], []).append(rank)
        i.pop("gpu", None)  # a rank's own, unlike the rest
    differing = sorted({k for i in identities for k in i if any(j.get(k) != i.get(k) for j in identities)})
    if len(differing) > 1 and "state" in differing:  # other options make another state: name the cause
        differing.remove("state")
    if differing:
        shown = []
        for key in differing:
            by_value: dict[str, list[int]] = {}
            for rank, i in enumerate(identities):
                value = i.get(key)
                by_value.setdefault(value[:12] if key in ("data_sha256", "state") and value else repr(value), []).append(rank)
            name = _IDENTITY_NAMES.get(key, f"--{key.replace('_', '-')}")
            values = " vs ".join(f"{v} on {_ranks(r, workers.world_size).removesuffix(f' of {workers.world_size}')}"
                               for v, r in by_value.items())  # fmt: skip
            shown.append(f"{name}: {values}")
        raise _agreed(ConfigError(f"the ranks were given different options ({'; '.join(shown)}): every rank of a "
                                  "job must run the same configuration on the same data"))  # fmt: skip
    shared = {gpu: ranks for gpu, ranks in by_gpu.items() if len(ranks) > 1}
    if shared:
        clashes = "; ".join(f"{_ranks(ranks, workers.world_size)} would run on one GPU ({gpu})" for gpu, ranks in shared.items())
        raise _agreed(ConfigError(f"{clashes}: each rank needs a GPU of its own; under torchrun give --device cuda with "
                                  "at most one process per GPU; in a process group of your own call "
                                  "torch.cuda.set_device(local_rank) first"))  # fmt: skip


def _agreed(err: ConfigError) -> ConfigError:
    err.agreed = True  # type: ignore[attr-defined] - read by checks_agreed
    return err


@contextlib.contextmanager
def checks_agreed(workers: Workers, identity: Callable[[], Mapping[str, Any]] | None = None) -> Iterator[None]:
    """Run a run's checks; a :class:`ConfigError` they raise on any rank is agreed on
    (:func:`agree_checks`) and raised on every rank. With ``identity``, checks that pass end in
    the agreement too (with ``identity()``): the last checks before the run's first collective
    pass it, the earlier ones not, so that every rank agrees exactly once."""
    try:
        yield
    except ConfigError as err:
        if getattr(err, "agreed", False):
            raise
        agree_checks(workers, err)
        raise  # one process: agree_checks raised err already
    if identity is not None and workers.world_size > 1:  # one process agrees with itself: no fingerprint
        agree_checks(workers, None, identity())


def check_device(
    device: str,
    *,
    world_size: int = 1,
    local_rank: int | None = None,
    local_world_size: int | None = None,
    cuda_count: int | None = None,
) -> torch.device:
    """The device this process runs ``--device device`` on, one of ``world_size`` processes.

    ``cpu`` (``cpu:0``) is the CPU. One process runs ``cuda[:N]`` as given. Under several processes
    ``cuda`` is the GPU of the process's ``local_rank`` (where
    :func:`~learnedopt.meta.distributed.init_from_env` pinned it; with no local rank, as in a
    caller's own process group, torch's current CUDA device), and ``cuda:N`` is refused:
    ``torchrun`` gives every rank the same options, so every rank would run on GPU N. A process
    that sees one GPU only (a launcher that binds a GPU to each process through
    ``CUDA_VISIBLE_DEVICES``, as SLURM's ``--gpus-per-task=1``) runs ``cuda`` and ``cuda:0`` on it,
    whatever its local rank: ranks that would share a GPU that way (several processes on a
    one-GPU machine) are refused by :func:`agree_checks`, which compares the GPUs' UUIDs.

    Args:
        device: the ``--device`` value.
        world_size: number of processes of the job.
        local_rank: this process's index on its machine (``torchrun``'s ``LOCAL_RANK``).
        local_world_size: processes on this machine (``LOCAL_WORLD_SIZE``), for a refusal.
        cuda_count: CUDA devices this process sees (default: torch's count, 0 without CUDA).

    Raises:
        ConfigError: ``device`` is neither the CPU nor a CUDA device this process can use.
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu or cuda[:N], got {device!r}")
    if parsed.type == "cpu":
        if parsed.index not in (None, 0):  # torch runs any index on the one CPU device
            raise ConfigError(f"--device {device}: the CPU is one device, cpu or cpu:0; use --device cpu")
        return parsed
    if cuda_count is None:
        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cuda_count == 0:
        raise ConfigError(f"--device {device}: CUDA is not available to this torch ({torch.__version__})")
    if parsed.index is not None and parsed.index >= cuda_count:
        raise ConfigError(f"--device {device}: this machine has {cuda_count} CUDA device(s)")
    if world_size > 1 and cuda_count == 1:  # a GPU of its own, or shared: agree_checks tells
        return torch.device("cuda", 0)
    if world_size > 1:
        if parsed.index is not None:
            raise ConfigError(f"--device {device}: every one of the {world_size} processes would run on {device}; use "
                              "--device cuda, which runs each process on the GPU of its local rank")  # fmt: skip
        if local_rank is None:
            return parsed
        if local_rank >= cuda_count:  # init_from_env pinned this rank to no GPU
            processes = "more" if local_world_size is None else local_world_size
            raise ConfigError(f"--device {device}: local rank {local_rank} has no CUDA device of its own (this "
                              f"machine has {cuda_count} for {processes} processes): start at most {cuda_count} "
                              f"process{'es' * (cuda_count > 1)} per machine (--nproc_per_node) or use --device cpu")  # fmt: skip
        return torch.device("cuda", local_rank)
    return parsed


def check_shares(meta_batch: int, workers: Workers) -> None:
    """Raise :class:`ConfigError` unless the meta-batch splits evenly over the ranks."""
    try:
        workers.share(meta_batch)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_checkpoint_every(checkpoint_every: int) -> None:
    """Raise :class:`ConfigError` unless ``checkpoint_every`` is a positive integer."""
    if checkpoint_every < 1:
        raise ConfigError(f"--checkpoint-every must be a positive integer, got {checkpoint_every}")


def check_select_every(select_every: int) -> None:
    """Raise :class:`ConfigError` unless ``select_every`` is a non-negative integer."""
    if select_every < 0:
        raise ConfigError(f"--select-every must be a non-negative integer (0: no selection), got {select_every}")


class Selection:
    """``--select-every N``: the best-scoring weights of a run, for a trainer to save instead of
    its last ones.

    After every ``N``-th meta-step and the last, :meth:`after_step` scores the current learner
    (and, the first time, the initial one, as meta-step 0) and keeps a copy of its weights when
    the score is the lowest so far: the earliest wins a tie, and a non-finite score counts as
    ``inf``, so that any finite one beats it. The trainer puts :meth:`state_dict` in its
    checkpoint, so a resumed run selects as an uninterrupted one does. Scoring must not touch the
    training's randomness or state, so that selection does not change the training.

    Args:
        every: ``N``; 0 turns selection off (:meth:`after_step` does nothing).
        score: the learner's score, lower is better; every rank must return the same number.
        snapshot: a copy of the learner's weights (a dict of tensors).
    """

    def __init__(self, every: int, score: Callable[[Any], float], snapshot: Callable[[Any], dict[str, Tensor]]) -> None:
        self.every, self.score, self.snapshot = every, score, snapshot
        #: once scored: ``{"step", "score", "weights"}`` of the best learner so far
        self.best: dict[str, Any] | None = None
        self.initial_score: float | None = None

    def after_step(self, step: int, last_step: int, learner: Any, initial: Callable[[], Any]) -> dict[str, float]:
        """Score ``learner`` after meta-step ``step`` when due; returns the log fields:
        ``select_loss`` (its score), with ``select_loss_initial`` the first time (the initial
        learner's, scored then), or nothing when not due."""
        if not self.every or (step % self.every and step != last_step):
            return {}
        fields = {}
        if self.best is None:
            self.initial_score = fields["select_loss_initial"] = self._offer(0, initial())
        return {**fields, "select_loss": self._offer(step, learner)}

    def _offer(self, step: int, learner: Any) -> float:
        score = float(self.score(learner))
        score = score if math.isfinite(score) else math.inf
        if self.best is None or score < self.best["score"]:
            self.best = {"step": step, "score": score, "weights": self.snapshot(learner)}
        return score

    def restore_best(self, load: Callable[[dict[str, Tensor]], None], last_step: int) -> int:
        """Hand the best weights to ``load`` and return their meta-step (0: the initial ones);
        without selection load nothing and return ``last_step``."""
        if self.best is None:
            return last_step
        load(self.best["weights"])
        return int(self.best["step"])

    def header_fields(self) -> dict[str, Any]:
        """What a weight file's header records of the selection (empty without it)."""
        if self.best is None:
            return {}
        return {"selected_step": int(self.best["step"]), "select_loss": self.best["score"],
                "select_loss_initial": self.initial_score}  # fmt: skip

    def card_note(self, meta_steps: int, scored_on: str) -> str:
        """The model card's paragraph on which weights were kept (empty without selection);
        ``scored_on`` says what the score is."""
        if self.best is None:
            return ""
        step = int(self.best["step"])
        which = "the initial ones" if step == 0 else f"those after meta-step {step} of {meta_steps}"
        return (
            f"\n\nThese weights are {which}: the best-scoring of those scored every {self.every} "
            f"meta-steps (and before the first and at the last) by {scored_on} (`select_loss` in the "
            f"log, `select_loss_initial` for the initial ones), where they scored {self.best['score']:.6g}, "
            f"the initial ones {self.initial_score:.6g} (`--select-every {self.every}`)."
        )

    def state_dict(self) -> dict[str, Any]:
        """The best learner so far (step, score, weights) and the initial score, for a checkpoint."""
        return {"best": self.best, "initial_score": self.initial_score}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Load :meth:`state_dict`'s output (None: nothing scored yet)."""
        self.best = None if state is None else state["best"]
        self.initial_score = None if state is None else state["initial_score"]


def refuse_options(
    args: argparse.Namespace, names: Sequence[str], context: str, owners: str
) -> None:
    """Raise :class:`ConfigError` for the first option in ``names`` that was given (not None):
    it does not apply in ``context`` (e.g. ``"--algo lstm"``); ``owners`` says where it does."""
    for name in names:
        if getattr(args, name, None) is not None:
            raise ConfigError(
                f"--{name.replace('_', '-')} does not apply to {context}; it is an option of {owners}"
            )


class OutputLock:
    """An exclusive lock on a run's ``--out`` folder while a process writes to it, so that a
    second run there (a ``--resume`` of a run thought dead, a job launched twice) is refused
    before it writes anything: two writers would rewrite the log under each other, losing
    records, and write the same temporary files.

    It is ``flock`` on the folder, which the OS releases when the process ends, killed or not,
    so no stale lock outlives a run. Where there is no such lock (Windows, a network filesystem
    that refuses it) runs are not locked. Use it as a context manager around the whole run
    (:func:`train_loop` acquires it once the folder exists; the final files are written after).
    ``command`` names what runs there in the refusal (``evaluate optimizers`` locks its records folder).
    """

    def __init__(self, command: str = "meta-train") -> None:
        self._fd: int | None = None
        self.command = command

    def acquire(self, out: Path) -> None:
        """Lock the existing folder ``out``.

        Raises:
            ConfigError: another process holds it.
        """
        try:
            import fcntl
        except ImportError:  # Windows
            return
        fd = os.open(out, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"{out} is in use by another {self.command} process (a run there, or its --resume, is still "
                "running); wait for it to end or stop it, then --resume"
            ) from None
        except OSError:  # a filesystem without flock: run unlocked
            os.close(fd)
            return
        self._fd = fd

    def release(self) -> None:
        """Unlock the folder (nothing when not locked)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> OutputLock:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _start_file(config: RunConfig) -> str | None:
    """The weight file a run's ``--preset`` names (None: no ``--preset``, or a preset's name)."""
    preset = getattr(config, "preset", None)
    return None if preset is None or preset in PRESETS else preset


def resumable_config(config: C, out: Path, resume: bool) -> C:
    """``config`` as a run in ``out`` builds its rule from: on ``--resume``, with its ``--preset``
    weight file read from the copy the run keeps in ``out`` (:data:`START_NAME`, written by
    :func:`train_loop`), so that the file may have moved or changed since the run began. The
    checkpoint is still compared with ``config`` itself, and the files record ``config``.

    Raises:
        ConfigError: ``--resume`` of a run that keeps no copy (begun before runs kept one) whose
            ``--preset`` file, the one the run recorded, is gone.
    """
    start = _start_file(config)
    if not resume or start is None:
        return config
    copy = out / START_NAME
    if copy.is_file():
        return dataclasses.replace(config, preset=str(copy))
    if not Path(start).is_file() and (out / CHECKPOINT_NAME).is_file() and _began_from(out, start):
        raise ConfigError(
            f"--resume: the run's --preset {start} is gone and {out} keeps no copy of it (the run began before "
            "runs kept one): put the file back at that path"
        )
    return config


def _began_from(out: Path, preset: str) -> bool:
    """Whether the run in ``out`` recorded ``--preset preset`` (the same path, relative or
    absolute): in :data:`CONFIG_NAME`, else in its checkpoint; True where neither can be read
    (the later checks say what is wrong with them). Another ``--preset`` that names nothing is
    not the run's file gone, but an unknown preset, refused as such when the rule is built."""
    try:
        record = json.loads((out / CONFIG_NAME).read_text(encoding="utf-8"))["config"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError):
        try:
            record = _load(out / CHECKPOINT_NAME)["config"]
        except Exception:  # noqa: BLE001 - a damaged checkpoint is reported when it is loaded
            return True
    recorded = record.get("preset") if isinstance(record, dict) else None
    return isinstance(recorded, str) and os.path.abspath(recorded) == os.path.abspath(preset)


def train_loop(
    config: RunConfig,
    trainer: Trainer,
    out: Path,
    *,
    checkpoint_every: int,
    resume: bool,
    max_steps: int | None,
    progress: bool,
    hint: str = "lower --meta-lr or --clip",
    workers: Workers = SINGLE,
    lock: OutputLock | None = None,
) -> tuple[int, list[dict[str, Any]]]:
    """Run ``trainer``'s meta-steps up to ``config.meta_steps`` (or ``max_steps``), with the log,
    the progress bar and the atomic checkpoints (every ``checkpoint_every`` steps and at the end).

    ``out`` is created only once the configuration has passed every check, so a refused run
    leaves nothing behind. A ``--preset`` weight file (``config.preset``, where the config has one)
    is copied into it (:data:`START_NAME`; see :func:`resumable_config`). With ``resume``, the trainer's state and the step come from
    ``out/checkpoint.pt`` and log lines after that step are dropped (they are run again). A run
    that starts from meta-step 0 records ``config`` (:data:`CONFIG_NAME`) once its log exists; a
    ``resume`` is refused unless ``config`` is found to be that record's (and the checkpoint's)
    but in the settings a resume may change, and of a run with a log and no checkpoint yet it
    starts the run again.

    With several ``workers`` every rank runs the steps (the trainer shares the work out) and
    reads the checkpoint on resume; rank 0 alone writes the log, the checkpoints and the
    progress. The ranks agree on the checks (:func:`checks_agreed`: a refusal on any rank, or
    ranks given different options, stops every rank), and meet at a barrier after them, so no rank
    sees files that another rank has just started writing. Rank 0 acquires ``lock`` (an :class:`OutputLock` the caller
    releases after writing the final files) once ``out`` exists, before writing anything.

    Returns:
        ``(step, log)``: the last meta-step completed and the records this call wrote.

    SIGTERM (where nothing else handles it) lets the meta-step in progress finish, checkpoints
    it and raises :class:`RunTerminated`; Ctrl-C stops at once and raises :class:`RunInterrupted`.

    Raises:
        ConfigError: an existing run without ``resume``, a checkpoint that does not fit, a
            folder another process is writing to, or a non-finite meta-loss (the message ends
            with ``hint``).
        RunTerminated: SIGTERM arrived; the checkpoint holds the last meta-step.
        RunInterrupted: Ctrl-C during the meta-steps.
        RunWriteError: the log, a checkpoint or ``config.json`` cannot be written (a full disk).
    """
    start = 0
    checkpoint_path, log_path = out / CHECKPOINT_NAME, out / LOG_NAME
    # every rank checks; a refusal on any rank stops every rank (its message printed by rank 0)
    with checks_agreed(workers, lambda: {**run_identity(config, trainer), "start": start}):
        # a symlink to a checkpoint or log that is gone (kept on another disk, unmounted) is not
        # "no checkpoint yet" or "no log": --resume started such a run again from meta-step 0, or
        # replaced its log with the meta-steps after the checkpoint alone
        for path, what in ((checkpoint_path, "checkpoint"), *([(log_path, "log")] if resume else [])):
            if path.is_symlink() and not path.exists():
                raise ConfigError(f"{'--resume: ' if resume else ''}{path} is a symlink to {os.readlink(path)}, which does "
                                  f"not exist: put the {what} back there and --resume, or start over in another --out")  # fmt: skip
        if resume and not checkpoint_path.exists() and (lost := _lost_checkpoint(out)) is not None:
            raise ConfigError(lost)
        # killed before its first checkpoint: nothing to continue from, nothing to lose by running it
        # again from the start (said once the folder is this run's, below)
        started_only = resume and not checkpoint_path.exists() and log_path.is_file()
        if started_only:  # started again, but as the run it continues
            _check_begun_config(out, config, trainer)
        if resume and not started_only:
            payload = _load_checkpoint(checkpoint_path, config)
            _check_checkpoint_is_the_runs(out, config)
            try:
                trainer.load_state_dict(payload)
            except ConfigError:  # the trainer's own one-line refusal
                raise
            except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as err:
                raise ConfigError(f"--resume: {checkpoint_path} does not hold this run's state ({type(err).__name__}: "
                                  f"{one_line(err)})") from None  # fmt: skip
            start = int(payload["step"])
        elif not resume:
            held = [name for name in (CHECKPOINT_NAME, LOG_NAME, *RESULT_NAMES) if (out / name).exists()]
            if held:
                how = (" (it stopped before its first checkpoint: --resume starts it again)"
                       if held == [LOG_NAME] and not _lost_checkpoint(out, quiet=True) else "")  # fmt: skip
                raise ConfigError(
                    f"{out} already holds a run ({', '.join(held)}); pass --resume to continue it{how} or choose another --out"
                )
    if workers.is_main:
        try:
            create_output_folder(out)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if lock is not None:
            lock.acquire(out)
        start_file = _start_file(config)
        if start_file is not None and not (resume and (out / START_NAME).is_file()):
            # read by --resume in place of the file, which may have moved by then
            with writing(out / START_NAME):
                write_atomically(out / START_NAME, lambda tmp: shutil.copyfile(start_file, tmp))
    workers.barrier()
    if workers.is_main and started_only:
        print(f"--resume: {out} has a log but no checkpoint yet (the run stopped before its first); "
              "starting it again from meta-step 0", file=sys.stderr)  # fmt: skip
    if workers.is_main and resume:
        _truncate_log(log_path, start)

    stop = config.meta_steps if max_steps is None else min(config.meta_steps, max_steps)
    log: list[dict[str, Any]] = []
    running = None
    bar = _Progress(start, config.meta_steps, progress and workers.is_main)
    if resume and start and progress and workers.is_main:
        print(f"--resume: {out} has run all its {start} meta-steps; writing its results again" if start == config.meta_steps
              else f"--resume: continuing {out} from its checkpoint at meta-step {start}", file=sys.stderr)  # fmt: skip
    # the checkpoint on disk (None: none yet) and whether one is being written, for Ctrl-C's message
    saved, saving, step = (start or None), False, start + 1
    try:
        # unbuffered: a line is on disk before the next meta-step, and a write that fails (a full
        # disk) leaves nothing in a buffer for the file's close to fail on again; a log that cannot
        # be created (a read-only folder) is the one line of any file that cannot be written
        with writing(log_path):
            log_file = open(log_path if workers.is_main else os.devnull, "ab", buffering=0)  # noqa: SIM115 - closed below
        with log_file, _catch_sigterm() as term:
            if workers.is_main and start == 0:  # after the log exists: a kill while writing it leaves a run to start again
                _write_begun_config(out, config, trainer)
            for step in range(start + 1, stop + 1):
                began = time.perf_counter()
                try:
                    fields = trainer.step(step)
                except FloatingPointError as err:
                    if step == 1 and not isinstance(err, AfterMetaUpdates):  # no meta-update yet: the task or the inner settings diverge
                        raise ConfigError(
                            f"meta-step 1: {err}; the meta-parameters are still the initial ones, so lower the "
                            "optimizee's step size (--lr, --inner-lr) or check the task"
                        ) from None
                    raise ConfigError(f"meta-step {step}: {err}; {hint}") from None
                record = {"step": step, **fields, "seconds": round(time.perf_counter() - began, 4)}
                if (peak := peak_rss_mb()) is not None:
                    record["peak_rss_mb"] = peak
                # the ranks stop together: a rank that stopped alone would leave the others waiting
                # in a collective (one more per meta-step, under torchrun only)
                terminating = workers.any(term.requested)
                checkpointing = step % checkpoint_every == 0 or step == config.meta_steps or terminating
                if checkpointing:  # written before the checkpoint: a later line proves it written
                    record[CHECKPOINT_FIELD] = True
                log.append(record)
                with writing(log_path):
                    _write_all(log_file, (json.dumps(record) + "\n").encode())
                running = (
                    record["meta_loss"]
                    if running is None
                    else 0.9 * running + 0.1 * record["meta_loss"]
                )
                bar.update(record, running)
                if workers.is_main and checkpointing:
                    saving = True
                    _save_checkpoint(checkpoint_path, config, trainer.state_dict(), step)
                    saved, saving = step, False
                if terminating:
                    bar.close()
                    raise RunTerminated(terminated_message(out, step, config.meta_steps))
            # SIGTERM after the last meta-step's check (while its checkpoint was written) stops the
            # run here, before its final evaluation, as it would have one meta-step earlier
            if stop == config.meta_steps and workers.any(term.requested):
                bar.close()
                raise RunTerminated(terminated_message(out, stop, config.meta_steps))
    except KeyboardInterrupt:
        bar.close()
        raise RunInterrupted(interrupted_message(out, step, config.meta_steps, saved, saving)) from None
    bar.close()
    return max(start, stop), log


#: log fields that measure the machine, not the run (they differ between a run and its resumption)
MACHINE_FIELDS: tuple[str, ...] = ("seconds", "peak_rss_mb")
#: the log field (``true``, else absent) of a meta-step the run checkpointed: written before that
#: checkpoint, so a record after it proves the checkpoint was written (:func:`_lost_checkpoint`)
CHECKPOINT_FIELD = "checkpoint"


def _lost_checkpoint(out: Path, *, quiet: bool = False) -> str | None:
    """Why ``out``, which lacks its checkpoint, must have held one, as ``--resume``'s one-line
    refusal (None: it need not have). Its run wrote one where its results are there (written
    after the last checkpoint) or its log goes on past a meta-step it records as checkpointed
    (:data:`CHECKPOINT_FIELD`: the run's own record, whatever ``--checkpoint-every`` the resume is
    given), a record or a line cut short after it; without it such a run could only start again from meta-step 0, replacing its log and
    results. A log whose last record alone is checkpointed is a run killed while writing that
    checkpoint, its first (the atomic write left none): nothing is lost by starting again.

    Raises:
        ConfigError: a damaged log (:func:`_read_log`), unless ``quiet`` (then None).
    """
    results = [name for name in RESULT_NAMES if (out / name).exists()]
    if results:
        evidence = f"its results are there: {', '.join(results)}"
    else:
        try:
            records, cut = _read_log_and_cut(out / LOG_NAME)
        except ConfigError:
            if quiet:
                return None
            raise
        # a line cut short is the next step's, begun after the checkpoint of the one before
        followed = records if cut else records[:-1]
        checkpointed = [r["step"] for r in followed if r.get(CHECKPOINT_FIELD) is True]
        if not checkpointed:
            return None
        evidence = f"{out / LOG_NAME} goes on past its checkpointed meta-step {max(checkpointed)}"
    return (f"--resume: {out / CHECKPOINT_NAME} is missing, but the run wrote it ({evidence}): put it back, "
            "or start over in another --out without --resume")  # fmt: skip


def peak_rss_mb() -> float | None:
    """This process's peak resident memory so far, in MiB (None where the OS does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def last_record(out: Path, log: list[dict[str, Any]], step: int) -> dict[str, Any]:
    """The log record of meta-step ``step``, the last (from ``log``, else from ``out/log.jsonl``).

    Raises:
        ConfigError: ``out/log.jsonl`` lacks it (cut or edited: a kill never loses a checkpointed
            step's record, which is written first), so the results cannot report its meta-loss.
    """
    if log:
        return log[-1]
    path = out / LOG_NAME
    for record in _read_log(path):
        if record["step"] == step:
            return record
    raise ConfigError(f"--resume: {path} lacks the record of meta-step {step}, the last, whose meta-loss the results "
                      "report: restore the log, or run the command again without --resume in another --out")  # fmt: skip


# ----------------------------------------------------------------------------- checkpoints, log
def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _save_checkpoint(
    path: Path, config: RunConfig, state: Mapping[str, Any], step: int
) -> None:
    """Write the checkpoint (a trainer's ``state`` plus step and config) atomically: a temporary
    file, then ``os.replace``."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "config": config.to_dict(),
        **state,
        # Every generator is re-derived from (seed, key) when used, so the seed is the whole
        # RNG state; recorded explicitly so that a reader need not know the scheme.
        "rng": {
            "scheme": "torch.Generator per use, seeded by derive_seed(seed, key)",
            "seed": config.seed,
        },
    }
    # serialised in memory, then written by Python: torch's own file writer reports a full disk
    # as "[enforce fail at inline_container.cc:672] . unexpected pos ...", not the OS's error
    data = io.BytesIO()
    torch.save(payload, data)
    with writing(path):
        write_atomically(path, lambda tmp: tmp.write_bytes(data.getbuffer()))


def _write_all(file: Any, data: bytes) -> None:
    """Write ``data`` to the unbuffered binary ``file``, which may take part of it per call."""
    view = memoryview(data)
    while view:
        view = view[file.write(view):]


def _load_checkpoint(path: Path, config: RunConfig) -> dict[str, Any]:
    """The checkpoint's payload, once its format and config are checked against ``config``."""
    if path.exists() and not path.is_file():  # a folder (or a device, a pipe) under the checkpoint's name
        kind = "a folder" if path.is_dir() else "a device, pipe or socket"
        raise ConfigError(f"--resume: {path} is not a file ({kind}), so it holds no checkpoint to continue from: "
                          "move it away and put the run's checkpoint there")  # fmt: skip
    if not path.is_file():
        raise ConfigError(f"--resume: no checkpoint at {path}, nor a log: nothing to continue; run the command without --resume")
    # torch.save writes a zip archive with a CRC-32 per entry, which torch.load does not check:
    # a damaged tensor would load, and the run resume from its wrong values
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except PermissionError as err:  # whole, perhaps: "damaged" would invite deleting it
        raise ConfigError(f"--resume: cannot read {path} ({err.strerror}): give this user read access to it, "
                          "then --resume") from None  # fmt: skip
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise ConfigError(f"--resume: cannot read {path}: not a complete checkpoint (cut short or damaged: {err})") from None
    if damaged is not None:
        raise ConfigError(f"--resume: {path} is damaged: its entry {damaged} fails its CRC-32 check")
    try:
        payload = _load(path)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line report
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"--resume: cannot read {path}: {first_line}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("config"), dict) or "step" not in payload:
        raise ConfigError(f"--resume: {path} is not a learnedopt meta-train checkpoint (no config and step)")
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(
            f"--resume: {path} has checkpoint format {payload.get('format')!r}, expected {CHECKPOINT_FORMAT}"
        )
    # a run checkpoints after a meta-step, 1 the first: another step (an edited file) resumed from
    # there with the checkpoint's weights, and True as meta-step 1
    step = payload["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise ConfigError(f"--resume: {path} records meta-step {step!r}, which no run checkpoints (a whole number "
                          "from 1): the checkpoint is damaged or edited")  # fmt: skip
    _refuse_other_config(payload["config"], config, path.parent, f"{path} is a checkpoint", "the checkpoint's")
    if step > config.meta_steps:
        raise ConfigError(f"--resume: {path} is at meta-step {step}, beyond --meta-steps {config.meta_steps}")
    return payload


def _refuse_other_config(
    saved_config: Mapping[str, Any], config: RunConfig, out: Path, holder: str, whose: str, advice: str = ""
) -> None:
    """Raise :class:`ConfigError` where ``config`` is not the configuration the run in ``out``
    recorded (``saved_config``, a checkpoint's or :data:`CONFIG_NAME`'s) but in the settings a
    resume may change (the data folder, the device and, unless
    :attr:`RunConfig.meta_steps_shape_the_run`, ``meta_steps``), compared as
    :meth:`RunConfig.same_run_dict` gives them, and a ``preset`` weight file named by another
    path (:func:`_same_start`). ``holder`` names the record in
    the refusal of another ``--algo`` (e.g. ``"PATH is a checkpoint"``), ``whose`` in that of
    changed settings (e.g. ``"the checkpoint's"``); ``advice`` ends the latter."""
    current = config.to_dict()
    # another algorithm's checkpoint differs in most settings: name the one that matters
    # (MetaTrainConfig, the configuration of --algo lstm, has no "algo")
    algos = saved_config.get("algo", "lstm"), current.get("algo", "lstm")
    if algos[0] != algos[1]:
        raise ConfigError(f"--resume: {holder} of --algo {algos[0]}, not --algo {algos[1]}: "
                          "resume it with its own --algo, or choose another --out")  # fmt: skip
    # A field added to RunConfig after the record was written is absent from it; the old
    # run behaved as the field's default does, so the default is what it is compared with.
    defaults = {
        f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING
    }
    saved = {**defaults, **saved_config}
    # read back through the config class, which makes equal what it takes as equal (a rule_config
    # of {}, recorded so before it became None), both in the form that makes equal the settings
    # that run the same (RunConfig.same_run_dict); fields the record lacks stay absent
    try:
        built = dataclasses.replace(config, **{k: v for k, v in saved.items() if k in current}).same_run_dict()
    except (TypeError, ValueError):  # values no config holds: compared as recorded
        built = {}
    saved |= {k: v for k, v in built.items() if k in saved}
    current = config.same_run_dict()
    # what changes no finished step: where the data is read, the device, and mostly the length
    resumable = ("data", "device") if config.meta_steps_shape_the_run else ("meta_steps", "data", "device")
    changed = sorted(k for k in current if k not in resumable and saved.get(k) != current[k])
    if "preset" in changed and _same_start(out, saved.get("preset"), current["preset"]):
        changed.remove("preset")
    if changed:
        # each field is the option of the same name
        shown = ", ".join(f"--{k.replace('_', '-')}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
        why = ("; --meta-steps is fixed once a run anneals over it (reptile) or scores its last step (--select-every)"
               if "meta_steps" in changed else "")  # fmt: skip
        raise ConfigError(f"--resume: the configuration differs from {whose} ({shown}){why}{advice}")


def _same_start(out: Path, saved: Any, given: Any) -> bool:
    """Whether ``--preset given`` on a resume names the weight file the run in ``out`` began from
    as ``--preset saved`` by another path (absolute for relative, ``./`` before it, a copy of
    it): ``given`` holds the bytes of the copy the run keeps (:data:`START_NAME`), or, for a run
    begun before runs kept one, both are paths to one file."""
    if not (isinstance(saved, str) and isinstance(given, str)) or PRESETS.keys() & {saved, given}:
        return False
    if not Path(given).is_file():
        return False
    kept = out / START_NAME
    try:
        if kept.is_file():
            return filecmp.cmp(kept, given, shallow=False)
        return Path(saved).is_file() and os.path.samefile(saved, given)
    except OSError:
        return False


def _write_begun_config(out: Path, config: RunConfig, trainer: Trainer) -> None:
    """Record ``config`` in ``out`` (:data:`CONFIG_NAME`, atomically), as the run begins, with
    the SHA-256 of the data files ``trainer`` read (its ``data_sha256``, where it has one)."""
    record = {"format": CHECKPOINT_FORMAT, "config": config.to_dict(), "data_sha256": getattr(trainer, "data_sha256", None)}
    write_text_atomic(out / CONFIG_NAME, json.dumps(record, indent=1, sort_keys=True) + "\n")


def _check_begun_config(out: Path, config: RunConfig, trainer: Trainer) -> None:
    """Raise :class:`ConfigError` where ``config`` is not the configuration the run in ``out``,
    which has no checkpoint yet, began with (:data:`CONFIG_NAME`; not checked for a run begun
    before runs recorded it, or killed while writing it), but in the settings a resume may
    change (:func:`_refuse_other_config`), or ``trainer`` read other data files than the run
    (:func:`refuse_other_data`; ``trainer.data_kind`` names them)."""
    path = out / CONFIG_NAME
    if not path.is_file():
        return
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"--resume: cannot read {path}: {one_line(err)}") from None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise ConfigError(f"--resume: {path} is not a learnedopt meta-train configuration (no config)")
    _refuse_other_config(record["config"], config, out, f"the run in {out} is one", f"the one the run in {out} began with",
                         "; it stopped before its first checkpoint: resume it as it began, or start over in another "
                         "--out without --resume")  # fmt: skip
    refuse_other_data(record.get("data_sha256"), getattr(trainer, "data_sha256", None),
                      getattr(trainer, "data_kind", "data files"), getattr(config, "data", None), f"the run in {out}")  # fmt: skip


def _check_checkpoint_is_the_runs(out: Path, config: RunConfig) -> None:
    """Raise :class:`ConfigError` where the run in ``out`` began (:data:`CONFIG_NAME`) with other
    settings than ``config``, which its checkpoint was found to hold, but in those a resume may
    change: the checkpoint is another run's, copied in, and resuming it would append that run's
    meta-steps to this one's log. Not checked where the record is missing or unreadable (a run
    begun before runs recorded it): the checkpoint, whole and of this command, is resumed."""
    path = out / CONFIG_NAME
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        return
    _refuse_other_config(record["config"], config, out, f"the run in {out} is one", f"the one the run in {out} began with",
                         f"; {out / CHECKPOINT_NAME} is another run's: put this run's back, or continue that run in "
                         "its own --out")  # fmt: skip


def _read_log(path: Path) -> list[dict[str, Any]]:
    """The log's records. A last line cut short (a run killed while writing it) is dropped: it
    is a meta-step after the last checkpoint, run again on resume."""
    return _read_log_and_cut(path)[0]


def _read_log_and_cut(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """:func:`_read_log`'s records, and whether a last line cut short was dropped.

    Raises:
        ConfigError: the log cannot be read (no read access), or a line before the last is not a record.
    """
    if not path.is_file():
        return [], False
    # bytes that are not UTF-8 (an OS crash's garbage in the last line) are a line that is not a
    # record, like any other, not a UnicodeDecodeError
    try:
        data = path.read_bytes()
    except OSError as err:  # read by --resume alone
        advice = ": give this user read access to it, then --resume" if isinstance(err, PermissionError) else ""
        raise ConfigError(f"--resume: cannot read {path} ({err.strerror or one_line(err)}){advice}") from None
    text = data.decode("utf-8", errors="replace")
    lines = [line for line in text.splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                return records, True
            raise ConfigError(f"{path}: line {number} is not a log record (the log is damaged)") from None
        # valid JSON but no meta-step's record: an edited log, never a kill's partial line
        if not (isinstance(record, dict) and type(record.get("step")) is int):
            raise ConfigError(f"{path}: line {number} is not a log record (no integer \"step\"; the log is damaged)")
        records.append(record)
    return records, False


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines of meta-steps after the checkpoint (they will be run again); warn when
    records up to the checkpoint are missing (a deleted or cut log: the run still resumes)."""
    kept = [r for r in _read_log(path) if r["step"] <= step]
    if [r["step"] for r in kept] != list(range(1, step + 1)):
        print(f"warning: {path} lacks records of meta-steps up to the checkpoint's ({step}); "
              "the resumed run appends to what is there", file=sys.stderr)  # fmt: skip
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


# ----------------------------------------------------------------------------- progress, card
class _Progress:
    """A tqdm bar with the running meta-loss when tqdm is installed, else one stderr line per step."""

    def __init__(self, done: int, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.bar = total, enabled, None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(initial=done, total=total, desc="meta-train", unit="meta-step")

    def update(self, record: dict[str, Any], running: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(meta_loss=f"{record['meta_loss']:.4g}", running=f"{running:.4g}")
            self.bar.update(1)
        elif self.enabled:
            others = "  ".join(
                f"{k} {v:.4g}"
                for k, v in record.items()
                if k not in ("step", "meta_loss", "seconds", "meta_updates", CHECKPOINT_FIELD)
            )
            print(
                f"meta-step {record['step']}/{self.total}  meta-loss {record['meta_loss']:.4g}  "
                f"running {running:.4g}  {others}  {record['seconds']:.2f}s",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def processes_note(processes: int) -> str:
    """The model card's note on a run spread over several ``torchrun`` processes ('' for one)."""
    if processes == 1:
        return ""
    return (f" It ran on {processes} processes under `torchrun` (the command below, launched with "
            f"`torchrun --nproc_per_node={processes} -m learnedopt.meta.train ...`); the result does not "
            "depend on the number of processes beyond the order of floating-point sums.")  # fmt: skip


def model_card(
    title: str, intro: str, command: str, settings: dict[str, Any], details: str, data: str, metrics: str
) -> str:
    """The Markdown model card every ``meta-train`` run writes (one layout for every algorithm)."""
    rows = "\n".join(markdown.row([markdown.code(k), markdown.code(repr(v))]) for k, v in settings.items())
    return f"""# {title}

Trained with `learnedopt meta-train` (learnedopt {_version()}).{intro}

## Command

```
{command}
```

## Configuration

| setting | value |
|---|---|
{rows}

{details}

## Data

{data}

## Final metrics

{metrics}
"""


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``.

    Raises:
        RunWriteError: it cannot be written.
    """
    with writing(path):
        write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _version() -> str:
    return __version__
