"""The reference architectures of ``learnedopt.models``: output shapes on odd inputs, and clear
errors for inputs they cannot take."""

from __future__ import annotations

import re

import pytest
import torch

from learnedopt.models import TinyTransformer, conv4, small_resnet


@pytest.mark.parametrize(("pooling", "size"), [("stride", 28), ("stride", 5), ("stride", 1), ("max", 28), ("max", 16)])
def test_conv4_takes_one_image_and_float64(pooling: str, size: int) -> None:
    model = conv4(n_way=3, hidden=4, image_size=size, pooling=pooling).double()
    # BatchNorm in training mode normalises over batch and positions: one image will do where the
    # last block keeps several positions (28 by strides: 2x2), not where it keeps one (PyTorch refuses)
    batches = (1, 2) if (pooling, size) == ("stride", 28) else (2,)
    for batch in batches:
        out = model(torch.randn(batch, 1, size, size, dtype=torch.float64))
        assert out.shape == (batch, 3) and out.dtype == torch.float64 and torch.isfinite(out).all()


@pytest.mark.parametrize("size", [15, 8, 1])
def test_conv4_refuses_images_too_small_for_four_max_poolings(size: int) -> None:
    # it built a Linear(0, n_way) (with torch's "zero-element tensors" warning), and its forward
    # failed in the fourth MaxPool2d with "Output size is too small"
    with pytest.raises(ValueError, match=f"conv4: image_size {size} is too small for 4 halvings by max-pooling"):
        conv4(image_size=size, pooling="max")
    with pytest.raises(ValueError, match="conv4: image_size must be an integer >= 1, got 0"):
        conv4(image_size=0)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: conv4(hidden=0), "conv4: hidden must be an integer >= 1, got 0"),  # a RuntimeError in forward
        (lambda: conv4(n_way=0), "conv4: n_way must be an integer >= 1, got 0"),  # (B, 0) logits
        (lambda: conv4(in_channels=0), "conv4: in_channels must be an integer >= 1, got 0"),
        (lambda: small_resnet(width=0), "small_resnet: width must be an integer >= 1, got 0"),
        (lambda: small_resnet(classes=0), "small_resnet: classes must be an integer >= 1, got 0"),
        (lambda: TinyTransformer(vocab=0), "TinyTransformer: vocab must be an integer >= 1, got 0"),
        (lambda: TinyTransformer(seq_len=0), "TinyTransformer: seq_len must be an integer >= 1, got 0"),
        (lambda: TinyTransformer(width=0), "TinyTransformer: width must be an integer >= 1, got 0"),
    ],
)
def test_zero_sizes_are_refused(build, message: str) -> None:
    """Each built a model of empty layers without an error."""
    with pytest.raises(ValueError, match=message):
        build()


def test_small_resnet_takes_one_image_and_float64() -> None:
    out = small_resnet(width=4).double()(torch.randn(1, 1, 28, 28, dtype=torch.float64))
    assert out.shape == (1, 10) and out.dtype == torch.float64


def test_tiny_transformer_is_causal_and_takes_short_sequences() -> None:
    torch.manual_seed(0)
    model = TinyTransformer(vocab=5, seq_len=6, width=8, heads=2).double()
    tokens = torch.randint(5, (1, 6))
    out = model(tokens)
    assert out.shape == (1, 5, 6) and out.dtype == torch.float64
    changed = tokens.clone()
    changed[0, 4:] = (changed[0, 4:] + 1) % 5
    torch.testing.assert_close(model(changed)[..., :4], out[..., :4], rtol=0, atol=0)  # no look-ahead
    assert not torch.equal(model(changed)[..., 4:], out[..., 4:])
    torch.testing.assert_close(model(tokens[:, :3]), out[..., :3])  # a shorter sequence is a prefix


def test_tiny_transformer_refuses_what_it_cannot_read() -> None:
    model = TinyTransformer(vocab=5, seq_len=6, width=8, heads=2)
    # was: IndexError "index out of range in self" from the position embedding
    with pytest.raises(ValueError, match="TinyTransformer: 7 tokens per sequence, more than its seq_len 6"):
        model(torch.randint(5, (2, 7)))
    # was: IndexError "tuple index out of range"
    with pytest.raises(ValueError, match=r"TinyTransformer takes \(B, L\) tokens, got shape \(6,\)"):
        model(torch.randint(5, (6,)))
    # was: ZeroDivisionError
    with pytest.raises(ValueError, match="TinyTransformer: heads must be an integer >= 1, got 0"):
        TinyTransformer(heads=0)
    with pytest.raises(ValueError, match="width 30 is not a multiple of heads 4"):
        TinyTransformer(width=30, heads=4)


@pytest.mark.parametrize("pooling", ["stride", "max"])
def test_conv4_of_weights_beyond_the_element_bound_is_refused_before_allocating(pooling: str) -> None:
    """``conv4(image_size=10**6)`` tried to allocate a 5 TB output layer (the allocator's raw
    RuntimeError), ``hidden=10**5`` 360 GB of convolution weights; both are refused naming the
    sizes, at the bound on a tensor's elements that meta-train's options meet."""
    size = 62_500 if pooling == "stride" else 62_496  # the (hidden * S' * S', n_way) layer: S' = 3907 or 3906
    flat = 64 * (-(-size // 16)) ** 2 if pooling == "stride" else 64 * (size // 16) ** 2
    with pytest.raises(ValueError, match="^" + re.escape(
        f"conv4: hidden 64, image_size {size} and n_way 5: the output layer's weight would have {flat * 5:,} elements; "
        "learnedopt's tensors have at most 2,147,483,647 (2**31 - 1)") + "$"):  # fmt: skip
        conv4(n_way=5, image_size=size, pooling=pooling)
    with pytest.raises(ValueError, match=re.escape("conv4: hidden 100000: a (hidden, hidden, 3, 3) convolution weight would have 90,000,000,000 elements")):
        conv4(hidden=100_000, pooling=pooling)
