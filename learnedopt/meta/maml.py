"""MAML (Finn et al. 2017), first-order MAML, Meta-SGD, MAML++'s multi-step loss and ANIL's
head-only adaptation, on ``torch.func``.

The model's parameters are the learned initialisation. For a meta-batch of tasks, each task
adapts a copy of them with a few gradient steps on its support set, and the meta-loss is the
query loss at the adapted parameters. The tasks of a meta-batch run under ``torch.func.vmap``
(one batched computation for all tasks) where the model allows it, else in a loop.

BatchNorm is transductive by default, as in the original MAML code (:mod:`.batchnorm`: every
forward pass normalises with the statistics of its own batch; numbers reported with this class
use that setting); ``batchnorm="running"`` is the inductive alternative, ``"error"`` refuses
models with BatchNorm.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.func import grad
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from ..values import check_bool, check_positive_integer, is_integer, is_number
from .autograd_fixes import twice_differentiable
from .batchnorm import BatchStatNorm, RunningStatNorm, apply_batchnorm_policy_, is_library_layer, replace_batchnorm_
from .model_calls import (
    Inputs,
    LossFn,
    call_model,
    check_episode,
    check_initialised,
    check_inputs,
    check_steps,
    check_task,
    default_loss,
    model_arguments,
    outside_inference,
    scalar_loss,
)
from .over_tasks import vmap_or_loop, vmap_tasks

__all__ = [
    "MAML",
    "BatchStatNorm",
    "RunningStatNorm",
    "apply_batchnorm_policy_",
    "default_loss",
    "multi_step_loss_weights",
    "replace_batchnorm_",
]

Params = dict[str, Tensor]


class MAML(nn.Module):
    """A learned initialisation (the wrapped model's parameters) trained by MAML.

    Args:
        model: the network; its parameters are the meta-learned initialisation.
        inner_lr: step size of the inner gradient steps (the initial value when learned): a
            number, or a one-element tensor, which gets a meta-gradient where it requires grad.
        inner_steps: inner gradient steps during meta-training. The defaults (0.01, 1 step) are
            Finn et al. (2017)'s sinusoid regression's; their Omniglot runs took 0.4 with 1 step
            (5-way) and 0.1 with 5 steps (20-way); ``learnedopt meta-train`` sets its own per task.
        first_order: drop the second-order terms (first-order MAML): the meta-gradient is the
            query-loss gradient at the adapted parameters.
        learn_inner_lr: Meta-SGD (Li et al. 2017): a learned step size for every parameter
            element (real, for a complex parameter too), trained with the initialisation; made
            in the model's dtype and on its device, so convert or move this module, not the
            model alone (refused with a ValueError).
        step_loss_weights: MAML++ (Antoniou et al. 2019) multi-step loss: weight of the query loss
            after each inner step, length ``inner_steps``, finite and ``>= 0``. Default: only the
            last step counts.
            An attribute, so it can change between meta-steps: :func:`multi_step_loss_weights`
            gives MAML++'s annealed weights.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (a tensor of one element); default
            cross-entropy (:func:`default_loss`).
        vectorize: ``True`` runs the tasks under ``vmap``; ``False`` loops over them; ``"auto"``
            uses ``vmap`` where it pays (not for convolutional models on CPU) and falls back to the
            loop (with a warning) if the model cannot be vmapped: at once, naming the layer, for a
            layer known not to run under ``vmap`` (a norm layer updating running statistics, an
            embedding with ``max_norm``: :func:`~learnedopt.meta.over_tasks.unbatchable_layers`),
            which ``True`` refuses in one line (:func:`~learnedopt.meta.over_tasks.vmap_or_loop`).
        batchnorm: ``"transductive"`` (see the module docstring), ``"running"`` (each example
            normalised with the layer's running statistics, kept as they are: a pretrained
            network's) or ``"error"``.
        checkpoint_steps: gradient checkpointing of the inner loop (second-order MAML): keep only
            each inner step's input parameters and recompute the step's support-loss graph
            during the meta-backward, so a meta-step's memory no longer grows with the
            activations of every inner step (``benchmarks/results/maml_memory.md``), for about
            one more support forward and backward per step. Runs the tasks in a loop; the
            meta-gradient is unchanged (tested; also to the support inputs, and with dropout: the
            random state is replayed), but it cannot be differentiated twice, and a loss that
            reaches a tensor requiring grad outside the model's parameters and the support set
            (e.g. one ``loss_fn`` holds) is refused with an error, since its gradient would be lost.
        zero_init: parameters (by name, or every parameter of a named module) that start every
            task at zero instead of at a learned value, e.g. the output layer: Kao et al. 2022's
            "zeroing trick". A classifier's initial head then holds no label order (the labels of
            an episode are an arbitrary permutation), and (with cross-entropy, balanced classes)
            its first inner step sets class c's row to ``inner_lr / N`` times c's mean support
            feature less the mean over all classes, like a prototype. These parameters are set
            to zero in the model and receive no meta-gradient. A parameter tied to another
            layer's (one ``nn.Parameter`` under two names) must be named under both or neither; a
            layer reparametrized by ``weight_norm``, ``spectral_norm`` or
            ``torch.nn.utils.parametrize`` is refused (its weight need not be zero at zero inputs).
        adapt_only: the parameters (by name, or every parameter of a named module) that the inner
            loop adapts; the model's other trainable parameters are meta-learned as well but
            held at their meta-learned values while a task adapts. ANIL (Raghu et al. 2020,
            "almost no inner loop"): ``adapt_only=("head",)`` adapts the output layer alone on
            each task, over a body that is only meta-learned. Default: every trainable parameter
            adapts. ``zero_init`` and the learned step sizes of ``learn_inner_lr`` cover adapted
            parameters only. In an ``nn.Sequential`` model, leading layers that hold no adapted
            parameter run once per task, not at every inner step, where they are ``torch.nn``'s
            own (or the batch-norm replacements), without dropout, ``nn.RReLU`` or buffers, and
            the steps are not checkpointed (same meta-gradient).

    Usage::

        maml = MAML(model, inner_lr=0.4, inner_steps=1)
        meta_opt = torch.optim.Adam(maml.parameters(), lr=1e-3)
        for x_s, y_s, x_q, y_q in episodes:          # each (B, N, ...) for B tasks
            meta_opt.zero_grad()
            maml(x_s, y_s, x_q, y_q).backward()
            meta_opt.step()

    A model with several inputs takes each input as a tuple or list (its positional arguments)
    or dict (its keyword arguments) of ``(B, N, ...)`` tensors, e.g.
    ``maml({"input_ids": ids_s, "attention_mask": mask_s}, y_s, {...}, y_q)``
    (:meth:`query_losses`).
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        *,
        first_order: bool = False,
        learn_inner_lr: bool = False,
        step_loss_weights: Sequence[float] | None = None,
        loss_fn: LossFn | None = None,
        vectorize: bool | str = "auto",
        batchnorm: str = "transductive",
        checkpoint_steps: bool = False,
        zero_init: Sequence[str] = (),
        adapt_only: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        # a string was math.isfinite's "must be real number, not str"; NaN fails every comparison; a
        # one-element tensor (maybe learnable) is read detached: PyTorch warns when one requiring grad is
        real_scalar = isinstance(inner_lr, Tensor) and inner_lr.numel() == 1 and not (inner_lr.is_complex() or inner_lr.dtype == torch.bool)
        value = inner_lr.detach().item() if real_scalar else inner_lr
        if not (is_number(value) and math.isfinite(value) and value >= 0):
            raise ValueError(f"inner_lr must be >= 0 and finite, got {inner_lr!r}")
        check_positive_integer("inner_steps", inner_steps)
        for name, switch in (("first_order", first_order), ("learn_inner_lr", learn_inner_lr), ("checkpoint_steps", checkpoint_steps)):
            check_bool(name, switch)
        if vectorize not in (True, False, "auto"):
            raise ValueError(f"vectorize must be True, False or 'auto', got {vectorize!r}")
        if checkpoint_steps and vectorize is True:
            raise ValueError("checkpoint_steps=True runs the tasks in a loop; use vectorize=False or 'auto'")
        self.model = model
        self.inner_steps = inner_steps
        self.first_order = first_order
        self.loss_fn: LossFn = loss_fn or default_loss
        self.vectorize = vectorize
        self.checkpoint_steps = checkpoint_steps
        self.step_loss_weights = None if step_loss_weights is None else list(step_loss_weights)
        self._check_weights(inner_steps)
        tied = _tied_names(model)
        trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        # frozen parameters of the named modules too: one unfrozen later adapts, as without adapt_only
        named = [name for name, _ in model.named_parameters()]
        self._adapt_only = None if adapt_only is None else _names_under(named, adapt_only, tied, "adapt_only")
        self._zero_init = _names_under(trainable, zero_init, tied)
        fixed_zero = sorted(self._zero_init - self._adapted_set(trainable))
        if fixed_zero:
            # zero at every task's start, not meta-learned and not adapted: it would stay zero for good
            raise ValueError(f"zero_init names parameters that adapt_only does not adapt: {', '.join(fixed_zero)}")
        reparametrized = _reparametrized(model)
        refused = sorted(self._zero_init & reparametrized.keys())
        if refused:  # before anything is zeroed: a refused model stays as it was
            raise ValueError(
                f"zero_init: {refused[0]!r} is an input of the reparametrized {reparametrized[refused[0]]!r} (weight_norm, "
                "spectral_norm or torch.nn.utils.parametrize), which zero inputs need not make zero (weight_norm's "
                "and spectral_norm's are NaN): leave that layer out of zero_init, or remove its reparametrization"
            )
        # once every argument is checked, and before anything is zeroed: a refused MAML leaves the
        # model's BatchNorm layers (and their running statistics) as they were
        apply_batchnorm_policy_(model, batchnorm)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in self._zero_init:
                    p.zero_()
        # ParameterDict keys cannot contain dots; a complex parameter's step sizes are real (a complex
        # one, meta-learned, rotated the gradient: no longer a step along it)
        self.inner_lrs = nn.ParameterDict(
            {n.replace(".", "/"): nn.Parameter(torch.full_like(p.real, value)) for n, p in model.named_parameters() if n in self._names()}
        ) if learn_inner_lr else None
        self.inner_lr = inner_lr

    def _check_weights(self, steps: int) -> None:
        weights = self.step_loss_weights
        if weights is None:
            return
        if len(weights) != steps:
            raise ValueError(f"step_loss_weights needs {steps} entries, got {len(weights)}")
        # a NaN made the meta-loss NaN; a negative weight rewarded a high query loss
        bad = [i for i, w in enumerate(weights) if not (math.isfinite(float(w)) and float(w) >= 0)]
        if bad:
            raise ValueError(f"step_loss_weights must be finite and >= 0, got {weights[bad[0]]} at index {bad[0]}")

    # ------------------------------------------------------------------ functional pieces
    def _adapted_set(self, names: Sequence[str]) -> frozenset[str]:
        """Those of ``names`` that ``adapt_only`` lets adapt."""
        return frozenset(names) if self._adapt_only is None else self._adapt_only & frozenset(names)

    def _names(self) -> list[str]:
        """The model's parameters that adapt: those of ``adapt_only`` that require grad now (a
        layer frozen or unfrozen after construction counts as it is now)."""
        adapted = self._adapted_set([name for name, p in self.model.named_parameters() if p.requires_grad])
        return [name for name, _ in self.model.named_parameters() if name in adapted]

    def initial_params(self) -> Params:
        """The learned initialisation of the adapted parameters, as a dict (fresh zeros for those
        of ``zero_init``, so that no meta-gradient reaches them). The model's other parameters
        enter every forward as the model holds them."""
        names = set(self._names())
        return {
            n: torch.zeros_like(p, requires_grad=True) if n in self._zero_init else p
            for n, p in self.model.named_parameters()
            if n in names
        }

    def _fixed_params(self) -> Params:
        """The trainable parameters that ``adapt_only`` holds fixed in the inner loop."""
        adapted = set(self._names())
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad and n not in adapted}

    def _adaptable_params(self) -> Params:
        """:meth:`initial_params`; raises ValueError when there is none to adapt, one is a lazy
        module's, not yet initialised, or its learned step sizes are of another dtype or device,
        and RuntimeError inside ``parametrize.cached()``."""
        if parametrize._cache_enabled and any(parametrize.is_parametrized(m) for m in self.model.modules()):
            # the cache keeps the weight computed from the first parameters functional_call gives it:
            # every later inner step and task ran with it (meta-loss and meta-gradient silently wrong)
            raise RuntimeError(
                "MAML cannot run inside torch.nn.utils.parametrize.cached(): the cache would keep a parametrized "
                "weight of the first parameters it sees for every inner step and task; call MAML outside it"
            )
        params = self.initial_params()
        if not params:
            what = "no parameter of adapt_only" if self._adapt_only is not None else "no parameter of the model"
            raise ValueError(f"MAML: {what} requires grad, so an inner step has nothing to adapt")
        # the lazy module's hook, run on the tensors functional_call swaps in, failed under vmap with
        # "in_features inferred from input: 3 is not equal to in_features from self.weight: 0"
        check_initialised(params, "MAML")
        for name, p in params.items() if self.inner_lrs is not None else ():
            rate = self._lr(name)
            if (rate.dtype, rate.device) != (p.real.dtype, p.device):
                # the step promoted a bfloat16 parameter to float32 ("mat1 and mat2 must have the same
                # dtype" in the next forward), or ran a float64 one with float32 step sizes, silently
                raise ValueError(
                    f"learn_inner_lr: parameter {name!r} is {p.dtype} on {p.device}, its learned step sizes {rate.dtype} "
                    f"on {rate.device}, as the model was when MAML was built: convert or move the MAML module "
                    "(maml.to(...)), which holds both, not only its model"
                )
        return params

    def _model_buffers(self) -> Params:
        return dict(self.model.named_buffers())

    def _loss(
        self, params: Params, x: Inputs, y: Inputs, buffers: Params | None = None, model: nn.Module | None = None
    ) -> Tensor:
        """The loss at ``params``, with the model's own buffers unless ``buffers`` are given; of
        ``model``, a trailing part of the model (:meth:`_fixed_body`'s head), where given."""
        model = self.model if model is None else model
        buffers = dict(model.named_buffers()) if buffers is None else buffers
        return scalar_loss(self.loss_fn(call_model(model, {**params, **buffers}, x), y))

    def _fixed_body(self) -> tuple[nn.Module, nn.Module] | None:
        """``(body, head)`` where the inner loop can run on the body's outputs, computed once per
        task: an ``nn.Sequential`` model whose first modules hold no adapted parameter (``adapt_only``,
        as ANIL's head) and compute the same outputs at every call (``torch.nn``'s layers and
        the batch-norm replacements; no dropout, no ``nn.RReLU``, no buffer but the running
        statistics that ``RunningStatNorm`` keeps as they are). Else None: every
        inner step runs the whole model. The body's outputs carry its meta-gradient as its
        repeated calls would, so the result is the same to rounding (tested); the inner loop
        saves a forward and backward of the body per step."""
        if self._adapt_only is None or not isinstance(self.model, nn.Sequential):
            return None
        adapted = set(self._names())
        first = next(
            (i for i, (name, m) in enumerate(self.model.named_children()) if any(f"{name}.{n}" in adapted for n, _ in m.named_parameters())),
            0,
        )
        body = self.model[:first]
        for m in body.modules():
            # dropout and RReLU draw at every call in training: each inner step must see its own draw
            if not is_library_layer(m) or isinstance(m, (nn.modules.dropout._DropoutNd, nn.RReLU)) or (
                not isinstance(m, RunningStatNorm) and any(True for _ in m.buffers(recurse=False))
            ):
                return None
        return (body, self.model[first:]) if first else None

    def step_sizes(self) -> dict[str, Tensor | float]:
        """The inner step size of each parameter the inner loop adapts, by its name in the model
        (as ``model.named_parameters()`` gives it): with ``learn_inner_lr``, the learned tensor of
        the parameter's shape (the one ``inner_lrs`` holds under the name with ``/`` for ``.``,
        since ``nn.ParameterDict`` keys cannot hold dots), else ``inner_lr`` (a tensor one as a
        0-dim view of it).

        Raises:
            ValueError: a parameter adapts that had no step size made when MAML was built.
        """
        return {name: self._lr(name) for name in self._names()}

    def _lr(self, name: str) -> Tensor | float:
        if self.inner_lrs is None:
            # a one-element tensor as a 0-dim view of it: a (1, 1) one made a bias's step (1, d)
            return self.inner_lr.reshape(()) if isinstance(self.inner_lr, Tensor) else self.inner_lr
        key = name.replace(".", "/")
        if key not in self.inner_lrs:
            raise ValueError(
                f"learn_inner_lr: parameter {name!r} requires grad but had none when MAML was built, so it "
                "has no learned step size; set requires_grad before building MAML"
            )
        return self.inner_lrs[key]

    def _support_grads(
        self, params: Params, x_s: Inputs, y_s: Inputs, create_graph: bool, model: nn.Module | None = None
    ) -> Params:
        """The support loss's gradient at ``params`` (zeros for parameters it does not use).

        Under ``torch.no_grad`` or ``inference_mode`` (evaluation) the step's own gradient is
        still taken, on detached copies: the result then carries no graph."""
        if _builds_graph():
            values = torch.autograd.grad(
                self._loss(params, x_s, y_s, model=model), list(params.values()), create_graph=create_graph, allow_unused=True
            )
        else:
            with torch.inference_mode(False), torch.enable_grad():
                leaves = {k: v.detach().requires_grad_(True) for k, v in outside_inference(params).items()}
                x_s, y_s = outside_inference((x_s, y_s))
                values = torch.autograd.grad(self._loss(leaves, x_s, y_s, model=model), list(leaves.values()), allow_unused=True)
        return _zero_filled(params, values)

    def _inner_step(self, params: Params, x_s: Inputs, y_s: Inputs, batched: bool, model: nn.Module | None = None) -> Params:
        """One inner gradient step on the support set (of ``model``, a head, where given),
        keeping the graph unless first-order."""
        if batched:
            grads = grad(self._loss)(params, x_s, y_s, None, model)
        else:
            grads = self._support_grads(params, x_s, y_s, create_graph=not self.first_order, model=model)
        if self.first_order:
            grads = {k: g.detach() for k, g in grads.items()}
        return {k: p - self._lr(k) * grads[k] for k, p in params.items()}

    def _checkpointed_step(self, params: Params, x_s: Inputs, y_s: Inputs) -> Params:
        """:meth:`_inner_step` through :class:`_RecomputedStep`: only the step's inputs (the
        parameters, learned step sizes and the support set) are kept for the meta-backward."""
        names = list(params)
        fixed = self._fixed_params()  # inputs of the step, so that their meta-gradient reaches them
        # a tensor inner_lr too (it may be learned): only the step's inputs get a meta-gradient
        lrs = [self._lr(k) for k in names] if self.inner_lrs is not None or isinstance(self.inner_lr, Tensor) else []
        data, layout = pytree.tree_flatten((x_s, y_s))  # the support set's tensors, each an input of the step
        # the buffers as the forward saw them: the rebuild in backward runs the model again on copies
        # of these, so it neither sees nor leaves their later values (a second running-statistics
        # update), nor writes to the model's own buffers, which the rest of the meta-graph may have
        # saved for its backward (a buffer mask or scale multiplied in the forward)
        buffers_at_forward = {k: b.clone() for k, b in self._model_buffers().items()}

        def step(values: Sequence[Tensor], create_graph: bool) -> tuple[Tensor, ...]:
            current = dict(zip(names, values[: len(names)], strict=True))
            rates = values[len(names) : len(names) + len(lrs)] or [self.inner_lr] * len(names)
            held = dict(zip(fixed, values[len(names) + len(lrs) : len(names) + len(lrs) + len(fixed)], strict=True))
            x, y = pytree.tree_unflatten(list(values[len(names) + len(lrs) + len(fixed) :]), layout)
            buffers = {k: b.clone() for k, b in buffers_at_forward.items()} if create_graph else None
            with twice_differentiable(self.model, create_graph):
                loss = self._loss({**current, **held}, x, y, buffers)
            outside = _leaves_outside([loss], values)
            if outside:
                raise RuntimeError(
                    "MAML(checkpoint_steps=True): the support loss uses a tensor that requires grad but is not one "
                    f"of MAML's parameters (shape {tuple(outside[0].shape)}: held by loss_fn, or by a module outside "
                    "the model); its meta-gradient through a checkpointed step would be lost. Use "
                    "checkpoint_steps=False, or make it a parameter of the model."
                )
            grads = _zero_filled(current, torch.autograd.grad(loss, list(current.values()), create_graph=create_graph, allow_unused=True))
            return tuple(p - lr * g for p, lr, g in zip(current.values(), rates, grads.values(), strict=True))

        outputs = _RecomputedStep.apply(step, *params.values(), *lrs, *fixed.values(), *data)
        return dict(zip(names, outputs, strict=True))

    def _adapt_one(
        self,
        params: Params,
        x_s: Inputs,
        y_s: Inputs,
        x_q: Inputs,
        y_q: Inputs,
        steps: int,
        batched: bool,
        every_step: bool = True,
    ) -> tuple[Params, Tensor]:
        """Adapt one task; returns the adapted params and the query loss after each step
        ``(steps,)``, or after the last one only ``(1,)`` unless ``every_step``."""
        query_losses = []
        use_checkpoint = self.checkpoint_steps and not batched and not self.first_order and _builds_graph()
        split = None if use_checkpoint else self._fixed_body()
        head = None
        if split is not None:  # the body's outputs once, then the inner loop on the head alone
            body, head = split
            x_s, x_q = (body(*args, **kwargs) for args, kwargs in map(model_arguments, (x_s, x_q)))
        for t in range(steps):
            if use_checkpoint:
                params = self._checkpointed_step(params, x_s, y_s)
            else:
                params = self._inner_step(params, x_s, y_s, batched, head)
            if every_step or t == steps - 1:
                query_losses.append(self._loss(params, x_q, y_q, model=head))
        return params, torch.stack(query_losses)

    def query_losses(
        self,
        x_support: Inputs,
        y_support: Inputs,
        x_query: Inputs,
        y_query: Inputs,
        steps: int | None = None,
        *,
        every_step: bool = True,
    ) -> Tensor:
        """Query loss of every task after each inner step.

        Args:
            x_support, y_support: ``(B, N_support, ...)``; x_query, y_query: ``(B, N_query, ...)``.
                Each may also be a tuple or list (the model's positional arguments, ``model(*x)``)
                or dict (its keyword arguments, ``model(**x)``) of such tensors, which
                ``loss_fn`` receives as they are for targets; all of one input share ``B`` and
                ``N``, and a set's targets its inputs' ``N`` (checked before anything runs:
                :func:`~learnedopt.meta.model_calls.check_episode`).
            steps: inner steps (default ``inner_steps``; more are fine at test time).
            every_step: False computes only the final query loss (no graph for the others).

        Returns:
            ``(B, steps)`` losses (``(B, 1)`` without ``every_step``), differentiable w.r.t. the
            initialisation (and the learned inner step sizes) unless run under ``torch.no_grad``.
        """
        steps = self.inner_steps if steps is None else steps
        if not is_integer(steps) or steps < 1:
            raise ValueError(f"steps must be >= 1 (the query losses after each inner step), got {steps!r} (an integer)")
        checked = check_episode(x_support, y_support, x_query, y_query, "MAML")
        with twice_differentiable(self.model, not self.first_order and _builds_graph()):
            return self._query_losses(*checked, steps, every_step)

    def _query_losses(
        self, x_support: Inputs, y_support: Inputs, x_query: Inputs, y_query: Inputs, steps: int, every_step: bool
    ) -> Tensor:
        params = self._adaptable_params()
        vectorize = self.vectorize is True or (
            self.vectorize == "auto" and not self.checkpoint_steps and self._vmap_pays(x_support)
        )
        data = (x_support, y_support, x_query, y_query)

        def looped() -> Tensor:
            # a bad input (mismatched shapes) fails here too, with its own message, and leaves vmap on
            return torch.stack([
                self._adapt_one(params, *pytree.tree_map(lambda t: t[b], data), steps, batched=False, every_step=every_step)[1]
                for b in range(len(pytree.tree_leaves(y_support)[0]))  # the B tasks (query_losses checked they agree)
            ])  # fmt: skip

        def vmapped() -> Tensor:
            return self._vmapped(params, *data, steps, every_step)

        losses, vmapped_now = vmap_or_loop(self.model, vmapped, looped, self.vectorize if vectorize else False, "MAML")
        if vectorize and not vmapped_now:  # the model itself does not run under vmap: loop from now on
            self.vectorize = False
        return losses

    def _vmap_pays(self, x: Inputs) -> bool:
        """``vectorize="auto"``: vmap, except convolutional models on CPU, where PyTorch runs the
        per-task weights as a grouped convolution that is slower than a loop (conv-4, 8 tasks of
        5-way 1-shot, second-order: 569 ms against 481 ms per meta-step in
        ``benchmarks/results/fewshot_vs_higher.md``, 549 against 265 on an earlier host,
        ``benchmarks/results/earlier_hosts/fewshot_vs_higher.md``)."""
        has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in self.model.modules())
        return not (has_conv and pytree.tree_leaves(x)[0].device.type == "cpu")

    def _vmapped(
        self, params: Params, xs: Inputs, ys: Inputs, xq: Inputs, yq: Inputs, steps: int, every_step: bool
    ) -> Tensor:
        def one(x_s: Inputs, y_s: Inputs, x_q: Inputs, y_q: Inputs) -> Tensor:
            return self._adapt_one(params, x_s, y_s, x_q, y_q, steps, batched=True, every_step=every_step)[1]

        second_order = not self.first_order and _builds_graph()
        return vmap_tasks(self.model, one, (xs, ys, xq, yq), second_order=second_order)

    def forward(self, x_support: Inputs, y_support: Inputs, x_query: Inputs, y_query: Inputs) -> Tensor:
        """The meta-loss of a meta-batch, a scalar (0-d) tensor: the mean over tasks of the final
        query loss, or of the ``step_loss_weights``-weighted query losses (MAML++). Inputs as
        :meth:`query_losses`: ``x_support, y_support`` ``(B, N_support, ...)``, ``x_query,
        y_query`` ``(B, N_query, ...)`` (or tuples, lists or dicts of such tensors)."""
        self._check_weights(self.inner_steps)
        multi_step = self.step_loss_weights is not None
        losses = self.query_losses(x_support, y_support, x_query, y_query, every_step=multi_step)
        if not multi_step:
            return losses[:, -1].mean()
        weights = losses.new_tensor(self.step_loss_weights)
        return (losses * weights).sum(dim=1).mean()

    def adapt(self, x_support: Inputs, y_support: Inputs, steps: int | None = None) -> Params:
        """Adapted parameters for ONE task (no meta-graph): ``x_support`` ``(N, ...)``, or a
        tuple, list or dict of such tensors, as in :meth:`query_losses`; ``y_support`` ``(N, ...)``.

        Returns the parameters that adapt (name -> tensor of the parameter's shape; under
        ``adapt_only`` those alone, the others staying the model's), for :meth:`predict`; at
        ``steps=0`` the initialisation."""
        steps = self.inner_steps if steps is None else steps
        check_steps(steps)
        x_support, y_support = check_task(x_support, y_support, "MAML", need_examples=steps > 0)
        initial = self._adaptable_params() if steps else self.initial_params()  # steps=0: the initialisation
        params = {k: v.detach() for k, v in initial.items()}
        split = self._fixed_body() if steps else None
        with torch.no_grad():
            if split is not None:
                args, kwargs = model_arguments(x_support)
                x_support = split[0](*args, **kwargs)
            for _ in range(steps):
                grads = self._support_grads(params, x_support, y_support, create_graph=False, model=split and split[1])
                params = {k: p - self._lr(k) * grads[k] for k, p in params.items()}
        return params

    def predict(self, params: Params, x: Inputs) -> Tensor:
        """The model's output at ``params`` (e.g. from :meth:`adapt`) for one task's inputs
        ``x`` ``(N, ...)``, or a tuple, list or dict of them (``model(*x)``, ``model(**x)``)."""
        x = check_inputs(x, "x", 1, "MAML")[0]
        return call_model(self.model, {**params, **self._model_buffers()}, x)


def multi_step_loss_weights(steps: int, progress: float, floor: float = 0.03) -> list[float] | None:
    """MAML++'s annealed multi-step loss (Antoniou et al. 2019, "multi-step loss optimisation"):
    the ``step_loss_weights`` for a point ``progress`` of the annealing period.

    At ``progress`` 0 every inner step's query loss weighs ``1 / steps``; the weights of all but
    the last step then fall linearly, to ``floor / steps`` at most at ``progress`` 1, and the last
    step takes the rest (the weights always sum to 1). From ``progress`` 1 on it returns None:
    only the last step counts, as in MAML. MAML++ anneals over its first 10 of 100 epochs; set
    ``maml.step_loss_weights = multi_step_loss_weights(maml.inner_steps, step / anneal_steps)``
    before each meta-step.

    Args:
        steps: inner steps.
        progress: the fraction of the annealing period done, ``>= 0``.
        floor: the non-final steps' smallest weight, in units of ``1 / steps``.
    """
    # a bool is no number here: True was read as 1 (one step, or the annealing's end)
    if not is_integer(steps) or steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps!r} (an integer)")
    if not (is_number(progress) and math.isfinite(progress) and progress >= 0):
        raise ValueError(f"progress must be a finite number >= 0, got {progress!r}")
    if not (is_number(floor) and 0 <= floor <= 1):
        raise ValueError(f"floor must be in [0, 1], got {floor!r}")
    if progress >= 1:
        return None
    non_final = max((1 - progress) / steps, floor / steps)
    final = min((1 + progress * (steps - 1)) / steps, 1 - (steps - 1) * floor / steps)
    return [non_final] * (steps - 1) + [final]


def _names_under(
    names: Sequence[str], prefixes: Sequence[str], tied: Mapping[str, str] | None = None, option: str = "zero_init"
) -> frozenset[str]:
    """The entries of ``names`` equal to a prefix or inside a module it names; raises ValueError
    for a prefix that matches none, or where the prefixes name a parameter under one of its names
    and not another (``tied``: each further name of a parameter -> its name in ``names``)."""
    if isinstance(prefixes, str):
        prefixes = (prefixes,)
    under = lambda n, prefix: n == prefix or n.startswith(prefix + ".")  # noqa: E731
    found: set[str] = set()
    for prefix in prefixes:
        matches = {n for n in names if under(n, prefix)}
        if not matches and not any(under(alias, prefix) for alias in tied or {}):
            raise ValueError(f"{option}: {prefix!r} names no trainable parameter or module of the model (its parameters: {', '.join(names)})")
        found |= matches
    for alias, name in (tied or {}).items():
        alias_named = any(under(alias, prefix) for prefix in prefixes)
        if alias_named != (name in found):
            # only the first name counts: a layer named under the other one silently stayed learned,
            # and zeroing the first zeroes the layer that shares it, which was not named
            named, other = (alias, name) if alias_named else (name, alias)
            raise ValueError(
                f"{option}: {named!r} is the same parameter as {other!r} (tied weights), which {option} does not "
                f"name: {'zeroing one zeroes both' if option == 'zero_init' else 'adapting one adapts both'}; name both or neither"
            )
    return frozenset(found)


def _reparametrized(model: nn.Module) -> dict[str, str]:
    """Each parameter of ``model`` that is an input of a reparametrized tensor -> that tensor's
    name: ``torch.nn.utils.parametrize``'s (``parametrizations.weight.original``, and the
    parametrizations' own parameters), and the deprecated ``torch.nn.utils.weight_norm``'s
    (``weight_g``, ``weight_v``) and ``spectral_norm``'s (``weight_orig``)."""
    found: dict[str, str] = {}
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        if parametrize.is_parametrized(module):
            for tensor, parametrizations in module.parametrizations.items():
                found.update({f"{dot}parametrizations.{tensor}.{n}": f"{dot}{tensor}" for n, _ in parametrizations.named_parameters()})
        for hook in module._forward_pre_hooks.values():
            inputs = {WeightNorm: ("_g", "_v"), SpectralNorm: ("_orig",)}.get(type(hook), ())
            found.update({f"{dot}{hook.name}{suffix}": f"{dot}{hook.name}" for suffix in inputs})
    return found


def _tied_names(model: nn.Module) -> dict[str, str]:
    """Each further name of a trainable parameter that ``model`` holds under several names (tied
    weights) -> its first name, the one ``named_parameters()`` gives."""
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.requires_grad:
            tied.update({name: first[id(p)]} if id(p) in first else {})
            first.setdefault(id(p), name)
    return tied


class _RecomputedStep(torch.autograd.Function):
    """``outputs = step(inputs)`` that saves only ``inputs`` and rebuilds the step's graph in
    backward (gradient checkpointing by hand). ``torch.utils.checkpoint`` would keep the tensors
    saved by the graph that the step's own ``autograd.grad(create_graph=True)`` builds, which
    are most of a second-order inner step's memory; this keeps none of them.

    ``step(values, create_graph)`` returns a tuple of tensors; the forward calls it without
    building the second-order graph (it only needs values), the backward with it, then takes
    the vector-Jacobian product of the rebuilt step. The random number generators are restored
    for the rebuild, so a model with dropout draws the same masks (as ``torch.utils.checkpoint``
    does). Gradients flow to ``inputs`` only: ``step`` must check that it reaches no other
    tensor that requires grad (:func:`_leaves_outside`), whose gradient would be lost.

    Not thread-safe, as ``torch.utils.checkpoint``: the model's own draws come from torch's
    global generators, so the backward sets them to the forward's states for the rebuild and
    restores them after (``torch.random.fork_rng``), rolling back what another thread draws
    from them meanwhile (and a thread drawing during the rebuild changes its masks).
    """

    @staticmethod
    def forward(ctx, step: Callable[..., tuple[Tensor, ...]], *inputs: Tensor) -> tuple[Tensor, ...]:
        ctx.step = step
        ctx.save_for_backward(*inputs)
        ctx.devices = sorted({t.device for t in inputs if t.device.type == "cuda"}, key=str)
        ctx.rng = torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in ctx.devices]
        ctx.wants = [t.requires_grad for t in inputs]  # the support set only when something upstream learns
        with torch.enable_grad():
            leaves = [_leaf(t, wants) for t, wants in zip(inputs, ctx.wants, strict=True)]
            outputs = step(leaves, False)
        return tuple(o.detach() for o in outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outputs: Tensor) -> tuple[Tensor | None, ...]:
        with torch.random.fork_rng(devices=ctx.devices), torch.enable_grad():
            torch.set_rng_state(ctx.rng[0])
            for device, state in zip(ctx.devices, ctx.rng[1], strict=True):
                torch.cuda.set_rng_state(state, device)
            leaves = [_leaf(t, wants) for t, wants in zip(ctx.saved_tensors, ctx.wants, strict=True)]
            outputs = ctx.step(leaves, True)
            learning = [leaf for leaf in leaves if leaf.requires_grad]
            grads = iter(torch.autograd.grad(outputs, learning, grad_outputs, allow_unused=True))
        return (None, *(next(grads) if leaf.requires_grad else None for leaf in leaves))


def _builds_graph() -> bool:
    """Whether autograd records what runs now: grad mode on and not under ``inference_mode``,
    where ``torch.enable_grad()`` turns grad mode on, yet no tensor made gets a graph (the
    checkpointed inner step then failed in ``autograd.grad``: 'element 0 of tensors does not
    require grad')."""
    return torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def _zero_filled(params: Params, grads: Sequence[Tensor | None]) -> Params:
    """``grads`` by name, zeros for the parameters the loss does not use (``allow_unused``)."""
    return {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(params.items(), grads, strict=True)}


def _leaf(t: Tensor, requires_grad: bool) -> Tensor:
    """A detached copy of ``t``, requiring grad as ``t`` did."""
    return t.detach().requires_grad_(requires_grad)


def _leaves_outside(outputs: Sequence[Tensor], leaves: Sequence[Tensor]) -> list[Tensor]:
    """Tensors requiring grad that ``outputs``' graph reaches, other than ``leaves``."""
    own = {id(t) for t in leaves}
    seen, stack, outside = set(), [o.grad_fn for o in outputs if o.grad_fn is not None], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf that requires grad
        if variable is not None and id(variable) not in own:
            outside.append(variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return outside
