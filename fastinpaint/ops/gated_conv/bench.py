"""Gated convolution benchmarks on DeepFill v2's generator layers (cnum 48, 256x256 input):
every fastinpaint backend available here against the eager reference (the public ports'
formulation) and torch.compile of it, in the same run. Per case and mode (forward+backward,
forward without grad): median ms, the speed-ups over both baselines, the bytes saved for
backward, peak memory and TFLOP/s (GPU). ``fastinpaint bench gated_conv`` runs this script
(and ``fastinpaint bench`` without an op name).

    python -m fastinpaint.ops.gated_conv.bench --device cpu --quick
    python -m fastinpaint.ops.gated_conv.bench --device cuda --json out.json --markdown out.md
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import sys
from typing import Callable

import torch

from ... import _backend
from ... import benchmark as B
from . import reference
from .op import conv_output_size, gated_conv2d, gated_deconv2d


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
    small = []
    for c in cases:
        c = dataclasses.replace(c, size=max(c.size // size_scale, 2 * c.dilation + 1))
        sizes = f"@{c.size}->{c.size * c.up}" if c.up > 1 else f"@{c.size}"
        small.append(dataclasses.replace(c, name=c.name.split("@")[0] + sizes))   # the label says the size run
    return small


def make_inputs(case: GatedCase, batch: int, device: str, dtype, channels_last: bool, requires_grad: bool,
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
            return reference.gated_deconv2d(x, w, b, case.stride, case.padding, case.dilation, "elu", 0.2, case.up)
        return reference.gated_conv2d(x, w, b, case.stride, case.padding, case.dilation, "elu", 0.2)

    return fn


def _fastinpaint_fn(case: GatedCase, backend: str):
    def fn(x, w, b):
        with _backend.use_backend(backend):
            if case.up != 1:
                return gated_deconv2d(x, w, b, case.stride, case.padding, case.dilation, "elu",
                                      scale_factor=case.up)
            return gated_conv2d(x, w, b, case.stride, case.padding, case.dilation, "elu")

    return fn


def implementations(case: GatedCase, device: str, compile_baseline: bool = True) -> dict:
    """{label: fn(x, w, b)}: the baselines, then every fastinpaint backend available here."""
    impls = {"eager": _reference_fn(case)}
    for backend in ("cpu", "cuda", "triton"):
        if _backend.unavailable_reason(backend, device) is None:
            if backend == "triton" and device == "cpu":
                continue  # the interpreter is for correctness, not speed
            impls[f"fastinpaint[{backend}]"] = _fastinpaint_fn(case, backend)
    return B.with_compiled(impls, compile_baseline)


def run(cases=None, device: str = "cpu", dtype=torch.float32, batch: int = 1, channels_last: bool = True,
                     modes=("fwd+bwd", "fwd"), compile_baseline: bool = True, min_time_s: float = 0.5,
                     progress: Callable[[str, list], None] | None = None) -> list[dict]:
    """Time every implementation of every case; one result row per (case, mode, implementation).
    Each case compiles afresh (:func:`fastinpaint.benchmark.fresh_compile`).

    ``progress(message, rows_so_far)`` is called after each (case, mode), so a caller can
    save partial results of a run that may be cut short."""
    cases = DEEPFILL_CASES if cases is None else cases
    rows = []
    l2 = torch.cuda.get_device_properties(0).L2_cache_size if device == "cuda" else 0
    for case in cases:
        with B.fresh_compile():
            rows += _run_case(case, device, dtype, batch, channels_last, modes, compile_baseline, min_time_s, l2,
                              progress, rows)
    return rows


def _run_case(case, device, dtype, batch, channels_last, modes, compile_baseline, min_time_s, l2, progress,
              done) -> list[dict]:
    """The rows of one case (``done``: the rows of the cases before it, for ``progress``)."""
    rows = []
    impls = implementations(case, device, compile_baseline)
    for mode in modes:
        grad = mode == "fwd+bwd"
        in_bytes = batch * case.cin * case.size ** 2 * torch.finfo(dtype).bits // 8
        sets = min(16, max(1, math.ceil(4 * l2 / max(in_bytes, 1)))) if device == "cuda" else 1
        xs, w, b = make_inputs(case, batch, device, dtype, channels_last, grad, sets)
        gy = None
        if grad:
            with torch.no_grad():
                gy = torch.randn_like(_reference_fn(case)(xs[0], w, b))

        def runner(fn):
            next_x = itertools.cycle(xs).__next__  # input sets in turn: not found in L2
            return lambda: B.fwd_bwd(fn, (next_x(), w, b), grad, gy)

        results = B.time_implementations({label: runner(fn) for label, fn in impls.items()}, device, min_time_s)
        for label, fn in impls.items():
            row = results[label]
            for t in [*xs, w, b]:
                t.grad = None
            if "error" in row:
                continue
            if grad:
                row["saved_MB"] = B.saved_bytes(lambda: fn(xs[0], w, b), exclude=(xs[0], w, b)) / 2**20
            flops = case.flops(batch) * (3 if grad else 1)
            row["TFLOPs"] = flops / (row["ms"] * 1e-3) / 1e12
        B.add_ratios(results)
        for label, row in results.items():
            rows.append({"case": case.name, "mode": mode, "impl": label, "batch": batch,
                         "dtype": str(dtype).split(".")[-1], "channels_last": channels_last, **row})
        if progress:
            progress(case.name + " " + mode, done + rows)
    return rows


COLUMNS = [("case", "case", None), ("mode", "mode", None), ("impl", "impl", None), ("dtype", "dtype", None),
           ("batch", "batch", None), ("ms", "ms", ".3f"), ("x vs eager", "x_vs_eager", ".2f"),
           ("x vs compile(eager)", "x_vs_compile(eager)", ".2f"), ("saved MB", "saved_MB", ".2f"),
           ("saved / eager's", "saved_vs_eager", ".2f"), ("peak MB", "peak_MB", ".1f"),
           ("TFLOP/s", "TFLOPs", ".2f"), ("of matmul peak", "frac_of_matmul_peak", ".1%")]


def markdown(rows: list[dict], env: dict | None = None, ceilings: dict | None = None) -> str:
    return B.markdown_table(rows, COLUMNS, env, ceilings)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of this script and of ``fastinpaint bench gated_conv``."""
    B.add_common_args(parser, dtype_choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--batch", type=int, help="default: 1 on cpu, 8 on cuda")
    parser.add_argument("--layout", choices=["channels_last", "contiguous"], default="channels_last")
    parser.add_argument("--cases", nargs="+", help="only the cases whose name contains one of these strings")
    parser.add_argument("--modes", nargs="+", choices=["fwd+bwd", "fwd"], default=["fwd+bwd", "fwd"])
    parser.add_argument("--quick", action="store_true", help="maps 8x smaller, short timing: a smoke run")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip torch.compile of every implementation (compile(eager), compile(fastinpaint[...]))")
    return parser


def run_args(args: argparse.Namespace) -> int:
    """Run the cases ``args`` (from :func:`add_arguments`) select; print and write the table.
    Exit status: 0, 1 when a fastinpaint implementation failed, 2 for a bad request."""
    device = args.device          # checked by its choices and by apply_common_args (no CUDA device)
    if args.batch is not None and args.batch < 1:
        print("fastinpaint bench: --batch must be >= 1", file=sys.stderr)
        return 2
    dtype = B.apply_common_args(args)
    batch = args.batch or (8 if device == "cuda" else 1)
    cases = DEEPFILL_CASES
    cases = B.select_cases(cases, args.cases)
    if args.quick:
        cases = quick_cases(cases)
    env = B.environment(device)
    print(f"fastinpaint bench: gated convolution, DeepFill v2 generator layers"
          f"{' (quick: maps 8x smaller)' if args.quick else ''}; {device}, {B.dtype_name(dtype)}, batch {batch}, "
          f"{'channels_last' if args.layout == 'channels_last' else 'NCHW'}, {torch.get_num_threads()} threads",
          flush=True)
    ceilings = B.measure_ceilings(device) if device == "cuda" else {}
    peak = next((v for k, v in ceilings.items() if k.startswith("matmul")), None)

    def progress(msg, rows_so_far):
        print(f"  done: {msg}", flush=True)
        for r in rows_so_far:
            if peak and "TFLOPs" in r:
                r["frac_of_matmul_peak"] = r["TFLOPs"] / peak
        B.write_results(args.json, args.markdown, rows_so_far, env, ceilings, markdown)  # partial results survive

    rows = run(cases, device=device, dtype=dtype, batch=batch, channels_last=args.layout == "channels_last",
               modes=tuple(args.modes), compile_baseline=not args.no_compile,
               min_time_s=0.1 if args.quick else args.min_time, progress=progress)
    print()
    print(markdown(rows, env, ceilings))
    B.write_results(args.json, args.markdown, rows, env, ceilings, markdown,
                    path_plot=args.plot, title='gated convolution, DeepFill v2 layers')
    for path in (args.json, args.markdown):
        if path:
            print(f"wrote {path}")
    errors = [r for r in rows if "error" in r]
    for r in errors:
        print(f"ERROR {r['case']} {r['mode']} {r['impl']}: {r['error']}", file=sys.stderr)
    # a baseline that cannot run here (torch.compile without a working toolchain) is
    # reported in the table; a fastinpaint implementation that fails is a failure
    return 1 if any(r["impl"].startswith("fastinpaint") for r in errors) else 0


def capture_calls(dtype: torch.dtype, batch: int = 1) -> None:
    """Every Triton launch of the DeepFill v2 cases in ``dtype``, channels_last, training and
    inference paths (``ops/resources.py`` records them; the kernels' specialization does not
    depend on the batch, so the host-side convolutions run at batch 1)."""
    for case in DEEPFILL_CASES:
        B.capture_steps(_fastinpaint_fn(case, "triton"),
                        lambda grad, case=case: (lambda xs, w, b: (xs[0], w, b))(
                            *make_inputs(case, batch, "cpu", dtype, True, grad)))


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(description="gated convolution benchmarks"))
    return run_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(B.script_main(main, "python -m fastinpaint.ops.gated_conv.bench"))
