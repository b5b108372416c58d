"""The gradients of a convolution on the CPU: torch's (oneDNN's ``convolution_backward``, one
gradient at a time) against fastinpaint's kernels, the input's (``fastinpaint::conv2d_input_grad``,
csrc/cpu/conv_input_grad.cpp) and the weight's (``fastinpaint::conv2d_weight_grad``,
csrc/cpu/conv_weight_grad.cpp), timed in one process with interleaved calls, all on a
channels-last output gradient and input (the layouts the layers hand them).

The default layers: the first ones of the networks whose input gradient fastinpaint computes
(DeepFill v2's gated input layer, 5->48 filters, 5x5; SN-PatchGAN's, 4->64, 5x5, stride 2, batch 2
for real and fake; the PConv U-Net's, 3->64, 7x7, stride 2), 8 and 16 input channels on either
side of the limit below which the layers use that kernel (``fastinpaint.ops._cpu_conv.MAX_CHANNELS``);
then the strided layers whose weight gradient it computes (DeepFill v2's gated downsampling
layers, SN-PatchGAN's conv2 to conv6) and a stride-1 layer, which the layers leave to oneDNN
(``fastinpaint.ops._cpu_conv.weight_grad_applies``). Both gradients are timed at every layer.

    python benchmarks/conv_grads.py --json out.json --markdown out.md
    python benchmarks/conv_grads.py --cases 24:96:3:2:256:1 --rounds 20
"""

import torch

import fastinpaint  # noqa: F401  (defines the ops and loads the extension)
from fastinpaint import _extension
from fastinpaint import benchmark as B
from fastinpaint.ops import _cpu_conv

#: CIN:COUT:KERNEL:STRIDE:SIZE:BATCH
CASES = {"DeepFill v2 gated conv1": "5:48:5:1:256:1", "SN-PatchGAN conv1": "4:64:5:2:256:2",
         "PConv U-Net conv1": "3:64:7:2:256:1", "8 channels": "8:64:3:1:128:1", "16 channels": "16:48:5:1:128:1",
         "DeepFill v2 gated down1": "24:96:3:2:256:1", "DeepFill v2 gated down2": "48:192:3:2:128:1",
         "SN-PatchGAN conv2": "64:128:5:2:128:2", "SN-PatchGAN conv3": "128:256:5:2:64:2",
         "SN-PatchGAN conv4": "256:256:5:2:32:2", "stride 1": "96:192:3:1:64:1"}
GRADS = ("input", "weight")
IMPLS = ("torch (oneDNN)", "fastinpaint")
COLUMNS = [("case", "case", None), ("gradient", "grad", None), ("impl", "impl", None), ("ms", "ms", ".2f"),
           ("x vs torch", "x_vs_torch", ".2f")]
CL = torch.channels_last


def _calls(cin, cout, k, stride, size, batch):
    """{gradient: {impl: call}}."""
    x = torch.randn(batch, cin, size, size).contiguous(memory_format=CL)
    w = (torch.randn(cout, cin, k, k) / (cin * k * k) ** 0.5).contiguous(memory_format=CL)
    pad = k // 2
    ho = (size + 2 * pad - k) // stride + 1
    gy = torch.randn(batch, cout, ho, ho).contiguous(memory_format=CL)
    geometry = ([stride, stride], [pad, pad], [1, 1])

    def torch_grad(mask):
        return lambda: torch.ops.aten.convolution_backward(gy, x, w, None, *geometry, False, [0, 0], 1, mask)

    kernels = {"input": lambda: _cpu_conv.INPUT_GRAD("cpu", gy, w, list(x.shape), *geometry, True),
               "weight": lambda: _cpu_conv.WEIGHT_GRAD("cpu", gy, x, list(w.shape), *geometry, True)}
    return {"input": dict(zip(IMPLS, (torch_grad([True, False, False]), kernels["input"]))),
            "weight": dict(zip(IMPLS, (torch_grad([False, True, False]), kernels["weight"])))}


def run(cases: dict, rounds: int) -> list[dict]:
    rows = []
    for name, spec in cases.items():
        cin, cout, k, stride, size, batch = (int(v) for v in spec.split(":"))
        calls = _calls(cin, cout, k, stride, size, batch)
        for grad in GRADS:
            with torch.no_grad():
                timed = B.time_interleaved(calls[grad], "cpu", min_time_s=float("inf"), max_rounds=rounds, warmup=3)
            rows += B.ratio_rows(timed, IMPLS[0], "impl", "x_vs_torch",
                                 case=f"{name} {cin}->{cout} {k}x{k} s{stride} @{size} batch {batch}", grad=grad)
    return rows


def _refuse_without_kernels(p) -> None:
    _extension.library()   # build it now if needed (not inside the timing)
    if not (_cpu_conv.INPUT_GRAD.built_for("cpu") and _cpu_conv.WEIGHT_GRAD.built_for("cpu")):
        p.error("the loaded fastinpaint extension lacks the conv2d_input_grad or conv2d_weight_grad kernel "
                "(rebuild it)")


def main(argv=None) -> int:
    return B.layer_script_main(__doc__.split("\n")[0], CASES, run, COLUMNS, argv, _refuse_without_kernels)


if __name__ == "__main__":
    raise SystemExit(main())
