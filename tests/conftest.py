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


# The backends under test. ``reference`` is the oracle they are compared with, so it is
# not among them: a comparison with the reference would compare the reference with itself.
KERNEL_BACKENDS = ("cpu", "triton", "cuda")


def backend_device_params(backends=KERNEL_BACKENDS, *, with_reference=False):
    """(backend, device) pairs that make sense: cpu on CPU tensors, cuda on CUDA tensors.

    ``with_reference=True`` adds the reference backend, for tests that check something of the
    reference itself (a memory-format rule, determinism, output shapes), not a match with it."""
    if with_reference:
        backends = ("reference", *backends)
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


# FASTINPAINT_REQUIRE=cpu,triton (CI) or cuda,triton (the GPU suite): those backends must be
# available, so a broken build or a missing package fails the run instead of turning into
# skipped tests. The token cuda_build requires the extension to have CUDA kernels (CI sets it
# where nvcc exists; tests/test_backend.py checks it). A CUDA-device test still skips where
# there is no CUDA device.
REQUIREMENTS = ("reference", "cpu", "triton", "cuda", "cuda_build")
REQUIRED = {b.strip() for b in os.environ.get("FASTINPAINT_REQUIRE", "").split(",") if b.strip()}


def required(backend: str, device: str) -> bool:
    """Whether FASTINPAINT_REQUIRE makes ``backend`` on ``device`` tensors a must. Triton runs
    CPU tensors only under the interpreter (set above when there is no GPU), so on a GPU
    machine Triton is required on CUDA tensors and its CPU-tensor tests skip."""
    if backend not in REQUIRED:
        return False
    if backend == "triton" and device == "cpu":
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return True


def skip_or_fail(requirement: str, reason: str, must: bool) -> None:
    """Skip with ``reason``, or fail when ``must`` (FASTINPAINT_REQUIRE names ``requirement``)."""
    if must:
        pytest.fail(f"FASTINPAINT_REQUIRE names {requirement}, but {reason}", pytrace=False)
    pytest.skip(reason)


def skip_unless_available(backend: str, device: str) -> None:
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    why = unavailable_reason(backend, device)
    if why is not None:
        skip_or_fail(backend, f"backend {backend} unavailable on {device}: {why}", required(backend, device))


def pytest_configure(config):
    """A misspelt requirement would require nothing: refuse it. A required backend that is
    unavailable stops the run before any test (some modules skip at import otherwise)."""
    unknown = sorted(REQUIRED - set(REQUIREMENTS))
    if unknown:
        raise pytest.UsageError(f"FASTINPAINT_REQUIRE names {unknown}; it takes {', '.join(REQUIREMENTS)}")
    where = {"cpu": "cpu", "triton": "cuda" if HAS_CUDA else "cpu", **({"cuda": "cuda"} if HAS_CUDA else {})}
    for backend, device in where.items():
        why = unavailable_reason(backend, device) if required(backend, device) else None
        if why is not None:
            raise pytest.UsageError(f"backend {backend} is required (FASTINPAINT_REQUIRE) but unavailable on "
                                    f"{device}: {why}")


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


@pytest.fixture(params=[1, 2, 3], ids=lambda n: f"{n}threads")
def threads(request):
    """torch's intra-op threads set to 1, 2 and 3 in turn (the C++ kernels' parallel loops
    split work by it), restored after the test."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def train_tiny_run(out, *extra):
    """A 3-step run of the default model at 32x32 on the demo photos, through the CLI."""
    from fastinpaint import cli

    code = cli.main(["train", "--data", "demo", "--mask", "free_form", "--steps", "3", "--out", str(out),
                     "--set", "size=32", "--set", "batch_size=2", "--set", "val_every=100",
                     "--set", "checkpoint_every=3", "--set", "samples_per_epoch=8", "--set", "val_batches=1",
                     *extra])
    assert code == 0
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished run folder trained without EMA (shared by the CLI and inpainting tests)."""
    return train_tiny_run(tmp_path_factory.mktemp("tiny_run"))


def assert_runs_at_lower_cpu_capabilities(code: str) -> None:
    """Run ``code`` (a Python program that prints "ok" at the end) in fresh processes with
    torch's CPU capability capped at the baseline and at AVX2 (ATEN_CPU_CAPABILITY), which
    caps the C++ kernels' hot loops too (csrc/cpu/cpu_common.h, isa_level)."""
    import subprocess
    import sys

    for capability in ("default", "avx2"):
        env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and done.stdout.startswith("ok"), (capability, done.stdout, done.stderr[-2000:])


def assert_close_scaled(got, want, rel, name, floor=1e-12):
    """The error against ``want`` (float64) is at most ``rel`` of the reference's largest magnitude
    (plus ``floor``): for sums over many terms (a convolution's weight gradient), whose error grows
    with the scale of the sum, not with each element's."""
    assert got.shape == want.shape, name
    err = (got.double() - want.double()).abs().max().item()
    scale = want.abs().max().item()
    assert err <= rel * scale + floor, f"{name}: max error {err:.3g} against a scale of {scale:.3g}"
