"""Data flows one way through the package (README's *Layout*): every module of ``learnedopt/``
and ``kernels/`` sits in a layer and imports only from its own layer or lower ones.

The modules are parsed with :mod:`ast`, never imported, and every import of the package counts:
absolute or relative, at the top of a module or inside a function or an ``if`` block.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: The layers, lowest first: the paths each holds (a path ending in ``/`` holds its folder; the
#: longest path that matches places a module), and what it is ("name: explanation").
LAYERS = (
    ("learnedopt/values.py learnedopt/errors.py learnedopt/finite.py learnedopt/autocast.py learnedopt/files.py learnedopt/switches.py "
     "learnedopt/markdown.py learnedopt/plugins.py learnedopt/version.py learnedopt/freed_memory.py "
     "learnedopt/models.py learnedopt/pretrained/",
     "helpers: value checks, errors, the NaN/Inf check, autocast off, files, switches, plug-ins, version, models; shared by all"),
    ("learnedopt/data/ learnedopt/meta/tasks.py",
     "data: data readers and task families, what the optimizees are; they know no update rule"),
    ("learnedopt/nn/functional.py",
     "formulas: per-coordinate math (preprocess, RMS_EPS) shared by the networks and the kernels"),
    ("kernels/",
     "kernels: those formulas fused (learnedopt.kernels); no optimizer or meta-training"),
    ("learnedopt/nn/ learnedopt/weights.py",
     "networks: update rules and their weight files; pure math on coordinates, no optimizer state"),
    ("learnedopt/optim/ learnedopt/meta/unroll.py",
     "optimizers: state, param groups and dispatch; and the functional unroll, their sibling"),
    ("learnedopt/meta/",
     "meta-learning: update-rule training, MAML, Reptile, few-shot, and their run machinery"),
    ("learnedopt/__init__.py learnedopt/__main__.py learnedopt/cli.py learnedopt/train.py "
     "learnedopt/demo.py learnedopt/meta/command.py learnedopt/evaluation/",
     "top: the public names, the command lines (one meta-train for every algorithm), evaluation"),
)

#: Imports against the flow that are meant: (importing file, imported name) -> why.
EXCEPTIONS = {
    ("kernels/coordinate_lstm_backward.py", "learnedopt.nn.CoordinateLSTMConfig"):
        "type-only (TYPE_CHECKING): the launcher's config annotation; the kernel reads its fields",
    ("kernels/meta_lstm_backward.py", "learnedopt.nn.MetaLSTMConfig"):
        "type-only (TYPE_CHECKING): the launcher's config annotation; the kernel reads its fields",
    ("learnedopt/meta/train.py", "learnedopt.meta.command.main"):
        "`python -m learnedopt.meta.train` runs the meta-train command (README), under __main__ only",
}

#: Siblings in one layer that import neither each other (README: errors.py serves both for that).
APART = (("learnedopt/optim/", "learnedopt/meta/unroll.py"),)


def module_name(file: str) -> str:
    """The dotted name of the module in ``file`` (relative to the repository root): ``kernels/``
    is installed as ``learnedopt.kernels``."""
    parts = Path(file).with_suffix("").parts
    parts = ("learnedopt", *parts) if parts[0] == "kernels" else parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_files() -> dict[str, str]:
    """Every module's dotted name -> its file (``learnedopt/kernels``, the symlink to
    ``kernels/``, left out)."""
    files = [p.relative_to(ROOT).as_posix() for top in ("learnedopt", "kernels") for p in sorted((ROOT / top).rglob("*.py"))]
    return {module_name(f): f for f in files if not f.startswith("learnedopt/kernels/")}


MODULES = module_files()


def holds(path: str, file: str) -> bool:
    """Whether the path of :data:`LAYERS` or :data:`APART` holds ``file``."""
    return file == path or (path.endswith("/") and file.startswith(path))


def layer_of(file: str) -> int | None:
    """The index in :data:`LAYERS` of the layer that holds ``file``, or None."""
    best, layer = -1, None
    for index, (paths, _) in enumerate(LAYERS):
        for path in paths.split():
            if holds(path, file) and len(path) > best:
                best, layer = len(path), index
    return layer


def imports(file: str, source: str) -> list[tuple[int, str, str]]:
    """``(line, module, name)`` of every import of the package in ``source`` (the text of
    ``file``): ``module`` the dotted name of the module imported from, ``name`` what is imported
    (``module`` itself, or ``module.attribute``)."""
    parts = module_name(file).split(".")
    package = parts if file.endswith("__init__.py") else parts[:-1]
    found = []
    for node in ast.walk(ast.parse(source, file)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "learnedopt":
                    found.append((node.lineno, known_module(alias.name), alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != "learnedopt":
                continue
            for alias in node.names:
                name = f"{base}.{alias.name}"
                found.append((node.lineno, known_module(name), name))
    return found


def known_module(name: str) -> str:
    """The longest dotted prefix of ``name`` that is a module of the package."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def layer_name(layer: int) -> str:
    """``'layer N (name)'``."""
    return f"layer {layer} ({LAYERS[layer][1].split(':')[0]})"


def upward_imports(file: str, source: str) -> list[tuple[str, str, str]]:
    """``(where, name, why)`` of each import in ``source`` (the text of ``file``) from a layer
    above ``file``'s."""
    own = layer_of(file)
    upward = []
    for line, module, name in imports(file, source):
        target = layer_of(MODULES.get(module, ""))
        if own is not None and target is not None and target > own:
            upward.append((f"{file}:{line}", name, f"{layer_name(own)} imports from {layer_name(target)}"))
    return upward


def all_upward_imports() -> list[tuple[str, str, str]]:
    """:func:`upward_imports` of every module of the package."""
    return [found for file in MODULES.values() for found in upward_imports(file, (ROOT / file).read_text())]


def test_every_module_has_a_layer_and_every_listed_path_exists() -> None:
    unplaced = [file for file in MODULES.values() if layer_of(file) is None]
    assert not unplaced, f"modules in no layer of LAYERS (add them to the layer they belong to): {unplaced}"
    missing = [path for paths, _ in LAYERS for path in paths.split() if not (ROOT / path).exists()]
    assert not missing, f"LAYERS names paths that do not exist: {missing}"


def test_no_module_imports_from_a_higher_layer() -> None:
    against = [f"{where}: {name}: {why}" for where, name, why in all_upward_imports()
               if (where.split(":")[0], name) not in EXCEPTIONS]
    assert not against, "imports against the flow:\n" + "\n".join(against)


def test_every_exception_is_still_an_import_against_the_flow() -> None:
    found = {(where.split(":")[0], name) for where, name, _ in all_upward_imports()}
    stale = [key for key in EXCEPTIONS if key not in found]
    assert not stale, f"EXCEPTIONS lists imports that are gone or no longer against the flow: {stale}"


def test_the_siblings_kept_apart_import_neither_each_other() -> None:
    crossing = [f"{file}:{line}: {name}"
                for pair in APART for mine, theirs in (pair, pair[::-1])
                for file in MODULES.values() if holds(mine, file)
                for line, module, name in imports(file, (ROOT / file).read_text())
                if holds(theirs, MODULES.get(module, ""))]
    assert not crossing, "imports between siblings kept apart (APART):\n" + "\n".join(crossing)


def test_each_top_level_module_sits_at_the_lowest_layer_its_imports_allow() -> None:
    """A helper of ``learnedopt/`` (not a subpackage) sits where its own imports put it: as low as
    the highest layer it imports from (the package's ``__init__``, the public names, excepted)."""
    too_high = []
    for file in MODULES.values():
        if file.count("/") != 1 or not file.startswith("learnedopt/") or file == "learnedopt/__init__.py":
            continue
        lowest = max((layer_of(MODULES[module]) for _, module, _ in imports(file, (ROOT / file).read_text())),
                     default=0)
        if layer_of(file) != lowest:
            too_high.append(f"{file} (in {layer_name(layer_of(file))}, its imports allow {layer_name(lowest)})")
    assert not too_high, f"top-level modules not at the lowest layer their imports allow: {too_high}"


@pytest.mark.parametrize(
    ("file", "source", "upward"),
    [
        ("learnedopt/nn/base.py", "from learnedopt.optim import LSTMOptimizer", True),
        ("learnedopt/nn/base.py", "def f():\n    from ..optim.update import flat_update_\n", True),
        ("learnedopt/nn/new_rule.py", "import learnedopt.meta.unroll", True),
        ("kernels/coordinate_lstm_step.py", "import learnedopt.meta", True),
        ("kernels/new_kernel.py", "if True:\n    from .. import optim\n", True),
        ("learnedopt/data/idx.py", "from ..nn import UpdateRule", True),
        ("learnedopt/values.py", "from .weights import PRESETS", True),
        ("learnedopt/meta/maml.py", "from .command import main", True),
        ("learnedopt/nn/base.py", "from ..values import is_integer\nfrom .functional import preprocess", False),
        ("kernels/meta_lstm_step.py", "from ..nn.functional import RMS_EPS\nfrom .coordinate_lstm_step import x", False),
        ("learnedopt/meta/unroll.py", "from .. import kernels\nfrom .tasks import TaskBatch", False),
        ("learnedopt/optim/update.py", "import torch\nfrom torch import nn", False),
    ],
)
def test_an_import_against_the_flow_is_caught(file: str, source: str, upward: bool) -> None:
    assert bool(upward_imports(file, source)) == upward, upward_imports(file, source)
