"""The attention-transfer loss (DGII) and the distillation losses and attention module."""

import pytest
import torch

import fastinpaint
import fastinpaint.losses  # noqa: F401  (not imported by the package itself)
import fastinpaint.functional as FI
from fastinpaint import use_backend
from fastinpaint.ops.pixel_attention import reference as ref

from conftest import assert_close_to_reference, backend_device_params, dtypes_for, skip_unless_available

# (B, N, Ds, Dt): odd N, student and teacher widths 8..64
CASES = [(2, 37, 8, 8), (1, 45, 64, 32), (3, 23, 20, 12)]
ROWS = ["all", "hole", "empty_hole"]


def backend_params():
    """The kernel backends of this op (it has no cuda one)."""
    return [p for p in backend_device_params() if p.values[0] != "cuda"]


def make_inputs(B, N, Ds, Dt, device, dtype, rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    q_s = torch.randn(B, N, Ds, generator=g).to(device, dtype).requires_grad_()
    k_s = torch.randn(B, N, Ds, generator=g).to(device, dtype).requires_grad_()
    q_t = torch.randn(B, N, Dt, generator=g).to(device, dtype)
    k_t = torch.randn(B, N, Dt, generator=g).to(device, dtype)
    w = torch.rand(B, N, generator=g).to(device).requires_grad_()
    mask = None
    if rows == "hole":
        mask = (torch.rand(B, N, generator=g) < 0.5).to(device)
    elif rows == "empty_hole":
        mask = torch.zeros(B, N, dtype=torch.bool, device=device)
    return q_s, k_s, q_t, k_t, w, mask


@pytest.mark.parametrize("distance", ["l2", "l1"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("case", CASES, ids=[f"B{c[0]}N{c[1]}s{c[2]}t{c[3]}" for c in CASES])
@pytest.mark.parametrize("backend,device", backend_params())
def test_forward_backward_matches_reference(backend, device, case, rows, distance):
    skip_unless_available(backend, device)
    if device == "cuda" and case not in CASES[:2]:
        pytest.skip("GPU: two cases keep the Triton compile count (and the GPU suite's time) down")
    for dtype in dtypes_for(device):
        q_s, k_s, q_t, k_t, w, mask = make_inputs(*case, device, dtype, rows)
        scale = 0.5 if case[2] == 64 else 1.0
        with use_backend(backend):
            loss = FI.attention_transfer_loss(q_s, k_s, q_t, k_t, w, mask, distance, scale)
        loss_ref = ref.attention_transfer_loss(q_s, k_s, q_t, k_t, w, mask, distance, scale)
        leaves64 = [t.detach().double().cpu().requires_grad_() for t in (q_s, k_s, w)]
        loss64 = ref.attention_transfer_loss(leaves64[0], leaves64[1], q_t.double().cpu(), k_t.double().cpu(),
                                             leaves64[2], None if mask is None else mask.cpu(), distance, scale)
        assert loss.dtype == torch.float32
        assert_close_to_reference(loss, loss_ref, loss64, f"{backend} loss {dtype}")
        grads = torch.autograd.grad(loss, (q_s, k_s, w))
        grads_ref = torch.autograd.grad(loss_ref, (q_s, k_s, w))
        grads64 = torch.autograd.grad(loss64, leaves64)
        for name, g, g_ref, g64 in zip(["q_s", "k_s", "row_weight"], grads, grads_ref, grads64):
            assert_close_to_reference(g, g_ref, g64, f"{backend} grad {name} {dtype} {distance}")
        if rows == "empty_hole":
            assert loss.item() == 0.0 and all((g == 0).all() for g in grads)


@pytest.mark.parametrize("distance", ["l2", "l1"])
def test_reference_empty_hole_is_zero(distance):
    """The reference's own rule, which the kernels are held to above: a row mask with no row
    gives a float32 loss of 0 and zero gradients."""
    q_s, k_s, q_t, k_t, w, mask = make_inputs(2, 11, 4, 6, "cpu", torch.float16, "empty_hole")
    with use_backend("reference"):
        loss = FI.attention_transfer_loss(q_s, k_s, q_t, k_t, w, mask, distance)
    assert loss.dtype == torch.float32 and loss.item() == 0.0
    assert all((g == 0).all() for g in torch.autograd.grad(loss, (q_s, k_s, w)))


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_teacher_takes_no_gradient(backend):
    skip_unless_available(backend, "cpu")
    q_s, k_s, q_t, k_t, w, mask = make_inputs(2, 19, 8, 8, "cpu", torch.float32, "hole")
    q_t.requires_grad_()
    k_t.requires_grad_()
    with use_backend(backend):
        loss = FI.attention_transfer_loss(q_s, k_s, q_t, k_t, None, mask)
    loss.backward()
    assert q_t.grad is None and k_t.grad is None and q_s.grad is not None


def test_default_rows_and_weights():
    """No row_mask: every row, divided by B*N; no row_weight: weight 1; identical nets: 0."""
    q_s, k_s, q_t, k_t, _, _ = make_inputs(2, 11, 4, 4, "cpu", torch.float64, "all")
    r_s = torch.softmax(q_s @ k_s.transpose(1, 2), -1)
    r_t = torch.softmax(q_t @ k_t.transpose(1, 2), -1)
    expected = ((r_s - r_t) ** 2).sum() / 22
    torch.testing.assert_close(FI.attention_transfer_loss(q_s, k_s, q_t, k_t), expected)
    assert FI.attention_transfer_loss(q_s, k_s, q_s.detach(), k_s.detach(), distance="l1").abs().item() < 1e-12


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("distance", ["l2", "l1"])
def test_gradcheck_float64(backend, distance):
    skip_unless_available(backend, "cpu")
    q_s, k_s, q_t, k_t, w, mask = make_inputs(2, 7, 3, 4, "cpu", torch.float64, "hole")
    w = w.detach().double().requires_grad_()

    def fn(q_s, k_s, w):
        with use_backend(backend):
            return FI.attention_transfer_loss(q_s, k_s, q_t, k_t, w, mask, distance, 0.9)

    assert torch.autograd.gradcheck(fn, (q_s, k_s, w), eps=1e-6, atol=1e-6)


def test_cpu_float64_stays_float64():
    skip_unless_available("cpu", "cpu")
    q_s, k_s, q_t, k_t, w, mask = make_inputs(1, 9, 4, 4, "cpu", torch.float64, "hole")
    with use_backend("cpu"):
        assert FI.attention_transfer_loss(q_s, k_s, q_t, k_t, w.double(), mask).dtype == torch.float64


# ----------------------------------------------------------------------------- bad input

def _args(**over):
    args = dict(q_s=torch.randn(2, 9, 4), k_s=torch.randn(2, 9, 4), q_t=torch.randn(2, 9, 6), k_t=torch.randn(2, 9, 6),
                row_weight=None, row_mask=None, distance="l2", scale=1.0)
    args.update(over)
    return args


BAD_INPUTS = [
    (dict(q_s=torch.randn(9, 4)), ValueError, r"q_s must be 3-D"),
    (dict(k_s=torch.randn(2, 9, 5)), ValueError, r"k_s must have the shape of q_s"),
    (dict(q_t=torch.randn(2, 8, 6)), ValueError, r"q_t must have shape"),
    (dict(k_t=torch.randn(2, 9, 5)), ValueError, r"k_t must have the shape of q_t"),
    (dict(q_t=torch.randint(0, 2, (2, 9, 6))), TypeError, r"q_t must be float"),
    (dict(row_weight=torch.rand(2, 8)), ValueError, r"row_weight must have shape"),
    (dict(row_weight=torch.ones(2, 9, dtype=torch.long)), TypeError, r"row_weight must be a floating"),
    (dict(row_mask=torch.ones(2, 9)), TypeError, r"row_mask must be a bool"),
    (dict(distance="cos"), ValueError, r"distance must be one of"),
    (dict(scale=float("inf")), ValueError, r"scale must be a finite"),
    (dict(scale=None), ValueError, r"scale must be a finite"),
]


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("over,exc,match", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_input_gives_clear_error(backend, over, exc, match):
    with use_backend(backend), pytest.raises(exc, match=match):
        FI.attention_transfer_loss(**_args(**over))


# ----------------------------------------------------------------------------- torch.library / compile

@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_opcheck(backend):
    skip_unless_available(backend, "cpu")
    suffix = "_triton" if backend == "triton" else ""
    fwd = getattr(torch.ops.fastinpaint, "attention_transfer_forward" + suffix)
    bwd = getattr(torch.ops.fastinpaint, "attention_transfer_backward" + suffix)
    q_s, k_s, q_t, k_t, _, _ = make_inputs(2, 19, 8, 12, "cpu", torch.float32, "all")
    for distance in (0, 1):
        torch.library.opcheck(fwd.default, (q_s, k_s, q_t, k_t, 0.7, distance))
        dist, lse_s, lse_t, c = fwd(q_s.detach(), k_s.detach(), q_t, k_t, 0.7, distance)
        torch.library.opcheck(bwd.default, (torch.rand_like(dist), q_s.detach(), k_s.detach(), q_t, k_t,
                                            lse_s, lse_t, c, 0.7, distance))


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_compile_fullgraph_loss_module(backend):
    skip_unless_available(backend, "cpu")
    torch._dynamo.reset()
    student = fastinpaint.nn.MatmulAttention(16, qk_channels=8)
    teacher = fastinpaint.nn.MatmulAttention(16, qk_channels=8)
    loss_fn = fastinpaint.losses.AttentionTransferLoss(16)
    x = torch.randn(2, 16, 5, 7, requires_grad=True)
    x_t = torch.randn(2, 16, 5, 7)
    hole = torch.rand(2, 1, 5, 7) < 0.4

    def step(x, x_t, hole):
        _, qk_s = student(x, return_qk=True)
        _, qk_t = teacher(x_t, return_qk=True)
        return loss_fn(qk_s, qk_t, hole, features=x)

    with use_backend(backend):
        eager = step(x, x_t, hole)
        out = torch.compile(step, fullgraph=True, backend="aot_eager")(x, x_t, hole)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(out, x)[0], torch.autograd.grad(eager, x)[0],
                               rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- modules and losses

def test_matmul_attention_module():
    m = fastinpaint.nn.MatmulAttention(16)
    assert (m.qk_channels, m.value_channels) == (2, 16) and m.gamma.item() == 0.0
    x = torch.randn(2, 16, 6, 5)
    torch.testing.assert_close(m(x), x)  # gamma = 0: the identity at initialisation
    torch.nn.init.normal_(m.gamma)
    hole = torch.rand(2, 1, 6, 5) < 0.3
    y, (q, k) = m(x, hole, return_qk=True)
    assert q.shape == (2, 30, 2) and k.shape == (2, 30, 2)
    v = m.value(x).flatten(2).transpose(1, 2)
    o = ref.pixel_attention(q, k, v, hole.flatten(1), 1.0).transpose(1, 2).reshape(2, 16, 6, 5)
    torch.testing.assert_close(y, x + m.gamma * m.out(o), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(2, 8, 6, 5))
    with pytest.raises(ValueError, match="hole must have shape"):
        m(x, torch.ones(2, 1, 5, 5))
    with pytest.raises(ValueError, match="qk_channels"):
        fastinpaint.nn.MatmulAttention(16, qk_channels=0)


def test_attention_transfer_loss_module_weights():
    loss_fn = fastinpaint.losses.AttentionTransferLoss(4, distance="l1")
    q_s, k_s, q_t, k_t, _, _ = make_inputs(2, 12, 4, 4, "cpu", torch.float32, "all")
    hole = torch.rand(2, 1, 3, 4) < 0.5
    hole[:, :, 0, 0] = True
    feats = torch.randn(2, 4, 3, 4)
    loss = loss_fn((q_s, k_s), (q_t, k_t), hole, features=feats)
    t = loss_fn.row_weights(feats, hole.flatten(1))
    rows = hole.flatten(1)
    assert torch.allclose((t * rows).sum(1) / rows.sum(1), torch.ones(2))  # normalised over the hole
    expected = ref.attention_transfer_loss(q_s, k_s, q_t, k_t, t, rows, "l1")
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert loss_fn.meta.weight.grad is not None and loss_fn.meta.weight.grad.abs().sum() > 0


def test_encoder_and_self_distillation_losses():
    enc = fastinpaint.losses.EncoderDistillationLoss([4, 8])
    xs = [torch.randn(2, 4, 8, 8, requires_grad=True), torch.randn(2, 8, 4, 4, requires_grad=True)]
    xt = [torch.randn(2, 4, 8, 8, requires_grad=True), torch.randn(2, 8, 4, 4, requires_grad=True)]
    loss = enc(xs, xt)
    expected = sum((x - g(t)).abs().mean() for g, x, t in zip(enc.gamma, xs, xt))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert xt[0].grad is None and xs[0].grad is not None
    with pytest.raises(ValueError, match="feature levels"):
        enc(xs[:1], xt[:1])

    sd = fastinpaint.losses.SelfDistillationLoss([4, 8])
    feats = [torch.randn(2, 4, 8, 8, requires_grad=True), torch.randn(2, 8, 4, 4, requires_grad=True)]
    loss = sd(feats)
    phi = sd.phi(0)
    assert (phi >= 0).all() and torch.allclose(phi.sum(), torch.tensor(8.0))
    expected = (phi[None, :, None, None] * (sd.f[0](feats[0]) - feats[1]).abs()).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert feats[1].grad is None and feats[0].grad is not None and sd.theta[0].grad is not None
    with pytest.raises(ValueError, match="at least two"):
        fastinpaint.losses.SelfDistillationLoss([4])


@pytest.mark.parametrize("distance", ["l2", "l1"])
def test_cpu_backend_bfloat16(distance):
    skip_unless_available("cpu", "cpu")
    q_s, k_s, q_t, k_t, w, mask = make_inputs(2, 37, 8, 12, "cpu", torch.bfloat16, "hole")
    with use_backend("cpu"):
        loss = FI.attention_transfer_loss(q_s, k_s, q_t, k_t, w, mask, distance)
    loss_ref = ref.attention_transfer_loss(q_s, k_s, q_t, k_t, w, mask, distance)
    leaves64 = [t.detach().double().requires_grad_() for t in (q_s, k_s, w)]
    loss64 = ref.attention_transfer_loss(leaves64[0], leaves64[1], q_t.double(), k_t.double(), leaves64[2], mask,
                                         distance)
    assert_close_to_reference(loss, loss_ref, loss64, "cpu loss bfloat16")
    for g, g_ref, g64, name in zip(torch.autograd.grad(loss, (q_s, k_s, w)), torch.autograd.grad(loss_ref, (q_s, k_s, w)),
                                   torch.autograd.grad(loss64, leaves64), ["q_s", "k_s", "w"]):
        assert_close_to_reference(g, g_ref, g64, f"cpu grad {name} bfloat16 {distance}")

