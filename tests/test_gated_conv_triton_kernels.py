"""Triton launchers of the gated convolution against the eager reference.

Without a GPU the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``,
set before triton is imported), so every shape here is tiny.
"""

from __future__ import annotations

import os
import sys
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402

from fastinpaint import _debug  # noqa: E402
from fastinpaint.ops._activation import ACTIVATION_CODES  # noqa: E402
from fastinpaint.ops.gated_conv import reference  # noqa: E402
from fastinpaint.ops.gated_conv import triton as tk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ACTS = list(ACTIVATION_CODES)  # none, relu, leaky_relu, elu
SLOPE = 0.2


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Every output is NaN-filled before the kernel runs."""
    monkeypatch.setattr(_debug, "_poison", True)
    assert torch.isnan(_debug.new_output((2,), dtype=torch.float32, device=DEVICE)).all()
    yield


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "nchw":
        return t.contiguous()
    if layout == "cl":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "slice":
        # Non-contiguous view: every other column of a wider tensor.
        B, C, H, W = t.shape
        big = torch.empty((B, C, H, 2 * W), dtype=t.dtype, device=t.device).normal_()
        big[..., ::2] = t
        view = big[..., ::2]
        assert not view.is_contiguous()
        assert not view.is_contiguous(memory_format=torch.channels_last)
        return view
    if layout == "cl_slice":
        # Channel slice of a channels_last tensor (channels innermost, not contiguous).
        B, C, H, W = t.shape
        big = torch.empty((B, C + 3, H, W), dtype=t.dtype, device=t.device)
        big = big.contiguous(memory_format=torch.channels_last).normal_()
        big[:, 1:1 + C] = t
        view = big[:, 1:1 + C]
        assert not view.is_contiguous(memory_format=torch.channels_last)
        return view
    raise ValueError(layout)


def _assert_no_nan(t: torch.Tensor):
    assert not torch.isnan(t).any(), "kernel left elements unwritten (NaN poison visible)"


# --------------------------------------------------------------------------------------
# gate forward / backward
# --------------------------------------------------------------------------------------

GATE_SHAPES = [(1, 3, 7, 13), (3, 5, 7, 13), (3, 1, 1, 1)]


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("layout", ["nchw", "cl", "slice"])
@pytest.mark.parametrize("shape", GATE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gate_forward_backward(act, layout, shape):
    torch.manual_seed(0)
    B, C, H, W = shape
    pre_ref = (torch.randn(B, 2 * C, H, W, device=DEVICE) * 2.0).requires_grad_(True)
    dy = torch.randn(B, C, H, W, device=DEVICE)
    y_ref = reference.gate(pre_ref, act, SLOPE)
    (g_ref,) = torch.autograd.grad(y_ref, pre_ref, dy)

    pre = _layout(pre_ref.detach(), layout)
    code = ACTIVATION_CODES[act]
    y = tk.gate_forward(pre, code, SLOPE)
    assert y.shape == (B, C, H, W) and y.dtype == pre.dtype
    _assert_no_nan(y)
    torch.testing.assert_close(y, y_ref.detach(), rtol=1e-5, atol=1e-6)

    grad = tk.gate_backward(_layout(dy, layout), pre, code, SLOPE)
    assert grad.shape == (B, 2 * C, H, W)
    _assert_no_nan(grad)
    torch.testing.assert_close(grad, g_ref, rtol=1e-5, atol=1e-6)

    if layout == "cl" and C > 1:
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert grad.is_contiguous(memory_format=torch.channels_last)
    elif layout != "cl":
        assert y.is_contiguous() and grad.is_contiguous()


@pytest.mark.parametrize("act", ["leaky_relu", "elu"])
def test_gate_fp16_and_mixed_grad_layout(act):
    torch.manual_seed(1)
    pre32 = torch.randn(3, 10, 7, 13, device=DEVICE) * 2.0
    pre = pre32.half().contiguous(memory_format=torch.channels_last)
    dy = torch.randn(3, 5, 7, 13, device=DEVICE).half()  # NCHW grad for a channels_last pre
    code = ACTIVATION_CODES[act]

    pre_ref = pre.float().requires_grad_(True)
    y_ref = reference.gate(pre_ref, act, SLOPE)
    (g_ref,) = torch.autograd.grad(y_ref, pre_ref, dy.float())

    y = tk.gate_forward(pre, code, SLOPE)
    _assert_no_nan(y)
    assert y.dtype == torch.float16 and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.float(), y_ref.detach(), rtol=1e-2, atol=1e-2)
    grad = tk.gate_backward(dy, pre, code, SLOPE)
    _assert_no_nan(grad)
    assert grad.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(grad.float(), g_ref, rtol=1e-2, atol=1e-2)


# --------------------------------------------------------------------------------------
# implicit-GEMM gated convolution
# --------------------------------------------------------------------------------------

# (B, Cin, Cout, H, W, kh, kw, stride, padding, dilation, upsample, act, bias)
CONV_CASES = [
    (1, 5, 3, 7, 13, 3, 3, (1, 1), (1, 1), (1, 1), 1, "elu", True),
    (3, 5, 3, 7, 13, 1, 1, (1, 1), (0, 0), (1, 1), 1, "leaky_relu", True),
    (1, 17, 33, 7, 13, 3, 3, (2, 2), (1, 1), (1, 1), 1, "elu", True),
    (1, 5, 3, 7, 13, 3, 3, (1, 1), (2, 2), (2, 2), 1, "relu", False),
    (1, 5, 3, 9, 13, 3, 3, (1, 1), (3, 1), (3, 3), 1, "none", True),
    (1, 5, 3, 7, 13, 5, 5, (2, 1), (2, 0), (1, 1), 1, "elu", True),
    (1, 5, 3, 7, 13, 3, 5, (1, 2), (1, 2), (1, 1), 1, "leaky_relu", True),
    (1, 17, 33, 7, 13, 5, 5, (1, 1), (4, 4), (2, 2), 1, "elu", True),
    (1, 5, 3, 7, 13, 3, 3, (1, 1), (0, 0), (1, 1), 1, "elu", True),
    (1, 5, 3, 4, 7, 3, 3, (1, 1), (1, 1), (1, 1), 2, "elu", True),
    (3, 5, 3, 4, 7, 3, 5, (2, 1), (1, 2), (1, 2), 2, "leaky_relu", False),
    (1, 17, 33, 4, 6, 3, 3, (1, 1), (1, 1), (1, 1), 2, "elu", True),
    (1, 5, 3, 3, 5, 1, 1, (1, 1), (0, 0), (1, 1), 2, "relu", True),
]


def _case_id(c):
    B, ci, co, H, W, kh, kw, s, p, d, up, act, bias = c
    return (f"b{B}-c{ci}to{co}-{H}x{W}-k{kh}x{kw}-s{s[0]}{s[1]}-p{p[0]}{p[1]}-d{d[0]}{d[1]}"
            f"-up{up}-{act}{'-bias' if bias else ''}")


def _conv_reference(x, w, b, stride, padding, dilation, up, act):
    x, w = x.double(), w.double()
    b = b.double() if b is not None else None
    if up == 2:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
    return reference.gated_conv2d(x, w, b, stride, padding, dilation, act, SLOPE)


def _run_conv_case(case, layout, dtype, rtol=None, atol=None):
    B, Cin, Cout, H, W, kh, kw, stride, padding, dilation, up, act, has_bias = case
    torch.manual_seed(zlib.crc32(_case_id(case).encode()) % 1000)
    x32 = torch.randn(B, Cin, H, W, device=DEVICE)
    w32 = torch.randn(2 * Cout, Cin, kh, kw, device=DEVICE) / (Cin * kh * kw) ** 0.5
    b32 = torch.randn(2 * Cout, device=DEVICE) * 0.5 if has_bias else None
    x = _layout(x32.to(dtype), layout)
    w = w32.to(dtype)
    b = b32.to(dtype) if b32 is not None else None

    ref = _conv_reference(x.float(), w.float(), b.float() if b is not None else None,
                          stride, padding, dilation, up, act)
    y = tk.conv_forward(x, w, b, stride, padding, dilation, up,
                        ACTIVATION_CODES[act], SLOPE)
    assert y.shape == ref.shape and y.dtype == dtype
    _assert_no_nan(y)
    if layout in ("cl", "cl_slice"):
        assert y.is_contiguous(memory_format=torch.channels_last)
    else:
        assert y.is_contiguous()
    if rtol is None:
        rtol, atol = (1e-4, 1e-5) if dtype == torch.float32 else (1e-2, 1e-2)
    torch.testing.assert_close(y.double(), ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("case", CONV_CASES, ids=_case_id)
def test_conv_forward_fp32(case, layout, monkeypatch):
    # Exact fp32 ("ieee") dot on a GPU too; the interpreter is exact anyway.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    _run_conv_case(case, layout, torch.float32)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("case", [CONV_CASES[i] for i in (0, 2, 6, 10, 11)], ids=_case_id)
def test_conv_forward_fp16(case, layout):
    _run_conv_case(case, layout, torch.float16)


@pytest.mark.parametrize("layout", ["slice", "cl_slice"])
@pytest.mark.parametrize("case", [CONV_CASES[i] for i in (2, 10)], ids=_case_id)
def test_conv_forward_strided_views(case, layout, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    _run_conv_case(case, layout, torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available() or not torch.cuda.is_bf16_supported(),
                    reason="bfloat16 needs a GPU (the interpreter has no bfloat16)")
@pytest.mark.parametrize("case", [CONV_CASES[i] for i in (0, 2, 11)], ids=_case_id)
def test_conv_forward_bf16_gpu(case):
    _run_conv_case(case, "cl", torch.bfloat16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="tf32 only matters on a GPU")
def test_conv_forward_tf32_gpu(monkeypatch):
    """fp32 with cudnn.allow_tf32 on runs the tf32 dot: close, not exact."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    _run_conv_case(CONV_CASES[7], "cl", torch.float32, rtol=1e-2, atol=1e-2)


def test_conv_forward_arranges_a_weight_once_until_it_changes(monkeypatch):
    """Inference calls a layer's weight again and again: the (2, K, NPAD) arrangement is made
    once per weight and version, and made again after an in-place update."""
    calls = []
    real = tk._arrange_weight
    monkeypatch.setattr(tk, "_arrange_weight", lambda w, d: calls.append(1) or real(w, d))
    torch.manual_seed(0)
    x = torch.randn(1, 3, 7, 6, device=DEVICE)
    w = torch.randn(10, 3, 3, 3, device=DEVICE)
    args = ((1, 1), (1, 1), (1, 1), 1, ACTIVATION_CODES["elu"], SLOPE)
    y1 = tk.conv_forward(x, w, None, *args)
    y2 = tk.conv_forward(x, w, None, *args)
    assert len(calls) == 1
    torch.testing.assert_close(y1, y2)
    with torch.no_grad():
        w.mul_(-1.0)  # an optimiser step: the version changes, the cached arrangement is stale
    y3 = tk.conv_forward(x, w, None, *args)
    assert len(calls) == 2
    ref = _conv_reference(x.double(), w.double(), None, (1, 1), (1, 1), (1, 1), 1, "elu")
    torch.testing.assert_close(y3.double(), ref, rtol=1e-4, atol=1e-5)
    other = w.clone()  # another tensor: never served the cached arrangement of w
    tk.conv_forward(x, other, None, *args)
    assert len(calls) == 3
