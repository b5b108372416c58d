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

from ... import _backend, _extension
from .._common import FLOAT_DTYPES, autocast_cast, check_float_tensor, check_same_device, check_same_dtype
from . import reference
from .reference import DISTANCES

ATTN_OP = "pixel_attention"
ATTN_IMPLEMENTED = ("reference", "triton", "cuda", "cpu")
LOSS_OP = "attention_transfer_loss"
LOSS_IMPLEMENTED = ("reference", "triton", "cpu")


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- fake kernels (shared)

def _attn_fwd_fake(q, k, v, key_mask, scale):
    B, N, _ = q.shape
    return q.new_empty((B, N, v.shape[2])), q.new_empty((B, N), dtype=_acc_dtype(q.dtype))


def _attn_bwd_fake(grad_out, q, k, v, key_mask, out, lse, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format), \
        torch.empty_like(v, memory_format=torch.contiguous_format)


def _loss_fwd_fake(q_s, k_s, q_t, k_t, scale, distance):
    B, N, _ = q_s.shape
    return tuple(q_s.new_empty((B, N), dtype=_acc_dtype(q_s.dtype)) for _ in range(4))


def _loss_bwd_fake(grad_dist, q_s, k_s, q_t, k_t, lse_s, lse_t, crow, scale, distance):
    return torch.empty_like(q_s, memory_format=torch.contiguous_format), \
        torch.empty_like(k_s, memory_format=torch.contiguous_format)


def _attn_setup_context(ctx, inputs, output):
    q, k, v, key_mask, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, key_mask, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _loss_setup_context(ctx, inputs, output):
    q_s, k_s, q_t, k_t, scale, distance = inputs
    dist, lse_s, lse_t, crow = output
    ctx.save_for_backward(q_s, k_s, q_t, k_t, lse_s, lse_t, crow)
    ctx.scale, ctx.distance = scale, distance
    ctx.mark_non_differentiable(lse_s, lse_t, crow)


# ----------------------------------------------------------------------------- C++ ops (cpu)

def _register_cpp_ops() -> None:
    torch.library.register_fake("fastinpaint::pixel_attention_forward")(_attn_fwd_fake)
    torch.library.register_fake("fastinpaint::pixel_attention_backward")(_attn_bwd_fake)
    torch.library.register_fake("fastinpaint::attention_transfer_forward")(_loss_fwd_fake)
    torch.library.register_fake("fastinpaint::attention_transfer_backward")(_loss_bwd_fake)

    def attn_backward(ctx, grad_out, grad_lse):
        q, k, v, key_mask, out, lse = ctx.saved_tensors
        if grad_out is None:
            return None, None, None, None, None
        dq, dk, dv = torch.ops.fastinpaint.pixel_attention_backward(
            grad_out, q, k, v, key_mask, out, lse, ctx.scale)
        return dq, dk, dv, None, None

    def loss_backward(ctx, grad_dist, *_):
        q_s, k_s, q_t, k_t, lse_s, lse_t, crow = ctx.saved_tensors
        if grad_dist is None:
            return (None,) * 6
        dq, dk = torch.ops.fastinpaint.attention_transfer_backward(
            grad_dist, q_s, k_s, q_t, k_t, lse_s, lse_t, crow, ctx.scale, ctx.distance)
        return dq, dk, None, None, None, None

    torch.library.register_autograd("fastinpaint::pixel_attention_forward", attn_backward,
                                    setup_context=_attn_setup_context)
    torch.library.register_autograd("fastinpaint::attention_transfer_forward", loss_backward,
                                    setup_context=_loss_setup_context)


def _cpp_has_ops() -> bool:
    try:
        torch.ops.fastinpaint.pixel_attention_forward.default
    except (AttributeError, RuntimeError):
        return False
    return True


def _register_cpp_if_present() -> None:
    # An extension built before these ops existed lacks them: the cpu backend then reports
    # itself unavailable for them instead of failing at import.
    if _cpp_has_ops():
        _register_cpp_ops()


_extension.on_load(_register_cpp_if_present)


# ----------------------------------------------------------------------------- Triton ops

@torch.library.custom_op("fastinpaint::pixel_attention_triton", mutates_args=())
def pixel_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor],
                           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    from . import triton as kernels

    return kernels.attention_forward(q, k, v, key_mask, scale)


pixel_attention_triton.register_fake(_attn_fwd_fake)


@torch.library.custom_op("fastinpaint::pixel_attention_backward_triton", mutates_args=())
def pixel_attention_backward_triton(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                    key_mask: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor,
                                    scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from . import triton as kernels

    return kernels.attention_backward(grad_out, q, k, v, key_mask, out, lse, scale)


pixel_attention_backward_triton.register_fake(_attn_bwd_fake)


def _attn_triton_backward(ctx, grad_out, grad_lse):
    q, k, v, key_mask, out, lse = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None, None
    dq, dk, dv = pixel_attention_backward_triton(grad_out, q, k, v, key_mask, out, lse, ctx.scale)
    return dq, dk, dv, None, None


pixel_attention_triton.register_autograd(_attn_triton_backward, setup_context=_attn_setup_context)


@torch.library.custom_op("fastinpaint::attention_transfer_triton", mutates_args=())
def attention_transfer_triton(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
                              scale: float, distance: int
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from . import triton as kernels

    return kernels.transfer_forward(q_s, k_s, q_t, k_t, scale, distance)


attention_transfer_triton.register_fake(_loss_fwd_fake)


@torch.library.custom_op("fastinpaint::attention_transfer_backward_triton", mutates_args=())
def attention_transfer_backward_triton(grad_dist: torch.Tensor, q_s: torch.Tensor, k_s: torch.Tensor,
                                       q_t: torch.Tensor, k_t: torch.Tensor, lse_s: torch.Tensor,
                                       lse_t: torch.Tensor, crow: torch.Tensor, scale: float,
                                       distance: int) -> tuple[torch.Tensor, torch.Tensor]:
    from . import triton as kernels

    return kernels.transfer_backward(grad_dist, q_s, k_s, q_t, k_t, lse_s, lse_t, crow, scale, distance)


attention_transfer_backward_triton.register_fake(_loss_bwd_fake)


def _loss_triton_backward(ctx, grad_dist, *_):
    q_s, k_s, q_t, k_t, lse_s, lse_t, crow = ctx.saved_tensors
    if grad_dist is None:
        return (None,) * 6
    dq, dk = attention_transfer_backward_triton(grad_dist, q_s, k_s, q_t, k_t, lse_s, lse_t, crow,
                                                ctx.scale, ctx.distance)
    return dq, dk, None, None, None, None


attention_transfer_triton.register_autograd(_loss_triton_backward, setup_context=_loss_setup_context)


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
    backend = _backend.select(ATTN_OP, ATTN_IMPLEMENTED, q.device)
    if backend == "reference":
        return reference.pixel_attention(q, k, v, key_mask, scale)
    q, k, v = autocast_cast(q, k, v)
    if backend == "cuda":
        return _sdpa(q, k, v, key_mask, scale)
    if backend == "triton":
        if q.dtype == torch.float64:
            raise TypeError("q is float64, which the triton backend does not take (float16, bfloat16, float32); "
                            "use the reference or cpu backend for float64")
        from .triton import MAX_QK, MAX_V

        if Dqk > MAX_QK:
            raise ValueError(f"the triton backend takes Dqk <= {MAX_QK}, got q with Dqk={Dqk}")
        if v.shape[2] > MAX_V and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise ValueError(f"the triton backend's backward takes Dv <= {MAX_V}, got v with Dv={v.shape[2]}")
        return pixel_attention_triton(q, k, v, key_mask, scale)[0]
    if not _cpp_has_ops():
        raise _backend.BackendUnavailableError(
            "pixel_attention: the loaded fastinpaint._C predates this op; rebuild the extension")
    return torch.ops.fastinpaint.pixel_attention_forward(q, k, v, key_mask, scale)[0]


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
    backend = _backend.select(LOSS_OP, LOSS_IMPLEMENTED, q_s.device)
    if backend == "reference":
        return reference.attention_transfer_loss(q_s, k_s, q_t, k_t, row_weight, row_mask, distance, scale)
    q_s, k_s, q_t, k_t = autocast_cast(q_s, k_s, q_t, k_t)
    code = DISTANCES[distance]
    if backend == "triton":
        if q_s.dtype == torch.float64:
            raise TypeError("q_s is float64, which the triton backend does not take (float16, bfloat16, float32); "
                            "use the reference or cpu backend for float64")
        from .triton import MAX_QK

        if max(Ds, q_t.shape[2]) > MAX_QK:
            raise ValueError(f"the triton backend takes q/k channels <= {MAX_QK}, got Ds={Ds}, Dt={q_t.shape[2]}")
        dist = attention_transfer_triton(q_s, k_s, q_t, k_t, scale, code)[0]
    else:
        if not _cpp_has_ops():
            raise _backend.BackendUnavailableError(
                "attention_transfer_loss: the loaded fastinpaint._C predates this op; rebuild the extension")
        dist = torch.ops.fastinpaint.attention_transfer_forward(q_s, k_s, q_t, k_t, scale, code)[0]
    return reference.reduce_rows(dist, row_weight, row_mask)
