"""Channel-wise fully connected layer: argument checks, autograd wiring, torch.library
registration, and dispatch to a backend.

    y[b, c] = act(W[c] @ x[b, c].flatten() + bias[c]).reshape(H, W)

Paths per backend:
  reference  eager permute -> bmm -> permute back (a view, batch innermost) -> + bias -> act (reference.py)
  cpu, cuda  one strided batched GEMM over channels on x where it lies (at::bmm: MKL /
             cuBLAS), then one fused pass (bias, activation, transposition into y's
             layout) in fastinpaint._C; the backward's act' pass is fused likewise.
             cpu, float32 maps of at most 16 positions (the Context Encoder's 4x4 bottleneck),
             and of at most 64 (8x8) from 4 images: the forward is one fused pass instead
             (per channel and block of batch rows, the products accumulated in registers,
             bias and activation applied on the way out, x's layout read and y's written in
             place); float32 maps of at least 512 positions at 4 to 8 images, positions
             contiguous: the forward is one pass over the weight (dot products of its rows
             with the images' rows); from 256 positions at 1 to 3 images both gradients are
             one pass (dW's rows written and dx's rows accumulated as the weight streams past)
  triton     batched GEMM kernels that read and write NCHW, channels_last and strided
             views in place, bias and activation fused in the forward's epilogue and
             act' recomputed in the backward's operand loads (triton.py)

Saved for backward: x and weight (which live anyway as the layer's input and parameter)
and, when there is an activation, the output y: act'(pre) is a function of y for relu,
leaky_relu with ``negative_slope >= 0`` and elu, and y is usually kept anyway by the
next layer (the channel-mixing 1x1 convolution saves its input). The eager formulation
also keeps the permuted GEMM result, the pre-activation and the bias-add's input.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._activation import activation_code
from .._common import autocast_cast, check_float_tensor, check_same_device, check_same_dtype
from .._layout import suggest_memory_format
from .._registry import Op, differentiable, kernel
from . import reference


# ----------------------------------------------------------------------------- kernels

def _out_like(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape).contiguous(memory_format=suggest_memory_format(x))


def _forward_fake(x, weight, bias, activation, negative_slope):
    return _out_like(x)


def _backward_fake(grad_out, x, weight, out, activation, negative_slope, need_x, need_weight, need_bias):
    C, P = weight.shape[0], weight.shape[1]
    dx = _out_like(x) if need_x else x.new_empty((0,))
    dw = weight.new_empty((C, P, P)) if need_weight else x.new_empty((0,))
    db = x.new_empty((C, P)) if need_bias else x.new_empty((0,))
    return dx, dw, db


# x (B, C, H, W), weight (C, H*W, H*W), bias (C, H*W); the backward reads act' from out;
# gradients not asked for come back as empty tensors
FORWARD = kernel("channel_fc_forward",
                 "(Tensor x, Tensor weight, Tensor? bias, int activation, float negative_slope) -> Tensor",
                 _forward_fake, triton="forward")
BACKWARD = kernel("channel_fc_backward",
                  "(Tensor grad_out, Tensor x, Tensor weight, Tensor? out, int activation, float negative_slope, "
                  "bool need_x, bool need_weight, bool need_bias) -> (Tensor, Tensor, Tensor)",
                  _backward_fake, triton="backward")
OP = Op("channel_fc", {
    "reference": "eager permute -> bmm -> permute back -> + bias -> act (reference.py)",
    "triton": "batched-GEMM Triton kernels reading and writing x's layout in place, bias and activation "
              "fused into the forward's epilogue and act' into the backward's loads",
    "cuda": "one strided cuBLAS batched GEMM over channels (at::bmm), then one fused CUDA pass for bias, "
            "activation and the transposition into y's layout (csrc/cuda/channel_fc.cu)",
    "cpu": "one strided batched GEMM over channels (at::bmm, MKL/oneDNN), then one fused C++ pass for bias, "
           "activation and the transposition into y's layout; float32 maps of at most 16 positions (64 from 4 "
           "images): the forward in one fused C++ pass, products in registers; float32 maps of at least 512 "
           "positions at 4 to 8 images (the backward: 256 positions, 1 to 3 images): one pass over the weight, "
           "no GEMM (csrc/cpu/channel_fc.cpp)",
}, kernels=(FORWARD, BACKWARD))


def _setup_context(ctx, inputs, output):
    x, weight, bias, activation, negative_slope = inputs
    ctx.activation, ctx.negative_slope = activation, negative_slope
    ctx.has_bias = bias is not None
    if activation != 0:
        ctx.save_for_backward(x, weight, output)
    else:
        ctx.save_for_backward(x, weight)


def _backward(ctx, backward_kernel, grad_out):
    saved = ctx.saved_tensors
    x, weight = saved[0], saved[1]
    out = saved[2] if len(saved) > 2 else None
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = need_b and ctx.has_bias
    if torch.is_grad_enabled():  # create_graph=True: a differentiable backward (double backward)
        dx, dw, db = reference.channel_fc_backward(grad_out, x, weight, out, ctx.activation, ctx.negative_slope)
    else:
        dx, dw, db = backward_kernel(grad_out, x, weight, out, ctx.activation, ctx.negative_slope,
                                     need_x, need_w, need_b)
    return (dx if need_x else None, dw if need_w else None, db if need_b else None, None, None)


differentiable(FORWARD, BACKWARD, _setup_context, _backward)


# ----------------------------------------------------------------------------- argument checks

def check_arguments(x, weight, bias, activation, negative_slope) -> int:
    """Validate a channel_fc call; return the activation code."""
    check_float_tensor(x, "x", 4, "(B, C, H, W)")
    check_float_tensor(weight, "weight", 3, "(C, H*W, H*W)")
    B, C, H, W = x.shape
    if C <= 0 or H <= 0 or W <= 0:
        raise ValueError(f"x must have positive channels, height and width, got shape {tuple(x.shape)}")
    P = H * W
    if tuple(weight.shape) != (C, P, P):
        raise ValueError(f"weight must have shape (C, H*W, H*W) = ({C}, {P}, {P}) for x of shape "
                         f"{tuple(x.shape)}, got {tuple(weight.shape)}")
    if bias is not None:
        check_float_tensor(bias, "bias", 2, "(C, H*W)")
        if tuple(bias.shape) != (C, P):
            raise ValueError(f"bias must have shape (C, H*W) = ({C}, {P}), got {tuple(bias.shape)}")
    check_same_device(x, (("weight", weight), ("bias", bias)))
    check_same_dtype(x, (("weight", weight), ("bias", bias)))
    return activation_code(activation, negative_slope, slope_from_output=True)


# ----------------------------------------------------------------------------- dispatch

def channel_fc(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               activation: Optional[str] = None, negative_slope: float = 0.2) -> torch.Tensor:
    """Channel-wise fully connected layer (Context Encoders, Pathak et al. 2016).

    ``y[b, c] = act(weight[c] @ x[b, c].flatten() + bias[c])`` reshaped to (H, W): each of
    the C maps of P = H*W positions goes through its own dense (P x P) matrix;
    C*P^2 weights instead of a fully connected layer's (C*P)^2.

    Args:
        x: (B, C, H, W), float16/bfloat16/float32/float64 (float64: reference and cpu
            backends), NCHW, channels_last or any strided view.
        weight: (C, H*W, H*W); ``weight[c, q, p]`` maps input position p to output q
            (positions flattened row-major over H x W).
        bias: (C, H*W) or None.
        activation: None / "none", "relu", "leaky_relu" (``negative_slope`` >= 0) or "elu".

    Returns:
        (B, C, H, W) in x's memory format (channels_last for channels_last x).

    Autograd saves x, weight and, with an activation, the output (not the pre-activation).
    Cost: 2*B*C*P^2 multiply-adds forward, twice that backward; the weight (C*P^2
    elements) dominates the memory traffic for large maps.
    """
    code = check_arguments(x, weight, bias, activation, negative_slope)
    backend = OP.select(x)
    if backend == "reference":
        return reference.channel_fc(x, weight, bias, activation or "none", negative_slope)
    x, weight, bias = autocast_cast(x, weight, bias)
    return FORWARD(backend, x, weight, bias, code, float(negative_slope))
