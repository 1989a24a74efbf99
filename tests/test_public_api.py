"""The public API keeps the project's conventions: every name in a package's ``__all__`` exists and
is public, and every public function, class and method (of ``learnedopt``, ``learnedopt.meta``,
``.nn``, ``.optim``, ``.evaluation``, ``.data``, ``.kernels`` and ``learnedopt.weights``, and of every
other module that defines an ``__all__``) has type hints on its parameters and return that name
something (they resolve, ``TYPE_CHECKING`` imports included) and are not a bare ``tuple``/``list``/
``dict``/``set``, and a docstring, which says shapes where the callable takes or returns tensors;
so that a callable added without them fails here.

What is checked of a class: its docstring, and its own public methods, properties, ``__init__``
and ``__call__``, and those of the ``learnedopt`` classes it derives from (not of ``torch``'s).
Exemptions, all structural:

- the first parameter of a method or classmethod (``self``/``cls``) needs no annotation (every
  other one does, ``*args``/``**kwargs`` and an ``autograd.Function``'s ``ctx`` included);
- ``__init__`` needs no docstring (its class's documents its arguments);
- an override of a ``learnedopt`` method may inherit that method's docstring (an override of a
  ``torch`` method, ``nn.Module.forward``, ``Optimizer.step``, ``autograd.Function.backward``, must
  have its own);
- a name in an ``__all__`` that is not a ``learnedopt`` function or class (a constant, a re-export
  from ``torch``) is only checked to exist.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import inspect
import re
import typing
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from torch import Tensor

#: the modules whose public names are the library's API; a package's are its ``__all__``,
#: ``learnedopt.weights``'s (which has no ``__all__``) the functions and classes it defines
MODULES = ("learnedopt", "learnedopt.meta", "learnedopt.nn", "learnedopt.optim",
           "learnedopt.evaluation", "learnedopt.data", "learnedopt.weights", "learnedopt.meta.fewshot", "learnedopt.models",
           "learnedopt.meta.maml", "learnedopt.kernels", "learnedopt.kernels.lstm_layer_cpu")

#: the Triton kernel modules (those with an ``__all__``, and ``coordinate_lstm_step``, whose public
#: functions the others use); they import Triton, so they are checked where it is installed
TRITON_MODULES = ("learnedopt.kernels.coordinate_lstm_backward", "learnedopt.kernels.meta_lstm_backward",
                  "learnedopt.kernels.meta_lstm_step", "learnedopt.kernels.coordinate_lstm_step")

#: annotations that say too little: a container's items must be named (``tuple[Tensor, ...]``)
BARE_CONTAINERS = frozenset({"tuple", "list", "dict", "set", "frozenset", tuple, list, dict, set, frozenset})

#: a docstring that says a shape: ``(N, H)``, ``(2, N)``, "shape", "scalar", "0-d", "same size as" ...
SHAPE_WORDS = re.compile(r"\(\s*[A-Za-z0-9_*+ -]*,|\bshapes?\b|\bscalar|\b0-d\b|\bsame (shape|size)", re.IGNORECASE)

ROOT = Path(__file__).resolve().parents[1]

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


@functools.cache
def annotation_namespace(module_name: str) -> dict[str, Any]:
    """The names ``module_name``'s annotations may use: its globals and what it imports under
    ``if TYPE_CHECKING:`` (names that exist for the type checker only)."""
    module = importlib.import_module(module_name)
    namespace = dict(vars(module))
    source = inspect.getsource(module)
    for node in ast.parse(source).body:
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            exec(compile(ast.Module(body=node.body, type_ignores=[]), module.__file__, "exec"), namespace)
    return namespace


def _names_tensor(annotation: Any) -> bool:
    """Whether an annotation (a string, under ``from __future__ import annotations``) is a tensor
    or a sequence or optional of tensors, not only a mapping holding some (a ``state_dict``)."""
    text = str(annotation)
    return bool(re.search(r"\bTensor\b", re.sub(r"\b(Mapping|dict|MutableMapping)\[[^\]]*\]", "", text)))


def callable_problems(qualname: str, function: Callable[..., Any], *, method: bool, doc: str | None) -> list[str]:
    """What ``function`` lacks: annotations of its parameters (``self``/``cls`` of a method
    aside) and return, that resolve and are not bare containers; its docstring ``doc`` (not asked
    of ``__init__``), which must say shapes when a parameter or the return is a tensor."""
    problems = []
    signature = inspect.signature(function)
    parameters = [(name, parameter) for number, (name, parameter) in enumerate(signature.parameters.items())
                  if not (method and number == 0 and name in ("self", "cls"))]
    unannotated = [name for name, parameter in parameters if parameter.annotation is inspect.Parameter.empty]
    if unannotated:
        problems.append(f"{qualname}: parameters without a type hint: {', '.join(unannotated)}")
    if signature.return_annotation is inspect.Signature.empty:
        problems.append(f"{qualname}: no return annotation")
    annotations = {name: parameter.annotation for name, parameter in parameters}
    annotations["return"] = signature.return_annotation
    bare = [name for name, annotation in annotations.items() if annotation in BARE_CONTAINERS]
    if bare:
        problems.append(f"{qualname}: bare container annotations (name the items): {', '.join(bare)}")
    try:
        typing.get_type_hints(function, globalns=annotation_namespace(function.__module__))
    except Exception as error:  # a NameError of a misspelt or never-imported name, mostly
        problems.append(f"{qualname}: type hints do not resolve: {type(error).__name__}: {error}")
    if function.__name__ != "__init__":
        if not doc:
            problems.append(f"{qualname}: no docstring")
        elif any(_names_tensor(annotation) for annotation in annotations.values()) and not SHAPE_WORDS.search(doc):
            problems.append(f"{qualname}: takes or returns tensors, but its docstring says no shape")
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
    """Every breach of the conventions among ``module_name``'s public names (and the ``learnedopt``
    classes that its public classes derive from)."""
    module = importlib.import_module(module_name)
    problems = []
    checked: set[type] = set()
    for name in public_names(module):
        if not hasattr(module, name):
            problems.append(f"{module_name}.__all__ names {name!r}, which it does not define")
            continue
        if name.startswith("_") and not (name.startswith("__") and name.endswith("__")):
            problems.append(f"{module_name}.__all__ names the private {name!r}")
        value = getattr(module, name)
        if inspect.isclass(value) and value.__module__.startswith("learnedopt"):
            for cls in value.__mro__:
                if cls.__module__.startswith("learnedopt") and cls not in checked:
                    checked.add(cls)
                    problems += class_problems(cls)
        elif inspect.isfunction(value) and value.__module__.startswith("learnedopt"):
            problems += callable_problems(f"{value.__module__}.{value.__qualname__}", value, method=False,
                                          doc=value.__doc__)
    return problems


def modules_with_all() -> set[str]:
    """Every module of the package (the ``kernels`` link followed) that assigns ``__all__``, read
    from the source without importing it."""
    found = set()
    package = ROOT / "learnedopt"
    for path in sorted(package.glob("**/*.py")) + sorted((package / "kernels").glob("**/*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        targets = [target for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                   for target in (node.targets if isinstance(node, ast.Assign) else [node.target])]
        if any(isinstance(target, ast.Name) and target.id == "__all__" for target in targets):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return found


@pytest.mark.parametrize("module_name", MODULES + TRITON_MODULES)
def test_public_callables_have_type_hints_and_docstrings(module_name: str) -> None:
    if module_name in TRITON_MODULES and importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed: the kernel modules do not import")
    problems = api_problems(module_name)
    assert not problems, "\n".join(problems)


def test_every_module_with_an_all_is_checked() -> None:
    # a module's __all__ says it is public: one added must be added to MODULES (or TRITON_MODULES)
    assert modules_with_all() - set(MODULES + TRITON_MODULES) == set()
    assert {"learnedopt.meta.maml", "learnedopt.kernels.meta_lstm_step"} <= modules_with_all()


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

    def vague(x: Tensor, scale: Tensr) -> tuple:  # noqa: F821 (the misspelt hint is the point)
        """Doubles ``x``."""
        return x, scale

    def shaped(x: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``x`` ``(N,)`` and its double."""
        return x, 2 * x

    def holds_tensors(state: dict[str, Tensor]) -> int:
        """How many tensors a ``state_dict`` holds (no tensor of its own: no shape to say)."""
        return len(state)

    problems = callable_problems("vague", vague, method=False, doc=vague.__doc__)
    assert problems[0] == "vague: bare container annotations (name the items): return"
    assert problems[1].startswith("vague: type hints do not resolve: NameError") and "Tensr" in problems[1]
    assert problems[2:] == ["vague: takes or returns tensors, but its docstring says no shape"]
    assert callable_problems("shaped", shaped, method=False, doc=shaped.__doc__) == []
    assert callable_problems("holds_tensors", holds_tensors, method=False, doc=holds_tensors.__doc__) == []
    assert class_problems(Documented) == []
    assert [p.rsplit(".", 1)[-1] for p in class_problems(Module)] == ["forward: no docstring"]
    # Child's override of a non-learnedopt class's method needs its own docstring, as Module's
    assert [p.rsplit(".", 1)[-1] for p in class_problems(Child)] == ["method: no docstring",
                                                                    "size: no return annotation"]


def test_weights_public_names_are_its_own_functions_and_classes() -> None:
    names = public_names(importlib.import_module("learnedopt.weights"))
    assert {"load_weights", "save_weights", "Preset", "UntrainedWeightsWarning"} <= set(names)
    assert "UpdateRule" not in names and "_load_file" not in names  # imported, private
