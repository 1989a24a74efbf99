"""The public API keeps the project's conventions: every name in a package's ``__all__`` exists and
is public, and every public function, class and method (of ``learnedopt``, ``learnedopt.meta``,
``.nn``, ``.optim``, ``.evaluation``, ``.data`` and ``learnedopt.weights``) has type hints on its
parameters and return and a docstring, so that a callable added without them fails here."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest

#: the modules whose public names are the library's API; a package's are its ``__all__``,
#: ``learnedopt.weights``'s (which has no ``__all__``) the functions and classes it defines
MODULES = ("learnedopt", "learnedopt.meta", "learnedopt.nn", "learnedopt.optim",
           "learnedopt.evaluation", "learnedopt.data", "learnedopt.weights", "learnedopt.meta.fewshot", "learnedopt.models")

#: methods checked besides the public ones (``__init__``'s arguments are documented by its class)
DUNDERS = ("__init__", "__call__")


def public_names(module: ModuleType) -> list[str]:
    """The module's ``__all__``, else the public functions and classes it defines itself."""
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [name for name, value in vars(module).items()
            if not name.startswith("_") and (inspect.isfunction(value) or inspect.isclass(value))
            and value.__module__ == module.__name__]


def _own_docstring_needed(cls: type, name: str) -> bool:
    """Whether ``cls.name`` must have a docstring of its own: it overrides no method of a
    ``learnedopt`` class whose docstring it inherits (an override of ``nn.Module.forward`` or of a
    ``torch.optim.Optimizer`` method needs its own, stating what this one takes and does)."""
    for base in cls.__mro__[1:]:
        if name in vars(base):
            return not base.__module__.startswith("learnedopt")
    return True


def callable_problems(qualname: str, function: Callable[..., Any], *, method: bool, doc: str | None) -> list[str]:
    """What ``function`` lacks: annotations of its parameters (``self``/``cls`` of a method
    aside) or return, or its docstring ``doc`` (not asked of ``__init__``)."""
    problems = []
    signature = inspect.signature(function)
    unannotated = [name for number, (name, parameter) in enumerate(signature.parameters.items())
                   if parameter.annotation is inspect.Parameter.empty
                   and not (method and number == 0 and name in ("self", "cls"))]
    if unannotated:
        problems.append(f"{qualname}: parameters without a type hint: {', '.join(unannotated)}")
    if signature.return_annotation is inspect.Signature.empty:
        problems.append(f"{qualname}: no return annotation")
    if function.__name__ != "__init__" and not doc:
        problems.append(f"{qualname}: no docstring")
    return problems


def class_problems(cls: type) -> list[str]:
    """What ``cls`` and its own public methods, properties and ``__init__``/``__call__`` lack."""
    qualname = f"{cls.__module__}.{cls.__qualname__}"
    problems = []
    doc = cls.__doc__
    if not doc or (doc.startswith(f"{cls.__name__}(") and doc.endswith(")")):  # a dataclass's generated one
        problems.append(f"{qualname}: no docstring")
    for name, value in vars(cls).items():
        if name.startswith("_") and name not in DUNDERS:
            continue
        if isinstance(value, property):
            function, method = value.fget, True
        elif isinstance(value, (staticmethod, classmethod)):
            function, method = value.__func__, isinstance(value, classmethod)
        elif inspect.isfunction(value):
            function, method = value, True
        else:
            continue
        if function.__module__ != cls.__module__:  # not written with the class: typing.Protocol's own __init__
            continue
        doc = function.__doc__ if _own_docstring_needed(cls, name) else inspect.getdoc(getattr(cls, name))
        problems += callable_problems(f"{qualname}.{name}", function, method=method, doc=doc)
    return problems


def api_problems(module_name: str) -> list[str]:
    """Every breach of the conventions among ``module_name``'s public names."""
    module = importlib.import_module(module_name)
    problems = []
    for name in public_names(module):
        if not hasattr(module, name):
            problems.append(f"{module_name}.__all__ names {name!r}, which it does not define")
            continue
        if name.startswith("_") and not (name.startswith("__") and name.endswith("__")):
            problems.append(f"{module_name}.__all__ names the private {name!r}")
        value = getattr(module, name)
        if inspect.isclass(value) and value.__module__.startswith("learnedopt"):
            problems += class_problems(value)
        elif inspect.isfunction(value) and value.__module__.startswith("learnedopt"):
            problems += callable_problems(f"{value.__module__}.{value.__qualname__}", value, method=False,
                                          doc=value.__doc__)
    return problems


@pytest.mark.parametrize("module_name", MODULES)
def test_public_callables_have_type_hints_and_docstrings(module_name: str) -> None:
    problems = api_problems(module_name)
    assert not problems, "\n".join(problems)


def test_the_check_finds_what_is_missing() -> None:
    def bare(x, *, y: int = 0):  # what the check must catch
        return x

    class Documented:
        """A class."""

        def method(self, x: int) -> int:
            """A method."""
            return x

    class Module(importlib.import_module("torch").nn.Module):
        """A module whose forward only inherits ``nn.Module.forward``'s docstring."""

        def forward(self, x: int) -> int:
            return x

    class Child(Documented):
        """A subclass whose override inherits a docstring (here of a test class)."""

        def method(self, x: int) -> int:
            return x

        @property
        def size(self):
            """A property without a return annotation."""
            return 1

    assert callable_problems("bare", bare, method=False, doc=bare.__doc__) == [
        "bare: parameters without a type hint: x", "bare: no return annotation", "bare: no docstring"]
    assert class_problems(Documented) == []
    assert [p.rsplit(".", 1)[-1] for p in class_problems(Module)] == ["forward: no docstring"]
    # Child's override of a non-learnedopt class's method needs its own docstring, as Module's
    assert [p.rsplit(".", 1)[-1] for p in class_problems(Child)] == ["method: no docstring",
                                                                    "size: no return annotation"]


def test_weights_public_names_are_its_own_functions_and_classes() -> None:
    names = public_names(importlib.import_module("learnedopt.weights"))
    assert {"load_weights", "save_weights", "Preset", "UntrainedWeightsWarning"} <= set(names)
    assert "UpdateRule" not in names and "_load_file" not in names  # imported, private
