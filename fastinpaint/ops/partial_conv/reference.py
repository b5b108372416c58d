"""Eager partial convolution (Liu et al., ECCV 2018), in the formulation of the public
NVIDIA code: the oracle of the tests and the baseline of the benchmarks.

    sum(M)   = conv2d(M, ones)                    (per output pixel; a box filter of the mask)
    ratio    = sum(1) / (sum(M) + 1e-8) * clamp(sum(M), 0, 1)
    raw      = conv2d(X * M, W, b)
    out      = ((raw - b) * ratio + b) * clamp(sum(M), 0, 1)      with a bias
    out      = raw * ratio                                          without
    new mask = clamp(sum(M), 0, 1)

``sum(1)`` is the window size: kh*kw for a single-channel mask, Cin*kh*kw for a
multi-channel one (mask per input channel; the new mask then has Cout equal channels).
The mask is not differentiated (it is computed under no_grad, as there). The mask-side
arithmetic runs in float32 (float64 for float64 input): in float16 the public ``+1e-8``
underflows to 0 and windows without a valid pixel would give inf * 0 = NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def partial_conv2d(x, mask, weight, bias=None, stride=1, padding=0, dilation=1):
    """(out, new_mask); mask (B, 1 or Cin, H, W), new_mask (B, 1 or Cout, Ho, Wo)."""
    cm = mask.shape[1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        m = mask.to(acc)
        ones = torch.ones(weight.shape[0] if cm > 1 else 1, cm, *weight.shape[2:], dtype=acc, device=mask.device)
        msum = F.conv2d(m, ones, None, stride, padding, dilation)
        ratio = (cm * weight.shape[2] * weight.shape[3]) / (msum + 1e-8)
        new_mask = torch.clamp(msum, 0, 1)
        ratio = (ratio * new_mask).to(x.dtype)
        new_mask = new_mask.to(x.dtype)
    raw = F.conv2d(x * mask.to(x.dtype), weight, bias, stride, padding, dilation)
    if bias is not None:
        b = bias.view(1, -1, 1, 1)
        out = ((raw - b) * ratio + b) * new_mask
    else:
        out = raw * ratio
    return out, new_mask
