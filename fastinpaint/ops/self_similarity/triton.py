"""Triton kernels of the self-similarity maps and the fused spatially-correlative distance.

Plain launchers (no autograd, no registration; op.py wraps them):

* ``maps_forward(g, index, patch_size, window, squash)``: g (B, H, W, C) contiguous -> (B, Q, N).
  One program per (query row, block of window entries): the window's keys gathered as a
  (BLOCK_N, BLOCK_C) tile per channel block, reduced against the query vector.
* ``maps_backward(grad, g, index, patch_size, window)``: dg (B, H, W, C), in two parts; the
  kernels use no atomics (each program owns what it writes); the queries' part is added by
  torch's ``index_add_``, which on CUDA uses atomics: the sum is order-independent when the
  query positions are distinct (as ``sample_query_index`` draws them), not when they repeat:
    - keys: one program per (batch, block of positions, block of channels) loops over the
      queries; the weight of (position p, query q) is grad[q, entry of p in q's window]
      (0 when p is outside it), and the block accumulates weights @ g[queries] with tl.dot.
    - queries: one program per query row computes sum_j grad[q, j] g[key j]; added to the
      query positions with ``index_add_``.
* ``distance_forward(g_src, g_tgt, index, patch_size, window, squash, mode)``: one program
  per query row holds both maps' rows (N <= 4096 entries) in registers, finds the target
  row's top-quarter threshold by a 33-step bisection over the float's order-preserving
  integer key, and writes the row's l1 sum or 1 - cosine plus 4 statistics. The maps are
  never written.
* ``distance_backward(...)``: the rows recomputed, the per-entry coefficients written to
  two (B, Q, N) float32 buffers, then the maps' backward for each image.

All accumulation in float32 (tl.dot with input_precision="ieee").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._debug import new_output
from .._common import device_ctx as _device_ctx
from .reference import DENSE_ZERO

__all__ = ["maps_forward", "maps_backward", "distance_forward", "distance_backward", "MAX_FUSED_ENTRIES"]

MAX_FUSED_ENTRIES = 4096


def _geometry(H: int, W: int, K: int, window: int):
    """(kh, kw, whole)."""
    if window == 0 and (K >= H or K >= W):
        return H, W, True
    return K, K, False


#: the kernels on the op's hot path: none may spill registers at any config its launcher can
#: pick, on sm_90 or sm_80 (tests/test_kernel_resources.py compiles each; ops/resources.py)
HOT_KERNELS = ("_maps_fwd_kernel", "_keys_bwd_kernel", "_dense_keys_bwd_kernel", "_query_bwd_kernel", "_dist_fwd_kernel", "_dist_coef_kernel")

@triton.jit
def _tanh(x):
    # 1 - 2 / (exp(2x) + 1): saturates cleanly to +-1 (exp overflow to inf gives 1)
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _window_start(p, H, W, K, kh, kw, WHOLE: tl.constexpr, CLAMP: tl.constexpr):
    r = p // W
    c = p % W
    if WHOLE:
        r0 = r * 0
        c0 = c * 0
    else:
        r0 = r - K // 2
        c0 = c - K // 2
        if CLAMP:
            r0 = tl.minimum(tl.maximum(r0, 0), H - kh)
            c0 = tl.minimum(tl.maximum(c0, 0), W - kw)
    return r0, c0


@triton.jit
def _row(g_b, p, offs_n, H, W, C, K, kh, kw, N, WHOLE: tl.constexpr, CLAMP: tl.constexpr, SQUASH: tl.constexpr,
         BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Similarities of query position p with window entries offs_n (0 outside the map / row)."""
    r0, c0 = _window_start(p, H, W, K, kh, kw, WHOLE, CLAMP)
    rr = r0 + offs_n // kw
    cc = c0 + offs_n % kw
    valid = (offs_n < N) & (rr >= 0) & (rr < H) & (cc >= 0) & (cc < W)
    kpos = tl.where(valid, rr * W + cc, 0).to(tl.int64)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    offs_c = tl.arange(0, BLOCK_C)
    for c_lo in range(0, C, BLOCK_C):
        cmask = (c_lo + offs_c) < C
        qv = tl.load(g_b + p * C + c_lo + offs_c, mask=cmask, other=0.0).to(tl.float32)
        kv = tl.load(g_b + kpos[:, None] * C + c_lo + offs_c[None, :], mask=valid[:, None] & cmask[None, :],
                     other=0.0).to(tl.float32)
        acc += tl.sum(kv * qv[None, :], axis=1)
    if SQUASH:
        acc = _tanh(acc / 10.0)  # reference.TANH_SCALE
    return tl.where(valid, acc, 0.0)


@triton.jit
def _maps_fwd_kernel(g_ptr, idx_ptr, out_ptr, Q, H, W, C, K, kh, kw, N,
                     WHOLE: tl.constexpr, CLAMP: tl.constexpr, SQUASH: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # b * Q + q
    b = row // Q
    q = row % Q
    p = tl.load(idx_ptr + q)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    g_b = g_ptr + b * H * W * C
    v = _row(g_b, p, offs_n, H, W, C, K, kh, kw, N, WHOLE, CLAMP, SQUASH, BLOCK_N, BLOCK_C)
    tl.store(out_ptr + row * N + offs_n, v.to(out_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _keys_bwd_kernel(G_ptr, g_ptr, idx_ptr, dg_ptr, Q, H, W, C, K, kh, kw, N,
                     WHOLE: tl.constexpr, CLAMP: tl.constexpr,
                     BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr):
    """dg[b, p, c-block] = sum_q G[b, q, entry of p in q's window] * g[b, index[q], c-block]."""
    b = tl.program_id(0).to(tl.int64)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    HW = H * W
    pmask = offs_p < HW
    cmask = offs_c < C
    pr = offs_p // W
    pc = offs_p % W
    g_b = g_ptr + b * HW * C
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for q_lo in range(0, Q, BLOCK_Q):
        offs_q = q_lo + tl.arange(0, BLOCK_Q)
        qmask = offs_q < Q
        qp = tl.load(idx_ptr + offs_q, mask=qmask, other=0)
        r0, c0 = _window_start(qp, H, W, K, kh, kw, WHOLE, CLAMP)
        di = pr[:, None] - r0[None, :]
        dj = pc[:, None] - c0[None, :]
        inside = (di >= 0) & (di < kh) & (dj >= 0) & (dj < kw) & pmask[:, None] & qmask[None, :]
        j = tl.where(inside, di * kw + dj, 0)
        w = tl.load(G_ptr + (b * Q + offs_q[None, :]) * N + j, mask=inside, other=0.0)
        gq = tl.load(g_b + qp[:, None].to(tl.int64) * C + offs_c[None, :], mask=qmask[:, None] & cmask[None, :],
                     other=0.0).to(tl.float32)
        acc += tl.dot(w, gq, input_precision="ieee")
    tl.store(dg_ptr + b * HW * C + offs_p[:, None].to(tl.int64) * C + offs_c[None, :], acc,
             mask=pmask[:, None] & cmask[None, :])


@triton.jit
def _dense_keys_bwd_kernel(G_ptr, g_ptr, dg_ptr, H, W, C, K, N,
                           BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Dense form with zero padding (query q = position q): the queries whose window holds p
    are p - (i - K//2, k - K//2), entry i*K + k, so dg[p] gathers K*K of them directly."""
    b = tl.program_id(0).to(tl.int64)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    HW = H * W
    pmask = offs_p < HW
    cmask = offs_c < C
    pr = offs_p // W
    pc = offs_p % W
    g_b = g_ptr + b * HW * C
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for j in range(0, N):
        qr = pr - (j // K) + K // 2
        qc = pc - (j % K) + K // 2
        ok = pmask & (qr >= 0) & (qr < H) & (qc >= 0) & (qc < W)
        q = tl.where(ok, qr * W + qc, 0).to(tl.int64)
        w = tl.load(G_ptr + (b * HW + q) * N + j, mask=ok, other=0.0)
        gq = tl.load(g_b + q[:, None] * C + offs_c[None, :], mask=ok[:, None] & cmask[None, :],
                     other=0.0).to(tl.float32)
        acc += w[:, None] * gq
    tl.store(dg_ptr + b * HW * C + offs_p[:, None].to(tl.int64) * C + offs_c[None, :], acc,
             mask=pmask[:, None] & cmask[None, :])


@triton.jit
def _query_bwd_kernel(G_ptr, g_ptr, idx_ptr, out_ptr, Q, H, W, C, K, kh, kw, N,
                      WHOLE: tl.constexpr, CLAMP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[b, q, c-block] = sum_j G[b, q, j] * g[b, key j, c-block]."""
    row = tl.program_id(0).to(tl.int64)
    b = row // Q
    q = row % Q
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    p = tl.load(idx_ptr + q)
    r0, c0 = _window_start(p, H, W, K, kh, kw, WHOLE, CLAMP)
    g_b = g_ptr + b * H * W * C
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for n_lo in range(0, N, BLOCK_N):
        offs_n = n_lo + tl.arange(0, BLOCK_N)
        rr = r0 + offs_n // kw
        cc = c0 + offs_n % kw
        valid = (offs_n < N) & (rr >= 0) & (rr < H) & (cc >= 0) & (cc < W)
        kpos = tl.where(valid, rr * W + cc, 0).to(tl.int64)
        w = tl.load(G_ptr + row * N + offs_n, mask=valid, other=0.0)
        kv = tl.load(g_b + kpos[:, None] * C + offs_c[None, :], mask=valid[:, None] & cmask[None, :],
                     other=0.0).to(tl.float32)
        acc += tl.sum(kv * w[:, None], axis=0)
    tl.store(out_ptr + row * C + offs_c, acc, mask=cmask)


@triton.jit
def _order_key(x):
    """An int32 whose signed order is the float order of x (float32)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _threshold(t, valid, num):
    """The value at 0-based index num of the descending sort of t[valid]."""
    key = tl.where(valid, _order_key(t), -2147483648).to(tl.int64)
    lo = tl.min(key, axis=0)  # count(key >= lo) = everything: satisfies the condition
    hi = tl.max(key, axis=0) + 1  # count(key >= hi) = 0: fails it
    for _ in range(33):  # the key range is below 2^33: 33 halvings end with hi = lo + 1
        active = hi - lo > 1
        mid = (lo + hi) // 2
        cnt = tl.sum(((key >= mid) & valid).to(tl.int32), axis=0)
        ok = cnt >= num + 1
        lo = tl.where(active & ok, mid, lo)
        hi = tl.where(active & (cnt < num + 1), mid, hi)
    bits = tl.where(lo >= 0, lo, lo ^ 0x7FFFFFFF).to(tl.int32)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _dist_fwd_kernel(gs_ptr, gt_ptr, idx_ptr, rows_ptr, stats_ptr, Q, H, W, C, K, kh, kw, N, num,
                     WHOLE: tl.constexpr, CLAMP: tl.constexpr, SQUASH: tl.constexpr, MODE: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // Q
    q = row % Q
    p = tl.load(idx_ptr + q)
    offs_n = tl.arange(0, BLOCK_N)
    off_b = b * H * W * C
    s = _row(gs_ptr + off_b, p, offs_n, H, W, C, K, kh, kw, N, WHOLE, CLAMP, SQUASH, BLOCK_N, BLOCK_C)
    t = _row(gt_ptr + off_b, p, offs_n, H, W, C, K, kh, kw, N, WHOLE, CLAMP, SQUASH, BLOCK_N, BLOCK_C)
    in_row = offs_n < N
    thr = _threshold(t, in_row, num)
    keep = in_row & (t >= thr)
    sk = tl.where(keep, s, 0.0)
    tk = tl.where(keep, t, 0.0)
    st = tl.sum(sk * tk, axis=0)
    ss = tl.sum(sk * sk, axis=0)
    tt = tl.sum(tk * tk, axis=0)
    if MODE == 0:
        val = tl.sum(tl.abs(sk - tk), axis=0)
    else:
        ns = tl.maximum(tl.sqrt(ss), 1e-8)
        nt = tl.maximum(tl.sqrt(tt), 1e-8)
        val = 1.0 - st / (ns * nt)
    tl.store(rows_ptr + row, val)
    tl.store(stats_ptr + row * 4 + 0, thr)
    tl.store(stats_ptr + row * 4 + 1, st)
    tl.store(stats_ptr + row * 4 + 2, ss)
    tl.store(stats_ptr + row * 4 + 3, tt)


@triton.jit
def _dist_coef_kernel(gs_ptr, gt_ptr, idx_ptr, grad_ptr, stats_ptr, GS_ptr, GT_ptr, Q, H, W, C, K, kh, kw, N,
                      WHOLE: tl.constexpr, CLAMP: tl.constexpr, SQUASH: tl.constexpr, MODE: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // Q
    q = row % Q
    p = tl.load(idx_ptr + q)
    offs_n = tl.arange(0, BLOCK_N)
    off_b = b * H * W * C
    s = _row(gs_ptr + off_b, p, offs_n, H, W, C, K, kh, kw, N, WHOLE, CLAMP, SQUASH, BLOCK_N, BLOCK_C)
    t = _row(gt_ptr + off_b, p, offs_n, H, W, C, K, kh, kw, N, WHOLE, CLAMP, SQUASH, BLOCK_N, BLOCK_C)
    in_row = offs_n < N
    thr = tl.load(stats_ptr + row * 4 + 0)
    gr = tl.load(grad_ptr + row)
    keep = in_row & (t >= thr)
    if MODE == 0:
        d = s - t
        ds = tl.where(d > 0, gr, tl.where(d < 0, -gr, 0.0))
        dt = -ds
    else:
        st = tl.load(stats_ptr + row * 4 + 1)
        ns_raw = tl.sqrt(tl.load(stats_ptr + row * 4 + 2))
        nt_raw = tl.sqrt(tl.load(stats_ptr + row * 4 + 3))
        ns = tl.maximum(ns_raw, 1e-8)
        nt = tl.maximum(nt_raw, 1e-8)
        cosv = st / (ns * nt)
        a = -gr / (ns * nt)
        bs = tl.where(ns_raw > 1e-8, gr * cosv / (ns * ns), 0.0)
        bt = tl.where(nt_raw > 1e-8, gr * cosv / (nt * nt), 0.0)
        ds = a * t + bs * s
        dt = a * s + bt * t
    if SQUASH:
        ds = ds * (1.0 - s * s) / 10.0
        dt = dt * (1.0 - t * t) / 10.0
    ds = tl.where(keep, ds, 0.0)
    dt = tl.where(keep, dt, 0.0)
    tl.store(GS_ptr + row * N + offs_n, ds, mask=in_row)
    tl.store(GT_ptr + row * N + offs_n, dt, mask=in_row)


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------

def _consts(g, index, patch_size, window):
    B, H, W, C = g.shape
    kh, kw, whole = _geometry(H, W, patch_size, window)
    return B, H, W, C, index.shape[0], kh, kw, whole


def _block_c(C: int, cap: int = 32) -> int:
    return max(2, min(cap, triton.next_power_of_2(C)))


def maps_forward(g, index, patch_size, window, squash):
    B, H, W, C, Q, kh, kw, whole = _consts(g, index, patch_size, window)
    N = kh * kw
    out = new_output((B, Q, N), dtype=g.dtype, device=g.device)
    if out.numel() == 0:
        return out
    BLOCK_N = min(128, triton.next_power_of_2(N))
    BLOCK_C = _block_c(C)
    with _device_ctx(g):
        _maps_fwd_kernel[(B * Q, triton.cdiv(N, BLOCK_N))](
            g, index, out, Q, H, W, C, patch_size, kh, kw, N, WHOLE=whole, CLAMP=window == 0, SQUASH=bool(squash),
            BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C, num_warps=4)
    return out


def _scatter_backward(G, g, index, patch_size, window):
    """dg (B, H, W, C) in g's dtype from float32 coefficients G (B, Q, N)."""
    B, H, W, C, Q, kh, kw, whole = _consts(g, index, patch_size, window)
    N = kh * kw
    G = G.float().contiguous()
    dg32 = new_output((B, H, W, C), dtype=torch.float32, device=g.device)
    vq = new_output((B, Q, C), dtype=torch.float32, device=g.device)
    BLOCK_P, BLOCK_Q = 32, 32
    BLOCK_C = max(16, min(64, triton.next_power_of_2(C)))
    with _device_ctx(g):
        if window == DENSE_ZERO:
            _dense_keys_bwd_kernel[(B, triton.cdiv(H * W, BLOCK_P), triton.cdiv(C, BLOCK_C))](
                G, g, dg32, H, W, C, patch_size, N, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, num_warps=4)
        else:
            _keys_bwd_kernel[(B, triton.cdiv(H * W, BLOCK_P), triton.cdiv(C, BLOCK_C))](
                G, g, index, dg32, Q, H, W, C, patch_size, kh, kw, N, WHOLE=whole, CLAMP=window == 0,
                BLOCK_P=BLOCK_P, BLOCK_Q=BLOCK_Q, BLOCK_C=BLOCK_C, num_warps=4)
        _query_bwd_kernel[(B * Q, triton.cdiv(C, BLOCK_C))](
            G, g, index, vq, Q, H, W, C, patch_size, kh, kw, N, WHOLE=whole, CLAMP=window == 0,
            BLOCK_N=min(64, triton.next_power_of_2(N)), BLOCK_C=BLOCK_C, num_warps=4)
    dg32.view(B, H * W, C).index_add_(1, index, vq)
    return dg32.to(g.dtype)


def maps_backward(grad, g, index, patch_size, window):
    if g.numel() == 0:
        return torch.zeros_like(g)
    return _scatter_backward(grad, g, index, patch_size, window)


def _fused_blocks(N: int, C: int):
    if N > MAX_FUSED_ENTRIES:
        raise ValueError(f"the triton fused distance holds a map row in registers: at most {MAX_FUSED_ENTRIES} "
                         f"entries, got {N} (patch_size or the map is too large); use the cpu/cuda or "
                         "reference backend")
    BLOCK_N = max(16, triton.next_power_of_2(N))
    BLOCK_C = _block_c(C, cap=max(2, min(32, 16384 // BLOCK_N)))
    return BLOCK_N, BLOCK_C, (4 if BLOCK_N <= 512 else 8)


def distance_forward(g_src, g_tgt, index, patch_size, window, squash, mode):
    B, H, W, C, Q, kh, kw, whole = _consts(g_src, index, patch_size, window)
    N = kh * kw
    rows = new_output((B, Q), dtype=torch.float32, device=g_src.device)
    stats = new_output((B, Q, 4), dtype=torch.float32, device=g_src.device)
    if rows.numel() == 0:
        return rows, stats
    BLOCK_N, BLOCK_C, warps = _fused_blocks(N, C)
    with _device_ctx(g_src):
        _dist_fwd_kernel[(B * Q,)](
            g_src, g_tgt, index, rows, stats, Q, H, W, C, patch_size, kh, kw, N, N // 4, WHOLE=whole,
            CLAMP=window == 0, SQUASH=bool(squash), MODE=int(mode), BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C,
            num_warps=warps)
    return rows, stats


def distance_backward(grad_rows, g_src, g_tgt, index, stats, patch_size, window, squash, mode):
    B, H, W, C, Q, kh, kw, whole = _consts(g_src, index, patch_size, window)
    N = kh * kw
    if g_src.numel() == 0:
        return torch.zeros_like(g_src), torch.zeros_like(g_tgt)
    BLOCK_N, BLOCK_C, warps = _fused_blocks(N, C)
    GS = torch.empty((B, Q, N), dtype=torch.float32, device=g_src.device)
    GT = torch.empty((B, Q, N), dtype=torch.float32, device=g_src.device)
    with _device_ctx(g_src):
        _dist_coef_kernel[(B * Q,)](
            g_src, g_tgt, index, grad_rows.float().contiguous(), stats.float().contiguous(), GS, GT, Q, H, W, C,
            patch_size, kh, kw, N, WHOLE=whole, CLAMP=window == 0, SQUASH=bool(squash), MODE=int(mode),
            BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C, num_warps=warps)
    return (_scatter_backward(GS, g_src, index, patch_size, window),
            _scatter_backward(GT, g_tgt, index, patch_size, window))
