"""Every transport answers the same failure with the same reply, the one in `lamsonfilter.replies`.

One application whose handler raises (``crash@lists.example.org``), run
through the three transports: the milter (its callbacks driven by hand),
the content filter (over a loopback socket, a scripted reinjection
listener behind it), the queue (``deq``'s worker on a real queue) and the
dry run (``lamsonfilter test``).  Each must answer `replies.TEMPFAIL`, byte
for byte -- the queue, which has nobody to answer, keeps the message for a
retry with that reply in its decision.
"""

from __future__ import annotations

import smtplib
from pathlib import Path
from typing import Any

import Milter  # type: ignore[import-untyped,import-not-found,unused-ignore]
import pytest
from click.testing import CliRunner

from lamsonfilter import replies
from lamsonfilter.cli import main
from lamsonfilter.contentfilter.quarantine import Quarantine
from lamsonfilter.daemon.runtime import Runtime
from lamsonfilter.decisions import Decision
from lamsonfilter.mailqueue.maildir import MailQueue
from lamsonfilter.milter import LamsonMilter
from lamsonfilter.queueworker.worker import MessageWorker
from lamsonfilter.relay import Relay
from lamsonfilter.smtpproxy import ProxyConfig
from tests.rig.proxy import ProxyThread, ScriptedSMTP, make_app
from tests.rig.postfix import free_port

CRASH = "crash@lists.example.org"
RAW = (b"From: Alice <alice@example.com>\r\nTo: crash@lists.example.org\r\nSubject: hello\r\n"
       b"Message-ID: <same-1@example.com>\r\n\r\nbody\r\n")


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    return make_app(tmp_path / "app")


class _Ctx:
    """pymilter's context as the milter sees it: macros in, every call recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def getsymval(self, name: str) -> str | None:
        return {"i": "4QSAME"}.get(name)

    def setpriv(self, priv: Any) -> None:
        self.priv = priv

    def getpriv(self) -> Any:
        return getattr(self, "priv", None)

    def __getattr__(self, name: str) -> Any:
        return lambda *args: self.calls.append((name, *args)) or 0


def test_the_milter_answers_tempfail_from_the_table(app_dir: Path) -> None:
    runtime = Runtime.from_directory(app_dir, {"DATABASE": "memory:"})
    m = LamsonMilter(runtime)
    ctx = _Ctx()
    m._setctx(ctx)
    assert m.negotiate([Milter.CURR_ACTS, 0x1FFFFF, 0, 0]) == Milter.CONTINUE
    m.connect("[192.0.2.7]", 2, ("192.0.2.7", 40000))
    m.hello("client.example.test")
    assert m.envfrom("<alice@example.com>") == Milter.CONTINUE
    assert m.envrcpt(f"<{CRASH}>") == Milter.CONTINUE
    m.data()
    head, body = RAW.split(b"\r\n\r\n", 1)
    for line in head.split(b"\r\n"):
        name, value = line.split(b":", 1)
        m.header_bytes(name.decode(), value[1:])
    m.eoh()
    m.body(body)
    assert m.eom() == Milter.TEMPFAIL
    assert [c[1:] for c in ctx.calls if c[0] == "setreply"] == [replies.TEMPFAIL.milter]


def test_the_content_filter_answers_tempfail_from_the_table(app_dir: Path) -> None:
    with ScriptedSMTP() as scripted, ProxyThread(ProxyConfig(
            app_dir=app_dir, listen=("127.0.0.1", free_port()), reinject=("127.0.0.1", scripted.port))) as proxy:
        with smtplib.SMTP("127.0.0.1", proxy.port, local_hostname="client.test", timeout=30) as s, \
                pytest.raises(smtplib.SMTPDataError) as info:
            s.sendmail("alice@example.com", [CRASH], RAW)
    assert f"{info.value.smtp_code} {info.value.smtp_error.decode()}" == replies.TEMPFAIL.line


def test_the_queue_keeps_the_message_for_a_retry_with_tempfail_from_the_table(
        app_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    decisions: list[Decision] = []
    original = Runtime.process

    def watched(self: Runtime, request: Any, **contract: Any) -> Decision:
        decisions.append(original(self, request, **contract))
        return decisions[-1]

    monkeypatch.setattr(Runtime, "process", watched)
    runtime = Runtime.from_directory(app_dir)
    queue = MailQueue(tmp_path / "queue")
    name = queue.put(RAW, "alice@example.com", CRASH)
    worker = MessageWorker(runtime, queue, Quarantine(tmp_path / "quarantine"), Relay("127.0.0.1", free_port()))
    try:
        assert worker.handle(name) == "retry"
    finally:
        runtime.stop()
    assert [o.reply for d in decisions for o in d.outcomes] == [replies.TEMPFAIL.line]
    assert [(e.name, e.state, e.attempts) for e in queue.entries()] == [(name, "retry", 1)]


def test_the_dry_run_shows_both_transports_answering_tempfail_from_the_table(app_dir: Path) -> None:
    result = CliRunner().invoke(main, ["test", "--app", str(app_dir), "--database", "memory:",
                                       "--sender", "alice@example.com", "--rcpt", CRASH], input=RAW)
    lines = result.output.splitlines()
    milter = next(line for line in lines if line.startswith("milter:"))
    content = next(line for line in lines if line.startswith("content filter:"))
    assert milter.split(None, 1)[1] == f"setreply{replies.TEMPFAIL.milter!r}; TEMPFAIL"
    assert content.endswith(f"answer {replies.TEMPFAIL.line}")
    queue = next(line for line in lines if line.startswith("queue:"))
    assert queue.split(None, 1)[1] == "retry in 60 s"  # the queue's tempfail: back to retry/, nothing sent
