"""Reinjection: the content filter's careful use of the one SMTP client, with kept connections.

``smtpproxy`` answers Postfix's final ``.`` with ``250`` only after the
reinjection listener (Postfix's 127.0.0.1:10026 smtpd, or Exim's)
accepted the message for **every** recipient:

    reinjector = Reinjector("127.0.0.1", 10026)
    await reinjector.send(Transaction(sender="", recipients=("bob@example.net",),
                                      data=spool, xforward={"IDENT": "4Xyz"}))
    # returned: accepted, with the listener's reply ("250 2.0.0 Ok: queued as 5AbcD");
    # ReinjectionError: answer 451 upstream.
    await reinjector.close()

The protocol is `lamsonfilter.smtpclient`'s (shared with the outbox's
`lamsonfilter.relay.Relay`), used all or nothing.  What "careful" means
(never a 250 for mail that went nowhere, bounded waits, no smuggling):

* The envelope is passed on exactly: ``MAIL FROM:<>`` stays ``<>``, every
  recipient is given, nothing is rebuilt from headers.  XFORWARD attributes
  are re-sent before every ``MAIL`` (the server resets them per transaction).
* A refused recipient is a failure even when others were accepted
  (``smtplib.sendmail`` would return quietly): the connection is then
  dropped **without** sending the final ``.``, so nothing is half-delivered.
* Content goes out CRLF-only and dot-stuffed after normalising
  (`lamsonfilter.smtpclient.stuff`), so no received bytes can end DATA
  early downstream.
* Connections are kept for the next message (RSET-free: a completed
  transaction is a clean state); a kept connection that the server closed
  meanwhile is replaced once, before anything was committed.  With
  PIPELINING, XFORWARD, MAIL, every RCPT and DATA go out in one write.

Errors surface as `ReinjectionError` (`lamsonfilter.smtpclient.ClientError`:
text for the log; the upstream reply is always the caller's fixed ``451 4.3.0``).
"""

from __future__ import annotations

import asyncio
import time

from ..smtpclient import (
    XFORWARD_ATTRS,
    ClientError,
    Connection,
    ConnectionLost,
    Transaction,
    connect,
    transact,
    xtext_decode,
    xtext_encode,
)

__all__ = ["Reinjector", "ReinjectionError", "Transaction", "xtext_encode", "xtext_decode", "XFORWARD_ATTRS",
           "IDLE_LIMIT"]

#: How long an idle connection is kept.  Short, like Postfix's own connection cache
#: (smtp_connection_cache_time_limit, 2 s): each kept connection holds one of the
#: reinjection listener's smtpd processes (maxproc), which the outbox, other
#: workers and other filters need too.
IDLE_LIMIT = 2.0

#: The listener did not accept the message for every recipient (the shared client's error).
ReinjectionError = ClientError


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
        self._idle: list[Connection] = []
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
                delivery, _ = await transact(conn, tx, partial=False)
            except ConnectionLost as exc:
                conn.abort()
                if exc.stale and not fresh and not attempt:
                    continue  # a kept connection had gone stale: once more on a new one
                if exc.stale:
                    raise ReinjectionError("the reinjection listener closed the connection") from None
                raise
            except BaseException:
                conn.abort()
                raise
            conn.used = time.monotonic()
            self._give_back(conn)
            return delivery.queued[0]
        raise ReinjectionError("the reinjection listener closed the connection")  # not reached

    async def close(self) -> None:
        """QUIT the kept connections (politely, briefly)."""
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.quit()

    # ------------------------------------------------------------------ pool
    def _take(self) -> Connection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closing and now - conn.used < self.idle_limit:
                return conn
            conn.abort()
        return None

    def _give_back(self, conn: Connection) -> None:
        if len(self._idle) < self.keep and not conn.closing and self.idle_limit > 0:
            self._idle.append(conn)
            if self._reaper is None:
                self._reaper = asyncio.get_running_loop().call_later(self.idle_limit, self._reap)
        else:
            conn.quit_nowait()

    def _reap(self) -> None:
        """Close connections idle for `idle_limit` (QUIT), so they free their smtpd process."""
        self._reaper = None
        now = time.monotonic()
        keep = []
        for conn in self._idle:
            if conn.closing or now - conn.used >= self.idle_limit:
                conn.quit_nowait()
            else:
                keep.append(conn)
        self._idle = keep
        if keep:
            oldest = min(c.used for c in keep)
            self._reaper = asyncio.get_running_loop().call_later(
                max(0.05, oldest + self.idle_limit - now), self._reap)

    async def _connect(self) -> Connection:
        return await connect(self.host, self.port, self.helo, connect_timeout=self.connect_timeout)
