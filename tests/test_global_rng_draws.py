"""Checking a configuration, and building a rule or a few-shot learner whose weights come from a
seed of its own, draw nothing from torch's global random generator: a seeded script's later
draws (data order, dropout masks) stay those it would make without the call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from learnedopt.meta.fewshot import FewShotConfig, FewShotLearner, LearnerSpec, fewshot_defaults
from learnedopt.meta.loop import check_rule_config
from learnedopt.meta.tasks import generator_for
from learnedopt.meta.train import _INIT_STREAM, MetaTrainConfig, initial_rule
from learnedopt.nn import RULES, CoordinateLSTM, MetaLSTMCell


def fewshot(algo: str, **changes: Any) -> FewShotConfig:
    return FewShotConfig(algo=algo, task="sinusoid", **{**fewshot_defaults(algo, "sinusoid", None), **changes})


def leaves_the_global_rng(call: Callable[[], Any]) -> Any:
    """``call()``'s result, asserting that the global CPU generator's state is as before it."""
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    out = call()
    assert torch.equal(torch.get_rng_state(), before), "the call drew from torch's global generator"
    return out


@pytest.mark.parametrize(
    ("kind", "rule_config"),
    [("CoordinateLSTM", {"hidden_size": 5}), ("MetaLSTMCell", {"hidden_size": 4, "forget_bias_init": [4.0, 5.0]})],
)
def test_checking_a_rule_config_draws_nothing(kind: str, rule_config: dict[str, Any]) -> None:
    """``check_rule_config`` built the rule on the CPU to see that it builds, drawing its random
    initialisation from the global generator; so did every ``validate()`` that reaches it."""
    leaves_the_global_rng(lambda: check_rule_config(kind, rule_config))
    leaves_the_global_rng(lambda: MetaTrainConfig(rule=kind, rule_config=rule_config).validate())
    if kind == "MetaLSTMCell":
        leaves_the_global_rng(lambda: fewshot("meta-lstm", rule_config=rule_config).validate())


def test_a_meta_lstm_learners_spec_draws_nothing() -> None:
    """``LearnerSpec.for_config`` built the rule to read its config back (``_rule_spec``)."""
    spec = leaves_the_global_rng(lambda: LearnerSpec.for_config(fewshot("meta-lstm", rule_config={"hidden_size": 3})))
    assert spec.rule == {"kind": "MetaLSTMCell", "config": MetaLSTMCell(hidden_size=3).config_dict()}


def old_seeded_rule(kind: str, config: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The weights of a rule built as before (constructed on the CPU, then reset from ``generator``)."""
    with torch.random.fork_rng(devices=[]):
        rule = RULES[kind].from_config_dict(config)
    rule.reset_parameters(generator=generator)
    return rule.state_dict()


@pytest.mark.parametrize(("kind", "rule_config"), [("CoordinateLSTM", None), ("MetaLSTMCell", {"hidden_size": 3})])
def test_a_meta_train_runs_initial_rule_draws_nothing_and_keeps_its_weights(kind: str, rule_config: Any) -> None:
    """``initial_rule`` built the library's rule on the CPU (a random initialisation from the
    global generator) before resetting every weight from the run's seed."""
    config = MetaTrainConfig(rule=kind, rule_config=rule_config, seed=7)
    rule = leaves_the_global_rng(lambda: initial_rule(config))
    expected = old_seeded_rule(kind, dict(rule_config or {}), generator_for(7, _INIT_STREAM))
    assert rule.state_dict().keys() == expected.keys()
    assert all(torch.equal(rule.state_dict()[k], v) for k, v in expected.items())


def test_a_seeded_meta_lstm_learner_draws_nothing_and_keeps_its_rules_weights() -> None:
    """``FewShotLearner(seed=...)`` of meta-lstm built its rule on the CPU (a random
    initialisation from the global generator) before resetting it from the seed."""
    spec = LearnerSpec.for_config(fewshot("meta-lstm", rule_config={"hidden_size": 3}))
    learner = leaves_the_global_rng(lambda: FewShotLearner(spec, seed=5))
    expected = old_seeded_rule("MetaLSTMCell", spec.rule["config"], generator_for(5, 0, 1))
    assert all(torch.equal(learner.rule.state_dict()[k], v) for k, v in expected.items())


class ScaledCell(MetaLSTMCell):
    """A rule whose ``reset_parameters`` leaves a weight its constructor drew (``scale``), and one
    it scales rather than sets (``shift``)."""

    kind = "TestScaledCell"

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self.scale = torch.nn.Parameter(torch.randn(2))
        self.shift = torch.nn.Parameter(torch.ones(2))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        super().reset_parameters(generator)
        if hasattr(self, "shift"):
            with torch.no_grad():
                self.shift.mul_(2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_seeded_rule_gives_the_weights_of_a_constructed_and_reset_rule(dtype: torch.dtype) -> None:
    """In the default dtype; a weight ``reset_parameters`` leaves or scales keeps the
    constructor's value (built so in a fork of the global generator), the others are drawn from
    ``generator`` as before."""
    from learnedopt.weights import seeded_rule

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        for cls, config in ((MetaLSTMCell, {"hidden_size": 3}), (CoordinateLSTM, {}), (ScaledCell, {})):
            rule = leaves_the_global_rng(lambda cls=cls, config=config: seeded_rule(cls, config, torch.Generator().manual_seed(9)))
            torch.manual_seed(1234)  # the generator's state at the call
            expected = cls.from_config_dict(config)
            expected.reset_parameters(generator=torch.Generator().manual_seed(9))
            assert type(rule) is cls and rule.state_dict().keys() == expected.state_dict().keys()
            for name, value in expected.state_dict().items():
                assert value.dtype == dtype and torch.equal(rule.state_dict()[name], value), (cls.kind, name)
    finally:
        torch.set_default_dtype(previous)


def test_seeded_rule_of_the_librarys_rules_neither_saves_nor_restores_the_global_rng(monkeypatch) -> None:  # noqa: ANN001
    """Saving and restoring the generator (``fork_rng``) would roll back another thread's draws:
    the library's rules, whose ``reset_parameters`` sets every weight, are built without it."""
    from learnedopt.weights import seeded_rule

    def refused(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("fork_rng")

    monkeypatch.setattr(torch.random, "fork_rng", refused)
    for cls in (CoordinateLSTM, MetaLSTMCell):
        seeded_rule(cls, {}, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("algo", ["maml", "meta-lstm", "reptile"])
def test_an_unseeded_or_loaded_learner_leaves_the_global_rng_as_it_was(algo: str, tmp_path) -> None:  # noqa: ANN001
    """An unseeded learner (e.g. to load tensors into, as ``load_learner`` does) draws PyTorch's
    default initialisation, its model's in a fork of the global generator; meta-lstm's rule drew
    from it for good. The rule is still the default initialisation from the generator's state."""
    from learnedopt.meta.fewshot import load_learner, save_learner

    spec = LearnerSpec.for_config(fewshot(algo))
    save_learner(FewShotLearner(spec, seed=0), tmp_path / "model.safetensors")
    loaded, _ = leaves_the_global_rng(lambda: load_learner(tmp_path / "model.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(loaded.tensors().values(), FewShotLearner(spec, seed=0).tensors().values(), strict=True))
    learner = leaves_the_global_rng(lambda: FewShotLearner(spec))
    if spec.rule is not None:
        torch.manual_seed(1234)
        fresh = RULES[spec.rule["kind"]].from_config_dict(spec.rule["config"])
        fresh.reset_parameters()
        assert all(torch.equal(a, b) for a, b in zip(learner.rule.state_dict().values(), fresh.state_dict().values(), strict=True))


def test_the_regression_problems_model_draws_nothing_and_keeps_its_weights() -> None:
    """``regression-1000``'s ``model(seed)`` built its MLP on the CPU (PyTorch's initialisation
    from the global generator), then drew every weight again from the seed's generator, as the
    other problems do without the first draw."""
    from torch import nn

    from learnedopt.evaluation.problems import _INIT_STREAM as PROBLEM_INIT_STREAM
    from learnedopt.evaluation.problems import _init_default_, make_problem

    problem = make_problem("regression-1000")
    model = leaves_the_global_rng(lambda: problem.model(3))
    expected = _init_default_(nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1)), generator_for(3, PROBLEM_INIT_STREAM))
    assert model.state_dict().keys() == expected.state_dict().keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.state_dict().items())


@pytest.mark.parametrize(
    "args",
    [
        ["--unroll", "2", "--horizon", "2", "--meta-batch", "2", "--rule-config", '{"hidden_size": 4}'],
        ["--unroll", "2", "--horizon", "2", "--meta-batch", "2"],
        ["--algo", "meta-lstm", "--meta-batch", "2", "--val-tasks", "1", "--rule-config", '{"hidden_size": 3}'],
        ["--algo", "meta-lstm", "--meta-batch", "2", "--val-tasks", "1"],
    ],
    ids=["lstm-rule-config", "lstm", "meta-lstm-rule-config", "meta-lstm"],
)
def test_a_meta_train_run_leaves_the_callers_global_rng_as_it_was(args: list[str], tmp_path) -> None:  # noqa: ANN001
    """``learnedopt meta-train`` called from a seeded script (``cli.main``): its checks and its
    initial rule drew from the global generator, so the script's later draws changed; a run's
    own draws are made in seeded forks of it."""
    from learnedopt.cli import main

    argv = ["meta-train", "--out", str(tmp_path / "run"), "--quiet", "--meta-steps", "1", *args]
    assert leaves_the_global_rng(lambda: main(argv)) == 0
