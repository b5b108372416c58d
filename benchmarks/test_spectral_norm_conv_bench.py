"""pytest-benchmark suite: spectral-normalised convolution on the SN-PatchGAN discriminator's layers.

    pytest benchmarks/test_spectral_norm_conv_bench.py --benchmark-only --benchmark-group-by=group

Every case is timed for torch's ``spectral_norm(nn.Conv2d(...))`` (eager), torch.compile of it and
``SpectralNormConv2d`` on each fastinpaint backend available on the device (and compiled), in
training mode (a power-iteration step per forward), in the same run; compare within a group.
"""

import functools

import pytest
import torch

from fastinpaint import benchmark as B
from fastinpaint.models import spectral_norm_conv_bench as SB

DEVICE = B.default_device()
DTYPE = B.resolve_dtype(None, DEVICE)
BATCH = 2   # real and fake of one image
IMPLS = [*B.BASELINES, *(label for label in B.FASTINPAINT_IMPLS if "triton" not in label)]


@functools.cache
def _impls(case):
    return SB.implementations(case, DEVICE, DTYPE, DEVICE == "cuda")[0]


@pytest.mark.parametrize("mode", ["fwd+bwd", "fwd"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", SB.CASES, ids=[c.name for c in SB.CASES])
def test_spectral_norm_conv(benchmark, case, impl, mode):
    fn = B.implementation_or_skip(_impls(case), impl, DEVICE)
    grad = mode == "fwd+bwd"
    x = SB._input(case, BATCH, DEVICE, DTYPE, DEVICE == "cuda", grad)
    benchmark.group = f"{case.name} {mode}"
    benchmark.extra_info.update(device=DEVICE, dtype=str(DTYPE), batch=BATCH)
    run = B.bench_call(fn, (x,), grad, DEVICE)
    benchmark.pedantic(run, rounds=10, warmup_rounds=2, iterations=1)
