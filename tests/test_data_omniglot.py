"""The Omniglot reader, on zips and folders generated here in the official layout."""

from __future__ import annotations

import io
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from learnedopt.data import DATA_ENV_VAR, default_data_root, load_omniglot
from learnedopt.data.omniglot import read_image

Image = pytest.importorskip("PIL.Image", reason="Pillow missing: pip install Pillow")

SIZE = 105
DRAWERS = 3


def glyph_mask(alphabet: str, character: str, drawer: int, variant: int = 0) -> np.ndarray:
    """Ink mask (True = ink) of a generated glyph: a rectangle placed by its identity."""
    seed = sum(map(ord, alphabet + character)) + 31 * drawer + 1000 * variant
    rng = np.random.default_rng(seed)
    top, left = rng.integers(0, 60, size=2)
    height, width = rng.integers(10, 40, size=2)
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[top : top + height, left : left + width] = True
    return mask


def png_bytes(mask: np.ndarray) -> bytes:
    image = Image.fromarray(~mask).convert("1")  # official PNGs: 1-bit, ink black (0)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def character_files(alphabet: str, character: str, variant: int) -> dict[str, bytes]:
    return {
        f"{alphabet}/{character}/{900 + int(character[-2:]):04d}_{d:02d}.png": png_bytes(
            glyph_mask(alphabet, character, d, variant)
        )
        for d in range(1, DRAWERS + 1)
    }


# Split 1: Alpha (1 character) and Greek (2). Split 2: Greek (the same 2, drawn differently so
# that the test can tell which copy was used, plus a third) and Zeta (3).
SPLIT1 = {"Alpha": ["character01"], "Greek": ["character01", "character02"]}
SPLIT2 = {
    "Greek": ["character01", "character02", "character03"],
    "Zeta": ["character01", "character02", "character03"],
}
EXPECTED_CLASSES = [
    ("Alpha", "character01"),
    ("Greek", "character01"),
    ("Greek", "character02"),
    ("Greek", "character03"),
    ("Zeta", "character01"),
    ("Zeta", "character02"),
    ("Zeta", "character03"),
]


def layout(alphabets: dict[str, list[str]], variant: int) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for alphabet, characters in alphabets.items():
        for character in characters:
            files.update(character_files(alphabet, character, variant))
    return files


def make_zip(path: Path, top: str, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{top}/", b"")
        for name, data in files.items():
            archive.writestr(f"{top}/{name}", data)
        archive.writestr(f"__MACOSX/{top}/._junk.png", b"not a png")
    return path


def make_folder(path: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


@pytest.fixture(scope="module")
def zips(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("omniglot")
    return (
        make_zip(
            directory / "images_background_small1.zip",
            "images_background_small1",
            layout(SPLIT1, variant=1),
        ),
        make_zip(
            directory / "images_background_small2.zip",
            "images_background_small2",
            layout(SPLIT2, variant=2),
        ),
    )


def test_merge_deduplicates_characters(zips: tuple[Path, Path]) -> None:
    data = load_omniglot(list(zips), image_size=None)

    assert data.classes == EXPECTED_CLASSES
    assert data.alphabets == ["Alpha", "Greek", "Zeta"]
    assert data.alphabet_of_class.tolist() == [0, 1, 1, 1, 2, 2, 2]
    assert data.num_classes == 7 and len(data) == 7 * DRAWERS
    assert data.labels.dtype == torch.int64
    assert data.labels.tolist() == [c for c in range(7) for _ in range(DRAWERS)]
    assert torch.equal(data.base_class_of_class, torch.arange(7))
    assert data.rotation_of_class.tolist() == [0] * 7


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_first_source_wins_and_inversion(zips: tuple[Path, Path], order: tuple[int, int]) -> None:
    data = load_omniglot([zips[i] for i in order], image_size=None)
    first_variant = order[0] + 1
    assert data.images.shape == (7 * DRAWERS, 1, SIZE, SIZE)
    assert data.images.dtype == torch.float32
    for label, (alphabet, character) in enumerate(data.classes):
        # Greek 1 and 2 are in both zips; everything else is in only one.
        in_both = alphabet == "Greek" and character != "character03"
        variant = first_variant if in_both else (1 if alphabet == "Alpha" else 2)
        images = data.images[data.labels == label, 0]
        for drawer, image in enumerate(images, start=1):
            mask = glyph_mask(alphabet, character, drawer, variant)
            assert torch.equal(image, torch.from_numpy(mask.astype(np.float32)))


def test_folder_source_matches_zip(zips: tuple[Path, Path], tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "images_background", layout(SPLIT2, variant=2))
    from_folder = load_omniglot([folder], image_size=20)
    from_zip = load_omniglot(zips[1], image_size=20)
    assert from_folder.classes == from_zip.classes
    assert torch.equal(from_folder.labels, from_zip.labels)
    assert torch.equal(from_folder.images, from_zip.images)


def test_classes_are_sorted_whatever_the_order_of_the_sources(zips: tuple[Path, Path]) -> None:
    # the second source's Greek and Zeta come first here, yet Alpha (first source) sorts first
    data = load_omniglot([zips[1], zips[0]], image_size=None)
    assert data.classes == EXPECTED_CLASSES
    assert data.alphabet_of_class.tolist() == [0, 1, 1, 1, 2, 2, 2]


def test_folder_skips_appledouble_files(tmp_path: Path) -> None:
    """As in a zip, ``._<name>`` metadata files beside a folder's images are skipped."""
    files = layout(SPLIT1, variant=1)
    appledouble = b"\x00\x05\x16\x07" + bytes(28)
    junk = {str(Path(name).with_name(f"._{Path(name).name}")): appledouble for name in files}
    data = load_omniglot(make_folder(tmp_path / "junk", files | junk), image_size=None)
    clean = load_omniglot(make_folder(tmp_path / "clean", files), image_size=None)
    assert data.classes == clean.classes == EXPECTED_CLASSES[:3]
    assert torch.equal(data.labels, clean.labels) and torch.equal(data.images, clean.images)


def test_hidden_folders_are_not_alphabets_or_characters(tmp_path: Path) -> None:
    """A Jupyter ``.ipynb_checkpoints`` or a ``.git`` folder among the alphabets was read as an
    alphabet or a character of its own, in a folder and in a zip."""
    files = layout(SPLIT1, variant=1)
    png = next(iter(files.values()))
    hidden = {"Alpha/.ipynb_checkpoints/0901_01.png": png, ".git/objects/0901_01.png": png}
    data = load_omniglot(make_folder(tmp_path / "hidden", files | hidden), image_size=None)
    zipped = load_omniglot(make_zip(tmp_path / "hidden.zip", "top", files | hidden), image_size=None)
    assert data.classes == zipped.classes == EXPECTED_CLASSES[:3]
    assert data.alphabets == zipped.alphabets == ["Alpha", "Greek"]


def test_resize(zips: tuple[Path, Path]) -> None:
    full = load_omniglot(list(zips), image_size=None)
    small = load_omniglot(list(zips), image_size=28)
    assert small.images.shape == (len(full), 1, 28, 28) and small.images.dtype == torch.float32
    assert small.images.min() >= 0.0 and small.images.max() <= 1.0
    assert torch.equal(small.labels, full.labels)
    # Resampling keeps the ink mass (up to filter ringing) and where the ink is.
    assert torch.allclose(small.images.mean((1, 2, 3)), full.images.mean((1, 2, 3)), atol=0.02)
    pooled = torch.nn.functional.adaptive_avg_pool2d(full.images, 28)
    assert (small.images - pooled).abs().mean() < 0.05
    assert small.images.amax((1, 2, 3)).min() > 0.9  # every rectangle is >= 10 px wide


def test_resize_is_lanczos_on_8bit_grayscale(zips: tuple[Path, Path]) -> None:
    data = load_omniglot(zips[0], image_size=28)
    alphabet, character = data.classes[0]
    for drawer, image in enumerate(data.images[data.labels == 0, 0], start=1):
        with Image.open(io.BytesIO(png_bytes(glyph_mask(alphabet, character, drawer, 1)))) as png:
            gray = png.convert("L").resize((28, 28), Image.Resampling.LANCZOS)
        expected = 1.0 - np.asarray(gray, dtype=np.float32) / 255.0
        assert torch.equal(image, torch.from_numpy(expected))


def test_zip_skips_appledouble_files(zips: tuple[Path, Path], tmp_path: Path) -> None:
    """macOS zip tools add ``._<name>`` metadata files beside the images: not PNGs, so skipped."""
    files = layout(SPLIT1, variant=1)
    appledouble = b"\x00\x05\x16\x07" + bytes(28)  # the header of a macOS metadata file
    junk = {str(Path(name).with_name(f"._{Path(name).name}")): appledouble for name in files}
    with_junk = make_zip(tmp_path / "junk.zip", "images_background_small1", files | junk)
    data, clean = load_omniglot(with_junk, image_size=None), load_omniglot(zips[0], image_size=None)
    assert data.classes == clean.classes == EXPECTED_CLASSES[:3]
    assert torch.equal(data.labels, clean.labels) and len(data) == 3 * DRAWERS
    assert torch.equal(data.images, clean.images)


def test_rotations(zips: tuple[Path, Path]) -> None:
    data = load_omniglot(list(zips), image_size=None, rotations=True)
    base = load_omniglot(list(zips), image_size=None)
    n = base.num_classes
    assert data.num_classes == 4 * n and len(data) == 4 * len(base)
    assert data.classes[:n] == base.classes
    assert data.classes[n + 2] == ("Greek", "character02@rot90")
    assert data.classes[3 * n] == ("Alpha", "character01@rot270")
    assert data.alphabet_of_class.tolist() == base.alphabet_of_class.tolist() * 4
    assert data.base_class_of_class.tolist() == list(range(n)) * 4
    assert data.rotation_of_class.tolist() == [0] * n + [90] * n + [180] * n + [270] * n
    assert torch.equal(data.labels.bincount(), torch.full((4 * n,), DRAWERS))

    # Compare with Pillow's rotate, which turns counter-clockwise.
    alphabet, character = base.classes[2]
    mask = glyph_mask(alphabet, character, drawer=1, variant=1)
    for step, angle in enumerate((90, 180, 270), start=1):
        rotated = np.asarray(Image.fromarray(mask).rotate(angle), dtype=np.float32)
        image = data.images[data.labels == 2 + step * n][0, 0]
        assert torch.equal(image, torch.from_numpy(rotated))


def test_default_sources_from_env(
    zips: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "omniglot").mkdir()
    for source in zips:
        (tmp_path / "omniglot" / source.name).symlink_to(source)
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path))
    assert load_omniglot().classes == EXPECTED_CLASSES


def test_a_folder_holding_the_official_zips_stands_for_them(zips: tuple[Path, Path], tmp_path: Path) -> None:
    # as meta-train --data takes it: the zips' folder, or a data root holding omniglot/
    expected = load_omniglot(list(zips), image_size=None)
    for folder in (zips[0].parent, zips[0].parent.parent):
        if folder == zips[0].parent.parent:
            (tmp_path / "omniglot").symlink_to(zips[0].parent)
            folder = tmp_path
        got = load_omniglot(folder, image_size=None)
        assert got.classes == expected.classes and torch.equal(got.images, expected.images)
    layout_root = make_folder(tmp_path / "layout" / "omniglot", layout(SPLIT1, variant=1))
    assert load_omniglot(layout_root.parent, image_size=None).classes == load_omniglot(layout_root, image_size=None).classes


def test_a_path_from_the_home_folder_is_read_as_load_mnist_reads_it(
    zips: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``load_mnist("~/data")`` expanded the ``~`` (as ``LEARNEDOPT_DATA`` is); ``load_omniglot`` and
    ``read_image`` did not, so ``--data=~/data`` (no shell expands a ``~`` after ``=``) read MNIST but
    said the Omniglot folder did not exist."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "data").symlink_to(zips[0].parent)
    expected = load_omniglot(list(zips), image_size=None)
    for source in ("~/data", Path("~/data"), ["~/data/images_background_small1.zip", "~/data/images_background_small2.zip"]):
        got = load_omniglot(source, image_size=None)
        assert got.classes == expected.classes and torch.equal(got.images, expected.images)
    make_folder(tmp_path / "folder", layout(SPLIT1, variant=1))
    assert torch.equal(read_image("~/folder/Alpha/character01/0901_01.png", None), expected.images[0])


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.zip"):
        load_omniglot([tmp_path / "missing.zip"])

    not_zip = tmp_path / "not.zip"
    not_zip.write_bytes(b"PK but not really a zip")
    with pytest.raises(ValueError, match="not.zip: not a readable zip"):
        load_omniglot([not_zip])

    flat = make_zip(tmp_path / "flat.zip", "top", {"a.png": png_bytes(glyph_mask("a", "01", 1))})
    with pytest.raises(ValueError, match="flat.zip: no PNGs in the Omniglot layout"):
        load_omniglot([flat])

    broken = make_zip(tmp_path / "broken.zip", "top", {"A/character01/1_01.png": b"garbage"})
    with pytest.raises(ValueError, match="cannot read image top/A/character01/1_01.png"):
        load_omniglot([broken])

    with pytest.raises(ValueError, match="no Omniglot sources"):
        load_omniglot([])


def damaged(data: bytes, offset: int, value: int) -> bytes:
    return data[:offset] + bytes([value]) + data[offset + 1 :]


@pytest.mark.parametrize(("offset", "value", "pillow_error"), [
    (11, 0, "ValueError"),  # the header chunk's length: "Truncated IHDR chunk"
    (36, 0, "SyntaxError"),  # the image data's length: "broken PNG file"
    (11, 14, "UnidentifiedImageError"),
])  # fmt: skip
def test_a_damaged_png_gives_a_value_error_naming_it(tmp_path: Path, offset: int, value: int, pillow_error: str) -> None:
    """Pillow reports damaged PNGs as OSError, SyntaxError or ValueError by which byte is
    wrong; each must reach the caller as one ValueError that names the file (the command
    line prints it as one line)."""
    good = png_bytes(glyph_mask("A", "01", 1))
    folder = tmp_path / "folder"
    (folder / "A" / "character01").mkdir(parents=True)
    (folder / "A" / "character01" / "1_01.png").write_bytes(damaged(good, offset, value))
    with pytest.raises(ValueError, match=rf"folder: cannot read image .*1_01.png \({pillow_error}: "):
        load_omniglot([folder])
    broken = make_zip(tmp_path / "broken.zip", "top", {"A/character01/1_01.png": damaged(good, offset, value)})
    with pytest.raises(ValueError, match=rf"broken.zip: cannot read image top/A/character01/1_01.png \({pillow_error}"):
        load_omniglot([broken])
    with pytest.raises(ValueError, match=rf"cannot read image .*1_01.png \({pillow_error}"):
        read_image(folder / "A" / "character01" / "1_01.png")


def test_missing_pillow_message(zips: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """It names the command that installs Pillow: ``pip install learnedopt[data]`` fails, since
    learnedopt is installed from its repository or a wheel, not from PyPI."""
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(ImportError) as raised:
        load_omniglot(list(zips))
    assert str(raised.value) == "reading Omniglot needs Pillow (learnedopt's data extra): pip install Pillow"


# Real data ----------------------------------------------------------------------------------

_ROOT = default_data_root()
_OMNIGLOT = _ROOT / "omniglot" if _ROOT is not None else None
_REAL_ZIPS = ("images_background_small1.zip", "images_background_small2.zip")


@pytest.mark.skipif(
    _OMNIGLOT is None or not all((_OMNIGLOT / z).is_file() for z in _REAL_ZIPS),
    reason=f"real Omniglot zips {_REAL_ZIPS} not found (looked in {_OMNIGLOT}; set {DATA_ENV_VAR})",
)
def test_real_omniglot() -> None:
    data = load_omniglot()
    assert data.num_classes == 242
    assert len(set(data.classes)) == 242
    assert data.images.shape == (242 * 20, 1, 28, 28)
    assert torch.equal(data.labels.bincount(), torch.full((242,), 20))
    assert data.alphabets == [
        "Balinese",
        "Early_Aramaic",
        "Greek",
        "Japanese_(katakana)",
        "Korean",
        "Latin",
        "Sanskrit",
        "Tagalog",
    ]
    ink = data.images.mean()
    assert 0.02 < ink < 0.25  # mostly background after inversion


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_a_transparent_background_is_background_not_ink(tmp_path: Path, mode: str) -> None:
    """Glyphs drawn in an editor are often saved as black ink on a transparent background whose
    hidden colour is black too; dropping the alpha channel read every pixel as ink (mean 1.0)."""
    mask = glyph_mask("A", "01", 1)
    alpha = Image.fromarray(mask.astype(np.uint8) * 255)  # opaque ink, transparent elsewhere
    if mode == "P":  # a palette image with a transparent palette entry
        image = Image.fromarray(mask.astype(np.uint8)).convert("P")
        image.putpalette([0, 0, 0, 0, 0, 0])
    else:
        image = Image.new(mode, (SIZE, SIZE), 0)
        image.putalpha(alpha)
    path = tmp_path / "glyph.png"
    image.save(path, **({"transparency": 0} if mode == "P" else {}))
    assert torch.equal(read_image(path, image_size=None)[0], torch.from_numpy(mask).float())
    (tmp_path / "plain.png").write_bytes(png_bytes(mask))  # and an opaque RGB copy reads the same
    Image.open(tmp_path / "plain.png").convert("RGB").save(tmp_path / "rgb.png")
    assert torch.equal(read_image(tmp_path / "rgb.png", image_size=None)[0], torch.from_numpy(mask).float())


def test_repr_is_a_summary_and_comparing_does_not_raise(zips: tuple[Path, Path]) -> None:
    # found by the user study: print(load_omniglot()) printed every tensor and class name (tens of
    # thousands of characters), and data == other raised "Boolean value of Tensor ... is ambiguous"
    data = load_omniglot(list(zips), rotations=True, image_size=14)
    assert repr(data) == ("OmniglotDataset(84 images of 1x14x14, 28 classes (7 characters, rotations [0, 90, 180, 270]), "
                          "alphabets ['Alpha', 'Greek', 'Zeta'])")  # fmt: skip
    assert data == data and data != load_omniglot(list(zips), rotations=True, image_size=14)


@pytest.mark.parametrize("image_size", [0, -3, 28.5, "28", True])
def test_an_image_size_that_is_not_a_positive_integer_is_refused_before_reading(tmp_path: Path, image_size: object) -> None:
    # Pillow's "height and width must be > 0" was reported as the source's fault; a float or
    # string failed deep in Pillow's resize
    source = make_zip(tmp_path / "s.zip", "top", character_files("A", "character01", 0))
    with pytest.raises(ValueError, match=rf"image_size must be an integer >= 1 or None .*got {image_size!r}"):
        load_omniglot(source, image_size=image_size)
    png = make_folder(tmp_path / "folder", {"1.png": png_bytes(glyph_mask("A", "01", 1))}) / "1.png"
    with pytest.raises(ValueError, match="image_size must be an integer >= 1"):
        read_image(png, image_size=image_size)


def test_rotations_of_images_that_are_not_square_are_refused_in_one_line(tmp_path: Path) -> None:
    wide = png_bytes(np.zeros((80, 105), dtype=bool))
    source = make_zip(tmp_path / "wide.zip", "top", {"A/character01/1_01.png": wide})
    assert load_omniglot(source, image_size=None).images.shape == (1, 1, 80, 105)
    with pytest.raises(ValueError, match="rotations need square images, these are 80x105 .*: pass image_size"):
        load_omniglot(source, image_size=None, rotations=True)
    assert load_omniglot(source, image_size=28, rotations=True).images.shape == (4, 1, 28, 28)


def test_a_zip_holding_a_member_twice_is_refused(tmp_path: Path) -> None:
    # zipfile reads the last copy under that name each time: the character got the same image twice
    path = tmp_path / "twice.zip"
    with zipfile.ZipFile(path, "w") as archive, pytest.warns(UserWarning, match="Duplicate name"):
        archive.writestr("top/A/character01/1_01.png", png_bytes(glyph_mask("A", "01", 1)))
        archive.writestr("top/A/character01/1_01.png", png_bytes(glyph_mask("A", "01", 2)))
    with pytest.raises(ValueError, match="twice.zip: the zip holds top/A/character01/1_01.png 2 times"):
        load_omniglot(path)


@pytest.mark.parametrize("sources", [b"images.zip", 5, [b"images.zip"]])
def test_sources_that_are_not_paths_are_refused_in_one_line(sources: object) -> None:
    with pytest.raises(TypeError, match="sources must be a path or a list of paths"):
        load_omniglot(sources)


def test_a_zip_member_that_cannot_be_read_is_named_in_one_value_error(tmp_path: Path) -> None:
    # an encrypted member was zipfile's RuntimeError, a damaged deflate stream zlib.error and an
    # unknown compression method NotImplementedError, none naming the zip
    png = png_bytes(glyph_mask("A", "01", 1))
    path = tmp_path / "good.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("top/A/character01/1_01.png", png)
    good = bytearray(path.read_bytes())
    data_start = 30 + len("top/A/character01/1_01.png")
    central = good.rfind(b"PK\x01\x02")
    encrypted, damaged, method = bytearray(good), bytearray(good), bytearray(good)
    for flags in (6, central + 8):  # the general-purpose flag, bit 0: encrypted
        encrypted[flags] |= 1
    damaged[data_start + 2 : data_start + 40] = bytes(b ^ 0xFF for b in damaged[data_start + 2 : data_start + 40])
    for field in (8, central + 10):  # the compression method
        method[field : field + 2] = (99).to_bytes(2, "little")
    for name, data, error in (("encrypted", encrypted, "RuntimeError: .*encrypted"), ("damaged", damaged, "error: "),
                              ("method", method, "NotImplementedError: ")):  # fmt: skip
        (tmp_path / f"{name}.zip").write_bytes(data)
        with pytest.raises(ValueError, match=rf"{name}.zip: cannot read image top/A/character01/1_01.png \({error}"):
            load_omniglot(tmp_path / f"{name}.zip")


@pytest.mark.parametrize(("stray", "shown"), [
    ("Beta/0901_01.png", "Beta/0901_01.png"),  # an alphabet without its character folders
    ("Greek/character01/sub/0901_01.png", "Greek/character01/sub/0901_01.png"),  # a level too deep
    ("0901_01.png", "0901_01.png"),
])  # fmt: skip
def test_pngs_outside_the_layout_are_refused_not_left_out(tmp_path: Path, stray: str, shown: str) -> None:
    """An alphabet a level too high or too deep beside the others was left out, silently."""
    png = png_bytes(glyph_mask("A", "01", 1))
    files = layout(SPLIT1, variant=1) | {stray: png}
    with pytest.raises(ValueError, match=rf"folder: 1 PNG is outside the Omniglot layout .* and would be left out, e\.g\. {shown}"):
        load_omniglot(make_folder(tmp_path / "folder", files))
    with pytest.raises(ValueError, match=rf"s\.zip: 1 PNG is outside the Omniglot layout .* e\.g\. top/{shown}"):
        load_omniglot(make_zip(tmp_path / "s.zip", "top", files))


def test_a_source_with_no_png_in_the_layout_names_one_it_found(tmp_path: Path) -> None:
    # e.g. the folder above the unzipped images_background/
    files = {f"images_background/{name}": data for name, data in layout(SPLIT1, variant=1).items()}
    with pytest.raises(ValueError, match=r"up: no PNGs in the Omniglot layout <Alphabet>/<character>/\*\.png \(found "
                                         r"images_background/Alpha/character01/0901_01\.png and 8 more outside it\)"):
        load_omniglot(make_folder(tmp_path / "up", files))


def test_an_image_size_too_large_for_a_tensor_is_refused_before_any_image_is_decoded(tmp_path: Path, monkeypatch) -> None:
    """``image_size=10**6`` tried to allocate a 10**12-pixel image per PNG (a MemoryError, or
    the machine's memory); the library's bound on a tensor's elements (2**31 - 1, as the command
    line's ``--image-size``) refuses one image beyond it, and a dataset whose ``(N, 1, S, S)``
    images would be, before any PNG is decoded (a decode here is the test's failure, not a 10 GB
    allocation). The largest image within the bound is 46340x46340."""
    from test_data_omniglot_runs import make_runs

    from learnedopt.data import load_runs, omniglot

    make_runs(tmp_path / "runs", runs=1, classes=2)  # 2 training images and 2 test items

    def no_decode(*args, **kwargs):
        raise AssertionError("a PNG was decoded")

    monkeypatch.setattr(omniglot, "_decode", no_decode)
    source = make_zip(tmp_path / "s.zip", "top", character_files("A", "character01", 0))
    png = make_folder(tmp_path / "folder", {"1.png": png_bytes(glyph_mask("A", "01", 1))}) / "1.png"
    one = "image_size 1000000: an image would have 1,000,000,000,000 elements; learnedopt's tensors have at most 2,147,483,647 (2**31 - 1)"
    for load in (lambda s: load_omniglot(source, image_size=s), lambda s: read_image(png, image_size=s),
                 lambda s: load_runs(tmp_path / "runs", image_size=s)):  # fmt: skip
        with pytest.raises(ValueError, match="^" + re.escape(one) + "$"):
            load(10**6)
    images = len(character_files("A", "character01", 0))
    for rotations, count in ((False, images), (True, 4 * images)):
        with pytest.raises(ValueError, match="^" + re.escape(
            f"image_size 46340 and {count} images{' (with rotations)' if rotations else ''}: the (N, 1, S, S) images "
            f"would have {count * 46340**2:,} elements; learnedopt's tensors have at most 2,147,483,647 (2**31 - 1)"
        ) + "$"):  # fmt: skip
            load_omniglot(source, image_size=46340, rotations=rotations)
    with pytest.raises(ValueError, match="^" + re.escape(f"image_size 46340 and 4 images in {tmp_path / 'runs' / 'run01'}: its images "
                                                         f"would have {4 * 46340**2:,} elements; ")):
        load_runs(tmp_path / "runs", image_size=46340)
    with pytest.raises(AssertionError, match="a PNG was decoded"):  # one such image is within the bound
        read_image(png, image_size=46340)


@pytest.mark.parametrize("transparent", [False, True], ids=["opaque", "transparent-white"])
def test_a_16_bit_grayscale_png_reads_as_its_8_bit_copy(tmp_path: Path, transparent: bool) -> None:
    """Pillow converts 16-bit grayscale ("I;16") to 8-bit by clipping at 255, so any ink lighter
    than 255/65535 of white (a scanner's near-black, any antialiased edge) read as background."""
    levels = np.random.default_rng(0).integers(0, 256, size=(SIZE, SIZE)).astype(np.uint8)
    levels[:, :5] = 255  # a white margin, for the transparent copy
    Image.fromarray(levels).save(tmp_path / "8bit.png")
    wide = Image.fromarray(levels.astype(np.uint16) * 257)  # 0..65535, the same grays
    assert wide.mode.startswith("I")
    wide.save(tmp_path / "16bit.png", **({"transparency": 65535} if transparent else {}))
    with Image.open(tmp_path / "16bit.png") as opened:  # the file is what the test means
        assert opened.mode.startswith("I") and ("transparency" in opened.info) == transparent
    for image_size in (None, 28):
        expected = read_image(tmp_path / "8bit.png", image_size=image_size)
        assert torch.equal(read_image(tmp_path / "16bit.png", image_size=image_size), expected)


def test_png_names_in_capitals_are_read_not_left_out(tmp_path: Path) -> None:
    """Files named ``*.PNG`` (as some Windows and camera tools write them) were left out silently,
    in a folder and in a zip, and a stray one was not named as outside the layout."""
    files = layout(SPLIT1, variant=1)
    upper = {str(Path(name).with_suffix(".PNG")) if "Greek" in name else name: data for name, data in files.items()}
    expected = load_omniglot(make_folder(tmp_path / "lower", files), image_size=None)
    for source in (make_folder(tmp_path / "upper", upper), make_zip(tmp_path / "upper.zip", "top", upper)):
        data = load_omniglot(source, image_size=None)
        assert data.classes == expected.classes == EXPECTED_CLASSES[:3]
        assert torch.equal(data.images, expected.images) and torch.equal(data.labels, expected.labels)
    stray = upper | {"Beta/0901_01.Png": next(iter(files.values()))}
    with pytest.raises(ValueError, match=r"1 PNG is outside the Omniglot layout .* e\.g\. Beta/0901_01\.Png"):
        load_omniglot(make_folder(tmp_path / "stray", stray))
    with pytest.raises(ValueError, match=r"1 PNG is outside the Omniglot layout .* e\.g\. top/Beta/0901_01\.Png"):
        load_omniglot(make_zip(tmp_path / "stray.zip", "top", stray))


def test_a_zip_of_both_splits_takes_each_character_once(zips: tuple[Path, Path], tmp_path: Path) -> None:
    """One zip holding both small background splits as its top folders gave Greek and Latin
    (in both) every drawing twice, in silence; it reads as the two zips do, the first top folder
    (sorted) winning as the first source does."""
    files = {f"images_background_small1/{name}": data for name, data in layout(SPLIT1, variant=1).items()}
    files |= {f"images_background_small2/{name}": data for name, data in layout(SPLIT2, variant=2).items()}
    with zipfile.ZipFile(tmp_path / "both.zip", "w") as archive:
        for name in reversed(list(files)):  # the order of the members does not matter
            archive.writestr(name, files[name])
    both = load_omniglot(tmp_path / "both.zip", image_size=None)
    expected = load_omniglot(list(zips), image_size=None)
    assert both.classes == expected.classes == EXPECTED_CLASSES
    assert len(both) == len(EXPECTED_CLASSES) * DRAWERS
    assert torch.equal(both.images, expected.images) and torch.equal(both.labels, expected.labels)


def test_images_of_different_sizes_are_named_with_their_source(tmp_path: Path) -> None:
    """With ``image_size=None``, "images of different sizes [(50, 50), (105, 105)]" did not say
    which of the thousands of files was the odd one."""
    small = io.BytesIO()
    Image.new("1", (50, 40), 1).save(small, format="PNG")
    files = layout(SPLIT1, variant=1) | {"Greek/character02/0902_09.png": small.getvalue()}
    folder, archive = make_folder(tmp_path / "folder", files), make_zip(tmp_path / "sizes.zip", "top", files)
    for source, odd, first in (
        (folder, folder / "Greek/character02/0902_09.png", folder / "Alpha/character01/0901_01.png"),
        (archive, f"top/Greek/character02/0902_09.png in {archive}", f"top/Alpha/character01/0901_01.png in {archive}"),
    ):
        with pytest.raises(ValueError) as info:
            load_omniglot(source, image_size=None)
        assert str(info.value) == f"images of different sizes: {odd} is 50x40, {first} 105x105 (width x height): pass image_size"


@pytest.mark.skipif(
    _OMNIGLOT is None or not all((_OMNIGLOT / z).is_file() for z in _REAL_ZIPS),
    reason=f"real Omniglot zips {_REAL_ZIPS} not found (looked in {_OMNIGLOT}; set {DATA_ENV_VAR})",
)
def test_real_omniglot_episodes_keep_to_their_part_of_the_split() -> None:
    """``meta-train --task omniglot`` on the real zips: the README's fixed split by alphabets,
    rotated classes in meta-training only, and 5-way 2-shot 3-query episodes of classes of their
    own part, with labels 0..4 going to the classes in a new order in each episode."""
    from learnedopt.meta.fewshot import FewShotConfig, fewshot_defaults
    from learnedopt.meta.fewshot.sources import make_sources

    values = {**fewshot_defaults("maml", "omniglot", 5), "shots": 2, "queries": 3}
    train, valid, split = make_sources(FewShotConfig(algo="maml", task="omniglot", **values))
    assert split == {"meta_train": ["Balinese", "Greek", "Japanese_(katakana)", "Korean", "Tagalog"],
                     "meta_valid": ["Latin"], "meta_test": ["Early_Aramaic", "Sanskrit"]}  # fmt: skip
    data = train.data
    for source, part, rotations in ((train, "meta_train", {0, 90, 180, 270}), (valid, "meta_valid", {0})):
        source.sampler.load_state_dict({"generator": torch.Generator().manual_seed(7).get_state()})
        episodes = [source.sampler.sample() for _ in range(40)]
        classes = torch.stack([e.classes for e in episodes])
        assert {data.alphabets[a] for a in data.alphabet_of_class[classes].flatten().tolist()} <= set(split[part])
        assert set(data.rotation_of_class[classes].flatten().tolist()) == rotations
        assert all(len(set(c.tolist())) == 5 for c in classes)
        if part == "meta_train":  # label 0 is another of its 608 classes in (almost) every episode (39 of 40 here)
            assert len(set(classes[:, 0].tolist())) > 30
        for e in episodes:
            assert e.support_y.tolist() == [w for w in range(5) for _ in range(2)]
            assert e.query_y.tolist() == [w for w in range(5) for _ in range(3)]
            assert not set(e.support_idx.tolist()) & set(e.query_idx.tolist())
            assert torch.equal(data.labels[e.support_idx], e.classes.repeat_interleave(2))
            assert torch.equal(data.labels[e.query_idx], e.classes.repeat_interleave(3))
        x_s, y_s, x_q, y_q = source.batch(2, 7)  # the batch is those episodes' images
        assert torch.equal(x_s[1], data.images[episodes[1].support_idx]) and torch.equal(y_q[0], episodes[0].query_y)
        assert x_s.shape == (2, 10, 1, 28, 28) and x_q.shape == (2, 15, 1, 28, 28)
