"""The content filter's quarantine: a Maildir that keeps messages nobody should get, durably.

In after-queue mode a reject decided after DATA cannot be a ``5xx``: Postfix
would bounce it to the envelope sender, which may be forged (backscatter).
``smtpproxy`` therefore discards the rejected recipients
and keeps a copy here instead; the same happens for an explicit
``ctx.quarantine(reason)``.

    q = Quarantine("/var/lib/lamsonfilter/quarantine")
    name = q.store(spool, reason="python@lists.example.org: 550 5.7.1 not a member",
                   queue_id="4XyzAbc")

Each message becomes one file in ``new/`` (any mail reader opens the
directory), with lamsonfilter's fields in front of the original bytes:

    X-Lamsonfilter-Quarantine: poison message: ...      why it is here
    X-Lamsonfilter-Queue-Id: 4XyzAbc                    Postfix's queue id
    X-Lamsonfilter-Envelope-From: <alice@example.com>   MAIL FROM (``<>`` for the null sender)
    X-Lamsonfilter-Envelope-To: <bob@example.net>       one field per RCPT TO, Bcc included

The envelope addresses are xtext-encoded (RFC 3461: every byte outside
printable ASCII, ``+`` and ``=`` as ``+XX``), so any address fits one
header line and reads back exactly.  `Quarantine.load` returns the fields
and the original bytes; ``lamsonfilter quarantine release`` (module
`lamsonfilter.cli.quarantine`) sends them to the reinjection listener with
the saved envelope.  The write is atomic and durable before ``smtpproxy``
answers ``250`` (nothing lost once answered): written to ``tmp/``, fsynced, renamed
into ``new/``, directory fsynced.  Any ``OSError`` propagates; the caller
answers ``451`` and Postfix retries.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Sequence

from ..mailqueue.maildir import unique_name as _unique_name, write_durably
from ..smtpwire import xtext_decode, xtext_encode
from .spool import Spool

__all__ = ["Quarantine", "QuarantinedMessage", "QuarantineError"]

_FIELD = b"X-Lamsonfilter-"
_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._,:=\\-]*\Z")


class QuarantineError(Exception):
    """A quarantined message that does not exist or cannot be read (the text says which)."""


@dataclass(frozen=True)
class QuarantinedMessage:
    """One file of the quarantine: lamsonfilter's fields and the original message."""

    name: str
    path: Path
    reason: str
    queue_id: str
    sender: str | None  # None: stored without an envelope (before envelopes were kept)
    recipients: tuple[str, ...]
    raw: bytes
    stored_at: float
    size: int = -1  # of the whole message (`raw` may be only its start: `Quarantine.load`'s `max_bytes`)

    @property
    def has_envelope(self) -> bool:
        return self.sender is not None and bool(self.recipients)

_UNSAFE = re.compile(r"[\x00-\x1f\x7f]+")


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

    def store(self, content: bytes | Spool, reason: str, queue_id: str | None = None,
              sender: str | None = None, recipients: Sequence[str] = ()) -> str:
        """Keep one message with its envelope (`sender` None: none kept); returns its file name in ``new/``."""
        self.ensure()
        name = _unique_name()
        tmp = self.path / "tmp" / name
        head = (
            f"X-Lamsonfilter-Quarantine: {_header_text(reason)}\r\n"
            f"X-Lamsonfilter-Queue-Id: {_header_text(queue_id or 'unknown')}\r\n"
        )
        if sender is not None:
            head += f"X-Lamsonfilter-Envelope-From: <{xtext_encode(sender)}>\r\n"
            head += "".join(f"X-Lamsonfilter-Envelope-To: <{xtext_encode(r)}>\r\n" for r in recipients)

        def write(f: BinaryIO) -> None:
            f.write(head.encode("utf-8"))
            if isinstance(content, bytes):
                f.write(content)
            else:
                for block in content.chunks():
                    f.write(block)

        write_durably(tmp, self.path / "new" / name, write, exclusive=True)
        return name

    # ------------------------------------------------------------------ reading (the CLI)
    def names(self) -> list[str]:
        """The messages kept, oldest first (``new/`` and ``cur/``)."""
        found: list[tuple[float, str]] = []
        for sub in ("new", "cur"):
            d = self.path / sub
            if not d.is_dir():
                continue
            for entry in d.iterdir():
                if entry.is_file() and not entry.name.startswith("."):
                    found.append((entry.stat().st_mtime, entry.name))
        return [name for _, name in sorted(found)]

    def _find(self, name: str) -> Path:
        if not _NAME.match(name):
            raise QuarantineError(f"{name!r} is not the name of a quarantined message")
        for sub in ("new", "cur"):
            path = self.path / sub / name
            if path.is_file():
                return path
        raise QuarantineError(f"no message {name} in the quarantine {self.path}")

    def load(self, name: str, max_bytes: int | None = None) -> QuarantinedMessage:
        """Read one message: lamsonfilter's fields, the envelope and the original bytes (only
        about the first `max_bytes` of them when given: enough to list or show a header)."""
        path = self._find(name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode):
                    raise QuarantineError(f"{path} is not a regular file")
                os.set_blocking(fd, True)
                data = f.read() if max_bytes is None else f.read(max_bytes + 64 * 1024)
            stored_at = st.st_mtime
        except OSError as exc:
            raise QuarantineError(f"{path}: {exc.strerror or exc}") from None
        fields: list[tuple[str, str]] = []
        pos = 0
        while data.startswith(_FIELD, pos):
            end = data.find(b"\n", pos)
            if end < 0:
                break
            line = data[pos:end].rstrip(b"\r").decode("utf-8", "replace")
            key, _, value = line.partition(":")
            fields.append((key[len("X-Lamsonfilter-"):].lower(), value.strip()))
            pos = end + 1
        get = dict(fields).get
        sender = get("envelope-from")
        return QuarantinedMessage(
            name=name, path=path, reason=get("quarantine", ""), queue_id=get("queue-id", "unknown"),
            sender=None if sender is None else _unbracket(sender),
            recipients=tuple(_unbracket(v) for k, v in fields if k == "envelope-to"),
            raw=data[pos:], stored_at=stored_at, size=st.st_size - pos,
        )

    def remove(self, name: str) -> None:
        """Delete one message for good (fsyncs the directory)."""
        path = self._find(name)
        path.unlink()
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _unbracket(value: str) -> str:
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1]
    return xtext_decode(value)


def _header_text(value: str) -> str:
    """One header line's worth: control characters squeezed to a space, at most 900 characters."""
    return _UNSAFE.sub(" ", value)[:900]
