"""Poison messages: mail that kills the filter process again and again.

A message that takes the whole filter down (a segfault in a C library,
the kernel's OOM killer, ``os._exit`` in a handler) would otherwise be
retried by Postfix until ``maximal_queue_lifetime`` (5 days), costing a
crash and a restart each time, and taking the other messages in flight
down with it (Haraka #2284).  `AttemptLog` counts, durably, the attempts
at one message that never came to an end in the process that began them;
the content filter quarantines the message, with its envelope, once the
count passes ``POISON_LIMIT`` (settings, default 5):

    attempts = AttemptLog(Path("var/attempts"))
    n = attempts.begin(key)        # written *before* the handlers run: a kill still counts
    ...                            # run the handlers
    attempts.clear(key)            # a final answer (250, quarantine): forget the message
    attempts.forgive(key, n)       # the attempt ended here, with a 451 (a handler exception,
                                   # the deadline, the database, the reinjection listener)

Only a dead process leaves its attempt counted.  A handler that raises,
or outlasts the deadline, ends its attempt with a ``451`` in a process
that goes on: the attempt is forgiven, the message stays in Postfix's
queue and is retried until the handler is fixed (or Postfix gives up after
``maximal_queue_lifetime``).  A bad deploy that breaks every message must
keep the mail where the administrator can get it back, not move it out of
the queue.

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

from ..mailqueue.maildir import write_durably

__all__ = ["DEFAULT_LIMIT", "AttemptLog"]

#: Attempts that died with the process before a message is quarantined.
DEFAULT_LIMIT = 5

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
