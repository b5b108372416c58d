"""Matrix-multiplication attention over all pixels (Distillation-Guided Image Inpainting,
Suin et al., ICCV 2021; the SAGAN-style non-local block)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops.pixel_attention.op import pixel_attention


def hole_rows(hole: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
    """A hole mask (B, 1, H, W) or (B, H, W), bool or float (nonzero / > 0.5 = hole), as the
    (B, H*W) bool rows the pixel ops take."""
    if hole.dim() == 4:
        if hole.shape[1] != 1:
            raise ValueError(f"hole must have one channel, got shape {tuple(hole.shape)}")
        hole = hole[:, 0]
    if hole.dim() != 3 or tuple(hole.shape) != (batch, height, width):
        raise ValueError(f"hole must have shape (B, 1, H, W) = ({batch}, 1, {height}, {width}), "
                         f"got {tuple(hole.shape)}")
    if hole.dtype != torch.bool:
        hole = hole > 0.5
    return hole.reshape(batch, height * width)


class MatmulAttention(nn.Module):
    """``y = x + gamma * W_o( sum_j softmax_j(scale * f_Q(x)_i . f_K(x)_j) f_V(x)_j )``.

    f_Q, f_K: 1x1 convolutions to ``qk_channels`` (default ``channels // 8``); f_V: 1x1 to
    ``value_channels`` (default ``channels``); W_o: 1x1 back to ``channels``; ``gamma`` a learned
    residual scale initialised to 0 (the block starts as the identity). ``scale`` defaults to 1
    (DGII's p_ij = f_Q(d_i)^T f_K(d_j) has none); pass ``None`` for 1/sqrt(qk_channels).

    ``forward(x, hole=None, return_qk=False)``: x (B, C, H, W); ``hole`` (B, 1, H, W), when given,
    excludes hole pixels as keys (every query then attends to known pixels only; a sample with
    no known pixel gets no attention output). With ``return_qk=True`` it returns ``(y, (q, k))``,
    q and k (B, H*W, qk_channels), the inputs of
    :func:`fastinpaint.functional.attention_transfer_loss` (use ``self.scale`` as its scale).
    The N x N affinities are never stored (fastinpaint.functional.pixel_attention).
    """

    def __init__(self, channels: int, qk_channels: Optional[int] = None, value_channels: Optional[int] = None,
                 scale: Optional[float] = 1.0):
        super().__init__()
        for name, value in (("channels", channels), ("qk_channels", qk_channels),
                            ("value_channels", value_channels)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        qk_channels = qk_channels or max(1, channels // 8)
        value_channels = value_channels or channels
        self.channels, self.qk_channels, self.value_channels = channels, qk_channels, value_channels
        self.scale = scale
        self.query = nn.Conv2d(channels, qk_channels, 1)
        self.key = nn.Conv2d(channels, qk_channels, 1)
        self.value = nn.Conv2d(channels, value_channels, 1)
        self.out = nn.Conv2d(value_channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    @staticmethod
    def _rows(t: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, H*W, C); free for channels_last, one copy otherwise
        return t.flatten(2).transpose(1, 2).contiguous()

    def query_key(self, x: torch.Tensor):
        """(q, k), each (B, H*W, qk_channels): what the attention-transfer loss compares."""
        return self._rows(self.query(x)), self._rows(self.key(x))

    def forward(self, x: torch.Tensor, hole: Optional[torch.Tensor] = None, return_qk: bool = False):
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x must be (B, {self.channels}, H, W), got shape {tuple(x.shape)}")
        B, _, H, W = x.shape
        q, k = self.query_key(x)
        v = self._rows(self.value(x))
        key_mask = None if hole is None else hole_rows(hole, B, H, W)
        o = pixel_attention(q, k, v, key_mask, self.scale)
        o = o.transpose(1, 2).reshape(B, self.value_channels, H, W)
        y = x + self.gamma * self.out(o)
        return (y, (q, k)) if return_qk else y

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, qk_channels={self.qk_channels}, "
                f"value_channels={self.value_channels}, scale={self.scale}")
