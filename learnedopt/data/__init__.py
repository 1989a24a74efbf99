"""Data readers: MNIST (IDX), Omniglot, sinusoid tasks, few-shot episode sampling, and image
augmentation.

Nothing here downloads data. Loaders take a path, or find one through
:func:`default_data_root` (the ``LEARNEDOPT_DATA`` environment variable first).
"""

from .augment import AffineRanges, augment_support, random_affine
from .episodes import Episode, EpisodeSampler, class_splits, stack_episodes
from .idx import load_mnist, read_idx, split_indices
from .omniglot import OmniglotDataset, load_omniglot, read_image
from .omniglot_runs import OneShotRun, load_runs, score_runs
from .paths import DATA_ENV_VAR, default_data_root, resolve_data_dir
from .sinusoid import SinusoidTasks, sinusoid

__all__ = [
    "AffineRanges",
    "DATA_ENV_VAR",
    "Episode",
    "EpisodeSampler",
    "OmniglotDataset",
    "OneShotRun",
    "SinusoidTasks",
    "augment_support",
    "class_splits",
    "default_data_root",
    "load_mnist",
    "load_omniglot",
    "load_runs",
    "read_idx",
    "random_affine",
    "read_image",
    "resolve_data_dir",
    "score_runs",
    "sinusoid",
    "split_indices",
    "stack_episodes",
]
