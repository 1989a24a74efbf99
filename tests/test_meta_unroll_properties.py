"""Property-based checks of the functional unroll (hypothesis, a few tiny float64 examples each):
truncations change no forward value and pass no gradient across their cut, each task of a meta-batch runs as if alone (and permuting
the tasks permutes the results), and the second-order meta-gradient of the options the other
tests leave out equals a central difference along a random direction."""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
from helpers import needs_compiled_step, random_rule
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from learnedopt.meta import (
    Task,
    TaskBatch,
    generator_for,
    horizon_loss_weights,
    init_rule_state,
    learned_step,
    num_coordinates,
    truncated_unroll,
    unroll,
)
from learnedopt.meta.unroll import detach_all
from learnedopt.weights import build_preset

F64 = torch.float64
FEW = settings(max_examples=12, deadline=None)

#: the rules, float64: tiny random ones of each feature set (and other constants), and the default
#: preset itself
RULE_KINDS = ["lstm", "lstm-moments", "lstm-rms", "lstm-param", "l2l-blend", "meta", "meta-adam", "meta-momentum"]


@functools.cache
def _rule(kind: str):
    if kind == "l2l-blend":  # the default: momenta (0.5, 0.9, 0.99) and RMS (0.99, 0.999) features
        rule = build_preset("l2l-blend")[0].double()
        assert rule.config.momentum_decays and rule.config.rms_decays
        return rule
    config = {
        "lstm-moments": {"momentum_decays": (0.5, 0.9), "rms_decays": (0.99,)},
        "lstm-rms": {"rms_decays": (0.9, 0.999), "preprocess_p": 5.0, "output_scale": 0.3},
        "lstm-param": {"param_input": True, "momentum_decays": (0.9,)},
        "meta-adam": {"momentum_decay": 0.9, "rms_decay": 0.99},
        "meta-momentum": {"momentum_decay": 0.5, "step_scale": 0.5, "preprocess_p": 5.0},
    }.get(kind, {})
    return random_rule("meta" if kind.startswith("meta") else "lstm", seed=3, **config)


def rule_of(kind: str):
    rule = _rule(kind)
    rule.zero_grad(set_to_none=True)
    return rule


class TwoTensorTask(Task):
    """``|A w + b - t c|^2 + 0.1 |w|^4``: two parameter tensors (so the task-major flattening
    crosses names), a minibatch that moves with the step index ``t``, a non-quadratic term."""

    def __init__(self, a: Tensor, c: Tensor) -> None:
        self.a, self.c = a, c

    def init_params(self, generator: torch.Generator) -> dict[str, Tensor]:
        return {
            "w": 0.5 * torch.randn(2, 3, generator=generator, dtype=F64),
            "b": 0.5 * torch.randn(2, generator=generator, dtype=F64),
        }

    def loss(self, params: Mapping[str, Tensor], step_index: int) -> Tensor:
        w, b = params["w"], params["b"]
        residual = (self.a * w).sum(dim=1) + b - 0.1 * step_index * self.c
        return residual.square().sum() + 0.1 * w.square().sum().square()


def make_tasks(batch: int, seed: int) -> tuple[list[TwoTensorTask], dict[str, Tensor]]:
    g = generator_for(seed)
    tasks = [TwoTensorTask(torch.randn(2, 3, generator=g, dtype=F64), torch.randn(2, generator=g, dtype=F64)) for _ in range(batch)]
    return tasks, TaskBatch(tasks).init_params(g)


def same(a: Tensor, b: Tensor, msg: str = "") -> None:
    """Bit for bit, NaN where NaN (a random rule at ``lr=1`` may diverge)."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=msg or None)


def fresh_state(rule, params: Mapping[str, Tensor]):
    return rule.init_state(num_coordinates(params), dtype=F64, device="cpu")


def state_of_tasks(rule, state, per_task: int, tasks: list[int]):
    """The states of ``tasks`` (indices into the meta-batch), in that order."""
    dims = {k: len(spec.lead) for k, spec in rule.state_spec().items()}
    return {
        k: torch.cat([v.narrow(dims[k], b * per_task, per_task) for b in tasks], dim=dims[k]) for k, v in state.items()
    }


# ----------------------------------------------------------------------------- truncation
@FEW
@given(
    kind=st.sampled_from(RULE_KINDS),
    horizon=st.integers(2, 10),
    data=st.data(),
    stop=st.booleans(),
    seed=st.integers(0, 50),
)
def test_truncations_change_no_forward_value(kind: str, horizon: int, data, stop: bool, seed: int) -> None:
    """Unrolls of ``T`` steps chained with the parameters and states detached between them (a
    truncated unroll) give one ``H``-step unroll's losses, final parameters and states: the cut
    changes gradients only. ``truncated_unroll`` gives those losses too, and hands each
    truncation's meta-loss its slice (a backward run in ``update`` changes no value either)."""
    truncation = data.draw(st.integers(1, horizon), label="truncation")
    lr = data.draw(st.sampled_from([0.3, 1.0]), label="lr")
    rule = rule_of(kind)
    tasks, params = make_tasks(2, seed)
    batch = TaskBatch(tasks)
    state = fresh_state(rule, params)
    weights = horizon_loss_weights("linear", horizon).to(F64)
    whole = unroll(rule, batch, params, state, horizon, lr=lr, stop_optimizee_grad=stop, loss_weights=weights)

    current, current_state, losses, meta_losses = dict(params), dict(state), [], []
    for start in range(0, horizon, truncation):
        steps = min(truncation, horizon - start)
        piece = unroll(rule, batch, current, current_state, steps, start_step=start, lr=lr,
                       stop_optimizee_grad=stop, loss_weights=weights[start : start + steps])  # fmt: skip
        current, current_state = detach_all(piece.params), detach_all(piece.rule_state)
        losses.append(piece.losses.detach())
        meta_losses.append(piece.meta_loss.detach())
    same(torch.cat(losses), whole.losses.detach())
    for k, v in whole.params.items():
        same(current[k], v.detach(), k)
    assert current_state.keys() == whole.rule_state.keys()
    for k, v in whole.rule_state.items():
        same(current_state[k], v.detach(), k)

    seen = []

    def update(meta_loss: Tensor) -> None:
        meta_loss.backward()  # accumulates into the rule's .grad, which no forward reads
        seen.append(meta_loss.detach())

    by_function = truncated_unroll(rule, batch, params, state, horizon=horizon, truncation=truncation, update=update,
                                   lr=lr, stop_optimizee_grad=stop, loss_weights=weights)  # fmt: skip
    same(by_function, whole.losses.detach())
    same(torch.stack(seen), torch.stack(meta_losses))
    # and the pieces' weighted meta-losses, re-weighted by their lengths, are the whole one
    lengths = torch.tensor([len(p) for p in losses], dtype=F64)
    torch.testing.assert_close((torch.stack(seen) * lengths).sum() / horizon, whole.meta_loss.detach(), rtol=1e-13, atol=0,
                               equal_nan=True)  # fmt: skip


@FEW
@given(
    kind=st.sampled_from(RULE_KINDS),
    horizon=st.integers(2, 8),
    data=st.data(),
    stop=st.booleans(),
    seed=st.integers(0, 50),
)
def test_each_truncations_meta_gradient_is_that_of_an_unroll_from_constants(
    kind: str, horizon: int, data, stop: bool, seed: int
) -> None:
    """No gradient crosses a truncation: the meta-gradient ``update`` gets from each truncation
    (of the rule's weights, a learnable ``lr``, and the initial parameters) is that of a fresh
    unroll from the previous truncation's parameters and states taken as constants, with its
    slice of the weights; the initial parameters get one only from the first truncation."""
    truncation = data.draw(st.integers(1, horizon - 1), label="truncation")
    rule = rule_of(kind)
    tasks, params = make_tasks(2, seed)
    batch = TaskBatch(tasks)
    start = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    lr = torch.tensor(0.5, dtype=F64, requires_grad=True)
    state = fresh_state(rule, params)
    weights = torch.rand(horizon, generator=torch.Generator().manual_seed(seed), dtype=F64) * 2
    learnable = [*rule.parameters(), lr, *start.values()]
    seen = []
    truncated_unroll(rule, batch, start, state, horizon=horizon, truncation=truncation, lr=lr, stop_optimizee_grad=stop,
                     loss_weights=weights,
                     update=lambda meta_loss: seen.append(torch.autograd.grad(meta_loss, learnable, allow_unused=True)))  # fmt: skip
    assert len(seen) == -(-horizon // truncation)
    current, current_state = dict(start), dict(state)
    for i, begin in enumerate(range(0, horizon, truncation)):
        steps = min(truncation, horizon - begin)
        piece = unroll(rule, batch, current, current_state, steps, start_step=begin, lr=lr, stop_optimizee_grad=stop,
                       loss_weights=weights[begin : begin + steps])  # fmt: skip
        expected = torch.autograd.grad(piece.meta_loss, learnable, allow_unused=True)
        for got, want in zip(seen[i], expected, strict=True):
            assert (got is None) == (want is None)
            if got is not None:
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15, equal_nan=True)
        assert all((g is None) == (i > 0) for g in seen[i][-len(start) :])  # the start: the first truncation only
        current = {k: v.detach().clone() for k, v in piece.params.items()}  # constants, not views of the graph
        current_state = {k: v.detach().clone() for k, v in piece.rule_state.items()}


# ----------------------------------------------------------------------------- meta-batch
@FEW
@given(
    kind=st.sampled_from(RULE_KINDS),
    batch=st.integers(2, 4),
    steps=st.integers(1, 4),
    stop=st.booleans(),
    seed=st.integers(0, 50),
    data=st.data(),
)
def test_each_task_of_a_meta_batch_runs_as_if_alone_and_permuting_tasks_permutes_results(
    kind: str, batch: int, steps: int, stop: bool, seed: int, data
) -> None:
    """Task ``b`` of a ``B``-task unroll has the losses, parameters and states of a one-task
    unroll of it; a permutation of the tasks (and their parameters) permutes every result; the
    meta-gradient of the meta-batch is the mean of the tasks' own."""
    rule = rule_of(kind)
    tasks, params = make_tasks(batch, seed)
    per_task = num_coordinates(params) // batch
    together = unroll(rule, TaskBatch(tasks), params, fresh_state(rule, params), steps, lr=0.5, stop_optimizee_grad=stop)
    weights = list(rule.parameters())
    together_grad = torch.autograd.grad(together.meta_loss, weights)

    tol = {"rtol": 1e-12, "atol": 1e-14, "equal_nan": True}
    alone_grads = []
    for b in range(batch):
        own = {k: v[b : b + 1] for k, v in params.items()}
        alone = unroll(rule, TaskBatch([tasks[b]]), own, fresh_state(rule, own), steps, lr=0.5, stop_optimizee_grad=stop)
        torch.testing.assert_close(alone.losses.detach()[:, 0], together.losses.detach()[:, b], **tol)
        for k, v in alone.params.items():
            torch.testing.assert_close(v.detach()[0], together.params[k].detach()[b], **tol)
        for k, v in state_of_tasks(rule, together.rule_state, per_task, [b]).items():
            torch.testing.assert_close(alone.rule_state[k].detach(), v.detach(), **tol, msg=k)
        alone_grads.append(torch.autograd.grad(alone.meta_loss, weights))
    for w, got in enumerate(together_grad):
        expected = torch.stack([g[w] for g in alone_grads]).mean(0)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-13, equal_nan=True)

    order = data.draw(st.permutations(range(batch)), label="order")
    shuffled = {k: v[list(order)] for k, v in params.items()}
    permuted = unroll(rule, TaskBatch([tasks[b] for b in order]), shuffled, fresh_state(rule, shuffled), steps, lr=0.5,
                      stop_optimizee_grad=stop)  # fmt: skip
    torch.testing.assert_close(permuted.losses.detach(), together.losses.detach()[:, list(order)], **tol)
    for k, v in permuted.params.items():
        torch.testing.assert_close(v.detach(), together.params[k].detach()[list(order)], **tol)
    for k, v in state_of_tasks(rule, together.rule_state, per_task, list(order)).items():
        torch.testing.assert_close(permuted.rule_state[k].detach(), v.detach(), **tol, msg=k)
    torch.testing.assert_close(permuted.meta_loss, together.meta_loss, rtol=1e-13, atol=0, equal_nan=True)


# ----------------------------------------------------------------------------- meta-gradients
def central_difference_along(value_of, tensors: list[Tensor], directions: list[Tensor], eps: float = 1e-6) -> float:
    """The derivative of ``value_of()`` along ``directions`` of ``tensors``: central differences
    at ``eps`` and ``eps / 2``, Richardson-extrapolated (error ``O(eps^4)``: at one step of 1e-6
    the curvature of an unroll of Adam's direction left a relative error of 2e-5)."""
    kept = [t.detach().clone() for t in tensors]

    def at(step: float) -> float:
        with torch.no_grad():
            for t, k, d in zip(tensors, kept, directions, strict=True):
                t.copy_(k + step * d)
        with torch.enable_grad():
            return value_of().item()

    try:
        wide, narrow = ((at(h) - at(-h)) / (2 * h) for h in (eps, eps / 2))
    finally:
        with torch.no_grad():
            for t, k in zip(tensors, kept, strict=True):
                t.copy_(k)
    return (4 * narrow - wide) / 3


def _directional_check(value_of, tensors: list[Tensor], seed: int) -> None:
    """``d value / d tensors`` (autograd, through ``value_of()``) along a random direction equals
    the central difference along it."""
    g = torch.Generator().manual_seed(seed)
    directions = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in tensors]
    analytic = torch.autograd.grad(value_of(), tensors)
    along = sum((a * d).sum() for a, d in zip(analytic, directions, strict=True)).item()
    numeric = central_difference_along(value_of, tensors, directions)
    assert abs(along) > 1e-6, along  # a real signal
    assert abs(along - numeric) <= 1e-6 * abs(numeric) + 1e-9, (along, numeric)


@settings(max_examples=16, deadline=None)
@given(
    kind=st.sampled_from(RULE_KINDS),
    weighting=st.sampled_from(["uniform", "linear", "quadratic", "random"]),
    steps=st.integers(1, 4),
    start_step=st.integers(0, 3),
    seed=st.integers(0, 50),
)
def test_second_order_meta_gradient_matches_central_differences(
    kind: str, weighting: str, steps: int, start_step: int, seed: int
) -> None:
    """Without ``stop_optimizee_grad`` the meta-gradient is exact: for every rule (momenta, RMS
    and parameter inputs, the default preset, MetaLSTMCell with Adam's direction), loss
    weighting and start step, along a random direction of the rule's weights."""
    rule = rule_of(kind)
    tasks, params = make_tasks(2, seed)
    if weighting == "random":
        weights = torch.rand(steps, generator=torch.Generator().manual_seed(seed), dtype=F64) * 2
    else:
        weights = horizon_loss_weights(weighting, steps).to(F64)

    def meta_loss() -> Tensor:
        return unroll(rule, TaskBatch(tasks), params, fresh_state(rule, params), steps, start_step=start_step, lr=0.5,
                      stop_optimizee_grad=False, loss_weights=weights).meta_loss  # fmt: skip

    _directional_check(meta_loss, list(rule.parameters()), seed)


@FEW
@given(kind=st.sampled_from(RULE_KINDS), stop=st.booleans(), seed=st.integers(0, 50))
def test_meta_gradient_of_a_learned_lr_initialisation_and_initial_state_matches_central_differences(
    kind: str, stop: bool, seed: int
) -> None:
    """A learnable tensor ``lr``, initial parameters and initial LSTM states (``h``, ``c``, and
    MetaLSTMCell's gates ``fi``) that require grad, learned together with the rule, get the
    exact meta-gradient. Under ``stop_optimizee_grad`` the rule reads constant gradients, which
    a perturbation of these moves from the second step on (the differences would see that, the
    meta-gradient by design does not), so there the check takes one step and leaves out the
    initial parameters, whose gradient the first step's rule reads."""
    rule = rule_of(kind)
    tasks, params = make_tasks(2, seed)
    g = torch.Generator().manual_seed(seed)
    lr = torch.tensor(0.4, dtype=F64, requires_grad=True)
    start = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    state = fresh_state(rule, params)
    learned_state = {k: (0.3 * torch.rand(v.shape, generator=g, dtype=F64)).requires_grad_(True)
                     for k, v in state.items() if k in ("h", "c", "fi")}  # fmt: skip
    steps = 1 if stop else 3

    def meta_loss() -> Tensor:
        return unroll(rule, TaskBatch(tasks), start, {**state, **learned_state}, steps, lr=lr,
                      stop_optimizee_grad=stop).meta_loss  # fmt: skip

    checked = [lr, *learned_state.values()] + ([] if stop else list(start.values()))
    _directional_check(meta_loss, checked, seed)


@FEW
@given(kind=st.sampled_from(RULE_KINDS), steps=st.integers(1, 4), seed=st.integers(0, 50))
def test_stopped_meta_gradient_is_the_derivative_with_the_rules_gradient_and_loss_inputs_held(
    kind: str, steps: int, seed: int
) -> None:
    """Under ``stop_optimizee_grad`` the meta-gradient is that of the meta-loss as a function of
    the rule's weights with the gradients and losses the rule reads held at their values: the
    central difference of an unroll whose rule is handed the recorded ones, along a random
    direction, whatever the rule and number of steps."""
    rule = rule_of(kind)
    tasks, params = make_tasks(2, seed)
    recorded: list[tuple[Tensor, Tensor | None]] = []
    replay: list[int] = []  # the next recorded call to hand out, when replaying
    forward = rule.forward

    def held(grad: Tensor, param: Tensor, state, loss: Tensor | None = None):
        if replay:
            grad, loss = recorded[replay[0]]
            replay[0] += 1
        else:
            recorded.append((grad.detach().clone(), None if loss is None else loss.detach().clone()))
        return forward(grad, param, state, loss)

    def meta_loss() -> Tensor:
        return unroll(rule, TaskBatch(tasks), params, fresh_state(rule, params), steps, lr=0.5).meta_loss

    rule.forward = held
    weights = list(rule.parameters())
    try:
        analytic = torch.autograd.grad(meta_loss(), weights)  # the real unroll's; records what the rule reads
        assert len(recorded) == steps * (2 if rule.needs_loss else 1)  # a call per step (per task: MetaLSTMCell)
        replay.append(0)
        g = torch.Generator().manual_seed(seed)
        directions = [torch.randn(w.shape, generator=g, dtype=F64) for w in weights]

        def replayed() -> Tensor:
            replay[0] = 0
            value = meta_loss()
            assert replay[0] == len(recorded)
            return value

        numeric = central_difference_along(replayed, weights, directions)
    finally:
        del rule.forward
    along = sum((a * d).sum() for a, d in zip(analytic, directions, strict=True)).item()
    assert abs(along) > 1e-6, along
    assert abs(along - numeric) <= 1e-6 * abs(numeric) + 1e-9, (along, numeric)


@needs_compiled_step
@FEW
@given(kind=st.sampled_from(RULE_KINDS), steps=st.integers(1, 4), stop=st.booleans(), seed=st.integers(0, 50))
def test_learned_steps_of_each_task_are_its_share_of_the_unroll(kind: str, steps: int, stop: bool, seed: int) -> None:
    """``learned_step`` in a loop of one's own over one task (its two tensors in one dict) takes
    the steps that task takes in a meta-batch's unroll, bit for bit: parameters, losses and its
    share of the states; and the meta-gradient of its losses is that task's."""
    rule = rule_of(kind)
    tasks, params = make_tasks(2, seed)
    together = unroll(rule, TaskBatch(tasks), params, fresh_state(rule, params), steps, lr=0.5, stop_optimizee_grad=stop)
    per_task = num_coordinates(params) // 2
    weights = list(rule.parameters())
    for b, task in enumerate(tasks):
        current = {k: v[b].detach().requires_grad_(True) for k, v in params.items()}
        state = init_rule_state(rule, current)
        loss, losses = task.loss(current, 0), []
        for t in range(steps):
            grads = torch.autograd.grad(loss, list(current.values()), retain_graph=True, create_graph=not stop)
            grads = dict(zip(current, grads, strict=True))
            current, state = learned_step(rule, current, grads, state, loss=loss.detach() if stop else loss, lr=0.5)
            loss = task.loss(current, t + 1)
            losses.append(loss)
        same(torch.stack(losses).detach(), together.losses.detach()[:, b])
        for k, v in current.items():
            same(v.detach(), together.params[k].detach()[b], k)
        for k, v in state_of_tasks(rule, together.rule_state, per_task, [b]).items():
            same(state[k].detach(), v.detach(), k)
        alone = unroll(rule, TaskBatch([task]), {k: v[b : b + 1] for k, v in params.items()},
                       fresh_state(rule, {k: v[b : b + 1] for k, v in params.items()}), steps, lr=0.5,
                       stop_optimizee_grad=stop)  # fmt: skip
        for got, expected in zip(torch.autograd.grad(torch.stack(losses).mean(), weights),
                                 torch.autograd.grad(alone.meta_loss, weights), strict=True):  # fmt: skip
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15, equal_nan=True)
