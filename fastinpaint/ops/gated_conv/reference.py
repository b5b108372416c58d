"""Eager PyTorch gated convolution: the oracle of every test and the baseline of every benchmark.

This is the formulation of the public DeepFill v2 ports: one convolution with
``2*Cout`` outputs, split into a feature half and a gate half, the feature half
through the activation, the gate half through a sigmoid, multiplied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._activation import activate, activate_with_derivative


def gate(pre: torch.Tensor, activation: str = "elu", negative_slope: float = 0.2) -> torch.Tensor:
    """``act(pre[:, :C]) * sigmoid(pre[:, C:])`` for a (B, 2C, H, W) pre-activation."""
    f, g = pre.chunk(2, dim=1)
    return activate(f, activation, negative_slope) * torch.sigmoid(g)


def gate_backward(grad_out: torch.Tensor, pre: torch.Tensor, activation, negative_slope: float = 0.2):
    """Gradient of :func:`gate` with respect to ``pre``, written with differentiable torch ops
    (the fused kernels use it when a second derivative is asked for). ``activation`` is a
    name or a code of ``ops._activation.ACTIVATION_CODES``."""
    f, g = pre.chunk(2, dim=1)
    s = torch.sigmoid(g)
    a, da = activate_with_derivative(f, activation, negative_slope)
    return torch.cat([grad_out * s * da, grad_out * a * s * (1 - s)], dim=1)


def gated_conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, activation="elu",
                 negative_slope=0.2):
    pre = F.conv2d(x, weight, bias, stride, padding, dilation)
    return gate(pre, activation, negative_slope)


def gated_deconv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, activation="elu",
                   negative_slope=0.2, scale_factor=2):
    up = F.interpolate(x, scale_factor=scale_factor, mode="nearest")
    return gated_conv2d(up, weight, bias, stride, padding, dilation, activation, negative_slope)
