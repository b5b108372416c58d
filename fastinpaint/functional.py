"""fastinpaint's ops as functions (the ``torch.nn.functional`` of this library)."""

from .ops.gated_conv.op import gated_conv2d, gated_deconv2d

__all__ = ["gated_conv2d", "gated_deconv2d"]
