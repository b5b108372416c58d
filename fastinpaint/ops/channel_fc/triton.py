"""Triton kernels of the channel-wise fully connected layer.

Plain launchers (no autograd, no ``torch.library`` registration):

* ``forward(x, weight, bias, activation, negative_slope)``: ``y[b, c] = act(W[c] @ x[b, c]
  + bias[c])``; one batched GEMM over channels (grid axis 1 = c), each program a
  (BLOCK_B x BLOCK_Q) tile of y[:, c, :], bias and activation in the epilogue.
* ``backward(grad_out, x, weight, out, activation, negative_slope, need_x, need_weight,
  need_bias)``: ``D = grad_out * act'(pre)`` is recomputed in the operand loads from
  ``grad_out`` and the forward's output ``out`` (never written), then
  ``dx[b, c] = W[c]^T D[b, c]`` (one kernel) and ``dW[c] = sum_b D[b, c] x[b, c]^T``
  with ``db[c] = sum_b D[b, c]`` (a second kernel; db from the programs of the first
  column of tiles).

x, y, grad_out, out and dx are addressed through their four strides (position p of the
H*W map is at p * stride_w when the map's rows follow each other, as in NCHW and
channels_last, else at (p // W, p % W)), so NCHW, channels_last and strided views are read and
written in place, with no copies. weight is (C, P, P) contiguous, bias (C, P).
Math in float32 (``tl.dot`` accumulates in float32; float32 operands use TF32 only when
``torch.backends.cuda.matmul.allow_tf32`` is on). Offsets are 64-bit.

Activation codes and device functions: ``ops/_activation_triton.py`` (leaky_relu with
negative_slope >= 0: the backward reads act' from the output).
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from ..._debug import new_output
from .._activation_triton import act as _act, grad_from_output as _grad_from_out
from .._common import INTERPRET as _INTERPRET, device_ctx as _device_ctx
from .._layout import suggest_memory_format

__all__ = ["forward", "backward"]


#: the kernels on the op's hot path: none may spill registers at any config its launcher can
#: pick, on sm_90 or sm_80 (tests/test_kernel_resources.py compiles each; ops/resources.py)
HOT_KERNELS = ("_fwd_kernel", "_dx_kernel", "_dw_kernel")

@triton.jit
def _pos(p, Wd, sh, sw, FLAT: tl.constexpr):
    """Offset of map position p (flat over H x W) for strides (sh, sw). FLAT: the map's rows
    follow each other (sh == W * sw: NCHW, channels_last), so the offset is p * sw, with no
    division; only other strided views pay for p // W."""
    if FLAT:
        return p.to(tl.int64) * sw
    h = p // Wd
    w = p - h * Wd
    return h.to(tl.int64) * sh + w.to(tl.int64) * sw


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, B, P, Wd,
                sxb, sxc, sxh, sxw, syb, syc, syh, syw, slope,
                ACT: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, FLAT: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    c = tl.program_id(1).to(tl.int64)
    n_q = tl.cdiv(P, BLOCK_Q)
    pb = pid // n_q
    pq = pid - pb * n_q
    offs_b = pb * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_q = pq * BLOCK_Q + tl.arange(0, BLOCK_Q)
    b_ok = offs_b < B
    q_ok = offs_q < P
    x_rows = x_ptr + c * sxc + offs_b.to(tl.int64) * sxb
    w_rows = w_ptr + c * P * P + offs_q.to(tl.int64) * P
    acc = tl.zeros((BLOCK_B, BLOCK_Q), dtype=tl.float32)
    for k0 in range(0, P, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < P
        a = tl.load(x_rows[:, None] + _pos(offs_k, Wd, sxh, sxw, FLAT)[None, :],
                    mask=b_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_rows[None, :] + offs_k[:, None], mask=k_ok[:, None] & q_ok[None, :], other=0.0)
        acc = tl.dot(a, wt, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c * P + offs_q, mask=q_ok, other=0.0).to(tl.float32)[None, :]
    out = _act(acc, slope, ACT)
    y_ptrs = y_ptr + c * syc + (offs_b.to(tl.int64) * syb)[:, None] + _pos(offs_q, Wd, syh, syw, FLAT)[None, :]
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=b_ok[:, None] & q_ok[None, :])


@triton.jit
def _dx_kernel(dy_ptr, o_ptr, w_ptr, dx_ptr, B, P, Wd,
               sdb, sdc, sdh, sdw, sob, soc, soh, sow, sxb, sxc, sxh, sxw, slope,
               ACT: tl.constexpr, PRECISION: tl.constexpr, FLAT: tl.constexpr,
               BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """dx[b, c, p] = sum_q D[b, c, q] W[c, q, p]."""
    pid = tl.program_id(0)
    c = tl.program_id(1).to(tl.int64)
    n_p = tl.cdiv(P, BLOCK_P)
    pb = pid // n_p
    pp = pid - pb * n_p
    offs_b = pb * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_p = pp * BLOCK_P + tl.arange(0, BLOCK_P)
    b_ok = offs_b < B
    p_ok = offs_p < P
    dy_rows = dy_ptr + c * sdc + offs_b.to(tl.int64) * sdb
    o_rows = o_ptr + c * soc + offs_b.to(tl.int64) * sob
    w_base = w_ptr + c * P * P
    acc = tl.zeros((BLOCK_B, BLOCK_P), dtype=tl.float32)
    for q0 in range(0, P, BLOCK_K):
        offs_q = q0 + tl.arange(0, BLOCK_K)
        q_ok = offs_q < P
        m = b_ok[:, None] & q_ok[None, :]
        d = tl.load(dy_rows[:, None] + _pos(offs_q, Wd, sdh, sdw, FLAT)[None, :], mask=m, other=0.0)
        if ACT != 0:
            o = tl.load(o_rows[:, None] + _pos(offs_q, Wd, soh, sow, FLAT)[None, :], mask=m, other=0.0)
            d = (d.to(tl.float32) * _grad_from_out(o.to(tl.float32), slope, ACT)).to(dy_ptr.dtype.element_ty)
        wt = tl.load(w_base + offs_q.to(tl.int64)[:, None] * P + offs_p[None, :],
                     mask=q_ok[:, None] & p_ok[None, :], other=0.0)
        acc = tl.dot(d, wt, acc, input_precision=PRECISION)
    dx_ptrs = dx_ptr + c * sxc + (offs_b.to(tl.int64) * sxb)[:, None] + _pos(offs_p, Wd, sxh, sxw, FLAT)[None, :]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=b_ok[:, None] & p_ok[None, :])


@triton.jit
def _dw_kernel(dy_ptr, o_ptr, x_ptr, dw_ptr, db_ptr, B, P, Wd, n_p,
               sdb, sdc, sdh, sdw, sob, soc, soh, sow, sxb, sxc, sxh, sxw, slope,
               ACT: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, PRECISION: tl.constexpr,
               FLAT: tl.constexpr,
               BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_B: tl.constexpr):
    """dW[c, q, p] = sum_b D[b, c, q] x[b, c, p];  db[c, q] = sum_b D[b, c, q] (first column of tiles)."""
    pid = tl.program_id(0)
    c = tl.program_id(1).to(tl.int64)
    pq = pid // n_p
    pp = pid - pq * n_p
    offs_q = pq * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_p = pp * BLOCK_P + tl.arange(0, BLOCK_P)
    q_ok = offs_q < P
    p_ok = offs_p < P
    dy_cols = dy_ptr + c * sdc + _pos(offs_q, Wd, sdh, sdw, FLAT)
    o_cols = o_ptr + c * soc + _pos(offs_q, Wd, soh, sow, FLAT)
    x_cols = x_ptr + c * sxc + _pos(offs_p, Wd, sxh, sxw, FLAT)
    acc = tl.zeros((BLOCK_Q, BLOCK_P), dtype=tl.float32)
    db = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        b_ok = offs_b < B
        m = q_ok[:, None] & b_ok[None, :]
        boff = offs_b.to(tl.int64)
        d = tl.load(dy_cols[:, None] + (boff * sdb)[None, :], mask=m, other=0.0)  # (Q, B): D^T
        if ACT != 0:
            o = tl.load(o_cols[:, None] + (boff * sob)[None, :], mask=m, other=0.0)
            d = (d.to(tl.float32) * _grad_from_out(o.to(tl.float32), slope, ACT)).to(dy_ptr.dtype.element_ty)
        if NEED_DB:
            db += tl.sum(d.to(tl.float32), axis=1)
        if NEED_DW:
            xt = tl.load(x_cols[None, :] + (boff * sxb)[:, None], mask=b_ok[:, None] & p_ok[None, :], other=0.0)
            acc = tl.dot(d, xt, acc, input_precision=PRECISION)
    if NEED_DW:
        dw_ptrs = dw_ptr + c * P * P + offs_q.to(tl.int64)[:, None] * P + offs_p[None, :]
        tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=q_ok[:, None] & p_ok[None, :])
    if NEED_DB:
        tl.store(db_ptr + c * P + offs_q, db.to(db_ptr.dtype.element_ty), mask=q_ok & (pp == 0))


def _pow2_clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not _INTERPRET:
        return "tf32"
    return "ieee"


def _gemm_blocks(M: int, N: int, K: int, esize: int) -> dict:
    """Tile sizes of an (M x N) output tile with a K loop over operands of ``esize`` bytes.
    Every dimension at least 16 (tl.dot's minimum); small problems (4x4 maps: P = 16) use
    16-wide tiles. float32 operands take twice the registers: K tiles of 32 and 8 warps for
    64 x 64 outputs keep sm_80 from spilling (tests/test_kernel_resources.py)."""
    if _INTERPRET:
        return dict(BM=16, BN=16, BK=16, num_warps=4)
    bm = _pow2_clamp(M, 16, 64)
    bn = _pow2_clamp(N, 16, 64)
    bk = _pow2_clamp(K, 16, 64 if esize < 4 else 32)
    warps = 4 if bm * bn < 64 * 64 else 8
    return dict(BM=bm, BN=bn, BK=bk, num_warps=warps)


def _strides4(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _flat(*tensors) -> bool:
    """Every tensor's map rows follow each other (stride(2) == W * stride(3)): positions are p * stride(3)."""
    return all(t.shape[2] == 1 or t.stride(2) == t.shape[3] * t.stride(3) for t in tensors)


def forward(x: torch.Tensor, weight: torch.Tensor, bias, activation: int, negative_slope: float) -> torch.Tensor:
    B, C, H, W = x.shape
    P = H * W
    y = new_output((B, C, H, W), dtype=x.dtype, device=x.device, memory_format=suggest_memory_format(x))
    if y.numel() == 0:
        return y
    w = weight.contiguous()
    has_bias = bias is not None
    b = bias.contiguous() if has_bias else w
    blk = _gemm_blocks(B, P, P, x.element_size())
    grid = (triton.cdiv(B, blk["BM"]) * triton.cdiv(P, blk["BN"]), C)
    with _device_ctx(x):
        _fwd_kernel[grid](x, w, b, y, B, P, W, *_strides4(x), *_strides4(y), float(negative_slope),
                          ACT=int(activation), HAS_BIAS=has_bias, PRECISION=_precision(x.dtype), FLAT=_flat(x, y),
                          BLOCK_B=blk["BM"], BLOCK_Q=blk["BN"], BLOCK_K=blk["BK"], num_warps=blk["num_warps"])
    return y


def backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, out, activation: int,
             negative_slope: float, need_x: bool, need_weight: bool, need_bias: bool):
    B, C, H, W = x.shape
    P = H * W
    act = int(activation)
    o = out if (act != 0 and out is not None) else grad_out  # not read when act == 0
    w = weight.contiguous()
    precision = _precision(x.dtype)
    slope = float(negative_slope)
    dx, dw, db = x.new_empty((0,)), x.new_empty((0,)), x.new_empty((0,))  # distinct: outputs may not alias
    if need_x:
        dx = new_output((B, C, H, W), dtype=x.dtype, device=x.device, memory_format=suggest_memory_format(x))
        if dx.numel():
            blk = _gemm_blocks(B, P, P, x.element_size())
            grid = (triton.cdiv(B, blk["BM"]) * triton.cdiv(P, blk["BN"]), C)
            with _device_ctx(x):
                _dx_kernel[grid](grad_out, o, w, dx, B, P, W, *_strides4(grad_out), *_strides4(o), *_strides4(dx),
                                 slope, ACT=act, PRECISION=precision, FLAT=_flat(grad_out, o, dx), BLOCK_B=blk["BM"], BLOCK_P=blk["BN"],
                                 BLOCK_K=blk["BK"], num_warps=blk["num_warps"])
    if need_weight or need_bias:
        if need_weight:
            dw = new_output((C, P, P), dtype=weight.dtype, device=x.device)
        if need_bias:
            db = new_output((C, P), dtype=x.dtype, device=x.device)
        blk = _gemm_blocks(P, P, B, x.element_size())
        n_p = triton.cdiv(P, blk["BN"]) if need_weight else 1
        grid = (triton.cdiv(P, blk["BM"]) * n_p, C)
        with _device_ctx(x):
            _dw_kernel[grid](grad_out, o, x, dw if need_weight else w, db if need_bias else w, B, P, W, n_p,
                             *_strides4(grad_out), *_strides4(o), *_strides4(x), slope,
                             ACT=act, NEED_DW=bool(need_weight), NEED_DB=bool(need_bias), PRECISION=precision,
                             FLAT=_flat(grad_out, o, x),
                             BLOCK_Q=blk["BM"], BLOCK_P=blk["BN"] if need_weight else 16, BLOCK_B=blk["BK"],
                             num_warps=blk["num_warps"])
    return dx, dw, db
