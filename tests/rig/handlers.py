"""Fixture handlers: the test applications' extra handler modules, kept as real
Python files in tests/fixtures/handlers/ and copied into a test application's
``app/handlers/`` by the rigs.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["HANDLERS_DIR", "handler_source"]

HANDLERS_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "handlers"


def handler_source(name: str) -> str:
    """The source of fixture handler module `name` (tests/fixtures/handlers/NAME.py)."""
    return (HANDLERS_DIR / f"{name}.py").read_text(encoding="utf-8")
