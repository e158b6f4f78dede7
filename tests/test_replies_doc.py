"""docs/design.rst's reply table is `lamsonfilter.replies.TABLE`, row for row."""

from __future__ import annotations

import re
from pathlib import Path

from lamsonfilter.replies import TABLE

DESIGN = Path(__file__).resolve().parents[1] / "docs" / "design.rst"


def documented_rows(text: str) -> list[tuple[str, ...]]:
    """The rows of the ``list-table`` titled with lamsonfilter/replies.py, header row left out."""
    start = text.index(".. list-table:: lamsonfilter's replies")
    body = text[start:].split("\n\n", 2)[1]
    rows = []
    for item in re.split(r"^   \* ", body, flags=re.MULTILINE)[1:]:
        cells = [c.strip() for c in re.split(r"^\s*- ", item, flags=re.MULTILINE) if c.strip()]
        rows.append(tuple(" ".join(c.split()) for c in cells))
    return rows[1:]


def test_the_design_documents_every_reply_as_the_code_gives_it() -> None:
    expected = [(f"``{r.name}``", str(r.code), r.enhanced, r.text, r.when) for r in TABLE]
    assert documented_rows(DESIGN.read_text()) == expected
