"""The README's *Layout* table names every module and subpackage of ``learnedopt/`` (and of
``kernels/``'s files the ``.py`` and ``.cpp`` ones it mentions exist), and every path it names
exists, so that a module added, moved or removed cannot leave the table stale."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def layout_rows() -> list[tuple[list[str], str]]:
    """Each row of the Layout table: the paths of its first column and its description."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        first, what = line.strip("|").split("|", 1)
        rows.append((re.findall(r"`([^`]+)`", first), what))
    return rows


def test_the_table_is_found() -> None:
    rows = layout_rows()
    assert len(rows) > 10
    assert any("learnedopt/nn/" in paths for paths, _ in rows)


def test_every_named_path_exists() -> None:
    missing = []
    for paths, what in layout_rows():
        for path in paths:
            if not (ROOT / path).exists():
                missing.append(path)
        folders = [ROOT / p for p in paths if (ROOT / p).is_dir()]
        for name in re.findall(r"`([\w/]+\.(?:py|cpp))`", what):
            if "/" in name:
                if not (ROOT / name).exists():
                    missing.append(name)
            elif folders and not any(list(folder.rglob(name)) for folder in folders):
                missing.append(f"{name} (in {', '.join(paths)})")
    assert not missing, f"README's Layout names paths that do not exist: {missing}"


def test_every_module_of_the_package_is_listed() -> None:
    listed = {path.rstrip("/") for paths, _ in layout_rows() for path in paths}
    entries = sorted(p for p in (ROOT / "learnedopt").iterdir()
                     if p.name not in ("__init__.py", "__pycache__") and not p.name.endswith(".egg-info")
                     and (p.suffix == ".py" or p.is_dir()))
    unlisted = [f"learnedopt/{p.name}" for p in entries if f"learnedopt/{p.name}" not in listed]
    # learnedopt/kernels is the symlink to kernels/, listed as kernels/
    unlisted = [u for u in unlisted if not (u == "learnedopt/kernels" and "kernels" in listed)]
    assert not unlisted, f"README's Layout leaves out {unlisted}"


#: the rows that list their folder's modules one by one (the others describe theirs as a whole)
MODULE_BY_MODULE = ("learnedopt/meta/", "learnedopt/evaluation/")


def test_the_module_by_module_rows_name_every_module() -> None:
    rows = {path: what for paths, what in layout_rows() for path in paths}
    unnamed = []
    for path in MODULE_BY_MODULE:
        named = set(re.findall(r"`(\w+)(?:\.py|/)`", rows[path]))
        for entry in sorted((ROOT / path).iterdir()):
            if entry.name in ("__init__.py", "__pycache__") or not (entry.suffix == ".py" or entry.is_dir()):
                continue
            if entry.name.removesuffix(".py") not in named:
                unnamed.append(f"{path}{entry.name}")
    assert not unnamed, f"README's Layout rows leave out {unnamed}"
