"""The content filter's quarantine: a Maildir that keeps messages nobody should get, durably.

In after-queue mode a reject decided after DATA cannot be a ``5xx``: Postfix
would bounce it to the envelope sender, which may be forged (backscatter,
reliability A4).  ``smtpproxy`` therefore discards the rejected recipients
and keeps a copy here instead; the same happens for an explicit
``ctx.quarantine(reason)``.

    q = Quarantine("/var/lib/lamsonfilter/quarantine")
    name = q.store(spool, reason="python@lists.example.org: 550 5.7.1 not a member",
                   queue_id="4XyzAbc")

Each message becomes one file in ``new/`` (any mail reader opens the
directory), with ``X-Lamsonfilter-Quarantine`` and
``X-Lamsonfilter-Queue-Id`` in front of the original bytes.  The write is
atomic and durable before ``smtpproxy`` answers ``250`` (reliability R6):
written to ``tmp/``, fsynced, renamed into ``new/``, directory fsynced.  Any
``OSError`` propagates; the caller answers ``451`` and Postfix retries.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import BinaryIO, Callable

from .spool import Spool

__all__ = ["Quarantine"]

_UNSAFE = re.compile(r"[\x00-\x1f\x7f]+")
_counter_lock = threading.Lock()
_counter = 0


class Quarantine:
    """A Maildir (``cur``, ``new``, ``tmp``), created on first use."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Quarantine({str(self.path)!r})"

    def ensure(self) -> None:
        """Create the Maildir (mode 0700); raise OSError naming the problem."""
        for sub in ("tmp", "new", "cur"):
            (self.path / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        if not os.access(self.path / "tmp", os.W_OK):
            raise PermissionError(f"quarantine {self.path} is not writable")

    def store(self, content: bytes | Spool, reason: str, queue_id: str | None = None) -> str:
        """Keep one message; returns its file name in ``new/``."""
        self.ensure()
        name = _unique_name()
        tmp = self.path / "tmp" / name
        head = (
            f"X-Lamsonfilter-Quarantine: {_header_text(reason)}\r\n"
            f"X-Lamsonfilter-Queue-Id: {_header_text(queue_id or 'unknown')}\r\n"
        ).encode("utf-8")

        def write(f: BinaryIO) -> None:
            f.write(head)
            if isinstance(content, bytes):
                f.write(content)
            else:
                for block in content.chunks():
                    f.write(block)

        write_durably(tmp, self.path / "new" / name, write, exclusive=True)
        return name


def _header_text(value: str) -> str:
    """One header line's worth: control characters squeezed to a space, at most 900 characters."""
    return _UNSAFE.sub(" ", value)[:900]


def _unique_name() -> str:
    """Maildir's unique name: time, pid and a counter, and the host name."""
    global _counter
    with _counter_lock:
        _counter += 1
        n = _counter
    now = time.time()
    host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
    return f"{int(now)}.M{int((now % 1) * 1e6)}P{os.getpid()}Q{n}.{host}"


def write_durably(tmp: Path, final: Path, write: Callable[[BinaryIO], object], exclusive: bool = False,
                  sync: bool = True) -> None:
    """Write `tmp` with `write`, fsync it, rename it to `final`, fsync the directory: after
    this returns the file survives a crash or power loss (R6); on failure `tmp` is removed.
    With `sync=False` the file is whole or absent after a process crash (the rename is
    atomic), but a power loss may lose it: no fsync."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC), 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    if not sync:
        return
    dfd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
