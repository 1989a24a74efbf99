"""Flat state buffers: the per-parameter states of many tensors as slices of one buffer.

The batched update (:func:`learnedopt.optim.update.flat_update_`) wants the states of all
coordinates of a parameter group contiguous, so that one matrix product covers many tensors
without gathering. ``optimizer.state[p][name]`` stays the per-parameter tensor that
``state_dict()`` saves: it is a view into the buffer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, MutableMapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..nn import State, StateSpec, UpdateRule
from .sharding import is_sharded, local, local_all


class FlatState:
    """Flat buffers holding the states of ``members`` in order.

    Existing per-parameter states are copied in; parameters without state get the rule's initial
    state. Afterwards ``state[p][name]`` is the slice ``offset:offset + numel`` of
    ``buffers[name]`` along its coordinate dimension, ``dims[name]`` (``len(spec.lead)``:
    ``buffers[name][:, offset:offset + numel]`` for the library's rules' one leading dimension).
    ``specs`` is the rule's ``state_spec()`` the buffers were made for.
    """

    def __init__(
        self,
        rule: UpdateRule,
        members: Sequence[Tensor],
        state: MutableMapping[Tensor, dict[str, Any]],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.members = list(members)
        self.dtype = dtype
        self.offsets: list[int] = []
        total = 0
        for p in self.members:
            self.offsets.append(total)
            total += local(p).numel()
        self.specs = spec = rule.state_spec()
        self.buffers: State = {name: torch.empty(s.shape(total), dtype=s.dtype(dtype), device=device) for name, s in spec.items()}
        self.dims = {name: len(s.lead) for name, s in spec.items()}
        self.index = {id(p): i for i, p in enumerate(self.members)}
        # what is_current's fast path compares: each member's state dict, the view objects put in
        # it, and where those views point and their shape, as made here
        self._made: list[tuple[dict[str, Any], int, list[tuple[str, Tensor, int, torch.Size]]]] = []
        for p, offset in zip(self.members, self.offsets, strict=True):
            previous = state[p]
            n = local(p).numel()
            initial = None if all(k in previous for k in self.buffers) else rule.init_state(n, dtype=dtype, device=device)
            if initial is None:
                check_states(rule, previous, p, specs=spec)
            made = []
            for name, buf in self.buffers.items():
                view = buf.narrow(self.dims[name], offset, n)
                view.copy_(previous[name] if initial is None else initial[name])
                previous[name] = view
                made.append((name, view, view.data_ptr(), view.shape))
            self._made.append((previous, n, made))

    def backs(self, p: Tensor, entry: dict[str, Any]) -> bool:
        """Whether ``entry`` (``state[p]``) is the state dict these buffers were made for, its
        states still the views made into them, pointing where they did with their shape: states
        the buffers made or copied in, not put there since (:meth:`is_current`'s fast path)."""
        i = self.index.get(id(p))
        if i is None or self.members[i] is not p:
            return False
        entry_made, _, views = self._made[i]
        return entry is entry_made and still_in_place(entry, views)

    def is_current(
        self,
        members: Sequence[Tensor],
        state: MutableMapping[Tensor, dict[str, Any]],
        dtype: torch.dtype,
        specs: dict[str, StateSpec] | None = None,
    ) -> bool:
        """Whether these buffers still back exactly ``members``' states (nothing replaced them),
        made for the group's state dtype ``dtype`` and, where given, the rule's ``state_spec()``
        ``specs``: a spec changed since (a name, a shape, or only a dtype, its ``moving_average``)
        needs buffers made for it, as a changed ``dtype`` does."""
        if dtype != self.dtype or len(members) != len(self.members) or (specs is not None and specs != self.specs):
            return False
        for p, q, shard, offset, (entry_made, n, views) in zip(
            members, self.members, local_all(members), self.offsets, self._made, strict=True
        ):
            if p is not q:
                return False
            entry = state.get(p)
            if entry is None:
                return False
            # the views made in __init__, still in place, pointing where they did with their shape
            # (set_ or .data = would move them) and the parameter as large: nothing else to check
            if entry is entry_made and shard.numel() == n:
                # still_in_place(entry, views), inlined: this loop runs for every parameter at every step
                for name, view, ptr, shape in views:
                    if entry.get(name) is not view or view.data_ptr() != ptr or view.shape != shape:
                        break
                else:
                    continue
            for name, buf in self.buffers.items():
                view = entry.get(name)
                dim = self.dims[name]
                if not (
                    isinstance(view, Tensor)
                    and view.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
                    and view.storage_offset() == offset * buf.stride(dim)
                    # not the slice's shape: a slice past the buffer's end is cut short, so a last
                    # member grown since (p.data = bigger) would pass with its old states
                    and view.shape == (*buf.shape[:dim], shard.numel(), *buf.shape[dim + 1 :])
                ):
                    return False
        return True


def still_in_place(entry: dict[str, Any], made: Iterable[tuple[str, Tensor | None, int, torch.Size]]) -> bool:
    """Whether each ``(name, tensor, data_ptr, shape)`` of ``made`` (the states a path made or
    checked for a parameter; a tensor None: freed since) is still ``entry[name]``, pointing where it
    did with that shape: none put in ``entry`` since, nor moved (``.data =``, ``set_``). Values
    written in place into them are not seen."""
    return all(
        view is not None and entry.get(name) is view and view.data_ptr() == ptr and view.shape == shape
        for name, view, ptr, shape in made
    )


def flatten_parameter_shaped(
    rule: UpdateRule, state: dict[str, Any], param: Tensor, *, specs: dict[str, StateSpec] | None = None
) -> None:
    """Give the states in ``state`` that have the form ``state_dict()`` writes, ``(*lead,
    *param.shape, *trail)``, the flat form ``(*lead, param.numel(), *trail)`` the step keeps, in
    place (a view where it can be). Such states reach ``optimizer.state[param]`` without
    ``load_state_dict`` where a wrapper loads them itself (``ZeroRedundancyOptimizer``).
    ``specs``: the rule's ``state_spec()``, where the caller has it already."""
    shape = local(param).shape
    for name, spec in (rule.state_spec() if specs is None else specs).items():
        value = state.get(name)
        if (
            isinstance(value, Tensor)
            and not is_sharded(value)
            and tuple(value.shape) == (*spec.lead, *shape, *spec.trail)
            and tuple(value.shape) != spec.shape(shape.numel())
        ):
            state[name] = value.reshape(spec.shape(shape.numel()))


def check_states(
    rule: UpdateRule,
    state: dict[str, Any],
    param: Tensor,
    *,
    specs: dict[str, StateSpec] | None = None,
    name: Callable[[], str] | None = None,
) -> None:
    """Raise ValueError naming the state and the parameter (``name()``: its name with shape, as
    the step's errors name it; else "a parameter") where ``state`` holds some of the rule's states
    but not all (a step would fail, or replace those it holds by fresh ones), or a rule state in it
    is not a tensor, is not floating-point (a step would cast it in silence, a complex one dropping its
    imaginary part), is on the ``meta`` device while ``param`` is not (it holds no values), or
    does not fit ``param``'s (local part's) ``numel`` coordinates: put there with another shape,
    or ``param`` was resized (``p.data = ...``) since its state was made (copying it would
    broadcast or fail). ``specs``: the rule's ``state_spec()``, where the caller has it already."""
    local_param = local(param)
    numel = local_param.numel()
    specs = rule.state_spec() if specs is None else specs

    def of() -> str:  # the parameter's name: built only for an error (name() searches its group's list)
        return "a parameter" if name is None else name()

    def what(state_name: str) -> str:
        return f"the state {state_name!r} of {of()}"

    missing = [state_name for state_name in specs if state_name not in state]
    if missing and len(missing) < len(specs):
        raise ValueError(
            f"the state of {of()} lacks {missing} of this {rule.kind} rule's "
            f"states {sorted(specs)}: give it all of them, or a fresh state (del optimizer.state[param])"
        )
    for state_name, spec in specs.items():
        value = state.get(state_name)
        if value is None:
            continue
        if not isinstance(value, Tensor):
            raise ValueError(
                f"{what(state_name)} is a {type(value).__name__}, not a tensor; put the rule's states in optimizer.state as "
                "tensors, or give it a fresh state (del optimizer.state[param])"
            )
        if not value.is_floating_point():
            raise ValueError(
                f"{what(state_name)} is a {str(value.dtype).removeprefix('torch.')} tensor: rule states are floating-point (a step "
                "would cast it in silence); give it a floating-point one or a fresh state (del optimizer.state[param])"
            )
        if value.is_meta and not local_param.is_meta:
            raise ValueError(
                f"{what(state_name)} is on the meta device, which holds no values (the parameter is on {local_param.device}); "
                "give it one with values or a fresh state (del optimizer.state[param])"
            )
        if tuple(value.shape) != spec.shape(numel):
            raise ValueError(
                f"{what(state_name)} has shape {tuple(value.shape)}, but its {numel} element(s) need {spec.shape(numel)}: it "
                "was put there with another shape, or the parameter changed size since its state was created; give it "
                "a fresh state (del optimizer.state[param]) or a new optimizer"
            )
