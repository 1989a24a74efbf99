"""state_dict / load_state_dict: a fresh optimizer continues bit-identically."""

import copy
import io
import json

import pytest
import torch
from helpers import OPTIMIZERS, assert_same_params_and_states, make_mixed_params, make_params, param_specs, set_grads, step
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
    assert sd["state"][1]["h"].shape == (2, 2, 3, 20)  # (layers, *param.shape, hidden), as Adam's have the param's
    assert opt.state[params[1]]["h"].shape == (2, 6, 20)  # the optimizer's own: flat coordinates
    assert sd["learned_rule"]["kind"] == "CoordinateLSTM" and len(sd["learned_rule"]["sha256"]) == 64
    # a state dict of earlier versions, with flat states, loads into the same states
    flat = copy.deepcopy(sd)
    flat["state"] = {i: {k: v.reshape(opt.state[params[i]][k].shape) for k, v in entry.items()} for i, entry in flat["state"].items()}
    for saved in (sd, flat):
        fresh = LSTMOptimizer(params)
        fresh.load_state_dict(copy.deepcopy(saved))
        assert all(torch.equal(fresh.state[p][k], opt.state[p][k]) for p in params for k in opt.state[p])


def test_loading_into_an_optimizer_with_other_weights_fails() -> None:
    params = make_params([(4,)], dtype=torch.float32)
    opt = LSTMOptimizer(params)
    set_grads(params, 0)
    opt.step()
    other_rule = CoordinateLSTM()
    other_rule.reset_parameters(torch.Generator().manual_seed(1))
    other = LSTMOptimizer(params, weights=other_rule)
    with pytest.raises(ValueError, match=r"other weights \(CoordinateLSTM, preset l2l-blend\) than this one's "
                                          r"\(CoordinateLSTM, sha256 [0-9a-f]{12}\.\.\.\)"):
        other.load_state_dict(opt.state_dict())
    # a preset's state is named by the preset: the message says which weights to build it with
    with pytest.raises(ValueError, match=r"\(CoordinateLSTM, preset l2l-mix\) than this one's \(CoordinateLSTM, preset l2l-blend\)"):
        LSTMOptimizer(params).load_state_dict(LSTMOptimizer(params, weights="l2l-mix").state_dict())
    wide = LSTMOptimizer(params, weights=CoordinateLSTM(hidden_size=8))
    sd = copy.deepcopy(opt.state_dict())
    del sd["learned_rule"]  # as from an earlier version, without the fingerprint: the shapes are checked
    del sd["param_groups"][0]["learned_rule"]
    with pytest.raises(ValueError, match="expected"):
        wide.load_state_dict(sd)


def test_the_param_groups_copy_of_the_fingerprint_is_checked_without_the_top_level_one() -> None:
    """``torch.distributed.checkpoint``'s helpers keep only ``state`` and ``param_groups``."""
    params = make_params([(4,)], dtype=torch.float32)
    opt = LSTMOptimizer(params)
    set_grads(params, 0)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    del sd["learned_rule"]
    other_rule = CoordinateLSTM()
    other_rule.reset_parameters(torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="saved by an optimizer with other weights"):
        LSTMOptimizer(params, weights=other_rule).load_state_dict(sd)
    LSTMOptimizer(params).load_state_dict(sd)


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


def _snapshot(opt) -> dict:
    return copy.deepcopy({"groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
                          "state": {i: dict(s) for i, s in enumerate(opt.state.values())}})


@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_a_rejected_load_leaves_the_optimizer_as_it_was(kind) -> None:
    params = make_params([(4,), (5,)], dtype=torch.float32)
    opt = OPTIMIZERS[kind](params, lr=0.5)
    for t in range(2):
        set_grads(params, t)
        step(opt)
    other_params = make_params([(4,), (6,)], dtype=torch.float32, seed=1)
    other = OPTIMIZERS[kind](other_params, lr=0.01)
    set_grads(other_params, 5)
    step(other)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match="saved state of parameter 1"):  # the second tensor's shape differs
        opt.load_state_dict(other.state_dict())
    after = _snapshot(opt)
    assert after["groups"] == before["groups"]
    assert before["state"].keys() == after["state"].keys()
    for i, state in before["state"].items():
        for name, value in state.items():
            assert torch.equal(after["state"][i][name], value), (i, name)
    bad_lr = copy.deepcopy(opt.state_dict())
    bad_lr["param_groups"][0]["lr"] = -1.0
    with pytest.raises(ValueError, match="Invalid lr"):
        opt.load_state_dict(bad_lr)
    assert opt.param_groups[0]["lr"] == 0.5


def test_load_state_dict_hooks_see_the_whole_state_as_in_torch_optim() -> None:
    params = make_params([(4,)], dtype=torch.float32)
    opt = LSTMOptimizer(params)
    set_grads(params, 0)
    opt.step()
    saved = opt.state_dict()
    fresh = LSTMOptimizer(params)
    seen = {}

    def pre_hook(optimizer, state_dict):
        seen["pre"] = sorted(state_dict["state"])
        state_dict = copy.deepcopy(state_dict)
        state_dict["state"][0]["step"] = torch.tensor(100.0)
        return state_dict

    def post_hook(optimizer):
        seen["post"] = [s["step"].item() for s in optimizer.state.values()]

    fresh.register_load_state_dict_pre_hook(pre_hook)
    fresh.register_load_state_dict_post_hook(post_hook)
    fresh.load_state_dict(saved)
    assert seen == {"pre": [0], "post": [100.0]}
    assert fresh.state[params[0]]["step"].item() == 100.0


@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_a_state_saved_under_triton_resumes_where_triton_is_missing(kind, monkeypatch) -> None:
    """``backend`` is where the step runs, not part of the state: a checkpoint written under
    ``backend="triton"`` on a GPU machine loads into a PyTorch-path optimizer on a machine without
    Triton (it used to raise "Triton is not installed" there, or, with Triton but no CUDA, switch
    the optimizer to the kernel and fail at its next step), and continues as that path does."""
    from learnedopt import kernels

    params = make_params([(4,), (3, 2)], dtype=torch.float32)
    opt = OPTIMIZERS[kind](params, backend="torch")
    train(opt, params, 2, first=0)
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:
        group["backend"] = "triton"  # as the GPU run wrote it
    resumed = [p.detach().clone().requires_grad_(True) for p in params]
    train(opt, params, 2, first=2)

    monkeypatch.setattr(kernels, "FUSED_UPDATES_AVAILABLE", False)  # a machine without Triton
    fresh = OPTIMIZERS[kind](resumed, backend="torch")
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["backend"] == "torch"
    assert fresh.param_groups[0]["lr"] == opt.param_groups[0]["lr"]  # the other options are the saved ones
    train(fresh, resumed, 2, first=2)
    for p, q in zip(params, resumed, strict=True):
        assert torch.equal(p, q)


def test_a_state_dict_from_before_a_group_option_existed_loads_with_its_default() -> None:
    """A checkpoint of an earlier version lacks group keys added since (``backend``,
    ``foreach``, ...): they take the loading optimizer's defaults."""
    params = make_params([(4,), (3,)], dtype=torch.float32)
    opt = LSTMOptimizer(params, lr=0.5)
    train(opt, params, 2, first=0)
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["backend"], group["foreach"]
    fresh = LSTMOptimizer([p.detach().clone().requires_grad_(True) for p in params], lr=1.0, backend="torch", foreach=False)
    fresh.load_state_dict(saved)
    group = fresh.param_groups[0]
    assert group["backend"] == "torch" and group["foreach"] is False and group["lr"] == 0.5


def test_loading_an_unnamed_state_dict_keeps_the_parameter_names() -> None:
    """An optimizer built from ``named_parameters()`` keeps its names when it loads a state dict
    saved without them, so its errors still name the parameter."""
    model = torch.nn.Linear(3, 2)
    unnamed = LSTMOptimizer(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    unnamed.step()
    named = LSTMOptimizer(model.named_parameters())
    named.load_state_dict(unnamed.state_dict())
    assert named.param_groups[0]["param_names"] == ["weight", "bias"]
    model.weight.grad = torch.full_like(model.weight, float("nan"))
    with pytest.raises(Exception, match="'weight'"):
        named.step()


def test_state_dict_writes_the_state_dtype_by_name() -> None:
    params = make_params([(4,)], dtype=torch.float32)
    opt = LSTMOptimizer(params, state_dtype=torch.bfloat16)
    set_grads(params, 0)
    opt.step()
    assert opt.state_dict()["param_groups"][0]["state_dtype"] == "bfloat16"
    assert opt.param_groups[0]["state_dtype"] is torch.bfloat16  # the optimizer's own group keeps the dtype


def test_a_state_for_a_parameter_no_group_lists_is_rejected() -> None:
    params = make_params([(4,), (3,)], dtype=torch.float32)
    opt = LSTMOptimizer(params)
    set_grads(params, 0)
    opt.step()
    sd = opt.state_dict()
    sd["state"][7] = sd["state"][0]
    fresh = LSTMOptimizer(params)
    with pytest.raises(ValueError, match="state for parameter index 7, which no parameter group lists"):
        fresh.load_state_dict(sd)
    assert not fresh.state


def test_load_state_dict_does_not_modify_the_given_dict() -> None:
    params = make_params([(4,), (3,)], dtype=torch.float32)
    opt = LSTMOptimizer(params, state_dtype=torch.bfloat16)
    set_grads(params, 0)
    opt.step()
    sd = opt.state_dict()
    del sd["param_groups"][0]["foreach"]  # as from a version before the option: filled in on load
    saved = copy.deepcopy(sd)
    fresh = LSTMOptimizer(params)
    fresh.load_state_dict(sd)
    group, saved_group = sd["param_groups"][0], saved["param_groups"][0]
    assert group["state_dtype"] == "bfloat16" and "foreach" not in group
    assert all(type(i) is int for i in group["params"]) and group["params"] == [0, 1]
    assert set(group) == set(saved_group) and group == saved_group
    assert fresh.param_groups[0]["state_dtype"] is torch.bfloat16


def test_state_dict_post_hooks_see_and_may_replace_the_finished_dict_as_in_torch_optim() -> None:
    """A post-hook sees the dict state_dict() returns without hooks (parameter-shaped states,
    the rule's fingerprint, the dtype by name), and what it returns is the result."""
    params = make_params([(2, 3)], dtype=torch.float32)
    opt = LSTMOptimizer(params)
    set_grads(params, 0)
    opt.step()
    plain = opt.state_dict()
    seen = {}

    def rekey(optimizer, state_dict):
        seen["h"] = tuple(state_dict["state"][0]["h"].shape)
        seen["rule"] = state_dict.get("learned_rule")
        seen["dtype"] = state_dict["param_groups"][0]["state_dtype"]
        return {**state_dict, "state": {"weight": state_dict["state"][0]}}

    opt.register_state_dict_post_hook(rekey)
    hooked = opt.state_dict()
    assert seen == {"h": tuple(plain["state"][0]["h"].shape), "rule": plain["learned_rule"], "dtype": "float32"}
    assert seen["h"] == (2, 2, 3, 20)
    assert list(hooked["state"]) == ["weight"]
    assert torch.equal(hooked["state"]["weight"]["h"], plain["state"][0]["h"])


@pytest.mark.parametrize("saved_step", [3, 3.0, torch.tensor(3), torch.tensor(3.0, dtype=torch.float64)])
def test_a_saved_step_of_another_type_loads_as_the_float32_count(saved_step) -> None:
    """As torch.optim converts a number; the next step then counts on from it (it used to fail
    after the parameters had changed)."""
    params = make_params([(4,)], dtype=torch.float32)
    opt = LSTMOptimizer(params)
    set_grads(params, 0)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][0]["step"] = saved_step
    fresh = LSTMOptimizer(params)
    fresh.load_state_dict(saved)
    loaded = fresh.state[params[0]]["step"]
    assert loaded.dtype == torch.float32 and loaded.item() == 3.0
    fresh.step()
    assert fresh.state[params[0]]["step"].item() == 4.0


@pytest.mark.parametrize(("name", "value", "match"), [
    ("step", "3", "saved 'step' of parameter 0 must be a non-negative number"),
    ("step", -1.0, "saved 'step' of parameter 0"),
    ("step", torch.tensor([1.0, 2.0]), "saved 'step' of parameter 0"),
    ("step", True, "saved 'step' of parameter 0"),
    ("step", float("nan"), "saved 'step' of parameter 0"),
    ("h", [[0.0]], r"saved state \['h'\] of parameter 0 must be tensors"),
    # cast in silence (a complex one with torch's warning only) to the state dtype at the next step
    ("h", torch.ones(2, 4, 20, dtype=torch.int64), r"saved state \['h'\] of parameter 0 must be floating-point tensors, got int64"),
    ("c", torch.ones(2, 4, 20, dtype=torch.complex64), r"saved state \['c'\] of parameter 0 must be floating-point tensors, got complex64"),
    ("m", torch.ones(3, 4, dtype=torch.bool), r"saved state \['m'\] of parameter 0 must be floating-point tensors, got bool"),
    # an optimizer of a model on the meta device saved it: torch's NotImplementedError named no state
    ("h", torch.ones(2, 4, 20, device="meta"), r"^saved state \['h'\] of parameter 0 is on the meta device, which holds no values"),
    # a state dict read with torch.load(map_location="meta"): the count failed in torch's .item()
    ("step", torch.tensor(3.0, device="meta"), r"^saved 'step' of parameter 0 is on the meta device, which holds no value"),
])  # fmt: skip
def test_a_malformed_saved_state_is_rejected_before_anything_changes(name, value, match) -> None:
    params = make_params([(4,)], dtype=torch.float32)
    opt = LSTMOptimizer(params)
    set_grads(params, 0)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][0][name] = value
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(saved)
    after = _snapshot(opt)
    for n, v in before["state"][0].items():
        assert torch.equal(after["state"][0][n], v), n


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(("missing", "message"), [("c", "saved state of parameter 0 has"),
                                                  ("step", "saved state of parameter 0 lacks 'step'")])  # fmt: skip
def test_a_saved_state_missing_one_of_its_entries_is_rejected(foreach, missing, message) -> None:
    """It would otherwise load. A missing rule state (``c``): the batched path would silently
    restart every state of that parameter, the per-tensor one fail with a KeyError. A missing
    ``step``: the batched path continued from the loaded states while the per-tensor one
    silently restarted them (a state without ``step`` is a new one there)."""
    params = make_params([(4,)], dtype=torch.float32)
    opt = LSTMOptimizer(params, foreach=foreach)
    set_grads(params, 0)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    del saved["state"][0][missing]
    with pytest.raises(ValueError, match=message):
        LSTMOptimizer(params, foreach=foreach).load_state_dict(saved)


@pytest.mark.parametrize("foreach", [False, True])
def test_reading_the_state_of_a_parameter_without_one_keeps_it_stateless_and_loadable(foreach) -> None:
    """``optimizer.state`` is a defaultdict, as in torch.optim: reading a frozen parameter's entry
    (as code that moves states between devices does) leaves ``{}`` there. The state dict holding it
    loads (it was rejected: "has {}, expected ..."), and the batched path gives that parameter no
    LSTM states (it allocated them, as if it had stepped)."""
    trained, frozen = make_params([(3, 2), (4,)], dtype=torch.float32)
    opt = LSTMOptimizer([trained, frozen], foreach=foreach)
    set_grads([trained], seed=0)
    opt.step()
    assert opt.state[frozen] == {}
    set_grads([trained], seed=1)
    opt.step()
    assert opt.state[frozen] == {}
    fresh = LSTMOptimizer([trained, frozen], foreach=foreach)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.state[frozen] == {} and torch.equal(fresh.state[trained]["h"], opt.state[trained]["h"])


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["lstm", "meta"]),
    specs=param_specs(4),
    how=st.sampled_from(["torch.save", "deepcopy"]),
    foreach=st.sampled_from([None, False]),
    state_dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    data=st.data(),
)
def test_property_resume_at_any_step_is_bit_identical(kind, specs, how, foreach, state_dtype, data) -> None:
    """Saved after any step (the first included) through ``torch.save`` or a deep copy of the
    optimizer, of any parameter layout and dtype, some gradients None: the resumed run ends
    equal to the uninterrupted one, parameters and states."""
    n, steps = len(specs), 4
    saved_at = data.draw(st.integers(0, steps))
    split = data.draw(st.integers(0, n))
    skips = data.draw(st.lists(st.sets(st.integers(0, n - 1)), min_size=steps, max_size=steps))
    groups = lambda ps: [g for g in ({"params": ps[:split]}, {"params": ps[split:], "lr": 0.5}) if g["params"]]
    params = make_mixed_params(specs)
    opt = OPTIMIZERS[kind](groups(params), foreach=foreach, state_dtype=state_dtype)
    opt.chunk = 5
    for t in range(steps):
        if t == saved_at:
            break
        set_grads(params, seed=t, skip=skips[t])
        step(opt, 0.5 + t)
    if how == "deepcopy":
        resumed_opt = copy.deepcopy(opt)
        resumed = [p for group in resumed_opt.param_groups for p in group["params"]]
    else:
        buffer = io.BytesIO()
        torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buffer)
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)
        resumed = [p.requires_grad_(True) for p in saved["params"]]
        resumed_opt = OPTIMIZERS[kind](groups(resumed))
        resumed_opt.chunk = 5
        resumed_opt.load_state_dict(saved["opt"])
    for t in range(saved_at, steps):
        for ps, o in ((params, opt), (resumed, resumed_opt)):
            set_grads(ps, seed=t, skip=skips[t])
            step(o, 0.5 + t)
    for p, q in zip(params, resumed, strict=True):
        assert torch.equal(p, q)
        assert opt.state[p].keys() == resumed_opt.state[q].keys()
        assert all(torch.equal(value, resumed_opt.state[q][name]) for name, value in opt.state[p].items())


def test_the_param_groups_copy_of_the_fingerprint_names_the_weights_at_save_time() -> None:
    """A distributed checkpoint keeps only the groups' copy of the fingerprint, so it must name
    the weights as they are when ``state_dict()`` runs (a caller may change them in place), not
    those the optimizer was built with."""
    rule = CoordinateLSTM()
    params = make_params([(4,)], dtype=torch.float32)
    opt = LSTMOptimizer(params, rule)
    set_grads(params, 0)
    opt.step()
    with torch.no_grad():
        next(rule.parameters()).add_(0.5)
    sd = copy.deepcopy(opt.state_dict())
    assert json.loads(sd["param_groups"][0]["learned_rule"]) == sd["learned_rule"]
    del sd["learned_rule"]
    LSTMOptimizer(params, copy.deepcopy(rule)).load_state_dict(sd)


@pytest.mark.parametrize("foreach", [False, True])
def test_load_does_not_alias_the_given_state_on_either_path(foreach) -> None:
    """The per-tensor path updates the loaded state tensors in place: they must be copies."""
    params = make_params([(4,), (2, 3)], dtype=torch.float32)
    opt = LSTMOptimizer(params, foreach=foreach)
    set_grads(params, 0)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    snapshot = copy.deepcopy(sd["state"])
    fresh = LSTMOptimizer(params, foreach=foreach)
    fresh.load_state_dict(sd)
    set_grads(params, 1)
    fresh.step()
    assert all(torch.equal(value, snapshot[i][name]) for i, state in sd["state"].items() for name, value in state.items())


def test_a_saved_state_of_a_parameter_of_another_shape_and_the_same_size_is_rejected() -> None:
    """A (3, 2) parameter's states do not fit a (2, 3) parameter, though they hold as many values."""
    (a,) = make_params([(3, 2)], dtype=torch.float32)
    opt = LSTMOptimizer([a])
    set_grads([a], 0)
    opt.step()
    b = a.detach().t().contiguous().requires_grad_(True)
    with pytest.raises(ValueError, match=r"saved state of parameter 0 has .* expected .* for a \(2, 3\) parameter"):
        LSTMOptimizer([b]).load_state_dict(opt.state_dict())


def test_a_state_dict_with_other_group_or_parameter_counts_is_rejected_by_name() -> None:
    params = make_params([(4,), (3,)], dtype=torch.float32)
    saved = LSTMOptimizer([{"params": params[:1]}, {"params": params[1:]}]).state_dict()
    with pytest.raises(ValueError, match="loaded state dict has 2 parameter groups, this optimizer 1"):
        LSTMOptimizer(params).load_state_dict(saved)
    saved = LSTMOptimizer(params).state_dict()
    with pytest.raises(ValueError, match="parameter group 0 has 2 parameters, this optimizer's 1"):
        LSTMOptimizer(params[:1]).load_state_dict(saved)


def test_a_load_state_dict_pre_hook_editing_in_place_leaves_the_callers_dict_as_in_torch_optim() -> None:
    """``torch.optim`` hands pre-hooks a shallow copy: a hook that replaces a top-level entry
    in place changes what is loaded, not the caller's dict."""
    params = make_params([(4,)], dtype=torch.float32)
    opt = LSTMOptimizer(params)
    set_grads(params, 0)
    opt.step()
    saved = opt.state_dict()
    groups = saved["param_groups"]

    def pre_hook(optimizer, state_dict):
        state_dict["param_groups"] = [{**group, "lr": 0.25} for group in state_dict["param_groups"]]

    fresh = LSTMOptimizer(params)
    fresh.register_load_state_dict_pre_hook(pre_hook)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["lr"] == 0.25
    assert saved["param_groups"] is groups and groups[0]["lr"] == 1.0


@pytest.mark.parametrize("weights", ["l2l-2016", "meta-lstm-adam", "meta-lstm-2017", None])
def test_a_state_saved_under_a_float64_default_dtype_loads_under_float32_and_steps_alike(weights) -> None:
    """``torch.set_default_dtype(torch.float64)`` does not change a preset's weights: an
    untrained preset drew other initial weights under it, so its steps differed and its state
    was refused by a process with the float32 default as "saved under other weights"."""
    kind = "meta" if weights is not None and weights.startswith("meta") else "lstm"
    runs = []
    for default in (torch.float64, torch.float32):
        params = make_params([(6, 5), (7,)], dtype=torch.float32)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(default)
        try:
            opt = OPTIMIZERS[kind](params, weights=weights)
        finally:
            torch.set_default_dtype(previous)
        assert all(w.dtype == torch.float32 for w in opt.rule.parameters())
        train(opt, params, 3, first=0)
        runs.append((params, opt))
    (params, opt), (other_params, other) = runs
    assert_same_params_and_states(params, opt, other_params, other)
    fresh = OPTIMIZERS[kind](other_params, weights=weights)
    fresh.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_state_dict_of_a_resized_parameter_is_a_clear_error(kind) -> None:
    """``p.data = bigger`` after a step: ``state_dict()`` raised torch's ``view`` error ("shape
    '[2, 5, 20]' is invalid for input of size 80") where ``step()`` names the cause."""
    p, q = make_params([(4,), (3,)], dtype=torch.float32)
    opt = OPTIMIZERS[kind]([p, q])
    set_grads([p, q], 0)
    step(opt)
    p.data = torch.randn(5)
    with pytest.raises(ValueError, match=r"but its 5 element\(s\) need .*changed size since its state was created"):
        opt.state_dict()
    del opt.state[p]  # what the message advises
    assert set(opt.state_dict()["state"]) == {1}


def _without_fingerprints(saved: dict) -> dict:
    """``saved`` as a distributed checkpoint of an earlier version holds it: no ``"learned_rule"``,
    neither at the top nor in the param groups."""
    saved = copy.deepcopy(saved)
    saved.pop("learned_rule")
    for group in saved["param_groups"]:
        group.pop("learned_rule")
    return saved


@pytest.mark.parametrize("extra", ["architecture", "exp_avg"])
def test_a_saved_state_holding_states_this_rule_has_not_is_rejected(extra) -> None:
    """Without a fingerprint to tell, the states of another architecture whose LSTM states have
    this one's shapes (the default l2l-blend's ``h``, ``c``, ``m``, ``v`` into the paper's
    l2l-2016, which keeps only ``h`` and ``c``) loaded in silence, the others kept as unused
    entries; so did an entry no learned rule writes (Adam's ``exp_avg``)."""
    params = make_params([(4,)], dtype=torch.float32)
    opt = LSTMOptimizer(params)
    set_grads(params, 0)
    opt.step()
    saved = _without_fingerprints(opt.state_dict())
    if extra == "architecture":
        into, names = LSTMOptimizer(params, "l2l-2016"), r"\['m', 'v'\]"
    else:
        saved["state"][0]["exp_avg"] = torch.zeros(4)
        into, names = LSTMOptimizer(params), r"\['exp_avg'\]"
    with pytest.raises(ValueError, match=rf"^saved state of parameter 0 holds {names}, which this CoordinateLSTM rule does not"):
        into.load_state_dict(saved)
    assert not into.state


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_a_loaded_step_count_stays_on_the_cpu_as_adams_so_a_meta_run_saves_and_loads_again(kind, foreach) -> None:
    """``load_state_dict`` moved every saved tensor, the step count too, to its parameter's
    device, where a fresh state and ``torch.optim.Adam`` keep the count on the CPU: for a
    ``meta`` parameter (a shape-only run) the count lost its value, so the next ``state_dict()``
    held a count without value and loading that raised 'Tensor.item() cannot be called on meta
    tensors'."""
    params = [torch.nn.Parameter(torch.randn(3, device="meta")), torch.nn.Parameter(torch.randn(2))]
    opt = OPTIMIZERS[kind](params, foreach=foreach)
    for t in range(3):
        for p in params:
            p.grad = torch.ones_like(p)
        step(opt)
        opt.load_state_dict(opt.state_dict())
        for p in params:
            assert opt.state[p]["step"].device.type == "cpu" and int(opt.state[p]["step"]) == t + 1
    assert opt.state[params[0]]["h"].is_meta


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("kind", ["lstm", "meta"])
@pytest.mark.parametrize(("value", "what"), [(float("nan"), "NaN"), (float("inf"), "Inf"), (float("-inf"), "Inf")])
def test_a_saved_state_holding_nan_or_inf_is_rejected_and_changes_nothing(kind, foreach, value, what) -> None:
    """A rule state holding NaN (or Inf: no state of the library's rules can hold one, see
    ``StateSpec.finite``) loaded in silence, and the next step turned its parameter NaN. Each
    state of the rule, in any parameter of any group, is refused by name; the refused optimizer
    steps as one never offered the dict, and a finite dict still resumes bit for bit."""
    groups = lambda ps: [{"params": ps[:1]}, {"params": ps[1:], "lr": 0.5}]
    params = make_params([(4,), (3, 2), (5,)], dtype=torch.float32)
    opt = OPTIMIZERS[kind](groups(params), foreach=foreach)
    train(opt, params, 3, first=0)
    saved = copy.deepcopy(opt.state_dict())
    then = copy.deepcopy((params, opt))  # params and optimizer at the save, to resume against
    train(opt, params, 2, first=3)  # opt's states now differ from the saved ones
    untouched = copy.deepcopy((params, opt))  # never offered a bad dict
    names = sorted(set(saved["state"][2]) - {"step"})
    assert len(names) >= 4  # h, c, m, v (and MetaLSTMCell's fi)
    for index, where in ((0, r"param_groups\[0\]\['params'\]\[0\], shape \(4,\)"),
                         (2, r"param_groups\[1\]\['params'\]\[1\], shape \(5,\)")):  # fmt: skip
        for name in names:
            bad = copy.deepcopy(saved)
            state = bad["state"][index][name]  # a view of the flat buffer on the batched path
            state[tuple(size - 1 for size in state.shape)] = value
            match = rf"^saved state \['{name}'\] of parameter {index} \({where}\) holds {what}"
            with pytest.raises(ValueError, match=match):
                opt.load_state_dict(bad)
    train(opt, params, 2, first=5)
    train(untouched[1], untouched[0], 2, first=5)
    assert_same_params_and_states(params, opt, *untouched)
    # the finite dict loads into the optimizer that refused the others, and resumes bit for bit
    with torch.no_grad():
        for p, q in zip(params, then[0], strict=True):
            p.copy_(q)
    opt.load_state_dict(saved)
    train(opt, params, 3, first=3)
    train(then[1], then[0], 3, first=3)
    assert_same_params_and_states(params, opt, *then)


@pytest.mark.parametrize("foreach", [False, True])
def test_a_finite_saved_state_whose_norm_overflows_its_dtype_loads(foreach) -> None:
    """The NaN/Inf check of a loaded state reads a 2-norm, which overflows float16 for finite
    values (60000 squared): such a state is looked at again, exactly, and loads; with one NaN,
    or Inf, among those values it is refused."""
    params = make_params([(4,), (50,)], dtype=torch.float32)
    opt = LSTMOptimizer(params, state_dtype=torch.float16, foreach=foreach)
    set_grads(params, 0)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    saved["state"][1]["c"].fill_(60000.0)
    assert saved["state"][1]["c"].dtype == torch.float16 and not torch.isfinite(torch._foreach_norm([saved["state"][1]["c"]])[0])
    fresh = LSTMOptimizer(params, state_dtype=torch.float16, foreach=foreach)
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.state_dict()["state"][1]["c"], saved["state"][1]["c"])
    for value, what in ((float("nan"), "NaN"), (float("inf"), "Inf")):
        bad = copy.deepcopy(saved)
        bad["state"][1]["c"][1, 3, 7] = value
        with pytest.raises(ValueError, match=rf"^saved state \['c'\] of parameter 1 \(param_groups\[0\]\['params'\]\[1\], shape \(50,\)\) holds {what}"):
            LSTMOptimizer(params, state_dtype=torch.float16, foreach=foreach).load_state_dict(bad)


@pytest.mark.parametrize("kind", ["lstm", "meta"])
@pytest.mark.parametrize(("value", "what"), [(float("nan"), "NaN"), (float("inf"), "Inf")])
@pytest.mark.parametrize("options", [{}, {"foreach": False}, {"foreach": False, "backend": "torch"}], ids=["batched", "per-tensor", "per-tensor-torch"])
def test_a_state_holding_nan_or_inf_put_in_optimizer_state_directly_is_refused_by_the_next_step(kind, value, what, options) -> None:
    """States that reach ``optimizer.state[p]`` without ``load_state_dict`` (a wrapper that loads
    them itself, as ``ZeroRedundancyOptimizer`` does, or an assignment) skipped its NaN/Inf check,
    and the next step turned the parameter NaN in silence. The step that builds its flat buffers
    from them refuses them as ``load_state_dict`` does, changing nothing; finite ones step as if
    loaded. The per-tensor path (``foreach=False``), which keeps no buffers, stepped them in silence:
    it refuses them alike."""
    groups = lambda ps: [{"params": ps[:1], **options}, {"params": ps[1:], "lr": 0.5, **options}]
    params = make_params([(4,), (3, 2), (5,)], dtype=torch.float32)
    opt = OPTIMIZERS[kind](groups(params))
    train(opt, params, 2, first=0)
    saved = copy.deepcopy(opt.state_dict())
    then = [p.detach().clone() for p in params]
    loaded = OPTIMIZERS[kind](groups(params))
    loaded.load_state_dict(saved)
    direct = OPTIMIZERS[kind](groups(params))
    for index, p in enumerate(params):  # a whole state dict replaced
        direct.state[p] = copy.deepcopy(saved["state"][index])
    train(loaded, params, 1, first=2)
    expected = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, q in zip(params, then, strict=True):
            p.copy_(q)
    train(direct, params, 1, first=2)
    assert all(torch.equal(p, q) for p, q in zip(params, expected, strict=True))
    with torch.no_grad():
        for p, q in zip(params, then, strict=True):
            p.copy_(q)
    bad = copy.deepcopy(saved["state"][2])
    bad["h"][(-1,) * bad["h"].dim()] = value
    refused = OPTIMIZERS[kind](groups(params))
    for index, p in enumerate(params):
        refused.state[p] = copy.deepcopy(bad if index == 2 else saved["state"][index])
    set_grads(params, 2)
    with pytest.raises(ValueError, match=rf"^state \['h'\] of parameter 2 \(param_groups\[1\]\['params'\]\[1\], shape \(5,\)\) holds {what}"):
        step(refused, 2)
    assert all(torch.equal(p, q) for p, q in zip(params, then, strict=True))
    # one state tensor replaced in an optimizer's own states, between two steps
    train(opt, params, 1, first=2)
    opt.state[params[0]]["c"] = torch.full_like(opt.state[params[0]]["c"], value)
    with pytest.raises(ValueError, match=rf"^state \['c'\] of parameter 0 \(param_groups\[0\]\['params'\]\[0\], shape \(4,\)\) holds {what}"):
        train(opt, params, 1, first=3)


@pytest.mark.parametrize("foreach", [None, False])
def test_the_step_checks_states_for_nan_only_where_they_were_replaced(monkeypatch, foreach) -> None:
    """The check of states put in ``optimizer.state`` runs where the step rebuilds its flat
    buffers from them (on the per-tensor path: where they are not the states it stepped), not at
    every step: a step whose states are its own reads one NaN/Inf verdict list, its gradients'."""
    from learnedopt import finite

    params = make_params([(4,), (3, 2)], dtype=torch.float32)
    opt = LSTMOptimizer(params, foreach=foreach)
    train(opt, params, 2, first=0)
    calls = []
    real = finite.non_finite
    monkeypatch.setattr(finite, "non_finite", lambda tensors: calls.append(len(tensors)) or real(tensors))
    train(opt, params, 2, first=2)
    assert calls == [2, 2]  # the two gradients, at each step
    calls.clear()
    opt.state[params[1]] = {k: v.clone() for k, v in opt.state[params[1]].items()}
    train(opt, params, 2, first=4)
    assert calls[0] == 2 and calls[1] == len(opt.rule.state_spec()) and calls[2:] == [2], calls
    calls.clear()
    opt.state[params[0]]["h"] = opt.state[params[0]]["h"].clone()  # one state tensor replaced
    train(opt, params, 2, first=6)
    assert calls[0] == 2 and calls[1] == len(opt.rule.state_spec()) and calls[2:] == [2], calls


@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_a_state_dict_with_numpy_options_loads_with_weights_only(kind) -> None:
    """An LR schedule written with NumPy (``LambdaLR`` with ``np.cos``) leaves a NumPy scalar as
    each group's ``lr`` (``base_lr * np.float64``), as may an ``lr`` or ``weight_decay`` given as
    one: ``torch.save(optimizer.state_dict())`` wrote them pickled as NumPy objects, which
    ``torch.load``'s default ``weights_only=True`` refused. They are saved as Python numbers."""
    np = pytest.importorskip("numpy")
    params = make_params([(4, 3), (5,)], dtype=torch.float32)
    opt = OPTIMIZERS[kind]([{"params": params[:1], "weight_decay": np.float32(0.01)}, {"params": params[1:]}], lr=np.float64(0.5))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + np.cos(np.pi * t / 10)))
    train(opt, params, 3, first=0)
    schedule.step()
    assert isinstance(opt.param_groups[0]["lr"], np.generic)  # what the schedule left
    buffer = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buffer)
    train(opt, params, 3, first=3)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = [p.clone().requires_grad_(True) for p in saved["params"]]
    other = OPTIMIZERS[kind]([{"params": resumed[:1]}, {"params": resumed[1:]}])
    other.load_state_dict(saved["opt"])
    assert [g["lr"] for g in other.param_groups] == [g["lr"] for g in opt.param_groups]
    assert other.param_groups[0]["weight_decay"] == opt.param_groups[0]["weight_decay"]
    train(other, resumed, 3, first=3)
    assert_same_params_and_states(params, opt, resumed, other)
