"""Filling user images with a trained generator: ``fastinpaint inpaint``.

Any image size: the image is padded (reflect) to the network's size multiple, filled, and
cropped back; the result keeps every known pixel of the input *exactly* (compositing is
done on the 8-bit values that are written). Mask files: white (> 127) = hole, unless
``invert``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _strip_prefixes(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_generator(path, ema: bool = False, device="cpu"):
    """(recipe, generator in eval mode) from a run folder, a ``.safetensors`` weights file
    (its metadata holds the config) or a training checkpoint."""
    from .models import build_model
    from .train.checkpoint import load_checkpoint, load_weights, weights_metadata

    path = Path(path)
    if path.is_dir():
        name = "weights_ema.safetensors" if ema else "weights.safetensors"
        if not (path / name).is_file():
            raise FileNotFoundError(f"checkpoint: {path} has no {name} (is it a fastinpaint run folder?)")
        path = path / name
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: {path} does not exist")
    if path.suffix == ".safetensors":
        meta = weights_metadata(path)
        if "config" not in meta:
            raise ValueError(f"checkpoint: {path} carries no training config in its metadata")
        config = json.loads(meta["config"])
        state = load_weights(path)
    else:
        ckpt = load_checkpoint(path)
        config = ckpt["config"]
        state = ckpt["ema"] if ema and ckpt.get("ema") is not None else ckpt["generator"]
    recipe = build_model(config["model"], loss_weights=config.get("loss_weights"), **config.get("model_options", {}))
    generator = recipe.generator
    generator.load_state_dict(_strip_prefixes(state))
    return recipe, generator.to(device).eval()


def read_image(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def read_mask(path, size_hw, invert: bool = False) -> np.ndarray:
    """(H, W) bool hole mask, resized (nearest) to ``size_hw`` if needed."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("L")
        if im.size != (size_hw[1], size_hw[0]):
            im = im.resize((size_hw[1], size_hw[0]), Image.NEAREST)
        hole = np.asarray(im) > 127
    return ~hole if invert else hole


@torch.no_grad()
def inpaint_array(recipe, generator, image: np.ndarray, hole: np.ndarray, device="cpu") -> np.ndarray:
    """Fill ``hole`` (H, W bool) of ``image`` (H, W, 3 uint8); known pixels come back unchanged."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if hole.shape != image.shape[:2]:
        raise ValueError(f"mask must be {image.shape[:2]}, got {hole.shape}")
    h, w = hole.shape
    multiple = getattr(recipe, "size_multiple", 1)
    ph, pw = (-h) % multiple, (-w) % multiple
    x = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float().div(127.5).sub(1).to(device)
    m = torch.from_numpy(hole)[None, None].float().to(device)
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
        m = F.pad(m, (0, pw, 0, ph))  # padding counts as known
    out = generator(recipe.prepare_input(x, m))
    if hasattr(recipe, "final_output"):   # a generator that returns more than the image
        out = recipe.final_output(out)
    out = out[..., :h, :w]
    filled = ((out[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return np.where(hole[..., None], filled, image)


def _pairs(image, mask, out):
    """(image path, mask path, output path) for a file or a folder of images."""
    image, mask, out = Path(image), Path(mask), Path(out)
    if image.is_dir():
        files = sorted(p for p in image.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise FileNotFoundError(f"image: no images in {image}")
        pairs = []
        for f in files:
            rel = f.relative_to(image)
            if mask.is_dir():
                candidates = [mask / rel.with_suffix(e) for e in (f.suffix, ".png")]
                m = next((c for c in candidates if c.is_file()), None)
                if m is None:
                    raise FileNotFoundError(f"mask: no mask for {rel} in {mask}")
            else:
                m = mask
            pairs.append((f, m, out / rel.with_suffix(".png")))
        return pairs
    if not image.is_file():
        raise FileNotFoundError(f"image: {image} does not exist")
    if not mask.is_file():
        raise FileNotFoundError(f"mask: {mask} is not a file (a folder of masks goes with a folder of images)")
    target = out / (image.stem + ".png") if out.is_dir() else out
    return [(image, mask, target)]


def inpaint_files(checkpoint, image, mask, out, invert_mask: bool = False, ema: bool = False,
                  device=None) -> list[Path]:
    from PIL import Image

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    recipe, generator = load_generator(checkpoint, ema=ema, device=device)
    written = []
    for img_path, mask_path, out_path in _pairs(image, mask, out):
        arr = read_image(img_path)
        result = inpaint_array(recipe, generator, arr, read_mask(mask_path, arr.shape[:2], invert_mask), device)
        os.makedirs(out_path.parent, exist_ok=True)
        Image.fromarray(result).save(out_path)
        written.append(out_path)
    return written
