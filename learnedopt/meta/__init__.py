"""Meta-learning: the differentiable unroll of update rules, task families, the training loop,
and learned initialisations (MAML, Reptile)."""

from .distributed import DistributedError, Workers
from .maml import MAML, BatchStatNorm, multi_step_loss_weights, replace_batchnorm_
from .reptile import Reptile
from .tasks import (
    MNIST_SPLIT,
    MNIST_SPLIT_SEED,
    TASK_FAMILIES,
    MixtureFamily,
    MnistMLPFamily,
    QuadraticFamily,
    RandomMLPFamily,
    RegressionFamily,
    Task,
    TaskBatch,
    TaskFamily,
    derive_seed,
    generator_for,
    import_family,
    make_family,
)
from .unroll import (
    LOSS_WEIGHTINGS,
    UnrollResult,
    detach_all,
    horizon_loss_weights,
    num_coordinates,
    truncated_unroll,
    unroll,
)

__all__ = [
    "LOSS_WEIGHTINGS",
    "MAML",
    "MNIST_SPLIT",
    "MNIST_SPLIT_SEED",
    "TASK_FAMILIES",
    "BatchStatNorm",
    "DistributedError",
    "MixtureFamily",
    "MnistMLPFamily",
    "QuadraticFamily",
    "RandomMLPFamily",
    "RegressionFamily",
    "Reptile",
    "Task",
    "TaskBatch",
    "TaskFamily",
    "UnrollResult",
    "Workers",
    "derive_seed",
    "detach_all",
    "generator_for",
    "horizon_loss_weights",
    "import_family",
    "make_family",
    "multi_step_loss_weights",
    "num_coordinates",
    "replace_batchnorm_",
    "truncated_unroll",
    "unroll",
]
