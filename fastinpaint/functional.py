"""fastinpaint's ops as functions (the ``torch.nn.functional`` of this library)."""

from __future__ import annotations

# gated convolution (DeepFill v2)
from .ops.gated_conv.op import gated_conv2d, gated_deconv2d
# channel-wise fully connected layer (Context Encoders)
from .ops.channel_fc.op import channel_fc
# partial convolution (Liu et al. 2018)
from .ops.partial_conv.op import partial_conv2d
# spectral-normalised convolution (SN-PatchGAN) and its power iteration
from .ops._spectral_norm import power_iteration, spectral_norm_conv2d
# pixel (matmul) attention and the attention-transfer loss (DGII)
from .ops.pixel_attention.op import attention_transfer_loss, pixel_attention
# self-similarity maps and the spatially-correlative distance (F-LSeSim)
from .ops.self_similarity.op import sample_query_index, self_similarity, spatial_correlative_distance
# the blocked contextual attention's fused scores (DeepFill v2; used by models.ContextualAttention)
from .ops import _contextual_scores  # noqa: F401  (declares its kernel before fastinpaint._C loads)

__all__ = ["attention_transfer_loss", "channel_fc", "gated_conv2d", "gated_deconv2d", "partial_conv2d",
           "pixel_attention", "power_iteration", "sample_query_index", "self_similarity",
           "spatial_correlative_distance", "spectral_norm_conv2d"]
