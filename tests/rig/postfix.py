"""Private Postfix instances and an SMTP capture server for integration tests.

``PrivatePostfix`` writes a complete, self-contained Postfix configuration (``main.cf``
and ``master.cf`` written from scratch, no chroot, own queue/data directories and log
file) under a work directory and runs it with ``postfix -c DIR``.  It only listens on
127.0.0.1, never does DNS, and relays *all* mail to ``[127.0.0.1]:relay_port`` --
normally a :class:`CaptureServer`.  It is stopped with ``postfix -c DIR stop`` (and, as
a last resort, by the PID of the master process it started; never by process name).

Needs root (``postfix start`` runs ``master(8)`` as root) and Debian's ``postfix``
package.  The work directory and its ancestors must be traversable by the ``postfix``
user (pytest's ``tmp_path`` lives below a 0700 directory, so the fixtures use a
``/tmp/lf-pf-*`` directory instead), and should be short if unix-socket milters will
live inside it (``sun_path`` is 108 bytes).

Typical use (see ``tests/rig/fixtures.py`` for the pytest fixtures)::

    with CaptureServer() as capture, PrivatePostfix(
        workdir, smtpd_port=free_port(), relay_port=capture.port,
        main_cf={"smtpd_milters": "inet:127.0.0.1:8894"},
    ) as pf:
        smtplib.SMTP("127.0.0.1", pf.smtpd_port).sendmail(...)
        capture.wait_for_count(1, timeout=30)
"""

from __future__ import annotations

import email
import email.message
import email.policy
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from lamsonfilter.devtools.localpostfix import (  # noqa: F401 -- re-exported for the tests
    PrivatePostfix,
    RigUnavailable,
    find_binary,
    free_port,
    missing_binaries,
    port_accepts,
    wait_for,
)

__all__ = [
    "CaptureServer",
    "CapturedMessage",
    "PrivatePostfix",
    "RigUnavailable",
    "by_subject",
    "find_binary",
    "free_port",
    "missing_binaries",
    "port_accepts",
    "wait_for",
]


@dataclass(frozen=True)
class CapturedMessage:
    """One message as received by :class:`CaptureServer`."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    peer: tuple[str, int] | None = None
    helo: str | None = None
    mail_options: tuple[str, ...] = ()
    received_at: float = field(default_factory=time.time)

    @property
    def message(self) -> email.message.EmailMessage:
        msg = email.message_from_bytes(self.data, policy=email.policy.default)
        assert isinstance(msg, email.message.EmailMessage)
        return msg

    def header_values(self, name: str) -> list[str]:
        """All values of header ``name`` (unfolded strings), top first."""
        return [str(v) for v in self.message.get_all(name, [])]


class _CaptureHandler:
    def __init__(self, server: CaptureServer) -> None:
        self._server = server

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        reply = self._server.reply
        if reply.startswith("250"):
            raw = envelope.original_content
            if raw is None:
                raw = envelope.content
            if isinstance(raw, str):
                raw = raw.encode("utf-8", "surrogateescape")
            self._server._record(
                CapturedMessage(
                    mail_from=str(envelope.mail_from),
                    rcpt_tos=tuple(str(r) for r in envelope.rcpt_tos),
                    data=bytes(raw),
                    peer=tuple(session.peer[:2]) if session.peer else None,
                    helo=session.host_name,
                    mail_options=tuple(envelope.mail_options or ()),
                )
            )
        return reply


class CaptureServer:
    """An SMTP server on 127.0.0.1 (aiosmtpd ``Controller``) that keeps every message.

    ``reply`` is the answer to DATA (default ``250``); set it to e.g.
    ``"451 4.3.0 try later"`` to make the destination refuse (then nothing is recorded).
    """

    def __init__(self, port: int | None = None, *, hostname: str = "capture.localdomain") -> None:
        self.port = port if port is not None else free_port()
        self.reply = "250 2.0.0 Ok: captured"
        self._messages: list[CapturedMessage] = []
        self._cond = threading.Condition()
        self._hostname = hostname
        self._controller: Any = None

    def start(self) -> CaptureServer:
        from aiosmtpd.controller import Controller  # installed by the smtpproxy extra

        self._controller = Controller(
            _CaptureHandler(self),
            hostname="127.0.0.1",
            port=self.port,
            server_hostname=self._hostname,  # no getfqdn() (DNS) lookup
            ready_timeout=10.0,
            enable_SMTPUTF8=True,
        )
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> CaptureServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _record(self, msg: CapturedMessage) -> None:
        with self._cond:
            self._messages.append(msg)
            self._cond.notify_all()

    @property
    def messages(self) -> list[CapturedMessage]:
        """A copy of what was received so far, in arrival order."""
        with self._cond:
            return list(self._messages)

    def clear(self) -> None:
        with self._cond:
            self._messages.clear()

    def wait_for_count(self, n: int, timeout: float = 30.0) -> list[CapturedMessage]:
        """Block until at least ``n`` messages arrived; return them (TimeoutError if not)."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._messages) >= n, timeout):
                raise TimeoutError(
                    f"capture server on port {self.port}: {len(self._messages)} of {n} "
                    f"messages after {timeout:g} s"
                )
            return list(self._messages)

    def __repr__(self) -> str:
        return f"CaptureServer(port={self.port}, messages={len(self.messages)})"


def by_subject(messages: Iterable[CapturedMessage], subject: str) -> CapturedMessage:
    """The single message whose Subject is ``subject``."""
    found = [m for m in messages if m.message.get("Subject") == subject]
    if len(found) != 1:
        raise LookupError(f"{len(found)} messages with Subject {subject!r}")
    return found[0]
