"""An update rule of the user's own (an ``UpdateRule`` subclass) in the library's machinery: the
optimizer's paths, state dicts, weight files and the registry, and the unroll's meta-gradient."""

from __future__ import annotations

import copy
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from helpers import central_difference
from torch import nn

from learnedopt import CoordinateLSTM, LSTMOptimizer, MetaLSTMOptimizer, UpdateRule, load_weights, save_weights
from learnedopt import kernels
from learnedopt.meta import Task, TaskFamily, num_coordinates, unroll
from learnedopt.nn import RULES, StateSpec, register_rule
from learnedopt.optim import LearnedOptimizer


@dataclass(frozen=True)
class MomentumConfig:
    beta: float = 0.9
    lead: tuple[int, ...] = (1,)  # the momentum state's leading dimensions
    trail: tuple[int, ...] = ()


class LearnedMomentum(UpdateRule):
    """``m = beta * m + g``, step ``-lr * m`` with a learned ``lr``; the momentum is stored
    repeated over the state's ``lead`` and ``trail`` dimensions (every copy the same)."""

    kind = "TestLearnedMomentum"
    config_class = MomentumConfig

    def __init__(self, config: MomentumConfig | None = None, **overrides) -> None:  # noqa: ANN003
        super().__init__(config, **overrides)
        self.lr = nn.Parameter(torch.tensor(0.1))

    def state_spec(self) -> dict[str, StateSpec]:
        return {"m": StateSpec(self.config.lead, self.config.trail)}

    def forward(self, grad, param, state, loss=None):  # noqa: ANN001, ANN201
        dim = len(self.config.lead)
        m = self.config.beta * state["m"] + grad.reshape((1,) * dim + (-1,) + (1,) * len(self.config.trail))
        first = m[(0,) * dim].reshape(grad.shape[0], -1)[:, 0]  # (n,): one copy
        return -self.lr * first, {"m": m}


class LossGatedSGD(UpdateRule):
    """``step = -exp(a) * sigmoid(b * log(loss)) * grad``: reads the loss, keeps no state."""

    kind = "TestLossGatedSGD"
    needs_loss = True
    config_class = MomentumConfig  # unused

    def __init__(self, config: MomentumConfig | None = None, **overrides) -> None:  # noqa: ANN003
        super().__init__(config, **overrides)
        self.ab = nn.Parameter(torch.tensor([-1.0, 0.5]))

    def state_spec(self) -> dict[str, StateSpec]:
        return {}

    def forward(self, grad, param, state, loss=None):  # noqa: ANN001, ANN201
        gate = torch.sigmoid(self.ab[1] * torch.log(loss.reshape(())))
        return -torch.exp(self.ab[0]) * gate * grad, {}


class MomentumOptimizer(LearnedOptimizer):
    rule_kind = LearnedMomentum.kind


class LossGatedOptimizer(LearnedOptimizer):
    rule_kind = LossGatedSGD.kind


@pytest.fixture
def rules_registry() -> Iterator[dict]:
    """``RULES``, restored after the test to what it held before, whatever the test registered."""
    saved = dict(RULES)
    yield RULES
    RULES.clear()
    RULES.update(saved)


def _train(optimizer_class, rule, steps, *, foreach=None, chunk=None, state=None, model=None):  # noqa: ANN001, ANN202
    """``steps`` steps on a small regression model (a fixed one unless ``model``), two groups."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, generator=gen), torch.randn(16, 2, generator=gen)
    if model is None:
        model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
    groups = [{"params": model[0].parameters(), "lr": 0.5}, {"params": model[2].parameters()}]
    optimizer = optimizer_class(groups, weights=rule, foreach=foreach)
    if chunk is not None:
        optimizer.chunk = chunk
    if state is not None:
        optimizer.load_state_dict(state)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step(loss=loss)
    return model, optimizer


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize(("lead", "trail"), [((), ()), ((1,), ()), ((2, 3), (2,))])
def test_own_rule_paths_agree_and_resume_bit_for_bit(lead, trail) -> None:  # noqa: ANN001
    """A state of no leading dimension (``StateSpec(())``, an ``(n,)`` momentum) or of several:
    the batched path (which raised IndexError for ``()``) equals the per-tensor one, in chunks
    that span tensors too, and a saved state dict resumes bit for bit."""
    rule = LearnedMomentum(lead=lead, trail=trail)
    reference, _ = _train(MomentumOptimizer, rule, 6, foreach=False)
    batched, _ = _train(MomentumOptimizer, rule, 6)
    chunked, _ = _train(MomentumOptimizer, rule, 6, chunk=7)
    assert _same(reference, batched) and _same(reference, chunked)
    half, optimizer = _train(MomentumOptimizer, rule, 3)
    assert optimizer.state_dict()["state"][0]["m"].shape == (*lead, 5, 3, *trail)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    resumed, _ = _train(MomentumOptimizer, rule, 3, state=torch.load(buffer, weights_only=True), model=half)
    assert _same(resumed, batched)


def test_plain_momentum_as_own_rule_matches_torch_sgd() -> None:
    """The ``(n,)`` momentum rule is SGD with momentum, to rounding."""
    params = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(7))]
    ours = [nn.Parameter(p.detach().clone()) for p in params]
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    learned = MomentumOptimizer(ours, weights=LearnedMomentum(lead=()))
    for _ in range(4):
        for p, q in zip(params, ours, strict=True):
            p.grad = torch.sin(p.detach())
            q.grad = torch.sin(q.detach())
        sgd.step()
        learned.step()
    for p, q in zip(params, ours, strict=True):
        torch.testing.assert_close(q, p)


def test_stateless_rule_that_reads_the_loss_resumes_and_copies() -> None:
    """A rule without per-coordinate states saves only ``step``; its own state dict loads (it was
    refused as 'not saved by a learned optimizer') and resumes bit for bit; copies continue alike."""
    rule = LossGatedSGD()
    whole, _ = _train(LossGatedOptimizer, rule, 6)
    reference, _ = _train(LossGatedOptimizer, rule, 6, foreach=False)
    assert _same(whole, reference)
    half, optimizer = _train(LossGatedOptimizer, rule, 3)
    assert set(optimizer.state_dict()["state"][0]) == {"step"}
    resumed, _ = _train(LossGatedOptimizer, rule, 3, state=optimizer.state_dict(), model=half)
    assert _same(resumed, whole)
    with pytest.raises(ValueError, match=r"LossGatedOptimizer\.step needs the loss"):
        optimizer.step()
    model_copy, optimizer_copy = copy.deepcopy((resumed, optimizer))
    assert optimizer_copy.rule is not rule and isinstance(optimizer_copy.rule, LossGatedSGD)
    x = torch.randn(4, 3)
    for model, opt in ((resumed, optimizer), (model_copy, optimizer_copy)):
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        opt.step(loss=loss)
    assert _same(resumed, model_copy)


def test_own_rule_meta_gradient_equals_finite_differences() -> None:
    """Through ``unroll`` (exact meta-gradient, float64), the own rules' meta-gradient matches
    central differences on a tiny quadratic."""

    class Quadratic(Task):
        def __init__(self, scale: torch.Tensor, target: torch.Tensor) -> None:
            self.scale, self.target = scale, target

        def init_params(self, generator):  # noqa: ANN001, ANN201
            return {"x": torch.zeros(3, dtype=torch.float64)}

        def loss(self, params, step_index):  # noqa: ANN001, ANN201
            return 0.5 * (self.scale * (params["x"] - self.target) ** 2).sum() + 0.1

    class Quadratics(TaskFamily):
        name = "quadratics"

        def sample(self, generator):  # noqa: ANN001, ANN201
            return Quadratic(torch.rand(3, generator=generator, dtype=torch.float64) + 0.5,
                             torch.randn(3, generator=generator, dtype=torch.float64))  # fmt: skip

        def describe(self) -> str:
            return "3-dimensional quadratics"

    gen = torch.Generator().manual_seed(0)
    tasks = Quadratics().sample_batch(2, gen)
    params = tasks.init_params(gen)
    for rule in (LearnedMomentum(lead=()).double(), LossGatedSGD().double()):

        def meta_loss(rule=rule) -> torch.Tensor:  # noqa: ANN001
            state = rule.init_state(num_coordinates(params), dtype=torch.float64, device="cpu")
            return unroll(rule, tasks, params, state, 4, stop_optimizee_grad=False).meta_loss

        meta_loss().backward()
        for weight in rule.parameters():
            assert weight.grad is not None and weight.grad.abs().sum() > 0
            numeric = central_difference(lambda: meta_loss().item(), weight)
            assert weight.grad.view(-1).tolist() == pytest.approx(numeric.view(-1).tolist(), rel=1e-6)


def test_own_rule_weight_files_load_once_registered(tmp_path, rules_registry) -> None:  # noqa: ANN001
    rule = LearnedMomentum(beta=0.5)
    with torch.no_grad():
        rule.lr.fill_(0.25)
    path = tmp_path / "momentum.safetensors"
    save_weights(rule, path, trained_on="nothing")
    recorded = f"{LearnedMomentum.__module__}:LearnedMomentum"  # where its class imports from
    with pytest.raises(ValueError, match=r"unknown update rule kind 'TestLearnedMomentum'.*register_rule\(YourRule\); "
                                         rf"this file records its class as {re.escape(recorded)}\)$"):  # fmt: skip
        load_weights(path)
    assert register_rule(LearnedMomentum) is LearnedMomentum
    register_rule(LearnedMomentum)  # again: no error
    loaded, header = load_weights(path)
    assert type(loaded) is LearnedMomentum and loaded.config == rule.config and loaded.lr.item() == 0.25
    assert MomentumOptimizer([nn.Parameter(torch.zeros(2))], weights=path).rule.config.beta == 0.5
    with pytest.raises(ValueError, match=r"LSTMOptimizer runs a CoordinateLSTM update rule, but the weights given .*"
                                         r"are a TestLearnedMomentum \(a rule of your own runs in a subclass of "
                                         r"learnedopt\.optim\.LearnedOptimizer with rule_kind = 'TestLearnedMomentum'\)"):  # fmt: skip
        LSTMOptimizer([nn.Parameter(torch.zeros(2))], weights=path)

    class Impostor(LearnedMomentum):
        kind = "TestLearnedMomentum"

    with pytest.raises(ValueError, match=r"rule kind 'TestLearnedMomentum' is already .*LearnedMomentum's: give Impostor"):
        register_rule(Impostor)
    with pytest.raises(ValueError, match="is already .*CoordinateLSTM's"):
        register_rule(type("CoordinateLSTMVariant", (LearnedMomentum,), {"kind": "CoordinateLSTM"}))
    with pytest.raises(TypeError, match="must set its own kind"):
        register_rule(type("NoKind", (LearnedMomentum,), {}))
    with pytest.raises(TypeError, match="takes an UpdateRule subclass"):
        register_rule(nn.Linear)
    assert RULES["TestLearnedMomentum"] is LearnedMomentum and RULES["CoordinateLSTM"] is CoordinateLSTM


def test_optimizer_classes_without_a_rule_kind_or_default_weights_say_so() -> None:
    params = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(TypeError, match="LearnedOptimizer sets no rule_kind: use LSTMOptimizer or MetaLSTMOptimizer"):
        LearnedOptimizer(params, weights=LearnedMomentum())
    with pytest.raises(ValueError, match="MomentumOptimizer has no default weights: pass weights="):
        MomentumOptimizer(params)
    with pytest.raises(ValueError, match=r"MetaLSTMOptimizer runs a MetaLSTMCell update rule, but the weights given are a "
                                         r"TestLossGatedSGD \(a rule of your own"):  # fmt: skip
        MetaLSTMOptimizer(params, weights=LossGatedSGD())


class HalvedLSTM(CoordinateLSTM):
    """A variant of the library's rule that keeps its kind: the paper's LSTM, half its step."""

    def forward(self, grad, param, state, loss=None):  # noqa: ANN001, ANN201
        step, new_state = super().forward(grad, param, state, loss)
        return 0.5 * step, new_state


def test_subclass_keeping_a_library_kind_is_not_saved_as_that_rule(tmp_path) -> None:  # noqa: ANN001
    """Its file would load as a plain CoordinateLSTM, another rule than the one saved."""
    with pytest.raises(ValueError, match=r"HalvedLSTM has the kind 'CoordinateLSTM' of CoordinateLSTM, so its file would "
                                         r"load as a CoordinateLSTM: give HalvedLSTM a kind of its own"):  # fmt: skip
        save_weights(HalvedLSTM(), tmp_path / "halved.safetensors")
    assert not (tmp_path / "halved.safetensors").exists()


@pytest.mark.skipif(not kernels.FUSED_UPDATES_AVAILABLE, reason="needs Triton")
def test_subclass_of_a_library_rule_is_not_run_by_its_kernel() -> None:
    """The kernels run CoordinateLSTM's own math, not a subclass's forward (a half step): both the
    optimizer and the unroll refuse backend='triton' for it (the optimizer took twice the step)."""
    params = [nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match=r"fused kernels only for CoordinateLSTM and MetaLSTMCell; this optimizer runs "
                                         r"HalvedLSTM \(kind CoordinateLSTM\)"):  # fmt: skip
        LSTMOptimizer(params, weights=HalvedLSTM(), backend="triton")
    from learnedopt.meta.unroll import _triton_problems

    problems = _triton_problems(HalvedLSTM(), torch.zeros(3), torch.zeros(3), {})
    assert problems == ["the kernels implement only CoordinateLSTM and MetaLSTMCell, not HalvedLSTM"]


def test_own_rule_takes_the_optimizer_options_and_pickles() -> None:
    """``maximize`` (the rule sees ``-grad``), ``nan_policy='skip'``, a ``state_dtype`` and a
    pickle round trip, on the ``(n,)`` momentum rule that is SGD with momentum."""
    import pickle

    params = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(7))]
    ours = [nn.Parameter(p.detach().clone()) for p in params]
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9, maximize=True)
    learned = MomentumOptimizer(ours, weights=LearnedMomentum(lead=()), maximize=True, nan_policy="skip",
                                state_dtype=torch.float64)  # fmt: skip
    for step in range(4):
        if step == 2:  # pickled mid-run: the copy continues as the original would
            ours_copy, learned_copy = pickle.loads(pickle.dumps((ours, learned)))
        for p, q in zip(params, ours, strict=True):
            p.grad = torch.sin(p.detach())
            q.grad = torch.sin(q.detach())
        sgd.step()
        learned.step()
    assert learned.state[ours[0]]["m"].dtype == torch.float64
    for p, q in zip(params, ours, strict=True):
        torch.testing.assert_close(q, p)
    for step in (2, 3):
        for q in ours_copy:
            q.grad = torch.sin(q.detach())
        learned_copy.step()
    assert all(torch.equal(a, b) for a, b in zip(ours, ours_copy, strict=True))
    ours[0].grad = torch.full((4, 3), float("nan"))
    ours[1].grad = torch.ones(7)
    before = [q.detach().clone() for q in ours]
    learned.step()  # the NaN tensor is skipped, the other steps
    assert torch.equal(ours[0], before[0]) and not torch.equal(ours[1], before[1])


def test_the_rules_of_the_library_and_these_pass_the_check_of_a_first_forward() -> None:
    """``check_rule_call``, which ``meta-train --rule`` and ``evaluate optimizers --rules`` run on a
    rule of one's own, refuses none that keeps the contract (states with lead and trail
    dimensions, a rule reading the loss)."""
    from learnedopt.nn.base import check_rule_call
    from learnedopt.weights import PRESETS, build_preset

    rules = [LearnedMomentum(lead=(2,), trail=(3,)), LossGatedSGD(), *(build_preset(name)[0] for name in sorted(PRESETS))]
    for rule in rules:
        check_rule_call(rule)


class SwitchedAverage(LearnedMomentum):
    """:class:`LearnedMomentum` whose momentum is marked a moving average (stored in at least
    float32) only while ``average`` is set: its ``state_spec`` changes a dtype, not a name or a shape."""

    kind = "TestSwitchedAverage"
    average = False

    def state_spec(self) -> dict[str, StateSpec]:
        return {"m": StateSpec(self.config.lead, self.config.trail, moving_average=self.average)}


class SwitchedAverageOptimizer(LearnedOptimizer):
    rule_kind = SwitchedAverage.kind


@pytest.mark.parametrize("foreach", [False, True])
def test_a_state_spec_that_changes_only_a_dtype_remakes_the_states(foreach) -> None:  # noqa: ANN001
    """The flat buffers were kept while the states' names and shapes were the same, so a state
    the rule's ``state_spec`` now stores in float32 (``moving_average``) stayed in the group's
    bfloat16 (and back), unlike a state after a change of the group's ``state_dtype``."""
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    optimizer = SwitchedAverageOptimizer(model.parameters(), weights=SwitchedAverage(lead=()), foreach=foreach,
                                         state_dtype=torch.bfloat16)  # fmt: skip
    for average, expected in ((False, torch.bfloat16), (True, torch.float32), (False, torch.bfloat16)):
        optimizer.rule.average = average
        optimizer.zero_grad()
        model(x).square().sum().backward()
        optimizer.step()
        assert {optimizer.state[p]["m"].dtype for p in model.parameters()} == {expected}, average


class ScaledMomentum(LearnedMomentum):
    """:class:`LearnedMomentum` holding tensors its ``state_dict`` does not: a non-persistent
    buffer and a plain tensor attribute, both set by its constructor."""

    kind = "TestScaledMomentum"

    def __init__(self, config: MomentumConfig | None = None, **overrides) -> None:  # noqa: ANN003
        super().__init__(config, **overrides)
        self.register_buffer("scale", torch.full((2,), 3.0), persistent=False)
        self.offset = torch.tensor([0.5, 1.5])


class MetaShy(LearnedMomentum):
    """:class:`LearnedMomentum` whose constructor reads a value, which the meta device has not."""

    kind = "TestMetaShy"

    def __init__(self, config: MomentumConfig | None = None, **overrides) -> None:  # noqa: ANN003
        super().__init__(config, **overrides)
        self.half = torch.ones(()).item() / 2


def test_own_rules_that_hold_more_than_their_state_dict_or_shun_the_meta_device_load(tmp_path, rules_registry) -> None:  # noqa: ANN001
    """A loaded rule is constructed on the meta device and its weights filled from the file; a
    rule with tensors outside its ``state_dict`` (they would hold no values) or whose constructor
    fails there is constructed on the CPU, with its constructor's values."""
    for cls in (ScaledMomentum, MetaShy):
        register_rule(cls)
        rule = cls(beta=0.5)
        with torch.no_grad():
            rule.lr.fill_(0.25)
        save_weights(rule, tmp_path / f"{cls.kind}.safetensors")
        loaded, _ = load_weights(tmp_path / f"{cls.kind}.safetensors")
        assert type(loaded) is cls and loaded.lr.item() == 0.25
    assert torch.equal(loaded.lr, rule.lr) and loaded.half == 0.5
    scaled, _ = load_weights(tmp_path / "TestScaledMomentum.safetensors")
    assert torch.equal(scaled.scale, torch.full((2,), 3.0)) and torch.equal(scaled.offset, torch.tensor([0.5, 1.5]))


class SmallestGradient(UpdateRule):
    """``step = -lr * sign(g) * low`` with ``low`` the smallest ``|g|`` so far, started at +Inf:
    a state that legitimately holds Inf (before a coordinate's first step), where it declares
    so (``StateSpec(..., finite=False)``)."""

    kind = "TestSmallestGradient"
    config_class = MomentumConfig  # unused
    finite = False

    def __init__(self, config: MomentumConfig | None = None, **overrides) -> None:  # noqa: ANN003
        super().__init__(config, **overrides)
        self.lr = nn.Parameter(torch.tensor(0.1))

    def state_spec(self) -> dict[str, StateSpec]:
        return {"low": StateSpec((), finite=self.finite)}

    def init_state(self, n, *, dtype, device):  # noqa: ANN001, ANN201
        return {"low": torch.full((n,), float("inf"), dtype=dtype, device=device)}

    def forward(self, grad, param, state, loss=None):  # noqa: ANN001, ANN201
        low = torch.minimum(state["low"], grad.abs())
        return -self.lr * grad.sign() * low, {"low": low}


class SmallestGradientOptimizer(LearnedOptimizer):
    rule_kind = SmallestGradient.kind


class SmallestGradientSaidFinite(SmallestGradient):  # keeps the kind, but says its state is finite
    finite = True


def test_own_rule_state_declared_not_finite_loads_inf_but_not_nan() -> None:
    """``load_state_dict`` refuses NaN in any state, and Inf in a state the rule declares finite
    (``StateSpec.finite``, True by default); a rule whose state may hold Inf declares it."""
    params = [nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(3))]
    opt = SmallestGradientOptimizer(params, weights=SmallestGradient())
    opt.init_state()  # +Inf, as before a first step
    params[0].grad = torch.randn(4)
    opt.step()  # the first parameter's states are finite now, the second's still +Inf
    saved = copy.deepcopy(opt.state_dict())
    assert torch.isinf(saved["state"][1]["low"]).all()
    others = [nn.Parameter(p.detach().clone()) for p in params]
    loaded = SmallestGradientOptimizer(others, weights=SmallestGradient())
    loaded.load_state_dict(saved)
    for ps, o in ((params, opt), (others, loaded)):
        for p in ps:
            p.grad = torch.ones_like(p)
        o.step()
    assert all(torch.equal(p, q) for p, q in zip(params, others, strict=True))
    said_finite = SmallestGradientOptimizer(others, weights=SmallestGradientSaidFinite())
    with pytest.raises(ValueError, match=r"^saved state \['low'\] of parameter 1 \(param_groups\[0\]\['params'\]\[1\], "
                                         r"shape \(3,\)\) holds Inf, which .*finite=False"):  # fmt: skip
        said_finite.load_state_dict(saved)
    assert not said_finite.state
    saved["state"][1]["low"][0] = float("nan")
    with pytest.raises(ValueError, match=r"^saved state \['low'\] of parameter 1 \(.*\) holds NaN"):
        SmallestGradientOptimizer(others, weights=SmallestGradient()).load_state_dict(saved)


class TiedMomentum(LearnedMomentum):
    """:class:`LearnedMomentum` with a weight shared by two layers (one ``nn.Parameter`` under two
    names, as a tied embedding is), which its step reads through both."""

    kind = "TestTiedMomentum"

    def __init__(self, config: MomentumConfig | None = None, **overrides) -> None:  # noqa: ANN003
        super().__init__(config, **overrides)
        self.first = nn.Linear(1, 1, bias=False)
        self.second = nn.Linear(1, 1, bias=False)
        self.second.weight = self.first.weight

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            self.lr.fill_(0.1)
            self.first.weight.uniform_(0.5, 1.0, generator=generator)

    def forward(self, grad, param, state, loss=None):  # noqa: ANN001, ANN201
        step, new_state = super().forward(grad, param, state, loss)
        return self.second(self.first(step.reshape(-1, 1))).reshape(step.shape), new_state


def test_an_own_rule_with_a_weight_shared_by_two_layers_keeps_it_shared(rules_registry) -> None:  # noqa: ANN001
    """Built on the meta device and allocated (``to_empty``), a rule's tied weight became two
    independent ones (``Module._apply`` makes a new parameter per module): built blank (a
    ``--rule-config`` check, a loaded file) or seeded as meta-train's initial rule, it was
    meta-trained as two weights, one more than its author's."""
    from learnedopt.weights import blank_rule, seeded_rule

    register_rule(TiedMomentum)
    rule = TiedMomentum(beta=0.5)
    rule.reset_parameters(torch.Generator().manual_seed(0))
    seeded = seeded_rule(TiedMomentum, {"beta": 0.5}, torch.Generator().manual_seed(0))
    for built in (blank_rule(TiedMomentum, {"beta": 0.5}), seeded):
        assert built.second.weight is built.first.weight
        assert len(list(built.parameters())) == len(list(rule.parameters()))
    assert torch.equal(seeded.first.weight, rule.first.weight)


def test_an_own_rule_with_a_weight_shared_by_two_layers_is_saved_loaded_and_averaged(tmp_path, rules_registry) -> None:  # noqa: ANN001
    """save_weights failed in safetensors ("Some tensors share memory") for a rule whose weight
    is one tensor under two state_dict names: no file of it could be written (nor meta-train's
    weights). Saved, it loads with the weight shared and steps bit for bit as it did; its
    SHA-256 is that of the rule saved; two such files average."""
    from learnedopt.weights import average_weights, fingerprint

    register_rule(TiedMomentum)
    rules = []
    for seed in (0, 1):
        rule = TiedMomentum(beta=0.5)
        rule.reset_parameters(torch.Generator().manual_seed(seed))
        save_weights(rule, tmp_path / f"tied{seed}.safetensors")
        rules.append(rule)
    loaded, _ = load_weights(tmp_path / "tied0.safetensors")
    assert loaded.second.weight is loaded.first.weight and len(list(loaded.parameters())) == 2
    state = loaded.state_dict()
    assert state["first.weight"].data_ptr() == state["second.weight"].data_ptr()
    assert fingerprint(loaded) == fingerprint(rules[0])
    grad, param = torch.randn(5, generator=torch.Generator().manual_seed(2)), torch.zeros(5)
    m = {"m": torch.randn(1, 5, generator=torch.Generator().manual_seed(3))}
    for got, want in zip(loaded(grad, param, m), rules[0](grad, param, m), strict=True):
        assert all(torch.equal(a, b) for a, b in zip(pytree_leaves(got), pytree_leaves(want), strict=True))
    average, members = average_weights([tmp_path / "tied0.safetensors", tmp_path / "tied1.safetensors"])
    assert average.second.weight is average.first.weight
    mean = (rules[0].first.weight.double() + rules[1].first.weight.double()) / 2
    assert torch.equal(average.first.weight, mean.float())
    assert sorted(m["sha256"] for m in members) == sorted(fingerprint(r)["sha256"] for r in rules)


def test_a_file_whose_tied_keys_hold_different_values_is_refused(tmp_path, rules_registry) -> None:  # noqa: ANN001
    """A file (edited, or written by other means) whose two keys of one tied tensor hold
    different values loaded silently with the last key's value; it is refused, naming the keys.
    A file whose tied keys agree loads as before."""
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    register_rule(TiedMomentum)
    rule = TiedMomentum(beta=0.5)
    rule.reset_parameters(torch.Generator().manual_seed(0))
    path = tmp_path / "tied.safetensors"
    save_weights(rule, path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    tensors["second.weight"] = tensors["first.weight"] + 1.0
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(ValueError, match=r"^\S*tied\.safetensors: .*'first\.weight'.*'second\.weight'.*different values") as err:
        load_weights(path)
    assert "\n" not in str(err.value)
    tensors["second.weight"] = tensors["first.weight"].clone()
    save_file(tensors, path, metadata=metadata)
    loaded, _ = load_weights(path)
    assert torch.equal(loaded.first.weight, rule.first.weight) and loaded.second.weight is loaded.first.weight


def pytree_leaves(value):  # noqa: ANN001, ANN201
    """The tensors of a rule's output (a step, a dict of states)."""
    return [value] if isinstance(value, torch.Tensor) else [value[k] for k in sorted(value)]
