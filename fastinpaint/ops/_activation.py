"""The activations the fused kernels apply (gated convolution's feature half, the
channel-wise FC layer's output), in eager PyTorch: their codes, the checks of a call's
``activation`` / ``negative_slope``, and the derivatives the kernels' double-backward paths
use. The Triton versions are in ``_activation_triton.py``, the C++ ones in csrc/common.h;
all three use the codes of ``ACTIVATION_CODES``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACTIVATION_CODES = {"none": 0, "relu": 1, "leaky_relu": 2, "elu": 3}
_NAMES = {v: k for k, v in ACTIVATION_CODES.items()}


def activation_code(activation, negative_slope, slope_from_output: bool = False) -> int:
    """Validate ``activation`` (a name of ``ACTIVATION_CODES``, or None for "none") and its
    ``negative_slope``; return the kernel code. ``slope_from_output``: the backward reads act'
    from the output's sign, so leaky_relu needs ``negative_slope >= 0``."""
    if activation is None:
        activation = "none"
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"activation must be None or one of {sorted(ACTIVATION_CODES)}, got {activation!r}")
    # comparisons, not math.isfinite: under torch.compile(dynamic=True) the slope may be symbolic
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float, torch.SymInt, torch.SymFloat)) \
            or not -math.inf < negative_slope < math.inf:
        raise ValueError(f"negative_slope must be a finite number, got {negative_slope!r}")
    if slope_from_output and activation == "leaky_relu" and negative_slope < 0:
        raise ValueError(f"negative_slope must be >= 0 (the backward reads act' from the output's sign), "
                         f"got {negative_slope}")
    return ACTIVATION_CODES[activation]


def activation_name(activation) -> str:
    """The name of ``activation``, given as a name, a code, or None ("none")."""
    if activation is None:
        return "none"
    return activation if isinstance(activation, str) else _NAMES[int(activation)]


def activate(f: torch.Tensor, activation, negative_slope: float = 0.2) -> torch.Tensor:
    activation = activation_name(activation)
    if activation == "elu":
        return F.elu(f)
    if activation == "leaky_relu":
        return F.leaky_relu(f, negative_slope)
    if activation == "relu":
        return F.relu(f)
    if activation == "none":
        return f
    raise ValueError(f"activation must be one of {sorted(ACTIVATION_CODES)}, got {activation!r}")


def activate_with_derivative(f: torch.Tensor, activation, negative_slope: float = 0.2):
    """``(act(f), act'(f))`` in differentiable torch ops."""
    activation = activation_name(activation)
    if activation == "elu":
        a = F.elu(f)
        return a, torch.where(f > 0, torch.ones_like(f), a + 1)
    if activation in ("leaky_relu", "relu"):
        slope = negative_slope if activation == "leaky_relu" else 0.0
        return F.leaky_relu(f, slope), torch.where(f > 0, torch.ones_like(f), torch.full_like(f, slope))
    if activation == "none":
        return f, torch.ones_like(f)
    raise ValueError(f"activation must be one of {sorted(ACTIVATION_CODES)}, got {activation!r}")


def backward_from_output(grad_out: torch.Tensor, out: torch.Tensor, activation, negative_slope: float = 0.2):
    """``grad_out * act'(pre)`` computed from the activation's *output*, in differentiable torch
    ops: for relu, leaky_relu with ``negative_slope >= 0`` and elu, act'(pre) is a function of
    act(pre) (``out > 0`` <=> ``pre > 0``; elu's ``exp(pre) = out + 1`` for pre <= 0)."""
    activation = activation_name(activation)
    if activation == "none":
        return grad_out
    pos = out > 0
    if activation == "relu":
        return torch.where(pos, grad_out, torch.zeros_like(grad_out))
    if activation == "leaky_relu":
        return torch.where(pos, grad_out, grad_out * negative_slope)
    if activation == "elu":
        return torch.where(pos, grad_out, grad_out * (out + 1))
    raise ValueError(f"activation must be one of {sorted(ACTIVATION_CODES)}, got {activation!r}")
