"""Distillation-Guided Image Inpainting (Suin, Purohit, Rajagopalan, ICCV 2021) as a recipe.

Two networks of one architecture: the inpainting network (IN) sees the masked image, the
auxiliary network (AN) the complete image. IN learns to reconstruct the hole and, from AN,
(1) its encoder features through a meta network gamma (encoder-feature distillation), (2)
its decoder attention's affinity rows over the hole pixels, each row weighted by a meta
network t (attention transfer, the flash-style op of fastinpaint); inside IN (3) each encoder
level predicts the next through f_l with non-negative channel weights phi (self-distillation).

Architecture (width w; sides multiples of 4):

    encoder    5 -> w (5x5, e1) -> 2w (stride 2, e2) -> 4w (stride 2, e3)        gated convs
    completion three residual gated convs at 4w, dilation 2, 4, 8
    decoder    MatmulAttention(4w) over all H/4 x W/4 pixels (q, k at w/2), a pixel-adaptive
               global-local fusion  a * attention + (1 - a) * completion,  a = sigmoid(conv1x1),
               then up 2w (+ e2) -> up w (+ e1) -> 3 (tanh)

Choices where the paper is silent or we simplify (written here as the issue asks):
- AN and IN are trained jointly (AN by its own L1 reconstruction of the complete image);
  every distillation target from AN is detached, so IN never pulls AN towards itself.
- No key mask in the attention: both networks attend over all pixels, as the transfer
  loss's affinities do; the transfer loss's rows are the hole pixels at the attention's
  resolution (a pixel is a hole pixel if any of its 4x4 input pixels is).
- t reads IN's decoder features at the attention's input, normalised to mean 1 over the
  hole (AttentionTransferLoss); gamma is conv-LeakyReLU-conv per level.
- No adversarial loss (the recipe has no discriminator); losses are L1 in and outside the
  hole, AN's L1, and the three distillation terms with the weights in ``default_weights``.
- The completion block is the residual dilated stack above; the paper's exact block and
  fusion layers are not reproduced.

The generator's input is ``prepare_input(image, mask)``: the masked image, a ones channel,
the mask and, for AN, the complete image (8 channels). In training mode it returns
``(output, aux)``, aux a dict of the distillation losses (computed inside forward, so every
parameter is used in forward, as DDP requires); in eval mode IN's output alone (AN is not
run, and the complete-image channels are ignored).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..losses.distillation import AttentionTransferLoss, EncoderDistillationLoss, SelfDistillationLoss
from ..nn.gated_conv import GatedConv2d, GatedDeconv2d
from ..nn.matmul_attention import MatmulAttention
from ._common import merge_loss_weights
from .tiny import composite as _composite

__all__ = ["DGIIGenerator", "DGIINetwork", "DGIIRecipe"]


class DGIINetwork(nn.Module):
    """One network (IN or AN): encoder, completion block, attention decoder.

    ``forward(x)`` -> ``(image, feats)``: feats holds the encoder levels ``enc`` [e1, e2, e3],
    the attention's ``qk`` pair and its input ``dec`` (for the meta network t)."""

    multiple = 4

    def __init__(self, width: int = 16, in_channels: int = 5):
        super().__init__()
        w = width
        self.e1 = GatedConv2d(in_channels, w, 5)
        self.e2 = GatedConv2d(w, 2 * w, 3, stride=2)
        self.e3 = GatedConv2d(2 * w, 4 * w, 3, stride=2)
        self.complete = nn.ModuleList(GatedConv2d(4 * w, 4 * w, 3, dilation=d) for d in (2, 4, 8))
        self.attention = MatmulAttention(4 * w, qk_channels=max(1, w // 2))
        self.fuse = nn.Conv2d(8 * w, 1, 1)
        self.d2 = GatedDeconv2d(4 * w, 2 * w, 3)
        self.d1 = GatedDeconv2d(4 * w, w, 3)
        self.out = GatedConv2d(2 * w, 3, 3, activation="none")

    def forward(self, x: torch.Tensor):
        if x.shape[-1] % self.multiple or x.shape[-2] % self.multiple:
            raise ValueError(f"DGII needs height and width that are multiples of {self.multiple}, "
                             f"got {tuple(x.shape[-2:])}")
        e1 = self.e1(x)
        e2 = self.e2(e1)
        e3 = self.e3(e2)
        h = e3
        for block in self.complete:
            h = h + block(h)
        g, qk = self.attention(h, return_qk=True)
        a = torch.sigmoid(self.fuse(torch.cat([g, h], dim=1)))
        d = a * g + (1 - a) * h
        d = self.d2(d)
        d = self.d1(torch.cat([d, e2], dim=1))
        y = torch.tanh(self.out(torch.cat([d, e1], dim=1)))
        return y, {"enc": [e1, e2, e3], "qk": qk, "dec": h}


class DGIIGenerator(nn.Module):
    """IN, AN and the distillation losses' meta networks (so one optimiser trains them all)."""

    multiple = DGIINetwork.multiple

    def __init__(self, width: int = 16, distance: str = "l2"):
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 2:
            raise ValueError(f"width must be an int >= 2, got {width!r}")
        w = width
        self.inpainter = DGIINetwork(w)
        self.auxiliary = DGIINetwork(w)
        self.encoder_distill = EncoderDistillationLoss([w, 2 * w, 4 * w])
        self.self_distill = SelfDistillationLoss([w, 2 * w, 4 * w])
        self.attention_transfer = AttentionTransferLoss(4 * w, distance=distance,
                                                        scale=self.inpainter.attention.scale)

    def forward(self, x: torch.Tensor):
        if x.dim() != 4 or x.shape[1] not in (5, 8):
            raise ValueError(f"x must be (B, 8, H, W) from prepare_input (or (B, 5, H, W) for inference), "
                             f"got {tuple(x.shape)}")
        y, feats = self.inpainter(x[:, :5])
        if not self.training:
            return y
        if x.shape[1] != 8:
            raise ValueError("training needs the complete image: x must be (B, 8, H, W) from prepare_input")
        full, mask = x[:, 5:], x[:, 4:5]
        y_an, feats_an = self.auxiliary(torch.cat([full, torch.ones_like(mask), torch.zeros_like(mask)], dim=1))
        hole = F.max_pool2d(mask, 4) > 0.5  # hole pixels at the attention's resolution
        aux = {
            "an_l1": (y_an.float() - full.float()).abs().mean(),
            "enc_distill": self.encoder_distill(feats["enc"], feats_an["enc"]),
            "self_distill": self.self_distill(feats["enc"]),
            "attn_transfer": self.attention_transfer(
                feats["qk"], tuple(t.detach() for t in feats_an["qk"]), hole, features=feats["dec"]),
        }
        return y, aux


def prepare_input(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, 8, H, W): masked image, ones, mask (1 = hole), complete image."""
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be (B, 3, H, W), got {tuple(image.shape)}")
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] != image.shape[0] or mask.shape[2:] != image.shape[2:]:
        raise ValueError(f"mask must be (B, 1, H, W) matching the image {tuple(image.shape)}, got {tuple(mask.shape)}")
    mask = mask.to(image.dtype)
    return torch.cat([image * (1 - mask), torch.ones_like(mask), mask, image], dim=1)


def final_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class DGIIRecipe:
    """The ``dgii`` model. Options: ``width`` (16), ``distance`` ("l2" or "l1", the attention
    transfer's), ``loss_weights`` over ``default_weights``."""

    name = "dgii"
    size_multiple = DGIIGenerator.multiple
    default_weights = {"l1_hole": 1.0, "l1_valid": 1.0, "an_l1": 1.0, "enc_distill": 0.1, "self_distill": 0.1,
                       "attn_transfer": 1.0}
    default_lr = 1e-3
    default_betas = (0.5, 0.999)

    def __init__(self, width: int = 16, distance: str = "l2", loss_weights: dict | None = None):
        weights = merge_loss_weights(self.name, self.default_weights, loss_weights)
        self.loss_weights = weights
        self.generator = DGIIGenerator(width, distance)
        self.discriminator = None

    prepare_input = staticmethod(prepare_input)
    final_output = staticmethod(final_output)

    #: :meth:`inference_memory`'s constants: bytes, and bytes per pixel and unit of width
    memory_base, memory_per_pixel_width = 96 * 2**20, 49.0

    def inference_memory(self, height: int, width: int) -> int:
        """Bytes the eval-mode forward (the inpainting network alone; no gradients, float32,
        batch 1, CPU) adds to the process's resident memory for a ``height x width`` input:
        ``memory_base + memory_per_pixel_width * width * H * W`` (the attention's kernels hold
        no N x N map), fitted to measured peaks."""
        return int(self.memory_base + self.memory_per_pixel_width * self.generator.inpainter.e1.out_channels
                   * height * width)

    @staticmethod
    def composite(image, mask, output) -> torch.Tensor:
        return _composite(image, mask, final_output(output))

    def generator_losses(self, image, mask, output, discriminator=None) -> dict[str, torch.Tensor]:
        aux = output[1] if isinstance(output, (tuple, list)) else {}
        y = final_output(output).float()
        image, mask = image.float(), mask.float()
        diff = (y - image).abs()
        losses = {"l1_hole": (diff * mask).mean(), "l1_valid": (diff * (1 - mask)).mean()}
        losses.update({k: v.float() for k, v in aux.items()})
        return losses

    def discriminator_losses(self, image, mask, output, discriminator) -> dict[str, torch.Tensor]:
        raise RuntimeError("the dgii recipe has no discriminator")
