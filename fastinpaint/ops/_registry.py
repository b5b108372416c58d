"""How an op's kernels are registered with torch, and how a call reaches one backend.

Every op uses the same three pieces, in its ``op.py``:

``kernel(name, schema, fake, triton=...)``
    One schema line, two torch.library ops of that schema:

    * ``fastinpaint::<name>``: the C++ kernels of fastinpaint._C, one per device
      (``csrc/cpu/<op>.cpp`` and ``csrc/cuda/<op>.cu`` register them with
      ``TORCH_LIBRARY_IMPL(fastinpaint, CPU | CUDA, m) { m.impl("<name>", ...); }``);
    * ``fastinpaint::<name>_triton``: the launcher ``triton=`` of ``ops/<op>/triton.py``
      (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``), imported at the first call,
      so a machine without triton can still import fastinpaint.

    Both get the one fake (meta) kernel, so ``torch.compile(fullgraph=True)`` traces them.
    ``cpp=False`` or ``triton=None`` leaves a family out (a kernel only one family has).

``differentiable(forward, backward_kernel, setup_context, backward)``
    One autograd formula for the forward of both families: ``backward(ctx, kernel, *grads)``
    receives the family's backward kernel (the C++ one for the C++ forward, the Triton one
    for the Triton forward).

``Op(name, backends, kernels)``
    What a public function (``channel_fc``, ``gated_conv2d``, ...) can run on: a sentence
    per backend (shown by ``fastinpaint backends``) and the kernels its ``cpu`` / ``cuda``
    backends need from fastinpaint._C. ``Op.select(x)`` applies the rule of
    ``fastinpaint._backend`` (forced backend or auto order), refuses what this backend cannot
    take (float64 on triton) with an error naming the argument, and reports a C++ backend
    unavailable when the loaded extension lacks one of the op's kernels (a stale build).
"""

from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch

from .. import _backend

NAMESPACE = "fastinpaint"
_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")  # kept alive: owns every definition below

#: every public op, by name (``fastinpaint backends`` lists them)
OPS: dict[str, "Op"] = {}

_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}


class Kernel:
    """One kernel schema and the torch.library ops that implement it (see the module doc)."""

    def __init__(self, name: str, schema: str, fake: Callable, triton: Optional[str], cpp: bool):
        self.name = name
        self.has_cpp = cpp
        self.has_triton = triton is not None
        self._built: set[str] = set()  # device types found built (a loaded library stays loaded)
        package, _, leaf = fake.__module__.rpartition(".")
        if triton is not None and leaf != "op":
            raise ValueError(f"kernel {name}: declare it in ops/<op>/op.py (its fake kernel comes from {fake.__module__})")
        module = package + ".triton"  # ops/<op>/op.py -> the launchers of ops/<op>/triton.py
        if cpp:
            _LIB.define(name + schema)
            torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIB)
        if triton is not None:
            _LIB.define(name + "_triton" + schema)

            def launch(*args):
                return getattr(importlib.import_module(module), triton)(*args)

            launch.__name__ = f"{name}_triton"
            for key in ("CPU", "CUDA"):
                _LIB.impl(name + "_triton", launch, key)
            torch.library.register_fake(f"{NAMESPACE}::{name}_triton", fake, lib=_LIB)

    def qualname(self, backend: str) -> str:
        """The op of ``backend``'s family: ``triton`` -> ``fastinpaint::<name>_triton``, ``cpu`` and
        ``cuda`` -> ``fastinpaint::<name>``."""
        return f"{NAMESPACE}::{self.name}_triton" if backend == "triton" else f"{NAMESPACE}::{self.name}"

    def op(self, backend: str):
        return getattr(getattr(torch.ops, NAMESPACE), self.qualname(backend).split("::")[1])

    def __call__(self, backend: str, *args):
        return call(self.op(backend), *args)

    def built_for(self, device_type: str) -> bool:
        """Whether the loaded fastinpaint._C has this kernel for ``device_type``. A kernel found is
        remembered: the layers ask on every call, and the dispatcher's look-up took about 6 us."""
        if device_type in self._built:
            return True
        found = bool(torch._C._dispatch_has_kernel_for_dispatch_key(self.qualname("cpu"), _DISPATCH_KEY[device_type]))
        if found:
            self._built.add(device_type)
        return found


def call(op, *args):
    """``op(*args)``; in eager code, where no argument needs a gradient, below the autograd keys.
    An op whose gradient is registered from Python (``differentiable``, torch.library.custom_op)
    otherwise runs torch.library's Python autograd wrapper on every call, which then only passes
    the call on: about 20 us (channel_fc at the Context Encoder's 4x4 bottleneck, about 7% of its
    forward). Under torch.compile the call is traced as it is."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(
            isinstance(a, torch.Tensor) and a.requires_grad for a in args)):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def kernel(name: str, schema: str, fake: Callable, triton: Optional[str] = None, cpp: bool = True) -> Kernel:
    """Define ``fastinpaint::<name>`` (C++) and ``fastinpaint::<name>_triton`` with ``schema``
    (``"(Tensor x, ...) -> Tensor"``) and the fake kernel ``fake``; ``triton`` names the
    launcher function in the op's ``triton.py``."""
    return Kernel(name, schema, fake, triton, cpp)


def differentiable(forward: Kernel, backward_kernel: Optional[Kernel], setup_context: Callable,
                   backward: Callable) -> None:
    """Register ``backward(ctx, kernel, *grads)`` as the gradient of ``forward`` in each family,
    ``kernel`` being that family's op of ``backward_kernel`` (None when the formula needs none)."""
    families = [b for b, present in (("cpu", forward.has_cpp), ("triton", forward.has_triton)) if present]
    for family in families:
        bwd = backward_kernel.op(family) if backward_kernel is not None else None

        def formula(ctx, *grads, _bwd=bwd):
            return backward(ctx, _bwd, *grads)

        torch.library.register_autograd(forward.qualname(family), formula, setup_context=setup_context, lib=_LIB)


class Op:
    """A public op: its backends (``{name: what it runs}``, in ``fastinpaint._backend.BACKENDS``)
    and the C++ kernels its ``cpu`` and ``cuda`` backends call (``cpp_backends``: the backends
    that run fastinpaint._C; a ``cuda`` backend built on torch alone leaves it out)."""

    def __init__(self, name: str, backends: dict[str, str], kernels: tuple[Kernel, ...] = (),
                 cpp_backends: tuple[str, ...] = ("cpu", "cuda")):
        unknown = set(backends) - set(_backend.BACKENDS)
        if unknown or "reference" not in backends:
            raise ValueError(f"{name}: backends must include 'reference' and lie in {_backend.BACKENDS}, "
                             f"got {sorted(backends)}")
        self.name = name
        self.backends = dict(backends)
        self.implemented = tuple(b for b in _backend.BACKENDS if b in backends)
        self.kernels = tuple(kernels)
        self.cpp_backends = tuple(b for b in cpp_backends if b in backends)
        #: its cpu / cuda backends on torch's ops alone: available without fastinpaint._C
        self.torch_only = tuple(b for b in ("cpu", "cuda") if b in backends and b not in self.cpp_backends)
        self._complete: set[str] = set()  # device types whose kernels were all found (a loaded library stays)
        OPS[name] = self

    def missing_kernels(self, device_type: str) -> list[str]:
        """The C++ kernels of this op that the loaded extension lacks for ``device_type``."""
        return [k.name for k in self.kernels if k.has_cpp and not k.built_for(device_type)]

    def select(self, x: torch.Tensor, arg: str = "x") -> str:
        """The backend that runs this op on ``x`` (the op's first tensor argument, named ``arg``
        in errors)."""
        backend = _backend.select(self.name, self.implemented, x.device, self.torch_only)
        if backend == "triton" and x.dtype == torch.float64:
            raise TypeError(f"{arg} is float64, which the triton backend does not take (float16, bfloat16, "
                            "float32); use the reference or cpu backend for float64")
        device = x.device.type
        # (is_compiling first: while tracing, dynamo would otherwise guard on _complete, and the
        # first eager call, which fills it, would make every compiled caller recompile)
        if not torch.compiler.is_compiling() and backend in self.cpp_backends and device not in self._complete:
            missing = self.missing_kernels(device)
            if not missing:
                self._complete.add(device)
            if missing:
                raise _backend.BackendUnavailableError(
                    f"{self.name}: the loaded fastinpaint._C has no {device} kernel for "
                    f"{', '.join(missing)} (a stale build); rebuild it: pip install --no-build-isolation -e .")
        return backend


def describe() -> dict[str, dict[str, dict[str, str]]]:
    """``{op: {backend: {"runs": what it runs, "cpu": "ok" | why not, "cuda": ...}}}`` for every op."""
    report = {}
    for name, op in OPS.items():
        report[name] = {}
        for backend, runs in op.backends.items():
            entry = {"runs": runs}
            for device in ("cpu", "cuda"):
                why = _backend.unavailable_reason(backend, device, backend not in op.torch_only)
                if why is None and backend in op.cpp_backends and op.missing_kernels(device):
                    why = f"fastinpaint._C lacks {', '.join(op.missing_kernels(device))} (a stale build)"
                if why is None and device == "cuda" and not torch.cuda.is_available():
                    why = "no CUDA device visible to torch"
                entry[device] = why or "ok"
            report[name][backend] = entry
    return report
