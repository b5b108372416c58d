"""Build settings of the fastinpaint._C extension, shared by setup.py and the JIT loader.

Standard library only: setup.py loads this file by path before torch is imported.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import subprocess

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


def gpu_visible() -> bool:
    """Whether this machine shows an NVIDIA GPU, found without initialising CUDA: a
    ``/dev/nvidia<N>`` device, or a GPU that ``nvidia-smi -L`` lists (WSL has no /dev/nvidia*)."""
    if glob.glob("/dev/nvidia[0-9]*"):
        return True
    smi = shutil.which("nvidia-smi") or next(
        (p for p in ("/usr/lib/wsl/lib/nvidia-smi",) if os.access(p, os.X_OK)), None)
    if smi is None:
        return False
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return any(line.startswith("GPU ") for line in listed.splitlines())


def with_cuda_kernels(mode: str, has_toolkit: bool) -> tuple[bool, str]:
    """Whether the build compiles the CUDA sources, and why: ``FASTINPAINT_CUDA=1`` always
    (CI: every CUDA source compiled and linked, even with no GPU), ``0`` never, ``auto`` when
    a CUDA toolkit and a CUDA build of torch are there and a GPU is visible (a CPU machine's
    build skips minutes of nvcc for kernels it cannot run)."""
    if mode == "1":
        return True, "FASTINPAINT_CUDA=1"
    if mode == "0":
        return False, "FASTINPAINT_CUDA=0"
    if not has_toolkit:
        return False, "FASTINPAINT_CUDA=auto and no CUDA toolkit or no CUDA build of torch"
    if not gpu_visible():
        return False, "FASTINPAINT_CUDA=auto and no GPU visible; FASTINPAINT_CUDA=1 compiles them anyway"
    return True, "FASTINPAINT_CUDA=auto, a CUDA toolkit and a GPU"


class _NoCudaRuntimeNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


def quiet_cuda_home_notice() -> None:
    """torch.utils.cpp_extension logs "No CUDA runtime is found, using CUDA_HOME=..." when it is
    imported (by this build, the JIT loader or torch.compile) on a machine with a CUDA toolkit
    or an nvcc on PATH but no GPU: a warning about CUDA on a CPU machine that neither builds nor
    runs CUDA here. This drops that one record, and nothing else of torch's."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _NoCudaRuntimeNotice) for f in logger.filters):
        logger.addFilter(_NoCudaRuntimeNotice())


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
