"""The README's *Dependencies and why* names every requirement of ``pyproject.toml`` (core and
extras) and nothing else but optional packages it says are optional, and every third-party module
that the library and its kernels import is one of those, so that a dependency added, dropped or
newly imported cannot leave the section stale."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: import names whose distributions are named otherwise
DISTRIBUTION_OF = {"PIL": "pillow"}


def section() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split("\n## Dependencies and why\n", 1)[1].split("\n## ", 1)[0]


def named_in_readme() -> set[str]:
    """The packages the section names in bold, lower-cased."""
    return {name.lower() for name in re.findall(r"\*\*([A-Za-z][\w.-]*)\*\*", section())}


def declared() -> set[str]:
    """The distributions ``pyproject.toml`` requires, core and extras, lower-cased."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    return {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in requirements}


def imported_third_party() -> dict[str, str]:
    """Top-level third-party modules imported anywhere in ``learnedopt/`` and ``kernels/``: name ->
    a file importing it."""
    found: dict[str, str] = {}
    for folder in ("learnedopt", "kernels"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in ("learnedopt", "kernels"):
                        found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def test_the_section_is_found() -> None:
    assert {"torch", "numpy"} <= named_in_readme()


def test_every_requirement_is_explained() -> None:
    missing = declared() - named_in_readme()
    assert not missing, f"pyproject.toml requires {sorted(missing)}, which README's Dependencies and why does not name"


def test_every_package_named_is_required_or_said_to_be_optional() -> None:
    for name in sorted(named_in_readme() - declared()):
        sentence = next(s for s in re.split(r"(?<=\.)\s", section()) if f"**{name}**" in s.lower())
        assert "optional" in sentence, f"README names **{name}**, which pyproject.toml does not require: say it is optional"


def test_every_third_party_import_is_a_named_dependency() -> None:
    unexplained = {
        name: where for name, where in imported_third_party().items()
        if DISTRIBUTION_OF.get(name, name).lower() not in named_in_readme()
    }
    assert not unexplained, f"modules imported but not in README's Dependencies and why: {unexplained}"
