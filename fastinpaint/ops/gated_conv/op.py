"""Gated convolution: argument checks, autograd wiring, torch.library registration,
and dispatch to a backend.

Paths per backend:
  reference  eager conv -> split -> act * sigmoid (reference.py)
  cpu, cuda  torch's convolution -> fused gating kernel of fastinpaint._C
             (the gated deconv's upsampling folded into the convolution: upsample.py); on
             the cpu backend a 3x3, stride-1 float32 convolution of >= 32 channels in and out
             is Winograd's F(4x4, 3x3) (ops/_winograd.py), under torch.compile too; an
             NCHW layer's convolution writes a channels-last pre-activation (oneDNN's runs
             channels-last: up to 2.5x as fast so at DeepFill v2's first and stride-2
             layers) and one kernel gates it into an NCHW output
             (gated_conv_act_forward_nchw), eager and under torch.compile
  triton     with autograd: torch's convolution -> fused Triton gating kernel;
             without (inference, no_grad): one implicit-GEMM Triton kernel with the
             gating in its epilogue, which never writes the 2*Cout pre-activation.

The fused gating saves only the pre-activation for backward (plus the x and weight
the convolution itself saves) and recomputes act and sigmoid from it; the eager
formulation also keeps act(f) and sigmoid(g).

Under ``torch.compile`` the gating of an NCHW pre-activation can go to inductor as aten ops
(:data:`COMPILED_GATING`), which fuses them into its own loops around the convolution, as it
does for an eager model. On the cpu backend's float32 / float64 NCHW layers there is no NCHW
pre-activation left (the NCHW-writing kernel above; "aten" turns it off), so this applies
to the half types; on channels_last maps the fused kernel stays: there it was as fast as
inductor's loops or faster in the compiled model. The
gated deconv keeps its phase-decomposed convolution (an aten convolution inductor sees),
gated per phase by the fused kernel and interleaved by its own op (both opaque to inductor,
which compiles either into slower loops). Eager calls use the fused kernel everywhere.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .._activation import activation_code
from .._common import autocast_cast, check_float_tensor, check_kernel_span, check_same_device, check_same_dtype, \
    conv_output_size, needs_grad, pair
from .._layout import conv_output_format, is_channels_last
from .._registry import Op, differentiable, kernel
from .. import _cpu_conv, _winograd
from . import reference, upsample

# ----------------------------------------------------------------------------- kernels

#: the gating each backend runs while torch.compile traces: "aten" (ops inductor fuses with
#: their neighbours; a fused kernel is an opaque call to it), "kernel" (the fused kernel), or
#: "aten_nchw" (aten ops on NCHW pre-activations, the kernel on channels_last ones: on the CPU
#: inductor's loops won in NCHW, the kernel tied or won in channels_last;
#: benchmarks/deepfill_v2_compiled_gating.py; the cpu backend's float NCHW layers write a
#: channels-last pre-activation: they keep their kernel unless "aten")
COMPILED_GATING = {"cpu": "aten_nchw", "cuda": "kernel", "triton": "kernel"}


def _gate_out_like(pre: torch.Tensor, channels: int) -> torch.Tensor:
    """Empty (B, channels, H, W) in the memory format the gating kernels produce for ``pre``."""
    fmt = torch.channels_last if is_channels_last(pre) else torch.contiguous_format
    return pre.new_empty((pre.shape[0], channels, pre.shape[2], pre.shape[3])).contiguous(memory_format=fmt)


def _gate_forward_fake(pre, activation, negative_slope):
    return _gate_out_like(pre, pre.shape[1] // 2)


def _gate_forward_nchw_fake(pre, activation, negative_slope):
    return pre.new_empty((pre.shape[0], pre.shape[1] // 2, pre.shape[2], pre.shape[3]))


def _gate_backward_fake(grad_out, pre, activation, negative_slope):
    return _gate_out_like(pre, pre.shape[1])


def _conv_fake(x, weight, bias, stride, padding, dilation, upsample, activation, negative_slope):
    kh, kw = weight.shape[2], weight.shape[3]
    ho = conv_output_size(x.shape[2] * upsample, kh, stride[0], padding[0], dilation[0])
    wo = conv_output_size(x.shape[3] * upsample, kw, stride[1], padding[1], dilation[1])
    return x.new_empty((x.shape[0], weight.shape[0] // 2, ho, wo)).contiguous(
        memory_format=conv_output_format(x, weight))


# the fused gating y = act(pre[:, :C]) * sigmoid(pre[:, C:]) of a (B, 2C, H, W) pre-activation
GATE_FORWARD = kernel("gated_conv_act_forward", "(Tensor pre, int activation, float negative_slope) -> Tensor",
                      _gate_forward_fake, triton="gate_forward")
GATE_BACKWARD = kernel("gated_conv_act_backward",
                       "(Tensor grad_out, Tensor pre, int activation, float negative_slope) -> Tensor",
                       _gate_backward_fake, triton="gate_backward")
# cpu only: the gating of a channels-last pre-activation written NCHW (an NCHW layer's convolution
# written channels-last: _cpu_conv.conv2d_channels_last_out or Winograd's); the gradient is GATE_BACKWARD's
GATE_FORWARD_NCHW = kernel("gated_conv_act_forward_nchw", "(Tensor pre, int activation, float negative_slope) -> Tensor",
                           _gate_forward_nchw_fake)
# inference only (Triton): implicit-GEMM convolution with the gating in its epilogue
CONV_FORWARD = kernel("gated_conv2d",
                      "(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, int[] dilation, "
                      "int upsample, int activation, float negative_slope) -> Tensor",
                      _conv_fake, triton="conv_forward", cpp=False)
OP = Op("gated_conv2d", {
    "reference": "eager conv2d -> split -> act * sigmoid (reference.py)",
    "triton": "with autograd: torch's conv2d, then the fused Triton gating kernel; inference: one "
              "implicit-GEMM Triton convolution with the gating in its epilogue",
    "cuda": "torch's conv2d (cuDNN), then fastinpaint's fused CUDA gating kernel (csrc/cuda/gated_conv.cu)",
    "cpu": "torch's conv2d (oneDNN; Winograd F(4x4, 3x3) for 3x3 stride-1 layers, csrc/cpu/winograd.cpp; "
           "fastinpaint's input gradient for inputs of few channels, csrc/cpu/conv_input_grad.cpp, and "
           "weight gradient for strided layers, csrc/cpu/conv_weight_grad.cpp), then "
           "fastinpaint's fused, vectorised C++ gating kernel (csrc/cpu/gated_conv.cpp); an NCHW layer's "
           "convolution writes channels-last and one kernel gates it into NCHW; under torch.compile the "
           "gating of an NCHW float16 / bfloat16 layer is aten ops inductor fuses",
}, kernels=(GATE_FORWARD, GATE_BACKWARD))


def _setup_context(ctx, inputs, output):
    pre, activation, negative_slope = inputs
    ctx.save_for_backward(pre)
    ctx.activation, ctx.negative_slope = activation, negative_slope


def _backward(ctx, gate_backward, grad_out):
    (pre,) = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: a differentiable backward (double backward)
        return reference.gate_backward(grad_out, pre, ctx.activation, ctx.negative_slope), None, None
    return gate_backward(grad_out, pre, ctx.activation, ctx.negative_slope), None, None


differentiable(GATE_FORWARD, GATE_BACKWARD, _setup_context, _backward)
differentiable(GATE_FORWARD_NCHW, GATE_BACKWARD, _setup_context, _backward)


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
    stride = pair(stride, "stride", 1)
    padding = pair(padding, "padding", 0)
    dilation = pair(dilation, "dilation", 1)
    code = activation_code(activation, negative_slope)
    check_kernel_span(x.shape, weight.shape[2:], padding, dilation, scale_factor)
    return stride, padding, dilation, code


# ----------------------------------------------------------------------------- dispatch

def _forward(x, weight, bias, stride, padding, dilation, scale_factor, activation, negative_slope):
    stride, padding, dilation, code = check_arguments(
        x, weight, bias, stride, padding, dilation, activation, negative_slope, scale_factor)
    backend = OP.select(x)
    if backend == "reference":
        if scale_factor != 1:
            return reference.gated_deconv2d(x, weight, bias, stride, padding, dilation, activation,
                                            negative_slope, scale_factor)
        return reference.gated_conv2d(x, weight, bias, stride, padding, dilation, activation, negative_slope)

    x, weight, bias = autocast_cast(x, weight, bias)
    if backend == "triton" and not needs_grad(x, weight, bias) and scale_factor in (1, 2):
        return CONV_FORWARD(backend, x, weight, bias, list(stride), list(padding), list(dilation), scale_factor,
                            code, float(negative_slope))
    if scale_factor != 1 and upsample.applies(weight.shape, stride, padding, dilation, scale_factor,
                                              x.shape[2], x.shape[3]):
        # the phase-stacked convolution, gated per phase, then the interleave of the gated half
        # (the fused kernel here under torch.compile too: inductor's own gating of the phases,
        # timed beside it on the CPU, ran about 3x slower)
        phases, plan = upsample.phase_conv2d(x, weight, bias, padding, dilation, scale_factor)
        gated = GATE_FORWARD(backend, upsample.phase_rows(phases, scale_factor), code, float(negative_slope))
        return upsample.interleave(upsample.from_phase_rows(gated, scale_factor, phases.shape, plan[-1]), plan)
    if scale_factor != 1:
        x = F.interpolate(x, scale_factor=scale_factor, mode="nearest")
    gating = COMPILED_GATING.get(backend, "kernel")
    if (backend == "cpu" and not (torch.compiler.is_compiling() and gating == "aten")
            and _gates_nchw_from_channels_last(x, weight)):
        # an NCHW layer's convolution written channels-last, gated into NCHW by one kernel (under
        # torch.compile too, where inductor's own channels-last convolution and fused gating back
        # to NCHW were slower)
        if _winograd.applies(x, weight, stride, padding, dilation):
            pre = _winograd.winograd_conv2d(x, weight, bias, padding, dilation, channels_last=True)
        else:
            pre = _cpu_conv.conv2d_channels_last_out(x, weight, bias, stride, padding, dilation)
        return GATE_FORWARD_NCHW(backend, pre, code, float(negative_slope))
    if backend == "cpu":  # Winograd for 3x3 stride-1 layers, the few-channel input gradient (ops/_winograd.py)
        pre = _winograd.conv2d(x, weight, bias, stride, padding, dilation)
    else:
        pre = F.conv2d(x, weight, bias, stride, padding, dilation)
    if torch.compiler.is_compiling() and (gating == "aten" or (gating == "aten_nchw" and not is_channels_last(pre))):
        return reference.gate(pre, activation, negative_slope)
    return GATE_FORWARD(backend, pre, code, float(negative_slope))


@torch.compiler.assume_constant_result
def _nchw_gating_built() -> bool:
    """Whether the loaded fastinpaint._C has GATE_FORWARD_NCHW (a constant for torch.compile)."""
    return GATE_FORWARD_NCHW.built_for("cpu")


def _gates_nchw_from_channels_last(x, weight) -> bool:
    """Whether the cpu backend writes an NCHW layer's convolution channels-last and gates it into
    NCHW (GATE_FORWARD_NCHW): where :func:`_cpu_conv.runs_channels_last_out`, conv2d's output would
    be NCHW (an NCHW weight), the kernel built. ops/_cpu_conv.py says why oneDNN's convolution runs
    channels-last; Winograd's wrote its NCHW output per channel from each tile, scattered writes
    that grew with the dilation (the r16 layer's forward: 0.97x compile(eager) so, 1.40x with this,
    files cpu_gated_conv_fp32_batch1_nchw_*20261207.md)."""
    return (_cpu_conv.runs_channels_last_out(x, weight) and conv_output_format(x, weight) == torch.contiguous_format
            and _nchw_gating_built())


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
