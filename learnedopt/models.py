"""Reference network architectures used by the meta-learning benchmarks and examples."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .values import check_elements, check_positive_integer


def _check_sizes(owner: str, **sizes: int) -> None:
    """Raise ValueError naming the first of ``sizes`` that is not an integer >= 1 (a zero width
    builds a model of empty layers without any error)."""
    for name, value in sizes.items():
        check_positive_integer(f"{owner}: {name}", value)


def conv4(in_channels: int = 1, n_way: int = 5, hidden: int = 64, image_size: int = 28, pooling: str = "stride") -> nn.Sequential:
    """The 4-block convolutional network of the MAML paper (Finn et al. 2017, after Vinyals et al.).

    Each block: 3x3 convolution with ``hidden`` filters, BatchNorm, ReLU, and a halving of the
    resolution, by a stride-2 convolution (``pooling="stride"``, the MAML paper's Omniglot choice)
    or 2x2 max-pooling (``"max"``, its MiniImagenet choice). A linear layer maps the flattened
    features to ``n_way`` logits. Input ``(N, in_channels, image_size, image_size)``.

    Raises:
        ValueError: an unknown ``pooling``, a size below 1, or, with ``"max"``, an ``image_size``
            below 16 (a fourth 2x2 pooling of a 1x1 map leaves nothing); sizes that would make a
            weight of more than :data:`~learnedopt.values.MAX_ELEMENTS` elements.
    """
    if pooling not in ("stride", "max"):
        raise ValueError(f"pooling must be 'stride' or 'max', got {pooling!r}")
    _check_sizes("conv4", in_channels=in_channels, n_way=n_way, hidden=hidden, image_size=image_size)
    if pooling == "max" and image_size < 16:
        raise ValueError(f"conv4: image_size {image_size} is too small for 4 halvings by max-pooling; it needs at least 16")
    # before allocating: image_size=10**6 was the allocator's raw error for a 5 TB output layer
    check_elements(f"conv4: hidden {hidden}", hidden**2 * 9, "a (hidden, hidden, 3, 3) convolution weight")
    final = -(-image_size // 16) if pooling == "stride" else image_size // 16  # four halvings
    check_elements(f"conv4: hidden {hidden}, image_size {image_size} and n_way {n_way}", hidden * final**2 * n_way,
                   "the output layer's weight")  # fmt: skip
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


class ResidualBlock(nn.Module):
    """``relu(x + BN(conv(relu(BN(conv(x))))))``: two 3x3 convolutions of ``channels``, each
    followed by BatchNorm, around an identity skip (He et al. 2016's basic block). Shape-preserving:
    ``(B, channels, H, W) -> (B, channels, H, W)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, channels, H, W)`` to the same shape: the block's output."""
        y = F.relu(self.norm1(self.conv1(x)))
        return F.relu(x + self.norm2(self.conv2(y)))


def small_resnet(in_channels: int = 1, classes: int = 10, width: int = 16) -> nn.Sequential:
    """A small residual network with BatchNorm for ``(B, in_channels, 28, 28)`` images.

    A stride-2 3x3 stem to ``width`` channels at 14x14 (conv, BatchNorm, ReLU), one
    :class:`ResidualBlock`, a stride-2 3x3 convolution to ``2 width`` channels at 7x7 (conv,
    BatchNorm, ReLU), another block, global average pooling and a linear layer to ``classes``
    logits ``(B, classes)``.
    """
    _check_sizes("small_resnet", in_channels=in_channels, classes=classes, width=width)

    def down(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *down(in_channels, width),
        ResidualBlock(width),
        *down(width, 2 * width),
        ResidualBlock(2 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, classes),
    )


class TinyTransformer(nn.Module):
    """A one-block causal transformer language model (GPT-style, LayerNorm before each part).

    Token and position embeddings of ``width``; causal self-attention with ``heads`` heads; an
    MLP ``width -> 2 width -> width`` with GELU; LayerNorm and a linear head to ``vocab`` logits.
    Input ``(B, L)`` int64 tokens with ``L <= seq_len``; output ``(B, vocab, L)``: the logits of
    each position's next token, class dimension second as ``F.cross_entropy`` takes it.
    """

    def __init__(self, vocab: int = 16, seq_len: int = 16, width: int = 32, heads: int = 2) -> None:
        super().__init__()
        _check_sizes("TinyTransformer", vocab=vocab, seq_len=seq_len, width=width, heads=heads)
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.heads = heads
        self.token = nn.Embedding(vocab, width)
        self.position = nn.Embedding(seq_len, width)
        self.norm_attention = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.norm_head = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        """``(B, L)`` token ids (``L`` at most ``seq_len``) to ``(B, vocab, L)`` next-token logits
        (classes second, as ``cross_entropy`` takes them), each position attending to itself and
        the ones before."""
        if tokens.dim() != 2:
            raise ValueError(f"TinyTransformer takes (B, L) tokens, got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > self.position.num_embeddings:
            raise ValueError(
                f"TinyTransformer: {tokens.shape[1]} tokens per sequence, more than its seq_len {self.position.num_embeddings}"
            )
        x = self.token(tokens) + self.position(torch.arange(tokens.shape[1], device=tokens.device))
        q, k, v = rearrange(
            self.qkv(self.norm_attention(x)), "b l (three h d) -> three b h l d", three=3, h=self.heads
        )
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(rearrange(attended, "b h l d -> b l (h d)"))
        x = x + self.mlp(self.norm_mlp(x))
        return self.head(self.norm_head(x)).transpose(1, 2)
