"""Gated convolution: every kernel backend against ``reference``, forward and backward; the
rules every backend, reference included, follows (memory format, determinism)."""

import math

import pytest
import torch
import torch.nn.functional as F

import fastinpaint
import fastinpaint.functional as FI
from fastinpaint import BackendUnavailableError, use_backend
from fastinpaint.ops.gated_conv import reference as ref

from conftest import (assert_close_scaled, assert_close_to_reference, assert_runs_at_lower_cpu_capabilities,
                      backend_device_params, dtypes_for, gpu, requires_cuda, skip_unless_available)

# (B, Cin, Cout, H, W, kernel, stride, padding, dilation, activation, bias, scale_factor)
CASES = [
    dict(B=1, cin=5, cout=3, H=7, W=13, k=3, s=1, p=1, d=1, act="elu", bias=True),
    dict(B=4, cin=5, cout=3, H=7, W=13, k=3, s=2, p=0, d=1, act="leaky_relu", bias=True),
    dict(B=2, cin=4, cout=6, H=9, W=11, k=(3, 5), s=(1, 2), p=(2, 1), d=(2, 1), act="relu", bias=True),
    dict(B=1, cin=3, cout=2, H=8, W=10, k=5, s=1, p=2, d=1, act="none", bias=False),
    dict(B=3, cin=6, cout=5, H=11, W=9, k=3, s=1, p=3, d=3, act="elu", bias=True),
    dict(B=4, cin=5, cout=3, H=7, W=13, k=1, s=1, p=0, d=1, act="elu", bias=False),
    dict(B=2, cin=5, cout=3, H=5, W=6, k=3, s=1, p=1, d=1, act="elu", bias=True, up=2),
    dict(B=1, cin=3, cout=4, H=4, W=7, k=3, s=2, p=1, d=2, act="leaky_relu", bias=True, up=2),
    # elu, not relu: the folded upsampling rounds differently from eager's convolution, and
    # in 16 bits a pre-activation within rounding of 0 would flip relu's gradient
    dict(B=3, cin=4, cout=5, H=5, W=3, k=(5, 3), s=1, p=(2, 0), d=1, act="elu", bias=False, up=2),
]
CASE_IDS = [f"case{i}" for i in range(len(CASES))]


def make_inputs(case, device, dtype, layout, requires_grad=True):
    k = case["k"] if isinstance(case["k"], tuple) else (case["k"], case["k"])
    shape = (case["B"], case["cin"], case["H"], case["W"])
    if layout == "noncontig":
        # a strided view: every other column of a wider tensor, permuted storage
        x = torch.randn(shape[0], shape[2], 2 * shape[3], shape[1], device=device, dtype=dtype)
        x = x.permute(0, 3, 1, 2)[..., ::2]
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    else:
        x = torch.randn(shape, device=device, dtype=dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(2 * case["cout"], case["cin"], *k, device=device, dtype=dtype)
         / math.sqrt(case["cin"] * k[0] * k[1]))
    b = torch.randn(2 * case["cout"], device=device, dtype=dtype) if case["bias"] else None
    for t in (x, w, b):
        if t is not None:
            t.requires_grad_(requires_grad)
    return x, w, b


def call(case, x, w, b):
    kwargs = dict(stride=case["s"], padding=case["p"], dilation=case["d"], activation=case["act"])
    if case.get("up", 1) != 1:
        return FI.gated_deconv2d(x, w, b, scale_factor=case["up"], **kwargs)
    return FI.gated_conv2d(x, w, b, **kwargs)


def reference_call(case, x, w, b):
    with use_backend("reference"):
        return call(case, x, w, b)


def leaves(x, w, b):
    return [t for t in (x, w, b) if t is not None]


def to_fp64_cpu(tensors):
    return [t.detach().double().cpu().requires_grad_(t.requires_grad) for t in tensors]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontig"])
@pytest.mark.parametrize("backend,device", backend_device_params())
def test_forward_backward_matches_reference(backend, device, layout, case):
    skip_unless_available(backend, device)
    for dtype in dtypes_for(device):
        x, w, b = make_inputs(case, device, dtype, layout)
        with use_backend(backend):
            y = call(case, x, w, b)
        y_ref = reference_call(case, x, w, b)
        x64, w64, b64 = to_fp64_cpu([x, w, b]) if b is not None else (*to_fp64_cpu([x, w]), None)
        y64 = reference_call(case, x64, w64, b64)
        assert_close_to_reference(y, y_ref, y64, f"{backend} forward {dtype}")

        gy = torch.randn_like(y_ref)
        grads = torch.autograd.grad(y, leaves(x, w, b), gy)
        grads_ref = torch.autograd.grad(y_ref, leaves(x, w, b), gy)
        grads64 = torch.autograd.grad(y64, leaves(x64, w64, b64), gy.double().cpu())
        for name, g, g_ref, g64 in zip(["x", "weight", "bias"], grads, grads_ref, grads64):
            assert_close_to_reference(g, g_ref, g64, f"{backend} grad {name} {dtype}")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontig"])
@pytest.mark.parametrize("backend,device", backend_device_params())
def test_inference_matches_reference(backend, device, layout, case):
    """no_grad: the Triton backend takes its implicit-GEMM path here."""
    skip_unless_available(backend, device)
    for dtype in dtypes_for(device):
        x, w, b = make_inputs(case, device, dtype, layout, requires_grad=False)
        with torch.no_grad(), use_backend(backend):
            y = call(case, x, w, b)
        y_ref = reference_call(case, x, w, b)
        x64, w64 = x.double().cpu(), w.double().cpu()
        y64 = reference_call(case, x64, w64, None if b is None else b.double().cpu())
        assert_close_to_reference(y, y_ref, y64, f"{backend} no-grad forward {dtype}")


@pytest.mark.parametrize("backend,device", backend_device_params(with_reference=True))
@pytest.mark.parametrize("grad", [True, False])
def test_output_keeps_memory_format(backend, device, grad):
    skip_unless_available(backend, device)
    case = CASES[0]
    for layout, fmt in (("channels_last", torch.channels_last), ("contiguous", torch.contiguous_format)):
        x, w, b = make_inputs(case, device, torch.float32, layout, requires_grad=grad)
        with use_backend(backend), torch.set_grad_enabled(grad):
            y = call(case, x, w, b)
            y_up = call(dict(case, up=2), x, w, b)
        assert y.is_contiguous(memory_format=fmt), (layout, y.stride())
        assert y_up.is_contiguous(memory_format=fmt), (layout, y_up.stride())


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("activation", ["elu", "leaky_relu", "relu", "none"])
def test_gradcheck_float64(backend, activation):
    skip_unless_available(backend, "cpu")
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        with use_backend(backend):
            return FI.gated_conv2d(x, w, b, stride=1, padding=1, dilation=1, activation=activation)

    assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-5)
    xcl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(fn, (xcl, w, b), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("activation", ["elu", "leaky_relu", "relu", "none"])
def test_extreme_values_saturate_cleanly(backend, activation):
    """Large pre-activations: sigmoid saturates to 0/1 and elu to -1, with no NaN or inf
    (the reference too: its float32 result against the gating in float64)."""
    skip_unless_available(backend, "cpu")
    values = torch.tensor([-1e4, -100.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 100.0, 1e4])
    pairs = torch.cartesian_prod(values, values)  # every (feature, gate) combination
    pre = pairs.T.reshape(1, 2, 9, 9).contiguous()
    expected = ref.gate(pre.double(), activation)
    with use_backend(backend):
        out = _gate_through_op(pre, activation)
    assert torch.isfinite(out).all(), backend
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6, msg=backend)


def _gate_through_op(pre, activation):
    """Run the public op so that its convolution returns exactly ``pre`` (a 1x1 identity conv)."""
    c2 = pre.shape[1]
    w = torch.eye(c2).reshape(c2, c2, 1, 1)
    return FI.gated_conv2d(pre, w, None, activation=activation)


# ----------------------------------------------------------------------------- modules

@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_module_matches_functional_and_keeps_format(backend):
    skip_unless_available(backend, "cpu")
    m = fastinpaint.nn.GatedConv2d(5, 3, 3, dilation=2)
    assert m.padding == (2, 2) and m.weight.shape == (6, 5, 3, 3) and m.bias.shape == (6,)
    x = torch.randn(2, 5, 9, 10).contiguous(memory_format=torch.channels_last)
    with use_backend(backend):
        y = m(x)
    assert y.shape == (2, 3, 9, 10) and y.is_contiguous(memory_format=torch.channels_last)
    y_ref = ref.gated_conv2d(x, m.weight, m.bias, 1, 2, 2)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    up = fastinpaint.nn.GatedDeconv2d(5, 4)
    with use_backend(backend):
        assert up(x).shape == (2, 4, 18, 20)


def test_module_loads_single_conv_port_layout():
    """The common PyTorch ports keep one nn.Conv2d with 2*Cout outputs under ``conv``."""

    class PortGatedConv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 2 * 7, 3, padding=1)

    port = PortGatedConv()
    ours = fastinpaint.nn.GatedConv2d(4, 7, 3)
    ours.load_state_dict(port.state_dict())
    torch.testing.assert_close(ours.weight, port.conv.weight)
    torch.testing.assert_close(ours.bias, port.conv.bias)
    assert set(ours.state_dict()) == {"weight", "bias"}
    x = torch.randn(1, 4, 6, 6)
    pre = port.conv(x)
    expected = F.elu(pre[:, :7]) * torch.sigmoid(pre[:, 7:])
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-6)


def test_module_rejects_bad_configuration():
    with pytest.raises(ValueError, match="activation"):
        fastinpaint.nn.GatedConv2d(3, 4, 3, activation="gelu")
    with pytest.raises(ValueError, match="out_channels"):
        fastinpaint.nn.GatedConv2d(3, 0, 3)
    with pytest.raises(ValueError, match="kernel_size"):
        fastinpaint.nn.GatedConv2d(3, 4, 0)
    with pytest.raises(ValueError, match="scale_factor"):
        fastinpaint.nn.GatedDeconv2d(3, 4, scale_factor=0)


# ----------------------------------------------------------------------------- bad input

def _args(**over):
    args = dict(x=torch.randn(2, 5, 7, 13), weight=torch.randn(6, 5, 3, 3), bias=torch.randn(6), stride=1,
                padding=1, dilation=1, activation="elu")
    args.update(over)
    return args


BAD_INPUTS = [
    (dict(x=torch.randn(5, 7, 13)), ValueError, r"x must be 4-D"),
    (dict(x=torch.randint(0, 5, (2, 5, 7, 13))), TypeError, r"x must be float"),
    (dict(x=[[1.0]]), TypeError, r"x must be a torch.Tensor"),
    (dict(weight=torch.randn(5, 5, 3, 3)), ValueError, r"weight must have 2\*out_channels"),
    (dict(weight=torch.randn(6, 4, 3, 3)), ValueError, r"x has 5 channels but weight expects in_channels=4"),
    (dict(weight=torch.randn(6, 5, 3)), ValueError, r"weight must be 4-D"),
    (dict(weight=torch.randn(0, 5, 3, 3), bias=None), ValueError, r"weight must have 2\*out_channels"),
    (dict(x=torch.randn(2, 0, 7, 13), weight=torch.randn(6, 0, 3, 3)), ValueError, r"positive in_channels"),
    (dict(bias=torch.randn(5)), ValueError, r"bias must have 6 elements"),
    (dict(bias=torch.randn(6, 1)), ValueError, r"bias must be 1-D"),
    (dict(weight=torch.randn(6, 5, 3, 3, dtype=torch.float64)), TypeError, r"weight has dtype"),
    (dict(stride=0), ValueError, r"stride must be >= 1"),
    (dict(stride=-1), ValueError, r"stride must be >= 1"),
    (dict(padding=-1), ValueError, r"padding must be >= 0"),
    (dict(dilation=0), ValueError, r"dilation must be >= 1"),
    (dict(stride=(1, 2, 3)), TypeError, r"stride must be an int or a pair"),
    (dict(stride=1.5), TypeError, r"stride must be an int or a pair"),
    (dict(activation="gelu"), ValueError, r"activation must be (None or )?one of"),
    (dict(x=torch.randn(2, 5, 2, 2), padding=0), ValueError, r"kernel_size 3 with dilation 1 spans 3 pixels"),
    (dict(dilation=8, padding=0), ValueError, r"spans 17 pixels"),
    (dict(x=torch.randn(2, 5, 0, 13)), ValueError, r"positive height and width"),
]


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("over,exc,match", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_input_gives_clear_error(backend, over, exc, match):
    args = _args(**over)
    with use_backend(backend), pytest.raises(exc, match=match):
        FI.gated_conv2d(**args)


def test_triton_refuses_float64_clearly():
    skip_unless_available("triton", "cpu")
    with use_backend("triton"), pytest.raises(TypeError, match="float64.*triton backend"):
        FI.gated_conv2d(torch.randn(1, 2, 4, 4, dtype=torch.float64), torch.randn(4, 2, 3, 3, dtype=torch.float64))


def test_bad_negative_slope_and_scale_factor():
    with pytest.raises(ValueError, match="negative_slope"):
        FI.gated_conv2d(**_args(activation="leaky_relu"), negative_slope=float("nan"))
    with pytest.raises(ValueError, match="scale_factor"):
        FI.gated_deconv2d(**_args(), scale_factor=0)


@requires_cuda
@gpu
def test_mixed_devices_rejected():
    args = _args(weight=torch.randn(6, 5, 3, 3, device="cuda"))
    with pytest.raises(ValueError, match="weight is on cuda"):
        FI.gated_conv2d(**args)


def test_forced_backend_for_wrong_device_raises():
    with use_backend("cuda"), pytest.raises(BackendUnavailableError, match="cuda"):
        FI.gated_conv2d(**_args())


# ----------------------------------------------------------------------------- autocast

@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_autocast_matches_conv2d_behaviour(backend):
    skip_unless_available(backend, "cpu")
    x, w, b = torch.randn(2, 5, 7, 13), torch.randn(6, 5, 3, 3), torch.randn(6)
    with torch.autocast("cpu", dtype=torch.bfloat16), use_backend(backend):
        y = FI.gated_conv2d(x, w, b, padding=1)
    assert y.dtype == torch.bfloat16
    y_ref = ref.gated_conv2d(x.bfloat16(), w.bfloat16(), b.bfloat16(), 1, 1, 1)
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------- torch.library / compile

def test_opcheck_cpp_op():
    skip_unless_available("cpu", "cpu")
    for fmt in (torch.contiguous_format, torch.channels_last):
        pre = torch.randn(2, 6, 5, 7).contiguous(memory_format=fmt).requires_grad_()
        torch.library.opcheck(torch.ops.fastinpaint.gated_conv_act_forward.default, (pre, 3, 0.2))
        torch.library.opcheck(torch.ops.fastinpaint.gated_conv_act_forward_nchw.default, (pre, 2, 0.1))
        torch.library.opcheck(torch.ops.fastinpaint.gated_conv_act_backward.default,
                              (torch.randn(2, 3, 5, 7).contiguous(memory_format=fmt), pre.detach(), 2, 0.1))


def test_opcheck_triton_ops():
    skip_unless_available("triton", "cpu")
    pre = torch.randn(2, 6, 5, 7, requires_grad=True)
    torch.library.opcheck(torch.ops.fastinpaint.gated_conv_act_forward_triton.default, (pre, 3, 0.2))
    torch.library.opcheck(torch.ops.fastinpaint.gated_conv_act_backward_triton.default,
                          (torch.randn(2, 3, 5, 7), pre.detach(), 1, 0.2))
    x, w, b = torch.randn(1, 3, 6, 5), torch.randn(4, 3, 3, 3), torch.randn(4)
    torch.library.opcheck(torch.ops.fastinpaint.gated_conv2d_triton.default,
                          (x, w, b, [1, 1], [1, 1], [1, 1], 2, 3, 0.2))


class Stack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = fastinpaint.nn.GatedConv2d(5, 8, 3)
        self.b = fastinpaint.nn.GatedConv2d(8, 8, 3, dilation=2)
        self.c = fastinpaint.nn.GatedDeconv2d(8, 4)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


@pytest.mark.parametrize("backend,compile_backend", [("cpu", "inductor"), ("triton", "aot_eager"),
                                                     ("reference", "aot_eager")])
def test_compile_fullgraph_stack(backend, compile_backend):
    skip_unless_available(backend, "cpu")
    torch._dynamo.reset()
    model = Stack()
    x = torch.randn(2, 5, 9, 11, requires_grad=True)
    with use_backend(backend):
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
        out = compiled(x)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    (gx_c,) = torch.autograd.grad(out, x, g)
    (gx_e,) = torch.autograd.grad(eager, x, g)
    torch.testing.assert_close(gx_c, gx_e, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- memory saved for backward

@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_saves_less_for_backward_than_eager(backend):
    """The fused gating keeps only the pre-activation (and the conv's x, weight)."""
    skip_unless_available(backend, "cpu")
    from fastinpaint.benchmark import saved_bytes

    x = torch.randn(1, 8, 16, 16, requires_grad=True)
    w = torch.randn(16, 8, 3, 3, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    with use_backend(backend):
        ours = saved_bytes(lambda: FI.gated_conv2d(x, w, b, padding=1), exclude=(x, w, b))
    with use_backend("reference"):
        eager = saved_bytes(lambda: FI.gated_conv2d(x, w, b, padding=1), exclude=(x, w, b))
    pre_bytes = 16 * 16 * 16 * 4
    assert ours == pre_bytes, ours
    assert eager >= 2 * pre_bytes, eager


@pytest.mark.parametrize("backend,device", backend_device_params(with_reference=True))
@pytest.mark.parametrize("grad", [True, False])
def test_weight_memory_format_decides_like_conv2d(backend, device, grad):
    """conv2d gives a channels_last output when the weight is channels_last (a model after
    .to(memory_format=torch.channels_last)); every path follows it, training and inference."""
    skip_unless_available(backend, device)
    for case in (CASES[0], CASES[6]):
        x, w, b = make_inputs(case, device, torch.float32, "contiguous", requires_grad=grad)
        w = w.detach().contiguous(memory_format=torch.channels_last).requires_grad_(grad)
        with use_backend(backend), torch.set_grad_enabled(grad):
            y = call(case, x, w, b)
        assert y.is_contiguous(memory_format=torch.channels_last), (backend, case, y.stride())


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_double_backward_matches_reference(backend):
    """Gradient penalties (R1, WGAN-GP) differentiate through the backward."""
    skip_unless_available(backend, "cpu")
    dtype = torch.float64 if backend == "cpu" else torch.float32
    x = torch.randn(2, 3, 5, 6, dtype=dtype, requires_grad=True)
    w = torch.randn(8, 3, 3, 3, dtype=dtype, requires_grad=True)
    b = torch.randn(8, dtype=dtype, requires_grad=True)

    def penalty(name):
        with use_backend(name):
            y = FI.gated_conv2d(x, w, b, padding=1, activation="elu")
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), (w, b))

    tol = dict(rtol=1e-7, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for got, expected in zip(penalty(backend), penalty("reference")):
        scale = expected.abs().max().item()
        torch.testing.assert_close(got / scale, expected / scale, **tol)
    if backend == "cpu":
        def fn(x, w, b):
            with use_backend("cpu"):
                return FI.gated_conv2d(x, w, b, padding=1, activation="elu")

        assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_autocast_leaves_float64_alone():
    skip_unless_available("cpu", "cpu")
    x, w = torch.randn(1, 3, 5, 5, dtype=torch.float64), torch.randn(4, 3, 3, 3, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.conv2d(x, w).dtype
        for backend in ("reference", "cpu"):
            with use_backend(backend):
                assert FI.gated_conv2d(x, w).dtype == expected == torch.float64


# ----------------------------------------------------------------------------- upsampling folded into the conv

UPSAMPLE_CONFIGS = [  # (k, padding, dilation, scale)
    ((3, 3), (1, 1), (1, 1), 2), ((5, 5), (2, 2), (1, 1), 2), ((3, 5), (0, 2), (1, 1), 2), ((4, 2), (1, 0), (1, 1), 2),
    ((3, 3), (1, 1), (1, 1), 3), ((5, 3), (2, 1), (2, 1), 2), ((1, 1), (0, 0), (1, 1), 2), ((3, 3), (2, 2), (2, 2), 2),
]


@pytest.mark.parametrize("k,padding,dilation,scale", UPSAMPLE_CONFIGS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_upsample_conv_phase_decomposition(k, padding, dilation, scale, layout):
    """conv(upsample_nearest(x)) computed as one convolution over x, float64, forward and gradients."""
    from fastinpaint.ops.gated_conv import upsample

    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(6, 3, *k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    if not upsample.applies(w.shape, (1, 1), padding, dilation, scale, 5, 7):
        ho = scale * 5 + 2 * padding[0] - dilation[0] * (k[0] - 1)
        wo = scale * 7 + 2 * padding[1] - dilation[1] * (k[1] - 1)
        lh = upsample._axis_plan(scale, k[0], padding[0], dilation[0])[2]
        lw = upsample._axis_plan(scale, k[1], padding[1], dilation[1])[2]
        assert ho % scale or wo % scale or lh * lw >= k[0] * k[1]  # declined for a reason
        pytest.skip("the decomposition does not apply (odd output or no saving)")
    expected = F.conv2d(F.interpolate(x, scale_factor=scale, mode="nearest"), w, b, 1, padding, dilation)
    out = upsample.upsample_conv2d(x, w, b, padding, dilation, scale)
    assert out.is_contiguous(memory_format=torch.channels_last if layout == "channels_last"
                             else torch.contiguous_format)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(expected)
    for got, exp in zip(torch.autograd.grad(out, (x, w, b), g), torch.autograd.grad(expected, (x, w, b), g)):
        torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(lambda x, w, b: upsample.upsample_conv2d(x, w, b, padding, dilation, scale),
                                    (x, w, b))


# ----------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("backend,device", backend_device_params(with_reference=True))
def test_deterministic_under_deterministic_algorithms(backend, device):
    skip_unless_available(backend, device)
    case = CASES[2]
    torch.use_deterministic_algorithms(True)
    try:
        results = []
        for _ in range(2):
            torch.manual_seed(1)
            x, w, b = make_inputs(case, device, torch.float32, "channels_last")
            with use_backend(backend):
                y = call(case, x, w, b)
                grads = torch.autograd.grad(y, [x, w, b], torch.ones_like(y))
            with torch.no_grad(), use_backend(backend):
                y_inf = call(case, x, w, b)
            results.append([y, y_inf, *grads])
    finally:
        torch.use_deterministic_algorithms(False)
    for first, second in zip(*results):
        assert torch.equal(first, second)


def test_compile_dynamic_shapes_fullgraph():
    """dynamic=True: two input sizes, one graph, and a module's slope that may be symbolic."""
    nn = fastinpaint.nn
    m = torch.nn.Sequential(nn.GatedConv2d(3, 4, 3, activation="leaky_relu"), nn.GatedConv2d(4, 2, 3))
    f = torch.compile(m, fullgraph=True, dynamic=True, backend="aot_eager")
    for s in (9, 12):
        x = torch.randn(1, 3, s, s + 1)
        torch.testing.assert_close(f(x), m(x))


@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_gating_split_across_threads_matches_reference(channels_last):
    """A gating problem larger than one parallel chunk, whose chunk boundaries fall inside rows
    (NCHW: rows = samples, a row = C*H*W; channels_last: rows = pixels, a row = C), on 2
    threads: every element computed once, forward and backward."""
    skip_unless_available("cpu", "cpu")
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = torch.randn(3, 4, 67, 67).contiguous(memory_format=fmt).requires_grad_(True)
        w = torch.randn(10, 4, 1, 1).contiguous(memory_format=fmt).requires_grad_(True)
        b = torch.randn(10, requires_grad=True)
        gy = torch.randn(3, 5, 67, 67).contiguous(memory_format=fmt)
        outs = []
        for backend in ("reference", "cpu"):
            with use_backend(backend):
                y = FI.gated_conv2d(x, w, b, activation="elu")
            grads = torch.autograd.grad(y, (x, w, b), gy)
            outs.append((y, *grads))
        for got, want in zip(outs[1], outs[0]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("scale_factor", [1, 2])
@pytest.mark.parametrize("gating", ["aten", "kernel", "aten_nchw"])
def test_compiled_cpu_gating_is_left_to_inductor(monkeypatch, scale_factor, gating, channels_last):
    """Under torch.compile the cpu backend's gating of a plain convolution is aten ops
    (COMPILED_GATING["cpu"] = "aten"; "aten_nchw", the default: for NCHW half-precision layers), which
    inductor fuses with its neighbours, instead of the opaque fused kernel; the deconv's phase
    convolution is visible, its gating and interleave stay fastinpaint's ops; the result is the
    eager call's."""
    from fastinpaint.ops.gated_conv import op as gop

    skip_unless_available("cpu", "cpu")
    monkeypatch.setitem(gop.COMPILED_GATING, "cpu", gating)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x = torch.randn(2, 3, 9, 10)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(8, 3, 3, 3, requires_grad=True)
    b = torch.randn(8, requires_grad=True)

    def layer(x, w, b):
        if scale_factor == 1:
            return FI.gated_conv2d(x, w, b, padding=1, activation="elu")
        return FI.gated_deconv2d(x, w, b, padding=1, activation="elu", scale_factor=scale_factor)

    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=record, fullgraph=True)
    with use_backend("cpu"):
        got = compiled(x, w, b)
        want = layer(x, w, b)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert any("conv" in t for t in targets), targets
    # the plain convolution's gating is aten ops under compile where asked ("aten"); this NCHW layer
    # (3 channels: not Winograd's) runs its convolution channels-last and its NCHW-writing gating
    # kernel under "aten_nchw" too; the deconv's phases keep the kernel
    kernel_expected = gating != "aten" or scale_factor != 1
    assert any("gated_conv_act_forward" in t for t in targets) == kernel_expected, targets
    assert any("interleave_phases" in t for t in targets) == (scale_factor != 1), targets


@pytest.mark.parametrize("channels_last", [False, True])
def test_interleave_ops_pass_opcheck(channels_last):
    """The gated deconv's interleave and its backward are torch.library ops (inductor leaves
    their strided copies alone): schema, fake tensors, autograd and the dispatcher agree."""
    from fastinpaint.ops.gated_conv import upsample

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.randn(2, 4 * 3, 6, 7).contiguous(memory_format=fmt).requires_grad_(True)
    args = (out, 2, 5, 6, [0, 1], [1, 0], channels_last)
    torch.library.opcheck(upsample.interleave_phases, args)
    grad = torch.randn(2, 3, 10, 12).contiguous(memory_format=fmt).requires_grad_(True)
    torch.library.opcheck(upsample.deinterleave_phases, (grad, 2, 6, 7, [0, 1], [1, 0], channels_last))
    # the backward of the interleave is the deinterleave, exactly
    y = upsample.interleave_phases(*args)
    g = torch.randn_like(y)
    (dout,) = torch.autograd.grad(y, out, g)
    torch.testing.assert_close(dout, upsample.deinterleave_phases(g, 2, 6, 7, [0, 1], [1, 0], channels_last))


def test_cpu_gating_at_lower_instruction_sets():
    """The gating kernel's baseline and AVX2 builds (csrc/cpu/gated_conv.cpp, picked by the CPU
    capability torch runs at), forward and backward, every activation, float32 and bfloat16,
    against the reference backend."""
    skip_unless_available("cpu", "cpu")
    code = (
        "import torch\n"
        "import fastinpaint.functional as FI\n"
        "from fastinpaint import use_backend\n"
        "torch.manual_seed(0)\n"
        "for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):\n"
        "    x = torch.randn(2, 5, 9, 11).to(dtype).requires_grad_()\n"
        "    w = (torch.randn(14, 5, 3, 3) / 4).to(dtype).requires_grad_()\n"
        "    b = torch.randn(14).to(dtype).requires_grad_()\n"
        "    for act in ('elu', 'leaky_relu', 'relu', 'none'):\n"
        "        outs = []\n"
        "        for backend in ('cpu', 'reference'):\n"
        "            with use_backend(backend):\n"
        "                y = FI.gated_conv2d(x, w, b, padding=1, activation=act)\n"
        "            outs.append((y, *torch.autograd.grad(y, (x, w, b), torch.ones_like(y))))\n"
        "        for got, want in zip(*outs):  # bfloat16: the weights' sums round coarsely in both\n"
        "            err = (got.float() - want.float()).abs().max()\n"
        "            assert err <= tol * (1 + want.float().abs().max()), (dtype, act, err)\n"
        "print('ok', torch.backends.cpu.get_cpu_capability())\n")
    assert_runs_at_lower_cpu_capabilities(code)


# ----------------------------------------------------------------------------- NCHW layers, channels-last inside (cpu)

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 6, 9, 11), (1, 2, 1, 1), (3, 26, 8, 8), (1, 34, 13, 17), (2, 96, 3, 67),
                                   (2, 80, 3, 5), (0, 4, 5, 5)], ids=lambda s: "x".join(map(str, s)))
def test_cpu_nchw_gating_kernel_matches_reference(shape, dtype):
    """gated_conv_act_forward_nchw: a channels-last pre-activation gated into an NCHW-contiguous
    output: the reference gating's values (float64) for every activation, odd channel counts and
    positions (tile and 8x8-block edges; more channels than positions, where the tile's transposition
    walks the positions outside), an empty batch, an NCHW pre (made channels-last first),
    the same bits at 1, 2 and 3 threads."""
    skip_unless_available("cpu", "cpu")
    op = torch.ops.fastinpaint.gated_conv_act_forward_nchw.default
    pre = (3 * torch.randn(shape)).to(dtype).contiguous(memory_format=torch.channels_last)
    tol = {torch.float32: 1e-6, torch.float64: 1e-12}.get(dtype, 1e-2)
    for code, act, slope in ((0, "none", 0.2), (1, "relu", 0.2), (2, "leaky_relu", 0.1), (3, "elu", 0.2)):
        want = ref.gate(pre.double(), act, slope)
        got = op(pre, code, slope)
        assert got.dtype == dtype and got.shape == want.shape and got.is_contiguous()
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
        assert torch.equal(op(pre.contiguous(), code, slope), got)
    saved = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(op(pre, 3, 0.2))
    finally:
        torch.set_num_threads(saved)
    assert all(torch.equal(r, results[0]) for r in results[1:])


def _ran(fn, name) -> bool:
    with torch.autograd.profiler.profile() as prof:
        fn()
    return any(name in e.name for e in prof.function_events)


@pytest.mark.parametrize("grad", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("geometry", [dict(cin=5, cout=12, k=5, s=1, p=2, d=1), dict(cin=12, cout=9, k=3, s=2, p=1, d=1),
                                      dict(cin=3, cout=5, k=3, s=(2, 1), p=2, d=2),
                                      dict(cin=32, cout=33, k=3, s=1, p=4, d=4)],
                         ids=["input", "strided", "dilated", "winograd"])
def test_cpu_nchw_layer_runs_convolution_channels_last(geometry, grad):
    """An NCHW gated layer on the cpu backend writes its convolution channels-last (oneDNN's on a
    channels-last copy of the input, or Winograd's) and gates into NCHW: the reference's output and
    gradients (float64 baseline; Winograd's rounding bound, tests/test_winograd.py), an NCHW output
    and input gradient (Winograd's: channels-last, as that kernel writes it), the weight's gradient
    in the weight's layout."""
    skip_unless_available("cpu", "cpu")
    torch.manual_seed(0)
    g = geometry
    x = torch.randn(2, g["cin"], 23, 30).requires_grad_(grad)
    w = (torch.randn(2 * g["cout"], g["cin"], g["k"], g["k"]) / (g["k"] * g["cin"] ** 0.5)).requires_grad_(grad)
    b = torch.randn(2 * g["cout"]).requires_grad_(grad)
    kwargs = dict(stride=g["s"], padding=g["p"], dilation=g["d"], activation="elu")
    winograd = g["cin"] >= 32
    with use_backend("cpu"):
        assert _ran(lambda: FI.gated_conv2d(x, w, b, **kwargs), "gated_conv_act_forward_nchw")
        assert _ran(lambda: FI.gated_conv2d(x, w, b, **kwargs), "winograd_conv3x3") == winograd
        y = FI.gated_conv2d(x, w, b, **kwargs)
    want = ref.gated_conv2d(x.double(), w.double(), b.double(), kwargs["stride"], g["p"], g["d"], "elu")
    assert y.is_contiguous() and y.shape == want.shape
    rel = 2e-5 if winograd else 1e-5   # Winograd's rounding: tests/test_winograd.py's bound
    assert_close_scaled(y, want, rel, "output")
    if grad:
        gy = torch.randn_like(y)
        got = torch.autograd.grad(y, (x, w, b), gy)
        expected = torch.autograd.grad(want, (x, w, b), gy.double())
        for name, a, e in zip(("grad x", "grad weight", "grad bias"), got, expected):
            assert_close_scaled(a, e, 2 * rel, name)
        assert got[0].is_contiguous(memory_format=torch.channels_last if winograd else torch.contiguous_format)
        assert got[1].is_contiguous()


def test_cpu_nchw_channels_last_route_applies_where_it_should(monkeypatch):
    """For an NCHW float layer, Winograd's too; not for a channels-last input or weight (their
    output is channels-last, as conv2d's), bfloat16, or with FASTINPAINT_CONV_CHANNELS_LAST=0;
    each gives the reference's output in conv2d's memory format."""
    skip_unless_available("cpu", "cpu")
    CL = torch.channels_last
    x, w, b = torch.randn(1, 6, 12, 14), torch.randn(8, 6, 3, 3) / 6, torch.randn(8)
    xw, ww, bw = torch.randn(1, 32, 24, 24), torch.randn(64, 32, 3, 3) / 17, torch.randn(64)
    cases = [(x, w, b, True), (x.contiguous(memory_format=CL), w, b, False), (x, w.contiguous(memory_format=CL), b, False),
             (xw, ww, bw, True), (x.bfloat16(), w.bfloat16(), b.bfloat16(), False)]
    for xi, wi, bi, routed in cases:
        with use_backend("cpu"):
            assert _ran(lambda: FI.gated_conv2d(xi, wi, bi, padding=1), "gated_conv_act_forward_nchw") == routed
            y = FI.gated_conv2d(xi, wi, bi, padding=1)
        want = F.conv2d(xi, wi, bi, padding=1)
        assert y.is_contiguous(memory_format=CL) == want.is_contiguous(memory_format=CL)
        exact = ref.gate(F.conv2d(xi.double(), wi.double(), bi.double(), padding=1))
        assert_close_scaled(y, exact, 2e-2 if xi.dtype == torch.bfloat16 else 2e-5, str(xi.dtype))
    monkeypatch.setenv("FASTINPAINT_CONV_CHANNELS_LAST", "0")
    with use_backend("cpu"):
        assert not _ran(lambda: FI.gated_conv2d(x, w, b, padding=1), "gated_conv_act_forward_nchw")
