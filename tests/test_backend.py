"""Backend selection, the extension loader, and import without the extension."""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import conftest
import fastinpaint
from fastinpaint import BackendUnavailableError, _backend, _extension, use_backend
from conftest import REQUIRED, skip_unless_available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_backends_report_lists_every_backend_and_device():
    report = fastinpaint.backends()
    assert set(report) == set(fastinpaint.BACKENDS)
    for name, per_device in report.items():
        assert set(per_device) == {"cpu", "cuda"}
        assert all(isinstance(v, str) and v for v in per_device.values())
    assert report["reference"]["cpu"] == "ok"
    assert report["reference"]["cuda"] == ("ok" if torch.cuda.is_available() else "no CUDA device visible to torch")
    if not torch.cuda.is_available():
        assert report["cuda"]["cuda"] != "ok" and report["triton"]["cuda"] != "ok"


def test_use_backend_nests_and_restores(monkeypatch):
    monkeypatch.delenv("FASTINPAINT_BACKEND", raising=False)
    assert _backend.requested() == "auto"
    with use_backend("reference"):
        assert _backend.requested() == "reference"
        with use_backend("triton"):
            assert _backend.requested() == "triton"
        assert _backend.requested() == "reference"
    assert _backend.requested() == "auto"


def test_use_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        with use_backend("cudnn"):
            pass


def test_environment_variable_forces_backend(monkeypatch):
    monkeypatch.setenv("FASTINPAINT_BACKEND", "reference")
    assert _backend.select("gated_conv2d", ("reference", "cpu"), torch.device("cpu")) == "reference"
    monkeypatch.setenv("FASTINPAINT_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FASTINPAINT_BACKEND"):
        _backend.requested()
    monkeypatch.setenv("FASTINPAINT_BACKEND", "cuda")
    with use_backend("reference"):  # the context manager wins over the environment
        assert _backend.requested() == "reference"


def test_auto_picks_by_device_and_never_falls_back_silently():
    picked = _backend.select("gated_conv2d", ("reference", "triton", "cuda", "cpu"), torch.device("cpu"))
    expected = "cpu" if _backend.unavailable_reason("cpu", "cpu") is None else "reference"
    assert picked == expected
    # an op that lacks the forced backend says so
    with use_backend("cuda"), pytest.raises(BackendUnavailableError, match="has no 'cuda' backend"):
        _backend.select("some_op", ("reference",), torch.device("cpu"))
    # a forced backend that cannot run here says why
    with use_backend("cuda"), pytest.raises(BackendUnavailableError, match="unavailable for cpu tensors"):
        _backend.select("gated_conv2d", ("reference", "cuda"), torch.device("cpu"))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    why = _backend.unavailable_reason("triton", "cpu")
    assert why is not None and ("TRITON_INTERPRET" in why or "triton" in why)


def test_build_info_marker_is_read_without_loading(tmp_path):
    fake = tmp_path / "_C.fake.so"
    fake.write_bytes(b"\x7fELF junk\x00" + _extension._build.BUILD_INFO_MARKER + b"torch=1.2.3;cuda=1;\x00tail")
    assert _extension.read_build_info(str(fake)) == {"torch": "1.2.3", "cuda": "1"}
    assert not _extension._torch_version_matches("1.2.3")
    assert _extension._torch_version_matches(torch.__version__.split("+")[0])
    (tmp_path / "empty.so").write_bytes(b"no marker here")
    assert _extension.read_build_info(str(tmp_path / "empty.so")) is None


def test_prebuilt_extension_matches_running_torch():
    path = _extension.prebuilt_path()
    if path is None:
        pytest.skip("no prebuilt extension (JIT or none)")
    info = _extension.read_build_info(path)
    assert info is not None and _extension._torch_version_matches(info["torch"])
    assert _extension.library() == "prebuilt"
    assert torch.ops.fastinpaint._build_info().startswith(_extension._build.BUILD_INFO_MARKER.decode())


def test_cuda_kernels_compiled_when_asked():
    """CI sets FASTINPAINT_CUDA=1 and FASTINPAINT_REQUIRE=...,cuda_build where nvcc exists: then
    the CUDA kernels must be in the build."""
    if "cuda_build" not in REQUIRED and os.environ.get("FASTINPAINT_CUDA") != "1":
        pytest.skip("neither FASTINPAINT_REQUIRE=cuda_build nor FASTINPAINT_CUDA=1 is set for this run")
    assert _extension.library() is not None, _extension.error()
    assert _extension.has_cuda_kernels(), "fastinpaint._C was built without CUDA kernels"


def test_import_without_extension_or_triton(tmp_path):
    """A copy of the package with no compiled module, no sources, no JIT and no triton:
    import works, the reference runs, and forcing cpu names what is missing."""
    pkg = tmp_path / "fastinpaint"
    shutil.copytree(os.path.join(ROOT, "fastinpaint"), pkg,
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    script = """
import sys, warnings
sys.modules['triton'] = None  # import triton -> ImportError
import torch, fastinpaint
from fastinpaint import functional as FI, use_backend, BackendUnavailableError
x, w = torch.randn(1, 2, 5, 5), torch.randn(4, 2, 3, 3)
y = FI.gated_conv2d(x, w, padding=1)          # auto -> reference
assert y.shape == (1, 2, 5, 5)
rep = fastinpaint.backends()
assert rep['cpu']['cpu'] != 'ok' and rep['triton']['cpu'] != 'ok', rep
for name in ('cpu', 'triton'):
    try:
        with use_backend(name):
            FI.gated_conv2d(x, w, padding=1)
    except BackendUnavailableError as e:
        print(name, 'unavailable:', e)
    else:
        raise SystemExit('forced ' + name + ' did not raise')
print('OK')
"""
    env = dict(os.environ, FASTINPAINT_JIT="0", PYTHONPATH=str(tmp_path), TRITON_INTERPRET="1")
    env.pop("FASTINPAINT_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout
    assert re.search(r"cpu unavailable: .*fastinpaint\._C is not available", proc.stdout), proc.stdout
    assert re.search(r"triton unavailable: .*triton cannot be imported", proc.stdout), proc.stdout


@pytest.mark.slow
def test_jit_fallback_builds_and_runs(tmp_path):
    """No prebuilt module (or one for another torch): the first op that needs the cpu
    backend JIT-builds csrc/ and runs it."""
    shutil.copytree(os.path.join(ROOT, "fastinpaint"), tmp_path / "fastinpaint",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    shutil.copytree(os.path.join(ROOT, "csrc"), tmp_path / "csrc")
    # a stale prebuilt module, built against another torch: refused without being loaded
    import importlib.machinery

    stale = tmp_path / "fastinpaint" / ("_C" + importlib.machinery.EXTENSION_SUFFIXES[0])
    stale.write_bytes(b"\x7fELF" + _extension._build.BUILD_INFO_MARKER + b"torch=0.0.1;cuda=0;\x00")
    script = """
import warnings, torch, fastinpaint
from fastinpaint import _extension, functional as FI, use_backend
assert _extension.library(build=False) is None
assert 'built against torch 0.0.1' in _extension.error(), _extension.error()
x, w, b = torch.randn(2, 3, 6, 7), torch.randn(8, 3, 3, 3), torch.randn(8)
with use_backend('cpu'):
    y = FI.gated_conv2d(x, w, b, padding=1)
assert _extension.library() == 'jit'
with use_backend('reference'):
    y_ref = FI.gated_conv2d(x, w, b, padding=1)
torch.testing.assert_close(y, y_ref)
print('OK')
"""
    env = dict(os.environ, FASTINPAINT_JIT="1", FASTINPAINT_CUDA="0", PYTHONPATH=str(tmp_path),
               TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), MAX_JOBS="2")
    env.pop("FASTINPAINT_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "OK" in proc.stdout


def test_registry_reports_a_stale_build_and_refuses_float64_on_triton():
    """A kernel that the loaded fastinpaint._C does not implement (an extension built before the
    op existed) makes the op's C++ backends unavailable, with an error that says to rebuild."""
    from fastinpaint.ops import _registry

    skip_unless_available("cpu", "cpu")

    def fake(x):
        return torch.empty_like(x)

    k = _registry.kernel("_test_not_built_forward", "(Tensor x) -> Tensor", fake)
    op = _registry.Op("_test_not_built", {"reference": "eager", "cpu": "C++", "triton": "Triton"}, kernels=(k,))
    try:
        assert op.missing_kernels("cpu") == ["_test_not_built_forward"]
        with use_backend("cpu"), pytest.raises(BackendUnavailableError, match="stale build.*rebuild"):
            op.select(torch.randn(3))
        assert "stale build" in _registry.describe()["_test_not_built"]["cpu"]["cpu"]
        with use_backend("reference"):
            assert op.select(torch.randn(3)) == "reference"
        if _backend.unavailable_reason("triton", "cpu") is None or conftest.required("triton", "cpu"):
            with use_backend("triton"), pytest.raises(TypeError, match="feat is float64.*triton"):
                op.select(torch.randn(3, dtype=torch.float64), "feat")
        # a real op's kernels are all there
        assert _registry.OPS["channel_fc"].missing_kernels("cpu") == []
    finally:
        del _registry.OPS["_test_not_built"]


def test_registry_rejects_a_bad_declaration():
    from fastinpaint.ops import _registry

    with pytest.raises(ValueError, match="backends must include 'reference'"):
        _registry.Op("_test_bad", {"cpu": "C++"})
    with pytest.raises(ValueError, match="declare it in ops/<op>/op.py"):
        _registry.kernel("_test_misplaced", "(Tensor x) -> Tensor", lambda x: x, triton="forward")


# ----------------------------------------------------------------------------- FASTINPAINT_REQUIRE

def test_a_required_backend_that_is_unavailable_fails_instead_of_skipping(monkeypatch):
    """tests/conftest.py's rule: an unavailable backend skips its tests, unless
    FASTINPAINT_REQUIRE names it; then they fail. The C++ extension and triton are made
    unavailable here the way a broken build and a missing package make them."""
    monkeypatch.setattr(_extension, "library", lambda build=True: None)
    monkeypatch.setattr(_extension, "error", lambda: "simulated broken build")
    monkeypatch.setattr(_backend, "_triton_import_error", ["triton cannot be imported: simulated"])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for backend in ("cpu", "triton"):
        monkeypatch.setattr(conftest, "REQUIRED", set())
        with pytest.raises(pytest.skip.Exception, match=f"backend {backend} unavailable on cpu: .*simulated"):
            skip_unless_available(backend, "cpu")
        monkeypatch.setattr(conftest, "REQUIRED", {backend})
        with pytest.raises(pytest.fail.Exception, match=f"FASTINPAINT_REQUIRE names {backend}, but .*simulated"):
            skip_unless_available(backend, "cpu")
    # Triton takes CPU tensors only under the interpreter, which a GPU run leaves off: there
    # its CPU-tensor tests skip even when triton is required (its CUDA-tensor tests do not).
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_backend, "_triton_import_error", [None])
    monkeypatch.setattr(conftest, "REQUIRED", {"triton"})
    with pytest.raises(pytest.skip.Exception, match="TRITON_INTERPRET"):
        skip_unless_available("triton", "cpu")
    # a CUDA-device test skips without a CUDA device, required or not
    if not torch.cuda.is_available():
        monkeypatch.setattr(conftest, "REQUIRED", {"cuda"})
        with pytest.raises(pytest.skip.Exception, match="needs a CUDA device"):
            skip_unless_available("cuda", "cuda")


def test_a_misspelt_or_unavailable_requirement_stops_the_run(monkeypatch):
    """FASTINPAINT_REQUIRE=trtion would require nothing, and a required backend that is
    unavailable would leave modules that skip at import skipped: both stop the run at start."""
    monkeypatch.setattr(conftest, "REQUIRED", {"cpu", "trtion"})
    with pytest.raises(pytest.UsageError, match=r"FASTINPAINT_REQUIRE names \['trtion'\]"):
        conftest.pytest_configure(None)
    monkeypatch.setattr(conftest, "REQUIRED", {"cpu", "cuda_build"})
    conftest.pytest_configure(None)  # cpu is available here (the tests above need it)
    monkeypatch.setattr(_extension, "library", lambda build=True: None)
    monkeypatch.setattr(_extension, "error", lambda: "simulated broken build")
    with pytest.raises(pytest.UsageError, match="backend cpu is required .* simulated broken build"):
        conftest.pytest_configure(None)


def test_default_build_compiles_cuda_only_where_a_gpu_is_visible(monkeypatch, tmp_path):
    """FASTINPAINT_CUDA=auto: the CUDA sources only with a toolkit *and* a visible GPU;
    1 always (CI links every CUDA source on a machine with no GPU); 0 never."""
    build = _extension._build
    monkeypatch.setattr(build, "gpu_visible", lambda: False)
    assert build.with_cuda_kernels("auto", True)[0] is False
    assert "no GPU visible" in build.with_cuda_kernels("auto", True)[1]
    assert build.with_cuda_kernels("1", True)[0] is True and build.with_cuda_kernels("1", False)[0] is True
    assert build.with_cuda_kernels("0", True)[0] is False
    monkeypatch.setattr(build, "gpu_visible", lambda: True)
    assert build.with_cuda_kernels("auto", True)[0] is True
    assert build.with_cuda_kernels("auto", False)[0] is False
    monkeypatch.undo()
    # gpu_visible: a /dev/nvidia<N> device, else what nvidia-smi -L lists (never torch.cuda)
    monkeypatch.setattr(build.glob, "glob", lambda pattern: [])
    smi = tmp_path / "nvidia-smi"
    monkeypatch.setenv("PATH", str(tmp_path))
    smi.write_text("#!/bin/sh\necho 'No devices were found'\n")
    smi.chmod(0o755)
    assert build.gpu_visible() is False
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n")
    assert build.gpu_visible() is True
    smi.unlink()
    assert build.gpu_visible() is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="the notice is about machines without a GPU")
def test_no_cuda_notice_on_a_machine_without_gpu(tmp_path):
    """torch.utils.cpp_extension, imported after fastinpaint (as torch.compile and the JIT
    build do), prints no "No CUDA runtime is found" on a CPU machine that has a toolkit."""
    env = {**os.environ, "CUDA_HOME": str(tmp_path)}   # a toolkit root torch will take: its notice's condition
    code = "import fastinpaint, torch.utils.cpp_extension as c; assert c.CUDA_HOME"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "CUDA" not in proc.stderr, proc.stderr
    # the default build's decision on such a machine, without compiling anything
    setup = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300, env={k: v for k, v in env.items() if k != "FASTINPAINT_CUDA"})
    assert setup.returncode == 0, setup.stderr[-2000:]
    if not _extension._build.gpu_visible():
        assert "CPU kernels only: FASTINPAINT_CUDA=auto and no GPU visible" in setup.stderr, setup.stderr
    assert "No CUDA runtime" not in setup.stderr, setup.stderr


def test_cpu_kernels_parallel_loop_runs_on_torchs_threads():
    """Every C++ CPU loop goes through one parallel_for (csrc/cpu/cpu_common.h): with torch at
    2 threads a large range runs on 2 threads, a range under the grain on 1, and at 1 thread on 1
    (at::parallel_for itself would run serially in an extension built without OpenMP flags)."""
    skip_unless_available("cpu", "cpu")
    probe = torch.ops.fastinpaint._parallel_threads
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert probe(1000, 1) == 2
        assert probe(1000, 600) == 2
        assert probe(1000, 1000) == 1      # one chunk: no hand-off
        torch.set_num_threads(1)
        assert probe(1000, 1) == 1
    finally:
        torch.set_num_threads(saved)


def test_compiled_op_does_not_recompile_after_an_eager_call():
    """An op compiled before its first eager call keeps its compiled code afterwards: the one-time
    check for a stale extension (``Op._complete``, filled by the first eager call) is skipped while
    tracing, so no guard depends on it."""
    skip_unless_available("cpu", "cpu")
    import torch._dynamo
    from fastinpaint.functional import channel_fc
    from fastinpaint.ops.channel_fc.op import OP

    x, w = torch.randn(2, 3, 2, 2), torch.randn(3, 4, 4)
    torch._dynamo.reset()
    saved = set(OP._complete)
    OP._complete.clear()
    try:
        with fastinpaint.use_backend("cpu"):
            compiled = torch.compile(lambda x, w: channel_fc(x, w), backend="eager", dynamic=False)
            first = compiled(x, w)
            eager = channel_fc(x, w)                 # fills OP._complete
            assert OP._complete
            with torch._dynamo.config.patch(error_on_recompile=True):
                again = compiled(x, w)
        torch.testing.assert_close(first, eager)
        torch.testing.assert_close(again, eager)
    finally:
        OP._complete.update(saved)
        torch._dynamo.reset()


def test_kernel_calls_without_a_gradient_skip_the_autograd_wrapper():
    """``_registry.call`` (every Kernel call, the spectral-normalised fold, the phase interleave)
    runs an op below the autograd keys in eager code where no argument needs a gradient, and
    through them where one does, or while torch.compile traces it."""
    from fastinpaint.ops import _registry

    lib = torch.library.Library("fastinpaint_test_call", "DEF")
    lib.define("double(Tensor x) -> Tensor")
    autograd_calls = []

    def double_autograd(x):   # what a Python autograd registration runs on every call
        autograd_calls.append(x.requires_grad)
        with torch._C._AutoDispatchBelowAutograd():
            y = torch.ops.fastinpaint_test_call.double(x)
        return y

    lib.impl("double", lambda x: x * 2, "CPU")
    lib.impl("double", double_autograd, "Autograd")
    lib.impl("double", lambda x: torch.empty_like(x), "Meta")
    op = torch.ops.fastinpaint_test_call.double.default
    x = torch.randn(5)
    try:
        with torch.no_grad():
            torch.testing.assert_close(_registry.call(op, x.requires_grad_()), x * 2)
        torch.testing.assert_close(_registry.call(op, x.detach()), x * 2)   # grad mode, no input needing one
        assert autograd_calls == []
        _registry.call(op, x)   # a gradient to record: through the autograd key
        assert autograd_calls == [True]
        autograd_calls.clear()
        compiled = torch.compile(lambda t: _registry.call(op, t), backend="eager", fullgraph=True)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x.detach()), x * 2)
    finally:
        lib._destroy()


def _ops_for_forward_ad(name):
    """(f, x): a public op as a function of its input, float64, odd sizes."""
    import fastinpaint.functional as FI
    g = torch.Generator().manual_seed(3)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    if name == "channel_fc":
        w, b = r(3, 15, 15) / 4, r(3, 15)
        return (lambda a: FI.channel_fc(a, w, b, activation="leaky_relu")), r(2, 3, 3, 5)
    w, b = r(8, 5, 3, 3) / 6, r(8)
    return (lambda a: FI.gated_conv2d(a, w, b, padding=1)), r(1, 5, 9, 7)


@pytest.mark.parametrize("mode", ["torch.func.jvp", "forward_ad.dual_level"])
@pytest.mark.parametrize("name", ["channel_fc", "gated_conv2d"])
def test_forward_mode_ad_runs_the_reference_or_refuses(name, mode):
    """The cpu backend's kernels have no tangent formula (their outputs carried no tangent, a zero
    one under torch.func.jvp): under forward-mode AD ``auto`` runs the reference, whose tangent
    matches central differences, and a forced cpu backend raises, naming forward-mode AD; outside
    it ``auto`` picks the cpu backend again."""
    from torch.autograd import forward_ad

    skip_unless_available("cpu", "cpu")
    f, x = _ops_for_forward_ad(name)
    t = torch.randn_like(x)
    eps = 1e-6
    with torch.no_grad():
        want = (f(x + eps * t) - f(x - eps * t)) / (2 * eps)

    def tangent():
        if mode == "torch.func.jvp":
            return torch.func.jvp(f, (x,), (t,))[1]
        with forward_ad.dual_level():
            return forward_ad.unpack_dual(f(forward_ad.make_dual(x, t))).tangent

    got = tangent()
    assert got is not None
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with use_backend("cpu"), pytest.raises(BackendUnavailableError, match="forward-mode AD"):
        tangent()
    assert not _backend.forward_mode_ad()
    assert _backend.select(name, ("reference", "cpu"), torch.device("cpu")) == "cpu"
