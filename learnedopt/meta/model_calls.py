"""How MAML and Reptile call a model on a task's data and score it: the forms a model's inputs
take (one tensor, or a tuple, list or dict of tensors: its positional or keyword arguments), their
checks, and the default loss."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.func import functional_call

from ..values import is_integer

LossFn = Callable[[Tensor, Tensor], Tensor]
#: a model's inputs (or a loss's targets): one tensor, or a tuple or list (the model's positional
#: arguments) or dict (its keyword arguments) of tensors, also nested, with the same leading dims
Inputs = Tensor | Sequence[Any] | Mapping[str, Any]


def model_arguments(inputs: Inputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The positional and keyword arguments of the model called on ``inputs``: one tensor is its
    one argument, a tuple's or list's entries its positional ones (``model(*inputs)``), a dict's
    its keyword ones (``model(**inputs)``, as a Hugging Face model takes ``input_ids`` and
    ``attention_mask``)."""
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def call_model(model: nn.Module, tensors: Mapping[str, Tensor], inputs: Inputs) -> Any:
    """``model`` called on ``inputs`` (:func:`model_arguments`) with ``tensors`` (parameters and
    buffers by name) in place of its own, as ``torch.func.functional_call`` does, which puts each
    tensor under every name of the one it replaces (tied weights).

    A module that the model holds under several names (``nn.Sequential(shared, act, shared)``)
    holds each tensor once, in one attribute: ``functional_call`` swapped it in under every name
    and restored the original under the first only, so the model kept the swapped-in tensor for
    good. Here each attribute is swapped once; a name the model does not have goes to
    ``functional_call`` as it is.
    """
    owner: dict[str, int] = {}  # every name of a tensor -> its id
    slots: dict[int, list[str]] = {}  # id -> one name per attribute holding it
    seen: set[tuple[int, str]] = set()
    for prefix, module in model.named_modules(remove_duplicate=False):
        for attr, tensor in (*module._parameters.items(), *module._buffers.items()):
            if tensor is None:
                continue
            name = f"{prefix}.{attr}" if prefix else attr
            owner[name] = id(tensor)
            if (id(module), attr) not in seen:
                seen.add((id(module), attr))
                slots.setdefault(id(tensor), []).append(name)
    given: dict[str, Tensor] = {}
    for name, value in tensors.items():
        given.update(dict.fromkeys(slots[owner[name]], value) if name in owner else {name: value})
    args, kwargs = model_arguments(inputs)
    return functional_call(model, given, args, kwargs, tie_weights=False)


def check_inputs(inputs: Inputs, name: str, dims: int, who: str) -> tuple[Inputs, Tensor, str]:
    """Check a tuple, list or dict of inputs (or targets): tensors only, not empty, all with the
    same first ``dims`` sizes (2: ``(B, N)``, tasks and examples; 1: ``(N,)``, examples).

    Returns the inputs (a mapping as a plain dict, which ``vmap`` and ``torch.utils._pytree`` map
    over), their first tensor, which stands for them all in the caller's own checks, and that
    tensor's name for messages, e.g. ``x_support['attention_mask']``. One tensor is returned as
    it is, unchecked, named ``name``. Raises TypeError or ValueError naming the input at fault.
    """
    if isinstance(inputs, Tensor):
        return inputs, inputs, name
    if isinstance(inputs, Mapping):
        inputs = dict(inputs)
    elif not isinstance(inputs, (tuple, list)):
        layout = "(B, N, ...) tensor of B tasks" if dims == 2 else "(N, ...) tensor"
        raise TypeError(
            f"{who} takes {name} as one {layout}, or a tuple, list or dict of them (the model's positional or "
            f"keyword arguments), got {name} of type {type(inputs).__name__}"
        )
    leaves = pytree.tree_flatten_with_path(inputs)[0]
    if not leaves:
        raise ValueError(f"{who} takes {name} as a tuple, list or dict of tensors, got an empty {type(inputs).__name__}")
    named = [(name + pytree.keystr(path), leaf) for path, leaf in leaves]
    for label, leaf in named:
        if not isinstance(leaf, Tensor):
            raise TypeError(f"{who} takes {name} as a tuple, list or dict of tensors, got {label} of type {type(leaf).__name__}")
    layout, leading = ("(B, N, ...)", "(B, N)") if dims == 2 else ("(N, ...)", "(N,)")
    first_label, first = named[0]
    for label, leaf in named:
        if leaf.dim() < dims:
            raise ValueError(f"{who} takes every tensor of {name} as {layout}, got {label} of shape {tuple(leaf.shape)}")
        if leaf.shape[:dims] != first.shape[:dims]:
            raise ValueError(
                f"{who} takes the tensors of {name} with the same leading {leading} sizes, got "
                f"{first_label} of shape {tuple(first.shape)} and {label} of shape {tuple(leaf.shape)}"
            )
    return inputs, first, first_label


def check_same_examples(x: Tensor, x_label: str, y: Any, y_label: str, dim: int, where: str) -> None:
    """Raise ValueError unless inputs ``x`` and targets ``y`` hold the same number of examples,
    their size at ``dim`` (1 for ``(B, N, ...)`` tasks, 0 for one task's ``(N, ...)``), naming
    ``where`` (e.g. ``"MAML: the support set's"``), both tensors (their labels, as
    :func:`check_inputs` gives them) and both sizes. Where ``x`` or ``y`` is not a tensor with
    that dimension (targets that ``loss_fn`` reads as it likes), there is nothing to compare.

    The one check of every algorithm: a mismatch failed deep in the loss naming neither set
    (cross-entropy's "Expected input batch_size (5) to match target batch_size (4)"), or, with
    MSE, broadcast a target of one example over the outputs with only a warning.
    """
    if not (isinstance(x, Tensor) and isinstance(y, Tensor) and x.dim() > dim and y.dim() > dim):
        return
    if x.shape[dim] != y.shape[dim]:
        raise ValueError(
            f"{where} inputs and targets hold different numbers of examples: {x.shape[dim]} in {x_label} "
            f"{tuple(x.shape)}, {y.shape[dim]} in {y_label} {tuple(y.shape)}"
        )


def check_episode(
    x_support: Inputs, y_support: Inputs, x_query: Inputs, y_query: Inputs, who: str
) -> tuple[Inputs, Inputs, Inputs, Inputs]:
    """Check a meta-batch of ``B`` tasks, each input or target a ``(B, N, ...)`` tensor or a
    tuple, list or dict of them (:func:`check_inputs`), as ``MAML`` and the few-shot learners
    take it, before anything runs: the same ``B`` throughout, at least one task, targets with an
    example dimension, at least one support and one query example, and inputs and targets of
    each set with the same ``N`` (:func:`check_same_examples`).

    Returns the four as :func:`check_inputs` returns them. Raises TypeError or ValueError in one
    line that starts with ``who`` and names the tensors at fault with their shapes.
    """
    given = {"x_support": x_support, "y_support": y_support, "x_query": x_query, "y_query": y_query}
    # a tuple, list or dict holds the model's arguments (or targets) batched over tasks, on every
    # path: vmap maps over its tensors, the task loop indexes each; it is never a list of tasks
    checked = {name: check_inputs(value, name, 2, who) for name, value in given.items()}
    inputs = {name: first for name, (_, first, _) in checked.items()}  # each one's first tensor
    labels = {name: label for name, (_, _, label) in checked.items()}
    sizes = ", ".join(f"{labels[name]} {tuple(value.shape)}" for name, value in inputs.items())
    if len({value.shape[0] if value.dim() else None for value in inputs.values()}) != 1:
        # vmap's message and the task loop's name none of them
        raise ValueError(f"{who} takes (B, N, ...) tensors of the same B tasks, got {sizes}")
    if inputs["y_support"].dim() and not len(inputs["y_support"]):
        # vmap's mean over no tasks was a NaN meta-loss; the loop's torch.stack failed naming nothing
        raise ValueError(f"{who} needs at least one task, got {sizes}")
    for name in ("x_support", "y_support", "x_query", "y_query"):
        if inputs[name].dim() < 2:
            # one task's (N,) labels read as B = N tasks of one unbatched example each: the
            # loss would be finite and the meta-learning silently wrong (inputs: 0-dim
            # examples, which the model failed on naming none)
            raise ValueError(
                f"{who} takes (B, N, ...) tensors of B tasks of N examples, got {labels[name]} of shape "
                f"{tuple(inputs[name].shape)}: one {'input' if name[0] == 'x' else 'target'} per task. For one task, "
                "add the task dimension (x[None], y[None]) or adapt it with adapt()"
            )
    empty = [f"{labels[name]} {tuple(value.shape)}" for name, value in inputs.items() if value.dim() >= 2 and not value.shape[1]]
    if empty:
        # the mean loss over no examples is NaN: the inner step or the meta-loss went NaN in silence
        raise ValueError(
            f"{who} needs at least one support and one query example per task, got {', '.join(empty)} "
            "(episodes drawn with q_query=0 have no query set)"
        )
    for part in ("support", "query"):
        x, y = f"x_{part}", f"y_{part}"
        check_same_examples(inputs[x], labels[x], inputs[y], labels[y], 1, f"{who}: the {part} set's")
    return tuple(value for value, _, _ in checked.values())  # type: ignore[return-value]


def check_task(x_support: Inputs, y_support: Inputs, who: str, *, need_examples: bool = True) -> tuple[Inputs, Inputs]:
    """Check ONE task's support set, ``(N, ...)`` inputs and targets (or tuples, lists or dicts
    of them, :func:`check_inputs`), as an ``adapt`` takes it: at least one example where
    ``need_examples`` (an adaptation of no step reads none), and inputs and targets of the same
    ``N`` (a 0-dim target for the whole task is refused). Returns both as :func:`check_inputs`
    returns them; raises in one line naming ``who``."""
    x_support, first, label = check_inputs(x_support, "x_support", 1, who)
    y_support, y_first, y_label = check_inputs(y_support, "y_support", 1, who)
    if first.dim() and not y_first.dim():  # MSE broadcast it over the outputs with only a warning
        raise ValueError(
            f"{who} takes (N, ...) targets, one per example, got {y_label} of shape () for {label} of shape {tuple(first.shape)}"
        )
    check_same_examples(first, label, y_first, y_label, 0, f"{who}: the support set's")
    if need_examples and first.dim() and not len(first):
        # the mean loss over no examples is NaN: every adapted parameter was NaN
        raise ValueError(f"adapt needs at least one support example, got {label} of shape {tuple(first.shape)}")
    return x_support, y_support


def outside_inference(inputs: Any) -> Any:
    """``inputs`` (a tensor, or a tuple, list or mapping of them) with every ``inference_mode``
    tensor cloned into a normal one: autograd saves no inference tensors, so a differentiated
    inner loop run for evaluation under ``inference_mode`` reads such copies. Anything else as
    it is. A mapping that ``torch.utils._pytree`` does not enter (a ``UserDict``, such as a
    tokenizer's ``BatchEncoding``, or a dict subclass of the user's own) is copied with its type
    (as a dict if it cannot be written to): Reptile's targets reach ``loss_fn`` as they were given."""

    def leaf(value: Any) -> Any:
        if isinstance(value, Tensor):
            return value.clone() if value.is_inference() else value
        if isinstance(value, Mapping):  # a leaf: pytree maps over dict, OrderedDict and defaultdict only
            values = {k: outside_inference(v) for k, v in value.items()}
            if not isinstance(value, MutableMapping):
                return values
            mapping = copy.copy(value)
            mapping.update(values)
            return mapping
        return value

    return pytree.tree_map(leaf, inputs)


def default_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """``MAML``'s and ``Reptile``'s default ``loss_fn``: cross-entropy, refusing outputs of one
    class, over which it is 0 whatever the targets (a regression model given no ``loss_fn``
    meta-trained on a zero loss without a word), and outputs that are not one tensor of logits
    (a model returning a tuple or dict needs a ``loss_fn`` that picks from it).

    Targets are class indices of any integer dtype (int32 labels trained under ``vmap`` but
    failed in the task loop, "expected target dtype to be Long or Byte"), or class
    probabilities of the outputs' shape; other targets (labels stored as floats, which failed
    under ``vmap`` with "gather(): Expected dtype int32/int64 for index", or bool) are refused
    with a TypeError naming their dtype and shape."""
    if not isinstance(outputs, Tensor):
        raise TypeError(
            f"the default loss_fn, cross-entropy, takes the model's output as one tensor of logits, got a "
            f"{type(outputs).__name__}: pass loss_fn(outputs, targets) that reads it, e.g. "
            "loss_fn=lambda outputs, y: nn.functional.cross_entropy(outputs[0], y)"
        )
    classes = outputs.shape[1] if outputs.dim() >= 2 else outputs.shape[0] if outputs.dim() == 1 else None
    if classes == 1:
        raise ValueError(
            "the default loss_fn, cross-entropy, is 0 over a model with one output whatever the targets: "
            "pass loss_fn, e.g. loss_fn=nn.functional.mse_loss for regression"
        )
    if isinstance(targets, Tensor):
        indices = not (targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool)
        if not indices and not (targets.is_floating_point() and targets.shape == outputs.shape):
            raise TypeError(
                "the default loss_fn, cross-entropy, takes class indices as integer targets or class probabilities "
                f"of the outputs' shape {tuple(outputs.shape)}, got {targets.dtype} targets of shape "
                f"{tuple(targets.shape)}: for labels stored as floats pass y.long(), or pass your own loss_fn"
            )
        if indices and targets.dtype != torch.int64:
            targets = targets.long()  # a lossless widening of the class indices
    return nn.functional.cross_entropy(outputs, targets)


def mse_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """``nn.functional.mse_loss`` of outputs and targets of one shape, the few-shot learners'
    ``"mse"``; raises ValueError naming both shapes where they differ: torch broadcast ``(N, 1)``
    outputs against ``(N,)`` targets to an ``(N, N)`` loss with only a warning, pulling every
    prediction towards every target of its task."""
    if isinstance(outputs, Tensor) and isinstance(targets, Tensor) and outputs.shape != targets.shape:
        raise ValueError(
            f"the 'mse' loss takes outputs and targets of one shape, got outputs {tuple(outputs.shape)} and targets "
            f"{tuple(targets.shape)}, which torch's mse_loss would broadcast"
        )
    return nn.functional.mse_loss(outputs, targets)


def scalar_loss(loss: Any) -> Tensor:
    """``loss_fn``'s result as a 0-dim tensor: one of one element (``(1,)``, a ``keepdim``
    reduction's) reshaped, as ``backward()`` takes it, where ``torch.func.grad`` refused it under
    ``vmap`` ("Expected f(*args) to return a scalar Tensor"); anything else (a per-example loss, a
    Python number) raises ValueError in one line naming ``loss_fn`` and what it returned. Under
    ``vmap`` the shape is one task's."""
    if not isinstance(loss, Tensor):
        raise ValueError(f"loss_fn must return a scalar tensor (one element), got a {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(
            f"loss_fn must return a scalar tensor (one element), got a tensor of shape {tuple(loss.shape)}: "
            "reduce it, e.g. with reduction='mean'"
        )
    return loss.reshape(())


def check_steps(steps: object) -> None:
    """Raise ValueError unless ``steps`` (an ``adapt``'s inner steps) is an integer >= 0
    (:func:`~learnedopt.values.is_integer`)."""
    if not is_integer(steps) or steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps!r} (an integer)")


def check_initialised(params: Mapping[str, Tensor], who: str) -> None:
    """Raise ValueError naming the first of ``params`` (a name to parameter mapping) that a lazy
    module (``nn.LazyLinear``) has not initialised yet; ``who`` (``"MAML"``) starts the message.
    Meta-training cannot run from it: its shape is unknown, and each working copy would draw it
    afresh at random rather than start from the initialisation."""
    lazy = [name for name, p in params.items() if nn.parameter.is_lazy(p)]
    if lazy:
        raise ValueError(
            f"{who}: parameter {lazy[0]!r} is not initialised yet (a lazy module): run the model on one batch "
            "before meta-training, e.g. model(x_support[0])"
        )
