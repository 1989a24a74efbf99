"""``LearnedOptimizer``: the ``torch.optim.Optimizer`` that runs a coordinatewise update rule.

It owns what ``torch.optim`` optimizers own (param groups, per-parameter state, ``state_dict``)
and dispatches each step to the batched PyTorch path, the per-tensor reference, or a fused
Triton kernel (``backend``). The rule itself (:mod:`learnedopt.nn`) is pure math.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import numbers
import os
import warnings
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import finite, kernels
from ..errors import NonFiniteGradientError
from ..nn import CoordinateLSTM, MetaLSTMCell, UpdateRule
from ..autocast import without_autocast
from ..nn.precision import math_dtype
from ..values import check_positive_integer, is_integer, is_number, real_as_float
from ..weights import describe_fingerprint, fingerprint, resolve_weights
from . import sharding
from .flat_state import FlatState, check_states, flatten_parameter_shaped, still_in_place
from .update import DEFAULT_CHUNK, DEFAULT_GROUP_BATCH, Segment, flat_update_, fused_update_, grouped_flat_update_, single_tensor_update_

STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
#: the parameter dtypes a step can update (float8 ones: torch has no isfinite or promotion for them)
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_PARAM_DTYPE_NAMES = "float32, float64, bfloat16 or float16"
NAN_POLICIES = ("raise", "skip")
BACKENDS = ("auto", "torch", "triton")


@contextlib.contextmanager
def _outside_inference_mode() -> Iterator[None]:
    """Leave ``torch.inference_mode`` (keeping grad mode off, as it is there) for code that
    creates or updates the optimizer's states: a state made in inference mode is an inference
    tensor, whose in-place update after it (a step outside the block) raised part-way through
    that step, once earlier tensors had been updated. Parameters updated in place stay as they are."""
    if not torch.is_inference_mode_enabled():
        yield
        return
    with torch.inference_mode(False), torch.no_grad():  # inference_mode(False) alone turns grad mode on
        yield


class LearnedOptimizer(Optimizer):
    """Base class of the learned optimizers; subclasses choose the update rule kind.

    Per-group options (all may differ between param groups):
        lr: multiplier of the learned step, ``param += lr * step``. The default 1.0 takes the
            step the weights were meta-trained to take; 0 leaves parameters unchanged while the
            rule's states still advance (so warm-up schedules that start at 0 work). LR schedulers
            from ``torch.optim.lr_scheduler`` scale it like any learning rate.
        maximize: ascend instead of descend.
        weight_decay: decoupled weight decay (as AdamW's): after the learned step every stepped
            parameter is multiplied by ``1 - lr * weight_decay``; 0 (the default) for none. The
            shipped rules were meta-trained without it. AdamW multiplies before its step instead;
            the two differ by ``lr * weight_decay`` times the step.
        state_dtype: dtype of the per-coordinate LSTM states (float32 default; bfloat16 halves
            their memory; the moving averages ``m`` and ``v`` stay in at least float32), independent of the
            parameter dtype.
        nan_policy: on a NaN/Inf gradient, ``"raise"`` raises :class:`NonFiniteGradientError`
            naming the parameter before anything is changed; ``"skip"`` leaves that tensor and its
            state unchanged this step.
        backend: ``"torch"``, ``"triton"`` (the fused kernels of
            :mod:`learnedopt.kernels.coordinate_lstm_step`, for CoordinateLSTM rules with any
            feature set, and
            :mod:`learnedopt.kernels.meta_lstm_step`, for MetaLSTMCell:
            float32/bfloat16 states, non-float64 parameters, on CUDA or under
            ``TRITON_INTERPRET=1``; a kernel that fails raises ``RuntimeError``: at once if
            nothing of the step was updated, else once the PyTorch path has finished the step;
            running out of memory raises that error as it is, as on the PyTorch path)
            or ``"auto"`` (the fused kernel on CUDA where it applies and
            works, once ``learnedopt.kernels.GPU_VALIDATED`` says its CUDA tests passed on real
            hardware; else torch. It never fails where the torch path works).
        foreach: None or True for the batched path over all coordinates of a group, False for the
            per-tensor reference (which ``backend="auto"`` then keeps to; an explicit
            ``backend="triton"`` runs the kernel).
    """

    #: The ``UpdateRule.kind`` this optimizer runs; a subclass for a rule of your own sets it.
    rule_kind: ClassVar[str]
    #: The preset used when no ``weights`` are given; None: ``weights`` must be given.
    default_preset: ClassVar[str | None] = None

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]],
        weights: str | os.PathLike | UpdateRule | None = None,
        *,
        lr: float = 1.0,
        maximize: bool = False,
        weight_decay: float = 0.0,
        state_dtype: torch.dtype = torch.float32,
        nan_policy: str = "raise",
        backend: str = "auto",
        foreach: bool | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "maximize": maximize,
            "weight_decay": weight_decay,
            "state_dtype": state_dtype,
            "nan_policy": nan_policy,
            "backend": backend,
            "foreach": foreach,
        }
        _validate_options(defaults)
        if not isinstance(getattr(type(self), "rule_kind", None), str):
            raise TypeError(
                f"{type(self).__name__} sets no rule_kind: use LSTMOptimizer or MetaLSTMOptimizer, or for a rule of your "
                "own a subclass of LearnedOptimizer with rule_kind = YourRule.kind"
            )
        if isinstance(weights, (numbers.Real, Tensor)):  # Adam(params, 1e-3) ported: its lr lands in weights
            raise TypeError(
                f"{type(self).__name__}'s second argument is weights (a preset name, a weight file or an UpdateRule), "
                f"got {weights!r}; give a learning rate by keyword: {type(self).__name__}(params, lr=...)"
            )
        self.rule, self.weights_header = resolve_weights(
            weights, kind=self.rule_kind, default_preset=self.default_preset, owner=type(self).__name__
        )
        if not isinstance(weights, UpdateRule):  # a module the caller passed stays as it was
            self.rule.requires_grad_(False)
        self._rule_copies: dict[tuple[torch.device, torch.dtype], tuple[tuple[int, ...], UpdateRule]] = {}
        self._flat_states: dict[tuple[int, torch.device, torch.dtype], FlatState] = {}
        self._packed_weights: dict[torch.device, tuple[tuple[int, ...], object]] = {}
        self._fused_failed = False
        self._partial_step: str | None = None  # why the last step stopped part-way, if it did
        self.chunk = DEFAULT_CHUNK
        #: param groups' partitions of at most this many coordinates stepped share their rule calls (0: none)
        self.group_batch_limit = DEFAULT_GROUP_BATCH
        self._weights_argument = weights  # a group may name these again (see add_param_group)
        self._rule_jsons: set[str] = set()  # the fingerprints this optimizer wrote into its groups
        # id(parameter) -> (the parameter, its shape when its state was made): not a weak reference to
        # it, which torch.utils.swap_tensors refuses, so that model.to() failed under torch's
        # set_swap_module_params_on_conversion(True); entries of parameters no group lists any more
        # are dropped at the next step
        self._state_shapes: dict[int, tuple[Tensor, tuple[int, ...]]] = {}
        # id(parameter) -> the rule states the per-tensor path last held for it, as (name, weak
        # reference, data_ptr, shape): states not put in self.state since (see _holds_own_states)
        self._own_states: dict[int, list[tuple[str, weakref.ref[Tensor], int, torch.Size]]] = {}
        super().__init__(params, defaults)

    # ---------------------------------------------------------------- torch.optim protocol
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group, as ``torch.optim.Optimizer.add_param_group`` does (missing options
        from the defaults), checked as the constructor's groups are; the group records this
        optimizer's rule (``"learned_rule"``).

        A ``"weights"`` entry (as wrappers such as ``ZeroRedundancyOptimizer`` pass the
        constructor's keyword arguments) is accepted when it names the constructor's weights and
        dropped; one optimizer runs one update rule.

        Raises:
            ValueError: ``"weights"`` names other weights, or the group's options or parameters
                are refused (e.g. ``backend="triton"`` for a rule without fused kernels, a
                parameter listed twice, a complex or non-float parameter); a refused group is
                not kept.
        """
        if "weights" in param_group:
            # wrappers that build the optimizer from per-group options give a group the
            # constructor's weights again (ZeroRedundancyOptimizer adds every keyword argument)
            if not self._same_weights(param_group["weights"], self._weights_argument):
                raise ValueError(
                    f"weights cannot differ between param groups: one {type(self).__name__} runs one update "
                    "rule; build a second optimizer for the parameters that need other weights"
                )
            param_group = {key: value for key, value in param_group.items() if key != "weights"}
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()  # a rejected group is not kept, as when torch.optim rejects one
            raise
        self.param_groups[-1]["learned_rule"] = rule_json = self._rule_json()
        self._rule_jsons.add(rule_json)

    def _same_weights(self, a: Any, b: Any) -> bool:
        """Whether two ``weights=`` arguments name the same weights: the same module, or the
        same preset name or path (None is the default preset)."""
        a, b = (self.default_preset if w is None else w for w in (a, b))
        if isinstance(a, (str, os.PathLike)) and isinstance(b, (str, os.PathLike)):
            return os.fspath(a) == os.fspath(b)
        return a is b

    def _rule_json(self) -> str:
        """The rule's fingerprint as the JSON string each param group carries (see
        :meth:`state_dict`): ``torch.distributed.checkpoint``'s ``flatten_optimizer_state_dict``
        rebuilds a loaded group from the keys of the live groups, so the live groups hold the key
        too, or the saved fingerprint would not reach :meth:`load_state_dict`."""
        return json.dumps(fingerprint(self.rule), sort_keys=True)

    def _check_group(self, group: dict[str, Any]) -> None:
        _validate_options(group)
        if group["backend"] == "triton" and not _fused_rule(self.rule):
            raise ValueError(
                f"backend='triton' has fused kernels only for CoordinateLSTM and MetaLSTMCell; this "
                f"optimizer runs {_rule_name(self.rule)}: use 'torch' or 'auto'"
            )
        self._check_params(group)

    def _check_params(self, group: dict[str, Any]) -> set[int]:
        """Raise ValueError for a parameter of ``group`` listed twice in it, complex or of another
        dtype than :data:`PARAM_DTYPES`: checked when the group is added, and at each step, since a
        parameter appended to ``group["params"]`` later (or converted since: ``module.to(dtype)``)
        would be stepped twice, as its real part, or fail part-way through the step. Returns the
        ids of the group's parameters."""
        ids = {id(p) for p in group["params"]}
        if len(ids) != len(group["params"]):
            # torch.optim only warns (an error in a future release); the flat state needs each once
            raise ValueError(
                f"{type(self).__name__}: a parameter appears more than once in one parameter group; give each parameter once"
            )
        for p in group["params"]:
            if p.dtype in PARAM_DTYPES:  # real floating point: none of the errors below
                continue
            if p.is_complex():
                raise ValueError(
                    f"{type(self).__name__} does not support complex parameters "
                    f"(got a {p.dtype} tensor of shape {tuple(p.shape)}); optimise "
                    "torch.view_as_real(param) as a real parameter instead"
                )
            if not p.is_floating_point():
                raise ValueError(f"{type(self).__name__} needs floating-point parameters, got {p.dtype}")
            if p.dtype not in PARAM_DTYPES:
                raise ValueError(
                    f"{type(self).__name__} updates {_PARAM_DTYPE_NAMES} parameters, got {p.dtype} "
                    f"(shape {tuple(p.shape)})"
                )
        return ids

    def __repr__(self) -> str:
        # torch.optim's form, less each group's JSON copy of the rule's fingerprint (a long line
        # repeated per group): the rule is named once, briefly
        text = f"{type(self).__name__} (\nRule: {self._rule_description()}\n"
        for number, group in enumerate(self.param_groups):
            text += ("\n" if number else "") + f"Parameter Group {number}\n"
            text += "".join(f"    {key}: {group[key]}\n" for key in sorted(group) if key not in ("params", "learned_rule"))
        return text + ")"

    def _rule_description(self) -> str:
        """The update rule in brief: its kind and the preset or weight file it was loaded from,
        else (a module given as ``weights``) the start of its weights' SHA-256."""
        name = _rule_name(self.rule)
        preset = self.weights_header.get("preset")
        if preset:
            return f"{name}, preset {preset}"
        if isinstance(self._weights_argument, (str, os.PathLike)):
            return f"{name}, file {os.fspath(self._weights_argument)}"
        return f"{name}, sha256 {fingerprint(self.rule)['sha256'][:12]}..."

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim keeps defaults, state and param_groups; a learned optimizer also needs its
        # rule. The caches (flat buffers indexed by parameter identity, rule copies) are rebuilt.
        listed = {id(p) for group in self.param_groups for p in group["params"]}
        return {
            **super().__getstate__(),
            "rule": self.rule,
            "weights_header": self.weights_header,
            "chunk": self.chunk,
            "group_batch_limit": self.group_batch_limit,
            "_weights_argument": self._weights_argument,
            "_partial_step": self._partial_step,  # a copy holds the same half-stepped states
            # the shapes the states were made for (keyed by id() here, which a copy changes), of
            # the parameters the groups list: one taken out is not copied with the optimizer
            "_state_shapes": [entry for key, entry in self._state_shapes.items() if key in listed],
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # torch.optim adds this option of its own optimizers here; a learned step is never
        # differentiable, and groups added later would carry the key
        self.defaults.pop("differentiable", None)
        self.__dict__.setdefault("_rule_copies", {})
        self.__dict__.setdefault("_flat_states", {})
        self.__dict__.setdefault("chunk", DEFAULT_CHUNK)
        self.__dict__.setdefault("group_batch_limit", DEFAULT_GROUP_BATCH)
        self.__dict__.setdefault("_packed_weights", {})
        self.__dict__.setdefault("_fused_failed", False)
        self.__dict__.setdefault("_partial_step", None)
        self.__dict__.setdefault("_own_states", {})  # not pickled: a copy's states are checked once
        self.__dict__.setdefault("_weights_argument", None)  # pickled by an earlier version
        shapes = self.__dict__.setdefault("_state_shapes", {})  # pickled by an earlier version: the shapes now are taken
        if isinstance(shapes, list):  # pickled as (parameter, shape) pairs
            self._state_shapes = {id(param): (param, shape) for param, shape in shapes}
        for group in self.param_groups:  # pickled by an earlier version, without the key
            group.setdefault("learned_rule", self._rule_json())
        # this optimizer's own groups (pickled, or as load_state_dict checked them)
        rule_jsons = self.__dict__.setdefault("_rule_jsons", set())
        rule_jsons.update(group["learned_rule"] for group in self.param_groups if isinstance(group["learned_rule"], str))

    @_outside_inference_mode()
    def init_state(self) -> None:
        """Create the initial state of every parameter that requires grad now (as its first
        step would), without changing any parameter or stepping any state.

        ``torch.distributed.checkpoint`` loads into the tensors of an existing state dict. Its
        state-dict helpers initialise an optimizer without state by a zero-gradient step at
        ``lr=0``; :meth:`step` takes that step as a call of this method (a learned rule's
        recurrent states would advance on it, and ``MetaLSTMOptimizer`` has no loss there). They
        take no such step where a parameter has a gradient: call this first there (the README's
        recipe always does). A frozen parameter (``requires_grad=False``) gets no
        gradient, so no step gave it a state and no checkpoint holds one: it gets none here
        either (as with torch's own initialisation), else the loader would look for it.
        """
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    self._state_of(p, group["state_dtype"])
        self._flat_states.clear()

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim`` state dict plus ``"learned_rule"``: the kind, architecture and weight
        hash of the update rule, checked by :meth:`load_state_dict`. Each param group holds it
        too, as a JSON string (``"learned_rule"``), because
        ``torch.distributed.checkpoint.state_dict``'s helpers keep only ``state`` and
        ``param_groups``: so a distributed checkpoint is checked as well.

        A per-coordinate state has the parameter's shape inside the rule's: ``(*lead,
        *param.shape, *trail)`` (a view of ``optimizer.state[p]``'s ``(*lead, param.numel(),
        *trail)``, as Adam's states have their parameter's shape); for a parameter sharded as a
        ``DTensor`` it is a ``DTensor`` of that global shape sharded like the parameter (see
        :mod:`learnedopt.optim.sharding`). So ``torch.distributed.checkpoint`` moves states
        between sharded and unsharded models, and any number of ranks. State-dict post-hooks
        see (and may replace) this finished dict, as in ``torch.optim``.

        Raises:
            RuntimeError: a :meth:`step` failed part-way through since the last load: the states
                are half-stepped (see :meth:`step` and :meth:`accept_partial_step`).
            ValueError: ``optimizer.state`` holds the state of a parameter that no param group
                lists (taken out of ``param_groups``), or a state that does not fit its parameter.
        """
        if self._partial_step is not None:  # saved, they would load as whole states (and did)
            raise RuntimeError(
                f"{type(self).__name__}.state_dict() refuses to save half-stepped states: {self._partial_step}. "
                f"{self._partial_step_way_out()}"
            )
        listed = {id(p) for group in self.param_groups for p in group["params"]}
        orphan = next((p for p in self.state if isinstance(p, Tensor) and id(p) not in listed), None)
        if orphan is not None:  # torch.optim's state_dict() raised a bare KeyError of its id()
            raise ValueError(
                f"optimizer.state holds the state of a parameter of shape {tuple(orphan.shape)} that no param group "
                "lists (a group or parameter taken out of param_groups), which a state dict cannot index; drop it "
                "(del optimizer.state[param]) or put the parameter back in a group"
            )
        # torch.optim runs the post-hooks inside its state_dict(); they must see the finished dict
        post_hooks = self._optimizer_state_dict_post_hooks
        self._optimizer_state_dict_post_hooks = type(post_hooks)()
        try:
            state_dict = super().state_dict()
        finally:
            self._optimizer_state_dict_post_hooks = post_hooks
        spec = self.rule.state_spec()
        params = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            param = params[index]
            # a parameter resized since its state was made: the reshape below would fail as torch's view
            flat = dict(saved)  # saved is the live state dict: flattened as a copy
            flatten_parameter_shaped(self.rule, flat, param)
            check_states(self.rule, flat, param, name=lambda param=param, index=index: f"parameter {index} (shape {tuple(param.shape)})")
            self._check_reshaped(param)
            if sharding.is_sharded(param):
                shaped = lambda value, s, param=param: sharding.to_global(value, param, s)  # noqa: E731
            else:
                shaped = lambda value, s, param=param: value.view(*s.lead, *param.shape, *s.trail)  # noqa: E731
            state_dict["state"][index] = {
                name: shaped(value, spec[name]) if name in spec else value for name, value in saved.items()
            }
        rule_json = self._rule_json()  # the weights now, which a caller may have changed in place
        for group in state_dict["param_groups"]:  # new dicts: the optimizer's groups keep the dtype
            group["state_dtype"] = str(group["state_dtype"]).removeprefix("torch.")
            # a NumPy scalar (the lr a LambdaLR of np.cos leaves, base_lr * np.float64) is pickled
            # as a NumPy object, which torch.load's default weights_only=True refuses
            group.update([(key, value.item()) for key, value in group.items() if isinstance(value, np.generic)])
            group["learned_rule"] = rule_json
        state_dict["learned_rule"] = json.loads(rule_json)
        for post_hook in post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def accept_partial_step(self) -> None:
        """Accept the parameters and states as a :meth:`step` that failed part-way through left
        them (some tensors stepped, or their states, and others not), so that :meth:`step` and
        :meth:`state_dict` work again; does nothing where no step failed part-way. The other way
        out is :meth:`load_state_dict` of a state saved before that step (with the parameters of
        then)."""
        self._partial_step = None

    @staticmethod
    def _partial_step_way_out() -> str:
        """The ways out of a step that failed part-way, as its errors name them."""
        return (
            "Load a state saved before that step (optimizer.load_state_dict(saved), with the parameters of then), "
            "or accept the parameters and states as they are: optimizer.accept_partial_step()"
        )

    @_outside_inference_mode()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict`; continues bit-identically.

        Unlike the base class, per-coordinate states keep their saved dtype (``state_dtype``) rather
        than being cast to the parameter dtype, and their names and shapes are checked against the
        update rule, and their values too: NaN in any of them, or Inf in one the rule's
        ``StateSpec`` declares ``finite`` (every state of the library's rules), is refused, since
        the next step would turn the parameter NaN. Each group keeps this optimizer's ``backend`` (the other options are the
        saved ones): a state saved under ``backend="triton"`` resumes on the PyTorch path of a
        machine without CUDA or Triton, equal to rounding. Everything is checked before anything is
        changed: a rejected state dict leaves the optimizer as it was. Load-state-dict pre-hooks see (and may replace) the whole
        state dict, post-hooks the loaded optimizer, as in ``torch.optim``.
        """
        state_dict = state_dict.copy()  # shallow, as torch.optim's
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved_rule, rule_json = _saved_rule(state_dict), self._rule_json()
        rule = json.loads(rule_json)
        if saved_rule is not None and saved_rule != rule:
            raise ValueError(
                f"this state was saved by an optimizer with other weights ({describe_fingerprint(saved_rule)}) than "
                f"this one's ({describe_fingerprint(rule)}); construct it with the same weights"
            )
        if self._partial_step is not None and self._holds_live_states(state_dict):
            raise RuntimeError(
                "the state dict holds this optimizer's live states (a state_dict() not copied, as in torch.optim), "
                f"which the failed step half-updated: {self._partial_step}. Load a copy saved before that step "
                "(copy.deepcopy(optimizer.state_dict()), torch.save), or accept the states as they are: "
                "optimizer.accept_partial_step()"
            )
        saved_groups = copy.deepcopy(state_dict["param_groups"])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, this optimizer {len(self.param_groups)}"
            )
        index_to_param, where = {}, {}
        for number, (saved_group, group) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            if len(saved_group["params"]) != len(group["params"]):
                raise ValueError(
                    f"loaded state dict's parameter group {number} has {len(saved_group['params'])} "
                    f"parameters, this optimizer's {len(group['params'])}"
                )
            index_to_param.update(zip(saved_group["params"], group["params"], strict=True))
            where.update((index, (number, position)) for position, index in enumerate(saved_group["params"]))
            saved_group["learned_rule"] = rule_json  # checked above
            # the saved run decayed nothing; not this optimizer's decay, which changes the update
            saved_group.setdefault("weight_decay", 0.0)
            for key, value in self.defaults.items():  # a key this version added since the save
                saved_group.setdefault(key, value)
            # where the step runs is this machine's choice, not the saved run's: a checkpoint
            # written under backend='triton' on a GPU must resume where there is no CUDA or Triton
            saved_group["backend"] = group["backend"]
            _validate_options(saved_group)
        loaded = {index: self._loaded_state(index, index_to_param, saved) for index, saved in state_dict["state"].items()}
        self._check_loaded_finite(loaded, where)
        state = dict(loaded.values())
        # every version wrote both; without them, and without states to tell (SGD's, or an unstepped
        # Adam's), another optimizer's lr (and weight_decay) were loaded in silence
        foreign = [number for number, group in enumerate(state_dict["param_groups"]) if "state_dtype" not in group]
        if saved_rule is None and foreign:
            options = sorted(set(state_dict["param_groups"][foreign[0]]) - {"params", "param_names"})
            raise ValueError(
                f"loaded state dict's parameter group {foreign[0]} holds {options}, no 'state_dtype', and the dict no "
                "'learned_rule': it was not saved by a learned optimizer (a learned optimizer's states start afresh: "
                "skip load_state_dict to switch from another optimizer)"
            )
        for saved_group, group in zip(saved_groups, self.param_groups, strict=True):
            saved_group["params"] = group["params"]
            if "param_names" in group and "param_names" not in saved_group:
                saved_group["param_names"] = group["param_names"]
        self.__setstate__({"state": defaultdict(dict, state), "param_groups": saved_groups})
        # every group now holds the fingerprint of the weights now: those of weights loaded under
        # before (a rule trained in place between loads) would be kept without end
        self._rule_jsons = {rule_json}
        self._partial_step = None  # the loaded states are whole (state_dict() saves no half-stepped ones)
        self._flat_states.clear()
        self._own_states.clear()
        # the loaded states were checked against the shapes now: a reshape before the next step is one
        self._state_shapes = {id(p): (p, tuple(p.shape)) for p, loaded in state.items() if loaded}
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _check_loaded_finite(self, loaded: dict[int, tuple[Tensor, dict[str, Any]]], where: dict[int, tuple[int, int]]) -> None:
        """Raise ValueError unless every loaded rule state (``loaded``: saved index -> ``(param,
        state)``, as :meth:`_loaded_state` copied them; ``where``: saved index -> ``(group,
        position)``) is free of NaN, and of Inf where its ``StateSpec`` says ``finite``: the next
        step would turn the parameter NaN, in silence (:meth:`_check_states_finite`)."""
        spec = self.rule.state_spec()
        named = [(index, name, value) for index, (_, state) in loaded.items() for name, value in state.items() if name in spec]
        self._check_states_finite(named, where, "saved state")

    def _check_states_finite(self, named: list[tuple[int, str, Tensor]], where: dict[int, tuple[int, int]], what: str) -> None:
        """Raise ValueError naming the first of the rule states ``named`` (``(index, name,
        value)``: ``index`` the parameter's in ``state_dict()``, ``where[index]`` its ``(group,
        position)``) that holds NaN, or Inf where its ``StateSpec`` says ``finite``, as ``what``
        (``"saved state"``, ``"state"``): :func:`_non_finite`, one foreach reduction per device
        and dtype."""
        spec = self.rule.state_spec()
        for (index, name, _), found in zip(named, _non_finite([value for _, _, value in named]), strict=True):
            if found is None or (found == "Inf" and not spec[name].finite):
                continue
            number, position = where[index]
            group = self.param_groups[number]
            names = group.get("param_names")
            param = f"{names[position]!r}" if names else f"param_groups[{number}]['params'][{position}]"
            at = f"{what} [{name!r}] of parameter {index} ({param}, shape {tuple(group['params'][position].shape)})"
            if found == "NaN":
                raise ValueError(f"{at} holds NaN: its next step would turn the parameter NaN; load a state saved before it went NaN")
            raise ValueError(
                f"{at} holds Inf, which this {self.rule.kind} rule's state_spec() declares finite (a state that may "
                "hold Inf declares StateSpec(..., finite=False)); load a state saved before it overflowed"
            )

    def _check_put_states_finite(self, put: list[tuple[int, Tensor]]) -> None:
        """Raise ValueError as ``load_state_dict`` does where a rule state of the parameters
        ``put`` (``(group, param)``: states the step's flat buffers are to be rebuilt from, which
        they did not make, or that the per-tensor path is to step and did not step last) holds NaN,
        or Inf where its ``StateSpec`` says ``finite``. Such states reached ``optimizer.state[p]``
        without ``load_state_dict``'s check (a wrapper that loads them itself,
        ``ZeroRedundancyOptimizer``, or an assignment), or are the optimizer's own, made outside
        that path (``init_state()``, a step on the other path, a load)."""
        if not put:
            return
        spec = self.rule.state_spec()
        where: dict[int, tuple[int, int]] = {}
        positions: dict[tuple[int, int], int] = {}
        for number, group in enumerate(self.param_groups):
            for position, p in enumerate(group["params"]):
                positions[number, id(p)] = len(where)
                where[len(where)] = (number, position)
        named = [
            (positions[number, id(p)], name, value)
            for number, p in put
            for name, value in self.state[p].items()
            if name in spec and isinstance(value, Tensor)
        ]
        self._check_states_finite(named, where, "state")

    def _check_put_states_unshared(self, put: list[tuple[int, Tensor]]) -> None:
        """Raise ValueError where the state of a parameter of ``put`` (``(group, param)``, as for
        :meth:`_check_put_states_finite`) is another parameter's state dict, or one of its tensors
        (a rule state or the count, starting at the same address) is another parameter's:
        ``optimizer.state[q] = optimizer.state[p]``. Each step would step (and count) the shared
        states once per parameter. Reads every parameter's states, only where states were put."""
        if not put:
            return
        names = {*self.rule.state_spec(), "step"}
        dicts: dict[int, tuple[int, Tensor]] = {}
        tensors: dict[tuple[torch.device, int], tuple[int, Tensor, str]] = {}
        put_ids = {id(p) for _, p in put}
        for number, group in enumerate(self.param_groups):
            for p in group["params"]:
                entry = self.state.get(p)
                if not entry:
                    continue
                other = dicts.setdefault(id(entry), (number, p))
                if other[1] is not p and (id(p) in put_ids or id(other[1]) in put_ids):
                    raise ValueError(
                        f"the state of {self._name_of(number, group, p)} is the state of "
                        f"{self._name_of(other[0], self.param_groups[other[0]], other[1])} too (optimizer.state[q] = "
                        "optimizer.state[p]): each step would step it once per parameter; give each parameter its own "
                        "(a copy: copy.deepcopy(optimizer.state[p]))"
                    )
                for name, value in entry.items():
                    if name not in names or not isinstance(value, Tensor) or value.is_meta or not value.numel():
                        continue
                    local_value = sharding.local(value)
                    key = (local_value.device, local_value.data_ptr())
                    found = tensors.setdefault(key, (number, p, name))
                    if found[1] is not p and (id(p) in put_ids or id(found[1]) in put_ids):
                        raise ValueError(
                            f"the state {name!r} of {self._name_of(number, group, p)} is the state {found[2]!r} of "
                            f"{self._name_of(found[0], self.param_groups[found[0]], found[1])} too (the same tensor): "
                            "each step would step it once per parameter; give each parameter its own (a copy: .clone())"
                        )

    def _holds_live_states(self, state_dict: dict[str, Any]) -> bool:
        """Whether a tensor of ``state_dict``'s states shares memory with a state of this optimizer."""

        def storages(tensors: Iterable[Any]) -> set[int]:
            return {
                sharding.local(t).untyped_storage().data_ptr()
                for t in tensors
                if isinstance(t, Tensor) and not sharding.local(t).is_meta and sharding.local(t).numel()
            }

        saved = state_dict.get("state")
        if not isinstance(saved, dict):
            return False
        live = storages(value for state in self.state.values() for value in state.values())
        return not live.isdisjoint(storages(value for state in saved.values() if isinstance(state, dict) for value in state.values()))

    def _loaded_state(self, index: int, index_to_param: dict[int, Tensor], saved: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        """``(param, state)`` for one parameter's saved state, checked against the update rule and
        copied onto the parameter's device in its saved dtypes."""
        param = index_to_param.get(index)
        if param is None:
            raise ValueError(f"loaded state dict has a state for parameter index {index}, which no parameter group lists")
        if not saved:  # an entry that reading optimizer.state[p] (a defaultdict) made: no state yet
            return param, {}
        spec = self.rule.state_spec()
        if "step" not in saved:  # the per-tensor path would restart such a state, the batched one not
            raise ValueError(f"saved state of parameter {index} lacks 'step' (it holds {sorted(saved)})")
        saved = {**saved, "step": _loaded_step(saved["step"], index)}
        not_tensors = sorted(name for name in spec if name in saved and not isinstance(saved[name], Tensor))
        if not_tensors:
            raise ValueError(f"saved state {not_tensors} of parameter {index} must be tensors")
        # the step would cast them to the state dtype in silence (a complex one dropping its imaginary part)
        not_float = sorted(name for name in spec if name in saved and not saved[name].is_floating_point())
        if not_float:
            dtype = str(saved[not_float[0]].dtype).removeprefix("torch.")
            raise ValueError(f"saved state {not_float} of parameter {index} must be floating-point tensors, got {dtype}")
        on_meta = sorted(name for name in spec if name in saved and saved[name].is_meta)
        if on_meta and not sharding.local(param).is_meta:  # copying it to the parameter's device raised torch's NotImplementedError
            raise ValueError(
                f"saved state {on_meta} of parameter {index} is on the meta device, which holds no values: it was "
                "saved by an optimizer of a model on the meta device (a shape-only run); save the states of a real one"
            )
        if sharding.is_sharded(param):
            missing = sorted(set(spec) - set(saved))
            if missing:
                raise ValueError(f"saved state of parameter {index} lacks {missing}")
            saved = {
                name: sharding.to_local(value, param, spec[name], f"saved state {name!r} of parameter {index}")
                if name in spec else value
                for name, value in saved.items()
            }  # fmt: skip
        else:  # the parameter-shaped form state_dict() writes, or the flat one of earlier versions
            saved = {
                name: value.reshape(spec[name].shape(param.numel()))
                if name in spec and isinstance(value, Tensor) and tuple(value.shape) == (*spec[name].lead, *param.shape, *spec[name].trail)
                else value
                for name, value in saved.items()
            }  # fmt: skip
        expected = {name: s.shape(sharding.local(param).numel()) for name, s in spec.items()}
        got = {name: tuple(saved[name].shape) for name in expected if name in saved}
        if spec and not got:  # e.g. torch.optim.Adam's exp_avg and exp_avg_sq: "has {}" named no cause
            # (a rule without per-coordinate states, e.g. a learned SGD, saves only 'step')
            raise ValueError(
                f"saved state of parameter {index} holds {sorted(saved)}, none of this {self.rule.kind} rule's "
                f"states {sorted(spec)}: it was not saved by a learned optimizer (a learned optimizer's states "
                "start afresh: skip load_state_dict to switch from another optimizer)"
            )
        if got != expected:
            raise ValueError(
                f"saved state of parameter {index} has {got}, expected {expected} for a "
                f"{tuple(param.shape)} parameter under {self.rule.kind} {self.rule.config_dict()}"
            )
        unknown = sorted(str(name) for name in saved if name != "step" and name not in spec)
        if unknown:  # another architecture's states (unused here, and kept), or another optimizer's
            raise ValueError(
                f"saved state of parameter {index} holds {unknown}, which this {self.rule.kind} rule does not "
                f"(its states: {sorted(spec)}): it was saved by an optimizer of another architecture "
                f"({self.rule.kind} {self.rule.config_dict()} here) or of another kind"
            )
        # the count stays the CPU tensor _loaded_step made, as a fresh state's and Adam's: on the
        # parameter's device it was a GPU scalar, and on ``meta`` it lost its value
        return param, {
            name: value.detach().to(param.device).clone() if isinstance(value, Tensor) and name != "step" else value
            for name, value in saved.items()
        }

    # ---------------------------------------------------------------- the step
    # Dynamo does not trace the step (a graph break, as at torch.optim's zero_grad): its input
    # checks read values on the host, and traced, MetaLSTMOptimizer's step raised Dynamo's
    # InternalTorchDynamoError. It runs as it does eagerly, its LSTM's pointwise functions compiled.
    @torch._disable_dynamo
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None, *, loss: Tensor | float | None = None) -> Tensor | None:
        """Perform one optimisation step.

        Args:
            closure: re-evaluates the model and returns the loss (as in ``torch.optim``).
            loss: the current loss, for rules that read it: a real number (read in float64) or a
                one-element real tensor (a ``DTensor`` is read as its full value); else the
                closure's value, which must be one of those. Given with a closure, the rule
                reads this one, and the closure's loss is still returned.

        Under ``torch.compile`` (of a training step, or of ``optimizer.step``) the step is a
        graph break: it runs as it does eagerly, the closure too.

        The closure runs first (under ``torch.enable_grad``), before the step's checks of the
        param groups' options and parameters, which read them as the closure left them.

        A step where no parameter has a gradient changes nothing, as ``torch.optim``'s do, and needs
        no loss, even where the rule reads one (``MetaLSTMOptimizer``); a loss given is still
        checked (a NaN one raises under ``nan_policy="raise"``). With sharded (``DTensor``)
        parameters it still joins the NaN/Inf verdict of the mesh's other ranks, a collective,
        since their optimizers may hold gradients that this rank's leaves out.

        A step without closure or loss on an optimizer without state, at ``lr=0`` in every group,
        where exactly the parameters that require grad have a gradient and all of these are zero
        (how ``torch.distributed.checkpoint.state_dict``'s helpers initialise an optimizer's
        state) runs :meth:`init_state` instead: it changes no parameter and advances no state.

        A step that raises after it has written a state or parameter (an out-of-memory error in
        a later chunk or group) leaves the tensors before that point stepped and those after not;
        every later step then raises ``RuntimeError``, as it would step those twice, and so does
        :meth:`state_dict` (its states are half-stepped), until :meth:`load_state_dict` loads a
        state saved before that step, or :meth:`accept_partial_step` accepts the state as it is.
        One that raises before writing anything changed nothing.

        Returns:
            The closure's loss, or None.
        """
        if closure is not None and not callable(closure):  # step(loss) for step(loss=loss): "not callable" named no cause
            raise TypeError(
                f"{type(self).__name__}.step's first argument is a closure (a callable returning the loss), got a "
                f"{type(closure).__name__}; "
                + ("pass the loss as step(loss=loss)" if self.rule.needs_loss else "its rule reads no loss: call step()")
            )
        if self._partial_step is not None:
            raise RuntimeError(f"{self._partial_step}: another step would step those twice. {self._partial_step_way_out()}")
        # the closure runs before the checks below, which read the groups as it left them: one that
        # changed an option or appended a parameter was never checked (an lr of NaN stepped every
        # parameter to NaN, a parameter appended to a second group was stepped twice)
        closure_loss = None
        if closure is not None:
            with torch.enable_grad():
                closure_loss = closure()
        # plain attributes a user may set: a bad one raised inside the update, after a fused group had stepped
        check_positive_integer(f"{type(self).__name__}.chunk", self.chunk)
        if not is_integer(self.group_batch_limit) or self.group_batch_limit < 0:
            raise ValueError(f"{type(self).__name__}.group_batch_limit must be an integer >= 0 (0: no sharing), got {self.group_batch_limit!r}")
        seen: set[int] = set()
        group_ids: list[set[int]] = []
        for number, group in enumerate(self.param_groups):  # options and params may have been changed since
            _validate_options(group)
            ids = self._check_params(group)
            group_ids.append(ids)
            if not seen.isdisjoint(ids):  # torch.optim checks this only in add_param_group
                raise ValueError(
                    f"a parameter of param_groups[{number}] appears in an earlier parameter group too; give each "
                    "parameter to one group. No parameter or state was changed by this step"
                )
            seen |= ids
        if not self._state_shapes.keys() <= seen:  # a parameter taken out of its group is not kept alive
            self._state_shapes = {key: entry for key, entry in self._state_shapes.items() if key in seen}
        if not self._own_states.keys() <= seen:
            self._own_states = {key: entry for key, entry in self._own_states.items() if key in seen}
        self._drop_stale_flat_states(group_ids)
        self._check_group_fingerprints()
        if closure is None and loss is None and self._is_state_initialisation():
            self.init_state()
            return None
        if loss is None and closure_loss is None and not any(p.grad is not None for group in self.param_groups for p in group["params"]):
            # nothing to update here: no loss needed (torch.optim.Adam's step does nothing too); but
            # the other ranks of a sharded parameter's mesh may have gradients (those this rank's
            # optimizer leaves out), and they wait for this rank in their NaN/Inf verdict: join it
            # (no collective where no parameter is sharded)
            params = [p for group in self.param_groups for p in group["params"]]
            sharding.agree_finite_lists([[] for _ in self.param_groups], [[] for _ in self.param_groups], params)
            return None
        rule_loss = self._rule_loss(*((loss, "loss= is") if loss is not None else (closure_loss, "the closure returned")))
        if rule_loss is not None and not self._loss_finite(rule_loss):
            if any(group["nan_policy"] == "raise" for group in self.param_groups):
                raise NonFiniteGradientError(
                    f"the loss given to {type(self).__name__}.step is {rule_loss.item()}; nan_policy='raise', so "
                    "no parameter or state was changed"
                )
            return closure_loss  # nan_policy='skip' everywhere: every tensor reads the loss, so all are skipped
        self._apply_step(rule_loss)
        return closure_loss

    @_outside_inference_mode()
    def _apply_step(self, rule_loss: Tensor | None) -> None:
        """The step after its input checks: every group's update, out of inference mode (see
        :func:`_outside_inference_mode`) and with autocast off on the parameters' devices: the
        rule runs in its math dtype, and the NaN/Inf checks before it stack the gradients' norms,
        which autocast refused for bfloat16 ones in a float16 region (or the reverse)."""
        devices = {p.device.type for group in self.param_groups for p in group["params"]}
        with without_autocast(devices):
            self._apply_step_without_autocast(rule_loss)

    def _apply_step_without_autocast(self, rule_loss: Tensor | None) -> None:
        """:meth:`_apply_step`'s body."""
        gathered = [self._gradients(index, group) for index, group in enumerate(self.param_groups)]
        # every group's NaN/Inf verdicts read with one host sync per device, not one per group
        tensors = [t for params, grads, _ in gathered for t in (grads + params if self.rule.reads_param else grads)]
        verdicts = iter(_all_finite(tensors))
        finites = []
        for params, grads, _ in gathered:
            finite = [next(verdicts) for _ in grads]
            if self.rule.reads_param:  # a rule that reads the parameter would carry a NaN/Inf value into its state
                values = [next(verdicts) for _ in params]
                finite = [a and b for a, b in zip(finite, values, strict=True)]
            finites.append(finite)
        # a sharded tensor is judged as a whole: every group's verdicts agreed at once, over every
        # mesh of the optimizer's parameters (a rank whose group holds none of a mesh's still joins)
        finites = sharding.agree_finite_lists(
            [grads for _, grads, _ in gathered], finites, (p for group in self.param_groups for p in group["params"])
        )
        plans = []
        for index, (group, (params, grads, positions), finite) in enumerate(zip(self.param_groups, gathered, finites, strict=True)):
            plans.append(_partitions(*self._plan(index, group, params, grads, positions, finite)))
        # a backend='triton' group that cannot run, or a parameter resized since its state was
        # made, raises here, before any group is updated
        flat_members: list[dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], bool]]] = []
        put: list[tuple[int, Tensor]] = []  # (group, parameter) whose states the flat buffers did not make
        for index, (group, partitions) in enumerate(zip(self.param_groups, plans, strict=True)):
            flat_members.append({})
            for (device, compute_dtype), (ps, _) in partitions.items():
                fused = self._use_fused(group["backend"], device, compute_dtype, group["state_dtype"], group["foreach"])
                # the batched paths copy the states of every parameter with one into their flat
                # buffers, a parameter without a gradient now too; the per-tensor path only ``ps``'
                current = False
                specs = self.rule.state_spec()
                if group["foreach"] is False and not fused:
                    held = ps
                    # states the per-tensor path did not step last (assigned, loaded, made by init_state)
                    put += [(index, p) for p in ps if self.state.get(p) and not self._holds_own_states(p)]
                else:
                    held = self._flat_members(group, device, compute_dtype, ps)
                    flat = self._flat_states.get((index, device, compute_dtype))
                    # states that still are their views into current buffers made for these specs are
                    # flat and fit their parameters
                    current = flat is not None and flat.is_current(held, self.state, group["state_dtype"], specs)
                    flat_members[index][device, compute_dtype] = (held, current)
                    if not current:  # states put in self.state since the buffers were made are checked below
                        put += [(index, p) for p in held if self.state.get(p) and (flat is None or not flat.backs(p, self.state[p]))]
                for p in held:
                    entry = self.state.get(p)
                    if not current and entry is not None:
                        flatten_parameter_shaped(self.rule, entry, p, specs=specs)
                        check_states(self.rule, entry, p, specs=specs, name=lambda p=p: self._name_of(index, group, p))
                    if entry and "step" in entry and not _is_step_count(entry["step"]):
                        # a count put by hand (a number): converted as a load converts it, not
                        # failing in the count's increment after every parameter was updated
                        what = f"the state 'step' of {self._name_of(index, group, p)}"
                        entry["step"] = _loaded_step(entry["step"], None, what=what)
                    self._check_reshaped(p)
                _check_lr_fits(float(group["lr"]), ps)
        # before any buffer is built from them: one reduction per device and dtype, only where
        # states were replaced (a ZeroRedundancyOptimizer's load) or the buffers are made anew
        self._check_put_states_finite(put)
        self._check_put_states_unshared(put)
        # the allocations that grow with the model (the states of parameters stepped for the first
        # time, a group's flat buffers rebuilt for them) are made for every group before any is
        # updated: running out of memory there changes nothing, and the step can be retried
        held = [
            self._hold_states(index, group, partitions, flat_members[index])
            for index, (group, partitions) in enumerate(zip(self.param_groups, plans, strict=True))
        ]
        shared, sharing = self._shared_calls(plans, held)
        progress = _StepProgress()
        try:
            for index, (group, partitions) in enumerate(zip(self.param_groups, plans, strict=True)):
                for members in shared.get(index, ()):  # the shared calls this group is the first of
                    self._update_shared(members, plans, held, rule_loss, progress)
                own = {key: part for key, part in partitions.items() if (index, key) not in sharing}
                self._update_group(index, group, own, held[index], rule_loss, progress)
        except BaseException as err:  # an out-of-memory error in a later chunk or group, an interrupt
            if progress.written:
                # the states written so far cannot be taken back without a copy of them all (as
                # much memory again as the states): refuse to step them a second time instead
                total = sum(len(ps) for partitions in plans for ps, _ in partitions.values())
                done = f"{progress.stepped} of its {total} parameter tensor(s), with their states"
                self._partial_step = (
                    f"an earlier {type(self).__name__}.step() failed part-way through ({err!r}) after it had stepped "
                    + (f"some parameters or their states ({done} in full, others in part)" if progress.partial else done)
                )
            raise
        if progress.kernel_failures:
            # raised only now, so that the step is whole: no group left behind, no tensor stepped twice
            raise RuntimeError(
                f"backend='triton': the fused kernel failed ({progress.kernel_failures[0]!r}) after this step had begun; "
                "it was finished on the PyTorch path, so every parameter and state took it once. Later steps try "
                "the kernel again; backend='auto' falls back to the PyTorch path without raising"
            ) from progress.kernel_failures[0]

    def _shared_calls(
        self,
        plans: list[Partitions],
        held: list[dict[tuple[torch.device, torch.dtype], FlatState | list[dict[str, Any]]]],
    ) -> tuple[dict[int, list[list[_PartitionKey]]], set[_PartitionKey]]:
        """The partitions of different param groups that share one stream of rule calls
        (:func:`grouped_flat_update_`): those on the batched PyTorch path (not the per-tensor
        reference, not a fused kernel) of at most :attr:`group_batch_limit` coordinates, with the
        same device, compute dtype and ``state_dtype`` (and ``maximize``, for a rule that reads the
        loss, which ``maximize`` negates). Returns, by the index of the group first in each shared
        call, the lists of ``(group index, (device, compute dtype))`` of its calls; and the set of
        every partition in one. A partition alone in its class runs by itself, as every partition
        does with ``group_batch_limit`` 0."""
        limit = self.group_batch_limit
        classes: dict[tuple[Any, ...], list[_PartitionKey]] = {}
        if limit > 0 and len(plans) > 1:
            for index, (group, partitions) in enumerate(zip(self.param_groups, plans, strict=True)):
                for key, (ps, _) in partitions.items():
                    states = held[index][key]
                    if not isinstance(states, FlatState) or sum(sharding.local(p).numel() for p in ps) > limit:
                        continue
                    if self._use_fused(group["backend"], *key, group["state_dtype"], group["foreach"]):
                        continue
                    maximize = group["maximize"] if self.rule.needs_loss else None
                    classes.setdefault((*key, group["state_dtype"], maximize), []).append((index, key))
        shared: dict[int, list[list[_PartitionKey]]] = {}
        sharing: set[_PartitionKey] = set()
        for members in classes.values():
            if len(members) > 1:
                shared.setdefault(members[0][0], []).append(members)
                sharing.update(members)
        return shared, sharing

    def _update_shared(
        self,
        members: list[_PartitionKey],
        plans: list[Partitions],
        held: list[dict[tuple[torch.device, torch.dtype], FlatState | list[dict[str, Any]]]],
        loss: Tensor | None,
        progress: _StepProgress,
    ) -> None:
        """Update the partitions ``members`` (of several groups; see :meth:`_shared_calls`) in one
        stream of rule calls, each with its group's ``lr``, ``maximize`` and ``weight_decay``."""
        device, compute_dtype = members[0][1]
        rule = self._rule_on(device, compute_dtype)
        segments = []
        for index, key in members:
            group, (ps, gs) = self.param_groups[index], plans[index][key]
            ordered_ps, ordered_gs, buffers, offsets = _in_buffer_order(held[index][key], ps, gs)
            lr = max(float(group["lr"]), 0.0)  # as in _update_group
            segments.append(Segment(ordered_ps, ordered_gs, buffers, offsets, lr=lr, maximize=group["maximize"]))
        # one maximize for every member of a rule that reads the loss (see _shared_calls)
        loss_here = None if loss is None else _saturated(loss.to(device), compute_dtype) * (-1 if segments[0].maximize else 1)
        grouped_flat_update_(
            rule, segments, loss=loss_here, compute_dtype=compute_dtype, chunk=self.chunk, before_write=progress.mark_written
        )
        progress.mark_written()
        finished = [(self.param_groups[index], plans[index][key][0], segment.lr) for (index, key), segment in zip(members, segments, strict=True)]
        self._finish_partitions(finished, progress)

    def _finish_partitions(self, finished: list[tuple[dict[str, Any], list[Tensor], float]], progress: _StepProgress) -> None:
        """After the update of partitions (one group's, or those sharing a rule call), given as
        ``(group, parameters, lr)``: each group's weight decay, the step counts (one foreach op
        each for all of them), the progress."""
        decayed, factors, steps = [], [], []
        for group, ps, lr in finished:
            if group["weight_decay"] and lr:
                # after the step, not before as AdamW: a kernel that fails at its first launch
                # must leave every parameter as it was
                decayed += [sharding.local(p) for p in ps]
                factors += [1.0 - lr * float(group["weight_decay"])] * len(ps)
            steps += [self.state[p]["step"] for p in ps]
        # torch._foreach_mul_ on the CPU rounds each factor to its tensor's dtype first (0.997 to
        # bfloat16's 0.99609375: a third more decay than asked for), where ``p.mul_(factor)`` (and
        # AdamW's per-tensor step) multiplies in float32 and rounds once: half-precision
        # parameters are multiplied one by one
        narrow = [i for i, p in enumerate(decayed) if p.dtype.itemsize < 4]
        for i in narrow:
            decayed[i].mul_(factors[i])
        if len(narrow) < len(decayed):
            wide = [i for i, p in enumerate(decayed) if p.dtype.itemsize >= 4]
            torch._foreach_mul_([decayed[i] for i in wide], [factors[i] for i in wide])
        torch._foreach_add_(steps, 1.0)
        progress.updated = True
        progress.partial = False
        progress.stepped += len(steps)

    def _check_reshaped(self, p: Tensor) -> None:
        """Raise ValueError where ``p`` has another shape than when its state was made, with as
        many elements (``p.data = p.data.t().contiguous()``): its states are per element of the old
        shape (Adam fails on its states' shape there). Records the shape of a parameter without a
        state, whose state is made now, and of one whose state was made elsewhere (given by a wrapper
        such as ``ZeroRedundancyOptimizer``); :meth:`load_state_dict` records the loaded states'
        shapes, and a copy keeps the original's."""
        shape = tuple(p.shape)
        entry = self._state_shapes.get(id(p))
        made = entry[1] if entry is not None and entry[0] is p else None
        if made == shape:
            return
        if made is not None and self.state.get(p):
            raise ValueError(
                f"a parameter was reshaped from {made} to {shape} since its state was created (p.data = ...), "
                "and its states are per element of the old shape; give it a fresh state (del optimizer.state[param]) "
                "or a new optimizer"
            )
        self._state_shapes[id(p)] = (p, shape)

    def _check_group_fingerprints(self) -> None:
        """Raise ValueError where a param group's ``"learned_rule"`` that this optimizer did not
        write names other weights: a wrapper loaded a state around :meth:`load_state_dict`
        (``ZeroRedundancyOptimizer.load_state_dict`` assigns the states and copies the saved
        groups' options itself). One that names these weights is taken as this optimizer's."""
        for number, group in enumerate(self.param_groups):
            text = group.get("learned_rule")
            if not isinstance(text, str) or text in self._rule_jsons:
                continue
            saved, rule = _as_json(json.loads(text)), json.loads(self._rule_json())
            if saved != rule:
                raise ValueError(
                    f"param group {number} holds the state of an optimizer with other weights ({describe_fingerprint(saved)}) "
                    f"than this one's ({describe_fingerprint(rule)}), loaded without load_state_dict (as "
                    "ZeroRedundancyOptimizer loads); construct it with the same weights. No parameter or state was "
                    "changed by this step"
                )
            self._rule_jsons.add(text)
        if len(self._rule_jsons) > len(self.param_groups):
            # those no group holds any more (weights changed in place between such loads) would be kept without end
            self._rule_jsons = {text for group in self.param_groups if isinstance(text := group.get("learned_rule"), str)}

    def _is_state_initialisation(self) -> bool:
        """Whether this step (without closure or loss) is the one by which
        ``torch.distributed.checkpoint.state_dict``'s helpers (``get_optimizer_state_dict``,
        ``set_optimizer_state_dict``) give an optimizer without state its state: no parameter has
        a state yet, every group's ``lr`` is 0, and exactly the parameters that require grad have
        a gradient, all zeros. A learned rule's recurrent states would advance on it (and
        ``MetaLSTMOptimizer`` would have no loss), so :meth:`step` takes it as :meth:`init_state`.
        Reads the gradients' values only once the cheaper conditions hold."""
        if any(self.state.values()) or any(float(group["lr"]) != 0.0 for group in self.param_groups):
            return False
        params = [p for group in self.param_groups for p in group["params"]]
        if any((p.grad is not None) != p.requires_grad for p in params):
            return False
        grads = [p.grad for p in params if p.grad is not None]
        # agreed over the ranks holding parts of a sharded gradient, as the NaN/Inf verdict is
        return all(sharding.agree_finite(grads, _all_zero(grads)))

    def _rule_loss(self, loss: Any, source: str) -> Tensor | None:
        """The loss the rule reads, a 0-d tensor, from ``step``'s ``loss=`` or its closure's
        return value (``source`` names which, for the messages); None where the rule reads none."""
        if not self.rule.needs_loss:
            return None
        if loss is None:
            raise ValueError(
                f"{type(self).__name__}.step needs the loss: call step(closure) with a closure that "
                "returns it, or step(loss=loss)"
            )
        # torch.optim passes a closure's value back as it is: a (loss, outputs) tuple, a bool or a
        # complex number was read here, failing in torch's conversions or read as a loss (the
        # functional learned_step refuses the same)
        real_tensor = isinstance(loss, Tensor) and not loss.is_complex() and loss.dtype != torch.bool
        real_array = isinstance(loss, np.ndarray) and loss.dtype.kind in "fiu"
        if not (real_tensor or is_number(loss) or real_array):
            what = f"{str(loss.dtype).removeprefix('torch.')} tensor" if isinstance(loss, Tensor) else type(loss).__name__
            hint = ": return the loss alone" if source.startswith("the closure") and isinstance(loss, (tuple, list, dict)) else ""
            raise TypeError(
                f"{type(self).__name__} reads the loss as a real number or a one-element real tensor; {source} a {what}{hint}"
            )
        # a Python number is a double: read in float64 (as_tensor would round it to float32), so
        # float64 parameters' math sees it exactly and a finite one is never called Inf; on the
        # CPU, not the default device (``with torch.device("meta")`` would drop its value)
        if isinstance(loss, Tensor):
            loss = loss.detach()
            if loss.is_floating_point() and loss.dtype.itemsize == 1:
                # float8: torch has no isfinite or promotion for it (the step failed in them); float32 holds it exactly
                loss = loss.float()
        else:
            # a Python int or Fraction beyond float64's range is finite: saturated (as_tensor's OverflowError named no loss)
            loss = torch.as_tensor(real_as_float(loss) if is_number(loss) else loss, dtype=torch.float64, device="cpu")
        if sharding.is_sharded(loss):  # a DTensor loss (tensor parallelism): the same value on every rank
            loss = loss.full_tensor()
        if loss.numel() != 1:
            raise ValueError(f"the loss must be a scalar, got shape {tuple(loss.shape)}")
        if loss.is_meta and not all(p.is_meta for group in self.param_groups for p in group["params"]):
            # (a shape-only run of meta parameters reads one: see _loss_finite); torch's "Cannot copy
            # out of meta tensor; no data!" named no loss
            raise ValueError(
                f"the loss given to {type(self).__name__}.step is a tensor on the meta device, which holds no value, "
                "and the parameters are not; give the loss with its value (a CPU tensor, or loss.item())"
            )
        return loss.reshape(())

    def _loss_finite(self, loss: Tensor) -> bool:
        """Whether the loss is finite, agreed over the ranks that hold parts of a sharded
        parameter (a collective there), so that all of them skip or raise together."""
        params = [p for group in self.param_groups for p in group["params"]]
        finite = loss.is_meta or bool(torch.isfinite(loss))
        return all(sharding.agree_finite(params, [finite] * len(params)))

    def _gradients(self, index: int, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor], list[int]]:
        """The parameters of a group that have a gradient, their gradients and their positions in
        the group, after the checks of the gradients' kind (sparse, dtype)."""
        params, grads, positions = [], [], []
        for position, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"{type(self).__name__} does not support sparse gradients "
                    f"({self._param_name(index, group, position)}); use a dense embedding gradient"
                )
            if p.grad.dtype not in PARAM_DTYPES:  # only where p.grad_dtype = None lets it differ from p's
                raise RuntimeError(
                    f"the gradient of {self._param_name(index, group, position)} is {p.grad.dtype}; "
                    f"{type(self).__name__} reads {_PARAM_DTYPE_NAMES} gradients (a complex one "
                    "would be read as its real part)"
                )
            if not p.is_contiguous() and _expanded(sharding.local(p)):
                # torch's in-place update refuses it, part-way through the step
                raise RuntimeError(
                    f"{self._param_name(index, group, position)}, of strides {sharding.local(p).stride()}, has stride 0"
                    " in a dimension of size > 1 (an expanded tensor): its elements share memory, so no "
                    "step can update them apart; make it a parameter with memory of its own "
                    "(torch.nn.Parameter(t.clone())). No parameter or state was changed by this step"
                )
            params.append(p)
            # the local part of a gradient placed otherwise (Partial) is not the local gradient
            grads.append(sharding.placed_like(p.grad, p))
            positions.append(position)
        return params, grads, positions

    def _plan(
        self, index: int, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], positions: list[int], finite: list[bool]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """The parameters to update in a group and their gradients, after every input check:
        :meth:`_gradients`' and ``finite``, the verdict on each gradient (and, for a rule that
        reads it, parameter) being free of NaN/Inf, agreed over the ranks holding parts of a
        sharded one, applied under the group's ``nan_policy``."""
        if not grads:
            return params, grads
        if not all(finite):
            bad = [position for position, ok in zip(positions, finite, strict=True) if not ok]
            if group["nan_policy"] == "raise":
                what = "gradient or value" if self.rule.reads_param else "gradient"
                raise NonFiniteGradientError(
                    f"the {what} of {self._param_name(index, group, bad[0])} contains NaN or Inf "
                    f"({len(bad)} parameter(s) affected); nan_policy='raise', so no parameter or state "
                    "was changed. Use nan_policy='skip' to skip such tensors."
                )
            keep = [i for i, ok in enumerate(finite) if ok]
            params, grads = [params[i] for i in keep], [grads[i] for i in keep]
        return params, [_in_math_range(g, math_dtype(p.dtype)) for p, g in zip(params, grads, strict=True)]

    def _name_of(self, index: int, group: dict[str, Any], p: Tensor) -> str:
        """:meth:`_param_name` of ``p``, a parameter of group ``index`` (found by identity: for an
        error message)."""
        return self._param_name(index, group, next(i for i, q in enumerate(group["params"]) if q is p))

    @staticmethod
    def _param_name(index: int, group: dict[str, Any], position: int) -> str:
        names = group.get("param_names")
        shape = tuple(group["params"][position].shape)
        if names:
            return f"parameter {names[position]!r} (shape {shape})"
        return f"param_groups[{index}]['params'][{position}] (shape {shape})"

    def _hold_states(
        self,
        index: int,
        group: dict[str, Any],
        partitions: Partitions,
        flat_members: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], bool]] | None = None,
    ) -> dict[tuple[torch.device, torch.dtype], FlatState | list[dict[str, Any]]]:
        """The states each of group ``index``'s partitions updates: its flat buffers (made or
        rebuilt now, where parameters get their first state), or for the per-tensor path each
        parameter's state. Changes no value: a parameter given its state now takes its first step
        from it. Also copies the rule onto each partition's device and dtype. ``flat_members``:
        for a partition on a batched path, its :meth:`_flat_members` and whether its flat buffers
        were current, as the step's checks found them just before."""
        state_dtype = group["state_dtype"]
        held: dict[tuple[torch.device, torch.dtype], FlatState | list[dict[str, Any]]] = {}
        for (device, compute_dtype), (ps, _) in partitions.items():
            self._rule_on(device, compute_dtype)
            if group["foreach"] is False and not self._use_fused(group["backend"], device, compute_dtype, state_dtype, False):
                held[device, compute_dtype] = states = [self._state_of(p, state_dtype) for p in ps]
                for p, state in zip(ps, states, strict=True):  # checked (the step's checks) or made now
                    self._record_own_states(p, state)
            else:
                known = (flat_members or {}).get((device, compute_dtype))
                held[device, compute_dtype] = self._flat_state(index, group, device, compute_dtype, state_dtype, ps, known)
        return held

    def _update_group(
        self,
        index: int,
        group: dict[str, Any],
        partitions: Partitions,
        held: dict[tuple[torch.device, torch.dtype], FlatState | list[dict[str, Any]]],
        loss: Tensor | None,
        progress: _StepProgress,
    ) -> None:
        """Update group ``index``'s parameters, given as :func:`_partitions` of its plan, in
        the states :meth:`_hold_states` gave them (``held``). A fused
        kernel that fails is replaced by the PyTorch path for the tensors it had not updated (one
        that runs out of memory is not: that error is raised as it is). Under
        ``backend="triton"`` a failure before anything of this step was updated raises at once;
        a later one is appended to ``progress.kernel_failures`` for the caller to raise once the
        step is finished."""
        state_dtype = group["state_dtype"]
        for (device, compute_dtype), (ps, gs) in partitions.items():
            rule = self._rule_on(device, compute_dtype)
            lr = max(float(group["lr"]), 0.0)  # an LR scheduler's rounding error below 0 steps as 0
            loss_math = None if loss is None else _saturated(loss.to(device), compute_dtype)
            # maximising f is minimising -f: the rule sees -grad (in the update) and -loss
            loss_here = None if loss_math is None else loss_math * (-1 if group["maximize"] else 1)
            common = {"lr": lr, "loss": loss_here, "maximize": group["maximize"], "compute_dtype": compute_dtype}
            states = held[device, compute_dtype]
            if isinstance(states, FlatState) and self._use_fused(group["backend"], device, compute_dtype, state_dtype, group["foreach"]):
                ordered = _in_buffer_order(states, ps, gs)
                done: list[int] = []
                try:
                    fused_update_(
                        self.rule, *ordered, lr=lr, loss=loss_math, maximize=group["maximize"],
                        weights=self._fused_weights(device), block=_fused_block(), done=done,
                    )
                    progress.mark_written()
                except (torch.OutOfMemoryError, MemoryError):
                    # the step's error, not the kernel's (as in lstm_step's compiled code): raised as
                    # it is, not wrapped as a kernel failure, nor finished on the PyTorch path (which
                    # needs more memory than the kernel); runs updated before it block the next step
                    if done:
                        progress.mark_written()
                    raise
                except Exception as err:  # a kernel that fails to compile on this machine
                    if done:
                        progress.mark_written()
                    if group["backend"] == "triton":
                        if not done and not progress.updated:
                            raise RuntimeError(
                                f"backend='triton': the fused kernel failed ({err!r}); no parameter or state was changed"
                            ) from err
                        progress.kernel_failures.append(err)
                    else:
                        warnings.warn(f"fused Triton update failed ({err!r}); using the PyTorch path", stacklevel=3)
                        self._fused_failed = True
                    # the runs the kernel already updated must not be stepped a second time
                    ordered_ps, ordered_gs, buffers, offsets = ordered
                    rest = sorted(set(range(len(ordered_ps))) - set(done))
                    flat_update_(
                        rule, [ordered_ps[i] for i in rest], [ordered_gs[i] for i in rest], buffers,
                        [offsets[i] for i in rest], chunk=self.chunk, before_write=progress.mark_written, **common,
                    )  # fmt: skip
            elif isinstance(states, FlatState):
                flat_update_(rule, *_in_buffer_order(states, ps, gs), chunk=self.chunk, before_write=progress.mark_written, **common)
            else:
                local_ps, local_gs = [sharding.local(p) for p in ps], [sharding.local(g) for g in gs]
                single_tensor_update_(rule, local_ps, local_gs, states, before_write=progress.mark_written, **common)
            progress.mark_written()  # a partition of no coordinates (0-element tensors) counts its steps
            self._finish_partitions([(group, ps, lr)], progress)

    def _use_fused(
        self, backend: str, device: torch.device, compute_dtype: torch.dtype, state_dtype: torch.dtype, foreach: bool | None = None
    ) -> bool:
        """Whether this partition runs the fused kernel; explicit ``"triton"`` raises if it cannot,
        and ``"auto"`` leaves ``foreach=False`` to the per-tensor reference it asks for."""
        if backend == "torch" or (backend == "auto" and foreach is False):
            return False
        if backend == "auto" and (
            device.type != "cuda" or self._fused_failed or not kernels.FUSED_UPDATES_AVAILABLE or not kernels.GPU_VALIDATED
        ):
            return False  # the interpreter is for tests, and an unvalidated GPU kernel is opt-in
        problems = []
        if not _fused_rule(self.rule):
            problems.append(f"the rule is {_rule_name(self.rule)} {self.rule.config_dict()}")
        if compute_dtype != torch.float32:
            problems.append("float64 parameters")
        if state_dtype not in (torch.float32, torch.bfloat16):
            problems.append(f"state_dtype {state_dtype}")
        if device.type != "cuda" and not _triton_interpreted():
            problems.append(f"{device} tensors (needs CUDA, or TRITON_INTERPRET=1 set before import)")
        if problems and backend == "triton":
            raise RuntimeError(f"backend='triton' cannot run this step: {'; '.join(problems)}")
        return not problems

    def _fused_weights(self, device: torch.device) -> object:
        """The rule's weights packed for its kernel on ``device`` (cached until they change)."""
        version = self._rule_version()
        cached = self._packed_weights.get(device)
        if cached is None or cached[0] != version:
            cfg = self.rule.config
            if isinstance(self.rule, MetaLSTMCell):
                from ..kernels import meta_lstm_step as kernel

                packed = kernel.pack_weights(kernel.rule_weights(self.rule, device), hidden_size=cfg.hidden_size)
            else:
                from ..kernels import coordinate_lstm_step as kernel

                packed = kernel.pack_weights(
                    kernel.rule_weights(self.rule, device),
                    num_layers=cfg.num_layers,
                    hidden_size=cfg.hidden_size,
                    num_inputs=kernel.feature_count(cfg.momentum_decays, cfg.rms_decays, cfg.param_input),
                )
            cached = (version, packed)
            self._packed_weights[device] = cached
        return cached[1]

    def _state_of(self, p: Tensor, state_dtype: torch.dtype) -> dict[str, Any]:
        state = self.state[p]
        if "step" not in state:
            # made before "step" is set: a state whose making ran out of memory is made again; one
            # put with every rule state but no count is kept, counting from 0, as the batched path keeps it
            specs = self.rule.state_spec()
            whole = all(name in state for name in specs)
            initial = {} if whole else self.rule.init_state(sharding.local(p).numel(), dtype=state_dtype, device=p.device)
            state["step"] = _new_step()
            state.update(initial)
        flatten_parameter_shaped(self.rule, state, p)
        check_states(self.rule, state, p)
        self._check_reshaped(p)  # and records the shape of a state made now (init_state)
        # a group's state_dtype changed since, or a state put there on another device: as the flat path copies it
        device = sharding.local(p).device
        for name, spec in self.rule.state_spec().items():
            value = state.get(name)
            if isinstance(value, Tensor) and (value.dtype != spec.dtype(state_dtype) or value.device != device):
                state[name] = value.to(device=device, dtype=spec.dtype(state_dtype))
        return state

    def _record_own_states(self, p: Tensor, state: dict[str, Any]) -> None:
        """Record ``state``'s rule states as those the per-tensor path holds for ``p``: checked or
        made by the optimizer, so that the next step need not check them for NaN/Inf again. Weak
        references: a state deleted or replaced since is not kept alive here."""
        self._own_states[id(p)] = [
            (name, weakref.ref(value), value.data_ptr(), value.shape)
            for name in self.rule.state_spec()
            if isinstance(value := state.get(name), Tensor)
        ]

    def _holds_own_states(self, p: Tensor) -> bool:
        """Whether ``self.state[p]``'s rule states are those :meth:`_record_own_states` recorded,
        the same tensors pointing where they did with their shape: none assigned since (``.data =``
        or ``set_`` moves one). As :meth:`FlatState.backs` tells for the batched path, values
        written in place into them are not seen."""
        made, entry = self._own_states.get(id(p)), self.state.get(p)
        if made is None or entry is None or len(made) != len(self.rule.state_spec()):
            return False
        return still_in_place(entry, ((name, ref(), ptr, shape) for name, ref, ptr, shape in made))

    def _flat_state(
        self,
        index: int,
        group: dict[str, Any],
        device: torch.device,
        compute_dtype: torch.dtype,
        state_dtype: torch.dtype,
        stepping: list[Tensor],
        known: tuple[list[Tensor], bool] | None = None,
    ) -> FlatState:
        """The group's flat buffers for one (device, compute dtype), rebuilt when stale: the
        parameters with state and those ``stepping`` now (not one skipped for a NaN gradient).
        ``known``: those parameters and whether the buffers were current, found since the
        states last changed."""
        members, current = known if known is not None else (self._flat_members(group, device, compute_dtype, stepping), False)
        for p in members:
            state = self.state[p]
            if "step" not in state:
                state["step"] = _new_step()
        key = (index, device, compute_dtype)
        flat = self._flat_states.get(key)
        if flat is None or not (current or flat.is_current(members, self.state, state_dtype, self.rule.state_spec())):
            flat = FlatState(self.rule, members, self.state, state_dtype, device)
            self._flat_states[key] = flat
            # buffers that no longer back their members' states would otherwise be kept alive
            # here: the parameters moved to another device or dtype, or to another group index
            # (a param group removed from param_groups: its successors' old buffers)
            for other in [k for k in self._flat_states if k != key]:
                stale = self._flat_states[other]
                if not stale.is_current(stale.members, self.state, stale.dtype):
                    del self._flat_states[other]
        return flat

    def _drop_stale_flat_states(self, group_ids: list[set[int]]) -> None:
        """Drop the flat buffers of a param group taken out of ``param_groups``, those holding a
        parameter its group no longer lists (``group_ids``: each group's parameter ids), and those
        none of whose parameters has a state any more (``del optimizer.state[p]`` of a frozen
        group's, as one frees Adam's memory): a group that steps rebuilds its buffers anyway, but
        one popped, or none of whose parameters steps any more, kept the parameters taken out and
        the states for the optimizer's life.

        The states of a parameter taken out of its group stay in ``self.state``, as ``torch.optim``
        keeps them, as copies of their own where the buffers held other states too: views into
        the old buffers kept all of them alive, every other parameter's states too, once more at
        each parameter taken out. Those of a group taken out whole stay the views they were."""
        for key in [
            key
            for key, flat in self._flat_states.items()
            if key[0] >= len(group_ids)
            or not all(id(p) in group_ids[key[0]] for p in flat.members)
            or not any(self.state.get(p) for p in flat.members)
        ]:
            flat = self._flat_states.pop(key)
            listed = group_ids[key[0]] if key[0] < len(group_ids) else set()
            taken = [p for p in flat.members if id(p) not in listed and self.state.get(p)]
            if len(taken) == len(flat.members):
                continue  # their views hold exactly these buffers: a copy of them all would gain nothing
            for p in taken:
                entry = self.state[p]
                for name, buffer in flat.buffers.items():
                    value = entry.get(name)
                    if isinstance(value, Tensor) and _shares_storage(sharding.local(value), buffer):
                        entry[name] = value.clone()

    def _flat_members(
        self, group: dict[str, Any], device: torch.device, compute_dtype: torch.dtype, stepping: list[Tensor]
    ) -> list[Tensor]:
        """The parameters of a group whose states its flat buffers for one (device, compute dtype)
        hold, in group order: those with a state and those ``stepping`` now."""
        new = {id(p) for p in stepping}
        return [
            p
            for p in group["params"]
            if p.device == device and math_dtype(p.dtype) == compute_dtype and (id(p) in new or self.state.get(p))
        ]

    def _rule_version(self) -> tuple[tuple[int, int], ...]:
        """Changes whenever the rule's weights do: in place (the version counter) or replaced
        (``p.data = ...``, ``vector_to_parameters``: the storage). Caches of the weights in
        another form (packed for a kernel, copied to another device or dtype) key on it. An
        in-place change through ``p.data`` bumps neither, as for any module."""
        return tuple((p._version, p.data_ptr()) for p in self.rule.parameters())

    def _rule_on(self, device: torch.device, dtype: torch.dtype) -> UpdateRule:
        """The update rule with its weights on ``device`` in ``dtype`` (cached copies)."""
        first = next(self.rule.parameters())
        if first.device == device and first.dtype == dtype:
            return self.rule
        version = self._rule_version()
        cached = self._rule_copies.get((device, dtype))
        if cached is None or cached[0] != version:
            cached = (version, copy.deepcopy(self.rule).to(device=device, dtype=dtype))
            self._rule_copies[(device, dtype)] = cached
        return cached[1]


def _all_finite(tensors: list[Tensor]) -> list[bool]:
    """Whether each tensor (the local part of a ``DTensor``) is free of NaN/Inf
    (:func:`_non_finite`); True for ``meta`` and empty tensors."""
    return [found is None for found in _non_finite(tensors)]


def _non_finite(tensors: list[Tensor]) -> list[str | None]:
    """For each tensor (the local part of a ``DTensor``): ``"NaN"`` where it holds a NaN, else
    ``"Inf"`` where it holds an Inf, else None (so for ``meta`` and empty tensors, which hold no
    values to check): :func:`learnedopt.finite.non_finite`, one foreach 2-norm per device and
    dtype and one host sync per device. The step's check of its gradients (and parameters) and
    ``load_state_dict``'s of the loaded states."""
    return finite.non_finite(sharding.local_all(tensors))


def _shares_storage(value: Tensor, buffer: Tensor) -> bool:
    """Whether ``value`` is a view into ``buffer``'s memory (its storage)."""
    return not value.is_meta and value.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()


def _expanded(t: Tensor) -> bool:
    """Whether ``t`` has stride 0 in a dimension of size > 1 (``expand``'s views): elements that
    share memory, which torch's in-place operations refuse to write."""
    return any(stride == 0 and size > 1 for size, stride in zip(t.shape, t.stride(), strict=True))


def _all_zero(tensors: list[Tensor]) -> list[bool]:
    """Whether each tensor (the local part of a ``DTensor``) holds only zeros, with one host sync
    per device. ``meta`` tensors hold no values and count as zeros."""
    return _per_tensor(tensors, lambda t: torch.count_nonzero(t) == 0)


def _per_tensor(tensors: list[Tensor], check: Callable[[Tensor], Tensor]) -> list[bool]:
    """``check`` (a one-element bool tensor) of each tensor's local part, read with one host sync
    per device; True for ``meta`` tensors, which hold no values."""
    tensors = [sharding.local(t) for t in tensors]
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        if not t.is_meta:
            by_device.setdefault(t.device, []).append(i)
    flags = [True] * len(tensors)
    for indices in by_device.values():
        values = torch.stack([check(tensors[i]) for i in indices]).tolist()
        for i, flag in zip(indices, values, strict=True):
            flags[i] = flag
    return flags


def _in_math_range(grad: Tensor, dtype: torch.dtype) -> Tensor:
    """``grad`` as it is, or, where its dtype reaches beyond ``dtype``'s range (a float64 gradient
    of a float32 parameter, which ``p.grad_dtype = None`` allows), saturated into ``dtype``: a
    finite value beyond it would be Inf in that math, and the parameter and its states NaN."""
    if grad.dtype == dtype or torch.finfo(grad.dtype).max <= torch.finfo(dtype).max:
        return grad
    return _saturated(grad, dtype)


def _saturated(value: Tensor, dtype: torch.dtype) -> Tensor:
    """``value`` in ``dtype``, a finite value beyond its range saturated at its largest (a float64
    loss over 3.4e38 would be Inf in float32 math, and a rule's zero weight on it NaN)."""
    largest = torch.finfo(dtype).max
    return value.to(torch.promote_types(value.dtype, dtype)).clamp(-largest, largest).to(dtype)


#: (device, compute dtype) -> (parameters, their gradients): the units of one step's update
Partitions = dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]]
#: (param group index, (device, compute dtype)): one group's partition
_PartitionKey = tuple[int, tuple[torch.device, torch.dtype]]


def _partitions(params: list[Tensor], grads: list[Tensor]) -> Partitions:
    """``params`` and their ``grads`` grouped by (device, compute dtype), the unit of one update."""
    partitions: Partitions = {}
    for p, g in zip(params, grads, strict=True):
        bucket = partitions.setdefault((p.device, math_dtype(p.dtype)), ([], []))
        bucket[0].append(p)
        bucket[1].append(g)
    return partitions


def _in_buffer_order(flat: FlatState, params: list[Tensor], grads: list[Tensor]) -> tuple[list[Tensor], list[Tensor], Any, list[int]]:
    """``(params, grads, buffers, offsets)`` sorted by position in the flat buffers (the local
    shards of ``DTensor``s)."""
    if len(params) == len(flat.members) and all(p is q for p, q in zip(params, flat.members)):  # every member, in order
        return sharding.local_all(params), sharding.local_all(grads), flat.buffers, list(flat.offsets)
    order = sorted(range(len(params)), key=lambda i: flat.index[id(params[i])])
    offsets = [flat.offsets[flat.index[id(params[i])]] for i in order]
    return sharding.local_all([params[i] for i in order]), sharding.local_all([grads[i] for i in order]), flat.buffers, offsets


@dataclass
class _StepProgress:
    """How far one ``step()`` has gone: whether any partition was updated, whether anything (a
    state, a parameter) was written, how many parameter tensors took the whole step, and the
    errors of ``backend="triton"`` kernels that failed after that (the step finished on the
    PyTorch path)."""

    updated: bool = False
    written: bool = False
    partial: bool = False  # something of the partition being updated was written
    stepped: int = 0
    kernel_failures: list[Exception] = field(default_factory=list)

    def mark_written(self) -> None:
        self.written = self.partial = True


def _fused_rule(rule: UpdateRule) -> bool:
    """Whether a fused kernel implements this rule: CoordinateLSTM or MetaLSTMCell, every
    configuration; not a subclass of them, whose own ``forward`` the kernels would not run."""
    return type(rule) in (CoordinateLSTM, MetaLSTMCell)


def _rule_name(rule: UpdateRule) -> str:
    """The rule's kind, and its class where that is another (a subclass keeping its base's kind)."""
    name = type(rule).__name__
    return rule.kind if name == rule.kind else f"{name} (kind {rule.kind})"


def _triton_interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter, as the kernel modules were built: Triton
    reads ``TRITON_INTERPRET`` when ``@triton.jit`` runs, in its own way (``"false"`` or ``"off"``
    is off), so the variable as it is now can say otherwise."""
    if not kernels.FUSED_UPDATES_AVAILABLE:
        return False
    from ..kernels.coordinate_lstm_step import is_interpreted

    return is_interpreted()


def _saved_rule(state_dict: dict[str, Any]) -> dict[str, Any] | None:
    """The fingerprint of the rule a state dict was saved under: its own ``"learned_rule"``, or
    (where ``torch.distributed.checkpoint``'s helpers dropped that) the first param group's JSON
    copy; None in a state dict of an earlier version, which had neither."""
    saved = state_dict.get("learned_rule")
    if saved is None:
        groups = state_dict.get("param_groups") or [{}]
        text = groups[0].get("learned_rule") if isinstance(groups[0], dict) else None
        saved = json.loads(text) if isinstance(text, str) else None
    return None if saved is None else _as_json(saved)


def _as_json(value: Any) -> Any:
    """``value`` as read back from JSON (tuples become lists), so that a fingerprint read from
    the JSON copy compares equal to the rule's own."""
    return json.loads(json.dumps(value, sort_keys=True))


def _loaded_step(step: Any, index: int | None, *, what: str | None = None) -> Tensor:
    """A saved step count as the float32 scalar tensor a step increments (torch.optim's
    optimizers convert a number the same way); anything else is rejected before loading.
    ``what`` names the count in the errors where it is not the saved one of parameter ``index``
    (one put in ``optimizer.state`` by hand)."""
    what = f"saved 'step' of parameter {index}" if what is None else what
    if isinstance(step, Tensor) and step.is_meta:  # .item() raised torch's error, naming nothing
        raise ValueError(
            f"{what} is on the meta device, which holds no value (a state dict "
            "read with torch.load(map_location='meta')?); load one whose counts hold their values"
        )
    value = step.item() if isinstance(step, Tensor) and step.numel() == 1 and not step.is_complex() else step
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not value >= 0:
        raise ValueError(f"{what} must be a non-negative number, got {step!r}")
    return torch.tensor(float(value), dtype=torch.float32, device="cpu")


def _is_step_count(step: Any) -> bool:
    """Whether ``step`` has the form of the counts the optimizer makes and loads (a float32
    scalar tensor with a value), which a step increments in place. Read for every parameter at
    every step: its cheapest form (a subclass of Tensor is converted, as a number is)."""
    return type(step) is Tensor and step.dtype is torch.float32 and step.dim() == 0 and not step.is_meta


def _new_step() -> Tensor:
    """A parameter's step count before its first step: a float32 scalar on the CPU, as
    ``torch.optim.Adam`` hosts it, whatever the default device (a count on the ``meta`` device
    that ``with torch.device("meta")`` sets would hold no value) or dtype (a loaded count is
    float32 too)."""
    return torch.zeros((), dtype=torch.float32, device="cpu")


#: relative to a group's ``initial_lr``: a schedule decaying to 0 that lands below it by less is taken as 0
SCHEDULER_ROUNDING = 16 * torch.finfo(torch.float64).eps


def _scheduler_rounding(lr: float, options: dict[str, Any]) -> bool:
    """Whether a negative ``lr`` is an LR scheduler's rounding error around 0 (``LinearLR`` with
    ``end_factor=0`` ends at about -1e-17 for many settings; torch.optim steps with it): within
    :data:`SCHEDULER_ROUNDING` of the ``initial_lr`` that schedulers record in each group."""
    initial = options.get("initial_lr")
    return initial is not None and -lr <= SCHEDULER_ROUNDING * abs(float(initial))


def _check_lr_fits(lr: float, params: list[Tensor]) -> None:
    """Raise ValueError where ``lr`` exceeds the largest value of a parameter's dtype: the update
    ``param.add_(step, alpha=lr)`` converts it to that dtype and would fail part-way through the
    step (e.g. lr 1e5 for float16), after other tensors and states had been updated."""
    for dtype in {p.dtype for p in params}:
        largest = torch.finfo(dtype).max
        if lr > largest:
            raise ValueError(
                f"Invalid lr: {lr} is above the largest {dtype} value ({largest:.4g}), the dtype of "
                "parameters it updates; no parameter or state was changed"
            )


def _fused_block() -> int:
    # the interpreter pays per program instance, a GPU per register: see the kernel's docstring
    return 1024 if _triton_interpreted() else 64


def _validate_options(options: dict[str, Any]) -> None:
    """Raise ValueError for the first invalid option; a ``state_dtype`` given by name (as
    :meth:`LearnedOptimizer.state_dict` writes it) becomes the dtype, in place."""
    if isinstance(options["state_dtype"], str):
        options["state_dtype"] = getattr(torch, options["state_dtype"].removeprefix("torch."), options["state_dtype"])
    lr = options["lr"]
    # any real number (numpy's too: a scheduler's lambda may return one), as torch.optim takes
    if not isinstance(lr, (numbers.Real, Tensor)) or isinstance(lr, bool) or (isinstance(lr, Tensor) and lr.numel() != 1):
        raise ValueError(f"Invalid lr: {lr!r} (expected a non-negative number)")  # noqa: TRY004 (as torch.optim)
    if isinstance(lr, Tensor) and lr.is_meta:  # torch.tensor(lr) under torch.device("meta") is one
        raise ValueError(
            "Invalid lr: a tensor on the meta device, which holds no value to step with; give a number, "
            "or a tensor with a value (torch.tensor(lr, device='cpu'))"
        )
    if not (float(lr) >= 0.0 or _scheduler_rounding(float(lr), options)):
        raise ValueError(f"Invalid lr: {float(lr)} (must be >= 0; it multiplies the learned step)")
    if not math.isfinite(float(lr)):
        raise ValueError(f"Invalid lr: {float(lr)} (must be finite; it multiplies the learned step)")
    # groups saved or pickled before the option existed decay nothing
    decay = options.setdefault("weight_decay", 0.0)
    if not isinstance(decay, numbers.Real) or isinstance(decay, bool) or not (math.isfinite(decay) and decay >= 0):
        raise ValueError(f"Invalid weight_decay: {decay!r} (a finite number >= 0)")
    if options["state_dtype"] not in STATE_DTYPES:
        raise ValueError(f"Invalid state_dtype: {options['state_dtype']} (choose from {STATE_DTYPES})")
    if options["nan_policy"] not in NAN_POLICIES:
        raise ValueError(f"Invalid nan_policy: {options['nan_policy']!r} (choose from {NAN_POLICIES})")
    if options["backend"] not in BACKENDS:
        raise ValueError(f"Invalid backend: {options['backend']!r} (choose from {BACKENDS})")
    if options["backend"] == "triton" and not kernels.FUSED_UPDATES_AVAILABLE:
        raise ValueError("backend='triton' is not available: Triton is not installed; use backend='torch' or 'auto'")
    if options["foreach"] not in (None, True, False):
        raise ValueError(f"Invalid foreach: {options['foreach']!r} (None, True or False)")
    # a string from a config file, "false" or "no", is truthy and would silently ascend
    if options["maximize"] not in (True, False):
        raise ValueError(f"Invalid maximize: {options['maximize']!r} (True or False)")
