"""Context Encoder models: shapes, losses, the trainer, and a short real training run."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fastinpaint.data.datasets import make_dataset
from fastinpaint.data.masks import CenterMask, RandomRegionMask
from fastinpaint.metrics import mean_fill
from fastinpaint.models import MODELS, build_model
from fastinpaint.models.context_encoder import MEAN_FILL
from fastinpaint.nn import ChannelWiseFC

CONFIGS = Path(__file__).resolve().parents[1] / "fastinpaint" / "configs"


def test_registered():
    assert "context_encoder" in MODELS and "context_encoder_features" in MODELS


def test_published_shapes_at_128():
    recipe = build_model("context_encoder")
    g = recipe.generator
    fc = [m for m in g.modules() if isinstance(m, ChannelWiseFC)]
    assert len(fc) == 1 and fc[0].weight.shape == (512, 16, 16)  # 512 maps of 4x4
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    mask = CenterMask()(128, 128)[None].expand(2, 1, 128, 128)
    inp = recipe.prepare_input(x, mask)
    assert inp.shape == (2, 3, 128, 128)
    fill = torch.tensor(MEAN_FILL).view(1, 3, 1, 1)
    assert torch.equal(inp[:, :, 64:65, 64:65], fill.expand(2, 3, 1, 1))  # hole: the mean colour
    assert torch.equal(inp[:, :, :36], x[:, :, :36])                       # known pixels untouched
    g.eval()
    with torch.no_grad():
        assert g.predict(inp).shape == (2, 3, 64, 64)  # the central 64x64
        out = g(inp)
    assert out.shape == (2, 3, 128, 128)
    assert torch.equal(out[:, :, :32], inp[:, :, :32]) and torch.equal(out[:, :, :, 96:], inp[:, :, :, 96:])
    d = recipe.discriminator
    assert d(x[:, :, 32:96, 32:96]).shape == (2, 1, 1, 1)
    losses = recipe.generator_losses(x, mask, out, d)
    assert set(losses) == {"rec", "adv"} and all(torch.isfinite(v) for v in losses.values())
    assert recipe.loss_weights == {"rec": 0.999, "adv": 0.001}
    assert set(recipe.discriminator_losses(x, mask, out, d)) == {"d_real", "d_fake"}
    assert recipe.default_betas == (0.5, 0.999) and recipe.default_lr == 2e-3
    assert recipe.default_lr_discriminator == 2e-4


def test_overlap_band_weighted_ten_times():
    recipe = build_model("context_encoder", width=4, disc_width=4)
    cm = CenterMask()
    mask = cm(128, 128)[None]
    w = recipe.rec_weights(mask)
    expected = cm.loss_weights(128, 128)[None, :, 32:96, 32:96]
    assert torch.equal(w, expected)
    assert w[0, 0, 0, 0] == 10 and w[0, 0, 32, 32] == 1
    # the loss is the weighted mean over the predicted square
    x = torch.zeros(1, 3, 128, 128)
    out = x.clone()
    out[:, :, 32, 32] = 1.0   # band pixel
    out[:, :, 64, 64] = 1.0   # hole pixel
    rec = recipe.generator_losses(x, mask, out)["rec"]
    torch.testing.assert_close(rec, torch.tensor((10.0 + 1.0) * 3 / (3 * 64 * 64)))


def test_full_output_and_conv_bottleneck_and_any_size():
    recipe = build_model("context_encoder", output="full", width=4, disc_width=4, bottleneck="conv")
    x = torch.rand(2, 3, 96, 80) * 2 - 1   # not image_size: resampled to 128 and back
    mask = RandomRegionMask()(96, 80, np.random.default_rng(0))[None].expand(2, 1, 96, 80)
    out = recipe.generator(recipe.prepare_input(x, mask))
    assert out.shape == (2, 3, 96, 80)
    w = recipe.rec_weights(mask)
    assert set(w.unique().tolist()) <= {0.0, 1.0, 10.0} and (w == 10).any()
    losses = recipe.generator_losses(x, mask, out, recipe.discriminator)
    assert torch.isfinite(losses["adv"])
    centre = build_model("context_encoder", width=4, disc_width=4)
    out = centre.generator(centre.prepare_input(x, mask))
    assert out.shape == (2, 3, 96, 80)
    assert set(centre.discriminator_losses(x, mask, out, centre.discriminator)) == {"d_real", "d_fake"}


def test_feature_variant_exports_backbone():
    recipe = build_model("context_encoder_features", width=16)
    assert recipe.discriminator is None and recipe.loss_weights == {"rec": 1.0}
    x = torch.rand(2, 3, 227, 227) * 2 - 1
    mask = RandomRegionMask()(227, 227, np.random.default_rng(1))[None].expand(2, 1, 227, 227)
    out = recipe.generator(recipe.prepare_input(x, mask))
    assert out.shape == x.shape
    fc = [m for m in recipe.generator.modules() if isinstance(m, ChannelWiseFC)]
    assert fc[0].height == fc[0].width == 6  # pool5 6x6
    backbone = recipe.export_backbone()
    feats = backbone(x)
    assert feats.shape == (2, recipe.generator.encoder.out_channels, 6, 6)
    for p, q in zip(backbone.parameters(), recipe.generator.encoder.parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr()  # a copy
    assert torch.isfinite(recipe.generator_losses(x, mask, out)["rec"])


def test_bad_options():
    with pytest.raises(ValueError, match="multiple of 32"):
        build_model("context_encoder", image_size=100)
    with pytest.raises(ValueError, match="output"):
        build_model("context_encoder", output="middle")
    with pytest.raises(ValueError, match="no loss 'l1'"):
        build_model("context_encoder", loss_weights={"l1": 1.0})
    with pytest.raises(ValueError, match="bottleneck"):
        build_model("context_encoder", bottleneck="fc")


# ----------------------------------------------------------------------------- a real training run

SIZE, STEPS, BATCH = 64, 1000, 16


@pytest.fixture(scope="module")
def trained():
    """Train a small Context Encoder (width 8, 64x64, central holes, reconstruction loss)
    on demo crops for 1000 steps on one CPU thread (about 30-60 s): enough to pass the
    mean-colour fill on the held-out crops (16.50 dB against its 16.59 at 400 steps, 17.15 at
    1000, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        recipe = build_model("context_encoder", image_size=SIZE, width=8, overlap=2, loss_weights={"adv": 0.0})
        g = recipe.generator
        opt = torch.optim.Adam(g.parameters(), lr=recipe.default_lr, betas=recipe.default_betas)
        data = make_dataset("demo", size=SIZE, split="train", seed=0, samples_per_epoch=STEPS * BATCH)
        mask = CenterMask(hole=SIZE // 2, overlap=2, image=SIZE)(SIZE, SIZE)[None].expand(BATCH, 1, SIZE, SIZE)
        history = []
        for step in range(STEPS):
            image = torch.stack([data[step * BATCH + i] for i in range(BATCH)])
            out = g(recipe.prepare_input(image, mask))
            loss = recipe.generator_losses(image, mask, out)["rec"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append(loss.item())
        return recipe, history
    finally:
        torch.set_num_threads(threads)


def test_loss_decreases_on_demo(trained):
    _, history = trained
    first, last = sum(history[:25]) / 25, sum(history[-25:]) / 25
    assert all(math.isfinite(v) for v in history)
    assert last < 0.7 * first, (first, last)


def _hole_psnr(pred, target, mask):
    mse = (((pred - target) / 2) ** 2 * mask).sum() / (3 * mask.sum())
    return 10 * torch.log10(1 / mse).item()


def test_beats_mean_colour_fill_on_held_out_centre_holes(trained):
    recipe, _ = trained
    val = make_dataset("demo", size=SIZE, split="val", seed=0)
    images = torch.stack([val[i] for i in range(len(val))])
    mask = CenterMask(hole=SIZE // 2, overlap=2, image=SIZE)(SIZE, SIZE)[None].expand(len(images), 1, SIZE, SIZE)
    g = recipe.generator.eval()
    with torch.no_grad():
        out = recipe.composite(images, mask, g(recipe.prepare_input(images, mask)))
    ours = _hole_psnr(out, images, mask)
    baseline = _hole_psnr(mean_fill(images, mask), images, mask)
    assert ours > baseline + 0.3, (ours, baseline)


# ----------------------------------------------------------------------------- the trainer

def test_trainer_runs_published_config_on_demo(tmp_path):
    """The centre-hole config file, shrunk: adversarial loss on, two Adam optimisers."""
    from fastinpaint.train import load_config, train

    cfg = load_config(CONFIGS / "context_encoder_center.toml", [
        "data=demo", "size=64", "model_options.image_size=64", "model_options.width=4",
        "model_options.disc_width=4", "model_options.overlap=2", "mask_options.image=64", "mask_options.hole=32",
        "mask_options.overlap=2", "batch_size=2", "steps=2", "val_every=100", "checkpoint_every=100",
        "samples_per_epoch=8", "val_batches=1", "device=cpu", f"out={tmp_path / 'run'}"])
    result = train(cfg)
    assert result["step"] == 2 and Path(result["weights"]).exists()


@pytest.mark.parametrize("name", ["context_encoder_center", "context_encoder_random_block",
                                  "context_encoder_random_region", "context_encoder_features"])
def test_config_files_load(name):
    from fastinpaint.train import load_config

    cfg = load_config(CONFIGS / f"{name}.toml")
    build_model(cfg.model, loss_weights=cfg.loss_weights, **dict(cfg.model_options, width=4))
    cfg.validate()


def test_cli_train_on_image_folder(tmp_path):
    """``fastinpaint train --model context_encoder`` on a folder of images (default size and mask)."""
    from PIL import Image

    from fastinpaint.cli import main

    folder = tmp_path / "images"
    folder.mkdir()
    demo = make_dataset("demo", size=96, split="val", seed=0)
    for i in range(6):
        arr = ((demo[i].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        Image.fromarray(arr).save(folder / f"img{i}.png")
    rc = main(["train", "--model", "context_encoder", "--data", str(folder), "--steps", "1", "--out",
               str(tmp_path / "run"), "--set", "batch_size=2", "--set", "model_options.width=4",
               "--set", "model_options.disc_width=4", "--set", "val_every=100", "--set", "val_batches=1",
               "--set", "device=cpu"])
    assert rc in (0, None)
    assert (tmp_path / "run" / "weights.safetensors").exists()


def test_inpaint_any_size_keeps_known_pixels(trained):
    """``fastinpaint inpaint``'s path: any image size (resampled to the network's), known pixels exact."""
    from fastinpaint.inpaint import inpaint_array

    recipe, _ = trained
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (70, 50, 3), dtype=np.uint8)
    hole = np.zeros((70, 50), dtype=bool)
    hole[25:45, 15:35] = True
    out = inpaint_array(recipe, recipe.generator.eval(), image, hole)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.array_equal(out[~hole], image[~hole])
    assert not np.array_equal(out[hole], image[hole])
