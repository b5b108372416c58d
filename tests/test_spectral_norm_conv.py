"""Spectral-normalised convolution: SpectralNormConv2d and spectral_norm_conv2d against torch's
``spectral_norm(nn.Conv2d(...))`` on random inputs, odd shapes, both paths (folded and reference),
layouts, padding modes, groups; training steps with the power iteration, eval mode, gradcheck and
double backward, autocast, torch.compile, opcheck, state dicts, bad input."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastinpaint import use_backend
from fastinpaint.nn import SpectralNormConv2d
from fastinpaint.ops import _spectral_norm as sn_op
from fastinpaint.ops._spectral_norm import folds, power_iteration, reference_conv2d, spectral_norm_conv2d


# (cin, cout, kernel, stride, padding, dilation, groups, input size): the first three fold (their
# output is at most a quarter of the weight), the others keep the reference
GEOMETRIES = [
    (16, 24, 5, 2, 2, 1, 1, (9, 7)),
    (32, 48, 3, 1, 1, 2, 2, (4, 6)),
    (8, 9, (3, 5), (2, 1), (1, 2), 1, 1, (4, 3)),
    (3, 5, 5, 2, 2, 1, 1, (13, 17)),
    (6, 4, 3, 1, 0, 1, 1, (11, 10)),
]
FOLDS = [True, True, True, False, False]


def _pair(m_kwargs, dtype, fmt):
    """(SpectralNormConv2d, torch's parametrized nn.Conv2d) with the same state."""
    ours = SpectralNormConv2d(**m_kwargs)
    conv_kwargs = {k: v for k, v in m_kwargs.items() if k not in ("n_power_iterations", "eps")}
    theirs = nn.utils.parametrizations.spectral_norm(nn.Conv2d(**conv_kwargs),
                                                     n_power_iterations=m_kwargs.get("n_power_iterations", 1),
                                                     eps=m_kwargs.get("eps", 1e-12))
    theirs.load_state_dict(ours.state_dict())
    return ours.to(dtype=dtype, memory_format=fmt), theirs.to(dtype=dtype, memory_format=fmt)


def _kwargs(geometry, bias=True):
    cin, cout, k, s, p, d, g, _ = geometry
    return dict(in_channels=cin, out_channels=cout, kernel_size=k, stride=s, padding=p, dilation=d, groups=g,
                bias=bias)


def _steps(module, xs, gys):
    """Forward and backward on each input in turn (training: a power-iteration step each):
    (outputs, input grads, summed weight grad, summed bias grad), the gradients as autograd
    computes them (torch.autograd.grad: not copied into the leaf's layout as ``.grad`` is)."""
    w = module.parametrizations.weight.original
    params = [w] if module.bias is None else [w, module.bias]
    outs, gxs, gps = [], [], [None] * len(params)
    for x, gy in zip(xs, gys):
        x = x.detach().requires_grad_()
        y = module(x)
        gx, *gp = torch.autograd.grad(y, [x, *params], gy)
        outs.append(y.detach())
        gxs.append(gx)
        gps = [g if acc is None else acc + g for acc, g in zip(gps, gp)]
    return outs, gxs, gps[0], None if module.bias is None else gps[1]



@pytest.mark.parametrize("layout", ["nchw", "channels_last", "channels_last_input"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("index", range(len(GEOMETRIES)))
def test_module_matches_torch_spectral_norm(index, dtype, layout, monkeypatch):
    """Outputs, gradients and the power iteration against torch's parametrization; the layouts
    (channels_last_input: NCHW weights, channels_last inputs, as in a discriminator that runs
    channels_last inside, where a folded layer runs NCHW) as torch's convolution gives them, and
    the weight's gradient in the weight's layout."""
    geometry = GEOMETRIES[index]
    torch.manual_seed(index)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x_fmt = torch.contiguous_format if layout == "nchw" else torch.channels_last
    ours, theirs = _pair(_kwargs(geometry, bias=index != 2), dtype, fmt)
    cin, h, w = geometry[0], *geometry[7]
    xs = [torch.randn(3, cin, h, w, dtype=dtype).contiguous(memory_format=x_fmt) for _ in range(2)]
    y0 = ours(xs[0])
    assert folds(xs[0], ours.parametrizations.weight.original, ours.stride, ours.padding, ours.dilation) \
        == FOLDS[index]
    gys = [torch.randn_like(y0) for _ in xs]
    ours.load_state_dict(theirs.state_dict())   # undo the power-iteration step of y0
    run_nchw = []   # per folded convolution (forward, backward): whether it ran on an NCHW input
    run_input = sn_op._run_input

    def recording(x, w):
        xr = run_input(x, w)
        run_nchw.append(xr.is_contiguous())
        return xr

    inside = []   # per folded forward: whether it ran on channels-last copies of an NCHW input and weight
    fold_inside = sn_op._fold_channels_last_inside

    def recording_inside(x, w, groups):
        inside.append(fold_inside(x, w, groups))
        return inside[-1]

    monkeypatch.setattr(sn_op, "_run_input", recording)
    monkeypatch.setattr(sn_op, "_fold_channels_last_inside", recording_inside)
    monkeypatch.setattr(sn_op, "FOLD_CHANNELS_LAST_MIN_CHANNELS", 16)   # the path at this small size (default: 256)
    with use_backend("cpu"), torch.autograd.profiler.profile() as prof:
        got = _steps(ours, xs, gys)
    # two steps, a forward and a backward each; geometry 0 on NCHW maps (16 channels in, the input a
    # third of the weight) runs its forwards channels-last inside, the others on the input as given
    assert sum(inside) == (2 if index == 0 and layout == "nchw" else 0), inside
    assert len(run_nchw) + sum(inside) == (4 if FOLDS[index] else 0)
    if FOLDS[index]:   # NCHW, also on a channels_last input with an NCHW weight (no copy of the weight)
        assert all(run_nchw) == (layout != "channels_last"), run_nchw
    ran = {e.name for e in prof.function_events}
    assert ("fastinpaint::spectral_norm_conv2d_folded_backward" in ran) == FOLDS[index]
    want = _steps(theirs, xs, gys)
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        assert a.stride() == b.stride(), (a.stride(), b.stride())
    if FOLDS[index]:   # the weight's gradient in the weight's layout (torch's follows the input's)
        assert got[2].stride() == ours.parametrizations.weight.original.stride()
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    for a, b in zip(got[0] + got[1] + [got[2], got[3]], want[0] + want[1] + [want[2], want[3]]):
        if b is None:
            assert a is None
            continue
        torch.testing.assert_close(a, b, **tol)
    sn, sn_t = ours.parametrizations.weight[0], theirs.parametrizations.weight[0]
    torch.testing.assert_close(sn._u, sn_t._u, **tol)   # two power-iteration steps, as torch's
    torch.testing.assert_close(sn._v, sn_t._v, **tol)
    torch.testing.assert_close(ours.weight, theirs.weight, **tol)   # the normalised weight, as torch's


def _fold_inputs(dtype=torch.float64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 6, 3, 2, generator=g, dtype=dtype)
    w = torch.randn(16, 3, 3, 3, generator=g, dtype=dtype)    # groups=2
    b = torch.randn(16, generator=g, dtype=dtype) if bias else None
    u = F.normalize(torch.randn(16, generator=g, dtype=dtype), dim=0)
    v = F.normalize(torch.randn(27, generator=g, dtype=dtype), dim=0)
    return x, w, b, u, v


@pytest.mark.parametrize("bias", [True, False])
def test_folded_gradcheck_and_double_backward(bias):
    x, w, b, u, v = _fold_inputs(bias=bias)
    assert folds(x, w, (2, 2), (1, 1), (1, 1))
    args = [t.requires_grad_() for t in (x, w, b) if t is not None]

    def fn(x, w, b=None):
        with use_backend("cpu"):
            return spectral_norm_conv2d(x, w, b, u, v, 2, 1, 1, 2)

    with torch.autograd.profiler.profile() as prof:
        assert torch.autograd.gradcheck(fn, args)
        assert torch.autograd.gradgradcheck(fn, args)
    assert "fastinpaint::spectral_norm_conv2d_folded_backward" in {e.name for e in prof.function_events}


def test_folded_matches_reference_formula_and_runs_the_op():
    x, w, b, u, v = _fold_inputs(dtype=torch.float32)
    for t in (x, w, b):
        t.requires_grad_()
    with use_backend("cpu"), torch.autograd.profiler.profile() as prof:
        y = spectral_norm_conv2d(x, w, b, u, v, 2, 1, 1, 2)
        y.backward(torch.ones_like(y))
    names = {e.name for e in prof.function_events}
    assert "fastinpaint::spectral_norm_conv2d_folded" in names
    assert "fastinpaint::spectral_norm_conv2d_folded_backward" in names
    grads = [t.grad for t in (x, w, b)]
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y2 = reference_conv2d(x2, w2, b2, u, v, 2, 1, 1, 2)
    y2.backward(torch.ones_like(y2))
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    for a, e in zip(grads, (x2.grad, w2.grad, b2.grad)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


def test_reference_backend_runs_torch_formula():
    x, w, b, u, v = _fold_inputs()
    with use_backend("reference"), torch.autograd.profiler.profile() as prof:
        spectral_norm_conv2d(x, w, b, u, v, 2, 1, 1, 2)
    assert not any(e.name.startswith("fastinpaint::") for e in prof.function_events)


def test_two_forwards_one_backward():
    """D(real) and D(fake) in one graph: the second forward's power iteration must not change
    what the first one's backward uses (u, v are cloned, as torch does)."""
    torch.manual_seed(0)
    ours, theirs = _pair(_kwargs(GEOMETRIES[0]), torch.float64, torch.contiguous_format)
    a, b = torch.randn(2, 16, 9, 7, dtype=torch.float64), torch.randn(2, 16, 9, 7, dtype=torch.float64)
    for m in (ours, theirs):
        (m(a).sum() - 2 * m(b).sum()).backward()
    torch.testing.assert_close(ours.parametrizations.weight.original.grad,
                               theirs.parametrizations.weight.original.grad)


def test_eval_mode_keeps_vectors():
    torch.manual_seed(0)
    ours, theirs = _pair(_kwargs(GEOMETRIES[0]), torch.float64, torch.contiguous_format)
    ours.eval(), theirs.eval()
    sn = ours.parametrizations.weight[0]
    u0, v0 = sn._u.clone(), sn._v.clone()
    x = torch.randn(1, 16, 9, 7, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))
    assert torch.equal(sn._u, u0) and torch.equal(sn._v, v0)


@pytest.mark.parametrize("padding,padding_mode,kernel", [("same", "zeros", 3), ("same", "zeros", 4),
                                                         ("valid", "zeros", 3), (1, "reflect", 3),
                                                         (2, "circular", 5)])
def test_padding_forms(padding, padding_mode, kernel):
    torch.manual_seed(0)
    kwargs = dict(in_channels=32, out_channels=16, kernel_size=kernel, padding=padding, padding_mode=padding_mode)
    ours, theirs = _pair(kwargs, torch.float64, torch.contiguous_format)
    x = torch.randn(1, 32, 3, 4, dtype=torch.float64)
    gy = torch.randn_like(theirs(x))
    ours.load_state_dict(theirs.state_dict())
    with use_backend("cpu"), torch.autograd.profiler.profile() as prof:
        got = _steps(ours, [x], [gy])
    assert "fastinpaint::spectral_norm_conv2d_folded" in {e.name for e in prof.function_events}
    want = _steps(theirs, [x], [gy])
    for a, b in zip(got[0] + got[1] + [got[2], got[3]], want[0] + want[1] + [want[2], want[3]]):
        torch.testing.assert_close(a, b)


class _Double(nn.Module):
    def forward(self, w):
        return 2 * w


def test_removed_or_extra_parametrization_falls_back():
    torch.manual_seed(0)
    m = SpectralNormConv2d(16, 24, 5, 2, 2)
    x = torch.randn(1, 16, 9, 7)
    extra = SpectralNormConv2d(16, 24, 5, 2, 2)   # not a deepcopy: that would share m's injected class
    nn.utils.parametrize.remove_parametrizations(m, "weight")
    torch.testing.assert_close(m(x), F.conv2d(x, m.weight, m.bias, 2, 2))
    nn.utils.parametrize.register_parametrization(extra, "weight", _Double())   # W -> 2 W / sigma
    extra.eval()
    torch.testing.assert_close(extra(x), F.conv2d(x, extra.weight, extra.bias, 2, 2))


def test_deepcopy_and_power_iteration_options_match_torch():
    torch.manual_seed(0)
    kwargs = dict(_kwargs(GEOMETRIES[0]), n_power_iterations=3, eps=1e-4)
    ours, theirs = _pair(kwargs, torch.float64, torch.contiguous_format)
    ours = copy.deepcopy(ours)
    x = torch.randn(2, 16, 9, 7, dtype=torch.float64)
    with use_backend("cpu"):
        torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.parametrizations.weight[0]._v, theirs.parametrizations.weight[0]._v)
    assert ours.parametrizations.weight[0].n_power_iterations == 3 and ours.parametrizations.weight[0].eps == 1e-4


def test_state_dict_is_torchs():
    ours = SpectralNormConv2d(4, 8, 3)
    theirs = nn.utils.parametrizations.spectral_norm(nn.Conv2d(4, 8, 3))
    assert set(ours.state_dict()) == set(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    ours.load_state_dict(theirs.state_dict())


def test_power_iteration_matches_torch_and_channels_last():
    torch.manual_seed(0)
    w = torch.randn(12, 5, 3, 4, dtype=torch.float64)
    u0 = F.normalize(torch.randn(12, dtype=torch.float64), dim=0)
    v0 = F.normalize(torch.randn(60, dtype=torch.float64), dim=0)
    for fmt in (torch.contiguous_format, torch.channels_last):
        u, v = u0.clone(), v0.clone()
        power_iteration(w.contiguous(memory_format=fmt), u, v, 3, 1e-12)
        eu, ev = u0.clone(), v0.clone()
        for _ in range(3):
            eu = F.normalize(w.flatten(1) @ ev, dim=0)
            ev = F.normalize(w.flatten(1).t() @ eu, dim=0)
        torch.testing.assert_close(u, eu)
        torch.testing.assert_close(v, ev)


def test_autocast_and_low_precision_run_the_reference():
    """Under autocast (or on bfloat16 tensors) torch's formula runs: the same numbers as torch's
    module, gradients included; the power iteration stays in float32."""
    torch.manual_seed(0)
    ours, theirs = _pair(_kwargs(GEOMETRIES[0]), torch.float32, torch.contiguous_format)
    x = torch.randn(2, 16, 9, 7)
    with use_backend("cpu"), torch.autograd.profiler.profile() as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = ours(x)
        y.float().sum().backward()
    assert not any(e.name.startswith("fastinpaint::") for e in prof.function_events)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yt = theirs(x)
    yt.float().sum().backward()
    assert y.dtype == yt.dtype == torch.bfloat16
    torch.testing.assert_close(y, yt)
    g, gt = ours.parametrizations.weight.original.grad, theirs.parametrizations.weight.original.grad
    assert g.dtype == torch.float32
    torch.testing.assert_close(g, gt)
    low = copy.deepcopy(ours).bfloat16()
    with use_backend("cpu"), torch.autograd.profiler.profile() as prof:
        low(x.bfloat16())
    assert not any(e.name.startswith("fastinpaint::") for e in prof.function_events)


def test_torch_compile_inductor_channels_last_matches_torch():
    torch.manual_seed(0)
    ours, theirs = _pair(_kwargs(GEOMETRIES[0]), torch.float32, torch.channels_last)
    x = torch.randn(2, 16, 9, 7).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(ours, fullgraph=True)
    with use_backend("cpu"):
        y = compiled(x)
    yt = theirs(x)
    torch.testing.assert_close(y, yt, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    yt.sum().backward()
    torch.testing.assert_close(ours.parametrizations.weight.original.grad,
                               theirs.parametrizations.weight.original.grad, rtol=1e-4, atol=1e-4)


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    m = SpectralNormConv2d(16, 24, 5, 2, 2).double()
    m2 = copy.deepcopy(m)
    x = torch.randn(2, 16, 9, 7, dtype=torch.float64)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    for _ in range(2):   # power-iteration steps under compile update the buffers too
        y, y2 = compiled(x), m2(x)
        torch.testing.assert_close(y, y2)
        y.sum().backward(), y2.sum().backward()
    torch.testing.assert_close(m.parametrizations.weight.original.grad, m2.parametrizations.weight.original.grad)
    torch.testing.assert_close(m.parametrizations.weight[0]._u, m2.parametrizations.weight[0]._u)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "channels_last_input"])
def test_opcheck(layout):
    x, w, b, u, v = _fold_inputs(dtype=torch.float32)
    if layout != "nchw":
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "channels_last":
        w = w.contiguous(memory_format=torch.channels_last)
    geometry = ([2, 2], [1, 1], [1, 1], 2)
    torch.library.opcheck(sn_op._fold, (x, w, b, u, v, *geometry))
    y, inv = sn_op._fold(x, w, b, u, v, *geometry)
    gy = torch.randn_like(y)
    for need_x, need_w in ((True, True), (False, True), (True, False)):
        torch.library.opcheck(sn_op._fold_backward, (gy, x, w, u, v, inv, *geometry, need_x, need_w))
    gx, gw = sn_op._fold_backward(gy, x, w, u, v, inv, *geometry, True, True)
    assert gx.stride() == x.stride() and gw.stride() == w.stride()   # x's layout; the weight's (no copy to accumulate)


def test_torch_only_backends_need_no_extension():
    from fastinpaint import _backend

    assert sn_op.OP.torch_only == ("cpu", "cuda")
    assert _backend.unavailable_reason("cpu", "cpu", extension=False) is None
    assert "CUDA tensors" in _backend.unavailable_reason("cuda", "cpu", extension=False)


def test_bad_input_names_the_argument():
    x, w, b, u, v = _fold_inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match="u must have 16"):
        spectral_norm_conv2d(x, w, b, u[:5], v, 2, 1, 1, 2)
    with pytest.raises(ValueError, match="v must have 27"):
        spectral_norm_conv2d(x, w, b, u, v[:5], 2, 1, 1, 2)
    with pytest.raises(ValueError, match="bias must have 16"):
        spectral_norm_conv2d(x, w, b[:3], u, v, 2, 1, 1, 2)
    with pytest.raises(ValueError, match="x has 6 channels"):
        spectral_norm_conv2d(x, w, b, u, v, 2, 1, 1, 1)
    with pytest.raises(ValueError, match="groups"):
        spectral_norm_conv2d(x, w, b, u, v, 2, 1, 1, 0)
    with pytest.raises(TypeError, match="u has dtype"):
        spectral_norm_conv2d(x, w, b, u.double(), v, 2, 1, 1, 2)
    with pytest.raises(TypeError, match="x has dtype"):
        spectral_norm_conv2d(x.double(), w, b, u, v, 2, 1, 1, 2)
    with pytest.raises(ValueError, match="x must be 4-D"):
        spectral_norm_conv2d(x[0], w, b, u, v, 2, 1, 1, 2)
    with pytest.raises(ValueError, match="stride"):
        spectral_norm_conv2d(x, w, b, u, v, 0, 1, 1, 2)
