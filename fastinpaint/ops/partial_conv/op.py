"""Partial convolution (Liu et al., ECCV 2018): argument checks, autograd wiring,
torch.library registration and dispatch.

Paths per backend:
  reference  the public formulation in eager PyTorch (reference.py): a mask convolution with
             a ones kernel, the ratio, and four elementwise passes over the (B, Cout) output
  cpu, cuda  torch's convolution of x * M (no bias), then one fused C++/CUDA kernel
             (fastinpaint::partial_conv_renorm) computing the mask's window sum (a box filter
             with the convolution's geometry), the ratio, the bias and the updated mask; on
             the cpu backend a 3x3, stride-1 float32 convolution of >= 32 channels in and out
             is Winograd's F(4x4, 3x3) (ops/_winograd.py)
  triton     the same split with the fused Triton kernel (triton.py)

Autograd: ``out = raw * scale + bias * um`` with per-pixel ``scale`` and ``um`` (B, 1, Ho, Wo)
saved for backward (1/Cout of the output each; the eager version keeps the same two maps,
so both save the masked input and the weight for the convolution and nothing of Cout size):
``grad_raw = grad_out * scale``, ``grad_bias = sum(grad_out * um)``; the mask gets no
gradient, as in the public code. The backward is written with torch ops, so it is itself
differentiable.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .._common import acc_dtype, autocast_cast, check_float_tensor, check_kernel_span, check_same_device, check_same_dtype, \
    pair
from .._layout import suggest_memory_format
from .. import _winograd
from .._registry import Op, differentiable, kernel
from . import reference



# ----------------------------------------------------------------------------- kernel

def _renorm_fake(raw, mask_sum, bias, kernel, stride, padding, dilation, window_size):
    b, _, ho, wo = raw.shape
    out = raw.new_empty(raw.shape).contiguous(memory_format=suggest_memory_format(raw))
    return out, mask_sum.new_empty((b, 1, ho, wo)), mask_sum.new_empty((b, 1, ho, wo))


# raw = conv2d(x * M, W) without bias (B, C, Ho, Wo), mask_sum = M summed over its channels
# (B, 1, H, W) in the accumulation dtype -> (out, scale, new_mask), the last two (B, 1, Ho, Wo)
RENORM = kernel("partial_conv_renorm",
                "(Tensor raw, Tensor mask_sum, Tensor? bias, int[] kernel, int[] stride, int[] padding, "
                "int[] dilation, float window_size) -> (Tensor, Tensor, Tensor)",
                _renorm_fake, triton="renorm_forward")
OP = Op("partial_conv2d", {
    "reference": "the public formulation in eager PyTorch: a ones-kernel mask convolution, the ratio, four "
                 "elementwise passes (reference.py)",
    "triton": "torch's conv2d of x * M, then one fused Triton kernel: the mask's window sum, ratio, bias "
              "and updated mask",
    "cuda": "torch's conv2d of x * M (cuDNN), then the same fused renormalisation as a CUDA kernel "
            "(csrc/cuda/partial_conv.cu)",
    "cpu": "torch's conv2d of x * M (oneDNN; Winograd F(4x4, 3x3) for 3x3 stride-1 layers, "
           "csrc/cpu/winograd.cpp; fastinpaint's input gradient for inputs of few channels, "
           "csrc/cpu/conv_input_grad.cpp, and weight gradient for strided layers, csrc/cpu/conv_weight_grad.cpp), "
           "then the same fused renormalisation in C++ (csrc/cpu/partial_conv.cpp)",
}, kernels=(RENORM,))


def _setup_context(ctx, inputs, output):
    raw, mask_sum, bias = inputs[:3]
    _, scale, um = output
    ctx.save_for_backward(scale, um)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, _no_kernel, grad_out, _grad_scale, _grad_um):
    # torch ops, so the backward is itself differentiable
    scale, um = ctx.saved_tensors
    grad_raw = (grad_out * scale).to(grad_out.dtype)
    grad_bias = None
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = (grad_out.to(um.dtype) * um).sum((0, 2, 3)).to(ctx.bias_dtype)
    return grad_raw, None, grad_bias, None, None, None, None, None


differentiable(RENORM, None, _setup_context, _backward)


# ----------------------------------------------------------------------------- checks

def check_arguments(x, mask, weight, bias, stride, padding, dilation):
    check_float_tensor(x, "x", 4)
    check_float_tensor(mask, "mask", 4)
    check_float_tensor(weight, "weight", 4)
    if min(weight.shape) <= 0:
        raise ValueError(f"weight must have a positive shape, got {tuple(weight.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[1]} channels but weight expects in_channels={weight.shape[1]}")
    if x.shape[2] <= 0 or x.shape[3] <= 0:
        raise ValueError(f"x must have a positive height and width, got shape {tuple(x.shape)}")
    if mask.shape[0] != x.shape[0] or mask.shape[2:] != x.shape[2:] or mask.shape[1] not in (1, x.shape[1]):
        raise ValueError(f"mask must be (B, 1, H, W) or (B, Cin, H, W) matching x {tuple(x.shape)}, "
                         f"got {tuple(mask.shape)}")
    if bias is not None:
        check_float_tensor(bias, "bias", 1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have {weight.shape[0]} elements (out_channels), got {bias.shape[0]}")
    check_same_device(x, (("mask", mask), ("weight", weight), ("bias", bias)))
    check_same_dtype(x, (("weight", weight), ("bias", bias)))
    stride = pair(stride, "stride", 1)
    padding = pair(padding, "padding", 0)
    dilation = pair(dilation, "dilation", 1)
    check_kernel_span(x.shape, weight.shape[2:], padding, dilation)
    return stride, padding, dilation


# ----------------------------------------------------------------------------- dispatch

def partial_conv2d(x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                   stride=1, padding=0, dilation=1) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial convolution: ``(out, new_mask)``.

    ``out = W^T (X * M) * sum(1) / sum(M) + b`` where the window holds a known pixel
    (``sum(M) > 0``), else 0; ``new_mask = clamp(sum(M), 0, 1)``; with the public code's
    ``+1e-8`` and (for fractional masks) its clamps, see reference.py.

    Args:
        x: (B, Cin, H, W), float16/bfloat16/float32/float64, NCHW or channels_last.
        mask: (B, 1, H, W) (one mask for every channel) or (B, Cin, H, W) (per channel);
            1 = known (valid) pixel, 0 = hole, as in the paper. Not differentiated.
        weight: (Cout, Cin, kh, kw); bias: (Cout,) or None.
        stride, padding, dilation: as for ``torch.nn.functional.conv2d``.

    Returns:
        out (B, Cout, Ho, Wo) in x's dtype and memory format, and new_mask (B, 1, Ho, Wo)
        for a single-channel mask or (B, Cout, Ho, Wo) (an expanded view: Cout equal
        channels) for a multi-channel one, in x's dtype.
    """
    stride, padding, dilation = check_arguments(x, mask, weight, bias, stride, padding, dilation)
    backend = OP.select(x)
    if backend == "reference":
        m = mask.to(x.dtype) if not torch.is_autocast_enabled(x.device.type) else mask
        return reference.partial_conv2d(x, m, weight, bias, stride, padding, dilation)
    x, weight, bias = autocast_cast(x, weight, bias)
    cm = mask.shape[1]
    window = float(cm * weight.shape[2] * weight.shape[3])
    m = mask.detach().to(x.dtype)
    mask_sum = (m.sum(1, keepdim=True) if cm > 1 else m).to(acc_dtype(x.dtype))
    conv = _winograd.conv2d if backend == "cpu" else F.conv2d  # Winograd for 3x3 stride-1 layers
    raw = conv(x * m, weight, None, stride, padding, dilation)
    ksize = [int(weight.shape[2]), int(weight.shape[3])]
    out, _, um = RENORM(backend, raw, mask_sum, bias, ksize, list(stride), list(padding), list(dilation), window)
    new_mask = um.to(x.dtype)
    if cm > 1:
        new_mask = new_mask.expand(-1, weight.shape[0], -1, -1)
    return out, new_mask
