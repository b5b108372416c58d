"""Benchmarks of pixel attention and the attention-transfer loss against their baselines,
timed in the same run (on the CPU in turns, one call of each per round), written as JSON +
markdown.

    python -m fastinpaint.ops.pixel_attention.bench --device cuda --dtype bfloat16 --batch 8 \
        --sizes 4096 16384 --json out.json --markdown out.md
    python -m fastinpaint.ops.pixel_attention.bench --device cpu --dtype float32 --batch 1 --sizes 4096

Implementations:
  pixel attention: eager (reference.py, materialises B x N x N), compile(eager), every SDPA
    backend (``torch.nn.attention.sdpa_kernel``: flash, efficient, cudnn, math; one that rejects
    Dqk != Dv or the mask is reported with its error), sdpa[auto] (torch's own pick; what the
    ``cuda`` backend calls), fastinpaint[triton] and fastinpaint[cpu].
  transfer loss: eager, compile(eager), fastinpaint[triton], fastinpaint[cpu].

Figures per case: median ms; speed-up over eager and compile(eager); peak memory above the
inputs (GPU: ``torch.cuda.max_memory_allocated``; CPU: the peak-RSS increase of one call in a
fresh process, since torch's CPU allocator keeps no statistics); effective TFLOP/s from the
eager formulation's FLOPs (attention forward ``2 B N^2 (Dqk + Dv)``, forward+backward three
times that; the loss forward ``2 B N^2 (Ds + Dt)``, forward+backward plus ``4 B N^2 Ds``).
"""

from __future__ import annotations

import argparse
import sys

import torch

from ... import _backend
from ... import benchmark as B
from . import reference
from .op import attention_transfer_loss, pixel_attention

DQK, DV = 32, 256  # DGII at C = 256: Q, K at C/8


def make_attention_inputs(batch, n, device, dtype, requires_grad, masked=True, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(batch, n, DQK, device=device, dtype=dtype, generator=g)
    k = torch.randn(batch, n, DQK, device=device, dtype=dtype, generator=g)
    v = torch.randn(batch, n, DV, device=device, dtype=dtype, generator=g)
    mask = (torch.rand(batch, n, device=device, generator=g) < 0.25) if masked else None
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v, mask


def make_loss_inputs(batch, n, device, dtype, requires_grad, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    qs, ks, qt, kt = (torch.randn(batch, n, DQK, device=device, dtype=dtype, generator=g) for _ in range(4))
    w = torch.rand(batch, n, device=device, generator=g)
    rows = torch.rand(batch, n, device=device, generator=g) < 0.25
    for t in (qs, ks, w):
        t.requires_grad_(requires_grad)
    return qs, ks, qt, kt, w, rows


def _with_backend(fn, name):
    def run(*args):
        with _backend.use_backend(name):
            return fn(*args)
    return run


def _sdpa_fn(sdpa_backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v, mask):
        attn_mask = None if mask is None else (~mask)[:, None, None, :]
        ctx = sdpa_kernel(sdpa_backend) if sdpa_backend is not None else _nullctx()
        with ctx:
            out = torch.nn.functional.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None],
                                                                   attn_mask=attn_mask)
        return out[:, 0]
    return run


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def attention_implementations(device: str, compile_baseline: bool = True, include_sdpa: bool = True) -> dict:
    def eager(q, k, v, mask):
        return reference.pixel_attention(q, k, v, mask, q.shape[-1] ** -0.5)

    impls = {"eager": eager}
    if include_sdpa:
        from torch.nn.attention import SDPBackend

        impls["sdpa[auto]"] = _sdpa_fn(None)
        for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
            if hasattr(SDPBackend, name):
                impls[f"sdpa[{name.lower().replace('_attention', '')}]"] = _sdpa_fn(getattr(SDPBackend, name))
    for backend in ("triton", "cuda", "cpu"):
        if backend == "triton" and device == "cpu":
            continue  # the interpreter is a correctness tool, not a benchmark
        if backend == "cuda":
            continue  # the cuda backend *is* sdpa[auto] (with the empty-sample fix)
        if _backend.unavailable_reason(backend, device) is None:
            impls[f"fastinpaint[{backend}]"] = _with_backend(pixel_attention, backend)
    return B.with_compiled(impls, compile_baseline)


def loss_implementations(device: str, compile_baseline: bool = True) -> dict:
    def eager(qs, ks, qt, kt, w, rows):
        return reference.attention_transfer_loss(qs, ks, qt, kt, w, rows, "l2", 1.0)

    impls = {"eager": eager}
    for backend in ("triton", "cpu"):
        if backend == "triton" and device == "cpu":
            continue
        if _backend.unavailable_reason(backend, device) is None:
            impls[f"fastinpaint[{backend}]"] = _with_backend(
                lambda qs, ks, qt, kt, w, rows: attention_transfer_loss(qs, ks, qt, kt, w, rows, "l2", 1.0), backend)
    return B.with_compiled(impls, compile_baseline)


def flops(kind: str, batch: int, n: int, grad: bool) -> float:
    if kind == "attention":
        fwd = 2.0 * batch * n * n * (DQK + DV)
        return 3 * fwd if grad else fwd
    fwd = 2.0 * batch * n * n * (DQK + DQK)
    return fwd + 4.0 * batch * n * n * DQK if grad else fwd


# ----------------------------------------------------------------------------- CPU peak memory

def _peak_rss_child(kind, impl, batch, n, dtype_name, grad) -> float | None:
    """Run in a fresh process: the peak-RSS increase (MiB) of one call (after a small warm-up),
    by :func:`fastinpaint.benchmark.cpu_peak_mb`."""
    dtype = getattr(torch, dtype_name)
    impls = attention_implementations("cpu", compile_baseline=False) if kind == "attention" \
        else loss_implementations("cpu", compile_baseline=False)
    fn = impls[impl]
    make = make_attention_inputs if kind == "attention" else make_loss_inputs

    def call(args):
        out = fn(*args)
        if grad:
            out.float().sum().backward()

    call(make(batch, 64, "cpu", dtype, grad))
    args = make(batch, n, "cpu", dtype, grad)
    return B.cpu_peak_mb(lambda: call(args))


def cpu_peak_mb(kind, impl, batch, n, dtype, grad) -> float | None:
    """Peak-RSS increase (MiB) of one call of ``impl``, in a fresh process; None if it failed."""
    cmd = [sys.executable, "-m", "fastinpaint.ops.pixel_attention.bench", "--_peak", kind, impl, str(batch), str(n),
           B.dtype_name(dtype), "1" if grad else "0"]
    return B.run_peak_child(cmd, timeout=600)


# ----------------------------------------------------------------------------- the run

def _time_cuda(run, min_time_s) -> dict:
    """``{"ms", "peak_MB"}`` of ``run`` on CUDA (the peak above what was allocated before it),
    or ``{"error"}`` for an implementation that rejects the case or fails."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    try:
        ms = B.time_fn(run, "cuda", min_time_s=min_time_s, max_reps=50, warmup=2)
    except Exception as exc:  # noqa: BLE001 - a rejecting or failing implementation is a result
        torch.cuda.empty_cache()
        return {"error": B.error_text(exc, limit=200, first_line=True)}
    return {"ms": ms, "peak_MB": (torch.cuda.max_memory_allocated() - base) / 2**20}


def bench(kinds=("attention", "loss"), sizes=(4096, 16384), device="cuda", dtype=torch.bfloat16, batch=8,
          modes=("fwd+bwd", "fwd"), compile_baseline=True, min_time_s=0.3, cpu_memory=True, progress=None):
    rows = []
    for kind in kinds:
        impls = attention_implementations(device, compile_baseline) if kind == "attention" \
            else loss_implementations(device, compile_baseline)
        make = make_attention_inputs if kind == "attention" else make_loss_inputs
        for n in sizes:
            with B.fresh_compile():   # each shape compiles afresh; a fallback to eager is an error
                for mode in modes:
                    grad = mode == "fwd+bwd"
                    args = make(batch, n, device, dtype, grad)

                    def make_run(fn):
                        def run():
                            try:
                                if grad:
                                    fn(*args).float().sum().backward()
                                else:
                                    with torch.no_grad():
                                        fn(*args)
                            finally:
                                for t in args:
                                    if isinstance(t, torch.Tensor):
                                        t.grad = None
                        return run

                    runs = {label: make_run(fn) for label, fn in impls.items()}
                    if device == "cpu":   # in turns: a drifting machine slows every implementation alike
                        timed = B.time_interleaved(runs, device, min_time_s, max_rounds=50, warmup=2)
                    else:
                        timed = {label: _time_cuda(run, min_time_s) for label, run in runs.items()}
                    results = {}
                    for label, row in timed.items():
                        if "error" in row:
                            results[label] = {"error": row["error"].splitlines()[0][:200]}
                            continue
                        row = {**row, "TFLOPs": flops(kind, batch, n, grad) / (row["ms"] * 1e-3) / 1e12}
                        if device == "cpu" and cpu_memory and not label.startswith("compile"):
                            peak = cpu_peak_mb(kind, label, batch, n, dtype, grad)
                            if peak is not None:
                                row["peak_MB"] = peak
                        results[label] = row
                    ratios = B.baseline_ratios(results)
                    eager_peak = results.get("eager", {}).get("peak_MB")
                    for label, row in results.items():
                        entry = {"case": f"{kind} N={n} B={batch}", "mode": mode, "impl": label, "batch": batch,
                                 "dtype": B.dtype_name(dtype), **row, **ratios[label]}
                        if eager_peak and row.get("peak_MB") is not None:
                            entry["peak_vs_eager"] = row["peak_MB"] / eager_peak
                        rows.append(entry)
                    if progress:
                        progress(f"{kind} N={n} {mode}", rows)
    return rows


COLUMNS = [("case", "case", None), ("mode", "mode", None), ("impl", "impl", None), ("dtype", "dtype", None),
           ("ms", "ms", ".2f"), ("x vs eager", "x_vs_eager", ".2f"),
           ("x vs compile(eager)", "x_vs_compile(eager)", ".2f"),
           ("peak MB", "peak_MB", ".1f"), ("peak / eager's", "peak_vs_eager", ".3f"), ("TFLOP/s", "TFLOPs", ".3f")]


def markdown(rows, env, ceilings) -> str:
    # an SDPA backend that rejects the shapes is not run, not an error
    return B.markdown_table(rows, COLUMNS, env, ceilings, error_prefix="not run: ", error_chars=90)


def capture_calls(dtype: torch.dtype, batch: int = 8) -> None:
    """Every Triton launch of the GPU suite's shapes (N = 4096 and 16384) in ``dtype``, with and
    without a key mask, forward and backward (``ops/resources.py`` records them)."""
    for n in (4096, 16384):
        for masked in (True, False):
            B.capture_steps(lambda q, k, v, m: pixel_attention(q, k, v, m),
                            lambda grad, n=n, masked=masked: make_attention_inputs(batch, n, "cpu", dtype, grad,
                                                                                   masked))
        B.capture_steps(lambda qs, ks, qt, kt, w, rows: attention_transfer_loss(qs, ks, qt, kt, w, rows),
                        lambda grad, n=n: make_loss_inputs(batch, n, "cpu", dtype, grad))


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of this script and of ``fastinpaint bench pixel_attention``."""
    B.add_common_args(p, min_time=0.3)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--sizes", type=int, nargs="+", default=None)
    p.add_argument("--kinds", nargs="+", default=["attention", "loss"], choices=["attention", "loss"])
    p.add_argument("--modes", nargs="+", default=["fwd+bwd", "fwd"], choices=["fwd+bwd", "fwd"])
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-peak", action="store_true",
                   help="skip the CPU peak-memory figure (one fresh process per implementation)")
    return p


def run_args(a: argparse.Namespace) -> int:
    """Run the cases ``a`` (from :func:`add_arguments`) select; print and write the table."""
    gpu = a.device == "cuda"
    dtype = B.apply_common_args(a)  # --threads reaches the peak-memory child processes too
    batch = a.batch or (8 if gpu else 1)
    sizes = a.sizes or ([4096, 16384] if gpu else [4096])
    env = B.environment(a.device)
    ceilings = B.measure_ceilings(a.device) if gpu else {}

    def save(msg, rows):
        print(msg, flush=True)
        B.write_results(a.json, a.markdown, rows, env, ceilings, markdown,
                        path_plot=a.plot, title='pixel attention')

    rows = bench(a.kinds, sizes, a.device, dtype, batch, a.modes, not a.no_compile, a.min_time,
                 cpu_memory=not a.no_peak, progress=save)
    print(markdown(rows, env, ceilings))
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_peak":
        kind, impl, batch, n, dtype_name, grad = argv[1:7]
        print(B.peak_line(_peak_rss_child(kind, impl, int(batch), int(n), dtype_name, grad == "1")))
        return 0
    return run_args(add_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0])).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(B.script_main(main, "python -m fastinpaint.ops.pixel_attention.bench"))
