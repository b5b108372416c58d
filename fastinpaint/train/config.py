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

__all__ = ["ConfigError", "TrainConfig", "apply_overrides", "load_config", "read_config_file"]


class ConfigError(InvalidInputError):
    """A configuration file or override that cannot be used (unknown key, bad value); a
    ``ValueError``, and a :class:`fastinpaint.errors.UserError` (one line from the CLI)."""


_AMP = ("none", "bf16", "fp16")


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
    steps: int = 2000                                    # optimiser steps
    lr: Optional[float] = None                           # None: the model's published default_lr
    betas: Optional[tuple] = None                        # None: the model's default_betas
    lr_d: Optional[float] = None                         # discriminator; None: the model's
                                                         # default_lr_discriminator, else lr
    eps: float = 1e-8                                    # Adam's epsilon
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
    val_batches: int = 2
    log_every: int = 10
    resume: bool = False

    def __post_init__(self):
        self.validate()

    def validate(self) -> "TrainConfig":
        def positive(name, allow_zero=False):
            v = getattr(self, name)
            if v is None and name in ("size", "batch_size"):   # the model's default
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
                raise ConfigError(f"{name} must be an int >= {0 if allow_zero else 1}, got {v!r}")

        for name in ("size", "batch_size", "grad_accum", "keep", "val_batches", "log_every", "samples_per_epoch",
                     "checkpoint_every", "val_every"):
            positive(name)
        for name in ("steps", "num_workers", "seed"):
            positive(name, allow_zero=True)
        if self.amp not in _AMP:
            raise ConfigError(f"amp must be one of {_AMP}, got {self.amp!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and not isinstance(self.lr, bool)
                                        and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a number > 0 (or unset for the model's default), got {self.lr!r}")
        if self.lr_d is not None and not (isinstance(self.lr_d, (int, float)) and not isinstance(self.lr_d, bool)
                                          and math.isfinite(self.lr_d) and self.lr_d > 0):
            raise ConfigError(f"lr_d must be a number > 0 (or unset for the model's default), got {self.lr_d!r}")
        if not (isinstance(self.eps, (int, float)) and not isinstance(self.eps, bool) and self.eps > 0
                and math.isfinite(self.eps)):
            raise ConfigError(f"eps must be a number > 0, got {self.eps!r}")
        if self.betas is not None:
            betas = tuple(self.betas) if isinstance(self.betas, (tuple, list)) else ()
            if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
                raise ConfigError(f"betas must be two numbers in [0, 1) (or unset for the model's default), "
                                  f"got {self.betas!r}")
            self.betas = tuple(float(b) for b in betas)
        if not (isinstance(self.ema, (int, float)) and 0 <= self.ema < 1):
            raise ConfigError(f"ema must be a decay in [0, 1) (0 = off), got {self.ema!r}")
        for name in ("model_options", "mask_options", "loss_weights", "structure_loss"):
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"{name} must be a table/dict, got {getattr(self, name)!r}")
        for name in ("compile", "resume"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
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
            raise ConfigError(f"unknown config key(s) {unknown}; valid keys: {', '.join(sorted(_fields()))}")
        values = dict(values)
        if "betas" in values and isinstance(values["betas"], list):
            values["betas"] = tuple(values["betas"])
        if "data" in values:
            values["data"] = str(values["data"])
        if "out" in values:
            values["out"] = str(values["out"])
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
        raise ConfigError(f"config file {str(path)!r} does not exist")
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
            raise ConfigError(f"config file {path}: invalid TOML: {e}") from e
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"reading the YAML config {path} needs the PyYAML package "
                              "(pip install pyyaml), or write the config as TOML") from None
        try:
            with open(path, encoding="utf-8") as f:
                values = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path}: invalid YAML: {e}") from e
    else:
        raise ConfigError(f"config file {path}: unknown format {suffix!r}; use .toml, .yaml or .yml")
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path}: expected a table of keys, got {type(values).__name__}")
    return values


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse_scalar(text: str):
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
        raise ConfigError(f"--set {key}={text}: cannot convert to {kind.__name__}: {e}") from None
    raise ConfigError(f"--set {key}: unsupported type {kind}")


def apply_overrides(values: dict, overrides) -> dict:
    """``values`` updated with ``key=value`` strings converted to the field's type.
    ``table.key=value`` sets one entry of a dict field (``loss_weights.adv=0.1``)."""
    values = dict(values)
    hints = typing.get_type_hints(TrainConfig)
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        top, _, sub = key.partition(".")
        if top not in hints:
            raise ConfigError(f"unknown config key {top!r} in --set {item}; valid keys: {', '.join(sorted(hints))}")
        kind = hints[top]
        if typing.get_origin(kind) is typing.Union:   # Optional[X]: "none" unsets, else X
            if text.strip().lower() in ("none", "null", "default"):
                values[top] = None
                continue
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if sub:
            if kind is not dict:
                raise ConfigError(f"--set {item}: {top} is not a table, so {key!r} has no meaning")
            table = dict(values.get(top) or {})
            table[sub] = _parse_scalar(text)
            values[top] = table
        else:
            values[top] = _convert(key, kind, text)
    return values


def load_config(path=None, overrides=None, **values) -> TrainConfig:
    """Defaults < the config file at ``path`` < ``values`` < ``overrides`` (``key=value`` strings)."""
    merged = read_config_file(path) if path is not None else {}
    merged.update({k: v for k, v in values.items() if v is not None})
    merged = apply_overrides(merged, overrides)
    return TrainConfig.from_dict(merged)
