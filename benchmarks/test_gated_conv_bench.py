"""pytest-benchmark suite: gated convolution on DeepFill v2's generator layers.

    pytest benchmarks/ --benchmark-only                  # cpu float32 batch 1, or cuda bfloat16 batch 8
    pytest benchmarks/ --benchmark-only --benchmark-group-by=param:case

Every case is timed for the eager reference (the public ports' formulation),
torch.compile of it, each fastinpaint backend available on the device and torch.compile of it, in the
same run; compare within a group. ``extra_info`` carries bytes saved for backward.
"""

import pytest
import torch

from fastinpaint import benchmark as B
from fastinpaint.ops.gated_conv import bench as GB

DEVICE = B.default_device()
DTYPE = B.resolve_dtype(None, DEVICE)
BATCH = 8 if DEVICE == "cuda" else 1
IMPLS = [*B.BASELINES, *B.FASTINPAINT_IMPLS]

_impl_cache: dict = {}


def _impls(case):
    if case not in _impl_cache:
        _impl_cache[case] = GB.implementations(case, DEVICE)
    return _impl_cache[case]


@pytest.mark.parametrize("mode", ["fwd+bwd", "fwd"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", GB.DEEPFILL_CASES, ids=[c.name for c in GB.DEEPFILL_CASES])
def test_gated_conv(benchmark, case, impl, mode):
    fn = B.implementation_or_skip(_impls(case), impl, DEVICE)
    grad = mode == "fwd+bwd"
    (x,), w, b = GB.make_inputs(case, BATCH, DEVICE, DTYPE, True, grad)
    benchmark.group = f"{case.name} {mode}"
    benchmark.extra_info.update(device=DEVICE, dtype=str(DTYPE), batch=BATCH)

    gy = None
    if grad:
        gy = torch.randn_like(fn(x, w, b).detach())
        benchmark.extra_info["saved_MB"] = B.saved_bytes(lambda: fn(x, w, b), exclude=(x, w, b)) / 2**20
    run = B.bench_call(fn, (x, w, b), grad, DEVICE, gy)
    benchmark.pedantic(run, rounds=10, warmup_rounds=2, iterations=1)
