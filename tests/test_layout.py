"""The package's layers hold: the core imports nothing outside the core, running it imports no support.

Core: `comm/`, `model`, `kv_cache`, `shard`, `layers`, `tp_model`, `loss`, `rng`. Running it: `launch`,
`train`, `cli` (and `__main__`), which may import the core. Support: `course/`, `bench/`, `viz/`, which
may import anything. The command line imports `bench/` (and with it PyTorch's DTensor) only inside the
`bench` command. Imports are read from the source (module level and inside functions alike), so
a lazy import inside a function counts too.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "tputil"
CORE = {"comm", "model", "kv_cache", "shard", "layers", "tp_model", "loss", "rng"}
RUNNING = {"launch", "train", "__main__", "checkpoint", "tp_checkpoint"}
RUNNING |= {"cli", "cli_args", "cli_checkpoint", "cli_report"}  # the command line
SUPPORT = {"course", "bench", "viz"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, source: str | None = None):
    """(top-level part of tputil imported, name of the enclosing function or None) for every import
    in `path` (or in `source`, read as if it were the file at `path`)."""
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            targets = []
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package[: len(package) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                    targets = [target] if child.module else [f"{target}.{a.name}" for a in child.names]
                elif child.module:
                    targets = [child.module] if child.module != "tputil" else [f"tputil.{a.name}" for a in child.names]
            for target in targets:
                parts = target.split(".")
                if parts[0] == "tputil" and len(parts) > 1:
                    found.append((parts[1], function))
            visit(child, inner)

    visit(tree, None)
    return found


def top(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


FILES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_belongs_to_one_layer():
    unknown = sorted({top(f) for f in FILES} - CORE - RUNNING - SUPPORT - {"__init__"})
    assert not unknown, f"modules in no layer: {unknown}; add them to CORE, RUNNING or SUPPORT here"


@pytest.mark.parametrize("path", [f for f in FILES if top(f) in CORE], ids=lambda f: module_name(f))
def test_core_imports_only_the_core(path):
    outside = sorted({name for name, _ in imports(path) if name not in CORE})
    assert not outside, f"{module_name(path)} imports tputil.{outside}: the core must not depend on them"


@pytest.mark.parametrize("path", [f for f in FILES if top(f) in RUNNING], ids=lambda f: module_name(f))
def test_running_imports_no_support_except_the_bench_command(path):
    bad = sorted(
        {
            (name, fn)
            for name, fn in imports(path)
            if name in SUPPORT and not (path.name == "cli.py" and name == "bench" and fn == "main")
        }
    )
    assert not bad, f"{module_name(path)} imports support modules {bad}"


def test_the_checker_sees_every_import_form():
    """The rules above would pass vacuously if `imports` missed an import form: feed it each one."""
    source = (
        "from .course import lists\nfrom . import bench\nimport tputil.viz\nfrom ..x import y\n"
        "def f():\n    from tputil.course.cost import ring_bytes\n"
        "from .comm import Group\nfrom .comm.group import KINDS\n"
    )
    assert imports(PACKAGE / "layers.py", source) == [
        ("course", None),
        ("bench", None),
        ("viz", None),
        ("course", "f"),
        ("comm", None),
        ("comm", None),
    ]
    assert imports(PACKAGE / "comm" / "dist.py", "from ..course import lists\nfrom .group import Group\n") == [
        ("course", None),
        ("comm", None),
    ]


def test_the_command_line_loads_no_support_module_until_bench_runs():
    code = (
        "import sys, tputil.cli, tputil.launch, tputil.train\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('tputil.bench', 'tputil.course', 'tputil.viz',"
        " 'torch.distributed.tensor')))\n"
        "assert not bad, bad\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
