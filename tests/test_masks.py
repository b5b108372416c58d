"""Mask generators: format, reproducibility, statistics over many draws, argument checks."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from fastinpaint.data.masks import (MASKS, CenterMask, FileMask, FreeFormMask, RandomBlockMask,
                                    RandomRegionMask, make_mask_generator)

SIZES = [(256, 256), (192, 320), (37, 53)]
DRAWS = 300  # per statistics test


def rng(seed):
    return np.random.default_rng(seed)


def draw(gen, height, width, seeds):
    """Stack of (H, W) numpy masks, one per seed."""
    return np.stack([gen(height, width, rng(s))[0].numpy() for s in seeds])


def interior_fraction(mask):
    """Fraction of hole pixels whose 4 neighbours (edge-replicated) are holes too."""
    m = mask > 0
    p = np.pad(m, 1, mode="edge")
    inner = m & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return inner.sum() / m.sum()


def centroid(mask):
    ys, xs = np.nonzero(mask)
    return ys.mean() / mask.shape[0], xs.mean() / mask.shape[1]


@pytest.fixture
def mask_files(tmp_path):
    """Three distinct PNG masks (white = hole) in a folder tree, plus a non-image file."""
    root = tmp_path / "masks"
    (root / "sub").mkdir(parents=True)
    for i, path in enumerate([root / "a.png", root / "b.png", root / "sub" / "c.png"]):
        a = np.zeros((40, 60), np.uint8)
        a[: 10 * (i + 1), :20] = 255
        Image.fromarray(a).save(path)
    (root / "notes.txt").write_text("not a mask")
    return root


GENERATORS = {
    "center": lambda files: CenterMask(),
    "block": lambda files: RandomBlockMask(),
    "region": lambda files: RandomRegionMask(),
    "free_form": lambda files: FreeFormMask(),
    "free_form_nobox": lambda files: FreeFormMask(box=False),
    "file": lambda files: FileMask(files),
}


# --------------------------------------------------------------------------- common contract

@pytest.mark.parametrize("kind", list(GENERATORS))
@pytest.mark.parametrize("height,width", SIZES)
def test_format_and_reproducibility(kind, height, width, mask_files):
    gen = GENERATORS[kind](mask_files)
    masks = [gen(height, width, rng(s)) for s in range(8)]
    for m in masks:
        assert m.dtype == torch.float32 and m.shape == (1, height, width)
        assert torch.all((m == 0) | (m == 1))
        assert m.sum() > 0
    # Same seed -> same mask, also from a fresh generator object.
    again = GENERATORS[kind](mask_files)(height, width, rng(3))
    assert torch.equal(masks[3], again)
    distinct = {m.numpy().tobytes() for m in masks}
    if kind == "center":
        assert len(distinct) == 1
    else:
        assert len(distinct) >= (2 if kind == "file" else 3)  # only 3 files to pick from
        # Successive draws from one rng differ too.
        r = rng(0)
        assert not torch.equal(gen(height, width, r), gen(height, width, r))


@pytest.mark.parametrize("kind", ["block", "region", "free_form", "file"])
def test_call_argument_checks(kind, mask_files):
    gen = GENERATORS[kind](mask_files)
    with pytest.raises(ValueError, match="height"):
        gen(0, 16, rng(0))
    with pytest.raises(ValueError, match="width"):
        gen(16, -3, rng(0))
    with pytest.raises(ValueError, match="height"):
        gen(16.0, 16, rng(0))
    with pytest.raises(TypeError, match="rng"):
        gen(16, 16, 123)


# --------------------------------------------------------------------------- CenterMask

def test_center_mask_128_exact():
    gen = CenterMask()
    hole = gen(128, 128)[0]
    target = gen.target_region(128, 128)[0]
    weights = gen.loss_weights(128, 128)[0]
    expect_hole = torch.zeros(128, 128)
    expect_hole[36:92, 36:92] = 1
    expect_target = torch.zeros(128, 128)
    expect_target[32:96, 32:96] = 1
    assert torch.equal(hole, expect_hole)
    assert torch.equal(target, expect_target)
    assert hole.sum() == 56 * 56 and target.sum() == 64 * 64
    band = (expect_target == 1) & (expect_hole == 0)
    assert torch.all(weights[band] == 10) and torch.all(weights[expect_hole == 1] == 1)
    assert torch.all(weights[expect_target == 0] == 0)
    assert weights.sum() == 10 * (64 * 64 - 56 * 56) + 56 * 56
    assert torch.equal(gen(128, 128, rng(5)), gen(128, 128, rng(6)))


def test_center_mask_proportional():
    gen = CenterMask()
    hole, target = gen(256, 256)[0], gen.target_region(256, 256)[0]
    rows = torch.nonzero(hole.any(1)).flatten()
    assert (rows.min().item(), rows.max().item() + 1) == (72, 184)  # 128 hole, 8-px overlap
    rows = torch.nonzero(target.any(1)).flatten()
    assert (rows.min().item(), rows.max().item() + 1) == (64, 192)
    # Non-square: each axis scales on its own.
    hole = gen(128, 256)[0]
    ys, xs = torch.nonzero(hole, as_tuple=True)
    assert (ys.min().item(), ys.max().item() + 1, xs.min().item(), xs.max().item() + 1) == (36, 92, 72, 184)
    assert hole.sum() == 56 * 112
    w = gen.loss_weights(128, 256)[0]
    assert w.shape == (128, 256) and w.max() == 10 and (w == 10).sum() == 64 * 128 - 56 * 112


def test_center_mask_custom_and_errors():
    gen = CenterMask(hole=32, overlap=0, image=64, overlap_weight=5.0)
    assert torch.equal(gen(64, 64), gen.target_region(64, 64))
    assert torch.all(gen.loss_weights(64, 64)[0][16:48, 16:48] == 1)
    with pytest.raises(ValueError, match="hole"):
        CenterMask(hole=200, image=128)
    with pytest.raises(ValueError, match="overlap"):
        CenterMask(hole=8, overlap=4)
    with pytest.raises(ValueError, match="image"):
        CenterMask(image=0)
    with pytest.raises(ValueError, match="hole"):
        CenterMask(hole=0)
    with pytest.raises(ValueError, match="height"):
        CenterMask(hole=64, overlap=31)(4, 128)  # 2-pixel hole minus a 1-pixel band each side


# --------------------------------------------------------------------------- RandomBlockMask

@pytest.mark.parametrize("height,width", [(256, 256), (192, 320)])
def test_block_fraction(height, width):
    masks = draw(RandomBlockMask(), height, width, range(DRAWS))
    frac = masks.mean(axis=(1, 2))
    assert frac.max() <= 0.25 and frac.min() > 0
    assert 0.1 < frac.mean() < 0.25  # measured 0.174 at both sizes
    assert frac.max() > 0.2  # the budget is actually approached
    counts = [ndimage.label(m)[1] for m in masks]
    assert max(counts) >= 3  # several separate rectangles do happen
    cy, cx = np.mean([centroid(m) for m in masks], axis=0)
    assert abs(cy - 0.5) < 0.05 and abs(cx - 0.5) < 0.05


def test_block_tight_budget_and_single_rectangle():
    gen = RandomBlockMask(max_blocks=8, max_fraction=0.01, max_size=0.9)
    for s in range(100):
        m = gen(64, 64, rng(s))[0].numpy()
        assert 1 <= m.sum() <= math.floor(0.01 * 64 * 64)
    single = RandomBlockMask(max_blocks=1)
    for s in range(50):
        m = single(100, 80, rng(s))[0].numpy()
        ys, xs = np.nonzero(m)
        box = m[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        assert box.all()  # the mask is exactly one filled rectangle
        assert m.sum() == box.size
    with pytest.raises(ValueError, match="max_fraction"):
        RandomBlockMask(max_fraction=0.001)(16, 16, rng(0))


# --------------------------------------------------------------------------- RandomRegionMask

@pytest.mark.parametrize("height,width", [(256, 256), (192, 320)])
def test_region_fraction_and_smoothness(height, width):
    masks = draw(RandomRegionMask(), height, width, range(DRAWS))
    frac = masks.mean(axis=(1, 2))
    assert frac.min() >= 0.2 and frac.max() <= 0.3
    assert frac.min() < 0.21 and frac.max() > 0.29  # the threshold is randomised over the range
    smooth = np.array([interior_fraction(m) for m in masks])
    assert smooth.mean() > 0.85 and smooth.min() > 0.75  # measured ~0.92 / >0.85
    # The same pixel count scattered at random scores near zero: the measure discriminates.
    shuffled = rng(1).permutation(masks[0].ravel()).reshape(masks[0].shape)
    assert interior_fraction(shuffled) < 0.05
    cy, cx = np.mean([centroid(m) for m in masks], axis=0)
    assert abs(cy - 0.5) < 0.03 and abs(cx - 0.5) < 0.03


def test_region_exact_coverage_and_errors():
    gen = RandomRegionMask(coverage=(0.5, 0.5), cells=(3, 3))
    for s in range(5):
        assert gen(64, 96, rng(s)).sum() == 64 * 96 // 2
    for bad in [(0.3, 0.2), (0.0, 0.3), (0.2, 1.0), (0.2,), "ab"]:
        with pytest.raises(ValueError, match="coverage"):
            RandomRegionMask(coverage=bad)
    with pytest.raises(ValueError, match="cells"):
        RandomRegionMask(cells=(0, 4))
    with pytest.raises(ValueError, match="coverage"):
        RandomRegionMask(coverage=(0.41, 0.42))(2, 2, rng(0))


# --------------------------------------------------------------------------- FreeFormMask

@pytest.mark.parametrize("height,width", [(256, 256), (192, 320)])
def test_free_form_fraction(height, width):
    seeds = range(DRAWS)
    with_box = draw(FreeFormMask(), height, width, seeds).mean(axis=(1, 2))
    no_box = draw(FreeFormMask(box=False), height, width, seeds).mean(axis=(1, 2))
    # With box: ~0.19 of the image from the shrunk 1/2 x 1/2 box plus 1..3 strokes of width 12..40
    # and ~7 steps of ~r = diag/8 px: measured mean 0.31 (256^2) / 0.32 (192x320), range 0.18..0.52.
    assert 0.2 < with_box.mean() < 0.45
    assert with_box.min() > 0.1
    # Strokes alone: measured mean 0.155 / 0.17.
    assert 0.08 < no_box.mean() < 0.3
    # Same seeds draw the same strokes, so adding the box can only grow each mask.
    assert np.all(with_box >= no_box) and with_box.mean() - no_box.mean() > 0.1


def test_free_form_hole_share_is_the_same_at_every_size():
    """The brush widths (DeepFill's pixels at 256) scale with the image as the stroke length and
    the box do: a 64 or 32 pixel image gets the hole share of a 256 one (not 0.55 and 0.77, as
    with widths in pixels), and 256 is DeepFill's masks exactly."""
    seeds = range(DRAWS)
    share = {s: draw(FreeFormMask(), s, s, seeds).mean(axis=(1, 2)) for s in (32, 64, 256)}
    for s in (32, 64):
        assert abs(share[s].mean() - share[256].mean()) < 0.03, (s, share[s].mean(), share[256].mean())
        assert share[s].max() < share[256].max() + 0.08
    unscaled = draw(FreeFormMask(resolution=None), 64, 64, seeds).mean(axis=(1, 2))
    assert unscaled.mean() > share[64].mean() + 0.15   # widths in pixels: thick strokes on a small image
    for s in range(20):
        assert torch.equal(FreeFormMask()(256, 256, rng(s)), FreeFormMask(resolution=None)(256, 256, rng(s)))
    # the widths, measured as in the next test, at a quarter of the size: a quarter of the pixels
    gen = FreeFormMask(max_strokes=1, min_vertices=1, max_vertices=2, min_width=32, max_width=32, box=False)
    assert gen.width_scale(64, 64) == 0.25 and gen.width_scale(256, 256) == 1.0
    for m in draw(gen, 64, 64, range(10)):
        radius = ndimage.distance_transform_edt(np.pad(m, 1)).max()
        assert 4 - 1 <= radius <= 4 + 2, radius


def test_free_form_strokes_connected_and_width():
    one = draw(FreeFormMask(max_strokes=1, box=False), 256, 256, range(150))
    assert all(ndimage.label(m)[1] == 1 for m in one)  # a stroke is one connected piece
    many = draw(FreeFormMask(max_strokes=3), 256, 256, range(150))
    assert max(ndimage.label(m)[1] for m in many) <= 4  # <= strokes + box
    for w in (12, 30):
        # One straight segment (a single step) drawn with a round brush is a capsule: its widest
        # inscribed disc has the brush radius (sharp zig-zag joints would be thicker).
        gen = FreeFormMask(max_strokes=1, min_vertices=1, max_vertices=2, min_width=w, max_width=w, box=False)
        for m in draw(gen, 256, 256, range(10)):
            radius = ndimage.distance_transform_edt(np.pad(m, 1)).max()
            assert w / 2 - 1 <= radius <= w / 2 + 2, (w, radius)
            assert interior_fraction(m) > 0.7


def test_free_form_flips_are_real():
    seeds = range(200)
    flipped = draw(FreeFormMask(max_strokes=1, box=False), 192, 320, seeds)
    plain = draw(FreeFormMask(max_strokes=1, box=False, flip=False), 192, 320, seeds)
    kinds = []
    for f, p in zip(flipped, plain):
        options = {"none": p, "lr": p[:, ::-1], "tb": p[::-1, :], "both": p[::-1, ::-1]}
        match = [k for k, v in options.items() if np.array_equal(f, v)]
        assert match, "a flipped stroke must be the unflipped one mirrored"
        kinds.append(match[0])
    for k in ("none", "lr", "tb", "both"):
        assert 0.15 < kinds.count(k) / len(kinds) < 0.35, kinds.count(k)
    # Without flips DeepFill's strokes drift right (mean angle 72 deg); with them they do not.
    cx_plain = np.mean([centroid(m)[1] for m in plain])
    cy, cx = np.mean([centroid(m) for m in flipped], axis=0)
    assert cx_plain > 0.58
    assert abs(cx - 0.5) < 0.04 and abs(cy - 0.5) < 0.04


def test_free_form_mean_mask_symmetric():
    masks = draw(FreeFormMask(), 256, 256, range(DRAWS))
    mean = masks.mean(0)
    lr = mean[:, :128].sum() / mean[:, 128:].sum()
    tb = mean[:128].sum() / mean[128:].sum()
    assert 0.88 < lr < 1.12 and 0.88 < tb < 1.12
    cy, cx = np.mean([centroid(m) for m in masks], axis=0)
    assert abs(cy - 0.5) < 0.04 and abs(cx - 0.5) < 0.04


def test_free_form_box_geometry():
    gen = FreeFormMask()
    heights, widths, tops, lefts = [], [], [], []
    for s in range(300):
        box = gen._box(256, 320, rng(s))
        ys, xs = np.nonzero(box)
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert box.sum() == h * w  # a filled rectangle
        heights.append(h), widths.append(w), tops.append(ys.min()), lefts.append(xs.min())
    # 128 x 160 box shrunk by 0..16 (rows) and 0..20 (cols) on each side independently.
    assert 96 <= min(heights) < 104 and max(heights) == 128 and len(set(heights)) > 15
    assert 120 <= min(widths) < 130 and max(widths) == 160
    # Opposite sides shrink independently, so odd sizes (unequal shrinks) occur.
    assert any(h % 2 for h in heights) and any(w % 2 for w in widths)
    assert max(tops) > 100 and min(tops) < 10 and max(lefts) > 130 and min(lefts) < 10


def test_free_form_argument_errors():
    for kwargs, name in [({"max_strokes": 0}, "max_strokes"), ({"min_vertices": 5, "max_vertices": 5}, "max_vertices"),
                         ({"min_width": 0}, "min_width"), ({"min_width": 20, "max_width": 10}, "max_width"),
                         ({"angle_range": -1.0}, "angle_range"), ({"box": "yes"}, "box"),
                         ({"max_strokes": 2.5}, "max_strokes"), ({"resolution": 0}, "resolution")]:
        with pytest.raises(ValueError, match=name):
            FreeFormMask(**kwargs)


# --------------------------------------------------------------------------- FileMask

def test_file_mask_folder_resize_and_choice(mask_files):
    gen = FileMask(mask_files)
    assert [p.name for p in gen.files] == ["a.png", "b.png", "c.png"]  # recursive, .txt ignored
    # a.png is 40x60 with the top-left 10x20 block white; at 2x it is exactly 20x40.
    m = gen.load(0, 80, 120)[0]
    expect = torch.zeros(80, 120)
    expect[:20, :40] = 1
    assert torch.equal(m, expect)
    # Another aspect ratio: 40x60 -> 100x50 (rows x2.5, cols x5/6), nearest.
    m = gen.load(1, 100, 50)[0]  # b.png: top 20 rows, left 20 cols white
    expect = torch.zeros(100, 50)
    expect[:50, :17] = 1
    assert torch.equal(m, expect)
    picked = {gen(40, 60, rng(s)).sum().item() for s in range(30)}
    assert picked == {200.0, 400.0, 600.0}  # every file gets picked


def test_file_mask_invert_threshold_and_modes(tmp_path):
    a = np.array([[0, 100, 200, 255]], np.uint8).repeat(4, 0)
    Image.fromarray(a).save(tmp_path / "g.png")
    rgb = np.stack([a, a, a], -1)
    Image.fromarray(rgb).save(tmp_path / "rgb.bmp")
    m = FileMask(tmp_path / "g.png")(4, 4, rng(0))[0]
    assert torch.equal(m[0], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    m = FileMask([tmp_path / "g.png"], threshold=0.3)(4, 4, rng(0))[0]
    assert torch.equal(m[0], torch.tensor([0.0, 1.0, 1.0, 1.0]))
    m = FileMask(str(tmp_path / "g.png"), invert=True)(4, 4, rng(0))[0]
    assert torch.equal(m[0], torch.tensor([1.0, 1.0, 0.0, 0.0]))
    m = FileMask(tmp_path / "rgb.bmp")(4, 4, rng(0))[0]
    assert torch.equal(m[0], torch.tensor([0.0, 0.0, 1.0, 1.0]))


def test_file_mask_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no mask images"):
        FileMask(tmp_path / "empty")
    with pytest.raises(ValueError, match="does not exist"):
        FileMask(tmp_path / "missing")
    with pytest.raises(ValueError, match="paths"):
        FileMask([])
    with pytest.raises(ValueError, match="threshold"):
        FileMask(tmp_path / "empty", threshold=1.5)
    bad = tmp_path / "bad" / "broken.png"
    bad.parent.mkdir()
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    gen = FileMask(tmp_path / "bad")
    with pytest.raises(OSError, match="broken.png"):
        gen(16, 16, rng(0))


# --------------------------------------------------------------------------- registry

def test_make_mask_generator(mask_files):
    options = {"center": {"hole": 32, "image": 64}, "block": {"max_blocks": 2}, "region": {"coverage": (0.1, 0.2)},
               "free_form": {"box": False}, "thin": {"resolution": 256}, "medium": {"max_hole": 0.4},
               "thick": {}, "file": {"paths": mask_files}}
    assert set(options) == set(MASKS)
    for kind, opts in options.items():
        gen = make_mask_generator(kind, **opts)
        assert isinstance(gen, MASKS[kind]) and gen.name == kind
        m = gen(64, 64, rng(0))
        assert m.shape == (1, 64, 64) and m.dtype == torch.float32
    assert make_mask_generator("region", coverage=(0.1, 0.2)).coverage == (0.1, 0.2)
    assert make_mask_generator("center", hole=32, image=64)(64, 64).sum() == 24 * 24
    with pytest.raises(ValueError, match="unknown mask kind.*block.*center.*file.*free_form.*region"):
        make_mask_generator("circles")
    with pytest.raises(ValueError, match="mask kind 'block' has no option nonsense; its options: max_blocks"):
        make_mask_generator("block", nonsense=1)
