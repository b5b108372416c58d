"""Partial convolution: every kernel backend against the reference (the public formulation),
forward and backward, single- and multi-channel masks, odd shapes, layouts, float32/float16;
gradcheck, opcheck, torch.compile, the module, bad inputs."""

import pytest
import torch
import torch.nn.functional as F

import fastinpaint
from fastinpaint import use_backend
from fastinpaint.nn import PartialConv2d
from fastinpaint.ops.partial_conv import reference as ref
from fastinpaint.ops.partial_conv.op import partial_conv2d

from conftest import assert_close_to_reference, backend_device_params, dtypes_for, skip_unless_available

GEOMETRIES = [  # (kernel, stride, padding, dilation)
    (3, 1, 1, 1),
    (5, 2, 2, 1),
    (3, 1, 2, 2),
    ((3, 1), (2, 1), (1, 0), 1),
]


def _inputs(device, dtype, cm, b=2, cin=3, cout=5, h=7, w=9, k=(3, 3), bias=True, fractional=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cin, h, w, generator=g)
    mask = (torch.rand(b, cm, h, w, generator=g) > 0.5).float()
    mask[0, :, :3, :] = 0                    # a hole wider than the kernel: windows with no valid pixel
    if fractional:
        mask = mask * torch.rand(b, cm, h, w, generator=g)
    k = (k, k) if isinstance(k, int) else k
    wt = torch.randn(cout, cin, *k, generator=g) * 0.3
    bs = torch.randn(cout, generator=g) if bias else None
    to = dict(device=device, dtype=dtype)
    return x.to(**to), mask.to(**to), wt.to(**to), (bs.to(**to) if bs is not None else None)


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("cm", [1, 3])
def test_forward_backward_match_reference(backend, device, geometry, cm):
    skip_unless_available(backend, device)
    k, s, p, d = geometry
    for dtype in dtypes_for(device):
        for bias in (True, False):
            x, m, w, b = _inputs(device, dtype, cm, k=k, bias=bias)
            leaves = [x, w] + ([b] if b is not None else [])
            for t in leaves:
                t.requires_grad_()
            with use_backend(backend):
                out, nm = partial_conv2d(x, m, w, b, s, p, d)
            r_out, r_nm = ref.partial_conv2d(x, m, w, b, s, p, d)
            e_in = [t.detach().double().requires_grad_() for t in leaves]
            e_out, e_nm = ref.partial_conv2d(e_in[0], m.double(), e_in[1], e_in[2] if b is not None else None, s, p, d)
            assert_close_to_reference(out, r_out, e_out, "out")
            assert nm.shape == r_nm.shape and nm.dtype == dtype
            assert torch.equal(nm.float(), r_nm.float())
            g = torch.randn_like(e_out)
            grads = torch.autograd.grad(out, leaves, g.to(dtype))
            r_grads = torch.autograd.grad(r_out, leaves, g.to(dtype))
            e_grads = torch.autograd.grad(e_out, e_in, g)
            for name, a, r, e in zip(("x", "weight", "bias"), grads, r_grads, e_grads):
                assert_close_to_reference(a, r, e, f"grad {name}")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_fractional_mask_layouts_and_views(backend):
    skip_unless_available(backend, "cpu")
    x, m, w, b = _inputs("cpu", torch.float32, 1, b=3, cin=4, cout=6, h=10, w=11, fractional=True)
    expected, expected_mask = ref.partial_conv2d(x, m, w, b, 1, 1, 1)
    variants = {
        "channels_last": (x.contiguous(memory_format=torch.channels_last), w),
        "view": (torch.randn(3, 8, 10, 11)[:, ::2], w),
    }
    with use_backend(backend):
        out, nm = partial_conv2d(x, m, w, b, 1, 1, 1)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(nm, expected_mask)
        for name, (xv, wv) in variants.items():
            o, _ = partial_conv2d(xv, m, wv, b, 1, 1, 1)
            e, _ = ref.partial_conv2d(xv, m, wv, b, 1, 1, 1)
            torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-5, msg=name)
            if name == "channels_last":
                assert o.is_contiguous(memory_format=torch.channels_last)


def test_published_semantics():
    """Renormalisation sum(1)/sum(M), zero output and zero new mask where a window has no
    valid pixel, the new mask 1 elsewhere; an all-valid mask is a plain convolution inside."""
    x = torch.randn(1, 2, 8, 8)
    w, b = torch.randn(3, 2, 3, 3), torch.randn(3)
    mask = torch.ones(1, 1, 8, 8)
    mask[..., :4, :] = 0
    for backend in ("reference", "cpu"):
        skip_unless_available(backend, "cpu")
        with use_backend(backend):
            out, nm = partial_conv2d(x, mask, w, b, 1, 1, 1)
        assert torch.all(out[..., :3, :] == 0) and torch.all(nm[..., :3, :] == 0)
        assert torch.all(nm[..., 3:, :] == 1)
        torch.testing.assert_close(out[..., 5:7, 1:7], F.conv2d(x, w, b, padding=1)[..., 5:7, 1:7])
        # row 3 sees 3 valid pixels of 9 per column inside: 9/3 = 3x the masked convolution
        masked = F.conv2d(x * mask, w, None, padding=1)[..., 3, 1:7]
        torch.testing.assert_close(out[..., 3, 1:7], masked * 3 + b.view(1, 3, 1))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_float64(backend):
    skip_unless_available(backend, "cpu")
    x, m, w, b = _inputs("cpu", torch.float64, 1, b=1, cin=2, cout=3, h=5, w=6, fractional=True)
    for t in (x, w, b):
        t.requires_grad_()
    with use_backend(backend):
        assert torch.autograd.gradcheck(lambda x, w, b: partial_conv2d(x, m, w, b, 2, 1, 1)[0], (x, w, b))
        assert torch.autograd.gradgradcheck(lambda x, w, b: partial_conv2d(x, m, w, b, 1, 1, 1)[0], (x, w, b))


def test_opcheck():
    raw = torch.randn(2, 4, 5, 6, requires_grad=True)
    ms = (torch.rand(2, 1, 5, 6) > 0.3).float()
    bias = torch.randn(4, requires_grad=True)
    args = (raw, ms, bias, [3, 3], [1, 1], [1, 1], [1, 1], 9.0)
    skip_unless_available("triton", "cpu")
    torch.library.opcheck(torch.ops.fastinpaint.partial_conv_renorm_triton.default, args)
    skip_unless_available("cpu", "cpu")
    torch.library.opcheck(torch.ops.fastinpaint.partial_conv_renorm.default, args)
    cl = raw.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(torch.ops.fastinpaint.partial_conv_renorm.default, (cl, ms, None, [3, 3], [1, 1], [1, 1],
                                                                             [1, 1], 9.0))


@pytest.mark.parametrize("backend,compile_backend", [("cpu", "inductor"), ("triton", "aot_eager")])
def test_compile_fullgraph(backend, compile_backend):
    skip_unless_available(backend, "cpu")
    torch._dynamo.reset()
    layer1 = PartialConv2d(3, 4, 3, padding=1, multi_channel=True, return_mask=True)
    layer2 = PartialConv2d(4, 2, 3, stride=2, padding=1, multi_channel=True, return_mask=True)

    def net(x, m):
        y, m1 = layer1(x, m)
        return layer2(y, m1)

    x = torch.randn(2, 3, 9, 10, requires_grad=True)
    m = (torch.rand(2, 3, 9, 10) > 0.4).float()
    with use_backend(backend):
        eager, eager_m = net(x, m)
        out, out_m = torch.compile(net, fullgraph=True, backend=compile_backend)(x, m)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_m, eager_m)
    (gc,) = torch.autograd.grad(out.sum(), x)
    (ge,) = torch.autograd.grad(eager.sum(), x)
    torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-5)


def test_module():
    torch.manual_seed(0)
    layer = PartialConv2d(3, 4, 3, padding=1, return_mask=True)
    x = torch.randn(2, 3, 6, 7)
    out, nm = layer(x)                                     # no mask: all valid
    assert nm.shape == (2, 1, 6, 7) and torch.all(nm == 1)
    torch.testing.assert_close(out[..., 1:-1, 1:-1], F.conv2d(x, layer.weight, layer.bias, padding=1)[..., 1:-1, 1:-1])
    multi = PartialConv2d(3, 4, 3, padding=1, multi_channel=True, return_mask=True)
    m = (torch.rand(2, 3, 6, 7) > 0.5).float()
    out, nm = multi(x, m)
    assert nm.shape == (2, 4, 6, 7)
    nvidia_state = {**multi.state_dict(), "weight_maskUpdater": torch.ones(4, 3, 3, 3)}
    PartialConv2d(3, 4, 3, padding=1, multi_channel=True).load_state_dict(nvidia_state)
    assert PartialConv2d(3, 4, 3)(x, m[:, :1]).shape == (2, 4, 4, 5)
    with pytest.raises(ValueError, match="channel"):
        layer(x, m)


def test_bad_inputs():
    x, m, w, b = _inputs("cpu", torch.float32, 1)
    with pytest.raises(ValueError, match="mask"):
        partial_conv2d(x, m[:, :, :5], w, b, 1, 1, 1)
    with pytest.raises(ValueError, match="mask"):
        partial_conv2d(x, torch.ones(2, 2, 7, 9), w, b, 1, 1, 1)
    with pytest.raises(ValueError, match="in_channels"):
        partial_conv2d(x[:, :2], m, w, b)
    with pytest.raises(ValueError, match="bias"):
        partial_conv2d(x, m, w, b[:2])
    with pytest.raises(TypeError, match="weight"):
        partial_conv2d(x, m, w.double(), b)
    with pytest.raises(TypeError, match="mask"):
        partial_conv2d(x, m.int(), w, b)
    with pytest.raises(ValueError, match="spans"):
        partial_conv2d(x[..., :2, :2], m[..., :2, :2], w, b)
    skip_unless_available("cpu", "cpu")
    with pytest.raises(RuntimeError, match="mask_sum"):
        torch.ops.fastinpaint.partial_conv_renorm(torch.randn(1, 2, 3, 3), torch.ones(1, 2, 3, 3), None,
                                                  [3, 3], [1, 1], [1, 1], [1, 1], 9.0)
    with pytest.raises(RuntimeError, match="output size"):
        torch.ops.fastinpaint.partial_conv_renorm(torch.randn(1, 2, 3, 3), torch.ones(1, 1, 5, 5), None,
                                                  [3, 3], [1, 1], [1, 1], [1, 1], 9.0)
