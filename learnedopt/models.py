"""Reference network architectures used by the meta-learning benchmarks and examples."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


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


class TinyTransformer(nn.Module):
    """A one-block causal transformer language model (GPT-style, LayerNorm before each part).

    Token and position embeddings of ``width``; causal self-attention with ``heads`` heads; an
    MLP ``width -> 2 width -> width`` with GELU; LayerNorm and a linear head to ``vocab`` logits.
    Input ``(B, L)`` int64 tokens with ``L <= seq_len``; output ``(B, vocab, L)``: the logits of
    each position's next token, class dimension second as ``F.cross_entropy`` takes it.
    """

    def __init__(self, vocab: int = 16, seq_len: int = 16, width: int = 32, heads: int = 2) -> None:
        super().__init__()
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
        x = self.token(tokens) + self.position(torch.arange(tokens.shape[1], device=tokens.device))
        q, k, v = rearrange(
            self.qkv(self.norm_attention(x)), "b l (three h d) -> three b h l d", three=3, h=self.heads
        )
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(rearrange(attended, "b h l d -> b l (h d)"))
        x = x + self.mlp(self.norm_mlp(x))
        return self.head(self.norm_head(x)).transpose(1, 2)
