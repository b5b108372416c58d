"""The benchmark scripts themselves, on tiny cases: every implementation they promise is timed
in the same run (eager, compile(eager), each fastinpaint backend and torch.compile of it),
every row has its ratios against both baselines, and nothing fails. The figures of such tiny
runs mean nothing; the structure does."""

import importlib.util
import json
import os
import sys

import pytest
import torch

from fastinpaint import benchmark as B
from conftest import skip_unless_available


def _script(name: str):
    """benchmarks/<name>.py loaded as a module (the scripts are not a package)."""
    path = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"bench_script_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _check(rows, expected_impls, baselines=B.BASELINES):
    assert rows, "no rows"
    for r in rows:
        assert "error" not in r, r
        assert r["ms"] > 0, r
        for base in baselines:
            assert r[f"x_vs_{base}"] > 0, (base, r)
    impls = [r["impl"] for r in rows]
    for impl in expected_impls:
        assert impl in impls, (impl, sorted(set(impls)))


@pytest.fixture(autouse=True)
def _cpu_backend():
    skip_unless_available("cpu", "cpu")


COMPILED = ["eager", "compile(eager)", "fastinpaint[cpu]", "compile(fastinpaint[cpu])"]


def test_channel_fc_bench():
    from fastinpaint.ops.channel_fc import bench

    rows, _ = bench.bench(cases=[bench.Case("tiny", 2, 3, 4)], device="cpu", modes=("fwd+bwd", "fwd"),
                          min_time_s=0.0)
    _check(rows, COMPILED)


def test_partial_conv_bench():
    from fastinpaint.ops.partial_conv import bench

    rows = bench.run(cases=[bench.Case("tiny", 3, 4, 3, 2, 9)], device="cpu", modes=("fwd",), min_time_s=0.0)
    _check(rows, COMPILED)


def test_spectral_norm_conv_bench():
    from fastinpaint.models import spectral_norm_conv_bench as bench

    rows = bench.run(cases=[bench.Case("tiny", 8, 16, 6, k=5, stride=2)], device="cpu", min_time_s=0.0)
    _check(rows, COMPILED)
    grad = [r for r in rows if r["mode"] == "fwd+bwd"]
    assert {r["impl"] for r in grad if "saved_MB" in r} == {"eager", "fastinpaint[cpu]"}
    by = {r["impl"]: r for r in grad}
    assert by["fastinpaint[cpu]"]["saved_MB"] < by["eager"]["saved_MB"]   # no normalised weight saved


def test_pixel_attention_bench():
    from fastinpaint.ops.pixel_attention import bench

    rows = bench.bench(kinds=("attention", "loss"), sizes=(16,), device="cpu", dtype=torch.float32, batch=1,
                       modes=("fwd",), min_time_s=0.0, cpu_memory=False)
    _check([r for r in rows if r["impl"] in COMPILED], COMPILED)


def test_self_similarity_bench():
    from fastinpaint.ops.self_similarity import bench

    cases = [bench.Case("tiny sparse", 1, 4, 6, 7, 3, Q=5), bench.Case("tiny dense", 1, 4, 5, 5, 3, Q=0, window="zero")]
    rows = bench.bench(cases=cases, device="cpu", min_time_s=0.0, measure_peak=False)
    _check(rows, ["eager reference", "compile(gather)", "fastinpaint[cpu]", "compile(fastinpaint[cpu])"],
           baselines=("eager reference", "compile(gather)"))


def test_deepfill_v2_bench_structure():
    """The model benchmark times the compiled model on fastinpaint's layers beside the three
    others; run here without the two compiled ones (compiling the whole generator takes
    minutes on 2 cores)."""
    from fastinpaint.models import deepfill_v2_bench as DB

    assert DB.IMPLS == ("eager", "fastinpaint", "compile(eager)", "compile(fastinpaint)")
    rows = DB.run_benchmarks(device="cpu", cases=(("G inference", 1, 32),), cnum=4, impls=("eager", "fastinpaint"),
                             min_time_s=0.0)
    assert [r["impl"] for r in rows] == ["eager", "fastinpaint"]
    for r in rows:
        assert "error" not in r and r["ms"] > 0 and r["x_vs_eager"] > 0, r
        if sys.platform.startswith("linux"):   # measured in a child process, not the timed one
            assert r["peak_MB"] is not None and r["peak_MB"] >= 0, r


def test_deepfill_v2_train_step_freezes_d_for_the_generator_step():
    """As the trainer: the discriminator's gradients come from its own step only, and it is
    trainable again afterwards."""
    from fastinpaint.models import deepfill_v2_bench as DB

    recipe = DB.build("cpu", torch.float32, False, cnum=4)
    image, mask = DB._inputs(1, (32, 32), "cpu", torch.float32, False)
    DB.make_step(recipe, "fastinpaint", "train step", image, mask)()
    d = recipe.discriminator
    grads = [p.grad.clone() for p in d.parameters()]
    assert all(p.requires_grad for p in d.parameters())
    for p in d.parameters():
        p.grad = None
    # the D step alone, from the same initial state (same seed); the generator's output is the
    # same in eval mode
    recipe2 = DB.build("cpu", torch.float32, False, cnum=4)
    out = recipe2.generator.eval()(recipe2.prepare_input(image, mask))
    recipe2.generator.train()
    sum(recipe2.discriminator_losses(image, mask, out, recipe2.discriminator).values()).backward()
    grads2 = [p.grad for p in recipe2.discriminator.parameters()]
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_large_image_bench_writes_its_files(tmp_path):
    """benchmarks/deepfill_v2_large_images.py on a tiny image: a fresh process per size, the
    row's figures (time, peak, estimate), the JSON and markdown files; a bad size is refused."""
    mod = _script("deepfill_v2_large_images")
    out_json, out_md = tmp_path / "large.json", tmp_path / "large.md"
    assert mod.main(["--sizes", "64", "--json", str(out_json), "--markdown", str(out_md)]) == 0
    (row,) = json.loads(out_json.read_text())["results"]
    assert row["image"] == "64x64" and row["seconds"] > 0 and 0 < row["hole_share"] < 1
    assert row["peak_rss_GB"] >= row["rss_before_GB"] > 0 and row["estimate_GB"] > 0
    assert "| 64x64 |" in out_md.read_text()
    with pytest.raises(SystemExit):
        mod.main(["--sizes", "60"])


def test_conv_grads_bench_writes_its_files(tmp_path):
    """benchmarks/conv_grads.py on a tiny layer: torch's and fastinpaint's input and weight
    gradients, each with its time and its ratio to torch's (1 for torch's itself), the files; a bad
    case is refused."""
    skip_unless_available("cpu", "cpu")
    mod = _script("conv_grads")
    out_json, out_md = tmp_path / "grad.json", tmp_path / "grad.md"
    assert mod.main(["--cases", "3:8:3:2:12:2", "--rounds", "1", "--json", str(out_json),
                     "--markdown", str(out_md)]) == 0
    rows = json.loads(out_json.read_text())["results"]
    assert [(r["grad"], r["impl"]) for r in rows] == [(g, i) for g in mod.GRADS for i in mod.IMPLS]
    assert all(r["ms"] > 0 for r in rows)
    assert all((r["x_vs_torch"] == 1) == (r["impl"] == mod.IMPLS[0]) for r in rows)
    assert "| weight | fastinpaint |" in out_md.read_text()
    for bad in ("3:8:3:2:12", "3:8:0:2:12:2"):
        with pytest.raises(SystemExit):
            mod.main(["--cases", bad])


def test_conv_layouts_bench_writes_its_files(tmp_path):
    """benchmarks/conv_layouts.py on a tiny layer: three layouts per mode and, forward only,
    fastinpaint's two, each with its time and its ratio to NCHW (1 for NCHW itself), the JSON and
    markdown files; a bad case is refused."""
    mod = _script("conv_layouts")
    out_json, out_md = tmp_path / "layouts.json", tmp_path / "layouts.md"
    assert mod.main(["--cases", "3:8:3:2:12:2", "--rounds", "1", "--json", str(out_json),
                     "--markdown", str(out_md)]) == 0
    rows = json.loads(out_json.read_text())["results"]
    assert [(r["mode"], r["layout"]) for r in rows] == (
        [("fwd+bwd", lay) for lay in mod.LAYOUTS] + [("fwd", lay) for lay in mod.LAYOUTS + mod.COPY_LAYOUTS])
    assert all(r["ms"] > 0 for r in rows)
    assert all(r["x_vs_NCHW"] == 1 for r in rows if r["layout"] == "NCHW")
    assert "channels_last, back" in out_md.read_text()
    for bad in ("3:8:3:2:12", "3:8:0:2:12:2", "a:8:3:2:12:2"):
        with pytest.raises(SystemExit):
            mod.main(["--cases", bad])


def test_channel_fc_gemm_orientation_bench_writes_its_files(tmp_path):
    """benchmarks/channel_fc_gemm_orientation.py on a tiny case: both orientations of both GEMMs,
    each with its time and its ratio to the weight-major one (1 for itself), the JSON and markdown
    files; a bad case is refused."""
    mod = _script("channel_fc_gemm_orientation")
    out_json, out_md = tmp_path / "orientation.json", tmp_path / "orientation.md"
    assert mod.main(["--cases", "3:2:20", "--rounds", "1", "--json", str(out_json), "--markdown", str(out_md)]) == 0
    rows = json.loads(out_json.read_text())["results"]
    assert [(r["mode"], r["orientation"]) for r in rows] == [(m, o) for m in ("forward", "dx") for o in mod.ORIENTATIONS]
    assert all(r["ms"] > 0 for r in rows)
    assert all(r["x_vs_weight-major"] == 1 for r in rows if r["orientation"] == "weight-major")
    assert "batch-major" in out_md.read_text()
    for bad in ("3:2", "3:0:20", "a:2:20"):
        with pytest.raises(SystemExit):
            mod.main(["--cases", bad])
