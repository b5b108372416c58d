"""The spatially-correlative loss (F-LSeSim, Zheng, Cham and Cai, CVPR 2021) as a structure
loss for inpainting: it compares the self-similarity maps of two images' deep features, so
it constrains structure and not appearance.

* FSeSim (``learned=False``): features of a frozen extractor (VGG16's relu3_1, relu4_1 and
  relu4_3 by default), compared with :func:`fastinpaint.functional.spatial_correlative_distance`.
* LSeSim (``learned=True``): each layer's features go through a head of two 1x1
  convolutions (C -> max(32, C // 4), ReLU, 1x1), trained with the patchwise InfoNCE loss
  (:meth:`SpatialCorrelativeLoss.head_loss`): positives an image and an augmented view
  of it, the "other" image the same image flipped in both axes; the generator is then
  trained with the ``cos`` (or ``l1``) distance through the heads.

The loss is a weighted sum over layers (default: the mean). ``forward(prediction,
target)`` computes ``distance(maps(target), maps(prediction))``: the top-quarter selection
runs on the prediction's rows, as the public code selects on the generated image's.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from ..ops.self_similarity.op import sample_query_index, spatial_correlative_distance

# torchvision's vgg16().features, by index: ("conv", in, out) or ("relu",) or ("pool",)
_VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
VGG16_LAYERS = {  # name -> index of its output in vgg16().features
    "relu1_1": 1, "relu1_2": 3, "relu2_1": 6, "relu2_2": 8, "relu3_1": 11, "relu3_2": 13, "relu3_3": 15,
    "relu4_1": 18, "relu4_2": 20, "relu4_3": 22, "relu5_1": 25, "relu5_2": 27, "relu5_3": 29,
}
VGG16_CHANNELS = {name: (64 if i < 4 else 128 if i < 9 else 256 if i < 16 else 512) for name, i in VGG16_LAYERS.items()}
VGG16_WEIGHTS_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet checkpoint
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def default_vgg16_weights_path() -> str:
    """Where torchvision keeps the checkpoint: ``<torch.hub.get_dir()>/checkpoints/vgg16-397923af.pth``."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", VGG16_WEIGHTS_FILE)


class VGG16Features(nn.Module):
    """Frozen VGG16 feature taps, built layer for layer as torchvision's ``vgg16().features``
    (so its checkpoint loads; torchvision itself is not needed) and loaded from a local
    file: never downloaded. Input images in ``input_range`` (the datasets' [-1, 1] by
    default), normalised with ImageNet's statistics inside.

    Raises FileNotFoundError naming the checkpoint when the weights are not on disk.
    """

    def __init__(self, layers: Sequence[str] = ("relu3_1", "relu4_1", "relu4_3"),
                 weights_path: Optional[str] = None, input_range=(-1.0, 1.0)):
        super().__init__()
        unknown = [name for name in layers if name not in VGG16_LAYERS]
        if unknown or not layers:
            raise ValueError(f"layers must be names among {sorted(VGG16_LAYERS)}, got {list(layers)!r}")
        self.layers = list(layers)
        self.taps = [VGG16_LAYERS[name] for name in self.layers]
        modules, cin = [], 3
        for v in _VGG16_CFG:
            if v == "M":
                modules.append(nn.MaxPool2d(2, 2))
            else:
                modules += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=False)]
                cin = v
        self.features = nn.Sequential(*modules[:max(self.taps) + 1])
        path = weights_path or default_vgg16_weights_path()
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"VGG16 weights not found at {path}: the spatially-correlative loss never downloads at run time. "
                f"Put torchvision's ImageNet checkpoint {VGG16_WEIGHTS_FILE} there (or pass weights_path=...), "
                "or pass your own frozen extractor=...")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        state = {k: v for k, v in state.items() if int(k.split(".")[0]) < len(self.features)}
        self.features.load_state_dict(state)
        self.input_range = (float(input_range[0]), float(input_range[1]))
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @property
    def channels(self) -> list[int]:
        return [VGG16_CHANNELS[name] for name in self.layers]

    def train(self, mode: bool = True):  # frozen: always in eval mode
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        lo, hi = self.input_range
        x = ((x - lo) / (hi - lo) - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        out, taps = [], set(self.taps)
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in taps:
                out.append(x)
        return [out[sorted(self.taps).index(t)] for t in self.taps]


def _head(channels: int) -> nn.Sequential:
    out = max(32, channels // 4)
    head = nn.Sequential(nn.Conv2d(channels, out, 1), nn.ReLU(), nn.Conv2d(out, out, 1))
    for m in head:
        if isinstance(m, nn.Conv2d):  # the public code's init: normal(0, 0.02), zero bias
            nn.init.normal_(m.weight, 0.0, 0.02)
            nn.init.zeros_(m.bias)
    return head


def color_jitter(x: torch.Tensor, strength: float = 0.5, generator: Optional[torch.Generator] = None,
                 input_range=(-1.0, 1.0)) -> torch.Tensor:
    """Random brightness, contrast and saturation per image (factors in [1 - s, 1 + s]): the
    augmented view of LSeSim's InfoNCE training."""
    lo, hi = input_range
    B = x.shape[0]
    u = torch.rand(3, B, 1, 1, 1, generator=generator).to(device=x.device, dtype=x.dtype) * 2 * strength + (1 - strength)
    y = (x - lo) / (hi - lo)
    y = y * u[0]
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    y = (y - mean) * u[1] + mean
    gray = (0.299 * y[:, :1] + 0.587 * y[:, 1:2] + 0.114 * y[:, 2:3])
    y = (y - gray) * u[2] + gray
    return y.clamp(0, 1) * (hi - lo) + lo


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"an object of type {type(value).__name__}"


def _feature_list(extractor, feats, x: torch.Tensor) -> list[torch.Tensor]:
    """``feats`` (what ``extractor`` returned for the batch ``x``) as a list of feature maps,
    or a clear error naming the extractor and what it must return."""
    name = type(extractor).__name__ if isinstance(extractor, nn.Module) else \
        getattr(extractor, "__qualname__", type(extractor).__name__)
    must = ("it must return a list or tuple of (B, C, H, W) feature maps, one per layer, B being the "
            f"input's batch size ({x.shape[0]}); or one (B, C, H, W) tensor for a single layer")
    if isinstance(feats, torch.Tensor):
        feats = [feats]   # one layer
    elif isinstance(feats, dict):
        feats = list(feats.values())
    elif isinstance(feats, (list, tuple)):
        feats = list(feats)
    else:
        raise TypeError(f"SpatialCorrelativeLoss: the extractor {name} returned {_describe(feats)}; {must}")
    if not feats:
        raise ValueError(f"SpatialCorrelativeLoss: the extractor {name} returned no feature map; {must}")
    for i, f in enumerate(feats):
        if not isinstance(f, torch.Tensor) or f.dim() != 4 or f.shape[0] != x.shape[0]:
            raise ValueError(f"SpatialCorrelativeLoss: the extractor {name} returned {_describe(f)} as feature "
                             f"map {i}; {must}")
    return feats


class SpatialCorrelativeLoss(nn.Module):
    """F-LSeSim's spatially-correlative loss over several feature layers.

    Args:
        extractor: a frozen module (or callable) mapping an image batch to a list or tuple of
            (B, C, H, W) feature maps, one per layer (a dict's values are taken in order); a
            single (B, C, H, W) tensor is taken as one layer. Anything else raises a TypeError
            or ValueError naming the extractor. None: :class:`VGG16Features` (``vgg_layers``,
            ``vgg_weights``).
        channels: channel count of each of the extractor's layers (needed for
            ``learned=True`` with a user extractor).
        learned: LSeSim (1x1 heads trained with :meth:`head_loss`) instead of FSeSim.
        mode: "cos" (the published setting), "l1", or "info".
        patch_size, num_queries, window, normalize: as in
            :func:`fastinpaint.functional.self_similarity` (the public training setting:
            patch_size 64 on 64 x 64 maps, i.e. global windows).
        layer_weights: per-layer weights (default 1/L each).
        temperature: InfoNCE temperature (0.07 in the public training options).
    """

    def __init__(self, extractor: Optional[nn.Module] = None, channels: Optional[Sequence[int]] = None,
                 learned: bool = False, mode: str = "cos", patch_size: int = 32, num_queries: int = 256,
                 window: str = "clamp", normalize: bool = True, layer_weights: Optional[Sequence[float]] = None,
                 temperature: float = 0.07, vgg_layers: Sequence[str] = ("relu3_1", "relu4_1", "relu4_3"),
                 vgg_weights: Optional[str] = None, augment: Optional[Callable] = None,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        if mode not in ("cos", "l1", "info"):
            raise ValueError(f"mode must be 'cos', 'l1' or 'info', got {mode!r}")
        if extractor is None:
            extractor = VGG16Features(vgg_layers, vgg_weights)
            channels = extractor.channels if channels is None else channels
        if not isinstance(extractor, nn.Module) and not callable(extractor):
            raise TypeError(f"extractor must be an nn.Module or a callable, got {type(extractor).__name__}")
        if isinstance(extractor, nn.Module):
            extractor.requires_grad_(False)
            extractor.eval()
        self.extractor = extractor
        self.learned = bool(learned)
        if self.learned:
            if channels is None:
                raise ValueError("learned=True needs channels=[C per layer] for the heads")
            self.heads = nn.ModuleList(_head(int(c)) for c in channels)
        else:
            self.heads = None
        n_layers = len(channels) if channels is not None else None
        if layer_weights is not None:
            layer_weights = [float(w) for w in layer_weights]
            if n_layers is not None and len(layer_weights) != n_layers:
                raise ValueError(f"layer_weights has {len(layer_weights)} entries for {n_layers} layers")
        self.layer_weights = layer_weights
        self.mode, self.patch_size, self.num_queries = mode, int(patch_size), int(num_queries)
        self.window, self.normalize, self.temperature = window, bool(normalize), float(temperature)
        self.augment = augment or color_jitter
        self.generator = generator

    def train(self, mode: bool = True):
        super().train(mode)
        if isinstance(self.extractor, nn.Module):
            self.extractor.eval()
        return self

    def extract(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The extractor's feature maps of ``x``, checked: a list of (B, C, H, W) tensors."""
        return _feature_list(self.extractor, self.extractor(x), x)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.extract(x)
        if self.heads is not None:
            if len(feats) != len(self.heads):
                raise ValueError(f"the extractor gave {len(feats)} feature maps for {len(self.heads)} heads")
            feats = [head(f) for head, f in zip(self.heads, feats)]
        return feats

    def _weights(self, n: int) -> list[float]:
        if self.layer_weights is None:
            return [1.0 / n] * n
        if len(self.layer_weights) != n:
            raise ValueError(f"layer_weights has {len(self.layer_weights)} entries for {n} layers")
        return self.layer_weights

    def _distance(self, f_src, f_tgt, mode, f_other=None):
        index = sample_query_index(f_src.shape[2], f_src.shape[3], self.num_queries, self.generator, f_src.device)
        return spatial_correlative_distance(f_src, f_tgt, index, patch_size=self.patch_size, mode=mode,
                                            window=self.window, normalize=self.normalize, f_other=f_other,
                                            temperature=self.temperature)

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The generator's loss: sum over layers of weight * distance(maps(target), maps(prediction)).
        The target's features carry no gradient; in "info" mode the "other" image is the
        target flipped in both axes."""
        with torch.no_grad():
            f_target = [f.detach() for f in self.features(target)]
            f_other = ([f.detach() for f in self.features(target.flip(-1, -2))] if self.mode == "info"
                       else [None] * len(f_target))
        f_pred = self.features(prediction)
        if len(f_pred) != len(f_target):
            raise ValueError("the extractor returned different layer counts for prediction and target")
        total = 0.0
        for w, fs, ft, fo in zip(self._weights(len(f_pred)), f_target, f_pred, f_other):
            total = total + w * self._distance(fs, ft, self.mode, fo)
        return total

    def head_parameters(self):
        """The LSeSim heads' parameters (empty for FSeSim): the ones :meth:`head_loss` trains."""
        return [] if self.heads is None else list(self.heads.parameters())

    def head_loss(self, image: torch.Tensor, augmented: Optional[torch.Tensor] = None) -> torch.Tensor:
        """LSeSim's InfoNCE loss for the heads: positives (image, augmented view), negatives
        the other queries and the image flipped in both axes. Only the heads get gradients."""
        if self.heads is None:
            raise RuntimeError("head_loss needs learned=True (the FSeSim variant has no heads to train)")
        image = image.detach()
        if augmented is None:
            augmented = self.augment(image, generator=self.generator) if self.augment is color_jitter \
                else self.augment(image)
        with torch.no_grad():
            raw = [self.extract(x) for x in (image, augmented.detach(), image.flip(-1, -2))]
        total = 0.0
        n = len(self.heads)
        if len(raw[0]) != n:
            raise ValueError(f"the extractor gave {len(raw[0])} feature maps for {n} heads")
        for layer, (head, w) in enumerate(zip(self.heads, self._weights(n))):
            fs, ft, fo = (head(r[layer].detach()) for r in raw)
            total = total + w * self._distance(fs, ft, "info", fo)
        return total


class StructureLoss(SpatialCorrelativeLoss):
    """:class:`SpatialCorrelativeLoss` built from a config dict, for the training engine.

    ``StructureLoss.from_config({"variant": "fixed" | "learned", "mode": "cos",
    "patch_size": 32, "num_queries": 256, "layers": ["relu3_1", "relu4_1", "relu4_3"],
    "layer_weights": None, "vgg_weights": None, "normalize": True, "window": "clamp",
    "temperature": 0.07, "seed": None, "weight": 10.0, "lr": 1e-4})``. Unknown keys are an
    error. ``weight`` (the generator-loss weight, lambda_spatial = 10 in the public setting) and
    ``lr`` (the heads' Adam learning rate) are not used by the module itself: they are kept as
    ``.weight`` and ``.head_lr`` for the training loop.

    Training-loop use (generator step, then the heads for LSeSim)::

        structure = StructureLoss.from_config(cfg).to(device)
        g_losses["structure"] = structure(completed, image)          # weight: structure.weight
        if structure.learned:
            opt_s = torch.optim.Adam(structure.head_parameters(), lr=structure.head_lr)
            opt_s.zero_grad(); structure.head_loss(image).backward(); opt_s.step()
    """

    KEYS = {"variant", "mode", "patch_size", "num_queries", "layers", "layer_weights", "vgg_weights", "normalize",
            "window", "temperature", "seed", "weight", "lr", "type"}

    @classmethod
    def from_config(cls, config: dict, extractor: Optional[nn.Module] = None,
                    channels: Optional[Sequence[int]] = None) -> "StructureLoss":
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        unknown = set(config) - cls.KEYS
        if unknown:
            raise ValueError(f"unknown structure-loss config keys {sorted(unknown)}; known: {sorted(cls.KEYS)}")
        variant = config.get("variant", "fixed")
        if variant not in ("fixed", "learned"):
            raise ValueError(f"variant must be 'fixed' (FSeSim) or 'learned' (LSeSim), got {variant!r}")
        seed = config.get("seed")
        generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        loss = cls(extractor=extractor, channels=channels, learned=variant == "learned",
                   mode=config.get("mode", "cos"), patch_size=config.get("patch_size", 32),
                   num_queries=config.get("num_queries", 256), window=config.get("window", "clamp"),
                   normalize=config.get("normalize", True), layer_weights=config.get("layer_weights"),
                   temperature=config.get("temperature", 0.07),
                   vgg_layers=tuple(config.get("layers", ("relu3_1", "relu4_1", "relu4_3"))),
                   vgg_weights=config.get("vgg_weights"), generator=generator)
        loss.weight = float(config.get("weight", 10.0))  # lambda_spatial of the public training setting
        loss.head_lr = float(config.get("lr", 1e-4))  # Adam learning rate of the LSeSim heads
        return loss
