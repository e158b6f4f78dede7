"""Recognising mail the content filter reinjected when it comes back: the trace field.

A reinjection listener that filters again (PF111, e.g. ``-o content_filter=``
lost from the 10026 service and ``postfix reload``) sends every message
the filter reinjects straight back to it; Postfix stops the loop only at
``hopcount_limit`` (50 Received: lines), after 49 passes through the
handlers.  So ``smtpproxy`` puts one field on top of what it reinjects:

    X-Lamsonfilter-Trace: v1 3f9a0c...e2   (HMAC-SHA256 of the envelope, 32 hex digits)

The MAC covers the envelope the message is reinjected with (sender and
the sorted recipients) under a secret key kept next to the quarantine
(``trace.key``, 32 random bytes, mode 0600, made on first use).  A message
that arrives with a field matching its own envelope was reinjected by this
filter (or one sharing its key) for the very same recipients: it has come
back.  The same message reaching the filter again for *other* recipients
(a ``.forward`` to a list address, a list that is a member of another) does
not match and is processed as new mail.  Nobody without the key can make
a message look like a loop (or like one that may pass).

What happens to a message that came back (`TraceKey.came_back`), chosen
so that nothing is lost and nothing loops:

* while the Postfix set-up loops (the loop guard of
  `lamsonfilter.contentfilter.postfix` finds PF111), or when the filter has no
  ``--postfix-config`` to ask: ``451 4.4.6``, one ERROR line with the queue
  id, and ``lamsonfilter_loops_total`` counts it.  Postfix keeps the message
  in its queue (deferred) and retries it with its backoff -- one pass per
  retry, not 49 in a row.
* once the guard finds the set-up fixed (after ``postfix reload``; a SIGHUP
  to the filter asks at once): the message is passed on unchanged, without
  running the handlers again (they ran on its first pass), and is delivered.
  Without ``--postfix-config`` the filter cannot know the set-up was fixed:
  the held messages then need ``postsuper -d`` (the first pass already
  delivered their processed copy's effects) or a filter started with it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import time
from pathlib import Path
from typing import Sequence

from ..mail import header_end
from ..replies import MAIL_LOOP

__all__ = ["TraceKey", "TRACE_FIELD", "LOOP_REPLY"]

TRACE_FIELD = b"X-Lamsonfilter-Trace"
LOOP_REPLY = MAIL_LOOP.line
_FIELD_RX = re.compile(rb"^X-Lamsonfilter-Trace:[ \t]*v1[ \t]+([0-9a-f]{32})[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)
#: Only this much of the top of a message is searched for trace fields.
HEAD_LIMIT = 256 * 1024


class TraceKey:
    """The secret the trace fields are made with (one file, shared by the workers)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._key = self._load()

    def __repr__(self) -> str:
        return f"TraceKey({str(self.path)!r})"

    def _load(self) -> bytes:
        """Read the key, making it first if there is none (O_EXCL: two workers agree on one key)."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(32))
                f.flush()
                os.fsync(f.fileno())
        for _ in range(50):  # bounded: another worker may be writing it this very moment
            key = self.path.read_bytes()
            if len(key) >= 32:
                return key
            time.sleep(0.01)
        raise OSError(f"{self.path}: the trace key is shorter than 32 bytes; remove it to make a new one")

    def mac(self, sender: str, recipients: Sequence[str]) -> str:
        text = "\0".join([sender.lower(), *sorted(r.lower() for r in recipients)])
        return hmac.new(self._key, text.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:32]

    def field(self, sender: str, recipients: Sequence[str]) -> bytes:
        """The line to put on top of a reinjected message (CRLF included)."""
        return TRACE_FIELD + b": v1 " + self.mac(sender, recipients).encode("ascii") + b"\r\n"

    def came_back(self, head: bytes, sender: str, recipients: Sequence[str]) -> bool:
        """Does the message (its first bytes) carry our field for exactly this envelope?"""
        top = head[: min(header_end(head), HEAD_LIMIT)]  # the header block only (no copy of the body)
        found = [m.group(1).lower() for m in _FIELD_RX.finditer(top)]
        if not found:
            return False
        want = self.mac(sender, recipients).encode("ascii")
        return any(hmac.compare_digest(f, want) for f in found)
