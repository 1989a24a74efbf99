"""Reference network architectures used by the meta-learning benchmarks and examples."""

from __future__ import annotations

from torch import nn


def conv4(in_channels: int = 1, n_way: int = 5, hidden: int = 64, image_size: int = 28, pooling: str = "stride") -> nn.Sequential:
    """The 4-block convolutional network of the MAML paper (Finn et al. 2017, after Vinyals et al.).

    Each block: 3x3 convolution with ``hidden`` filters, BatchNorm, ReLU, and a halving of the
    resolution, by a stride-2 convolution (``pooling="stride"``, the MAML paper's Omniglot choice)
    or 2x2 max-pooling (``"max"``, its MiniImagenet choice). A linear layer maps the flattened
    features to ``n_way`` logits. Input ``(N, in_channels, image_size, image_size)``.
    """
    if pooling not in ("stride", "max"):
        raise ValueError(f"pooling must be 'stride' or 'max', got {pooling!r}")
    layers: list[nn.Module] = []
    channels, size = in_channels, image_size
    for _ in range(4):
        stride = 2 if pooling == "stride" else 1
        layers += [nn.Conv2d(channels, hidden, 3, stride=stride, padding=1), nn.BatchNorm2d(hidden), nn.ReLU()]
        if pooling == "max":
            layers.append(nn.MaxPool2d(2))
        channels = hidden
        size = (size + 1) // 2 if pooling == "stride" else size // 2
    layers += [nn.Flatten(), nn.Linear(hidden * size * size, n_way)]
    return nn.Sequential(*layers)
