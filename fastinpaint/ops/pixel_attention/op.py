"""Pixel (matmul) attention and the attention-transfer loss: argument checks, autograd
wiring, torch.library registration, and dispatch to a backend.

Backends:
  reference  eager, materialises the (B, N, N) affinities (reference.py)
  triton     flash-style kernels with online softmax (triton.py): no N x N tensor
  cpu        C++ (csrc/cpu/pixel_attention.cpp): parallel tasks of 64 query rows (or, for
             dk/dv, 64 key rows) against all N, so the largest temporary is 64 x N per
             thread; the block products are at::mm on the task's thread
  cuda       pixel_attention only: ``torch.nn.functional.scaled_dot_product_attention``
             (torch picks its fastest kernel that accepts the shapes: with Dqk != Dv and a
             mask usually the memory-efficient one). Samples whose keys are all masked are
             given an all-true SDPA mask and their output multiplied by 0 (SDPA would give NaN
             there), so they follow the zero-output rule. The transfer loss has no cuda
             backend: on CUDA tensors ``auto`` picks triton.

Saved for backward: pixel attention keeps q, k, v, the key mask, out and the row
log-sum-exp (B*N float32); the transfer loss keeps the four inputs and three (B, N)
float32 row statistics (the two log-sum-exps and c_i = sum_j r_s g). Eager keeps the
N x N probabilities (and, for the loss, several N x N temporaries).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .._common import acc_dtype, FLOAT_DTYPES, autocast_cast, check_float_tensor, check_same_device, check_same_dtype
from .._registry import Op, differentiable, kernel
from . import reference
from .reference import DISTANCES



# ----------------------------------------------------------------------------- kernels

def _attn_fwd_fake(q, k, v, key_mask, scale):
    B, N, _ = q.shape
    return q.new_empty((B, N, v.shape[2])), q.new_empty((B, N), dtype=acc_dtype(q.dtype))


def _attn_bwd_fake(grad_out, q, k, v, key_mask, out, lse, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _loss_fwd_fake(q_s, k_s, q_t, k_t, scale, distance):
    B, N, _ = q_s.shape
    return tuple(q_s.new_empty((B, N), dtype=acc_dtype(q_s.dtype)) for _ in range(4))


def _loss_bwd_fake(grad_dist, q_s, k_s, q_t, k_t, lse_s, lse_t, crow, scale, distance):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q_s, k_s))


# q, k (B, N, Dqk), v (B, N, Dv), key_mask (B, N) bool with True = key excluded -> (out, row log-sum-exp)
ATTN_FORWARD = kernel("pixel_attention_forward",
                      "(Tensor q, Tensor k, Tensor v, Tensor? key_mask, float scale) -> (Tensor, Tensor)",
                      _attn_fwd_fake, triton="attention_forward")
ATTN_BACKWARD = kernel("pixel_attention_backward",
                       "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? key_mask, Tensor out, Tensor lse, "
                       "float scale) -> (Tensor, Tensor, Tensor)",
                       _attn_bwd_fake, triton="attention_backward")
# distance 0 = l2, 1 = l1 -> (per-row distance, lse_s, lse_t, c_i = sum_j r_s g)
LOSS_FORWARD = kernel("attention_transfer_forward",
                      "(Tensor q_s, Tensor k_s, Tensor q_t, Tensor k_t, float scale, int distance) "
                      "-> (Tensor, Tensor, Tensor, Tensor)",
                      _loss_fwd_fake, triton="transfer_forward")
LOSS_BACKWARD = kernel("attention_transfer_backward",
                       "(Tensor grad_dist, Tensor q_s, Tensor k_s, Tensor q_t, Tensor k_t, Tensor lse_s, "
                       "Tensor lse_t, Tensor c, float scale, int distance) -> (Tensor, Tensor)",
                       _loss_bwd_fake, triton="transfer_backward")

ATTN_OP = Op("pixel_attention", {
    "reference": "eager: the (B, N, N) affinities, softmax, bmm (reference.py)",
    "triton": "flash-style Triton kernels with an online softmax: no N x N tensor",
    "cuda": "torch's scaled_dot_product_attention (torch picks its kernel; fastinpaint adds the key mask "
            "and the zero output of all-masked samples): no fastinpaint CUDA kernel",
    "cpu": "C++ tasks of 64 query (or key) rows against all N, block products with at::mm "
           "(csrc/cpu/pixel_attention.cpp): at most 64 x N per thread",
}, kernels=(ATTN_FORWARD, ATTN_BACKWARD), cpp_backends=("cpu",))
LOSS_OP = Op("attention_transfer_loss", {
    "reference": "eager: both (B, N, N) affinity matrices (reference.py)",
    "triton": "Triton kernels computing each row's distance in blocks from the two rows' log-sum-exps",
    "cpu": "C++ kernels, blocks of rows (csrc/cpu/pixel_attention.cpp)",
}, kernels=(LOSS_FORWARD, LOSS_BACKWARD))


def _attn_setup_context(ctx, inputs, output):
    q, k, v, key_mask, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, key_mask, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _attn_backward(ctx, backward_kernel, grad_out, grad_lse):
    q, k, v, key_mask, out, lse = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None, None
    dq, dk, dv = backward_kernel(grad_out, q, k, v, key_mask, out, lse, ctx.scale)
    return dq, dk, dv, None, None


def _loss_setup_context(ctx, inputs, output):
    q_s, k_s, q_t, k_t, scale, distance = inputs
    dist, lse_s, lse_t, crow = output
    ctx.save_for_backward(q_s, k_s, q_t, k_t, lse_s, lse_t, crow)
    ctx.scale, ctx.distance = scale, distance
    ctx.mark_non_differentiable(lse_s, lse_t, crow)


def _loss_backward(ctx, backward_kernel, grad_dist, *_):
    q_s, k_s, q_t, k_t, lse_s, lse_t, crow = ctx.saved_tensors
    if grad_dist is None:
        return (None,) * 6
    dq, dk = backward_kernel(grad_dist, q_s, k_s, q_t, k_t, lse_s, lse_t, crow, ctx.scale, ctx.distance)
    return dq, dk, None, None, None, None


differentiable(ATTN_FORWARD, ATTN_BACKWARD, _attn_setup_context, _attn_backward)
differentiable(LOSS_FORWARD, LOSS_BACKWARD, _loss_setup_context, _loss_backward)


# ----------------------------------------------------------------------------- argument checks

def _check_tensors(named) -> None:
    """Each ``(name, tensor)`` must be a floating (B, N, D) tensor with positive N and D."""
    for name, t in named:
        check_float_tensor(t, name, 3, "(B, N, D)")
        if t.shape[1] == 0 or t.shape[2] == 0:
            raise ValueError(f"{name} must have positive N and D, got shape {tuple(t.shape)}")


def _check_same(ref_name, ref, others) -> None:
    for other in others:
        check_same_device(ref, (other,), ref_name)
        check_same_dtype(ref, (other,), ref_name)


def _check_shape_of(name, t, ref_name, ref) -> None:
    if tuple(t.shape) != tuple(ref.shape):
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")


def _check_rows(name, t, B: int, N: int, last: str) -> None:
    if t.shape[0] != B or t.shape[1] != N:
        raise ValueError(f"{name} must have shape (B, N, {last}) = ({B}, {N}, {last}), got {tuple(t.shape)}")


def _check_row_tensor(t, name: str, B: int, N: int, ref: torch.Tensor, boolean: bool) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if boolean and t.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = {'excluded key' if name == 'key_mask' else 'row in the loss'}), "
                        f"got {t.dtype}")
    if not boolean and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if tuple(t.shape) != (B, N):
        raise ValueError(f"{name} must have shape (B, N) = ({B}, {N}), got {tuple(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but the inputs are on {ref.device}")


def _check_scale(scale, allow_none: bool) -> Optional[float]:
    if scale is None and allow_none:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number{' or None' if allow_none else ''}, got {scale!r}")
    return float(scale)


# ----------------------------------------------------------------------------- pixel attention

def _sdpa(q, k, v, key_mask, scale):
    import torch.nn.functional as F

    attn_mask, keep = None, None
    if key_mask is not None:
        empty = key_mask.all(dim=1)  # samples with no valid key
        attn_mask = (~key_mask | empty[:, None])[:, None, None, :]
        keep = (~empty).to(q.dtype)[:, None, None, None]
    out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], attn_mask=attn_mask, scale=scale)
    if keep is not None:
        out = out * keep
    return out[:, 0]


def pixel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor] = None,
                    scale: Optional[float] = None) -> torch.Tensor:
    """Attention over all pixels: ``out_i = sum_j softmax_j(scale * q_i . k_j) v_j``.

    Args:
        q, k: (B, N, Dqk); v: (B, N, Dv), Dqk and Dv independent (DGII: Dqk = C/8, Dv = C).
            float16, bfloat16, float32 (float64 on reference and cpu); any strides.
        key_mask: (B, N) bool or None. **True excludes the key** (a hole pixel), as
            ``nn.MultiheadAttention``'s ``key_padding_mask``. A sample whose keys are all
            excluded gets ``out = 0`` and zero gradients.
        scale: the logit scale; None means ``1/sqrt(Dqk)`` as in scaled_dot_product_attention.

    Returns:
        (B, N, Dv) in q's dtype (contiguous).

    Memory: no backend but ``reference`` holds an N x N tensor. Saved for backward: q, k, v,
    the mask, the output and a (B, N) float32 row log-sum-exp. Limits: the triton backend takes
    Dqk <= 128 and, with gradients, Dv <= 256.
    """
    _check_tensors((("q", q), ("k", k), ("v", v)))
    B, N, Dqk = q.shape
    _check_shape_of("k", k, "q", q)
    _check_rows("v", v, B, N, "Dv")
    _check_same("q", q, (("k", k), ("v", v)))
    _check_row_tensor(key_mask, "key_mask", B, N, q, boolean=True)
    scale = _check_scale(scale, allow_none=True)
    if scale is None:
        scale = 1.0 / math.sqrt(Dqk)
    backend = ATTN_OP.select(q, "q")
    if backend == "reference":
        return reference.pixel_attention(q, k, v, key_mask, scale)
    q, k, v = autocast_cast(q, k, v)
    if backend == "cuda":
        return _sdpa(q, k, v, key_mask, scale)
    if backend == "triton":
        from .triton import MAX_QK, MAX_V

        if Dqk > MAX_QK:
            raise ValueError(f"the triton backend takes Dqk <= {MAX_QK}, got q with Dqk={Dqk}")
        if v.shape[2] > MAX_V and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise ValueError(f"the triton backend's backward takes Dv <= {MAX_V}, got v with Dv={v.shape[2]}")
    return ATTN_FORWARD(backend, q, k, v, key_mask, scale)[0]


# ----------------------------------------------------------------------------- attention transfer

def attention_transfer_loss(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
                            row_weight: Optional[torch.Tensor] = None, row_mask: Optional[torch.Tensor] = None,
                            distance: str = "l2", scale: float = 1.0) -> torch.Tensor:
    """DGII's attention-transfer loss between a student's and a teacher's affinities.

    ``r_i = softmax_j(scale * q_i . k_j)`` for the student (q_s, k_s) and the teacher (q_t,
    k_t); the loss is ``sum_{b, i in R} w_bi * dist(r_s_bi, r_t_bi) / max(|R|, 1)`` with R the
    rows where ``row_mask`` is True (every row when None, |R| counted over the whole batch),
    ``w = row_weight`` (ones when None) and ``dist`` the sum over the N keys of squared
    differences (``"l2"``) or absolute differences (``"l1"``). No row in R gives 0.

    Args:
        q_s, k_s: (B, N, Ds) student; q_t, k_t: (B, N, Dt) teacher (Dt may differ from Ds).
        row_weight: (B, N) floating or None; receives a gradient.
        row_mask: (B, N) bool or None (True = the row is in the loss, e.g. a hole pixel).

    Returns:
        A 0-d tensor: float32 for 16-bit inputs, float64 for float64 inputs. Gradients flow to
        q_s, k_s and row_weight; the teacher's inputs are treated as constants (detached).

    Memory: the kernels compute every row's distance in blocks from the two rows' log-sum-exps
    and never hold an N x N tensor; saved for backward: the inputs and three (B, N) row
    statistics. The sign in l1's gradient is that of float32 r_s - r_t (0 at ties).
    """
    _check_tensors((("q_s", q_s), ("k_s", k_s), ("q_t", q_t), ("k_t", k_t)))
    B, N, Ds = q_s.shape
    _check_shape_of("k_s", k_s, "q_s", q_s)
    _check_rows("q_t", q_t, B, N, "Dt")
    _check_shape_of("k_t", k_t, "q_t", q_t)
    _check_same("q_s", q_s, (("k_s", k_s), ("q_t", q_t), ("k_t", k_t)))
    _check_row_tensor(row_weight, "row_weight", B, N, q_s, boolean=False)
    _check_row_tensor(row_mask, "row_mask", B, N, q_s, boolean=True)
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {sorted(DISTANCES)}, got {distance!r}")
    scale = _check_scale(scale, allow_none=False)
    q_t, k_t = q_t.detach(), k_t.detach()
    backend = LOSS_OP.select(q_s, "q_s")
    if backend == "reference":
        return reference.attention_transfer_loss(q_s, k_s, q_t, k_t, row_weight, row_mask, distance, scale)
    q_s, k_s, q_t, k_t = autocast_cast(q_s, k_s, q_t, k_t)
    code = DISTANCES[distance]
    if backend == "triton":
        from .triton import MAX_QK

        if max(Ds, q_t.shape[2]) > MAX_QK:
            raise ValueError(f"the triton backend takes q/k channels <= {MAX_QK}, got Ds={Ds}, Dt={q_t.shape[2]}")
    dist = LOSS_FORWARD(backend, q_s, k_s, q_t, k_t, scale, code)[0]
    return reference.reduce_rows(dist, row_weight, row_mask)
