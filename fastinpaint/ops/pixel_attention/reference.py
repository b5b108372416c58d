"""Eager PyTorch pixel attention and attention-transfer loss: the oracle of the tests and
the baseline of the benchmarks. Both materialise the (B, N, N) affinity matrix.

Conventions shared by every backend:

* ``key_mask`` (B, N) bool, **True = the key is excluded** (a hole pixel), as
  ``nn.MultiheadAttention``'s ``key_padding_mask``. A query whose sample has no valid
  key gets a zero output and zero gradients (softmax over an empty set is defined as
  the zero distribution).
* the attention-transfer loss of rows R (``row_mask`` True, all rows when None):
  ``sum_{b, i in R} w_bi * dist(r_s[b, i], r_t[b, i]) / max(|R|, 1)``, ``r = softmax_j(scale
  * q_i . k_j)``, ``dist`` the sum over j of squared (l2) or absolute (l1) differences.
"""

from __future__ import annotations

import torch

DISTANCES = {"l2": 0, "l1": 1}


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.matmul(q, k.transpose(-1, -2)) * scale


def attention_probs(q, k, key_mask=None, scale: float = 1.0) -> torch.Tensor:
    """(B, N, N) softmax_j(scale * q_i . k_j) over the valid keys; zero rows when none is valid."""
    s = _scores(q, k, scale)
    if key_mask is None:
        return torch.softmax(s, dim=-1)
    excluded = key_mask[:, None, :]
    empty = key_mask.all(dim=-1)[:, None, None]  # samples with no valid key
    s = s.masked_fill(excluded, float("-inf")).masked_fill(empty, 0.0)
    return torch.softmax(s, dim=-1) * (~empty).to(s.dtype)


def pixel_attention(q, k, v, key_mask=None, scale=None) -> torch.Tensor:
    """out_i = sum_j softmax_j(scale * q_i . k_j) v_j; q, k (B, N, Dqk), v (B, N, Dv)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    p = attention_probs(q, k, key_mask, scale)
    return torch.matmul(p.to(v.dtype), v)


def row_distance(q_s, k_s, q_t, k_t, scale: float = 1.0, distance: str = "l2") -> torch.Tensor:
    """(B, N) float: dist(r_s[b, i], r_t[b, i]) for every row."""
    r_s = torch.softmax(_scores(q_s, k_s, scale).float() if q_s.dtype != torch.float64
                        else _scores(q_s, k_s, scale), dim=-1)
    r_t = torch.softmax(_scores(q_t, k_t, scale).to(r_s.dtype), dim=-1)
    diff = r_s - r_t
    return (diff * diff).sum(-1) if distance == "l2" else diff.abs().sum(-1)


def reduce_rows(dist, row_weight=None, row_mask=None) -> torch.Tensor:
    """sum over the rows in row_mask of row_weight * dist, divided by the number of such rows."""
    if row_weight is not None:
        dist = dist * row_weight.to(dist.dtype)
    if row_mask is None:
        return dist.sum() / dist.numel()
    m = row_mask.to(dist.dtype)
    return (dist * m).sum() / m.sum().clamp(min=1.0)


def attention_transfer_loss(q_s, k_s, q_t, k_t, row_weight=None, row_mask=None, distance="l2",
                            scale: float = 1.0) -> torch.Tensor:
    """Eager attention-transfer loss (teacher inputs detached); float32 result for 16-bit inputs."""
    dist = row_distance(q_s, k_s, q_t.detach(), k_t.detach(), scale, distance)
    return reduce_rows(dist, row_weight, row_mask)
