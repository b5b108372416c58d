"""pytest-benchmark suite: the fused spatially-correlative distance and the dense
self-similarity (local correlation) form.

    pytest benchmarks/test_self_similarity_bench.py --benchmark-only --benchmark-group-by=param:case

Every case is timed (forward + backward) for the public code's loop formulation (sparse
cases), the eager reference, torch.compile of the vectorised gather formulation, and each
fastinpaint backend available on the device; compare within a group. The JSON/markdown
result files come from ``python -m fastinpaint.ops.self_similarity.bench``.
"""

import pytest
import torch

from fastinpaint.ops.self_similarity import bench as B

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
CASES = B.GPU_CASES if DEVICE == "cuda" else B.CPU_CASES
IMPLS = ["loop (public)", "eager reference", "compile(gather)", "fastinpaint[cpu]", "fastinpaint[cuda]",
         "fastinpaint[triton]"]
_cache: dict = {}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_self_similarity(benchmark, case, impl):
    if case not in _cache:
        _cache[case] = B.implementations(case, DEVICE)
    impls = _cache[case]
    if impl not in impls:
        pytest.skip(f"{impl} is not available for {case.name} on {DEVICE}")
    fn = impls[impl]
    f, t, index = B._inputs(case, DEVICE, DTYPE)
    benchmark.group = case.name
    benchmark.extra_info.update(device=DEVICE, dtype=str(DTYPE))

    def run():
        B._step(fn, f, t, index)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    slow = impl == "loop (public)" and DEVICE == "cpu"
    benchmark.pedantic(run, rounds=2 if slow else 10, warmup_rounds=1, iterations=1)
