"""Channel-wise fully connected layer at the Context Encoder's shapes: fastinpaint's
backends against the eager reference and torch.compile of it, timed in the same run (on the
CPU in turns, one call of each per round).

    python -m fastinpaint.ops.channel_fc.bench --device cpu --json out.json --markdown out.md
    python -m fastinpaint.ops.channel_fc.bench --device cuda --dtype bfloat16 ...

The "layer" cases time the layer as the Context Encoder runs it (``fastinpaint.nn.ChannelWiseFC``:
the channel-wise layer, then the 1x1 convolution that mixes the channels): eager's channel-wise
output is a view with the batch innermost, a layout whose cost only its reader pays.

Per case and mode (fwd+bwd, fwd under no_grad): median ms, speed-up over each baseline,
bytes saved for backward, peak memory (GPU), and the achieved bandwidth over the
minimum traffic (every operand read once, every result written once: the weight
dominates at large maps) against the device's measured copy bandwidth (GPU).
Gradients are taken with torch.autograd.grad (no accumulation into .grad, as after
``zero_grad(set_to_none=True)``); the incoming gradient is in x's memory format.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import sys

import torch
import torch.nn.functional as F

from ... import _backend
from ... import benchmark as B
from . import reference as ref
from .op import channel_fc

ACTIVATION = "leaky_relu"
SLOPE = 0.2


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    batch: int
    channels: int
    size: int  # H = W
    mix: bool = False  # the layer as the Context Encoder uses it: the 1x1 mixing convolution after it

    @property
    def positions(self) -> int:
        return self.size * self.size

    def flops(self, grad: bool) -> float:
        f = 2.0 * self.batch * self.channels * self.positions ** 2
        if self.mix:
            f += 2.0 * self.batch * self.positions * self.channels ** 2
        return 3 * f if grad else f

    def min_bytes(self, esize: int, grad: bool) -> float:
        """Every operand read once, every result written once (the mixing convolution's output
        instead of the channel-wise layer's where there is one)."""
        act = self.batch * self.channels * self.positions
        w = self.channels * self.positions ** 2 + (self.channels ** 2 + self.channels if self.mix else 0)
        b = self.channels * self.positions
        fwd = act + w + b + act  # x, W, bias in; y out
        if not grad:
            return esize * fwd
        bwd = act + act + act + w + act + w + b  # dy, y, x, W in; dx, dW, db out
        return esize * (fwd + bwd)


CASES = [
    Case("B64 C512 4x4 (inpainting bottleneck)", 64, 512, 4),
    Case("B64 C256 8x8", 64, 256, 8),
    Case("B16 C64 32x32", 16, 64, 32),
    Case("B1 C64 32x32 (inference)", 1, 64, 32),
    # eager's output (permute + bmm) is a view with the batch innermost, which the op alone never
    # pays for: the next layer does. These time ChannelWiseFC's forward, the mixing 1x1 convolution
    # included, as the Context Encoder runs it.
    # (named so that no part of an op case's name selects them: --cases selects by substring)
    Case("layer 4x4, 512 maps, batch 64, + 1x1 mix", 64, 512, 4, mix=True),
    Case("layer 8x8, 256 maps, batch 64, + 1x1 mix", 64, 256, 8, mix=True),
    Case("layer 32x32, 64 maps, batch 16, + 1x1 mix", 16, 64, 32, mix=True),
]


def _with_mix(fc):
    """``fc(x, w, b)``, then, given its weight and bias, the 1x1 mixing convolution
    (``fastinpaint.nn.ChannelWiseFC``'s forward without dropout)."""
    def fn(x, w, b, mix_w=None, mix_b=None):
        y = fc(x, w, b)
        return y if mix_w is None else F.conv2d(y, mix_w, mix_b)
    return fn


def implementations(device: str, compile_baseline: bool = True) -> dict:
    def eager(x, w, b):
        return ref.channel_fc(x, w, b, ACTIVATION, SLOPE)

    impls = {"eager": _with_mix(eager)}
    for backend in ("cpu", "cuda", "triton"):
        if _backend.unavailable_reason(backend, device) is None:
            if backend == "triton" and device == "cpu":
                continue  # the interpreter is for correctness, not speed

            def fn(x, w, b, backend=backend):
                with _backend.use_backend(backend):
                    return channel_fc(x, w, b, ACTIVATION, SLOPE)

            impls[f"fastinpaint[{backend}]"] = _with_mix(fn)
    return B.with_compiled(impls, compile_baseline)


def make_inputs(case: Case, device: str, dtype, grad: bool, channels_last: bool = False, sets: int = 1):
    P = case.positions
    w = (torch.randn(case.channels, P, P, device=device, dtype=dtype) / math.sqrt(P)).requires_grad_(grad)
    b = torch.randn(case.channels, P, device=device, dtype=dtype).requires_grad_(grad)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    xs = [torch.randn(case.batch, case.channels, case.size, case.size, device=device, dtype=dtype)
          .contiguous(memory_format=fmt).requires_grad_(grad) for _ in range(sets)]
    return xs, w, b


def make_mix(case: Case, device: str, dtype, grad: bool) -> tuple:
    """The mixing convolution's (weight, bias) for a ``mix`` case (nn.Conv2d's initialisation
    scale), else ()."""
    if not case.mix:
        return ()
    g = torch.Generator().manual_seed(2)
    C = case.channels
    w = (torch.rand(C, C, 1, 1, generator=g) * 2 - 1) / math.sqrt(C)
    b = (torch.rand(C, generator=g) * 2 - 1) / math.sqrt(C)
    return tuple(t.to(device=device, dtype=dtype).requires_grad_(grad) for t in (w, b))


def bench(cases=CASES, device="cpu", dtype=torch.float32, modes=("fwd+bwd", "fwd"), channels_last=False,
          compile_baseline=True, min_time_s=0.5, progress=None) -> list[dict]:
    rows = []
    ceilings = B.measure_ceilings(device) if device == "cuda" else {}
    copy_bw = ceilings.get("copy_GBps")
    l2 = torch.cuda.get_device_properties(0).L2_cache_size if device == "cuda" else 0
    esize = torch.finfo(dtype).bits // 8
    impls = implementations(device, compile_baseline)
    for case in cases:
        with B.fresh_compile():
            _run_case(case, impls, device, dtype, modes, channels_last, min_time_s, l2, esize, copy_bw, rows)
        if progress:
            progress(rows, ceilings)
    return rows, ceilings


def _run_case(case, impls, device, dtype, modes, channels_last, min_time_s, l2, esize, copy_bw, rows) -> None:
    """Append the rows of one case to ``rows``."""
    for mode in modes:
        grad = mode == "fwd+bwd"
        per_set = case.min_bytes(esize, False)
        sets = min(8, max(1, math.ceil(4 * l2 / per_set))) if device == "cuda" else 1
        xs, w, b = make_inputs(case, device, dtype, grad, channels_last, sets)
        mix = make_mix(case, device, dtype, grad)
        # the gradient in x's layout, as the next layer (the 1x1 mixing convolution) hands it
        # back; not randn_like(eager's output), whose batch-innermost strides only eager has
        gy = torch.randn_like(xs[0]) if grad else None
        runs = {}
        for label, fn in impls.items():
            next_x = itertools.cycle(xs).__next__  # input sets in turn: not found in L2

            def run(fn=fn, next_x=next_x):
                x = next_x()
                B.fwd_bwd(fn, (x, w, b, *mix), grad, gy, wrt=(x, w, b, *mix))

            runs[label] = run
        results = B.time_implementations(runs, device, min_time_s)
        for label, row in results.items():
            if "error" in row:
                continue
            if grad:
                fn = impls[label]
                row["saved_MB"] = B.saved_bytes(lambda: fn(xs[0], w, b, *mix), exclude=(xs[0], w, b, *mix)) / 2**20
            row["TFLOPs"] = case.flops(grad) / (row["ms"] * 1e-3) / 1e12
            row["GBps"] = case.min_bytes(esize, grad) / (row["ms"] * 1e-3) / 1e9
            if copy_bw:
                row["frac_of_copy_bw"] = row["GBps"] / copy_bw
        ratios = B.baseline_ratios(results)
        for label, row in results.items():
            rows.append({"case": case.name, "mode": mode, "impl": label, "batch": case.batch,
                         "dtype": B.dtype_name(dtype), "channels_last": channels_last, **row,
                         **ratios[label]})
        del xs, w, b, gy, mix


COLUMNS = [("case", "case", None), ("mode", "mode", None), ("impl", "impl", None), ("dtype", "dtype", None),
           ("ms", "ms", ".3f"), ("x vs eager", "x_vs_eager", ".2f"),
           ("x vs compile(eager)", "x_vs_compile(eager)", ".2f"),
           ("saved MB", "saved_MB", ".2f"), ("peak MB", "peak_MB", ".1f"), ("TFLOP/s", "TFLOPs", ".3f"),
           ("GB/s", "GBps", ".1f"), ("of copy bandwidth", "frac_of_copy_bw", ".1%")]


def markdown(rows, env, ceilings) -> str:
    note = (f"Activation {ACTIVATION}({SLOPE}); GB/s over the minimum traffic (each operand read once, "
            "each result written once). Eager's output is a view with the batch innermost (permute + bmm): "
            "the \"layer\" rows add the 1x1 mixing convolution that reads it, as ChannelWiseFC runs.")
    return B.markdown_table(rows, COLUMNS, env, ceilings, notes=(note,))


def capture_calls(dtype: torch.dtype) -> None:
    """Every Triton launch of the Context Encoder cases in ``dtype``, NCHW and channels_last,
    forward and backward (``ops/resources.py`` records them)."""
    for case in (c for c in CASES if not c.mix):   # the layer cases: the same shapes
        for channels_last in (False, True):
            B.capture_steps(lambda x, w, b: channel_fc(x, w, b, ACTIVATION, SLOPE),
                            lambda grad, case=case, cl=channels_last: (lambda xs, w, b: (xs[0], w, b))(
                                *make_inputs(case, "cpu", dtype, grad, cl)))


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of this script and of ``fastinpaint bench channel_fc``."""
    B.add_common_args(p, min_time=0.5, dtype_choices=["float32", "float16", "bfloat16"])
    p.add_argument("--modes", nargs="+", default=["fwd+bwd", "fwd"], choices=["fwd+bwd", "fwd"])
    p.add_argument("--cases", nargs="+", default=None, help="substrings of case names")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--no-compile", action="store_true")
    return p


def run_args(args: argparse.Namespace) -> int:
    """Run the cases ``args`` (from :func:`add_arguments`) select; print and write the table."""
    dtype = B.apply_common_args(args)
    cases = B.select_cases(CASES, args.cases)
    env = B.environment(args.device)

    def save(rows, ceilings):
        B.write_results(args.json, args.markdown, rows, env, ceilings, markdown,
                        path_plot=args.plot, title='channel-wise FC')

    rows, ceilings = bench(cases, args.device, dtype, tuple(args.modes), args.channels_last, not args.no_compile,
                           args.min_time, progress=save)
    save(rows, ceilings)
    print(markdown(rows, env, ceilings))
    return 0


def main(argv=None) -> int:
    return run_args(add_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0])).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(B.script_main(main, "python -m fastinpaint.ops.channel_fc.bench"))
