"""The direct convolution of the ``cpu`` backend's layers (where Winograd's does not apply,
ops/_winograd.py): torch's (oneDNN's) convolution, with three changes where they pay off, in one
op with its own gradient. A helper of the layers, not a public op.

* **Inputs of few channels** (an image and its mask: DeepFill v2's, SN-PatchGAN's and the PConv
  U-Net's first layers), when the input needs a gradient. oneDNN computes the input's gradient
  as a convolution whose outputs are the input's channels, vectorised over them 16 at a time:
  with 3 to 5 channels most lanes are padding, and at DeepFill v2's first layer (5 -> 48
  filters, 5x5, 256x256) the gradient took about four times the forward's time. fastinpaint's
  kernel (csrc/cpu/conv_input_grad.cpp) multiplies each band of the output gradient by the
  weight in one matrix product (vectorised over the output channels) and adds each product onto
  the input position it belongs to: 2.1-2.7x oneDNN's speed at these layers
  (benchmarks/conv_grads.py; up to 4.0x in earlier runs). The weight's and the bias's
  gradients stay oneDNN's, on channels-last copies (its weight gradient with 4 input channels
  took twice as long in NCHW).
* **Strided layers' weight gradient** (stride 2 or more in both directions, more than
  :data:`MAX_CHANNELS` input channels: the downsampling layers of DeepFill v2 and SN-PatchGAN),
  when the weight needs a gradient (not in the spectral-normalised convolution's folded form, on
  small maps, where oneDNN's one call for both gradients was the faster). oneDNN's took about
  twice the time of the same matrix product in torch's GEMM there; fastinpaint's kernel
  (csrc/cpu/conv_weight_grad.cpp) gathers each band's patches into a buffer in cache and
  accumulates the band's product: 1.3-1.8x oneDNN's speed at these layers, slower at stride 1
  and at few channels (benchmarks/conv_grads.py).
* **Channels-last inside an NCHW layer** (``channels_last_inside``: the spectral-normalised
  convolution's unfolded layers). oneDNN's channels-last convolution beat its NCHW one by up to
  1.5x at SN-PatchGAN's layers (benchmarks/conv_layouts.py), and inductor runs the compiled
  eager model's convolutions so, converting in its fused loops. Here the input is copied to
  channels-last and the output back by fastinpaint's transposing copy
  (csrc/cpu/layout_copy.cpp; torch's own copy to NCHW took about 6x a plain copy), the
  weight too in the forward (at SN-PatchGAN's conv4, a 256x256x5x5 weight, 8.56 ms against
  8.73 ms with oneDNN reordering the NCHW weight itself, a tie at smaller weights:
  benchmarks/conv_layouts.py, files cpu_conv_layouts_sn_patchgan_weight_fp32_20261207.*); in the
  backward the output's gradient goes to channels-last, the input's copy is made again (not
  saved) and the input's gradient comes back NCHW. Not under torch.compile, where inductor lays
  out the traced convolution itself, except where the op runs for the strided weight gradient
  (the convolution is then inside the op, out of inductor's sight).
* **Channels-last out of an NCHW layer** (:func:`conv2d_channels_last_out`: the gated
  convolution's layers not on Winograd's, any number of channels, under torch.compile too). As
  above, but the output stays channels-last: the gating kernel reads it so and writes the layer's
  NCHW output itself (gated_conv_act_forward_nchw), so no copy of the convolution's output is made.
  oneDNN's channels-last forward ran 1.2x and 2.5x as fast as its NCHW one at DeepFill v2's
  5-channel input layer, 2.0x and 2.4x at its stride-2 layer, in two runs
  (benchmarks/conv_layouts.py, files cpu_conv_layouts_fp32_*20261207.md).

Every output and gradient keeps its tensor's layout: the output is in torch's convolution's
format for the input (NCHW for an NCHW one), the input's gradient in the input's, the weight's
in the weight's. A double backward (``create_graph=True``) differentiates torch's convolution
backward. ``FASTINPAINT_CONV_INPUT_GRAD=0``, ``FASTINPAINT_CONV_WEIGHT_GRAD=0`` and
``FASTINPAINT_CONV_CHANNELS_LAST=0`` in the environment turn each change off (read at each eager
call; a torch.compile'd graph keeps what it saw when traced).
"""

from __future__ import annotations

import os
from typing import List, Optional

import torch
import torch.nn.functional as F

from ._common import conv_output_size, needs_grad
from ._layout import conv_output_format, is_channels_last, suggest_memory_format
from ._registry import kernel

CL = torch.channels_last

#: at most this many input channels: fastinpaint's input gradient (oneDNN pads the channels to
#: 16 lanes; at 16 its own gradient was the faster, measured with benchmarks/conv_grads.py)
MAX_CHANNELS = 8


def _input_grad_fake(grad, weight, input_size, stride, padding, dilation, channels_last):
    return grad.new_empty(input_size).contiguous(memory_format=CL if channels_last else torch.contiguous_format)


INPUT_GRAD = kernel("conv2d_input_grad",
                    "(Tensor grad, Tensor weight, int[] input_size, int[] stride, int[] padding, int[] dilation, "
                    "bool channels_last) -> Tensor", _input_grad_fake)


def _weight_grad_fake(grad, x, weight_size, stride, padding, dilation, channels_last):
    return grad.new_empty(weight_size).contiguous(memory_format=CL if channels_last else torch.contiguous_format)


WEIGHT_GRAD = kernel("conv2d_weight_grad",
                     "(Tensor grad, Tensor x, int[] weight_size, int[] stride, int[] padding, int[] dilation, "
                     "bool channels_last) -> Tensor", _weight_grad_fake)


def _layout_copy_fake(x, channels_last):
    return x.new_empty(x.shape).contiguous(memory_format=CL if channels_last else torch.contiguous_format)


LAYOUT_COPY = kernel("layout_copy", "(Tensor x, bool channels_last) -> Tensor", _layout_copy_fake)


@torch.compiler.assume_constant_result
def _kernels_built() -> bool:
    """Whether the loaded fastinpaint._C has the three kernels for CPU tensors (a constant for torch.compile)."""
    return INPUT_GRAD.built_for("cpu") and WEIGHT_GRAD.built_for("cpu") and LAYOUT_COPY.built_for("cpu")


def _dense_float(x: torch.Tensor, weight: torch.Tensor, groups: int) -> bool:
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and weight.dtype == x.dtype
            and groups == 1 and not torch.is_autocast_enabled("cpu") and _kernels_built())


def applies(x: torch.Tensor, weight: torch.Tensor, groups: int = 1) -> bool:
    """Whether fastinpaint's input gradient can run for this convolution: CPU, float32 or float64
    (one dtype), no groups, at most :data:`MAX_CHANNELS` input channels, outside CPU autocast,
    enabled (``FASTINPAINT_CONV_INPUT_GRAD``), built."""
    return (_dense_float(x, weight, groups) and x.shape[1] <= MAX_CHANNELS
            and os.environ.get("FASTINPAINT_CONV_INPUT_GRAD", "1") != "0")


def weight_grad_applies(x: torch.Tensor, weight: torch.Tensor, stride, groups: int = 1) -> bool:
    """Whether fastinpaint's weight gradient runs for this convolution: as :func:`applies`, but
    more than :data:`MAX_CHANNELS` input channels and a stride of at least 2 in both directions
    (at stride 1 and with few channels it was the slower), enabled
    (``FASTINPAINT_CONV_WEIGHT_GRAD``)."""
    return (_dense_float(x, weight, groups) and x.shape[1] > MAX_CHANNELS and min(stride) >= 2
            and os.environ.get("FASTINPAINT_CONV_WEIGHT_GRAD", "1") != "0")


def _nchw(x: torch.Tensor) -> bool:
    """NCHW-contiguous and not also channels-last (more than one position and channel)."""
    return x.is_contiguous() and not x.is_contiguous(memory_format=CL)


def _channels_last_enabled() -> bool:
    return os.environ.get("FASTINPAINT_CONV_CHANNELS_LAST", "1") != "0"


def can_run_channels_last_inside(x: torch.Tensor, weight: torch.Tensor, groups: int) -> bool:
    """As :func:`applies` but more than :data:`MAX_CHANNELS` input channels (with fewer, oneDNN's
    NCHW forward was as fast as compile(eager)'s, and channels-last inside measured 0.83x of it
    at SN-PatchGAN's first layer in an ad-hoc run: the copy of its large output back to NCHW), an
    NCHW input (not also channels-last: more than one position), enabled
    (``FASTINPAINT_CONV_CHANNELS_LAST``)."""
    return _dense_float(x, weight, groups) and x.shape[1] > MAX_CHANNELS and _nchw(x) and _channels_last_enabled()


def runs_channels_last_out(x: torch.Tensor, weight: torch.Tensor, groups: int = 1) -> bool:
    """Whether a layer that writes its NCHW output itself from a channels-last convolution (the
    gated convolution's gating, :func:`conv2d_channels_last_out`) runs its convolution so: as
    :func:`applies`, an NCHW input, any number of channels (no copy of the convolution's output back
    to NCHW), enabled (``FASTINPAINT_CONV_CHANNELS_LAST``); under torch.compile too (the layer's
    kernel reads the channels-last output, so inductor has no layout left to choose)."""
    return _dense_float(x, weight, groups) and _nchw(x) and _channels_last_enabled()


def runs_channels_last_inside(x: torch.Tensor, weight: torch.Tensor, groups: int = 1) -> bool:
    """Whether a layer that asks for it runs channels-last inside: where it can
    (:func:`can_run_channels_last_inside`) and not under torch.compile, where inductor lays out the
    convolution it traces (:func:`conv2d` runs channels-last inside under torch.compile where the
    op hides the convolution from inductor)."""
    return can_run_channels_last_inside(x, weight, groups) and not torch.compiler.is_compiling()


def to_layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``t`` in the layout asked (fastinpaint's copy where it has to move; ``t`` itself where it is in it)."""
    fmt = CL if channels_last else torch.contiguous_format
    return t if t.is_contiguous(memory_format=fmt) else LAYOUT_COPY("cpu", t, channels_last)


def conv_channels_last(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding,
                       dilation, keep_channels_last: bool = False) -> torch.Tensor:
    """torch's convolution (one group) on channels-last copies of an NCHW input and of the weight
    (:func:`to_layout`), its output copied back to NCHW unless ``keep_channels_last``: the one
    body of every channels-last-inside or -out convolution here and of the spectral-normalised
    fold's (ops/_spectral_norm.py)."""
    y = torch.ops.aten.convolution(to_layout(x, True), to_layout(weight, True), bias, list(stride), list(padding),
                                   list(dilation), False, [0, 0], 1)
    return y if keep_channels_last else to_layout(y, False)


def _conv_fake(x, weight, bias, stride, padding, dilation, inside, keep_channels_last):
    ho = conv_output_size(x.shape[2], weight.shape[2], stride[0], padding[0], dilation[0])
    wo = conv_output_size(x.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])
    if inside:
        fmt = CL if keep_channels_last else torch.contiguous_format
    else:
        fmt = conv_output_format(x, weight)
    return x.new_empty((x.shape[0], weight.shape[0], ho, wo)).contiguous(memory_format=fmt)


@torch.library.custom_op("fastinpaint::conv2d_cpu", mutates_args=())
def _conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: List[int],
          padding: List[int], dilation: List[int], inside: bool, keep_channels_last: bool) -> torch.Tensor:
    """torch's convolution; ``inside``: on channels-last copies of the (NCHW) input and the weight, the output copied
    back to NCHW unless ``keep_channels_last``."""
    if not inside:
        return torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, False, [0, 0], 1)
    return conv_channels_last(x, weight, bias, stride, padding, dilation, keep_channels_last)


_conv.register_fake(_conv_fake)


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, _, _ = inputs
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
        return gx, gw, gb, None, None, None, None, None
    grad = to_layout(grad, True)   # both the kernels and oneDNN read it channels-last
    x_is_cl = suggest_memory_format(x) == CL
    kernel_x = need_x and applies(x, weight)
    kernel_w = need_w and weight_grad_applies(x, weight, stride)
    torch_x, torch_w = need_x and not kernel_x, need_w and not kernel_w
    gx = gw = gb = None
    x_cl = to_layout(x, True) if torch_x or need_w else None
    if kernel_x:
        gx = INPUT_GRAD("cpu", grad, weight, list(x.shape), stride, padding, dilation, x_is_cl)
    if kernel_w:
        gw = WEIGHT_GRAD("cpu", grad, x_cl, list(weight.shape), stride, padding, dilation, is_channels_last(weight))
    if torch_x or torch_w:
        # the bias's gradient from oneDNN only beside the weight's: asked without it, oneDNN
        # computed the weight's gradient anyway (an input gradient and a bias's took as long as all three)
        gx_torch, gw_torch, gb = torch.ops.aten.convolution_backward(grad, x_cl, weight, bias_sizes, stride,
                                                                     padding, dilation, False, [0, 0], 1,
                                                                     [torch_x, torch_w, need_b and torch_w])
        if torch_x:
            gx = to_layout(gx_torch, x_is_cl)
        if torch_w:
            gw = gw_torch.contiguous(memory_format=CL if is_channels_last(weight) else torch.contiguous_format)
    if need_b and gb is None:   # the bias's alone: a sum, no call of torch's backward
        gb = grad.sum((0, 2, 3))
    return gx, gw, gb, None, None, None, None, None


_conv.register_autograd(_backward, setup_context=_setup_context)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding,
           dilation, groups: int = 1, channels_last_inside: bool = False) -> torch.Tensor:
    """``torch.nn.functional.conv2d`` (``stride``, ``padding`` and ``dilation`` pairs) for the
    ``cpu`` backend's layers: fastinpaint's input gradient where :func:`applies` and the input
    needs a gradient, its weight gradient where :func:`weight_grad_applies` and the weight needs
    one; channels-last inside where ``channels_last_inside`` and :func:`runs_channels_last_inside`,
    and under torch.compile where the weight's gradient is fastinpaint's on an NCHW map of more than
    :data:`MAX_CHANNELS` channels; torch's convolution otherwise."""
    grad = torch.is_grad_enabled()
    few = grad and x.requires_grad and applies(x, weight, groups)
    strided = grad and weight.requires_grad and weight_grad_applies(x, weight, stride, groups)
    if torch.compiler.is_compiling():
        # the op is opaque to inductor, which would otherwise run the traced convolution of an
        # NCHW map channels-last: the op does so itself
        inside = strided and can_run_channels_last_inside(x, weight, groups)
    else:
        inside = channels_last_inside and runs_channels_last_inside(x, weight, groups)
    if not (few or strided or inside):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if not (few or strided or needs_grad(x, weight, bias)):   # no gradient: the op's body, without its wrapper
        return conv_channels_last(x, weight, bias, stride, padding, dilation)
    return _conv(x, weight, bias, list(stride), list(padding), list(dilation), inside, False)


def conv2d_channels_last_out(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride,
                             padding, dilation) -> torch.Tensor:
    """The convolution of an NCHW input (where :func:`runs_channels_last_out`) on a channels-last copy
    of it, the output left channels-last for a caller that writes its own NCHW output from it; with a
    gradient, the op's (fastinpaint's input and weight gradients where they apply)."""
    if needs_grad(x, weight, bias):
        return _conv(x, weight, bias, list(stride), list(padding), list(dilation), True, True)
    return conv_channels_last(x, weight, bias, stride, padding, dilation, keep_channels_last=True)
