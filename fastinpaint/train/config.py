"""The training configuration: a dataclass, read from TOML or YAML files and overridden
from the command line with ``key=value`` strings."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from typing import Optional
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidInputError

__all__ = ["ConfigError", "LR_SCHEDULES", "TrainConfig", "apply_overrides", "load_config", "lr_factor", "parse_value",
           "read_config_file", "read_run_config"]


class ConfigError(InvalidInputError):
    """A configuration file or override that cannot be used (unknown key, bad value); a
    ``ValueError``, and a :class:`fastinpaint.errors.UserError` (one line from the CLI)."""


_AMP = ("none", "bf16", "fp16")
LR_SCHEDULES = ("constant", "cosine")


def lr_factor(schedule: str, step: int, steps: int, warmup_steps: int = 0) -> float:
    """The learning rates' multiplier for optimiser step ``step`` (0-based) of ``steps``: a
    linear ramp over the first ``warmup_steps`` (``(step + 1) / warmup_steps``), then 1
    ("constant") or a half cosine from 1 down to 0 at ``steps`` ("cosine"). A function of the
    step alone, so a resumed run continues on the same curve."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class TrainConfig:
    model: str = "tiny_gated"
    model_options: dict = field(default_factory=dict)   # e.g. {"width": 8}
    data: str = "demo"                                   # "demo" or an image folder
    samples_per_epoch: int = 1024                        # demo only
    mask: Optional[str] = None                           # None: the model's default_mask (with its
    mask_options: dict = field(default_factory=dict)     # default_mask_options), else free_form
    size: Optional[int] = None                           # None: the model's default_size, else 64
    batch_size: Optional[int] = None                     # per process; None: default_batch_size, else 4
    steps: Optional[int] = None                          # optimiser steps; None: the model's
                                                         # default_steps, else 2000
    lr: Optional[float] = None                           # None: the model's published default_lr
    betas: Optional[tuple] = None                        # None: the model's default_betas
    lr_d: Optional[float] = None                         # discriminator; None: the model's
                                                         # default_lr_discriminator, else lr
    eps: float = 1e-8                                    # Adam's epsilon
    lr_schedule: Optional[str] = None                    # None: the model's default_lr_schedule, else
                                                         # "constant"; "cosine": decays to 0 at `steps`
    warmup_steps: Optional[int] = None                   # linear ramp of the learning rates from 0;
                                                         # None: the model's default_warmup_steps, else 0
    loss_weights: dict = field(default_factory=dict)     # merged over the model's defaults
    structure_loss: dict = field(default_factory=dict)   # {} = off; else the spatially-correlative
                                                         # loss added to any model's generator loss
    amp: str = "none"                                    # "none" | "bf16" | "fp16"
    compile: bool = False
    grad_accum: int = 1
    ema: float = 0.0                                     # EMA decay of the generator; 0 = off
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"                                 # "auto" | "cpu" | "cuda"
    out: str = "runs/fastinpaint"
    checkpoint_every: int = 500
    keep: int = 3
    val_every: int = 500
    val_batches: Optional[int] = None                    # None: the model's default_val_batches, else 2
    log_every: int = 10
    resume: bool = False
    init: Optional[str] = None                           # fine-tune: the weights a new run starts from
                                                         # (fastinpaint.weights; a resumed run that has
                                                         # a checkpoint does not read them again)

    def __post_init__(self):
        self.validate()

    def validate(self) -> "TrainConfig":
        def bad(name, expected):
            return ConfigError(f"must be {expected}, got {getattr(self, name)!r}", argument=name)

        def number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("size", "batch_size", "grad_accum", "keep", "val_batches", "log_every", "samples_per_epoch",
                     "checkpoint_every", "val_every", "steps", "num_workers", "seed", "warmup_steps"):
            v, least = getattr(self, name), 0 if name in ("steps", "num_workers", "seed", "warmup_steps") else 1
            if v is None and name in ("size", "batch_size", "val_batches", "warmup_steps", "steps"):   # model's default
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise bad(name, f"an integer >= {least}")
        if self.lr_schedule is not None and self.lr_schedule not in LR_SCHEDULES:
            raise bad("lr_schedule", f"one of {', '.join(LR_SCHEDULES)} (or none for the model's default)")
        if self.amp not in _AMP:
            raise bad("amp", f"one of {', '.join(_AMP)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise bad("device", "auto, cpu or cuda")
        for name in ("lr", "lr_d"):
            v = getattr(self, name)
            if v is not None and not (number(v) and v > 0):
                raise bad(name, "a number > 0 (or none for the model's default)")
        if not (number(self.eps) and self.eps > 0):
            raise bad("eps", "a number > 0")
        if self.betas is not None:
            betas = tuple(self.betas) if isinstance(self.betas, (tuple, list)) else ()
            if len(betas) != 2 or not all(number(b) and 0 <= b < 1 for b in betas):
                raise bad("betas", "two numbers in [0, 1) (or none for the model's default)")
            self.betas = tuple(float(b) for b in betas)
        if not (number(self.ema) and 0 <= self.ema < 1):
            raise bad("ema", "a decay in [0, 1) (0 = off)")
        for name in ("model_options", "mask_options", "loss_weights", "structure_loss"):
            if not isinstance(getattr(self, name), dict):
                raise bad(name, "a table of keys")
        for name in ("compile", "resume"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "true or false")
        if self.init is not None and (not isinstance(self.init, str) or not self.init.strip()):
            raise bad("init", "the path of weights to start from (or none)")
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if self.betas is not None:
            d["betas"] = list(self.betas)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        unknown = sorted(set(values) - set(_fields()))
        if unknown:
            raise ConfigError(f"unknown config key(s) {', '.join(unknown)}", argument="config",
                              fix=f"valid keys: {', '.join(sorted(_fields()))}")
        values = dict(values)
        if "betas" in values and isinstance(values["betas"], list):
            values["betas"] = tuple(values["betas"])
        if "data" in values:
            values["data"] = str(values["data"])
        if "out" in values:
            values["out"] = str(values["out"])
        if values.get("init") is not None and not isinstance(values["init"], (bool, int, float)):
            values["init"] = str(values["init"])
        for name in ("lr", "lr_d", "ema", "eps"):
            if isinstance(values.get(name), int) and not isinstance(values.get(name), bool):
                values[name] = float(values[name])
        return cls(**values)


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def read_config_file(path) -> dict:
    """The key/value table of a ``.toml``, ``.yaml`` or ``.yml`` file (keys unchecked)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{str(path)!r} does not exist" if not path.exists() else f"{str(path)!r} is not a file",
                          argument="config", fix="give the path of a .toml or .yaml file of train settings")
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            import tomllib
        except ImportError:   # Python 3.10
            import tomli as tomllib
        try:
            with open(path, "rb") as f:
                values = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path} is not valid TOML: {e}", argument="config") from e
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"reading the YAML file {path} needs the PyYAML package", argument="config",
                              fix="pip install pyyaml, or write the config as TOML") from None
        try:
            with open(path, encoding="utf-8") as f:
                values = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}", argument="config") from e
    else:
        raise ConfigError(f"{path}: unknown format {suffix!r}", argument="config",
                          fix="write the settings as .toml, .yaml or .yml")
    if not isinstance(values, dict):
        raise ConfigError(f"{path} holds a {type(values).__name__}, not a table of keys", argument="config",
                          fix="write key = value lines (TOML) or key: value lines (YAML)")
    return values


_TRUE = {"1", "true", "yes", "on"}
_KIND_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               tuple: "numbers separated by commas", dict: "a JSON object"}
_FALSE = {"0", "false", "no", "off"}


def parse_value(text: str):
    """A dict value from the command line: JSON when it parses (numbers, true/false, lists),
    else the string itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _convert(key: str, kind, text: str):
    try:
        if kind is bool:
            t = text.strip().lower()
            if t in _TRUE:
                return True
            if t in _FALSE:
                return False
            raise ValueError("expected true or false")
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is str:
            return text
        if kind is tuple:
            parts = text.strip().strip("()[]").split(",")
            return tuple(float(p) for p in parts if p.strip())
        if kind is dict:
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError("expected a JSON object, e.g. {\"adv\": 0.1}")
            return value
    except ValueError as e:
        raise ConfigError(f"{key}={text}: not {_KIND_WORDS[kind]} ({e})", argument="set",
                          fix=f"give {key} {_KIND_WORDS[kind]}") from None
    raise ConfigError(f"{key}: unsupported type {kind}", argument="set")


def apply_overrides(values: dict, overrides) -> dict:
    """``values`` updated with ``key=value`` strings converted to the field's type.
    ``table.key=value`` sets one entry of a dict field (``loss_weights.adv=0.1``)."""
    values = dict(values)
    hints = typing.get_type_hints(TrainConfig)
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"{item!r} is not key=value", argument="set", fix="write e.g. --set lr=2e-4")
        key, text = item.split("=", 1)
        key = key.strip()
        top, _, sub = key.partition(".")
        if top not in hints:
            raise ConfigError(f"unknown config key {top!r} in {item}", argument="set",
                              fix=f"valid keys: {', '.join(sorted(hints))}")
        kind = hints[top]
        if typing.get_origin(kind) is typing.Union:   # Optional[X]: "none" unsets, else X
            if text.strip().lower() in ("none", "null", "default"):
                values[top] = None
                continue
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if sub:
            if kind is not dict:
                raise ConfigError(f"{item}: {top} is not a table, so {key!r} has no meaning", argument="set",
                                  fix=f"write --set {top}=VALUE")
            table = dict(values.get(top) or {})
            table[sub] = parse_value(text)
            values[top] = table
        else:
            values[top] = _convert(key, kind, text)
    return values


def read_run_config(run_dir) -> dict | None:
    """The settings a run was trained with (its ``config.json``), or None when it has none."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} cannot be read ({e})", argument="resume",
                          fix="repair or delete it (the options given then set the run up)") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path} is not a table of settings", argument="resume",
                          fix="repair or delete it (the options given then set the run up)")
    return {k: v for k, v in values.items() if k in _fields()}


def load_config(path=None, overrides=None, **values) -> TrainConfig:
    """Defaults < the config file at ``path`` < ``values`` < ``overrides`` (``key=value`` strings).

    With ``resume`` set, the run's own ``config.json`` (in ``out``) comes first of all: a
    resumed run keeps the settings it was trained with, save those given again here. ``init``
    given here (an option or an override) with ``resume`` is refused: a resumed run continues
    from its own checkpoint (an ``init`` kept in the run's settings or the config file is the
    record of how the run started, and is not read again)."""
    def merge(base):
        merged = dict(base)
        merged.update(read_config_file(path) if path is not None else {})
        merged.update({k: v for k, v in values.items() if v is not None})
        return apply_overrides(merged, overrides)

    merged = merge({})
    init_given = values.get("init") is not None or any(
        str(o).split("=", 1)[0].strip() == "init" and "=" in str(o) and
        str(o).split("=", 1)[1].strip().lower() not in ("none", "null", "default") for o in overrides or ())
    if merged.get("resume") and init_given:
        raise ConfigError("cannot go with --resume: a resumed run continues from its own checkpoint, which already "
                          "holds the weights it started from", argument="init",
                          fix="leave out --init to continue the run, or leave out --resume (and give a new --out) "
                              "to start a run from these weights")
    if merged.get("resume"):
        out = merged.get("out", TrainConfig.out)
        saved = read_run_config(out)
        if saved is not None:
            merged = {**merge(saved), "out": str(out), "resume": True}
    try:
        return TrainConfig.from_dict(merged)
    except ConfigError as e:
        given = {k for k, v in values.items() if v is not None}
        given |= {str(o).split("=", 1)[0].split(".", 1)[0].strip() for o in overrides or ()}
        if path is not None and e.argument not in given and e.argument in read_config_file(path):
            # the bad value came from the file: say so, not the option the user did not give
            raise ConfigError(f"{e.argument} in {path}: {e.message}", argument="config", fix=e.fix) from None
        raise
