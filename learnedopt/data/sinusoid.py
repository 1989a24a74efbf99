"""The sinusoid regression task family of the MAML paper (Finn et al., 2017)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ..values import is_integer, seeded_generator


def sinusoid(x: torch.Tensor, amplitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """``amplitude * sin(x - phase)``, broadcasting (e.g. x (B, K, 1) with amplitude (B, 1, 1))."""
    return amplitude * torch.sin(x - phase)


class SinusoidTasks:
    """Tasks ``y = A sin(x - phase)`` with A ~ U[0.1, 5], phase ~ U[0, pi], inputs x ~ U[-5, 5].

    Draws come from a generator owned by this object, so the task sequence depends only on
    the seed and can be resumed exactly with :meth:`state_dict` / :meth:`load_state_dict`.
    """

    AMPLITUDE_RANGE = (0.1, 5.0)
    PHASE_RANGE = (0.0, math.pi)
    X_RANGE = (-5.0, 5.0)

    def __init__(self, seed: int = 0) -> None:
        self._generator = seeded_generator(seed)

    def _uniform(self, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=self._generator)

    def sample_tasks(
        self, batch: int, k_shot: int, q_query: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw ``batch`` tasks with ``k_shot`` support and ``q_query`` query points each.

        Returns:
            ``(x_support, y_support, x_query, y_query, amplitude, phase)``, all float32:
            x/y_support (B, K, 1), x/y_query (B, Q, 1), amplitude (B,), phase (B,).

        Raises:
            ValueError: ``batch``, ``k_shot`` or ``q_query`` is not an integer >= 0.
        """
        # torch's own errors ("negative dimension", "invalid combination of arguments") name none
        for name, value in (("batch", batch), ("k_shot", k_shot), ("q_query", q_query)):
            if not is_integer(value) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        amplitude = self._uniform((batch,), *self.AMPLITUDE_RANGE)
        phase = self._uniform((batch,), *self.PHASE_RANGE)
        x_support = self._uniform((batch, k_shot, 1), *self.X_RANGE)
        x_query = self._uniform((batch, q_query, 1), *self.X_RANGE)
        a, p = amplitude.view(batch, 1, 1), phase.view(batch, 1, 1)
        return (
            x_support,
            sinusoid(x_support, a, p),
            x_query,
            sinusoid(x_query, a, p),
            amplitude,
            phase,
        )

    def state_dict(self) -> dict[str, Any]:
        """The generator state; loading it makes this object repeat the tasks that follow."""
        return {"generator": self._generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`."""
        self._generator.set_state(state["generator"])
