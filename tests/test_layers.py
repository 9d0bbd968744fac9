"""
The package's shape (docs/modules.md): no import cycles, core/ imports neither plane
nor Twisted's reactor, the planes do not import each other, and no module grows past
600 lines.  Read from the source with L{ast}, so a lazy import inside a function
counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial import unittest

import pipegate

PACKAGE = Path(pipegate.__file__).parent
MAX_LINES = 600


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("pipegate",) + path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The pipegate modules (and the outside ones, unfiltered) that C{name} imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def within(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


class LayerTests(unittest.TestCase):

    def test_the_checker_sees_a_cycle(self):
        self.assertEqual(cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}), [["a", "b", "c"]])
        self.assertEqual(cycles({"a": {"b"}, "b": set()}), [])

    def test_no_import_cycles(self):
        self.assertEqual(cycles(graph()), [])

    def test_core_imports_only_core(self):
        wrong = sorted((name, dep) for name, deps in graph().items() if within(name, "pipegate.core")
                       for dep in deps if within(dep, "pipegate", "twisted.internet") and not within(dep, "pipegate.core"))
        self.assertEqual(wrong, [])

    def test_planes_do_not_import_each_other(self):
        http, ports = ("pipegate.http",), ("pipegate.ports", "pipegate.mux")
        wrong = sorted((name, dep) for name, deps in graph().items() for dep in deps
                       if (within(name, *http) and within(dep, *ports)) or (within(name, *ports) and within(dep, *http)))
        self.assertEqual(wrong, [])


    def test_no_module_over_the_limit(self):
        long = {name: n for name, path in modules().items()
                if (n := len(path.read_text().splitlines())) > MAX_LINES}
        self.assertEqual(long, {})

    def test_every_import_names_something_that_exists(self):
        # pyflakes cannot see that a name moved away from a module: a lazy import inside a
        # function (or a benchmark) would fail only when it runs.
        import importlib

        root = PACKAGE.parent
        missing = []
        for folder in ("pipegate", "tests", "benchmarks"):
            for path in sorted((root / folder).rglob("*.py")):
                for node in ast.walk(ast.parse(path.read_text(), str(path))):
                    if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                            and node.module.split(".")[0] in ("pipegate", "tests", "benchmarks")):
                        continue
                    module = importlib.import_module(node.module)
                    for alias in node.names:
                        if alias.name == "*" or hasattr(module, alias.name):
                            continue
                        try:
                            importlib.import_module(f"{node.module}.{alias.name}")
                        except ImportError:
                            missing.append(f"{path.relative_to(root)}:{node.lineno}: {node.module}.{alias.name}")
        self.assertEqual(missing, [])
