"""Evaluation harness for learned optimizers on held-out optimizees (``learnedopt evaluate optimizers``).

A :class:`Problem` is one optimizee: a model built from a seed, the loss of minibatch ``t`` and a
number of steps. Every run of every optimizer on ``(problem, seed)`` starts from the same initial
parameters and sees the same minibatch sequence, because both are drawn from generators seeded by
``(seed, ...)`` (:func:`learnedopt.meta.tasks.generator_for`), never from the global RNG. What a
rule or problem of one's own draws from the global RNG (dropout) is seeded from the seed too, by
each run (:func:`run_optimizer`), so it does not depend on the runs before it.

Baselines (SGD, SGD with Nesterov momentum, RMSprop, Adam) get their learning rate tuned on a log
grid over separate tuning seeds (criterion: mean final training loss, a NaN/Inf run counting as
+inf); they are then run with the chosen lr on fresh evaluation seeds. Learned optimizers run
untuned (``lr=1.0``) on the same evaluation seeds.

Definitions used in every report:

- *final loss* of a run: mean training (minibatch) loss over its last 10 steps (over all its
  steps for a run of fewer);
- *mean loss* of a run: mean training loss over all its steps;
- statistics over seeds (mean, sample std, median, quartiles) are over the runs that stayed
  finite; ``nonfinite`` counts the runs in which a NaN/Inf loss or gradient appeared (a run stops
  at that step, the rest of its curve is NaN).

Modules, in the order data flows: :mod:`.problems` (the optimizees), :mod:`.runs` (optimizers,
single runs, lr tuning, statistics), :mod:`.harness` (:func:`evaluate_optimizers`),
:mod:`.report` (Markdown, JSON, plot), :mod:`.records` (each finished run, kept for ``--resume``)
and :mod:`.cli`.
"""

from .cli import add_arguments, add_evaluate_optimizers_parser, config_from_args, run_cli
from .harness import (
    QUICK_LRS,
    QUICK_STEPS,
    STABILITY_SEED,
    TUNING_SEED_OFFSET,
    EvalConfig,
    ReusableResults,
    evaluate_optimizers,
    reusable_results,
)
from .problems import (
    DEFAULT_PROBLEMS,
    EXTRA_PROBLEMS,
    MLP_RANDOM_HELD_OUT,
    MLP_RANDOM_HELD_OUT_SCALES,
    PROBLEMS,
    ClassificationProblem,
    Problem,
    QuadraticModel,
    QuadraticProblem,
    ReconstructionProblem,
    ScaledClassificationProblem,
    make_problem,
    markov_sequences,
    markov_transformer,
    small_convnet,
    synthetic_classification,
)
from .records import RunRecords, records_folder
from .report import (
    WriteResults,
    best_baseline,
    check_report_name,
    check_result,
    format_difference,
    markdown_tables,
    paired_difference,
    plot_curves,
    seeds_below,
    write_report,
)
from .runs import (
    BASELINES,
    DEFAULT_LEARNED,
    DEFAULT_LRS,
    FINAL_WINDOW,
    LR_SCHEDULES,
    LearnedSpec,
    OptimizerFactory,
    final_loss,
    learned_from_file,
    learned_from_files,
    run_optimizer,
    select_lr,
    summarize,
    tune_lr,
    tuning_score,
)

__all__ = [
    "add_arguments",
    "add_evaluate_optimizers_parser",
    "BASELINES",
    "best_baseline",
    "check_report_name",
    "check_result",
    "ClassificationProblem",
    "config_from_args",
    "DEFAULT_LEARNED",
    "DEFAULT_LRS",
    "DEFAULT_PROBLEMS",
    "EvalConfig",
    "evaluate_optimizers",
    "EXTRA_PROBLEMS",
    "final_loss",
    "format_difference",
    "FINAL_WINDOW",
    "learned_from_file",
    "learned_from_files",
    "LearnedSpec",
    "LR_SCHEDULES",
    "make_problem",
    "markdown_tables",
    "markov_sequences",
    "markov_transformer",
    "MLP_RANDOM_HELD_OUT",
    "MLP_RANDOM_HELD_OUT_SCALES",
    "OptimizerFactory",
    "paired_difference",
    "plot_curves",
    "Problem",
    "PROBLEMS",
    "QuadraticModel",
    "QuadraticProblem",
    "ReconstructionProblem",
    "QUICK_LRS",
    "QUICK_STEPS",
    "records_folder",
    "reusable_results",
    "ReusableResults",
    "run_cli",
    "RunRecords",
    "run_optimizer",
    "ScaledClassificationProblem",
    "seeds_below",
    "select_lr",
    "small_convnet",
    "STABILITY_SEED",
    "summarize",
    "synthetic_classification",
    "tune_lr",
    "tuning_score",
    "TUNING_SEED_OFFSET",
    "write_report",
    "WriteResults",
]
