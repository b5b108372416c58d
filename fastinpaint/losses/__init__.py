"""Training losses built on fastinpaint's ops."""

from __future__ import annotations

# distillation-guided inpainting (DGII): attention transfer, encoder and self-distillation
from .distillation import AttentionTransferLoss, EncoderDistillationLoss, SelfDistillationLoss
# spatially-correlative loss (F-LSeSim)
from .spatial_correlative import (SpatialCorrelativeLoss, StructureLoss, VGG16Features, color_jitter,
                                  default_vgg16_weights_path)

__all__ = ["AttentionTransferLoss", "EncoderDistillationLoss", "SelfDistillationLoss",
           "SpatialCorrelativeLoss", "StructureLoss", "VGG16Features", "color_jitter",
           "default_vgg16_weights_path"]
