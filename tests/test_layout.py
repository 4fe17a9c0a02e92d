"""The package's layout: no import cycle (imports inside functions included), no private name taken across
modules, and the layer contract in pyproject.toml (``lint-imports``) kept."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lispetorch"


def _graph():
    sys.path.insert(0, str(ROOT))
    try:
        return grimp.build_graph("lispetorch", include_external_packages=False, cache_dir=None)
    finally:
        sys.path.remove(str(ROOT))


def _cycle(graph) -> list[str] | None:
    """A cycle among the package's modules (depth-first search), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.find_modules_directly_imported_by(m)):
            if n == m:
                continue
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph.modules):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle_counting_imports_inside_functions():
    graph = _graph()
    assert "lispetorch.dispatch" in graph.modules and len(graph.modules) > 30
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_graph_counts_imports_inside_functions(tmp_path, monkeypatch):
    pkg = tmp_path / "probe_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from . import b\n    return b\n")
    (pkg / "b.py").write_text("from . import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    graph = grimp.build_graph("probe_pkg", cache_dir=None)
    assert "probe_pkg.b" in graph.find_modules_directly_imported_by("probe_pkg.a")
    assert _cycle(graph) is not None


def test_the_cycle_search_finds_a_cycle():
    class Graph:
        modules = {"a", "b", "c"}
        edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}}

        def find_modules_directly_imported_by(self, m):
            return self.edges[m]

    assert _cycle(Graph()) == ["a", "b", "c", "a"]


def _private_imports(path: Path) -> list[str]:
    """``from <package module> import _name`` in a Python file, except the package's own ``_C`` loader."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("lispetorch")):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {alias.name}")
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for m in modules:
                if m.startswith("lispetorch") and any(p.startswith("_") for p in m.split(".")[1:]):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {m}")
    return found


_HY_IMPORT = re.compile(r"lispetorch(?:[./][\w-]+)*[./](_[\w-]+)|lispetorch[\w./-]*\s+\[([^\]]*)\]")


def _private_hy_imports(path: Path) -> list[str]:
    found = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        for m in _HY_IMPORT.finditer(line.split(";", 1)[0]):
            names = [m.group(1)] if m.group(1) else m.group(2).split()
            found += [f"{path.relative_to(ROOT)}:{lineno}: {n}" for n in names if n.startswith("_")]
    return found


def test_no_private_name_taken_across_modules():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += _private_imports(path)
    for path in sorted(PACKAGE.rglob("*.hy")):
        found += _private_hy_imports(path)
    assert not found, "\n".join(found)


def test_the_private_name_checks_see_what_they_look_for(tmp_path):
    py = PACKAGE / "_probe_layout.py"  # a file of the package's own, removed at once
    hy = PACKAGE / "_probe_layout.hy"
    try:
        py.write_text("from .model import _replace\nimport lispetorch._atomic\nfrom . import ops\n")
        hy.write_text("(import lispetorch.model [_replace inject])\n(lispetorch._atomic.write-text 1 2)\n")
        assert [f.rsplit(": ", 1)[1] for f in _private_imports(py)] == ["_replace", "lispetorch._atomic"]
        assert [f.rsplit(": ", 1)[1] for f in _private_hy_imports(hy)] == ["_replace", "_atomic"]
    finally:
        py.unlink(missing_ok=True)
        hy.unlink(missing_ok=True)


@pytest.mark.skipif(shutil.which("lint-imports", path=str(Path(sys.executable).parent)) is None,
                    reason="import-linter is a test extra")
def test_layer_contract_is_kept():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    result = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout
