"""Inpainting models as *recipes*: a generator, an optional discriminator, their losses and
the generator's input recipe. ``build_model(name, **options)`` builds one from :data:`MODELS`."""

from __future__ import annotations

from .tiny import PatchDiscriminator, TinyGatedGenerator, TinyGatedRecipe
# Context Encoders (Pathak et al., CVPR 2016)
from .context_encoder import (ContextEncoderDiscriminator, ContextEncoderFeaturesRecipe, ContextEncoderGenerator,
                              ContextEncoderRecipe)

__all__ = ["ContextEncoderDiscriminator", "ContextEncoderFeaturesRecipe", "ContextEncoderGenerator",
           "ContextEncoderRecipe", "MODELS", "PatchDiscriminator", "TinyGatedGenerator", "TinyGatedRecipe",
           "build_model"]

MODELS = {
    "tiny_gated": TinyGatedRecipe,
    "context_encoder": ContextEncoderRecipe,
    "context_encoder_features": ContextEncoderFeaturesRecipe,
}
def build_model(name: str, **options):
    """The recipe registered as ``name`` in :data:`MODELS`, built with ``options``."""
    try:
        cls = MODELS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}") from None
    return cls(**options)
