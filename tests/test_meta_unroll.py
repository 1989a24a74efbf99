"""The functional unroll: meta-gradients, truncation, agreement with the optimizers, task families."""

from __future__ import annotations

import contextlib
import copy
import re
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import central_difference, random_rule
from torch import Tensor

from learnedopt import LSTMOptimizer, MetaLSTMOptimizer
from learnedopt.data import DATA_ENV_VAR, default_data_root
from learnedopt.meta import (
    MNIST_SPLIT,
    MnistMLPFamily,
    QuadraticFamily,
    Task,
    TaskBatch,
    generator_for,
    horizon_loss_weights,
    make_family,
    num_coordinates,
    truncated_unroll,
    unroll,
)

F64 = torch.float64


def write_fake_mnist(directory: Path, n: int = 40, seed: int = 1) -> Path:
    """Tiny ``t10k`` IDX files (uint8 images (n, 28, 28), labels (n,)) in ``directory``."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in (
        ("t10k-images-idx3-ubyte", rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)),
        ("t10k-labels-idx1-ubyte", rng.integers(0, 10, size=n, dtype=np.uint8)),
    ):
        header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
        (directory / name).write_bytes(header + array.tobytes())
    return directory


def quadratic_setup(batch: int = 2, dim: int = 3, seed: int = 0):
    g = generator_for(seed)
    tasks = QuadraticFamily(dim=dim, dtype=F64).sample_batch(batch, g)
    params = {k: v * 0.3 for k, v in tasks.init_params(g).items()}
    return tasks, params


def meta_loss_of(rule, tasks, params, steps: int, **kwargs) -> Tensor:
    state = rule.init_state(num_coordinates(params), dtype=F64, device="cpu")
    return unroll(rule, tasks, params, state, steps, **kwargs).meta_loss


def meta_grad(rule, *args, **kwargs) -> Tensor:
    rule.zero_grad(set_to_none=True)
    meta_loss_of(rule, *args, **kwargs).backward()
    return torch.cat([p.grad.reshape(-1) for p in rule.parameters()])


def central_differences(rule, *args, **kwargs) -> Tensor:
    """The meta-gradient of :func:`meta_loss_of` by central differences, weight by weight."""
    numeric = [central_difference(lambda: meta_loss_of(rule, *args, **kwargs).item(), p) for p in rule.parameters()]
    return torch.cat([n.reshape(-1) for n in numeric]).to(F64)


# ----------------------------------------------------------------------------- meta-gradients
@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_meta_gradient_matches_central_differences(kind: str) -> None:
    rule = random_rule(kind)
    tasks, params = quadratic_setup()
    analytic = meta_grad(rule, tasks, params, 3, stop_optimizee_grad=False, lr=0.5)
    numeric = central_differences(rule, tasks, params, 3, stop_optimizee_grad=False, lr=0.5)
    assert analytic.abs().max() > 1e-3  # a real signal, not all zeros
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["lstm-rms", "meta-adam"])
def test_second_order_meta_gradient_is_finite_and_exact_where_a_gradient_is_zero(kind: str) -> None:
    """RMS-normalised inputs or steps (``rms_decays``, Adam's direction) with a coordinate whose
    gradient is exactly 0 (here a zero column of W; on MNIST, weights on always-black pixels):
    ``sqrt``'s infinite derivative at a zero second moment once made the second-order
    meta-gradient NaN. It must be finite and match central differences."""
    config = {"rms_decays": (0.9,)} if kind == "lstm-rms" else {"momentum_decay": 0.9, "rms_decay": 0.99}
    rule = random_rule("lstm" if kind == "lstm-rms" else "meta", seed=3, **config)
    tasks, params = quadratic_setup()
    tasks.weight[:, :, 1] = 0.0  # theta[1] never gets a gradient
    analytic = meta_grad(rule, tasks, params, 3, stop_optimizee_grad=False, lr=0.5)
    assert torch.isfinite(analytic).all()
    numeric = central_differences(rule, tasks, params, 3, stop_optimizee_grad=False, lr=0.5)
    assert analytic.abs().max() > 1e-3
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-7)


class LinearTask(Task):
    """f(theta) = c . theta: the gradient is constant, so there are no second-order terms."""

    def __init__(self, c: Tensor) -> None:
        self.c = c

    def init_params(self, generator: torch.Generator) -> dict[str, Tensor]:
        return {"w": torch.randn(self.c.shape, generator=generator, dtype=F64)}

    def loss(self, params: Mapping[str, Tensor], step_index: int) -> Tensor:
        return (self.c * params["w"]).sum()


@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_stopping_optimizee_gradients_changes_the_meta_gradient(kind: str) -> None:
    rule = random_rule(kind, seed=1)
    tasks, params = quadratic_setup()
    full = meta_grad(rule, tasks, params, 4, stop_optimizee_grad=False)
    stopped = meta_grad(rule, tasks, params, 4, stop_optimizee_grad=True)
    assert torch.isfinite(stopped).all() and stopped.abs().max() > 1e-3
    assert not torch.allclose(full, stopped, rtol=1e-3)  # the Hessian terms matter on a quadratic


def test_initial_parameters_that_require_grad_get_their_meta_gradient() -> None:
    """A learned initialisation (MAML-style, or Ravi & Larochelle's c_0) passed as leaves that
    require grad gets the exact meta-gradient (central differences, with the second-order terms)."""
    rule = random_rule("lstm", seed=4)
    tasks, params = quadratic_setup()
    start = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    meta_loss_of(rule, tasks, start, 3, stop_optimizee_grad=False, lr=0.5).backward()
    (name,) = start
    numeric = torch.zeros_like(params[name])
    eps = 1e-6
    with torch.no_grad():
        for i in range(numeric.numel()):
            values = []
            for sign in (1, -1):
                moved = params[name].clone()
                moved.view(-1)[i] += sign * eps
                with torch.enable_grad():
                    values.append(meta_loss_of(rule, tasks, {name: moved}, 3, stop_optimizee_grad=False, lr=0.5).item())
            numeric.view(-1)[i] = (values[0] - values[1]) / (2 * eps)
    assert start[name].grad is not None and numeric.abs().max() > 1e-3
    torch.testing.assert_close(start[name].grad, numeric, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("stop", [True, False])
def test_stopping_optimizee_gradients_hands_the_rule_constant_gradient_and_loss(stop: bool) -> None:
    """Under ``stop_optimizee_grad`` the rule's gradient and loss inputs are constants (the
    meta-gradient flows through the parameters and the rule's states only); without it both
    carry the optimizee's graph."""
    rule = random_rule("meta", seed=2)
    tasks, params = quadratic_setup()
    seen = []
    forward = rule.forward

    def recording(grad, param, state, loss=None):  # noqa: ANN001, ANN202 - the wrapped signature
        seen.append((grad.requires_grad, loss.requires_grad))
        return forward(grad, param, state, loss)

    rule.forward = recording
    meta_loss_of(rule, tasks, params, 3, stop_optimizee_grad=stop).backward()
    assert len(seen) == 3 * 2  # a call per task per step
    assert all(flags == (not stop, not stop) for flags in seen), seen


def test_stopping_optimizee_gradients_drops_only_second_order_terms() -> None:
    """On a linear loss the Hessian is zero, so stopping the gradient changes nothing.

    (Only for a rule that reads the gradient alone: MetaLSTMCell also reads the loss, whose
    detached path is first-order; Ravi & Larochelle 2017 drop it too.)
    """
    rule = random_rule("lstm", seed=1)
    g = generator_for(5)
    linear = TaskBatch([LinearTask(torch.randn(2, 3, generator=g, dtype=F64)) for _ in range(2)])
    params = linear.init_params(g)
    full = meta_grad(rule, linear, params, 4, stop_optimizee_grad=False)
    stopped = meta_grad(rule, linear, params, 4, stop_optimizee_grad=True)
    assert stopped.abs().max() > 1e-3
    torch.testing.assert_close(full, stopped, rtol=1e-12, atol=1e-14)


def test_loss_weights_and_result_shapes() -> None:
    rule = random_rule("lstm")
    tasks, params = quadratic_setup(batch=3)
    state = rule.init_state(num_coordinates(params), dtype=F64, device="cpu")
    result = unroll(rule, tasks, params, state, 4, loss_weights=[0.0, 0.0, 0.0, 4.0])
    assert result.losses.shape == (4, 3)
    assert result.params["theta"].shape == (3, 3)
    assert result.rule_state["h"].shape == (1, 9, 3)
    torch.testing.assert_close(result.meta_loss, result.losses[-1].mean())
    with pytest.raises(ValueError, match="loss_weights"):
        unroll(rule, tasks, params, state, 4, loss_weights=[1.0])
    assert not params["theta"].requires_grad  # inputs untouched
    # unweighted: the mean over every step and task (Andrychowicz et al. 2016)
    plain = unroll(rule, tasks, params, state, 4)
    torch.testing.assert_close(plain.meta_loss, plain.losses.mean())
    assert plain.losses[-1].mean().item() != pytest.approx(plain.losses.mean().item(), rel=1e-3)


@pytest.mark.parametrize("form", ["list", "tuple", "numpy"])
def test_loss_weights_given_as_numbers_weigh_a_float64_unroll_exactly(form: str) -> None:
    """Weights given as Python floats (or a float64 array) are not rounded to float32 on the way:
    ``torch.as_tensor([0.1, 0.3, 0.7])`` made float32 weights, and a float64 unroll's meta-loss
    (and truncated_unroll's pieces) came out ~3e-10 relative off the weighted mean of its own
    losses, as MAML's ``step_loss_weights`` (``new_tensor``, in the losses' dtype) are not."""
    rule = random_rule("lstm")
    tasks, params = quadratic_setup(batch=2)
    state = rule.init_state(num_coordinates(params), dtype=F64, device="cpu")
    numbers = [0.1, 0.3, 0.7]
    given = {"list": numbers, "tuple": tuple(numbers), "numpy": np.array(numbers)}[form]
    result = unroll(rule, tasks, params, state, 3, loss_weights=given)
    exact = (torch.tensor(numbers, dtype=F64)[:, None] * result.losses).mean()
    torch.testing.assert_close(result.meta_loss, exact, rtol=1e-15, atol=0)
    pieces = []
    truncated_unroll(rule, tasks, params, state, horizon=3, truncation=2, loss_weights=given,
                     update=lambda meta_loss: pieces.append(meta_loss.detach()))  # fmt: skip
    torch.testing.assert_close(pieces[1], numbers[2] * result.losses[2].detach().mean(), rtol=1e-15, atol=0)


@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_unroll_refuses_a_rule_parameters_and_states_of_different_dtypes_or_devices(kind: str) -> None:
    # each raised torch's "expected m1 and m2 to have the same dtype" or "expected dtype double
    # for `end`", naming no tensor; a float64 family (dtype=) beside a float32 rule is the likely case
    rule = random_rule(kind)
    tasks, params = quadratic_setup(batch=2)
    n = num_coordinates(params)
    with pytest.raises(ValueError, match=r"one dtype .*: torch\.float64 \(params\['theta'\]\), torch\.float32 \(rule weight '.+'\)"):
        unroll(rule.float(), tasks, params, rule.init_state(n, dtype=F64, device="cpu"), 2)
    with pytest.raises(ValueError, match=r"one dtype .*: torch\.float64 \(params\['theta'\]\), torch\.float32 \(state '.+'\)"):
        unroll(rule.double(), tasks, params, rule.init_state(n, dtype=torch.float32, device="cpu"), 2)
    with pytest.raises(ValueError, match=r"one device .* meta \(params\['theta'\]\), cpu \(state"):
        unroll(rule, tasks, {k: v.to("meta") for k, v in params.items()}, rule.init_state(n, dtype=F64, device="cpu"), 2)


def test_unrolls_refuse_no_steps_and_parameters_of_another_meta_batch() -> None:
    rule = random_rule("lstm")
    tasks, params = quadratic_setup(batch=3)
    state = rule.init_state(num_coordinates(params), dtype=F64, device="cpu")
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        unroll(rule, tasks, params, state, 0)
    for rows in (2, 4):  # fewer or more tasks' parameters than tasks
        wrong = {"theta": torch.zeros(rows, 3, dtype=F64)}
        with pytest.raises(ValueError, match=rf"params\['theta'\] has leading size {rows}, expected B=3"):
            unroll(rule, tasks, wrong, rule.init_state(3 * rows, dtype=F64, device="cpu"), 2)
    for horizon, truncation in ((0, 1), (2, 0)):
        with pytest.raises(ValueError, match=rf"horizon and truncation must be >= 1, got {horizon}, {truncation}"):
            truncated_unroll(rule, tasks, params, state, horizon=horizon, truncation=truncation)


@pytest.mark.parametrize("value", ["false", 0, None])
def test_unrolls_refuse_a_stop_optimizee_grad_that_is_not_true_or_false(value) -> None:
    """``stop_optimizee_grad="false"`` (a config file's string) was true: the second-order terms
    dropped in silence."""
    rule = random_rule("lstm")
    tasks, params = quadratic_setup()
    state = rule.init_state(num_coordinates(params), dtype=F64, device="cpu")
    message = rf"^stop_optimizee_grad must be True or False, got {re.escape(repr(value))}$"
    with pytest.raises(ValueError, match=message):
        unroll(rule, tasks, params, state, 2, stop_optimizee_grad=value)
    with pytest.raises(ValueError, match=message):
        truncated_unroll(rule, tasks, params, state, horizon=2, truncation=1, stop_optimizee_grad=value)


@pytest.mark.parametrize("start_step", [0.5, 1.0, -1, True, "2"])
def test_unroll_refuses_a_start_step_that_is_not_an_integer_at_least_zero(start_step, tmp_path: Path) -> None:
    """The step index selects the tasks' minibatches: a float one was cut to its integer part
    when seeding them (``start_step=0.5`` drew the minibatches of steps 0, 1, ... as 0 does,
    while a task of its own saw 0.5, 1.5, ...), and a negative one failed deep in numpy's
    SeedSequence ("expected non-negative integer")."""
    rule = random_rule("lstm")
    family = MnistMLPFamily(write_fake_mnist(tmp_path), hidden=(3,), batch_size=4, dtype=F64)
    g = generator_for(2)
    tasks = family.sample_batch(2, g)
    params = tasks.init_params(g)
    state = rule.init_state(num_coordinates(params), dtype=F64, device="cpu")
    with pytest.raises(ValueError, match=rf"^start_step must be an integer >= 0, got {re.escape(repr(start_step))}$"):
        unroll(rule, tasks, params, state, 2, start_step=start_step)
    unroll(rule, tasks, params, state, 2, start_step=np.int64(3))  # any integer type


@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_unroll_refuses_states_made_for_other_parameters(kind: str) -> None:
    # the learned_step check: a MetaLSTMCell unroll took the first rows of states made for more
    # coordinates (a larger meta-batch) without a word; other rules failed deep in the LSTM
    rule = random_rule(kind)
    tasks, params = quadratic_setup(batch=2)  # 6 coordinates
    for n in (3, 9):
        state = rule.init_state(n, dtype=F64, device="cpu")
        with pytest.raises(ValueError, match=rf"state '\w+' has shape \(\d+, {n}, \d+\), the 6 coordinates of params need .*init_rule_state"):
            unroll(rule, tasks, params, state, 2)
        with pytest.raises(ValueError, match=r"the 6 coordinates of params need"):
            truncated_unroll(rule, tasks, params, state, horizon=2, truncation=1)
    state = rule.init_state(6, dtype=F64, device="cpu")
    state.pop("h")
    with pytest.raises(ValueError, match=r"the state has .*, the \w+ rule's states are .*'h'"):
        unroll(rule, tasks, params, state, 2)

class DriftingTask(Task):
    """f_t(theta) = |theta - t c|^2: step index t's minibatch moves the minimum, as a data task's
    minibatches move its loss."""

    def __init__(self, c: Tensor) -> None:
        self.c = c

    def init_params(self, generator: torch.Generator) -> dict[str, Tensor]:
        return {"w": torch.randn(self.c.shape, generator=generator, dtype=F64)}

    def loss(self, params: Mapping[str, Tensor], step_index: int) -> Tensor:
        return ((params["w"] - step_index * self.c) ** 2).sum()


@pytest.mark.parametrize("family", ["quadratic", "drifting"])
def test_truncated_unroll_continues_one_trajectory(family: str) -> None:
    """Without meta-updates, truncations of 2 over 5 steps give the trajectory of one 5-step
    unroll, minibatches included (each truncation goes on at its step index)."""
    rule = random_rule("meta")
    if family == "quadratic":
        tasks, params = quadratic_setup()
    else:
        g = generator_for(6)
        tasks = TaskBatch([DriftingTask(torch.randn(3, generator=g, dtype=F64)) for _ in range(2)])
        params = tasks.init_params(g)
    state = rule.init_state(num_coordinates(params), dtype=F64, device="cpu")
    whole = unroll(rule, tasks, params, state, 5).losses.detach()
    pieces = truncated_unroll(rule, tasks, params, state, horizon=5, truncation=2)
    torch.testing.assert_close(pieces, whole, rtol=1e-13, atol=0)
    assert not pieces.requires_grad  # no truncation's graph is kept alive by the losses

    calls = []

    def update(meta_loss: Tensor) -> None:
        (grad,) = torch.autograd.grad(meta_loss, [next(rule.parameters())])
        calls.append(grad)

    truncated_unroll(rule, tasks, params, state, horizon=5, truncation=2, update=update)
    assert len(calls) == 3  # 2 + 2 + 1 steps


def test_horizon_loss_weights() -> None:
    torch.testing.assert_close(horizon_loss_weights("uniform", 4), torch.ones(4))
    linear = horizon_loss_weights("linear", 4)
    torch.testing.assert_close(linear, torch.tensor([0.4, 0.8, 1.2, 1.6]))
    quadratic = horizon_loss_weights("quadratic", 4)
    torch.testing.assert_close(quadratic, torch.tensor([1.0, 4.0, 9.0, 16.0]) * (4 / 30))
    for weighting in ("linear", "quadratic"):
        assert float(horizon_loss_weights(weighting, 37).mean()) == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(ValueError, match="weighting must be one of"):
        horizon_loss_weights("final", 4)
    for weighting in ("uniform", "linear", "quadratic"):
        with pytest.raises(ValueError, match="horizon must be >= 1, got 0"):
            horizon_loss_weights(weighting, 0)
        # 2.5 gave "linear" 3 weights of mean 8/7, not 1; True one weight
        for horizon in (2.5, True):
            with pytest.raises(ValueError, match=rf"horizon must be >= 1, got {horizon!r} \(an integer\)"):
                horizon_loss_weights(weighting, horizon)
    assert horizon_loss_weights("linear", np.int64(3)).shape == (3,)


def test_truncated_unroll_gives_each_truncation_its_slice_of_the_weights() -> None:
    rule = random_rule("lstm")
    tasks, params = quadratic_setup()
    state = rule.init_state(num_coordinates(params), dtype=F64, device="cpu")
    weights = horizon_loss_weights("linear", 5).to(F64)
    meta_losses = []
    losses = truncated_unroll(
        rule, tasks, params, state, horizon=5, truncation=2, loss_weights=weights,
        update=lambda meta_loss: meta_losses.append(meta_loss.detach()),
    )
    expected = [(weights[a:b, None] * losses[a:b]).mean() for a, b in ((0, 2), (2, 4), (4, 5))]
    torch.testing.assert_close(torch.stack(meta_losses), torch.stack(expected), rtol=1e-14, atol=0)
    assert meta_losses[0] < losses[:2].mean() < losses[4:].mean() < meta_losses[2]  # w < 1, then > 1
    with pytest.raises(ValueError, match=r"loss_weights must have shape \(5,\)"):
        truncated_unroll(rule, tasks, params, state, horizon=5, truncation=2, loss_weights=weights[:4])



@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_unrolls_refuse_non_finite_or_negative_loss_weights_before_any_step(bad: float) -> None:
    rule = random_rule("lstm")
    tasks, params = quadratic_setup()
    state = rule.init_state(num_coordinates(params), dtype=F64, device="cpu")
    with pytest.raises(ValueError, match=r"loss_weights must be finite and >= 0, got .* at index 1"):
        unroll(rule, tasks, params, state, 2, loss_weights=[1.0, bad])
    updates = []
    weights = torch.tensor([1.0, 1.0, 1.0, 1.0, bad], dtype=F64)
    with pytest.raises(ValueError, match=r"loss_weights must be finite and >= 0, got .* at index 4"):
        truncated_unroll(rule, tasks, params, state, horizon=5, truncation=2, loss_weights=weights, update=updates.append)
    assert updates == []  # refused before the first truncation's update, not at the last one


# ----------------------------------------------------------------------------- vs the optimizers
def optimizer_trajectory(
    rule, optimizer_class, task: Task, init: Mapping[str, Tensor], steps: int, lr: float
):
    """Run the real optimizer (per-tensor float64 path) on ``task`` from ``init``.

    Returns:
        ``(steps,)`` losses after each step (on the next step's minibatch) and the final params.
    """
    params = {k: torch.nn.Parameter(v.clone()) for k, v in init.items()}
    optimizer = optimizer_class(
        params.values(), weights=copy.deepcopy(rule), lr=lr, state_dtype=F64, foreach=False
    )
    losses = []
    for t in range(steps):
        optimizer.zero_grad()
        loss = task.loss(params, t)
        loss.backward()
        if rule.needs_loss:
            optimizer.step(loss=loss.detach())
        else:
            optimizer.step()
        losses.append(task.loss(params, t + 1).detach())
    return torch.stack(losses), {k: v.detach() for k, v in params.items()}


@pytest.mark.parametrize(
    ("kind", "optimizer_class"),
    [("lstm", LSTMOptimizer), ("meta", MetaLSTMOptimizer)],
    ids=["lstm", "meta"],
)
@pytest.mark.parametrize("family", ["quadratic", "mnist-mlp"])
def test_unroll_follows_the_optimizer(kind, optimizer_class, family, tmp_path: Path) -> None:
    """Two tasks unrolled as one flat batch == the optimizer run on each task on its own."""
    rule = random_rule(kind)
    if family == "quadratic":
        fam = QuadraticFamily(dim=4, dtype=F64)
    else:
        fam = MnistMLPFamily(write_fake_mnist(tmp_path), hidden=(5,), batch_size=8, dtype=F64)
    g = generator_for(3)
    tasks = fam.sample_batch(2, g)
    params = tasks.init_params(g)
    state = rule.init_state(num_coordinates(params), dtype=F64, device="cpu")
    result = unroll(rule, tasks, params, state, 4, lr=0.7)

    for b, task in enumerate(tasks.tasks):
        losses, final = optimizer_trajectory(
            rule, optimizer_class, task, {k: v[b] for k, v in params.items()}, 4, 0.7
        )
        torch.testing.assert_close(result.losses[:, b].detach(), losses, rtol=1e-12, atol=1e-12)
        for k, v in final.items():
            assert not torch.equal(v, params[k][b])  # it moved
            torch.testing.assert_close(result.params[k][b].detach(), v, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- task families
def test_mlp_batch_loss_equals_per_task_losses(tmp_path: Path) -> None:
    fam = MnistMLPFamily(write_fake_mnist(tmp_path), batch_size=16, dtype=F64)
    g = generator_for(0)
    tasks = fam.sample_batch(3, g)
    params = tasks.init_params(g)
    assert {k: tuple(v.shape) for k, v in params.items()} == {
        "0.weight": (3, 20, 784),
        "0.bias": (3, 20),
        "2.weight": (3, 10, 20),
        "2.bias": (3, 10),
    }
    for step in (0, 7):
        torch.testing.assert_close(
            tasks.loss(params, step), TaskBatch.loss(tasks, params, step), rtol=1e-12, atol=0
        )


def test_mnist_minibatches_depend_on_task_and_step_only(tmp_path: Path) -> None:
    fam = MnistMLPFamily(write_fake_mnist(tmp_path, n=50), batch_size=64)
    a, b = fam.sample_batch(2, generator_for(0)).tasks
    again = fam.sample_batch(2, generator_for(0)).tasks[0]
    x0, y0 = a.minibatch(3)
    assert torch.equal(x0, again.minibatch(3)[0]) and torch.equal(y0, a.minibatch(3)[1])
    assert not torch.equal(x0, a.minibatch(4)[0]) and not torch.equal(x0, b.minibatch(3)[0])
    # every drawn image comes from the meta_train part: 60% of 50
    assert len(fam.pool) == round(MNIST_SPLIT["meta_train"] * 50)
    rows = {tuple(r.tolist()) for r in fam.inputs[fam.pool]}
    assert all(tuple(r.tolist()) in rows for r in x0)
    assert 0.0 <= float(x0.min()) and float(x0.max()) <= 1.0


def test_mnist_second_order_unroll_runs(tmp_path: Path) -> None:
    """create_graph=True through vmap(functional_call) and cross-entropy gives finite meta-grads."""
    fam = MnistMLPFamily(write_fake_mnist(tmp_path), hidden=(5,), batch_size=8, dtype=F64)
    g = generator_for(1)
    tasks = fam.sample_batch(2, g)
    grads = {
        flag: meta_grad(
            random_rule("lstm"),
            tasks,
            tasks.init_params(generator_for(2)),
            3,
            stop_optimizee_grad=flag,
        )
        for flag in (True, False)
    }
    assert all(torch.isfinite(v).all() for v in grads.values())
    assert not torch.allclose(grads[True], grads[False])


@pytest.mark.parametrize("dim", [0, -1, 2.5, True])  # 2.5: randn's TypeError; True: a 1-dim quadratic
def test_a_quadratic_needs_a_dimension(dim: int) -> None:
    with pytest.raises(ValueError, match=f"QuadraticFamily: dim must be an integer >= 1, got {dim}"):
        QuadraticFamily(dim=dim)


@pytest.mark.parametrize("name", ["quadratic", "mnist-mlp", "mlp-random", "regression"])
def test_families_refuse_what_they_cannot_draw(name: str, tmp_path: Path) -> None:
    data = write_fake_mnist(tmp_path) if name in ("mnist-mlp", "mlp-random") else None
    # an integer dtype: mnist-mlp's parameters came out float32, the others raised torch's
    # "normal_kernel_cpu not implemented for 'Long'"
    with pytest.raises(ValueError, match=r"dtype must be a floating-point dtype, got torch\.int64"):
        make_family(name, data=data, dtype=torch.int64)
    family = make_family(name, data=data)
    for size in (0, -1, 2.0, True):  # 2.0: quadratic and mnist-mlp raised range()'s TypeError
        with pytest.raises(ValueError, match=f"size must be an integer >= 1, got {size}"):
            family.sample_batch(size, generator_for(0))
    # quadratic and regression read no data part, but a misspelt one is still a mistake
    with pytest.raises(ValueError, match="unknown split 'meta-train'"):
        make_family(name, data=data, split="meta-train")


def test_mnist_mlp_family_needs_a_sequence_of_hidden_widths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="hidden must be a sequence of widths, got 20"):  # was: int is not iterable
        MnistMLPFamily(write_fake_mnist(tmp_path), hidden=20)
    assert MnistMLPFamily(write_fake_mnist(tmp_path), hidden=()).sizes == (784, 10)  # logistic regression


def test_the_mnist_split_is_pinned() -> None:
    """The parts are a seeded ``torch.randperm``, so a torch whose randperm draws differently would
    move images between them without any error: the shipped weights, meta-trained on the old
    ``meta_train`` part, would then be evaluated on ``held_out`` images they were trained on. The
    digests are of the int64 indices with torch 2.13; if this fails, the split must be kept
    (e.g. stored as a file), not re-drawn."""
    import hashlib

    from learnedopt.data import split_indices
    from learnedopt.meta import MNIST_SPLIT_SEED

    digests = {
        "meta_train": "8699b879c0bc11efa087da379b89810370555023b707c7193740410a4e5263b8",
        "meta_valid": "bf8eeb163c4f1e87d71744638fe3da3babcbe739f3a2ee320853a767158a9370",
        "held_out": "90a53818edc64c5e4fd5295c10a40816cc0c2ca253903a72963575ea0f9e2722",
    }
    parts = split_indices(10_000, MNIST_SPLIT, seed=MNIST_SPLIT_SEED)
    found = {k: hashlib.sha256(v.numpy().astype("<i8").tobytes()).hexdigest() for k, v in parts.items()}
    assert found == digests, f"the MNIST split moved under torch {torch.__version__}"


def test_missing_mnist_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        make_family("mnist-mlp", data=tmp_path / "nowhere")
    assert "nowhere" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="unknown task 'cubic'"):
        make_family("cubic")


_ROOT = default_data_root()
_MNIST = _ROOT / "mnist" if _ROOT is not None else None


@pytest.mark.skipif(
    _MNIST is None or not (_MNIST / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"real MNIST not found (looked in {_MNIST}; set {DATA_ENV_VAR} or provide ../shared/data/mnist)",
)
def test_real_mnist_family_split() -> None:
    train, valid = (
        make_family("mnist-mlp", split="meta_train"),
        make_family("mnist-mlp", split="meta_valid"),
    )
    assert len(train.pool) == 6000 and len(valid.pool) == 1000
    assert not set(train.pool.tolist()) & set(valid.pool.tolist())
    assert "6000 images" in train.describe()
    tasks = train.sample_batch(2, generator_for(0))
    loss = tasks.loss(tasks.init_params(generator_for(0)), 0)
    assert loss.shape == (2,) and 2.0 < float(loss.min()) and float(loss.max()) < 2.7  # about ln 10


@pytest.mark.parametrize(("options", "message"), [
    ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),  # gave NaN losses
    ({"batch_size": -1}, "batch_size must be an integer >= 1, got -1"),
    ({"hidden": (0,)}, "hidden width must be an integer >= 1, got 0"),  # a ZeroDivisionError
    ({"hidden": (20, True)}, "hidden width must be an integer >= 1, got True"),
])  # fmt: skip
def test_mnist_mlp_family_refuses_bad_sizes(tmp_path, options, message) -> None:
    with pytest.raises(ValueError, match=f"MnistMLPFamily: {re.escape(message)}"):
        MnistMLPFamily(write_fake_mnist(tmp_path), **options)


# ----------------------------------------------------------------------------- the user's own tasks
class OwnTask(Task):
    """``mean((x w - y)^2)`` on fixed data; the variants below get one thing wrong each."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def init_params(self, generator: torch.Generator) -> dict[str, Tensor]:
        return {"w": torch.zeros(self.x.shape[1], dtype=F64), "b": torch.zeros((), dtype=F64)}

    def per_example(self, params: Mapping[str, Tensor]) -> Tensor:
        return (self.x @ params["w"] + params["b"] - self.y).square()

    def loss(self, params: Mapping[str, Tensor], step_index: int) -> Tensor:
        return self.per_example(params).mean()


def own_batch(task_class: type[OwnTask], size: int = 2) -> TaskBatch:
    g = generator_for(7)
    return TaskBatch([task_class(torch.randn(6, 3, generator=g, dtype=F64), torch.randn(6, generator=g, dtype=F64))
                      for _ in range(size)])  # fmt: skip


class PerExampleLoss(OwnTask):
    def loss(self, params, step_index):
        return self.per_example(params)


class ShapeOneLoss(OwnTask):
    def loss(self, params, step_index):
        return self.per_example(params).mean().reshape(1)


class DetachedLoss(OwnTask):
    def loss(self, params, step_index):
        return self.per_example({k: v.detach() for k, v in params.items()}).mean()


class UnusedBias(OwnTask):
    def loss(self, params, step_index):
        return (self.x @ params["w"] - self.y).square().mean()


class CountLoss(OwnTask):
    def loss(self, params, step_index):
        return (self.per_example(params) > 1.0).sum()


@pytest.mark.parametrize(
    ("task_class", "message"),
    [
        # these two ran: the (B, 6) losses were summed into a gradient 6 times the task's, and
        # their mean taken as the meta-loss
        (PerExampleLoss, "task 0's loss at step 0 is a tensor of shape (6,) and dtype torch.float64: Task.loss must "
         "return a scalar floating-point tensor computed from params (reduce per-example losses, e.g. with .mean())"),
        (ShapeOneLoss, "task 0's loss at step 0 is a tensor of shape (1,) and dtype torch.float64"),
        (CountLoss, "task 0's loss at step 0 is a tensor of shape () and dtype torch.int64: Task.loss must return a "
         "scalar floating-point tensor"),
        # these two raised autograd's RuntimeError, naming neither the task nor the parameter
        (DetachedLoss, "the task batch's loss at step 0 has no gradient: it must be computed from the params it is "
         "given (not detached, not through .item() or numpy)"),
        (UnusedBias, "the task batch's loss at step 0 does not depend on params ['b']: every parameter init_params "
         "returns must take part in the loss"),
    ],
)
def test_an_unroll_refuses_a_task_loss_that_is_not_a_differentiable_scalar(task_class, message: str) -> None:
    rule = random_rule("lstm")
    tasks = own_batch(task_class)
    params = tasks.init_params(generator_for(0))
    state = rule.init_state(num_coordinates(params), dtype=F64, device="cpu")
    with pytest.raises(ValueError, match=re.escape(message)):
        truncated_unroll(rule, tasks, params, state, horizon=2, truncation=1)


def test_an_unroll_refuses_a_task_batch_loss_of_another_shape() -> None:
    """A TaskBatch subclass's batched loss must be (B,): a (B, N) one was summed silently."""

    class RowsBatch(TaskBatch):
        def loss(self, params, step_index):
            return torch.stack([t.per_example({k: v[b] for k, v in params.items()}) for b, t in enumerate(self.tasks)])

    tasks = RowsBatch(own_batch(OwnTask).tasks)
    rule = random_rule("lstm")
    params = tasks.init_params(generator_for(0))
    state = rule.init_state(num_coordinates(params), dtype=F64, device="cpu")
    with pytest.raises(ValueError, match=re.escape(
        "the task batch's loss at step 0 has shape (2, 6) and dtype torch.float64: it must be (2,) floating-point "
        "losses, one scalar per task"
    )):  # fmt: skip
        unroll(rule, tasks, params, state, 1)

    class CountsBatch(TaskBatch):
        def loss(self, params, step_index):
            return torch.stack([(t.per_example({k: v[b] for k, v in params.items()}) > 1.0).sum()
                                for b, t in enumerate(self.tasks)])  # fmt: skip

    with pytest.raises(ValueError, match=re.escape(
        "the task batch's loss at step 0 has shape (2,) and dtype torch.int64: it must be (2,) floating-point losses"
    )):  # fmt: skip
        unroll(rule, CountsBatch(tasks.tasks), params, state, 1)


def test_an_unroll_refuses_no_parameters() -> None:
    rule = random_rule("lstm")
    tasks = own_batch(OwnTask)
    state = rule.init_state(1, dtype=F64, device="cpu")
    with pytest.raises(ValueError, match=r"^params is empty: the tasks need at least one parameter tensor$"):
        unroll(rule, tasks, {}, state, 1)


class IntegerParams(OwnTask):
    def init_params(self, generator):
        return {"w": torch.zeros(self.x.shape[1], dtype=torch.int64), "b": torch.zeros((), dtype=F64)}


class ShapeByDraw(OwnTask):
    def init_params(self, generator):
        return {"w": torch.zeros(int(torch.randint(2, 4, (), generator=generator)), dtype=F64), "b": torch.zeros((), dtype=F64)}


class KeysByDraw(OwnTask):
    def init_params(self, generator):
        name = "b" if int(torch.randint(2, (), generator=generator)) else "c"
        return {"w": torch.zeros(self.x.shape[1], dtype=F64), name: torch.zeros((), dtype=F64)}


class ListParams(OwnTask):
    def init_params(self, generator):
        return [torch.zeros(3, dtype=F64)]


class DtypeByDraw(OwnTask):
    def init_params(self, generator):
        dtype = F64 if int(torch.randint(2, (), generator=generator)) else torch.float32
        return {"w": torch.zeros(self.x.shape[1], dtype=dtype), "b": torch.zeros((), dtype=F64)}


class EmptyParams(OwnTask):
    def init_params(self, generator):
        return {}


class IndexedParams(OwnTask):
    def init_params(self, generator):
        return {0: torch.zeros(self.x.shape[1], dtype=F64)}


@pytest.mark.parametrize(
    ("task_class", "message"),
    [
        (IntegerParams, "task 0's init_params gives 'w' as torch.int64: parameters must be floating-point"),
        (ShapeByDraw, "task 1's init_params gives 'w' of shape (2,), float64 on cpu, task 0's of shape (3,), float64 "
         "on cpu: the tasks of a batch are unrolled as one stack, so they need the same names, shapes and dtype"),
        (KeysByDraw, "task 1's init_params has parameters ['c', 'w'], task 0's ['b', 'w']"),
        (ListParams, "task 0's init_params gave a list: it must return a dict of parameter name -> tensor"),
        # torch.stack promoted the float32 draws to float64 silently
        (DtypeByDraw, "task 1's init_params gives 'w' of shape (3,), float32 on cpu, task 0's of shape (3,), float64 on cpu"),
        (EmptyParams, "task 0's init_params gave an empty dict: it must return a dict of parameter name -> tensor"),
        (IndexedParams, "task 0's init_params gave 0: Tensor: it must return a dict of parameter name (str) -> tensor"),
    ],
)
def test_a_task_batch_refuses_initial_parameters_it_cannot_stack(task_class, message: str) -> None:
    """Different shapes raised torch.stack's error, different names a KeyError (or, with the first
    task's names a subset, dropped the others silently), integers went on to the unroll."""
    with pytest.raises(ValueError, match=re.escape(message)):
        own_batch(task_class).init_params(generator_for(3))


class ParameterParams(OwnTask):
    def init_params(self, generator):
        return {k: torch.nn.Parameter(v) for k, v in super().init_params(generator).items()}


def test_initial_parameters_given_as_nn_parameters_are_stacked_detached() -> None:
    """Parameters (or tensors that require grad) from init_params came out of the stack with a
    graph back to them, so every meta-gradient backward also filled their .grad."""
    tasks = own_batch(ParameterParams)
    params = tasks.init_params(generator_for(0))
    assert all(not v.requires_grad and v.grad_fn is None for v in params.values())
    plain = own_batch(OwnTask).init_params(generator_for(0))
    assert all(torch.equal(params[k], plain[k]) for k in plain)


def inference_mode_with_grad_enabled() -> contextlib.AbstractContextManager:
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode())
    stack.enter_context(torch.enable_grad())
    return stack


@pytest.mark.parametrize(
    ("context", "mode"),
    [(torch.no_grad, "torch.no_grad()"), (torch.inference_mode, "torch.inference_mode()"),
     (inference_mode_with_grad_enabled, "torch.inference_mode()")],  # fmt: skip
)
def test_an_unroll_under_no_grad_says_so_rather_than_blame_the_task(context, mode: str) -> None:
    """Under inference_mode with enable_grad (grad mode on, no graphs) the task was blamed: 'the
    task batch's loss at step 0 has no gradient: it must be computed from the params'."""
    rule = random_rule("lstm")
    tasks, params = quadratic_setup()
    state = rule.init_state(num_coordinates(params), dtype=F64, device="cpu")
    with context(), pytest.raises(ValueError, match=re.escape(
        f"unroll differentiates the tasks' losses: call it with autograd enabled, not under {mode}"
    )):  # fmt: skip
        unroll(rule, tasks, params, state, 1)


class LossOnMeta(TaskBatch):
    def loss(self, params, step_index):
        return super().loss(params, step_index).to("meta")


class NaNSecond(OwnTask):
    def loss(self, params, step_index):
        return super().loss(params, step_index) * (float("nan") if self.x[0, 0] == self.nan_at else 1.0)


def test_check_task_batch_returns_the_first_losses_or_names_the_first_problem() -> None:
    """What a run checks before it writes anything: each refusal names the parameter, task or
    device at fault; a batch that passes gives its detached step-0 losses."""
    from learnedopt.meta.unroll import check_task_batch

    tasks = own_batch(OwnTask, size=3)
    params = tasks.init_params(generator_for(0))
    losses = check_task_batch(tasks, params, dtype=F64)
    assert torch.equal(losses, tasks.loss(params, 0)) and not losses.requires_grad
    assert losses.shape == (3,)

    def refused(message: str, batch: TaskBatch = tasks, given=params, dtype=F64) -> None:  # noqa: ANN001
        with pytest.raises(ValueError, match=re.escape(message)):
            check_task_batch(batch, given, dtype=dtype)

    refused("params is empty: the tasks need at least one parameter tensor", given={})
    refused("the initial params['w'] are torch.float64; the rule runs in torch.float32, so they must be too",
            dtype=torch.float32)  # fmt: skip
    refused("params['w'] has shape (2, 3), expected (B=3, *shape)", given={k: v[:2] for k, v in params.items()})
    refused("params['b'] has shape (), expected (B=3, *shape)", given={**params, "b": params["b"][0]})
    refused("the task batch's loss at step 0 is on meta, the parameters on cpu", batch=LossOnMeta(tasks.tasks))
    refused("the task batch's loss at step 0 does not depend on params ['b']", batch=own_batch(UnusedBias, size=3))
    nan_batch = own_batch(NaNSecond, size=3)
    for task in nan_batch.tasks:
        task.nan_at = nan_batch.tasks[1].x[0, 0]
    refused("the loss at step 0 is nan for task 1 (of 3): check the task's loss and initial parameters", batch=nan_batch)


def test_an_unroll_names_what_is_wrong_with_its_params_and_counts() -> None:
    """Integer params were torch's "only Tensors of floating point dtype can require gradients",
    a list "only integer tensors of a single element can be converted to an index", params of
    other names a bare KeyError('theta'), and 1.5 steps "'float' object cannot be interpreted as
    an integer" (a bool counted as one step)."""
    rule = random_rule("lstm").float()
    g = generator_for(3)
    tasks = QuadraticFamily(dim=4).sample_batch(2, g)
    params = tasks.init_params(g)
    state = rule.init_state(num_coordinates(params), dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match=r"^unroll: params\['theta'\] is torch.int64: learned updates need floating-point"):
        unroll(rule, tasks, {k: v.long() for k, v in params.items()}, state, 1)
    with pytest.raises(TypeError, match=r"^unroll: params must be a dict of names to tensors .*, got a list$"):
        unroll(rule, tasks, list(params.values()), state, 1)
    with pytest.raises(ValueError, match=re.escape("loss at step 0 reads params['theta'], which is not among the params given ['x']")):
        unroll(rule, tasks, {"x": params["theta"]}, state, 1)
    for steps in (1.5, True):
        with pytest.raises(ValueError, match=rf"^steps must be >= 1, got {steps!r} \(an integer\)$"):
            unroll(rule, tasks, params, state, steps)
        with pytest.raises(ValueError, match=rf"^horizon and truncation must be >= 1, got {steps!r}, 1 \(integers\)$"):
            truncated_unroll(rule, tasks, params, state, horizon=steps, truncation=1)
