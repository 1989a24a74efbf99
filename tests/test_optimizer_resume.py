"""state_dict / load_state_dict: a fresh optimizer continues bit-identically."""

import copy
import io

import pytest
import torch
from helpers import OPTIMIZERS, make_params, set_grads, step

from learnedopt import CoordinateLSTM, LSTMOptimizer


def train(opt, params, steps, first):
    for t in range(first, first + steps):
        set_grads(params, seed=t, skip={2} if t % 3 == 0 else ())
        step(opt, 1.0 / (t + 1))


@pytest.mark.parametrize("kind", ["lstm", "meta"])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_resume_is_bit_identical(kind, foreach, state_dtype, param_dtype) -> None:
    shapes = [(6, 5), (7,), (3, 3), (1,)]
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.5}]
    options = dict(foreach=foreach, state_dtype=state_dtype)

    params = make_params(shapes, dtype=param_dtype)
    opt = OPTIMIZERS[kind](groups(params), **options)
    train(opt, params, 4, first=0)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buffer)
    train(opt, params, 5, first=4)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = [p.clone().requires_grad_(True) for p in saved["params"]]
    fresh = OPTIMIZERS[kind](groups(resumed), **options)
    fresh.load_state_dict(saved["opt"])
    assert fresh.state[resumed[0]]["h"].dtype == state_dtype
    train(fresh, resumed, 5, first=4)

    for p, q in zip(params, resumed):
        assert torch.equal(p, q)
    for p, q in zip(params, resumed):
        for name, value in opt.state[p].items():
            assert torch.equal(value, fresh.state[q][name]), name


def test_state_dict_holds_per_parameter_states_and_rule_fingerprint() -> None:
    params = make_params([(4,), (2, 3)], dtype=torch.float32)
    opt = LSTMOptimizer(params)
    set_grads(params, 0)
    opt.step()
    sd = opt.state_dict()
    assert set(sd["state"]) == {0, 1}
    assert sd["state"][1]["h"].shape == (2, 6, 20)
    assert sd["learned_rule"]["kind"] == "CoordinateLSTM" and len(sd["learned_rule"]["sha256"]) == 64


def test_loading_into_an_optimizer_with_other_weights_fails() -> None:
    params = make_params([(4,)], dtype=torch.float32)
    opt = LSTMOptimizer(params)
    set_grads(params, 0)
    opt.step()
    other_rule = CoordinateLSTM()
    other_rule.reset_parameters(torch.Generator().manual_seed(1))
    other = LSTMOptimizer(params, weights=other_rule)
    with pytest.raises(ValueError, match="other weights"):
        other.load_state_dict(opt.state_dict())
    wide = LSTMOptimizer(params, weights=CoordinateLSTM(hidden_size=8))
    sd = copy.deepcopy(opt.state_dict())
    del sd["learned_rule"]
    with pytest.raises(ValueError, match="expected"):
        wide.load_state_dict(sd)


def test_load_does_not_alias_the_given_state() -> None:
    params = make_params([(4,)], dtype=torch.float32)
    opt = LSTMOptimizer(params)
    set_grads(params, 0)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    snapshot = sd["state"][0]["h"].clone()
    fresh = LSTMOptimizer(params)
    fresh.load_state_dict(sd)
    set_grads(params, 1)
    fresh.step()
    assert torch.equal(sd["state"][0]["h"], snapshot)
