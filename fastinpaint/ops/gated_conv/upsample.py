"""Nearest upsampling followed by a convolution, without the upsampled image.

For an integer scale ``s`` and stride 1, output pixel ``(s*i + a, s*j + b)`` of
``conv(upsample_nearest(x, s), w)`` reads only a few distinct pixels of ``x``: tap ``t``
of the kernel along one axis lands on ``x`` row ``i + (a - p + d*t) // s``. Summing the
taps that land on the same row gives, for each of the ``s*s`` phases, a smaller kernel
over ``x`` itself (2x2 for DeepFill's 3x3 gated deconv: 4/9 of the multiply-adds, at a
quarter of the input size). All phases run as *one* convolution over ``x`` with
``s*s*Cout`` output channels; an interleave puts the phases back in place.

The interleave is an op of its own (``fastinpaint::interleave_phases``, explicit strided
copies, its backward another): written with slicing views, autograd would materialise a full
zero tensor per view in backward, and under torch.compile inductor would trace the strided
scatters into slow loops. The gated deconv gates the phase-stacked output first
(:func:`phase_rows`), so the interleave moves the gated half of the channels.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .._layout import conv_output_format, is_channels_last, suggest_memory_format
from .._registry import call


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


def _fmt(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def _interleave(out: torch.Tensor, s: int, h: int, w: int, starts_h, starts_w, channels_last: bool) -> torch.Tensor:
    B, _, rows, cols = out.shape
    C = out.shape[1] // (s * s)
    phases = out.unflatten(1, (s, s, C))
    pre = torch.empty((B, C, s * h, s * w), dtype=out.dtype, device=out.device, memory_format=_fmt(channels_last))
    for a in range(s):
        for b in range(s):
            pre[:, :, a::s, b::s].copy_(phases[:, a, b, :, starts_h[a]:starts_h[a] + h, starts_w[b]:starts_w[b] + w])
    return pre


def _deinterleave(grad: torch.Tensor, s: int, rows: int, cols: int, starts_h, starts_w,
                  channels_last: bool) -> torch.Tensor:
    B, C, sh, sw = grad.shape
    h, w = sh // s, sw // s
    out = torch.empty((B, s * s * C, rows, cols), dtype=grad.dtype, device=grad.device,
                      memory_format=_fmt(channels_last)).zero_()
    phases = out.unflatten(1, (s, s, C))
    for a in range(s):
        for b in range(s):
            phases[:, a, b, :, starts_h[a]:starts_h[a] + h, starts_w[b]:starts_w[b] + w].copy_(grad[:, :, a::s, b::s])
    return out


# The interleave and its backward are ops of their own (explicit strided copies): under
# torch.compile inductor sees the phase convolution and the gating around them, but not these
# strided scatters, which it compiles into slower loops than the copies (measured: the
# compiled gated deconv ran 1.5-3x slower with them traced). In eager, written with slicing
# views and autograd, a full zero tensor per view would be materialised in backward.
@torch.library.custom_op("fastinpaint::interleave_phases", mutates_args=())
def interleave_phases(out: torch.Tensor, s: int, h: int, w: int, starts_h: list[int], starts_w: list[int],
                      channels_last: bool) -> torch.Tensor:
    """(B, s*s*C, rows, cols) phase-stacked -> (B, C, s*h, s*w) interleaved."""
    return _interleave(out, s, h, w, starts_h, starts_w, channels_last)


@torch.library.custom_op("fastinpaint::deinterleave_phases", mutates_args=())
def deinterleave_phases(grad: torch.Tensor, s: int, rows: int, cols: int, starts_h: list[int],
                        starts_w: list[int], channels_last: bool) -> torch.Tensor:
    """The interleave's backward: (B, C, s*h, s*w) -> (B, s*s*C, rows, cols), zero elsewhere."""
    return _deinterleave(grad, s, rows, cols, starts_h, starts_w, channels_last)


@interleave_phases.register_fake
def _(out, s, h, w, starts_h, starts_w, channels_last):
    return torch.empty((out.shape[0], out.shape[1] // (s * s), s * h, s * w), dtype=out.dtype, device=out.device,
                       memory_format=_fmt(channels_last))


@deinterleave_phases.register_fake
def _(grad, s, rows, cols, starts_h, starts_w, channels_last):
    return torch.empty((grad.shape[0], s * s * grad.shape[1], rows, cols), dtype=grad.dtype, device=grad.device,
                       memory_format=_fmt(channels_last))


def _interleave_setup(ctx, inputs, output):
    out, s, h, w, starts_h, starts_w, _ = inputs
    ctx.geometry = (s, out.shape[2], out.shape[3], list(starts_h), list(starts_w), is_channels_last(out))


def _interleave_backward(ctx, grad_pre):
    s, rows, cols, starts_h, starts_w, channels_last = ctx.geometry
    return deinterleave_phases(grad_pre, s, rows, cols, starts_h, starts_w, channels_last), \
        None, None, None, None, None, None


def _deinterleave_setup(ctx, inputs, output):
    grad, s, rows, cols, starts_h, starts_w, _ = inputs
    ctx.geometry = (s, grad.shape[2] // s, grad.shape[3] // s, list(starts_h), list(starts_w), is_channels_last(grad))


def _deinterleave_backward(ctx, g):
    s, h, w, starts_h, starts_w, channels_last = ctx.geometry
    return interleave_phases(g, s, h, w, starts_h, starts_w, channels_last), None, None, None, None, None, None


interleave_phases.register_autograd(_interleave_backward, setup_context=_interleave_setup)
deinterleave_phases.register_autograd(_deinterleave_backward, setup_context=_deinterleave_setup)


def phase_conv2d(x: torch.Tensor, weight: torch.Tensor, bias, padding, dilation, scale: int):
    """The phase-stacked convolution of :func:`upsample_conv2d`, before its interleave:
    ``(out, plan)``, out (B, s*s*C2, rows, cols) (phase (a, b)'s C2 channels at a*s + b),
    plan the arguments of :func:`interleave` after the tensor."""
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
    channels_last = conv_output_format(x, weight) == torch.channels_last
    return out, (s, h, w, list(starts_h), list(starts_w), channels_last)


def interleave(out: torch.Tensor, plan) -> torch.Tensor:
    """Phase-stacked (B, s*s*C, rows, cols) -> the (B, C, s*h, s*w) image (any C: the gated
    deconv interleaves the gated output, half the pre-activation's channels)."""
    return call(torch.ops.fastinpaint.interleave_phases.default, out, *plan)   # the copies read any strides


def phase_rows(out: torch.Tensor, s: int) -> torch.Tensor:
    """Phase-stacked (B, s*s*2C, rows, cols) as a 4-D gating operand whose channel dimension
    holds one phase's 2C channels (features, then gates): (B*s*s, 2C, rows, cols) for NCHW,
    (B*rows*cols*s*s, 2C, 1, 1) for channels_last; a view, except for channels_last under
    torch.compile (a copy)."""
    B, K, rows, cols = out.shape
    if is_channels_last(out):
        rows_first = out.permute(0, 2, 3, 1)
        if torch.compiler.is_compiling():
            # a copy, not a view: torch's tracer and its CPU kernels can disagree on the layout
            # of a map with one channel, which fits both (DeepFill v2 at cnum 4 has one: its
            # cnum // 4 layer), and of every map computed from it; a traced view would then read
            # strides the kernels did not write (tests/test_deepfill_v2.py, aot_eager)
            rows_first = rows_first.clone(memory_format=torch.contiguous_format)
        return rows_first.reshape(B * rows * cols * s * s, K // (s * s), 1, 1)
    return out.reshape(B * s * s, K // (s * s), rows, cols)


def from_phase_rows(gated: torch.Tensor, s: int, shape, channels_last: bool) -> torch.Tensor:
    """The inverse of :func:`phase_rows` for the gated (C-channel) result: (B, s*s*C, rows, cols)."""
    B, _, rows, cols = shape
    C = gated.shape[1]
    if channels_last:
        return gated.reshape(B, rows, cols, s * s * C).permute(0, 3, 1, 2)
    return gated.reshape(B, s * s * C, rows, cols)


def upsample_conv2d(x: torch.Tensor, weight: torch.Tensor, bias, padding, dilation, scale: int) -> torch.Tensor:
    """``conv2d(interpolate(x, scale_factor=scale, mode="nearest"), weight, bias, 1, padding, dilation)``
    when :func:`applies`; the output takes the memory format conv2d would give it."""
    out, plan = phase_conv2d(x, weight, bias, padding, dilation, scale)
    return interleave(out, plan)
