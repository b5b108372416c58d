"""The fastinpaint command's bench and backends subcommands (the main job, train, is tested in
test_readme.py and test_trainer.py)."""

import json

import pytest

from fastinpaint import cli
from fastinpaint._backend import unavailable_reason


def test_bench_quick_writes_results(tmp_path, capsys):
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    code = cli.main(["bench", "--device", "cpu", "--quick", "--cases", "conv1", "deconv 96", "--no-compile",
                     "--min-time", "0.01", "--json", str(out_json), "--markdown", str(out_md)])
    assert code == 0
    data = json.loads(out_json.read_text())
    assert data["environment"]["torch"]
    rows = data["results"]
    impls = {r["impl"] for r in rows}
    assert "eager" in impls
    if unavailable_reason("cpu", "cpu") is None:
        assert "fastinpaint[cpu]" in impls
    assert {r["case"] for r in rows} == {"conv1 5->24 5x5 @256", "deconv 96->48 @64->128"}
    assert {r["mode"] for r in rows} == {"fwd+bwd", "fwd"}
    for r in rows:
        assert r["ms"] > 0 and r["x_vs_eager"] > 0, r
        if r["mode"] == "fwd+bwd":
            assert r["saved_MB"] > 0 and r["saved_vs_eager"] > 0
    eager_rows = [r for r in rows if r["impl"] == "eager"]
    assert all(abs(r["x_vs_eager"] - 1) < 1e-9 for r in eager_rows)
    table = out_md.read_text()
    assert "| case | mode | impl |" in table and "conv1 5->24" in table
    assert "x vs eager" in capsys.readouterr().out


def test_bench_rejects_bad_arguments(capsys):
    assert cli.main(["bench", "--cases", "no-such-layer"]) == 2
    assert cli.main(["bench", "--batch", "0"]) == 2
    with pytest.raises(SystemExit):
        cli.main(["bench", "--dtype", "int8"])


def test_backends_command(capsys):
    assert cli.main(["backends"]) == 0
    out = capsys.readouterr().out
    for name in ("reference", "triton", "cuda", "cpu"):
        assert name in out


def test_backends_command_describes_every_op(capsys):
    from fastinpaint.ops import _registry

    assert cli.main(["backends", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["ops"]) == set(_registry.OPS) >= {"gated_conv2d", "channel_fc", "partial_conv2d",
                                                        "pixel_attention", "self_similarity"}
    for op, per_backend in report["ops"].items():
        assert list(per_backend) == list(_registry.OPS[op].implemented) or \
            set(per_backend) == set(_registry.OPS[op].implemented)
        for entry in per_backend.values():
            assert entry["runs"] and entry["cpu"] and entry["cuda"]
        assert per_backend["reference"]["cpu"] == "ok"
    # what "cuda" means differs per op, and the report says so
    assert "scaled_dot_product_attention" in report["ops"]["pixel_attention"]["cuda"]["runs"]
    assert "csrc/cuda/gated_conv.cu" in report["ops"]["gated_conv2d"]["cuda"]["runs"]
    assert "cuda" not in report["ops"]["attention_transfer_loss"]
