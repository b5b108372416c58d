"""Triton kernels of the gated convolution.

Plain launchers (no autograd, no ``torch.library`` registration):

* ``gate_forward(pre, activation, negative_slope)``: ``act(f) * sigmoid(g)`` of a
  (B, 2C, H, W) pre-activation.
* ``gate_backward(grad_out, pre, activation, negative_slope)``: gradient with respect
  to ``pre``, recomputed from ``pre``.
* ``conv_forward(x, weight, bias, stride, padding, dilation, upsample, activation,
  negative_slope)``: implicit-GEMM convolution whose epilogue applies the gate, so the
  2*Cout pre-activation is never written. ``upsample=2`` convolves the nearest-x2
  upsampled input without materialising it (DeepFill's gated "deconv").

Activation codes and device functions: ``ops/_activation_triton.py``. All math is done in float32.

Only long-standing ``triton.language`` APIs are used (``tl.dot(...,
input_precision=...)``, masked ``tl.load``/``tl.store``, ``triton.autotune``).
Under ``TRITON_INTERPRET=1`` a single small configuration is used instead of
autotuning.
"""

from __future__ import annotations

import os
import weakref

import torch
import triton
import triton.language as tl

from ..._debug import new_output
from .._activation_triton import act as _act, act_and_grad as _act_and_grad, sigmoid as _sigmoid
from .._common import INTERPRET as _INTERPRET, device_ctx as _device_ctx
from .._layout import conv_output_format, is_channels_last

__all__ = ["gate_forward", "gate_backward", "conv_forward"]


# --------------------------------------------------------------------------------------
# gate kernels: pre viewed as rows x {feature, gate} x inner
# --------------------------------------------------------------------------------------


#: the kernels on the op's hot path: none may spill registers at any config its launcher can
#: pick, on sm_90 or sm_80 (tests/test_kernel_resources.py compiles each; ops/resources.py)
HOT_KERNELS = ("_gated_conv_fwd_kernel", "_gate_fwd_kernel", "_gate_bwd_kernel")

@triton.jit
def _gate_fwd_kernel(pre_ptr, y_ptr, rows, inner, negative_slope,
                     ACT: tl.constexpr, ROWS: tl.constexpr, BLOCK_I: tl.constexpr):
    pid = tl.program_id(0)
    n_ib = tl.cdiv(inner, BLOCK_I)
    rb = pid // n_ib
    ib = pid - rb * n_ib
    r = rb.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    i = ib * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (r < rows)[:, None] & (i < inner)[None, :]
    src = r[:, None] * 2 * inner + i[None, :]  # r is int64: no int32 product
    dst = r[:, None] * inner + i[None, :]
    f = tl.load(pre_ptr + src, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(pre_ptr + src + inner, mask=mask, other=0.0).to(tl.float32)
    y = _act(f, negative_slope, ACT) * _sigmoid(g)
    tl.store(y_ptr + dst, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_bwd_kernel(dy_ptr, pre_ptr, dpre_ptr, rows, inner, negative_slope,
                     ACT: tl.constexpr, ROWS: tl.constexpr, BLOCK_I: tl.constexpr):
    pid = tl.program_id(0)
    n_ib = tl.cdiv(inner, BLOCK_I)
    rb = pid // n_ib
    ib = pid - rb * n_ib
    r = rb.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    i = ib * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (r < rows)[:, None] & (i < inner)[None, :]
    src = r[:, None] * 2 * inner + i[None, :]  # r is int64: no int32 product
    dst = r[:, None] * inner + i[None, :]
    f = tl.load(pre_ptr + src, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(pre_ptr + src + inner, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + dst, mask=mask, other=0.0).to(tl.float32)
    s = _sigmoid(g)
    a, da = _act_and_grad(f, negative_slope, ACT)
    df = dy * s * da
    dg = dy * a * (s * (1.0 - s))
    out_ty = dpre_ptr.dtype.element_ty
    tl.store(dpre_ptr + src, df.to(out_ty), mask=mask)
    tl.store(dpre_ptr + src + inner, dg.to(out_ty), mask=mask)


def _gate_layout(pre: torch.Tensor):
    """(pre in the chosen layout, channels_last?, rows, inner)."""
    if pre.dim() != 4:
        raise ValueError(f"pre must be 4-D (B, 2C, H, W), got shape {tuple(pre.shape)}")
    B, C2, H, W = pre.shape
    if C2 % 2:
        raise ValueError(f"pre must have an even number of channels, got {C2}")
    C = C2 // 2
    channels_last = is_channels_last(pre)
    if channels_last:
        rows, inner = B * H * W, C
    else:
        pre = pre.contiguous()
        rows, inner = B, C * H * W
    return pre, channels_last, rows, inner


def _gate_blocks(inner: int):
    block_i = min(triton.next_power_of_2(max(inner, 1)), 1024)
    rows_per = max(1, 2048 // block_i)
    return rows_per, block_i


def _gate_grid(rows: int, inner: int, rows_per: int, block_i: int):
    return (triton.cdiv(rows, rows_per) * triton.cdiv(inner, block_i),)


def gate_forward(pre: torch.Tensor, activation: int, negative_slope: float) -> torch.Tensor:
    """``act(pre[:, :C]) * sigmoid(pre[:, C:])`` for a (B, 2C, H, W) ``pre``."""
    pre, channels_last, rows, inner = _gate_layout(pre)
    B, C2, H, W = pre.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    y = new_output((B, C2 // 2, H, W), dtype=pre.dtype, device=pre.device, memory_format=fmt)
    if y.numel() == 0:
        return y
    rows_per, block_i = _gate_blocks(inner)
    with _device_ctx(pre):
        _gate_fwd_kernel[_gate_grid(rows, inner, rows_per, block_i)](
            pre, y, rows, inner, float(negative_slope),
            ACT=int(activation), ROWS=rows_per, BLOCK_I=block_i, num_warps=4)
    return y


def gate_backward(grad_out: torch.Tensor, pre: torch.Tensor, activation: int,
                  negative_slope: float) -> torch.Tensor:
    """Gradient of ``gate_forward`` with respect to ``pre`` (same memory format as the
    layout chosen for ``pre``)."""
    pre, channels_last, rows, inner = _gate_layout(pre)
    B, C2, H, W = pre.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if tuple(grad_out.shape) != (B, C2 // 2, H, W):
        raise ValueError(f"grad_out has shape {tuple(grad_out.shape)}, expected {(B, C2 // 2, H, W)}")
    grad_out = grad_out.contiguous(memory_format=fmt)
    if channels_last and not grad_out.is_contiguous(memory_format=torch.channels_last):
        grad_out = grad_out.clone(memory_format=torch.channels_last)
    grad_pre = new_output((B, C2, H, W), dtype=pre.dtype, device=pre.device, memory_format=fmt)
    if grad_pre.numel() == 0:
        return grad_pre
    rows_per, block_i = _gate_blocks(inner)
    with _device_ctx(pre):
        _gate_bwd_kernel[_gate_grid(rows, inner, rows_per, block_i)](
            grad_out, pre, grad_pre, rows, inner, float(negative_slope),
            ACT=int(activation), ROWS=rows_per, BLOCK_I=block_i, num_warps=4)
    return grad_pre


# --------------------------------------------------------------------------------------
# implicit-GEMM gated convolution
# --------------------------------------------------------------------------------------
#
# GEMM view: M = B*Ho*Wo output pixels (m = (b*Ho + oh)*Wo + ow), N = Cout,
# K = KH*KW*Cin ordered (kh, kw) outer, Cin inner. The weight is pre-arranged on the
# host as wt[2, K, NPAD] (wt[0]: feature filters, wt[1]: gate filters; NPAD = Cout
# rounded up to 16 for aligned rows). The K loop is flattened into one loop of
# KH*KW*cdiv(Cin, BLOCK_K) steps so the software pipeliner sees a single loop.


@triton.jit
def _gated_conv_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    Cin, H, W, Cout, Ho, Wo, M,
    sxb, sxc, sxh, sxw,
    syb, syc, syh, syw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    NPAD, W_GATE_OFF,
    negative_slope,
    KH: tl.constexpr, KW: tl.constexpr, UP: tl.constexpr, ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(Cout, BLOCK_N)
    # N is small for convolutions: N fastest, so consecutive programs share the A tile.
    pid_m = pid // num_pid_n
    pid_n = pid - pid_m * num_pid_n

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < Cout

    ow = offs_m % Wo
    t = offs_m // Wo
    oh = t % Ho
    b = t // Ho
    x_base = b.to(tl.int64) * sxb
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    Hu = H * UP
    Wu = W * UP

    w_f_ptrs = w_ptr + offs_n[None, :]
    w_g_ptrs = w_ptr + W_GATE_OFF + offs_n[None, :]

    acc_f = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    n_cb = tl.cdiv(Cin, BLOCK_K)
    for kk in range(0, KH * KW * n_cb):
        r = kk // n_cb
        cb = kk - r * n_cb
        ki = r // KW
        kj = r - ki * KW
        ih_u = ih0 + ki * dil_h
        iw_u = iw0 + kj * dil_w
        pix_ok = m_ok & (ih_u >= 0) & (ih_u < Hu) & (iw_u >= 0) & (iw_u < Wu)
        ih = tl.where(pix_ok, ih_u, 0)
        iw = tl.where(pix_ok, iw_u, 0)
        if UP > 1:
            ih = ih // UP
            iw = iw // UP
        row_off = x_base + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
        c = cb * BLOCK_K + offs_k
        c_ok = c < Cin
        a = tl.load(x_ptr + (row_off[:, None] + (c * sxc)[None, :]),
                    mask=pix_ok[:, None] & c_ok[None, :], other=0.0)
        k_row = (r * Cin + c) * NPAD
        w_mask = c_ok[:, None] & n_ok[None, :]
        wf = tl.load(w_f_ptrs + k_row[:, None], mask=w_mask, other=0.0)
        wg = tl.load(w_g_ptrs + k_row[:, None], mask=w_mask, other=0.0)
        acc_f = tl.dot(a, wf, acc_f, input_precision=PRECISION)
        acc_g = tl.dot(a, wg, acc_g, input_precision=PRECISION)

    if HAS_BIAS:
        bf = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0)
        bg = tl.load(b_ptr + Cout + offs_n, mask=n_ok, other=0.0)
        acc_f += bf[None, :]
        acc_g += bg[None, :]
    out = _act(acc_f, negative_slope, ACT) * _sigmoid(acc_g)

    y_row = b.to(tl.int64) * syb + oh.to(tl.int64) * syh + ow.to(tl.int64) * syw
    y_ptrs = y_ptr + (y_row[:, None] + (offs_n.to(tl.int64) * syc)[None, :])
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _gpu_configs():
    # Two (BLOCK_M, BLOCK_N) fp32 accumulators live in registers (features and gates): tiles of
    # 128 x 128 spill on sm_80 (mma.sync keeps operands in registers too), so N tiles stop at
    # 64 for 128-row tiles. Every config here compiles without spills on sm_90 and sm_80 for
    # the DeepFill v2 layers (tests/test_kernel_resources.py).
    cfgs = []
    for bm, bn, bk, warps, stages in (
        (128, 64, 64, 8, 3),
        (128, 64, 32, 8, 4),
        (64, 64, 64, 4, 4),
        (64, 128, 64, 8, 3),
        (128, 32, 64, 4, 4),
        (64, 32, 64, 4, 3),
        (64, 64, 32, 4, 3),
        (64, 32, 32, 4, 3),
    ):
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
                                  num_warps=warps, num_stages=stages))
    return cfgs


_SMEM_LIMIT = 160 * 1024  # opt-in shared memory per block: 227 KiB on sm_90, 163 KiB on sm_80; below both


def config_shared_bytes(cfg, esize: int) -> int:
    """Shared memory a config's pipeline needs: num_stages copies of the x tile and both weight tiles."""
    kw = cfg.kwargs
    return cfg.num_stages * esize * kw["BLOCK_K"] * (kw["BLOCK_M"] + 2 * kw["BLOCK_N"])


def _prune_configs(configs, named_args, **kwargs):
    """Drop configs that cannot fit in shared memory, whose N tile dwarfs Cout, or whose K tile
    dwarfs Cin (DeepFill's first layer has Cin = 5: a 64-channel tile is mostly masked lanes and
    spills on 5x5 filters)."""
    esize = named_args["x_ptr"].element_size()
    max_bn = max(32, triton.next_power_of_2(named_args["Cout"]))
    max_bk = max(32, triton.next_power_of_2(named_args["Cin"]))
    kept = [cfg for cfg in configs
            if config_shared_bytes(cfg, esize) <= _SMEM_LIMIT and cfg.kwargs["BLOCK_N"] <= max_bn
            and cfg.kwargs["BLOCK_K"] <= max_bk]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


# what changes the best config: the layer's shape, the number of output pixels (M = B*Ho*Wo),
# the stride and dilation (the gather pattern) and the deconv's upsampling
AUTOTUNE_KEY = ["Cin", "Cout", "KH", "KW", "M", "stride_h", "stride_w", "dil_h", "dil_w", "UP"]
_INTERPRET_META = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16}
# FASTINPAINT_TRITON_AUTOTUNE=0: one fixed GPU config (the test suite uses it to bound
# compile time; benchmarks and users autotune).
_AUTOTUNE = os.environ.get("FASTINPAINT_TRITON_AUTOTUNE", "1") != "0"
_FIXED_META = {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3}

if _INTERPRET or not _AUTOTUNE:
    _conv_launch = _gated_conv_fwd_kernel
else:
    _conv_launch = triton.autotune(configs=_gpu_configs(), key=AUTOTUNE_KEY,
                                   prune_configs_by={"early_config_prune": _prune_configs})(
        _gated_conv_fwd_kernel)


# weight id -> (weakref to the weight, its version, dtype, the arranged weight, NPAD): inference
# calls the same layer's weight again and again, so it is arranged once, and again only after
# the weight changes (an optimiser step or any in-place write bumps its version)
_ARRANGED: dict = {}
_ARRANGED_MAX = 256


def _arranged_weight(weight: torch.Tensor, dtype: torch.dtype):
    """:func:`_arrange_weight`, cached per weight tensor and version."""
    key = id(weight)
    hit = _ARRANGED.get(key)
    if hit is not None and hit[0]() is weight and hit[1] == weight._version and hit[2] == dtype:
        return hit[3], hit[4]
    wt, npad = _arrange_weight(weight, dtype)
    if len(_ARRANGED) >= _ARRANGED_MAX:
        _ARRANGED.pop(next(iter(_ARRANGED)))
    # the entry goes when the weight does (its id may then be reused by another tensor)
    ref = weakref.ref(weight, lambda _, k=key: _ARRANGED.pop(k, None))
    _ARRANGED[key] = (ref, weight._version, dtype, wt, npad)
    return wt, npad


def _arrange_weight(weight: torch.Tensor, dtype: torch.dtype):
    """(2*Cout, Cin, KH, KW) -> contiguous (2, KH*KW*Cin, NPAD) with rows ordered
    (kh, kw, cin); NPAD = Cout rounded up to a multiple of 16."""
    C2, Cin, KH, KW = weight.shape
    Cout = C2 // 2
    K = KH * KW * Cin
    npad = (Cout + 15) // 16 * 16
    w = weight.detach().to(dtype).reshape(2, Cout, Cin, KH, KW).permute(0, 3, 4, 2, 1)
    w = w.reshape(2, K, Cout)
    if npad == Cout:
        return w.contiguous(), npad
    wt = torch.zeros((2, K, npad), dtype=dtype, device=weight.device)
    wt[:, :, :Cout] = w
    return wt, npad


def conv_forward(x: torch.Tensor, weight: torch.Tensor, bias, stride, padding, dilation,
                 upsample: int, activation: int, negative_slope: float) -> torch.Tensor:
    """Gated convolution ``act(conv(U)[:, :Cout]) * sigmoid(conv(U)[:, Cout:])`` where
    ``U`` is ``x`` (``upsample=1``) or its nearest-x2 upsampling (``upsample=2``)."""
    B, Cin, H, W = x.shape
    C2, wcin, KH, KW = weight.shape
    Cout = C2 // 2
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    up = int(upsample)
    if up not in (1, 2):
        raise ValueError(f"upsample must be 1 or 2, got {upsample}")
    Ho = (up * H + 2 * ph - dh * (KH - 1) - 1) // sh + 1
    Wo = (up * W + 2 * pw - dw * (KW - 1) - 1) // sw + 1
    fmt = conv_output_format(x, weight)
    y = new_output((B, Cout, max(Ho, 0), max(Wo, 0)), dtype=x.dtype, device=x.device,
                   memory_format=fmt)
    M = B * max(Ho, 0) * max(Wo, 0)
    if M == 0 or Cout == 0:
        return y
    wt, npad = _arranged_weight(weight, x.dtype)
    K = KH * KW * Cin
    has_bias = bias is not None
    b_arg = bias.detach().to(torch.float32).contiguous() if has_bias else wt
    if x.dtype == torch.float32:
        precision = "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    else:
        precision = "ieee"  # ignored by tl.dot for 16-bit inputs

    args = (
        x, wt, b_arg, y,
        Cin, H, W, Cout, Ho, Wo, M,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        y.stride(0), y.stride(1), y.stride(2), y.stride(3),
        sh, sw, ph, pw, dh, dw,
        npad, K * npad,
        float(negative_slope),
    )
    consts = dict(KH=KH, KW=KW, UP=up, ACT=int(activation), HAS_BIAS=has_bias,
                  PRECISION=precision)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(Cout, meta["BLOCK_N"]),)

    with _device_ctx(x):
        if _INTERPRET:
            _conv_launch[grid](*args, **consts, **_INTERPRET_META, num_warps=4)
        elif not _AUTOTUNE:
            _conv_launch[grid](*args, **consts, **_FIXED_META)
        else:
            _conv_launch[grid](*args, **consts)
    return y
