"""Every Triton kernel specialization fastinpaint can launch, compiled for real GPUs on a
machine without one, with its registers, shared memory and spills.

Three steps:

1. **Capture.** ``capture()`` runs each op's benchmark shapes (``ops/<op>/bench.py``,
   ``capture_calls``) through the public op on CPU tensors with the ``triton`` backend,
   forward and backward, with and without autograd, in bfloat16, float16 and float32. While
   it runs, every Triton launch is *recorded instead of executed* (``recording()``): the
   kernel, its argument types (the signature Triton would derive: ``*bf16``, ``i32``, ...,
   with 16-byte divisibility hints), its constexprs, ``num_warps`` and ``num_stages``. An
   autotuned launch records every config its pruning function keeps. Tensors are allocated
   at their real size (never filled) and only the host code of the launchers runs. The
   interpreter must be off (``TRITON_INTERPRET`` unset): the capture runs in a child process.
2. **Compile.** ``compile_launch()`` builds a recorded launch with Triton's real compiler
   (``triton.compile`` with a ``GPUTarget``) for sm_90 and sm_80, to PTX and cubin.
3. **Read.** ``cuobjdump --dump-resource-usage`` (shipped in the triton wheel) reads
   registers, stack and local memory from the cubin; Triton's metadata gives the shared
   memory.

The CUDA extension (``fastinpaint._C`` built with ``FASTINPAINT_CUDA=1``) holds its kernels'
cubins for sm_80 and sm_90 already: ``extension_kernels()`` reads them with the same
cuobjdump (names demangled by ``c++filt`` where it is installed).

``python -m fastinpaint.ops.resources --out benchmarks/results`` writes the Triton table,
``--cuda-extension`` the CUDA extension's;
``tests/test_kernel_resources.py`` fails on a kernel that does not compile, exceeds the
architecture's shared memory, or (a hot kernel) spills. Results are cached by a hash of
the kernel's source (with its callees), the specialization and the target, in
``~/.cache/fastinpaint/kernel_resources`` (``FASTINPAINT_RESOURCE_CACHE``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Iterator

import torch

#: the ops whose bench.py provides ``capture_calls(dtype)``
OPS = ("gated_conv", "channel_fc", "partial_conv", "pixel_attention", "self_similarity")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
#: (name, compute capability, opt-in shared memory per block in bytes)
ARCHS = (("sm_90", 90, 227 * 1024), ("sm_80", 80, 163 * 1024))

_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
         torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
         torch.bool: "u1"}


@dataclasses.dataclass
class Launch:
    """One recorded kernel launch: enough to compile it."""
    kernel: str                 # module:function
    signature: dict             # argument name -> Triton type ("*bf16", "i32", "fp32", "constexpr")
    constexprs: dict            # argument name -> value
    divisible: list             # names of the arguments Triton would mark 16-divisible
    num_warps: int
    num_stages: int
    op: str = ""
    dtype: str = ""

    def key(self) -> tuple:
        return (self.kernel, tuple(sorted(self.signature.items())), tuple(sorted(
            (k, repr(v)) for k, v in self.constexprs.items())), tuple(sorted(self.divisible)), self.num_warps,
                self.num_stages)

    def config(self) -> str:
        """The launch's constexprs (tiles, filter size, flags) and pipeline settings, for the table."""
        shown = {k: v for k, v in self.constexprs.items() if v is not None and k != "PRECISION"}
        parts = [f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in sorted(shown.items())]
        return " ".join(parts + [f"warps={self.num_warps}", f"stages={self.num_stages}"])


def _arg_type(value, param) -> tuple[str, bool]:
    """(Triton type, 16-divisible) of a runtime argument, as Triton's own launcher derives it
    (its native specializer where this Triton has one; ints equal to 1 become constexpr 1)."""
    try:
        from triton.backends.compiler import BaseBackend
        from triton.runtime.jit import native_specialize_impl
    except ImportError:
        native_specialize_impl = None
    if native_specialize_impl is not None:
        kind, key = native_specialize_impl(BaseBackend, value, False, not param.do_not_specialize,
                                           not param.do_not_specialize_on_alignment)[:2]
        return kind, key == "D"
    if isinstance(value, int) and not isinstance(value, bool) and value == 1:
        return "constexpr", False
    if isinstance(value, torch.Tensor):
        if value.dtype not in _TYPE:
            raise TypeError(f"no Triton type for tensor dtype {value.dtype}")
        return "*" + _TYPE[value.dtype], value.data_ptr() % 16 == 0
    if isinstance(value, bool):
        return "u1", False
    if isinstance(value, int):
        return ("i32" if -2**31 <= value < 2**31 else "i64"), value % 16 == 0 and value != 0
    if isinstance(value, float):
        return "fp32", False
    raise TypeError(f"no Triton type for {type(value).__name__}")


def _record(fn, args, kwargs, num_warps, num_stages, sink: list) -> None:
    """Bind ``args``/``kwargs`` to the JIT function ``fn``'s parameters and append a Launch."""
    names = fn.arg_names
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    signature, constexprs, divisible = {}, {}, []
    for i, name in enumerate(names):
        param = fn.params[i]
        if name not in bound:
            if param.default is inspect.Parameter.empty:
                raise TypeError(f"{fn.__name__}: no value for {name}")
            bound[name] = param.default
        value = bound[name]
        if param.is_constexpr or value is None:
            signature[name] = "constexpr"
            constexprs[name] = value
            continue
        kind, div = _arg_type(value, param)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = value
        elif div:
            divisible.append(name)
    sink.append(Launch(f"{fn.fn.__module__}:{fn.fn.__qualname__}", signature, constexprs, divisible,
                       int(num_warps), int(num_stages)))


@contextlib.contextmanager
def recording() -> Iterator[list]:
    """Inside the block, Triton launches (``kernel[grid](...)``, autotuned or not) are recorded
    into the yielded list instead of running, and the ``triton`` backend takes CPU tensors."""
    from triton.runtime import autotuner, jit

    from .. import _backend

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("recording() needs the real Triton compiler: unset TRITON_INTERPRET")
    sink: list = []
    saved = (jit.JITFunction.run, autotuner.Autotuner.run)

    def jit_run(self, *args, grid, warmup, **kwargs):
        warps = kwargs.pop("num_warps", 4)
        stages = kwargs.pop("num_stages", 3)
        _record(self, args, kwargs, warps, stages, sink)

    def tuned_run(self, *args, **kwargs):
        nargs = dict(zip(self.arg_names, args))
        configs = self.configs
        if self.early_config_prune:
            configs = self.early_config_prune(configs, nargs, **kwargs)
        for cfg in configs:
            merged = {**kwargs, **cfg.kwargs}
            _record(self.fn, args, merged, cfg.num_warps, cfg.num_stages, sink)

    jit.JITFunction.run = jit_run
    autotuner.Autotuner.run = tuned_run
    _backend._capture_mode.append(True)
    try:
        yield sink
    finally:
        jit.JITFunction.run, autotuner.Autotuner.run = saved
        _backend._capture_mode.pop()


def capture(ops=OPS, dtypes=DTYPES) -> list[Launch]:
    """Every distinct launch of ``ops`` at their benchmark shapes, in ``dtypes``."""
    launches: dict[tuple, Launch] = {}
    for op in ops:
        bench = importlib.import_module(f"fastinpaint.ops.{op}.bench")
        for dtype in dtypes:
            with recording() as sink:
                bench.capture_calls(dtype)
            for launch in sink:
                launch.op, launch.dtype = op, str(dtype).split(".")[-1]
                launches.setdefault(launch.key(), launch)
    return list(launches.values())


# ----------------------------------------------------------------------------- compile and read

def _jit_function(kernel: str):
    module, _, name = kernel.partition(":")
    fn = getattr(importlib.import_module(module), name)
    return fn if hasattr(fn, "arg_names") else fn.fn  # an autotuned kernel wraps its JIT function


def cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"cuobjdump is not in the triton wheel at {path}")
    return path


def resource_usage(cubin: bytes) -> dict:
    """{"registers", "stack", "local"} of the one kernel in ``cubin``, read by cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        out = subprocess.run([cuobjdump(), "--dump-resource-usage", fh.name], capture_output=True, text=True,
                             check=True).stdout
    match = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", out)
    if match is None:
        raise RuntimeError(f"unexpected cuobjdump output: {out[:300]}")
    reg, stack, _shared, local = map(int, match.groups())
    return {"registers": reg, "stack": stack, "local": local}


def parse_resource_dump(text: str) -> list[dict]:
    """``cuobjdump --dump-resource-usage`` of a library: one {"arch", "name", "registers",
    "stack", "shared", "local"} per kernel and architecture."""
    kernels, arch, name = [], None, None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("arch = "):
            arch = line.split("=", 1)[1].strip()
        elif line.startswith("Function "):
            name = line[len("Function "):].rstrip(":")
        elif line.startswith("REG:") and name is not None:
            fields = dict(re.findall(r"([A-Z]+):(\d+)", line))
            kernels.append({"arch": arch, "name": name, "registers": int(fields["REG"]),
                            "stack": int(fields["STACK"]), "shared": int(fields["SHARED"]),
                            "local": int(fields["LOCAL"])})
            name = None
    return kernels


def _short_name(name: str) -> str:
    """A demangled kernel name without its namespaces and parameter list:
    ``channel_fc::forward_epilogue_kernel<float, 1, true, unsigned int>``."""
    name = re.sub(r"^void |fastinpaint::|\(anonymous namespace\)::|c10::", "", name)
    depth = 0
    for i, ch in enumerate(name):
        depth += (ch == "<") - (ch == ">")
        if ch == "(" and depth == 0:
            return name[:i]
    return name


def _demangle(names: list[str]) -> list[str]:
    import shutil

    tool = shutil.which("c++filt")
    if tool is None:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    return [_short_name(n) for n in lines] if len(lines) == len(names) else names


def extension_kernels(path: str) -> list[dict]:
    """Every kernel of the CUDA extension at ``path``, per architecture: :func:`parse_resource_dump`'s
    rows with ``kernel``, the demangled short name, and ``base``, that name without template
    arguments."""
    out = subprocess.run([cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True,
                         check=True).stdout
    kernels = parse_resource_dump(out)
    for k, name in zip(kernels, _demangle([k["name"] for k in kernels])):
        k["kernel"] = name
        k["base"] = name.split("<", 1)[0]
        source = re.search(r"_GLOBAL__N__[0-9a-f]+_\d+_(\w+?)_cu_", k["name"])   # the anonymous namespace's file
        k["source"] = f"{source.group(1)}.cu" if source else ""
    return kernels


def extension_markdown(kernels: list[dict], env: dict) -> str:
    """One row per kernel template and architecture: its instantiations' register range and
    their largest shared memory, stack and local memory."""
    groups: dict[tuple, list[dict]] = {}
    for k in kernels:
        groups.setdefault((k["source"], k["base"], k["arch"]), []).append(k)
    lines = ["# CUDA extension kernel resources (fastinpaint._C, read with cuobjdump)", "",
             ", ".join(f"{k}: {v}" for k, v in env.items()), "",
             "Shared memory is the static amount (sm_90 reserves 1 KB per block); the self-similarity row "
             "kernels add their dynamic shared memory at launch, checked against the device's limit.", "",
             "| source | kernel | arch | instantiations | registers | shared (B) | stack (B) | local (B) |",
             "|---|---|---|---|---|---|---|---|"]
    for (source, base, arch), ks in sorted(groups.items()):
        regs = sorted(k["registers"] for k in ks)
        reg = f"{regs[0]}" if regs[0] == regs[-1] else f"{regs[0]}-{regs[-1]}"
        lines.append(f"| {source} | {base} | {arch} | {len(ks)} | {reg} | {max(k['shared'] for k in ks)} | "
                     f"{max(k['stack'] for k in ks)} | {max(k['local'] for k in ks)} |")
    return "\n".join(lines) + "\n"


def _source_hash(fn) -> str:
    return fn.cache_key  # the source of the kernel and of every JIT function it calls


def _cache_dir() -> str:
    return os.environ.get("FASTINPAINT_RESOURCE_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "fastinpaint", "kernel_resources"))


def compile_launch(launch: Launch, arch: str, capability: int) -> dict:
    """Compile ``launch`` for ``arch``; return its resources, or {"error": ...}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_function(launch.kernel)
    key = hashlib.sha256(repr((_source_hash(fn), launch.key(), arch, triton.__version__)).encode()).hexdigest()
    path = os.path.join(_cache_dir(), key + ".json")
    if os.path.exists(path):
        with open(path) as fh:
            return json.load(fh)
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in launch.divisible}
    src = ASTSource(fn, dict(launch.signature), dict(launch.constexprs), attrs)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                                  options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})
        result = {"shared": int(compiled.metadata.shared), **resource_usage(compiled.asm["cubin"])}
    except Exception as exc:  # noqa: BLE001 - a kernel that does not compile is a result
        result = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"[:400]}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as fh:
        json.dump(result, fh)
    os.replace(path + ".tmp", path)
    return result


def hot_kernels() -> set[str]:
    """``module:function`` of the kernels the ops' docstrings (``HOT_KERNELS`` in each triton.py)
    call hot: those must not spill at any config."""
    hot = set()
    for op in OPS:
        mod = importlib.import_module(f"fastinpaint.ops.{op}.triton")
        hot.update(f"{mod.__name__}:{name}" for name in getattr(mod, "HOT_KERNELS", ()))
    return hot


def table(launches: list[Launch], archs=ARCHS, jobs: int = 1) -> list[dict]:
    """One row per (launch, architecture)."""
    work = [(launch, arch, cap, limit) for launch in launches for arch, cap, limit in archs]

    def one(item):
        launch, arch, cap, limit = item
        return {"op": launch.op, "kernel": launch.kernel.split(":")[1], "module": launch.kernel.split(":")[0],
                "dtype": launch.dtype, "config": launch.config(), "arch": arch, "shared_limit": limit,
                **compile_launch(launch, arch, cap)}

    if jobs > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(jobs) as pool:
            return list(pool.map(one, work))
    return [one(item) for item in work]


def problems(rows: list[dict], hot: set[str]) -> list[str]:
    """What must not be: a kernel that does not compile, shared memory over the limit, a hot
    kernel that spills."""
    found = []
    for r in rows:
        what = f"{r['kernel']} [{r['dtype']}, {r['config']}] on {r['arch']}"
        if "error" in r:
            found.append(f"{what} does not compile: {r['error']}")
            continue
        if r["shared"] > r["shared_limit"]:
            found.append(f"{what} uses {r['shared']} B of shared memory, over {r['shared_limit']}")
        if f"{r['module']}:{r['kernel']}" in hot and (r["local"] > 0 or r["stack"] > 0):
            found.append(f"{what} spills: {r['stack']} B of stack, {r['local']} B of local memory")
    return found


def markdown(rows: list[dict], env: dict) -> str:
    lines = ["# Triton kernel resources (compiled without a GPU)", "",
             ", ".join(f"{k}: {v}" for k, v in env.items()), "",
             "| op | kernel | dtype | config | arch | registers | shared (B) | stack (B) | local (B) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["op"], r["kernel"], r["arch"], r["dtype"], r["config"])):
        if "error" in r:
            lines.append(f"| {r['op']} | {r['kernel']} | {r['dtype']} | {r['config']} | {r['arch']} | "
                         f"error: {r['error'][:120]} | | | |")
        else:
            lines.append(f"| {r['op']} | {r['kernel']} | {r['dtype']} | {r['config']} | {r['arch']} | "
                         f"{r['registers']} | {r['shared']} | {r['stack']} | {r['local']} |")
    return "\n".join(lines) + "\n"


def _capture_in_child(ops, autotune: bool) -> list[Launch]:
    """Run :func:`capture` in a child process without the interpreter (the parent, a test
    run, may have it on and triton already imported in that mode)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FASTINPAINT_TRITON_AUTOTUNE"] = "1" if autotune else "0"
    code = ("import json, dataclasses, sys; from fastinpaint.ops import resources as R; "
            f"print(json.dumps([dataclasses.asdict(l) for l in R.capture({tuple(ops)!r})], default=repr))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"capture failed:\n{out.stderr[-3000:]}")
    return [Launch(**d) for d in json.loads(out.stdout.strip().splitlines()[-1])]


def _autotuned(op: str) -> bool:
    """Whether ``op``'s launchers autotune (and so have a fixed config too, FASTINPAINT_TRITON_AUTOTUNE=0)."""
    import ast

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), op, "triton.py")
    with open(path) as fh:
        tree = ast.parse(fh.read())
    return any(isinstance(n, ast.Attribute) and n.attr == "autotune" for n in ast.walk(tree))


def collect(ops=OPS) -> list[Launch]:
    """Every launch of ``ops``: each autotune config the pruning keeps, and the fixed config
    (FASTINPAINT_TRITON_AUTOTUNE=0) of the ops that autotune."""
    seen: dict[tuple, Launch] = {}
    passes = [(tuple(ops), True)] + [((op,), False) for op in ops if _autotuned(op)]
    for group, autotune in passes:
        for launch in _capture_in_child(group, autotune):
            seen.setdefault(launch.key(), launch)
    return list(seen.values())


def report_in_child(ops=OPS, jobs: int | None = None) -> tuple[list[Launch], list[dict]]:
    """:func:`collect` and :func:`table` in a child process without the Triton interpreter (a
    test run has it on, and then ``@triton.jit`` functions cannot be compiled)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "fastinpaint.ops.resources", "--print-json", "--ops", *ops,
           "--jobs", str(jobs or os.cpu_count() or 1)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return [Launch(**d) for d in data["launches"]], data["rows"]


def main(argv=None) -> int:
    import datetime
    import triton

    p = argparse.ArgumentParser(description="compile every Triton kernel specialization for sm_90 and sm_80 "
                                            "and report registers, shared memory and spills")
    p.add_argument("--out", default="benchmarks/results", help="folder for the .json and .md table")
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--print-json", action="store_true", help="print the rows as JSON instead of writing files")
    p.add_argument("--cuda-extension", action="store_true",
                   help="instead, the table of the CUDA extension's kernels (fastinpaint._C built with "
                        "FASTINPAINT_CUDA=1)")
    a = p.parse_args(argv)
    if a.cuda_extension:
        return _extension_main(a.out)
    launches = collect(a.ops)
    rows = table(launches, jobs=a.jobs)
    if a.print_json:
        print(json.dumps({"launches": [dataclasses.asdict(x) for x in launches], "rows": rows}, default=repr))
        return 0
    env = {"triton": triton.__version__, "torch": torch.__version__.split("+")[0],
           "date": datetime.date.today().isoformat(), "launches": len(launches)}
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, f"triton_kernel_resources_{datetime.date.today():%Y%m%d}")
    with open(stem + ".json", "w") as fh:
        json.dump({"environment": env, "rows": rows}, fh, indent=1)
    with open(stem + ".md", "w") as fh:
        fh.write(markdown(rows, env))
    bad = problems(rows, hot_kernels())
    print(f"{len(launches)} launches, {len(rows)} compilations; wrote {stem}.json and {stem}.md")
    for line in bad:
        print("PROBLEM", line)
    return 1 if bad else 0


def _extension_main(out_dir: str) -> int:
    import datetime

    from .. import _extension

    path = _extension.prebuilt_path()
    info = (_extension.read_build_info(path) or {}) if path else {}
    if info.get("cuda") != "1":
        print("fastinpaint._C is not built with CUDA kernels: build it with FASTINPAINT_CUDA=1", file=sys.stderr)
        return 2
    kernels = extension_kernels(path)
    env = {"torch": torch.__version__.split("+")[0], "cuda": torch.version.cuda,
           "date": datetime.date.today().isoformat(), "kernels": len(kernels)}
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"cuda_kernel_resources_{datetime.date.today():%Y%m%d}")
    with open(stem + ".json", "w") as fh:
        json.dump({"environment": env, "kernels": [{k: v for k, v in x.items() if k != "name"} for x in kernels]},
                  fh, indent=1)
    with open(stem + ".md", "w") as fh:
        fh.write(extension_markdown(kernels, env))
    spills = [k for k in kernels if k["stack"] or k["local"]]
    print(f"{len(kernels)} kernels; wrote {stem}.json and {stem}.md")
    for k in spills:
        print(f"PROBLEM {k['kernel']} on {k['arch']} spills: {k['stack']} B of stack, {k['local']} B of local memory")
    return 1 if spills else 0


if __name__ == "__main__":
    raise SystemExit(main())
