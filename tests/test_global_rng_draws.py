"""Checking a configuration, and building a rule or a few-shot learner whose weights come from a
seed of its own, draw nothing from torch's global random generator: a seeded script's later
draws (data order, dropout masks) stay those it would make without the call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from learnedopt.meta.fewshot import FewShotConfig, LearnerSpec, fewshot_defaults
from learnedopt.meta.loop import check_rule_config
from learnedopt.meta.train import MetaTrainConfig
from learnedopt.nn import MetaLSTMCell


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
