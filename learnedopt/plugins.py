"""Your own code named on the command line as ``package.module:attribute``, Python's entry-point
syntax: ``meta-train --task`` takes a task family so (for ``--algo lstm`` a
:class:`~learnedopt.meta.TaskFamily`, for the few-shot algorithms a
:class:`~learnedopt.meta.fewshot.FewShotFamily`), ``meta-train --rule`` and ``evaluate optimizers
--rules`` an update rule, ``evaluate optimizers --problems`` a problem."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
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
        ValueError: ``name`` is not in entry-point syntax, its module is not found (the message
            says it must be on the import path), fails to import (whatever it raises: a
            SyntaxError, a missing dependency, its own RuntimeError, a SystemExit of script code
            run at import), or has no callable of that name.
    """
    path = entry_point_path(name)
    if path is None:
        raise ValueError(f"{name!r} is not a module:Class name")
    module_name, attribute = path
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and not (module_name == err.name or module_name.startswith(err.name + ".")):
            # the module was found; a module it imports was not
            raise ValueError(f"importing {module_name!r} failed: {type(err).__name__}: {err}") from None
        raise ValueError(
            f"cannot import {module_name!r} ({type(err).__name__}: {err}); it must be importable: the "
            "learnedopt command does not search the current folder, so run from the module's folder with "
            "PYTHONPATH=. (or python -m learnedopt)"
        ) from None
    except Exception as err:  # noqa: BLE001 - the user's module: SyntaxError, RuntimeError, ...
        raise ValueError(f"importing {module_name!r} failed: {type(err).__name__}: {one_line(err)}") from None
    except SystemExit as err:
        # a script's code run at import (its argparse reading learnedopt's arguments, its sys.exit):
        # sys.exit(0) ended the command with success, having done nothing
        raise ValueError(
            f"importing {module_name!r} exited (SystemExit: {err.code!r}): it runs a script when imported; put that "
            "code under if __name__ == \"__main__\":"
        ) from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ValueError(f"module {module_name!r} has no class or function {attribute!r}")
    return factory


def takes_parameter(factory: Callable[..., Any], parameter: str) -> bool:
    """Whether ``factory`` can be called with the keyword argument ``parameter`` (a ``**kwargs``
    takes any)."""
    parameters = _parameters(factory)
    return parameter in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def family_arguments(name: str, factory: Callable[..., Any], split: str, given: Mapping[str, tuple[Any, str]]) -> dict[str, Any]:
    """The keyword arguments a task family's ``factory`` is called with: ``split=`` if it takes
    that parameter, and each ``parameter: (value, option)`` of ``given`` whose value is not None.

    Raises:
        ValueError: ``factory`` does not take a given parameter (its option would be ignored).
    """
    kwargs: dict[str, Any] = {"split": split} if takes_parameter(factory, "split") else {}
    for parameter, (value, option) in given.items():
        if value is None:
            continue
        if not takes_parameter(factory, parameter):
            raise ValueError(f"{name} takes no {parameter} parameter, so {option} would be ignored")
        kwargs[parameter] = value
    return kwargs


def call_entry_point(name: str, factory: Callable[..., Any], kwargs: Mapping[str, Any], passes: str) -> Any:
    """``factory(**kwargs)``, the callable :func:`load_entry_point` gave for ``name``.

    Raises:
        ValueError: it needs arguments that ``kwargs`` lacks (the message names them and says
            what it is called with: ``passes``), or it raised (its message on one line).
    """
    needed = [
        p.name
        for p in _parameters(factory).values()
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and p.name not in kwargs
    ]
    if needed:
        raise ValueError(
            f"{name} needs {', '.join(needed)}, which it is not given ({passes}): give them defaults, or name a "
            "function that builds it"
        )
    try:
        return factory(**kwargs)
    except Exception as err:  # noqa: BLE001 - the user's constructor
        raise ValueError(f"{name}() raised {type(err).__name__}: {one_line(err)}") from None


#: what a task family of one's own whose two draws from one seed differ is told (a global random
#: state: ``--resume`` would draw other tasks than the run it continues)
REPEATABLE_DRAWS = ("draw only from the generator it is given (not from torch's, numpy's or Python's global random "
                    "state), so that --resume repeats the run")  # fmt: skip


def one_line(err: BaseException) -> str:
    """``str(err)`` on one line (a traceback-free message for a one-line error)."""
    return " ".join(str(err).split())


def _parameters(factory: Callable[..., Any]) -> Mapping[str, inspect.Parameter]:
    try:
        return inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin without a signature: called as it is
        return {}


def checked_description(described: Any, what: str = "sentence") -> str:
    """``described.describe()`` of one's own task family or source, which goes in the model card;
    ValueError unless it is a non-empty string."""
    description = described.describe()
    if not isinstance(description, str) or not description.strip():
        raise ValueError(f"it must return a {what} for the model card, got {description!r}")
    return description
