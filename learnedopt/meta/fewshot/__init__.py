"""Few-shot meta-training for ``learnedopt meta-train --algo maml|fomaml|reptile|meta-lstm``, the
model file of a meta-trained few-shot learner, and ``learnedopt evaluate omniglot-runs``.

Algorithms (all train the model's parameters as the learned initialisation):

- ``maml`` / ``fomaml``: :class:`learnedopt.meta.MAML` (second- / first-order), Adam outer
  optimizer; ``--learn-inner-lr`` learns a step size per parameter element (Meta-SGD).
- ``reptile``: :class:`learnedopt.meta.Reptile`, outer step size ``--meta-lr`` annealed linearly
  to 0 over ``--meta-steps``; inner optimizer SGD (sinusoid) or Adam with betas (0, 0.999)
  (Omniglot, Nichol et al. 2018), learning rate ``--inner-lr``. As in Nichol et al.'s Omniglot
  runs, meta-training tasks have ``--train-shots`` examples per class (10), each inner step reads
  a minibatch of ``--inner-batch`` of them (shuffled, without replacement until all are used),
  and adapting after training takes 50 full-batch steps on the ``--shots``-shot support set.
- ``meta-lstm``: Ravi & Larochelle 2017. The inner loop is :class:`learnedopt.nn.MetaLSTMCell`'s
  update (``MetaLSTMOptimizer``'s) run by :func:`learnedopt.meta.unroll.unroll` on each task's
  support set, from the learned initial parameters; the meta-loss is the query loss at the
  adapted parameters; Adam trains the model's parameters and the rule's together. As in the
  paper, the optimizee gradients the rule reads are detached (no second-order terms), and the
  meta-gradient norm is clipped (``--clip``). ``--rule CoordinateLSTM`` puts
  ``LSTMOptimizer``'s update in the inner loop instead.

Tasks: ``sinusoid`` (K-shot regression of Finn et al. 2017, MLP 1-40-40-1 with ReLU, MSE),
``omniglot`` (N-way K-shot classification, :func:`learnedopt.models.conv4`, cross-entropy), and
your own :class:`FewShotFamily` named as ``module:attribute`` (its tasks, network and loss;
:mod:`.family`).
Omniglot classes are split by whole alphabets (:data:`OMNIGLOT_SPLIT`, seed
:data:`OMNIGLOT_SPLIT_SEED`, so every run holds out the same alphabets, unless it names its
meta-valid and meta-test alphabets: ``--valid-alphabets``, ``--test-alphabets``); meta-training uses the
meta-train alphabets with rotated classes, validation the meta-valid alphabets unrotated, and the
meta-test alphabets are never read. Every BatchNorm is transductive
(:class:`learnedopt.meta.batchnorm.BatchStatNorm`): a forward pass normalises with its own batch,
when adapting and when predicting. For meta-lstm that departs from Ravi & Larochelle's code, which
normalises a test episode's query set with running statistics collected on its support set (batch
statistics only while meta-training).

Randomness: the model's initialisation comes from ``(seed, 0)`` (the meta-lstm rule's from
``(seed, 0, 1)``), meta-step ``s``'s tasks from ``(seed, 1, s)``, the validation tasks from
``(seed, 2)`` and those that ``--select-every`` scores on from ``(seed, 4)``; the network's own
draws from the global RNG (dropout masks) from it seeded with ``(seed, 5, 0, s, the rank's first
task)`` in meta-step ``s`` and ``(seed, 5, 1, stream)`` in a validation on stream 2 or 4, so a
resumed run repeats an uninterrupted one bit for bit.

The artefact of a run is ``model.safetensors``: the model's tensors (``model.*``), learned inner
step sizes (``inner_lr.*``) and rule weights (``rule.*``), with a JSON header in the safetensors
metadata (key ``"learnedopt_model"``) holding everything :func:`load_learner` needs to rebuild and
adapt the learner. Loading never unpickles.

Modules: :mod:`.config` (the run's configuration), :mod:`.learner` (the learner and its model
file), :mod:`.sources` (sinusoid and Omniglot tasks), :mod:`.family` (your own task family),
:mod:`.training` (meta-training) and
:mod:`.adaptation` (test-time adaptation, ``evaluate omniglot-runs``).
"""

from ..loop import MODEL_NAME
from .adaptation import (
    add_omniglot_runs_parser,
    classify_task,
    predict_runs,
    run_omniglot_runs,
)
from .config import (
    FEWSHOT_ALGOS,
    FEWSHOT_ONLY,
    FEWSHOT_TASKS,
    add_fewshot_arguments,
    canonical_command,
    config_from_args,
    fewshot_defaults,
    FewShotConfig,
)
from .family import FamilySource, FewShotFamily, import_fewshot_family
from .learner import (
    LOSSES,
    MODEL_FORMAT,
    SINUSOID_MLP,
    build_model,
    FewShotLearner,
    LearnerSpec,
    load_learner,
    output_layer_name,
    Params,
    save_learner,
)
from .sources import (
    OMNIGLOT_SPLIT,
    OMNIGLOT_SPLIT_SEED,
    SINUSOID_VALID_QUERIES,
    make_sources,
    omniglot_class_splits,
    parse_alphabets,
    OmniglotSource,
    SinusoidSource,
)
from .training import (
    FewShotResult,
    FewShotTrainer,
    inner_minibatches,
    meta_train_fewshot,
    run_fewshot,
)

__all__ = [
    "add_fewshot_arguments",
    "add_omniglot_runs_parser",
    "build_model",
    "canonical_command",
    "classify_task",
    "config_from_args",
    "FEWSHOT_ALGOS",
    "fewshot_defaults",
    "FEWSHOT_ONLY",
    "FEWSHOT_TASKS",
    "FamilySource",
    "FewShotConfig",
    "FewShotFamily",
    "FewShotLearner",
    "FewShotResult",
    "FewShotTrainer",
    "import_fewshot_family",
    "inner_minibatches",
    "LearnerSpec",
    "load_learner",
    "LOSSES",
    "make_sources",
    "meta_train_fewshot",
    "MODEL_FORMAT",
    "MODEL_NAME",
    "omniglot_class_splits",
    "parse_alphabets",
    "OMNIGLOT_SPLIT",
    "OMNIGLOT_SPLIT_SEED",
    "OmniglotSource",
    "output_layer_name",
    "Params",
    "predict_runs",
    "run_fewshot",
    "run_omniglot_runs",
    "save_learner",
    "SINUSOID_MLP",
    "SINUSOID_VALID_QUERIES",
    "SinusoidSource",
]
