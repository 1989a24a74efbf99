"""``learned_step`` and ``init_rule_state``: the functional, differentiable learned update of one
optimizee's parameter dict, against the optimizers, the unroll and central differences."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor
from helpers import central_difference, needs_triton, random_rule
from torch.func import functional_call

from learnedopt import CoordinateLSTM, LSTMOptimizer, MetaLSTMCell, MetaLSTMOptimizer, NonFiniteGradientError, UpdateRule
from learnedopt.meta import QuadraticFamily, Task, TaskBatch, generator_for, init_rule_state, learned_step, unroll
from learnedopt.meta.unroll import num_coordinates
from learnedopt.nn import StateSpec

F64 = torch.float64
OPTIMIZERS = {"lstm": LSTMOptimizer, "meta": MetaLSTMOptimizer}
#: each rule kind's configuration with moving-average states (momenta, RMS), always float32 or wider
MOVING_AVERAGES = {"lstm": {"momentum_decays": (0.9,), "rms_decays": (0.999,)}, "meta": {"momentum_decay": 0.9, "rms_decay": 0.999}}


def tiny_model(seed: int = 0) -> torch.nn.Module:
    """A 3-4-1 float64 MLP (21 coordinates in 4 tensors)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()


def grads_of(loss: Tensor, params: Mapping[str, Tensor], *, create_graph: bool) -> dict[str, Tensor]:
    """``{name: d loss / d params[name]}``; the loss's graph is kept (a meta-loss reads it later)."""
    grads = torch.autograd.grad(loss, list(params.values()), retain_graph=True, create_graph=create_graph)
    return dict(zip(params, grads, strict=True))


def flat_states(rule, optimizer, params: list[Tensor]) -> dict[str, Tensor]:
    """The optimizer's per-parameter states concatenated along the coordinate dimension, in
    ``params``' order: the layout of ``learned_step``'s state."""
    return {
        name: torch.cat([optimizer.state[p][name] for p in params], dim=len(spec.lead))
        for name, spec in rule.state_spec().items()
    }


# ----------------------------------------------------------------------------- the same step
@pytest.mark.parametrize("foreach", [None, False], ids=["batched", "per-tensor"])
@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_learned_steps_follow_the_optimizer(kind: str, foreach: bool | None) -> None:
    """Three ``learned_step``s on a tiny model equal three steps of the optimizer run by the same
    rule module on the same gradients (and, for MetaLSTMOptimizer, the same loss), parameters
    and states, in float64 (the optimizer's fused ``add_(step, alpha=lr)`` and its chunk padding
    round differently, by about 1e-17)."""
    rule = random_rule(kind)
    model = tiny_model()
    x = torch.randn(8, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    start = {k: v.clone() for k, v in params.items()}
    optimizer = OPTIMIZERS[kind](model.parameters(), weights=rule, lr=0.7, state_dtype=F64, foreach=foreach)
    state = init_rule_state(rule, params)
    for _ in range(3):
        optimizer.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        grads = {k: v.grad.clone() for k, v in model.named_parameters()}
        optimizer.step(loss=loss.detach())  # LSTMOptimizer ignores it, as learned_step does
        params, state = learned_step(rule, params, grads, state, loss=loss.detach(), lr=0.7)
    assert list(params) == [k for k, _ in model.named_parameters()]
    for k, p in model.named_parameters():
        assert not torch.equal(p.detach(), start[k])  # it moved
        torch.testing.assert_close(params[k], p.detach(), rtol=1e-12, atol=1e-12)
    expected = flat_states(rule, optimizer, list(model.parameters()))
    assert state.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(state[name], value, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("foreach", [None, False], ids=["batched", "per-tensor"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_half_precision_learned_steps_follow_the_optimizer(kind: str, dtype: torch.dtype, foreach: bool | None) -> None:
    """bfloat16 and float16 parameters step as in the optimizer: the rule (float32, with
    moving-average states, which stay float32) runs in float32 on the parameters and gradients
    read in float32, and the new parameters are rounded back to their dtype. On the batched path
    (64 coordinates, one unpadded chunk) parameters and states equal the optimizer's bit for bit;
    the per-tensor path runs the rule on each tensor's rows, its states equal to float32 rounding.
    ``learned_step`` refused these parameters beside the float32 moving averages."""
    rule = random_rule(kind, **MOVING_AVERAGES[kind]).float()
    torch.manual_seed(0)
    model = torch.nn.Linear(7, 8).to(dtype)  # 64 coordinates
    x = torch.randn(16, 7, generator=torch.Generator().manual_seed(1)).to(dtype)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    start = {k: v.clone() for k, v in params.items()}
    optimizer = OPTIMIZERS[kind](model.parameters(), weights=rule, lr=0.7, foreach=foreach)
    state = init_rule_state(rule, params)
    assert {v.dtype for v in state.values()} == {torch.float32}  # the optimizer's default state_dtype
    for _ in range(3):
        optimizer.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        grads = {k: v.grad.clone() for k, v in model.named_parameters()}
        optimizer.step(loss=loss.detach())
        params, state = learned_step(rule, params, grads, state, loss=loss.detach(), lr=0.7)
    expected = flat_states(rule, optimizer, list(model.parameters()))
    for k, p in model.named_parameters():
        assert params[k].dtype == dtype
        assert not torch.equal(p.detach(), start[k])
        torch.testing.assert_close(params[k], p.detach(), rtol=0, atol=0)
    for name, value in expected.items():
        tolerance = {"rtol": 0, "atol": 0} if foreach is None else {"rtol": 1e-6, "atol": 1e-6}
        torch.testing.assert_close(state[name], value, **tolerance)


@pytest.mark.parametrize("loss", [0.7123456, 1e6], ids=["between-half-values", "beyond-float16"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_precision_parameters_step_on_the_loss_read_in_float32(dtype: torch.dtype, loss: float) -> None:
    """Beside bfloat16 or float16 parameters MetaLSTMCell reads a loss given as a number in
    float32, as MetaLSTMOptimizer does, not rounded to the parameters' dtype (0.7123456 is no
    bfloat16 value, 1e6 beyond float16's largest, 65504): the steps equal the optimizer's bit
    for bit."""
    rule = random_rule("meta", **MOVING_AVERAGES["meta"]).float()
    torch.manual_seed(0)
    model = torch.nn.Linear(7, 8).to(dtype)  # 64 coordinates: the optimizer's batched path, one chunk
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    grads = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(2)).to(dtype) for k, v in params.items()}
    optimizer = MetaLSTMOptimizer(model.parameters(), weights=rule, lr=0.7)
    for k, p in model.named_parameters():
        p.grad = grads[k].clone()
    optimizer.step(loss=loss)
    stepped, state = learned_step(rule, params, grads, init_rule_state(rule, params), loss=loss, lr=0.7)
    for k, p in model.named_parameters():
        assert torch.equal(stepped[k], p.detach())
    for name, value in flat_states(rule, optimizer, list(model.parameters())).items():
        assert torch.equal(state[name], value)
    largest = torch.finfo(dtype).max
    in_dtype = torch.tensor(loss).clamp(-largest, largest).to(dtype).float()  # what a rule in the parameters' dtype read
    _, rounded = learned_step(rule, params, grads, init_rule_state(rule, params), loss=in_dtype, lr=0.7)
    assert not torch.equal(rounded["h"], state["h"])  # the test tells the two apart


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_an_autocast_region_does_not_change_the_step(kind: str, autocast_dtype: torch.dtype) -> None:
    """Inside ``torch.autocast`` the rule still runs in float32, as the optimizers' ``step()``
    does: the steps and states equal those outside it bit for bit. The rule's matrix products
    ran in bfloat16 there, its step off by about 5e-5, its states came back bfloat16, and the
    next step refused them."""
    rule = random_rule(kind, **MOVING_AVERAGES[kind]).float()
    start, loss_fn = quadratic_problem(dtype=torch.float32)
    results = []
    for autocast in (False, True):
        params = {k: v.clone().requires_grad_(True) for k, v in start.items()}
        state = init_rule_state(rule, params)
        for _ in range(3):
            loss = loss_fn(params)
            grads = grads_of(loss, params, create_graph=False)
            with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast):
                params, state = learned_step(rule, params, grads, state, loss=loss.detach(), lr=0.7)
        results.append((params, state))
    (params, state), (params_in, state_in) = results
    for k, v in params.items():
        assert torch.equal(params_in[k], v)
    for k, v in state.items():
        assert state_in[k].dtype == torch.float32
        assert torch.equal(state_in[k], v)


@pytest.mark.parametrize(("autocast_dtype", "param_dtype"), [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)])
@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_an_autocast_region_of_another_half_dtype_than_the_parameters_does_not_change_the_step(
    kind: str, autocast_dtype: torch.dtype, param_dtype: torch.dtype
) -> None:
    """bfloat16 parameters inside a float16 autocast region (or float16 ones in a bfloat16 one),
    where the optimizers step: concatenating them into the rule's coordinates ran under autocast
    and raised "Unexpected floating ScalarType in at::autocast::prioritize"."""
    rule = random_rule(kind, **MOVING_AVERAGES[kind]).float()
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(5, 4, generator=g).to(param_dtype), "b": torch.randn(4, generator=g).to(param_dtype)}
    grads = {k: torch.randn(v.shape, generator=g).to(param_dtype) for k, v in params.items()}
    state = init_rule_state(rule, params)
    results = []
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast):
            results.append(learned_step(rule, params, grads, state, loss=0.5, nan_policy="raise"))
    (new, new_state), (new_in, state_in) = results
    for k, v in new.items():
        assert new_in[k].dtype == param_dtype and torch.equal(new_in[k], v)
    for k, v in new_state.items():
        assert torch.equal(state_in[k], v)


@pytest.mark.parametrize(("autocast_dtype", "param_dtype"), [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)])
@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_an_unroll_inside_an_autocast_region_of_another_half_dtype_than_the_parameters_runs(
    kind: str, autocast_dtype: torch.dtype, param_dtype: torch.dtype
) -> None:
    """``unroll`` of bfloat16 tasks inside a float16 autocast region (or the reverse): the tasks'
    losses run in the caller's region, the update as outside it; concatenating the gradients
    raised "Unexpected floating ScalarType in at::autocast::prioritize". The meta-loss is the one
    outside the region but for the region's rounding of the tasks' losses."""
    rule = random_rule(kind, **MOVING_AVERAGES[kind]).float()
    results = []
    for autocast in (False, True):
        g = generator_for(3)
        tasks = QuadraticFamily(dim=4, dtype=param_dtype).sample_batch(2, g)
        params = tasks.init_params(g)
        with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast):
            result = unroll(rule, tasks, params, rule.init_state(num_coordinates(params), dtype=torch.float32, device="cpu"), 3)
        assert {v.dtype for v in result.params.values()} == {param_dtype}
        assert all(v.dtype == torch.float32 and bool(torch.isfinite(v).all()) for v in result.rule_state.values())
        results.append(result.meta_loss.detach().double())
    assert torch.allclose(results[1], results[0], rtol=0.05)


def test_half_precision_parameters_need_a_float32_rule_and_states() -> None:
    """Beside bfloat16 parameters, a bfloat16 or float64 rule or states (init_rule_state made them
    bfloat16 before) are refused in one line that says the math is float32; so are mixed parameters."""
    rule = CoordinateLSTM(hidden_size=3, num_layers=1, **MOVING_AVERAGES["lstm"])
    params = {"w": torch.randn(2, 3).bfloat16(), "b": torch.randn(2).bfloat16()}
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    state = init_rule_state(rule, params)
    message = (r"learned_step runs the update of torch\.bfloat16 parameters in torch\.float32, as the optimizers do: the rule's "
               r"states and its weights must be torch\.float32 \(init_rule_state makes such states; rule\.float\(\)\), got: ")
    with pytest.raises(ValueError, match=message + r"torch\.bfloat16 \(state 'h'\), torch\.bfloat16 \(state 'c'\)$"):
        learned_step(rule, params, grads, {k: v.bfloat16() if k in "hc" else v for k, v in state.items()})
    with pytest.raises(ValueError, match=message + r"torch\.bfloat16 \(rule weight 'lstm\.weight_ih_l0'\)"):
        learned_step(rule.bfloat16(), params, grads, state)
    # nor float64, wider than the math: torch's "mat1 and mat2 must have the same dtype" came from deep in the rule
    with pytest.raises(ValueError, match=message + r"torch\.float64 \(rule weight 'lstm\.weight_ih_l0'\)"):
        learned_step(rule.double(), params, grads, state)
    rule.float()
    with pytest.raises(ValueError, match=message + r"torch\.float64 \(state 'h'\), torch\.float64 \(state 'c'\)"):
        learned_step(rule, params, grads, {k: v.double() for k, v in state.items()})
    with pytest.raises(ValueError, match=r"learned_step needs one dtype for the parameters, their gradients, got: "
                                         r"torch\.bfloat16 \(params\['w'\]\), torch\.float32 \(grads\['b'\]\)"):
        learned_step(rule, params, {**grads, "b": grads["b"].float()}, state)


class LossDtypes(MetaLSTMCell):
    """MetaLSTMCell noting the dtype of each loss it reads, as a rule of one's own may use it
    as it comes (MetaLSTMCell itself converts it to the gradient's dtype)."""

    def forward(self, grad, param, state, loss=None):
        self.seen.add((grad.dtype, loss.dtype))
        return super().forward(grad, param, state, loss)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_a_rule_reads_the_loss_of_half_precision_parameters_in_float32(dtype: torch.dtype) -> None:
    """``unroll`` and ``learned_step`` hand the rule the loss in the math dtype, float32, as the
    gradients and parameters, not in the parameters' dtype."""
    rule = LossDtypes(hidden_size=2).float()
    rule.seen = set()
    g = generator_for(3)
    tasks = QuadraticFamily(dim=4, dtype=dtype).sample_batch(2, g)
    params = tasks.init_params(g)
    unroll(rule, tasks, params, rule.init_state(num_coordinates(params), dtype=torch.float32, device="cpu"), 2)
    assert rule.seen == {(torch.float32, torch.float32)}
    rule.seen = set()
    one = {k: v[0] for k, v in params.items()}
    learned_step(rule, one, {k: torch.ones_like(v) for k, v in one.items()}, init_rule_state(rule, one),
                 loss=torch.tensor(0.5, dtype=dtype))  # fmt: skip
    assert rule.seen == {(torch.float32, torch.float32)}


@pytest.mark.parametrize("stop", [True, False], ids=["first-order", "second-order"])
@pytest.mark.parametrize("dtype", [F64, torch.bfloat16, torch.float16], ids=["float64", "bfloat16", "float16"])
@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_learned_steps_equal_an_unroll_of_one_task(kind: str, dtype: torch.dtype, stop: bool) -> None:
    """``learned_step`` in a loop over one task is ``unroll`` on a one-task TaskBatch bit for
    bit: losses, parameters, states and the meta-gradient of the rule's weights (with the
    gradient and loss detached as ``stop_optimizee_grad`` does, or with their graph); in float64,
    and for half-precision parameters with the float32 rule (moving averages included)."""
    rule = random_rule(kind) if dtype == F64 else random_rule(kind, **MOVING_AVERAGES[kind]).float()
    g = generator_for(3)
    tasks = QuadraticFamily(dim=4, dtype=dtype).sample_batch(1, g)
    stacked = tasks.init_params(g)
    state_dtype = next(rule.parameters()).dtype
    result = unroll(rule, tasks, stacked, rule.init_state(num_coordinates(stacked), dtype=state_dtype, device="cpu"),
                    4, lr=0.7, stop_optimizee_grad=stop)  # fmt: skip
    assert {v.dtype for v in result.params.values()} == {dtype}
    expected_grad = torch.autograd.grad(result.meta_loss, list(rule.parameters()))

    # the task's loss as the one-task batch computes it: QuadraticTask.loss (a matrix-vector
    # product) and QuadraticBatch.loss (a batched product) can round differently (1 ulp in
    # float64 on an Intel Xeon host's BLAS), which is not what this test is about
    def task_loss(params: dict[str, Tensor], step: int) -> Tensor:
        return tasks.loss({k: v.unsqueeze(0) for k, v in params.items()}, step)[0]

    params = {k: v[0].detach().requires_grad_(True) for k, v in stacked.items()}
    state = init_rule_state(rule, params)
    loss, losses = task_loss(params, 0), []
    for t in range(4):
        grads = grads_of(loss, params, create_graph=not stop)
        params, state = learned_step(rule, params, grads, state, loss=loss.detach() if stop else loss, lr=0.7)
        loss = task_loss(params, t + 1)
        losses.append(loss)
    assert torch.equal(torch.stack(losses).detach(), result.losses[:, 0].detach())
    for k, v in result.params.items():
        assert torch.equal(params[k].detach(), v[0].detach())
    for k, v in result.rule_state.items():
        assert torch.equal(state[k].detach(), v.detach())
    got_grad = torch.autograd.grad(torch.stack(losses).mean(), list(rule.parameters()))
    for got, expected in zip(got_grad, expected_grad, strict=True):
        assert torch.equal(got, expected)


# ----------------------------------------------------------------------------- gradients
def quadratic_problem(
    seed: int = 0, dtype: torch.dtype = F64, device: str = "cpu"
) -> tuple[dict[str, Tensor], Callable[[Mapping[str, Tensor]], Tensor]]:
    """A tiny least-squares problem ``|W w + b - y|^2`` over two tensors, ``w`` (2, 2) and ``b``
    (2,), and its starting point (drawn in float64, then cast)."""
    g = torch.Generator().manual_seed(seed)
    x, y = (torch.randn(5, *shape, generator=g, dtype=F64).to(dtype=dtype, device=device) for shape in ((2, 2), (2,)))

    def loss_fn(params: Mapping[str, Tensor]) -> Tensor:
        return ((x @ params["w"]).sum(dim=2) + params["b"] - y).square().mean()

    start = {k: 0.5 * torch.randn(shape, generator=g, dtype=F64).to(dtype=dtype, device=device) for k, shape in (("w", (2, 2)), ("b", (2,)))}
    return start, loss_fn


def inner_loop(rule, params: Mapping[str, Tensor], loss_fn, steps: int, *, lr: float | Tensor = 0.5) -> Tensor:
    """The mean loss after each of ``steps`` learned steps from ``params``, the gradients built
    with ``create_graph=True`` and the loss passed with its graph: every second-order term kept."""
    params = {k: v.detach().requires_grad_(True) for k, v in params.items()}  # leaves to differentiate
    state = init_rule_state(rule, params)
    losses = []
    loss = loss_fn(params)
    for _ in range(steps):
        grads = grads_of(loss, params, create_graph=True)
        params, state = learned_step(rule, params, grads, state, loss=loss, lr=lr)
        loss = loss_fn(params)
        losses.append(loss)
    return torch.stack(losses).mean()


@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_meta_gradient_of_the_rule_through_learned_steps_matches_central_differences(kind: str) -> None:
    rule = random_rule(kind, seed=1)
    start, loss_fn = quadratic_problem()
    analytic = torch.autograd.grad(inner_loop(rule, start, loss_fn, 3), list(rule.parameters()))
    assert max(a.abs().max().item() for a in analytic) > 1e-3  # a real signal, not all zeros
    for weight, got in zip(rule.parameters(), analytic, strict=True):
        numeric = central_difference(lambda: inner_loop(rule, start, loss_fn, 3).item(), weight)
        torch.testing.assert_close(got, numeric, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_maml_style_gradient_of_the_initial_parameters_matches_central_differences(kind: str) -> None:
    """A learned initialisation adapted by learned steps (``functional_call``, gradients with
    ``create_graph=True``): the query loss's gradient with respect to the initial parameters
    has the second-order terms, and equals central differences; without ``create_graph`` it
    differs (the Hessian terms matter)."""
    rule = random_rule(kind, seed=2)
    model = torch.nn.Linear(3, 2).double()
    g = torch.Generator().manual_seed(4)
    x_s, y_s, x_q, y_q = (torch.randn(6, n, generator=g, dtype=F64) for n in (3, 2, 3, 2))
    init = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}

    def query_loss(params: Mapping[str, Tensor], create_graph: bool = True) -> Tensor:
        state = init_rule_state(rule, params)
        for _ in range(2):
            loss = torch.nn.functional.mse_loss(functional_call(model, params, (x_s,)), y_s)
            grads = grads_of(loss, params, create_graph=create_graph)
            params, state = learned_step(rule, params, grads, state, loss=loss if create_graph else loss.detach(), lr=0.5)
        return torch.nn.functional.mse_loss(functional_call(model, params, (x_q,)), y_q)

    analytic = torch.autograd.grad(query_loss(init), list(init.values()))
    first_order = torch.autograd.grad(query_loss(init, create_graph=False), list(init.values()))
    assert max(a.abs().max().item() for a in analytic) > 1e-3
    assert any(not torch.allclose(a, b, rtol=1e-3) for a, b in zip(analytic, first_order, strict=True))
    for (name, tensor), got in zip(init.items(), analytic, strict=True):
        numeric = central_difference(lambda: query_loss(init).item(), tensor)
        torch.testing.assert_close(got, numeric, rtol=1e-5, atol=1e-7, msg=name)



@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_second_order_steps_with_moving_averages_of_an_always_zero_gradient_match_central_differences(kind: str) -> None:
    """With RMS and momentum states, a weight whose gradient is always exactly zero (on an input
    feature that is always 0: ``sqrt``'s infinite derivative at 0, which made ``meta-train``'s
    second-order meta-gradients NaN) leaves the second-order gradient of the query loss with
    respect to the initial parameters and the rule's weights finite, and the former equal to
    central differences."""
    rule = random_rule(kind, seed=3, **MOVING_AVERAGES[kind])
    model = torch.nn.Linear(3, 2).double()
    g = torch.Generator().manual_seed(4)
    x_s, y_s, x_q, y_q = (torch.randn(6, n, generator=g, dtype=F64) for n in (3, 2, 3, 2))
    x_s[:, 0] = 0  # weight[:, 0]'s gradient: exactly 0 at every step
    init = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}

    def query_loss(params: Mapping[str, Tensor]) -> Tensor:
        state = init_rule_state(rule, params)
        for _ in range(2):
            loss = torch.nn.functional.mse_loss(functional_call(model, params, (x_s,)), y_s)
            params, state = learned_step(rule, params, grads_of(loss, params, create_graph=True), state, loss=loss, lr=0.5)
        return torch.nn.functional.mse_loss(functional_call(model, params, (x_q,)), y_q)

    analytic = torch.autograd.grad(query_loss(init), [*init.values(), *rule.parameters()])
    assert all(torch.isfinite(a).all() for a in analytic)
    for (name, tensor), got in zip(init.items(), analytic, strict=False):
        numeric = central_difference(lambda: query_loss(init).item(), tensor)
        torch.testing.assert_close(got, numeric, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_gradient_of_a_learned_step_size_matches_central_differences(kind: str) -> None:
    """A one-element ``lr`` tensor is a meta-parameter as the rule's weights are (a learned step
    size, as in Meta-SGD): the meta-loss's gradient with respect to it, second order, equals
    central differences."""
    rule = random_rule(kind, seed=5)
    start, loss_fn = quadratic_problem(seed=1)
    lr = torch.tensor(0.4, dtype=F64, requires_grad=True)
    (analytic,) = torch.autograd.grad(inner_loop(rule, start, loss_fn, 3, lr=lr), lr)
    numeric = central_difference(lambda: inner_loop(rule, start, loss_fn, 3, lr=lr).item(), lr)
    assert analytic.abs() > 1e-3
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-8)

def test_gradients_reach_the_given_gradients_and_states() -> None:
    """Nothing is detached: the new parameters depend on the gradients and the states given."""
    rule = random_rule("lstm")
    start, _ = quadratic_problem()
    grads = {k: torch.randn_like(v).requires_grad_(True) for k, v in start.items()}
    state = {k: (0.1 * torch.randn_like(v)).requires_grad_(True) for k, v in init_rule_state(rule, start).items()}
    new, new_state = learned_step(rule, start, grads, state)
    out = sum(v.sum() for v in new.values()) + sum(v.sum() for v in new_state.values())
    for what in (*grads.values(), *state.values()):
        (d,) = torch.autograd.grad(out, what, retain_graph=True)
        assert d.abs().max() > 0


# ----------------------------------------------------------------------------- the functions themselves
def test_init_rule_state_is_the_rules_initial_state_for_every_coordinate() -> None:
    for rule in (CoordinateLSTM(hidden_size=4, num_layers=2, momentum_decays=(0.9,)), MetaLSTMCell(hidden_size=3).double()):
        dtype = next(rule.parameters()).dtype
        params = {"a": torch.zeros(2, 3, dtype=dtype), "b": torch.zeros((), dtype=dtype), "c": torch.zeros(0, dtype=dtype)}
        state = init_rule_state(rule, params)
        expected = rule.init_state(7, dtype=dtype, device="cpu")
        assert state.keys() == expected.keys()
        for name, value in expected.items():
            assert state[name].dtype == value.dtype and torch.equal(state[name], value)


def test_a_step_is_pure_and_keeps_names_shapes_and_order() -> None:
    """Inputs are not changed; the result has the parameters' names, order, shapes and dtype
    (0-dim and empty tensors too); a rule without ``needs_loss`` ignores a loss; a number is
    the same loss as a tensor; under ``torch.no_grad()`` it runs without a graph."""
    params = {"z": torch.randn(3, 2), "s": torch.tensor(0.5), "e": torch.zeros(0, 4), "a": torch.randn(4)}
    grads = {k: torch.randn_like(v) for k, v in reversed(params.items())}  # any order of names
    before = {k: v.clone() for k, v in params.items()}
    for rule in (CoordinateLSTM(), MetaLSTMCell()):
        state = init_rule_state(rule, params)
        saved = {k: v.clone() for k, v in state.items()}
        new, new_state = learned_step(rule, params, grads, state, loss=0.25, lr=0.5)
        assert list(new) == list(params)
        assert all(new[k].shape == v.shape and new[k].dtype == v.dtype for k, v in params.items())
        assert all(new_state[k].shape == v.shape for k, v in state.items())
        assert all(torch.equal(params[k], v) for k, v in before.items())
        assert all(torch.equal(state[k], v) for k, v in saved.items())
        again, again_state = learned_step(rule, params, grads, state, loss=torch.tensor(0.25), lr=0.5)
        assert all(torch.equal(again[k], v) for k, v in new.items())
        assert all(torch.equal(again_state[k], v) for k, v in new_state.items())
        with torch.no_grad():
            quiet, _ = learned_step(rule, params, grads, state, loss=0.25, lr=0.5)
        assert all(torch.equal(quiet[k], v) for k, v in new.items())
    plain, _ = learned_step(CoordinateLSTM(), params, grads, init_rule_state(CoordinateLSTM(), params))
    assert set(plain) == set(params)



@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_a_step_leaves_the_rule_and_the_global_random_state_as_they_were(kind: str) -> None:
    """No hidden state: a step (with its graph, and its backward) draws nothing from torch's
    global generator, changes none of the rule's weights, its mode or its inputs'
    ``requires_grad``, and two calls on the same inputs give the same bits."""
    rule = random_rule(kind, **MOVING_AVERAGES[kind])
    _, params, grads, _ = _setup(kind)
    params = {k: v.requires_grad_(True) for k, v in params.items()}
    weights = {k: v.clone() for k, v in rule.state_dict().items()}
    generator = torch.get_rng_state()
    for mode in (True, False):
        rule.train(mode)
        new, new_state = learned_step(rule, params, grads, init_rule_state(rule, params), loss=torch.tensor(0.3, dtype=F64), lr=0.5)
        sum(v.sum() for v in new.values()).backward()
        again, again_state = learned_step(rule, params, grads, init_rule_state(rule, params), loss=torch.tensor(0.3, dtype=F64), lr=0.5)
        assert rule.training is mode
        assert all(torch.equal(again[k], v) for k, v in new.items())
        assert all(torch.equal(again_state[k], v) for k, v in new_state.items())
    assert torch.equal(torch.get_rng_state(), generator)
    assert all(torch.equal(v, weights[k]) for k, v in rule.state_dict().items())
    assert all(v.requires_grad for v in params.values()) and not any(v.requires_grad for v in grads.values())

def test_a_huge_loss_is_saturated_as_the_optimizer_reads_it() -> None:
    """A float64 loss over float32's range is read as float32's largest value, as
    ``MetaLSTMOptimizer.step(loss=...)`` reads it (not Inf)."""
    rule = MetaLSTMCell()
    model = torch.nn.Linear(3, 1)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    for k, p in model.named_parameters():
        p.grad = grads[k].clone()
    optimizer = MetaLSTMOptimizer(model.parameters(), weights=rule, foreach=False)
    optimizer.step(loss=1e39)
    new, _ = learned_step(rule, params, grads, init_rule_state(rule, params), loss=1e39)
    for k, p in model.named_parameters():
        assert torch.isfinite(new[k]).all()
        torch.testing.assert_close(new[k], p.detach())


# ----------------------------------------------------------------------------- errors
def _setup(kind: str = "lstm") -> tuple:
    rule = random_rule(kind)
    params = {"w": torch.randn(2, 3, dtype=F64), "b": torch.randn(2, dtype=F64)}
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    return rule, params, grads, init_rule_state(rule, params)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r, p, g, s: (r, p, {"w": g["w"]}, s, {}), r"grads must have the names of params: missing \['b'\], not in params \[\]"),
        (lambda r, p, g, s: (r, p, {**g, "x": g["b"]}, s, {}), r"grads must have the names of params: missing \[\], not in params \['x'\]"),
        (lambda r, p, g, s: (r, p, {**g, "w": g["w"].t()}, s, {}), r"grads\['w'\] has shape \(3, 2\), params\['w'\] \(2, 3\)"),
        (lambda r, p, g, s: (r, p, {**g, "b": None}, s, {}), r"grads\['b'\] is None, not a tensor \(a parameter the loss does not use"),
        (lambda r, p, g, s: (r, p, {**g, "b": g["b"].float()}, s, {}),
         (r"learned_step needs one dtype for the parameters, their gradients, the rule's states and its weights, got: "
          r"torch\.float64 \(params\['w'\]\), torch\.float32 \(grads\['b'\]\)")),
        (lambda r, p, g, s: (r.float(), p, g, s, {}),
         r"one dtype .*: torch\.float64 \(params\['w'\]\), torch\.float32 \(rule weight '.+'\)"),
        (lambda r, p, g, s: (r, p, g, {k: v.float() for k, v in s.items()}, {}),
         r"one dtype .*: torch\.float64 \(params\['w'\]\), torch\.float32 \(state 'h'\)"),
        (lambda r, p, g, s: (r, {k: v.to("meta") for k, v in p.items()}, {k: v.to("meta") for k, v in g.items()}, s, {}),
         r"learned_step needs one device .*: meta \(params\['w'\]\), cpu \(state 'h'\)"),
        (lambda r, p, g, s: (r, p, g, init_rule_state(r, {"w": p["w"]}), {}),
         r"state 'h' has shape \(1, 6, 3\), the 8 coordinates of params need \(1, 8, 3\): start from init_rule_state"),
        (lambda r, p, g, s: (r, p, g, {"h": s["h"]}, {}),
         r"the state has \['h'\], the CoordinateLSTM rule's states are \['c', 'h'\]: start from init_rule_state"),
        (lambda r, p, g, s: (r, {}, {}, s, {}), r"learned_step: params is empty"),
        (lambda r, p, g, s: (r, {**p, "n": torch.ones(2, dtype=torch.int64)}, g, s, {}),
         r"learned_step: params\['n'\] is torch\.int64: learned updates need floating-point tensors"),
        (lambda r, p, g, s: (r, p, g, s, {"backend": "cuda"}), r"backend must be one of \('auto', 'torch', 'triton'\), got 'cuda'"),
    ],
    ids=["grads-missing", "grads-extra", "grads-shape", "grads-none", "grads-dtype", "rule-dtype", "state-dtype",
         "device", "state-shape", "state-names", "no-params", "int-params", "backend"],
)
@pytest.mark.parametrize("nan_policy", [None, "raise"])  # the inputs are checked before their values
def test_learned_step_refuses_in_one_line(change, message: str, nan_policy: str | None) -> None:
    rule, params, grads, state, options = change(*_setup())
    with pytest.raises(ValueError, match=message) as info:
        learned_step(rule, params, grads, state, nan_policy=nan_policy, **options)
    assert "\n" not in str(info.value)



@pytest.mark.parametrize("nan_policy", [None, "raise"])
def test_learned_step_refuses_a_sparse_gradient_in_one_line(nan_policy: str | None) -> None:
    """``nn.Embedding(sparse=True)``'s gradient, as ``torch.autograd.grad`` gives it, failed in the
    step with torch's "reshape is not implemented for sparse tensors"; it is refused naming the
    parameter, as the optimizers refuse it."""
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    params = dict(embedding.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(embedding(torch.tensor([1, 2])).sum(), list(params.values())), strict=True))
    assert grads["weight"].is_sparse
    rule = CoordinateLSTM()
    with pytest.raises(ValueError, match=r"^learned_step: grads\['weight'\] is sparse \(torch\.sparse_coo\): learned updates need dense "
                                         r"gradients \(grads\['weight'\]\.to_dense\(\)\)$"):  # fmt: skip
        learned_step(rule, params, grads, init_rule_state(rule, params), nan_policy=nan_policy)
    learned_step(rule, params, {"weight": grads["weight"].to_dense()}, init_rule_state(rule, params), nan_policy=nan_policy)

@pytest.mark.parametrize(
    ("loss", "message"),
    [
        (None, r"MetaLSTMCell reads the optimizee's loss: pass learned_step\(\.\.\., loss=loss\)"),
        (torch.ones(2, dtype=F64), r"the loss must be a scalar, got shape \(2,\)"),
        (torch.ones((), dtype=F64, device="meta"), r"the loss is on meta, the parameters on cpu"),
        ("0.5", r"the loss must be a real number or a one-element tensor, got '0\.5'"),
        (True, r"the loss must be a real number or a one-element tensor, got True"),
    ],
    ids=["none", "vector", "device", "string", "bool"],
)
@pytest.mark.parametrize("nan_policy", [None, "raise"])
def test_learned_step_refuses_a_missing_or_malformed_loss(loss, message: str, nan_policy: str | None) -> None:
    rule, params, grads, state = _setup("meta")
    with pytest.raises(ValueError, match=message):
        learned_step(rule, params, grads, state, loss=loss, nan_policy=nan_policy)
    learned_step(rule, params, grads, state, loss=torch.ones(1, 1, dtype=F64))  # one element is a scalar


NAN, INF = float("nan"), float("inf")


def _spoil(tensor: Tensor, value: float) -> Tensor:
    """A copy of ``tensor`` with ``value`` at its last element."""
    spoilt = tensor.clone()
    spoilt.view(-1)[-1] = value
    return spoilt


@pytest.mark.parametrize(
    ("kind", "config", "spoil", "message"),
    [
        ("lstm", {}, {"grad": ("b", NAN)}, r"the gradient of params\['b'\] \(shape \(2,\)\) contains NaN or Inf \(1 tensor"),
        ("lstm", {}, {"grad": ("w", INF), "value": ("w", NAN)},
         r"the gradient of params\['w'\] \(shape \(2, 3\)\) contains NaN or Inf \(1 tensor"),
        ("lstm", {"param_input": True}, {"value": ("b", -INF)},
         r"the value of params\['b'\] \(shape \(2,\)\) contains NaN or Inf \(1 tensor"),
        ("lstm", {"param_input": True}, {"grad": ("w", NAN), "value": ("b", NAN)},
         r"the gradient of params\['w'\] \(shape \(2, 3\)\) contains NaN or Inf \(2 tensor"),
        ("meta", {}, {"loss": INF}, r"the loss is inf"),
        ("meta", {}, {"loss": NAN}, r"the loss is nan"),
        ("meta", {}, {"grad": ("b", NAN)}, r"the gradient of params\['b'\] \(shape \(2,\)\) contains NaN or Inf"),
    ],
    ids=["grad-nan", "grad-inf", "read-value", "grad-and-value", "loss-inf", "loss-nan", "meta-grad"],
)
def test_nan_policy_raise_stops_what_the_optimizers_stop_naming_it(kind: str, config: dict, spoil: dict, message: str) -> None:
    """``nan_policy="raise"`` raises NonFiniteGradientError, naming the input, exactly where the
    optimizer with ``nan_policy="raise"`` on the same rule and inputs raises; by default
    (``None``, as ``unroll``) the NaN/Inf flows into the step unchecked."""
    from learnedopt import NonFiniteGradientError

    rule = random_rule(kind, **config)
    params = {"w": torch.randn(2, 3, dtype=F64), "b": torch.randn(2, dtype=F64)}
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    loss = spoil.get("loss", 0.5)
    if "grad" in spoil:
        grads[spoil["grad"][0]] = _spoil(grads[spoil["grad"][0]], spoil["grad"][1])
    if "value" in spoil:
        params[spoil["value"][0]] = _spoil(params[spoil["value"][0]], spoil["value"][1])
    state = init_rule_state(rule, params)
    assert issubclass(NonFiniteGradientError, RuntimeError)  # as before it moved to learnedopt.errors
    with pytest.raises(NonFiniteGradientError, match=f"^learned_step: {message}") as info:
        learned_step(rule, params, grads, state, loss=loss, nan_policy="raise")
    assert "\n" not in str(info.value) and "nan_policy='raise', so nothing was computed" in str(info.value)
    leaves = [torch.nn.Parameter(v.clone()) for v in params.values()]
    for leaf, grad in zip(leaves, grads.values(), strict=True):
        leaf.grad = grad.clone()
    optimizer = OPTIMIZERS[kind](leaves, weights=rule, state_dtype=F64, nan_policy="raise")
    with pytest.raises(NonFiniteGradientError):
        optimizer.step(loss=loss)
    new, _ = learned_step(rule, params, grads, state, loss=loss)  # the default: no check
    # the NaN reaches the step (an Inf loss is read saturated at the largest float64)
    assert all(torch.isfinite(v).all() for v in new.values()) == (loss == INF)


def test_nan_policy_raise_passes_what_the_rule_does_not_read_and_changes_no_step() -> None:
    """A NaN parameter value is not checked for a rule that does not read values (the
    optimizers' check too); where every input is finite, the step is the unchecked one, bit for bit."""
    rule, params, grads, state = _setup()
    checked = learned_step(rule, params, grads, state, nan_policy="raise")
    unchecked = learned_step(rule, params, grads, state)
    for a, b in zip(checked, unchecked, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a finite Python loss beyond float32's range is read in float64, as the optimizers read it
    rule, params, grads, state = _setup("meta")
    checked = learned_step(rule, params, grads, state, loss=1e300, nan_policy="raise")
    unchecked = learned_step(rule, params, grads, state, loss=1e300)
    assert all(torch.equal(checked[0][k], unchecked[0][k]) for k in params)
    leaves = [torch.nn.Parameter(v.clone()) for v in params.values()]
    for leaf, grad in zip(leaves, grads.values(), strict=True):
        leaf.grad = grad.clone()
    MetaLSTMOptimizer(leaves, weights=rule, state_dtype=F64, nan_policy="raise").step(loss=1e300)
    rule, params, grads, state = _setup()
    nan_value = {**params, "b": _spoil(params["b"], NAN)}
    new, _ = learned_step(rule, nan_value, grads, state, nan_policy="raise")
    assert torch.isnan(new["b"][-1]) and torch.isfinite(new["w"]).all()


def test_nan_policy_raise_passes_huge_finite_values_whose_2_norm_overflows() -> None:
    """Gradients and parameter values of 1e200 are finite, though their float64 2-norm is Inf:
    ``nan_policy="raise"`` steps them, as it steps without the check; one NaN among them is refused."""
    rule = random_rule("lstm", param_input=True)
    params = {"w": torch.full((2, 3), 1e200, dtype=F64), "b": torch.full((2,), -1e200, dtype=F64)}
    grads = {k: v.clone() for k, v in params.items()}
    assert not torch.isfinite(torch.linalg.vector_norm(grads["w"])), "the case really overflows the 2-norm"
    state = init_rule_state(rule, params)
    checked, _ = learned_step(rule, params, grads, state, nan_policy="raise")
    unchecked, _ = learned_step(rule, params, grads, state)
    assert all(torch.equal(checked[k], unchecked[k]) for k in params)
    for spoilt in ({**grads, "w": _spoil(grads["w"], NAN)}, {**grads, "b": _spoil(grads["b"], -INF)}):
        with pytest.raises(NonFiniteGradientError, match=r"\(1 tensor\(s\) affected\)"):
            learned_step(rule, params, spoilt, state, nan_policy="raise")
    with pytest.raises(NonFiniteGradientError, match=r"the value of params\['w'\]"):
        learned_step(rule, {**params, "w": _spoil(params["w"], INF)}, grads, state, nan_policy="raise")


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ("skip", r"nan_policy must be None or 'raise', got 'skip' \('skip' is the optimizers': a functional step returns every"),
        ("Raise", r"nan_policy must be None or 'raise', got 'Raise'$"),
    ],
)
def test_learned_step_refuses_an_unknown_nan_policy(policy: str, message: str) -> None:
    rule, params, grads, state = _setup()
    with pytest.raises(ValueError, match=message):
        learned_step(rule, params, grads, state, nan_policy=policy)


def test_init_rule_state_refuses_parameters_it_cannot_give_states() -> None:
    rule = CoordinateLSTM()
    with pytest.raises(ValueError, match=r"init_rule_state: params is empty"):
        init_rule_state(rule, {})
    with pytest.raises(ValueError, match=r"params\['b'\] is torch\.float64, params\['a'\] torch\.float32: the parameters need one dtype"):
        init_rule_state(rule, {"a": torch.zeros(2), "b": torch.zeros(2, dtype=F64)})
    with pytest.raises(ValueError, match=r"params\['b'\] is meta, params\['a'\] cpu: the parameters need one device"):
        init_rule_state(rule, {"a": torch.zeros(2), "b": torch.zeros(2, device="meta")})
    with pytest.raises(ValueError, match=r"params\['a'\] is list: learned updates need floating-point tensors"):
        init_rule_state(rule, {"a": [1.0]})



@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_the_triton_backend_takes_the_same_step_and_meta_gradient(kind: str) -> None:
    """``backend="triton"`` (the differentiable kernels; interpreted on CPU) gives the PyTorch
    path's parameters, states and gradients with respect to the rule's weights and the initial
    parameters, to float32 rounding; float64 is refused in one line naming the backend."""
    pytest.importorskip("triton", reason="the kernels need Triton")
    from learnedopt.kernels.coordinate_lstm_step import is_interpreted

    if not (is_interpreted() or torch.cuda.is_available()):
        pytest.skip("no CUDA device and TRITON_INTERPRET is off: nothing can run the kernels")
    device = "cpu" if is_interpreted() else "cuda"
    rule = random_rule(kind).float().to(device)
    start, loss_fn = quadratic_problem(dtype=torch.float32, device=device)
    results = {}
    for backend in ("torch", "triton"):
        params = {k: v.clone().requires_grad_(True) for k, v in start.items()}
        current, state, losses = dict(params), init_rule_state(rule, params), []
        loss = loss_fn(current)
        for _ in range(2):
            grads = grads_of(loss, current, create_graph=True)
            current, state = learned_step(rule, current, grads, state, loss=loss, lr=0.5, backend=backend)
            loss = loss_fn(current)
            losses.append(loss)
        meta = torch.autograd.grad(torch.stack(losses).mean(), [*rule.parameters(), *params.values()])
        results[backend] = (current, state, meta)
    for got, expected in zip(results["triton"], results["torch"], strict=True):
        if isinstance(got, dict):
            got, expected = list(got.values()), list(expected.values())
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-4, atol=1e-6)
    double = random_rule(kind)
    params64, _ = quadratic_problem()
    grads64 = {k: torch.ones_like(v) for k, v in params64.items()}
    with pytest.raises(ValueError, match=r"backend='triton' cannot run this update: float32 only"):
        learned_step(double, params64, grads64, init_rule_state(double, params64), loss=1.0, backend="triton")


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), "1", None, True, torch.tensor([1.0, 2.0]), torch.tensor(1)])
def test_learned_step_and_unroll_refuse_an_lr_that_is_not_a_finite_number(lr) -> None:
    """A NaN lr stepped every parameter to NaN in silence, and "1" was a TypeError about indexing."""
    rule = CoordinateLSTM(hidden_size=4)
    params = {"w": torch.randn(3), "b": torch.randn(2)}
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    message = r"lr must be a finite real number or a one-element floating-point tensor, got "
    with pytest.raises(ValueError, match=rf"^learned_step: {message}"):
        learned_step(rule, params, grads, init_rule_state(rule, params), lr=lr)
    g = generator_for(3)
    tasks = QuadraticFamily(dim=4).sample_batch(2, g)
    start = tasks.init_params(g)
    with pytest.raises(ValueError, match=rf"^unroll: {message}"):
        unroll(rule, tasks, start, rule.init_state(num_coordinates(start), dtype=torch.float32, device="cpu"), 1, lr=lr)
    learned_step(rule, params, grads, init_rule_state(rule, params), lr=torch.tensor(0.5, requires_grad=True))


def test_learned_step_takes_params_and_grads_as_dicts_only() -> None:
    """A list of tensors, as torch.optim takes them, was an AttributeError ('list' has no 'items')."""
    rule = CoordinateLSTM(hidden_size=4)
    params = {"w": torch.randn(3)}
    state = init_rule_state(rule, params)
    with pytest.raises(TypeError, match=r"^learned_step: params must be a dict of names to tensors .*, got a list$"):
        learned_step(rule, [params["w"]], [torch.ones(3)], state)
    with pytest.raises(TypeError, match=r"^learned_step: grads must be a dict with the names of params, got a list$"):
        learned_step(rule, params, [torch.ones(3)], state)
    with pytest.raises(TypeError, match=r"^init_rule_state: params must be a dict"):
        init_rule_state(rule, [params["w"]])


class _TwoTensorQuadratic(Task):
    """``|w - c|^2 + (b - 1)^2 |w|^2``: three coordinates per task, in two tensors."""

    def __init__(self, c: Tensor) -> None:
        self.c = c

    def init_params(self, generator: torch.Generator) -> dict[str, Tensor]:
        return {"w": torch.randn(2, generator=generator, dtype=F64), "b": torch.randn(1, generator=generator, dtype=F64)}

    def loss(self, params: Mapping[str, Tensor], step_index: int) -> Tensor:
        return (params["w"] - self.c).square().sum() + ((params["b"] - 1.0).square() * params["w"].square()).sum()


@pytest.mark.parametrize("state", [lambda s: tuple(s.values()), lambda s: list(s.values()), lambda s: s["h"], lambda s: None],
                         ids=["tuple", "list", "tensor", "none"])  # fmt: skip
def test_learned_step_and_unroll_take_the_state_as_a_dict_only(state: Callable) -> None:
    """States given as a tuple or list of tensors (as ``nn.LSTM`` takes ``(h, c)``) failed with
    torch's "Boolean value of Tensor with more than one value is ambiguous", a lone tensor with a
    ValueError printing its values over many lines, None with "'NoneType' object is not
    iterable": each is a one-line TypeError naming the rule's states."""
    rule, params, grads, good = _setup()
    message = r"^the state must be a dict of the CoordinateLSTM rule's states \['c', 'h'\] \(name -> tensor\), got a \w+$"
    with pytest.raises(TypeError, match=message):
        learned_step(rule, params, grads, state(good))
    tasks = TaskBatch([_TwoTensorQuadratic(torch.tensor([1.0, 2.0], dtype=F64))])
    start = tasks.init_params(torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match=message):
        unroll(rule, tasks, start, state(rule.init_state(num_coordinates(start), dtype=F64, device="cpu")), 1)



def test_learned_step_and_unroll_refuse_an_lr_tensor_on_another_device_in_one_line() -> None:
    """An lr tensor on another device than the parameters (a learned step size kept on the GPU,
    CPU parameters; here ``meta``) failed in the step with torch's "Tensor on device cpu is not
    on the expected device meta!". It is refused naming both devices; a one-element CPU tensor
    with parameters elsewhere is torch's CPU scalar, which works (not checked here: no second
    device)."""
    rule, params, grads, state = _setup()
    lr = torch.tensor(0.5, dtype=F64, device="meta")
    message = r"lr is a tensor on meta, the parameters on cpu: put it on their device, or give a number$"
    with pytest.raises(ValueError, match=rf"^learned_step: {message}"):
        learned_step(rule, params, grads, state, lr=lr)
    tasks = TaskBatch([_TwoTensorQuadratic(torch.tensor([1.0, 2.0], dtype=F64))])
    start = tasks.init_params(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=rf"^unroll: {message}"):
        unroll(rule, tasks, start, rule.init_state(num_coordinates(start), dtype=F64, device="cpu"), 1, lr=lr)

@pytest.mark.parametrize("shape", [(), (1,), (1, 1), (1, 1, 1)])
def test_a_one_element_lr_tensor_of_any_shape_steps_as_its_number(shape: tuple[int, ...]) -> None:
    """An ``lr`` tensor of one element is taken whatever its shape (it may be learned): a
    ``(1, 1)`` one broadcast the step to ``(1, n)``, which ``learned_step`` then failed to split
    ("split_with_sizes expects split_sizes to sum exactly to 1"), and a ``(1, 1, 1)`` one made
    ``unroll``'s steps ``(1, B, P)``, split along the tasks: with as many tasks as coordinates
    per task, task values went to other tasks' parameters, in silence."""
    rule = random_rule("lstm", seed=1)
    g = generator_for(2)
    tasks = TaskBatch([_TwoTensorQuadratic(torch.randn(2, generator=g, dtype=F64)) for _ in range(3)])  # B = P = 3
    start = tasks.init_params(g)
    state = rule.init_state(num_coordinates(start), dtype=F64, device="cpu")
    expected = unroll(rule, tasks, start, state, 2, lr=0.5)
    lr = torch.full(shape, 0.5, dtype=F64, requires_grad=True)
    got = unroll(rule, tasks, start, state, 2, lr=lr)
    assert torch.equal(got.losses, expected.losses)
    for k, v in expected.params.items():
        assert torch.equal(got.params[k], v), k
    (grad,) = torch.autograd.grad(got.meta_loss, [lr])
    assert grad.shape == shape and grad.abs().item() > 0

    params = {k: v[0] for k, v in start.items()}
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    one_state = init_rule_state(rule, params)
    reference, _ = learned_step(rule, params, grads, one_state, lr=0.5)
    stepped, _ = learned_step(rule, params, grads, one_state, lr=lr)
    for k, v in reference.items():
        assert stepped[k].shape == v.shape and torch.equal(stepped[k], v), k


# ----------------------------------------------------------------------------- huge gradients
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's g * g
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("kind", ["lstm", "meta"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_huge_finite_gradients_of_alternating_sign_keep_the_step_finite(kind: str, backend: str, dtype: torch.dtype) -> None:
    """As in the optimizers: ``lerp(g, m, beta)``'s ``m - g`` overflowed for moving averages and
    gradients near the largest value of opposite signs, the state turning Inf and the parameters
    NaN. learned_step (and the unroll, which shares its rule call) saturates the gradient the
    moving averages read at half that largest value."""
    if backend == "triton" and dtype == F64:
        pytest.skip("the Triton kernels run float32 math")
    rule = random_rule(kind, **MOVING_AVERAGES[kind]).to(dtype)
    huge = 0.9 * torch.finfo(dtype).max
    params = {"w": torch.tensor([0.5, -1.0, 2.0], dtype=dtype)}
    state = init_rule_state(rule, params)
    for sign in (1, 1, -1, 1, -1, -1, 0):
        grads = {"w": torch.tensor([huge, -huge, 1e-3], dtype=dtype) * sign}
        params, state = learned_step(rule, params, grads, state, loss=torch.tensor(0.5, dtype=dtype), lr=1e-3, backend=backend)
        assert all(torch.isfinite(s).all() for s in state.values()), state
        assert torch.isfinite(params["w"]).all(), params


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_a_float8_loss_is_read_as_its_value(dtype: torch.dtype) -> None:
    """A one-element float8 loss is a real number: learned_step failed on it in torch's dtype
    promotion (which float8 lacks), and under nan_policy="raise" in the NaN/Inf check; it reads
    it as its value, as the float32 tensor of it."""
    torch.manual_seed(0)
    rule = MetaLSTMCell()
    params = {"w": torch.linspace(-1, 1, 5)}
    grads = {"w": torch.linspace(0.5, -0.5, 5)}
    runs = [
        learned_step(rule, params, grads, init_rule_state(rule, params), loss=loss)[0]["w"]
        for loss in (torch.tensor(0.5), torch.tensor(0.5).to(dtype))
    ]
    assert torch.equal(runs[1], runs[0])
    # and nan_policy="raise" judges it as its value (its NaN/Inf check failed on float8 too)
    with pytest.raises(NonFiniteGradientError, match="the loss is nan"):
        learned_step(rule, params, grads, init_rule_state(rule, params), loss=torch.tensor(float("nan")).to(dtype), nan_policy="raise")


@pytest.mark.parametrize("nan_policy", [None, "raise"])
@pytest.mark.parametrize("huge", [10**400, -(10**400)], ids=["int", "negative int"])
def test_a_number_loss_beyond_float64_saturates(huge: int, nan_policy: str | None) -> None:
    """A Python int beyond float64's range is a finite loss: learned_step failed on it with a bare
    ``OverflowError``; it reads it saturated at the largest float64 of its sign, as a finite
    tensor loss beyond the math dtype's range is read."""
    torch.manual_seed(0)
    rule = MetaLSTMCell()
    params = {"w": torch.linspace(-1, 1, 5)}
    grads = {"w": torch.linspace(0.5, -0.5, 5)}
    largest = torch.finfo(torch.float64).max
    runs = [
        learned_step(rule, params, grads, init_rule_state(rule, params), loss=loss, nan_policy=nan_policy)[0]["w"]
        for loss in (huge, largest if huge > 0 else -largest)
    ]
    assert torch.equal(runs[0], runs[1])



# ----------------------------------------------------------------------------- torch.func transforms
@dataclass(frozen=True)
class _PlainMomentumConfig:
    beta: float = 0.9


class _PlainMomentum(UpdateRule):
    """A rule of plain torch operations (no hand-written backward), reading the loss:
    ``step = -loss * (a * m + b * tanh(grad))``, ``m`` a momentum; ``torch.func`` sees into it."""

    kind = "TestPlainMomentum"
    config_class = _PlainMomentumConfig
    needs_loss = True

    def __init__(self, config: _PlainMomentumConfig | None = None, **overrides) -> None:
        super().__init__(config, **overrides)
        self.a = torch.nn.Parameter(torch.tensor(0.3, dtype=F64))
        self.b = torch.nn.Parameter(torch.tensor(0.7, dtype=F64))

    def state_spec(self) -> dict[str, StateSpec]:
        return {"m": StateSpec((1,), moving_average=True)}

    def forward(self, grad: Tensor, param: Tensor, state: Mapping[str, Tensor], loss: Tensor | None = None):
        m = torch.lerp(grad, state["m"], self.config.beta)
        return -loss * (self.a * m[0] + self.b * grad.tanh()), {"m": m}


def _batched_problem(tasks: int = 3) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor], Tensor]:
    """``tasks`` tasks' float64 parameters, gradients, momenta and losses, stacked on dim 0."""
    g = torch.Generator().manual_seed(5)
    params = {"w": torch.randn(tasks, 2, 3, generator=g, dtype=F64), "b": torch.randn(tasks, 2, generator=g, dtype=F64)}
    grads = {k: torch.randn(v.shape, generator=g, dtype=F64) for k, v in params.items()}
    state = {"m": torch.randn(tasks, 1, 8, generator=g, dtype=F64)}
    return params, grads, state, torch.rand(tasks, generator=g, dtype=F64)


def _task(tree: Mapping[str, Tensor], i: int) -> dict[str, Tensor]:
    return {k: v[i] for k, v in tree.items()}


@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_the_library_rules_refuse_torch_func_transforms_over_learned_step_in_one_line(kind: str) -> None:
    """As the README says: ``grad``, ``jacrev``, ``jvp`` and ``vmap`` over ``learned_step`` with
    ``CoordinateLSTM`` or ``MetaLSTMCell`` (whose LSTM's backward is hand-written) raise one
    clear error, naming what to use instead, rather than a wrong or an obscure result."""
    rule, params, grads, state = _setup(kind)
    total = lambda g: sum(v.sum() for v in learned_step(rule, params, g, state, loss=0.5)[0].values())  # noqa: E731
    message = r"^learnedopt\.nn\.lstm_step .* does not run under torch\.func transforms .*use torch\.autograd\.grad, and a loop instead of vmap$"
    ones = {k: torch.ones_like(v) for k, v in grads.items()}
    for transform in (lambda: torch.func.grad(total)(grads), lambda: torch.func.jacrev(total)(grads),
                      lambda: torch.func.jvp(total, (grads,), (ones,))):  # fmt: skip
        with pytest.raises(RuntimeError, match=message):
            transform()
    stacked = [{k: torch.stack([v, v]) for k, v in tree.items()} for tree in (params, grads, state)]
    with pytest.raises(RuntimeError, match=message):
        torch.func.vmap(lambda p, g, s: learned_step(rule, p, g, s, loss=0.5))(*stacked)


def test_a_rule_of_plain_operations_runs_under_vmap_over_tasks_as_in_a_loop() -> None:
    """A rule of one's own without a hand-written backward steps a meta-batch of tasks under
    ``vmap`` (parameters, gradients, states, losses and learning rates batched) as one
    ``learned_step`` per task does; ``init_rule_state`` runs there too."""
    rule = _PlainMomentum()
    params, grads, state, losses = _batched_problem()
    lrs = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    new, new_state = torch.func.vmap(lambda p, g, s, loss, lr: learned_step(rule, p, g, s, loss=loss, lr=lr))(params, grads, state, losses, lrs)
    for i in range(3):
        one, one_state = learned_step(rule, _task(params, i), _task(grads, i), _task(state, i), loss=losses[i], lr=lrs[i])
        for k in params:
            torch.testing.assert_close(new[k][i], one[k], rtol=1e-15, atol=1e-15)
        torch.testing.assert_close(new_state["m"][i], one_state["m"], rtol=1e-15, atol=1e-15)
    assert not torch.equal(new["w"][0], params["w"][0])
    zeros = torch.func.vmap(lambda p: init_rule_state(rule, p))(params)
    assert zeros["m"].shape == (3, 1, 8) and not zeros["m"].any()


def test_a_rule_of_plain_operations_has_torch_func_derivatives_equal_to_autograd() -> None:
    """``torch.func.grad`` over every input of ``learned_step`` (parameters, gradients, states,
    loss, lr), ``jacrev`` and ``jvp`` equal ``torch.autograd``'s derivatives of the same step,
    and the rule's weights swapped in by ``functional_call`` get the same gradient as the rule's
    own parameters under autograd."""
    rule = _PlainMomentum()
    params, grads, state, losses = (_task(t, 0) if isinstance(t, dict) else t[0] for t in _batched_problem())
    lr = torch.tensor(0.4, dtype=F64)

    def objective(p, g, s, loss, lr):
        new, new_state = learned_step(rule, p, g, s, loss=loss, lr=lr)
        return sum(v.square().sum() for v in new.values()) + new_state["m"].square().sum()

    got = torch.func.grad(objective, argnums=(0, 1, 2, 3, 4))(params, grads, state, losses, lr)
    leaves = [{k: v.clone().requires_grad_(True) for k, v in t.items()} for t in (params, grads, state)]
    scalars = [losses.clone().requires_grad_(True), lr.clone().requires_grad_(True)]
    inputs = [*leaves[0].values(), *leaves[1].values(), *leaves[2].values(), *scalars]
    expected = torch.autograd.grad(objective(*leaves, *scalars), inputs)
    flat = [*got[0].values(), *got[1].values(), *got[2].values(), got[3], got[4]]
    for a, b in zip(flat, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)

    step_of_grads = lambda g: learned_step(rule, params, g, state, loss=losses, lr=lr)[0]  # noqa: E731
    jacobian = torch.func.jacrev(step_of_grads)(grads)
    tangent = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(9), dtype=F64) for k, v in grads.items()}
    _, jvp_out = torch.func.jvp(step_of_grads, (grads,), (tangent,))
    for k in params:  # jvp = sum over inputs of jacobian @ tangent
        by_jacobian = sum((jacobian[k][j].reshape(params[k].numel(), -1) @ tangent[j].reshape(-1)).reshape(params[k].shape) for j in grads)
        torch.testing.assert_close(jvp_out[k], by_jacobian, rtol=1e-14, atol=1e-14)

    class Stepper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rule = rule

        def forward(self) -> Tensor:
            return objective(params, grads, state, losses, lr)

    weights = {f"rule.{k}": v.detach() for k, v in rule.named_parameters()}
    by_func = torch.func.grad(lambda w: torch.func.functional_call(Stepper(), w, ()))(weights)
    by_autograd = torch.autograd.grad(objective(params, grads, state, losses, lr), list(rule.parameters()))
    for (name, _), b in zip(rule.named_parameters(), by_autograd, strict=True):
        torch.testing.assert_close(by_func[f"rule.{name}"], b, rtol=1e-14, atol=1e-14)


def test_nan_policy_raise_refuses_vmap_in_one_line() -> None:
    """Under ``vmap`` over tasks, ``nan_policy="raise"``'s check (read on the host; one task's NaN
    cannot stop the others) cannot run: it is refused in one line naming ``vmap``, also beneath a
    ``grad`` (per-task gradients). It failed
    inside the check with torch's "Batching rule not implemented for aten::_foreach_norm.Scalar".
    Under ``grad`` it runs, and still stops a NaN."""
    rule = _PlainMomentum()
    params, grads, state, losses = _batched_problem()
    with pytest.raises(RuntimeError, match=r"^learned_step: nan_policy='raise' does not run under torch\.func\.vmap .*nan_policy=None[^\n]*$"):
        torch.func.vmap(lambda p, g, s, loss: learned_step(rule, p, g, s, loss=loss, nan_policy="raise"))(params, grads, state, losses)
    per_task = lambda g, p, s, loss: sum(v.sum() for v in learned_step(rule, p, g, s, loss=loss, nan_policy="raise")[0].values())  # noqa: E731
    with pytest.raises(RuntimeError, match=r"^learned_step: nan_policy='raise' does not run under torch\.func\.vmap"):
        torch.func.vmap(torch.func.grad(per_task))(grads, params, state, losses)  # batched beneath grad's wrapper
    one = [_task(t, 0) for t in (params, grads, state)]
    total = lambda g: sum(v.sum() for v in learned_step(rule, one[0], g, one[2], loss=losses[0], nan_policy="raise")[0].values())  # noqa: E731
    torch.func.grad(total)(one[1])
    with pytest.raises(NonFiniteGradientError, match=r"the gradient of params\['w'\]"):
        torch.func.grad(total)({**one[1], "w": _spoil(one[1]["w"], NAN)})



def test_nan_policy_raise_runs_under_forward_mode_derivatives() -> None:
    """``nan_policy="raise"`` checks the values, not their tangents: under ``torch.func.jvp``,
    ``jacfwd`` and ``torch.autograd.forward_ad`` duals the step and its tangents are those without
    the check, and a NaN gradient still raises ``NonFiniteGradientError``. Each failed inside the
    check with torch's "Trying to set a forward gradient that has a different size than that of
    the original Tensor" (the forward derivative of its ``_foreach_norm``)."""
    rule = _PlainMomentum()
    params, grads, state, losses = (_task(t, 0) if isinstance(t, dict) else t[0] for t in _batched_problem())
    tangent = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(9), dtype=F64) for k, v in grads.items()}

    def step(policy: str | None) -> Callable[[Mapping[str, Tensor]], Tensor]:
        return lambda g: learned_step(rule, params, g, state, loss=losses, nan_policy=policy)[0]["w"]

    checked, unchecked = (torch.func.jvp(step(policy), (grads,), (tangent,)) for policy in ("raise", None))
    for a, b in zip(checked, unchecked, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(torch.func.jacfwd(step("raise"))(grads)["w"], torch.func.jacfwd(step(None))(grads)["w"])
    with torch.autograd.forward_ad.dual_level():
        duals = {k: torch.autograd.forward_ad.make_dual(v, tangent[k]) for k, v in grads.items()}
        primal, dual_tangent = torch.autograd.forward_ad.unpack_dual(step("raise")(duals))
    assert torch.equal(primal, unchecked[0]) and torch.equal(dual_tangent, unchecked[1])
    with pytest.raises(NonFiniteGradientError, match=r"the gradient of params\['b'\]"):
        torch.func.jvp(step("raise"), ({**grads, "b": _spoil(grads["b"], NAN)},), (tangent,))


class _OneStepForAll(_PlainMomentum):
    """A faulty rule of one's own: one step for all coordinates, ``(1,)``, not ``(n,)``."""

    kind = "TestOneStepForAll"

    def forward(self, grad: Tensor, param: Tensor, state: Mapping[str, Tensor], loss: Tensor | None = None):
        step, new_state = super().forward(grad, param, state, loss)
        return step.mean().reshape(1), new_state


class _ColumnStep(_PlainMomentum):
    """A faulty rule of one's own: its step is a column, ``(n, 1)``."""

    kind = "TestColumnStep"

    def forward(self, grad: Tensor, param: Tensor, state: Mapping[str, Tensor], loss: Tensor | None = None):
        step, new_state = super().forward(grad, param, state, loss)
        return step[:, None], new_state


class _SharedMomentum(_PlainMomentum):
    """A faulty rule of one's own: its momentum comes back ``(1, 1)``, one for all coordinates."""

    kind = "TestSharedMomentum"

    def forward(self, grad: Tensor, param: Tensor, state: Mapping[str, Tensor], loss: Tensor | None = None):
        step, new_state = super().forward(grad, param, state, loss)
        return step, {"m": new_state["m"].mean().reshape(1, 1)}


@pytest.mark.parametrize(
    ("rule_class", "message"),
    [
        (_OneStepForAll, r"the _OneStepForAll rule's forward returned a step of shape \(1,\) for {n} coordinates: it must be \({n},\)$"),
        (_ColumnStep, r"the _ColumnStep rule's forward returned a step of shape \({n}, 1\) for {n} coordinates: it must be \({n},\)$"),
        (_SharedMomentum, r"the _SharedMomentum rule's forward returned its state 'm' of shape \(1, 1\) for {n} coordinates: "
                          r"it must be \(1, {n}\) \(state_spec\)$"),
    ],
    ids=["one-step", "column", "state-shape"],
)  # fmt: skip
def test_a_rules_step_or_state_of_another_shape_is_refused_in_one_line(rule_class: type, message: str) -> None:
    """A rule of one's own whose step is not ``(n,)`` or whose new state has not its
    ``state_spec`` shape (as ``meta-train --rule`` refuses it before a run): ``learned_step``
    broadcast a ``(1,)`` step over every coordinate and returned a ``(1, 1)`` momentum, silently,
    and an ``(n, 1)`` step failed in a reshape ("shape '[2, 3]' is invalid for input of size
    48"); ``unroll`` failed in a reshape or a ``narrow`` ("start (0) + length (3) exceeds
    dimension size (2)"), naming no rule, and took an ``(n, 1)`` step. Each is a ValueError
    naming the rule and the shapes, in both, at the rule call."""
    rule = rule_class()
    params, grads, state, losses = (_task(t, 0) if isinstance(t, dict) else t[0] for t in _batched_problem())
    with pytest.raises(ValueError, match=rf"^{message.format(n=8)}"):
        learned_step(rule, params, grads, state, loss=losses)
    tasks = TaskBatch([_TwoTensorQuadratic(torch.tensor([1.0, 2.0], dtype=F64)) for _ in range(2)])
    start = tasks.init_params(torch.Generator().manual_seed(0))  # 3 coordinates per task, the rule called per task
    with pytest.raises(ValueError, match=rf"^{message.format(n=3)}"):
        unroll(rule, tasks, start, rule.init_state(num_coordinates(start), dtype=F64, device="cpu"), 2)
