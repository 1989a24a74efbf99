"""Reptile: the update against its definition, annealing, learned inner optimizers."""

import collections
import copy
import re

import pytest
import torch
from helpers import random_rule
from torch import nn

from learnedopt import LSTMOptimizer, MetaLSTMOptimizer
from learnedopt.meta.reptile import Reptile


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def tasks(count=3, batches=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        [(torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (8,), generator=g)) for _ in range(batches)]
        for _ in range(count)
    ]


def sgd_run(start: nn.Module, batches, steps, lr):
    net = copy.deepcopy(start)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    for t in range(steps):
        x, y = batches[t % len(batches)]
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return [p.detach() for p in net.parameters()]


def test_update_matches_definition() -> None:
    net = model()
    theta = [p.detach().clone() for p in net.parameters()]
    data = tasks()
    reptile = Reptile(net, inner_steps=5, inner_optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), outer_stepsize=0.3)
    phis = [sgd_run(model(), batches, 5, 0.1) for batches in data]
    eps = reptile.meta_step(data)
    assert eps == 0.3
    for i, p in enumerate(net.parameters()):
        expected = theta[i] + 0.3 * torch.stack([phi[i] - theta[i] for phi in phis]).mean(0)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-12)


def test_outer_stepsize_is_annealed_linearly_and_resumes() -> None:
    reptile = Reptile(model(), inner_steps=1, outer_stepsize=1.0, final_outer_stepsize=0.2, total_steps=4)
    used = [reptile.meta_step(tasks(1, 1, seed=s)) for s in range(6)]
    assert used == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2, 0.2])
    again = Reptile(model(), inner_steps=1, outer_stepsize=1.0, final_outer_stepsize=0.2, total_steps=4)
    again.load_state_dict({"step_count": 2})
    assert again.current_outer_stepsize() == pytest.approx(0.6)


def test_adapt_runs_the_steps_it_is_given() -> None:
    data = tasks(1, batches=2)[0]
    reptile = Reptile(model(), inner_steps=1, inner_optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    one = [p.detach().clone() for p in reptile.adapt(data, steps=1).parameters()]
    three = [p.detach().clone() for p in reptile.adapt(data, steps=3).parameters()]
    for got, expected in zip(three, sgd_run(model(), data, 3, 0.1), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert all(not torch.equal(a, b) for a, b in zip(one, three, strict=True))
    default = [p.detach() for p in reptile.adapt(data).parameters()]
    assert all(torch.equal(a, b) for a, b in zip(default, one, strict=True))  # steps=None: inner_steps


def test_adapt_under_no_grad_and_inference_mode_trains_as_outside() -> None:
    """Under ``torch.inference_mode()`` (evaluation, as MAML.adapt allows) the copy's loss had no
    graph: 'element 0 of tensors does not require grad and does not have a grad_fn'."""
    data = tasks(1, batches=2)[0]
    reptile = Reptile(model(), inner_steps=3, inner_optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    expected = sgd_run(model(), data, 3, 0.1)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            inside = [(x.clone(), y.clone()) for x, y in data]  # inference tensors, under inference_mode
            worker = reptile.adapt(inside)
        for got, want in zip(worker.parameters(), expected, strict=True):
            torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-12)


class Targets(dict):
    """A dict subclass of the user's own, which ``torch.utils._pytree`` does not enter either."""


@pytest.mark.parametrize("mapping", [collections.UserDict, Targets])
def test_adapt_under_inference_mode_takes_targets_in_a_user_dict(mapping: type) -> None:
    """Targets in a ``collections.UserDict`` or a dict subclass (``torch.utils._pytree`` enters
    neither) made under ``inference_mode`` are copied out of it too, and ``loss_fn`` gets the
    mapping's type as given: autograd raised "Inference tensors cannot be saved for backward"
    (for a dict subclass still after the UserDict's was fixed)."""
    data = tasks(1, batches=2)[0]
    seen = set()

    def loss_fn(outputs, targets):
        seen.add(type(targets))
        return nn.functional.cross_entropy(outputs, targets["labels"])

    reptile = Reptile(model(), inner_steps=3, inner_optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), loss_fn=loss_fn)
    with torch.inference_mode():
        inside = [(x.clone(), mapping(labels=y.clone())) for x, y in data]
        worker = reptile.adapt(inside)
    assert seen == {mapping}
    for got, want in zip(worker.parameters(), sgd_run(model(), data, 3, 0.1), strict=True):
        torch.testing.assert_close(got.detach(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make", [lambda p: LSTMOptimizer(p), lambda p: MetaLSTMOptimizer(p)], ids=["lstm", "meta-lstm"])
def test_learned_inner_optimizers_work(make) -> None:
    net = model().float()
    data = [[(x.float(), y) for x, y in batches] for batches in tasks()]
    before = [p.detach().clone() for p in net.parameters()]
    Reptile(net, inner_steps=3, inner_optimizer=make).meta_step(data)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert all(torch.isfinite(p).all() for p in net.parameters())


@pytest.mark.parametrize("kind", ["lstm", "meta"])
@pytest.mark.parametrize("tied", [False, True])
def test_update_with_a_learned_inner_rule_is_the_mean_of_hand_written_learned_steps(kind: str, tied: bool) -> None:
    """With a learned optimizer inside (a random float64 rule, ``lr`` 0.5, its states float64),
    each task's trained weights are ``learned_step`` run by hand from the initialisation on the
    task's batches in turn (the loss the rule reads too), and the update is
    ``theta + eps * mean_i(phi_i - theta)``; also for a weight shared by two layers, which moves
    once per step with the sum of its two gradients."""
    from torch.func import functional_call

    from learnedopt.meta import init_rule_state, learned_step

    def net() -> nn.Module:
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)).double()
        if tied:
            m[2].weight = m[0].weight
        return m

    def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (outputs - targets).square().mean()

    rule = random_rule(kind, seed=3)
    make = LSTMOptimizer if kind == "lstm" else MetaLSTMOptimizer
    model = net()
    reptile = Reptile(model, inner_steps=3, inner_optimizer=lambda p: make(p, weights=rule, lr=0.5, state_dtype=torch.float64),
                      outer_stepsize=0.5, loss_fn=mse)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    data = [[tuple(torch.randn(5, n, generator=g, dtype=torch.float64) for n in (3, 2)) for _ in range(2)] for _ in range(2)]
    reference = net()
    theta = {k: v.detach().clone() for k, v in reference.named_parameters()}
    phis = []
    for batches in data:
        current = dict(theta)
        state = init_rule_state(rule, current)
        for t in range(3):
            x, y = batches[t % len(batches)]
            leaves = {k: v.detach().requires_grad_(True) for k, v in current.items()}
            loss = mse(functional_call(reference, leaves, (x,)), y)
            grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))
            with torch.no_grad():
                current, state = learned_step(rule, leaves, grads, state, loss=loss.detach(), lr=0.5)
        phis.append(current)
    reptile.meta_step(data)
    assert list(dict(model.named_parameters())) == list(theta)
    for name, p in model.named_parameters():
        moves = torch.stack([phi[name] - theta[name] for phi in phis])
        assert moves.abs().max() > 1e-3, name  # the rule moves every tensor
        torch.testing.assert_close(p.detach(), theta[name] + 0.5 * moves.mean(0), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("make", [None, lambda p: LSTMOptimizer(p), lambda p: MetaLSTMOptimizer(p)], ids=["sgd", "lstm", "meta-lstm"])
def test_a_meta_step_on_the_meta_device_runs_shapes_only(make) -> None:
    """Shape-only runs on ``meta`` tensors, which the learned optimizers take: the check for
    non-finite trained weights read their values and raised "Tensor.item() cannot be called on
    meta tensors"."""
    net = model().to("meta")
    data = [[(x.to("meta"), y.to("meta")) for x, y in batches] for batches in tasks(count=2, batches=1)]
    assert Reptile(net, inner_steps=2, inner_optimizer=make).meta_step(data) == 0.1
    assert [(p.device.type, p.shape) for p in net.parameters()] == [("meta", p.shape) for p in model().parameters()]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="inner_steps"):
        Reptile(model(), inner_steps=0)
    with pytest.raises(ValueError, match="outer step sizes must be >= 0"):
        Reptile(model(), inner_steps=1, outer_stepsize=-0.1)
    with pytest.raises(ValueError, match="outer step sizes must be >= 0"):
        Reptile(model(), inner_steps=1, final_outer_stepsize=-0.5, total_steps=4)
    for bad in (float("nan"), float("inf")):  # a NaN step passed the check and made the initialisation NaN
        with pytest.raises(ValueError, match="outer step sizes must be >= 0 and finite"):
            Reptile(model(), inner_steps=1, outer_stepsize=bad)
        with pytest.raises(ValueError, match="outer step sizes must be >= 0 and finite"):
            Reptile(model(), inner_steps=1, final_outer_stepsize=bad, total_steps=4)
    with pytest.raises(ValueError, match="total_steps must be >= 1, got 0"):
        Reptile(model(), inner_steps=1, total_steps=0)
    # a string was math.isfinite's "must be real number, not str"; a bool a step of 1 or one meta-step
    for bad in ("0.1", True):
        with pytest.raises(ValueError, match=rf"^outer step sizes must be >= 0 and finite, got {re.escape(repr(bad))} and 0.0$"):
            Reptile(model(), inner_steps=1, outer_stepsize=bad)
        with pytest.raises(ValueError, match=rf"^total_steps must be >= 1, got {re.escape(repr(bad))} \(an integer\)$"):
            Reptile(model(), inner_steps=1, total_steps=bad)
    reptile = Reptile(model(), inner_steps=1)
    with pytest.raises(ValueError, match="at least one task"):
        reptile.meta_step([])
    with pytest.raises(ValueError, match="at least one"):
        reptile.meta_step([[]])


def test_the_working_copy_follows_later_changes_to_the_model() -> None:
    net = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Dropout(0.5), nn.Linear(5, 2)).double()
    reptile = Reptile(net, inner_steps=2, outer_stepsize=1.0)
    net[0].requires_grad_(False)  # frozen after construction: not trained in the inner loop
    net[1].eval()  # a submodule's mode is the model's, not the top module's
    net[2].eval()
    frozen = net[0].weight.detach().clone()
    worker = reptile.adapt(tasks()[0])
    assert torch.equal(worker[0].weight, frozen)
    assert [m.training for m in worker.modules()] == [m.training for m in net.modules()]
    assert type(worker[1]) is type(net[1])  # the transductive BatchStatNorm that replaced BatchNorm1d
    net.float()  # and a new dtype
    data = [[(x.float(), y) for x, y in batches] for batches in tasks()]
    before = net[3].weight.detach().clone()
    reptile.meta_step(data)
    assert not torch.equal(net[3].weight, before) and torch.equal(net[0].weight, frozen.float())


def test_the_inner_loop_trains_the_model_as_it_is_now_with_swapped_or_changed_layers() -> None:
    """A layer swapped after construction (same parameters, another activation or more
    modules) or a changed attribute is what the inner loop trains: the trained copy equals an
    inner loop run by hand on a copy of the model as it is now."""
    net = model()
    reptile = Reptile(net, inner_steps=3, inner_optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    batches = tasks()[0]
    for change in (lambda: net.__setitem__(1, nn.ReLU()),
                   lambda: net.__setitem__(1, nn.Sequential(nn.Tanh(), nn.Identity())),
                   lambda: net.__setitem__(1, nn.Dropout(0.0)),
                   lambda: setattr(net[1], "p", 1.0)):  # fmt: skip
        change()
        worker = reptile.adapt(batches)
        expected = sgd_run(net, batches, 3, 0.1)
        for got, want in zip(worker.parameters(), expected, strict=True):
            torch.testing.assert_close(got.detach(), want, rtol=0, atol=0)
        assert worker is not reptile.adapt(batches)  # each call returns a copy of its own


def test_non_finite_trained_weights_raise_and_leave_the_initialisation() -> None:
    net = model()
    before = [p.detach().clone() for p in net.parameters()]
    reptile = Reptile(net, inner_steps=3, inner_optimizer=lambda p: torch.optim.SGD(p, lr=float("inf")))
    # a float64 model: no hint of half precision
    with pytest.raises(FloatingPointError, match=r"^a task's trained weights hold NaN or Inf \(the initialisation was left unchanged\)$"):
        reptile.meta_step(tasks())
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before, strict=True))
    assert reptile.step_count == 0


def test_non_finite_weights_of_a_bfloat16_model_name_its_dtype() -> None:
    net = model().bfloat16()
    reptile = Reptile(net, inner_steps=3, inner_optimizer=lambda p: torch.optim.SGD(p, lr=float("inf")))
    data = [[(x.bfloat16(), y) for x, y in batches] for batches in tasks()]
    with pytest.raises(FloatingPointError, match=r"NaN or Inf .*; the model is torch\.bfloat16, where"):
        reptile.meta_step(data)


def test_non_finite_weights_of_a_half_precision_model_name_its_dtype() -> None:
    # float16 Adam: the second moment of a small gradient underflows to 0 and eps=1e-8 is 0 too
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).half()
    reptile = Reptile(net, inner_steps=3, inner_optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
    x, y = torch.randn(4, 3).half(), torch.randint(0, 2, (4,))
    with pytest.raises(FloatingPointError, match="NaN or Inf .*the model is torch.float16.*eps"):
        reptile.meta_step([[(x, y)]])
    assert reptile.step_count == 0


def test_batchnorm_is_transductive_so_eval_mode_uses_the_batch_statistics() -> None:
    # Each task's copy would update its own running statistics and drop them, leaving the
    # initialisation's at mean 0 / variance 1: eval() mode then normalised with those
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    reptile = Reptile(net, inner_steps=2, outer_stepsize=0.5)
    data = [[(5.0 + 3.0 * x, y) for x, y in batches] for batches in tasks()]
    reptile.meta_step(data)
    x = data[0][0][0]
    trained = net(x)
    net.eval()
    torch.testing.assert_close(net(x), trained, rtol=0, atol=0)
    hidden = net[0](x)
    expected = net[2]((hidden - hidden.mean(0)) / torch.sqrt(hidden.var(0, unbiased=False) + 1e-5) * net[1].weight + net[1].bias)
    torch.testing.assert_close(trained, expected)
    with pytest.raises(ValueError, match="batchnorm='error'"):
        Reptile(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), inner_steps=1, batchnorm="error")
    with pytest.raises(ValueError, match="batchnorm must be"):
        Reptile(model(), inner_steps=1, batchnorm="inductive")


def test_running_batchnorm_keeps_the_statistics_through_meta_steps() -> None:
    """batchnorm='running': every task's copy normalises with the statistics the layer holds, in
    training too, and a meta-step leaves them as they were."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    with torch.no_grad():
        net[1].running_mean.copy_(torch.tensor([1.0, -1.0, 0.5, 0.0]))
        net[1].running_var.copy_(torch.tensor([2.0, 0.5, 1.0, 4.0]))
    mean, var = net[1].running_mean.clone(), net[1].running_var.clone()
    reptile = Reptile(net, inner_steps=2, outer_stepsize=0.5, batchnorm="running")
    data = [[(5.0 + 3.0 * x, y) for x, y in batches] for batches in tasks()]
    reptile.meta_step(data)
    assert torch.equal(net[1].running_mean, mean) and torch.equal(net[1].running_var, var)
    x = data[0][0][0]
    hidden = net[0](x)
    expected = net[2]((hidden - mean) / torch.sqrt(var + 1e-5) * net[1].weight + net[1].bias)
    torch.testing.assert_close(net(x), expected)


def test_a_meta_step_moves_the_parameters_and_keeps_other_buffers() -> None:
    """As the README says: buffers other than BatchNorm's (here InstanceNorm's running
    statistics, which each task's copy updates) are not meta-learned and keep their values."""

    class WithInstanceNorm(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)
            self.norm = torch.nn.InstanceNorm1d(1, track_running_stats=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.norm(self.a(x).unsqueeze(1)).squeeze(1))

    torch.manual_seed(0)
    model = WithInstanceNorm()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    tasks = [[(torch.randn(5, 3, generator=g), torch.randint(0, 2, (5,), generator=g))] * 2 for _ in range(2)]
    Reptile(model, inner_steps=2).meta_step(tasks)
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    assert all(not torch.equal(v, params[k]) for k, v in model.named_parameters())


def test_a_task_given_as_one_pair_not_a_list_of_batches_is_refused_with_the_shape_to_use() -> None:
    """``meta_step([(x, y)])`` reads each pair as a task of batches ``x`` and ``y``: with a
    two-row ``x`` it trained on x's rows as (inputs, targets) without a word."""
    reptile = Reptile(nn.Linear(3, 3), inner_steps=1, loss_fn=nn.functional.mse_loss)
    x, y = torch.randn(2, 3), torch.randn(2, 3)  # x[0] runs through the model, x[1] is its target
    before = [p.clone() for p in reptile.model.parameters()]
    with pytest.raises(TypeError, match=r"its item 0 is a Tensor of shape \(2, 3\); for one batch per task pass "
                       r"\[\(x, y\)\], and to meta_step a list of such tasks: \[\[\(x1, y1\)\]"):
        reptile.meta_step([(x, y)])
    assert all(torch.equal(a, b) for a, b in zip(before, reptile.model.parameters()))
    with pytest.raises(TypeError, match="its item 1 is a str"):
        reptile.adapt([(x, y), "batch"])
    reptile.meta_step([[(x, y)]])  # the shape the message gives


def test_the_default_cross_entropy_refuses_a_one_output_model() -> None:
    """Cross-entropy over one output is 0 whatever the targets: no inner step moved the copy."""
    reptile = Reptile(nn.Linear(3, 1), inner_steps=1)
    with pytest.raises(ValueError, match="cross-entropy, is 0 over a model with one output"):
        reptile.meta_step([[(torch.randn(4, 3), torch.randn(4, 1))]])


def test_reptile_refuses_what_maml_refuses_for_its_steps_and_a_frozen_model() -> None:
    """adapt(steps=-1) returned the model untrained in silence (MAML.adapt refuses it), 1.5 inner
    steps were a TypeError from range(), an optimizer given for its factory was "'SGD' object is
    not callable" at the first adapt, and a frozen model failed in the loss's backward."""
    from learnedopt.meta import MAML

    sgd = lambda p: torch.optim.SGD(p, lr=0.1)  # noqa: E731
    task = [(torch.ones(4, 2), torch.ones(4, 1))]
    reptile = Reptile(nn.Linear(2, 1), 1, sgd, loss_fn=nn.functional.mse_loss)
    maml = MAML(nn.Linear(2, 1), loss_fn=nn.functional.mse_loss)
    for steps in (-1, 1.5, True):
        with pytest.raises(ValueError, match=rf"^steps must be >= 0, got {steps!r} \(an integer\)$"):
            reptile.adapt(task, steps=steps)
        with pytest.raises(ValueError, match=rf"^steps must be >= 0, got {steps!r} \(an integer\)$"):
            maml.adapt(*task[0], steps=steps)
    for inner_steps in (1.5, True, 0):
        with pytest.raises(ValueError, match=rf"^inner_steps must be an integer >= 1, got {inner_steps!r}$"):
            Reptile(nn.Linear(2, 1), inner_steps, sgd)
        with pytest.raises(ValueError, match=rf"^inner_steps must be an integer >= 1, got {inner_steps!r}$"):
            MAML(nn.Linear(2, 1), inner_steps=inner_steps)
    model = nn.Linear(2, 1)
    with pytest.raises(TypeError, match=r"inner_optimizer is a function of the parameters .* got a SGD$"):
        Reptile(model, 1, torch.optim.SGD(model.parameters(), lr=0.1))
    model.requires_grad_(False)
    with pytest.raises(ValueError, match=r"^Reptile: no parameter of the model requires grad"):
        Reptile(model, 1, sgd, loss_fn=nn.functional.mse_loss).adapt(task)


def test_a_batch_of_no_examples_is_refused_not_a_silent_step_of_zero() -> None:
    """The mean loss over no examples is NaN, but its gradient is 0: an empty minibatch was an
    inner step that moved nothing, so its task pulled the initialisation nowhere (MAML refuses
    an empty support set)."""
    reptile = Reptile(model(), inner_steps=2)
    (x, y), _ = tasks(count=1)[0]
    before = [p.clone() for p in reptile.model.parameters()]
    with pytest.raises(ValueError, match=r"^Reptile \(batch 1\) needs at least one example, got inputs of shape \(0, 3\)$"):
        reptile.meta_step([[(x, y)], [(x, y), (x[:0], y[:0])]])
    assert all(torch.equal(a, b) for a, b in zip(before, reptile.model.parameters()))
    with pytest.raises(ValueError, match=r"^Reptile \(batch 0\) needs at least one example, got inputs\[0\] of shape \(0, 1\)$"):
        reptile.adapt([([x[:, :1][:0], x[:0]], y[:0])])


@pytest.mark.parametrize("inner", ["sgd", "meta-lstm"])
def test_a_per_example_loss_is_refused_naming_loss_fn_and_leaves_the_initialisation(inner) -> None:
    """A per-example loss (``reduction="none"``) failed in ``backward()`` with PyTorch's "grad can
    be implicitly created only for scalar outputs", naming neither ``loss_fn`` nor the shape."""
    net = model()
    before = copy.deepcopy(net.state_dict())
    reptile = Reptile(net, 2, (lambda p: MetaLSTMOptimizer(p)) if inner == "meta-lstm" else None,
                      loss_fn=lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"))  # fmt: skip
    with pytest.raises(ValueError, match=re.escape("loss_fn must return a scalar tensor (one element), got a tensor of shape (8,)")):
        reptile.meta_step(tasks())
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert reptile.step_count == 0


def test_a_meta_step_takes_its_tasks_from_any_iterable() -> None:
    """``meta_step(draw() for _ in range(3))`` trained every task, then failed on ``len(tasks)``
    ("object of type 'generator' has no len()"), its work lost; the tasks (and a task's
    batches) are now read once into a list, and the update is the list's."""
    from_list, from_generator = model(), model()
    expected = Reptile(from_list, 3).meta_step(tasks())
    assert Reptile(from_generator, 3).meta_step(batches for batches in tasks()) == expected
    for a, b in zip(from_list.parameters(), from_generator.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="meta_step needs at least one task"):
        Reptile(model(), 3).meta_step(iter([]))
    # a task's batches too: an empty generator failed with "integer modulo by zero"
    with pytest.raises(ValueError, match="a task needs at least one"):
        Reptile(model(), 3).adapt(batch for batch in [])
    adapted = Reptile(from_list, 3).adapt(batch for batch in tasks()[0])
    for a, b in zip(adapted.parameters(), Reptile(from_list, 3).adapt(tasks()[0]).parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_lazy_module_not_yet_initialised_is_refused_by_name_leaving_the_model() -> None:
    """An uninitialised ``nn.LazyLinear``: ``meta_step`` failed in ``torch.zeros_like`` with
    PyTorch's "Attempted to use an uninitialized parameter", and ``adapt`` trained a copy whose
    layer each task drew afresh at random (not the initialisation). Now both refuse it by name,
    as MAML does, with the model left as it was; run on one batch, it meta-trains."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.LazyLinear(2)).double()
    reptile = Reptile(net, inner_steps=2)
    before = copy.deepcopy(net[0].state_dict())
    batches = tasks(count=1)[0]
    for call in (lambda: reptile.meta_step([batches]), lambda: reptile.adapt(batches)):
        with pytest.raises(ValueError, match=re.escape(
                "Reptile: parameter '2.weight' is not initialised yet (a lazy module): run the model on one batch "
                "before meta-training, e.g. model(x_support[0])")):  # fmt: skip
            call()
    assert isinstance(net[2], nn.LazyLinear) and nn.parameter.is_lazy(net[2].weight)
    assert all(torch.equal(v, before[k]) for k, v in net[0].state_dict().items())
    assert reptile.step_count == 0
    net(batches[0][0])  # initialised: Reptile runs
    start = copy.deepcopy(net[2].weight.detach())
    reptile.meta_step([batches])
    assert reptile.step_count == 1 and not torch.equal(net[2].weight, start)
