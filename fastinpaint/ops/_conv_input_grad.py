"""The convolution of the ``cpu`` backend's layers whose input has few channels (an image and
its mask: DeepFill v2's first layers, SN-PatchGAN's first): torch's convolution forward, and a
backward whose input gradient is fastinpaint's kernel (csrc/cpu/conv_input_grad.cpp). A helper
of the layers (not a public op), as ``_winograd.py`` is.

oneDNN computes the input's gradient as a convolution whose outputs are the input's channels,
vectorised over them 16 at a time: with 4 or 5 channels most of the lanes are padding, and at
DeepFill v2's first layer (5 -> 48 channels, 5x5, 256x256) the gradient took about four times
the forward's time. The kernel instead multiplies each band of the output gradient by the
weight in one matrix product (vectorised over the output channels) and adds each product
onto the input position it belongs to. The weight's and the bias's gradients stay torch's,
computed from channels-last copies of the input and the output gradient (oneDNN's weight
gradient with 4 input channels took twice as long in NCHW). The input's gradient comes back
in the input's layout; a double backward (``create_graph=True``) differentiates torch's
convolution backward.
"""

from __future__ import annotations

import os
from typing import List, Optional

import torch
import torch.nn.functional as F

from ._common import conv_output_size
from ._layout import conv_output_format, is_channels_last, suggest_memory_format
from ._registry import kernel

#: at most this many input channels: the kernel (oneDNN pads the channels to 16 lanes; at 16
#: its own gradient was the faster, measured with benchmarks/conv_input_grad.py)
MAX_CHANNELS = 8


def _fake(grad, weight, input_size, stride, padding, dilation, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return grad.new_empty(input_size).contiguous(memory_format=fmt)


INPUT_GRAD = kernel("conv2d_input_grad",
                    "(Tensor grad, Tensor weight, int[] input_size, int[] stride, int[] padding, int[] dilation, "
                    "bool channels_last) -> Tensor", _fake)


def enabled() -> bool:
    """Whether the kernel may run (``FASTINPAINT_CONV_INPUT_GRAD=0`` in the environment, read at
    each call, stops it)."""
    return os.environ.get("FASTINPAINT_CONV_INPUT_GRAD", "1") != "0"


@torch.compiler.assume_constant_result
def _kernel_built() -> bool:
    """Whether the loaded fastinpaint._C has the kernel for CPU tensors (a constant for torch.compile)."""
    return INPUT_GRAD.built_for("cpu")


def applies(x: torch.Tensor, weight: torch.Tensor, groups: int = 1) -> bool:
    """Whether :func:`conv2d` runs the kernel's backward: CPU, float32 or float64 (one dtype), no
    groups, at most :data:`MAX_CHANNELS` input channels, outside CPU autocast, enabled, and built."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and weight.dtype == x.dtype
            and groups == 1 and x.shape[1] <= MAX_CHANNELS and not torch.is_autocast_enabled("cpu")
            and enabled() and _kernel_built())


def _conv_fake(x, weight, bias, stride, padding, dilation):
    ho = conv_output_size(x.shape[2], weight.shape[2], stride[0], padding[0], dilation[0])
    wo = conv_output_size(x.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])
    return x.new_empty((x.shape[0], weight.shape[0], ho, wo)).contiguous(memory_format=conv_output_format(x, weight))


@torch.library.custom_op("fastinpaint::conv2d_few_channels", mutates_args=())
def _conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: List[int],
          padding: List[int], dilation: List[int]) -> torch.Tensor:
    """torch's convolution (its forward unchanged); the gradient below."""
    return torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, False, [0, 0], 1)


_conv.register_fake(_conv_fake)


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None
    ctx.geometry = (list(stride), list(padding), list(dilation))


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    stride, padding, dilation = ctx.geometry
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = need_b and ctx.has_bias
    bias_sizes = [weight.shape[0]] if ctx.has_bias else None
    if torch.is_grad_enabled():  # create_graph=True: torch's differentiable convolution backward
        gx, gw, gb = torch.ops.aten.convolution_backward(grad, x, weight, bias_sizes, stride, padding, dilation,
                                                         False, [0, 0], 1, [need_x, need_w, need_b])
        return gx, gw, gb, None, None, None
    gx = gw = gb = None
    grad = grad.contiguous(memory_format=torch.channels_last)   # both the kernel and oneDNN read it so
    if need_x:
        gx = INPUT_GRAD("cpu", grad, weight, list(x.shape), stride, padding, dilation,
                        suggest_memory_format(x) == torch.channels_last)
    if need_w or need_b:
        _, gw, gb = torch.ops.aten.convolution_backward(
            grad, x.contiguous(memory_format=torch.channels_last), weight, bias_sizes, stride, padding, dilation,
            False, [0, 0], 1, [False, need_w, need_b])
        if gw is not None:
            gw = gw.contiguous(memory_format=torch.channels_last if is_channels_last(weight)
                               else torch.contiguous_format)
    return gx, gw, gb, None, None, None


_conv.register_autograd(_backward, setup_context=_setup_context)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding,
           dilation, groups: int = 1) -> torch.Tensor:
    """``torch.nn.functional.conv2d`` (``stride``, ``padding`` and ``dilation`` pairs) for the ``cpu``
    backend's layers: with the kernel's input gradient where :func:`applies` and the input needs a
    gradient, torch's convolution otherwise."""
    if not (x.requires_grad and torch.is_grad_enabled() and applies(x, weight, groups)):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return _conv(x, weight, bias, list(stride), list(padding), list(dilation))
