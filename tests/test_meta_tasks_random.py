"""The randomised task family ``mlp-random``: draws, stacking, batched loss, subsets, errors."""

from __future__ import annotations

import math
import re

import pytest
import torch
from test_meta_unroll import write_fake_mnist

from learnedopt import CoordinateLSTM
from learnedopt.data import split_indices
from learnedopt.meta import MNIST_SPLIT, MNIST_SPLIT_SEED, TaskBatch, num_coordinates, unroll
from learnedopt.meta.tasks import (
    META_TRAIN_ACTIVATIONS,
    TASK_FAMILIES,
    MixtureFamily,
    MLPArchitecture,
    QuadraticBatch,
    RandomMLPBatch,
    RandomMLPFamily,
    generator_for,
    is_task_family,
    make_family,
)

F64 = torch.float64


@pytest.fixture(scope="module")
def family() -> RandomMLPFamily:
    """The default ranges on the synthetic data (float32, as meta-training runs)."""
    return RandomMLPFamily(source="synthetic")


@pytest.fixture(scope="module")
def small64() -> RandomMLPFamily:
    """Small float64 architectures, for exact comparisons and a cheap unroll."""
    return RandomMLPFamily(source="synthetic", width=(3, 6), batch_size=(5, 9), dtype=F64)


def draws(batch: RandomMLPBatch) -> list[tuple]:
    return [(t.input_scale, t.init_scale, t.seed) for t in batch.tasks]


def test_registered_in_the_cli_families() -> None:
    assert "mlp-random" in TASK_FAMILIES
    assert RandomMLPFamily.name == "mlp-random"


def test_draws_are_a_function_of_the_generator_only(family) -> None:
    a = family.sample_batch(4, generator_for(7))
    torch.manual_seed(0)  # the global RNG plays no part
    b = family.sample_batch(4, generator_for(7))
    torch.manual_seed(1)
    assert a.architecture == b.architecture and draws(a) == draws(b)
    pa, pb = a.init_params(generator_for(1)), b.init_params(generator_for(1))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert torch.equal(a.loss(pa, 3), b.loss(pb, 3))
    c = family.sample_batch(4, generator_for(8))
    assert (c.architecture, draws(c)) != (a.architecture, draws(a))


def test_a_batch_shares_one_architecture_and_tasks_differ(family) -> None:
    batch = family.sample_batch(5, generator_for(0))
    assert len({t.architecture for t in batch.tasks}) == 1
    assert len({t.module for t in batch.tasks}) == 1
    assert len(set(draws(batch))) == 5
    assert len({t.input_scale for t in batch.tasks}) == 5


def test_architectures_vary_and_span_the_documented_ranges(family) -> None:
    g = generator_for(1)
    archs = [family.sample_architecture(g) for _ in range(400)]
    assert {len(a.hidden) for a in archs} == {1, 2, 3}
    widths = [w for a in archs for w in a.hidden]
    assert 8 <= min(widths) <= 9 and 56 <= max(widths) <= 64
    # log-uniform: about as many widths in [8, 16) as in [32, 64]
    low, high = sum(w < 16 for w in widths), sum(w >= 32 for w in widths)
    assert 0.7 < low / high < 1.4
    assert {a.activation for a in archs} == set(META_TRAIN_ACTIVATIONS)
    sizes = [a.batch_size for a in archs]
    assert 32 <= min(sizes) <= 36 and 230 <= max(sizes) <= 256

    tasks = [t for _ in range(60) for t in family.sample_batch(4, g).tasks]
    inputs = [t.input_scale for t in tasks]
    inits = [t.init_scale for t in tasks]
    assert 0.1 <= min(inputs) < 0.15 and 7 < max(inputs) <= 10
    assert 0.5 <= min(inits) < 0.6 and 1.7 < max(inits) <= 2.0
    # log-uniform in [0.1, 10]: about half the scales below 1
    assert 0.35 < sum(s < 1 for s in inputs) / len(inputs) < 0.65


def test_log_uniform_integers_reach_both_ends_in_the_documented_proportions() -> None:
    # an integer in [low, high] has P(k) proportional to log((k + 1) / k): 1/2, 0.29, 0.21 on [1, 3]
    family = RandomMLPFamily(source="synthetic", depth=(1, 1), width=(1, 3))
    g = generator_for(2)
    widths = torch.tensor([family.sample_architecture(g).hidden[0] for _ in range(3000)])
    counts = torch.bincount(widths, minlength=4)[1:] / len(widths)
    expected = torch.tensor([math.log((k + 1) / k) for k in (1, 2, 3)]) / math.log(4)
    torch.testing.assert_close(counts, expected.float(), rtol=0, atol=0.03)


def test_scales_reach_the_minibatch_and_the_init(small64) -> None:
    arch = MLPArchitecture((4,), "tanh", 6)
    task = small64.sample_tasks(arch, 1, generator_for(2)).tasks[0]
    x, y = task.minibatch(5)
    raw = small64.inputs[
        task.pool[torch.randint(len(task.pool), (6,), generator=generator_for(task.seed, 5))]
    ]
    torch.testing.assert_close(x, raw * task.input_scale, rtol=0, atol=0)
    assert y.shape == (6,) and x.shape == (6, small64.inputs.shape[1])
    params = task.init_params(generator_for(3))
    bound = task.init_scale / math.sqrt(small64.inputs.shape[1])
    assert params["0.weight"].abs().max() <= bound
    assert params["0.weight"].abs().max() > 0.9 * bound
    assert set(params) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_batched_loss_equals_the_per_task_loss(small64) -> None:
    g = generator_for(4)
    for _ in range(4):  # several architectures and activations
        batch = small64.sample_batch(3, g)
        params = batch.init_params(g)
        for step in (0, 7):
            torch.testing.assert_close(
                batch.loss(params, step),
                TaskBatch.loss(batch, params, step),
                rtol=1e-12,
                atol=1e-12,
            )


def test_subset_keeps_the_class_architecture_and_losses(small64) -> None:
    batch = small64.sample_batch(4, generator_for(5))
    params = batch.init_params(generator_for(6))
    part = batch.subset(slice(1, 3))
    assert type(part) is RandomMLPBatch and len(part) == 2
    assert part.architecture == batch.architecture and part.tasks == batch.tasks[1:3]
    torch.testing.assert_close(
        part.loss({k: v[1:3] for k, v in params.items()}, 2), batch.loss(params, 2)[1:3]
    )


def test_parameters_stack_through_the_unroll_with_a_meta_gradient(small64) -> None:
    batch = small64.sample_batch(3, generator_for(9))
    params = batch.init_params(generator_for(10))
    assert all(v.shape[0] == 3 for v in params.values())
    rule = CoordinateLSTM(hidden_size=4, num_layers=1).double()
    state = rule.init_state(num_coordinates(params), dtype=F64, device="cpu")
    result = unroll(rule, batch, params, state, 3, lr=0.1)
    assert result.losses.shape == (3, 3) and torch.isfinite(result.losses).all()
    result.meta_loss.backward()
    grads = [p.grad for p in rule.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_mnist_source_reads_only_the_requested_part(tmp_path) -> None:
    root = write_fake_mnist(tmp_path / "mnist", n=50)
    fam = make_family("mlp-random", data=root, split="meta_valid")
    assert isinstance(fam, RandomMLPFamily) and fam.source == "mnist"
    assert torch.equal(
        fam.pool, split_indices(50, MNIST_SPLIT, seed=MNIST_SPLIT_SEED)["meta_valid"]
    )
    batch = fam.sample_batch(2, generator_for(0))
    params = batch.init_params(generator_for(1))
    assert params["0.weight"].shape[:2] == (2, batch.architecture.hidden[0])
    assert params["0.weight"].shape[2] == 784
    assert torch.isfinite(batch.loss(params, 0)).all()
    assert "MNIST" in fam.describe() and "'meta_valid' part (5 examples)" in fam.describe()


def test_real_mnist_meta_train_part() -> None:
    try:
        fam = make_family("mlp-random")
    except FileNotFoundError as err:
        pytest.skip(f"MNIST not available: {err}")
    parts = split_indices(10_000, MNIST_SPLIT, seed=MNIST_SPLIT_SEED)
    assert torch.equal(fam.pool, parts["meta_train"])
    batch = fam.sample_batch(2, generator_for(0))
    assert torch.isfinite(batch.loss(batch.init_params(generator_for(1)), 0)).all()


def test_describe_states_the_ranges(family) -> None:
    text = family.describe()
    for fragment in (
        "1-3 hidden layers",
        "[8, 64]",
        "sigmoid, tanh, relu, gelu",
        "[32, 256]",
        "[0.1, 10]",
        "[0.5, 2]",
        "synthetic",
        "'meta_train' part (6000 examples)",
    ):
        assert fragment in text, fragment
    assert "\n" not in text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": "test"}, "unknown split 'test'"),
        ({"source": "cifar"}, "unknown source 'cifar'"),
        ({"data": "/some/folder"}, "cannot be given with source='synthetic'"),
        ({"width": (64, 8)}, "width must be finite with low <= high"),
        ({"width": (0, 8)}, "width must be >= 1"),
        ({"width": (8.0, 64.0)}, "width must be integers"),
        ({"depth": (1, 2, 3)}, "depth must be a \\(low, high\\) pair"),
        ({"input_scale": (0.0, 1.0)}, "input_scale must be > 0"),
        ({"init_scale": (1.0, math.nan)}, "init_scale must be finite"),
        ({"activations": ()}, "activations must be a non-empty sequence"),
        ({"activations": "relu"}, "activations must be a non-empty sequence"),
        ({"activations": ("relu", "swish")}, "unknown activation\\(s\\) \\['swish'\\]"),
        # these raised TypeErrors of their own ("object of type 'int' has no len()", "must be real number, not str")
        ({"width": 64}, "width must be a \\(low, high\\) pair, got 64"),
        ({"input_scale": (0.1, "10")}, "input_scale must be a \\(low, high\\) pair of numbers, got \\(0.1, '10'\\)"),
        ({"init_scale": (None, 2.0)}, "init_scale must be a \\(low, high\\) pair of numbers"),
        ({"activations": 5}, "activations must be a non-empty sequence of names, got 5"),
        ({"activations": None}, "activations must be a non-empty sequence of names, got None"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        RandomMLPFamily(**{"source": "synthetic", **kwargs})


def test_synthetic_seed_is_refused_with_mnist(tmp_path) -> None:
    root = write_fake_mnist(tmp_path / "mnist", n=50)
    # it was ignored: the MNIST family drew the same tasks whatever the seed
    with pytest.raises(ValueError, match="synthetic_seed seeds the synthetic data; it cannot be given with source='mnist'"):
        RandomMLPFamily(root, synthetic_seed=3)
    assert "synthetic_classification_data(seed=0)" in RandomMLPFamily(source="synthetic").describe()
    assert "seed=3" in RandomMLPFamily(source="synthetic", synthetic_seed=3).describe()


def test_bad_sizes_mixed_batches_and_missing_data(small64, tmp_path) -> None:
    for size in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="size must be an integer >= 1"):
            small64.sample_batch(size, generator_for(0))
    a = small64.sample_tasks(MLPArchitecture((4,), "relu", 5), 1, generator_for(0))
    b = small64.sample_tasks(MLPArchitecture((4,), "tanh", 5), 1, generator_for(0))
    with pytest.raises(ValueError, match="share one architecture"):
        RandomMLPBatch([*a.tasks, *b.tasks])
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        small64.sample_tasks(MLPArchitecture((4,), "swish", 5), 1, generator_for(0))
    with pytest.raises(FileNotFoundError):
        make_family("mlp-random", data=tmp_path / "missing")


def test_evaluation_suite_has_a_held_out_family_member(tmp_path) -> None:
    from learnedopt.evaluation import DEFAULT_PROBLEMS, MLP_RANDOM_HELD_OUT, make_problem

    assert "mlp-random-held-out" in DEFAULT_PROBLEMS
    assert MLP_RANDOM_HELD_OUT.activation not in META_TRAIN_ACTIVATIONS
    with pytest.raises(FileNotFoundError):
        make_problem("mlp-random-held-out", tmp_path / "missing")
    try:
        problem = make_problem("mlp-random-held-out")
    except FileNotFoundError as err:
        pytest.skip(f"MNIST not available: {err}")
    parts = split_indices(10_000, MNIST_SPLIT, seed=MNIST_SPLIT_SEED)
    assert torch.equal(problem.pool, parts["held_out"])
    x, y = problem.minibatch(0, 0)
    assert x.shape == (64, 784) and y.shape == (64,) and x.max() == pytest.approx(2.0)
    model = problem.model(0)
    first = model[0].weight
    assert first.abs().max() <= 0.7 / 28 and first.abs().max() > 0.6 / 28
    assert torch.isfinite(problem.loss(model, 0, 0))


def test_mixture_draws_whole_batches_from_each_member_reproducibly(tmp_path) -> None:
    root = write_fake_mnist(tmp_path / "mnist", n=50)
    mix = make_family("mlp-random+quadratic", data=root)
    assert isinstance(mix, MixtureFamily) and mix.name == "mlp-random+quadratic"
    assert [m.name for m in mix.members] == ["mlp-random", "quadratic"]
    kinds = []
    for seed in range(12):
        batch = mix.sample_batch(3, generator_for(seed))
        assert isinstance(batch, (RandomMLPBatch, QuadraticBatch)) and len(batch) == 3
        kinds.append(type(batch))
        again = mix.sample_batch(3, generator_for(seed))
        pa, pb = batch.init_params(generator_for(1)), again.init_params(generator_for(1))
        assert type(again) is type(batch) and all(torch.equal(pa[k], pb[k]) for k in pa)
        assert torch.equal(batch.loss(pa, 0), again.loss(pb, 0))
    assert set(kinds) == {RandomMLPBatch, QuadraticBatch}  # 12 fair draws: each member appears
    text = mix.describe()
    assert "(1, drawn with probability 1/2) mlp-random" in text and "(2, drawn with probability 1/2) quadratic" in text
    assert "'meta_train' part" in text
    # the members follow the mixture to a device and read the requested data part
    assert mix.to("cpu").members[0].device == torch.device("cpu")
    valid = make_family("mlp-random+quadratic", data=root, split="meta_valid")
    assert "'meta_valid' part" in valid.describe()


def test_weighted_mixture_draws_members_in_proportion(tmp_path) -> None:
    root = write_fake_mnist(tmp_path / "mnist", n=50)
    mix = make_family("mlp-random:3+quadratic", data=root)
    assert mix.name == "mlp-random:3+quadratic" and mix.weights == [3, 1]
    assert "probability 3/4) mlp-random" in mix.describe() and "probability 1/4) quadratic" in mix.describe()
    draws = [type(mix.sample_batch(1, generator_for(seed))) for seed in range(400)]
    share = draws.count(RandomMLPBatch) / len(draws)
    assert 0.68 < share < 0.82, share  # 3/4, with 400 draws' binomial spread (sd 0.022)
    # an equal mixture draws exactly as before weights existed: one randint over the members
    equal = make_family("mlp-random+quadratic", data=root)
    for seed in range(20):
        index = int(torch.randint(2, (), generator=generator_for(seed)))
        expected = (RandomMLPBatch, QuadraticBatch)[index]
        assert type(equal.sample_batch(1, generator_for(seed))) is expected


@pytest.mark.parametrize(
    "name",
    ["quadratic+quadratic", "quadratic+cubic", "quadratic+", "mlp-random:0+quadratic", "mlp-random:x+quadratic",
     "mlp-random:3", "mlp-random:\u00b3+quadratic", "mlp-random:\u0663+quadratic",
     "mlp-random:+quadratic"],
)
def test_bad_mixtures_are_refused(name) -> None:
    with pytest.raises(ValueError, match="unknown task"):
        make_family(name)
    assert not is_task_family(name)


def test_data_is_refused_by_families_that_read_none(tmp_path) -> None:
    for name in ("quadratic", "regression", "quadratic+regression"):
        with pytest.raises(ValueError, match=re.escape(f"task {name!r} reads none")):
            make_family(name, data=tmp_path)
    # in a mixture, the folder goes to the members that read it
    root = write_fake_mnist(tmp_path / "mnist", n=50)
    mix = make_family("regression+mlp-random", data=root)
    assert "MNIST" in mix.members[1].describe()


def test_bad_mixture_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="at least two families"):
        MixtureFamily([make_family("quadratic")])
    with pytest.raises(ValueError, match="a positive integer weight per member, got \\[1, 0\\]"):
        MixtureFamily([make_family("quadratic"), make_family("quadratic")], [1, 0])
    with pytest.raises(ValueError, match="a mixture's weights must sum to at most 1,000,000, got \\[1000000, 1\\]"):
        MixtureFamily([make_family("quadratic"), make_family("quadratic")], [10**6, 1])
    with pytest.raises(ValueError, match="a mixture needs a weight per member, got 1 for 2"):
        MixtureFamily([make_family("quadratic"), make_family("quadratic")], [1])
    # a bool is no weight (True was taken as 1), and a member that is not a family raised
    # AttributeError "'str' object has no attribute 'name'"
    with pytest.raises(ValueError, match="a positive integer weight per member, got \\[True, 2\\]"):
        MixtureFamily([make_family("quadratic"), make_family("quadratic")], [True, 2])
    with pytest.raises(ValueError, match="^a mixture's members must be TaskFamily instances, got member 1: a str$"):
        MixtureFamily([make_family("quadratic"), "regression"])
    with pytest.raises(ValueError, match="got member 0: the class RandomMLPFamily, not one built$"):
        MixtureFamily([RandomMLPFamily, make_family("quadratic")])


@pytest.mark.parametrize("u", [0.0, 1.0 - 2.0**-53], ids=["lowest", "highest"])
def test_the_extreme_uniform_draws_stay_in_the_documented_ranges(monkeypatch: pytest.MonkeyPatch, u: float) -> None:
    """A log-uniform integer is the floor of exp(U(log low, log (high + 1))): at U's lowest value, 0,
    exp(log(8)) rounds to 7.999999999999998, and the width of an mlp-random (8-64) or regression
    (16-128) layer was 7 or 15, below its range (once in 2**53 draws, but a range is a range)."""
    from learnedopt.meta.tasks import RegressionFamily, _log_uniform, _log_uniform_int

    real_rand = torch.rand

    def extreme(*args: object, **kwargs: object) -> torch.Tensor:
        return torch.full_like(real_rand(*args, **kwargs), u)

    monkeypatch.setattr(torch, "rand", extreme)
    g = generator_for(0)
    for low, high in ((8, 64), (16, 128), (5, 5), (7, 20), (32, 256), (1, 3)):
        k = _log_uniform_int(low, high, g)
        assert k == (low if u == 0 else high), (low, high, k)
    for low, high in ((0.1, 10.0), (0.5, 2.0), (1.0, 4.0), (8.0, 16.0)):
        assert low <= _log_uniform(low, high, g) <= high
    arch = RandomMLPFamily(source="synthetic").sample_architecture(g)
    assert all(8 <= w <= 64 for w in arch.hidden) and 32 <= arch.batch_size <= 256
    batch = RegressionFamily(points=4).sample_batch(1, g)
    widths = [v.shape[0] for k, v in batch.tasks[0].module.named_parameters() if k.endswith("bias")][:-1]
    assert widths and all(16 <= w <= 128 for w in widths), widths


@pytest.mark.parametrize(
    ("hidden", "activation", "batch_size", "message"),
    [
        ((0,), "relu", 32, r"hidden widths must be integers >= 1, got \(0,\)"),  # was ZeroDivisionError in the init
        ((4, -1), "relu", 8, r"hidden widths must be integers >= 1, got \(4, -1\)"),  # torch's negative dimension
        ((True,), "relu", 8, r"hidden widths must be integers >= 1, got \(True,\)"),
        ("48", "relu", 8, r"hidden must be a sequence of widths, got '48'"),
        ((4,), "relu", 0, r"batch_size must be an integer >= 1, got 0"),  # a NaN loss at every step
        ((4,), "relu", 8.5, r"batch_size must be an integer >= 1, got 8\.5"),
        ((4,), "swish", 8, r"unknown activation 'swish'; choose from sigmoid, tanh"),
    ],
)
def test_degenerate_architectures_are_refused(small64, hidden, activation, batch_size, message) -> None:
    """``MLPArchitecture`` is public and ``sample_tasks`` takes one of the caller's (the evaluation's
    held-out member is one): zero-width layers and empty minibatches gave a ZeroDivisionError or a NaN loss."""
    with pytest.raises(ValueError, match=rf"^MLPArchitecture: {message}"):
        MLPArchitecture(hidden, activation, batch_size)


def test_an_architecture_takes_its_widths_as_any_sequence(small64) -> None:
    """A list of widths gave an architecture that a batch could not hash ("unhashable type: 'list'")."""
    arch = MLPArchitecture([4, 3], "tanh", 6)
    assert arch == MLPArchitecture((4, 3), "tanh", 6) and arch.hidden == (4, 3)
    batch = small64.sample_tasks(arch, 2, generator_for(0))
    assert batch.architecture == arch and batch.loss(batch.init_params(generator_for(1)), 0).isfinite().all()
    assert MLPArchitecture((), "relu", 1).hidden == ()  # no hidden layer: a linear classifier
