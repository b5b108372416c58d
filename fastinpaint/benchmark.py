"""Kernel benchmarks against the eager reference, timed in the same run.

Used by ``fastinpaint bench``, by the pytest-benchmark suite in benchmarks/ and by
the one-call GPU suite. Baselines per case: the eager reference and
``torch.compile`` of the eager reference. Figures per case: median time, the
ratio of each baseline's time to fastinpaint's (above 1 = fastinpaint faster),
bytes saved for backward, peak memory (GPU), and achieved TFLOP/s against the
device's measured ceiling (GPU).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import platform
import statistics
import time
from typing import Callable

import torch

from . import _backend
from .ops.gated_conv import reference as gated_ref
from .ops.gated_conv.op import conv_output_size


# ----------------------------------------------------------------------------- measurement helpers

def saved_bytes(fn: Callable[[], torch.Tensor], exclude=()) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs.

    Storages of ``exclude`` (the layer's inputs and parameters, which live anyway)
    are not counted, so the figure is the memory the layer adds to the graph.
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude if t is not None}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in excluded:
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str, min_time_s: float = 0.5, max_reps: int = 200,
            warmup: int = 3) -> float:
    """Median milliseconds of ``fn()``: CUDA events on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < max_reps and (len(times) < 5 or time.perf_counter() - start_all < min_time_s):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure_ceilings(device: str, dtype=torch.bfloat16) -> dict:
    """The device's measured copy bandwidth (read + write) and dense matmul rate."""
    if device != "cuda":
        return {}
    n = 1 << 28  # 512 MiB of bf16
    a = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    b = torch.empty_like(a)
    ms = time_fn(lambda: b.copy_(a), device, min_time_s=0.3)
    bw = 2 * a.numel() * a.element_size() / (ms * 1e-3)
    del a, b
    m = 8192
    x = torch.randn(m, m, dtype=dtype, device=device)
    y = torch.randn(m, m, dtype=dtype, device=device)
    ms = time_fn(lambda: x @ y, device, min_time_s=0.5)
    flops = 2 * m ** 3 / (ms * 1e-3)
    return {"copy_GBps": bw / 1e9, f"matmul_{str(dtype).split('.')[-1]}_TFLOPs": flops / 1e12}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - absent or broken: reported as such
        env["triton"] = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, sm_count=props.multi_processor_count, cuda=torch.version.cuda,
                   capability=f"{props.major}.{props.minor}")
        env["l2_MB"] = getattr(props, "L2_cache_size", 0) / 2**20
        try:
            import subprocess

            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception:  # noqa: BLE001
            env["driver"] = None
    return env


# ----------------------------------------------------------------------------- gated convolution cases

@dataclasses.dataclass(frozen=True)
class GatedCase:
    """One gated layer of DeepFill v2's generator (cnum 48) at 256x256 input."""
    name: str
    cin: int
    cout: int
    size: int  # input height = width
    k: int = 3
    stride: int = 1
    dilation: int = 1
    up: int = 1  # 2 for the gated "deconv" (nearest x2, then the gated conv)

    @property
    def padding(self) -> int:
        return self.dilation * (self.k - 1) // 2

    def out_size(self) -> int:
        return conv_output_size(self.size * self.up, self.k, self.stride, self.padding, self.dilation)

    def flops(self, batch: int) -> float:
        """Multiply-adds x2 of the forward convolution as eager computes it (on the upsampled
    input for the deconv), so TFLOP/s is an effective rate; the gating is negligible."""
        return 2.0 * batch * self.out_size() ** 2 * 2 * self.cout * self.cin * self.k ** 2


DEEPFILL_CASES = [
    GatedCase("conv1 5->24 5x5 @256", 5, 24, 256, k=5),
    GatedCase("down 24->48 3x3 s2 @256", 24, 48, 256, stride=2),
    GatedCase("conv 96->96 3x3 @64", 96, 96, 64),
    GatedCase("dilated 96->96 r2 @64", 96, 96, 64, dilation=2),
    GatedCase("dilated 96->96 r4 @64", 96, 96, 64, dilation=4),
    GatedCase("dilated 96->96 r8 @64", 96, 96, 64, dilation=8),
    GatedCase("dilated 96->96 r16 @64", 96, 96, 64, dilation=16),
    GatedCase("deconv 96->48 @64->128", 96, 48, 64, up=2),
    GatedCase("deconv 48->24 @128->256", 48, 24, 128, up=2),
]


def quick_cases(cases=DEEPFILL_CASES, size_scale: int = 8) -> list[GatedCase]:
    """The same layers on maps ``size_scale`` times smaller: for smoke tests."""
    return [dataclasses.replace(c, size=max(c.size // size_scale, 2 * c.dilation + 1)) for c in cases]


def _make_inputs(case: GatedCase, batch: int, device: str, dtype, channels_last: bool, requires_grad: bool,
                 sets: int = 1):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    w = (torch.randn(2 * case.cout, case.cin, case.k, case.k, device=device, dtype=dtype)
         / math.sqrt(case.cin * case.k ** 2)).contiguous(memory_format=fmt).requires_grad_(requires_grad)
    b = torch.randn(2 * case.cout, device=device, dtype=dtype).requires_grad_(requires_grad)
    xs = [torch.randn(batch, case.cin, case.size, case.size, device=device, dtype=dtype)
          .contiguous(memory_format=fmt).requires_grad_(requires_grad) for _ in range(sets)]
    return xs, w, b


def _reference_fn(case: GatedCase):
    def fn(x, w, b):
        if case.up != 1:
            return gated_ref.gated_deconv2d(x, w, b, case.stride, case.padding, case.dilation, "elu", 0.2, case.up)
        return gated_ref.gated_conv2d(x, w, b, case.stride, case.padding, case.dilation, "elu", 0.2)

    return fn


def _fastinpaint_fn(case: GatedCase, backend: str):
    from . import functional as FI

    def fn(x, w, b):
        with _backend.use_backend(backend):
            if case.up != 1:
                return FI.gated_deconv2d(x, w, b, case.stride, case.padding, case.dilation, "elu",
                                         scale_factor=case.up)
            return FI.gated_conv2d(x, w, b, case.stride, case.padding, case.dilation, "elu")

    return fn


def gated_conv_implementations(case: GatedCase, device: str, compile_baseline: bool = True) -> dict:
    """{label: fn(x, w, b)}: the baselines, then every fastinpaint backend available here."""
    impls = {"eager": _reference_fn(case)}
    if compile_baseline:
        impls["compile(eager)"] = torch.compile(_reference_fn(case), dynamic=False)
    for backend in ("cpu", "cuda", "triton"):
        if _backend.unavailable_reason(backend, device) is None:
            if backend == "triton" and device == "cpu":
                continue  # the interpreter is for correctness, not speed
            impls[f"fastinpaint[{backend}]"] = _fastinpaint_fn(case, backend)
    return impls


def bench_gated_conv(cases=None, device: str = "cpu", dtype=torch.float32, batch: int = 1, channels_last: bool = True,
                     modes=("fwd+bwd", "fwd"), compile_baseline: bool = True, min_time_s: float = 0.5,
                     progress: Callable[[str, list], None] | None = None) -> list[dict]:
    """Time every implementation of every case; one result row per (case, mode, implementation).

    ``progress(message, rows_so_far)`` is called after each (case, mode), so a caller can
    save partial results of a run that may be cut short."""
    cases = DEEPFILL_CASES if cases is None else cases
    rows = []
    l2 = torch.cuda.get_device_properties(0).L2_cache_size if device == "cuda" else 0
    for case in cases:
        impls = gated_conv_implementations(case, device, compile_baseline)
        for mode in modes:
            grad = mode == "fwd+bwd"
            in_bytes = batch * case.cin * case.size ** 2 * torch.finfo(dtype).bits // 8
            sets = min(16, max(1, math.ceil(4 * l2 / max(in_bytes, 1)))) if device == "cuda" else 1
            xs, w, b = _make_inputs(case, batch, device, dtype, channels_last, grad, sets)
            results = {}
            for label, fn in impls.items():
                counter = [0]

                def run():
                    x = xs[counter[0] % len(xs)]
                    counter[0] += 1
                    if grad:
                        y = fn(x, w, b)
                        y.backward(gy)
                    else:
                        with torch.no_grad():
                            fn(x, w, b)

                gy = None
                if grad:
                    with torch.no_grad():
                        gy = torch.randn_like(_reference_fn(case)(xs[0], w, b))
                if device == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                try:
                    ms = time_fn(run, device, min_time_s=min_time_s)
                except Exception as exc:  # noqa: BLE001 - a failing implementation is a result, not a crash
                    results[label] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                    continue
                row = {"ms": ms}
                if device == "cuda":
                    row["peak_MB"] = torch.cuda.max_memory_allocated() / 2**20
                if grad:
                    row["saved_MB"] = saved_bytes(lambda: fn(xs[0], w, b), exclude=(xs[0], w, b)) / 2**20
                flops = case.flops(batch) * (3 if grad else 1)
                row["TFLOPs"] = flops / (ms * 1e-3) / 1e12
                results[label] = row
                for t in [*xs, w, b]:
                    t.grad = None
            base = {k: results[k]["ms"] for k in ("eager", "compile(eager)") if "ms" in results.get(k, {})}
            eager_saved = results.get("eager", {}).get("saved_MB")
            for label, row in results.items():
                entry = {"case": case.name, "mode": mode, "impl": label, "batch": batch,
                         "dtype": str(dtype).split(".")[-1], "channels_last": channels_last, **row}
                if "ms" in row:
                    for k, v in base.items():
                        entry[f"x_vs_{k}"] = v / row["ms"]
                if eager_saved and "saved_MB" in row:
                    entry["saved_vs_eager"] = row["saved_MB"] / eager_saved
                rows.append(entry)
            if progress:
                progress(case.name + " " + mode, rows)
    return rows


def markdown_table(rows: list[dict], env: dict | None = None, ceilings: dict | None = None) -> str:
    lines = []
    if env:
        lines.append("Environment: " + ", ".join(f"{k}={v}" for k, v in env.items() if v is not None))
    if ceilings:
        lines.append("Measured ceilings: " + ", ".join(f"{k}={v:.1f}" for k, v in ceilings.items()))
    if lines:
        lines.append("")
    columns = ["case", "mode", "impl", "dtype", "batch", "ms", "x vs eager", "x vs compile(eager)", "saved MB",
               "saved / eager's", "peak MB", "TFLOP/s", "of matmul peak"]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]

    def f(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) else "-"

    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['mode']} | {r['impl']} | {r['dtype']} | {r['batch']} | "
                         f"error: {r['error'][:80]} | | | | | | | |")
            continue
        lines.append(
            f"| {r['case']} | {r['mode']} | {r['impl']} | {r['dtype']} | {r['batch']} | {f(r['ms'], '.3f')} | "
            f"{f(r.get('x_vs_eager'), '.2f')} | {f(r.get('x_vs_compile(eager)'), '.2f')} | "
            f"{f(r.get('saved_MB'), '.2f')} | {f(r.get('saved_vs_eager'), '.2f')} | {f(r.get('peak_MB'), '.1f')} | "
            f"{f(r.get('TFLOPs'), '.2f')} | {f(r.get('frac_of_matmul_peak'), '.1%')} |")
    return "\n".join(lines) + "\n"


def write_results(path_json: str | None, path_md: str | None, rows, env, ceilings) -> None:
    if path_json:
        with open(path_json, "w") as fh:
            json.dump({"environment": env, "ceilings": ceilings, "results": rows}, fh, indent=1)
    if path_md:
        with open(path_md, "w") as fh:
            fh.write(markdown_table(rows, env, ceilings))


def summary_table(rows: list[dict], impl: str) -> str:
    """One line per case for ``impl``: its speed-ups over both baselines per mode, and the
    memory it saves for backward as a fraction of eager's (the README's table)."""
    cases: dict[str, dict] = {}
    for r in rows:
        if r["impl"] == impl and "ms" in r:
            cases.setdefault(r["case"], {})[r["mode"]] = r
    lines = ["| layer | fwd+bwd ms | x eager | x compile(eager) | fwd (no grad) ms | x eager | x compile(eager) "
             "| saved for backward / eager's |", "|---|---|---|---|---|---|---|---|"]

    def cell(r, key, fmt):
        return format(r[key], fmt) if r and key in r else "-"

    for name, modes in cases.items():
        t, f = modes.get("fwd+bwd"), modes.get("fwd")
        lines.append(f"| {name} | {cell(t, 'ms', '.2f')} | {cell(t, 'x_vs_eager', '.2f')} | "
                     f"{cell(t, 'x_vs_compile(eager)', '.2f')} | {cell(f, 'ms', '.2f')} | {cell(f, 'x_vs_eager', '.2f')} | "
                     f"{cell(f, 'x_vs_compile(eager)', '.2f')} | {cell(t, 'saved_vs_eager', '.2f')} |")
    return "\n".join(lines) + "\n"
