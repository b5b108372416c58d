"""fastinpaint inpaint: any size, folders, known pixels kept exactly."""

import numpy as np
import pytest
import torch
from PIL import Image

from fastinpaint import cli
from fastinpaint.inpaint import inpaint_array, load_generator


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    code = cli.main(["train", "--data", "demo", "--mask", "free_form", "--steps", "3", "--out", str(out),
                     "--set", "size=32", "--set", "batch_size=2", "--set", "val_every=100",
                     "--set", "checkpoint_every=3", "--set", "samples_per_epoch=8"])
    assert code == 0
    return out


def _write(tmp_path, name, h, w, seed, mask_fraction=0.3):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    hole = rng.random((h, w)) < mask_fraction
    Image.fromarray(img).save(tmp_path / f"{name}.png")
    Image.fromarray((hole * 255).astype(np.uint8)).save(tmp_path / f"{name}_mask.png")
    return img, hole


@pytest.mark.parametrize("h,w", [(32, 32), (33, 47), (7, 5), (64, 17)])
def test_known_pixels_exact_and_odd_sizes(run_dir, tmp_path, h, w):
    img, hole = _write(tmp_path, "a", h, w, seed=h * w)
    out = tmp_path / "out.png"
    assert cli.main(["inpaint", "--checkpoint", str(run_dir), "--image", str(tmp_path / "a.png"),
                     "--mask", str(tmp_path / "a_mask.png"), "--out", str(out)]) == 0
    result = np.asarray(Image.open(out))
    assert result.shape == img.shape
    assert np.array_equal(result[~hole], img[~hole])        # known pixels untouched
    assert not np.array_equal(result[hole], img[hole])       # the hole was filled by the network


def test_folder_of_images_and_every_checkpoint_form(run_dir, tmp_path):
    imgs, masks, out = tmp_path / "imgs", tmp_path / "masks", tmp_path / "out"
    imgs.mkdir(), masks.mkdir()
    originals = {}
    for i, (h, w) in enumerate([(20, 30), (31, 9)]):
        rng = np.random.default_rng(i)
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        hole = np.zeros((h, w), bool)
        hole[h // 4: h // 2, w // 4: w // 2] = True
        Image.fromarray(img).save(imgs / f"img{i}.png")
        Image.fromarray((hole * 255).astype(np.uint8)).save(masks / f"img{i}.png")
        originals[f"img{i}.png"] = (img, hole)
    assert cli.main(["inpaint", "--checkpoint", str(run_dir / "weights.safetensors"), "--image", str(imgs),
                     "--mask", str(masks), "--out", str(out)]) == 0
    for name, (img, hole) in originals.items():
        result = np.asarray(Image.open(out / name))
        assert np.array_equal(result[~hole], img[~hole])
    # the run folder, its weights file and its checkpoint give the same generator
    ckpt = sorted((run_dir / "checkpoints").glob("*.pt"))[-1]
    gens = [load_generator(p)[1] for p in (run_dir, run_dir / "weights.safetensors", ckpt)]
    for g in gens[1:]:
        for (k, a), (_, b) in zip(gens[0].state_dict().items(), g.state_dict().items()):
            assert torch.equal(a, b), k


def test_inverted_masks_and_errors(run_dir, tmp_path):
    recipe, gen = load_generator(run_dir)
    img = np.random.default_rng(0).integers(0, 256, (12, 14, 3), dtype=np.uint8)
    hole = np.zeros((12, 14), bool)
    assert np.array_equal(inpaint_array(recipe, gen, img, hole), img)  # nothing to fill
    with pytest.raises(ValueError, match="mask must be"):
        inpaint_array(recipe, gen, img, np.zeros((5, 5), bool))
    _write(tmp_path, "b", 16, 16, seed=3)
    assert cli.main(["inpaint", "--checkpoint", str(tmp_path / "nope"), "--image", str(tmp_path / "b.png"),
                     "--mask", str(tmp_path / "b_mask.png"), "--out", str(tmp_path / "o.png")]) == 2
    assert cli.main(["inpaint", "--checkpoint", str(run_dir), "--image", str(tmp_path / "missing.png"),
                     "--mask", str(tmp_path / "b_mask.png"), "--out", str(tmp_path / "o.png")]) == 2
    assert cli.main(["inpaint", "--checkpoint", str(run_dir), "--image", str(tmp_path / "b.png"),
                     "--mask", str(tmp_path / "b_mask.png"), "--out", str(tmp_path / "o.png"), "--invert-mask"]) == 0
