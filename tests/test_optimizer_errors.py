"""Every bad input gets a clear error, and nothing is changed when it does."""

import re

import pytest
import torch
from helpers import OPTIMIZERS, assert_same_params_and_states, make_mixed_params, make_params, needs_triton, param_specs, set_grads, step
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from learnedopt import CoordinateLSTM, LSTMOptimizer, MetaLSTMOptimizer, NonFiniteGradientError


def _plain_sgd_classes():
    """A rule kind of the user's own (plain SGD, no fused kernel) and its optimizer class."""
    from learnedopt.nn import MetaLSTMConfig, UpdateRule
    from learnedopt.optim import LearnedOptimizer

    class PlainSGD(UpdateRule):
        kind = "PlainSGD"
        config_class = MetaLSTMConfig  # any config dataclass; unused

        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(1))

        def state_spec(self):
            return {}

        def forward(self, grad, param, state, loss=None):
            return -grad * self.scale, {}

    class SGDOptimizer(LearnedOptimizer):
        rule_kind = "PlainSGD"
        default_preset = "none"

    return PlainSGD, SGDOptimizer


@pytest.mark.parametrize("cls", [LSTMOptimizer, MetaLSTMOptimizer])
def test_constructor_validation(cls) -> None:
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="empty parameter list"):
        cls([])
    with pytest.raises(ValueError, match="Invalid lr"):
        cls(p, lr=-0.1)
    with pytest.raises(ValueError, match="Invalid lr"):
        cls(p, lr=float("nan"))
    with pytest.raises(ValueError, match="Invalid lr: inf .must be finite"):
        cls(p, lr=float("inf"))
    with pytest.raises(ValueError, match="Invalid backend"):
        cls(p, backend="cuda")
    with pytest.raises(ValueError, match="Invalid state_dtype"):
        cls(p, state_dtype=torch.int32)
    with pytest.raises(ValueError, match="Invalid nan_policy"):
        cls(p, nan_policy="ignore")
    with pytest.raises(ValueError, match="Invalid lr"):
        cls([{"params": p, "lr": -1.0}])


@pytest.mark.parametrize("cls", [LSTMOptimizer, MetaLSTMOptimizer])
@pytest.mark.parametrize("lr", [1e-3, 1, torch.tensor(0.01)])
def test_a_learning_rate_given_where_the_weights_go_is_a_clear_error(cls, lr) -> None:
    """``torch.optim.Adam(params, 1e-3)`` takes ``lr`` second; here ``weights`` is second, and
    the error named only the weights ("weights must be a preset name, ..., got float")."""
    with pytest.raises(TypeError, match=rf"second argument is weights .*got .*; give a learning rate by keyword: {cls.__name__}\(params, lr=\.\.\.\)"):
        cls([torch.zeros(2, requires_grad=True)], lr)


@needs_triton
def test_triton_backend_for_a_rule_without_kernel_is_a_clear_error() -> None:
    p = [torch.zeros(2, requires_grad=True)]
    MetaLSTMOptimizer(p, backend="triton")  # has a kernel (tests/test_kernel_meta_lstm.py)
    from learnedopt import CoordinateLSTM

    # every feature set has kernel features (tests/test_kernel_coordinate_lstm.py) ...
    LSTMOptimizer(p, weights=CoordinateLSTM(momentum_decays=(0.9,), param_input=True), backend="triton")
    # ... a rule kind of the user's own has no kernel
    PlainSGD, SGDOptimizer = _plain_sgd_classes()
    with pytest.raises(ValueError, match="fused kernels only for CoordinateLSTM and MetaLSTMCell; this optimizer runs PlainSGD"):
        SGDOptimizer(p, weights=PlainSGD(), backend="triton")
    opt = SGDOptimizer(p, weights=PlainSGD(), backend="torch")
    with pytest.raises(ValueError, match="runs PlainSGD"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "backend": "triton"})
    assert len(opt.param_groups) == 1


def test_wrong_rule_kind_is_rejected() -> None:
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="runs a CoordinateLSTM update rule"):
        LSTMOptimizer(p, weights="meta-lstm-2017")
    with pytest.raises(ValueError, match="unknown preset"):
        LSTMOptimizer(p, weights="no-such-preset")


@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_complex_parameters_are_rejected(kind) -> None:
    z = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(ValueError, match="complex parameters"):
        OPTIMIZERS[kind]([z])
    opt = OPTIMIZERS[kind]([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match="complex parameters"):
        opt.add_param_group({"params": [z]})


@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_sparse_gradients_are_rejected(kind) -> None:
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = OPTIMIZERS[kind](emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        step(opt)
    assert torch.equal(emb.weight, before)


@pytest.mark.parametrize("kind", ["lstm", "meta"])
@pytest.mark.parametrize("dtype", [torch.complex64, torch.float8_e4m3fn])
def test_gradients_of_another_kind_are_rejected_before_anything_changes(kind, dtype) -> None:
    # p.grad_dtype = None lets a gradient's dtype differ from its parameter's: a complex one was
    # stepped as its real part, a float8 one failed inside torch's isfinite
    first, p = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(3))
    p.grad_dtype = None
    opt = OPTIMIZERS[kind]([first, p])
    first.grad = torch.randn(4)
    p.grad = torch.randn(3).to(dtype)
    before = [first.detach().clone(), p.detach().clone()]
    with pytest.raises(RuntimeError, match=rf"the gradient of .* is {dtype}; .* reads float32"):
        step(opt)
    assert all(torch.equal(a, b) for a, b in zip((first, p), before))
    assert not opt.state


@pytest.mark.parametrize("kind", ["lstm", "meta"])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_policy_raise_names_the_parameter_and_changes_nothing(kind, foreach, bad) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    opt = OPTIMIZERS[kind]([{"params": model[0].parameters()}, {"params": model[1].parameters()}], foreach=foreach)
    params = list(model.parameters())
    set_grads(params, 0)
    step(opt)
    before = [p.detach().clone() for p in params]
    states = {k: v.clone() for k, v in opt.state[params[0]].items()}
    set_grads(params, 1)
    params[3].grad[0] = bad
    with pytest.raises(NonFiniteGradientError, match=r"param_groups\[1\]\['params'\]\[1\]"):
        step(opt)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(torch.equal(opt.state[params[0]][k], v) for k, v in states.items())


def test_nan_policy_raise_uses_parameter_names_when_given() -> None:
    model = torch.nn.Linear(2, 2)
    opt = LSTMOptimizer(model.named_parameters())
    model(torch.randn(1, 2)).sum().backward()
    model.bias.grad[1] = float("nan")
    with pytest.raises(NonFiniteGradientError, match="'bias'"):
        opt.step()


@pytest.mark.parametrize("kind", ["lstm", "meta"])
@pytest.mark.parametrize("foreach", [False, True])
def test_nan_policy_skip_leaves_that_tensor_and_its_state(kind, foreach) -> None:
    params = make_params([(5,), (4,), (6,)], dtype=torch.float32)
    opt = OPTIMIZERS[kind](params, nan_policy="skip", foreach=foreach)
    set_grads(params, 0)
    step(opt)
    before = [p.detach().clone() for p in params]
    state = {k: v.clone() for k, v in opt.state[params[1]].items()}
    set_grads(params, 1)
    params[1].grad[2] = float("inf")
    step(opt)
    assert torch.equal(params[1], before[1])
    for k, v in state.items():
        assert torch.equal(opt.state[params[1]][k], v), k
    assert not torch.equal(params[0], before[0]) and not torch.equal(params[2], before[2])
    for p in params:
        assert all(torch.isfinite(v).all() for v in opt.state[p].values())


def test_meta_lstm_needs_the_loss() -> None:
    params = make_params([(3,)], dtype=torch.float32)
    opt = MetaLSTMOptimizer(params)
    set_grads(params, 0)
    with pytest.raises(ValueError, match=r"needs the loss.*step\(closure\).*step\(loss=loss\)$"):
        opt.step()
    with pytest.raises(ValueError, match="scalar"):
        opt.step(loss=torch.ones(2))
    with pytest.raises(NonFiniteGradientError, match="loss"):
        opt.step(loss=float("nan"))
    opt.step(loss=0.3)
    assert opt.state[params[0]]["step"] == 1
    with pytest.raises(ValueError, match=r"needs the loss.*step\(loss=loss\)$"):
        opt.step()


def test_meta_lstm_step_without_loss_and_without_gradients_does_nothing() -> None:
    """As ``torch.optim.Adam``'s: nothing to update, so no loss is needed (before any step, after
    ``zero_grad()``, or with a closure that returns none and computes no gradient); once a gradient
    is there, the loss is needed again."""
    params = make_params([(3,), (2,)], dtype=torch.float32)
    opt = MetaLSTMOptimizer([{"params": [params[0]]}, {"params": [params[1]], "lr": 0.5}])
    assert opt.step() is None
    assert not any(opt.state.values())
    set_grads(params, 0)
    opt.step(loss=0.3)
    values = [p.detach().clone() for p in params]
    states = {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(params)}
    opt.zero_grad()
    assert opt.step() is None
    assert opt.step(lambda: None) is None
    assert all(torch.equal(p, v) for p, v in zip(params, values, strict=True))
    assert all(torch.equal(opt.state[p][k], v) for i, p in enumerate(params) for k, v in states[i].items())
    params[1].grad = torch.ones(2)
    with pytest.raises(ValueError, match=r"needs the loss"):
        opt.step()


@pytest.mark.parametrize("kind", ["lstm", "meta"])
@pytest.mark.parametrize("loss", [torch.tensor(0.5), 0.5])
def test_a_loss_passed_as_the_closure_is_a_clear_error(kind, loss) -> None:
    """``step(loss)`` for ``step(loss=loss)``: Python's "'Tensor' object is not callable" named no
    cause."""
    params = make_params([(3,)], dtype=torch.float32)
    opt = OPTIMIZERS[kind](params)
    set_grads(params, seed=0)
    before = params[0].detach().clone()
    advice = r"pass the loss as step\(loss=loss\)" if kind == "meta" else r"its rule reads no loss: call step\(\)"
    with pytest.raises(TypeError, match=f"step's first argument is a closure .*got a {type(loss).__name__}; {advice}"):
        opt.step(loss)
    assert torch.equal(params[0], before) and not opt.state


def test_integer_parameters_are_rejected() -> None:
    with pytest.raises(ValueError, match="floating-point"):
        LSTMOptimizer([torch.zeros(2, dtype=torch.int64)])


@pytest.mark.parametrize("kind", ["lstm", "meta"])
@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_parameters_are_rejected_before_anything_changes(kind, foreach, dtype) -> None:
    """A float8 parameter failed in torch's ``isfinite`` or type promotion, for e5m2 after the
    float32 parameters of its group had been stepped; the README lists the dtypes that work."""
    message = rf"updates float32, float64, bfloat16 or float16 parameters, got {dtype} \(shape \(4,\)\)"
    with pytest.raises(ValueError, match=message):
        OPTIMIZERS[kind](make_params([(3,)], dtype=torch.float32) + [torch.zeros(4, dtype=dtype)], foreach=foreach)
    # converted after construction (module.to(dtype)): refused at the next step
    a, b = make_params([(3,), (4,)], dtype=torch.float32)
    opt = OPTIMIZERS[kind]([a, b], foreach=foreach)
    set_grads([a, b], seed=0)
    step(opt)
    states = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in (a, b)}
    b.data = b.data.to(dtype)
    b.grad = torch.ones(4).to(dtype)
    before = a.detach().clone()
    with pytest.raises(ValueError, match=message):
        step(opt)
    assert torch.equal(a, before)
    for p in (a, b):
        assert all(torch.equal(v, states[id(p)][k]) for k, v in opt.state[p].items())


@pytest.mark.parametrize("kind", ["meta"])
def test_rules_that_read_the_parameter_reject_non_finite_parameters(kind) -> None:
    params = make_params([(4,), (3,)], dtype=torch.float32)
    with torch.no_grad():
        params[1][0] = float("inf")
    opt = OPTIMIZERS[kind](params)
    set_grads(params, 0)
    with pytest.raises(NonFiniteGradientError, match=r"gradient or value of param_groups\[0\]\['params'\]\[1\]"):
        step(opt)
    assert not opt.state
    skipping = OPTIMIZERS[kind](params, nan_policy="skip")
    step(skipping)
    skipped = skipping.state.get(params[1], {})
    assert all(not v.any() for v in skipped.values()), "a skipped tensor's state stays at its initial value"
    assert all(torch.isfinite(v).all() for v in skipping.state[params[0]].values())


@pytest.mark.parametrize("kind", ["lstm", "meta"])
def test_a_rejected_param_group_is_not_kept(kind) -> None:
    params = make_params([(3,), (2,)], dtype=torch.float32)
    opt = OPTIMIZERS[kind]([params[0]])
    for bad, message in (({"lr": -1.0}, "Invalid lr"), ({"nan_policy": "bogus"}, "Invalid nan_policy")):
        with pytest.raises(ValueError, match=message):
            opt.add_param_group({"params": [params[1]], **bad})
        assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [params[1]], "lr": 0.5})  # the corrected group is accepted
    assert [g["lr"] for g in opt.param_groups] == [1.0, 0.5]
    with pytest.raises(ValueError, match="complex"):
        opt.add_param_group({"params": [torch.zeros(2, dtype=torch.complex64, requires_grad=True)]})
    assert len(opt.param_groups) == 2


def test_weights_per_param_group_and_repeated_parameters_are_errors() -> None:
    a, b = make_params([(3,), (2,)], dtype=torch.float32)
    with pytest.raises(ValueError, match="weights cannot differ between param groups"):
        LSTMOptimizer([{"params": [a], "weights": "l2l-mnist"}, {"params": [b]}])
    with pytest.warns(UserWarning, match="duplicate"), pytest.raises(ValueError, match="appears more than once"):
        LSTMOptimizer([a, b, a])


@pytest.mark.parametrize("kind", ["lstm", "meta"])
@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize(
    ("appended", "message"),
    [
        ("same group", "appears more than once in one parameter group"),
        ("earlier group", r"a parameter of param_groups\[1\] appears in an earlier parameter group"),
        ("complex", "does not support complex parameters"),
        ("integer", "needs floating-point parameters, got torch.int64"),
    ],
)
def test_a_parameter_appended_to_a_group_later_is_checked_at_the_next_step(kind, foreach, appended, message) -> None:
    """``param_groups[i]["params"]`` may be changed, as options may: a parameter appended twice
    or to a second group was stepped twice (the batched path raised part-way, after the first
    group's update), a complex one as its real part, an integer one failed in ``torch.finfo``."""
    a, b = make_params([(3,), (4,)], dtype=torch.float32)
    opt = OPTIMIZERS[kind]([{"params": [a]}, {"params": [b]}], foreach=foreach)
    set_grads([a, b], seed=0)
    step(opt)
    extra = {
        "same group": b,
        "earlier group": a,
        "complex": torch.zeros(2, dtype=torch.complex64, requires_grad=True),
        "integer": torch.zeros(2, dtype=torch.int64),
    }[appended]
    if appended == "complex":
        extra.grad = torch.ones(2, dtype=torch.complex64)
    opt.param_groups[1]["params"].append(extra)
    reference_params = [p.detach().clone() for p in (a, b)]
    states = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in (a, b)}
    set_grads([a, b], seed=1)
    with pytest.raises(ValueError, match=message):
        step(opt)
    for p, before in zip((a, b), reference_params, strict=True):
        assert torch.equal(p, before)
        assert all(torch.equal(v, states[id(p)][k]) for k, v in opt.state[p].items())


def test_a_param_group_may_repeat_the_optimizers_own_weights() -> None:
    """Wrappers that build the optimizer from per-group options (ZeroRedundancyOptimizer adds
    each keyword argument to every group) give a group the constructor's ``weights`` again: the
    same weights are accepted, other ones are still an error."""
    a, b = make_params([(3,), (2,)], dtype=torch.float32)
    rule = CoordinateLSTM()
    for weights, again in (("l2l-mnist", "l2l-mnist"), (None, LSTMOptimizer.default_preset), (rule, rule)):
        opt = LSTMOptimizer([{"params": [a], "weights": again}, {"params": [b]}], weights=weights)
        assert all("weights" not in group for group in opt.param_groups)
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "weights": again})
    with pytest.raises(ValueError, match="weights cannot differ between param groups"):
        LSTMOptimizer([{"params": [a], "weights": CoordinateLSTM()}], weights=rule)


def test_a_triton_group_that_cannot_run_fails_before_any_group_is_updated() -> None:
    from learnedopt import kernels

    if not kernels.FUSED_UPDATES_AVAILABLE:
        pytest.skip("Triton is not installed")
    a, b = make_params([(3,), (2,)], dtype=torch.float64)  # the kernels take no float64 parameters
    opt = LSTMOptimizer([{"params": [a]}, {"params": [b], "backend": "triton"}])
    set_grads([a, b], 0)
    before = a.detach().clone()
    with pytest.raises(RuntimeError, match="backend='triton' cannot run this step: float64"):
        opt.step()
    assert torch.equal(a, before) and not opt.state


def test_a_module_given_as_weights_is_not_changed() -> None:
    from learnedopt import CoordinateLSTM

    rule = CoordinateLSTM()
    LSTMOptimizer([torch.zeros(2, requires_grad=True)], weights=rule)
    assert all(p.requires_grad for p in rule.parameters())


def test_a_non_finite_loss_under_skip_skips_the_whole_step() -> None:
    params = make_params([(3,), (2,)], dtype=torch.float32)
    opt = MetaLSTMOptimizer(params, nan_policy="skip")
    set_grads(params, 0)
    opt.step(loss=0.3)
    before = [p.detach().clone() for p in params]
    states = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    set_grads(params, 1)
    opt.step(loss=float("inf"))  # every coordinate reads the loss: nothing can step
    for p, b, state in zip(params, before, states, strict=True):
        assert torch.equal(p, b)
        assert all(torch.equal(opt.state[p][k], v) for k, v in state.items())
    mixed = MetaLSTMOptimizer([{"params": [params[0]]}, {"params": [params[1]], "nan_policy": "skip"}])
    with pytest.raises(NonFiniteGradientError, match="nan_policy='raise'"):
        mixed.step(loss=float("nan"))


def test_a_tensor_skipped_before_its_first_step_gets_no_state() -> None:
    params = make_params([(3,), (2,)], dtype=torch.float32)
    opt = LSTMOptimizer(params, nan_policy="skip")
    set_grads(params, 0)
    params[1].grad[0] = float("nan")
    opt.step()
    assert params[1] not in opt.state and sorted(opt.state_dict()["state"]) == [0]


@pytest.mark.parametrize("cls", [LSTMOptimizer, MetaLSTMOptimizer])
def test_a_bool_lr_is_rejected(cls) -> None:
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="Invalid lr: True"):
        cls(p, lr=True)


@pytest.mark.parametrize("cls", [LSTMOptimizer, MetaLSTMOptimizer])
def test_an_invalid_foreach_is_rejected_at_construction(cls) -> None:
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="Invalid foreach: 'no'"):
        cls(p, foreach="no")


@pytest.mark.parametrize("cls", [LSTMOptimizer, MetaLSTMOptimizer])
def test_a_maximize_that_is_not_a_bool_is_rejected_at_construction_and_at_the_next_step(cls) -> None:
    """``maximize="False"`` (a config file's string) is truthy: it ascended without a word."""
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="Invalid maximize: 'False' \\(True or False\\)"):
        cls([p], maximize="False")
    optimizer = cls([p], maximize=0)  # 0 and 1 are False and True, as bools are
    optimizer.param_groups[0]["maximize"] = "no"
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="Invalid maximize: 'no'"):
        optimizer.step(loss=torch.tensor(1.0))
    assert torch.equal(p, torch.zeros(2))


def test_a_triton_group_with_float16_states_fails_before_any_group_is_updated() -> None:
    from learnedopt import kernels

    if not kernels.FUSED_UPDATES_AVAILABLE:
        pytest.skip("Triton is not installed")
    a, b = make_params([(3,), (2,)], dtype=torch.float32)
    opt = LSTMOptimizer([{"params": [a], "backend": "torch"}, {"params": [b], "backend": "triton", "state_dtype": torch.float16}])
    set_grads([a, b], 0)
    before = [a.detach().clone(), b.detach().clone()]
    with pytest.raises(RuntimeError, match=r"backend='triton' cannot run this step: state_dtype torch\.float16"):
        opt.step()
    assert torch.equal(a, before[0]) and torch.equal(b, before[1]) and not opt.state


def test_nan_policy_raise_names_the_first_bad_parameter() -> None:
    params = make_params([(3,), (2,), (4,)], dtype=torch.float32)
    opt = LSTMOptimizer(params)
    set_grads(params, 0)
    params[0].grad[1] = float("nan")
    params[2].grad[0] = float("nan")
    with pytest.raises(NonFiniteGradientError, match=r"of param_groups\[0\]\['params'\]\[0\] \(shape \(3,\)\) contains NaN or Inf \(2 parameter\(s\) affected\)"):
        opt.step()


def test_a_triton_backend_set_later_for_a_rule_without_kernel_fails_at_the_step() -> None:
    from learnedopt import kernels

    if not kernels.FUSED_UPDATES_AVAILABLE:
        pytest.skip("Triton is not installed")
    PlainSGD, SGDOptimizer = _plain_sgd_classes()
    p = torch.ones(3, requires_grad=True)
    opt = SGDOptimizer([p], weights=PlainSGD(), backend="torch")
    opt.param_groups[0]["backend"] = "triton"  # past add_param_group's check
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="backend='triton' cannot run this step: the rule is PlainSGD"):
        opt.step()
    assert torch.equal(p, torch.ones(3)) and not opt.state


@pytest.mark.parametrize("interpret", ["0", "false", "off"])
def test_triton_on_cpu_tensors_without_the_interpreter_fails_before_any_group_is_updated(interpret) -> None:
    """Whatever value turns Triton's interpreter off (Triton reads "false" and "off" as off; the
    optimizer used to take any value but "0" as on, update the torch group, then fail in the
    kernel's launcher with a ValueError) is refused before any group is updated."""
    from learnedopt import kernels

    if not kernels.FUSED_UPDATES_AVAILABLE:
        pytest.skip("Triton is not installed")
    script = """
import torch
from learnedopt import LSTMOptimizer
a, b = torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)
opt = LSTMOptimizer([{"params": [a], "backend": "torch"}, {"params": [b], "backend": "triton"}])
a.grad, b.grad = torch.ones(3), torch.ones(2)
try:
    opt.step()
except RuntimeError as err:
    print("raised:", err)
print("unchanged:", torch.equal(a, torch.ones(3)) and torch.equal(b, torch.ones(2)) and not opt.state)
"""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": interpret}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "raised: backend='triton' cannot run this step: cpu tensors (needs CUDA" in out.stdout
    assert "unchanged: True" in out.stdout


def test_a_coordinate_lstm_that_reads_the_parameter_rejects_non_finite_parameters() -> None:
    from learnedopt import CoordinateLSTM

    params = make_params([(4,), (3,)], dtype=torch.float32)
    with torch.no_grad():
        params[1][0] = float("inf")
    opt = LSTMOptimizer(params, weights=CoordinateLSTM(param_input=True))
    set_grads(params, 0)
    with pytest.raises(NonFiniteGradientError, match=r"gradient or value of param_groups\[0\]\['params'\]\[1\]"):
        opt.step()
    assert not opt.state


def test_a_non_finite_closure_loss_under_skip_is_returned() -> None:
    params = make_params([(3,)], dtype=torch.float32)
    opt = MetaLSTMOptimizer(params, nan_policy="skip")
    set_grads(params, 0)
    before = params[0].detach().clone()
    loss = torch.tensor(float("inf"))
    assert opt.step(lambda: loss) is loss
    assert torch.equal(params[0], before)


@pytest.mark.parametrize("kind", ["lstm", "meta"])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(("dtype", "lr"), [(torch.float32, 1e39), (torch.float16, 1e5)])
def test_an_lr_beyond_the_parameters_dtype_fails_before_any_group_is_updated(kind, foreach, dtype, lr) -> None:
    """``param.add_(step, alpha=lr)`` cannot convert such an lr to the parameter's dtype: it raised
    from inside the update of the second group, after the first group and its states had stepped."""
    a, b = (p.detach().to(dtype).requires_grad_() for p in make_params([(3,), (2,)]))
    opt = OPTIMIZERS[kind]([{"params": [a]}, {"params": [b], "lr": lr}], foreach=foreach)
    set_grads([a, b], 0)
    before = a.detach().clone()
    with pytest.raises(ValueError, match=re.escape(f"Invalid lr: {lr} is above the largest {dtype}")):
        step(opt)
    assert torch.equal(a, before) and not opt.state


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["lstm", "meta"]),
    specs=param_specs(4).filter(lambda specs: any(torch.Size(shape).numel() for shape, _, _ in specs)),
    foreach=st.sampled_from([None, False]),
    data=st.data(),
)
def test_property_a_skipped_non_finite_gradient_steps_as_no_gradient(kind, specs, foreach, data) -> None:
    """Under ``nan_policy="skip"``, a NaN or Inf in one tensor's gradient at any step (its first
    included) is, bit for bit, that tensor having no gradient then: the others step alike."""
    steps = 3
    bad = data.draw(st.sampled_from([i for i, (shape, _, _) in enumerate(specs) if torch.Size(shape).numel()]))
    bad_step = data.draw(st.integers(0, steps - 1))
    value = data.draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
    runs = []
    for poisoned in (True, False):
        params = make_mixed_params(specs)
        opt = OPTIMIZERS[kind](params, nan_policy="skip", foreach=foreach)
        opt.chunk = 5
        for t in range(steps):
            set_grads(params, seed=t)
            if t == bad_step and poisoned:
                params[bad].grad[(0,) * params[bad].dim()] = value
            elif t == bad_step:
                params[bad].grad = None
            step(opt, 0.5 + t)
        runs.append((params, opt))
    (params, opt), (others, other) = runs
    assert_same_params_and_states(params, opt, others, other)


def test_an_adam_state_dict_is_refused_as_not_a_learned_optimizers() -> None:
    """It said "saved state of parameter 0 has {}, expected {...}", naming no cause."""
    model = torch.nn.Linear(3, 2)
    adam = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    adam.step()
    optimizer = LSTMOptimizer(model.parameters())
    with pytest.raises(ValueError, match=r"parameter 0 holds \['exp_avg', 'exp_avg_sq', 'step'\], none of this "
                       r"CoordinateLSTM rule's states \[.*'c', 'h'.*\]: it was not saved by a learned optimizer"):
        optimizer.load_state_dict(adam.state_dict())
    assert not optimizer.state


@pytest.mark.parametrize("kind", ["lstm", "meta"])
@pytest.mark.parametrize("other", ["sgd", "unstepped adam"])
def test_a_state_dict_of_another_optimizer_without_states_is_refused(kind, other) -> None:
    """SGD without momentum (or Adam before its first step) saves no states, so nothing told its
    state dict from a learned optimizer's: it loaded, and the optimizer stepped at SGD's lr."""
    model = torch.nn.Linear(3, 2)
    if other == "sgd":
        saved = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=5e-4)
        model(torch.randn(4, 3)).sum().backward()
        saved.step()
    else:
        saved = torch.optim.Adam(model.parameters())
    optimizer = OPTIMIZERS[kind](model.parameters())
    with pytest.raises(ValueError, match=r"parameter group 0 holds \[.*'lr'.*\], no 'state_dtype', and the dict no "
                       r"'learned_rule': it was not saved by a learned optimizer"):
        optimizer.load_state_dict(saved.state_dict())
    assert optimizer.param_groups[0]["lr"] == 1.0 and "betas" not in optimizer.param_groups[0]


@pytest.mark.parametrize("kind", ["lstm", "meta"])
@pytest.mark.parametrize("foreach", [False, True])
def test_an_lr_equal_to_the_parameters_dtype_largest_value_is_accepted(kind, foreach) -> None:
    """Only an lr above the dtype's largest value is refused: the largest itself converts."""
    (a,) = (p.detach().to(torch.float16).requires_grad_() for p in make_params([(3,)]))
    opt = OPTIMIZERS[kind]([a], lr=torch.finfo(torch.float16).max, foreach=foreach)
    set_grads([a], 0)
    before = a.detach().clone()
    step(opt)
    assert not torch.equal(a, before) and opt.state[a]["step"] == 1


def test_an_lr_beyond_the_dtype_of_a_parameter_not_stepped_now_is_accepted() -> None:
    """The lr is checked against the parameters it updates: a float16 parameter without a
    gradient this step (its states still in the flat buffers) does not refuse an lr of 1e5 for
    the float32 parameter that steps."""
    wide, narrow = make_params([(3,), (2,)], dtype=torch.float32)
    narrow = narrow.detach().to(torch.float16).requires_grad_()
    opt = LSTMOptimizer([wide, narrow])
    set_grads([wide, narrow], 0)
    opt.step()
    opt.param_groups[0]["lr"] = 1e5
    set_grads([wide, narrow], 1, skip={1})
    before = narrow.detach().clone()
    opt.step()
    assert torch.equal(narrow, before) and opt.state[wide]["step"] == 2 and opt.state[narrow]["step"] == 1


@pytest.mark.parametrize("given", ["closure", "keyword"])
@pytest.mark.parametrize("named", ["tuple", "dict", "list", "str", "bool", "complex", "complex64 tensor", "bool tensor"])
def test_a_loss_that_is_not_a_real_number_or_tensor_is_a_clear_error(given, named) -> None:
    """The loss MetaLSTMOptimizer reads, returned by the closure or given as ``loss=``, that is not
    a real number or tensor: a closure returning ``(loss, outputs)`` (which torch.optim's
    optimizers pass back as they are) failed with 'only one element tensors can be converted to
    Python scalars', a dict or a complex number with 'must be real number', a string with
    "new(): invalid data type 'str'", a complex tensor with clamp's NotImplementedError once
    the states were made; ``True``, a bool tensor and a one-element list were read as losses."""
    loss = {
        "tuple": lambda out: (out.mean(), out),  # a closure returning (loss, outputs)
        "dict": lambda out: {"loss": out.mean()},
        "list": lambda out: [out.mean()],
        "str": lambda out: "0.5",
        "bool": lambda out: True,
        "complex": lambda out: complex(0.5, 1.0),
        "complex64 tensor": lambda out: torch.tensor(0.5 + 1j),
        "bool tensor": lambda out: out.mean() > 0,
    }[named]
    param = torch.nn.Parameter(torch.randn(3))
    opt = MetaLSTMOptimizer([param])
    before = param.detach().clone()

    def closure():
        opt.zero_grad()
        out = param * 2
        out.sum().backward()
        return loss(out)

    source = "the closure returned" if given == "closure" else "loss= is"
    with pytest.raises(TypeError, match=rf"MetaLSTMOptimizer reads the loss .*number or a one-element real tensor; {source} an? {named}\b"):
        if given == "closure":
            opt.step(closure)
        else:
            closure()
            opt.step(loss=loss(param * 2))
    assert torch.equal(param, before) and not opt.state


def test_a_numpy_loss_is_read_as_the_number() -> None:
    """A loss given as a numpy value (``loss.item()``'s float, ``loss.detach().numpy()``) steps as the tensor."""
    import numpy as np

    runs = []
    for loss in (torch.tensor(0.5), np.float32(0.5), np.array(0.5, dtype=np.float32), 0.5):
        param = torch.nn.Parameter(torch.linspace(-1, 1, 5))
        opt = MetaLSTMOptimizer([param])
        param.grad = torch.linspace(0.5, -0.5, 5)
        opt.step(loss=loss)
        runs.append(param.detach().clone())
    assert all(torch.equal(run, runs[0]) for run in runs)


def test_the_non_finite_check_of_many_tensors_judges_each_as_isfinite_does() -> None:
    """The step checks all gradients at once (one reduction per dtype, not two ops per tensor):
    each verdict is still that tensor's own, for NaN, +Inf, -Inf, both, in every dtype, in a
    long tensor, a non-contiguous or expanded one, a 0-dim or empty one and a ``meta`` one."""
    from learnedopt.optim.learned_optimizer import _all_finite, _non_finite

    g = torch.Generator().manual_seed(0)
    tensors = []
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for bad in (None, float("nan"), float("inf"), -float("inf"), "both"):
            for n in (1, 3, 70_000):
                t = torch.randn(n, generator=g).to(dtype)
                if bad == "both":
                    t[0], t[-1] = float("inf"), float("nan")
                elif bad is not None:
                    t[n // 2] = bad
                tensors.append(t)
        tensors += [torch.empty(0, dtype=dtype), torch.tensor(float("nan"), dtype=dtype), torch.tensor(2.0, dtype=dtype)]
    t = torch.randn(4, 6, generator=g)
    t[3, 1] = float("nan")
    tensors += [t.t(), torch.tensor([float("inf")]).expand(5), torch.ones(3).expand(2, 3)]
    expected = [bool(torch.isfinite(t).all()) for t in tensors]
    assert _all_finite(tensors) == expected
    kinds = ["NaN" if torch.isnan(t).any() else "Inf" if torch.isinf(t).any() else None for t in tensors]
    assert _non_finite(tensors) == kinds
    assert sum(expected) < len(expected) - 20  # the case above really holds bad tensors
    assert _all_finite([torch.empty(3, device="meta"), tensors[1], torch.empty(2, device="meta")]) == [True, expected[1], True]


def test_finite_tensors_whose_2_norm_overflows_are_finite_and_one_nan_or_inf_among_them_is_not() -> None:
    """The NaN/Inf check reads each tensor's 2-norm, whose sum of squares overflows for finite
    values (60000 in float16, 1e30 in bfloat16 and float32, 1e200 in float64): such a tensor is
    looked at again, exactly, and judged finite; one NaN or Inf among those values is still found."""
    from learnedopt.optim.learned_optimizer import _all_finite, _non_finite

    huge = [torch.full((n,), v, dtype=d) for d, v in ((torch.float16, 6e4), (torch.bfloat16, 1e30), (torch.float32, 1e30), (torch.float64, 1e200)) for n in (2, 5000)]
    huge += [-t for t in huge]
    assert not any(torch.isfinite(n) for n in torch._foreach_norm(huge, ord=2)), "the case above really overflows the 2-norm"
    bad = []
    for t, value in zip(huge, [float("nan"), float("inf"), -float("inf")] * len(huge)):
        t = t.clone()
        t[1] = value
        bad.append(t)
    small = [torch.ones(3, dtype=t.dtype) for t in huge]
    tensors = [t for triple in zip(huge, bad, small) for t in triple]
    assert _all_finite(tensors) == [True, False, True] * len(huge)
    assert _non_finite(tensors) == [x for t in bad for x in (None, "NaN" if torch.isnan(t).any() else "Inf", None)]


@pytest.mark.parametrize("cls", [LSTMOptimizer, MetaLSTMOptimizer])
@pytest.mark.parametrize("foreach", [False, True])
def test_a_finite_gradient_or_parameter_whose_2_norm_overflows_is_stepped_not_refused(cls, foreach) -> None:
    """A float32 gradient of 1e30 values (its 2-norm overflows) is finite: nan_policy='raise'
    steps it, and 'skip' does not skip it; likewise a parameter of such values for a rule that
    reads the parameter (MetaLSTM's). One NaN in it is still refused."""
    for policy in ("raise", "skip"):
        params = make_params([(4,), (1000,)], dtype=torch.float32)
        if cls is MetaLSTMOptimizer:
            with torch.no_grad():
                params[0].fill_(1e30)
        opt = cls(params, nan_policy=policy, foreach=foreach)
        set_grads(params, 0)
        params[1].grad.fill_(1e30)
        assert not torch.isfinite(torch._foreach_norm([params[1].grad], ord=2)[0]), "the 2-norm really overflows"
        before = [p.detach().clone() for p in params]
        step(opt)
        assert all(opt.state[p] and any(v.any() for v in opt.state[p].values()) for p in params), "both were stepped"
        assert not torch.equal(params[1], before[1])
    params[1].grad[7] = float("nan")
    with pytest.raises(NonFiniteGradientError, match=r"param_groups\[0\]\['params'\]\[1\]"):
        step(cls(params, nan_policy="raise", foreach=foreach))


def test_states_current_in_their_buffers_are_checked_against_a_changed_state_spec() -> None:
    """The step skips the shape checks of states still in their flat buffers only while the
    rule's ``state_spec()`` is the one the buffers were made for: a rule whose states changed
    shape since is refused before anything is stepped."""
    from learnedopt.nn import MetaLSTMConfig, StateSpec, UpdateRule
    from learnedopt.optim import LearnedOptimizer

    class Decaying(UpdateRule):
        kind = "Decaying"
        config_class = MetaLSTMConfig  # any config dataclass; unused

        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(1))
            self.width = 2

        def state_spec(self):
            return {"h": StateSpec((1,), (self.width,))}

        def forward(self, grad, param, state, loss=None):
            return -grad * self.scale, {"h": state["h"] * 0.5 + grad[None, :, None]}

    class DecayingOptimizer(LearnedOptimizer):
        rule_kind = "Decaying"

    params = make_params([(5,), (3,)], dtype=torch.float32)
    opt = DecayingOptimizer(params, Decaying())
    set_grads(params, 0)
    opt.step()
    opt.step()
    before = [p.detach().clone() for p in params]
    opt.rule.width = 3
    with pytest.raises(ValueError, match=r"the state 'h' of param_groups\[0\]\['params'\]\[0\] \(shape \(5,\)\) has shape \(1, 5, 2\), but its 5 element\(s\) need \(1, 5, 3\)"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize("kind", ["lstm", "meta"])
@pytest.mark.parametrize("foreach", [None, False])
def test_an_expanded_parameter_is_refused_before_anything_changes(kind, foreach) -> None:
    """A parameter with stride 0 in a dimension of size > 1 (``nn.Parameter(t.expand(...))``) has
    elements that share memory, which no in-place step can update apart: torch's ``add_`` raised
    part-way through the step, after its states (and the tensors before it) had been written, so
    every later step refused to run until ``accept_partial_step()``."""
    first = torch.nn.Parameter(torch.randn(4))
    expanded = torch.nn.Parameter(torch.randn(1, 3).expand(5, 3))
    opt = OPTIMIZERS[kind]([first, expanded], foreach=foreach)
    first.grad, expanded.grad = torch.randn(4), torch.randn(5, 3)
    before = [first.detach().clone(), expanded.detach().clone()]
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[1\] .*shape \(5, 3\).* stride 0"):
        step(opt)
    assert all(torch.equal(a, b) for a, b in zip((first, expanded), before))
    assert not opt.state
    expanded.grad = None  # without it the optimizer steps as it would have
    step(opt)
    assert not torch.equal(first, before[0])


@pytest.mark.parametrize("kind", ["lstm", "meta"])
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("lr nan", r"Invalid lr: nan"),
        ("lr negative", r"Invalid lr: -1.0"),
        ("maximize string", r"Invalid maximize: 'yes'"),
        ("parameter in an earlier group", r"a parameter of param_groups\[1\] appears in an earlier parameter group"),
    ],
)
def test_a_group_changed_by_the_closure_is_checked_before_the_update(kind, change, message) -> None:
    """``step(closure)`` checked the groups before it ran the closure, so what the closure changed
    was never checked: an ``lr`` of NaN turned every parameter NaN, a negative one stepped as 0, a
    parameter appended to a second group was stepped twice. The checks now read the groups as the
    closure left them, and refuse before anything changes."""
    a, b = make_params([(3,), (4,)], dtype=torch.float32)
    opt = OPTIMIZERS[kind]([{"params": [a]}, {"params": [b]}])
    set_grads([a, b], seed=0)
    step(opt)
    reference = [p.detach().clone() for p in (a, b)]
    states = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in (a, b)}

    def closure():
        group = opt.param_groups[1]
        if change == "lr nan":
            group["lr"] = float("nan")
        elif change == "lr negative":
            group["lr"] = -1.0
        elif change == "maximize string":
            group["maximize"] = "yes"
        else:
            group["params"].append(a)
        set_grads([a, b], seed=1)
        return torch.tensor(0.5)

    with pytest.raises(ValueError, match=message):
        opt.step(closure)
    for p, before in zip((a, b), reference, strict=True):
        assert torch.equal(p, before)
        assert all(torch.equal(v, states[id(p)][k]) for k, v in opt.state[p].items())


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_a_float8_loss_is_read_as_its_value(dtype) -> None:
    """A one-element float8 tensor is a real loss, but torch has no ``isfinite`` or promotion for
    float8: the step failed with ``NotImplementedError`` (e4m3fn) or a promotion ``RuntimeError``
    (e5m2). It is read as its value, exactly, as the float32 tensor of that value."""
    runs = []
    for loss in (torch.tensor(0.5), torch.tensor(0.5).to(dtype)):
        param = torch.nn.Parameter(torch.linspace(-1, 1, 5))
        opt = MetaLSTMOptimizer([param])
        param.grad = torch.linspace(0.5, -0.5, 5)
        opt.step(loss=loss)
        runs.append(param.detach().clone())
    assert torch.equal(runs[1], runs[0])
    assert not torch.equal(runs[0], torch.linspace(-1, 1, 5))


def test_a_loss_on_the_meta_device_beside_real_parameters_is_a_clear_error() -> None:
    """A meta tensor holds no value: given as the loss of real parameters (made under a leftover
    ``with torch.device("meta")``) the step failed with torch's bare "Cannot copy out of meta
    tensor; no data!". It is refused in one line naming the loss, before anything changes."""
    a, b = make_params([(3,), (4,)], dtype=torch.float32)
    opt = MetaLSTMOptimizer([{"params": [a]}, {"params": [b], "lr": 0.5}])
    set_grads([a, b], seed=0)
    before = [p.detach().clone() for p in (a, b)]
    with pytest.raises(ValueError, match=r"^the loss given to MetaLSTMOptimizer.step is a tensor on the meta device"):
        opt.step(loss=torch.tensor(1.0, device="meta"))
    assert all(torch.equal(p, q) for p, q in zip((a, b), before, strict=True))
    opt.step(loss=torch.tensor(1.0))
    assert int(opt.state[a]["step"]) == 1


@pytest.mark.parametrize("huge", [10**400, -(10**400), __import__("fractions").Fraction(10**400, 3)], ids=["int", "negative int", "Fraction"])
def test_a_number_loss_beyond_float64_saturates_as_a_finite_loss_does(huge) -> None:
    """A finite loss beyond the math dtype's range saturates at its largest value (README,
    ``state_dtype``); a Python int or Fraction beyond float64's failed with a bare
    ``OverflowError`` ("int too large to convert to float"). It steps as the largest float64 of
    its sign."""
    largest = torch.finfo(torch.float64).max
    runs = []
    for loss in (huge, largest if huge > 0 else -largest):
        param = torch.nn.Parameter(torch.linspace(-1, 1, 5))
        opt = MetaLSTMOptimizer([param])
        param.grad = torch.linspace(0.5, -0.5, 5)
        opt.step(loss=loss)
        runs.append(param.detach().clone())
    assert torch.equal(runs[0], runs[1]) and bool(runs[0].isfinite().all())
