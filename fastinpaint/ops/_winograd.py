"""The convolution of the ``cpu`` backend's layers where Winograd's F(4x4, 3x3) applies: a
helper kernel of the gated convolution (not a public op), with its own gradient.

A 3x3, stride-1, ungrouped float32 convolution of at least :data:`MIN_CHANNELS` input and
output channels, any padding and dilation (DeepFill v2's 3x3 and dilated layers: most of its
multiply-adds), runs as one F(4x4, 3x3) computation (csrc/cpu/winograd.cpp): 36 products per
pair of channels per 4x4 outputs instead of 144, so about 2.5x fewer multiply-adds than the
direct convolution of oneDNN, in one batched matrix product between two transforms. The
backward to the input is the same kernel on the flipped, transposed weight; the weights'
gradient is computed by the transforms too (a sum over tiles of the transformed input times
the transformed output gradient, then G^T dU G); the bias's is a sum. A double backward
(``create_graph=True``) differentiates torch's convolution backward.

Accuracy: the transforms round more than a direct convolution does in float32 (about 1e-5
of the output's scale at 96 to 192 channels, against about 1e-6; tests/test_winograd.py
bounds it against float64). ``FASTINPAINT_WINOGRAD=0`` in the environment (read at each eager call;
a torch.compile'd graph keeps what it saw when traced) or :func:`set_enabled` (False) keeps
oneDNN's direct convolution everywhere.

The output is written in the memory format ``torch.nn.functional.conv2d`` gives (the kernel
reads a channels-last copy of an NCHW input), so a layer's output format does not change; the
input's gradient is channels-last (the layer below reads it so; autograd lays out a leaf's
``.grad`` as the leaf).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from . import _cpu_conv
from ._layout import conv_output_format
from ._registry import differentiable, kernel

#: fewer input or output channels than this: the direct convolution (the transforms' cost
#: and the small products leave little of the gain)
MIN_CHANNELS = 32

_enabled = True


def set_enabled(enabled: bool) -> None:
    """Let (True, the default) or stop (False) the ``cpu`` backend's layers using the Winograd
    convolution (the environment's ``FASTINPAINT_WINOGRAD=0`` stops it too)."""
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    _enabled = enabled


def enabled() -> bool:
    """Whether the Winograd convolution may run (:func:`set_enabled` and ``FASTINPAINT_WINOGRAD``)."""
    return _enabled and os.environ.get("FASTINPAINT_WINOGRAD", "1") != "0"


def _fake(x, weight, bias, padding, dilation, transposed, channels_last):
    out_channels = weight.shape[1] if transposed else weight.shape[0]
    ho = x.shape[2] + 2 * padding[0] - 2 * dilation[0]
    wo = x.shape[3] + 2 * padding[1] - 2 * dilation[1]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.new_empty((x.shape[0], out_channels, ho, wo)).contiguous(memory_format=fmt)


# channels_last: the output's layout (NCHW otherwise, written per channel from each tile)
WINOGRAD_CONV = kernel("winograd_conv3x3",
                       "(Tensor x, Tensor weight, Tensor? bias, int[] padding, int[] dilation, bool transposed, "
                       "bool channels_last) -> Tensor", _fake)


def _setup_context(ctx, inputs, output):
    x, weight, bias, padding, dilation, transposed, _ = inputs
    if transposed:
        raise RuntimeError("winograd_conv3x3: the transposed form (a backward) has no gradient of its own")
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None
    ctx.padding, ctx.dilation = list(padding), list(dilation)


def _backward(ctx, _kernel, grad):
    x, weight = ctx.saved_tensors
    wants_x, wants_w, wants_b = ctx.needs_input_grad[:3]
    bias_sizes = [weight.shape[0]] if ctx.has_bias else None
    if torch.is_grad_enabled():  # create_graph=True: torch's differentiable convolution backward
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad, x, weight, bias_sizes, [1, 1], ctx.padding, ctx.dilation, False, [0, 0], 1,
            [wants_x, wants_w, wants_b and ctx.has_bias])
        return gx, gw, gb, None, None, None, None
    gx = gw = gb = None
    if wants_x or wants_w:  # both kernels read it channels-last: one copy at most
        grad = _cpu_conv.to_layout(grad, True)
    if wants_x:
        back_padding = [2 * d - p for p, d in zip(ctx.padding, ctx.dilation)]
        # channels-last as the kernel writes it: the layer below (a gating kernel, or this one's
        # backward) reads it in that layout, and autograd lays out a leaf's .grad as the leaf
        gx = WINOGRAD_CONV("cpu", grad, weight, None, back_padding, ctx.dilation, True, True)
    if wants_w:
        gw = WEIGHT_GRAD("cpu", x, grad, ctx.padding, ctx.dilation)
    if wants_b and ctx.has_bias:
        gb = grad.sum((0, 2, 3))
    return gx, gw, gb, None, None, None, None


def _weight_grad_fake(x, grad, padding, dilation):
    return x.new_empty((grad.shape[1], x.shape[1], 3, 3))


WEIGHT_GRAD = kernel("winograd_conv3x3_weight_grad",
                     "(Tensor x, Tensor grad, int[] padding, int[] dilation) -> Tensor", _weight_grad_fake)


differentiable(WINOGRAD_CONV, None, _setup_context, _backward)


#: fewer tiles than this: the direct convolution (the weights' transform, per call, would
#: cost more than the products save)
MIN_TILES = 32

#: the tiles' products must be at most this share of the direct convolution's multiply-adds
#: (36 per tile against 9 per output): a dilated map whose sub-grids are not multiples of 4
#: leaves tiles partly empty (dilation 16 on a 32x32 map: 2x2 outputs in each 4x4 tile)
MAX_WORK_SHARE = 0.6


def tiles(batch: int, ho: int, wo: int, dilation: Sequence[int]) -> int:
    """The kernel's 4x4 tiles for a (ho, wo) output: per dilation sub-grid, its outputs in 4x4 tiles."""
    def along(size, d):
        count = 0
        for start in range(min(d, size)):
            outputs = -(-(size - start) // d)  # the sub-grid starting at `start`: ceil((size - start) / d)
            count += -(-outputs // 4)          # its tiles along this axis
        return count
    return batch * along(ho, dilation[0]) * along(wo, dilation[1])


@torch.compiler.assume_constant_result
def _kernels_built() -> bool:
    """Whether the loaded fastinpaint._C has both kernels for CPU tensors (a stale build: the
    direct convolution); a constant for torch.compile (evaluated once while tracing)."""
    return WINOGRAD_CONV.built_for("cpu") and WEIGHT_GRAD.built_for("cpu")


def applies(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int] = (1, 1),
            dilation: Sequence[int] = (1, 1)) -> bool:
    """Whether :func:`conv2d` runs the Winograd kernel for this call (the caller's backend is
    ``cpu``): CPU float32, a 3x3 kernel, stride 1, >= :data:`MIN_CHANNELS` channels in and out,
    >= :data:`MIN_TILES` tiles that save enough products (:data:`MAX_WORK_SHARE`), enabled, and
    the loaded extension has the kernel. (Traced with symbolic sizes, torch.compile guards on
    the rule's outcome, as on any branch on sizes.)"""
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and tuple(weight.shape[2:]) == (3, 3) and tuple(stride) == (1, 1)
            and weight.shape[0] >= MIN_CHANNELS and weight.shape[1] >= MIN_CHANNELS and enabled()
            and _kernels_built()):
        return False
    ho = x.shape[2] + 2 * padding[0] - 2 * dilation[0]
    wo = x.shape[3] + 2 * padding[1] - 2 * dilation[1]
    if ho <= 0 or wo <= 0:
        return False
    n = tiles(x.shape[0], ho, wo, dilation)
    return n >= MIN_TILES and 36 * n <= MAX_WORK_SHARE * 9 * x.shape[0] * ho * wo


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding,
           dilation) -> torch.Tensor:
    """``torch.nn.functional.conv2d`` (groups 1) for the ``cpu`` backend: by Winograd's F(4x4, 3x3)
    where :func:`applies`, otherwise the direct one (ops/_cpu_conv.py: fastinpaint's input
    gradient for inputs of few channels); the output in conv2d's memory format."""
    if not applies(x, weight, stride, padding, dilation):
        return _cpu_conv.conv2d(x, weight, bias, stride, padding, dilation)
    return winograd_conv2d(x, weight, bias, padding, dilation)


def winograd_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], padding,
                    dilation, channels_last: Optional[bool] = None) -> torch.Tensor:
    """The Winograd kernel's 3x3, stride-1 convolution (float32 CPU tensors, whatever
    :func:`applies` says), written in conv2d's memory format, or channels-last where
    ``channels_last`` (a caller that writes its own NCHW output from it: the gated layers)."""
    if channels_last is None:
        channels_last = conv_output_format(x, weight) == torch.channels_last
    return WINOGRAD_CONV("cpu", x, weight, bias, list(padding), list(dilation), False, channels_last)
