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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ContextualAttention", "contextual_attention", "key_validity"]

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
    scores = torch.bmm((keys / norms).transpose(1, 2), queries)        # B, L(keys), L(queries)
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
    attn = attn.to(x.dtype)
    k2 = 2 * rate
    raw = F.unfold(x, k2, stride=rate, padding=rate - 1)               # B, C*k2*k2, L
    out = F.fold(torch.bmm(raw, attn), (h, w), k2, stride=rate, padding=rate - 1) / 4.0
    if x.dim() == 4 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)      # keep the network's layout
    return (out, attn) if return_attention else out


class ContextualAttention(nn.Module):
    """:func:`contextual_attention` as a module (no parameters); ``forward(x, mask)``."""

    def __init__(self, ksize: int = 3, rate: int = 2, fuse_k: int = 3, softmax_scale: float = 10.0,
                 fuse: bool = True, masking: str = "official"):
        super().__init__()
        if masking not in _MASKINGS:
            raise ValueError(f"masking must be one of {_MASKINGS}, got {masking!r}")
        self.ksize, self.rate, self.fuse_k = ksize, rate, fuse_k
        self.softmax_scale, self.fuse, self.masking = float(softmax_scale), bool(fuse), masking

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return contextual_attention(x, mask, ksize=self.ksize, rate=self.rate, fuse_k=self.fuse_k,
                                    softmax_scale=self.softmax_scale, fuse=self.fuse, masking=self.masking)

    def extra_repr(self) -> str:
        return (f"ksize={self.ksize}, rate={self.rate}, fuse_k={self.fuse_k}, softmax_scale={self.softmax_scale}, "
                f"fuse={self.fuse}, masking={self.masking!r}")
