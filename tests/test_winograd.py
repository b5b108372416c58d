"""The cpu backend's Winograd F(4x4, 3x3) convolution (fastinpaint/ops/_winograd.py,
csrc/cpu/winograd.cpp): forward, the backward to the input, the weights and the bias against
torch's float64 convolution on random inputs (odd sizes that leave partial tiles, padding
from 0 to more than the kernel's reach, dilations, channel counts off the vector width,
NCHW, channels_last and strided views), where it applies, threads, lower CPU
capabilities, registration (opcheck, torch.compile) and the gated convolution on it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastinpaint.functional as FI
from fastinpaint import use_backend
from fastinpaint.ops import _winograd as W

from conftest import assert_close_scaled as scaled, assert_runs_at_lower_cpu_capabilities, skip_unless_available

pytestmark = pytest.mark.usefixtures("_cpu_kernels")

# (B, C, O, H, W, padding, dilation, layout, bias)
CASES = [
    (1, 32, 32, 8, 8, (1, 1), (1, 1), "channels_last", True),
    (2, 33, 47, 13, 10, (1, 1), (1, 1), "contiguous", True),
    (1, 96, 192, 21, 19, (1, 1), (1, 1), "channels_last", True),
    (1, 40, 35, 17, 23, (2, 2), (2, 2), "noncontig", False),
    (2, 48, 32, 30, 31, (4, 4), (4, 4), "channels_last", True),
    (1, 32, 40, 19, 18, (0, 3), (3, 2), "contiguous", False),
    (1, 64, 33, 7, 5, (3, 3), (1, 1), "channels_last", True),   # padding beyond the kernel's reach
    (1, 37, 64, 5, 6, (0, 0), (1, 1), "noncontig", True),       # a 3x4 output: one partial tile
    (3, 32, 48, 36, 9, (8, 8), (8, 8), "contiguous", True),     # dilation 8 on a narrow map
]
IDS = [f"B{c[0]}-{c[1]}to{c[2]}-{c[3]}x{c[4]}-p{c[5][0]}{c[5][1]}-d{c[6][0]}{c[6][1]}-{c[7]}" for c in CASES]


@pytest.fixture
def _cpu_kernels():
    skip_unless_available("cpu", "cpu")


def make_inputs(B, C, O, H, Wd, layout, bias, requires_grad=True):
    if layout == "noncontig":  # a strided view: every other column of a wider map
        x = torch.randn(B, C, H, 2 * Wd)[:, :, :, ::2]
    else:
        x = torch.randn(B, C, H, Wd)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(O, C, 3, 3) / (3 * C ** 0.5)
    b = torch.randn(O) if bias else None
    return [t.requires_grad_(requires_grad) if t is not None else None for t in (x, w, b)]


def float64_reference(x, w, b, padding, dilation, grad=None):
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if b is not None else None
    y = F.conv2d(x64, w64, b64, 1, padding, dilation)
    if grad is None:
        return y.detach(), None
    grads = torch.autograd.grad(y, [t for t in (x64, w64, b64) if t is not None], grad.double())
    return y.detach(), grads


def assert_close_scaled(got, want, rel, name):
    """conftest's, with an absolute floor of 1e-6 (maps whose reference is all but zero)."""
    scaled(got, want, rel, name, floor=1e-6)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_and_backward_match_float64(case):
    B, C, O, H, Wd, padding, dilation, layout, bias = case
    x, w, b = make_inputs(B, C, O, H, Wd, layout, bias)
    y = W.winograd_conv2d(x, w, b, padding, dilation)
    grad = torch.randn_like(y)
    want, want_grads = float64_reference(x, w, b, padding, dilation, grad)
    assert_close_scaled(y, want, 2e-5, "output")
    got_grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], grad)
    for name, got, exp in zip(("grad x", "grad weight", "grad bias"), got_grads, want_grads):
        assert_close_scaled(got, exp, 2e-5, name)
    # F(4x4, 3x3) rounds more than a direct convolution, but within 30x of its float32 error
    direct = F.conv2d(x.detach(), w.detach(), None if b is None else b.detach(), 1, padding, dilation)
    direct_err = (direct.double() - want).abs().max().item()
    assert (y.double() - want).abs().max().item() <= 30 * direct_err + 1e-6 * want.abs().max().item()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontig"])
def test_memory_formats_follow_conv2d(layout):
    x, w, b = make_inputs(1, 32, 32, 9, 11, layout, True)
    y = W.winograd_conv2d(x, w, b, (1, 1), (1, 1))
    direct = F.conv2d(x, w, b, 1, 1)
    fmt = torch.channels_last if direct.is_contiguous(memory_format=torch.channels_last) and not \
        direct.is_contiguous() else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt), (layout, y.stride())
    y.backward(torch.ones_like(y))  # a leaf's .grad in the leaf's layout (autograd's accumulation)
    gx = x.grad.clone()
    x.grad = None
    direct.backward(torch.ones_like(direct))
    assert gx.stride() == x.grad.stride(), (layout, gx.stride(), x.grad.stride())
    torch.testing.assert_close(gx, x.grad, rtol=1e-4, atol=1e-4)


def test_applies_only_where_it_gains_and_can_be_switched_off(monkeypatch):
    x, w, _ = make_inputs(1, 32, 32, 24, 24, "contiguous", False, requires_grad=False)
    assert W.applies(x, w, (1, 1)) and W.tiles(1, 24, 24, (1, 1)) == 36
    assert not W.applies(x[:, :, :20, :20], w, (1, 1))                    # 25 tiles
    assert W.applies(x[:, :, :20, :20].expand(2, -1, -1, -1), w, (1, 1))   # 50 tiles
    # dilation 16 on 32x32: sixteen 2x2 sub-grids per axis, one 4x4 tile each, 4 of its 16 outputs used
    x32 = torch.randn(1, 32, 32, 32)
    assert W.tiles(1, 32, 32, (16, 16)) == 256 and not W.applies(x32, w, (1, 1), (16, 16), (16, 16))
    assert W.applies(x32, w, (1, 1), (8, 8), (8, 8))  # dilation 8: 4x4 sub-grids, full tiles
    assert not W.applies(x, w, (2, 2))                                 # stride 2
    assert not W.applies(x.double(), w.double(), (1, 1))               # float64
    assert not W.applies(x, torch.randn(32, 32, 5, 5), (1, 1))         # 5x5
    assert not W.applies(x[:, :16], torch.randn(32, 16, 3, 3), (1, 1))  # too few input channels
    assert not W.applies(x, torch.randn(16, 32, 3, 3), (1, 1))         # too few output channels
    W.set_enabled(False)
    try:
        assert not W.applies(x, w, (1, 1))
    finally:
        W.set_enabled(True)
    monkeypatch.setenv("FASTINPAINT_WINOGRAD", "0")
    assert not W.applies(x, w, (1, 1))
    monkeypatch.delenv("FASTINPAINT_WINOGRAD")
    assert W.applies(x, w, (1, 1))
    with pytest.raises(TypeError, match="enabled"):
        W.set_enabled(1)


def _ran_winograd(fn) -> bool:
    with torch.autograd.profiler.profile() as prof:
        fn()
    return any("winograd_conv3x3" in e.name for e in prof.function_events)


def test_gated_conv_runs_it_on_the_cpu_backend_only():
    x = torch.randn(1, 32, 26, 22).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = (torch.randn(64, 32, 3, 3) / 17).requires_grad_()
    b = torch.randn(64).requires_grad_()
    with use_backend("cpu"):
        assert _ran_winograd(lambda: FI.gated_conv2d(x, w, b, padding=2, dilation=2))
        y = FI.gated_conv2d(x, w, b, padding=2, dilation=2)
        assert not _ran_winograd(lambda: FI.gated_conv2d(x, w, b, stride=2, padding=1))
    with use_backend("reference"):
        assert not _ran_winograd(lambda: FI.gated_conv2d(x, w, b, padding=2, dilation=2))
        ref = FI.gated_conv2d(x, w, b, padding=2, dilation=2)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    assert y.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w, b), g)
    want = torch.autograd.grad(ref, (x, w, b), g)
    for name, a, e in zip(("grad x", "grad weight", "grad bias"), got, want):
        assert_close_scaled(a, e.double(), 5e-5, name)


def test_double_backward():
    """create_graph=True differentiates torch's convolution backward."""
    x, w, b = make_inputs(1, 32, 32, 6, 7, "channels_last", True)
    y = W.winograd_conv2d(x, w, b, (1, 1), (1, 1))
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    (gw,) = torch.autograd.grad(gx.square().sum(), w)
    x2, w2, b2 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y2 = F.conv2d(x2, w2, b2, 1, 1)
    (gx2,) = torch.autograd.grad(y2.square().sum(), x2, create_graph=True)
    (gw2,) = torch.autograd.grad(gx2.square().sum(), w2)
    assert_close_scaled(gw, gw2, 1e-4, "second-order grad weight")


# (B, C, O, H, W, padding, dilation, layout): many chunks of tiles (two 64x62 maps: 512 tiles),
# one pass over few tiles (two 17x23 maps: 60 tiles, each transform a parallel loop), and chunks
# with what the first leaves out: NCHW output, dilation, uneven padding, channel counts off the
# vector width (two 41x58 maps at dilation (2, 3): 330 tiles, more than one pass takes at 3 threads)
THREAD_CASES = [(2, 32, 48, 64, 62, (1, 1), (1, 1), "channels_last"),
                (2, 32, 48, 17, 23, (1, 1), (1, 1), "channels_last"),
                (2, 33, 47, 41, 58, (2, 4), (2, 3), "contiguous")]


@pytest.mark.parametrize("case", THREAD_CASES, ids=["chunks", "one-pass", "chunks-nchw-dilated"])
def test_threads(threads, case):
    """Every thread count gives the float64 result within the tolerance; the weights' gradient
    sums one accumulator per task in order."""
    B, C, O, H, Wd, padding, dilation, layout = case
    assert W.tiles(B, H + 2 * padding[0] - 2 * dilation[0], Wd + 2 * padding[1] - 2 * dilation[1], dilation) in \
        (512, 60, 330)
    x, w, b = make_inputs(B, C, O, H, Wd, layout, True)
    y = W.winograd_conv2d(x, w, b, padding, dilation)
    grad = torch.randn_like(y)
    want, want_grads = float64_reference(x, w, b, padding, dilation, grad)
    assert_close_scaled(y, want, 2e-5, "output")
    got = torch.autograd.grad(y, (x, w, b), grad)
    for name, a, e in zip(("grad x", "grad weight", "grad bias"), got, want_grads):
        assert_close_scaled(a, e, 2e-5, name)
    again = torch.autograd.grad(W.winograd_conv2d(x, w, b, padding, dilation), w, grad)[0]
    assert torch.equal(again, got[1])  # deterministic for a thread count


def test_runs_at_lower_cpu_capabilities():
    code = (
        "import torch, torch.nn.functional as F\n"
        "from fastinpaint.ops import _winograd as W\n"
        "torch.manual_seed(0)\n"
        "x = torch.randn(1, 37, 11, 13, requires_grad=True)\n"
        "w = (torch.randn(45, 37, 3, 3) / 20).requires_grad_()\n"
        "y = W.winograd_conv2d(x, w, None, (2, 1), (2, 1))\n"
        "g = torch.randn_like(y)\n"
        "gx, gw = torch.autograd.grad(y, (x, w), g)\n"
        "x2, w2 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()\n"
        "y2 = F.conv2d(x2, w2, None, 1, (2, 1), (2, 1))\n"
        "gx2, gw2 = torch.autograd.grad(y2, (x2, w2), g.double())\n"
        "for a, e in ((y, y2), (gx, gx2), (gw, gw2)):\n"
        "    assert (a.double() - e).abs().max() <= 2e-5 * e.abs().max(), (a.double() - e).abs().max()\n"
        "print('ok', torch.backends.cpu.get_cpu_capability())\n")
    assert_runs_at_lower_cpu_capabilities(code)


def test_opcheck():
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(1, 32, 9, 7).contiguous(memory_format=fmt).requires_grad_()
        w, b = torch.randn(33, 32, 3, 3, requires_grad=True), torch.randn(33, requires_grad=True)
        for channels_last in (False, True):
            torch.library.opcheck(torch.ops.fastinpaint.winograd_conv3x3.default,
                                  (x, w, b, [1, 2], [1, 2], False, channels_last))
            torch.library.opcheck(torch.ops.fastinpaint.winograd_conv3x3.default,
                                  (x, w, None, [0, 0], [1, 1], False, channels_last))
        g = torch.randn(1, 33, 9, 5).contiguous(memory_format=fmt)
        torch.library.opcheck(torch.ops.fastinpaint.winograd_conv3x3.default,
                              (g, w.detach(), None, [1, 0], [1, 1], True, True))
        gy = torch.randn(1, 33, 9, 7).contiguous(memory_format=fmt)  # the output of padding (1, 2), dilation (1, 2)
        torch.library.opcheck(torch.ops.fastinpaint.winograd_conv3x3_weight_grad.default,
                              (x.detach(), gy, [1, 2], [1, 2]))


def test_compiled_gated_conv_uses_it_and_matches_eager():
    torch._dynamo.reset()
    x = torch.randn(1, 32, 26, 30).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = (torch.randn(64, 32, 3, 3) / 17).requires_grad_()
    b = torch.randn(64).requires_grad_()

    def layer(x, w, b):
        return FI.gated_conv2d(x, w, b, padding=1)

    with use_backend("cpu"):
        compiled = torch.compile(layer, fullgraph=True)
        y = compiled(x, w, b)
        assert _ran_winograd(lambda: compiled(x, w, b))
        with torch.autograd.profiler.profile() as prof:   # the compiled backward runs its kernels too
            compiled(x, w, b).sum().backward()
        names = {e.name for e in prof.function_events}
        assert {"fastinpaint::winograd_conv3x3", "fastinpaint::winograd_conv3x3_weight_grad"} <= names, names
        eager = layer(x, w, b)
    torch.testing.assert_close(y, eager, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    # (the gating of the compiled layer is inductor's: its gradient rounds differently)
    for a, e in zip(torch.autograd.grad(y, (x, w, b), g), torch.autograd.grad(eager, (x, w, b), g)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


def test_partial_conv_runs_it_on_the_cpu_backend():
    x = torch.randn(1, 32, 27, 29).requires_grad_()
    mask = (torch.rand(1, 1, 27, 29) > 0.3).float()
    w = (torch.randn(40, 32, 3, 3) / 17).requires_grad_()
    b = torch.randn(40).requires_grad_()
    with use_backend("cpu"):
        assert _ran_winograd(lambda: FI.partial_conv2d(x, mask, w, b, padding=1))
        y, m = FI.partial_conv2d(x, mask, w, b, padding=1)
    with use_backend("reference"):
        y_ref, m_ref = FI.partial_conv2d(x, mask, w, b, padding=1)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m, m_ref)
    g = torch.randn_like(y)
    for name, a, e in zip(("grad x", "grad weight", "grad bias"), torch.autograd.grad(y, (x, w, b), g),
                          torch.autograd.grad(y_ref, (x, w, b), g)):
        assert_close_scaled(a, e.double(), 5e-5, name)


def test_compiled_with_dynamic_shapes():
    """Symbolic sizes: the rule (which counts tiles) is guarded like any branch on sizes; every
    size gives eager's result, the kernel running where the rule says so."""
    torch._dynamo.reset()
    w, b = torch.randn(64, 32, 3, 3) / 17, torch.randn(64)

    def layer(x):
        return FI.gated_conv2d(x, w, b, padding=1)

    with use_backend("cpu"):
        compiled = torch.compile(layer, fullgraph=True, dynamic=True)
        for size in ((26, 30), (28, 30), (12, 10)):  # 56, 56 and 9 tiles
            x = torch.randn(1, 32, *size)
            torch.testing.assert_close(compiled(x), layer(x), rtol=1e-4, atol=1e-4)
            assert _ran_winograd(lambda: compiled(x)) == (size != (12, 10))


@pytest.mark.parametrize("size", [(10, 10), (66, 66)], ids=["one-pass", "chunks"])
def test_backward_inside_an_autocast_region(size):
    """A float32 forward whose backward runs inside a CPU autocast region (an AMP step that
    calls backward in its ``with`` block): float32 gradients as torch's convolution gives, not
    an error (the kernels' products would otherwise be autocast's bfloat16)."""
    x, w, b = make_inputs(1, 32, 32, *size, "contiguous", True)
    y = W.winograd_conv2d(x, w, b, (1, 1), (1, 1))
    grad = torch.randn_like(y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch.autograd.grad(y, (x, w, b), grad)
    _, want = float64_reference(x, w, b, (1, 1), (1, 1), grad)
    for name, a, e in zip(("grad x", "grad weight", "grad bias"), got, want):
        assert a.dtype == torch.float32, name
        assert_close_scaled(a, e, 2e-5, name)
