"""Drop-in modules: they own parameters and call fastinpaint's ops."""

from __future__ import annotations

# gated convolution (DeepFill v2)
from .gated_conv import GatedConv2d, GatedDeconv2d
# channel-wise fully connected layer (Context Encoders)
from .channel_fc import ChannelWiseFC
# partial convolution (Liu et al. 2018)
from .partial_conv import PartialConv2d
# spectral-normalised convolution (SN-PatchGAN)
from .spectral_norm_conv import SpectralNormConv2d
# matmul (pixel) attention (DGII)
from .matmul_attention import MatmulAttention

__all__ = ["ChannelWiseFC", "GatedConv2d", "GatedDeconv2d", "MatmulAttention", "PartialConv2d", "SpectralNormConv2d"]
