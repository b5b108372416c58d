"""Checkpoints that survive crashes, and safetensors weights for release.

A training checkpoint is one file, ``<dir>/ckpt_<step:09d>.pt``::

    offset  size  field
         0     8  magic b"FINPCKPT"
         8     4  format version (uint32, little-endian), currently 1
        12     8  step (uint64)
        20     8  payload length in bytes (uint64)
        28    32  sha256 of the payload
        60     4  CRC-32 of bytes 0..59 (the header itself)
        64     -  payload: the state written by ``torch.save``

The integrity data lives in a header inside the file rather than in a sidecar so that
one ``os.replace`` publishes checkpoint and checksum together: there is never a
checkpoint without its checksum, or a sidecar left over from an older checkpoint of the
same step, and retention deletes one file per checkpoint. The payload is streamed to a
temporary file in the same directory while it is hashed, the header is written into the
space reserved for it, then the file is flushed, fsynced and renamed to its final name,
and the directory is fsynced. A process killed at any point therefore leaves either the
previous set of complete checkpoints or that set plus the new complete one; only
temporary files (``.ckpt_<step>.<pid>.<random>.tmp``) can be partial, and
:func:`list_checkpoints` never returns them. Older checkpoints are deleted only after
the new one is durable.

:func:`load_checkpoint` checks the magic, version, header CRC, file length and sha256
before unpickling, so a truncated file or a flipped bit is reported as such
(:class:`CheckpointError`) even where ``torch.load`` would read garbage without noticing.
Payloads are read with ``torch.load(weights_only=True)``; :func:`save_checkpoint`
refuses, when saving, any value that loader could not read back.

Typical use in a training loop::

    found = load_latest(run_dir)
    if found is not None:
        state, path = found
        generator.load_state_dict(state["generator"]); ...
        set_rng_state(state["rng"])
    ...
    save_checkpoint(run_dir, step, {"generator": generator.state_dict(), ...,
                                    "rng": rng_state(), "data": {"epoch": e, "batch": b}},
                    keep=3)
"""

from __future__ import annotations

import collections
import errno
import hashlib
import io
import os
import random
import re
import secrets
import stat
import struct
import warnings
import zlib
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

__all__ = [
    "CheckpointError", "CheckpointWarning", "FORMAT_VERSION", "HEADER_SIZE", "checkpoint_path",
    "list_checkpoints", "load_checkpoint", "load_latest", "load_weights", "rng_state",
    "save_checkpoint", "save_weights", "set_rng_state", "weights_metadata",
]

MAGIC = b"FINPCKPT"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIQQ32s")      # magic, version, step, payload length, sha256
_CRC = struct.Struct("<I")
HEADER_SIZE = _HEADER.size + _CRC.size    # 64

_CKPT_RE = re.compile(r"^ckpt_(\d{9,})\.pt$")
_CKPT_TMP_RE = re.compile(r"^\.ckpt_(\d{9,})\.\d+\.[0-9a-f]+\.tmp$")


class CheckpointError(RuntimeError):
    """A checkpoint or weights file is truncated, corrupt, or not one of ours."""

    def __init__(self, path, reason: str):
        super().__init__(f"checkpoint {path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self):
        return (type(self), (self.path, self.reason))


class CheckpointWarning(UserWarning):
    """An unusable checkpoint was skipped in favour of an older one."""


# ----------------------------------------------------------------------------- RNG state

def rng_state() -> dict:
    """The state of every global generator a training run draws from.

    Python's ``random``, numpy's global generator, torch's CPU generator, and each CUDA
    device's generator when CUDA has been initialised (``"cuda"`` is None otherwise).
    Only tensors, ints, floats and None: the result loads with ``weights_only=True``.
    """
    version, internal, gauss_next = random.getstate()
    np_state = np.random.get_state(legacy=True)
    if not isinstance(np_state, tuple) or np_state[0] != "MT19937":
        raise TypeError("numpy's global generator is not MT19937; rng_state() cannot record it")
    name, keys, pos, has_gauss, cached_gaussian = np_state
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return {
        "python": {"version": int(version),
                   "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {"bit_generator": str(name),
                  "key": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
                  "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }


def set_rng_state(state: Mapping) -> None:
    """Restore generators from :func:`rng_state`'s result (possibly after a checkpoint
    round trip). CUDA states are restored on the devices that exist; a mismatch in the
    device count, or CUDA states without CUDA, gives a warning."""
    missing = {"python", "numpy", "torch"} - set(state)
    if missing:
        raise ValueError(f"RNG state lacks {sorted(missing)}; expected the result of rng_state()")
    py = state["python"]
    internal = py["state"]
    internal = internal.tolist() if isinstance(internal, torch.Tensor) else list(internal)
    random.setstate((int(py["version"]), tuple(int(x) for x in internal), py["gauss_next"]))

    npst = state["numpy"]
    key = npst["key"]
    key = key.cpu().numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
    np.random.set_state((npst["bit_generator"], key.astype(np.uint32), int(npst["pos"]),
                         int(npst["has_gauss"]), float(npst["cached_gaussian"])))

    torch.set_rng_state(state["torch"].detach().cpu())

    cuda = state.get("cuda")
    if cuda:
        if not torch.cuda.is_available():
            warnings.warn("the RNG state holds CUDA generator states but CUDA is not available; "
                          "they were not restored", CheckpointWarning, stacklevel=2)
            return
        count = torch.cuda.device_count()
        if len(cuda) != count:
            warnings.warn(f"the RNG state holds {len(cuda)} CUDA generator states but "
                          f"{count} devices are visible; restored the first "
                          f"{min(count, len(cuda))}", CheckpointWarning, stacklevel=2)
        for index, s in enumerate(cuda[:count]):
            torch.cuda.set_rng_state(s.detach().cpu(), index)


# ------------------------------------------------------------------- validation helpers

def _check_step(step) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"step must be an int, got {type(step).__name__}")
    step = int(step)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step >= 2 ** 64:
        raise ValueError(f"step must be < 2**64, got {step}")
    return step


def _check_keep(keep) -> int:
    if isinstance(keep, bool) or not isinstance(keep, (int, np.integer)):
        raise TypeError(f"keep must be an int, got {type(keep).__name__}")
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (the checkpoint just written is always kept), got {keep}")
    return int(keep)


_ATOMS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)
_TENSORS = (torch.Tensor, torch.nn.Parameter)
_MAPPINGS = (dict, collections.OrderedDict)
_SEQUENCES = (list, tuple, set)


def _check_weights_only(state) -> None:
    """Refuse, at save time, what ``torch.load(weights_only=True)`` would refuse at
    resume time. Types are matched exactly: numpy scalars subclass float, and
    namedtuples or defaultdicts pickle as their own classes."""
    stack = [("state", state)]
    while stack:
        where, value = stack.pop()
        kind = type(value)
        if kind in _ATOMS or kind in _TENSORS:
            continue
        if kind in _MAPPINGS:
            for k, v in value.items():
                if type(k) not in _ATOMS:
                    raise TypeError(f"{where} has a key of type {type(k).__qualname__}; "
                                    "checkpoint keys must be strings, numbers or None")
                stack.append((f"{where}[{k!r}]", v))
            continue
        if kind in _SEQUENCES:
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(value))
            continue
        raise TypeError(
            f"{where} is a {kind.__module__}.{kind.__qualname__}, which "
            "torch.load(weights_only=True) cannot read back; store tensors, numbers, strings, "
            "None and dicts/lists/tuples of them (numpy arrays as torch.from_numpy(a) or "
            "a.tolist(), numpy scalars as int(x)/float(x))")


# --------------------------------------------------------------------- file plumbing

def _create_temp(directory: Path, prefix: str) -> tuple[Path, int]:
    """A new file in ``directory`` named ``<prefix><pid>.<random>.tmp``, opened for
    writing with O_EXCL and the usual permissions (umask applies, unlike mkstemp)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        path = directory / f"{prefix}{os.getpid()}.{secrets.token_hex(6)}.tmp"
        try:
            return path, os.open(path, flags, 0o666)
        except FileExistsError:
            continue


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable. Not possible on Windows, and some file
    systems refuse it (EINVAL); there the rename is as durable as the system makes it."""
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


class _HashingWriter:
    """The file object torch.save writes to: passes bytes through, hashing and counting."""

    def __init__(self, file):
        self._file = file
        self.sha256 = hashlib.sha256()
        self.length = 0

    def write(self, data) -> int:
        view = memoryview(data)
        self.sha256.update(view)
        self.length += view.nbytes
        return self._file.write(view)

    def flush(self) -> None:
        self._file.flush()


def _pack_header(step: int, length: int, digest: bytes) -> bytes:
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, step, length, digest)
    return head + _CRC.pack(zlib.crc32(head))


# ------------------------------------------------------------------------ checkpoints

def checkpoint_path(directory, step: int) -> Path:
    """Where the checkpoint of ``step`` lives in ``directory``."""
    return Path(directory) / f"ckpt_{_check_step(step):09d}.pt"


def list_checkpoints(directory) -> list[Path]:
    """The checkpoints (final names only, never temporary files) in ``directory``,
    oldest step first. An absent directory has none."""
    directory = Path(directory)
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        m = _CKPT_RE.match(entry.name)
        if m and entry.is_file():
            found.append((int(m.group(1)), Path(entry.path)))
    found.sort()
    return [p for _, p in found]


def save_checkpoint(directory, step: int, state: dict, keep: int = 3) -> Path:
    """Write ``state`` atomically to ``<directory>/ckpt_<step:09d>.pt`` and keep the
    newest ``keep`` checkpoints (always including this one). Returns the path.

    ``state`` is a dict of tensors, numbers, strings, None and nested dicts/lists/tuples
    of them (state_dicts of modules, optimisers and grad scalers qualify); anything else
    raises TypeError before a byte is written. A checkpoint of the same step is replaced.
    """
    step = _check_step(step)
    keep = _check_keep(keep)
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    _check_weights_only(state)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(directory, step)

    tmp, fd = _create_temp(directory, f".ckpt_{step:09d}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(bytes(HEADER_SIZE))          # reserved; filled in once the payload is hashed
            writer = _HashingWriter(f)
            torch.save(state, writer)
            f.flush()
            f.seek(0)
            f.write(_pack_header(step, writer.length, writer.sha256.digest()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_directory(directory)   # the new checkpoint is durable before any old one goes
    _prune(directory, final, keep)
    return final


def _prune(directory: Path, just_written: Path, keep: int) -> None:
    checkpoints = list_checkpoints(directory)
    survivors = set(checkpoints[-keep:]) | {just_written}
    for path in checkpoints:
        if path not in survivors:
            try:
                _unlink_quietly(path)
            except OSError as e:
                warnings.warn(f"could not delete old checkpoint {path}: {e}", CheckpointWarning,
                              stacklevel=3)
    # Temporary files of this scheme for an older step than the newest checkpoint, and
    # last modified before it, were left by writers that died: nobody will finish them.
    # Anything else (other names, a step still being written elsewhere) is left alone.
    newest = checkpoints[-1] if checkpoints else just_written
    try:
        newest_step = int(_CKPT_RE.match(newest.name).group(1))
        newest_mtime = newest.stat().st_mtime
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        m = _CKPT_TMP_RE.match(entry.name)
        if not m or int(m.group(1)) >= newest_step:
            continue
        try:
            if entry.is_file() and entry.stat().st_mtime <= newest_mtime:
                _unlink_quietly(Path(entry.path))
        except OSError:
            pass


def _read_header(path: Path, head: bytes, size: int) -> tuple[int, int, bytes]:
    """(step, payload length, sha256) from the first bytes of a file of ``size`` bytes."""
    if size == 0:
        raise CheckpointError(path, "empty file (0 bytes), not a fastinpaint checkpoint")
    if head[:len(MAGIC)] != MAGIC[:len(head)]:
        hint = ""
        if head.startswith(b"PK\x03\x04"):
            hint = " (it looks like a plain torch.save file; checkpoints are written by save_checkpoint)"
        raise CheckpointError(path, f"not a fastinpaint checkpoint: bad magic {head[:8]!r}, "
                                    f"expected {MAGIC!r}{hint}")
    if len(head) < HEADER_SIZE:
        raise CheckpointError(path, f"truncated inside the header: expected at least "
                                    f"{HEADER_SIZE} bytes, got {size}")
    magic, version, step, length, digest = _HEADER.unpack_from(head)
    if version != FORMAT_VERSION:
        raise CheckpointError(path, f"unsupported checkpoint format version {version} "
                                    f"(this fastinpaint reads version {FORMAT_VERSION})")
    (crc,) = _CRC.unpack_from(head, _HEADER.size)
    if crc != zlib.crc32(head[:_HEADER.size]):
        raise CheckpointError(path, "corrupt header: CRC-32 mismatch")
    expected = HEADER_SIZE + length
    if size < expected:
        raise CheckpointError(path, f"truncated: expected {expected} bytes, got {size}")
    if size > expected:
        raise CheckpointError(path, f"corrupt: expected {expected} bytes, got {size} "
                                    "(trailing data after the payload)")
    return step, length, digest


def load_checkpoint(path, map_location="cpu") -> dict:
    """Verify and load a checkpoint written by :func:`save_checkpoint`.

    Raises :class:`CheckpointError` (naming the file and the fault) for a truncated,
    corrupt, foreign or newer-format file; ``FileNotFoundError`` if there is no file.
    """
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(HEADER_SIZE)
        step, length, digest = _read_header(path, head, size)
        payload = f.read(length)
    if len(payload) != length:    # the file shrank while we read it
        raise CheckpointError(path, f"truncated: expected {HEADER_SIZE + length} bytes, "
                                    f"got {HEADER_SIZE + len(payload)}")
    actual = hashlib.sha256(payload).digest()
    if actual != digest:
        raise CheckpointError(path, f"checksum mismatch: sha256 of the payload is "
                                    f"{actual.hex()[:16]}..., the header says {digest.hex()[:16]}...")
    m = _CKPT_RE.match(path.name)
    if m and int(m.group(1)) != step:
        raise CheckpointError(path, f"the header says step {step} but the file name says "
                                    f"step {int(m.group(1))}")
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(path, f"the payload passed its checksum but torch.load"
                                    f"(weights_only=True) failed: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(path, f"the payload is a {type(state).__name__}, not a dict")
    return state


def load_latest(directory, map_location="cpu") -> tuple[dict, Path] | None:
    """Load the newest usable checkpoint in ``directory``: ``(state, path)``.

    An unusable checkpoint is skipped with a :class:`CheckpointWarning` naming it and
    the fault, and the one before it is tried. None when there are no checkpoints;
    :class:`CheckpointError` listing every fault when none of them is usable.
    """
    checkpoints = list_checkpoints(directory)
    if not checkpoints:
        return None
    faults = []
    for path in reversed(checkpoints):
        try:
            return load_checkpoint(path, map_location=map_location), path
        except (CheckpointError, FileNotFoundError) as e:
            faults.append(str(e))
            warnings.warn(f"skipping unusable {e}", CheckpointWarning,
                          stacklevel=2)
    raise CheckpointError(directory, f"none of its {len(checkpoints)} checkpoints is usable: "
                                     + "; ".join(faults))


# ---------------------------------------------------------------------------- weights

def save_weights(path, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``tensors`` to a safetensors file atomically (temporary file, fsync,
    rename, directory fsync). Each tensor is written from its own contiguous CPU copy,
    so views, non-contiguous, CUDA and shared-memory (tied) tensors are all accepted."""
    from safetensors.torch import save_file

    path = Path(path)
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a dict of name -> tensor, got {type(tensors).__name__}")
    copies = {}
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be strings, got {name!r}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name!r} is a {type(t).__name__}, not a tensor")
        if t.layout != torch.strided:
            raise TypeError(f"{name!r} has layout {t.layout}; only dense tensors can be saved")
        copies[name] = torch.empty(t.shape, dtype=t.dtype, device="cpu").copy_(t.detach())
    if metadata is not None:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(f"metadata must map str to str; offending keys: {bad!r}")
        metadata = dict(metadata)

    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    tmp, fd = _create_temp(directory, f".{path.name}.")
    mode = stat.S_IMODE(os.fstat(fd).st_mode)   # 0o666 less the umask
    os.close(fd)
    try:
        save_file(copies, str(tmp), metadata=metadata)
        os.chmod(tmp, mode)   # safetensors replaces the file with one of mode 0o600
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_directory(directory)
    return path


def load_weights(path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, on the CPU. A damaged file raises
    :class:`CheckpointError` (safetensors checks the header and the sizes, not a checksum)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:
        raise CheckpointError(path, f"not a valid safetensors file: {e}") from e


def weights_metadata(path) -> dict[str, str]:
    """The string metadata stored with :func:`save_weights`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise CheckpointError(path, f"not a valid safetensors file: {e}") from e
