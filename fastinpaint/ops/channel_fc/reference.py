"""Eager PyTorch channel-wise fully connected layer: the oracle of every test and the
baseline of every benchmark.

``y[b, c] = act(W[c] @ x[b, c].flatten() + bias[c])`` reshaped to (B, C, H, W): each of the
C feature maps is mapped to a map of the same size by its own dense (H*W x H*W) matrix
(Context Encoders, Pathak et al. 2016). The eager formulation is what the public ports
write: a (B, C, P) -> (C, P, B) permute, one ``bmm`` with the (C, P, P) weight, the
permute back (a view: the result keeps the batch as its innermost dimension, a layout
the next layer usually has to copy), then the bias and the activation as separate
elementwise ops (which keep that layout).
"""

from __future__ import annotations

import torch

from .._activation import ACTIVATION_CODES, activate, backward_from_output

__all__ = ["ACTIVATION_CODES", "channel_fc", "channel_fc_backward"]


def channel_fc(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               activation: str = "none", negative_slope: float = 0.2) -> torch.Tensor:
    B, C, H, W = x.shape
    P = H * W
    xs = x.reshape(B, C, P).permute(1, 2, 0)          # (C, P, B)
    y = torch.bmm(weight, xs)                          # (C, P, B)
    y = y.permute(2, 0, 1).reshape(B, C, H, W)         # a view, batch innermost
    if bias is not None:
        y = y + bias.reshape(1, C, H, W)
    return activate(y, activation, negative_slope)


def channel_fc_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, out, activation,
                        negative_slope: float = 0.2):
    """(dx, dweight, dbias) of :func:`channel_fc` from its output ``out`` (None without an
    activation), written with differentiable torch ops: the kernels use it when a second
    derivative is asked for."""
    B, C, H, W = x.shape
    P = H * W
    d = grad_out if out is None else backward_from_output(grad_out, out, activation, negative_slope)
    d3 = d.reshape(B, C, P).transpose(0, 1)        # (C, B, P)
    x3 = x.reshape(B, C, P).transpose(0, 1)
    dx = torch.bmm(d3, weight).transpose(0, 1).reshape(B, C, H, W)
    dw = torch.bmm(d3.transpose(1, 2), x3)
    db = d3.sum(1)
    return dx, dw, db
