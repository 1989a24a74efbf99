"""Each finished training run of an evaluation, recorded in its output folder as it ends, so that
a killed evaluation continues where it stopped (``--resume``) and reports what an uninterrupted
one does.

The unit is one training run: ``(problem, optimizer, lr, seed)`` under the run's lr schedule, the
``(steps,)`` loss curve :func:`~learnedopt.evaluation.runs.run_optimizer` returns. Every run is a
function of those alone, so a recorded curve is the one a rerun would give, and the report
computed from recorded and fresh curves alike is the uninterrupted run's, bit for bit (the curves
are kept at full float64 precision: JSON writes a float's shortest repr, which reads back exactly).

Layout: ``<out>/<name>.runs/settings.json`` (what the runs depend on, checked on ``--resume``) and
one ``<hash>.json`` per run (its key and curve), each written atomically
(:func:`learnedopt.files.write_atomically`): a kill leaves whole records, never a partial one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..files import write_atomically
from ..values import is_number
from .problems import Problem

#: the layout of a records folder; another is refused on ``--resume``
RECORDS_FORMAT = 1
SETTINGS_NAME = "settings.json"
#: ``EvalConfig`` fields that ``evaluate optimizers`` takes as an option of the same name
_OPTIONS = {"problems", "weights", "rules", "seeds", "tuning_seeds", "long_tuning_seeds", "lrs", "stability_steps",
            "presets", "lr_schedule", "data", "reuse", "quick"}  # fmt: skip


class RecordError(ValueError):
    """A run record that cannot be read (found during a resumed run): the CLI prints it on one
    line (exit code 2)."""


class RecordWriteError(RecordError):
    """A record or the runs' settings that cannot be written (a full disk): the CLI prints it on
    one line (exit code 1, as for a report or a meta-train file that cannot be written)."""


def records_folder(out: str | os.PathLike[str], name: str) -> Path:
    """Where the runs of the report ``<out>/<name>.json`` are recorded until it is written."""
    return Path(out) / f"{name}.runs"


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


@dataclass(frozen=True)
class RunRecords:
    """The records folder of one evaluation (picklable: worker processes record their own runs).

    Attributes:
        folder: the folder, ``<out>/<name>.runs`` (:func:`records_folder`).
    """

    folder: Path

    def key(self, problem: Problem, label: str, lr: float, seed: int, schedule: str) -> dict[str, Any]:
        """What a run's curve is a function of: the problem (name, steps and description), the
        optimizer's label, its lr, the seed and the lr schedule."""
        return {"problem": problem.name, "steps": problem.steps, "description": problem.description,
                "optimizer": label, "lr": float(lr), "seed": int(seed), "lr_schedule": schedule}  # fmt: skip

    def path(self, key: Mapping[str, Any]) -> Path:
        """The record file of ``key``."""
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return self.folder / f"{digest[:24]}.json"

    def load(self, key: Mapping[str, Any]) -> np.ndarray | None:
        """The recorded ``(steps,)`` float64 curve of ``key``, or None when that run is not recorded.

        Raises:
            RecordError: the record file cannot be read or holds another run (one line: remove it
                and that run runs again).
        """
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            if not (isinstance(record["curve"], list) and all(is_number(x) for x in record["curve"])):
                # numpy would read a null as NaN (a diverged run) and "0.5" or true as numbers
                raise TypeError("its curve is not a list of numbers")
            curve = np.asarray(record["curve"], dtype=np.float64)
            same = record["key"] == _jsonable(dict(key)) and curve.shape == (key["steps"],)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise RecordError(f"{path} is not a run record ({type(err).__name__}: {err}): remove it, and --resume runs it again") from None
        if not same:
            raise RecordError(f"{path} records another run than its name says: remove it, and --resume runs it again")
        return curve

    def save(self, key: Mapping[str, Any], curve: np.ndarray) -> None:
        """Record ``curve``, the run of ``key``, atomically, through a temporary file of this
        process's own: a worker of a killed evaluation may still be writing the same record.

        Raises:
            RecordWriteError: the record cannot be written (a full disk: one line, which says that
                ``--resume`` continues from the runs recorded before it).
        """
        text = json.dumps({"key": dict(key), "curve": np.asarray(curve, dtype=np.float64).tolist()})
        try:
            write_atomically(self.path(key), lambda tmp: tmp.write_text(text, encoding="utf-8"), unique=True)
        except OSError as err:
            raise RecordWriteError(f"cannot record a run in {self.folder} ({err.strerror or err}): the {self.count()} runs "
                              "finished before it are recorded; --resume continues from them") from None  # fmt: skip

    def count(self) -> int:
        """How many runs are recorded."""
        return sum(1 for p in self.folder.glob("*.json") if p.name != SETTINGS_NAME) if self.folder.is_dir() else 0

    def check(self, settings: Mapping[str, Any], resume: bool, report: Path | None = None) -> bool:
        """The checks before an evaluation's first run (nothing is written): with ``resume``, that
        runs are recorded under the same ``settings`` (the
        :func:`~learnedopt.evaluation.harness.run_settings` of this run); without, that none are,
        unless they are stale: :meth:`reported_in` ``report`` (the ``<name>.json`` this
        evaluation writes).

        Returns:
            Whether the folder holds stale runs, for the caller to :meth:`clear` (always False
            with ``resume``, which reads them).

        Raises:
            ValueError: one line: the folder a file; runs recorded, not stale, and no ``resume``; ``resume`` and no
                records; a recorded setting that differs from this run's (named as its option).
        """
        saved_path = self.folder / SETTINGS_NAME
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"{self.folder} is a file, where this evaluation records its runs: remove it, or give another --name")
        if not resume:
            if self.count() and report is not None and self.reported_in(report):
                return True
            if self.count():  # a folder of no runs (killed before the first ended) loses nothing
                raise ValueError(
                    f"{self.folder} holds the runs of an unfinished evaluation ({self.count()} recorded): pass --resume "
                    "to continue it, or remove that folder to start again"
                )
        elif not self.folder.is_dir():
            raise ValueError(
                f"--resume: no unfinished evaluation to continue ({self.folder} does not exist: an evaluation's runs "
                "are removed once its report is written); run the command without --resume"
            )
        elif saved_path.is_file():
            try:
                saved = json.loads(saved_path.read_text(encoding="utf-8"))
                _check_settings(saved, _jsonable({"format": RECORDS_FORMAT, **settings}))
            # UnicodeDecodeError: bytes that are not text (an OS crash's), named as a cut file is
            except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
                raise ValueError(
                    f"--resume: {saved_path} is not the settings of an evaluation's runs ({type(err).__name__}: {err})"
                ) from None
        elif self.count():  # the settings are written before the first run: someone removed them
            raise ValueError(f"--resume: {self.folder} holds runs but not their {SETTINGS_NAME}: remove the folder to start again")
        return False

    def reported_in(self, report: Path) -> bool:
        """Whether ``report`` (``<name>.json``, its ``<name>.md`` beside it) is a whole report
        written after every file of the folder: the evaluation that recorded these runs wrote its
        report from them and was killed before it removed them, so they are stale. (An evaluation
        that records runs after a report was written, killed or not, leaves newer files.)"""
        try:
            newest = max((p.stat().st_mtime_ns for p in self.folder.iterdir()), default=0)
            written = min(path.stat().st_mtime_ns for path in (report, report.with_suffix(".md")))
            whole = isinstance(json.loads(report.read_text(encoding="utf-8")).get("problems"), dict)
        except (OSError, ValueError, AttributeError):  # missing, unreadable, or cut short by the kill
            return False
        return whole and written >= newest

    def clear(self) -> None:
        """Remove every record and the settings, keeping the folder (which the running evaluation
        has locked)."""
        for path in self.folder.iterdir():
            path.unlink()

    def begin(self, settings: Mapping[str, Any]) -> None:
        """Create the folder and record ``settings`` (after :meth:`check`, before the first run).

        Raises:
            RecordWriteError: they cannot be written (a full disk: one line, which says what the
                runs recorded before, if any, are kept for).
        """
        text = json.dumps({"format": RECORDS_FORMAT, **settings}, indent=2) + "\n"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomically(self.folder / SETTINGS_NAME, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        except OSError as err:
            kept = (f"the {self.count()} runs finished before it are recorded; --resume continues from them" if self.count()
                    else "no run has started: run the command again once it can write")  # fmt: skip
            raise RecordWriteError(f"cannot record the settings of the runs in {self.folder} ({err.strerror or err}): {kept}") from None


def _check_settings(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` (one line, ``--resume: ...``) naming what differs between the recorded
    settings and this run's."""
    if saved.get("format") != current["format"]:
        raise ValueError(f"--resume: the runs were recorded in format {saved.get('format')!r}, this version reads {current['format']}")
    theirs, ours = saved["config"], current["config"]
    # the MNIST files' content decides, not how their folder was named
    changed = sorted(k for k in {*theirs, *ours} if k != "data" and theirs.get(k) != ours.get(k))
    if changed:
        shown = ", ".join(f"{'--' + k.replace('_', '-') if k in _OPTIONS else k}: {theirs.get(k)!r} -> {ours.get(k)!r}" for k in changed)
        raise ValueError(f"--resume: the configuration differs from the recorded runs' ({shown})")
    if saved["mnist_sha256"] != current["mnist_sha256"]:
        raise ValueError(
            f"--resume: the recorded runs read other MNIST files (SHA-256 {str(saved['mnist_sha256'])[:12]}, "
            f"these {str(current['mnist_sha256'])[:12]})"
        )
    for label, sha in current["weights_sha256"].items():
        if saved["weights_sha256"].get(label, sha) != sha:
            raise ValueError(
                f"--resume: the weights of {label} differ from those the recorded runs used "
                f"(SHA-256 {saved['weights_sha256'][label][:12]}, these {sha[:12]})"
            )
