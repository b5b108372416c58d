"""Triton kernels of pixel attention and of the attention-transfer loss (flash style).

Pixel attention, ``out_i = sum_j softmax_j(scale * q_i . k_j) v_j``:

* forward: one program per (query block, sample, value-channel block); it streams the key
  blocks, keeps the running row maximum ``m`` and sum ``l`` (online softmax, base 2) and the
  unnormalised output in registers, and writes ``out`` and the row log-sum-exp ``lse``
  (natural log). A row with no valid key writes ``out = 0`` and ``lse = +inf``, so that
  ``exp(s - lse) = 0`` in the backward kernels.
* backward: ``delta_i = sum_d dO_id O_id`` (eager, O(N Dv)); one kernel per key block
  accumulates dK and dV over every query block, one per query block accumulates dQ over every
  key block (no atomics, deterministic); both recompute ``p = exp(s - lse)`` from q, k.

Nothing of size N x N is ever held: the memory is O(N (Dqk + Dv)) per sample; saved for
backward are q, k, v, the mask, out and lse (B*N floats).

The attention-transfer loss's row distances ``d_i = dist(r_s_i, r_t_i)``:

* forward: per query block, pass 1 streams the key blocks once for the student and the
  teacher scores and keeps both running log-sum-exps; pass 2 streams them again, forms
  ``r_s = exp(s_s - lse_s)``, ``r_t = exp(s_t - lse_t)`` and accumulates ``d_i`` and
  ``c_i = sum_j r_s_ij g_ij`` with ``g = 2 (r_s - r_t)`` (l2) or ``sign(r_s - r_t)`` (l1).
* backward, for a row gradient ``gd_i``: the softmax backward gives
  ``dS_ij = gd_i r_s_ij (g_ij - c_i)``; then ``dq_s = scale dS k_s`` (one kernel over query
  blocks) and ``dk_s = scale dS^T q_s`` (one over key blocks), recomputing r_s and r_t.

Limits: Dqk <= 128 (student and teacher), Dv <= 256 per program (larger Dv is split over
the grid in the forward; the backward takes Dv <= 256). float16, bfloat16, float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._debug import new_output
from .._common import INTERPRET as _INTERPRET, device_ctx as _device_ctx

MAX_QK = 128
MAX_V = 256
_LOG2E = 1.4426950408889634


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


def _precision(t: torch.Tensor) -> str:
    if t.dtype == torch.float32 and t.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


# ----------------------------------------------------------------------------- pixel attention

#: the kernels on the op's hot path: none may spill registers at any config its launcher can
#: pick, on sm_90 or sm_80 (tests/test_kernel_resources.py compiles each; ops/resources.py)
HOT_KERNELS = ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel", "_transfer_fwd_kernel", "_transfer_bwd_dq_kernel", "_transfer_bwd_dk_kernel")

@triton.jit
def _attn_fwd_kernel(Q, K, V, MASK, O, LSE, N, DQK, DV, scale_log2,
                     sqb, sqn, sqd, skb, skn, skd, svb, svn, svd, sob, son, sod, smb, smn,
                     HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pid_v = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DQK)
    offs_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    row_ok = offs_m < N
    q = tl.load(Q + b * sqb + offs_m[:, None].to(tl.int64) * sqn + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d[None, :] < DQK), other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        key_ok = offs_n < N
        if HAS_MASK:
            excl = tl.load(MASK + b * smb + offs_n * smn, mask=key_ok, other=1)
            key_ok = key_ok & (excl == 0)
        kt = tl.load(K + b * skb + offs_n[None, :].to(tl.int64) * skn + offs_d[:, None] * skd,
                     mask=(offs_n[None, :] < N) & (offs_d[:, None] < DQK), other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * scale_log2
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * svb + offs_n[:, None].to(tl.int64) * svn + offs_v[None, :] * svd,
                    mask=(offs_n[:, None] < N) & (offs_v[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(O + b * sob + offs_m[:, None].to(tl.int64) * son + offs_v[None, :] * sod,
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_v[None, :] < DV))
    if pid_v == 0:
        m_safe = tl.where(empty, 0.0, m_i)
        lse = tl.where(empty, float("inf"), (m_safe + tl.log2(l_safe)) * 0.6931471805599453)
        tl.store(LSE + b * N + offs_m, lse, mask=row_ok)


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, MASK, DO, LSE, DELTA, DK, DV_OUT, N, DQK, DV, scale, scale_log2,
                          sqb, sqn, sqd, skb, skn, skd, svb, svn, svd, sob, son, sod, smb, smn,
                          HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    """dK, dV of one key block: q, dO and dK, dV share the contiguous (B, N, D) outputs' strides
    (sq*, so*); K, V are read with their own strides."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_DQK)
    offs_v = tl.arange(0, BLOCK_DV)
    key_in = offs_n < N
    key_ok = key_in
    if HAS_MASK:
        excl = tl.load(MASK + b * smb + offs_n * smn, mask=key_in, other=1)
        key_ok = key_ok & (excl == 0)
    k = tl.load(K + b * skb + offs_n[:, None].to(tl.int64) * skn + offs_d[None, :] * skd,
                mask=key_in[:, None] & (offs_d[None, :] < DQK), other=0.0)
    v = tl.load(V + b * svb + offs_n[:, None].to(tl.int64) * svn + offs_v[None, :] * svd,
                mask=key_in[:, None] & (offs_v[None, :] < DV), other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_DQK), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), tl.float32)
    for start in range(0, N, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N
        qt = tl.load(Q + b * sqb + offs_m[None, :].to(tl.int64) * sqn + offs_d[:, None] * sqd,
                     mask=row_ok[None, :] & (offs_d[:, None] < DQK), other=0.0)
        lse = tl.load(LSE + b * N + offs_m, mask=row_ok, other=float("inf"))
        st = tl.dot(k, qt, input_precision=PRECISION) * scale_log2
        pt = tl.exp2(st - lse[None, :] * 1.4426950408889634)
        pt = tl.where(key_ok[:, None], pt, 0.0)
        do = tl.load(DO + b * sob + offs_m[:, None].to(tl.int64) * son + offs_v[None, :] * sod,
                     mask=row_ok[:, None] & (offs_v[None, :] < DV), other=0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        delta = tl.load(DELTA + b * N + offs_m, mask=row_ok, other=0.0)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=PRECISION)
    dk = dk * scale
    tl.store(DK + b * sqb + offs_n[:, None].to(tl.int64) * sqn + offs_d[None, :] * sqd,
             dk.to(DK.dtype.element_ty), mask=key_in[:, None] & (offs_d[None, :] < DQK))
    tl.store(DV_OUT + b * sob + offs_n[:, None].to(tl.int64) * son + offs_v[None, :] * sod,
             dv.to(DV_OUT.dtype.element_ty), mask=key_in[:, None] & (offs_v[None, :] < DV))


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, MASK, DO, LSE, DELTA, DQ, N, DQK, DV, scale, scale_log2,
                        sqb, sqn, sqd, skb, skn, skd, svb, svn, svd, sob, son, sod, smb, smn,
                        HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DQK)
    offs_v = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < N
    q = tl.load(Q + b * sqb + offs_m[:, None].to(tl.int64) * sqn + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d[None, :] < DQK), other=0.0)
    do = tl.load(DO + b * sob + offs_m[:, None].to(tl.int64) * son + offs_v[None, :] * sod,
                 mask=row_ok[:, None] & (offs_v[None, :] < DV), other=0.0)
    lse = tl.load(LSE + b * N + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + b * N + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_DQK), tl.float32)
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        key_in = offs_n < N
        key_ok = key_in
        if HAS_MASK:
            excl = tl.load(MASK + b * smb + offs_n * smn, mask=key_in, other=1)
            key_ok = key_ok & (excl == 0)
        kt = tl.load(K + b * skb + offs_n[None, :].to(tl.int64) * skn + offs_d[:, None] * skd,
                     mask=key_in[None, :] & (offs_d[:, None] < DQK), other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * scale_log2
        p = tl.exp2(s - lse[:, None] * 1.4426950408889634)
        p = tl.where(key_ok[None, :], p, 0.0)
        vt = tl.load(V + b * svb + offs_n[None, :].to(tl.int64) * svn + offs_v[:, None] * svd,
                     mask=key_in[None, :] & (offs_v[:, None] < DV), other=0.0)
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)
    dq = dq * scale
    tl.store(DQ + b * sqb + offs_m[:, None].to(tl.int64) * sqn + offs_d[None, :] * sqd,
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < DQK))


def _attn_meta(dqk: int, dv_block: int, kind: str, esize: int) -> dict:
    """Block sizes and warps (fixed: these kernels stream over all of N, so the best block
    size depends mostly on the head dims). The fp32 accumulators of the output rows (or of
    dk and dv) grow with Dv: with Dv = 256 and with float32 operands (``esize`` 4: twice the
    registers) the tiles shrink so that no config spills on sm_90 or sm_80
    (tests/test_kernel_resources.py)."""
    if _INTERPRET:
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4)
    big = dv_block > 128
    wide = esize >= 4
    if kind == "fwd":
        return dict(BLOCK_M=32 if wide else (64 if big else 128), BLOCK_N=64, num_warps=8 if big or wide else 4,
                    num_stages=2)
    if kind == "dkdv":
        if big and wide:  # exact float32 dots and 256-wide dv accumulators: small tiles, no pipelining
            return dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=1)
        return dict(BLOCK_M=16 if big else 64, BLOCK_N=64, num_warps=8, num_stages=2)
    return dict(BLOCK_M=32 if (big and wide) else 64, BLOCK_N=32 if big else 64, num_warps=8, num_stages=2)


def _mask_arg(key_mask, q):
    if key_mask is None:
        return q, 0, 0, False
    m = key_mask.view(torch.uint8) if key_mask.dtype == torch.bool else key_mask
    return m, m.stride(0), m.stride(1), True


def attention_forward(q, k, v, key_mask, scale: float):
    """(out (B, N, Dv) in q's dtype, lse (B, N) float32)."""
    B, N, DQK = q.shape
    DV = v.shape[2]
    out = new_output((B, N, DV), dtype=q.dtype, device=q.device)
    lse = new_output((B, N), dtype=torch.float32, device=q.device)
    if B == 0 or N == 0:
        return out, lse
    # the grid's third axis splits Dv: 128 columns per program for float32 (the fp32 output
    # accumulator and V tile of 256 columns spill on sm_80), 256 otherwise
    bdv = min(_pow2(DV), MAX_V if q.element_size() < 4 else MAX_V // 2)
    meta = _attn_meta(DQK, bdv, "fwd", q.element_size())
    m, smb, smn, has_mask = _mask_arg(key_mask, q)
    grid = (triton.cdiv(N, meta["BLOCK_M"]), B, triton.cdiv(DV, bdv))
    with _device_ctx(q):
        _attn_fwd_kernel[grid](
            q, k, v, m, out, lse, N, DQK, DV, float(scale) * _LOG2E,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), smb, smn,
            HAS_MASK=has_mask, BLOCK_DQK=_pow2(DQK), BLOCK_DV=bdv, PRECISION=_precision(q), **meta)
    return out, lse


def attention_backward(grad_out, q, k, v, key_mask, out, lse, scale: float):
    """(dq, dk, dv) in the inputs' dtypes."""
    B, N, DQK = q.shape
    DV = v.shape[2]
    if DV > MAX_V:
        raise ValueError(f"the triton backend's pixel_attention backward takes Dv <= {MAX_V}, got {DV}")
    q = q.contiguous()
    grad_out = grad_out.to(q.dtype).contiguous()
    dq = new_output((B, N, DQK), dtype=q.dtype, device=q.device)
    dk = new_output((B, N, DQK), dtype=q.dtype, device=q.device)
    dv = new_output((B, N, DV), dtype=v.dtype, device=q.device)
    if B == 0 or N == 0:
        return dq, dk, dv
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()
    lse = lse.contiguous()
    m, smb, smn, has_mask = _mask_arg(key_mask, q)
    bdqk, bdv = _pow2(DQK), _pow2(DV)
    common = dict(HAS_MASK=has_mask, BLOCK_DQK=bdqk, BLOCK_DV=bdv, PRECISION=_precision(q))
    args = (N, DQK, DV, float(scale), float(scale) * _LOG2E,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), smb, smn)
    with _device_ctx(q):
        meta = _attn_meta(DQK, bdv, "dkdv", q.element_size())
        _attn_bwd_dkdv_kernel[(triton.cdiv(N, meta["BLOCK_N"]), B)](
            q, k, v, m, grad_out, lse, delta, dk, dv, *args, **common, **meta)
        meta = _attn_meta(DQK, bdv, "dq", q.element_size())
        _attn_bwd_dq_kernel[(triton.cdiv(N, meta["BLOCK_M"]), B)](
            q, k, v, m, grad_out, lse, delta, dq, *args, **common, **meta)
    return dq, dk, dv


# ----------------------------------------------------------------------------- attention transfer

@triton.jit
def _ds_rows(ps, pt, c, gd, L1: tl.constexpr):
    """gd_i r_s (g - c_i) for a (rows, keys) tile; c, gd are per-row vectors broadcast by the caller."""
    diff = ps - pt
    if L1:
        g = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
    else:
        g = 2.0 * diff
    return gd * ps * (g - c)


@triton.jit
def _transfer_fwd_kernel(QS, KS, QT, KT, DIST, LSE_S, LSE_T, CROW, N, DS, DT, scale_log2,
                         sqsb, sqsn, sqsd, sksb, sksn, sksd, sqtb, sqtn, sqtd, sktb, sktn, sktd,
                         L1: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_s = tl.arange(0, BLOCK_DS)
    offs_t = tl.arange(0, BLOCK_DT)
    row_ok = offs_m < N
    qs = tl.load(QS + b * sqsb + offs_m[:, None].to(tl.int64) * sqsn + offs_s[None, :] * sqsd,
                 mask=row_ok[:, None] & (offs_s[None, :] < DS), other=0.0)
    qt = tl.load(QT + b * sqtb + offs_m[:, None].to(tl.int64) * sqtn + offs_t[None, :] * sqtd,
                 mask=row_ok[:, None] & (offs_t[None, :] < DT), other=0.0)
    m_s = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_s = tl.zeros((BLOCK_M,), tl.float32)
    m_t = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_t = tl.zeros((BLOCK_M,), tl.float32)
    # pass 1: both rows' log-sum-exps (base 2)
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        key_ok = offs_n < N
        kst = tl.load(KS + b * sksb + offs_n[None, :].to(tl.int64) * sksn + offs_s[:, None] * sksd,
                      mask=key_ok[None, :] & (offs_s[:, None] < DS), other=0.0)
        ktt = tl.load(KT + b * sktb + offs_n[None, :].to(tl.int64) * sktn + offs_t[:, None] * sktd,
                      mask=key_ok[None, :] & (offs_t[:, None] < DT), other=0.0)
        ss = tl.where(key_ok[None, :], tl.dot(qs, kst, input_precision=PRECISION) * scale_log2, float("-inf"))
        st = tl.where(key_ok[None, :], tl.dot(qt, ktt, input_precision=PRECISION) * scale_log2, float("-inf"))
        mn = tl.maximum(m_s, tl.max(ss, 1))
        l_s = l_s * tl.exp2(m_s - mn) + tl.sum(tl.exp2(ss - mn[:, None]), 1)
        m_s = mn
        mn = tl.maximum(m_t, tl.max(st, 1))
        l_t = l_t * tl.exp2(m_t - mn) + tl.sum(tl.exp2(st - mn[:, None]), 1)
        m_t = mn
    lse_s = m_s + tl.log2(l_s)
    lse_t = m_t + tl.log2(l_t)
    # pass 2: the distance and c = sum_j r_s g
    dist = tl.zeros((BLOCK_M,), tl.float32)
    crow = tl.zeros((BLOCK_M,), tl.float32)
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        key_ok = offs_n < N
        kst = tl.load(KS + b * sksb + offs_n[None, :].to(tl.int64) * sksn + offs_s[:, None] * sksd,
                      mask=key_ok[None, :] & (offs_s[:, None] < DS), other=0.0)
        ktt = tl.load(KT + b * sktb + offs_n[None, :].to(tl.int64) * sktn + offs_t[:, None] * sktd,
                      mask=key_ok[None, :] & (offs_t[:, None] < DT), other=0.0)
        ps = tl.exp2(tl.dot(qs, kst, input_precision=PRECISION) * scale_log2 - lse_s[:, None])
        pt = tl.exp2(tl.dot(qt, ktt, input_precision=PRECISION) * scale_log2 - lse_t[:, None])
        ps = tl.where(key_ok[None, :], ps, 0.0)
        pt = tl.where(key_ok[None, :], pt, 0.0)
        diff = ps - pt
        if L1:
            dist += tl.sum(tl.abs(diff), 1)
            crow += tl.sum(tl.where(diff > 0, ps, tl.where(diff < 0, -ps, 0.0)), 1)
        else:
            dist += tl.sum(diff * diff, 1)
            crow += tl.sum(2.0 * ps * diff, 1)
    tl.store(DIST + b * N + offs_m, dist, mask=row_ok)
    tl.store(LSE_S + b * N + offs_m, lse_s * 0.6931471805599453, mask=row_ok)
    tl.store(LSE_T + b * N + offs_m, lse_t * 0.6931471805599453, mask=row_ok)
    tl.store(CROW + b * N + offs_m, crow, mask=row_ok)


@triton.jit
def _transfer_bwd_dq_kernel(QS, KS, QT, KT, LSE_S, LSE_T, CROW, GD, DQ, N, DS, DT, scale, scale_log2,
                            sqsb, sqsn, sqsd, sksb, sksn, sksd, sqtb, sqtn, sqtd, sktb, sktn, sktd,
                            sdb, sdn, sdd,
                            L1: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_s = tl.arange(0, BLOCK_DS)
    offs_t = tl.arange(0, BLOCK_DT)
    row_ok = offs_m < N
    qs = tl.load(QS + b * sqsb + offs_m[:, None].to(tl.int64) * sqsn + offs_s[None, :] * sqsd,
                 mask=row_ok[:, None] & (offs_s[None, :] < DS), other=0.0)
    qt = tl.load(QT + b * sqtb + offs_m[:, None].to(tl.int64) * sqtn + offs_t[None, :] * sqtd,
                 mask=row_ok[:, None] & (offs_t[None, :] < DT), other=0.0)
    lse_s = tl.load(LSE_S + b * N + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    lse_t = tl.load(LSE_T + b * N + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    crow = tl.load(CROW + b * N + offs_m, mask=row_ok, other=0.0)
    gd = tl.load(GD + b * N + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_DS), tl.float32)
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        key_ok = offs_n < N
        kst = tl.load(KS + b * sksb + offs_n[None, :].to(tl.int64) * sksn + offs_s[:, None] * sksd,
                      mask=key_ok[None, :] & (offs_s[:, None] < DS), other=0.0)
        ktt = tl.load(KT + b * sktb + offs_n[None, :].to(tl.int64) * sktn + offs_t[:, None] * sktd,
                      mask=key_ok[None, :] & (offs_t[:, None] < DT), other=0.0)
        ps = tl.exp2(tl.dot(qs, kst, input_precision=PRECISION) * scale_log2 - lse_s[:, None])
        pt = tl.exp2(tl.dot(qt, ktt, input_precision=PRECISION) * scale_log2 - lse_t[:, None])
        ps = tl.where(key_ok[None, :], ps, 0.0)
        pt = tl.where(key_ok[None, :], pt, 0.0)
        ds = _ds_rows(ps, pt, crow[:, None], gd[:, None], L1)
        dq += tl.dot(ds.to(kst.dtype), tl.trans(kst), input_precision=PRECISION)
    dq = dq * scale
    tl.store(DQ + b * sdb + offs_m[:, None].to(tl.int64) * sdn + offs_s[None, :] * sdd,
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_s[None, :] < DS))


@triton.jit
def _transfer_bwd_dk_kernel(QS, KS, QT, KT, LSE_S, LSE_T, CROW, GD, DK, N, DS, DT, scale, scale_log2,
                            sqsb, sqsn, sqsd, sksb, sksn, sksd, sqtb, sqtn, sqtd, sktb, sktn, sktd,
                            sdb, sdn, sdd,
                            L1: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr, PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_s = tl.arange(0, BLOCK_DS)
    offs_t = tl.arange(0, BLOCK_DT)
    key_ok = offs_n < N
    ks = tl.load(KS + b * sksb + offs_n[:, None].to(tl.int64) * sksn + offs_s[None, :] * sksd,
                 mask=key_ok[:, None] & (offs_s[None, :] < DS), other=0.0)
    kt = tl.load(KT + b * sktb + offs_n[:, None].to(tl.int64) * sktn + offs_t[None, :] * sktd,
                 mask=key_ok[:, None] & (offs_t[None, :] < DT), other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_DS), tl.float32)
    for start in range(0, N, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N
        qst = tl.load(QS + b * sqsb + offs_m[None, :].to(tl.int64) * sqsn + offs_s[:, None] * sqsd,
                      mask=row_ok[None, :] & (offs_s[:, None] < DS), other=0.0)
        qtt = tl.load(QT + b * sqtb + offs_m[None, :].to(tl.int64) * sqtn + offs_t[:, None] * sqtd,
                      mask=row_ok[None, :] & (offs_t[:, None] < DT), other=0.0)
        lse_s = tl.load(LSE_S + b * N + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
        lse_t = tl.load(LSE_T + b * N + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
        crow = tl.load(CROW + b * N + offs_m, mask=row_ok, other=0.0)
        gd = tl.load(GD + b * N + offs_m, mask=row_ok, other=0.0)
        pst = tl.exp2(tl.dot(ks, qst, input_precision=PRECISION) * scale_log2 - lse_s[None, :])
        ptt = tl.exp2(tl.dot(kt, qtt, input_precision=PRECISION) * scale_log2 - lse_t[None, :])
        pst = tl.where(key_ok[:, None], pst, 0.0)
        ptt = tl.where(key_ok[:, None], ptt, 0.0)
        dst = _ds_rows(pst, ptt, crow[None, :], gd[None, :], L1)
        dk += tl.dot(dst.to(qst.dtype), tl.trans(qst), input_precision=PRECISION)
    dk = dk * scale
    tl.store(DK + b * sdb + offs_n[:, None].to(tl.int64) * sdn + offs_s[None, :] * sdd,
             dk.to(DK.dtype.element_ty), mask=key_ok[:, None] & (offs_s[None, :] < DS))


def _transfer_meta(esize: int) -> dict:
    """float32 operands (``esize`` 4) take twice the registers: 8 warps (no spill on sm_80)."""
    if _INTERPRET:
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4)
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8 if esize >= 4 else 4, num_stages=2)


def transfer_forward(q_s, k_s, q_t, k_t, scale: float, distance: int):
    """(dist, lse_s, lse_t, c), each (B, N) float32."""
    B, N, DS = q_s.shape
    DT = q_t.shape[2]
    outs = [new_output((B, N), dtype=torch.float32, device=q_s.device) for _ in range(4)]
    if B == 0 or N == 0:
        return tuple(outs)
    meta = _transfer_meta(q_s.element_size())
    with _device_ctx(q_s):
        _transfer_fwd_kernel[(triton.cdiv(N, meta["BLOCK_M"]), B)](
            q_s, k_s, q_t, k_t, *outs, N, DS, DT, float(scale) * _LOG2E,
            *q_s.stride(), *k_s.stride(), *q_t.stride(), *k_t.stride(),
            L1=bool(distance == 1), BLOCK_DS=_pow2(DS), BLOCK_DT=_pow2(DT), PRECISION=_precision(q_s), **meta)
    return tuple(outs)


def transfer_backward(grad_dist, q_s, k_s, q_t, k_t, lse_s, lse_t, crow, scale: float, distance: int):
    """(dq_s, dk_s) in the student's dtype."""
    B, N, DS = q_s.shape
    DT = q_t.shape[2]
    dq = new_output((B, N, DS), dtype=q_s.dtype, device=q_s.device)
    dk = new_output((B, N, DS), dtype=k_s.dtype, device=q_s.device)
    if B == 0 or N == 0:
        return dq, dk
    gd = grad_dist.float().contiguous()
    lse_s, lse_t, crow = lse_s.contiguous(), lse_t.contiguous(), crow.contiguous()
    meta = _transfer_meta(q_s.element_size())
    args = (N, DS, DT, float(scale), float(scale) * _LOG2E,
            *q_s.stride(), *k_s.stride(), *q_t.stride(), *k_t.stride(), *dq.stride())
    common = dict(L1=bool(distance == 1), BLOCK_DS=_pow2(DS), BLOCK_DT=_pow2(DT), PRECISION=_precision(q_s))
    with _device_ctx(q_s):
        _transfer_bwd_dq_kernel[(triton.cdiv(N, meta["BLOCK_M"]), B)](
            q_s, k_s, q_t, k_t, lse_s, lse_t, crow, gd, dq, *args, **common, **meta)
        _transfer_bwd_dk_kernel[(triton.cdiv(N, meta["BLOCK_N"]), B)](
            q_s, k_s, q_t, k_t, lse_s, lse_t, crow, gd, dk, *args, **common, **meta)
    return dq, dk
