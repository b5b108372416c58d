"""Channel-wise fully connected layer: argument checks, autograd wiring, torch.library
registration, and dispatch to a backend.

    y[b, c] = act(W[c] @ x[b, c].flatten() + bias[c]).reshape(H, W)

Paths per backend:
  reference  eager permute -> bmm -> permute back (a view, batch innermost) -> + bias -> act (reference.py)
  cpu, cuda  one strided batched GEMM over channels on x where it lies (at::bmm: MKL /
             cuBLAS), then one fused pass (bias, activation, transposition into y's
             layout) in fastinpaint._C; the backward's act' pass is fused likewise
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

import math
from typing import Optional

import torch

from ... import _backend, _extension
from .._common import autocast_cast, check_float_tensor, check_same_device, check_same_dtype
from .._layout import suggest_memory_format
from . import reference
from .reference import ACTIVATION_CODES

OP_NAME = "channel_fc"
IMPLEMENTED = ("reference", "triton", "cuda", "cpu")


# ----------------------------------------------------------------------------- shapes (fake kernels)

def _out_like(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape).contiguous(memory_format=suggest_memory_format(x))


def _backward_fake(x, weight, need_x, need_weight, need_bias):
    C, P = weight.shape[0], weight.shape[1]
    dx = _out_like(x) if need_x else x.new_empty((0,))
    dw = weight.new_empty((C, P, P)) if need_weight else x.new_empty((0,))
    db = x.new_empty((C, P)) if need_bias else x.new_empty((0,))
    return dx, dw, db


def _setup_context(ctx, inputs, output):
    x, weight, bias, activation, negative_slope = inputs
    ctx.activation, ctx.negative_slope = activation, negative_slope
    ctx.has_bias = bias is not None
    if activation != 0:
        ctx.save_for_backward(x, weight, output)
    else:
        ctx.save_for_backward(x, weight)


def _make_backward(backward_op):
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        x, weight = saved[0], saved[1]
        out = saved[2] if len(saved) > 2 else None
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and ctx.has_bias
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward (double backward)
            dx, dw, db = reference.channel_fc_backward(grad_out, x, weight, out, ctx.activation, ctx.negative_slope)
        else:
            dx, dw, db = backward_op(grad_out, x, weight, out, ctx.activation, ctx.negative_slope,
                                     need_x, need_w, need_b)
        return (dx if need_x else None, dw if need_w else None, db if need_b else None, None, None)

    return backward


# ----------------------------------------------------------------------------- C++ ops (cpu, cuda)

def _cpp_ops_present() -> bool:
    """False for an extension built before this op existed (a stale build)."""
    try:
        torch.ops.fastinpaint.channel_fc_forward.default
        torch.ops.fastinpaint.channel_fc_backward.default
    except (AttributeError, RuntimeError):
        return False
    return True


def _register_cpp_ops() -> None:
    """Fake kernels and autograd of the C++ ops; runs once the extension is loaded."""
    if not _cpp_ops_present():
        return

    @torch.library.register_fake("fastinpaint::channel_fc_forward")
    def _(x, weight, bias, activation, negative_slope):
        return _out_like(x)

    @torch.library.register_fake("fastinpaint::channel_fc_backward")
    def _(grad_out, x, weight, out, activation, negative_slope, need_x, need_weight, need_bias):
        return _backward_fake(x, weight, need_x, need_weight, need_bias)

    torch.library.register_autograd(
        "fastinpaint::channel_fc_forward",
        _make_backward(torch.ops.fastinpaint.channel_fc_backward),
        setup_context=_setup_context)


_extension.on_load(_register_cpp_ops)


# ----------------------------------------------------------------------------- Triton ops

@torch.library.custom_op("fastinpaint::channel_fc_triton", mutates_args=())
def channel_fc_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], activation: int,
                      negative_slope: float) -> torch.Tensor:
    from . import triton as kernels

    return kernels.forward(x, weight, bias, activation, negative_slope)


@channel_fc_triton.register_fake
def _(x, weight, bias, activation, negative_slope):
    return _out_like(x)


@torch.library.custom_op("fastinpaint::channel_fc_backward_triton", mutates_args=())
def channel_fc_backward_triton(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                               out: Optional[torch.Tensor], activation: int, negative_slope: float, need_x: bool,
                               need_weight: bool, need_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from . import triton as kernels

    return kernels.backward(grad_out, x, weight, out, activation, negative_slope, need_x, need_weight, need_bias)


@channel_fc_backward_triton.register_fake
def _(grad_out, x, weight, out, activation, negative_slope, need_x, need_weight, need_bias):
    return _backward_fake(x, weight, need_x, need_weight, need_bias)


channel_fc_triton.register_autograd(_make_backward(channel_fc_backward_triton), setup_context=_setup_context)


# ----------------------------------------------------------------------------- argument checks

def activation_code(activation: Optional[str], negative_slope: float) -> int:
    """Validate an activation name (None = "none") and its slope; return its kernel code."""
    if activation is None:
        activation = "none"
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"activation must be None or one of {sorted(ACTIVATION_CODES)}, got {activation!r}")
    if (not isinstance(negative_slope, (int, float)) or isinstance(negative_slope, bool)
            or not math.isfinite(negative_slope)):
        raise ValueError(f"negative_slope must be a finite number, got {negative_slope!r}")
    if activation == "leaky_relu" and negative_slope < 0:
        raise ValueError(f"negative_slope must be >= 0 (the backward reads act' from the output's sign), "
                         f"got {negative_slope}")
    return ACTIVATION_CODES[activation]


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
    return activation_code(activation, negative_slope)


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
    backend = _backend.select(OP_NAME, IMPLEMENTED, x.device)
    if backend == "reference":
        return reference.channel_fc(x, weight, bias, activation or "none", negative_slope)
    x, weight, bias = autocast_cast(x, weight, bias)
    if backend == "triton":
        if x.dtype == torch.float64:
            raise TypeError("x is float64, which the triton backend does not take (float16, bfloat16, float32); "
                            "use the reference or cpu backend for float64")
        return channel_fc_triton(x, weight, bias, code, float(negative_slope))
    if not _cpp_ops_present():
        raise _backend.BackendUnavailableError(
            f"{OP_NAME}: the loaded fastinpaint._C has no channel_fc kernels (a stale build); rebuild it")
    return torch.ops.fastinpaint.channel_fc_forward(x, weight, bias, code, float(negative_slope))
