"""Exporting a generator for deployment: a ``torch.export`` program (``.pt2``) or an ONNX
model, with dynamic height and width.

What is exported:

* a **recipe** (what :func:`fastinpaint.models.build_model` and
  :func:`fastinpaint.inpaint.load_generator` give): :class:`InpaintingNetwork`, i.e.
  ``(image, mask[, sketch]) -> output``. ``image`` (B, 3, H, W) in [-1, 1], ``mask``
  (B, 1, H, W) with 1 = hole, ``sketch`` (B, 1, H, W) for a guided DeepFill v2; ``output``
  (B, 3, H, W) in [-1, 1], the generator's final image (DeepFill v2's refined one). The
  recipe's input recipe (masking, mean fill, ones and mask channels) is inside the graph;
  the known pixels are *not* pasted back: a deployer composites ``output * mask + image *
  (1 - mask)`` as ``fastinpaint inpaint`` does.
* an **nn.Module**: its ``forward`` on the example input (a tensor or a tuple of them).

The batch, H and W are dynamic; H and W take any multiple of the network's size multiple
(``recipe.size_multiple``; a module's ``size_multiple`` or ``multiple`` attribute; 1 when
it has none), so an image of another size is padded to it (and cropped back) as
``fastinpaint inpaint`` does. The model is exported in eval mode (its mode is restored).

fastinpaint's ops are exported in their ``reference`` formulation (eager PyTorch, see
:mod:`fastinpaint._backend`), so the graph holds standard ATen ops only and runs without
fastinpaint; ``to_torch_export(..., backend="auto")`` keeps fastinpaint's kernels instead
(loading such a program needs ``import fastinpaint``). ONNX export goes through torch's
``torch.export``-based exporter (packages ``onnx``, ``onnxscript``; the extra ``export``)
and the written model is checked: only operators of the standard ONNX domain, and, run by
onnxruntime at the example's size and at a second size, the eager model's output within
``rtol``/``atol``. A model that cannot be exported raises :class:`ExportError`, naming the
op at fault where there is one.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ._backend import BACKENDS, use_backend
from .errors import InvalidInputError, UserError

__all__ = ["ExportError", "FORMATS", "InpaintingNetwork", "example_input", "export_checkpoint", "to_onnx",
           "to_torch_export", "verify_onnx"]

#: export format -> the extension of its file
FORMATS = {"onnx": ".onnx", "pt2": ".pt2"}
#: the lowest ONNX opset torch's exporter writes (Col2Im, which the contextual attention needs, is opset 18)
MIN_OPSET = 18
_ONNX_PACKAGES = ("onnx", "onnxscript")
_FIX_INSTALL = "pip install 'fastinpaint[export]' (onnx, onnxscript, onnxruntime)"
# namespaces of the ops every torch.export consumer (and torch's ONNX exporter) knows
_STANDARD_NAMESPACES = ("aten", "prims")


class ExportError(UserError, RuntimeError):
    """The model cannot be exported as asked. ``op`` names the operator at fault (e.g.
    ``"mylib::warp"``), or is None when the failure is not one op's."""

    def __init__(self, message: str, *, op: str | None = None, argument: str | None = "model",
                 fix: str | None = None):
        self.op = op
        super().__init__(message, argument=argument, fix=fix)

    def __reduce__(self):
        return (_rebuild_export_error, (self.message, self.op, self.argument, self.fix))


def _rebuild_export_error(message, op, argument, fix):
    return ExportError(message, op=op, argument=argument, fix=fix)


# ----------------------------------------------------------------------------- what is exported

class InpaintingNetwork(nn.Module):
    """A recipe's generator with its input recipe and its final output, as one module:
    ``forward(image, mask[, sketch])`` -> the (B, 3, H, W) image the generator fills (see the
    module doc). ``size_multiple`` is the recipe's."""

    def __init__(self, recipe):
        super().__init__()
        if not isinstance(getattr(recipe, "generator", None), nn.Module) or not callable(
                getattr(recipe, "prepare_input", None)):
            raise InvalidInputError(f"{type(recipe).__name__} is not a recipe (it needs a generator module and a "
                                    "prepare_input)", argument="model")
        self.generator = recipe.generator
        self.recipe = recipe   # not a module: its discriminator is not exported
        self.size_multiple = _positive_multiple(getattr(recipe, "size_multiple", 1), "model.size_multiple")

    def forward(self, image: torch.Tensor, mask: torch.Tensor, sketch: torch.Tensor | None = None) -> torch.Tensor:
        x = (self.recipe.prepare_input(image, mask) if sketch is None
             else self.recipe.prepare_input(image, mask, sketch))
        out = self.generator(x)
        final = getattr(self.recipe, "final_output", None)
        return final(out) if final is not None else out


def _is_recipe(model) -> bool:
    return not isinstance(model, nn.Module) and hasattr(model, "generator") and hasattr(model, "prepare_input")


def _positive_multiple(value, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"the size multiple must be a positive int, got {value!r}", argument=argument)
    return value


def _module_and_multiple(model, size_multiple) -> tuple[nn.Module, int]:
    if _is_recipe(model):
        module = InpaintingNetwork(model)
        multiple = module.size_multiple
    elif isinstance(model, nn.Module):
        module = model
        multiple = next((v for v in (getattr(model, "size_multiple", None), getattr(model, "multiple", None))
                         if isinstance(v, int) and not isinstance(v, bool)), 1)
    else:
        raise InvalidInputError(f"cannot export a {type(model).__name__}", argument="model",
                                fix="give an nn.Module or a recipe (fastinpaint.models.build_model, "
                                    "fastinpaint.inpaint.load_generator)")
    if size_multiple is not None:
        multiple = _positive_multiple(size_multiple, "size_multiple")
    return module, _positive_multiple(multiple, "model.size_multiple")


def _example_args(example_input, multiple: int, recipe: bool) -> tuple[torch.Tensor, ...]:
    """``example_input`` as a tuple of (B, C, H, W) floating tensors of one batch, H and W."""
    args = (example_input,) if isinstance(example_input, torch.Tensor) else example_input
    if not isinstance(args, (tuple, list)) or not args or not all(isinstance(t, torch.Tensor) for t in args):
        raise InvalidInputError(f"example_input must be a tensor or a tuple of tensors, got "
                                f"{type(example_input).__name__}", argument="example_input")
    args = tuple(args)
    if recipe and len(args) not in (2, 3):
        raise InvalidInputError(f"a recipe's example_input is (image, mask) or (image, mask, sketch), got "
                                f"{len(args)} tensors", argument="example_input")
    for i, t in enumerate(args):
        if t.dim() != 4 or not t.is_floating_point():
            raise InvalidInputError(f"example_input[{i}] must be a floating (B, C, H, W) tensor, got "
                                    f"{t.dtype} of shape {tuple(t.shape)}", argument="example_input")
        if t.shape[0] != args[0].shape[0] or t.shape[2:] != args[0].shape[2:]:
            raise InvalidInputError(f"example_input[{i}] has shape {tuple(t.shape)} but example_input[0] has "
                                    f"{tuple(args[0].shape)}: the tensors must share the batch, height and width",
                                    argument="example_input")
    h, w = args[0].shape[2:]
    if h % multiple or w % multiple or h == 0 or w == 0:
        raise InvalidInputError(f"the example is {h}x{w}, but the network takes sides that are positive multiples "
                                f"of {multiple}", argument="example_input",
                                fix="pad it (as fastinpaint inpaint does) or give another size")
    return args


@torch.no_grad()
def _check_runs(module: nn.Module, args) -> None:
    """The model runs eagerly on the example and returns one tensor (else a clear error before
    any tracing)."""
    with _eval_mode(module):
        try:
            out = module(*args)
        except UserError:
            raise
        except (ValueError, TypeError, IndexError, RuntimeError) as e:   # what torch and the models raise
            raise InvalidInputError(f"{type(module).__name__} does not run on the example: {_one_line(e)}",
                                    argument="example_input") from e
    if not isinstance(out, torch.Tensor):
        raise InvalidInputError(f"{type(module).__name__} returns a {type(out).__name__} in eval mode; export "
                                "takes a model that returns one tensor", argument="model",
                                fix="wrap it in a module that returns the image")


def _trace_args(args, multiple: int) -> tuple[torch.Tensor, ...]:
    """The tensors torch.export traces with: the example with a batch of at least 2 and sides of
    at least 2 multiples (a size of 1 would be specialised as a constant); the graph does not
    depend on the values."""
    b, h, w = args[0].shape[0], args[0].shape[2], args[0].shape[3]
    size = (max(h, 2 * multiple), max(w, 2 * multiple))
    if size != (h, w):
        args = tuple(F.interpolate(t, size=size, mode="nearest") for t in args)
    if b == 1:
        args = tuple(t.expand(2, *t.shape[1:]).contiguous() for t in args)
    return args


def _dynamic_shapes(args, multiple: int):
    """Batch, height and width dynamic (shared by every input); H and W multiples of ``multiple``."""
    from torch.export import Dim

    batch = Dim("batch", min=1, max=1 << 16)
    if multiple == 1:
        height, width = Dim("height", min=1, max=1 << 16), Dim("width", min=1, max=1 << 16)
    else:
        top = (1 << 16) // multiple
        height = multiple * Dim(f"height_div_{multiple}", min=1, max=top)
        width = multiple * Dim(f"width_div_{multiple}", min=1, max=top)
    return tuple({0: batch, 2: height, 3: width} for _ in args)


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _one_line(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[:limit] + " ..."


_OP_NAME = re.compile(r"\b([A-Za-z_]\w*)(?:::|\.)([A-Za-z_]\w*)(?:\.(?:default|Tensor|Scalar|\w+))?\b")


_ONNX_FAILED_OP = (re.compile(r"target=torch\.ops\.(\w+)\.(\w+)"),
                   re.compile(r"OpOverload\(op='(\w+)\.(\w+)'"))


def _onnx_failure(exc: BaseException) -> tuple[str | None, str]:
    """(the op torch.onnx failed on, as ``ns::name``, or None; the failure in one line)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    op = None
    for pattern in _ONNX_FAILED_OP:
        found = pattern.search(text)
        if found:
            op = f"{found.group(1)}::{found.group(2)}"
            break
    summary = text.split("## Exception summary", 1)[-1].split("\u2b06", 1)[0].strip()
    summary = re.sub(r"^<class '[\w.]+\.(\w+)'>:", r"\1:", summary)
    return op, _one_line(RuntimeError(summary)).removeprefix("RuntimeError: ")


def _graph_ops(program) -> list[str]:
    """Every op the program's graph calls (``ns::name``), in graph order, once each."""
    seen = {}
    for node in program.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            seen.setdefault(node.target._schema.name, None)   # "aten::conv2d", "fastinpaint::..."
    return list(seen)


# ----------------------------------------------------------------------------- torch.export

def to_torch_export(model, example_input, *, size_multiple: int | None = None, backend: str = "reference",
                    verify: bool = True, rtol: float = 1e-4, atol: float = 1e-5):
    """A ``torch.export.ExportedProgram`` of ``model`` (a recipe or an nn.Module, see the module
    doc) with dynamic batch, height and width (H, W multiples of the network's size multiple,
    or of ``size_multiple``). ``example_input``: for a recipe ``(image, mask)`` or ``(image,
    mask, sketch)``, for a module its forward's tensors. ``backend``: "reference" (standard ATen
    ops only) or another fastinpaint backend name ("auto" included) whose kernels the graph
    keeps. ``verify``: run the program at the example's size and at a second size and compare
    with the eager model (``rtol``, ``atol``); a difference raises :class:`ExportError`.

    Save it with ``torch.export.save(program, "model.pt2")``; ``torch.export.load(...).module()``
    runs it. Its least height and width: :func:`least_sides`."""
    if backend not in BACKENDS + ("auto",):
        raise InvalidInputError(f"unknown backend {backend!r}", argument="backend",
                                fix=f"choose one of {', '.join(BACKENDS + ('auto',))}")
    module, multiple = _module_and_multiple(model, size_multiple)
    args = _example_args(example_input, multiple, isinstance(module, InpaintingNetwork))
    program = _export(module, args, multiple, backend)
    if verify:
        _verify(program.module(), module, _check_inputs(args, multiple), rtol, atol,
                "the exported program")
    return program


def least_sides(program) -> tuple[int, int]:
    """The least (H, W) an ExportedProgram of :func:`to_torch_export` takes: from its range
    constraints on the first input's height and width. torch.export specialises a size of 1
    (it traces with sides of at least two multiples), so where a side of one multiple brings a
    feature map to 1 pixel the program takes sides of two multiples and more (DeepFill v2: 16,
    ``tiny_gated``: 8) where the eager model and the ONNX graph take one; a model that
    resamples its input (the Context Encoders) has its own least size."""
    import sympy

    first = program.graph_signature.user_inputs[0]
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == first)
    ranges = program.range_constraints
    sides = []
    for size in node.meta["val"].shape[2:]:
        expr = size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(int(size))
        sides.append(int(expr.subs({s: ranges[s].lower for s in expr.free_symbols if s in ranges})))
    return sides[0], sides[1]


def _export(module: nn.Module, args, multiple: int, backend: str):
    """torch.export of ``module`` with dynamic batch, H and W. Where the model needs narrower
    ranges (a least size, say) the ranges torch.export suggests are taken, as long as every
    dim stays dynamic; a dim the model pins to one value is an error naming it."""
    from torch.export.dynamic_shapes import refine_dynamic_shapes_from_suggested_fixes

    _check_runs(module, args)
    shapes = _dynamic_shapes(args, multiple)
    trace = _trace_args(args, multiple)
    with _eval_mode(module), use_backend(backend), torch.no_grad():
        for attempt in range(4):
            try:
                return torch.export.export(module, trace, dynamic_shapes=shapes, strict=False)
            except UserError:
                raise
            except Exception as e:   # torch.export's errors: data-dependent control flow, an untraceable op, ...
                fixes = _suggested_fixes(e)
                if fixes is None or attempt == 3:
                    raise _capture_error(module, e) from e
                refined = refine_dynamic_shapes_from_suggested_fixes(fixes, shapes)
                pinned = sorted({f"{('batch', '', 'height', 'width')[d]} = {v}" for spec in refined
                                 for d, v in spec.items() if isinstance(v, int)})
                if pinned:
                    raise ExportError(f"{type(module).__name__} cannot take a dynamic batch, height and width: "
                                      f"its trace pins {', '.join(pinned)}", fix="make its forward independent of "
                                      "those sizes (no Python branch on them)") from e
                shapes = refined


def _suggested_fixes(exc: BaseException) -> str | None:
    """The "Suggested fixes:" block of a torch.export constraint violation, or None."""
    text = str(exc)
    if "Suggested fixes:" not in text:
        return None
    lines = [line for line in text.split("Suggested fixes:", 1)[1].splitlines()
             if re.match(r"^\s+\w+ = \S", line)]
    return "Suggested fixes:\n" + "\n".join(lines) if lines else None


def _capture_error(module: nn.Module, exc: BaseException) -> ExportError:
    ops = sorted({f"{m.group(1)}::{m.group(2)}" for m in _OP_NAME.finditer(str(exc))
                  if m.group(1) not in _STANDARD_NAMESPACES + ("torch", "self", "x", "e", "np", "os")
                  and _is_registered_op(m.group(1), m.group(2))})
    op = ops[0] if len(ops) == 1 else None
    where = f" (the op {op})" if op else ""
    return ExportError(f"torch.export cannot capture {type(module).__name__}{where}: {_one_line(exc)}", op=op,
                       fix="make its forward traceable (no data-dependent Python control flow; custom ops "
                           "registered with torch.library and a fake kernel)")


def _is_registered_op(namespace: str, name: str) -> bool:
    try:
        getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _check_inputs(args, multiple: int) -> list[tuple[torch.Tensor, ...]]:
    """The example, and the example resized (nearest: masks stay 0/1) to a second size,
    a multiple taller and wider: a graph that kept a size as a constant fails there."""
    h, w = args[0].shape[2:]
    size = (h + multiple, w + 2 * multiple)
    second = tuple(F.interpolate(t, size=size, mode="nearest") for t in args)
    return [args, second]


@torch.no_grad()
def _verify(run, module: nn.Module, cases, rtol: float, atol: float, what: str) -> float:
    """Max |run(*x) - module(*x)| over ``cases``; raises ExportError beyond rtol/atol."""
    worst = 0.0
    with _eval_mode(module):
        for args in cases:
            expected = module(*args)
            got = run(*args)
            if not isinstance(expected, torch.Tensor) or not isinstance(got, torch.Tensor):
                raise ExportError(f"{what} must return one tensor, got {type(got).__name__}")
            got = got.to(expected.device, expected.dtype)
            if got.shape != expected.shape:
                raise ExportError(f"{what} gives shape {tuple(got.shape)} where the eager model gives "
                                  f"{tuple(expected.shape)} (input {tuple(args[0].shape)})")
            diff = (got - expected).abs()
            bad = ~(diff <= atol + rtol * expected.abs())
            worst = max(worst, float(diff.max()))
            if bool(bad.any()):
                raise ExportError(f"{what} differs from the eager model by up to {float(diff.max()):.3g} at input "
                                  f"{tuple(args[0].shape)} (rtol {rtol:g}, atol {atol:g})",
                                  fix="report it: an op the exporter translates differently")
    return worst


# ----------------------------------------------------------------------------- ONNX

def _require(packages) -> None:
    import importlib.util

    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise ExportError(f"ONNX export needs the package{'s' if len(missing) > 1 else ''} {', '.join(missing)}",
                          argument="format", fix=_FIX_INSTALL)


def _check_opset(opset) -> int:
    import onnx

    top = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= top:
        raise InvalidInputError(f"opset must be an int from {MIN_OPSET} to {top} (the newest this onnx knows), "
                                f"got {opset!r}", argument="opset")
    return opset


def _input_names(module: nn.Module, n: int) -> list[str]:
    import inspect

    params = [p.name for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return params[:n] if len(params) >= n else [f"input_{i}" for i in range(n)]


def _nonstandard_nodes(graph, found: list) -> None:
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            found.append(f"{node.domain}::{node.op_type}")
        for attr in node.attribute:   # subgraphs of If / Loop / Scan
            if attr.g is not None and attr.g.node:
                _nonstandard_nodes(attr.g, found)
            for g in attr.graphs:
                _nonstandard_nodes(g, found)


def to_onnx(model, example_input, path, opset: int = 18, *, size_multiple: int | None = None,
            verify: bool = True, rtol: float = 1e-3, atol: float = 1e-4) -> Path:
    """Write ``model`` (a recipe or an nn.Module, see the module doc) to the ONNX file ``path``
    (``.onnx``) at ``opset`` (>= 18), with dynamic batch, height and width (the dims named
    ``batch``, ``height``, ``width``), fastinpaint's ops in their reference formulation
    and only standard ONNX operators. ``verify`` (needs ``onnxruntime``): the file is run by
    onnxruntime at the example's size and at a second size and compared with the eager model
    (``rtol``, ``atol``). Nothing is written unless every check passes. Returns ``path``.

    A model that cannot be exported raises :class:`ExportError`, naming the op at fault."""
    _require(_ONNX_PACKAGES + (("onnxruntime",) if verify else ()))
    opset = _check_opset(opset)
    path = Path(path)
    if path.suffix.lower() != ".onnx":
        raise InvalidInputError(f"{path} does not end in .onnx", argument="path", fix="name the file *.onnx")
    if path.is_dir():
        raise InvalidInputError(f"{path} is a folder", argument="path", fix="give a file name ending in .onnx")
    module, multiple = _module_and_multiple(model, size_multiple)
    args = _example_args(example_input, multiple, isinstance(module, InpaintingNetwork))
    program = _export(module, args, multiple, "reference")
    foreign = [op for op in _graph_ops(program) if op.split("::")[0] not in _STANDARD_NAMESPACES]
    if foreign:
        raise ExportError(f"{type(module).__name__} uses the op {foreign[0]}, which has no ONNX translation"
                          + (f" (also: {', '.join(foreign[1:])})" if len(foreign) > 1 else ""),
                          op=foreign[0], fix="give it a formulation in standard torch ops for export, or register "
                                             "an ONNX translation (torch.onnx.export's custom_translation_table)")
    proto = _onnx_proto(module, program, args, opset)

    def write(tmp):
        import onnx

        onnx.save_model(proto, str(tmp))
        if verify:
            verify_onnx(tmp, module, _check_inputs(args, multiple), rtol=rtol, atol=atol)

    _write_atomically(path, write)
    return path


def _onnx_proto(module: nn.Module, program, args, opset: int):
    """The ONNX ModelProto of ``program``: local functions inlined, standard operators only."""
    import logging
    import warnings

    import onnx

    names = _input_names(module, len(args))
    quiet = logging.getLogger("torch.onnx")   # its notes on optional packages (torchvision's ops) it skips
    level = quiet.level
    try:
        quiet.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(program, args, dynamo=True, opset_version=opset, input_names=names,
                                             output_names=["output"], optimize=True, verbose=False)
    except Exception as e:
        op, summary = _onnx_failure(e)
        where = f" at the op {op}" if op else ""
        raise ExportError(f"torch.onnx cannot translate {type(module).__name__}{where}: {summary}", op=op,
                          fix="use an op torch.onnx translates, or register an ONNX translation for it "
                              "(torch.onnx.export's custom_translation_table)") from e
    finally:
        quiet.setLevel(level)
    proto = onnx_program.model_proto
    _name_dynamic_dims(proto)
    if proto.functions:
        proto = onnx.inliner.inline_local_functions(proto)
    found: list[str] = []
    _nonstandard_nodes(proto.graph, found)
    if found:
        found = list(dict.fromkeys(found))
        raise ExportError(f"the ONNX graph of {type(module).__name__} holds the non-standard operator {found[0]}"
                          + (f" (also: {', '.join(found[1:])})" if len(found) > 1 else ""), op=found[0],
                          fix="report it: fastinpaint exports standard ONNX operators only")
    onnx.checker.check_model(proto)
    return proto


def _name_dynamic_dims(proto) -> None:
    """Call the first input's dynamic dims ``batch``, ``height`` and ``width`` (the exporter
    names them after its symbols, e.g. ``s31``, ``8*s78``) wherever they appear."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    rename = {dims[i].dim_param: name for i, name in ((0, "batch"), (2, "height"), (3, "width"))
              if dims[i].dim_param}
    for value in list(proto.graph.input) + list(proto.graph.output) + list(proto.graph.value_info):
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param in rename:
                d.dim_param = rename[d.dim_param]


def verify_onnx(path, model, inputs, *, rtol: float = 1e-3, atol: float = 1e-4) -> float:
    """Run the ONNX file ``path`` with onnxruntime (CPU) on each tuple of ``inputs`` and compare
    with ``model`` (a recipe or an nn.Module) run eagerly; raises :class:`ExportError` beyond
    ``rtol``/``atol``, else returns the largest absolute difference."""
    _require(("onnxruntime",))
    import onnxruntime

    module = InpaintingNetwork(model) if _is_recipe(model) else model
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(*args):
        feed = {n: t.detach().cpu().float().numpy() for n, t in zip(names, args)}
        return torch.from_numpy(session.run(None, feed)[0])

    cases = [inputs] if isinstance(inputs, torch.Tensor) else [
        (case,) if isinstance(case, torch.Tensor) else tuple(case) for case in inputs]
    return _verify(run, module, cases, rtol, atol, f"the ONNX model {Path(path).name} (onnxruntime)")


# ----------------------------------------------------------------------------- a trained run

def example_input(recipe, size: int | None = None, batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``(image, mask[, sketch])`` for ``recipe``: a random image in [-1, 1] with a rectangular
    hole, ``size`` x ``size`` (default: the recipe's ``default_size``, else 64) rounded up to
    its size multiple; a sketch of random strokes in the hole for a guided recipe."""
    multiple = _positive_multiple(getattr(recipe, "size_multiple", 1), "model.size_multiple")
    size = getattr(recipe, "default_size", 64) if size is None else size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InvalidInputError(f"size must be a positive int, got {size!r}", argument="size")
    size = -(-size // multiple) * multiple
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    mask = torch.zeros(batch, 1, size, size)
    mask[..., size // 4: size // 4 + max(1, size // 2), size // 3: size // 3 + max(1, size // 2)] = 1
    if not getattr(recipe, "guided", False):
        return image, mask
    sketch = (torch.rand(batch, 1, size, size, generator=g) > 0.9).float() * mask
    return image, mask, sketch


def export_checkpoint(checkpoint, out, format: str, *, ema: bool = False, opset: int = 18, report=None,
                      model: str | None = None, model_options: dict | None = None, overwrite: bool = False) -> Path:
    """Export the generator of a trained run (a run folder, its ``weights.safetensors`` or a
    ``checkpoints/ckpt_*.pt``; ``ema``: its EMA weights; or, with ``model`` and
    ``model_options``, another project's checkpoint: see
    :func:`fastinpaint.inpaint.load_generator`) to ``out``: ``format`` "onnx" (an
    ``.onnx`` file, verified with onnxruntime) or "pt2" (a ``.pt2`` file of
    ``torch.export.save``, verified against the eager model). The exported signature is
    :class:`InpaintingNetwork`'s. Errors name the argument (``checkpoint``, ``format``,
    ``out``, ``ema``, ``opset``); ``report(line)`` (optional) gets what was written. An
    existing ``out`` is refused (before any work) unless ``overwrite``."""
    from .errors import OutputExistsError
    from .inpaint import load_generator

    if format not in FORMATS:
        raise InvalidInputError(f"unknown format {format!r}", argument="format",
                                fix=f"choose one of {', '.join(FORMATS)}")
    out = Path(out)
    want = FORMATS[format]
    suffix = out.suffix.lower()
    if suffix != want:
        what = "has no extension" if not suffix else f"ends in {out.suffix!r}"
        other = [f for f, e in FORMATS.items() if e == suffix]
        raise InvalidInputError(f"{out} {what}, but --format {format} writes a {want} file", argument="out",
                                fix=f"name it *{want}" + (f", or give --format {other[0]}" if other else ""))
    if out.is_dir():
        raise InvalidInputError(f"{out} is a folder", argument="out", fix=f"give a file name ending in {want}")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} exists", argument="out", fix="add --overwrite to replace it, or give another --out")
    if format == "onnx":
        _require(_ONNX_PACKAGES + ("onnxruntime",))
        _check_opset(opset)
    recipe, _ = load_generator(checkpoint, ema=ema, device="cpu", model=model, model_options=model_options)
    example = example_input(recipe)
    try:
        if format == "onnx":
            to_onnx(recipe, example, out, opset)
        else:
            program = to_torch_export(recipe, example)
            _write_atomically(out, lambda tmp: torch.export.save(program, str(tmp)))
    except ExportError as e:   # the model is the checkpoint's
        raise ExportError(f"the generator of {checkpoint}: {e.message}", op=e.op, argument="checkpoint",
                          fix=e.fix) from e
    if report is not None:
        names = ["image", "mask"] + (["sketch"] if len(example) == 3 else [])
        multiple = getattr(recipe, "size_multiple", 1)
        sides = "any H and W" if multiple == 1 else f"H and W multiples of {multiple}"
        if format != "onnx":
            least = least_sides(program)
            sides += f", at least {least[0]}x{least[1]}"
        checked = "onnxruntime" if format == "onnx" else "the exported program"
        report(f"wrote {out} ({format}): ({', '.join(names)}) -> output, any batch, {sides}; {checked} matches the "
               f"eager generator at {example[0].shape[2]}x{example[0].shape[3]} and one more size")
    return out


def _write_atomically(path: Path, write) -> None:
    """``write(tmp)`` to a temporary file beside ``path`` (same extension), then rename it to ``path``."""
    os.makedirs(path.parent, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
