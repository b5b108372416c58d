"""Helpers shared by the model recipes."""

from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..errors import InvalidInputError
from ..ops._layout import is_channels_last


def known_same_size(size, target) -> bool:
    """Whether ``size`` equals ``target`` (sequences of ints). While ``torch.export`` traces with
    a dynamic height and width, a symbolic size is "the same" only where that holds for every
    size, so a model takes its resampling branch (resampling to the same size is the identity)
    instead of pinning the traced size with a guard."""
    return len(size) == len(target) and all(statically_known_true(a == b) for a, b in zip(size, target))


def channels_last_on_cpu(x: torch.Tensor, op, enabled: bool = True) -> tuple[torch.Tensor, bool]:
    """``(x, converted)``: ``x`` in channels_last when ``enabled`` and ``x`` is a 4-D NCHW CPU
    tensor on which ``op`` (the model's main fastinpaint op, a
    :class:`fastinpaint.ops._registry.Op`) runs its ``cpu`` backend; else ``x`` as it is.
    oneDNN's convolutions and fastinpaint's CPU kernels are faster on channels_last maps than
    on NCHW ones, and inductor lays the convolutions of a compiled NCHW model out channels_last
    for the same reason; under the reference backend a model runs as written."""
    convert = enabled and x.device.type == "cpu" and x.dim() == 4 and not is_channels_last(x) \
        and op.select(x) == "cpu"
    return (x.contiguous(memory_format=torch.channels_last), True) if convert else (x, False)


def merge_loss_weights(model_name: str, defaults: dict, overrides: dict | None) -> dict:
    """``defaults`` updated with ``overrides`` (float weights >= 0 of losses the model has)."""
    weights = dict(defaults)
    for k, v in (overrides or {}).items():
        if k not in weights:
            raise InvalidInputError(f"{model_name} has no loss {k!r}", argument="loss_weights",
                                    fix=f"its losses: {', '.join(sorted(weights))}")
        try:
            v = float(v)
        except (TypeError, ValueError):
            v = float("nan")
        if not v >= 0:
            raise InvalidInputError(f"the weight of {k!r} must be a number >= 0, got {overrides[k]!r}",
                                    argument="loss_weights")
        weights[k] = v
    return weights


def strip_wrapper_prefixes(state: dict) -> dict:
    """``state`` with the key prefixes of wrappers removed: ``module.`` (DataParallel,
    DistributedDataParallel) and ``_orig_mod.`` (torch.compile), however nested."""
    out = {}
    for k, v in state.items():
        while True:
            for prefix in ("module.", "_orig_mod."):
                if k.startswith(prefix):
                    k = k[len(prefix):]
                    break
            else:
                break
        out[k] = v
    return out
