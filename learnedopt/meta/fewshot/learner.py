"""A few-shot learner (its model, learned inner step sizes and update rule) and its model file
``model.safetensors``: tensors plus a JSON header holding everything :func:`load_learner` needs
to rebuild and adapt it. Loading never unpickles."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from ...nn import RULES, MetaLSTMCell, UpdateRule
from ...weights import (
    MODEL_HEADER_KEY,
    blank_rule,
    check_path_type,
    check_rule_shapes,
    load_weights,
    open_with_header,
    save_with_header,
    seeded_rule,
)
from ...values import seeded_global_rng
from ...version import __version__
from ..batchnorm import apply_batchnorm_policy_, replace_batchnorm_
from ..maml import MAML
from ..model_calls import Inputs, call_model, check_episode, check_steps, check_task, outside_inference, scalar_loss
from ..over_tasks import autocast_enabled, vmap_or_loop, vmap_tasks
from ..reptile import Reptile
from ..tasks import TaskBatch, derive_seed, generator_for
from ..unroll import UnrollResult, init_rule_state, unroll
from .config import FEWSHOT_ALGOS, FewShotConfig
from .family import LOSSES, OWN_KIND, family_loss, family_model, import_fewshot_family, is_own_task

Params = dict[str, Tensor]

#: the newest model-file format: 2 adds ``head_only``, which a reader of format 1 would ignore
#: (adapting every layer of an ANIL learner); a file without it is still written as format 1
MODEL_FORMAT = 2
READABLE_FORMATS = (1, 2)
SINUSOID_MLP = (1, 40, 40, 1)


@dataclass(frozen=True)
class LearnerSpec:
    """How to rebuild and adapt a few-shot learner (the JSON header of ``model.safetensors``).

    Attributes:
        algo: the algorithm that trained it.
        architecture: ``{"kind": "mlp", "sizes": [...], "activation": "relu"}``,
            ``{"kind": "conv4", "in_channels": 1, "ways": N, "hidden": H, "image_size": S}``, or
            ``{"kind": "own", "family": "module:attribute"}``: the network of your own
            :class:`~learnedopt.meta.fewshot.FewShotFamily`, whose ``model()`` builds it (so the
            module must be importable where the learner is built or loaded).
        loss: a key of :data:`LOSSES`, or ``"own"``: your own family's callable ``loss``.
        inner_steps: inner steps in meta-training.
        test_inner_steps: inner steps when adapting after meta-training.
        inner_lr: inner step size (None for meta-lstm).
        learn_inner_lr: whether the file holds learned step sizes (``inner_lr.*``).
        zero_head: whether every task starts its output layer (the last ``nn.Linear``) at zero.
        head_only: whether the inner loop adapts the output layer alone (ANIL).
        inner_optimizer: Reptile's inner optimizer, ``"sgd"`` or ``"adam"`` (None otherwise).
        rule: ``{"kind": ..., "config": {...}}`` of the meta-lstm rule (None otherwise).
        rule_start: meta-lstm: the preset or weight file whose weights the rule starts from (None:
            its seeded initialisation); read only when a learner is initialised, not loaded.
    """

    algo: str
    architecture: dict[str, Any]
    loss: str
    inner_steps: int
    test_inner_steps: int
    inner_lr: float | None = None
    learn_inner_lr: bool = False
    zero_head: bool = False
    head_only: bool = False
    inner_optimizer: str | None = None
    rule: dict[str, Any] | None = None
    rule_start: str | None = None

    @classmethod
    def for_config(cls, config: FewShotConfig, family: Any = None) -> LearnerSpec:
        """The learner a run of ``config`` trains (``family``: your own task's
        :class:`~learnedopt.meta.fewshot.FewShotFamily`, for its loss; imported if not given)."""
        loss = "mse" if config.task == "sinusoid" else "cross_entropy"
        if is_own_task(config.task):
            architecture: dict[str, Any] = {"kind": OWN_KIND, "family": config.task}
            loss = family_loss(family if family is not None else import_fewshot_family(config.task))[0]
        elif config.task == "sinusoid":
            architecture = {"kind": "mlp", "sizes": list(SINUSOID_MLP), "activation": "relu"}
        else:
            architecture = {"kind": "conv4", "in_channels": 1, "ways": config.ways, "hidden": config.hidden,
                            "image_size": config.image_size}  # fmt: skip
        return cls(
            algo=config.algo,
            architecture=architecture,
            loss=loss,
            inner_steps=config.inner_steps,
            test_inner_steps=config.test_inner_steps,
            inner_lr=config.inner_lr,
            learn_inner_lr=config.learn_inner_lr,
            zero_head=config.zero_head,
            head_only=config.head_only,
            inner_optimizer=("adam" if config.task == "omniglot" else "sgd") if config.algo == "reptile" else None,
            rule=_start_rule_spec(config) if config.algo == "meta-lstm" else None,
            rule_start=config.preset,
        )

    def to_dict(self) -> dict[str, Any]:
        """Every field by name, as the learner's model file records the spec."""
        return dataclasses.asdict(self)

    def example_shape(self) -> tuple[int, ...] | None:
        """The shape of one input example: ``(sizes[0],)`` for an MLP, ``(C, S, S)`` for conv-4;
        None for your own family's network, whose inputs only it knows."""
        if self.architecture["kind"] == OWN_KIND:
            return None
        if self.architecture["kind"] == "mlp":
            return (self.architecture["sizes"][0],)
        size = self.architecture["image_size"]
        return (self.architecture["in_channels"], size, size)


def _start_rule_spec(config: FewShotConfig) -> dict[str, Any]:
    """``{"kind", "config"}`` of meta-lstm's rule: its ``--preset``'s, or its class's with ``--rule-config``."""
    if config.preset is not None:
        rule = load_weights(config.preset)[0]
        return {"kind": rule.kind, "config": rule.config_dict()}
    return _rule_spec(RULES[config.rule or MetaLSTMCell.kind], config.rule_config)


def _rule_spec(rule_class: type[UpdateRule], overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``{"kind", "config"}`` of a rule class's architecture: its defaults with ``overrides``. The
    rule is built blank (:func:`~learnedopt.weights.blank_rule`): reading its config back draws
    nothing from torch's global generator."""
    return {"kind": rule_class.kind, "config": blank_rule(rule_class, dict(overrides or {})).config_dict()}


def build_model(architecture: Mapping[str, Any]) -> nn.Module:
    """The network of an architecture dict (see :class:`LearnerSpec`), BatchNorm made transductive.

    Input/output: MLP ``(N, sizes[0]) -> (N, sizes[-1])``; conv-4 ``(N, C, S, S) -> (N, ways)``.
    """
    from ...models import conv4

    if architecture["kind"] == "mlp":
        sizes = architecture["sizes"]
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.ReLU()]
        return nn.Sequential(*layers[:-1])
    if architecture["kind"] == "conv4":
        model = conv4(architecture["in_channels"], architecture["ways"], architecture["hidden"], architecture["image_size"])
        return replace_batchnorm_(model)
    raise ValueError(f"unknown architecture kind {architecture['kind']!r}")


def output_layer_name(model: nn.Module) -> str:
    """The module name of ``model``'s last ``nn.Linear`` (its output layer)."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ValueError("the model has no nn.Linear output layer")
    return names[-1]


class FewShotLearner:
    """A learned initialisation (``model``), with learned step sizes (Meta-SGD) or a learned update
    rule (meta-lstm) where the algorithm has them, and its algorithm's way of adapting to a task.

    Args:
        spec: what to build.
        seed: initialise the model from ``(seed, 0)`` and the rule from ``(seed, 0, 1)`` (or from
            ``spec.rule_start``'s weights); None leaves PyTorch's default initialisation (e.g.
            before loading tensors), drawn from torch's global generator, whose state is then
            restored (``fork_rng``: a seeded script's later draws are as without the learner,
            but what another thread draws from the generator meanwhile is rolled back, so an
            unseeded learner, and :func:`load_learner`, are not thread-safe). A seed draws
            nothing from the global generator for the rule, and only inside a seeded fork of it
            for the model.
        family: for a spec of your own family (architecture kind ``"own"``), the family whose
            ``model()`` and ``loss`` the learner uses; None imports it (``split="meta_train"``,
            no other arguments).
        rule: meta-lstm: the update rule to use as it is (of ``spec.rule``'s kind and config,
            its weights neither reset nor loaded from ``spec.rule_start``); None builds it.

    Raises:
        ValueError: an unknown algorithm or Reptile inner optimizer, or your own family that
            does not import or build (one line).
    """

    def __init__(
        self, spec: LearnerSpec, seed: int | None = None, family: Any = None, rule: UpdateRule | None = None
    ) -> None:
        if spec.algo not in FEWSHOT_ALGOS:  # e.g. a model file's header naming another algorithm
            raise ValueError(f"unknown few-shot algo {spec.algo!r}; this library adapts {', '.join(FEWSHOT_ALGOS)}")
        if spec.algo == "reptile" and spec.inner_optimizer not in ("sgd", "adam"):
            raise ValueError(f"Reptile's inner optimizer must be 'sgd' or 'adam', got {spec.inner_optimizer!r}")
        self.spec = spec
        own = spec.architecture["kind"] == OWN_KIND
        if own and family is None:
            family = import_fewshot_family(spec.architecture["family"])
        # the global RNG is left as it was (torch.manual_seed here also reseeded every CUDA generator
        # for good: the model is built on the CPU, whose generator alone is seeded)
        with torch.random.fork_rng(devices=[]) if seed is None else seeded_global_rng(derive_seed(seed, 0), "cpu"):
            self.model = family_model(spec.architecture["family"], family) if own else build_model(spec.architecture)
        if own:  # transductive for every algorithm, as build_model's conv-4 (meta-lstm's vmapped inner
            # loop failed on a BatchNorm layer's running statistics, which MAML and Reptile replace)
            apply_batchnorm_policy_(self.model, "transductive")
        self.loss_fn = family_loss(family)[1] if own else LOSSES[spec.loss]
        self.maml: MAML | None = None
        self.rule: UpdateRule | None = None
        self._vectorize: bool | str = "auto"  # meta-lstm's tasks: vmap, or a loop where the model cannot run under it
        if spec.algo in ("maml", "fomaml"):
            self.maml = MAML(
                self.model,
                inner_lr=spec.inner_lr,
                inner_steps=spec.inner_steps,
                first_order=spec.algo == "fomaml",
                learn_inner_lr=spec.learn_inner_lr,
                loss_fn=self.loss_fn,
                vectorize="auto",  # conv-4 on CPU: a loop over the tasks, faster than vmap there
                zero_init=(output_layer_name(self.model),) if spec.zero_head else (),
                adapt_only=(output_layer_name(self.model),) if spec.head_only else None,
            )
        elif spec.algo == "meta-lstm" and rule is not None:
            self.rule = rule
        elif spec.algo == "meta-lstm":
            if seed is None:  # PyTorch's default initialisation, in a fork of the global RNG as the model's
                with torch.random.fork_rng(devices=[]):
                    self.rule = RULES[spec.rule["kind"]].from_config_dict(spec.rule["config"])
                    self.rule.reset_parameters()
            else:  # its weights from the seed alone: the global generator is not drawn from
                self.rule = seeded_rule(RULES[spec.rule["kind"]], spec.rule["config"], generator_for(seed, 0, 1))
            if spec.rule_start is not None and seed is not None:
                self.rule.load_state_dict(load_weights(spec.rule_start)[0].state_dict())
        elif spec.algo == "reptile":
            self.reptile = Reptile(self.model, spec.inner_steps, self.inner_optimizer, loss_fn=self.loss_fn)

    def to(self, device: torch.device | str) -> FewShotLearner:
        """Move every learned tensor to ``device`` (in place); returns ``self``."""
        for module in (self.maml if self.maml is not None else self.model, self.rule):
            if module is not None:
                module.to(device)
        return self

    def inner_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """Reptile's inner optimizer on ``params``."""
        if self.spec.inner_optimizer == "adam":
            return torch.optim.Adam(params, lr=self.spec.inner_lr, betas=(0.0, 0.999))
        return torch.optim.SGD(params, lr=self.spec.inner_lr)

    def meta_parameters(self) -> list[nn.Parameter]:
        """What the outer optimizer trains: the model's parameters, then learned step sizes or
        the rule's parameters."""
        params = list(self.model.parameters())
        if self.maml is not None and self.maml.inner_lrs is not None:
            params += list(self.maml.inner_lrs.parameters())
        if self.rule is not None:
            params += list(self.rule.parameters())
        return params

    def tensors(self) -> dict[str, Tensor]:
        """Every learned tensor, named ``model.*``, ``inner_lr.*`` and ``rule.*``."""
        out = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        if self.maml is not None and self.maml.inner_lrs is not None:
            out.update({f"inner_lr.{k}": v for k, v in self.maml.inner_lrs.state_dict().items()})
        if self.rule is not None:
            out.update({f"rule.{k}": v for k, v in self.rule.state_dict().items()})
        return out

    def load_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        """Load :meth:`tensors`' output; raises ValueError if the names or shapes differ."""
        expected = {k: tuple(v.shape) for k, v in self.tensors().items()}
        found = {k: tuple(v.shape) for k, v in tensors.items()}
        if expected != found:
            raise ValueError(
                f"tensors do not fit the {self.spec.algo} learner (missing {sorted(set(expected) - set(found))}, "
                f"unexpected {sorted(set(found) - set(expected))}, "
                f"wrong shape {sorted(k for k in set(expected) & set(found) if expected[k] != found[k])})"
            )
        with torch.no_grad():
            for name, value in self.tensors().items():
                value.copy_(tensors[name])

    # ---------------------------------------------------------------- inner loops
    def meta_loss(self, x_s: Inputs, y_s: Inputs, x_q: Inputs, y_q: Inputs) -> Tensor:
        """Mean query loss after ``inner_steps`` of adaptation, differentiable w.r.t. the
        meta-parameters (MAML, meta-lstm). Inputs ``(B, N_support, ...)`` and ``(B, N_query, ...)``,
        or (a network of your own family taking several) a tuple, list or dict of such tensors,
        as :meth:`MAML.query_losses <learnedopt.meta.MAML.query_losses>` takes them. Under
        ``torch.no_grad`` or ``inference_mode`` (evaluation) its value, without a graph."""
        if self.maml is not None:
            return self.maml(x_s, y_s, x_q, y_q)
        if self.rule is not None:
            x_s, y_s, x_q, y_q = check_episode(x_s, y_s, x_q, y_q, "meta-lstm")
            if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
                return self._unroll(x_s, y_s, x_q, y_q, self.spec.inner_steps, self.rule).losses[-1].mean()
            # the unroll differentiates the support losses (the unroll refused no_grad and
            # inference_mode, where MAML's meta-loss and every adaptation run): outside them, detached
            with torch.inference_mode(False), torch.enable_grad():
                episode = outside_inference((x_s, y_s, x_q, y_q))
                return self._unroll(*episode, self.spec.inner_steps, self.rule).losses[-1].mean().detach()
        raise ValueError(f"--algo {self.spec.algo} has no differentiable meta-loss")

    def _unroll(
        self, x_s: Inputs, y_s: Inputs, x_q: Inputs | None, y_q: Inputs | None, steps: int, rule: UpdateRule
    ) -> UnrollResult:
        """The meta-lstm inner loop on B tasks: ``steps`` rule updates on the support sets from
        the model's parameters that require grad (shared by the tasks, so the meta-gradient
        reaches them; a frozen layer keeps its values, as in MAML); the last entry of ``losses``
        is the query loss at the adapted parameters (the support loss when no query set is given)."""
        batch = _SupportQueryBatch(self.model, self.loss_fn, x_s, y_s, x_q, y_q, steps, self._vectorize)
        params = {
            k: p.unsqueeze(0).expand(len(batch), *p.shape) for k, p in self.model.named_parameters() if p.requires_grad
        }
        if not params:  # as MAML and Reptile say it (init_rule_state's "params is empty" named no setting)
            raise ValueError("meta-lstm: no parameter of the model requires grad, so an inner step has nothing to adapt")
        # the parameters' dtype, not the inputs': token ids made int64 states (refused by the Triton path)
        try:
            return unroll(rule, batch, params, init_rule_state(rule, params), steps, stop_optimizee_grad=True)
        finally:
            self._vectorize = batch.vectorize  # False once the model failed under vmap: the loop from now on

    def adapt(self, x_support: Inputs, y_support: Inputs, steps: int | None = None) -> Params:
        """Adapted parameters (detached) for ONE task, ``x_support`` ``(N, ...)`` (or a tuple, list
        or dict of such tensors, as :meth:`meta_loss`), after ``steps`` (default
        ``test_inner_steps``) of the algorithm's inner loop; at ``steps=0`` the initialisation."""
        self._check_examples("x_support", x_support)
        steps = self.spec.test_inner_steps if steps is None else steps
        if self.maml is not None:
            return self.maml.adapt(x_support, y_support, steps=steps)
        if self.rule is not None:
            check_steps(steps)
            x_support, y_support = check_task(x_support, y_support, "meta-lstm", need_examples=steps > 0)
            if not steps:  # the initialisation, as MAML's and Reptile's (the unroll takes at least one step)
                return {k: p.detach().clone() for k, p in self.model.named_parameters() if p.requires_grad}
            # the unroll differentiates the support losses: outside no_grad and inference_mode
            with torch.inference_mode(False), torch.enable_grad():
                x_support, y_support = outside_inference((x_support, y_support))
                one_task = pytree.tree_map(lambda t: t[None], (x_support, y_support))  # a tuple or dict of inputs too
                result = self._unroll(*one_task, None, None, steps, self.rule)
            return {k: v[0].detach() for k, v in result.params.items()}
        worker = self.reptile.adapt([(x_support, y_support)], steps=steps)
        return {k: v.detach().clone() for k, v in worker.named_parameters()}

    def predict(self, params: Mapping[str, Tensor], x: Inputs) -> Any:
        """The model's outputs at ``params`` for ``x`` ``(N, ...)`` (normalised with x's own
        batch statistics)."""
        # judged against the params the model runs at (adapted ones converted to float64, or
        # moved, run as such), not the model's own weights
        given = next((v for v in params.values() if isinstance(v, Tensor) and v.is_floating_point()), None)
        self._check_examples("x", x, given)
        return call_model(self.model, params, x)

    def _check_examples(self, name: str, x: Inputs, weight: Tensor | None = None) -> None:
        """Refuse inputs the model would fail on with a shape or dtype error from deep inside it
        (e.g. 105x105 Omniglot images for a learner meta-trained at 28x28), or of another dtype or
        device than ``weight`` (default: the model's first parameter)."""
        shape = self.spec.example_shape()
        if shape is None:  # your own family's network takes what it takes
            return
        if not isinstance(x, Tensor):  # a tuple or dict: "'tuple' object has no attribute 'shape'"
            raise TypeError(f"{name} is a {type(x).__name__}; this learner's model takes one (N, {', '.join(map(str, shape))}) tensor")
        if tuple(x.shape[1:]) != shape:
            hint = ""
            if self.spec.architecture["kind"] == "conv4":
                size = shape[-1]
                hint = (f" (meta-trained with --image-size {size}: load the images at that size, e.g."
                        f" load_omniglot(image_size={size}) or load_runs(..., image_size={size}))")
            raise ValueError(f"{name} has examples of shape {tuple(x.shape[1:])}; this learner's model takes {shape}, "
                             f"as (N, {', '.join(map(str, shape))}){hint}")
        if not x.is_floating_point():
            hint = " (images as floats in [0, 1], e.g. uint8 pixels / 255)" if self.spec.architecture["kind"] == "conv4" else ""
            raise TypeError(f"{name} is {x.dtype}; the model takes floating-point inputs{hint}")
        # other than the weights': "mat1 and mat2 must have the same dtype, but got Double and
        # Float" (or a device mismatch) from deep inside the model, naming neither
        if weight is None:
            weight = next(self.model.parameters(), None)
        if weight is None:
            return
        if x.device != weight.device:
            raise ValueError(f"{name} is on {x.device}; this learner's model is on {weight.device}: move the inputs "
                             f"(x.to({str(weight.device)!r})) or the learner (learner.to(...))")  # fmt: skip
        if x.dtype != weight.dtype and not autocast_enabled(x.device.type):  # meta: no autocast, no error
            raise TypeError(f"{name} is {x.dtype}; this learner's model is {weight.dtype}: convert the inputs "
                            f"(x.to({weight.dtype}))")  # fmt: skip

    def evaluate(self, x_s: Inputs, y_s: Inputs, x_q: Inputs, y_q: Inputs, steps: int | None = None) -> dict[str, float]:
        """Mean query loss (and accuracy in %, for classification: targets of class indices, or of
        class probabilities of the outputs' shape scored by their most probable class) over B
        tasks after adapting each on its support set. Inputs ``(B, N, ...)``, as :meth:`meta_loss` takes them, checked
        as it checks them before any task is adapted."""
        episode = check_episode(x_s, y_s, x_q, y_q, "evaluate")
        losses, correct = [], []
        for b in range(len(pytree.tree_leaves(episode[0])[0])):  # a tuple or dict of inputs: task b of each tensor
            x_s, y_s, x_q, y_q = pytree.tree_map(lambda t: t[b], episode)  # noqa: B023 - used at once
            params = self.adapt(x_s, y_s, steps)
            with torch.no_grad():
                outputs = self.predict(params, x_q)
                losses.append(float(self.loss_fn(outputs, y_q)))
                if self.spec.loss == "cross_entropy":
                    # class probabilities of the outputs' shape (which cross-entropy takes) by their
                    # labels: compared as they were, (N,) against (N, C), they broadcast to nonsense
                    probabilities = y_q.is_floating_point() and y_q.shape == outputs.shape
                    labels = y_q.argmax(1) if probabilities else y_q
                    correct.append(float((outputs.argmax(1) == labels).float().mean()))
        metrics = {"loss": sum(losses) / len(losses)}
        if correct:
            metrics["accuracy"] = 100.0 * sum(correct) / len(correct)
        return metrics


class _SupportQueryBatch(TaskBatch):
    """B few-shot tasks as a :class:`TaskBatch` for :func:`unroll`: the loss of step index
    ``t < steps`` is each task's support loss, of step ``steps`` its query loss (one ``vmap`` of
    ``functional_call`` over the tasks, or a loop over them for a model that cannot run under
    ``vmap``, as ``MAML``'s: :func:`~learnedopt.meta.over_tasks.vmap_or_loop`). A parameter the
    loss does not use (a head kept for another use) gets a zero gradient, as in ``MAML``."""

    unused_params_get_zero_grad = True

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], x_s: Inputs, y_s: Inputs,
                 x_q: Inputs | None, y_q: Inputs | None, steps: int, vectorize: bool | str = "auto") -> None:  # fmt: skip
        # TaskBatch's per-task objects are not needed: the loss below is batched
        self.model, self.loss_fn, self.steps = model, loss_fn, steps
        self.vectorize = vectorize  # "auto": vmap, or the loop for a model that cannot run under it
        self.support = (x_s, y_s)
        self.query = (x_s, y_s) if x_q is None else (x_q, y_q)

    def __len__(self) -> int:
        return len(pytree.tree_leaves(self.support[0])[0])  # a tuple or dict of inputs too

    def loss(self, params: Mapping[str, Tensor], step_index: int) -> Tensor:
        x, y = self.support if step_index < self.steps else self.query
        inputs = (dict(params), x, y)

        def one(p: Params, xb: Inputs, yb: Inputs) -> Tensor:
            # one element read as a scalar, anything else refused naming loss_fn, as in MAML
            return scalar_loss(self.loss_fn(call_model(self.model, p, xb), yb))

        def looped() -> Tensor:
            # each task's own copy of its parameters (a view of the unroll's): a layer changing its
            # weight in place (an embedding's max_norm) then changes the copy, which the gradient
            # passes through, not a view of the shared tensors (refused, or cut from the graph)
            return torch.stack([
                one({k: v[b].clone() for k, v in params.items()}, *pytree.tree_map(lambda t: t[b], (x, y)))
                for b in range(len(self))
            ])  # fmt: skip

        def vmapped() -> Tensor:
            # first order: the unroll detaches the gradients the rule reads
            return vmap_tasks(self.model, one, inputs, second_order=False)

        losses, vmapped_now = vmap_or_loop(self.model, vmapped, looped, self.vectorize, "meta-lstm")
        if not vmapped_now:  # the model does not run under vmap: loop from now on, as MAML does
            self.vectorize = False
        return losses


# ----------------------------------------------------------------------------- the model file
_NOT_JSON = object()


def save_learner(learner: FewShotLearner, path: str | os.PathLike[str], extra: Mapping[str, Any] | None = None) -> None:
    """Write ``learner`` to a safetensors file with its :class:`LearnerSpec` (plus ``extra``)
    as the JSON header; atomic (temporary file, then ``os.replace``).

    Each tensor is stored in its own dtype, exactly: a float64 network of your own stays
    float64, and integer and bool buffers (BatchNorm's ``num_batches_tracked``) keep their
    values (files of versions that stored every tensor as float32 still load, each tensor cast
    to the dtype of the network it is loaded into). A complex tensor of a dtype safetensors does
    not store (any but ``torch.complex64``) is refused with ValueError, before anything is written,
    and so is an ``extra`` holding a spec field of another value than the learner's (its
    ``format`` and ``library_version`` are replaced by the writer's)."""
    check_path_type(path, "save_learner", "a few-shot model file's path")
    file_format = MODEL_FORMAT if learner.spec.head_only else 1  # the oldest that describes it
    spec = learner.spec.to_dict()
    # extra was merged over the spec: another learner's header (kept for its metadata) wrote its
    # algorithm and test-time steps over this one's, and the file adapted otherwise
    def as_json(value: Any) -> Any:
        try:
            return json.loads(json.dumps(value))
        except (TypeError, ValueError):  # not JSON: not the spec's value (json's own error follows it in writing)
            return _NOT_JSON

    for key, value in (extra or {}).items():
        if key in spec and as_json(value) != as_json(spec[key]):
            raise ValueError(f"save_learner: extra's {key!r} ({value!r}) differs from the learner's ({spec[key]!r}); "
                             "the header's spec fields describe the learner saved")  # fmt: skip
    # the format and version are the writer's (a loaded header's older ones are kept no longer);
    # the spec first and extra's other keys after it, in the order of files written before
    header = {"format": file_format, **spec, "library_version": __version__}
    header.update({k: v for k, v in (extra or {}).items() if k not in header})
    # in its own dtype (float32 for every tensor rounded an int64 count above 2**24, and a float64
    # network's weights); a layer used under two names has the same tensors twice, which
    # save_with_header writes from a copy (safetensors refuses tensors that share memory)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in learner.tensors().items()}
    # safetensors stores complex64 but no other complex dtype: its own bare KeyError (torch.complex128)
    unstorable = [k for k, v in tensors.items() if v.is_complex() and v.dtype != torch.complex64]
    if unstorable:
        first = tensors[unstorable[0]]
        more = f", and {len(unstorable) - 1} more" if len(unstorable) > 1 else ""
        raise ValueError(
            f"save_learner does not support {first.dtype} tensors, which safetensors cannot store (got {unstorable[0]}, "
            f"a {first.dtype} tensor of shape {tuple(first.shape)}{more}); use torch.complex64, or hold "
            "torch.view_as_real(param) as a real parameter instead"
        )
    save_with_header(path, MODEL_HEADER_KEY, header, tensors)


def check_ensemble(paths: Sequence[str | os.PathLike[str]], learners: Sequence[FewShotLearner]) -> None:
    """Raise ValueError where two of ``learners``, loaded from ``paths``, are one model (the same
    spec and every tensor equal: one file given twice, or a copy): an ensemble averages its
    models' predictions, so it would weigh that one double (as ``average_weights`` refuses)."""
    for i, learner in enumerate(learners):
        for j in range(i):
            other = learners[j]
            mine, theirs = learner.tensors(), other.tensors()
            if learner.spec.to_dict() == other.spec.to_dict() and mine.keys() == theirs.keys() and all(
                mine[k].dtype == theirs[k].dtype and mine[k].shape == theirs[k].shape and torch.equal(mine[k], theirs[k])
                for k in mine
            ):
                raise ValueError(f"{paths[i]} holds the same model as {paths[j]}: given twice, it would weigh double in the ensemble")


def _adopt_stored_dtypes(learner: FewShotLearner, tensors: Mapping[str, Tensor]) -> None:
    """Convert each of ``learner``'s modules (model, learned step sizes, rule) that was built in
    the default dtype to the one floating dtype its stored tensors hold, as :func:`load_weights`
    keeps a file's dtype: a float64 learner loaded as float32 (rounded), and a float32 file under
    a float64 default dtype as float64, predicting otherwise than the saved learner. A module built
    in a dtype of its own (your family's float64 network) keeps it, and takes older files' float32
    tensors cast to it."""
    default = torch.get_default_dtype()
    modules = {"model.": learner.model, "inner_lr.": learner.maml.inner_lrs if learner.maml is not None else None,
               "rule.": learner.rule}  # fmt: skip
    for prefix, module in modules.items():
        if module is None:
            continue
        stored = {v.dtype for k, v in tensors.items() if k.startswith(prefix) and v.is_floating_point()}
        built = {v.dtype for v in module.state_dict().values() if v.is_floating_point()}
        if len(stored) == 1 and built == {default} and stored != built:
            module.to(stored.pop())


def load_learner(
    path: str | os.PathLike[str], *, data: str | os.PathLike[str] | None = None
) -> tuple[FewShotLearner, dict[str, Any]]:
    """Rebuild the learner of a ``model.safetensors`` file (no unpickling).

    A learner of your own few-shot family (``module:attribute``) gets its network from the
    family's ``model()``: the family is built as the run built its meta-training tasks, with the
    run's ``shots=``, ``queries=`` and ``data=`` (those it was given), ``data`` here replacing
    the run's folder (moved, or on another machine).

    Returns:
        ``(learner, header)``: the learner on the CPU whatever the default device (move it with
        :meth:`FewShotLearner.to`), in the file's dtype whatever the default dtype.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a learnedopt few-shot model file, a format other than 1 and 2 (2: a
            ``head_only`` learner's), tensors that do not fit its header, or (a learner of your
            own family) a family that does not import or build.
        TypeError: ``path`` is neither a ``str`` nor an ``os.PathLike`` (bytes too).
    """
    check_path_type(path, "load_learner", "a few-shot model file's path")
    path = Path(path)
    header, tensors = open_with_header(
        path, MODEL_HEADER_KEY, "few-shot model file", "no learnedopt few-shot model header"
    )
    if header.get("format") not in READABLE_FORMATS:
        raise ValueError(
            f"{path}: unsupported model format {header.get('format')!r} (this library reads "
            f"{' and '.join(map(str, READABLE_FORMATS))})"
        )
    fields = {f.name for f in dataclasses.fields(LearnerSpec)}
    family = None
    architecture = header.get("architecture")
    if isinstance(architecture, dict) and architecture.get("kind") == OWN_KIND:
        run = header.get("meta_train_config")
        run = run if isinstance(run, dict) else {}  # a file written by save_learner alone has none
        try:
            family = import_fewshot_family(
                str(architecture.get("family")),
                shots=run.get("train_shots") or run.get("shots"),
                queries=run.get("queries"),
                data=str(data) if data is not None else run.get("data"),
            )
        except ValueError as err:
            raise ValueError(f"{path}: the learner's network is built by your own few-shot family: {err}") from None

    def build(device: str | None) -> FewShotLearner:
        try:
            # on the CPU whatever the default device, as load_weights (under torch.device("meta")
            # the learner was built there, and the file's values dropped without a word)
            with torch.device(device or "cpu"):
                spec = LearnerSpec(**{k: v for k, v in header.items() if k in fields})
                return FewShotLearner(spec, family=family, rule=checked_rule)
        except (TypeError, KeyError, ValueError, AttributeError) as err:
            raise ValueError(
                f"{path}: the few-shot model header does not describe a learner ({type(err).__name__}: {err})"
            ) from None

    # the rule's shapes first, without building it (a header stating 10**9 layers took hours
    # to build even on the meta device), then the learner's on the meta device (no memory): a
    # header stating a rule of hidden size 100000 over small tensors made the learner allocate
    # 160 GB (a raw allocator error) before they were compared
    rule = header.get("rule")
    checked_rule = None  # the rule where the check had to build it: the learner's, not built again
    if isinstance(rule, dict) and rule.get("kind") in RULES and isinstance(rule.get("config"), dict):
        found = {k.removeprefix("rule."): tuple(v.shape) for k, v in tensors.items() if k.startswith("rule.")}
        try:
            checked_rule = check_rule_shapes(rule["kind"], rule["config"], found)
        except ValueError as err:
            raise ValueError(f"{path}: its update rule: {err}") from None
        if checked_rule is not None:  # built on the CPU in float32: where the learner's own build puts it
            checked_rule.to(dtype=torch.get_default_dtype())
    try:
        probe = build("meta")
    except ValueError:
        raise
    except Exception:  # noqa: BLE001 - a network of your own that cannot be built there: compared once built
        probe = None
    try:
        if probe is not None:
            probe.load_tensors(tensors)  # the comparison; meta tensors take no values
        learner = build(None)
        _adopt_stored_dtypes(learner, tensors)
        learner.load_tensors(tensors)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return learner, header
