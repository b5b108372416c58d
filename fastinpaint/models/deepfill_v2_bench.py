"""DeepFill v2 end-to-end benchmarks: the generator on fastinpaint's kernels against the
same model on eager layers (``use_backend("reference")``, and the published contextual
attention over the whole score matrix instead of the blocked one) and ``torch.compile`` of that,
and ``torch.compile`` of the generator on fastinpaint's layers, timed in the same run.

Cases:
  * ``G fwd+bwd``: the generator's forward and the backward of its L1 losses (both stages);
  * ``train step``: one discriminator step (G forward without grad, D on real and fake,
    hinge loss, backward) and one generator step (G forward, L1 + hinge losses through the
    frozen D, backward), as ``fastinpaint train`` runs them; no optimiser update. D is never
    compiled; its spectral-normalised convolutions (``SpectralNormConv2d``; its power
    iteration, the same ops as torch's for NCHW weights, in every column) run torch's formula
    (W / sigma) in eager and compile(eager), and fastinpaint's op (the output scaled by
    1/sigma where the output is the smaller) in the other two;
  * ``G inference``: eval mode, no grad, the refined output, at ``--infer-batch`` images (default 1).

Memory format: ``--channels-last`` puts every implementation's model and inputs in
channels_last. Without it they are NCHW, and on the CPU the two fastinpaint columns run them
channels_last inside (the networks' ``cpu_channels_last``, on by default where the cpu
backend runs), while eager and compile(eager) run NCHW as written (inductor picks its own
convolution layout).

Figures: median milliseconds, speed-up of fastinpaint over each baseline, and peak memory
of one call above the memory held before it: ``torch.cuda.max_memory_allocated`` on GPU; on
the CPU the peak resident set (VmHWM, reset through /proc/self/clear_refs) of a separate
process in which glibc serves every allocation of 64 KiB or more with its own mapping,
returned on free, so the peak follows the live tensors (Linux only; otherwise no CPU figure;
not for the compiled implementations, which would compile again there). That allocator
setting nearly doubles the run time of the model on the CPU, so it never applies to the
process that times.

    python -m fastinpaint.models.deepfill_v2_bench --device cpu --size 128 --batch 1 \\
        --json out.json --markdown out.md
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import sys
import time

import torch

from .. import _backend
from .. import benchmark as B
from .contextual_attention import ContextualAttention
from .deepfill_v2 import DeepFillV2Recipe

# the compiled ones last: a time limit cuts them first
IMPLS = ("eager", "fastinpaint", "compile(eager)", "compile(fastinpaint)")
CASES = ("G fwd+bwd", "train step", "G inference")


# ----------------------------------------------------------------------------- CPU peak memory

def _cpu_memory_setup() -> bool:
    """Large allocations through mmap (returned on free), and the peak RSS resettable:
    True when it could be arranged."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 64 * 1024)
        libc.mallopt(m_trim_threshold, 128 * 1024)
    except OSError:
        return False
    return B.reset_peak_rss()


def peak_mb(run, device: str, case: str, impl: str, batch: int, size: int, dtype, channels_last: bool,
            cnum: int = 48) -> float | None:
    """Peak memory of one ``run()`` above what was held before it, in MiB: on GPU
    :func:`fastinpaint.benchmark.cuda_peak_mb` here; on the CPU the same case and ``impl``
    rebuilt in a fresh process (:func:`_peak_child`), None for a compiled ``impl``."""
    gc.collect()
    if device == "cuda":
        return B.cuda_peak_mb(run)
    if impl.startswith("compile"):
        return None
    return B.run_peak_child([sys.executable, "-m", "fastinpaint.models.deepfill_v2_bench", "--_peak", case, impl,
                             str(batch), str(size), B.dtype_name(dtype), "1" if channels_last else "0", str(cnum)])


def _peak_child(case, impl, batch, size, dtype_name, channels_last, cnum) -> float | None:
    """In a fresh process: the peak RSS growth of one call of ``impl`` on ``case``."""
    if not _cpu_memory_setup():
        return None
    dtype = getattr(torch, dtype_name)
    image, mask = _inputs(int(batch), (int(size), int(size)), "cpu", dtype, channels_last == "1")
    run = make_step(build("cpu", dtype, channels_last == "1", int(cnum)), impl, case, image, mask)
    run()   # warm up
    gc.collect()
    return B.cpu_peak_mb(run)


# ----------------------------------------------------------------------------- the model and its steps

def _inputs(batch, size_hw, device, dtype, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = size_hw
    image = (torch.rand(batch, 3, h, w, generator=g) * 2 - 1).to(device, dtype)
    mask = torch.zeros(batch, 1, h, w)
    mask[:, :, h // 4:h // 4 + h // 2, w // 4:w // 4 + w // 2] = 1   # a box hole of half the sides
    mask = mask.to(device, dtype)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
        mask = mask.contiguous(memory_format=torch.channels_last)
    return image, mask


def build(device: str, dtype, channels_last: bool, cnum: int = 48, seed: int = 0) -> DeepFillV2Recipe:
    torch.manual_seed(seed)
    recipe = DeepFillV2Recipe(cnum=cnum)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    recipe.generator.to(device=device, dtype=dtype, memory_format=fmt)
    recipe.discriminator.to(device=device, dtype=dtype, memory_format=fmt)
    return recipe


def _backend_ctx(impl: str):
    return _backend.use_backend("reference") if impl in ("eager", "compile(eager)") else contextlib.nullcontext()


def make_step(recipe, impl: str, case: str, image, mask):
    """A closure running one ``case`` for ``impl`` (compiled lazily inside the backend context)."""
    g = recipe.generator
    d = recipe.discriminator
    if impl in ("eager", "compile(eager)"):   # the published attention: the whole score matrix
        for m in g.modules():
            if isinstance(m, ContextualAttention):
                m.blocked = False
    net = torch.compile(g, dynamic=False) if impl.startswith("compile") else g
    x = recipe.prepare_input(image, mask)
    params = list(g.parameters()) + list(d.parameters())

    def zero():
        for p in params:
            p.grad = None

    if case == "G inference":
        g.eval()

        def run():
            with _backend_ctx(impl), torch.no_grad():
                return net(x)
    elif case == "G fwd+bwd":
        g.train()

        def run():
            zero()
            with _backend_ctx(impl):
                out = net(x)
                losses = recipe.generator_losses(image, mask, out, None)
                sum(losses.values()).backward()
    elif case == "train step":
        g.train()

        def run():
            zero()
            with _backend_ctx(impl):
                with torch.no_grad():
                    out = net(x)
                sum(recipe.discriminator_losses(image, mask, out, d).values()).backward()
                d.requires_grad_(False)   # frozen for the generator's step, as the trainer does
                try:
                    out = net(x)
                    sum(recipe.generator_losses(image, mask, out, d).values()).backward()
                finally:
                    d.requires_grad_(True)
    else:
        raise ValueError(f"unknown case {case!r}")
    return run


def _ratios(rows, case, base):
    for r in rows:
        if r["case"] != case or "ms" not in r:
            continue
        r.update(B.speedups(r, {name: b["ms"] for name, b in base.items()}))
        for name, b in base.items():
            if b.get("peak_MB") and r.get("peak_MB") is not None:
                r[f"peak_vs_{name}"] = r["peak_MB"] / b["peak_MB"]


def run_benchmarks(device="cpu", dtype=torch.float32, cases=(("G fwd+bwd", 1, 256), ("train step", 1, 256),
                                                                 ("G inference", 1, 512)),
                   channels_last=False, cnum=48, impls=IMPLS, min_time_s=1.0, progress=None,
                   interleave=None) -> list[dict]:
    """Rows of figures per (case, impl). ``interleave`` (default: on the CPU) times the
    implementations in turns, one call each per round, so that a machine whose load drifts
    slows them alike; otherwise each is timed on its own with :func:`fastinpaint.benchmark.time_fn`."""
    if interleave is None:
        interleave = device == "cpu"
    rows = []
    for case, batch, size in cases:
        with B.fresh_compile():   # each case compiles afresh; a fallback to eager is an error
            image, mask = _inputs(batch, (size, size), device, dtype, channels_last)
            base, runs, case_rows = {}, {}, {}

            def memory(impl, run):
                return peak_mb(run, device, case, impl, batch, size, dtype, channels_last, cnum)

            for impl in impls:
                row = {"case": case, "impl": impl, "dtype": B.dtype_name(dtype), "batch": batch,
                       "size": f"{size}x{size}", "channels_last": channels_last, "cnum": cnum}
                try:
                    run = make_step(build(device, dtype, channels_last, cnum), impl, case, image, mask)
                    if interleave:
                        runs[impl] = run
                    else:
                        row["ms"] = B.time_fn(run, device, min_time_s=min_time_s, max_reps=50, warmup=2)
                        row["peak_MB"] = memory(impl, run)
                        del run
                except Exception as e:  # report, keep going
                    row["error"] = B.error_text(e, limit=None)
                case_rows[impl] = row
                rows.append(row)
                if not interleave:
                    if impl in B.BASELINES and "ms" in row:
                        base[impl] = row
                    _ratios(rows, case, base)
                    if progress:
                        progress(case, rows)
                gc.collect()
            if interleave and runs:
                # the first two calls compile / warm up
                timed = B.time_interleaved(runs, device, min_time_s=min_time_s, max_rounds=50, warmup=2)
                for impl, run in runs.items():
                    case_rows[impl].update(timed[impl])
                    if "ms" in timed[impl]:
                        case_rows[impl]["peak_MB"] = memory(impl, run)
                        if impl in B.BASELINES:
                            base[impl] = case_rows[impl]
                _ratios(rows, case, base)
                if progress:
                    progress(case, rows)
                runs.clear()
                gc.collect()
    return rows


COLUMNS = [("case", "case", None), ("impl", "impl", None), ("dtype", "dtype", None), ("batch", "batch", None),
           ("size", "size", None), ("ms", "ms", ".1f"), ("x vs eager", "x_vs_eager", ".2f"),
           ("x vs compile(eager)", "x_vs_compile(eager)", ".2f"), ("peak MB", "peak_MB", ".1f"),
           ("peak / eager's", "peak_vs_eager", ".2f")]
ERROR_CHARS = 100


def markdown(rows, env, ceilings=None) -> str:
    return B.markdown_table(rows, COLUMNS, env, ceilings, error_chars=ERROR_CHARS)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_peak":
        print(B.peak_line(_peak_child(*argv[1:8])))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    return run_args(add_arguments(p).parse_args(argv))


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of this script and of ``fastinpaint bench deepfill_v2``."""
    B.add_common_args(p, min_time=1.0)
    p.add_argument("--channels-last", action="store_true", default=None)
    p.add_argument("--size", type=int, default=None, help="training / fwd+bwd size (256 published)")
    p.add_argument("--batch", type=int, default=None, help="training batch (GPU default 8, CPU 1)")
    p.add_argument("--infer-size", type=int, default=512)
    p.add_argument("--infer-batch", type=int, default=1, help="batch of the inference case (default 1: one image)")
    p.add_argument("--cnum", type=int, default=48)
    p.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    p.add_argument("--impls", nargs="*", default=list(IMPLS))
    p.add_argument("--train-size", type=int, default=None, help="size of the train-step case (default --size)")
    return p


def run_args(a: argparse.Namespace) -> int:
    """Run the cases ``a`` (from :func:`add_arguments`) select; print and write the table."""
    from ..errors import InvalidInputError

    dtype = B.apply_common_args(a)
    gpu = a.device == "cuda"
    channels_last = gpu if a.channels_last is None else a.channels_last
    size = a.size or 256
    batch = a.batch or (8 if gpu else 1)
    sizes = {"G fwd+bwd": size, "train step": a.train_size or size, "G inference": a.infer_size}
    for name in ("batch", "infer_batch"):
        value = getattr(a, name)
        if value is not None and value < 1:
            raise InvalidInputError(f"must be at least 1, got {value}", argument=name.replace("_", "-"))
    cases = [(c, batch if c != "G inference" else a.infer_batch, sizes[c]) for c in a.cases]
    env = B.environment(a.device)
    env.update(channels_last=channels_last, cnum=a.cnum)

    def progress(case, rows):
        print("\n".join(B.markdown_rows([r for r in rows if r["case"] == case], COLUMNS, error_chars=ERROR_CHARS)),
              flush=True)
        B.write_results(a.json, a.markdown, rows, env, {}, markdown,
                        path_plot=a.plot, title='DeepFill v2')

    rows = run_benchmarks(a.device, dtype, cases, channels_last, a.cnum, tuple(a.impls), a.min_time, progress)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(B.script_main(main, "python -m fastinpaint.models.deepfill_v2_bench"))
