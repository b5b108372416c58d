"""Hole-mask generators for training and evaluating inpainting networks.

Convention: ``1`` marks a hole (missing pixel), ``0`` a known pixel. Every generator is
called as ``generator(height, width, rng)`` and returns a ``torch.float32`` tensor of shape
``(1, height, width)`` whose values are exactly 0 or 1. All randomness comes from ``rng``
(a :class:`numpy.random.Generator`), so the same generator state always gives the same mask.

* :class:`CenterMask` -- the Context Encoders central square (Pathak et al., 2016).
* :class:`RandomBlockMask` -- a union of random rectangles with a bounded hole fraction.
* :class:`RandomRegionMask` -- smooth random blobs (thresholded, upscaled uniform noise).
* :class:`FreeFormMask` -- DeepFill v2 free-form brush strokes plus a box (Yu et al., 2019).
* :class:`LamaMask` -- LaMa's evaluation masks, ``thin``, ``medium`` and ``thick`` (Suvorov et al.,
  2022): :class:`LamaThinMask`, :class:`LamaMediumMask`, :class:`LamaThickMask`.
* :class:`FileMask` -- masks read from image files.

``make_mask_generator(kind, **options)`` builds one by name from :data:`MASKS`.

Mask files (:class:`FileMask`, ``fastinpaint inpaint``) are read by one rule,
:func:`hole_from_image`: a hole is every pixel brighter than half the file's brightest value,
brightness being the largest colour channel (white or any colour on black, 0/1 or 0/255,
gray, RGB or 16-bit); a file with transparency is read by its alpha channel instead
(painted, alpha > 0, = hole; fully transparent = known).
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InvalidInputError, check_keywords

__all__ = ["CenterMask", "RandomBlockMask", "RandomRegionMask", "FreeFormMask", "LamaMask", "LamaThinMask",
           "LamaMediumMask", "LamaThickMask", "LAMA_SETTINGS", "FileMask", "MASKS", "make_mask_generator",
           "MASK_FILE_EXTENSIONS", "hole_from_image", "mask_files", "match_by_stem"]

MASK_FILE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")

PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------- argument checks

def _int_arg(name: str, value, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _float_arg(name: str, value, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")
    return value


def _range_arg(name: str, value, cast, low=None, high=None) -> tuple:
    """A ``(lo, hi)`` pair with ``lo <= hi``, both inside ``[low, high]``."""
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high), got {value!r}") from None
    lo = cast(f"{name}[0]", lo)
    hi = cast(f"{name}[1]", hi)
    for i, v in enumerate((lo, hi)):
        if (low is not None and v < low) or (high is not None and v > high):
            raise ValueError(f"{name}[{i}] must lie in [{low}, {high}], got {v}")
    if lo > hi:
        raise ValueError(f"{name} must satisfy low <= high, got {value!r}")
    return lo, hi


def _check_size(height, width) -> tuple[int, int]:
    return _int_arg("height", height, 1), _int_arg("width", width, 1)


def _check_rng(rng) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (e.g. numpy.random.default_rng(seed)), "
                        f"got {type(rng).__name__}")
    return rng


def _to_tensor(mask: np.ndarray) -> torch.Tensor:
    """A boolean/0-1 (H, W) array -> float32 tensor (1, H, W) of exact zeros and ones."""
    return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None]


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


# --------------------------------------------------------------------------- Context Encoders

class CenterMask:
    """Context Encoders' central hole (Pathak et al., 2016).

    For a ``image x image`` picture the target is the central ``hole x hole`` square
    (rows/cols 32..96 for 64 in 128); the network is given that square shrunk by the
    ``overlap`` band on every side (rows/cols 36..92). Other sizes scale each axis
    proportionally (the hole stays half of the image by default, centred). ``rng`` is
    accepted for a uniform interface and ignored: the mask is deterministic.
    """

    name = "center"

    def __init__(self, hole: int = 64, overlap: int = 4, image: int = 128, overlap_weight: float = 10.0):
        self.image = _int_arg("image", image, 1)
        self.hole = _int_arg("hole", hole, 1)
        if self.hole > self.image:
            raise ValueError(f"hole ({self.hole}) must not be larger than image ({self.image})")
        self.overlap = _int_arg("overlap", overlap, 0)
        if 2 * self.overlap >= self.hole:
            raise ValueError(f"overlap ({self.overlap}) must be less than half of hole ({self.hole})")
        self.overlap_weight = _float_arg("overlap_weight", overlap_weight, 0.0)

    def __repr__(self) -> str:
        return (f"CenterMask(hole={self.hole}, overlap={self.overlap}, image={self.image}, "
                f"overlap_weight={self.overlap_weight})")

    def _bounds(self, size: int, axis: str) -> tuple[int, int, int]:
        """(start, stop, overlap) of the target square along one axis of ``size`` pixels."""
        hole = _round_half_up(self.hole * size / self.image)
        overlap = _round_half_up(self.overlap * size / self.image)
        if hole < 1 or hole - 2 * overlap < 1:
            raise ValueError(f"{axis}={size} is too small for a {self.hole}/{self.image} centre hole "
                             f"with a {self.overlap}-pixel overlap")
        start = (size - hole) // 2
        return start, start + hole, overlap

    def _regions(self, height, width):
        height, width = _check_size(height, width)
        t0, t1, oh = self._bounds(height, "height")
        l0, l1, ow = self._bounds(width, "width")
        target = np.zeros((height, width), dtype=bool)
        target[t0:t1, l0:l1] = True
        hole = np.zeros((height, width), dtype=bool)
        hole[t0 + oh:t1 - oh, l0 + ow:l1 - ow] = True
        return target, hole

    def __call__(self, height: int, width: int, rng: np.random.Generator | None = None) -> torch.Tensor:
        if rng is not None:
            _check_rng(rng)
        return _to_tensor(self._regions(height, width)[1])

    def target_region(self, height: int, width: int) -> torch.Tensor:
        """The full central square the network has to reconstruct (hole plus overlap band)."""
        return _to_tensor(self._regions(height, width)[0])

    def loss_weights(self, height: int, width: int) -> torch.Tensor:
        """Per-pixel weights of the reconstruction loss: ``overlap_weight`` (10) on the overlap
        band, 1 on the hole given to the network, 0 outside the target square."""
        target, hole = self._regions(height, width)
        weights = np.zeros((height, width), dtype=np.float32)
        weights[target] = self.overlap_weight
        weights[hole] = 1.0
        return torch.from_numpy(weights)[None]


# --------------------------------------------------------------------------- random rectangles

class RandomBlockMask:
    """A union of 1..``max_blocks`` random, possibly overlapping rectangles.

    Each side of a rectangle is drawn uniformly between ``min_size`` and ``max_size`` times the
    image side, at a uniform position. A rectangle that would push the union above
    ``max_fraction`` of the image is shrunk (both sides by 0.75, same centre) until it fits; the
    first one always fits (it can shrink down to one pixel), so the mask is never empty and never
    above ``max_fraction``.
    """

    name = "block"

    def __init__(self, max_blocks: int = 5, max_fraction: float = 0.25, min_size: float = 0.05,
                 max_size: float = 0.5):
        self.max_blocks = _int_arg("max_blocks", max_blocks, 1)
        self.max_fraction = _float_arg("max_fraction", max_fraction, 0.0, 1.0, low_open=True)
        self.min_size = _float_arg("min_size", min_size, 0.0, 1.0, low_open=True)
        self.max_size = _float_arg("max_size", max_size, 0.0, 1.0, low_open=True)
        if self.min_size > self.max_size:
            raise ValueError(f"min_size ({self.min_size}) must not exceed max_size ({self.max_size})")

    def __repr__(self) -> str:
        return (f"RandomBlockMask(max_blocks={self.max_blocks}, max_fraction={self.max_fraction}, "
                f"min_size={self.min_size}, max_size={self.max_size})")

    def __call__(self, height: int, width: int, rng: np.random.Generator) -> torch.Tensor:
        height, width = _check_size(height, width)
        _check_rng(rng)
        budget = int(math.floor(self.max_fraction * height * width + 1e-9))
        if budget < 1:
            raise ValueError(f"max_fraction={self.max_fraction} of a {height}x{width} image is less than "
                             "one pixel")
        mask = np.zeros((height, width), dtype=bool)
        covered = 0
        for _ in range(int(rng.integers(1, self.max_blocks + 1))):
            bh = rng.uniform(self.min_size, self.max_size) * height
            bw = rng.uniform(self.min_size, self.max_size) * width
            bh, bw = max(1, min(height, _round_half_up(bh))), max(1, min(width, _round_half_up(bw)))
            cy = rng.uniform(0, height)  # the rectangle's centre, kept while it shrinks
            cx = rng.uniform(0, width)
            while True:
                top = min(max(0, int(round(cy - bh / 2))), height - bh)
                left = min(max(0, int(round(cx - bw / 2))), width - bw)
                window = mask[top:top + bh, left:left + bw]
                new = bh * bw - int(np.count_nonzero(window))
                if covered + new <= budget:
                    window[...] = True
                    covered += new
                    break
                if bh == 1 and bw == 1:  # cannot shrink further: drop this rectangle
                    break
                bh, bw = max(1, int(bh * 0.75)), max(1, int(bw * 0.75))
        return _to_tensor(mask)


# --------------------------------------------------------------------------- smooth random regions

class RandomRegionMask:
    """Smooth random blobs, after the Context Encoders random-region trainer.

    Uniform noise on a coarse grid (``cells`` cells along the shorter image side, drawn per
    sample from the inclusive range) is upscaled bicubically, cropped at a random sub-cell
    offset and thresholded. The threshold is chosen per sample: a hole fraction is drawn
    uniformly from ``coverage`` and exactly that many of the lowest-valued pixels become the
    hole, so the fraction always falls inside ``coverage`` (up to one pixel of rounding on
    images too small to hit the range exactly, which are refused).
    """

    name = "region"

    def __init__(self, coverage: Sequence[float] = (0.2, 0.3), cells: Sequence[int] = (4, 10)):
        self.coverage = _range_arg("coverage", coverage, lambda n, v: _float_arg(n, v), 0.0, 1.0)
        if self.coverage[0] <= 0.0 or self.coverage[1] >= 1.0:
            raise ValueError(f"coverage must lie strictly between 0 and 1, got {coverage!r}")
        self.cells = _range_arg("cells", cells, lambda n, v: _int_arg(n, v), 1, None)

    def __repr__(self) -> str:
        return f"RandomRegionMask(coverage={self.coverage}, cells={self.cells})"

    def __call__(self, height: int, width: int, rng: np.random.Generator) -> torch.Tensor:
        height, width = _check_size(height, width)
        _check_rng(rng)
        n = height * width
        lo_count = int(math.ceil(self.coverage[0] * n - 1e-9))
        hi_count = int(math.floor(self.coverage[1] * n + 1e-9))
        if lo_count > hi_count or hi_count < 1:
            raise ValueError(f"coverage={self.coverage} cannot be met on a {height}x{width} image")

        cells = int(rng.integers(self.cells[0], self.cells[1] + 1))
        cell = min(height, width) / cells  # pixels per noise cell
        gh, gw = int(math.ceil(height / cell)) + 2, int(math.ceil(width / cell)) + 2
        noise = torch.from_numpy(rng.random((gh, gw), dtype=np.float32))[None, None]
        big_h, big_w = max(height, int(round(gh * cell))), max(width, int(round(gw * cell)))
        smooth = F.interpolate(noise, size=(big_h, big_w), mode="bicubic", align_corners=False)[0, 0].numpy()
        top = int(rng.integers(0, big_h - height + 1))
        left = int(rng.integers(0, big_w - width + 1))
        smooth = smooth[top:top + height, left:left + width]

        count = _round_half_up(rng.uniform(*self.coverage) * n)
        count = min(max(count, lo_count, 1), hi_count)
        flat = np.zeros(n, dtype=bool)
        flat[np.argpartition(smooth.ravel(), count - 1)[:count]] = True
        return _to_tensor(flat.reshape(height, width))


# --------------------------------------------------------------------------- DeepFill v2 free-form

def _draw_capsule(canvas: np.ndarray, p0, p1, radius: float) -> None:
    """Set every pixel whose centre lies within ``radius`` of the segment p0-p1 (x, y)."""
    height, width = canvas.shape
    (x0, y0), (x1, y1) = p0, p1
    xa = max(0, int(math.floor(min(x0, x1) - radius)))
    xb = min(width - 1, int(math.ceil(max(x0, x1) + radius)))
    ya = max(0, int(math.floor(min(y0, y1) - radius)))
    yb = min(height - 1, int(math.ceil(max(y0, y1) + radius)))
    if xa > xb or ya > yb:
        return
    xs = np.arange(xa, xb + 1, dtype=np.float64)[None, :] - x0
    ys = np.arange(ya, yb + 1, dtype=np.float64)[:, None] - y0
    dx, dy = x1 - x0, y1 - y0
    length2 = dx * dx + dy * dy
    if length2 > 0:
        t = np.clip((xs * dx + ys * dy) / length2, 0.0, 1.0)
        ex, ey = xs - t * dx, ys - t * dy
    else:
        ex, ey = xs, ys
    canvas[ya:yb + 1, xa:xb + 1] |= ex * ex + ey * ey <= radius * radius


class FreeFormMask:
    """DeepFill v2 free-form masks (Yu et al., 2019): brush strokes, optionally plus a box.

    1..``max_strokes`` strokes. A stroke starts uniformly in the image and has ``num_vertices``
    in ``[min_vertices, max_vertices)`` steps; with ``a_min = mean_angle - U(0, angle_range)``
    and ``a_max = mean_angle + U(0, angle_range)`` each step's angle is ``U(a_min, a_max)``,
    mirrored to ``2*pi - angle`` on even steps (a zig-zag); its length is ``Normal(r, r/2)``
    clipped to ``[0, 2r]`` with ``r = sqrt(H^2 + W^2) / 8``; points are clipped to the image.
    The polyline is drawn with a brush of integer width in ``[min_width, max_width)`` pixels at
    DeepFill's ``resolution`` (256: a 256x256 image), scaled with the image as the step length
    is, by ``sqrt(H^2 + W^2) / (resolution * sqrt(2))`` (at least one pixel), with round joints
    and ends: every size gets the same share of hole as 256 does, and a 256x256 image DeepFill's
    pixels exactly (``resolution=None``: the widths in pixels at every size, as DeepFill draws
    them). Each stroke is flipped left-right and/or top-bottom with probability 1/2
    (``flip=False`` turns that off, leaving DeepFill's rightward drift). With ``box=True`` the
    mask is united with a box of half the image height and width at a random position whose four
    sides are each pulled in by up to 1/16 of the image side.
    """

    name = "free_form"

    def __init__(self, max_strokes: int = 3, min_vertices: int = 4, max_vertices: int = 12,
                 min_width: int = 12, max_width: int = 40, angle_range: float = 2 * math.pi / 15,
                 box: bool = True, mean_angle: float = 2 * math.pi / 5, flip: bool = True,
                 resolution: int | None = 256):
        self.max_strokes = _int_arg("max_strokes", max_strokes, 1)
        self.min_vertices = _int_arg("min_vertices", min_vertices, 1)
        self.max_vertices = _int_arg("max_vertices", max_vertices, 1)
        if self.max_vertices <= self.min_vertices:
            raise ValueError(f"max_vertices ({self.max_vertices}) must be greater than min_vertices "
                             f"({self.min_vertices}): the count is drawn from [min_vertices, max_vertices)")
        self.min_width = _int_arg("min_width", min_width, 1)
        self.max_width = _int_arg("max_width", max_width, 1)
        if self.max_width < self.min_width:
            raise ValueError(f"max_width ({self.max_width}) must not be less than min_width ({self.min_width})")
        self.angle_range = _float_arg("angle_range", angle_range, 0.0, math.pi)
        self.mean_angle = _float_arg("mean_angle", mean_angle)
        if not isinstance(box, bool):
            raise ValueError(f"box must be a bool, got {box!r}")
        if not isinstance(flip, bool):
            raise ValueError(f"flip must be a bool, got {flip!r}")
        self.box, self.flip = box, flip
        self.resolution = None if resolution is None else _int_arg("resolution", resolution, 1)

    def __repr__(self) -> str:
        return (f"FreeFormMask(max_strokes={self.max_strokes}, min_vertices={self.min_vertices}, "
                f"max_vertices={self.max_vertices}, min_width={self.min_width}, max_width={self.max_width}, "
                f"angle_range={self.angle_range}, box={self.box}, mean_angle={self.mean_angle}, "
                f"flip={self.flip}, resolution={self.resolution})")

    def width_scale(self, height: int, width: int) -> float:
        """What the brush widths are multiplied by on a ``height`` x ``width`` image (1 at
        ``resolution`` x ``resolution``, always 1 with ``resolution=None``)."""
        if self.resolution is None:
            return 1.0
        return math.hypot(height, width) / math.hypot(self.resolution, self.resolution)

    def _stroke(self, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
        radius = math.sqrt(height * height + width * width) / 8
        num_vertices = int(rng.integers(self.min_vertices, self.max_vertices))
        a_min = self.mean_angle - rng.uniform(0, self.angle_range)
        a_max = self.mean_angle + rng.uniform(0, self.angle_range)
        angles = rng.uniform(a_min, a_max, size=num_vertices)
        angles[0::2] = 2 * math.pi - angles[0::2]
        points = [(rng.uniform(0, width - 1), rng.uniform(0, height - 1))]
        for angle in angles:
            step = float(np.clip(rng.normal(radius, radius / 2), 0.0, 2 * radius))
            x, y = points[-1]
            points.append((min(max(x + step * math.cos(angle), 0.0), width - 1.0),
                           min(max(y + step * math.sin(angle), 0.0), height - 1.0)))
        brush = int(rng.uniform(self.min_width, self.max_width)) if self.max_width > self.min_width \
            else self.min_width
        brush = max(1.0, brush * self.width_scale(height, width))
        stroke = np.zeros((height, width), dtype=bool)
        for p0, p1 in zip(points[:-1], points[1:]):
            _draw_capsule(stroke, p0, p1, brush / 2)  # segment of the brush width, round ends = joints
        flip_lr, flip_tb = rng.random() < 0.5, rng.random() < 0.5
        if self.flip and flip_lr:
            stroke = stroke[:, ::-1]
        if self.flip and flip_tb:
            stroke = stroke[::-1, :]
        return stroke

    def _box(self, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros((height, width), dtype=bool)
        bh, bw = height // 2, width // 2
        top = int(rng.integers(0, height - bh + 1))
        left = int(rng.integers(0, width - bw + 1))
        st, sb = rng.integers(0, height // 16 + 1, size=2)
        sl, sr = rng.integers(0, width // 16 + 1, size=2)
        mask[top + st:top + bh - sb, left + sl:left + bw - sr] = True
        return mask

    def __call__(self, height: int, width: int, rng: np.random.Generator) -> torch.Tensor:
        height, width = _check_size(height, width)
        _check_rng(rng)
        mask = np.zeros((height, width), dtype=bool)
        for _ in range(int(rng.integers(1, self.max_strokes + 1))):
            mask |= self._stroke(height, width, rng)
        if self.box:
            mask |= self._box(height, width, rng)
        return _to_tensor(mask)


# --------------------------------------------------------------------------- LaMa evaluation masks

# LaMa's published mask settings (its configs/data_gen/random_{thin,medium,thick}_{256,512}.yaml), in
# pixels of an image whose shorter side is the resolution (256 or 512):
#   strokes: (fewest, most) strokes; max_width, max_len: a segment's brush width is 5 + randint(max_width)
#   and its length 10 + randint(max_len) pixels; max_angle: a segment's direction is 0.01 + randint(max_angle)
#   radians; box_weight: a mask is boxes instead of strokes with probability box_weight / (1 + box_weight);
#   boxes: (fewest, most) boxes, each side drawn from box_size (inclusive), box_margin pixels from the border.
LAMA_SETTINGS = {
    ("thin", 256): dict(strokes=(4, 50), max_width=10, max_len=40, max_angle=4, box_weight=0.0),
    ("thin", 512): dict(strokes=(4, 70), max_width=20, max_len=100, max_angle=4, box_weight=0.0),
    ("medium", 256): dict(strokes=(4, 5), max_width=50, max_len=100, max_angle=4, box_weight=0.3,
                          boxes=(1, 5), box_size=(10, 50), box_margin=0),
    ("medium", 512): dict(strokes=(4, 10), max_width=100, max_len=200, max_angle=4, box_weight=0.3,
                          boxes=(1, 5), box_size=(30, 150), box_margin=0),
    ("thick", 256): dict(strokes=(1, 5), max_width=100, max_len=200, max_angle=4, box_weight=0.3,
                         boxes=(1, 3), box_size=(30, 150), box_margin=10),
    ("thick", 512): dict(strokes=(1, 5), max_width=250, max_len=450, max_angle=4, box_weight=0.3,
                         boxes=(1, 4), box_size=(30, 300), box_margin=10),
}
LAMA_SEGMENTS = 5        # a stroke has 1..5 straight segments
LAMA_MAX_ATTEMPTS = 100  # redraws allowed for a mask over max_hole


def _lama_strokes(height: int, width: int, settings: dict, scale: float, rng: np.random.Generator) -> np.ndarray:
    """LaMa's irregular strokes: chains of straight segments with round ends and joints."""
    mask = np.zeros((height, width), dtype=bool)
    lo, hi = settings["strokes"]
    for i in range(int(rng.integers(lo, hi + 1))):
        x, y = int(rng.integers(width)), int(rng.integers(height))
        for _ in range(1 + int(rng.integers(LAMA_SEGMENTS))):
            angle = 0.01 + int(rng.integers(settings["max_angle"]))
            if i % 2 == 0:   # every other stroke mirrored, as LaMa does
                angle = 2 * math.pi - angle
            length = (10 + int(rng.integers(settings["max_len"]))) * scale
            brush = (5 + int(rng.integers(settings["max_width"]))) * scale
            # LaMa's axes: x moves by sin(angle), y by cos(angle); ends truncated to whole pixels and
            # clipped to [0, side] (a point on the far border lies just outside the image)
            x1 = min(max(int(x + length * math.sin(angle)), 0), width)
            y1 = min(max(int(y + length * math.cos(angle)), 0), height)
            _draw_capsule(mask, (x, y), (x1, y1), brush / 2)
            x, y = x1, y1
    return mask


def _lama_boxes(height: int, width: int, settings: dict, scale: float, rng: np.random.Generator) -> np.ndarray:
    """LaMa's rectangles: ``boxes`` axis-aligned boxes, each ``box_margin`` from the border."""
    mask = np.zeros((height, width), dtype=bool)
    margin = _round_half_up(settings["box_margin"] * scale)
    if min(height, width) - 2 * margin < 1:
        margin = 0
    hi = min(_round_half_up(settings["box_size"][1] * scale), height - 2 * margin, width - 2 * margin)
    hi = max(hi, 1)
    lo = min(max(_round_half_up(settings["box_size"][0] * scale), 1), hi)
    fewest, most = settings["boxes"]
    for _ in range(int(rng.integers(fewest, most + 1))):
        bw, bh = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
        left = int(rng.integers(margin, width - margin - bw + 1))
        top = int(rng.integers(margin, height - margin - bh + 1))
        mask[top:top + bh, left:left + bw] = True
    return mask


class LamaMask:
    """LaMa's evaluation masks (Suvorov et al., WACV 2022): ``kind`` "thin", "medium" or "thick".

    A mask is either strokes or, with probability ``box_weight / (1 + box_weight)`` (0.3 / 1.3,
    about 23%, for medium and thick; never for thin), boxes, with the settings of
    :data:`LAMA_SETTINGS`:

    * strokes: a count drawn from ``strokes`` (inclusive); each starts at a uniform pixel and has
      1..5 straight segments, each ``10 + randint(max_len)`` pixels long, ``5 + randint(max_width)``
      pixels wide (a round brush), in the direction ``0.01 + randint(4)`` radians (mirrored to
      ``2 pi - angle`` on every other stroke); a segment's end is clipped to the image;
    * boxes: a count drawn from ``boxes``; each side drawn from ``box_size`` (inclusive), placed
      uniformly at least ``box_margin`` pixels from the border.

    A mask covering more than ``max_hole`` of the image (LaMa: 50%) is drawn again. The lengths are
    LaMa's pixels at its resolution, 256 or 512, scaled by ``min(height, width) / resolution``, so
    the masks cover the same share of any image; ``resolution="auto"`` takes LaMa's 512 settings for
    images whose shorter side is at least 512 and its 256 ones below. The masks are drawn directly
    on the image (LaMa draws them on the image resized to that shorter side, then crops a square).
    """

    KINDS = ("thin", "medium", "thick")
    name = "lama"

    def __init__(self, kind: str = "thin", resolution: Union[int, str] = "auto", max_hole: float = 0.5):
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {', '.join(self.KINDS)}, got {kind!r}")
        if resolution != "auto" and (isinstance(resolution, bool) or resolution not in (256, 512)):
            raise ValueError(f"resolution must be 256, 512 or 'auto', got {resolution!r}")
        self.kind, self.resolution = kind, resolution
        self.max_hole = _float_arg("max_hole", max_hole, 0.0, 1.0, low_open=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, resolution={self.resolution!r}, max_hole={self.max_hole})"

    def settings(self, height: int, width: int) -> tuple[dict, float]:
        """(LaMa's settings, the scale of its pixels) for an image of ``height`` x ``width``."""
        height, width = _check_size(height, width)
        resolution = self.resolution
        if resolution == "auto":
            resolution = 512 if min(height, width) >= 512 else 256
        return LAMA_SETTINGS[(self.kind, resolution)], min(height, width) / resolution

    def draw(self, height: int, width: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
        """(hole, "strokes" or "boxes"): the bool ``(H, W)`` mask and what it is made of."""
        height, width = _check_size(height, width)
        settings, scale = self.settings(height, width)
        _check_rng(rng)
        odds = settings["box_weight"] / (1.0 + settings["box_weight"])
        for _ in range(LAMA_MAX_ATTEMPTS):
            if odds > 0 and rng.random() < odds:
                mask, made_of = _lama_boxes(height, width, settings, scale, rng), "boxes"
            else:
                mask, made_of = _lama_strokes(height, width, settings, scale, rng), "strokes"
            if mask.mean() <= self.max_hole:
                return mask, made_of
        raise ValueError(f"could not draw a {self.kind} mask covering at most max_hole={self.max_hole} of a "
                         f"{height}x{width} image in {LAMA_MAX_ATTEMPTS} draws")

    def __call__(self, height: int, width: int, rng: np.random.Generator) -> torch.Tensor:
        return _to_tensor(self.draw(height, width, rng)[0])


class LamaThinMask(LamaMask):
    """LaMa's thin masks: 4-50 thin strokes (widths 5-14 pixels at 256); :class:`LamaMask`."""

    name = "thin"

    def __init__(self, resolution: Union[int, str] = "auto", max_hole: float = 0.5):
        super().__init__("thin", resolution, max_hole)


class LamaMediumMask(LamaMask):
    """LaMa's medium masks: 4-5 strokes (widths 5-54 at 256), or 1-5 boxes of 10-50 pixels; :class:`LamaMask`."""

    name = "medium"

    def __init__(self, resolution: Union[int, str] = "auto", max_hole: float = 0.5):
        super().__init__("medium", resolution, max_hole)


class LamaThickMask(LamaMask):
    """LaMa's thick masks: 1-5 strokes (widths 5-104 at 256), or 1-3 boxes of 30-150 pixels; :class:`LamaMask`."""

    name = "thick"

    def __init__(self, resolution: Union[int, str] = "auto", max_hole: float = 0.5):
        super().__init__("thick", resolution, max_hole)


# --------------------------------------------------------------------------- masks from files

def hole_from_image(image, threshold: float = 0.5) -> tuple[np.ndarray, str]:
    """The hole map of a mask image (a PIL image): ``(hole, read_by)``, ``hole`` a bool
    ``(H, W)`` array (True = hole), ``read_by`` "alpha" or "brightness".

    The rule, for every mask form:
      * an image with transparency (an alpha channel with a pixel that is not fully opaque,
        or a palette or gray image with a transparent colour) is read by its alpha: painted
        (alpha > 0) = hole, fully transparent = known, as a layer of strokes exported from an
        image editor;
      * any other image by brightness, the largest of a pixel's colour channels: a hole is a
        pixel brighter than ``threshold`` times the image's brightest value, so white or any
        colour on black are holes, and a 0/1 file reads like a 0/255 one (8-bit, 16-bit or
        float; a JPEG's compression noise stays below the half).
    An image that is black (or fully transparent) everywhere has no hole.
    """
    im = image
    if im.mode == "P" or ("transparency" in im.info and im.mode in ("L", "RGB", "I", "I;16")):
        im = im.convert("RGBA" if im.mode in ("P", "RGB") else "LA")
    elif im.mode in ("RGBa", "La", "PA"):
        im = im.convert("RGBA")
    elif im.mode == "1":
        im = im.convert("L")
    elif im.mode not in ("L", "LA", "RGB", "RGBA", "I", "I;16", "I;16B", "I;16L", "F"):
        im = im.convert("RGB")   # CMYK, YCbCr, ...
    bands = im.getbands()
    values = np.asarray(im)
    if values.ndim == 2:
        values = values[..., None]
    read_by = "brightness"
    if "A" in bands:
        alpha = values[..., bands.index("A")]
        colour = np.delete(values, bands.index("A"), axis=-1)
        if (alpha < 255).any():
            return alpha > 0, "alpha"
        values = colour
    values = values.max(axis=-1).astype(np.float64)
    peak = float(values.max()) if values.size else 0.0
    if peak <= 0:
        return np.zeros(values.shape, dtype=bool), read_by
    return values > threshold * peak, read_by



def mask_files(folder) -> list[Path]:
    """The mask image files (:data:`MASK_FILE_EXTENSIONS`) under ``folder``, recursive, sorted."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in MASK_FILE_EXTENSIONS)


def match_by_stem(names: Sequence[str], folder, argument: str = "mask", what: str | None = None) -> list:
    """The file of ``folder`` (:func:`mask_files`) for each image of ``names`` (paths relative
    to the images' folder), or None where there is none: the file with the image's stem, its
    relative path without the extension (``masks/sub/astro.jpg`` for ``sub/astro.png``).

    The one rule that pairs images with their masks and sketches (``fastinpaint inpaint`` and
    ``evaluate``). Two files of the stem an image needs (``astro.png`` and ``astro.jpg``) are an
    :class:`~fastinpaint.errors.InvalidInputError` naming ``argument``; ``what`` names the files
    in it (default: ``argument``)."""
    folder = Path(folder)
    by_stem: dict[str, list[Path]] = {}
    for path in mask_files(folder):
        by_stem.setdefault(path.relative_to(folder).with_suffix("").as_posix(), []).append(path)
    out = []
    for name in names:
        found = by_stem.get(Path(name).with_suffix("").as_posix(), [])
        if len(found) > 1:
            raise InvalidInputError(f"{' and '.join(str(p) for p in found)} are both named like the image {name}",
                                    argument=argument,
                                    fix=f"keep one {what or argument} per image (they are matched by name, "
                                        "whatever the extension)")
        out.append(found[0] if found else None)
    return out


def _collect_files(paths) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    try:
        paths = list(paths)
    except TypeError:
        raise InvalidInputError(f"must be a path or a list of paths, got {paths!r}", argument="paths") from None
    if not paths:
        raise InvalidInputError("paths is empty", argument="paths", fix="give mask image files or folders")
    files: list[Path] = []
    for entry in paths:
        if not isinstance(entry, (str, os.PathLike)):
            raise InvalidInputError(f"must hold file or folder paths, got {entry!r}", argument="paths")
        path = Path(entry)
        if path.is_dir():
            files.extend(mask_files(path))
        elif path.is_file():
            files.append(path)
        else:
            raise InvalidInputError(f"{str(path)!r} does not exist", argument="paths",
                                    fix="give existing mask files or folders")
    if not files:
        raise InvalidInputError(f"no mask images ({', '.join(MASK_FILE_EXTENSIONS)}) found in "
                                f"{[str(p) for p in paths]}", argument="paths")
    return files


class FileMask:
    """Masks read from image files, one picked per call by ``rng``.

    ``paths`` is a file or folder or a list of them; folders are searched recursively for
    png/jpg/jpeg/bmp/webp files (sorted, so the choice depends only on ``rng``). A file is
    read by :func:`hole_from_image` (values above ``threshold`` times the file's largest value
    are holes: white or any colour on black, 0/1 or 0/255; or the painted pixels of a file with
    transparency), or, with ``invert=True`` (files that draw known pixels white), the other
    pixels; then resized to ``(height, width)`` with nearest-neighbour sampling.
    """

    name = "file"

    def __init__(self, paths: Union[PathLike, Iterable[PathLike]], threshold: float = 0.5, invert: bool = False):
        self.threshold = _float_arg("threshold", threshold, 0.0, 1.0, high_open=True)
        if not isinstance(invert, bool):
            raise ValueError(f"invert must be a bool, got {invert!r}")
        self.invert = invert
        self.files = _collect_files(paths)

    def __repr__(self) -> str:
        return f"FileMask({len(self.files)} files, threshold={self.threshold}, invert={self.invert})"

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int, height: int, width: int) -> torch.Tensor:
        """The mask of ``self.files[index]`` at ``(height, width)``."""
        from PIL import Image

        height, width = _check_size(height, width)
        path = self.files[index]
        try:
            with Image.open(path) as image:
                image.load()
                hole = hole_from_image(image, self.threshold)[0]
        except Exception as exc:  # PIL raises a zoo of errors for broken files
            raise OSError(f"cannot read mask file {str(path)!r}: {exc}") from exc
        if self.invert:
            hole = ~hole
        if hole.shape != (height, width):
            small = Image.fromarray(hole.astype(np.uint8) * 255)
            hole = np.asarray(small.resize((width, height), Image.NEAREST)) > 0
        return _to_tensor(hole)

    def __call__(self, height: int, width: int, rng: np.random.Generator) -> torch.Tensor:
        height, width = _check_size(height, width)
        _check_rng(rng)
        return self.load(int(rng.integers(len(self.files))), height, width)


# --------------------------------------------------------------------------- registry

MASKS = {
    "center": CenterMask,
    "block": RandomBlockMask,
    "region": RandomRegionMask,
    "free_form": FreeFormMask,
    "thin": LamaThinMask,
    "medium": LamaMediumMask,
    "thick": LamaThickMask,
    "file": FileMask,
}


def make_mask_generator(kind: str, **options):
    """Build the mask generator registered as ``kind`` in :data:`MASKS` with ``options``."""
    try:
        cls = MASKS[kind]
    except (KeyError, TypeError):
        raise InvalidInputError(f"unknown mask kind {kind!r}", argument="mask",
                                fix=f"choose one of {', '.join(sorted(MASKS))}") from None
    if cls is FileMask and "paths" not in options:
        raise InvalidInputError("the 'file' mask kind reads mask images and none were given", argument="mask",
                                fix="name them with --set mask_options.paths=FOLDER (a folder or file of masks)")
    check_keywords(cls, options, what=f"mask kind {kind!r}", argument="mask_options")
    return cls(**options)
