"""The one SMTP client (`lamsonfilter.smtpclient`) against a server that pipelines, as Postfix's does.

aiosmtpd (the capture server of the other tests) does not offer
PIPELINING; Postfix's reinjection listener does, and then every RCPT and
DATA go out in one write and a refused recipient no longer stops the
exchange.  A small scripted server on 127.0.0.1 offers it here and
answers RCPT per recipient; the same client is used both ways:

* each recipient on its own (the outbox's `Relay`): the message goes to
  the accepted ones, the refused one is reported, a transaction with no
  recipient left is reset before the next;
* all or nothing (the content filter's `Reinjector`): one refused
  recipient fails the message and the final dot is never sent.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from lamsonfilter.contentfilter.reinjector import ReinjectionError, Reinjector
from lamsonfilter.decisions import OutboxMessage
from lamsonfilter.relay import Relay
from lamsonfilter.smtpclient import Transaction

RAW = b"From: a@example.org\r\nSubject: hi\r\n\r\nbody\r\n.line with a dot\r\n"


class PipeliningServer:
    """An SMTP server on its own loop in a thread: PIPELINING, per-recipient RCPT replies."""

    def __init__(self, refuse: dict[str, str]) -> None:
        self.refuse = refuse
        self.commands: list[str] = []
        self.messages: list[tuple[tuple[str, ...], bytes]] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._server: asyncio.Server

    def __enter__(self) -> PipeliningServer:
        self._thread.start()
        assert self._started.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._session, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._started.set()
        self._loop.run_forever()
        self._loop.close()

    async def _shutdown(self) -> None:
        """Stop listening and end the sessions still open, each closing its socket."""
        self._server.close()
        sessions = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in sessions:
            task.cancel()
        await asyncio.gather(*sessions, return_exceptions=True)
        await self._server.wait_closed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 pipelining.test ESMTP\r\n")
        rcpts: list[str] = []
        mail = False
        try:
            while line := await reader.readline():
                cmd = line.decode().rstrip("\r\n")
                self.commands.append(cmd)
                verb = cmd.split(" ", 1)[0].split(":", 1)[0].upper()
                if verb == "EHLO":
                    writer.write(b"250-pipelining.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 10240000\r\n")
                elif verb == "MAIL":
                    mail, rcpts = True, []
                    writer.write(b"250 2.1.0 Ok\r\n")
                elif verb == "RCPT":
                    addr = cmd.split(":", 1)[1].strip().strip("<>")
                    if addr in self.refuse:
                        writer.write(self.refuse[addr].encode() + b"\r\n")
                        if self.refuse[addr].startswith("421"):  # Postfix closes after a 421
                            await writer.drain()
                            return
                    else:
                        rcpts.append(addr)
                        writer.write(b"250 2.1.5 Ok\r\n")
                elif verb == "DATA":
                    if not (mail and rcpts):
                        writer.write(b"554 5.5.1 Error: no valid recipients\r\n")
                        continue
                    writer.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    data = b""
                    while not data.endswith(b"\r\n.\r\n"):
                        chunk = await reader.readline()
                        if not chunk:
                            return  # dropped before the final dot: nothing delivered
                        data += chunk
                    self.messages.append((tuple(rcpts), data[:-3]))  # the CRLF before the dot is content
                    mail, rcpts = False, []
                    writer.write(f"250 2.0.0 Ok: queued as Q{len(self.messages)}\r\n".encode())
                elif verb == "RSET":
                    mail, rcpts = False, []
                    writer.write(b"250 2.0.0 Ok\r\n")
                elif verb == "QUIT":
                    writer.write(b"221 2.0.0 Bye\r\n")
                    await writer.drain()
                    return
                else:
                    writer.write(b"502 5.5.2 Error: command not recognized\r\n")
                await writer.drain()
        finally:
            writer.close()


@pytest.fixture
def server() -> Iterator[PipeliningServer]:
    with PipeliningServer({"bad@example.net": "550 5.1.1 no such user",
                           "later@example.net": "451 4.3.0 try again",
                           "closing@example.net": "421 4.3.2 shutting down"}) as s:
        yield s


def test_each_recipient_on_its_own_when_pipelining(server: PipeliningServer) -> None:
    rcpts = ("a@example.org", "bad@example.net", "later@example.net", "b@example.org")
    d = Relay("127.0.0.1", server.port, timeout=10.0).send(OutboxMessage("s@example.org", rcpts, RAW, "message"))
    assert d.accepted == ("a@example.org", "b@example.org")
    assert [r for r, _ in d.refused] == ["bad@example.net"] and "550 5.1.1" in d.refused[0][1]
    assert [r for r, _ in d.deferred] == ["later@example.net"] and "451 4.3.0" in d.deferred[0][1]
    assert d.queued == ("250 2.0.0 Ok: queued as Q1",)
    [(got, data)] = server.messages
    assert got == ("a@example.org", "b@example.org")
    assert data == RAW.replace(b"\r\n.line", b"\r\n..line")  # dot-stuffed on the wire


def test_a_transaction_with_nobody_left_is_reset_before_the_next(server: PipeliningServer) -> None:
    rcpts = ("bad@example.net", "a@example.org")
    d = Relay("127.0.0.1", server.port, timeout=10.0, max_recipients=1).send(
        OutboxMessage("s@example.org", rcpts, RAW, "message"))
    assert d.accepted == ("a@example.org",) and [r for r, _ in d.refused] == ["bad@example.net"]
    assert "RSET" in server.commands
    assert [m[0] for m in server.messages] == [("a@example.org",)]


def test_a_421_mid_rcpt_defers_everyone_not_refused_for_good(server: PipeliningServer) -> None:
    """The server closes after a 421 in the middle of the pipelined RCPTs: nobody got the
    message, so everyone is to be tried again -- except a recipient already refused with 5xx."""
    rcpts = ("a@example.org", "bad@example.net", "closing@example.net", "b@example.org")
    d = Relay("127.0.0.1", server.port, timeout=10.0).send(OutboxMessage("s@example.org", rcpts, RAW, "message"))
    assert d.accepted == () and server.messages == []
    assert [r for r, _ in d.refused] == ["bad@example.net"]
    assert sorted(r for r, _ in d.deferred) == ["a@example.org", "b@example.org", "closing@example.net"]
    assert all("421 4.3.2" in why for _, why in d.deferred)


def test_all_or_nothing_never_sends_the_final_dot(server: PipeliningServer) -> None:
    async def send() -> str:
        reinjector = Reinjector("127.0.0.1", server.port)
        try:
            return await reinjector.send(Transaction("s@example.org", ("a@example.org", "bad@example.net"), RAW))
        finally:
            await reinjector.close()

    with pytest.raises(ReinjectionError, match="550 5.1.1.*bad@example.net"):
        asyncio.run(send())
    assert server.messages == []
    assert any(c.startswith("DATA") for c in server.commands)  # pipelined: DATA went out with the RCPTs


def test_all_or_nothing_delivers_when_everyone_is_accepted(server: PipeliningServer) -> None:
    async def send() -> str:
        reinjector = Reinjector("127.0.0.1", server.port)
        try:
            return await reinjector.send(Transaction("", ("a@example.org", "b@example.org"), RAW,
                                                     xforward={"IDENT": "4Xyz"}))
        finally:
            await reinjector.close()

    assert asyncio.run(send()) == "250 2.0.0 Ok: queued as Q1"
    assert server.messages[0][0] == ("a@example.org", "b@example.org")
    assert "MAIL FROM:<> SIZE=%d" % len(RAW) in server.commands
