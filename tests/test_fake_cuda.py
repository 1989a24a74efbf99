"""The CPU stand-in for CUDA's device checks (``tests/fake_cuda.py``) raises where CUDA raises."""

from __future__ import annotations

import pytest
import torch
from fake_cuda import FakeCudaTensor, fake_cuda


def test_fake_cuda_marks_and_follows_devices() -> None:
    with fake_cuda():
        x = torch.arange(5, device="cuda")
        assert isinstance(x, FakeCudaTensor) and x.device.type == "cuda" and x.is_cuda
        assert (x + 1).device.type == "cuda" and (x * torch.tensor(2)).device.type == "cuda"  # a CPU scalar mixes
        assert torch.zeros(2, device=x.device).device.type == "cuda"
        assert torch.arange(3).to(x.device).device.type == "cuda" and torch.arange(3).cuda().device.type == "cuda"
        assert x.cpu().device.type == "cpu" and type(x.to("cpu")) is torch.Tensor
        assert x[torch.tensor([1, 2])].tolist() == [1, 2]  # a CPU index into a cuda tensor
        assert x.to(torch.float64).device.type == "cuda" and int(x.sum()) == 10


@pytest.mark.parametrize("op", [
    lambda x: x + torch.ones(5, dtype=torch.long),
    lambda x: torch.ones(5)[x],
    lambda x: torch.searchsorted(x, torch.tensor([1])),
    lambda x: x != torch.arange(5),
])  # fmt: skip
def test_fake_cuda_refuses_mixed_devices(op) -> None:
    with fake_cuda(), pytest.raises(RuntimeError, match="same device"):
        op(torch.arange(5, device="cuda"))


def test_fake_cuda_tensors_are_not_cpu_tensors_to_numpy_or_is_cpu() -> None:
    """A CUDA tensor says ``is_cpu`` False and has no NumPy view (``.numpy()``, ``np.asarray``
    raise TypeError): a faked one said ``is_cpu`` True and converted, so code that would fail on a
    GPU passed here. Its CPU copy converts, as on CUDA."""
    import numpy as np

    with fake_cuda():
        x = torch.arange(3, device="cuda")
        assert not x.is_cpu and torch.arange(3).is_cpu and x.cpu().is_cpu
        for convert in (lambda t: t.numpy(), np.asarray):
            with pytest.raises(TypeError, match="can't convert cuda:0 device type tensor to numpy"):
                convert(x)
        assert x.cpu().numpy().tolist() == [0, 1, 2] and np.asarray(torch.arange(2)).tolist() == [0, 1]
