"""IDX files (the MNIST format), the MNIST loader and seeded index splits."""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import zlib
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from ..values import is_integer, is_number, seeded_generator
from .paths import resolve_data_dir

_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20  # bytes read at a time
_MAX_NDIM = 64  # numpy's limit; an IDX header may claim up to 255
_MAX_DEFLATE_RATIO = 1032  # deflate inflates at most 258 bytes per 2 bits

# IDX type code -> big-endian element dtype.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file, gzip-compressed or not (detected from the gzip magic bytes).

    The header is checked before the payload is read, and the payload is read in bounded chunks,
    so a header claiming more data than the file holds (or a gzip stream that decompresses to far
    more) is refused without first allocating what it claims.

    Returns:
        A writable native-endian array with the file's dimensions and element type
        (uint8, int8, int16, int32, float32 or float64).

    Raises:
        ValueError: corrupt gzip stream, bad magic number, unknown type code, more dimensions
            than numpy takes, dims too large for an array (even of no element), or a payload that is shorter (truncated) or longer (trailing
            bytes) than the dimensions say.
    """
    path = Path(path)
    with open(path, "rb") as raw:
        compressed = raw.read(2) == _GZIP_MAGIC
        raw.seek(0)
        try:
            if not compressed:
                return _read_idx_stream(raw, path, os.fstat(raw.fileno()).st_size)
            with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                return _read_idx_stream(stream, path, None, os.fstat(raw.fileno()).st_size)
        except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
            if not compressed:
                raise
            raise ValueError(f"{path}: corrupt gzip stream ({e})") from e


def _read_idx_stream(stream: BinaryIO, path: Path, size: int | None, compressed: int | None = None) -> np.ndarray:
    """:func:`read_idx` of an open (possibly decompressing) ``stream``; ``size`` is its length in
    bytes where known (a plain file), None for a gzip stream; ``compressed`` is a gzip file's
    length (None for a plain file)."""
    magic = stream.read(4)
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0:
        raise ValueError(
            f"{path}: bad IDX magic {magic.hex() or '(empty file)'}, expected 0000<type><ndim>"
        )
    type_code, ndim = magic[2], magic[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{type_code:02X}")
    header_len = 4 + 4 * ndim
    dims = stream.read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise ValueError(
            f"{path}: truncated header ({4 + len(dims)} bytes, {header_len} needed for {ndim} dims)"
        )
    if ndim > _MAX_NDIM:
        raise ValueError(f"{path}: {ndim} dimensions in the IDX header, numpy takes at most {_MAX_NDIM}")
    shape = tuple(int(d) for d in np.frombuffer(dims, dtype=">u4"))
    dtype = _IDX_DTYPES[type_code]
    expected = math.prod(shape) * dtype.itemsize
    # numpy bounds the product of the non-zero dims, even for an array of no element
    if math.prod(d for d in shape if d) * dtype.itemsize > np.iinfo(np.intp).max:
        raise ValueError(f"{path}: IDX dims {shape} are too large for an array")
    if compressed is not None and header_len + expected > _MAX_DEFLATE_RATIO * compressed:
        # no gzip file inflates to more: refused before reading (holding) what it does inflate to
        raise ValueError(
            f"{path}: truncated payload: the header claims {expected} bytes for shape {shape}, more than a "
            f"{compressed}-byte gzip file can inflate to ({_MAX_DEFLATE_RATIO}:1 at most)"
        )
    if size is not None and size - header_len < expected:  # before reading (allocating) it
        raise ValueError(
            f"{path}: truncated payload ({size - header_len} bytes, {expected} expected for shape {shape})"
        )
    payload = bytearray()
    while len(payload) < expected:
        chunk = stream.read(min(expected - len(payload), _CHUNK))
        if not chunk:
            raise ValueError(
                f"{path}: truncated payload ({len(payload)} bytes, {expected} expected for shape {shape})"
            )
        payload += chunk
    # counted in chunks, not read whole: a stream may decompress to far more than its file holds
    trailing = 0
    while chunk := stream.read(_CHUNK):
        trailing += len(chunk)
    if trailing:
        raise ValueError(f"{path}: {trailing} trailing bytes after the payload of shape {shape}")
    array = np.frombuffer(payload, dtype=dtype).reshape(shape)
    return array.astype(dtype.newbyteorder("="))  # copies: writable and native-endian


def _find_file(root: Path, name: str) -> Path:
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"neither {name}.gz nor {name} found in {str(root)!r}")


def load_mnist(
    root: str | os.PathLike[str] | None = None, split: str = "t10k"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load MNIST from ``<split>-images-idx3-ubyte[.gz]`` and ``<split>-labels-idx1-ubyte[.gz]``.

    Args:
        root: folder with the files; default ``resolve_data_dir(None, "mnist")``.
        split: file prefix, ``"t10k"`` (10,000 test images) or ``"train"``.

    Returns:
        ``(images, labels)``: uint8 tensor (N, 28, 28) with 0 = background, and int64 (N,).
    """
    directory = resolve_data_dir(root, "mnist")
    images_path = _find_file(directory, f"{split}-images-idx3-ubyte")
    labels_path = _find_file(directory, f"{split}-labels-idx1-ubyte")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(
            f"{images_path}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise ValueError(
            f"{labels_path}: expected uint8 labels (N,), got {labels.dtype} {labels.shape}"
        )
    if len(images) != len(labels):
        raise ValueError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels"
        )
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{images_path}: MNIST images are 28x28, got {images.shape[1]}x{images.shape[2]}")
    if labels.size and int(labels.max()) > 9:
        raise ValueError(f"{labels_path}: MNIST labels are digits 0-9, found {int(labels.max())}")
    return torch.from_numpy(images), torch.from_numpy(labels).long()


def split_indices(
    n: int, fractions: Mapping[str, float], seed: int = 0, *, allow_empty: bool = False
) -> dict[str, torch.Tensor]:
    """Split ``range(n)`` into disjoint parts by a seeded random permutation.

    Part sizes are ``fraction * n`` rounded by the largest-remainder method, so they add up to
    ``n`` exactly (computed exactly, each fraction taken as the ratio of small integers that is
    its float, so equal fractions round alike; of equal remainders the earlier part wins). The same ``(n, fractions, seed)`` always gives the same split.

    Args:
        n: number of items.
        fractions: part name -> fraction, non-negative and summing to 1, e.g.
            ``{"meta_train": 0.6, "meta_valid": 0.1, "held_out": 0.3}``. A part of fraction 0 is
            empty; one of a positive fraction is not, unless ``allow_empty`` (see Raises).
        seed: seed of the permutation.
        allow_empty: let a part of a positive fraction be empty when ``fraction * n`` rounds to
            0, for a caller that reads one part and checks it itself (the MNIST task families on
            a few images read ``meta_train`` though ``meta_valid`` is empty).

    Returns:
        Part name -> sorted int64 tensor of indices, in the order of ``fractions``; together
        the parts cover ``range(n)`` exactly once.

    Raises:
        TypeError: ``fractions`` that is not a mapping (a list of fractions names no part).
        ValueError: bad fractions, or (without ``allow_empty``) a part of a positive fraction
            that would get no item (``fraction * n`` rounds to 0: too few items for that
            fraction); the message names the part, its fraction and ``n``.
    """
    return _split(n, fractions, seed, "items", allow_empty)


def _split(
    n: int, fractions: Mapping[str, float], seed: int, unit: str, allow_empty: bool = False
) -> dict[str, torch.Tensor]:
    """:func:`split_indices`, its errors counting ``n`` in ``unit`` (``"items"``, ``"classes"``, ``"groups"``)."""
    if not is_integer(n) or n < 0:  # a float failed in torch.split, far from its cause
        raise ValueError(f"the number of {unit} must be an integer >= 0, got {n!r}")
    if not isinstance(fractions, Mapping):  # a list failed with "'list' object has no attribute 'values'"
        raise TypeError(
            f"fractions must map part names to fractions, e.g. {{'meta_train': 0.8, 'held_out': 0.2}}, got {fractions!r}"
        )
    if not fractions:
        raise ValueError("fractions must name at least one part")
    if any(not is_number(f) or f < 0 or not math.isfinite(f) for f in fractions.values()):  # "0.5" failed in "<"
        raise ValueError(f"fractions must be finite and non-negative numbers, got {dict(fractions)}")
    total = sum(fractions.values())
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must sum to 1, got {total} from {dict(fractions)}")

    # In exact arithmetic, each fraction the ratio of small integers that is its float (1/9 for
    # 0.111...), else the float's exact value: in floats, 7/9 * 6 came to 4.666...67 and won the
    # leftover item over an equal remainder of an earlier part, 1/9 * 6, leaving that part
    # empty and the split refused.
    ratios = [_ratio(float(f)) for f in fractions.values()]
    exact = [r / sum(ratios) * n for r in ratios]
    sizes = [math.floor(x) for x in exact]
    # Hand the leftover items to the largest remainders (earlier part wins a tie).
    by_remainder = sorted(range(len(exact)), key=lambda i: sizes[i] - exact[i])
    for i in by_remainder[: n - sum(sizes)]:
        sizes[i] += 1
    # an empty part of a positive fraction would surface only where it is used (an episode
    # sampler with no class, a validation set of no example), far from its cause
    empty = [(name, f) for (name, f), size in zip(fractions.items(), sizes) if f > 0 and size == 0]
    if empty and not allow_empty:
        shown = ", ".join(f"{name!r} (fraction {f:g})" for name, f in empty)
        raise ValueError(
            f"splitting {n} {unit} by {dict(fractions)} leaves part{'s' * (len(empty) > 1)} {shown} empty: "
            f"{'they need' if len(empty) > 1 else 'it needs'} more {unit} "
            f"(a fraction f gets at least one of n when f * n >= 1), or fraction 0 to be empty"
        )

    generator = seeded_generator(seed)
    permutation = torch.randperm(n, generator=generator)
    parts = torch.split(permutation, sizes)
    return {name: part.sort().values for name, part in zip(fractions, parts)}


def _ratio(f: float) -> Fraction:
    """``f`` as the ratio of integers up to 10**9 that rounds to it (1/9 for 0.111...), else as
    its exact value (0.5 + 1e-12 is not 1/2)."""
    ratio = Fraction(f).limit_denominator(10**9)
    return ratio if float(ratio) == f else Fraction(f)


def mnist_sha256(data: str | os.PathLike[str] | None, *, required: bool = False) -> str | None:
    """SHA-256 (hex) of the ``t10k`` MNIST images and labels (from ``data`` or the default search;
    as decoded, so a gzipped and a plain copy agree), or None where there are none
    (FileNotFoundError if ``required``): what a run's numbers depend on, wherever the folder is
    (an evaluation report, a ``meta-train`` checkpoint)."""
    try:
        images, labels = load_mnist(data)
    except FileNotFoundError:
        if required:
            raise
        return None
    digest = hashlib.sha256(images.numpy().tobytes())
    digest.update(labels.numpy().tobytes())
    return digest.hexdigest()
