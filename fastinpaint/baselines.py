"""The classical inpainting baselines a trained network is compared with, as ``fill(image, mask)``
functions on ``(B, 3, H, W)`` images in [-1, 1] and ``(B, 1, H, W)`` masks (1 = hole), the
form the trainer's validation and ``fastinpaint evaluate`` take:

* ``mean``: every hole pixel gets the mean colour of the image's known pixels
  (:func:`fastinpaint.metrics.mean_fill`);
* ``telea``: OpenCV's fast-marching inpainting (Telea, 2004), radius :data:`OPENCV_RADIUS`;
* ``navier_stokes``: OpenCV's Navier-Stokes inpainting (Bertalmio et al., 2001), same radius.

The OpenCV ones need ``opencv-python-headless`` (in the ``train`` and ``eval`` extras); without
it :func:`baseline_fill` raises :class:`BaselineUnavailableError`, which callers report as the
baseline being unavailable, never as a failure.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .errors import InvalidInputError

__all__ = ["BASELINES", "OPENCV_RADIUS", "BaselineUnavailableError", "baseline_fill", "opencv_fill"]

BASELINES = ("mean", "telea", "navier_stokes")
OPENCV_RADIUS = 3   # pixels around a hole pixel that OpenCV's inpainting reads

Fill = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class BaselineUnavailableError(RuntimeError):
    """A baseline whose package is not installed here (OpenCV for telea and navier_stokes)."""


def _cv2():
    try:
        import cv2
    except (ImportError, OSError) as e:   # not installed, or a build missing its system libraries
        raise BaselineUnavailableError(
            f"OpenCV is not importable here ({type(e).__name__}: {e}); pip install opencv-python-headless "
            "(in the fastinpaint[train] and [eval] extras)") from e
    return cv2


def opencv_fill(image: torch.Tensor, mask: torch.Tensor, method: str = "telea",
                radius: int = OPENCV_RADIUS) -> torch.Tensor:
    """OpenCV's inpainting (``method`` "telea" or "navier_stokes") of ``image`` ``(B, 3, H, W)`` in
    [-1, 1] at ``mask`` ``(B, 1, H, W)`` (1 = hole), on the image rounded to 8 bits; the known
    pixels are kept. Raises :class:`BaselineUnavailableError` when OpenCV is not installed."""
    cv2 = _cv2()
    flags = {"telea": cv2.INPAINT_TELEA, "navier_stokes": cv2.INPAINT_NS}
    if method not in flags:
        raise ValueError(f"method must be 'telea' or 'navier_stokes', got {method!r}")
    from .data.datasets import to_uint8
    from .metrics import composite

    filled = []
    for x, m in zip(image, mask):
        hole = (m[0].detach().cpu().numpy() > 0.5).astype(np.uint8) * 255
        out = cv2.inpaint(np.ascontiguousarray(to_uint8(x)), hole, float(radius), flags[method])
        filled.append(torch.from_numpy(out).permute(2, 0, 1))
    out = torch.stack(filled).to(image.device, torch.float32).div(127.5).sub(1)
    return composite(out, image.float(), mask.float())


def baseline_fill(name: str) -> Fill:
    """The ``fill(image, mask)`` of the baseline ``name`` (:data:`BASELINES`); raises
    :class:`BaselineUnavailableError` when its package is not installed."""
    if name == "mean":
        from .metrics import mean_fill

        return mean_fill
    if name in ("telea", "navier_stokes"):
        _cv2()

        def fill(image, mask):
            return opencv_fill(image, mask, name)

        return fill
    raise InvalidInputError(f"unknown baseline {name!r}", argument="baseline", fix=f"choose {', '.join(BASELINES)}")
