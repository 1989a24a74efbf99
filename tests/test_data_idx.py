"""IDX reading, the MNIST loader, seeded index splits and data-path resolution."""

from __future__ import annotations

import gzip
import re
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learnedopt.data import (
    DATA_ENV_VAR,
    default_data_root,
    load_mnist,
    read_idx,
    resolve_data_dir,
    split_indices,
)
from learnedopt.data import paths as paths_module

TYPE_CODES = {
    np.uint8: 0x08,
    np.int8: 0x09,
    np.int16: 0x0B,
    np.int32: 0x0C,
    np.float32: 0x0D,
    np.float64: 0x0E,
}


def idx_bytes(array: np.ndarray, type_code: int | None = None) -> bytes:
    """Encode ``array`` as IDX, written out by hand from the format description."""
    code = TYPE_CODES[array.dtype.type] if type_code is None else type_code
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write(path: Path, data: bytes, compress: bool = False) -> Path:
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("dtype", list(TYPE_CODES), ids=lambda d: d.__name__)
def test_round_trip(tmp_path: Path, dtype: type, compress: bool) -> None:
    rng = np.random.default_rng(0)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        array = rng.integers(info.min, info.max, size=(3, 4, 5), endpoint=True).astype(dtype)
        array.flat[:2] = [info.min, info.max]
    else:
        array = (rng.standard_normal((3, 4, 5)) * 1e3).astype(dtype)
    path = write(tmp_path / "a.idx", idx_bytes(array), compress)

    result = read_idx(path)

    assert result.dtype == np.dtype(dtype) and result.dtype.isnative
    assert result.shape == (3, 4, 5)
    np.testing.assert_array_equal(result, array)
    assert result.flags.writeable


@pytest.mark.parametrize("shape", [(7,), (0, 28, 28), (2, 1, 3, 1)])
def test_round_trip_shapes(tmp_path: Path, shape: tuple[int, ...]) -> None:
    array = np.arange(np.prod(shape), dtype=np.int32).reshape(shape)
    np.testing.assert_array_equal(read_idx(write(tmp_path / "a", idx_bytes(array))), array)


def test_mnist_header_layout(tmp_path: Path) -> None:
    # The 16-byte header of an MNIST image file: magic 0x00000803, then N, rows, cols.
    pixels = bytes(range(2 * 2 * 3))
    data = bytes.fromhex("00000803") + struct.pack(">3I", 2, 2, 3) + pixels
    result = read_idx(write(tmp_path / "images", data))
    assert result.tolist() == [[[0, 1, 2], [3, 4, 5]], [[6, 7, 8], [9, 10, 11]]]


GOOD = idx_bytes(np.arange(12, dtype=np.int16).reshape(3, 4))


@pytest.mark.parametrize(
    ("data", "compress", "message"),
    [
        (b"", False, "bad IDX magic"),
        (b"\x01" + GOOD[1:], False, "bad IDX magic"),
        (b"\x00\x01" + GOOD[2:], False, "bad IDX magic"),
        (GOOD[:2] + b"\x0a" + GOOD[3:], False, "unknown IDX type code 0x0A"),
        (GOOD[:7], False, "truncated header"),
        (GOOD[:11], False, "truncated header"),  # one byte short of the second dimension
        (b"\x1f\x00" + GOOD[2:], False, "bad IDX magic"),  # only half of gzip's magic
        (GOOD[:-1], False, "truncated payload"),
        (GOOD[:-1], True, "truncated payload"),
        (GOOD + b"\x00\x00", False, "2 trailing bytes"),
        (GOOD + b"\x00", True, "1 trailing bytes"),
        (b"\x1f\x8b" + b"not a gzip stream at all", False, "corrupt gzip"),
        (gzip.compress(GOOD)[:-12], False, "corrupt gzip"),
        (bytes([0, 0, 8, 65]) + b"\x00\x00\x00\x01" * 65 + b"\x07", False, "65 dimensions in the IDX header"),
        # no element, but dims whose product no array can hold (numpy's unnamed "array is too big")
        (struct.pack(">4B3I", 0, 0, 8, 3, 0, 2**32 - 1, 2**32 - 1), False, "too large for an array"),
        (struct.pack(">4B3I", 0, 0, 8, 3, 0, 2**32 - 1, 2**32 - 1), True, "too large for an array"),
    ],
    ids=[
        "empty",
        "bad-byte0",
        "bad-byte1",
        "bad-type",
        "short-header",
        "header-one-byte-short",
        "half-gzip-magic",
        "truncated",
        "truncated-gz",
        "trailing",
        "trailing-gz",
        "garbage-gz",
        "truncated-gz-stream",
        "too-many-dims",
        "no-element-dims-overflow",
        "no-element-dims-overflow-gz",
    ],
)
def test_read_idx_errors(tmp_path: Path, data: bytes, compress: bool, message: str) -> None:
    path = write(tmp_path / "broken-file.idx", data, compress)
    with pytest.raises(ValueError, match=message) as info:
        read_idx(path)
    assert "broken-file.idx" in str(info.value)


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_read_idx_checks_the_header_before_holding_the_payload(tmp_path: Path, compress: bool) -> None:
    # a header claiming 10**9 images over a tiny file, and one image followed by a gzip stream
    # that inflates to 100 MB: both refused without holding what they claim or inflate to
    huge = struct.pack(">4B3I", 0, 0, 8, 3, 10**9, 28, 28) + bytes(100)
    bomb = struct.pack(">4BI", 0, 0, 8, 1, 1) + bytes(1 + 100_000_000)
    for name, data, message in (("huge", huge, "truncated payload"), ("bomb", bomb, "100000000 trailing bytes")):
        path = write(tmp_path / name, data, compress or name == "bomb")
        tracemalloc.start()
        try:
            with pytest.raises(ValueError, match=message):
                read_idx(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 20_000_000, f"{name}: {peak} bytes held"


def test_read_idx_refuses_a_gzip_file_too_small_to_inflate_to_its_header_claim(tmp_path: Path) -> None:
    """A header claiming 10**9 bytes over a 0.1 MB gzip file (deflate inflates at most 1032:1)
    was read until the stream ended, holding all it inflated to (here 100 MB) before refusing."""
    data = struct.pack(">4BI", 0, 0, 8, 1, 10**9) + bytes(100_000_000)
    path = write(tmp_path / "claims.gz", data, compress=True)
    assert 1032 * path.stat().st_size < 10**9
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"claims\.gz: truncated payload: the header claims 1000000000 bytes"):
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, f"{peak} bytes held"


def make_mnist(directory: Path, n: int, n_labels: int | None = None, gz: bool = True) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n_labels or n, dtype=np.uint8)
    suffix = ".gz" if gz else ""
    write(directory / f"t10k-images-idx3-ubyte{suffix}", idx_bytes(images), gz)
    write(directory / f"t10k-labels-idx1-ubyte{suffix}", idx_bytes(labels), gz)


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_load_mnist_generated(tmp_path: Path, gz: bool) -> None:
    make_mnist(tmp_path, 5, gz=gz)
    images, labels = load_mnist(tmp_path)
    assert images.shape == (5, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (5,) and labels.dtype == torch.int64
    rng = np.random.default_rng(1)
    np.testing.assert_array_equal(images.numpy(), rng.integers(0, 256, (5, 28, 28), np.uint8))


def test_read_idx_of_zero_dimensions_is_one_value(tmp_path: Path) -> None:
    value = np.array(-7, dtype=np.int32)
    read = read_idx(write(tmp_path / "scalar.idx", idx_bytes(value)))
    assert read.shape == () and read.dtype == np.int32 and int(read) == -7


@pytest.mark.parametrize("shape", [(2, 28, 27), (2, 27, 28)])
def test_load_mnist_refuses_images_not_28x28(tmp_path: Path, shape: tuple[int, ...]) -> None:
    write(tmp_path / "t10k-images-idx3-ubyte", idx_bytes(np.zeros(shape, dtype=np.uint8)))
    write(tmp_path / "t10k-labels-idx1-ubyte", idx_bytes(np.zeros(2, dtype=np.uint8)))
    with pytest.raises(ValueError, match=f"MNIST images are 28x28, got {shape[1]}x{shape[2]}"):
        load_mnist(tmp_path)


def test_load_mnist_count_mismatch(tmp_path: Path) -> None:
    make_mnist(tmp_path, 5, n_labels=4)
    with pytest.raises(ValueError, match="5 images but .* 4 labels"):
        load_mnist(tmp_path)


def test_load_mnist_refuses_a_label_above_9(tmp_path: Path) -> None:
    make_mnist(tmp_path, 3)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    write(labels, idx_bytes(np.array([0, 9, 10], np.uint8)), compress=True)
    with pytest.raises(ValueError, match="MNIST labels are digits 0-9, found 10") as info:
        load_mnist(tmp_path)
    assert str(labels) in str(info.value)
    write(labels, idx_bytes(np.array([0, 9, 9], np.uint8)), compress=True)
    assert load_mnist(tmp_path)[1].tolist() == [0, 9, 9]


def test_load_mnist_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        load_mnist(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mnist(tmp_path / "nowhere")


def test_load_mnist_given_a_file_says_so(tmp_path: Path) -> None:
    """A user who passes the images file itself must not be told that it does not exist."""
    make_mnist(tmp_path, 3)
    images = next(tmp_path.glob("t10k-images-idx3-ubyte*"))
    with pytest.raises(FileNotFoundError, match="is a file: pass the folder that holds it") as info:
        load_mnist(images)
    assert "does not exist" not in str(info.value)


def test_load_mnist_uses_env_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mnist").mkdir()
    make_mnist(tmp_path / "mnist", 3)
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path))
    assert load_mnist()[0].shape == (3, 28, 28)


# Data roots ---------------------------------------------------------------------------------


def test_data_root_env_var_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path / "mine"))
    assert default_data_root() == tmp_path / "mine"


def test_data_root_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_ENV_VAR, raising=False)
    work = tmp_path / "project"
    work.mkdir()
    monkeypatch.chdir(work)
    sibling = tmp_path / "elsewhere" / "shared" / "data"
    monkeypatch.setattr(paths_module, "_repo_sibling_root", lambda: sibling)
    assert default_data_root() is None

    sibling.mkdir(parents=True)
    assert default_data_root() == sibling

    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert default_data_root() == (tmp_path / "shared" / "data").resolve()


def test_shared_data_beside_the_repository_is_searched_only_from_a_source_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fallback ``shared/data`` beside the repository was the package's folder three levels
    up: for an installed package, a folder inside the virtual environment
    (``<venv>/lib/python3.X/shared/data``), searched and used where it existed, while the help
    texts and the error said "beside the repository". It is searched only from a source checkout
    (``pyproject.toml`` beside the package), and the error names the folders it looked in."""
    monkeypatch.delenv(DATA_ENV_VAR, raising=False)
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)  # no ../shared/data from here
    installed = tmp_path / "venv" / "lib" / "python3.12" / "site-packages" / "learnedopt" / "data" / "paths.py"
    (tmp_path / "venv" / "lib" / "python3.12" / "shared" / "data" / "mnist").mkdir(parents=True)
    monkeypatch.setattr(paths_module, "__file__", str(installed))
    assert default_data_root() is None
    with pytest.raises(FileNotFoundError) as info:
        resolve_data_dir(None, "mnist")
    message = str(info.value)
    assert str((tmp_path / "work" / "shared" / "data").resolve()) in message and "venv" not in message, message
    assert "not a source checkout" in message and "\n" not in message, message

    checkout = tmp_path / "src" / "learnedopt-repo"
    (checkout / "learnedopt" / "data").mkdir(parents=True)
    (checkout / "pyproject.toml").write_text("[project]\nname = 'learnedopt'\n")
    monkeypatch.setattr(paths_module, "__file__", str(checkout / "learnedopt" / "data" / "paths.py"))
    sibling = (tmp_path / "src" / "shared" / "data").resolve()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{sibling} (shared/data beside the source checkout)")):
        resolve_data_dir(None, "mnist")
    (sibling / "mnist").mkdir(parents=True)
    assert default_data_root() == sibling
    assert resolve_data_dir(None, "mnist") == sibling / "mnist"


def test_resolve_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_data_dir(tmp_path, "mnist") == tmp_path
    (tmp_path / "mnist").mkdir()
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path))
    assert resolve_data_dir(None, "mnist") == tmp_path / "mnist"
    with pytest.raises(FileNotFoundError, match=f"omniglot.*{DATA_ENV_VAR}") as info:
        resolve_data_dir(None, "omniglot")
    assert "\n" not in str(info.value)

    monkeypatch.delenv(DATA_ENV_VAR)
    monkeypatch.setattr(paths_module, "default_data_root", lambda: None)
    with pytest.raises(FileNotFoundError, match=DATA_ENV_VAR):
        resolve_data_dir(None, "mnist")


def test_a_wrong_data_env_var_is_named_with_its_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LEARNEDOPT_DATA naming a file, a missing folder or a folder without ``mnist/`` was reported
    as "data directory '<it>/mnist' does not exist: set LEARNEDOPT_DATA ...", which the user had."""
    (tmp_path / "a_file").write_text("")
    (tmp_path / "empty").mkdir()
    for value, problem in (("a_file", "is a file, not a folder"), ("missing", "does not exist"),
                           ("empty", "holds no mnist/ folder")):  # fmt: skip
        monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path / value))
        for load in (lambda: resolve_data_dir(None, "mnist"), load_mnist):
            with pytest.raises(FileNotFoundError) as info:
                load()
            assert str(info.value).startswith(f"{DATA_ENV_VAR}={tmp_path / value} {problem}"), str(info.value)
            assert "\n" not in str(info.value)


def test_resolve_data_dir_prefers_the_subfolder_of_a_given_root(tmp_path: Path) -> None:
    (tmp_path / "mnist").mkdir()
    assert resolve_data_dir(tmp_path, "mnist") == tmp_path / "mnist"
    assert resolve_data_dir(tmp_path / "mnist", "mnist") == tmp_path / "mnist"  # the folder itself
    assert resolve_data_dir(tmp_path, "omniglot") == tmp_path


# Index splits -------------------------------------------------------------------------------

FRACTIONS = {"meta_train": 0.6, "meta_valid": 0.1, "held_out": 0.3}


def test_create_output_folder_makes_it_or_names_why_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made = paths_module.create_output_folder(tmp_path / "a" / "b")
    assert made == tmp_path / "a" / "b" and made.is_dir()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        paths_module.create_output_folder(a_file)
    with pytest.raises(ValueError, match="cannot create the folder"):
        paths_module.create_output_folder(a_file / "below")
    # root may write anywhere, so the permission check is exercised through os.access
    monkeypatch.setattr(paths_module.os, "access", lambda path, mode: False)
    with pytest.raises(ValueError, match="the folder is not writable"):
        paths_module.create_output_folder(made)


def test_split_indices_sizes_and_determinism() -> None:
    parts = split_indices(10_000, FRACTIONS, seed=3)
    assert list(parts) == list(FRACTIONS)
    assert [len(p) for p in parts.values()] == [6000, 1000, 3000]
    assert torch.equal(torch.cat(list(parts.values())).sort().values, torch.arange(10_000))
    again = split_indices(10_000, FRACTIONS, seed=3)
    assert all(torch.equal(parts[k], again[k]) for k in parts)
    other = split_indices(10_000, FRACTIONS, seed=4)
    assert not torch.equal(parts["held_out"], other["held_out"])


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 500),
    weights=st.lists(st.integers(0, 10), min_size=1, max_size=5).filter(any),
    seed=st.integers(0, 2**31),
)
def test_split_indices_partition(n: int, weights: list[int], seed: int) -> None:
    fractions = {f"part{i}": w / sum(weights) for i, w in enumerate(weights)}
    parts = split_indices(n, fractions, seed, allow_empty=True)
    empty = any(f > 0 and not len(parts[name]) for name, f in fractions.items())
    try:
        split_indices(n, fractions, seed)
        assert not empty
    except ValueError as err:  # only for a part of a positive fraction that would be empty, of less than 1 item exact
        assert empty and "empty" in str(err) and any(f > 0 and f * n < 1 for f in fractions.values()), err
    everything = torch.cat(list(parts.values()))
    assert torch.equal(everything.sort().values, torch.arange(n))  # disjoint and covering
    for name, part in parts.items():
        assert part.dtype == torch.int64
        assert torch.equal(part, part.sort().values)  # sorted, as documented
        assert abs(len(part) - fractions[name] * n) < 1


@pytest.mark.parametrize(
    "fractions", [{}, {"a": 0.5, "b": 0.4}, {"a": 1.2, "b": -0.2}, {"a": float("nan")}]
)
def test_split_indices_rejects_bad_fractions(fractions: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        split_indices(10, fractions)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "0.5", None, True])  # a string failed in "<", True was 1
def test_split_indices_names_a_non_finite_fraction(bad: float) -> None:
    with pytest.raises(ValueError, match="fractions must be finite and non-negative"):
        split_indices(10, {"a": bad, "b": 0.5})


def test_split_indices_refuses_a_positive_fraction_that_would_get_no_item() -> None:
    """10 items by 0.8/0.15/0.05: meta_test would get none (0.5 rounds to 0 beside 8.0 and 1.5),
    which an episode sampler or validation set of that part refused only far from the split."""
    fractions = {"meta_train": 0.8, "meta_valid": 0.15, "meta_test": 0.05}
    message = re.escape(f"splitting 10 items by {fractions} leaves part 'meta_test' (fraction 0.05) empty: it needs more items")
    with pytest.raises(ValueError, match=message):
        split_indices(10, fractions)
    with pytest.raises(ValueError, match=r"leaves parts 'b' \(fraction 0.25\), 'c' \(fraction 0.25\) empty: they need"):
        split_indices(1, {"a": 0.5, "b": 0.25, "c": 0.25})
    assert [len(p) for p in split_indices(20, fractions).values()] == [16, 3, 1]  # 20 items suffice
    assert [len(p) for p in split_indices(10, {"a": 1.0, "none": 0.0}).values()] == [10, 0]  # empty on purpose
    # a caller that reads one part and checks it itself may take the rounding as it falls
    assert [len(p) for p in split_indices(10, fractions, allow_empty=True).values()] == [8, 2, 0]


@pytest.mark.parametrize("fractions", [{"a": 0.6, "b": 0.37}, {"a": 0.6, "b": 0.4 - 1e-5}])
def test_split_indices_rejects_fractions_slightly_off_1(fractions: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="fractions must sum to 1, got 0.9"):
        split_indices(100, fractions)


# Real data ----------------------------------------------------------------------------------

_ROOT = default_data_root()
_MNIST = _ROOT / "mnist" if _ROOT is not None else None


@pytest.mark.skipif(
    _MNIST is None or not (_MNIST / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"real MNIST not found (looked in {_MNIST}; set {DATA_ENV_VAR})",
)
def test_real_mnist() -> None:
    images, labels = load_mnist()
    assert images.shape == (10_000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10_000,) and labels.dtype == torch.int64
    assert labels.min() == 0 and labels.max() == 9
    assert torch.equal(labels.unique(), torch.arange(10))
    assert labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the well-known first labels
    assert images.max() == 255 and images[:, 0, 0].max() == 0  # white digits on black corners


@pytest.mark.parametrize("fractions", [[0.6, 0.4], (("a", 0.6), ("b", 0.4)), 0.5, None])
def test_split_indices_names_fractions_that_are_not_a_mapping(fractions: object) -> None:
    """A list of fractions failed with AttributeError "'list' object has no attribute 'values'"
    (None with "must name at least one part")."""
    with pytest.raises(TypeError, match=r"^fractions must map part names to fractions, e\.g\. \{'meta_train': 0\.8, 'held_out': 0\.2\}, got "):
        split_indices(10, fractions)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^fractions must map part names to fractions"):
        from learnedopt.data import class_splits

        class_splits(10, fractions)  # type: ignore[arg-type]
