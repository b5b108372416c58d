"""Build settings of the fastinpaint._C extension, shared by setup.py and the JIT loader.

Standard library only: setup.py loads this file by path before torch is imported.
"""

from __future__ import annotations

import glob
import os
import shutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
DEFAULT_CUDA_ARCHS = "8.0;9.0"
BUILD_INFO_MARKER = b"fastinpaint-build-info:"

CXX_FLAGS = ["-O3", "-fvisibility=hidden"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]


def cuda_home() -> str | None:
    """The CUDA toolkit root: the folder whose lib64 holds libcudart.so.

    CUDA_HOME / CUDA_PATH win when set. Otherwise an ``nvcc`` on PATH is only trusted
    when it sits in ``<root>/bin`` beside ``<root>/lib64`` (a wrapper script in
    /usr/local/bin would make torch guess /usr/local); then /usr/local/cuda.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if glob.glob(os.path.join(root, "lib64", "libcudart.so*")) and os.path.exists(
            os.path.join(root, "bin", "nvcc")
        ):
            return root
    return None


def sources(with_cuda: bool) -> list[str]:
    cpp = [os.path.join(CSRC, "ops.cpp")] + sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    cu = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu"))) if with_cuda else []
    return cpp + cu


def cuda_mode() -> str:
    mode = os.environ.get("FASTINPAINT_CUDA", "auto").strip().lower()
    if mode not in ("0", "1", "auto"):
        raise ValueError(f"FASTINPAINT_CUDA must be 0, 1 or auto, got {mode!r}")
    return mode


def defines(with_cuda: bool) -> list[str]:
    return ["-DFASTINPAINT_WITH_CUDA"] if with_cuda else []
