"""The message body as it arrives over SMTP: a bounded, smuggling-safe DATA reader and its `Spool`.

`read_data(reader, limits)` consumes what follows ``354`` on an asyncio
stream and returns a `Spool` holding the message bytes exactly as sent,
minus the SMTP transparency dots (RFC 5321 §4.5.2):

    spool = await read_data(reader, DataLimits(max_size=10_240_000))
    if spool.in_memory:
        raw = spool.getvalue()
    for chunk in spool.chunks():      # from the start, whether in RAM or on disk
        ...

Rules, each a reason this module exists instead of aiosmtpd's reader:

* **Only ``CRLF . CRLF`` ends DATA.**  A dot on a line ended by a bare LF or
  bare CR (``\\n.\\n``, ``\\r.\\r``, ``\\n.\\r\\n``, ``\\r\\n.\\n`` ...) is message
  content, never an end of data, so a client cannot smuggle a second
  message past the filter (CVE-2023-51764 family, CVE-2024-27305).
* **Memory is bounded.**  At most one unfinished line (`DataLimits.max_line`)
  is buffered; aiosmtpd 1.4.6 buffers a line without CRLF without bound
  (a memory exhaustion).  Messages larger than `DataLimits.memory` go to a
  temporary file; the total is capped by `DataLimits.hard_limit`.
* **Refusal is early.**  An over-long line or an oversize message raises
  `DataError` at once, carrying the SMTP reply; the caller sends it and
  closes the connection rather than reading on.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from dataclasses import dataclass
from typing import IO, Callable, Iterator

from .. import replies

__all__ = ["DataError", "DataLimits", "Spool", "read_data", "TERMINATOR"]

#: The only end of DATA (RFC 5321 §4.1.1.4): CRLF "." CRLF.  The CRLF that
#: ends the last content line belongs to the message.
TERMINATOR = b"\r\n.\r\n"

_READ_SIZE = 1 << 16


@dataclass(frozen=True)
class DataLimits:
    """How much one message may take.

    `max_size` is what the server announces as ``SIZE`` (RFC 1870); the
    bytes on the wire may exceed it by the CRLF line ends and transparency
    dots that the client's own count leaves out, so the hard cap allows
    1/8 more plus 64 KiB.  `max_line` is RFC 5321 §4.5.3.1.6's 1000 octets
    including CRLF, plus one transparency dot.
    """

    max_size: int = 10_240_000
    max_line: int = 1001
    memory: int = 1 << 20  # keep messages up to this size in RAM, spool larger ones

    @property
    def hard_limit(self) -> int:
        return self.max_size + self.max_size // 8 + 65536


class DataError(Exception):
    """The client broke a limit; `reply` is the SMTP reply to send before closing."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


LINE_TOO_LONG = replies.LINE_TOO_LONG.line
TOO_BIG = replies.TOO_BIG.line


class Spool:
    """Message bytes in RAM up to a threshold, then in an anonymous temporary file."""

    def __init__(self, memory: int = 1 << 20, directory: str | None = None) -> None:
        self._memory = memory
        self._directory = directory
        self._parts: list[bytes] = []
        self._file: IO[bytes] | None = None
        self.size = 0

    @classmethod
    def from_bytes(cls, data: bytes) -> "Spool":
        spool = cls(memory=max(len(data), 1))
        spool.write(data)
        return spool

    @property
    def in_memory(self) -> bool:
        return self._file is None

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.size += len(data)
        if self._file is None and self.size <= self._memory:
            self._parts.append(data)
            return
        if self._file is None:
            self._file = tempfile.TemporaryFile(dir=self._directory)  # unlinked: never left behind
            for part in self._parts:
                self._file.write(part)
            self._parts = []
        self._file.write(data)

    def getvalue(self) -> bytes:
        """All bytes at once (reads the file back when spooled)."""
        if self._file is None:
            if len(self._parts) > 1:
                self._parts = [b"".join(self._parts)]
            return self._parts[0] if self._parts else b""
        return b"".join(self.chunks())

    def chunks(self, size: int = 1 << 18) -> Iterator[bytes]:
        """The bytes from the start, in pieces of at most `size` (one piece when in RAM)."""
        if self._file is None:
            yield self.getvalue()
            return
        self._file.flush()
        self._file.seek(0)
        while True:
            block = self._file.read(size)
            if not block:
                return
            yield block

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._parts = []

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def read_data(
    reader: asyncio.StreamReader,
    limits: DataLimits = DataLimits(),
    spool_dir: str | None = None,
    progress: Callable[[], None] | None = None,
) -> Spool:
    """Read one message after ``354`` up to the terminator; see the module docstring.

    Raises `DataError` (limit broken: reply, then close) or
    `asyncio.IncompleteReadError` (the client went away).  `progress`, if
    given, is called with no arguments after every chunk (e.g. to push an
    idle timeout back).
    """
    spool = Spool(limits.memory, spool_dir)
    pending = b""  # bytes after the last CRLF seen: one unfinished line at most
    at_start = True  # `pending` starts at the beginning of a line (always true: we cut at CRLF)
    wire = 0
    try:
        while True:
            chunk = await reader.read(_READ_SIZE)
            if not chunk:
                raise asyncio.IncompleteReadError(pending, None)
            if progress is not None:
                progress()
            wire += len(chunk)
            if wire > limits.hard_limit:
                raise DataError(TOO_BIG)
            buf = pending + chunk if pending else chunk
            # The terminator is a line that is exactly ".": either the buffer
            # starts with ".\r\n" (at a line start) or CRLF.CRLF occurs inside.
            if at_start and buf.startswith(b".\r\n"):
                end = 0
            else:
                pos = buf.find(TERMINATOR)
                end = pos + 2 if pos >= 0 else -1
            if end >= 0:
                _check_lines(buf, end, limits.max_line)
                spool.write(_unstuff(buf[:end]))
                # anything after the terminator is the client's next command:
                # give it back to the reader (pipelined QUIT/MAIL)
                rest = buf[end + 3:]
                if rest:
                    reader._buffer[:0] = rest  # type: ignore[attr-defined]
                return spool
            cut = buf.rfind(b"\r\n")
            if cut < 0:
                if len(buf) > limits.max_line:
                    raise DataError(LINE_TOO_LONG)
                pending = buf
                continue
            complete, pending = buf[: cut + 2], buf[cut + 2:]
            if len(pending) > limits.max_line:
                raise DataError(LINE_TOO_LONG)
            _check_lines(complete, len(complete), limits.max_line)
            spool.write(_unstuff(complete))
    except BaseException:
        spool.close()
        raise


def _check_lines(buf: bytes, end: int, max_line: int) -> None:
    """Raise `DataError` if a CRLF-terminated line in ``buf[:end]`` is longer than `max_line`."""
    if end <= max_line - 2:
        return
    longest = max(map(len, buf[:end].split(b"\r\n")))
    if longest + 2 > max_line:
        raise DataError(LINE_TOO_LONG)


def _unstuff(lines: bytes) -> bytes:
    """Remove the transparency dot of every line that starts with one (RFC 5321 §4.5.2)."""
    if b"\r\n." in lines:
        lines = lines.replace(b"\r\n.", b"\r\n")
    if lines.startswith(b"."):
        lines = lines[1:]
    return lines


def spool_directory(path: str | None) -> str | None:
    """Check a spool directory (``None``: the system default); return it or raise ValueError."""
    if path is None:
        return None
    if not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"spool directory {path} does not exist or is not writable")
    return path
