"""Channel-wise fully connected layer (Context Encoders, Pathak et al. 2016), as a module."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..ops._activation import activation_code
from ..ops.channel_fc.op import channel_fc


class ChannelWiseFC(nn.Module):
    """The Context Encoder's bottleneck: a channel-wise fully connected layer, then
    dropout, then a stride-1 1x1 convolution that mixes the channels.

    ``y = mix(dropout(act(W[c] @ x[b, c].flatten() + bias[c])))``: each of the
    ``channels`` maps of ``height x width`` positions has its own dense (P x P) matrix,
    P = height * width, so the layer holds ``channels * P^2`` weights (plus the mixing
    convolution's ``channels^2 + channels``) where a fully connected layer would hold
    ``(channels * P)^2``. The paper puts it between the encoder (AlexNet pool5: 256 maps
    of 6x6; the inpainting encoder: 512 maps of 4x4) and the decoder, and allows dropout.

    Args:
        channels, height, width: the shape of the feature maps it takes (fixed: the
            weight is (channels, P, P)).
        bias: a (channels, P) bias.
        activation: None, "relu", "leaky_relu" (``negative_slope``) or "elu", applied
            after the channel-wise layer (fused into its kernel).
        mix_channels: add the paper's stride-1 1x1 convolution (channels -> channels,
            with bias) after it; ``self.mix`` is that ``nn.Conv2d`` or None.
        dropout: dropout probability between the two (``nn.Dropout``; 0 = none).

    Initialisation: each channel's matrix like ``nn.Linear(P, P)``, i.e.
    U(-1/sqrt(P), 1/sqrt(P)) for weight and bias (variance 1/(3P) keeps the output's
    scale near the input's); the mixing convolution keeps ``nn.Conv2d``'s default. The
    Context Encoder recipes re-initialise everything N(0, 0.02) as published.
    """

    def __init__(self, channels: int, height: int, width: int, bias: bool = True,
                 activation: Optional[str] = None, mix_channels: bool = True, dropout: float = 0.0,
                 negative_slope: float = 0.2):
        super().__init__()
        for name, v in (("channels", channels), ("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        activation_code(activation, negative_slope, slope_from_output=True)  # validates both
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.channels, self.height, self.width = channels, height, width
        self.activation, self.negative_slope = activation, float(negative_slope)
        P = height * width
        self.weight = nn.Parameter(torch.empty(channels, P, P))
        self.bias = nn.Parameter(torch.empty(channels, P)) if bias else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.mix = nn.Conv2d(channels, channels, kernel_size=1, stride=1) if mix_channels else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.height * self.width)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)
        if self.mix is not None:
            self.mix.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = channel_fc(x, self.weight, self.bias, self.activation, self.negative_slope)
        if self.dropout is not None:
            y = self.dropout(y)
        if self.mix is not None:
            y = self.mix(y)
        return y

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, height={self.height}, width={self.width}, "
                f"bias={self.bias is not None}, activation={self.activation!r}")
