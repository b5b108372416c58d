"""The channel-wise FC's batched GEMMs on the CPU in their two orientations: at::bmm alone, on the
strided views the cpu backend hands it (csrc/channel_fc.h), timed in one process with
interleaved calls:

  forward  weight-major  W_c @ X_c^T (N = B: the batch is the narrow dimension; the reference's form)
           batch-major   X_c @ W_c^T
  dx       weight-major  W_c^T @ D_c^T
           batch-major   D_c @ W_c

``CpuKernels::weight_major`` (csrc/cpu/channel_fc.cpp) picks between them from these timings.

    python benchmarks/channel_fc_gemm_orientation.py --json out.json --markdown out.md
    python benchmarks/channel_fc_gemm_orientation.py --cases 1:64:1024 16:64:1024 --rounds 10
"""

import argparse

import torch

from fastinpaint import benchmark as B

#: BATCH:CHANNELS:POSITIONS
CASES = ("1:64:256", "8:64:256", "32:64:256", "1:64:1024", "4:64:1024", "8:64:1024", "16:64:1024",
         "1:256:64", "16:256:64", "64:256:64", "128:256:64", "24:128:36", "64:128:36", "64:64:100", "128:64:100",
         "16:128:144")
ORIENTATIONS = ("weight-major", "batch-major")
COLUMNS = [("B:C:P", "case", None), ("GEMM", "mode", None), ("orientation", "orientation", None),
           ("ms", "ms", ".3f"), ("x vs weight-major", "x_vs_weight-major", ".2f")]


def _runs(B_: int, C: int, P: int, mode: str) -> dict:
    """The two orientations of one GEMM on the (C, B, P) view of a (B, C, P) tensor, as the
    backend's host code calls at::bmm (no copies of the operands)."""
    act = torch.randn(B_, C, P).transpose(0, 1)   # x (forward) or d (dx), (C, B, P)
    w = torch.randn(C, P, P)
    if mode == "forward":
        return {"weight-major": lambda: torch.bmm(w, act.transpose(1, 2)),
                "batch-major": lambda: torch.bmm(act, w.transpose(1, 2))}
    return {"weight-major": lambda: torch.bmm(w.transpose(1, 2), act.transpose(1, 2)),
            "batch-major": lambda: torch.bmm(act, w)}


def run(cases, rounds: int) -> list[dict]:
    rows = []
    for spec in cases:
        B_, C, P = (int(v) for v in spec.split(":"))
        for mode in ("forward", "dx"):
            timed = B.time_interleaved(_runs(B_, C, P, mode), "cpu", min_time_s=float("inf"), max_rounds=rounds,
                                       warmup=2)
            rows += B.ratio_rows(timed, "weight-major", "orientation", "x_vs_weight-major", case=spec, mode=mode)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), metavar="BATCH:CHANNELS:POSITIONS")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--json")
    p.add_argument("--markdown")
    a = p.parse_args(argv)
    if a.rounds < 1:
        p.error(f"--rounds must be >= 1, got {a.rounds}")
    for text in a.cases:
        parts = text.split(":")
        if len(parts) != 3 or not all(v.isdigit() and int(v) > 0 for v in parts):
            p.error(f"--cases takes BATCH:CHANNELS:POSITIONS (positive integers), got {text!r}")
    rows = run(a.cases, a.rounds)
    env = B.environment("cpu")
    table = B.markdown_table(rows, COLUMNS, env, notes=("", "at::bmm alone; interleaved calls, median of the "
                                                        "rounds; threads: torch's default."))
    print(table)
    B.write_results(a.json, a.markdown, rows, env, {}, lambda *_: table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
