"""The official Omniglot one-shot evaluation runs of Lake et al. (``all_runs.zip``): reader and
scorer.

Layout of each run folder ``runNN``: ``training/classJJ.png`` (20 images, one per class),
``test/itemKK.png`` (20 images) and ``class_labels.txt``, one line per test item:
``runNN/test/itemKK.png runNN/training/classJJ.png`` (the item and the training image of its
class). A run is 20-way one-shot classification within one alphabet; its score is the percentage
of the 20 test items classified wrongly, and the benchmark reports each run's error and the mean.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

import torch

from .omniglot import _check_image_size, _check_images, _is_png, read_image


@dataclass(frozen=True, repr=False, eq=False)  # the generated ones print every tensor, or fail comparing them
class OneShotRun:
    """One run. Attributes:
    name: the folder name, e.g. ``run01``.
    train_images: float32 ``(C, 1, S, S)``, one per class, in sorted file-name order.
    test_images: float32 ``(T, 1, S, S)``, in sorted file-name order.
    test_labels: int64 ``(T,)``: index into ``train_images`` of each test item's class.
    """

    name: str
    train_images: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor

    def __repr__(self) -> str:
        return (f"OneShotRun({self.name!r}, {len(self.train_images)} training and {len(self.test_images)} test images "
                f"of {'x'.join(map(str, self.train_images.shape[1:]))})")


def load_runs(root: str | os.PathLike[str], image_size: int | None = 28) -> list[OneShotRun]:
    """Read every ``runNN`` folder under ``root`` (``run`` and digits, as all_runs.zip's ``run01``
    ... ``run20``, sorted by name; another folder whose name starts with ``run``, such as a
    ``runs_old/`` backup, is not a run). Hidden files (names starting
    with ``.``, such as the ``._*.png`` copies macOS leaves) are skipped and ``.png`` is matched
    in any case, and a leading ``~`` of ``root`` is the home folder, as by
    :func:`~learnedopt.data.load_omniglot`.

    Raises:
        FileNotFoundError: no such folder, a file, no run folders in it, or a file named in ``class_labels.txt`` is missing.
        ValueError: a malformed ``class_labels.txt`` (or one neither UTF-8 nor UTF-16 with a
            byte-order mark), one that labels a test item twice, or one that does not label
            every test item; with ``image_size=None``, images of different sizes in a run.
    """
    _check_image_size(image_size)
    root = Path(root).expanduser()  # as load_omniglot: no shell expands the "~" of --runs=~/all_runs
    expected = "the folder that holds run01 ... run20 (all_runs.zip unpacked)"
    if not root.exists():
        raise FileNotFoundError(f"no such folder: {root}; give {expected}")
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is a file, not a folder; give {expected}")
    folders = sorted(p for p in root.glob("run*") if p.is_dir() and p.name[3:].isascii() and p.name[3:].isdigit())
    if not folders:
        raise FileNotFoundError(f"no runNN folders (run01 ...) in {root}; give {expected}")
    return [_load_run(folder, image_size) for folder in folders]


def _load_run(folder: Path, image_size: int | None) -> OneShotRun:
    # .png in any case, hidden files skipped: as load_omniglot
    train_files = sorted(f for f in (folder / "training").glob("*") if _is_png(f.name) and not f.name.startswith("."))
    test_files = sorted(f for f in (folder / "test").glob("*") if _is_png(f.name) and not f.name.startswith("."))
    if not train_files or not test_files:
        raise FileNotFoundError(f"{folder}: needs training/*.png and test/*.png")
    train_index = {f.name: i for i, f in enumerate(train_files)}
    test_index = {f.name: i for i, f in enumerate(test_files)}
    labels = [-1] * len(test_files)
    raw = (folder / "class_labels.txt").read_bytes()
    try:  # UTF-16 with a byte-order mark is what Windows PowerShell 5's ">" writes
        text = raw.decode("utf-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{folder}/class_labels.txt is not UTF-8 or UTF-16 text ({e})") from None
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{folder}/class_labels.txt line {number}: expected 'test_item training_image', got {line!r}")
        item, target = PureWindowsPath(parts[0]).name, PureWindowsPath(parts[1]).name  # "/" or "\\"
        if item not in test_index or target not in train_index:
            raise FileNotFoundError(f"{folder}/class_labels.txt line {number}: {item} or {target} not found in the run")
        if labels[test_index[item]] >= 0:
            raise ValueError(f"{folder}/class_labels.txt line {number}: {item} is labelled a second time")
        labels[test_index[item]] = train_index[target]
    missing = [test_files[i].name for i, label in enumerate(labels) if label < 0]
    if missing:
        raise ValueError(f"{folder}/class_labels.txt gives no label for {missing}")
    count = len(train_files) + len(test_files)
    _check_images(image_size, count, "its images", f" and {count} images in {folder}")
    images = {f: read_image(f, image_size) for f in train_files + test_files}
    # with image_size=None, a test item of another size than the training images was read as it
    # is (and one of another size than the other test items failed in torch.stack)
    first = train_files[0]
    other = next((f for f, image in images.items() if image.shape != images[first].shape), None)
    if other is not None:
        size = "x".join(map(str, images[other].shape[1:]))
        raise ValueError(f"{folder}: {other.relative_to(folder)} is {size}, {first.relative_to(folder)} "
                         f"{'x'.join(map(str, images[first].shape[1:]))}: pass image_size")  # fmt: skip
    return OneShotRun(
        name=folder.name,
        train_images=torch.stack([images[f] for f in train_files]),
        test_images=torch.stack([images[f] for f in test_files]),
        test_labels=torch.tensor(labels, dtype=torch.int64),
    )


def score_runs(runs: Sequence[OneShotRun], predictions: Sequence[torch.Tensor]) -> tuple[list[float], float]:
    """Error rate of each run in percent and their mean.

    Args:
        predictions: for each run, int64 ``(T,)`` predicted training-image index of each test item,
            on any device (compared on the device of the run's ``test_labels``).
    """
    if len(runs) != len(predictions):
        raise ValueError(f"{len(runs)} runs but {len(predictions)} prediction sets")
    if not runs:
        raise ValueError("no runs to score: the mean error of zero runs is undefined")
    errors = []
    for run, predicted in zip(runs, predictions, strict=True):
        predicted = torch.as_tensor(predicted).to(run.test_labels.device)  # e.g. a model's argmax on a GPU
        if predicted.shape != run.test_labels.shape:
            raise ValueError(f"{run.name}: predictions of shape {tuple(predicted.shape)}, expected {tuple(run.test_labels.shape)}")
        errors.append(100.0 * (predicted != run.test_labels).float().mean().item())
    return errors, sum(errors) / len(errors)
