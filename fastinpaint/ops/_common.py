"""Argument checks and dispatch helpers shared by the ops' ``op.py`` modules (and the
``nn`` modules built on them). Every message names the argument it is about."""

from __future__ import annotations

import contextlib
import math
import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def pair(value, name: str, minimum: int) -> tuple[int, int]:
    """Normalise a conv-like int or pair of ints (``stride``, ``padding``, ...) to a pair >= ``minimum``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        pair_ = (value, value)
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        pair_ = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair_) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair_


def check_channel_counts(**counts) -> None:
    """Each of ``in_channels=...``, ``out_channels=...`` must be a positive int (not a bool)."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def conv_module_args(in_channels, out_channels, kernel_size, stride) -> tuple[tuple[int, int], tuple[int, int]]:
    """Validate a conv module's channel counts, ``kernel_size`` and ``stride``; return the
    (kernel_size, stride) pairs."""
    check_channel_counts(in_channels=in_channels, out_channels=out_channels)
    return pair(kernel_size, "kernel_size", 1), pair(stride, "stride", 1)


def reset_conv_parameters(weight: torch.Tensor, bias) -> None:
    """nn.Conv2d's initialisation: kaiming-uniform weight, bias uniform in +-1/sqrt(fan_in)."""
    torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        bound = 1 / math.sqrt(weight[0].numel())
        torch.nn.init.uniform_(bias, -bound, bound)


def check_float_tensor(t, name: str, dim: int, layout: str = "") -> None:
    """``t`` must be a floating torch.Tensor of rank ``dim``; ``layout`` (e.g. "(B, C, H, W)")
    is shown in the rank message."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.dim() != dim:
        what = f" {layout}" if layout else ""
        raise ValueError(f"{name} must be {dim}-D{what}, got shape {tuple(t.shape)}")


def check_same_device(ref, others, ref_name: str = "x") -> None:
    """Every ``(name, tensor)`` in ``others`` (None skipped) must be on ``ref``'s device."""
    for name, t in others:
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def check_same_dtype(ref, others, ref_name: str = "x") -> None:
    """Outside autocast, every ``(name, tensor)`` in ``others`` (None skipped) must have ``ref``'s dtype."""
    if torch.is_autocast_enabled(ref.device.type):
        return
    for name, t in others:
        if t is not None and t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """torch.nn.functional.conv2d's output size along one axis."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def check_kernel_span(x_shape, kernel, padding, dilation, scale_factor: int = 1) -> None:
    """The (dilated) kernel must fit in the padded (upsampled by ``scale_factor``) input."""
    for axis, (size, k, p, d) in enumerate(zip(x_shape[2:], kernel, padding, dilation)):
        span = d * (k - 1) + 1
        if size * scale_factor + 2 * p < span:
            raise ValueError(
                f"kernel_size {k} with dilation {d} spans {span} pixels, more than the padded input "
                f"({'height' if axis == 0 else 'width'} {size * scale_factor} + 2*padding {p})")


def autocast_cast(*tensors):
    """Cast like autocast does for conv2d / bmm / matmul: every floating tensor but float64 to
    the autocast dtype of the first tensor's device (None passes through); the fused kernels
    then see one dtype. Returns the tensors as a tuple."""
    dev = tensors[0].device.type
    if not torch.is_autocast_enabled(dev):
        return tensors
    dtype = torch.get_autocast_dtype(dev)
    return tuple(t if t is None or t.dtype == torch.float64 else t.to(dtype) for t in tensors)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels accumulate in: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ----------------------------------------------------------------------------- Triton launches

#: Triton kernels run on the CPU through the interpreter (TRITON_INTERPRET=1).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def device_ctx(t: torch.Tensor):
    """The CUDA device of ``t`` as a context (Triton launches on the current device); a
    no-op for CPU tensors (the interpreter)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
