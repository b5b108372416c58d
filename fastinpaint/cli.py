"""The ``fastinpaint`` command.

  fastinpaint bench      time the kernels against eager and torch.compile(eager)
  fastinpaint backends   show which backends are built and usable here
  fastinpaint train      train an inpainting network (default: tiny_gated on the demo photos)
  fastinpaint inpaint    fill user images (any size) with a trained generator
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _cmd_backends(args) -> int:
    from . import backends, _extension
    from .ops import _registry

    report = backends()
    ops = _registry.describe()
    how = _extension.library(build=False)
    if args.json:
        print(json.dumps({"backends": report, "ops": ops, "extension": how}, indent=1))
        return 0
    print("\n".join(f"{name:10s} cpu: {v['cpu']}\n{'':10s} cuda: {v['cuda']}" for name, v in report.items()))
    print(f"extension: {how or 'not loaded'}")
    for op, per_backend in ops.items():
        print(f"\n{op}")
        for backend, entry in per_backend.items():
            print(f"  {backend:10s} {entry['runs']}\n  {'':10s} cpu: {entry['cpu']}; cuda: {entry['cuda']}")
    return 0


def _cmd_bench(args) -> int:
    from . import benchmark

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("fastinpaint bench: --device cuda asked for, but torch sees no CUDA device", file=sys.stderr)
        return 2
    dtype = _DTYPES[args.dtype or ("bfloat16" if device == "cuda" else "float32")]
    batch = args.batch or (8 if device == "cuda" else 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = benchmark.DEEPFILL_CASES
    if args.cases:
        cases = [c for c in cases if any(s in c.name for s in args.cases)]
        if not cases:
            print(f"fastinpaint bench: no case matches {args.cases}", file=sys.stderr)
            return 2
    if args.quick:
        cases = benchmark.quick_cases(cases)
    env = benchmark.environment(device)
    print(f"fastinpaint bench: gated convolution, DeepFill v2 generator layers{' (quick: maps 8x smaller)' if args.quick else ''}; "
          f"{device}, {args.dtype or str(dtype).split('.')[-1]}, batch {batch}, "
          f"{'channels_last' if args.layout == 'channels_last' else 'NCHW'}, {torch.get_num_threads()} threads",
          flush=True)
    ceilings = benchmark.measure_ceilings(device) if device == "cuda" else {}
    peak = next((v for k, v in ceilings.items() if k.startswith("matmul")), None)
    def progress(msg, rows_so_far):
        print(f"  done: {msg}", flush=True)
        for r in rows_so_far:
            if peak and "TFLOPs" in r:
                r["frac_of_matmul_peak"] = r["TFLOPs"] / peak
        benchmark.write_results(args.json, args.markdown, rows_so_far, env, ceilings)  # partial results survive

    rows = benchmark.bench_gated_conv(
        cases, device=device, dtype=dtype, batch=batch, channels_last=args.layout == "channels_last",
        modes=tuple(args.modes), compile_baseline=not args.no_compile, min_time_s=0.1 if args.quick else args.min_time,
        progress=progress)
    print()
    print(benchmark.markdown_table(rows, env, ceilings))
    benchmark.write_results(args.json, args.markdown, rows, env, ceilings)
    for path in (args.json, args.markdown):
        if path:
            print(f"wrote {path}")
    errors = [r for r in rows if "error" in r]
    for r in errors:
        print(f"ERROR {r['case']} {r['mode']} {r['impl']}: {r['error']}", file=sys.stderr)
    # a baseline that cannot run here (torch.compile without a working toolchain) is
    # reported in the table; a fastinpaint implementation that fails is a failure
    return 1 if any(r["impl"].startswith("fastinpaint") for r in errors) else 0


def _cmd_train(args) -> int:
    from .train.config import ConfigError, load_config

    values = {"model": args.model, "data": args.data, "mask": args.mask, "steps": args.steps, "out": args.out,
              "resume": True if args.resume else None}
    try:
        config = load_config(args.config, overrides=args.set, **values)
    except (ConfigError, OSError) as e:
        print(f"fastinpaint train: {e}", file=sys.stderr)
        return 2
    from .train.trainer import train

    result = train(config)
    if "checkpoint" in result:  # rank 0
        print(_summary(result))
        print(f"checkpoint: {result['checkpoint']}")
        print(f"samples:    {result.get('grid', '(no validation batches)')}")
        print(f"metrics:    {result['metrics_path']}")
        print(f"weights:    {result['weights']}")
        print(f"config:     {result['config']}")
    return 0


def _summary(result: dict) -> str:
    """The validation metrics of the untrained network, the trained one, and the
    mean-colour fill, side by side."""
    final, start, base = result.get("metrics") or {}, result.get("initial_metrics") or {}, \
        result.get("baseline_mean_fill") or {}
    if not final:
        return "validation: none (no validation images)"
    rows = [("PSNR (dB)", "psnr", "{:.2f}"), ("SSIM", "ssim", "{:.3f}"), ("L1 in the hole", "l1_hole", "{:.4f}")]
    lines = [f"validation after {result['step']} steps:   {'start':>8} {'trained':>8} {'mean-colour fill':>17}"]
    for label, key, fmt in rows:
        cells = [fmt.format(d[key]) if key in d else "-" for d in (start, final, base)]
        lines.append(f"  {label:<28}{cells[0]:>8} {cells[1]:>8} {cells[2]:>17}")
    return "\n".join(lines)


def _cmd_inpaint(args) -> int:
    from .inpaint import inpaint_files

    try:
        written = inpaint_files(args.checkpoint, args.image, args.mask, args.out, invert_mask=args.invert_mask,
                                ema=args.ema, device=args.device)
    except (FileNotFoundError, ValueError) as exc:
        print(f"fastinpaint inpaint: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastinpaint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="time the kernels against eager and torch.compile(eager)")
    b.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    b.add_argument("--dtype", choices=sorted(_DTYPES), help="default: float32 on cpu, bfloat16 on cuda")
    b.add_argument("--batch", type=int, help="default: 1 on cpu, 8 on cuda")
    b.add_argument("--layout", choices=["channels_last", "contiguous"], default="channels_last")
    b.add_argument("--cases", nargs="+", help="only the cases whose name contains one of these strings")
    b.add_argument("--modes", nargs="+", choices=["fwd+bwd", "fwd"], default=["fwd+bwd", "fwd"])
    b.add_argument("--quick", action="store_true", help="maps 8x smaller, short timing: a smoke run")
    b.add_argument("--no-compile", action="store_true", help="skip the torch.compile(eager) baseline")
    b.add_argument("--min-time", type=float, default=0.5, help="seconds of timing per implementation")
    b.add_argument("--threads", type=int, help="torch CPU threads")
    b.add_argument("--json", help="write the results as JSON here")
    b.add_argument("--markdown", help="write the results as a markdown table here")
    b.set_defaults(func=_cmd_bench)

    p = sub.add_parser("inpaint", help="fill images with a trained generator (any size; known pixels kept)")
    p.add_argument("--checkpoint", required=True, help="a run folder, its weights.safetensors, or a checkpoint .pt")
    p.add_argument("--image", required=True, help="an image, or a folder of images")
    p.add_argument("--mask", required=True, help="a mask (white = hole), or a folder of masks named like the images")
    p.add_argument("--out", required=True, help="output file, or folder for a folder of images")
    p.add_argument("--invert-mask", action="store_true", help="the mask files use white = known")
    p.add_argument("--ema", action="store_true", help="use the EMA weights of a run")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.set_defaults(func=_cmd_inpaint)

    k = sub.add_parser("backends", help="show which backends are built and usable here")
    k.add_argument("--json", action="store_true")
    k.set_defaults(func=_cmd_backends)

    t = sub.add_parser("train", help="train an inpainting network",
                       description="Train a model. Precedence: defaults < --config file < options < --set.")
    t.add_argument("--config", help="a TOML or YAML file of TrainConfig keys")
    t.add_argument("--model", help="model name (default tiny_gated)")
    t.add_argument("--data", help="'demo' or an image folder")
    t.add_argument("--mask", help="mask kind: center, block, region, free_form, file")
    t.add_argument("--steps", type=int, help="optimiser steps")
    t.add_argument("--out", help="run directory")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set lr=2e-4 --set loss_weights.adv=0.1")
    t.add_argument("--resume", action="store_true", help="continue from the latest valid checkpoint in --out")
    t.set_defaults(func=_cmd_train)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "batch", None) is not None and args.batch < 1:
        print("fastinpaint bench: --batch must be >= 1", file=sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
