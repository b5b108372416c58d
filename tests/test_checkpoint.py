"""Checkpoint I/O: exact round trips, retention, corruption detection and fallback,
crash safety under SIGKILL, and safetensors weights."""

import collections
import io
import os
import random
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import time
import warnings
import zlib

import numpy as np
import pytest
import torch

from fastinpaint.train import checkpoint as ck
from fastinpaint.train.checkpoint import (HEADER_SIZE, CheckpointError, CheckpointWarning,
                                          list_checkpoints, load_checkpoint, load_latest,
                                          load_weights, rng_state, save_checkpoint,
                                          save_weights, set_rng_state, weights_metadata)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def assert_same(a, b, where="state"):
    """Exact equality, recursively, including container and tensor types."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device), where
        assert torch.equal(a, b), f"{where}: tensor values differ"
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(4)
        self.drop = torch.nn.Dropout(0.3)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        y = self.drop(torch.relu(self.norm(self.conv(x))))
        return self.head(y.mean((2, 3)))


def train_steps(model, optim, scaler, steps):
    """Steps that draw from every global generator: torch (data, dropout), numpy, random."""
    for _ in range(steps):
        x = torch.randn(2, 3, 8, 8)
        x = x + float(np.random.standard_normal()) + random.random()
        loss = model(x).square().mean()
        optim.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optim)
        scaler.update()


def make_scaler():
    return torch.amp.GradScaler("cpu")


def realistic_state(step=3):
    torch.manual_seed(0)
    model = Net()
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = make_scaler()
    train_steps(model, optim, scaler, 2)
    return {
        "generator": model.state_dict(),
        "optim_g": optim.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_state(),
        "step": step,
        "data": {"epoch": 2, "batch": 17},
        "config": {"lr": 1e-3, "name": "run-a", "sizes": [256, 256], "betas": (0.9, 0.999),
                   "resume": None, "amp": True},
    }


def corrupt_newest(directory, how):
    """Damage the newest checkpoint in one of several ways; returns its path."""
    path = list_checkpoints(directory)[-1]
    data = bytearray(path.read_bytes())
    if how == "empty":
        data = b""
    elif how.startswith("cut:"):
        data = data[:int(how[4:])]
    elif how == "flip_payload":
        data[len(data) - 2000] ^= 0x01
    elif how == "flip_header":
        data[12] ^= 0x01          # the step field; the CRC catches it
    elif how == "random":
        data = bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8))
    path.write_bytes(bytes(data))
    return path


@pytest.fixture
def two_checkpoints(tmp_path):
    """Checkpoints of step 1 and 2, each with a distinguishable payload."""
    states = {}
    for step in (1, 2):
        states[step] = {"weights": torch.full((64, 64), float(step)), "step": step}
        save_checkpoint(tmp_path, step, states[step])
    return tmp_path, states


# ---------------------------------------------------------------------- round trips

def test_realistic_state_round_trips_exactly(tmp_path):
    state = realistic_state()
    path = save_checkpoint(tmp_path, 3, state)
    assert path == tmp_path / "ckpt_000000003.pt"
    loaded = load_checkpoint(path)
    assert_same(state, loaded)
    assert loaded["optim_g"]["state"], "the optimiser must have state after a step"
    assert loaded["scaler"]["scale"] > 0
    # No temporary files are left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_000000003.pt"]


def test_payload_loads_with_weights_only_and_header_describes_it(tmp_path):
    state = realistic_state()
    path = save_checkpoint(tmp_path, 3, state)
    raw = path.read_bytes()
    magic, version, step, length, _ = struct.unpack_from("<8sIQQ32s", raw)
    assert (magic, version, step, length) == (b"FINPCKPT", 1, 3, len(raw) - HEADER_SIZE)
    # The payload is an ordinary torch.save stream that the safe loader accepts.
    plain = torch.load(io.BytesIO(raw[HEADER_SIZE:]), weights_only=True)
    assert_same(state, plain)
    # The RNG state alone as well: no numpy objects hide in it.
    buf = io.BytesIO()
    torch.save(rng_state(), buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)


def test_values_weights_only_cannot_load_are_refused_before_writing(tmp_path):
    for bad, where in [({"rng": {"np": np.zeros(3)}}, "state['rng']['np']"),
                       ({"lr": np.float64(0.1)}, "state['lr']"),
                       ({"pos": [1, np.int64(2)]}, "state['pos'][1]"),
                       ({"d": collections.defaultdict(int)}, "state['d']")]:
        with pytest.raises(TypeError, match=r"weights_only") as info:
            save_checkpoint(tmp_path, 1, bad)
        assert where in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_resumed_training_matches_uninterrupted_training(tmp_path):
    def fresh(seed):
        torch.manual_seed(seed)
        model = Net()
        return model, torch.optim.Adam(model.parameters(), lr=1e-2), make_scaler()

    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    model, optim, scaler = fresh(0)
    train_steps(model, optim, scaler, 3)
    save_checkpoint(tmp_path, 3, {"generator": model.state_dict(), "optim_g": optim.state_dict(),
                                  "scaler": scaler.state_dict(), "rng": rng_state()})
    train_steps(model, optim, scaler, 3)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    random.seed(123), np.random.seed(123)
    model2, optim2, scaler2 = fresh(99)     # different initial weights and RNG
    state, path = load_latest(tmp_path)
    assert path.name == "ckpt_000000003.pt"
    model2.load_state_dict(state["generator"])
    optim2.load_state_dict(state["optim_g"])
    scaler2.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    train_steps(model2, optim2, scaler2, 3)
    assert_same(expected, dict(model2.state_dict()))


def draws():
    return ([random.random() for _ in range(5)] + [random.gauss(0, 1)],
            np.random.standard_normal(7).tolist() + np.random.randint(0, 1 << 30, 3).tolist(),
            torch.randn(9).tolist() + torch.randint(0, 1 << 30, (3,)).tolist())


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    random.gauss(0, 1)              # leaves a cached second gaussian in `random`
    np.random.standard_normal(1)    # and in numpy's legacy generator
    state = rng_state()
    assert state["python"]["gauss_next"] is not None and state["numpy"]["has_gauss"] == 1
    expected = draws()
    save_checkpoint(tmp_path, 0, {"rng": state})

    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    assert draws() != expected      # the generators really moved elsewhere
    set_rng_state(load_checkpoint(tmp_path / "ckpt_000000000.pt")["rng"])
    assert draws() == expected


def test_rng_state_without_cuda_skips_it():
    state = rng_state()
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        assert state["cuda"] is None
    with pytest.raises(ValueError, match="numpy"):
        set_rng_state({"python": state["python"], "torch": state["torch"]})


@requires_cuda
@pytest.mark.gpu
def test_cuda_rng_states_round_trip(tmp_path):
    torch.cuda.init()
    torch.cuda.manual_seed_all(3)
    state = rng_state()
    assert len(state["cuda"]) == torch.cuda.device_count()
    expected = torch.randn(16, device="cuda").cpu()
    save_checkpoint(tmp_path, 0, {"rng": state})
    torch.cuda.manual_seed_all(4)
    set_rng_state(load_checkpoint(tmp_path / "ckpt_000000000.pt")["rng"])
    assert torch.equal(torch.randn(16, device="cuda").cpu(), expected)


# ------------------------------------------------------------------ retention, args

def test_keep_retains_the_newest_checkpoints(tmp_path):
    for step in range(6):
        save_checkpoint(tmp_path, step * 10, {"step": step}, keep=2)
        kept = [p.name for p in list_checkpoints(tmp_path)]
        assert kept == [f"ckpt_{s * 10:09d}.pt" for s in range(max(0, step - 1), step + 1)]
    save_checkpoint(tmp_path, 60, {"step": 6}, keep=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "ckpt_000000040.pt", "ckpt_000000050.pt", "ckpt_000000060.pt"]
    # The checkpoint just written survives even when newer ones exist (a resumed run).
    save_checkpoint(tmp_path, 45, {"step": 4.5}, keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_000000045.pt", "ckpt_000000060.pt"]
    # Saving a step again replaces it.
    save_checkpoint(tmp_path, 60, {"step": "again"}, keep=5)
    assert load_checkpoint(tmp_path / "ckpt_000000060.pt") == {"step": "again"}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_list_checkpoints_orders_by_step_and_ignores_other_files(tmp_path):
    for step in (7, 1_000_000_000, 30):
        save_checkpoint(tmp_path, step, {"s": step}, keep=10)
    (tmp_path / "ckpt_12.pt").write_bytes(b"x")               # not the naming scheme
    (tmp_path / ".ckpt_000000099.1.abc.tmp").write_bytes(b"x")
    (tmp_path / "ckpt_000000005.pt").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "ckpt_000000007.pt", "ckpt_000000030.pt", "ckpt_1000000000.pt"]
    assert list_checkpoints(tmp_path / "absent") == []
    assert load_latest(tmp_path / "absent") is None
    (tmp_path / "empty").mkdir()
    assert load_latest(tmp_path / "empty") is None


@pytest.mark.parametrize("kwargs, error", [
    ({"step": 1, "keep": 0}, ValueError), ({"step": 1, "keep": -2}, ValueError),
    ({"step": -1}, ValueError), ({"step": 1.0}, TypeError), ({"step": True}, TypeError),
    ({"step": 1, "keep": 2.5}, TypeError)])
def test_bad_arguments_are_refused(tmp_path, kwargs, error):
    with pytest.raises(error):
        save_checkpoint(tmp_path, state={"a": 1}, **kwargs)
    assert list_checkpoints(tmp_path) == []


def test_a_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, {"a": torch.ones(3)})

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"partial" * 1000)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(tmp_path, 2, {"a": torch.zeros(3)}, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_000000001.pt"]


# ------------------------------------------------------------------------ corruption

def _payload_cuts(size):
    return [size - 1, HEADER_SIZE + 1, HEADER_SIZE + (size - HEADER_SIZE) // 2]


@pytest.mark.parametrize("how, message", [
    ("empty", r"empty file \(0 bytes\)"),
    ("cut:5", r"truncated inside the header: expected at least 64 bytes, got 5"),
    ("cut:30", r"truncated inside the header: expected at least 64 bytes, got 30"),
    (f"cut:{HEADER_SIZE - 1}", r"truncated inside the header: expected at least 64 bytes, got 63"),
    (f"cut:{HEADER_SIZE}", r"truncated: expected \d+ bytes, got 64$"),
    ("flip_payload", r"checksum mismatch"),
    ("flip_header", r"corrupt header: CRC-32 mismatch"),
    ("random", r"not a fastinpaint checkpoint: bad magic"),
])
def test_damaged_checkpoint_is_reported_and_skipped(two_checkpoints, how, message):
    directory, states = two_checkpoints
    bad = corrupt_newest(directory, how)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(bad)
    assert bad.name in str(info.value) and info.value.path == bad
    assert isinstance(info.value, RuntimeError)
    with pytest.warns(CheckpointWarning, match=r"ckpt_000000002\.pt.*" + message.rstrip("$")):
        state, path = load_latest(directory)
    assert path.name == "ckpt_000000001.pt"
    assert_same(states[1], state)


def test_truncation_anywhere_in_the_payload_is_detected(two_checkpoints):
    directory, states = two_checkpoints
    path = list_checkpoints(directory)[-1]
    full = path.read_bytes()
    for cut in _payload_cuts(len(full)):
        path.write_bytes(full[:cut])
        with pytest.raises(CheckpointError, match=rf"truncated: expected {len(full)} bytes, got {cut}"):
            load_checkpoint(path)
    path.write_bytes(full)
    assert_same(states[2], load_checkpoint(path))


def test_a_flipped_payload_byte_that_torch_load_misses_is_caught(two_checkpoints):
    directory, _ = two_checkpoints
    path = corrupt_newest(directory, "flip_payload")
    # torch.load alone reads the damaged payload without complaint...
    raw = path.read_bytes()[HEADER_SIZE:]
    damaged = torch.load(io.BytesIO(raw), weights_only=True)
    assert not torch.equal(damaged["weights"], torch.full((64, 64), 2.0))
    # ...the checksum does not.
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(path)


def _rewrite_header(path, **fields):
    raw = bytearray(path.read_bytes())
    values = dict(zip(["magic", "version", "step", "length", "sha"], struct.unpack_from("<8sIQQ32s", raw)))
    values.update(fields)
    head = struct.pack("<8sIQQ32s", *values.values())
    raw[:HEADER_SIZE] = head + struct.pack("<I", zlib.crc32(head))
    path.write_bytes(bytes(raw))


def test_other_faults_have_their_own_messages(two_checkpoints):
    directory, _ = two_checkpoints
    path = list_checkpoints(directory)[-1]
    good = path.read_bytes()

    _rewrite_header(path, version=2)
    with pytest.raises(CheckpointError, match=r"unsupported checkpoint format version 2 \(this fastinpaint reads version 1\)"):
        load_checkpoint(path)
    path.write_bytes(good)
    _rewrite_header(path, step=7)
    with pytest.raises(CheckpointError, match="header says step 7 but the file name says step 2"):
        load_checkpoint(path)
    path.write_bytes(good + b"\0")
    with pytest.raises(CheckpointError, match=rf"expected {len(good)} bytes, got {len(good) + 1}"):
        load_checkpoint(path)
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="plain torch.save file"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(directory / "ckpt_000000099.pt")


def test_all_checkpoints_damaged_raises_listing_them(two_checkpoints):
    directory, _ = two_checkpoints
    first, second = list_checkpoints(directory)
    first.write_bytes(first.read_bytes()[:100])
    second.write_bytes(b"")
    with pytest.warns(CheckpointWarning) as record:
        with pytest.raises(CheckpointError, match="none of its 2 checkpoints is usable") as info:
            load_latest(directory)
    assert len(record) == 2
    assert first.name in str(info.value) and second.name in str(info.value)
    assert "empty file" in str(info.value) and "truncated" in str(info.value)


# --------------------------------------------------------------------- crash safety

CHILD = textwrap.dedent("""
    import os, sys, time, torch
    from fastinpaint.train import checkpoint as ck

    directory, stage, marker = sys.argv[1], sys.argv[2], sys.argv[3]

    def stop_here(*args, **kwargs):
        open(marker, "w").close()      # tell the parent where we are, then wait for SIGKILL
        time.sleep(120)
        sys.exit("not killed")

    if stage == "payload":             # partway through streaming the payload
        write = ck._HashingWriter.write
        def slow_write(self, data):     # in 1 MiB pieces, so we stop inside the tensor data
            view = memoryview(data).cast("B")
            for i in range(0, len(view), 1 << 20):
                write(self, view[i:i + (1 << 20)])
                if self.length > (4 << 20):
                    stop_here()
            return len(view)
        ck._HashingWriter.write = slow_write
    elif stage == "before_rename":     # payload and header written and fsynced
        ck.os.replace = stop_here
    elif stage == "before_dir_fsync":  # renamed, the old checkpoint not yet pruned
        ck._fsync_directory = stop_here
    big = {"weights": torch.arange(int(sys.argv[4]), dtype=torch.float32), "step": 2}
    if stage == "unhooked":            # start when the parent is watching
        open(marker + ".ready", "w").close()
        while not os.path.exists(marker + ".go"):
            time.sleep(0.002)
    ck.save_checkpoint(directory, 2, big, keep=1)
    sys.exit("finished")
""")


def _start_child(script, directory, stage, numel):
    marker = str(directory) + f".{stage}.marker"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, str(script), str(directory), stage, marker, str(numel)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return proc, marker


def _wait_for(proc, condition, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"child exited ({proc.returncode}) before {what}:\n{err.decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.001)


def _kill(proc):
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close(), proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def _temp_files(directory):
    return [p for p in directory.iterdir() if p.name.startswith(".ckpt_") and p.name.endswith(".tmp")]



def _growing_temp(directory):
    for p in _temp_files(directory):
        try:
            if p.stat().st_size > (1 << 20):
                return True
        except FileNotFoundError:       # renamed or removed meanwhile
            pass
    return False


def _kill_while_writing(script, directory, proc, marker, previous, numel):
    """No hook: SIGKILL the child as soon as its temporary file holds data. Should the
    child outrun us, start over with a bigger state."""
    for attempt in range(4):
        _wait_for(proc, lambda: os.path.exists(marker + ".ready"), "the child to be ready")
        open(marker + ".go", "w").close()
        deadline = time.monotonic() + 60
        while proc.poll() is None and not _growing_temp(directory) and time.monotonic() < deadline:
            time.sleep(0.0005)
        if proc.poll() is None:
            _kill(proc)
        else:
            proc.communicate()
        if _temp_files(directory):
            return
        for p in list_checkpoints(directory):       # too late: start over
            p.unlink()
        save_checkpoint(directory, 1, previous, keep=1)
        for suffix in (".ready", ".go"):
            os.unlink(marker + suffix)
        numel *= 2
        proc, marker = _start_child(script, directory, "unhooked", numel)
    pytest.fail("never managed to kill the child while it was writing")


def test_sigkill_during_save_never_loses_the_previous_checkpoint(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    previous = {"weights": torch.full((32,), 1.0), "step": 1}
    numel = 32 << 20                                  # a 128 MiB payload
    stages = ["payload", "before_rename", "before_dir_fsync", "unhooked"]
    runs = {}
    for stage in stages:                              # all children start together
        directory = tmp_path / stage
        save_checkpoint(directory, 1, previous, keep=1)
        runs[stage] = (directory, *_start_child(script, directory, stage, numel))

    for stage in stages:
        directory, proc, marker = runs[stage]
        if stage == "unhooked":
            _kill_while_writing(script, directory, proc, marker, previous, numel)
        else:
            _wait_for(proc, lambda: os.path.exists(marker), f"stage {stage}")
            _kill(proc)

        with warnings.catch_warnings():
            warnings.simplefilter("error")            # no damaged checkpoint to skip
            state, path = load_latest(directory)
        names = [p.name for p in list_checkpoints(directory)]
        if stage == "before_dir_fsync":
            # Renamed: the new checkpoint is complete; the old one was not yet pruned.
            assert names == ["ckpt_000000001.pt", "ckpt_000000002.pt"], stage
            assert path.name == "ckpt_000000002.pt" and state["weights"].numel() == numel
            assert_same(previous, load_checkpoint(directory / "ckpt_000000001.pt"))
            assert not _temp_files(directory)
            continue
        assert names == ["ckpt_000000001.pt"], stage
        assert path.name == "ckpt_000000001.pt"
        assert_same(previous, state)
        # The unfinished file exists only under a temporary name. Killed before the
        # rename, it is complete but unpublished; killed while writing, it is unloadable.
        (temp,) = _temp_files(directory)
        if stage == "before_rename":
            assert load_checkpoint(temp)["weights"].numel() == numel
        else:
            with pytest.raises(CheckpointError, match="truncated|magic|checksum|header"):
                load_checkpoint(temp)

        # The next save removes this scheme's stale temporary files older than the
        # newest checkpoint, and nobody else's.
        foreign = [directory / "notes.tmp", directory / ".ckpt_000000099.1.ab.tmp"]
        for p in foreign:
            p.write_bytes(b"someone else's")
        save_checkpoint(directory, 3, {"step": 3}, keep=1)
        assert sorted(p.name for p in directory.iterdir()) == sorted(
            [".ckpt_000000099.1.ab.tmp", "ckpt_000000003.pt", "notes.tmp"]), stage


# --------------------------------------------------------------------------- weights

def test_safetensors_weights_round_trip(tmp_path):
    base = torch.randn(6, 4)
    tensors = {
        "conv.weight": torch.randn(4, 3, 3, 3).to(memory_format=torch.channels_last),
        "head.weight": base,
        "tied.weight": base,                  # the same tensor under two names
        "head.weight_t": base.t(),            # a non-contiguous view of it
        "row": base[2],                       # a view sharing its memory
        "half": torch.randn(5).to(torch.bfloat16),
        "count": torch.tensor(7, dtype=torch.int64),
        "mask": torch.rand(3, 3) > 0.5,
        "param": torch.nn.Parameter(torch.randn(2)),
    }
    path = save_weights(tmp_path / "release" / "model.safetensors", tensors,
                        metadata={"format": "pt", "step": "1200"})
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]
    loaded = load_weights(path)
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and loaded[name].device.type == "cpu", name
        assert torch.equal(loaded[name], t.detach()), name
        assert loaded[name].is_contiguous()
    assert weights_metadata(path) == {"format": "pt", "step": "1200"}
    # The file gets the usual permissions (0o666 less the umask), like every other output.
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    # The originals were not touched.
    assert tensors["head.weight"] is base and not tensors["head.weight_t"].is_contiguous()

    # Overwriting is atomic too, and a damaged file is a CheckpointError.
    save_weights(path, {"a": torch.ones(3)})
    assert list(load_weights(path)) == ["a"] and weights_metadata(path) == {}
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*not a valid safetensors file"):
        load_weights(path)
    with pytest.raises(TypeError, match="metadata"):
        save_weights(path, {"a": torch.ones(1)}, metadata={"step": 3})
    with pytest.raises(FileNotFoundError):
        load_weights(tmp_path / "missing.safetensors")


@requires_cuda
@pytest.mark.gpu
def test_safetensors_weights_from_cuda(tmp_path):
    t = torch.randn(8, 8, device="cuda")
    save_weights(tmp_path / "w.safetensors", {"w": t.t()})
    assert torch.equal(load_weights(tmp_path / "w.safetensors")["w"], t.t().cpu())
