"""The training engine: a short run learns and writes its files, SIGKILL + resume is exact,
corrupt checkpoints and images are survived, DDP equals one process on the whole batch,
config files and overrides, the ``fastinpaint train`` command."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fastinpaint import cli
from fastinpaint.data import make_dataset, make_mask_generator
from fastinpaint.models import MODELS, build_model
from fastinpaint.train import ConfigError, MaskedDataset, TrainConfig, load_config, train
from fastinpaint.train.checkpoint import CheckpointWarning, checkpoint_path, list_checkpoints, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]

# tiny and fast: 32x32, 4+4 gated channels
TINY = dict(size=32, batch_size=2, mask="block", model_options={"width": 4}, samples_per_epoch=16,
            lr=2e-3, log_every=1, val_batches=1)


def cfg(out, **kw):
    values = {**TINY, "out": str(out), **kw}
    return TrainConfig.from_dict(values)


def read_log(run_dir):
    lines = [json.loads(x) for x in (Path(run_dir) / "log.jsonl").read_text().splitlines()]
    return [x for x in lines if x["kind"] == "train"]


# ----------------------------------------------------------------------------- model


def test_model_recipe_interface():
    recipe = build_model("tiny_gated", width=4)
    assert "tiny_gated" in MODELS and recipe.discriminator is None
    image = torch.rand(2, 3, 16, 16) * 2 - 1
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, 4:8, 4:8] = 1
    x = recipe.prepare_input(image, mask)
    assert x.shape == (2, 5, 16, 16)
    assert torch.all(x[:, :3][mask.expand(-1, 3, -1, -1) == 1] == 0)
    assert torch.all(x[:, 3] == 1) and torch.equal(x[:, 4:], mask)
    out = recipe.generator(x)
    assert out.shape == (2, 3, 16, 16) and out.abs().max() <= 1
    comp = recipe.composite(image, mask, out)
    assert torch.equal(comp[mask.expand(-1, 3, -1, -1) == 0], image[mask.expand(-1, 3, -1, -1) == 0])
    losses = recipe.generator_losses(image, mask, out, None)
    assert set(losses) == {"l1_hole", "l1_valid"}
    with_d = build_model("tiny_gated", width=4, loss_weights={"adv": 0.1})
    assert with_d.discriminator is not None
    d = with_d.discriminator_losses(image, mask, out, with_d.discriminator)
    assert set(d) == {"d_real", "d_fake"} and all(v >= 0 for v in d.values())
    with pytest.raises(ValueError, match="unknown model"):
        build_model("nope")
    with pytest.raises(ValueError, match="no loss"):
        build_model("tiny_gated", loss_weights={"perceptual": 1.0})


# ----------------------------------------------------------------------------- a short run


def test_short_run_learns_and_writes_everything(tmp_path):
    out = tmp_path / "run"
    result = train(cfg(out, steps=24, checkpoint_every=12, val_every=12, ema=0.9,
                         lr_schedule="constant"))   # a full rate through so short a run
    log = read_log(out)
    assert [x["step"] for x in log] == list(range(1, 25))
    first = np.mean([x["g_total"] for x in log[:6]])
    last = np.mean([x["g_total"] for x in log[-6:]])
    assert last < 0.8 * first, (first, last)

    assert result["step"] == 24
    assert Path(result["checkpoint"]) == checkpoint_path(out / "checkpoints", 24)
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["ckpt_000000012.pt", "ckpt_000000024.pt"]
    state = load_checkpoint(result["checkpoint"])
    assert state["step"] == 24 and state["ema"] is not None and state["data"] == {"epoch": 2, "batch": 8}

    from PIL import Image
    with Image.open(result["grid"]) as grid:
        assert grid.size == (3 * 32, 2 * 32)   # masked | output | truth, one val batch of 2
    metrics = json.loads(Path(result["metrics_path"]).read_text())
    # step 0: the untrained network; the mean-colour-fill baseline beside the history
    assert metrics["step"] == 24 and [h["step"] for h in metrics["history"]] == [0, 12, 24]
    assert set(metrics["baseline_mean_fill"]) >= {"psnr", "ssim", "l1", "l1_hole"}
    assert metrics["history"][-1]["l1_hole"] < metrics["history"][0]["l1_hole"]   # it learned
    assert result["initial_metrics"] == metrics["history"][0]
    assert set(metrics["metrics"]) >= {"psnr", "ssim", "l1", "l1_hole"}
    assert metrics["metrics"] == result["metrics"]
    saved = json.loads((out / "config.json").read_text())
    assert saved["steps"] == 24 and saved["model_options"] == {"width": 4}
    assert saved["lr"] == 2e-3 and saved["betas"] == list(build_model("tiny_gated").default_betas)
    weights = load_file(result["weights"])
    gen_state = state["generator"]
    assert set(weights) == set(gen_state) and all(torch.equal(weights[k], gen_state[k]) for k in weights)
    assert Path(result["weights_ema"]).is_file()


def test_unset_optimiser_settings_come_from_the_model():
    from fastinpaint.train import resolve_defaults

    class Published:
        default_lr, default_betas = 2e-4, (0.5, 0.9)

    class TwoRates(Published):
        default_lr_discriminator = 2e-5

    config = TrainConfig()
    assert config.lr is None and config.betas is None and config.lr_d is None
    resolved = resolve_defaults(config, Published())
    assert resolved.lr == 2e-4 and resolved.lr_d == 2e-4 and resolved.betas == (0.5, 0.9) and config.lr is None
    assert resolve_defaults(config, TwoRates()).lr_d == 2e-5
    assert resolve_defaults(load_config(overrides=["lr_d=0.5"]), TwoRates()).lr_d == 0.5
    mine = resolve_defaults(load_config(overrides=["lr=0.01", "betas=0.9,0.99"]), Published())
    assert mine.lr == 0.01 and mine.betas == (0.9, 0.99)
    bare = resolve_defaults(config, object())   # a recipe without published settings
    assert (bare.lr, bare.size, bare.batch_size, bare.mask) == (1e-4, 64, 4, "free_form")

    class CenterModel(Published):
        default_size, default_batch_size, default_mask = 128, 64, "center"
        default_mask_options = {"hole": 64}

    c = resolve_defaults(load_config(overrides=["mask_options.overlap=4"]), CenterModel())
    assert (c.size, c.batch_size, c.mask, c.mask_options) == (128, 64, "center", {"hole": 64, "overlap": 4})
    c = resolve_defaults(load_config(overrides=["mask=block", "size=32"]), CenterModel())
    assert (c.size, c.mask, c.mask_options) == (32, "block", {})   # the model's mask options go with its mask
    assert load_config(overrides=["lr=0.01", "lr=none"]).lr is None
    with pytest.raises(ConfigError, match="lr: must be"):
        load_config(overrides=["lr=-1"])
    with pytest.raises(ConfigError, match="eps: must be"):
        load_config(overrides=["eps=0"])


def test_discriminator_grad_accum_bf16_run(tmp_path):
    out = tmp_path / "gan"
    result = train(cfg(out, steps=2, loss_weights={"adv": 0.1}, grad_accum=2, amp="bf16",
                       checkpoint_every=100, val_every=100))
    state = load_checkpoint(result["checkpoint"])
    assert state["discriminator"] is not None and state["opt_d"]["state"]
    assert state["data"] == {"epoch": 0, "batch": 4}       # 2 steps x 2 micro-batches
    log = read_log(out)
    assert {"adv", "d_real", "d_fake", "l1_hole"} <= set(log[-1])
    assert all(np.isfinite(v) for x in log for v in x.values() if isinstance(v, float))


def test_grad_accum_equals_the_larger_batch(tmp_path):
    two = train(cfg(tmp_path / "accum", steps=3, batch_size=2, grad_accum=2, val_every=100))
    one = train(cfg(tmp_path / "big", steps=3, batch_size=4, grad_accum=1, val_every=100))
    a, b = load_file(two["weights"]), load_file(one["weights"])
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    assert load_checkpoint(two["checkpoint"])["data"] == {"epoch": 0, "batch": 6}


def test_fp16_keeps_its_grad_scaler(tmp_path):
    result = train(cfg(tmp_path / "fp16", steps=2, amp="fp16", val_every=100))
    state = load_checkpoint(result["checkpoint"])
    assert state["scaler"] is not None and state["scaler"]["scale"] > 0
    assert all(torch.isfinite(v).all() for v in load_file(result["weights"]).values())


def test_compiled_generator_matches_eager(tmp_path):
    eager = train(cfg(tmp_path / "eager", steps=2, val_every=100))
    try:
        compiled = train(cfg(tmp_path / "compiled", steps=2, val_every=100, compile=True))
    except Exception as e:  # no working compiler toolchain on this machine
        if "compile" in type(e).__module__ or "inductor" in str(e).lower() or "dynamo" in type(e).__module__:
            pytest.skip(f"torch.compile unavailable here: {type(e).__name__}: {e}")
        raise
    a, b = load_file(eager["weights"]), load_file(compiled["weights"])
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-4, msg=name)


# ----------------------------------------------------------------------------- resume

_CHILD = textwrap.dedent("""
    import json, sys, time
    from fastinpaint.train import TrainConfig, train
    config = TrainConfig.from_dict(json.loads(sys.argv[1]))
    slow_after = int(sys.argv[2])
    # after the checkpoint of step `slow_after`, slow down so the parent can kill us mid-run
    train(config, on_step=lambda step: time.sleep(1.0) if 0 < slow_after <= step else None)
""")

# Every part of both runs in a fresh process with one thread: the same arithmetic, whatever
# this pytest process did before (other tests, torch.compile), and no thread-count effects.
_CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _child(config, slow_after=0):
    return subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(config.to_dict()), str(slow_after)],
                            cwd=ROOT, env=_CHILD_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _finish(proc):
    err = proc.communicate(timeout=240)[1].decode()
    assert proc.returncode == 0, err[-3000:]
    return err


def test_sigkill_and_resume_is_exact(tmp_path):
    n, k = 12, 5
    # crosses an epoch boundary (8 batches per epoch) after the resume point; EMA on
    common = dict(steps=n, checkpoint_every=k, val_every=100, ema=0.8)
    config_a = cfg(tmp_path / "a", **common)
    proc_a = _child(config_a)   # runs while B starts and dies

    run_b = tmp_path / "b"
    config_b = cfg(run_b, **common)
    proc = _child(config_b, slow_after=k)
    target = checkpoint_path(run_b / "checkpoints", k)
    deadline = time.monotonic() + 120
    while not target.exists():
        if proc.poll() is not None:
            pytest.fail(f"the child ended before its checkpoint: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no checkpoint after 120 s")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not checkpoint_path(run_b / "checkpoints", n).exists()  # it really died mid-run
    assert not (run_b / "weights.safetensors").exists()

    _finish(_child(TrainConfig.from_dict({**config_b.to_dict(), "resume": True})))
    _finish(proc_a)
    a_dir, b_dir = Path(config_a.out), run_b
    pa, pb = load_file(a_dir / "weights.safetensors"), load_file(b_dir / "weights.safetensors")
    assert set(pa) == set(pb)
    for name in pa:
        assert torch.equal(pa[name], pb[name]), (name, (pa[name] - pb[name]).abs().max())
    ea, eb = load_file(a_dir / "weights_ema.safetensors"), load_file(b_dir / "weights_ema.safetensors")
    assert all(torch.equal(ea[name], eb[name]) for name in ea)
    sa = load_checkpoint(checkpoint_path(a_dir / "checkpoints", n))
    sb = load_checkpoint(checkpoint_path(b_dir / "checkpoints", n))
    assert sa["data"] == sb["data"] == {"epoch": 1, "batch": 4}
    for (ka, va), (kb, vb) in zip(sa["opt_g"]["state"].items(), sb["opt_g"]["state"].items()):
        assert all(torch.equal(va[x], vb[x]) for x in va)
    # the resumed run's log: the killed run's lines after its checkpoint are dropped, 6..12 once
    steps = [x["step"] for x in read_log(run_b)]
    assert steps == list(range(1, 13))


def test_truncated_latest_checkpoint_falls_back(tmp_path):
    out = tmp_path / "run"
    train(cfg(out, steps=4, checkpoint_every=2, val_every=100))
    latest = checkpoint_path(out / "checkpoints", 4)
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 2])
    with pytest.warns(CheckpointWarning, match="truncated"):
        result = train(cfg(out, steps=6, checkpoint_every=2, val_every=100, resume=True))
    assert result["step"] == 6
    steps = [x["step"] for x in read_log(out)]
    assert steps == [1, 2, 3, 4, 5, 6]   # 3 and 4 redone from the step-2 checkpoint, logged once


def test_resume_without_checkpoint_starts_fresh(tmp_path, capsys):
    """A run folder whose run ended before its first checkpoint: --resume starts it over (its
    log with it); a folder with no run at all is refused (a mistyped --out)."""
    from fastinpaint.errors import InputNotFoundError

    with pytest.raises(InputNotFoundError, match="holds no run to resume"):
        train(cfg(tmp_path / "typo", steps=1, val_every=100, resume=True))
    assert not (tmp_path / "typo").exists()
    out = tmp_path / "fresh"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "log.jsonl").write_text('{"kind": "train", "step": 1}\n')
    result = train(cfg(out, steps=1, val_every=100, resume=True))
    assert result["step"] == 1
    assert "no checkpoint" in capsys.readouterr().out
    assert [x["step"] for x in read_log(out)] == [1]


def test_ctrl_c_saves_the_step_and_resume_is_exact(tmp_path, capsys):
    """The first SIGINT during training stops after the current step with a checkpoint of it
    (not the last periodic one); --resume from it ends where an uninterrupted run does, with
    one log line per step and every validation in the history."""
    common = dict(steps=7, checkpoint_every=100, val_every=2)
    train(cfg(tmp_path / "a", **common))
    # Python's own handler, whatever the test was started under (a background job ignores SIGINT)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _interrupt_and_resume(tmp_path, common, capsys)
    finally:
        signal.signal(signal.SIGINT, before)


def _interrupt_and_resume(tmp_path, common, capsys):
    def interrupt_at_3(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    out = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        train(cfg(out, **common), on_step=interrupt_at_3)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["ckpt_000000003.pt"]
    assert "interrupted at step 3" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # the handler is gone
    train(cfg(out, **common, resume=True))
    pa, pb = load_file(tmp_path / "a" / "weights.safetensors"), load_file(out / "weights.safetensors")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert [x["step"] for x in read_log(out)] == list(range(1, 8))
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["step"] for h in history] == [0, 2, 4, 6, 7]
    assert history == json.loads((tmp_path / "a" / "metrics.json").read_text())["history"]


# ----------------------------------------------------------------------------- bad data


def test_image_folder_with_corrupt_and_non_image_files(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        a = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(a).save(folder / ("sub" if i % 2 else "") / f"img{i}.png")
    good = (folder / "img0.png").read_bytes()
    (folder / "broken.png").write_bytes(good[: len(good) // 3])
    (folder / "notes.txt").write_text("not an image")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(cfg(tmp_path / "run", data=str(folder), steps=4, val_every=100))
    assert result["step"] == 4 and Path(result["weights"]).is_file()
    assert any("broken.png" in str(w.message) for w in caught)


# ----------------------------------------------------------------------------- DDP

_RANK = textwrap.dedent("""
    import json, sys
    from fastinpaint.train import TrainConfig, train
    train(TrainConfig.from_dict(json.loads(sys.argv[1])))
""")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("adv", [0.0, 0.5], ids=["generator", "with-discriminator"])
def test_two_process_ddp_equals_one_process_on_the_combined_batch(tmp_path, adv):
    """Two gloo ranks of 2 samples == one process on the 4 samples, for the generator
    alone and for alternating discriminator / generator steps (hinge GAN).

    With a discriminator, some of its gradients nearly cancel by construction (real and fake
    differ only in the hole, and the hinge terms have opposite signs), and Adam's first steps
    are lr * sign(gradient) for any gradient far above eps: summation order alone would flip
    them. A large eps makes the update linear in the gradient, so the comparison tests the
    gradient all-reduce rather than the sign of rounding noise."""
    steps, per_rank, seed = 3, 2, 7
    weights = {"adv": adv} if adv else {}
    lr, eps = (1.0, 1.0) if adv else (1e-2, 1e-8)   # with eps = 1 the step is about lr * gradient
    config = cfg(tmp_path / "ddp", steps=steps, batch_size=per_rank, seed=seed, lr=lr, lr_schedule="constant",
                 val_every=100, loss_weights=weights, eps=eps)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _RANK, json.dumps(config.to_dict())], cwd=ROOT,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for r in range(2)]
    errors = [p.communicate(timeout=240)[1].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    ddp = load_file(tmp_path / "ddp" / "weights.safetensors")
    ddp_disc = load_checkpoint(list_checkpoints(tmp_path / "ddp" / "checkpoints")[-1])["discriminator"]

    # one process, both ranks' samples in one batch of 4, same model seed and optimisers
    torch.manual_seed(seed)
    recipe = build_model("tiny_gated", loss_weights=weights, width=4)
    gen, disc = recipe.generator, recipe.discriminator
    assert (disc is not None) == (adv > 0)
    betas = config.betas or recipe.default_betas
    opt = torch.optim.Adam(gen.parameters(), lr=lr, betas=betas, eps=eps)
    opt_d = torch.optim.Adam(disc.parameters(), lr=lr, betas=betas, eps=eps) if disc else None
    ds = MaskedDataset(make_dataset("demo", size=32, split="train", seed=seed, samples_per_epoch=16),
                       make_mask_generator("block"), seed + 1)
    ds.set_epoch(0)
    shares = []
    for r in range(2):
        sampler = torch.utils.data.distributed.DistributedSampler(ds, num_replicas=2, rank=r, shuffle=True, seed=seed)
        sampler.set_epoch(0)
        shares.append(list(sampler))
    assert not set(shares[0]) & set(shares[1])   # the ranks read different samples
    for s in range(steps):
        idx = [i for share in shares for i in share[s * per_rank:(s + 1) * per_rank]]
        image = torch.stack([ds[i][0] for i in idx])
        mask = torch.stack([ds[i][1] for i in idx])
        if disc is not None:
            opt_d.zero_grad()
            with torch.no_grad():
                out = gen(recipe.prepare_input(image, mask))
            sum(recipe.discriminator_losses(image, mask, out, disc).values()).backward()
            opt_d.step()
            disc.requires_grad_(False)
        out = gen(recipe.prepare_input(image, mask))
        losses = recipe.generator_losses(image, mask, out, disc)
        assert ("adv" in losses) == (adv > 0)
        opt.zero_grad()
        sum(recipe.loss_weights[k] * v for k, v in losses.items()).backward()
        opt.step()
        if disc is not None:
            disc.requires_grad_(True)
    ref = gen.state_dict()
    assert set(ref) == set(ddp)
    for name, value in ref.items():
        torch.testing.assert_close(ddp[name], value, rtol=1e-4, atol=1e-5, msg=name)
    if disc is not None:
        for name, value in disc.state_dict().items():
            torch.testing.assert_close(ddp_disc[name], value, rtol=1e-4, atol=1e-5, msg=f"discriminator {name}")
    else:
        assert ddp_disc is None
    # and the run really trained (differs from the initial weights)
    torch.manual_seed(seed)
    init = build_model("tiny_gated", loss_weights=weights, width=4)
    moved = [(ddp[k] - v).abs().max().item() for k, v in init.generator.state_dict().items()]
    assert max(moved) > 1e-3, moved
    if disc is not None:
        moved = [(ddp_disc[k] - v).abs().max().item() for k, v in init.discriminator.state_dict().items()]
        assert max(moved) > 1e-3, moved


# ----------------------------------------------------------------------------- config and CLI


def test_toml_config_and_overrides(tmp_path):
    path = tmp_path / "train.toml"
    path.write_text(textwrap.dedent("""
        steps = 7
        lr = 0.001
        mask = "center"
        betas = [0.9, 0.99]
        [loss_weights]
        adv = 0.05
        [model_options]
        width = 8
    """))
    c = load_config(path, overrides=["steps=9", "amp=bf16", "compile=true", "loss_weights.l1_hole=2",
                                     "betas=0.5,0.9", "ema=0.99"])
    assert c.steps == 9 and c.lr == 0.001 and c.mask == "center" and c.amp == "bf16" and c.compile is True
    assert c.loss_weights == {"adv": 0.05, "l1_hole": 2} and c.betas == (0.5, 0.9) and c.ema == 0.99
    assert c.model_options == {"width": 8}
    assert json.loads(c.to_json())["betas"] == [0.5, 0.9]
    with pytest.raises(ConfigError, match="unknown config key 'stpes'"):
        load_config(path, overrides=["stpes=3"])
    bad = tmp_path / "bad.toml"
    bad.write_text("learning_rate = 0.1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(bad)
    with pytest.raises(ConfigError, match="int"):
        load_config(overrides=["steps=many"])
    with pytest.raises(ConfigError, match="amp"):
        load_config(overrides=["amp=fp8"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(overrides=["steps"])
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text("steps: 3\n")
    try:
        import yaml  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="PyYAML"):
            load_config(yaml_path)
    else:
        assert load_config(yaml_path).steps == 3


def test_cli_train(tmp_path, capsys):
    out = tmp_path / "cli"
    conf = tmp_path / "c.toml"
    conf.write_text('size = 32\nbatch_size = 2\nsamples_per_epoch = 8\nval_batches = 1\n[model_options]\nwidth = 4\n')
    rc = cli.main(["train", "--model", "tiny_gated", "--data", "demo", "--mask", "free_form", "--steps", "2",
                   "--out", str(out), "--config", str(conf), "--set", "mask_options.min_width=2",
                   "--set", "mask_options.max_width=6"])
    assert rc == 0
    text = capsys.readouterr().out
    for line, name in (("checkpoint:", "ckpt_000000002.pt"), ("samples:", "samples.png"),
                       ("metrics:", "metrics.json")):
        assert any(l.startswith(line) and l.endswith(name) for l in text.splitlines()), text
    saved = json.loads((out / "config.json").read_text())
    assert saved["mask"] == "free_form" and saved["mask_options"] == {"min_width": 2, "max_width": 6}
    rc = cli.main(["train", "--out", str(out), "--steps", "3", "--config", str(conf), "--resume"])
    assert rc == 0 and "resumed from" in capsys.readouterr().out
    assert cli.main(["train", "--set", "nonsense=1"]) == 2
    assert "unknown config key" in capsys.readouterr().err


# ----------------------------------------------------------------------------- structure loss


class _TinyFeatures(torch.nn.Module):
    """A small frozen extractor (two layers) for the structure-loss switch, seeded locally."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x):
        a = torch.relu(self.a(x))
        return [a, torch.relu(self.b(a))]


def tiny_extractor():
    return _TinyFeatures()


STRUCTURE = {"extractor": f"{__name__}:tiny_extractor", "patch_size": 7, "num_queries": 16, "weight": 2.0,
             "seed": 3}


def test_structure_loss_switch_adds_to_the_generator_loss(tmp_path):
    result = train(cfg(tmp_path / "fixed", steps=2, val_every=100, structure_loss=STRUCTURE))
    log = read_log(tmp_path / "fixed")
    assert all(np.isfinite(x["structure"]) and x["structure"] > 0 for x in log)
    # the total is the weighted sum, the structure loss at its configured weight
    for x in log:
        expected = x["l1_hole"] + x["l1_valid"] + 2.0 * x["structure"]
        assert abs(x["g_total"] - expected) < 1e-5 * max(1.0, expected)
    assert load_checkpoint(result["checkpoint"])["structure"]["heads"] is None
    with pytest.raises(ValueError, match="unknown structure-loss config keys"):
        train(cfg(tmp_path / "bad", steps=1, structure_loss={**STRUCTURE, "patchsize": 3}))


def test_learned_structure_heads_train_and_resume_exactly(tmp_path):
    learned = {**STRUCTURE, "variant": "learned", "channels": [8, 16], "lr": 1e-2}
    full = train(cfg(tmp_path / "full", steps=4, checkpoint_every=2, val_every=100, structure_loss=learned,
                     lr_schedule="constant"))   # a cosine's curve would depend on `steps`, which differ below
    assert all(np.isfinite(x["structure_heads"]) for x in read_log(tmp_path / "full"))
    train(cfg(tmp_path / "half", steps=2, val_every=100, structure_loss=learned, lr_schedule="constant"))
    resumed = train(cfg(tmp_path / "half", steps=4, checkpoint_every=2, val_every=100, structure_loss=learned,
                        lr_schedule="constant", resume=True))
    a, b = load_checkpoint(full["checkpoint"]), load_checkpoint(resumed["checkpoint"])
    for name, value in a["generator"].items():
        assert torch.equal(value, b["generator"][name]), name
    heads_a, heads_b = a["structure"]["heads"], b["structure"]["heads"]
    assert heads_a is not None and all(torch.equal(v, heads_b[k]) for k, v in heads_a.items())
    at_2 = load_checkpoint(checkpoint_path(tmp_path / "half" / "checkpoints", 2))["structure"]["heads"]
    assert any(not torch.equal(v, at_2[k]) for k, v in heads_b.items())   # the heads trained on


def test_lr_factor_warmup_then_cosine_or_constant():
    from fastinpaint.train.config import lr_factor

    steps, warm = 100, 10
    ramp = [lr_factor("cosine", s, steps, warm) for s in range(warm)]
    assert ramp == pytest.approx([(s + 1) / warm for s in range(warm)])
    assert lr_factor("cosine", warm, steps, warm) == pytest.approx(1.0)
    mid = warm + (steps - warm) // 2
    assert lr_factor("cosine", mid, steps, warm) == pytest.approx(0.5)
    assert lr_factor("cosine", steps, steps, warm) == pytest.approx(0.0, abs=1e-12)
    values = [lr_factor("cosine", s, steps) for s in range(steps)]
    assert all(a >= b for a, b in zip(values, values[1:]))       # falls monotonically
    assert {lr_factor("constant", s, steps) for s in range(steps)} == {1.0}
    with pytest.raises(ValueError, match="schedule"):
        lr_factor("linear", 0, steps)


def test_the_trainer_follows_the_schedule(tmp_path):
    """The optimiser's learning rate at each step is config.lr times lr_factor of that step."""
    from fastinpaint.train.config import lr_factor

    seen = []
    trainer_lr = {}

    def record(step):
        seen.append((step, trainer_lr["opt"].param_groups[0]["lr"]))

    config = cfg(tmp_path / "run", steps=6, lr=1e-3, lr_schedule="cosine", warmup_steps=2)
    import fastinpaint.train.trainer as trainer_mod

    original = trainer_mod.Trainer.set_learning_rates

    def spy(self):
        original(self)
        trainer_lr["opt"] = self.opt_g

    trainer_mod.Trainer.set_learning_rates = spy
    try:
        train(config, on_step=record)
    finally:
        trainer_mod.Trainer.set_learning_rates = original
    assert [s for s, _ in seen] == list(range(1, 7))
    assert [lr for _, lr in seen] == pytest.approx([1e-3 * lr_factor("cosine", s - 1, 6, 2) for s, _ in seen])


def test_a_bad_schedule_names_itself():
    with pytest.raises(ConfigError, match="lr_schedule"):
        TrainConfig(lr_schedule="linear")


def test_validation_lines_do_not_run_into_the_progress_bar(tmp_path):
    """stdout and stderr into one file (as `> log 2>&1`): every validation line starts a line."""
    out = tmp_path / "run"
    code = ("import sys; from fastinpaint.train import TrainConfig, train; "
            f"train(TrainConfig.from_dict({{**{TINY!r}, 'out': {str(out)!r}, 'steps': 4, 'val_every': 2}}))")
    with open(tmp_path / "log.txt", "w") as f:
        proc = subprocess.run([sys.executable, "-c", code], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, timeout=300)
    assert proc.returncode == 0
    text = (tmp_path / "log.txt").read_text().replace("\r", "\n")
    lines = [x for x in text.split("\n") if "validation psnr=" in x]
    assert len(lines) == 3 and all(x.startswith("fastinpaint train: step") for x in lines), lines
