from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm

from ..ops._spectral_norm import power_iteration, spectral_norm_conv2d


class SpectralNormConv2d(nn.Conv2d):
    """``torch.nn.utils.parametrizations.spectral_norm(nn.Conv2d(...))`` whose forward scales the
    convolution's output by 1/sigma instead of dividing the weight (``fastinpaint.functional.
    spectral_norm_conv2d``): the same numbers, without the weight-sized passes.

    The parametrization is torch's own, so the state_dict (``parametrizations.weight.original``,
    ``parametrizations.weight.0._u``, ``._v``) and ``module.weight`` (the normalised weight) are
    those of the torch version, and checkpoints load either way. As there, each training-mode
    forward runs ``n_power_iterations`` steps of the power method (updating ``_u``, ``_v`` in
    place); eval mode uses the stored vectors. ``padding`` may be an int, a pair, "valid" or
    "same", with any ``padding_mode``. The positional arguments are ``nn.Conv2d``'s;
    ``n_power_iterations`` and ``eps`` (torch's spectral_norm's) are keyword-only.

    Differences from torch's module: the fold runs in float32 / float64 outside autocast (else
    torch's formula runs); the power iteration runs outside autocast, in the weight's dtype; and
    ``torch.nn.utils.parametrize.cached()`` does not cache here (each training forward iterates).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 n_power_iterations: int = 1, eps: float = 1e-12):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device=device, dtype=dtype)
        nn.utils.parametrizations.spectral_norm(self, n_power_iterations=n_power_iterations, eps=eps, dim=0)

    def _explicit_padding(self, x: torch.Tensor):
        """(x padded where the convolution cannot pad, the convolution's own padding pair)."""
        if self.padding_mode != "zeros":
            return F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode), (0, 0)
        if self.padding == "valid":
            return x, (0, 0)
        if self.padding == "same":   # stride 1 (nn.Conv2d checks): total dilation * (k - 1), the extra one after
            th, tw = (d * (k - 1) for d, k in zip(self.dilation, self.kernel_size))
            if th % 2 == 0 and tw % 2 == 0:
                return x, (th // 2, tw // 2)
            return F.pad(x, (tw // 2, tw - tw // 2, th // 2, th - th // 2)), (0, 0)
        return x, self.padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chain = self.parametrizations.weight if parametrize.is_parametrized(self, "weight") else ()
        if len(chain) != 1 or not isinstance(chain[0], _SpectralNorm) or chain[0].dim != 0:
            return super().forward(x)   # the parametrization removed or changed: torch's forward
        weight = self.parametrizations.weight.original
        sn = chain[0]
        if self.training:
            power_iteration(weight, sn._u, sn._v, sn.n_power_iterations, sn.eps)
        u, v = sn._u, sn._v
        if torch.is_grad_enabled():   # copies: a later forward's power iteration must not change this one's backward
            u, v = u.clone(memory_format=torch.contiguous_format), v.clone(memory_format=torch.contiguous_format)
        x, padding = self._explicit_padding(x)
        return spectral_norm_conv2d(x, weight, self.bias, u, v, self.stride, padding, self.dilation, self.groups)
