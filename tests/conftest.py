"""Shared test machinery: the interpreter switch, the tolerance table, poisoning,
and the comparison rule every kernel test uses."""

import os

import torch

# Triton kernels run on the CPU through the interpreter when there is no GPU.
# This must happen before triton is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU, one fixed Triton config per kernel: autotuning every test shape would
# spend minutes compiling. The benchmarks autotune.
os.environ.setdefault("FASTINPAINT_TRITON_AUTOTUNE", "0")

import pytest  # noqa: E402

import fastinpaint  # noqa: E402
from fastinpaint._backend import unavailable_reason  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

# Absolute error allowed on top of the comparison rule below, scaled by the size
# of the reference's values. One table for every kernel test.
ERROR_FLOOR = {
    torch.float64: 1e-10,
    torch.float32: 2e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def devices():
    return ["cpu", pytest.param("cuda", marks=[gpu, requires_cuda])]


def backend_device_params(backends=("reference", "cpu", "triton", "cuda")):
    """(backend, device) pairs that make sense: cpu on CPU tensors, cuda on CUDA tensors."""
    pairs = []
    for device in ("cpu", "cuda"):
        for backend in backends:
            if (backend, device) in (("cpu", "cuda"), ("cuda", "cpu")):
                continue
            marks = [gpu, requires_cuda] if device == "cuda" else []
            pairs.append(pytest.param(backend, device, marks=marks, id=f"{backend}-{device}"))
    return pairs


def dtypes_for(device):
    """float32 and float16 everywhere; bfloat16 on GPU (the Triton interpreter has none)."""
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])


# FASTINPAINT_REQUIRE=cuda,triton (the GPU suite sets it): those backends must be available,
# so a broken build fails the run instead of turning into skipped tests.
REQUIRED = {b.strip() for b in os.environ.get("FASTINPAINT_REQUIRE", "").split(",") if b.strip()}


def skip_unless_available(backend: str, device: str) -> None:
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    why = unavailable_reason(backend, device)
    if why is not None:
        if backend in REQUIRED and (device == "cuda" or backend in ("cpu", "reference")):
            pytest.fail(f"backend {backend} is required (FASTINPAINT_REQUIRE) but unavailable on {device}: {why}")
        pytest.skip(f"backend {backend} unavailable on {device}: {why}")


def assert_close_to_reference(out, ref_same_dtype, ref_fp64, name="output"):
    """flash-attention's rule: the kernel's error against a float64 reference is at most
    twice the error of the eager same-dtype reference, plus a small floor per dtype.

    NaN never passes (outputs are poisoned with NaN before kernels run)."""
    assert out.shape == ref_fp64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref_fp64.shape)}"
    assert out.dtype == ref_same_dtype.dtype, f"{name}: dtype {out.dtype} != {ref_same_dtype.dtype}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten or overflowed elements)"
    exact = ref_fp64.double().cpu()
    err = (out.double().cpu() - exact).abs().max().item()
    base = (ref_same_dtype.double().cpu() - exact).abs().max().item()
    scale = 1.0 + exact.abs().max().item()
    allowed = 2 * base + ERROR_FLOOR[out.dtype] * scale
    assert err <= allowed, f"{name}: max error {err:.3e} > allowed {allowed:.3e} (eager same-dtype error {base:.3e})"


@pytest.fixture(autouse=True)
def _poison_outputs():
    """Every kernel output is NaN until written."""
    with fastinpaint.poison_outputs():
        yield


@pytest.fixture(autouse=True, scope="session")
def _no_tf32():
    """Exact float32 on GPU: the tolerance table's float32 floor assumes it. (The Triton
    kernel tests check the TF32 mode on their own.)"""
    if not HAS_CUDA:
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
