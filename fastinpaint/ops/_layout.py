"""Memory-format rules shared by the kernels, their fake (meta) kernels and the tests."""

import torch


def is_channels_last(t: torch.Tensor) -> bool:
    """Dense channels_last storage that is not also NCHW-contiguous (C == 1 or H == W == 1)."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def suggest_memory_format(t: torch.Tensor) -> torch.memory_format:
    """The format an op's output takes for input ``t``: channels_last when ``t`` is
    channels_last, or a strided view whose channel stride is the smallest; else NCHW."""
    if t.is_contiguous():
        return torch.contiguous_format
    if t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.shape[1] > 1 and t.stride(1) < min(t.stride(2), t.stride(3)):
        return torch.channels_last
    return torch.contiguous_format


def conv_output_format(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """The format torch's convolution gives its output: channels_last when the input or
    the weight is channels_last."""
    if suggest_memory_format(x) == torch.channels_last or is_channels_last(weight):
        return torch.channels_last
    return torch.contiguous_format
