"""Imports flow one way: a robkit package imports only packages below it (imports inside functions too).

The order is written at the top of the README's style notes; this test reads every module's AST, so a
lazy import inside a function counts exactly like one at the top of the file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "robkit"

# Lowest first. Packages of one layer may not import each other either (a layer is one package
# apart from the bottom layer's helpers and package data).
LAYERS: list[set[str]] = [
    {"<root>", "utils", "catalogs"},
    {"catalog"},
    {"data"},
    {"models"},
    {"objectives"},
    {"teachers"},
    {"engine"},
    {"export"},
    {"evaluation"},
    {"report"},
    {"demo"},
    {"cli"},
    {"docs"},
]
LAYER_OF = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def _package(module: str) -> str:
    """``robkit.engine.trainer`` -> ``engine``; ``robkit`` -> ``<root>``; ``robkit.demo`` -> ``demo``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<root>"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every robkit module a file imports, absolute or relative, anywhere in the file."""
    name = _module_name(path)
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod == "robkit":  # `from robkit import teachers` imports the sub-package
                out += [(node.lineno, f"robkit.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, mod))
    return [(line, m) for line, m in out if m == "robkit" or m.startswith("robkit.")]


def _edges() -> list[tuple[str, str, str]]:
    """``(from package, to package, "file:line module")`` for every cross-package import."""
    edges = []
    for path in sorted(ROOT.rglob("*.py")):
        src = _package(_module_name(path))
        for line, mod in _imports(path):
            dst = _package(mod)
            if dst == "__version__":
                dst = "<root>"
            if dst != src:
                edges.append((src, dst, f"{path.relative_to(ROOT.parent)}:{line} imports {mod}"))
    return edges


def test_every_package_has_a_layer():
    packages = {_package(_module_name(p)) for p in ROOT.rglob("*.py")}
    assert packages <= set(LAYER_OF), f"add these packages to LAYERS: {sorted(packages - set(LAYER_OF))}"


def test_imports_only_go_down():
    upward = [
        where
        for src, dst, where in _edges()
        if dst in LAYER_OF and src in LAYER_OF and LAYER_OF[dst] >= LAYER_OF[src] and dst != "<root>"
    ]
    assert not upward, "imports that go up or sideways:\n" + "\n".join(upward)


def test_no_import_cycles_between_packages():
    graph: dict[str, set[str]] = {}
    for src, dst, _ in _edges():
        graph.setdefault(src, set()).add(dst)
    seen: set[str] = set()
    stack: list[str] = []

    def visit(node: str) -> None:
        if node in stack:
            pytest.fail("import cycle: " + " -> ".join(stack[stack.index(node) :] + [node]))
        if node in seen:
            return
        stack.append(node)
        for nxt in graph.get(node, ()):
            visit(nxt)
        stack.pop()
        seen.add(node)

    for node in graph:
        visit(node)


def test_the_walker_sees_lazy_and_relative_imports(tmp_path):
    # The checker itself must catch an import hidden inside a function and a relative one.
    pkg = tmp_path / "robkit" / "objectives"
    pkg.mkdir(parents=True)
    f = pkg / "x.py"
    f.write_text("def f():\n    from robkit.engine import trainer\n\nfrom ..engine import build\n")
    global ROOT
    old, ROOT = ROOT, tmp_path / "robkit"
    try:
        mods = [m for _, m in _imports(f)]
    finally:
        ROOT = old
    assert sorted(mods) == ["robkit.engine", "robkit.engine"]
