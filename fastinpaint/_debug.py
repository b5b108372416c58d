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
_listeners: list = []  # called with the new flag: the C++ extension's switch, once it is loaded


def poison_enabled() -> bool:
    return _poison


def on_change(listener) -> None:
    """Call ``listener(enabled)`` now and whenever poisoning is switched."""
    _listeners.append(listener)
    listener(_poison)


def _set_poison(enabled: bool) -> None:
    global _poison
    _poison = bool(enabled)
    for listener in _listeners:
        listener(_poison)


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
