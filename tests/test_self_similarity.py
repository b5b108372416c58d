"""Self-similarity maps and the fused spatially-correlative distance: the reference against
plain Python loops and the public code's formulation, every kernel backend against the reference."""

import math

import pytest
import torch

import fastinpaint.functional as FI
from fastinpaint import use_backend
from fastinpaint.ops.self_similarity import op as ss_op
from fastinpaint.ops.self_similarity import reference as ref

from conftest import (assert_close_to_reference, assert_runs_at_lower_cpu_capabilities, backend_device_params, dtypes_for,
                      skip_unless_available)


def skip_unless_implemented(backend, device):
    if backend not in ss_op.MAPS_OP.implemented:
        pytest.skip(f"self_similarity has no {backend} backend yet")
    skip_unless_available(backend, device)


# ----------------------------------------------------------------------------- independent computation

def loop_normalized(feat, normalize):
    """Centred, normalised features as nested lists g[b][c][r][w], by plain Python."""
    B, C, H, W = feat.shape
    f = feat.double().tolist()
    out = []
    for b in range(B):
        cen = []
        for c in range(C):
            mean = sum(f[b][c][r][w] for r in range(H) for w in range(W)) / (H * W)
            cen.append([[f[b][c][r][w] - mean for w in range(W)] for r in range(H)])
        for r in range(H):
            for w in range(W):
                norm = math.sqrt(sum(cen[c][r][w] ** 2 for c in range(C)))
                div = max(norm, 1e-12) if normalize else math.sqrt(C)
                for c in range(C):
                    cen[c][r][w] /= div
        out.append(cen)
    return out


def loop_maps(feat, index, K, window, normalize):
    B, C, H, W = feat.shape
    g = loop_normalized(feat, normalize)
    whole = window == "clamp" and (K >= H or K >= W)
    kh, kw = (H, W) if whole else (K, K)
    maps = []
    for b in range(B):
        rows = []
        for q in index.tolist():
            r, c = q // W, q % W
            if whole:
                r0 = c0 = 0
            elif window == "clamp":
                r0, c0 = min(max(r - K // 2, 0), H - K), min(max(c - K // 2, 0), W - K)
            else:
                r0, c0 = r - K // 2, c - K // 2
            row = []
            for i in range(kh):
                for k in range(kw):
                    rr, cc = r0 + i, c0 + k
                    s = 0.0
                    if 0 <= rr < H and 0 <= cc < W:
                        s = sum(g[b][ch][r][c] * g[b][ch][rr][cc] for ch in range(C))
                        if not normalize:
                            s = math.tanh(s / 10)
                    row.append(s)
            rows.append(row)
        maps.append(rows)
    return torch.tensor(maps, dtype=torch.float64)


def loop_distance(S, T, mode):
    total, count = 0.0, 0
    N = S.shape[-1]
    num = N // 4
    for s_row, t_row in zip(S.reshape(-1, N).tolist(), T.reshape(-1, N).tolist()):
        thr = sorted(t_row, reverse=True)[num]
        s_k = [s if t >= thr else 0.0 for s, t in zip(s_row, t_row)]
        t_k = [t if t >= thr else 0.0 for t in t_row]
        if mode == "l1":
            total += sum(abs(N / num * a - N / num * b) for a, b in zip(s_k, t_k))
            count += N
        else:
            ns = max(math.sqrt(sum(a * a for a in s_k)), 1e-8)
            nt = max(math.sqrt(sum(b * b for b in t_k)), 1e-8)
            total += 1 - sum(a * b for a, b in zip(s_k, t_k)) / (ns * nt)
            count += 1
    return total / count


LOOP_CASES = [  # B, C, H, W, K, window, normalize, Q
    (2, 3, 5, 7, 3, "clamp", True, 9),
    (1, 4, 6, 4, 2, "clamp", False, 24),
    (1, 3, 4, 6, 5, "clamp", True, 7),  # K >= H: the whole map
    (2, 3, 5, 6, 4, "zero", True, 12),
    (1, 2, 3, 5, 7, "zero", False, 15),  # K larger than the map, zero padding
]


@pytest.mark.parametrize("case", LOOP_CASES, ids=[f"loop{i}" for i in range(len(LOOP_CASES))])
def test_reference_matches_python_loops(case):
    B, C, H, W, K, window, normalize, Q = case
    feat = torch.randn(B, C, H, W, dtype=torch.float64)
    index = torch.randperm(H * W)[:Q]
    expected = loop_maps(feat, index, K, window, normalize)
    got = ref.self_similarity(feat, index, K, window, normalize)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ref.self_similarity_gather(feat, index, K, window, normalize), expected,
                               rtol=1e-12, atol=1e-12)
    if window == "clamp":
        torch.testing.assert_close(ref.self_similarity_loop(feat, index, K, normalize), expected,
                                   rtol=1e-12, atol=1e-12)
    T = loop_maps(torch.randn(B, C, H, W, dtype=torch.float64), index, K, window, normalize)
    if expected.shape[-1] >= 4:
        for mode in ("l1", "cos"):
            assert ref.compare_maps(expected, T, mode).item() == pytest.approx(loop_distance(expected, T, mode),
                                                                              rel=1e-12, abs=1e-12)


def public_patch_sim(feat, patch_ids, patch_size, use_norm=True):
    """The public code's PatchSim.forward/select_patch, transcribed (its names: the map is
    (B, C, W, H) with W = size(2); the query's row is patch_ids // size(2))."""
    B, C, W, H = feat.size()
    feat = feat - feat.mean(dim=[-2, -1], keepdim=True)
    feat = torch.nn.functional.normalize(feat, dim=1) if use_norm else feat / math.sqrt(C)
    pw = ph = patch_size
    feat_reshape = feat.permute(0, 2, 3, 1).flatten(1, 2)
    feat_query = feat_reshape[:, patch_ids, :]
    num = feat_query.size(1)
    if pw < W and ph < H:
        pos_x, pos_y = patch_ids // W, patch_ids % W
        left, top = pos_x - int(pw / 2), pos_y - int(ph / 2)
        left = torch.where(left > 0, left, torch.zeros_like(left))
        top = torch.where(top > 0, top, torch.zeros_like(top))
        start_x = torch.where(left > (W - pw), (W - pw) * torch.ones_like(left), left)
        start_y = torch.where(top > (H - ph), (H - ph) * torch.ones_like(top), top)
        keys = [feat[:, :, start_x[i]:start_x[i] + pw, start_y[i]:start_y[i] + ph] for i in range(num)]
        keys = torch.stack(keys, dim=0).permute(1, 0, 2, 3, 4).reshape(B * num, C, pw * ph)
        feat_query = feat_query.reshape(B * num, 1, C)
    else:
        keys = feat.reshape(B, C, W * H)
    sim = feat_query.bmm(keys) if use_norm else torch.tanh(feat_query.bmm(keys) / 10)
    return sim.view(B, num, -1)


@pytest.mark.parametrize("size,K", [(8, 3), (8, 4), (9, 5), (6, 6), (5, 9)])
@pytest.mark.parametrize("normalize", [True, False])
def test_reference_matches_public_code_on_square_maps(size, K, normalize):
    feat = torch.randn(2, 6, size, size, dtype=torch.float64)
    index = torch.randperm(size * size)[:17]
    expected = public_patch_sim(feat, index, K, normalize)
    torch.testing.assert_close(ref.self_similarity(feat, index, K, "clamp", normalize), expected,
                               rtol=1e-12, atol=1e-12)


def test_non_square_maps_fix_the_public_row_bug():
    """On a 4 x 9 map the public code's row (index // 4) is wrong; ours is index // 9."""
    feat = torch.randn(1, 3, 4, 9, dtype=torch.float64)
    index = torch.tensor([8, 9, 30])  # (0, 8), (1, 0), (3, 3)
    ours = ref.self_similarity(feat, index, 3, "clamp")
    torch.testing.assert_close(ours, loop_maps(feat, index, 3, "clamp", True), rtol=1e-12, atol=1e-12)
    g = ref.normalize_features(feat)
    # query (0, 8): clamped window rows 0..2, cols 6..8; its own position is entry 0*3 + 2
    assert ours[0, 0, 2].item() == pytest.approx((g[0, :, 0, 8] ** 2).sum().item())


# ----------------------------------------------------------------------------- backends against reference

CASES = [  # B, C, H, W, K, window, normalize, query ("all", int Q drawn, or None + num_queries)
    dict(B=2, C=5, H=7, W=9, K=3, window="clamp", normalize=True, Q=11),
    dict(B=1, C=13, H=6, W=10, K=4, window="clamp", normalize=False, Q=20),
    dict(B=2, C=4, H=5, W=6, K=8, window="clamp", normalize=True, Q=9),       # K larger than the map
    dict(B=1, C=3, H=4, W=5, K=3, window="clamp", normalize=True, Q=None, num_queries=1000),  # Q > H*W
    dict(B=2, C=6, H=6, W=7, K=5, window="zero", normalize=True, Q=13),
    dict(B=1, C=9, H=5, W=7, K=3, window="zero", normalize=True, Q="all"),   # dense form
    dict(B=1, C=3, H=6, W=5, K=3, window="clamp", normalize=False, Q="all"),
]
CASE_IDS = [f"case{i}" for i in range(len(CASES))]


def make_case(case, device, dtype, layout="contiguous"):
    shape = (case["B"], case["C"], case["H"], case["W"])
    if layout == "noncontig":
        x = torch.randn(shape[0], shape[2], 2 * shape[3], shape[1], device=device, dtype=dtype)
        feat = x.permute(0, 3, 1, 2)[..., ::2]
    else:
        feat = torch.randn(shape, device=device, dtype=dtype)
        if layout == "channels_last":
            feat = feat.contiguous(memory_format=torch.channels_last)
    hw = case["H"] * case["W"]
    q = case["Q"]
    index = q if q in ("all", None) else torch.randperm(hw)[:q].to(device)
    return feat, index


def maps(case, feat, index, backend, generator=None):
    with use_backend(backend):
        return FI.self_similarity(feat, index, num_queries=case.get("num_queries", 256), patch_size=case["K"],
                                  window=case["window"], normalize=case["normalize"], generator=generator)


def fp64(t):
    return t.detach().double().cpu().requires_grad_(t.requires_grad)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontig"])
@pytest.mark.parametrize("backend,device", backend_device_params())
def test_maps_match_reference(backend, device, layout, case):
    skip_unless_implemented(backend, device)
    for dtype in dtypes_for(device):
        feat, index = make_case(case, device, dtype, layout)
        feat.requires_grad_()
        seed = torch.Generator().manual_seed(3)
        y = maps(case, feat, index, backend, torch.Generator().manual_seed(3))
        y_ref = maps(case, feat, index, "reference", torch.Generator().manual_seed(3))
        idx64 = index if isinstance(index, (str, type(None))) else index.cpu()
        f64 = fp64(feat)
        y64 = maps(case, f64, idx64, "reference", torch.Generator().manual_seed(3))
        del seed
        if case["Q"] is None:
            assert y.shape[1] == case["H"] * case["W"]  # num_queries clamped to H*W
        assert_close_to_reference(y, y_ref, y64, f"{backend} maps {dtype}")
        gy = torch.randn_like(y_ref)
        (g,) = torch.autograd.grad(y, feat, gy)
        (g_ref,) = torch.autograd.grad(y_ref, feat, gy)
        (g64,) = torch.autograd.grad(y64, f64, gy.double().cpu())
        assert_close_to_reference(g, g_ref, g64, f"{backend} maps grad {dtype}")


DIST_CASES = [c for c in CASES if c["Q"] != "all"] + [
    dict(B=2, C=7, H=9, W=9, K=4, window="clamp", normalize=True, Q=30),
]


@pytest.mark.parametrize("case", DIST_CASES, ids=[f"dist{i}" for i in range(len(DIST_CASES))])
@pytest.mark.parametrize("mode", ["l1", "cos"])
@pytest.mark.parametrize("backend,device", backend_device_params())
def test_distance_matches_reference(backend, device, mode, case):
    skip_unless_implemented(backend, device)
    dtypes = dtypes_for(device)
    if backend == "triton" and device == "cpu":  # the interpreter is slow: a subset here, all on GPU
        if case["Q"] is None or case["H"] == case["W"]:
            pytest.skip("interpreter time: this case runs on GPU")
        dtypes = [torch.float32]
    for dtype in dtypes:
        f_src, index = make_case(case, device, dtype)
        f_tgt, _ = make_case(case, device, dtype, "channels_last")
        if index is None:
            index = FI.sample_query_index(case["H"], case["W"], case["num_queries"], device=device)
        f_src.requires_grad_()
        f_tgt.requires_grad_()
        kw = dict(query_index=index, patch_size=case["K"], mode=mode, window=case["window"],
                  normalize=case["normalize"])
        with use_backend(backend):
            loss = FI.spatial_correlative_distance(f_src, f_tgt, **kw)
        with use_backend("reference"):
            loss_ref = FI.spatial_correlative_distance(f_src, f_tgt, **kw)
            s64, t64 = fp64(f_src), fp64(f_tgt)
            loss64 = FI.spatial_correlative_distance(s64, t64, **dict(kw, query_index=index.cpu()))
        assert loss.shape == () and loss.dtype == dtype
        assert_close_to_reference(loss, loss_ref, loss64, f"{backend} {mode} distance {dtype}")
        grads = torch.autograd.grad(loss, (f_src, f_tgt))
        grads_ref = torch.autograd.grad(loss_ref, (f_src, f_tgt))
        grads64 = torch.autograd.grad(loss64, (s64, t64))
        for name, g, g_ref, g64 in zip(("f_src", "f_tgt"), grads, grads_ref, grads64):
            assert_close_to_reference(g, g_ref, g64, f"{backend} {mode} grad {name} {dtype}")


# Windows at least 8 wide: the C++ kernels' float32 rows and backward scatter work from a
# channel-major copy, vectorised over a window row's positions (csrc/cpu/self_similarity.cpp);
# the cases above are narrower and take the channel-vectorised loops. Zero windows cut by
# every edge, a clamped one, a whole-map one 12 wide, widths that are not multiples of the
# vector, channels that are not multiples of 4, a dense form.
WIDE_CASES = [
    dict(B=2, C=19, H=13, W=21, K=9, window="zero", normalize=True, Q=40),
    dict(B=1, C=37, H=20, W=40, K=17, window="clamp", normalize=False, Q=30),
    dict(B=2, C=5, H=6, W=12, K=8, window="clamp", normalize=True, Q=10),
    dict(B=2, C=6, H=10, W=11, K=9, window="zero", normalize=True, Q="all"),
]


@pytest.mark.parametrize("case", WIDE_CASES, ids=[f"wide{i}" for i in range(len(WIDE_CASES))])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpu_wide_windows_maps(layout, case):
    test_maps_match_reference("cpu", "cpu", layout, case)


@pytest.mark.parametrize("case", [c for c in WIDE_CASES if c["Q"] != "all"], ids=["wide0", "wide1", "wide2"])
@pytest.mark.parametrize("mode", ["l1", "cos"])
def test_cpu_wide_windows_distance(mode, case):
    test_distance_matches_reference("cpu", "cpu", mode, case)


def test_cpu_wide_windows_at_every_instruction_set():
    """The baseline and AVX2 builds of the vectorised loops against the reference, in fresh
    processes (torch's CPU capability caps the one picked)."""
    skip_unless_implemented("cpu", "cpu")
    code = (
        "import torch\n"
        "import fastinpaint.functional as FI\n"
        "from fastinpaint import use_backend\n"
        "from fastinpaint.ops.self_similarity import reference as ref\n"
        "torch.manual_seed(0)\n"
        "f, t = torch.randn(2, 19, 13, 21), torch.randn(2, 19, 13, 21)\n"
        "i = torch.randperm(13 * 21)[:40]\n"
        "for window in ('zero', 'clamp'):\n"
        "    a, b = f.clone().requires_grad_(), t.clone().requires_grad_()\n"
        "    with use_backend('cpu'):\n"
        "        y = FI.spatial_correlative_distance(a, b, i, patch_size=9, mode='cos', window=window)\n"
        "        m = FI.self_similarity(a, i, patch_size=9, window=window)\n"
        "    a2, b2 = f.clone().requires_grad_(), t.clone().requires_grad_()\n"
        "    y2 = ref.spatial_correlative_distance(a2, b2, i, 9, 'cos', window)\n"
        "    torch.testing.assert_close(y, y2, rtol=1e-4, atol=1e-5)\n"
        "    torch.testing.assert_close(m, ref.self_similarity(a2, i, 9, window), rtol=1e-4, atol=1e-5)\n"
        "    for g, g2 in zip(torch.autograd.grad(y + m.square().mean(), (a, b)),\n"
        "                     torch.autograd.grad(y2 + ref.self_similarity(a2, i, 9, window).square().mean(), (a2, b2))):\n"
        "        torch.testing.assert_close(g, g2, rtol=1e-4, atol=1e-5)\n"
        "print('ok', torch.backends.cpu.get_cpu_capability())\n")
    assert_runs_at_lower_cpu_capabilities(code)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_float64(backend):
    skip_unless_implemented(backend, "cpu")
    f = torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([0, 7, 13, 29, 22])
    with use_backend(backend):
        for window, normalize in (("clamp", True), ("zero", False)):
            assert torch.autograd.gradcheck(
                lambda x: FI.self_similarity(x, index, patch_size=3, window=window, normalize=normalize), (f,))
        for mode in ("l1", "cos"):
            assert torch.autograd.gradcheck(
                lambda a, b: FI.spatial_correlative_distance(a, b, index, patch_size=3, mode=mode), (f, t))
        assert torch.autograd.gradcheck(
            lambda a, b: FI.spatial_correlative_distance(a, b, index, patch_size=4, mode="cos", window="zero",
                                                         normalize=False), (f, t))


def test_double_backward_of_cpu_maps():
    skip_unless_implemented("cpu", "cpu")
    f = torch.randn(1, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([1, 12, 24])
    with use_backend("cpu"):
        assert torch.autograd.gradgradcheck(lambda x: FI.self_similarity(x, index, patch_size=3), (f,))


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_info_mode_matches_reference_loss(backend):
    """mode="info" against the InfoNCE of the reference's maps, composed here (for the
    reference backend too: the public function's info mode against its parts)."""
    skip_unless_implemented(backend, "cpu")
    f = [torch.randn(2, 6, 8, 8, requires_grad=True) for _ in range(3)]
    index = FI.sample_query_index(8, 8, 20, generator=torch.Generator().manual_seed(1))
    expected = ref.info_nce(*(ref.self_similarity(x, index, 4) for x in f))
    with use_backend(backend):
        got = FI.spatial_correlative_distance(f[0], f[1], index, patch_size=4, mode="info", f_other=f[2])
        # the info loss is smallest when S and T agree
        same = FI.spatial_correlative_distance(f[0], f[0], index, patch_size=4, mode="info", f_other=f[2])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert same.item() < expected.item()


# ----------------------------------------------------------------------------- queries

def test_query_draws_are_reproducible_and_shared():
    a = FI.sample_query_index(16, 12, 50, generator=torch.Generator().manual_seed(7))
    b = FI.sample_query_index(16, 12, 50, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.dtype == torch.int64 and a.unique().numel() == 50
    assert int(a.max()) < 16 * 12
    torch.manual_seed(3)
    c = FI.sample_query_index(16, 12, 50)
    torch.manual_seed(3)
    assert torch.equal(c, FI.sample_query_index(16, 12, 50))
    assert FI.sample_query_index(3, 4, 256).numel() == 12  # clamped to H*W
    feat = torch.randn(1, 3, 16, 12)
    m1 = FI.self_similarity(feat, None, 50, 5, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(m1, FI.self_similarity(feat, a, patch_size=5))


# ----------------------------------------------------------------------------- bad input

def _maps_args(**over):
    args = dict(feat=torch.randn(2, 3, 6, 7), query_index=torch.tensor([0, 5, 41]), patch_size=3)
    args.update(over)
    return args


BAD_MAPS = [
    (dict(patch_size=0), ValueError, r"patch_size must be >= 1"),
    (dict(patch_size=-2), ValueError, r"patch_size must be >= 1"),
    (dict(patch_size=2.5), TypeError, r"patch_size must be an int"),
    (dict(query_index=torch.tensor([0, 42])), ValueError, r"query_index must lie in \[0, H\*W\) = \[0, 42\)"),
    (dict(query_index=torch.tensor([-1, 3])), ValueError, r"query_index must lie in"),
    (dict(query_index=torch.tensor([[1, 2]])), ValueError, r"query_index must be 1-D"),
    (dict(query_index=torch.tensor([1.0])), TypeError, r"query_index must be an integer tensor"),
    (dict(query_index="some"), ValueError, r"query_index must be None, 'all'"),
    (dict(feat=torch.randn(3, 6, 7)), ValueError, r"feat must be 4-D"),
    (dict(feat=torch.randint(0, 3, (2, 3, 6, 7))), TypeError, r"feat must be float"),
    (dict(feat=torch.randn(2, 0, 6, 7)), ValueError, r"feat must have positive channels"),
    (dict(window="reflect"), ValueError, r"window must be one of"),
    (dict(query_index=None, num_queries=0), ValueError, r"num_queries must be >= 1"),
]


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("over,exc,match", BAD_MAPS, ids=[m for _, _, m in BAD_MAPS])
def test_bad_maps_input(backend, over, exc, match):
    skip_unless_implemented(backend, "cpu")
    args = _maps_args(**over)
    with use_backend(backend), pytest.raises(exc, match=match):
        FI.self_similarity(**args)


BAD_DISTANCE = [
    (dict(f_tgt=torch.randn(2, 3, 6, 8)), ValueError, r"f_src and f_tgt must have the same shape"),
    (dict(f_tgt=torch.randn(2, 3, 6, 7, dtype=torch.float64)), TypeError, r"f_tgt has dtype"),
    (dict(mode="l2"), ValueError, r"mode must be 'l1', 'cos' or 'info'"),
    (dict(mode="info"), ValueError, r"mode='info' needs f_other"),
    (dict(patch_size=1), ValueError, r"patch_size 1 gives 1 entries"),
    (dict(query_index=torch.tensor([99])), ValueError, r"query_index must lie in"),
    (dict(f_src=torch.randn(2, 3, 6)), ValueError, r"f_src must be 4-D"),
]


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("over,exc,match", BAD_DISTANCE, ids=[m for _, _, m in BAD_DISTANCE])
def test_bad_distance_input(backend, over, exc, match):
    skip_unless_implemented(backend, "cpu")
    args = dict(f_src=torch.randn(2, 3, 6, 7), f_tgt=torch.randn(2, 3, 6, 7), query_index=torch.tensor([0, 5]),
                patch_size=3)
    args.update(over)
    with use_backend(backend), pytest.raises(exc, match=match):
        FI.spatial_correlative_distance(**args)


def test_cpp_ops_check_their_arguments():
    skip_unless_implemented("cpu", "cpu")
    g = torch.randn(1, 4, 5, 3)
    ops = torch.ops.fastinpaint
    with pytest.raises(RuntimeError, match="query_index must lie in"):
        ops.self_similarity_forward(g, torch.tensor([20]), 3, 0, False)
    with pytest.raises(RuntimeError, match="patch_size must be >= 1"):
        ops.self_similarity_forward(g, torch.tensor([2]), 0, 0, False)
    with pytest.raises(RuntimeError, match="window must be"):
        ops.self_similarity_forward(g, torch.tensor([2]), 3, 5, False)
    with pytest.raises(RuntimeError, match="f_src and f_tgt must have the same shape"):
        ops.spatial_correlative_distance_forward(g, torch.randn(1, 4, 4, 3), torch.tensor([2]), 3, 0, False, 0)


# ----------------------------------------------------------------------------- torch.library / compile

def test_opcheck_cpp_ops():
    skip_unless_implemented("cpu", "cpu")
    g = torch.randn(2, 5, 6, 3, requires_grad=True)
    t = torch.randn(2, 5, 6, 3, requires_grad=True)
    index = torch.tensor([0, 7, 29, 12])
    ops = torch.ops.fastinpaint
    for window, squash in ((0, False), (1, True)):
        torch.library.opcheck(ops.self_similarity_forward.default, (g, index, 3, window, squash))
        torch.library.opcheck(ops.self_similarity_backward.default,
                              (torch.randn(2, 4, 9), g.detach(), index, 3, window))
        for mode in (0, 1):
            torch.library.opcheck(ops.spatial_correlative_distance_forward.default,
                                  (g, t, index, 3, window, squash, mode),
                                  test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    rows, stats = ops.spatial_correlative_distance_forward(g.detach(), t.detach(), index, 3, 0, False, 1)
    torch.library.opcheck(ops.spatial_correlative_distance_backward.default,
                          (torch.randn(2, 4), g.detach(), t.detach(), index, stats, 3, 0, False, 1))


@pytest.mark.parametrize("patch", [3, 9])
def test_cpp_ops_keep_a_channel_major_layout(patch):
    """g as a permuted (B, C, H, W) tensor (what the CPU backend's normalisation gives NCHW
    features): the kernels read it as it is (the same values as from a contiguous g) and
    their gradients come back in its layout, as the fake implementations say (opcheck);
    narrow windows (3: the channel loops) and wide ones (9: the channel-major rows)."""
    skip_unless_implemented("cpu", "cpu")
    ops = torch.ops.fastinpaint
    g = torch.randn(2, 7, 10, 12).permute(0, 2, 3, 1)
    t = torch.randn(2, 7, 10, 12).permute(0, 2, 3, 1)
    index = torch.tensor([0, 17, 63, 119, 44])
    for a in (g, t):
        assert not a.is_contiguous() and a.permute(0, 3, 1, 2).is_contiguous()
    maps = ops.self_similarity_forward(g, index, patch, 1, False)
    torch.testing.assert_close(maps, ops.self_similarity_forward(g.contiguous(), index, patch, 1, False))
    grad = torch.randn_like(maps)
    dg = ops.self_similarity_backward(grad, g, index, patch, 1)
    assert dg.stride() == g.stride()
    torch.testing.assert_close(dg, ops.self_similarity_backward(grad, g.contiguous(), index, patch, 1))
    rows, stats = ops.spatial_correlative_distance_forward(g, t, index, patch, 1, False, 1)
    rows_c, stats_c = ops.spatial_correlative_distance_forward(g.contiguous(), t.contiguous(), index, patch, 1, False, 1)
    torch.testing.assert_close(rows, rows_c)
    gr = torch.randn_like(rows)
    d = ops.spatial_correlative_distance_backward(gr, g, t, index, stats, patch, 1, False, 1)
    d_c = ops.spatial_correlative_distance_backward(gr, g.contiguous(), t.contiguous(), index, stats, patch, 1, False, 1)
    for a, b, like in zip(d, d_c, (g, t)):
        assert a.stride() == like.stride()
        torch.testing.assert_close(a, b)
    torch.library.opcheck(ops.self_similarity_backward.default, (grad, g, index, patch, 1))
    torch.library.opcheck(ops.spatial_correlative_distance_backward.default,
                          (gr, g, t, index, stats, patch, 1, False, 1))
    torch.library.opcheck(ops.self_similarity_forward.default, (g.clone().requires_grad_(), index, patch, 1, False))


def test_opcheck_triton_ops():
    skip_unless_implemented("triton", "cpu")
    g = torch.randn(1, 4, 5, 3, requires_grad=True)
    t = torch.randn(1, 4, 5, 3, requires_grad=True)
    index = torch.tensor([0, 7, 19])
    ops = torch.ops.fastinpaint
    torch.library.opcheck(ops.self_similarity_forward_triton.default, (g, index, 3, 0, True))
    torch.library.opcheck(ops.self_similarity_backward_triton.default, (torch.randn(1, 3, 9), g.detach(), index, 3, 1))
    torch.library.opcheck(ops.spatial_correlative_distance_forward_triton.default, (g, t, index, 3, 0, False, 1),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    rows, stats = ops.spatial_correlative_distance_forward_triton(g.detach(), t.detach(), index, 3, 0, False, 0)
    torch.library.opcheck(ops.spatial_correlative_distance_backward_triton.default,
                          (torch.randn(1, 3), g.detach(), t.detach(), index, stats, 3, 0, False, 0))


class TwoLayerStructure(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, a, b, index):
        fa, fb = self.conv(a), self.conv(b)
        return (FI.spatial_correlative_distance(fa, fb, index, patch_size=4, mode="cos")
                + FI.spatial_correlative_distance(fa, fb, index, patch_size=3, mode="l1")
                + FI.self_similarity(fa, "all", patch_size=3, window="zero").square().mean())


@pytest.mark.parametrize("backend,compile_backend", [("cpu", "inductor"), ("triton", "aot_eager"),
                                                     ("reference", "aot_eager")])
def test_compile_fullgraph(backend, compile_backend):
    skip_unless_implemented(backend, "cpu")
    torch._dynamo.reset()
    model = TwoLayerStructure()
    a, b = torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8, requires_grad=True)
    index = torch.tensor([0, 11, 45, 55, 30])
    with use_backend(backend):
        eager = model(a, b, index)
        out = torch.compile(model, fullgraph=True, backend=compile_backend)(a, b, index)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    (g_c,) = torch.autograd.grad(out, b)
    (g_e,) = torch.autograd.grad(eager, b)
    torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- memory and determinism

def test_distance_saves_no_map_for_backward():
    """The fused distance saves the normalised features (and the normalisation's own
    tensors), the index and 4 statistics per row: no (B, Q, N) map."""
    skip_unless_implemented("cpu", "cpu")
    from fastinpaint.benchmark import saved_bytes

    B, C, H, W = 2, 8, 16, 16
    f, t = torch.randn(B, C, H, W, requires_grad=True), torch.randn(B, C, H, W, requires_grad=True)

    def saved(backend, Q, K):
        index = torch.randperm(H * W)[:Q]
        with use_backend(backend):
            return saved_bytes(lambda: FI.spatial_correlative_distance(f, t, index, patch_size=K), exclude=(f, t))

    small, large = saved("cpu", 16, 4), saved("cpu", 128, 12)
    assert large - small == (128 - 16) * B * 4 * 4, (small, large)  # the statistics; index: a view of randperm
    assert large <= 8 * 2 * B * C * H * W * 4
    assert saved("reference", 128, 12) > saved("reference", 16, 4)


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_deterministic(backend, device):
    skip_unless_implemented(backend, device)
    torch.use_deterministic_algorithms(True)
    try:
        results = []
        for _ in range(2):
            torch.manual_seed(1)
            f = torch.randn(2, 16, 8, 7, device=device, requires_grad=True)
            t = torch.randn(2, 16, 8, 7, device=device, requires_grad=True)
            index = torch.randperm(56)[:12].to(device)
            with use_backend(backend):
                y = FI.self_similarity(f, index, patch_size=4)
                loss = FI.spatial_correlative_distance(f, t, index, patch_size=4, mode="cos")
                grads = torch.autograd.grad(y.square().sum() + loss, (f, t))
            results.append([y, loss, *grads])
    finally:
        torch.use_deterministic_algorithms(False)
    for first, second in zip(*results):
        assert torch.equal(first, second)


# ----------------------------------------------------------------------------- the dense form

@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("H,W,K", [(5, 7, 3), (6, 4, 4), (3, 9, 5), (4, 4, 9)])
def test_dense_form_gathers_the_same_gradient_as_the_query_loop(backend, device, H, W, K, monkeypatch):
    """query_index="all" with zero windows reaches the kernels as window code 2 (every position
    a query, in order), whose backward inverts the windows (the triton and cuda backwards gather
    K*K queries per position); an explicit arange index takes the general path (code 1). Both
    give the same maps and the same gradient, odd and even K, windows larger than the map."""
    skip_unless_available(backend, device)
    codes = []
    forward = ss_op.MAPS_FORWARD

    def spy(backend_name, g, index, patch_size, window, squash):
        codes.append(window)
        return forward(backend_name, g, index, patch_size, window, squash)

    monkeypatch.setattr(ss_op, "MAPS_FORWARD", spy)
    feat = torch.randn(2, 5, H, W, device=device, dtype=torch.float32)
    weight = torch.randn(2, H * W, K * K, device=device)
    results = []
    for index in ("all", torch.arange(H * W, device=device)):
        f = feat.clone().requires_grad_(True)
        with use_backend(backend):
            maps = FI.self_similarity(f, index, patch_size=K, window="zero")
        (maps * weight).sum().backward()
        results.append((maps.detach(), f.grad))
    assert codes == [ref.DENSE_ZERO, ref.WINDOW_CODES["zero"]]
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_row_too_large_for_shared_memory_is_a_clear_error():
    """The CUDA row kernels' shared memory (the query vectors, C floats, plus the kernel's own
    static share read with cudaFuncGetAttributes) is checked before the launch."""
    skip_unless_available("cuda", "cuda")
    feat = torch.randn(1, 60000, 2, 2, device="cuda")
    with use_backend("cuda"), pytest.raises(RuntimeError, match="exceeds the GPU's .* bytes per block"):
        FI.self_similarity(feat, "all", patch_size=3)
