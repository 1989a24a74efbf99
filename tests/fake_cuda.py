"""CUDA's device checks on a CPU-only machine, for tests of code that must keep its tensors on
the device of its inputs.

Under :func:`fake_cuda`, a tensor made on ``"cuda"`` (``device="cuda"``, ``.to("cuda")``,
``.to(t.device)`` of such a tensor, ``.cuda()``) is a CPU tensor marked as a :class:`FakeCudaTensor`
whose ``.device`` says ``cuda``; an op on a marked tensor gives marked tensors, and one that mixes
a marked tensor with an unmarked one of one dimension or more raises, as CUDA does (stricter in
places: ``cpu.copy_(cuda)``, which CUDA allows, raises, and ``.device`` is ``cuda``, not
``cuda:0``; and it is a stand-in, not CUDA: a run on a GPU remains the test). As on CUDA, a
0-dim CPU tensor mixes with marked ones, a marked tensor may be indexed by a CPU index tensor,
and an unmarked tensor indexed by a marked index raises; a marked tensor says ``is_cpu`` False and,
as on CUDA, has no NumPy view (``.numpy()``, ``np.asarray`` raise TypeError). The values are real, so ``.tolist()``,
``.item()`` and data-dependent code run (unlike on the ``meta`` device).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


class FakeCudaTensor(Tensor):
    """A CPU tensor that :class:`FakeCuda` treats as one on ``cuda``."""

    __torch_function__ = torch._C._disabled_torch_function_impl


def _device_of(value: object) -> torch.device | None:
    """The (faked) device ``value`` names or lives on; None where it is not a device or a tensor."""
    if isinstance(value, Tensor):
        return CUDA if isinstance(value, FakeCudaTensor) else value.device
    if isinstance(value, (str, torch.device)):
        return torch.device(value)
    return None


class FakeCuda(TorchFunctionMode):
    """The mode behind :func:`fake_cuda`."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if func == Tensor.device.__get__:  # a new method-wrapper each access: compared, not `is`
            return _device_of(args[0])
        if func == Tensor.is_cuda.__get__:
            return isinstance(args[0], FakeCudaTensor)
        if func == Tensor.is_cpu.__get__:
            return not isinstance(args[0], FakeCudaTensor) and args[0].device.type == "cpu"
        if func in (Tensor.numpy, Tensor.__array__) and isinstance(args[0], FakeCudaTensor):
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to host memory first.")
        target = None  # the device the call moves to or makes its result on
        if func is Tensor.cpu:
            target = CPU
        elif func is Tensor.cuda:
            target, func, args = CUDA, Tensor.to, (args[0], "cpu")
        elif func is Tensor.to:
            for i, a in enumerate(args[1:], 1):
                if _device_of(a) is not None:
                    target = _device_of(a)
                    args = args[:i] + (a.dtype if isinstance(a, Tensor) else "cpu",) + args[i + 1 :]
                    break
        if kwargs.get("device") is not None:
            target = torch.device(kwargs["device"])
            kwargs["device"] = "cpu"
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        marked = any(isinstance(t, FakeCudaTensor) for t in tensors)
        if target is None and marked:
            indexes_cuda = bool(args) and isinstance(args[0], FakeCudaTensor) and func in (Tensor.__getitem__, Tensor.__setitem__)
            if not indexes_cuda and any(not isinstance(t, FakeCudaTensor) and t.dim() > 0 for t in tensors):
                name = getattr(func, "__name__", str(func))
                raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu! ({name})")
        out = func(*args, **kwargs)
        if target is not None and target.type not in ("cuda", "cpu"):
            return out
        on_cuda = target.type == "cuda" if target is not None else marked

        def mark(t: object) -> object:
            if type(t) not in (Tensor, FakeCudaTensor):  # parameters and other subclasses as they are
                return t
            return t.as_subclass(FakeCudaTensor if on_cuda else Tensor)  # type: ignore[union-attr]

        return tree_map(mark, out)


@contextlib.contextmanager
def fake_cuda() -> Iterator[None]:
    """Run the body with :class:`FakeCuda`'s device checks."""
    with FakeCuda():
        yield
