"""Optimizers under evaluation (tuned baselines, learned presets and weight files), single runs,
lr tuning and the statistics over seeds of a set of runs."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from ..finite import all_finite
from ..meta.tasks import derive_seed
from ..nn import RULES, UpdateRule, register_rule
from ..nn.base import check_rule_call
from ..optim import LearnedOptimizer, LSTMOptimizer, MetaLSTMOptimizer, NonFiniteGradientError
from ..plugins import load_entry_point, one_line
from ..values import is_number, seeded_global_rng
from ..weights import PRESETS, UntrainedWeightsWarning, class_path, fingerprint, read_header, recorded_rule_class
from .problems import Problem

#: steps averaged for a run's final loss
FINAL_WINDOW = 10
#: default lr grid of the baselines: half-decades from 1e-4 to 10
DEFAULT_LRS: tuple[float, ...] = tuple(10.0 ** (e / 2) for e in range(-8, 3))

OptimizerFactory = Callable[[Iterable[nn.Parameter], float], torch.optim.Optimizer]

#: second key of the seed of a run's draws from the global RNGs (torch's, numpy's, Python's), ``derive_seed(seed, 3)``: the
#: problems' own streams are ``(seed, 0..2, ...)`` (:mod:`.problems`)
_DRAWS_STREAM = 3

class LRSchedule(NamedTuple):
    """An lr schedule of a run: ``factor(t, steps)``, the factor on the run's lr at step ``t``
    (0-based) of ``steps``, and ``formula``, that factor at step ``t`` of ``T`` as reports state it."""

    factor: Callable[[int, int], float]
    formula: str


#: the lr schedules by name; ``cosine`` decays to 0 over the run (Loshchilov & Hutter 2017,
#: without restarts)
LR_SCHEDULES: dict[str, LRSchedule] = {
    "constant": LRSchedule(lambda t, steps: 1.0, "1"),
    "cosine": LRSchedule(lambda t, steps: 0.5 * (1.0 + math.cos(math.pi * t / steps)), "(1 + cos(pi t / T)) / 2"),
}


def check_lr_schedule(schedule: str) -> None:
    """Raise ``ValueError`` naming the choices when ``schedule`` is not in :data:`LR_SCHEDULES`."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; choose from {', '.join(LR_SCHEDULES)}")

BASELINES: dict[str, OptimizerFactory] = {
    "SGD": lambda params, lr: torch.optim.SGD(params, lr=lr),
    "Nesterov": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True),
    "RMSprop": lambda params, lr: torch.optim.RMSprop(params, lr=lr),
    "Adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
}


@dataclass(frozen=True)
class LearnedSpec:
    """A learned optimizer to evaluate: its label, class and ``weights=`` (preset name or file).

    Attributes:
        rule: for a rule of your own, its class as ``module:Class``, imported and registered
            wherever the spec builds its optimizer (a worker process too); None for the library's.
        optimizer: None with ``rule``: a ``LearnedOptimizer`` subclass made for the rule's kind
            (:func:`own_rule_optimizer`), for a rule whose module defines none.
    """

    label: str
    optimizer: type[LearnedOptimizer] | None
    weights: str
    rule: str | None = None

    def optimizer_class(self) -> type[LearnedOptimizer]:
        """The optimizer class, the rule of your own imported and registered first."""
        if self.rule is not None:
            rule_class = register_rule(load_entry_point(self.rule))
            if self.optimizer is None:
                return own_rule_optimizer(rule_class)
        if self.optimizer is None:
            raise ValueError(f"{self.label}: a LearnedSpec without an optimizer class needs its rule (module:Class)")
        return self.optimizer

    def factory(self) -> OptimizerFactory:
        """``build(params, lr)``: this optimizer with these weights and learning rate ``lr``
        (:data:`OptimizerFactory`), the rule's class imported first (:meth:`optimizer_class`);
        its untrained-weights warning is silenced (reports state it once, in their header)."""
        optimizer = self.optimizer_class()

        def build(params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
            with warnings.catch_warnings():
                warnings.simplefilter(
                    "ignore", UntrainedWeightsWarning
                )  # reported once, in the header
                return optimizer(params, weights=self.weights, lr=lr)

        return build

    def header(self) -> dict[str, Any]:
        """The weights' header (kind, preset, trained, ...)."""
        return dict(self._probe().weights_header)

    def record(self) -> dict[str, Any]:
        """What a report records of these weights: ``weights``, ``header`` (with the kind and
        architecture) and ``sha256`` (of the weight tensors, :func:`learnedopt.weights.fingerprint`)."""
        probe = self._probe()
        own = {} if self.rule is None else {"rule": self.rule}
        return {"weights": self.weights, "header": dict(probe.weights_header), "sha256": fingerprint(probe.rule)["sha256"], **own}

    def check_rule(self) -> None:
        """For a rule of your own, its ``forward`` tried once before any run
        (:func:`~learnedopt.nn.base.check_rule_call`), as ``meta-train --rule`` does: a step of
        another shape failed mid-evaluation with a traceback, an integer one was evaluated as a
        rule that never moves. ValueError naming the file and the rule."""
        if self.rule is None:
            return
        try:
            check_rule_call(self._probe().rule)
        except ValueError as err:
            # the weights' own errors (an architecture the class does not have) name the file too
            reason = one_line(err).removeprefix(f"{self.weights}: ")
            raise ValueError(f"{self.weights}: its rule {self.rule}: {reason}") from None

    def _probe(self) -> LearnedOptimizer:
        optimizer = self.optimizer_class()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UntrainedWeightsWarning)
            return optimizer([nn.Parameter(torch.zeros(1))], weights=self.weights)


_OWN_RULE_OPTIMIZERS: dict[type[UpdateRule], type[LearnedOptimizer]] = {}


def own_rule_optimizer(rule_class: type[UpdateRule]) -> type[LearnedOptimizer]:
    """A ``LearnedOptimizer`` subclass that runs ``rule_class``'s kind, named
    ``LearnedOptimizer[RuleClass]`` (made once per class and process): what the README's own
    optimizer class does, for a rule whose module defines none."""
    if rule_class not in _OWN_RULE_OPTIMIZERS:
        name = f"LearnedOptimizer[{rule_class.__name__}]"
        _OWN_RULE_OPTIMIZERS[rule_class] = type(name, (LearnedOptimizer,), {"rule_kind": rule_class.kind, "__module__": __name__})
    return _OWN_RULE_OPTIMIZERS[rule_class]


def import_rules(names: Sequence[str]) -> list[type[UpdateRule]]:
    """Import and register (:func:`learnedopt.nn.register_rule`) each of your own rule classes
    named ``module:Class``, so that weight files of their kinds load.

    Raises:
        ValueError: one that fails to import, or is not an ``UpdateRule`` with a kind of its own
            (the message names it).
    """
    classes = []
    for name in names:
        try:
            classes.append(register_rule(load_entry_point(name)))
        except (TypeError, ValueError) as err:
            raise ValueError(f"rule {name}: {one_line(err)}") from None
    return classes


def _own_optimizer_of(rule_class: type[UpdateRule]) -> type[LearnedOptimizer] | None:
    """The ``LearnedOptimizer`` subclass that the rule's module defines for its kind, if one."""
    module = sys.modules.get(rule_class.__module__)
    found = sorted(
        {v for v in vars(module).values() if isinstance(v, type) and issubclass(v, LearnedOptimizer)
         and getattr(v, "rule_kind", None) == rule_class.kind} if module is not None else set(),
        key=lambda cls: cls.__name__,
    )  # fmt: skip
    if len(found) > 1:
        raise ValueError(
            f"module {rule_class.__module__} defines {len(found)} optimizers of rule kind {rule_class.kind!r} "
            f"({', '.join(cls.__name__ for cls in found)}): keep one"
        )
    return found[0] if found else None


DEFAULT_LEARNED: tuple[LearnedSpec, ...] = (
    LearnedSpec("LSTMOptimizer (l2l-blend, default)", LSTMOptimizer, "l2l-blend"),
    LearnedSpec("LSTMOptimizer (l2l-random)", LSTMOptimizer, "l2l-random"),
    LearnedSpec("LSTMOptimizer (l2l-mnist)", LSTMOptimizer, "l2l-mnist"),
    LearnedSpec("LSTMOptimizer (l2l-mix)", LSTMOptimizer, "l2l-mix"),
    LearnedSpec("LSTMOptimizer (l2l-short)", LSTMOptimizer, "l2l-short"),
    LearnedSpec("MetaLSTMOptimizer (meta-lstm-mnist)", MetaLSTMOptimizer, "meta-lstm-mnist"),
    LearnedSpec("MetaLSTMOptimizer (meta-lstm-adam-mnist, default)", MetaLSTMOptimizer, "meta-lstm-adam-mnist"),
    LearnedSpec("LSTMOptimizer (l2l-2016, untrained)", LSTMOptimizer, "l2l-2016"),
    LearnedSpec("MetaLSTMOptimizer (meta-lstm-2017, untrained)", MetaLSTMOptimizer, "meta-lstm-2017"),
    LearnedSpec("MetaLSTMOptimizer (meta-lstm-adam, untrained)", MetaLSTMOptimizer, "meta-lstm-adam"),
)


def learned_from_file(path: str | os.PathLike[str], label_path: bool = False, rules_option: str | None = "--rules") -> LearnedSpec:
    """A :class:`LearnedSpec` for a weight file, choosing the optimizer class from its header's kind.
    Its label names the file by its name, or by ``path`` as given when ``label_path`` or when the
    name is a preset's (whose label it would take). ``rules_option``: the caller's option that
    imports rules of one's own, which the error for an unimported kind names (None: the caller
    has none).

    A kind of your own must be registered (:func:`import_rules`); it runs in the
    ``LearnedOptimizer`` subclass for it that its rule's module defines, else in
    :func:`own_rule_optimizer`'s, and the spec names the rule's class so that worker processes
    import it too.

    Raises:
        ValueError: not a weight file; a kind no class is registered for (the message names the
            class the file records, if it does); a rule class that cannot be imported by name;
            a module that defines several optimizers of the kind.
    """
    weights = str(path)
    if weights in PRESETS:  # as weights=, a bare preset name builds the preset, not this file
        weights = os.path.join(os.curdir, weights)
    header = read_header(weights, registered=False)  # the file's, as read_header takes a preset's name too
    kind = header["kind"]
    shown = weights if label_path or Path(weights).name in PRESETS else Path(weights).name
    for cls in (LSTMOptimizer, MetaLSTMOptimizer):
        if cls.rule_kind == kind:
            return LearnedSpec(f"{cls.__name__} ({shown})", cls, weights)
    rule_class = RULES.get(kind)
    if rule_class is None:
        if rules_option is None:
            raise ValueError(f"{path}: its update rule kind {kind!r} is your own; this command runs the library's rules only")
        recorded = recorded_rule_class(header)
        give = f"{rules_option} {recorded} (as the file records it)" if recorded else f"{rules_option} module:Class naming its UpdateRule class"
        raise ValueError(f"{path}: its update rule kind {kind!r} is your own and not imported: give {give}")
    entry = class_path(rule_class)
    if entry is None:
        raise ValueError(
            f"{path}: its rule class {rule_class.__module__}.{rule_class.__qualname__} cannot be imported by name "
            "(define it at the top level of a module other than __main__)"
        )
    optimizer = _own_optimizer_of(rule_class)
    return LearnedSpec(f"{(optimizer or own_rule_optimizer(rule_class)).__name__} ({shown})", optimizer, weights, rule=entry)


def learned_from_files(paths: Sequence[str | os.PathLike[str]]) -> list[LearnedSpec]:
    """:func:`learned_from_file` of each path, labelled by file name where the names differ and by
    the paths as given where two share a name (a report keys results by label).

    Raises:
        ValueError: a file given twice (also as two spellings of one path).
    """
    given = [str(p) for p in paths]
    real = [os.path.realpath(p) for p in given]
    repeated = sorted({p for p, r in zip(given, real, strict=True) if real.count(r) > 1})
    if repeated:
        raise ValueError(f"weight file given more than once: {', '.join(repeated)}")
    names = [Path(p).name for p in given]
    return [learned_from_file(p, label_path=names.count(Path(p).name) > 1) for p in given]


def run_optimizer(
    problem: Problem,
    seed: int,
    factory: OptimizerFactory,
    lr: float,
    steps: int | None = None,
    schedule: str = "constant",
    loss_scale: float = 1.0,
) -> np.ndarray:
    """Train ``problem.model(seed)`` with ``factory(params, lr)``, ``params`` its parameters that
    require grad (frozen ones, an integer count kept as a parameter too, are not the optimizer's).

    ``schedule`` (:data:`LR_SCHEDULES`) sets every param group's lr to ``lr`` times its factor
    before each step (for a learned optimizer, whose ``lr`` multiplies its learned step, too).
    ``loss_scale`` (positive, finite) multiplies the loss the optimizer sees: its gradient and,
    for a rule that reads it, its value; the curve records the loss itself.

    Draws from torch's, numpy's or Python's global RNG during the run (a rule's or a problem's
    dropout) come from it seeded from ``seed`` alone (torch's on the CPU, and on the CUDA device
    of the model's parameters if one), whatever ran before in the process (another run, a
    worker's other problems, the runs a ``--resume`` skips); the caller's global RNGs are left as
    they were.

    Returns:
        ``(steps,)`` float64 training losses, entry ``t`` measured on minibatch ``t`` before step
        ``t``'s update. A NaN/Inf loss or gradient at step ``t`` stops the run, no update taken:
        entries ``t`` onwards are NaN (also entry ``t`` when only the gradient was non-finite), for
        learned optimizers and baselines alike.
    """
    check_lr_schedule(schedule)
    if not (is_number(loss_scale) and math.isfinite(loss_scale) and loss_scale > 0):
        raise ValueError(f"loss_scale must be a positive finite number, got {loss_scale!r}")
    steps = problem.steps if steps is None else steps
    draws = derive_seed(seed, _DRAWS_STREAM)
    with seeded_global_rng(draws, "cpu"):
        model = problem.model(seed)
        cuda = next((p.device for p in model.parameters() if p.device.type == "cuda"), None)
        with seeded_global_rng(draws, cuda) if cuda is not None else contextlib.nullcontext():
            return _train(problem, seed, model, factory, lr, steps, schedule, loss_scale)


def _train(
    problem: Problem,
    seed: int,
    model: nn.Module,
    factory: OptimizerFactory,
    lr: float,
    steps: int,
    schedule: str,
    loss_scale: float,
) -> np.ndarray:
    """:func:`run_optimizer`'s run of ``model``, built and its global RNG seeded."""
    optimizer = factory([p for p in model.parameters() if p.requires_grad], lr)
    learned = isinstance(optimizer, LearnedOptimizer)
    factor = None if schedule == "constant" else LR_SCHEDULES[schedule].factor
    losses = np.full(steps, np.nan)
    for t in range(steps):
        if factor is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr * factor(t, steps)
        optimizer.zero_grad(set_to_none=True)
        loss = problem.loss(model, seed, t)
        value = loss.item()
        losses[t] = value
        if not math.isfinite(value):
            break
        if loss_scale != 1.0:
            loss = loss * loss_scale
        loss.backward()
        try:
            if learned:
                optimizer.step(loss=loss.detach())  # raises on a non-finite gradient, changing nothing
            else:
                _require_finite_gradients(optimizer)
                optimizer.step()
        except NonFiniteGradientError:
            losses[t] = np.nan  # flag the run
            break
    return losses


def _require_finite_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Raise :class:`NonFiniteGradientError` as a learned optimizer's step does, so that a
    baseline's run stops at the same step (its step would apply the NaN; after the last step,
    unseen by any loss)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not all(all_finite(grads)):  # a sparse gradient judged by its (coalesced) values
        raise NonFiniteGradientError("a gradient holds NaN or Inf")


def final_loss(curve: np.ndarray, window: int = FINAL_WINDOW) -> float:
    """Mean of the last ``window`` entries of a ``(steps,)`` curve, of all of them for a curve of
    fewer steps (NaN if any is NaN)."""
    return float(np.mean(curve[-window:]))


def tuning_score(curves: Sequence[np.ndarray]) -> float:
    """Tuning criterion: mean final loss over seeds, a non-finite run counting as +inf."""
    if any(not np.isfinite(c).all() for c in curves):
        return math.inf
    return float(np.mean([final_loss(c) for c in curves]))


def select_lr(scores: Mapping[float, float]) -> float:
    """The lr with the lowest score (NaN counts as +inf; ties go to the smaller lr, so where every
    lr diverged, +inf each, the smallest)."""
    if not scores:
        raise ValueError("select_lr needs at least one lr")
    return min(sorted(scores), key=lambda lr: math.inf if math.isnan(scores[lr]) else scores[lr])


def tune_lr(
    problem: Problem,
    factory: OptimizerFactory,
    lrs: Sequence[float],
    seeds: Sequence[int],
    schedule: str = "constant",
    run: Callable[[float, int], np.ndarray] | None = None,
) -> tuple[float, dict[float, float]]:
    """Run every lr of ``lrs`` on ``seeds`` (under ``schedule``); return the best lr and
    ``{lr: score}`` (:func:`tuning_score`). ``run(lr, seed)``, if given, gives each run's curve
    instead of :func:`run_optimizer` (the harness's recorded runs)."""
    if run is None:
        def run(lr: float, seed: int) -> np.ndarray:
            return run_optimizer(problem, seed, factory, lr, schedule=schedule)

    scores = {lr: tuning_score([run(lr, s) for s in seeds]) for lr in lrs}
    return select_lr(scores), scores


def _plot_precision(curve: np.ndarray) -> list[float]:
    """A per-step curve rounded to 4 significant digits: enough for a plot, and a quarter of
    the digits in the JSON report (the statistics are computed at full precision)."""
    return [float(f"{x:.4g}") for x in curve.tolist()]


def summarize(curves: np.ndarray) -> dict[str, Any]:
    """Statistics over seeds of ``(seeds, steps)`` loss curves (see the module docstring).

    Returns:
        ``final_mean``, ``final_std`` (sample std, 0 for one run), ``final_median``, ``final_q1``,
        ``final_q3``, ``mean_loss`` (mean over seeds of each run's mean loss), ``finals`` (per seed),
        ``nonfinite`` (runs with a NaN/Inf), ``runs``, and per-step ``curve_median``, ``curve_q1``,
        ``curve_q3`` over the finite runs, to 4 significant digits (None when there is none). Statistics are NaN when no run
        stayed finite.
    """
    curves = np.asarray(curves, dtype=np.float64)
    finite = np.isfinite(curves).all(axis=1)
    good = curves[finite]
    finals = np.array([final_loss(c) for c in curves])
    nan = float("nan")
    stats: dict[str, Any] = {
        "runs": len(curves),
        "nonfinite": int((~finite).sum()),
        "finals": finals.tolist(),
    }
    if len(good):
        good_finals = finals[finite]
        q1, med, q3 = np.percentile(good_finals, [25, 50, 75])
        cq1, cmed, cq3 = np.percentile(good, [25, 50, 75], axis=0)
        stats.update(
            final_mean=float(good_finals.mean()),
            final_std=float(good_finals.std(ddof=1)) if len(good) > 1 else 0.0,
            final_median=float(med),
            final_q1=float(q1),
            final_q3=float(q3),
            mean_loss=float(good.mean(axis=1).mean()),
            curve_median=_plot_precision(cmed),
            curve_q1=_plot_precision(cq1),
            curve_q3=_plot_precision(cq3),
        )
    else:
        stats.update(
            final_mean=nan,
            final_std=nan,
            final_median=nan,
            final_q1=nan,
            final_q3=nan,
            mean_loss=nan,
            curve_median=None,
            curve_q1=None,
            curve_q3=None,
        )
    return stats
