"""fastinpaint.metrics against independent references: scikit-image for PSNR/SSIM,
NumPy by hand for the L1s, one big batch for accumulation, a 2-process gloo group for
the distributed reduction; FID/LPIPS refuse cleanly (and offline) without their weights."""

import math
import socket

import numpy as np
import pytest
import torch
from skimage.data import astronaut
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import fastinpaint.metrics as fm
from fastinpaint.metrics import InpaintingMetrics, MetricUnavailableError, composite

PSNR_TOL = 1e-3  # dB; float32 torch vs float64 skimage
SSIM_TOL = 5e-5


# --------------------------------------------------------------------------- helpers

def to_np01(x):
    """(B, 3, H, W) in [-1, 1] -> list of float64 HWC images in [0, 1]."""
    return [((img.double().permute(1, 2, 0).numpy()) + 1) / 2 for img in x]


def sk_psnr_ssim(pred, target):
    """Mean over images of scikit-image's PSNR and SSIM (the settings the module documents)."""
    ps, ss = [], []
    for p, t in zip(to_np01(pred), to_np01(target)):
        ps.append(peak_signal_noise_ratio(t, p, data_range=1.0))
        ss.append(structural_similarity(t, p, data_range=1.0, channel_axis=-1, gaussian_weights=True,
                                        sigma=1.5, use_sample_covariance=False))
    return float(np.mean(ps)), float(np.mean(ss))


def np_composite(out, tgt, mask):
    o, t, m = out.double().numpy(), tgt.double().numpy(), mask.double().numpy()
    return torch.from_numpy(np.where(m > 0.5, o, t))


def rand_images(gen, b, h, w):
    return torch.rand(b, 3, h, w, generator=gen) * 2 - 1


def rand_mask(gen, b, h, w, p=0.3):
    return (torch.rand(b, 1, h, w, generator=gen) < p).float()


def astronaut_pairs(n, size=96, noise=0.05, seed=0):
    """n crops of a real photo (target) and the same crops plus Gaussian noise (output), in [-1, 1]."""
    rng = np.random.default_rng(seed)
    photo = astronaut().astype(np.float64) / 255
    targets, outputs = [], []
    for i in range(n):
        y, x = 40 + 90 * i, 60 + 70 * i
        crop = photo[y:y + size, x:x + size]
        noisy = np.clip(crop + rng.normal(0, noise, crop.shape), 0, 1)
        targets.append(torch.from_numpy(crop).permute(2, 0, 1))
        outputs.append(torch.from_numpy(noisy).permute(2, 0, 1))
    as_t = lambda xs: (torch.stack(xs).float() * 2 - 1)  # noqa: E731
    return as_t(outputs), as_t(targets)


# --------------------------------------------------------------------------- PSNR / SSIM

def test_psnr_ssim_match_skimage_on_random_images():
    gen = torch.Generator().manual_seed(1)
    target = rand_images(gen, 3, 40, 52)
    output = (target + 0.2 * torch.randn(target.shape, generator=gen)).clamp(-1, 1)
    m = InpaintingMetrics(on_composite=False)
    m.update(output, target, torch.zeros(3, 1, 40, 52))
    got = m.compute()
    psnr, ssim = sk_psnr_ssim(output, target)
    assert got["psnr"] == pytest.approx(psnr, abs=PSNR_TOL)
    assert got["ssim"] == pytest.approx(ssim, abs=SSIM_TOL)


@pytest.mark.parametrize("noise", [0.01, 0.05, 0.2])
def test_psnr_ssim_match_skimage_on_photo_crops(noise):
    output, target = astronaut_pairs(3, noise=noise)
    m = InpaintingMetrics(on_composite=False)
    m.update(output, target, torch.zeros(3, 1, 96, 96))
    got = m.compute()
    psnr, ssim = sk_psnr_ssim(output, target)
    assert got["psnr"] == pytest.approx(psnr, abs=PSNR_TOL)
    assert got["ssim"] == pytest.approx(ssim, abs=SSIM_TOL)
    assert 0 < got["ssim"] < 1


def test_default_evaluates_the_composite():
    gen = torch.Generator().manual_seed(2)
    output, target = astronaut_pairs(2, size=64, noise=0.1, seed=2)
    mask = rand_mask(gen, 2, 64, 64, p=0.4)
    m = InpaintingMetrics()  # on_composite=True by default
    m.update(output, target, mask)
    got = m.compute()
    psnr, ssim = sk_psnr_ssim(np_composite(output, target, mask), target)
    assert got["psnr"] == pytest.approx(psnr, abs=PSNR_TOL)
    assert got["ssim"] == pytest.approx(ssim, abs=SSIM_TOL)
    raw = InpaintingMetrics(on_composite=False)
    raw.update(output, target, mask)
    raw = raw.compute()
    assert raw["psnr"] < got["psnr"] - 1  # the raw output also errs on known pixels
    assert raw["l1_hole"] == pytest.approx(got["l1_hole"], rel=1e-12)  # same in the hole


def test_identical_images():
    gen = torch.Generator().manual_seed(3)
    x = rand_images(gen, 2, 32, 32)
    for on_composite in (True, False):
        m = InpaintingMetrics(on_composite=on_composite)
        m.update(x, x.clone(), rand_mask(gen, 2, 32, 32))
        got = m.compute()
        assert got["psnr"] == math.inf or got["psnr"] > 100
        assert got["ssim"] == pytest.approx(1.0, abs=1e-6)
        assert got["l1"] == 0 and got["l1_hole"] == 0


def test_psnr_is_mean_of_per_image_psnr():
    gen = torch.Generator().manual_seed(4)
    target = rand_images(gen, 2, 24, 24)
    output = target.clone()
    output[0] += 0.01 * torch.randn(3, 24, 24, generator=gen)
    output[1] += 0.3 * torch.randn(3, 24, 24, generator=gen)
    output = output.clamp(-1, 1)
    m = InpaintingMetrics(on_composite=False)
    m.update(output, target, torch.zeros(2, 1, 24, 24))
    per_image = [peak_signal_noise_ratio(t, p, data_range=1.0) for p, t in zip(to_np01(output), to_np01(target))]
    assert m.compute()["psnr"] == pytest.approx(np.mean(per_image), abs=PSNR_TOL)


# --------------------------------------------------------------------------- L1

def hand_l1(batches, on_composite=True):
    """Hole L1 and whole-image L1 in [0, 1] units, pooled over every pixel of every batch."""
    hole_vals, all_vals = [], []
    for out, tgt, mask in batches:
        o, t, m = out.double().numpy(), tgt.double().numpy(), mask.numpy() > 0.5
        diff = np.abs(o - t) / 2
        hole = np.broadcast_to(m, diff.shape)
        hole_vals.append(diff[hole])
        all_vals.append(np.where(hole, diff, 0.0 if on_composite else diff).ravel())
    hole_vals, all_vals = np.concatenate(hole_vals), np.concatenate(all_vals)
    return (hole_vals.mean() if hole_vals.size else math.nan), all_vals.mean()


@pytest.mark.parametrize("on_composite", [True, False])
def test_l1_single_batch_by_hand(on_composite):
    gen = torch.Generator().manual_seed(5)
    out, tgt, mask = rand_images(gen, 4, 20, 24), rand_images(gen, 4, 20, 24), rand_mask(gen, 4, 20, 24)
    m = InpaintingMetrics(on_composite=on_composite)
    m.update(out, tgt, mask)
    got = m.compute()
    l1_hole, l1 = hand_l1([(out, tgt, mask)], on_composite)
    assert got["l1_hole"] == pytest.approx(l1_hole, rel=1e-6)
    assert got["l1"] == pytest.approx(l1, rel=1e-6)


def test_l1_hole_is_pixel_weighted_across_batches_of_different_hole_sizes():
    gen = torch.Generator().manual_seed(6)
    batches = []
    for b, h, w, p in [(2, 16, 16, 0.05), (3, 24, 20, 0.6), (1, 12, 30, 0.9)]:
        out, tgt = rand_images(gen, b, h, w), rand_images(gen, b, h, w)
        # different error scale per batch, so a per-batch (unweighted) mean would differ
        out = (tgt + (0.1 + p) * (out - tgt)).clamp(-1, 1)
        batches.append((out, tgt, rand_mask(gen, b, h, w, p)))
    m = InpaintingMetrics()
    for batch in batches:
        m.update(*batch)
    got = m.compute()
    l1_hole, l1 = hand_l1(batches)
    assert got["l1_hole"] == pytest.approx(l1_hole, rel=1e-6)
    assert got["l1"] == pytest.approx(l1, rel=1e-6)
    per_batch_mean = np.mean([hand_l1([b])[0] for b in batches])
    assert abs(per_batch_mean - l1_hole) > 1e-3  # the test can tell the two apart


def test_empty_hole_gives_nan_without_crashing():
    gen = torch.Generator().manual_seed(7)
    out, tgt = rand_images(gen, 2, 16, 16), rand_images(gen, 2, 16, 16)
    m = InpaintingMetrics()
    m.update(out, tgt, torch.zeros(2, 1, 16, 16))
    got = m.compute()
    assert math.isnan(got["l1_hole"])
    assert got["l1"] == 0 and got["psnr"] == math.inf  # composite == target
    # a batch with holes afterwards: only its hole pixels count
    mask = rand_mask(gen, 2, 16, 16)
    m.update(out, tgt, mask)
    assert m.compute()["l1_hole"] == pytest.approx(hand_l1([(out, tgt, mask)])[0], rel=1e-6)


# --------------------------------------------------------------------------- composite

def test_composite_keeps_known_pixels_exact():
    gen = torch.Generator().manual_seed(8)
    out, tgt, mask = rand_images(gen, 2, 9, 7), rand_images(gen, 2, 9, 7), rand_mask(gen, 2, 9, 7, 0.5)
    c = composite(out, tgt, mask)
    known, hole = (mask == 0).expand_as(c), (mask == 1).expand_as(c)
    assert torch.equal(c[known], tgt[known])
    assert torch.equal(c[hole], out[hole])
    assert torch.equal(composite(out, tgt, mask.bool()), c)
    assert torch.equal(composite(out, tgt, torch.zeros_like(mask)), tgt)
    assert torch.equal(composite(out, tgt, torch.ones_like(mask)), out)


# --------------------------------------------------------------------------- accumulation

def test_several_batches_equal_one_big_batch():
    gen = torch.Generator().manual_seed(9)
    out, tgt, mask = rand_images(gen, 7, 24, 24), rand_images(gen, 7, 24, 24), rand_mask(gen, 7, 24, 24)
    out = (tgt + 0.3 * (out - tgt))
    big = InpaintingMetrics()
    big.update(out, tgt, mask)
    big = big.compute()
    parts = InpaintingMetrics()
    for sl in (slice(0, 3), slice(3, 4), slice(4, 7)):
        parts.update(out[sl], tgt[sl], mask[sl])
    parts = parts.compute()
    assert parts.keys() == big.keys() == {"psnr", "ssim", "l1", "l1_hole"}
    for k in big:
        assert parts[k] == pytest.approx(big[k], rel=1e-6), k


def test_reset_and_compute_before_update():
    gen = torch.Generator().manual_seed(10)
    m = InpaintingMetrics()
    with pytest.raises(RuntimeError, match="before any update"):
        m.compute()
    out, tgt, mask = rand_images(gen, 2, 16, 16), rand_images(gen, 2, 16, 16), rand_mask(gen, 2, 16, 16)
    m.update(rand_images(gen, 2, 16, 16), tgt, torch.ones(2, 1, 16, 16))
    m.reset()
    m.update(out, tgt, mask)
    fresh = InpaintingMetrics()
    fresh.update(out, tgt, mask)
    assert m.compute() == fresh.compute()


def test_to_device_and_reduced_precision_inputs():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(11)
    out, tgt, mask = rand_images(gen, 2, 16, 16), rand_images(gen, 2, 16, 16), rand_mask(gen, 2, 16, 16)
    ref = InpaintingMetrics()
    ref.update(out, tgt, mask)
    ref = ref.compute()
    m = InpaintingMetrics().to(device)
    m.update(out.to(device), tgt.to(device), mask.to(device))
    got = m.compute()
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=1e-4), k
    half = InpaintingMetrics()
    half.update(out.half(), tgt.half(), mask.bool())
    assert half.compute()["l1_hole"] == pytest.approx(ref["l1_hole"], rel=1e-2)


def test_slightly_out_of_range_is_clamped():
    gen = torch.Generator().manual_seed(12)
    tgt, mask = rand_images(gen, 1, 16, 16), torch.ones(1, 1, 16, 16)
    a, b = InpaintingMetrics(), InpaintingMetrics()
    a.update(torch.full_like(tgt, 1.05), tgt, mask)
    b.update(torch.full_like(tgt, 1.0), tgt, mask)
    assert a.compute() == b.compute()


# --------------------------------------------------------------------------- bad arguments

def _bad_cases():
    g = torch.Generator().manual_seed(13)
    x, m = rand_images(g, 2, 16, 16), rand_mask(g, 2, 16, 16)
    return [
        ("shape mismatch", x, x[:, :, :15], m, "same shape"),
        ("batch mismatch", x, x[:1], m, "same shape"),
        ("two channels", x[:, :2], x[:, :2], m, "output must have shape"),
        ("3-d target", x, x[0], m, "target must have shape"),
        ("integer output", (x * 100).long(), x, m, "output must be a floating"),
        ("not a tensor", x.numpy(), x, m, "output must be a torch.Tensor"),
        ("[0, 255] output", (x + 1) * 127.5, x, m, "output has values"),
        ("[0, 255] target", x, (x + 1) * 127.5, m, "target has values"),
        ("NaN output", x.masked_fill(m.bool(), math.nan), x, m, "output contains NaN"),
        ("too small for SSIM", x[..., :8, :8], x[..., :8, :8], m[..., :8, :8], "at least 11x11"),
        ("3-channel mask", x, x, m.expand(2, 3, 16, 16), "mask must have shape"),
        ("mask size mismatch", x, x, m[..., :15], "mask must have shape"),
        ("mask without channel dim", x, x, m[:, 0], "mask must have shape"),
        ("soft mask", x, x, m * 0.5, "mask must contain only 0"),
        ("mask of 255", x, x, m * 255, "mask must contain only 0"),
        ("mask not a tensor", x, x, m.numpy(), "mask must be a torch.Tensor"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_arguments_raise_value_error(case):
    _, output, target, mask, message = case
    m = InpaintingMetrics()
    with pytest.raises(ValueError, match=message):
        m.update(output, target, mask)
    assert m._updates == 0


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="range_tolerance"):
        InpaintingMetrics(range_tolerance=-1)
    with pytest.raises(ValueError, match="lpips_net"):
        fm.resolve_lpips_weights("resnet")


# --------------------------------------------------------------------------- FID / LPIPS offline

@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network (any connection attempt fails at once), an empty torch.hub cache, no env vars."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv(fm.FID_WEIGHTS_ENV, raising=False)
    monkeypatch.delenv(fm.LPIPS_WEIGHTS_ENV, raising=False)
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(1.0)
    yield attempts
    socket.setdefaulttimeout(previous_timeout)


def test_fid_unavailable_raises_helpful_error(offline):
    with pytest.raises(MetricUnavailableError) as err:
        InpaintingMetrics(fid=True)
    msg = str(err.value)
    assert isinstance(err.value, RuntimeError)
    assert fm.FID_WEIGHTS_FILENAME in msg and fm.FID_WEIGHTS_ENV in msg and "fid_weights=" in msg
    if not fm._has_module("torch_fidelity"):
        assert "torch-fidelity" in msg and "not installed" in msg
    assert offline == []


def test_lpips_unavailable_raises_helpful_error(offline):
    with pytest.raises(MetricUnavailableError) as err:
        InpaintingMetrics(lpips=True)
    msg = str(err.value)
    assert "alexnet" in msg and fm.LPIPS_WEIGHTS_ENV in msg and "lpips_weights=" in msg
    if not fm._has_module("torchvision"):
        assert "torchvision" in msg and "not installed" in msg
    assert offline == []


def test_missing_weights_messages_when_packages_are_present(offline, monkeypatch, tmp_path):
    """The branches a machine with torch-fidelity/torchvision but no weights would take."""
    monkeypatch.setattr(fm, "_has_module", lambda name: True)
    with pytest.raises(MetricUnavailableError, match="not on this machine") as err:
        fm.resolve_fid_weights()
    assert str(tmp_path / "hub" / "checkpoints") in str(err.value)
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(MetricUnavailableError, match="given by argument"):
        fm.resolve_fid_weights(missing)
    monkeypatch.setenv(fm.FID_WEIGHTS_ENV, str(missing))
    with pytest.raises(MetricUnavailableError, match=r"given by \$FASTINPAINT_FID_WEIGHTS") as err:
        fm.resolve_fid_weights()
    assert str(missing) in str(err.value)
    present = tmp_path / "inception.pth"
    present.write_bytes(b"")
    assert fm.resolve_fid_weights(present) == present
    cached = tmp_path / "hub" / "checkpoints" / fm.FID_WEIGHTS_FILENAME
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    monkeypatch.delenv(fm.FID_WEIGHTS_ENV)
    assert fm.resolve_fid_weights() == cached

    if fm._lpips_expected_filename("alex") != "alexnet-owt-7be5be79.pth":
        pytest.skip("this torchvision names its AlexNet weights differently")
    with pytest.raises(MetricUnavailableError, match="alexnet-owt-7be5be79.pth is not on this machine"):
        fm.resolve_lpips_weights("alex")
    with pytest.raises(MetricUnavailableError, match="given by argument"):
        fm.resolve_lpips_weights("vgg", missing)
    assert fm.resolve_lpips_weights("squeeze", present) == present
    assert offline == []


def test_download_guard_refuses_torch_hub_downloads(offline):
    with fm._downloads_forbidden():
        with pytest.raises(MetricUnavailableError, match="refusing to download"):
            torch.hub.load_state_dict_from_url("https://example.invalid/weights-abcdef12.pth")
    assert torch.hub.download_url_to_file is not None and offline == []


def _available(resolve):
    try:
        resolve()
        return True
    except MetricUnavailableError:
        return False


@pytest.mark.skipif(not _available(fm.resolve_fid_weights), reason="torch-fidelity or its weights not here")
def test_fid_when_available():
    gen = torch.Generator().manual_seed(14)
    m = InpaintingMetrics(fid=True)
    out, tgt = rand_images(gen, 4, 32, 32), rand_images(gen, 4, 32, 32)
    m.update(out, tgt, torch.ones(4, 1, 32, 32))
    assert math.isfinite(m.compute()["fid"])


@pytest.mark.skipif(not _available(fm.resolve_lpips_weights), reason="torchvision or its weights not here")
def test_lpips_when_available():
    gen = torch.Generator().manual_seed(15)
    m = InpaintingMetrics(lpips=True)
    out, tgt = rand_images(gen, 2, 32, 32), rand_images(gen, 2, 32, 32)
    m.update(out, out, torch.ones(2, 1, 32, 32))
    assert m.compute()["lpips"] == pytest.approx(0.0, abs=1e-6)
    m.reset()
    m.update(out, tgt, torch.ones(2, 1, 32, 32))
    assert m.compute()["lpips"] > 0.01


# --------------------------------------------------------------------------- distributed

def _distributed_worker(rank, world_size, init_file, data, results):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world_size)
    try:
        out, tgt, mask = data
        m = InpaintingMetrics()
        for i in range(rank, out.shape[0], world_size):  # rank 0 gets 3 images, rank 1 gets 2
            m.update(out[i:i + 1], tgt[i:i + 1], mask[i:i + 1])
        results[rank] = m.compute()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_compute_reduces_across_ranks(tmp_path):
    import torch.multiprocessing as mp

    gen = torch.Generator().manual_seed(16)
    out, tgt, mask = rand_images(gen, 5, 16, 16), rand_images(gen, 5, 16, 16), rand_mask(gen, 5, 16, 16)
    out = tgt + 0.2 * (out - tgt)
    mask[2] = 0  # one image with no hole
    full = InpaintingMetrics()
    full.update(out, tgt, mask)
    full = full.compute()
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), (out, tgt, mask), results),
                 nprocs=2, join=True)
        results = dict(results)
    for rank in (0, 1):
        for k in full:
            assert results[rank][k] == pytest.approx(full[k], rel=1e-6), (rank, k)


def test_mean_fill_baseline():
    from fastinpaint.metrics import mean_fill

    image = torch.rand(2, 3, 9, 7) * 2 - 1
    mask = torch.zeros(2, 1, 9, 7)
    mask[0, :, 2:5, 1:4] = 1
    mask[1] = 1                                   # no known pixel: filled with 0
    out = mean_fill(image, mask)
    known = mask[0, 0] == 0
    assert torch.equal(out[0][:, known], image[0][:, known])   # known pixels kept exactly
    expected = image[0][:, known].mean(dim=1)                  # per-channel mean of the known pixels
    torch.testing.assert_close(out[0][:, ~known], expected[:, None].expand(3, int((~known).sum())))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    with pytest.raises(ValueError, match="mask"):
        mean_fill(image, mask[:, :, :5])
