"""Reinjection: the content filter's careful SMTP client to the MTA's second listener.

``smtpproxy`` answers Postfix's final ``.`` with ``250`` only after this
client saw the reinjection listener (Postfix's 127.0.0.1:10026 smtpd, or
Exim's) accept the message for **every** recipient:

    reinjector = Reinjector("127.0.0.1", 10026)
    await reinjector.send(Transaction(sender="", recipients=("bob@example.net",),
                                      data=spool, xforward={"IDENT": "4Xyz"}))
    # returned: accepted, with the listener's reply ("250 2.0.0 Ok: queued as 5AbcD");
    # ReinjectionError: answer 451 upstream.
    await reinjector.close()

What "careful" means (never a 250 for mail that went nowhere, bounded waits, no smuggling):

* The envelope is passed on exactly: ``MAIL FROM:<>`` stays ``<>``, every
  recipient is given, nothing is rebuilt from headers.  XFORWARD attributes
  are re-sent before every ``MAIL`` (the server resets them per transaction).
* A refused recipient is a failure even when others were accepted
  (``smtplib.sendmail`` would return quietly): the connection is then
  dropped **without** sending the final ``.``, so nothing is half-delivered.
* Content goes out CRLF-only and dot-stuffed after normalising (`stuff`),
  so no received bytes can end DATA early downstream.
* Connections are kept for the next message (RSET-free: a completed
  transaction is a clean state); a kept connection that the server closed
  meanwhile is replaced once, before anything was committed.  With
  PIPELINING, XFORWARD, MAIL, every RCPT and DATA go out in one write.

Errors surface as `ReinjectionError` (text for the log; the upstream
reply is always the caller's fixed ``451 4.3.0``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Mapping

from .spool import Spool, stuff

__all__ = ["Reinjector", "ReinjectionError", "Transaction", "xtext_encode", "xtext_decode", "XFORWARD_ATTRS"]

log = logging.getLogger("lamsonfilter.contentfilter.plan")

#: XFORWARD attributes (Postfix XFORWARD_README), in the order Postfix sends them.
XFORWARD_ATTRS = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")
#: A command line, CRLF included, stays within RFC 5321 §4.5.3.1.4's 512 octets.
_MAX_COMMAND = 512
#: How long an idle connection is kept.  Short, like Postfix's own connection cache
#: (smtp_connection_cache_time_limit, 2 s): each kept connection holds one of the
#: reinjection listener's smtpd processes (maxproc), which the outbox, other
#: workers and other filters need too.
IDLE_LIMIT = 2.0


class ReinjectionError(Exception):
    """The reinjection listener did not accept the message for every recipient."""


@dataclass(frozen=True)
class Transaction:
    """One reinjection: envelope, content and the attributes to forward."""

    sender: str
    recipients: tuple[str, ...]
    data: bytes | Spool
    xforward: Mapping[str, str] = field(default_factory=dict)
    smtputf8: bool = False
    eightbit: bool = False
    #: header lines sent before `data` (CRLF-terminated), e.g. `lamsonfilter.contentfilter.looptrace`'s trace field
    prefix: bytes = b""


def xtext_decode(value: str) -> str:
    """RFC 3461 §4 xtext: ``+XX`` is a hex-encoded byte."""
    if "+" not in value:
        return value
    out = bytearray()
    raw = value.encode("utf-8", "surrogateescape")
    i = 0
    while i < len(raw):
        if raw[i:i + 1] == b"+" and i + 3 <= len(raw):
            try:
                out.append(int(raw[i + 1:i + 3], 16))
                i += 3
                continue
            except ValueError:
                pass
        out.append(raw[i])
        i += 1
    return out.decode("utf-8", "surrogateescape")


def xtext_encode(value: str) -> str:
    """xtext-encode: printable ASCII except ``+`` and ``=`` as is, every other byte as ``+XX``."""
    raw = value.encode("utf-8", "surrogateescape")
    return "".join(chr(b) if 33 <= b <= 126 and b not in (43, 61) else f"+{b:02X}" for b in raw)


def _address(addr: str) -> bytes:
    """``<addr>`` as bytes; refuses anything that could inject a command (RFC 5321 §4.1.2; no SMTP command injection)."""
    if any(c in addr for c in "\r\n\x00"):
        raise ReinjectionError(f"refusing to send unsafe address {addr!r}")
    return b"<" + addr.encode("utf-8", "surrogateescape") + b">"


class _Connection:
    """One SMTP session with the reinjection listener."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.extensions: dict[str, str] = {}
        self.used = time.monotonic()

    async def reply(self) -> tuple[int, str]:
        """Read one (possibly multi-line) reply; EOF or garbage raises `ReinjectionError`."""
        code, lines = await self.reply_lines()
        return code, " ".join(lines)

    async def reply_lines(self) -> tuple[int, list[str]]:
        lines: list[str] = []
        while True:
            line = await self.reader.readline()
            if not line.endswith(b"\n"):
                raise ReinjectionError("connection closed by the reinjection listener")
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            if len(text) < 3 or not text[:3].isdigit():
                raise ReinjectionError(f"malformed reply {text[:80]!r}")
            lines.append(text[4:])
            if text[3:4] != "-":
                return int(text[:3]), lines

    async def command(self, line: bytes) -> tuple[int, str]:
        self.writer.write(line + b"\r\n")
        return await self.reply()

    def abort(self) -> None:
        """Drop the connection at once: no QUIT, and above all no final ``.``."""
        self.writer.transport.abort()

    @property
    def closing(self) -> bool:
        return self.writer.transport.is_closing() or self.reader.at_eof()


class Reinjector:
    """Sends messages to the reinjection listener; keeps a few connections for reuse."""

    def __init__(self, host: str = "127.0.0.1", port: int = 10026, *, helo: str = "lamsonfilter.localhost",
                 connect_timeout: float = 30.0, keep: int = 8, idle_limit: float = IDLE_LIMIT) -> None:
        self.host = host
        self.port = port
        self.helo = helo
        #: connect + greeting + EHLO: a listener whose processes are all busy accepts the
        #: TCP connection but never greets; give up well before the message deadline
        self.connect_timeout = connect_timeout
        self.keep = keep
        self.idle_limit = idle_limit
        self._idle: list[_Connection] = []
        self._reaper: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"Reinjector({self.host}:{self.port})"

    async def send(self, tx: Transaction) -> str:
        """Hand one message over; return the listener's reply to the final dot (Postfix's says
        ``queued as ID``); raise `ReinjectionError` unless every recipient was accepted.

        Cancelling (the caller's deadline) drops the connection without the
        final ``.``.
        """
        if not tx.recipients:
            raise ReinjectionError("no recipients")
        for attempt in (0, 1):
            conn = self._take()
            fresh = conn is None
            if conn is None:
                conn = await self._connect()
            try:
                reply = await self._transaction(conn, tx)
            except _StaleConnection:
                conn.abort()
                if fresh or attempt:
                    raise ReinjectionError("the reinjection listener closed the connection") from None
                continue  # a kept connection had gone stale: once more on a new one
            except BaseException:
                conn.abort()
                raise
            conn.used = time.monotonic()
            self._give_back(conn)
            return reply
        raise ReinjectionError("the reinjection listener closed the connection")  # not reached

    async def close(self) -> None:
        """QUIT the kept connections (politely, briefly)."""
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        idle, self._idle = self._idle, []
        for conn in idle:
            try:
                conn.writer.write(b"QUIT\r\n")
                await asyncio.wait_for(conn.writer.drain(), 1.0)
            except (OSError, asyncio.TimeoutError):
                pass
            conn.writer.close()

    # ------------------------------------------------------------------ pool
    def _take(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closing and now - conn.used < self.idle_limit:
                return conn
            conn.abort()
        return None

    def _give_back(self, conn: _Connection) -> None:
        if len(self._idle) < self.keep and not conn.closing and self.idle_limit > 0:
            self._idle.append(conn)
            if self._reaper is None:
                self._reaper = asyncio.get_running_loop().call_later(self.idle_limit, self._reap)
        else:
            self._quit(conn)

    def _reap(self) -> None:
        """Close connections idle for `idle_limit` (QUIT), so they free their smtpd process."""
        self._reaper = None
        now = time.monotonic()
        keep = []
        for conn in self._idle:
            if conn.closing or now - conn.used >= self.idle_limit:
                self._quit(conn)
            else:
                keep.append(conn)
        self._idle = keep
        if keep:
            oldest = min(c.used for c in keep)
            self._reaper = asyncio.get_running_loop().call_later(
                max(0.05, oldest + self.idle_limit - now), self._reap)

    @staticmethod
    def _quit(conn: _Connection) -> None:
        if not conn.closing:
            conn.writer.write(b"QUIT\r\n")
        conn.writer.close()

    async def _connect(self) -> _Connection:
        try:
            return await asyncio.wait_for(self._open(), self.connect_timeout)
        except asyncio.TimeoutError:
            raise ReinjectionError(
                f"{self.host}:{self.port} did not greet within {self.connect_timeout:g}s "
                "(all its processes busy? raise its maxproc)") from None

    async def _open(self) -> _Connection:
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port, limit=1 << 16)
        except OSError as exc:
            raise ReinjectionError(f"cannot connect to {self.host}:{self.port}: {exc}") from None
        conn = _Connection(reader, writer)
        try:
            code, text = await conn.reply()
            if code != 220:
                raise ReinjectionError(f"greeting {code} {text}")
            conn.writer.write(b"EHLO " + self.helo.encode("ascii") + b"\r\n")
            code, lines = await conn.reply_lines()
            if code != 250:
                raise ReinjectionError(f"EHLO answered {code} {' '.join(lines)}")
        except BaseException:
            conn.abort()
            raise
        # RFC 5321 §4.1.1.1: after the greeting line, one "KEYWORD params" per line
        for line in lines[1:]:
            keyword, _, params = line.strip().partition(" ")
            conn.extensions[keyword.upper()] = params.strip()
        return conn

    # ------------------------------------------------------------------ one transaction
    async def _transaction(self, conn: _Connection, tx: Transaction) -> str:
        ext = conn.extensions
        size = (tx.data.size if isinstance(tx.data, Spool) else len(tx.data)) + len(tx.prefix)
        commands = self._xforward_commands(tx.xforward, ext.get("XFORWARD"))
        mail = b"MAIL FROM:" + _address(tx.sender)
        if "SIZE" in ext:
            mail += b" SIZE=%d" % size
        if tx.eightbit and "8BITMIME" in ext:
            mail += b" BODY=8BITMIME"
        if tx.smtputf8:
            if "SMTPUTF8" not in ext:
                raise ReinjectionError("the envelope needs SMTPUTF8, which the reinjection listener lacks")
            mail += b" SMTPUTF8"
        commands.append(mail)
        commands.extend(b"RCPT TO:" + _address(r) for r in tx.recipients)
        commands.append(b"DATA")
        replies = await self._exchange(conn, commands, pipelining="PIPELINING" in ext)
        first = True
        for cmd, (code, text) in zip(commands, replies):
            if first and code in (421, 0):
                raise _StaleConnection()
            first = False
            want = 354 if cmd == b"DATA" else 250
            if code != want:
                raise ReinjectionError(
                    f"{cmd.split(b':')[0].decode(errors='replace')} answered {code} {text}"
                    + (f" for {cmd[8:].decode(errors='replace')}" if cmd.startswith(b"RCPT") else "")
                )
        if tx.prefix:
            conn.writer.write(stuff(tx.prefix))
        await self._send_content(conn, tx.data)
        code, text = await conn.reply()
        if code != 250:
            raise ReinjectionError(f"end of data answered {code} {text}")
        return f"{code} {text}"

    @staticmethod
    def _xforward_commands(attrs: Mapping[str, str], supported: str | None) -> list[bytes]:
        """XFORWARD lines for the attributes the server supports, each within 512 octets."""
        if supported is None or not attrs:
            return []
        allowed = set(supported.split()) or set(XFORWARD_ATTRS)
        items = [f"{k}={xtext_encode(attrs[k][:255])}" for k in XFORWARD_ATTRS if k in attrs and k in allowed]
        lines: list[bytes] = []
        line = "XFORWARD"
        for item in items:
            if len(line) + 1 + len(item) + 2 > _MAX_COMMAND and line != "XFORWARD":
                lines.append(line.encode("ascii"))
                line = "XFORWARD"
            line += " " + item
        if line != "XFORWARD":
            lines.append(line.encode("ascii"))
        return lines

    @staticmethod
    async def _exchange(conn: _Connection, commands: list[bytes], pipelining: bool) -> list[tuple[int, str]]:
        """Send commands (all at once with PIPELINING) and collect their replies.

        Without PIPELINING the exchange stops at the first unexpected reply;
        the missing replies are reported as code 0.
        """
        replies: list[tuple[int, str]] = []
        try:
            if pipelining:
                conn.writer.write(b"".join(c + b"\r\n" for c in commands))
                for _ in commands:
                    replies.append(await conn.reply())
                return replies
            for cmd in commands:
                code, text = await conn.command(cmd)
                replies.append((code, text))
                if code >= 400:
                    break
        except (ReinjectionError, OSError) as exc:
            if not replies:
                raise _StaleConnection() from exc
            raise ReinjectionError(f"connection lost: {exc}") from None
        replies.extend([(0, "no reply")] * (len(commands) - len(replies)))
        return replies

    @staticmethod
    async def _send_content(conn: _Connection, data: bytes | Spool) -> None:
        if isinstance(data, bytes):
            body = stuff(data)
            if body and not body.endswith(b"\r\n"):
                body += b"\r\n"
            conn.writer.write(body + b".\r\n")
            await conn.writer.drain()
            return
        carry = b""
        at_start = True
        for block in data.chunks():
            block = carry + block
            cut = block.rfind(b"\n") + 1
            if cut == 0:
                carry = block
                continue
            # a CR at the end may be half of a CRLF: keep it for the next block
            block, carry = block[:cut], block[cut:]
            conn.writer.write(stuff(block, at_start))
            at_start = True
            await conn.writer.drain()
        if carry:
            carry = stuff(carry, at_start)
            if not carry.endswith(b"\r\n"):
                carry += b"\r\n"
            conn.writer.write(carry)
        conn.writer.write(b".\r\n")
        await conn.writer.drain()


class _StaleConnection(Exception):
    """A kept connection was closed by the server before this transaction began."""
