"""The MAML sinusoid regression task family."""

from __future__ import annotations

import math

import pytest
import torch

from learnedopt.data import SinusoidTasks, sinusoid


def test_shapes_ranges_and_targets() -> None:
    x_s, y_s, x_q, y_q, amplitude, phase = SinusoidTasks(seed=0).sample_tasks(64, 5, 7)
    assert x_s.shape == y_s.shape == (64, 5, 1)
    assert x_q.shape == y_q.shape == (64, 7, 1)
    assert amplitude.shape == phase.shape == (64,)
    for t in (x_s, y_s, x_q, y_q, amplitude, phase):
        assert t.dtype == torch.float32
    assert ((0.1 <= amplitude) & (amplitude <= 5.0)).all()
    assert ((0.0 <= phase) & (phase <= math.pi)).all()
    for x in (x_s, x_q):
        assert ((-5.0 <= x) & (x <= 5.0)).all()
    for x, y in ((x_s, y_s), (x_q, y_q)):
        expected = amplitude[:, None, None] * torch.sin(x - phase[:, None, None])
        torch.testing.assert_close(y, expected)


def test_ranges_are_covered() -> None:
    x, _, x_query, _, amplitude, phase = SinusoidTasks(seed=1).sample_tasks(5000, 2, 2)
    assert amplitude.min() < 0.2 and amplitude.max() > 4.9
    assert phase.min() < 0.05 and phase.max() > math.pi - 0.05
    for points in (x, x_query):
        assert points.min() < -4.99 and points.max() > 4.99
    assert abs(amplitude.mean() - 2.55) < 0.1


def test_sinusoid_function() -> None:
    x = torch.tensor([0.0, math.pi / 2, math.pi])
    torch.testing.assert_close(
        sinusoid(x, torch.tensor(2.0), torch.tensor(math.pi / 2)), torch.tensor([-2.0, 0.0, 2.0])
    )


def test_determinism_and_resume() -> None:
    a, b = SinusoidTasks(seed=5), SinusoidTasks(seed=5)
    for left, right in zip(a.sample_tasks(4, 3, 3), b.sample_tasks(4, 3, 3)):
        assert torch.equal(left, right)
    assert not torch.equal(
        SinusoidTasks(seed=6).sample_tasks(4, 3, 3)[0],
        SinusoidTasks(seed=5).sample_tasks(4, 3, 3)[0],
    )

    state = a.state_dict()
    expected = [a.sample_tasks(2, 4, 4) for _ in range(3)]
    resumed = SinusoidTasks(seed=123)
    resumed.load_state_dict(state)
    for want, got in zip(expected, (resumed.sample_tasks(2, 4, 4) for _ in range(3))):
        for left, right in zip(want, got):
            assert torch.equal(left, right)


@pytest.mark.parametrize(("args", "message"), [
    ((-1, 5, 5), "batch must be an integer >= 0, got -1"),
    ((2, -1, 5), "k_shot must be an integer >= 0, got -1"),
    ((2, 5, -1), "q_query must be an integer >= 0, got -1"),
    ((2.5, 5, 5), "batch must be an integer >= 0, got 2.5"),
    ((2, "5", 5), "k_shot must be an integer >= 0, got '5'"),
    ((2, 5, True), "q_query must be an integer >= 0, got True"),
])  # fmt: skip
def test_bad_sizes_are_named_in_one_line(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SinusoidTasks(0).sample_tasks(*args)
