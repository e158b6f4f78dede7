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

import Milter  # type: ignore[import-untyped,import-not-found,unused-ignore]
import pytest
from click.testing import CliRunner

from lamsonfilter import replies
from lamsonfilter.cli import main
from lamsonfilter.contentfilter.quarantine import Quarantine
from lamsonfilter.daemon.runtime import Runtime
from lamsonfilter.decisions import Decision
from lamsonfilter.mailqueue.maildir import MailQueue
from lamsonfilter.queueworker.worker import MessageWorker
from lamsonfilter.relay import Relay
from lamsonfilter.smtpproxy import ProxyConfig
from tests.rig.milterdrive import connect, feed, split_message
from tests.rig.postfix import free_port
from tests.rig.proxy import ProxyThread, ScriptedSMTP, make_app

CRASH = "crash@lists.example.org"
RAW = (b"From: Alice <alice@example.com>\r\nTo: crash@lists.example.org\r\nSubject: hello\r\n"
       b"Message-ID: <same-1@example.com>\r\n\r\nbody\r\n")


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    return make_app(tmp_path / "app")


def test_the_milter_answers_tempfail_from_the_table(app_dir: Path) -> None:
    runtime = Runtime.from_directory(app_dir, {"DATABASE": "memory:"})
    m, ctx = connect(runtime, macros={"i": "4QSAME"})
    assert feed(m, [CRASH], *split_message(RAW)) == Milter.TEMPFAIL
    assert ctx.named("setreply") == [replies.TEMPFAIL.milter]


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
