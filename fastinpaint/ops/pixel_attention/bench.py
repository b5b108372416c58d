"""Benchmarks of pixel attention and the attention-transfer loss against their baselines,
timed in the same run, written as JSON + markdown.

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
import os
import resource
import subprocess
import sys

import torch

from ... import _backend
from ...benchmark import environment, measure_ceilings, time_fn, write_results
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
    if compile_baseline:
        impls["compile(eager)"] = torch.compile(eager, dynamic=False)
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
    return impls


def loss_implementations(device: str, compile_baseline: bool = True) -> dict:
    def eager(qs, ks, qt, kt, w, rows):
        return reference.attention_transfer_loss(qs, ks, qt, kt, w, rows, "l2", 1.0)

    impls = {"eager": eager}
    if compile_baseline:
        impls["compile(eager)"] = torch.compile(eager, dynamic=False)
    for backend in ("triton", "cpu"):
        if backend == "triton" and device == "cpu":
            continue
        if _backend.unavailable_reason(backend, device) is None:
            impls[f"fastinpaint[{backend}]"] = _with_backend(
                lambda qs, ks, qt, kt, w, rows: attention_transfer_loss(qs, ks, qt, kt, w, rows, "l2", 1.0), backend)
    return impls


def flops(kind: str, batch: int, n: int, grad: bool) -> float:
    if kind == "attention":
        fwd = 2.0 * batch * n * n * (DQK + DV)
        return 3 * fwd if grad else fwd
    fwd = 2.0 * batch * n * n * (DQK + DQK)
    return fwd + 4.0 * batch * n * n * DQK if grad else fwd


# ----------------------------------------------------------------------------- CPU peak memory

def peak_rss_bytes() -> int:
    """This process's peak resident set: /proc's VmHWM (per address space, so not inherited
    from the parent the way getrusage's ru_maxrss is across fork + exec)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> None:
    """Lower the peak to the current RSS (Linux >= 4.0); a no-op where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _peak_rss_child(kind, impl, batch, n, dtype_name, grad) -> int:
    """Run in a fresh process: the peak-RSS increase (bytes) of one call (after a small warm-up)."""
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
    reset_peak_rss()
    before = peak_rss_bytes()
    call(args)
    return peak_rss_bytes() - before


def cpu_peak_rss(kind, impl, batch, n, dtype, grad) -> int | None:
    cmd = [sys.executable, "-m", "fastinpaint.ops.pixel_attention.bench", "--_peak", kind, impl, str(batch), str(n),
           str(dtype).split(".")[-1], "1" if grad else "0"]
    env = dict(os.environ, TRITON_INTERPRET="0")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        return int(out.stdout.strip().splitlines()[-1])
    except Exception:  # noqa: BLE001 - memory is reported as missing rather than failing the run
        return None


# ----------------------------------------------------------------------------- the run

def bench(kinds=("attention", "loss"), sizes=(4096, 16384), device="cuda", dtype=torch.bfloat16, batch=8,
          modes=("fwd+bwd", "fwd"), compile_baseline=True, min_time_s=0.3, cpu_memory=True, progress=None):
    rows = []
    for kind in kinds:
        impls = attention_implementations(device, compile_baseline) if kind == "attention" \
            else loss_implementations(device, compile_baseline)
        make = make_attention_inputs if kind == "attention" else make_loss_inputs
        for n in sizes:
            for mode in modes:
                grad = mode == "fwd+bwd"
                args = make(batch, n, device, dtype, grad)
                results = {}
                for label, fn in impls.items():
                    def run():
                        if grad:
                            out = fn(*args)
                            out.float().sum().backward()
                        else:
                            with torch.no_grad():
                                fn(*args)
                    if device == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.empty_cache()
                        base = torch.cuda.memory_allocated()
                        torch.cuda.reset_peak_memory_stats()
                    try:
                        ms = time_fn(run, device, min_time_s=min_time_s, max_reps=50, warmup=2)
                    except Exception as exc:  # noqa: BLE001 - a rejecting or failing implementation is a result
                        results[label] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]}
                        if device == "cuda":
                            torch.cuda.empty_cache()
                        continue
                    finally:
                        for t in args:
                            if isinstance(t, torch.Tensor):
                                t.grad = None
                    row = {"ms": ms, "TFLOPs": flops(kind, batch, n, grad) / (ms * 1e-3) / 1e12}
                    if device == "cuda":
                        row["peak_MB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
                    elif cpu_memory and not label.startswith("compile"):
                        peak = cpu_peak_rss(kind, label, batch, n, dtype, grad)
                        if peak is not None:
                            row["peak_MB"] = peak / 2**20
                    results[label] = row
                base_ms = {k: results[k]["ms"] for k in ("eager", "compile(eager)") if "ms" in results.get(k, {})}
                eager_peak = results.get("eager", {}).get("peak_MB")
                for label, row in results.items():
                    entry = {"case": f"{kind} N={n} B={batch}", "mode": mode, "impl": label, "batch": batch,
                             "dtype": str(dtype).split(".")[-1], **row}
                    if "ms" in row:
                        for k, v in base_ms.items():
                            entry[f"x_vs_{k}"] = v / row["ms"]
                    if eager_peak and row.get("peak_MB") is not None:
                        entry["peak_vs_eager"] = row["peak_MB"] / eager_peak
                    rows.append(entry)
                if progress:
                    progress(f"{kind} N={n} {mode}", rows)
    return rows


def markdown(rows, env, ceilings) -> str:
    lines = ["Environment: " + ", ".join(f"{k}={v}" for k, v in env.items() if v is not None)]
    if ceilings:
        lines.append("Measured ceilings: " + ", ".join(f"{k}={v:.1f}" for k, v in ceilings.items()))
    lines += ["", "| case | mode | impl | dtype | ms | x vs eager | x vs compile(eager) | peak MB | peak / eager's "
                  "| TFLOP/s |", "|---|---|---|---|---|---|---|---|---|---|"]

    def f(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) else "-"

    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['mode']} | {r['impl']} | {r['dtype']} | not run: {r['error'][:90]} "
                         "| | | | | |")
            continue
        lines.append(f"| {r['case']} | {r['mode']} | {r['impl']} | {r['dtype']} | {f(r['ms'], '.2f')} | "
                     f"{f(r.get('x_vs_eager'), '.2f')} | {f(r.get('x_vs_compile(eager)'), '.2f')} | "
                     f"{f(r.get('peak_MB'), '.1f')} | {f(r.get('peak_vs_eager'), '.3f')} | {f(r.get('TFLOPs'), '.3f')} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_peak":
        kind, impl, batch, n, dtype_name, grad = argv[1:7]
        print(_peak_rss_child(kind, impl, int(batch), int(n), dtype_name, grad == "1"))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--sizes", type=int, nargs="+", default=None)
    p.add_argument("--kinds", nargs="+", default=["attention", "loss"], choices=["attention", "loss"])
    p.add_argument("--modes", nargs="+", default=["fwd+bwd", "fwd"], choices=["fwd+bwd", "fwd"])
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--min-time", type=float, default=0.3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json")
    p.add_argument("--markdown")
    a = p.parse_args(argv)
    gpu = a.device == "cuda"
    if a.threads:
        torch.set_num_threads(a.threads)
        os.environ["OMP_NUM_THREADS"] = str(a.threads)  # the peak-memory child processes too
    dtype = getattr(torch, a.dtype or ("bfloat16" if gpu else "float32"))
    batch = a.batch or (8 if gpu else 1)
    sizes = a.sizes or ([4096, 16384] if gpu else [4096])
    env = environment(a.device)
    ceilings = measure_ceilings(a.device) if gpu else {}

    def save(msg, rows):
        print(msg, flush=True)
        if a.json:
            write_results(a.json, None, rows, env, ceilings)
        if a.markdown:
            with open(a.markdown, "w") as fh:
                fh.write(markdown(rows, env, ceilings))

    rows = bench(a.kinds, sizes, a.device, dtype, batch, a.modes, not a.no_compile, a.min_time, progress=save)
    print(markdown(rows, env, ceilings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
