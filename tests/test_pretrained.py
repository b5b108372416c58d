"""Pretrained weights: checkpoints of the DeepFill v2 PyTorch port (built here in its layout,
random values) taken by ``inpaint``, ``convert`` and ``train --init``; fine-tuning from them
and from fastinpaint's own runs; the guided generator from unguided weights; inpainting with a
user's sketch; and every wrong file refused in one line."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deepfill_port import PORT_GENERATOR_KEYS, REAL_PORT_KEYS, port_checkpoint, port_generator_state, port_key
from fastinpaint import cli
from fastinpaint.errors import InvalidInputError
from fastinpaint.inpaint import inpaint_array, load_generator
from fastinpaint.models import DeepFillV2Generator, SNPatchGANDiscriminator, build_model, convert_port_state_dict
from fastinpaint.models.deepfill_v2 import FASTINPAINT_LAYOUT, PORT_LAYOUT, convert_port_checkpoint
from fastinpaint.train import load_config
from fastinpaint.train.checkpoint import list_checkpoints, load_checkpoint, load_weights, weights_metadata
from fastinpaint.weights import load_into, read_weights

FINETUNE = Path(__file__).resolve().parents[1] / "fastinpaint" / "configs" / "deepfill_v2_finetune.toml"
# a DeepFill v2 training run small enough for seconds on a CPU
SMALL = ["--data", "demo", "--set", "size=32", "--set", "batch_size=2", "--set", "samples_per_epoch=8",
         "--set", "val_batches=1", "--set", "val_every=100", "--set", "checkpoint_every=100", "--set", "log_every=1",
         "--set", "device=cpu", "--set", "model_options.cnum=8", "--set", "model_options.disc_cnum=4",
         "--set", "mask_options.min_width=3", "--set", "mask_options.max_width=8"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny networks: one intra-op thread runs them faster than a team that spin-waits for
    cores shared with other processes."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def port_file(tmp_path_factory):
    """A port checkpoint (``{"G", "D", "G_optim", "D_optim", "n_iter"}``, ``module.`` prefixes) of
    a cnum-8 generator and a width-4 discriminator."""
    path = tmp_path_factory.mktemp("port") / "states_port.pth"
    torch.save(port_checkpoint(DeepFillV2Generator(cnum=8), SNPatchGANDiscriminator(4), seed=3), path)
    return path


def _photo(folder: Path, name: str = "photo", h: int = 27, w: int = 37, seed: int = 0):
    """A random RGB image and a rectangular hole (odd sizes: padded to 8 inside), as files."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    hole = np.zeros((h, w), bool)
    hole[h // 4: 3 * h // 4, w // 5: 4 * w // 5] = True
    Image.fromarray(img).save(folder / f"{name}.png")
    Image.fromarray(hole.astype(np.uint8) * 255).save(folder / f"{name}_mask.png")
    return img, hole


def _inpaint(checkpoint, folder: Path, out: Path, *extra, name: str = "photo") -> np.ndarray:
    code = cli.main(["inpaint", "--checkpoint", str(checkpoint), "--image", str(folder / f"{name}.png"),
                     "--mask", str(folder / f"{name}_mask.png"), "--out", str(out), *extra])
    assert code == 0
    return np.asarray(Image.open(out))


def _one_line_error(capsys, command: str, flag: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"fastinpaint {command}: {flag}"), err
    return err


def _ported(path) -> dict:
    """The generator state of a port file, renamed by hand with the documented mapping."""
    return convert_port_state_dict(torch.load(path, weights_only=True))


# ----------------------------------------------------------------------------- the port's layout

def test_port_layout_both_ways_on_the_ports_own_names():
    ours = DeepFillV2Generator()   # cnum 48, as the published weights
    port = port_generator_state(ours)
    assert len(port) == PORT_GENERATOR_KEYS == len(ours.state_dict())
    for name, (shape, mine) in REAL_PORT_KEYS.items():   # the helper builds the port's names and shapes
        assert tuple(port[name].shape) == shape, name
        assert tuple(ours.state_dict()[mine].shape) == shape, mine
    # the mapping on the port's own names, prefixed as DataParallel saves them
    real = {"module." + name: torch.full(shape, float(i))
            for i, (name, (shape, _)) in enumerate(REAL_PORT_KEYS.items())}
    converted = convert_port_state_dict({"G": real, "D": {}})
    assert set(converted) == {mine for _, mine in REAL_PORT_KEYS.values()}
    for i, (name, (_, mine)) in enumerate(REAL_PORT_KEYS.items()):
        assert torch.equal(converted[mine], real["module." + name]) and float(converted[mine].flatten()[0]) == i
    # the layout is recognised from the keys: the port's, or fastinpaint's (kept as it is)
    layout, g, d = convert_port_checkpoint({"G": port, "D": {"conv1.conv_sn.bias": torch.zeros(2)}})
    assert layout == PORT_LAYOUT and set(g) == set(ours.state_dict()) and set(d) == {"conv1.conv_sn.bias"}
    assert all(torch.equal(g[k], port[port_key(k)]) for k in g)
    layout, g, d = convert_port_checkpoint({"_orig_mod." + k: v for k, v in ours.state_dict().items()})
    assert layout == FASTINPAINT_LAYOUT and d is None
    assert all(torch.equal(g[k], v) for k, v in ours.state_dict().items())
    with pytest.raises(ValueError, match="dict"):
        convert_port_checkpoint([1, 2])


# ----------------------------------------------------------------------------- inpaint and convert

@pytest.mark.parametrize("form", ["checkpoint", "bare state dict"])
def test_inpaint_command_with_a_port_checkpoint_equals_the_python_api(tmp_path, form):
    net = DeepFillV2Generator(cnum=8)
    ckpt = port_checkpoint(net, SNPatchGANDiscriminator(4), seed=7) if form == "checkpoint" else \
        port_generator_state(net, seed=7)
    torch.save(ckpt, tmp_path / "port.pth")
    img, hole = _photo(tmp_path)
    got = _inpaint(tmp_path / "port.pth", tmp_path, tmp_path / "out.png", "--model", "deepfill_v2",
                   "--model-option", "cnum=8")
    # the Python API on the same weights: the port's state renamed and loaded by hand
    recipe = build_model("deepfill_v2", cnum=8)
    recipe.generator.load_state_dict(_ported(tmp_path / "port.pth"))
    want = inpaint_array(recipe, recipe.generator.eval(), img, hole)
    assert np.array_equal(got, want)
    assert np.array_equal(got[~hole], img[~hole]) and not np.array_equal(got[hole], img[hole])
    # load_generator: the same weights, the masking the port's weights were trained with by default
    _, g = load_generator(tmp_path / "port.pth", model="deepfill_v2", model_options={"cnum": 8})
    assert g.stage2.contextual_attention.masking == "official" and not g.training
    assert all(torch.equal(v, recipe.generator.state_dict()[k]) for k, v in g.state_dict().items())
    _, g = load_generator(tmp_path / "port.pth", model="deepfill_v2",
                          model_options={"cnum": 8, "attention_masking": "exclude"})
    assert g.stage2.contextual_attention.masking == "exclude"


def test_convert_writes_weights_that_every_command_takes(port_file, tmp_path, capsys):
    out = tmp_path / "places.safetensors"
    assert cli.main(["convert", str(port_file), "--model", "deepfill_v2", "--model-option", "cnum=8",
                     "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    meta = weights_metadata(out)
    assert json.loads(meta["config"]) == {"model": "deepfill_v2",
                                          "model_options": {"attention_masking": "official", "cnum": 8}}
    assert meta["layout"] == PORT_LAYOUT and meta["source"] == port_file.name
    want = _ported(port_file)
    got = load_weights(out)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    # inpaint takes it with no --model, as a trained run's weights, and fills as the port file does
    _photo(tmp_path)
    a = _inpaint(out, tmp_path, tmp_path / "a.png")
    b = _inpaint(port_file, tmp_path, tmp_path / "b.png", "--model", "deepfill_v2", "--model-option", "cnum=8")
    assert np.array_equal(a, b)
    # a fastinpaint file converts too (its own config kept), and --model-option overrides it
    again = tmp_path / "again.safetensors"
    assert cli.main(["convert", str(out), "--model-option", "attention_masking=exclude", "--out", str(again)]) == 0
    assert json.loads(weights_metadata(again)["config"])["model_options"] == {"attention_masking": "exclude",
                                                                               "cnum": 8}
    assert load_generator(again)[1].stage2.contextual_attention.masking == "exclude"
    # an existing file is kept unless --overwrite
    before = again.read_bytes()
    capsys.readouterr()
    assert cli.main(["convert", str(out), "--out", str(again)]) == 2
    err = _one_line_error(capsys, "convert", "--out: ")
    assert "already exists" in err and "--overwrite" in err and again.read_bytes() == before
    assert cli.main(["convert", str(out), "--out", str(again), "--overwrite"]) == 0
    assert json.loads(weights_metadata(again)["config"])["model_options"] == {"attention_masking": "official",
                                                                               "cnum": 8}


def test_evaluate_and_export_take_a_port_checkpoint_with_model(port_file, tmp_path, capsys):
    """evaluate and export have inpaint's --model / --model-option: the port's file scores and
    exports as its converted weights do."""
    images = tmp_path / "images"
    images.mkdir()
    for i, (h, w) in enumerate([(27, 37), (32, 24)]):
        _photo(images, f"img{i}", h, w, seed=i)
        (images / f"img{i}_mask.png").unlink()
    converted = tmp_path / "port.safetensors"
    assert cli.main(["convert", str(port_file), "--model", "deepfill_v2", "--model-option", "cnum=8",
                     "--out", str(converted)]) == 0
    options = ["--model", "deepfill_v2", "--model-option", "cnum=8"]
    capsys.readouterr()
    assert cli.main(["evaluate", "--checkpoint", str(port_file), "--data", str(images), "--masks", "center",
                     "--lpips", "no", "--fid", "no", "--out", str(tmp_path / "a")]) == 2
    err = _one_line_error(capsys, "evaluate", "--checkpoint: ")
    assert "--model deepfill_v2" in err   # the advice given ...
    summaries = []
    for name, checkpoint, extra in (("a", port_file, options), ("b", converted, [])):   # ... works
        assert cli.main(["evaluate", "--checkpoint", str(checkpoint), *extra, "--data", str(images), "--masks",
                         "center", "--lpips", "no", "--fid", "no", "--out", str(tmp_path / name)]) == 0
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        summaries.append(summary["methods"][str(checkpoint)])
    assert summaries[0] == summaries[1] and summaries[0]["images"] == 2
    out = tmp_path / "port.pt2"
    assert cli.main(["export", "--checkpoint", str(port_file), *options, "--format", "pt2", "--out", str(out)]) == 0
    recipe, g = load_generator(converted)
    image, mask = torch.rand(1, 3, 32, 40) * 2 - 1, (torch.rand(1, 1, 32, 40) > 0.7).float()
    with torch.no_grad():
        want = recipe.final_output(g(recipe.prepare_input(image, mask)))
    torch.testing.assert_close(torch.export.load(str(out)).module()(image, mask), want, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- wrong files

@pytest.fixture(scope="module")
def renamed_file(port_file, tmp_path_factory):
    """A port checkpoint with one layer of another name: no known layout."""
    ckpt = torch.load(port_file, weights_only=True)
    for suffix in ("weight", "bias"):
        ckpt["G"][f"module.stage1.conv_first.conv.{suffix}"] = ckpt["G"].pop(f"module.stage1.conv1.conv.{suffix}")
    path = tmp_path_factory.mktemp("renamed") / "renamed.pth"
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("command", ["inpaint", "convert", "train"])
def test_a_file_of_no_known_layout_is_named_with_its_first_missing_and_unexpected_keys(renamed_file, tmp_path,
                                                                                        capsys, command):
    _photo(tmp_path)
    options = ["--model", "deepfill_v2", "--model-option", "cnum=8"]
    argv, flag = {
        "inpaint": (["inpaint", "--checkpoint", str(renamed_file), "--image", str(tmp_path / "photo.png"), "--mask",
                     str(tmp_path / "photo_mask.png"), "--out", str(tmp_path / "out.png"), *options], "--checkpoint"),
        "convert": (["convert", str(renamed_file), "--out", str(tmp_path / "w.safetensors"), *options], "weights"),
        "train": (["train", "--model", "deepfill_v2", "--init", str(renamed_file), "--steps", "1", "--out",
                   str(tmp_path / "run"), *SMALL], "--init"),
    }[command]
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = _one_line_error(capsys, command, f"{flag}: ")
    for words in (str(renamed_file), "matches no known layout of deepfill_v2 generator weights", PORT_LAYOUT,
                  "2 of the network's keys missing, the first 'stage1.conv1.weight'",
                  "2 unexpected, the first 'stage1.conv_first.weight'"):
        assert words in err, (words, err)
    assert not any((tmp_path / name).exists() for name in ("out.png", "w.safetensors", "run"))


WRONG = [
    # (the file, the options, the option named, words the line must hold)
    ("port", ["--model", "deepfill_v2", "--model-option", "cnum=4"], "--checkpoint",
     ["stage1.conv1.weight is (8, 5, 5, 5) there but (4, 5, 5, 5)", "'cnum': 4", "--model-option"]),
    ("port", [], "--checkpoint", ["not a fastinpaint checkpoint", "--model deepfill_v2"]),
    ("text", ["--model", "deepfill_v2"], "--checkpoint", ["notes.pth is not a PyTorch checkpoint (torch.load failed:",
                                                          "it is a text file (it starts with 'not a checkpoint')",
                                                          "download it again"]),
    ("text", [], "--checkpoint", ["notes.pth is a text file (it starts with 'not a checkpoint'), not a checkpoint",
                                  "download it again"]),
    ("port", ["--model", "tiny_gated"], "--checkpoint", ["model 'tiny_gated' reads no other project's weights",
                                                         "deepfill_v2"]),
    ("run", ["--model", "deepfill_v2"], "--checkpoint", ["holds weights of model 'tiny_gated', not 'deepfill_v2'"]),
    ("port", ["--model", "deepfill_v2", "--model-option", "cnum=8", "--ema"], "--ema", ["no EMA weights"]),
    ("port", ["--model", "deepfill_v2", "--model-option", "cnum"], "--model-option", ["'cnum' is not KEY=VALUE"]),
    ("port", ["--model", "deepfill_v2", "--model-option", "nosuch=1"], "--model-option",
     ["model 'deepfill_v2' has no option nosuch", "cnum"]),
    ("port", ["--model", "deepfill_v2", "--model-option", "cnum=6"], "--model-option", ["cnum"]),
    ("port", ["--model", "nosuch"], "--model", ["unknown model 'nosuch'"]),
]


@pytest.mark.parametrize("which,options,flag,words", WRONG, ids=[f"{w}-{' '.join(o)}" for w, o, _, _ in WRONG])
def test_wrong_weights_or_options_are_one_line_naming_the_option(port_file, tiny_run, tmp_path, capsys, which,
                                                                  options, flag, words):
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    path = {"port": port_file, "text": tmp_path / "notes.pth", "run": tiny_run}[which]
    _photo(tmp_path)
    capsys.readouterr()
    assert cli.main(["inpaint", "--checkpoint", str(path), "--image", str(tmp_path / "photo.png"), "--mask",
                     str(tmp_path / "photo_mask.png"), "--out", str(tmp_path / "out.png"), *options]) == 2
    err = _one_line_error(capsys, "inpaint", f"{flag}: ")
    for word in words:
        assert word in err, (word, err)
    assert not (tmp_path / "out.png").exists()


TEXTS = {"notes": ("text.pth", "not a checkpoint\n", "a text file (it starts with 'not a checkpoint')"),
         "lfs": ("lfs.pth", "version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 412\n",
                 "a Git LFS pointer, not the file it points to"),
         "html": ("page.pth", "<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>\n",
                  "a web page (HTML)")}


@pytest.mark.parametrize("command", ["inpaint", "convert", "train"])
@pytest.mark.parametrize("kind", list(TEXTS))
def test_a_text_file_named_pth_is_said_to_be_one(tmp_path, capsys, command, kind):
    """A text file given as weights (a Git LFS pointer, a web page a download saved, ...) is named as
    what it is, with how to get the real file, in every command that reads weights."""
    name, text, what = TEXTS[kind]
    (tmp_path / name).write_text(text)
    _photo(tmp_path)
    options = ["--model", "deepfill_v2", "--model-option", "cnum=8"]
    argv, flag = {
        "inpaint": (["inpaint", "--checkpoint", str(tmp_path / name), "--image", str(tmp_path / "photo.png"), "--mask",
                     str(tmp_path / "photo_mask.png"), "--out", str(tmp_path / "out.png"), *options], "--checkpoint"),
        "convert": (["convert", str(tmp_path / name), "--out", str(tmp_path / "w.safetensors"), *options], "weights"),
        "train": (["train", "--model", "deepfill_v2", "--init", str(tmp_path / name), "--steps", "1", "--out",
                   str(tmp_path / "run"), *SMALL], "--init"),
    }[command]
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = _one_line_error(capsys, command, f"{flag}: ")
    assert f"{name} is not a PyTorch checkpoint (torch.load failed: " in err and f": it is {what}" in err, err
    assert "git lfs pull" in err if kind == "lfs" else "download" in err, err
    assert not any((tmp_path / n).exists() for n in ("out.png", "w.safetensors", "run"))


def test_convert_refuses_an_output_that_is_not_safetensors(port_file, tmp_path, capsys):
    assert cli.main(["convert", str(port_file), "--model", "deepfill_v2", "--out", str(tmp_path / "w.pth")]) == 2
    err = _one_line_error(capsys, "convert", "--out: ")
    assert ".safetensors" in err and not (tmp_path / "w.pth").exists()


# ----------------------------------------------------------------------------- fine-tuning

def test_finetune_config_is_the_published_setting_at_a_lower_learning_rate():
    config = load_config(FINETUNE)
    published = build_model("deepfill_v2", cnum=4)
    assert config.model == "deepfill_v2" and config.lr < published.default_lr and config.lr_d == config.lr
    assert tuple(config.betas) == published.default_betas
    assert config.mask == "free_form" and config.mask_options == {"box": True, "flip": True}
    assert config.loss_weights == published.default_weights
    assert config.model_options == {"cnum": 48, "disc_cnum": 64, "guided": False, "attention_masking": "official"}
    assert config.init is None


def test_finetune_from_a_port_checkpoint(port_file, tmp_path, capsys):
    ckpt = torch.load(port_file, weights_only=True)
    want_g = _ported(port_file)
    want_d = {k[len("module."):]: v for k, v in ckpt["D"].items()}
    train = ["train", "--config", str(FINETUNE), "--init", str(port_file), *SMALL]

    # step 0: exactly the file's generator and discriminator
    assert cli.main([*train, "--steps", "0", "--out", str(tmp_path / "start")]) == 0
    assert f"initialised the generator and discriminator from {port_file}" in capsys.readouterr().out
    start = load_checkpoint(list_checkpoints(tmp_path / "start" / "checkpoints")[-1])
    for got, want in ((start["generator"], want_g), (start["discriminator"], want_d)):
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert json.loads((tmp_path / "start" / "config.json").read_text())["init"] == str(port_file)

    # five steps: the weights move, from the file's (Adam moves each by about lr = 1e-5 a step)
    run = tmp_path / "run"
    assert cli.main([*train, "--steps", "5", "--out", str(run)]) == 0
    end = load_checkpoint(list_checkpoints(run / "checkpoints")[-1])
    assert end["step"] == 5 and end["opt_g"]["state"][0]["step"] == 5 and end["opt_d"]["state"][0]["step"] == 5
    for got, want in ((end["generator"], want_g), (end["discriminator"], want_d)):
        moved = max((got[k].float() - want[k].float()).abs().max().item() for k in want if "._" not in k)
        assert 0 < moved < 1e-3, moved
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log if x["kind"] == "train"] == [1, 2, 3, 4, 5]   # the port's n_iter is not read
    weights = load_weights(run / "weights.safetensors")
    assert all(torch.equal(weights[k], end["generator"][k]) for k in weights)

    # inpaint takes the run
    img, hole = _photo(tmp_path)
    filled = _inpaint(run, tmp_path, tmp_path / "filled.png")
    assert np.array_equal(filled[~hole], img[~hole])

    # --resume continues it from its checkpoint, without reading the weights it started from again
    capsys.readouterr()
    assert cli.main(["train", "--out", str(run), "--resume", "--steps", "7"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "initialised" not in out
    assert load_checkpoint(list_checkpoints(run / "checkpoints")[-1])["step"] == 7

    # --init with --resume says why not
    assert cli.main(["train", "--out", str(run), "--resume", "--steps", "9", "--init", str(port_file)]) == 2
    err = _one_line_error(capsys, "train", "--init: cannot go with --resume")
    assert "leave out --init" in err
    assert load_checkpoint(list_checkpoints(run / "checkpoints")[-1])["step"] == 7


@pytest.mark.parametrize("source", ["run folder", "weights file", "checkpoint"])
def test_init_from_a_fastinpaint_run_weights_or_checkpoint(tiny_run, tmp_path, capsys, source):
    path = {"run folder": tiny_run, "weights file": tiny_run / "weights.safetensors",
            "checkpoint": list_checkpoints(tiny_run / "checkpoints")[-1]}[source]
    argv = ["train", "--init", str(path), "--data", "demo", "--steps", "0", "--set", "size=32",
            "--set", "batch_size=2", "--set", "samples_per_epoch=8", "--set", "val_batches=1"]
    assert cli.main([*argv, "--out", str(tmp_path / "run")]) == 0
    want = load_weights(tiny_run / "weights.safetensors")
    got = load_weights(tmp_path / "run" / "weights.safetensors")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    # a network of another width, or another model, is refused naming --init
    capsys.readouterr()
    assert cli.main([*argv, "--set", "model_options.width=8", "--out", str(tmp_path / "narrow")]) == 2
    err = _one_line_error(capsys, "train", "--init: ")
    assert "there but" in err and "'width': 8" in err and "--set model_options" in err
    assert cli.main([*argv, "--model", "deepfill_v2", "--out", str(tmp_path / "other")]) == 2
    assert "holds weights of model 'tiny_gated', not 'deepfill_v2'" in _one_line_error(capsys, "train", "--init: ")
    assert not (tmp_path / "narrow").exists() and not (tmp_path / "other").exists()


# ----------------------------------------------------------------------------- the guided variant

def test_guided_networks_from_unguided_weights_start_as_the_unguided_ones(tmp_path):
    plain_recipe = build_model("deepfill_v2", cnum=4, disc_cnum=4)
    torch.save(port_checkpoint(plain_recipe.generator, plain_recipe.discriminator, seed=11, gain=3.0),
               tmp_path / "port.pth")
    weights = read_weights(tmp_path / "port.pth", model="deepfill_v2")
    guided_recipe = build_model("deepfill_v2", cnum=4, disc_cnum=4, guided=True)
    for recipe in (plain_recipe, guided_recipe):
        assert load_into(recipe, weights, model="deepfill_v2", options={}, argument="checkpoint")
    plain, guided = plain_recipe.generator.eval(), guided_recipe.generator.eval()
    # the sketch channel (3, after the image) of the first layer is zero, every other weight as loaded
    w = guided.stage1.conv1.weight
    assert w.shape[1] == 6 and torch.all(w[:, 3] == 0)
    assert torch.equal(torch.cat([w[:, :3], w[:, 4:]], 1), plain.stage1.conv1.weight)
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in guided.state_dict().items()
               if k != "stage1.conv1.weight")
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 24, 40, generator=g) * 2 - 1
    mask = torch.zeros(2, 1, 24, 40)
    mask[0, :, 4:16, 6:30], mask[1, :, 10:22, 20:38] = 1, 1
    sketch = (torch.rand(2, 1, 24, 40, generator=g) > 0.7).float()
    with torch.no_grad():
        want = plain(plain_recipe.prepare_input(image, mask))
        for s in (torch.zeros_like(sketch), sketch):   # with zero weights, any sketch: the unguided output
            torch.testing.assert_close(guided(guided_recipe.prepare_input(image, mask, s)), want,
                                       rtol=1e-5, atol=1e-6)
        # the discriminator likewise (channel 4, after the mask; its spectral norm's vector too)
        dp, dg = plain_recipe.discriminator, guided_recipe.discriminator
        sn = dg.conv1.conv_sn.parametrizations.weight
        assert torch.all(sn.original[:, 4] == 0) and sn[0]._v.shape == (5 * 25,)
        for mode in ("eval", "train"):   # stored singular vectors, then one power iteration
            dp.train(mode == "train"), dg.train(mode == "train")
            torch.testing.assert_close(dg(image, mask, sketch), dp(image, mask), rtol=1e-5, atol=1e-6)
    # through fine-tuning: --init with guided = true
    run = tmp_path / "run"
    assert cli.main(["train", "--config", str(FINETUNE), "--init", str(tmp_path / "port.pth"), "--steps", "0",
                     "--out", str(run), *SMALL, "--set", "model_options.cnum=4",
                     "--set", "model_options.guided=true"]) == 0
    state = load_weights(run / "weights.safetensors")
    assert torch.all(state["stage1.conv1.weight"][:, 3] == 0)
    assert torch.equal(state["stage1.conv1.bias"], plain.stage1.conv1.bias)


# ----------------------------------------------------------------------------- inpainting with a sketch

@pytest.fixture
def guided_weights(tmp_path):
    """fastinpaint weights of a guided cnum-4 generator, converted from a port checkpoint."""
    torch.save(port_checkpoint(DeepFillV2Generator(cnum=4, in_channels=6), seed=5, gain=3.0),
               tmp_path / "guided.pth")
    out = tmp_path / "guided.safetensors"
    assert cli.main(["convert", str(tmp_path / "guided.pth"), "--model", "deepfill_v2", "--model-option", "cnum=4",
                     "--model-option", "guided=true", "--out", str(out)]) == 0
    return out


def _lines(h, w, seed):
    rng = np.random.default_rng(seed)
    lines = np.zeros((h, w), bool)
    lines[rng.integers(2, h - 2), 3:w - 3] = True                   # across the hole and beyond it
    lines[h // 5: 4 * h // 5, rng.integers(w // 3, 2 * w // 3)] = True
    return lines


def test_inpaint_follows_a_sketch_with_the_guided_generator(guided_weights, tmp_path):
    img, hole = _photo(tmp_path)
    lines = _lines(*hole.shape, seed=1)
    Image.fromarray(lines.astype(np.uint8) * 255).save(tmp_path / "sketch.png")
    with_sketch = _inpaint(guided_weights, tmp_path, tmp_path / "s.png", "--sketch", str(tmp_path / "sketch.png"))
    without = _inpaint(guided_weights, tmp_path, tmp_path / "n.png")
    recipe, g = load_generator(guided_weights)
    assert np.array_equal(with_sketch, inpaint_array(recipe, g, img, hole, sketch=lines))
    assert np.array_equal(without, inpaint_array(recipe, g, img, hole, sketch=np.zeros_like(lines)))
    assert np.array_equal(without, inpaint_array(recipe, g, img, hole))
    assert not np.array_equal(with_sketch[hole], without[hole])             # the sketch guides the fill
    assert np.array_equal(with_sketch[~hole], img[~hole])
    assert np.array_equal(with_sketch, inpaint_array(recipe, g, img, hole, sketch=lines & hole))   # only the hole's
    # lines painted on a transparent canvas are read the same way
    rgba = np.zeros((*hole.shape, 4), np.uint8)
    rgba[lines] = (0, 0, 0, 255)
    Image.fromarray(rgba).save(tmp_path / "layer.png")
    assert np.array_equal(_inpaint(guided_weights, tmp_path, tmp_path / "t.png", "--sketch",
                                   str(tmp_path / "layer.png")), with_sketch)


def test_a_folder_of_images_with_a_folder_of_sketches(guided_weights, tmp_path, capsys):
    images, sketches, out = tmp_path / "images", tmp_path / "sketches", tmp_path / "out"
    images.mkdir(), sketches.mkdir()
    recipe, g = load_generator(guided_weights)
    expected = {}
    for i, (h, w) in enumerate([(27, 37), (16, 21), (19, 23)]):
        img, hole = _photo(images, f"img{i}", h, w, seed=i)
        (images / f"img{i}_mask.png").rename(tmp_path / f"img{i}_mask.png")
        lines = _lines(h, w, seed=i + 2)
        if i < 2:   # img2 has no sketch: an empty one
            Image.fromarray(lines.astype(np.uint8) * 255).save(sketches / f"img{i}.png")
        expected[f"img{i}"] = inpaint_array(recipe, g, img, hole, sketch=lines if i < 2 else None)
    masks = tmp_path / "masks"
    masks.mkdir()
    for i in range(3):
        (tmp_path / f"img{i}_mask.png").rename(masks / f"img{i}.png")
    capsys.readouterr()
    assert cli.main(["inpaint", "--checkpoint", str(guided_weights), "--image", str(images), "--mask", str(masks),
                     "--sketch", str(sketches), "--out", str(out)]) == 0
    for name, want in expected.items():
        assert np.array_equal(np.asarray(Image.open(out / f"{name}.png")), want), name
    notes = [line for line in capsys.readouterr().out.splitlines() if "no sketch" in line]
    assert notes == [f"note: no sketch for img2.png in {sketches}: filled with an empty sketch (no guidance)"]


SKETCH_ERRORS = [
    ("unguided", "sketch.png", ["is not guided", "takes no sketch", "leave out --sketch"]),
    ("guided", "small.png", ["small.png is 20x20", "is 37x27"]),
    ("guided", "missing.png", ["missing.png does not exist"]),
    ("guided", ".", ["is a folder", "a folder of sketches goes with a folder of images"]),
]


@pytest.mark.parametrize("weights,sketch,words", SKETCH_ERRORS, ids=[f"{w}-{s}" for w, s, _ in SKETCH_ERRORS])
def test_sketch_mistakes_are_one_line_naming_the_option(guided_weights, tiny_run, tmp_path, capsys, weights, sketch,
                                                         words):
    img, hole = _photo(tmp_path)
    Image.fromarray(_lines(*hole.shape, seed=0).astype(np.uint8) * 255).save(tmp_path / "sketch.png")
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "small.png")
    checkpoint = guided_weights if weights == "guided" else tiny_run
    capsys.readouterr()
    assert cli.main(["inpaint", "--checkpoint", str(checkpoint), "--image", str(tmp_path / "photo.png"), "--mask",
                     str(tmp_path / "photo_mask.png"), "--sketch", str(tmp_path / sketch),
                     "--out", str(tmp_path / "out.png")]) == 2
    err = _one_line_error(capsys, "inpaint", "--sketch: ")
    for word in words:
        assert word in err, (word, err)
    assert not (tmp_path / "out.png").exists()
    if weights == "unguided":   # the Python API refuses it too
        recipe, g = load_generator(tiny_run)
        with pytest.raises(InvalidInputError, match="not guided"):
            inpaint_array(recipe, g, img, hole, sketch=hole)


def test_a_sketch_for_unguided_weights_loaded_as_guided_is_refused(tmp_path, capsys):
    """Unguided weights with --model-option guided=true get a zero-weight sketch channel: the
    sketch could not change the fill, so it is refused (it was silently ignored)."""
    torch.save(port_checkpoint(DeepFillV2Generator(cnum=4), seed=6, gain=3.0), tmp_path / "plain.pth")
    img, hole = _photo(tmp_path)
    Image.fromarray(_lines(*hole.shape, seed=0).astype(np.uint8) * 255).save(tmp_path / "sketch.png")
    capsys.readouterr()
    assert cli.main(["inpaint", "--checkpoint", str(tmp_path / "plain.pth"), "--model", "deepfill_v2",
                     "--model-option", "cnum=4", "--model-option", "guided=true", "--image", str(tmp_path / "photo.png"),
                     "--mask", str(tmp_path / "photo_mask.png"), "--sketch", str(tmp_path / "sketch.png"),
                     "--out", str(tmp_path / "out.png")]) == 2
    err = _one_line_error(capsys, "inpaint", "--sketch: ")
    assert "zero weights" in err and not (tmp_path / "out.png").exists()
    recipe, g = load_generator(tmp_path / "plain.pth", model="deepfill_v2", model_options={"cnum": 4, "guided": True})
    with pytest.raises(InvalidInputError, match="zero weights"):
        inpaint_array(recipe, g, img, hole, sketch=hole)
    assert inpaint_array(recipe, g, img, hole).shape == img.shape      # without a sketch it fills
