"""Parameters sharded as ``DTensor`` (FSDP2's ``fully_shard``, tensor parallelism).

A learned update is coordinatewise, so the optimizer runs it on each rank's local shard, with
the per-coordinate states of that shard kept beside it on the same rank: no communication in the
step itself, and a sharded step equals the unsharded one coordinate for coordinate.

Three things do need the other ranks:

- a gradient placed otherwise than its parameter (a replicated parameter's ``Partial`` gradient
  under tensor parallelism) is redistributed to the parameter's placements first, as
  ``torch.optim``'s DTensor operations do, so that each rank steps on its part of the full gradient;
- the NaN/Inf check: a tensor is skipped or rejected as a whole (``nan_policy``), so the ranks
  agree on its verdict with one all-reduce per device mesh (see :func:`agree_finite_lists`);
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
from collections.abc import Iterable, Sequence
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
    :func:`agree_finite_lists` of the one list ``tensors``."""
    return agree_finite_lists([tensors], [finite])[0]


def agree_finite_lists(
    lists: Sequence[Sequence[Tensor]], finite: Sequence[Sequence[bool]], joined: Iterable[Tensor] = ()
) -> list[list[bool]]:
    """:func:`agree_finite` of several lists of tensors at once (an optimizer's param groups),
    each judged apart, with one all-reduce per mesh for them all where every verdict is True.
    A collective: every rank of each mesh of the tensors must call it, with as many lists. The
    ranks also join the all-reduces of the meshes of ``joined`` (an optimizer's parameters), so
    that a rank whose lists hold none of a mesh's tensors (its shards of a param group all empty
    and left out, or without a gradient) still joins the ranks that hold some. Tensors on equal
    meshes (the same ranks and layout) are judged together, one mesh object or several.

    The ranks first agree on one summary per mesh of fixed size (how many lists each rank gives,
    a hash of how many of the mesh's tensors each list holds, and whether any verdict is False),
    so that ranks listing different tensors (a rank leaving its empty shards out of its
    optimizer) still make collectives of one size; where every verdict is True that is all.
    Otherwise (where the hashes differ, after one more all-reduce of each list's length) the
    verdicts of the lists that every rank gives as long are combined tensor by tensor, in the
    order each rank lists them, in one all-reduce that also compares a fingerprint of each
    list's global shapes and placements; where a list holding a False differs between the ranks
    in length or fingerprint, no tensor of it can be matched with its other parts, and every
    tensor of that list on that mesh is False."""
    # by equal meshes, not by mesh object: DTensor's caches give an equal mesh as another object,
    # as they please on each rank, and ranks grouping otherwise would make other collectives
    agreed = [list(verdicts) for verdicts in finite]
    dtensor = _dtensor_class()
    if dtensor is None:
        return agreed
    by_mesh: dict[object, list[list[int]]] = {}
    for number, tensors in enumerate(lists):
        for i, t in enumerate(tensors):
            if isinstance(t, dtensor):
                by_mesh.setdefault(t.device_mesh, [[] for _ in lists])[number].append(i)
    for t in joined:
        if isinstance(t, dtensor) and t.device_mesh not in by_mesh:
            by_mesh[t.device_mesh] = [[] for _ in lists]
    # in the meshes' own order, not the order the tensors first name them: a rank leaving a tensor
    # out can name another mesh first, and would wait in one mesh's all-reduce, the others in another's
    for mesh, indices in sorted(by_mesh.items(), key=lambda item: _mesh_order(item[0])):
        any_false = not all(agreed[number][i] for number, listed in enumerate(indices) for i in listed)
        counts = _hash(repr([len(listed) for listed in indices]))  # alike where every list is as long on every rank
        summary = torch.tensor(
            [len(lists), -len(lists), int(any_false), counts, -counts], dtype=torch.int64, device=mesh.device_type
        )
        _all_reduce_over(mesh, summary, dist.ReduceOp.MAX)
        most_lists, negated_fewest_lists, any_false, most_counts, negated_fewest_counts = summary.tolist()  # one host sync
        if not any_false:
            continue
        if most_lists != -negated_fewest_lists:  # no list can be matched with another rank's
            for number, listed in enumerate(indices):
                for i in listed:
                    agreed[number][i] = False
            continue
        matched = list(range(len(lists)))
        if most_counts != -negated_fewest_counts:  # which lists differ in length, and whether they hold a False
            info = []
            for number, listed in enumerate(indices):
                info += [len(listed), -len(listed), -int(not all(agreed[number][i] for i in listed))]
            reduced = torch.tensor(info, dtype=torch.int64, device=mesh.device_type)
            _all_reduce_over(mesh, reduced, dist.ReduceOp.MIN)
            reduced = reduced.tolist()
            matched = []
            for number, listed in enumerate(indices):
                fewest, negated_most, negated_any_false = reduced[3 * number : 3 * number + 3]
                if fewest == -negated_most:
                    matched.append(number)
                elif negated_any_false:  # no tensor of this list can be matched with its other parts
                    for i in listed:
                        agreed[number][i] = False
            if not matched:
                continue
        # the verdicts of the lists every rank gives as long, with each list's fingerprint of what
        # this rank lists (equal counts need not be the same tensors: ranks leaving out others) and
        # whether it holds a False, in one all-reduce: a verdict must reach only its own tensor
        flags = [int(agreed[number][i]) for number in matched for i in indices[number]]
        for number in matched:
            key = _fingerprint([lists[number][i] for i in indices[number]])
            flags += [key, -key, -int(not all(agreed[number][i] for i in indices[number]))]
        reduced = torch.tensor(flags, dtype=torch.int64, device=mesh.device_type)
        _all_reduce_over(mesh, reduced, dist.ReduceOp.MIN)
        reduced = reduced.tolist()
        verdicts, tail = iter(reduced), len(reduced) - 3 * len(matched)
        for place, number in enumerate(matched):
            fewest_key, negated_most_key, negated_any_false = reduced[tail + 3 * place : tail + 3 * place + 3]
            same_tensors = fewest_key == -negated_most_key
            for i in indices[number]:
                flag = next(verdicts)
                if negated_any_false:  # where every verdict of the list is True, each stays True
                    agreed[number][i] = same_tensors and flag == 1
    return agreed


def _fingerprint(tensors: Sequence[Tensor]) -> int:
    """A 62-bit hash, alike on every rank, of the ordered (global shape, placements) of
    ``tensors``: ranks listing the same tensors of a mesh in the same order give the same one.
    Where a rank leaves out only tensors whose shard is empty there, tensors of equal shape and
    placements are empty on the same ranks, so equal fingerprints mean equal lists."""
    return _hash(repr([(tuple(t.shape), tuple(map(repr, t.placements))) for t in tensors]))


def _hash(text: str) -> int:
    """A 62-bit hash of ``text``, alike in every process (``hash`` of a string is not); its
    negation fits an int64 too."""
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
