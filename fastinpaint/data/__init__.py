"""Data for training inpainting networks: image datasets and hole-mask generators.

Mask convention everywhere: 1 = hole (missing), 0 = known. Every random choice of a
sample is drawn from ``numpy.random.default_rng([seed, epoch, index])``, so a sample
depends only on (seed, epoch, index): not on the worker, the rank or the worker count.
"""

from .datasets import (DemoDataset, ImageFolderDataset, UnreadableImageError, make_dataset, make_loader,
                       sample_rng, seed_worker, set_epoch)
from .masks import (MASKS, CenterMask, FileMask, FreeFormMask, LamaMask, RandomBlockMask, RandomRegionMask,
                    make_mask_generator)

__all__ = ["CenterMask", "DemoDataset", "FileMask", "FreeFormMask", "ImageFolderDataset", "LamaMask", "MASKS",
           "RandomBlockMask", "RandomRegionMask", "UnreadableImageError", "make_dataset", "make_loader",
           "make_mask_generator", "sample_rng", "seed_worker", "set_epoch"]
