"""Context Encoders (Pathak, Krahenbuhl, Donahue, Darrell, Efros, CVPR 2016) as recipes
for the trainer (the interface of :mod:`fastinpaint.models.tiny`).

Inpainting (``context_encoder``), for ``image_size`` x ``image_size`` inputs in [-1, 1]
(128 published; any multiple of 32):

* Input: the image with its hole filled with the training set's mean colour
  (117, 104, 123)/255 mapped to [-1, 1], as published (``prepare_input``).
* Encoder: conv 4x4 s2 p1 3 -> w, LeakyReLU 0.2; then w -> w, w -> 2w, 2w -> 4w,
  4w -> 8w, each conv 4x4 s2 p1 + batch norm + LeakyReLU 0.2 (w = ``width``, 64
  published: 512 maps of 4x4 at 128).
* Bottleneck: the paper's channel-wise fully connected layer
  (:class:`fastinpaint.nn.ChannelWiseFC`: each of the 8w maps of n x n, n =
  image_size/32, through its own n^2 x n^2 matrix, LeakyReLU 0.2, dropout, then the
  stride-1 1x1 convolution that mixes channels), then batch norm + ReLU.
  ``bottleneck="conv"`` gives the released code's 4x4 conv to ``code`` units (4000)
  and its 4x4 full convolution back instead.
* Decoder: up-convolutions (transposed conv 4x4 s2 p1) 8w -> 4w -> 2w -> w, each batch
  norm + ReLU, then to 3 channels and tanh.

``output="center"`` (the paper's central-square setting, with the ``center`` mask): the
decoder predicts the central (image_size/2)^2 square (hole plus the 4-pixel overlap
band), 64x64 for 128x128. The generator pastes it into the centre of its input, so it
returns a full-size image as the trainer, ``fastinpaint inpaint`` and the metrics
expect: outside the centre square the output is the input image, and ``composite``
keeps the known pixels (the overlap band included) anyway. The reconstruction loss is
the mean over the centre square of ``weight * (output - image)^2`` with weight 1 on the
hole and 10 on the rest of the square (the overlap band: with the ``center`` mask
exactly :meth:`CenterMask.loss_weights`). Holes outside the centre square are not
predicted in this mode (they keep the mean colour): use ``output="full"`` for other masks.

Sizes: the network has a fixed resolution (``image_size``; its channel-wise FC layer
holds one matrix per map of fixed size). Inputs of another size are resampled
(bilinear) to it and the prediction back, so training at another ``size`` and
``fastinpaint inpaint`` on any image work; the published setting is 128 = image_size.

``output="full"`` (random block / random region masks): one more up-convolution
(w -> w) so that the decoder predicts the whole image; the reconstruction loss is the
mean over the image of ``weight * (output - image)^2`` with weight 1 on the hole, 10 on
the known pixels within ``overlap`` (4) pixels of the hole, 0 elsewhere.

Adversarial loss: the discriminator (conv 4x4 s2 p1 3 -> w, LeakyReLU; w -> 2w -> 4w ->
8w with batch norm + LeakyReLU; conv 4x4 8w -> 1) scores the predicted region (the
centre square, or the whole composite image) with a sigmoid / binary cross-entropy
(computed from logits). Total generator loss = 0.999 * rec + 0.001 * adv (lambda_rec,
lambda_adv). Adam beta1 0.5; the published learning rates are 2e-4 for the
discriminator and 10x that, 2e-3, for the generator (``default_lr`` and
``default_lr_discriminator``). Weights N(0, 0.02), batch-norm gamma N(1, 0.02).

Feature learning (``context_encoder_features``): an AlexNet-style encoder (conv 11x11
s4 -> pool -> conv 5x5 -> pool -> 3 convs 3x3 -> pool5: 6x6x256 at 227x227), the
channel-wise FC (dropout 0.5), a decoder of five up-convolutions with ReLU (6 -> 192,
then resized to the input), trained with the reconstruction loss only on random-region
holes (the paper's arbitrary-region dropout; use ``mask = "region"``).
``recipe.export_backbone()`` / ``generator.backbone()`` give the trained encoder
(conv1 .. pool5) to fine-tune for classification, detection or segmentation.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.channel_fc import ChannelWiseFC
from ._common import known_same_size, merge_loss_weights

__all__ = ["ContextEncoderGenerator", "ContextEncoderDiscriminator", "ContextEncoderRecipe",
           "AlexNetEncoder", "ContextEncoderFeatureGenerator", "ContextEncoderFeaturesRecipe", "MEAN_FILL"]

# The training set's mean colour the published code writes into the hole, in [-1, 1].
MEAN_FILL = tuple(2.0 * c / 255.0 - 1.0 for c in (117.0, 104.0, 123.0))


def _check_image_mask(image: torch.Tensor, mask: torch.Tensor) -> None:
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be (B, 3, H, W), got {tuple(image.shape)}")
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] != image.shape[0] or mask.shape[2:] != image.shape[2:]:
        raise ValueError(f"mask must be (B, 1, H, W) matching the image {tuple(image.shape)}, got {tuple(mask.shape)}")


def prepare_input(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) image in [-1, 1], (B, 1, H, W) mask (1 = hole) -> the image with the
    hole filled with the published mean colour (what the network sees)."""
    _check_image_mask(image, mask)
    mask = mask.to(image.dtype)
    fill = torch.tensor(MEAN_FILL, dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
    return image * (1 - mask) + fill * mask


def composite(image: torch.Tensor, mask: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """The output inside the hole, the known pixels of ``image`` outside it."""
    mask = mask.to(output.dtype)
    return output * mask + image.to(output.dtype) * (1 - mask)


def init_weights(module: nn.Module) -> None:
    """The published initialisation: conv / channel-wise FC weights N(0, 0.02), batch-norm
    gamma N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, ChannelWiseFC):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _down(cin: int, cout: int, bn: bool = True) -> list:
    layers = [nn.Conv2d(cin, cout, 4, 2, 1, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.LeakyReLU(0.2, inplace=True))
    return layers


def _up(cin: int, cout: int) -> list:
    return [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class ContextEncoderGenerator(nn.Module):
    """The Context Encoder for inpainting (see the module docstring). Takes the
    mean-filled image (B, 3, image_size, image_size) and returns a full-size image."""

    def __init__(self, image_size: int = 128, width: int = 64, bottleneck: str = "channel_fc",
                 output: str = "center", dropout: float = 0.0, code: int = 4000):
        super().__init__()
        image_size, width = _positive_int("image_size", image_size), _positive_int("width", width)
        if image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32 (five stride-2 stages), got {image_size}")
        if bottleneck not in ("channel_fc", "conv"):
            raise ValueError(f"bottleneck must be 'channel_fc' or 'conv', got {bottleneck!r}")
        if output not in ("center", "full"):
            raise ValueError(f"output must be 'center' or 'full', got {output!r}")
        self.image_size, self.output = image_size, output
        w = width
        n = image_size // 32
        self.encoder = nn.Sequential(*_down(3, w, bn=False), *_down(w, w), *_down(w, 2 * w), *_down(2 * w, 4 * w),
                                     *_down(4 * w, 8 * w))
        if bottleneck == "channel_fc":
            self.bottleneck = nn.Sequential(
                ChannelWiseFC(8 * w, n, n, activation="leaky_relu", negative_slope=0.2, dropout=dropout),
                nn.BatchNorm2d(8 * w), nn.ReLU(inplace=True))
        else:  # the released code: n x n conv to a code vector, n x n full conv back
            self.bottleneck = nn.Sequential(
                nn.Conv2d(8 * w, code, n, bias=False), nn.BatchNorm2d(code), nn.LeakyReLU(0.2, inplace=True),
                nn.ConvTranspose2d(code, 8 * w, n, bias=False), nn.BatchNorm2d(8 * w), nn.ReLU(inplace=True))
        ups = [*_up(8 * w, 4 * w), *_up(4 * w, 2 * w), *_up(2 * w, w)]
        if output == "full":
            ups += _up(w, w)
        self.decoder = nn.Sequential(*ups, nn.ConvTranspose2d(w, 3, 4, 2, 1), nn.Tanh())
        init_weights(self)

    @staticmethod
    def center_box(size: int) -> tuple[int, int]:
        """(start, stop) of the centre square along an axis of ``size`` pixels: half of it,
        centred, as :class:`~fastinpaint.data.masks.CenterMask` places it."""
        half = (size + 1) // 2
        start = (size - half) // 2
        return start, start + half

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The decoder's output for an (image_size x image_size) input: the centre square
        (``output="center"``) or the whole image."""
        return self.decoder(self.bottleneck(self.encoder(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"the Context Encoder takes (B, 3, H, W) inputs, got {tuple(x.shape)}")
        H, W = x.shape[2], x.shape[3]
        S = self.image_size
        resample = not known_same_size((H, W), (S, S))
        # the network works at its fixed resolution (its channel-wise FC layer has a fixed
        # map size): other sizes are resampled to it and the prediction back
        pred = self.predict(F.interpolate(x, size=(S, S), mode="bilinear", align_corners=False) if resample else x)
        if self.output == "full":
            return F.interpolate(pred, size=(H, W), mode="bilinear", align_corners=False) if resample else pred
        r0, r1 = self.center_box(H)
        c0, c1 = self.center_box(W)
        if not known_same_size(pred.shape[2:], (r1 - r0, c1 - c0)):
            pred = F.interpolate(pred, size=(r1 - r0, c1 - c0), mode="bilinear", align_corners=False)
        # the prediction pasted into the centre square: padded to the image's size and picked by the
        # box, not sliced in, so that torch.export needs no guard on the box's bounds
        placed = F.pad(pred.to(x.dtype), (c0, W - c1, r0, H - r1))
        rows, cols = torch.arange(H, device=x.device), torch.arange(W, device=x.device)
        box = ((rows >= r0) & (rows < r1))[:, None] & ((cols >= c0) & (cols < c1))[None, :]
        return torch.where(box, placed, x)


class ContextEncoderDiscriminator(nn.Module):
    """Published adversary: conv 4x4 s2 p1 3 -> w LReLU; w -> 2w -> 4w -> 8w with BN + LReLU;
    conv 4x4 8w -> 1. Returns logits (one for a 64x64 input, a map for larger ones).
    ``input_size`` below 64 shrinks the last kernel to the (input_size/16)^2 map left."""

    def __init__(self, width: int = 64, input_size: int = 64):
        super().__init__()
        w = _positive_int("width", width)
        input_size = _positive_int("input_size", input_size)
        if input_size < 16:
            raise ValueError(f"input_size must be at least 16 (four stride-2 stages), got {input_size}")
        k = min(4, input_size // 16)
        self.body = nn.Sequential(*_down(3, w, bn=False), *_down(w, 2 * w), *_down(2 * w, 4 * w),
                                  *_down(4 * w, 8 * w), nn.Conv2d(8 * w, 1, k))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    logits = logits.float()
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


class _Recipe:
    """Shared weight handling and memory estimate."""

    default_weights: dict = {}
    name = "?"
    #: :meth:`inference_memory`'s constants: bytes (at ``default_size`` and the width
    #: ``memory_width``), and bytes per input pixel
    memory_base, memory_width, memory_per_pixel = 40 * 2**20, 64, 52.0

    def _weights(self, loss_weights):
        return merge_loss_weights(self.name, self.default_weights, loss_weights)

    def inference_memory(self, height: int, width: int) -> int:
        """Bytes the generator's eval-mode forward (no gradients, float32, batch 1, CPU) adds
        to the process's resident memory for a ``height x width`` input: the network runs at
        its fixed ``image_size``, so ``memory_base`` (at the default size and width) plus
        ``memory_per_pixel`` for the input, its resampling and the full-size output; fitted to
        measured peaks. Another ``image_size`` or ``width`` scales the base by the activations'
        ratio."""
        scale = (self.image_size / self.default_size) ** 2 * self.width / self.memory_width
        return int(self.memory_base * max(1.0, scale) + self.memory_per_pixel * height * width)

    composite = staticmethod(composite)


class ContextEncoderRecipe(_Recipe):
    """The ``context_encoder`` model (inpainting). Options: ``image_size`` (128), ``width``
    (64), ``disc_width`` (64), ``bottleneck`` ("channel_fc" | "conv"), ``output``
    ("center" with the ``center`` mask | "full" with block / region masks), ``dropout``,
    ``overlap`` (4: the overlap band, weighted ``overlap_weight`` = 10 in the L2 loss).
    Losses: ``rec`` (0.999) and ``adv`` (0.001); ``adv = 0`` trains without the
    discriminator."""

    name = "context_encoder"
    default_weights = {"rec": 0.999, "adv": 0.001}
    # Adam as published: beta1 0.5; lr 2e-3 for the generator (10x the discriminator's
    # when 0 < lambda_rec < 1) and 2e-4 for the discriminator.
    default_lr = 2e-3
    default_lr_discriminator = 2e-4
    default_betas = (0.5, 0.999)

    def __init__(self, image_size: int = 128, width: int = 64, disc_width: int = 64, bottleneck: str = "channel_fc",
                 output: str = "center", dropout: float = 0.0, overlap: int = 4, overlap_weight: float = 10.0,
                 loss_weights: dict | None = None):
        self.loss_weights = self._weights(loss_weights)
        self.generator = ContextEncoderGenerator(image_size, width, bottleneck, output, dropout)
        self._d_size = image_size // 2 if output == "center" else image_size
        self.discriminator = (ContextEncoderDiscriminator(disc_width, self._d_size) if self.loss_weights["adv"] > 0
                              else None)
        self.image_size, self.output, self.width = image_size, output, width
        if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
            raise ValueError(f"overlap must be an int >= 0, got {overlap!r}")
        if not float(overlap_weight) >= 0:
            raise ValueError(f"overlap_weight must be >= 0, got {overlap_weight!r}")
        self.overlap, self.overlap_weight = overlap, float(overlap_weight)

    size_multiple = 1  # any size: the generator resamples to image_size and back
    # the published setting, for a trainer that takes data defaults from the recipe
    default_size = 128
    default_mask = "center"
    default_mask_options = {"image": 128, "hole": 64, "overlap": 4}

    prepare_input = staticmethod(prepare_input)

    def _region(self, t: torch.Tensor) -> torch.Tensor:
        """The part of a full-size image the decoder predicts."""
        if self.output == "full":
            return t
        r0, r1 = ContextEncoderGenerator.center_box(t.shape[-2])
        c0, c1 = ContextEncoderGenerator.center_box(t.shape[-1])
        return t[..., r0:r1, c0:c1]

    def rec_weights(self, mask: torch.Tensor) -> torch.Tensor:
        """Per-pixel L2 weights over the predicted region: 1 on the hole, ``overlap_weight``
        on the overlap band. Centre: the band is the rest of the centre square (the
        published 4-pixel band with the ``center`` mask); full: the known pixels within
        ``overlap`` pixels of the hole. 0 elsewhere."""
        mask = mask.float()
        if self.output == "center":
            m = self._region(mask)
            return m + self.overlap_weight * (1 - m)
        k = 2 * self.overlap + 1
        band = (F.max_pool2d(mask, k, 1, self.overlap) - mask) if self.overlap > 0 else torch.zeros_like(mask)
        return mask + self.overlap_weight * band

    def _d_input(self, t: torch.Tensor) -> torch.Tensor:
        """The discriminator's input: the predicted region, at the size it was built for."""
        t = self._region(t)
        if tuple(t.shape[2:]) != (self._d_size, self._d_size):
            t = F.interpolate(t, size=(self._d_size, self._d_size), mode="bilinear", align_corners=False)
        return t

    def generator_losses(self, image, mask, output, discriminator=None) -> dict[str, torch.Tensor]:
        image, mask, output = image.float(), mask.float(), output.float()
        weights = self.rec_weights(mask)
        diff = self._region(output) - self._region(image)
        losses = {"rec": (weights * diff.square()).mean()}
        if discriminator is not None and self.loss_weights["adv"] > 0:
            fake = self._d_input(composite(image, mask, output) if self.output == "full" else output)
            losses["adv"] = _bce(discriminator(fake), 1.0)
        return losses

    def discriminator_losses(self, image, mask, output, discriminator) -> dict[str, torch.Tensor]:
        """Binary cross-entropy; real and fake regions go through the discriminator in one batch."""
        output = output.detach()
        fake = self._d_input(composite(image, mask, output) if self.output == "full" else output)
        scores = discriminator(torch.cat([self._d_input(image).to(fake.dtype), fake]))
        real_s, fake_s = scores.chunk(2)
        return {"d_real": _bce(real_s, 1.0), "d_fake": _bce(fake_s, 0.0)}


# ----------------------------------------------------------------------------- feature learning

class AlexNetEncoder(nn.Module):
    """AlexNet's convolutional trunk (conv1 .. pool5; no LRN), channels scaled by
    ``width`` / 96: 227x227 -> 6x6x256 at width 96."""

    def __init__(self, width: int = 96):
        super().__init__()
        w = _positive_int("width", width)
        c1, c2, c3, c5 = w, w * 256 // 96, w * 384 // 96, w * 256 // 96
        self.out_channels = c5
        self.features = nn.Sequential(
            nn.Conv2d(3, c1, 11, 4), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c3, c3, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c3, c5, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2))

    @staticmethod
    def output_size(size: int) -> int:
        s = (size - 11) // 4 + 1
        for _ in range(3):
            s = (s - 3) // 2 + 1
        return s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class ContextEncoderFeatureGenerator(nn.Module):
    """Feature-learning Context Encoder: AlexNet encoder, channel-wise FC, five
    up-convolutions with ReLU, resized to the input; returns the full-size prediction."""

    def __init__(self, image_size: int = 227, width: int = 96, dropout: float = 0.5):
        super().__init__()
        image_size = _positive_int("image_size", image_size)
        n = AlexNetEncoder.output_size(image_size)
        if n < 1:
            raise ValueError(f"image_size {image_size} is too small for the AlexNet encoder (at least 67)")
        self.image_size = image_size
        self.encoder = AlexNetEncoder(width)
        c = self.encoder.out_channels
        self.bottleneck = ChannelWiseFC(c, n, n, activation="relu", dropout=dropout)
        chans = [c, c // 2, c // 4, c // 8, max(c // 16, 8)]
        ups = []
        for cin, cout in zip(chans, chans[1:]):
            ups += [nn.ConvTranspose2d(cin, cout, 4, 2, 1), nn.ReLU(inplace=True)]
        self.decoder = nn.Sequential(*ups, nn.ConvTranspose2d(chans[-1], 3, 4, 2, 1), nn.Tanh())
        init_weights(self)

    def backbone(self) -> nn.Module:
        """A copy of the trained encoder (conv1 .. pool5) to fine-tune for other tasks."""
        return copy.deepcopy(self.encoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"the Context Encoder takes (B, 3, H, W) inputs, got {tuple(x.shape)}")
        S = self.image_size
        xs = x if known_same_size(x.shape[2:], (S, S)) else F.interpolate(x, size=(S, S), mode="bilinear",
                                                                          align_corners=False)
        y = self.decoder(self.bottleneck(self.encoder(xs)))
        return F.interpolate(y, size=x.shape[2:], mode="bilinear", align_corners=False)


class ContextEncoderFeaturesRecipe(_Recipe):
    """The ``context_encoder_features`` model: reconstruction (L2 over the hole) only, no
    discriminator; train it on random-region masks. Options: ``image_size`` (227),
    ``width`` (96: AlexNet's conv1), ``dropout`` (0.5, in the channel-wise FC)."""

    name = "context_encoder_features"
    default_weights = {"rec": 1.0}
    default_lr = 2e-4
    default_betas = (0.5, 0.999)
    discriminator = None

    def __init__(self, image_size: int = 227, width: int = 96, dropout: float = 0.5, loss_weights: dict | None = None):
        self.loss_weights = self._weights(loss_weights)
        self.generator = ContextEncoderFeatureGenerator(image_size, width, dropout)
        self.image_size, self.width = image_size, width

    size_multiple = 1  # any size: the generator resamples to image_size and back
    default_size = 227
    memory_width = 96
    default_mask = "region"
    default_mask_options = {"coverage": (0.2, 0.3)}

    prepare_input = staticmethod(prepare_input)

    def export_backbone(self) -> nn.Module:
        return self.generator.backbone()

    def generator_losses(self, image, mask, output, discriminator=None) -> dict[str, torch.Tensor]:
        mask = mask.float()
        return {"rec": (mask * (output.float() - image.float()).square()).mean()}

    def discriminator_losses(self, image, mask, output, discriminator):
        raise RuntimeError("context_encoder_features has no discriminator")
