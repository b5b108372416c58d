"""Partial convolution (Liu et al., ECCV 2018): argument checks, autograd wiring,
torch.library registration and dispatch.

Paths per backend:
  reference  the public formulation in eager PyTorch (reference.py): a mask convolution with
             a ones kernel, the ratio, and four elementwise passes over the (B, Cout) output
  cpu, cuda  torch's convolution of x * M (no bias), then one fused C++/CUDA kernel
             (fastinpaint::partial_conv_renorm) computing the mask's window sum (a box filter
             with the convolution's geometry), the ratio, the bias and the updated mask
  triton     the same split with the fused Triton kernel (triton.py)

Autograd: ``out = raw * scale + bias * um`` with per-pixel ``scale`` and ``um`` (B, 1, Ho, Wo)
saved for backward (1/Cout of the output each; the eager version keeps the same two maps,
so both save the masked input and the weight for the convolution and nothing of Cout size):
``grad_raw = grad_out * scale``, ``grad_bias = sum(grad_out * um)``; the mask gets no
gradient, as in the public code. The backward is written with torch ops, so it is itself
differentiable.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ... import _backend, _extension
from .._layout import suggest_memory_format
from .._common import (autocast_cast, check_float_tensor, check_kernel_span, check_same_device, check_same_dtype,
                       pair)
from ..gated_conv.op import conv_output_size
from . import reference

OP_NAME = "partial_conv2d"
IMPLEMENTED = ("reference", "triton", "cuda", "cpu")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_outputs(raw, mask_sum):
    b, _, ho, wo = raw.shape
    out = raw.new_empty(raw.shape).contiguous(memory_format=suggest_memory_format(raw))
    small = mask_sum.new_empty((b, 1, ho, wo))
    return out, small, mask_sum.new_empty((b, 1, ho, wo))


def _setup_context(ctx, inputs, output):
    raw, mask_sum, bias = inputs[:3]
    _, scale, um = output
    ctx.save_for_backward(scale, um)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, grad_out, _grad_scale, _grad_um):
    scale, um = ctx.saved_tensors
    grad_raw = (grad_out * scale).to(grad_out.dtype)
    grad_bias = None
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = (grad_out.to(um.dtype) * um).sum((0, 2, 3)).to(ctx.bias_dtype)
    return grad_raw, None, grad_bias, None, None, None, None, None


# ----------------------------------------------------------------------------- C++ op (cpu, cuda)

def _cpp_op_built() -> bool:
    """False for an extension built before this op existed (rebuild it)."""
    return hasattr(torch.ops.fastinpaint, "partial_conv_renorm")


def _register_cpp_ops() -> None:
    if not _cpp_op_built():
        return

    @torch.library.register_fake("fastinpaint::partial_conv_renorm")
    def _(raw, mask_sum, bias, kernel, stride, padding, dilation, window_size):
        return _fake_outputs(raw, mask_sum)

    torch.library.register_autograd("fastinpaint::partial_conv_renorm", _backward, setup_context=_setup_context)


_extension.on_load(_register_cpp_ops)


# ----------------------------------------------------------------------------- Triton op

@torch.library.custom_op("fastinpaint::partial_conv_renorm_triton", mutates_args=())
def partial_conv_renorm_triton(raw: torch.Tensor, mask_sum: torch.Tensor, bias: Optional[torch.Tensor],
                               kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                               dilation: Sequence[int], window_size: float
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from . import triton as kernels

    return kernels.renorm_forward(raw, mask_sum, bias, tuple(kernel), tuple(stride), tuple(padding),
                                  tuple(dilation), window_size)


@partial_conv_renorm_triton.register_fake
def _(raw, mask_sum, bias, kernel, stride, padding, dilation, window_size):
    return _fake_outputs(raw, mask_sum)


partial_conv_renorm_triton.register_autograd(_backward, setup_context=_setup_context)


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
    backend = _backend.select(OP_NAME, IMPLEMENTED, x.device)
    if backend == "reference":
        m = mask.to(x.dtype) if not torch.is_autocast_enabled(x.device.type) else mask
        return reference.partial_conv2d(x, m, weight, bias, stride, padding, dilation)
    x, weight, bias = autocast_cast(x, weight, bias)
    if backend == "triton" and x.dtype == torch.float64:
        raise TypeError("x is float64, which the triton backend does not take (float16, bfloat16, float32); "
                        "use the reference or cpu backend for float64")
    cm = mask.shape[1]
    window = float(cm * weight.shape[2] * weight.shape[3])
    m = mask.detach().to(x.dtype)
    mask_sum = (m.sum(1, keepdim=True) if cm > 1 else m).to(_acc_dtype(x.dtype))
    raw = F.conv2d(x * m, weight, None, stride, padding, dilation)
    kernel = [int(weight.shape[2]), int(weight.shape[3])]
    args = (raw, mask_sum, bias, kernel, list(stride), list(padding), list(dilation), window)
    if backend == "triton":
        out, _, um = partial_conv_renorm_triton(*args)
    else:
        if not _cpp_op_built():
            raise _backend.BackendUnavailableError(
                "the C++ extension fastinpaint._C was built without partial_conv_renorm: rebuild it "
                "(pip install --no-build-isolation -e .)")
        out, _, um = torch.ops.fastinpaint.partial_conv_renorm(*args)
    new_mask = um.to(x.dtype)
    if cm > 1:
        new_mask = new_mask.expand(-1, weight.shape[0], -1, -1)
    return out, new_mask
