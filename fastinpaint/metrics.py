"""Evaluation metrics for inpainting: PSNR, SSIM, L1 (whole image and hole only),
and optionally FID and LPIPS, all accumulated over batches through torchmetrics.

Conventions
-----------
* Images are float tensors ``(B, 3, H, W)`` in ``[-1, 1]``; masks are ``(B, 1, H, W)``
  with ``1 = hole`` (pixels the network fills in) and ``0 = known``.
* Before any metric, both images are clamped to ``[-1, 1]`` (values further than
  ``range_tolerance`` outside that range are rejected as a likely convention error)
  and mapped to ``[0, 1]`` with ``(x + 1) / 2``. So:

  - ``psnr``: dB with ``data_range = 1`` on the ``[0, 1]`` images (the same number as
    ``data_range = 2`` on the ``[-1, 1]`` images). Computed per image and averaged
    over images (not the PSNR of the pooled MSE). Identical images give ``inf``.
  - ``ssim``: Gaussian window (sigma 1.5, 11 taps), ``K1 = 0.01``, ``K2 = 0.03``,
    ``data_range = 1``, the SSIM map's 5-pixel border left out, per image averaged over
    channels and pixels, then averaged over images (see :class:`SSIM`). This matches scikit-image's
    ``structural_similarity(..., data_range=1, channel_axis=-1, gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False)``. Images need ``H, W >= 11``.
  - ``l1``: mean absolute error over every pixel and channel of every image, in
    ``[0, 1]`` units (half the error measured on ``[-1, 1]`` images).
  - ``l1_hole``: mean absolute error over hole pixels only (all channels), weighted by
    pixel across all images and batches: ``sum(|a - b| * m) / (3 * sum(m))``, in
    ``[0, 1]`` units. When no hole pixel was seen at all it is ``nan`` (not 0, which
    would read as a perfect score).
  - ``fid`` (optional): torchmetrics' ``FrechetInceptionDistance`` (2048-d pool features
    of torch-fidelity's InceptionV3), real = ``target``, fake = the evaluated images.
    Needs at least two images in total.
  - ``lpips`` (optional): torchmetrics' ``LearnedPerceptualImagePatchSimilarity`` (AlexNet
    by default) on the ``[-1, 1]`` images, averaged over images.

* What is evaluated: by default the *composite*
  ``output * mask + target * (1 - mask)`` (the network's output pasted into the hole,
  the known pixels taken from the target), which is what inpainting papers report.
  ``InpaintingMetrics(on_composite=False)`` evaluates the raw ``output`` instead.
  ``l1_hole`` is the same either way; ``l1``, ``psnr`` and ``ssim`` are not.

Distributed: every metric is a torchmetrics ``Metric``, so under ``torch.distributed``
``compute()`` gathers/sums the states of all ranks (torchmetrics' own sync; pass
``process_group=...`` etc. through ``**metric_kwargs``). Every rank must call
``compute()``.

FID and LPIPS never download anything. They are built only from files already on disk,
found as follows, else :class:`MetricUnavailableError` says what is missing:

* FID needs the ``torch-fidelity`` package and its InceptionV3 weights file
  ``weights-inception-2015-12-05-6726825d.pth``, taken from the ``fid_weights``
  argument, else the ``FASTINPAINT_FID_WEIGHTS`` environment variable, else
  ``<torch.hub.get_dir()>/checkpoints/`` (where torch-fidelity's own download puts it).
* LPIPS needs ``torchvision`` (its backbone) and the backbone's ImageNet weights file
  (``alexnet-owt-7be5be79.pth`` for ``net="alex"``), taken from the ``lpips_weights``
  argument, else ``FASTINPAINT_LPIPS_WEIGHTS``, else ``<torch.hub.get_dir()>/checkpoints/``.
  The small LPIPS linear layers ship inside torchmetrics.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import torch
from torchmetrics import Metric
from torchmetrics.functional.image import structural_similarity_index_measure
from torchmetrics.image import PeakSignalNoiseRatio

from .errors import UserError

__all__ = [
    "FID_WEIGHTS_ENV",
    "FID_WEIGHTS_FILENAME",
    "InpaintingMetrics",
    "mean_fill",
    "LPIPS_WEIGHTS_ENV",
    "MaskedMeanAbsoluteError",
    "MetricUnavailableError",
    "SSIM",
    "composite",
    "resolve_fid_weights",
    "resolve_lpips_weights",
]

FID_WEIGHTS_ENV = "FASTINPAINT_FID_WEIGHTS"
LPIPS_WEIGHTS_ENV = "FASTINPAINT_LPIPS_WEIGHTS"
# The file torch-fidelity's InceptionV3 downloads into torch.hub's checkpoint folder.
FID_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
# LPIPS net -> (torchvision model, torchvision weights enum, file its DEFAULT weights are saved as).
_LPIPS_BACKBONES = {
    "alex": ("alexnet", "AlexNet_Weights", "alexnet-owt-7be5be79.pth"),
    "vgg": ("vgg16", "VGG16_Weights", "vgg16-397923af.pth"),
    "squeeze": ("squeezenet1_1", "SqueezeNet1_1_Weights", "squeezenet1_1-b8a52dc0.pth"),
}
SSIM_SIGMA = 1.5
SSIM_KERNEL_SIZE = 11  # taps of the Gaussian window for sigma 1.5 (truncated at 3.5 sigma)


class MetricUnavailableError(UserError, RuntimeError):
    """An optional metric (FID, LPIPS) was asked for but its package or weights are not here
    (a :class:`fastinpaint.errors.UserError`: ``argument`` names the option that asked for it,
    where there is one)."""


# --------------------------------------------------------------------------- helpers


def composite(output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``output * mask + target * (1 - mask)``: the network's output in the hole
    (``mask == 1``), the target's known pixels elsewhere (bit-exact for a binary mask).
    A bool mask is accepted; a soft mask blends the two."""
    if mask.dtype == torch.bool:
        mask = mask.to(output.dtype)
    return output * mask + target * (1 - mask)


def mean_fill(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The trivial inpainting baseline: every hole pixel gets the mean colour of the same
    image's known pixels (per sample and channel); known pixels are kept. An image with no
    known pixel is filled with 0 (mid-grey in [-1, 1])."""
    if image.dim() != 4 or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] != image.shape[0] \
            or mask.shape[2:] != image.shape[2:]:
        raise ValueError(f"mean_fill: image (B, C, H, W) and mask (B, 1, H, W) of the same size expected, "
                         f"got {tuple(image.shape)} and {tuple(mask.shape)}")
    known = 1 - mask.to(image.dtype)
    count = known.sum(dim=(2, 3), keepdim=True)
    mean = (image * known).sum(dim=(2, 3), keepdim=True) / count.clamp_min(1)
    return composite(mean.expand_as(image), image, mask)


def _hub_checkpoint(filename: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _given_path(argument, env: str) -> tuple[Path | None, str]:
    if argument is not None:
        return Path(argument).expanduser(), "argument"
    value = os.environ.get(env, "").strip()
    if value:
        return Path(value).expanduser(), f"${env}"
    return None, ""


def resolve_fid_weights(fid_weights: str | os.PathLike | None = None) -> Path:
    """The local InceptionV3 weights file FID would use; raises MetricUnavailableError
    naming what is missing. Looks only at the file system, never the network."""
    if not _has_module("torch_fidelity"):
        raise MetricUnavailableError(
            "FID is unavailable: torchmetrics' FrechetInceptionDistance needs the `torch-fidelity` "
            "package, which is not installed (pip install torch-fidelity). It also needs the "
            f"InceptionV3 weights file {FID_WEIGHTS_FILENAME} on disk: pass "
            f"InpaintingMetrics(fid_weights=PATH), set ${FID_WEIGHTS_ENV}=PATH, or put it in "
            f"{_hub_checkpoint(FID_WEIGHTS_FILENAME).parent}. Nothing is downloaded at run time."
        )
    path, source = _given_path(fid_weights, FID_WEIGHTS_ENV)
    if path is not None:
        if not path.is_file():
            raise MetricUnavailableError(
                f"FID is unavailable: the InceptionV3 weights file given by {source} "
                f"({path}) does not exist. It should be torch-fidelity's {FID_WEIGHTS_FILENAME}."
            )
        return path
    cached = _hub_checkpoint(FID_WEIGHTS_FILENAME)
    if not cached.is_file():
        raise MetricUnavailableError(
            f"FID is unavailable: torch-fidelity's InceptionV3 weights file {FID_WEIGHTS_FILENAME} "
            f"is not on this machine (looked in {cached.parent}). Copy it there, or pass "
            f"InpaintingMetrics(fid_weights=PATH), or set ${FID_WEIGHTS_ENV}=PATH. It is published "
            "with torch-fidelity's v0.2.0 release; nothing is downloaded at run time."
        )
    return cached


def _lpips_expected_filename(net: str) -> str:
    model, enum_name, fallback = _LPIPS_BACKBONES[net]
    if _has_module("torchvision"):
        try:
            import torchvision.models as tvm

            url = getattr(tvm, enum_name).DEFAULT.url
            return os.path.basename(urlparse(url).path)
        except Exception:  # an unusual torchvision: keep the known name
            pass
    return fallback


def resolve_lpips_weights(net: str = "alex", lpips_weights: str | os.PathLike | None = None) -> Path:
    """The local backbone weights file LPIPS would use; raises MetricUnavailableError
    naming what is missing. Looks only at the file system, never the network."""
    if net not in _LPIPS_BACKBONES:
        raise ValueError(f"lpips_net must be one of {tuple(_LPIPS_BACKBONES)}, got {net!r}")
    filename = _lpips_expected_filename(net)
    how = (f"pass InpaintingMetrics(lpips_weights=PATH), set ${LPIPS_WEIGHTS_ENV}=PATH, or put it in "
           f"{_hub_checkpoint(filename).parent}")
    if not _has_module("torchvision"):
        raise MetricUnavailableError(
            "LPIPS is unavailable: torchmetrics' LearnedPerceptualImagePatchSimilarity needs the "
            "`torchvision` package for its backbone, which is not installed (pip install torchvision, "
            f"matching this torch). It also needs the backbone's ImageNet weights file {filename} "
            f"on disk: {how}. Nothing is downloaded at run time."
        )
    import torchmetrics.functional.image.lpips as tm_lpips

    linear = Path(tm_lpips.__file__).parent / "lpips_models" / f"{net}.pth"
    if not linear.is_file():
        raise MetricUnavailableError(
            f"LPIPS is unavailable: this torchmetrics install lacks its LPIPS linear-layer weights {linear}."
        )
    path, source = _given_path(lpips_weights, LPIPS_WEIGHTS_ENV)
    if path is not None:
        if not path.is_file():
            raise MetricUnavailableError(
                f"LPIPS is unavailable: the backbone weights file given by {source} ({path}) does not "
                f"exist. It should be torchvision's {filename}."
            )
        return path
    cached = _hub_checkpoint(filename)
    if not cached.is_file():
        raise MetricUnavailableError(
            f"LPIPS is unavailable: torchvision's {_LPIPS_BACKBONES[net][0]} weights file {filename} is "
            f"not on this machine (looked in {cached.parent}). To provide it, {how}. Nothing is "
            "downloaded at run time."
        )
    return cached


@contextlib.contextmanager
def _downloads_forbidden():
    """Any torch.hub download attempted inside fails instead of touching the network."""
    original = torch.hub.download_url_to_file

    def refuse(url, *args, **kwargs):
        raise MetricUnavailableError(f"refusing to download {url}: metrics only use local weights files")

    torch.hub.download_url_to_file = refuse
    try:
        yield
    finally:
        torch.hub.download_url_to_file = original


@contextlib.contextmanager
def _hub_dir_with(filename: str, path: Path):
    """A temporary torch.hub dir whose checkpoints/<filename> is ``path``, so torchvision
    loads that file as if it were its cached download."""
    previous = getattr(torch.hub, "_hub_dir", None)
    with tempfile.TemporaryDirectory(prefix="fastinpaint-hub-") as tmp:
        link = Path(tmp) / "checkpoints" / filename
        link.parent.mkdir()
        try:
            link.symlink_to(path.resolve())
        except OSError:
            shutil.copyfile(path, link)
        torch.hub.set_dir(tmp)
        try:
            yield
        finally:
            torch.hub._hub_dir = previous


def _build_fid(fid_weights, metric_kwargs) -> Metric:
    path = resolve_fid_weights(fid_weights)
    from torchmetrics.image.fid import FrechetInceptionDistance

    with _downloads_forbidden():
        return FrechetInceptionDistance(feature=2048, normalize=True,
                                        feature_extractor_weights_path=str(path), **metric_kwargs)


def _build_lpips(net, lpips_weights, metric_kwargs) -> Metric:
    path = resolve_lpips_weights(net, lpips_weights)
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    filename = _lpips_expected_filename(net)
    redirect = (_hub_dir_with(filename, path) if path != _hub_checkpoint(filename)
                else contextlib.nullcontext())
    with _downloads_forbidden(), redirect:
        return LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=False, **metric_kwargs)


# --------------------------------------------------------------------------- metrics


class MaskedMeanAbsoluteError(Metric):
    """Mean absolute error weighted by a per-pixel mask, pooled over every pixel of every
    batch: ``sum(|preds - target| * w) / (C * sum(w))``. Without a mask, the plain MAE.
    ``nan`` when the total weight is 0. States are float64 sums (reduced by summing)."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("abs_error_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weight_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        err = (preds.double() - target.double()).abs()
        if weight is None:
            self.abs_error_sum += err.sum()
            self.weight_sum += err.numel()
        else:
            weight = weight.double()
            self.abs_error_sum += (err * weight).sum()
            self.weight_sum += weight.sum() * (err.numel() // weight.numel())

    def compute(self) -> torch.Tensor:
        return self.abs_error_sum / self.weight_sum  # 0 / 0 -> nan when nothing was weighted


class SSIM(Metric):
    """Mean SSIM per image, averaged over images, with the 5-pixel border (half the
    Gaussian window) left out as in Wang et al.'s reference code and scikit-image.

    torchmetrics' ``StructuralSimilarityIndexMeasure`` averages its SSIM map over the whole
    image, border pixels computed on reflect-padded input included, so it differs from
    scikit-image by ~1e-3. This takes torchmetrics' full SSIM map (its functional form)
    and crops it. States: sum of per-image SSIMs and image count (reduced by summing).
    Inputs are in ``[0, data_range]``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, data_range: float = 1.0, sigma: float = SSIM_SIGMA, k1: float = 0.01,
                 k2: float = 0.03, **kwargs) -> None:
        super().__init__(**kwargs)
        self.data_range, self.sigma, self.k1, self.k2 = float(data_range), float(sigma), k1, k2
        self.border = int(3.5 * self.sigma + 0.5)  # the window's radius
        self.add_state("ssim_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("images", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        _, ssim_map = structural_similarity_index_measure(
            preds, target, gaussian_kernel=True, sigma=self.sigma, data_range=self.data_range,
            k1=self.k1, k2=self.k2, return_full_image=True)
        r = self.border
        per_image = ssim_map[..., r:-r, r:-r].double().mean(dim=(1, 2, 3))
        self.ssim_sum += per_image.sum()
        self.images += per_image.numel()

    def compute(self) -> torch.Tensor:
        return self.ssim_sum / self.images


def _check_image(name: str, x, tolerance: float) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor in [-1, 1], got dtype {x.dtype}")
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{name} must have shape (B, 3, H, W), got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1 - tolerance or hi > 1 + tolerance:
        raise ValueError(
            f"{name} has values in [{lo:.4g}, {hi:.4g}], outside [-1, 1] by more than "
            f"range_tolerance={tolerance}; images must be in [-1, 1] (a [0, 1] or [0, 255] image "
            "must be converted first)"
        )


def _check_inputs(output, target, mask, tolerance: float) -> None:
    _check_image("output", output, tolerance)
    _check_image("target", target, tolerance)
    if output.shape != target.shape:
        raise ValueError(f"output and target must have the same shape, got {tuple(output.shape)} "
                         f"and {tuple(target.shape)}")
    if output.device != target.device:
        raise ValueError(f"output and target are on different devices: {output.device} and {target.device}")
    b, _, h, w = output.shape
    if h < SSIM_KERNEL_SIZE or w < SSIM_KERNEL_SIZE:
        raise ValueError(f"output and target must be at least {SSIM_KERNEL_SIZE}x{SSIM_KERNEL_SIZE} "
                         f"(SSIM's window), got {h}x{w}")
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != (b, 1, h, w):
        raise ValueError(f"mask must have shape (B, 1, H, W) = {(b, 1, h, w)} to match output, "
                         f"got {tuple(mask.shape)}")
    if mask.device != output.device:
        raise ValueError(f"mask is on {mask.device} but output is on {output.device}")
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must contain only 0 (known) and 1 (hole); got other values "
                         f"(min {float(mask.min()):.4g}, max {float(mask.max()):.4g})")


class InpaintingMetrics(torch.nn.Module):
    """Accumulates inpainting metrics over batches; see the module docstring for every
    convention. ``update(output, target, mask)`` per batch, ``compute()`` for a dict of
    floats (keys ``psnr``, ``ssim``, ``l1``, ``l1_hole``, plus ``fid`` / ``lpips`` when
    enabled), ``reset()`` to start over, ``.to(device)`` to move the states.

    Args:
        fid, lpips: also compute FID / LPIPS. Raise :class:`MetricUnavailableError` at
            construction when the package or local weights file is missing; never download.
        on_composite: evaluate ``composite(output, target, mask)`` (default) rather than
            the raw ``output``.
        range_tolerance: how far outside ``[-1, 1]`` inputs may stray (they are clamped)
            before being rejected with a ValueError.
        fid_weights: local torch-fidelity InceptionV3 weights file (else ``$FASTINPAINT_FID_WEIGHTS``,
            else the torch.hub checkpoint cache).
        lpips_net: LPIPS backbone, ``"alex"`` (default), ``"vgg"`` or ``"squeeze"``.
        lpips_weights: local torchvision weights file of that backbone (else
            ``$FASTINPAINT_LPIPS_WEIGHTS``, else the torch.hub checkpoint cache).
        **metric_kwargs: passed to every torchmetrics Metric (``process_group``,
            ``sync_on_compute``, ``dist_sync_fn``, ...).
    """

    def __init__(self, *, fid: bool = False, lpips: bool = False, on_composite: bool = True,
                 range_tolerance: float = 0.1, fid_weights: str | os.PathLike | None = None,
                 lpips_net: str = "alex", lpips_weights: str | os.PathLike | None = None,
                 **metric_kwargs) -> None:
        super().__init__()
        if not (range_tolerance >= 0 and math.isfinite(range_tolerance)):
            raise ValueError(f"range_tolerance must be a finite number >= 0, got {range_tolerance}")
        self.on_composite = bool(on_composite)
        self.range_tolerance = float(range_tolerance)
        self.metrics = torch.nn.ModuleDict({
            # Per-image PSNR (dim over C, H, W), averaged over images.
            "psnr": PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3), reduction="elementwise_mean",
                                         **metric_kwargs),
            "ssim": SSIM(data_range=1.0, **metric_kwargs),
            "l1": MaskedMeanAbsoluteError(**metric_kwargs),
            "l1_hole": MaskedMeanAbsoluteError(**metric_kwargs),
        })
        if fid:
            self.metrics["fid"] = _build_fid(fid_weights, metric_kwargs)
        if lpips:
            self.metrics["lpips"] = _build_lpips(lpips_net, lpips_weights, metric_kwargs)
        self._updates = 0

    @torch.no_grad()
    def update(self, output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> None:
        _check_inputs(output, target, mask, self.range_tolerance)
        output = output.detach().float().clamp(-1, 1)
        target = target.detach().float().clamp(-1, 1)
        mask = mask.detach().float()
        pred = composite(output, target, mask) if self.on_composite else output
        pred01, target01 = (pred + 1) / 2, (target + 1) / 2
        m = self.metrics
        m["psnr"].update(pred01, target01)
        m["ssim"].update(pred01, target01)
        m["l1"].update(pred01, target01)
        # In the hole the composite equals the output, so this is the same either way.
        m["l1_hole"].update((output + 1) / 2, target01, mask)
        if "fid" in m:
            m["fid"].update(target01, real=True)
            m["fid"].update(pred01, real=False)
        if "lpips" in m:
            m["lpips"].update(pred, target)
        self._updates += 1

    def compute(self) -> dict[str, float]:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if self._updates == 0 and not distributed:
            raise RuntimeError("InpaintingMetrics.compute() called before any update()")
        return {name: float(metric.compute()) for name, metric in self.metrics.items()}

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()
        self._updates = 0

    def forward(self, output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> None:
        """Same as :meth:`update` (accumulates; returns nothing)."""
        self.update(output, target, mask)
