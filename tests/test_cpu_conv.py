"""The cpu backend's direct convolution (fastinpaint/ops/_cpu_conv.py): the input gradient of
few input channels (csrc/cpu/conv_input_grad.cpp) and the weight gradient of strided layers
(csrc/cpu/conv_weight_grad.cpp) against torch's convolution backward in float64 on random
inputs (odd sizes, strides, paddings, dilations and rectangular kernels, NCHW and channels-last,
float32 and float64), thread counts, bad arguments; the layout copy
(csrc/cpu/layout_copy.cpp) against torch's; the autograd op with and without channels-last
inside (gradients, layouts, double backward, opcheck, torch.compile), where each part applies,
and the layers that run it (gated, partial and spectral-normalised convolutions)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastinpaint.functional as FI
from fastinpaint import use_backend
from fastinpaint.nn import SpectralNormConv2d
from fastinpaint.ops import _cpu_conv as CIG

from conftest import assert_close_scaled, assert_runs_at_lower_cpu_capabilities, skip_unless_available

pytestmark = pytest.mark.usefixtures("_cpu_kernels")

CL = torch.channels_last

# (B, C, O, H, W, kernel, stride, padding, dilation)
CASES = [
    (1, 5, 48, 37, 29, (5, 5), (1, 1), (2, 2), (1, 1)),    # DeepFill v2's input layer, odd map
    (2, 4, 64, 33, 40, (5, 5), (2, 2), (2, 2), (1, 1)),    # SN-PatchGAN's first layer
    (1, 3, 20, 23, 31, (7, 7), (2, 2), (3, 3), (1, 1)),    # PConv's first layer
    (3, 3, 7, 17, 9, (3, 3), (2, 2), (0, 0), (2, 2)),      # no padding, dilated, rows left over
    (1, 1, 3, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1)),       # one channel
    (2, 8, 16, 20, 21, (3, 5), (2, 1), (1, 2), (1, 2)),    # rectangular, mixed stride and dilation
    (1, 6, 9, 5, 40, (5, 3), (1, 3), (4, 0), (1, 1)),      # padding beyond the kernel's reach
    (2, 2, 5, 30, 6, (2, 2), (3, 3), (0, 1), (4, 1)),      # stride above the kernel: rows no one reaches
    (1, 8, 6, 12, 120, (5, 5), (1, 1), (2, 2), (1, 1)),    # wide rows: float64 bands in several products
    (1, 2, 4, 45, 20, (7, 7), (1, 1), (9, 9), (3, 3)),     # a reach of 18 rows: bands longer than 8
]
IDS = [f"B{c[0]}-{c[1]}to{c[2]}-{c[3]}x{c[4]}-k{c[5][0]}{c[5][1]}-s{c[6][0]}{c[6][1]}-p{c[7][0]}{c[7][1]}"
       f"-d{c[8][0]}{c[8][1]}" for c in CASES]


@pytest.fixture
def _cpu_kernels():
    skip_unless_available("cpu", "cpu")


def _problem(case, dtype=torch.float32, fmt=torch.contiguous_format):
    B, C, O, H, W, k, stride, padding, dilation = case
    x = torch.randn(B, C, H, W, dtype=dtype).contiguous(memory_format=fmt)
    w = (torch.randn(O, C, *k, dtype=dtype) / (C * k[0] * k[1]) ** 0.5).contiguous(memory_format=fmt)
    y = F.conv2d(x, w, None, stride, padding, dilation)
    gy = torch.randn_like(y)
    return x, w, gy, list(stride), list(padding), list(dilation)


def _torch_input_grad(x, w, gy, stride, padding, dilation):
    """torch's input gradient in float64."""
    return torch.ops.aten.convolution_backward(gy.double(), x.double(), w.double(), None, stride, padding, dilation,
                                               False, [0, 0], 1, [True, False, False])[0]


def test_kernel_on_strided_views():
    """A gradient and a weight that are views (every other column, a transposed weight) read as any tensor."""
    x = torch.randn(2, 4, 19, 23)
    w = torch.randn(4, 30, 5, 5).transpose(0, 1)                 # (30, 4, 5, 5), not contiguous
    gy = torch.randn(2, 30, 10, 24)[:, :, :, ::2]                # (2, 30, 10, 12), not contiguous
    got = CIG.INPUT_GRAD("cpu", gy, w, list(x.shape), [2, 2], [2, 2], [1, 1], False)
    assert_close_scaled(got, _torch_input_grad(x, w, gy, [2, 2], [2, 2], [1, 1]), 1e-5, "grad x")


@pytest.mark.parametrize("case", [(2, 5, 24, 67, 45, (5, 5), (1, 1), (2, 2), (1, 1)),
                                  (3, 4, 32, 70, 33, (5, 5), (2, 2), (2, 2), (1, 1)),
                                  (1, 3, 8, 50, 20, (3, 3), (1, 1), (4, 4), (4, 4)),
                                  (2, 2, 4, 80, 20, (7, 7), (1, 1), (9, 9), (3, 3))],
                         ids=["s1-bands", "s2-bands", "dilated-bands", "long-bands"])
def test_threads(threads, case):
    """Many bands per image at every thread count: torch's result, and the same bits whatever the
    count (the bands do not depend on it)."""
    torch.manual_seed(1)
    x, w, gy, stride, padding, dilation = _problem(case)
    got = CIG.INPUT_GRAD("cpu", gy, w, list(x.shape), stride, padding, dilation, True)
    assert_close_scaled(got, _torch_input_grad(x, w, gy, stride, padding, dilation), 1e-5, "grad x")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = CIG.INPUT_GRAD("cpu", gy, w, list(x.shape), stride, padding, dilation, True)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got, serial)


def test_empty_inputs():
    w = torch.randn(8, 3, 3, 3)
    got = CIG.INPUT_GRAD("cpu", torch.randn(0, 8, 4, 4), w, [0, 3, 6, 6], [1, 1], [0, 0], [1, 1], True)
    assert got.shape == (0, 3, 6, 6)
    got = CIG.INPUT_GRAD("cpu", torch.randn(1, 0, 4, 4), torch.randn(0, 3, 3, 3), [1, 3, 6, 6], [1, 1], [0, 0],
                         [1, 1], False)
    assert got.shape == (1, 3, 6, 6) and not got.any()


@pytest.mark.parametrize("args, match", [
    ((torch.randn(1, 8, 4, 4), torch.randn(8, 3, 3, 3), [1, 3, 7, 6]), "not the convolution's output"),
    ((torch.randn(1, 8, 4, 4), torch.randn(8, 2, 3, 3), [1, 3, 6, 6]), "do not match"),
    ((torch.randn(2, 8, 4, 4), torch.randn(8, 3, 3, 3), [1, 3, 6, 6]), "do not match"),
    ((torch.randn(1, 8, 4, 4), torch.randn(8, 3, 3, 3).double(), [1, 3, 6, 6]), "float32 or both float64"),
    ((torch.randn(1, 8, 4, 4).half(), torch.randn(8, 3, 3, 3).half(), [1, 3, 6, 6]), "float32 or both float64"),
    ((torch.randn(8, 4, 4), torch.randn(8, 3, 3, 3), [1, 3, 6, 6]), r"\(B, O, Ho, Wo\)"),
    ((torch.randn(1, 8, 4, 4), torch.randn(8, 3, 3, 3), [3, 6, 6]), r"the input \(B, C, H, W\)"),
], ids=["size", "channels", "batch", "dtypes", "half", "dims", "input-size"])
def test_kernel_refuses_bad_arguments(args, match):
    with pytest.raises(RuntimeError, match=match):
        CIG.INPUT_GRAD("cpu", *args, [1, 1], [0, 0], [1, 1], False)
    with pytest.raises(RuntimeError, match="stride and dilation"):
        CIG.INPUT_GRAD("cpu", torch.randn(1, 8, 4, 4), torch.randn(8, 3, 3, 3), [1, 3, 6, 6], [0, 1], [0, 0],
                       [1, 1], False)


# strided layers of many channels, where the layers use the weight gradient kernel
# (B, C, O, H, W, kernel, stride, padding, dilation), as CASES
STRIDED_CASES = [
    (1, 24, 16, 35, 33, (3, 3), (2, 2), (1, 1), (1, 1)),   # DeepFill v2's downsampling layer, odd map
    (2, 17, 9, 26, 19, (5, 5), (2, 2), (2, 2), (1, 1)),    # SN-PatchGAN's, odd channels, batch of two
    (1, 12, 7, 21, 30, (4, 3), (3, 2), (0, 2), (2, 1)),    # rectangular, no padding in y, dilated in y
    (3, 10, 5, 9, 8, (3, 3), (2, 2), (5, 5), (1, 1)),      # padding beyond the kernel's reach
]
STRIDED_IDS = [f"B{c[0]}-{c[1]}to{c[2]}-{c[3]}x{c[4]}-k{c[5][0]}{c[5][1]}-s{c[6][0]}{c[6][1]}-p{c[7][0]}{c[7][1]}"
               f"-d{c[8][0]}{c[8][1]}" for c in STRIDED_CASES]


def _torch_weight_grad(x, w, gy, stride, padding, dilation):
    """torch's weight gradient in float64."""
    return torch.ops.aten.convolution_backward(gy.double(), x.double(), w.double(), None, stride, padding, dilation,
                                               False, [0, 0], 1, [False, True, False])[1]


def _kernel_grad(which, x, w, gy, stride, padding, dilation, channels_last):
    """fastinpaint's kernel's gradient of the input or of the weight."""
    if which == "input":
        return CIG.INPUT_GRAD("cpu", gy, w, list(x.shape), stride, padding, dilation, channels_last)
    return CIG.WEIGHT_GRAD("cpu", gy, x, list(w.shape), stride, padding, dilation, channels_last)


# the input gradient kernel on the few-channel geometries, the weight gradient kernel on every one
# (it takes any; the layers use it for strided ones of many channels)
KERNEL_CASES = ([pytest.param("input", c, id=f"input-{i}") for c, i in zip(CASES, IDS)]
                + [pytest.param("weight", c, id=f"weight-{i}") for c, i in zip(CASES + STRIDED_CASES,
                                                                                 IDS + STRIDED_IDS)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "cl"])
@pytest.mark.parametrize("which, case", KERNEL_CASES)
def test_kernels_match_torch(which, case, fmt, dtype):
    x, w, gy, stride, padding, dilation = _problem(case, dtype, fmt)
    want = (_torch_input_grad if which == "input" else _torch_weight_grad)(x, w, gy, stride, padding, dilation)
    for channels_last in (False, True):
        got = _kernel_grad(which, x, w, gy, stride, padding, dilation, channels_last)
        assert got.dtype == dtype
        assert got.is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)
        assert_close_scaled(got, want, 1e-5 if dtype == torch.float32 else 1e-12, f"grad {which}")


def test_weight_grad_kernel_on_strided_views():
    x = torch.randn(2, 30, 19, 46)[:, :, :, ::2]                 # (2, 30, 19, 23), not contiguous
    gy = torch.randn(2, 24, 10, 12).transpose(2, 3)[:, :, :, :10].transpose(2, 3)   # (2, 24, 10, 12), a view
    w = torch.empty(24, 30, 3, 3)
    got = CIG.WEIGHT_GRAD("cpu", gy, x, list(w.shape), [2, 2], [1, 1], [1, 1], False)
    assert_close_scaled(got, _torch_weight_grad(x, w, gy, [2, 2], [1, 1], [1, 1]), 1e-5, "grad weight")


@pytest.mark.parametrize("case", [(3, 64, 8, 128, 126, (5, 5), (2, 2), (2, 2), (1, 1)),
                                  (2, 16, 6, 200, 201, (3, 3), (2, 2), (1, 1), (1, 1))],
                         ids=["groups-across-images", "bands-within-images"])
def test_weight_grad_threads(threads, case):
    """Many bands (more than the 8 accumulators) at every thread count: torch's result. (Not the
    same bits at every count: torch's GEMM splits its products by the thread count.)"""
    torch.manual_seed(1)
    x, w, gy, stride, padding, dilation = _problem(case)
    got = CIG.WEIGHT_GRAD("cpu", gy, x, list(w.shape), stride, padding, dilation, True)
    assert_close_scaled(got, _torch_weight_grad(x, w, gy, stride, padding, dilation), 1e-5, "grad weight")


def test_weight_grad_empty_inputs():
    got = CIG.WEIGHT_GRAD("cpu", torch.randn(0, 8, 4, 4), torch.randn(0, 3, 8, 8), [8, 3, 3, 3], [2, 2], [1, 1],
                          [1, 1], True)
    assert got.shape == (8, 3, 3, 3) and not got.any()
    got = CIG.WEIGHT_GRAD("cpu", torch.randn(1, 0, 4, 4), torch.randn(1, 3, 8, 8), [0, 3, 3, 3], [2, 2], [1, 1],
                          [1, 1], False)
    assert got.shape == (0, 3, 3, 3)


@pytest.mark.parametrize("args, match", [
    ((torch.randn(1, 8, 4, 4), torch.randn(1, 3, 7, 6), [8, 3, 3, 3]), "not the convolution's output"),
    ((torch.randn(1, 8, 4, 4), torch.randn(1, 3, 6, 6), [8, 2, 3, 3]), "do not match"),
    ((torch.randn(1, 8, 4, 4), torch.randn(1, 3, 6, 6), [7, 3, 3, 3]), "do not match"),
    ((torch.randn(1, 8, 4, 4), torch.randn(1, 3, 6, 6).double(), [8, 3, 3, 3]), "float32 or both float64"),
    ((torch.randn(1, 8, 4, 4), torch.randn(3, 6, 6), [8, 3, 3, 3]), r"input must be \(B, C, H, W\)"),
    ((torch.randn(1, 8, 4, 4), torch.randn(1, 3, 6, 6), [8, 3, 3]), r"the weight \(O, C, kh, kw\)"),
], ids=["size", "channels", "filters", "dtypes", "dims", "weight-size"])
def test_weight_grad_kernel_refuses_bad_arguments(args, match):
    with pytest.raises(RuntimeError, match=match):
        CIG.WEIGHT_GRAD("cpu", *args, [1, 1], [0, 0], [1, 1], False)
    with pytest.raises(RuntimeError, match="stride and dilation"):
        CIG.WEIGHT_GRAD("cpu", torch.randn(1, 8, 4, 4), torch.randn(1, 3, 6, 6), [8, 3, 3, 3], [1, 1], [0, 0],
                        [0, 1], False)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "cl"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_conv2d_gradients_and_layouts(fmt, bias):
    """The op's forward is torch's; its gradients equal torch's (float64), the input's in the
    input's layout and the weight's in the weight's."""
    x = torch.randn(2, 5, 21, 19).contiguous(memory_format=fmt).requires_grad_()
    w = (torch.randn(12, 5, 5, 5) / 11).requires_grad_()   # NCHW weight for either input layout
    b = torch.randn(12, requires_grad=True) if bias else None
    y = CIG.conv2d(x, w, b, (2, 2), (2, 2), (1, 1))
    ref = F.conv2d(x.double(), w.double(), None if b is None else b.double(), 2, 2)
    assert_close_scaled(y, ref, 1e-5, "output")
    assert y.is_contiguous(memory_format=fmt)
    g = torch.randn_like(y)
    inputs = [t for t in (x, w, b) if t is not None]
    with torch.autograd.profiler.profile() as prof:
        got = torch.autograd.grad(y, inputs, g)
    assert any("conv2d_input_grad" in e.name for e in prof.function_events)
    want = torch.autograd.grad(ref, inputs, g.double())
    for name, a, e in zip(("grad x", "grad weight", "grad bias"), got, want):
        assert_close_scaled(a, e, 2e-5, name)
    assert got[0].is_contiguous(memory_format=fmt)
    assert got[1].is_contiguous()


def test_conv2d_weight_only_and_input_only():
    x = torch.randn(1, 4, 12, 13)
    w = torch.randn(6, 4, 3, 3, requires_grad=True)
    # no input gradient wanted: torch's convolution itself
    assert CIG.conv2d(x, w, None, (1, 1), (1, 1), (1, 1)).grad_fn.name() == "ConvolutionBackward0"
    xg = x.clone().requires_grad_()
    wd = w.detach()
    y = CIG.conv2d(xg, wd, None, (1, 1), (1, 1), (1, 1))
    (gx,) = torch.autograd.grad(y.sum(), xg)
    (want,) = torch.autograd.grad(F.conv2d(xg, wd, None, 1, 1).sum(), xg)
    torch.testing.assert_close(gx, want, rtol=1e-5, atol=1e-5)
    y = CIG.conv2d(xg, w, None, (1, 1), (1, 1), (1, 1))
    (gw,) = torch.autograd.grad(y.sum(), w)
    (want,) = torch.autograd.grad(F.conv2d(xg, w, None, 1, 1).sum(), w)
    torch.testing.assert_close(gw, want, rtol=1e-5, atol=1e-5)


def test_gradcheck_and_double_backward():
    x = torch.randn(1, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        return CIG.conv2d(x, w, b, (2, 1), (1, 1), (1, 2))

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("inside,keep", [(False, False), (True, False), (True, True)],
                         ids=["as-given", "cl-inside", "cl-inside-kept"])
def test_opcheck(inside, keep):
    for fmt in ((torch.contiguous_format,) if inside else (torch.contiguous_format, CL)):
        x = torch.randn(2, 4, 11, 9).contiguous(memory_format=fmt).requires_grad_()
        w, b = torch.randn(6, 4, 3, 3, requires_grad=True), torch.randn(6, requires_grad=True)
        for channels_last in (False, True):
            torch.library.opcheck(torch.ops.fastinpaint.layout_copy.default, (x.detach(), channels_last))
        torch.library.opcheck(torch.ops.fastinpaint.conv2d_cpu.default, (x, w, b, [2, 1], [1, 1], [1, 2], inside, keep))
        torch.library.opcheck(torch.ops.fastinpaint.conv2d_cpu.default,
                              (x, w, None, [1, 1], [0, 0], [1, 1], inside, keep))
        gy = torch.randn(2, 6, 6, 7).contiguous(memory_format=fmt)   # the output of stride (2, 1), dilation (1, 2)
        for channels_last in (False, True):
            torch.library.opcheck(torch.ops.fastinpaint.conv2d_input_grad.default,
                                  (gy, w.detach(), [2, 4, 11, 9], [2, 1], [1, 1], [1, 2], channels_last))
            torch.library.opcheck(torch.ops.fastinpaint.conv2d_weight_grad.default,
                                  (gy, x.detach(), [6, 4, 3, 3], [2, 1], [1, 1], [1, 2], channels_last))


def test_applies(monkeypatch):
    x, w = torch.randn(1, 8, 5, 5), torch.randn(4, 8, 3, 3)
    assert CIG.applies(x, w)
    assert not CIG.applies(torch.randn(1, 9, 5, 5), torch.randn(4, 9, 3, 3))
    assert not CIG.applies(x, w, groups=2)
    assert not CIG.applies(x.half(), w.half())
    assert not CIG.applies(x, w.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not CIG.applies(x, w)
    assert not CIG.runs_channels_last_inside(x, w)   # few channels: NCHW as given
    monkeypatch.setenv("FASTINPAINT_CONV_INPUT_GRAD", "0")
    assert not CIG.applies(x, w)


def test_weight_grad_applies(monkeypatch):
    x, w = torch.randn(1, 9, 8, 8), torch.randn(4, 9, 3, 3)
    assert CIG.weight_grad_applies(x, w, (2, 2))
    assert CIG.weight_grad_applies(x, w, [3, 2])
    assert not CIG.weight_grad_applies(x, w, (1, 1))                            # stride 1: a tie, oneDNN's
    assert not CIG.weight_grad_applies(x, w, (2, 1))
    assert not CIG.weight_grad_applies(torch.randn(1, 8, 8, 8), torch.randn(4, 8, 3, 3), (2, 2))   # few channels
    assert not CIG.weight_grad_applies(x, w, (2, 2), groups=3)
    assert not CIG.weight_grad_applies(x.half(), w.half(), (2, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not CIG.weight_grad_applies(x, w, (2, 2))
    monkeypatch.setenv("FASTINPAINT_CONV_WEIGHT_GRAD", "0")
    assert not CIG.weight_grad_applies(x, w, (2, 2))


def test_runs_channels_last_inside(monkeypatch):
    x, w = torch.randn(2, 16, 6, 5), torch.randn(4, 16, 3, 3)
    assert CIG.runs_channels_last_inside(x, w)
    assert not CIG.runs_channels_last_inside(x.contiguous(memory_format=CL), w)   # channels-last already
    assert not CIG.runs_channels_last_inside(torch.randn(2, 16, 1, 1), w)          # both layouts at once
    assert not CIG.runs_channels_last_inside(x[:, :, :, ::2], w)                   # a strided view
    assert not CIG.runs_channels_last_inside(x, w, groups=2)
    assert not CIG.runs_channels_last_inside(x.half(), w.half())
    monkeypatch.setenv("FASTINPAINT_CONV_CHANNELS_LAST", "0")
    assert not CIG.runs_channels_last_inside(x, w)


def _ran_kernel(fn) -> bool:
    with torch.autograd.profiler.profile() as prof:
        fn()
    return any("conv2d_input_grad" in e.name for e in prof.function_events)


def test_gated_conv_runs_it_where_it_applies():
    """The gated input layer (5 channels) on the cpu backend gets the kernel's input gradient and
    the reference's results; 16 channels, no input gradient, or the reference backend: not."""
    x = torch.randn(1, 5, 30, 27).contiguous(memory_format=CL).requires_grad_()
    w = (torch.randn(16, 5, 5, 5) / 11).requires_grad_()
    b = torch.randn(16).requires_grad_()

    def step(x, w, b):
        y = FI.gated_conv2d(x, w, b, padding=2)
        return y, torch.autograd.grad(y, [t for t in (x, w, b) if t.requires_grad], torch.ones_like(y))

    with use_backend("cpu"):
        assert _ran_kernel(lambda: step(x, w, b))
        y, got = step(x, w, b)
        assert not _ran_kernel(lambda: step(x.detach(), w, b))
        x16 = torch.randn(1, 16, 30, 27).requires_grad_()
        assert not _ran_kernel(lambda: step(x16, torch.randn(16, 16, 5, 5), b))
    with use_backend("reference"):
        assert not _ran_kernel(lambda: step(x, w, b))
        ref, want = step(x, w, b)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    for name, a, e in zip(("grad x", "grad weight", "grad bias"), got, want):
        assert_close_scaled(a, e.double(), 2e-5, name)
    assert got[0].is_contiguous(memory_format=CL)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "cl"])
def test_gated_downsampling_layer_runs_the_weight_gradient(fmt):
    """A gated stride-2 layer of 24 channels on the cpu backend gets the weight gradient kernel
    and the reference's results (its gradients in its tensors' layouts); without a weight gradient,
    or at stride 1: not."""
    x = torch.randn(1, 24, 31, 28).contiguous(memory_format=fmt).requires_grad_()
    w = (torch.randn(32, 24, 3, 3) / 15).contiguous(memory_format=fmt).requires_grad_()
    b = torch.randn(32).requires_grad_()

    def step(x, w, b, stride=2):
        y = FI.gated_conv2d(x, w, b, stride=stride, padding=1)
        return y, torch.autograd.grad(y, [t for t in (x, w, b) if t.requires_grad], torch.ones_like(y))

    with use_backend("cpu"):
        assert _ran(lambda: step(x, w, b), "conv2d_weight_grad")
        y, got = step(x, w, b)
        assert not _ran(lambda: step(x, w.detach(), b), "conv2d_weight_grad")
        assert not _ran(lambda: step(x, w, b, stride=1), "conv2d_weight_grad")
    with use_backend("reference"):
        ref, want = step(x, w, b)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    for name, a, e in zip(("grad x", "grad weight", "grad bias"), got, want):
        assert_close_scaled(a, e.double(), 2e-5, name)
    assert got[0].is_contiguous(memory_format=fmt) and got[1].is_contiguous(memory_format=fmt)


def test_compiled_strided_layer_runs_channels_last_inside():
    """Under torch.compile a strided NCHW layer whose weight gradient is fastinpaint's runs the op,
    channels-last inside (inductor cannot lay out a convolution inside the op), with the eager
    layer's results; without a weight gradient inductor gets torch's convolution."""
    torch._dynamo.reset()
    x = torch.randn(1, 16, 23, 26).requires_grad_()
    w = (torch.randn(12, 16, 3, 3) / 12).requires_grad_()
    b = torch.randn(12).requires_grad_()

    def layer(x, w, b):
        return CIG.conv2d(x, w, b, (2, 2), (1, 1), (1, 1))

    graphs = []

    def recording(gm, example_inputs):   # dynamo's graph, run as traced
        graphs.append(gm)
        return gm.forward

    traced = torch.compile(layer, fullgraph=True, backend=recording)
    traced(x, w, b)
    (call,) = [n for g in graphs for n in g.graph.nodes if "conv2d_cpu" in str(n.target)]
    assert call.args[-2] is True and call.args[-1] is False   # inside, the output copied back to NCHW
    compiled = torch.compile(layer, fullgraph=True)
    y = compiled(x, w, b)
    assert _ran(lambda: compiled(x, w, b).sum().backward(), "conv2d_weight_grad")
    assert y.is_contiguous()
    ref = F.conv2d(x.double(), w.double(), b.double(), 2, 1)
    assert_close_scaled(y, ref, 1e-5, "output")
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w, b), g)
    want = torch.autograd.grad(ref, (x, w, b), g.double())
    for name, a, e in zip(("grad x", "grad weight", "grad bias"), got, want):
        assert_close_scaled(a, e, 2e-5, name)
    torch._dynamo.reset()
    frozen = torch.compile(layer, fullgraph=True)
    frozen(x, w.detach(), b.detach())
    assert not _ran(lambda: frozen(x, w.detach(), b.detach()), "conv2d_cpu")


def test_partial_conv_runs_it():
    x = torch.randn(1, 3, 33, 31).requires_grad_()
    mask = (torch.rand(1, 1, 33, 31) > 0.3).float()
    w = (torch.randn(8, 3, 7, 7) / 11).requires_grad_()
    with use_backend("cpu"):
        assert _ran_kernel(lambda: FI.partial_conv2d(x, mask, w, None, stride=2, padding=3)[0].sum().backward())
        y, _ = FI.partial_conv2d(x, mask, w, None, stride=2, padding=3)
    with use_backend("reference"):
        ref, _ = FI.partial_conv2d(x, mask, w, None, stride=2, padding=3)
    g = torch.randn_like(y)
    for name, a, e in zip(("grad x", "grad weight"), torch.autograd.grad(y, (x, w), g),
                          torch.autograd.grad(ref, (x, w), g)):
        assert_close_scaled(a, e.double(), 2e-5, name)


def test_spectral_norm_first_layer_runs_it():
    """SN-PatchGAN's first layer (4 channels, not folded) on the cpu backend: the kernel's input
    gradient, and the gradients of torch's parametrization."""
    torch.manual_seed(2)
    ours = SpectralNormConv2d(4, 16, 5, 2, 2)
    theirs = torch.nn.utils.parametrizations.spectral_norm(torch.nn.Conv2d(4, 16, 5, 2, 2))
    theirs.load_state_dict(ours.state_dict())
    ours.eval(), theirs.eval()   # no power-iteration step: both use the stored vectors
    x = torch.randn(2, 4, 29, 26, requires_grad=True)
    with use_backend("cpu"):
        assert _ran_kernel(lambda: ours(x).sum().backward())
        y = ours(x)
    ref = theirs(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    params = (ours.parametrizations.weight.original, ours.bias)
    ref_params = (theirs.parametrizations.weight.original, theirs.bias)
    got = torch.autograd.grad(y, (x, *params), g)
    want = torch.autograd.grad(ref, (x, *ref_params), g)
    for name, a, e in zip(("grad x", "grad weight", "grad bias"), got, want):
        assert_close_scaled(a, e.double(), 2e-5, name)


def test_compiled_layer_runs_it_and_matches_eager():
    torch._dynamo.reset()
    x = torch.randn(1, 5, 26, 30).contiguous(memory_format=CL).requires_grad_()
    w = (torch.randn(16, 5, 5, 5) / 11).requires_grad_()
    b = torch.randn(16).requires_grad_()

    def layer(x, w, b):
        return FI.gated_conv2d(x, w, b, padding=2)

    with use_backend("cpu"):
        compiled = torch.compile(layer, fullgraph=True)
        y = compiled(x, w, b)
        assert _ran_kernel(lambda: compiled(x, w, b).sum().backward())
        eager = layer(x, w, b)
    torch.testing.assert_close(y, eager, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    for a, e in zip(torch.autograd.grad(y, (x, w, b), g), torch.autograd.grad(eager, (x, w, b), g)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.int16],
                         ids=["f32", "f64", "bf16", "i16"])
@pytest.mark.parametrize("shape", [(2, 64, 33, 17), (1, 4, 70, 3), (3, 37, 1, 40), (1, 2, 5, 5), (2, 300, 3, 2)],
                         ids=["64ch", "4ch", "one-row", "tiny", "300ch"])
def test_layout_copy_matches_torch(shape, dtype):
    """Both directions, bit for bit, in the asked layout; never the input itself."""
    x = (torch.randn(*shape) * 100).to(dtype)
    for src, channels_last in ((x, True), (x.contiguous(memory_format=CL), False)):
        got = CIG.LAYOUT_COPY("cpu", src, channels_last)
        fmt = CL if channels_last else torch.contiguous_format
        assert got.is_contiguous(memory_format=fmt) and got.dtype == dtype
        assert torch.equal(got, src) and got.data_ptr() != src.data_ptr()
        again = CIG.LAYOUT_COPY("cpu", got, channels_last)   # already in the layout: a copy
        assert torch.equal(again, src) and again.data_ptr() != got.data_ptr()


def test_layout_copy_threads(threads):
    x = torch.randn(3, 48, 67, 45)
    got = CIG.LAYOUT_COPY("cpu", x, True)
    assert torch.equal(got, x) and got.is_contiguous(memory_format=CL)
    back = CIG.LAYOUT_COPY("cpu", got, False)
    assert torch.equal(back, x) and back.is_contiguous()


def test_layout_copy_of_views_and_bad_input():
    x = torch.randn(2, 8, 9, 14)[:, :, :, ::2]   # neither layout: torch's copy
    for channels_last in (False, True):
        got = CIG.LAYOUT_COPY("cpu", x, channels_last)
        assert torch.equal(got, x)
        assert got.is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)
    with pytest.raises(RuntimeError, match=r"x must be \(B, C, H, W\)"):
        CIG.LAYOUT_COPY("cpu", torch.randn(3, 4, 5), True)


def _ran(fn, name) -> bool:
    with torch.autograd.profiler.profile() as prof:
        fn()
    return any(name in e.name for e in prof.function_events)


@pytest.mark.parametrize("channels", [4, 16], ids=["few", "many"])
def test_conv2d_channels_last_inside(channels):
    """An NCHW layer that asks for channels-last inside: torch's results (float64), an NCHW output
    and input gradient, the weight's gradient in the weight's layout; with many channels the
    layout copies ran, with few the input gradient kernel (and the forward stays NCHW)."""
    x = torch.randn(2, channels, 23, 20, requires_grad=True)
    w = (torch.randn(12, channels, 5, 5) / (5 * channels ** 0.5)).requires_grad_()
    b = torch.randn(12, requires_grad=True)

    def call():
        return CIG.conv2d(x, w, b, (2, 2), (2, 2), (1, 1), channels_last_inside=True)

    y = call()
    assert y.is_contiguous()
    ref = F.conv2d(x.double(), w.double(), b.double(), 2, 2)
    assert_close_scaled(y, ref, 1e-5, "output")
    g = torch.randn_like(y)
    assert _ran(lambda: torch.autograd.grad(call(), (x, w, b), g), "conv2d_input_grad") == (channels <= 8)
    with torch.no_grad():
        assert _ran(call, "layout_copy") == (channels > 8)
    got = torch.autograd.grad(y, (x, w, b), g)
    want = torch.autograd.grad(ref, (x, w, b), g.double())
    for name, a, e in zip(("grad x", "grad weight", "grad bias"), got, want):
        assert_close_scaled(a, e, 2e-5, name)
    assert got[0].is_contiguous() and got[1].is_contiguous()
    with torch.no_grad():   # no gradient (the op's body, called directly): the same output, NCHW
        y_nograd = call()
    torch.testing.assert_close(y_nograd, y.detach(), rtol=0, atol=0)
    assert y_nograd.is_contiguous() and y_nograd.grad_fn is None


@pytest.mark.parametrize("keep", [False, True], ids=["nchw-out", "cl-out"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw-in", "cl-in"])
def test_conv_channels_last_helper(keep, bias, fmt):
    """The one channels-last convolution body (conv_channels_last): torch's output (float64) on odd
    sizes, strides, paddings and dilations, in the layout asked; the layout copies run only where a
    tensor has to move (none for a channels-last input and weight whose output stays so)."""
    for B, C, O, H, W, k, s, p, d in [(2, 13, 11, 23, 17, (5, 3), (2, 1), (2, 1), (1, 2)),
                                      (1, 9, 7, 6, 31, (3, 3), (1, 3), (0, 2), (2, 1))]:
        x = torch.randn(B, C, H, W).contiguous(memory_format=fmt)
        w = (torch.randn(O, C, *k) / (C * k[0] * k[1]) ** 0.5).contiguous(memory_format=fmt)
        b = torch.randn(O) if bias else None
        with torch.no_grad():
            y = CIG.conv_channels_last(x, w, b, s, p, d, keep_channels_last=keep)
            copies = _ran(lambda: CIG.conv_channels_last(x, w, b, s, p, d, keep_channels_last=keep), "layout_copy")
        ref = F.conv2d(x.double(), w.double(), None if b is None else b.double(), s, p, d)
        assert_close_scaled(y, ref, 1e-5, "output")
        assert y.is_contiguous(memory_format=CL if keep else torch.contiguous_format)
        assert copies == (fmt != CL or not keep)


def _assert_same_sn_gradients(x, y, ours, ref, theirs):
    """The gradients of x, the weight and the bias through our SpectralNormConv2d (output y) and
    torch's parametrization (output ref) agree."""
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, ours.parametrizations.weight.original, ours.bias), g)
    want = torch.autograd.grad(ref, (x, theirs.parametrizations.weight.original, theirs.bias), g)
    for name, a, e in zip(("grad x", "grad weight", "grad bias"), got, want):
        assert_close_scaled(a, e.double(), 2e-5, name)


def test_spectral_norm_layer_runs_channels_last_inside():
    """An unfolded SpectralNormConv2d on an NCHW input on the cpu backend runs channels-last inside,
    with torch's parametrization's results; a channels-last input and torch.compile do not."""
    torch.manual_seed(3)
    ours = SpectralNormConv2d(16, 24, 5, 2, 2).eval()
    theirs = torch.nn.utils.parametrizations.spectral_norm(torch.nn.Conv2d(16, 24, 5, 2, 2)).eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 16, 27, 30, requires_grad=True)
    with use_backend("cpu"):
        assert _ran(lambda: ours(x).sum().backward(), "layout_copy")
        assert _ran(lambda: ours(x).sum().backward(), "conv2d_weight_grad")   # stride 2, 16 channels
        assert not _ran(lambda: ours(x.contiguous(memory_format=CL)), "layout_copy")
        y = ours(x)
        torch._dynamo.reset()
        compiled = torch.compile(ours)
        with torch.no_grad():   # the forward alone (with gradients, the backward's copy of x may join it)
            compiled(x)         # traced before the profile
            assert not _ran(lambda: compiled(x), "layout_copy")
        torch.testing.assert_close(compiled(x), y, rtol=1e-4, atol=1e-4)
    ref = theirs(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    _assert_same_sn_gradients(x, y, ours, ref, theirs)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "cl"])
def test_folded_spectral_norm_layer_keeps_torchs_weight_gradient(fmt):
    """A folded SpectralNormConv2d (a deep stride-2 layer: a small output) on the cpu backend keeps
    torch's backward (the weight gradient kernel measured slower there), with torch's
    parametrization's gradients; an unfolded strided layer of the same channels runs the kernel."""
    from fastinpaint.ops import _spectral_norm

    torch.manual_seed(4)
    ours = SpectralNormConv2d(16, 32, 5, 2, 2).eval()
    theirs = torch.nn.utils.parametrizations.spectral_norm(torch.nn.Conv2d(16, 32, 5, 2, 2)).eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 16, 7, 6).contiguous(memory_format=fmt).requires_grad_()
    assert _spectral_norm.folds(x, ours.parametrizations.weight.original, (2, 2), (2, 2), (1, 1))
    big = torch.randn(2, 16, 40, 40).contiguous(memory_format=fmt)
    assert not _spectral_norm.folds(big, ours.parametrizations.weight.original, (2, 2), (2, 2), (1, 1))
    with use_backend("cpu"):
        assert not _ran(lambda: ours(x).sum().backward(), "conv2d_weight_grad")
        assert _ran(lambda: ours(big).sum().backward(), "conv2d_weight_grad")
        y = ours(x)
    ref = theirs(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    _assert_same_sn_gradients(x, y, ours, ref, theirs)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL], ids=["nchw", "cl"])
def test_folded_spectral_norm_forward_runs_channels_last_inside(fmt, monkeypatch):
    """A folded SpectralNormConv2d on an NCHW input not small against its weight, of enough
    channels (SN-PatchGAN's conv4), runs its forward on channels-last copies of the input and the
    weight, with torch's parametrization's output (NCHW) and gradients; a channels-last input, a
    small input, fewer channels and torch.compile's trace of the op keep their paths and numbers.
    (24 channels, the minimum lowered to them: the path at a size that runs fast.)"""
    from fastinpaint.ops import _spectral_norm

    torch.manual_seed(5)
    ours = SpectralNormConv2d(24, 24, 5, 2, 2).train()
    theirs = torch.nn.utils.parametrizations.spectral_norm(torch.nn.Conv2d(24, 24, 5, 2, 2)).train()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 24, 13, 11).contiguous(memory_format=fmt).requires_grad_()
    w = ours.parametrizations.weight.original
    assert _spectral_norm.folds(x, w, (2, 2), (2, 2), (1, 1))
    assert not _spectral_norm._fold_channels_last_inside(x.detach().contiguous(), w, 1)   # under 256 channels
    monkeypatch.setattr(_spectral_norm, "FOLD_CHANNELS_LAST_MIN_CHANNELS", 24)
    assert _spectral_norm._fold_channels_last_inside(x, w, 1) == (fmt == torch.contiguous_format)
    assert not _spectral_norm._fold_channels_last_inside(x[:, :, :4, :4].contiguous(), w, 1)   # small input
    with use_backend("cpu"):
        y = ours(x)   # one power-iteration step each, from the same vectors
    ref = theirs(x)
    assert y.is_contiguous(memory_format=fmt)
    assert_close_scaled(y, ref.double(), 1e-5, "output")
    _assert_same_sn_gradients(x, y, ours, ref, theirs)
    ours.eval()
    theirs.eval()
    torch._dynamo.reset()
    with use_backend("cpu"):
        with torch.no_grad():
            assert _ran(lambda: ours(x), "layout_copy") == (fmt == torch.contiguous_format)
        compiled = torch.compile(ours)
        torch.testing.assert_close(compiled(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_runs_at_lower_cpu_capabilities():
    """The layout copy's float32 blocks (built per ISA level) and the input gradient at the
    baseline and AVX2 builds."""
    code = (
        "import torch, torch.nn.functional as F\n"
        "import fastinpaint._extension as E\n"
        "from fastinpaint.ops import _cpu_conv as C\n"
        "E.library()\n"
        "x = torch.randn(2, 37, 19, 21)\n"
        "cl = C.LAYOUT_COPY('cpu', x, True)\n"
        "assert torch.equal(cl, x) and cl.is_contiguous(memory_format=torch.channels_last)\n"
        "back = C.LAYOUT_COPY('cpu', cl, False)\n"
        "assert torch.equal(back, x) and back.is_contiguous()\n"
        "x, w = torch.randn(1, 5, 23, 17), torch.randn(9, 5, 5, 5)\n"
        "gy = torch.randn(1, 9, 23, 17)\n"
        "got = C.INPUT_GRAD('cpu', gy, w, [1, 5, 23, 17], [1, 1], [2, 2], [1, 1], True)\n"
        "want = torch.ops.aten.convolution_backward(gy.double(), x.double(), w.double(), None, [1, 1], [2, 2],\n"
        "                                          [1, 1], False, [0, 0], 1, [True, False, False])[0]\n"
        "assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()\n"
        "print('ok', torch.backends.cpu.get_cpu_capability())\n")
    assert_runs_at_lower_cpu_capabilities(code)


@pytest.mark.parametrize("inside", [False, True], ids=["as-given", "cl-inside"])
def test_conv2d_without_the_input_gradient(inside):
    """The op's backward when the input needs no gradient: the weight's and the bias's, or the
    bias's alone, equal torch's; a channels-last weight gets a channels-last gradient."""
    channels = 16 if inside else 4
    x = torch.randn(2, channels, 17, 19, requires_grad=not inside)   # inside: the op runs without it
    w = torch.randn(6, channels, 3, 3).contiguous(memory_format=CL).requires_grad_()
    b = torch.randn(6, requires_grad=True)
    y = CIG.conv2d(x, w, b, (1, 2), (1, 1), (1, 1), channels_last_inside=inside)
    assert y.grad_fn.name() != "ConvolutionBackward0"   # the op itself
    ref = F.conv2d(x.detach().double(), w.double(), b.double(), (1, 2), 1)
    g = torch.randn_like(y)
    gw, gb = torch.autograd.grad(y, (w, b), g, retain_graph=True)
    ww, wb = torch.autograd.grad(ref, (w, b), g.double())
    assert_close_scaled(gw, ww, 2e-5, "grad weight")
    assert_close_scaled(gb, wb, 2e-5, "grad bias")
    assert gw.is_contiguous(memory_format=CL)
    (gb_alone,) = torch.autograd.grad(y, b, g)
    assert_close_scaled(gb_alone, wb, 2e-5, "grad bias alone")


def test_switches_turn_the_layers_back_to_torch(monkeypatch):
    """FASTINPAINT_CONV_INPUT_GRAD=0, FASTINPAINT_CONV_CHANNELS_LAST=0 and
    FASTINPAINT_CONV_WEIGHT_GRAD=0: the layers run torch's convolution, with the same results."""
    x = torch.randn(1, 5, 20, 18).contiguous(memory_format=CL).requires_grad_()
    w = (torch.randn(16, 5, 5, 5) / 11).requires_grad_()
    sn = SpectralNormConv2d(16, 8, 5, 2, 2).eval()
    x16 = torch.randn(2, 16, 21, 19)
    with use_backend("cpu"):
        y = FI.gated_conv2d(x, w, None, padding=2)
        g = torch.autograd.grad(y.sum(), x)[0]
        ysn = sn(x16)
        monkeypatch.setenv("FASTINPAINT_CONV_INPUT_GRAD", "0")
        assert not _ran_kernel(lambda: FI.gated_conv2d(x, w, None, padding=2).sum().backward())
        y0 = FI.gated_conv2d(x, w, None, padding=2)
        torch.testing.assert_close(torch.autograd.grad(y0.sum(), x)[0], g, rtol=1e-4, atol=1e-4)
        monkeypatch.setenv("FASTINPAINT_CONV_CHANNELS_LAST", "0")
        assert not _ran(lambda: sn(x16), "layout_copy")
        torch.testing.assert_close(sn(x16), ysn, rtol=1e-5, atol=1e-5)
        x16.requires_grad_()
        gw = torch.autograd.grad(sn(x16).sum(), sn.parametrizations.weight.original)[0]
        monkeypatch.setenv("FASTINPAINT_CONV_WEIGHT_GRAD", "0")
        assert not _ran(lambda: sn(x16).sum().backward(), "conv2d_weight_grad")
        gw0 = torch.autograd.grad(sn(x16).sum(), sn.parametrizations.weight.original)[0]
        torch.testing.assert_close(gw0, gw, rtol=1e-4, atol=1e-4)
