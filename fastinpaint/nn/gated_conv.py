from __future__ import annotations

import torch
from torch import nn

from .. import functional as FI
from ..ops._common import conv_module_args, pair, reset_conv_parameters
from ..ops._activation import activation_code


class GatedConv2d(nn.Module):
    """DeepFill v2's gated convolution: ``act(conv_f(x)) * sigmoid(conv_g(x))``.

    One ``weight`` of shape ``(2*out_channels, in_channels, kh, kw)`` (feature filters
    first, gate filters second) and one ``bias`` of ``2*out_channels``: the layout of the
    common DeepFill v2 PyTorch ports, whose ``conv.weight``/``conv.bias`` keys are also
    accepted by ``load_state_dict``. ``padding="auto"`` is DeepFill's "same" padding,
    ``dilation*(k-1)//2``. The output keeps the input's memory format.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding="auto", dilation=1,
                 bias: bool = True, activation: str = "elu", negative_slope: float = 0.2, device=None, dtype=None):
        super().__init__()
        self.kernel_size, self.stride = conv_module_args(in_channels, out_channels, kernel_size, stride)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.dilation = pair(dilation, "dilation", 1)
        if padding == "auto":
            self.padding = tuple(d * (k - 1) // 2 for d, k in zip(self.dilation, self.kernel_size))
        else:
            self.padding = pair(padding, "padding", 0)
        activation_code(activation, negative_slope)  # validates both
        self.activation, self.negative_slope = activation, negative_slope
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(2 * out_channels, in_channels, *self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(2 * out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv2d's initialisation, for the 2*out_channels filters
        reset_conv_parameters(self.weight, self.bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the single-conv layout of the public ports: <prefix>conv.weight / conv.bias
        for name in ("weight", "bias"):
            port_key = f"{prefix}conv.{name}"
            if port_key in state_dict and f"{prefix}{name}" not in state_dict:
                state_dict[f"{prefix}{name}"] = state_dict.pop(port_key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FI.gated_conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                               self.activation, self.negative_slope)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}, dilation={self.dilation}, activation={self.activation!r}")
        if self.bias is None:
            s += ", bias=False"
        return s


class GatedDeconv2d(GatedConv2d):
    """DeepFill v2's gated "deconv": nearest upsampling (x2 by default), then a gated convolution."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1, padding="auto", dilation=1,
                 bias: bool = True, activation: str = "elu", negative_slope: float = 0.2, scale_factor: int = 2,
                 device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, bias, activation,
                         negative_slope, device, dtype)
        if isinstance(scale_factor, bool) or not isinstance(scale_factor, int) or scale_factor < 1:
            raise ValueError(f"scale_factor must be a positive int, got {scale_factor!r}")
        self.scale_factor = scale_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FI.gated_deconv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                 self.activation, self.negative_slope, self.scale_factor)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scale_factor={self.scale_factor}"
