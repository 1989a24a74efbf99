"""Random affine distortions of image batches, for few-shot meta-training on Omniglot.

Lake et al.'s Omniglot comes with few drawers per character and, in the small background
splits, few alphabets; distorting every training image a little (as the Siamese nets of Koch
et al. 2015 did) is the usual way to make more of them. The draws come from a caller's
generator, so a seeded run repeats them exactly.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..values import is_integer, is_number


@dataclass(frozen=True)
class AffineRanges:
    """Uniform ranges of one random affine distortion (Koch et al. 2015's, by default).

    Each is a finite number >= 0, and ``scale < 1`` (else ValueError).

    Attributes:
        rotation: largest rotation, degrees (drawn from ``[-rotation, rotation]``).
        shear: largest shear along each axis, as a fraction of the other coordinate.
        scale: largest relative change of each axis' scale (``1 +- scale``).
        shift: largest translation along each axis, as a fraction of the image side.
    """

    rotation: float = 10.0
    shear: float = 0.3
    scale: float = 0.2
    shift: float = 2.0 / 28.0

    def __post_init__(self) -> None:
        # NaN or Inf made every image NaN, and a scale of 1 or more can draw a zero or negative
        # scale (a collapsed or mirrored glyph): both silently, at every draw
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not is_number(value) or not (math.isfinite(value) and value >= 0):
                raise ValueError(f"AffineRanges.{field.name} must be a finite number >= 0, got {value!r}")
        if self.scale >= 1:
            raise ValueError(f"AffineRanges.scale must be < 1 (1 +- scale stays positive), got {self.scale!r}")


def _check_generator(generator: object) -> None:
    """TypeError unless ``generator`` is a ``torch.Generator``: None drew from torch's global
    generator in silence (a seeded run did not repeat), a seed failed in ``torch.rand``."""
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)), got {type(generator).__name__}"
        )


def random_affine(images: Tensor, generator: torch.Generator, ranges: AffineRanges = AffineRanges()) -> Tensor:
    """Distort each image by its own random affine map, drawn from ``ranges``.

    The rotation, shear and scale are those of the image's pixels, whatever its aspect ratio.

    Args:
        images: ``(..., C, H, W)`` floating images; the background is 0 (pixels moved in from
            outside the image are 0).
        generator: a CPU generator; it is advanced by ``7 * N`` draws for ``N`` images.
        ranges: the ranges of the distortion.

    Returns:
        A new tensor of the shape, dtype and device of ``images``, bilinearly resampled (half
        and bfloat16 images in float32).
    """
    _check_generator(generator)
    if images.dim() < 3 or not images.is_floating_point():
        raise ValueError(f"random_affine needs floating images (..., C, H, W), got {tuple(images.shape)} {images.dtype}")
    if not isinstance(ranges, AffineRanges):
        raise TypeError(f"ranges must be an AffineRanges, got {type(ranges).__name__}")
    lead, (c, h, w) = images.shape[:-3], images.shape[-3:]
    n = math.prod(lead)
    flat = images.reshape(n, c, h, w)  # not -1: ambiguous for images of no pixel
    u = torch.rand(n, 7, generator=generator, dtype=torch.float64) * 2 - 1  # U[-1, 1]
    if images.numel() == 0:  # affine_grid refuses an empty size; nothing to move
        return images.clone()
    angle = u[:, 0] * math.radians(ranges.rotation)
    shear_x, shear_y = u[:, 1] * ranges.shear, u[:, 2] * ranges.shear
    scale_x, scale_y = 1 + u[:, 3] * ranges.scale, 1 + u[:, 4] * ranges.scale
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotate = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    shear = torch.stack([torch.stack([torch.ones_like(shear_x), shear_x], -1),
                         torch.stack([shear_y, torch.ones_like(shear_y)], -1)], -2)  # fmt: skip
    linear = rotate @ shear @ torch.diag_embed(torch.stack([scale_x, scale_y], -1))
    # The map is drawn in pixels; affine_grid's x runs over [-1, 1] across w pixels and its y across h, so
    # in its units the map is diag(2/w, 2/h) @ linear @ diag(w/2, h/2) (the same matrix for a square
    # image). Drawn in those units, a rotation of a 28x56 image turned its ink by half the angle and
    # squashed it.
    linear = linear * torch.tensor([[1.0, h / w], [w / h, 1.0]], dtype=linear.dtype)
    # affine_grid maps output coordinates in [-1, 1] to input coordinates; a shift of s image
    # sides is 2 s in those units.
    theta = torch.cat([linear, (u[:, 5:7] * 2 * ranges.shift).unsqueeze(-1)], -1)
    # half and bfloat16 images are resampled in float32: affine_grid of a side of 1 is not
    # implemented for them on the CPU, and their grid coordinates would lose precision
    work = flat if flat.element_size() >= 4 else flat.float()
    grid = torch.nn.functional.affine_grid(theta.to(work), [n, c, h, w], align_corners=False)
    out = torch.nn.functional.grid_sample(work, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.to(images.dtype).reshape(*lead, c, h, w)


def augment_support(
    images: Tensor, labels: Tensor, copies: int, generator: torch.Generator, ranges: AffineRanges = AffineRanges()
) -> tuple[Tensor, Tensor]:
    """A few-shot support set enlarged by ``copies`` randomly distorted versions of each image.

    Test-time augmentation for one-shot adaptation: the learner adapts on ``(1 + copies) * N``
    images instead of ``N``, each distortion drawn as in :func:`random_affine`.

    Args:
        images: ``(N, C, H, W)`` floating support images (background 0).
        labels: ``(N,)`` their labels.
        copies: distorted versions per image, ``>= 0`` (0 returns the inputs unchanged).
        generator: a CPU generator; advanced by ``7 * N * copies`` draws.
        ranges: the ranges of each distortion.

    Returns:
        ``(images', labels')`` of ``(1 + copies) * N`` rows: the originals first, then copy 1
        of every image, copy 2, and so on; ``labels'`` is ``labels`` repeated to match.
    """
    if not is_integer(copies) or copies < 0:
        raise ValueError(f"copies must be an integer >= 0, got {copies!r}")
    _check_generator(generator)
    if not images.is_floating_point():  # random_affine's message would show the expanded shape
        raise ValueError(f"augment_support needs floating images (N, C, H, W), got {tuple(images.shape)} {images.dtype}")
    if images.dim() != 4 or labels.shape != images.shape[:1]:
        raise ValueError(f"augment_support needs images (N, C, H, W) and labels (N,), got {tuple(images.shape)} "
                         f"and {tuple(labels.shape)}")  # fmt: skip
    if copies == 0:
        return images, labels
    distorted = random_affine(images.unsqueeze(0).expand(copies, *images.shape), generator, ranges)
    return torch.cat([images, distorted.reshape(-1, *images.shape[1:])]), labels.repeat(copies + 1)
