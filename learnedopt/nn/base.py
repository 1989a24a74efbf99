"""The interface every coordinatewise update rule implements."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..plugins import one_line


@dataclass(frozen=True)
class StateSpec:
    """Shape of one per-coordinate state tensor: ``(*lead, n, *trail)`` for ``n`` coordinates.

    The coordinate dimension is always ``len(lead)``, and per-parameter states are slices along it
    of a flat buffer: ``buffer[:, start:stop]`` for the library's rules' single leading dimension;
    ``StateSpec(())`` is an ``(n,)`` state, e.g. a momentum.

    ``moving_average`` marks an exponential moving average (and its bias-correction weight):
    stored in at least float32 whatever narrower dtype the caller asks for, because a bfloat16
    average ``x + (1 - decay) * (target - x)`` stops moving once its change is under half a unit
    in the last place of ``x`` (a decay of 0.999 holds a constant gradient's square at a fifth
    to a third of its value, depending on where the value falls within its power of two).

    ``finite`` says the state never holds ``±Inf``: ``LearnedOptimizer.load_state_dict`` refuses
    a saved one that does, as it refuses NaN in any state (its next step would turn the
    parameter NaN). Every state of the library's rules is finite: ``h = o * tanh(c)`` and the
    gates lie in ``[-1, 1]``, ``|c|`` grows by at most 1 a step from 0, and the moving averages
    are convex combinations of finite values, their squares saturated (``bounded_square``), each
    stored saturated into its dtype. A rule of one's own whose state may hold Inf (a running
    minimum started at ``+Inf``) declares ``finite=False``.
    """

    lead: tuple[int, ...]
    trail: tuple[int, ...] = ()
    moving_average: bool = False
    finite: bool = True

    def shape(self, n: int) -> tuple[int, ...]:
        """The state's shape for ``n`` coordinates, ``(*lead, n, *trail)``."""
        return (*self.lead, n, *self.trail)

    def dtype(self, state_dtype: torch.dtype) -> torch.dtype:
        """The dtype this state is stored in when the caller asks for ``state_dtype``."""
        return torch.promote_types(state_dtype, torch.float32) if self.moving_average else state_dtype


State = dict[str, Tensor]




class UpdateRule(nn.Module):
    """A coordinatewise learned update rule: one small network shared by every parameter element.

    Subclasses hold the meta-parameters as ``nn.Parameter``s and implement :meth:`forward` as pure
    math on a batch of coordinates. They know nothing of optimizers: the caller owns the states.

    A rule of your own sets ``kind`` (its name in weight files, its own: not a library rule's),
    ``config_class`` (a dataclass of its architecture, JSON values; ``__init__`` takes one or its
    fields as keywords), ``needs_loss`` if :meth:`forward` reads the loss, ``reads_param`` if it
    reads the parameter, and defines :meth:`state_spec` and :meth:`forward`. Coordinate ``i``'s
    step and new states must depend only on row ``i`` of the inputs (and the loss): the optimizer
    runs the rule on chunks of coordinates from many tensors, padded with zero rows.
    ``learnedopt.nn.register_rule`` lets its weight files load; ``learnedopt.optim.LearnedOptimizer``
    subclassed with ``rule_kind = kind`` runs it as an optimizer.
    """

    #: Name used in weight files.
    kind: ClassVar[str]
    #: Whether :meth:`forward` needs the optimizee's loss.
    needs_loss: ClassVar[bool] = False
    #: The architecture dataclass of this rule.
    config_class: ClassVar[type]

    @property
    def reads_param(self) -> bool:
        """Whether :meth:`forward` reads the parameter values (not only the gradients)."""
        return False

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        """Take an instance of ``config_class``, or keyword overrides of its defaults."""
        super().__init__()
        if config is None:
            config = self.config_class(**overrides)
        elif overrides:
            raise TypeError("pass either a config or keyword overrides, not both")
        self.config = config

    def config_dict(self) -> dict[str, Any]:
        """The architecture as plain JSON-serialisable values."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.config).items()}

    @classmethod
    def config_from_dict(cls, values: dict[str, Any]) -> Any:
        """The ``config_class`` instance of the architecture :meth:`config_dict` wrote (lists
        become tuples); raises ValueError for an unknown key or an invalid value."""
        fields = {f.name for f in dataclasses.fields(cls.config_class)}
        unknown = set(values) - fields
        if unknown:
            raise ValueError(f"unknown {cls.kind} config keys: {sorted(unknown)}")
        return cls.config_class(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    @classmethod
    def from_config_dict(cls, values: dict[str, Any]) -> UpdateRule:
        """A fresh rule of the architecture :meth:`config_dict` wrote (lists become tuples);
        raises ValueError for an unknown key or an invalid value."""
        return cls(cls.config_from_dict(values))

    @classmethod
    def weight_shapes(cls, values: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        """The shape of each ``state_dict`` tensor of ``from_config_dict(values)``, without
        allocating its weights (this builds the rule on the meta device; a rule whose
        construction costs time in its size overrides it with the arithmetic). Raises as
        :meth:`from_config_dict`."""
        with torch.device("meta"):
            rule = cls.from_config_dict(values)
        return {k: tuple(v.shape) for k, v in rule.state_dict().items()}

    @classmethod
    def weight_count(cls, values: dict[str, Any]) -> int | None:
        """The number of ``state_dict`` tensors of ``from_config_dict(values)``, where it grows
        with the architecture (a count of layers) and a rule can say it at once: a weight file
        stating 10**9 layers over a few tensors is refused by it before :meth:`weight_shapes`
        lists them. None (this default): known only from :meth:`weight_shapes`. Raises as
        :meth:`from_config_dict`."""
        return None

    def state_spec(self) -> dict[str, StateSpec]:
        """Name and shape of each per-coordinate state tensor."""
        raise NotImplementedError

    def init_state(self, n: int, *, dtype: torch.dtype, device: torch.device | str) -> State:
        """Fresh states for ``n`` coordinates (zeros) on ``device``, in ``dtype`` (moving averages
        in at least float32: :class:`StateSpec`); each of shape ``spec.shape(n)``."""
        return {
            name: torch.zeros(spec.shape(n), dtype=spec.dtype(dtype), device=device)
            for name, spec in self.state_spec().items()
        }

    def forward(  # type: ignore[override]
        self, grad: Tensor, param: Tensor, state: State, loss: Tensor | None = None
    ) -> tuple[Tensor, State]:
        """Compute the step for a batch of coordinates.

        Args:
            grad: ``(n,)`` gradient of each coordinate.
            param: ``(n,)`` current value of each coordinate.
            state: per-coordinate states shaped as :meth:`state_spec` says, for the same ``n``.
            loss: scalar optimizee loss, for rules with ``needs_loss``.

        Returns:
            ``(step, new_state)``: ``step`` is ``(n,)``, the change to add to the parameter; the
            new state has the same names and shapes. Inputs are not modified.
        """
        raise NotImplementedError


def check_rule_call(rule: UpdateRule, n: int = 3) -> None:
    """Raise ValueError (one line) unless ``rule`` has meta-parameters and one call of its
    :meth:`~UpdateRule.forward` on ``n`` float32 coordinates (random gradients and parameters, the
    initial states, a loss of 1 where it reads one; its own generator, not the global one) gives
    what that method documents: a floating ``(n,)`` step, finite, and the states of
    :meth:`~UpdateRule.state_spec`, each of its shape and floating.

    For a rule of one's own, before a run: an integer step (every update rounded to zero), or
    a state of another shape that broadcasting hid, trained silently; a step of another shape
    failed deep in the unroll with a traceback.

    The rule's forward may draw from torch's global generator (its own dropout): it runs in a
    fork of the CPU generator (``torch.random.fork_rng``), so that the run's draws stay as they
    were. Not thread-safe: restoring the generator rolls back what another thread draws from it
    meanwhile.
    """
    if not any(True for _ in rule.parameters()):
        raise ValueError("it has no nn.Parameter to meta-train")
    device = next(rule.parameters()).device
    generator = torch.Generator().manual_seed(0)
    grad, param = torch.randn(2, n, generator=generator).to(device)
    spec = rule.state_spec()
    if not isinstance(spec, Mapping) or not all(isinstance(v, StateSpec) for v in spec.values()):
        raise ValueError(f"state_spec() must return a dict of name -> StateSpec, got {spec!r}")
    state = rule.init_state(n, dtype=torch.float32, device=device)
    loss = torch.ones((), device=device) if rule.needs_loss else None
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # the run's draws stay as they were
            out = rule(grad, param, state, loss) if rule.needs_loss else rule(grad, param, state)
    except Exception as err:  # noqa: BLE001 - the rule's own code: any failure is one line
        raise ValueError(f"forward raised {type(err).__name__}: {one_line(err)}") from None
    if not isinstance(out, (tuple, list)) or len(out) != 2 or not isinstance(out[1], Mapping):
        raise ValueError(f"forward must return (step, new_state), a tensor and a dict; got {_kind(out)}")
    step, new_state = out
    if not isinstance(step, Tensor) or not step.is_floating_point() or step.shape != (n,):
        raise ValueError(f"forward's step must be a floating ({n},) tensor for {n} coordinates, got {_kind(step)}")
    if not bool(step.isfinite().all()):
        raise ValueError(f"forward's step on {n} random gradients holds NaN or Inf: {step.tolist()}")
    if set(new_state) != set(spec):
        raise ValueError(f"forward's new state has the names {sorted(new_state)}, state_spec() {sorted(spec)}")
    for name, value in new_state.items():
        expected = spec[name].shape(n)
        if not isinstance(value, Tensor) or not value.is_floating_point() or value.shape != expected:
            raise ValueError(f"forward's new state {name!r} must be a floating {expected} tensor for {n} coordinates "
                             f"(state_spec), got {_kind(value)}")  # fmt: skip


def _kind(value: Any) -> str:
    """``value`` as an error names it: a tensor by its shape and dtype, anything else by its type."""
    if isinstance(value, Tensor):
        return f"a {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')} tensor"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}: ({', '.join(type(v).__name__ for v in value)})"
    return f"a {type(value).__name__}"
