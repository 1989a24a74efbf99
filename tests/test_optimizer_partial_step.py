"""A step that fails part-way through (an out-of-memory error in a later chunk or group): what it
leaves, and that a retry can never step a tensor or state twice."""

import copy

import pytest
import torch
from helpers import OPTIMIZERS, assert_same_params_and_states, make_params, set_grads, step, step_alike


class Exhausted(torch.OutOfMemoryError):
    """A simulated out-of-memory error."""


def failing_at_call(opt, n: int) -> list[int]:
    """Make ``opt``'s rule raise :class:`Exhausted` at its ``n``-th call (a chunk of the batched
    path, a tensor of the per-tensor one) from now; returns the call count."""
    rule, calls = opt.rule, [0]
    real = type(rule).forward

    def forward(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise Exhausted("simulated out of memory")
        return real(rule, *args, **kwargs)

    rule.forward = forward
    return calls


def step_failing_at_call(opt, n: int) -> None:
    """One ``step()`` whose rule raises :class:`Exhausted` at its ``n``-th call
    (:func:`failing_at_call`), checked to raise it; the rule is whole again after."""
    failing_at_call(opt, n)
    with pytest.raises(Exhausted):
        step(opt)
    del opt.rule.forward


def build(kind, foreach, groups):
    params = make_params([(40,), (30,), (50,), (20,)], dtype=torch.float32)
    split = [{"params": params[:2]}, {"params": params[2:]}] if groups else params
    opt = OPTIMIZERS[kind](split, foreach=foreach)
    opt.chunk = 64  # the 120 coordinates of the first two tensors are two chunks
    return params, opt


@pytest.mark.parametrize("groups", [False, True])
@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_a_step_failing_after_it_changed_something_makes_the_next_step_raise(kind, foreach, groups) -> None:
    params, opt = build(kind, foreach, groups)
    set_grads(params, seed=1)
    step(opt)
    saved = copy.deepcopy(opt.state_dict())  # as torch.optim's, its states are the live ones
    saved_params = [p.detach().clone() for p in params]
    set_grads(params, seed=2)
    step_failing_at_call(opt, 2)  # the second chunk (or tensor): the first one's states are written
    with pytest.raises(RuntimeError, match=r"failed part-way.*Exhausted.*twice.*load_state_dict.*accept_partial_step"):
        step(opt)
    with pytest.raises(RuntimeError, match="failed part-way"):  # not only once
        step(opt)

    # loading the state saved before the failed step (and the parameters of then) continues as
    # a run that never failed
    reference, ref_opt = build(kind, foreach, groups)
    set_grads(reference, seed=1)
    step(ref_opt)
    with torch.no_grad():
        for p, q in zip(params, saved_params, strict=True):
            p.copy_(q)
    opt.load_state_dict(saved)
    step_alike(params, opt, reference, ref_opt, (2, 3))


@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_the_state_as_the_failed_step_left_it_can_be_accepted(kind) -> None:
    params, opt = build(kind, None, groups=False)
    set_grads(params, seed=1)
    step_failing_at_call(opt, 2)
    opt.accept_partial_step()
    saved = copy.deepcopy(opt.state_dict())  # saving works again
    step(opt)  # runs
    fresh = OPTIMIZERS[kind](params)
    fresh.load_state_dict(saved)
    step(fresh)  # and so does a run resumed from what was saved after accepting


def test_accepting_when_no_step_failed_is_harmless() -> None:
    params, opt = build("lstm", None, groups=False)
    set_grads(params, seed=1)
    opt.accept_partial_step()
    step(opt)


@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_saving_the_state_a_step_left_part_way_raises(kind) -> None:
    """The states a step left part-way are half-stepped: ``state_dict()`` saved them as if whole,
    and loading that (into a fresh optimizer, or this one) resumed them in silence."""
    params, opt = build(kind, None, groups=False)
    set_grads(params, seed=1)
    step_failing_at_call(opt, 2)
    with pytest.raises(RuntimeError, match=r"state_dict.*failed part-way.*Exhausted.*accept_partial_step") as info:
        opt.state_dict()
    assert "\n" not in str(info.value)
    with pytest.raises(RuntimeError, match="failed part-way"):  # the block is still there
        step(opt)
    with pytest.raises(RuntimeError, match="failed part-way"):
        copy.deepcopy(opt).state_dict()


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_a_step_failing_before_it_changed_anything_can_be_retried(kind, foreach) -> None:
    params, opt = build(kind, foreach, groups=True)
    reference, ref_opt = build(kind, foreach, groups=True)
    for seed in (1, 2):
        set_grads(params, seed=seed)
        set_grads(reference, seed=seed)
        step_failing_at_call(opt, 1)  # the first chunk of the first group: nothing written yet
        step(opt)
        step(ref_opt)
    assert_same_params_and_states(params, opt, reference, ref_opt)


@pytest.mark.parametrize("foreach", [None, False])
def test_loading_a_state_dict_of_the_live_states_does_not_lift_the_block(foreach) -> None:
    """A ``state_dict()`` taken before the failed step and not copied holds the live states (as
    torch.optim's), which that step half-updated: loading it accepted them in silence, as if
    it were the state of before."""
    params, opt = build("lstm", foreach, groups=False)
    set_grads(params, seed=1)
    step(opt)
    live = opt.state_dict()
    set_grads(params, seed=2)
    step_failing_at_call(opt, 2)
    with pytest.raises(RuntimeError, match=r"^the state dict holds this optimizer's live states.*failed part-way.*deepcopy.*accept_partial_step\(\)$"):
        opt.load_state_dict(live)
    with pytest.raises(RuntimeError, match="failed part-way"):
        step(opt)
    opt.load_state_dict(copy.deepcopy(live) | {"state": {}})  # a state dict of other tensors loads (here: none)
    step(opt)


def test_a_copy_of_an_optimizer_whose_step_failed_part_way_raises_too() -> None:
    params, opt = build("lstm", None, groups=False)
    set_grads(params, seed=1)
    step_failing_at_call(opt, 2)
    with pytest.raises(RuntimeError, match="failed part-way"):
        step(copy.deepcopy(opt))


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_running_out_of_memory_for_a_later_groups_new_states_changes_nothing(kind, foreach) -> None:
    """The states of a group's new parameters (the flat buffers, the model's largest allocation)
    are made for every group before any is updated: running out of memory for the second
    group's leaves the first unstepped, so the step can be retried."""
    params, opt = build(kind, foreach, groups=True)
    reference, ref_opt = build(kind, foreach, groups=True)
    rule, real, calls = opt.rule, type(opt.rule).init_state, [0]

    def init_state(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:  # the first parameter of the second group
            raise Exhausted("simulated out of memory")
        return real(rule, *args, **kwargs)

    rule.init_state = init_state
    set_grads(params, seed=1)
    set_grads(reference, seed=1)
    with pytest.raises(Exhausted):
        step(opt)
    assert calls[0] == 3
    del rule.init_state
    step(opt)
    step(ref_opt)
    set_grads(params, seed=2)
    set_grads(reference, seed=2)
    step(opt)
    step(ref_opt)
    assert_same_params_and_states(params, opt, reference, ref_opt)


@pytest.mark.skipif(
    not __import__("learnedopt").kernels.FUSED_UPDATES_AVAILABLE or __import__("os").environ.get("TRITON_INTERPRET") != "1",
    reason="needs Triton, run in interpreter mode (tests/conftest.py sets TRITON_INTERPRET=1)",
)
@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_a_fused_step_whose_fallback_fails_after_the_kernel_updated_a_tensor_makes_the_next_step_raise(monkeypatch, kind) -> None:
    """The kernel updates the first tensor and fails; the PyTorch path that finishes the step runs
    out of memory: the first tensor has taken the step, so the next step raises."""
    from learnedopt.optim import learned_optimizer

    real = learned_optimizer.fused_update_

    def fused_update_(rule, params, grads, buffers, offsets, *, done, **kwargs):
        real(rule, params[:1], grads[:1], buffers, offsets[:1], done=done, **kwargs)
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(learned_optimizer, "fused_update_", fused_update_)
    params = make_params([(40,), (30,)], dtype=torch.float32)
    opt = OPTIMIZERS[kind](params, backend="triton")
    set_grads(params, seed=1)
    step_failing_at_call(opt, 1)
    with pytest.raises(RuntimeError, match="failed part-way"):
        step(opt)


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_a_step_failing_at_any_chunk_either_changed_nothing_or_makes_the_next_step_raise(kind, foreach) -> None:
    """Fail the rule's ``n``-th call of a step, for every ``n``: only a failure at the first
    (nothing written yet) leaves the optimizer to be stepped again, and then as if it had not failed."""
    params, opt = build(kind, foreach, groups=True)
    calls = failing_at_call(opt, 0)
    set_grads(params, seed=1)
    step(opt)
    total = calls[0]
    # the two groups' 140 coordinates share their rule calls, three chunks of 64 (the per-tensor
    # path: one call per tensor)
    assert total == (4 if foreach is False else 3)
    for n in range(1, total + 1):
        params, opt = build(kind, foreach, groups=True)
        reference, ref_opt = build(kind, foreach, groups=True)
        set_grads(params, seed=1)
        set_grads(reference, seed=1)
        step_failing_at_call(opt, n)
        if n > 1:
            with pytest.raises(RuntimeError, match="failed part-way"):
                step(opt)
            continue
        step(opt)
        step(ref_opt)
        assert_same_params_and_states(params, opt, reference, ref_opt)
