"""Filling user images with a trained generator: ``fastinpaint inpaint``.

Any image size: the image is padded (reflect) to the network's size multiple, filled, and
cropped back. The result keeps every known pixel of the input *exactly*, in the input's own
mode: compositing is done on the values that are written, gray stays gray (8 or 16 bit), and
an alpha channel is kept as it was (the network sees the colour channels).

Mask files are read by one rule, :func:`fastinpaint.data.masks.hole_from_image`: a hole is
every pixel brighter than half the mask's brightest value (white or any colour on black, 0/1
or 0/255), or, in a mask with transparency, every painted (not fully transparent) pixel;
``invert`` swaps holes and known pixels. A mask with no hole or no known pixel, or of another
size than its image (unless ``resize_mask``), is refused.

A guided generator (DeepFill v2 with ``guided = true``) takes the user's sketch of the lines
to draw in the hole: a sketch file is read by the same rule (a line is every pixel brighter
than half the brightest, or every painted pixel of a sketch with transparency), only its
lines inside the hole count, and no sketch is an empty one (no guidance: the edges of what
the hole covers are never used), an image that a folder of sketches has none for too. Masks
and sketches in a folder are named like their images, whatever the extension
(:func:`fastinpaint.data.masks.match_by_stem`). The weights can be another project's (see
:mod:`fastinpaint.weights`).

Every mistake in the arguments raises a :class:`fastinpaint.errors.UserError` naming the
argument (``checkpoint``, ``image``, ``mask``, ``sketch``, ``out``, ``ema``, ``device``,
``max_memory``) and the fix. An image whose estimated memory (the recipe's ``inference_memory``)
exceeds what ``max_memory`` allows, by default the memory available now, is refused before any
work.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data.datasets import to_uint8
from .errors import InputNotFoundError, InvalidInputError, UnreadableInputError
from .weights import IMAGE_EXTENSIONS, load_pretrained

# output extension -> (PIL format, the modes it writes back unchanged, save options)
OUTPUT_FORMATS = {
    ".png": ("PNG", ("L", "LA", "RGB", "RGBA", "I;16"), {}),
    ".tif": ("TIFF", ("L", "LA", "RGB", "RGBA", "I;16"), {}),
    ".tiff": ("TIFF", ("L", "LA", "RGB", "RGBA", "I;16"), {}),
    ".webp": ("WEBP", ("RGB", "RGBA"), {"lossless": True}),
    ".jpg": ("JPEG", ("L", "RGB"), {"quality": 95}),
    ".jpeg": ("JPEG", ("L", "RGB"), {"quality": 95}),
    ".bmp": ("BMP", ("L", "RGB"), {}),
}
_PLURAL = {"mask": "masks", "sketch": "sketches"}
_MODE_WORDS = {"L": "gray", "LA": "gray + alpha", "RGB": "RGB", "RGBA": "RGB + alpha", "I;16": "16-bit gray"}
_MASK_RULE = ("holes are the pixels brighter than half the mask's brightest (white or any colour on black), "
              "or, in a mask with transparency, the painted ones")


# ----------------------------------------------------------------------------- the generator

def load_generator(path, ema: bool = False, device="cpu", model: str | None = None, model_options: dict | None = None):
    """(recipe, generator in eval mode) from a run folder, a ``.safetensors`` weights file
    (its metadata holds the config), a training checkpoint, or, with ``model`` named, another
    project's checkpoint for that model (``model="deepfill_v2"``: the DeepFill v2 PyTorch
    port's ``.pth``, with options such as ``{"cnum": 48, "guided": False}`` in
    ``model_options``; see :mod:`fastinpaint.weights`). ``model_options`` also override a
    fastinpaint file's own. ``ema``: the EMA of the generator (a run folder's
    weights_ema.safetensors, a checkpoint's EMA state); a run trained without EMA is refused,
    never silently replaced by the plain weights."""
    recipe = load_pretrained(path, model=model, model_options=model_options, ema=ema)[0]
    return recipe, recipe.generator.to(device).eval()


# ----------------------------------------------------------------------------- files

def _open(path, argument: str):
    """The decoded PIL image of ``path``, turned upright by its EXIF orientation."""
    from PIL import Image, ImageOps

    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{path} does not exist" if not path.exists() else f"{path} is not a file",
                                 argument=argument, fix=f"give an existing {argument} file")
    try:
        with Image.open(path) as im:
            im.load()   # decodes now: a truncated file fails here
            return ImageOps.exif_transpose(im)
    except Exception as e:   # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        raise UnreadableInputError(f"cannot read {path} as an image ({reason})", argument=argument,
                                   fix="give a PNG, JPEG, WebP, BMP or TIFF file (a complete one)") from e


class Photo:
    """An image's pixels in its own mode (``mode``: L, LA, RGB, RGBA or I;16; palette and
    other modes are read as RGB or RGBA), and :attr:`rgb`, the (H, W, 3) uint8 the network sees."""

    def __init__(self, pixels: np.ndarray, mode: str):
        self.pixels, self.mode = pixels, mode

    @property
    def size_hw(self) -> tuple[int, int]:
        return self.pixels.shape[:2]

    @property
    def rgb(self) -> np.ndarray:
        if self.mode == "I;16":
            gray = ((self.pixels.astype(np.float64) / 257.0).round()).astype(np.uint8)
        elif self.mode in ("L", "LA"):
            gray = self.pixels if self.mode == "L" else self.pixels[..., 0]
        else:
            return np.ascontiguousarray(self.pixels[..., :3])
        return np.repeat(gray[..., None], 3, axis=2)

    def with_fill(self, filled_rgb: np.ndarray, hole: np.ndarray) -> np.ndarray:
        """The pixels with those of ``hole`` taken from ``filled_rgb`` (converted to this mode:
        ITU-R 601 luma for gray, as PIL's conversion); the rest, and any alpha, unchanged."""
        out = self.pixels.copy()
        if self.mode in ("L", "LA", "I;16"):
            rgb = filled_rgb.astype(np.float64)
            luma = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
            if self.mode == "I;16":
                value = np.clip(np.round(luma * 257.0), 0, 65535).astype(np.uint16)
            else:
                value = np.clip(np.round(luma), 0, 255).astype(np.uint8)
            if out.ndim == 2:
                out[hole] = value[hole]
            else:
                out[..., 0][hole] = value[hole]
        else:
            out[..., :3][hole] = filled_rgb[hole]
        return out


def read_photo(path) -> Photo:
    """An image file as a :class:`Photo` (UserError naming ``image`` if it cannot be read)."""
    im = _open(path, "image")
    if im.mode in ("I", "I;16", "I;16B", "I;16L"):
        return Photo(np.clip(np.asarray(im), 0, 65535).astype(np.uint16), "I;16")
    transparent = "transparency" in im.info
    if im.mode == "1":
        im = im.convert("L")
    if im.mode in ("P", "PA", "RGBa"):
        im = im.convert("RGBA" if transparent or im.mode != "P" else "RGB")
    elif im.mode == "La" or (im.mode == "L" and transparent):
        im = im.convert("LA")
    elif im.mode == "RGB" and transparent:
        im = im.convert("RGBA")
    elif im.mode not in ("L", "LA", "RGB", "RGBA"):
        im = im.convert("RGB")   # CMYK, YCbCr, float, ...
    return Photo(np.asarray(im, dtype=np.uint8).copy(), im.mode)


def read_image(path) -> np.ndarray:
    """(H, W, 3) uint8: the image as the network sees it."""
    return read_photo(path).rgb


def read_mask(path, size_hw, invert: bool = False, resize: bool = False, image_name: str = "the image") -> np.ndarray:
    """(H, W) bool hole mask of the mask file ``path`` for an image of ``size_hw``.

    The rule of :func:`fastinpaint.data.masks.hole_from_image`; ``invert`` swaps holes and known
    pixels. A mask of another size is an error unless ``resize`` (nearest-neighbour stretch).
    A mask that marks no hole, or no known pixel, is an error."""
    from PIL import Image

    from .data.masks import hole_from_image

    im = _open(path, "mask")
    hole, read_by = hole_from_image(im)
    if invert:
        hole = ~hole
    h, w = int(size_hw[0]), int(size_hw[1])
    if hole.shape != (h, w):
        if not resize:
            raise InvalidInputError(f"{path} is {hole.shape[1]}x{hole.shape[0]} but {image_name} is {w}x{h}",
                                    argument="mask", fix="give a mask of the image's size, or add --resize-mask to "
                                                         "stretch it to the image (nearest neighbour)")
        hole = np.asarray(Image.fromarray(hole.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 0
    n = int(hole.sum())
    if n == 0 or n == hole.size:
        desc = _uniform(im, read_by)
        flag = " with --invert-mask" if invert else ""
        if n == 0:
            raise InvalidInputError(
                f"{path} marks no hole{flag} ({desc})", argument="mask",
                fix="leave out --invert-mask" if invert else f"{_MASK_RULE}; if your mask marks holes the other way "
                                                             "(black or transparent), add --invert-mask")
        raise InvalidInputError(
            f"{path} marks every pixel as a hole{flag} ({desc}), so nothing of the image would be kept",
            argument="mask", fix="leave out --invert-mask" if invert else
            "if black or transparent marks the holes in your mask, add --invert-mask")
    return hole


def _uniform(im, read_by: str) -> str:
    if read_by == "alpha":
        return "read by its alpha channel, since it has transparency"
    extrema = im.getextrema()
    if isinstance(extrema[0], tuple):   # one (min, max) per band
        extrema = extrema[:3] if len(extrema) >= 3 else extrema[:1]
        lo, hi = min(e[0] for e in extrema), max(e[1] for e in extrema)
    else:
        lo, hi = extrema
    if lo == hi:
        return "it is black everywhere" if hi == 0 else f"every pixel has the value {hi}"
    return f"its values range from {lo} to {hi}"


def read_sketch(path, size_hw, image_name: str = "the image") -> np.ndarray:
    """(H, W) bool line map of the sketch file ``path`` for an image of ``size_hw``: the rule
    of masks (:func:`fastinpaint.data.masks.hole_from_image`; white or any colour on black, or
    painted on transparency). A sketch of another size than its image is an error; one with
    no line is an empty sketch."""
    from .data.masks import hole_from_image

    lines = hole_from_image(_open(path, "sketch"))[0]
    h, w = int(size_hw[0]), int(size_hw[1])
    if lines.shape != (h, w):
        raise InvalidInputError(f"{path} is {lines.shape[1]}x{lines.shape[0]} but {image_name} is {w}x{h}",
                                argument="sketch", fix="draw the sketch on a canvas of the image's size")
    return lines


def takes_sketch(recipe) -> bool:
    """Whether the recipe's generator takes a sketch (DeepFill v2 with ``guided = true``)."""
    return bool(getattr(recipe, "guided", False))


def check_sketch_trained(generator, source: str = "the generator") -> None:
    """Refuse a sketch for a guided generator whose sketch channel has zero weights in every
    layer that reads it: unguided weights loaded as guided (``--model-option guided=true``, or
    the start of a guided fine-tune) ignore the sketch, so the fill would silently be the
    unguided one. The sketch channel is input channel 3 of the 6-channel layers (masked image,
    sketch, ones, mask)."""
    reads = [p for p in generator.parameters() if p.dim() == 4 and p.shape[1] == 6]
    if reads and all(not bool(p[:, 3].any()) for p in reads):
        raise InvalidInputError(
            f"the sketch channel of {source} has zero weights (unguided weights loaded as a guided model): "
            "the sketch cannot change the fill", argument="sketch",
            fix="leave out --sketch, or give weights trained with guided = true (e.g. a guided fine-tune "
                "of these: train --init ... --set model_options.guided=true)")


def generator_fill(recipe, generator):
    """``fill(image, mask, sketch=None) -> output`` of a generator, for images of any size:
    ``image`` ``(B, 3, H, W)`` in [-1, 1] and ``mask`` ``(B, 1, H, W)`` (1 = hole) are padded
    (reflect; the padding counts as known) to the network's ``size_multiple``, filled, and the
    output cropped back to ``(B, 3, H, W)``. A guided generator (:func:`takes_sketch`) gets
    ``sketch`` ``(B, 1, H, W)`` (None: an empty sketch). The caller pastes the output into the
    holes."""
    guided = takes_sketch(recipe)

    @torch.no_grad()
    def fill(x: torch.Tensor, m: torch.Tensor, sketch: torch.Tensor | None = None) -> torch.Tensor:
        h, w = x.shape[-2:]
        multiple = getattr(recipe, "size_multiple", 1)
        ph, pw = (-h) % multiple, (-w) % multiple
        extra = {}
        if guided:
            extra["sketch"] = torch.zeros_like(m) if sketch is None else sketch.to(m)
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
            m = F.pad(m, (0, pw, 0, ph))  # padding counts as known
            if guided:
                extra["sketch"] = F.pad(extra["sketch"], (0, pw, 0, ph))
        net_input = recipe.prepare_input(x, m, **extra)
        del x, m, extra                     # only the network's input is needed now (large images)
        out = generator(net_input)
        del net_input
        if hasattr(recipe, "final_output"):   # a generator that returns more than the image
            out = recipe.final_output(out)
        return out[..., :h, :w]

    return fill


# ----------------------------------------------------------------------------- memory

_MEMORY_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_memory(value) -> int:
    """Bytes of a memory size: a number of bytes, or text such as ``6G``, ``6GB``, ``6GiB``,
    ``512M``, ``1.5T`` (K, M, G, T: powers of 1024). InvalidInputError naming ``max_memory``
    for anything else."""
    match = None if isinstance(value, bool) else _MEMORY_SIZE.fullmatch(str(value).strip())
    size = int(float(match[1]) * _UNITS[match[2].lower()]) if match else 0
    if size < 1:
        raise InvalidInputError(f"{value!r} is not a memory size", argument="max_memory",
                                fix="give a positive size such as 6G, 512M or 1.5T (powers of 1024), or bytes")
    return size


def format_memory(n: int) -> str:
    """``n`` bytes as ``6.0 GB`` / ``512 MB`` / ``12 KB`` / ``100 bytes`` (powers of 1024)."""
    if n >= 2**30:
        return f"{n / 2**30:.1f} GB"
    if n >= 2**20:
        return f"{n / 2**20:.0f} MB"
    return f"{n / 2**10:.0f} KB" if n >= 2**10 else f"{n} bytes"


def available_memory(device="cpu") -> int | None:
    """Bytes that can be allocated now: the free memory of a CUDA device, or the system's
    ``MemAvailable`` (/proc/meminfo; where there is none, the free physical pages). None
    where neither can be read."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def padded_size(recipe, height: int, width: int) -> tuple[int, int]:
    """The size the network sees for a ``height x width`` image (padded to its multiple)."""
    multiple = getattr(recipe, "size_multiple", 1)
    return height + (-height) % multiple, width + (-width) % multiple


def estimate_memory(recipe, height: int, width: int) -> int | None:
    """Bytes filling one ``height x width`` image takes on top of the loaded model: the
    recipe's ``inference_memory(height, width)`` at the padded size (a formula calibrated on
    measured peaks, CPU, float32), or None for a recipe that gives none."""
    estimate = getattr(recipe, "inference_memory", None)
    if estimate is None:
        return None
    return int(estimate(*padded_size(recipe, height, width)))


def check_memory(recipe, height: int, width: int, max_memory=None, device="cpu", image_name: str = "the image"):
    """Refuse (InvalidInputError naming ``max_memory``) an image whose estimated memory
    (:func:`estimate_memory`) exceeds ``max_memory`` (bytes or text, see :func:`parse_memory`;
    None: the memory available now, :func:`available_memory`). Nothing is refused where no
    estimate or no figure of the available memory exists."""
    limit = available_memory(device) if max_memory is None else parse_memory(max_memory)
    need = estimate_memory(recipe, height, width)
    if need is None or limit is None or need <= limit:
        return
    where = "allowed by --max-memory" if max_memory is not None else \
        f"available now ({'free on the GPU' if torch.device(device).type == 'cuda' else 'MemAvailable'})"
    raise InvalidInputError(
        f"{image_name} ({width}x{height}) needs about {format_memory(need)} to fill with "
        f"{getattr(recipe, 'name', type(recipe).__name__)}, more than "
        f"the {format_memory(limit)} {where}", argument="max_memory",
        fix="fill a crop or a downscaled copy, free memory, or set the limit with --max-memory (e.g. "
            f"--max-memory {-(-need // 2**30)}G) if that much can be used")


@torch.no_grad()
def inpaint_array(recipe, generator, image: np.ndarray, hole: np.ndarray, device="cpu",
                  sketch: np.ndarray | None = None, max_memory=None) -> np.ndarray:
    """Fill ``hole`` (H, W bool) of ``image`` (H, W, 3 uint8); known pixels come back unchanged.
    ``sketch`` (H, W; bool, or floats in [0, 1]): the lines a guided generator is to follow in
    the hole (only those inside it count); a guided generator given none gets an empty sketch,
    and a generator that is not guided refuses one. An image whose estimated memory exceeds
    ``max_memory`` (default: the memory available now) is refused before any work
    (:func:`check_memory`)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if hole.shape != image.shape[:2]:
        raise ValueError(f"mask must be {image.shape[:2]}, got {hole.shape}")
    if sketch is not None:
        if not takes_sketch(recipe):
            raise InvalidInputError(f"this {getattr(recipe, 'name', 'model')} generator is not guided: it takes "
                                    "no sketch", argument="sketch",
                                    fix="leave out the sketch, or use weights of a guided model "
                                        "(deepfill_v2 with guided = true)")
        check_sketch_trained(generator)
        if np.shape(sketch) != hole.shape:
            raise ValueError(f"sketch must be {hole.shape}, got {np.shape(sketch)}")
        sketch = torch.from_numpy(np.asarray(sketch, dtype=np.float32).copy())[None, None].to(device)
    check_memory(recipe, *hole.shape, max_memory, device)
    x = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float().div(127.5).sub(1).to(device)
    m = torch.from_numpy(hole)[None, None].float().to(device)
    filled = to_uint8(generator_fill(recipe, generator)(x, m, sketch)[0])
    return np.where(hole[..., None], filled, image)


def _output_format(path: Path):
    suffix = path.suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        what = "has no image file extension" if not suffix else \
            f"has the extension {suffix!r}, not one of the formats written" + \
            (" (a GIF holds 256 colours: the known pixels would change)" if suffix == ".gif" else "")
        raise InvalidInputError(f"{path} {what}", argument="out",
                                fix=f"end it in {', '.join(OUTPUT_FORMATS)}, or give a folder (an existing one, "
                                    "or a path ending in /)")
    return OUTPUT_FORMATS[suffix]


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _companions(given: Path, names: list[str], argument: str, required: bool = True) -> list:
    """The ``argument`` file (mask, sketch) of each image of ``names`` (paths relative to the
    folder of images): ``given`` itself when it is a file, else its file named like the image
    (:func:`fastinpaint.data.masks.match_by_stem`: the same stem, any image extension). An image
    with none is an error when ``required``, else gets None."""
    from .data.masks import match_by_stem

    if not given.is_dir():
        return [given] * len(names)
    found = match_by_stem(names, given, argument)
    missing = next((n for n, f in zip(names, found) if f is None), None)
    if required and missing is not None:
        raise InputNotFoundError(f"no {argument} for {missing} in {given}", argument=argument,
                                 fix=f"name each {argument} like its image ({given / Path(missing).with_suffix('.png')}"
                                     ", or any image extension)")
    return found


def _pairs(image, mask, out, sketch=None):
    """(image path, mask path, output path, sketch path or None) for a file or a folder of images."""
    out_text = str(out)
    image, mask, out = Path(image), Path(mask), Path(out)
    sketch = Path(sketch) if sketch is not None else None
    out_is_folder = out.is_dir() or out_text.endswith(("/", os.sep))
    if image.is_dir():
        if out.exists() and not out.is_dir():
            raise InvalidInputError(f"{out} is a file, but --image {image} is a folder", argument="out",
                                    fix="give a folder for the outputs of a folder of images")
        if not out.exists() and out.suffix.lower() in IMAGE_EXTENSIONS and not out_is_folder:
            raise InvalidInputError(f"{out} names an image file, but --image {image} is a folder", argument="out",
                                    fix="give a folder for the outputs (an existing one, or a name ending in /)")
        for given, argument in ((mask, "mask"), (sketch, "sketch")):
            if given is not None and not given.exists():
                raise InputNotFoundError(f"{given} does not exist", argument=argument,
                                         fix=f"give a {argument} file, or a folder of {_PLURAL[argument]} named like "
                                             "the images")
        files = sorted(p for p in image.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise InputNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {image}", argument="image",
                                     fix="give an image file, or a folder that holds images")
        names = [f.relative_to(image).as_posix() for f in files]
        masks = _companions(mask, names, "mask")
        sketches = _companions(sketch, names, "sketch", required=False) if sketch is not None else [None] * len(files)
        pairs = [(f, m, out / f.relative_to(image).with_suffix(".png"), k) for f, m, k in zip(files, masks, sketches)]
    else:
        if not image.exists():
            raise InputNotFoundError(f"{image} does not exist", argument="image",
                                     fix="give an existing image file, or a folder of images")
        for given, argument in ((mask, "mask"), (sketch, "sketch")):
            if given is None:
                continue
            if not given.exists():
                raise InputNotFoundError(f"{given} does not exist", argument=argument,
                                         fix=f"give an existing {argument} file")
            if given.is_dir():
                raise InvalidInputError(f"{given} is a folder", argument=argument,
                                        fix=f"give a {argument} file (a folder of {_PLURAL[argument]} goes with a "
                                            "folder of images)")
        target = out / (image.stem + ".png") if out_is_folder else out
        _output_format(target)
        pairs = [(image, mask, target, sketch)]
    seen: dict[Path, Path] = {}
    for src, _, target, _ in pairs:
        if _same_file(src, target):
            raise InvalidInputError(f"{target} would overwrite the input image {src}", argument="out",
                                    fix="give another file or folder")
        if target in seen:   # photo.png and photo.jpg both give photo.png
            raise InvalidInputError(f"{seen[target]} and {src} would both be written to {target}", argument="image",
                                    fix="rename one of them (outputs are named after the image, as .png)")
        seen[target] = src
    return pairs


def _check_writable(path: Path, mode: str, source: Path) -> None:
    """Refuse an output format that would change the input's mode (gray, alpha, 16 bit)."""
    if mode not in _output_format(path)[1]:
        raise InvalidInputError(f"a {path.suffix} file cannot hold the {_MODE_WORDS[mode]} pixels of {source}",
                                argument="out", fix="write a .png (or .tif), which keeps them")


def _save(path: Path, pixels: np.ndarray, mode: str) -> None:
    """Write ``pixels`` (``mode``) to ``path`` atomically."""
    from PIL import Image

    fmt, _, options = _output_format(path)
    if mode == "LA":
        im = Image.merge("LA", [Image.fromarray(np.ascontiguousarray(pixels[..., i])) for i in range(2)])
    else:
        im = Image.fromarray(np.ascontiguousarray(pixels))
    os.makedirs(path.parent, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        im.save(tmp, format=fmt, **options)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def inpaint_files(checkpoint, image, mask, out, invert_mask: bool = False, ema: bool = False, device=None,
                  resize_mask: bool = False, report=None, sketch=None, model: str | None = None,
                  model_options: dict | None = None, max_memory=None) -> list[Path]:
    """Fill ``image`` (a file, or a folder of images) by ``mask`` (a file, or a folder of masks
    named like the images) and write ``out`` (a file, or a folder: every output is a .png).
    ``sketch`` (a file, or a folder of sketches named like the images): the lines a guided
    generator is to follow in the holes (an image the folder has no sketch for gets an empty
    one, with a note). ``model`` / ``model_options``: see
    :func:`load_generator` (another project's weights). ``report(line)`` (optional) gets one
    line per file written, with its hole's share of the image, and a note where a mask marks
    most of its image as hole. ``max_memory``: see :func:`check_memory` (every image is
    checked before the first is filled)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("cuda asked for, but torch sees no CUDA device", argument="device",
                                fix="use --device cpu, or leave --device out")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if max_memory is not None:
        max_memory = parse_memory(max_memory)
    pairs = _pairs(image, mask, out, sketch)
    recipe, generator = load_generator(checkpoint, ema=ema, device=device, model=model, model_options=model_options)
    if sketch is not None and not takes_sketch(recipe):
        raise InvalidInputError(f"the generator of {checkpoint} is not guided: it takes no sketch", argument="sketch",
                                fix="leave out --sketch, or give weights of a guided model (deepfill_v2 with "
                                    "guided = true)")
    if sketch is not None:
        check_sketch_trained(generator, f"the generator of {checkpoint}")

    def read(img_path, mask_path, out_path, sketch_path):
        photo = read_photo(img_path)
        _check_writable(out_path, photo.mode, img_path)
        hole = read_mask(mask_path, photo.size_hw, invert_mask, resize_mask, image_name=str(img_path))
        lines = read_sketch(sketch_path, photo.size_hw, image_name=str(img_path)) if sketch_path is not None else None
        check_memory(recipe, *photo.size_hw, max_memory, device, image_name=str(img_path))
        return photo, hole, lines

    if len(pairs) > 1:   # every image, mask and sketch checked before the first file is written
        for pair in pairs:
            read(*pair)
    written = []
    for img_path, mask_path, out_path, sketch_path in pairs:
        photo, hole, lines = read(img_path, mask_path, out_path, sketch_path)
        filled = inpaint_array(recipe, generator, photo.rgb, hole, device, sketch=lines,
                               max_memory=max_memory)
        _save(out_path, photo.with_fill(filled, hole), photo.mode)
        written.append(out_path)
        if report is not None:
            share = hole.mean()
            report(f"wrote {out_path} (hole: {100 * share:.1f}% of the image)")
            if _output_format(out_path)[0] == "JPEG":
                report(f"note: JPEG is lossy, so the known pixels in {out_path} differ slightly from the input's; "
                       "write a .png (or .webp, .tif, .bmp) to keep them exactly")
            if share > 0.5:
                report(f"note: {mask_path} marks {100 * share:.0f}% of the image as hole"
                       + (" (with --invert-mask); if white marks the holes in your masks, leave out --invert-mask"
                          if invert_mask else "; if black (or transparent) marks the holes in your masks, add "
                                              "--invert-mask"))
            if sketch is not None and sketch_path is None:
                report(f"note: no sketch for {img_path.relative_to(image)} in {sketch}: filled with an empty sketch "
                       "(no guidance)")
            if lines is not None and not (lines & hole).any():
                report(f"note: {sketch_path} draws no line inside the hole, and only lines inside it guide the fill")
    return written
