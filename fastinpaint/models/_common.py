"""Helpers shared by the model recipes."""

from __future__ import annotations

from ..errors import InvalidInputError


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
