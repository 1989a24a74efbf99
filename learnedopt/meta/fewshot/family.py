"""Your own few-shot task family, named on the command line as ``meta-train --algo
maml|fomaml|reptile|meta-lstm --task package.module:attribute`` (Python's entry-point syntax, as
:mod:`learnedopt.plugins` reads it): what it must provide (:class:`FewShotFamily`), how it is
built (:func:`import_fewshot_family`) and checked before a run writes anything
(:func:`check_family_source`)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ...plugins import (
    REPEATABLE_DRAWS,
    call_entry_point,
    checked_description,
    entry_point_path,
    family_arguments,
    load_entry_point,
    one_line,
)
from ..model_calls import default_loss, mse_loss
from ..tasks import TaskFamily

#: the losses a learner names in its model file; a family's ``loss`` may name one of them
LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    # outputs and targets of one shape: torch's broadcast (N, 1) against (N,) with only a warning
    "mse": mse_loss,
    # MAML's default: integer labels of any width, float labels refused in one line (as on every path)
    "cross_entropy": default_loss,
}
#: a model file's ``architecture["kind"]`` for a learner whose network a family of your own builds
OWN_KIND = "own"
#: a model file's ``loss`` where the family's ``loss`` is a callable rather than a name of :data:`LOSSES`
OWN_LOSS = "own"
_MEMBERS = ("sample", "model", "loss", "describe")


@runtime_checkable
class FewShotFamily(Protocol):
    """What ``--task module:attribute`` names for the few-shot algorithms: a class, or a function
    returning such an object. It is called with ``split="meta_train"`` (the meta-training tasks)
    or ``split="meta_valid"`` (the validation tasks) if it takes ``split``, and with ``shots=``
    (``--train-shots``, else ``--shots``, for meta-training; ``--shots`` for validation),
    ``queries=`` and ``data=`` when ``--shots``, ``--queries`` or ``--data`` are given (each
    refused if it does not take them).

    Attributes:
        loss: ``"mse"``, ``"cross_entropy"`` (validation then reports the accuracy too), or a
            callable ``loss(outputs, targets) -> Tensor`` giving a scalar (the mean over the
            examples) that autograd can differentiate twice for ``--algo maml``.
    """

    loss: str | Callable[[Tensor, Tensor], Tensor]

    def sample(self, size: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``size`` tasks ``(x_support, y_support, x_query, y_query)``, drawn from ``generator``
        alone (so that a resumed run draws the same tasks): inputs ``(size, N, ...)`` and targets
        ``(size, N, ...)`` of ``N`` support examples per task, the same for the ``M`` query
        examples; float inputs on the CPU (the run moves them to ``--device``)."""
        ...

    def model(self) -> nn.Module:
        """The network, freshly initialised from the global RNG (which the run seeds, and which
        ``load_learner`` calls it again to rebuild): ``(N, ...)`` inputs of one task to the
        outputs ``loss`` reads."""
        ...

    def describe(self) -> str:
        """The tasks in a sentence or a paragraph, for the model card."""
        ...


def is_own_task(task: str) -> bool:
    """Whether ``--task`` names a family of your own (``module:attribute``)."""
    return entry_point_path(task) is not None


def import_fewshot_family(
    name: str,
    *,
    split: str = "meta_train",
    shots: int | None = None,
    queries: int | None = None,
    data: str | None = None,
) -> Any:
    """The :class:`FewShotFamily` that ``name`` (``module:attribute``) builds, called as
    :class:`FewShotFamily` says.

    Raises:
        ValueError: the module does not import or lacks the name, the callable does not take a
            given ``shots``/``queries``/``data``, needs other arguments, raises, or what it
            returns lacks one of ``sample``, ``model``, ``loss``, ``describe`` or names an
            unknown loss (one line each).
    """
    factory = load_entry_point(name)
    given = {"shots": (shots, "--shots"), "queries": (queries, "--queries"), "data": (data, "--data")}
    kwargs = family_arguments(name, factory, split, given)
    passes = "it is called with split= if it takes it, and shots=, queries=, data= with --shots, --queries, --data"
    family = call_entry_point(name, factory, kwargs, passes)
    if isinstance(family, TaskFamily):
        raise ValueError(
            f"{name}() gave a TaskFamily, whose tasks train update rules (--algo lstm); the few-shot algorithms take "
            f"a family with {', '.join(_MEMBERS)} (learnedopt.meta.fewshot.FewShotFamily)"
        )
    missing = [m for m in _MEMBERS if not hasattr(family, m) or (m != "loss" and not callable(getattr(family, m)))]
    if missing:
        raise ValueError(
            f"{name}() gave a {type(family).__name__} without {', '.join(missing)}, which a few-shot family must "
            "have (learnedopt.meta.fewshot.FewShotFamily)"
        )
    loss = family.loss
    if isinstance(loss, str) and loss not in LOSSES:
        raise ValueError(f"{name}: loss {loss!r} is not one of {', '.join(map(repr, LOSSES))}; give a callable for another")
    if not isinstance(loss, str) and not callable(loss):
        raise ValueError(f"{name}: loss is a {type(loss).__name__}; give one of {', '.join(map(repr, LOSSES))} or a callable")
    return family


def family_loss(family: Any) -> tuple[str, Callable[[Tensor, Tensor], Tensor]]:
    """``(name for the model file, function)`` of a family's ``loss``."""
    loss = family.loss
    return (loss, LOSSES[loss]) if isinstance(loss, str) else (OWN_LOSS, loss)


def family_model(name: str, family: Any) -> nn.Module:
    """``family.model()``, refused in one line (ValueError) unless it is an ``nn.Module``."""
    try:
        model = family.model()
    except Exception as err:  # noqa: BLE001 - the user's code: any failure is one line
        raise ValueError(f"{name}: model() raised {type(err).__name__}: {one_line(err)}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"{name}: model() gave a {type(model).__name__}, not a torch.nn.Module")
    return model


class FamilySource:
    """A :class:`FewShotFamily` as a task source of :class:`~learnedopt.meta.fewshot.FewShotTrainer`:
    the tasks of a seed are ``family.sample`` from a generator seeded with it."""

    def __init__(self, name: str, family: Any) -> None:
        self.name, self.family = name, family

    def batch(self, size: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(x_support, y_support, x_query, y_query)`` of ``size`` tasks drawn from ``seed``."""
        return tuple(self.family.sample(size, torch.Generator().manual_seed(seed)))  # type: ignore[return-value]

    def describe(self) -> str:
        """The family's own description (:meth:`FewShotFamily.describe`), for the model card."""
        return self.family.describe()


def check_family_source(
    source: FamilySource,
    size: int,
    seed: int,
    role: str,
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    device: torch.device,
) -> None:
    """Raise ValueError (one line, naming the stage) unless ``source`` describes itself, its
    ``size`` tasks of ``seed`` have the documented shapes, hold no NaN or infinite value, and are
    drawn again the same from that seed, and ``model`` with ``loss_fn`` gives
    a finite scalar loss on the first task's support set (on ``device``)."""
    stage = "describe()"
    try:
        checked_description(source)
        stage = f"sample() of the first {role} tasks"
        batch = source.batch(size, seed)
        if len(batch) != 4 or not all(isinstance(t, Tensor) for t in batch):
            kinds = ", ".join(type(t).__name__ for t in batch)
            raise ValueError(f"it must return four tensors (x_support, y_support, x_query, y_query), got ({kinds})")
        names = ("x_support", "y_support", "x_query", "y_query")
        for tensor_name, t in zip(names, batch, strict=True):
            if t.dim() < 2 or t.shape[0] != size or t.shape[1] < 1:
                raise ValueError(f"{tensor_name} has shape {tuple(t.shape)}; it must be ({size}, N, ...): {size} tasks of N >= 1 examples")
            # checked before the second draw: NaN != NaN read as "two draws from the same seed differ"
            if (t.is_floating_point() or t.is_complex()) and not bool(t.isfinite().all()):
                bad = int((~t.isfinite()).sum())
                raise ValueError(f"{tensor_name} holds {bad} NaN or infinite value{'s' * (bad > 1)}")
        for x, y, part in ((batch[0], batch[1], "support"), (batch[2], batch[3], "query")):
            if x.shape[1] != y.shape[1]:
                raise ValueError(f"the {part} inputs have {x.shape[1]} examples per task and the targets {y.shape[1]}")
        # a resumed run draws its tasks again from their seeds: they must be the same
        again = source.batch(size, seed)
        if len(again) != 4 or not all(isinstance(t, Tensor) and a.shape == t.shape and torch.equal(a, t) for a, t in zip(batch, again)):
            raise ValueError(f"two draws from the same seed differ: {REPEATABLE_DRAWS}")
        stage = f"the loss of the model on the first {role} task's support set"
        with torch.no_grad():  # on a copy: a forward may update buffers, which the run's first step must find as built
            loss = loss_fn(copy.deepcopy(model)(batch[0][0].to(device)), batch[1][0].to(device))
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"it must be a scalar tensor (the mean over the examples), got {shape}")
        if not math.isfinite(float(loss)):
            raise ValueError(f"it is not finite ({float(loss)})")
    except Exception as err:  # noqa: BLE001 - the user's code: any failure is one line
        message = one_line(err)
        raise ValueError(f"{stage}: {message if isinstance(err, ValueError) else f'{type(err).__name__}: {message}'}") from None
