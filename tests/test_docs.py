"""The documentation is valid reStructuredText: README.rst and docs/*.rst render without a warning."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.rst", *sorted((ROOT / "docs").glob("*.rst"))]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_renders_without_warnings(path: Path) -> None:
    from docutils.core import publish_doctree

    messages = io.StringIO()
    publish_doctree(path.read_text(encoding="utf-8"), source_path=str(path),
                    settings_overrides={"warning_stream": messages, "report_level": 2, "halt_level": 5})
    assert messages.getvalue() == "", messages.getvalue()


def test_a_broken_table_is_reported() -> None:
    """The check above can fail: a table whose columns do not line up is a warning."""
    from docutils.core import publish_doctree

    messages = io.StringIO()
    broken = "====  ====\na     b\n====  ====\nlonger than the column  x\n====  ====\n"
    publish_doctree(broken, settings_overrides={"warning_stream": messages, "report_level": 2, "halt_level": 5})
    assert "ERROR" in messages.getvalue() or "WARNING" in messages.getvalue()
