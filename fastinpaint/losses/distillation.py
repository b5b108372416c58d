"""Distillation losses of Distillation-Guided Image Inpainting (Suin, Purohit, Rajagopalan,
ICCV 2021): the inpainting network (IN, the student, sees the masked image) learns from an
auxiliary network (AN, the teacher, sees the complete image).

Where the paper leaves details open the choices are written in each class's docstring.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.matmul_attention import hole_rows
from ..ops.pixel_attention.op import attention_transfer_loss


class AttentionTransferLoss(nn.Module):
    """IN's affinity rows pulled towards AN's over the hole pixels, each row weighted by a meta
    network ``t`` (one convolution and a sigmoid):

        L = sum_{b, i in H} t_bi dist(r^IN_bi, r^AN_bi) / |H|,   r_i = softmax_j(scale q_i . k_j)

    ``dist`` is the sum over all N pixels of squared (``"l2"``) or absolute (``"l1"``)
    differences; computed by :func:`fastinpaint.functional.attention_transfer_loss` without any
    N x N tensor. The teacher's q, k take no gradient.

    Args:
        channels: channels of the features ``t`` reads (``forward``'s ``features``).
        kernel_size: t's convolution (odd; "same" padding).
        normalize: divide t by its mean over the hole rows of each sample (default True). Our
            choice: minimising the loss alone would otherwise drive every weight to 0; normalised
            weights only redistribute the emphasis among hole pixels. The mean is taken with
            gradient, so t still learns which rows matter.

    ``forward(qk_student, qk_teacher, hole, features=None)``: ``qk_*`` the ``(q, k)`` pairs that
    :class:`fastinpaint.nn.MatmulAttention` returns with ``return_qk=True``; ``hole`` (B, 1, H, W)
    (nonzero = hole); ``features`` (B, channels, H, W) for t (we feed IN's decoder features at
    the attention's input); without it every row weighs 1.
    """

    def __init__(self, channels: int, kernel_size: int = 3, distance: str = "l2", scale: float = 1.0,
                 normalize: bool = True):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
        if distance not in ("l2", "l1"):
            raise ValueError(f"distance must be 'l2' or 'l1', got {distance!r}")
        self.meta = nn.Conv2d(channels, 1, kernel_size, padding=kernel_size // 2)
        self.distance, self.scale, self.normalize = distance, scale, normalize

    def row_weights(self, features: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        t = torch.sigmoid(self.meta(features)).flatten(1)  # (B, N) in (0, 1)
        if self.normalize:
            m = rows.to(t.dtype)
            mean = (t * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1.0)
            t = t / mean.clamp(min=1e-6)
        return t

    def forward(self, qk_student, qk_teacher, hole: torch.Tensor, features: Optional[torch.Tensor] = None):
        q_s, k_s = qk_student
        q_t, k_t = qk_teacher
        B, N = q_s.shape[:2]
        H, W = hole.shape[-2:]
        if H * W != N:
            raise ValueError(f"hole has {H}x{W} = {H * W} pixels but q has N = {N}")
        rows = hole_rows(hole, B, H, W)
        weight = None if features is None else self.row_weights(features, rows)
        return attention_transfer_loss(q_s, k_s, q_t, k_t, row_weight=weight, row_mask=rows,
                                       distance=self.distance, scale=self.scale)


def _meta_gamma(channels: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.LeakyReLU(0.2),
                         nn.Conv2d(channels, channels, 3, padding=1))


class EncoderDistillationLoss(nn.Module):
    """IN's encoder features pulled towards AN's through a meta network gamma, over the whole
    image: ``L = sum_l mean |x_l - gamma_l(x*_l)|``.

    Choices (the paper says "a meta network of convolutions"): gamma_l = conv3x3 -> LeakyReLU(0.2)
    -> conv3x3 at the level's width; the L1 distance averaged over elements; AN's features
    are detached (AN is trained on complete images and only teaches here), gamma and IN learn.

    ``forward(student_features, teacher_features)``: two sequences of (B, C_l, H_l, W_l).
    """

    def __init__(self, channels: Sequence[int]):
        super().__init__()
        if not channels or any(int(c) < 1 for c in channels):
            raise ValueError(f"channels must be a non-empty list of positive ints, got {channels!r}")
        self.gamma = nn.ModuleList(_meta_gamma(int(c)) for c in channels)

    def forward(self, student_features, teacher_features):
        if len(student_features) != len(self.gamma) or len(teacher_features) != len(self.gamma):
            raise ValueError(f"expected {len(self.gamma)} feature levels, got {len(student_features)} "
                             f"(student) and {len(teacher_features)} (teacher)")
        loss = 0.0
        for gamma, x, x_t in zip(self.gamma, student_features, teacher_features):
            if x.shape != x_t.shape:
                raise ValueError(f"student and teacher features differ in shape: {tuple(x.shape)} vs {tuple(x_t.shape)}")
            loss = loss + (x - gamma(x_t.detach())).abs().mean()
        return loss


class SelfDistillationLoss(nn.Module):
    """Self-distillation inside IN: a convolution f_l maps level l to level l+1 and is pulled
    towards it, channel c weighted by a non-negative phi^l_c:

        L = sum_{l=1}^{L-1} mean_{b,c,h,w} phi^l_c |f_l(x_l) - x_{l+1}|

    Choices: f_l = conv3x3 with stride H_l / H_{l+1} (given as ``strides``, default 2: encoder
    levels halve the size); phi^l = C_{l+1} * softmax(theta^l) (non-negative, mean 1, learned;
    the softmax keeps the weights from collapsing to 0); the deeper level x_{l+1} is the
    target and is detached.

    ``forward(features)``: a sequence of L tensors (B, C_l, H_l, W_l).
    """

    def __init__(self, channels: Sequence[int], strides: Optional[Sequence[int]] = None):
        super().__init__()
        channels = [int(c) for c in channels]
        if len(channels) < 2 or min(channels) < 1:
            raise ValueError(f"channels must list at least two positive ints, got {channels!r}")
        strides = [2] * (len(channels) - 1) if strides is None else [int(s) for s in strides]
        if len(strides) != len(channels) - 1 or min(strides) < 1:
            raise ValueError(f"strides must have {len(channels) - 1} positive entries, got {strides!r}")
        self.f = nn.ModuleList(nn.Conv2d(a, b, 3, stride=s, padding=1)
                               for a, b, s in zip(channels[:-1], channels[1:], strides))
        self.theta = nn.ParameterList(nn.Parameter(torch.zeros(b)) for b in channels[1:])

    def phi(self, level: int) -> torch.Tensor:
        theta = self.theta[level]
        return theta.numel() * torch.softmax(theta, dim=0)

    def forward(self, features):
        if len(features) != len(self.f) + 1:
            raise ValueError(f"expected {len(self.f) + 1} feature levels, got {len(features)}")
        loss = 0.0
        for level, (f, x, target) in enumerate(zip(self.f, features[:-1], features[1:])):
            pred = f(x)
            if pred.shape != target.shape:
                pred = F.interpolate(pred, size=target.shape[-2:], mode="bilinear", align_corners=False)
            phi = self.phi(level).to(pred.dtype)[None, :, None, None]
            loss = loss + (phi * (pred - target.detach()).abs()).mean()
        return loss
