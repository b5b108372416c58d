"""pytest-benchmark suite: partial convolution on the PConv U-Net's layers.

    pytest benchmarks/test_partial_conv_bench.py --benchmark-only --benchmark-group-by=group

Every case is timed for the eager reference (the public formulation), torch.compile of it
and each fastinpaint backend available on the device, in the same run; compare within a
group. ``extra_info`` carries the bytes saved for backward.
"""

import pytest
import torch

from fastinpaint import benchmark as B
from fastinpaint.ops.partial_conv import bench as PB

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
BATCH = 8 if DEVICE == "cuda" else 1
IMPLS = ["eager", "compile(eager)", "fastinpaint[cpu]", "fastinpaint[cuda]", "fastinpaint[triton]"]
_cache: dict = {}


@pytest.mark.parametrize("mode", ["fwd+bwd", "fwd"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", PB.CASES, ids=[c.name for c in PB.CASES])
def test_partial_conv(benchmark, case, impl, mode):
    if case not in _cache:
        _cache[case] = PB.implementations(case, DEVICE)
    impls = _cache[case]
    if impl not in impls:
        pytest.skip(f"{impl} is not available on {DEVICE}")
    fn = impls[impl]
    grad = mode == "fwd+bwd"
    x, m, w, b = PB._inputs(case, BATCH, DEVICE, DTYPE, DEVICE == "cuda", grad)
    benchmark.group = f"{case.name} {mode}"
    benchmark.extra_info.update(device=DEVICE, dtype=str(DTYPE), batch=BATCH)
    if grad:
        gy = torch.randn_like(fn(x, m, w, b).detach())
        benchmark.extra_info["saved_MB"] = B.saved_bytes(lambda: fn(x, m, w, b), exclude=(x, m, w, b)) / 2**20

        def run():
            fn(x, m, w, b).backward(gy)
            if DEVICE == "cuda":
                torch.cuda.synchronize()
    else:
        def run():
            with torch.no_grad():
                fn(x, m, w, b)
            if DEVICE == "cuda":
                torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=10, warmup_rounds=2, iterations=1)
