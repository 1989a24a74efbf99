"""Every relative link in the project's Markdown files (README, the full results account, the
experiments' READMEs, the model cards) points to a file or folder that exists, so moving or
renaming a result cannot leave a document pointing nowhere."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(([^)\s]+)\)")


def markdown_files() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every Markdown file but the venv's
        return [p for p in ROOT.rglob("*.md") if ".venv" not in p.parts]
    return [ROOT / name for name in listed]


def relative_targets(text: str) -> list[str]:
    """The link targets of ``text`` that name a local path (anchors and URLs left out)."""
    targets = (match.group(1).split("#")[0] for match in LINK.finditer(text))
    return [t for t in targets if t and not t.startswith(("http://", "https://", "mailto:"))]


def test_the_extraction_finds_links() -> None:
    assert relative_targets("see [a](x/y.md#part), [b](https://e.org) and [c](#top)") == ["x/y.md"]
    assert len(markdown_files()) > 10


@pytest.mark.parametrize("document", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(document: Path) -> None:
    missing = [t for t in relative_targets(document.read_text()) if not (document.parent / t).exists()]
    assert not missing, f"{document.relative_to(ROOT)} links to missing paths: {missing}"
