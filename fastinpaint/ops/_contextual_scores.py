"""A model's helper kernel, not a public op (no autograd: inference only): the fused, masked
and scaled scores of one tile of the blocked contextual attention
(:func:`fastinpaint.models.contextual_attention.contextual_attention_blocked`, "Blocked form"
in its module doc), for calls without gradients.

The tile's scores against every key are the sum, over the nine fuse shifts, of rows of the
raw scores ``t`` shifted along the keys. The reference backend is the module's own loop:
per shift, slices of ``t`` added to the whole tile (a pass over the tile per shift), then
the masking and the scale. The ``cpu`` backend (csrc/cpu/contextual_attention.cpp) builds
each output row in one pass while its nine source rows are in cache, the masking and the
scale on the way out. With gradients the module keeps the differentiable loop.
"""

from __future__ import annotations

import torch

from .. import _backend
from ._registry import Op, kernel

_SCHEMA = ("(Tensor t, Tensor rows, Tensor offs, Tensor spans, Tensor wrap_ptr, Tensor wrap_dst, Tensor wrap_src, "
           "Tensor valid, float scale, int masking) -> Tensor")


def _fuse_fake(t, rows, offs, spans, wrap_ptr, wrap_dst, wrap_src, valid, scale, masking):
    return t.new_empty((t.shape[0], rows.shape[1], t.shape[2]))


FUSE_SCORES = kernel("contextual_fuse_scores", _SCHEMA, _fuse_fake)

SCORES_OP = Op("contextual_attention_scores", {
    "reference": "per fuse shift, slices of the raw scores added to the whole tile, then the masking (models/"
                 "contextual_attention.py)",
    "cpu": "without gradients, float32/float64: each fused row built in one pass from its nine source rows, "
           "masked and scaled on the way out (csrc/cpu/contextual_attention.cpp)",
}, kernels=(FUSE_SCORES,), cpp_backends=("cpu",))

MASKING_CODES = {"official": 0, "exclude": 1}


def key_plan_tensors(key_plan):
    """The kernel's description of the keys' shifts from the module's ``key_plan`` (per shift
    ``(off, a, b, dst, src)``): ``(offs, spans, wrap_ptr, wrap_dst, wrap_src)``."""
    offs = torch.tensor([p[0] for p in key_plan], dtype=torch.long)
    spans = torch.tensor([[p[1], p[2]] for p in key_plan], dtype=torch.long)
    wrap_ptr = torch.cumsum(torch.tensor([0] + [p[3].shape[0] for p in key_plan], dtype=torch.long), 0)
    wrap_dst = torch.cat([p[3].cpu().long() for p in key_plan])
    wrap_src = torch.cat([p[4].cpu().long() for p in key_plan])
    return offs, spans, wrap_ptr, wrap_dst, wrap_src


def fused_scores(t: torch.Tensor, row_shift: torch.Tensor, key_plan, valid: torch.Tensor, scale: float,
                 masking: str) -> torch.Tensor:
    """(B, |J|, L) masked, scaled fused scores from the raw scores ``t`` (B, |N|, L) by the C++
    kernel (the caller checks :func:`cpp_applies`): ``row_shift`` (S, |J|) the row of ``t``
    holding each shifted query (negative, or the row count, where the shift leaves the map),
    ``key_plan`` from :func:`key_plan_tensors` (wrapped keys with a negative source: no term)."""
    return FUSE_SCORES("cpu", t, row_shift.long().contiguous(), *key_plan, valid, float(scale),
                       MASKING_CODES[masking])


def cpp_applies(x: torch.Tensor, grad: bool, traced: bool = False) -> bool:
    """Whether the C++ kernel computes the tiles of features ``x``: CPU, float32/float64, no
    gradient (``grad``), and the backend rules (``use_backend``, FASTINPAINT_BACKEND) select
    ``cpu``. A model run with another backend forced (``triton`` for its other layers, say)
    keeps the module's loop here: this step has no other backend. ``traced``: asked while
    torch.compile traces (the module's choice of its opaque blocked op; otherwise a traced call
    says no)."""
    if grad or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return False
    if (torch.compiler.is_compiling() and not traced) or _backend.requested() not in ("auto", "cpu"):
        return False
    return SCORES_OP.select(x, "x") == "cpu"
