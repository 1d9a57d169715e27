"""The layering of boa's packages, checked on the source (tests of the whole package, so at the top of tests/):
boa_kernels imports nothing from boa; the import graph between boa's subpackages and top-level modules (every
import statement, function-level ones included) has no cycle; boa.core imports nothing from the rest of boa; and
every package folder is one setup.py ships."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages

import boa

BOA = Path(boa.__file__).resolve().parent
# The graph's nodes: boa's subpackages (core, algorithms, ...) and its top-level modules (cli, config, generate).
NODES = sorted({p.name for p in BOA.iterdir() if p.is_dir() and any(p.glob("*.py"))}
               | {p.stem for p in BOA.glob("*.py") if p.stem != "__init__"})


def test_boa_kernels_imports_nothing_from_boa():
    """Every module of boa_kernels imported in a fresh interpreter leaves no `boa` module loaded."""
    code = (
        "import importlib, json, pkgutil, sys\n"
        "import boa_kernels\n"
        "names = [m.name for m in pkgutil.walk_packages(boa_kernels.__path__, 'boa_kernels.')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "loaded = sorted(m for m in sys.modules if m == 'boa' or m.startswith('boa.'))\n"
        "print(json.dumps({'modules': names, 'boa': loaded}))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"boa_kernels.dispatch", "boa_kernels.loader", "boa_kernels.rounding"} <= set(report["modules"])
    assert report["boa"] == []


def node_of(module: str) -> str | None:
    """The graph node of a dotted module name inside boa (None for boa itself or outside it)."""
    parts = module.split(".")
    if parts[0] != "boa" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in NODES else None


def imported_nodes(path: Path) -> set[str]:
    """The nodes a source file imports, resolving relative imports and `from boa import NAME` (a subpackage, or a
    name boa exports lazily from its module)."""
    package = ".".join(("boa", *path.relative_to(BOA).with_suffix("").parts))
    if path.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(node_of(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            if module == "boa":
                for alias in node.names:
                    target = alias.name if alias.name in NODES else boa._EXPORTS.get(alias.name, "")
                    found.add(node_of(target if "." in target else f"boa.{target}"))
            else:
                found.add(node_of(module))
                found.update(node_of(f"{module}.{alias.name}") for alias in node.names)
    found.discard(None)
    return found


def import_graph() -> dict[str, set[str]]:
    graph = {node: set() for node in NODES}
    for path in BOA.rglob("*.py"):
        rel = path.relative_to(BOA)
        if rel == Path("__init__.py"):
            continue  # the lazy facade (boa.X names), which imports by string on first use
        source = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        graph[source] |= imported_nodes(path) - {source}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph as [a, b, ..., a], or None (depth-first search)."""
    state = {}  # node -> "open" while on the current path, "done" once all it reaches was seen

    def visit(path):
        node = path[-1]
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit([*path, nxt])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit([start])
            if cycle:
                return cycle
    return None


def test_the_graph_sees_the_packages_and_their_imports():
    """The check itself: every expected node is there, and known edges are found (absolute, lazy and relative)."""
    graph = import_graph()
    expected = {"core", "algorithms", "stats", "models", "pipeline", "export", "nn", "eval", "data", "vision", "cli"}
    assert expected <= set(graph)
    assert {"core", "models", "stats", "algorithms", "config"} <= graph["pipeline"]
    assert "pipeline" in graph["cli"]  # a function-level import
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_package_import_graph_has_no_cycle():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle between boa's packages: {' -> '.join(cycle)}; graph: " + str(
        {k: sorted(v) for k, v in graph.items()})


def test_core_imports_nothing_from_the_rest_of_boa():
    offenders = {str(p.relative_to(BOA)): sorted(imported_nodes(p) - {"core"}) for p in (BOA / "core").rglob("*.py")}
    assert {path: nodes for path, nodes in offenders.items() if nodes} == {}


def test_every_package_folder_is_shipped_by_setup_py():
    """setup.py lists its packages with find_packages, which takes only folders with an __init__.py: a folder without
    one (a namespace package, importable from a source checkout) would be missing from a wheel."""
    shipped = set(find_packages(str(BOA.parent), include=["boa", "boa.*"]))
    folders = {".".join(("boa", *p.relative_to(BOA).parts)) for p in BOA.rglob("*")
               if p.is_dir() and p.name != "__pycache__" and any(p.glob("*.py"))}
    assert folders - shipped == set()
