"""Eager PyTorch self-similarity maps and the spatially-correlative distance: the oracle
of every test and the baselines of the benchmarks.

Math (F-LSeSim, Zheng, Cham and Cai, CVPR 2021):

* Features ``f`` (B, C, H, W) are centred per channel over space, ``f - f.mean((-2, -1))``,
  then L2-normalised over channels (``normalize=True``, eps 1e-12 as ``F.normalize``), or
  divided by ``sqrt(C)`` (``normalize=False``, and then every similarity ``s`` becomes
  ``tanh(s / 10)``). Call the result ``g``.
* Query ``q`` is a flat index into the H*W map: row ``q // W``, column ``q % W`` (the public
  code divides by the wrong dimension when H != W; this is the corrected rule, identical on
  square maps).
* Window of query (r, c), patch size K:
    - ``"clamp"``: rows ``[r0, r0 + K)`` with ``r0 = clamp(r - K//2, 0, H - K)``, the same for
      columns; when ``K >= H`` or ``K >= W`` the window is the whole map (N = H*W entries),
      as in the public code.
    - ``"zero"``: rows ``[r - K//2, r - K//2 + K)`` (columns alike) with every position
      outside the map contributing a similarity of 0.
  Entry ``j = i*kw + k`` of a row is the window position (r0 + i, c0 + k).
* Map ``S[b, q, j] = <g[b, :, query q], g[b, :, window position j]>``, shape (B, Q, N).
* Distances between a source map S and a target map T, per row: with ``num = N // 4`` and
  ``t`` the value at 0-based index ``num`` of the row of T sorted in descending order, the
  entries with ``T < t`` are set to 0 in both maps; then
    - ``l1``:  ``mean(|(N/num) S' - (N/num) T'|)`` over all B*Q*N entries,
    - ``cos``: ``mean(1 - cosine(S'_row, T'_row))`` over the B*Q rows (cosine as
      ``F.cosine_similarity``, eps 1e-8).
  ``info``: the patchwise InfoNCE loss against a third map O (rows L2-normalised,
  logits ``[S T^T, S O^T, T O^T] / tau`` per batch, cross-entropy on the diagonal).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

WINDOW_CODES = {"clamp": 0, "zero": 1}
# the kernels' window code 2: "zero" windows with every position a query, in order (index =
# arange(H*W); op.py passes it only for query_index="all"). The kernels treat it as "zero"; the
# triton and cuda backwards invert the windows and gather instead of looping over the queries.
DENSE_ZERO = 2
MODE_CODES = {"l1": 0, "cos": 1}
TANH_SCALE = 10.0  # normalize=False: s -> tanh(s / TANH_SCALE)
COS_EPS = 1e-8


# ----------------------------------------------------------------------------- geometry

def window_shape(height: int, width: int, patch_size: int, window: str) -> tuple[int, int, bool]:
    """(kh, kw, whole_map) of the windows: the map itself when a clamped K x K window does
    not fit strictly inside it."""
    if window == "clamp" and (patch_size >= height or patch_size >= width):
        return height, width, True
    return patch_size, patch_size, False


def window_starts(index: torch.Tensor, height: int, width: int, patch_size: int, window: str):
    """Top-left corner (row, col) of each query's window; may be negative for "zero"."""
    kh, kw, whole = window_shape(height, width, patch_size, window)
    rows, cols = index // width, index % width
    if whole:
        return torch.zeros_like(rows), torch.zeros_like(cols)
    r0, c0 = rows - patch_size // 2, cols - patch_size // 2
    if window == "clamp":
        r0, c0 = r0.clamp(0, height - kh), c0.clamp(0, width - kw)
    return r0, c0


def window_positions(index: torch.Tensor, height: int, width: int, patch_size: int, window: str):
    """(positions, valid): (Q, N) flat map positions of every window entry (clamped into the
    map where invalid) and whether each entry lies inside the map."""
    kh, kw, _ = window_shape(height, width, patch_size, window)
    r0, c0 = window_starts(index, height, width, patch_size, window)
    rr = r0[:, None] + torch.arange(kh, device=index.device)[None, :]  # (Q, kh)
    cc = c0[:, None] + torch.arange(kw, device=index.device)[None, :]  # (Q, kw)
    valid = ((rr >= 0) & (rr < height))[:, :, None] & ((cc >= 0) & (cc < width))[:, None, :]
    pos = rr.clamp(0, height - 1)[:, :, None] * width + cc.clamp(0, width - 1)[:, None, :]
    return pos.reshape(index.shape[0], kh * kw), valid.reshape(index.shape[0], kh * kw)


# ----------------------------------------------------------------------------- maps

def normalize_features(feat: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Centre per channel over space, then L2-normalise over channels (or divide by sqrt(C))."""
    f = feat - feat.mean(dim=(-2, -1), keepdim=True)
    return F.normalize(f, dim=1) if normalize else f / math.sqrt(feat.shape[1])


def self_similarity(feat: torch.Tensor, index: torch.Tensor, patch_size: int, window: str = "clamp",
                    normalize: bool = True) -> torch.Tensor:
    """(B, Q, N) maps: every query against the whole map by one bmm, then the window's
    entries gathered from it (B*Q*H*W temporary). The oracle of the tests."""
    B, C, H, W = feat.shape
    g = normalize_features(feat, normalize).flatten(2)  # (B, C, HW)
    q = g[:, :, index]  # (B, C, Q)
    full = torch.bmm(q.transpose(1, 2), g)  # (B, Q, HW)
    pos, valid = window_positions(index, H, W, patch_size, window)
    sim = full.gather(2, pos.unsqueeze(0).expand(B, -1, -1))
    sim = torch.where(valid, sim, torch.zeros((), dtype=sim.dtype, device=sim.device))
    return sim if normalize else torch.tanh(sim / TANH_SCALE)


def self_similarity_gather(feat: torch.Tensor, index: torch.Tensor, patch_size: int, window: str = "clamp",
                           normalize: bool = True) -> torch.Tensor:
    """The vectorised gather formulation: gather every window's keys, multiply, sum over C.
    Eager it materialises B*C*Q*N values; torch.compile fuses it into one reduction (the
    benchmarks' compiled baseline)."""
    B, C, H, W = feat.shape
    g = normalize_features(feat, normalize).flatten(2)  # (B, C, HW)
    pos, valid = window_positions(index, H, W, patch_size, window)
    keys = g[:, :, pos] * valid.to(g.dtype)  # (B, C, Q, N)
    sim = (keys * g[:, :, index].unsqueeze(-1)).sum(1)
    return sim if normalize else torch.tanh(sim / TANH_SCALE)


def self_similarity_loop(feat: torch.Tensor, index: torch.Tensor, patch_size: int,
                         normalize: bool = True) -> torch.Tensor:
    """The public code's formulation (clamped windows): a Python loop over the queries
    slicing each K x K window, ``torch.stack`` of the B x Q x C x K x K copies, one bmm.
    (Row and column from the flat index by the map's width.)"""
    B, C, H, W = feat.shape
    g = normalize_features(feat, normalize)
    k = patch_size
    query = g.permute(0, 2, 3, 1).flatten(1, 2)[:, index, :]  # (B, Q, C)
    Q = query.shape[1]
    if k < H and k < W:
        rows, cols = index // W, index % W
        r0 = (rows - k // 2).clamp(0, H - k).tolist()
        c0 = (cols - k // 2).clamp(0, W - k).tolist()
        keys = [g[:, :, r0[i]:r0[i] + k, c0[i]:c0[i] + k] for i in range(Q)]
        keys = torch.stack(keys, dim=0).permute(1, 0, 2, 3, 4).reshape(B * Q, C, k * k)
        sim = torch.bmm(query.reshape(B * Q, 1, C), keys).view(B, Q, -1)
    else:
        sim = torch.bmm(query, g.reshape(B, C, H * W))
    return sim if normalize else torch.tanh(sim / TANH_SCALE)


# ----------------------------------------------------------------------------- distances

def top_quarter_mask(sim_tgt: torch.Tensor) -> torch.Tensor:
    """True where the target row's value is at or above the value at 0-based index N//4 of
    its descending sort (the entries the l1 and cos distances keep)."""
    n = sim_tgt.shape[-1]
    num = n // 4
    threshold = sim_tgt.sort(dim=-1, descending=True).values[..., num:num + 1]
    return ~(sim_tgt < threshold)


def compare_maps(sim_src: torch.Tensor, sim_tgt: torch.Tensor, mode: str = "cos") -> torch.Tensor:
    """``l1`` or ``cos`` distance of two (B, Q, N) maps (top-quarter selection on the target)."""
    n = sim_src.shape[-1]
    num = n // 4
    if num == 0:
        raise ValueError(f"the maps have {n} entries per row; the l1 and cos distances need at least 4")
    keep = top_quarter_mask(sim_tgt)
    zero = torch.zeros((), dtype=sim_src.dtype, device=sim_src.device)
    src, tgt = torch.where(keep, sim_src, zero), torch.where(keep, sim_tgt, zero)
    if mode == "l1":
        return ((n / num) * src - (n / num) * tgt).abs().mean()
    if mode == "cos":
        return (1 - F.cosine_similarity(src, tgt, dim=-1, eps=COS_EPS)).mean()
    raise ValueError(f"mode must be 'l1' or 'cos', got {mode!r}")


def info_nce(sim_src: torch.Tensor, sim_tgt: torch.Tensor, sim_other: torch.Tensor,
             temperature: float = 0.1) -> torch.Tensor:
    """Patchwise InfoNCE over (B, Q, N) maps: for each query the positive is the same query's
    row in T, the negatives the other queries of T, and every query of O against S and T."""
    B, Q, _ = sim_src.shape
    s, t, o = (F.normalize(m, dim=-1) for m in (sim_src, sim_tgt, sim_other))
    logits = torch.cat([torch.bmm(s, t.transpose(1, 2)), torch.bmm(s, o.transpose(1, 2)),
                        torch.bmm(t, o.transpose(1, 2))], dim=-1).reshape(B * Q, 3 * Q) / temperature
    labels = torch.arange(Q, device=sim_src.device).repeat(B)
    return F.cross_entropy(logits, labels)


def spatial_correlative_distance(f_src, f_tgt, index, patch_size, mode="cos", window="clamp",
                                 normalize=True):
    """Both maps by :func:`self_similarity`, then :func:`compare_maps`."""
    return compare_maps(self_similarity(f_src, index, patch_size, window, normalize),
                        self_similarity(f_tgt, index, patch_size, window, normalize), mode)
