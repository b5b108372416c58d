"""The gradient of a convolution's input on the CPU, where the input has few channels: torch's
(oneDNN's ``convolution_backward``, the input's gradient alone) against fastinpaint's kernel
(``fastinpaint::conv2d_input_grad``, csrc/cpu/conv_input_grad.cpp), timed in one process with
interleaved calls, both on a channels-last output gradient (the layout the layers hand them).

The default layers are the first ones of the networks that use it: DeepFill v2's gated input
layer (5->48 filters, 5x5), SN-PatchGAN's (4->64, 5x5, stride 2, batch 2 for real and fake) and
the PConv U-Net's (3->64, 7x7, stride 2); then 8 and 16 input channels, on either side of the
limit the layers use the kernel below (``fastinpaint.ops._cpu_conv.MAX_CHANNELS``).

    python benchmarks/conv_input_grad.py --json out.json --markdown out.md
    python benchmarks/conv_input_grad.py --cases 4:64:5:2:256:2 --rounds 20
"""

import argparse

import torch

import fastinpaint  # noqa: F401  (defines the op and loads the extension)
from fastinpaint import _extension
from fastinpaint import benchmark as B
from fastinpaint.ops import _cpu_conv

#: CIN:COUT:KERNEL:STRIDE:SIZE:BATCH
CASES = {"DeepFill v2 gated conv1": "5:48:5:1:256:1", "SN-PatchGAN conv1": "4:64:5:2:256:2",
         "PConv U-Net conv1": "3:64:7:2:256:1", "8 channels": "8:64:3:1:128:1", "16 channels": "16:48:5:1:128:1"}
IMPLS = ("torch (oneDNN)", "fastinpaint")
COLUMNS = [("case", "case", None), ("impl", "impl", None), ("ms", "ms", ".2f"),
           ("x vs torch", "x_vs_torch", ".2f")]
CL = torch.channels_last


def _calls(cin, cout, k, stride, size, batch):
    x = torch.randn(batch, cin, size, size).contiguous(memory_format=CL)
    w = (torch.randn(cout, cin, k, k) / (cin * k * k) ** 0.5).contiguous(memory_format=CL)
    pad = k // 2
    ho = (size + 2 * pad - k) // stride + 1
    gy = torch.randn(batch, cout, ho, ho).contiguous(memory_format=CL)
    geometry = ([stride, stride], [pad, pad], [1, 1])

    def torch_grad():
        torch.ops.aten.convolution_backward(gy, x, w, None, *geometry, False, [0, 0], 1, [True, False, False])

    def kernel_grad():
        _cpu_conv.INPUT_GRAD("cpu", gy, w, list(x.shape), *geometry, True)
    return dict(zip(IMPLS, (torch_grad, kernel_grad)))


def run(cases: dict, rounds: int) -> list[dict]:
    rows = []
    for name, spec in cases.items():
        cin, cout, k, stride, size, batch = (int(v) for v in spec.split(":"))
        with torch.no_grad():
            timed = B.time_interleaved(_calls(cin, cout, k, stride, size, batch), "cpu", min_time_s=float("inf"),
                                       max_rounds=rounds, warmup=3)
        base = timed[IMPLS[0]].get("ms")
        for impl in IMPLS:
            row = {"case": f"{name} {cin}->{cout} {k}x{k} s{stride} @{size} batch {batch}", "impl": impl,
                   **timed[impl]}
            if base and "ms" in row:   # an implementation that failed is reported with its error, no ratio
                row["x_vs_torch"] = base / row["ms"]
            rows.append(row)
    return rows


def _refuse_without_kernel(p: argparse.ArgumentParser) -> None:
    _extension.library()   # build it now if needed (not inside the timing)
    if not _cpu_conv.INPUT_GRAD.built_for("cpu"):
        p.error("the loaded fastinpaint extension has no conv2d_input_grad kernel (rebuild it)")


def main(argv=None) -> int:
    return B.layer_script_main(__doc__.split("\n")[0], CASES, run, COLUMNS, argv, _refuse_without_kernel)


if __name__ == "__main__":
    raise SystemExit(main())
