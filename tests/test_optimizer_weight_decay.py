"""``weight_decay``: decoupled weight decay after the learned step, on every path."""

import math
import pickle

import pytest
import torch
from helpers import OPTIMIZERS, make_params, set_grads, step

SHAPES = [(5, 3), (7,), (1,), (4, 2)]


def decayed_run(kind, foreach, lr, *, steps=4, by_hand=False, nan_at=None, nan_policy="raise", maximize=False):
    """Three groups (weight decay 0.1, 0.3 and 0): the optimizer's own decay, or none and the
    same multiplication done by hand after each step (the definition). ``params[2]`` has no
    gradient at the second step, so takes no step and no decay there (as AdamW's)."""
    params = make_params(SHAPES)
    decays = (0.1, 0.1, 0.3, 0.0)
    groups = [
        {"params": params[:2], "weight_decay": 0.0 if by_hand else decays[0]},
        {"params": params[2:3], "weight_decay": 0.0 if by_hand else decays[2]},
        {"params": params[3:], "weight_decay": 0.0},
    ]
    opt = OPTIMIZERS[kind](groups, lr=lr, foreach=foreach, state_dtype=torch.float64, nan_policy=nan_policy, maximize=maximize)
    for t in range(steps):
        skip = (2,) if t == 1 else ()
        set_grads(params, seed=10 + t, skip=skip)
        if nan_at is not None and t == nan_at:
            params[1].grad[0] = math.nan
        before = [p.detach().clone() for p in params]
        step(opt, 0.5 + t)
        if by_hand:
            with torch.no_grad():
                for i, p in enumerate(params):
                    if i not in skip and not (nan_at == t and i == 1):  # a skipped tensor takes no step, and no decay
                        p.mul_(1.0 - lr * decays[i])
        if nan_at == t:
            assert torch.equal(params[1], before[1])
        assert torch.equal(params[2], before[2]) == (t == 1)
    return params, opt


@pytest.mark.parametrize("kind", ["lstm", "meta"])
@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("lr", [1.0, 0.3])
@pytest.mark.parametrize("maximize", [False, True])
def test_weight_decay_multiplies_each_stepped_parameter_after_the_learned_step(kind, foreach, lr, maximize) -> None:
    """Bit for bit the learned step followed by ``p *= 1 - lr * weight_decay``, with each group's
    own decay (the last group has none), shrinking the parameters under ``maximize`` too (as
    AdamW's); the rule reads the decayed values at the next step, as MetaLSTMOptimizer's, which
    reads the parameter, shows."""
    got, opt = decayed_run(kind, foreach, lr, maximize=maximize)
    want, ref = decayed_run(kind, foreach, lr, maximize=maximize, by_hand=True)
    for p, q in zip(got, want, strict=True):
        assert torch.equal(p, q)
        assert all(torch.equal(opt.state[p][name], ref.state[q][name]) for name in opt.rule.state_spec())


@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_a_tensor_skipped_for_a_nan_gradient_is_not_decayed(kind) -> None:
    got, _ = decayed_run(kind, None, 1.0, nan_at=2, nan_policy="skip")
    want, _ = decayed_run(kind, None, 1.0, nan_at=2, nan_policy="skip", by_hand=True)
    for p, q in zip(got, want, strict=True):
        assert torch.equal(p, q)


def test_lr_zero_decays_nothing_and_a_resumed_run_continues_exactly() -> None:
    params = make_params(SHAPES)
    opt = OPTIMIZERS["lstm"](params, lr=0.0, weight_decay=0.5)
    before = [p.detach().clone() for p in params]
    set_grads(params, seed=0)
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before, strict=True))

    def run(resume_at=None):
        params = make_params(SHAPES)
        opt = OPTIMIZERS["lstm"](params, weight_decay=0.05)
        for t in range(4):
            if t == resume_at:
                saved = opt.state_dict()
                opt = OPTIMIZERS["lstm"](params)  # weight_decay comes back with the state
                opt.load_state_dict(saved)
                assert opt.param_groups[0]["weight_decay"] == 0.05
            set_grads(params, seed=t)
            opt.step()
        return params

    assert all(torch.equal(p, q) for p, q in zip(run(), run(resume_at=2), strict=True))


def test_a_state_saved_before_the_option_existed_loads_and_decays_nothing() -> None:
    """A group saved (or pickled) before ``weight_decay`` existed decays nothing, as the run that
    saved it, even where the loading optimizer has a decay of its own."""
    params = make_params(SHAPES)
    opt = OPTIMIZERS["lstm"](params)
    set_grads(params, seed=0)
    opt.step()
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["weight_decay"]
    plain = OPTIMIZERS["lstm"](make_params(SHAPES))
    plain.load_state_dict(opt.state_dict())
    other = OPTIMIZERS["lstm"](make_params(SHAPES), weight_decay=0.05)
    other.load_state_dict(saved)
    assert other.param_groups[0]["weight_decay"] == 0.0
    pickled = OPTIMIZERS["lstm"](make_params(SHAPES))
    pickled.load_state_dict(opt.state_dict())
    del pickled.param_groups[0]["weight_decay"]
    pickled = pickle.loads(pickle.dumps(pickled))
    for optimizer in (plain, other, pickled):
        set_grads(optimizer.param_groups[0]["params"], seed=1)
        optimizer.step()
    assert pickled.param_groups[0]["weight_decay"] == 0.0
    for p, q, r in zip(*(o.param_groups[0]["params"] for o in (plain, other, pickled)), strict=True):
        assert torch.equal(p, q) and torch.equal(p, r)


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf, True, "0.01"])
def test_a_bad_weight_decay_is_refused(bad) -> None:
    with pytest.raises(ValueError, match="Invalid weight_decay"):
        OPTIMIZERS["lstm"](make_params(SHAPES), weight_decay=bad)
    opt = OPTIMIZERS["lstm"](make_params(SHAPES))
    opt.param_groups[0]["weight_decay"] = bad
    with pytest.raises(ValueError, match="Invalid weight_decay"):
        opt.step()


@pytest.mark.parametrize("kind", ["lstm", "meta"])
@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parameters_are_multiplied_by_the_unrounded_factor(kind, foreach, dtype) -> None:
    """A bfloat16 or float16 parameter is multiplied by ``1 - lr * weight_decay`` as
    ``p.mul_(1 - lr * weight_decay)`` (and AdamW's per-tensor step) multiplies it: in float32,
    rounded once. ``torch._foreach_mul_`` on CPU rounded the factor to the parameter's dtype
    first (0.997 to bfloat16's 0.99609375: a third more decay than asked for)."""
    shapes = [(1000,), (7, 3)]
    decay = 0.003
    params = make_params(shapes, dtype=dtype)
    others = make_params(shapes, dtype=dtype)
    opt = OPTIMIZERS[kind](params, foreach=foreach, weight_decay=decay)
    other = OPTIMIZERS[kind](others, foreach=foreach)
    for t in range(2):
        set_grads(params, seed=t)
        set_grads(others, seed=t)
        step(opt, 0.5 + t)
        step(other, 0.5 + t)
        with torch.no_grad():
            for q in others:
                q.mul_(1.0 - decay)
    for p, q in zip(params, others, strict=True):
        assert torch.equal(p, q)
