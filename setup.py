"""Builds fastinpaint._C: the CPU kernels always, the CUDA kernels when a CUDA
toolkit and a CUDA build of torch are present.

Environment:
  FASTINPAINT_CUDA=0|1|auto   skip, require, or detect the CUDA kernels (default auto: built
                              when a CUDA toolkit, a CUDA build of torch and a GPU are there)
  TORCH_CUDA_ARCH_LIST        GPU architectures (default "8.0;9.0")
  CUDA_HOME                   the toolkit root (the folder whose lib64 holds libcudart.so)
  MAX_JOBS                    parallel compile jobs for ninja

Build against the installed torch: pip install --no-build-isolation -e .
"""

import importlib.util
import os
import sys

from setuptools import setup

_spec = importlib.util.spec_from_file_location(
    "_fastinpaint_build", os.path.join(os.path.dirname(os.path.abspath(__file__)), "fastinpaint", "_build.py")
)
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)


def extension_modules():
    mode = build.cuda_mode()
    home = build.cuda_home()
    if home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = home  # before torch.utils.cpp_extension reads it
    build.quiet_cuda_home_notice()
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("fastinpaint: torch is not installed in the build environment; building without "
              "the C++ extension (install torch first and use --no-build-isolation)", file=sys.stderr)
        return [], {}

    has_toolkit = home is not None and torch.version.cuda is not None
    if mode == "1" and not has_toolkit:
        raise RuntimeError(
            "FASTINPAINT_CUDA=1 but no usable CUDA toolkit "
            f"(CUDA_HOME={home!r}, torch.version.cuda={torch.version.cuda!r}): set CUDA_HOME to the "
            "toolkit root and install a CUDA build of torch"
        )
    with_cuda, why = build.with_cuda_kernels(mode, has_toolkit)
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", build.DEFAULT_CUDA_ARCHS)
        print(f"fastinpaint: building _C with the CUDA kernels: {why} (CUDA_HOME={home}, "
              f"archs={os.environ['TORCH_CUDA_ARCH_LIST']})", file=sys.stderr)
    else:
        print(f"fastinpaint: building _C with the CPU kernels only: {why}", file=sys.stderr)

    srcs = [os.path.relpath(s) for s in build.sources(with_cuda)]
    flags = {"cxx": build.CXX_FLAGS + build.defines(with_cuda)}
    if with_cuda:
        flags["nvcc"] = build.NVCC_FLAGS + build.defines(with_cuda)
        ext = CUDAExtension("fastinpaint._C", srcs, include_dirs=[build.CSRC], extra_compile_args=flags)
    else:
        ext = CppExtension("fastinpaint._C", srcs, include_dirs=[build.CSRC], extra_compile_args=flags)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
