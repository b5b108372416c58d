"""Every Triton kernel specialization the library launches at its benchmark shapes, compiled
with Triton's real compiler for sm_90 and sm_80 (no GPU needed), and every CUDA kernel of
fastinpaint._C read with cuobjdump: nothing fails to compile, nothing exceeds the
architecture's shared memory, no hot kernel spills. See fastinpaint/ops/resources.py.

The capture runs in a child process without the Triton interpreter; compiled results are
cached by the kernels' source hash, so a second run takes seconds."""

import importlib

import pytest
import torch

triton = pytest.importorskip("triton")

from fastinpaint.ops import resources as R  # noqa: E402

# minutes of compiling on a cold cache: the default suite (CI) runs it; the GPU suite, whose
# device time is short and which measures the real kernels, leaves it out (-m "not slow")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report():
    return R.report_in_child()


@pytest.fixture(scope="module")
def launches(report):
    return report[0]


@pytest.fixture(scope="module")
def rows(report):
    return report[1]


def _kernels_in_code() -> set[str]:
    """Every ``*_kernel`` JIT function defined in the ops' triton.py modules."""
    found = set()
    for op in R.OPS:
        mod = importlib.import_module(f"fastinpaint.ops.{op}.triton")
        for name, obj in vars(mod).items():
            if name.endswith("_kernel") and hasattr(obj, "arg_names") and obj.fn.__module__ == mod.__name__:
                found.add(f"{mod.__name__}:{name}")
    return found


def test_every_kernel_is_captured_and_every_launch_is_known(launches):
    captured = {launch.kernel for launch in launches}
    defined = _kernels_in_code()
    assert defined, "no Triton kernels found in fastinpaint/ops/*/triton.py"
    assert defined - captured == set(), f"kernels no op launches at its benchmark shapes: {sorted(defined - captured)}"
    assert captured - defined == set(), f"launched kernels not named *_kernel in an op's triton.py: {captured - defined}"
    dtypes = {launch.dtype for launch in launches}
    assert dtypes == {"bfloat16", "float16", "float32"}


def test_hot_kernels_exist():
    hot = R.hot_kernels()
    assert hot and hot <= _kernels_in_code(), sorted(hot - _kernels_in_code())


def test_every_specialization_compiles_fits_and_hot_ones_do_not_spill(rows):
    assert {r["arch"] for r in rows} == {"sm_90", "sm_80"}
    bad = R.problems(rows, R.hot_kernels())
    assert not bad, "\n".join(bad)


def test_problems_are_reported():
    """The check itself: an error, too much shared memory, and a hot kernel's spill are found."""
    base = {"op": "x", "kernel": "k", "module": "m", "dtype": "bfloat16", "config": "c", "arch": "sm_80",
            "shared_limit": 100}
    rows = [{**base, "error": "CompilationError: boom"},
            {**base, "registers": 40, "shared": 101, "stack": 0, "local": 0},
            {**base, "registers": 255, "shared": 10, "stack": 8, "local": 0},
            {**base, "kernel": "cold", "registers": 255, "shared": 10, "stack": 8, "local": 0}]
    found = R.problems(rows, {"m:k"})
    assert len(found) == 3 and "does not compile" in found[0] and "shared memory" in found[1] and "spills" in found[2]


# ----------------------------------------------------------------------------- autotuning

def test_gated_conv_pruning_respects_shared_memory_and_shapes():
    from fastinpaint.ops.gated_conv import triton as gk

    configs = gk._gpu_configs()
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.empty(1, dtype=dtype)
        for cin, cout in ((5, 24), (96, 96), (48, 24), (512, 512)):
            kept = gk._prune_configs(configs, {"x_ptr": x, "Cin": cin, "Cout": cout})
            assert kept
            for cfg in kept:
                assert gk.config_shared_bytes(cfg, x.element_size()) <= 163 * 1024  # sm_80's opt-in limit
                assert cfg.kwargs["BLOCK_N"] <= max(32, triton.next_power_of_2(cout))
                assert cfg.kwargs["BLOCK_K"] <= max(32, triton.next_power_of_2(cin))
    # fp32 tiles are twice as large: for a 512-channel layer the pruning drops configs bf16 keeps
    big = {"Cin": 512, "Cout": 512}
    kept32 = gk._prune_configs(configs, {"x_ptr": torch.empty(1), **big})
    kept16 = gk._prune_configs(configs, {"x_ptr": torch.empty(1, dtype=torch.bfloat16), **big})
    assert len(kept32) < len(kept16)

def test_gated_conv_autotune_key_has_what_changes_the_best_config():
    from fastinpaint.ops.gated_conv import triton as gk

    assert {"Cin", "Cout", "KH", "KW", "M", "stride_h", "stride_w", "dil_h", "dil_w", "UP"} <= set(gk.AUTOTUNE_KEY)
    assert set(gk.AUTOTUNE_KEY) <= set(gk._gated_conv_fwd_kernel.arg_names)


# ----------------------------------------------------------------------------- the CUDA extension

def _extension_with_cuda():
    from fastinpaint import _extension

    path = _extension.prebuilt_path()
    if path is None:
        pytest.skip("no prebuilt fastinpaint._C")
    info = _extension.read_build_info(path) or {}
    if info.get("cuda") != "1":
        pytest.skip("fastinpaint._C was built without CUDA kernels (FASTINPAINT_CUDA=1 builds them)")
    return path


def test_cuda_extension_kernels_do_not_spill():
    path = _extension_with_cuda()
    kernels = R.extension_kernels(path)
    assert len(kernels) >= 20, kernels[:5]
    archs = {k["arch"] for k in kernels}
    assert {"sm_80", "sm_90"} <= archs, archs
    # every kernel of every CUDA source is there, for both architectures
    for source, kernel in [("channel_fc.cu", "forward_epilogue_kernel"), ("partial_conv.cu", "window_sum_kernel"),
                           ("self_similarity.cu", "dense_key_grad_kernel"), ("self_similarity.cu", "key_grad_kernel"),
                           ("self_similarity.cu", "distance_forward_kernel")]:
        found = {k["arch"] for k in kernels if k["source"] == source and k["name"].find(kernel) >= 0}
        assert found >= {"sm_80", "sm_90"}, (source, kernel, found)
    spills = [k for k in kernels if k["local"] > 0 or k["stack"] > 0]
    assert not spills, "\n".join(f"{k['arch']} {k['name']}: stack {k['stack']} B, local {k['local']} B"
                                 for k in spills)



def test_cuda_elementwise_kernels_have_32bit_index_forms():
    """Every grid-stride elementwise kernel is built for 32-bit indices (at::cuda's fast
    divider: no 64-bit division per element) besides the 64-bit fallback for huge tensors."""
    import shutil

    path = _extension_with_cuda()
    if shutil.which("c++filt") is None:
        pytest.skip("c++filt (binutils) is needed to read the kernels' template arguments")
    kernels = R.extension_kernels(path)
    for base in ("forward_epilogue_kernel", "backward_prologue_kernel", "window_sum_kernel", "apply_kernel",
                 "gated_conv_act_forward_kernel", "gated_conv_act_backward_kernel"):
        forms = {("unsigned int" in k["kernel"], "long" in k["kernel"]) for k in kernels if k["base"] == base}
        assert (True, False) in forms and (False, True) in forms, (base, forms)
