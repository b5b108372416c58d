"""Inpainting models as *recipes*: a generator, an optional discriminator, their losses and
the generator's input recipe. ``build_model(name, **options)`` builds one from :data:`MODELS`."""

from __future__ import annotations

from ..errors import InvalidInputError, check_keywords
from .tiny import PatchDiscriminator, TinyGatedGenerator, TinyGatedRecipe
# Context Encoders (Pathak et al., CVPR 2016)
from .context_encoder import (ContextEncoderDiscriminator, ContextEncoderFeaturesRecipe, ContextEncoderGenerator,
                              ContextEncoderRecipe)
# DeepFill v2 (Yu et al., ICCV 2019)
from .contextual_attention import ContextualAttention, contextual_attention
from .deepfill_v2 import DeepFillV2Generator, DeepFillV2Recipe, SNPatchGANDiscriminator, convert_port_state_dict
# distillation-guided image inpainting (Suin et al., ICCV 2021)
from .dgii import DGIIGenerator, DGIIRecipe

__all__ = ["ContextEncoderDiscriminator", "ContextEncoderFeaturesRecipe", "ContextEncoderGenerator",
           "ContextEncoderRecipe", "ContextualAttention", "DGIIGenerator", "DGIIRecipe",
           "DeepFillV2Generator", "DeepFillV2Recipe", "MODELS", "PatchDiscriminator",
           "SNPatchGANDiscriminator", "TinyGatedGenerator", "TinyGatedRecipe", "build_model",
           "contextual_attention", "convert_port_state_dict"]

MODELS = {
    "tiny_gated": TinyGatedRecipe,
    "context_encoder": ContextEncoderRecipe,
    "context_encoder_features": ContextEncoderFeaturesRecipe,
    "deepfill_v2": DeepFillV2Recipe,
    "dgii": DGIIRecipe,
}
def build_model(name: str, **options):
    """The recipe registered as ``name`` in :data:`MODELS`, built with ``options``."""
    try:
        cls = MODELS[name]
    except (KeyError, TypeError):
        raise InvalidInputError(f"unknown model {name!r}", argument="model",
                                fix=f"choose one of {', '.join(sorted(MODELS))}") from None
    check_keywords(cls, options, what=f"model {name!r}", argument="model_options")
    try:
        return cls(**options)
    except InvalidInputError:
        raise
    except ValueError as e:   # a value the recipe refuses (a width of 0, ...)
        raise InvalidInputError(f"model {name!r}: {e}", argument="model_options") from e
