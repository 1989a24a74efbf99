"""The full-batch task family ``regression``: draws, batched loss, full batch, errors, mixtures."""

from __future__ import annotations

import pytest
import torch

from learnedopt import CoordinateLSTM
from learnedopt.evaluation import make_problem
from learnedopt.meta import num_coordinates, unroll
from learnedopt.meta.tasks import (
    TASK_FAMILIES,
    MixtureFamily,
    RegressionBatch,
    RegressionFamily,
    generator_for,
    make_family,
)

F64 = torch.float64


def test_draws_are_seeded_share_one_architecture_and_differ_per_task() -> None:
    family = make_family("regression")
    assert isinstance(family, RegressionFamily) and "regression" in TASK_FAMILIES
    a, b = (family.sample_batch(3, generator_for(4, 1)) for _ in range(2))
    assert isinstance(a, RegressionBatch) and len(a) == 3
    assert all(torch.equal(s.inputs, t.inputs) and torch.equal(s.targets, t.targets) for s, t in zip(a.tasks, b.tasks))
    assert len({t.module for t in a.tasks}) == 1  # one architecture per meta-batch
    assert not torch.equal(a.tasks[0].targets, a.tasks[1].targets)
    features = a.inputs.shape[2]
    assert a.inputs.shape == (3, 512, features) and a.targets.shape == (3, 512, 1)
    assert 4 <= features <= 32 and a.targets.abs().max() <= 1
    params = a.init_params(generator_for(4, 2))
    assert params["0.weight"].shape[0] == 3 and params["0.weight"].shape[2] == features
    other = family.sample_batch(3, generator_for(5, 1))
    assert (other.inputs.shape != a.inputs.shape) or not torch.equal(other.inputs, a.inputs)


def test_batched_loss_is_each_tasks_full_batch_mse_at_every_step() -> None:
    family = RegressionFamily(points=40, width=(3, 6), dtype=F64)
    batch = family.sample_batch(4, generator_for(0, 1))
    params = batch.init_params(generator_for(0, 2))
    losses = batch.loss(params, 0)
    for i, task in enumerate(batch.tasks):
        own = {k: v[i] for k, v in params.items()}
        torch.testing.assert_close(losses[i], task.loss(own, 0), rtol=1e-12, atol=0)
        assert task.loss(own, 0) == task.loss(own, 99)  # no minibatches
    assert torch.equal(batch.loss(params, 7), losses)
    # the init scale multiplies the default init
    task = batch.tasks[0]
    unscaled = RegressionFamily(points=40, width=(3, 6), init_scale=(1.0, 1.0), dtype=F64)
    assert task.init_scale != 1.0 and unscaled.sample(generator_for(0, 1)).init_scale == 1.0


def test_the_evaluation_problem_regression_1000_is_a_member() -> None:
    # its 16 inputs, one hidden layer of 64 tanh units and frequency 3 lie in the default ranges
    family = RegressionFamily()
    problem = make_problem("regression-1000")
    assert family.features[0] <= problem.dim <= family.features[1]
    assert family.width[0] <= 64 <= family.width[1] and family.depth[0] == 1 and "tanh" in family.activations
    assert family.frequency[0] <= 3 <= family.frequency[1] and family.points == problem.n


def test_an_unroll_on_regression_tasks_gives_a_finite_meta_gradient() -> None:
    family = RegressionFamily(points=32, width=(4, 8))
    tasks = family.sample_batch(2, generator_for(1, 1))
    params = tasks.init_params(generator_for(1, 2))
    rule = CoordinateLSTM()
    state = rule.init_state(num_coordinates(params), dtype=torch.float32, device="cpu")
    result = unroll(rule, tasks, params, state, 5)
    result.meta_loss.backward()
    grads = [p.grad for p in rule.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_mixtures_and_bad_arguments() -> None:
    mixture = make_family("quadratic+regression")
    assert isinstance(mixture, MixtureFamily) and {m.name for m in mixture.members} == {"quadratic", "regression"}
    for kwargs, message in (
        (dict(points=0), "points must be an integer >= 1"),
        (dict(features=(0, 4)), "features must be >= 1"),
        (dict(frequency=(2.0, 1.0)), "frequency must be finite with low <= high"),
        (dict(activations=("tanh", "nope")), "activations must be a non-empty sequence"),
        (dict(activations="tanh"), "activations must be a non-empty sequence"),
    ):
        with pytest.raises(ValueError, match=message):
            RegressionFamily(**kwargs)
    with pytest.raises(ValueError, match="size must be an integer >= 1"):
        RegressionFamily().sample_batch(0, generator_for(0))
