"""Adapting a meta-trained learner at test time (:func:`classify_task`) and ``learnedopt evaluate
omniglot-runs``, the official 20-way one-shot runs of Lake et al."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ...values import path_arg
from ..loop import check_elements
from .learner import FewShotLearner, check_ensemble, load_learner


def classify_task(
    learners: FewShotLearner | Sequence[FewShotLearner],
    x_support: Tensor,
    y_support: Tensor,
    x_query: Tensor,
    steps: int | None = None,
    support_copies: int = 0,
    query_copies: int = 0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Class probabilities ``(Q, C)`` of ONE classification task's query images, with test-time
    augmentation and ensembling.

    Each learner adapts (``steps`` inner steps, default its own test-time steps) on the support
    set ``x_support`` ``(N, C_in, H, W)``, ``y_support`` ``(N,)`` plus ``support_copies`` randomly
    distorted copies of each image (:func:`~learnedopt.data.augment_support`); it then classifies
    ``x_query`` ``(Q, C_in, H, W)`` and ``query_copies`` distorted views of it, each view a batch
    of its own (so normalised with its own batch statistics, as the originals are). The softmax
    outputs are averaged over the views, then over the learners (an ensemble).

    Distortions are drawn from ``generator`` (default: seeded 0) in this order: the first
    learner's support copies, its query views, then the next learner's. With one learner and no
    copies this is the softmax of :meth:`FewShotLearner.predict` after :meth:`FewShotLearner.adapt`.
    Each learner takes the images (and their distortions) in its model's floating dtype: a float64
    model file loads as float64, and images come as float32.

    Raises:
        ValueError: no learner, a regression learner, no support example, support labels other than 0..N-1 with each
            class present, or a learner of other ways than the task's N.
    """
    from ...data import augment_support, random_affine

    learners = [learners] if isinstance(learners, FewShotLearner) else list(learners)
    if not learners:
        raise ValueError("classify_task needs at least one learner")
    if query_copies < 0:
        raise ValueError(f"query_copies must be >= 0, got {query_copies}")
    for i, learner in enumerate(learners):
        if learner.spec.loss == "mse":  # failed in augment_support's "needs images (N, C, H, W)"
            raise ValueError(f"classify_task classifies; learner {i} is a regression learner (loss 'mse'): "
                             "use learner.adapt and learner.predict")  # fmt: skip
    if not y_support.numel():  # "a task of 0 classes (support labels 0..-1)" said nothing useful
        raise ValueError(f"classify_task needs at least one support example, got x_support of shape {tuple(x_support.shape)}")
    task_ways = int(y_support.max()) + 1
    if not y_support.is_floating_point() and y_support.dtype != torch.bool:
        classes = torch.unique(y_support)
        if int(classes[0]) != 0 or len(classes) != task_ways:
            # labels 1..N were read as N + 1 classes, a missing class's unit (not adapted) could win
            # the argmax, and a negative label failed in cross-entropy
            raise ValueError(
                f"classify_task takes support labels 0..N-1, each class at least once, got labels {classes.tolist()}: "
                "number the task's classes 0..N-1"
            )
    for learner in learners:
        ways = learner.spec.architecture.get("ways")
        if ways is not None and ways != task_ways:
            # its output layer has a unit per class of the tasks it was trained on: the units of
            # classes this task lacks are not adapted, and the argmax could pick one
            raise ValueError(
                f"a {ways}-way learner cannot classify a task of {task_ways} classes (support labels 0..{task_ways - 1}): "
                f"use a learner meta-trained with --ways {task_ways}"
            )
    generator = torch.Generator().manual_seed(0) if generator is None else generator
    total = None
    for learner in learners:
        # in the model's dtype (a float64 model file loads as float64; images come as float32),
        # converted after the distortions are drawn, so that they are the same draws either way
        weight = next(learner.model.parameters(), None)

        def as_model(x: Tensor, weight: Tensor | None = weight) -> Tensor:
            return x.to(weight.dtype) if weight is not None and x.is_floating_point() else x

        with torch.enable_grad():
            xs, ys = augment_support(x_support, y_support, support_copies, generator)
            params = learner.adapt(as_model(xs), ys, steps)
        with torch.no_grad():
            views = [x_query] + [random_affine(x_query, generator) for _ in range(query_copies)]
            probabilities = sum(learner.predict(params, as_model(view)).softmax(-1) for view in views) / len(views)
        if total is not None and total.shape != probabilities.shape:
            raise ValueError(f"the learners disagree on the output shape: {tuple(total.shape)} and {tuple(probabilities.shape)}")
        total = probabilities if total is None else total + probabilities
    return total / len(learners)


# ----------------------------------------------------------------------------- evaluate omniglot-runs
def predict_runs(
    learners: FewShotLearner | Sequence[FewShotLearner],
    runs: list[Any],
    steps: int | None = None,
    support_copies: int = 0,
    seed: int = 0,
    query_copies: int = 0,
) -> list[Tensor]:
    """For each one-shot run: adapt on its C training images (labels 0..C-1 in sorted file order)
    and classify its test images with :func:`classify_task` (``support_copies`` and
    ``query_copies`` distortions drawn from one generator seeded ``seed``; several learners: an
    ensemble); returns int64 ``(T,)`` predicted training-image indices per run."""
    generator = torch.Generator().manual_seed(seed)
    return [
        classify_task(learners, run.train_images, torch.arange(run.train_images.shape[0], device=run.train_images.device), run.test_images, steps,
                      support_copies, query_copies, generator).argmax(1)  # fmt: skip
        for run in runs
    ]


def add_omniglot_runs_parser(evaluate_sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``learnedopt evaluate omniglot-runs`` on the ``evaluate`` subparsers."""
    parser = evaluate_sub.add_parser(
        "omniglot-runs",
        help="error rates of a meta-trained 20-way model on the official Omniglot one-shot runs",
        description="Adapt a meta-trained 20-way few-shot model (learnedopt meta-train --algo ... "
        "--task omniglot --ways 20) on each official one-shot run's 20 training images and "
        "classify its 20 test images; prints each run's error rate and the mean.",
    )
    parser.add_argument("--runs", type=path_arg, required=True, metavar="DIR", help="folder holding run01 ... run20 (all_runs.zip, unpacked)")
    parser.add_argument("--checkpoint", type=path_arg, required=True, nargs="+", metavar="CKPT",
                        help="model.safetensors of a meta-train run; several: an ensemble (softmax outputs averaged)")
    parser.add_argument("--steps", type=int, default=None, metavar="N", help="inner steps of adaptation (default: the model's test-time steps)")
    parser.add_argument("--support-copies", type=int, default=0, metavar="K",
                        help="adapt on K randomly distorted copies of each training image too (test-time augmentation; default 0)")
    parser.add_argument("--query-copies", type=int, default=0, metavar="K",
                        help="average the predictions over K randomly distorted views of the test images too (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the distortions of --support-copies and --query-copies (default 0)")
    parser.set_defaults(func=run_omniglot_runs)
    return parser


def _check_sizes(args: argparse.Namespace, runs: list[Any]) -> None:
    """Raise :class:`~learnedopt.meta.loop.ConfigError` where ``--steps``, ``--support-copies`` or
    ``--query-copies`` would size a tensor beyond :data:`~learnedopt.values.MAX_ELEMENTS`, as
    ``meta-train`` refuses its counts: the adapted support set ``(20 (K + 1), 1, S, S)`` and the
    test images' views, all held at once, ``(K + 1)`` of ``(T, 1, S, S)``."""
    if args.steps is not None:
        check_elements(f"--steps {args.steps}", args.steps, "an inner loop's per-step losses")
    for run in runs:
        support, test = run.train_images, run.test_images
        check_elements(f"--support-copies {args.support_copies}", (args.support_copies + 1) * support.numel(),
                       f"{run.name}'s support set of {support.shape[0]} images and its distorted copies")  # fmt: skip
        check_elements(f"--query-copies {args.query_copies}", (args.query_copies + 1) * test.numel(),
                       f"{run.name}'s {test.shape[0]} test images and their distorted views")  # fmt: skip


def run_omniglot_runs(args: argparse.Namespace) -> int:
    """Handler of ``learnedopt evaluate omniglot-runs``: 0, or 2 after a one-line error."""
    from ...data import load_runs, score_runs

    try:
        if args.steps is not None and args.steps < 1:
            raise ValueError(f"--steps must be a positive integer, got {args.steps}")
        if not -(2**63) <= args.seed < 2**64:
            raise ValueError(f"--seed must lie in torch.Generator's range, -2**63 to 2**64 - 1, got {args.seed}")
        for flag in ("support_copies", "query_copies"):
            if getattr(args, flag) < 0:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
        learners = [load_learner(checkpoint)[0] for checkpoint in args.checkpoint]
        check_ensemble(args.checkpoint, learners)
        for checkpoint, learner in zip(args.checkpoint, learners, strict=True):
            arch = learner.spec.architecture
            if arch["kind"] != "conv4" or arch["ways"] != 20:
                what = (f"{arch['ways']}-way" if arch["kind"] == "conv4" else f"{arch['kind']} regression"
                        if arch["kind"] == "mlp" else f"{arch.get('family')} (your own family's)")  # fmt: skip
                raise ValueError(
                    f"{checkpoint} is a {what} model; the one-shot runs are 20-way "
                    "(meta-train one with --task omniglot --ways 20)"
                )
        sizes = {learner.spec.architecture["image_size"] for learner in learners}
        if len(sizes) > 1:
            raise ValueError(f"the checkpoints take different image sizes ({sorted(sizes)}); an ensemble needs one")
        runs = load_runs(args.runs, image_size=sizes.pop())
        wrong = [run.name for run in runs if run.train_images.shape[0] != 20]
        if wrong:
            raise ValueError(f"runs {wrong} do not have 20 training images")
        _check_sizes(args, runs)
    except (OSError, ValueError, ImportError) as err:  # OSError: a missing or unreadable file; ImportError: no Pillow
        print(f"learnedopt evaluate omniglot-runs: error: {err}", file=sys.stderr)
        return 2
    errors, mean = score_runs(runs, predict_runs(learners, runs, args.steps, args.support_copies, args.seed,
                                                 args.query_copies))
    for run, error in zip(runs, errors, strict=True):
        print(f"{run.name}  error {error:.1f}%")
    print(f"mean error {mean:.2f}% over {len(runs)} runs")
    return 0
