"""`Finding`: one problem `lamsonfilter check` reports, with a stable ID, a severity and a fix.

Shared by the application checks (`lamsonfilter.check`) and the Postfix checks
(`lamsonfilter.check.postfix`)::

    Finding("PF111", "error", "the reinjection listener ... loops", "add '-o content_filter=' ...")
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Finding"]


@dataclass(frozen=True)
class Finding:
    id: str
    severity: str  # "error" | "warning"
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.id} {self.severity}: {self.message}\n    fix: {self.fix}"
