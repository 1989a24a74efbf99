"""Omniglot reader for the official layout, from folders or directly from the official zips."""

from __future__ import annotations

import io
import os
import zipfile
import zlib
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from ..values import check_elements, is_integer
from .paths import resolve_data_dir

DEFAULT_ZIPS = ("images_background_small1.zip", "images_background_small2.zip")
ROTATIONS = (0, 90, 180, 270)

_Character = tuple[str, str]  # (alphabet, character)
_PathLike = str | os.PathLike[str]


@dataclass(repr=False, eq=False)  # the generated ones print every tensor, or fail comparing them
class OmniglotDataset:
    """Omniglot images with one class per character (and per rotation, if asked for).

    Attributes:
        images: float32 (num_images, 1, S, S), 1.0 = ink, 0.0 = background; grouped by
            class, then ordered by file name.
        labels: int64 (num_images,) class index of each image.
        classes: (alphabet, character) of each class index. The unrotated characters come
            first, sorted; with rotations, class ``c + r * C`` (C unrotated classes,
            r = 1, 2, 3) is character ``c`` rotated counter-clockwise by ``90 * r`` degrees
            and named ``"<character>@rot<degrees>"``.
        alphabet_of_class: int64 (num_classes,) index into ``alphabets`` of each class.
        alphabets: sorted alphabet names.
        base_class_of_class: int64 (num_classes,) index of the unrotated class of each class
            (itself without rotations); pass it as ``groups`` to ``class_splits`` to keep all
            rotations of a character in one split.
        rotation_of_class: int64 (num_classes,) rotation of each class in degrees.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[_Character]
    alphabet_of_class: torch.Tensor
    alphabets: list[str]
    base_class_of_class: torch.Tensor
    rotation_of_class: torch.Tensor

    @property
    def num_classes(self) -> int:
        """Number of classes (4 per character with rotations, else 1)."""
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image (1, S, S) float32, label int64 scalar)``."""
        return self.images[index], self.labels[index]

    def __repr__(self) -> str:
        rotations = sorted(set(self.rotation_of_class.tolist()))
        return (f"OmniglotDataset({len(self)} images of {'x'.join(map(str, self.images.shape[1:]))}, "
                f"{self.num_classes} classes ({len(set(self.base_class_of_class.tolist()))} characters, "
                f"rotations {rotations}), alphabets {self.alphabets})")


def _import_pillow() -> ModuleType:
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("reading Omniglot needs Pillow (learnedopt's data extra): pip install Pillow") from e
    return Image


def _read_file(name: str) -> bytes:
    return Path(name).read_bytes()


def _hidden(parts: Sequence[str]) -> bool:
    """Whether ``<alphabet>/<character>/<file>`` has a hidden part: the ``._*.png`` copies macOS
    leaves, or a folder such as ``.ipynb_checkpoints`` or ``.git``, which read as an alphabet or a
    character of their own."""
    return any(part.startswith(".") for part in parts)


def _is_png(name: str) -> bool:
    """Whether a file name ends in ``.png``, in any case (``.PNG`` from some Windows tools)."""
    return name.lower().endswith(".png")


def _scan(
    source: Path, stack: ExitStack
) -> tuple[dict[_Character, list[str]], Callable[[str], bytes]]:
    """Character -> sorted file names in ``source``, and a function reading one file's bytes.

    A folder holds ``<Alphabet>/<character>/*.png``; a zip holds the same under a top-level
    folder (``images_background_smallN/``), or several (a character in more than one is taken
    from the first, sorted). Hidden files and folders (names starting with ``.``)
    are skipped; ``.png`` is matched in any case.
    """
    files: dict[_Character, list[str]] = {}
    stray: list[str] = []  # PNGs one level off the layout, which would be left out
    read: Callable[[str], bytes]
    if source.is_dir():
        for png in sorted(source.glob("*/*/*")):
            if _is_png(png.name) and not _hidden(png.parts[-3:]):
                files.setdefault((png.parts[-3], png.parts[-2]), []).append(str(png))
        for pattern in ("*", "*/*", "*/*/*/*"):
            relative = (png.relative_to(source) for png in source.glob(pattern) if _is_png(png.name))
            stray += sorted(str(r) for r in relative if not _hidden(r.parts) and r.parts[0] != "__MACOSX")
        read = _read_file
        layout = "<Alphabet>/<character>/*.png"
    elif source.is_file():
        try:
            archive = stack.enter_context(zipfile.ZipFile(source))
        except zipfile.BadZipFile as e:
            raise ValueError(f"{source}: not a readable zip file ({e})") from e
        names = archive.namelist()
        if len(set(names)) != len(names):  # archive.read would give the last copy for each of them
            duplicate = next(name for name in names if names.count(name) > 1)
            raise ValueError(f"{source}: the zip holds {duplicate} {names.count(duplicate)} times")
        top_of: dict[_Character, str] = {}  # the top folder each character is taken from
        for name in sorted(names):
            parts = name.split("/")
            # Skip the resource-fork copies that macOS zip tools add.
            if not _is_png(parts[-1]) or parts[0] == "__MACOSX" or _hidden(parts[1:]):
                continue
            if len(parts) == 4:
                # a zip of both small splits holds Greek and Latin twice: the first top folder
                # (sorted) wins, as the first source does across sources
                if top_of.setdefault((parts[1], parts[2]), parts[0]) == parts[0]:
                    files.setdefault((parts[1], parts[2]), []).append(name)
            else:
                stray.append(name)
        read = archive.read
        layout = "<top folder>/<Alphabet>/<character>/*.png"
    else:
        raise FileNotFoundError(f"Omniglot source {str(source)!r} does not exist")
    if not files:
        found = f" (found {stray[0]}{f' and {len(stray) - 1} more' if len(stray) > 1 else ''} outside it)" if stray else ""
        raise ValueError(f"{source}: no PNGs in the Omniglot layout {layout}{found}")
    if stray:  # an alphabet or character a level too high or too deep was left out silently
        raise ValueError(
            f"{source}: {len(stray)} PNG{'s are' if len(stray) > 1 else ' is'} outside the Omniglot layout {layout} "
            f"and would be left out, e.g. {stray[0]}"
        )
    return files, read


def _decode(data: bytes, image_size: int | None, Image: ModuleType, name: str) -> np.ndarray:
    """PNG bytes -> float32 (H, W) with 1.0 = ink (the PNGs store ink as black); a ValueError
    that names ``name`` for bytes Pillow cannot decode. Any mode is read (1-bit, grayscale, RGB,
    16-bit); transparent pixels are background (white)."""
    try:
        with Image.open(io.BytesIO(data)) as png:
            if png.mode.startswith("I"):  # 16-bit grayscale ("I;16", or "I" in older Pillow)
                # convert("L") clips at 255 of 65535, reading all but the darkest ink as
                # background: scale to 8 bits instead, transparent pixels white
                wide = np.asarray(png, dtype=np.int64)
                if "transparency" in png.info:
                    wide = np.where(wide == png.info["transparency"], 65535, wide)
                gray = Image.fromarray(((np.clip(wide, 0, 65535) + 128) // 257).astype(np.uint8))
            elif png.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in png.info:
                # convert("L") drops the alpha channel, so a transparent background (often stored
                # as black) would read as ink: lay the image on white first
                rgba = png.convert("RGBA")
                gray = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("L")
            else:
                gray = png.convert("L")
    # Pillow reports a damaged PNG as any of these, depending on which byte is wrong
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {name} ({type(e).__name__}: {e})") from e
    if image_size is not None and gray.size != (image_size, image_size):
        gray = gray.resize((image_size, image_size), Image.Resampling.LANCZOS)
    return 1.0 - np.asarray(gray, dtype=np.float32) / 255.0


def _check_image_size(image_size: Any) -> None:
    """ValueError unless ``image_size`` is None or an integer >= 1 (Pillow's own error for 0
    reads as the image's fault, and a float passes until the first resize) whose ``S x S`` image
    has at most :data:`~learnedopt.values.MAX_ELEMENTS` elements (``10**6`` tried to allocate a
    10**12-pixel image)."""
    if image_size is not None and (not is_integer(image_size) or image_size < 1):
        raise ValueError(f"image_size must be an integer >= 1 or None (keep the original size), got {image_size!r}")
    _check_images(image_size, 1, "an image")


def _check_images(image_size: int | None, count: int, tensor: str, settings: str = "") -> None:
    """ValueError where ``count`` images of ``image_size`` (None: their own size, unknown before
    decoding) would hold more than :data:`~learnedopt.values.MAX_ELEMENTS` elements, checked
    before any is decoded; ``settings`` adds to the message's ``image_size S``."""
    if image_size is not None:
        check_elements(f"image_size {image_size}{settings}", count * image_size**2, tensor)


def read_image(path: str | os.PathLike[str], image_size: int | None = 28) -> torch.Tensor:
    """One Omniglot PNG as a float32 ``(1, S, S)`` tensor, 1.0 = ink, resized as in
    :func:`load_omniglot` (``image_size=None`` keeps 105x105)."""
    _check_image_size(image_size)
    data = Path(path).expanduser().read_bytes()  # "~" as load_mnist and LEARNEDOPT_DATA take it
    return torch.from_numpy(_decode(data, image_size, _import_pillow(), str(path))).unsqueeze(0)


def _official_zips_in(source: Path) -> list[Path]:
    """``source``, or the official zips it holds (itself or in its ``omniglot/``) if a folder."""
    if not source.is_dir():
        return [source]
    for folder in (source, source / "omniglot"):
        zips = [folder / name for name in DEFAULT_ZIPS if (folder / name).is_file()]
        if zips:
            return zips
    return [source / "omniglot"] if (source / "omniglot").is_dir() else [source]


def load_omniglot(
    sources: _PathLike | Sequence[_PathLike] | None = None,
    image_size: int | None = 28,
    rotations: bool = False,
) -> OmniglotDataset:
    """Load Omniglot characters from official zips and/or folders.

    Args:
        sources: zips (``images_background_smallN/<Alphabet>/characterNN/*.png`` inside) or
            folders (``<Alphabet>/characterNN/*.png``). A folder holding the official zips
            (``images_background_small1.zip``, ``images_background_small2.zip``) stands for
            them, and one holding ``omniglot/`` (a data root) for that. A leading ``~`` is the
            home folder, as for ``load_mnist``. Default: those zips in
            ``resolve_data_dir(None, "omniglot")``.
            A character found in several sources is taken from the first one only (and one
            in several top folders of a zip from the first of them in sorted order).
        image_size: resize the 105x105 images to ``image_size`` x ``image_size`` with
            Pillow's LANCZOS filter on 8-bit grayscale (values then lie in [0, 1] in steps of
            1/255); None keeps the original size and the exact 0/1 values.
        rotations: add three classes per character, rotated by 90, 180 and 270 degrees.

    Returns:
        An :class:`OmniglotDataset`; with both default zips it has 242 characters
        (Greek and Latin are in both) with 20 images each.

    Raises:
        FileNotFoundError: a source that does not exist.
        TypeError: ``sources`` that are not paths.
        ValueError: an ``image_size`` that is not an integer >= 1 or None; a source that is not
            a readable zip, holds a member twice, no PNG in the layout or PNGs a level off it
            (which would be left out); an image that cannot
            be read or decoded (the message names the source and the file); images of different
            sizes, or not square with ``rotations``, without ``image_size``.
    """
    Image = _import_pillow()
    _check_image_size(image_size)
    if sources is None:
        directory = resolve_data_dir(None, "omniglot")
        sources = [directory / name for name in DEFAULT_ZIPS]
    elif isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    elif not isinstance(sources, Sequence) or isinstance(sources, bytes) or not all(
        isinstance(source, (str, os.PathLike)) for source in sources
    ):  # bytes would be taken as a sequence of ints
        raise TypeError(f"sources must be a path or a list of paths (str or os.PathLike), got {sources!r}")
    if not sources:
        raise ValueError("no Omniglot sources given")
    # "~" expanded as load_mnist and LEARNEDOPT_DATA do: no shell expands it in --data=~/data
    sources = [path for source in sources for path in _official_zips_in(Path(source).expanduser())]

    with ExitStack() as stack:
        chosen: dict[_Character, tuple[Callable[[str], bytes], list[str], Path]] = {}
        for source in map(Path, sources):
            files, read = _scan(source, stack)
            for character, names in files.items():
                chosen.setdefault(character, (read, names, source))

        classes = sorted(chosen)
        count = sum(len(names) for _, names, _ in chosen.values()) * (len(ROTATIONS) if rotations else 1)
        _check_images(image_size, count, "the (N, 1, S, S) images", f" and {count} images{' (with rotations)' if rotations else ''}")
        arrays, labels, where = [], [], []
        for label, character in enumerate(classes):
            read, names, source = chosen[character]
            for name in names:
                try:
                    data = read(name)
                # a file, or a zip member that is damaged (BadZipFile, zlib.error), encrypted
                # (RuntimeError) or compressed by a method zipfile lacks (NotImplementedError)
                except (OSError, EOFError, zipfile.BadZipFile, zlib.error, RuntimeError, NotImplementedError) as e:
                    raise ValueError(f"{source}: cannot read image {name} ({type(e).__name__}: {e})") from e
                try:
                    arrays.append(_decode(data, image_size, Image, name))
                except ValueError as e:
                    raise ValueError(f"{source}: {e}") from e
                labels.append(label)
                where.append(name if source.is_dir() else f"{name} in {source}")

    (height, width) = arrays[0].shape
    odd = next((i for i, a in enumerate(arrays) if a.shape != arrays[0].shape), None)
    if odd is not None:  # named, for one odd file among thousands
        raise ValueError(f"images of different sizes: {where[odd]} is {arrays[odd].shape[1]}x{arrays[odd].shape[0]}, "
                         f"{where[0]} {width}x{height} (width x height): pass image_size")  # fmt: skip
    if rotations and height != width:
        raise ValueError(f"rotations need square images, these are {height}x{width} (height x width): pass image_size")
    images = torch.from_numpy(np.stack(arrays)).unsqueeze(1)
    labels_t = torch.tensor(labels, dtype=torch.long)
    alphabets = sorted({alphabet for alphabet, _ in classes})
    alphabet_of_class = torch.tensor([alphabets.index(a) for a, _ in classes], dtype=torch.long)

    num_base = len(classes)
    angles = ROTATIONS if rotations else ROTATIONS[:1]
    all_classes = [
        (alphabet, character if angle == 0 else f"{character}@rot{angle}")
        for angle in angles
        for alphabet, character in classes
    ]
    rotated = [images] + [torch.rot90(images, k, dims=(-2, -1)) for k in range(1, len(angles))]
    return OmniglotDataset(
        images=torch.cat(rotated) if rotations else images,
        labels=torch.cat([labels_t + k * num_base for k in range(len(angles))]),
        classes=all_classes,
        alphabet_of_class=alphabet_of_class.repeat(len(angles)),
        alphabets=alphabets,
        base_class_of_class=torch.arange(num_base).repeat(len(angles)),
        rotation_of_class=torch.tensor(angles).repeat_interleave(num_base),
    )
