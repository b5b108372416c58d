"""The ``fastinpaint`` command.

  fastinpaint bench      time the kernels against eager and torch.compile(eager)
  fastinpaint backends   show which backends are built and usable here
  fastinpaint train      train an inpainting network (default: tiny_gated on the demo photos)
  fastinpaint inpaint    fill user images (any size) with a trained generator

A mistake in the arguments or the files given is reported as one line on stderr, naming
the argument and the fix, with exit status 2; --debug (or FASTINPAINT_DEBUG=1) shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import UserError


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
    from .train.config import load_config

    values = {"model": args.model, "data": args.data, "mask": args.mask, "steps": args.steps, "out": args.out,
              "resume": True if args.resume else None}
    config = load_config(args.config, overrides=args.set, **values)
    from .train.trainer import train

    result = train(config, overwrite=args.overwrite)
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

    inpaint_files(args.checkpoint, args.image, args.mask, args.out, invert_mask=args.invert_mask,
                  resize_mask=args.resize_mask, ema=args.ema, device=args.device, report=print,
                  max_memory=args.max_memory)
    return 0


MASK_RULE = """\
Mask files (--mask): a hole is every pixel brighter than half the mask's brightest value,
brightness being the largest of the pixel's colour channels. So white, or any colour, on
black marks the holes, whether the file is 0/255 or 0/1, gray, RGB or 16-bit. A mask with
transparency (an alpha channel with a pixel that is not fully opaque, or a transparent
palette colour) is read by its alpha instead: painted (alpha > 0) = hole, fully
transparent = known. --invert-mask swaps holes and known pixels (black = hole, or
transparent = hole). A mask that marks no hole, or every pixel as one, is an error; so is
a mask of another size than its image, unless --resize-mask. The output keeps the input's
mode: gray stays gray, an alpha channel is kept as it was."""


class _Parser(argparse.ArgumentParser):
    """argparse's errors as one line (the usage is in --help), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _common(parser: argparse.ArgumentParser, top: bool = False) -> None:
    # SUPPRESS in the subcommands, so `fastinpaint --debug train` is not reset by train's default
    parser.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="show the traceback of an error (also FASTINPAINT_DEBUG=1)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastinpaint", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    b = sub.add_parser("bench", help="time the kernels against eager and torch.compile(eager)")
    from .ops.gated_conv.bench import add_arguments as bench_arguments

    bench_arguments(b)
    _common(b)
    b.set_defaults(func=_cmd_bench)

    p = sub.add_parser("inpaint", help="fill images with a trained generator (any size; known pixels kept)",
                       description="Fill the holes of images with a trained generator; every known pixel is "
                                   "kept exactly (in a lossless output: not in a .jpg).", epilog=MASK_RULE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a run folder (the --out of fastinpaint train), its weights.safetensors, or a "
                        "checkpoints/ckpt_*.pt file")
    p.add_argument("--image", required=True, help="an image, or a folder of images")
    p.add_argument("--mask", required=True,
                   help="a mask (white or any colour on black = hole; see below), or a folder of masks named "
                        "like the images")
    p.add_argument("--out", required=True,
                   help="output file (.png, .jpg, .webp, .bmp, .tif), or folder (an existing one, or a path "
                        "ending in /; always for a folder of images)")
    p.add_argument("--invert-mask", action="store_true",
                   help="the masks mark holes the other way: black = hole (or, with transparency, "
                        "transparent = hole)")
    p.add_argument("--resize-mask", action="store_true",
                   help="stretch a mask of another size than its image to the image's size (nearest) instead "
                        "of refusing it")
    p.add_argument("--ema", action="store_true", help="use the EMA weights of a run trained with --set ema=...")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    p.add_argument("--max-memory", metavar="SIZE",
                   help="refuse, before any work, an image whose estimated memory exceeds SIZE (e.g. 6G, 512M; "
                        "default: the memory available now: MemAvailable, or the GPU's free memory)")
    _common(p)
    p.set_defaults(func=_cmd_inpaint)

    k = sub.add_parser("backends", help="show which backends are built and usable here")
    k.add_argument("--json", action="store_true")
    _common(k)
    k.set_defaults(func=_cmd_backends)

    t = sub.add_parser("train", help="train an inpainting network",
                       description="Train a model. Precedence: defaults < --config file < options < --set. "
                                   "A --out folder that already holds a run is refused unless --resume or "
                                   "--overwrite is given.")
    t.add_argument("--config", help="a TOML or YAML file of TrainConfig keys")
    t.add_argument("--model", help="model name (default tiny_gated)")
    t.add_argument("--data", help="'demo' or an image folder")
    t.add_argument("--mask", help="mask kind: center, block, region, free_form, file")
    t.add_argument("--steps", type=int, help="optimiser steps")
    t.add_argument("--out", help="run directory (default runs/fastinpaint)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set lr=2e-4 --set loss_weights.adv=0.1")
    again = t.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its latest valid checkpoint")
    again.add_argument("--overwrite", action="store_true",
                       help="delete the run in --out (config, checkpoints, log, metrics, samples, weights, "
                            "TensorBoard files) and start over")
    _common(t)
    t.set_defaults(func=_cmd_train)
    return parser


def _option(parser: argparse.ArgumentParser, argument: str) -> str:
    """``argument`` as the command line spells it: ``--name`` when the command has that option,
    else ``--set name`` when the command takes ``--set`` (a config key of ``train``)."""
    flag = "--" + argument.replace("_", "-")
    if flag in parser._option_string_actions:
        return flag
    return f"--set {argument}" if "--set" in parser._option_string_actions else argument


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(command, parser)
    return parser


def _user_message(exc: BaseException, parser: argparse.ArgumentParser) -> str | None:
    """The one line an error gets, or None for an error that is not the user's (a bug: its
    traceback is kept). UserError names its argument; the other errors listed here are the
    library's predictable ones, whose messages name the file or key at fault."""
    from ._backend import BackendUnavailableError

    if isinstance(exc, UserError):
        return exc.describe(_option(parser, exc.argument) if exc.argument else None)
    predictable = [BackendUnavailableError]
    for module, name in (("fastinpaint.train.checkpoint", "CheckpointError"),
                         ("fastinpaint.data.datasets", "UnreadableImageError"),
                         ("fastinpaint.metrics", "MetricUnavailableError")):
        if module in sys.modules:   # an error class of a module never imported cannot have been raised
            predictable.append(getattr(sys.modules[module], name))
    if isinstance(exc, tuple(predictable)):
        return " ".join(str(exc).split())
    return None


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"fastinpaint: warning: {' '.join(str(message).split())}\n"


def main(argv=None) -> int:
    import warnings

    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("FASTINPAINT_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")
    saved_format = warnings.formatwarning
    if not debug:   # a warning is one line too (--debug: with its source line)
        warnings.formatwarning = _one_line_warning
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        hint = " (continue the run with --resume)" if args.command == "train" else ""
        print(f"fastinpaint {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    except Exception as exc:
        message = None if debug else _user_message(exc, _subparser(parser, args.command))
        if message is None:
            raise
        print(f"fastinpaint {args.command}: {message}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = saved_format


if __name__ == "__main__":
    sys.exit(main())
