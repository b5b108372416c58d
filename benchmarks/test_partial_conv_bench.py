"""pytest-benchmark suite: partial convolution on the PConv U-Net's layers.

    pytest benchmarks/test_partial_conv_bench.py --benchmark-only --benchmark-group-by=group

Every case is timed for the eager reference (the public formulation), torch.compile of it
and each fastinpaint backend available on the device, in the same run; compare within a
group. ``extra_info`` carries the bytes saved for backward.
"""

import functools

import pytest
import torch

from fastinpaint import benchmark as B
from fastinpaint.ops.partial_conv import bench as PB

DEVICE = B.default_device()
DTYPE = B.resolve_dtype(None, DEVICE)
BATCH = 8 if DEVICE == "cuda" else 1
IMPLS = [*B.BASELINES, *B.FASTINPAINT_IMPLS]


@functools.cache
def _impls(case):
    return PB.implementations(case, DEVICE)


@pytest.mark.parametrize("mode", ["fwd+bwd", "fwd"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", PB.CASES, ids=[c.name for c in PB.CASES])
def test_partial_conv(benchmark, case, impl, mode):
    fn = B.implementation_or_skip(_impls(case), impl, DEVICE)
    grad = mode == "fwd+bwd"
    x, m, w, b = PB._inputs(case, BATCH, DEVICE, DTYPE, DEVICE == "cuda", grad)
    benchmark.group = f"{case.name} {mode}"
    benchmark.extra_info.update(device=DEVICE, dtype=str(DTYPE), batch=BATCH)
    gy = None
    if grad:
        gy = torch.randn_like(fn(x, m, w, b).detach())
        benchmark.extra_info["saved_MB"] = B.saved_bytes(lambda: fn(x, m, w, b), exclude=(x, m, w, b)) / 2**20
    run = B.bench_call(fn, (x, m, w, b), grad, DEVICE, gy)
    benchmark.pedantic(run, rounds=10, warmup_rounds=2, iterations=1)
