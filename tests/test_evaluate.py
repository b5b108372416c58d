"""fastinpaint evaluate: identical holes for every method and run, the report's numbers equal
a direct computation, unavailable baselines reported (not crashed on), bad files skipped, any
image size with known pixels kept, and the mistakes refused with one line."""

import csv
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from fastinpaint import cli
from fastinpaint.data.masks import make_mask_generator
from fastinpaint.evaluation import (GRID_GAP, BaselineUnavailableError, baseline_fill, checkpoint_fill, evaluate,
                                    grid_columns, grid_header_height, grid_label, mask_rng, mean_ci95)


def _images(sizes, seed=0):
    """Smooth random images (a blurred noise field plus a gradient), (h, w, 3) uint8."""
    rng = np.random.default_rng(seed)
    out = []
    for h, w in sizes:
        noise = rng.random((h // 4 + 2, w // 4 + 2, 3)) * 255
        big = np.asarray(Image.fromarray(noise.astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC))
        ramp = np.linspace(0, 60, w)[None, :, None]
        out.append(np.clip(big * 0.75 + ramp, 0, 255).astype(np.uint8))
    return out


def _folder(tmp_path, sizes, broken=()):
    root = tmp_path / "images"
    root.mkdir()
    names = []
    for i, img in enumerate(_images(sizes)):
        name = f"img{i}.png"
        if i in broken:
            (root / name).write_bytes(b"\x89PNG\r\n\x1a\n not an image")
        else:
            Image.fromarray(img).save(root / name)
        names.append(name)
    return root, names


class Recorder:
    """A method that records the masks it is given and fills holes with grey."""

    def __init__(self):
        self.masks = []

    def __call__(self, image, mask):
        self.masks.append(mask[0, 0].numpy().copy())
        return torch.zeros_like(image)


def _evaluate_cli(*args):
    return cli.main(["evaluate", "--lpips", "no", "--fid", "no", *map(str, args)])


def _header(labels, widths):
    """The grid's header row drawn directly: each label in PIL's default font at its column."""
    from PIL import ImageDraw, ImageFont

    lefts = [sum(widths[:k]) + GRID_GAP * k for k in range(len(widths))]
    image = Image.new("RGB", (lefts[-1] + widths[-1], grid_header_height()), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for left, width, text in zip(lefts, widths, labels):
        draw.text((left, GRID_GAP), grid_label(text, width), fill=(0, 0, 0), font=ImageFont.load_default())
    return np.asarray(image), lefts


def _check_grid(grid, labels, cell_width, rows):
    """The grid: the header of the column names, then each row's cells (masked input, methods,
    ground truth) at their columns, each column as wide as its widest cell, and its label whole."""
    widths = grid_columns([{"image": np.zeros((1, cell_width, 3))}], labels[1:-1])[1]
    assert all(w >= cell_width for w in widths) and all(grid_label(t, w) == t for t, w in zip(labels, widths))
    header, lefts = _header(labels, widths)
    head = header.shape[0]
    assert grid.shape == (head + sum(r[0].shape[0] for r in rows) + GRID_GAP * (len(rows) - 1), header.shape[1], 3)
    assert np.array_equal(grid[:head], header)
    for left, width in zip(lefts, widths):   # every column has its name written above it
        assert (header[:, left:left + width] < 128).any()
    top = head
    for cells in rows:
        h, w = cells[0].shape[:2]
        for left, cell in zip(lefts, cells):
            assert np.array_equal(grid[top:top + h, left:left + w], cell)
        top += h + GRID_GAP


# ----------------------------------------------------------------------------- identical holes

def test_same_holes_for_every_method_and_run():
    images = _images([(40, 52), (33, 33), (64, 48)])
    a, b = Recorder(), Recorder()
    first = evaluate(images, {"a": a, "b": b, "mean": "mean"}, masks="thick", seed=5, device="cpu")
    again = Recorder()
    evaluate(images, {"again": again}, masks="thick", seed=5, device="cpu")
    other = Recorder()
    evaluate(images, {"other": other}, masks="thick", seed=6, device="cpu")
    gen = make_mask_generator("thick")
    for i, img in enumerate(images):
        expected = gen(img.shape[0], img.shape[1], mask_rng(5, i))[0].numpy()
        for rec in (a, b, again):
            assert np.array_equal(rec.masks[i], expected)
    assert any(not np.array_equal(x, y) for x, y in zip(a.masks, other.masks))   # the seed matters
    # the mean fill was scored on the same holes: its rows say so through the hole share
    shares = [r["hole_fraction"] for r in first.rows if r["method"] == "mean"]
    assert shares == pytest.approx([m.mean() for m in a.masks])


def test_a_skipped_file_keeps_the_other_images_holes(tmp_path):
    root, names = _folder(tmp_path, [(30, 40), (30, 40), (36, 28)], broken=[1])
    rec = Recorder()
    with pytest.warns(RuntimeWarning, match="skipping img1.png"):
        result = evaluate(root, {"rec": rec}, masks="medium", seed=2, device="cpu")
    assert result.images == ["img0.png", "img2.png"] and result.skipped[0][0] == "img1.png"
    gen = make_mask_generator("medium")
    assert np.array_equal(rec.masks[0], gen(30, 40, mask_rng(2, 0))[0].numpy())
    assert np.array_equal(rec.masks[1], gen(36, 28, mask_rng(2, 2))[0].numpy())   # index 2, not 1
    assert [r["index"] for r in result.rows] == [0, 2]


# ----------------------------------------------------------------------------- direct computation

def _direct(img, hole, filled):
    """The metrics of one image computed directly (scikit-image, numpy)."""
    diff = np.abs(filled.astype(np.float64) - img.astype(np.float64))
    return {"psnr": peak_signal_noise_ratio(img, filled, data_range=255),
            "ssim": structural_similarity(img, filled, data_range=255, channel_axis=-1, gaussian_weights=True,
                                          sigma=1.5, use_sample_covariance=False),
            "l1": diff.mean() / 255, "l1_hole": diff[hole].mean() / 255, "mmagic_l1_error": diff.mean()}


def test_report_numbers_equal_a_direct_computation(tmp_path, capsys):
    cv2 = pytest.importorskip("cv2")
    sizes = [(23, 31), (40, 27), (32, 32)]
    root, names = _folder(tmp_path, sizes)
    out = tmp_path / "report"
    assert _evaluate_cli("--data", root, "--baseline", "mean", "--baseline", "telea", "--masks", "block",
                         "--seed", 3, "--out", out) == 0
    printed = capsys.readouterr().out
    with open(out / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    summary = json.loads((out / "summary.json").read_text())
    gen = make_mask_generator("block")
    direct = {"mean": [], "telea": []}
    fills = []
    for i, ((h, w), img) in enumerate(zip(sizes, _images(sizes))):
        hole = gen(h, w, np.random.default_rng([3, i]))[0].numpy() > 0.5
        mean = img.copy()
        mean[hole] = np.round(img[~hole].astype(np.float64).mean(axis=0))
        telea = cv2.inpaint(img, hole.astype(np.uint8) * 255, 3, cv2.INPAINT_TELEA)
        telea = np.where(hole[..., None], telea, img)
        fills.append((img, hole, mean, telea))
        direct["mean"].append(_direct(img, hole, mean))
        direct["telea"].append(_direct(img, hole, telea))
    assert [(r["image"], r["method"]) for r in rows] == [(n, m) for n in names for m in ("mean", "telea")]
    for row in rows:
        want = direct[row["method"]][int(row["index"])]
        for key, value in want.items():
            assert float(row[key]) == pytest.approx(value, rel=1e-5, abs=2e-5), (row["image"], row["method"], key)
    for method, per_image in direct.items():
        entry = summary["methods"][method]
        assert entry["available"] and entry["images"] == 3
        for key in per_image[0]:
            v = np.array([d[key] for d in per_image])
            half = stats.t.ppf(0.975, 2) * v.std(ddof=1) / np.sqrt(3)
            got = entry["metrics"][key]
            assert got["mean"] == pytest.approx(v.mean(), rel=1e-5, abs=2e-5)
            assert got["ci95_low"] == pytest.approx(v.mean() - half, rel=1e-4, abs=1e-4)
            assert got["ci95_high"] == pytest.approx(v.mean() + half, rel=1e-4, abs=1e-4)
        assert entry["mmagic"]["l1_error"] == pytest.approx(np.mean([d["mmagic_l1_error"] for d in per_image]),
                                                            rel=1e-5)
        psnr = np.array([d["psnr"] for d in per_image])
        half = stats.t.ppf(0.975, 2) * psnr.std(ddof=1) / np.sqrt(3)
        line = f"{psnr.mean():.2f} ± {half:.2f}"
        assert line in (out / "summary.md").read_text() and line in printed
    # the grid: a header naming the columns, then masked input | mean | telea | ground truth, one row
    # per image, its pixels the fills
    grid = np.asarray(Image.open(out / "grid.png"))
    rows = []
    for img, hole, mean, telea in fills:
        masked = img.copy()
        masked[hole] = 255
        rows.append((masked, mean, telea, img))
    _check_grid(grid, ["masked input", "mean", "telea", "ground truth"], max(w for _, w in sizes), rows)
    assert grid_columns([{"image": f[0]} for f in fills], ["mean", "telea"])[0] == ["masked input", "mean", "telea",
                                                                                    "ground truth"]


def test_tensor_images_and_given_masks_match_arrays():
    images = _images([(24, 30), (30, 24)])
    holes = [make_mask_generator("thin")(h, w, np.random.default_rng(i))[0].numpy() > 0
             for i, (h, w) in enumerate([(24, 30), (30, 24)])]
    tensors = [torch.from_numpy(i).permute(2, 0, 1).float() / 127.5 - 1 for i in images]
    masks = [torch.from_numpy(h)[None].float() for h in holes]
    a = evaluate(images, ["mean"], masks=holes)
    b = evaluate(tensors, ["mean"], masks=masks)
    assert a.rows == b.rows and a.means() == b.means()
    assert a.settings["masks"] == "given"


def test_mean_ci95():
    v = np.random.default_rng(0).normal(3.0, 2.0, 7)
    mean, low, high = mean_ci95(v)
    lo, hi = stats.t.interval(0.95, 6, loc=v.mean(), scale=stats.sem(v))
    assert mean == pytest.approx(v.mean()) and low == pytest.approx(lo) and high == pytest.approx(hi)
    assert np.isnan(mean_ci95([2.0])[1]) and mean_ci95([2.0])[0] == 2.0
    assert np.isnan(mean_ci95([1.0, float("inf")])[2])


# ----------------------------------------------------------------------------- unavailable baselines

def test_unavailable_baseline_is_reported_not_crashed_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cv2", None)   # OpenCV not importable
    with pytest.raises(BaselineUnavailableError, match="opencv-python-headless"):
        baseline_fill("telea")
    root, _ = _folder(tmp_path, [(24, 24), (20, 28)])
    out = tmp_path / "report"
    assert _evaluate_cli("--data", root, "--baseline", "telea", "--baseline", "navier_stokes", "--baseline", "mean",
                         "--masks", "thin", "--out", out) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    for name in ("telea", "navier_stokes"):
        entry = summary["methods"][name]
        assert entry["available"] is False and "opencv-python-headless" in entry["reason"]
        assert "metrics" not in entry
        assert f"| {name} | - | unavailable: OpenCV is not importable" in printed
    assert summary["methods"]["mean"]["available"] and summary["methods"]["mean"]["images"] == 2
    with open(out / "per_image.csv") as f:
        assert {r["method"] for r in csv.DictReader(f)} == {"mean"}
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape[1] == sum(grid_columns([{"image": np.zeros((24, 28, 3))}], ["mean"])[1]) + 2 * GRID_GAP


# ----------------------------------------------------------------------------- trained generators

def test_checkpoint_any_size_known_pixels_kept(tiny_run):
    from fastinpaint.inpaint import inpaint_array, load_generator

    images = _images([(37, 45), (29, 50)])   # not multiples of the network's 4
    result = evaluate(images, {"net": checkpoint_fill(tiny_run), "mean": "mean"}, masks="thin", seed=1,
                      device="cpu")
    recipe, generator = load_generator(tiny_run)
    for sample, img in zip(result.samples, images):
        out, hole = sample["outputs"]["net"], sample["hole"]
        assert np.array_equal(out[~hole], img[~hole])
        assert np.array_equal(out, inpaint_array(recipe, generator, img, hole))   # as `inpaint` fills it
        row = next(r for r in result.rows if r["method"] == "net" and r["image"] == sample["name"])
        assert row["psnr"] == pytest.approx(_direct(img, hole, out)["psnr"], rel=1e-5)
    assert set(result.means()) == {"net", "mean"}


def test_cli_checkpoint_demo_and_size(tiny_run, tmp_path, capsys):
    out = tmp_path / "report"
    assert _evaluate_cli("--checkpoint", tiny_run, "--baseline", "mean", "--data", "demo", "--size", 24,
                         "--masks", "center", "--out", out) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"][str(tiny_run)]["images"] == 11 and summary["settings"]["size"] == 24
    grid = np.asarray(Image.open(out / "grid.png"))
    labels = ["masked input", str(tiny_run), "mean", "ground truth"]   # the first 4 images, 4 columns
    widths = grid_columns([{"image": np.zeros((24, 24, 3))}], [str(tiny_run), "mean"])[1]
    assert grid.shape == (grid_header_height() + 4 * 24 + 3 * GRID_GAP, sum(widths) + 3 * GRID_GAP, 3)
    assert np.array_equal(grid[:grid_header_height()], _header(labels, widths)[0])
    assert grid_label(str(tiny_run), widths[1]).startswith("...") and str(tiny_run).endswith(
        grid_label(str(tiny_run), widths[1])[3:])   # a long path keeps its end


def test_mask_folder_by_name_or_order(tmp_path):
    root, names = _folder(tmp_path, [(20, 20), (20, 20)])
    masks = tmp_path / "masks"
    masks.mkdir()
    holes = []
    for i, name in enumerate(names):
        hole = np.zeros((20, 20), bool)
        hole[2 + i:9 + 3 * i, 4:12] = True
        holes.append(hole)
        Image.fromarray(hole.astype(np.uint8) * 255).save(masks / name)
    rec = Recorder()
    result = evaluate(root, {"rec": rec}, masks=masks, device="cpu")
    assert all(np.array_equal(m > 0, h) for m, h in zip(rec.masks, holes))
    assert "named like the images" in result.settings["masks"]
    (masks / "img1.png").rename(masks / "zz.png")   # names that match no image: taken in sorted order
    (masks / "img0.png").rename(masks / "aa.png")
    rec = Recorder()
    evaluate(root, {"rec": rec}, masks=masks, device="cpu")
    assert all(np.array_equal(m > 0, h) for m, h in zip(rec.masks, holes))
    (masks / "aa.png").rename(masks / "img0.png")   # one named, one not: refused
    with pytest.raises(FileNotFoundError, match="no mask for img1.png"):
        evaluate(root, {"rec": Recorder()}, masks=masks, device="cpu")
    # named by the stem, whatever the extension (as inpaint pairs them)
    Image.open(masks / "zz.png").save(masks / "img1.bmp")
    (masks / "zz.png").unlink()
    rec = Recorder()
    result = evaluate(root, {"rec": rec}, masks=masks, device="cpu")
    assert all(np.array_equal(m > 0, h) for m, h in zip(rec.masks, holes))
    assert "named like the images" in result.settings["masks"]
    # two masks of one stem: which one is meant is not guessed
    Image.open(masks / "img1.bmp").save(masks / "img1.png")
    with pytest.raises(ValueError, match="img1.bmp and .*img1.png are both named like the image img1.png"):
        evaluate(root, {"rec": Recorder()}, masks=masks, device="cpu")


def test_a_mask_folder_of_another_count_and_no_names_is_refused(tmp_path, capsys):
    """Masks taken in sorted order need one per image: 1 mask for 3 images is not reused."""
    root, _ = _folder(tmp_path, [(20, 20)] * 3)
    masks = tmp_path / "masks"
    masks.mkdir()
    hole = np.zeros((20, 20), np.uint8)
    hole[4:12, 4:12] = 255
    Image.fromarray(hole).save(masks / "hole.png")
    with pytest.raises(ValueError, match="1 masks in .* for 3 images"):
        evaluate(root, ["mean"], masks=masks, device="cpu")
    capsys.readouterr()
    assert _evaluate_cli("--data", root, "--baseline", "mean", "--masks", masks, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith("fastinpaint evaluate: --masks: ") and err.count("\n") == 1, err
    assert "name each mask like its image" in err and not (tmp_path / "out").exists()
    for i in (1, 2):   # as many masks as images: image i gets mask i
        Image.fromarray(np.roll(hole, 3 * i, axis=1)).save(masks / f"hole{i}.png")
    rec = Recorder()
    evaluate(root, {"rec": rec}, masks=masks, device="cpu")
    assert [m.nonzero()[1].min() for m in rec.masks] == [4, 7, 10]


def test_an_unreadable_image_is_skipped_with_a_mask_folder(tmp_path, capsys):
    """An image that cannot be read needs no mask: it is skipped with a warning, the others are scored."""
    root, names = _folder(tmp_path, [(20, 24), (20, 24), (24, 20)], broken=[1])
    masks = tmp_path / "masks"
    masks.mkdir()
    holes = {}
    for i in (0, 2):
        hole = np.zeros(_images([(20, 24), (20, 24), (24, 20)])[i].shape[:2], bool)
        hole[3 + i:10 + i, 5:14] = True
        holes[names[i]] = hole
        Image.fromarray(hole.astype(np.uint8) * 255).save(masks / names[i])
    rec = Recorder()
    with pytest.warns(RuntimeWarning, match="skipping img1.png"):
        result = evaluate(root, {"rec": rec}, masks=masks, device="cpu")
    assert result.images == ["img0.png", "img2.png"] and [n for n, _ in result.skipped] == ["img1.png"]
    assert all(np.array_equal(m > 0, holes[n]) for m, n in zip(rec.masks, result.images))
    capsys.readouterr()
    assert _evaluate_cli("--data", root, "--baseline", "mean", "--masks", masks, "--out", tmp_path / "out") == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["methods"]["mean"]["images"] == 2 and summary["skipped"][0]["image"] == "img1.png"


def test_with_size_a_mask_file_is_resized_and_cropped_as_its_image(tmp_path):
    """--size on a non-square image: the mask goes through the image's resize and centre crop, so
    the hole covers the content its file marks (not the mask stretched to the square)."""
    h, w, size = 60, 92, 30   # resized to 30x46, then columns 8..37 kept
    img = np.full((h, w, 3), 90, np.uint8)
    img[20:40, 40:60] = (250, 10, 10)   # a red patch, and the hole drawn exactly on it
    hole = np.zeros((h, w), bool)
    hole[20:40, 40:60] = True
    root, masks = tmp_path / "images", tmp_path / "masks"
    root.mkdir(), masks.mkdir()
    Image.fromarray(img).save(root / "wide.png")
    Image.fromarray(hole.astype(np.uint8) * 255).save(masks / "wide.png")
    expected = np.zeros((size, size), bool)
    expected[10:20, 12:22] = True   # rows 20..39 / 2, columns 40..59 / 2 - 8
    for masks_given in (masks, [hole]):
        rec = Recorder()
        result = evaluate(root if masks_given is masks else [img], {"rec": rec}, masks=masks_given, size=size,
                          device="cpu")
        assert np.array_equal(rec.masks[0] > 0, expected)
        image = result.samples[0]["image"]
        assert image.shape == (size, size, 3)
        red = np.abs(image.astype(int) - (250, 10, 10)).max(axis=2) < 12   # bicubic rings a little
        assert red[11:19, 13:21].all()                  # the hole's content is the patch
        assert red[~expected].mean() < 0.05


def test_an_existing_report_is_kept_unless_overwrite(tmp_path, capsys):
    root, _ = _folder(tmp_path, [(16, 16), (16, 20)])
    out = tmp_path / "report"
    assert _evaluate_cli("--data", root, "--baseline", "mean", "--masks", "center", "--out", out) == 0
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert _evaluate_cli("--data", root, "--baseline", "mean", "--masks", "thick", "--out", out) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastinpaint evaluate: --out: ") and err.count("\n") == 1, err
    assert "already holds a report" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(FileExistsError, match="already holds a report"):
        evaluate(root, ["mean"]).write(out)
    assert _evaluate_cli("--data", root, "--baseline", "mean", "--masks", "thick", "--out", out, "--overwrite") == 0
    assert json.loads((out / "summary.json").read_text())["settings"]["masks"] == "thick"
    assert (out / "notes.txt").read_text() == "mine"


def test_one_image_is_one_image():
    result = evaluate(_images([(20, 20)]), ["mean"], masks="center")
    assert result.table().startswith("data: given images (1 image); masks: center")
    assert "(2 images" in evaluate(_images([(20, 20), (20, 20)]), ["mean"], masks="center").table()


# ----------------------------------------------------------------------------- mistakes

@pytest.mark.parametrize("wrong,flag,words", [
    ([], "--checkpoint", "nothing to evaluate"),
    (["--baseline", "mean", "--masks", "circles"], "--masks", "neither a mask kind nor a folder"),
    (["--baseline", "mean", "--data", "NOWHERE"], "--data", "does not exist"),
    (["--baseline", "mean", "--size", "5"], "--size", "must be an integer >= 11"),
    (["--baseline", "mean", "--baseline", "mean"], "--baseline", "given twice"),
    (["--checkpoint", "IMAGE"], "--checkpoint", "an image, not a checkpoint"),
    (["--baseline", "mean", "--out", "IMAGE"], "--out", "is a file"),
    (["--baseline", "mean", "--out", "IMAGE/sub"], "--out", "which is a file; give a folder for the report"),
    (["--baseline", "mean", "--model", "deepfill_v2"], "--model", "goes with --checkpoint"),
])
def test_mistakes_are_one_line(tmp_path, capsys, wrong, flag, words):
    root, _ = _folder(tmp_path, [(16, 16)])
    wrong = [w.replace("IMAGE", str(root / "img0.png")) for w in wrong]
    data = [] if "--data" in wrong else ["--data", str(root)]
    out = [] if "--out" in wrong else ["--out", str(tmp_path / "out")]
    code = cli.main(["evaluate", *data, *out, *wrong])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"fastinpaint evaluate: {flag}: ") and words in err, err
    assert not (tmp_path / "out").exists()


def test_lpips_and_fid_from_disk_only(tmp_path, capsys):
    from fastinpaint.metrics import MetricUnavailableError, resolve_lpips_weights

    try:
        resolve_lpips_weights()
        pytest.skip("LPIPS weights are on this machine")
    except MetricUnavailableError as e:
        missing = str(e)
    root, _ = _folder(tmp_path, [(16, 16), (16, 20)])
    code = cli.main(["evaluate", "--data", str(root), "--baseline", "mean", "--lpips", "yes", "--out",
                     str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "LPIPS is unavailable" in err
    assert err.startswith("fastinpaint evaluate: --lpips: ") and "--lpips no" in err, err
    with pytest.raises(MetricUnavailableError, match="LPIPS is unavailable"):
        evaluate(root, ["mean"], lpips=True)
    try:
        from fastinpaint.metrics import resolve_fid_weights

        resolve_fid_weights()
    except MetricUnavailableError:   # FID's weights (or package) missing too: named likewise
        code = cli.main(["evaluate", "--data", str(root), "--baseline", "mean", "--lpips", "no", "--fid", "yes",
                         "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("fastinpaint evaluate: --fid: FID is unavailable"), err
    result = evaluate(root, ["mean"], lpips="auto", fid="auto")   # auto: noted, not an error
    assert any(n.startswith("LPIPS not computed") and missing in n for n in result.notes)
    assert "lpips" not in result.means()["mean"]


def test_a_broken_method_is_an_error_not_a_number():
    images = _images([(20, 20)])
    with pytest.raises(ValueError, match="'nan' returned NaN"):
        evaluate(images, {"nan": lambda x, m: torch.full_like(x, float("nan"))}, device="cpu")
    with pytest.raises(ValueError, match="'small' returned \\(1, 3, 10, 10\\)"):
        evaluate(images, {"small": lambda x, m: x[..., :10, :10]}, device="cpu")
    with pytest.raises(ValueError, match="methods"):
        evaluate(images, {"x": 3}, device="cpu")
    with pytest.raises(ValueError, match="baseline"):
        evaluate(images, ["median"], device="cpu")


def test_masks_given_twice_is_an_error_naming_it(tmp_path, capsys):
    """argparse would silently keep the last --masks; one run scores one mask protocol."""
    with pytest.raises(SystemExit) as e:
        _evaluate_cli("--baseline", "mean", "--masks", "thick", "--masks", "thin", "--out", tmp_path / "out")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--masks given twice" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
