"""BatchNorm under MAML and Reptile: transductive statistics (:class:`BatchStatNorm`, the original
MAML setting: every forward pass normalises with the statistics of the batch it is given, the
support set while adapting, the query set when evaluating, and no running statistics are kept or
used) or the running statistics a pretrained layer holds (:class:`RunningStatNorm`, inductive),
both written so that ``torch.func`` differentiates them twice exactly under ``vmap``, and the
``batchnorm=`` policies that replace a model's BatchNorm layers by one of them."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class BatchStatNorm(nn.Module):
    """Batch normalisation with the statistics of the current batch only (transductive).

    Under ``vmap`` it is written with plain tensor ops, so that ``torch.func.grad`` differentiates it
    twice exactly: PyTorch's fused batch-norm kernel gave second-order MAML meta-gradients 0.2% to
    0.9% off the autograd loop's under ``vmap`` (relative norm, small MLPs, torch 2.13, float64). Outside ``vmap``
    it calls that fused kernel, which is exact there and faster.
    Input ``(N, C, *spatial)``; normalises over every dimension except ``C``.
    """

    def __init__(self, source: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.eps = source.eps
        self.weight = source.weight  # the same Parameter objects: names and optimizers carry over
        self.bias = source.bias

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``(N, C, *spatial)`` normalised per channel with the mean and (biased) variance
        over its other dimensions, then scaled and shifted by ``weight`` and ``bias`` ``(C,)``
        where the layer has them; the same shape as ``x``. Raises ValueError for an input of
        fewer than 2 dimensions or of one value per channel."""
        if x.dim() < 2 or x.numel() == x.shape[1]:
            # the fused kernel refuses this; under vmap the plain ops would give 0 everywhere
            raise ValueError(
                f"BatchNorm with batch statistics needs more than 1 value per channel, got input of "
                f"shape {tuple(x.shape)} (one example): give the task more than one support example"
            )
        if not torch._C._functorch.is_functorch_wrapped_tensor(x):
            # outside torch.func transforms the fused kernel is exact and faster (same statistics)
            return nn.functional.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)
        dims = [0, *range(2, x.dim())]
        mean = x.mean(dim=dims, keepdim=True)
        var = x.var(dim=dims, unbiased=False, keepdim=True)
        shape = [1, -1] + [1] * (x.dim() - 2)
        out = (x - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


class RunningStatNorm(nn.Module):
    """Batch normalisation with the running statistics a BatchNorm layer holds (inductive): every
    example is normalised on its own, as in ``eval()`` mode, and the statistics are never updated,
    in training or evaluation; for a pretrained network whose statistics should be kept.

    It holds the layer's own ``weight``, ``bias``, ``running_mean``, ``running_var`` and
    ``num_batches_tracked`` (the same tensors, under the same names, so a checkpoint of the
    original model still loads). Written with plain tensor ops, which ``torch.func`` differentiates
    twice exactly under ``vmap`` (see :class:`BatchStatNorm`). Input ``(N, C, *spatial)``.
    """

    def __init__(self, source: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.check(source)
        self.eps = source.eps
        self.weight = source.weight  # the same Parameter objects: names and optimizers carry over
        self.bias = source.bias
        self.register_buffer("running_mean", source.running_mean)
        self.register_buffer("running_var", source.running_var)
        self.register_buffer("num_batches_tracked", source.num_batches_tracked)

    @staticmethod
    def check(source: nn.modules.batchnorm._BatchNorm) -> None:
        """Raise ValueError unless ``source`` holds running statistics."""
        if source.running_mean is None or source.running_var is None:
            raise ValueError(
                f"batchnorm='running' normalises with the layer's running statistics, but this {type(source).__name__} "
                "has none (track_running_stats=False): use batchnorm='transductive'"
            )

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``(N, C, *spatial)`` normalised per channel with ``running_mean`` and
        ``running_var`` ``(C,)`` (left unchanged), then scaled and shifted by ``weight`` and
        ``bias`` where the layer has them; the same shape as ``x``. Raises ValueError for an
        input of fewer than 2 dimensions."""
        if x.dim() < 2:
            raise ValueError(f"BatchNorm takes an input (N, C, *spatial), got shape {tuple(x.shape)}")
        shape = [1, -1] + [1] * (x.dim() - 2)
        out = (x - self.running_mean.view(shape)) * torch.rsqrt(self.running_var.view(shape) + self.eps)
        if self.weight is not None:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def replace_batchnorm_(model: nn.Module, by: type[nn.Module] = BatchStatNorm) -> nn.Module:
    """Replace every BatchNorm layer of ``model`` in place by ``by(layer)``
    (:class:`BatchStatNorm` or :class:`RunningStatNorm`).

    Raises:
        ValueError: a lazy BatchNorm layer (``nn.LazyBatchNorm1d``) is not initialised yet, before
            anything is replaced: its replacement would hold its uninitialised parameters without
            the hook that initialises them, and the model would fail for good.
    """
    check_initialised_batchnorm(model)
    return _replace(model, by)


def check_initialised_batchnorm(model: nn.Module) -> None:
    """Raise ValueError naming the first lazy BatchNorm layer of ``model`` whose parameters or
    statistics are not initialised yet (run the model on one batch first)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and isinstance(m, nn.modules.lazy.LazyModuleMixin):
            if m.has_uninitialized_params():
                raise ValueError(
                    f"layer {name!r} ({type(m).__name__}) is not initialised yet (a lazy module): run the model on one "
                    "batch before wrapping it, e.g. model(x_support[0]); its batch-norm replacement would hold its "
                    "uninitialised parameters for good"
                )


def _replace(model: nn.Module, by: type[nn.Module]) -> nn.Module:
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, by(child))
        else:
            _replace(child, by)
    return model


def is_library_layer(module: nn.Module) -> bool:
    """Whether ``module`` is one of ``torch.nn``'s own layers or a batch-norm replacement here: no
    code of the user's runs in its forward."""
    return type(module).__module__.startswith("torch.nn.") or isinstance(module, (BatchStatNorm, RunningStatNorm))


#: ``batchnorm=`` policy -> what replaces a BatchNorm layer (None: the model may have none)
BATCHNORM_POLICIES: dict[str, type[nn.Module] | None] = {
    "transductive": BatchStatNorm,
    "running": RunningStatNorm,
    "error": None,
}


def apply_batchnorm_policy_(model: nn.Module, batchnorm: str) -> nn.Module:
    """``batchnorm="transductive"``: replace ``model``'s BatchNorm layers in place by
    :class:`BatchStatNorm`; ``"running"``: by :class:`RunningStatNorm`; ``"error"``: refuse a model
    with BatchNorm layers."""
    if batchnorm not in BATCHNORM_POLICIES:
        raise ValueError(f"batchnorm must be one of {', '.join(map(repr, BATCHNORM_POLICIES))}, got {batchnorm!r}")
    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        raise ValueError("the model is a single BatchNorm layer, which cannot be replaced in place; wrap it in nn.Sequential")
    replacement = BATCHNORM_POLICIES[batchnorm]
    if replacement is not None:
        if replacement is RunningStatNorm:  # every layer checked first: a refused model stays as it was
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    RunningStatNorm.check(m)
        return replace_batchnorm_(model, replacement)
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ValueError("the model has BatchNorm layers and batchnorm='error'")
    return model
