"""Partial convolution benchmarks on the PConv U-Net's layers (Liu et al. 2018): fastinpaint's
backends against the eager reference (the public formulation) and torch.compile of it, in the
same run (on the CPU in turns, one call of each per round). Per case: median ms of forward+backward and of forward (no grad), the speed-ups,
and the bytes saved for backward.

    python -m fastinpaint.ops.partial_conv.bench --device cpu --json out.json --markdown out.md
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from ... import _backend
from ... import benchmark as B
from . import reference
from .op import partial_conv2d


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    cin: int
    cout: int
    k: int
    stride: int
    size: int
    multi_channel: bool = False


# encoder layers of the 512x512 network (7x7 s2 3->64, 5x5 s2 64->128, 5x5 s2 128->256, 3x3 s2 256->512),
# a decoder layer (3x3 on the concatenation 512+256 -> 256 at 64), multi-channel masks as in the U-Net
CASES = [
    Case("enc1 3->64 7x7 s2 @512", 3, 64, 7, 2, 512, True),
    Case("enc2 64->128 5x5 s2 @256", 64, 128, 5, 2, 256, True),
    Case("enc3 128->256 5x5 s2 @128", 128, 256, 5, 2, 128, True),
    Case("dec 768->256 3x3 @64", 768, 256, 3, 1, 64, True),
    Case("single-mask 64->64 3x3 @128", 64, 64, 3, 1, 128, False),
]


def _inputs(case: Case, batch, device, dtype, channels_last, grad):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, case.cin, case.size, case.size, generator=g)
    m = torch.ones(batch, case.cin if case.multi_channel else 1, case.size, case.size)
    s = case.size
    m[:, :, s // 4:s // 2, s // 3:3 * s // 4] = 0
    w = torch.randn(case.cout, case.cin, case.k, case.k, generator=g) / (case.cin * case.k * case.k) ** 0.5
    b = torch.randn(case.cout, generator=g)
    to = dict(device=device, dtype=dtype)
    x, m, w, b = x.to(**to), m.to(**to), w.to(**to), b.to(**to)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        m = m.contiguous(memory_format=torch.channels_last)
    for t in (x, w, b):
        t.requires_grad_(grad)
    return x, m, w, b


def implementations(case: Case, device: str, compile_baseline: bool = True) -> dict:
    pad = case.k // 2

    def eager(x, m, w, b):
        return reference.partial_conv2d(x, m, w, b, case.stride, pad, 1)[0]

    impls = {"eager": eager}
    for backend in ("cpu", "cuda", "triton"):
        if backend == "triton" and device == "cpu":
            continue  # the interpreter is for correctness, not speed
        if _backend.unavailable_reason(backend, device) is None:
            def fn(x, m, w, b, _backend_name=backend):
                with _backend.use_backend(_backend_name):
                    return partial_conv2d(x, m, w, b, case.stride, pad, 1)[0]
            impls[f"fastinpaint[{backend}]"] = fn
    return B.with_compiled(impls, compile_baseline)


def run(cases=CASES, device="cpu", dtype=torch.float32, batch=1, channels_last=False, modes=("fwd+bwd", "fwd"),
        min_time_s=0.5, progress=None, compile_baseline: bool = True) -> list[dict]:
    rows = []
    for case in cases:
        with B.fresh_compile():   # each case compiles afresh; a fallback to eager is an error
            impls = implementations(case, device, compile_baseline)
            for mode in modes:
                grad = mode == "fwd+bwd"
                x, m, w, b = _inputs(case, batch, device, dtype, channels_last, grad)
                runs, failed = {}, {}
                for name, fn in impls.items():
                    try:
                        if grad:
                            gy = torch.randn_like(fn(x, m, w, b).detach())

                            def step(fn=fn, gy=gy):
                                for t in (x, w, b):
                                    t.grad = None
                                fn(x, m, w, b).backward(gy)
                        else:
                            def step(fn=fn):
                                with torch.no_grad():
                                    fn(x, m, w, b)
                        runs[name] = step
                    except Exception as e:  # report, keep going
                        failed[name] = {"error": B.error_text(e, limit=None)}
                timed = {**B.time_implementations(runs, device, min_time_s), **failed}
                results = {}
                for name, fn in impls.items():
                    row = {"case": case.name, "mode": mode, "impl": name, "dtype": B.dtype_name(dtype),
                           "batch": batch, **timed[name]}
                    if "error" not in row:
                        if grad:
                            row["saved_MB"] = B.saved_bytes(lambda fn=fn: fn(x, m, w, b),
                                                            exclude=(x, m, w, b)) / 2**20
                        if device == "cuda":
                            row["peak_MB"] = B.cuda_peak_mb(runs[name])
                    results[name] = row
                    rows.append(row)
                B.add_ratios(results)
                if progress:
                    progress(rows)
    return rows


COLUMNS = B.LAYER_COLUMNS + [("peak MB", "peak_MB", ".1f")]


def markdown(rows, env, ceilings=None) -> str:
    return B.markdown_table(rows, COLUMNS, env, ceilings)


def capture_calls(dtype: torch.dtype) -> None:
    """Every Triton launch of the PConv U-Net cases in ``dtype``, channels_last, forward and
    backward (``ops/resources.py`` records them), at batch 1 (the host-side convolution)."""
    for case in CASES:
        pad = case.k // 2
        B.capture_steps(lambda x, m, w, b, case=case, pad=pad: partial_conv2d(x, m, w, b, case.stride, pad, 1)[0],
                        lambda grad, case=case: _inputs(case, 1, "cpu", dtype, True, grad))


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of this script and of ``fastinpaint bench partial_conv``."""
    return B.add_layer_args(p, batch_help="batch size (default 8 on CUDA, 1 on the CPU)")


def run_args(a: argparse.Namespace) -> int:
    """Run the cases ``a`` (from :func:`add_arguments`) select; print and write the table."""
    return B.run_layer_args(a, CASES, run, markdown, "partial convolution", 8 if a.device == "cuda" else 1)


def main(argv=None) -> int:
    return run_args(add_arguments(argparse.ArgumentParser(description="partial convolution benchmarks"))
                    .parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(B.script_main(main, "python -m fastinpaint.ops.partial_conv.bench"))
