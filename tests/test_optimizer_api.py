"""The torch.optim protocol: groups, closures, schedulers, dtypes, skipping, maximize."""

import contextlib
import json
import pickle
import re
import warnings

import numpy as np
import pytest
import torch
from helpers import OPTIMIZERS, assert_same_params_and_states, make_params, needs_triton, set_grads, step, step_alike

from learnedopt import LSTMOptimizer, MetaLSTMOptimizer, UntrainedWeightsWarning


def test_is_a_torch_optimizer_with_defaults() -> None:
    model = torch.nn.Linear(3, 2)
    opt = LSTMOptimizer(model.parameters())
    assert isinstance(opt, torch.optim.Optimizer)
    group = opt.param_groups[0]
    assert group["lr"] == 1.0 and group["maximize"] is False and group["state_dtype"] == torch.float32
    assert group["nan_policy"] == "raise" and group["backend"] == "auto"


@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_per_group_options_and_add_param_group(kind) -> None:
    a, b, c = make_params([(4,), (3,), (5,)], dtype=torch.float32)
    opt = OPTIMIZERS[kind]([{"params": [a]}, {"params": [b], "lr": 0.0}])
    opt.add_param_group({"params": [c], "state_dtype": torch.bfloat16, "maximize": True})
    assert len(opt.param_groups) == 3
    before = b.detach().clone()
    set_grads([a, b, c], seed=1)
    step(opt)
    assert torch.equal(b, before), "lr=0 must leave the parameter unchanged"
    assert opt.state[b]["h"].abs().sum() > 0, "states still advance at lr=0"
    assert opt.state[c]["h"].dtype == torch.bfloat16 and opt.state[a]["h"].dtype == torch.float32


def test_closure_is_called_with_grad_enabled_and_loss_returned() -> None:
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    for opt in (LSTMOptimizer(model.parameters()), MetaLSTMOptimizer(model.parameters())):
        def closure():
            assert torch.is_grad_enabled()
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss
        loss = opt.step(closure)
        assert isinstance(loss, torch.Tensor) and loss.ndim == 0


def test_given_a_closure_and_a_loss_the_rule_reads_the_loss_and_step_returns_the_closures() -> None:
    def run(use_closure: bool):
        params = make_params([(5,)])
        opt = MetaLSTMOptimizer(params)
        set_grads(params, seed=0)
        returned = opt.step((lambda: torch.tensor(7.0)) if use_closure else None, loss=torch.tensor(0.25))
        return params[0].detach(), returned

    with_closure, returned = run(True)
    loss_only, _ = run(False)
    assert torch.equal(with_closure, loss_only) and float(returned) == 7.0


@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_step_hooks_run_around_the_step_and_a_pre_hook_may_change_the_gradients(kind) -> None:
    """torch.optim's step hooks: a pre-hook that clips the gradients (as a training library's
    does) steps as clipping by hand does, bit for bit; the post-hook runs after, once a step."""

    def run(hooked: bool):
        params = make_params([(3, 4), (5,)])
        opt = OPTIMIZERS[kind](params)
        seen = []
        if hooked:
            def clip(o, args, kwargs) -> None:
                torch.nn.utils.clip_grad_norm_(params, 0.1)

            opt.register_step_pre_hook(clip)
            opt.register_step_post_hook(lambda o, args, kwargs: seen.append(int(o.state[params[0]]["step"])))
        for t in range(3):
            set_grads(params, seed=t)
            if not hooked:
                torch.nn.utils.clip_grad_norm_(params, 0.1)
            step(opt)
        return params, opt, seen

    hooked, hooked_opt, seen = run(True)
    by_hand, by_hand_opt, _ = run(False)
    assert_same_params_and_states(hooked, hooked_opt, by_hand, by_hand_opt)
    assert seen == [1, 2, 3]


@pytest.mark.parametrize("how", ["training step", "optimizer.step"])
@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_under_torch_compile_the_step_is_a_graph_break_equal_to_eager(kind, how) -> None:
    """torch.compile of a training step calling step(closure), or of optimizer.step itself (as
    torch.optim documents), steps bit for bit as eagerly: MetaLSTMOptimizer's step raised Dynamo's
    InternalTorchDynamoError ("name 'device' is not defined") when traced."""
    torch.compiler.reset()  # else frames Dynamo gave up on in an earlier test are not traced again
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    runs = []
    for compiled in (False, True):
        model = torch.nn.Linear(3, 1)
        model.load_state_dict({"weight": torch.ones(1, 3), "bias": torch.zeros(1)})
        opt = OPTIMIZERS[kind](model.parameters())

        def closure(model=model, opt=opt):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        step = torch.compile(opt.step, backend="eager") if compiled and how == "optimizer.step" else opt.step

        def train_step(step=step, closure=closure):
            return step(closure)

        if compiled and how == "training step":
            train_step = torch.compile(train_step, backend="eager")
        losses = [train_step() for _ in range(3)]
        runs.append((model, opt, losses))
    (model, opt, losses), (other_model, other, other_losses) = runs
    assert torch.equal(torch.stack(losses), torch.stack(other_losses))
    assert_same_params_and_states(list(model.parameters()), opt, list(other_model.parameters()), other)


@pytest.mark.parametrize("kind", ["lstm", "meta"])
@pytest.mark.parametrize("foreach", [False, True])
def test_params_without_grad_are_skipped(kind, foreach) -> None:
    params = make_params([(4,), (6,)], dtype=torch.float32)
    opt = OPTIMIZERS[kind](params, foreach=foreach)
    set_grads(params, seed=0, skip={1})
    before = params[1].detach().clone()
    step(opt)
    assert torch.equal(params[1], before)
    assert params[1] not in opt.state or "h" not in opt.state[params[1]] or opt.state[params[1]]["step"] == 0


@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_zero_grad(kind) -> None:
    params = make_params([(3,)], dtype=torch.float32)
    opt = OPTIMIZERS[kind](params)
    set_grads(params, seed=0)
    opt.zero_grad()
    assert params[0].grad is None


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_a_zero_gradient_is_a_step_and_a_none_gradient_is_none(kind, foreach) -> None:
    """As in torch.optim: ``zero_grad(set_to_none=False)`` leaves zero gradients, which step (the
    states advance and the learned step of a zero gradient moves the parameter); ``None`` skips."""
    params = make_params([(4,), (2, 3)], dtype=torch.float32)
    opt = OPTIMIZERS[kind](params, foreach=foreach)
    set_grads(params, seed=0)
    step(opt)
    opt.zero_grad(set_to_none=False)
    before = [(p.detach().clone(), opt.state[p]["h"].clone()) for p in params]
    step(opt)
    for p, (value, h) in zip(params, before, strict=True):
        assert int(opt.state[p]["step"]) == 2
        assert not torch.equal(opt.state[p]["h"], h) and not torch.equal(p, value)
    opt.zero_grad()
    before = [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in params]
    step(opt)
    for p, (value, state) in zip(params, before, strict=True):
        assert torch.equal(p, value) and all(torch.equal(opt.state[p][k], v) for k, v in state.items())


@pytest.mark.parametrize("kind", ["lstm", "meta"])
@pytest.mark.parametrize("foreach", [False, True])
def test_maximize_equals_minimizing_the_negation(kind, foreach) -> None:
    results = []
    for maximize in (False, True):
        params = make_params([(5,), (2, 3)])
        opt = OPTIMIZERS[kind](params, maximize=maximize, foreach=foreach, state_dtype=torch.float64)
        for t in range(3):
            set_grads(params, seed=t, scale=-1.0 if maximize else 1.0)
            if kind == "meta":
                opt.step(loss=-(1.0 + t) if maximize else 1.0 + t)
            else:
                opt.step()
        results.append(params)
    for p, q in zip(*results):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_lr_scales_the_step_and_schedulers_work(kind) -> None:
    deltas = []
    for lr in (1.0, 0.25):
        params = make_params([(50,)])
        start = params[0].detach().clone()
        opt = OPTIMIZERS[kind](params, lr=lr, state_dtype=torch.float64)
        set_grads(params, seed=3)
        step(opt)
        deltas.append(params[0].detach() - start)
    torch.testing.assert_close(deltas[1], 0.25 * deltas[0], rtol=1e-12, atol=1e-15)

    params = make_params([(4,)], dtype=torch.float32)
    opt = OPTIMIZERS[kind](params)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, t / 3))
    assert opt.param_groups[0]["lr"] == 0.0
    before = params[0].detach().clone()
    set_grads(params, seed=0)
    step(opt)
    warmup.step()
    assert torch.equal(params[0], before), "warm-up from lr=0 leaves parameters unchanged"
    assert opt.param_groups[0]["lr"] == pytest.approx(1 / 3)
    set_grads(params, seed=1)
    step(opt)
    assert not torch.equal(params[0], before)


@pytest.mark.parametrize("kind", ["lstm", "meta"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_parameter_and_state_dtypes(kind, dtype, state_dtype) -> None:
    params = make_params([(7,), (3, 2)], dtype=dtype)
    reference = [p.detach().double().requires_grad_(True) for p in params]
    opt = OPTIMIZERS[kind](params, state_dtype=state_dtype)
    ref = OPTIMIZERS[kind](reference, state_dtype=torch.float64)
    for t in range(3):
        set_grads(params, seed=t)
        for p, q in zip(params, reference):
            q.grad = p.grad.double()
        step(opt)
        step(ref)
    for p, q in zip(params, reference):
        assert p.dtype == dtype and torch.isfinite(p).all()
        assert opt.state[p]["h"].dtype == state_dtype
        # low-precision parameters and states round each step; the update is ~1e-2 per step
        tol = {torch.float32: 1e-5, torch.float64: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}[dtype]
        if state_dtype == torch.bfloat16:
            tol = max(tol, 1e-3)
        torch.testing.assert_close(p.double(), q.detach(), rtol=tol, atol=tol)


def test_named_parameters_are_accepted() -> None:
    model = torch.nn.Linear(2, 2)
    opt = LSTMOptimizer(model.named_parameters())
    assert opt.param_groups[0]["param_names"] == ["weight", "bias"]
    model(torch.randn(3, 2)).sum().backward()
    opt.step()


@pytest.mark.parametrize("foreach", [False, True])
def test_changing_state_dtype_mid_run_converts_the_states(foreach) -> None:
    params = make_params([(3,), (2, 2)], dtype=torch.float32)
    opt = LSTMOptimizer(params, foreach=foreach)
    set_grads(params, 0)
    opt.step()
    opt.param_groups[0]["state_dtype"] = torch.bfloat16
    set_grads(params, 1)
    opt.step()
    assert {opt.state[p][name].dtype for p in params for name in ("h", "c")} == {torch.bfloat16}
    assert {opt.state[p][name].dtype for p in params for name in ("m", "v")} == {torch.float32}  # moving averages


@pytest.mark.parametrize("kind", ["lstm", "meta"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_optimizer_continues_like_the_original(kind, how) -> None:
    import copy
    import io

    params = make_params([(3,), (2, 2)], dtype=torch.float32)
    opt = OPTIMIZERS[kind](params)
    set_grads(params, 0)
    step(opt)
    if how == "deepcopy":
        params_copy, opt_copy = copy.deepcopy((params, opt))
    else:
        buffer = io.BytesIO()
        torch.save((params, opt), buffer)
        buffer.seek(0)
        params_copy, opt_copy = torch.load(buffer, weights_only=False)
    for ps, o in ((params, opt), (params_copy, opt_copy)):
        set_grads(ps, 1)
        step(o)
    for p, q in zip(params, params_copy, strict=True):
        assert torch.equal(p, q)
        assert all(torch.equal(opt.state[p][k], opt_copy.state[q][k]) for k in opt.state[p])
    # every attribute the step reads is there, also those of paths this CPU run does not take
    # (the fused path's on CUDA): caches dropped by the copy are rebuilt empty
    ours = set(vars(OPTIMIZERS[kind](params))) - set(vars(torch.optim.SGD(params)))
    assert ours and ours <= set(vars(opt_copy))


def test_float16_states_saturate_instead_of_overflowing() -> None:
    params = make_params([(2,)], dtype=torch.float32)
    opt = LSTMOptimizer(params, state_dtype=torch.float16)
    # a gradient whose square exceeds float16's 65504 (v is kept in float32), then small ones
    for scale in (3000.0, 0.1, 0.1):
        params[0].grad = torch.full((2,), scale)
        opt.step()
    assert all(torch.isfinite(v).all() for v in opt.state[params[0]].values())
    assert torch.isfinite(params[0]).all() and params[0].abs().max() < 10


@pytest.mark.parametrize(("backend", "foreach"), [("torch", None), ("torch", False), pytest.param("triton", None, marks=needs_triton)])
@pytest.mark.parametrize("loss", [1e39, torch.tensor(-1e300, dtype=torch.float64)])
def test_a_finite_loss_beyond_float32_saturates_for_float32_math(loss, backend, foreach) -> None:
    """A finite float64 loss over float32's largest value became Inf in the float32 math, and a
    rule with a zero weight on the loss input turned every parameter and state NaN (0 * Inf)."""
    from learnedopt.nn import MetaLSTMCell

    rule = MetaLSTMCell(hidden_size=4)
    with torch.no_grad():
        rule.lstm.weight_ih_l0[:, 2] = 0.0  # the preprocessed loss's magnitude is input 2
    param = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    opt = MetaLSTMOptimizer([param], rule, backend=backend, foreach=foreach)
    param.grad = torch.tensor([1.0, -0.5, 0.25])
    opt.step(loss=loss)
    assert torch.isfinite(param).all()
    assert all(torch.isfinite(s).all() for s in opt.state[param].values()), opt.state[param]


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("kind", ["lstm", "meta"])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_float32_states_of_float64_parameters_saturate_instead_of_overflowing(kind, foreach, state_dtype) -> None:
    """The math runs in float64 for float64 parameters, so a finite gradient of 1e30 squares to
    1e60 there; stored into the float32 second moment (the default states), it became Inf, and the
    next step turned the states and the parameter NaN."""
    param = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = OPTIMIZERS[kind]([param], foreach=foreach, state_dtype=state_dtype)
    for grad in ([1e30, 1.0, -1e200], [1.0, 1.0, 1.0], [-0.5, 2.0, 1.0]):
        param.grad = torch.tensor(grad, dtype=torch.float64)
        step(opt)
        assert all(torch.isfinite(s).all() for s in opt.state[param].values()), opt.state[param]
    assert torch.isfinite(param).all()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's g * g
@pytest.mark.parametrize(("backend", "foreach"), [("torch", None), ("torch", False), pytest.param("triton", None, marks=needs_triton)])
@pytest.mark.parametrize("kind", ["lstm", "meta"])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_a_finite_float64_gradient_beyond_the_maths_range_saturates(kind, backend, foreach, param_dtype) -> None:
    """``p.grad_dtype = None`` lets a float32 (or bfloat16) parameter have a float64 gradient; one
    finite but over float32's largest value passed the NaN/Inf check and became Inf in the float32
    math, turning the parameter and its states NaN or Inf. It saturates at that largest value, as a
    float32 gradient there does (and a float64 loss beyond it)."""
    results = {}
    for grad_dtype, huge in ((torch.float64, 1e39), (torch.float32, torch.finfo(torch.float32).max)):
        param = torch.tensor([0.5, -1.0, 2.0, 1.0], dtype=param_dtype, requires_grad=True)
        param.grad_dtype = None
        opt = OPTIMIZERS[kind]([param], backend=backend, foreach=foreach, lr=1e-3)
        for grad in ([huge, -huge, 1e-3, 0.0], [1.0, 1.0, 1.0, 1.0]):
            param.grad = torch.tensor(grad, dtype=torch.float64).to(grad_dtype)
            step(opt)
            assert all(torch.isfinite(s).all() for s in opt.state[param].values()), opt.state[param]
        assert torch.isfinite(param).all(), param
        results[grad_dtype] = param.detach().clone(), {k: v.clone() for k, v in opt.state[param].items()}
    (got, got_state), (want, want_state) = results[torch.float64], results[torch.float32]
    assert torch.equal(got, want)
    for name, value in want_state.items():
        assert torch.equal(got_state[name], value), name


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's g * g
@pytest.mark.parametrize(("backend", "foreach"), [("torch", None), ("torch", False), pytest.param("triton", None, marks=needs_triton)])
@pytest.mark.parametrize("kind", ["lstm", "meta"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_finite_gradients_of_alternating_sign_keep_parameters_and_states_finite(kind, backend, foreach, dtype) -> None:
    """A moving average's ``lerp(g, m, beta)`` computes ``m - g``, which overflowed for ``|m|`` and
    ``|g|`` near the math dtype's largest value and of opposite signs: with the default weights
    ``m`` became Inf after gradients of +3e38 then -3e38 (float32) and the parameter NaN at the
    next step. The moving averages read the gradient saturated at half that largest value."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the fused kernels run float32 math")
    huge = 0.9 * torch.finfo(dtype).max
    param = torch.tensor([0.5, -1.0, 2.0, 1.0], dtype=dtype, requires_grad=True)
    opt = OPTIMIZERS[kind]([param], backend=backend, foreach=foreach, lr=1e-3, state_dtype=dtype)
    for sign in (1, 1, -1, 1, -1, -1, 1, -1, 0):
        param.grad = torch.tensor([huge, -huge, huge, 1.0], dtype=dtype) * sign + torch.tensor([0.0, 0.0, 0.0, 1e-3], dtype=dtype)
        step(opt)
        assert all(torch.isfinite(s).all() for s in opt.state[param].values()), opt.state[param]
        assert torch.isfinite(param).all(), param


@pytest.mark.parametrize("option, value", [("lr", -1.0), ("lr", None), ("nan_policy", "bogus"), ("state_dtype", torch.int32)])
def test_options_changed_in_param_groups_are_checked_at_the_next_step(option, value) -> None:
    params = make_params([(3,)], dtype=torch.float32)
    opt = LSTMOptimizer(params)
    set_grads(params, 0)
    opt.step()
    before = params[0].detach().clone()
    opt.param_groups[0][option] = value
    with pytest.raises(ValueError, match=f"Invalid {option}"):
        opt.step()
    assert torch.equal(params[0], before)


@pytest.mark.parametrize("backend, foreach", [("torch", None), ("torch", False), pytest.param("triton", None, marks=needs_triton)])
@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_lr_zero_leaves_parameters_even_where_the_step_overflows(kind, backend, foreach) -> None:
    """lr=0 keeps every parameter bit for bit (-0.0 too), even where the step is Inf or NaN."""
    from learnedopt.nn import CoordinateLSTM, MetaLSTMCell

    if kind == "meta":
        rule = MetaLSTMCell(hidden_size=4, step_scale=3.0)  # step_scale * a gradient of 2e38 overflows float32
    else:
        rule = CoordinateLSTM(hidden_size=4, num_layers=1)
    param = torch.tensor([0.5, 1.0, -0.0], requires_grad=True)
    opt = OPTIMIZERS[kind]([param], rule, backend=backend, foreach=foreach, lr=0.0)
    if kind == "lstm":
        with torch.no_grad():  # after the optimizer, which refuses a rule with Inf weights
            rule.head.bias.fill_(float("inf"))  # an infinite step everywhere
    param.grad = torch.tensor([2e38, 1.0, 1.0])
    step(opt)
    assert param.tolist() == [0.5, 1.0, 0.0] and torch.signbit(param[2])


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's g * g
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_a_finite_gradient_whose_square_overflows_leaves_the_states_finite(kind, backend) -> None:
    """A float32 gradient over sqrt(max) ~ 1.8e19 squares to Inf; the second moments must saturate
    rather than hold Inf (which turns NaN at the next step and stays so), on both backends."""
    from learnedopt.nn import CoordinateLSTM, MetaLSTMCell

    rule = CoordinateLSTM(rms_decays=(0.5, 0.99)) if kind == "lstm" else MetaLSTMCell(rms_decay=0.9)
    results = {}
    for run_backend in ("torch", backend):
        param = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
        opt = OPTIMIZERS[kind]([param], rule, backend=run_backend, lr=1e-3)
        for grad in ([3e19, -1.0, 1e-3], [1.0, 1.0, 1.0], [-0.5, 2.0, 1.0]):
            param.grad = torch.tensor(grad)
            step(opt)
            assert all(torch.isfinite(s).all() for s in opt.state[param].values()), opt.state[param]
        assert torch.isfinite(param).all()
        results[run_backend] = param.detach().clone()
    torch.testing.assert_close(results[backend], results["torch"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_steps_on_meta_tensors_give_states_of_the_right_shapes(monkeypatch, kind, foreach) -> None:
    """A shape-only run (a model built on the ``meta`` device), as torch.optim.Adam allows: no
    finiteness check can read values there, and the step must not switch compiling off for the
    real tensors that follow (a failed compile of meta tensors did)."""
    import learnedopt.nn.lstm_step as lstm_step_module

    monkeypatch.setenv("LEARNEDOPT_COMPILE", "1")
    forward = lstm_step_module._Compiled(lstm_step_module.cell_forward_into)
    monkeypatch.setattr(lstm_step_module, "_cell_forward", forward)
    with torch.device("meta"):
        model = torch.nn.Linear(4, 3)
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    opt = OPTIMIZERS[kind](model.parameters(), foreach=foreach)
    for _ in range(2):
        opt.step(loss=torch.tensor(1.0, device="meta")) if kind == "meta" else opt.step()
    hidden = opt.rule.config.hidden_size
    for p in model.parameters():
        assert opt.state[p]["h"].is_meta and opt.state[p]["h"].shape[1:] == (p.numel(), hidden)
        assert int(opt.state[p]["step"]) == 2
    assert not forward.failed


@pytest.mark.parametrize("kind", ["lstm", "meta"])
@pytest.mark.parametrize("trained", [True, False])
def test_an_optimizer_built_and_stepped_under_a_default_meta_device_works_as_adam(kind, trained) -> None:
    """``with torch.device("meta")`` around the whole run (a shape-only memory estimate), or
    around the optimizer of real CPU parameters, as torch.optim.Adam allows: the rule's weights,
    the step count and a loss given as a number stay real CPU values, as Adam's count does. They
    were made on the default device: the weights' finiteness check read meta tensors, an
    untrained preset's meta weights could not be copied, and a count on ``meta`` had no value."""
    weights = None if trained else {"lstm": "l2l-2016", "meta": "meta-lstm-adam"}[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedWeightsWarning)
        with torch.device("meta"):
            model = torch.nn.Linear(4, 3)
            opt = OPTIMIZERS[kind](model.parameters(), weights=weights)
            for _ in range(2):
                for p in model.parameters():
                    p.grad = torch.empty_like(p)
                opt.step(loss=1.0) if kind == "meta" else opt.step()
        assert not any(w.is_meta for w in opt.rule.parameters())
        for p in model.parameters():
            assert opt.state[p]["h"].is_meta and opt.state[p]["h"].shape[1] == p.numel()
            assert int(opt.state[p]["step"]) == 2

        params, opt = _two_steps_under_meta_device_as_without(kind, build_under_meta=True, weights=weights)
    for p in params:
        assert opt.state[p]["step"].device.type == "cpu" and int(opt.state[p]["step"]) == 2


@needs_triton
@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_the_triton_step_under_a_default_meta_device_works(kind) -> None:
    """The same under ``backend="triton"`` (Triton's interpreter here): its launchers read the
    momentum decays (the default ``l2l-blend``'s) and a number loss through tensors made on the
    default device, which ``with torch.device("meta")`` left without values."""
    _two_steps_under_meta_device_as_without(kind, build_under_meta=False, backend="triton")


def _two_steps_under_meta_device_as_without(kind: str, *, build_under_meta: bool, **options):
    """Two steps of CPU parameters under ``with torch.device("meta")`` (the optimizer built
    under it too where ``build_under_meta``), asserted equal to two steps without; ``(params,
    optimizer)``."""
    params, reference_params = make_params([(3,), (2, 2)], dtype=torch.float32), make_params([(3,), (2, 2)], dtype=torch.float32)
    reference = OPTIMIZERS[kind](reference_params, **options)
    with torch.device("meta") if build_under_meta else contextlib.nullcontext():
        opt = OPTIMIZERS[kind](params, **options)
    for seed in range(2):
        set_grads(params, seed=seed)
        set_grads(reference_params, seed=seed)
        with torch.device("meta"):
            opt.step(loss=0.5) if kind == "meta" else opt.step()
        reference.step(loss=0.5) if kind == "meta" else reference.step()
    assert_same_params_and_states(params, opt, reference_params, reference)
    return params, opt


@pytest.mark.parametrize("kind", ["lstm", "meta"])
@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("inside", ["step", "init_state", "load_state_dict"])
def test_states_made_inside_inference_mode_keep_stepping_outside_it(kind, foreach, inside) -> None:
    """A step, ``init_state()`` or ``load_state_dict()`` inside ``torch.inference_mode()`` made
    inference-tensor states (a step count, a loaded state), which the next step outside it could
    not update in place: it raised part-way, after the first group's update. They are now made
    outside it, and the run equals one that never entered it, bit for bit."""
    params, reference_params = make_params([(3,), (2, 2)], dtype=torch.float32), make_params([(3,), (2, 2)], dtype=torch.float32)
    opt = OPTIMIZERS[kind]([{"params": [params[0]]}, {"params": [params[1]]}], foreach=foreach)
    reference = OPTIMIZERS[kind]([{"params": [reference_params[0]]}, {"params": [reference_params[1]]}], foreach=foreach)
    set_grads(params[:1], seed=0)
    set_grads(reference_params[:1], seed=0)
    step(opt)
    step(reference)
    with torch.inference_mode():
        if inside == "step":
            set_grads(params, seed=1)
            set_grads(reference_params, seed=1)
            step(opt)
        elif inside == "init_state":
            opt.init_state()
        else:
            opt.load_state_dict(opt.state_dict())
    if inside == "step":
        step(reference)
    step_alike(params, opt, reference_params, reference, (2, 3))
    assert not any(value.is_inference() for p in params for value in opt.state[p].values())


def test_repr_lists_the_groups_options_as_torch_optim_and_names_the_rule_once(tmp_path) -> None:
    """``repr`` printed every group's JSON copy of the rule's fingerprint (kind, architecture and
    SHA-256: a line of some 270 characters per group). Now it is torch.optim's form with the
    rule named once: its preset, weight file, or (a module) the start of its SHA-256."""
    from learnedopt import CoordinateLSTM, save_weights

    a, b = make_params([(3,), (2,)], dtype=torch.float32)
    opt = LSTMOptimizer([{"params": [a]}, {"params": [b], "lr": 0.1}])
    options = "    backend: auto\n    foreach: None\n    lr: {}\n    maximize: False\n    nan_policy: raise\n" \
        "    state_dtype: torch.float32\n    weight_decay: 0.0\n"  # fmt: skip
    assert repr(opt) == (
        f"LSTMOptimizer (\nRule: CoordinateLSTM, preset l2l-blend\nParameter Group 0\n{options.format(1.0)}\n"
        f"Parameter Group 1\n{options.format(0.1)})"
    )
    adam = repr(torch.optim.Adam([a]))  # the same layout
    assert adam.startswith("Adam (\nParameter Group 0\n    amsgrad: False\n") and adam.endswith("\n)")
    assert repr(MetaLSTMOptimizer([a])).splitlines()[1] == "Rule: MetaLSTMCell, preset meta-lstm-adam-mnist"
    rule = CoordinateLSTM(hidden_size=4)
    save_weights(rule, tmp_path / "mine.safetensors", trained_on="test")
    from_file = repr(LSTMOptimizer([a], weights=tmp_path / "mine.safetensors"))
    assert from_file.splitlines()[1] == f"Rule: CoordinateLSTM, file {tmp_path / 'mine.safetensors'}"
    from_module = repr(LSTMOptimizer([a], weights=rule))
    assert re.fullmatch(r"Rule: CoordinateLSTM, sha256 [0-9a-f]{12}\.\.\.", from_module.splitlines()[1])
    assert all("learned_rule" not in text for text in (repr(opt), from_file, from_module))


@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_init_state_gives_states_in_the_group_state_dtype(kind) -> None:
    params = make_params([(3,), (2, 2)], dtype=torch.float32)
    opt = OPTIMIZERS[kind](params, state_dtype=torch.bfloat16)
    opt.init_state()
    spec = opt.rule.state_spec()
    assert spec
    for p in params:
        assert set(spec) <= set(opt.state[p])
        for name, s in spec.items():
            assert opt.state[p][name].dtype == (torch.float32 if s.moving_average else torch.bfloat16), name
    assert any(s.moving_average for s in spec.values())  # both default presets have m and v


@pytest.mark.parametrize(
    ("kind", "state_dtype", "bytes_per_element"),
    [("lstm", torch.float32, 340), ("lstm", torch.bfloat16, 180), ("meta", torch.float32, 184), ("meta", torch.bfloat16, 100)],
)
def test_state_memory_per_parameter_element_is_the_readmes(kind, state_dtype, bytes_per_element) -> None:
    # the README's figures for the default presets, against Adam's 8
    params = make_params([(50, 20), (7,)], dtype=torch.float32)
    opt = OPTIMIZERS[kind](params, state_dtype=state_dtype)
    opt.init_state()
    total = sum(t.numel() * t.element_size() for p in params for name, t in opt.state[p].items() if name != "step")
    assert total == bytes_per_element * sum(p.numel() for p in params)


@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_init_state_gives_a_frozen_parameter_no_state(kind) -> None:
    trained, frozen = make_params([(3,), (2,)], dtype=torch.float32)
    frozen.requires_grad_(False)
    opt = OPTIMIZERS[kind]([trained, frozen])
    opt.init_state()
    assert "h" in opt.state[trained] and not opt.state.get(frozen)
    assert int(opt.state[trained]["step"]) == 0


@pytest.mark.parametrize("kind", ["lstm", "meta"])
@pytest.mark.parametrize("helper", ["get_optimizer_state_dict", "set_optimizer_state_dict"])
def test_torch_checkpoint_helpers_give_a_fresh_optimizer_its_initial_state_without_a_step(kind, helper) -> None:
    """``torch.distributed.checkpoint.state_dict``'s helpers give an optimizer without state its
    state by a step at ``lr=0`` with zero gradients: it advanced LSTMOptimizer's recurrent states
    (and the step count), and MetaLSTMOptimizer raised for want of a loss. Now the parameters
    are unchanged, the states are those of ``init_state()``, ``lr`` and gradients are as they
    were, and the next step equals a fresh optimizer's."""
    from torch.distributed.checkpoint import state_dict as dcp_state_dict

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    model[0].bias.requires_grad_(False)  # frozen: no gradient, so no state, as torch gives it none
    reference_model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    reference_model.load_state_dict(model.state_dict())
    reference_model[0].bias.requires_grad_(False)
    opt = OPTIMIZERS[kind](model.parameters(), lr=0.5)
    reference = OPTIMIZERS[kind](reference_model.parameters(), lr=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    if helper == "get_optimizer_state_dict":
        saved = dcp_state_dict.get_optimizer_state_dict(model, opt)
        assert all(int(entry["step"]) == 0 for entry in saved["state"].values())
    else:
        dcp_state_dict.set_optimizer_state_dict(model, opt, dcp_state_dict.get_optimizer_state_dict(reference_model, reference))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert all(p.grad is None for p in model.parameters()) and opt.param_groups[0]["lr"] == 0.5
    fresh = OPTIMIZERS[kind](reference_model.parameters(), lr=0.5)
    fresh.init_state()
    assert_same_params_and_states(list(model.parameters()), opt, list(reference_model.parameters()), fresh)
    for seed in range(2):
        for m in (model, reference_model):
            torch.manual_seed(seed)
            m(torch.randn(5, 3)).square().mean().backward()
        step(opt)
        step(reference)
    assert_same_params_and_states(list(model.parameters()), opt, list(reference_model.parameters()), reference)


@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_a_first_step_at_lr_0_with_nonzero_gradients_still_advances_the_states(kind) -> None:
    """Only the checkpoint helpers' zero-gradient step is taken as ``init_state()``: a warm-up
    that starts at ``lr=0`` advances the states on its first step, as documented."""
    params = make_params([(3,), (2, 2)], dtype=torch.float32)
    opt = OPTIMIZERS[kind](params, lr=0.0)
    set_grads(params, seed=0)
    step(opt)
    assert all(int(opt.state[p]["step"]) == 1 and opt.state[p]["h"].abs().sum() > 0 for p in params)


@pytest.mark.parametrize("lr", [np.float32(0.5), np.float64(0.5), np.int64(1), torch.tensor(0.5)])
def test_numpy_and_tensor_learning_rates_work_as_in_torch_optim(lr) -> None:
    """A scheduler's lambda may return a numpy scalar; torch.optim takes any real number."""
    p = torch.nn.Parameter(torch.linspace(-1, 1, 6))
    opt = LSTMOptimizer([p], lr=lr)
    reference_p = torch.nn.Parameter(p.detach().clone())
    reference = LSTMOptimizer([reference_p], lr=float(lr))
    for o, q in ((opt, p), (reference, reference_p)):
        q.grad = torch.linspace(0.5, -0.5, 6)
        o.step()
    assert torch.equal(p, reference_p)


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_a_tensor_lr_steps_meta_parameters_and_a_meta_lr_is_refused_by_name(kind, foreach) -> None:
    """A CPU tensor ``lr`` steps a shape-only (``meta``) model as a number does. A ``meta`` one
    (``torch.tensor(lr)`` under ``with torch.device("meta")``) holds no value: it raised torch's
    "Tensor.item() cannot be called on meta tensors" from the option checks (at construction,
    or at the step after it was set in ``param_groups``); now a ValueError says what is wrong."""
    with torch.device("meta"):
        model = torch.nn.Linear(4, 3)
        meta_lr = torch.tensor(0.5)
    opt = OPTIMIZERS[kind](model.parameters(), lr=torch.tensor(0.5, device="cpu"), foreach=foreach)
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.empty_like(p)
        step(opt)
    assert all(int(opt.state[p]["step"]) == 2 and opt.state[p]["h"].shape[1] == p.numel() for p in model.parameters())
    message = r"^Invalid lr: a tensor on the meta device, which holds no value to step with; give a number"
    with pytest.raises(ValueError, match=message):
        OPTIMIZERS[kind](model.parameters(), lr=meta_lr, foreach=foreach)
    opt.param_groups[0]["lr"] = meta_lr
    with pytest.raises(ValueError, match=message):
        step(opt)
    assert all(int(opt.state[p]["step"]) == 2 for p in model.parameters())


@pytest.mark.parametrize("lr", [True, "0.1", torch.tensor([0.1, 0.2]), np.float32(-0.1), None])
def test_invalid_learning_rates_are_rejected(lr) -> None:
    with pytest.raises(ValueError, match="Invalid lr"):
        LSTMOptimizer([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def test_a_numpy_warm_up_schedule_runs() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = LSTMOptimizer([p])
    warm = np.linspace(0, 1, 5, dtype=np.float32)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: warm[min(t, 4)])
    for _ in range(3):
        p.grad = torch.ones(3)
        opt.step()
        scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.75)
    assert not torch.equal(p.detach(), torch.ones(3))  # lr 0.25 and 0.5 steps moved it


def test_groups_added_after_a_load_or_unpickle_carry_only_the_optimizer_options() -> None:
    """torch.optim's __setstate__ adds its own ``differentiable`` option to the defaults; a
    learned optimizer has no such option."""
    first, second = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    opt = LSTMOptimizer([first])
    keys = set(opt.param_groups[0])
    opt.load_state_dict(opt.state_dict())
    copied = pickle.loads(pickle.dumps(opt))
    for o in (opt, copied):
        o.add_param_group({"params": [second if o is opt else torch.nn.Parameter(torch.ones(3))]})
        assert set(o.param_groups[-1]) == keys
        assert "differentiable" not in o.defaults


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_moving_averages_keep_moving_under_bfloat16_states(kind, foreach) -> None:
    """A constant gradient: each moving average follows it exactly as under float32 states
    (bfloat16 averages stalled: over 3,000 steps, one with decay 0.999 at a third of the squared
    gradient, MetaLSTMOptimizer's bias-correction weight at 0.25, skewing Adam's direction by 11%)."""
    weights = {"lstm": None, "meta": "meta-lstm-adam"}[kind]
    runs = {}
    for state_dtype in (torch.float32, torch.bfloat16):
        p = torch.nn.Parameter(torch.zeros(16))
        opt = OPTIMIZERS[kind]([p], weights, lr=0.0, state_dtype=state_dtype, foreach=foreach)
        for _ in range(300):
            p.grad = torch.full((16,), 0.01)
            opt.step(loss=torch.tensor(1.0))
        runs[state_dtype] = {name: opt.state[p][name].float() for name in ("m", "v")}
    for name in ("m", "v"):
        torch.testing.assert_close(runs[torch.bfloat16][name], runs[torch.float32][name], rtol=0, atol=0)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_a_step_inside_an_autocast_region_runs_the_rule_in_float32(kind, foreach) -> None:
    """Training code often wraps the whole step in ``torch.autocast``; Adam is unaffected, and so
    must the learned step be (its LSTM's matrix products ran in bfloat16 there: after three
    steps a 30x20 weight was off by up to 3e-3, ``h`` by 0.16)."""
    runs = []
    for enabled in (False, True):
        params = make_params([(30, 20), (20,)], dtype=torch.float32)
        opt = OPTIMIZERS[kind](params, foreach=foreach)
        for t in range(3):
            set_grads(params, seed=t)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
                step(opt)
        runs.append((params, opt))
    (p0, opt0), (p1, opt1) = runs
    for p, q in zip(p0, p1):
        assert torch.equal(p, q)
        assert torch.equal(opt0.state[p]["h"], opt1.state[q]["h"])


@pytest.mark.parametrize(("autocast_dtype", "param_dtype"), [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_a_step_inside_an_autocast_region_of_another_half_dtype_than_the_parameters_steps_as_outside(
    kind, foreach, autocast_dtype, param_dtype
) -> None:
    """A model holding bfloat16 parameters stepped inside a float16 autocast region (or float16
    ones inside a bfloat16 region), as ``torch.optim.Adam`` steps there: the step's NaN/Inf check
    ran under autocast and raised "Unexpected floating ScalarType in at::autocast::prioritize"."""
    runs = []
    for enabled in (False, True):
        params = make_params([(30, 20), (20,), ()], dtype=param_dtype)
        opt = OPTIMIZERS[kind](params, foreach=foreach)
        for t in range(3):
            set_grads(params, seed=t)
            with torch.autocast("cpu", dtype=autocast_dtype, enabled=enabled):
                step(opt)
        runs.append((params, opt))
    (p0, opt0), (p1, opt1) = runs
    assert_same_params_and_states(p0, opt0, p1, opt1)


@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_grad_scaler_steps_as_unscaled_training_and_skips_overflowing_steps(kind) -> None:
    """Mixed-precision training's ``torch.amp.GradScaler``: ``scaler.step(opt, loss=...)``
    unscales the gradients (by a power of two, exactly) and then steps, so the run equals plain
    training bit for bit; a step whose scaled gradients overflow is skipped, states and all."""

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    x, y = torch.randn(32, 6), torch.randn(32, 1)
    plain, scaled = make(), make()
    plain_opt, scaled_opt = OPTIMIZERS[kind](plain.parameters()), OPTIMIZERS[kind](scaled.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for _ in range(4):
        for model, opt in ((plain, plain_opt), (scaled, scaled_opt)):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            if opt is plain_opt:
                loss.backward()
                opt.step(loss=loss)
            else:
                scaler.scale(loss).backward()
                scaler.step(opt, loss=loss)
                scaler.update()
    for p, q in zip(plain.parameters(), scaled.parameters(), strict=True):
        assert torch.equal(p, q) and torch.equal(plain_opt.state[p]["h"], scaled_opt.state[q]["h"])

    before = [p.detach().clone() for p in scaled.parameters()]
    states = [{k: v.clone() for k, v in scaled_opt.state[p].items()} for p in scaled.parameters()]
    scaled_opt.zero_grad()
    loss = torch.nn.functional.mse_loss(scaled(x), y)
    scaler.scale(loss * 1e38).backward()  # the scaled gradients overflow float32
    scaler.step(scaled_opt, loss=loss)
    scaler.update()
    assert scaler.get_scale() == 512.0  # the overflow was seen, and the scale halved
    for p, b, state in zip(scaled.parameters(), before, states, strict=True):
        assert torch.equal(p, b)
        assert all(torch.equal(scaled_opt.state[p][k], v) for k, v in state.items())


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_a_schedule_decaying_to_zero_that_rounds_below_it_steps_at_lr_zero(kind, foreach) -> None:
    """``LinearLR(end_factor=0)`` ends at -3.3e-18 here (rounding), where torch.optim steps on;
    the learned optimizers raised "Invalid lr" at the last steps of training."""
    params = make_params([(4,)], dtype=torch.float32)
    opt = OPTIMIZERS[kind](params, lr=0.3, foreach=foreach)
    decay = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.15, end_factor=0.0, total_iters=3)
    for t in range(3):
        set_grads(params, seed=t)
        step(opt)
        decay.step()
    assert -1e-16 < opt.param_groups[0]["lr"] < 0
    before, h = params[0].detach().clone(), opt.state[params[0]]["h"].clone()
    set_grads(params, seed=3)
    step(opt)
    assert torch.equal(params[0], before) and not torch.equal(opt.state[params[0]]["h"], h)
    opt.param_groups[0]["lr"] = -1e-3  # a negative lr that no rounding explains is still an error
    with pytest.raises(ValueError, match="Invalid lr"):
        step(opt)


@pytest.mark.parametrize("kind", ["lstm", "meta"])
@pytest.mark.parametrize("foreach", [False, True])
def test_an_lr_rounded_below_zero_leaves_zero_valued_coordinates_at_zero(kind, foreach) -> None:
    """The rounding error is stepped as lr 0, not as -1e-17: a coordinate at 0.0 (where even that
    tiny step shows) stays exactly 0.0."""
    param = torch.zeros(4, requires_grad=True)
    opt = OPTIMIZERS[kind]([param], foreach=foreach)
    opt.param_groups[0].update(initial_lr=1.0, lr=-1e-17)
    set_grads([param], seed=0)
    step(opt)
    assert torch.equal(param, torch.zeros(4)) and int(opt.state[param]["step"]) == 1


@pytest.mark.parametrize("foreach", [False, True])
def test_a_python_number_loss_is_read_in_float64(foreach) -> None:
    """``step(loss=loss.item())`` equals ``step(loss=loss)`` for a float64 model: the number was
    rounded to float32 first (the float64 parameters then ended 1e-11 apart), and a finite loss
    above float32's largest value was called "inf" and rejected."""
    runs = []
    for loss in (0.1, torch.tensor(0.1, dtype=torch.float64), 1e39, torch.tensor(1e39, dtype=torch.float64)):
        params = make_params([(7,), (2, 3)])
        opt = MetaLSTMOptimizer(params, foreach=foreach, state_dtype=torch.float64)
        for t in range(3):
            set_grads(params, seed=t)
            opt.step(loss=loss)
        runs.append(params)
    for number, tensor in (runs[0:2], runs[2:4]):
        for p, q in zip(number, tensor, strict=True):
            assert torch.equal(p, q)


@pytest.mark.parametrize("foreach", [False, True])
def test_a_moving_average_converted_mid_run_keeps_at_least_float32(foreach) -> None:
    """From float64 states to bfloat16 ones, ``m`` and ``v`` become float32 (their storage dtype
    for bfloat16), not bfloat16, on the per-tensor path as on the batched one."""
    params = make_params([(3,), (2, 2)], dtype=torch.float32)
    opt = LSTMOptimizer(params, foreach=foreach, state_dtype=torch.float64)
    set_grads(params, 0)
    opt.step()
    assert {opt.state[p][name].dtype for p in params for name in ("m", "v")} == {torch.float64}
    opt.param_groups[0]["state_dtype"] = torch.bfloat16
    set_grads(params, 1)
    opt.step()
    assert {opt.state[p][name].dtype for p in params for name in ("h", "c")} == {torch.bfloat16}
    assert {opt.state[p][name].dtype for p in params for name in ("m", "v")} == {torch.float32}


@pytest.mark.parametrize("name", ["bfloat16", "torch.bfloat16"])
def test_a_state_dtype_given_by_name_is_the_dtype(name) -> None:
    """``state_dict()`` writes ``"bfloat16"``; ``str(torch.bfloat16)`` is ``"torch.bfloat16"``."""
    params = make_params([(3,)], dtype=torch.float32)
    opt = LSTMOptimizer(params, state_dtype=name)
    assert opt.param_groups[0]["state_dtype"] is torch.bfloat16


def test_an_optimizer_pickled_without_the_groups_fingerprint_gets_it_back() -> None:
    """Param groups pickled by an earlier version lack ``"learned_rule"``, which a flattened
    distributed checkpoint needs in the live groups."""
    import json

    from learnedopt.weights import fingerprint

    opt = LSTMOptimizer(make_params([(3,)], dtype=torch.float32))
    del opt.param_groups[0]["learned_rule"]
    restored = pickle.loads(pickle.dumps(opt))
    assert json.loads(restored.param_groups[0]["learned_rule"]) == fingerprint(restored.rule)


@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_under_torch_compile_with_fullgraph_the_step_is_refused_by_name_before_it_runs(kind) -> None:
    """``fullgraph=True`` allows no graph break, and the step is one: Dynamo refuses it, naming
    ``LearnedOptimizer.step``, before any parameter or state changes."""
    from torch._dynamo.exc import Unsupported

    torch.compiler.reset()
    params = make_params([(3,), (2, 2)], dtype=torch.float32)
    opt = OPTIMIZERS[kind](params)
    set_grads(params, seed=1)
    before = [p.detach().clone() for p in params]

    @torch.compile(fullgraph=True, backend="eager")
    def compiled_step():
        return step(opt)

    with pytest.raises(Unsupported, match=r"LearnedOptimizer\.step"):
        compiled_step()
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True)) and not opt.state


@pytest.fixture
def swapping_module_params():
    """torch's opt-in ``set_swap_module_params_on_conversion(True)``, reset after the test."""
    torch.__future__.set_swap_module_params_on_conversion(True)
    yield
    torch.__future__.set_swap_module_params_on_conversion(False)


@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_optimizers_build_and_step_alike_under_swapped_module_params(swapping_module_params, kind) -> None:
    """Under ``torch.__future__.set_swap_module_params_on_conversion(True)`` no optimizer could
    be built: loading its weights into the rule's ``nn.LSTM`` (``load_state_dict``, which swaps
    each parameter then) raised "Cannot swap t1 because it has weakref associated with it"."""
    params = make_params([(3,), (2, 2)], dtype=torch.float32)
    opt = OPTIMIZERS[kind](params)
    torch.__future__.set_swap_module_params_on_conversion(False)
    others = make_params([(3,), (2, 2)], dtype=torch.float32)
    other = OPTIMIZERS[kind](others)
    torch.__future__.set_swap_module_params_on_conversion(True)
    step_alike(params, opt, others, other, (1, 2))
    assert torch.__future__.get_swap_module_params_on_conversion()  # left as the caller set it


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_a_model_converted_under_swapped_module_params_keeps_stepping_as_without(swapping_module_params, kind, foreach) -> None:
    """``model.double()`` after steps, under ``set_swap_module_params_on_conversion(True)``
    (which swaps each parameter's contents so that an optimizer's references stay valid, as
    torch.optim relies on), raised "Couldn't swap Linear.weight": the optimizer held a weak
    reference to each parameter, which ``torch.utils.swap_tensors`` refuses."""
    runs = []
    for swap in (True, False):
        torch.__future__.set_swap_module_params_on_conversion(swap)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        opt = OPTIMIZERS[kind](model.parameters(), foreach=foreach)
        x, y = torch.randn(8, 3), torch.randn(8, 1)
        for dtype in (torch.float32, torch.float64, torch.float64):
            model.to(dtype)
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x.to(dtype)), y.to(dtype))
            loss.backward()
            opt.step(loss=loss) if kind == "meta" else opt.step()
        runs.append((list(model.parameters()), opt))
    (params, opt), (others, other) = runs
    assert all(p.dtype == torch.float64 for p in params)
    assert_same_params_and_states(params, opt, others, other)


@pytest.mark.parametrize("foreach", [None, False])
def test_a_parameter_taken_out_of_the_optimizer_is_not_kept_alive_after_the_next_step(foreach) -> None:
    import gc
    import weakref

    a, b = make_params([(3,), (4,)], dtype=torch.float32)
    opt = LSTMOptimizer([a, b], foreach=foreach)
    set_grads([a, b], seed=1)
    opt.step()
    opt.param_groups[0]["params"] = [a]
    del opt.state[b]
    gone = weakref.ref(b)
    del b
    set_grads([a], seed=2)
    opt.step()
    gc.collect()
    assert gone() is None


@pytest.mark.parametrize("taken", ["last group", "parameter of a group not stepped"])
@pytest.mark.parametrize("foreach", [None, False])
def test_a_parameter_taken_out_with_its_group_or_from_an_idle_group_is_not_kept_alive(foreach, taken) -> None:
    """The flat buffers of a param group were dropped only when another group's buffers were
    rebuilt: after ``param_groups.pop()`` of the last group, or a parameter taken out of a group
    none of whose parameters steps any more, the group's old buffers kept the parameter and its
    states alive for the optimizer's life (``del optimizer.state[p]`` done)."""
    import gc
    import weakref

    a, b, c = make_params([(3,), (4,), (5,)], dtype=torch.float32)
    opt = LSTMOptimizer([{"params": [a]}, {"params": [b, c]}], foreach=foreach)
    set_grads([a, b, c], seed=1)
    opt.step()
    if taken == "last group":
        opt.param_groups.pop()
        del opt.state[c]
    else:
        opt.param_groups[1]["params"] = [b]
        del opt.state[c]
        b.grad = None
    del opt.state[b]
    gone = [weakref.ref(b), weakref.ref(c)]
    b.grad = c.grad = None
    if taken == "last group":
        del b
    del c
    for seed in (2, 3):
        set_grads([a], seed=seed)
        opt.step()
    gc.collect()
    assert gone[1]() is None
    if taken == "last group":
        assert gone[0]() is None


def test_the_states_of_a_group_taken_out_whole_are_kept_as_they_are() -> None:
    """A param group popped with its states kept holds exactly its old flat buffers: its states
    stay the tensors they were (no copy of them all, which would need as much memory again for
    a moment); only a parameter taken out of a group whose other parameters stay is given
    states of its own (:func:`test_the_state_left_of_a_parameter_taken_out_of_its_group_holds_only_its_own_memory`)."""
    a, b, c = make_params([(30,), (4,), (5,)], dtype=torch.float32)
    opt = LSTMOptimizer([{"params": [a]}, {"params": [b, c]}])
    set_grads([a, b, c], seed=1)
    opt.step()
    before = {p: dict(opt.state[p]) for p in (b, c)}
    opt.param_groups.pop()
    set_grads([a], seed=2)
    opt.step()
    assert all(opt.state[p][name] is value for p in (b, c) for name, value in before[p].items())


def test_the_states_of_a_frozen_group_deleted_by_hand_are_freed() -> None:
    """Freezing a param group's parameters (``requires_grad_(False)``) and deleting their states
    (``del optimizer.state[p]``), as one frees ``torch.optim.Adam``'s memory for them, left the
    group's flat buffers, every state of the group, alive in the optimizer's cache for good: a
    group that never steps again was never rebuilt. They are freed at the next step."""
    import gc
    import weakref

    frozen, trained = make_params([(1_000,), (10,)], dtype=torch.float32)
    opt = LSTMOptimizer([{"params": [frozen]}, {"params": [trained]}])
    set_grads([frozen, trained], seed=1)
    opt.step()
    buffer = opt.state[frozen]["h"]._base  # the group's flat buffer the state is a view into
    assert buffer is not None
    gone = weakref.ref(buffer)
    del buffer
    frozen.requires_grad_(False)
    frozen.grad = None
    del opt.state[frozen]
    set_grads([trained], seed=2)
    opt.step()
    gc.collect()
    assert gone() is None


def test_the_state_left_of_a_parameter_taken_out_of_its_group_holds_only_its_own_memory() -> None:
    """A parameter taken out of its group keeps its state in ``optimizer.state`` (as in
    ``torch.optim``), but on the batched path that state was views into the group's flat
    buffers: once the group's buffers were rebuilt without it, its few numbers kept the whole
    old buffers of every parameter of the group alive (a 10-element bias pinned the 18 MB of a
    100,000-element weight's states), once more at each parameter taken out. Its states become
    tensors of their own, with their values; put back, it steps on from them as if never taken
    out."""
    a, b = make_params([(5_000,), (10,)], dtype=torch.float32)
    other = [p.detach().clone().requires_grad_() for p in (a, b)]
    opt, reference = LSTMOptimizer([a, b]), LSTMOptimizer(other)

    def step(seed, params):
        set_grads(params, seed=seed)
        for p, q in zip((a, b), other, strict=True):
            q.grad = None if p.grad is None else p.grad.clone()
        opt.step()
        reference.step()

    for seed in (1, 2):
        step(seed, [a, b])
    before = {name: value.clone() for name, value in opt.state[b].items()}
    opt.param_groups[0]["params"] = [a]
    b.grad = None
    step(3, [a])
    for name, value in opt.state[b].items():
        assert torch.equal(value, before[name])
        assert value.untyped_storage().nbytes() == value.numel() * value.element_size(), name
    opt.param_groups[0]["params"] = [a, b]
    step(4, [a, b])
    assert torch.equal(a, other[0]) and torch.equal(b, other[1])
    for p, q in zip((a, b), other, strict=True):
        for name, value in opt.state[p].items():
            assert torch.equal(value, reference.state[q][name]), name


def test_repeated_loads_of_a_rule_trained_meanwhile_keep_one_fingerprint() -> None:
    """An optimizer whose rule is trained in place between steps (``weights=`` a module being
    meta-trained), its state saved and loaded each time, kept the JSON fingerprint of every
    weights it had ever loaded under (a few hundred bytes each, without end); it keeps those
    its param groups hold, and still takes a state saved under the weights it runs now."""
    from learnedopt.nn import CoordinateLSTM

    rule = CoordinateLSTM()
    p = torch.nn.Parameter(torch.randn(10))
    opt = LSTMOptimizer([p], weights=rule)
    for _ in range(20):
        with torch.no_grad():
            next(rule.parameters()).add_(1e-3)
        p.grad = torch.randn_like(p)
        opt.step()
        opt.load_state_dict(opt.state_dict())
    assert len(opt._rule_jsons) == 1
    opt.step()
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))]})
    opt.step()


def test_repeated_loads_around_load_state_dict_of_a_rule_trained_meanwhile_keep_the_groups_fingerprints() -> None:
    """As :func:`test_repeated_loads_of_a_rule_trained_meanwhile_keep_one_fingerprint`, for a
    wrapper that loads the groups' options itself (``ZeroRedundancyOptimizer``): each fingerprint
    its step accepted was kept without end; it keeps those its param groups hold."""
    from learnedopt.nn import CoordinateLSTM

    rule = CoordinateLSTM()
    p, q = torch.nn.Parameter(torch.randn(10)), torch.nn.Parameter(torch.randn(3))
    opt = LSTMOptimizer([{"params": [p]}, {"params": [q]}], weights=rule)
    for _ in range(20):
        with torch.no_grad():
            next(rule.parameters()).add_(1e-3)
        saved = opt.state_dict()
        for group, saved_group in zip(opt.param_groups, saved["param_groups"], strict=True):
            group["learned_rule"] = saved_group["learned_rule"]  # as the wrapper copies the saved options
        p.grad, q.grad = torch.randn_like(p), torch.randn_like(q)
        opt.step()
    assert len(opt._rule_jsons) <= 2
    opt.param_groups[1]["learned_rule"] = json.dumps({"kind": "other", "config": {}, "sha256": "0" * 64})
    with pytest.raises(ValueError, match=r"^param group 1 holds the state of an optimizer with other weights"):
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fused kernel", "compiled step"])
@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_two_optimizers_stepping_in_two_threads_at_once_step_as_one_after_the_other(kind, dtype) -> None:
    """Two optimizers, each of its own model, stepped in two threads in lockstep (each step of
    one while the other's runs: the CPU kernel's library cache, the compiled pointwise step's
    variants, the module-level state they share) give the bits they give one after the other."""
    import threading

    cls = LSTMOptimizer if kind == "lstm" else MetaLSTMOptimizer

    def train(seed, barrier=None):
        g = torch.Generator().manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(dtype)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=dtype))
        x, y = torch.randn(16, 4, generator=g, dtype=dtype), torch.randn(16, 1, generator=g, dtype=dtype)
        opt = cls(model.parameters())
        for _ in range(8):
            if barrier is not None:
                barrier.wait(timeout=60)
            opt.zero_grad()
            loss = (model(x) - y).square().mean()
            loss.backward()
            opt.step(loss=loss) if kind == "meta" else opt.step()
        return [p.detach().clone() for p in model.parameters()]

    together: dict[int, list[torch.Tensor]] = {}
    barrier = threading.Barrier(2)
    threads = [threading.Thread(target=lambda seed=seed: together.update({seed: train(seed, barrier)})) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for seed in (1, 2):
        alone = train(seed)
        assert all(torch.equal(p, q) for p, q in zip(together[seed], alone, strict=True))


@pytest.mark.parametrize("weights", [None, "untrained preset", "file"])
@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_building_an_optimizer_leaves_the_global_rng_as_adam_does(kind, weights, tmp_path) -> None:
    """A script seeded once that switches from Adam draws the same data order and dropout masks
    after building the optimizer: building the rule (whose weights a file or preset then
    replaces) drew its random initialisation from torch's global generator."""
    from learnedopt import load_weights, save_weights

    if weights == "untrained preset":
        weights = {"lstm": "l2l-2016", "meta": "meta-lstm-adam"}[kind]
    elif weights == "file":
        rule, _ = load_weights({"lstm": "l2l-blend", "meta": "meta-lstm-adam-mnist"}[kind])
        weights = tmp_path / "rule.safetensors"
        save_weights(rule, weights)
    params = make_params([(3,)], dtype=torch.float32)
    draws = []
    for make in (lambda: torch.optim.Adam(params), lambda: OPTIMIZERS[kind](params, weights=weights)):
        torch.manual_seed(0)
        make()
        draws.append(torch.rand(4))
    assert torch.equal(draws[0], draws[1])
