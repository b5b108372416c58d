"""The ``fastinpaint`` command.

  fastinpaint bench      time an op or model (or all) against eager and torch.compile(eager)
  fastinpaint backends   show which backends are built and usable here
  fastinpaint train      train an inpainting network (default: tiny_gated on the demo photos)
  fastinpaint inpaint    fill user images (any size) with a trained generator
  fastinpaint convert    write another project's weights (DeepFill v2's PyTorch port) as fastinpaint's
  fastinpaint evaluate   score trained generators and classical baselines on the same holes
  fastinpaint export     export a trained generator to ONNX or a torch.export program (.pt2)

A mistake in the arguments or the files given is reported as one line on stderr, naming
the argument and the fix, with exit status 2; --debug (or FASTINPAINT_DEBUG=1) shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
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


#: ``fastinpaint bench OP``: the benchmark module of each op and of the models, and what it
#: times. Each module has ``add_arguments(parser)`` (its options) and ``run_args(args)``;
#: ``python -m <module>`` runs the same.
BENCHMARKS = {
    "gated_conv": ("fastinpaint.ops.gated_conv.bench", "DeepFill v2's gated layers (the default)"),
    "channel_fc": ("fastinpaint.ops.channel_fc.bench", "the channel-wise FC layer at the Context Encoder's shapes"),
    "self_similarity": ("fastinpaint.ops.self_similarity.bench",
                        "self-similarity maps and the spatially-correlative distance (F-LSeSim)"),
    "pixel_attention": ("fastinpaint.ops.pixel_attention.bench",
                        "pixel attention and the attention-transfer loss (distillation-guided inpainting)"),
    "partial_conv": ("fastinpaint.ops.partial_conv.bench", "the PConv U-Net's partial convolutions"),
    "spectral_norm_conv": ("fastinpaint.models.spectral_norm_conv_bench",
                           "the SN-PatchGAN discriminator's spectral-normalised convolutions"),
    "deepfill_v2": ("fastinpaint.models.deepfill_v2_bench",
                    "the whole DeepFill v2 generator and a training step, against the same model on eager layers"),
}
#: what ``fastinpaint bench`` runs when its arguments start with an option
DEFAULT_BENCHMARK = "gated_conv"
#: ``fastinpaint bench all``: its result options, and each one's file suffix
_BENCH_FILES = (("json", ".json"), ("markdown", ".md"), ("plot", ".png"))

BENCH_DOC = f"""\
Time fastinpaint's ops and models against eager PyTorch and torch.compile(eager), in the
same run. `fastinpaint bench OP --help` lists OP's options. Without OP (`fastinpaint bench
--quick`), the {DEFAULT_BENCHMARK} benchmark runs. `fastinpaint bench all` runs every benchmark
in turn, each with its own default cases."""

BENCH_ALL_DOC = """\
Every benchmark in turn, each with its default cases and the options given here (the others at
each benchmark's default); one set of result files per benchmark. --json, --markdown and
--plot name a folder (created if missing; it gets <op>.json, <op>.md, <op>.png), or a file
pattern holding {op} (e.g. results/cpu_{op}.md). A benchmark that fails is reported and the
others still run; the exit status is the largest of theirs."""


def _bench_module(name: str):
    return importlib.import_module(BENCHMARKS[name][0])


def _bench_parser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """``parser`` given benchmark ``name``'s options (and --debug)."""
    _bench_module(name).add_arguments(parser)
    _common(parser)
    parser.set_defaults(func=_cmd_bench)
    return parser


def _cmd_bench(args) -> int:
    if args.op == "all":
        return _bench_all(args)
    return _bench_module(args.op).run_args(args) or 0


def _bench_files(args) -> dict[str, dict[str, str]]:
    """``{op: {"json": path, ...}}`` of ``fastinpaint bench all`` (see :data:`BENCH_ALL_DOC`);
    the folders are made here, before any benchmark runs."""
    from .errors import InvalidInputError

    given = [(key, suffix, getattr(args, key)) for key, suffix in _BENCH_FILES if getattr(args, key) is not None]
    for key, suffix, value in given:
        if "{op}" not in value and (os.path.isfile(value) or os.path.splitext(value)[1].lower() == suffix):
            raise InvalidInputError(f"{value!r} names one file, but `all` writes one per benchmark", argument=key,
                                    fix=f"give a folder, or a file pattern with {{op}} such as "
                                        f"{os.path.join(os.path.dirname(value), '{op}' + suffix)}")
    files = {name: {} for name in BENCHMARKS}
    for key, suffix, value in given:
        for name in BENCHMARKS:
            path = value.replace("{op}", name) if "{op}" in value else os.path.join(value, name + suffix)
            try:
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            except OSError as exc:
                raise InvalidInputError(f"cannot make the folder of {path!r}: {exc.strerror}", argument=key,
                                        fix="give a folder that can be written") from None
            files[name][key] = path
    return files


def _bench_all(args) -> int:
    """``fastinpaint bench all``: every benchmark of :data:`BENCHMARKS` in turn, parsed from the
    options given (so each keeps its own defaults for the rest); one that raises is reported
    in one line and the others still run."""
    import torch

    from . import benchmark as B
    from .errors import InvalidInputError

    if args.device == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("torch sees no CUDA device here", argument="device", fix="use --device cpu")
    if args.threads is not None and args.threads < 1:
        raise InvalidInputError(f"must be at least 1, got {args.threads}", argument="threads")
    files = _bench_files(args)
    B.set_threads(args.threads)   # every benchmark, those without a --threads option too
    shared = [part for flag, value in (("--device", args.device), ("--dtype", args.dtype),
                                       ("--min-time", args.min_time)) if value is not None
              for part in (flag, str(value))]
    status = {}
    for name in BENCHMARKS:
        argv = shared + [part for key, path in files[name].items() for part in (f"--{key}", path)]
        print(f"\n== fastinpaint bench {shlex.join([name, *argv])}", flush=True)
        op_args = _bench_parser(_Parser(prog=f"fastinpaint bench {name}"), name).parse_args(argv)
        try:
            status[name] = _bench_module(name).run_args(op_args) or 0
        except Exception as exc:  # noqa: BLE001 - reported; the other benchmarks still run
            if _debug(args):
                raise
            print(f"fastinpaint bench all: {name}: {' '.join(B.error_text(exc, limit=None).split())}",
                  file=sys.stderr, flush=True)
            status[name] = 1
    print("\nfastinpaint bench all: " + ", ".join(f"{name} {'ok' if code == 0 else f'failed (status {code})'}"
                                                 for name, code in status.items()))
    return max(status.values())


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
                  model=args.model, model_options=_model_options(args.model_option), max_memory=args.max_memory)
    return 0


def _cmd_convert(args) -> int:
    from .weights import convert_weights

    path = convert_weights(args.weights, args.out, model=args.model, model_options=_model_options(args.model_option),
                           overwrite=args.overwrite)
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
    check_out(args.out, args.overwrite)   # before the work, not after
    options = _model_options(args.model_option)
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
    if (args.model or options) and "checkpoint" not in given.values():
        raise InvalidInputError("goes with --checkpoint (the weights it names the model of)",
                                argument="model" if args.model else "model_option", fix="give --checkpoint PATH")
    methods = {key: key if kind == "baseline" else
               checkpoint_fill(key, ema=args.ema, device=device, model=args.model, model_options=options)
               for key, kind in given.items()}
    choice = {"auto": "auto", "yes": True, "no": False}
    result = evaluate(args.data, methods, masks=args.masks, seed=args.seed, size=args.size,
                      lpips=choice[args.lpips], fid=choice[args.fid], device=device, progress=True)
    paths = result.write(args.out, overwrite=args.overwrite)
    print(result.table())
    for label, path in paths.items():
        print(f"{label + ':':10s} {path}")
    return 0


def _cmd_export(args) -> int:
    from .export import export_checkpoint

    export_checkpoint(args.checkpoint, args.out, args.format, ema=args.ema, opset=args.opset, report=print,
                      model=args.model, model_options=_model_options(args.model_option), overwrite=args.overwrite)
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
    """argparse's errors as one line (the usage is in --help), exit status 2. With
    ``default_command``, arguments that start with an option (or none) run that subcommand:
    ``fastinpaint bench --quick`` is ``fastinpaint bench gated_conv --quick``."""

    def __init__(self, *args, default_command: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.default_command = default_command

    def parse_known_args(self, args=None, namespace=None):
        if self.default_command is not None:
            args = list(sys.argv[1:] if args is None else args)
            first = next((a for a in args if a != "--debug"), None)
            if first is None or (first.startswith("-") and first not in ("-h", "--help")):
                args.insert(0, self.default_command)
        return super().parse_known_args(args, namespace)

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


class _Once(argparse.Action):
    """An option that takes one value: given twice, an error naming it (argparse would keep the
    last one silently)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, f"_{self.dest}_given", False):
            parser.error(f"{option_string} given twice; it takes one value (run the command once per value)")
        setattr(namespace, f"_{self.dest}_given", True)
        setattr(namespace, self.dest, values)


def _common(parser: argparse.ArgumentParser, top: bool = False) -> None:
    # SUPPRESS in the subcommands, so `fastinpaint --debug train` is not reset by train's default
    parser.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="show the traceback of an error (also FASTINPAINT_DEBUG=1)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastinpaint", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    b = sub.add_parser("bench", help="time an op or model (or all) against eager and torch.compile(eager)",
                       description=BENCH_DOC, default_command=DEFAULT_BENCHMARK,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(b)
    ops = b.add_subparsers(dest="op", metavar="OP", required=True, parser_class=_Parser)
    for name, (module, what) in BENCHMARKS.items():
        doc = _bench_module(name).__doc__ or what
        _bench_parser(ops.add_parser(name, help=what, description=" ".join(doc.split("\n\n")[0].split())), name)
    a = ops.add_parser("all", help="every benchmark above in turn, one set of result files each",
                       description=BENCH_ALL_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--device", choices=["cpu", "cuda"], help="default: each benchmark's (cuda when available)")
    a.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                   help="default: bfloat16 on cuda, float32 on cpu")
    a.add_argument("--min-time", type=float, help="seconds of timing per implementation (default: each benchmark's)")
    a.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    for key, suffix in _BENCH_FILES:
        a.add_argument(f"--{key}", metavar="DIR|PATTERN",
                       help=f"write each benchmark's {'chart' if key == 'plot' else key} to DIR/<op>{suffix}, or to "
                            f"PATTERN with {{op}} replaced by the benchmark's name")
    _common(a)
    a.set_defaults(func=_cmd_bench)

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
    p.add_argument("--max-memory", metavar="SIZE",
                   help="refuse, before any work, an image whose estimated memory exceeds SIZE (e.g. 6G, 512M; "
                        "default: the memory available now: MemAvailable, or the GPU's free memory)")
    _common(p)
    p.set_defaults(func=_cmd_inpaint)

    c = sub.add_parser("convert", help="write weights (another project's checkpoint) as fastinpaint weights",
                       description="Write the generator of a checkpoint (another project's, such as the DeepFill v2 "
                                   "PyTorch port's .pth, or a fastinpaint one) as a .safetensors file with its "
                                   "config in the metadata, which every command takes as it takes a trained run's "
                                   "weights.")
    c.add_argument("weights", help="the checkpoint to convert")
    c.add_argument("--out", required=True, help="the .safetensors file to write (an existing file is refused "
                                                "unless --overwrite)")
    c.add_argument("--overwrite", action="store_true", help="replace the --out file if it exists")
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
                        "repeatable), or another project's checkpoint with --model")
    e.add_argument("--baseline", action="append", default=[], choices=["mean", "telea", "navier_stokes"],
                   help="the mean known colour, or OpenCV's Telea or Navier-Stokes inpainting (radius 3; needs "
                        "opencv-python-headless, else reported unavailable); repeatable")
    e.add_argument("--data", default="demo",
                   help="'demo' (the photographs scikit-image ships, whole; the default) or a folder of images "
                        "(recursive; an unreadable file is skipped with a warning)")
    e.add_argument("--masks", default="medium", action=_Once,
                   help="thin, medium, thick (LaMa's evaluation masks; the default: medium), free_form, center, "
                        "block, region, or a folder of mask images (named like the images, any extension; else, "
                        "when there are as many masks as images, taken in sorted order; each stretched to its "
                        "image, and with --size resized and cropped as its image is)")
    e.add_argument("--size", type=int,
                   help="bring every image to SIZE x SIZE first (shorter side resized, centre square), as the "
                        "published protocols do at 256 or 512; default: each image at its own size")
    e.add_argument("--seed", type=int, default=0, help="the masks' seed (default 0)")
    e.add_argument("--out", default="runs/evaluate",
                   help="folder for the report (default runs/evaluate); one that holds a report is refused unless "
                        "--overwrite")
    e.add_argument("--overwrite", action="store_true", help="replace the report in --out (other files are kept)")
    e.add_argument("--lpips", choices=["auto", "yes", "no"], default="auto",
                   help="LPIPS from weights on disk: auto (when they are there; the default), yes (an error "
                        "naming the missing file when not), no")
    e.add_argument("--fid", choices=["auto", "yes", "no"], default="auto", help="FID, likewise")
    e.add_argument("--ema", action="store_true", help="use the EMA weights of the --checkpoint runs")
    e.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    _weights_arguments(e, "the --checkpoint weights")
    _common(e)
    e.set_defaults(func=_cmd_evaluate)
    x = sub.add_parser("export", help="export a trained generator to ONNX or torch.export (.pt2)",
                       description="Export the generator of a trained run, with its input recipe, as "
                                   "(image, mask[, sketch]) -> output: image (B, 3, H, W) in [-1, 1], mask "
                                   "(B, 1, H, W) with 1 = hole, sketch (B, 1, H, W) for a guided DeepFill v2; "
                                   "output (B, 3, H, W) in [-1, 1] (composite it with the known pixels). The "
                                   "batch, H and W are dynamic (H, W multiples of the network's size multiple). "
                                   "The file is checked against the eager model before it is written.")
    x.add_argument("--checkpoint", required=True,
                   help="a run folder (the --out of fastinpaint train), its weights.safetensors, a "
                        "checkpoints/ckpt_*.pt file, or another project's checkpoint with --model")
    x.add_argument("--format", required=True,
                   help="onnx (standard ONNX operators, verified with onnxruntime) or pt2 (a torch.export "
                        "program, torch.export.load)")
    x.add_argument("--out", required=True, help="the file to write: .onnx for --format onnx, .pt2 for pt2 (an "
                                                "existing file is refused unless --overwrite)")
    x.add_argument("--overwrite", action="store_true", help="replace the --out file if it exists")
    x.add_argument("--ema", action="store_true", help="export the EMA weights of a run trained with --set ema=...")
    x.add_argument("--opset", type=int, default=18, help="the ONNX opset (default 18, the lowest torch writes)")
    _weights_arguments(x, "the weights")
    _common(x)
    x.set_defaults(func=_cmd_export)

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


def _subparser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub)command ``args`` ran: ``fastinpaint bench all`` -> that of ``all``."""
    while True:
        action = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if action is None or getattr(args, action.dest, None) not in action.choices:
            return parser
        parser = action.choices[getattr(args, action.dest)]


def _debug(args: argparse.Namespace) -> bool:
    """--debug, or FASTINPAINT_DEBUG=1: tracebacks instead of one-line errors."""
    return getattr(args, "debug", False) or \
        os.environ.get("FASTINPAINT_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


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
    args, extra = parser.parse_known_args(argv)
    if extra:   # named by the (sub)command that was given them, as its other errors are
        _subparser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    debug = _debug(args)
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
        message = None if debug else _user_message(exc, _subparser(parser, args))
        if message is None:
            raise
        print(f"fastinpaint {args.command}: {message}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = saved_format


if __name__ == "__main__":
    sys.exit(main())
