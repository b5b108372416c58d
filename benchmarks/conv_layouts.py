"""What a convolution's layout costs on the CPU: torch's convolution (oneDNN), forward and
backward, on an NCHW input in three ways, timed in one process with interleaved calls:

  NCHW                  as given;
  channels_last, back   input and weight turned channels_last, the output turned back to NCHW
                        (what a layer that takes and returns NCHW can do inside);
  channels_last         input, weight, output and its gradient channels_last throughout (what a
                        network that runs channels_last inside gets);

and, forward only, what fastinpaint's cpu backend does inside an NCHW layer (ops/_cpu_conv.py):

  fastinpaint copies               input, weight and output moved by fastinpaint's layout copy;
  fastinpaint copies, NCHW weight  the same with the weight left NCHW (for oneDNN to reorder).

The default layers are the ones of the README's per-layer misses: SN-PatchGAN's first layer
(4->64, 5x5, stride 2, batch 2 for real and fake) and DeepFill v2's gated input layer (5->48,
5x5) and first stride-2 layer (24->96, 3x3), the gated ones with 2*Cout filters.

    python benchmarks/conv_layouts.py --json out.json --markdown out.md
    python benchmarks/conv_layouts.py --cases 4:64:5:2:256:2 --rounds 20
    python benchmarks/conv_layouts.py --cases 256:256:5:2:32:2 256:256:5:2:16:2   # SN-PatchGAN conv4, conv5
"""


import torch
import torch.nn.functional as F

from fastinpaint import benchmark as B
from fastinpaint.ops import _cpu_conv

#: CIN:COUT:KERNEL:STRIDE:SIZE:BATCH
CASES = {"SN-PatchGAN conv1": "4:64:5:2:256:2", "gated conv1 (2x24 filters)": "5:48:5:1:256:1",
         "gated down (2x48 filters)": "24:96:3:2:256:1"}
LAYOUTS = ("NCHW", "channels_last, back", "channels_last")
#: forward only (the layout copy records no gradient)
COPY_LAYOUTS = ("fastinpaint copies", "fastinpaint copies, NCHW weight")
COLUMNS = [("case", "case", None), ("mode", "mode", None), ("layout", "layout", None), ("ms", "ms", ".2f"),
           ("x vs NCHW", "x_vs_NCHW", ".2f")]
CL = torch.channels_last


def _step(layout: str, x, w, b, stride: int, gy, grad: bool):
    """One forward (and backward where ``grad``) of ``conv2d(x, w, b)`` in ``layout``: the
    gradients returned, not accumulated (no ``.grad`` pass shared between layouts), the output's
    gradient made in the layout's own format beforehand (a network running channels_last hands
    it so)."""
    pad = w.shape[-1] // 2
    gy = gy.contiguous(memory_format=CL) if layout == "channels_last" else gy

    def call():
        with torch.set_grad_enabled(grad):
            if layout == "fastinpaint copies":   # the library's own channels-last-inside convolution
                _cpu_conv.conv_channels_last(x, w, b, (stride, stride), (pad, pad), (1, 1))
                return
            if layout == "fastinpaint copies, NCHW weight":   # oneDNN reorders the weight itself
                to_cl = _cpu_conv.to_layout
                to_cl(F.conv2d(to_cl(x, True), w, b, stride, pad), False)
                return
            if layout == "NCHW":
                xi, wi = x, w
            else:
                xi, wi = x.contiguous(memory_format=CL), w.contiguous(memory_format=CL)
            y = F.conv2d(xi, wi, b, stride, pad)
            if layout == "channels_last, back":
                y = y.contiguous()
            if grad:
                torch.autograd.grad(y, (x, w, b), gy)
    return call


def run(cases: dict, rounds: int) -> list[dict]:
    rows = []
    for name, spec in cases.items():
        cin, cout, k, stride, size, batch = (int(v) for v in spec.split(":"))
        x = torch.randn(batch, cin, size, size).requires_grad_()
        w = (torch.randn(cout, cin, k, k) / (cin * k * k) ** 0.5).requires_grad_()
        b = torch.zeros(cout, requires_grad=True)
        ho = (size + 2 * (k // 2) - k) // stride + 1
        gy = torch.randn(batch, cout, ho, ho)
        for mode, grad in (("fwd+bwd", True), ("fwd", False)):
            runs = {layout: _step(layout, x, w, b, stride, gy, grad)
                    for layout in LAYOUTS + (() if grad else COPY_LAYOUTS)}
            timed = B.time_interleaved(runs, "cpu", min_time_s=float("inf"), max_rounds=rounds, warmup=3)
            rows += B.ratio_rows(timed, "NCHW", "layout", "x_vs_NCHW",
                                 case=f"{name} {cin}->{cout} {k}x{k} s{stride} @{size} batch {batch}", mode=mode)
    return rows


def main(argv=None) -> int:
    return B.layer_script_main(__doc__.split("\n")[0], CASES, run, COLUMNS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
