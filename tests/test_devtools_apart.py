"""The development tools stay apart from the product (lamsonfilter/devtools/__init__.py).

No product module imports lamsonfilter.devtools, except the fault-point hook
(`lamsonfilter.devtools.faults`, called by the two transports) and the
``demo`` command, which imports the demo only when it runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lamsonfilter"

#: (module, imported name) pairs allowed to cross into the development tools.
SEAMS = {("devtools", "faults"), ("devtools.demo", "Demo"), ("devtools.demo", "DemoError"),
         ("devtools.demo", "stop_leftovers")}


def _devtools_imports(path: Path) -> list[tuple[str, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and "devtools" in node.module:
            module = node.module.split("lamsonfilter.")[-1]
            found += [(module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names if "devtools" in alias.name]
    return found


def test_product_modules_import_only_the_fault_hook_from_devtools() -> None:
    crossings = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "devtools" in path.relative_to(PACKAGE).parts:
            continue
        bad = [pair for pair in _devtools_imports(path) if pair not in SEAMS]
        if bad:
            crossings[str(path.relative_to(PACKAGE))] = bad
    assert crossings == {}


def test_the_check_finds_a_crossing(tmp_path: Path) -> None:
    module = tmp_path / "x.py"
    module.write_text("from .devtools.localpostfix import PrivatePostfix\nfrom .devtools import faults\n")
    assert [p for p in _devtools_imports(module) if p not in SEAMS] == [("devtools.localpostfix", "PrivatePostfix")]
