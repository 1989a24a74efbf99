"""The one-shot runs reader and scorer on runs generated in the official layout."""

from pathlib import Path

import pytest
import torch

from learnedopt.data import load_runs, score_runs

Image = pytest.importorskip("PIL.Image", reason="Pillow is needed to write PNGs (pip install Pillow)")


def write_png(path, ink_rows) -> None:
    """A 105x105 1-bit image, white background, black ink on the given rows."""
    pixels = torch.ones(105, 105, dtype=torch.uint8) * 255
    for row in ink_rows:
        pixels[row] = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.numpy()).convert("1").save(path)


def make_runs(root, runs=2, classes=4, permutation_seed=0):
    """Run r: class j's image has ink on row 10*j+r; test item k is class perm[k]."""
    g = torch.Generator().manual_seed(permutation_seed)
    truth = []
    for r in range(1, runs + 1):
        run = root / f"run{r:02d}"
        perm = torch.randperm(classes, generator=g)
        for j in range(classes):
            write_png(run / "training" / f"class{j + 1:02d}.png", [10 * j + r])
        lines = []
        for k in range(classes):
            write_png(run / "test" / f"item{k + 1:02d}.png", [10 * int(perm[k]) + r])
            lines.append(f"run{r:02d}/test/item{k + 1:02d}.png run{r:02d}/training/class{int(perm[k]) + 1:02d}.png")
        (run / "class_labels.txt").write_text("\n".join(lines) + "\n")
        truth.append(perm)
    return truth


def test_reader_pairs_items_with_their_classes(tmp_path) -> None:
    truth = make_runs(tmp_path)
    runs = load_runs(tmp_path, image_size=None)
    assert [r.name for r in runs] == ["run01", "run02"]
    for run, perm in zip(runs, truth):
        assert run.train_images.shape == (4, 1, 105, 105) and run.test_images.shape == (4, 1, 105, 105)
        assert torch.equal(run.test_labels, perm)
        # ink is 1.0: each test item shows exactly the ink of its labelled training image
        for k in range(4):
            assert torch.equal(run.test_images[k], run.train_images[run.test_labels[k]])
    assert load_runs(tmp_path, image_size=28)[0].train_images.shape == (4, 1, 28, 28)


def test_scorer_known_answers(tmp_path) -> None:
    make_runs(tmp_path)
    runs = load_runs(tmp_path, image_size=28)
    perfect = [r.test_labels for r in runs]
    half_wrong = [torch.where(torch.arange(4) < 2, (r.test_labels + 1) % 4, r.test_labels) for r in runs]
    assert score_runs(runs, perfect) == ([0.0, 0.0], 0.0)
    assert score_runs(runs, [perfect[0], half_wrong[1]]) == ([0.0, 50.0], 25.0)
    with pytest.raises(ValueError, match="prediction sets"):
        score_runs(runs, perfect[:1])
    with pytest.raises(ValueError, match="expected"):
        score_runs(runs, [torch.zeros(3, dtype=torch.int64)] * 2)
    with pytest.raises(ValueError, match="no runs to score"):
        score_runs([], [])


def test_scorer_takes_predictions_on_a_gpu(tmp_path) -> None:
    """Predictions on a GPU (a model's argmax there; CUDA's device checks faked on the CPU) were
    compared with the runs' CPU labels, which raised "Expected all tensors to be on the same device"."""
    from fake_cuda import fake_cuda

    make_runs(tmp_path)
    runs = load_runs(tmp_path, image_size=28)
    wrong = (runs[1].test_labels + 1) % 4
    with fake_cuda():
        assert score_runs(runs, [runs[0].test_labels.cuda(), wrong.cuda()]) == ([0.0, 100.0], 50.0)


def test_scorer_means_the_runs_not_the_items(tmp_path) -> None:
    """The benchmark's mean is over runs: a run of 2 items weighs as much as one of 4."""
    make_runs(tmp_path / "a", runs=1, classes=2)
    make_runs(tmp_path / "b", runs=1, classes=4)
    runs = load_runs(tmp_path / "a", image_size=28) + load_runs(tmp_path / "b", image_size=28)
    all_wrong = (runs[0].test_labels + 1) % 2
    errors, mean = score_runs(runs, [all_wrong, runs[1].test_labels])
    assert errors == [100.0, 0.0] and mean == 50.0  # pooled over the 6 items it would be 33.3


def test_a_root_from_the_home_folder_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--runs=~/all_runs`` (no shell expands a ``~`` after ``=``) was "no such folder: ~/all_runs"."""
    truth = make_runs(tmp_path / "all_runs")
    monkeypatch.setenv("HOME", str(tmp_path))
    runs = load_runs("~/all_runs", image_size=None)
    assert [r.name for r in runs] == ["run01", "run02"] and torch.equal(runs[1].test_labels, truth[1])


def test_reader_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no run"):
        load_runs(tmp_path)
    make_runs(tmp_path, runs=1)
    labels = tmp_path / "run01" / "class_labels.txt"
    text = labels.read_text().splitlines()
    labels.write_text("\n".join(text[:-1]) + "\n")
    with pytest.raises(ValueError, match="no label for"):
        load_runs(tmp_path)
    labels.write_text("only-one-field\n")
    with pytest.raises(ValueError, match="expected 'test_item training_image'"):
        load_runs(tmp_path)
    labels.write_text("run01/test/item99.png run01/training/class01.png\n")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_runs(tmp_path)


def test_reader_refuses_a_label_line_with_extra_fields(tmp_path: Path) -> None:
    """Every test item keeps its label, so only the field count can flag the line."""
    make_runs(tmp_path, runs=1)
    labels = tmp_path / "run01" / "class_labels.txt"
    lines = labels.read_text().splitlines()
    lines[1] += " run01/training/class01.png"
    labels.write_text("\n".join(lines) + "\n")
    message = r"class_labels.txt line 2: expected 'test_item training_image', got 'run01/test/item02"
    with pytest.raises(ValueError, match=message):
        load_runs(tmp_path)


def test_reader_skips_hidden_files_as_the_omniglot_reader_does(tmp_path: Path) -> None:
    """A run folder copied from a Mac holds ``._*.png`` AppleDouble files (not images); like
    ``load_omniglot``, the reader skips hidden files instead of refusing the run."""
    truth = make_runs(tmp_path, runs=1)
    run = tmp_path / "run01"
    (run / "training" / "._class01.png").write_bytes(b"Mac resource fork, not a PNG")
    (run / "test" / "._item01.png").write_bytes(b"Mac resource fork, not a PNG")
    (loaded,) = load_runs(tmp_path, image_size=None)
    assert loaded.train_images.shape[0] == 4 and loaded.test_images.shape[0] == 4
    assert torch.equal(loaded.test_labels, truth[0])


def test_reader_refuses_a_test_item_labelled_twice(tmp_path: Path) -> None:
    """A second line for one item would silently overwrite its label."""
    make_runs(tmp_path, runs=1)
    labels = tmp_path / "run01" / "class_labels.txt"
    lines = labels.read_text().splitlines()
    item = lines[0].split()[0]
    lines.append(f"{item} run01/training/class04.png")
    labels.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"line 5: item01.png is labelled a second time"):
        load_runs(tmp_path)


def test_a_missing_folder_or_the_zip_itself_is_named_as_such(tmp_path: Path) -> None:
    """``--runs all_runs`` before unpacking, or ``--runs all_runs.zip``, said "no run* folders in"
    it, as if the folder existed and held something else."""
    with pytest.raises(FileNotFoundError, match=r"^no such folder: .*all_runs; give the folder that holds run01"):
        load_runs(tmp_path / "all_runs")
    (tmp_path / "all_runs.zip").write_bytes(b"PK")
    with pytest.raises(FileNotFoundError, match=r"all_runs\.zip is a file, not a folder; give .*all_runs\.zip unpacked"):
        load_runs(tmp_path / "all_runs.zip")


def test_class_labels_as_windows_tools_write_them(tmp_path: Path) -> None:
    """CRLF endings, a UTF-8 byte-order mark, trailing blank lines and UTF-16 (Windows
    PowerShell 5's ``>``) read alike; other bytes are one ValueError naming the file (it was
    UnicodeDecodeError's "'utf-8' codec can't decode byte 0xff", naming no file)."""
    truth = make_runs(tmp_path, runs=1)
    labels = tmp_path / "run01" / "class_labels.txt"
    bare = "\n".join(" ".join(Path(p).name for p in line.split()) for line in labels.read_text().splitlines())
    for text, encoding in [(bare.replace("\n", "\r\n") + "\r\n\r\n", "utf-8"), (bare, "utf-8-sig"),
                           (labels.read_text(), "utf-16"), (bare, "utf-16-be")]:  # fmt: skip
        data = text.encode(encoding)
        labels.write_bytes(b"\xfe\xff" + data if encoding == "utf-16-be" else data)
        assert torch.equal(load_runs(tmp_path)[0].test_labels, truth[0]), encoding
    labels.write_bytes(b"item01.png class01.png\n\xff\xfe\x00 not text")
    with pytest.raises(ValueError, match=r"run01/class_labels.txt is not UTF-8 or UTF-16 text \('utf-8' codec"):
        load_runs(tmp_path)


def test_run_repr_is_a_summary_and_comparing_does_not_raise(tmp_path: Path) -> None:
    # found by the user study: a run's repr printed its images' tensors, and == raised
    make_runs(tmp_path)
    runs = load_runs(tmp_path, image_size=28)
    assert repr(runs[0]) == "OneShotRun('run01', 4 training and 4 test images of 1x28x28)"
    assert runs[0] == runs[0] and runs[0] != load_runs(tmp_path, image_size=28)[0]


@pytest.mark.parametrize("item", ["item02.png", "item01.png"])
def test_images_of_different_sizes_in_a_run_are_named_at_their_original_size(tmp_path: Path, item: str) -> None:
    """With ``image_size=None``, a test item of another size than the training images was read as
    it is (two test items of different sizes failed in torch.stack); resized, they are one size."""
    make_runs(tmp_path, runs=1, classes=2)
    Image.new("1", (80, 105), 1).save(tmp_path / "run01" / "test" / item)
    with pytest.raises(ValueError, match=rf"run01: test/{item} is 105x80, training/class01.png 105x105: pass image_size"):
        load_runs(tmp_path, image_size=None)
    assert load_runs(tmp_path, image_size=28)[0].test_images.shape == (2, 1, 28, 28)


def test_png_names_in_capitals_are_read_as_the_omniglot_reader_reads_them(tmp_path: Path) -> None:
    """A run's ``*.PNG`` files were left out: a test item of that name was dropped unlabelled,
    silently, and a training image of that name made its label line 'not found in the run'."""
    truth = make_runs(tmp_path, runs=1)
    run = tmp_path / "run01"
    for name in ("training/class02.png", "test/item03.png"):
        (run / name).rename((run / name).with_suffix(".PNG"))
    labels = run / "class_labels.txt"
    labels.write_text(labels.read_text().replace("class02.png", "class02.PNG").replace("item03.png", "item03.PNG"))
    (loaded,) = load_runs(tmp_path, image_size=None)
    assert loaded.train_images.shape[0] == 4 and loaded.test_images.shape[0] == 4
    assert torch.equal(loaded.test_labels, truth[0])


def test_class_labels_with_windows_path_separators(tmp_path: Path) -> None:
    """A class_labels.txt written on Windows names ``run01\\test\\item01.png``; its items were
    'not found in the run' (the whole line read as one file name)."""
    truth = make_runs(tmp_path, runs=1)
    labels = tmp_path / "run01" / "class_labels.txt"
    labels.write_text(labels.read_text().replace("/", "\\"))
    assert torch.equal(load_runs(tmp_path)[0].test_labels, truth[0])


def test_only_run_and_digits_folders_are_runs(tmp_path: Path) -> None:
    """all_runs.zip holds run01 ... run20; another folder beside them whose name starts with
    "run" (a ``runs_old/`` backup, ``run_notes/``) was read as a run and failed with "needs
    training/*.png". Such folders are not runs; with no runNN folder at all the error says so."""
    make_runs(tmp_path, runs=2)
    (tmp_path / "runs_old").mkdir()
    (tmp_path / "run_notes").mkdir()
    assert [run.name for run in load_runs(tmp_path)] == ["run01", "run02"]
    only_others = tmp_path / "others"
    (only_others / "runs_old").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no runNN folders"):
        load_runs(only_others)
