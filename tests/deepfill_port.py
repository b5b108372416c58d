"""Checkpoints in the layout of the DeepFill v2 PyTorch port (nipponjo/deepfillv2-pytorch,
``model/networks.py``), built inside the tests from fastinpaint's own networks: the port's key
names and shapes, random values.

The port's generator wraps each gated layer's single ``nn.Conv2d`` (2*Cout outputs, features
first) as ``<layer>.conv``, and its gated deconvolutions one level deeper
(``<layer>.conv.conv``); its discriminator (``spectral_norm`` of ``torch.nn.utils.
parametrizations`` on ``conv1.conv_sn`` ... ``conv6.conv_sn``) has fastinpaint's names. Its
training script saves ``{"G": ..., "D": ..., "G_optim": ..., "D_optim": ..., "n_iter": ...}``.

:func:`port_key` is the inverse of :func:`fastinpaint.models.convert_port_state_dict`, written
independently of it; :data:`REAL_PORT_KEYS` is a hand-written list of the port's own names and
shapes (read off its ``Generator(cnum_in=5, cnum=48)``), to check both directions against.
"""

import math

import torch
import torch.nn.functional as F

# the port's name -> (its shape for Generator(cnum_in=5, cnum=48), fastinpaint's name)
REAL_PORT_KEYS = {
    "stage1.conv1.conv.weight": ((48, 5, 5, 5), "stage1.conv1.weight"),
    "stage1.down_block1.conv1_downsample.conv.bias": ((96,), "stage1.down_block1.conv1_downsample.bias"),
    "stage1.conv_bn5.conv.weight": ((192, 96, 3, 3), "stage1.conv_bn5.weight"),
    "stage1.up_block1.conv1_upsample.conv.conv.weight": ((96, 96, 3, 3), "stage1.up_block1.conv1_upsample.weight"),
    "stage1.conv_to_rgb.conv.weight": ((3, 12, 3, 3), "stage1.conv_to_rgb.weight"),
    "stage2.b1_down_block1.conv1_downsample.conv.weight": ((48, 24, 3, 3),
                                                           "stage2.b1_down_block1.conv1_downsample.weight"),
    "stage2.b2_conv_bn1.conv.bias": ((192,), "stage2.b2_conv_bn1.bias"),
    "stage2.conv_bn6.conv.weight": ((192, 192, 3, 3), "stage2.conv_bn6.weight"),
    "stage2.up_block2.conv1_upsample.conv.conv.bias": ((48,), "stage2.up_block2.conv1_upsample.bias"),
    "stage2.conv_to_rgb.conv.bias": ((3,), "stage2.conv_to_rgb.bias"),
}
# 17 convolutions in the coarse network, 25 in the refinement network; a weight and a bias each
PORT_GENERATOR_KEYS = 84


def port_key(ours: str) -> str:
    """The port's name of one of fastinpaint's generator tensors."""
    layer, name = ours.rsplit(".", 1)
    if layer.split(".")[-1] == "conv1_upsample":
        return f"{layer}.conv.conv.{name}"   # its gated deconv wraps a GConv that wraps the conv
    return f"{layer}.conv.{name}"


def _random_like(name: str, value: torch.Tensor, g: torch.Generator, gain: float = 1.0) -> torch.Tensor:
    if value.dim() == 4:   # a convolution: He-like scale, so activations stay in range
        return gain * torch.randn(value.shape, generator=g) / math.sqrt(value[0].numel())
    if name.endswith(("._u", "._v")):   # spectral norm's singular vectors: unit length
        return F.normalize(torch.randn(value.shape, generator=g), dim=0)
    return 0.1 * torch.randn(value.shape, generator=g)


def port_generator_state(generator, seed: int = 0, prefix: str = "", gain: float = 1.0) -> dict:
    """The generator's tensors under the port's names (``prefix`` before each, e.g. the
    ``module.`` of DataParallel), random values of the right shapes. ``gain`` scales the
    convolutions: at He scale (1) a random generator's 30 gated layers shrink a small change of
    its input (a sketch's line) to nothing; 3 keeps it visible in the output."""
    g = torch.Generator().manual_seed(seed)
    return {prefix + port_key(k): _random_like(k, v, g, gain) for k, v in generator.state_dict().items()}


def port_checkpoint(generator, discriminator=None, seed: int = 0, prefix: str = "module.", gain: float = 1.0) -> dict:
    """A checkpoint as the port's training script saves it, for networks shaped like
    ``generator`` (and ``discriminator``, when given), with random values."""
    g = torch.Generator().manual_seed(seed + 1)
    ckpt = {"G": port_generator_state(generator, seed, prefix, gain),
            "G_optim": {"state": {}, "param_groups": [{"lr": 1e-4, "params": []}]}, "n_iter": 1000}
    if discriminator is not None:
        ckpt["D"] = {prefix + k: _random_like(k, v, g) for k, v in discriminator.state_dict().items()}
        ckpt["D_optim"] = {"state": {}, "param_groups": [{"lr": 1e-4, "params": []}]}
    return ckpt
