"""DeepFill v2: generator layers and shapes, contextual attention against a per-sample loop,
SN-PatchGAN and its losses, the recipe, port weights, a short training run, torch.compile."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from fastinpaint.models import (MODELS, DeepFillV2Generator, DeepFillV2Recipe, SNPatchGANDiscriminator,
                                build_model, contextual_attention, convert_port_state_dict)
from fastinpaint.data import make_dataset
from fastinpaint.models.deepfill_v2 import edge_sketch, hinge_d_loss, hinge_g_loss
from fastinpaint.nn import GatedConv2d, GatedDeconv2d

from deepfill_port import port_key

CONFIG = Path(__file__).resolve().parents[1] / "fastinpaint" / "configs" / "deepfill_v2.toml"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The networks here are tiny (cnum 4): one intra-op thread runs them faster than a
    team of OpenMP threads that spin-waits for cores shared with other processes."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _batch(b, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(b, 3, h, w, generator=g) * 2 - 1
    mask = torch.zeros(b, 1, h, w)
    for i in range(b):  # a different hole per sample
        y, x = (i * 5) % (h // 2), (i * 7) % (w // 2)
        mask[i, :, y:y + h // 3, x:x + w // 3] = 1
    return image, mask


# ----------------------------------------------------------------------------- the published layers

def test_published_layers():
    g = DeepFillV2Generator()                      # cnum = 48
    sd = g.state_dict()
    assert sd["stage1.conv1.weight"].shape == (48, 5, 5, 5)          # 5x5, in -> 24 (x2: features, gates)
    assert sd["stage1.down_block1.conv1_downsample.weight"].shape == (96, 24, 3, 3)
    assert sd["stage1.down_block2.conv2.weight"].shape == (192, 96, 3, 3)
    assert sd["stage1.up_block2.conv2.weight"].shape == (24, 24, 3, 3)  # 24 -> 12
    assert sd["stage1.conv_to_rgb.weight"].shape == (3, 12, 3, 3)
    assert sd["stage2.b1_down_block1.conv1_downsample.weight"].shape == (48, 24, 3, 3)   # 24 -> 24 s2
    assert sd["stage2.b2_down_block2.conv1_downsample.weight"].shape == (192, 48, 3, 3)  # 48 -> 96 s2
    assert sd["stage2.conv_bn6.weight"].shape == (192, 192, 3, 3)                        # 192 -> 96
    dil = [getattr(g.stage1, f"conv_bn{i}").dilation[0] for i in range(1, 8)]
    assert dil == [1, 2, 4, 8, 16, 1, 1]
    assert [getattr(g.stage2, f"b1_conv_bn{i}").dilation[0] for i in range(1, 6)] == [1, 2, 4, 8, 16]
    assert all(m.padding[0] == m.dilation[0] * (m.kernel_size[0] - 1) // 2
               for m in g.modules() if isinstance(m, GatedConv2d))
    gated = [m for m in g.modules() if isinstance(m, GatedConv2d)]
    assert sum(isinstance(m, GatedDeconv2d) for m in gated) == 4
    assert all(m.activation == "elu" for m in gated if m is not g.stage2.b2_conv_bn1)
    assert g.stage2.b2_conv_bn1.activation == "relu"
    ca = g.stage2.contextual_attention
    assert (ca.ksize, ca.rate, ca.fuse_k, ca.softmax_scale, ca.masking) == (3, 2, 3, 10.0, "official")
    assert sum(p.numel() for p in g.parameters()) == 4_052_478
    assert DeepFillV2Generator(in_channels=6).stage1.conv1.weight.shape[1] == 6


@pytest.mark.parametrize("hw", [(256, 256), (512, 680)])
def test_shapes_and_known_region_pass_through(hw):
    torch.manual_seed(0)
    recipe = build_model("deepfill_v2", cnum=4)
    image, mask = _batch(1, *hw)
    x = recipe.prepare_input(image, mask)
    assert x.shape == (1, 5, *hw)
    g = recipe.generator.eval()
    with torch.no_grad():
        out = g(x)
        coarse, refined = g(x, return_coarse=True)
    assert out.shape == (1, 3, *hw) and torch.equal(out, refined) and coarse.shape == out.shape
    assert torch.isfinite(out).all() and out.abs().max() <= 1
    comp = recipe.composite(image, mask, out)
    known = (mask == 0).expand_as(image)
    assert torch.equal(comp[known], image[known])
    assert torch.equal(recipe.composite(image, mask, (coarse, refined)), comp)


def test_train_mode_returns_both_stages_and_bad_sizes():
    recipe = build_model("deepfill_v2", cnum=4)
    image, mask = _batch(2, 32, 40)
    out = recipe.generator(recipe.prepare_input(image, mask))
    assert isinstance(out, tuple) and [o.shape for o in out] == [(2, 3, 32, 40)] * 2
    assert recipe.final_output(out) is out[1]
    with pytest.raises(ValueError, match="multiples of 8"):
        recipe.generator(recipe.prepare_input(*_batch(1, 36, 40)))
    with pytest.raises(ValueError, match="cnum"):
        DeepFillV2Generator(cnum=6)
    with pytest.raises(ValueError, match="no loss"):
        build_model("deepfill_v2", loss_weights={"perceptual": 1})
    assert recipe.size_multiple == 8 and recipe.default_lr == 1e-4 and recipe.default_betas == (0.5, 0.999)
    # channels_last in, channels_last out (the attention's output keeps the layout)
    x = recipe.prepare_input(image, mask)
    out_cl = recipe.generator(x.contiguous(memory_format=torch.channels_last))
    assert all(o.is_contiguous(memory_format=torch.channels_last) for o in out_cl)
    for a, b in zip(out_cl, recipe.generator(x)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_known_region_exact_through_inpaint_any_size():
    from fastinpaint.inpaint import inpaint_array

    recipe = build_model("deepfill_v2", cnum=4)
    g = recipe.generator.eval()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 45, 3), dtype=np.uint8)     # padded to 40 x 48 inside
    hole = np.zeros((37, 45), dtype=bool)
    hole[10:20, 5:30] = True
    out = inpaint_array(recipe, g, image, hole)
    assert out.shape == image.shape and np.array_equal(out[~hole], image[~hole])


def test_guided_variant():
    recipe = build_model("deepfill_v2", cnum=4, guided=True)
    image, mask = _batch(2, 32, 32)
    x = recipe.prepare_input(image, mask)
    assert x.shape == (2, 6, 32, 32)
    sketch = edge_sketch(image, mask)
    assert torch.equal(x[:, 3:4], sketch) and torch.all(sketch[mask == 0] == 0)
    assert set(torch.unique(sketch).tolist()) <= {0.0, 1.0}
    out = recipe.generator(x)
    assert recipe.discriminator.in_channels == 5
    assert set(recipe.generator_losses(image, mask, out, recipe.discriminator)) == {"l1_coarse", "l1_refined", "adv"}
    with pytest.raises(ValueError, match="not guided"):
        build_model("deepfill_v2", cnum=4).prepare_input(image, mask, sketch)


# ----------------------------------------------------------------------------- port weights

def test_convert_port_state_dict():
    ours = DeepFillV2Generator(cnum=8)
    port = {"module." + port_key(k): torch.randn_like(v) for k, v in ours.state_dict().items()}
    assert "module.stage1.up_block1.conv1_upsample.conv.conv.weight" in port
    assert "module.stage2.b2_conv_bn1.conv.bias" in port and "module.stage2.conv_to_rgb.conv.weight" in port
    converted = convert_port_state_dict({"G": port, "D": {}})
    assert set(converted) == set(ours.state_dict())
    fresh = DeepFillV2Generator(cnum=8)
    fresh.load_state_dict(converted, strict=True)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, port["module." + port_key(k)])
    # a port's gated layer (one conv, split: features first, gates second) computes what ours does
    layer = fresh.stage1.conv_bn3
    w, b = port["module.stage1.conv_bn3.conv.weight"], port["module.stage1.conv_bn3.conv.bias"]
    x = torch.randn(1, 16, 20, 20)
    pre = F.conv2d(x, w, b, padding=4, dilation=4)
    f, gt = torch.split(pre, 16, dim=1)
    torch.testing.assert_close(layer(x), F.elu(f) * torch.sigmoid(gt), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- contextual attention

def _loop_contextual_attention(x, mask, masking, rate=2, ksize=3, fuse_k=3, scale=10.0):
    """A direct implementation, one sample at a time, in the published formulation:
    normalised background patches as convolution filters, the identity-kernel fuse, the
    masked softmax, and a transposed convolution with the raw patches."""
    outs, attns = [], []
    b, c, h, w = x.shape
    for i in range(b):
        xi = x[i:i + 1]
        xs = F.interpolate(xi, scale_factor=1 / rate, mode="nearest")
        hs, ws = xs.shape[-2:]
        l = hs * ws
        filters = F.unfold(xs, ksize, padding=ksize // 2)[0].t().reshape(l, c, ksize, ksize)
        norm = filters.flatten(1).norm(dim=1).clamp_min(1e-4).view(l, 1, 1, 1)
        y = F.conv2d(xs, filters / norm, padding=ksize // 2)            # 1, L(keys), Hs, Ws
        eye = torch.eye(fuse_k, dtype=x.dtype).view(1, 1, fuse_k, fuse_k)
        y = F.conv2d(y.view(1, 1, l, l), eye, padding=fuse_k // 2)
        y = y.view(1, hs, ws, hs, ws).permute(0, 2, 1, 4, 3).reshape(1, 1, l, l)
        y = F.conv2d(y, eye, padding=fuse_k // 2)
        y = y.view(1, ws, hs, ws, hs).permute(0, 2, 1, 4, 3).reshape(1, l, hs, ws)
        ms = F.interpolate(mask[i:i + 1], size=(hs, ws), mode="nearest")
        mpatch = F.unfold(ms, ksize, padding=ksize // 2)[0]              # k*k, L
        valid = (mpatch.mean(0) == 0).to(x.dtype).view(1, l, 1, 1)
        if masking == "official":
            a = F.softmax(y * valid * scale, dim=1) * valid
        else:
            a = F.softmax(torch.where(valid > 0, y * scale, torch.tensor(-1e30, dtype=x.dtype)), dim=1) * valid
        raw = F.unfold(xi, 2 * rate, stride=rate, padding=rate - 1)[0].t().reshape(l, c, 2 * rate, 2 * rate)
        outs.append(F.conv_transpose2d(a, raw, stride=rate, padding=rate - 1) / 4)
        attns.append(a.view(l, l))
    return torch.cat(outs), torch.stack(attns)


@pytest.mark.parametrize("masking", ["official", "exclude"])
def test_contextual_attention_matches_per_sample_loop(masking):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 12, 16, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(3, 1, 48, 64, dtype=torch.float64)              # at 4x the feature size, as in G
    mask[0, :, 8:30, 8:40] = 1
    mask[1, :, 30:48, 0:20] = 1                                        # different per sample
    # sample 2: no hole
    out, attn = contextual_attention(x, mask, masking=masking, return_attention=True)
    ref, ref_attn = _loop_contextual_attention(x, mask, masking)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(attn, ref_attn, rtol=1e-9, atol=1e-10)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    (gref,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(gx, gref, rtol=1e-8, atol=1e-10)
    # per-sample masks: each sample's output is the output of that sample alone
    for i in range(3):
        alone = contextual_attention(x[i:i + 1], mask[i:i + 1], masking=masking)
        torch.testing.assert_close(out[i:i + 1], alone, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("masking", ["official", "exclude"])
def test_contextual_attention_never_attends_to_holes(masking):
    torch.manual_seed(1)
    x = 0.05 * torch.randn(2, 8, 16, 16)   # small scores: no weight underflows to 0
    mask = torch.zeros(2, 1, 16, 16)
    mask[0, :, 2:10, 4:14] = 1
    mask[1, :, 8:16, 0:6] = 1
    out, attn = contextual_attention(x, mask, masking=masking, return_attention=True)
    for i in range(2):
        ms = mask[i, 0, ::2, ::2]
        hole_near = F.max_pool2d(ms[None, None], 3, 1, 1)[0, 0].flatten() > 0   # keys touching the hole
        assert hole_near.any() and (~hole_near).any()
        assert torch.all(attn[i][hole_near] == 0)
        assert torch.all(attn[i][~hole_near] > 0)
        if masking == "exclude":
            torch.testing.assert_close(attn[i].sum(0), torch.ones(attn.shape[-1]))
        else:  # invalid keys sit in the denominator with logit 0
            sums = attn[i].sum(0)
            assert torch.all(sums <= 1 + 1e-6) and (sums < 0.99).any()


def test_contextual_attention_no_valid_key_and_bad_inputs():
    x = torch.randn(1, 2, 8, 8)
    full = torch.ones(1, 1, 8, 8)
    for masking in ("official", "exclude"):
        out = contextual_attention(x, full, masking=masking)
        assert torch.isfinite(out).all() and torch.all(out == 0)
    with pytest.raises(ValueError, match="multiples of rate"):
        contextual_attention(torch.randn(1, 2, 7, 8))
    with pytest.raises(ValueError, match="per sample"):
        contextual_attention(x, torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="masking"):
        contextual_attention(x, masking="first")


# ----------------------------------------------------------------------------- SN-PatchGAN and losses

def test_discriminator_layers_and_spectral_norm():
    d = SNPatchGANDiscriminator()
    convs = [getattr(d, f"conv{i}").conv_sn for i in range(1, 7)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 256, 256, 256]
    assert all(c.kernel_size == (5, 5) and c.stride == (2, 2) and c.padding == (2, 2) for c in convs)
    assert convs[0].in_channels == 4
    out = d(torch.randn(2, 3, 64, 64), torch.ones(2, 1, 64, 64))
    assert out.shape == (2, 256)                                        # 256 channels x 1 x 1
    small = SNPatchGANDiscriminator(cnum=4)
    conv = small.conv2.conv_sn
    image, mask = torch.randn(1, 3, 64, 64), torch.zeros(1, 1, 64, 64)
    for _ in range(30):                                                 # power iterations
        small(image, mask)
    small.eval()
    par = conv.parametrizations.weight
    w = par.original.detach()
    wm = w.flatten(1)
    u, v = par[0]._u, par[0]._v
    sigma = torch.dot(u, wm @ v)
    torch.testing.assert_close(conv.weight, w / sigma)                  # W / (u^T W v)
    torch.testing.assert_close(torch.linalg.matrix_norm(conv.weight.flatten(1), ord=2), torch.tensor(1.0),
                               rtol=1e-3, atol=1e-3)                    # largest singular value 1


def test_discriminator_backends_agree_and_deep_layers_fold():
    """SN-PatchGAN's SpectralNormConv2d layers: fastinpaint's folded op (the deeper layers, whose
    output is smaller than their weight) gives torch's scores, gradients and power iteration."""
    import copy
    from fastinpaint import use_backend

    torch.manual_seed(0)
    d = SNPatchGANDiscriminator(cnum=4).double()
    d_ref = copy.deepcopy(d)
    image, mask = _batch(2, 64, 64)
    image = image.double()
    results = []
    for module, backend in ((d, "auto"), (d_ref, "reference")):
        x = image.clone().requires_grad_()
        with use_backend(backend), torch.autograd.profiler.profile() as prof:
            for _ in range(2):
                scores = module(x, mask)
                scores.pow(2).sum().backward()
        folded = sum(e.name == "fastinpaint::spectral_norm_conv2d_folded" for e in prof.function_events)
        results.append((scores.detach(), x.grad, [p.grad for p in module.parameters()], folded,
                        [b.clone() for b in module.buffers()]))
    (s, gx, gp, folded, bufs), (s_r, gx_r, gp_r, folded_r, bufs_r) = results
    assert folded == 2 * 3 and folded_r == 0            # conv4-6 fold at 64x64, twice
    torch.testing.assert_close(s, s_r)
    torch.testing.assert_close(gx, gx_r)
    for a, b in zip(gp + bufs, gp_r + bufs_r):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("enabled", [True, False])
def test_cpu_backend_runs_both_networks_channels_last_inside(enabled):
    """With fastinpaint's cpu backend, the generator and the discriminator run an NCHW CPU input
    channels_last inside (their layers see channels_last maps) and return NCHW outputs; scores,
    input gradients and weight gradients equal the reference backend's, which runs NCHW as
    written. ``cpu_channels_last = False`` keeps NCHW; a channels_last input stays channels_last."""
    from conftest import skip_unless_available
    from fastinpaint import use_backend
    from fastinpaint.ops._layout import is_channels_last

    skip_unless_available("cpu", "cpu")
    torch.manual_seed(0)
    recipe = build_model("deepfill_v2", cnum=8, disc_cnum=4)
    g, d = recipe.generator, recipe.discriminator.eval()   # eval: D's power iteration stays put
    g.cpu_channels_last = d.cpu_channels_last = enabled
    seen = []
    for layer in (g.stage1.conv1, g.stage1.up_block2.conv1_upsample, g.stage2.contextual_attention,
                  g.stage2.conv_to_rgb, d.conv1.conv_sn, d.conv6.conv_sn):
        layer.register_forward_pre_hook(lambda module, args: seen.append(is_channels_last(args[0])))
    image, mask = _batch(2, 64, 64)    # conv6 of D sees 2x2 maps (1x1 would fit both layouts)
    params = list(g.parameters()) + list(d.parameters())

    def run(backend, x):
        seen.clear()
        x = x.clone().requires_grad_()
        with use_backend(backend):
            coarse, refined = g(x)
            scores = d(refined, mask)
            (coarse.square().sum() + refined.square().sum() + scores.sum()).backward()
        grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return list(seen), [coarse, refined, scores], x.grad, grads

    x = recipe.prepare_input(image, mask)
    layouts, outs, gx, grads = run("auto", x)
    layouts_r, outs_r, gx_r, grads_r = run("reference", x)
    assert layouts == [enabled] * 6 and layouts_r == [False] * 6
    assert all(o.is_contiguous() for o in outs + [gx])
    for a, b in zip(outs + [gx] + grads, outs_r + [gx_r] + grads_r):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)

    layouts, outs, _, _ = run("auto", x.contiguous(memory_format=torch.channels_last))
    assert layouts[:4] == [True] * 4 and all(is_channels_last(o) for o in outs[:2])
    assert layouts[4:] == [enabled] * 2        # D's input: a channels_last image and an NCHW mask


def test_hinge_losses_and_recipe_losses():
    real, fake = torch.randn(4, 10), torch.randn(4, 10)
    d_real, d_fake = hinge_d_loss(real, fake)
    expected_d = 0.5 * torch.clamp(1 - real, min=0).mean() + 0.5 * torch.clamp(1 + fake, min=0).mean()
    torch.testing.assert_close(d_real + d_fake, expected_d)
    torch.testing.assert_close(hinge_g_loss(fake), -fake.mean())

    torch.manual_seed(0)
    recipe = build_model("deepfill_v2", cnum=4, disc_cnum=4)
    image, mask = _batch(2, 64, 64)
    out = recipe.generator(recipe.prepare_input(image, mask))
    coarse, refined = out
    losses = recipe.generator_losses(image, mask, out, recipe.discriminator)
    assert set(losses) == {"l1_coarse", "l1_refined", "adv"}
    torch.testing.assert_close(losses["l1_coarse"], (coarse - image).abs().mean())
    torch.testing.assert_close(losses["l1_refined"], (refined - image).abs().mean())
    comp = refined * mask + image * (1 - mask)
    torch.testing.assert_close(losses["adv"], -recipe.discriminator(comp, mask).mean())
    d = recipe.discriminator_losses(image, mask, out, recipe.discriminator)
    dr, df = hinge_d_loss(recipe.discriminator(image, mask), recipe.discriminator(comp.detach(), mask))
    torch.testing.assert_close(d["d_real"], dr)
    torch.testing.assert_close(d["d_fake"], df)
    assert recipe.loss_weights == {"l1_coarse": 1.0, "l1_refined": 1.0, "adv": 1.0}
    sum(losses.values()).backward()
    assert recipe.generator.stage1.conv1.weight.grad.abs().sum() > 0
    assert build_model("deepfill_v2", cnum=4, loss_weights={"adv": 0}).discriminator is None


# ----------------------------------------------------------------------------- training

def test_config_file_and_short_demo_run_lowers_losses(tmp_path):
    from fastinpaint.train import load_config, train

    published = load_config(CONFIG)
    assert (published.model, published.size, published.batch_size, published.mask) == \
        ("deepfill_v2", 256, 16, "free_form")
    assert published.lr == 1e-4 and tuple(published.betas) == (0.5, 0.999)
    assert published.loss_weights == {"l1_coarse": 1.0, "l1_refined": 1.0, "adv": 1.0}
    assert MODELS["deepfill_v2"] is DeepFillV2Recipe

    out = tmp_path / "run"
    config = load_config(CONFIG, overrides=[
        "size=32", "batch_size=2", "steps=48", "lr=2e-3", f"out={out}", "device=cpu", "samples_per_epoch=8",
        "model_options.cnum=4", "model_options.disc_cnum=4", "log_every=1", "val_batches=1",
        "checkpoint_every=100", "val_every=100", "mask_options.min_width=3", "mask_options.max_width=8"])
    result = train(config)
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    log = [x for x in log if x["kind"] == "train"]
    assert len(log) == 48 and {"l1_coarse", "l1_refined", "adv", "d_real", "d_fake"} <= set(log[0])
    assert all(np.isfinite(x[key]) for x in log for key in ("l1_coarse", "l1_refined"))
    assert Path(result["weights"]).is_file() and result["metrics"]
    # It learned: the L1 losses on one fixed batch of training crops and holes fall below
    # those of the network it started from (a run of 0 steps writes that network's weights;
    # the per-step losses themselves vary too much from batch to batch to show it in 48 steps).
    start = train(dataclasses.replace(config, steps=0, out=str(tmp_path / "start")))
    data = make_dataset("demo", size=32, split="train", seed=1, samples_per_epoch=16)
    images = torch.stack([data[i] for i in range(16)])
    masks = torch.zeros(16, 1, 32, 32)
    masks[:, :, 8:24, 6:22] = 1

    def fixed_batch_l1(weights):
        recipe = build_model("deepfill_v2", cnum=4, disc_cnum=4)
        recipe.generator.load_state_dict(load_file(weights))
        with torch.no_grad():
            out = recipe.generator(recipe.prepare_input(images, masks))
            losses = recipe.generator_losses(images, masks, out, None)
        return float(losses["l1_coarse"] + losses["l1_refined"])

    before, after = fixed_batch_l1(start["weights"]), fixed_batch_l1(result["weights"])
    assert after < 0.95 * before, (before, after)   # measured: 0.934 of it


# ----------------------------------------------------------------------------- torch.compile

@pytest.mark.parametrize("channels_last_inside", [True, False])
def test_generator_compiles_fullgraph(channels_last_inside):
    """aot_eager, forward and backward, on the CPU's default backend: channels_last inside
    (the fused gating under compile) or NCHW (the gating as aten ops); cnum 4 has a
    one-channel layer, whose layout torch's tracer and its CPU kernels see differently."""
    torch.manual_seed(0)
    recipe = build_model("deepfill_v2", cnum=4)
    g = recipe.generator
    g.cpu_channels_last = channels_last_inside
    image, mask = _batch(2, 32, 32)
    x = recipe.prepare_input(image, mask)
    compiled = torch.compile(g, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    ref = g(x)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(sum(o.sum() for o in out), list(g.parameters()))
    ref_grads = torch.autograd.grad(sum(o.sum() for o in ref), list(g.parameters()))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_generator_compiles_fullgraph_on_gpu(backend):
    """On the GPU with inductor, bfloat16 channels_last, every fastinpaint backend. (On the
    CPU the Triton path runs in the interpreter: the whole generator under it takes minutes,
    so the CPU test above uses the default backend.)"""
    from conftest import skip_unless_available
    from fastinpaint import use_backend

    skip_unless_available(backend, "cuda")
    torch._dynamo.reset()
    recipe = build_model("deepfill_v2", cnum=16)
    g = recipe.generator.cuda().to(torch.bfloat16).to(memory_format=torch.channels_last)
    image, mask = _batch(2, 64, 64)
    x = recipe.prepare_input(image, mask).cuda().to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with use_backend(backend):
        ref = g(x)
        out = torch.compile(g, fullgraph=True)(x)
        for a, b in zip(out, ref):
            torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2)
        sum(o.float().sum() for o in out).backward()
        g.eval()
        with torch.no_grad():
            torch.testing.assert_close(torch.compile(g, fullgraph=True)(x).float(), g(x).float(), rtol=5e-2, atol=5e-2)
