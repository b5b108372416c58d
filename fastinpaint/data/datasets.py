"""Image datasets for training and evaluating inpainting networks.

Every random choice a sample makes (crop position, flip) is drawn from
``numpy.random.default_rng([seed, epoch, index])``. A sample therefore depends only on
``(seed, epoch, index)``: not on the worker that loads it, the rank, or the number of
workers, and a resumed run redraws exactly the same data. Call ``set_epoch`` on the
dataset (and the sampler) before each epoch; :func:`set_epoch` does both for a loader.

Images come back as float32 tensors of shape (3, H, W) with values in [-1, 1]. Masks are
not made here: the trainer adds them.

Typical use::

    ds = make_dataset("demo" or "/path/to/images", size=256, split="train", seed=0)
    loader = make_loader(ds, batch_size=16, shuffle=True, seed=0, num_workers=4,
                         distributed=torch.distributed.is_initialized())
    for epoch in range(start_epoch, epochs):
        set_epoch(loader, epoch)          # sampler order and crops of this epoch
        for images in loader:
            ...

The epoch reaches worker processes when the loader's iterator is created, so keep
``persistent_workers=False`` (the default of :func:`make_loader`): persistent workers
keep the dataset copy of the epoch they started in.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

from ..errors import InputNotFoundError, InvalidInputError, UserError

__all__ = [
    "DEMO_PHOTOS",
    "DEMO_VAL_SHARE",
    "DemoDataset",
    "EpochRandomSampler",
    "IMAGE_EXTENSIONS",
    "ImageFolderDataset",
    "UnreadableImageError",
    "make_dataset",
    "make_loader",
    "make_sampler",
    "sample_rng",
    "seed_worker",
    "set_epoch",
    "split_of",
    "to_uint8",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# Photographs shipped inside the scikit-image wheel (no download, no pooch). ``cat`` is left
# out (it is ``chelsea`` again), ``retina`` and ``colorwheel`` too: their wide uniform
# borders make many identical crops.
DEMO_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "camera",
    "coins",
    "grass",
    "gravel",
    "brick",
)

# Fixed crop positions of the demo validation set, as fractions of the free range of the
# held-out part (top, left): centre, top-left, bottom-right. Duplicates (a part exactly
# size x size) are dropped.
_DEMO_VAL_POSITIONS = ((0.5, 0.5), (0.0, 0.0), (1.0, 1.0))
# The share of each demo photo's longer side held out for validation (at least one crop's side).
DEMO_VAL_SHARE = 0.25


class UnreadableImageError(OSError):
    """An image file that cannot be decoded (truncated, corrupt, or not an image)."""


class NoReadableImageError(UserError, RuntimeError):
    """Not one image file of a split can be decoded."""


# ----------------------------------------------------------------------------- helpers


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random generator of one sample: a function of (seed, epoch, index) only."""
    return np.random.default_rng([int(seed), int(epoch), int(index)])


def split_of(relative_path: str, val_fraction: float) -> str:
    """"val" or "train" for a file, from a stable hash of its path relative to the root.

    The decision depends on that path alone, so adding or removing other files never moves
    a file between splits, and it is the same on every machine and Python version."""
    digest = hashlib.blake2b(relative_path.encode("utf-8"), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2.0**64  # uniform in [0, 1)
    return "val" if u < val_fraction else "train"


def _to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1]."""
    chw = np.ascontiguousarray(rgb.transpose(2, 0, 1))
    return torch.from_numpy(chw).to(torch.float32).div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` in [-1, 1] -> ``(H, W, 3)`` uint8, as an output is written: clamped, rounded
    (the inverse of the datasets' conversion)."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def _upscaled_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """(h, w) with the shorter side brought up to ``size`` (unchanged when already >= size)."""
    short = min(h, w)
    if short >= size:
        return h, w
    scale = size / short
    return max(size, round(h * scale)), max(size, round(w * scale))


def _resize(rgb: np.ndarray, h: int, w: int) -> np.ndarray:
    from PIL import Image

    if rgb.shape[:2] == (h, w):
        return rgb
    img = Image.fromarray(rgb).resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def _crop_flip(rgb: np.ndarray, size: int, crop: str, flip: bool, rng: np.random.Generator | None,
               position: tuple[float, float] = (0.5, 0.5)) -> np.ndarray:
    """Crop (and maybe flip) an (H, W, 3) uint8 image to (size, size, 3).

    ``crop``: "random" (offsets drawn from ``rng``), "center" (``position`` as fractions of
    the free range, centre by default) or "resize" (the whole image to size x size).
    Images whose shorter side is under ``size`` are upscaled first (not for "resize")."""
    if crop == "resize":
        out = _resize(rgb, size, size)
    else:
        h, w = _upscaled_shape(rgb.shape[0], rgb.shape[1], size)
        rgb = _resize(rgb, h, w)
        if crop == "random":
            top = int(rng.integers(0, h - size + 1))
            left = int(rng.integers(0, w - size + 1))
        else:
            top = int(round(position[0] * (h - size)))
            left = int(round(position[1] * (w - size)))
        out = rgb[top:top + size, left:left + size]
    if flip and rng is not None and rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def _pil_to_rgb(img) -> np.ndarray:
    """Any PIL image -> uint8 (H, W, 3). Transparency is composited onto white; 16- and
    32-bit grayscale is scaled down to 8 bits; EXIF orientation is applied."""
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or a.max(initial=0) > 255:
            a = a / 257.0  # 0..65535 -> 0..255
        g = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def _load_rgb(path: str) -> np.ndarray:
    """Decode an image file fully to uint8 (H, W, 3); UnreadableImageError naming it if not."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()  # decodes now: a truncated file fails here, not later
            return _pil_to_rgb(img)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise UnreadableImageError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
        raise ValueError(f"size must be a positive int, got {size!r}")
    return int(size)


# ----------------------------------------------------------------------- image folders


def _scan(root: Path, extensions: Sequence[str]) -> list[str]:
    """Relative POSIX paths of the image files under root, sorted (deterministic)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            if os.path.splitext(name)[1].lower() in extensions:
                found.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(found)


class ImageFolderDataset(Dataset):
    """Every image under ``root`` (recursive), cropped to ``size`` x ``size``.

    split: "train", "val" or "all". A file belongs to "val" when a stable hash of its path
        relative to ``root`` falls under ``val_fraction`` (see :func:`split_of`), so the
        split is deterministic and adding files does not move the others. "val" uses
        centre crops (or "resize") and no flips.
    crop: "random", "center" or "resize" (the whole image squashed to size x size). Images
        whose shorter side is under ``size`` are upscaled to it before cropping.
    strict: False (default): a file that cannot be decoded is skipped with one warning per
        file and the next readable index is used instead (deterministically); True: raise
        :class:`UnreadableImageError` naming the file.
    warned: a set of the paths warned about, shared by the datasets of one run (a training
        split and a validation set over the same files) so that each file is warned about once.

    ``__getitem__`` returns the image tensor only: float32 (3, size, size) in [-1, 1].
    """

    def __init__(self, root, size: int = 256, split: str = "train", val_fraction: float = 0.05,
                 crop: str = "random", flip: bool = True, seed: int = 0, strict: bool = False,
                 extensions: Iterable[str] = IMAGE_EXTENSIONS, warned: set | None = None):
        self.size = _check_size(size)
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
        if crop not in ("random", "center", "resize"):
            raise ValueError(f"crop must be 'random', 'center' or 'resize', got {crop!r}")
        if not 0.0 <= float(val_fraction) <= 1.0:
            raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction!r}")
        self.root = Path(root).expanduser()
        if not self.root.exists():
            raise FileNotFoundError(f"image folder {str(self.root)!r} does not exist")
        if not self.root.is_dir():
            raise NotADirectoryError(f"image folder {str(self.root)!r} is not a directory")
        self.extensions = tuple(sorted({("." + e.lower().lstrip(".")) for e in extensions}))
        self.split = split
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)
        self.strict = bool(strict)
        self.epoch = 0
        if split == "val":
            self.crop = "resize" if crop == "resize" else "center"
            self.flip = False
        else:
            self.crop = crop
            self.flip = bool(flip)

        every = _scan(self.root, self.extensions)
        if not every:
            raise FileNotFoundError(
                f"no image files ({', '.join(self.extensions)}) found under {str(self.root)!r}")
        if split == "all":
            self.files = every
        else:
            self.files = [f for f in every if split_of(f, self.val_fraction) == split]
        if not self.files:
            raise InvalidInputError(
                f"split {split!r} of {str(self.root)!r} is empty: {len(every)} image files, "
                f"val_fraction={self.val_fraction}", argument="data",
                fix="add images to the folder, or use split='all' or another val_fraction")
        self._bad: set[int] = set()  # indices known to be unreadable (this process)
        self._warned = set() if warned is None else warned   # paths warned about
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def path(self, index: int) -> Path:
        return self.root / self.files[index]

    def _warn_bad(self, index: int, err: Exception) -> None:
        with self._lock:
            if index in self._bad:
                return
            self._bad.add(index)
            if str(self.path(index)) in self._warned:
                return
            self._warned.add(str(self.path(index)))
        warnings.warn(f"skipping unreadable image {str(self.path(index))!r}: {err}", RuntimeWarning,
                      stacklevel=3)

    def _load(self, index: int) -> np.ndarray:
        """The decoded image at ``index``, or that of the next readable index."""
        n = len(self.files)
        for k in range(n):
            i = (index + k) % n
            if i in self._bad:
                continue
            try:
                return _load_rgb(str(self.path(i)))
            except UnreadableImageError as e:
                if self.strict:
                    raise
                self._warn_bad(i, e)
        raise NoReadableImageError(f"none of the {n} image files in split {self.split!r} under "
                                   f"{str(self.root)!r} can be read", argument="data",
                                   fix="replace the broken files, or give another folder")

    def __getitem__(self, index: int) -> torch.Tensor:
        index = int(index)
        if not 0 <= index < len(self.files):
            raise IndexError(f"index {index} out of range for {len(self.files)} images")
        rgb = self._load(index)
        # The random stream belongs to the requested index, also when a substitute is used.
        rng = sample_rng(self.seed, self.epoch, index) if self.crop == "random" or self.flip else None
        return _to_tensor(_crop_flip(rgb, self.size, self.crop, self.flip, rng))

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"ImageFolderDataset(root={str(self.root)!r}, size={self.size}, split={self.split!r}, "
                f"n={len(self)}, crop={self.crop!r}, flip={self.flip}, seed={self.seed})")


# --------------------------------------------------------------------------- demo data

_PHOTO_CACHE: dict[str, np.ndarray] = {}
_PHOTO_LOCK = threading.Lock()


def _demo_photo(name: str) -> np.ndarray:
    """A scikit-image photograph as uint8 (H, W, 3), decoded once per process."""
    with _PHOTO_LOCK:
        if name not in _PHOTO_CACHE:
            try:
                import skimage.data
            except ImportError as e:
                raise ImportError("the demo dataset needs scikit-image (pip install scikit-image)") from e
            a = np.asarray(getattr(skimage.data, name)())
            if a.dtype != np.uint8:
                raise TypeError(f"skimage.data.{name}() is {a.dtype}, expected uint8")
            if a.ndim == 2:
                a = np.repeat(a[:, :, None], 3, axis=2)
            elif a.shape[2] == 4:
                a = a[:, :, :3]
            a = np.ascontiguousarray(a)
            a.setflags(write=False)
            _PHOTO_CACHE[name] = a
        return _PHOTO_CACHE[name]


class DemoDataset(Dataset):
    """Crops of the photographs scikit-image ships in its wheel (:data:`DEMO_PHOTOS`): no
    download, no files to prepare.

    Each photo is cut in two across its longer side: the last :data:`DEMO_VAL_SHARE` of that
    side (at least ``size`` pixels; the bottom of a tall photo, the right of a wide one) is
    held out for validation, the rest is the training part, so no validation pixel is ever
    trained on (:meth:`regions` gives the two boxes).

    split "train": ``samples_per_epoch`` random crops (and horizontal flips) of the training
        parts; sample ``i`` comes from photo ``i % len(photos)`` at a position drawn from
        (seed, epoch, i).
    split "val": a fixed list of crops of the held-out parts, the same on every call and
        machine: for each photo the centre, top-left and bottom-right crops of its held-out
        part (duplicates dropped). ``seed`` and the epoch do not change it.

    Photos whose shorter side is under ``size``, or whose longer side cannot hold a training
    and a validation crop side by side (under ``2 * size``), are upscaled to fit; grayscale
    photos are converted to RGB. Returns float32 (3, size, size) in [-1, 1].
    """

    def __init__(self, size: int = 256, split: str = "train", samples_per_epoch: int = 1024,
                 seed: int = 0, photos: Sequence[str] = DEMO_PHOTOS):
        self.size = _check_size(size)
        if split not in ("train", "val"):
            raise ValueError(f"DemoDataset split must be 'train' or 'val', got {split!r}")
        if int(samples_per_epoch) <= 0:
            raise ValueError(f"samples_per_epoch must be positive, got {samples_per_epoch!r}")
        if not photos:
            raise ValueError("DemoDataset needs at least one photo")
        self.split = split
        self.samples_per_epoch = int(samples_per_epoch)
        self.seed = int(seed)
        self.epoch = 0
        self.photo_names = tuple(photos)
        self._images = self._prepare()  # decoded now, so forked workers inherit them
        if split == "val":
            self.val_crops = self._val_positions()

    def _prepare(self) -> list[np.ndarray]:
        out = []
        for name in self.photo_names:
            a = _demo_photo(name)
            h, w = _upscaled_shape(a.shape[0], a.shape[1], self.size)
            if max(h, w) < 2 * self.size:   # room for a training and a validation crop side by side
                if h >= w:
                    h, w = 2 * self.size, max(self.size, round(w * 2 * self.size / h))
                else:
                    h, w = max(self.size, round(h * 2 * self.size / w)), 2 * self.size
            out.append(_resize(a, h, w))
        return out

    def regions(self, photo: int) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
        """The training and the validation part of photo ``photo`` (an index into
        :attr:`images`), each as ``(top, left, height, width)``: disjoint, and together the
        whole photo."""
        h, w = self.images[photo].shape[:2]
        tall = h >= w
        side = h if tall else w
        held = max(self.size, round(side * DEMO_VAL_SHARE))
        cut = side - held
        if tall:
            return (0, 0, cut, w), (cut, 0, held, w)
        return (0, 0, h, cut), (0, cut, h, held)

    def _val_positions(self) -> list[tuple[int, int, int]]:
        """(photo, top, left) of every validation crop (in the whole photo), fixed."""
        crops = []
        for p in range(len(self.images)):
            top0, left0, h, w = self.regions(p)[1]
            seen = set()
            for ft, fl in _DEMO_VAL_POSITIONS:
                pos = (top0 + int(round(ft * (h - self.size))), left0 + int(round(fl * (w - self.size))))
                if pos not in seen:
                    seen.add(pos)
                    crops.append((p,) + pos)
        return crops

    @property
    def images(self) -> list[np.ndarray]:
        if self._images is None:  # after unpickling in a spawned worker
            self._images = self._prepare()
        return self._images

    def __len__(self) -> int:
        return len(self.val_crops) if self.split == "val" else self.samples_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> torch.Tensor:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        s = self.size
        if self.split == "val":
            p, top, left = self.val_crops[index]
            return _to_tensor(np.ascontiguousarray(self.images[p][top:top + s, left:left + s]))
        p = index % len(self.photo_names)
        top, left, h, w = self.regions(p)[0]
        rng = sample_rng(self.seed, self.epoch, index)
        return _to_tensor(_crop_flip(self.images[p][top:top + h, left:left + w], s, "random", True, rng))

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_images"] = None  # spawned workers decode from the wheel again: cheaper than pickling
        return state

    def __repr__(self) -> str:
        return (f"DemoDataset(size={self.size}, split={self.split!r}, n={len(self)}, "
                f"photos={len(self.photo_names)}, seed={self.seed})")


# ----------------------------------------------------------------------------- factory


def make_dataset(data: str, size: int = 256, split: str = "train", seed: int = 0, **kw) -> Dataset:
    """``"demo"`` -> :class:`DemoDataset`; a folder path -> :class:`ImageFolderDataset`.

    Extra keywords go to the dataset (``samples_per_epoch`` for the demo; ``val_fraction``,
    ``crop``, ``flip``, ``strict``, ``extensions`` for a folder)."""
    if str(data) == "demo":
        return DemoDataset(size=size, split=split, seed=seed, **kw)
    path = Path(data).expanduser()
    fix = "give a folder of images (png, jpg, webp, bmp; searched recursively), or 'demo'"
    if not path.exists():
        raise InputNotFoundError(f"{str(data)!r} does not exist", argument="data", fix=fix)
    try:
        return ImageFolderDataset(path, size=size, split=split, seed=seed, **kw)
    except (FileNotFoundError, NotADirectoryError) as e:   # not a folder, or no image in it
        raise InputNotFoundError(str(e), argument="data", fix=fix) from e


# ----------------------------------------------------------------------------- loading


def seed_worker(worker_id: int) -> None:
    """``DataLoader(worker_init_fn=seed_worker)``: seed torch, numpy and ``random`` of each
    worker from ``torch.initial_seed()`` (which the DataLoader sets per worker from its
    generator). The datasets here do not use these global generators; this keeps any code
    that does (custom transforms) reproducible too."""
    s = torch.initial_seed()
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


def _mixed_seed(*values: int) -> int:
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1, np.uint64)[0] >> 1)


class EpochRandomSampler(RandomSampler):
    """A RandomSampler whose order is a function of (seed, epoch): call ``set_epoch`` before
    each epoch; a resumed run at epoch ``e`` gets the order of epoch ``e`` again."""

    def __init__(self, data_source, seed: int = 0):
        self.seed = int(seed)
        self.epoch = 0
        super().__init__(data_source, generator=torch.Generator())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        self.generator.manual_seed(_mixed_seed(self.seed, self.epoch))
        return super().__iter__()


def make_sampler(dataset, shuffle: bool, seed: int = 0, distributed: bool = False,
                 num_replicas: int | None = None, rank: int | None = None) -> Sampler:
    """The sampler :func:`make_loader` uses.

    ``distributed`` (or explicit ``num_replicas`` and ``rank``): a DistributedSampler(seed=seed,
    shuffle=shuffle); ``distributed`` without them needs torch.distributed initialised.
    Otherwise an :class:`EpochRandomSampler` (shuffle) or a SequentialSampler."""
    if distributed or num_replicas is not None or rank is not None:
        if (num_replicas is None or rank is None) and not (
                torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise RuntimeError("distributed=True needs torch.distributed initialised "
                               "(init_process_group) or explicit num_replicas and rank")
        return DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                                  seed=int(seed))
    if shuffle:
        return EpochRandomSampler(dataset, seed=seed)
    return SequentialSampler(dataset)


def make_loader(dataset, batch_size: int, shuffle: bool, seed: int = 0, num_workers: int = 0,
                distributed: bool = False, drop_last: bool = True, **kw) -> DataLoader:
    """A DataLoader whose batches depend only on (seed, epoch), for any ``num_workers``.

    The caller calls :func:`set_epoch` (``set_epoch(loader, epoch)``) before each epoch; it
    sets the epoch on ``loader.sampler`` (order) and on the dataset (crops and flips).
    Extra keywords go to DataLoader (``pin_memory``...); leave ``persistent_workers`` off
    so that workers see each new epoch."""
    if kw.get("persistent_workers"):
        raise ValueError("persistent_workers=True would keep the dataset's epoch of the first epoch "
                         "in the workers; make_loader needs them off")
    sampler = make_sampler(dataset, shuffle=shuffle, seed=seed, distributed=distributed)
    # Draws the workers' base seed (torch.initial_seed() in seed_worker); set_epoch reseeds it
    # from (seed, epoch) so that those seeds do not depend on how many epochs ran before.
    generator = torch.Generator()
    generator.manual_seed(_mixed_seed(seed, 0, 1))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        drop_last=drop_last, worker_init_fn=seed_worker if num_workers > 0 else None,
                        generator=generator, **kw)
    loader.fastinpaint_seed = int(seed)
    return loader


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Set the epoch on the loader's sampler and on its dataset (both when they have one),
    and, for a loader from :func:`make_loader`, reseed its generator from (seed, epoch)."""
    seed = getattr(loader, "fastinpaint_seed", None)
    if seed is not None and loader.generator is not None:
        loader.generator.manual_seed(_mixed_seed(seed, epoch, 1))
    for obj in (loader.sampler, getattr(loader.batch_sampler, "sampler", None), loader.dataset):
        if obj is not None and hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
