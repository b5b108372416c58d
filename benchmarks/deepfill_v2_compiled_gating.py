"""Which gating the cpu backend runs under torch.compile (ops/gated_conv/op.py,
COMPILED_GATING): DeepFill v2's generator on the CPU, timed in one process with interleaved
calls, as eager layers, fastinpaint's layers, and torch.compile of each, the compiled
fastinpaint model once with the fused gating kernel (an opaque call for inductor) and once
with the gating as aten ops (inductor fuses them). Inputs are NCHW; fastinpaint's generator
runs them channels_last inside (``DeepFillV2Generator.cpu_channels_last``), so its gated
layers see channels_last maps.

    python benchmarks/deepfill_v2_compiled_gating.py --json out.json --markdown out.md --plot out.png
    python benchmarks/deepfill_v2_compiled_gating.py --cases "train step:256" "G fwd+bwd:256" --rounds 10
"""

import argparse
import gc

import torch

from fastinpaint import benchmark as B
from fastinpaint.models import deepfill_v2_bench as DB
from fastinpaint.ops.gated_conv import op as gop

VARIANTS = [("eager", "eager", None), ("fastinpaint", "fastinpaint", None), ("compile(eager)", "compile(eager)", None),
            ("compile(fastinpaint), gating kernel", "compile(fastinpaint)", "kernel"),
            ("compile(fastinpaint), gating as aten ops", "compile(fastinpaint)", "aten")]
COLUMNS = [("case", "case", None), ("impl", "impl", None), ("ms", "ms", ".1f"), ("x vs eager", "x_vs_eager", ".2f"),
           ("x vs compile(eager)", "x_vs_compile(eager)", ".2f")]


def run(cases, rounds: int) -> list[dict]:
    torch._dynamo.config.recompile_limit = 64   # five variants of one forward, each traced once
    saved = gop.COMPILED_GATING["cpu"]
    rows = []
    try:
        for case, batch, size in cases:
            image, mask = DB._inputs(batch, (size, size), "cpu", torch.float32, False)
            runs = {}
            for label, impl, gating in VARIANTS:
                step = DB.make_step(DB.build("cpu", torch.float32, False), impl, case, image, mask)

                def call(step=step, gating=gating):
                    gop.COMPILED_GATING["cpu"] = gating or saved   # read while tracing
                    step()

                runs[label] = call
            # exactly `rounds` rounds after two calls each that compile and warm up
            timed = B.time_interleaved(runs, "cpu", min_time_s=float("inf"), max_rounds=rounds, warmup=2)
            for k, ratios in B.baseline_ratios(timed).items():
                rows.append({"case": f"{case} {size}x{size} batch {batch}", "impl": k, **timed[k], **ratios})
            runs.clear()
            gc.collect()
    finally:
        gop.COMPILED_GATING["cpu"] = saved
    return rows


def _case(p: argparse.ArgumentParser, text: str) -> tuple[str, int, int]:
    name, _, size = text.rpartition(":")
    if name not in DB.CASES or not size.isdigit() or int(size) < 8 or int(size) % 8:
        p.error(f"--cases takes CASE:SIZE with CASE one of {', '.join(DB.CASES)} and SIZE a multiple of 8, "
                f"got {text!r}")
    return name, 1, int(size)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--cases", nargs="+", default=["G fwd+bwd:128", "G inference:256"], metavar="CASE:SIZE",
                   help=f"cases of fastinpaint.models.deepfill_v2_bench ({', '.join(DB.CASES)}) at a size, batch 1")
    p.add_argument("--json")
    p.add_argument("--markdown")
    p.add_argument("--plot", help="a PNG bar chart of the speed-ups (needs matplotlib)")
    a = p.parse_args(argv)
    if a.rounds < 1:
        p.error(f"--rounds must be >= 1, got {a.rounds}")
    rows = run([_case(p, c) for c in a.cases], a.rounds)
    env = B.environment("cpu")
    table = B.markdown_table(rows, COLUMNS, env, notes=("", "Interleaved calls, median of the rounds; "
                                                        "threads: torch's default."))
    print(table)
    B.write_results(a.json, a.markdown, rows, env, {}, lambda *_: table, path_plot=a.plot,
                    title="DeepFill v2 generator")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
