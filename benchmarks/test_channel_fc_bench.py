"""pytest-benchmark suite: the channel-wise fully connected layer at the Context Encoder's
shapes (B=64 C=512 4x4; B=64 C=256 8x8; B=16 C=64 32x32), forward+backward and forward.

    pytest benchmarks/test_channel_fc_bench.py --benchmark-only --benchmark-group-by=param:case

Every case is timed for the eager reference, torch.compile of it, and each fastinpaint
backend available on the device, in the same run; compare within a group. The JSON +
markdown tables (with GB/s against the measured copy bandwidth) come from
``python -m fastinpaint.ops.channel_fc.bench``.
"""

import pytest
import torch

from fastinpaint import benchmark as B
from fastinpaint.ops.channel_fc import bench as CF

DEVICE = B.default_device()
DTYPE = B.resolve_dtype(None, DEVICE)
IMPLS = [*B.BASELINES, *B.FASTINPAINT_IMPLS]

_impls: dict = {}


def _implementations():
    if not _impls:
        _impls.update(CF.implementations(DEVICE))
    return _impls


@pytest.mark.parametrize("mode", ["fwd+bwd", "fwd"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CF.CASES, ids=[c.name for c in CF.CASES])
def test_channel_fc(benchmark, case, impl, mode):
    fn = B.implementation_or_skip(_implementations(), impl, DEVICE)
    grad = mode == "fwd+bwd"
    (x,), w, b = CF.make_inputs(case, DEVICE, DTYPE, grad)
    benchmark.group = f"{case.name} {mode}"
    benchmark.extra_info.update(device=DEVICE, dtype=str(DTYPE))
    gy = torch.randn_like(x) if grad else None  # in x's layout, as the next layer hands it back
    if grad:
        benchmark.extra_info["saved_MB"] = B.saved_bytes(lambda: fn(x, w, b), exclude=(x, w, b)) / 2**20
    run = B.bench_call(fn, (x, w, b), grad, DEVICE, gy, wrt=(x, w, b))
    benchmark.pedantic(run, rounds=5 if case.size >= 32 and DEVICE == "cpu" else 10, warmup_rounds=2, iterations=1)
