"""Helpers for the content-filter tests: a test application, the proxy in a thread, a scripted SMTP server.

``make_app(dir)`` copies examples/mailinglist and adds a ``proxytest``
handler (addresses at lists.example.org):

=====================  =====================================================
tag@                   deliver, adding ``X-Lamsonfilter-Test: tagged``
crash@                 the handler raises
slow@                  sleeps ``SLOW`` seconds (settings), then delivers
refuse@                ``ctx.reject`` (after DATA: quarantine over SMTP)
reply@                 an automatic reply to the sender; the message is consumed
=====================  =====================================================

``ProxyThread`` runs `lamsonfilter.contentfilter.server.ProxyServer` on its own
asyncio loop in a thread; ``ScriptedSMTP`` is a reinjection listener
whose answers a test chooses (refuse a recipient, 4xx/5xx or hang up at
the final dot) and which records every command and message.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import socketserver
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lamsonfilter.contentfilter.server import ProxyServer, bind_socket, build_runtime
from lamsonfilter.daemon.runtime import Runtime
from lamsonfilter.settings import make_storage
from lamsonfilter.smtpproxy import ProxyConfig
from tests.rig.handlers import handler_source

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "mailinglist"

#: The content-filter tests' handler (tests/fixtures/handlers/proxytest.py).
TEST_HANDLER = handler_source("proxytest")


def make_app(target: Path, extra_settings: str = "") -> Path:
    """A copy of the example application plus the ``proxytest`` handler, schema created."""
    shutil.copytree(EXAMPLE, target, ignore=shutil.ignore_patterns("var", "__pycache__", "tests"))
    (target / "app" / "handlers" / "proxytest.py").write_text(TEST_HANDLER)
    settings = target / "config" / "settings.py"
    text = settings.read_text().replace('HANDLERS = ["mailinglist"]', 'HANDLERS = ["mailinglist", "proxytest"]')
    settings.write_text(text + "\nREPLY_LIMIT = (1000, 3600)\n" + extra_settings)
    storage = make_storage("sqlite:///var/state.db", target)
    storage.create_schema()
    storage.close()
    return target


class ProxyThread:
    """The content filter on 127.0.0.1:`port`, served from a thread (no signals, no fork)."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.port = config.listen[1]
        self.runtime: Runtime | None = None
        self.server: ProxyServer | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="proxy-loop", daemon=True)

    def start(self) -> "ProxyThread":
        self.runtime = build_runtime(self.config, outbox_interval=0.5)
        sock = bind_socket(*self.config.listen)
        policy = bind_socket(*self.config.policy) if self.config.policy else None
        self.runtime.start()
        self.server = ProxyServer(self.config, self.runtime, sock, policy_sock=policy)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(40)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        if self.runtime is not None:
            self.runtime.stop()

    def __enter__(self) -> "ProxyThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- scripted listener
@dataclass
class Script:
    """How `ScriptedSMTP` answers.  ``end_of_data``: a reply line, or ``"drop"`` to hang up."""

    extensions: tuple[str, ...] = ("PIPELINING", "SIZE 20480000", "8BITMIME", "SMTPUTF8",
                                   "XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE")
    refuse_rcpt: dict[str, str] = field(default_factory=dict)  # address -> reply
    end_of_data: str = "250 2.0.0 Ok: queued"


@dataclass
class Received:
    commands: list[str]
    data: bytes


class ScriptedSMTP:
    """A threaded SMTP server on 127.0.0.1 that answers per `Script` and records everything."""

    def __init__(self, script: Script | None = None) -> None:
        self.script = script or Script()
        self.messages: list[Received] = []
        self.sessions: list[list[str]] = []  # every command of every connection
        self._lock = threading.Lock()
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                outer._session(self.rfile, self.wfile)

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "ScriptedSMTP":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _session(self, rfile: Any, wfile: Any) -> None:
        log: list[str] = []
        with self._lock:
            self.sessions.append(log)
        tx: list[str] = []

        def say(line: str) -> None:
            wfile.write(line.encode() + b"\r\n")
            wfile.flush()

        say("220 scripted ESMTP")
        while True:
            line = rfile.readline()
            if not line:
                return
            cmd = line.decode("utf-8", "surrogateescape").rstrip("\r\n")
            log.append(cmd)
            verb = cmd.split(" ", 1)[0].upper()
            if verb in ("EHLO", "LHLO"):
                ext = ["scripted", *self.script.extensions]
                for x in ext[:-1]:
                    wfile.write(f"250-{x}\r\n".encode())
                say(f"250 {ext[-1]}")
            elif verb == "MAIL":
                tx = [cmd]
                say("250 2.1.0 Ok")
            elif verb == "RCPT":
                tx.append(cmd)
                addr = cmd.partition(":")[2].strip().split(" ")[0].strip("<>")
                say(self.script.refuse_rcpt.get(addr, "250 2.1.5 Ok"))
            elif verb == "DATA":
                say("354 go ahead")
                data = bytearray()
                while True:
                    chunk = rfile.readline()
                    if not chunk:
                        return  # the client hung up without the final dot
                    if chunk == b".\r\n":
                        break
                    data += chunk[1:] if chunk.startswith(b".") else chunk
                if self.script.end_of_data == "drop":
                    return
                if self.script.end_of_data.startswith("250"):  # recorded before the client can see the 250
                    with self._lock:
                        self.messages.append(Received(list(tx), bytes(data)))
                say(self.script.end_of_data)
            elif verb == "QUIT":
                say("221 bye")
                return
            else:
                say("250 2.0.0 Ok")


def smtp_dialogue(port: int, lines: list[bytes], timeout: float = 20.0) -> list[str]:
    """Send raw lines one at a time (each answered before the next) and return every reply."""
    replies: list[str] = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        with s.makefile("rb") as f:  # closed here: an open file keeps the socket's fd
            replies.append(read_reply(f))
            for line in lines:
                s.sendall(line)
                replies.append(read_reply(f))
    return replies


def read_reply(f: Any) -> str:
    out = []
    while True:
        line = f.readline().decode("utf-8", "replace")
        out.append(line.rstrip("\r\n"))
        if not line or line[3:4] != "-":
            return "\n".join(out)
