"""Contextual attention (Yu et al., CVPR 2018), as DeepFill v2's refinement network uses it,
written as batched matrix multiplications with per-sample masks.

Given features ``x`` of shape (B, C, H, W) (DeepFill: the attention branch at 1/4 of the
image resolution; foreground = background = ``x``) and a hole mask (1 = hole):

1. Matching happens at ``1/rate`` of the feature resolution (nearest downscale: every
   ``rate``-th pixel), on ``Hs x Ws = H/rate x W/rate`` positions.
2. Keys: the ``ksize x ksize`` background patches around every matching position (zero
   padded), each divided by ``max(||patch||_2, 1e-4)``; one key row of ``C*ksize^2`` per
   position. Queries: the unnormalised foreground patches at the same positions. The cosine
   score map is one batched matmul ``S[b] = K[b]^T Q[b]`` of shape (B, L, L), L = Hs*Ws
   (key index first), i.e. the published "patches as convolution filters" step.
3. Fuse (``fuse=True``): ``S`` is treated as an (L x L) image and convolved with the
   ``fuse_k x fuse_k`` identity kernel (summing scores along diagonals: neighbouring query
   positions matched to equally-shifted key positions), once in row-major and once in
   column-major order of the positions (transpose, convolve, transpose back), exactly as in
   the public code: flattening wraps across rows, as there.
4. Validity: a key is valid when its ``ksize x ksize`` window of the mask (nearest
   downscaled to ``Hs x Ws``, zero padded) is all zero. Computed **per sample** (the public
   code takes sample 0's mask for the whole batch).
   ``masking="official"`` (default; what converted weights expect): ``A = softmax(scale *
   S * valid) * valid`` over the keys, so invalid keys enter the denominator with logit 0
   and valid weights do not sum to 1. ``masking="exclude"``: invalid keys get a logit of
   -inf (true exclusion, valid weights sum to 1; a sample with no valid key gets zeros).
   On the CPU, weights below the smallest normal float are set to 0, and so are the
   subnormal entries of the scores' gradient (subnormal operands slow the CPU's matrix
   products about 14x; their share of the output is below rounding).
5. Reconstruction: every key also owns the raw ``2*rate x 2*rate`` patch of ``x`` at full
   feature resolution (stride ``rate``, padding ``rate - 1``); the output is
   ``fold(P[b] @ A[b]) / 4``: the transposed convolution of the attention map with the raw
   patches, each output pixel covered by 4 pasted patches.

Memory: the score map S, its two fused copies and the softmax are (B, L, L) each
(L = H*W/rate^2; 5440^2 floats = 118 MB per copy per sample at a 512x680 image); autograd
saves the unfolded queries (9x the downscaled features), the keys and raw patches
(16x/4 = 4x the features), and those maps. Any dtype torch's matmul takes; the softmax runs
in float32 (float64 for float64 input). Layout: any; the output is channels_last when ``x`` is, else NCHW.

Limits: ``H`` and ``W`` must be multiples of ``rate`` (DeepFill: image sides multiples of 8).

Blocked form (:func:`contextual_attention_blocked`, what :class:`ContextualAttention` and
DeepFill v2 run): the same function, computed for tiles of queries against all keys, so no
(L x L) tensor exists.

* Fuse, folded. Write ``s_ij = k_i . q_j`` (``k`` normalised keys, ``q`` queries, row-major
  positions). The first diagonal sum is ``sum_d s[i+d, j+d]``, a term counted only when both
  ``i+d`` and ``j+d`` lie in ``[0, L)``; the second is the same in column-major order, whose
  shift by ``e`` moves a position one row down (``e = 1``) and, from the last row, to the
  first row of the next column. So the fused score is ``sum_{e,d} s[t(i), t(j)]`` with
  ``t = t_ed`` the column-major shift by ``e`` followed by the row-major shift by ``d``, a term
  dropped when either ``t(i)`` or ``t(j)`` leaves the map: a sum of products of shifted key
  and query features, the borders and the wrapping included, i.e. the published operation
  exactly. It is computed from the raw scores ``T = Q_N^T K`` (queries x keys) of a tile's
  queries ``J`` and their shifted positions ``N = {t_ed(j)}`` (the tile and a ring of
  ``fuse_k//2``, plus the positions the wrapping reaches at the map's edges), a shift that
  leaves the map adding nothing: ``S[J, i] = sum_ed T[pos(t_ed(J)), t_ed(i)]``. Per shift,
  the rows ``pos(t_ed(J))`` are slices of ``T``, not gathered copies (a run of consecutive rows
  per tile row, broken where the shift wraps at the map's edges), and
  ``t_ed`` on the keys is the slice ``i + e*Ws + d`` for every key whose column-major shift
  stays in its column (the row-major shift wraps across rows by itself in the flat index);
  the ``|e| * Ws`` others are added by index. Stacking the
  nine shifted copies as features instead would hold ``81 * C`` values per position.
* Masking and the scaled softmax run on the tile's (|J| x L) scores as in the reference:
  every key is in the tile, so no online softmax is needed.
* Without gradients (CPU, float32/float64) the fused, masked and scaled scores come from a
  C++ kernel (``fastinpaint.ops._contextual_scores``): each row of the tile built in one
  pass from its nine source rows of ``T`` while they are in cache, where the loop above
  makes a pass over the tile per shift and more for the masking. The module then runs the
  blocked form for maps of one tile too (faster than the reference without gradients).
* Reconstruction: the tile's columns ``P @ A[J]^T`` are folded (an overlap-add of the
  ``2*rate`` patches, stride ``rate``) into the output rows and columns the tile covers
  (``rate * |tile| + rate`` each way, minus the ``rate - 1`` of padding), and added. ``P``
  holds the raw patches of the keys valid in some sample only: the others have weight 0
  after the masking in every sample, so they are left out of the product (with a hole over
  a third of the image, about a third of its cost).
* Memory arithmetic. Held for the whole call: the normalised keys ``K`` (``9C x L``), the raw
  patches (at most ``16C x L``, ``rate = 2``) and the zero-padded downscaled features; per
  tile, at most ``B * L * (el * (|N| + 3|J|) + 2 * acc * |J|)`` bytes (``el`` the input's
  element size, ``acc`` the softmax's): ``T``, the fused sum, the masked logits and the
  softmax's maps (without gradients, in float32 and float64, the masking and the softmax's
  output scaling run in place, so less). Query tiles with all keys, not an online softmax over key
  tiles: the tile's memory grows with L, but the ``(9 + 16) C x L`` features the call needs
  anyway grow the same way, so by default a tile may use half of them, and at least
  512 MiB (``block_bytes`` sets it). For DeepFill (C = 96, float32) that is a tile of
  about 36 x 36 queries at a 1024x1024 image, 18 x 18 at 2048 and 13 x 13 at 4096 and
  above, whose ring makes the score products 1.1-1.3x the reference's; a key-tiled online
  softmax would also need a running maximum, sum and rescaled output per query, and the
  official masking's logit-0 keys in every key tile. Square tiles (full rows on narrow
  maps) keep the ring small. One tile holding the whole map is the reference's computation.
* Backward: with several tiles and gradients on, each tile runs under
  ``torch.utils.checkpoint`` (non-reentrant): its maps are recomputed in backward, one tile
  at a time, so training memory is bounded the same way (at the cost of a second forward of
  the attention). Plain PyTorch ops: any device, any dtype the reference takes.
* Why not the pixel-attention kernels (``fastinpaint.functional.pixel_attention``): folded
  into features, the fused score is ``q'_j . k'_i`` with ``9 * C * ksize^2`` values per
  position (7776 for DeepFill's C = 96), far above the Triton kernels' ``Dqk <= 128``, and
  the kernels take q and k whole: 81x the downscaled features, 16 GB at a 4096x4096 image.
  (The official masking would fit them: zero key features and values for the invalid keys
  give them logit 0 in the denominator and no share of the output.)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..ops import _contextual_scores as _scores_op
from ..ops._layout import is_channels_last

__all__ = ["ContextualAttention", "DEFAULT_BLOCK_BYTES", "blocked_memory", "contextual_attention",
           "contextual_attention_blocked", "key_validity", "reference_memory"]

#: the least memory the blocked form lets one tile of queries use (see the module doc)
DEFAULT_BLOCK_BYTES = 512 * 2**20

_MASKINGS = ("official", "exclude")


def _check(x, mask, ksize, rate, fuse_k, masking):
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a (B, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got {x.dtype}")
    for name, v in (("ksize", ksize), ("fuse_k", fuse_k)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1 or v % 2 == 0:
            raise ValueError(f"{name} must be a positive odd int, got {v!r}")
    if isinstance(rate, bool) or not isinstance(rate, int) or rate < 2:
        raise ValueError(f"rate must be an int >= 2, got {rate!r}")
    h, w = x.shape[-2:]
    if h % rate or w % rate:
        raise ValueError(f"x's height and width must be multiples of rate={rate}, got {h}x{w}")
    if masking not in _MASKINGS:
        raise ValueError(f"masking must be one of {_MASKINGS}, got {masking!r}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[1] != 1:
            raise ValueError(f"mask must be (B, 1, Hm, Wm), got {getattr(mask, 'shape', type(mask).__name__)}")
        if mask.shape[0] != x.shape[0]:
            raise ValueError(f"mask has batch {mask.shape[0]}, x has {x.shape[0]}: masks are per sample")
        hm, wm = mask.shape[-2:]
        if hm % (h // rate) or wm % (w // rate):
            raise ValueError(f"mask size {hm}x{wm} must be a multiple of the matching resolution "
                             f"{h // rate}x{w // rate}")


def key_validity(mask: torch.Tensor | None, size_hw, ksize: int = 3, batch: int = 1,
                 device=None) -> torch.Tensor:
    """(B, L) bool: key patch valid (its ``ksize`` window of the downscaled mask is all 0)."""
    hs, ws = size_hw
    if mask is None:
        return torch.ones(batch, hs * ws, dtype=torch.bool, device=device)
    # nearest downscale by an integer factor: every f-th pixel
    m = (F.interpolate(mask.detach().float(), size=(hs, ws), mode="nearest") != 0).to(torch.float32)
    hole_near = F.max_pool2d(m, ksize, stride=1, padding=ksize // 2) if ksize > 1 else m
    return (hole_near == 0).flatten(1)


def _flush_subnormal(attn: torch.Tensor) -> torch.Tensor:
    """On the CPU, attention weights below the smallest normal number set to 0, in place
    (``attn`` is the fresh product of the softmax and the validity; threshold's backward
    reads its result, which is positive exactly where its input was). The scaled softmax of
    unnormalised queries is peaked: most weights underflow to 0 and a fraction of a percent
    land among the subnormal numbers, which the CPU's matrix products handle through
    microcode, about 14x slower (measured: the (C*16 x L) @ (L x L) product of a 256x256
    DeepFill v2 image on random features, 155 ms with them, 11 ms without). Their share of
    the reconstruction is below float rounding (each < 1.2e-38 of a weight sum of at most
    1). GPUs handle subnormals at full speed: left as they are there."""
    if not attn.is_cpu:
        return attn
    return F.threshold_(attn, torch.finfo(attn.dtype).tiny, 0.0)


class _FlushSubnormalGrad(torch.autograd.Function):
    """Identity forward; backward sets the gradient's subnormal entries to 0 (CPU). The
    softmax's backward multiplies by the weights, so the scores' gradient inherits their
    subnormals, and the two matrix products of the scores' backward read it."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return torch.where(g.abs() < torch.finfo(g.dtype).tiny, 0.0, g)


def _flush_subnormal_grad(scores: torch.Tensor) -> torch.Tensor:
    """``scores`` with :class:`_FlushSubnormalGrad` on its gradient, where it has one, on the CPU."""
    return _FlushSubnormalGrad.apply(scores) if scores.requires_grad and scores.is_cpu else scores


def _diag_sum(s: torch.Tensor, fuse_k: int) -> torch.Tensor:
    """``out[b, i, j] = sum_{|d| <= fuse_k//2} s[b, i+d, j+d]`` (zero outside): the
    convolution with the identity kernel, as shifted adds (a 1-channel convolution over an
    L x L map is far slower in the convolution libraries)."""
    r = fuse_k // 2
    l1, l2 = s.shape[-2:]
    p = F.pad(s, (r, r, r, r))
    out = p[:, r:r + l1, r:r + l2].clone()
    for d in range(-r, r + 1):
        if d:
            out += p[:, r + d:r + d + l1, r + d:r + d + l2]
    return out


def _fuse(s: torch.Tensor, hs: int, ws: int, fuse_k: int) -> torch.Tensor:
    """The identity-kernel convolution of the (L x L) score map, row-major then column-major."""
    b, l, _ = s.shape
    s = _diag_sum(s, fuse_k)
    s = s.view(b, hs, ws, hs, ws).permute(0, 2, 1, 4, 3).reshape(b, l, l)
    s = _diag_sum(s, fuse_k)
    return s.view(b, ws, hs, ws, hs).permute(0, 2, 1, 4, 3).reshape(b, l, l)


def contextual_attention(x: torch.Tensor, mask: torch.Tensor | None = None, *, ksize: int = 3, rate: int = 2,
                         fuse_k: int = 3, softmax_scale: float = 10.0, fuse: bool = True,
                         masking: str = "official", eps: float = 1e-4, return_attention: bool = False):
    """Contextual attention of ``x`` (B, C, H, W) on itself with hole ``mask`` (B, 1, Hm, Wm),
    1 = hole, at any resolution that is a multiple of (H/rate, W/rate). See the module doc.

    Returns the (B, C, H, W) reconstruction, and with ``return_attention`` also the
    (B, L_keys, L_queries) attention weights (L = H*W/rate^2, row-major positions)."""
    _check(x, mask, ksize, rate, fuse_k, masking)
    b, c, h, w = x.shape
    hs, ws = h // rate, w // rate
    pad = ksize // 2
    xs = x[:, :, ::rate, ::rate]                                        # B, C, Hs, Ws
    keys = F.unfold(xs, ksize, padding=pad)                             # B, C*k*k, L
    queries = keys                                                      # foreground = background
    acc = torch.promote_types(x.dtype, torch.float32)                  # float32 or float64
    norms = keys.to(acc).pow(2).sum(1, keepdim=True).sqrt().clamp_min(eps).to(keys.dtype)
    scores = _flush_subnormal_grad(torch.bmm((keys / norms).transpose(1, 2), queries))   # B, L(keys), L(queries)
    if fuse and fuse_k > 1:
        scores = _fuse(scores, hs, ws, fuse_k)
    valid = key_validity(mask, (hs, ws), ksize, b, x.device)            # B, L
    v = valid.unsqueeze(-1)
    if masking == "official":
        vf = v.to(scores.dtype)
        attn = torch.softmax((scores * vf).to(acc) * softmax_scale, dim=1) * v
    else:
        logits = torch.where(v, scores.to(acc) * softmax_scale, torch.finfo(acc).min)
        attn = torch.softmax(logits, dim=1) * v
    attn = _flush_subnormal(attn).to(x.dtype)
    k2 = 2 * rate
    raw = F.unfold(x, k2, stride=rate, padding=rate - 1)               # B, C*k2*k2, L
    out = F.fold(torch.bmm(raw, attn), (h, w), k2, stride=rate, padding=rate - 1) / 4.0
    if x.dim() == 4 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)      # keep the network's layout
    return (out, attn) if return_attention else out


# ----------------------------------------------------------------------------- the blocked form

def _fuse_shifts(fuse: bool, fuse_k: int) -> list[tuple[int, int]]:
    """The (e, d) shifts of the fuse, (0, 0) first."""
    r = fuse_k // 2 if fuse else 0
    return sorted(((e, d) for e in range(-r, r + 1) for d in range(-r, r + 1)), key=lambda s: s != (0, 0))


def _shifted(p: torch.Tensor, e: int, d: int, hs: int, ws: int) -> torch.Tensor:
    """``t_ed(p)`` of row-major positions ``p``: the column-major shift by ``e``, then the
    row-major shift by ``d``; -1 where either leaves ``[0, L)`` (the fuse's zero padding)."""
    n = hs * ws
    c = (p % ws) * hs + p // ws + e                    # column-major index, shifted
    ok = (c >= 0) & (c < n)
    c = c.clamp(0, n - 1)
    q = (c % hs) * ws + c // hs + d                    # back to row-major, shifted
    ok &= (q >= 0) & (q < n)
    return torch.where(ok, q, -1)


def _tile_cost(th: int, tw: int, n_keys: int, ring: int, batch: int, el: int, acc_el: int) -> int:
    """Bytes of one tile's temporaries (module doc), with ``|N|`` bounded by the tile, its
    ring, and the positions the shifts wrap to at the map's edges."""
    n = min(n_keys, (th + 2 * ring) * (tw + 2 * ring) + 2 * ring * (th + tw))
    return batch * (n_keys + 1) * (el * (n + 1 + 3 * th * tw) + 2 * acc_el * th * tw)


def _tile_cost_fused(th: int, tw: int, n_keys: int, ring: int, batch: int, el: int) -> int:
    """Bytes of one tile's temporaries where the C++ kernel builds its fused scores (no
    gradients, float32/float64): the raw scores ``T`` and the fused ones, then the softmax
    and its columns of the used keys; at most ``B * L * el * (|N| + 2|J|)``."""
    n = min(n_keys, (th + 2 * ring) * (tw + 2 * ring) + 2 * ring * (th + tw))
    return batch * (n_keys + 1) * el * (n + 2 * th * tw)


def _tile_shape(hs: int, ws: int, ring: int, batch: int, el: int, acc_el: int, budget: int) -> tuple[int, int]:
    """(tile height, tile width) in matching positions: the whole map if it fits ``budget``,
    else the largest square that does (full rows on a narrow map, then as many rows as fit)."""
    n_keys = hs * ws

    def fits(th, tw):
        return _tile_cost(th, tw, n_keys, ring, batch, el, acc_el) <= budget

    if fits(hs, ws):
        return hs, ws
    side = 1
    while side < max(hs, ws) and fits(min(hs, side + 1), min(ws, side + 1)):
        side += 1
    th, tw = min(hs, side), min(ws, side)
    while th < hs and tw == ws and fits(th + 1, tw):
        th += 1
    while tw < ws and th == hs and fits(th, tw + 1):
        tw += 1
    return th, tw


def _plan(batch, channels, hs, ws, ksize, rate, fuse_k, fuse, dtype, block_bytes):
    """(tile height, tile width, bytes of the features held for the call, bytes of one tile)."""
    el = torch.empty((), dtype=dtype).element_size()
    acc_el = torch.empty((), dtype=torch.promote_types(dtype, torch.float32)).element_size()
    ring = fuse_k // 2 if fuse else 0
    held = batch * hs * ws * channels * (ksize * ksize + 4 * rate * rate) * el      # keys, raw patches
    budget = max(DEFAULT_BLOCK_BYTES, held // 2) if block_bytes is None else block_bytes
    th, tw = _tile_shape(hs, ws, ring, batch, el, acc_el, budget)
    return th, tw, held, _tile_cost(th, tw, hs * ws, ring, batch, el, acc_el)


def blocked_memory(shape, *, ksize: int = 3, rate: int = 2, fuse_k: int = 3, fuse: bool = True,
                   dtype=torch.float32, block_bytes: int | None = None, fused_kernel: bool = False) -> int:
    """Bytes :func:`contextual_attention_blocked` allocates at its peak, without gradients, for
    features of ``shape`` (B, C, H, W): the keys and raw patches, the padded downscaled
    features, the output, and one tile's temporaries (module doc; ``fused_kernel``: those of
    the C++ fused scores, fewer, for the same tiles)."""
    b, c, h, w = shape
    hs, ws = h // rate, w // rate
    th, tw, held, tile = _plan(b, c, hs, ws, ksize, rate, fuse_k, fuse, dtype, block_bytes)
    el = torch.empty((), dtype=dtype).element_size()
    if fused_kernel:
        tile = _tile_cost_fused(th, tw, hs * ws, fuse_k // 2 if fuse else 0, b, el)
    pad = ksize // 2
    return held + tile + b * c * ((hs + 2 * pad) * (ws + 2 * pad) + h * w) * el


def reference_memory(shape, *, ksize: int = 3, rate: int = 2, dtype=torch.float32) -> int:
    """Bytes :func:`contextual_attention` allocates at its peak, without gradients, for
    features of ``shape`` (B, C, H, W): four (L x L) maps at once (the scores and the fuse's
    padded copy and sum, then the masked logits and the softmax, these two in the
    softmax's precision), the keys and raw patches (``(ksize^2 + 4 rate^2) C x L``) and the
    output. Measured (CPU, float32, C = 96): 101 MB on a 96x96 map (formula 103), 291 MB on
    128x128 (formula 301)."""
    b, c, h, w = shape
    n = (h // rate) * (w // rate)
    el = torch.empty((), dtype=dtype).element_size()
    acc_el = torch.empty((), dtype=torch.promote_types(dtype, torch.float32)).element_size()
    return b * (n * n * (2 * el + 2 * acc_el) + ((ksize * ksize + 4 * rate * rate) * c * n + c * h * w) * el)


def _patches_at(xp: torch.Tensor, positions: torch.Tensor, ksize: int, ws: int, stride: int = 1) -> torch.Tensor:
    """(B, C*k*k, n): the ``ksize x ksize`` patches (F.unfold's order) of the zero-padded
    map ``xp`` whose corners are at ``stride * (y, x)`` for the row-major matching
    ``positions`` (y, x) of a map ``ws`` wide."""
    b, c, _, wp = xp.shape
    y, x = positions // ws * stride, positions % ws * stride
    du = torch.arange(ksize, device=positions.device)
    rows = y[None, :] + du[:, None]                                     # k, n
    cols = x[None, :] + du[:, None]                                     # k, n
    flat = (rows[:, None, :] * wp + cols[None, :, :]).reshape(-1)       # (u, v, n) row-major
    # advanced indexing, not index_select: along the last dimension index_select gathers one
    # element at a time (a (1, 4096, 4096) tensor's 3072 columns: 177 against 29 ms, CPU)
    return xp.flatten(2)[:, :, flat].view(b, c * ksize * ksize, positions.numel())


def _key_shift_plan(hs: int, ws: int, shifts, device) -> list[tuple]:
    """Per shift ``(e, d)``, how ``t_ed`` maps the keys: ``(off, a, b, dst, src)``. Keys
    ``[a, b)`` (those whose column-major shift stays in their column) go to ``key + off``,
    ``off = e * ws + d`` (the row-major shift wraps across rows by itself); the few others,
    ``dst``, wrap to the next or previous column, to ``src`` (those that leave the map are
    dropped: their term is zero)."""
    n = hs * ws
    plan = []
    for e, d in shifts:
        off = e * ws + d
        y_lo, y_hi = max(0, -e), min(hs, hs - e)
        a, b = max(y_lo * ws, -off), min(y_hi * ws, n - off)
        if y_hi > y_lo:
            wrap = torch.cat([torch.arange(0, y_lo * ws, device=device), torch.arange(y_hi * ws, n, device=device)])
        else:
            wrap = torch.arange(n, device=device)
            a = b = 0
        src = _shifted(wrap, e, d, hs, ws)
        keep = src >= 0
        wrap, src = wrap[keep], src[keep]
        plan.append((off, a, max(a, b), wrap, src))
    return plan


def _row_runs(cols: list[int], outside: int) -> list[tuple[int, int, int]]:
    """``(j0, j1, r0)``: the maximal runs of consecutive rows ``cols[j0:j1] = r0, r0+1, ...``
    (one per tile row, broken where the shift wraps at the map's edges); entries naming the
    row past the last (a shift that leaves the map: no term) are left out."""
    runs, j, n = [], 0, len(cols)
    while j < n:
        if cols[j] == outside:
            j += 1
            continue
        k = j + 1
        while k < n and cols[k] == cols[k - 1] + 1 and cols[k] != outside:
            k += 1
        runs.append((j, k, cols[j]))
        j = k
    return runs


def _tile_forward(keys, xs_pad, raw, used, valid, key_plan, positions, row_runs, tile_hw, ksize, rate, scale,
                  masking, out_dtype, row_shift=None, cpp_plan=None):
    """The output piece of one tile: fused scores of the tile's queries against all keys,
    masked softmax over the keys, and the overlap-add of the raw patches (module doc)."""
    ws = xs_pad.shape[-1] - 2 * (ksize // 2)
    acc = torch.promote_types(out_dtype, torch.float32)
    queries = _patches_at(xs_pad, positions, ksize, ws)                           # B, D, |N|
    t = _flush_subnormal_grad(torch.bmm(queries.transpose(1, 2), keys))           # B, |N|, L: raw scores
    del queries
    v = valid.unsqueeze(1)                                                        # B, 1, L
    if cpp_plan is not None:   # no gradients: each fused row in one pass, masked and scaled (ops/_contextual_scores.py)
        s = _scores_op.fused_scores(t, row_shift, cpp_plan, valid, scale, masking)
        del t
        attn = torch.softmax(s, dim=2)
        del s
        return _reconstruct(attn.mul_(v), raw, used, tile_hw, rate, out_dtype)
    n_q = tile_hw[0] * tile_hw[1]
    s = t.new_empty(t.shape[0], n_q, t.shape[2])
    for shift, ((off, a, b, dst, src), runs) in enumerate(zip(key_plan, row_runs)):
        # rows of t_ed(j) as slices of t (no gathered copy); the (0, 0) shift comes first:
        # the identity, covering every query
        for j0, j1, r0 in runs:
            rows = t[:, r0:r0 + j1 - j0]
            if shift == 0:
                s[:, j0:j1] = rows
                continue
            if b > a:
                s[:, j0:j1, a:b] += rows[:, :, a + off:b + off]
            if dst.numel():
                s[:, j0:j1].index_add_(2, dst, rows.index_select(2, src))
    del t
    if masking == "official" and s.dtype == acc and not s.requires_grad:
        # (s * v) * scale in place: v is 0 or 1, so s * (v * scale) rounds identically
        attn = torch.softmax(s.mul_(v.to(acc) * scale), dim=2).mul_(v)
    elif masking == "official":
        attn = torch.softmax((s * v.to(s.dtype)).to(acc) * scale, dim=2) * v
    else:
        attn = torch.softmax(torch.where(v, s.to(acc) * scale, torch.finfo(acc).min), dim=2) * v
    del s
    return _reconstruct(attn, raw, used, tile_hw, rate, out_dtype)


def _reconstruct(attn, raw, used, tile_hw, rate, out_dtype):
    """The output piece of a tile from its attention weights (B, |J|, L): the overlap-add of
    the raw patches of the keys with a weight in some sample."""
    attn = _flush_subnormal(attn).to(out_dtype)
    if used is not None:                                   # the keys with a weight in some sample
        attn = attn[:, :, used]                           # (not index_select: see _patches_at)
    cols = torch.bmm(raw, attn.transpose(1, 2))                                   # B, C*k2*k2, |J|
    del attn
    th, tw = tile_hw
    k2 = 2 * rate
    return F.fold(cols, (rate * th + rate, rate * tw + rate), k2, stride=rate) / 4.0


@torch.library.custom_op("fastinpaint::contextual_attention_inference", mutates_args=())
def _blocked_inference(x: torch.Tensor, mask: Optional[torch.Tensor], ksize: int, rate: int, fuse_k: int,
                       softmax_scale: float, fuse: bool, masking: str, block_bytes: Optional[int]) -> torch.Tensor:
    """:func:`contextual_attention_blocked` without gradients as one op: what ``torch.compile``
    calls for :class:`ContextualAttention` without gradients on the CPU, where the blocked form
    (its tile plan and its choice of keys depend on the mask) cannot be traced, so that the
    compiled module runs what the module runs uncompiled (the C++ fused scores, the used keys
    only). The result in the layout the blocked form gives (:func:`_output_like`)."""
    with torch.no_grad():
        y = contextual_attention_blocked(x, mask, ksize=ksize, rate=rate, fuse_k=fuse_k,
                                         softmax_scale=softmax_scale, fuse=fuse, masking=masking,
                                         block_bytes=block_bytes)
    out = _output_like(x)   # exactly the fake's strides (size-1 dimensions included)
    if y.stride() == out.stride():
        return y
    return out.copy_(y)


def _output_like(x: torch.Tensor) -> torch.Tensor:
    """An empty output for features ``x``: channels_last for (dense, not also NCHW) channels_last
    features, NCHW otherwise, the rule of the blocked form and the reference."""
    return torch.empty_like(x, memory_format=torch.channels_last if is_channels_last(x) else torch.contiguous_format)


@_blocked_inference.register_fake
def _blocked_inference_fake(x, mask, ksize, rate, fuse_k, softmax_scale, fuse, masking, block_bytes):
    return _output_like(x)


def contextual_attention_blocked(x: torch.Tensor, mask: torch.Tensor | None = None, *, ksize: int = 3,
                                 rate: int = 2, fuse_k: int = 3, softmax_scale: float = 10.0, fuse: bool = True,
                                 masking: str = "official", eps: float = 1e-4,
                                 block_bytes: int | None = None) -> torch.Tensor:
    """:func:`contextual_attention`, computed in tiles of queries so that no (L x L) tensor
    exists (module doc, "Blocked form"). Same arguments and result (no ``return_attention``:
    the attention map is the L x L tensor this form avoids).

    ``block_bytes``: the memory one tile's temporaries may take; None (default): half of
    the features the call holds anyway (keys and raw patches), at least
    :data:`DEFAULT_BLOCK_BYTES`. A map that fits is one tile, the reference's computation.
    With gradients and several tiles, each tile is recomputed in backward
    (``torch.utils.checkpoint``)."""
    _check(x, mask, ksize, rate, fuse_k, masking)
    if block_bytes is not None and (isinstance(block_bytes, bool) or not isinstance(block_bytes, int)
                                    or block_bytes < 1):
        raise ValueError(f"block_bytes must be a positive int or None, got {block_bytes!r}")
    b, c, h, w = x.shape
    hs, ws = h // rate, w // rate
    n_keys = hs * ws
    pad = ksize // 2
    acc = torch.promote_types(x.dtype, torch.float32)
    grad = torch.is_grad_enabled() and x.requires_grad
    xs = x[:, :, ::rate, ::rate]
    keys = F.unfold(xs, ksize, padding=pad)                                       # B, C*k*k, L
    norms = keys.to(acc).pow(2).sum(1, keepdim=True).sqrt().clamp_min(eps).to(keys.dtype)
    keys = keys / norms if grad else keys.div_(norms)
    del norms
    xs_pad = F.pad(xs, (pad, pad, pad, pad))                                      # queries are gathered from it
    valid = key_validity(mask, (hs, ws), ksize, b, x.device)                      # B, L
    # the raw patches of the keys valid in some sample: the others have no weight anywhere
    used = valid.any(0).nonzero().squeeze(1)
    x_pad = F.pad(x, (rate - 1,) * 4)
    raw = _patches_at(x_pad, used, 2 * rate, ws, stride=rate)                     # B, C*k2*k2, |used|
    del x_pad
    used = None if used.numel() == n_keys else used
    shifts = _fuse_shifts(fuse, fuse_k)
    th, tw, _, _ = _plan(b, c, hs, ws, ksize, rate, fuse_k, fuse, x.dtype, block_bytes)
    dev = x.device
    key_plan = _key_shift_plan(hs, ws, shifts, dev)
    cpp_plan = _scores_op.key_plan_tensors(key_plan) if _scores_op.cpp_applies(x, grad) else None
    tiles = [(y0, min(y0 + th, hs), x0, min(x0 + tw, ws)) for y0 in range(0, hs, th) for x0 in range(0, ws, tw)]
    use_checkpoint = grad and len(tiles) > 1
    out = None
    for y0, y1, x0, x1 in tiles:
        tile = ((torch.arange(y0, y1, device=dev) * ws)[:, None] + torch.arange(x0, x1, device=dev)[None, :])
        q_shift = torch.stack([_shifted(tile.flatten(), e, d, hs, ws) for e, d in shifts])   # S, |J|
        positions = torch.unique(q_shift[q_shift >= 0])                                       # sorted
        col_shift = torch.where(q_shift >= 0, torch.searchsorted(positions, q_shift.clamp_min(0)),
                                positions.numel())
        row_runs = None if cpp_plan is not None else [_row_runs(cols, positions.numel()) for cols in col_shift.tolist()]
        args = (keys, xs_pad, raw, used, valid, key_plan, positions, row_runs, (y1 - y0, x1 - x0), ksize, rate,
                float(softmax_scale), masking, x.dtype, col_shift, cpp_plan)
        piece = checkpoint(_tile_forward, *args, use_reentrant=False) if use_checkpoint else _tile_forward(*args)
        # the piece covers output rows [rate*y0 - rate + 1, rate*y1 + 1) and the same in columns
        r0, c0 = rate * y0 - rate + 1, rate * x0 - rate + 1
        a0, b0 = max(r0, 0), max(c0, 0)
        a1, b1 = min(rate * y1 + 1, h), min(rate * x1 + 1, w)
        part = piece[:, :, a0 - r0:a1 - r0, b0 - c0:b1 - c0]
        if len(tiles) == 1:
            out = part.contiguous()
        else:
            if out is None:
                out = x.new_zeros(b, c, h, w)
            out[:, :, a0:a1, b0:b1] += part
    if x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out


class ContextualAttention(nn.Module):
    """Contextual attention as a module (no parameters); ``forward(x, mask)``.

    ``blocked`` (default True): :func:`contextual_attention_blocked`, with ``block_bytes``
    (with the default budget, a map that would be one tile runs the reference, which is
    faster with gradients and then needs no more memory, except where the blocked form's
    fused scores run in C++: without gradients, CPU, float32/float64); False: the reference
    :func:`contextual_attention` (the full L x L maps). Under
    ``torch.compile`` without gradients on the CPU (float32/float64), the blocked form runs as
    one opaque op (:func:`_blocked_inference`), as uncompiled. Otherwise, and under
    ``torch.export``, the reference is traced: the blocked form's tile plans and its choice of
    keys are data-dependent (``unique``, ``nonzero``) and its tile count depends on the size,
    while the reference is one graph for any size (to compile a model for large images with
    gradients or on the GPU, keep the attention eager with ``torch.compiler.disable``)."""

    def __init__(self, ksize: int = 3, rate: int = 2, fuse_k: int = 3, softmax_scale: float = 10.0,
                 fuse: bool = True, masking: str = "official", blocked: bool = True, block_bytes: int | None = None):
        super().__init__()
        if masking not in _MASKINGS:
            raise ValueError(f"masking must be one of {_MASKINGS}, got {masking!r}")
        if not isinstance(blocked, bool):
            raise ValueError(f"blocked must be True or False, got {blocked!r}")
        self.ksize, self.rate, self.fuse_k = ksize, rate, fuse_k
        self.softmax_scale, self.fuse, self.masking = float(softmax_scale), bool(fuse), masking
        self.blocked, self.block_bytes = blocked, block_bytes

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        kw = dict(ksize=self.ksize, rate=self.rate, fuse_k=self.fuse_k, softmax_scale=self.softmax_scale,
                  fuse=self.fuse, masking=self.masking)
        grad = torch.is_grad_enabled() and x.requires_grad
        if self.blocked and torch.compiler.is_compiling():
            if self._calls_blocked_op(x, grad):
                return _blocked_inference(x, mask, self.ksize, self.rate, self.fuse_k, self.softmax_scale,
                                          self.fuse, self.masking, self.block_bytes)
        elif self.blocked and self._runs_blocked(x, grad):
            return contextual_attention_blocked(x, mask, block_bytes=self.block_bytes, **kw)
        return contextual_attention(x, mask, **kw)

    def _calls_blocked_op(self, x: torch.Tensor, grad: bool) -> bool:
        """Under torch.compile (not torch.export, whose graph must be standard ops): the blocked
        form as one opaque op (:func:`_blocked_inference`) where its C++ fused scores apply (no
        gradients, CPU, float32 or float64; static or dynamic sizes), as the module runs uncompiled.
        (It traced a one-tile form over every key before: inference at 512x512 compiled was
        slower than uncompiled, 1.38x against 1.46x compile(eager) at batch 1.)"""
        if getattr(torch.compiler, "is_exporting", lambda: False)():
            return False
        return _scores_op.cpp_applies(x, grad, traced=True)

    def _runs_blocked(self, x: torch.Tensor, grad: bool) -> bool:
        """The blocked form where the map is more than one tile, and, without gradients, where
        its fused scores run in C++ (ops/_contextual_scores.py: one pass per row instead of a
        pass per fuse shift and several for the masking; a 512x512 DeepFill v2 image, C = 96,
        128 x 128 features: 392 against the reference's 597 ms)."""
        return not self._one_tile(x.shape, x.dtype) or _scores_op.cpp_applies(x, grad)

    def _one_tile(self, shape, dtype) -> bool:
        """With the default budget (``block_bytes`` None), whether the blocked form would run
        the whole map as one tile: then its memory is the reference's order anyway, and with
        gradients the reference is about twice as fast (1.9 against 4.1 s on 128x128: the
        blocked form's backward adds the slices back one by one); without them the blocked
        form's Python loop was about as fast (628 against 596 ms on 128x128), its C++ fused
        scores are faster (:meth:`_runs_blocked`)."""
        if self.block_bytes is not None:
            return False
        b, c, h, w = shape
        hs, ws = h // self.rate, w // self.rate
        th, tw, _, _ = _plan(b, c, hs, ws, self.ksize, self.rate, self.fuse_k, self.fuse, dtype, None)
        return th >= hs and tw >= ws

    def inference_memory(self, shape, dtype=torch.float32) -> int:
        """Bytes :meth:`forward` allocates at its peak without gradients for features of
        ``shape`` (B, C, H, W): :func:`blocked_memory` where it runs the blocked form, else
        :func:`reference_memory`."""
        probe = torch.empty((), dtype=dtype).expand(*shape)
        if self.blocked and self._runs_blocked(probe, grad=False):
            return blocked_memory(shape, ksize=self.ksize, rate=self.rate, fuse_k=self.fuse_k, fuse=self.fuse,
                                  dtype=dtype, block_bytes=self.block_bytes,
                                  fused_kernel=_scores_op.cpp_applies(probe, grad=False))
        return reference_memory(shape, ksize=self.ksize, rate=self.rate, dtype=dtype)

    def extra_repr(self) -> str:
        return (f"ksize={self.ksize}, rate={self.rate}, fuse_k={self.fuse_k}, softmax_scale={self.softmax_scale}, "
                f"fuse={self.fuse}, masking={self.masking!r}, blocked={self.blocked}")
