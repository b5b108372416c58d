"""Loading fastinpaint._C, the C++/CUDA extension.

Order: the prebuilt module next to this file (``pip install --no-build-isolation -e .``
puts it there), if it was built against the running torch; otherwise a JIT build of
``csrc/`` with ``torch.utils.cpp_extension.load`` (cached by torch, so paid once per
machine and torch version). ``import fastinpaint`` never fails here: a missing
extension warns once and the ``cpu``/``cuda`` backends report themselves unavailable,
with the reason.

Environment: ``FASTINPAINT_JIT=0`` disables the JIT fallback.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import os
import re
import threading
import warnings

import torch

from . import _build, _debug

_lock = threading.Lock()
_state: dict = {"loaded": None, "how": None, "error": None, "tried_prebuilt": False, "tried_jit": False}

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))

# no "No CUDA runtime is found" notice from torch.utils.cpp_extension on a CPU machine, whoever
# imports it (the JIT build below, torch.compile)
_build.quiet_cuda_home_notice()


def prebuilt_path() -> str | None:
    """The compiled module for *this* interpreter (its extension suffix), if present."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(_PKG_DIR, "_C" + suffix)
        if os.path.exists(path):
            return path
    return None


def read_build_info(path: str) -> dict[str, str] | None:
    """Parse the build-info marker embedded in the binary, without loading it."""
    with open(path, "rb") as fh:
        data = fh.read()
    match = re.search(re.escape(_build.BUILD_INFO_MARKER) + rb"([^\x00]*)", data)
    if match is None:
        return None
    fields = [f.split("=", 1) for f in match.group(1).decode("ascii", "replace").split(";") if "=" in f]
    return {k: v for k, v in fields}


def _torch_version_matches(built: str) -> bool:
    return built.split("+")[0] == torch.__version__.split("+")[0]


def _finish_load(how: str) -> None:
    _state["loaded"] = True
    _state["how"] = how
    _debug.on_change(torch.ops.fastinpaint._set_debug_poison)


def _try_prebuilt() -> str | None:
    """Load the prebuilt module; return a reason string when it cannot be used."""
    _state["tried_prebuilt"] = True
    path = prebuilt_path()
    if path is None:
        return "no prebuilt fastinpaint._C next to the package"
    info = read_build_info(path)
    if info is None or "torch" not in info:
        return f"{os.path.basename(path)} carries no build info (stale build?)"
    if not _torch_version_matches(info["torch"]):
        return f"{os.path.basename(path)} was built against torch {info['torch']}, running torch {torch.__version__}"
    try:
        torch.ops.load_library(path)
    except OSError as exc:  # undefined symbols, missing libraries
        return f"loading {os.path.basename(path)} failed: {exc}"
    _finish_load("prebuilt")
    return None


def _try_jit() -> str | None:
    _state["tried_jit"] = True
    if os.environ.get("FASTINPAINT_JIT", "1") == "0":
        return "JIT build disabled (FASTINPAINT_JIT=0)"
    if not os.path.isdir(_build.CSRC):
        return f"no C++ sources at {_build.CSRC} to JIT-build from"
    home = _build.cuda_home()
    if home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = home  # before cpp_extension guesses it from the nvcc on PATH
    from torch.utils import cpp_extension

    with_cuda = bool(torch.cuda.is_available() and torch.version.cuda and home and _build.cuda_mode() != "0")
    srcs = _build.sources(with_cuda)
    digest = hashlib.sha1(torch.__version__.encode())
    for s in srcs:
        with open(s, "rb") as fh:
            digest.update(fh.read())
    name = f"fastinpaint_C_{'cuda' if with_cuda else 'cpu'}_{digest.hexdigest()[:12]}"
    flags = _build.CXX_FLAGS + _build.defines(with_cuda)
    warnings.warn(f"fastinpaint: JIT-building the C++ extension ({'with' if with_cuda else 'without'} CUDA); "
                  "this happens once per machine and torch version", stacklevel=4)
    try:
        cpp_extension.load(
            name=name,
            sources=srcs,
            extra_include_paths=[_build.CSRC],
            extra_cflags=flags,
            extra_cuda_cflags=_build.NVCC_FLAGS + _build.defines(with_cuda),
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=os.environ.get("FASTINPAINT_VERBOSE_BUILD") == "1",
        )
    except Exception as exc:  # compiler missing, compile error
        return f"JIT build failed: {type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    _finish_load("jit")
    return None


def library(build: bool = True) -> str | None:
    """How the extension was loaded ("prebuilt" or "jit"), or None if it is not.

    ``build=False`` never starts a JIT build (it still loads a matching prebuilt module).
    """
    if _state["loaded"]:
        return _state["how"]
    with _lock:
        if _state["loaded"]:
            return _state["how"]
        reasons = []
        if not _state["tried_prebuilt"]:
            why = _try_prebuilt()
            if why is None:
                return _state["how"]
            _state["error"] = why
        if build and not _state["tried_jit"]:
            why = _try_jit()
            if why is None:
                return _state["how"]
            reasons = [_state["error"], why]
            _state["error"] = "; ".join(r for r in reasons if r)
            warnings.warn(f"fastinpaint: the C++ extension is unavailable ({_state['error']}); "
                          "the cpu and cuda backends are disabled", RuntimeWarning, stacklevel=3)
    return None


def error() -> str | None:
    """Why the extension is not loaded (None when it is, or when loading was not tried)."""
    return None if _state["loaded"] else _state["error"]


def has_cuda_kernels() -> bool:
    return bool(_state["loaded"]) and bool(torch.ops.fastinpaint._has_cuda_kernels())
