"""LaMa's evaluation masks (thin, medium, thick): format, reproducibility, LaMa's settings,
statistics over many draws, scaling to other image sizes, argument checks."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from fastinpaint.data.masks import (LAMA_SETTINGS, MASKS, LamaMask, LamaMediumMask, LamaThickMask, LamaThinMask,
                                    _lama_strokes, make_mask_generator)

KINDS = ("thin", "medium", "thick")
DRAWS = 300


def rng(seed):
    return np.random.default_rng(seed)


def draws(gen, height, width, seeds):
    """(masks (N, H, W) bool, what each is made of)."""
    out = [gen.draw(height, width, rng(s)) for s in seeds]
    return np.stack([m for m, _ in out]), [k for _, k in out]


def corners(mask):
    """The corners of a mask's outline: 2x2 windows holding an odd number of hole pixels. A box
    has 4; a union of boxes 4 per box plus the crossings of their edges; a round stroke many."""
    m = np.pad(mask, 1).astype(np.int8)
    windows = m[:-1, :-1] + m[1:, :-1] + m[:-1, 1:] + m[1:, 1:]
    return int(np.count_nonzero(windows % 2))


def test_registered_and_settings_are_lamas():
    assert MASKS["thin"] is LamaThinMask and MASKS["medium"] is LamaMediumMask and MASKS["thick"] is LamaThickMask
    # LaMa's configs/data_gen/random_*_256.yaml, as REFERENCES.md lists them
    assert LAMA_SETTINGS[("thin", 256)]["strokes"] == (4, 50) and LAMA_SETTINGS[("thin", 256)]["max_width"] == 10
    assert LAMA_SETTINGS[("thin", 256)]["box_weight"] == 0
    medium, thick = LAMA_SETTINGS[("medium", 256)], LAMA_SETTINGS[("thick", 256)]
    assert medium["strokes"] == (4, 5) and medium["max_width"] == 50 and medium["box_size"] == (10, 50)
    assert thick["strokes"] == (1, 5) and thick["max_width"] == 100 and thick["box_size"] == (30, 150)
    assert medium["box_weight"] == thick["box_weight"] == 0.3
    for kind in KINDS:
        gen = make_mask_generator(kind)
        assert gen.kind == kind and gen.max_hole == 0.5 and gen.resolution == "auto"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("height,width", [(256, 256), (192, 320), (37, 53)])
def test_format_reproducibility_and_hole_limit(kind, height, width):
    gen = make_mask_generator(kind)
    masks = [gen(height, width, rng(s)) for s in range(12)]
    for m in masks:
        assert m.dtype == torch.float32 and m.shape == (1, height, width)
        assert torch.all((m == 0) | (m == 1))
        assert 0 < m.mean() <= 0.5
    assert torch.equal(make_mask_generator(kind)(height, width, rng(4)), masks[4])
    assert len({m.numpy().tobytes() for m in masks}) == len(masks)
    r = rng(0)
    assert not torch.equal(gen(height, width, r), gen(height, width, r))


# Mean hole share over 300 draws at 256x256, measured: thin 0.271 (its many strokes), medium 0.230,
# thick 0.280 (its strokes often exceed half the image and are drawn again).
SHARE = {"thin": (0.24, 0.30), "medium": (0.20, 0.26), "thick": (0.25, 0.31)}


def test_hole_share_statistics():
    shares, kinds = {}, {}
    for kind in KINDS:
        masks, made_of = draws(make_mask_generator(kind), 256, 256, range(DRAWS))
        shares[kind], kinds[kind] = masks.mean(axis=(1, 2)), made_of
        assert shares[kind].max() <= 0.5
        lo, hi = SHARE[kind]
        assert lo < shares[kind].mean() < hi, (kind, shares[kind].mean())
        assert shares[kind].min() < 0.05 and shares[kind].max() > 0.45   # small and large holes both occur
    assert shares["medium"].mean() < shares["thick"].mean()
    assert set(kinds["thin"]) == {"strokes"}


def test_share_of_box_masks():
    # a mask is boxes with probability 0.3 / 1.3; thick strokes over half the image are drawn again
    # while its boxes never are, so more thick masks end up boxes (measured 0.227 and 0.306 over 3000)
    n = 1500
    medium = draws(LamaMediumMask(), 64, 64, range(n))[1].count("boxes") / n
    thick = draws(LamaThickMask(), 64, 64, range(n))[1].count("boxes") / n
    assert abs(medium - 0.3 / 1.3) < 0.035, medium
    assert 0.3 / 1.3 + 0.03 < thick < 0.36, thick


def test_boxes_geometry():
    gen = LamaThickMask()
    sides, counts = [], []
    for s in range(400):
        mask, made_of = gen.draw(256, 256, rng(s))
        if made_of != "boxes":
            continue
        ys, xs = np.nonzero(mask)
        assert ys.min() >= 10 and xs.min() >= 10 and ys.max() < 246 and xs.max() < 246   # the 10-pixel margin
        labels, n = ndimage.label(mask)
        counts.append(n)
        assert 1 <= n <= 3
        for piece in ndimage.find_objects(labels):
            if mask[piece].all():   # a lone box: its sides are drawn from 30..150
                sides += [piece[0].stop - piece[0].start, piece[1].stop - piece[1].start]
        assert corners(mask) <= 4 * 3 + 2 * 2 * 3   # 3 boxes, and at most 2 crossings per pair of them
    assert min(sides) >= 30 and max(sides) <= 150
    assert min(sides) < 45 and max(sides) > 135   # the whole range is drawn
    assert len(set(counts)) >= 2


def test_strokes_geometry():
    # a single stroke of 5-pixel segments, each 10 pixels long, nearly vertical (0.01 rad, mirrored)
    settings = dict(strokes=(1, 1), max_width=1, max_len=1, max_angle=1)
    for s in range(30):
        m = _lama_strokes(128, 128, settings, 1.0, rng(s))
        assert ndimage.label(m)[1] == 1    # one connected stroke
        assert ndimage.distance_transform_edt(np.pad(m, 1)).max() <= 3.0   # brush radius 2.5
        ys, xs = np.nonzero(m)
        assert ys.max() - ys.min() <= 5 * 10 + 6       # at most 5 segments of 10 pixels, plus the brush
        assert xs.max() - xs.min() <= 5 + 6            # each segment drifts by at most one column
    # one stroke of LaMa's settings: the widest disc inside it is at most the brush radius, up to
    # twice that where two segments meet at a sharp angle; thick brushes (5..104) are far wider
    # than thin ones (5..14)
    radii = {}
    for kind, widest in (("thin", 14), ("thick", 104)):
        one = dict(LAMA_SETTINGS[(kind, 256)], strokes=(1, 1))
        radii[kind] = [ndimage.distance_transform_edt(np.pad(_lama_strokes(256, 256, one, 1.0, rng(s)), 1)).max()
                       for s in range(100)]
        assert max(radii[kind]) <= widest + 1, (kind, max(radii[kind]))   # measured 11 / 59
    assert np.median(radii["thick"]) > 3 * np.median(radii["thin"])       # measured 32 / 6.4


def test_mean_mask_is_centred():
    for kind in ("medium", "thick"):
        masks, _ = draws(make_mask_generator(kind), 128, 128, range(DRAWS))
        weights = masks.mean(0)
        cy = (weights.sum(1) * np.arange(128)).sum() / weights.sum() / 128
        cx = (weights.sum(0) * np.arange(128)).sum() / weights.sum() / 128
        assert abs(cy - 0.5) < 0.05 and abs(cx - 0.5) < 0.05, (kind, cy, cx)


def test_scaling_and_resolution():
    gen = LamaMask("medium")
    assert gen.settings(256, 300) == (LAMA_SETTINGS[("medium", 256)], 1.0)
    assert gen.settings(128, 90)[1] == pytest.approx(90 / 256)
    assert gen.settings(600, 512) == (LAMA_SETTINGS[("medium", 512)], 1.0)   # auto: LaMa's 512 settings
    assert LamaMask("medium", resolution=256).settings(600, 512)[1] == 2.0
    # auto at 512 draws what resolution=512 draws; below 512 what resolution=256 draws
    assert np.array_equal(LamaThickMask()(512, 520, rng(3)), LamaThickMask(resolution=512)(512, 520, rng(3)))
    assert np.array_equal(LamaThickMask()(300, 300, rng(3)), LamaThickMask(resolution=256)(300, 300, rng(3)))
    # the 256 settings scaled to 128x128 cover the same share of the image as at 256
    for kind in ("thin", "thick"):
        at_256 = draws(make_mask_generator(kind), 256, 256, range(200))[0].mean()
        at_128 = draws(make_mask_generator(kind), 128, 128, range(200, 400))[0].mean()
        assert abs(at_256 - at_128) < 0.15 * at_256, (kind, at_256, at_128)


def test_max_hole_and_arguments():
    gen = LamaThickMask(max_hole=0.1)
    for s in range(20):
        assert gen(64, 64, rng(s)).mean() <= 0.1
    with pytest.raises(ValueError, match="max_hole"):
        LamaThickMask(max_hole=1e-4)(8, 8, rng(0))   # no mask can be that small: refused, not a hang
    for bad, name in [({"resolution": 300}, "resolution"), ({"resolution": True}, "resolution"),
                      ({"max_hole": 0}, "max_hole"), ({"max_hole": 1.5}, "max_hole")]:
        with pytest.raises(ValueError, match=name):
            LamaThinMask(**bad)
    with pytest.raises(ValueError, match="kind"):
        LamaMask("wide")
    with pytest.raises(ValueError, match="height"):
        LamaThinMask()(0, 16, rng(0))
    with pytest.raises(TypeError, match="rng"):
        LamaThinMask()(16, 16, 5)
    with pytest.raises(ValueError, match="mask kind 'thin' has no option paths"):
        make_mask_generator("thin", paths="x")
