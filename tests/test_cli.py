"""The fastinpaint command's bench and backends subcommands (the main job, train, is tested in
test_readme.py and test_trainer.py)."""

import json
import warnings

import pytest

from fastinpaint import cli
from fastinpaint._backend import unavailable_reason


def test_bench_quick_writes_results(tmp_path, capsys):
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    code = cli.main(["bench", "--device", "cpu", "--quick", "--cases", "conv1", "deconv 96", "--no-compile",
                     "--min-time", "0.01", "--json", str(out_json), "--markdown", str(out_md)])
    assert code == 0
    data = json.loads(out_json.read_text())
    assert data["environment"]["torch"]
    rows = data["results"]
    impls = {r["impl"] for r in rows}
    assert "eager" in impls
    if unavailable_reason("cpu", "cpu") is None:
        assert "fastinpaint[cpu]" in impls
    # --quick runs the layers on maps 8x smaller, and the labels say so
    assert {r["case"] for r in rows} == {"conv1 5->24 5x5 @32", "deconv 96->48 @8->16"}
    assert {r["mode"] for r in rows} == {"fwd+bwd", "fwd"}
    for r in rows:
        assert r["ms"] > 0 and r["x_vs_eager"] > 0, r
        if r["mode"] == "fwd+bwd":
            assert r["saved_MB"] > 0 and r["saved_vs_eager"] > 0
    eager_rows = [r for r in rows if r["impl"] == "eager"]
    assert all(abs(r["x_vs_eager"] - 1) < 1e-9 for r in eager_rows)
    table = out_md.read_text()
    assert "| case | mode | impl |" in table and "conv1 5->24" in table
    assert "x vs eager" in capsys.readouterr().out


def test_bench_rejects_bad_arguments(capsys):
    capsys.readouterr()
    assert cli.main(["bench", "--cases", "no-such-layer"]) == 2
    err = _one_line_error(capsys, "bench", "--cases: ")
    assert "'no-such-layer'" in err and "conv1 5->24 5x5 @256" in err   # the cases there are
    assert cli.main(["bench", "--batch", "0"]) == 2
    with pytest.raises(SystemExit):
        cli.main(["bench", "--dtype", "int8"])


def test_backends_command(capsys):
    assert cli.main(["backends"]) == 0
    out = capsys.readouterr().out
    for name in ("reference", "triton", "cuda", "cpu"):
        assert name in out


def test_backends_command_describes_every_op(capsys):
    from fastinpaint.ops import _registry

    assert cli.main(["backends", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["ops"]) == set(_registry.OPS) >= {"gated_conv2d", "channel_fc", "partial_conv2d",
                                                        "pixel_attention", "self_similarity"}
    for op, per_backend in report["ops"].items():
        assert list(per_backend) == list(_registry.OPS[op].implemented) or \
            set(per_backend) == set(_registry.OPS[op].implemented)
        for entry in per_backend.values():
            assert entry["runs"] and entry["cpu"] and entry["cuda"]
        assert per_backend["reference"]["cpu"] == "ok"
    # what "cuda" means differs per op, and the report says so
    assert "scaled_dot_product_attention" in report["ops"]["pixel_attention"]["cuda"]["runs"]
    assert "csrc/cuda/gated_conv.cu" in report["ops"]["gated_conv2d"]["cuda"]["runs"]
    assert "cuda" not in report["ops"]["attention_transfer_loss"]


# ----------------------------------------------------------------------------- errors: one line, exit 2

def _one_line_error(capsys, command, flag):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith(f"fastinpaint {command}: {flag}"), err
    assert "Traceback" not in err
    return err


@pytest.fixture
def files(tmp_path):
    """A photo, a mask for it, a truncated image and a text file named .png."""
    import numpy as np
    from PIL import Image
    from skimage import data

    photo = data.astronaut()[:48, :48]
    Image.fromarray(photo).save(tmp_path / "photo.png")
    hole = np.zeros((48, 48), np.uint8)
    hole[10:30, 10:30] = 255
    Image.fromarray(hole).save(tmp_path / "mask.png")
    Image.fromarray(hole[:24, :24]).save(tmp_path / "small_mask.png")
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(tmp_path / "black.png")
    Image.fromarray(np.full((48, 48), 255, np.uint8)).save(tmp_path / "white.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "photo.png").read_bytes()[:500])
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "empty").mkdir()
    return tmp_path


INPAINT_ERRORS = [
    # (what the user got wrong: argv pieces, the option named, words the line must hold)
    ({"image": "truncated.png"}, "--image", ["truncated.png", "cannot read"]),
    ({"image": "notes.png"}, "--image", ["notes.png", "cannot read"]),
    ({"mask": "truncated.png"}, "--mask", ["truncated.png", "cannot read"]),
    ({"mask": "notes.png"}, "--mask", ["notes.png", "cannot read"]),
    ({"image": "missing.png"}, "--image", ["missing.png", "does not exist"]),
    ({"checkpoint": "photo.png"}, "--checkpoint", ["photo.png", "not a checkpoint", "run folder"]),
    ({"checkpoint": "notes.png"}, "--checkpoint", ["not a checkpoint"]),
    ({"checkpoint": "empty"}, "--checkpoint", ["holds no fastinpaint run"]),
    ({"out": "noext"}, "--out", ["no image file extension", ".png"]),
    ({"out": "result.txt"}, "--out", ["'.txt'", ".png"]),
    ({"out": "result.gif"}, "--out", ["'.gif'", "not one of the formats written", "256 colours", ".png"]),
    ({"mask": "small_mask.png"}, "--mask", ["24x24", "48x48", "--resize-mask"]),
    ({"mask": "black.png"}, "--mask", ["no hole", "--invert-mask"]),
    ({"mask": "white.png"}, "--mask", ["every pixel", "--invert-mask"]),
    ({"extra": ["--ema"]}, "--ema", ["without EMA", "no EMA weights", "leave out --ema"]),
    ({"image": ".", "out": "x.png"}, "--out", ["names an image file", "is a folder", "ending in /"]),
]


@pytest.mark.parametrize("wrong,flag,words", INPAINT_ERRORS, ids=[f"{f}-{list(w.values())[0]}"
                                                                  for w, f, _ in INPAINT_ERRORS])
def test_inpaint_mistakes_are_one_line_naming_the_option(tiny_run, files, capsys, wrong, flag, words):
    args = {"checkpoint": str(tiny_run), "image": "photo.png", "mask": "mask.png", "out": "filled.png"}
    args.update({k: v for k, v in wrong.items() if k != "extra"})
    argv = ["inpaint"]
    for key, value in args.items():
        argv += [f"--{key}", value if key == "checkpoint" and value == str(tiny_run) else str(files / value)]
    capsys.readouterr()
    assert cli.main(argv + wrong.get("extra", [])) == 2
    err = _one_line_error(capsys, "inpaint", f"{flag}: ")
    for word in words:
        assert word in err, (word, err)
    assert "unknown file extension" not in err and "is it a fastinpaint run folder" not in err
    assert not (files / "filled.png").exists()


TRAIN_ERRORS = [
    (["--data", "/nonexistent"], "--data", ["/nonexistent", "does not exist", "demo"]),
    (["--data", "{empty}"], "--data", ["no image files", "demo"]),
    (["--data", "{photo}"], "--data", ["not a directory"]),
    (["--model", "nosuch"], "--model", ["unknown model 'nosuch'", "tiny_gated"]),
    (["--mask", "nosuch"], "--mask", ["unknown mask kind 'nosuch'", "free_form"]),
    (["--mask", "file"], "--mask", ["mask_options.paths"]),
    (["--set", "batch_size=0"], "--set batch_size: ", ["must be an integer >= 1, got 0"]),
    (["--steps", "-5"], "--steps: ", ["must be an integer >= 0, got -5"]),
    (["--set", "lr=abc"], "--set: ", ["lr=abc", "not a number", "give lr a number"]),
    (["--set", "nosuch=1"], "--set: ", ["unknown config key 'nosuch'", "valid keys", "batch_size"]),
    (["--set", "model_options.nosuch=1"], "--set model_options: ", ["model 'tiny_gated' has no option nosuch",
                                                                     "its options: width"]),
    (["--set", "mask_options.nosuch=1"], "--set mask_options: ", ["mask kind 'free_form' has no option nosuch",
                                                                   "its options:"]),
    (["--config", "{missing}"], "--config: ", ["missing.toml", "does not exist", ".toml"]),
    (["--config", "{photo}"], "--config: ", ["unknown format '.png'", ".toml"]),
    (["--set", "size=30"], "--set size: ", ["multiple of 4", "size=30", "--set size=28"]),
    (["--set", "size=8"], "--set size: ", ["must be at least 11", "SSIM", "got 8", "--set size=12",
                                           "multiple of 4"]),
    (["--set", "model_options.width=0"], "--set model_options: ", ["model 'tiny_gated'", "width"]),
    (["--set", "loss_weights.nosuch=1"], "--set loss_weights: ", ["no loss 'nosuch'", "its losses:", "l1_hole"]),
    (["--set", "loss_weights.l1_hole=-1"], "--set loss_weights: ", ["'l1_hole'", ">= 0", "-1"]),
    (["--resume"], "--out: ", ["holds no run to resume", "leave out --resume"]),
    (["--config", "{bad_value}"], "--config: ", ["keep in", "bad.toml", "must be an integer"]),
    (["--data", "{unreadable}"], "--data: ", ["none of the", "can be read", "the first:",
                                              "replace the broken files"]),
    (["--data", "{unreadable}", "--set", "batch_size=1"], "--data: ", ["none of the", "can be read", "the first:",
                                               "replace the broken files"]),
    (["--data", "{one}", "--set", "batch_size=4"], "--data", ["fewer than batch_size=4", "--set batch_size"]),
]


@pytest.mark.parametrize("wrong,flag,words", TRAIN_ERRORS, ids=[" ".join(w) for w, _, _ in TRAIN_ERRORS])
def test_train_mistakes_are_one_line_and_write_nothing(files, capsys, wrong, flag, words):
    one = files / "one"
    one.mkdir(exist_ok=True)
    (one / "photo.png").write_bytes((files / "photo.png").read_bytes())
    unreadable = files / "unreadable"
    unreadable.mkdir(exist_ok=True)
    for i in range(3):
        (unreadable / f"broken{i}.png").write_bytes((files / "truncated.png").read_bytes())
    (files / "bad.toml").write_text('keep = "ten"\n')
    names = {"empty": files / "empty", "photo": files / "photo.png", "missing": files / "missing.toml", "one": one,
             "unreadable": unreadable, "bad_value": files / "bad.toml"}
    argv = ["train", "--steps", "1", "--out", str(files / "run"), "--set", "size=32",
            *[w.format(**names) for w in wrong]]
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(argv) == 2
    assert not [w for w in caught if "unreadable" in str(w.message)]   # no warning per file before the line
    err = _one_line_error(capsys, "train", flag)
    for word in words:
        assert word in err, (word, err)
    assert not (files / "run").exists()      # nothing written: the corrected command is not refused


@pytest.mark.parametrize("out", ["plainfile", "photo.png", "plainfile/sub"])
def test_train_out_that_is_a_file_is_one_line(files, capsys, out):
    (files / "plainfile").write_text("mine")
    before = {p.name: p.read_bytes() for p in files.iterdir() if p.is_file()}
    capsys.readouterr()
    assert cli.main(["train", "--steps", "1", "--out", str(files / out), "--set", "size=32"]) == 2
    err = _one_line_error(capsys, "train", "--out: ")
    assert "is a file" in err and "give a folder" in err, err
    assert str(files / out.split("/")[0]) in err
    assert {p.name: p.read_bytes() for p in files.iterdir() if p.is_file()} == before
    assert not (files / "config.json").exists() and sorted(p.name for p in files.iterdir() if p.is_dir()) == ["empty"]


def test_overwrite_deletes_nothing_before_the_size_and_the_validation_are_checked(tiny_run, tmp_path, capsys,
                                                                                    monkeypatch):
    """--set size=8 (under SSIM's window) with --overwrite on an existing run: one line, and the
    run is untouched; a validation that fails (here the metrics refuse the batches) fails before
    the previous run is deleted, too."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    base = ["train", "--data", "demo", "--out", str(run), "--set", "batch_size=2", "--set", "samples_per_epoch=8",
            "--set", "val_batches=1", "--steps", "2", "--overwrite"]
    capsys.readouterr()
    assert cli.main(base + ["--set", "size=8"]) == 2
    err = _one_line_error(capsys, "train", "--set size: ")
    assert "at least 11" in err
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    from fastinpaint import metrics

    def refuse(*args, **kwargs):
        raise ValueError("these batches cannot be scored")

    monkeypatch.setattr(metrics.InpaintingMetrics, "update", refuse)
    with pytest.raises(ValueError, match="cannot be scored"):
        cli.main(base + ["--set", "size=32"])
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_an_unreadable_training_image_is_warned_about_once(files, capsys):
    """A broken file that the first training sample skips, and the validation (every image, as
    the validation split is empty) reads again: one warning."""
    folder = files / "images"
    folder.mkdir()
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    (folder / "a.png").write_bytes((files / "truncated.png").read_bytes())   # sorts first, in the train split
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(["train", "--data", str(folder), "--steps", "1", "--out", str(files / "run"), "--set",
                         "size=32", "--set", "batch_size=2", "--set", "val_batches=1"]) == 0
    skipped = [str(w.message) for w in caught if "skipping unreadable image" in str(w.message)]
    assert len(skipped) == 1 and "a.png" in skipped[0], skipped
    assert any("validation split is unusable" in str(w.message) for w in caught)


def test_train_refuses_an_existing_run_unless_resume_or_overwrite(tiny_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "my_notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    base = ["train", "--data", "demo", "--out", str(run), "--set", "size=32", "--set", "batch_size=2",
            "--set", "samples_per_epoch=8", "--set", "val_batches=1", "--set", "val_every=100"]
    capsys.readouterr()
    assert cli.main(base + ["--steps", "5"]) == 2
    err = _one_line_error(capsys, "train", "--out: ")
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before   # untouched
    # --overwrite: the old run's files are gone (its checkpoint of step 3, its log lines), others kept
    assert cli.main(base + ["--steps", "2", "--overwrite", "--set", "checkpoint_every=1"]) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["ckpt_000000001.pt", "ckpt_000000002.pt"]
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log if x["kind"] == "train"] == [2]
    assert (run / "my_notes.txt").read_text() == "mine"
    assert json.loads((run / "config.json").read_text())["steps"] == 2
    # --resume with another model: one line naming --model, and the run untouched
    config_before = (run / "config.json").read_bytes()
    capsys.readouterr()
    assert cli.main(base + ["--steps", "3", "--resume", "--model", "context_encoder"]) == 2
    err = _one_line_error(capsys, "train", "--model: ")
    assert "was trained with model 'tiny_gated'" in err and "--model tiny_gated" in err
    assert (run / "config.json").read_bytes() == config_before
    # --resume continues it
    assert cli.main(base + ["--steps", "3", "--resume", "--set", "checkpoint_every=1"]) == 0
    assert "resumed from" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        cli.main(base + ["--resume", "--overwrite"])
    assert info.value.code == 2
    _one_line_error(capsys, "train", "argument --overwrite")


def test_resume_keeps_the_runs_settings_and_history(tiny_run, tmp_path, capsys):
    """`train --resume` needs only --out (and --steps to go further): the run's config.json gives
    the rest; resuming a finished run adds no validation twice; a --steps below the run's step
    and a run whose every checkpoint is broken are one-line errors that change nothing."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    saved = json.loads((run / "config.json").read_text())
    history = json.loads((run / "metrics.json").read_text())["history"]
    # a finished run (step 3 of 3): nothing to train, its outputs written again, no duplicate entry
    capsys.readouterr()
    assert cli.main(["train", "--out", str(run), "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert json.loads((run / "metrics.json").read_text())["history"] == history
    # two steps further, with only --steps given: the size, batch, data of the run are kept
    assert cli.main(["train", "--out", str(run), "--resume", "--steps", "5"]) == 0
    now = json.loads((run / "config.json").read_text())
    assert now == {**saved, "steps": 5, "resume": True, "out": str(run)}
    steps = [h["step"] for h in json.loads((run / "metrics.json").read_text())["history"]]
    assert steps == [h["step"] for h in history] + [5]
    before = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert cli.main(["train", "--out", str(run), "--resume", "--steps", "4"]) == 2
    assert {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    err = _one_line_error(capsys, "train", "--steps: ")
    assert "already at step 5" in err and "above 5" in err
    # another network shape on resume: one line, nothing changed
    assert cli.main(["train", "--out", str(run), "--resume", "--steps", "9", "--set", "model_options.width=8"]) == 2
    err = _one_line_error(capsys, "train", "--resume: ")
    assert "model_options={}, now {'width': 8}" in err and "cannot change on resume" in err
    assert {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    for ckpt in (run / "checkpoints").iterdir():
        ckpt.write_bytes(ckpt.read_bytes()[:100])
    before = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert cli.main(["train", "--out", str(run), "--resume", "--steps", "9"]) == 2
    err = _one_line_error(capsys, "train", "--resume: ")
    assert "none of its" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_debug_shows_the_traceback(files, monkeypatch):
    from fastinpaint.errors import UserError

    argv = ["train", "--model", "nosuch", "--out", str(files / "run")]
    with pytest.raises(UserError, match="unknown model"):
        cli.main(argv + ["--debug"])
    with pytest.raises(UserError, match="unknown model"):
        cli.main(["--debug"] + argv)
    monkeypatch.setenv("FASTINPAINT_DEBUG", "1")
    with pytest.raises(UserError, match="unknown model"):
        cli.main(argv)


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only the user's mistakes are turned into one line; an error of ours is not hidden."""
    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "_cmd_backends", broken)
    with pytest.raises(KeyError):
        cli.main(["backends"])


def test_the_installed_command_prints_one_line_and_exits_2(files):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "fastinpaint.cli", "inpaint", "--checkpoint", str(files / "photo.png"),
                           "--image", str(files / "photo.png"), "--mask", str(files / "mask.png"),
                           "--out", str(files / "o.png")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith("fastinpaint inpaint: --checkpoint: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stdout == ""


def test_bench_times_compile_of_each_implementation_and_plots(tmp_path, capsys):
    """Beside eager and fastinpaint[cpu], torch.compile of each, timed in the same run, ratios
    against both baselines; --plot writes the chart."""
    pytest.importorskip("matplotlib")
    if unavailable_reason("cpu", "cpu") is not None:
        pytest.skip("the cpu backend is not built")
    out_json, plot = tmp_path / "r.json", tmp_path / "r.png"
    code = cli.main(["bench", "--device", "cpu", "--quick", "--cases", "down 24", "--modes", "fwd", "--min-time",
                     "0.01", "--json", str(out_json), "--plot", str(plot)])
    assert code == 0, capsys.readouterr().err
    rows = json.loads(out_json.read_text())["results"]
    assert [r["impl"] for r in rows] == ["eager", "compile(eager)", "fastinpaint[cpu]", "compile(fastinpaint[cpu])"]
    for r in rows:
        assert "error" not in r, r
        assert r["x_vs_eager"] > 0 and r["x_vs_compile(eager)"] > 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


def test_a_compiled_baseline_past_the_recompile_limit_fails_instead_of_running_eagerly():
    import torch
    import torch._dynamo
    import torch._inductor.config
    from fastinpaint import benchmark as B

    fn = torch.compile(lambda x: x * 2 + 1, backend="eager", dynamic=False)
    with B.fresh_compile(), torch._dynamo.config.patch(recompile_limit=1):
        assert torch._inductor.config.force_disable_caches   # no graph compiled before a change of the code
        fn(torch.ones(2))
        with pytest.raises(Exception, match="(?i)recompil|limit"):
            fn(torch.ones(3))   # a second shape: a recompile past the limit


def test_warnings_are_one_line_during_a_command(monkeypatch):
    """A warning raised while a command runs prints as one `fastinpaint: warning: ...` line (no
    source file and line); the usual format is restored afterwards."""
    import warnings

    seen = []

    def backends(args):
        seen.append(warnings.formatwarning("skipping unreadable image 'x.png':\n truncated", RuntimeWarning,
                                           "/somewhere/datasets.py", 312))
        return 0

    monkeypatch.setattr(cli, "_cmd_backends", backends)
    before = warnings.formatwarning
    assert cli.main(["backends"]) == 0
    assert seen == ["fastinpaint: warning: skipping unreadable image 'x.png': truncated\n"]
    assert warnings.formatwarning is before


@pytest.mark.parametrize("argv,prog", [(["bench", "channel_fc", "--quick"], "fastinpaint bench channel_fc"),
                                       (["inpaint", "--checkpoint", "r", "--image", "i.png", "--mask", "m.png",
                                         "--out", "o.png", "--bogus"], "fastinpaint inpaint")])
def test_unknown_options_are_named_by_their_command(argv, prog, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"{prog}: unrecognized arguments: ") and err.count("\n") == 1, err
