"""Evaluating inpainting methods on a set of images with fixed holes: ``fastinpaint evaluate``.

Methods are trained generators (:func:`checkpoint_fill`, or any ``fill(image, mask) -> output``
on ``(B, 3, H, W)`` images in [-1, 1] and ``(B, 1, H, W)`` masks, 1 = hole, as the trainer's
validation takes) and the classical baselines of :mod:`fastinpaint.baselines` (``mean``,
``telea``, ``navier_stokes``; re-exported here). The OpenCV ones need
``opencv-python-headless`` (the ``train`` and ``eval`` extras); without it they are reported
unavailable, a row saying so, never an error.

The protocol:

* every image gets one hole mask, the same for every method and every run: drawn by the mask
  generator from ``numpy.random.default_rng([seed, index])`` (:func:`mask_rng`), ``index`` the
  image's place in the sorted list of files (a file skipped as unreadable keeps its index, so
  the others keep their holes), or read from a folder of mask files (named like the images,
  :func:`fastinpaint.data.masks.match_by_stem`, else taken in sorted order when there are as
  many as images; each stretched to its image, nearest);
* ``size``: every image is first brought to ``size x size`` (the shorter side resized to
  ``size``, bicubic, then the centre square), as the published protocols do at 256 or 512; a
  mask file (or a given mask of the image's size) is for the image as read and goes through
  the same resize and crop (nearest), a drawn mask is drawn at ``size x size``;
  without it every image is evaluated at its own size (a generator's input is padded to its
  size multiple and its output cropped back);
* each method's output is pasted into the holes (every known pixel kept exactly) and rounded
  to 8 bits, as it would be written to a file; then each image is scored alone by
  :class:`fastinpaint.metrics.InpaintingMetrics`: PSNR, SSIM, L1 over the image and over the
  hole (in [0, 1] units), LPIPS when asked for; FID over the whole set;
* the report gives per method the mean over images and the 95% confidence interval of that
  mean, ``mean +- t(0.975, n - 1) * s / sqrt(n)`` (Student's t, ``s`` the sample standard
  deviation over the ``n`` images; none for one image). Hole L1 is thus the mean of per-image
  hole L1s (the trainer's validation pools the hole pixels of all images instead);
* open-mmlab/mmagic's model zoo convention is reported beside it: its "l1 error" is the mean
  absolute error on the 0-255 scale over the whole image (``255 * L1``), with PSNR and SSIM.

LPIPS and FID follow :mod:`fastinpaint.metrics`: only from weights on disk, never a download.
"auto" computes them when they are there and notes why not when they are not; ``True`` makes
their absence an error (:class:`fastinpaint.metrics.MetricUnavailableError`, naming the file).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import warnings
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from .baselines import BASELINES, OPENCV_RADIUS, BaselineUnavailableError, baseline_fill, opencv_fill
from .errors import InputNotFoundError, InvalidInputError

__all__ = ["BASELINES", "OPENCV_RADIUS", "BaselineUnavailableError", "Evaluation", "MethodSummary",
           "baseline_fill", "check_out", "checkpoint_fill", "evaluate", "mask_rng", "mean_ci95", "opencv_fill",
           "REPORT_FILES", "square_image", "square_mask"]

METRICS = ("psnr", "ssim", "l1", "l1_hole", "lpips")   # per image, in this order
MMAGIC_L1 = "mmagic_l1_error"
LABELS = {"psnr": "PSNR (dB)", "ssim": "SSIM", "l1": "L1", "l1_hole": "hole L1", "lpips": "LPIPS", "fid": "FID",
          MMAGIC_L1: "l1 error (0-255)"}
_FORMATS = {"psnr": "{:.2f}", "ssim": "{:.3f}", "l1": "{:.4f}", "l1_hole": "{:.4f}", "lpips": "{:.3f}",
            "fid": "{:.2f}", MMAGIC_L1: "{:.3f}"}
MIN_SIDE = 11       # SSIM's window
GRID_IMAGES = 4     # rows of the sample grid
GRID_HEIGHT = 256   # a taller row is scaled down to this height
GRID_GAP = 2        # white pixels between the grid's cells
GRID_LABEL_WIDTH = 160   # a column may widen up to this for its label (longer labels are shortened)
REPORT_FILES = ("per_image.csv", "summary.json", "summary.md", "grid.png")   # what write() puts in --out

Fill = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def mask_rng(seed: int, index: int) -> np.random.Generator:
    """The random generator of image ``index``'s mask: a function of (seed, index) only."""
    return np.random.default_rng([int(seed), int(index)])


# ----------------------------------------------------------------------------- methods

def checkpoint_fill(checkpoint, ema: bool = False, device="cpu", model: str | None = None,
                    model_options: dict | None = None) -> Fill:
    """The ``fill(image, mask)`` of a trained generator: a run folder, its weights file or a
    checkpoint, or with ``model`` another project's checkpoint
    (:func:`fastinpaint.inpaint.load_generator`), for images of any size."""
    from .inpaint import generator_fill, load_generator

    recipe, generator = load_generator(checkpoint, ema=ema, device=device, model=model, model_options=model_options)
    return generator_fill(recipe, generator)


@dataclasses.dataclass
class _Method:
    name: str
    fill: Fill | None
    reason: str | None = None


def _methods(methods) -> list[_Method]:
    if isinstance(methods, str):
        methods = [methods]
    if isinstance(methods, Mapping):
        pairs = list(methods.items())
    else:
        try:
            pairs = [(m, m) for m in methods]
        except TypeError:
            raise InvalidInputError(f"must be baseline names or a dict of name -> baseline or fill, got {methods!r}",
                                    argument="methods") from None
    if not pairs:
        raise InvalidInputError("no method to evaluate", argument="methods",
                                fix="give a checkpoint and/or a baseline (mean, telea, navier_stokes)")
    out = []
    for name, method in pairs:
        if not isinstance(name, str):
            raise InvalidInputError(f"a method's name must be a string, got {name!r}", argument="methods")
        if isinstance(method, str):
            try:
                out.append(_Method(name, baseline_fill(method)))
            except BaselineUnavailableError as e:
                out.append(_Method(name, None, str(e)))
        elif callable(method):
            out.append(_Method(name, method))
        else:
            raise InvalidInputError(f"method {name!r} is {method!r}, neither a baseline name nor a fill function",
                                    argument="methods")
    return out


# ----------------------------------------------------------------------------- images and masks

def _square_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """The shape an ``h x w`` image is resized to before its centre ``size x size`` square is cut."""
    scale = size / min(h, w)
    return max(size, round(h * scale)), max(size, round(w * scale))


def square_image(rgb: np.ndarray, size: int) -> np.ndarray:
    """``(H, W, 3)`` uint8 -> ``(size, size, 3)``: the shorter side resized to ``size`` (bicubic),
    then the centre square."""
    from .data.datasets import _crop_flip, _resize

    rgb = _resize(rgb, *_square_shape(*rgb.shape[:2], size))
    return _crop_flip(rgb, size, "center", False, None)


def square_mask(hole: np.ndarray, size: int) -> np.ndarray:
    """``(H, W)`` bool -> ``(size, size)``: the hole of an image through :func:`square_image`'s
    resize (nearest) and centre square, so it covers the same content."""
    from PIL import Image

    from .data.datasets import _crop_flip

    h, w = _square_shape(*hole.shape, size)
    if (h, w) != hole.shape:
        hole = np.asarray(Image.fromarray(hole.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)) > 0
    return _crop_flip(hole, size, "center", False, None)


def _as_rgb(image, where: str) -> np.ndarray:
    """An (H, W, 3) / (H, W) uint8 array, or a (3, H, W) float tensor in [-1, 1] -> (H, W, 3) uint8."""
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3 or not image.dtype.is_floating_point:
            raise InvalidInputError(f"{where} is a {tuple(image.shape)} {image.dtype} tensor; a (3, H, W) float "
                                    "tensor in [-1, 1] is expected", argument="data")
        from .data.datasets import to_uint8

        return to_uint8(image)
    a = np.asarray(image)
    if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)):
        raise InvalidInputError(f"{where} is a {a.shape} {a.dtype} array; an (H, W, 3) or (H, W) uint8 array is "
                                "expected", argument="data")
    return np.array(np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a, order="C")   # a writable copy


def _as_hole(mask, h: int, w: int, where: str, size: int | None = None) -> np.ndarray:
    m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    if m.shape != (h, w):
        square = f" ({size}x{size} with size={size})" if size is not None else ""
        raise InvalidInputError(f"{where} is {m.shape}, its image {h}x{w}{square}", argument="masks",
                                fix="give one (H, W) mask per image, of its size (1 = hole)")
    return m > 0.5 if m.dtype != bool else m


class _Skip(Exception):
    """An image left out of the evaluation (with a warning saying why)."""


class _Masks:
    """The hole of each image: from a generator and (seed, index), mask files, or given arrays."""

    def __init__(self, masks, seed: int):
        from .data.masks import MASK_FILE_EXTENSIONS, MASKS, FileMask, make_mask_generator

        self.seed, self.files, self.given, self.by_name = int(seed), None, None, None
        if isinstance(masks, str) and masks in MASKS and masks != "file":
            self.generator, self.description = make_mask_generator(masks), masks
        elif isinstance(masks, (str, os.PathLike)):
            path = Path(masks)
            if not path.is_dir():
                kinds = ", ".join(k for k in MASKS if k != "file")
                raise InvalidInputError(f"{str(masks)!r} is neither a mask kind nor a folder", argument="masks",
                                        fix=f"choose {kinds}, or give a folder of mask images")
            try:
                self.files = FileMask(path)
            except ValueError as e:
                raise InputNotFoundError(f"no mask images in {path}", argument="masks",
                                         fix=f"give a folder of mask images ({', '.join(MASK_FILE_EXTENSIONS)})") from e
            self.root, self.generator, self.description = path, None, f"files in {path}"
        elif callable(masks):
            self.generator, self.description = masks, getattr(masks, "name", type(masks).__name__)
        else:
            try:
                self.given = list(masks)
            except TypeError:
                raise InvalidInputError(f"must be a mask kind, a folder, a mask generator or a list of masks, got "
                                        f"{masks!r}", argument="masks") from None
            self.generator, self.description = None, "given"

    def bind(self, names: Sequence[str], readable: Callable[[int], bool] | None = None) -> None:
        """Pair mask files with the images: by name (:func:`fastinpaint.data.masks.match_by_stem`:
        ``masks/dir/a.png`` for image ``dir/a.jpg``) when any image has one, else in sorted order
        (image i, mask i) when there are as many masks as images. Among images named by their
        masks, one without a mask is an error, unless it cannot be read (``readable(position)``
        False): it is skipped then, as it would be anyway."""
        if self.given is not None and len(self.given) != len(names):
            raise InvalidInputError(f"{len(self.given)} masks for {len(names)} images", argument="masks",
                                    fix="give one mask per image")
        if self.files is None:
            return
        from .data.masks import match_by_stem

        found = match_by_stem(names, self.root, argument="masks", what="mask")
        if any(f is not None for f in found):
            for position, (name, f) in enumerate(zip(names, found)):
                if f is None and (readable is None or readable(position)):
                    raise InputNotFoundError(f"no mask for {name} in {self.root}, though other images have one",
                                             argument="masks", fix="name every mask like its image, or none of them "
                                                                   "(then they are taken in sorted order)")
            index = {path: k for k, path in enumerate(self.files.files)}
            self.by_name = [index[f] if f is not None else None for f in found]
            self.description = f"files in {self.root}, named like the images"
        elif len(self.files) != len(names):
            raise InvalidInputError(f"{len(self.files)} masks in {self.root} for {len(names)} images, and no mask is "
                                    "named like an image", argument="masks",
                                    fix="name each mask like its image (a.png or a.jpg for a.jpg), or give as many "
                                        "masks as images (then taken in sorted order)")
        else:
            self.description = f"files in {self.root}, in sorted order"

    def __call__(self, index: int, h: int, w: int, size: int | None = None) -> np.ndarray:
        """The hole of image ``index`` (its place in the list of images) of ``h x w`` pixels as
        read, ``(h, w)`` bool; with ``size``, of the image brought to ``size x size``
        (:func:`square_image`): a drawn mask is drawn at that size, a mask file (or a given mask
        of the image's size) goes through the image's resize and crop (:func:`square_mask`)."""
        if self.given is not None:
            mask = self.given[index]
            if size is not None and tuple(np.shape(mask)[-2:]) == (size, size):   # given for the square
                return _as_hole(mask, size, size, f"masks[{index}]")
            hole = _as_hole(mask, h, w, f"masks[{index}]", size)
        elif self.files is not None:
            k = self.by_name[index] if self.by_name is not None else index
            if k is None:   # an unreadable image, skipped before this
                raise _Skip("no mask is named like it")
            try:
                hole = self.files.load(k, h, w)[0].numpy() > 0.5   # stretched to the image, nearest
            except OSError as e:
                raise _Skip(str(e)) from e
        else:
            h, w = (size, size) if size is not None else (h, w)
            return _as_hole(self.generator(h, w, mask_rng(self.seed, index)), h, w, "a generated mask")
        return hole if size is None else square_mask(hole, size)


def _folder(root: Path) -> tuple[list[str], Callable[[int], np.ndarray]]:
    from .data.datasets import IMAGE_EXTENSIONS, _load_rgb, _scan

    if not root.exists():
        raise InputNotFoundError(f"{root} does not exist", argument="data",
                                 fix="give a folder of images (png, jpg, webp, bmp; searched recursively), or 'demo'")
    if not root.is_dir():
        raise InvalidInputError(f"{root} is not a folder", argument="data",
                                fix="give a folder of images (png, jpg, webp, bmp; searched recursively), or 'demo'")
    names = _scan(root, IMAGE_EXTENSIONS)
    if not names:
        raise InputNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {root}", argument="data",
                                 fix="give a folder that holds images (searched recursively), or 'demo'")
    return names, lambda i: _load_rgb(str(root / names[i]))


def _source(images) -> tuple[str, list[str], Callable[[int], object]]:
    """(description, names, load(position)) of "demo", a folder, or a list of images."""
    if isinstance(images, str) and images == "demo":
        from .data.datasets import DEMO_PHOTOS, _demo_photo

        return "demo", list(DEMO_PHOTOS), lambda i: _demo_photo(DEMO_PHOTOS[i])
    if isinstance(images, (str, os.PathLike)):
        names, load = _folder(Path(images))
        return str(images), names, load
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim in (2, 3):
        images = [images]
    try:
        images = list(images)
    except TypeError:
        raise InvalidInputError(f"must be 'demo', a folder or a list of images, got {images!r}",
                                argument="data") from None
    if not images:
        raise InvalidInputError("no image to evaluate", argument="data")
    return "given images", [str(i) for i in range(len(images))], lambda i: images[i]


# ----------------------------------------------------------------------------- statistics

def mean_ci95(values) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``values`` and the 95% confidence interval of that mean,
    ``mean +- t(0.975, n - 1) * s / sqrt(n)`` with Student's t and the sample standard
    deviation ``s``; the interval is (nan, nan) for fewer than two values or a non-finite one."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(v.mean())
    if v.size < 2 or not np.isfinite(v).all():
        return mean, math.nan, math.nan
    from scipy import stats

    half = float(stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return mean, mean - half, mean + half


@dataclasses.dataclass
class MethodSummary:
    """One method's results: ``mean[metric]`` over its images and ``ci95[metric]`` = (low,
    high); ``fid`` over the set (None when not computed). ``available`` False: ``reason`` says why
    (a baseline whose package is missing), and there are no numbers."""

    name: str
    available: bool = True
    reason: str | None = None
    n: int = 0
    mean: dict = dataclasses.field(default_factory=dict)
    ci95: dict = dataclasses.field(default_factory=dict)
    fid: float | None = None


def _finite(x):
    return x if isinstance(x, float) and math.isfinite(x) else None


@dataclasses.dataclass
class Evaluation:
    """What :func:`evaluate` returns. ``rows``: one dict per image and method (``image``,
    ``index``, ``method``, ``hole_fraction`` and the metrics); ``methods``: name ->
    :class:`MethodSummary`; ``images``: the names evaluated; ``skipped``: (name, why) of the
    images left out; ``samples``: the grid's images (``name``, ``image``, ``hole``,
    ``outputs[method]``, uint8 / bool arrays); ``notes``: what was not computed and why."""

    methods: dict
    rows: list
    images: list
    skipped: list
    samples: list
    notes: list
    settings: dict
    metrics: tuple

    def means(self) -> dict:
        """method -> metric -> mean over the images (``fid`` too when computed), for every
        available method."""
        out = {}
        for name, s in self.methods.items():
            if s.available:
                out[name] = dict(s.mean, **({"fid": s.fid} if s.fid is not None else {}))
        return out

    def _cell(self, s: MethodSummary, key: str) -> str:
        if key == "fid":
            return "-" if s.fid is None else _FORMATS["fid"].format(s.fid)
        mean, (low, high) = s.mean[key], s.ci95[key]
        text = _FORMATS[key].format(mean)
        if math.isfinite(low):
            text += " ± " + _FORMATS[key].format((high - low) / 2)
        return text

    def table(self) -> str:
        """The markdown report: the means with their 95% confidence intervals, and mmagic's columns."""
        keys = [k for k in self.metrics] + (["fid"] if any(s.fid is not None for s in self.methods.values()) else [])
        st = self.settings
        lines = [f"data: {st['data']} ({len(self.images)} image{'' if len(self.images) == 1 else 's'}"
                 + (f", {len(self.skipped)} skipped" if self.skipped else "") + f"); masks: {st['masks']}"
                 + (f", seed {st['seed']}" if st.get("seeded") else "")
                 + f"; size: {st['size'] or 'each image its own'}", ""]
        mmagic = ("As open-mmlab/mmagic's model zoo reports it (l1 error: mean absolute error on the 0-255 scale "
                  "over the whole image):")
        for title, cols in (("", keys), (mmagic, [MMAGIC_L1, "psnr", "ssim"])):
            if title:
                lines += ["", title, ""]
            lines.append("| method | images | " + " | ".join(LABELS[k] for k in cols) + " |")
            lines.append("|---|---:|" + "---:|" * len(cols))
            for s in self.methods.values():
                if s.available:
                    lines.append(f"| {s.name} | {s.n} | " + " | ".join(self._cell(s, k) for k in cols) + " |")
                else:
                    lines.append(f"| {s.name} | - | unavailable: {s.reason} |" + " |" * (len(cols) - 1))
        lines += ["", "Means over the images, ± the half-width of the 95% confidence interval of the mean "
                      "(Student's t, n - 1 degrees of freedom). L1 and hole L1 in [0, 1] units."]
        lines += [f"Note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """The summary as JSON-ready values (a non-finite number, or an interval of one image, is None)."""
        methods = {}
        for name, s in self.methods.items():
            entry = {"available": s.available, "reason": s.reason, "images": s.n}
            if s.available:
                entry["metrics"] = {k: {"mean": _finite(s.mean[k]), "ci95_low": _finite(s.ci95[k][0]),
                                        "ci95_high": _finite(s.ci95[k][1])} for k in s.mean}
                entry["fid"] = _finite(s.fid) if s.fid is not None else None
                entry["mmagic"] = {"l1_error": _finite(s.mean[MMAGIC_L1]), "psnr": _finite(s.mean["psnr"]),
                                   "ssim": _finite(s.mean["ssim"])}
            methods[name] = entry
        return {"settings": self.settings, "images": self.images,
                "skipped": [{"image": n, "reason": r} for n, r in self.skipped], "methods": methods,
                "notes": self.notes,
                "conventions": {
                    "ci95": "mean +- t(0.975, n-1) * sample std / sqrt(n) over images (Student's t)",
                    "metrics": "per image on the 8-bit output pasted into the holes; PSNR (dB) and SSIM on [0, 1] "
                               "images; l1 and l1_hole in [0, 1] units; fid over the whole set",
                    "mmagic": "l1_error = mean absolute error on the 0-255 scale over the whole image "
                              "(open-mmlab/mmagic's model zoo), with PSNR and SSIM"}}

    def write(self, out, overwrite: bool = False) -> dict:
        """Write ``per_image.csv``, ``summary.json``, ``summary.md`` and ``grid.png`` (a header of
        the column names, then masked input | each available method | ground truth, one row per
        sample image) into the folder ``out``; returns their paths. A folder that holds a report
        already (any of :data:`REPORT_FILES`) is refused unless ``overwrite`` (its report files are
        replaced; other files are left alone)."""
        out = check_out(out, overwrite)
        out.mkdir(parents=True, exist_ok=True)
        if overwrite and not self.samples and (out / "grid.png").exists():
            (out / "grid.png").unlink()   # the old report's
        columns = ["image", "index", "method", "hole_fraction", *self.metrics, MMAGIC_L1]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        paths = {"csv": out / "per_image.csv", "json": out / "summary.json", "markdown": out / "summary.md"}
        _write_text(paths["csv"], buffer.getvalue())
        _write_text(paths["json"], json.dumps(self.to_dict(), indent=2) + "\n")
        _write_text(paths["markdown"], "# fastinpaint evaluate\n\n" + self.table() + "\n")
        if self.samples:
            paths["grid"] = out / "grid.png"
            _write_grid(paths["grid"], self.samples,
                        [n for n, s in self.methods.items() if s.available])
        return paths


def check_out(out, overwrite: bool = False) -> Path:
    """``out`` as a Path, refused (naming ``out``) when it is a file or inside one, or, unless
    ``overwrite``, when it holds a report already (any of :data:`REPORT_FILES`)."""
    from .errors import OutputExistsError, check_folder

    out = Path(out)
    check_folder(out, argument="out", what="the report")
    found = [name for name in REPORT_FILES if (out / name).exists()]
    if found and not overwrite:
        raise OutputExistsError(f"{out} already holds a report ({', '.join(found)})", argument="out",
                                fix="add --overwrite to replace it, or give another --out")
    return out


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _label_font():
    from PIL import ImageFont

    return ImageFont.load_default()


def grid_label(text: str, width: int) -> str:
    """``text`` as the grid's header shows it in ``width`` pixels: whole, or its end after "..."
    (a run's path keeps its last part)."""
    font = _label_font()
    if font.getlength(text) <= width:
        return text
    for start in range(1, len(text)):
        short = "..." + text[start:]
        if font.getlength(short) <= width:
            return short
    return ""


def grid_header_height() -> int:
    """The height of the grid's header row (the column names), in pixels."""
    return _label_font().getbbox("Ag/_")[3] + 2 * GRID_GAP


def _cell_shape(h: int, w: int) -> tuple[int, int]:
    """A grid cell's (height, width) for an image of ``h x w``: taller ones scaled to :data:`GRID_HEIGHT`."""
    return (h, w) if h <= GRID_HEIGHT else (GRID_HEIGHT, max(1, round(w * GRID_HEIGHT / h)))


def grid_columns(samples: list, methods: list) -> tuple[list, list]:
    """(labels, widths) of the grid's columns: masked input, each method, ground truth; a
    column is as wide as its widest cell, or its label and a margin, up to :data:`GRID_LABEL_WIDTH`."""
    labels = ["masked input", *methods, "ground truth"]
    cell = max((_cell_shape(*s["image"].shape[:2])[1] for s in samples), default=1)
    font = _label_font()
    widths = [max(cell, min(GRID_LABEL_WIDTH, math.ceil(font.getlength(t)) + 2 * GRID_GAP)) for t in labels]
    return labels, widths


def _write_grid(path: Path, samples: list, methods: list) -> None:
    from PIL import Image, ImageDraw

    from .inpaint import _save

    gap = GRID_GAP
    labels, widths = grid_columns(samples, methods)
    lefts = [sum(widths[:k]) + gap * k for k in range(len(widths))]
    head = grid_header_height()
    rows = []
    for s in samples:
        masked = s["image"].copy()
        masked[s["hole"]] = 255   # holes white
        cells = [masked] + [s["outputs"][m] for m in methods] + [s["image"]]
        h, w = _cell_shape(*cells[0].shape[:2])
        if (h, w) != cells[0].shape[:2]:
            cells = [np.asarray(Image.fromarray(c).resize((w, h), Image.Resampling.BICUBIC)) for c in cells]
        rows.append(cells)
    canvas = np.full((head + sum(r[0].shape[0] for r in rows) + gap * (len(rows) - 1), lefts[-1] + widths[-1], 3),
                     255, np.uint8)
    top = head
    for cells in rows:
        for left, cell in zip(lefts, cells):
            canvas[top:top + cell.shape[0], left:left + cell.shape[1]] = cell
        top += cells[0].shape[0] + gap
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for left, width, text in zip(lefts, widths, labels):
        draw.text((left, gap), grid_label(text, width), fill=(0, 0, 0), font=_label_font())
    _save(path, np.asarray(image), "RGB")


# ----------------------------------------------------------------------------- evaluation

def _optional_metrics(lpips, fid, notes: list):
    """(InpaintingMetrics for one image at a time, a first FID metric or None)."""
    from .metrics import InpaintingMetrics, MetricUnavailableError, _build_fid

    for name, value in (("lpips", lpips), ("fid", fid)):
        if value not in (True, False, "auto"):
            raise InvalidInputError(f"must be True, False or 'auto', got {value!r}", argument=name)
    per_image = None
    if lpips:
        try:
            per_image = InpaintingMetrics(lpips=True)
        except MetricUnavailableError as e:
            if lpips is True:
                raise MetricUnavailableError(e.message, argument="lpips",
                                             fix="provide that file, or give --lpips auto (LPIPS when its weights "
                                                 "are there) or --lpips no") from e
            notes.append(f"LPIPS not computed: {e}")
    if per_image is None:
        per_image = InpaintingMetrics()
    fid_metric = None
    if fid:
        try:
            fid_metric = _build_fid(None, {})
        except MetricUnavailableError as e:
            if fid is True:
                raise MetricUnavailableError(e.message, argument="fid",
                                             fix="provide that file, or give --fid auto (FID when its weights are "
                                                 "there) or --fid no") from e
            notes.append(f"FID not computed: {e}")
    return per_image, fid_metric


def evaluate(data, methods, masks="medium", seed: int = 0, *, size: int | None = None, lpips=False, fid=False,
             device=None, grid_images: int = GRID_IMAGES, progress: bool = False) -> Evaluation:
    """Evaluate ``methods`` on the images of ``data`` with the same holes for every method (see the module
    docstring for the protocol).

    Args:
        data: ``"demo"`` (the photographs scikit-image ships, whole), a folder of images
            (recursive, sorted; an unreadable file is skipped with a warning), or a list of
            ``(H, W, 3)`` uint8 arrays or ``(3, H, W)`` float tensors in [-1, 1].
        methods: baseline names (:data:`BASELINES`), or a dict name -> baseline name or
            ``fill(image, mask) -> output`` (``(1, 3, H, W)`` in [-1, 1], ``(1, 1, H, W)`` with
            1 = hole, on ``device``), e.g. ``{"mine": checkpoint_fill("runs/x"), "telea": "telea"}``.
        masks: a mask kind of :data:`fastinpaint.data.masks.MASKS` (``thin``, ``medium``,
            ``thick``, ``free_form``, ``center``, ``block``, ``region``), drawn per image from
            ``mask_rng(seed, index)``; a mask generator ``gen(height, width, rng)``; a folder of
            mask files (named like the images, whatever the extension; else, when there are as
            many masks as images, taken in sorted order; stretched to each image, nearest); or a
            list of ``(H, W)`` masks, one per image (1 = hole). With ``size``, a mask file or a
            given mask of its image's size goes through the image's resize and crop.
        seed: the masks' seed.
        size: bring every image to ``size x size`` first (:func:`square_image`); None: each its own.
        lpips, fid: False, True (an error when their weights are not on disk) or "auto".
        device: where images, generators and metrics run (default cuda when available).
        grid_images: how many images (the first ones) :meth:`Evaluation.write` shows in the grid.
        progress: show a progress bar (tqdm).
    """
    from .data.datasets import to_uint8

    if size is not None and (isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < MIN_SIDE):
        raise InvalidInputError(f"must be an integer >= {MIN_SIDE} (SSIM's window), got {size!r}", argument="size")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InvalidInputError(f"must be an integer >= 0, got {seed!r}", argument="seed")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    description, names, load = _source(data)
    hole_of = _Masks(masks, seed)
    hole_of.bind(names, readable=lambda position: _readable(load, position))
    chosen = _methods(methods)
    notes: list[str] = []
    per_image, first_fid = _optional_metrics(lpips, fid, notes)
    per_image = per_image.to(device)
    fids = {}
    if first_fid is not None:
        from .metrics import _build_fid

        for m in (m for m in chosen if m.fill is not None):
            fids[m.name] = (first_fid if not fids else _build_fid(None, {})).to(device)
    keys = tuple(k for k in METRICS if k in per_image.metrics)
    values: dict[str, list[dict]] = {m.name: [] for m in chosen}
    rows, evaluated, skipped, samples = [], [], [], []
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(names), desc="evaluate", unit="image", dynamic_ncols=True)
        except ImportError:
            bar = None
    try:
        for position, name in enumerate(names):
            if bar is not None:
                bar.update(1)
            try:
                rgb, hole = _image_and_hole(load, hole_of, position, name, size)
            except _Skip as e:
                skipped.append((name, str(e)))
                warnings.warn(f"skipping {name}: {e}", RuntimeWarning, stacklevel=2)
                continue
            index = position   # the masks' index: the image's place in the list, skipped ones counted
            x = torch.from_numpy(rgb).permute(2, 0, 1)[None].to(device, torch.float32).div(127.5).sub(1)
            m = torch.from_numpy(hole)[None, None].to(device, torch.float32)
            sample = {"name": name, "image": rgb, "hole": hole, "outputs": {}} \
                if len(samples) < grid_images else None
            for method in chosen:
                if method.fill is None:
                    continue
                with torch.no_grad():
                    out = method.fill(x, m)
                if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(x.shape):
                    raise ValueError(f"method {method.name!r} returned "
                                     f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}"
                                     f" for an image of {tuple(x.shape)}")
                if not bool(torch.isfinite(out).all()):
                    raise ValueError(f"method {method.name!r} returned NaN or infinite values for {name}")
                filled = np.where(hole[..., None], to_uint8(out[0]), rgb)   # known pixels exactly
                y = torch.from_numpy(filled).permute(2, 0, 1)[None].to(device, torch.float32).div(127.5).sub(1)
                per_image.update(y, x, m)
                scores = per_image.compute()
                per_image.reset()
                scores[MMAGIC_L1] = 255.0 * scores["l1"]
                values[method.name].append(scores)
                rows.append({"image": name, "index": index, "method": method.name,
                             "hole_fraction": float(hole.mean()), **{k: scores[k] for k in (*keys, MMAGIC_L1)}})
                if method.name in fids:
                    fids[method.name].update((x + 1) / 2, real=True)
                    fids[method.name].update((y + 1) / 2, real=False)
                if sample is not None:
                    sample["outputs"][method.name] = filled
            evaluated.append(name)
            if sample is not None:
                samples.append(sample)
    finally:
        if bar is not None:
            bar.close()
    if not evaluated:
        raise InputNotFoundError(f"none of the {len(names)} images of {description} could be evaluated "
                                 f"({skipped[0][0]}: {skipped[0][1]})", argument="data",
                                 fix="give readable images of at least 11x11 pixels")
    summaries = {}
    for method in chosen:
        s = MethodSummary(method.name, method.fill is not None, method.reason, len(values[method.name]))
        for k in (*keys, MMAGIC_L1):
            mean, low, high = mean_ci95(v[k] for v in values[method.name])
            if s.available:
                s.mean[k], s.ci95[k] = mean, (low, high)
        if method.name in fids:
            if len(evaluated) >= 2:
                s.fid = float(fids[method.name].compute())
        summaries[method.name] = s
    if fids and len(evaluated) < 2:
        notes.append("FID not computed: it needs at least two images")
    settings = {"data": description, "masks": hole_of.description, "seed": int(seed),
                "seeded": hole_of.generator is not None, "size": size}
    return Evaluation(summaries, rows, evaluated, skipped, samples, notes, settings, keys)


def _readable(load, position: int) -> bool:
    """Whether image ``position`` of ``load`` can be read (an unreadable one is skipped)."""
    from .data.datasets import UnreadableImageError

    try:
        load(position)
    except UnreadableImageError:
        return False
    return True


def _image_and_hole(load, hole_of: _Masks, position: int, name: str, size: int | None):
    """(rgb, hole) of one image, or _Skip saying why it is left out."""
    from .data.datasets import UnreadableImageError

    try:
        rgb = _as_rgb(load(position), f"image {name}")
    except UnreadableImageError as e:
        raise _Skip(str(e)) from e
    read_h, read_w = rgb.shape[:2]
    if size is not None:
        rgb = square_image(rgb, size)
        if not rgb.flags.writeable:   # a view of a read-only photo
            rgb = rgb.copy()
    h, w = rgb.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise _Skip(f"{w}x{h} is smaller than {MIN_SIDE}x{MIN_SIDE} pixels (SSIM's window); give --size")
    hole = hole_of(position, read_h, read_w, size)
    share = float(hole.mean())
    if share == 0.0 or share == 1.0:
        raise _Skip("its mask marks no hole" if share == 0.0 else "its mask marks every pixel as a hole")
    return rgb, hole
