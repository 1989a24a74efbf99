"""Few-shot meta-training: the trainer every ``--algo`` shares, :func:`meta_train_fewshot` and
the ``meta-train`` entry point :func:`run_fewshot`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...plugins import entry_point_path, load_entry_point, takes_parameter
from ...values import seeded_global_rng
from .. import distributed
from ..distributed import SINGLE, Workers
from ..loop import (
    CARD_NAME,
    MODEL_NAME,
    ConfigError,
    OutputLock,
    Selection,
    check_run,
    checks_agreed,
    clip_meta_gradient_,
    last_record,
    model_card,
    processes_note,
    refuse_other_architecture,
    refuse_other_data,
    resumable_config,
    seeded_meta_step,
    train_loop,
    write_text_atomic,
    writing,
)
from ..maml import multi_step_loss_weights
from ..reptile import Reptile
from ..tasks import derive_seed, generator_for
from .config import FewShotConfig, canonical_command, config_from_args
from .family import FamilySource, check_family_source
from .learner import FewShotLearner, LearnerSpec, save_learner
from .sources import (
    OMNIGLOT_SPLIT,
    OMNIGLOT_SPLIT_SEED,
    OmniglotSource,
    make_sources,
    omniglot_sha256,
)

_TRAIN_STREAM, _VALID_STREAM, _MINIBATCH_STREAM, _SELECT_STREAM = 1, 2, 3, 4
#: the network's own random draws (dropout): (seed, 5, 0, step, first task) in a meta-step,
#: (seed, 5, 1, stream) in a validation
_DRAWS_STREAM = 5



def inner_minibatches(
    x: Tensor, y: Tensor, batch: int | None, steps: int, generator: torch.Generator
) -> list[tuple[Tensor, Tensor]]:
    """The ``steps`` inner minibatches of one task's support set ``x`` ``(N, ...)``, ``y`` ``(N,)``:
    ``batch`` examples each, in a random order drawn from ``generator``, without replacement until
    every example has been used once (then a new order); ``batch=None`` (or ``>= N``) gives the
    whole set every step, in its own order."""
    n = x.shape[0]
    if batch is None or batch >= n:
        return [(x, y)] * steps
    orders = torch.cat([torch.randperm(n, generator=generator) for _ in range(-(-steps * batch // n))])
    picks = orders[: steps * batch].view(steps, batch)
    return [(x[i], y[i]) for i in picks]


class FewShotTrainer:
    """The :class:`learnedopt.meta.loop.Trainer` of the few-shot algorithms.

    With several ``workers`` every rank draws the whole meta-batch and adapts on its share of
    the tasks; MAML and meta-lstm average the meta-gradients over the ranks, Reptile sums the
    parameter moves, so each rank makes the update one process would make on the whole batch.
    """

    #: what ``data_sha256`` hashes, as a refused ``--resume`` names it
    data_kind = "Omniglot images"

    def __init__(self, config: FewShotConfig, workers: Workers = SINGLE) -> None:
        self.config, self.workers = config, workers
        self.source, self.valid_source, self.split = make_sources(config)
        # what the Omniglot images decode to, so that --resume refuses other ones under --data
        self.data_sha256 = omniglot_sha256(self.source.data) if isinstance(self.source, OmniglotSource) else None
        self.device = torch.device(config.device)
        # your own family builds the network and names the loss; None for the built-in tasks
        self.family = self.source.family if isinstance(self.source, FamilySource) else None
        try:
            self.learner = FewShotLearner(LearnerSpec.for_config(config, self.family), seed=config.seed,
                                          family=self.family).to(self.device)  # fmt: skip
        except ValueError as err:  # your own model: one MAML or the output layer refuse
            if self.family is None:
                raise
            raise ConfigError(f"--task {config.task}: {err}") from None
        self._initial_tensors = {k: v.detach().clone() for k, v in self.learner.tensors().items()}
        if self.family is not None:
            # meta-step 1's tasks and the validation tasks, tried now, so that a family that does not
            # fit is refused before the run writes anything rather than as a traceback in it
            for source, size, seed, role in (
                (self.source, config.meta_batch, derive_seed(config.seed, _TRAIN_STREAM, 1), "meta-training"),
                (self.valid_source, config.val_tasks, derive_seed(config.seed, _VALID_STREAM), "validation"),
            ):
                try:
                    check_family_source(source, size, seed, role, self.learner.model, self.learner.loss_fn, self.device)
                except ValueError as err:
                    raise ConfigError(f"--task {config.task}: {err}") from None
        if config.algo == "reptile":
            self.reptile = Reptile(
                self.learner.model,
                config.inner_steps,
                self.learner.inner_optimizer,
                outer_stepsize=config.meta_lr,
                final_outer_stepsize=0.0,
                total_steps=config.meta_steps,
                loss_fn=self.learner.loss_fn,
            )
        else:
            self.meta_optimizer = torch.optim.Adam(self.learner.meta_parameters(), lr=config.meta_lr)
        # every rank scores on all the tasks; the mean makes any rounding difference agree
        self.selection = Selection(
            config.select_every,
            lambda learner: workers.mean(self.validate(learner, _SELECT_STREAM)["loss"]),
            lambda learner: {k: v.detach().clone() for k, v in learner.tensors().items()},
        )

    def initial_learner(self) -> FewShotLearner:
        """The learner before meta-training (kept from the start, so that a ``--preset`` file that
        has moved since is not read again)."""
        # an unseeded learner restores the global RNG it draws its default initialisation from
        learner = FewShotLearner(self.learner.spec, family=self.family).to(self.device)
        learner.load_tensors(self._initial_tensors)
        return learner

    def step(self, step: int) -> dict[str, float]:
        """Meta-step ``step``. Logged ``meta_loss``: the mean query loss after adaptation
        (MAML, meta-lstm); for Reptile, which has no meta-loss, the mean support loss at the
        initialisation before the update. The network's random draws (dropout) come from the
        global RNG seeded from ``(seed, step, the rank's first task)``, so that a resumed run
        draws the masks of an uninterrupted one."""
        with seeded_meta_step(self.config.seed, _DRAWS_STREAM, step, self.workers, self.config.meta_batch, self.device):
            return self._step(step)

    def _step(self, step: int) -> dict[str, float]:
        config, workers = self.config, self.workers
        batch = self.source.batch(config.meta_batch, derive_seed(config.seed, _TRAIN_STREAM, step))
        part = workers.share(config.meta_batch)
        x_s, y_s, x_q, y_q = (t[part].to(self.device) for t in batch)
        if config.algo == "reptile":
            with torch.no_grad():
                loss = sum(self.learner.loss_fn(self.learner.model(x), y) for x, y in zip(x_s, y_s, strict=True))
            workers.require_finite("the support loss at the initialisation", loss)
            # each task's minibatch order has its own key, so a rank's tasks do not depend on the others'
            tasks = [inner_minibatches(x, y, config.inner_batch, config.inner_steps,
                                       generator_for(config.seed, _MINIBATCH_STREAM, step, part.start + b))
                     for b, (x, y) in enumerate(zip(x_s, y_s, strict=True))]  # fmt: skip
            eps = self.reptile.meta_step(tasks, all_reduce_sum_=workers.all_reduce_sum_)
            return self._selected_after(step, {"meta_loss": workers.mean(float(loss) / len(x_s)), "outer_stepsize": eps})
        if config.multi_step_loss is not None:
            self.learner.maml.step_loss_weights = multi_step_loss_weights(config.inner_steps, step / config.multi_step_loss)
        if config.first_order_until is not None:  # MAML++'s derivative-order annealing
            self.learner.maml.first_order = step <= config.first_order_until
        loss = self.learner.meta_loss(x_s, y_s, x_q, y_q)
        workers.require_finite("the meta-loss", loss)
        self.meta_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = self.learner.meta_parameters()
        workers.average_gradients_(params)
        norm = clip_meta_gradient_(list(params), config.clip)
        self.meta_optimizer.step()
        return self._selected_after(step, {"meta_loss": workers.mean(float(loss.detach())), "grad_norm": norm})

    def _selected_after(self, step: int, record: dict[str, float]) -> dict[str, float]:
        return {**record, **self.selection.after_step(step, self.config.meta_steps, self.learner, self.initial_learner)}

    def _architecture(self) -> dict[str, Any]:
        """What the checkpoint records of the learner's architecture, for a resume to compare: its
        network and meta-lstm's rule (``{"kind", "config"}``, with every field: the defaults too)."""
        spec = self.learner.spec
        return {"network": dict(spec.architecture), "rule": None if spec.rule is None else dict(spec.rule)}

    def state_dict(self) -> dict[str, Any]:
        """The run's state for the checkpoint: the algorithm, the learner's architecture and tensors, Reptile's or the meta-optimizer's state, the selection's, and the data's SHA-256."""
        state: dict[str, Any] = {"algo": self.config.algo, "architecture": self._architecture(), "learner": self.learner.tensors()}
        if self.config.algo == "reptile":
            state["reptile"] = self.reptile.state_dict()
        else:
            state["meta_optimizer"] = self.meta_optimizer.state_dict()
        state["selection"] = self.selection.state_dict()
        state["data_sha256"] = self.data_sha256
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`'s ``state``; raises ConfigError (one line) for other data or another architecture than this run's."""
        refuse_other_data(state.get("data_sha256"), self.data_sha256, self.data_kind, self.config.data)
        refuse_other_architecture(f"a {self.config.algo} learner", state.get("architecture"), self._architecture())
        self.learner.load_tensors(state["learner"])
        if self.config.algo == "reptile":
            self.reptile.load_state_dict(state["reptile"])
        else:
            self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.selection.load_state_dict(state.get("selection"))  # absent before selection existed

    def validate(self, learner: FewShotLearner, stream: int = _VALID_STREAM) -> dict[str, float]:
        """Metrics of ``learner`` on a fixed draw of validation tasks (``(seed, stream)``; by
        default the card's), adapted with ``test_inner_steps``."""
        tasks = self.valid_source.batch(self.config.val_tasks, derive_seed(self.config.seed, stream))
        # the network's random draws (dropout) from (seed, stream), whatever ran before
        with seeded_global_rng(derive_seed(self.config.seed, _DRAWS_STREAM, 1, stream), self.device):
            return learner.evaluate(*(t.to(self.device) for t in tasks))


@dataclass
class FewShotResult:
    """What :func:`meta_train_fewshot` returns: the learner, the meta-steps done, this process's
    log records, whether the run finished, and (when finished) validation metrics
    ``{"initial": {...}, "final": {...}}``, and the meta-step whose weights the learner holds
    (0: the initialisation; the last without ``select_every``)."""

    learner: FewShotLearner
    step: int
    log: list[dict[str, Any]]
    finished: bool
    validation: dict[str, dict[str, float]] | None = None
    selected_step: int | None = None


def meta_train_fewshot(
    config: FewShotConfig,
    out: str | os.PathLike[str],
    *,
    checkpoint_every: int = 10,
    resume: bool = False,
    command: str | None = None,
    max_steps: int | None = None,
    progress: bool = True,
    workers: Workers | None = None,
) -> FewShotResult:
    """Meta-train a few-shot learner as ``learnedopt meta-train --algo ...`` does: ``log.jsonl``,
    ``config.json``, ``checkpoint.pt`` and at the end ``model.safetensors`` and ``MODEL_CARD.md`` in ``out``.
    Arguments as :func:`learnedopt.meta.train.meta_train` (ranks other than 0 return without
    validation or files).

    Raises:
        ConfigError: bad configuration, missing data, or a resume that does not fit.
        DistributedError: another rank failed.
        RunTerminated: SIGTERM arrived (see :func:`~learnedopt.meta.loop.train_loop`); the
            checkpoint holds the meta-step that was in progress.
        RunWriteError: a file of the run cannot be written (a full disk; an ``OSError``): the
            files written before it are whole, and ``resume`` continues the run.
    """
    out = Path(out)
    workers = distributed.current() if workers is None else workers
    with checks_agreed(workers):  # a refusal on one rank stops every rank (train_loop ends the checks)
        built = resumable_config(config, out, resume)
        workers = check_run(built, checkpoint_every, workers, resume=resume)
        trainer = FewShotTrainer(built, workers)
    command = command or "learnedopt.meta.fewshot.meta_train_fewshot(...)"
    # the model file records --preset as given, not the copy a resumed run read it from
    trainer.learner.spec = dataclasses.replace(trainer.learner.spec, rule_start=config.preset)
    if config.algo == "reptile":
        hint = "lower --inner-lr, or --meta-lr (Reptile's outer step size)"
    else:
        hint = "lower --meta-lr" + (" or --clip" if config.clip is not None else "")
    with OutputLock() as lock:  # held until the final files are written
        done, log = train_loop(config, trainer, out, checkpoint_every=checkpoint_every, resume=resume,
                               max_steps=max_steps, progress=progress, hint=hint, workers=workers,
                               lock=lock)  # fmt: skip
        if done < config.meta_steps:
            return FewShotResult(trainer.learner, done, log, finished=False)
        selected_step = trainer.selection.restore_best(trainer.learner.load_tensors, config.meta_steps)
        if not workers.is_main:
            return FewShotResult(trainer.learner, done, log, finished=True, selected_step=selected_step)
        validation = {"initial": trainer.validate(trainer.initial_learner()), "final": trainer.validate(trainer.learner)}
        extra = {
            "task": config.task,
            "command": command,
            "meta_train_config": config.to_dict(),
            "final_meta_loss": last_record(out, log, config.meta_steps)["meta_loss"],
            "validation": validation,
            "omniglot_split": trainer.split or None,
        }
        extra |= trainer.selection.header_fields()
        with writing(out / MODEL_NAME):
            save_learner(trainer.learner, out / MODEL_NAME, extra)
        _write_card(out / CARD_NAME, config, command, trainer, extra)
        return FewShotResult(trainer.learner, config.meta_steps, log, finished=True, validation=validation,
                             selected_step=selected_step)  # fmt: skip


#: the unit of each validation metric that has one, for the card and the final line
METRIC_UNITS = {"accuracy": "%"}


def _variants(config: FewShotConfig) -> str:
    """The variants of ``config.algo`` a run uses, for its card's title: ``" (ANIL, Meta-SGD)"``,
    or ``""`` for the plain algorithm."""
    names = [name for name, used in (("ANIL", config.head_only), ("Meta-SGD", config.learn_inner_lr)) if used]
    return f" ({', '.join(names)})" if names else ""


def _write_card(path: Path, config: FewShotConfig, command: str, trainer: FewShotTrainer, extra: Mapping[str, Any]) -> None:
    spec = trainer.learner.spec
    metrics = "\n".join(
        f"| validation {name}{f' ({METRIC_UNITS[name]})' if name in METRIC_UNITS else ''} after "
        f"{config.test_inner_steps} inner steps | {extra['validation']['initial'][name]:.6g} "
        f"| {extra['validation']['final'][name]:.6g} |"
        for name in extra["validation"]["final"]
    )
    if trainer.split:
        how = (
            "as named by `--valid-alphabets` and `--test-alphabets`" if config.test_alphabets is not None else
            f"(`class_splits(groups=alphabet_of_class)`, fractions {OMNIGLOT_SPLIT}, seed {OMNIGLOT_SPLIT_SEED})"
        )  # fmt: skip
        split = (
            f"Classes are split by whole alphabets {how}:\n\n"
            + "\n".join(f"- {name}: {', '.join(alphabets) or '(none)'}" for name, alphabets in trainer.split.items())
            + f"\n\nHeld out from meta-training: {', '.join(trainer.split['meta_valid'] + trainer.split['meta_test'])} "
            "(meta_valid is used for the validation metric below; meta_test is never read)."
        )
    else:
        split = "Tasks are drawn fresh from the task distribution; validation tasks are a fixed draw (key (seed, 2))."
    if trainer.family is not None:
        splits = ("built with split='meta_train' for meta-training and split='meta_valid' for validation"
                  if takes_parameter(load_entry_point(config.task), "split")
                  else "taking no split, so the validation tasks are other draws from the meta-training distribution")  # fmt: skip
        split += (f"\n\nThe family is your own `{config.task}`, {splits}. The command above, and `load_learner`, "
                  f"which calls its `model()` to rebuild the network, need its module `{entry_point_path(config.task)[0]}` "
                  "importable (e.g. `PYTHONPATH=.` in its folder).")  # fmt: skip
    text = model_card(
        f"Meta-trained few-shot learner: {config.algo}{_variants(config)} on {config.task}",
        f' Load it with\n`learnedopt.meta.fewshot.load_learner("{MODEL_NAME}")`.'
        + processes_note(trainer.workers.world_size),
        command,
        config.to_dict(),
        f"Learner: `{json.dumps(spec.to_dict())}`.",
        f"Meta-training tasks: {trainer.source.describe()}.\n\n"
        f"Validation tasks ({config.val_tasks}): {trainer.valid_source.describe()}.\n\n{split}",
        "| metric | initialisation | meta-trained |\n|---|---:|---:|\n"
        f"{metrics}\n\nMean meta-loss of the last meta-step: {extra['final_meta_loss']:.6g}. "
        "Per-step metrics are in `log.jsonl`."
        + trainer.selection.card_note(config.meta_steps, f"the mean query loss on a fixed draw of {config.val_tasks} "
                                      "validation tasks (key (seed, 4), not the table's), adapted as the table's"),
    )
    write_text_atomic(path, text)


def run_fewshot(args: argparse.Namespace, workers: Workers = SINGLE) -> str | None:
    """``learnedopt meta-train --algo maml|fomaml|reptile|meta-lstm``: run and return the line to
    print when finished (None when stopped early, or on ranks other than 0). Raises
    :class:`~learnedopt.meta.loop.ConfigError`."""
    config = config_from_args(args)
    result = meta_train_fewshot(
        config,
        args.out,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        command=canonical_command(config, args.out, args.checkpoint_every),
        max_steps=args.stop_after,
        progress=not args.quiet,
        workers=workers,
    )
    if not result.finished or result.validation is None:
        return None
    initial, final = result.validation["initial"], result.validation["final"]
    shown = ", ".join(
        f"{k} {initial[k]:.4g}{METRIC_UNITS.get(k, '')} -> {final[k]:.4g}{METRIC_UNITS.get(k, '')}" for k in final
    )
    selected = f", selected at meta-step {result.selected_step}" if config.select_every else ""
    return f"wrote {Path(args.out) / MODEL_NAME} and {CARD_NAME}: validation {shown} (initialisation -> meta-trained{selected})"
