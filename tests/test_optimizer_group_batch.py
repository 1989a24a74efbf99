"""Param groups that share one stream of rule calls (``group_batch_limit``) against each group
stepped by itself (``group_batch_limit = 0``), bit for bit."""

import copy

import pytest
import torch
from helpers import OPTIMIZERS, assert_same_params_and_states, make_params, set_grads, step

#: small groups of different options: lr, maximize, weight decay, state dtype, NaN policy
GROUPS = [
    {"lr": 1.0},
    {"lr": 0.3, "weight_decay": 0.1},
    {"lr": 0.7, "maximize": True},
    {"lr": 0.0},
    {"lr": 0.5, "nan_policy": "skip"},
    {"lr": 2.0, "state_dtype": torch.bfloat16},
    {"lr": 1.5, "state_dtype": torch.bfloat16, "maximize": True},
    {"lr": 0.9},
    {"lr": 0.4, "state_dtype": torch.float16},  # states saturated into float16 as they are written
    {"lr": 0.6, "state_dtype": torch.float16, "weight_decay": 0.2},
    {"lr": 0.8, "maximize": True},  # shares with group 2 under MetaLSTMOptimizer too (both read -loss)
]
SHAPES = [[(3,), (2, 5)], [(7,)], [(4, 4), ()], [(5,)], [(6,), (9,)], [(8,)], [(3, 3)], [(200,)], [(6,)], [(2, 2)], [(4,)]]


def build(kind, limit, *, dtype=torch.float32, chunk=37):
    params = [make_params(shapes, dtype=dtype, seed=number) for number, shapes in enumerate(SHAPES)]
    groups = [{"params": ps, **options} for ps, options in zip(params, GROUPS, strict=True)]
    opt = OPTIMIZERS[kind](groups)
    opt.chunk = chunk  # chunks that span groups, and a group (200 coordinates) over several
    opt.group_batch_limit = limit
    return [p for ps in params for p in ps], opt


def run(kind, limit, steps=3, **options):
    flat, opt = build(kind, limit, **options)
    for t in range(steps):
        set_grads(flat, seed=10 + t, skip={1, 4} if t == 1 else ())
        if t == 2:  # a NaN gradient in the nan_policy='skip' group: that tensor alone is skipped
            flat[7].grad[0] = float("nan")
        step(opt, 0.5 + t)
    return flat, opt


@pytest.mark.parametrize("kind", ["lstm", "meta"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shared_rule_calls_step_as_each_group_alone(kind, dtype) -> None:
    """Every option per group (lr, lr 0, maximize, weight decay, bfloat16 and float16 states, a skipped NaN
    tensor, gradients None), a group over the limit, chunks across groups: the same bits as each
    group stepped by itself, and the same state dict."""
    params, opt = run(kind, 64, dtype=dtype)
    others, other = run(kind, 0, dtype=dtype)
    assert_same_params_and_states(params, opt, others, other)
    assert [int(opt.state[p]["step"]) for p in params] == [int(other.state[q]["step"]) for q in others]
    saved, expected = opt.state_dict(), other.state_dict()
    assert saved["param_groups"] == expected["param_groups"]
    for index, state in expected["state"].items():
        assert all(torch.equal(value, saved["state"][index][name]) for name, value in state.items())


@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_small_groups_share_one_rule_call(kind) -> None:
    """30 one-tensor groups: one rule call per step for the rules that read no loss (with any
    maximize), one per ``maximize`` for the loss-reading rule (which reads ``-loss`` there); each
    group alone without sharing."""
    params = make_params([(10,)] * 30, dtype=torch.float32)
    opt = OPTIMIZERS[kind]([{"params": [p], "lr": 0.1 + i / 30, "maximize": i % 3 == 0} for i, p in enumerate(params)])
    calls = []
    opt.rule.register_forward_hook(lambda *_: calls.append(1))
    set_grads(params, 0)
    step(opt)
    assert len(calls) == (2 if opt.rule.needs_loss else 1)
    opt.group_batch_limit = 0
    calls.clear()
    step(opt)
    assert len(calls) == 30


def test_a_group_over_the_limit_runs_by_itself() -> None:
    params = make_params([(10,), (10,), (100,)], dtype=torch.float32)
    opt = OPTIMIZERS["lstm"]([{"params": [p]} for p in params])
    opt.group_batch_limit = 50
    sizes = []
    opt.rule.register_forward_hook(lambda module, args, output: sizes.append(args[0].shape[0]))
    set_grads(params, 0)
    opt.step()
    assert sorted(sizes) == [64, 128]  # the two small groups in one call, the large one alone (padded rows)


def test_a_shared_call_that_fails_after_writing_blocks_the_next_step(monkeypatch) -> None:
    """An error in the second chunk of a shared call, after the first chunk's states were
    written: the step re-raises it and later steps refuse, as for a group's own chunks."""
    params = make_params([(10,)] * 4, dtype=torch.float32)
    opt = OPTIMIZERS["lstm"]([{"params": [p]} for p in params])
    opt.chunk = 20
    set_grads(params, 0)
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    forward = type(opt.rule).forward
    calls = []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("out of memory")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(opt.rule), "forward", failing)
    with pytest.raises(torch.OutOfMemoryError):
        opt.step()
    with pytest.raises(RuntimeError, match="failed part-way"):
        opt.step()
    monkeypatch.setattr(type(opt.rule), "forward", forward)
    opt.load_state_dict(before)
    opt.step()


def test_a_shared_call_that_fails_before_writing_changes_nothing(monkeypatch) -> None:
    params = make_params([(10,)] * 4, dtype=torch.float32)
    opt = OPTIMIZERS["lstm"]([{"params": [p]} for p in params])
    set_grads(params, 0)
    opt.step()
    values = [p.detach().clone() for p in params]
    states = copy.deepcopy(opt.state_dict()["state"])

    def failing(*args, **kwargs):
        raise torch.OutOfMemoryError("out of memory")

    forward = type(opt.rule).forward
    monkeypatch.setattr(type(opt.rule), "forward", failing)
    with pytest.raises(torch.OutOfMemoryError):
        opt.step()
    assert all(torch.equal(p, v) for p, v in zip(params, values, strict=True))
    now = opt.state_dict()["state"]
    assert all(torch.equal(value, now[i][k]) for i, state in states.items() for k, value in state.items())
    monkeypatch.setattr(type(opt.rule), "forward", forward)
    opt.step()  # and the step can be retried
