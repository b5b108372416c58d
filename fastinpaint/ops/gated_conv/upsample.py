"""Nearest upsampling followed by a convolution, without the upsampled image.

For an integer scale ``s`` and stride 1, output pixel ``(s*i + a, s*j + b)`` of
``conv(upsample_nearest(x, s), w)`` reads only a few distinct pixels of ``x``: tap ``t``
of the kernel along one axis lands on ``x`` row ``i + (a - p + d*t) // s``. Summing the
taps that land on the same row gives, for each of the ``s*s`` phases, a smaller kernel
over ``x`` itself (2x2 for DeepFill's 3x3 gated deconv: 4/9 of the multiply-adds, at a
quarter of the input size). All phases run as *one* convolution over ``x`` with
``s*s*Cout`` output channels; an interleave puts the phases back in place.

The interleave is an autograd Function with explicit strided copies: written with
slicing views, autograd would materialise a full zero tensor per view in backward.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .._layout import conv_output_format, suggest_memory_format


def _axis_plan(s: int, k: int, p: int, d: int):
    """Per phase: the x offsets of the k taps. Returns (offsets, lo, L, starts)."""
    offsets = tuple(tuple((a - p + d * t) // s for t in range(k)) for a in range(s))
    lo = min(o[0] for o in offsets)
    span = max(o[-1] - o[0] + 1 for o in offsets)
    starts = tuple(o[0] - lo for o in offsets)
    return offsets, lo, span, starts


def _build_tap_matrix(s: int, k: int, p: int, d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(s, L, k) 0/1 matrix: phase a's kernel index l gathers taps t."""
    offsets, _, span, _ = _axis_plan(s, k, p, d)
    m = torch.zeros(s, span, k, dtype=dtype)
    for a, offs in enumerate(offsets):
        for t, o in enumerate(offs):
            m[a, o - offs[0], t] = 1
    return m.to(device)


_cached_tap_matrix = functools.lru_cache(maxsize=256)(_build_tap_matrix)


def _tap_matrix(s, k, p, d, dtype, device):
    # eager: cached, so a CUDA call makes no host-to-device copy; under torch.compile
    # the matrix is a constant of the graph anyway.
    if torch.compiler.is_compiling():
        return _build_tap_matrix(s, k, p, d, dtype, device)
    return _cached_tap_matrix(s, k, p, d, dtype, device)


def applies(weight_shape, stride, padding, dilation, scale: int, height: int, width: int) -> bool:
    """Whether the phase decomposition is valid here and saves work."""
    if scale < 2 or tuple(stride) != (1, 1):
        return False
    kh, kw = weight_shape[2], weight_shape[3]
    ho = scale * height + 2 * padding[0] - dilation[0] * (kh - 1)
    wo = scale * width + 2 * padding[1] - dilation[1] * (kw - 1)
    if ho <= 0 or wo <= 0 or ho % scale or wo % scale:
        return False
    lh = _axis_plan(scale, kh, padding[0], dilation[0])[2]
    lw = _axis_plan(scale, kw, padding[1], dilation[1])[2]
    return lh * lw < kh * kw


class _Interleave(torch.autograd.Function):
    """(B, s*s*C, rows, cols) phase-stacked -> (B, C, s*h, s*w) interleaved."""

    @staticmethod
    def forward(ctx, out, s, h, w, starts_h, starts_w, fmt):
        B, _, rows, cols = out.shape
        C = out.shape[1] // (s * s)
        ctx.geometry = (s, h, w, starts_h, starts_w, out.shape, suggest_memory_format(out))
        phases = out.unflatten(1, (s, s, C))
        pre = torch.empty((B, C, s * h, s * w), dtype=out.dtype, device=out.device, memory_format=fmt)
        for a in range(s):
            for b in range(s):
                pre[:, :, a::s, b::s].copy_(
                    phases[:, a, b, :, starts_h[a]:starts_h[a] + h, starts_w[b]:starts_w[b] + w])
        return pre

    @staticmethod
    def backward(ctx, grad_pre):
        s, h, w, starts_h, starts_w, shape, fmt = ctx.geometry
        grad_out = torch.empty(shape, dtype=grad_pre.dtype, device=grad_pre.device, memory_format=fmt).zero_()
        phases = grad_out.unflatten(1, (s, s, shape[1] // (s * s)))
        for a in range(s):
            for b in range(s):
                phases[:, a, b, :, starts_h[a]:starts_h[a] + h, starts_w[b]:starts_w[b] + w].copy_(
                    grad_pre[:, :, a::s, b::s])
        return grad_out, None, None, None, None, None, None


def upsample_conv2d(x: torch.Tensor, weight: torch.Tensor, bias, padding, dilation, scale: int) -> torch.Tensor:
    """``conv2d(interpolate(x, scale_factor=scale, mode="nearest"), weight, bias, 1, padding, dilation)``
    when :func:`applies`; the output takes the memory format conv2d would give it."""
    B, cin, H, W = x.shape
    c2, _, kh, kw = weight.shape
    s = scale
    ho = s * H + 2 * padding[0] - dilation[0] * (kh - 1)
    wo = s * W + 2 * padding[1] - dilation[1] * (kw - 1)
    h, w = ho // s, wo // s
    _, lo_h, lh, starts_h = _axis_plan(s, kh, padding[0], dilation[0])
    _, lo_w, lw, starts_w = _axis_plan(s, kw, padding[1], dilation[1])
    rows, cols = max(starts_h) + h, max(starts_w) + w
    # x padded (or cropped) so that its row 0 is x row lo_h and the combined
    # convolution yields exactly `rows` x `cols` outputs.
    xp = F.pad(x, (-lo_w, cols + lw - 1 + lo_w - W, -lo_h, rows + lh - 1 + lo_h - H))
    mh = _tap_matrix(s, kh, padding[0], dilation[0], weight.dtype, weight.device)
    mw = _tap_matrix(s, kw, padding[1], dilation[1], weight.dtype, weight.device)
    phase_weight = torch.einsum("ocij,aki,blj->abockl", weight, mh, mw).reshape(s * s * c2, cin, lh, lw)
    phase_bias = bias.repeat(s * s) if bias is not None else None
    out = F.conv2d(xp, phase_weight.contiguous(memory_format=suggest_memory_format(weight)), phase_bias)
    return _Interleave.apply(out, s, h, w, starts_h, starts_w, conv_output_format(x, weight))
