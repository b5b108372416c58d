"""Triton kernel of the partial convolution's fused renormalisation.

``renorm_forward(raw, mask_sum, bias, kernel, stride, padding, dilation, window_size)``:
one program per (block of output pixels, block of channels). It computes the window sum
of ``mask_sum`` (the mask summed over its channels, (B, 1, H, W)) over the convolution's
footprint of each pixel (a box filter with the convolution's stride, padding and
dilation), then ``scale = window_size / (msum + 1e-8) * um`` (``* um`` again with a bias),
``um = clamp(msum, 0, 1)``, and writes ``out = raw * scale + bias * um`` for its channels;
the channel-block-0 programs also write ``scale`` and ``um``. ``raw`` and ``out`` are read
and written through their strides (NCHW, channels_last or any view); math in float32.
Indices are int64.
"""

from __future__ import annotations


import triton
import triton.language as tl

from ..._debug import new_output
from .._common import INTERPRET as _INTERPRET, device_ctx as _device_ctx
from .._layout import suggest_memory_format

__all__ = ["renorm_forward"]


#: the kernels on the op's hot path: none may spill registers at any config its launcher can
#: pick, on sm_90 or sm_80 (tests/test_kernel_resources.py compiles each; ops/resources.py)
HOT_KERNELS = ("_renorm_fwd_kernel",)

@triton.jit
def _renorm_fwd_kernel(raw_ptr, ms_ptr, bias_ptr, out_ptr, scale_ptr, um_ptr,
                       C, H, W, Ho, Wo, n_pix,
                       rs_b, rs_c, rs_h, rs_w, os_b, os_c, os_h, os_w,
                       sh, sw, ph, pw, dh, dw, window_size,
                       KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = p < n_pix
    hw = Ho * Wo
    b = p // hw
    r = p - b * hw
    oy = r // Wo
    ox = r - oy * Wo
    msum = tl.zeros([BLOCK_P], dtype=tl.float32)
    for ky in range(KH):  # a loop, not unrolled: a 7x7 window's 49 loads in flight at once spill
        iy = oy * sh - ph + ky * dh
        row_ok = pm & (iy >= 0) & (iy < H)
        for kx in tl.static_range(KW):
            ix = ox * sw - pw + kx * dw
            ok = row_ok & (ix >= 0) & (ix < W)
            msum += tl.load(ms_ptr + (b * H + iy) * W + ix, mask=ok, other=0.0).to(tl.float32)
    um = tl.minimum(tl.maximum(msum, 0.0), 1.0)
    scale = window_size / (msum + 1e-8) * um
    if HAS_BIAS:
        scale = scale * um
    if pid_c == 0:
        tl.store(scale_ptr + p, scale.to(scale_ptr.dtype.element_ty), mask=pm)
        tl.store(um_ptr + p, um.to(um_ptr.dtype.element_ty), mask=pm)
    c = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    m2 = pm[:, None] & cm[None, :]
    src = (b * rs_b + oy * rs_h + ox * rs_w)[:, None] + (c * rs_c)[None, :]
    dst = (b * os_b + oy * os_h + ox * os_w)[:, None] + (c * os_c)[None, :]
    y = tl.load(raw_ptr + src, mask=m2, other=0.0).to(tl.float32) * scale[:, None]
    if HAS_BIAS:
        bv = tl.load(bias_ptr + c, mask=cm, other=0.0).to(tl.float32)
        y += bv[None, :] * um[:, None]
    tl.store(out_ptr + dst, y.to(out_ptr.dtype.element_ty), mask=m2)


def renorm_forward(raw, mask_sum, bias, kernel, stride, padding, dilation, window_size):
    """(out, scale, um): see the module doc. ``mask_sum`` (B, 1, H, W) float32."""
    b, c, ho, wo = raw.shape
    h, w = mask_sum.shape[-2:]
    ms = mask_sum.contiguous()
    out = new_output(raw.shape, dtype=raw.dtype, device=raw.device, memory_format=suggest_memory_format(raw))
    scale = new_output((b, 1, ho, wo), dtype=ms.dtype, device=raw.device)
    um = new_output((b, 1, ho, wo), dtype=ms.dtype, device=raw.device)
    n_pix = b * ho * wo
    if n_pix == 0:
        return out, scale, um
    if _INTERPRET:
        block_p, block_c = 16, 8
    else:
        block_c = min(64, triton.next_power_of_2(max(c, 1)))
        block_p = 128 if block_c <= 32 else 64
    grid = (triton.cdiv(n_pix, block_p), max(1, triton.cdiv(c, block_c)))
    bias_arg = bias if bias is not None else ms
    with _device_ctx(raw):
        _renorm_fwd_kernel[grid](
            raw, ms, bias_arg, out, scale, um,
            c, h, w, ho, wo, n_pix,
            *raw.stride(), *out.stride(),
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], float(window_size),
            KH=kernel[0], KW=kernel[1], HAS_BIAS=bias is not None, BLOCK_P=block_p, BLOCK_C=block_c,
        )
    return out, scale, um
