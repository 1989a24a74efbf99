"""Class-disjoint meta-splits and the N-way K-shot episode sampler."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learnedopt.data import Episode, EpisodeSampler, class_splits, split_indices, stack_episodes

FRACTIONS = {"meta_train": 0.6, "meta_valid": 0.2, "meta_test": 0.2}


def make_labels(counts: list[int], seed: int = 0) -> torch.Tensor:
    """Shuffled labels with ``counts[c]`` examples of class ``c``."""
    labels = torch.arange(len(counts)).repeat_interleave(torch.tensor(counts))
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


def assert_partition(parts: dict[str, torch.Tensor], n: int) -> None:
    assert torch.equal(torch.cat(list(parts.values())).sort().values, torch.arange(n))


# class_splits -------------------------------------------------------------------------------


def test_class_splits_disjoint_and_deterministic() -> None:
    parts = class_splits(100, FRACTIONS, seed=1)
    assert list(parts) == list(FRACTIONS)
    assert [len(p) for p in parts.values()] == [60, 20, 20]
    assert_partition(parts, 100)
    again = class_splits(100, FRACTIONS, seed=1)
    assert all(torch.equal(parts[k], again[k]) for k in parts)
    assert not torch.equal(parts["meta_test"], class_splits(100, FRACTIONS, seed=2)["meta_test"])


def test_class_splits_whole_groups() -> None:
    # 10 groups with ids that are neither contiguous nor sorted, of different sizes.
    group_ids = [70, 3, 12, 5, 40, 8, 99, 1, 23, 60]
    groups = torch.tensor([g for i, g in enumerate(group_ids) for _ in range(i + 1)])
    parts = class_splits(len(groups), FRACTIONS, seed=0, groups=groups)
    assert_partition(parts, len(groups))
    held = [set(groups[part].tolist()) for part in parts.values()]
    assert [len(h) for h in held] == [6, 2, 2]  # fractions count groups, not classes
    assert not (held[0] & held[1] or held[0] & held[2] or held[1] & held[2])


@settings(max_examples=40, deadline=None)
@given(
    groups=st.lists(st.integers(0, 6), min_size=1, max_size=60),
    seed=st.integers(0, 1000),
)
def test_class_splits_groups_never_straddle(groups: list[int], seed: int) -> None:
    group_tensor = torch.tensor(groups)
    if len(set(groups)) < 4:  # 3 groups by 0.6/0.2/0.2 are 2, 1 and 0: an empty part is refused
        with pytest.raises(ValueError, match=f"splitting {len(set(groups))} groups by .* empty"):
            class_splits(len(groups), FRACTIONS, seed=seed, groups=group_tensor)
        return
    parts = class_splits(len(groups), FRACTIONS, seed=seed, groups=group_tensor)
    assert all(len(part) for part in parts.values())
    assert_partition(parts, len(groups))
    owner: dict[int, str] = {}
    for name, part in parts.items():
        for g in group_tensor[part].tolist():
            assert owner.setdefault(g, name) == name


def test_class_splits_refuses_a_part_that_would_get_no_class_or_group() -> None:
    """20 classes by 0.8/0.175/0.025 gave meta_test no class, and alphabets by Omniglot's 5/8,
    1/8, 2/8 (4 alphabets) no meta-valid alphabet: refused only when an episode sampler met the empty part."""
    fractions = {"meta_train": 0.8, "meta_valid": 0.175, "meta_test": 0.025}
    with pytest.raises(ValueError, match=r"splitting 20 classes by .* leaves part 'meta_test' \(fraction 0.025\) empty"):
        class_splits(20, fractions)
    omniglot = {"meta_train": 5 / 8, "meta_valid": 1 / 8, "meta_test": 2 / 8}
    groups = torch.arange(40) // 10  # 4 groups (alphabets) of 10 classes: 2.5, 0.5 and 1 groups
    with pytest.raises(ValueError, match=r"splitting 4 groups by .* leaves part 'meta_valid' \(fraction 0.125\) empty: it needs more groups"):
        class_splits(40, omniglot, groups=groups)
    assert [len(p) for p in class_splits(80, omniglot, groups=torch.arange(80) // 10).values()] == [50, 10, 20]


def test_class_splits_group_shape_checked() -> None:
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        class_splits(5, FRACTIONS, groups=torch.zeros(4, dtype=torch.long))


def test_class_splits_refuses_group_names_pointing_at_a_sorted_mapping() -> None:
    """Alphabet names as groups raised torch's "too many dimensions 'str'"; ids mapped through a
    set would split differently under each PYTHONHASHSEED, so the message says sorted."""
    names = ["Greek", "Latin", "Korean", "Tamil", "Greek"]
    with pytest.raises(TypeError, match=r"groups must be integer ids.*enumerate\(sorted\(set\(names\)\)\)"):
        class_splits(5, FRACTIONS, groups=names)
    ids = {name: i for i, name in enumerate(sorted(set(names)))}
    parts = class_splits(5, FRACTIONS, groups=[ids[name] for name in names])
    assert torch.equal(parts["meta_train"], class_splits(5, FRACTIONS, groups=torch.tensor([0, 2, 1, 3, 0]))["meta_train"])


# EpisodeSampler -----------------------------------------------------------------------------


def check_episode(
    episode: Episode, labels: torch.Tensor, allowed: torch.Tensor, n: int, k: int, q: int
) -> None:
    assert episode.support_idx.shape == (n * k,) and episode.query_idx.shape == (n * q,)
    for t in (
        episode.support_idx,
        episode.support_y,
        episode.query_idx,
        episode.query_y,
        episode.classes,
    ):
        assert t.dtype == torch.int64
    assert episode.support_y.tolist() == [j for j in range(n) for _ in range(k)]
    assert episode.query_y.tolist() == [j for j in range(n) for _ in range(q)]
    assert len(set(episode.classes.tolist())) == n
    assert torch.isin(episode.classes, allowed).all()
    # Relabelling: way j holds examples of class classes[j] only.
    assert torch.equal(labels[episode.support_idx], episode.classes[episode.support_y])
    assert torch.equal(labels[episode.query_idx], episode.classes[episode.query_y])
    everything = torch.cat([episode.support_idx, episode.query_idx])
    assert len(everything.unique()) == len(everything)  # support and query never overlap


def test_episode_shapes_and_relabelling() -> None:
    labels = make_labels([8] * 12)
    allowed = torch.tensor([0, 2, 3, 5, 7, 8, 11])
    sampler = EpisodeSampler(labels, allowed, n_way=5, k_shot=2, q_query=3, seed=0)
    seen = set()
    for _ in range(50):
        episode = sampler.sample()
        check_episode(episode, labels, allowed, 5, 2, 3)
        seen.update(episode.classes.tolist())
    assert seen == set(allowed.tolist())


def test_zero_query_and_full_class() -> None:
    labels = make_labels([3, 3, 3])
    episode = EpisodeSampler(labels, [0, 1, 2], n_way=3, k_shot=3, q_query=0).sample()
    check_episode(episode, labels, torch.arange(3), 3, 3, 0)
    assert sorted(episode.support_idx.tolist()) == list(range(9))


def test_examples_are_drawn_from_the_whole_class() -> None:
    # k_shot + q_query = 2 of 10 examples per class: over many episodes every example is used,
    # in support and in query, not only the first ones in dataset order
    labels = make_labels([10] * 5)
    sampler = EpisodeSampler(labels, range(5), n_way=5, k_shot=1, q_query=1, seed=0)
    episodes = [sampler.sample() for _ in range(100)]
    assert set(torch.cat([e.support_idx for e in episodes]).tolist()) == set(range(50))
    assert set(torch.cat([e.query_idx for e in episodes]).tolist()) == set(range(50))


def test_stack_episodes_gathers_each_episodes_support_and_query() -> None:
    labels = make_labels([6] * 4)
    images = torch.arange(len(labels), dtype=torch.float32).view(-1, 1, 1).expand(-1, 2, 3)  # image i is all i
    sampler = EpisodeSampler(labels, range(4), n_way=3, k_shot=2, q_query=2, seed=0)
    episodes = [sampler.sample() for _ in range(3)]
    x_s, y_s, x_q, y_q = stack_episodes(images, episodes)
    assert x_s.shape == x_q.shape == (3, 6, 2, 3) and y_s.shape == y_q.shape == (3, 6)
    for b, e in enumerate(episodes):
        assert torch.equal(x_s[b, :, 0, 0], e.support_idx.float()) and torch.equal(y_s[b], e.support_y)
        assert torch.equal(x_q[b, :, 0, 0], e.query_idx.float()) and torch.equal(y_q[b], e.query_y)


def test_stack_episodes_refuses_episodes_of_different_sizes() -> None:
    labels = make_labels([6] * 4)
    images = torch.zeros(len(labels), 2)
    three = EpisodeSampler(labels, range(4), n_way=3, k_shot=1, q_query=2, seed=0).sample()
    two = EpisodeSampler(labels, range(4), n_way=2, k_shot=1, q_query=2, seed=0).sample()
    with pytest.raises(ValueError, match=r"episodes of one size, got \(support, query\) sizes \[\(2, 4\), \(3, 6\)\]"):
        stack_episodes(images, [three, two])


def test_determinism_and_seeds() -> None:
    labels = make_labels([10] * 20)

    def run(seed: int) -> list[torch.Tensor]:
        sampler = EpisodeSampler(labels, range(20), n_way=5, k_shot=1, q_query=4, seed=seed)
        return [
            torch.cat([e.support_idx, e.query_idx]) for e in (sampler.sample() for _ in range(10))
        ]

    assert all(torch.equal(a, b) for a, b in zip(run(7), run(7)))
    assert not all(torch.equal(a, b) for a, b in zip(run(7), run(8)))


def test_resume_from_state_dict() -> None:
    labels = make_labels([10] * 20)
    sampler = EpisodeSampler(labels, range(20), n_way=5, k_shot=2, q_query=3, seed=1)
    for _ in range(3):
        sampler.sample()
    state = sampler.state_dict()
    expected = [sampler.sample() for _ in range(5)]

    resumed = EpisodeSampler(labels, range(20), n_way=5, k_shot=2, q_query=3, seed=999)
    resumed.load_state_dict(state)
    for want, got in zip(expected, (resumed.sample() for _ in range(5))):
        assert torch.equal(want.support_idx, got.support_idx)
        assert torch.equal(want.query_idx, got.query_idx)
        assert torch.equal(want.classes, got.classes)


def test_state_dict_is_a_snapshot() -> None:
    sampler = EpisodeSampler(make_labels([4] * 6), range(6), n_way=2, k_shot=1, q_query=1)
    state = sampler.state_dict()
    first = sampler.sample()
    sampler.sample()
    sampler.load_state_dict(state)
    assert torch.equal(sampler.sample().support_idx, first.support_idx)


def test_same_group() -> None:
    # Group 0: classes 0-1, group 1: classes 2-6, group 2: classes 7-13.
    groups = torch.tensor([0] * 2 + [1] * 5 + [2] * 7)
    labels = make_labels([6] * 14)
    allowed = torch.arange(14)
    sampler = EpisodeSampler(
        labels, allowed, n_way=5, k_shot=1, q_query=2, seed=3, groups=groups, same_group=True
    )
    used = set()
    for _ in range(40):
        episode = sampler.sample()
        check_episode(episode, labels, allowed, 5, 1, 2)
        episode_groups = set(groups[episode.classes].tolist())
        assert len(episode_groups) == 1
        used |= episode_groups
    assert used == {1, 2}  # group 0 has too few classes for 5-way

    mixed = EpisodeSampler(labels, allowed, n_way=5, k_shot=1, q_query=2, seed=3, groups=groups)
    assert any(len(set(groups[mixed.sample().classes].tolist())) > 1 for _ in range(20))


def test_same_group_counts_only_allowed_classes() -> None:
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    labels = make_labels([4] * 6)
    sampler = EpisodeSampler(
        labels, [0, 1, 2, 3], n_way=3, k_shot=1, q_query=1, groups=groups, same_group=True
    )
    for _ in range(10):
        assert sorted(sampler.sample().classes.tolist()) == [0, 1, 2]
    with pytest.raises(ValueError, match="groups has 6 entries but class id 6"):
        EpisodeSampler(
            make_labels([4] * 7),
            range(7),
            n_way=3,
            k_shot=1,
            q_query=1,
            groups=groups,
            same_group=True,
        )
    with pytest.raises(ValueError, match="no group has 3 allowed classes"):
        EpisodeSampler(
            labels, [0, 1, 3, 4], n_way=3, k_shot=1, q_query=1, groups=groups, same_group=True
        )


def test_same_group_refuses_a_negative_class_id() -> None:
    """groups[-1] is the last class's group: a class -1 would silently join it."""
    labels = torch.tensor([-1] * 4 + [0] * 4 + [1] * 4 + [2] * 4)
    with pytest.raises(ValueError, match="class id -1 is negative"):
        EpisodeSampler(labels, [-1, 0, 1, 2], n_way=2, k_shot=1, q_query=1,
                       groups=torch.tensor([0, 0, 1]), same_group=True)  # fmt: skip
    EpisodeSampler(labels, [-1, 0, 1, 2], n_way=2, k_shot=1, q_query=1)  # without groups it is just a label


def test_episode_labels_go_to_the_classes_in_random_order() -> None:
    """Label 0 must not always name the smallest class id: a learner could exploit the order."""
    labels = make_labels([4] * 3)
    sampler = EpisodeSampler(labels, range(3), n_way=3, k_shot=1, q_query=1, seed=0)
    counts: dict[tuple[int, ...], int] = {}
    for _ in range(600):
        order = tuple(sampler.sample().classes.tolist())
        counts[order] = counts.get(order, 0) + 1
    assert len(counts) == 6  # every assignment of the 3 labels to the 3 classes, about 100 times each
    assert all(60 <= c <= 140 for c in counts.values()), counts


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"n_way": 3, "k_shot": 2, "q_query": 3},
            r"fewer than k_shot \+ q_query = 5 examples \(class 1 has 4\)",
        ),
        ({"n_way": 7, "k_shot": 1, "q_query": 1}, "7-way episodes need 7 classes, only 4"),
        (
            {"n_way": 2, "k_shot": 1, "q_query": 1, "same_group": True},
            "same_group=True needs groups",
        ),
        ({"n_way": 0, "k_shot": 1, "q_query": 1}, "n_way >= 1"),
        ({"n_way": 2, "k_shot": 0, "q_query": 1}, "k_shot >= 1"),
        ({"n_way": 2, "k_shot": 1, "q_query": -1}, "q_query >= 0"),
        ({"n_way": 2.5, "k_shot": 1, "q_query": 1}, "need integers n_way >= 1.*got 2.5, 1, 1"),
        ({"n_way": 2, "k_shot": 1.0, "q_query": 1}, "need integers.*got 2, 1.0, 1"),
        ({"n_way": 2, "k_shot": 1, "q_query": 0.5}, "need integers.*got 2, 1, 0.5"),
        ({"n_way": "2", "k_shot": 1, "q_query": 1}, "need integers.*got '2', 1, 1"),
        ({"n_way": True, "k_shot": 1, "q_query": 1}, "need integers.*got True, 1, 1"),
    ],
)
def test_impossible_requests(kwargs: dict, message: str) -> None:
    labels = make_labels([6, 4, 6, 6, 6])
    with pytest.raises(ValueError, match=message):
        EpisodeSampler(labels, [0, 1, 2, 3], **kwargs)


def test_missing_and_duplicate_classes() -> None:
    labels = make_labels([5, 5])
    with pytest.raises(ValueError, match="class 9 has 0"):
        EpisodeSampler(labels, [0, 9], n_way=2, k_shot=1, q_query=1)
    with pytest.raises(ValueError, match="duplicate"):
        EpisodeSampler(labels, [0, 0, 1], n_way=2, k_shot=1, q_query=1)


def test_sampler_over_class_split() -> None:
    labels = make_labels([20] * 30)
    groups = torch.arange(30) // 5
    parts = class_splits(30, FRACTIONS, seed=0, groups=groups)
    samplers = {
        name: EpisodeSampler(
            labels, part, n_way=5, k_shot=1, q_query=5, seed=0, groups=groups, same_group=True
        )
        for name, part in parts.items()
    }
    classes = {name: set() for name in parts}
    for name, sampler in samplers.items():
        for _ in range(20):
            classes[name] |= set(sampler.sample().classes.tolist())
    assert not (classes["meta_train"] & classes["meta_test"])
    assert not (classes["meta_train"] & classes["meta_valid"])


class LabelledImages:
    """A torchvision-style dataset: ``__getitem__`` gives ``(image, label)``."""

    def __init__(self, labels: torch.Tensor) -> None:
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.zeros(1, 4, 4), int(self.labels[index])


@pytest.mark.parametrize(
    ("labels", "error", "message"),
    [
        # torch.as_tensor's own "too many dimensions 'str'"
        (["cat", "dog"] * 3, TypeError, r"labels must be integer ids.*map string labels to ids first"),
        # read item by item, images and all, then "only integer tensors of a single element ..."
        (LabelledImages(torch.tensor([0, 1] * 3)), TypeError, r"got LabelledImages; for a dataset, pass its labels"),
        # flattened into 2N "labels" whose indices ran past the images ("class 2 has 0" or IndexError)
        (torch.eye(2).repeat(3, 1), ValueError, r"labels must be a 1-D tensor .* shape \(6, 2\) \(one-hot"),
        # cast to int64: 0.5 and 1.5 became classes 0 and 1 in silence
        (torch.tensor([0.5, 1.5] * 3), ValueError, r"labels must be integer ids, got the non-integral value 0.5"),
        # cast to int64 as -2**63 (a class of its own, or 'class 1 has 0'), in silence
        (torch.tensor([0.0, 1.0, float("inf")] * 2), ValueError, r"labels must be integer ids, got the non-integral value inf"),
        (torch.tensor([0.0, 1.0, 1e30] * 2), ValueError, r"labels must be integer ids from -2\*\*63 to 2\*\*63 - 1, got 1e\+30"),
        # cast with a warning, the imaginary part dropped
        (torch.tensor([0, 1] * 3, dtype=torch.complex64), TypeError, r"labels must be integer ids, got complex"),
    ],
)
def test_labels_that_are_not_integer_class_ids_are_refused_in_one_line(labels, error, message) -> None:
    with pytest.raises(error, match=message):
        EpisodeSampler(labels, [0, 1], n_way=2, k_shot=1, q_query=1)


def test_users_labels_in_the_forms_they_come_in() -> None:
    """Class ids with gaps, as a list, a numpy array, (N, 1), whole floats or an array-like;
    classes as a set."""
    ids = [3, 7, 100, 2**40]
    labels = torch.tensor(ids).repeat_interleave(3)
    expected = EpisodeSampler(labels, ids, 3, 1, 2, seed=5).sample()
    class Column:  # an array-like, as a pandas column is
        def __array__(self, dtype=None, copy=None):
            return labels.numpy()

    for form in (labels.tolist(), labels.numpy(), labels[:, None], labels.double(), Column()):
        episode = EpisodeSampler(form, set(ids), 3, 1, 2, seed=5).sample()  # a set: taken sorted
        assert torch.equal(episode.classes, expected.classes)
        assert torch.equal(episode.support_idx, expected.support_idx)
        assert torch.equal(episode.query_idx, expected.query_idx)
        assert torch.equal(labels[episode.query_idx], episode.classes.repeat_interleave(2))


@pytest.mark.parametrize("n", [-3, 5.5, "5", True])
def test_a_count_that_is_not_a_non_negative_integer_is_named(n: object) -> None:
    with pytest.raises(ValueError, match=rf"the number of classes must be an integer >= 0, got {n!r}"):
        class_splits(n, {"a": 1.0})
    with pytest.raises(ValueError, match=rf"the number of items must be an integer >= 0, got {n!r}"):
        split_indices(n, {"a": 1.0})


def test_stack_episodes_of_no_episode_is_named() -> None:
    with pytest.raises(ValueError, match="stack_episodes needs at least one episode, got none"):
        stack_episodes(torch.zeros(3, 2), [])


def _seeded_draws(seed: object) -> list[torch.Tensor]:
    """What each seeded object of the data readers draws from ``seed``."""
    from learnedopt.data import SinusoidTasks

    episode = EpisodeSampler(make_labels([4] * 6), range(6), n_way=3, k_shot=1, q_query=1, seed=seed).sample()
    return [
        episode.support_idx, episode.query_idx,
        *split_indices(20, {"a": 0.5, "b": 0.5}, seed=seed).values(),
        *class_splits(20, {"a": 0.5, "b": 0.5}, seed=seed).values(),
        SinusoidTasks(seed=seed).sample_tasks(2, 1, 1)[4],
    ]  # fmt: skip


def test_a_numpy_or_tensor_integer_seed_draws_as_the_int_does() -> None:
    """A seed from numpy (``np.arange``, a config read by numpy) failed in manual_seed with 'an
    integer is required', naming neither the seed nor the sampler."""
    np = pytest.importorskip("numpy")
    expected = _seeded_draws(7)
    for seed in (np.int64(7), np.uint8(7), torch.tensor(7)):
        assert all(torch.equal(a, b) for a, b in zip(_seeded_draws(seed), expected, strict=True)), seed
    largest = _seeded_draws(2**64 - 1)  # torch's range of seeds: -2**63 .. 2**64 - 1, -1 the same as 2**64 - 1
    assert all(torch.equal(a, b) for a, b in zip(_seeded_draws(-1), largest, strict=True))


@pytest.mark.parametrize("seed", [1.5, 7.0, "7", None, True, 2**64, -(2**63) - 1, torch.tensor(7.0), torch.tensor([7])])
def test_a_seed_that_is_not_an_integer_torch_takes_is_named_in_one_line(seed: object) -> None:
    """manual_seed's own errors ('manual_seed expected a long, but got float', 'Overflow when
    unpacking long long') named neither the seed nor what it was given to; True seeded as 1."""
    with pytest.raises(ValueError, match=r"^seed must be an integer from -2\*\*63 to 2\*\*64 - 1, got "):
        _seeded_draws(seed)


def test_labels_classes_and_groups_on_cuda_draw_the_cpu_episodes() -> None:
    """Labels, classes and groups on a GPU (here CUDA's device checks faked on the CPU): the
    sampler compared them with CPU index tensors (``torch.searchsorted`` raised "Expected all
    tensors to be on the same device"); it reads them on the CPU and draws the episodes a CPU
    copy draws, as CPU index tensors (which index images on any device)."""
    from fake_cuda import fake_cuda

    labels, groups = make_labels([4] * 6), torch.tensor([0, 0, 0, 1, 1, 1])
    expected = EpisodeSampler(labels, [0, 1, 3, 4], n_way=2, k_shot=1, q_query=1, seed=3, groups=groups, same_group=True)
    with fake_cuda():
        for classes in ([0, 1, 3, 4], torch.tensor([0, 1, 3, 4], device="cuda")):
            sampler = EpisodeSampler(labels.cuda(), classes, n_way=2, k_shot=1, q_query=1, seed=3,
                                     groups=groups.cuda(), same_group=True)  # fmt: skip
            parts = class_splits(6, {"a": 0.5, "b": 0.5}, seed=0, groups=groups.cuda())
            for _ in range(3):
                got, want = vars(sampler.sample()), vars(expected.sample())
                assert all(t.device.type == "cpu" and torch.equal(t, want[k]) for k, t in got.items())
            assert all(p.device.type == "cpu" for p in parts.values())
            expected.load_state_dict({"generator": torch.Generator().manual_seed(3).get_state()})


def test_stack_episodes_keeps_the_meta_batch_on_the_images_device() -> None:
    """Images on a GPU (faked on the CPU): the episodes' labels, made on the CPU, stayed there
    beside the images on the GPU, so a loss of the two raised; all four tensors now follow the images."""
    from fake_cuda import fake_cuda

    labels = make_labels([3] * 4)
    episodes = [EpisodeSampler(labels, range(4), n_way=2, k_shot=2, q_query=1, seed=s).sample() for s in range(3)]
    images = torch.randn(len(labels), 1, 2, 2)
    expected = stack_episodes(images, episodes)
    with fake_cuda():
        got = stack_episodes(images.cuda(), episodes)
        assert [t.device.type for t in got] == ["cuda"] * 4
        assert all(torch.equal(a.cpu(), b) for a, b in zip(got, expected, strict=True))
