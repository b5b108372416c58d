"""Channel-wise fully connected layer: every kernel backend against ``reference``, forward and
all gradients, layouts, registration (opcheck, torch.compile), bad input, the module."""

import math

import pytest
import torch
import torch.nn.functional as F

import fastinpaint
import fastinpaint.functional as FI
from fastinpaint import BackendUnavailableError, use_backend
from fastinpaint.ops.channel_fc import reference as ref

from conftest import (assert_close_to_reference, assert_runs_at_lower_cpu_capabilities, backend_device_params, dtypes_for,
                      gpu, requires_cuda, skip_unless_available)

ACTS = [None, "relu", "leaky_relu", "elu"]

# H*W is never a multiple of a block (16) but in the two small-map cases: 35, 9, 6, 4, 17, 18,
# 72, 65, 65, 16, 64; C = 1 and 512; batch 1 to 70.
CASES = [
    dict(B=3, C=2, H=5, W=7, act="elu", bias=True, layout="contiguous"),
    dict(B=1, C=1, H=3, W=3, act="relu", bias=True, layout="channels_last"),
    dict(B=64, C=3, H=2, W=3, act="leaky_relu", bias=True, layout="noncontig"),
    dict(B=2, C=512, H=2, W=2, act=None, bias=True, layout="contiguous"),
    dict(B=5, C=3, H=1, W=17, act="elu", bias=False, layout="channels_last"),
    dict(B=17, C=4, H=6, W=3, act=None, bias=False, layout="noncontig"),
    # more than 64 positions, odd map sizes
    dict(B=3, C=2, H=9, W=8, act="leaky_relu", bias=True, layout="channels_last"),
    dict(B=2, C=3, H=5, W=13, act="elu", bias=False, layout="contiguous"),
    # at least as many images as positions: the CPU's weight-major GEMM (W_c @ X_c^T)
    dict(B=70, C=2, H=5, W=13, act="leaky_relu", bias=True, layout="contiguous"),
    # the CPU's fused small-map pass (at most 16 positions, or 17 to 64 from 4 images with
    # AVX-512: the cases above but 72, 65 and 35 at batch 3): two batch blocks (64 + 3 rows);
    # and 64 positions
    dict(B=67, C=5, H=4, W=4, act="relu", bias=True, layout="noncontig"),
    dict(B=6, C=3, H=8, W=8, act="leaky_relu", bias=False, layout="channels_last"),
]
CASE_IDS = [f"B{c['B']}-C{c['C']}-{c['H']}x{c['W']}-{c['act']}-{c['layout']}" for c in CASES]


def make_x(B, C, H, W, device, dtype, layout):
    if layout == "noncontig":
        # every other column of a wider tensor with permuted storage: no dense layout
        x = torch.randn(B, H, 2 * W, C, device=device, dtype=dtype).permute(0, 3, 1, 2)[..., ::2]
        assert W == 1 or (not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last))
        return x
    x = torch.randn(B, C, H, W, device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def make_inputs(case, device, dtype, requires_grad=True, layout=None):
    B, C, H, W = case["B"], case["C"], case["H"], case["W"]
    P = H * W
    x = make_x(B, C, H, W, device, dtype, layout or case["layout"])
    w = torch.randn(C, P, P, device=device, dtype=dtype) / math.sqrt(P)
    b = torch.randn(C, P, device=device, dtype=dtype) if case["bias"] else None
    for t in (x, w, b):
        if t is not None:
            t.requires_grad_(requires_grad)
    return x, w, b


def leaves(*ts):
    return [t for t in ts if t is not None]


def fp64(t):
    return None if t is None else t.detach().double().cpu().requires_grad_(t.requires_grad)


def run(backend, x, w, b, act, slope=0.2):
    with use_backend(backend):
        return FI.channel_fc(x, w, b, act, slope)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("backend,device", backend_device_params())
def test_forward_backward_matches_reference(backend, device, case):
    skip_unless_available(backend, device)
    if backend == "triton" and device == "cpu" and case["C"] > 64:
        pytest.skip("C = 512 under the Triton interpreter takes minutes (one program per channel); "
                    "the GPU run covers it")
    for dtype in dtypes_for(device):
        # relu-like kinks: in 16 bits a pre-activation within rounding of 0 may flip act'
        # between two correct implementations, so 16-bit runs use elu's smooth kink instead
        act = case["act"] if dtype == torch.float32 or case["act"] is None else "elu"
        x, w, b = make_inputs(case, device, dtype)
        y = run(backend, x, w, b, act)
        y_ref = run("reference", x, w, b, act)
        x64, w64, b64 = fp64(x), fp64(w), fp64(b)
        y64 = run("reference", x64, w64, b64, act)
        assert_close_to_reference(y, y_ref, y64, f"{backend} forward {dtype}")
        gy = torch.randn_like(y_ref)
        grads = torch.autograd.grad(y, leaves(x, w, b), gy)
        grads_ref = torch.autograd.grad(y_ref, leaves(x, w, b), gy)
        grads64 = torch.autograd.grad(y64, leaves(x64, w64, b64), gy.double().cpu())
        for name, g, g_ref, g64 in zip(["x", "weight", "bias"], grads, grads_ref, grads64):
            assert_close_to_reference(g, g_ref, g64, f"{backend} grad {name} {dtype} act={act}")


def _ops_called(fn) -> set:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("hw,fused", [((4, 4), True), ((3, 5), True), ((1, 16), True), ((1, 17), True),
                                      ((5, 6), True), ((6, 6), True), ((7, 7), True), ((7, 9), True),
                                      ((8, 8), True), ((5, 13), False), ((9, 8), False)])
def test_cpu_small_maps_take_the_fused_pass(hw, fused):
    """float32 maps of at most 64 positions: one fused pass, no batched GEMM (and the
    larger ones still the GEMM). Padded to 16, 32, 48 and 64 columns; 9 images: whole
    register blocks of rows and a remainder. Beyond 16 positions the pass needs AVX-512."""
    skip_unless_available("cpu", "cpu")
    fused = fused and (hw[0] * hw[1] <= 16 or torch.backends.cpu.get_cpu_capability() == "AVX512")
    case = dict(B=9, C=6, H=hw[0], W=hw[1], bias=True)
    x, w, b = make_inputs(case, "cpu", torch.float32, requires_grad=False, layout="contiguous")
    ops = _ops_called(lambda: run("cpu", x, w, b, "relu"))
    assert ("aten::bmm" not in ops) == fused, sorted(ops)
    torch.testing.assert_close(run("cpu", x, w, b, "relu"), ref.channel_fc(x, w, b, "relu"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("B,hw,layout,act,bias,tall,tall_grad", [
    (4, (16, 32), "contiguous", "leaky_relu", True, True, False),    # 512 positions: a multiple of every block
    (5, (23, 23), "contiguous", "elu", True, True, False),            # 529: a column and a row left over
    (8, (17, 31), "contiguous", "leaky_relu", False, True, False),    # 527, no bias, the most images
    (1, (16, 16), "contiguous", "leaky_relu", True, False, True),     # the backward from 256 positions
    (3, (17, 17), "contiguous", "elu", True, False, True),            # 289, its most images
    (2, (13, 23), "contiguous", "relu", False, False, True),          # 299, no bias
    (3, (1, 600), "noncontig", "relu", True, False, False),           # positions not contiguous: the GEMMs
    (4, (16, 32), "channels_last", "relu", True, False, False),       # likewise
    (9, (16, 32), "contiguous", "relu", True, False, False),          # more images than the pass takes
    (3, (16, 32), "contiguous", "relu", True, False, True),           # fewer (the GEMM reads W at 1-3)
    (4, (15, 34), "contiguous", "relu", True, False, False),          # 510 positions: fewer than it takes
    (4, (15, 17), "contiguous", "relu", True, False, False),          # 255: the backward's GEMMs too
])
def test_cpu_large_maps_small_batch_take_the_streaming_pass(B, hw, layout, act, bias, tall, tall_grad):
    """float32 maps, positions contiguous: from 512 positions at 4 to 8 images the forward is one
    pass over the weight, no batched GEMM; from 256 positions at 1 to 3 images both gradients are
    one pass; forward and backward against float64; the rest the GEMMs."""
    skip_unless_available("cpu", "cpu")
    case = dict(B=B, C=3, H=hw[0], W=hw[1], bias=bias)
    x, w, b = make_inputs(case, "cpu", torch.float32, requires_grad=False, layout=layout)
    ops = _ops_called(lambda: run("cpu", x, w, b, act))
    assert ("aten::bmm" not in ops) == tall, sorted(ops)
    for t in leaves(x, w, b):
        t.requires_grad_(True)
    y = run("cpu", x, w, b, act)
    y_ref = run("reference", x, w, b, act)
    x64, w64, b64 = fp64(x), fp64(w), fp64(b)
    y64 = run("reference", x64, w64, b64, act)
    assert_close_to_reference(y, y_ref, y64, "cpu forward")
    assert y.is_contiguous(memory_format=torch.channels_last if layout != "contiguous" else torch.contiguous_format)
    gy = torch.randn_like(y_ref)
    ops = _ops_called(lambda: torch.autograd.grad(y, leaves(x, w, b), gy, retain_graph=True))
    assert ("aten::bmm" not in ops) == tall_grad, sorted(ops)
    grads = torch.autograd.grad(y, leaves(x, w, b), gy)
    grads_ref = torch.autograd.grad(y_ref, leaves(x, w, b), gy)
    grads64 = torch.autograd.grad(y64, leaves(x64, w64, b64), gy.double())
    for name, g, g_ref, g64 in zip(["x", "weight", "bias"], grads, grads_ref, grads64):
        assert_close_to_reference(g, g_ref, g64, f"cpu grad {name} act={act}")


def test_cpu_lower_instruction_sets_match_reference():
    """The C++ loops compiled for x86-64-v3 and the baseline (picked when torch runs at a lower
    CPU capability) against the reference, in fresh processes."""
    skip_unless_available("cpu", "cpu")
    code = (
        "import torch, fastinpaint.functional as FI\n"
        "from fastinpaint import use_backend\n"
        "from fastinpaint.ops.channel_fc import reference as ref\n"
        "torch.manual_seed(0)\n"
        "for B, C, H, W in [(67, 3, 4, 4), (5, 2, 3, 3), (3, 2, 3, 7), (9, 2, 6, 6), (7, 2, 8, 8), (2, 2, 17, 17),\n"
        "                   (5, 2, 23, 23)]:\n"
        "    x = torch.randn(B, C, H, W); w = torch.randn(C, H * W, H * W) / (H * W) ** 0.5\n"
        "    b = torch.randn(C, H * W)\n"
        "    for act in (None, 'relu', 'leaky_relu', 'elu'):\n"
        "        with use_backend('cpu'):\n"
        "            y = FI.channel_fc(x, w, b, act)\n"
        "        torch.testing.assert_close(y, ref.channel_fc(x, w, b, act or 'none'), rtol=1e-5, atol=1e-5)\n"
        "        ts = [t.detach().requires_grad_() for t in (x, w, b)]\n"
        "        with use_backend('cpu'):\n"
        "            y = FI.channel_fc(*ts, act)\n"
        "        gy = torch.randn_like(y)\n"
        "        g = torch.autograd.grad(y, ts, gy)\n"
        "        g_ref = torch.autograd.grad(ref.channel_fc(*ts, act or 'none'), ts, gy)\n"
        "        for a, r in zip(g, g_ref):\n"
        "            torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)\n"
        "print('ok', torch.backends.cpu.get_cpu_capability())\n")
    assert_runs_at_lower_cpu_capabilities(code)


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("layout,fmt", [("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last),
                                        ("noncontig", torch.channels_last)])
def test_layouts_in_place(backend, device, layout, fmt):
    """NCHW, channels_last and strided views: same values; y in x's format."""
    skip_unless_available(backend, device)
    case = CASES[0]
    x, w, b = make_inputs(case, device, torch.float32, layout=layout)
    y = run(backend, x, w, b, "leaky_relu", 0.1)
    assert y.is_contiguous(memory_format=fmt), y.stride()
    expected = ref.channel_fc(x.contiguous(), w, b, "leaky_relu", 0.1)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert gx.shape == x.shape and torch.isfinite(gx).all()


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("need", ["x", "weight", "bias", "weight+bias"])
def test_partial_gradients(backend, device, need):
    """Only the gradients asked for are computed (frozen weights, frozen input)."""
    skip_unless_available(backend, device)
    x, w, b = make_inputs(CASES[0], device, torch.float32, requires_grad=False)
    wanted = {"x": [x], "weight": [w], "bias": [b], "weight+bias": [w, b]}[need]
    for t in wanted:
        t.requires_grad_()
    y = run(backend, x, w, b, "elu")
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, wanted, gy)
    y_ref = run("reference", x, w, b, "elu")
    expected = torch.autograd.grad(y_ref, wanted, gy)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("activation", ACTS)
def test_gradcheck_float64(backend, activation):
    skip_unless_available(backend, "cpu")
    x = torch.randn(2, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 6, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        return run(backend, x, w, b, activation, 0.1)

    assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-5)
    xcl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(fn, (xcl, w, b), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_double_backward_matches_reference(backend):
    """Gradient penalties differentiate through the backward (elu: act' depends on y)."""
    skip_unless_available(backend, "cpu")
    dtype = torch.float64 if backend == "cpu" else torch.float32
    x = torch.randn(2, 3, 3, 4, dtype=dtype, requires_grad=True)
    w = torch.randn(3, 12, 12, dtype=dtype, requires_grad=True)
    b = torch.randn(3, 12, dtype=dtype, requires_grad=True)

    def penalty(name):
        y = run(name, x, w, b, "elu")
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), (w, b))

    tol = dict(rtol=1e-7, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for got, expected in zip(penalty(backend), penalty("reference")):
        scale = expected.abs().max().item()
        torch.testing.assert_close(got / scale, expected / scale, **tol)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_extreme_values_stay_finite(backend):
    """elu saturates to -1 and its act' (y + 1) to 0 without NaN or inf. With an identity
    weight the layer is its activation alone: torch.nn.functional's, in float64, is the answer."""
    skip_unless_available(backend, "cpu")
    x = torch.tensor([-1e4, -100.0, -1e-3, 0.0, 1e-3, 100.0]).reshape(1, 1, 2, 3).requires_grad_()
    w = torch.eye(6).unsqueeze(0).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    activations = {None: torch.clone, "relu": F.relu, "leaky_relu": lambda t: F.leaky_relu(t, 0.2), "elu": F.elu}
    for act in ACTS:
        y = run(backend, x, w, None, act)
        (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
        y64 = activations[act](x64)
        (gx64,) = torch.autograd.grad(y64, x64, torch.ones_like(y64))
        assert torch.isfinite(y).all() and torch.isfinite(gx).all(), (backend, act)
        torch.testing.assert_close(y.double(), y64.detach(), rtol=1e-5, atol=1e-6, msg=f"{backend} {act}")
        torch.testing.assert_close(gx.double(), gx64, rtol=1e-5, atol=1e-6, msg=f"{backend} {act} grad")


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_saves_only_the_output_for_backward(backend, device):
    """Beyond x, weight and bias (which live anyway) autograd keeps the output y only
    (with an activation) or nothing, never the pre-activation."""
    skip_unless_available(backend, device)
    from fastinpaint.benchmark import saved_bytes

    x, w, b = make_inputs(dict(CASES[0], B=8), device, torch.float32)
    y_bytes = x.numel() * 4
    with use_backend(backend):
        ours = saved_bytes(lambda: FI.channel_fc(x, w, b, "elu"), exclude=(x, w, b))
        ours_none = saved_bytes(lambda: FI.channel_fc(x, w, b), exclude=(x, w, b))
    with use_backend("reference"):
        eager = saved_bytes(lambda: FI.channel_fc(x, w, b, "elu"), exclude=(x, w, b))
    assert ours == y_bytes, ours
    assert ours_none == 0, ours_none
    assert eager >= y_bytes, eager


@pytest.mark.parametrize("backend,device", backend_device_params(with_reference=True))
def test_zero_batch(backend, device):
    skip_unless_available(backend, device)
    x, w, b = make_inputs(dict(CASES[0], B=0), device, torch.float32)
    y = run(backend, x, w, b, "relu")
    assert y.shape == x.shape
    gw, gb = torch.autograd.grad(y.sum(), (w, b))
    assert (gw == 0).all() and (gb == 0).all()


@pytest.mark.parametrize("backend,device", backend_device_params(with_reference=True))
def test_deterministic(backend, device):
    skip_unless_available(backend, device)
    torch.use_deterministic_algorithms(True)
    try:
        results = []
        for _ in range(2):
            torch.manual_seed(3)
            x, w, b = make_inputs(CASES[2], device, torch.float32)
            y = run(backend, x, w, b, "elu")
            results.append([y, *torch.autograd.grad(y, (x, w, b), torch.ones_like(y))])
    finally:
        torch.use_deterministic_algorithms(False)
    for first, second in zip(*results):
        assert torch.equal(first, second)


# ----------------------------------------------------------------------------- bad input

def _args(**over):
    args = dict(x=torch.randn(2, 3, 4, 5), weight=torch.randn(3, 20, 20), bias=torch.randn(3, 20), activation=None)
    args.update(over)
    return args


BAD_INPUTS = [
    (dict(weight=torch.randn(3, 20, 16)), ValueError, r"weight must have shape \(C, H\*W, H\*W\) = \(3, 20, 20\)"),
    (dict(weight=torch.randn(4, 20, 20)), ValueError, r"weight must have shape"),
    (dict(weight=torch.randn(3, 400)), ValueError, r"weight must be 3-D"),
    (dict(bias=torch.randn(3, 21)), ValueError, r"bias must have shape \(C, H\*W\) = \(3, 20\)"),
    (dict(bias=torch.randn(60)), ValueError, r"bias must be 2-D"),
    (dict(x=torch.randn(3, 4, 5)), ValueError, r"x must be 4-D"),
    (dict(x=torch.randint(0, 3, (2, 3, 4, 5))), TypeError, r"x must be float"),
    (dict(x=[1.0]), TypeError, r"x must be a torch.Tensor"),
    (dict(weight=torch.randn(3, 20, 20, dtype=torch.float64)), TypeError, r"weight has dtype"),
    (dict(x=torch.randn(2, 3, 0, 5), weight=torch.randn(3, 0, 0), bias=None), ValueError, r"positive channels"),
    (dict(activation="gelu"), ValueError, r"activation must be None or one of"),
    (dict(activation="leaky_relu", negative_slope=-0.1), ValueError, r"negative_slope must be >= 0"),
    (dict(activation="leaky_relu", negative_slope=float("nan")), ValueError, r"negative_slope must be a finite"),
]


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("over,exc,match", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_input_gives_clear_error(backend, over, exc, match):
    with use_backend(backend), pytest.raises(exc, match=match):
        FI.channel_fc(**_args(**over))


def test_cpp_op_checks_its_arguments():
    """The C++ ops check on their own too (they are public through torch.ops)."""
    skip_unless_available("cpu", "cpu")
    op = torch.ops.fastinpaint.channel_fc_forward
    with pytest.raises(RuntimeError, match="weight must have shape"):
        op(torch.randn(2, 3, 4, 5), torch.randn(3, 20, 19), None, 0, 0.2)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        op(torch.randn(2, 3, 4, 5), torch.randn(3, 20, 20), torch.randn(3, 19), 0, 0.2)
    with pytest.raises(RuntimeError, match="activation code"):
        op(torch.randn(2, 3, 4, 5), torch.randn(3, 20, 20), None, 7, 0.2)
    with pytest.raises(RuntimeError, match="grad_out must have the shape of x"):
        torch.ops.fastinpaint.channel_fc_backward(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 5),
                                                  torch.randn(3, 20, 20), None, 0, 0.2, True, True, True)
    with pytest.raises(RuntimeError, match="out .* is required"):
        torch.ops.fastinpaint.channel_fc_backward(torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5),
                                                  torch.randn(3, 20, 20), None, 1, 0.2, True, True, True)


def test_triton_refuses_float64_clearly():
    skip_unless_available("triton", "cpu")
    with use_backend("triton"), pytest.raises(TypeError, match="float64.*triton backend"):
        FI.channel_fc(**_args(x=torch.randn(2, 3, 4, 5, dtype=torch.float64),
                              weight=torch.randn(3, 20, 20, dtype=torch.float64), bias=None))


def test_forced_backend_for_wrong_device_raises():
    with use_backend("cuda"), pytest.raises(BackendUnavailableError, match="cuda"):
        FI.channel_fc(**_args())


@requires_cuda
@gpu
def test_mixed_devices_rejected():
    with pytest.raises(ValueError, match="weight is on cuda"):
        FI.channel_fc(**_args(weight=torch.randn(3, 20, 20, device="cuda")))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_autocast_like_bmm(backend):
    """The kernels run in the autocast dtype (as bmm does); the eager reference's float32
    bias then promotes its result back to float32."""
    skip_unless_available(backend, "cpu")
    x, w, b = torch.randn(2, 3, 4, 5), torch.randn(3, 20, 20), torch.randn(3, 20)
    with torch.autocast("cpu", dtype=torch.bfloat16), use_backend(backend):
        y = FI.channel_fc(x, w, b, "relu")
    assert y.dtype == (torch.float32 if backend == "reference" else torch.bfloat16)
    torch.testing.assert_close(y.float(), ref.channel_fc(x, w, b, "relu"), rtol=5e-2, atol=1e-1)


# ----------------------------------------------------------------------------- torch.library / compile

def test_opcheck_cpp_ops():
    skip_unless_available("cpu", "cpu")
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 3, 4, 5).contiguous(memory_format=fmt).requires_grad_()
        w, b = torch.randn(3, 20, 20, requires_grad=True), torch.randn(3, 20, requires_grad=True)
        torch.library.opcheck(torch.ops.fastinpaint.channel_fc_forward.default, (x, w, b, 3, 0.2))
        torch.library.opcheck(torch.ops.fastinpaint.channel_fc_forward.default, (x, w, None, 0, 0.2))
        y = torch.randn(2, 3, 4, 5).contiguous(memory_format=fmt)
        torch.library.opcheck(torch.ops.fastinpaint.channel_fc_backward.default,
                              (torch.randn_like(y), x.detach(), w.detach(), y, 2, 0.1, True, True, True))
        torch.library.opcheck(torch.ops.fastinpaint.channel_fc_backward.default,
                              (torch.randn_like(y), x.detach(), w.detach(), None, 0, 0.1, False, True, False))


def test_opcheck_triton_ops():
    skip_unless_available("triton", "cpu")
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    w, b = torch.randn(3, 20, 20, requires_grad=True), torch.randn(3, 20, requires_grad=True)
    torch.library.opcheck(torch.ops.fastinpaint.channel_fc_forward_triton.default, (x, w, b, 1, 0.2))
    y = torch.randn(2, 3, 4, 5)
    torch.library.opcheck(torch.ops.fastinpaint.channel_fc_backward_triton.default,
                          (torch.randn_like(y), x.detach(), w.detach(), y, 3, 0.2, True, True, True))


@pytest.mark.parametrize("backend,compile_backend", [("cpu", "inductor"), ("triton", "aot_eager"),
                                                     ("reference", "aot_eager")])
def test_compile_fullgraph_module(backend, compile_backend):
    skip_unless_available(backend, "cpu")
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1),
                                fastinpaint.nn.ChannelWiseFC(4, 5, 6, activation="leaky_relu"))
    x = torch.randn(2, 3, 5, 6, requires_grad=True)
    with use_backend(backend):
        eager = model(x)
        out = torch.compile(model, fullgraph=True, backend=compile_backend)(x)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(eager, x, g)[0],
                               rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- module

def test_module_shapes_init_and_parts():
    m = fastinpaint.nn.ChannelWiseFC(8, 4, 3, activation="relu", dropout=0.5)
    assert m.weight.shape == (8, 12, 12) and m.bias.shape == (8, 12)
    assert isinstance(m.mix, torch.nn.Conv2d) and m.mix.kernel_size == (1, 1) and m.mix.in_channels == 8
    # nn.Linear's fan-in initialisation per channel: U(-1/sqrt(P), 1/sqrt(P)), std 1/sqrt(3P)
    big = fastinpaint.nn.ChannelWiseFC(64, 8, 8)
    assert abs(big.weight.std().item() - 1 / math.sqrt(3 * 64)) < 0.005
    assert big.weight.abs().max().item() <= 1 / 8
    x = torch.randn(2, 8, 4, 3)
    m.eval()
    y = m(x)
    assert y.shape == (2, 8, 4, 3)
    expected = m.mix(ref.channel_fc(x, m.weight, m.bias, "relu"))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    m.train()
    torch.manual_seed(0)
    y_train = m(x)
    assert not torch.allclose(y_train, y)  # dropout acts in training
    plain = fastinpaint.nn.ChannelWiseFC(8, 4, 3, bias=False, mix_channels=False)
    assert plain.bias is None and plain.mix is None
    torch.testing.assert_close(plain(x), ref.channel_fc(x, plain.weight, None), rtol=1e-5, atol=1e-5)
    assert "channels=8" in repr(plain)


def test_module_rejects_bad_configuration():
    with pytest.raises(ValueError, match="channels"):
        fastinpaint.nn.ChannelWiseFC(0, 4, 4)
    with pytest.raises(ValueError, match="height"):
        fastinpaint.nn.ChannelWiseFC(3, 0, 4)
    with pytest.raises(ValueError, match="activation"):
        fastinpaint.nn.ChannelWiseFC(3, 4, 4, activation="gelu")
    with pytest.raises(ValueError, match="dropout"):
        fastinpaint.nn.ChannelWiseFC(3, 4, 4, dropout=1.5)
    m = fastinpaint.nn.ChannelWiseFC(3, 4, 4)
    with pytest.raises(ValueError, match="weight must have shape"):
        m(torch.randn(1, 3, 4, 5))


def test_triton_flat_positions_only_where_rows_follow_each_other():
    """The Triton kernels address position p as p * stride_w (no division in the K loop) only
    for maps whose rows follow each other; a view that skips columns keeps (p // W, p % W). The
    layout tests above check both paths' values."""
    pytest.importorskip("triton")
    from fastinpaint.ops.channel_fc import triton as ck

    x = torch.randn(2, 3, 4, 6)
    assert ck._flat(x) and ck._flat(x.contiguous(memory_format=torch.channels_last))
    assert not ck._flat(x[..., :5]) and not ck._flat(x, x[:, :, ::2])
    assert ck._flat(x[..., ::2])  # every other column: rows still follow each other at stride 2
    assert ck._flat(x[:, :, :1, :5])  # one row: nothing to divide
