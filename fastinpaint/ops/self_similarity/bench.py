"""Benchmarks of the self-similarity maps and the fused spatially-correlative distance.

    python -m fastinpaint.ops.self_similarity.bench --device cpu --json out.json --markdown out.md

Baselines, timed in the same run (on the CPU in turns, the public loop on its own; forward +
backward of the ``cos`` distance for the sparse cases, of the maps' sum of squares for the dense
form):
  loop (public)     the public code's formulation: Python loop over the queries, stack of the
                    B x Q x C x K x K windows, bmm (reference.self_similarity_loop)
  eager reference   one bmm per image against the whole map, gather (the tests' oracle)
  compile(gather)   torch.compile of the vectorised gather formulation
                    (reference.self_similarity_gather)
and every fastinpaint backend available on the device, with torch.compile of each. Figures per row: median ms, ratio of
each baseline's time to this row's, peak extra memory of one forward+backward (GPU:
max_memory_allocated above the inputs; CPU: peak RSS (VmHWM, reset after a warm-up call)
minus the RSS before the call, in a fresh subprocess), and for
the dense form the achieved fraction of a roofline (the larger of the bytes-moved and
FLOP times at the measured copy bandwidth / matmul rate).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch

from ... import _backend
from ... import benchmark as B
from . import reference as ref
from .op import MAPS_OP, self_similarity, spatial_correlative_distance


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    B: int
    C: int
    H: int
    W: int
    K: int
    Q: int = 256  # 0: dense form (every position a query)
    window: str = "clamp"

    @property
    def dense(self) -> bool:
        return self.Q == 0


GPU_CASES = [
    Case("sparse B8 C256 64x64 Q256 K32", 8, 256, 64, 64, 32),
    Case("sparse B4 C128 128x128 Q256 K32", 4, 128, 128, 128, 32),
    Case("dense B8 C64 64x64 K7", 8, 64, 64, 64, 7, Q=0, window="zero"),
    Case("dense B8 C64 64x64 K15", 8, 64, 64, 64, 15, Q=0, window="zero"),
]
# The loop-style baseline at (B=8, C=256, 64x64) takes minutes per call on a 2-core CPU and
# about 6 GiB: the CPU run uses that map and window with fewer images / channels; the
# 128x128 case is the GPU shape itself.
CPU_CASES = [
    Case("sparse B2 C128 64x64 Q256 K32", 2, 128, 64, 64, 32),
    Case("sparse B4 C128 128x128 Q256 K32", 4, 128, 128, 128, 32),
    Case("dense B2 C64 64x64 K7", 2, 64, 64, 64, 7, Q=0, window="zero"),
    Case("dense B2 C64 64x64 K15", 2, 64, 64, 64, 15, Q=0, window="zero"),
]


def _inputs(case: Case, device: str, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(case.B, case.C, case.H, case.W, generator=g).to(device=device, dtype=dtype).requires_grad_()
    t = torch.randn(case.B, case.C, case.H, case.W, generator=g).to(device=device, dtype=dtype).requires_grad_()
    hw = case.H * case.W
    index = torch.arange(hw) if case.dense else torch.randperm(hw, generator=g)[:case.Q]
    return f, t, index.to(device)


def implementations(case: Case, device: str, compile_baseline: bool = True) -> dict:
    """{label: fn(f, t, index) -> scalar loss}."""
    impls = {}
    if case.dense:
        impls["eager reference"] = lambda f, t, i: ref.self_similarity(f, i, case.K, case.window).square().mean()
        if compile_baseline:
            impls["compile(gather)"] = torch.compile(
                lambda f, t, i: ref.self_similarity_gather(f, i, case.K, case.window).square().mean(), dynamic=False)
    else:
        impls["loop (public)"] = lambda f, t, i: ref.compare_maps(ref.self_similarity_loop(f, i, case.K),
                                                                  ref.self_similarity_loop(t, i, case.K), "cos")
        impls["eager reference"] = lambda f, t, i: ref.spatial_correlative_distance(f, t, i, case.K, "cos")
        if compile_baseline:
            impls["compile(gather)"] = torch.compile(
                lambda f, t, i: ref.compare_maps(ref.self_similarity_gather(f, i, case.K),
                                                 ref.self_similarity_gather(t, i, case.K), "cos"), dynamic=False)
    for backend in ("cpu", "cuda", "triton"):
        if backend not in MAPS_OP.implemented or _backend.unavailable_reason(backend, device) is not None:
            continue
        if backend == "triton" and device == "cpu":
            continue  # the interpreter is for correctness, not speed

        def fn(f, t, i, backend=backend):
            with _backend.use_backend(backend):
                if case.dense:
                    return self_similarity(f, "all", patch_size=case.K, window=case.window).square().mean()
                return spatial_correlative_distance(f, t, i, patch_size=case.K, mode="cos", window=case.window)

        impls[f"fastinpaint[{backend}]"] = fn
    return B.with_compiled(impls, compile_baseline)   # adds compile(fastinpaint[...]) beside each backend


def _step(fn, f, t, index):
    loss = fn(f, t, index)
    loss.backward()
    f.grad = t.grad = None


def _peak_cpu_subprocess(case: Case, label: str, dtype) -> float | None:
    """Peak RSS growth (MiB) of one forward+backward, in a fresh process (after a warm-up call,
    so that one-time allocations and compilation do not count)."""
    code = (
        "import json, torch\n"
        "from fastinpaint import benchmark as B\n"
        "from fastinpaint.ops.self_similarity import bench as b\n"
        f"case = b.Case(**json.loads({json.dumps(json.dumps(dataclasses.asdict(case)))}))\n"
        f"dtype = getattr(torch, {B.dtype_name(dtype)!r})\n"
        "f, t, i = b._inputs(case, 'cpu', dtype)\n"
        f"fn = b.implementations(case, 'cpu', {label.startswith('compile(')!r})[{label!r}]\n"
        "b._step(fn, f, t, i)\n"
        "import gc; gc.collect()\n"
        "print(B.peak_line(B.cpu_peak_mb(lambda: b._step(fn, f, t, i))))\n"
    )
    return B.run_peak_child([sys.executable, "-c", code], timeout=900)


def _time_case(case, device, dtype, min_time_s, compile_baseline, measure_peak, ceilings) -> dict:
    """{label: row} of one case."""
    f, t, index = _inputs(case, device, dtype)
    impls = implementations(case, device, compile_baseline)
    timed = {}
    if device == "cpu":
        # in turns (a drifting machine slows every implementation alike); the public per-query
        # loop, seconds a call, on its own
        slow = "loop (public)"
        timed = B.time_interleaved({label: (lambda fn=fn: _step(fn, f, t, index)) for label, fn in impls.items()
                                    if label != slow}, device, min_time_s, warmup=1)
        if slow in impls:
            timed[slow] = B.time_interleaved({slow: lambda: _step(impls[slow], f, t, index)}, device, 0.0,
                                             max_rounds=3, warmup=1)[slow]
    results = {}
    for label, fn in impls.items():
        try:
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                _step(fn, f, t, index)  # warm-up / compile
                peak = B.cuda_peak_mb(lambda: _step(fn, f, t, index))
                ms = B.time_fn(lambda: _step(fn, f, t, index), device, min_time_s=min_time_s)
            else:
                if "error" in timed[label]:
                    results[label] = timed[label]
                    continue
                ms = timed[label]["ms"]
                peak = _peak_cpu_subprocess(case, label, dtype) if measure_peak else None
        except Exception as exc:  # noqa: BLE001 - a failing implementation is a result
            results[label] = {"error": B.error_text(exc)}
            continue
        row = {"ms": ms, "peak_extra_MB": peak}
        if case.dense and ceilings:
            n = case.K * case.K
            hw = case.H * case.W
            esize = torch.finfo(dtype).bits // 8
            # forward + backward: read g (x2 in backward), write the maps, read their grad, write dg
            bytes_moved = esize * case.B * hw * (3 * case.C + 2 * n + case.C)
            flops = 3 * 2 * case.B * hw * n * case.C
            t_bw = bytes_moved / (ceilings["copy_GBps"] * 1e9)
            t_fl = flops / (next(v for k, v in ceilings.items() if k.startswith("matmul")) * 1e12)
            row["roofline_ms"] = max(t_bw, t_fl) * 1e3
            row["of_roofline"] = row["roofline_ms"] / ms
        results[label] = row
    return results


def bench(cases=None, device: str = "cpu", dtype=torch.float32, min_time_s: float = 0.5, compile_baseline=True,
          measure_peak: bool = True, progress=None, ceilings=None) -> list[dict]:
    cases = (GPU_CASES if device == "cuda" else CPU_CASES) if cases is None else cases
    if ceilings is None:
        ceilings = B.measure_ceilings(device) if device == "cuda" else {}
    rows = []
    for case in cases:
        with B.fresh_compile():   # each case compiles afresh; a fallback to eager is an error
            results = _time_case(case, device, dtype, min_time_s, compile_baseline, measure_peak, ceilings)
        bases = {k: results[k]["ms"] for k in ("loop (public)", "eager reference", "compile(gather)")
                 if "ms" in results.get(k, {})}
        base_peaks = {k: results[k]["peak_extra_MB"] for k in bases if results[k].get("peak_extra_MB")}
        for label, row in results.items():
            entry = {"case": case.name, "impl": label, "dtype": B.dtype_name(dtype), "mode": "fwd+bwd", **row,
                     **B.speedups(row, bases)}
            if "ms" in row:
                for k, v in base_peaks.items():
                    if row.get("peak_extra_MB") is not None:
                        entry[f"peak_vs_{k}"] = row["peak_extra_MB"] / v
            rows.append(entry)
        if progress:
            progress(case.name, rows)
    return rows


COLUMNS = [("case", "case", None), ("impl", "impl", None), ("dtype", "dtype", None), ("ms", "ms", ".2f"),
           ("x vs loop (public)", "x_vs_loop (public)", ".1f"), ("x vs eager reference", "x_vs_eager reference", ".2f"),
           ("x vs compile(gather)", "x_vs_compile(gather)", ".2f"), ("peak extra MB", "peak_extra_MB", ".1f"),
           ("peak / loop's", "peak_vs_loop (public)", ".3f"), ("peak / compile's", "peak_vs_compile(gather)", ".3f"),
           ("of roofline", "of_roofline", ".1%")]


def markdown(rows, env, ceilings=None) -> str:
    note = ("Forward + backward. x vs B = B's time / this row's time (above 1: faster); peak = peak extra "
            "memory of one forward + backward.")
    return B.markdown_table(rows, COLUMNS, env, ceilings, notes=("", note))


def capture_calls(dtype: torch.dtype) -> None:
    """Every Triton launch of the GPU cases in ``dtype``: the sparse distance and the dense
    maps, forward and backward (``ops/resources.py`` records them)."""
    for case in GPU_CASES:
        def fn(f, t, i, case=case):
            if case.dense:
                return self_similarity(f, "all", patch_size=case.K, window=case.window).square().mean()
            return spatial_correlative_distance(f, t, i, patch_size=case.K, mode="cos", window=case.window)

        def args(grad, case=case):
            f, t, i = _inputs(case, "cpu", dtype)
            return f.requires_grad_(grad), t.requires_grad_(grad), i

        B.capture_steps(fn, args)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of this script and of ``fastinpaint bench self_similarity``."""
    B.add_common_args(p, min_time=0.5, threads=False)
    p.add_argument("--cases", nargs="*", default=None, help="substrings of case names")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-peak", action="store_true")
    return p


def run_args(a: argparse.Namespace) -> int:
    """Run the cases ``a`` (from :func:`add_arguments`) select; print and write the table."""
    dtype = B.apply_common_args(a)
    cases = GPU_CASES if a.device == "cuda" else CPU_CASES
    cases = B.select_cases(cases, a.cases)
    env = B.environment(a.device)
    ceilings = B.measure_ceilings(a.device) if a.device == "cuda" else {}

    def save(_name, rows):
        B.write_results(a.json, a.markdown, rows, env, ceilings, markdown,
                        path_plot=a.plot, title='self-similarity')
        print(markdown(rows, env, ceilings), flush=True)

    bench(cases, a.device, dtype, a.min_time, not a.no_compile, not a.no_peak, progress=save, ceilings=ceilings)
    return 0


def main(argv=None) -> int:
    return run_args(add_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0])).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(B.script_main(main, "python -m fastinpaint.ops.self_similarity.bench"))
