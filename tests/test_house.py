"""The house rules, checked on the source (docs/architecture.md): no import cycle between modules, no arrow back up
between packages (a subpackage importing a top-level module that imports the subpackage), no module over 500 lines,
no function over 60 lines. Imports inside functions count: a lazy import is still an arrow."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "l4export"
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 500, 60


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        parts = p.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports, anywhere in its source."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            candidates = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        out |= {c for c in candidates if c in known and c != name}
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imported(m, p, set(mods)) for m, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan, iterative enough for this size)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _packages(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph with each subpackage (l4export.quant, .exporter, .runtimes, ...) as one node."""
    node = lambda m: ".".join(m.split(".")[:2]) if m.count(".") > 1 else m  # noqa: E731
    out: dict[str, set[str]] = {node(m): set() for m in graph}
    for m, deps in graph.items():
        out[node(m)] |= {node(d) for d in deps} - {node(m)}
    return out


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_no_arrow_back_up_between_packages():
    assert _cycles(_packages(_graph())) == []


def test_modules_and_functions_are_short():
    long = []
    for name, path in _modules().items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {n} lines")
    assert long == []


def test_the_checks_see_a_cycle_and_a_long_function(tmp_path):
    """The checks can fail: a made-up pair of modules importing each other, lazily, is a cycle."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("def f():\n    from . import b\n")
    b.write_text("from .a import f\n")
    graph = {m: _imported(m, p, {"pkg.a", "pkg.b"}) for m, p in (("pkg.a", a), ("pkg.b", b))}
    assert _cycles(graph) == [["pkg.a", "pkg.b"]]
    assert _cycles(_packages({"l4export.plan": {"l4export.quant.x"}, "l4export.quant.x": {"l4export.plan"}}))
