"""Saving, loading and naming the meta-parameters of update rules.

A weight file is a safetensors file (no pickle: loading never executes code) whose metadata holds
one JSON header under the key ``"learnedopt"``::

    {"format": 1, "kind": "CoordinateLSTM", "config": {...}, "preset": "l2l-2016" | null,
     "library_version": "0.1.0", "trained_on": "..." | null, "trained": true | false,
     "rule_class": "package.module:Class" (a rule of your own whose class imports by that name), ...}
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import reprlib
import stat
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from .files import write_atomically
from .nn import RULES, CoordinateLSTM, MetaLSTMCell, UpdateRule
from .plugins import entry_point_path
from .version import __version__

FORMAT_VERSION = 1
#: the library's rule kinds, whose classes every process has
LIBRARY_KINDS = (CoordinateLSTM.kind, MetaLSTMCell.kind)
_HEADER_KEY = "learnedopt"
#: the keys of a weight file's header that save_weights writes itself (``extra=`` may not)
RESERVED_HEADER_KEYS = ("format", "kind", "config", "rule_class", "preset", "library_version", "trained_on", "trained")
MODEL_HEADER_KEY = "learnedopt_model"  # a few-shot model file's (learnedopt.meta.fewshot)
#: each of the library's file formats by its header key, for an error naming the file given
#: where the other format is expected
FILE_FORMATS = {
    _HEADER_KEY: "an update rule's weight file (weights.safetensors of meta-train --algo lstm)",
    MODEL_HEADER_KEY: "a few-shot model file (model.safetensors of meta-train --algo maml, fomaml, reptile "
    "or meta-lstm); a meta-lstm model's learned update is learnedopt.meta.fewshot.load_learner(path)[0].rule, "
    "which save_weights writes as a weight file",
}


class UntrainedWeightsWarning(UserWarning):
    """The chosen update rule has not been meta-trained."""


@dataclass(frozen=True)
class Preset:
    """A named update rule: its architecture and, when trained, its shipped weight file.

    Attributes:
        name: what ``weights=`` accepts.
        kind: the update rule class (``UpdateRule.kind``).
        config: architecture overrides for that class.
        file: file name in ``learnedopt/pretrained/``, or None for an untrained rule built by the
            class's deterministic initialisation (seeded with ``seed``).
        description: one line for ``learnedopt presets``.
        sha256: for a shipped file, the SHA-256 of its weights (:func:`fingerprint`), checked at
            each load: safetensors holds no checksum, so a file damaged on disk would load as
            other, finite weights under the preset's name.
    """

    name: str
    kind: str
    config: dict[str, Any]
    description: str
    file: str | None = None
    seed: int = 0
    sha256: str | None = None


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "l2l-2016",
            CoordinateLSTM.kind,
            {},
            "Andrychowicz et al. 2016: 2-layer LSTM, hidden 20, p=10, output scale 0.1. "
            "Untrained: initialised as sign descent with momentum (lr 0.01).",
        ),
        Preset(
            "meta-lstm-2017",
            MetaLSTMCell.kind,
            {},
            "Ravi & Larochelle 2017 meta-learner, hidden 20. Untrained: initialised by the paper's rule "
            "(forget gate near 1, small input gate; biases U(4, 6) and U(-5, -4), as the common PyTorch port), "
            "which acts as gradient descent with step ~0.014 and weight decay ~0.009 per step.",
        ),
        Preset(
            "meta-lstm-adam",
            MetaLSTMCell.kind,
            {"momentum_decay": 0.9, "rms_decay": 0.999, "forget_bias_init": (9.0, 11.0), "input_bias_init": (-4.0, -3.5)},
            "MetaLSTMCell whose cell writes Adam's direction (momentum 0.9, RMS 0.999, bias-corrected), "
            "hidden 20. Untrained: forget bias U(9, 11), input bias U(-4, -3.5) (seed 0: 9.72, -3.62), so it starts as Adam "
            "with a step of 0.026 and a weight decay of 6e-5 per step, barely modulated by its random LSTM.",
        ),
        Preset(
            "l2l-mnist",
            CoordinateLSTM.kind,
            {},
            "The previous l2l-random (benchmarks/results/l2l_random_quadratic/l2l-random-previous.safetensors) "
            "fine-tuned on the MNIST MLP task (meta-train split) for 300 meta-steps with a "
            "linearly weighted meta-loss (--loss-weighting linear), then 100 more with a quadratically weighted "
            "one (--loss-weighting quadratic); model card: learnedopt/pretrained/l2l-mnist.md.",
            file="l2l-mnist.safetensors",
            sha256="384957423785a38de0fa5742471b891267aa4e49762da17db55a0eac1299fea2",
        ),
        Preset(
            "l2l-random",
            CoordinateLSTM.kind,
            {},
            "CoordinateLSTM with momentum (decays 0.5, 0.9, 0.99) and RMS-normalised gradient (0.99, 0.999) "
            "inputs, meta-trained on the randomised MLP family mlp-random (MNIST meta-train split) for 200 "
            "meta-steps, then twice 80 more with a quadratically weighted meta-loss (--loss-weighting quadratic; "
            "that is l2l-short), then 32 more on horizons drawn from [20, 1000] (--random-horizon); "
            "model card: learnedopt/pretrained/l2l-random.md. The default until l2l-blend, which averages it with "
            "l2l-short; opt-in now: it goes further than l2l-blend on a 10,000-step MNIST run and on the 20-dim quadratic.",
            file="l2l-random.safetensors",
            sha256="9ae081f6128e6f7843b5086d1da1b87d9d4d66d037feeb89d5900ff8f02b4dcf",
        ),
        Preset(
            "l2l-blend",
            CoordinateLSTM.kind,
            {},
            "LSTMOptimizer's default: the weight-wise mean of l2l-short and l2l-random (learnedopt average-weights "
            "l2l-short l2l-random), the start and the end of l2l-random's last fine-tune. Momentum and RMS-normalised "
            "gradient inputs, as l2l-random; at or below tuned Adam on 9 of the 10 held-out problems (not the "
            "quadratic). On full-batch problems its untuned step is off, so tune lr there: lower on the demo's "
            "regression over 1000 steps (0.011 at lr 1, 4.9e-5 at lr 0.03, tuned Adam 1.4e-5), higher on the "
            "20-dim quadratic (7.2 at lr 1, 2.6 at lr 10, tuned Adam 1.04); lower where it stalls on a wide MLP "
            "(784-256-256-10 ReLU: 0.075 at lr 1, 0.00033 at lr 0.1, tuned Adam 0.00099); model card: "
            "learnedopt/pretrained/l2l-blend.md.",
            file="l2l-blend.safetensors",
            sha256="26245555c2a864ff2fffdc7bcef2566e2ab1b42efa07bc6b426fff5f1b0f2a17",
        ),
        Preset(
            "l2l-mix",
            CoordinateLSTM.kind,
            {},
            "The previous l2l-random (benchmarks/results/l2l_random_quadratic/weights.safetensors) fine-tuned "
            "for 80 meta-steps on a mixture of mlp-random and 10-dim quadratics (--task mlp-random+quadratic, "
            "--loss-weighting quadratic). Opt-in: longer steps; on the 20-dim quadratic 1.1 against l2l-random's "
            "6.6, but 2.3x higher than l2l-random on the ELU member of mlp-random; "
            "model card: learnedopt/pretrained/l2l-mix.md.",
            file="l2l-mix.safetensors",
            sha256="e095d549fc777f799fe362be3b1dd2bfeb8c61a764ff57dddfe531deca717a56",
        ),
        Preset(
            "l2l-short",
            CoordinateLSTM.kind,
            {},
            "The previous l2l-random (benchmarks/results/l2l_random_quadratic/weights.safetensors) fine-tuned "
            "for 80 more meta-steps on mlp-random with the same quadratically weighted meta-loss (seed 8); "
            "l2l-random continues it. Opt-in, for runs of a few hundred steps: below every tuned baseline on the "
            "100- and 200-step MNIST MLPs (l2l-random, the former default: level with Nesterov at 100, above it at 200), but 11x higher "
            "than l2l-random at 1000 steps; model card: learnedopt/pretrained/l2l-short.md.",
            file="l2l-short.safetensors",
            sha256="fca6ecfe7672c52bae27d5966ac5927ca77f488270276588132daa46fddbebb5",
        ),
        Preset(
            "meta-lstm-adam-mnist",
            MetaLSTMCell.kind,
            {},
            "meta-lstm-adam fine-tuned on the MNIST MLP task (meta-train split) for 150 meta-steps with a "
            "linearly weighted meta-loss (--loss-weighting linear); model card: learnedopt/pretrained/meta-lstm-adam-mnist.md.",
            file="meta-lstm-adam-mnist.safetensors",
            sha256="389a6168670808660d5b523a98989083037bd7f2f17151223484ea2e287b288d",
        ),
        Preset(
            "meta-lstm-mnist",
            MetaLSTMCell.kind,
            {},
            "meta-lstm-2017's architecture meta-trained on the MNIST MLP task (meta-train split); "
            "model card: learnedopt/pretrained/meta-lstm-mnist.md.",
            file="meta-lstm-mnist.safetensors",
            sha256="5d0aac65e5a13b3f1999745a4c50fd4d8f92dd206616e12aba296edc08977094",
        ),
    )
}


def library_version() -> str:
    """``learnedopt.__version__``, as weight-file headers record it."""
    return __version__


def save_weights(
    rule: UpdateRule,
    path: str | os.PathLike,
    *,
    preset: str | None = None,
    trained_on: str | None = None,
    trained: bool = True,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write ``rule``'s meta-parameters and architecture to a safetensors file.

    The write is atomic (a temporary file renamed into place), so a killed process never leaves a
    half-written file under ``path``. A rule whose ``kind`` belongs to another registered class
    (a subclass of ``CoordinateLSTM`` that kept its kind) is refused with ValueError: the file
    would load as that class. For a rule of your own, the header records where its class imports
    from (``rule_class``, ``module:Class``; not for a class of ``__main__`` or one nested in a
    function or class), which the messages about its unregistered kind name. Nothing imports it
    from there by itself: loading a file never runs code. ``extra`` adds header keys other than
    :data:`RESERVED_HEADER_KEYS` (ValueError). A ``preset`` other than a ``str`` or None, or a
    ``trained`` other than a ``bool``, is refused with TypeError: no load would take the file; a
    ``preset`` of :data:`PRESETS` whose kind or architecture is not the rule's, with ValueError. A
    ``path`` string that is a preset's name is refused with ValueError: that string loads the
    preset, not the file. The weights are stored in
    float32; one that is NaN or Inf there is refused with ValueError, as loading would refuse the
    file.

    Args:
        rule: the update rule whose weights and ``config`` are saved.
        path: the file to write.
        preset: the header's ``preset``: the preset these weights are (None for your own); one of
            :data:`PRESETS` must have the rule's kind and architecture.
        trained_on: the header's ``trained_on``: a description of the tasks the rule was
            meta-trained on (e.g. the task family's ``describe()``).
        trained: the header's ``trained``; a file saved with ``False`` warns
            :class:`UntrainedWeightsWarning` when an optimizer loads it.
        extra: further header keys (JSON values).
    """
    check_path_type(path, "save_weights", "a weight file's path")
    # as _open reads them: a file with preset=123 or trained="yes" was written, then never loaded
    if preset is not None and not isinstance(preset, str):
        raise TypeError(f"save_weights: preset must be a preset's name (a str) or None, got {type(preset).__name__}")
    if trained is not None and not isinstance(trained, bool):  # None: the header's null, which loads
        raise TypeError(f"save_weights: trained must be True or False, got {type(trained).__name__}")
    if isinstance(path, str) and path in PRESETS:  # _preset_or_file reads that string as the preset
        raise ValueError(
            f"{path!r} is a preset's name: weights={path!r} loads the preset, not a file of that name; "
            f"name the file {path}.safetensors"
        )
    held = RULES.get(rule.kind)
    if held is not None and (held.__module__, held.__qualname__) != (type(rule).__module__, type(rule).__qualname__):
        raise ValueError(
            f"{type(rule).__name__} has the kind {rule.kind!r} of {held.__qualname__}, so its file would load as a "
            f"{held.__qualname__}: give {type(rule).__name__} a kind of its own (and learnedopt.nn.register_rule it)"
        )
    if preset in PRESETS:  # else the file loaded as that preset (its name, its untrained warning's description)
        named = build_preset(preset)[0]
        if (named.kind, named.config_dict()) != (rule.kind, rule.config_dict()):
            raise ValueError(
                f"save_weights: preset {preset!r} is a {named.kind} {brief_config(named.config_dict())}, but the rule is a "
                f"{rule.kind} {brief_config(rule.config_dict())}: give preset=None for weights of your own"
            )
    importable = class_path(type(rule)) if rule.kind not in LIBRARY_KINDS else None
    # extra came last and replaced these: extra={"config": ...} wrote a file that loads as
    # another architecture or not at all
    clashes = sorted(set(extra or {}) & set(RESERVED_HEADER_KEYS))
    if clashes:
        raise ValueError(f"extra header keys {clashes} are the weight file's own; reserved: {list(RESERVED_HEADER_KEYS)}")
    header = {
        "format": FORMAT_VERSION,
        "kind": rule.kind,
        "config": rule.config_dict(),
        **({"rule_class": importable} if importable is not None else {}),
        "preset": preset,
        "library_version": library_version(),
        "trained_on": trained_on,
        "trained": trained,
        **(extra or {}),
    }
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in _weight_values(rule, "save").items()}
    # checked in the file's float32, as _load_file checks them: a float64 1e300 is Inf there
    bad = not_finite(tensors)
    if bad:
        raise ValueError(f"cannot save the {rule.kind}: its weights {bad} are NaN or Inf in float32, which no load takes")
    save_with_header(path, _HEADER_KEY, header, tensors)


def _weight_values(rule: UpdateRule, to: str) -> dict[str, torch.Tensor]:
    """``rule.state_dict()``; raises ValueError where a tensor of it is on the meta device, which
    holds shapes but no values (copying one out was torch's raw "Cannot copy out of meta tensor")."""
    state = rule.state_dict()
    on_meta = sorted(k for k, v in state.items() if v.device.type == "meta")
    if on_meta:
        raise ValueError(
            f"the {rule.kind} has no weights to {to}: {len(on_meta)} of its {len(state)} tensors ({on_meta[0]!r} first) "
            "live on the meta device (torch.device('meta')), which holds shapes but no values; build the rule on a real "
            "device, or give it values (rule.to_empty(device='cpu'), then load_state_dict)"
        )
    return state


def save_with_header(
    path: str | os.PathLike, header_key: str, header: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> None:
    """Write ``tensors`` and the JSON ``header`` (metadata entry ``header_key``) as a safetensors
    file, atomically: the writer of :func:`open_with_header`'s formats.

    A tensor that shares its memory with one before it (a weight tied between two layers, a
    layer used under two names: one tensor under two keys) is written from a copy, as safetensors
    refuses tensors that share memory ("Some tensors share memory"); each key holds its own
    tensor in the file, and loading it (``load_state_dict`` copies into the module's own
    tensors) keeps the tie. The bytes of a file without such a tensor are as before.

    Raises:
        OSError: the file cannot be written (a full disk: the OS's error, which safetensors' own
            writer reports as a ``SafetensorError``; the bytes are the same).
        TypeError: a header value JSON cannot store (a ``Path``), naming its key; nothing is written.
    """
    try:
        text = json.dumps(header)
    # TypeError: a value JSON has no type for (a Path); ValueError: a circular reference
    except (TypeError, ValueError) as err:
        key = next((k for k, v in header.items() if not _json_storable(v)), None)
        raise TypeError(f"cannot write {path}: the header" + (f"'s {key!r}" if key is not None else "") + f" is not JSON: {err}") from None
    data = save(_unshared(tensors), metadata={header_key: text})
    write_atomically(path, lambda tmp: tmp.write_bytes(data))


def _json_storable(value: Any) -> bool:
    """Whether ``json.dumps`` takes ``value``."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors``, each one whose memory (storage) is that of a tensor before it replaced by a
    copy (contiguous, as safetensors writes it): :func:`save_with_header`'s files."""
    seen: set[tuple[torch.device, int]] = set()
    unshared = {}
    for name, tensor in tensors.items():
        memory = (tensor.device, tensor.untyped_storage().data_ptr())
        unshared[name] = tensor.clone(memory_format=torch.contiguous_format) if memory in seen else tensor
        seen.add(memory)
    return unshared


def class_path(cls: type) -> str | None:
    """``cls`` as ``module:Class``, the name :func:`learnedopt.plugins.load_entry_point` imports it
    by; None for a class that cannot be imported by name (of ``__main__``, or nested in a
    function or another class)."""
    path = f"{cls.__module__}:{cls.__qualname__}"
    return path if cls.__module__ != "__main__" and entry_point_path(path) is not None else None


def recorded_rule_class(header: dict[str, Any]) -> str | None:
    """Where a weight file's header says its rule's class imports from (``module:Class``):
    ``rule_class`` (:func:`save_weights`), or in a file that ``meta-train --rule module:Class``
    wrote before that was recorded, that option; None where it says neither."""
    recorded = header.get("rule_class")
    if recorded is None and isinstance(header.get("meta_train_config"), dict):
        recorded = header["meta_train_config"].get("rule")
    return recorded if isinstance(recorded, str) and entry_point_path(recorded) is not None else None


def read_header(path: str | os.PathLike, *, registered: bool = True) -> dict[str, Any]:
    """The JSON header of a weight file, validated, or of a preset (a ``str`` in :data:`PRESETS`,
    the header :func:`load_weights` returns for it), as :func:`load_weights` resolves ``path``;
    raises ValueError naming what is wrong. ``registered=False`` takes a rule kind no class is
    registered for in this process (e.g. to read which class the file records,
    :func:`recorded_rule_class`)."""
    source = _preset_or_file(path, "read_header")
    return build_preset(source.name)[1] if isinstance(source, Preset) else _open(source, registered=registered)[0]


def load_weights(name: str | os.PathLike) -> tuple[UpdateRule, dict[str, Any]]:
    """Build the update rule of a preset (a ``str`` in :data:`PRESETS`) or of a weight file, as
    the optimizers' ``weights=`` takes them.

    Returns:
        ``(rule, header)``: the rule with its weights on the CPU (whatever the
        default device); a preset's header is like a weight file's, with its name in ``preset``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a string that is neither a preset nor a file and does not look like a path
            (no separator, no ``.safetensors``): most likely a misspelt preset, so the message
            lists the presets. Not a learnedopt safetensors file, truncated, an unknown kind,
            tensors that do not fit the stated architecture, or non-finite weights.
        TypeError: ``name`` is neither a ``str`` nor an ``os.PathLike``: ``bytes`` are refused,
            since Python reads them as a path where this could as well be a file's contents
            (whose header a ``safe_open`` of the file reads; write them to a file first).
    """
    return _load_weights(name, "load_weights")


def _load_weights(name: str | os.PathLike, who: str) -> tuple[UpdateRule, dict[str, Any]]:
    """:func:`load_weights`, naming ``who`` (the public function called) in a TypeError."""
    source = _preset_or_file(name, who)
    return build_preset(source.name) if isinstance(source, Preset) else _load_file(source)


def check_path_type(path: object, who: str, takes: str) -> None:
    """Raise TypeError naming ``who`` (the public function called) and what it ``takes`` unless
    ``path`` is a ``str`` or ``os.PathLike``: pathlib's "expected str, bytes or os.PathLike object,
    not int" named no function, and bytes, which Python reads as a path, could as well be a
    file's contents here (a safetensors file's header is read from the file). An ``os.PathLike``
    whose ``__fspath__`` gives bytes (``os.DirEntry`` of a bytes scan) is refused as bytes are:
    pathlib's own error named no function."""
    if not isinstance(path, (str, os.PathLike)):
        hint = (": a path in bytes: os.fsdecode(path); a file's contents: write them to a file first"
                if isinstance(path, (bytes, bytearray, memoryview)) else "")  # fmt: skip
        raise TypeError(f"{who} takes {takes} (a str or os.PathLike), got {type(path).__name__}{hint}")
    if isinstance(path, os.PathLike) and not isinstance(path, Path):
        try:
            given = os.fspath(path)
        except TypeError:  # __fspath__ returned neither str nor bytes
            given = None
        if not isinstance(given, str):
            gives = "bytes: a path in bytes: os.fsdecode(path)" if isinstance(given, bytes) else "neither str nor bytes"
            raise TypeError(f"{who} takes {takes} (a str or os.PathLike), got {type(path).__name__} whose __fspath__ gives {gives}")


def _preset_or_file(name: str | os.PathLike, who: str) -> Preset | Path:
    """The preset a ``str`` in :data:`PRESETS` names (before a file of that name), else the weight
    file's path; raises ValueError as :func:`load_weights` does for a misspelt preset, and
    TypeError naming ``who`` for anything but a ``str`` or ``os.PathLike``."""
    check_path_type(name, who, "a preset's name or a weight file's path")
    if isinstance(name, str) and name in PRESETS:
        return PRESETS[name]
    # "" is not the current folder (Path("") is ".")
    if isinstance(name, str) and (not name or not Path(name).exists() and os.sep not in name and not name.endswith(".safetensors")):
        raise ValueError(f"unknown preset {name!r} and no such file; presets: {sorted(PRESETS)}")
    return Path(name)


def _load_file(path: Path) -> tuple[UpdateRule, dict[str, Any]]:
    """The rule stored in the weight file ``path`` (errors as :func:`load_weights`)."""
    header, tensors = _open(path)
    rule_class = RULES[header["kind"]]
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    try:
        rule = check_rule_shapes(header["kind"], header["config"], found)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    if rule is None:
        rule = blank_rule(rule_class, header["config"])
    not_float = sorted(k for k, v in tensors.items() if not v.is_floating_point())
    if not_float:
        raise ValueError(f"{path}: weights {not_float} are not floating-point tensors")
    with _loading_by_copy():
        rule.load_state_dict(tensors)
    # checked in the rule's float32: a float64 1e300 is finite in the file but Inf there
    bad = not_finite(rule)
    if bad:
        raise ValueError(f"{path}: weights contain NaN or Inf (in float32) in {bad}")
    differing = _tied_keys_differing(rule, tensors)
    if differing:
        raise ValueError(
            f"{path}: keys {differing} are one tensor in the {header['kind']} (a tied weight) but hold different "
            "values in the file, so loading would keep only the last; save_weights writes them equal"
        )
    return rule, header


def _tied_keys_differing(rule: UpdateRule, tensors: dict[str, torch.Tensor]) -> list[str]:
    """The first group of ``rule.state_dict()`` keys that share one tensor (a weight tied between
    two layers) whose values in ``tensors`` (a file's, compared in the rule's dtype) differ, sorted;
    empty where every such group agrees. ``load_state_dict`` copies each key in turn into the one
    tensor, so only the last key's value would survive."""
    state = rule.state_dict()
    groups: dict[tuple[torch.device, int, tuple[int, ...]], list[str]] = {}
    for key, value in state.items():
        if value.device.type != "meta":  # no memory there: every data_ptr is 0
            groups.setdefault((value.device, value.data_ptr(), tuple(value.shape)), []).append(key)
    for keys in groups.values():
        if len(keys) > 1:
            dtype = state[keys[0]].dtype
            first = tensors[keys[0]].to(dtype)
            if any(not torch.equal(first, tensors[k].to(dtype)) for k in keys[1:]):
                return sorted(keys)
    return []


def check_rule_shapes(kind: str, config: dict[str, Any], found: dict[str, tuple[int, ...]]) -> UpdateRule | None:
    """Compare the ``state_dict`` shapes ``found`` (name -> shape) with those of the rule of
    ``kind`` and ``config``, without building it where the rule can say them
    (:meth:`UpdateRule.weight_count`, :meth:`UpdateRule.weight_shapes`); raises ValueError naming
    the difference, or an invalid config. Returns the rule where it had to be built to compare
    (a rule of your own that cannot be built on the meta device), else None.

    The count before the shapes, the shapes before the rule: a header stating hidden_size 100000
    over small tensors made the rule allocate 160 GB (a raw allocator error) before they were
    compared, and listing the shapes of a header's 10**9 layers took hours."""
    rule_class = RULES[kind]
    rule = count = expected = None
    try:
        count = rule_class.weight_count(config)
        if count is None or count == len(found):
            with torch.device("cpu"):  # shapes: no dtype to set (a default all threads share)
                expected = rule_class.weight_shapes(config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"invalid {kind} config in header: {shortened(str(err))}") from None
    except Exception:  # noqa: BLE001 - a rule of your own that cannot be built on the meta device
        expected = None
    if count is not None and count != len(found):
        raise ValueError(f"tensors do not match the {kind} architecture {brief_config(config)}: it has {count} weight tensors, the file {len(found)}")
    if expected is None:  # compared once built, as before weight_shapes
        rule = blank_rule(rule_class, config)
        expected = {k: tuple(v.shape) for k, v in rule.state_dict().items()}
    if expected != found:
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
        raise ValueError(
            f"tensors do not match the {kind} architecture {brief_config(config)}"
            f" (missing {missing}, unexpected {unexpected}, wrong shape {wrong})"
        )
    return rule


_BRIEF = reprlib.Repr()
_BRIEF.maxlist = _BRIEF.maxtuple = 8
_BRIEF.maxlong = 40
_BRIEF.maxstring = 80


def shortened(text: str, limit: int = 300) -> str:
    """``text`` for a message, cut to its first ``limit`` characters (and its length) where
    longer: a rule's own message about a header's value quotes it whole (a 'hidden_size' of a
    million characters)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def brief_config(config: dict[str, Any]) -> str:
    """A rule's config for a message, as its ``repr`` but with each value cut short (a list to
    its first entries and ``...``): a hand-edited header's list of 10**6 decays printed 5 MB."""
    return "{" + ", ".join(f"{key!r}: {_BRIEF.repr(value)}" for key, value in config.items()) + "}"


def not_finite(tensors: UpdateRule | dict[str, torch.Tensor]) -> list[str]:
    """The names of the tensors (a rule's ``state_dict``'s, for a rule) holding a NaN or an Inf,
    sorted (none checked on the meta device, where there are no values)."""
    if isinstance(tensors, UpdateRule):
        tensors = tensors.state_dict()
    return sorted(k for k, v in tensors.items() if v.device.type != "meta" and not torch.isfinite(v).all())


def folder_note(path: str | os.PathLike) -> str:
    """For a message about a file that ``path`` should name: where it is a folder (a run's
    ``--out``), that, with the ``.safetensors`` files it holds; where it is a symbolic link that
    leads nowhere (a loop, or a missing target: it "exists" as a link), that; where it is no
    regular file (a named pipe, as a shell's ``<(...)`` gives; a device), what it is; else empty."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        return f" ({path} is a symbolic link to {os.readlink(path)}, which does not resolve to a file)"
    if path.exists() and not path.is_dir() and not path.is_file():
        mode = path.stat().st_mode
        what = ("a named pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file")  # fmt: skip
        return f" ({path} is {what}, not a regular file: a safetensors file is read in place, so write it to a file first)"
    if not path.is_dir():
        return ""
    inside = sorted(f.name for f in path.glob("*.safetensors"))
    give = "give it" if len(inside) == 1 else "give one of them"
    return f" ({path} is a folder" + (f" holding {', '.join(inside)}: {give})" if inside else ")")


def open_with_header(
    path: Path, header_key: str, what: str, missing_header: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A safetensors file's tensors and its JSON header object (the metadata entry
    ``header_key``), for the library's file formats (weight files, few-shot model files).

    Args:
        what: the kind of file, for messages (``"weight file"``).
        missing_header: the message's end when the file has no such header.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable, no header, or a header that is not a JSON object.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}{folder_note(path)}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError, RuntimeError) as err:
        pickled = _pickle_format(path)
        if pickled is not None:
            saver = _SAVERS.get(header_key, "the library's save function")
            raise ValueError(
                f"{path}: not a readable safetensors {what} but {pickled} (a .pt/.pth checkpoint?), never unpickled here, "
                f"since unpickling can run code; convert one you trust: torch.load(path, weights_only=True), then {saver}"
            ) from None
        raise ValueError(f"{path}: not a readable safetensors {what} (truncated or corrupt?): {err}") from None
    if header_key not in metadata:
        other = next((kind for key, kind in FILE_FORMATS.items() if key != header_key and key in metadata), None)
        raise ValueError(f"{path}: {missing_header}" if other is None else f"{path}: not a {what} but {other}")
    try:
        header = json.loads(metadata[header_key])
    # ValueError: JSONDecodeError, or an integer past Python's digit limit; RecursionError: nesting
    except (ValueError, RecursionError) as err:
        raise ValueError(f"{path}: learnedopt header is not valid JSON: {err}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: learnedopt header is a JSON {type(header).__name__}, not an object")
    return header, tensors


#: the function that writes each of the library's file formats, by its header key, for a message
_SAVERS = {_HEADER_KEY: "load_state_dict into the rule and save_weights", MODEL_HEADER_KEY: "save_learner"}


def _pickle_format(path: Path) -> str | None:
    """What pickle-based format ``path`` starts as (``torch.save``'s zip archive, or a plain
    pickle of protocol 2 or later, as ``torch.save`` wrote before PyTorch 1.6), from its first
    bytes alone (nothing is unpickled); None for any other file or one that cannot be read.

    A safetensors file starts with its header's length (8 bytes), which can start as a pickle
    does (a header of 0x480 bytes: 0x80, 0x04), then the header, a JSON object: where byte 8 is
    ``{`` the file is taken for a damaged safetensors file, not a pickle."""
    try:
        with path.open("rb") as f:
            start = f.read(9)
    except OSError:
        return None
    if start[8:9] == b"{":
        return None
    if start.startswith(b"PK\x03\x04"):
        return "a zip archive, as torch.save writes"
    if len(start) >= 2 and start[0] == 0x80 and 2 <= start[1] <= 5:
        return "a pickle, as torch.save wrote before PyTorch 1.6 (or pickle.dump)"
    return None


def _open(path: Path, *, registered: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    header, tensors = open_with_header(
        path, _HEADER_KEY, "weight file", "safetensors file has no learnedopt header; not a learnedopt weight file"
    )
    if not isinstance(header.get("config"), dict):
        raise ValueError(f"{path}: learnedopt header has no architecture config (a 'config' object)")
    if header.get("format") != FORMAT_VERSION or isinstance(header.get("format"), bool):
        raise ValueError(f"{path}: unsupported weight format {_BRIEF.repr(header.get('format'))} (this library reads {FORMAT_VERSION})")
    if not isinstance(header.get("kind"), str):
        raise ValueError(f"{path}: learnedopt header has no rule kind (a 'kind' string)")
    # read by the untrained-weights warning, which took "trained": "no" as trained and failed on
    # a list as the preset with a bare "unhashable type" TypeError
    for key, kind, want in (("trained", bool, "true or false"), ("preset", str, "a preset's name")):
        if header.get(key) is not None and not isinstance(header[key], kind):
            raise ValueError(f"{path}: learnedopt header's {key!r} must be {want} or null, got {_BRIEF.repr(header[key])}")
    if registered and header["kind"] not in RULES:
        recorded = recorded_rule_class(header)
        raise ValueError(
            f"{path}: unknown update rule kind {_BRIEF.repr(header['kind'])}; known: {sorted(RULES)} (a rule class of your "
            "own loads once registered: learnedopt.nn.register_rule(YourRule)"
            + (f"; this file records its class as {shortened(recorded)}" if recorded else "") + ")"
        )
    return header, tensors


@contextlib.contextmanager
def _loading_by_copy() -> Iterator[None]:
    """Make ``Module.load_state_dict`` copy into the parameters, as it does by default, also
    where the caller has set torch's opt-in ``torch.__future__.set_swap_module_params_on_conversion(True)``:
    there it swaps each parameter for the loaded one, which an ``nn.LSTM``'s parameters refuse
    ("Cannot swap t1 because it has weakref associated with it"), so that no rule could be loaded
    and no optimizer built. The rules loaded here are new, so a copy is all a swap would do."""
    if not torch.__future__.get_swap_module_params_on_conversion():
        yield
        return
    torch.__future__.set_swap_module_params_on_conversion(False)
    try:
        yield
    finally:
        torch.__future__.set_swap_module_params_on_conversion(True)


@contextlib.contextmanager
def _cpu_float32() -> Iterator[None]:
    """Build a rule's weights on the CPU in float32, whatever the defaults: under ``with
    torch.device("meta")`` (a shape-only run, as torch.optim allows) they would hold no values,
    and the CPU generator cannot initialise another device's tensors; under
    ``torch.set_default_dtype(torch.float64)`` an untrained preset drew other weights (whose
    saved states a float32-default process refused as "other weights"), and a file's weights
    were checked for finiteness in float64, not in the float32 the steps use.

    Torch's default dtype is one for all threads, so while it is set here another thread's new
    tensors are float32 too: only the rules that cannot be built on the meta device are built
    under it (:func:`_allocated_from_meta` takes the dtype instead)."""
    with _defaults(torch.float32, torch.device("cpu")):
        yield


@contextlib.contextmanager
def _defaults(dtype: torch.dtype | None, device: torch.device | None) -> Iterator[None]:
    """Torch's default dtype and device set to ``dtype`` and ``device`` (each None: left as it
    is); the dtype is set only where it differs (a setting all threads share)."""
    previous = torch.get_default_dtype()
    if dtype is not None and dtype != previous:
        torch.set_default_dtype(dtype)
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            yield
    finally:
        if dtype is not None and dtype != previous:
            torch.set_default_dtype(previous)


def blank_rule(rule_class: type[UpdateRule], config: dict[str, Any]) -> UpdateRule:
    """A rule of ``rule_class`` and architecture ``config`` (as :meth:`UpdateRule.from_config_dict`,
    raising as it does), on the CPU in float32, whose weights are allocated but hold no values:
    for the caller to fill (``load_state_dict``, ``reset_parameters(generator=...)``).

    Torch's global generator is neither read nor written: the rule is constructed on the meta
    device, where its constructor's random initialisation draws nothing, and its tensors are then
    allocated on the CPU (``to_empty``). That initialisation, from the global generator, changed
    a seeded script's later draws (data order, dropout) once ``torch.optim.Adam`` was replaced by
    a learned optimizer, which ``Adam`` does not; and saving the generator's state and restoring
    it afterwards (``torch.random.fork_rng``) rolled back what another thread drew meanwhile, so
    that its draws repeated.

    A rule of your own that cannot be constructed on the meta device, that holds tensors its
    ``state_dict`` does not (a non-persistent buffer, a plain tensor attribute: they would hold
    no values), or that shares a tensor between layers (allocated, it would be untied) is
    constructed on the CPU instead, under ``fork_rng``.
    """
    rule = _allocated_from_meta(rule_class, config, torch.device("cpu"), torch.float32)
    if rule is not None:
        return rule
    with _cpu_float32(), torch.random.fork_rng(devices=[]):  # built on the CPU, raising the rule's own error
        return rule_class.from_config_dict(config)


def seeded_rule(
    rule_class: type[UpdateRule],
    config: dict[str, Any],
    generator: torch.Generator,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> UpdateRule:
    """``rule_class.from_config_dict(config)`` with ``reset_parameters(generator=generator)``
    called on it (raising as they do), in ``dtype`` and on ``device`` (None: torch's default
    dtype, its default device), with the same weights as built under those defaults, but drawing
    nothing from torch's global generator (nor, where it can be built on the meta device,
    setting the default dtype, which all threads share).

    Built so, the constructor's random initialisation came from the global generator and
    advanced it (a seeded script's later draws changed), though ``reset_parameters`` replaced
    it. The rule is constructed on the meta device and allocated (``to_empty``) instead; every
    weight is filled with NaN before ``reset_parameters``, and where one is left NaN (a
    ``reset_parameters`` of your own that leaves a constructor's weight, or scales it), or the
    rule holds tensors its ``state_dict`` does not, shares one between layers or cannot be
    constructed on the meta device,
    it is constructed as before, in a fork of the global generator (``fork_rng``: not
    thread-safe, see :func:`blank_rule`), so that its constructor's values are kept.
    """
    state = generator.get_state()  # the draws of a failed try below are undone
    rule = _allocated_from_meta(rule_class, config, device if device is not None else torch.get_default_device(), dtype)
    if rule is not None:
        tensors = rule.state_dict().values()
        if all(t.is_floating_point() for t in tensors):
            with torch.no_grad():
                for t in tensors:
                    t.fill_(float("nan"))
            try:
                rule.reset_parameters(generator=generator)  # type: ignore[operator]
            except Exception:  # noqa: BLE001 - called again below on the constructor's values, which raises its own error
                pass
            else:
                if not any(bool(t.isnan().any()) for t in rule.state_dict().values()):
                    return rule
    with _defaults(dtype, device):
        with torch.random.fork_rng(devices=[]):
            rule = rule_class.from_config_dict(config)
        rule.reset_parameters(generator=generator.set_state(state))  # type: ignore[operator]
    return rule


def _allocated_from_meta(
    rule_class: type[UpdateRule], config: dict[str, Any], device: torch.device, dtype: torch.dtype | None = None
) -> UpdateRule | None:
    """``rule_class.from_config_dict(config)`` constructed on the meta device (drawing nothing
    from torch's global generator) and allocated on ``device`` (``to_empty``: its weights hold no
    values), its floating-point tensors in ``dtype`` (None: torch's default dtype; converted on
    the meta device, without setting the default, which all threads share); None where it cannot be constructed there or holds tensors
    its ``state_dict`` does not (:func:`_held_by_state_dict`), for the caller to construct it as
    before (which raises the rule's own error). :func:`blank_rule`'s and :func:`seeded_rule`'s
    first try."""
    try:
        with torch.device("meta"):
            rule = rule_class.from_config_dict(config)
    except Exception:  # noqa: BLE001 - the caller constructs it as before, which raises the rule's own error
        return None
    if not _held_by_state_dict(rule):
        return None
    with _loading_by_copy():  # a swap of an nn.LSTM's parameters fails (see there)
        if dtype is not None:
            rule = rule.to(dtype)
        return rule.to_empty(device=device)


def _held_by_state_dict(rule: UpdateRule) -> bool:
    """Whether every tensor ``rule`` holds is one of its ``state_dict``'s (so that loading one
    fills them all), each under one name: no non-persistent buffer, no plain tensor attribute of
    a module, and no tensor shared by two layers (``to_empty`` would give each layer its own,
    untying a tied weight)."""
    named = [*rule.named_parameters(remove_duplicate=False), *rule.named_buffers(remove_duplicate=False)]
    held = {name for name, _ in named}
    plain = any(isinstance(value, torch.Tensor) for module in rule.modules() for value in vars(module).values())
    shared = len({id(t) for _, t in named}) != len(named)
    return not plain and not shared and held <= set(rule.state_dict(keep_vars=True))


def build_preset(name: str) -> tuple[UpdateRule, dict[str, Any]]:
    """The update rule of a preset, with a header like a weight file's."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    preset = PRESETS[name]
    if preset.file is not None:
        with resources.as_file(resources.files("learnedopt.pretrained") / preset.file) as path:
            try:
                rule, header = _load_file(path)
            except (FileNotFoundError, ValueError) as err:  # the caller named a preset, maybe none at all
                raise type(err)(f"preset {name!r}: {err}; reinstall learnedopt") from None
            found = fingerprint(rule)["sha256"]
            if preset.sha256 is not None and found != preset.sha256:
                raise ValueError(
                    f"preset {name!r}: {path} does not hold the weights it shipped with (SHA-256 {found[:12]}..., "
                    f"expected {preset.sha256[:12]}...): damaged on disk; reinstall learnedopt"
                )
        return rule, {**header, "preset": name}
    rule = seeded_rule(
        RULES[preset.kind], preset.config, torch.Generator().manual_seed(preset.seed), dtype=torch.float32, device=torch.device("cpu")
    )
    header = {
        "format": FORMAT_VERSION,
        "kind": preset.kind,
        "config": rule.config_dict(),
        "preset": name,
        "library_version": library_version(),
        "trained_on": None,
        "trained": False,
    }
    return rule, header


def resolve_weights(
    weights: str | os.PathLike | UpdateRule | None, *, kind: str, default_preset: str | None, owner: str
) -> tuple[UpdateRule, dict[str, Any]]:
    """Turn a ``weights=`` argument (preset name, file path, module or None) into a rule.

    Warns with :class:`UntrainedWeightsWarning` when the rule was never meta-trained, and raises
    ValueError when it is not of the ``kind`` that ``owner`` (the optimizer's name) runs, or is a
    module on the meta device (no values to step with).
    """
    if weights is None:
        if default_preset is None:
            raise ValueError(f"{owner} has no default weights: pass weights=, a {kind} rule or its weight file")
        weights = default_preset
    if isinstance(weights, UpdateRule):
        rule = weights
        _weight_values(rule, f"step {owner}'s parameters with")  # else the fingerprint's message
        header = {"kind": rule.kind, "config": rule.config_dict(), "preset": None, "trained": None}
        bad = not_finite(rule)
        if bad:  # as load_weights refuses them in a file: every step would turn the parameters NaN
            raise ValueError(f"{owner}: the {rule.kind} given as weights has NaN or Inf in {bad}")
    elif isinstance(weights, (str, os.PathLike)):
        rule, header = load_weights(weights)
    else:
        raise TypeError(f"weights must be a preset name, a path or an UpdateRule, got {type(weights).__name__}")
    if rule.kind != kind:
        given = "" if isinstance(weights, UpdateRule) else f" ({os.fspath(weights)})"
        own = "" if rule.kind in LIBRARY_KINDS else (
            f" (a rule of your own runs in a subclass of learnedopt.optim.LearnedOptimizer with rule_kind = {rule.kind!r})"
        )
        raise ValueError(f"{owner} runs a {kind} update rule, but the weights given{given} are a {rule.kind}{own}")
    if header.get("trained") is False:
        preset = header.get("preset")
        source = (f"preset {preset!r}): {PRESETS[preset].description}" if preset in PRESETS
                  else f"{os.fspath(weights)}, saved with trained=False).")  # fmt: skip
        warnings.warn(
            f"{owner} is using UNTRAINED weights ({source} "
            "It is not a meta-trained optimizer: `learnedopt presets` lists the trained ones (and their limits), or pass weights= your own trained file.",
            UntrainedWeightsWarning,
            stacklevel=3,
        )
    return rule, header


def fingerprint(rule: UpdateRule) -> dict[str, Any]:
    """Identity of an update rule: its kind, architecture and a SHA-256 of its weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(_weight_values(rule, "fingerprint").items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return {"kind": rule.kind, "config": rule.config_dict(), "sha256": digest.hexdigest()}


def describe_fingerprint(rule: dict[str, Any]) -> str:
    """``rule`` (a :func:`fingerprint`) in words for a message: its kind and the preset whose
    weights it has (``"CoordinateLSTM, preset l2l-mix"``), else the start of its SHA-256."""
    for name, preset in PRESETS.items():  # only on an error's path: builds each preset once
        if preset.kind == rule.get("kind") and fingerprint(build_preset(name)[0]) == rule:
            return f"{rule['kind']}, preset {name}"
    return f"{rule.get('kind')}, sha256 {str(rule.get('sha256'))[:12]}..."


def average_weights(paths: Iterable[str | os.PathLike]) -> tuple[UpdateRule, list[dict[str, Any]]]:
    """The uniform average of several weight files of one architecture (a "model soup").

    Each tensor of the result is the mean of that tensor over the files, summed in float64 and
    stored in float32. The float64 sum of one element's float32 values is exact unless they
    differ in scale by more than about 2**27; the files are summed in the order of their
    weights' SHA-256, so the order of ``paths`` does not change a bit even then. Meaningful for
    runs fine-tuned from one starting point; the files are not otherwise checked for that.

    Args:
        paths: one or more weight files (see :func:`load_weights`) or preset names (any iterable).

    Returns:
        ``(rule, members)``: the averaged rule, and for each file its path, SHA-256 (of the
        weights, as :func:`fingerprint`), ``trained_on`` and ``command``.

    Raises:
        ValueError: no files, a misspelt preset, an untrained preset, the same weights twice, or
            files of different kinds or architectures (the message names the first that differs).
    """
    if isinstance(paths, (str, os.PathLike)):  # else read as a list of its characters ("/" a folder)
        raise TypeError(f"average_weights takes a list of weight files or presets, got one {type(paths).__name__}: [{paths!r}]")
    paths = list(paths)  # a generator, which the messages' paths[0] could not index
    if not paths:
        raise ValueError("average_weights needs at least one weight file")
    rules, members = [], []
    for path in paths:
        rule, header = _load_weights(path, "average_weights")
        if header.get("trained") is False:
            origin = f"preset {header['preset']!r}" if header.get("preset") else "saved with trained=False"
            raise ValueError(f"{path}: untrained weights ({origin}); average trained runs")
        if rules and (rule.kind, rule.config_dict()) != (rules[0].kind, rules[0].config_dict()):
            raise ValueError(
                f"{path} is a {rule.kind} {rule.config_dict()}, but {paths[0]} is a {rules[0].kind} "
                f"{rules[0].config_dict()}: only weights of one architecture can be averaged"
            )
        sha256 = fingerprint(rule)["sha256"]
        twin = next((m["path"] for m in members if m["sha256"] == sha256), None)
        if twin is not None:
            raise ValueError(f"{path} holds the same weights as {twin}: given twice, they would weigh double in the average")
        rules.append(rule)
        members.append({"path": str(path), "sha256": sha256,
                        "trained_on": header.get("trained_on"), "command": header.get("command")})  # fmt: skip
    # a canonical order: where the float64 sum rounds, another order would give other bits
    states = [r.state_dict() for _, r in sorted(zip((m["sha256"] for m in members), rules), key=lambda pair: pair[0])]
    mean = {k: (sum(s[k].double() for s in states) / len(states)).float() for k in states[0]}
    average = blank_rule(RULES[rules[0].kind], rules[0].config_dict())
    with _loading_by_copy():
        average.load_state_dict(mean)
    return average, members
