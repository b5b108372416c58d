"""pytest-benchmark suite: DeepFill v2 end to end (fastinpaint.models.deepfill_v2_bench).

    pytest benchmarks/test_deepfill_v2_bench.py --benchmark-only --benchmark-group-by=param:case

Per case, the generator on fastinpaint's kernels, the same model on eager layers
(use_backend("reference")) and torch.compile of that; compare within a group. GPU:
bfloat16, channels_last, training batch 8 at 256x256, inference at 512x512. CPU: float32,
batch 1, 128x128 training and 256x256 inference (the published sizes take minutes per
round on a small CPU; the results script runs them). ``extra_info`` carries the peak memory.
"""

import pytest

from fastinpaint import benchmark as B
from fastinpaint.models import deepfill_v2_bench as DB

DEVICE = B.default_device()
GPU = DEVICE == "cuda"
DTYPE = B.resolve_dtype(None, DEVICE)
CHANNELS_LAST = GPU
CASES = [("G fwd+bwd", 8 if GPU else 1, 256 if GPU else 128),
         ("train step", 8 if GPU else 1, 256 if GPU else 128),
         ("G inference", 1, 512 if GPU else 256)]


@pytest.mark.parametrize("impl", DB.IMPLS)
@pytest.mark.parametrize("case,batch,size", CASES, ids=[c[0] for c in CASES])
def test_deepfill_v2(benchmark, case, batch, size, impl):
    image, mask = DB._inputs(batch, (size, size), DEVICE, DTYPE, CHANNELS_LAST)
    recipe = DB.build(DEVICE, DTYPE, CHANNELS_LAST)
    run = DB.make_step(recipe, impl, case, image, mask)
    for _ in range(2):
        run()

    def timed():
        run()
        B.sync(DEVICE)

    benchmark.group = f"deepfill_v2 {case} b{batch} {size}"
    benchmark.extra_info.update(device=DEVICE, dtype=str(DTYPE), batch=batch, size=size,
                                peak_MB=DB.peak_mb(run, DEVICE, case, impl, batch, size, DTYPE,
                                                           CHANNELS_LAST))
    benchmark.pedantic(timed, rounds=5, warmup_rounds=1, iterations=1)
