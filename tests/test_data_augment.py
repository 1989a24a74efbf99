"""``learnedopt.data.random_affine``: reproducible per-image distortions within their ranges."""

from __future__ import annotations

import math

import pytest
import torch

from learnedopt.data import AffineRanges, augment_support, random_affine

NONE = AffineRanges(rotation=0.0, shear=0.0, scale=0.0, shift=0.0)


def blobs(n: int, side: int = 28) -> torch.Tensor:
    """``(n, 1, side, side)`` images, each a filled 6x6 square at the centre."""
    images = torch.zeros(n, 1, side, side, dtype=torch.float64)
    images[..., side // 2 - 3 : side // 2 + 3, side // 2 - 3 : side // 2 + 3] = 1.0
    return images


def centroids(images: torch.Tensor) -> torch.Tensor:
    """``(n, 2)`` ink centroid (row, column) of ``(n, 1, H, W)`` images, in pixels."""
    h, w = images.shape[-2:]
    rows, cols = torch.meshgrid(torch.arange(h, dtype=images.dtype), torch.arange(w, dtype=images.dtype), indexing="ij")
    mass = images.sum((-1, -2, -3))
    return torch.stack([(images[:, 0] * rows).sum((-1, -2)) / mass, (images[:, 0] * cols).sum((-1, -2)) / mass], -1)


def test_zero_ranges_give_the_images_back() -> None:
    images = torch.rand(3, 2, 1, 28, 28, dtype=torch.float64)
    out = random_affine(images, torch.Generator().manual_seed(0), NONE)
    assert out.shape == images.shape and out.dtype == images.dtype
    torch.testing.assert_close(out, images, rtol=0, atol=1e-12)


def test_the_draws_are_reproducible_and_differ_per_image() -> None:
    images = blobs(8).float()
    a = random_affine(images, torch.Generator().manual_seed(3))
    b = random_affine(images, torch.Generator().manual_seed(3))
    c = random_affine(images, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the same input image is distorted differently in each slot
    assert all(not torch.equal(a[0], a[i]) for i in range(1, 8))


def test_shifts_stay_within_their_range_and_use_it() -> None:
    shift = 3.0 / 28.0
    images = blobs(200)
    out = random_affine(images, torch.Generator().manual_seed(0), AffineRanges(0.0, 0.0, 0.0, shift))
    moved = centroids(out) - centroids(images)
    assert moved.abs().max() <= 3.0 + 1e-9
    assert moved.abs().max() > 2.5  # the draws reach near the ends of the range
    torch.testing.assert_close(out.sum((-1, -2, -3)), images.sum((-1, -2, -3)), rtol=0, atol=1e-9)  # nothing cut off


def test_pixels_moved_in_from_outside_are_background() -> None:
    # an image inked to its edges: a shift brings background (0), not copies of the edge, into view
    images = torch.ones(20, 1, 28, 28, dtype=torch.float64)
    out = random_affine(images, torch.Generator().manual_seed(0), AffineRanges(0.0, 0.0, 0.0, 3.0 / 28.0))
    lost = images.sum((-1, -2, -3)) - out.sum((-1, -2, -3))
    assert bool((lost > 0).all()) and lost.max() > 28 * 2.5  # up to 3 columns and 3 rows of ink shifted out
    assert out.min() == 0.0


@pytest.mark.parametrize("height, width", [(28, 28), (28, 56), (56, 28)])
def test_rotations_stay_within_their_range_keep_the_ink_and_are_rotations_in_pixels(height: int, width: int) -> None:
    """A bar's principal axis turns by up to the range and no further, and the bar keeps its ink
    and its length. On images that are not square the map was drawn in affine_grid's units, in
    which each axis runs over [-1, 1] whatever its pixels: on a 28x56 image a rotation up to 30
    degrees turned a bar by at most 15 and shortened it."""
    images = torch.zeros(200, 1, height, width, dtype=torch.float64)
    images[..., height // 2 - 1 : height // 2 + 1, width // 2 - 8 : width // 2 + 8] = 1.0  # a horizontal bar, 16 px
    out = random_affine(images, torch.Generator().manual_seed(0), AffineRanges(rotation=30.0, shear=0.0, scale=0.0, shift=0.0))
    torch.testing.assert_close(out.sum((-1, -2, -3)), images.sum((-1, -2, -3)), rtol=0.03, atol=0)
    # the bar's principal axis, from the second moments of its ink, is the rotation angle
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij")
    mass = out.sum((-1, -2, -3))
    c = centroids(out)
    dr, dc = rows - c[:, 0, None, None], cols - c[:, 1, None, None]
    m_rr, m_cc, m_rc = ((out[:, 0] * m).sum((-1, -2)) / mass for m in (dr * dr, dc * dc, dr * dc))
    angle = torch.rad2deg(0.5 * torch.atan2(2 * m_rc, m_cc - m_rr)).abs()
    assert angle.max() <= 30.0 + 1.0 and angle.max() > 25.0
    # the bar keeps its length: the variance of its ink along its long axis (16 px: 21.25 px^2)
    long_axis = 0.5 * (m_rr + m_cc) + torch.sqrt(0.25 * (m_cc - m_rr) ** 2 + m_rc**2)
    torch.testing.assert_close(long_axis, torch.full_like(long_axis, 21.25), rtol=0.03, atol=0)


@pytest.mark.parametrize("bad", [torch.zeros(28, 28), torch.zeros(2, 1, 28, 28, dtype=torch.long)])
def test_bad_images_are_refused(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"random_affine needs floating images \(\.\.\., C, H, W\)"):
        random_affine(bad, torch.Generator())


def test_augment_support_appends_distorted_copies_in_order_with_their_labels() -> None:
    images, labels = torch.rand(4, 1, 28, 28, dtype=torch.float64), torch.tensor([2, 0, 3, 1])
    out, out_labels = augment_support(images, labels, 3, torch.Generator().manual_seed(5))
    assert out.shape == (16, 1, 28, 28) and out.dtype == images.dtype
    assert torch.equal(out[:4], images)
    assert torch.equal(out_labels, labels.repeat(4))
    # copy c of image i is the ((c - 1) * N + i)-th distortion of one random_affine draw
    expected = random_affine(images.repeat(3, 1, 1, 1), torch.Generator().manual_seed(5))
    assert torch.equal(out[4:], expected)
    assert not torch.allclose(out[4:8], images)
    # with zero ranges every copy is its image
    same, _ = augment_support(images, labels, 2, torch.Generator().manual_seed(5), NONE)
    assert torch.allclose(same, images.repeat(3, 1, 1, 1), atol=1e-12)


def test_augment_support_with_no_copies_is_the_identity_and_bad_input_is_named() -> None:
    images, labels = torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
    out, out_labels = augment_support(images, labels, 0, torch.Generator())
    assert out is images and out_labels is labels
    with pytest.raises(ValueError, match="copies must be an integer >= 0, got -1"):
        augment_support(images, labels, -1, torch.Generator())
    with pytest.raises(ValueError, match=r"needs images \(N, C, H, W\) and labels \(N,\)"):
        augment_support(images, labels[:1], 1, torch.Generator())


def drawn_thetas(monkeypatch: pytest.MonkeyPatch, ranges: AffineRanges, n: int = 2000) -> torch.Tensor:
    """The ``(n, 2, 3)`` affine matrices ``random_affine`` hands to ``affine_grid`` for ``n`` images."""
    seen: list[torch.Tensor] = []
    grid = torch.nn.functional.affine_grid

    def spy(theta: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        seen.append(theta.clone())
        return grid(theta, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "affine_grid", spy)
    random_affine(torch.rand(n, 1, 4, 4, dtype=torch.float64), torch.Generator().manual_seed(0), ranges)
    assert len(seen) == 1
    return seen[0]


def assert_independent_uniforms(a: torch.Tensor, b: torch.Tensor, centre: float, half_width: float) -> None:
    """``a`` and ``b`` are uncorrelated draws that fill ``[centre - half_width, centre + half_width]``."""
    for x in (a, b):
        assert (x - centre).abs().max() <= half_width + 1e-12
        assert x.max() > centre + 0.97 * half_width and x.min() < centre - 0.97 * half_width
    assert not torch.equal(a, b)
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 0.1


def test_the_two_shears_are_drawn_independently_over_their_range(monkeypatch: pytest.MonkeyPatch) -> None:
    theta = drawn_thetas(monkeypatch, AffineRanges(rotation=0.0, shear=0.3, scale=0.0, shift=0.0))
    # pure shear: [[1, shear_x, 0], [shear_y, 1, 0]]
    torch.testing.assert_close(theta[:, 0, 0], torch.ones(len(theta), dtype=theta.dtype), rtol=0, atol=1e-12)
    torch.testing.assert_close(theta[:, 1, 1], torch.ones(len(theta), dtype=theta.dtype), rtol=0, atol=1e-12)
    assert_independent_uniforms(theta[:, 0, 1], theta[:, 1, 0], 0.0, 0.3)


def test_the_two_scales_are_drawn_independently_over_their_range(monkeypatch: pytest.MonkeyPatch) -> None:
    theta = drawn_thetas(monkeypatch, AffineRanges(rotation=0.0, shear=0.0, scale=0.2, shift=0.0))
    # pure scale: [[scale_x, 0, 0], [0, scale_y, 0]]
    assert theta[:, 0, 1].abs().max() < 1e-12 and theta[:, 1, 0].abs().max() < 1e-12
    assert_independent_uniforms(theta[:, 0, 0], theta[:, 1, 1], 1.0, 0.2)


@pytest.mark.parametrize("copies", [1.5, True, "2"])
def test_augment_support_refuses_copies_that_are_not_an_integer(copies: object) -> None:
    with pytest.raises(ValueError, match=f"copies must be an integer >= 0, got {copies!r}"):
        augment_support(torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), copies, torch.Generator())


@pytest.mark.parametrize(("field", "value"), [
    ("rotation", float("nan")), ("shear", float("inf")), ("shift", -0.1), ("scale", -0.2), ("rotation", "10"),
    ("scale", True),
])  # fmt: skip
def test_affine_ranges_that_are_not_finite_non_negative_numbers_are_refused(field: str, value: object) -> None:
    # NaN and Inf made every distorted image NaN, silently
    with pytest.raises(ValueError, match=rf"AffineRanges.{field} must be a finite number >= 0, got {value!r}"):
        AffineRanges(**{field: value})


@pytest.mark.parametrize("scale", [1.0, 1.5])
def test_a_scale_range_reaching_zero_is_refused(scale: float) -> None:
    # 1 +- scale could draw a zero (collapsed) or negative (mirrored) scale
    with pytest.raises(ValueError, match=rf"AffineRanges.scale must be < 1 .*got {scale}"):
        AffineRanges(scale=scale)


@pytest.mark.parametrize("shape", [(0, 1, 8, 8), (2, 0, 1, 8, 8), (3, 1, 0, 0)])
def test_a_batch_of_no_image_or_no_pixel_comes_back_as_it_is(shape: tuple[int, ...]) -> None:
    # affine_grid's "Expected non-zero, positive output size", or a reshape error, before
    images, generator = torch.rand(shape), torch.Generator().manual_seed(0)
    out = random_affine(images, generator)
    assert out.shape == images.shape and out is not images
    # advanced by 7 draws per image, as for any batch
    advanced = not torch.equal(generator.get_state(), torch.Generator().manual_seed(0).get_state())
    assert advanced == (math.prod(shape[:-3]) > 0)


def test_ranges_that_are_not_affine_ranges_are_refused() -> None:
    with pytest.raises(TypeError, match="ranges must be an AffineRanges, got dict"):
        random_affine(torch.rand(1, 1, 4, 4), torch.Generator(), {"rotation": 5.0})


@pytest.mark.parametrize("generator", [None, 0, "seed"])
def test_a_generator_that_is_not_a_torch_generator_is_refused_in_one_line(generator: object) -> None:
    """None drew from torch's global generator in silence, so a "seeded" run did not repeat; a
    seed in its place failed in torch.rand with a many-line list of signatures."""
    images, labels = blobs(2), torch.tensor([0, 1])
    message = rf"generator must be a torch\.Generator \(e\.g\. torch\.Generator\(\)\.manual_seed\(0\)\), got {type(generator).__name__}$"
    with pytest.raises(TypeError, match=message):
        random_affine(images, generator)
    with pytest.raises(TypeError, match=message):
        augment_support(images, labels, 1, generator)


@pytest.mark.parametrize("copies", [0, 2])
def test_augment_support_names_images_that_are_not_floating_as_given(copies: int) -> None:
    """uint8 images were refused by random_affine under the shape it had expanded them to
    ((copies, N, C, H, W)), and passed through unchecked with no copy."""
    images, labels = (blobs(2) * 255).to(torch.uint8), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"augment_support needs floating images \(N, C, H, W\), got \(2, 1, 28, 28\) torch\.uint8$"):
        augment_support(images, labels, copies, torch.Generator())
