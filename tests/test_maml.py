"""MAML: meta-gradients against a direct double-backward computation; first vs second order."""

import copy
from collections import OrderedDict
import re
import warnings

import pytest
import torch
from helpers import central_difference
from torch import nn

from learnedopt.meta import Reptile
from learnedopt.meta.maml import MAML, multi_step_loss_weights
from learnedopt.models import TinyTransformer


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def episode(tasks=3, shots=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(tasks, shots, 3, generator=g, dtype=torch.float64)
    xq = torch.randn(tasks, shots, 3, generator=g, dtype=torch.float64)
    ys = torch.randint(0, 2, (tasks, shots), generator=g)
    yq = torch.randint(0, 2, (tasks, shots), generator=g)
    return xs, ys, xq, yq


def reference_meta_grad(model, lr, steps, data, first_order, adapted=None):
    """MAML's meta-gradient with plain autograd.grad(create_graph=True), task by task; only the
    parameters named in ``adapted`` (default all) take inner steps, the rest enter as they are."""
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    inner = [i for i, n in enumerate(names) if adapted is None or n in adapted]
    total = [torch.zeros_like(p) for p in params]
    xs, ys, xq, yq = data
    for b in range(xs.shape[0]):
        fast = list(params)
        for _ in range(steps):
            out = torch.func.functional_call(model, dict(zip(names, fast)), (xs[b],))
            g = torch.autograd.grad(nn.functional.cross_entropy(out, ys[b]), [fast[i] for i in inner], create_graph=not first_order)
            for i, gi in zip(inner, g):
                fast[i] = fast[i] - lr * gi
        if first_order:  # the query gradient at the adapted values, their path back to params dropped
            fast = [f.detach().requires_grad_() if i in inner else f for i, f in enumerate(fast)]
        out = torch.func.functional_call(model, dict(zip(names, fast)), (xq[b],))
        g = torch.autograd.grad(nn.functional.cross_entropy(out, yq[b]), fast if first_order else params)
        total = [t + gi / xs.shape[0] for t, gi in zip(total, g)]
    return total


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 3])
def test_meta_gradient_matches_direct_computation(vectorize, first_order, steps) -> None:
    model = tiny_model()
    data = episode()
    maml = MAML(model, inner_lr=0.5, inner_steps=steps, first_order=first_order, vectorize=vectorize)
    maml(*data).backward()
    got = [p.grad for p in model.parameters()]
    expected = reference_meta_grad(tiny_model(), 0.5, steps, data, first_order)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_first_order_differs_from_second_order_only_by_curvature_terms() -> None:
    data = episode()
    grads = {}
    for fo in (False, True):
        model = tiny_model()
        MAML(model, inner_lr=0.5, inner_steps=1, first_order=fo)(*data).backward()
        grads[fo] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert not torch.allclose(grads[False], grads[True])
    # with a tiny inner step the Hessian term (lr * H * grad) vanishes and the two agree
    for fo in (False, True):
        model = tiny_model()
        MAML(model, inner_lr=1e-7, inner_steps=1, first_order=fo)(*data).backward()
        grads[fo] = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(grads[False], grads[True], rtol=1e-5, atol=1e-8)


def test_meta_sgd_learns_per_element_step_sizes_and_multi_step_loss() -> None:
    model = tiny_model()
    maml = MAML(model, inner_lr=0.1, inner_steps=2, learn_inner_lr=True, step_loss_weights=[0.3, 0.7])
    lrs = list(maml.inner_lrs.values())
    assert {k: v.shape for k, v in maml.inner_lrs.items()} == {
        n.replace(".", "/"): p.shape for n, p in model.named_parameters()
    }
    data = episode()
    loss = maml(*data)
    per_step = maml.query_losses(*data)
    torch.testing.assert_close(loss, (per_step * per_step.new_tensor([0.3, 0.7])).sum(1).mean())
    loss.backward()
    assert all(lr.grad is not None and lr.grad.abs().sum() > 0 for lr in lrs)
    with pytest.raises(ValueError, match="step_loss_weights needs 3"):
        MAML(tiny_model(), inner_steps=3, step_loss_weights=[1.0])
    for bad in (float("nan"), float("inf"), -0.5):  # a NaN meta-loss; a reward for a high query loss
        with pytest.raises(ValueError, match=rf"step_loss_weights must be finite and >= 0, got {bad} at index 1"):
            MAML(tiny_model(), inner_steps=2, step_loss_weights=[0.5, bad])
        maml.step_loss_weights = [bad, 1.0]  # an attribute, checked at each meta-step
        with pytest.raises(ValueError, match=rf"step_loss_weights must be finite and >= 0, got {bad} at index 0"):
            maml(*data)


@pytest.mark.parametrize("steps", [1, 3])
def test_checkpointed_inner_loop_gives_the_same_meta_gradient(steps) -> None:
    model = tiny_model()
    data = episode()
    maml = MAML(model, inner_lr=0.5, inner_steps=steps, checkpoint_steps=True)
    maml(*data).backward()
    expected = reference_meta_grad(tiny_model(), 0.5, steps, data, first_order=False)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-12)


def test_checkpointed_inner_loop_passes_the_meta_gradient_to_a_tensor_inner_lr() -> None:
    # a learnable scalar inner_lr gets its meta-gradient on every path; the checkpointed step
    # left it out of the step's inputs, so its gradient was silently None
    data = episode()
    grads = {}
    for checkpoint in (False, True):
        model = tiny_model()
        lr = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
        maml = MAML(model, inner_lr=lr, inner_steps=2, vectorize=False, checkpoint_steps=checkpoint)
        maml(*data).backward()
        assert lr.grad is not None, f"checkpoint_steps={checkpoint}: no meta-gradient reached inner_lr"
        grads[checkpoint] = [lr.grad, *(p.grad for p in model.parameters())]
    for plain, checkpointed in zip(grads[False], grads[True]):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-10, atol=1e-12)


class RunningMean(nn.Module):
    """Centres by the batch mean and tracks a running mean and a call count in place, as
    BatchNorm does in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(4, dtype=torch.float64))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        with torch.no_grad():
            self.running_mean.mul_(0.5).add_(0.5 * x.mean(0))
            self.calls += 1
        return x - x.mean(0)


def test_checkpointed_inner_loop_updates_buffers_as_the_plain_one() -> None:
    """The checkpointed step's rebuild in backward runs the model again: it updated a running
    statistic a second time (10 forward calls instead of 6 here), and saw its later value."""

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 4), RunningMean(), nn.Tanh(), nn.Linear(4, 2)).double()

    data = episode(tasks=2)
    plain, checkpointed = make(), make()
    MAML(plain, inner_lr=0.5, inner_steps=2, vectorize=False)(*data).backward()
    MAML(checkpointed, inner_lr=0.5, inner_steps=2, vectorize=False, checkpoint_steps=True)(*data).backward()
    assert int(checkpointed[1].calls) == int(plain[1].calls) == 2 * (2 + 1)
    torch.testing.assert_close(checkpointed[1].running_mean, plain[1].running_mean, rtol=0, atol=0)
    for p, e in zip(checkpointed.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, e.grad, rtol=1e-10, atol=1e-14)


class Masked(nn.Module):
    """A fixed mask buffer multiplied into the hidden layer: autograd saves it for the backward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden, self.out = nn.Linear(3, 4), nn.Linear(4, 2)
        self.register_buffer("mask", torch.tensor([1.0, 0.0, 1.0, 0.5]))

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x)) * self.mask)


def test_checkpointed_inner_loop_leaves_buffers_the_graph_saved_untouched() -> None:
    """The rebuild in backward wrote the forward's buffer values into the model's own buffers and
    back: a buffer the rest of the meta-graph had saved (here a mask multiplied in) was then
    'modified by an inplace operation' and the meta-backward raised."""
    grads = {}
    for ckpt in (False, True):
        model = Masked().double()
        MAML(model, inner_lr=0.5, inner_steps=2, vectorize=False, checkpoint_steps=ckpt)(*episode()).backward()
        grads[ckpt] = [p.grad for p in model.parameters()]
        assert torch.equal(model.mask, Masked().double().mask)
    for a, b in zip(grads[True], grads[False], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_checkpointed_meta_sgd_with_multi_step_loss_matches_the_plain_loop() -> None:
    grads = {}
    for ckpt in (False, True):
        model = tiny_model()
        maml = MAML(model, inner_lr=0.1, inner_steps=3, learn_inner_lr=True,
                    step_loss_weights=[0.2, 0.3, 0.5], vectorize=False, checkpoint_steps=ckpt)  # fmt: skip
        maml(*episode()).backward()
        grads[ckpt] = [p.grad for p in maml.parameters()]
    assert len(grads[True]) == 2 * len(list(tiny_model().parameters()))  # init + step sizes
    for a, b in zip(grads[True], grads[False], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="checkpoint_steps=True runs the tasks in a loop"):
        MAML(tiny_model(), vectorize=True, checkpoint_steps=True)


def test_batchnorm_is_transductive_and_vmappable() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).double()
    data = episode(tasks=2)
    maml = MAML(model, inner_lr=0.1, inner_steps=1, vectorize=True)
    maml(*data).backward()
    assert not any(isinstance(m, nn.BatchNorm1d) for m in model.modules())
    looped = MAML(model, inner_lr=0.1, inner_steps=1, vectorize=False)
    torch.testing.assert_close(looped.query_losses(*data), maml.query_losses(*data))


@pytest.mark.parametrize("vectorize", [True, False])
def test_second_order_meta_gradient_with_batchnorm_matches_autograd_reference(vectorize) -> None:
    """Also with the BatchNorm's own eps (0.5 here), which both paths must keep."""

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, eps=0.5), nn.ReLU(), nn.Linear(4, 2)).double()

    data = episode(tasks=3)
    model = make()
    MAML(model, inner_lr=0.5, inner_steps=2, vectorize=vectorize)(*data).backward()
    reference = make()
    torch.func.replace_all_batch_norm_modules_(reference)  # PyTorch's own BN, batch statistics
    expected = reference_meta_grad(reference, 0.5, 2, data, first_order=False)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="BatchNorm"):
        MAML(nn.Sequential(nn.BatchNorm1d(3)), batchnorm="error")


def pretrained_with_batchnorm() -> nn.Module:
    """A network whose BatchNorm holds running statistics far from 0 and 1 (a pretrained one's)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, eps=0.5), nn.ReLU(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        model[1].running_mean.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
        model[1].running_var.copy_(torch.tensor([4.0, 0.25, 1.0, 9.0]))
    model[1].num_batches_tracked.fill_(7)
    return model


@pytest.mark.parametrize("vectorize", [True, False])
def test_running_batchnorm_normalises_with_the_kept_statistics(vectorize) -> None:
    """batchnorm='running' (inductive): the second-order meta-gradient equals the autograd
    reference through PyTorch's BatchNorm in eval() mode, the statistics stay as they were, and
    the state dict keeps the original keys, so a pretrained checkpoint still loads."""
    data = episode(tasks=3)
    model = pretrained_with_batchnorm()
    keys = list(model.state_dict())
    maml = MAML(model, inner_lr=0.5, inner_steps=2, vectorize=vectorize, batchnorm="running")
    assert list(model.state_dict()) == keys
    model.load_state_dict(pretrained_with_batchnorm().state_dict())
    maml(*data).backward()
    reference = pretrained_with_batchnorm().eval()
    expected = reference_meta_grad(reference, 0.5, 2, data, first_order=False)
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-9, atol=1e-12)
    for name, buffer in pretrained_with_batchnorm().named_buffers():
        assert torch.equal(model.get_buffer(name), buffer), name
    # each example normalised on its own: a query's prediction does not depend on the others
    x = data[2][0]
    torch.testing.assert_close(model(x)[:1], model(x[:1]), rtol=0, atol=0)


def test_running_batchnorm_refuses_a_layer_without_statistics_leaving_the_model_as_it_was() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 4), nn.BatchNorm1d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="has none \\(track_running_stats=False\\): use batchnorm='transductive'"):
        MAML(model, batchnorm="running")
    assert isinstance(model[1], nn.BatchNorm1d)
    with pytest.raises(ValueError, match="batchnorm must be one of 'transductive', 'running', 'error', got 'eval'"):
        MAML(tiny_model(), batchnorm="eval")


class FunctionalBatchNorm(nn.Module):
    """``F.batch_norm`` called in ``forward``, with affine parameters of its own."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, channels))
        self.bias = nn.Parameter(torch.linspace(-0.2, 0.2, channels))

    def forward(self, x):
        return nn.functional.batch_norm(x, None, None, self.weight, self.bias, training=True)


class DirectNorm(nn.Module):
    """``torch.layer_norm`` (affine parameters by keyword) or ``torch.batch_norm`` (by position)
    called directly, not through ``torch.nn.functional``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, 4))
        self.bias = nn.Parameter(torch.linspace(-0.2, 0.2, 4))

    def forward(self, x):
        if self.kind == "layer_norm":
            return torch.layer_norm(x, (4,), weight=self.weight, bias=self.bias)
        return torch.batch_norm(x, self.weight, self.bias, None, None, True, 0.1, 1e-5, False)


class InstanceNormOfFeatures(nn.InstanceNorm1d):
    """InstanceNorm1d with affine parameters, over 2 channels of 2 features each."""

    def __init__(self) -> None:
        super().__init__(2, affine=True)

    def forward(self, x):
        return super().forward(x.view(-1, 2, 2)).view(-1, 4)


@pytest.mark.parametrize("norm", [lambda: nn.LayerNorm(4), InstanceNormOfFeatures, lambda: FunctionalBatchNorm(4),
                                  lambda: DirectNorm("layer_norm"), lambda: DirectNorm("batch_norm")],
                         ids=["layer_norm", "instance_norm", "functional_batch_norm",
                              "torch_layer_norm", "torch_batch_norm"])  # fmt: skip
@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("first_order", [False, True])
def test_second_order_meta_gradient_through_affine_normalisation_matches_autograd_reference(
    norm, vectorize, first_order
) -> None:
    """Under vmap, PyTorch's layer_norm, instance_norm and batch_norm kernels with a weight gave
    second-order meta-gradients 1-2% off (float64), silently, whether called through
    ``torch.nn.functional`` or ``torch`` directly; the loop was exact. First-order
    MAML, which runs vmap without the workaround, is exact too."""

    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), norm(), nn.Tanh(), nn.Linear(4, 2)).double()
        with torch.no_grad():  # affine parameters away from their initial 1 and 0
            for p in model[1].parameters():
                p.add_(0.3 * torch.randn_like(p))
        return model

    data = episode(tasks=3)
    model = make()
    MAML(model, inner_lr=0.5, inner_steps=2, vectorize=vectorize, first_order=first_order)(*data).backward()
    expected = reference_meta_grad(make(), 0.5, 2, data, first_order=first_order)
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", [{"vectorize": True}, {"vectorize": False}, {"vectorize": False, "checkpoint_steps": True}])
def test_second_order_meta_gradient_through_attention_matches_autograd_reference(mode) -> None:
    """``F.scaled_dot_product_attention``'s fused CPU kernel has no double backward: second-order
    MAML through it raised "derivative for ..._flash_attention_for_cpu_backward is not
    implemented", on every path. MAML runs it by the math backend; the reference takes the same
    second-order gradient by autograd under that backend."""

    def make():
        torch.manual_seed(0)
        return TinyTransformer(vocab=5, seq_len=4, width=8, heads=2).double()

    g = torch.Generator().manual_seed(2)
    xs, xq = (torch.randint(0, 5, (2, 3, 4), generator=g) for _ in range(2))
    data = (xs, xs.roll(-1, dims=2), xq, xq.roll(-1, dims=2))  # next-token targets
    model = make()
    MAML(model, inner_lr=0.5, inner_steps=2, **mode)(*data).backward()
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        expected = reference_meta_grad(make(), 0.5, 2, data, first_order=False)
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("vectorize", [True, False])
def test_maml_refuses_to_run_inside_parametrize_cached(vectorize: bool) -> None:
    """Inside ``parametrize.cached()`` the first parametrized weight computed was kept for every
    inner step and task: the meta-loss and meta-gradient came out silently wrong."""
    data = episode()
    model = tiny_model()
    nn.utils.parametrizations.orthogonal(model[2])
    maml = MAML(model, inner_lr=0.5, inner_steps=2, vectorize=vectorize)
    expected = maml(*data)
    with nn.utils.parametrize.cached():
        for call in (lambda: maml(*data), lambda: maml.adapt(data[0][0], data[1][0])):
            with pytest.raises(RuntimeError, match=r"cannot run inside torch.nn.utils.parametrize.cached\(\)"):
                call()
    assert torch.equal(maml(*data), expected)  # outside it runs as before


class RowNormalisedFirstLayer(nn.Module):
    """``tiny_model()`` with its first weight ``g * v / |v|`` by plain ops, the norm over every
    dimension but ``dim`` (per row for 0, per column for 1, of the whole weight for None): what
    ``weight_norm(..., dim=dim)`` computes, without ``torch._weight_norm``."""

    def __init__(self, dim: int | None = 0) -> None:
        super().__init__()
        net = tiny_model()
        self.over = None if dim is None else 1 - dim  # the weight is 2-D
        self.g = nn.Parameter(self.norm(net[0].weight.detach()))
        self.v = nn.Parameter(net[0].weight.detach().clone())
        self.bias, self.rest = net[0].bias, net[1:]

    def norm(self, v: torch.Tensor) -> torch.Tensor:
        return v.norm() if self.over is None else v.norm(dim=self.over, keepdim=True)

    def forward(self, x):
        return self.rest(nn.functional.linear(x, self.g * self.v / self.norm(self.v), self.bias))


def deprecated_weight_norm(module: nn.Module, dim: int | None = 0) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        nn.utils.weight_norm(module, dim=dim)


@pytest.mark.parametrize("reparametrize", [nn.utils.parametrizations.weight_norm, deprecated_weight_norm],
                         ids=["parametrization", "deprecated_hook"])  # fmt: skip
@pytest.mark.parametrize("mode", [{"vectorize": True}, {"vectorize": False}, {"vectorize": False, "checkpoint_steps": True}])
@pytest.mark.parametrize("dim", [0, 1, None])
def test_second_order_meta_gradient_through_weight_norm_matches_a_plain_model(reparametrize, mode, dim) -> None:
    """``torch._weight_norm``'s fused kernel has a wrong double backward: the second-order
    meta-gradient through ``weight_norm`` was 28% off that of the same model written with plain
    ops (checked here by the autograd loop), on every path, for a norm per row, per column
    and of the whole weight."""
    data = episode()
    model = tiny_model()
    reparametrize(model[0], dim=dim)
    MAML(model, inner_lr=0.5, inner_steps=2, **mode)(*data).backward()
    g, v, bias, *rest = reference_meta_grad(RowNormalisedFirstLayer(dim), 0.5, 2, data, first_order=False)
    for p, e in zip(model.parameters(), [bias, g, v, *rest], strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("reparametrize", [nn.utils.parametrizations.weight_norm, deprecated_weight_norm],
                         ids=["parametrization", "deprecated_hook"])  # fmt: skip
def test_first_order_under_vmap_through_weight_norm_runs_batched_with_the_loops_meta_gradient(reparametrize) -> None:
    """``torch._weight_norm`` has no batching rule: first-order MAML under ``vmap`` ran it task by
    task behind PyTorch's "performance drop" warning. It runs by plain ops there now: no
    warning, and the meta-gradient of the task loop."""
    data = episode()
    grads = []
    for vectorize in (True, False):
        model = tiny_model()
        reparametrize(model[0], dim=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the fallback's warning, or vmap's failure warning
            MAML(model, inner_lr=0.5, inner_steps=2, first_order=True, vectorize=vectorize)(*data).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("first_order", [True, False], ids=["first-order", "second-order"])
def test_vmap_inside_autocast_through_layer_norm_gives_the_loops_meta_gradient(first_order: bool) -> None:
    """Inside ``torch.autocast`` (CPU, bfloat16) the tasks run under ``vmap`` through
    ``nn.LayerNorm``, first-order too: its batched backward raised "expected scalar type BFloat16
    but found Float" there (``vectorize="auto"`` fell back to the loop for good, with a warning).
    The meta-gradient is the task loop's under the same autocast, to bfloat16 rounding."""
    data = tuple(t.float() if t.is_floating_point() else t for t in episode())
    grads = []
    for vectorize in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 2))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = MAML(model, inner_lr=0.5, inner_steps=2, first_order=first_order, vectorize=vectorize)(*data)
        loss.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    assert grads[1].abs().max() > 1e-2
    torch.testing.assert_close(grads[0], grads[1], rtol=0.02, atol=0.02 * float(grads[1].abs().max()))


class DirectWeightNorm(RowNormalisedFirstLayer):
    """:class:`RowNormalisedFirstLayer` whose forward calls ``torch._weight_norm`` itself, as a
    model of the user's own may, with no ``weight_norm`` module or hook for MAML to find."""

    def forward(self, x):
        weight = torch._weight_norm(self.v, self.g, -1 if self.over is None else 1 - self.over)
        return self.rest(nn.functional.linear(x, weight, self.bias))


@pytest.mark.parametrize("mode", [{"vectorize": True}, {"vectorize": False}, {"vectorize": False, "checkpoint_steps": True}])
@pytest.mark.parametrize("dim", [0, 1])  # the fused kernel's dims (the first and the last)
def test_second_order_meta_gradient_through_a_direct_weight_norm_call_matches_a_plain_model(mode, dim) -> None:
    """A model of the user's own that calls ``torch._weight_norm`` in its forward gets the plain
    model's second-order meta-gradient too: only a ``weight_norm`` module or hook ran it by plain
    ops, and through the direct call the meta-gradient was 7% off, silently."""
    data = episode()
    model = DirectWeightNorm(dim)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # vmap: "no batching rule for aten::_weight_norm", unless run plainly
        MAML(model, inner_lr=0.5, inner_steps=2, **mode)(*data).backward()
    expected = reference_meta_grad(RowNormalisedFirstLayer(dim), 0.5, 2, data, first_order=False)
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("compiled", ["model", "submodule"])
@pytest.mark.parametrize("mode", [{"vectorize": True}, {"vectorize": False}, {"vectorize": False, "checkpoint_steps": True},
                                  {"vectorize": False, "first_order": True}])  # fmt: skip
def test_a_compiled_model_gives_the_plain_models_meta_gradient(compiled, mode) -> None:
    """torch.compile has no double backward: second-order MAML's task loop through a compiled
    model raised "torch.compile with aot_autograd does not currently support double backward" in
    the meta-backward. MAML runs it eagerly there and under vmap (which Dynamo does not trace)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()  # compiled torch.nn layers share one code object, and its limit of 8 compilations
    data = episode()
    model = tiny_model()
    if compiled == "model":
        model = torch.compile(model, backend="aot_eager")  # aot_autograd, as the default backend, without its C++ build
    else:
        model[0] = torch.compile(model[0], backend="aot_eager")
    MAML(model, inner_lr=0.5, inner_steps=2, **mode)(*data).backward()
    expected = reference_meta_grad(tiny_model(), 0.5, 2, data, first_order=mode.get("first_order", False))
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-9, atol=1e-12)
    # under vmap, Dynamo used to give up on the compiled layer's forward for good: every compiled
    # torch.nn layer of the process ran eagerly after the first vmapped meta-step
    counter = CompileCounter()
    torch.compile(nn.Linear(2, 2).double(), backend=counter)(torch.ones(1, 2, dtype=torch.float64))
    assert counter.frame_count == 1


@pytest.mark.parametrize("vectorize", [True, False])
def test_zero_init_starts_every_task_at_zero_and_learns_only_the_rest(vectorize) -> None:
    """``zero_init`` equals MAML on a model whose output layer is zero, except that the layer
    gets no meta-gradient (it is not learned), so its zeros survive meta-training."""
    data = episode()
    zeroed = tiny_model()
    maml = MAML(zeroed, inner_lr=0.5, inner_steps=2, vectorize=vectorize, zero_init=("2",))
    assert torch.count_nonzero(zeroed[2].weight) == 0 and torch.count_nonzero(zeroed[2].bias) == 0
    maml(*data).backward()
    assert zeroed[2].weight.grad is None and zeroed[2].bias.grad is None
    reference = tiny_model()
    with torch.no_grad():
        reference[2].weight.zero_()
        reference[2].bias.zero_()
    expected = reference_meta_grad(reference, 0.5, 2, data, first_order=False)
    for p, e in zip(list(zeroed.parameters())[:2], expected[:2]):
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-12)
    assert expected[2].abs().max() > 1e-3  # the reference's zero head would have been learned
    params = maml.adapt(data[0][0], data[1][0], steps=1)
    assert params["2.weight"].abs().max() > 0 and torch.count_nonzero(zeroed[2].weight) == 0
    # a second zero_init by parameter name picks the same tensors
    assert MAML(tiny_model(), zero_init=("2.weight", "2.bias"))._zero_init == maml._zero_init


@pytest.mark.parametrize(
    "mode, first_order", [("vmap", False), ("vmap", True), ("loop", False), ("loop", True), ("checkpointed", False)]
)
def test_adapt_only_adapts_the_named_layer_and_meta_learns_the_rest(mode: str, first_order: bool) -> None:
    """ANIL: only the head takes inner steps; the body's meta-gradient (direct, and through the
    head's inner steps unless first order) matches plain autograd on every path."""
    data = episode()
    model = tiny_model()
    maml = MAML(model, inner_lr=0.5, inner_steps=2, first_order=first_order, adapt_only=("2",),
                vectorize=mode == "vmap", checkpoint_steps=mode == "checkpointed")  # fmt: skip
    assert list(maml.initial_params()) == ["2.weight", "2.bias"]
    maml(*data).backward()
    expected = reference_meta_grad(tiny_model(), 0.5, 2, data, first_order, adapted={"2.weight", "2.bias"})
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-12)
    assert expected[0].abs().max() > 1e-3  # the body is meta-learned
    everything = reference_meta_grad(tiny_model(), 0.5, 2, data, first_order)
    assert (everything[0] - expected[0]).abs().max() > 1e-3  # and differs from adapting it too
    fast = maml.adapt(data[0][0], data[1][0])
    assert set(fast) == {"2.weight", "2.bias"} and not torch.equal(fast["2.weight"], model[2].weight)
    assert maml.predict(fast, data[2][0]).shape == (5, 2)


def test_adapt_only_adapts_a_parameter_of_its_modules_unfrozen_after_wrapping() -> None:
    """requires_grad counts as it is at each call: a bias frozen when MAML was built and unfrozen
    after adapts with the rest of its layer (it was held fixed, as if outside adapt_only)."""
    data = episode()
    model = tiny_model()
    model[2].bias.requires_grad_(False)
    maml = MAML(model, inner_lr=0.5, inner_steps=2, adapt_only=("2",))
    model[2].bias.requires_grad_(True)
    assert list(maml.initial_params()) == ["2.weight", "2.bias"]
    maml(*data).backward()
    expected = reference_meta_grad(tiny_model(), 0.5, 2, data, False, adapted={"2.weight", "2.bias"})
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("vectorize", [True, False])
def test_anil_runs_a_fixed_body_once_per_task_and_a_changing_one_every_step(vectorize: bool) -> None:
    """An ``nn.Sequential`` whose first layers are not adapted: their outputs are computed once
    per task (support and query), not at every inner step, with plain autograd's meta-gradient;
    a body with dropout, whose outputs change from call to call, runs at every step."""
    data = episode()
    for dropout, calls_per_call in ((False, 2), (True, 4)):  # 3 inner steps and the query: 4
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.0) if dropout else nn.Identity(), nn.Tanh(), nn.Linear(4, 2)).double()
        calls = []
        model[0].register_forward_hook(lambda *args: calls.append(1))
        maml = MAML(model, inner_lr=0.5, inner_steps=3, adapt_only=("3",), vectorize=vectorize)
        maml(*data).backward()
        assert len(calls) == calls_per_call * (1 if vectorize else 3)  # vmap: one call for the 3 tasks
        expected = reference_meta_grad(copy.deepcopy(model), 0.5, 3, data, first_order=False, adapted={"3.weight", "3.bias"})
        for p, e in zip(model.parameters(), expected, strict=True):
            torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-12)
        calls.clear()
        maml.adapt(data[0][0], data[1][0], steps=5)
        assert len(calls) == (1 if not dropout else 5)
    # a Sequential of named layers too
    named = nn.Sequential(OrderedDict(body=nn.Linear(3, 4), act=nn.Tanh(), head=nn.Linear(4, 2))).double()
    calls = []
    named.body.register_forward_hook(lambda *args: calls.append(1))
    MAML(named, inner_lr=0.5, inner_steps=3, adapt_only=("head",), vectorize=vectorize)(*data).backward()
    assert len(calls) == 2 * (1 if vectorize else 3)


def test_anil_runs_a_body_with_a_random_activation_at_every_step() -> None:
    """``nn.RReLU`` draws its slopes at every call in training, as dropout draws its mask: a
    body holding one is not run once per task (each inner step saw the same draw)."""
    data = episode()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.RReLU(), nn.Linear(4, 2)).double()
    calls = []
    model[0].register_forward_hook(lambda *args: calls.append(1))
    maml = MAML(model, inner_lr=0.5, inner_steps=3, adapt_only=("2",), vectorize=False)
    maml.adapt(data[0][0], data[1][0], steps=5)
    assert len(calls) == 5
    calls.clear()
    maml(*data).backward()
    assert len(calls) == 4 * 3  # 3 inner steps and the query, for each of the 3 tasks


class _Shift(nn.Module):
    """A module of a class of its own: nothing tells MAML that its outputs are fixed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1.0


class _BodyAndHead(nn.Module):
    """Not an ``nn.Sequential``: MAML cannot split it."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


@pytest.mark.parametrize(
    ("case", "calls_per_task"),
    [("one-layer-body", 2), ("frozen-layer-of-adapt-only", 2), ("spectral-norm", 4), ("own-module", 4), ("not-sequential", 4)],
)
def test_anil_caches_exactly_the_bodies_whose_outputs_are_fixed(case: str, calls_per_task: int) -> None:
    """The first layer's forwards per task over 3 inner steps and the query (2: the body's
    outputs once for the support and once for the query set; 4: at every step): a body of one
    layer and a frozen layer of ``adapt_only`` before the head are cached; spectral norm's power
    iteration (a buffer each forward updates), a module of the user's own class and a model that
    is not an ``nn.Sequential`` run at every step. The meta-gradient (and spectral norm's vector)
    is plain autograd's."""
    data = episode()
    torch.manual_seed(0)
    adapt_only: tuple[str, ...] = ("2",)
    if case == "one-layer-body":
        model, adapt_only = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), ("1",)
    elif case == "frozen-layer-of-adapt-only":
        model, adapt_only = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), ("0", "2")
        model[0].requires_grad_(False)  # held fixed now, as if outside adapt_only
    elif case == "spectral-norm":
        model = nn.Sequential(nn.utils.spectral_norm(nn.Linear(3, 4)), nn.Tanh(), nn.Linear(4, 2))
    elif case == "own-module":
        model = nn.Sequential(nn.Linear(3, 4), _Shift(), nn.Linear(4, 2))
    else:
        model, adapt_only = _BodyAndHead(), ("head",)
    model = model.double()
    reference = copy.deepcopy(model)
    first = model.body if case == "not-sequential" else model[0]
    calls = []
    first.register_forward_hook(lambda *args: calls.append(1))
    maml = MAML(model, inner_lr=0.5, inner_steps=3, adapt_only=adapt_only, vectorize=False)
    maml(*data).backward()
    assert len(calls) == calls_per_task * 3
    if case == "frozen-layer-of-adapt-only":
        return
    head = "head" if case == "not-sequential" else adapt_only[0]
    expected = reference_meta_grad(reference, 0.5, 3, data, first_order=False, adapted={f"{head}.weight", f"{head}.bias"})
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-12)
    if case == "spectral-norm":
        assert torch.equal(model[0].weight_u, reference[0].weight_u)


def test_adapt_only_with_meta_sgd_gives_the_same_meta_gradient_on_every_path() -> None:
    """ANIL with learned step sizes: the checkpointed step takes the adapted parameters, their
    step sizes and the fixed body as its inputs; the body's and the step sizes' meta-gradients
    equal the loop's and vmap's."""
    grads = []
    for options in ({"vectorize": False}, {"vectorize": True}, {"vectorize": False, "checkpoint_steps": True}):
        maml = MAML(tiny_model(), inner_lr=0.5, inner_steps=2, learn_inner_lr=True, adapt_only=("2",), **options)
        with torch.no_grad():
            for i, rate in enumerate(maml.inner_lrs.values()):
                rate.add_(torch.linspace(-0.2, 0.2, rate.numel(), dtype=rate.dtype).view_as(rate) * (i + 1))
        maml(*episode()).backward()
        grads.append({n: p.grad for n, p in maml.named_parameters()})
    assert set(grads[0]) == {"model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias",
                             "inner_lrs.2/weight", "inner_lrs.2/bias"}  # fmt: skip
    assert grads[0]["model.0.weight"].abs().max() > 1e-3 and grads[0]["inner_lrs.2/weight"].abs().max() > 1e-3
    for other in grads[1:]:
        for name, g in grads[0].items():
            torch.testing.assert_close(other[name], g, rtol=1e-10, atol=1e-12)


def test_adapt_only_with_meta_sgd_and_zero_init_and_its_refusals() -> None:
    maml = MAML(tiny_model(), adapt_only=("2",), learn_inner_lr=True, zero_init=("2",))
    assert sorted(maml.inner_lrs) == ["2/bias", "2/weight"]
    with pytest.raises(ValueError, match=r"zero_init names parameters that adapt_only does not adapt: 0\.bias, 0\.weight"):
        MAML(tiny_model(), adapt_only=("2",), zero_init=("0",))
    with pytest.raises(ValueError, match=r"adapt_only: 'head' names no trainable parameter"):
        MAML(tiny_model(), adapt_only=("head",))
    model = tiny_model()
    maml = MAML(model, adapt_only=("2",))
    model[2].requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter of adapt_only requires grad"):
        maml(*episode())


def test_adapt_and_predict_for_one_task() -> None:
    model = tiny_model()
    maml = MAML(model, inner_lr=0.5, inner_steps=1)
    xs, ys, xq, yq = episode(tasks=1)
    params = maml.adapt(xs[0], ys[0], steps=5)
    before = nn.functional.cross_entropy(model(xs[0]), ys[0])
    after = nn.functional.cross_entropy(maml.predict(params, xs[0]), ys[0])
    assert after < before
    assert all(not p.requires_grad for p in params.values())


def test_adapt_uses_the_learned_step_sizes() -> None:
    """Meta-SGD: adapting after meta-training steps each element by its learned step size,
    as the inner loop of meta-training did (here against a plain autograd computation)."""
    model = tiny_model()
    maml = MAML(model, inner_lr=0.5, inner_steps=2, learn_inner_lr=True)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for lr in maml.inner_lrs.values():
            lr.uniform_(0.05, 0.9, generator=g)
    xs, ys, _, _ = episode(tasks=1)
    got = maml.adapt(xs[0], ys[0])
    names = [n for n, _ in model.named_parameters()]
    fast = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    for _ in range(2):
        out = torch.func.functional_call(model, dict(zip(names, fast)), (xs[0],))
        grads = torch.autograd.grad(nn.functional.cross_entropy(out, ys[0]), fast)
        fast = [(p - maml.inner_lrs[n.replace(".", "/")].detach() * gp).detach().requires_grad_(True)
                for n, p, gp in zip(names, fast, grads)]  # fmt: skip
    for n, p in zip(names, fast, strict=True):
        torch.testing.assert_close(got[n], p.detach(), rtol=1e-12, atol=1e-14)


def test_first_order_with_checkpointed_steps_stays_first_order() -> None:
    data = episode()
    grads = {}
    for ckpt in (False, True):
        model = tiny_model()
        MAML(model, inner_lr=0.5, inner_steps=2, first_order=True, vectorize=False, checkpoint_steps=ckpt)(*data).backward()
        grads[ckpt] = [p.grad for p in model.parameters()]
    expected = reference_meta_grad(tiny_model(), 0.5, 2, data, first_order=True)
    for a, b, e in zip(grads[True], grads[False], expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(b, e, rtol=1e-10, atol=1e-12)


def test_zero_init_by_module_name_takes_that_module_only() -> None:
    """``zero_init=("1",)`` names module ``1``, not ``10``, ``11``, ... (a prefix of their names)."""
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(12)])
    maml = MAML(model, zero_init=("1",))
    assert maml._zero_init == {"1.weight", "1.bias"}
    zeroed = {n for n, p in maml.initial_params().items() if not p.any()}
    assert zeroed == {"1.weight", "1.bias"}


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="inner_steps"):
        MAML(tiny_model(), inner_steps=0)
    with pytest.raises(ValueError, match="inner_lr"):
        MAML(tiny_model(), inner_lr=-1.0)
    for bad in (float("nan"), float("inf")):  # NaN passed the >= 0 check and made every meta-loss NaN
        with pytest.raises(ValueError, match="inner_lr must be >= 0 and finite"):
            MAML(tiny_model(), inner_lr=bad)
    with pytest.raises(ValueError, match="vectorize"):
        MAML(tiny_model(), vectorize="yes")
    with pytest.raises(ValueError, match="zero_init: 'head' names no trainable parameter"):
        MAML(tiny_model(), zero_init=("head",))


@pytest.mark.parametrize("option", ["first_order", "learn_inner_lr", "checkpoint_steps"])
@pytest.mark.parametrize("value", ["false", 0, None])
def test_a_switch_that_is_not_true_or_false_is_refused(option: str, value) -> None:
    """``first_order="false"`` (a config file's string) was true: first-order MAML, in silence."""
    with pytest.raises(ValueError, match=rf"^{option} must be True or False, got {re.escape(repr(value))}$"):
        MAML(tiny_model(), **{option: value})


class WithUnusedHead(nn.Module):
    """A model with a parameter its output does not use (an auxiliary head)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        self.aux_head = nn.Linear(2, 2)

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("mode", [{"vectorize": True}, {"vectorize": False}, {"vectorize": False, "checkpoint_steps": True}])
def test_parameters_the_loss_does_not_use_get_zero_inner_gradient(mode) -> None:
    model = WithUnusedHead().double()
    maml = MAML(model, inner_lr=0.5, inner_steps=2, **mode)
    maml(*episode()).backward()
    expected = reference_meta_grad(tiny_model(), 0.5, 2, episode(), first_order=False)
    for p, e in zip(model.body.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-12)
    adapted = maml.adapt(episode()[0][0], episode()[1][0])
    assert torch.equal(adapted["aux_head.weight"], model.aux_head.weight.detach())


def test_query_losses_under_no_grad_equal_the_graph_ones_on_the_loop_path() -> None:
    maml = MAML(tiny_model(), inner_lr=0.5, inner_steps=2, vectorize=False)
    with_graph = maml.query_losses(*episode())
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            losses = maml.query_losses(*episode())
        assert not losses.requires_grad
        torch.testing.assert_close(losses, with_graph.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("path", ["vmap", "loop", "checkpoint"])
@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "inference_mode+enable_grad"])
def test_query_losses_in_evaluation_contexts_equal_the_graph_ones_on_every_path(path: str, context: str) -> None:
    """Evaluation under ``no_grad`` or ``inference_mode``, also with ``enable_grad`` inside
    (grad mode on, yet under ``inference_mode`` every tensor made has no graph): the query losses
    of the graph-building call, on every path. The checkpointed path, taken where grad mode was
    on, ran its inner step under ``inference_mode`` with ``enable_grad`` inside and failed in
    autograd: 'element 0 of tensors does not require grad and does not have a grad_fn'."""
    maml = MAML(tiny_model(), inner_lr=0.5, inner_steps=2, vectorize=path == "vmap", checkpoint_steps=path == "checkpoint")
    with_graph = maml.query_losses(*episode())
    outer = torch.inference_mode() if context.startswith("inference_mode") else torch.no_grad()
    with outer, torch.enable_grad() if context.endswith("+enable_grad") else torch.no_grad():
        losses = maml.query_losses(*episode())
        adapted = maml.adapt(*(t[0] for t in episode()[:2]))
    assert not losses.requires_grad
    torch.testing.assert_close(losses, with_graph.detach(), rtol=1e-12, atol=1e-14)
    for name, value in maml.adapt(*(t[0] for t in episode()[:2])).items():
        torch.testing.assert_close(adapted[name], value, rtol=1e-12, atol=1e-14)


def test_checkpointed_steps_pass_the_meta_gradient_to_the_support_inputs_and_keep_dropout_masks() -> None:
    grads = {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        encoder = nn.Linear(3, 3).double()
        model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 2)).double()
        maml = MAML(model, inner_lr=0.5, inner_steps=2, vectorize=False, checkpoint_steps=ckpt)
        xs, ys, xq, yq = episode()
        torch.manual_seed(1)  # the same dropout masks in both runs
        maml(encoder(xs), ys, encoder(xq), yq).backward()
        grads[ckpt] = [p.grad for p in (*encoder.parameters(), *model.parameters())]
    for a, b in zip(grads[True], grads[False], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    temperature = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    maml = MAML(tiny_model(), inner_lr=0.5, checkpoint_steps=True,
                loss_fn=lambda out, y: nn.functional.cross_entropy(out * temperature, y))  # fmt: skip
    with pytest.raises(RuntimeError, match="requires grad but is not one of MAML's parameters"):
        maml(*episode())


@pytest.mark.parametrize("vectorize", [True, False])
def test_a_layer_frozen_after_construction_is_not_adapted(vectorize) -> None:
    model = tiny_model()
    maml = MAML(model, inner_lr=0.5, vectorize=vectorize)
    model[0].requires_grad_(False)  # head-only adaptation (ANIL), chosen after wrapping
    maml(*episode()).backward()
    assert model[0].weight.grad is None and model[2].weight.grad is not None
    assert set(maml.adapt(episode()[0][0], episode()[1][0])) == {"2.weight", "2.bias"}


@pytest.mark.parametrize("mode", [{"vectorize": True}, {"vectorize": False}, {"vectorize": False, "checkpoint_steps": True}])
def test_a_model_with_every_parameter_frozen_is_refused_by_name(mode) -> None:
    """vmap returned a loss without a graph (backward then failed with 'element 0 of tensors does
    not require grad'), the loop raised torch's '`inputs` argument to `grad()` cannot be empty'."""
    model = tiny_model().requires_grad_(False)
    maml = MAML(model, inner_lr=0.5, **mode)
    with pytest.raises(ValueError, match="no parameter of the model requires grad"):
        maml(*episode())
    with pytest.raises(ValueError, match="no parameter of the model requires grad"):
        maml.adapt(episode()[0][0], episode()[1][0])
    assert maml.adapt(episode()[0][0], episode()[1][0], steps=0) == {}  # nothing to adapt, and no step asked


class ReadsAValue(nn.Module):
    """Reads a value with ``.item()``: fine in a loop over tasks, a RuntimeError under vmap."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = tiny_model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * (2.0 if x.sum().item() > 0 else 1.0)


def test_a_model_vmap_cannot_run_falls_back_to_the_loop_once_and_for_all() -> None:
    data = episode()
    maml = MAML(ReadsAValue(), inner_lr=0.5, inner_steps=2)
    with pytest.warns(UserWarning, match="vmap over tasks failed"):
        losses = maml.query_losses(*data)
    assert maml.vectorize is False
    looped = MAML(ReadsAValue(), inner_lr=0.5, inner_steps=2, vectorize=False)
    assert torch.equal(losses, looped.query_losses(*data))


class LastStateOfGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(x)[0][:, -1])


def test_a_recurrent_model_runs_in_the_loop_with_the_autograd_meta_gradient() -> None:
    """``nn.GRU`` (as ``nn.LSTM`` and ``nn.RNN``) does not run under ``vmap`` (PyTorch 2.13), as
    the README says: ``"auto"`` warns, loops, and takes the second-order meta-gradient exactly."""

    def make():
        torch.manual_seed(0)
        return LastStateOfGRU().double()

    g = torch.Generator().manual_seed(0)
    xs, xq = (torch.randn(2, 3, 4, 3, generator=g, dtype=torch.float64) for _ in range(2))
    data = (xs, torch.randint(0, 2, (2, 3), generator=g), xq, torch.randint(0, 2, (2, 3), generator=g))
    model = make()
    maml = MAML(model, inner_lr=0.5, inner_steps=2)
    with pytest.warns(UserWarning, match="vmap over tasks failed"):
        maml(*data).backward()
    assert maml.vectorize is False
    expected = reference_meta_grad(make(), 0.5, 2, data, first_order=False)
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("vectorize", [True, False, "auto"])
def test_a_lazy_module_not_yet_initialised_is_refused_by_name(vectorize) -> None:
    """vmap (also under "auto") failed inside the lazy module's hook: "in_features inferred from
    input: 3 is not equal to in_features from self.weight: 0"."""
    data = episode()
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.LazyLinear(2)).double()
    maml = MAML(model, inner_lr=0.5, vectorize=vectorize)
    for call in (lambda: maml(*data), lambda: maml.adapt(data[0][0], data[1][0])):
        with pytest.raises(ValueError, match=r"parameter '2.weight' is not initialised yet \(a lazy module\)"):
            call()
    model(data[0][0])  # initialised: MAML runs
    maml(*data).backward()
    assert model[2].weight.grad.shape == (2, 4)


def test_the_fallback_to_the_loop_starts_from_the_buffers_the_failed_vmap_found() -> None:
    """spectral_norm's power iteration updates its buffers in place at the first (shared)
    parameters, then fails under vmap at the per-task ones: the loop ran from the updated
    buffers, and the first meta-step's loss and meta-gradient differed from
    ``vectorize=False``'s (2e-3 here)."""

    def make():
        model = tiny_model()
        torch.manual_seed(1)
        nn.utils.spectral_norm(model[0])
        return model

    data = episode()
    looped = make()
    expected = MAML(looped, inner_lr=0.5, inner_steps=2, vectorize=False)(*data)
    expected.backward()
    model = make()
    maml = MAML(model, inner_lr=0.5, inner_steps=2)
    with pytest.warns(UserWarning, match="vmap over tasks failed"):
        loss = maml(*data)
    loss.backward()
    assert maml.vectorize is False
    assert loss.item() == expected.item()
    for (name, b), c in zip(model.named_buffers(), looped.buffers(), strict=True):
        assert torch.equal(b, c), name
    for p, q in zip(model.parameters(), looped.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


def test_a_bad_call_raises_its_error_and_leaves_vmap_on(recwarn) -> None:
    """A user's mistake fails in the loop as under vmap: it says nothing about the model, so
    later calls still run vmapped (9x faster on the sinusoid MLP)."""
    xs, ys, xq, yq = episode()
    maml = MAML(tiny_model(), inner_lr=0.5, inner_steps=1)
    with pytest.raises((RuntimeError, ValueError)):
        maml.query_losses(xs, ys[:, :2], xq, yq)  # 5 inputs, 2 labels
    assert maml.vectorize == "auto"
    assert not [w for w in recwarn if "vmap" in str(w.message)]
    with pytest.raises(ValueError, match="steps must be >= 1"):
        maml.query_losses(xs, ys, xq, yq, steps=0)
    for steps in (2.5, True):  # "'float' object cannot be interpreted as an integer"; True ran one step
        with pytest.raises(ValueError, match=re.escape(f"steps must be >= 1 (the query losses after each inner step), got {steps!r} (an integer)")):
            maml.query_losses(xs, ys, xq, yq, steps=steps)
    with pytest.raises(ValueError, match="steps must be >= 0"):
        maml.adapt(xs[0], ys[0], steps=-1)
    initial = maml.adapt(xs[0], ys[0], steps=0)  # the initialisation itself
    assert all(torch.equal(initial[k], v) for k, v in maml.initial_params().items())


@pytest.mark.parametrize("vectorize", [True, False])
def test_batchnorm_refuses_a_one_example_batch_on_every_path(vectorize) -> None:
    """Batch statistics of one example normalise everything to 0: the fused kernel (the loop
    path, adapt) refused it while vmap's plain ops trained on zeros, so a 1-shot model that
    meta-trained then failed at test time. Each path now raises the same error."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    xs, ys, xq, yq = episode(tasks=2, shots=1)
    maml = MAML(model, inner_lr=0.1, inner_steps=1, vectorize=vectorize)
    with pytest.raises(ValueError, match=r"more than 1 value per channel, got input of shape \(1, 4\)"):
        maml(xs, ys, xq, yq)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        maml.adapt(xs[0], ys[0])
    conv = MAML(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 2)).double(),
                inner_lr=0.1, vectorize=vectorize)  # fmt: skip
    images = torch.randn(2, 1, 1, 4, 4, dtype=torch.float64)  # one example, but 2x2 values per channel
    assert torch.isfinite(conv(images, ys, images, yq))


@pytest.mark.parametrize("vectorize", [True, False, "auto"])
def test_per_task_lists_and_inputs_that_are_not_tensors_are_refused_on_every_path(vectorize) -> None:
    """A list of per-task tensors ran in the task loop but failed, or ran the model on stacked
    fields, under vmap. A tuple, list or dict now holds the model's arguments, batched over
    tasks on every path (tests/test_maml_inputs.py): one of per-task tensors is refused by its
    shapes."""
    xs, ys, xq, yq = episode(tasks=2)
    maml = MAML(tiny_model(), inner_lr=0.5, inner_steps=1, vectorize=vectorize)
    for bad in (list(xs), tuple(xs)):
        with pytest.raises(ValueError, match=re.escape("same B tasks, got x_support[0] (5, 3), y_support (2, 5)")):
            maml(bad, ys, xq, yq)
    with pytest.raises(TypeError, match="got x_support of type ndarray"):
        maml(xs.numpy(), ys, xq, yq)


def test_convolutional_batchnorm_in_a_nested_module_under_vmap_matches_autograd_reference() -> None:
    """BatchStatNorm's plain-op path (vmap) normalises a (N, C, H, W) input over N, H and W, as
    the fused kernel of the loop does; a BatchNorm inside a submodule is replaced too. Only
    (N, C) inputs were checked, so a per-position normalisation under vmap went unseen."""

    def make():
        torch.manual_seed(0)
        block = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
        return nn.Sequential(block, nn.Tanh(), nn.Flatten(), nn.Linear(8, 2)).double()

    g = torch.Generator().manual_seed(2)
    xs, xq = (torch.randn(2, 3, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    ys, yq = (torch.randint(0, 2, (2, 3), generator=g) for _ in range(2))
    model = make()
    maml = MAML(model, inner_lr=0.5, inner_steps=2, vectorize=True)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    maml(xs, ys, xq, yq).backward()
    reference = make()
    torch.func.replace_all_batch_norm_modules_(reference)  # PyTorch's own BN, batch statistics
    expected = reference_meta_grad(reference, 0.5, 2, (xs, ys, xq, yq), first_order=False)
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-9, atol=1e-12)


class TiedWithBatchNorm(nn.Module):
    """One weight in two layers (tied, as an embedding and its output layer), BatchNorm between."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.norm, self.out = nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 3)
        self.out.weight = self.inp.weight

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.inp(x))))


class BagOfEmbeddings(nn.Module):
    """Mean of token embeddings with a padding row, by ``nn.Embedding(padding_idx=0)`` or by a
    direct ``F.embedding`` call with a negative ``padding_idx`` keyword (the last row)."""

    def __init__(self, direct: bool) -> None:
        super().__init__()
        self.direct = direct
        self.embedding = nn.Embedding(6, 3, padding_idx=None if direct else 0)
        self.head = nn.Linear(3, 2)

    def forward(self, tokens):
        if self.direct:
            return self.head(nn.functional.embedding((tokens + 5) % 6, self.embedding.weight, padding_idx=-1).mean(-2))
        return self.head(self.embedding(tokens).mean(-2))


@pytest.mark.parametrize("direct", [False, True, "sequential"], ids=["module", "functional", "sequential"])
@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("first_order", [False, True])
def test_an_embeddings_padding_row_gets_no_meta_gradient_on_every_path(first_order: bool, vectorize: bool, direct) -> None:
    """Under ``vmap`` the embedding looks up per-task weights in one stacked table, where
    ``padding_idx`` was the first task's row only: every other task's padding row got a
    meta-gradient, 40% off the autograd loop's, silently. MAML keeps that row out of the graph,
    also in a model of torch.nn's layers alone (where only an ``nn.Embedding`` turns the fix on)."""

    def make():
        torch.manual_seed(0)
        if direct == "sequential":
            return nn.Sequential(nn.Embedding(6, 3, padding_idx=0), nn.Flatten(), nn.Linear(15, 2)).double()
        return BagOfEmbeddings(direct).double()

    g = torch.Generator().manual_seed(0)
    xs, xq = (torch.randint(0, 6, (3, 4, 5), generator=g) for _ in range(2))
    data = (xs, torch.randint(0, 2, (3, 4), generator=g), xq, torch.randint(0, 2, (3, 4), generator=g))
    model = make()
    MAML(model, inner_lr=0.5, inner_steps=2, first_order=first_order, vectorize=vectorize)(*data).backward()
    expected = reference_meta_grad(make(), 0.5, 2, data, first_order=first_order)
    assert expected[0][-1 if direct is True else 0].abs().max() == 0  # the reference: none to the padding row
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-12)


class TableLookup(nn.Module):
    """A table of its own (no ``nn.Embedding``) looked up with a padding row: by ``F.embedding``
    with every argument a keyword (which reaches a function mode with the weight by position), or
    by ``torch.embedding`` with ``padding_idx`` 0 by position or every argument a keyword."""

    def __init__(self, call: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.call = call
        self.table = nn.Parameter(torch.randn(6, 3))
        self.head = nn.Linear(3, 2)

    def forward(self, tokens):
        if self.call == "keywords":
            rows = nn.functional.embedding(input=tokens, weight=self.table, padding_idx=2)
        elif self.call == "torch.embedding":
            rows = torch.embedding(self.table, tokens, 0)
        else:
            rows = torch.embedding(weight=self.table, indices=tokens, padding_idx=0)
        return self.head(rows.mean(-2))


@pytest.mark.parametrize("call", ["keywords", "torch.embedding", "torch.embedding-keywords"])
def test_a_padding_row_of_a_table_of_its_own_gets_no_meta_gradient_under_vmap(call: str) -> None:
    """The padding fix also covers a module of the user's own class without an ``nn.Embedding``,
    a weight and ``padding_idx`` given by keyword, and ``torch.embedding`` itself (whose 0 is a
    padding row and -1 none)."""
    g = torch.Generator().manual_seed(0)
    xs, xq = (torch.randint(0, 6, (3, 4, 5), generator=g) for _ in range(2))
    data = (xs, torch.randint(0, 2, (3, 4), generator=g), xq, torch.randint(0, 2, (3, 4), generator=g))
    model = TableLookup(call).double()
    MAML(model, inner_lr=0.5, inner_steps=2, vectorize=True)(*data).backward()
    expected = reference_meta_grad(TableLookup(call).double(), 0.5, 2, data, first_order=False)
    assert expected[0][2 if call == "keywords" else 0].abs().max() == 0  # the reference: none to the padding row
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("vectorize", [True, False])
def test_meta_gradient_of_tied_weights_with_meta_sgd_matches_central_differences(vectorize: bool) -> None:
    """Independent of autograd: the second-order meta-gradient (tied weights, transductive
    BatchNorm, learned per-element step sizes, multi-step loss) by central differences, float64."""
    g = torch.Generator().manual_seed(1)
    xs, xq = torch.randn(2, 6, 3, generator=g, dtype=torch.float64), torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    ys, yq = torch.randint(0, 3, (2, 6), generator=g), torch.randint(0, 3, (2, 6), generator=g)
    maml = MAML(TiedWithBatchNorm().double(), inner_lr=0.4, inner_steps=2, learn_inner_lr=True,
                step_loss_weights=[0.3, 0.7], vectorize=vectorize)  # fmt: skip
    with torch.no_grad():
        for rate in maml.inner_lrs.values():
            rate.add_(torch.rand(rate.shape, generator=g, dtype=torch.float64) * 0.2)
    maml(xs, ys, xq, yq).backward()
    params = list(maml.parameters())
    assert len(params) == 2 * 5  # the tied weight once, and its one step size
    analytic = torch.cat([p.grad.reshape(-1) for p in params])
    numeric = torch.cat([central_difference(lambda: maml(xs, ys, xq, yq).item(), p).reshape(-1) for p in params])
    assert analytic.abs().max() > 1e-2
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-7)


def shared_layer_reference(params, x):
    """``nn.Sequential(shared, Tanh, shared, Tanh, Linear)`` written out by hand."""
    w, b, w_out, b_out = params
    hidden = torch.tanh(nn.functional.linear(torch.tanh(nn.functional.linear(x, w, b)), w, b))
    return nn.functional.linear(hidden, w_out, b_out)


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("first_order", [False, True])
def test_a_layer_used_twice_keeps_its_parameters_and_gets_the_meta_gradient(vectorize, first_order) -> None:
    """One module under two names (``nn.Sequential(shared, act, shared)``, a weight-shared block):
    functional_call swapped in each task's weights under both names and restored only the first,
    so after one meta-step the layer held a task's adapted tensor instead of its Parameter."""
    torch.manual_seed(0)
    shared = nn.Linear(3, 3).double()
    model = nn.Sequential(shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(3, 2).double())
    before = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
    xs, ys, xq, yq = episode()
    maml = MAML(model, inner_lr=0.5, inner_steps=2, first_order=first_order, vectorize=vectorize)
    maml(xs, ys, xq, yq).backward()
    fast = maml.adapt(xs[0], ys[0])
    aliased = {name.replace("0.", "2."): value for name, value in fast.items()}  # the layer's other name
    torch.testing.assert_close(maml.predict(aliased, xq[0]), maml.predict(fast, xq[0]), rtol=0, atol=0)
    for name, (p, value) in before.items():
        assert dict(model.named_parameters())[name] is p, f"{name} is no longer the model's Parameter"
        assert torch.equal(p, value)
    assert model[2].weight is model[0].weight
    params = [p.detach().requires_grad_() for p in model.parameters()]  # 0.weight, 0.bias, 4.weight, 4.bias
    total = 0
    for b in range(len(xs)):
        fast = params
        for _ in range(2):
            loss = nn.functional.cross_entropy(shared_layer_reference(fast, xs[b]), ys[b])
            grads = torch.autograd.grad(loss, fast, create_graph=not first_order)
            fast = [f - 0.5 * (g.detach() if first_order else g) for f, g in zip(fast, grads)]
        total = total + nn.functional.cross_entropy(shared_layer_reference(fast, xq[b]), yq[b]) / len(xs)
    expected = torch.autograd.grad(total, params)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-12)


def test_vmap_draws_each_tasks_own_dropout_masks() -> None:
    """``randomness="different"``: as in the loop, every task of a meta-batch draws its own
    dropout masks, so identical tasks get different query losses."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 2)).double()
    xs, ys, xq, yq = (t[:1].expand(4, *t.shape[1:]) for t in episode())  # one task, four times
    losses = MAML(model, inner_lr=0.5, inner_steps=1, vectorize=True).query_losses(xs, ys, xq, yq)
    assert len(set(losses[:, 0].tolist())) == 4


def test_step_sizes_are_given_by_parameter_name() -> None:
    """``step_sizes()``: the learned tensors themselves (``inner_lrs`` spells the names with
    ``/``), for the adapted parameters only (ANIL); ``inner_lr`` without Meta-SGD."""
    model = tiny_model()
    names = [n for n, _ in model.named_parameters()]
    maml = MAML(model, inner_lr=0.3, inner_steps=1, learn_inner_lr=True)
    sizes = maml.step_sizes()
    assert list(sizes) == names
    assert all(sizes[n] is maml.inner_lrs[n.replace(".", "/")] for n in names)
    assert MAML(tiny_model(), inner_lr=0.3, inner_steps=1).step_sizes() == dict.fromkeys(names, 0.3)
    last = names[-2].rsplit(".", 1)[0]  # the output layer's module
    assert list(MAML(tiny_model(), inner_lr=0.3, inner_steps=1, adapt_only=(last,)).step_sizes()) == names[-2:]


def test_meta_sgd_starts_at_inner_lr_and_its_step_sizes_get_the_meta_gradient() -> None:
    """One Meta-SGD step ``theta' = theta - alpha * g_s(theta)``: dL_q/d alpha is
    ``-g_q(theta') * g_s(theta)`` elementwise (float64 reference); at the start alpha is
    inner_lr everywhere, so the meta-loss and the initialisation's meta-gradient are MAML's."""
    data = episode(tasks=2)
    maml_sgd = MAML(tiny_model(), inner_lr=0.3, inner_steps=1, learn_inner_lr=True)
    plain_model = tiny_model()
    plain = MAML(plain_model, inner_lr=0.3, inner_steps=1)
    loss, plain_loss = maml_sgd(*data), plain(*data)
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    loss.backward()
    plain_loss.backward()
    for p, q in zip(maml_sgd.model.parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)
    model = tiny_model()
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    xs, ys, xq, yq = data
    for b in range(xs.shape[0]):
        support = nn.functional.cross_entropy(torch.func.functional_call(model, params, (xs[b],)), ys[b])
        g_s = dict(zip(names, torch.autograd.grad(support, list(params.values())), strict=True))
        adapted = {n: (p - 0.3 * g_s[n]).detach().requires_grad_(True) for n, p in params.items()}
        query = nn.functional.cross_entropy(torch.func.functional_call(model, adapted, (xq[b],)), yq[b])
        g_q = dict(zip(names, torch.autograd.grad(query, list(adapted.values())), strict=True))
        for n in names:
            expected[n] -= g_q[n] * g_s[n] / xs.shape[0]
    for n in names:
        torch.testing.assert_close(maml_sgd.inner_lrs[n.replace(".", "/")].grad, expected[n], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bfloat16", "float32"])
def test_learned_step_sizes_follow_the_maml_module_not_its_model_alone(dtype: torch.dtype, vectorize: bool) -> None:
    """Meta-SGD's step sizes are made in the model's dtype when MAML is built. Converting the
    model alone after that is refused in one line, in meta-training and in ``adapt``: a bfloat16
    model's step came out float32 ("mat1 and mat2 must have the same dtype" in the next forward),
    and a float64 model ran with float32 step sizes, silently. Converting the MAML module works."""
    data = tuple(t.to(dtype) if t.is_floating_point() else t for t in episode())
    maml = MAML(tiny_model(), inner_lr=0.3, inner_steps=2, learn_inner_lr=True, vectorize=vectorize)  # float64
    maml.model.to(dtype)
    message = (rf"learn_inner_lr: parameter '0\.weight' is {dtype} on cpu, its learned step sizes torch\.float64 on cpu, "
               r"as the model was when MAML was built: convert or move the MAML module \(maml\.to\(\.\.\.\)\), which holds both")
    for call in (lambda: maml(*data), lambda: maml.adapt(data[0][0], data[1][0])):
        with pytest.raises(ValueError, match=message):
            call()
    maml.to(dtype)
    loss = maml(*data)
    loss.backward()
    assert loss.dtype == dtype
    assert {p.grad.dtype for p in maml.parameters()} == {dtype}
    assert {v.dtype for v in maml.adapt(data[0][0], data[1][0]).values()} == {dtype}


@pytest.mark.parametrize("vectorize", [True, False])
def test_learned_step_sizes_on_another_device_than_the_model_are_refused(vectorize: bool) -> None:
    """The check of Meta-SGD's step sizes compares the device too: a model moved alone (here to
    the meta device, as a model moved to a GPU without its MAML module) is refused in one line
    before any step, not failed inside it with torch's "Expected all tensors to be on the same device"."""
    maml = MAML(tiny_model(), inner_lr=0.3, inner_steps=2, learn_inner_lr=True, vectorize=vectorize)
    maml.model.to("meta")
    data = tuple(t.to("meta") for t in episode())
    message = (r"learn_inner_lr: parameter '0\.weight' is torch\.float64 on meta, its learned step sizes torch\.float64 "
               r"on cpu, as the model was when MAML was built: convert or move the MAML module")
    for call in (lambda: maml(*data), lambda: maml.adapt(data[0][0], data[1][0])):
        with pytest.raises(ValueError, match=message):
            call()


class ComplexLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 2, dtype=torch.complex128, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return (x.to(self.weight.dtype) @ self.weight).abs()


@pytest.mark.parametrize("vectorize", [True, False])
def test_meta_sgd_step_sizes_of_a_complex_parameter_are_real(vectorize: bool) -> None:
    """A complex parameter's learned step sizes were complex, and meta-training gave them an
    imaginary part: the inner update rotated the gradient instead of stepping along it."""
    xs, ys, xq, yq = episode(tasks=2)
    model = ComplexLinear()
    maml = MAML(model, inner_lr=0.3, inner_steps=1, learn_inner_lr=True, vectorize=vectorize)
    assert maml.inner_lrs["weight"].dtype == torch.float64
    maml(xs, ys, xq, yq).backward()
    w, lr = model.weight.detach().requires_grad_(), torch.full((3, 2), 0.3, dtype=torch.float64, requires_grad=True)
    loss = lambda p, x, y: nn.functional.cross_entropy((x.to(p.dtype) @ p).abs(), y)  # noqa: E731
    meta_loss = sum(loss(w - lr * torch.autograd.grad(loss(w, xs[b], ys[b]), w, create_graph=True)[0], xq[b], yq[b]) for b in range(2)) / 2
    expected = torch.autograd.grad(meta_loss, (w, lr))
    torch.testing.assert_close(model.weight.grad, expected[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(maml.inner_lrs["weight"].grad, expected[1], rtol=1e-10, atol=1e-12)


def test_meta_sgd_has_step_sizes_only_for_the_parameters_that_adapt_when_built() -> None:
    model = tiny_model()
    model[0].requires_grad_(False)
    maml = MAML(model, inner_lr=0.3, learn_inner_lr=True)
    assert set(maml.inner_lrs) == {"2/weight", "2/bias"}
    model[0].requires_grad_(True)
    with pytest.raises(ValueError, match="parameter '0.weight' requires grad but had none when MAML was built"):
        maml(*episode())


def test_zero_init_refuses_a_frozen_layer() -> None:
    """A frozen layer does not adapt: zeroing it would silently zero a fixed part of the model."""
    model = tiny_model()
    model[2].requires_grad_(False)
    with pytest.raises(ValueError, match="zero_init: '2' names no trainable parameter"):
        MAML(model, zero_init=("2",))
    assert model[2].weight.abs().sum() > 0


@pytest.mark.parametrize(("zero_init", "named", "other"), [
    (("out",), "out.weight", "inp.weight"), (("out.weight",), "out.weight", "inp.weight"), (("inp",), "inp.weight", "out.weight"),
])  # fmt: skip
def test_zero_init_refuses_a_layer_tied_to_one_it_does_not_name(zero_init, named: str, other: str) -> None:
    """A tied weight has one name in named_parameters(): zero_init=("out",) zeroed only the output
    layer's bias and left its (tied) weight learned, silently; ("inp",) zeroed the output layer's
    weight with it."""
    model = TiedWithBatchNorm()
    with pytest.raises(ValueError, match=re.escape(
        f"zero_init: {named!r} is the same parameter as {other!r} (tied weights), which zero_init does not name"
    )):  # fmt: skip
        MAML(model, zero_init=zero_init)
    assert model.inp.weight.abs().sum() > 0 and model.out.bias.abs().sum() > 0
    maml = MAML(model, zero_init=("inp", "out"))  # both names of the tied weight: both zero
    assert maml._zero_init == {"inp.weight", "inp.bias", "out.bias"} and model.out.weight.abs().sum() == 0


@pytest.mark.parametrize(
    ("reparametrize", "name"),
    [
        (nn.utils.parametrizations.weight_norm, "2.parametrizations.weight.original0"),
        (nn.utils.parametrizations.orthogonal, "2.parametrizations.weight.original"),
        (nn.utils.spectral_norm, "2.weight_orig"),  # the deprecated hook form
    ],
    ids=["weight_norm", "orthogonal", "old_spectral_norm"],
)
def test_zero_init_refuses_a_reparametrized_layer_leaving_the_model_as_it_was(reparametrize, name: str) -> None:
    """Zeroing the inputs of a reparametrized weight does not zero the weight: weight_norm's and
    spectral_norm's were NaN, and every meta-loss NaN."""
    model = tiny_model()
    reparametrize(model[2])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"zero_init: '{re.escape(name)}' is an input of the reparametrized '2.weight'"):
        MAML(model, zero_init=("2",))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    MAML(model, zero_init=("0",))  # another layer is zeroed as before


@pytest.mark.parametrize(("adapt_only", "named", "other"), [
    (("out",), "out.weight", "inp.weight"), (("inp.weight",), "inp.weight", "out.weight"),
])  # fmt: skip
def test_adapt_only_refuses_a_layer_tied_to_one_it_does_not_name(adapt_only, named: str, other: str) -> None:
    """adapt_only=("out",) would adapt the input layer's weight too (the same tensor), and
    ("inp.weight",) the output layer's: both are refused; naming both layers adapts the weight once."""
    with pytest.raises(ValueError, match=re.escape(
        f"adapt_only: {named!r} is the same parameter as {other!r} (tied weights), which adapt_only does not "
        "name: adapting one adapts both; name both or neither"
    )):  # fmt: skip
        MAML(TiedWithBatchNorm(), adapt_only=adapt_only)
    maml = MAML(TiedWithBatchNorm(), adapt_only=("inp", "out"))
    assert list(maml.initial_params()) == ["inp.weight", "inp.bias", "out.bias"]


@pytest.mark.parametrize("vectorize", [True, False])
def test_query_losses_without_every_step_are_the_last_column(vectorize) -> None:
    maml = MAML(tiny_model(), inner_lr=0.5, inner_steps=3, vectorize=vectorize)
    every = maml.query_losses(*episode())
    last = maml.query_losses(*episode(), every_step=False)
    assert every.shape == (3, 3) and last.shape == (3, 1)
    torch.testing.assert_close(last[:, 0], every[:, -1], rtol=1e-12, atol=1e-14)


def test_multi_step_loss_weights_anneal_as_maml_plus_plus() -> None:
    """Antoniou et al.'s per-step importance vector at epoch e of E annealing epochs, 5 steps:
    non-final max(1/5 - e/(5E), 0.03/5), final min(1/5 + 4e/(5E), 1 - 4 * 0.03/5); then the
    last step alone."""
    assert multi_step_loss_weights(5, 0.0) == pytest.approx([0.2] * 5)
    assert multi_step_loss_weights(5, 0.3) == pytest.approx([0.14] * 4 + [0.44])
    assert multi_step_loss_weights(5, 0.99) == pytest.approx([0.006] * 4 + [0.976])
    assert multi_step_loss_weights(5, 1.0) is None and multi_step_loss_weights(5, 7.5) is None
    assert multi_step_loss_weights(1, 0.4) == pytest.approx([1.0])
    for progress in (0.0, 0.1, 0.5, 0.97, 0.999):
        assert sum(multi_step_loss_weights(3, progress)) == pytest.approx(1.0)
    for bad, message in (((0, 0.5), "steps must be >= 1"), ((3, -0.1), "progress must be"),
                         ((3, float("nan")), "progress must be"), ((3, 0.5, 1.5), "floor must be in")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            multi_step_loss_weights(*bad)
    # MAML takes them between meta-steps
    maml = MAML(tiny_model(), inner_lr=0.5, inner_steps=3)
    data = episode()
    maml.step_loss_weights = multi_step_loss_weights(3, 0.5)
    losses = maml.query_losses(*data)
    torch.testing.assert_close(maml(*data), (losses * losses.new_tensor(maml.step_loss_weights)).sum(1).mean())
    maml.step_loss_weights = multi_step_loss_weights(3, 1.0)
    torch.testing.assert_close(maml(*data), losses[:, -1].mean())


@pytest.mark.parametrize(
    ("args", "message"),
    [((2.0, 0.5), "steps must be >= 1, got 2.0 (an integer)"), ((True, 0.5), "steps must be >= 1, got True (an integer)"),
     ((3, True), "progress must be a finite number >= 0, got True"), ((3, "0.5"), "progress must be a finite number >= 0, got '0.5'"),
     ((3, 0.5, True), "floor must be in [0, 1], got True"), ((3, 0.5, "0"), "floor must be in [0, 1], got '0'")],
)  # fmt: skip
def test_multi_step_loss_weights_refuse_what_is_not_a_number_of_its_kind(args, message: str) -> None:
    """A float number of steps was "can't multiply sequence by non-int of type 'float'", a string
    progress math.isfinite's TypeError; a bool steps or progress was read as 1 (one weight; None,
    as at the end of the annealing) and a bool floor as 1, in silence."""
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        multi_step_loss_weights(*args)


@pytest.mark.parametrize("vectorize", [True, False])
def test_the_default_cross_entropy_refuses_a_one_output_model_instead_of_a_zero_meta_loss(vectorize: bool) -> None:
    """The README's sinusoid model without ``loss_fn=mse_loss``: cross-entropy over one output is
    0 whatever the targets, so MAML meta-trained on a zero loss and zero meta-gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 1))
    x_s, y_s, x_q, y_q = torch.randn(2, 5, 1), torch.randn(2, 5, 1), torch.randn(2, 5, 1), torch.randn(2, 5, 1)
    with pytest.raises(ValueError, match=r"cross-entropy, is 0 over a model with one output.*loss_fn=nn\.functional\.mse_loss"):
        MAML(model, inner_lr=0.01, vectorize=vectorize)(x_s, y_s, x_q, y_q)
    classifier = nn.Linear(1, 3)  # more than one class: the default as before
    labels = torch.randint(0, 3, (2, 5))
    expected = MAML(classifier, inner_lr=0.01, loss_fn=nn.functional.cross_entropy, vectorize=vectorize)(x_s, labels, x_q, labels)
    assert torch.equal(MAML(classifier, inner_lr=0.01, vectorize=vectorize)(x_s, labels, x_q, labels), expected)


class LogitsAndFeatures(nn.Module):
    """A model whose forward returns a tuple (logits, features), or a dict of them."""

    def __init__(self, as_dict: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.as_dict, self.body, self.head = as_dict, nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        features = torch.tanh(self.body(x))
        return {"logits": self.head(features), "features": features} if self.as_dict else (self.head(features), features)


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("as_dict", [False, True])
def test_a_model_returning_a_tuple_or_dict_takes_a_loss_fn_and_the_default_names_it(vectorize: bool, as_dict: bool) -> None:
    """The default cross-entropy failed on such outputs with 'tuple' object has no attribute 'dim'."""
    pick = (lambda out: out["logits"]) if as_dict else (lambda out: out[0])
    maml = MAML(LogitsAndFeatures(as_dict).double(), inner_lr=0.5, vectorize=vectorize,
                loss_fn=lambda out, y: nn.functional.cross_entropy(pick(out), y))  # fmt: skip
    maml(*episode()).backward()
    expected = reference_meta_grad(tiny_model(), 0.5, 1, episode(), first_order=False)
    for p, e in zip(maml.model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-12)
    kind = "dict" if as_dict else "tuple"
    with pytest.raises(TypeError, match=f"takes the model's output as one tensor of logits, got a {kind}: pass loss_fn"):
        MAML(LogitsAndFeatures(as_dict).double(), vectorize=vectorize)(*episode())
    with pytest.raises(TypeError, match=f"got a {kind}: pass loss_fn"):
        Reptile(LogitsAndFeatures(as_dict).double(), inner_steps=1).meta_step([[(episode()[0][0], episode()[1][0])]])


@pytest.mark.parametrize("vectorize", [True, False])
def test_inputs_of_different_task_counts_are_refused_naming_each_shape(vectorize: bool) -> None:
    maml = MAML(nn.Linear(1, 1), inner_lr=0.1, loss_fn=nn.functional.mse_loss, vectorize=vectorize)
    x = torch.randn(3, 5, 1)
    with pytest.raises(ValueError, match=r"same B tasks, got x_support \(3, 5, 1\), y_support \(2, 5, 1\), "):
        maml(x, x[:2], x, x)


@pytest.mark.parametrize("vectorize", [True, False])
def test_one_tasks_labels_given_as_a_meta_batch_are_refused_not_read_as_one_example_tasks(vectorize: bool) -> None:
    """``maml(x, y, x_q, y_q)`` with ONE task's ``(N, C)`` inputs and ``(N,)`` labels (the form
    :meth:`MAML.adapt` takes) read as N tasks of one unbatched example each: cross-entropy accepts
    an unbatched ``(C,)`` logit and ``()`` label, so it meta-trained, silently, on the wrong tasks."""
    torch.manual_seed(0)
    maml = MAML(nn.Linear(4, 3), inner_lr=0.1, vectorize=vectorize)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match=r"got y_support of shape \(6,\): one target per task\. For one task, add the task dimension"):
        maml(x, y, x, y)
    with pytest.raises(ValueError, match=r"got y_query of shape \(1,\)"):
        maml(x[None], y[None], x[None], y[:1])
    assert torch.isfinite(maml(x[None], y[None], x[None], y[None]))  # the same task with its task dimension


@pytest.mark.parametrize("vectorize", [True, False])
def test_an_empty_support_or_query_set_is_refused_not_a_nan_meta_loss(vectorize: bool) -> None:
    """``EpisodeSampler(..., q_query=0)`` (for Reptile) gives ``(B, 0, ...)`` query tensors, and
    ``SinusoidTasks.sample_tasks(k_shot=0)`` an empty support set: the mean loss over no examples
    is NaN, so the meta-loss, or every adapted parameter, was NaN without a word."""
    maml = MAML(nn.Linear(4, 3), inner_lr=0.1, vectorize=vectorize)
    x, y = torch.randn(2, 6, 4), torch.randint(0, 3, (2, 6))
    with pytest.raises(ValueError, match=r"one query example per task, got x_query \(2, 0, 4\), y_query \(2, 0\) \(episodes"):
        maml(x, y, x[:, :0], y[:, :0])
    with pytest.raises(ValueError, match=r"got x_support \(2, 0, 4\), y_support \(2, 0\)"):
        maml.query_losses(x[:, :0], y[:, :0], x, y)
    with pytest.raises(ValueError, match=r"adapt needs at least one support example, got x_support of shape \(0, 4\)"):
        maml.adapt(x[0, :0], y[0, :0])
    assert maml.adapt(x[0, :0], y[0, :0], steps=0).keys() == maml.adapt(x[0], y[0]).keys()  # no step: the initialisation


@pytest.mark.parametrize("vectorize", [True, False])
def test_a_meta_batch_of_no_tasks_is_refused_not_a_nan_meta_loss(vectorize: bool) -> None:
    """``(0, N, ...)`` tensors: the mean over no tasks was a NaN meta-loss under vmap without a
    word, and the loop's "stack expects a non-empty TensorList" named nothing."""
    maml = MAML(nn.Linear(4, 3), inner_lr=0.1, vectorize=vectorize)
    x, y = torch.randn(0, 6, 4), torch.randint(0, 3, (0, 6))
    with pytest.raises(ValueError, match=re.escape("MAML needs at least one task, got x_support (0, 6, 4), y_support (0, 6)")):
        maml(x, y, x, y)


@pytest.mark.parametrize("inner_lr", ["0.1", None, True, torch.tensor([0.1, 0.2]), torch.tensor(0.1j)])
def test_an_inner_lr_that_is_not_a_number_is_a_value_error_naming_it(inner_lr) -> None:
    """A string was math.isfinite's TypeError "must be real number, not str", which named nothing;
    a tensor of two step sizes "only one element tensors can be converted to Python scalars"."""
    with pytest.raises(ValueError, match=rf"^inner_lr must be >= 0 and finite, got {re.escape(repr(inner_lr))}$"):
        MAML(nn.Linear(2, 1), inner_lr=inner_lr)


def test_a_learnable_tensor_inner_lr_is_taken_without_a_warning() -> None:
    """Checking it read the value of a tensor that requires grad: PyTorch's "Converting a tensor
    with requires_grad=True to a scalar may lead to unexpected behavior" at every build."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        maml = MAML(nn.Linear(2, 1), inner_lr=nn.Parameter(torch.tensor(0.1)))
        # Meta-SGD's step sizes start at its value (full_like refused it: "must be Number, not Parameter")
        meta_sgd = MAML(nn.Linear(2, 1), inner_lr=nn.Parameter(torch.tensor(0.1)), learn_inner_lr=True)
    assert maml.inner_lr.requires_grad
    assert all(torch.equal(rate, torch.full_like(rate, 0.1)) for rate in meta_sgd.step_sizes().values())


@pytest.mark.parametrize("path", ["vmap", "loop", "checkpoint"])
@pytest.mark.parametrize("shape", [(1,), (1, 1), (1, 1, 1)])
def test_a_one_element_inner_lr_of_any_shape_steps_as_its_number(shape: tuple[int, ...], path: str) -> None:
    """A one-element ``inner_lr`` tensor is taken whatever its shape: a ``(1, 1)`` one broadcast
    every 1-d parameter's step to ``(1, d)``, so a bias came out of ``adapt`` (and every inner
    step) as ``(1, d)``, and a ``(1, 1, 1)`` one failed inside the model ("t() expects a tensor
    with <= 2 dimensions"). Meta-loss, meta-gradients and ``adapt`` are a number's."""
    data = episode()
    options = {"inner_steps": 2, "vectorize": path == "vmap", "checkpoint_steps": path == "checkpoint"}
    plain_model = tiny_model()
    plain = MAML(plain_model, inner_lr=0.3, **options)
    expected = plain(*data)
    expected.backward()
    lr = nn.Parameter(torch.full(shape, 0.3, dtype=torch.float64))
    model = tiny_model()
    maml = MAML(model, inner_lr=lr, **options)
    loss = maml(*data)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-14, atol=0)
    for p, q in zip(model.parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)
    assert lr.grad is not None and lr.grad.shape == shape
    adapted, reference = maml.adapt(data[0][0], data[1][0]), plain.adapt(data[0][0], data[1][0])
    for name, value in reference.items():
        assert adapted[name].shape == value.shape, name
        torch.testing.assert_close(adapted[name], value, rtol=1e-14, atol=0)


@pytest.mark.parametrize("vectorize", [True, False, "auto"])
@pytest.mark.parametrize("first_order", [False, True])
def test_a_meta_step_on_the_meta_device_runs_shapes_only_on_every_path(vectorize, first_order: bool) -> None:
    """Shape-only runs on ``meta`` tensors, as ``Reptile`` and the learned optimizers take them:
    under vmap ``torch.is_autocast_enabled("meta")`` raised "unknown device type for autocast",
    so ``vectorize=True`` failed with that and ``"auto"`` fell back to the loop for good with a
    warning that vmap had failed."""
    model = tiny_model().to("meta")
    maml = MAML(model, inner_lr=0.1, vectorize=vectorize, first_order=first_order)
    xs, ys, xq, yq = (t.to("meta") for t in episode())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        losses = maml.query_losses(xs, ys, xq, yq)
        maml(xs, ys, xq, yq).backward()
    assert losses.shape == (3, 1) and losses.is_meta and maml.vectorize == vectorize
    assert all(p.grad is not None and p.grad.is_meta and p.grad.shape == p.shape for p in model.parameters())
    assert all(p.is_meta for p in maml.adapt(xs[0], ys[0]).values())


@pytest.mark.parametrize("vectorize", [True, False])
def test_the_default_cross_entropy_takes_integer_labels_of_any_width_and_refuses_float_labels_on_every_path(vectorize: bool) -> None:
    """int32 labels (numpy's default on some platforms) trained under vmap but failed in the task
    loop ("expected target dtype to be Long or Byte, but got Int"), so ``vectorize="auto"`` took
    them for an MLP and refused them for a conv net on CPU; labels stored as floats failed under
    vmap with "gather(): Expected dtype int32/int64 for index". Integer labels of any width are
    class indices on every path, and in Reptile; float labels of another shape than the outputs
    are refused naming their dtype; class probabilities of the outputs' shape stay as they were."""
    xs, ys, xq, yq = episode()
    want = MAML(tiny_model(), inner_lr=0.5, vectorize=vectorize)(xs, ys, xq, yq)
    reptile_data = [[(xs[0], ys[0])]]
    reptile = Reptile(tiny_model(), inner_steps=2)
    reptile.meta_step(reptile_data)
    for dtype in (torch.int32, torch.int16, torch.uint8):
        got = MAML(tiny_model(), inner_lr=0.5, vectorize=vectorize)(xs, ys.to(dtype), xq, yq.to(dtype))
        assert torch.equal(got, want), dtype
        other = Reptile(tiny_model(), inner_steps=2)
        other.meta_step([[(xs[0], ys[0].to(dtype))]])
        assert all(torch.equal(a, b) for a, b in zip(other.model.parameters(), reptile.model.parameters(), strict=True))
    one_hot = nn.functional.one_hot  # probabilities of the outputs' shape: soft targets, as before
    soft = MAML(tiny_model(), inner_lr=0.5, vectorize=vectorize)(xs, one_hot(ys).double(), xq, one_hot(yq).double())
    torch.testing.assert_close(soft, want, rtol=1e-12, atol=1e-12)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
        message = (f"the default loss_fn, cross-entropy, takes class indices as integer targets or class probabilities of the "
                   f"outputs' shape (5, 2), got {dtype} targets of shape (5,)")  # fmt: skip
        with pytest.raises(TypeError, match="^" + re.escape(message)):
            MAML(tiny_model(), inner_lr=0.5, vectorize=vectorize)(xs, ys.to(dtype), xq, yq.to(dtype))
        with pytest.raises(TypeError, match="^" + re.escape(message)):
            Reptile(tiny_model(), inner_steps=1).meta_step([[(xs[0], ys[0].to(dtype))]])


@pytest.mark.parametrize("vectorize", [True, False])
def test_inputs_without_an_example_dimension_are_refused_as_targets_are(vectorize: bool) -> None:
    """``(B,)`` inputs (one scalar per task) reached the model as 0-dim tensors: "both arguments
    to linear need to be at least 1D", naming no input; ``(B,)`` targets were already refused."""
    maml = MAML(nn.Linear(1, 2), inner_lr=0.1, vectorize=vectorize)
    x, y = torch.randn(2, 5, 1), torch.randint(0, 2, (2, 5))
    with pytest.raises(ValueError, match=re.escape("MAML takes (B, N, ...) tensors of B tasks of N examples, got x_query of shape (2,): "
                                                   "one input per task. For one task, add the task dimension")):
        maml(x, y, x[:, 0, 0], y)


@pytest.mark.parametrize("vectorize", [True, False, "auto"])
def test_a_one_element_loss_runs_as_a_scalar_on_every_path(vectorize, recwarn) -> None:
    """A ``loss_fn`` returning a ``(1,)`` tensor (``loss.reshape(1)``, a ``keepdim`` reduction)
    is a scalar to ``backward()``: ``torch.func.grad`` refused it under ``vmap`` ("Expected
    f(*args) to return a scalar Tensor"), so ``"auto"`` warned that the vmap over tasks failed
    and looped for good, and the loop's ``query_losses`` were ``(B, steps, 1)``."""
    data = episode()
    model = tiny_model()
    plain = MAML(copy.deepcopy(model), inner_lr=0.3, inner_steps=2, vectorize=vectorize)
    one = MAML(model, inner_lr=0.3, inner_steps=2, vectorize=vectorize,
               loss_fn=lambda out, y: nn.functional.cross_entropy(out, y).reshape(1))  # fmt: skip
    losses = one.query_losses(*data)
    assert losses.shape == (3, 2)
    torch.testing.assert_close(losses, plain.query_losses(*data), rtol=0, atol=1e-12)
    assert one.vectorize == vectorize and not [w for w in recwarn if "vmap" in str(w.message)]
    meta_loss = one(*data)
    assert meta_loss.shape == ()
    grads = torch.autograd.grad(meta_loss, list(model.parameters()))
    for g, r in zip(grads, torch.autograd.grad(plain(*data), list(plain.model.parameters())), strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("vectorize", "loss"), [(True, "per-example"), (False, "per-example"), ("auto", "per-example"),
                                                  (False, "float"), ("auto", "float")])  # fmt: skip
def test_a_loss_that_is_not_one_element_is_refused_naming_loss_fn(vectorize, loss) -> None:
    """A per-example loss (``reduction="none"``) failed with PyTorch's "grad can be implicitly
    created only for scalar outputs" (or vmap's "Expected f(*args) to return a scalar Tensor"),
    naming neither ``loss_fn`` nor the shape; a Python number failed inside autograd. (Under
    ``vmap``, ``float()`` of the loss fails in ``loss_fn`` itself, before it returns.)"""
    loss_fn = {"per-example": lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"),
               "float": lambda out, y: float(nn.functional.cross_entropy(out, y))}[loss]  # fmt: skip
    maml = MAML(tiny_model(), inner_lr=0.3, vectorize=vectorize, loss_fn=loss_fn)
    message = r"loss_fn must return a scalar tensor \(one element\), got " + ("a tensor of shape \\(5,\\)" if loss == "per-example" else "a float")
    with pytest.raises(ValueError, match=message):
        maml(*episode())
    xs, ys, _, _ = episode()
    with pytest.raises(ValueError, match=message):
        maml.adapt(xs[0], ys[0])


@pytest.mark.parametrize("batchnorm", ["transductive", "running"])
@pytest.mark.parametrize("algo", ["MAML", "Reptile"])
def test_a_lazy_batchnorm_not_yet_initialised_is_refused_leaving_the_model_to_initialise(algo, batchnorm) -> None:
    """An uninitialised ``nn.LazyBatchNorm1d`` was replaced by a batch-norm replacement holding its
    uninitialised parameters, without the lazy hook that would have initialised them: the model
    failed for good ("Attempted to use an uninitialized parameter"), and MAML's "run the model
    on one batch before meta-training" could not be followed. Now refused, by name, with the
    model left as it was: run on one batch, it initialises, and then wraps and meta-trains."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LazyBatchNorm1d(), nn.Linear(4, 2)).double()
    wrap = (lambda: MAML(model, inner_lr=0.1, batchnorm=batchnorm, loss_fn=nn.functional.mse_loss)) if algo == "MAML" else (
        lambda: Reptile(model, 1, batchnorm=batchnorm, loss_fn=nn.functional.mse_loss))  # fmt: skip
    with pytest.raises(ValueError, match=re.escape(
            "layer '1' (LazyBatchNorm1d) is not initialised yet (a lazy module): run the model on one batch before "
            "wrapping it, e.g. model(x_support[0])")):  # fmt: skip
        wrap()
    assert isinstance(model[1], nn.LazyBatchNorm1d)
    x, y = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 5, 2, dtype=torch.float64)
    model(x[0])  # initialises the layer (a BatchNorm1d from now on)
    wrapped = wrap()
    assert type(model[1]).__name__ == ("BatchStatNorm" if batchnorm == "transductive" else "RunningStatNorm")
    if algo == "MAML":
        assert torch.isfinite(wrapped(x, y, x, y))
    else:
        wrapped.meta_step([[(x[0], y[0])]])
        assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(("options", "message"), [
    ({"zero_init": ("nope",)}, "zero_init: 'nope' names no trainable parameter"),
    ({"adapt_only": ("nope",)}, "adapt_only: 'nope' names no trainable parameter"),
    ({"adapt_only": ("2",), "zero_init": ("0",)}, "zero_init names parameters that adapt_only does not adapt"),
    ({"step_loss_weights": [1.0, 1.0]}, "step_loss_weights needs 1 entries"),
])  # fmt: skip
def test_a_refused_maml_leaves_the_models_batchnorm_as_it_was(options, message) -> None:
    """MAML replaced the model's BatchNorm layers (dropping their running statistics) before
    checking its other arguments: a refused construction left the model transductive, its
    checkpoint's running statistics gone, as a refused ``zero_init`` of a reparametrized layer
    or ``batchnorm="running"`` without statistics do not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model[1].running_mean.fill_(0.5)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=re.escape(message)):
        MAML(model, **options)
    assert type(model[1]) is nn.BatchNorm1d
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
