"""DeepFill v2 on large images through the Python API ``fastinpaint inpaint`` runs
(``fastinpaint.inpaint.inpaint_array``): time and peak resident memory per image size, each
size in a fresh process, beside the memory ``inpaint`` estimates before it starts (the
recipe's ``inference_memory``, what ``--max-memory`` is checked against).

Generator: ``DeepFillV2Recipe()`` (cnum 48, blocked contextual attention, untrained: the
work does not depend on the weights), float32, batch 1, eval mode, no gradients. Image: uniform
random colours; hole: 32 x 32 pixel blocks, each a hole with probability 0.3 (fixed seed), so
about 30% of the image and holes all over it. Threads: torch's default.

    python benchmarks/deepfill_v2_large_images.py --sizes 512 1024 2048 4096 --json out.json --markdown out.md
"""

import argparse
import json
import subprocess
import sys
import time

from fastinpaint import benchmark as B

COLUMNS = [("image", "image", None), ("hole share", "hole_share", ".3f"), ("time (s)", "seconds", ".1f"),
           ("peak RSS (GB)", "peak_rss_GB", ".2f"), ("inpaint's estimate (GB)", "estimate_GB", ".2f"),
           ("estimate / peak", "estimate_over_peak", ".2f")]


def child(size: int) -> dict:
    """One size in this process: the figures as a dict (printed as a JSON line)."""
    import numpy as np
    import torch

    from fastinpaint.inpaint import inpaint_array
    from fastinpaint.models.deepfill_v2 import DeepFillV2Recipe

    torch.manual_seed(0)
    recipe = DeepFillV2Recipe()
    generator = recipe.generator.eval()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    blocks = rng.random((-(-size // 32), -(-size // 32))) < 0.3
    hole = np.kron(blocks, np.ones((32, 32), dtype=bool))[:size, :size]
    base = B.peak_rss_bytes()
    t0 = time.perf_counter()
    out = inpaint_array(recipe, generator, image, hole, max_memory=None)
    seconds = time.perf_counter() - t0
    peak = B.peak_rss_bytes()
    assert out.shape == image.shape and np.array_equal(out[~hole], image[~hole])
    estimate = recipe.inference_memory(size, size)
    return {"image": f"{size}x{size}", "hole_share": float(hole.mean()), "seconds": seconds,
            "peak_rss_GB": peak / 1e9, "rss_before_GB": base / 1e9, "estimate_GB": estimate / 1e9,
            "estimate_over_peak": estimate / max(1, peak - base)}


def run(sizes, timeout: float | None) -> list[dict]:
    rows = []
    for size in sizes:
        cmd = [sys.executable, __file__, "--child", str(size)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            rows.append({"image": f"{size}x{size}", "error": f"not finished in {timeout:.0f} s"})
            continue
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        if done.returncode or not lines:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            rows.append({"image": f"{size}x{size}", "error": f"exit {done.returncode}: {tail}"})
        else:
            rows.append(json.loads(lines[-1]))
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--timeout", type=float, default=None, help="seconds per size (default: none)")
    p.add_argument("--json")
    p.add_argument("--markdown")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child is not None:
        print(json.dumps(child(a.child)), flush=True)
        return 0
    bad = [s for s in a.sizes if s < 8 or s % 8]
    if bad:
        p.error(f"--sizes must be multiples of 8, at least 8; got {bad}")
    rows = run(a.sizes, a.timeout)
    env = B.environment("cpu")
    table = B.markdown_table(rows, COLUMNS, env, notes=(
        "", "DeepFill v2 (cnum 48, untrained) through `inpaint_array`, float32, batch 1, a fresh process per "
            "size; peak RSS: the process's VmHWM (Python, torch and the model included); the estimate counts "
            "what the forward adds (estimate / peak: against the peak minus the RSS before the call)."))
    print(table)
    B.write_results(a.json, a.markdown, rows, env, {}, lambda *_: table)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
