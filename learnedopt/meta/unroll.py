"""The functional, differentiable unroll of a learned update rule on a meta-batch of tasks.

Optimizee parameters live as a dict of tensors stacked over the meta-batch: ``params[name]`` has
shape ``(B, *shape)``, task ``b``'s tensor being ``params[name][b]``. The losses are computed by
the tasks (with ``torch.func.functional_call`` where the optimizee is an ``nn.Module``, see
:mod:`learnedopt.meta.tasks`), so the unroll is one graph from the rule's meta-parameters through
every update to every loss, and ``meta_loss.backward()`` gives the meta-gradient.

Coordinates are flattened task-major into one ``(n,) = (B * P,)`` batch for the rule, ``P`` being
the number of parameter elements of one task: coordinate ``b * P + j`` is element ``j`` of task
``b``'s parameters concatenated in ``params``' key order. Rule states follow the same order.

:func:`learned_step` is one such update of one optimizee's parameter dict (not stacked), for an
inner loop of your own (``torch.func.functional_call``, ``torch.autograd.grad``) without tasks;
:func:`init_rule_state` gives its first states.

``backend`` picks how a :class:`~learnedopt.nn.CoordinateLSTM` (any feature set) or a
:class:`~learnedopt.nn.MetaLSTMCell` is applied: the PyTorch module (``"torch"``) or its input
features in PyTorch (the rule's ``features``, a few elementwise ops differentiated by autograd)
followed by the differentiable Triton kernels of :mod:`learnedopt.kernels.coordinate_lstm_backward`
or :mod:`learnedopt.kernels.meta_lstm_backward` for the rest (``"triton"``; first-order: the
meta-gradient needs one backward through each rule call, which is all they provide). ``"auto"`` takes the
kernels only on CUDA once :data:`learnedopt.kernels.GPU_VALIDATED` says their CUDA tests passed on
real hardware, and the PyTorch path otherwise; it never fails where the PyTorch path works.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import kernels
from ..errors import NonFiniteGradientError
from ..finite import all_finite
from ..nn import CoordinateLSTM, MetaLSTMCell, State, UpdateRule
from ..values import check_bool, is_integer, is_number, real_as_float
from ..autocast import without_autocast
from ..nn.precision import math_dtype
from .tasks import TaskBatch

Params = dict[str, Tensor]

#: Values of the ``backend`` keyword of :func:`unroll` and :func:`truncated_unroll`.
BACKENDS = ("auto", "torch", "triton")

#: Values of :func:`learned_step`'s ``nan_policy``: no check, or :class:`NonFiniteGradientError`.
NAN_POLICIES = (None, "raise")

#: Values of :func:`horizon_loss_weights`' ``weighting``.
LOSS_WEIGHTINGS = ("uniform", "linear", "quadratic")


def horizon_loss_weights(weighting: str, horizon: int) -> Tensor:
    """``(horizon,)`` float32 weights ``w_t`` of the losses after updates ``t = 1 .. H``, mean 1.

    ``"uniform"``: every ``w_t = 1`` (Andrychowicz et al. 2016: the meta-loss is the mean loss of
    the run). ``"linear"``: ``w_t = 2 t / (H + 1)``, rising from about 0 to about 2, so the
    meta-loss leans toward the end of the run, where a final loss is measured, while every step
    still counts. ``"quadratic"``: ``w_t = 6 t^2 / ((H + 1)(2H + 1))``, rising from about 0 to
    about 3, leaning further toward the end.
    """
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}")
    if not is_integer(horizon) or horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon!r} (an integer)")
    if weighting == "uniform":
        return torch.ones(horizon)
    t = torch.arange(1, horizon + 1, dtype=torch.float64)
    if weighting == "linear":
        return (t * (2.0 / (horizon + 1))).float()
    return (t**2 * (6.0 / ((horizon + 1) * (2 * horizon + 1)))).float()


@dataclass
class UnrollResult:
    """What :func:`unroll` returns.

    Attributes:
        meta_loss: scalar, ``mean_{t, b} w_t * losses[t, b]``; differentiable w.r.t. the rule.
        losses: ``(steps, B)``; ``losses[t, b]`` is task ``b``'s loss after update ``t``, i.e. at
            the parameters produced by step ``start_step + t`` on the minibatch of step index
            ``start_step + t + 1`` (the one the next update reads).
        params: the parameters after the last update, ``(B, *shape)`` per name.
        rule_state: the rule's states after the last update, ``(lead, B * P, *trail)`` per name.
    """

    meta_loss: Tensor
    losses: Tensor
    params: Params
    rule_state: State


def num_coordinates(params: Mapping[str, Tensor]) -> int:
    """``B * P``: all parameter elements of all tasks of a stacked parameter dict."""
    return sum(v.numel() for v in params.values())


def init_rule_state(rule: UpdateRule, params: Mapping[str, Tensor]) -> State:
    """The rule's initial states for every coordinate of ``params``, for :func:`learned_step`.

    Args:
        rule: the update rule.
        params: one optimizee's parameters, any shapes, of one floating-point dtype and device.

    Returns:
        ``rule.init_state(P, ...)``: ``(*lead, P, *trail)`` per state name (:meth:`UpdateRule.state_spec`),
        ``P`` being the number of elements of all tensors of ``params``, coordinate ``j`` the
        ``j``-th element of their concatenation in dict order; zeros on their device, in the
        dtype the rule's math runs in (:func:`~learnedopt.nn.precision.math_dtype`): float64 for
        float64 parameters, float32 for float32, bfloat16 and float16 ones (as the optimizers'
        default ``state_dtype``).

    Raises:
        ValueError: ``params`` is empty, not floating-point, or of more than one dtype or device.
    """
    first = _check_params(params, "init_rule_state")
    return rule.init_state(num_coordinates(params), dtype=math_dtype(first.dtype), device=first.device)


def learned_step(
    rule: UpdateRule,
    params: Mapping[str, Tensor],
    grads: Mapping[str, Tensor],
    state: State,
    *,
    loss: Tensor | float | None = None,
    lr: float = 1.0,
    backend: str = "auto",
    nan_policy: str | None = None,
) -> tuple[dict[str, Tensor], State]:
    """One differentiable learned update of one optimizee: ``params + lr * step``.

    The update ``LSTMOptimizer`` / ``MetaLSTMOptimizer`` take (``lr`` as theirs, not maximising)
    and one step of :func:`unroll`, as a pure function for an inner loop of your own: nothing is
    detached or changed in place, so the new parameters are differentiable with respect to the
    rule's weights, the old parameters, the states, the loss and the gradients (build them with
    ``torch.autograd.grad(..., create_graph=True)`` for the second-order terms). As in
    :func:`unroll`, a NaN or Inf gradient flows into the step unchecked unless
    ``nan_policy="raise"`` asks for the check. As in the optimizers, the rule runs in float64 for
    float64 parameters and in float32 for float32, bfloat16 and float16 ones
    (:func:`~learnedopt.nn.precision.math_dtype`), the new parameters being rounded back to their
    dtype. The rule's weights are not copied to that dtype or the parameters' device: they must
    be in them already.

    Args:
        rule: the update rule, its weights in the math dtype and on the parameters' device.
        params: one optimizee's parameters, any shapes; coordinate ``j`` is the ``j``-th element of
            their concatenation in dict order.
        grads: the gradient of the loss for each of ``params``, same names, shapes and dtype.
        state: the rule's states, in the math dtype, ``(*lead, P, *trail)`` per name for the
            ``P`` coordinates of ``params``: :func:`init_rule_state` at the first step, then what
            the last step returned.
        loss: the optimizee's loss, for rules with ``needs_loss`` (MetaLSTMCell): a number or a
            one-element tensor on the parameters' device (the rule reads it in the math dtype,
            saturated at its largest value, as the optimizers do); ignored by other rules.
        lr: multiplier of the rule's step: a number, or a one-element tensor (differentiable:
            a learned step size) on the parameters' device or the CPU.
        backend: ``"torch"``, ``"triton"`` or ``"auto"``, as for :func:`unroll`.
        nan_policy: None (default): no check, as in :func:`unroll`, whose NaN or Inf reaches the
            meta-loss and its gradient (which ``meta-train`` refuses to step on). ``"raise"``:
            the optimizers' check before the rule runs (a host sync, and one more for a loss
            tensor the rule reads): a NaN or Inf loss the rule reads, gradient, or parameter
            value of a rule that reads them (``reads_param``) raises
            :class:`~learnedopt.NonFiniteGradientError` naming it. ``"skip"`` (the optimizers'
            other policy) is refused: a functional step returns every parameter's update.

    Returns:
        ``(new_params, new_state)``: a dict of the same names, shapes and order as ``params``,
        and the states after the step, shaped as ``state``.

    Raises:
        ValueError: an unknown ``backend``; ``params`` empty or not floating-point; ``grads``
            whose names or shapes are not ``params``'; states of other names or shapes than the
            rule's for ``P`` coordinates; sparse gradients; parameters and gradients of more than one dtype, states
            or rule weights not in the math dtype, or any of them on more than one device; no
            loss for a rule that needs it, or a loss that is not one real number on the
            parameters' device; a ``nan_policy`` other than None and ``"raise"``; an ``lr`` that
            is not a finite number or a one-element floating-point tensor on the parameters'
            device or the CPU.
        TypeError: ``params``, ``grads`` or ``state`` not a dict (a mapping) of names to tensors.
        NonFiniteGradientError: under ``nan_policy="raise"``, a NaN or Inf loss (read by the
            rule), gradient or (read by the rule) parameter value; nothing is computed.
        RuntimeError: ``nan_policy="raise"`` on tensors batched by ``torch.func.vmap``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if nan_policy not in NAN_POLICIES:
        skip = " ('skip' is the optimizers': a functional step returns every parameter's update)" if nan_policy == "skip" else ""
        raise ValueError(f"nan_policy must be None or 'raise', got {nan_policy!r}{skip}")
    first = _check_params(params, "learned_step")
    lr = _check_lr(lr, "learned_step", first.device)
    if not isinstance(grads, Mapping):
        raise TypeError(f"learned_step: grads must be a dict with the names of params, got a {type(grads).__name__}")
    names = list(params)
    missing, extra = [k for k in names if k not in grads], [k for k in grads if k not in params]
    if missing or extra:
        raise ValueError(f"grads must have the names of params: missing {missing}, not in params {extra}")
    for k in names:
        grad = grads[k]
        if not isinstance(grad, Tensor):
            raise ValueError(f"grads[{k!r}] is {grad!r}, not a tensor (a parameter the loss does not use has no gradient)")  # noqa: TRY004 (one error for every malformed input)
        if grad.layout != torch.strided:  # torch.cat/reshape failed: "reshape is not implemented for sparse tensors"
            raise ValueError(
                f"learned_step: grads[{k!r}] is sparse ({grad.layout}): learned updates need dense gradients "
                f"(grads[{k!r}].to_dense())"
            )
        if grad.shape != params[k].shape:
            raise ValueError(f"grads[{k!r}] has shape {tuple(grad.shape)}, params[{k!r}] {tuple(params[k].shape)}")
    n = num_coordinates(params)
    _check_state(rule, state, n)
    _check_one_dtype_and_device(rule, params, state, grads=grads, caller="learned_step")
    compute = math_dtype(first.dtype)
    rule_loss = _step_loss(rule, loss, first.device, compute)
    if nan_policy == "raise":
        _require_finite(rule, params, grads, loss)
    shapes = [params[k].shape for k in names]
    sizes = [params[k].numel() for k in names]
    # autocast off for the whole step, not only the rule: torch.cat of bfloat16 parameters inside
    # a float16 region (or the reverse) raised autocast's "Unexpected floating ScalarType"
    with without_autocast({first.device.type}):
        flat_param = torch.cat([params[k].reshape(-1) for k in names]).to(compute)  # no copy or graph node for float32, float64
        flat_grad = torch.cat([grads[k].reshape(-1) for k in names]).to(compute)
        step, new_state = _apply_rule(rule, flat_grad, flat_param, dict(state), rule_loss, backend)
        new_flat = (flat_param + lr * step).to(first.dtype)
    new_params = {
        k: piece.reshape(shape) for k, piece, shape in zip(names, new_flat.split(sizes), shapes, strict=True)
    }
    return new_params, new_state


def _require_finite(
    rule: UpdateRule, params: Mapping[str, Tensor], grads: Mapping[str, Tensor], loss: Tensor | float | None
) -> None:
    """Raise :class:`NonFiniteGradientError` naming the first NaN or Inf among what ``rule``
    reads: the ``loss`` as given (checked by :func:`_step_loss`; before saturation, so an Inf is
    not read as the largest float, as the optimizers check it), the ``grads``, and the ``params``
    where the rule reads them; as the optimizers' ``nan_policy="raise"`` does."""
    checked = [(f"the gradient of params[{k!r}]", grads[k]) for k in params]
    if rule.reads_param:  # a rule that reads the parameter would carry a NaN/Inf value into its state
        checked += [(f"the value of params[{k!r}]", params[k]) for k in params]
    value = None
    if rule.needs_loss:
        value = _without_float8(loss) if isinstance(loss, Tensor) else torch.tensor(real_as_float(loss), dtype=torch.float64)
    if any(_is_vmapped(t) for t in ([] if value is None else [value]) + [t for _, t in checked]):
        # the check failed inside torch: "Batching rule not implemented for aten::_foreach_norm"
        raise RuntimeError(
            "learned_step: nan_policy='raise' does not run under torch.func.vmap (its check reads the values on the "
            "host, and one task's NaN cannot stop the others): check the tasks outside vmap, or pass nan_policy=None"
        )
    # the loss and every tensor judged at once: one foreach 2-norm per dtype, one host sync
    flags = all_finite(([] if value is None else [value]) + [t for _, t in checked])
    if value is not None and not flags.pop(0):
        raise NonFiniteGradientError(f"learned_step: the loss is {value.item()}; nan_policy='raise', so nothing was computed")
    bad = [(what, t) for (what, t), ok in zip(checked, flags, strict=True) if not ok]
    if bad:
        what, tensor = bad[0]
        raise NonFiniteGradientError(
            f"learned_step: {what} (shape {tuple(tensor.shape)}) contains NaN or Inf ({len(bad)} tensor(s) affected); "
            "nan_policy='raise', so nothing was computed"
        )


def _is_vmapped(tensor: Tensor) -> bool:
    """Whether ``tensor`` is batched by a ``torch.func.vmap``, at any level of nested transforms
    (a ``grad`` inside a ``vmap`` wraps the batched tensor in one of its own)."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(tensor):
        if functorch.is_batchedtensor(tensor):
            return True
        tensor = functorch.get_unwrapped(tensor)
    return False


def _check_params(params: Mapping[str, Tensor], caller: str) -> Tensor:
    """The first of one optimizee's ``params``, once checked to be floating-point tensors of one
    dtype and device; raises ValueError naming what is wrong."""
    if not params:
        raise ValueError(f"{caller}: params is empty: give at least one parameter tensor")
    _check_float_tensors(params, caller)
    first_name, first = next(iter(params.items()))
    for what in ("dtype", "device"):
        for k, v in params.items():
            if getattr(v, what) != getattr(first, what):
                raise ValueError(
                    f"{caller}: params[{k!r}] is {getattr(v, what)}, params[{first_name!r}] "
                    f"{getattr(first, what)}: the parameters need one {what}"
                )
    return first


def _check_float_tensors(params: Mapping[str, Tensor], caller: str) -> None:
    """Raise TypeError unless ``params`` is a mapping (a list of tensors, as torch.optim takes
    them, had no ``.items()``), ValueError unless its values are floating-point tensors."""
    if not isinstance(params, Mapping):
        raise TypeError(f"{caller}: params must be a dict of names to tensors (as torch.func.functional_call takes), "
                        f"got a {type(params).__name__}")  # fmt: skip
    for k, v in params.items():
        if not isinstance(v, Tensor) or not v.is_floating_point():
            got = v.dtype if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"{caller}: params[{k!r}] is {got}: learned updates need floating-point tensors")


def _check_lr(lr: float | Tensor, caller: str, device: torch.device) -> float | Tensor:
    """``lr``, a one-element tensor as a 0-dim view of it (a ``(1, 1)`` one broadcast the step
    to ``(1, n)``, split then along the wrong dimension), once checked; raises ValueError unless
    ``lr`` is a finite real number or a one-element floating-point tensor (whose value is not
    checked: that would be a host sync) on ``device`` (the parameters') or the CPU (torch's CPU
    scalar, which any device's tensors take)."""
    if isinstance(lr, Tensor):
        ok = lr.is_floating_point() and lr.numel() == 1
    else:
        ok = is_number(lr) and math.isfinite(lr)
    if not ok:
        raise ValueError(f"{caller}: lr must be a finite real number or a one-element floating-point tensor, got {lr!r}")
    if isinstance(lr, Tensor) and lr.device != device and lr.device.type != "cpu":
        # the step failed with torch's "Tensor on device cpu is not on the expected device meta!"
        raise ValueError(f"{caller}: lr is a tensor on {lr.device}, the parameters on {device}: put it on their device, or give a number")
    return lr.reshape(()) if isinstance(lr, Tensor) else lr


def _check_loss_weights(loss_weights: Sequence[float] | Tensor | None, steps: int) -> Tensor | None:
    """``loss_weights`` as a ``(steps,)`` tensor (None stays None), once checked to be real,
    finite and ``>= 0``; raises ValueError naming the first bad weight (a NaN made the meta-loss
    NaN, a negative weight rewarded a high loss)."""
    if loss_weights is None:
        return None
    weights = torch.as_tensor(loss_weights)
    if not isinstance(loss_weights, Tensor) and weights.is_floating_point():
        # Python floats as float64, not the default float32: a float64 unroll's meta-loss used
        # weights rounded to float32 (the unroll casts them to its losses' dtype)
        weights = torch.as_tensor(loss_weights, dtype=torch.float64)
    if tuple(weights.shape) != (steps,):
        raise ValueError(f"loss_weights must have shape ({steps},), got {tuple(weights.shape)}")
    if weights.is_complex():
        raise ValueError(f"loss_weights must be real numbers, got {weights.dtype}")
    bad = (~torch.isfinite(weights) | (weights < 0)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"loss_weights must be finite and >= 0, got {weights[bad[0]].item()} at index {bad[0]} "
            f"({len(bad)} bad weight(s))"
        )
    return weights


def _check_state(rule: UpdateRule, state: State, n: int) -> None:
    """Raise TypeError unless ``state`` is a mapping, ValueError unless it has the rule's state
    names, each of its shape for ``n`` coordinates (states made for other parameters would
    broadcast or fail deep in the rule)."""
    spec = rule.state_spec()
    if not isinstance(state, Mapping):
        # a tuple of tensors (as nn.LSTM takes (h, c)) failed in set(state) != set(spec) with torch's
        # "Boolean value of Tensor with more than one value is ambiguous"
        raise TypeError(
            f"the state must be a dict of the {type(rule).__name__} rule's states {sorted(spec)} (name -> tensor), "
            f"got a {type(state).__name__}"
        )
    if set(state) != set(spec):
        raise ValueError(
            f"the state has {sorted(state)}, the {type(rule).__name__} rule's states are {sorted(spec)}: "
            "start from init_rule_state(rule, params)"
        )
    for k, s in spec.items():
        value = state[k]
        if not isinstance(value, Tensor) or tuple(value.shape) != s.shape(n):
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"state {k!r} has shape {got}, the {n} coordinates of params need {s.shape(n)}: "
                "start from init_rule_state(rule, params)"
            )


def _without_float8(loss: Tensor) -> Tensor:
    """``loss`` as it is, or in float32 (which holds it exactly) where it is float8: torch has no
    dtype promotion or NaN/Inf check for float8, and both failed on a float8 loss."""
    return loss.float() if loss.is_floating_point() and loss.dtype.itemsize == 1 else loss


def _step_loss(rule: UpdateRule, loss: Tensor | float | None, device: torch.device, dtype: torch.dtype) -> Tensor | None:
    """The ``(1,)`` loss the rule reads, on ``device`` in ``dtype`` (the math's), saturated at
    its largest value (a float64 loss over 3.4e38 is Inf in float32, as the optimizers'
    ``step(loss=...)`` reads it); None for a rule without ``needs_loss``. Raises ValueError for
    a missing or malformed loss."""
    if not rule.needs_loss:
        return None
    if loss is None:
        raise ValueError(f"{type(rule).__name__} reads the optimizee's loss: pass learned_step(..., loss=loss)")
    if is_number(loss):
        loss = torch.tensor(real_as_float(loss), dtype=torch.float64, device=device)
    elif not isinstance(loss, Tensor) or loss.is_complex() or loss.dtype == torch.bool:
        raise ValueError(f"the loss must be a real number or a one-element tensor, got {loss!r}")
    if loss.numel() != 1:
        raise ValueError(f"the loss must be a scalar, got shape {tuple(loss.shape)}")
    if loss.device != device:
        raise ValueError(f"the loss is on {loss.device}, the parameters on {device}")
    loss = _without_float8(loss)
    largest = torch.finfo(dtype).max
    loss = loss.to(torch.promote_types(loss.dtype, dtype)).clamp(-largest, largest)
    return loss.to(dtype).reshape(1)


def unroll(
    rule: UpdateRule,
    task_batch: TaskBatch,
    params: Mapping[str, Tensor],
    rule_state: State,
    steps: int,
    *,
    start_step: int = 0,
    lr: float = 1.0,
    stop_optimizee_grad: bool = True,
    loss_weights: Sequence[float] | Tensor | None = None,
    backend: str = "auto",
) -> UnrollResult:
    """Run ``steps`` updates of ``rule`` on every task of ``task_batch``, keeping the graph.

    Each step: every task's minibatch loss at the current parameters, its gradient by
    ``torch.autograd.grad``, one rule call over all coordinates, ``params = params + lr * step``.
    With ``stop_optimizee_grad`` (Andrychowicz et al. 2016) the gradient and the loss the rule
    reads are detached, so the meta-gradient has no second-order terms (no Hessian-vector
    products); without it the gradient is built with ``create_graph=True`` and the meta-gradient
    is exact.

    Rules with ``needs_loss`` (MetaLSTMCell) read one scalar loss, so the rule is called once per
    task on that task's slice of coordinates and states with that task's loss. Other rules are
    called once on all ``B * P`` coordinates.

    Args:
        rule: the update rule; its dtype must be the parameters' math dtype (theirs for float32
            and float64, float32 for bfloat16 and float16, as in :func:`learned_step`), its device
            theirs; so must the states' be.
        task_batch: ``B`` tasks.
        params: ``(B, *shape)`` per name; need not require grad (leaves are made where needed).
        rule_state: ``(lead, B * P, *trail)`` per state name, e.g.
            ``rule.init_state(num_coordinates(params), ...)``.
        steps: number of updates, >= 1.
        start_step: step index of the first update (selects the tasks' minibatches), an
            integer ``>= 0``.
        lr: multiplier of the rule's step: a number, or a one-element tensor (differentiable:
            a learned step size) on the parameters' device or the CPU.
        stop_optimizee_grad: detach the optimizee gradient (and loss) the rule reads.
        loss_weights: ``(steps,)`` weight ``w_t`` of each post-update loss in the meta-loss,
            finite and ``>= 0``; default all ones.
        backend: ``"torch"``, ``"triton"`` or ``"auto"`` (see the module docstring).
            ``"triton"`` runs each rule call as its input features in PyTorch, then the Triton
            forward and backward kernels; it needs a :class:`CoordinateLSTM` (any feature set)
            or a :class:`MetaLSTMCell`, float32 rule, parameters and states, and CUDA tensors
            (or CPU tensors under ``TRITON_INTERPRET=1``), and raises ``ValueError``
            otherwise. The kernels give the same meta-gradient as the PyTorch path to fp32
            rounding, also without ``stop_optimizee_grad`` (the features' own graph carries the
            second-order terms).

    Returns:
        An :class:`UnrollResult`.

    Raises:
        ValueError: on ``steps < 1``, a ``start_step`` that is not an integer ``>= 0``, a ``stop_optimizee_grad``
            that is not True or False, a non-finite ``lr``, an unknown ``backend``, a ``"triton"`` backend that cannot
            run this rule or these tensors, malformed ``params``, ``loss_weights`` of another shape, NaN, Inf or < 0,
            states of other names or shapes than the rule's for ``B * P`` coordinates,
            parameters of more than one dtype, states or rule weights not in their math dtype,
            any of them on more than one device, a call under
            ``torch.no_grad()`` or ``torch.inference_mode()``, or task losses that are not
            ``(B,)`` on the parameters' device with a gradient for every parameter.
        TypeError: ``rule_state`` not a dict (a mapping) of state names to tensors.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not is_integer(steps) or steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps!r} (an integer)")
    check_bool("stop_optimizee_grad", stop_optimizee_grad)
    if not is_integer(start_step) or start_step < 0:
        # a float's integer part seeded the minibatches; a negative one failed in numpy's seeding
        raise ValueError(f"start_step must be an integer >= 0, got {start_step!r}")
    weights = _check_loss_weights(loss_weights, steps)  # before the steps run, not after them
    if isinstance(params, Mapping) and not params:
        raise ValueError("params is empty: the tasks need at least one parameter tensor")
    _check_float_tensors(params, "unroll")  # an integer tensor was torch's "only Tensors of floating point dtype can require gradients"
    lr = _check_lr(lr, "unroll", next(iter(params.values())).device)
    if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
        # else every task would be blamed for a loss without a gradient (torch.enable_grad() inside
        # inference_mode turns grad mode on, but every tensor made there still has no graph)
        mode = "torch.inference_mode()" if torch.is_inference_mode_enabled() else "torch.no_grad()"
        raise ValueError(f"unroll differentiates the tasks' losses: call it with autograd enabled, not under {mode}")
    names = list(params)
    batch = len(task_batch)
    shapes = [tuple(params[k].shape[1:]) for k in names]
    for k in names:
        if params[k].shape[0] != batch:
            raise ValueError(
                f"params[{k!r}] has leading size {params[k].shape[0]}, expected B={batch}"
            )
    sizes = [math.prod(s) for s in shapes]
    per_task = sum(sizes)
    _check_state(rule, rule_state, batch * per_task)  # a MetaLSTMCell took the first rows of larger states
    _check_one_dtype_and_device(rule, params, rule_state)
    dtype = next(iter(params.values())).dtype
    device_type = next(iter(params.values())).device.type
    compute = math_dtype(dtype)

    # The first loss needs a graph to differentiate; detached starts become fresh leaves.
    current = {
        k: v if v.requires_grad else v.detach().requires_grad_(True) for k, v in params.items()
    }
    state = dict(rule_state)
    zero_unused = bool(getattr(task_batch, "unused_params_get_zero_grad", False))
    loss = _checked_loss(task_batch, current, start_step)
    losses = []
    for t in range(steps):
        grads = _optimizee_grads(
            loss,
            current,
            start_step + t,
            retain_graph=True,  # the meta-loss backward goes through these losses later
            create_graph=not stop_optimizee_grad,
            zero_unused=zero_unused,
        )
        # autocast off for the update (the tasks' losses stay in the caller's region): torch.cat of
        # bfloat16 parameters inside a float16 region (or the reverse) raised autocast's
        # "Unexpected floating ScalarType"
        with without_autocast({device_type}):
            flat_grad = torch.cat([g.reshape(batch, -1) for g in grads], dim=1).to(compute)
            flat_param = torch.cat([current[k].reshape(batch, -1) for k in names], dim=1).to(compute)
            rule_loss = (loss.detach() if stop_optimizee_grad else loss).to(compute)
            step, state = _apply_rule(
                rule, flat_grad.reshape(-1), flat_param.reshape(-1), state, rule_loss, backend
            )
            new_flat = (flat_param + lr * step.reshape(batch, per_task)).to(dtype)
        current = {
            k: piece.reshape(batch, *shape)
            for k, piece, shape in zip(names, new_flat.split(sizes, dim=1), shapes, strict=True)
        }
        loss = _checked_loss(task_batch, current, start_step + t + 1)
        losses.append(loss)
    stacked = torch.stack(losses)
    if weights is None:
        meta_loss = stacked.mean()
    else:
        meta_loss = (weights.to(stacked.dtype).to(stacked.device).unsqueeze(1) * stacked).mean()
    return UnrollResult(meta_loss, stacked, current, state)


def _checked_loss(task_batch: TaskBatch, params: Mapping[str, Tensor], step_index: int) -> Tensor:
    """``task_batch.loss(params, step_index)``, once checked to be ``(B,)`` floating-point losses on
    the parameters' device with a gradient path; raises ValueError naming what is wrong (a
    ``(B, N)`` loss would otherwise be summed into a gradient N times too large, and a loss
    without a graph fail deep in autograd)."""
    try:
        loss = task_batch.loss(params, step_index)
    except KeyError as err:  # params of other names than the loss reads: a bare KeyError('theta')
        name = err.args[0] if err.args else None
        if not isinstance(name, str) or name in params:
            raise
        raise ValueError(
            f"the task batch's loss at step {step_index} reads params[{name!r}], which is not among the params "
            f"given {list(params)}: give the names its init_params returns"
        ) from err
    batch = len(task_batch)
    if not isinstance(loss, Tensor) or tuple(loss.shape) != (batch,) or not loss.is_floating_point():
        got = (f"shape {tuple(loss.shape)} and dtype {loss.dtype}" if isinstance(loss, Tensor)
               else f"a {type(loss).__name__}")  # fmt: skip
        raise ValueError(
            f"the task batch's loss at step {step_index} has {got}: it must be ({batch},) floating-point losses, one "
            "scalar per task"
        )
    device = next(iter(params.values())).device
    if loss.device != device:
        raise ValueError(f"the task batch's loss at step {step_index} is on {loss.device}, the parameters on {device}")
    if not loss.requires_grad:
        raise ValueError(
            f"the task batch's loss at step {step_index} has no gradient: it must be computed from the params it is "
            "given (not detached, not through .item() or numpy)"
        )
    return loss


def _optimizee_grads(
    loss: Tensor,
    params: Mapping[str, Tensor],
    step_index: int,
    *,
    retain_graph: bool,
    create_graph: bool,
    zero_unused: bool = False,
) -> list[Tensor]:
    """The gradient of ``loss.sum()`` for each of ``params`` (in their order); raises ValueError
    naming a parameter the loss does not use (its gradient would be None), or, where
    ``zero_unused``, gives it zeros (as ``MAML`` does)."""
    grads = torch.autograd.grad(
        loss.sum(), list(params.values()), retain_graph=retain_graph, create_graph=create_graph, allow_unused=True
    )
    if zero_unused:
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params.values(), grads, strict=True)]
    unused = [k for k, g in zip(params, grads, strict=True) if g is None]
    if unused:
        raise ValueError(
            f"the task batch's loss at step {step_index} does not depend on params {unused}: every parameter "
            "init_params returns must take part in the loss"
        )
    return list(grads)


def check_task_batch(task_batch: TaskBatch, params: Mapping[str, Tensor], *, dtype: torch.dtype) -> Tensor:
    """Check, before a run, that ``task_batch`` with initial ``params`` (``(B, *shape)`` per name,
    on the device the run uses) can be unrolled by a rule of ``dtype``: one float dtype, ``(B,)``
    losses with a gradient for every parameter, and finite losses at step 0.

    Returns:
        The ``(B,)`` losses at step 0, detached.

    Raises:
        ValueError: the first problem found, in one line.
    """
    batch = len(task_batch)
    if not params:
        raise ValueError("params is empty: the tasks need at least one parameter tensor")
    for k, v in params.items():
        if v.dtype != dtype:
            raise ValueError(f"the initial params[{k!r}] are {v.dtype}; the rule runs in {dtype}, so they must be too")
        if v.dim() == 0 or v.shape[0] != batch:
            raise ValueError(f"params[{k!r}] has shape {tuple(v.shape)}, expected (B={batch}, *shape)")
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    loss = _checked_loss(task_batch, leaves, 0)
    _optimizee_grads(loss, leaves, 0, retain_graph=False, create_graph=False,
                     zero_unused=bool(getattr(task_batch, "unused_params_get_zero_grad", False)))
    loss = loss.detach()
    bad = (~torch.isfinite(loss)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"the loss at step 0 is {float(loss[bad[0]])} for task {bad[0]} (of {batch}): check the task's "
                         "loss and initial parameters")  # fmt: skip
    return loss


def _check_one_dtype_and_device(
    rule: UpdateRule,
    params: Mapping[str, Tensor],
    state: State,
    *,
    grads: Mapping[str, Tensor] | None = None,
    caller: str = "unroll",
) -> None:
    """Raise ValueError unless the parameters and their ``grads`` (where given) share one dtype,
    the floating-point states and the rule's weights are in the math dtype of that dtype (the
    same dtype for float32 and float64 parameters, float32 for bfloat16 and float16 ones), and all
    share one device (torch's own error, from deep in the rule, names neither side)."""
    optimizee = {f"params[{k!r}]": v for k, v in params.items()}
    optimizee.update({f"grads[{k!r}]": v for k, v in (grads or {}).items()})
    rule_side = {f"state {k!r}": v for k, v in state.items() if v.is_floating_point()}
    rule_side.update({f"rule weight {k!r}": v for k, v in rule.named_parameters()})
    inputs = "the parameters, their gradients," if grads is not None else "the parameters,"
    tensors = {**optimizee, **rule_side}
    param_dtype = next(iter(params.values())).dtype
    compute = math_dtype(param_dtype)
    if compute == param_dtype:
        _require_one(tensors, "dtype", f"{caller} needs one dtype for {inputs} the rule's states and its weights")
    else:
        _require_one(optimizee, "dtype", f"{caller} needs one dtype for {inputs.removesuffix(',')}")
        wrong = {name: t for name, t in rule_side.items() if t.dtype != compute}
        if wrong:
            found = ", ".join(f"{t.dtype} ({name})" for name, t in list(wrong.items())[:3])
            raise ValueError(
                f"{caller} runs the update of {param_dtype} parameters in {compute}, as the optimizers do: the rule's "
                f"states and its weights must be {compute} (init_rule_state makes such states; rule.float()), got: {found}"
            )
    _require_one(tensors, "device", f"{caller} needs one device for {inputs} the rule's states and its weights")


def _require_one(tensors: Mapping[str, Tensor], what: str, message: str) -> None:
    """Raise ValueError(``message: value (first tensor with it), ...``) unless every tensor has
    the same ``what`` (``"dtype"`` or ``"device"``)."""
    first: dict[str, str] = {}  # each value, and the first tensor that has it
    for name, tensor in tensors.items():
        first.setdefault(str(getattr(tensor, what)), name)
    if len(first) > 1:
        found = ", ".join(f"{value} ({name})" for value, name in first.items())
        raise ValueError(f"{message}, got: {found}")


def _triton_problems(rule: UpdateRule, grad: Tensor, param: Tensor, state: State) -> list[str]:
    """Why the Triton kernels cannot apply ``rule`` here (empty when they can)."""
    if not kernels.FUSED_UPDATES_AVAILABLE:
        return ["Triton is not installed"]
    if type(rule) not in (CoordinateLSTM, MetaLSTMCell):  # a subclass's own forward they would not run
        return [f"the kernels implement only CoordinateLSTM and MetaLSTMCell, not {type(rule).__name__}"]
    problems = []
    tensors = {
        "gradient": grad,
        "parameters": param,
        **{f"state {k!r}": v for k, v in state.items()},
    }
    tensors.update({f"rule parameter {k!r}": v for k, v in rule.named_parameters()})
    wrong = sorted(f"{k} ({v.dtype})" for k, v in tensors.items() if v.dtype != torch.float32)
    if wrong:
        problems.append("float32 only, got " + ", ".join(wrong))
    # one device for all of them: unroll checked that first (_check_one_dtype_and_device)
    if grad.device.type == "cpu":
        from ..kernels.coordinate_lstm_step import is_interpreted

        if not is_interpreted():
            problems.append(
                "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 set before "
                "Triton is imported); otherwise use CUDA tensors"
            )
    elif grad.device.type != "cuda":
        problems.append(f"{grad.device} tensors (needs CUDA)")
    return problems


def _use_triton(rule: UpdateRule, grad: Tensor, param: Tensor, state: State, backend: str) -> bool:
    """Whether this rule call runs the Triton kernels; ``"triton"`` raises if they cannot."""
    if backend == "torch":
        return False
    if backend == "auto" and not (
        grad.device.type == "cuda" and kernels.FUSED_UPDATES_AVAILABLE and kernels.GPU_VALIDATED
    ):
        return False  # the interpreter is for tests, and an unvalidated GPU kernel is opt-in
    problems = _triton_problems(rule, grad, param, state)
    if problems and backend == "triton":
        raise ValueError(f"backend='triton' cannot run this update: {'; '.join(problems)}")
    return not problems


def _apply_rule(
    rule: UpdateRule,
    grad: Tensor,
    param: Tensor,
    state: State,
    loss: Tensor | None,
    backend: str = "auto",
) -> tuple[Tensor, State]:
    """The rule's ``(B * P,)`` step and new states; ``loss`` is ``(B,)`` (None: a rule without
    ``needs_loss``, which does not read it): the Triton kernels or the rule's module. Called with
    autocast off (:func:`learned_step` and the unroll's loop turn it off for the whole update), so
    that the rule runs in the dtype of its inputs (the math dtype) also inside an autocast region,
    as in the optimizers."""
    if _use_triton(rule, grad, param, state, backend):
        return _apply_rule_triton(rule, grad, param, state, loss)
    if not rule.needs_loss:
        return _checked_rule_call(rule, grad, param, state)
    batch = loss.shape[0]
    per_task = grad.shape[0] // batch
    dims = {k: len(spec.lead) for k, spec in rule.state_spec().items()}
    steps, new_states = [], []
    for b in range(batch):
        sl = slice(b * per_task, (b + 1) * per_task)
        task_state = {k: v.narrow(dims[k], b * per_task, per_task) for k, v in state.items()}
        step, new_state = _checked_rule_call(rule, grad[sl], param[sl], task_state, loss[b])
        steps.append(step)
        new_states.append(new_state)
    return torch.cat(steps), {k: torch.cat([s[k] for s in new_states], dim=dims[k]) for k in state}


def _checked_rule_call(rule: UpdateRule, grad: Tensor, param: Tensor, state: State, *loss: Tensor) -> tuple[Tensor, State]:
    """``rule(grad, param, state, *loss)``, its step checked to be ``(n,)`` and its new states to
    have :meth:`UpdateRule.state_spec`'s names and shapes for the ``n`` coordinates of ``grad``
    (a shape check, no sync); raises ValueError naming the rule. A rule of one's own that broke
    this had a ``(1,)`` step broadcast over every coordinate by :func:`learned_step`, or a
    ``(1, 1)`` state taken on, silently, or failed in a reshape deep in :func:`unroll`."""
    step, new_state = rule(grad, param, state, *loss)
    n = grad.shape[0]
    name = type(rule).__name__
    if not isinstance(step, Tensor) or tuple(step.shape) != (n,):
        got = f"shape {tuple(step.shape)}" if isinstance(step, Tensor) else f"a {type(step).__name__}"
        raise ValueError(f"the {name} rule's forward returned a step of {got} for {n} coordinates: it must be ({n},)")
    spec = rule.state_spec()
    if not isinstance(new_state, Mapping) or set(new_state) != set(spec):
        got = sorted(new_state) if isinstance(new_state, Mapping) else f"a {type(new_state).__name__}"
        raise ValueError(f"the {name} rule's forward returned the states {got}: its state_spec() names {sorted(spec)}")
    for k, s in spec.items():
        value = new_state[k]
        if not isinstance(value, Tensor) or tuple(value.shape) != s.shape(n):
            got = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else f"a {type(value).__name__}"
            raise ValueError(
                f"the {name} rule's forward returned its state {k!r} of {got} for {n} coordinates: it must be {s.shape(n)} (state_spec)"
            )
    return step, new_state


def _apply_rule_triton(
    rule: UpdateRule, grad: Tensor, param: Tensor, state: State, loss: Tensor | None
) -> tuple[Tensor, State]:
    """:func:`_apply_rule` through the differentiable Triton kernels: the rule's input features
    by PyTorch, the rest (nearly all the work) by the kernels."""
    weights = dict(rule.named_parameters())
    if isinstance(rule, MetaLSTMCell):
        from ..kernels.meta_lstm_backward import meta_lstm_step

        # every coordinate sees its own task's loss
        per_task_loss = loss.repeat_interleave(grad.shape[0] // loss.shape[0])
        x = rule.features(grad, per_task_loss)
        direction, new_state = rule.direction(grad, state)
        step, h, c, fi = meta_lstm_step(
            x, direction, param, state["h"], state["c"], state["fi"], weights, rule.config
        )
        return step, {"h": h, "c": c, "fi": fi, **new_state}
    from ..kernels.coordinate_lstm_backward import coordinate_lstm_step

    x, new_state = rule.features(grad, param, state)
    step, new_state["h"], new_state["c"] = coordinate_lstm_step(
        x, state["h"], state["c"], weights, rule.config
    )
    return step, new_state


def detach_all(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The same dict with every tensor detached (the cut between truncations)."""
    return {k: v.detach() for k, v in tensors.items()}


def truncated_unroll(
    rule: UpdateRule,
    task_batch: TaskBatch,
    params: Mapping[str, Tensor],
    rule_state: State,
    *,
    horizon: int,
    truncation: int,
    update: Callable[[Tensor], None] | None = None,
    lr: float = 1.0,
    stop_optimizee_grad: bool = True,
    loss_weights: Sequence[float] | Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Run ``horizon`` steps as consecutive unrolls of ``truncation`` steps (the last may be shorter).

    After each truncation ``update(meta_loss)`` is called (typically: backward, clip, meta-optimizer
    step), then the parameters and rule states are detached, so no gradient crosses a truncation.
    ``meta_loss`` is that truncation's :attr:`UnrollResult.meta_loss`, the mean over its own steps
    (and tasks), a shorter last truncation's too: each truncation is one update of the same weight.
    With ``update=None`` this only evaluates the rule.

    ``task_batch`` (``B`` tasks), ``params`` (``(B, *shape)`` per name), ``rule_state``
    (``(lead, B * P, *trail)`` per state name), ``lr``, ``stop_optimizee_grad`` and ``backend``
    (``"auto"``, ``"torch"`` or ``"triton"``: how the rule is applied) are as for :func:`unroll`,
    which documents them. ``loss_weights``:
    ``(horizon,)`` weight of each step's loss over the whole run (e.g.
    :func:`horizon_loss_weights`), finite and ``>= 0``, each truncation's meta-loss taking its
    slice; default all ones.

    Returns:
        ``(horizon, B)`` detached losses (see :attr:`UnrollResult.losses`).
    """
    if any(not is_integer(n) or n < 1 for n in (horizon, truncation)):
        raise ValueError(f"horizon and truncation must be >= 1, got {horizon}, {truncation} (integers)")
    loss_weights = _check_loss_weights(loss_weights, horizon)  # all of them, before the first update
    losses = []
    params, state = dict(params), dict(rule_state)
    for start in range(0, horizon, truncation):
        steps = min(truncation, horizon - start)
        result = unroll(
            rule,
            task_batch,
            params,
            state,
            steps,
            start_step=start,
            lr=lr,
            stop_optimizee_grad=stop_optimizee_grad,
            loss_weights=None if loss_weights is None else loss_weights[start : start + steps],
            backend=backend,
        )
        if update is not None:
            update(result.meta_loss)
        params, state = detach_all(result.params), detach_all(result.rule_state)
        losses.append(result.losses.detach())
    return torch.cat(losses)
