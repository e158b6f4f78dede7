"""No import cycle inside the lamsonfilter package.

The import graph is read with `ast` from the sources: every ``import`` and
``from ... import``, at module level, inside functions and under ``if
TYPE_CHECKING:`` alike (a type-only import is still a module that knows
another one).  A cycle is a strongly connected component of more than one
module; the test names it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lamsonfilter"

#: Cycles tolerated for now (each entry must still be a cycle: the test fails
#: once one is broken, so the entry is removed then).  None are left.
KNOWN: set[frozenset[str]] = set()


def _modules(root: Path) -> dict[str, Path]:
    mods = {}
    for path in root.rglob("*.py"):
        if "skeleton" in path.relative_to(root).parts:
            continue  # the `lamsonfilter gen` templates are not part of the package
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module name -> the package's modules it imports (parents implied by a dotted name not counted)."""
    mods = _modules(root)
    graph: dict[str, set[str]] = {name: set() for name in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            graph[name].update(c for c in candidates if c in mods and c != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(frozenset(component))
    return found


def test_the_package_has_no_import_cycle() -> None:
    found = set(cycles(import_graph()))
    new = [sorted(c) for c in found - KNOWN]
    assert not new, f"import cycles: {new}"
    assert not KNOWN - found, f"no longer cycles, remove them from KNOWN: {[sorted(c) for c in KNOWN - found]}"


def test_the_check_finds_a_cycle(tmp_path: Path) -> None:
    """The detector itself: two modules that import each other, one of them only for types."""
    pkg = tmp_path / "lamsonfilter"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..a import X\n")
    (pkg / "c.py").write_text("def f():\n    from lamsonfilter import a\n")
    assert cycles(import_graph(pkg)) == [frozenset({"lamsonfilter.a", "lamsonfilter.sub.b"})]
