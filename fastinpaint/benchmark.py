"""The benchmarks' shared harness: timing, bytes saved for backward, peak memory, the
device's measured ceilings, the environment, command-line options, result files and tables.

Each op's cases live in ``fastinpaint/ops/<op>/bench.py``, the whole-model ones in
``fastinpaint/models/*_bench.py``; each such module has ``add_arguments(parser)`` and
``run_args(args)``, which ``fastinpaint bench <op>`` and ``python -m <module>`` both run;
the pytest-benchmark suite in benchmarks/ times the same cases. Implementations per case:
the eager reference, ``torch.compile`` of it, each fastinpaint backend and ``torch.compile``
of each (:func:`with_compiled`), every case compiled afresh (:func:`fresh_compile`).
Figures per case: median time, the ratio of each baseline's time (eager, compile(eager)) to
the implementation's (above 1 = faster),
bytes saved for backward, peak memory, and achieved rates against the device's measured
ceilings (GPU). This module imports no op.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch


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


def sync(device: str) -> None:
    """Wait for the device's queued work (CUDA); a no-op on the CPU."""
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str, min_time_s: float = 0.5, max_reps: int = 200,
            warmup: int = 3) -> float:
    """Median milliseconds of ``fn()``: CUDA events on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
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


def time_interleaved(runs: dict[str, Callable[[], object]], device: str, min_time_s: float = 0.5,
                     max_rounds: int = 200, warmup: int = 2) -> dict[str, dict]:
    """Median milliseconds of each of ``runs``, timed in turns (one call of each per round):
    a machine whose speed drifts (another process, frequency, thermals) slows all of them
    alike, so their ratios hold where one-after-the-other timing (:func:`time_fn`) can
    drift by more than the differences measured. At least 5 rounds, then rounds until
    every run had ``min_time_s`` of timing or ``max_rounds``. ``{label: {"ms", "rounds"}}``,
    or ``{label: {"error"}}`` for a run that fails (in its warm-up or later; the others go on)."""
    out: dict[str, dict] = {}
    live = {}
    for label, run in runs.items():
        try:
            for _ in range(warmup):
                run()
            sync(device)
            live[label] = run
        except Exception as exc:  # noqa: BLE001 - a failing implementation is a result
            out[label] = {"error": error_text(exc)}
    times = {label: [] for label in live}
    spent = dict.fromkeys(live, 0.0)
    rounds = 0
    while live and rounds < max_rounds and (rounds < 5 or min(spent[k] for k in live) < min_time_s):
        for label in list(live):
            try:
                sync(device)
                t0 = time.perf_counter()
                live[label]()
                sync(device)
            except Exception as exc:  # noqa: BLE001
                out[label] = {"error": error_text(exc)}
                del live[label]
                continue
            dt = time.perf_counter() - t0
            spent[label] += dt
            times[label].append(dt * 1e3)
        rounds += 1
    for label in live:
        out[label] = {"ms": statistics.median(times[label]), "rounds": len(times[label])}
    return {label: out[label] for label in runs}


def time_implementations(runs: dict[str, Callable[[], object]], device: str, min_time_s: float = 0.5,
                         **interleaved) -> dict[str, dict]:
    """Each of ``runs`` timed as the op benchmarks time them: on the CPU in turns
    (:func:`time_interleaved`, ``interleaved`` its options: a drifting machine slows every
    implementation alike), on CUDA one after the other (:func:`measure`: events per call, the
    peak memory). ``{label: {"ms", ...}}``, or ``{label: {"error"}}`` for one that fails."""
    if device == "cpu":
        return time_interleaved(runs, device, min_time_s, **interleaved)
    return {label: measure(run, device, min_time_s) for label, run in runs.items()}


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
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception:  # noqa: BLE001
            env["driver"] = None
    return env


# ----------------------------------------------------------------------------- peak memory

def cuda_peak_mb(fn: Callable[[], object]) -> float:
    """Peak CUDA memory (MiB) of one ``fn()`` above what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _proc_status_bytes(field: str) -> int | None:
    """A field of /proc/self/status (``VmRSS``, ``VmHWM``) in bytes; None where unreadable."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's peak resident set: /proc's VmHWM (per address space, so not inherited
    from the parent the way getrusage's ru_maxrss is across fork + exec; ru_maxrss only
    where /proc is missing)."""
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Lower the peak (VmHWM) to the current RSS (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def cpu_peak_mb(fn: Callable[[], object]) -> float | None:
    """Peak resident-set growth (MiB) of one ``fn()`` in this process: VmHWM after the call,
    reset to the current RSS just before it through /proc/self/clear_refs, minus the RSS
    before it. None where /proc does not support this (never ru_maxrss, which cannot be
    reset and is inherited by child processes). torch's CPU allocator keeps no statistics,
    so callers run this in a fresh process, after a warm-up call."""
    if not reset_peak_rss():
        return None
    before = _proc_status_bytes("VmRSS")
    fn()
    peak = _proc_status_bytes("VmHWM")
    if before is None or peak is None:
        return None
    return max(0, peak - before) / 2**20


def peak_line(peak_mb: float | None) -> str:
    """The line a peak-memory child process prints for :func:`run_peak_child` to read."""
    return f"PEAK_MB {'none' if peak_mb is None else repr(peak_mb)}"


def run_peak_child(cmd: list[str], timeout: float = 600, threads: int | None = None) -> float | None:
    """Run ``cmd`` (a Python process that prints :func:`peak_line`) and return its figure;
    None when it fails, times out or reports none. ``OMP_NUM_THREADS`` is set to ``threads``
    (default: this process's torch thread count) and the Triton interpreter is off."""
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS=str(threads or torch.get_num_threads()))
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except (subprocess.TimeoutExpired, OSError):
        return None
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("PEAK_MB "):
            value = line.split()[1]
            return None if value == "none" else float(value)
    return None


# ----------------------------------------------------------------------------- torch.compile baselines

#: the baselines every implementation is compared with, in the same run
BASELINES = ("eager", "compile(eager)")
#: the fastinpaint implementations a benchmark may time: each backend, and torch.compile of it
FASTINPAINT_IMPLS = tuple(label for backend in ("cpu", "cuda", "triton")
                          for label in (f"fastinpaint[{backend}]", f"compile(fastinpaint[{backend}])"))


@contextlib.contextmanager
def fresh_compile():
    """Around one benchmark case: dynamo's caches are reset first, so the case compiles afresh
    (a run of many shapes never reaches the recompile limit), and a compile that would hit the
    limit anyway raises instead of running the frame eagerly, so a baseline never turns into
    eager without the table saying so (the row reports the error). The on-disk compile caches
    are not read either: a compiled graph cached before a change of fastinpaint's Python
    gradient formulas was reused after it (torch 2.14), timing the old code."""
    import warnings

    import torch._dynamo
    import torch._inductor.config

    torch._dynamo.reset()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True), \
            torch._inductor.config.patch(force_disable_caches=True), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*force_disable_caches")   # torch's note that it is set
        yield


def with_compiled(impls: dict[str, Callable], compile_baseline: bool = True) -> dict[str, Callable]:
    """``impls`` (``"eager"`` first, then ``"fastinpaint[<backend>]"`` entries) with
    ``torch.compile`` (``dynamic=False``) of each beside it: ``"compile(eager)"`` right after
    ``"eager"`` and ``"compile(fastinpaint[<backend>])"`` after each fastinpaint entry, so every
    table shows what a user who compiles their model gets with and without fastinpaint.
    ``compile_baseline=False`` adds none."""
    if not compile_baseline:
        return dict(impls)
    out = {}
    for label, fn in impls.items():
        out[label] = fn
        if label == "eager" or label.startswith("fastinpaint["):
            out[f"compile({label})"] = torch.compile(fn, dynamic=False)
    return out


def baseline_ratios(results: dict[str, dict], baselines=BASELINES) -> dict[str, dict]:
    """``{label: {"x_vs_<baseline>": baseline_ms / ms}}`` for each timed implementation of one
    case (above 1 = faster than the baseline); a baseline that failed gives no ratio."""
    bases = {k: results[k]["ms"] for k in baselines if "ms" in results.get(k, {})}
    return {label: speedups(row, bases) for label, row in results.items()}


def add_ratios(results: dict[str, dict]) -> None:
    """Add to each row of one case (``{label: row}``) its :func:`baseline_ratios` and, where
    both it and eager have ``saved_MB``, ``saved_vs_eager``."""
    eager_saved = results.get("eager", {}).get("saved_MB")
    for label, ratios in baseline_ratios(results).items():
        row = results[label]
        row.update(ratios)
        if eager_saved and "saved_MB" in row:
            row["saved_vs_eager"] = row["saved_MB"] / eager_saved


# ----------------------------------------------------------------------------- command line and results

def add_common_args(parser: argparse.ArgumentParser, min_time: float = 0.5, threads: bool = True,
                    dtype_choices=None) -> argparse.ArgumentParser:
    """The options every benchmark script shares: --device (default cuda when available),
    --dtype (default: see :func:`resolve_dtype`), --min-time, --threads, --json, --markdown."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default=None, choices=dtype_choices,
                        help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--min-time", type=float, default=min_time, help="seconds of timing per implementation")
    if threads:
        parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", help="write the results (with the environment) as JSON here")
    parser.add_argument("--markdown", help="write the results table as markdown here")
    parser.add_argument("--plot", help="write a PNG bar chart of the speed-ups over eager and compile(eager) here "
                                       "(needs matplotlib)")
    return parser


#: a layer benchmark's table (partial_conv, spectral_norm_conv): (header, row key, format)
LAYER_COLUMNS = [("case", "case", None), ("mode", "mode", None), ("impl", "impl", None), ("dtype", "dtype", None),
                 ("batch", "batch", None), ("ms", "ms", ".3f"), ("x vs eager", "x_vs_eager", ".2f"),
                 ("x vs compile(eager)", "x_vs_compile(eager)", ".2f"), ("saved MB", "saved_MB", ".2f"),
                 ("saved / eager's", "saved_vs_eager", ".2f")]


def add_layer_args(parser: argparse.ArgumentParser, batch_help: str = "batch size") -> argparse.ArgumentParser:
    """A layer benchmark's options (partial_conv, spectral_norm_conv): the common ones and --batch,
    --channels-last, --modes, --cases (name prefixes), --no-compile."""
    add_common_args(parser, min_time=0.5)
    parser.add_argument("--batch", type=int, default=None, help=batch_help)
    parser.add_argument("--channels-last", action="store_true", default=None)
    parser.add_argument("--modes", nargs="*", default=["fwd+bwd", "fwd"], choices=["fwd+bwd", "fwd"])
    parser.add_argument("--cases", nargs="*", default=None, help="case name prefixes")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip torch.compile of every implementation (compile(eager), compile(fastinpaint[...]))")
    return parser


def run_layer_args(args: argparse.Namespace, cases: list, run: Callable, markdown: Callable, title: str,
                   batch: int) -> int:
    """Run a layer benchmark (options of :func:`add_layer_args`): the cases ``--cases`` selects,
    ``run(cases, device, dtype, batch, channels_last, modes, min_time_s, progress, compile_baseline=)``,
    ``batch`` where --batch is not given, channels_last by default on CUDA; print the table and
    write the files after every case. Exit status 1 when a row failed."""
    from .errors import InvalidInputError

    dtype = apply_common_args(args)
    if args.batch is not None and args.batch < 1:
        raise InvalidInputError(f"must be at least 1, got {args.batch}", argument="batch")
    channels_last = args.device == "cuda" if args.channels_last is None else args.channels_last
    selected = select_cases(cases, args.cases, prefix=True)
    env = environment(args.device)
    env["channels_last"] = channels_last

    def progress(rows):
        write_results(args.json, args.markdown, rows, env, {}, markdown, path_plot=args.plot, title=title)

    rows = run(selected, args.device, dtype, args.batch or batch, channels_last, tuple(args.modes), args.min_time,
               progress, compile_baseline=not args.no_compile)
    print(markdown(rows, env))
    return 1 if any("error" in r for r in rows) else 0


def script_main(main: Callable[[], int], name: str) -> int:
    """A benchmark script's entry point (``python -m fastinpaint.ops.<op>.bench``): a user error
    (an unknown --cases pattern, a bad --min-time, ...) is one line on stderr and exit status 2,
    as in ``fastinpaint bench`` (``FASTINPAINT_DEBUG=1``: the traceback)."""
    from .errors import UserError

    try:
        return main()
    except UserError as exc:
        if os.environ.get("FASTINPAINT_DEBUG") == "1":
            raise
        print(f"{name}: {exc}", file=sys.stderr)
        return 2


def set_threads(threads: int | None) -> None:
    """torch's CPU threads and, for child processes, OMP_NUM_THREADS; None: unchanged."""
    if threads:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


def apply_common_args(args: argparse.Namespace) -> torch.dtype:
    """Check --device, --min-time and --threads, apply --threads (:func:`set_threads`) and
    return the dtype."""
    from .errors import InvalidInputError

    if args.device == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("cuda asked for, but torch sees no CUDA device", argument="device",
                                fix="use --device cpu, or leave --device out")
    if not args.min_time > 0:  # NaN too
        raise InvalidInputError(f"must be a positive number of seconds, got {args.min_time}", argument="min_time")
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise InvalidInputError(f"must be at least 1, got {threads}", argument="threads")
    set_threads(threads)
    return resolve_dtype(args.dtype, args.device)


def select_cases(cases, patterns, prefix: bool = False) -> list:
    """The ``cases`` (objects with a ``name``) whose name contains one of ``patterns`` (starts
    with one, ``prefix``); all of them when ``patterns`` is empty. Patterns that select
    nothing are an error naming ``--cases`` and listing the names (never an empty run)."""
    if not patterns:
        return list(cases)
    hit = (lambda name, p: name.startswith(p)) if prefix else (lambda name, p: p in name)
    chosen = [c for c in cases if any(hit(c.name, p) for p in patterns)]
    if not chosen:
        from .errors import InvalidInputError

        how = "starts with" if prefix else "contains"
        raise InvalidInputError(f"no case name {how} {' or '.join(map(repr, patterns))}", argument="cases",
                                fix=f"the cases: {'; '.join(c.name for c in cases)}")
    return chosen


def resolve_dtype(name: str | None, device: str) -> torch.dtype:
    """``torch.<name>``; by default bfloat16 on cuda and float32 elsewhere."""
    return getattr(torch, name or ("bfloat16" if device == "cuda" else "float32"))


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).split(".")[-1]


def error_text(exc: BaseException, limit: int | None = 300, first_line: bool = False) -> str:
    """A result row's ``error``: the exception's type and message (its first line only if
    ``first_line``), cut to ``limit`` characters (None: whole)."""
    msg = str(exc)
    if first_line:
        msg = msg.splitlines()[0] if msg else ""
    return f"{type(exc).__name__}: {msg}"[:limit]


def speedups(row: dict, bases: dict[str, float]) -> dict:
    """``{"x_vs_<name>": base_ms / row["ms"]}`` for each baseline time (above 1 = row faster)."""
    if "ms" not in row:
        return {}
    return {f"x_vs_{k}": v / row["ms"] for k, v in bases.items()}


def fmt(v, spec: str) -> str:
    """``format(v, spec)`` for a number, "-" for anything else (a missing figure)."""
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def markdown_header(env: dict | None, ceilings: dict | None = None) -> list[str]:
    """The lines above a results table: the environment and the measured ceilings."""
    lines = []
    if env:
        lines.append("Environment: " + ", ".join(f"{k}={v}" for k, v in env.items() if v is not None))
    if ceilings:
        lines.append("Measured ceilings: " + ", ".join(f"{k}={v:.1f}" for k, v in ceilings.items()))
    return lines


def default_device() -> str:
    """cuda when available, else cpu (the pytest-benchmark suites' device)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def fwd_bwd(fn: Callable, args: tuple, grad: bool, gy: torch.Tensor | None = None, wrt: tuple | None = None) -> None:
    """One timed step: ``fn(*args)`` under no_grad when not ``grad``; else forward and
    backward with ``gy`` (of the output's sum when None), into ``.grad`` or, given ``wrt``,
    through ``torch.autograd.grad`` (no accumulation, as after ``zero_grad(set_to_none=True)``)."""
    if not grad:
        with torch.no_grad():
            fn(*args)
        return
    out = fn(*args)
    if gy is None:
        out = out.float().sum()
    if wrt is not None:
        torch.autograd.grad(out, wrt, gy)
    else:
        out.backward(gy)


def measure(run: Callable[[], None], device: str, min_time_s: float, saved: tuple | None = None) -> dict:
    """Time ``run``: ``{"ms", "peak_MB" (CUDA), "saved_MB" (when ``saved`` = (fn, inputs) is
    given: the bytes ``fn()`` saves for backward beyond ``inputs``)}``, or ``{"error"}`` for an
    implementation that fails (a result, not a crash)."""
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        ms = time_fn(run, device, min_time_s=min_time_s)
    except Exception as exc:  # noqa: BLE001
        return {"error": error_text(exc)}
    row = {"ms": ms}
    if device == "cuda":
        row["peak_MB"] = torch.cuda.max_memory_allocated() / 2**20
    if saved is not None:
        fn, inputs = saved
        row["saved_MB"] = saved_bytes(fn, exclude=inputs) / 2**20
    return row


def capture_steps(fn: Callable, make_args: Callable[[bool], tuple]) -> None:
    """For ``ops/resources.py``: ``fn(*make_args(grad))`` with autograd (forward and backward)
    and without (no_grad), on the ``triton`` backend, so that every kernel the two paths
    launch is recorded."""
    from ._backend import use_backend

    with use_backend("triton"):
        for grad in (True, False):
            fwd_bwd(fn, make_args(grad), grad)


def bench_call(fn: Callable, args: tuple, grad: bool, device: str, gy: torch.Tensor | None = None,
               wrt: tuple | None = None) -> Callable[[], None]:
    """A closure for pytest-benchmark: :func:`fwd_bwd`, then a device synchronisation
    (pytest-benchmark times the wall clock)."""
    def run():
        fwd_bwd(fn, args, grad, gy, wrt)
        sync(device)

    return run


def implementation_or_skip(impls: dict, impl: str, device: str, what: str = ""):
    """``impls[impl]`` for a pytest-benchmark test, which is skipped when ``impl`` is not
    available (``what``: e.g. " for <case>", added to the reason)."""
    if impl not in impls:
        import pytest

        pytest.skip(f"{impl} is not available{what} on {device}")
    return impls[impl]


# ----------------------------------------------------------------------------- result tables and files

def markdown_rows(rows: list[dict], columns: list[tuple[str, str, str | None]], error_prefix: str = "error: ",
                  error_chars: int = 80) -> list[str]:
    """One markdown table line per result row. ``columns``: (header, row key, format spec);
    a column with a spec prints ``fmt(row.get(key), spec)`` ("-" when missing), one without
    prints ``row[key]`` as it is (the row's identity: case, mode, impl, ...). A row with an
    ``error`` keeps the columns before the first formatted one, then ``error_prefix`` and the
    error's first ``error_chars`` characters, then empty cells."""
    ids = next((i for i, (_, _, spec) in enumerate(columns) if spec is not None), len(columns))
    lines = []
    for r in rows:
        if "error" in r:
            cells = [str(r[key]) for _, key, _ in columns[:ids]] + [f"{error_prefix}{r['error'][:error_chars]}"]
            lines.append("| " + " | ".join(cells) + " |" + " |" * (len(columns) - ids - 1))
            continue
        cells = [str(r[key]) if spec is None else fmt(r.get(key), spec) for _, key, spec in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str | None]], env: dict | None = None,
                   ceilings: dict | None = None, notes: tuple[str, ...] = (), error_prefix: str = "error: ",
                   error_chars: int = 80) -> str:
    """A results table: :func:`markdown_header`, the ``notes`` lines, a blank line (when
    anything comes before the table), the header row, then :func:`markdown_rows`."""
    lines = markdown_header(env, ceilings) + list(notes)
    if lines:
        lines.append("")
    lines += ["| " + " | ".join(header for header, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += markdown_rows(rows, columns, error_prefix, error_chars)
    return "\n".join(lines) + "\n"


def plot_speedups(rows: list[dict], path: str, title: str = "", env: dict | None = None) -> str:
    """A PNG bar chart at ``path``: per case (and mode), each implementation's speed-up over
    eager and over compile(eager) (its ``x_vs_eager`` / ``x_vs_compile(eager)``), a line at 1.
    Needs matplotlib (``pip install fastinpaint[plot]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib (or the [plot] extra)") from None
    groups, impls = [], []
    for r in rows:
        key = f"{r['case']} {r['mode']}" if "mode" in r else str(r["case"])
        if key not in groups:
            groups.append(key)
        if r["impl"] not in impls and r["impl"] != "eager":
            impls.append(r["impl"])
    value = {(f"{r['case']} {r['mode']}" if "mode" in r else str(r["case"]), r["impl"]): r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(12.0, 0.1 * len(groups) * max(3, len(impls)) + 2.0),
                             sharey=True, squeeze=False)
    width = 0.8 / max(1, len(impls))
    for ax, (baseline, key) in zip(axes[0], [("eager", "x_vs_eager"), ("compile(eager)", "x_vs_compile(eager)")]):
        for k, impl in enumerate(impls):
            heights = [value.get((g, impl), {}).get(key, 0.0) for g in groups]
            ax.barh([i + k * width for i in range(len(groups))], heights, height=width, label=impl)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(f"speed-up vs {baseline} (>1: faster)", fontsize=9)
        ax.set_yticks([i + 0.4 - width / 2 for i in range(len(groups))])
        ax.set_yticklabels(groups, fontsize=8)
        ax.invert_yaxis()
    axes[0][0].legend(fontsize=8, loc="lower right")
    if env:
        title = f"{title}\n" + ", ".join(f"{k}={env[k]}" for k in ("cpu", "cpu_threads", "torch", "gpu", "date")
                                          if env.get(k) is not None)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(path_json: str | None, path_md: str | None, rows, env, ceilings,
                  markdown: Callable[[list, dict, dict], str], path_plot: str | None = None,
                  title: str = "") -> None:
    """Write ``{"environment", "ceilings", "results"}`` as JSON to ``path_json``,
    ``markdown(rows, env, ceilings)`` (the benchmark's table) to ``path_md`` and the chart of
    :func:`plot_speedups` to ``path_plot``; any path may be None. Called after every case, so
    partial results survive."""
    if path_plot and rows:
        plot_speedups(rows, path_plot, title, env)
    if path_json:
        with open(path_json, "w") as fh:
            json.dump({"environment": env, "ceilings": ceilings, "results": rows}, fh, indent=1)
    if path_md:
        with open(path_md, "w") as fh:
            fh.write(markdown(rows, env, ceilings))


#: the layer specs of the stand-alone convolution scripts (benchmarks/conv_*.py)
LAYER_SPEC = "CIN:COUT:KERNEL:STRIDE:SIZE:BATCH"


def ratio_rows(timed: dict[str, dict], base: str, label_key: str, ratio_key: str, **fields) -> list[dict]:
    """One result row per entry of ``timed`` (``{label: figures}``, as :func:`time_interleaved`
    gives them): ``fields``, ``label_key``: the label, the figures, and ``ratio_key``: the time of
    ``base`` over the row's (none where either failed: the row then reports its error)."""
    base_ms = timed[base].get("ms")
    rows = []
    for label, figures in timed.items():
        row = {**fields, label_key: label, **figures}
        if base_ms and "ms" in row:
            row[ratio_key] = base_ms / row["ms"]
        rows.append(row)
    return rows


def layer_script_main(description: str, cases: dict, run: Callable[[dict, int], list],
                      columns: list[tuple[str, str, str | None]], argv=None,
                      before_run: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """The command line of a stand-alone convolution script: ``--cases`` (``{label: spec}``
    replaced by the given :data:`LAYER_SPEC` strings, each its own label), ``--rounds``,
    ``--json`` and ``--markdown``; ``run(cases, rounds)`` gives the rows, printed and written
    with the environment. ``before_run(parser)`` may refuse to run (``parser.error``)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--cases", nargs="+", metavar=LAYER_SPEC,
                   help="layers to time instead of the default ones: "
                   + ", ".join(f"{k} {v}" for k, v in cases.items()))
    p.add_argument("--json")
    p.add_argument("--markdown")
    a = p.parse_args(argv)
    if a.rounds < 1:
        p.error(f"--rounds must be >= 1, got {a.rounds}")
    for text in a.cases or ():
        parts = text.split(":")
        if len(parts) != 6 or not all(v.isdigit() and int(v) > 0 for v in parts):
            p.error(f"--cases takes {LAYER_SPEC} (positive integers), got {text!r}")
    if a.cases:
        cases = {text: text for text in a.cases}
    if before_run is not None:
        before_run(p)
    rows = run(cases, a.rounds)
    env = environment("cpu")
    table = markdown_table(rows, columns, env, notes=("", "Interleaved calls, median of the rounds; "
                                                      "threads: torch's default."))
    print(table)
    write_results(a.json, a.markdown, rows, env, {}, lambda *_: table)
    return 0
