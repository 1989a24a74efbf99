"""Parameters sharded as ``DTensor`` (FSDP2's ``fully_shard``, tensor parallelism).

A learned update is coordinatewise, so the optimizer runs it on each rank's local shard, with
the per-coordinate states of that shard kept beside it on the same rank: no communication in the
step itself, and a sharded step equals the unsharded one coordinate for coordinate.

Three things do need the other ranks:

- a gradient placed otherwise than its parameter (a replicated parameter's ``Partial`` gradient
  under tensor parallelism) is redistributed to the parameter's placements first, as
  ``torch.optim``'s DTensor operations do, so that each rank steps on its part of the full gradient;
- the NaN/Inf check: a tensor is skipped or rejected as a whole (``nan_policy``), so the ranks
  agree on its verdict with one all-reduce per device mesh and param group (see :func:`agree_finite`);
- checkpoints: ``state_dict()`` gives each state of a sharded parameter as a ``DTensor`` of
  global shape ``(*lead, *param.shape, *trail)``, sharded like the parameter (its placements
  shifted past the leading dimensions), so ``torch.distributed.checkpoint`` saves every shard
  once and can load it back, also onto another number of ranks or (an unsharded parameter's
  state has that global shape too) into an unsharded model; ``load_state_dict`` takes such
  ``DTensor`` states (redistributing them when their placements differ) and keeps the local part.

Internally a shard's state is stored flat, ``(*lead, local numel, *trail)``, like any
parameter's, so the batched and fused paths need not know about sharding.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Sequence
from types import ModuleType

import torch
import torch.distributed as dist
from torch import Tensor

from ..nn import StateSpec

# torch.distributed.tensor is imported where a DTensor is first needed, not with the library:
# it took 0.5 s of `import learnedopt`'s 0.6 s, for users that shard nothing. No tensor can be a
# DTensor before that module is imported, since DTensor is defined in it.
_DTENSOR_MODULE = "torch.distributed.tensor"


def _dtensor() -> ModuleType:
    """``torch.distributed.tensor`` (imported now if it was not)."""
    import torch.distributed.tensor

    return torch.distributed.tensor


def _dtensor_class() -> type | None:
    """``DTensor``, or None where no tensor can be one yet (its module not imported)."""
    return getattr(sys.modules.get(_DTENSOR_MODULE), "DTensor", None)  # None too while the module is being imported


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a ``DTensor``."""
    dtensor = _dtensor_class()
    return dtensor is not None and isinstance(t, dtensor)


def local(t: Tensor) -> Tensor:
    """The local shard of a ``DTensor`` (sharing its storage), else ``t`` itself."""
    return t.to_local() if is_sharded(t) else t


def placed_like(grad: Tensor, param: Tensor) -> Tensor:
    """``grad`` placed as ``param`` is, so that its local part is the gradient of the parameter's
    local part: as it is where the placements and meshes match (FSDP's gradients), else
    redistributed, a collective over the mesh (under tensor parallelism a replicated
    parameter's gradient may be ``Partial``, each rank holding a part of the sum). A plain
    tensor, or the gradient of a plain parameter, is returned as it is."""
    if not (is_sharded(grad) and is_sharded(param)):
        return grad
    if grad.device_mesh == param.device_mesh and tuple(grad.placements) == tuple(param.placements):
        return grad
    return grad.redistribute(param.device_mesh, param.placements)


def local_all(tensors: Sequence[Tensor]) -> list[Tensor]:
    """:func:`local` of each tensor, looking ``DTensor`` up once for all of them."""
    dtensor = _dtensor_class()
    if dtensor is None:
        return list(tensors)
    return [t.to_local() if isinstance(t, dtensor) else t for t in tensors]


def agree_finite(tensors: Sequence[Tensor], finite: list[bool]) -> list[bool]:
    """``finite[i]`` (this rank's verdict on ``tensors[i]``'s local part) combined over the ranks
    holding the other parts of each ``DTensor``: finite only if finite everywhere. Plain tensors
    keep their verdict. A collective: every rank of each mesh of ``tensors`` must call it.
    Tensors on equal meshes (the same ranks and layout) are judged together, one mesh object or
    several.

    The ranks first agree on one summary per mesh of fixed size (how many of its tensors each
    rank lists, and whether any verdict is False), so that ranks listing different numbers of
    tensors (a rank leaving its empty shards out of its optimizer) still make collectives of one
    size; where every verdict is True that is all. Otherwise the verdicts are combined tensor by
    tensor, in the order each rank lists them, where every rank lists the same tensors (the same
    number of them and the same fingerprint of their global shapes and placements, compared in
    the same all-reduce as the verdicts); where the ranks list different tensors, no tensor can
    be matched with its other parts, and every tensor of that mesh is False."""
    # by equal meshes, not by mesh object: DTensor's caches give an equal mesh as another object,
    # as they please on each rank, and ranks grouping otherwise would make other collectives
    dtensor = _dtensor_class()
    if dtensor is None:
        return list(finite)
    by_mesh: dict[object, list[int]] = {}
    for i, t in enumerate(tensors):
        if isinstance(t, dtensor):
            by_mesh.setdefault(t.device_mesh, []).append(i)
    finite = list(finite)
    # in the meshes' own order, not the order the tensors first name them: a rank leaving a tensor
    # out can name another mesh first, and would wait in one mesh's all-reduce, the others in another's
    for mesh, indices in sorted(by_mesh.items(), key=lambda item: _mesh_order(item[0])):
        count = float(len(indices))
        summary = torch.tensor([count, -count, float(not all(finite[i] for i in indices))], device=mesh.device_type)
        _all_reduce_over(mesh, summary, dist.ReduceOp.MAX)
        most, negated_fewest, any_false = summary.tolist()  # one host sync
        fewest = -negated_fewest
        if not any_false:
            continue
        if most != fewest:
            for i in indices:
                finite[i] = False
            continue
        # the verdicts and the fingerprint of what this rank lists, in one all-reduce: equal counts
        # need not be the same tensors (ranks leaving out others), and a verdict must reach only its own
        key = _fingerprint([tensors[i] for i in indices])
        flags = torch.tensor([int(finite[i]) for i in indices] + [key, -key], dtype=torch.int64, device=mesh.device_type)
        _all_reduce_over(mesh, flags, dist.ReduceOp.MIN)
        *verdicts, fewest_key, negated_most_key = flags.tolist()
        same_lists = fewest_key == -negated_most_key
        for i, flag in zip(indices, verdicts, strict=True):
            finite[i] = same_lists and flag == 1
    return finite


def _fingerprint(tensors: Sequence[Tensor]) -> int:
    """A 62-bit hash, alike on every rank, of the ordered (global shape, placements) of
    ``tensors``: ranks listing the same tensors of a mesh in the same order give the same one.
    Where a rank leaves out only tensors whose shard is empty there, tensors of equal shape and
    placements are empty on the same ranks, so equal fingerprints mean equal lists."""
    text = repr([(tuple(t.shape), tuple(map(repr, t.placements))) for t in tensors])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 2


def _mesh_order(mesh: object) -> tuple:
    """A key that sorts device meshes alike on every rank: device type, shape, ranks, dim names."""
    return (mesh.device_type, tuple(mesh.mesh.shape), tuple(mesh.mesh.flatten().tolist()), tuple(mesh.mesh_dim_names or ()))


def _all_reduce_over(mesh: object, tensor: Tensor, op: object) -> None:
    """All-reduce ``tensor`` in place over every rank of ``mesh`` (each of its dimensions in turn)."""
    for dim in range(mesh.ndim):
        dist.all_reduce(tensor, op=op, group=mesh.get_group(dim))


def state_placements(param: Tensor, spec: StateSpec) -> tuple:
    """The placements of a state of ``param`` shaped ``(*lead, *param.shape, *trail)``."""
    placements = _dtensor()
    Shard, Replicate = placements.Shard, placements.Replicate  # noqa: N806 - the classes' own names
    try:  # FSDP2's placement of a dimension that tensor parallelism shards too (private to PyTorch)
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:
        _StridedShard = None  # noqa: N806
    shifted = []
    for placement in param.placements:
        if isinstance(placement, Shard):
            shifted.append(Shard(placement.dim + len(spec.lead)))
        elif _StridedShard is not None and isinstance(placement, _StridedShard):
            shifted.append(_StridedShard(placement.dim + len(spec.lead), split_factor=placement.split_factor))
        elif isinstance(placement, Replicate):
            shifted.append(placement)
        else:
            raise ValueError(
                f"learned optimizers support parameters sharded with Shard/_StridedShard/Replicate "
                f"placements, got {param.placements}"
            )
    return tuple(shifted)


def to_global(value: Tensor, param: Tensor, spec: StateSpec) -> Tensor:
    """The ``DTensor`` view of the local flat state ``value`` ``(*lead, local numel, *trail)``
    of the sharded ``param`` (no copy)."""
    lead = len(spec.lead)
    shard_shape = local(param).shape
    global_shape = (*spec.lead, *param.shape, *spec.trail)
    stride = torch.empty(global_shape, device="meta").stride()
    shaped = value.reshape(*spec.lead, *shard_shape, *value.shape[lead + 1 :])
    return _dtensor().DTensor.from_local(
        shaped,
        param.device_mesh,
        state_placements(param, spec),
        run_check=False,
        shape=torch.Size(global_shape),
        stride=stride,
    )


def to_local(value: Tensor, param: Tensor, spec: StateSpec, what: str) -> Tensor:
    """The local flat state ``(*lead, local numel, *trail)`` of the sharded ``param`` from a
    saved state: a ``DTensor`` of global shape ``(*lead, *param.shape, *trail)`` (redistributed
    to ``param``'s sharding if needed) or an already local flat tensor.

    Raises:
        ValueError: the saved state does not fit ``param`` (``what`` names it).
    """
    shard = local(param)
    flat_shape = spec.shape(shard.numel())
    if is_sharded(value):
        global_shape = (*spec.lead, *param.shape, *spec.trail)
        if tuple(value.shape) != global_shape:
            raise ValueError(
                f"{what} has global shape {tuple(value.shape)}, expected {global_shape} for a "
                f"sharded {tuple(param.shape)} parameter"
            )
        placements = state_placements(param, spec)
        if tuple(value.placements) != placements or value.device_mesh != param.device_mesh:
            value = value.redistribute(param.device_mesh, placements)
        return value.to_local().reshape(flat_shape)
    if tuple(value.shape) != flat_shape:
        raise ValueError(
            f"{what} is a plain {tuple(value.shape)} tensor; a sharded {tuple(param.shape)} "
            f"parameter (local shard {tuple(shard.shape)}) needs its DTensor state (as state_dict() "
            f"gives it) or the local {flat_shape}"
        )
    return value
