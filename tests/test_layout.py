"""The package's layout rules (README, "Layout"): imports run one way, no module imports
itself back through another, and every op folder has the same files.

Imports are read from the source (every ``import`` statement, function-level ones
included), so a lazy import that closes a cycle counts too."""

import ast
import pathlib

import pytest

import fastinpaint

PKG = pathlib.Path(fastinpaint.__file__).parent
OP_DIRS = sorted(p for p in (PKG / "ops").iterdir() if p.is_dir() and (p / "op.py").exists())


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in PKG.rglob("*.py")}


def _resolve(name: str) -> str | None:
    """The fastinpaint module ``name`` refers to (a package's __init__ for a package), or None."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [_resolve(a.name) for a in node.names if a.name.split(".")[0] == "fastinpaint"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            if prefix.split(".")[0] != "fastinpaint":
                continue
            # `from P import x`: the module P.x when x is one, else P itself
            targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in MODULES else _resolve(prefix)
                       for a in node.names]
        else:
            continue
        found.update(t for t in targets if t and t != module)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}

UPPER = ("fastinpaint.functional", "fastinpaint.nn", "fastinpaint.losses", "fastinpaint.models",
         "fastinpaint.data", "fastinpaint.train", "fastinpaint.cli", "fastinpaint.inpaint", "fastinpaint.metrics")


def _is_under(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("fastinpaint.ops")))
def test_ops_import_nothing_above_them(module):
    bad = sorted(t for t in GRAPH[module] if _is_under(t, UPPER))
    assert not bad, f"{module} imports {bad}: ops must not import functional, nn, losses, models, data, train"
    if not module.endswith(".bench"):
        assert "fastinpaint.benchmark" not in GRAPH[module], f"{module} imports the benchmark harness"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("fastinpaint.ops.")
                                          and m.count(".") >= 3))
def test_an_op_imports_no_other_op(module):
    own = ".".join(module.split(".")[:3])
    others = sorted(t for t in GRAPH[module] if t.count(".") >= 3 and t.startswith("fastinpaint.ops.")
                    and not t.startswith(own + ".") and t != own and not t.split(".")[2].startswith("_"))
    assert not others, f"{module} imports another op's modules {others}; shared code goes in ops/_*.py"


def test_benchmark_harness_imports_no_op():
    bad = sorted(t for t in GRAPH["fastinpaint.benchmark"]
                 if _is_under(t, ("fastinpaint.ops", "fastinpaint.functional", "fastinpaint.nn", "fastinpaint.models")))
    assert not bad, f"fastinpaint.benchmark imports {bad}"


def test_no_import_cycle():
    # package __init__ files re-export their children by design; cycles through them are not counted
    graph = {m: {t for t in ts if not (MODULES[t].name == "__init__.py" and m.startswith(t + "."))}
             for m, ts in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


@pytest.mark.parametrize("op_dir", OP_DIRS, ids=[p.name for p in OP_DIRS])
def test_every_op_folder_has_the_same_files(op_dir):
    for name in ("reference.py", "triton.py", "op.py", "bench.py", "__init__.py"):
        assert (op_dir / name).exists(), f"ops/{op_dir.name} lacks {name}"
    source = (op_dir / "op.py").read_text()
    for needed in ("kernel(", "Op(", "differentiable(", ".select("):
        assert needed in source, f"ops/{op_dir.name}/op.py does not use the registration path ({needed})"
    for banned in ("custom_op", "register_fake", "register_autograd", "torch.ops.fastinpaint"):
        assert banned not in source, f"ops/{op_dir.name}/op.py registers by hand ({banned}); use ops/_registry.py"
    csrc = PKG.parent / "csrc"
    if (csrc / "cpu").is_dir():  # a checkout or an editable install
        assert (csrc / "cpu" / f"{op_dir.name}.cpp").exists(), f"csrc/cpu/{op_dir.name}.cpp missing"


def test_layout_checker_sees_a_cycle_and_an_upward_import():
    """The checks above can fail: the graph built from the source holds the edges they look for."""
    assert "fastinpaint.ops._registry" in GRAPH["fastinpaint.ops.channel_fc.op"]
    assert "fastinpaint.functional" in GRAPH["fastinpaint.nn.gated_conv"]


def test_import_is_light_and_the_rest_is_reachable():
    """``import fastinpaint`` loads the ops only; models, losses, data, metrics, train and
    inpaint load at their first access as attributes (PEP 562)."""
    import subprocess
    import sys

    code = (
        "import sys, fastinpaint\n"
        "lazy = ['models', 'losses', 'data', 'metrics', 'train', 'inpaint']\n"
        "early = [m for m in lazy if 'fastinpaint.' + m in sys.modules]\n"
        "assert not early, early\n"
        "assert 'PIL' not in sys.modules and 'torchmetrics' not in sys.modules\n"
        "assert set(lazy) <= set(dir(fastinpaint))\n"
        "assert callable(fastinpaint.models.build_model)\n"
        "assert fastinpaint.losses.SpatialCorrelativeLoss and fastinpaint.data.FreeFormMask\n"
        "assert fastinpaint.metrics.InpaintingMetrics and fastinpaint.train.train and fastinpaint.inpaint\n"
        "assert fastinpaint.models is sys.modules['fastinpaint.models']\n"
        "try:\n"
        "    fastinpaint.nosuch\n"
        "except AttributeError as e:\n"
        "    assert 'nosuch' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
