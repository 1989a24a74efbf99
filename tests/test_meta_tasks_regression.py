"""The full-batch task family ``regression``: draws, batched loss, full batch, errors, mixtures."""

from __future__ import annotations

import pytest
import torch

from learnedopt import CoordinateLSTM
from learnedopt.evaluation import make_problem
from learnedopt.meta import num_coordinates, unroll
from learnedopt.meta import tasks as tasks_module
from learnedopt.meta.tasks import (
    ACTIVATIONS,
    META_TRAIN_ACTIVATIONS,
    TASK_FAMILIES,
    MixtureFamily,
    RegressionBatch,
    RegressionFamily,
    generator_for,
    make_family,
    regression_draw,
    synthetic_classification_data,
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


def test_architectures_vary_and_span_the_documented_ranges() -> None:
    family = RegressionFamily(points=2)
    g = generator_for(1)
    modules = [family.sample(g).module for _ in range(400)]
    linears = [[m for m in module if isinstance(m, torch.nn.Linear)] for module in modules]
    assert {len(layers) - 1 for layers in linears} == {1, 2}  # hidden layers uniform in (1, 2)
    features = [layers[0].in_features for layers in linears]
    assert 4 <= min(features) <= 5 and 28 <= max(features) <= 32
    widths = [layer.out_features for layers in linears for layer in layers[:-1]]
    assert 16 <= min(widths) <= 18 and 112 <= max(widths) <= 128
    assert all(layers[-1].out_features == 1 for layers in linears)
    drawn = {type(m) for module in modules for m in module if not isinstance(m, torch.nn.Linear)}
    assert drawn == {ACTIVATIONS[a] for a in META_TRAIN_ACTIVATIONS}


def test_targets_are_the_sine_of_a_frequency_drawn_log_uniformly(monkeypatch: pytest.MonkeyPatch) -> None:
    directions: list[torch.Tensor] = []

    def draw(*args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        x, w = regression_draw(*args, **kwargs)
        directions.append(w)
        return x, w

    monkeypatch.setattr(tasks_module, "regression_draw", draw)
    family = RegressionFamily(points=256, width=(2, 2), dtype=F64)
    g = generator_for(3)
    tasks = [t for _ in range(60) for t in family.sample_batch(4, g).tasks]
    frequencies = []
    for task, w in zip(tasks, directions, strict=True):
        t = (task.inputs @ w).squeeze(1)
        near = t.abs() < 0.35  # frequency * t within (-pi/2, pi/2), where asin inverts sin
        frequency = float((torch.asin(task.targets.squeeze(1)[near]) / t[near]).median())
        torch.testing.assert_close(task.targets.squeeze(1), torch.sin(frequency * t), rtol=0, atol=1e-9)
        frequencies.append(frequency)
    assert 1.0 - 1e-9 <= min(frequencies) < 1.1 and 3.6 < max(frequencies) <= 4.0 + 1e-9
    # log-uniform in [1, 4]: about half the frequencies below 2
    assert 0.35 < sum(f < 2 for f in frequencies) / len(frequencies) < 0.65


def test_regression_draw_scales_the_direction_by_one_over_the_dimension() -> None:
    x, w = regression_draw(generator_for(0), 64, 4096, F64)
    assert x.shape == (64, 4096) and w.shape == (4096, 1)
    assert 0.97 < float(x.var()) < 1.03 and abs(float(x.mean())) < 0.01
    # w i.i.d. N(0, 1/features), so x w is about N(0, 1) whatever the dimension
    assert 0.85 < float(w.var()) * 4096 < 1.15 and abs(float(w.mean())) * 64 < 0.1
    assert 0.85 < float(w.square().sum()) < 1.15


def test_the_synthetic_teacher_is_nearly_but_not_exactly_linear() -> None:
    """The teacher's first layer is N(0, 1/features), so its tanh sees unit-variance inputs and
    bends the classes a little: a linear classifier fits most of the labels, not all of them
    (unscaled, tanh saturates into a sign and a linear fit gets about 60%)."""
    inputs, labels = synthetic_classification_data(0, dtype=F64)
    assert inputs.shape == (10_000, 64) and labels.shape == (10_000,)
    features = torch.cat([inputs, torch.ones(len(inputs), 1, dtype=F64)], 1)
    weight = torch.zeros(65, 10, dtype=F64, requires_grad=True)
    fit = torch.optim.LBFGS([weight], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        fit.zero_grad()
        loss = torch.nn.functional.cross_entropy(features @ weight, labels)
        loss.backward()
        return loss

    fit.step(closure)
    accuracy = float(((features @ weight).argmax(1) == labels).double().mean())
    assert 0.72 < accuracy < 0.92


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
        # these raised TypeErrors of their own ("'NoneType' object is not iterable", "must be real number")
        (dict(activations=None), "activations must be a non-empty sequence.*got None"),
        (dict(width=128), "width must be a \\(low, high\\) pair, got 128"),
        (dict(frequency=("1", 4.0)), "frequency must be a \\(low, high\\) pair of numbers"),
    ):
        with pytest.raises(ValueError, match=message):
            RegressionFamily(**kwargs)
    with pytest.raises(ValueError, match="size must be an integer >= 1"):
        RegressionFamily().sample_batch(0, generator_for(0))


def test_init_scales_are_log_uniform_and_scale_the_default_init() -> None:
    family = RegressionFamily(points=2, width=(3, 3), dtype=F64)
    g = generator_for(5)
    tasks = [t for _ in range(100) for t in family.sample_batch(4, g).tasks]
    scales = [t.init_scale for t in tasks]
    assert 0.5 <= min(scales) < 0.55 and 1.85 < max(scales) <= 2.0
    assert 0.4 < sum(s < 1 for s in scales) / len(scales) < 0.6  # log-uniform in [0.5, 2]: half below 1
    task = tasks[0]
    default = tasks_module.default_linear_init(task.module, generator_for(6), F64)
    scaled = task.init_params(generator_for(6))
    assert all(torch.equal(scaled[k], default[k] * task.init_scale) for k in default)
