"""The training loop: ``train(TrainConfig) -> dict``, which runs a :class:`Trainer`.

Single process by default; under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK in the
environment, WORLD_SIZE > 1) it initialises torch.distributed (NCCL on CUDA, gloo on the
CPU) and wraps the networks in DistributedDataParallel; each rank reads its own share of
the data (DistributedSampler) and rank 0 alone writes files.

Reproducibility: crops come from ``sample_rng(seed, epoch, index)`` (the datasets) and masks
from ``sample_rng(seed + 1, epoch, index)`` (:class:`MaskedDataset`); the sampler order is a
function of (seed, epoch). A checkpoint records the step, the epoch and the number of
batches drawn in it, the networks, optimisers, grad scaler, EMA and RNG states; a resumed
run replays the epoch's order, skips the batches already used and continues exactly.

Under DDP every rank reads the checkpoint directory on resume, so it must be on a file
system all ranks share. Resuming mid-epoch re-reads (and drops) the batches already used
in that epoch, so it costs up to one epoch of data loading (no compute).

Run directory (``config.out``)::

    config.json          the resolved configuration
    checkpoints/         ckpt_<step>.pt (the last ``keep``)
    log.jsonl            one line of scalars per logged step (and per validation)
    tensorboard/         scalars and image grids, when the tensorboard package is installed
    metrics.json         the latest validation metrics and their history
    samples.png          masked input | output | ground truth of the validation batches
    weights.safetensors  the final generator (weights_ema.safetensors: its EMA)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data import make_dataset, make_loader, make_mask_generator, sample_rng, set_epoch
from ..errors import InputNotFoundError, InvalidInputError, RunExistsError, UnreadableInputError, UserError, \
    check_folder
from ..models import build_model
from .checkpoint import CheckpointError, load_latest, rng_state, save_checkpoint, save_weights, set_rng_state
from .config import ConfigError, TrainConfig, lr_factor

__all__ = ["MaskedDataset", "RUN_FILES", "VALIDATION_BASELINES", "Trainer", "build_structure_loss", "existing_run",
           "resolve_defaults", "train"]

# the classical fills every validation is set beside (fastinpaint.baselines)
VALIDATION_BASELINES = ("mean", "telea")

# what a run writes into its folder (config.out); a folder holding any of them holds a run
RUN_FILES = ("config.json", "checkpoints", "log.jsonl", "metrics.json", "samples.png", "weights.safetensors",
             "weights_ema.safetensors", "tensorboard")


class MaskedDataset(Dataset):
    """(image, mask) pairs: the image of ``dataset`` and a mask drawn from
    ``sample_rng(mask_seed, epoch, index)``, so masks depend on (seed, epoch, index) only.
    ``fixed_epoch`` pins the epoch (validation)."""

    def __init__(self, dataset, mask_generator, mask_seed: int, fixed_epoch: int | None = None):
        self.dataset = dataset
        self.mask_generator = mask_generator
        self.mask_seed = int(mask_seed)
        self.fixed_epoch = fixed_epoch
        self.epoch = 0 if fixed_epoch is None else int(fixed_epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        if self.fixed_epoch is None:
            self.epoch = int(epoch)
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)

    def __getitem__(self, index: int):
        image = self.dataset[index]
        mask = self.mask_generator(image.shape[-2], image.shape[-1], sample_rng(self.mask_seed, self.epoch, index))
        mask = mask.to(torch.float32).reshape(1, image.shape[-2], image.shape[-1])
        return image, mask


# ----------------------------------------------------------------------------- helpers

def _dist_env() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world, local


def _device(config: TrainConfig, local_rank: int) -> torch.device:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("device='cuda' asked for, but torch sees no CUDA device; use device=cpu or auto")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _Logger:
    """Rank 0's console, log.jsonl and (when installed) TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool, total: int, start: int, resumed_at: int | None = None):
        """``resumed_at``: the step a resumed run continues from (-1: a resume that found no
        checkpoint and starts over): the log's lines (and TensorBoard's events) after it are
        dropped, as the steps after it are run again."""
        self.enabled = enabled
        self.total, self.start = total, start
        self.t0 = time.perf_counter()
        self.tb = None
        self.bar = None
        if not enabled:
            return
        if resumed_at is not None:
            _truncate_log(run_dir / "log.jsonl", resumed_at)
        self.jsonl = open(run_dir / "log.jsonl", "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter
            purge = None if resumed_at is None else resumed_at + 1
            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)
        except Exception:  # tensorboard missing (ImportError) or broken
            print(f"fastinpaint train: tensorboard is not installed; scalars go to {run_dir / 'log.jsonl'} only",
                  flush=True)
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)
        except ImportError:
            self.bar = None

    def scalars(self, step: int, values: dict, kind: str = "train") -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def message(self, text: str) -> None:
        """A line on stdout that does not run into the progress bar (on stderr), also when both
        go to one file."""
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
            sys.stdout.flush()
        else:
            print(text, flush=True)

    def progress(self, step: int, losses: dict) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        done = step - self.start
        rate = done / elapsed if elapsed > 0 else float("nan")
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        text = " ".join(f"{k}={v:.4f}" for k, v in losses.items())
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.refresh()
        else:
            print(f"step {step}/{self.total}  {rate:.2f} steps/s  ETA {eta:.0f}s  {text}", flush=True)

    def image(self, step: int, grid: torch.Tensor) -> None:
        if self.enabled and self.tb is not None:
            self.tb.add_image("val/masked_output_truth", grid, step)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self.jsonl.close()


def _truncate_log(path: Path, last_step: int) -> None:
    """Keep the lines of log.jsonl up to ``last_step`` (atomically); a line that cannot be read
    (a write cut short) is dropped."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(x + "\n" for x in kept), encoding="utf-8")
    os.replace(tmp, path)


def _grid(image, mask, output) -> torch.Tensor:
    """(3, B*H, 3*W) in [0, 1]: per row masked input (holes white) | composite output | truth."""
    image, mask, output = image.float().cpu(), mask.float().cpu(), output.float().cpu().clamp(-1, 1)
    masked = image * (1 - mask) + mask
    comp = output * mask + image * (1 - mask)
    rows = torch.cat([masked, comp, image], dim=3)                # B, 3, H, 3W
    return ((torch.cat(list(rows), dim=1) + 1) / 2).clamp(0, 1)   # 3, B*H, 3W


def _save_png(grid: torch.Tensor, path: Path) -> Path:
    from PIL import Image

    a = (grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(a).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=float)
    os.replace(tmp, path)


def _val_batches(config: TrainConfig, mask_gen, **kw) -> list:
    """The fixed validation batches: the first ``val_batches`` of the validation split with
    masks of epoch 0. A folder whose validation split is empty or unreadable falls back to
    centre crops of every image (with a warning); nothing readable at all: no validation.
    ``kw``: for a folder's datasets (``warned``)."""

    def load(dataset):
        ds = MaskedDataset(dataset, mask_gen, config.seed + 1, fixed_epoch=0)
        loader = torch.utils.data.DataLoader(ds, batch_size=config.batch_size, shuffle=False, drop_last=False)
        batches = []
        for batch in loader:
            if len(batches) >= config.val_batches:
                break
            batches.append(batch)
        return batches

    try:
        return load(make_dataset(config.data, size=config.size, split="val", seed=config.seed, **kw))
    except (ValueError, RuntimeError) as e:   # empty split / no readable file in it
        if config.data == "demo":
            raise
        why = e.message if isinstance(e, UserError) else str(e)   # the library's fix does not apply here
        warnings.warn(f"the validation split is unusable ({why}); validating on centre crops of every image "
                      "instead", RuntimeWarning)
    try:
        return load(make_dataset(config.data, size=config.size, split="all", seed=config.seed, crop="center",
                                 flip=False, **kw))
    except (ValueError, RuntimeError) as e:
        warnings.warn(f"no validation images ({e}); the run has no validation metrics or sample grid",
                      RuntimeWarning)
        return []


def _probe(dataset):
    """``dataset[0]``, decoded before the run folder is touched: a folder none of whose images
    can be read fails here, as one error naming the first fault, instead of one warning per
    file and a half-written run folder."""
    from ..data.datasets import NoReadableImageError

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            sample = dataset[0]
        except NoReadableImageError as e:
            first = str(caught[0].message) if caught else ""
            raise NoReadableImageError(e.message + (f" (the first: {first})" if first else ""),
                                       argument=e.argument, fix=e.fix) from None
    for w in caught:   # the files skipped on the way to a readable one
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return sample


# ----------------------------------------------------------------------------- train

def _import_object(path: str):
    """``"package.module:name"`` -> the object."""
    import importlib

    module, sep, name = str(path).partition(":")
    if not sep or not module or not name:
        raise ValueError(f"structure_loss.extractor must be 'package.module:callable', got {path!r}")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def build_structure_loss(options: dict, device: torch.device):
    """The spatially-correlative structure loss of ``config.structure_loss`` (None when empty).

    Keys: those of :meth:`fastinpaint.losses.StructureLoss.from_config` (``variant``
    "fixed" = FSeSim or "learned" = LSeSim, ``mode``, ``patch_size``, ``num_queries``,
    ``layers``, ``weight`` = its weight in the generator loss, ``lr`` = the LSeSim heads'
    learning rate, ...), plus ``extractor``: ``"package.module:callable"`` returning a frozen
    feature extractor (image batch in [-1, 1] -> list of feature maps) instead of VGG16, and
    ``channels``: its channel count per layer (needed by the learned heads)."""
    if not options:
        return None
    from ..losses import StructureLoss

    options = dict(options)
    extractor = options.pop("extractor", None)
    channels = options.pop("channels", None)
    if extractor is not None:
        extractor = _import_object(extractor)()
    return StructureLoss.from_config(options, extractor=extractor, channels=channels).to(device)


def resolve_defaults(config: TrainConfig, recipe) -> TrainConfig:
    """``config`` with the settings left unset (``None``) taken from the model's recipe, its
    published setting: ``lr`` from ``recipe.default_lr`` (else 1e-4), ``lr_d`` from
    ``default_lr_discriminator`` (else ``lr``), ``betas`` from ``default_betas`` (else
    (0.5, 0.999)), ``size`` from ``default_size`` (else 64), ``batch_size`` from
    ``default_batch_size`` (else 4), ``lr_schedule`` from ``default_lr_schedule`` (else
    "constant"), ``warmup_steps`` from ``default_warmup_steps`` (else 0), ``steps`` from
    ``default_steps`` (else 2000), ``val_batches`` from
    ``default_val_batches`` (else 2), and ``mask`` with its options from ``default_mask`` and
    ``default_mask_options`` (else free-form strokes)."""
    lr = config.lr if config.lr is not None else float(getattr(recipe, "default_lr", 1e-4))
    lr_d = config.lr_d if config.lr_d is not None else float(getattr(recipe, "default_lr_discriminator", lr))
    betas = config.betas if config.betas is not None else tuple(getattr(recipe, "default_betas", (0.5, 0.999)))
    size = config.size if config.size is not None else int(getattr(recipe, "default_size", 64))
    batch = config.batch_size if config.batch_size is not None else int(getattr(recipe, "default_batch_size", 4))
    schedule = config.lr_schedule if config.lr_schedule is not None else \
        str(getattr(recipe, "default_lr_schedule", "constant"))
    warmup = config.warmup_steps if config.warmup_steps is not None else int(getattr(recipe, "default_warmup_steps", 0))
    steps = config.steps if config.steps is not None else int(getattr(recipe, "default_steps", 2000))
    val_batches = config.val_batches if config.val_batches is not None else \
        int(getattr(recipe, "default_val_batches", 2))
    mask, mask_options = config.mask, config.mask_options
    if mask is None:
        mask = getattr(recipe, "default_mask", "free_form")
        mask_options = {**dict(getattr(recipe, "default_mask_options", None) or {}), **mask_options}
    return dataclasses.replace(config, lr=lr, lr_d=lr_d, betas=betas, size=size, batch_size=batch, mask=mask,
                               mask_options=mask_options, lr_schedule=schedule, warmup_steps=warmup,
                               steps=steps, val_batches=val_batches).validate()


def existing_run(run_dir) -> list[str]:
    """The names of :data:`RUN_FILES` present in ``run_dir``: non-empty when it holds a run."""
    run_dir = Path(run_dir)
    return [name for name in RUN_FILES if (run_dir / name).exists()]


def _check_run_dir(config: TrainConfig, overwrite: bool) -> None:
    """Refuse a run folder that already holds a run unless ``resume`` or ``overwrite``."""
    if config.resume and overwrite:
        raise InvalidInputError("resume and overwrite contradict each other", argument="overwrite",
                                fix="give --resume to continue the run, or --overwrite to start over, not both")
    check_folder(config.out, argument="out", what="the run")
    found = existing_run(config.out)
    if config.resume and not found:
        raise InputNotFoundError(f"{config.out} holds no run to resume", argument="out",
                                 fix="check the --out path, or leave out --resume to start a new run there")
    if found and not config.resume and not overwrite:
        raise RunExistsError(f"{config.out} already holds a run ({', '.join(found)})", argument="out",
                             fix="add --resume to continue it, or --overwrite to delete it and start over, "
                                 "or give another --out")


def _clear_run(run_dir: Path) -> None:
    """Delete what a run wrote into ``run_dir`` (:data:`RUN_FILES` and their temporary files);
    other files in it are left alone."""
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        for tmp in run_dir.glob(f".{name}.*.tmp"):
            tmp.unlink()


def train(config: TrainConfig, on_step=None, overwrite: bool = False) -> dict:
    """Train as ``config`` says; returns the final metrics and the paths written.

    A ``config.out`` that already holds a run (any of :data:`RUN_FILES`) raises
    :class:`~fastinpaint.errors.RunExistsError` before anything is written, unless
    ``config.resume`` (continue it) or ``overwrite`` (delete that run's files, once the model
    and the data have been checked, and start over).

    ``on_step(step)`` (optional) is called after every optimiser step (and its checkpoint)."""
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    config.validate()
    rank, world, local_rank = _dist_env()
    distributed = world > 1
    device = _device(config, local_rank)
    created_group = False
    if distributed and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             rank=rank, world_size=world)
        created_group = True
    try:
        # rank 0 (the one that writes) looks at the folder before any rank writes; every rank
        # gets its verdict, so all of them stop or none does
        refusal = [None]
        if rank == 0:
            try:
                _check_run_dir(config, overwrite)
            except (InvalidInputError, InputNotFoundError, RunExistsError) as e:
                refusal = [e]
        if distributed:
            torch.distributed.broadcast_object_list(refusal, src=0)
        if refusal[0] is not None:
            raise refusal[0]
        return Trainer(config, rank, world, device, on_step, overwrite=overwrite).fit()
    finally:
        if created_group:
            torch.distributed.destroy_process_group()


class Trainer:
    """One training run of ``config`` on ``device`` as process ``rank`` of ``world`` (the
    process group, when ``world > 1``, is the caller's: :func:`train` sets it up).

    :meth:`fit` runs the phases in this order, and the order is part of the contract (it
    fixes the random draws, hence a resumed or distributed run's exactness):

    1. :meth:`build_models`: seed, networks, optimisers, EMA copy, grad scaler, structure loss
    2. :meth:`build_data`: mask generator, training loader, fixed validation batches
    3. :meth:`resume`: the latest checkpoint's state, when ``config.resume``
    4. :meth:`initialise`: the weights of ``config.init``, when no checkpoint was resumed
    5. :meth:`check_validation`, then :meth:`prepare_run_dir`: the first validation computed (a metric
       that cannot take the crops fails here), then the previous run's files deleted (``overwrite``), config.json
    6. :meth:`wrap_distributed`: DDP (``world > 1``) and ``torch.compile``
    7. :meth:`seek_data`: the data stream at the resumed (epoch, batch)
    8. :meth:`initial_validation`: the validations of step 5 (the baselines, mean colour and Telea,
       and the untrained network) recorded
    9. per step, :meth:`train_step` (:meth:`set_learning_rates`, :meth:`discriminator_step`, :meth:`generator_step`,
       :meth:`structure_heads_step`, :meth:`update_ema`) then :meth:`after_step` (log,
       :meth:`save_checkpoint`, :meth:`run_validation`, ``on_step``)
    10. :meth:`run_validation` and :meth:`export`: final metrics, checkpoint, grid, weights
    """

    def __init__(self, config: TrainConfig, rank: int, world: int, device: torch.device, on_step=None,
                 overwrite: bool = False):
        self.config = config
        self.overwrite = overwrite
        self.rank, self.world, self.device = rank, world, device
        self.distributed = world > 1
        self.main = rank == 0
        self.on_step = on_step
        self.run_dir = Path(config.out)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.metrics_path, self.grid_path = self.run_dir / "metrics.json", self.run_dir / "samples.png"
        # the position: optimiser steps done, and the batches drawn in the current epoch
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.history: list = []          # validation metrics per validated step
        self.baseline: dict = {}         # the mean-colour fill's validation metrics
        self.baselines: dict = {}        # every baseline's (VALIDATION_BASELINES) validation metrics
        self.baselines_unavailable: dict = {}   # name -> why it could not be run here
        self.last_val: dict = {}
        self.last_grid: torch.Tensor | None = None
        self.last_ckpt: Path | None = None
        self.logger: _Logger | None = None

    def fit(self) -> dict:
        """Run every phase; returns the final metrics and the paths written (rank 0)."""
        self.build_models()
        self.build_data()
        self.resume()
        self.initialise()
        self.check_validation()
        self.prepare_run_dir()
        self.wrap_distributed()
        self.seek_data(self.epoch, self.batch_in_epoch)
        resumed_at = None if not self.config.resume else (self.step if self.last_ckpt is not None else -1)
        self.logger = _Logger(self.run_dir, self.main, self.config.steps, self.step, resumed_at)
        self.generator.train()
        if self.discriminator is not None:
            self.discriminator.train()
        self.initial_validation()
        try:
            with _deferred_interrupt(enabled=self.main and not self.distributed) as interrupted:
                while self.step < self.config.steps:
                    logs = self.train_step()
                    self.after_step(logs)
                    if interrupted():
                        self.save_interrupted()
            self.run_validation()
            if self.distributed:
                torch.distributed.barrier()
            return self.export()
        finally:
            self.logger.close()

    # ------------------------------------------------------------------------- setup

    def build_models(self) -> None:
        """Networks and optimisers; every rank builds the same initial weights from the seed.
        Fills the model's defaults into ``self.config`` and writes config.json (rank 0)."""
        config, device = self.config, self.device
        torch.manual_seed(config.seed)
        np.random.seed(config.seed % 2**32)
        self.recipe = recipe = build_model(config.model, loss_weights=config.loss_weights, **config.model_options)
        self.config = config = resolve_defaults(config, recipe)
        self.generator = recipe.generator.to(device)
        self.discriminator = recipe.discriminator.to(device) if recipe.discriminator is not None else None
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=config.lr, betas=config.betas, eps=config.eps)
        self.opt_d = (torch.optim.Adam(self.discriminator.parameters(), lr=config.lr_d, betas=config.betas,
                                       eps=config.eps)
                      if self.discriminator is not None else None)
        self.ema = None
        if config.ema > 0:
            self.ema = copy.deepcopy(self.generator).eval()
            for p in self.ema.parameters():
                p.requires_grad_(False)
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.amp]
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
        self.loss_weights = dict(recipe.loss_weights)
        self.structure = build_structure_loss(config.structure_loss, device)
        self.opt_s = None
        if self.structure is not None:
            self.loss_weights["structure"] = self.structure.weight
            if self.structure.learned:
                self.opt_s = torch.optim.Adam(self.structure.head_parameters(), lr=self.structure.head_lr)
        # the image of a generator that returns more (DeepFill v2: coarse and refined)
        self.final_output = getattr(recipe, "final_output", None) or (lambda out: out)

    def build_data(self) -> None:
        """The training loader (each rank its share) and, on rank 0, the validation batches."""
        config = self.config
        self.mask_gen = make_mask_generator(config.mask, **config.mask_options)
        warned = set()   # one warning per unreadable file, whichever dataset of the run reads it first
        kw = {"samples_per_epoch": config.samples_per_epoch} if config.data == "demo" else {"warned": warned}
        train_ds = MaskedDataset(make_dataset(config.data, size=config.size, split="train", seed=config.seed, **kw),
                                 self.mask_gen, config.seed + 1)
        # before the batch check: an unreadable folder is named as such, not as too small for the batch
        self._check_model_takes(_probe(train_ds))
        self.loader = make_loader(train_ds, batch_size=config.batch_size, shuffle=True, seed=config.seed,
                                  num_workers=config.num_workers, distributed=self.distributed,
                                  pin_memory=self.device.type == "cuda")
        if len(self.loader) == 0:
            raise InvalidInputError(
                f"the training set of {config.data} has {len(train_ds)} samples per process, fewer than "
                f"batch_size={config.batch_size}: no full batch can be drawn", argument="data",
                fix="add images to the folder, or lower the batch (--set batch_size=N)")
        self.val_batches = []
        if self.main:
            self.val_batches = _val_batches(config, self.mask_gen, **({} if config.data == "demo" else
                                                                     {"warned": warned}))

    @torch.no_grad()
    def _check_model_takes(self, sample) -> None:
        """One (image, mask) sample through the generator (eval mode, no gradient, no random
        draw) before the run folder is touched: a crop size the network cannot take fails
        here, in one line."""
        from ..metrics import SSIM_KERNEL_SIZE

        config, name = self.config, self.config.model
        multiple = getattr(self.recipe, "size_multiple", None)
        if config.size < SSIM_KERNEL_SIZE:   # the validation's SSIM window
            least = -(-SSIM_KERNEL_SIZE // multiple) * multiple if multiple else SSIM_KERNEL_SIZE
            raise InvalidInputError(f"must be at least {SSIM_KERNEL_SIZE} (the window of the validation's SSIM), "
                                    f"got {config.size}", argument="size",
                                    fix=f"give --set size={least} or more" + (f" (a multiple of {multiple} for model "
                                                                              f"{name!r})" if multiple else ""))
        if multiple and config.size % multiple:
            near = config.size // multiple * multiple or multiple
            raise InvalidInputError(f"model {name!r} needs crops whose side is a multiple of {multiple}, got "
                                    f"size={config.size}", argument="size",
                                    fix=f"give a multiple of {multiple}, e.g. --set size={near}")
        image, mask = sample
        was_training = self.generator.training
        self.generator.eval()
        try:
            self.generator(self.recipe.prepare_input(image[None].to(self.device), mask[None].to(self.device)))
        except ValueError as e:
            raise InvalidInputError(f"model {name!r} cannot take {config.size}x{config.size} crops: {e}",
                                    argument="size", fix="change --set size (or the model's options)") from e
        finally:
            self.generator.train(was_training)

    def check_validation(self) -> None:
        """Rank 0, before the run folder is touched: the validation of the classical baselines of
        :data:`VALIDATION_BASELINES` (the mean known colour and OpenCV's Telea; one whose package
        is missing is recorded as unavailable, with the reason) and, at step 0, of the network as
        it starts, computed now (no random draw), so that a metric or network that cannot take
        the validation batches fails while the previous run is intact; :meth:`initial_validation`
        records them."""
        self._first_validation = None
        if self.main and self.val_batches:
            from ..baselines import BaselineUnavailableError, baseline_fill

            for name in VALIDATION_BASELINES:
                try:
                    self.baselines[name] = self.evaluate(baseline_fill(name))[0]
                except BaselineUnavailableError as e:
                    self.baselines_unavailable[name] = str(e)
            self.baseline = self.baselines["mean"]   # what filling holes with the mean known colour scores
            if self.step == 0:
                self._first_validation = self.validate()   # the untrained network, for comparison

    def prepare_run_dir(self) -> None:
        """Rank 0, once the model, the data and (resuming) the checkpoint are known to work: with
        ``overwrite``, delete the previous run's files; then write the resolved config.json."""
        if not self.main:
            return
        if self.overwrite:
            _clear_run(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _write_json(self.run_dir / "config.json", self.config.to_dict())

    def resume(self) -> None:
        """With ``config.resume``, load the latest usable checkpoint of the run directory:
        networks, optimisers, EMA, scaler, structure heads, position, history, RNG states."""
        config = self.config
        if not config.resume:
            return
        if (self.run_dir / "config.json").is_file():
            try:
                trained = json.loads((self.run_dir / "config.json").read_text()).get("model")
            except (OSError, ValueError, AttributeError):
                trained = None
            if trained and trained != config.model:
                raise InvalidInputError(
                    f"{self.run_dir} was trained with model {trained!r}, not {config.model!r}",
                    argument="model", fix=f"give --model {trained} to resume it, or another --out for a new run")
        try:
            found = load_latest(self.ckpt_dir)   # warns and falls back past unusable checkpoints
        except CheckpointError as e:
            raise UnreadableInputError(str(e), argument="resume",
                                       fix="restore a checkpoint, or start the run over with --overwrite") from e
        if found is None:
            if self.main:
                print(f"fastinpaint train: no checkpoint in {self.ckpt_dir}; starting from step 0", flush=True)
            return
        state, path = found
        self.last_ckpt = path
        old = state.get("config", {})
        for key in ("model", "data", "seed", "batch_size", "size", "mask", "grad_accum"):
            if key in old and old[key] != getattr(config, key):
                warnings.warn(f"resuming {path} with {key}={getattr(config, key)!r}, the checkpoint was "
                              f"written with {old[key]!r}: the run will not continue exactly", RuntimeWarning)
        try:
            self.generator.load_state_dict(state["generator"])
        except RuntimeError as e:   # another network shape: model options changed since
            was, now = old.get("model_options", {}), config.model_options
            why = f" (trained with model_options={was}, now {now})" if was != now else ""
            raise InvalidInputError(f"{path} does not fit the network built now{why}: the network's shape "
                                    "cannot change on resume", argument="resume",
                                    fix="resume with the run's own model options (leave --set model_options.* "
                                        "out), or start a new run (another --out)") from e
        self.opt_g.load_state_dict(state["opt_g"])
        if self.discriminator is not None:
            if state.get("discriminator") is None:
                raise ValueError(f"{path} has no discriminator but the config uses one (loss_weights.adv > 0)")
            self.discriminator.load_state_dict(state["discriminator"])
            self.opt_d.load_state_dict(state["opt_d"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"] if state.get("ema") is not None else state["generator"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.structure is not None and state.get("structure") is not None:
            _load_structure_state(self.structure, self.opt_s, state["structure"])
        self.step = int(state["step"])
        if self.step > config.steps:
            raise InvalidInputError(f"the run in {self.run_dir} is already at step {self.step}, past steps="
                                    f"{config.steps}", argument="steps",
                                    fix=f"give --steps above {self.step} to train it further")
        self.epoch, self.batch_in_epoch = int(state["data"]["epoch"]), int(state["data"]["batch"])
        self.history = list(state.get("history", []))
        set_rng_state(state["rng"])
        if self.main:
            print(f"fastinpaint train: resumed from {path} (step {self.step}, epoch {self.epoch}, "
                  f"batch {self.batch_in_epoch})", flush=True)

    def initialise(self) -> None:
        """Fine-tuning (``config.init``), unless a checkpoint was resumed: the generator, and the
        discriminator where the weights have one and the model uses one, from those weights
        (:func:`fastinpaint.weights.read_weights`: a run folder's latest checkpoint, a weights
        file, a training checkpoint, or another project's checkpoint of the model), fitted by
        the recipe (a guided DeepFill v2 from unguided weights). Optimisers, step, data position
        and RNG stay as a new run has them; the EMA starts from the loaded generator."""
        config = self.config
        if not config.init or self.last_ckpt is not None:
            return
        from ..weights import load_into, read_weights

        weights = read_weights(config.init, model=config.model, discriminator=True, argument="init")
        with_d = load_into(self.recipe, weights, model=config.model, options=config.model_options, argument="init")
        if self.ema is not None:
            self.ema.load_state_dict(self.generator.state_dict())
        if self.main:
            what = "generator and discriminator" if with_d else "generator"
            why = ("" if with_d or self.discriminator is None else
                   " (the file holds no discriminator: it starts from random weights)")
            print(f"fastinpaint train: initialised the {what} from {weights.path} ({weights.layout}){why}", flush=True)

    def wrap_distributed(self) -> None:
        """``g_fwd`` / ``d_fwd``: the networks as the training steps call them (DDP-wrapped
        when distributed, the generator compiled with ``config.compile``)."""
        self.g_fwd, self.d_fwd = self.generator, self.discriminator
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.g_fwd = DDP(self.generator, device_ids=ids)
            if self.discriminator is not None:
                self.d_fwd = DDP(self.discriminator, device_ids=ids)
        if self.config.compile:
            self.g_fwd = torch.compile(self.g_fwd)

    # ------------------------------------------------------------------------- data stream

    def seek_data(self, epoch: int, skip: int) -> None:
        """Start the data stream at batch ``skip`` of ``epoch``."""
        set_epoch(self.loader, epoch)
        self._stream = iter(self.loader)
        for _ in range(skip):  # the order depends on (seed, epoch) only: replay and drop
            next(self._stream)

    def next_batch(self):
        """The next batch of the stream, moving on to the next epoch at the end of one."""
        while True:
            try:
                batch = next(self._stream)
                self.batch_in_epoch += 1
                return batch
            except StopIteration:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                self.seek_data(self.epoch, 0)

    # ------------------------------------------------------------------------- one step

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self) -> dict[str, float]:
        """One optimiser step on ``config.grad_accum`` batches; returns the mean losses."""
        batches = [self.next_batch() for _ in range(self.config.grad_accum)]
        self.set_learning_rates()
        logs: dict[str, float] = {}
        if self.discriminator is not None:
            self.discriminator_step(batches, logs)
            # frozen for the generator's step, which calls it unwrapped: its parameters get no
            # gradient, so DDP has nothing of it to all-reduce
            self.discriminator.requires_grad_(False)
        self.generator_step(batches, logs)
        if self.opt_s is not None:
            self.structure_heads_step(batches, logs)
        if self.discriminator is not None:
            self.discriminator.requires_grad_(True)
        if self.ema is not None:
            self.update_ema()
        self.step += 1
        return logs

    def set_learning_rates(self) -> None:
        """The generator's and the discriminator's learning rates for this step:
        ``config.lr`` / ``lr_d`` times :func:`~fastinpaint.train.config.lr_factor` of the step
        (the structure heads keep their own)."""
        config = self.config
        factor = lr_factor(config.lr_schedule, self.step, config.steps, config.warmup_steps)
        for opt, base in ((self.opt_g, config.lr), (self.opt_d, config.lr_d)):
            if opt is not None:
                for group in opt.param_groups:
                    group["lr"] = base * factor

    def discriminator_step(self, batches: list, logs: dict) -> None:
        """The discriminator's step, on the generator's outputs computed without gradient."""
        config, device, recipe, scaler = self.config, self.device, self.recipe, self.scaler
        self.opt_d.zero_grad(set_to_none=True)
        for i, (image, mask) in enumerate(batches):
            image, mask = image.to(device, non_blocking=True), mask.to(device, non_blocking=True)
            sync = (i == len(batches) - 1) or not self.distributed
            ctx = contextlib.nullcontext() if sync else self.d_fwd.no_sync()
            with ctx:
                with torch.no_grad(), self.autocast():
                    out = self.g_fwd(recipe.prepare_input(image, mask))
                with self.autocast():
                    d_losses = recipe.discriminator_losses(image, mask, out, self.d_fwd)
                total = sum(d_losses.values()) / config.grad_accum
                scaler.scale(total).backward()
            for k, v in d_losses.items():
                logs[k] = logs.get(k, 0.0) + float(v.detach()) / config.grad_accum
        scaler.step(self.opt_d)

    def generator_step(self, batches: list, logs: dict) -> None:
        """The generator's step (and the grad scaler's update), the discriminator frozen."""
        config, device, recipe, scaler, structure = self.config, self.device, self.recipe, self.scaler, self.structure
        self.opt_g.zero_grad(set_to_none=True)
        for i, (image, mask) in enumerate(batches):
            image, mask = image.to(device, non_blocking=True), mask.to(device, non_blocking=True)
            sync = (i == len(batches) - 1) or not self.distributed
            ctx = contextlib.nullcontext() if sync else _unwrap_ddp(self.g_fwd).no_sync()
            with ctx:
                with self.autocast():
                    out = self.g_fwd(recipe.prepare_input(image, mask))
                    g_losses = recipe.generator_losses(image, mask, out, self.discriminator)
                    if structure is not None:   # the completed image's structure vs the truth's
                        g_losses["structure"] = structure(recipe.composite(image, mask, out), image)
                total = sum(self.loss_weights.get(k, 1.0) * v for k, v in g_losses.items())
                scaler.scale(total / config.grad_accum).backward()
            for k, v in g_losses.items():
                logs[k] = logs.get(k, 0.0) + float(v.detach()) / config.grad_accum
            logs["g_total"] = logs.get("g_total", 0.0) + float(total.detach()) / config.grad_accum
        scaler.step(self.opt_g)
        scaler.update()

    def structure_heads_step(self, batches: list, logs: dict) -> None:
        """LSeSim: the heads learn their InfoNCE loss on augmented views."""
        structure = self.structure
        self.opt_s.zero_grad(set_to_none=True)
        head_loss = 0.0
        for image, _ in batches:
            part = structure.head_loss(image.to(self.device, non_blocking=True)) / self.config.grad_accum
            part.backward()
            head_loss += float(part.detach())
        if self.distributed:
            for p in structure.head_parameters():
                torch.distributed.all_reduce(p.grad)
                p.grad /= self.world
        self.opt_s.step()
        logs["structure_heads"] = head_loss

    @torch.no_grad()
    def update_ema(self) -> None:
        for pe, p in zip(self.ema.parameters(), self.generator.parameters()):
            pe.lerp_(p.detach(), 1.0 - self.config.ema)
        for be, b in zip(self.ema.buffers(), self.generator.buffers()):
            be.copy_(b)

    def after_step(self, logs: dict) -> None:
        """The non-finite check, then (when due) the log line, checkpoint, validation, ``on_step``."""
        config, step = self.config, self.step
        if not all(math.isfinite(v) for v in logs.values()) and config.amp != "fp16":
            raise FloatingPointError(f"step {step}: non-finite loss {logs}")
        if self.main and (step % config.log_every == 0 or step == config.steps):
            self.logger.scalars(step, {**logs, "epoch": self.epoch})
            self.logger.progress(step, logs)
        # validation first, so the checkpoint's history holds this step's metrics
        if step % config.val_every == 0 and step < config.steps:
            self.run_validation()
        if step % config.checkpoint_every == 0 and step < config.steps:
            self.last_ckpt = self.save_checkpoint() or self.last_ckpt
        if self.on_step is not None:
            self.on_step(step)

    # ------------------------------------------------------------------------- validation

    @torch.no_grad()
    def evaluate(self, fill) -> tuple[dict, torch.Tensor | None]:
        """Metrics and sample grid of ``fill(image, mask) -> output`` on the validation batches."""
        from ..metrics import InpaintingMetrics

        metrics = InpaintingMetrics(sync_on_compute=False).to(self.device)
        grids = []
        for image, mask in self.val_batches:
            image, mask = image.to(self.device), mask.to(self.device)
            out = fill(image, mask).float()
            metrics.update(out, image, mask)
            grids.append(_grid(image, mask, out))
        if not grids:
            return {}, None
        return metrics.compute(), torch.cat(grids, dim=1)

    def validate(self) -> tuple[dict, torch.Tensor | None]:
        """:meth:`evaluate` of the EMA generator (else the generator) in eval mode."""
        net = self.ema if self.ema is not None else self.generator
        was_training = net.training
        net.eval()

        def fill(image, mask):
            with self.autocast():
                return self.final_output(net(self.recipe.prepare_input(image, mask)))

        try:
            return self.evaluate(fill)
        finally:
            net.train(was_training)

    def run_validation(self, computed: tuple | None = None) -> None:
        """Rank 0: validate (``computed``: the ``(values, grid)`` of :meth:`validate` at this step),
        record the metrics (history, metrics.json, log) and keep the grid."""
        if not self.main:
            return
        step = self.step
        values, grid = computed if computed is not None else self.validate()
        self.last_val = values
        again = bool(self.history) and self.history[-1]["step"] == step   # a finished run resumed
        if again:
            self.history[-1] = {"step": step, **values}
        else:
            self.history.append({"step": step, **values})
        _write_json(self.metrics_path, {"step": step, "metrics": values, "history": self.history,
                                        **self.baseline_record()})
        if not again:   # its log line is there already
            self.logger.scalars(step, values, kind="val")
        if grid is not None:
            self.last_grid = grid
            self.logger.image(step, grid)
        self.logger.message(f"fastinpaint train: step {step} validation " +
                            " ".join(f"{k}={v:.4f}" for k, v in values.items()))

    def initial_validation(self) -> None:
        """Rank 0: records the validation of :meth:`check_validation` at step 0 (the untrained
        network; the baselines' are kept beside every validation)."""
        if self.main and self.val_batches and self.step == 0:
            self.run_validation(getattr(self, "_first_validation", None))

    def baseline_record(self) -> dict:
        """The baselines' validation metrics as metrics.json and :func:`train` report them:
        ``baseline_mean_fill`` (the mean-colour fill), ``baselines`` (name -> metrics) and
        ``baselines_unavailable`` (name -> why it could not be run here)."""
        return {"baseline_mean_fill": self.baseline, "baselines": self.baselines,
                "baselines_unavailable": self.baselines_unavailable}

    # ------------------------------------------------------------------------- files

    def save_checkpoint(self) -> Path | None:
        """Rank 0: write the checkpoint of the current step."""
        if not self.main:
            return None
        structure, opt_d = self.structure, self.opt_d
        state = {
            "step": self.step, "data": {"epoch": self.epoch, "batch": self.batch_in_epoch},
            "generator": self.generator.state_dict(), "opt_g": self.opt_g.state_dict(),
            "discriminator": self.discriminator.state_dict() if self.discriminator is not None else None,
            "opt_d": opt_d.state_dict() if opt_d is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "structure": _structure_state(structure, self.opt_s) if structure is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": rng_state(), "config": self.config.to_dict(), "history": self.history,
        }
        # checkpoint.save_checkpoint (atomic write, keeps the last ``keep``), not this method
        return save_checkpoint(self.ckpt_dir, self.step, state, keep=self.config.keep)

    def save_interrupted(self) -> None:
        """Ctrl-C between two steps: save the checkpoint of this step (unless it has one) and
        stop with KeyboardInterrupt; ``--resume`` continues from it exactly."""
        path = self.ckpt_dir / f"ckpt_{self.step:09d}.pt"
        if not path.exists():
            path = self.save_checkpoint()
        print(f"\nfastinpaint train: interrupted at step {self.step}; saved {path}", flush=True)
        raise KeyboardInterrupt

    def export(self) -> dict:
        """The end of the run: rank 0 writes the final checkpoint, the sample grid, the weights
        (and the EMA's) and the metrics; returns the result of :func:`train`."""
        config, run_dir, step, history = self.config, self.run_dir, self.step, self.history
        result = {"step": step, "metrics": self.last_val, **self.baseline_record(),
                  "initial_metrics": history[0] if history and history[0]["step"] == 0 else {},
                  "run_dir": str(run_dir),
                  "config": str(run_dir / "config.json")}
        if self.main:
            self.last_ckpt = self.save_checkpoint()
            if self.last_grid is not None:
                _save_png(self.last_grid, self.grid_path)
                result["grid"] = str(self.grid_path)
            meta = {"model": config.model, "step": str(step), "config": config.to_json()}
            weights_path = save_weights(run_dir / "weights.safetensors", self.generator.state_dict(),
                                        {**meta, "weights": "generator"})
            result["weights"] = str(weights_path)
            if self.ema is not None:
                result["weights_ema"] = str(save_weights(run_dir / "weights_ema.safetensors", self.ema.state_dict(),
                                                         {**meta, "weights": "ema"}))
            result["checkpoint"] = str(self.last_ckpt)
            result["metrics_path"] = str(self.metrics_path)
            if not history or history[-1]["step"] != step:
                _write_json(self.metrics_path, {"step": step, "metrics": self.last_val, "history": history,
                                                **self.baseline_record()})
        return result


def _structure_state(structure, opt_s) -> dict:
    gen = structure.generator
    return {"heads": structure.heads.state_dict() if structure.heads is not None else None,
            "opt": opt_s.state_dict() if opt_s is not None else None,
            "generator": gen.get_state() if gen is not None else None}


def _load_structure_state(structure, opt_s, state: dict) -> None:
    if structure.heads is not None and state.get("heads") is not None:
        structure.heads.load_state_dict(state["heads"])
    if opt_s is not None and state.get("opt") is not None:
        opt_s.load_state_dict(state["opt"])
    if structure.generator is not None and state.get("generator") is not None:
        structure.generator.set_state(state["generator"])


@contextlib.contextmanager
def _deferred_interrupt(enabled: bool):
    """While training (one process, main thread): the first Ctrl-C (SIGINT) only sets a flag,
    which the loop checks between steps (so a checkpoint of a whole step can be saved); a
    second one interrupts at once. Yields the flag's getter."""
    import signal
    import threading

    flag = [False]
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def handler(signum, frame):
        if flag[0]:
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        flag[0] = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: flag[0]
    finally:
        signal.signal(signal.SIGINT, previous)


def _unwrap_ddp(module):
    """The DDP module inside an optional torch.compile wrapper (for ``no_sync``)."""
    return getattr(module, "_orig_mod", module)

