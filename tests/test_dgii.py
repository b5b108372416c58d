"""The DGII recipe: IN + AN + distillation losses, trained through the engine."""

import json

import pytest
import torch

from fastinpaint import cli
from fastinpaint.models import MODELS, build_model


def test_recipe_interface_and_losses():
    recipe = build_model("dgii", width=4)
    assert "dgii" in MODELS and recipe.discriminator is None
    image = torch.rand(2, 3, 16, 20) * 2 - 1
    mask = torch.zeros(2, 1, 16, 20)
    mask[:, :, 4:12, 5:13] = 1
    x = recipe.prepare_input(image, mask)
    assert x.shape == (2, 8, 16, 20) and torch.equal(x[:, 5:], image) and torch.equal(x[:, 4:5], mask)
    out = recipe.generator(x)
    assert isinstance(out, tuple) and out[0].shape == (2, 3, 16, 20)
    losses = recipe.generator_losses(image, mask, out)
    assert set(losses) == set(recipe.default_weights)
    assert all(torch.isfinite(v) and v >= 0 for v in losses.values())
    sum(recipe.loss_weights[k] * v for k, v in losses.items()).backward()
    missing = [n for n, p in recipe.generator.named_parameters() if p.grad is None]
    assert not missing, missing  # every parameter is used in forward (DDP)
    # AN's affinities are a target: the transfer loss gives AN's q/k convs no gradient
    recipe.generator.zero_grad()
    recipe.generator(x)[1]["attn_transfer"].backward()
    assert recipe.generator.auxiliary.attention.query.weight.grad is None
    recipe.generator.eval()
    with torch.no_grad():
        y = recipe.generator(x)
        assert torch.is_tensor(y) and torch.equal(y, recipe.generator(x[:, :5]))
    with pytest.raises(ValueError, match="multiples of 4"):
        recipe.generator(x[..., :18])
    with pytest.raises(ValueError, match="no loss"):
        build_model("dgii", loss_weights={"adv": 1.0})


def test_cli_trains_dgii(tmp_path, capsys):
    out = tmp_path / "dgii"
    rc = cli.main(["train", "--model", "dgii", "--data", "demo", "--mask", "block", "--steps", "2", "--out", str(out),
                   "--set", "size=32", "--set", "batch_size=2", "--set", "samples_per_epoch=8",
                   "--set", "val_batches=1", "--set", "model_options.width=4"])
    assert rc == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"] == "dgii"
    assert (out / "checkpoints" / "ckpt_000000002.pt").is_file()
