"""Self-similarity maps and the spatially-correlative distance: argument checks, query
sampling, autograd wiring, torch.library registration and dispatch to a backend.

Every backend but ``reference`` splits the work in two:

1. the centring and normalisation of the features, in torch ops, into ``g`` of shape
   (B, H, W, C) (``_NormalizeToBHWC``: saves only ``g`` and the norms; its backward updates
   one temporary in place): contiguous, except for the C++ CPU kernels' float32 windows at
   least 8 wide, which take the features' own order (NCHW features: a permuted view of a
   (B, C, H, W) tensor, which they read as it is and whose layout their gradients keep);
2. a kernel on ``g``:
   * ``self_similarity_forward``: the (B, Q, N) maps; backward ``self_similarity_backward``
     (saves ``g`` and the index; the output too when ``normalize=False``, for tanh's
     derivative);
   * ``spatial_correlative_distance_forward``: both maps' rows computed and compared in
     registers / a per-row buffer, never written: returns the per-row terms (B, Q) and
     four per-row statistics (threshold, <S', T'>, |S'|^2, |T'|^2), float32 (float64 for
     float64 input). Backward recomputes the rows from the saved ``g`` of both images.

Paths per backend:
  reference  eager: one bmm per image against the whole map, gather of the windows (reference.py)
  cpu        C++ kernels of fastinpaint._C (csrc/cpu/self_similarity.cpp)
  cuda       C++/CUDA kernels of fastinpaint._C (csrc/cuda/self_similarity.cu)
  triton     Triton kernels (triton.py)
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch

from .._common import acc_dtype, check_float_tensor
from .._registry import Op, differentiable, kernel
from . import reference
from .reference import DENSE_ZERO, MODE_CODES, WINDOW_CODES, window_shape

_TRITON_MAX_FUSED_ENTRIES = 4096  # triton.MAX_FUSED_ENTRIES (not imported here: triton may be missing)


# ----------------------------------------------------------------------------- shapes

def _entries(g: torch.Tensor, patch_size: int, window: int) -> int:
    kh, kw, _ = window_shape(g.shape[1], g.shape[2], patch_size, "clamp" if window == 0 else "zero")
    return kh * kw



def _maps_fake(g, index, patch_size, window, squash):
    return g.new_empty((g.shape[0], index.shape[0], _entries(g, patch_size, window)))


def _distance_fake(g_src, g_tgt, index, patch_size, window, squash, mode):
    acc = acc_dtype(g_src.dtype)
    B, Q = g_src.shape[0], index.shape[0]
    return g_src.new_empty((B, Q), dtype=acc), g_src.new_empty((B, Q, 4), dtype=acc)


def _channel_major(g: torch.Tensor) -> bool:
    """g (B, H, W, C) is a permuted view of a contiguous (B, C, H, W) tensor."""
    return not g.is_contiguous() and g.permute(0, 3, 1, 2).is_contiguous()


def _gradient_like(g: torch.Tensor) -> torch.Tensor:
    """The layout the backward kernels give dg: the C++ CPU kernels keep a channel-major g's
    layout (csrc/cpu/self_similarity.cpp, new_gradient); everything else is (B, H, W, C)
    contiguous."""
    if g.device.type == "cpu" and _channel_major(g):
        return g.new_empty((g.shape[0], g.shape[3], g.shape[1], g.shape[2])).permute(0, 2, 3, 1)
    return torch.empty_like(g, memory_format=torch.contiguous_format)


def _maps_backward_fake(grad, g, index, patch_size, window):
    return _gradient_like(g)


def _distance_backward_fake(grad_rows, g_src, g_tgt, index, stats, patch_size, window, squash, mode):
    return _gradient_like(g_src), _gradient_like(g_tgt)


# g = normalised features (B, H, W, C), index = flat query positions (Q,) int64
MAPS_FORWARD = kernel("self_similarity_forward",
                      "(Tensor g, Tensor index, int patch_size, int window, bool squash) -> Tensor",
                      _maps_fake, triton="maps_forward")
MAPS_BACKWARD = kernel("self_similarity_backward",
                       "(Tensor grad, Tensor g, Tensor index, int patch_size, int window) -> Tensor",
                       _maps_backward_fake, triton="maps_backward")
DISTANCE_FORWARD = kernel("spatial_correlative_distance_forward",
                          "(Tensor g_src, Tensor g_tgt, Tensor index, int patch_size, int window, bool squash, "
                          "int mode) -> (Tensor, Tensor)",
                          _distance_fake, triton="distance_forward")
DISTANCE_BACKWARD = kernel("spatial_correlative_distance_backward",
                           "(Tensor grad_rows, Tensor g_src, Tensor g_tgt, Tensor index, Tensor stats, int patch_size, "
                           "int window, bool squash, int mode) -> (Tensor, Tensor)",
                           _distance_backward_fake, triton="distance_backward")

_KERNEL_BACKENDS = {
    "triton": "the normalisation in torch ops, then Triton kernels on the normalised features",
    "cuda": "the normalisation in torch ops, then fastinpaint's CUDA kernels (csrc/cuda/self_similarity.cu)",
    "cpu": "the normalisation in torch ops, then fastinpaint's C++ kernels (csrc/cpu/self_similarity.cpp)",
}
MAPS_OP = Op("self_similarity", {
    "reference": "eager: one bmm per image against the whole map, then a gather of the windows (reference.py)",
    **_KERNEL_BACKENDS}, kernels=(MAPS_FORWARD, MAPS_BACKWARD))
DISTANCE_OP = Op("spatial_correlative_distance", {
    "reference": "eager: both maps written, then compared (reference.py)",
    **_KERNEL_BACKENDS}, kernels=(DISTANCE_FORWARD, DISTANCE_BACKWARD))


# ----------------------------------------------------------------------------- autograd

def _core_differentiable(g, index, patch_size, window, squash):
    """The maps from g (B, H, W, C) in torch ops: the double-backward path."""
    feat = g.permute(0, 3, 1, 2)
    B, C, H, W = feat.shape
    flat = feat.flatten(2)
    full = torch.bmm(flat[:, :, index].transpose(1, 2), flat)
    name = "clamp" if window == 0 else "zero"
    pos, valid = reference.window_positions(index, H, W, patch_size, name)
    sim = torch.where(valid, full.gather(2, pos.unsqueeze(0).expand(B, -1, -1)), full.new_zeros(()))
    return torch.tanh(sim / reference.TANH_SCALE) if squash else sim


def _maps_setup_context(ctx, inputs, output):
    g, index, patch_size, window, squash = inputs
    ctx.save_for_backward(g, index, output if squash else None)
    ctx.args = (patch_size, window, squash)


def _maps_backward(ctx, backward_kernel, grad):
    g, index, out = ctx.saved_tensors
    patch_size, window, squash = ctx.args
    if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
        _, vjp = torch.func.vjp(lambda x: _core_differentiable(x, index, patch_size, window, squash), g)
        return vjp(grad)[0], None, None, None, None
    if squash:
        grad = grad * (1 - out.float() * out.float()).to(grad.dtype) / reference.TANH_SCALE
    return backward_kernel(grad.contiguous(), g, index, patch_size, window), None, None, None, None


def _distance_setup_context(ctx, inputs, output):
    g_src, g_tgt, index, patch_size, window, squash, mode = inputs
    rows, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(g_src, g_tgt, index, stats)
    ctx.args = (patch_size, window, squash, mode)


def _distance_backward(ctx, backward_kernel, grad_rows, grad_stats):
    g_src, g_tgt, index, stats = ctx.saved_tensors
    patch_size, window, squash, mode = ctx.args
    if grad_rows is None:
        grad_rows = torch.zeros_like(stats[..., 0])
    if torch.is_grad_enabled():
        raise RuntimeError("spatial_correlative_distance: double backward is not supported by the fused "
                           "kernels; use the reference backend")
    d_src, d_tgt = backward_kernel(grad_rows.contiguous(), g_src, g_tgt, index, stats, patch_size, window, squash,
                                   mode)
    return d_src, d_tgt, None, None, None, None, None


differentiable(MAPS_FORWARD, MAPS_BACKWARD, _maps_setup_context, _maps_backward)
differentiable(DISTANCE_FORWARD, DISTANCE_BACKWARD, _distance_setup_context, _distance_backward)


# ----------------------------------------------------------------------------- argument checks

def _check_features(t, name: str) -> None:
    check_float_tensor(t, name, 4, "(B, C, H, W)")
    if min(t.shape[1:]) <= 0:
        raise ValueError(f"{name} must have positive channels, height and width, got shape {tuple(t.shape)}")


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def _check_window(window) -> int:
    if window not in WINDOW_CODES:
        raise ValueError(f"window must be one of {sorted(WINDOW_CODES)}, got {window!r}")
    return WINDOW_CODES[window]


def sample_query_index(height: int, width: int, num_queries: int = 256,
                       generator: Optional[torch.Generator] = None,
                       device: Optional[Union[torch.device, str]] = None) -> torch.Tensor:
    """``min(num_queries, height*width)`` distinct flat positions drawn at random (a
    ``randperm`` on the CPU, from ``generator`` or the global RNG, so a draw is the same on
    every device), as int64 on ``device``. Pass the result as ``query_index`` to use the
    same queries for several images."""
    height, width = _check_int(height, "height", 1), _check_int(width, "width", 1)
    num_queries = _check_int(num_queries, "num_queries", 1)
    perm = torch.randperm(height * width, generator=generator, device="cpu")
    return perm[:min(num_queries, height * width)].to(device or "cpu")


def _resolve_index(query_index, height, width, num_queries, generator, device) -> torch.Tensor:
    hw = height * width
    if query_index is None:
        return sample_query_index(height, width, num_queries, generator, device)
    if isinstance(query_index, str):
        if query_index != "all":
            raise ValueError(f"query_index must be None, 'all' or a tensor of flat positions, got {query_index!r}")
        return torch.arange(hw, device=device)
    if not isinstance(query_index, torch.Tensor):
        raise TypeError(f"query_index must be None, 'all' or an int64 tensor, got {type(query_index).__name__}")
    if query_index.dtype.is_floating_point or query_index.dtype.is_complex or query_index.dtype == torch.bool:
        raise TypeError(f"query_index must be an integer tensor, got {query_index.dtype}")
    if query_index.dim() != 1 or query_index.numel() == 0:
        raise ValueError(f"query_index must be 1-D and non-empty, got shape {tuple(query_index.shape)}")
    if query_index.device != torch.device(device):
        raise ValueError(f"query_index is on {query_index.device} but the features are on {device}")
    if not torch.compiler.is_compiling():
        lo, hi = int(query_index.min()), int(query_index.max())
        if lo < 0 or hi >= hw:
            raise ValueError(f"query_index must lie in [0, H*W) = [0, {hw}), got values in [{lo}, {hi}]")
    return query_index.long().contiguous()


class _NormalizeToBHWC(torch.autograd.Function):
    """Centring + normalisation into (B, H, W, C) form, saving only its output and the
    (B, H, W, 1) norms for backward (autograd of the eager formulation also keeps the
    centred features); the input is saved too (no copy: it lives anyway), for double
    backward, which differentiates the eager formulation.

    ``contiguous``: the result (B, H, W, C) contiguous, the layout the Triton and CUDA
    kernels read, and the C++ CPU kernels' loops over channels. Else (the C++ CPU kernels'
    float32 rows by positions, which read any layout) it keeps the features' own order: NCHW
    features give a permuted view of a (B, C, H, W) tensor, and no transposition happens in
    forward, in the kernels or in backward, whose gradient comes back in the features'
    layout."""

    @staticmethod
    def forward(ctx, feat, normalize, contiguous=True):
        x = (feat - feat.mean(dim=(-2, -1), keepdim=True)).permute(0, 2, 3, 1)
        if contiguous or not (x.is_contiguous() or _channel_major(x)):
            x = x.contiguous()
        if normalize:
            norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(1e-12)
            g = x.div_(norm)
        else:
            norm = None
            g = x.mul_(1.0 / math.sqrt(feat.shape[1]))
        ctx.save_for_backward(feat, g, norm)
        ctx.normalize = normalize
        ctx.channels = feat.shape[1]
        return g

    @staticmethod
    def backward(ctx, dg):
        feat, g, norm = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the eager formulation
            with torch.enable_grad():
                y = reference.normalize_features(feat, ctx.normalize).permute(0, 2, 3, 1)
                (df,) = torch.autograd.grad(y, feat, dg, create_graph=True)
            return df, None, None
        # dx in dg's layout, updated in place
        if ctx.normalize:
            # y = x / max(|x|, eps): dx = (dy - y <y, dy> [|x| > eps]) / max(|x|, eps)
            radial = torch.linalg.vecdot(g, dg, dim=-1).unsqueeze(-1)
            radial = radial * (norm > 1e-12).to(radial.dtype) / norm
            dx = dg / norm
            dx.addcmul_(g, radial, value=-1)
        else:
            dx = dg / math.sqrt(ctx.channels)
        dx.sub_(dx.mean(dim=(1, 2), keepdim=True))
        return dx.permute(0, 3, 1, 2), None, None


# The C++ CPU kernels read float32 windows at least this wide by positions, from a
# channel-major copy (csrc/cpu/self_similarity.cpp, kCmMinWidth), narrower ones by channels
# from (B, H, W, C) order.
_CPU_BY_POSITION_MIN_WIDTH = 8


def _normalized(feat: torch.Tensor, normalize: bool, backend: str, window_width: int) -> torch.Tensor:
    """(B, H, W, C) normalised features: contiguous, except for the C++ CPU kernels' float32
    windows read by positions, which take the features' own order."""
    keep_order = backend == "cpu" and feat.dtype == torch.float32 and window_width >= _CPU_BY_POSITION_MIN_WIDTH
    return _NormalizeToBHWC.apply(feat, bool(normalize), not keep_order)


# ----------------------------------------------------------------------------- public functions

def self_similarity(feat: torch.Tensor, query_index=None, num_queries: int = 256, patch_size: int = 32,
                    window: str = "clamp", normalize: bool = True,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Self-similarity maps of F-LSeSim: each query position's similarity with every
    position of its K x K window, on centred, normalised features.

    Args:
        feat: (B, C, H, W) float16/bfloat16/float32/float64, NCHW, channels_last or strided.
        query_index: None (draw ``num_queries`` positions with :func:`sample_query_index`),
            an integer tensor (Q,) of flat positions ``row * W + col`` on feat's device, or
            ``"all"`` for the dense form (every position a query: a local correlation /
            cost volume, Q = H*W).
        num_queries: queries drawn when ``query_index`` is None (clamped to H*W).
        patch_size: K >= 1.
        window: ``"clamp"`` (window shifted to stay inside the map; the whole map when
            K >= H or K >= W, as in the public code) or ``"zero"`` (centred at the query,
            positions outside the map give 0).
        normalize: L2-normalise over channels (else divide by sqrt(C) and take tanh(s / 10)).
        generator: the torch.Generator for the query draw.

    Returns:
        (B, Q, N) in feat's dtype, N = K*K (H*W for a whole-map window); entry
        ``i * kw + k`` is window position (r0 + i, c0 + k).

    Memory saved for backward (kernel backends): the normalised features (B, H, W, C), their
    (B, H, W) norms and the index (plus the output with ``normalize=False``); the reference's
    eager graph also keeps the centred features and the (B, Q, H*W) full similarity matrix.
    Kernels accumulate in float32 (float64 for float64).

    Under ``torch.compile(fullgraph=True)`` pass ``query_index`` (a tensor or "all"): the
    random draw is a graph break.
    """
    _check_features(feat, "feat")
    patch_size = _check_int(patch_size, "patch_size", 1)
    code = _check_window(window)
    B, C, H, W = feat.shape
    index = _resolve_index(query_index, H, W, num_queries, generator, feat.device)
    backend = MAPS_OP.select(feat, "feat")
    if backend == "reference":
        return reference.self_similarity(feat, index, patch_size, window, bool(normalize))
    g = _normalized(feat, bool(normalize), backend, window_shape(H, W, patch_size, window)[1])
    squash = not normalize
    if isinstance(query_index, str) and code == WINDOW_CODES["zero"]:
        # every position a query, in order (DENSE_ZERO): the triton and cuda backwards gather each
        # position's K*K queries instead of looping over all of them
        code = DENSE_ZERO
    return MAPS_FORWARD(backend, g, index, patch_size, code, squash)


def spatial_correlative_distance(f_src: torch.Tensor, f_tgt: torch.Tensor, query_index=None,
                                 num_queries: int = 256, patch_size: int = 32, mode: str = "cos",
                                 window: str = "clamp", normalize: bool = True,
                                 f_other: Optional[torch.Tensor] = None, temperature: float = 0.1,
                                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The spatially-correlative distance between the self-similarity maps of ``f_src`` and
    ``f_tgt`` (same queries for both), as a scalar in the features' dtype.

    ``mode="l1"`` / ``"cos"``: top-quarter selection on the target's rows (entries of T below
    the value at 0-based index N//4 of the row's descending sort are zeroed in both maps),
    then ``mean(|(N/num)(S' - T')|)`` over all entries or ``mean(1 - cos(S'_row, T'_row))``
    (num = N // 4; N >= 4 needed). The kernel backends compute both maps' rows and the
    distance in one pass without writing the maps (float32 accumulation); backward
    recomputes them from the normalised features saved for it (B, H, W, C per image) and
    uses two transient (B, Q, N) float32 coefficient buffers.

    ``mode="info"``: the patchwise InfoNCE loss against ``f_other`` (required) at
    ``temperature``, through :func:`self_similarity` for the three maps.

    Other arguments as :func:`self_similarity`.
    """
    _check_features(f_src, "f_src")
    _check_features(f_tgt, "f_tgt")
    if f_src.shape != f_tgt.shape:
        raise ValueError(f"f_src and f_tgt must have the same shape, got {tuple(f_src.shape)} and "
                         f"{tuple(f_tgt.shape)}")
    if f_src.device != f_tgt.device:
        raise ValueError(f"f_tgt is on {f_tgt.device} but f_src is on {f_src.device}")
    if f_src.dtype != f_tgt.dtype:
        raise TypeError(f"f_tgt has dtype {f_tgt.dtype} but f_src has {f_src.dtype}")
    patch_size = _check_int(patch_size, "patch_size", 1)
    code = _check_window(window)
    if mode not in ("l1", "cos", "info"):
        raise ValueError(f"mode must be 'l1', 'cos' or 'info', got {mode!r}")
    B, C, H, W = f_src.shape
    index = _resolve_index(query_index, H, W, num_queries, generator, f_src.device)
    if mode == "info":
        if f_other is None:
            raise ValueError("mode='info' needs f_other (the features of a third image)")
        _check_features(f_other, "f_other")
        if f_other.shape != f_src.shape:
            raise ValueError(f"f_other must have the shape of f_src {tuple(f_src.shape)}, got {tuple(f_other.shape)}")
        maps = [self_similarity(f, index, patch_size=patch_size, window=window, normalize=normalize)
                for f in (f_src, f_tgt, f_other)]
        return reference.info_nce(*maps, temperature=temperature)
    kh, kw, _ = window_shape(H, W, patch_size, window)
    n = kh * kw
    num = n // 4
    if num == 0:
        raise ValueError(f"patch_size {patch_size} gives {n} entries per map row; the {mode} distance needs at "
                         "least 4 (patch_size >= 2 and a map of at least 2 x 2)")
    backend = DISTANCE_OP.select(f_src, "f_src")
    if backend == "reference":
        return reference.spatial_correlative_distance(f_src, f_tgt, index, patch_size, mode, window, bool(normalize))
    gs, gt = (_normalized(f, bool(normalize), backend, kw) for f in (f_src, f_tgt))
    args = (gs, gt, index, patch_size, code, not normalize, MODE_CODES[mode])
    if backend == "triton" and n > _TRITON_MAX_FUSED_ENTRIES:
        # a row does not fit in one program's registers: the maps op, then the eager comparison
        maps = [MAPS_FORWARD(backend, g, index, patch_size, code, not normalize) for g in (gs, gt)]
        return reference.compare_maps(*maps, mode).to(f_src.dtype)
    rows, _ = DISTANCE_FORWARD(backend, *args)
    if mode == "l1":
        loss = rows.sum() * ((n / num) / (B * index.shape[0] * n))
    else:
        loss = rows.mean()
    return loss.to(f_src.dtype)
