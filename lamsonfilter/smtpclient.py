"""The one SMTP client for the MTA's reinjection port (asyncio), used by the outbox and the content filter.

Two callers hand mail to Postfix's reinjection listener (127.0.0.1:10026,
which does not filter again) and differ only in what a refusal means:

* the content filter (`lamsonfilter.contentfilter.reinjector`) wants
  **all or nothing**: a refused recipient fails the whole message, which
  is then never sent (the connection is dropped before the final ``.``);
* the outbox (`lamsonfilter.relay`) wants **each recipient on its own**:
  the accepted ones get the message, the others are reported, per
  recipient, as deferred (4xx, a lost connection) or refused (5xx).

Everything else is here, once: opening a session (greeting, EHLO, the
extensions), reply parsing, XFORWARD, the ``MAIL FROM`` parameters (SIZE,
``BODY=8BITMIME``, SMTPUTF8), PIPELINING, sending the content dot-stuffed,
and the per-recipient result (`Delivery`); the byte-level encodings it
shares with the content filter's server side (xtext, XFORWARD lines,
`stuff`) are in `lamsonfilter.smtpwire`:

    conn = await connect("127.0.0.1", 10026, "filter.example.org", connect_timeout=30)
    delivery, alive = await transact(conn, Transaction("", ("bob@example.net",), raw), partial=True)
    await conn.quit()

How errors surface: `Unreachable` when no session could be opened (nothing
was attempted); `ConnectionLost` when the server closed or broke the
connection during a transaction (``stale`` when that happened before its
first reply: a kept connection the server had closed meanwhile);
`Refused` (all-or-nothing only) naming the first command refused.  All
are `ClientError`.  A per-command `timeout` (the outbox) turns a silent
server into `ConnectionLost`; without one (the content filter) the
caller's deadline cancels the transaction.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Protocol

from .smtpwire import XFORWARD_ATTRS, stuff, utf8_addresses, utf8_headers, xforward_commands, xtext_decode, xtext_encode

__all__ = ["ClientError", "Unreachable", "ConnectionLost", "Refused", "Connection", "Content", "Delivery",
           "Transaction", "connect", "transact", "stuff", "xtext_encode", "xtext_decode", "xforward_commands",
           "XFORWARD_ATTRS", "utf8_addresses", "utf8_headers"]



class ClientError(Exception):
    """The reinjection listener did not take the message (the text says why, for the log)."""


class Unreachable(ClientError):
    """No session: refused connection, no greeting, EHLO refused.  Nothing was attempted."""


class ConnectionLost(ClientError):
    """The server closed or broke the connection during a transaction."""

    def __init__(self, text: str, *, stale: bool = False) -> None:
        super().__init__(text)
        #: before the transaction's first reply: a kept connection had gone stale
        self.stale = stale


class Refused(ClientError):
    """All or nothing: a command (MAIL, one RCPT, DATA, the final dot) was not accepted."""


class Content(Protocol):
    """Message bytes too large to hold at once (`lamsonfilter.contentfilter.spool.Spool`)."""

    @property
    def size(self) -> int: ...

    def chunks(self) -> Iterator[bytes]: ...


@dataclass(frozen=True)
class Transaction:
    """One message to hand over: envelope, content and the attributes to forward.

    `smtputf8`: the envelope needs SMTPUTF8 (RFC 6531); a server without it
    is a failure (all or nothing) or refuses every recipient (partial).
    `eightbit`: the content has 8-bit bytes (``BODY=8BITMIME`` when offered).
    """

    sender: str
    recipients: tuple[str, ...]
    data: bytes | Content
    xforward: Mapping[str, str] = field(default_factory=dict)
    smtputf8: bool = False
    eightbit: bool = False
    #: header lines sent before `data` (CRLF-terminated), e.g. `lamsonfilter.contentfilter.looptrace`'s trace field
    prefix: bytes = b""


@dataclass(frozen=True)
class Delivery:
    """What the server said about each recipient.

    `deferred` and `refused` pair each recipient with the reason (the SMTP
    reply, or what went wrong): deferred ones are to be tried again,
    refused ones never.  `queued` holds the replies to the final dot
    (Postfix's ``250 2.0.0 Ok: queued as 5AbcD``).
    """

    accepted: tuple[str, ...] = ()
    deferred: tuple[tuple[str, str], ...] = ()
    refused: tuple[tuple[str, str], ...] = ()
    queued: tuple[str, ...] = ()

    def __add__(self, other: Delivery) -> Delivery:
        return Delivery(
            self.accepted + other.accepted, self.deferred + other.deferred, self.refused + other.refused,
            self.queued + other.queued,
        )


def _answer(recipients: tuple[str, ...] | list[str], code: int, text: str) -> Delivery:
    """Every recipient with one reply: 5xx refused, anything else deferred."""
    entries = tuple((r, f"{code} {text}" if code else text) for r in recipients)
    return Delivery(refused=entries) if 500 <= code < 600 else Delivery(deferred=entries)


def _address(addr: str) -> bytes:
    """``<addr>`` as bytes; refuses anything that could inject a command (RFC 5321 §4.1.2)."""
    if any(c in addr for c in "\r\n\x00"):
        raise ClientError(f"refusing to send unsafe address {addr!r}")
    return b"<" + addr.encode("utf-8", "surrogateescape") + b">"


# ---------------------------------------------------------------------- the session
class Connection:
    """One SMTP session with the listener: reads replies, writes commands, knows the extensions."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 timeout: float | None = None) -> None:
        self.reader = reader
        self.writer = writer
        #: per read and per drain; None: the caller's deadline bounds the exchange
        self.timeout = timeout
        self.extensions: dict[str, str] = {}
        self.used = time.monotonic()

    async def reply(self) -> tuple[int, str]:
        """Read one (possibly multi-line) reply; EOF or garbage raises `ConnectionLost`."""
        code, lines = await self.reply_lines()
        return code, " ".join(lines)

    async def reply_lines(self) -> tuple[int, list[str]]:
        if self.timeout is None:
            return await self._reply_lines()
        try:
            async with asyncio.timeout(self.timeout):
                return await self._reply_lines()
        except TimeoutError:
            raise ConnectionLost(f"no reply within {self.timeout:g}s") from None

    async def _reply_lines(self) -> tuple[int, list[str]]:
        lines: list[str] = []
        while True:
            line = await self.reader.readline()
            if not line.endswith(b"\n"):
                raise ConnectionLost("connection closed by the reinjection listener")
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            if len(text) < 3 or not text[:3].isdigit():
                raise ConnectionLost(f"malformed reply {text[:80]!r}")
            lines.append(text[4:])
            if text[3:4] != "-":
                return int(text[:3]), lines

    async def drain(self) -> None:
        if self.timeout is None:
            await self.writer.drain()
            return
        try:
            async with asyncio.timeout(self.timeout):
                await self.writer.drain()
        except TimeoutError:
            raise ConnectionLost(f"could not write within {self.timeout:g}s") from None

    async def command(self, line: bytes) -> tuple[int, str]:
        self.writer.write(line + b"\r\n")
        return await self.reply()

    def abort(self) -> None:
        """Drop the connection at once: no QUIT, and above all no final ``.``."""
        self.writer.transport.abort()

    @property
    def closing(self) -> bool:
        return self.writer.transport.is_closing() or self.reader.at_eof()

    def quit_nowait(self) -> None:
        """QUIT without waiting for the reply, and close."""
        if not self.closing:
            self.writer.write(b"QUIT\r\n")
        self.writer.close()

    async def quit(self, wait: float = 1.0) -> None:
        """QUIT politely, briefly; the connection is closed either way."""
        try:
            if not self.closing:
                self.writer.write(b"QUIT\r\n")
                async with asyncio.timeout(wait):
                    await self.writer.drain()
        except (OSError, TimeoutError):
            pass
        self.writer.close()


async def connect(host: str, port: int, helo: str, *, connect_timeout: float,
                  timeout: float | None = None) -> Connection:
    """Open a session (connect, greeting, EHLO) within `connect_timeout`; `Unreachable` otherwise.

    A listener whose processes are all busy accepts the TCP connection but
    never greets: the bound covers the greeting and EHLO too.
    """
    try:
        async with asyncio.timeout(connect_timeout):
            return await _open(host, port, helo, timeout)
    except TimeoutError:
        raise Unreachable(f"{host}:{port} did not greet within {connect_timeout:g}s "
                          "(all its processes busy? raise its maxproc)") from None


async def _open(host: str, port: int, helo: str, timeout: float | None) -> Connection:
    try:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 16)
    except OSError as exc:
        raise Unreachable(f"cannot connect to {host}:{port}: {exc}") from None
    conn = Connection(reader, writer, timeout)
    try:
        try:
            code, text = await conn.reply()
            if code != 220:
                raise Unreachable(f"greeting {code} {text}")
            conn.writer.write(b"EHLO " + helo.encode("ascii") + b"\r\n")
            code, lines = await conn.reply_lines()
        except ConnectionLost as exc:
            raise Unreachable(f"{host}:{port}: {exc}") from None
        if code != 250:
            raise Unreachable(f"EHLO answered {code} {' '.join(lines)}")
    except BaseException:
        conn.abort()
        raise
    # RFC 5321 §4.1.1.1: after the greeting line, one "KEYWORD params" per line
    for line in lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        conn.extensions[keyword.upper()] = params.strip()
    return conn


# ---------------------------------------------------------------------- one transaction
async def transact(conn: Connection, tx: Transaction, *, partial: bool) -> tuple[Delivery, bool]:
    """One XFORWARD/MAIL/RCPT.../DATA/content exchange; returns the outcome and whether the
    connection is still good for another transaction.

    `partial=False` (all or nothing): any refusal raises `Refused` before the
    content goes out -- the caller must then drop the connection (`abort`),
    which never sends the final dot.  `partial=True`: the message goes to
    the accepted recipients and the result says, per recipient, what
    happened; a transaction that did not end is reset (``RSET``).  Both
    raise `ConnectionLost` for a connection that breaks or closes.
    """
    if not tx.recipients:
        raise ClientError("no recipients")
    ext = conn.extensions
    if tx.smtputf8 and "SMTPUTF8" not in ext:
        why = "the envelope needs SMTPUTF8 (RFC 6531), which the reinjection listener lacks"
        if not partial:
            raise Refused(why)
        return Delivery(refused=tuple((r, why) for r in tx.recipients)), True
    size = (len(tx.data) if isinstance(tx.data, bytes) else tx.data.size) + len(tx.prefix)
    commands = xforward_commands(tx.xforward, ext.get("XFORWARD"))
    mail = b"MAIL FROM:" + _address(tx.sender)
    if "SIZE" in ext:
        mail += b" SIZE=%d" % size
    if tx.eightbit and "8BITMIME" in ext:
        mail += b" BODY=8BITMIME"
    if tx.smtputf8:
        mail += b" SMTPUTF8"
    commands.append(mail)
    first_rcpt = len(commands)
    commands.extend(b"RCPT TO:" + _address(r) for r in tx.recipients)
    commands.append(b"DATA")
    replies = await _exchange(conn, commands, first_rcpt, pipelining="PIPELINING" in ext, partial=partial)
    if replies[0][0] == 421:
        conn.abort()
        raise ConnectionLost(f"{replies[0][0]} {replies[0][1]}", stale=True)

    # the envelope: XFORWARD and MAIL, then each RCPT, then DATA
    for cmd, (code, text) in zip(commands[:first_rcpt], replies[:first_rcpt]):
        if code != 250:
            return _failed(conn, cmd, code, text, tx.recipients, partial)
    accepted: list[str] = []
    outcome = Delivery()
    for rcpt, (code, text) in zip(tx.recipients, replies[first_rcpt:-1]):
        if code in (250, 251):
            accepted.append(rcpt)
        elif not partial:
            raise Refused(f"RCPT TO answered {code} {text} for <{rcpt}>")
        elif code == 421:  # closing: nobody gets this message now, the rest was never asked
            conn.abort()
            answered = {r for r, _ in outcome.deferred + outcome.refused}
            return outcome + _answer([r for r in tx.recipients if r not in answered], 421, text), False
        else:
            outcome += _answer([rcpt], code, text if code else "no reply")
    code, text = replies[-1]
    if not accepted:
        if code == 354:  # a server that takes DATA without recipients: do not feed it
            conn.abort()
            return outcome, False
        return outcome, await _reset(conn)
    if code != 354:
        failed, alive = _failed(conn, b"DATA", code, text, accepted, partial)
        return outcome + failed, alive and await _reset(conn)

    # the content
    if tx.prefix:
        conn.writer.write(stuff(tx.prefix))
    await _send_content(conn, tx.data)
    code, text = await conn.reply()
    if code != 250:
        if not partial:
            raise Refused(f"end of data answered {code} {text}")
        return outcome + _answer(accepted, code, text), code != 421
    return outcome + Delivery(accepted=tuple(accepted), queued=(f"{code} {text}",)), True


def _failed(conn: Connection, cmd: bytes, code: int, text: str, recipients: tuple[str, ...] | list[str],
            partial: bool) -> tuple[Delivery, bool]:
    """A refused XFORWARD, MAIL or DATA: every recipient gets its reply."""
    verb = cmd.split(b":")[0].split(b" ")[0].decode(errors="replace")
    if not partial:
        raise Refused(f"{verb} answered {code} {text}" if code else f"{verb}: no reply")
    if code == 421:
        conn.abort()
    return _answer(recipients, code, text if code else f"{verb}: no reply"), code != 421


async def _reset(conn: Connection) -> bool:
    """RSET after a transaction that did not end; whether the connection is still good."""
    try:
        code, _ = await conn.command(b"RSET")
    except (ConnectionLost, OSError):
        conn.abort()
        return False
    return code == 250


async def _exchange(conn: Connection, commands: list[bytes], first_rcpt: int, *, pipelining: bool,
                    partial: bool) -> list[tuple[int, str]]:
    """Send commands (all at once with PIPELINING) and collect their replies.

    Without PIPELINING the exchange stops at the first refusal -- in
    partial mode a refused recipient is not one, but a 421 is, and DATA is
    not sent when no recipient was accepted.  Either way it stops at a 421
    (the server closes).  The missing replies are reported as code 0.
    """
    replies: list[tuple[int, str]] = []
    try:
        if pipelining:
            conn.writer.write(b"".join(c + b"\r\n" for c in commands))
            for _ in commands:
                replies.append(await conn.reply())
                if replies[-1][0] == 421:  # the server is closing: no more replies will come
                    break
            replies.extend([(0, "no reply")] * (len(commands) - len(replies)))
            return replies
        for index, cmd in enumerate(commands):
            if cmd == b"DATA" and partial and not any(c in (250, 251) for c, _ in replies[first_rcpt:]):
                break
            code, text = await conn.command(cmd)
            replies.append((code, text))
            if code >= 400 and (not partial or index < first_rcpt or code == 421 or cmd == b"DATA"):
                break
    except (ConnectionLost, OSError) as exc:
        conn.abort()
        if not replies:
            raise ConnectionLost(str(exc), stale=True) from None
        raise ConnectionLost(f"connection lost: {exc}") from None
    replies.extend([(0, "no reply")] * (len(commands) - len(replies)))
    return replies


async def _send_content(conn: Connection, data: bytes | Content) -> None:
    """The message, CRLF-only and dot-stuffed, and the final dot."""
    try:
        if isinstance(data, bytes):
            body = stuff(data)
            if body and not body.endswith(b"\r\n"):
                body += b"\r\n"
            conn.writer.write(body + b".\r\n")
            await conn.drain()
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
            await conn.drain()
        if carry:
            carry = stuff(carry, at_start)
            if not carry.endswith(b"\r\n"):
                carry += b"\r\n"
            conn.writer.write(carry)
        conn.writer.write(b".\r\n")
        await conn.drain()
    except OSError as exc:
        conn.abort()
        raise ConnectionLost(f"connection lost: {exc}") from None
