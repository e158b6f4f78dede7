"""Poison messages: mail that crashes or outlasts the filter again and again (reliability R15).

A message whose handler always raises, always runs past the deadline, or
kills the filter process outright would otherwise be retried by Postfix
until ``maximal_queue_lifetime`` (5 days), costing a crash each time
(Haraka #2284).  `AttemptLog` counts, durably, the attempts at one message
that ended without a final answer; the content filter quarantines the
message once the count reaches ``POISON_LIMIT`` (settings, default 5):

    attempts = AttemptLog(Path("var/attempts"))
    n = attempts.begin(key)        # written *before* the handlers run: a kill still counts
    ...                            # run the handlers
    attempts.clear(key)            # a final answer (250, quarantine): forget the message
    attempts.forgive(key, n)       # not the message's fault (database down, reinjection
                                   # refused, the handler asked to retry): undo this attempt

The key is the replay key of `lamsonfilter.smtpproxy` (XFORWARD IDENT plus
the recipients), so Postfix's retries of one queue file share one count.
Each key is one small file, written to a temporary name and renamed: a
count survives ``kill -9`` and any crash of the process (the kernel keeps
what was written).  It is not fsynced: after a power loss a count may be
one short, which delays the quarantine by one attempt, while an fsync per
routed message would cost more than the rest of its handling.
Any ``OSError`` propagates; the caller answers ``451`` and Postfix retries.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

from .decisions import Decision
from .quarantine import write_durably

__all__ = ["DEFAULT_LIMIT", "AttemptLog", "counts_as_crash"]

#: Attempts that end in a crash or a timeout before a message is quarantined.
DEFAULT_LIMIT = 5

#: Exceptions of the state store (`lamsonfilter.state.StorageError` and its kinds): the
#: database, not the message, is at fault, so such a tempfail is no attempt.
_TRANSIENT = ("StorageError: ", "ConflictError: ", "SchemaMissingError: ")


def counts_as_crash(decision: Decision) -> bool:
    """True when a tempfail decision came from an unexpected error that the message may cause.

    A handler's own ``ctx.tempfail()`` (no ``error``) and a state-store
    failure are retried without counting: only a crash is held against
    the message.
    """
    if decision.error is None:
        return False
    return not any(name in decision.error for name in _TRANSIENT)


class AttemptLog:
    """One file per message key under `path` (created on first use, mode 0700)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"AttemptLog({str(self.path)!r})"

    def _file(self, key: str) -> Path:
        return self.path / hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:40]

    def count(self, key: str) -> int:
        """Attempts recorded for `key` (0 when none)."""
        try:
            text = self._file(key).read_text(encoding="utf-8")
        except FileNotFoundError:
            return 0
        try:
            return max(0, int(text.split(" ", 1)[0]))
        except ValueError:
            return 0

    def begin(self, key: str) -> int:
        """Record one more attempt, durably; return the count including it."""
        n = self.count(key) + 1
        self._write(key, n)
        return n

    def forgive(self, key: str, n: int) -> None:
        """Undo attempt `n` (as returned by `begin`): it ended for a reason that is not the message's."""
        if n <= 1:
            self.clear(key)
        else:
            self._write(key, n - 1)

    def clear(self, key: str) -> None:
        """Forget `key` (the message got its final answer)."""
        try:
            self._file(key).unlink()
        except FileNotFoundError:
            pass

    def purge(self, older_than: float, now: float | None = None) -> int:
        """Remove counts not touched for `older_than` seconds (their messages left the queue)."""
        if not self.path.is_dir():
            return 0
        limit = (time.time() if now is None else now) - older_than
        removed = 0
        for entry in self.path.iterdir():
            try:
                if entry.is_file() and entry.stat().st_mtime < limit:
                    entry.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def _write(self, key: str, n: int) -> None:
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        final = self._file(key)
        tmp = final.with_name(f"{final.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        line = f"{n} {key[:400]}\n".encode("utf-8", "surrogateescape")
        # no fsync: a count must survive the *process* (a kill -9, a crash in a handler), and
        # the kernel keeps written data when a process dies; after a power loss, one count
        # lost only delays the quarantine by one attempt -- not worth an fsync per message
        write_durably(tmp, final, lambda f: f.write(line), sync=False)
