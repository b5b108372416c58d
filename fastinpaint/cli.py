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
    from .ops.gated_conv import bench

    return bench.run_args(args)


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
    from .ops.gated_conv.bench import add_arguments as bench_arguments

    bench_arguments(b)
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
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
