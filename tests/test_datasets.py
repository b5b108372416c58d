"""The datasets: image folders (split, crops, bad files), the demo photos, and loaders whose
batches depend only on (seed, epoch)."""

import io
import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastinpaint.data.datasets import (
    DEMO_PHOTOS,
    DemoDataset,
    EpochRandomSampler,
    ImageFolderDataset,
    UnreadableImageError,
    make_dataset,
    make_loader,
    make_sampler,
    set_epoch,
    split_of,
)

SIZE = 32


def _coords_image(h, w, offset=0):
    """R = x, G = y, B = a per-file constant: any crop shows where it came from."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, :, 0] = (np.arange(w)[None, :] + offset) % 256
    a[:, :, 1] = (np.arange(h)[:, None] + offset) % 256
    a[:, :, 2] = (37 * offset) % 256
    return a


def _save(path, array, mode=None, fmt=None, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if mode is not None:
        img = img.convert(mode)
    img.save(path, format=fmt, **kw)
    return path


def _to_uint8(t):
    return ((t + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


@pytest.fixture
def folder(tmp_path):
    """A nested folder of every supported format and colour mode, plus a non-image file."""
    root = tmp_path / "imgs"
    _save(root / "a.png", _coords_image(60, 80, 1))
    _save(root / "b.jpg", _coords_image(50, 70, 2), quality=95)
    _save(root / "sub" / "c.webp", _coords_image(64, 48, 3), lossless=True)
    _save(root / "sub" / "d.bmp", _coords_image(40, 40, 4))
    _save(root / "sub" / "deeper" / "gray.png", _coords_image(45, 90, 5)[:, :, 0])
    _save(root / "sub" / "deeper" / "rgba.png", np.dstack([_coords_image(50, 50, 6), np.full((50, 50), 128, np.uint8)]))
    _save(root / "pal.png", _coords_image(48, 48, 7), mode="P")
    _save(root / "tiny.PNG", _coords_image(10, 14, 8))  # smaller than SIZE, upper-case extension
    _save(root / "la.png", _coords_image(33, 33, 9), mode="LA")
    (root / "README.txt").write_text("not an image")
    return root


def _all(ds):
    return [ds[i] for i in range(len(ds))]


# ----------------------------------------------------------------------- image folders


def test_folder_scan_shapes_dtype_range(folder):
    ds = ImageFolderDataset(folder, size=SIZE, split="all")
    assert ds.files == sorted(ds.files)
    assert "README.txt" not in ds.files and "tiny.PNG" in ds.files
    assert "sub/deeper/gray.png" in ds.files and len(ds) == 9
    for crop in ("random", "center", "resize"):
        ds = ImageFolderDataset(folder, size=SIZE, split="all", crop=crop)
        for x in _all(ds):
            assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32
            assert x.min() >= -1 and x.max() <= 1
            assert x.max() > x.min()  # not a blank image


def test_folder_random_crop_is_a_window_of_the_image(folder):
    ds = ImageFolderDataset(folder, size=SIZE, split="all", flip=False)
    i = ds.files.index("a.png")  # 60 x 80, R = x + 1, G = y + 1
    tops_lefts = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        a = _to_uint8(ds[i]).astype(int)
        left, top = a[0, 0, 0] - 1, a[0, 0, 1] - 1
        assert np.array_equal(a[:, :, 0], np.broadcast_to(np.arange(SIZE) + left + 1, (SIZE, SIZE)))
        assert np.array_equal(a[:, :, 1], np.broadcast_to((np.arange(SIZE) + top + 1)[:, None], (SIZE, SIZE)))
        assert 0 <= top <= 60 - SIZE and 0 <= left <= 80 - SIZE
        tops_lefts.add((top, left))
    assert len(tops_lefts) > 1


def test_folder_flip_and_resize(folder):
    ds = ImageFolderDataset(folder, size=SIZE, split="all", crop="resize", flip=True)
    noflip = ImageFolderDataset(folder, size=SIZE, split="all", crop="resize", flip=False)
    i = ds.files.index("a.png")
    plain = noflip[i]
    seen = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        x = ds[i]
        if torch.equal(x, plain):
            seen.add("plain")
        elif torch.equal(x, plain.flip(-1)):
            seen.add("flipped")
        else:
            pytest.fail("a resized sample is neither the image nor its mirror")
    assert seen == {"plain", "flipped"}


def test_folder_modes_and_upscale(folder):
    ds = ImageFolderDataset(folder, size=SIZE, split="all", crop="center", flip=False)
    gray = _to_uint8(ds[ds.files.index("sub/deeper/gray.png")])
    assert np.array_equal(gray[:, :, 0], gray[:, :, 1]) and np.array_equal(gray[:, :, 0], gray[:, :, 2])
    # Half-transparent RGBA over white: (v + 255) / 2 with v the stored colour.
    rgba = _to_uint8(ds[ds.files.index("sub/deeper/rgba.png")]).astype(int)
    stored = _coords_image(50, 50, 6)[9:9 + SIZE, 9:9 + SIZE].astype(int)
    assert np.abs(rgba - (stored * 128 + 255 * 127) / 255).max() <= 1
    # The 10 x 14 image is upscaled, not padded: a smooth ramp across the whole crop.
    tiny = _to_uint8(ds[ds.files.index("tiny.PNG")]).astype(int)
    assert tiny[:, :, 0].min() >= 8 and tiny[:, :, 0].max() <= 8 + 13
    assert (np.diff(tiny[SIZE // 2, :, 0]) >= -1).all()


def test_split_deterministic_disjoint_covering_and_stable(tmp_path):
    root = tmp_path / "many"
    for k in range(40):
        _save(root / f"d{k % 3}" / f"img_{k:03d}.png", _coords_image(8, 8, k))
    kw = dict(size=8, val_fraction=0.3)
    train = ImageFolderDataset(root, split="train", **kw).files
    val = ImageFolderDataset(root, split="val", **kw).files
    every = ImageFolderDataset(root, split="all", **kw).files
    assert train and val
    assert not set(train) & set(val)
    assert sorted(train + val) == every
    assert ImageFolderDataset(root, split="val", **kw).files == val  # deterministic
    assert all(split_of(f, 0.3) == "val" for f in val)
    for k in range(40, 60):  # new files do not move the old ones
        _save(root / "new" / f"img_{k:03d}.png", _coords_image(8, 8, k))
    train2 = ImageFolderDataset(root, split="train", **kw).files
    val2 = ImageFolderDataset(root, split="val", **kw).files
    assert set(val) <= set(val2) and set(train) <= set(train2)
    assert len(train2) + len(val2) == 60
    # About 30% in val (a broken hash would put all or none there).
    assert 8 <= len(val2) <= 30


def test_split_does_not_depend_on_the_process(tmp_path):
    """The split hash is stable across processes (unlike Python's salted str hash)."""
    names = [f"d{k % 4}/img_{k:04d}.jpg" for k in range(64)]
    here = [split_of(n, 0.5) for n in names]
    assert 10 <= here.count("val") <= 54
    code = ("import sys, json; from fastinpaint.data.datasets import split_of; "
            "print(json.dumps([split_of(n, 0.5) for n in json.loads(sys.argv[1])]))")
    for hashseed in ("1",):  # this process has another (random or set) seed
        env = dict(os.environ, PYTHONHASHSEED=hashseed)
        out = subprocess.run([sys.executable, "-c", code, json.dumps(names)], env=env, check=True,
                             capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        assert json.loads(out.stdout.strip().splitlines()[-1]) == here


def test_datasets_pickle_for_spawned_workers(folder):
    for ds in (ImageFolderDataset(folder, size=SIZE, split="all", seed=2),
               DemoDataset(size=SIZE, split="train", samples_per_epoch=6, seed=2)):
        ds.set_epoch(4)
        blob = pickle.dumps(ds)
        copy = pickle.loads(blob)
        assert all(torch.equal(copy[i], ds[i]) for i in range(len(ds)))
    assert len(blob) < 100_000  # the demo photos are decoded again, not pickled


def test_same_seed_epoch_index_same_sample(folder):
    a = ImageFolderDataset(folder, size=SIZE, split="all", seed=3)
    b = ImageFolderDataset(folder, size=SIZE, split="all", seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    order = list(range(len(a)))
    xs = [a[i] for i in order]
    ys = {i: b[i] for i in reversed(order)}  # another order, another instance
    assert all(torch.equal(xs[i], ys[i]) for i in order)
    a.set_epoch(3)
    assert any(not torch.equal(a[i], xs[i]) for i in order)
    c = ImageFolderDataset(folder, size=SIZE, split="all", seed=4)
    c.set_epoch(2)
    assert any(not torch.equal(c[i], xs[i]) for i in order)


def test_val_is_centre_crop_without_flip(folder):
    ds = ImageFolderDataset(folder, size=SIZE, split="val", val_fraction=1.0)
    assert ds.crop == "center" and not ds.flip
    first = _all(ds)
    ds.set_epoch(5)
    again = _all(ImageFolderDataset(folder, size=SIZE, split="val", val_fraction=1.0, seed=9))
    assert all(torch.equal(x, y) for x, y in zip(first, _all(ds)))
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    a = _to_uint8(first[ds.files.index("a.png")]).astype(int)  # 60 x 80: top 14, left 24
    assert a[0, 0, 0] == 24 + 1 and a[0, 0, 1] == 14 + 1


@pytest.fixture
def bad_folder(tmp_path):
    root = tmp_path / "bad"
    for k in range(4):
        _save(root / f"good{k}.png", _coords_image(40, 40, k))
    buf = io.BytesIO()
    Image.fromarray(_coords_image(64, 64, 9)).save(buf, format="JPEG", quality=95)
    (root / "trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "x.png").write_text("this is text, not a PNG")
    (root / "good1_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # sorts between good1 and good2
    (root / "README.txt").write_text("ignored")
    return root


def test_bad_files_warn_once_and_are_replaced(bad_folder):
    ds = ImageFolderDataset(bad_folder, size=SIZE, split="all")
    assert len(ds) == 7 and "README.txt" not in ds.files
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = _all(ds)
        second = _all(ds)
    messages = [str(w.message) for w in caught]
    assert sum("trunc.jpg" in m for m in messages) == 1
    assert sum("x.png" in m for m in messages) == 1
    assert sum("good1_broken.png" in m for m in messages) == 1
    assert len(messages) == 3
    for x, y in zip(first, second):
        assert x.shape == (3, SIZE, SIZE) and -1 <= x.min() and x.max() <= 1
        assert torch.equal(x, y)
    # A bad index is replaced by the next readable file (wrapping around), deterministically.
    ds2 = ImageFolderDataset(bad_folder, size=SIZE, split="all", crop="center", flip=False)
    with pytest.warns(RuntimeWarning):
        centred = _all(ds2)
    # x.png is bad too, so trunc.jpg falls through to it and on to good0.png.
    assert ds2.files[-2:] == ["trunc.jpg", "x.png"]
    expected = {"trunc.jpg": "good0.png", "x.png": "good0.png", "good1_broken.png": "good2.png"}
    for name, repl in expected.items():
        assert torch.equal(centred[ds2.files.index(name)], centred[ds2.files.index(repl)])


def test_datasets_sharing_warned_warn_once_per_file(bad_folder):
    """A training split and a validation set of one run share ``warned``: each bad file is warned
    about once, whichever reads it first; datasets that share nothing warn each."""
    warned = set()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _all(ImageFolderDataset(bad_folder, size=SIZE, split="all", warned=warned))
        _all(ImageFolderDataset(bad_folder, size=SIZE, split="all", crop="center", warned=warned))
    assert len(caught) == 3 and len(warned) == 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _all(ImageFolderDataset(bad_folder, size=SIZE, split="all"))
    assert len(caught) == 3


def test_bad_files_strict_raises_naming_the_file(bad_folder):
    ds = ImageFolderDataset(bad_folder, size=SIZE, split="all", strict=True)
    for name in ("trunc.jpg", "x.png", "good1_broken.png"):
        with pytest.raises(UnreadableImageError, match=name):
            ds[ds.files.index(name)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ds[ds.files.index("good1.png")].shape == (3, SIZE, SIZE)


def test_missing_empty_and_split_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderDataset(tmp_path / "nowhere")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="empty"):
        ImageFolderDataset(tmp_path / "empty")
    _save(tmp_path / "one" / "a.png", _coords_image(8, 8))
    with pytest.raises(ValueError, match="empty"):
        ImageFolderDataset(tmp_path / "one", split="val", val_fraction=0.0)
    with pytest.raises(ValueError, match="split"):
        ImageFolderDataset(tmp_path / "one", split="test")


# --------------------------------------------------------------------------- demo data


def test_demo_train_shapes_range_and_determinism():
    ds = DemoDataset(size=SIZE, split="train", samples_per_epoch=24, seed=1)
    assert len(ds) == 24 and len(set(DEMO_PHOTOS)) >= 8
    xs = _all(ds)
    for x in xs:
        assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1 and x.max() > x.min()
    other = DemoDataset(size=SIZE, split="train", samples_per_epoch=24, seed=1)
    assert all(torch.equal(other[i], xs[i]) for i in (0, 5, 23))
    ds.set_epoch(1)
    assert sum(not torch.equal(ds[i], xs[i]) for i in range(24)) >= 20


def test_demo_has_distinct_photos():
    ds = DemoDataset(size=SIZE, split="train", samples_per_epoch=8)
    imgs = ds.images
    assert len(imgs) == len(DEMO_PHOTOS) >= 8
    for a in imgs:
        assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3 and min(a.shape[:2]) >= SIZE
    for i in range(len(imgs)):
        for j in range(i + 1, len(imgs)):
            assert imgs[i].shape != imgs[j].shape or not np.array_equal(imgs[i], imgs[j])


def test_demo_val_fixed_and_distinct():
    a = DemoDataset(size=SIZE, split="val", seed=0)
    b = DemoDataset(size=SIZE, split="val", seed=7)
    b.set_epoch(3)
    assert len(a) == len(b) >= 2 * len(DEMO_PHOTOS)
    xa, xb = _all(a), _all(b)
    assert all(torch.equal(x, y) for x, y in zip(xa, xb))
    assert all(torch.equal(x, y) for x, y in zip(xa, _all(a)))
    flat = torch.stack(xa).flatten(1)
    for i in range(len(flat)):
        assert not (flat[i + 1:] == flat[i]).all(dim=1).any(), f"val crop {i} repeated"
    # The first crop of each photo is the centre of its held-out part.
    p, top, left = a.val_crops[0]
    img = a.images[p]
    t0, l0, h, w = a.regions(p)[1]
    assert abs(top - t0 - (h - SIZE) / 2) <= 0.5 and abs(left - l0 - (w - SIZE) / 2) <= 0.5
    assert np.array_equal(_to_uint8(xa[0]), img[top:top + SIZE, left:left + SIZE])


@pytest.mark.parametrize("size", [SIZE, 130])
def test_demo_validation_is_held_out(monkeypatch, size):
    """No validation pixel is ever trained on: photos whose pixels spell their coordinates,
    one wide and one tall, and every pixel of every crop traced back to the photo."""
    import fastinpaint.data.datasets as datasets

    shapes = {"wide": (200, 250), "tall": (240, 100)}
    monkeypatch.setattr(datasets, "_demo_photo", lambda name: _coords_image(*shapes[name]))
    train = DemoDataset(size=size, split="train", samples_per_epoch=64, seed=3, photos=("wide", "tall"))
    val = DemoDataset(size=size, split="val", photos=("wide", "tall"))
    for p, name in enumerate(("wide", "tall")):
        (tt, tl, th, tw), (vt, vl, vh, vw) = val.regions(p)
        h, w = val.images[p].shape[:2]
        if size == SIZE:   # no resizing: the coordinates are the photo's own
            assert (h, w) == shapes[name]
        # the two parts tile the photo, split across its longer side, the held-out part its last quarter
        if h >= w:
            assert (tt, tl, tw, vl, vw) == (0, 0, w, 0, w) and th + vh == h and vt == th
            assert vh == max(size, round(h * datasets.DEMO_VAL_SHARE))
        else:
            assert (tt, tl, th, vt, vh) == (0, 0, h, 0, h) and tw + vw == w and vl == tw
            assert vw == max(size, round(w * datasets.DEMO_VAL_SHARE))
        assert min(th, tw, vh, vw) >= size
    if size != SIZE:   # upscaled: the wide photo to hold a crop of each part, the tall one to the crop's side
        assert val.images[0].shape[:2] == (208, 260) and val.images[1].shape[:2] == (312, 130)
        return
    for i in range(len(train)):
        p = i % 2
        (tt, tl, th, tw) = train.regions(p)[0]
        crop = _to_uint8(train[i]).astype(int)
        xs, ys = crop[:, :, 0], crop[:, :, 1]
        assert xs.min() >= tl and xs.max() < tl + tw and ys.min() >= tt and ys.max() < tt + th, (i, p)
    assert len(val) >= 4
    for i, (p, top, left) in enumerate(val.val_crops):
        (vt, vl, vh, vw) = val.regions(p)[1]
        crop = _to_uint8(val[i]).astype(int)
        assert np.array_equal(crop[:, :, 0], np.arange(left, left + SIZE)[None, :].repeat(SIZE, 0))
        assert np.array_equal(crop[:, :, 1], np.arange(top, top + SIZE)[:, None].repeat(SIZE, 1))
        assert vt <= top and top + SIZE <= vt + vh and vl <= left and left + SIZE <= vl + vw


def test_demo_upscales_small_photos():
    size = 320  # above chelsea's 300 rows; 2 * 320 above its 451 columns
    ds = DemoDataset(size=size, split="val", photos=("chelsea", "grass"))
    assert ds.images[0].shape == (round(300 * 2 * size / 451), 2 * size, 3)   # chelsea: both parts hold a crop
    assert ds.images[1].shape == (2 * size, 2 * size, 3)                     # grass: 512 x 512
    for x in _all(ds):
        assert x.shape == (3, size, size)


def test_make_dataset(folder, tmp_path):
    assert isinstance(make_dataset("demo", size=SIZE, split="val", seed=0), DemoDataset)
    ds = make_dataset(str(folder), size=SIZE, split="all", seed=0, crop="center")
    assert isinstance(ds, ImageFolderDataset) and ds.crop == "center" and len(ds) == 9
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        make_dataset(str(tmp_path / "does-not-exist"), size=SIZE, split="train", seed=0)


# ----------------------------------------------------------------------------- loading


def _batches(loader, epoch):
    set_epoch(loader, epoch)
    return [b.clone() for b in loader]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_loader_workers_do_not_change_batches(folder):
    ds = ImageFolderDataset(folder, size=16, split="all", seed=5)
    l0 = make_loader(ds, batch_size=2, shuffle=True, seed=11, num_workers=0)
    l2 = make_loader(ImageFolderDataset(folder, size=16, split="all", seed=5), batch_size=2,
                     shuffle=True, seed=11, num_workers=2)
    assert isinstance(l0.sampler, EpochRandomSampler)
    b0, b2 = _batches(l0, 1), _batches(l2, 1)
    assert len(b0) == len(ds) // 2 and b0[0].shape == (2, 3, 16, 16)
    assert _same(b0, b2)
    assert not _same(b0, _batches(l0, 2))


def test_demo_loader_workers_do_not_change_batches():
    mk = lambda: DemoDataset(size=16, split="train", samples_per_epoch=12, seed=2)  # noqa: E731
    b0 = _batches(make_loader(mk(), batch_size=4, shuffle=True, seed=0, num_workers=0), 3)
    b2 = _batches(make_loader(mk(), batch_size=4, shuffle=True, seed=0, num_workers=2), 3)
    assert len(b0) == 3 and _same(b0, b2)


def test_loader_resume_redraws_the_same_epoch(folder):
    ds = ImageFolderDataset(folder, size=16, split="all")
    run = make_loader(ds, batch_size=3, shuffle=True, seed=4)
    history = [_batches(run, e) for e in range(3)]
    resumed = make_loader(ImageFolderDataset(folder, size=16, split="all"), batch_size=3, shuffle=True, seed=4)
    assert _same(_batches(resumed, 2), history[2])
    assert not _same(history[0], history[1])
    # Order: a permutation of every index, drop_last leaves no partial batch.
    sampler = run.sampler
    sampler.set_epoch(0)
    order = list(sampler)
    assert sorted(order) == list(range(len(ds)))
    sampler.set_epoch(1)
    assert list(sampler) != order
    assert all(b.shape[0] == 3 for b in history[0])


def test_loader_without_shuffle_is_sequential(folder):
    ds = ImageFolderDataset(folder, size=16, split="all", crop="center", flip=False)
    loader = make_loader(ds, batch_size=4, shuffle=False, seed=0, drop_last=False)
    got = torch.cat(_batches(loader, 0))
    assert torch.equal(got, torch.stack(_all(ds)))


def test_distributed_sampler_ranks_are_disjoint():
    ds = DemoDataset(size=8, split="train", samples_per_epoch=20)
    ranks = [make_sampler(ds, shuffle=True, seed=3, num_replicas=2, rank=r) for r in range(2)]
    assert all(isinstance(s, torch.utils.data.distributed.DistributedSampler) for s in ranks)
    for s in ranks:
        s.set_epoch(1)
    idx = [list(s) for s in ranks]
    assert len(idx[0]) == len(idx[1]) == 10
    assert not set(idx[0]) & set(idx[1])
    assert sorted(idx[0] + idx[1]) == list(range(20))
    assert idx[0] != sorted(idx[0]) or idx[1] != sorted(idx[1])  # shuffled
    again = make_sampler(ds, shuffle=True, seed=3, num_replicas=2, rank=0)
    again.set_epoch(1)
    assert list(again) == idx[0]


def test_distributed_needs_a_process_group():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("a process group is already initialised")
    ds = DemoDataset(size=8, split="train", samples_per_epoch=4)
    with pytest.raises(RuntimeError, match="init_process_group"):
        make_loader(ds, batch_size=2, shuffle=True, seed=0, distributed=True)
