"""Your own code named on the command line as ``package.module:attribute``, Python's entry-point
syntax: ``meta-train --task`` takes a task family so, ``evaluate optimizers --problems`` a problem."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

SEPARATOR = ":"


def entry_point_path(name: str) -> tuple[str, str] | None:
    """``(module, attribute)`` of ``name`` in entry-point syntax (dotted identifiers, a colon, an
    identifier); None for any other name, e.g. a weighted mixture member ``mlp-random:3``."""
    module, separator, attribute = name.partition(SEPARATOR)
    if not separator or not attribute.isidentifier() or not all(part.isidentifier() for part in module.split(".")):
        return None
    return module, attribute


def load_entry_point(name: str) -> Callable[..., Any]:
    """The callable (a class or a function) that ``name`` names, its module imported.

    Raises:
        ValueError: ``name`` is not in entry-point syntax, its module does not import (the
            message says why, and that the module must be on the import path), or has no
            callable of that name.
    """
    path = entry_point_path(name)
    if path is None:
        raise ValueError(f"{name!r} is not a module:Class name")
    module_name, attribute = path
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(
            f"cannot import {module_name!r} ({type(err).__name__}: {err}); it must be importable: the "
            "learnedopt command does not search the current folder, so run from the module's folder with "
            "PYTHONPATH=. (or python -m learnedopt)"
        ) from None
    except Exception as err:  # the module's own code failed: a SyntaxError, a RuntimeError at import
        raise ValueError(f"importing {module_name!r} raised {type(err).__name__}: {err}") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ValueError(f"module {module_name!r} has no class or function {attribute!r}")
    return factory


def takes_parameter(factory: Callable[..., Any], parameter: str) -> bool:
    """Whether ``factory`` can be called with the keyword argument ``parameter`` (a ``**kwargs``
    takes any)."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    return parameter in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
