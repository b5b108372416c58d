"""Spectral-normalised convolution (Miyato et al., ICLR 2018; the SN-PatchGAN discriminator of
DeepFill v2): argument checks, the power iteration, autograd and dispatch.

``torch.nn.utils.parametrizations.spectral_norm`` divides the whole weight by sigma in every
forward and differentiates through that division: in a profile of DeepFill v2's discriminator
(CPU, 128x128 images) these weight-sized passes took about as long as the convolutions. Since
the convolution is linear in its weight, ``conv(x, W / sigma) = conv(x, W) / sigma``, and the
gradient needs no weight-sized pass but one rank-1 update:

    y      = conv(x, W) / sigma + b                    sigma = u . (W v), u and v constants
    gx     = conv_input_grad(gy / sigma, W)
    gW     = conv_weight_grad(x, gy / sigma) + gsigma u v^T
    gsigma = -sum(gy * conv(x, W)) / sigma^2 = -<W, conv_weight_grad(x, gy / sigma)> / sigma

(the last step by the same linearity: ``sum(gy * conv(x, W)) = <W, conv_weight_grad(x, gy)>``).

Paths per backend:
  reference  W / sigma, then conv2d (:func:`reference_conv2d`): what the parametrization computes
  cpu, cuda  the folded form above where the output is at most a quarter of the weight
             (:func:`folds`; a discriminator's deeper layers), one autograd node over torch's
             convolution and its backward (oneDNN / cuDNN), no C++ kernel of its own; the
             reference elsewhere (on the cpu with ops/_cpu_conv.py's convolution: channels-last
             inside an NCHW layer, fastinpaint's input gradient for an input of few channels)

The fold runs in float32 and float64; under autocast, or for float16 / bfloat16 tensors, the
reference runs (1/sigma rounded to 16 bits would scale a whole layer by one rounding error, and
the raw output, sigma times the normalised one, could overflow float16). The power iteration
runs in the weight's dtype outside autocast (torch's runs its products in float16 under CUDA
autocast). A double backward (``create_graph``, e.g. a gradient penalty) differentiates the
reference formula, recomputed inside the backward.

Not an op folder (``ops/<op>/``): it has no kernel of its own, Triton or C++, only two
torch.library ops over torch's convolution (so that torch.compile calls them as they are, as
``gated_conv/upsample.py``'s phase ops). ``nn.SpectralNormConv2d`` is the module;
``models/spectral_norm_conv_bench.py`` times it on SN-PatchGAN's layers.
"""

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from . import _cpu_conv
from ._common import check_float_tensor, check_same_device, conv_output_size, pair
from ._layout import conv_output_format, is_channels_last
from ._registry import Op, call

OP = Op("spectral_norm_conv2d", {
    "reference": "the weight divided by sigma, then conv2d, as torch.nn.utils.parametrizations.spectral_norm "
                 "(ops/_spectral_norm.py)",
    "cpu": "where the output is at most a quarter of the weight, conv2d on the raw weight, its output scaled by "
           "1/sigma: one autograd node, no weight-sized pass but a rank-1 update of the weight's gradient "
           "(oneDNN convolutions; the forward channels-last inside an NCHW layer of 256 channels or more whose "
           "input is not small against the weight); the reference elsewhere, its "
           "convolution channels-last inside on NCHW maps, with fastinpaint's input gradient for inputs of few "
           "channels and weight gradient for strided layers (ops/_cpu_conv.py)",
    "cuda": "the same folded form on cuDNN's convolutions; the reference elsewhere",
}, cpp_backends=())


# ----------------------------------------------------------------------------- reference

def _reference_sigma(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``u . (W v)`` with the weight flattened to (Cout, rest): the spectral-norm estimate."""
    return torch.vdot(u, torch.mv(weight.flatten(1), v))


def reference_conv2d(x, weight, bias, u, v, stride=1, padding=0, dilation=1, groups=1, conv=F.conv2d):
    """What the parametrization computes: ``conv2d(x, W / sigma, b)`` (the reference backend; the
    ``cpu`` backend's where it does not fold, with ``conv`` its convolution)."""
    return conv(x, weight / _reference_sigma(weight, u, v), bias, stride, padding, dilation, groups)


# ----------------------------------------------------------------------------- weight as a matrix

def _matrix(weight: torch.Tensor):
    """``weight`` as a (Cout, rest) matrix view in its memory order and whether that order is
    channels-last ((kh, kw, Cin) per row instead of (Cin, kh, kw)); None when neither."""
    if weight.is_contiguous():
        return weight.view(weight.shape[0], -1), False
    if weight.is_contiguous(memory_format=torch.channels_last):
        return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1), True
    return None, False


def _to_rows(vec: torch.Tensor, weight: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A row vector in (Cin, kh, kw) order, reordered to the weight's memory order."""
    if not channels_last:
        return vec
    _, ci, kh, kw = weight.shape
    return vec.view(ci, kh, kw).permute(1, 2, 0).reshape(-1)


def _from_rows(vec: torch.Tensor, weight: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if not channels_last:
        return vec
    _, ci, kh, kw = weight.shape
    return vec.view(kh, kw, ci).permute(2, 0, 1).reshape(-1)


def _mv(weight: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``W v`` with W flattened to (Cout, rest), without copying a channels-last weight."""
    mat, cl = _matrix(weight)
    if mat is None:
        return torch.mv(weight.flatten(1), v)
    return torch.mv(mat, _to_rows(v, weight, cl))


@torch.no_grad()
def power_iteration(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, iterations: int, eps: float) -> None:
    """``iterations`` steps of the power method on ``weight`` (Cout, ...) flattened to a matrix,
    updating ``u`` (Cout) and ``v`` (rest) in place, as torch's spectral_norm does in training:
    ``u = normalize(W v)``, ``v = normalize(W^T u)``. Runs in the weight's dtype, outside autocast."""
    if torch.is_autocast_enabled(weight.device.type):
        with torch.autocast(weight.device.type, enabled=False):
            return power_iteration(weight, u, v, iterations, eps)
    mat, cl = _matrix(weight)
    if mat is None:
        mat, cl = weight.flatten(1), False
    for _ in range(iterations):
        F.normalize(torch.mv(mat, _to_rows(v, weight, cl)), dim=0, eps=eps, out=u)
        F.normalize(_from_rows(torch.mv(mat.t(), u), weight, cl), dim=0, eps=eps, out=v)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum(a * b)``, without a temporary when both share one dense memory order."""
    if a.stride() == b.stride():
        fa, _ = _matrix(a)
        fb, _ = _matrix(b)
        if fa is not None and fb is not None:
            return torch.dot(fa.reshape(-1), fb.reshape(-1))
    return (a * b).sum()


def _add_rank1(grad: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``grad + u v^T`` (v in (Cin, kh, kw) order), in place where the layout allows."""
    mat, cl = _matrix(grad)
    if mat is not None and not torch.is_grad_enabled():
        mat.addr_(u, _to_rows(v, grad, cl))
        return grad
    return grad + torch.outer(u, v).view(grad.shape)


# ----------------------------------------------------------------------------- autograd

# Two torch.library ops, so that torch.compile calls them as they are: traced into its graph,
# inductor would copy the input and the weight to channels-last for its own convolution and
# turn the matrix-vector products and the rank-1 update into generated loops (2-3x slower here).

def _output_shape(x, weight, stride, padding, dilation) -> tuple:
    """The convolution's output shape (B, Cout, Ho, Wo)."""
    return (x.shape[0], weight.shape[0], *(conv_output_size(x.shape[2 + i], weight.shape[2 + i], stride[i],
                                                            padding[i], dilation[i]) for i in range(2)))


def _fold_fake(x, weight, bias, u, v, stride, padding, dilation, groups):
    y = x.new_empty(_output_shape(x, weight, stride, padding, dilation))
    y = y.contiguous(memory_format=conv_output_format(x, weight))
    return y, u.new_empty(())


#: the folded form runs where the output has at most this share of the weight's elements
FOLD_MAX_OUTPUT_SHARE = 0.25


def folds(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> bool:
    """Whether the folded form runs: where the output is small against the weight
    (:data:`FOLD_MAX_OUTPUT_SHARE`). The fold trades the reference's weight-sized passes (one
    forward, several backward) for two output-sized ones (the scaling of the output and of its
    gradient) and an opaque op; where the output is larger (SN-PatchGAN's first three layers at
    256x256: no gain measured in eager), the reference runs, which torch.compile also lays out and
    fuses as it would torch's (its channels-last convolution beat the opaque op there)."""
    b, cout, ho, wo = _output_shape(x, weight, stride, padding, dilation)
    return b * cout * ho * wo <= FOLD_MAX_OUTPUT_SHARE * weight.numel()


def _weight_format(weight: torch.Tensor) -> torch.memory_format:
    """The weight's gradient comes back in the weight's own layout (the parameter's: autograd
    then accumulates it without a copy)."""
    return torch.channels_last if is_channels_last(weight) else torch.contiguous_format


def _run_input(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The input in the layout the folded convolution runs in. On the CPU a channels_last input
    with an NCHW weight of at least as many elements (every folded stride-2 layer with as many
    channels out as in: its input is four times its output) runs NCHW: oneDNN would otherwise copy
    the weight to channels_last in the forward and again in the backward, a weight-sized copy
    each time, where this copies the input (and the output and its gradient back and forth,
    each a quarter of it). In DeepFill v2's training step at 128x128 the weight copies of the
    discriminator's 256-channel layers took about 7% of the step."""
    nchw_weight = weight.is_contiguous() and not weight.is_contiguous(memory_format=torch.channels_last)
    if x.device.type == "cpu" and nchw_weight and x.numel() <= weight.numel() \
            and conv_output_format(x, weight) == torch.channels_last:
        return x.contiguous()
    return x


#: the folded forward of an NCHW layer runs channels-last inside where the input has at least this
#: share of the weight's elements
FOLD_CHANNELS_LAST_MIN_INPUT_SHARE = 0.25
#: ... and at least this many channels
FOLD_CHANNELS_LAST_MIN_CHANNELS = 256


def _fold_channels_last_inside(x: torch.Tensor, weight: torch.Tensor, groups: int) -> bool:
    """Whether the folded forward of an NCHW input runs on channels-last copies of the input and the
    weight, its output copied back (``_cpu_conv``'s copies): where ``_cpu_conv`` could run so and the
    input is not small against the weight (:data:`FOLD_CHANNELS_LAST_MIN_INPUT_SHARE`). At
    SN-PatchGAN's conv4 (256 channels, 32x32 maps, batch 2; the input a third of the weight)
    that forward ran 1.18x as fast as NCHW (8.56 against 10.13 ms); at conv5 (16x16, a twelfth)
    0.94x, at conv6 (8x8) 0.66x (benchmarks/conv_layouts.py, files
    cpu_conv_layouts_sn_patchgan_weight_fp32_20261207.*). With fewer than
    :data:`FOLD_CHANNELS_LAST_MIN_CHANNELS` channels it lost: a training-mode layer's forward without
    gradients (5x5, stride 2, 16 to 128 channels, 8x8 to 32x32 maps, batch 1 to 4) was 3-23% slower
    channels-last inside in 12 of 15 ad-hoc timings (not kept), a tie in one, faster in two (2% at
    128 channels, 15% at 96 channels and 16x16, a tie when repeated). The backward keeps oneDNN's
    one NCHW call."""
    return (_cpu_conv.can_run_channels_last_inside(x, weight, groups) and x.shape[1] >= FOLD_CHANNELS_LAST_MIN_CHANNELS
            and x.numel() >= FOLD_CHANNELS_LAST_MIN_INPUT_SHARE * weight.numel())


@torch.library.custom_op("fastinpaint::spectral_norm_conv2d_folded", mutates_args=())
def _fold(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], u: torch.Tensor, v: torch.Tensor,
          stride: List[int], padding: List[int], dilation: List[int], groups: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(conv(x, W) / sigma + b, 1 / sigma): float32 or float64, x, the weight and the vectors of one
    dtype (the caller checks)."""
    sigma = torch.dot(u, _mv(weight, v))
    inv = torch.reciprocal(sigma)
    bc = None if bias is None else bias * sigma   # conv(x, W, b sigma) / sigma: one pass over the output
    if _fold_channels_last_inside(x, weight, groups):
        y = _cpu_conv.conv_channels_last(x, weight, bc, stride, padding, dilation, keep_channels_last=True)
        return _cpu_conv.to_layout(y.mul_(inv), False), inv
    y = torch.ops.aten.convolution(_run_input(x, weight), weight, bc, stride, padding, dilation, False, [0, 0],
                                   groups)
    y.mul_(inv)
    return y.contiguous(memory_format=conv_output_format(x, weight)), inv


_fold.register_fake(_fold_fake)


@torch.library.custom_op("fastinpaint::spectral_norm_conv2d_folded_backward", mutates_args=())
def _fold_backward(gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                   inv: torch.Tensor, stride: List[int], padding: List[int], dilation: List[int], groups: int,
                   need_x: bool, need_w: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(gx, gW) of :func:`_fold` (an empty tensor for one not needed)."""
    fmt = conv_output_format(x, weight)
    gx = gw = None
    if need_x or need_w:
        xr = _run_input(x, weight)
        gys = torch.mul(gy, inv, out=torch.empty_like(gy, memory_format=conv_output_format(xr, weight)))
        # torch's backward for both (fastinpaint's strided weight gradient, ops/_cpu_conv.py, made
        # these small layers slower: two calls and the copies to channels-last cost more than it saves)
        gx, gw, _ = torch.ops.aten.convolution_backward(gys, xr, weight, None, stride, padding,
                                                        dilation, False, [0, 0], groups, [need_x, need_w, False])
    if need_w:
        gsigma = -_dot(weight, gw) * inv
        gw = _add_rank1(gw, u, v * gsigma).contiguous(memory_format=_weight_format(weight))
    gx = gx.contiguous(memory_format=fmt) if need_x else x.new_empty(0)
    return gx, gw if need_w else weight.new_empty(0)


@_fold_backward.register_fake
def _fold_backward_fake(gy, x, weight, u, v, inv, stride, padding, dilation, groups, need_x, need_w):
    fmt = conv_output_format(x, weight)
    gx = x.new_empty(x.shape).contiguous(memory_format=fmt) if need_x else x.new_empty(0)
    gw = weight.new_empty(weight.shape).contiguous(memory_format=_weight_format(weight)) if need_w \
        else weight.new_empty(0)
    return gx, gw


def _setup_context(ctx, inputs, output):
    x, weight, bias, u, v, stride, padding, dilation, groups = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, weight, bias, u, v, output[1])
    ctx.geometry = (stride, padding, dilation, groups)


def _backward(ctx, gy, _ginv):
    x, weight, bias, u, v, inv = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.geometry
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled():   # create_graph: the reference formula's gradient, itself differentiable
        inputs = [t for t, need in ((x, need_x), (weight, need_w), (bias, need_b)) if need]
        y = reference_conv2d(x, weight, bias, u, v, stride, padding, dilation, groups)
        grads = iter(torch.autograd.grad(y, inputs, gy, create_graph=True))
        gx, gw, gb = (next(grads) if need else None for need in (need_x, need_w, need_b))
    else:
        gx, gw = _fold_backward(gy, x, weight, u, v, inv, stride, padding, dilation, groups, need_x, need_w)
        gx, gw = (gx if need_x else None), (gw if need_w else None)
        gb = gy.sum((0, 2, 3)) if need_b else None
    return gx, gw, gb, None, None, None, None, None, None


_fold.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public op

def _check(x, weight, bias, u, v):
    check_float_tensor(x, "x", 4, "(B, Cin, H, W)")
    check_float_tensor(weight, "weight", 4, "(Cout, Cin/groups, kh, kw)")
    if bias is not None:
        check_float_tensor(bias, "bias", 1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have {weight.shape[0]} elements (the weight's Cout), got {bias.shape[0]}")
    check_float_tensor(u, "u", 1)
    check_float_tensor(v, "v", 1)
    if u.shape[0] != weight.shape[0]:
        raise ValueError(f"u must have {weight.shape[0]} elements (the weight's Cout), got {u.shape[0]}")
    if v.shape[0] != weight[0].numel():
        raise ValueError(f"v must have {weight[0].numel()} elements (Cin/groups * kh * kw), got {v.shape[0]}")
    check_same_device(x, (("weight", weight), ("bias", bias), ("u", u), ("v", v)))
    for name, t in (("bias", bias), ("u", u), ("v", v)):   # also under autocast: sigma runs in the weight's dtype
        if t is not None and t.dtype != weight.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but weight has {weight.dtype}")


def _cpu_conv_channels_last_inside(x, weight, bias, stride, padding, dilation, groups):
    """The cpu backend's convolution where the layer does not fold (ops/_cpu_conv.py): channels-last
    inside on an NCHW input (SN-PatchGAN's first layers, run alone), fastinpaint's input gradient
    on an input of few channels (its first layer)."""
    return _cpu_conv.conv2d(x, weight, bias, stride, padding, dilation, groups, channels_last_inside=True)


def spectral_norm_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, u: torch.Tensor,
                         v: torch.Tensor, stride=1, padding=0, dilation=1, groups: int = 1) -> torch.Tensor:
    """``conv2d(x, weight / sigma, bias, ...)`` with ``sigma = u . (W v)`` (W flattened to
    (Cout, Cin/groups*kh*kw)), differentiated with ``u`` and ``v`` held constant, as
    ``torch.nn.utils.parametrizations.spectral_norm`` does; ``u`` and ``v`` come from
    :func:`power_iteration`. ``padding`` is an int or a pair (pad first for other modes)."""
    _check(x, weight, bias, u, v)
    stride, padding, dilation = pair(stride, "stride", 1), pair(padding, "padding", 0), pair(dilation, "dilation", 1)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if x.shape[1] != weight.shape[1] * groups:
        raise ValueError(f"x has {x.shape[1]} channels; the weight takes {weight.shape[1] * groups} "
                         f"({weight.shape[1]} per group, groups={groups})")
    backend = OP.select(x)
    autocast = torch.is_autocast_enabled(x.device.type) and torch.float64 not in (x.dtype, weight.dtype)
    if not autocast and x.dtype != weight.dtype:
        raise TypeError(f"x has dtype {x.dtype} but weight has {weight.dtype}")
    # the fold in float32 / float64 only: 1/sigma rounded to 16 bits would scale the whole layer
    # by one rounding error, and a raw float16 output can overflow where the normalised one does not
    if (backend == "reference" or autocast or x.dtype not in (torch.float32, torch.float64)
            or not folds(x, weight, stride, padding, dilation)):
        conv = _cpu_conv_channels_last_inside if backend == "cpu" else F.conv2d
        return reference_conv2d(x, weight, bias, u, v, stride, padding, dilation, groups, conv)
    return call(torch.ops.fastinpaint.spectral_norm_conv2d_folded.default, x, weight, bias, u, v, list(stride),
                list(padding), list(dilation), groups)[0]
