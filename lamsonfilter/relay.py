"""The relay: where the outbox's messages go, Postfix's reinjection port, one recipient at a time.

`Relay` is the synchronous face of `lamsonfilter.smtpclient` (the one SMTP
client; the content filter's reinjection uses it too) that the outbox worker
(`lamsonfilter.outboxworker`), ``deq`` and the operator's commands call.
Postfix's reinjection listener does not filter again, so generated mail is
never handled twice::

    relay = Relay("127.0.0.1", 10026)
    delivery = relay.send(message)      # a `Delivery`: accepted, refused, deferred
    # RelayError: the relay could not be reached at all; nothing was attempted

At most `MAX_RECIPIENTS` (500) recipients go into one transaction, below
Postfix's ``smtpd_recipient_limit``; a 5xx refuses that recipient only, a
4xx, a broken connection or a timeout defers the ones not yet accepted.
`message_id` names a message in the log lines.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
from typing import Callable, Coroutine, TypeVar

from .decisions import OutboxMessage
from .mail import header_end
from .smtpclient import (
    ClientError,
    Connection,
    ConnectionLost,
    Delivery,
    Transaction,
    connect,
    transact,
    utf8_addresses,
    utf8_headers,
)

__all__ = ["MAX_RECIPIENTS", "Delivery", "Relay", "RelayError", "message_id"]

#: Recipients per SMTP transaction: half of Postfix's smtpd_recipient_limit default (1000).
MAX_RECIPIENTS = 500

_T = TypeVar("_T")


class RelayError(Exception):
    """The relay could not be reached at all: nothing was attempted; try again later."""


_MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*(<[^>\r\n]{1,250}>)", re.IGNORECASE | re.MULTILINE)


def message_id(raw: bytes) -> str:
    """The ``Message-ID`` of a message's header block, or ``-`` (for log lines)."""
    m = _MESSAGE_ID.search(raw, 0, header_end(raw))
    return m.group(1).decode("ascii", "replace") if m else "-"


def _run(coro: Coroutine[object, object, _T]) -> _T:
    """Run a coroutine to the end from synchronous code (the outbox thread, a command)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # called from inside a loop: not on it
        return pool.submit(asyncio.run, coro).result()


class Relay:
    """The outbox's synchronous face of `lamsonfilter.smtpclient`, each recipient on its own.

    One connection per `send` (loopback by default), `max_recipients` per
    transaction; `timeout` bounds the session's opening and every read and
    write after it.  Each `send` runs the client's coroutines on a loop of
    its own: about 1 ms more CPU per message than ``smtplib`` took
    (``bench/relay_bench.py``: 1.3-1.6 against 0.6 ms through loopback), the
    price of one implementation of the protocol for both transports.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 10026, timeout: float = 60.0,
                 helo: str | None = None, max_recipients: int = MAX_RECIPIENTS) -> None:
        if max_recipients < 1:
            raise ValueError("max_recipients must be at least 1")
        self.host = host
        self.port = port
        self.timeout = timeout
        self.helo = helo or "lamsonfilter.localhost"
        self.max_recipients = max_recipients

    def __repr__(self) -> str:
        return f"Relay({self.host}:{self.port})"

    def __str__(self) -> str:
        """``host:port``, as the log lines and the settings write it."""
        return f"{self.host}:{self.port}"

    def send(self, message: OutboxMessage, record: Callable[[Delivery], None] | None = None) -> Delivery:
        """Hand one message over, `max_recipients` per SMTP transaction, on one connection.

        Returns what happened to each recipient; raises `RelayError` only when
        the relay cannot be reached (then nothing was sent).  `record` is called
        with each transaction's outcome the moment its reply is read (before the
        next transaction and the ``QUIT``): the outbox's sent journal.
        """
        return _run(self._send(message, record))

    async def _send(self, message: OutboxMessage, record: Callable[[Delivery], None] | None = None) -> Delivery:
        recipients = list(dict.fromkeys(message.recipients))  # each once
        try:
            conn = await connect(self.host, self.port, self.helo, connect_timeout=self.timeout,
                                 timeout=self.timeout)
        except ClientError as exc:
            raise RelayError(f"{self.host}:{self.port}: {exc}") from exc
        try:
            done = Delivery()
            for start in range(0, len(recipients), self.max_recipients):
                chunk = recipients[start : start + self.max_recipients]
                result, alive = await self._transaction(conn, message, chunk)
                if record is not None:
                    record(result)
                done += result
                if not alive:  # the connection is gone: the rest waits for the next attempt
                    why = result.deferred[-1][1] if result.deferred else "connection lost"
                    rest = recipients[start + len(chunk) :]
                    return done + Delivery(deferred=tuple((r, why) for r in rest))
            return done
        finally:
            await conn.quit(min(1.0, self.timeout))

    @staticmethod
    async def _transaction(conn: Connection, message: OutboxMessage,
                           recipients: list[str]) -> tuple[Delivery, bool]:
        """One transaction; what it did to each recipient and whether the connection still works."""
        utf8 = "SMTPUTF8" in conn.extensions
        refused: tuple[tuple[str, str], ...] = ()
        if not utf8:  # an address that needs it cannot be sent at all: refused for good
            if not message.sender.isascii():
                why = "the sender needs SMTPUTF8 (RFC 6531) but the relay does not offer it"
                return Delivery(refused=tuple((r, why) for r in recipients)), True
            why = "the recipient needs SMTPUTF8 (RFC 6531) but the relay does not offer it"
            refused = tuple((r, why) for r in recipients if not r.isascii())
            recipients = [r for r in recipients if r.isascii()]
            if not recipients:
                return Delivery(refused=refused), True
        tx = Transaction(message.sender, tuple(recipients), message.raw, eightbit=not message.raw.isascii(),
                         # RFC 6531: UTF-8 addresses, or RFC 6532 UTF-8 headers when the relay takes them
                         smtputf8=utf8 and (utf8_addresses(message.sender, recipients) or utf8_headers(message.raw)))
        try:
            result, alive = await transact(conn, tx, partial=True)
        except ConnectionLost as exc:  # a 421, a timeout or reset mid-transaction
            return Delivery(refused=refused, deferred=tuple((r, f"connection lost: {exc}") for r in recipients)), False
        return Delivery(refused=refused) + result, alive


