"""pytest-benchmark suite: pixel attention and the attention-transfer loss (DGII).

    pytest benchmarks/test_pixel_attention_bench.py --benchmark-only --benchmark-group-by=group

On CUDA: B = 8, bfloat16, N = 4096 and 16384 (64x64 and 128x128 feature maps), Dqk = 32,
Dv = 256; on CPU: B = 1, float32, N = 1024. Every implementation of a case is timed in the
same run (eager, torch.compile(eager), each SDPA backend, fastinpaint's backends); compare
within a group. The JSON + markdown result files come from
``python -m fastinpaint.ops.pixel_attention.bench``.
"""

import pytest

from fastinpaint import benchmark as B
from fastinpaint.ops.pixel_attention import bench as PB

DEVICE = B.default_device()
DTYPE = B.resolve_dtype(None, DEVICE)
BATCH = 8 if DEVICE == "cuda" else 1
SIZES = [4096, 16384] if DEVICE == "cuda" else [1024]
ATTN_IMPLS = ["eager", "compile(eager)", "sdpa[auto]", "sdpa[flash]", "sdpa[efficient]", "sdpa[cudnn]",
              "sdpa[math]", *B.FASTINPAINT_IMPLS]
LOSS_IMPLS = [*B.BASELINES, *B.FASTINPAINT_IMPLS]

_cache: dict = {}


def _impls(kind):
    if kind not in _cache:
        _cache[kind] = (PB.attention_implementations(DEVICE) if kind == "attention"
                        else PB.loss_implementations(DEVICE))
    return _cache[kind]


def _run(benchmark, kind, impl, n, mode):
    fn = B.implementation_or_skip(_impls(kind), impl, DEVICE)
    grad = mode == "fwd+bwd"
    make = PB.make_attention_inputs if kind == "attention" else PB.make_loss_inputs
    args = make(BATCH, n, DEVICE, DTYPE, grad)
    benchmark.group = f"{kind} N={n} {mode}"
    benchmark.extra_info.update(device=DEVICE, dtype=str(DTYPE), batch=BATCH,
                                GFLOP=PB.flops(kind, BATCH, n, grad) / 1e9)

    run = B.bench_call(fn, args, grad, DEVICE)  # backward of the output's sum
    try:
        run()  # a backend that rejects the shapes (Dqk != Dv, the mask) is skipped, not failed
    except RuntimeError as exc:
        pytest.skip(f"{impl} rejects this case: {str(exc).splitlines()[0][:120]}")
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("mode", ["fwd+bwd", "fwd"])
@pytest.mark.parametrize("impl", ATTN_IMPLS)
@pytest.mark.parametrize("n", SIZES)
def test_pixel_attention(benchmark, n, impl, mode):
    _run(benchmark, "attention", impl, n, mode)


@pytest.mark.parametrize("mode", ["fwd+bwd", "fwd"])
@pytest.mark.parametrize("impl", LOSS_IMPLS)
@pytest.mark.parametrize("n", SIZES)
def test_attention_transfer_loss(benchmark, n, impl, mode):
    if DEVICE == "cuda" and n > 4096 and impl in ("eager", "compile(eager)"):
        pytest.skip("eager needs tens of GB at N=16384, B=8")
    _run(benchmark, "loss", impl, n, mode)
