from __future__ import annotations

import torch
from torch import nn

from ..ops._common import conv_module_args, pair, reset_conv_parameters
from ..ops.partial_conv.op import partial_conv2d


class PartialConv2d(nn.Module):
    """Partial convolution (Liu et al., ECCV 2018) on fastinpaint's fused renormalisation.

    ``forward(x, mask=None)``: ``out = W^T (X * M) * sum(1)/sum(M) + b`` where the window
    holds a valid pixel, 0 elsewhere; the updated mask is ``clamp(sum(M), 0, 1)``.
    ``mask`` is 1 = valid, 0 = hole; (B, 1, H, W) or, with ``multi_channel=True``,
    (B, in_channels, H, W); ``None`` means all valid. Returns ``out`` or, with
    ``return_mask=True``, ``(out, new_mask)`` (new_mask (B, 1, Ho, Wo), or
    (B, out_channels, Ho, Wo) for multi-channel masks, ready for the next multi-channel layer).

    Parameters follow ``nn.Conv2d`` (``weight`` (Cout, Cin, kh, kw), ``bias``), so the
    NVIDIA code's state_dict loads as is (its ``weight_maskUpdater`` buffer is not needed
    and is ignored when present).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, multi_channel: bool = False, return_mask: bool = False, device=None,
                 dtype=None):
        super().__init__()
        self.kernel_size, self.stride = conv_module_args(in_channels, out_channels, kernel_size, stride)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.padding = pair(padding, "padding", 0)
        self.dilation = pair(dilation, "dilation", 1)
        self.multi_channel, self.return_mask = bool(multi_channel), bool(return_mask)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_conv_parameters(self.weight, self.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(f"{prefix}weight_maskUpdater", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        if mask is None:
            shape = (x.shape[0], self.in_channels if self.multi_channel else 1, *x.shape[2:])
            mask = torch.ones(shape, dtype=x.dtype, device=x.device)
        elif mask.dim() == 4 and mask.shape[1] != (self.in_channels if self.multi_channel else 1):
            raise ValueError(f"mask must have {self.in_channels if self.multi_channel else 1} channel(s) "
                             f"(multi_channel={self.multi_channel}), got shape {tuple(mask.shape)}")
        out, new_mask = partial_conv2d(x, mask, self.weight, self.bias, self.stride, self.padding, self.dilation)
        return (out, new_mask) if self.return_mask else out

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}, dilation={self.dilation}, multi_channel={self.multi_channel}, "
             f"return_mask={self.return_mask}")
        if self.bias is None:
            s += ", bias=False"
        return s
