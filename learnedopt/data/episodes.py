"""Class-disjoint meta-splits and an N-way K-shot episode sampler over any labelled dataset."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..values import is_integer, seeded_generator
from .idx import _split


def class_splits(
    num_classes: int,
    fractions: Mapping[str, float],
    seed: int = 0,
    groups: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Split the class ids ``0..num_classes-1`` into disjoint parts (e.g. meta-train/valid/test).

    Args:
        num_classes: number of classes.
        fractions: part name -> fraction, non-negative and summing to 1.
        seed: seed of the split.
        groups: optional int64 (num_classes,) group id of each class (e.g. an Omniglot
            dataset's ``alphabet_of_class``; map group names to ids in sorted order, not through
            a set, whose order changes with PYTHONHASHSEED). When given, whole groups are
            assigned to parts and ``fractions`` apply to the number of groups, not classes, so
            no group has classes in two parts.

    Returns:
        Part name -> sorted int64 CPU tensor of class ids (with ``groups`` on any device), in the
        order of ``fractions``.

    Raises:
        TypeError: ``fractions`` that is not a mapping.
        ValueError: bad fractions or groups, or a part of a positive fraction that would get no
            class (no group, with ``groups``); the message names the part, its fraction and the
            number of classes (groups) split.
    """
    if groups is None:
        return _split(num_classes, fractions, seed, "classes")
    groups = _class_ids(groups, "groups")
    if groups.shape != (num_classes,):
        raise ValueError(f"groups must have shape ({num_classes},), got {tuple(groups.shape)}")
    group_ids = torch.unique(groups)
    group_parts = _split(len(group_ids), fractions, seed, "groups")
    return {
        name: torch.isin(groups, group_ids[part]).nonzero().flatten()
        for name, part in group_parts.items()
    }


def _class_ids(values: Any, name: str) -> torch.Tensor:
    """``values`` (a tensor, array-like or sequence of integer ids; a set is sorted) as an int64 1-D
    tensor on the CPU (from any device), or a one-line error naming ``name``: strings, a dataset object, one-hot rows, complex
    numbers or floats that are not integers within int64 (0.5, Inf, 1e30) are refused, not cast
    (``.long()`` truncates 0.5 to class 0)."""
    if isinstance(values, (set, frozenset)):
        values = sorted(values)
    elif hasattr(values, "__array__") and not isinstance(values, torch.Tensor):  # e.g. a pandas column
        values = np.asarray(values)
    if not isinstance(values, (torch.Tensor, np.ndarray, list, tuple, range)):
        # a dataset object would be iterated item by item (images and all), then fail obscurely
        raise TypeError(
            f"{name} must be a tensor, array or list of integer ids, got {type(values).__name__}"
            + ("; for a dataset, pass its labels (dataset.labels, torchvision's dataset.targets)" if name == "labels" else "")
        )
    try:
        ids = torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(
            f"{name} must be integer ids, but torch cannot read this {type(values).__name__} as numbers ({e}); map "
            "string labels to ids first, e.g. by {c: i for i, c in enumerate(sorted(set(names)))}"
        ) from None
    # read on the CPU: on a GPU they met the CPU index tensors of the draws (searchsorted raised)
    ids = ids.cpu()
    if sum(size != 1 for size in ids.shape) > 1:
        raise ValueError(
            f"{name} must be a 1-D tensor of ids, one per entry, got shape {tuple(ids.shape)}"
            + (" (one-hot labels? pass labels.argmax(1))" if name == "labels" else "")
        )
    ids = ids.flatten()
    if ids.is_complex():  # cast with only a warning, the imaginary part dropped
        raise TypeError(f"{name} must be integer ids, got complex values ({ids.dtype})")
    if ids.is_floating_point():
        wrong = (ids != ids.round()) | ~ids.isfinite()  # NaN and Inf too: Inf was cast to -2**63
        if bool(wrong.any()):
            raise ValueError(f"{name} must be integer ids, got the non-integral value {ids[wrong][0].item()}")
        outside = (ids < -(2.0**63)) | (ids >= 2.0**63)  # cast to int64 as whatever the cast gives
        if bool(outside.any()):
            raise ValueError(f"{name} must be integer ids from -2**63 to 2**63 - 1, got {ids[outside][0].item():g}")
    return ids.long()


@dataclass(frozen=True)
class Episode:
    """One few-shot task. Examples are grouped by way: way ``j`` is class ``classes[j]``. All five
    tensors are on the CPU (:func:`stack_episodes` moves the labels to the images' device).

    Attributes:
        support_idx: int64 (n_way * k_shot,) dataset indices of the support set.
        support_y: int64 (n_way * k_shot,) episode labels 0..n_way-1.
        query_idx: int64 (n_way * q_query,) dataset indices of the query set.
        query_y: int64 (n_way * q_query,) episode labels 0..n_way-1.
        classes: int64 (n_way,) original class id of each episode label.
    """

    support_idx: torch.Tensor
    support_y: torch.Tensor
    query_idx: torch.Tensor
    query_y: torch.Tensor
    classes: torch.Tensor


def stack_episodes(
    images: torch.Tensor, episodes: Sequence[Episode]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A meta-batch of episodes as tensors.

    Args:
        images: ``(num_examples, *shape)`` examples indexed by the episodes.

    Returns:
        ``(x_support (B, N*K, *shape), y_support (B, N*K), x_query (B, N*Q, *shape), y_query (B, N*Q))``,
        all four on the device of ``images``.

    Raises:
        ValueError: no episodes, or episodes that differ in their numbers of support or query examples.
    """
    if not episodes:  # torch.stack's "expects a non-empty TensorList" named none of this
        raise ValueError("stack_episodes needs at least one episode, got none")
    sizes = sorted({(len(e.support_idx), len(e.query_idx)) for e in episodes})
    if len(sizes) > 1:
        raise ValueError(
            f"stack_episodes needs episodes of one size, got (support, query) sizes {sizes}: "
            "draw them from one sampler (one n_way, k_shot, q_query)"
        )
    return (
        torch.stack([images[e.support_idx] for e in episodes]),
        torch.stack([e.support_y for e in episodes]).to(images.device),  # the episodes' labels are CPU tensors
        torch.stack([images[e.query_idx] for e in episodes]),
        torch.stack([e.query_y for e in episodes]).to(images.device),
    )


class EpisodeSampler:
    """Draws N-way K-shot Q-query episodes from the allowed classes of a labelled dataset.

    Each episode picks ``n_way`` distinct classes uniformly (with ``same_group=True``: first a
    group uniformly among the groups with at least ``n_way`` allowed classes, then the classes
    from it), then ``k_shot + q_query`` distinct examples of each class uniformly. The draws
    come from a generator owned by the sampler, so the episode sequence depends only on the
    seed and can be resumed exactly with :meth:`state_dict` / :meth:`load_state_dict`.

    Args:
        labels: int64 (num_examples,) class id of each example, any integers (gaps allowed), as a
            tensor (on any device: read on the CPU), array or list; map string labels to integer ids first.
        classes: the class ids episodes may use (e.g. one part of :func:`class_splits`); a set is
            taken in sorted order.
        n_way: classes per episode.
        k_shot: support examples per class.
        q_query: query examples per class (may be 0).
        seed: seed of the sampler's generator.
        groups: int64 (num_classes,) group id of each class id (indexed by class id), needed
            for ``same_group``.
        same_group: draw all classes of an episode from one group (e.g. within-alphabet
            Omniglot episodes).

    Raises:
        ValueError: ``n_way``, ``k_shot`` or ``q_query`` not an integer in its range, an allowed
            class has fewer than ``k_shot + q_query`` examples, fewer than
            ``n_way`` classes are allowed, or (``same_group``) no group has ``n_way`` of them;
            labels of two dimensions (one-hot) or non-integral floats.
        TypeError: labels, classes or groups that are not integer ids (strings, a dataset).
    """

    def __init__(
        self,
        labels: torch.Tensor,
        classes: Sequence[int] | torch.Tensor,
        n_way: int,
        k_shot: int,
        q_query: int,
        seed: int = 0,
        groups: torch.Tensor | None = None,
        same_group: bool = False,
    ) -> None:
        # a float passed here failed only at sample(), as a slice index
        if not all(map(is_integer, (n_way, k_shot, q_query))) or n_way < 1 or k_shot < 1 or q_query < 0:
            raise ValueError(
                f"need integers n_way >= 1, k_shot >= 1, q_query >= 0; got {n_way!r}, {k_shot!r}, {q_query!r}"
            )
        labels = _class_ids(labels, "labels")
        classes = _class_ids(classes, "classes")
        if len(torch.unique(classes)) != len(classes):
            raise ValueError("classes contains duplicate class ids")
        if len(classes) < n_way:
            raise ValueError(
                f"{n_way}-way episodes need {n_way} classes, only {len(classes)} are allowed"
            )

        self.n_way, self.k_shot, self.q_query = n_way, k_shot, q_query
        self.classes = classes
        order = torch.argsort(labels, stable=True)
        start = torch.searchsorted(labels[order], classes)
        end = torch.searchsorted(labels[order], classes, right=True)
        counts = end - start
        too_small = (counts < k_shot + q_query).nonzero().flatten()
        if len(too_small):
            shown = ", ".join(
                f"class {int(classes[i])} has {int(counts[i])}" for i in too_small[:5]
            )
            raise ValueError(
                f"{len(too_small)} classes have fewer than k_shot + q_query = "
                f"{k_shot + q_query} examples ({shown}{', ...' if len(too_small) > 5 else ''})"
            )
        # Examples of the i-th allowed class: self._examples[i].
        self._examples = [order[s:e] for s, e in zip(start.tolist(), end.tolist())]

        # Pools of positions into self.classes that one episode may draw from.
        if same_group:
            if groups is None:
                raise ValueError("same_group=True needs groups")
            groups = _class_ids(groups, "groups")
            if len(groups) <= int(classes.max()):
                raise ValueError(
                    f"groups has {len(groups)} entries but class id {int(classes.max())} is used"
                )
            if int(classes.min()) < 0:  # groups[-1] would silently name the last class's group
                raise ValueError(
                    f"groups is indexed by class id, but class id {int(classes.min())} is negative"
                )
            class_groups = groups[classes]
            pools = [(class_groups == g).nonzero().flatten() for g in torch.unique(class_groups)]
            self._pools = [pool for pool in pools if len(pool) >= n_way]
            if not self._pools:
                raise ValueError(
                    f"same_group=True: no group has {n_way} allowed classes (largest has "
                    f"{max(len(pool) for pool in pools)})"
                )
        else:
            self._pools = [torch.arange(len(classes))]

        self._generator = seeded_generator(seed)

    def sample(self) -> Episode:
        """Draw the next episode (see :class:`Episode` for shapes and ordering)."""
        gen = self._generator
        pool = self._pools[int(torch.randint(len(self._pools), (1,), generator=gen))]
        ways = pool[torch.randperm(len(pool), generator=gen)[: self.n_way]]
        support, query = [], []
        for way in ways.tolist():
            examples = self._examples[way]
            chosen = examples[
                torch.randperm(len(examples), generator=gen)[: self.k_shot + self.q_query]
            ]
            support.append(chosen[: self.k_shot])
            query.append(chosen[self.k_shot :])
        episode_labels = torch.arange(self.n_way)
        return Episode(
            support_idx=torch.cat(support),
            support_y=episode_labels.repeat_interleave(self.k_shot),
            query_idx=torch.cat(query),
            query_y=episode_labels.repeat_interleave(self.q_query),
            classes=self.classes[ways],
        )

    def state_dict(self) -> dict[str, Any]:
        """The generator state; loading it makes the sampler repeat the episodes that follow."""
        return {"generator": self._generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`."""
        self._generator.set_state(state["generator"])
