"""Property tests of the data readers on small generated data: IDX round trips and refusals,
exact largest-remainder splits, resumable episode streams and the identity affine map."""

from __future__ import annotations

import gzip
import io
import math
from fractions import Fraction
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from learnedopt.data import AffineRanges, EpisodeSampler, class_splits, load_omniglot, random_affine, read_idx, split_indices

FAST = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])

# IDX type code -> element type, from the format description (big-endian on disk)
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def idx_file(path: Path, code: int, array: np.ndarray, compress: bool) -> Path:
    """Write ``array`` as an IDX file of type ``code``, byte by byte from the format description."""
    header = bytes([0, 0, code, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(IDX_TYPES[code]).tobytes()
    path.write_bytes(gzip.compress(data, mtime=0) if compress else data)
    return path


@st.composite
def idx_arrays(draw: st.DrawFn) -> tuple[int, np.ndarray]:
    code = draw(st.sampled_from(sorted(IDX_TYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=1, max_size=4)))
    dtype = np.dtype(IDX_TYPES[code]).newbyteorder("=")
    size = math.prod(shape)
    if dtype.kind == "f":
        values = draw(st.lists(st.floats(width=8 * dtype.itemsize, allow_nan=False), min_size=size, max_size=size))
    else:
        info = np.iinfo(dtype)
        values = draw(st.lists(st.integers(int(info.min), int(info.max)), min_size=size, max_size=size))
    return code, np.array(values, dtype=dtype).reshape(shape)


@FAST
@given(case=idx_arrays(), compress=st.booleans())
def test_idx_round_trip_of_every_type_and_1_to_4_dims(tmp_path: Path, case: tuple[int, np.ndarray], compress: bool) -> None:
    code, array = case
    result = read_idx(idx_file(tmp_path / "a.idx", code, array, compress))
    assert result.shape == array.shape
    assert result.dtype == array.dtype and result.dtype.isnative  # big-endian on disk, native in memory
    assert result.flags.writeable
    np.testing.assert_array_equal(result, array)


def test_idx_reads_the_bytes_big_endian(tmp_path: Path) -> None:
    # 0x0102 as int16 and 1.0 as float32, written out by hand
    (tmp_path / "i").write_bytes(bytes([0, 0, 0x0B, 1, 0, 0, 0, 1, 1, 2]))
    (tmp_path / "f").write_bytes(bytes([0, 0, 0x0D, 1, 0, 0, 0, 1, 0x3F, 0x80, 0, 0]))
    assert read_idx(tmp_path / "i").tolist() == [0x0102]
    assert read_idx(tmp_path / "f").tolist() == [1.0]


@FAST
@given(case=idx_arrays(), compress=st.booleans(), cut=st.floats(0, 1, exclude_max=True))
def test_a_truncated_idx_file_is_refused_in_one_line_naming_it(
    tmp_path: Path, case: tuple[int, np.ndarray], compress: bool, cut: float
) -> None:
    code, array = case
    path = idx_file(tmp_path / "cut-me.idx", code, array, compress=False)
    data = path.read_bytes()
    data = data[: int(cut * len(data))]
    path.write_bytes(gzip.compress(data, mtime=0) if compress else data)
    with pytest.raises(ValueError) as info:
        read_idx(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert any(word in message for word in ("truncated", "bad IDX magic")), message


@FAST
@given(case=idx_arrays(), cut=st.integers(1, 40))
def test_a_truncated_gzip_stream_is_refused_naming_the_file(tmp_path: Path, case: tuple[int, np.ndarray], cut: int) -> None:
    code, array = case
    path = idx_file(tmp_path / "cut.gz", code, array, compress=True)
    data = path.read_bytes()
    path.write_bytes(data[: max(2, len(data) - cut)])
    with pytest.raises(ValueError, match=r"cut\.gz: (corrupt gzip stream|truncated)") as info:
        read_idx(path)
    assert "\n" not in str(info.value)


@FAST
@given(case=idx_arrays(), compress=st.booleans(), extra=st.integers(1, 2**20), dim=st.integers(0, 3))
def test_a_header_claiming_more_than_the_file_holds_is_refused(
    tmp_path: Path, case: tuple[int, np.ndarray], compress: bool, extra: int, dim: int
) -> None:
    code, array = case
    data = bytearray(idx_file(tmp_path / "x", code, array, compress=False).read_bytes())
    dim %= array.ndim
    assume(all(array.shape[:dim] + array.shape[dim + 1 :]))  # else it still claims no element
    data[4 + 4 * dim : 8 + 4 * dim] = (array.shape[dim] + extra).to_bytes(4, "big")
    path = tmp_path / "claims-more.idx"
    path.write_bytes(gzip.compress(bytes(data), mtime=0) if compress else bytes(data))
    with pytest.raises(ValueError, match=r"claims-more\.idx: (truncated payload|\d+ trailing bytes)"):
        read_idx(path)


@FAST
@given(
    case=idx_arrays(),
    compress=st.booleans(),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=3),
)
def test_a_corrupt_idx_file_is_read_or_refused_naming_it(
    tmp_path: Path, case: tuple[int, np.ndarray], compress: bool, flips: list[tuple[int, int]]
) -> None:
    """Flipped bits anywhere: a ValueError naming the file, or (in the payload, which IDX does not
    check) an array of the header's shape; never another exception."""
    code, array = case
    path = idx_file(tmp_path / "flipped.idx", code, array, compress)
    data = bytearray(path.read_bytes())
    for at, bits in flips:
        data[at % len(data)] ^= bits
    path.write_bytes(bytes(data))
    try:
        result = read_idx(path)
    except ValueError as e:
        assert str(e).startswith(f"{path}: ") and "\n" not in str(e)
    else:
        assert isinstance(result, np.ndarray) and result.dtype.isnative


# split_indices / class_splits ----------------------------------------------------------------


def largest_remainder(n: int, weights: list[int]) -> list[int]:
    """Sizes of ``weights / sum(weights) * n`` by largest remainders in exact arithmetic, an
    earlier part winning a tie."""
    exact = [Fraction(w, sum(weights)) * n for w in weights]
    sizes = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: sizes[i] - exact[i])
    for i in by_remainder[: n - sum(sizes)]:
        sizes[i] += 1
    return sizes


@settings(max_examples=80, deadline=None, derandomize=True)
@given(
    n=st.integers(0, 200),
    weights=st.lists(st.integers(0, 9), min_size=1, max_size=5).filter(any),
    seed=st.integers(0, 2**31),
)
def test_split_sizes_are_the_exact_largest_remainders(n: int, weights: list[int], seed: int) -> None:
    fractions = {f"part{i}": w / sum(weights) for i, w in enumerate(weights)}
    parts = split_indices(n, fractions, seed, allow_empty=True)
    assert [len(p) for p in parts.values()] == largest_remainder(n, weights)
    assert torch.equal(torch.cat(list(parts.values())).sort().values, torch.arange(n))  # no overlap, full cover
    again = split_indices(n, fractions, seed, allow_empty=True)
    assert all(torch.equal(parts[k], again[k]) for k in parts)


def test_equal_fractions_round_alike_and_valid_splits_are_not_refused() -> None:
    """1/9 beside 1/9 and 7/9 of 6 items is 2/3, 2/3 and 14/3: one each, and four; the third
    ninth of a float (7/9 * 6 = 4.666...67) won the leftover over the second part's equal
    remainder, which was left empty and the split refused."""
    fractions = {"a": 1 / 9, "b": 1 / 9, "c": 7 / 9}
    assert [len(p) for p in split_indices(6, fractions).values()] == [1, 1, 4]
    assert [len(p) for p in class_splits(6, fractions).values()] == [1, 1, 4]


@FAST
@given(
    num_classes=st.integers(1, 40),
    weights=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    n_groups=st.integers(1, 8),
    seed=st.integers(0, 1000),
    data=st.data(),
)
def test_class_splits_never_overlap(num_classes: int, weights: list[int], n_groups: int, seed: int, data: st.DataObject) -> None:
    fractions = {f"part{i}": w / sum(weights) for i, w in enumerate(weights)}
    groups = torch.tensor(data.draw(st.lists(st.integers(0, n_groups - 1), min_size=num_classes, max_size=num_classes)))
    for kwargs in ({}, {"groups": groups}):
        try:
            parts = class_splits(num_classes, fractions, seed, **kwargs)
        except ValueError as e:
            assert "empty" in str(e)
            continue
        assert all(len(p) for p in parts.values())
        assert torch.equal(torch.cat(list(parts.values())).sort().values, torch.arange(num_classes))
        if kwargs:
            held = [set(groups[p].tolist()) for p in parts.values()]
            assert sum(map(len, held)) == len(set().union(*held))  # no group in two parts


# EpisodeSampler --------------------------------------------------------------------------------


@FAST
@given(
    counts=st.lists(st.integers(3, 6), min_size=3, max_size=8),
    n_way=st.integers(1, 3),
    k_shot=st.integers(1, 2),
    q_query=st.integers(0, 1),
    seed=st.integers(0, 2**31),
    before=st.integers(0, 5),
    after=st.integers(1, 5),
    same_group=st.booleans(),
)
def test_a_resumed_sampler_continues_the_identical_episode_stream(
    counts: list[int], n_way: int, k_shot: int, q_query: int, seed: int, before: int, after: int, same_group: bool
) -> None:
    labels = torch.arange(len(counts)).repeat_interleave(torch.tensor(counts))
    groups = torch.arange(len(counts)) % 2
    kwargs = dict(n_way=n_way, k_shot=k_shot, q_query=q_query, groups=groups, same_group=same_group)
    assume(not same_group or n_way <= len(counts) // 2)  # each of the two groups has n_way classes
    sampler = EpisodeSampler(labels, range(len(counts)), seed=seed, **kwargs)
    for _ in range(before):
        sampler.sample()
    buffer = io.BytesIO()
    torch.save(sampler.state_dict(), buffer)  # as a checkpoint holds it
    expected = [sampler.sample() for _ in range(after)]

    buffer.seek(0)
    resumed = EpisodeSampler(labels, range(len(counts)), seed=seed + 1, **kwargs)
    resumed.sample()  # mid-stream of its own
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for want, got in zip(expected, (resumed.sample() for _ in range(after)), strict=True):
        for field in ("support_idx", "support_y", "query_idx", "query_y", "classes"):
            assert torch.equal(getattr(want, field), getattr(got, field)), field


# random_affine ---------------------------------------------------------------------------------

NONE = AffineRanges(rotation=0.0, shear=0.0, scale=0.0, shift=0.0)
# half and bfloat16 images with a side of 1 failed in affine_grid on the CPU ('"tensor_cpu" not
# implemented for 'Half''), and their grids lost precision in those dtypes
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


@FAST
@given(
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    c=st.integers(1, 3),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    dtype=st.sampled_from(sorted(TOLERANCE, key=str)),
    seed=st.integers(0, 2**31),
)
def test_the_zero_affine_map_is_the_identity_of_any_shape_and_dtype(
    lead: list[int], c: int, h: int, w: int, dtype: torch.dtype, seed: int
) -> None:
    images = torch.rand(*lead, c, h, w, generator=torch.Generator().manual_seed(seed)).to(dtype)
    out = random_affine(images, torch.Generator().manual_seed(seed), NONE)
    assert out.shape == images.shape and out.dtype == images.dtype and out.device == images.device
    torch.testing.assert_close(out.double(), images.double(), rtol=0, atol=TOLERANCE[dtype])


def test_a_tie_goes_to_the_earlier_part_as_the_readme_says() -> None:
    """0.05 of 10 items after 0.95 is refused (9.5 and 0.5: the tie goes to 0.95); before it, one item."""
    with pytest.raises(ValueError, match=r"leaves part 'b' \(fraction 0.05\) empty"):
        split_indices(10, {"a": 0.95, "b": 0.05})
    assert [len(p) for p in split_indices(10, {"b": 0.05, "a": 0.95}).values()] == [1, 9]


# load_omniglot ---------------------------------------------------------------------------------

NAMES = st.sampled_from(["Greek", "greek", "Latin", "N_Ko", "Ojibwe (Canadian)", "Z-a", "Zeta"])


@st.composite
def omniglot_layouts(draw: st.DrawFn) -> dict[tuple[str, str], list[tuple[str, np.ndarray]]]:
    """(alphabet, character) -> [(file name, 6x6 ink mask)] of a small generated Omniglot."""
    layout = {}
    for alphabet in draw(st.sets(NAMES, min_size=1, max_size=3)):
        for character in draw(st.sets(st.sampled_from(["character01", "character02", "character10"]), min_size=1, max_size=2)):
            names = draw(st.sets(st.sampled_from(["0101_01.png", "0101_02.png", "0101_10.png", "0102_03.PNG"]), min_size=1, max_size=3))
            layout[alphabet, character] = [
                (name, np.array(draw(st.lists(st.booleans(), min_size=36, max_size=36))).reshape(6, 6)) for name in sorted(names)
            ]
    return layout


@FAST
@given(layout=omniglot_layouts(), as_zip=st.booleans(), rotations=st.booleans())
def test_load_omniglot_reads_any_layout_in_order(
    tmp_path_factory: pytest.TempPathFactory, layout: dict, as_zip: bool, rotations: bool
) -> None:
    Image = pytest.importorskip("PIL.Image", reason="Pillow missing: pip install Pillow")

    root = tmp_path_factory.mktemp("omniglot")
    source = root / ("images.zip" if as_zip else "images")
    members = {}
    for (alphabet, character), files in layout.items():
        for name, mask in files:
            buffer = io.BytesIO()
            Image.fromarray(~mask).convert("1").save(buffer, format="PNG")  # ink black
            members[f"{alphabet}/{character}/{name}"] = buffer.getvalue()
    if as_zip:
        with zipfile.ZipFile(source, "w") as archive:
            for name, data in members.items():
                archive.writestr(f"images_background/{name}", data)
    else:
        for name, data in members.items():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes(data)

    data = load_omniglot(source, image_size=None, rotations=rotations)
    classes = sorted(layout)
    base = len(classes)
    copies = 4 if rotations else 1
    assert data.classes[:base] == classes and data.num_classes == copies * base
    assert data.alphabets == sorted({a for a, _ in classes})
    expected = [torch.from_numpy(mask.astype(np.float32)) for c in classes for _, mask in layout[c]]
    for k in range(copies):
        block = slice(k * len(expected), (k + 1) * len(expected))
        for got, want in zip(data.images[block], expected, strict=True):
            assert torch.equal(got[0], torch.rot90(want, k))  # counter-clockwise by 90 k degrees
        assert data.labels[block].tolist() == [k * base + i for i, c in enumerate(classes) for _ in layout[c]]
    assert data.alphabet_of_class.tolist() == [data.alphabets.index(a) for a, _ in classes] * copies
    assert data.base_class_of_class.tolist() == list(range(base)) * copies
    assert data.rotation_of_class.tolist() == [90 * k for k in range(copies) for _ in range(base)]


def test_a_fraction_is_taken_as_a_ratio_only_where_it_is_that_float() -> None:
    """0.5 + 1e-12 is not 1/2: of one item, the larger fraction gets it, wherever it is listed."""
    for fractions in ({"a": 0.5 - 1e-12, "b": 0.5 + 1e-12}, {"b": 0.5 + 1e-12, "a": 0.5 - 1e-12}):
        parts = split_indices(1, fractions, allow_empty=True)
        assert (len(parts["a"]), len(parts["b"])) == (0, 1)


@FAST
@given(
    ids=st.lists(st.integers(-5, 50), min_size=2, max_size=8, unique=True),
    per_class=st.integers(2, 5),
    n_way=st.integers(1, 4),
    k_shot=st.integers(1, 2),
    seed=st.integers(0, 2**31),
    same_group=st.booleans(),
)
def test_every_episode_is_well_formed(ids: list[int], per_class: int, n_way: int, k_shot: int, seed: int, same_group: bool) -> None:
    """Class ids with gaps (and negative ones without groups): each episode's examples are of its
    classes, in their ways, distinct, support apart from query, the classes allowed and distinct."""
    if same_group:
        ids = [abs(i) for i in ids]
        assume(len(set(ids)) == len(ids))
    evens = sum(i % 2 == 0 for i in ids)
    assume(n_way <= len(ids) and (not same_group or n_way <= max(evens, len(ids) - evens)))
    labels = torch.tensor(ids).repeat(per_class)[torch.randperm(len(ids) * per_class, generator=torch.Generator().manual_seed(seed))]
    groups = torch.arange(max(ids) + 1) % 2 if same_group else None
    order = sorted(ids, key=lambda i: (i % 2, i))  # so that, with groups, each group holds its classes
    sampler = EpisodeSampler(labels, order, n_way, k_shot, per_class - k_shot, seed=seed, groups=groups, same_group=same_group)
    for _ in range(3):
        e = sampler.sample()
        assert len(set(e.classes.tolist())) == n_way and set(e.classes.tolist()) <= set(ids)
        assert torch.equal(labels[e.support_idx], e.classes[e.support_y])
        assert torch.equal(labels[e.query_idx], e.classes[e.query_y])
        everything = torch.cat([e.support_idx, e.query_idx]).tolist()
        assert len(set(everything)) == len(everything) == n_way * per_class
        if same_group:
            assert len({c % 2 for c in e.classes.tolist()}) == 1
