"""pytest-benchmark suite: the fused spatially-correlative distance and the dense
self-similarity (local correlation) form.

    pytest benchmarks/test_self_similarity_bench.py --benchmark-only --benchmark-group-by=param:case

Every case is timed (forward + backward) for the public code's loop formulation (sparse
cases), the eager reference, torch.compile of the vectorised gather formulation, and each
fastinpaint backend available on the device; compare within a group. The JSON/markdown
result files come from ``python -m fastinpaint.ops.self_similarity.bench``.
"""

import functools

import pytest

from fastinpaint import benchmark as B
from fastinpaint.ops.self_similarity import bench as SB

DEVICE = B.default_device()
DTYPE = B.resolve_dtype(None, DEVICE)
CASES = SB.GPU_CASES if DEVICE == "cuda" else SB.CPU_CASES
IMPLS = ["loop (public)", "eager reference", "compile(gather)", *B.FASTINPAINT_IMPLS]


@functools.cache
def _impls(case):
    return SB.implementations(case, DEVICE)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_self_similarity(benchmark, case, impl):
    fn = B.implementation_or_skip(_impls(case), impl, DEVICE, f" for {case.name}")
    f, t, index = SB._inputs(case, DEVICE, DTYPE)
    benchmark.group = case.name
    benchmark.extra_info.update(device=DEVICE, dtype=str(DTYPE))

    def run():
        SB._step(fn, f, t, index)
        B.sync(DEVICE)

    slow = impl == "loop (public)" and DEVICE == "cpu"
    benchmark.pedantic(run, rounds=2 if slow else 10, warmup_rounds=1, iterations=1)
