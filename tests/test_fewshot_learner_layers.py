"""Layers that run differently under ``vmap`` through both few-shot learners whose meta-loss is
differentiable, MAML's and meta-lstm's (:class:`learnedopt.meta.fewshot.FewShotLearner`): each
checked against a reference, the same computation where ``vmap`` has nothing to refuse or a
loop over the tasks."""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

from learnedopt.meta.fewshot import FewShotLearner
from learnedopt.meta.fewshot.learner import LearnerSpec

ALGOS = ("maml", "meta-lstm")


class Family:
    """A few-shot family of one network, for :class:`FewShotLearner`."""

    loss = "cross_entropy"

    def __init__(self, make: Callable[[], nn.Module]) -> None:
        self.make = make

    def model(self) -> nn.Module:
        return self.make()


def learner(algo: str, make: Callable[[], nn.Module], steps: int = 2) -> FewShotLearner:
    """A learner of ``algo`` over ``make()``'s network, seeded 0 (model and rule)."""
    spec = LearnerSpec(algo=algo, architecture={"kind": "own", "family": "tests:Family"}, loss="own",
                       inner_steps=steps, test_inner_steps=steps, inner_lr=None if algo == "meta-lstm" else 0.1,
                       rule={"kind": "MetaLSTMCell", "config": {}} if algo == "meta-lstm" else None)  # fmt: skip
    return FewShotLearner(spec, seed=0, family=Family(make))


def episode(shape: tuple[int, ...], tasks: int = 3, shots: int = 4, ways: int = 3, seed: int = 1):
    """``tasks`` tasks of ``shots`` support and query examples of ``shape``, labels < ``ways``."""
    g = torch.Generator().manual_seed(seed)
    x_s, x_q = (torch.randn(tasks, shots, *shape, generator=g) for _ in range(2))
    y_s, y_q = (torch.randint(0, ways, (tasks, shots), generator=g) for _ in range(2))
    return x_s, y_s, x_q, y_q


def meta_grads(learner: FewShotLearner, data) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The meta-loss of ``data`` and its gradient w.r.t. every meta-parameter."""
    loss = learner.meta_loss(*data)
    return loss.detach(), [g.detach() for g in torch.autograd.grad(loss, learner.meta_parameters())]


def instance_norm_net(track_running_stats: bool) -> nn.Module:
    """(N, 8) -> (N, 3) through an InstanceNorm2d over 2 channels of 2x2 (no convolution: MAML
    tries vmap first on the CPU too)."""
    return nn.Sequential(nn.Linear(8, 8), nn.Unflatten(1, (2, 2, 2)), nn.InstanceNorm2d(2, track_running_stats=track_running_stats),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))  # fmt: skip


@pytest.mark.parametrize("algo", ALGOS)
def test_a_norm_layer_updating_running_stats_is_run_task_by_task_with_the_results_of_one_without(algo: str) -> None:
    """vmap cannot batch the in-place update of an InstanceNorm2d's running statistics: MAML
    loops over the tasks with a warning; meta-lstm failed with PyTorch's "Batch
    norm got a batched tensor as input while the running_mean or running_var, which will be
    updated in place, were not batched". In training mode the layer normalises with each
    input's own statistics, so the meta-loss, meta-gradient and adaptation are those of the same
    network without running statistics (run under vmap)."""
    data = episode((8,))
    reference = learner(algo, lambda: instance_norm_net(False))
    tracking = learner(algo, lambda: instance_norm_net(True))
    expected_loss, expected_grads = meta_grads(reference, data)
    with pytest.warns(UserWarning, match=f"{'MAML' if algo == 'maml' else 'meta-lstm'}: layer '2' .*; looping over tasks"):
        loss, grads = meta_grads(tracking, data)
    torch.testing.assert_close(loss, expected_loss)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)
    stats = tracking.model[2].running_mean
    assert stats.abs().sum() > 0  # the loop's forward passes updated them, as the layer does in training
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the loop from now on, as MAML's vectorize="auto": no second warning
        tracking.meta_loss(*data)
        adapted = tracking.adapt(data[0][0], data[1][0])
    expected = reference.adapt(data[0][0], data[1][0])
    assert adapted.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(adapted[name], expected[name])


def per_task_query_losses(learner: FewShotLearner, data) -> torch.Tensor:
    """Each task's query loss after the inner loop, ``(B,)``."""
    if learner.maml is not None:
        return learner.maml.query_losses(*data, every_step=False)[:, -1]
    return learner._unroll(*data, learner.spec.inner_steps, learner.rule).losses[-1]


@pytest.mark.parametrize("algo", ALGOS)
def test_dropout_in_training_mode_draws_its_own_masks_for_each_task(algo: str) -> None:
    """Dropout under vmap needs randomness="different" (MAML's): meta-lstm's vmap, in its
    default "error" mode, failed with "vmap: called random operation while in randomness error
    mode" (then, since its loop fallback, looped over the tasks with a warning). The same task
    repeated gives each copy its own masks, so its own query loss; a meta-step's meta-loss and
    meta-gradient are finite, and ``eval()`` turns dropout off (every copy's loss the same)."""
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))  # noqa: E731
    x_s, y_s, x_q, y_q = episode((6,), tasks=1, shots=8)
    same = tuple(t.expand(4, *t.shape[1:]) for t in (x_s, y_s, x_q, y_q))
    fewshot = learner(algo, make)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # under vmap, not a fallback to the loop
        losses = per_task_query_losses(fewshot, same)
        assert losses.shape == (4,) and len(set(losses.tolist())) == 4, losses
        loss, grads = meta_grads(fewshot, same)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    fewshot.model.eval()
    losses = per_task_query_losses(fewshot, same).detach()
    torch.testing.assert_close(losses, losses[:1].expand(4))


class Bag(nn.Module):
    """Token ids (N, L) -> (N, 3): embedding with a padding index, mean over the tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4, padding_idx=0)
        self.head = nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids).mean(1))


@pytest.mark.parametrize("algo", ALGOS)
def test_an_embeddings_padding_row_adapts_as_in_a_task_by_task_run(algo: str) -> None:
    """Under vmap the embedding's batching rule gave the padding row of every task but the first
    a gradient (MAML runs it with that row detached): meta-lstm's rule read it, so the tasks of
    a meta-batch adapted otherwise than each alone (the embedding's meta-gradient 8% off). The
    meta-loss and meta-gradient of B tasks are the mean of each task's alone."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 5, (3, 8, 6), generator=g)  # many padding tokens (id 0)
    labels = torch.randint(0, 3, (3, 8), generator=g)
    data = (ids[:, :4], labels[:, :4], ids[:, 4:], labels[:, 4:])
    fewshot = learner(algo, Bag)
    loss, grads = meta_grads(fewshot, data)
    alone = [meta_grads(fewshot, tuple(t[b : b + 1] for t in data)) for b in range(3)]
    torch.testing.assert_close(loss, sum(one[0] for one in alone) / 3)
    for i, got in enumerate(grads):
        torch.testing.assert_close(got, sum(one[1][i] for one in alone) / 3)


@pytest.mark.parametrize("algo", ALGOS)
def test_the_fallback_warning_names_the_layer_whose_running_statistics_vmap_cannot_batch(algo: str) -> None:
    """The warning quoted vmap's three-line "Batch norm got a batched tensor as input while the
    running_mean or running_var, which will be updated in place, were not batched. If you are
    using a module ...", naming no layer (and no InstanceNorm: "Batch norm")."""
    tracking = learner(algo, lambda: instance_norm_net(True))
    with pytest.warns(UserWarning) as record:
        tracking.meta_loss(*episode((8,)))
    messages = [str(w.message) for w in record if "vmap" in str(w.message)]
    who = "MAML" if algo == "maml" else "meta-lstm"
    assert messages == [
        f"{who}: layer '2' (InstanceNorm2d, track_running_stats=True) updates its running "
        "statistics in place in training, which vmap cannot batch; looping over tasks"
    ]


def test_maml_with_vectorize_true_names_the_layer_whose_running_statistics_vmap_cannot_batch() -> None:
    """vectorize=True let vmap's three-line error through, naming no layer."""
    from learnedopt.meta import MAML

    maml = MAML(instance_norm_net(True), inner_lr=0.1, vectorize=True)
    with pytest.raises(RuntimeError) as info:
        maml(*episode((8,)))
    assert str(info.value) == (
        "MAML(vectorize=True): layer '2' (InstanceNorm2d, track_running_stats=True) updates its running statistics in "
        "place in training, which vmap cannot batch: use vectorize='auto' or False (a loop over the tasks), or "
        "track_running_stats=False (the same outputs in training, no statistics kept)"
    )


class TiedLayers(nn.Module):
    """Two layers holding one weight Parameter (tied), each with its own bias."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.b(torch.tanh(self.a(x)))))


class ScaledByBuffer(nn.Module):
    """Inputs scaled by a constant buffer (not a norm statistic) before a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 3)
        self.register_buffer("scale", torch.linspace(0.5, 2.0, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * self.scale)


class LogitsAndPenalty(nn.Module):
    """Returns a tuple: the logits and a penalty, which the family's own loss reads."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.linear(x)
        return logits, logits.pow(2).mean()


class TupleLossFamily(Family):
    def loss(self, outputs: tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs[0], targets) + 0.1 * outputs[1]


MODELS = {
    "group_norm": lambda: nn.Sequential(nn.Unflatten(1, (4, 2)), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(8, 3)),
    "layer_norm": lambda: nn.Sequential(nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)),
    "rms_norm": lambda: nn.Sequential(nn.RMSNorm(8), nn.Tanh(), nn.Linear(8, 3)),
    "affine_instance_norm": lambda: nn.Sequential(nn.Unflatten(1, (2, 4)), nn.InstanceNorm1d(2, affine=True), nn.Flatten(),
                                                  nn.Linear(8, 3)),  # fmt: skip
    # no bias before the norm: it cancels it, so its meta-gradient would be rounding noise alone
    "batch_norm_1d": lambda: nn.Sequential(nn.Linear(8, 8, bias=False), nn.BatchNorm1d(8), nn.Linear(8, 3)),
    "instance_norm_eval": lambda: instance_norm_net(True).eval(),  # normalises with the running statistics, unchanged
    "tied": TiedLayers,
    "constant_buffer": ScaledByBuffer,
    "tuple_output": LogitsAndPenalty,
}


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("name", MODELS)
def test_the_tasks_of_a_meta_batch_learn_as_each_alone(algo: str, name: str) -> None:
    """Each task's inner loop sees its own data only, under vmap (no warning: no fallback to the
    loop): the meta-loss and meta-gradient of B tasks are the mean of each task's alone, the
    model's buffers are left as they were, and ``adapt`` moves the parameters to finite values."""
    make = MODELS[name]
    family = TupleLossFamily(make) if name == "tuple_output" else Family(make)
    spec = learner(algo, make).spec
    fewshot = FewShotLearner(spec, seed=0, family=family)
    buffers = {k: b.clone() for k, b in fewshot.model.named_buffers()}
    data = episode((8,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, grads = meta_grads(fewshot, data)
        alone = [meta_grads(fewshot, tuple(t[b : b + 1] for t in data)) for b in range(3)]
    torch.testing.assert_close(loss, sum(one[0] for one in alone) / 3)
    for i, got in enumerate(grads):
        torch.testing.assert_close(got, sum(one[1][i] for one in alone) / 3)
    for k, b in fewshot.model.named_buffers():
        assert torch.equal(b, buffers[k]), k
    adapted = fewshot.adapt(data[0][0], data[1][0])
    initial = dict(fewshot.model.named_parameters())
    assert adapted.keys() == initial.keys()
    assert all(torch.isfinite(v).all() for v in adapted.values())
    assert any(not torch.equal(v, initial[k]) for k, v in adapted.items())


class MaxNormBag(Bag):
    """:class:`Bag` whose embedding renormalises the rows it looks up to norm 0.5, in place."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4, max_norm=0.5)


@pytest.mark.parametrize("algo", ALGOS)
def test_an_embedding_with_max_norm_runs_task_by_task_naming_the_layer(algo: str) -> None:
    """``nn.Embedding(max_norm=...)`` renormalises the weight in place, which vmap cannot run:
    meta-lstm's vmap attempt renormalised the unroll's per-task parameters in place before
    failing, and its fallback then failed with "Output 0 of ReshapeAlias is a view and its base
    or another view of its base has been modified inplace" (and its loop alone lost the weight's
    gradient: "the task batch's loss at step 0 does not depend on params ['embed.weight']").
    Both learners now loop at once, with a warning naming the layer, and a meta-batch learns as
    its tasks alone."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 5, (3, 8, 6), generator=g)
    labels = torch.randint(0, 3, (3, 8), generator=g)
    data = (ids[:, :4], labels[:, :4], ids[:, 4:], labels[:, 4:])
    fewshot = learner(algo, MaxNormBag)
    who = "MAML" if algo == "maml" else "meta-lstm"
    with pytest.warns(UserWarning) as record:
        loss, grads = meta_grads(fewshot, data)
    assert [str(w.message) for w in record if who in str(w.message)] == [
        f"{who}: layer 'embed' (Embedding, max_norm=0.5) renormalises its weight in place, which vmap cannot run; "
        "looping over tasks"
    ]
    alone = [meta_grads(fewshot, tuple(t[b : b + 1] for t in data)) for b in range(3)]
    torch.testing.assert_close(loss, sum(one[0] for one in alone) / 3)
    for i, got in enumerate(grads):
        torch.testing.assert_close(got, sum(one[1][i] for one in alone) / 3)
    assert all(torch.isfinite(v).all() for v in fewshot.adapt(data[0][0], data[1][0]).values())


class WithAuxiliaryHead(nn.Module):
    """(N, 5) -> (N, 3) logits; ``aux``, built last, takes no part in the loss (a head kept for
    another use)."""

    def __init__(self, aux: bool = True) -> None:
        super().__init__()
        self.body = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)
        if aux:
            self.aux = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


@pytest.mark.parametrize("loop", [False, True])
@pytest.mark.parametrize("algo", ALGOS)
def test_a_parameter_the_loss_does_not_use_gets_a_zero_inner_gradient(algo: str, loop: bool) -> None:
    """As in MAML, a parameter the loss does not use gets a zero inner gradient: meta-lstm failed
    with the unroll's "the task batch's loss at step 0 does not depend on params ['aux.weight',
    'aux.bias']: every parameter init_params returns must take part in the loss", which a few-shot
    run has no init_params to read by. The rule works coordinate by coordinate, so the used
    parameters adapt, and the meta-loss and its meta-gradient are, as without that layer."""
    data = episode((5,))
    with_aux, without = learner(algo, WithAuxiliaryHead), learner(algo, lambda: WithAuxiliaryHead(aux=False))
    if loop:  # the task loop, as for a model that cannot run under vmap
        with_aux._vectorize = without._vectorize = False
        for fewshot in (with_aux, without):
            if fewshot.maml is not None:
                fewshot.maml.vectorize = False
    loss = with_aux.meta_loss(*data)
    expected = without.meta_loss(*data)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)
    used = [p for name, p in with_aux.model.named_parameters() if not name.startswith("aux.")]
    rest = [] if with_aux.rule is None else list(with_aux.rule.parameters())
    grads = torch.autograd.grad(loss, used + rest)
    for got, want in zip(grads, torch.autograd.grad(expected, without.meta_parameters()), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    adapted = with_aux.adapt(data[0][0], data[1][0])
    alone = without.adapt(data[0][0], data[1][0])
    for name, value in alone.items():
        torch.testing.assert_close(adapted[name], value, rtol=0, atol=1e-6)


@pytest.mark.parametrize("algo", ALGOS)
def test_evaluate_scores_class_probability_targets_as_their_labels(algo: str) -> None:
    """Cross-entropy takes class probabilities of the outputs' shape as targets, but evaluate's
    accuracy compared ``outputs.argmax(1)`` ``(N,)`` with the ``(N, C)`` probabilities: broadcast
    where N = C (3 queries of 3 classes here) to a meaningless score, else a shape error. One-hot
    targets now score as their labels do."""
    data = episode((5,), shots=3)
    one_hot = tuple(nn.functional.one_hot(t, 3).float() if i % 2 else t for i, t in enumerate(data))
    spec = dataclasses.replace(learner(algo, nn.Identity).spec, loss="cross_entropy")  # as a family naming it gets
    fewshot = FewShotLearner(spec, seed=0, family=Family(lambda: nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))))
    by_labels = fewshot.evaluate(*data)
    by_probabilities = fewshot.evaluate(*one_hot)
    assert by_probabilities["accuracy"] == by_labels["accuracy"]
    assert by_probabilities["loss"] == pytest.approx(by_labels["loss"], rel=1e-6)


class OneElementLossFamily(Family):
    """:class:`Family` whose loss is cross-entropy as a ``(1,)`` tensor (a ``keepdim`` reduction)."""

    @staticmethod
    def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs, targets).reshape(1)


class PerExampleLossFamily(Family):
    @staticmethod
    def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs, targets, reduction="none")


@pytest.mark.parametrize("loop", [False, True])
@pytest.mark.parametrize("algo", ALGOS)
def test_a_one_element_loss_is_a_scalar_and_a_per_example_one_is_refused_naming_loss_fn(algo: str, loop: bool) -> None:
    """As in MAML: a family's loss of one element is read as a scalar (meta-lstm refused it with
    the unroll's "the task batch's loss at step 0 has shape (3, 1) ...", naming no loss_fn), and a
    per-example loss is refused in one line naming loss_fn."""
    make = lambda: nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))  # noqa: E731
    data = episode((5,))
    learners = {name: FewShotLearner(learner(algo, make).spec, seed=0, family=family(make))
                for name, family in (("plain", Family), ("one", OneElementLossFamily), ("per-example", PerExampleLossFamily))}  # fmt: skip
    if loop:
        for fewshot in learners.values():
            fewshot._vectorize = False
            if fewshot.maml is not None:
                fewshot.maml.vectorize = False
    torch.testing.assert_close(learners["one"].meta_loss(*data), learners["plain"].meta_loss(*data), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=re.escape("loss_fn must return a scalar tensor (one element), got a tensor of shape (4,)")):
        learners["per-example"].meta_loss(*data)
