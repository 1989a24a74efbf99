"""Layers that run differently under ``vmap`` through both few-shot learners whose meta-loss is
differentiable, MAML's and meta-lstm's (:class:`learnedopt.meta.fewshot.FewShotLearner`): each
checked against a reference, the same computation where ``vmap`` has nothing to refuse or a
loop over the tasks."""

from __future__ import annotations

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
    falls back to a loop over the tasks with a warning; meta-lstm failed with PyTorch's "Batch
    norm got a batched tensor as input while the running_mean or running_var, which will be
    updated in place, were not batched". In training mode the layer normalises with each
    input's own statistics, so the meta-loss, meta-gradient and adaptation are those of the same
    network without running statistics (run under vmap)."""
    data = episode((8,))
    reference = learner(algo, lambda: instance_norm_net(False))
    tracking = learner(algo, lambda: instance_norm_net(True))
    expected_loss, expected_grads = meta_grads(reference, data)
    with pytest.warns(UserWarning, match=f"(?s){'MAML' if algo == 'maml' else 'meta-lstm'}: vmap over tasks failed.*looping over tasks"):
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

