"""Gated convolution: argument checks, autograd wiring, torch.library registration,
and dispatch to a backend.

Paths per backend:
  reference  eager conv -> split -> act * sigmoid (reference.py)
  cpu, cuda  torch's convolution -> fused gating kernel of fastinpaint._C
             (the gated deconv's upsampling folded into the convolution: upsample.py)
  triton     with autograd: torch's convolution -> fused Triton gating kernel;
             without (inference, no_grad): one implicit-GEMM Triton kernel with the
             gating in its epilogue, which never writes the 2*Cout pre-activation.

The fused gating saves only the pre-activation for backward (plus the x and weight
the convolution itself saves) and recomputes act and sigmoid from it; the eager
formulation also keeps act(f) and sigmoid(g).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ... import _backend, _extension
from .._common import (autocast_cast, check_float_tensor, check_kernel_span, check_same_device, check_same_dtype,
                       needs_grad)
from .._common import pair as _pair
from .._layout import conv_output_format, is_channels_last
from . import reference, upsample
from .reference import ACTIVATION_CODES

OP_NAME = "gated_conv2d"
IMPLEMENTED = ("reference", "triton", "cuda", "cpu")


# ----------------------------------------------------------------------------- shapes

def _gate_out_like(pre: torch.Tensor, channels: int) -> torch.Tensor:
    """Empty (B, channels, H, W) in the memory format the gating kernels produce for ``pre``."""
    fmt = torch.channels_last if is_channels_last(pre) else torch.contiguous_format
    return pre.new_empty((pre.shape[0], channels, pre.shape[2], pre.shape[3])).contiguous(memory_format=fmt)


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


# ----------------------------------------------------------------------------- C++ ops (cpu, cuda)

def _register_cpp_ops() -> None:
    """Fake kernels and autograd of the C++ ops; runs once the extension is loaded."""

    @torch.library.register_fake("fastinpaint::gated_act_forward")
    def _(pre, activation, negative_slope):
        return _gate_out_like(pre, pre.shape[1] // 2)

    @torch.library.register_fake("fastinpaint::gated_act_backward")
    def _(grad_out, pre, activation, negative_slope):
        return _gate_out_like(pre, pre.shape[1])

    def setup_context(ctx, inputs, output):
        pre, activation, negative_slope = inputs
        ctx.save_for_backward(pre)
        ctx.activation, ctx.negative_slope = activation, negative_slope

    def backward(ctx, grad_out):
        (pre,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward (double backward)
            return reference.gate_backward(grad_out, pre, ctx.activation, ctx.negative_slope), None, None
        grad_pre = torch.ops.fastinpaint.gated_act_backward(grad_out, pre, ctx.activation, ctx.negative_slope)
        return grad_pre, None, None

    torch.library.register_autograd("fastinpaint::gated_act_forward", backward, setup_context=setup_context)


_extension.on_load(_register_cpp_ops)


# ----------------------------------------------------------------------------- Triton ops

@torch.library.custom_op("fastinpaint::gated_act_forward_triton", mutates_args=())
def gated_act_forward_triton(pre: torch.Tensor, activation: int, negative_slope: float) -> torch.Tensor:
    from . import triton as kernels

    return kernels.gate_forward(pre, activation, negative_slope)


@gated_act_forward_triton.register_fake
def _(pre, activation, negative_slope):
    return _gate_out_like(pre, pre.shape[1] // 2)


@torch.library.custom_op("fastinpaint::gated_act_backward_triton", mutates_args=())
def gated_act_backward_triton(grad_out: torch.Tensor, pre: torch.Tensor, activation: int,
                              negative_slope: float) -> torch.Tensor:
    from . import triton as kernels

    return kernels.gate_backward(grad_out, pre, activation, negative_slope)


@gated_act_backward_triton.register_fake
def _(grad_out, pre, activation, negative_slope):
    return _gate_out_like(pre, pre.shape[1])


def _triton_setup_context(ctx, inputs, output):
    pre, activation, negative_slope = inputs
    ctx.save_for_backward(pre)
    ctx.activation, ctx.negative_slope = activation, negative_slope


def _triton_backward(ctx, grad_out):
    (pre,) = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: a differentiable backward (double backward)
        return reference.gate_backward(grad_out, pre, ctx.activation, ctx.negative_slope), None, None
    return gated_act_backward_triton(grad_out, pre, ctx.activation, ctx.negative_slope), None, None


gated_act_forward_triton.register_autograd(_triton_backward, setup_context=_triton_setup_context)


@torch.library.custom_op("fastinpaint::gated_conv2d_triton", mutates_args=())
def gated_conv2d_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                        upsample: int, activation: int, negative_slope: float) -> torch.Tensor:
    """Inference only: implicit-GEMM convolution with the gating in its epilogue."""
    from . import triton as kernels

    return kernels.conv_forward(x, weight, bias, tuple(stride), tuple(padding), tuple(dilation), upsample,
                                activation, negative_slope)


@gated_conv2d_triton.register_fake
def _(x, weight, bias, stride, padding, dilation, upsample, activation, negative_slope):
    kh, kw = weight.shape[2], weight.shape[3]
    ho = conv_output_size(x.shape[2] * upsample, kh, stride[0], padding[0], dilation[0])
    wo = conv_output_size(x.shape[3] * upsample, kw, stride[1], padding[1], dilation[1])
    return x.new_empty((x.shape[0], weight.shape[0] // 2, ho, wo)).contiguous(
        memory_format=conv_output_format(x, weight))


# ----------------------------------------------------------------------------- argument checks

def check_arguments(x, weight, bias, stride, padding, dilation, activation, negative_slope, scale_factor=1):
    """Validate a gated convolution call; return normalised (stride, padding, dilation, code)."""
    check_float_tensor(x, "x", 4)
    check_float_tensor(weight, "weight", 4)
    if weight.shape[0] == 0 or weight.shape[0] % 2:
        raise ValueError(
            f"weight must have 2*out_channels rows (feature filters, then gate filters), got {weight.shape[0]}")
    if min(weight.shape[1:]) <= 0:
        raise ValueError(f"weight must have positive in_channels and kernel size, got shape {tuple(weight.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[1]} channels but weight expects in_channels={weight.shape[1]}")
    if x.shape[2] <= 0 or x.shape[3] <= 0:
        raise ValueError(f"x must have a positive height and width, got shape {tuple(x.shape)}")
    if bias is not None:
        check_float_tensor(bias, "bias", 1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have {weight.shape[0]} elements (2*out_channels), got {bias.shape[0]}")
    check_same_device(x, (("weight", weight), ("bias", bias)))
    check_same_dtype(x, (("weight", weight), ("bias", bias)))
    stride = _pair(stride, "stride", 1)
    padding = _pair(padding, "padding", 0)
    dilation = _pair(dilation, "dilation", 1)
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"activation must be one of {sorted(ACTIVATION_CODES)}, got {activation!r}")
    # comparisons, not math.isfinite: under torch.compile(dynamic=True) the slope may be symbolic
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float, torch.SymInt, torch.SymFloat)) \
            or not -math.inf < negative_slope < math.inf:
        raise ValueError(f"negative_slope must be a finite number, got {negative_slope!r}")
    check_kernel_span(x.shape, weight.shape[2:], padding, dilation, scale_factor)
    return stride, padding, dilation, ACTIVATION_CODES[activation]


# ----------------------------------------------------------------------------- dispatch

def _forward(x, weight, bias, stride, padding, dilation, scale_factor, activation, negative_slope):
    stride, padding, dilation, code = check_arguments(
        x, weight, bias, stride, padding, dilation, activation, negative_slope, scale_factor)
    backend = _backend.select(OP_NAME, IMPLEMENTED, x.device)
    if backend == "reference":
        if scale_factor != 1:
            return reference.gated_deconv2d(x, weight, bias, stride, padding, dilation, activation,
                                            negative_slope, scale_factor)
        return reference.gated_conv2d(x, weight, bias, stride, padding, dilation, activation, negative_slope)

    x, weight, bias = autocast_cast(x, weight, bias)
    if backend == "triton" and x.dtype == torch.float64:
        raise TypeError("x is float64, which the triton backend does not take (float16, bfloat16, float32); "
                        "use the reference or cpu backend for float64")
    if backend == "triton" and not needs_grad(x, weight, bias) and scale_factor in (1, 2):
        return gated_conv2d_triton(x, weight, bias, list(stride), list(padding), list(dilation), scale_factor,
                                   code, float(negative_slope))
    if scale_factor != 1 and upsample.applies(weight.shape, stride, padding, dilation, scale_factor,
                                              x.shape[2], x.shape[3]):
        pre = upsample.upsample_conv2d(x, weight, bias, padding, dilation, scale_factor)
    else:
        if scale_factor != 1:
            x = F.interpolate(x, scale_factor=scale_factor, mode="nearest")
        pre = F.conv2d(x, weight, bias, stride, padding, dilation)
    if backend == "triton":
        return gated_act_forward_triton(pre, code, float(negative_slope))
    return torch.ops.fastinpaint.gated_act_forward(pre, code, float(negative_slope))


def gated_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, stride=1,
                 padding=0, dilation=1, activation: str = "elu", negative_slope: float = 0.2) -> torch.Tensor:
    """Gated convolution (DeepFill v2): ``act(conv(x, Wf) + bf) * sigmoid(conv(x, Wg) + bg)``.

    Args:
        x: (B, Cin, H, W), float16/bfloat16/float32/float64, NCHW or channels_last.
        weight: (2*Cout, Cin, kh, kw); rows [0, Cout) are the feature filters, [Cout, 2*Cout) the gates.
        bias: (2*Cout,) or None, same split.
        stride, padding, dilation: int or (h, w) pair, as for ``torch.nn.functional.conv2d``.
        activation: "elu" (DeepFill v2), "leaky_relu", "relu" or "none".
        negative_slope: slope of "leaky_relu".

    Returns:
        (B, Cout, Ho, Wo) in x's memory format.
    """
    return _forward(x, weight, bias, stride, padding, dilation, 1, activation, negative_slope)


def gated_deconv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, stride=1,
                   padding=0, dilation=1, activation: str = "elu", negative_slope: float = 0.2,
                   scale_factor: int = 2) -> torch.Tensor:
    """DeepFill v2's gated "deconv": nearest upsampling by ``scale_factor`` then :func:`gated_conv2d`.

    The Triton inference path fuses the x2 upsampling into the convolution's loads.
    """
    if isinstance(scale_factor, bool) or not isinstance(scale_factor, int) or scale_factor < 1:
        raise ValueError(f"scale_factor must be a positive int, got {scale_factor!r}")
    return _forward(x, weight, bias, stride, padding, dilation, scale_factor, activation, negative_slope)
