"""Debug switches shared by every backend.

``poison_outputs()``: while active, every output a fastinpaint kernel allocates is
filled with NaN before the kernel runs, so an element a kernel forgets to write
fails the comparison with ``reference`` instead of passing on whatever the
allocator returned. The tests run with it on; ``FASTINPAINT_POISON=1`` turns it
on for a whole process.
"""

from __future__ import annotations

import contextlib
import os

import torch

_poison = os.environ.get("FASTINPAINT_POISON", "0") == "1"


def poison_enabled() -> bool:
    return _poison


def _set_poison(enabled: bool) -> None:
    global _poison
    _poison = bool(enabled)
    from . import _extension  # late: loading the extension is lazy

    lib = _extension.library(build=False)
    if lib is not None:
        torch.ops.fastinpaint._set_debug_poison(_poison)


@contextlib.contextmanager
def poison_outputs(enabled: bool = True):
    previous = _poison
    _set_poison(enabled)
    try:
        yield
    finally:
        _set_poison(previous)


def new_output(size, *, dtype, device, memory_format=torch.contiguous_format) -> torch.Tensor:
    """``torch.empty`` for kernel outputs: NaN-filled while poisoning is on."""
    out = torch.empty(size, dtype=dtype, device=device, memory_format=memory_format)
    if _poison:
        out.fill_(float("nan"))
    return out
