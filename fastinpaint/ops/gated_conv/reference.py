"""Eager PyTorch gated convolution: the oracle of every test and the baseline of every benchmark.

This is the formulation of the public DeepFill v2 ports: one convolution with
``2*Cout`` outputs, split into a feature half and a gate half, the feature half
through the activation, the gate half through a sigmoid, multiplied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Activation codes shared with the kernels (csrc/common.h, triton.py).
ACTIVATION_CODES = {"none": 0, "relu": 1, "leaky_relu": 2, "elu": 3}


def activate(f: torch.Tensor, activation: str, negative_slope: float = 0.2) -> torch.Tensor:
    if activation == "elu":
        return F.elu(f)
    if activation == "leaky_relu":
        return F.leaky_relu(f, negative_slope)
    if activation == "relu":
        return F.relu(f)
    if activation == "none":
        return f
    raise ValueError(f"activation must be one of {sorted(ACTIVATION_CODES)}, got {activation!r}")


def gate(pre: torch.Tensor, activation: str = "elu", negative_slope: float = 0.2) -> torch.Tensor:
    """``act(pre[:, :C]) * sigmoid(pre[:, C:])`` for a (B, 2C, H, W) pre-activation."""
    f, g = pre.chunk(2, dim=1)
    return activate(f, activation, negative_slope) * torch.sigmoid(g)


def gate_backward(grad_out: torch.Tensor, pre: torch.Tensor, activation, negative_slope: float = 0.2):
    """Gradient of :func:`gate` with respect to ``pre``, written with differentiable torch ops
    (the fused kernels use it when a second derivative is asked for). ``activation`` is a
    name or a code of ``ACTIVATION_CODES``."""
    if not isinstance(activation, str):
        activation = {v: k for k, v in ACTIVATION_CODES.items()}[int(activation)]
    f, g = pre.chunk(2, dim=1)
    s = torch.sigmoid(g)
    if activation == "elu":
        a = F.elu(f)
        da = torch.where(f > 0, torch.ones_like(f), a + 1)
    elif activation in ("leaky_relu", "relu"):
        slope = negative_slope if activation == "leaky_relu" else 0.0
        a = F.leaky_relu(f, slope)
        da = torch.where(f > 0, torch.ones_like(f), torch.full_like(f, slope))
    elif activation == "none":
        a, da = f, torch.ones_like(f)
    else:
        raise ValueError(f"activation must be one of {sorted(ACTIVATION_CODES)}, got {activation!r}")
    return torch.cat([grad_out * s * da, grad_out * a * s * (1 - s)], dim=1)


def gated_conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, activation="elu",
                 negative_slope=0.2):
    pre = F.conv2d(x, weight, bias, stride, padding, dilation)
    return gate(pre, activation, negative_slope)


def gated_deconv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, activation="elu",
                   negative_slope=0.2, scale_factor=2):
    up = F.interpolate(x, scale_factor=scale_factor, mode="nearest")
    return gated_conv2d(up, weight, bias, stride, padding, dilation, activation, negative_slope)
