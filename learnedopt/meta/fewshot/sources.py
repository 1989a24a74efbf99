"""Task sources of few-shot meta-training: sinusoid regression tasks and Omniglot episodes over
classes split by whole alphabets."""

from __future__ import annotations

import collections
import hashlib
import json

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..loop import (
    ConfigError,
)
from ..tasks import generator_for
from .config import SINUSOID_VALID_QUERIES, FewShotConfig
from .family import FamilySource, import_fewshot_family, is_own_task

#: Omniglot classes are split by whole alphabets (8 in the two small background sets: 5, 1, 2)
OMNIGLOT_SPLIT: dict[str, float] = {"meta_train": 5 / 8, "meta_valid": 1 / 8, "meta_test": 2 / 8}
OMNIGLOT_SPLIT_SEED = 0


class SinusoidSource:
    """Sinusoid regression tasks (:class:`learnedopt.data.SinusoidTasks`); inputs/targets ``(B, K, 1)``."""

    def __init__(self, shots: int, queries: int) -> None:
        self.shots, self.queries = shots, queries

    def batch(self, size: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(x_support, y_support, x_query, y_query)`` of ``size`` tasks drawn from ``seed``."""
        from ...data import SinusoidTasks

        return SinusoidTasks(seed).sample_tasks(size, self.shots, self.queries)[:4]

    def describe(self) -> str:
        """The tasks in a sentence (their distribution, support and query counts, loss), for the model card."""
        return (
            f"sinusoid regression y = A sin(x - phase), A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5]; "
            f"{self.shots} support and {self.queries} query points per task; MSE"
        )


class OmniglotSource:
    """N-way K-shot Q-query episodes of some Omniglot classes; images ``(B, N*K, 1, S, S)``,
    labels ``(B, N*K)`` (0..N-1, grouped by way).

    ``same_alphabet`` / ``same_rotation`` draw each episode's classes from one alphabet / one
    rotation (both: one rotated alphabet); ``augment`` distorts every image it returns by its own
    random affine map, drawn from the batch's seed. ``shots_option`` is the option that set
    ``shots`` (``--shots`` or ``--train-shots``), named when the classes have too few drawings.
    """

    def __init__(self, data: Any, classes: Tensor, ways: int, shots: int, queries: int, same_alphabet: bool,
                 part: str, same_rotation: bool = False, augment: bool = False,
                 shots_option: str = "--shots") -> None:  # fmt: skip
        from ...data import EpisodeSampler

        self.data, self.part, self.classes, self.same_alphabet = data, part, classes, same_alphabet
        self.same_rotation, self.augment = same_rotation, augment
        rotation_index = data.rotation_of_class // 90
        groups = data.alphabet_of_class * 4 * same_alphabet + rotation_index * same_rotation
        try:
            self.sampler = EpisodeSampler(data.labels, classes, ways, shots, queries, groups=groups,
                                          same_group=same_alphabet or same_rotation)  # fmt: skip
        except ValueError as err:
            counts = collections.Counter(data.alphabets[int(a)] for a in data.alphabet_of_class[classes])
            listed = ", ".join(f"{name} {n}" for name, n in sorted(counts.items()))
            drawings = int(torch.bincount(data.labels)[classes].min()) if len(classes) else 0
            if len(classes) >= ways and drawings < shots + queries:  # too few drawings per class, not too few classes
                raise ConfigError(f"--task omniglot, {part} classes: {err}; ask for fewer examples per class "
                                  f"({shots_option} {shots} plus --queries {queries})") from None  # fmt: skip
            option = {"meta_valid": "--valid-alphabets", "meta_test": "--test-alphabets"}.get(part)
            where = f"name other alphabets with {option} or ask" if option else "ask"
            raise ConfigError(
                f"--task omniglot, {part} classes: {err} (classes per alphabet: {listed}); {where} for fewer --ways"
            ) from None

    def batch(self, size: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``size`` episodes drawn from ``seed`` (the sampler's generator is reset to it; the
        distortions, with ``augment``, come from the key ``(seed, 1)``)."""
        from ...data import random_affine, stack_episodes

        self.sampler.load_state_dict({"generator": torch.Generator().manual_seed(seed).get_state()})
        x_s, y_s, x_q, y_q = stack_episodes(self.data.images, [self.sampler.sample() for _ in range(size)])
        if self.augment:
            generator = generator_for(seed, 1)
            x_s, x_q = random_affine(x_s, generator), random_affine(x_q, generator)
        return x_s, y_s, x_q, y_q

    def alphabets(self) -> list[str]:
        """The names of the alphabets this source's classes come from, sorted."""
        return [self.data.alphabets[i] for i in torch.unique(self.data.alphabet_of_class[self.classes]).tolist()]

    def describe(self) -> str:
        """The episodes in a sentence (ways, shots, queries, the alphabets' part, rotations), for the model card."""
        rotated = bool((self.data.rotation_of_class[self.classes] != 0).any())
        s = self.sampler
        return (
            f"Omniglot {s.n_way}-way {s.k_shot}-shot {s.q_query}-query episodes from the {self.part} alphabets "
            f"({', '.join(self.alphabets())}; {len(self.classes)} classes{', with rotations' if rotated else ', unrotated'})"
            f"{', each episode within one alphabet' if self.same_alphabet else ''}"
            f"{', each episode within one rotation' if self.same_rotation else ''}"
            f"{', every image distorted by a random affine map' if self.augment else ''}"
        )


def omniglot_sha256(data: Any) -> str:
    """SHA-256 (hex) of an :class:`~learnedopt.data.OmniglotDataset` as decoded: its images, labels
    and class names, so that a copy of the zips elsewhere agrees and other images do not."""
    digest = hashlib.sha256(data.images.contiguous().numpy().tobytes())
    digest.update(data.labels.numpy().tobytes())
    digest.update(json.dumps([list(c) for c in data.classes]).encode())
    return digest.hexdigest()


def make_sources(config: FewShotConfig) -> tuple[Any, Any, dict[str, list[str]]]:
    """``(meta-train source, validation source, alphabets of each split part)``; the split is
    empty for sinusoid and your own family (a :class:`FamilySource` of each split). Raises
    :class:`ConfigError` when Omniglot is missing or too small, or your own family does not build."""
    train_shots = config.train_shots or config.shots
    if is_own_task(config.task):
        try:
            sources = tuple(
                FamilySource(config.task, import_fewshot_family(config.task, split=split, shots=shots,
                                                                queries=config.queries, data=config.data))
                for split, shots in (("meta_train", train_shots), ("meta_valid", config.shots))
            )  # fmt: skip
        except ValueError as err:
            raise ConfigError(f"--task {config.task}: {err}") from None
        return sources[0], sources[1], {}
    if config.task == "sinusoid":
        return (SinusoidSource(train_shots, config.queries),
                SinusoidSource(config.shots, SINUSOID_VALID_QUERIES), {})  # fmt: skip
    from ...data import load_omniglot

    try:
        data = load_omniglot(config.data, image_size=config.image_size, rotations=True)
    except ImportError as err:  # Pillow (the data extra), not the files: the message says which
        raise ConfigError(f"--task omniglot: {err}") from None
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"--task omniglot needs the Omniglot zips: {err}") from None
    try:
        parts = omniglot_class_splits(data, parse_alphabets(config.valid_alphabets), parse_alphabets(config.test_alphabets))
    except ValueError as err:
        raise ConfigError(f"--task omniglot: {err}") from None
    train = OmniglotSource(data, parts["meta_train"], config.ways, train_shots, config.queries,
                           config.same_alphabet, "meta_train", config.same_rotation, config.augment,
                           "--train-shots" if config.train_shots is not None else "--shots")  # fmt: skip
    valid = OmniglotSource(data, parts["meta_valid"], config.ways, config.shots, config.queries,
                           config.same_alphabet, "meta_valid")  # fmt: skip
    split = {
        name: sorted({data.alphabets[i] for i in data.alphabet_of_class[part].tolist()})
        for name, part in parts.items()
    }
    return train, valid, split


def parse_alphabets(text: str | None) -> list[str] | None:
    """The alphabet names of a comma-separated ``--valid-alphabets`` / ``--test-alphabets`` value."""
    return None if text is None else [name.strip() for name in text.split(",") if name.strip()]


def omniglot_class_splits(
    data: Any, valid_alphabets: Sequence[str] | None = None, test_alphabets: Sequence[str] | None = None
) -> dict[str, Tensor]:
    """The class ids (CPU int64 tensors, whatever the device of ``data``'s tables) of the ``meta_train``,
    ``meta_valid`` and ``meta_test`` parts, split by whole
    alphabets: those named, or (both None) :data:`OMNIGLOT_SPLIT` drawn with seed
    :data:`OMNIGLOT_SPLIT_SEED`. ``meta_train`` (every alphabet not named) keeps the rotated
    classes, ``meta_valid`` and ``meta_test`` only the unrotated characters.

    Raises:
        ValueError: when only one of the two lists is given, a name is not an alphabet of
            ``data``, an alphabet is named twice, or no alphabet is left for meta-training.
    """
    from ...data import class_splits

    if (valid_alphabets is None) != (test_alphabets is None):
        raise ValueError("give both the meta-valid and the meta-test alphabets, or neither")
    if valid_alphabets is None:
        parts = class_splits(data.num_classes, OMNIGLOT_SPLIT, seed=OMNIGLOT_SPLIT_SEED, groups=data.alphabet_of_class)
    else:
        parts = _named_split(data, list(valid_alphabets), list(test_alphabets))
    unrotated = (data.rotation_of_class == 0).cpu()  # the parts are CPU ids (class_splits'), whatever the data's device
    return {name: ids if name == "meta_train" else ids[unrotated[ids]] for name, ids in parts.items()}


def _named_split(data: Any, valid: list[str], test: list[str]) -> dict[str, Tensor]:
    unknown = [name for name in valid + test if name not in data.alphabets]
    if unknown:
        raise ValueError(f"no alphabet {', '.join(map(repr, unknown))} in the data; it has {', '.join(data.alphabets)}")
    if not valid or not test:
        raise ValueError("the meta-valid and the meta-test alphabets must each name at least one alphabet")
    named = valid + test
    repeated = sorted({name for name in named if named.count(name) > 1})
    if repeated:
        raise ValueError(f"alphabet(s) {', '.join(repeated)} named twice; the split's parts must be disjoint")
    if len(named) == len(data.alphabets):
        raise ValueError("every alphabet is meta-valid or meta-test; none is left for meta-training")
    index = {name: i for i, name in enumerate(data.alphabets)}

    def classes(names: list[str]) -> Tensor:
        return torch.isin(data.alphabet_of_class.cpu(), torch.tensor([index[n] for n in names])).nonzero().flatten()

    train = [name for name in data.alphabets if name not in named]
    return {"meta_train": classes(train), "meta_valid": classes(valid), "meta_test": classes(test)}
