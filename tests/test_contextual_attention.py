"""The blocked contextual attention against the reference (the full L x L form): random
inputs, odd map sizes, per-sample masks, both masking modes, several tile shapes, forward
and gradients; its memory bound; the DeepFill v2 generator on it."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import assert_close_to_reference, devices
from fastinpaint import use_backend
from fastinpaint._backend import unavailable_reason
from fastinpaint.models import DeepFillV2Generator, contextual_attention
from fastinpaint.models.contextual_attention import (ContextualAttention, _blocked_inference, _tile_cost,
                                                     _tile_shape, blocked_memory, contextual_attention_blocked,
                                                     reference_memory)


def _inputs(b, c, hs, ws, rate, dtype=torch.float64, device="cpu", seed=0):
    """Features (B, C, rate*hs, rate*ws) and per-sample masks at 4x their size (as in DeepFill):
    sample 0 a box, sample 1 another box, sample 2 no hole, sample 3 all hole."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, rate * hs, rate * ws, generator=g, dtype=torch.float64)
    x = (x * 0.3).to(dtype=dtype, device=device)
    mask = torch.zeros(b, 1, 4 * rate * hs, 4 * rate * ws, dtype=dtype, device=device)
    mh, mw = mask.shape[-2:]
    if b > 0:
        mask[0, :, mh // 5:mh // 2, mw // 3:mw - 2] = 1
    if b > 1:
        mask[1, :, mh // 2:, : mw // 2] = 1
    if b > 3:
        mask[3] = 1
    return x, mask


def _budgets(hs, ws, b, ring, el=8):
    """Budgets that give tiles of 1 x 1, 3 x 3, about twice that, and the whole map (None)."""
    return [_tile_cost(t, t, hs * ws, ring, b, el, el) for t in (1, 3, 5)] + [None]


CASES = [  # (batch, channels, hs, ws, ksize, rate, fuse_k, fuse)
    (4, 3, 7, 9, 3, 2, 3, True),      # DeepFill's setting, odd map
    (1, 4, 8, 10, 3, 2, 3, True),     # one sample: only the keys valid in it are used
    (2, 5, 5, 11, 3, 2, 3, True),     # wide map
    (3, 2, 9, 4, 5, 3, 5, True),      # larger windows and rate
    (2, 3, 6, 5, 3, 2, 1, True),      # fuse_k = 1: no fuse
    (2, 3, 5, 6, 3, 2, 3, False),     # fuse off
]


@pytest.mark.parametrize("masking", ["official", "exclude"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}c{}_{}x{}_k{}r{}f{}{}".format(*c[:7], "" if c[7] else "off"))
def test_blocked_matches_reference_forward_and_gradients(case, masking):
    b, c, hs, ws, ksize, rate, fuse_k, fuse = case
    kw = dict(ksize=ksize, rate=rate, fuse_k=fuse_k, fuse=fuse, masking=masking)
    x, mask = _inputs(b, c, hs, ws, rate)
    x.requires_grad_(True)
    ref = contextual_attention(x, mask, **kw)
    g = torch.randn_like(ref)
    (gref,) = torch.autograd.grad(ref, x, g)
    ring = fuse_k // 2 if fuse else 0
    for budget in _budgets(hs, ws, b, ring):
        out = contextual_attention_blocked(x, mask, block_bytes=budget, **kw)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12, msg=lambda m: f"budget {budget}: {m}")
        # inference: the C++ fused scores (cpu backend), and the loop that runs the masking and
        # softmax in place (reference backend)
        for backend in ("cpu", "reference"):
            if backend == "cpu" and unavailable_reason("cpu", "cpu") is not None:
                continue
            with torch.no_grad(), use_backend(backend):
                torch.testing.assert_close(contextual_attention_blocked(x, mask, block_bytes=budget, **kw), ref,
                                           rtol=1e-10, atol=1e-12,
                                           msg=lambda m: f"no_grad, {backend}, budget {budget}: {m}")
        (gx,) = torch.autograd.grad(out, x, g)
        torch.testing.assert_close(gx, gref, rtol=1e-9, atol=1e-11, msg=lambda m: f"budget {budget}: {m}")
    if b > 3:
        assert torch.all(out[3] == 0)     # no valid key: zeros, as the reference


def _ran(fn, name) -> bool:
    """Whether calling ``fn`` ran an op whose name contains ``name``."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return any(name in e.key for e in prof.key_averages())


def _ran_fused_scores(fn) -> bool:
    return _ran(fn, "contextual_fuse_scores")


def test_fused_scores_kernel_runs_where_it_applies():
    """Without gradients on CPU float32/float64 the C++ kernel builds the fused scores; with
    gradients, under use_backend("reference") and for float16 the module's loop does."""
    if unavailable_reason("cpu", "cpu") is not None:
        pytest.skip("no C++ extension")
    x, mask = _inputs(2, 3, 7, 9, 2, dtype=torch.float32)
    ref = contextual_attention(x, mask)
    with torch.no_grad():
        assert _ran_fused_scores(lambda: contextual_attention_blocked(x, mask, block_bytes=1))
        out = contextual_attention_blocked(x, mask, block_bytes=1)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        with use_backend("reference"):
            assert not _ran_fused_scores(lambda: contextual_attention_blocked(x, mask, block_bytes=1))
        assert not _ran_fused_scores(lambda: contextual_attention_blocked(x.half(), mask.half(), block_bytes=1))
    xg = x.clone().requires_grad_()
    assert not _ran_fused_scores(lambda: contextual_attention_blocked(xg, mask, block_bytes=1))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_compiled_module_runs_the_blocked_op_without_gradients(channels_last):
    """Under torch.compile (fullgraph) the module without gradients on the CPU calls the blocked
    form as one op (its C++ fused scores, the used keys: what it runs uncompiled), for a map of
    one tile and of several, equal to the reference, the output in x's layout; with gradients
    it traces the reference."""
    if unavailable_reason("cpu", "cpu") is not None:
        pytest.skip("no C++ extension")
    torch._dynamo.reset()
    x, mask = _inputs(2, 3, 7, 9, 2)                       # float64, per-sample masks
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for masking, block_bytes in (("official", None), ("exclude", None), ("official", 1)):
        ca = ContextualAttention(masking=masking, block_bytes=block_bytes)
        ref = contextual_attention(x, mask, masking=masking)
        compiled = torch.compile(ca, fullgraph=True, dynamic=False)
        with torch.no_grad():
            assert _ran(lambda: compiled(x, mask), "contextual_attention_inference")
            assert _ran_fused_scores(lambda: compiled(x, mask))
            out = compiled(x, mask)
            torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
            assert out.stride() == ca(x, mask).stride()
        xg = x.clone().requires_grad_()
        assert not _ran_fused_scores(lambda: compiled(xg, mask))
        torch.testing.assert_close(compiled(xg, mask), ref, rtol=1e-10, atol=1e-12)


def test_compiled_module_runs_the_blocked_op_with_dynamic_sizes():
    """With dynamic sizes (a compiled model seeing its second image size) the module still calls
    the blocked op without gradients, not the reference's (L x L) maps."""
    if unavailable_reason("cpu", "cpu") is not None:
        pytest.skip("no C++ extension")
    torch._dynamo.reset()
    ca = ContextualAttention()
    compiled = torch.compile(ca, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for hs, ws in ((3, 5), (4, 7)):
            x, mask = _inputs(2, 3, hs, ws, 2)
            assert _ran(lambda: compiled(x, mask), "contextual_attention_inference")
            torch.testing.assert_close(compiled(x, mask), contextual_attention(x, mask), rtol=1e-10, atol=1e-12)


def test_blocked_inference_op_opcheck():
    """The opaque op's fake kernel against the real one (strides included): with and without a
    mask, one tile and several, one channel in channels_last strides (also NCHW-contiguous),
    batch 1, channels_last and a non-dense view."""
    if unavailable_reason("cpu", "cpu") is not None:
        pytest.skip("no C++ extension")
    x, mask = _inputs(2, 4, 3, 5, 2)
    one = torch.randn(1, 1, 6, 10, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    wide = torch.randn(2, 8, 6, 12, dtype=torch.float64)[:, ::2, :, ::2]      # not dense
    cases = [(x, mask, None), (x, None, None), (x, mask, 1), (x[:1], mask[:1], None), (one, None, 1),
             (x.contiguous(memory_format=torch.channels_last), mask, 1), (wide, None, None)]
    for features, m, block_bytes in cases:
        args = (features, m, 3, 2, 3, 10.0, True, "official", block_bytes)
        torch.library.opcheck(_blocked_inference, args)
        with torch.no_grad():
            want = contextual_attention_blocked(features, m, block_bytes=block_bytes)
        got = _blocked_inference(*args)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_fused_scores_kernel_refuses_a_plan_outside_the_map():
    if unavailable_reason("cpu", "cpu") is not None:
        pytest.skip("no C++ extension")
    op = torch.ops.fastinpaint.contextual_fuse_scores
    t, valid = torch.randn(1, 4, 6), torch.ones(1, 6, dtype=torch.bool)
    z = torch.zeros(1, dtype=torch.long)
    plan = dict(offs=z, spans=torch.tensor([0, 6]), wrap_ptr=torch.zeros(2, dtype=torch.long),
                wrap_dst=z[:0], wrap_src=z[:0])
    good = op(t, torch.tensor([[0, 1, 3]]), *plan.values(), valid, 2.0, 0)
    torch.testing.assert_close(good, t[:, [0, 1, 3]] * 2)
    with pytest.raises(RuntimeError, match="identity shift"):
        op(t, torch.tensor([[0, 4, 3]]), *plan.values(), valid, 2.0, 0)
    with pytest.raises(RuntimeError, match="key span leaves the map"):
        op(t, torch.tensor([[0, 1, 3]]), torch.ones(1, dtype=torch.long), *list(plan.values())[1:], valid, 2.0, 0)
    with pytest.raises(RuntimeError, match="masking must be"):
        op(t, torch.tensor([[0, 1, 3]]), *plan.values(), valid, 2.0, 5)


def test_tile_shapes():
    """The largest square tile within the budget; full rows, then more rows, on a narrow map;
    the whole map when it fits; single queries below that."""
    cost = _tile_cost
    assert _tile_shape(7, 9, 1, 4, 8, 8, cost(3, 3, 63, 1, 4, 8, 8)) == (3, 3)
    assert _tile_shape(7, 9, 1, 4, 8, 8, cost(3, 3, 63, 1, 4, 8, 8) - 1) == (2, 2)
    assert _tile_shape(20, 3, 1, 1, 4, 4, cost(5, 3, 60, 1, 1, 4, 4)) == (5, 3)
    assert _tile_shape(3, 20, 1, 1, 4, 4, cost(3, 6, 60, 1, 1, 4, 4)) == (3, 6)
    assert _tile_shape(7, 9, 1, 4, 8, 8, 10**12) == (7, 9)
    assert _tile_shape(7, 9, 1, 4, 8, 8, 1) == (1, 1)
    for budget in (10**5, 10**6, 10**7):       # the chosen tile fits, one more row and column would not
        th, tw = _tile_shape(40, 50, 1, 2, 4, 4, budget)
        assert cost(th, tw, 2000, 1, 2, 4, 4) <= budget or (th, tw) == (1, 1)
        assert cost(th + 1, tw + 1, 2000, 1, 2, 4, 4) > budget


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("masking", ["official", "exclude"])
def test_blocked_low_precision_within_reference_error(device, dtype, masking):
    """Against the float64 reference, the blocked form's error is at most twice the
    reference's own error in the same dtype (the project's rule)."""
    x64, mask64 = _inputs(2, 8, 9, 7, 2, seed=3)
    ref64 = contextual_attention(x64, mask64, masking=masking)
    x, mask = x64.to(device=device, dtype=dtype), mask64.to(device=device, dtype=dtype)
    ref = contextual_attention(x, mask, masking=masking)
    budget = _tile_cost(4, 4, 63, 1, 2, x.element_size(), 4)
    out = contextual_attention_blocked(x, mask, masking=masking, block_bytes=budget)
    assert out.dtype == dtype and out.device.type == device
    assert_close_to_reference(out, ref, ref64)
    # gradients (float32 only: the reference's 16-bit gradient error is itself large)
    if dtype == torch.float32:
        xg, x64g = x.clone().requires_grad_(True), x64.clone().requires_grad_(True)
        g64 = torch.randn_like(ref64)
        (gout,) = torch.autograd.grad(contextual_attention_blocked(xg, mask, masking=masking, block_bytes=budget),
                                      xg, g64.to(x))
        (gref,) = torch.autograd.grad(contextual_attention(xg, mask, masking=masking), xg, g64.to(x))
        (gref64,) = torch.autograd.grad(contextual_attention(x64g, mask64, masking=masking), x64g, g64)
        assert_close_to_reference(gout, gref, gref64, name="grad")


class _LargestOutput(TorchDispatchMode):
    """The largest number of elements of any tensor an op returns inside the mode."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("grad", [False, True])
def test_blocked_never_builds_the_score_matrix(grad):
    """With a budget of a few rows of queries, no tensor of forward or backward holds
    anywhere near L x L elements; the reference's does (so the probe can see it)."""
    hs, ws, c = 24, 20, 4
    n = hs * ws
    x, mask = _inputs(1, c, hs, ws, 2, dtype=torch.float32)
    x.requires_grad_(grad)
    budget = _tile_cost(6, 6, n, 1, 1, 4, 4)
    with torch.set_grad_enabled(grad):
        with _LargestOutput() as probe:
            out = contextual_attention_blocked(x, mask, block_bytes=budget)
            if grad:
                out.sum().backward()
        with _LargestOutput() as probe_ref:
            contextual_attention(x.detach(), mask)
    features = 16 * c * n            # the raw patches: the largest tensor the blocked form must hold
    assert probe_ref.largest >= n * n
    assert probe.largest <= max(features, budget // 4), (probe.largest, n * n)
    assert probe.largest < n * n // 4


def test_blocked_keeps_channels_last_and_checks_arguments():
    x, mask = _inputs(2, 4, 5, 6, 2, dtype=torch.float32)
    xcl = x.contiguous(memory_format=torch.channels_last)
    budget = _tile_cost(2, 2, 30, 1, 2, 4, 4)
    out = contextual_attention_blocked(xcl, mask, block_bytes=budget)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, contextual_attention(x, mask), rtol=1e-5, atol=1e-6)
    assert contextual_attention_blocked(x, mask).is_contiguous()
    # every key in a hole, in every sample: zeros and zero gradients, as the reference
    xg = x.clone().requires_grad_(True)
    for masking in ("official", "exclude"):
        out = contextual_attention_blocked(xg, torch.ones_like(mask), masking=masking, block_bytes=budget)
        assert torch.all(out == 0)
        (g,) = torch.autograd.grad(out.sum(), xg)
        assert torch.all(g == 0)
    for bad in (0, -5, 1.5, True):
        with pytest.raises(ValueError, match="block_bytes"):
            contextual_attention_blocked(x, mask, block_bytes=bad)
    with pytest.raises(ValueError, match="multiples of rate"):
        contextual_attention_blocked(torch.randn(1, 2, 7, 8))
    with pytest.raises(ValueError, match="per sample"):
        contextual_attention_blocked(x, torch.zeros(3, 1, 20, 24))
    with pytest.raises(ValueError, match="masking"):
        contextual_attention_blocked(x, masking="first")
    with pytest.raises(ValueError, match="blocked"):
        ContextualAttention(blocked="yes")


def test_generator_runs_the_blocked_form():
    """DeepFill v2's generator uses the blocked form; with the reference swapped in, its
    output and gradients are the same."""
    torch.manual_seed(0)
    g = DeepFillV2Generator(cnum=4).double()
    ca = g.stage2.contextual_attention
    assert ca.blocked
    ca.block_bytes = 1      # a tile per matching position
    image = torch.rand(2, 3, 48, 40, dtype=torch.float64) * 2 - 1
    mask = torch.zeros(2, 1, 48, 40, dtype=torch.float64)
    mask[0, :, 8:30, 5:25] = 1
    mask[1, :, 30:, 20:] = 1
    x = torch.cat([image * (1 - mask), torch.ones_like(mask), mask], 1)
    out = g(x)[1]
    grads = torch.autograd.grad(out.square().sum(), list(g.parameters()))
    ca.blocked = False
    ref = g(x)[1]
    grads_ref = torch.autograd.grad(ref.square().sum(), list(g.parameters()))
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    assert "blocked=False" in repr(ca)


def test_module_memory_follows_the_form_it_runs():
    """The module's no-gradient memory is the reference's where it runs the reference (a map
    that is one tile without the C++ fused scores, or ``blocked=False``) and the blocked
    form's otherwise (with the fused scores' fewer temporaries where they run); the
    reference's grows with L^2, the blocked form's about linearly."""
    small, large = (1, 96, 128, 128), (1, 96, 512, 512)
    ca = ContextualAttention()
    assert ca._one_tile(small, torch.float32) and not ca._one_tile(large, torch.float32)
    fused = unavailable_reason("cpu", "cpu") is None
    assert ca.inference_memory(large) == blocked_memory(large, fused_kernel=fused)
    assert ca.inference_memory(small) == (blocked_memory(small, fused_kernel=True) if fused else reference_memory(small))
    with use_backend("reference"):      # the fused scores off: one tile runs the reference
        assert ca.inference_memory(small) == reference_memory(small)
        assert ca.inference_memory(large) == blocked_memory(large)
    assert blocked_memory(large, fused_kernel=True) < blocked_memory(large)
    n = 64 * 64
    assert reference_memory(small) >= 4 * n * n * 4                 # four (L x L) float32 maps
    assert reference_memory(small, dtype=torch.float16) > reference_memory(small) / 2   # softmax in float32
    assert ContextualAttention(block_bytes=2**26).inference_memory(large) == \
        blocked_memory(large, block_bytes=2**26, fused_kernel=fused)
    assert ContextualAttention(blocked=False).inference_memory(large) == reference_memory(large) > 16 * blocked_memory(large)


@pytest.mark.parametrize("device", devices())
def test_blocked_mask_at_feature_resolution_and_no_mask(device):
    """A mask at the matching resolution, and no mask at all, as the reference takes them."""
    x, _ = _inputs(2, 3, 6, 7, 2, dtype=torch.float64, device=device, seed=5)
    small = (torch.rand(2, 1, 6, 7, dtype=torch.float64, device=device) > 0.6).to(x.dtype)
    budget = _tile_cost(2, 3, 42, 1, 2, 8, 8)
    for m in (small, None, F.interpolate(small, scale_factor=2.0)):
        torch.testing.assert_close(contextual_attention_blocked(x, m, block_bytes=budget),
                                   contextual_attention(x, m), rtol=1e-10, atol=1e-12)


def test_export_traces_the_reference():
    """torch.export (strict or not) traces the reference form: one graph without the blocked
    form's data-dependent ops, with the same output."""
    m = ContextualAttention()
    x, mask = _inputs(1, 4, 8, 8, 2, dtype=torch.float32)
    for strict in (False, True):
        ep = torch.export.export(m, (x, mask), strict=strict)
        targets = {str(n.target) for n in ep.graph.nodes}
        assert not any("unique" in t or "nonzero" in t for t in targets)
        torch.testing.assert_close(ep.module()(x, mask), m(x, mask), rtol=1e-5, atol=1e-6)


def test_cpu_weights_and_score_gradients_have_no_subnormals():
    """Unnormalised queries make the scaled softmax peaked enough that some weights land among
    float32's subnormal numbers, which slow the CPU's matrix products ~14x: the CPU sets them
    to 0 (weights, and the scores' gradient), which changes the result below rounding (checked
    against float64, where those weights are normal numbers)."""
    ca = importlib.import_module("fastinpaint.models.contextual_attention")
    torch.manual_seed(0)
    x = torch.randn(1, 16, 32, 32)
    mask = torch.zeros(1, 1, 128, 128)
    mask[..., 32:96, 40:80] = 1
    tiny = torch.finfo(torch.float32).tiny
    with torch.no_grad():
        x64 = x.double()
        _, attn64 = contextual_attention(x64, mask.double(), return_attention=True)
        assert ((attn64 > 0) & (attn64 < tiny)).any(), "the case must produce float32-subnormal weights"
        out, attn = contextual_attention(x, mask, return_attention=True)
    assert not ((attn > 0) & (attn < tiny)).any()
    xg, xg64 = x.clone().requires_grad_(), x64.clone().requires_grad_()
    g = torch.randn(x.shape, dtype=torch.float64)
    for fn in (contextual_attention, lambda a, m: contextual_attention_blocked(a, m, block_bytes=_tile_cost(
            3, 3, 256, 1, 1, 4, 4))):
        out = fn(xg, mask)
        out64 = fn(xg64, mask.double())
        torch.testing.assert_close(out.double(), out64, rtol=1e-4, atol=1e-5)
        (gx,) = torch.autograd.grad(out, xg, g.float())
        (gx64,) = torch.autograd.grad(out64, xg64, g)
        torch.testing.assert_close(gx.double(), gx64, rtol=1e-3, atol=1e-4)
    # the gradient flush itself: subnormal entries (of either sign) to 0, the rest kept
    t = torch.zeros(4, requires_grad=True)
    grad_in = torch.tensor([tiny / 4, -tiny / 8, tiny, -1.5])
    (got,) = torch.autograd.grad(ca._flush_subnormal_grad(t), t, grad_in)
    assert got.tolist() == [0.0, 0.0, tiny, -1.5]
