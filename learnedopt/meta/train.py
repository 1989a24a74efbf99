"""Meta-training an update rule by truncated backpropagation through unrolls (``learnedopt
meta-train --algo lstm``).

One *meta-step* is one episode: sample ``--meta-batch`` tasks, run ``--horizon`` optimizee steps
in truncations of ``--unroll`` steps, and after each truncation take one Adam step on the rule's
meta-parameters (gradient norm clipped to ``--clip``). So a meta-step makes ``ceil(H / T)``
meta-updates, and checkpoints fall between episodes.

Randomness: the rule's initialisation uses ``generator_for(seed, 0)``, meta-step ``s`` (1-based)
draws its tasks and initial parameters from ``generator_for(seed, 1, s)``, the evaluation from
``generator_for(seed, 2)``, the selection episode (``--select-every``) from ``generator_for(seed,
3)``. What the tasks' losses or the rule draw from torch's, numpy's or Python's global RNG during an
episode (dropout masks, minibatches) comes from it seeded with ``(seed, 4, 0, s, the rank's first task)`` in
meta-step ``s`` and ``(seed, 4, 1, stream, the rank's first task)`` in the evaluation and
selection episodes (stream 2 and 3), and each is as it was after them. A step's randomness therefore depends only on ``(seed,
s)``, and resuming from a checkpoint (meta-parameters, Adam state, step) repeats an uninterrupted
run bit for bit.

Selection (``--select-every N``): meta-training's loss is noisy from step to step and a run can
end worse than it was some steps before (or than its start), so with ``N > 0`` the rule is scored
every ``N`` meta-steps, at the last one and before the first, on one fixed episode of held-out
tasks (``--select-tasks`` of the ``meta_valid`` split, drawn by ``generator_for(seed, 3)``: not
the card's evaluation episode) with the meta-loss's own weighting, and the final weights are the
best-scoring ones (:class:`~learnedopt.meta.loop.Selection`). Selection does not change the
training trajectory. The best weights and score are part of the checkpoint, so a resumed run
selects as an uninterrupted one does.

Files in ``--out``: ``log.jsonl`` (one JSON line per meta-step: the step's metrics, with
``select_loss`` on selection steps; its wall-clock ``seconds``, selection included, and
``peak_rss_mb``, the process's peak resident memory so far; ``"checkpoint": true`` on the steps
checkpointed), ``config.json`` (the configuration the run began with, which ``--resume`` compares
with, as it does the checkpoint's), ``checkpoint.pt`` (atomic), and at
the end ``weights.safetensors`` and ``MODEL_CARD.md``.

The command line (``learnedopt meta-train``, for this and every other algorithm) is
:mod:`learnedopt.meta.command`; here are the update-rule training it runs for ``--algo lstm`` and
that algorithm's arguments-to-configuration (:func:`config_from_args`, :func:`canonical_command`).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import markdown
from ..data.idx import mnist_sha256
from ..nn import RULES, UpdateRule
from ..nn.base import check_rule_call
from ..plugins import (
    REPEATABLE_DRAWS,
    checked_description,
    entry_point_path,
    load_entry_point,
    one_line,
    takes_parameter,
)
from ..values import seeded_global_rng
from ..weights import (
    PRESETS,
    build_preset,
    folder_note,
    load_weights,
    read_header,
    recorded_rule_class,
    save_weights,
    seeded_rule,
)
from . import distributed
from .distributed import SINGLE, Workers
from .loop import (
    CARD_NAME,
    LOG_NAME,
    PATH_FIELDS,
    WEIGHTS_NAME,
    AfterMetaUpdates,
    ConfigError,
    OutputLock,
    Selection,
    check_elements,
    check_rule_config,
    check_run,
    check_select_every,
    checks_agreed,
    clip_meta_gradient_,
    default_rule_config,
    last_record,
    model_card,
    path_string,
    processes_note,
    refuse_other_architecture,
    refuse_other_data,
    resumable_config,
    rule_class,
    rule_config_given,
    seeded_meta_step,
    train_loop,
    write_text_atomic,
    writing,
)
from .tasks import (
    DATA_FAMILIES,
    IMPORTED_NOT_MIXED,
    TASK_NAME_SYNTAX,
    MixtureFamily,
    Task,
    TaskBatch,
    TaskFamily,
    canonical_task_name,
    check_mixture_weights,
    derive_seed,
    generator_for,
    imported_mixture_member,
    is_task_family,
    make_family,
    parse_mixture,
    reads_data,
)
from .unroll import (
    LOSS_WEIGHTINGS,
    check_task_batch,
    horizon_loss_weights,
    num_coordinates,
    truncated_unroll,
)

_INIT_STREAM, _TRAIN_STREAM, _EVAL_STREAM, _SELECT_STREAM = 0, 1, 2, 3  # generator_for(seed, stream[, step])
#: the global RNGs' draws during an episode (dropout, minibatches of a task's loss): seeded from
#: (seed, 4, 0, step, the rank's first task) in a meta-step, (seed, 4, 1, stream, the rank's first
#: task) in an evaluation
_DRAWS_STREAM = 4


@dataclass(frozen=True)
class MetaTrainConfig:
    """Everything that determines a meta-training run's results.

    Attributes:
        task: task family (one of :data:`~learnedopt.meta.tasks.TASK_FAMILIES`, a mixture of
            them joined by ``+``: :class:`~learnedopt.meta.tasks.MixtureFamily`, or your own as
            ``module:Class``: :func:`~learnedopt.meta.tasks.import_family`).
        rule: update rule class to start from its seeded initialisation, or None with ``preset``;
            with ``preset`` too only your own class (``module:Class``), of the preset file's kind.
        rule_config: architecture of ``rule`` (its config fields, e.g. ``{"momentum_decays":
            [0.9, 0.99]}`` for ``CoordinateLSTM``); None: the class's defaults (an empty one
            becomes None).
        preset: preset name or weight file path whose weights (and architecture) to start from,
            or None with ``rule``; a file of your own rule's kind needs its class as ``rule``.
        unroll: truncation length T (optimizee steps per meta-update).
        horizon: optimizee steps per episode H (>= T).
        meta_batch: tasks per episode B.
        meta_steps: episodes S to run in total.
        meta_lr: Adam learning rate on the meta-parameters.
        clip: maximum global norm of the meta-gradient.
        seed: the root of every random draw.
        lr: multiplier of the rule's step during the unroll.
        second_order: keep the optimizee-gradient graph (no ``stop_optimizee_grad``).
        random_horizon: each training episode runs a horizon drawn uniformly from ``[T, H]``
            (drawn after its tasks, from the same generator) rather than ``H``, so the rule is
            not trained for one fixed run length; the evaluation episode still runs ``H``.
        loss_weighting: how each step's loss counts in the meta-loss, over the episode's whole
            horizon (:func:`~learnedopt.meta.unroll.horizon_loss_weights`): ``"uniform"`` (the
            run's mean loss, as in Andrychowicz et al. 2016), ``"linear"`` or ``"quadratic"``
            (weights rising with the step, for rules judged by their final loss). The logged ``meta_loss`` stays the unweighted mean.
        select_every: score the rule every this many meta-steps (and at the last and before the
            first) on a fixed held-out episode and keep the best weights (module docstring);
            0: keep the last weights.
        select_tasks: tasks of that selection episode (None: ``meta_batch``); a small draw is a
            noisy score (``benchmarks/results/l2l_selection/``).
        data: MNIST folder of the tasks that read it (:data:`~learnedopt.meta.tasks.DATA_FAMILIES`;
            None: the default search); refused for tasks that read none. A ``pathlib.Path``
            here or in ``preset`` is held as its string.
        device: where the unroll runs, ``"cpu"`` or ``"cuda[:N]"`` (under several processes
            ``"cuda"``, each rank's GPU: see :func:`~learnedopt.meta.loop.check_device`). Random
            draws are made on the CPU either way, so the device changes results only by rounding
            (but for what a task's loss or the rule draws from torch's global RNG, e.g. dropout: on
            a GPU from its generator), and a run may be resumed on another device.
    """

    task: str = "quadratic"
    rule: str | None = "CoordinateLSTM"
    rule_config: dict[str, Any] | None = None
    preset: str | None = None
    unroll: int = 20
    horizon: int = 100
    meta_batch: int = 8
    meta_steps: int = 100
    meta_lr: float = 1e-3
    clip: float = 1.0
    seed: int = 0
    lr: float = 1.0
    second_order: bool = False
    random_horizon: bool = False
    loss_weighting: str = "uniform"
    select_every: int = 0
    select_tasks: int | None = None
    data: str | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        object.__setattr__(self, "rule_config", default_rule_config(self.rule_config))
        for name in PATH_FIELDS:  # a pathlib.Path of the API, which the checkpoint and config.json could not record
            object.__setattr__(self, name, path_string(getattr(self, name)))

    @property
    def meta_steps_shape_the_run(self) -> bool:
        """``select_every`` scores the last step."""
        return self.select_every > 0

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad setting."""
        if (member := imported_mixture_member(self.task)) is not None:
            raise ConfigError(f"--task {self.task}: {IMPORTED_NOT_MIXED.format(member=member)}")
        if not is_task_family(self.task):
            raise ConfigError(f"unknown task {self.task!r}; choose from {TASK_NAME_SYNTAX}")
        try:
            check_mixture_weights([w for _, w in parse_mixture(self.task) or []])
        except ValueError as err:
            raise ConfigError(f"--task {self.task}: {err}") from None
        if self.data is not None and not reads_data(self.task):
            raise ConfigError(
                f"--data is the MNIST folder of --task {' and '.join(DATA_FAMILIES)}; --task {self.task} reads none"
            )
        if self.rule is None and self.preset is None:
            raise ConfigError("give exactly one of --rule and --preset")
        if self.rule is not None and self.preset is not None and entry_point_path(self.rule) is None:
            raise ConfigError(
                "give exactly one of --rule and --preset (both only for a weight file of your own rule, whose class "
                "--rule module:Class names)"
            )
        if self.rule is not None:
            rule_class(self.rule)
        if self.rule_config is not None:
            if self.preset is not None:
                raise ConfigError("--rule-config sets the architecture of --rule; a --preset has its own")
            check_rule_config(self.rule, self.rule_config)
        if self.preset is not None:
            _check_preset(self.preset, self.rule)
        for name in ("unroll", "horizon", "meta_batch", "meta_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}"
                )
        if self.seed < 0:
            raise ConfigError(f"--seed must be a non-negative integer, got {self.seed}")
        check_select_every(self.select_every)
        if self.select_tasks is not None:
            if self.select_tasks < 1:
                raise ConfigError(f"--select-tasks must be a positive integer, got {self.select_tasks}")
            if not self.select_every:
                raise ConfigError("--select-tasks sizes the selection episode of --select-every; give --select-every too")
        for name in ("meta_lr", "clip", "lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be a positive number, got {value}"
                )
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ConfigError(
                f"unknown --loss-weighting {self.loss_weighting!r}; choose from {', '.join(LOSS_WEIGHTINGS)}"
            )
        if self.unroll > self.horizon:
            raise ConfigError(
                f"--unroll T={self.unroll} is longer than --horizon H={self.horizon}; need T <= H"
            )
        check_elements(f"--horizon {self.horizon} and --meta-batch {self.meta_batch}", self.horizon * self.meta_batch,
                       "an episode's (H, B) losses")  # fmt: skip
        if self.select_tasks is not None:
            check_elements(f"--horizon {self.horizon} and --select-tasks {self.select_tasks}",
                           self.horizon * self.select_tasks, "the selection episode's (H, K) losses")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def same_run_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` as a resume compares it with the run's: a mixture by the name of the
        family it builds (:func:`~learnedopt.meta.tasks.canonical_task_name`), the selection
        episode's size as the run takes it (:func:`select_tasks`) and ``rule_config`` without the
        rule class's defaults (:func:`~learnedopt.meta.loop.rule_config_given`), so that a
        setting the run took by default may be given explicitly."""
        d = self.to_dict()
        d["task"] = canonical_task_name(self.task)
        if self.select_every:
            d["select_tasks"] = select_tasks(self)
        if self.rule is not None:
            d["rule_config"] = rule_config_given(self.rule, self.rule_config)
        return d


@dataclass
class MetaTrainResult:
    """What :func:`meta_train` returns.

    Attributes:
        rule: the meta-trained rule.
        step: meta-steps completed.
        log: one dict per meta-step of this process (as written to ``log.jsonl``).
        finished: whether all ``meta_steps`` were run (and the final files written).
        eval: ``{"initial": ..., "final": ...}`` mean evaluation loss, when finished.
        selected_step: the meta-step whose weights ``rule`` holds (0: the initial rule); the last
            step without ``select_every``.
    """

    rule: UpdateRule
    step: int
    log: list[dict[str, Any]]
    finished: bool
    eval: dict[str, float] | None = None
    selected_step: int | None = None


#: how the model card names each non-uniform ``loss_weighting``
_ADVERBS = {"linear": "linearly", "quadratic": "quadratically"}


# ----------------------------------------------------------------------------- the loop
def _check_preset(preset: str, rule: str | None) -> None:
    """Raise :class:`ConfigError` unless ``preset`` is a preset or a readable weight file of a
    registered kind: ``rule``'s (your own ``module:Class``, imported by :func:`rule_class`) where
    given; where not, a kind of your own is refused with the ``--rule`` that names its class."""
    if preset in PRESETS:
        kind = PRESETS[preset].kind
    elif not Path(preset).is_file():
        raise ConfigError(
            f"unknown preset {preset!r} and no such weight file{folder_note(preset)}; presets: {', '.join(sorted(PRESETS))}"
        )
    else:
        try:
            header = read_header(preset, registered=False)
        except (OSError, ValueError) as err:
            raise ConfigError(f"--preset {preset}: not a readable weight file ({err})") from None
        kind = header["kind"]
        if rule is None and kind not in RULES:
            recorded = recorded_rule_class(header)
            raise ConfigError(
                f"--preset {preset} is a weight file of your own rule kind {kind!r}: name its class, "
                + (f"--rule {recorded} (as the file records it)" if recorded else "--rule module:Class")
            )
    if rule is not None and rule_class(rule).kind != kind:
        raise ConfigError(f"--preset {preset} holds a {kind} rule, but --rule {rule} is a {rule_class(rule).kind}")


def initial_rule(config: MetaTrainConfig) -> UpdateRule:
    """The rule a run starts from: a preset's or a weight file's weights (of your own rule: its
    class ``config.rule`` registered first), or the class's seeded initialisation."""
    if config.preset in PRESETS:
        rule, _ = build_preset(config.preset)
    elif config.preset is not None:
        if config.rule is not None:
            rule_class(config.rule)  # registered, so that the file of its kind loads
        try:
            rule, _ = load_weights(config.preset)
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError(f"--preset {config.preset}: not a readable weight file ({err})") from None
    elif config.rule in RULES and entry_point_path(config.rule) is None:
        rule = seeded_rule(RULES[config.rule], dict(config.rule_config or {}), generator_for(config.seed, _INIT_STREAM))
    else:  # your own module:Class, initialised by its constructor under the run's seed
        with seeded_global_rng(derive_seed(config.seed, _INIT_STREAM), "cpu"):
            cls = rule_class(config.rule)
            try:
                rule = cls.from_config_dict(dict(config.rule_config or {}))
            except Exception as err:  # noqa: BLE001 - the user's constructor: any failure is one line
                raise ConfigError(f"--rule {config.rule}: building it raised {type(err).__name__}: {one_line(err)}") from None
    rule = rule.float().requires_grad_(True)
    if config.rule is not None and entry_point_path(config.rule) is not None:
        # tried now, so that a rule of your own that breaks its contract is refused before the run
        # writes anything, not met as a traceback in the unroll or as a run that trains nothing
        try:
            check_rule_call(rule)
        except ValueError as err:
            raise ConfigError(f"--rule {config.rule}: {one_line(err)}") from None
    return rule


def episode(
    rule: UpdateRule,
    family: TaskFamily,
    config: MetaTrainConfig,
    generator: torch.Generator,
    meta_optimizer: torch.optim.Optimizer | None = None,
    workers: Workers = SINGLE,
    tasks: int | None = None,
) -> tuple[Tensor, list[float]]:
    """One episode (see the module docstring) of ``tasks`` tasks (None: ``config.meta_batch``);
    meta-updates only when ``meta_optimizer`` is given.

    The whole meta-batch is drawn from ``generator`` on every rank and each rank unrolls its
    share (:meth:`Workers.share`); the meta-gradient is averaged over the ranks before clipping,
    so every rank takes the same meta-update, the one a single process would take.

    Returns:
        ``(losses, grad_norms)``: ``(horizon, B / world_size)`` optimizee losses of this rank's
        tasks and the pre-clip meta-gradient norm of each truncation; the horizon is ``H``, or
        with ``random_horizon`` and a ``meta_optimizer`` a draw from ``[T, H]``.
    """
    count = config.meta_batch if tasks is None else tasks
    batch = family.sample_batch(count, generator)
    params = {k: v.to(family.device) for k, v in batch.init_params(generator).items()}
    horizon = config.horizon
    if config.random_horizon and meta_optimizer is not None:
        horizon = int(torch.randint(config.unroll, config.horizon + 1, (), generator=generator))
    part = workers.share(count)
    if workers.world_size > 1:  # one process runs the whole batch (subset would rebuild it as type(self)(tasks))
        batch, params = batch.subset(part), {k: v[part] for k, v in params.items()}
    state = rule.init_state(num_coordinates(params), dtype=torch.float32, device=family.device)
    grad_norms: list[float] = []

    def update(meta_loss: Tensor) -> None:
        try:
            workers.require_finite("the meta-loss", meta_loss)
            meta_optimizer.zero_grad(set_to_none=True)
            meta_loss.backward()
            workers.average_gradients_(list(rule.parameters()))
            grad_norms.append(clip_meta_gradient_(list(rule.parameters()), config.clip))
        except FloatingPointError as err:
            if not grad_norms:
                raise
            taken = f"{len(grad_norms)} meta-update{'s' * (len(grad_norms) > 1)}"
            raise AfterMetaUpdates(f"{err} (after {taken} of this meta-step)") from None
        meta_optimizer.step()

    losses = truncated_unroll(
        rule,
        batch,
        params,
        state,
        horizon=horizon,
        truncation=config.unroll,
        update=update if meta_optimizer is not None else None,
        lr=config.lr,
        stop_optimizee_grad=not config.second_order,
        loss_weights=horizon_loss_weights(config.loss_weighting, horizon).to(family.device),
    )
    return losses, grad_norms


def evaluate(
    rule: UpdateRule,
    family: TaskFamily,
    config: MetaTrainConfig,
    *,
    stream: int = _EVAL_STREAM,
    weighted: bool = False,
    workers: Workers = SINGLE,
    tasks: int | None = None,
) -> float:
    """Mean optimizee loss over a fixed episode of ``tasks`` tasks (None: ``config.meta_batch``)
    and ``config.horizon`` steps (generator ``(seed, stream)``; by default the card's evaluation
    episode), no meta-updates.

    With ``weighted`` each step's loss counts as in the meta-loss (``config.loss_weighting``).
    With several ``workers`` each unrolls its share of the tasks and all return the same mean.
    """
    frozen = copy.deepcopy(rule).requires_grad_(False)  # no graph through the meta-parameters
    part = workers.share(config.meta_batch if tasks is None else tasks)
    # the global RNG's draws (dropout, a loss's minibatches) from (seed, stream), whatever ran before
    with seeded_global_rng(derive_seed(config.seed, _DRAWS_STREAM, 1, stream, part.start), config.device):
        losses = episode(frozen, family, config, generator_for(config.seed, stream), workers=workers, tasks=tasks)[0]
    if weighted:
        weights = horizon_loss_weights(config.loss_weighting, losses.shape[0]).to(losses.device)
        losses = weights[:, None] * losses
    return workers.mean(float(losses.mean()))


class _RuleTrainer:
    """``--algo lstm``: one :func:`episode` per meta-step (the
    :class:`~learnedopt.meta.loop.Trainer` of update rules)."""

    #: what ``data_sha256`` hashes, as a refused ``--resume`` names it
    data_kind = "MNIST files"

    def __init__(self, config: MetaTrainConfig, workers: Workers = SINGLE) -> None:
        self.config, self.workers = config, workers
        self.family = _family(config, "meta_train")
        # the content of the MNIST files the built-in families read, so that --resume refuses others
        self.data_sha256 = mnist_sha256(config.data) if reads_data(config.task) and entry_point_path(config.task) is None else None
        # the final evaluation's tasks, built now so that data without them is refused before
        # the run rather than after it
        self.eval_family = _family(config, "meta_valid")
        # the tasks of meta-step 1 and of the evaluation, tried now, so that a family that cannot be
        # unrolled is refused before the run writes anything rather than as a traceback in it
        _check_family(self.family, config, generator_for(config.seed, _TRAIN_STREAM, 1), "meta-training", workers=workers)
        _check_family(self.eval_family, config, generator_for(config.seed, _EVAL_STREAM), "evaluation", workers=workers)
        self.rule = initial_rule(config).to(config.device)
        self.initial = copy.deepcopy(self.rule)
        self.meta_optimizer = torch.optim.Adam(self.rule.parameters(), lr=config.meta_lr)
        select_family = self.eval_family if config.select_every else None
        if config.select_every and select_tasks(config) % workers.world_size:
            raise ConfigError(
                f"--select-tasks {select_tasks(config)} does not split evenly over {workers.world_size} "
                f"processes; use a multiple of {workers.world_size}"
            )
        self.selection = Selection(
            config.select_every,
            lambda rule: evaluate(rule, select_family, config, stream=_SELECT_STREAM, weighted=True, workers=workers,
                                  tasks=select_tasks(config)),  # fmt: skip
            lambda rule: {k: v.detach().clone() for k, v in rule.state_dict().items()},
        )

    def step(self, step: int) -> dict[str, float]:
        """Meta-step ``step``: one :func:`episode` with meta-updates; what it draws from the
        global RNG (dropout, a loss's minibatches) comes from it seeded from ``(seed, step, the
        rank's first task)``, so that a resumed run draws as an uninterrupted one."""
        config = self.config
        with seeded_meta_step(config.seed, _DRAWS_STREAM, step, self.workers, config.meta_batch, config.device):
            losses, grad_norms = episode(
                self.rule,
                self.family,
                self.config,
                generator_for(self.config.seed, _TRAIN_STREAM, step),
                self.meta_optimizer,
                self.workers,
            )
        record = {
            "meta_loss": self.workers.mean(float(losses.mean())),
            "final_loss": self.workers.mean(float(losses[-1].mean())),
            "grad_norm": max(grad_norms),
            "meta_updates": len(grad_norms),
            "horizon": len(losses),
        }
        return {**record, **self.selection.after_step(step, self.config.meta_steps, self.rule, lambda: self.initial)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "rule_kind": self.rule.kind,
            "rule_config": self.rule.config_dict(),
            "rule": self.rule.state_dict(),
            "initial_rule": self.initial.state_dict(),
            "meta_optimizer": self.meta_optimizer.state_dict(),
            "selection": self.selection.state_dict(),
            "data_sha256": self.data_sha256,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        refuse_other_data(state.get("data_sha256"), self.data_sha256, self.data_kind, self.config.data)
        if isinstance(state.get("rule_config"), Mapping):  # recorded by every checkpoint of this format
            refuse_other_architecture(f"a {state.get('rule_kind')}", {"kind": state.get("rule_kind"), **state["rule_config"]},
                                      {"kind": self.rule.kind, **self.rule.config_dict()})  # fmt: skip
        self.rule.load_state_dict(state["rule"])
        self.initial.load_state_dict(state["initial_rule"])  # for the final evaluation
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.selection.load_state_dict(state.get("selection"))  # absent before selection existed


def meta_train(
    config: MetaTrainConfig,
    out: str | os.PathLike[str],
    *,
    checkpoint_every: int = 10,
    resume: bool = False,
    command: str | None = None,
    max_steps: int | None = None,
    progress: bool = True,
    workers: Workers | None = None,
) -> MetaTrainResult:
    """Meta-train as ``learnedopt meta-train`` does (see the module docstring for the files).

    Args:
        config: the run's configuration (validated here).
        out: output folder (created).
        checkpoint_every: write ``checkpoint.pt`` every this many meta-steps (and at the end).
        resume: continue from ``out/checkpoint.pt`` (a run with a log but no checkpoint yet is
            started again); the config must match the run's (``config.json``'s and the
            checkpoint's, as :meth:`MetaTrainConfig.same_run_dict` gives them) except for
            the data folder, the device and ``meta_steps`` (unless
            :attr:`MetaTrainConfig.meta_steps_shape_the_run`).
        command: the command line, recorded in the weight file and model card (the CLI passes
            :func:`canonical_command`, which is the same for a run and its resumption).
        max_steps: stop after this meta-step without writing the final files (simulates a kill).
        progress: show a progress bar (tqdm when installed) or per-step lines on stderr.
        workers: the processes to share the meta-batch over (default
            :func:`learnedopt.meta.distributed.current`: the initialised default process group,
            else this process alone). Only rank 0 writes files and evaluates; the others
            return the same rule with ``finished`` and no ``eval``.

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
        trainer = _RuleTrainer(built, workers)
    command = command or "learnedopt.meta.train.meta_train(...)"
    with OutputLock() as lock:  # held until the final files are written
        done, log = train_loop(
            config,
            trainer,
            out,
            checkpoint_every=checkpoint_every,
            resume=resume,
            max_steps=max_steps,
            progress=progress,
            workers=workers,
            lock=lock,
        )
        rule, family = trainer.rule, trainer.family
        if done < config.meta_steps:
            return MetaTrainResult(rule, done, log, finished=False)
        selected_step = trainer.selection.restore_best(rule.load_state_dict, config.meta_steps)
        if not workers.is_main:
            return MetaTrainResult(rule, done, log, finished=True, selected_step=selected_step)

        eval_family = trainer.eval_family
        scores = {
            "initial": evaluate(trainer.initial, eval_family, config),
            "final": evaluate(rule, eval_family, config),
        }
        summary = {
            "final_meta_loss": last_record(out, log, config.meta_steps)["meta_loss"],
            "eval_initial": scores["initial"],
            "eval_final": scores["final"],
        }
        summary |= trainer.selection.header_fields()
        with writing(out / WEIGHTS_NAME):
            save_weights(
                rule,
                out / WEIGHTS_NAME,
                preset=None,
                trained=True,
                trained_on=f"{_task_name(config.task, family)}, {config.meta_steps} meta-steps, seed {config.seed}",
                # not "config": that key of the header is the rule's architecture (load_weights reads it)
                extra={"command": command, "meta_train_config": config.to_dict(),
                       "processes": workers.world_size, **summary},  # fmt: skip
            )
        _write_card(out / CARD_NAME, config, command, family, eval_family, rule, summary, workers.world_size, trainer.selection)
        return MetaTrainResult(rule, config.meta_steps, log, finished=True, eval=scores, selected_step=selected_step)


def select_tasks(config: MetaTrainConfig) -> int:
    """The number of tasks of the selection episode."""
    return config.meta_batch if config.select_tasks is None else config.select_tasks


def _family(config: MetaTrainConfig, split: str) -> TaskFamily:
    """The task family of ``config`` (data part ``split``) on ``config.device``."""
    try:
        family = make_family(config.task, data=config.data, split=split)
    except (FileNotFoundError, ValueError) as err:
        needs = "" if entry_point_path(config.task) else " needs MNIST"
        raise ConfigError(f"--task {config.task}{needs}: {err}") from None
    moved = family.to(config.device)
    if not isinstance(moved, TaskFamily):  # an override of to() that forgot its return
        raise ConfigError(
            f"--task {config.task}: {type(family).__name__}.to() returned {type(moved).__name__}: it must return the family (self)"
        )
    return moved


def _task_name(task: str, family: TaskFamily) -> str:
    """How a weight file's ``trained_on`` names the task: a built-in family by its name, the user's
    own (``module:Class``, which means nothing where the module is not) with its description."""
    return f"{task} ({family.describe()})" if entry_point_path(task) is not None else task


def _check_family(
    family: TaskFamily, config: MetaTrainConfig, generator: torch.Generator, role: str, *, workers: Workers = SINGLE
) -> None:
    """Raise :class:`ConfigError` unless ``family`` describes itself, the rule's coordinates of its
    meta-batch fit a tensor (:func:`_check_coordinates`), and the meta-batch drawn from
    ``generator`` unrolls (:func:`~learnedopt.meta.unroll.check_task_batch`) on ``config.device``
    and is drawn again the same from that generator's state (:func:`_check_repeatable`), and on
    several ``workers`` that it splits into their shares (:meth:`TaskBatch.subset`).
    Every rank checks the whole meta-batch, not its share, so that all fail or pass together."""
    stage = "describe()"
    try:
        checked_description(family, "paragraph")
        stage = f"the first {role} tasks"
        _check_coordinates(family, config, generator)
        again = torch.Generator().set_state(generator.get_state())
        batch, params = _draw(family, config.meta_batch, generator)
        check_task_batch(batch, params, dtype=torch.float32)
        _check_repeatable(family, config.meta_batch, again, batch, params)
        if workers.world_size > 1:
            _check_subset(batch, workers.share(config.meta_batch))
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - the family may be the user's: any failure is one line
        on_device = (f" (on --device {config.device}: a family's tasks must keep their data on family.device, "
                     "where TaskFamily.to puts it)") if config.device != "cpu" and stage != "describe()" else ""  # fmt: skip
        message = one_line(err)
        shown = message if isinstance(err, ValueError) else f"{type(err).__name__}: {message}"
        raise ConfigError(f"--task {config.task}: {stage}: {shown}{on_device}") from None


def _check_subset(batch: TaskBatch, part: slice) -> None:
    """Raise ValueError (one line) where ``batch.subset(part)`` fails: a batch class whose
    constructor is not ``(tasks)`` and that does not override :meth:`TaskBatch.subset`."""
    try:
        batch.subset(part)
    except Exception as err:  # noqa: BLE001 - the user's class: any failure is one line
        raise ValueError(
            f"{type(batch).__name__}.subset() (a process's share of the meta-batch) raised {type(err).__name__}: "
            f"{one_line(err)}: a TaskBatch class whose constructor is not (tasks) must override subset"
        ) from None


def _check_repeatable(
    family: TaskFamily, count: int, generator: torch.Generator, batch: TaskBatch, params: Mapping[str, Tensor]
) -> None:
    """Raise ValueError unless ``count`` tasks of ``family`` drawn again from ``generator`` (in the
    state that drew ``batch`` and its initial ``params``) have the same initial parameters and
    losses and gradients at steps 0 and 1 (at ``params``; every episode reaches step 1): a family
    drawing from a global random state, or a loss drawing from a generator nothing seeds, gave a
    ``--resume`` other tasks or draws than the run it continued, silently. Both batches' losses
    are computed with the global RNGs seeded alike and in a meta-step's order (step 0, then 1), as
    a meta-step seeds them: draws in the loss (dropout, minibatches) repeat, those made in
    sampling do not."""
    batch_again, params_again = _draw(family, count, generator)
    for k, v in params.items():
        if k not in params_again or params_again[k].shape != v.shape or not torch.equal(params_again[k], v):
            raise ValueError(f"two draws from the same seed differ (their initial params[{k!r}]): {REPEATABLE_DRAWS}")
    with seeded_global_rng(0, family.device):
        first = [_step_values(batch, params, step) for step in (0, 1)]
    with seeded_global_rng(0, family.device):
        second = [_step_values(batch_again, params, step) for step in (0, 1)]
    close = [all(_close(a, b) for a, b in zip(x, y, strict=True)) for x, y in zip(first, second, strict=True)]
    if not close[0]:
        raise ValueError(f"two draws from the same seed differ (their losses or gradients at step 0): {REPEATABLE_DRAWS}")
    if not close[1]:  # the same tasks: the loss's own draws differ
        raise ValueError(
            "two draws from the same seed differ (their losses or gradients at step 1, not at step 0): a task's loss "
            "may draw from torch's, numpy's or Python's global random state, which each meta-step seeds, but not from "
            "a generator of its own that nothing seeds, so that --resume repeats the run"
        )


def _step_values(batch: TaskBatch, params: Mapping[str, Tensor], step: int) -> list[Tensor]:
    """The ``(B,)`` losses of ``batch`` at step ``step`` at ``params`` and their gradients, detached
    (zeros for a parameter the loss does not use: the unroll, not this check, refuses that)."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    loss = batch.loss(leaves, step)
    grads = torch.autograd.grad(loss.sum(), list(leaves.values()), allow_unused=True)
    return [loss.detach(), *(torch.zeros_like(v) if g is None else g for v, g in zip(leaves.values(), grads, strict=True))]


def _close(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` are equal up to rounding, NaN where the other is NaN: a tolerance,
    not equality, as a loss on a GPU may use atomics (e.g. an embedding's backward)."""
    finite = a[a.isfinite()]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    return torch.allclose(a, b, rtol=1e-4, atol=1e-6 * scale, equal_nan=True)


def _check_coordinates(family: TaskFamily, config: MetaTrainConfig, generator: torch.Generator) -> None:
    """Raise :class:`ConfigError` where the rule's ``(B * P,)`` coordinates of a meta-batch (and
    of the selection episode's ``--select-tasks``) would exceed :data:`~learnedopt.values.MAX_ELEMENTS`,
    ``P`` being the parameter count of one task of the draw ``generator`` (a copy: it is not
    advanced), drawn alone so that a meta-batch too large to allocate is not."""
    probe = torch.Generator().set_state(generator.get_state())
    try:
        per_task = num_coordinates(_draw(family, 1, probe)[1])
    except Exception:  # noqa: BLE001 - e.g. a family of your own that needs two tasks: the whole draw says what fails
        return
    counts = {"--meta-batch": config.meta_batch}
    if config.select_every and config.select_tasks is not None:
        counts["--select-tasks"] = config.select_tasks
    for option, count in counts.items():
        check_elements(f"--task {config.task} and {option} {count}", count * per_task,
                       f"the rule's (B * P,) coordinates (P = {per_task:,} parameters per task)")  # fmt: skip


def _draw(family: TaskFamily, count: int, generator: torch.Generator) -> tuple[TaskBatch, dict[str, Tensor]]:
    """``count`` tasks of ``family`` and their initial parameters (``(count, *shape)`` per name, on
    ``family.device``) drawn from ``generator``; raises ``ValueError`` where the family gives
    something else than :class:`~learnedopt.meta.TaskBatch` of :class:`~learnedopt.meta.Task`."""
    batch = family.sample_batch(count, generator)
    if not isinstance(batch, TaskBatch):
        raise ValueError(f"sample_batch gave a {type(batch).__name__}, not a TaskBatch")
    if not all(isinstance(task, Task) for task in batch.tasks):
        kinds = sorted({type(task).__name__ for task in batch.tasks if not isinstance(task, Task)})
        raise ValueError(f"sample gave a {', '.join(kinds)}, not a learnedopt.meta.Task")
    return batch, {k: v.to(family.device) for k, v in batch.init_params(generator).items()}


_MIXTURE_EVAL_NOTE = (
    " (from a mixture, the draw's tasks all come from one member, and its losses are on that "
    "member's scale)"
)


def _write_card(
    path: Path,
    config: MetaTrainConfig,
    command: str,
    family: TaskFamily,
    eval_family: TaskFamily,
    rule: UpdateRule,
    summary: dict[str, float],
    processes: int,
    selection: Selection,
) -> None:
    scored_on = (
        f"the loss of a fixed selection episode of {select_tasks(config)} held-out tasks (generator key "
        f"(seed, 3), {config.horizon} steps, weighted as the meta-loss)"
    )
    if config.loss_weighting == "uniform":
        meta_loss = "mean optimizee loss after each update"
    else:
        meta_loss = (
            f"{_ADVERBS[config.loss_weighting]} weighted mean of the optimizee losses after each update"
            + (", relative to the episode's own horizon" if config.random_horizon else "")
            + f" (`--loss-weighting {config.loss_weighting}`; the logged `meta_loss` is the unweighted mean)"
        )
    details = f"""Architecture: `{json.dumps(rule.config_dict())}`.

One meta-step is one episode: {config.meta_batch} tasks, {f"a number of optimizee steps drawn uniformly from [{config.unroll}, {config.horizon}]" if config.random_horizon else f"{config.horizon} optimizee steps"} in truncations
of {config.unroll}, one Adam step (lr {config.meta_lr}, gradient norm clipped to {config.clip}) per
truncation; {"second-order (exact) meta-gradients" if config.second_order else "optimizee gradients detached (first-order, as in Andrychowicz et al. 2016)"}.
Meta-loss: {meta_loss}."""
    data = f"""Meta-training tasks: {family.describe()}.

Evaluation tasks: {eval_family.describe()}."""
    imported = entry_point_path(config.task)
    if imported is not None:
        split = ("built with split='meta_train' for training and split='meta_valid' for evaluation"
                 if takes_parameter(load_entry_point(config.task), "split")
                 else "taking no split, so the evaluation tasks are other draws from the training distribution")  # fmt: skip
        data += (f"\n\nThe family is your own `{config.task}`, {split}. The command above needs its module "
                 f"`{imported[0]}` importable (e.g. `PYTHONPATH=.` in its folder).")  # fmt: skip
    own_rule = None if config.rule is None else entry_point_path(config.rule)
    if own_rule is not None:
        start = ("initialised by its constructor under the seed" if config.preset is None
                 else f"started from the architecture and weights of {markdown.code(config.preset)}")  # fmt: skip
        details += (f"\n\nThe rule is your own `{config.rule}`, {start}. The command "
                    f"above needs its module `{own_rule[0]}` importable, and its weight file loads where the class is "
                    "registered (`learnedopt.nn.register_rule`).")  # fmt: skip
    metrics = f"""| metric | value |
|---|---|
| meta-loss of the last meta-step (mean loss over its {"steps (its drawn horizon is in the log)" if config.random_horizon else f"{config.horizon} steps"} and {config.meta_batch} tasks) | {summary["final_meta_loss"]:.6g} |
| evaluation episode, initial rule (mean loss) | {summary["eval_initial"]:.6g} |
| evaluation episode, meta-trained rule (mean loss) | {summary["eval_final"]:.6g} |

The evaluation episode is one fixed draw of {config.meta_batch} tasks (generator key (seed, 2)),
run for {config.horizon} steps without meta-updates{_MIXTURE_EVAL_NOTE if isinstance(eval_family, MixtureFamily) else ""}. Per-step metrics are in `{LOG_NAME}`.{selection.card_note(config.meta_steps, scored_on)}"""
    text = model_card(f"Meta-trained {rule.kind}", processes_note(processes), command, config.to_dict(), details, data, metrics)
    write_text_atomic(path, text)


# ----------------------------------------------------------------------------- from arguments
#: options only ``--algo lstm`` reads (argparse dest names); their parser default is None
LSTM_ONLY = (
    "rule",
    "rule_config",
    "preset",
    "unroll",
    "horizon",
    "lr",
    "second_order",
    "random_horizon",
    "loss_weighting",
    "select_tasks",
)


def config_from_args(args: argparse.Namespace) -> MetaTrainConfig:
    """The ``--algo lstm`` configuration of parsed arguments (unset options: the defaults)."""
    d = MetaTrainConfig()
    rule = args.rule if args.rule is not None or args.preset is not None else d.rule

    def given(name: str) -> Any:
        value = getattr(args, name)
        return getattr(d, name) if value is None else value

    return MetaTrainConfig(
        task=given("task"),
        rule=rule,
        rule_config=args.rule_config,
        preset=args.preset,
        unroll=given("unroll"),
        horizon=given("horizon"),
        meta_batch=given("meta_batch"),
        meta_steps=given("meta_steps"),
        meta_lr=given("meta_lr"),
        clip=given("clip"),
        seed=args.seed,
        lr=given("lr"),
        second_order=given("second_order"),
        random_horizon=given("random_horizon"),
        loss_weighting=given("loss_weighting"),
        select_every=given("select_every"),
        select_tasks=args.select_tasks,
        data=args.data,
        device=given("device"),
    )


def canonical_command(
    config: MetaTrainConfig, out: str | os.PathLike[str], checkpoint_every: int
) -> str:
    """The ``learnedopt meta-train`` command line that runs ``config`` from scratch: every setting
    explicit except those left at a default that means "off" or "as before" (no ``--rule-config``,
    ``--second-order``, ``--random-horizon``, ``--select-every``, ``--select-tasks`` or ``--data``;
    ``--loss-weighting uniform`` and ``--device cpu`` omitted)."""
    words = ["learnedopt", "meta-train"]
    if config.rule is not None:  # both for a weight file of your own rule
        words += ["--rule", config.rule]
    if config.preset is not None:
        words += ["--preset", config.preset]
    if config.rule_config is not None:
        words += ["--rule-config", json.dumps(config.rule_config, sort_keys=True)]
    for name in (
        "task",
        "unroll",
        "horizon",
        "meta_batch",
        "meta_steps",
        "meta_lr",
        "clip",
        "lr",
        "seed",
    ):
        words += [f"--{name.replace('_', '-')}", str(getattr(config, name))]
    if config.second_order:
        words.append("--second-order")
    if config.random_horizon:
        words.append("--random-horizon")
    if config.loss_weighting != MetaTrainConfig.loss_weighting:
        words += ["--loss-weighting", config.loss_weighting]
    if config.select_every:
        words += ["--select-every", str(config.select_every)]
    if config.select_tasks is not None:
        words += ["--select-tasks", str(config.select_tasks)]
    if config.data is not None:
        words += ["--data", config.data]
    if config.device != "cpu":
        words += ["--device", config.device]
    words += ["--out", str(out), "--checkpoint-every", str(checkpoint_every)]
    return shlex.join(words)


if __name__ == "__main__":  # python -m learnedopt.meta.train: the meta-train command
    from .command import main

    distributed.exit_process(main())
