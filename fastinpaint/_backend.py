"""Which implementations exist on this machine, and the rule that picks one.

Backends:
  reference  eager PyTorch, always available: the oracle of the tests
  triton     Triton kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1
  cuda       the C++/CUDA extension's CUDA kernels: CUDA tensors
  cpu        the C++ extension's CPU kernels: CPU tensors

``auto`` (the default) picks per call by the tensor's device, in the order of
``AUTO_ORDER``, among the backends the op implements and that are available.
``use_backend(name)`` (a context manager) or ``FASTINPAINT_BACKEND=name`` forces
one; a forced backend that is unavailable raises ``BackendUnavailableError``
naming what is missing. There is never a silent fallback.

Under ``torch.compile`` the choice is made once, at trace time.

Under forward-mode AD (``torch.func.jvp``, ``jacfwd``, ``torch.autograd.forward_ad``) ``auto``
picks ``reference``: the other backends' kernels have reverse-mode gradients only (torch.library
registers no tangent formula for them, and their outputs would carry none, a zero tangent under
``torch.func.jvp``), and a forced one raises ``BackendUnavailableError``.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch.autograd import forward_ad

from . import _extension

BACKENDS = ("reference", "triton", "cuda", "cpu")
AUTO_ORDER = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpu", "reference"),
}

_forced: list[str] = []  # use_backend() stack
_capture_mode: list[bool] = []  # ops.resources.recording(): Triton launches are recorded, not run


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that this op or this machine does not have."""


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of {BACKENDS + ('auto',)}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Force ``name`` for every fastinpaint op called inside the block ("auto" to undo)."""
    _forced.append(_check_name(name))
    try:
        yield
    finally:
        _forced.pop()


def requested() -> str:
    """The backend asked for right now: use_backend() > FASTINPAINT_BACKEND > "auto"."""
    if _forced:
        return _forced[-1]
    env = os.environ.get("FASTINPAINT_BACKEND", "auto").strip().lower() or "auto"
    if env not in BACKENDS + ("auto",):
        raise ValueError(f"FASTINPAINT_BACKEND must be one of {BACKENDS + ('auto',)}, got {env!r}")
    return env


_triton_import_error: list = []


def _triton_missing() -> str | None:
    """Why triton cannot be imported (cached), or None."""
    if not _triton_import_error:
        try:
            import triton  # noqa: F401
        except Exception as exc:  # ImportError, or a broken install
            _triton_import_error.append(f"triton cannot be imported: {exc}")
        else:
            _triton_import_error.append(None)
    return _triton_import_error[0]


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(backend: str, device_type: str, extension: bool = True) -> str | None:
    """None when ``backend`` can run on ``device_type`` here, else why not. ``extension=False``:
    an op's ``cpu`` / ``cuda`` backend built on torch's ops alone (no fastinpaint._C kernel), which
    needs only tensors of its device."""
    _check_name(backend)
    if backend == "reference":
        return None
    if not extension and backend in ("cpu", "cuda"):
        return None if device_type == backend else f"the {backend} backend takes {backend.upper()} tensors, got " \
                                                   f"{device_type} tensors"
    if backend == "triton":
        missing = _triton_missing()
        if missing:
            return missing
        if device_type == "cuda":
            return None
        if device_type == "cpu":
            if _triton_interpret() or _capture_mode:
                return None
            return "triton runs CPU tensors only with TRITON_INTERPRET=1"
        return f"triton does not run on {device_type} tensors"
    if backend == "cpu":
        if device_type != "cpu":
            return f"the cpu backend takes CPU tensors, got {device_type} tensors"
        if _extension.library() is None:
            return f"the C++ extension fastinpaint._C is not available: {_extension.error()}"
        return None
    # cuda
    if device_type != "cuda":
        return f"the cuda backend takes CUDA tensors, got {device_type} tensors"
    if _extension.library() is None:
        return f"the C++ extension fastinpaint._C is not available: {_extension.error()}"
    if not _extension.has_cuda_kernels():
        return "fastinpaint._C was built without CUDA kernels (rebuild with a CUDA toolkit, FASTINPAINT_CUDA=1)"
    return None


@torch.compiler.assume_constant_result
def _resolve(op: str, implemented: tuple, device_type: str, name: str, torch_only: tuple = ()) -> str:
    if name == "auto":
        for candidate in AUTO_ORDER.get(device_type, ("reference",)):
            if candidate in implemented and unavailable_reason(candidate, device_type,
                                                               candidate not in torch_only) is None:
                return candidate
        return "reference"
    if name not in implemented:
        raise BackendUnavailableError(f"{op} has no {name!r} backend; it has {implemented}")
    why = unavailable_reason(name, device_type, name not in torch_only)
    if why is not None:
        raise BackendUnavailableError(f"{op}: backend {name!r} is unavailable for {device_type} tensors: {why}")
    return name


def forward_mode_ad() -> bool:
    """Whether forward-mode AD is on: a ``torch.autograd.forward_ad`` dual level open, or
    ``torch.func.jvp`` (``jacfwd``, ``hessian``) among the active function transforms."""
    if forward_ad._current_level >= 0:
        return True
    stack = torch._C._functorch.get_interpreter_stack()
    return bool(stack) and any(i.key() == torch._C._functorch.TransformType.Jvp for i in stack)


def select(op: str, implemented: tuple, device: torch.device, torch_only: tuple = ()) -> str:
    """The backend that runs ``op`` on tensors of ``device``; ``torch_only``: its ``cpu`` / ``cuda``
    backends that call no fastinpaint._C kernel (available wherever the device is). Under
    forward-mode AD (:func:`forward_mode_ad`, outside torch.compile): ``reference``, or an error
    for another backend forced."""
    name = requested()
    if not torch.compiler.is_compiling() and forward_mode_ad():
        if name not in ("auto", "reference"):
            raise BackendUnavailableError(
                f"{op}: backend {name!r} has no forward-mode AD (torch.func.jvp, jacfwd, torch.autograd.forward_ad): "
                "its kernels have reverse-mode gradients only; use the 'reference' backend (or 'auto', which "
                "picks it under forward-mode AD)")
        return "reference"
    return _resolve(op, tuple(implemented), device.type, name, tuple(torch_only))


def backends() -> dict[str, dict[str, str]]:
    """What is built and usable here: {backend: {"cpu": "ok" | reason, "cuda": "ok" | reason}}."""
    devices = ["cpu", "cuda"]
    report = {}
    for name in BACKENDS:
        report[name] = {d: (unavailable_reason(name, d) or "ok") for d in devices}
        if report[name]["cuda"] == "ok" and not torch.cuda.is_available():
            report[name]["cuda"] = "no CUDA device visible to torch"
    return report
