"""Tracing in content-filter mode: refusals at RCPT carry the queue id and the client, the queue ids
Postfix gives reinjected mail and outbox messages are logged with the message that caused them,
reinjection failures and loops are counted, and the quarantine keeps the whole envelope."""

from __future__ import annotations

import logging
import re
import smtplib
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from lamsonfilter.contentfilter.looptrace import TraceKey
from lamsonfilter.contentfilter.policy import policy_answer
from lamsonfilter.contentfilter.quarantine import Quarantine, QuarantineError
from lamsonfilter.smtpproxy import ProxyConfig
from tests.rig.proxy import ProxyThread, Script, ScriptedSMTP, make_app
from tests.rig.postfix import free_port, wait_for

MSG = (b"From: alice@example.com\r\nTo: x@example.net\r\nSubject: t\r\nMessage-ID: <m1@example.com>\r\n"
       b"\r\nhello\r\n")


@pytest.fixture
def scripted() -> Iterator[ScriptedSMTP]:
    with ScriptedSMTP(Script(end_of_data="250 2.0.0 Ok: queued as 5AbcDe")) as server:
        yield server


def config(app: Path, port: int) -> ProxyConfig:
    return ProxyConfig(app_dir=app, listen=("127.0.0.1", free_port()), reinject=("127.0.0.1", port))


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return str(r.read().decode())


def xforward(s: smtplib.SMTP, ident: str) -> None:
    s.ehlo()
    code, _ = s.docmd(f"XFORWARD NAME=mx.client.example ADDR=192.0.2.7 IDENT={ident}")
    assert code == 250


def test_rcpt_refusal_logs_queue_id_and_client(tmp_path: Path, scripted: ScriptedSMTP,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "lamsonfilter")
    with ProxyThread(config(make_app(tmp_path / "app"), scripted.port)) as p:
        with smtplib.SMTP("127.0.0.1", p.port, local_hostname="client.test", timeout=30) as s:
            xforward(s, "4RcptQ")
            s.mail("alice@example.com")
            assert s.rcpt("no-such-list@lists.example.org")[0] == 550
    assert re.search(r"queue_id=4RcptQ client=mx\.client\.example\[192\.0\.2\.7\] from=<alice@example\.com> "
                     r"rcpt=<no-such-list@lists\.example\.org> refused at RCPT: 550", caplog.text), caplog.text


def test_policy_refusal_is_in_the_log(tmp_path: Path, scripted: ScriptedSMTP,
                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "lamsonfilter")
    with ProxyThread(config(make_app(tmp_path / "app"), scripted.port)) as p:
        assert p.runtime is not None
        answer = policy_answer(p.runtime, {
            "request": "smtpd_access_policy", "protocol_state": "RCPT", "recipient": "nobody@lists.example.org",
            "sender": "alice@example.com", "client_address": "192.0.2.9", "client_name": "mx.example",
            "queue_id": ""})
    assert answer.startswith("550")
    assert re.search(r"queue_id=- client=mx\.example\[192\.0\.2\.9\] from=<alice@example\.com> "
                     r"rcpt=<nobody@lists\.example\.org> refused at RCPT \(policy\): 550", caplog.text), caplog.text


def test_reinjected_and_outbox_queue_ids_are_logged_with_their_cause(tmp_path: Path, scripted: ScriptedSMTP,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "lamsonfilter")
    with ProxyThread(config(make_app(tmp_path / "app"), scripted.port)) as p:
        with smtplib.SMTP("127.0.0.1", p.port, local_hostname="client.test", timeout=30) as s:
            xforward(s, "4Passed")
            s.sendmail("alice@example.com", ["bob@example.net"], MSG)
            xforward(s, "4Asked")
            s.sendmail("alice@example.com", ["reply@lists.example.org"], MSG.replace(b"m1@", b"m2@"))
        wait_for(lambda: "outbox: message" in caplog.text, 30, message=lambda: caplog.text)
    assert "queue_id=4Passed reinjected to 1 recipient(s): 250 2.0.0 Ok: queued as 5AbcDe" in caplog.text
    made = re.search(r"queue_id=4Asked .*outbox=1 outbox_ids=(<[^>]+>)", caplog.text)
    assert made, caplog.text
    assert re.search(rf"outbox: message \d+ {re.escape(made.group(1))} cause=4Asked to 1 recipient\(s\): "
                     r"250 2\.0\.0 Ok: queued as 5AbcDe", caplog.text), caplog.text


def test_reinjection_failures_are_counted(tmp_path: Path) -> None:
    metrics = free_port()
    app = make_app(tmp_path / "app", f'METRICS = "127.0.0.1:{metrics}"\n')
    with ScriptedSMTP(Script(end_of_data="452 4.3.1 no space")) as scripted:
        with ProxyThread(config(app, scripted.port)) as p:
            with smtplib.SMTP("127.0.0.1", p.port, timeout=30) as s:
                with pytest.raises(smtplib.SMTPDataError) as exc:
                    s.sendmail("alice@example.com", ["bob@example.net"], MSG)
                assert exc.value.smtp_code == 451
            text = scrape(metrics)
    assert "lamsonfilter_reinjection_failures_total 1.0" in text
    assert "lamsonfilter_loops_total 0.0" in text


def test_trace_field_matches_only_its_own_envelope_and_key(tmp_path: Path) -> None:
    key = TraceKey(tmp_path / "state" / "trace.key")
    assert (tmp_path / "state" / "trace.key").stat().st_mode & 0o777 == 0o600
    field = key.field("alice@example.com", ["b@example.net", "A@example.org"])
    msg = b"Received: from x\r\n" + field + MSG
    assert key.came_back(msg, "Alice@example.com", ["a@example.org", "b@example.net"])
    assert not key.came_back(msg, "alice@example.com", ["b@example.net"])  # other recipients: new mail
    assert not key.came_back(MSG, "alice@example.com", ["b@example.net", "a@example.org"])
    assert not key.came_back(MSG + b"\r\n" + field, "alice@example.com", ["b@example.net", "a@example.org"])
    other = TraceKey(tmp_path / "elsewhere" / "trace.key")  # another key: a forged field does not match
    assert not other.came_back(msg, "alice@example.com", ["b@example.net", "a@example.org"])
    assert TraceKey(tmp_path / "state" / "trace.key").came_back(msg, "alice@example.com",
                                                                ["a@example.org", "b@example.net"])


def test_quarantine_keeps_the_whole_envelope(tmp_path: Path) -> None:
    q = Quarantine(tmp_path / "q")
    rcpts = ("list@lists.example.org", "hidden+bcc@example.net", "zoë@example.org", "x=y@example.com")
    name = q.store(MSG, "poison message: test", "4Qid", sender="", recipients=rcpts)
    m = q.load(name)
    assert (m.sender, m.recipients, m.raw, m.queue_id, m.reason) == ("", rcpts, MSG, "4Qid", "poison message: test")
    assert q.names() == [name]
    old = q.store(MSG, "kept", "4Old")  # as an older version stored it: no envelope
    assert not q.load(old).has_envelope and q.load(old).raw == MSG
    with pytest.raises(QuarantineError):
        q.load("../../etc/passwd")
    q.remove(name)
    with pytest.raises(QuarantineError):
        q.load(name)


def test_mail_that_came_back_is_held_logged_and_counted(tmp_path: Path, scripted: ScriptedSMTP,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """Without --postfix-config the filter cannot know the set-up was fixed: 451 4.4.6 each time."""
    caplog.set_level(logging.INFO, "lamsonfilter")
    metrics = free_port()
    app = make_app(tmp_path / "app", f'METRICS = "127.0.0.1:{metrics}"\n')
    cfg = config(app, scripted.port)
    with ProxyThread(cfg) as p:
        with smtplib.SMTP("127.0.0.1", p.port, timeout=30) as s:
            xforward(s, "4First")
            s.sendmail("alice@example.com", ["bob@example.net"], MSG)  # reinjected with the trace field
            back = scripted.messages[0].data
            assert back.startswith(b"X-Lamsonfilter-Trace: v1 ")
            xforward(s, "4Again")
            with pytest.raises(smtplib.SMTPDataError) as exc:
                s.sendmail("alice@example.com", ["bob@example.net"], back)  # the loop brings it back
            assert exc.value.smtp_code == 451 and b"4.4.6 Mail loop" in exc.value.smtp_error
            xforward(s, "4Other")
            s.sendmail("alice@example.com", ["carol@example.net"], back)  # other recipients: new mail
        text = scrape(metrics)
    assert len(scripted.messages) == 2
    assert "lamsonfilter_loops_total 1.0" in text
    assert re.search(r"queue_id=4Again from=<alice@example\.com> rcpts=1 mail loop: this message was "
                     r"reinjected by lamsonfilter", caplog.text), caplog.text
    assert TraceKey(cfg.attempts_path.parent / "trace.key").came_back(back, "alice@example.com", ["bob@example.net"])
