"""The ``fastinpaint`` command.

  fastinpaint bench      time the kernels against eager and torch.compile(eager)
  fastinpaint backends   show which backends are built and usable here
  fastinpaint train      train an inpainting network (default: tiny_gated on the demo photos)
  fastinpaint inpaint    fill user images (any size) with a trained generator
  fastinpaint convert    write another project's weights (DeepFill v2's PyTorch port) as fastinpaint's
  fastinpaint evaluate   score trained generators and classical baselines on the same holes

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
              "init": args.init, "resume": True if args.resume else None}
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
    """The validation metrics of the untrained network, the trained one, the mean-colour fill
    and OpenCV's Telea, side by side (a baseline that could not be run here says so)."""
    final, start = result.get("metrics") or {}, result.get("initial_metrics") or {}
    baselines = result.get("baselines") or {"mean": result.get("baseline_mean_fill") or {}}
    unavailable = result.get("baselines_unavailable") or {}
    if not final:
        return "validation: none (no validation images)"
    rows = [("PSNR (dB)", "psnr", "{:.2f}"), ("SSIM", "ssim", "{:.3f}"), ("L1 in the hole", "l1_hole", "{:.4f}")]
    columns = [("start", start, 8), ("trained", final, 8), ("mean-colour fill", baselines.get("mean") or {}, 17),
               ("Telea (OpenCV)", baselines.get("telea") or {}, 15)]
    lines = [f"validation after {result['step']} steps:   " + " ".join(f"{t:>{w}}" for t, _, w in columns)]
    for label, key, fmt in rows:
        cells = []
        for title, d, width in columns:
            cell = fmt.format(d[key]) if key in d else "-"
            if title.startswith("Telea") and "telea" in unavailable:
                cell = "unavailable"
            cells.append(f"{cell:>{width}}")
        lines.append(f"  {label:<28}" + " ".join(cells))
    if "telea" in unavailable:
        lines.append(f"  Telea: {unavailable['telea']}")
    return "\n".join(lines)


def _model_options(items) -> dict:
    """``--model-option KEY=VALUE`` (repeatable) as a dict; a value is read as JSON where it
    parses (numbers, true/false), else kept as the string."""
    from .errors import InvalidInputError
    from .train.config import parse_value

    options = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise InvalidInputError(f"{item!r} is not KEY=VALUE", argument="model_option",
                                    fix="write e.g. --model-option cnum=48")
        options[key.strip()] = parse_value(text)
    return options


def _cmd_inpaint(args) -> int:
    from .inpaint import inpaint_files

    inpaint_files(args.checkpoint, args.image, args.mask, args.out, invert_mask=args.invert_mask,
                  resize_mask=args.resize_mask, ema=args.ema, device=args.device, report=print, sketch=args.sketch,
                  model=args.model, model_options=_model_options(args.model_option))
    return 0


def _cmd_convert(args) -> int:
    from .weights import convert_weights

    path = convert_weights(args.weights, args.out, model=args.model, model_options=_model_options(args.model_option))
    print(f"wrote {path}")
    return 0


def _weights_arguments(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--model", help=f"the model {what} are for: needed for another project's checkpoint (deepfill_v2 "
                                   "reads the DeepFill v2 PyTorch port's .pth); a fastinpaint file names its own")
    p.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a model option (repeatable), e.g. --model-option cnum=48 --model-option guided=true; "
                        "for another project's checkpoint, those it was trained with")


def _cmd_evaluate(args) -> int:
    import torch

    from .errors import InvalidInputError
    from .evaluation import check_out, checkpoint_fill, evaluate

    if not args.checkpoint and not args.baseline:
        raise InvalidInputError("nothing to evaluate", argument="checkpoint",
                                fix="give --checkpoint RUN and/or --baseline mean|telea|navier_stokes (repeatable)")
    check_out(args.out)   # before the work, not after
    if args.device == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("cuda asked for, but torch sees no CUDA device", argument="device",
                                fix="use --device cpu, or leave --device out")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    given = {}
    for kind, names in (("checkpoint", args.checkpoint), ("baseline", args.baseline)):
        for name in names:
            key = name.rstrip("/\\") or name
            if key in given:
                raise InvalidInputError(f"{name} is given twice", argument=kind, fix="give each method once")
            given[key] = kind
    methods = {key: key if kind == "baseline" else checkpoint_fill(key, ema=args.ema, device=device)
               for key, kind in given.items()}
    choice = {"auto": "auto", "yes": True, "no": False}
    result = evaluate(args.data, methods, masks=args.masks, seed=args.seed, size=args.size,
                      lpips=choice[args.lpips], fid=choice[args.fid], device=device, progress=True)
    paths = result.write(args.out)
    print(result.table())
    for label, path in paths.items():
        print(f"{label + ':':10s} {path}")
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
                   help="a run folder (the --out of fastinpaint train), its weights.safetensors, a "
                        "checkpoints/ckpt_*.pt file, or another project's checkpoint with --model")
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
    p.add_argument("--sketch",
                   help="for a guided generator (deepfill_v2 with guided = true): the lines to draw in the hole "
                        "(white or any colour on black, or painted on transparency; the image's size), or a "
                        "folder of sketches named like the images; none: no guidance")
    p.add_argument("--ema", action="store_true", help="use the EMA weights of a run trained with --set ema=...")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    _weights_arguments(p, "the weights")
    _common(p)
    p.set_defaults(func=_cmd_inpaint)

    c = sub.add_parser("convert", help="write weights (another project's checkpoint) as fastinpaint weights",
                       description="Write the generator of a checkpoint (another project's, such as the DeepFill v2 "
                                   "PyTorch port's .pth, or a fastinpaint one) as a .safetensors file with its "
                                   "config in the metadata, which every command takes as it takes a trained run's "
                                   "weights.")
    c.add_argument("weights", help="the checkpoint to convert")
    c.add_argument("--out", required=True, help="the .safetensors file to write")
    _weights_arguments(c, "the weights")
    _common(c)
    c.set_defaults(func=_cmd_convert)
    e = sub.add_parser("evaluate", help="score trained generators and classical baselines on the same holes",
                       description="Fill every image's holes with each method and score the results. Every image "
                                   "gets the same holes for every method and every run, drawn from (--seed, the "
                                   "image's index); each method's output is pasted into the holes (known pixels "
                                   "kept exactly) and rounded to 8 bits. Writes per_image.csv, summary.json, "
                                   "summary.md (means with 95% confidence intervals) and grid.png (masked input | "
                                   "each method | ground truth) into --out.")
    e.add_argument("--checkpoint", action="append", default=[], metavar="RUN",
                   help="a run folder, its weights.safetensors or a checkpoints/ckpt_*.pt file (any model; "
                        "repeatable)")
    e.add_argument("--baseline", action="append", default=[], choices=["mean", "telea", "navier_stokes"],
                   help="the mean known colour, or OpenCV's Telea or Navier-Stokes inpainting (radius 3; needs "
                        "opencv-python-headless, else reported unavailable); repeatable")
    e.add_argument("--data", default="demo",
                   help="'demo' (the photographs scikit-image ships, whole; the default) or a folder of images "
                        "(recursive; an unreadable file is skipped with a warning)")
    e.add_argument("--masks", default="medium",
                   help="thin, medium, thick (LaMa's evaluation masks; the default: medium), free_form, center, "
                        "block, region, or a folder of mask images (named like the images, else taken in sorted "
                        "order; stretched to each image)")
    e.add_argument("--size", type=int,
                   help="bring every image to SIZE x SIZE first (shorter side resized, centre square), as the "
                        "published protocols do at 256 or 512; default: each image at its own size")
    e.add_argument("--seed", type=int, default=0, help="the masks' seed (default 0)")
    e.add_argument("--out", default="runs/evaluate", help="folder for the report (default runs/evaluate)")
    e.add_argument("--lpips", choices=["auto", "yes", "no"], default="auto",
                   help="LPIPS from weights on disk: auto (when they are there; the default), yes (an error "
                        "naming the missing file when not), no")
    e.add_argument("--fid", choices=["auto", "yes", "no"], default="auto", help="FID, likewise")
    e.add_argument("--ema", action="store_true", help="use the EMA weights of the --checkpoint runs")
    e.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    _common(e)
    e.set_defaults(func=_cmd_evaluate)

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
    t.add_argument("--mask", help="mask kind: center, block, region, free_form, thin, medium, thick, file")
    t.add_argument("--steps", type=int, help="optimiser steps")
    t.add_argument("--out", help="run directory (default runs/fastinpaint)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set lr=2e-4 --set loss_weights.adv=0.1")
    t.add_argument("--init", metavar="PATH",
                   help="fine-tune: start from these weights (a run folder, a weights file, a training checkpoint, "
                        "or another project's checkpoint of the model, e.g. the DeepFill v2 PyTorch port's .pth): "
                        "the generator, and the discriminator where the file has one; optimisers, step and data "
                        "position start fresh. Not with --resume")
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
