"""What the content filter reads from Postfix's configuration (``smtpproxy --postfix-config DIR``).

Two things, both about not losing mail:

* **The size limit.**  Postfix's smtp client bounces a message larger than
  the SIZE its next hop announces (``dsn=5.3.4 ... exceeds size limit``).
  The filter announces ``max(--max-size, message_size_limit)``, read with
  ``postconf -c DIR -h message_size_limit``, so every message Postfix
  accepted fits (`size_limit`).
* **The loop guard.**  The errors ``lamsonfilter check`` reports for the
  Postfix side (PF111: a reinjection listener without ``-o content_filter=``
  sends the mail back to the filter) refuse the start, and are looked for
  again at every reload (SIGHUP): a ``postfix reload`` can break a set-up
  that was fine at start.  `PostfixGuard` runs the checks (the functions of
  `lamsonfilter.check`, not a copy) and remembers the answer for a few
  seconds, for `lamsonfilter.contentfilter.looptrace`, which asks it whether a message that
  came back may now be passed on.

    limit = size_limit(Path("/etc/postfix"))            # None when Postfix has no limit (0)
    guard = PostfixGuard(Path("/etc/postfix"), lambda: runtime.app.settings)
    errors = guard.refresh()                            # [Finding(...)], logged by the caller

Reading fails with `StartupError` naming the directory (``postconf``
missing, no main.cf): a filter told to follow a configuration it cannot read
does not start.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from ..app import StartupError

__all__ = ["size_limit", "PostfixGuard", "GUARD_TTL", "describe"]

log = logging.getLogger("lamsonfilter.smtpproxy")

#: How long a loop-guard answer is reused (seconds); SIGHUP asks again at once.
GUARD_TTL = 5.0


def _postconf() -> str:
    exe = shutil.which("postconf") or ("/usr/sbin/postconf" if Path("/usr/sbin/postconf").exists() else None)
    if exe is None:
        raise StartupError("--postfix-config: postconf not found (is Postfix installed?)")
    return exe


def size_limit(config_dir: Path) -> int | None:
    """Postfix's ``message_size_limit`` in `config_dir` (its default when main.cf does not set it);
    None when it is 0 (no limit)."""
    try:
        proc = subprocess.run(  # noqa: S603 -- argv list, no shell
            [_postconf(), "-c", str(config_dir), "-h", "message_size_limit"],
            capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise StartupError(f"--postfix-config {config_dir}: cannot run postconf: {exc}") from None
    text = proc.stdout.strip()
    if proc.returncode != 0 or not text.isdigit():
        why = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"message_size_limit = {text!r}"
        raise StartupError(f"--postfix-config {config_dir}: cannot read message_size_limit: {why}")
    value = int(text)
    return value or None


class PostfixGuard:
    """The loop guard's errors for one Postfix configuration, cached for `GUARD_TTL` seconds."""

    def __init__(self, config_dir: Path, settings: Callable[[], Mapping[str, Any]]) -> None:
        self.config_dir = config_dir
        self._settings = settings
        self._lock = threading.Lock()
        self._errors: list[Any] = []
        self._checked = float("-inf")

    def refresh(self) -> list[Any]:
        """Run the checks now (blocking: several postconf calls); the error findings."""
        from ..check import check_postfix

        errors = [f for f in check_postfix(str(self.config_dir), self._settings()) if f.severity == "error"]
        with self._lock:
            self._errors, self._checked = errors, time.monotonic()
        return errors

    def errors(self) -> list[Any]:
        """The error findings, from the cache when it is fresh (blocking otherwise)."""
        with self._lock:
            if time.monotonic() - self._checked < GUARD_TTL:
                return list(self._errors)
        return self.refresh()

    def loops(self) -> bool:
        """Does the configuration send reinjected mail back to the filter (PF111), or is it unreadable?"""
        return any(f.id in ("PF111", "PF001") for f in self.errors())


def describe(findings: list[Any]) -> str:
    """One line for a log or a StartupError: ``PF111: ... (fix: ...); ...``."""
    return "; ".join(f"{f.id}: {f.message} (fix: {f.fix})" for f in findings)
