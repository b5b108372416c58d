"""Helpers shared by the model recipes."""

from __future__ import annotations


def merge_loss_weights(model_name: str, defaults: dict, overrides: dict | None) -> dict:
    """``defaults`` updated with ``overrides`` (float weights >= 0 of losses the model has)."""
    weights = dict(defaults)
    for k, v in (overrides or {}).items():
        if k not in weights:
            raise ValueError(f"{model_name} has no loss {k!r}; its losses are {sorted(weights)}")
        v = float(v)
        if not v >= 0:
            raise ValueError(f"loss weight {k!r} must be >= 0, got {v}")
        weights[k] = v
    return weights
