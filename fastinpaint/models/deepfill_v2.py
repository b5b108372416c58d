"""DeepFill v2 (Yu, Lin, Yang, Shen, Lu, Huang: "Free-Form Image Inpainting with Gated
Convolution", ICCV 2019) on fastinpaint's gated convolution.

Generator (``cnum`` = 48 as published; every gated layer a :class:`fastinpaint.nn.GatedConv2d`
with DeepFill's "same" padding ``dilation*(k-1)//2``, ELU features, sigmoid gates):

* input: the masked image in [-1, 1] (3), an optional sketch channel (1), ones (1), the
  mask (1), in that order (the official code's order); 1 = hole.
* coarse network: gconv 5x5 -> cnum/2; down (s2 -> cnum, -> cnum); down (s2 -> 2cnum,
  -> 2cnum); gconv; dilated gconvs, rates 2, 4, 8, 16; gconv x2; up (nearest x2 + gconv ->
  cnum, gconv -> cnum); up (x2 + gconv -> cnum/2, gconv -> cnum/4); plain conv 3x3 -> 3; tanh.
* between the stages: ``x = coarse * mask + input_image * (1 - mask)``.
* refinement network on that 3-channel composite: a dilated branch (gconv 5x5 -> cnum/2,
  down (s2 -> cnum/2, -> cnum), down (s2 -> cnum, -> 2cnum), gconv, rates 2, 4, 8, 16) and an
  attention branch (gconv 5x5 -> cnum/2, down (s2 -> cnum/2, -> cnum), down (s2 -> 2cnum,
  -> 2cnum), gconv with ReLU, contextual attention (per-sample masks), gconv x2), concatenated
  (4cnum), gconv -> 2cnum, gconv, the coarse network's up blocks, plain conv -> 3, tanh.

The generator's sides must be multiples of :attr:`DeepFillV2Recipe.size_multiple` = 8: two
stride-2 stages, and the attention matches at half of that resolution. (512x680 is fine:
680 = 8 * 85; ``fastinpaint inpaint`` pads other sizes to a multiple of 8 and crops back.)

``forward(x)`` returns ``(coarse, refined)`` in training mode and ``refined`` alone in eval
mode (``return_coarse`` overrides): the trainer's validation and ``fastinpaint inpaint`` put
the network in eval mode and get one (B, 3, H, W) tensor; the recipe's losses take the pair.

Memory format: where fastinpaint's C++ CPU backend runs the gated layers (CPU tensors, the
default backend), both networks run an NCHW input channels_last inside and return NCHW
outputs (``cpu_channels_last = False`` turns that off); the weights keep their format, so
state dicts and checkpoints are unchanged. A channels_last input stays channels_last, and the
reference backend runs the networks as written.

Weights of the common PyTorch port (module names ``stage1.conv1``, ``stage1.down_block1.
conv1_downsample``, ``stage2.b2_conv_bn1``, ...; one ``nn.Conv2d`` of 2*Cout per gated layer
under ``.conv``, the deconvs under ``.conv.conv``): the module names here are the same, so
:func:`convert_port_state_dict` only drops the ``.conv`` levels (and ``module.`` / checkpoint
wrappers), and :func:`convert_port_checkpoint` reads a whole checkpoint of the port
(``{"G": ..., "D": ..., ...}``: its SN-PatchGAN's names are the same as here). Padding of
stride-2 layers is symmetric (1 px each side), as in that port's ``model/networks.py`` (its
published Places2 and CelebA-HQ weights for that file were fine-tuned from the TensorFlow
release for this padding); the TensorFlow original pads 0 before and 1 after on even sizes, so
TF-converted weights see a 1-pixel shift in the strided layers.

The guided variant from unguided weights (:meth:`DeepFillV2Recipe.adapt_pretrained`): the
first layer of the generator (and of the discriminator) gets zero weights on the sketch
channel and keeps the others as they are, so the guided network starts as the unguided one,
whatever the sketch, and learns to use the sketch from there.

Discriminator: SN-PatchGAN, six 5x5 stride-2 convolutions (64, 128, 256, 256, 256, 256 for
``cnum`` = 64) with spectral normalisation (one power iteration per training forward) and
LeakyReLU 0.2, on (image, mask[, sketch]); every element of the flattened output is a GAN
target. Losses: hinge (``D = 0.5 mean relu(1 - D(real)) + 0.5 mean relu(1 + D(fake))``,
``G = -mean D(fake)``), L1 over the whole image on both stages; weights 1, 1, 1.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.gated_conv import GatedConv2d, GatedDeconv2d
from ..nn.spectral_norm_conv import SpectralNormConv2d
from ..ops._spectral_norm import OP as SPECTRAL_NORM_OP
from ..ops.gated_conv.op import OP as GATED_CONV_OP
from ._common import channels_last_on_cpu, merge_loss_weights, strip_wrapper_prefixes
from .contextual_attention import ContextualAttention

__all__ = ["DeepFillV2Generator", "DeepFillV2Recipe", "SNPatchGANDiscriminator", "convert_port_checkpoint",
           "convert_port_state_dict", "edge_sketch", "hinge_d_loss", "hinge_g_loss"]


# ----------------------------------------------------------------------------- blocks

class _Down(nn.Module):
    """gconv 3x3 stride 2 (cin -> hidden), gconv 3x3 (hidden -> cout)."""

    def __init__(self, cin: int, cout: int, hidden: int | None = None):
        super().__init__()
        hidden = cout if hidden is None else hidden
        self.conv1_downsample = GatedConv2d(cin, hidden, 3, stride=2)
        self.conv2 = GatedConv2d(hidden, cout, 3)

    def forward(self, x):
        return self.conv2(self.conv1_downsample(x))


class _Up(nn.Module):
    """gated deconv (nearest x2 + gconv 3x3, cin -> hidden), gconv 3x3 (hidden -> cout)."""

    def __init__(self, cin: int, cout: int, hidden: int | None = None):
        super().__init__()
        hidden = cout if hidden is None else hidden
        self.conv1_upsample = GatedDeconv2d(cin, hidden, 3)
        self.conv2 = GatedConv2d(hidden, cout, 3)

    def forward(self, x):
        return self.conv2(self.conv1_upsample(x))


def _bottleneck(c: int, names: list[str], module: nn.Module) -> None:
    for name, rate in zip(names, (1, 2, 4, 8, 16)):
        setattr(module, name, GatedConv2d(c, c, 3, dilation=rate))


class CoarseNetwork(nn.Module):
    def __init__(self, in_channels: int, cnum: int):
        super().__init__()
        self.conv1 = GatedConv2d(in_channels, cnum // 2, 5)
        self.down_block1 = _Down(cnum // 2, cnum)
        self.down_block2 = _Down(cnum, 2 * cnum)
        _bottleneck(2 * cnum, [f"conv_bn{i}" for i in range(1, 6)], self)
        self.conv_bn6 = GatedConv2d(2 * cnum, 2 * cnum, 3)
        self.conv_bn7 = GatedConv2d(2 * cnum, 2 * cnum, 3)
        self.up_block1 = _Up(2 * cnum, cnum)
        self.up_block2 = _Up(cnum, cnum // 4, hidden=cnum // 2)
        self.conv_to_rgb = nn.Conv2d(cnum // 4, 3, 3, padding=1)

    def forward(self, x):
        x = self.down_block2(self.down_block1(self.conv1(x)))
        for i in range(1, 8):
            x = getattr(self, f"conv_bn{i}")(x)
        x = self.up_block2(self.up_block1(x))
        return torch.tanh(self.conv_to_rgb(x))


class RefinementNetwork(nn.Module):
    def __init__(self, cnum: int, attention_masking: str = "official"):
        super().__init__()
        # dilated-convolution branch
        self.b1_conv1 = GatedConv2d(3, cnum // 2, 5)
        self.b1_down_block1 = _Down(cnum // 2, cnum, hidden=cnum // 2)
        self.b1_down_block2 = _Down(cnum, 2 * cnum, hidden=cnum)
        _bottleneck(2 * cnum, [f"b1_conv_bn{i}" for i in range(1, 6)], self)
        # contextual-attention branch
        self.b2_conv1 = GatedConv2d(3, cnum // 2, 5)
        self.b2_down_block1 = _Down(cnum // 2, cnum, hidden=cnum // 2)
        self.b2_down_block2 = _Down(cnum, 2 * cnum)
        self.b2_conv_bn1 = GatedConv2d(2 * cnum, 2 * cnum, 3, activation="relu")
        self.contextual_attention = ContextualAttention(ksize=3, rate=2, fuse_k=3, softmax_scale=10.0, fuse=True,
                                                        masking=attention_masking)
        self.b2_conv_bn4 = GatedConv2d(2 * cnum, 2 * cnum, 3)
        self.b2_conv_bn5 = GatedConv2d(2 * cnum, 2 * cnum, 3)
        # merged
        self.conv_bn6 = GatedConv2d(4 * cnum, 2 * cnum, 3)
        self.conv_bn7 = GatedConv2d(2 * cnum, 2 * cnum, 3)
        self.up_block1 = _Up(2 * cnum, cnum)
        self.up_block2 = _Up(cnum, cnum // 4, hidden=cnum // 2)
        self.conv_to_rgb = nn.Conv2d(cnum // 4, 3, 3, padding=1)

    def forward(self, x, mask):
        h = self.b1_down_block2(self.b1_down_block1(self.b1_conv1(x)))
        for i in range(1, 6):
            h = getattr(self, f"b1_conv_bn{i}")(h)
        a = self.b2_conv_bn1(self.b2_down_block2(self.b2_down_block1(self.b2_conv1(x))))
        a = self.contextual_attention(a, mask)
        a = self.b2_conv_bn5(self.b2_conv_bn4(a))
        y = self.conv_bn7(self.conv_bn6(torch.cat([h, a], dim=1)))
        y = self.up_block2(self.up_block1(y))
        return torch.tanh(self.conv_to_rgb(y))


class DeepFillV2Generator(nn.Module):
    """The two-stage DeepFill v2 generator (see the module doc).

    Args:
        cnum: base width (48 published; 4 * k for k >= 1; tests use 8).
        in_channels: 5 (masked image, ones, mask) or 6 (with a sketch after the image).
        attention_masking: "official" (converted weights) or "exclude" (true exclusion).
    """

    size_multiple = 8
    #: run NCHW CPU inputs channels_last inside where the cpu backend runs (see the module doc)
    cpu_channels_last = True

    def __init__(self, cnum: int = 48, in_channels: int = 5, attention_masking: str = "official"):
        super().__init__()
        if isinstance(cnum, bool) or not isinstance(cnum, int) or cnum < 4 or cnum % 4:
            raise ValueError(f"cnum must be a positive multiple of 4, got {cnum!r}")
        if in_channels not in (5, 6):
            raise ValueError(f"in_channels must be 5 (image, ones, mask) or 6 (with a sketch), got {in_channels!r}")
        self.cnum, self.in_channels = cnum, in_channels
        self.stage1 = CoarseNetwork(in_channels, cnum)
        self.stage2 = RefinementNetwork(cnum, attention_masking)

    def forward(self, x: torch.Tensor, return_coarse: bool | None = None):
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % self.size_multiple or w % self.size_multiple:
            raise ValueError(f"DeepFillV2Generator needs height and width that are multiples of "
                             f"{self.size_multiple}, got {h}x{w} (pad the image, e.g. as fastinpaint inpaint does)")
        if return_coarse is None:
            return_coarse = self.training
        x, channels_last = channels_last_on_cpu(x, GATED_CONV_OP, self.cpu_channels_last)
        mask = x[:, -1:]
        coarse = self.stage1(x)
        mixed = coarse * mask + x[:, :3] * (1 - mask)
        if not return_coarse:
            del coarse      # not held through the second stage (large images)
        refined = self.stage2(mixed, mask)
        if channels_last:   # NCHW in, NCHW out
            refined = refined.contiguous()
            if return_coarse:
                coarse = coarse.contiguous()
        return (coarse, refined) if return_coarse else refined


# ----------------------------------------------------------------------------- discriminator

class _DConv(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv_sn = SpectralNormConv2d(cin, cout, 5, 2, 2)   # torch's spectral_norm, output-scaled

    def forward(self, x):
        return F.leaky_relu(self.conv_sn(x), 0.2)


class SNPatchGANDiscriminator(nn.Module):
    """SN-PatchGAN: six spectral-normalised 5x5 stride-2 convolutions with LeakyReLU 0.2;
    ``forward(image, mask[, sketch])`` -> (B, N) scores (the flattened 1/64-resolution map).
    Runs channels_last inside on the CPU as the generator does (``cpu_channels_last``)."""

    cpu_channels_last = True

    def __init__(self, cnum: int = 64, in_channels: int = 4):
        super().__init__()
        if isinstance(cnum, bool) or not isinstance(cnum, int) or cnum < 1:
            raise ValueError(f"cnum must be a positive int, got {cnum!r}")
        widths = [in_channels, cnum, 2 * cnum, 4 * cnum, 4 * cnum, 4 * cnum, 4 * cnum]
        for i in range(6):
            setattr(self, f"conv{i + 1}", _DConv(widths[i], widths[i + 1]))
        self.in_channels = in_channels

    def forward(self, image: torch.Tensor, mask: torch.Tensor, sketch: torch.Tensor | None = None):
        parts = [image, mask.to(image.dtype)] + ([sketch.to(image.dtype)] if sketch is not None else [])
        x = torch.cat(parts, dim=1)
        if x.shape[1] != self.in_channels:
            raise ValueError(f"the discriminator takes {self.in_channels} channels, got {x.shape[1]}")
        x, _ = channels_last_on_cpu(x, SPECTRAL_NORM_OP, self.cpu_channels_last)
        for i in range(1, 7):
            x = getattr(self, f"conv{i}")(x)
        return x.flatten(1)     # in NCHW order whatever the layout


def hinge_d_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(0.5 mean relu(1 - real), 0.5 mean relu(1 + fake))``; their sum is the D loss."""
    return 0.5 * F.relu(1 - real_scores.float()).mean(), 0.5 * F.relu(1 + fake_scores.float()).mean()


def hinge_g_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    """``-mean D(fake)``."""
    return -fake_scores.float().mean()


# ----------------------------------------------------------------------------- weights of the port

_CONV_LEVELS = re.compile(r"(?:\.conv)+\.(weight|bias)$")
PORT_LAYOUT = "the DeepFill v2 PyTorch port's (model/networks.py)"
FASTINPAINT_LAYOUT = "fastinpaint's"


def _unwrap(checkpoint: dict) -> tuple[dict, dict | None]:
    """(generator state, discriminator state or None) of a checkpoint dict or a bare state dict."""
    for g_key, d_key in (("G", "D"), ("generator", "discriminator")):
        if isinstance(checkpoint.get(g_key), dict):
            d = checkpoint.get(d_key)
            return checkpoint[g_key], d if isinstance(d, dict) and d else None
    return checkpoint, None


def convert_port_state_dict(state: dict) -> dict:
    """Rename a DeepFill v2 PyTorch port's generator state_dict to :class:`DeepFillV2Generator`'s.

    Accepts the generator's own dict or a checkpoint dict holding it under ``"G"`` or
    ``"generator"``; strips ``module.`` / ``_orig_mod.`` prefixes and turns every
    ``<layer>.conv.weight`` / ``<layer>.conv.conv.weight`` (and ``bias``) into
    ``<layer>.weight``: the gated layers keep the port's single (2*Cout, Cin, k, k) tensor,
    its feature filters first. Example: ``stage1.up_block1.conv1_upsample.conv.conv.weight``
    -> ``stage1.up_block1.conv1_upsample.weight``; ``stage2.conv_to_rgb.conv.bias`` ->
    ``stage2.conv_to_rgb.bias``. Keys already in fastinpaint's names are kept."""
    state = strip_wrapper_prefixes(_unwrap(state)[0])
    return {_CONV_LEVELS.sub(r".\1", k) if isinstance(k, str) else k: v for k, v in state.items()}


def convert_port_checkpoint(checkpoint: dict) -> tuple[str, dict, dict | None]:
    """``(layout, generator state, discriminator state or None)`` of a DeepFill v2 checkpoint,
    in fastinpaint's names.

    ``checkpoint``: the port's (``{"G": ..., "D": ..., "G_optim": ..., "D_optim": ...,
    "n_iter": ...}``, or its published ``{"G": ...}``), a dict holding the networks under
    ``"generator"`` / ``"discriminator"``, or a bare generator state dict; ``module.`` /
    ``_orig_mod.`` prefixes anywhere. The layout is recognised from the generator's keys: the
    port's ``.conv`` levels (:func:`convert_port_state_dict` renames them), else fastinpaint's.
    The port's discriminator (``torch.nn.utils.parametrizations.spectral_norm`` on
    ``conv1.conv_sn`` ... ``conv6.conv_sn``) has :class:`SNPatchGANDiscriminator`'s names.
    Whether the keys then are the network's is for the loader to check."""
    if not isinstance(checkpoint, dict):
        raise ValueError(f"a DeepFill v2 checkpoint is a dict of tensors, got a {type(checkpoint).__name__}")
    g, d = _unwrap(checkpoint)
    g = strip_wrapper_prefixes(g)
    layout = PORT_LAYOUT if any(isinstance(k, str) and _CONV_LEVELS.search(k) for k in g) else FASTINPAINT_LAYOUT
    return layout, convert_port_state_dict(g), strip_wrapper_prefixes(d) if d is not None else None


def _add_input_channel(state: dict, key: str, index: int, channels: int, vector_key: str | None = None) -> dict:
    """``state`` with a zero input channel inserted at ``index`` of the convolution weight
    ``key`` when it has ``channels - 1`` input channels (else unchanged). ``vector_key``: the
    spectral norm's right singular vector of that weight, which gets zeros at the same places
    (its estimate of the largest singular value stays exact)."""
    w = state.get(key)
    if not isinstance(w, torch.Tensor) or w.dim() != 4 or w.shape[1] != channels - 1:
        return state
    state = dict(state)
    state[key] = torch.cat([w[:, :index], w.new_zeros(w.shape[0], 1, *w.shape[2:]), w[:, index:]], dim=1)
    v = state.get(vector_key) if vector_key is not None else None
    if isinstance(v, torch.Tensor) and v.numel() == w[0].numel():
        v = v.reshape(w.shape[1], -1)
        state[vector_key] = torch.cat([v[:index], v.new_zeros(1, v.shape[1]), v[index:]]).flatten()
    return state


# ----------------------------------------------------------------------------- recipe

def edge_sketch(image: torch.Tensor, mask: torch.Tensor, threshold: float = 0.6) -> torch.Tensor:
    """A stand-in for the user's sketch when training the guided variant: the Sobel gradient
    magnitude of the grey image, divided by its per-sample maximum, thresholded at
    ``threshold``, times the mask ((B, 1, H, W) of 0/1). The published model used HED edges."""
    grey = image.float().mean(1, keepdim=True)
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=image.device)
    k = torch.stack([kx, kx.t()]).unsqueeze(1)
    g = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), k).pow(2).sum(1, keepdim=True).sqrt()
    g = g / g.amax(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    return ((g > threshold).float() * mask.float()).to(image.dtype)


def _refined(output):
    return output[1] if isinstance(output, (tuple, list)) else output


class DeepFillV2Recipe:
    """The ``deepfill_v2`` model (see the module doc for the published setting).

    Options: ``cnum`` (48), ``disc_cnum`` (64), ``guided`` (False: add the sketch channel to G
    and D; sketches are derived from the training images by :func:`edge_sketch`),
    ``attention_masking`` ("official" or "exclude"), ``loss_weights`` over the defaults
    ``{"l1_coarse": 1, "l1_refined": 1, "adv": 1}`` (``adv = 0`` drops the discriminator).

    The generator returns ``(coarse, refined)`` when training and ``refined`` in eval mode;
    :meth:`final_output` picks the refined image from either.
    """

    name = "deepfill_v2"
    # other projects' weights (fastinpaint.train.weights): the layouts recognised, and the
    # options those weights were trained with, used where the user gives none
    weight_layouts = f"{FASTINPAINT_LAYOUT} or {PORT_LAYOUT}"
    foreign_defaults = {"attention_masking": "official"}
    size_multiple = 8
    default_lr = 1e-4
    default_betas = (0.5, 0.999)
    default_batch_size = 16
    default_size = 256
    default_weights = {"l1_coarse": 1.0, "l1_refined": 1.0, "adv": 1.0}

    def __init__(self, cnum: int = 48, disc_cnum: int = 64, guided: bool = False,
                 attention_masking: str = "official", loss_weights: dict | None = None):
        weights = merge_loss_weights(self.name, self.default_weights, loss_weights)
        if not isinstance(guided, bool):
            raise ValueError(f"guided must be true or false, got {guided!r}")
        self.loss_weights = weights
        self.guided = guided
        self.generator = DeepFillV2Generator(cnum, 6 if guided else 5, attention_masking)
        self.discriminator = (SNPatchGANDiscriminator(disc_cnum, 5 if guided else 4)
                              if weights["adv"] > 0 else None)

    @staticmethod
    def convert_foreign(checkpoint: dict) -> tuple[str, dict, dict | None]:
        """:func:`convert_port_checkpoint`: ``(layout, generator state, discriminator state)``."""
        return convert_port_checkpoint(checkpoint)

    def adapt_pretrained(self, generator_state: dict, discriminator_state: dict | None = None):
        """``(generator_state, discriminator_state)`` made to fit this recipe's networks: for the
        guided variant, unguided weights get a zero-weight sketch channel in the first layer of
        the generator (input channel 3, after the image) and of the discriminator (channel 4,
        after the mask), so the guided networks compute what the unguided ones did, whatever
        the sketch; the other weights load as they are. States that fit come back unchanged."""
        if not self.guided:
            return generator_state, discriminator_state
        generator_state = _add_input_channel(generator_state, "stage1.conv1.weight", 3, self.generator.in_channels)
        if discriminator_state is not None and self.discriminator is not None:
            sn = "conv1.conv_sn.parametrizations.weight"
            discriminator_state = _add_input_channel(discriminator_state, f"{sn}.original", 4,
                                                     self.discriminator.in_channels, vector_key=f"{sn}.0._v")
        return generator_state, discriminator_state

    #: :meth:`inference_memory`'s constants (bytes; bytes per pixel and unit of cnum)
    memory_base, memory_conv_per_pixel_cnum, memory_attention_per_pixel_cnum = 100 * 2**20, 13.0, 10.0

    def inference_memory(self, height: int, width: int) -> int:
        """Bytes the generator's eval-mode forward (no gradients, float32, batch 1, CPU) adds
        to the process's resident memory for a ``height x width`` input (sides multiples of 8):

            memory_base + max(memory_conv_per_pixel_cnum * cnum * H * W,
                              attention + memory_attention_per_pixel_cnum * cnum * H * W)

        The first term is the full-resolution gated layers (the largest, the second stage's
        gated deconv: its phase-stacked pre-activations, its output, and the maps held
        across the stages); the second the contextual attention's peak (``attention`` =
        :meth:`ContextualAttention.inference_memory
        <fastinpaint.models.contextual_attention.ContextualAttention.inference_memory>`: its
        keys, raw patches and one tile, fewer temporaries where the C++ fused scores run, or
        the reference's (L x L) maps where that runs) with the maps held beside it. Fitted to
        the first call's growth in fresh processes (cnum 48, CPU, the C++ fused scores), which
        it exceeds by 34% at 512, 18% at 1024 and 20% at 2048 pixels square
        (``benchmarks/results/cpu_deepfill_v2_large_images_fused_fp32_20261206.md``), and with
        the networks channels_last inside by 15% at 512 and 22% at 1024 (``..._large_images_
        channels_last_inside_fp32_20261206.md``; larger sizes not re-measured); at 4096 it gives
        11.8 GB against 10.3 GB measured before the fused scores (which need less).
        ``fastinpaint inpaint`` refuses an image this exceeds the memory for."""
        g = self.generator
        pixels = height * width
        attention = g.stage2.contextual_attention.inference_memory((1, 2 * g.cnum, height // 4, width // 4))
        return int(self.memory_base + max(self.memory_conv_per_pixel_cnum * g.cnum * pixels,
                                          attention + self.memory_attention_per_pixel_cnum * g.cnum * pixels))

    def prepare_input(self, image: torch.Tensor, mask: torch.Tensor, sketch: torch.Tensor | None = None):
        """(B, 5 or 6, H, W): masked image, [sketch * mask], ones, mask."""
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be (B, 3, H, W), got {tuple(image.shape)}")
        if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] != image.shape[0] or \
                mask.shape[2:] != image.shape[2:]:
            raise ValueError(f"mask must be (B, 1, H, W) matching the image {tuple(image.shape)}, "
                             f"got {tuple(mask.shape)}")
        mask = mask.to(image.dtype)
        parts = [image * (1 - mask)]
        if self.guided:
            sketch = edge_sketch(image, mask) if sketch is None else sketch.to(image.dtype) * mask
            parts.append(sketch)
        elif sketch is not None:
            raise ValueError("a sketch was given but this deepfill_v2 model is not guided (guided=false)")
        parts += [torch.ones_like(mask), mask]
        return torch.cat(parts, dim=1)

    @staticmethod
    def final_output(output) -> torch.Tensor:
        """The refined image from the generator's output (a pair or the refined tensor)."""
        return _refined(output)

    @staticmethod
    def composite(image, mask, output) -> torch.Tensor:
        output = _refined(output)
        mask = mask.to(output.dtype)
        return output * mask + image.to(output.dtype) * (1 - mask)

    def _sketch(self, image, mask):
        return edge_sketch(image, mask) if self.guided else None

    def generator_losses(self, image, mask, output, discriminator=None) -> dict[str, torch.Tensor]:
        if isinstance(output, (tuple, list)):
            coarse, refined = output
        else:  # eval-mode output: the refined image only
            coarse, refined = None, output
        image = image.float()
        losses = {}
        if coarse is not None:
            losses["l1_coarse"] = (coarse.float() - image).abs().mean()
        losses["l1_refined"] = (refined.float() - image).abs().mean()
        if discriminator is not None and self.loss_weights["adv"] > 0:
            fake = self.composite(image, mask, refined)
            losses["adv"] = hinge_g_loss(discriminator(fake, mask, self._sketch(image, mask)))
        return losses

    def discriminator_losses(self, image, mask, output, discriminator) -> dict[str, torch.Tensor]:
        """Hinge loss; real and fake (the composite) go through D in one batch."""
        fake = self.composite(image, mask, _refined(output).detach())
        sketch = self._sketch(image, mask)
        both_sketch = torch.cat([sketch, sketch]) if sketch is not None else None
        scores = discriminator(torch.cat([image.to(fake.dtype), fake]), torch.cat([mask, mask]), both_sketch)
        real_s, fake_s = scores.chunk(2)
        d_real, d_fake = hinge_d_loss(real_s, fake_s)
        return {"d_real": d_real, "d_fake": d_fake}
