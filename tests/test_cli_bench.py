"""``fastinpaint bench OP``: the dispatch to every op's and model's benchmark, with that
benchmark's own options; ``fastinpaint bench all``; the errors; and the commands the README
and the GPU suite give. The per-op scripts' figures are tested in test_benchmarks.py."""

import argparse
import json
import os
import re
import shlex

import pytest
import torch

from conftest import skip_unless_available
from fastinpaint import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = list(cli.BENCHMARKS)


def _own_parser(name):
    """The benchmark module's own parser (what ``python -m <module>`` parses)."""
    return cli._bench_module(name).add_arguments(argparse.ArgumentParser())


def _options(parser):
    return {s for s in parser._option_string_actions if s.startswith("--") and s != "--help"}


def _recorders(monkeypatch, result=0):
    """Replace every benchmark's run_args by one that records (name, args)."""
    calls = []
    for name in OPS:
        def record(args, name=name):
            calls.append((name, args))
            return result(name) if callable(result) else result

        monkeypatch.setattr(cli._bench_module(name), "run_args", record)
    return calls


def test_every_benchmark_module_is_listed_and_runnable_as_a_script():
    assert OPS == ["gated_conv", "channel_fc", "self_similarity", "pixel_attention", "partial_conv",
                   "spectral_norm_conv", "deepfill_v2"]
    for name in OPS:
        module = cli._bench_module(name)
        assert callable(module.main) and callable(module.run_args) and callable(module.add_arguments)
        assert "--json" in _options(_own_parser(name)), name


# ----------------------------------------------------------------------------- dispatch, with each op's options

# per benchmark: options of its own (beside the shared --device and --min-time)
OWN_OPTIONS = {
    "gated_conv": ["--quick", "--cases", "conv1", "--layout", "contiguous", "--batch", "3"],
    "channel_fc": ["--channels-last", "--modes", "fwd", "--dtype", "bfloat16"],
    "self_similarity": ["--no-peak", "--cases", "K7", "--no-compile"],
    "pixel_attention": ["--sizes", "16", "32", "--kinds", "loss", "--no-peak", "--batch", "2"],
    "partial_conv": ["--batch", "2", "--no-compile", "--cases", "dec", "single"],
    "spectral_norm_conv": ["--batch", "3", "--no-compile", "--cases", "conv5", "--modes", "fwd"],
    "deepfill_v2": ["--cnum", "4", "--impls", "eager", "--infer-size", "40", "--cases", "G inference"],
}


@pytest.mark.parametrize("name", OPS)
def test_bench_op_reaches_that_benchmark_with_its_options(name, monkeypatch):
    calls = _recorders(monkeypatch, result=lambda n: 3 if n == name else 0)
    argv = ["--device", "cpu", "--min-time", "0.25", *OWN_OPTIONS[name]]
    assert cli.main(["bench", name, *argv]) == 3   # its exit status is the command's
    assert [n for n, _ in calls] == [name]
    got = vars(calls[0][1])
    expected = vars(_own_parser(name).parse_args(argv))   # what `python -m <module> ...` parses
    assert {k: got[k] for k in expected} == expected
    assert got["device"] == "cpu" and got["min_time"] == 0.25


def test_bench_without_an_op_name_runs_the_gated_conv_benchmark(monkeypatch):
    calls = _recorders(monkeypatch)
    assert cli.main(["bench", "--device", "cpu", "--quick", "--cases", "conv1"]) == 0
    assert cli.main(["bench"]) == 0
    assert cli.main(["bench", "--debug", "--quick"]) == 0
    assert [n for n, _ in calls] == ["gated_conv"] * 3
    first, bare, debug = (vars(a) for _, a in calls)
    assert first["quick"] and first["cases"] == ["conv1"] and first["device"] == "cpu"
    defaults = vars(_own_parser("gated_conv").parse_args([]))
    assert {k: bare[k] for k in defaults} == defaults
    assert debug["quick"] and debug["debug"]


def test_bench_unknown_op_is_one_line_listing_the_choices(monkeypatch, capsys):
    calls = _recorders(monkeypatch)
    for argv in (["bench", "gated-conv"], ["bench", "cpu", "--quick"]):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("fastinpaint bench: ") and err.count("\n") == 1, err
        assert repr(argv[1]) in err
        for name in [*OPS, "all"]:
            assert name in err, (name, err)
    assert calls == []


@pytest.mark.parametrize("name", OPS)
def test_bench_op_help_shows_that_ops_options(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", name, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: fastinpaint bench {name} "), out[:200]
    own = _options(_own_parser(name))
    others = set().union(*(_options(_own_parser(n)) for n in OPS)) - own
    for option in own:
        assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", out), (option, out)
    for option in others:   # another benchmark's option is not offered here
        assert not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", out), (option, out)


def test_bench_help_lists_every_benchmark(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name, (_, what) in cli.BENCHMARKS.items():
        assert re.search(rf"^\s+{name}\s", out, re.M), (name, out)
    assert re.search(r"^\s+all\s", out, re.M) and "--help" in out


# ----------------------------------------------------------------------------- a real tiny run per benchmark

TINY = {
    "gated_conv": (["--quick", "--cases", "down 24", "--modes", "fwd", "--no-compile"], "down 24->48"),
    "channel_fc": (["--cases", "B64 C512", "--modes", "fwd", "--no-compile"], "B64 C512 4x4"),
    "self_similarity": (["--cases", "K7", "--no-compile", "--no-peak"], "dense B2 C64 64x64 K7"),
    "pixel_attention": (["--sizes", "16", "--batch", "1", "--kinds", "attention", "--modes", "fwd", "--no-compile",
                         "--no-peak"], "attention N=16 B=1"),
    "partial_conv": (["--cases", "single-mask", "--modes", "fwd", "--no-compile"], "single-mask 64->64"),
    "spectral_norm_conv": (["--cases", "conv6", "--batch", "1", "--no-compile"], "conv6 256->256"),
    "deepfill_v2": (["--cases", "G inference", "--infer-size", "32", "--cnum", "4", "--impls", "eager", "fastinpaint"],
                    "G inference"),
}


@pytest.mark.parametrize("name", OPS)
def test_bench_op_runs_a_tiny_case_through_the_command(name, tmp_path, capsys):
    skip_unless_available("cpu", "cpu")
    options, case = TINY[name]
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    code = cli.main(["bench", name, "--device", "cpu", "--dtype", "float32", "--min-time", "0.01", *options,
                     "--json", str(out_json), "--markdown", str(out_md)])
    assert code == 0, capsys.readouterr().err
    data = json.loads(out_json.read_text())
    rows = data["results"]
    assert rows and data["environment"]["torch"] == torch.__version__
    assert all(r["case"].startswith(case) for r in rows), {r["case"] for r in rows}   # only the case asked for
    impls = {r["impl"] for r in rows}
    assert not any(i.startswith("compile(") for i in impls), impls   # --no-compile / --impls reached it
    assert any(i.startswith("fastinpaint") for i in impls), impls
    for r in rows:
        if r["impl"].startswith("sdpa["):   # an SDPA backend may refuse these shapes on the CPU: a row of its own
            continue
        assert "error" not in r and r["ms"] > 0, r
    assert "| case |" in out_md.read_text()


# ----------------------------------------------------------------------------- all

def test_bench_all_runs_each_benchmark_with_the_shared_options_and_its_own_files(monkeypatch, tmp_path, capsys):
    threads = 1 if torch.get_num_threads() != 1 else 2
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))   # restored afterwards
    saved_threads = torch.get_num_threads()
    seen_threads = {}

    def result(name):
        seen_threads[name] = torch.get_num_threads()
        if name == "partial_conv":
            raise RuntimeError("boom\nsecond line")
        return 0

    calls = _recorders(monkeypatch, result)
    try:
        code = cli.main(["bench", "all", "--device", "cpu", "--min-time", "0.01", "--threads", str(threads),
                         "--json", str(tmp_path / "out"), "--markdown", str(tmp_path / "md" / "cpu_{op}.md")])
    finally:
        torch.set_num_threads(saved_threads)
    assert code == 1   # one failed; the others still ran
    assert [n for n, _ in calls] == OPS
    for name, args in calls:
        got = vars(args)
        assert got["json"] == str(tmp_path / "out" / f"{name}.json")
        assert got["markdown"] == str(tmp_path / "md" / f"cpu_{name}.md")
        assert got["plot"] is None
        # everything else at the benchmark's own default
        expected = vars(_own_parser(name).parse_args(["--device", "cpu", "--min-time", "0.01",
                                                      "--json", got["json"], "--markdown", got["markdown"]]))
        assert {k: got[k] for k in expected} == expected, name
        assert seen_threads[name] == threads, name   # self_similarity has no --threads of its own
    assert (tmp_path / "out").is_dir() and (tmp_path / "md").is_dir()
    captured = capsys.readouterr()
    assert captured.err == "fastinpaint bench all: partial_conv: RuntimeError: boom second line\n"
    for name in OPS:
        assert f"== fastinpaint bench {name} --device cpu --min-time 0.01 --json" in captured.out
    assert "partial_conv failed (status 1)" in captured.out and "deepfill_v2 ok" in captured.out


def test_bench_all_refuses_one_file_for_every_benchmark(monkeypatch, tmp_path, capsys):
    calls = _recorders(monkeypatch)
    existing = tmp_path / "results"
    existing.write_text("")
    for flag, path in (("--json", tmp_path / "r.json"), ("--markdown", tmp_path / "table.MD"),
                       ("--plot", tmp_path / "chart.png"), ("--json", existing)):
        capsys.readouterr()
        assert cli.main(["bench", "all", "--device", "cpu", flag, str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"fastinpaint bench: {flag}: ") and err.count("\n") == 1, err
        assert "{op}" in err and "Traceback" not in err
    assert calls == [] and not (tmp_path / "r.json").exists()


def test_bench_all_refuses_a_missing_cuda_device(monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    calls = _recorders(monkeypatch)
    capsys.readouterr()
    assert cli.main(["bench", "all", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastinpaint bench: --device: ") and err.count("\n") == 1, err
    assert calls == []


# ----------------------------------------------------------------------------- the commands the project gives

def _parses(argv, where):
    """The namespace of ``fastinpaint <argv>``; None for a --help that printed (exit status 0)."""
    try:
        return cli.build_parser().parse_args(argv)
    except SystemExit as exc:
        if exc.code == 0 and "--help" in argv:
            return None
        raise AssertionError(f"{where}: `fastinpaint {shlex.join(argv)}` does not parse") from exc


def test_readme_bench_commands_parse(capsys):
    text = open(os.path.join(ROOT, "README.md")).read()
    text = text.split("\n## Benchmarks\n", 1)[1].split("\n## Tests\n", 1)[0]   # with Performance
    commands = re.findall(r"`(fastinpaint bench[^`]*)`", text)
    assert len(commands) >= 4, commands
    seen = set()
    for command in commands:
        for name in (OPS if "<op>" in command else [None]):   # <op>: each benchmark
            args = _parses(shlex.split(command.replace("<op>", name or ""))[1:], "README.md")
            seen.add(name if args is None else args.op)
    assert seen == {*OPS, "all"}, seen


def test_gpu_suite_runs_every_benchmark_through_the_command():
    text = open(os.path.join(ROOT, "benchmarks", "gpu_suite.sh")).read().replace("\\\n", " ")
    ops = []
    for line in text.splitlines():
        if "fastinpaint.cli bench" in line:
            words = shlex.split(line.split("fastinpaint.cli", 1)[1].split("||")[0])
            args = _parses(words, "benchmarks/gpu_suite.sh")
            assert args.device == "cuda" and args.json and args.markdown, line
            ops.append(args.op)
    assert set(ops) == set(OPS), ops


@pytest.mark.parametrize("name", ["gated_conv", "channel_fc", "partial_conv", "self_similarity", "spectral_norm_conv"])
def test_bench_cases_that_select_nothing_are_an_error(name, capsys):
    """--cases that match no case: one line naming --cases and listing the cases (was an empty
    table and exit 0 for some benchmarks)."""
    capsys.readouterr()
    assert cli.main(["bench", name, "--device", "cpu", "--cases", "no-such-case"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastinpaint bench: --cases: ") and "'no-such-case'" in err, err


@pytest.mark.parametrize("name", ["gated_conv", "channel_fc", "partial_conv", "pixel_attention", "spectral_norm_conv"])
def test_bench_modes_are_checked(name):
    """A misspelt mode is refused (it was timed as the forward, labelled with the typo)."""
    with pytest.raises(SystemExit):
        cli.main(["bench", name, "--device", "cpu", "--modes", "fwd+bw"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("name", ["gated_conv", "channel_fc", "pixel_attention", "self_similarity", "partial_conv",
                                  "spectral_norm_conv"])
def test_bench_cuda_without_a_gpu_is_one_line(name, capsys):
    capsys.readouterr()
    assert cli.main(["bench", name, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastinpaint bench: --device: cuda asked for"), err
    with pytest.raises(SystemExit):
        cli.main(["bench", name, "--device", "nosuch"])


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
@pytest.mark.parametrize("name", ["gated_conv", "channel_fc", "deepfill_v2"])
def test_bench_min_time_must_be_positive(name, value, capsys):
    """--min-time 0, negative or NaN: one line naming it (it timed five calls and called that a
    measurement)."""
    capsys.readouterr()
    assert cli.main(["bench", name, "--device", "cpu", "--min-time", value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastinpaint bench: --min-time: must be a positive"), err


@pytest.mark.parametrize("name,option", [("deepfill_v2", "--batch"), ("deepfill_v2", "--infer-batch"),
                                         ("partial_conv", "--batch"), ("spectral_norm_conv", "--batch")])
def test_bench_batch_must_be_positive(name, option, capsys):
    capsys.readouterr()
    assert cli.main(["bench", name, "--device", "cpu", option, "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"fastinpaint bench: {option}: must be at least 1"), err


def test_deepfill_v2_inference_runs_at_infer_batch(tmp_path):
    skip_unless_available("cpu", "cpu")
    out = tmp_path / "r.json"
    assert cli.main(["bench", "deepfill_v2", "--device", "cpu", "--min-time", "0.01", "--cases", "G inference",
                     "--infer-size", "32", "--infer-batch", "2", "--batch", "3", "--cnum", "4", "--impls", "eager",
                     "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["batch"] for r in rows] == [2] and "error" not in rows[0]


@pytest.mark.parametrize("name", OPS)
def test_bench_scripts_report_user_errors_in_one_line(name, capsys):
    """``python -m <module>`` with --cases that select nothing (or a bad --min-time): one line on
    stderr naming the option and exit status 2, not a traceback."""
    from fastinpaint import benchmark as B

    module = cli._bench_module(name)
    capsys.readouterr()
    no_cases = name in ("deepfill_v2", "pixel_attention")  # no --cases pattern (deepfill_v2: choices)
    bad = ["--min-time", "-1"] if no_cases else ["--cases", "no-such-case"]
    assert B.script_main(lambda: module.main(["--device", "cpu", *bad]), "script") == 2
    err = capsys.readouterr().err
    option = "min_time" if no_cases else "cases"
    assert err.count("\n") == 1 and err.startswith(f"script: {option}: "), err
