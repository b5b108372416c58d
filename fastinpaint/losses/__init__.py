"""Training losses built on fastinpaint's ops."""

from __future__ import annotations

# distillation-guided inpainting (DGII): attention transfer, encoder and self-distillation
from .distillation import AttentionTransferLoss, EncoderDistillationLoss, SelfDistillationLoss

__all__ = ["AttentionTransferLoss", "EncoderDistillationLoss", "SelfDistillationLoss"]
