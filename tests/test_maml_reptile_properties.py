"""Property-based checks of MAML and Reptile against hand-written float64 references
(hypothesis, a few tiny examples each): MAML's meta-loss and meta-gradient (second order, first
order, several inner steps, Meta-SGD's learned step sizes, a learnable scalar inner_lr, MAML++'s
step weights, on every path: vmap, loop, checkpointed steps; also through BatchNorm's batch or
running statistics and a shared weight), its ``adapt``, and Reptile's update
over several meta-steps with its annealed outer step size."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import functional_call

from learnedopt.meta import Reptile
from learnedopt.meta.maml import MAML

F64 = torch.float64
FEW = settings(max_examples=15, deadline=None)


def make_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(3, 2).double()
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def mse(outputs: Tensor, targets: Tensor) -> Tensor:
    return (outputs - targets).square().mean()


def regression_episode(tasks: int, shots: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(tasks, shots, n, generator=g, dtype=F64) for n in (3, 2, 3, 2))


def reference(model: nn.Module, data, steps: int, lrs: dict[str, Tensor | float], first_order: bool, weights):
    """MAML's meta-loss by hand (``torch.autograd.grad`` with ``create_graph=True``, the inner
    gradient detached for first order), task by task: the weighted query losses after each step
    (the last one alone without ``weights``), averaged over the tasks."""
    params = dict(model.named_parameters())
    xs, ys, xq, yq = data
    per_task = []
    for b in range(xs.shape[0]):
        fast = dict(params)
        query = []
        for _ in range(steps):
            support = mse(functional_call(model, fast, (xs[b],)), ys[b])
            grads = torch.autograd.grad(support, list(fast.values()), create_graph=not first_order)
            if first_order:
                grads = [g.detach() for g in grads]
            fast = {k: p - lrs[k] * g for (k, p), g in zip(fast.items(), grads, strict=True)}
            query.append(mse(functional_call(model, fast, (xq[b],)), yq[b]))
        per_task.append(query[-1] if weights is None else sum(w * q for w, q in zip(weights, query, strict=True)))
    return torch.stack(per_task).mean()


def spread_step_sizes(maml: MAML, g: torch.Generator) -> None:
    """Move Meta-SGD's step sizes off ``inner_lr``, each element its own (times U[0.5, 1.5))."""
    with torch.no_grad():
        for rate in maml.inner_lrs.values():
            rate.mul_(torch.rand(rate.shape, generator=g, dtype=F64) + 0.5)


def meta_loss_and_gradients(maml: MAML, data) -> tuple[Tensor, dict[str, Tensor]]:
    """``maml``'s meta-loss on ``data`` and its gradient for each of its parameters, by name."""
    meta_loss = maml(*data)
    learnable = dict(maml.named_parameters())
    return meta_loss, dict(zip(learnable, torch.autograd.grad(meta_loss, list(learnable.values())), strict=True))


@FEW
@given(
    model_kind=st.sampled_from(["linear", "mlp"]),
    tasks=st.integers(1, 3),
    steps=st.integers(1, 3),
    inner_lr=st.sampled_from([0.05, 0.3]),
    first_order=st.booleans(),
    path=st.sampled_from(["vmap", "loop", "checkpoint"]),
    learned=st.sampled_from(["no", "meta-sgd", "scalar"]),
    weighted=st.booleans(),
    seed=st.integers(0, 50),
)
def test_maml_meta_loss_and_meta_gradient_equal_a_hand_written_reference(
    model_kind, tasks, steps, inner_lr, first_order, path, learned, weighted, seed
) -> None:
    data = regression_episode(tasks, 4, seed)
    g = torch.Generator().manual_seed(seed + 1)
    weights = (torch.rand(steps, generator=g, dtype=F64) + 0.1).tolist() if weighted else None
    model = make_model(model_kind)
    lr = nn.Parameter(torch.tensor(inner_lr, dtype=F64)) if learned == "scalar" else inner_lr
    maml = MAML(model, inner_lr=lr, inner_steps=steps, first_order=first_order, learn_inner_lr=learned == "meta-sgd",
                step_loss_weights=weights, loss_fn=mse, vectorize=path == "vmap",
                checkpoint_steps=path == "checkpoint")  # fmt: skip
    if learned == "meta-sgd":
        spread_step_sizes(maml, g)
    # by name: MAML's parameters are the model's, a tensor inner_lr given as an nn.Parameter
    # (registered as MAML's own) and Meta-SGD's step sizes (inner_lrs, keys sorted)
    meta_loss, got = meta_loss_and_gradients(maml, data)

    ref_model = make_model(model_kind)
    if learned == "meta-sgd":
        ref_lrs = {k: v.detach().clone().requires_grad_(True) for k, v in maml.step_sizes().items()}
    elif learned == "scalar":
        ref_lr = torch.tensor(inner_lr, dtype=F64, requires_grad=True)
        ref_lrs = dict.fromkeys(dict(ref_model.named_parameters()), ref_lr)
    else:
        ref_lrs = dict.fromkeys(dict(ref_model.named_parameters()), inner_lr)
    expected_loss = reference(ref_model, data, steps, ref_lrs, first_order, weights)
    ref_learnable = {f"model.{k}": v for k, v in ref_model.named_parameters()}
    if learned == "meta-sgd":
        ref_learnable |= {f"inner_lrs.{k.replace('.', '/')}": v for k, v in ref_lrs.items()}
    elif learned == "scalar":
        ref_learnable["inner_lr"] = ref_lr
    expected = dict(zip(ref_learnable, torch.autograd.grad(expected_loss, list(ref_learnable.values())), strict=True))
    torch.testing.assert_close(meta_loss, expected_loss, rtol=1e-12, atol=1e-14)
    assert got.keys() == expected.keys()
    for name, value in got.items():
        torch.testing.assert_close(value, expected[name], rtol=1e-9, atol=1e-12, msg=name)


def partial_reference(model: nn.Module, data, steps: int, lrs: dict, adapted: set[str], zeroed: set[str], first_order: bool, weights):
    """:func:`reference` where only ``adapted`` take inner steps (the rest enter every forward as
    the model holds them) and ``zeroed`` start every task at zero (fresh zeros: no
    meta-gradient reaches the model's own)."""
    xs, ys, xq, yq = data
    params = dict(model.named_parameters())
    per_task = []
    for b in range(xs.shape[0]):
        fast = {k: torch.zeros_like(v, requires_grad=True) if k in zeroed else v for k, v in params.items()}
        query = []
        for _ in range(steps):
            support = mse(functional_call(model, fast, (xs[b],)), ys[b])
            names = [k for k in fast if k in adapted]
            grads = torch.autograd.grad(support, [fast[k] for k in names], create_graph=not first_order, allow_unused=True)
            for k, g in zip(names, grads, strict=True):
                g = torch.zeros_like(fast[k]) if g is None else g
                fast[k] = fast[k] - lrs[k] * (g.detach() if first_order else g)
            query.append(mse(functional_call(model, fast, (xq[b],)), yq[b]))
        per_task.append(query[-1] if weights is None else sum(w * q for w, q in zip(weights, query, strict=True)))
    return torch.stack(per_task).mean()


@FEW
@given(
    tasks=st.integers(1, 3),
    steps=st.integers(1, 3),
    adapt=st.sampled_from([None, ("2",), ("0",), ("2.bias", "0.weight")]),
    zero_head=st.booleans(),
    first_order=st.booleans(),
    meta_sgd=st.booleans(),
    weighted=st.booleans(),
    path=st.sampled_from(["vmap", "loop", "checkpoint"]),
    seed=st.integers(0, 50),
)
def test_maml_with_adapt_only_and_zero_init_equals_a_hand_written_reference(
    tasks, steps, adapt, zero_head, first_order, meta_sgd, weighted, path, seed
) -> None:
    """ANIL-style ``adapt_only`` (the head alone, the body alone, single tensors: held at the
    meta-learned values while a task adapts, and the body run once per task where it can) and
    the zeroing trick (``zero_init``), with first order, Meta-SGD and MAML++ weights: the
    meta-loss and every meta-gradient are the hand-written loop's, zero for a zeroed parameter."""
    if zero_head and adapt is not None and "2" not in adapt:
        adapt = (*adapt, "2")  # a zeroed layer must adapt
    data = regression_episode(tasks, 4, seed)
    g = torch.Generator().manual_seed(seed + 1)
    weights = (torch.rand(steps, generator=g, dtype=F64) + 0.1).tolist() if weighted else None
    model = make_model("mlp")
    maml = MAML(model, inner_lr=0.3, inner_steps=steps, loss_fn=mse, vectorize=path == "vmap", first_order=first_order,
                checkpoint_steps=path == "checkpoint", adapt_only=adapt, zero_init=("2",) if zero_head else (),
                learn_inner_lr=meta_sgd, step_loss_weights=weights)  # fmt: skip
    if meta_sgd:
        with torch.no_grad():
            for rate in maml.inner_lrs.values():
                rate.mul_(torch.rand(rate.shape, generator=g, dtype=F64) + 0.5)
    meta_loss = maml(*data)
    learnable = dict(maml.named_parameters())
    got = dict(zip(learnable, torch.autograd.grad(meta_loss, list(learnable.values()), allow_unused=True), strict=True))

    ref_model = make_model("mlp")
    names = [n for n, _ in ref_model.named_parameters()]
    under = lambda n, prefixes: any(n == p or n.startswith(p + ".") for p in prefixes)
    adapted = {n for n in names if adapt is None or under(n, adapt)}
    zeroed = {n for n in names if zero_head and under(n, ("2",))}
    if meta_sgd:
        assert maml.step_sizes().keys() == adapted
        lrs = {k: v.detach().clone().requires_grad_(True) for k, v in maml.step_sizes().items()}
    else:
        lrs = dict.fromkeys(adapted, 0.3)
    expected_loss = partial_reference(ref_model, data, steps, lrs, adapted, zeroed, first_order, weights)
    ref_learnable = {f"model.{k}": v for k, v in ref_model.named_parameters()}
    if meta_sgd:
        ref_learnable |= {f"inner_lrs.{k.replace('.', '/')}": v for k, v in lrs.items()}
    expected = dict(zip(ref_learnable, torch.autograd.grad(expected_loss, list(ref_learnable.values()), allow_unused=True), strict=True))
    torch.testing.assert_close(meta_loss, expected_loss, rtol=1e-12, atol=1e-14)
    assert got.keys() == expected.keys()
    for name, value in got.items():
        if name.removeprefix("model.") in zeroed:
            assert value is None or not value.any(), name
            assert not model.get_parameter(name.removeprefix("model.")).any()  # zeroed in the model too
            continue
        torch.testing.assert_close(value, expected[name], rtol=1e-9, atol=1e-12, msg=name)


@FEW
@given(
    batchnorm=st.sampled_from(["none", "transductive", "running"]),
    tasks=st.integers(2, 4),
    steps=st.integers(1, 3),
    first_order=st.booleans(),
    vectorize=st.booleans(),
    seed=st.integers(0, 50),
    data=st.data(),
)
def test_maml_gives_each_task_its_own_query_losses_and_permuting_tasks_permutes_them(
    batchnorm, tasks, steps, first_order, vectorize, seed, data
) -> None:
    """Each task of a meta-batch adapts as it would alone (transductive BatchNorm's batch
    statistics are that task's own under vmap too), and permuting the tasks permutes the query
    losses and leaves the meta-gradient as it was."""
    def make() -> nn.Module:
        torch.manual_seed(0)
        norm = nn.BatchNorm1d(4) if batchnorm != "none" else nn.Identity()
        model = nn.Sequential(nn.Linear(3, 4), norm, nn.Tanh(), nn.Linear(4, 2)).double()
        if batchnorm == "running":
            with torch.no_grad():
                norm.running_mean.uniform_(-1, 1)
                norm.running_var.uniform_(0.5, 2)
        return model

    episode = regression_episode(tasks, 5, seed)
    kwargs = {"inner_lr": 0.3, "inner_steps": steps, "first_order": first_order, "loss_fn": mse, "vectorize": vectorize,
              "batchnorm": "transductive" if batchnorm == "none" else batchnorm}  # fmt: skip
    model = make()
    maml = MAML(model, **kwargs)
    together = maml.query_losses(*episode)
    assert together.shape == (tasks, steps)
    for b in range(tasks):
        alone = maml.query_losses(*(t[b : b + 1] for t in episode))
        torch.testing.assert_close(alone[0], together[b], rtol=1e-12, atol=1e-14)
    order = list(data.draw(st.permutations(range(tasks)), label="order"))
    permuted = maml.query_losses(*(t[order] for t in episode))
    torch.testing.assert_close(permuted, together[order], rtol=1e-12, atol=1e-14)
    grads = [torch.autograd.grad(maml(*e), list(model.parameters())) for e in (episode, tuple(t[order] for t in episode))]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


@FEW
@given(steps=st.integers(1, 4), learned=st.booleans(), seed=st.integers(0, 50))
def test_maml_adapt_takes_the_hand_written_inner_steps(steps: int, learned: bool, seed: int) -> None:
    """``adapt`` (one task, no graph) is ``steps`` plain gradient steps with the step sizes."""
    xs, ys, _, _ = regression_episode(1, 5, seed)
    maml = MAML(make_model("mlp"), inner_lr=0.2, inner_steps=steps, learn_inner_lr=learned, loss_fn=mse)
    if learned:
        with torch.no_grad():
            for rate in maml.inner_lrs.values():
                rate.mul_(torch.rand(rate.shape, generator=torch.Generator().manual_seed(seed), dtype=F64) + 0.5)
    rates = {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in maml.step_sizes().items()}
    adapted = maml.adapt(xs[0], ys[0])
    fast = {k: v.detach().clone().requires_grad_(True) for k, v in maml.model.named_parameters()}
    for _ in range(steps):
        grads = torch.autograd.grad(mse(functional_call(maml.model, fast, (xs[0],)), ys[0]), list(fast.values()))
        fast = {k: (p - rates[k] * g).detach().requires_grad_(True) for (k, p), g in zip(fast.items(), grads, strict=True)}
    assert adapted.keys() == fast.keys()
    for k, v in fast.items():
        torch.testing.assert_close(adapted[k], v.detach(), rtol=1e-13, atol=1e-15)
        assert not adapted[k].requires_grad


# ----------------------------------------------------------------------------- Reptile
def sgd_reference(theta: list[Tensor], model: nn.Module, batches, steps: int, lr: float, momentum: float) -> list[Tensor]:
    """``steps`` steps of (heavy-ball) SGD from ``theta`` on ``batches`` cycled, by hand."""
    names = [n for n, _ in model.named_parameters()]
    phi = [t.clone() for t in theta]
    velocity = [torch.zeros_like(t) for t in theta]
    for t in range(steps):
        x, y = batches[t % len(batches)]
        leaves = [p.detach().requires_grad_(True) for p in phi]
        loss = mse(functional_call(model, dict(zip(names, leaves, strict=True)), (x,)), y)
        grads = torch.autograd.grad(loss, leaves)
        # torch.optim.SGD: the first step's buffer is the gradient itself
        velocity = [g if t == 0 else momentum * v + g for v, g in zip(velocity, grads, strict=True)]
        phi = [p.detach() - lr * v for p, v in zip(phi, velocity, strict=True)]
    return phi


@FEW
@given(
    tasks=st.integers(1, 3),
    batches=st.integers(1, 3),
    steps=st.integers(1, 4),
    outer=st.sampled_from([0.1, 0.5, 1.0]),
    momentum=st.sampled_from([0.0, 0.9]),
    total=st.sampled_from([None, 1, 3]),
    seed=st.integers(0, 50),
)
def test_reptile_update_is_the_mean_of_adapted_minus_initial_times_its_step(
    tasks, batches, steps, outer, momentum, total, seed
) -> None:
    """Over three meta-steps: ``theta <- theta + eps_t * mean_i(phi_i - theta)`` with each
    ``phi_i`` the hand-written SGD run of task ``i`` from the current ``theta`` and ``eps_t``
    annealed linearly from ``outer`` to ``outer / 4`` over ``total`` meta-steps."""
    model = make_model("mlp")
    reptile = Reptile(model, inner_steps=steps, inner_optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=momentum),
                      outer_stepsize=outer, final_outer_stepsize=outer / 4, total_steps=total, loss_fn=mse)  # fmt: skip
    theta = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(seed)
    for meta_step in range(3):
        data = [[tuple(torch.randn(5, n, generator=g, dtype=F64) for n in (3, 2)) for _ in range(batches)] for _ in range(tasks)]
        phis = [sgd_reference(theta, model, task, steps, 0.1, momentum) for task in data]
        frac = 0.0 if total is None else min(meta_step / total, 1.0)
        eps = (1 - frac) * outer + frac * outer / 4
        assert reptile.meta_step(data) == eps
        theta = [t + eps * torch.stack([phi[i] - t for phi in phis]).mean(0) for i, t in enumerate(theta)]
        for p, expected in zip(model.parameters(), theta, strict=True):
            torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- buffers and a shared weight
class SharedWeightWithBatchNorm(nn.Module):
    """A BatchNorm layer (its running statistics away from 0 and 1, its affine parameters from 1
    and 0) and one weight in two layers."""

    def __init__(self, track_running_stats: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.norm = nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=track_running_stats)
        self.mid, self.tied, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.tied.weight = self.mid.weight
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)
            if track_running_stats:
                self.norm.running_mean.uniform_(-1, 1)
                self.norm.running_var.uniform_(0.5, 2)

    def forward(self, x: Tensor) -> Tensor:
        z = torch.tanh(self.norm(self.inp(x)))
        return self.out(torch.tanh(self.tied(torch.tanh(self.mid(z)))))


@pytest.mark.parametrize("batchnorm", ["transductive", "running"])
@pytest.mark.parametrize("path", ["vmap", "loop", "checkpoint"])
@pytest.mark.parametrize("first_order", [False, True])
def test_maml_with_batchnorm_buffers_and_a_shared_weight_equals_a_hand_written_reference(
    batchnorm: str, path: str, first_order: bool
) -> None:
    """BatchNorm with the batch's statistics or the kept running ones, a weight shared by two
    layers, Meta-SGD's step sizes and MAML++'s weights, on every path: the meta-loss and every
    meta-gradient are those of :func:`reference` through PyTorch's own BatchNorm (without
    running statistics, or in ``eval()`` mode), and the running statistics stay as they were."""
    data = regression_episode(3, 5, 7)
    model = SharedWeightWithBatchNorm().double()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    maml = MAML(model, inner_lr=0.2, inner_steps=2, first_order=first_order, learn_inner_lr=True, loss_fn=mse,
                step_loss_weights=[0.3, 0.7], vectorize=path == "vmap", checkpoint_steps=path == "checkpoint",
                batchnorm=batchnorm)  # fmt: skip
    spread_step_sizes(maml, torch.Generator().manual_seed(5))
    meta_loss, got = meta_loss_and_gradients(maml, data)

    ref_model = SharedWeightWithBatchNorm(track_running_stats=batchnorm == "running").double()
    if batchnorm == "running":
        ref_model.eval()
    lrs = {k: v.detach().clone().requires_grad_(True) for k, v in maml.step_sizes().items()}
    assert lrs.keys() == dict(ref_model.named_parameters()).keys()  # the shared weight once
    expected_loss = reference(ref_model, data, 2, lrs, first_order, [0.3, 0.7])
    ref_learnable = {f"model.{k}": v for k, v in ref_model.named_parameters()}
    ref_learnable |= {f"inner_lrs.{k.replace('.', '/')}": v for k, v in lrs.items()}
    expected = dict(zip(ref_learnable, torch.autograd.grad(expected_loss, list(ref_learnable.values())), strict=True))
    torch.testing.assert_close(meta_loss, expected_loss, rtol=1e-12, atol=1e-14)
    assert got.keys() == expected.keys()
    for name, value in got.items():
        torch.testing.assert_close(value, expected[name], rtol=1e-9, atol=1e-12, msg=name)
    kept = dict(model.named_buffers())  # transductive: the layer's replacement keeps none
    assert kept.keys() == (buffers.keys() if batchnorm == "running" else set())
    for name, value in kept.items():
        assert torch.equal(value, buffers[name]), name
