"""fastinpaint.export: every registered model through torch.export and ONNX, run at sizes
and batches other than the example's and compared with the eager model (fastinpaint's
kernels); the graphs hold standard ops only; the export command; and the mistakes, an op
that cannot be exported among them, named."""

import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn

from fastinpaint import cli
from fastinpaint.errors import InvalidInputError
from fastinpaint.export import ExportError, InpaintingNetwork, least_sides, to_onnx, to_torch_export
from fastinpaint.models import MODELS, build_model
from fastinpaint.nn import GatedConv2d

# every registered model, small enough to export in seconds (the options each recipe takes)
CASES = [
    ("tiny_gated", {"width": 4}),
    ("context_encoder", {"image_size": 32, "width": 4, "loss_weights": {"adv": 0}}),
    ("context_encoder", {"image_size": 64, "width": 4, "output": "full", "loss_weights": {"adv": 0}}),
    ("context_encoder_features", {"image_size": 67, "width": 8}),
    pytest.param("deepfill_v2", {"cnum": 8, "loss_weights": {"adv": 0}}, marks=pytest.mark.slow),
    pytest.param("deepfill_v2", {"cnum": 8, "guided": True, "attention_masking": "exclude", "loss_weights": {"adv": 0}},
                 marks=pytest.mark.slow),
    ("dgii", {"width": 4}),
]
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in opts.items() if k != 'loss_weights')}"
       for name, opts in (c.values if hasattr(c, "values") else c for c in CASES)]


def test_every_registered_model_is_covered():
    assert {(c.values if hasattr(c, "values") else c)[0] for c in CASES} == set(MODELS)


def _sizes(multiple: int):
    """(batch, height, width): the example's, then two others (one the Context Encoders'
    own image_size 32, where their eager forward takes its no-resampling branch)."""
    if multiple == 1:
        return [(2, 37, 45), (1, 32, 32), (3, 50, 29)]
    return [(2, 3 * multiple, 5 * multiple), (1, 5 * multiple, 2 * multiple), (3, 7 * multiple, 6 * multiple)]


def _inputs(recipe, batch, h, w, seed=0):
    """A random image in [-1, 1] and a different rectangular hole per sample (a sketch in it for
    a guided recipe)."""
    g = torch.Generator().manual_seed(seed + 1000 * h + w)
    image = torch.rand(batch, 3, h, w, generator=g) * 2 - 1
    mask = torch.zeros(batch, 1, h, w)
    for b in range(batch):
        top, left = (int(torch.randint(0, max(1, h // 2), (1,), generator=g)) for _ in range(2))
        mask[b, :, top:top + max(1, h // 3), left // 2 + w // 4: left // 2 + w // 4 + max(1, w // 3)] = 1
    if not getattr(recipe, "guided", False):
        return image, mask
    return image, mask, (torch.rand(batch, 1, h, w, generator=g) > 0.8).float() * mask


def _graph_namespaces(program):
    return {node.target.namespace for node in program.graph.nodes
            if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)}


@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_torch_export_matches_eager_at_other_sizes(name, options):
    recipe = build_model(name, **options)
    net = InpaintingNetwork(recipe).eval()
    sizes = _sizes(recipe.size_multiple)
    program = to_torch_export(recipe, _inputs(recipe, *sizes[0]))
    assert _graph_namespaces(program) <= {"aten"}   # fastinpaint's ops in their reference formulation
    assert not recipe.generator.training            # the mode it had (eval, from net) is kept
    run = program.module()
    least = least_sides(program)   # and the program runs there
    m = recipe.size_multiple
    if m > 1:   # one multiple, or two where a side of 1 pixel deep inside is specialised
        assert all(s in (m, 2 * m) for s in least), least
    for batch, h, w in sizes + [(1, *least)]:
        x = _inputs(recipe, batch, h, w, seed=1)
        with torch.no_grad():
            expected = net(*x)                      # eager, on fastinpaint's kernels (auto backend)
        got = run(*x)
        assert got.shape == (batch, 3, h, w)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_onnx_matches_eager_at_other_sizes(name, options, tmp_path):
    recipe = build_model(name, **options)
    net = InpaintingNetwork(recipe).eval()
    sizes = _sizes(recipe.size_multiple)
    path = to_onnx(recipe, _inputs(recipe, *sizes[0]), tmp_path / "model.onnx")
    assert path == tmp_path / "model.onnx" and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    model = onnx.load(str(path))
    assert {n.domain for n in model.graph.node} <= {""} and not model.functions
    assert model.opset_import[0].version == 18
    names = ["image", "mask"] + (["sketch"] if options.get("guided") else [])
    assert [i.name for i in model.graph.input] == names
    for i in model.graph.input:   # batch, H, W symbolic; channels fixed
        dims = i.type.tensor_type.shape.dim
        assert [bool(d.dim_param) for d in dims] == [True, False, True, True], (i.name, dims)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, h, w in sizes:
        x = _inputs(recipe, batch, h, w, seed=2)
        with torch.no_grad():
            expected = net(*x)
        got = session.run(None, {n: t.numpy() for n, t in zip(names, x)})[0]
        assert got.shape == (batch, 3, h, w)
        torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-3, atol=1e-4)


def test_a_module_exports_its_own_forward_at_its_size_multiple(tmp_path):
    recipe = build_model("tiny_gated", width=4)
    gen = recipe.generator.eval()                         # TinyGatedGenerator: multiple = 4, prepared input
    x = recipe.prepare_input(*_inputs(recipe, 1, 12, 16))
    program = to_torch_export(gen, x)
    path = to_onnx(gen, x, tmp_path / "g.onnx")
    assert [i.name for i in onnx.load(str(path)).graph.input] == ["x"]
    y = recipe.prepare_input(*_inputs(recipe, 2, 20, 8))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(y), gen(y), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(_run_ort(path, (y,)), gen(y), rtol=1e-3, atol=1e-4)
    with pytest.raises(InvalidInputError, match="multiples of 4") as info:
        to_torch_export(gen, recipe.prepare_input(*_inputs(recipe, 1, 10, 16)))   # 10 is no multiple of 4
    assert info.value.argument == "example_input"
    with pytest.raises(InvalidInputError, match="multiples of 8") as info:   # size_multiple overrides the module's
        to_torch_export(gen, x, size_multiple=8)
    assert info.value.argument == "example_input"


def test_backend_auto_keeps_fastinpaints_kernels():
    recipe = build_model("tiny_gated", width=4)
    x = _inputs(recipe, 2, 12, 20)
    program = to_torch_export(recipe, x, backend="auto")
    if _graph_namespaces(program) <= {"aten"}:
        pytest.skip("no fastinpaint kernel backs the gated convolution here (auto picked reference)")
    assert "fastinpaint" in _graph_namespaces(program)
    y = _inputs(recipe, 1, 28, 8)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(*y), InpaintingNetwork(recipe).eval()(*y))


@pytest.mark.slow
def test_backend_auto_exports_deepfill_running_channels_last_inside():
    """DeepFill v2 exported with backend="auto" on the CPU: the program holds the networks'
    conversion to channels_last (dynamic height and width) and gives the module's NCHW output
    at other sizes."""
    recipe = build_model("deepfill_v2", cnum=8, loss_weights={"adv": 0})
    program = to_torch_export(recipe, _inputs(recipe, 1, 32, 40), backend="auto")
    if _graph_namespaces(program) <= {"aten"}:
        pytest.skip("no fastinpaint kernel backs the gated convolution here (auto picked reference)")
    assert any(n.op == "call_function" and n.kwargs.get("memory_format") == torch.channels_last
               for n in program.graph.nodes)
    for h, w in ((48, 24), (16, 16)):
        y = _inputs(recipe, 1, h, w)
        with torch.no_grad():
            want = InpaintingNetwork(recipe).eval()(*y)
            got = program.module()(*y)
        assert got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- ops that cannot be exported

@torch.library.custom_op("fastinpaint_test::swirl", mutates_args=())
def _swirl(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1) * 0.5 + x


@_swirl.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("fastinpaint_test::opaque", mutates_args=())
def _opaque(x: torch.Tensor) -> torch.Tensor:   # no fake kernel: torch.export cannot trace it
    return x + 1


class _Net(nn.Module):
    size_multiple = 4

    def __init__(self, tail):
        super().__init__()
        self.conv = GatedConv2d(3, 3, 3)
        self.tail = tail

    def forward(self, x):
        return self.tail(self.conv(x))


def test_an_op_with_no_onnx_translation_is_named_and_nothing_is_written(tmp_path):
    net = _Net(_swirl)
    x = torch.rand(1, 3, 8, 12)
    with pytest.raises(ExportError, match="fastinpaint_test::swirl") as info:
        to_onnx(net, x, tmp_path / "net.onnx")
    assert info.value.op == "fastinpaint_test::swirl"
    assert "\n" not in str(info.value)
    assert not list(tmp_path.iterdir())
    # a torch.export program may hold it (it runs where the op is registered)
    program = to_torch_export(net, x)
    assert "fastinpaint_test" in _graph_namespaces(program)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), net(x))


def test_an_op_torch_export_cannot_trace_is_named():
    with pytest.raises(ExportError, match="fastinpaint_test::opaque") as info:
        to_torch_export(_Net(_opaque), torch.rand(1, 3, 8, 8))
    assert info.value.op == "fastinpaint_test::opaque"


def test_an_aten_op_torch_onnx_cannot_translate_is_named(tmp_path):
    net = _Net(lambda y: torch.linalg.svd(y.flatten(2)).S.sum(-1, keepdim=True)[..., None, None] * y)
    with pytest.raises(ExportError) as info:
        to_onnx(net, torch.rand(1, 3, 8, 8), tmp_path / "net.onnx")
    assert info.value.op is not None and "svd" in info.value.op, str(info.value)
    assert info.value.op in str(info.value)
    assert not list(tmp_path.iterdir())


def test_data_dependent_control_flow_is_a_clear_error():
    net = _Net(lambda y: y * 2 if float(y.mean()) > 0 else y)
    with pytest.raises(ExportError, match="torch.export cannot capture _Net") as info:
        to_torch_export(net, torch.rand(1, 3, 8, 8))
    assert info.value.op is None and "\n" not in str(info.value)


def test_wrong_arguments_name_themselves(tmp_path):
    recipe = build_model("tiny_gated", width=4)
    image, mask = _inputs(recipe, 1, 8, 8)
    cases = [
        (lambda: to_torch_export(recipe, image), "example_input"),           # a recipe takes (image, mask)
        (lambda: to_torch_export(recipe, (image, mask[..., :4])), "example_input"),
        (lambda: to_torch_export(recipe, (image.long(), mask)), "example_input"),
        (lambda: to_torch_export(recipe, (image, mask, mask)), "example_input"),   # a sketch, but not guided
        (lambda: to_torch_export(nn.Conv2d(4, 3, 1), image), "example_input"),     # 3 channels for 4
        (lambda: to_torch_export(_Net(lambda y: (y, y)), image), "model"),          # two outputs
        (lambda: to_torch_export("tiny_gated", (image, mask)), "model"),
        (lambda: to_onnx(recipe, (image, mask), tmp_path / "m.pt2"), "path"),
        (lambda: to_onnx(recipe, (image, mask), tmp_path / "m.onnx", opset=17), "opset"),
        (lambda: to_torch_export(recipe, (image, mask), size_multiple=0), "size_multiple"),
        (lambda: to_torch_export(recipe, (image, mask), backend="fast"), "backend"),
    ]
    for call, argument in cases:
        with pytest.raises(InvalidInputError) as info:
            call()
        assert info.value.argument == argument, (argument, info.value)
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- the command

def _run_ort(path, inputs):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)})[0])


def test_export_command_on_a_trained_run(tiny_run, tmp_path, capsys):
    from fastinpaint.inpaint import load_generator

    recipe, _ = load_generator(tiny_run)
    net = InpaintingNetwork(recipe).eval()
    assert cli.main(["export", "--checkpoint", str(tiny_run), "--format", "onnx", "--out",
                     str(tmp_path / "out" / "tiny.onnx")]) == 0
    assert cli.main(["export", "--checkpoint", str(tiny_run / "weights.safetensors"), "--format", "pt2", "--out",
                     str(tmp_path / "tiny.pt2")]) == 0
    printed = capsys.readouterr().out
    assert "tiny.onnx (onnx): (image, mask) -> output" in printed and "multiples of 4" in printed
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["tiny.onnx", "tiny.pt2"]
    again = ["export", "--checkpoint", str(tiny_run), "--format", "pt2", "--out", str(tmp_path / "tiny.pt2")]
    assert cli.main(again) == 2                      # an existing file is kept...
    assert cli.main(again + ["--overwrite"]) == 0    # ...unless --overwrite
    program = torch.export.load(str(tmp_path / "tiny.pt2")).module()
    for batch, h, w in ((1, 36, 20), (3, 12, 44)):
        x = _inputs(recipe, batch, h, w)
        with torch.no_grad():
            expected = net(*x)
        torch.testing.assert_close(_run_ort(tmp_path / "out" / "tiny.onnx", x), expected, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(program(*x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_export_command_on_a_guided_deepfill_run(tmp_path, capsys):
    """Any recipe's generator: a guided DeepFill v2 run's weights file (its sketch is an input)."""
    from fastinpaint.inpaint import load_generator
    from fastinpaint.train.checkpoint import save_weights

    options = {"cnum": 8, "guided": True}
    recipe = build_model("deepfill_v2", **options, loss_weights={"adv": 0})
    config = {"model": "deepfill_v2", "model_options": options, "loss_weights": {"adv": 0}}
    save_weights(tmp_path / "run" / "weights.safetensors", recipe.generator.state_dict(),
                 {"config": json.dumps(config), "weights": "generator"})
    out = tmp_path / "deepfill.pt2"
    assert cli.main(["export", "--checkpoint", str(tmp_path / "run"), "--format", "pt2", "--out", str(out)]) == 0
    assert "(image, mask, sketch) -> output" in capsys.readouterr().out
    loaded, _ = load_generator(tmp_path / "run")
    program = torch.export.load(str(out)).module()
    for batch, h, w in ((2, 24, 40), (1, 48, 16)):
        x = _inputs(loaded, batch, h, w)
        assert len(x) == 3
        with torch.no_grad():
            expected = InpaintingNetwork(loaded).eval()(*x)
        torch.testing.assert_close(program(*x), expected, rtol=1e-4, atol=1e-5)


EXPORT_ERRORS = [
    # (argv changes, the option named, words the line must hold)
    ({"--checkpoint": "{missing}"}, "--checkpoint", ["does not exist", "run folder"]),
    ({"--checkpoint": "{photo}"}, "--checkpoint", ["not a checkpoint"]),
    ({"--format": "tflite"}, "--format", ["unknown format 'tflite'", "onnx, pt2"]),
    ({"--out": "{tmp}/model.pt2"}, "--out", ["ends in '.pt2'", "--format onnx writes a .onnx file",
                                             "--format pt2"]),
    ({"--out": "{tmp}/model"}, "--out", ["has no extension", ".onnx"]),
    ({"--out": "{tmp}/folder.onnx"}, "--out", ["is a folder"]),
    ({"--out": "{tmp}/existing.onnx"}, "--out", ["exists", "--overwrite"]),   # a second run into the same file
    ({"--opset": "12"}, "--opset", ["from 18"]),
    ({"--ema": None}, "--ema", ["without EMA"]),
]


@pytest.mark.parametrize("wrong,flag,words", EXPORT_ERRORS, ids=[f"{f}-{i}" for i, (_, f, _) in
                                                                  enumerate(EXPORT_ERRORS)])
def test_export_mistakes_are_one_line_naming_the_option(tiny_run, tmp_path, capsys, wrong, flag, words):
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "photo.png")
    (tmp_path / "folder.onnx").mkdir()
    (tmp_path / "existing.onnx").write_bytes(b"an earlier export")
    args = {"--checkpoint": str(tiny_run), "--format": "onnx", "--out": str(tmp_path / "model.onnx"), **wrong}
    names = {"missing": tmp_path / "missing", "photo": tmp_path / "photo.png", "tmp": tmp_path}
    argv = ["export"]
    for key, value in args.items():
        argv += [key] if value is None else [key, value.format(**names)]
    before = sorted(tmp_path.rglob("*"))
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"fastinpaint export: {flag}: "), err
    for word in words:
        assert word in err, (word, err)
    assert sorted(tmp_path.rglob("*")) == before   # nothing written
