"""The milter's callbacks driven by hand, as Postfix would call them, against a recording context.

`connect` makes a `LamsonMilter` on a runtime and runs negotiate, connect
and HELO; `feed` runs one transaction (MAIL, RCPT..., DATA, headers, body,
end of message), asserting each step's reply on the way, and returns the
final one; `split_message` turns raw bytes into what `feed` takes.  The
context (`RecordingCtx`) serves macros and records every call the milter
makes on it (``setreply``, ``addheader``, ...).  Used by the milter's unit
tests and by the tests that hold every transport to the same contract.
Needs pymilter: import it after checking for it.
"""

from __future__ import annotations

from typing import Any

import Milter  # type: ignore[import-untyped,import-not-found,unused-ignore]

from lamsonfilter.daemon.runtime import Runtime
from lamsonfilter.milter import LamsonMilter

__all__ = ["RecordingCtx", "connect", "content_reply", "feed", "split_message"]


class RecordingCtx:
    """Stands in for pymilter's milterContext: records every call, serves macros."""

    def __init__(self, macros: dict[str, str] | None = None) -> None:
        self.macros = dict(macros or {})
        self.calls: list[tuple[Any, ...]] = []
        self.priv: Any = None

    def getsymval(self, name: str) -> str | None:
        return self.macros.get(name)

    def setpriv(self, priv: Any) -> None:
        self.priv = priv

    def getpriv(self) -> Any:
        return self.priv

    def __getattr__(self, name: str) -> Any:  # setreply, addheader, chgheader, setsymlist, ...
        def record(*args: Any) -> None:
            self.calls.append((name, *args))

        return record

    def named(self, name: str) -> list[tuple[Any, ...]]:
        return [c[1:] for c in self.calls if c[0] == name]


def connect(runtime: Runtime, *, leadspc: bool = True, macros: dict[str, str] | None = None) -> tuple[Any, RecordingCtx]:
    m = LamsonMilter(runtime)
    ctx = RecordingCtx({"i": "4QID", **(macros or {})})
    m._setctx(ctx)
    offered = [Milter.CURR_ACTS, 0x1FFFFF if leadspc else 0x1FFFFF & ~Milter.P_HDR_LEADSPC, 0, 0]
    assert m.negotiate(offered) == Milter.CONTINUE
    no_reply = Milter.NOREPLY  # connect and hello are negotiated as no-reply steps
    assert m.connect("[192.0.2.7]", 2, ("192.0.2.7", 40000)) == no_reply
    assert m.hello("client.example.test") == no_reply
    return m, ctx


def content_reply(m: Any) -> int:
    """What header, eoh and body return: NOREPLY when the MTA granted the no-reply steps."""
    reply: int = Milter.NOREPLY if m._protocol & Milter.P_NR_HDR else Milter.CONTINUE
    return reply


def feed(m: Any, rcpts: list[str], headers: list[tuple[str, bytes]], body: list[bytes]) -> int:
    """One transaction as Postfix sends it; returns the final reply (from DATA or end of message)."""
    assert m.envfrom("<alice@example.com>", "SIZE=100") == Milter.CONTINUE
    for r in rcpts:
        assert m.envrcpt(f"<{r}>") == Milter.CONTINUE
    rc: int = m.data()
    if rc != Milter.CONTINUE:
        return rc
    content = content_reply(m)  # NOREPLY once negotiated: Postfix does not wait for these steps
    for name, value in headers:
        assert m.header_bytes(name, value) == content
    assert m.eoh() == content
    for chunk in body:
        assert m.body(chunk) == content
    rc = m.eom()
    return rc


def split_message(raw: bytes) -> tuple[list[tuple[str, bytes]], list[bytes]]:
    """`raw` (CRLF lines, one line per header field) as `feed` takes it: (name, value) pairs, one body chunk."""
    head, body = raw.split(b"\r\n\r\n", 1)
    headers = []
    for line in head.split(b"\r\n"):
        name, value = line.split(b":", 1)
        headers.append((name.decode(), value[1:]))
    return headers, [body]
