"""learnedopt.plugins: the module:Class names of meta-train --task and evaluate --problems."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import importable_module

from learnedopt.plugins import call_entry_point, entry_point_path, load_entry_point, takes_parameter

PLUGIN = '''
def needs_width(*, width):
    return width


def two_line_error():
    raise RuntimeError("the data server\\n  is not reachable")
'''


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch) -> str:  # noqa: ANN001 - pytest's fixture
    yield from importable_module(tmp_path, monkeypatch, "plugin", PLUGIN, {
        "bad": 'raise RuntimeError("set\\nDATA")\n',
        "script": "import sys\nsys.exit(0)\n",  # a script without a main guard
        "parses": "import argparse\nargparse.ArgumentParser().parse_args(['--lr', '1'])\n",
    })


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("pkg.mod:Cls", ("pkg.mod", "Cls")),
        ("mod:make_family", ("mod", "make_family")),
        ("mlp-random:3", None),  # a weighted mixture member
        ("pkg.my-tasks:Cls", None),  # every part of the module path must be an identifier
        ("my-pkg.tasks:Cls", None),
        ("mod", None),
        ("mod:", None),
        ("mod:Cls:2", None),
    ],
)
def test_entry_point_path(name: str, path: tuple[str, str] | None) -> None:
    assert entry_point_path(name) == path


def test_a_missing_package_is_the_advice_to_make_it_importable() -> None:
    """The module's package is not found (err.name is the package, not the module): the module
    is what is missing, not a dependency of it."""
    with pytest.raises(ValueError, match=re.escape(
        "cannot import 'no_such_pkg_xyz.tasks' (ModuleNotFoundError: No module named 'no_such_pkg_xyz'); it must be "
        "importable"
    )):  # fmt: skip
        load_entry_point("no_such_pkg_xyz.tasks:Family")


def test_an_attribute_that_cannot_be_called_is_not_a_class_or_function() -> None:
    with pytest.raises(ValueError, match=r"^module 'math' has no class or function 'pi'$"):
        load_entry_point("math:pi")


def test_a_builtin_without_a_signature_is_called_as_it_is() -> None:
    assert not takes_parameter(max, "data")
    assert call_entry_point("builtins:dict", dict, {}, "called with nothing") == {}


def test_a_required_keyword_only_argument_is_named(plugin: str) -> None:
    factory = load_entry_point(f"{plugin}:needs_width")
    with pytest.raises(ValueError, match=re.escape(
        f"{plugin}:needs_width needs width, which it is not given (called with nothing): give them defaults"
    )):  # fmt: skip
        call_entry_point(f"{plugin}:needs_width", factory, {}, "called with nothing")
    assert call_entry_point(f"{plugin}:needs_width", factory, {"width": 3}, "") == 3


def test_errors_of_the_users_code_are_one_line(plugin: str) -> None:
    factory = load_entry_point(f"{plugin}:two_line_error")
    with pytest.raises(ValueError, match=re.escape(
        f"{plugin}:two_line_error() raised RuntimeError: the data server is not reachable"
    )) as raised:  # fmt: skip
        call_entry_point(f"{plugin}:two_line_error", factory, {}, "")
    assert "\n" not in str(raised.value)
    with pytest.raises(ValueError, match=re.escape(f"importing '{plugin}_bad' failed: RuntimeError: set DATA")):
        load_entry_point(f"{plugin}_bad:F")


@pytest.mark.parametrize(("suffix", "code"), [("script", "0"), ("parses", "2")])
def test_a_module_that_exits_when_imported_is_named_not_obeyed(plugin: str, suffix: str, code: str) -> None:
    # sys.exit(0) at import ended `learnedopt meta-train` with success, having done nothing
    with pytest.raises(ValueError, match=re.escape(
        f"importing '{plugin}_{suffix}' exited (SystemExit: {code}): it runs a script when imported; put that code "
        'under if __name__ == "__main__":'
    )):  # fmt: skip
        load_entry_point(f"{plugin}_{suffix}:F")
