"""The default model: a small GatedConv2d encoder-decoder trained with L1 losses, and an
optional patch discriminator with a hinge loss.

A *recipe* bundles what the trainer needs from a model:

* ``generator`` (nn.Module) and ``discriminator`` (nn.Module or None);
* ``prepare_input(image, mask)``: the generator's input (DeepFill style: the masked image
  in [-1, 1], a channel of ones, the mask);
* ``generator_losses(image, mask, output, discriminator)`` and
  ``discriminator_losses(image, mask, output, discriminator)``: dicts name -> scalar;
* ``loss_weights``: the weight of every loss name (the trainer sums ``weight * loss``);
* ``composite(image, mask, output)``: ``output * mask + image * (1 - mask)``.

Masks are (B, 1, H, W) with 1 = hole. Every loss is a mean over all elements of the batch
(not normalised by the hole area of the batch), so the loss of a batch is the average of
the losses of its halves: data-parallel training on two halves equals training on the whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.gated_conv import GatedConv2d, GatedDeconv2d
from ..nn.spectral_norm_conv import SpectralNormConv2d
from ._common import merge_loss_weights

__all__ = ["PatchDiscriminator", "TinyGatedGenerator", "TinyGatedRecipe"]


def prepare_input(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) image in [-1, 1] and (B, 1, H, W) mask (1 = hole) -> (B, 5, H, W):
    the image with holes zeroed, a ones channel, the mask."""
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be (B, 3, H, W), got {tuple(image.shape)}")
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] != image.shape[0] or mask.shape[2:] != image.shape[2:]:
        raise ValueError(f"mask must be (B, 1, H, W) matching the image {tuple(image.shape)}, got {tuple(mask.shape)}")
    mask = mask.to(image.dtype)
    return torch.cat([image * (1 - mask), torch.ones_like(mask), mask], dim=1)


def composite(image: torch.Tensor, mask: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """The output inside the hole, the known pixels of ``image`` outside it."""
    mask = mask.to(output.dtype)
    return output * mask + image.to(output.dtype) * (1 - mask)


def pyramid_fill(image: torch.Tensor, known: torch.Tensor, levels: int = 6) -> torch.Tensor:
    """A smooth guess of every hole pixel from the known ones (a push-pull fill): ``image``
    ``(B, C, H, W)`` and ``known`` ``(B, 1, H, W)`` (1 = known) are averaged down ``levels``
    times by 2 (each cell the mean of the known pixels under it), the image's mean known colour
    below the coarsest level; going back up, a pixel keeps its own average where it saw known
    pixels and takes the coarser level's value (bilinear) where it saw none, blended by how much
    of it was known. Known pixels come back unchanged; a fixed number of levels, so the graph is
    the same at any size (exportable)."""
    weight = known.to(image.dtype)
    sums, weights = [image * weight], [weight]
    for _ in range(levels):
        sums.append(F.avg_pool2d(sums[-1], 2, ceil_mode=True))
        weights.append(F.avg_pool2d(weights[-1], 2, ceil_mode=True))
    total = weight.sum(dim=(2, 3), keepdim=True)
    fill = (sums[0].sum(dim=(2, 3), keepdim=True) / total.clamp_min(1e-6)).expand_as(sums[-1])
    for s, w in zip(reversed(sums), reversed(weights)):
        up = F.interpolate(fill, size=s.shape[-2:], mode="bilinear", align_corners=False)
        share = w.clamp(max=1e-2) * 100   # 1 once a hundredth of the cell is known
        fill = share * (s / w.clamp_min(1e-6)) + (1 - share) * up
    return fill


class TinyGatedGenerator(nn.Module):
    """A small DeepFill-style gated encoder-decoder:

    5 -> w (5x5) -> 2w (stride 2) -> 4w (stride 2) -> 4w x3 (dilation 2, 4, 8)
      -> up 2w -> up w -> 3 (tanh)

    Two stride-2 stages and the dilated bottleneck give it a receptive field of about 90
    pixels, so even the middle of a large hole sees known pixels. With ``skips`` (U-Net
    style) each upsampling stage also takes the encoder's features of its resolution
    (concatenated), so the decoder sees the full-resolution detail around the hole instead of
    rebuilding it from the quarter-resolution bottleneck. With ``prefill`` the hole is first
    filled by :func:`pyramid_fill` (a smooth guess) and the network adds a correction to that
    guess, starting from zero (its last layer's feature half zeroed), instead of drawing the
    hole from scratch. Input sides must be multiples of 4."""

    multiple = 4

    def __init__(self, width: int = 16, in_channels: int = 5, skips: bool = True, prefill: bool = False):
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int, got {width!r}")
        for name, value in (("skips", skips), ("prefill", prefill)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")
        if prefill and in_channels != 5:
            raise ValueError("prefill needs the 5-channel input (masked image, ones, mask), "
                             f"got in_channels={in_channels}")
        w, k = width, 2 if skips else 1
        self.skips, self.prefill = skips, prefill
        self.body = nn.Sequential(
            GatedConv2d(in_channels, w, 5),
            GatedConv2d(w, 2 * w, 3, stride=2),
            GatedConv2d(2 * w, 4 * w, 3, stride=2),
            GatedConv2d(4 * w, 4 * w, 3, dilation=2),
            GatedConv2d(4 * w, 4 * w, 3, dilation=4),
            GatedConv2d(4 * w, 4 * w, 3, dilation=8),
            GatedDeconv2d(4 * w, 2 * w, 3),
            GatedDeconv2d(k * 2 * w, w, 3),
            GatedConv2d(k * w, 3, 3, activation="none"),
        )
        if prefill:   # the correction starts at zero: the untrained network returns the smooth guess
            with torch.no_grad():
                last = self.body[-1]
                last.weight[:3].zero_()
                last.bias[:3].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.multiple or x.shape[-2] % self.multiple:
            raise ValueError(f"TinyGatedGenerator needs height and width that are multiples of {self.multiple}, "
                             f"got {tuple(x.shape[-2:])}")
        if self.prefill:
            mask = x[:, 4:5]
            coarse = pyramid_fill(x[:, :3], 1 - mask)
            x = torch.cat([coarse, x[:, 3:]], dim=1)
        if not self.skips:
            y = self.body(x)
        else:
            b = self.body
            full = b[0](x)
            half = b[1](full)
            y = b[5](b[4](b[3](b[2](half))))
            y = b[7](torch.cat([b[6](y), half], dim=1))
            y = b[8](torch.cat([y, full], dim=1))
        if self.prefill:   # a correction of the smooth guess, kept in [-1, 1]
            return (coarse + y).clamp(-1, 1)
        return torch.tanh(y)


class PatchDiscriminator(nn.Module):
    """A small PatchGAN critic on (image, mask): a map of real/fake scores."""

    def __init__(self, width: int = 32, in_channels: int = 4):
        super().__init__()
        w = width
        self.body = nn.Sequential(   # torch's spectral_norm parametrization, output-scaled
            SpectralNormConv2d(in_channels, w, 4, 2, 1), nn.LeakyReLU(0.2),
            SpectralNormConv2d(w, 2 * w, 4, 2, 1), nn.LeakyReLU(0.2),
            SpectralNormConv2d(2 * w, 1, 3, 1, 1),
        )

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.body(torch.cat([image, mask.to(image.dtype)], dim=1))


class TinyGatedRecipe:
    """The ``tiny_gated`` model. ``loss_weights`` overrides the defaults
    ``{"l1_hole": 1.0, "l1_valid": 1.0, "adv": 0.0}``; ``adv > 0`` adds the discriminator.
    ``skips`` and ``prefill`` are :class:`TinyGatedGenerator`'s (U-Net skips on by default)."""

    name = "tiny_gated"
    size_multiple = TinyGatedGenerator.multiple  # inputs are padded to it for inference
    default_weights = {"l1_hole": 1.0, "l1_valid": 1.0, "adv": 0.0}
    # Adam settings the trainer uses unless the config sets lr / betas. A network this
    # small trains fastest at a larger step than the 1e-4 of the published GANs.
    default_lr = 2e-3
    default_betas = (0.5, 0.999)
    default_size, default_batch_size, default_mask = 64, 4, "free_form"   # the demo setting
    # The main job's schedule (README, "What the main job was tuned on"): 3500 steps whose
    # learning rates fall along a half cosine, validated on every held-out demo crop (9 x 4).
    default_steps, default_lr_schedule, default_val_batches = 3500, "cosine", 9

    def __init__(self, width: int = 16, disc_width: int = 32, loss_weights: dict | None = None, skips: bool = True,
                 prefill: bool = False):
        weights = merge_loss_weights(self.name, self.default_weights, loss_weights)
        self.loss_weights = weights
        self.generator = TinyGatedGenerator(width, skips=skips, prefill=prefill)
        self.discriminator = PatchDiscriminator(disc_width) if weights["adv"] > 0 else None

    prepare_input = staticmethod(prepare_input)
    composite = staticmethod(composite)

    #: :meth:`inference_memory`'s constants: bytes, and bytes per pixel and unit of width
    memory_base, memory_per_pixel_width = 128 * 2**20, 36.0   # skips on: measured 210, 630-658, 1259 MB at 512, 1024, 1536

    def inference_memory(self, height: int, width: int) -> int:
        """Bytes the generator's eval-mode forward (no gradients, float32, batch 1, CPU) adds
        to the process's resident memory for a ``height x width`` input: ``memory_base +
        memory_per_pixel_width * width * H * W``, fitted to measured peaks."""
        return int(self.memory_base + self.memory_per_pixel_width * self.generator.body[0].out_channels
                   * height * width)

    def generator_losses(self, image, mask, output, discriminator=None) -> dict[str, torch.Tensor]:
        output = output.float()
        image = image.float()
        mask = mask.float()
        diff = (output - image).abs()
        losses = {"l1_hole": (diff * mask).mean(), "l1_valid": (diff * (1 - mask)).mean()}
        if discriminator is not None and self.loss_weights["adv"] > 0:
            fake = composite(image, mask, output)
            losses["adv"] = -discriminator(fake, mask).float().mean()
        return losses

    def discriminator_losses(self, image, mask, output, discriminator) -> dict[str, torch.Tensor]:
        """Hinge loss; real and fake go through the discriminator in one batch."""
        fake = composite(image, mask, output.detach())
        scores = discriminator(torch.cat([image.to(fake.dtype), fake]), torch.cat([mask, mask])).float()
        real_s, fake_s = scores.chunk(2)
        return {"d_real": F.relu(1 - real_s).mean(), "d_fake": F.relu(1 + fake_s).mean()}
