"""Pixel (matmul) attention: every kernel backend against ``reference``, forward and backward."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastinpaint.functional as FI
from fastinpaint import BackendUnavailableError, use_backend
from fastinpaint.ops.pixel_attention import reference as ref

from conftest import (assert_close_to_reference, backend_device_params, dtypes_for, gpu, requires_cuda,
                      skip_unless_available)

# (B, N, Dqk, Dv): N never a multiple of the block sizes (16 in the interpreter, 32..128 on GPU)
CASES = [(2, 37, 8, 24), (1, 53, 64, 256), (3, 29, 20, 40), (2, 1, 16, 16)]
MASKS = ["none", "random", "one_sample_empty"]


def make_inputs(B, N, Dqk, Dv, device, dtype, mask_kind, requires_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, Dqk, generator=g).to(device, dtype)
    k = torch.randn(B, N, Dqk, generator=g).to(device, dtype)
    v = torch.randn(B, N, Dv, generator=g).to(device, dtype)
    mask = None
    if mask_kind != "none":
        mask = (torch.rand(B, N, generator=g) < 0.4).to(device)
        mask[:, 0] = False  # at least one valid key per sample ...
        if mask_kind == "one_sample_empty":
            mask[0] = True  # ... except sample 0, which has none
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v, mask


def to64(tensors):
    return [t.detach().double().cpu().requires_grad_(t.requires_grad) for t in tensors]


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("case", CASES, ids=[f"B{c[0]}N{c[1]}qk{c[2]}v{c[3]}" for c in CASES])
@pytest.mark.parametrize("backend,device", backend_device_params())
def test_forward_backward_matches_reference(backend, device, case, mask_kind):
    skip_unless_available(backend, device)
    if mask_kind == "one_sample_empty" and case[0] == 1:
        pytest.skip("needs two samples")
    if device == "cuda" and case not in CASES[:2]:
        pytest.skip("GPU: two cases keep the Triton compile count (and the GPU suite's time) down")
    for dtype in dtypes_for(device):
        q, k, v, mask = make_inputs(*case, device, dtype, mask_kind)
        scale = 0.7 if case[2] == 20 else None  # an explicit scale and the 1/sqrt(Dqk) default
        with use_backend(backend):
            out = FI.pixel_attention(q, k, v, mask, scale=scale)
        out_ref = ref.pixel_attention(q, k, v, mask, scale if scale is not None else case[2] ** -0.5)
        q64, k64, v64 = to64([q, k, v])
        out64 = ref.pixel_attention(q64, k64, v64, None if mask is None else mask.cpu(),
                                    scale if scale is not None else case[2] ** -0.5)
        assert_close_to_reference(out, out_ref, out64, f"{backend} forward {dtype}")
        go = torch.randn_like(out_ref)
        grads = torch.autograd.grad(out, (q, k, v), go)
        grads_ref = torch.autograd.grad(out_ref, (q, k, v), go)
        grads64 = torch.autograd.grad(out64, (q64, k64, v64), go.double().cpu())
        for name, gr, g_ref, g64 in zip("qkv", grads, grads_ref, grads64):
            assert_close_to_reference(gr, g_ref, g64, f"{backend} grad {name} {dtype}")
        if mask_kind == "one_sample_empty":  # no valid key: zero output, zero gradients
            assert (out[0] == 0).all()
            for gr in grads:
                assert (gr[0] == 0).all()


def test_reference_sample_without_valid_key_is_zero():
    """The reference's own rule, which the kernels are held to above: a sample whose keys are
    all masked gets a zero output and zero gradients; the other sample does not."""
    q, k, v, mask = make_inputs(2, 9, 4, 6, "cpu", torch.float32, "one_sample_empty")
    with use_backend("reference"):
        out = FI.pixel_attention(q, k, v, mask)
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert (out[0] == 0).all() and (out[1] != 0).any()
    for name, g in zip("qkv", grads):
        assert (g[0] == 0).all() and (g[1] != 0).any(), name


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_noncontiguous_inputs(backend, device):
    """Views out of 1x1-conv outputs: (B, C, H, W) -> (B, H*W, C) without a copy."""
    skip_unless_available(backend, device)
    x = torch.randn(2, 24 + 24 + 40, 5, 7, device=device)
    q, k, v = (t.flatten(2).transpose(1, 2) for t in x.split([24, 24, 40], dim=1))
    assert not q.is_contiguous()
    mask = torch.rand(2, 35, device=device) < 0.3
    with use_backend(backend):
        out = FI.pixel_attention(q, k, v, mask)
    torch.testing.assert_close(out, ref.pixel_attention(q, k, v, mask, 24 ** -0.5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("mask_kind", ["none", "one_sample_empty"])
def test_gradcheck_float64(backend, mask_kind):
    skip_unless_available(backend, "cpu")
    q, k, v, mask = make_inputs(2, 6, 3, 4, "cpu", torch.float64, mask_kind)
    if mask is not None:
        mask[1, 2:4] = True

    def fn(q, k, v):
        with use_backend(backend):
            return FI.pixel_attention(q, k, v, mask, scale=0.8)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_large_logits_stay_finite(backend):
    """Scores of +-1e4: the online softmax subtracts the running maximum."""
    skip_unless_available(backend, "cpu")
    q, k, v, _ = make_inputs(1, 21, 8, 8, "cpu", torch.float32, "none", requires_grad=False)
    q = q * 300
    with use_backend(backend):
        out = FI.pixel_attention(q, k, v)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref.pixel_attention(q.double(), k.double(), v.double(), None, 8 ** -0.5),
                               rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- bad input

def _args(**over):
    args = dict(q=torch.randn(2, 9, 4), k=torch.randn(2, 9, 4), v=torch.randn(2, 9, 6), key_mask=None, scale=None)
    args.update(over)
    return args


BAD_INPUTS = [
    (dict(q=torch.randn(9, 4)), ValueError, r"q must be 3-D"),
    (dict(q=[[1.0]]), TypeError, r"q must be a torch.Tensor"),
    (dict(v=torch.randint(0, 3, (2, 9, 6))), TypeError, r"v must be float"),
    (dict(k=torch.randn(2, 9, 5)), ValueError, r"k must have the shape of q"),
    (dict(v=torch.randn(2, 8, 6)), ValueError, r"v must have shape \(B, N, Dv\)"),
    (dict(v=torch.randn(2, 9, 6, dtype=torch.float64)), TypeError, r"v has dtype"),
    (dict(key_mask=torch.zeros(2, 9)), TypeError, r"key_mask must be a bool tensor"),
    (dict(key_mask=torch.zeros(2, 8, dtype=torch.bool)), ValueError, r"key_mask must have shape \(B, N\)"),
    (dict(scale=float("nan")), ValueError, r"scale must be a finite number"),
    (dict(scale="1"), ValueError, r"scale must be a finite number"),
    (dict(q=torch.randn(2, 0, 4), k=torch.randn(2, 0, 4), v=torch.randn(2, 0, 6)), ValueError, r"positive N and D"),
]


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("over,exc,match", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_input_gives_clear_error(backend, over, exc, match):
    with use_backend(backend), pytest.raises(exc, match=match):
        FI.pixel_attention(**_args(**over))


def test_triton_limits_are_clear():
    skip_unless_available("triton", "cpu")
    with use_backend("triton"), pytest.raises(TypeError, match="float64.*triton backend"):
        FI.pixel_attention(**{n: (t.double() if isinstance(t, torch.Tensor) else t) for n, t in _args().items()})
    with use_backend("triton"), pytest.raises(ValueError, match="Dqk <= 128"):
        FI.pixel_attention(torch.randn(1, 3, 130), torch.randn(1, 3, 130), torch.randn(1, 3, 4))


def test_forced_backend_for_wrong_device_raises():
    with use_backend("cuda"), pytest.raises(BackendUnavailableError):
        FI.pixel_attention(**_args())


# ----------------------------------------------------------------------------- torch.library / compile

def test_opcheck_cpp_ops():
    skip_unless_available("cpu", "cpu")
    q, k, v, mask = make_inputs(2, 19, 8, 12, "cpu", torch.float32, "random")
    for m in (None, mask):
        torch.library.opcheck(torch.ops.fastinpaint.pixel_attention_forward.default, (q, k, v, m, 0.5))
        out, lse = torch.ops.fastinpaint.pixel_attention_forward(q.detach(), k.detach(), v.detach(), m, 0.5)
        torch.library.opcheck(torch.ops.fastinpaint.pixel_attention_backward.default,
                              (torch.randn_like(out), q.detach(), k.detach(), v.detach(), m, out, lse, 0.5))


def test_opcheck_triton_ops():
    skip_unless_available("triton", "cpu")
    q, k, v, mask = make_inputs(2, 19, 8, 12, "cpu", torch.float32, "random")
    for m in (None, mask):
        torch.library.opcheck(torch.ops.fastinpaint.pixel_attention_forward_triton.default, (q, k, v, m, 0.5))
    out, lse = torch.ops.fastinpaint.pixel_attention_forward_triton(q.detach(), k.detach(), v.detach(), mask, 0.5)
    torch.library.opcheck(torch.ops.fastinpaint.pixel_attention_backward_triton.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), mask, out, lse, 0.5))


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_compile_fullgraph_module(backend):
    skip_unless_available(backend, "cpu")
    import fastinpaint

    torch._dynamo.reset()
    m = fastinpaint.nn.MatmulAttention(16, qk_channels=8)
    torch.nn.init.normal_(m.gamma)
    x = torch.randn(2, 16, 5, 7, requires_grad=True)
    hole = torch.rand(2, 1, 5, 7) < 0.3
    with use_backend(backend):
        eager = m(x, hole)
        out = torch.compile(m, fullgraph=True, backend="aot_eager")(x, hole)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(eager, x, g)[0],
                               rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- memory

def test_saves_only_linear_memory_for_backward():
    skip_unless_available("cpu", "cpu")
    from fastinpaint.benchmark import saved_bytes

    q, k, v, mask = make_inputs(1, 200, 8, 16, "cpu", torch.float32, "random")
    for backend in ("cpu", "triton"):
        if backend == "triton":
            skip_unless_available("triton", "cpu")
        with use_backend(backend):
            ours = saved_bytes(lambda: FI.pixel_attention(q, k, v, mask), exclude=(q, k, v, mask))
        assert ours == 200 * 16 * 4 + 200 * 4, (backend, ours)  # out + lse
    with use_backend("reference"):
        eager = saved_bytes(lambda: FI.pixel_attention(q, k, v, mask), exclude=(q, k, v, mask))
    assert eager >= 200 * 200 * 4


_RSS_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    import fastinpaint.functional as FI
    from fastinpaint.benchmark import peak_rss_bytes, reset_peak_rss
    from fastinpaint import use_backend
    fn_name, backend, sizes = sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3:]]
    torch.set_num_threads(1)
    def run(N, warm=False):
        q, k = torch.randn(1, N, 32, requires_grad=True), torch.randn(1, N, 32, requires_grad=True)
        if fn_name == "attention":
            v = torch.randn(1, N, 64, requires_grad=True)
            mask = torch.rand(1, N) < 0.3
            reset_peak_rss()
            peak0 = peak_rss_bytes()
            with use_backend(backend):
                FI.pixel_attention(q, k, v, mask).sum().backward()
        else:
            qt, kt, w = torch.randn(1, N, 32), torch.randn(1, N, 32), torch.rand(1, N, requires_grad=True)
            reset_peak_rss()
            peak0 = peak_rss_bytes()
            with use_backend(backend):
                FI.attention_transfer_loss(q, k, qt, kt, w, torch.rand(1, N) < 0.5).backward()
        return peak_rss_bytes() - peak0
    run(64)
    print(json.dumps([run(N) for N in sizes]))
""")


def rss_growth(fn_name, backend, sizes):
    """Peak-RSS increase (bytes) of a float32 forward+backward at each N, in a fresh process
    (torch's CPU allocator keeps no statistics): /proc's VmHWM, reset before each call."""
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, fn_name, backend, *map(str, sizes)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("fn_name", ["attention", "transfer"])
def test_cpu_memory_does_not_grow_as_n_squared(fn_name):
    """From N=1024 to N=4096 one float32 N x N matrix grows by 60 MiB (x16); eager's peak grows by
    more than that (the method's sanity check), the cpu kernels' by less than half of it and by
    less than an eighth of eager's growth (their (64, N) block temporaries grow as N)."""
    skip_unless_available("cpu", "cpu")
    n1, n2 = 1024, 4096
    one_matrix_growth = 4 * (n2 * n2 - n1 * n1)
    ours = rss_growth(fn_name, "cpu", [n1, n2])
    eager = rss_growth(fn_name, "reference", [n1, n2])
    assert eager[1] - eager[0] > one_matrix_growth, (eager, one_matrix_growth)
    assert ours[1] - ours[0] < one_matrix_growth / 2, (ours, one_matrix_growth)
    assert ours[1] - ours[0] < (eager[1] - eager[0]) / 8, (ours, eager)


@gpu
@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_memory_does_not_grow_as_n_squared(backend):
    skip_unless_available(backend, "cuda")
    peaks = []
    for N in (2048, 8192):
        q, k, v, mask = make_inputs(1, N, 32, 64, "cuda", torch.bfloat16, "random")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with use_backend(backend):
            FI.pixel_attention(q, k, v, mask).float().sum().backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
    assert peaks[1] - peaks[0] < 4 * (8192 ** 2 - 2048 ** 2) / 8, peaks


def test_cpu_backend_bfloat16_and_autocast():
    """The Triton interpreter has no bfloat16, the C++ backend does (computed in float32)."""
    skip_unless_available("cpu", "cpu")
    q, k, v, mask = make_inputs(2, 37, 8, 24, "cpu", torch.bfloat16, "random")
    with use_backend("cpu"):
        out = FI.pixel_attention(q, k, v, mask)
    out_ref = ref.pixel_attention(q, k, v, mask, 8 ** -0.5)
    q64, k64, v64 = to64([q, k, v])
    out64 = ref.pixel_attention(q64, k64, v64, mask, 8 ** -0.5)
    assert_close_to_reference(out, out_ref, out64, "cpu forward bfloat16")
    go = torch.randn_like(out_ref)
    for gr, g_ref, g64, name in zip(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(out_ref, (q, k, v), go),
                                    torch.autograd.grad(out64, (q64, k64, v64), go.double()), "qkv"):
        assert_close_to_reference(gr, g_ref, g64, f"cpu grad {name} bfloat16")
    qf, kf, vf = (t.detach().float() for t in (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16), use_backend("cpu"):
        assert FI.pixel_attention(qf, kf, vf, mask).dtype == torch.bfloat16


@pytest.mark.parametrize("backend", ["cpu"])
def test_cpu_several_blocks(backend, threads):
    """N = 150: the C++ kernels' 64-row tasks, two full and one partial, forward and backward,
    for both ops (the small cases above fit one task), at 1, 2 and 3 threads (the backward's
    per-thread accumulators: one chunk, chunks that split a sample, three chunks)."""
    skip_unless_available(backend, "cpu")
    q, k, v, mask = make_inputs(2, 150, 12, 20, "cpu", torch.float64, "one_sample_empty")
    mask[1, 70:140] = True  # a whole task's keys excluded
    with use_backend(backend):
        out = FI.pixel_attention(q, k, v, mask)
    out_ref = ref.pixel_attention(q, k, v, mask, 12 ** -0.5)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    go = torch.randn_like(out)
    for g, g_ref in zip(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(out_ref, (q, k, v), go)):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)
    qt, kt = torch.randn(2, 150, 7, dtype=torch.float64), torch.randn(2, 150, 7, dtype=torch.float64)
    w = torch.rand(2, 150, dtype=torch.float64, requires_grad=True)
    rows = torch.rand(2, 150) < 0.5
    for distance in ("l2", "l1"):
        with use_backend(backend):
            loss = FI.attention_transfer_loss(q, k, qt, kt, w, rows, distance, 0.6)
        loss_ref = ref.attention_transfer_loss(q, k, qt, kt, w, rows, distance, 0.6)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-10, atol=1e-12)
        for g, g_ref in zip(torch.autograd.grad(loss, (q, k, w)), torch.autograd.grad(loss_ref, (q, k, w))):
            torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-12)
