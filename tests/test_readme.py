"""The README's quick start: exactly two commands, .ci/run runs the second verbatim, and the
first one's main job (``fastinpaint train`` on the demo data) runs and reports its files; and
every Python block of the README runs as written, each one alone."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_blocks():
    text = open(os.path.join(ROOT, "README.md")).read()
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


PYTHON_BLOCKS = _python_blocks()


def test_readme_has_its_python_blocks():
    assert len(PYTHON_BLOCKS) >= 5, PYTHON_BLOCKS


@pytest.mark.parametrize("block", PYTHON_BLOCKS,
                         ids=[next(line.split("=")[0].strip() for line in b.splitlines()
                                   if line.strip() and not line.startswith(("import", "from", "#")))
                              for b in PYTHON_BLOCKS])
def test_readme_python_block_runs_as_written(block, tmp_path):
    """The block alone, in a fresh interpreter, in an empty folder: it brings its own imports
    and data."""
    env = {**os.environ, "OMP_NUM_THREADS": "2",
           "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{block}\n{proc.stderr[-3000:]}"


def _quick_start_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in re.findall(r"```(?:bash|sh)?\n(.*?)```", section, re.S)
            for line in line.strip().splitlines() if line.strip() and not line.startswith("#")]


def test_quick_start_has_exactly_two_commands():
    commands = _quick_start_commands()
    assert len(commands) == 2, commands
    assert commands[0].split("&&")[-1].split()[0].endswith("fastinpaint"), commands[0]
    assert ".[train]" in commands[0]   # the main job's dependencies
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert _quick_start_commands()[1] in ci.splitlines()


def test_main_job_runs_with_a_tiny_step_count(tmp_path):
    """The README's main-job command itself, run with this interpreter and a few steps."""
    main_job = shlex.split(_quick_start_commands()[0].split("&&")[-1])
    assert Path(main_job[0]).name == "fastinpaint" and main_job[1] == "train", main_job
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastinpaint.cli", *main_job[1:], "--steps", "3", "--out", str(out),
           "--set", "size=32", "--set", "val_batches=1"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    for label, name in (("checkpoint", "checkpoints/ckpt_000000003.pt"), ("samples", "samples.png"),
                        ("metrics", "metrics.json"), ("weights", "weights.safetensors")):
        line = next((x for x in text.splitlines() if x.startswith(f"{label}:")), None)
        assert line is not None, f"the main job did not print where its {label} is:\n{text}"
        path = Path(line.split(":", 1)[1].strip())
        assert path == out / name and path.is_file() and path.stat().st_size > 0, line
    assert re.search(r"PSNR \(dB\)\s+[\d.]+\s+[\d.]+\s+[\d.]+", text), text   # start, trained, mean fill


def test_backends_table_matches_the_ops_declarations():
    """The README's Backends table says, per op, what each backend runs: the same sentences as
    the ops' declarations (``fastinpaint backends``), and nothing else."""
    from fastinpaint.ops import _registry

    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Backends", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z_0-9]+)` \| `([a-z]+)` \| (.*) \|$", section, re.M)
    declared = [(name, b, op.backends[b]) for name, op in _registry.OPS.items() for b in op.implemented]
    assert sorted(rows) == sorted(declared)
