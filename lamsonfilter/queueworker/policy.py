"""``deq --policy``: unknown application addresses refused at RCPT, before Postfix delivers into the queue.

In queue mode Postfix is the final destination of the application's
domains (virtual(8)); without help it accepts every address there and
``deq`` could only quarantine mail to an address no route takes, later.
With ``lamsonfilter deq --policy 127.0.0.1:10027`` and the
``check_policy_service`` line of conf/postfix/main.cf.queue, Postfix asks
``deq`` at RCPT time, and the answer is the content filter's
(`lamsonfilter.contentfilter.policy`: the application's own
`App.check_recipient`, ``550 5.1.1`` for an address no route takes at its
hosts, ``DUNNO`` otherwise): the client hears the refusal, as with the
milter and the content filter, and nothing is queued or bounced::

    listener = PolicyListener(runtime, ("127.0.0.1", 10027))   # bound now: StartupError if taken
    listener.start()        # serves from a thread of its own, on its own asyncio loop
    listener.stop()

The answer needs no database (routes only), so it stays right during a
database outage; a reload (SIGHUP) is seen at the next request.  When
``deq`` is not running, Postfix's ``default_action=DUNNO`` accepts the mail,
and ``deq`` quarantines what no route takes, as without the listener.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading

from ..app import StartupError
from ..contentfilter.policy import PolicyServer
from ..daemon.endpoint import is_loopback
from ..daemon.runtime import Runtime

__all__ = ["PolicyListener"]

log = logging.getLogger("lamsonfilter.queueworker")


class _Connections(PolicyServer):
    """The content filter's policy server, keeping its open connections so that `stop` can end them."""

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        self.writers: set[asyncio.StreamWriter] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            await super().handle(reader, writer)
        finally:
            self.writers.discard(writer)

    def close_connections(self) -> None:
        """Close every open connection: each handler then reads EOF and ends."""
        for writer in list(self.writers):
            writer.close()


class PolicyListener:
    """Postfix's policy delegation for ``deq``, on a loopback port, in a thread."""

    def __init__(self, runtime: Runtime, address: tuple[str, int]) -> None:
        host, port = address
        if not is_loopback(host):
            raise StartupError(f"--policy {host}:{port} is not a loopback address; Postfix asks it on this host")
        self.address = address
        self.runtime = runtime
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind((host, port))
            self._sock.listen(128)
        except OSError as exc:
            self._sock.close()
            raise StartupError(f"--policy: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self._sock.setblocking(False)
        self._policy = _Connections(runtime)
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None

    def start(self) -> None:
        """Serve from a thread of its own until `stop`."""
        self._server = self._loop.run_until_complete(self._policy.start(self._sock))
        self._thread = threading.Thread(target=self._loop.run_forever, name="lamsonfilter-deq-policy", daemon=True)
        self._thread.start()
        log.info("answering Postfix's check_policy_service on %s:%d (unknown addresses refused at RCPT)",
                 *self.address)

    def stop(self) -> None:
        """Close the listener and end the thread (bounded); idempotent."""
        if self._thread is not None:
            server = self._server

            async def close() -> None:  # Postfix keeps its connections open: end them too
                # a connection accepted just now reaches its handler first: asyncio's server, once
                # closed, drops (and leaks) a connection whose transport it was still making
                await asyncio.sleep(0.05)
                if server is not None:
                    server.close()
                await asyncio.sleep(0.05)
                self._policy.close_connections()
                for _ in range(200):  # bounded: 2 s
                    if not self._policy.writers:
                        break
                    await asyncio.sleep(0.01)
                for _ in range(3):  # the transports' own closing callbacks run before the loop stops
                    await asyncio.sleep(0)

            try:
                asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
            except Exception as exc:  # noqa: BLE001 -- stopping: log it, go on
                log.warning("policy listener did not close cleanly: %s", exc)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None
        if not self._loop.is_closed() and not self._loop.is_running():
            self._loop.close()
        self._sock.close()
