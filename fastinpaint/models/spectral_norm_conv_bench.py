"""Spectral-normalised convolution benchmarks on the SN-PatchGAN discriminator's layers (DeepFill v2,
a 256x256 image; real and fake in one batch): ``SpectralNormConv2d`` on each fastinpaint backend
against ``torch.nn.utils.parametrizations.spectral_norm(nn.Conv2d(...))`` (eager) and
torch.compile of it, timed in turns in the same run. The modules are in training mode, so every
forward runs one power-iteration step, as in training. Per case: median ms of forward+backward
(the gradients of the input, the weight and the bias) and of forward (no grad), the speed-ups,
and the bytes saved for backward.

    python -m fastinpaint.models.spectral_norm_conv_bench --device cpu --json out.json --markdown out.md
"""

from __future__ import annotations

import argparse
import copy
import dataclasses

import torch
from torch import nn

from .. import _backend
from .. import benchmark as B
from ..nn.spectral_norm_conv import SpectralNormConv2d


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    cin: int
    cout: int
    size: int
    k: int = 5
    stride: int = 2


# SN-PatchGAN (cnum 64) on a 256x256 image and its mask: six 5x5 stride-2 layers
CASES = [
    Case("conv1 4->64 @256", 4, 64, 256),
    Case("conv2 64->128 @128", 64, 128, 128),
    Case("conv3 128->256 @64", 128, 256, 64),
    Case("conv4 256->256 @32", 256, 256, 32),
    Case("conv5 256->256 @16", 256, 256, 16),
    Case("conv6 256->256 @8", 256, 256, 8),
]


def _modules(case: Case, device, dtype, channels_last):
    """(fastinpaint's module, torch's parametrized module) with the same parameters and vectors."""
    torch.manual_seed(0)
    ours = SpectralNormConv2d(case.cin, case.cout, case.k, case.stride, case.k // 2)
    theirs = nn.utils.parametrizations.spectral_norm(nn.Conv2d(case.cin, case.cout, case.k, case.stride, case.k // 2))
    theirs.load_state_dict(ours.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return tuple(m.to(device=device, dtype=dtype, memory_format=fmt).train() for m in (ours, theirs))


def _input(case: Case, batch, device, dtype, channels_last, grad):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, case.cin, case.size, case.size, generator=g).to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(grad)


def _on_backend(module, backend: str):
    def fn(x):
        with _backend.use_backend(backend):
            return module(x)
    return fn


def implementations(case: Case, device: str, dtype=torch.float32, channels_last: bool = False,
                    compile_baseline: bool = True) -> tuple[dict, list]:
    """(``{label: fn(x)}``, every parameter they train): eager (torch's module), fastinpaint[<backend>]
    (SpectralNormConv2d on it) and, unless ``compile_baseline`` is False, torch.compile of each;
    each implementation has its own copy of the parameters and vectors (the power iteration
    updates them)."""
    ours, theirs = _modules(case, device, dtype, channels_last)
    impls, modules = {"eager": theirs}, [theirs]
    if compile_baseline:
        modules.append(copy.deepcopy(theirs))
        impls["compile(eager)"] = torch.compile(modules[-1], dynamic=False)
    for backend in ("cpu", "cuda"):
        if _backend.unavailable_reason(backend, device) is None:
            modules.append(copy.deepcopy(ours))
            impls[f"fastinpaint[{backend}]"] = _on_backend(modules[-1], backend)
            if compile_baseline:
                modules.append(copy.deepcopy(ours))
                impls[f"compile(fastinpaint[{backend}])"] = torch.compile(_on_backend(modules[-1], backend),
                                                                          dynamic=False)
    return impls, [p for m in modules for p in m.parameters()]


def run(cases=CASES, device="cpu", dtype=torch.float32, batch=2, channels_last=False, modes=("fwd+bwd", "fwd"),
        min_time_s=0.5, progress=None, compile_baseline: bool = True) -> list[dict]:
    rows = []
    for case in cases:
        with B.fresh_compile():   # each case compiles afresh; a fallback to eager is an error
            impls, params = implementations(case, device, dtype, channels_last, compile_baseline)
            for mode in modes:
                grad = mode == "fwd+bwd"
                x = _input(case, batch, device, dtype, channels_last, grad)
                runs, saved = {}, {}
                for name, fn in impls.items():
                    if grad:
                        def step(fn=fn):
                            x.grad = None
                            for p in params:
                                p.grad = None
                            fn(x).sum().backward()
                        if not name.startswith("compile("):
                            saved[name] = B.saved_bytes(lambda fn=fn: fn(x), exclude=(x, *params)) / 2**20
                    else:
                        def step(fn=fn):
                            with torch.no_grad():
                                fn(x)
                    runs[name] = step
                results = {}
                for name, timing in B.time_interleaved(runs, device, min_time_s).items():
                    row = {"case": case.name, "mode": mode, "impl": name, "dtype": B.dtype_name(dtype),
                           "batch": batch, **timing}
                    if name in saved:
                        row["saved_MB"] = saved[name]
                    results[name] = row
                    rows.append(row)
                B.add_ratios(results)
                if progress:
                    progress(rows)
    return rows


COLUMNS = B.LAYER_COLUMNS


def markdown(rows, env, ceilings=None) -> str:
    return B.markdown_table(rows, COLUMNS, env, ceilings)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of this script and of ``fastinpaint bench spectral_norm_conv``."""
    return B.add_layer_args(p, batch_help="images (default 2: the real and the fake of one training image)")


def run_args(a: argparse.Namespace) -> int:
    """Run the cases ``a`` (from :func:`add_arguments`) select; print and write the table."""
    return B.run_layer_args(a, CASES, run, markdown, "spectral-normalised convolution", 2)


def main(argv=None) -> int:
    return run_args(add_arguments(argparse.ArgumentParser(description="spectral-normalised convolution benchmarks"))
                    .parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(B.script_main(main, "python -m fastinpaint.models.spectral_norm_conv_bench"))
