"""Weights from every source the commands take, for inference (``fastinpaint inpaint``),
conversion (``fastinpaint convert``) and fine-tuning (``fastinpaint train --init``):

* a run folder (the ``--out`` of ``fastinpaint train``): its ``weights.safetensors``, or for
  fine-tuning its latest checkpoint (which holds the discriminator too);
* a weights file (``.safetensors`` whose metadata holds the config: a run's, or one written by
  ``fastinpaint convert``);
* a training checkpoint (``checkpoints/ckpt_*.pt``);
* another project's checkpoint, for a model whose recipe reads one (``convert_foreign``:
  DeepFill v2 reads its PyTorch port's ``.pth`` files): the model is named by the caller, as
  such a file does not say what it holds.

:func:`read_weights` reads a source into :class:`Weights`; :func:`load_pretrained` builds the
model the weights are for and loads its generator; :func:`load_into` loads them into a
recipe's networks (the recipe's ``adapt_pretrained`` first fits them, e.g. the guided DeepFill
v2 from unguided weights). Which layout a file has is recognised from its keys; a file whose
keys are not the network's, once converted, is refused naming the first missing and the first
unexpected key, and one of another width naming the first tensor whose shape differs.

Every fault is a :class:`fastinpaint.errors.UserError` naming the argument given (``checkpoint``
for ``inpaint`` and ``convert``, ``init`` for ``train``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputNotFoundError, InvalidInputError, UnreadableInputError

__all__ = ["Weights", "convert_weights", "load_into", "load_pretrained", "read_weights"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
CHECKPOINT_FIX = ("give a run folder (the --out of fastinpaint train), its weights.safetensors, or one of its "
                  "checkpoints/ckpt_*.pt files")


@dataclass
class Weights:
    """The networks' states read from one source.

    ``generator``: its state dict, in fastinpaint's names; ``discriminator``: the
    discriminator's, where the source has one (else None); ``config``: the fastinpaint
    settings the weights were trained (or converted) with (``model``, ``model_options``,
    ``loss_weights``, ...), None for another project's file; ``path``: the file read;
    ``layout``: what the file was read as, in words."""

    generator: dict
    discriminator: dict | None
    config: dict | None
    path: Path
    layout: str


# ----------------------------------------------------------------------------- reading

def _no_ema(where: Path, run_config: dict | None = None) -> InvalidInputError:
    trained = "" if run_config is None else f" (ema = {run_config.get('ema', 0)})"
    run = f"the run in {where}" if where.is_dir() else f"the run of {where}"
    return InvalidInputError(f"{run} was trained without EMA{trained}, so it has no EMA weights",
                             argument="ema", fix="leave out --ema, or train with --set ema=0.999 to keep an EMA "
                                                 "of the generator")


def _weights_of_run(run: Path, ema: bool, argument: str) -> Path:
    """The weights file of the run folder ``run``, or the error saying why there is none."""
    from .train.checkpoint import list_checkpoints

    name = "weights_ema.safetensors" if ema else "weights.safetensors"
    if (run / name).is_file():
        return run / name
    run_config = None
    if (run / "config.json").is_file():
        try:
            run_config = json.loads((run / "config.json").read_text())
        except (OSError, ValueError):
            run_config = None
    if ema and (run / "weights.safetensors").is_file():
        if run_config is None or not run_config.get("ema"):
            raise _no_ema(run, run_config)
        raise InputNotFoundError(f"{run} has no weights_ema.safetensors although it was trained with "
                                 f"ema = {run_config['ema']}", argument=argument,
                                 fix="give the run's latest checkpoints/ckpt_*.pt with --ema instead")
    checkpoints = list_checkpoints(run / "checkpoints")
    if checkpoints:
        raise InputNotFoundError(f"the run in {run} has not finished: it has no {name} yet", argument=argument,
                                 fix=f"give its latest checkpoint {checkpoints[-1]}, or finish the run "
                                     "(fastinpaint train with the same options and --resume)")
    raise InputNotFoundError(f"{run} holds no fastinpaint run (no {name})", argument=argument, fix=CHECKPOINT_FIX)


def _foreign_readers() -> list[str]:
    from .models import MODELS

    return sorted(name for name, cls in MODELS.items() if hasattr(cls, "convert_foreign"))


def _foreign_hint() -> str:
    names = _foreign_readers()
    return (f"; for weights of another project (a DeepFill v2 PyTorch port's .pth) name the model: "
            f"--model {' or '.join(names)}") if names else ""


def _starts_with(path: Path, *prefixes: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(max(len(p) for p in prefixes))
    except OSError:
        return False
    return head.startswith(prefixes)


def _is_fastinpaint_checkpoint(path: Path) -> bool:
    from .train.checkpoint import MAGIC

    return _starts_with(path, MAGIC)


def _is_torch_file(path: Path) -> bool:
    """A ``torch.save`` file: a zip archive, or (before torch 1.6) a pickle."""
    return _starts_with(path, b"PK\x03\x04", b"\x80\x02")


def _text_file(path: Path) -> tuple[str, str] | None:
    """(what it is, how to get the file meant) for a text file given as weights (a Git LFS
    pointer, a web page saved by a download, ...); None for a binary file."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    text = head.decode("utf-8", errors="replace")
    if not text or "\0" in text or sum(c.isprintable() or c in "\r\n\t" for c in text) < 0.95 * len(text):
        return None
    start = text.lstrip().lower()
    if start.startswith("version https://git-lfs"):
        return ("a Git LFS pointer, not the file it points to", "fetch the file itself (git lfs pull) and give that")
    if start.startswith(("<!doctype html", "<html")):
        return ("a web page (HTML)", "a download that saved a page (sign-in, quota or error) instead of the file "
                                     "gives this: download the weights again and give that file")
    return (f"a text file (it starts with {' '.join(text.split())[:40]!r})",
            "give the weights file itself (a download that saved a page or a link instead of the file gives a text "
            "file: download it again)")


def _torch_load(path: Path, argument: str) -> dict:
    """Another project's ``torch.save`` file: tensors, numbers and dicts of them only."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # a zip or pickle that is not one, or holds objects other than tensors
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        fix = "give the file the other project saved with torch.save (its state dicts of tensors)"
        if _is_torch_file(path):   # a torch.save file, cut short or holding other objects
            raise UnreadableInputError(f"cannot read {path} as a PyTorch checkpoint ({reason})", argument=argument,
                                       fix=fix + "; a download cut short gives this too: download it again") from e
        text = _text_file(path)
        reason = reason.split(". ", 1)[0]   # torch's advice on weights_only does not apply to a file of no format
        raise UnreadableInputError(f"{path} is not a PyTorch checkpoint (torch.load failed: {reason})"
                                   + (f": it is {text[0]}" if text else ""), argument=argument,
                                   fix=text[1] if text else fix) from e
    if not isinstance(state, dict):
        raise UnreadableInputError(f"{path} holds a {type(state).__name__}, not a dict of state dicts",
                                   argument=argument, fix="give the file the other project saved with torch.save "
                                                          "(its state dicts of tensors)")
    return state


def _foreign(path: Path, state: dict, model: str, ema: bool, argument: str) -> Weights:
    from .models import MODELS, build_model

    if model not in MODELS:
        build_model(model)   # raises the one error for an unknown model name
    convert = getattr(MODELS[model], "convert_foreign", None)
    if convert is None:
        raise InvalidInputError(f"{path} is not a fastinpaint checkpoint or weights file, and model {model!r} reads "
                                "no other project's weights", argument=argument,
                                fix=CHECKPOINT_FIX + (f" (models that read other projects' weights: "
                                                      f"{', '.join(_foreign_readers())})" if _foreign_readers()
                                                      else ""))
    if ema:
        raise InvalidInputError(f"{path} is another project's checkpoint, which holds no EMA weights of fastinpaint's",
                                argument="ema", fix="leave out --ema")
    try:
        layout, generator, discriminator = convert(state)
    except ValueError as e:
        raise UnreadableInputError(f"{path}: {e}", argument=argument, fix=CHECKPOINT_FIX) from e
    return Weights(generator, discriminator, None, path, layout)


def read_weights(path, *, model: str | None = None, ema: bool = False, discriminator: bool = False,
                 argument: str = "checkpoint") -> Weights:
    """The :class:`Weights` of ``path`` (a run folder, a ``.safetensors`` weights file, a
    training checkpoint, or, with ``model`` named, another project's checkpoint for that
    model).

    ``ema``: the EMA of the generator (a run folder's weights_ema.safetensors, a checkpoint's
    EMA state); a run trained without EMA is refused, never silently replaced by the plain
    weights. ``discriminator``: a run folder is read from its latest checkpoint, which holds
    the discriminator too (its weights file when it has no checkpoint). ``model``: the model
    the caller wants; a fastinpaint file that holds another model is refused. Errors name
    ``argument``."""
    from .train.checkpoint import CheckpointError, list_checkpoints, load_latest

    path = Path(path)
    if path.is_dir():
        found = None
        if discriminator and not ema and list_checkpoints(path / "checkpoints"):
            try:
                found = load_latest(path / "checkpoints")
            except CheckpointError as e:
                raise UnreadableInputError(str(e), argument=argument, fix=f"give {path}/weights.safetensors "
                                                                          "instead") from e
        if found is not None:
            weights = _from_checkpoint(found[0], found[1], ema)
        else:
            weights = read_weights(_weights_of_run(path, ema, argument), model=model, ema=ema, argument=argument)
    elif not path.exists():
        raise InputNotFoundError(f"{path} does not exist", argument=argument, fix=CHECKPOINT_FIX)
    elif not path.is_file():
        raise InvalidInputError(f"{path} is not a file or a folder", argument=argument, fix=CHECKPOINT_FIX)
    else:
        weights = _read_file(path, model, ema, argument)
    if model is not None and weights.config is not None and weights.config.get("model") != model:
        raise InvalidInputError(f"{path} holds weights of model {weights.config.get('model')!r}, not {model!r}",
                                argument=argument, fix=f"give weights of a {model} model, or use model "
                                                       f"{weights.config.get('model')} (a fastinpaint file names "
                                                       "its model)")
    return weights


def _from_checkpoint(ckpt: dict, path: Path, ema: bool) -> Weights:
    config = ckpt["config"]
    if ema and ckpt.get("ema") is None:
        raise _no_ema(path, config)
    return Weights(ckpt["ema"] if ema else ckpt["generator"], None if ema else ckpt.get("discriminator"), config,
                   path, "a fastinpaint checkpoint")


def _read_file(path: Path, model: str | None, ema: bool, argument: str) -> Weights:
    from .train.checkpoint import CheckpointError, load_checkpoint, load_weights, weights_metadata

    try:
        if path.suffix == ".safetensors":
            meta = weights_metadata(path)
            if "config" not in meta:
                if model is not None:
                    return _foreign(path, load_weights(path), model, ema, argument)
                raise UnreadableInputError(f"{path} carries no training config in its metadata (it was not "
                                           "written by fastinpaint train or convert)", argument=argument,
                                           fix=CHECKPOINT_FIX + _foreign_hint())
            config = json.loads(meta["config"])
            if ema and meta.get("weights") != "ema" and path.name != "weights_ema.safetensors":
                sibling = path.with_name("weights_ema.safetensors")
                if sibling.is_file():
                    raise InvalidInputError(f"{path} holds the generator's plain weights, not its EMA",
                                            argument="ema", fix=f"give {sibling} (or the run folder) with --ema")
                raise _no_ema(path, config)
            return Weights(load_weights(path), None, config, path, "fastinpaint weights")
        if model is not None and not _is_fastinpaint_checkpoint(path):
            return _foreign(path, _torch_load(path, argument), model, ema, argument)
        return _from_checkpoint(load_checkpoint(path), path, ema)
    except CheckpointError as e:
        image = path.suffix.lower() in IMAGE_EXTENSIONS
        text = None if image else _text_file(path)
        if image:
            what = "an image, not a checkpoint"
        elif _is_torch_file(path):
            what = "a plain PyTorch file (torch.save), not a fastinpaint checkpoint or weights file"
        elif text is not None:
            what = f"{text[0]}, not a checkpoint or weights file"
        else:
            what = f"not a fastinpaint checkpoint or weights file ({e.reason})"
        raise UnreadableInputError(f"{path} is {what}", argument=argument,
                                   fix=text[1] if text else CHECKPOINT_FIX + ("" if image else _foreign_hint())) from e


# ----------------------------------------------------------------------------- loading

def _load(module: torch.nn.Module, state: dict, what: str, weights: Weights, model: str, known: str,
          options: dict, argument: str) -> None:
    """``module.load_state_dict(state)``, after checking the keys and shapes, with a one-line
    error naming the first key that differs."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = [f"{len(missing)} of the network's keys missing, the first {missing[0]!r}" if missing else "",
                 f"{len(unexpected)} unexpected, the first {unexpected[0]!r}" if unexpected else ""]
        raise InvalidInputError(
            f"{weights.path} matches no known layout of {model} {what} weights ({known}); read as "
            f"{weights.layout}: {'; '.join(p for p in parts if p)}", argument=argument,
            fix=CHECKPOINT_FIX + (", or another project's checkpoint of a layout named above"
                                  if known != "fastinpaint's" else ""))
    for key, value in expected.items():
        got = state[key]
        if not isinstance(got, torch.Tensor):
            raise InvalidInputError(f"{weights.path}: {key} is a {type(got).__name__}, not a tensor",
                                    argument=argument, fix=CHECKPOINT_FIX)
        if got.shape != value.shape:
            how = "--set model_options.KEY=VALUE" if argument == "init" else "--model-option KEY=VALUE"
            raise InvalidInputError(
                f"{weights.path}: the {what}'s {key} is {tuple(got.shape)} there but {tuple(value.shape)} in the "
                f"{model} network built with model options {options}", argument=argument,
                fix=f"build the network the weights were trained with ({how}: its width, guided, ...)")
    module.load_state_dict(state)


def load_into(recipe, weights: Weights, *, model: str, options: dict, argument: str,
              discriminator: bool = True) -> bool:
    """Load ``weights`` into ``recipe``'s generator, and its discriminator when
    ``discriminator``, the recipe has one and the weights have one (returns whether it was
    loaded). The recipe's ``adapt_pretrained`` fits the states first (e.g. a guided DeepFill
    v2 from unguided weights). ``model`` and ``options`` name the network in the errors."""
    from .models._common import strip_wrapper_prefixes

    generator = strip_wrapper_prefixes(weights.generator)
    disc = weights.discriminator if discriminator and recipe.discriminator is not None else None
    disc = strip_wrapper_prefixes(disc) if disc is not None else None
    adapt = getattr(recipe, "adapt_pretrained", None)
    if adapt is not None:
        generator, disc = adapt(generator, disc)
    known = getattr(recipe, "weight_layouts", "fastinpaint's") if weights.config is None else "fastinpaint's"
    _load(recipe.generator, generator, "generator", weights, model, known, options, argument)
    if disc is not None:
        _load(recipe.discriminator, disc, "discriminator", weights, model, known, options, argument)
    return disc is not None


def _build(model: str, options: dict, loss_weights, argument: str):
    from .models import build_model

    try:
        return build_model(model, loss_weights=loss_weights, **options)
    except InvalidInputError as e:
        if e.argument == "model_options" and argument != "init":   # the command line's --model-option
            raise InvalidInputError(e.message, argument="model_option", fix=e.fix) from e
        raise


def load_pretrained(path, *, model: str | None = None, model_options: dict | None = None, ema: bool = False,
                    argument: str = "checkpoint"):
    """``(recipe, weights, model, options)``: the recipe the weights of ``path`` are for, built
    and with its generator loaded (:func:`read_weights` reads ``path``).

    A fastinpaint file names its model and options (``model``, when given, must be the same;
    ``model_options`` override the file's). Another project's checkpoint needs ``model``; its
    options are the recipe's ``foreign_defaults`` (what those weights were trained with, e.g.
    DeepFill v2's ``attention_masking = "official"``) updated with ``model_options``."""
    weights = read_weights(path, model=model, ema=ema, argument=argument)
    if weights.config is not None:
        model = weights.config["model"]
        options = {**weights.config.get("model_options", {}), **(model_options or {})}
        loss_weights = weights.config.get("loss_weights")
    else:
        from .models import MODELS

        options = {**getattr(MODELS[model], "foreign_defaults", {}), **(model_options or {})}
        loss_weights = None
    recipe = _build(model, options, loss_weights, argument)
    load_into(recipe, weights, model=model, options=options, argument=argument, discriminator=False)
    return recipe, weights, model, options


def convert_weights(path, out, *, model: str | None = None, model_options: dict | None = None,
                    overwrite: bool = False) -> Path:
    """Write the generator of ``path`` (any source :func:`load_pretrained` reads, another
    project's checkpoint included) to ``out``, a ``.safetensors`` file with the config in its
    metadata: every command then takes it as it takes a trained run's weights. An existing
    ``out`` is refused (:class:`~fastinpaint.errors.OutputExistsError`) unless ``overwrite``."""
    from .errors import OutputExistsError, check_folder

    out = Path(out)
    if out.suffix != ".safetensors":
        raise InvalidInputError(f"{out} does not end in .safetensors", argument="out",
                                fix="name the weights file NAME.safetensors")
    if Path(path).is_file() and out.exists() and out.resolve() == Path(path).resolve():
        raise InvalidInputError(f"{out} would overwrite the weights read", argument="out", fix="give another file")
    if out.is_dir():
        raise InvalidInputError(f"{out} is a folder", argument="out", fix="give the name of the .safetensors file")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists", argument="out",
                                fix="add --overwrite to replace it, or give another --out")
    check_folder(out.parent, argument="out", what="the weights file")
    from .train.checkpoint import save_weights

    recipe, weights, model, options = load_pretrained(path, model=model, model_options=model_options,
                                                      argument="weights")
    config = dict(weights.config) if weights.config is not None else {"model": model}
    config["model_options"] = options
    meta = {"model": model, "config": json.dumps(config, sort_keys=True), "weights": "generator",
            "source": weights.path.name, "layout": weights.layout}
    return save_weights(out, recipe.generator.state_dict(), meta)
