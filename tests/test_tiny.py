"""The default model's options: U-Net skips and the pyramid pre-fill."""

import pytest
import torch

from fastinpaint.models import build_model
from fastinpaint.models.tiny import TinyGatedGenerator, prepare_input, pyramid_fill


def _batch(h=36, w=44, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(2, 3, h, w, generator=g) * 2 - 1
    mask = (torch.rand(2, 1, h, w, generator=g) < 0.3).float()
    mask[0, :, 4:30, 6:40] = 1          # a large hole: its middle is far from every known pixel
    return image, mask


def test_pyramid_fill_keeps_known_pixels_and_fills_holes_within_their_range():
    image, mask = _batch()
    fill = pyramid_fill(image, 1 - mask)
    known = mask == 0
    assert torch.equal(fill.masked_select(known.expand_as(fill)), image.masked_select(known.expand_as(image)))
    assert fill.isfinite().all()
    # every fill value is an average of known values, so within their range, per image and channel
    for b in range(2):
        vals = image[b][:, known[b, 0]]
        lo, hi = vals.min(dim=1).values, vals.max(dim=1).values
        assert (fill[b] >= lo[:, None, None] - 1e-5).all() and (fill[b] <= hi[:, None, None] + 1e-5).all()


def test_pyramid_fill_of_a_constant_image_is_that_constant():
    image, mask = _batch(31, 17)   # odd sides: ceil-mode pooling
    image = torch.full_like(image, 0.25)
    assert torch.allclose(pyramid_fill(image, 1 - mask), image, atol=1e-6)


def test_pyramid_fill_is_close_to_known_neighbours():
    """A smooth ramp: a one-pixel hole is filled with about its neighbours' value."""
    h, w = 32, 32
    ramp = torch.linspace(-1, 1, w).expand(1, 3, h, w).clone()
    mask = torch.zeros(1, 1, h, w)
    mask[0, 0, 16, 16] = 1
    fill = pyramid_fill(ramp, 1 - mask)
    assert abs(fill[0, 0, 16, 16] - ramp[0, 0, 16, 16]) < 2 * (2 / (w - 1))


@pytest.mark.parametrize("skips", [False, True])
@pytest.mark.parametrize("prefill", [False, True])
def test_generator_options_forward_backward(skips, prefill):
    image, mask = _batch(36, 44)
    g = TinyGatedGenerator(8, skips=skips, prefill=prefill)
    out = g(prepare_input(image, mask))
    assert out.shape == image.shape and out.abs().max() <= 1
    out.sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in g.parameters())
    if prefill:   # untrained, the network returns the smooth guess (clamped to [-1, 1])
        assert torch.allclose(out, pyramid_fill(image, 1 - mask).clamp(-1, 1), atol=1e-6)


def test_bad_options_name_themselves():
    with pytest.raises(ValueError, match="skips"):
        TinyGatedGenerator(8, skips="yes")
    with pytest.raises(ValueError, match="prefill"):
        TinyGatedGenerator(8, prefill=1)


def test_recipe_defaults_are_the_main_jobs():
    recipe = build_model("tiny_gated")
    assert recipe.generator.skips and not recipe.generator.prefill
    assert recipe.default_lr_schedule == "cosine" and recipe.default_steps >= 2000
