"""The content filter over real loopback sockets: smtplib/raw sockets in, a scripted or capture server out.

Requirement tags (R2, M1, D3, ...) refer to docs/reliability.rst, which states each one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from lamsonfilter.smtpproxy import ProxyConfig
from tests.rig.proxy import ProxyThread, Script, ScriptedSMTP, make_app, read_reply, smtp_dialogue
from tests.rig.postfix import CaptureServer, free_port, wait_for

MSG = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: Undisclosed recipients:;\r\n"
    b"Subject: hello\r\n"
    b"Message-ID: <1@example.com>\r\n"
    b"\r\n"
    b"Line one\r\n"
    b".a line that starts with a dot\r\n"
    b"\r\n"
    b"last line, 8bit: \xc3\xa9\r\n"
)


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    return make_app(tmp_path / "app")


def untraced(data: bytes) -> bytes:
    """The reinjected bytes without the one trace field the filter puts on top."""
    assert re.match(rb"X-Lamsonfilter-Trace: v1 [0-9a-f]{32}\r\n", data), data[:80]
    return data.split(b"\r\n", 1)[1]


def _config(app_dir: Path, reinject_port: int, **kw: object) -> ProxyConfig:
    return ProxyConfig(app_dir=app_dir, listen=("127.0.0.1", free_port()), reinject=("127.0.0.1", reinject_port),
                       **kw)  # type: ignore[arg-type]


@pytest.fixture
def scripted() -> Iterator[ScriptedSMTP]:
    with ScriptedSMTP() as server:
        yield server


@pytest.fixture
def proxy(app_dir: Path, scripted: ScriptedSMTP) -> Iterator[ProxyThread]:
    with ProxyThread(_config(app_dir, scripted.port)) as p:
        yield p


def send(port: int, sender: str, rcpts: list[str], data: bytes = MSG, **kw: object) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=30) as s:
        return s.sendmail(sender, rcpts, data, **kw)  # type: ignore[arg-type]


def code_of(exc: BaseException) -> int:
    assert isinstance(exc, (smtplib.SMTPDataError, smtplib.SMTPResponseException))
    return exc.smtp_code


# --------------------------------------------------------------------------- the happy path
def test_ehlo_announces_what_postfix_needs(proxy: ProxyThread) -> None:
    with smtplib.SMTP("127.0.0.1", proxy.port, local_hostname="client.test") as s:
        code, _ = s.ehlo()
        assert code == 250
        assert int(s.esmtp_features["size"]) >= 10_240_000
        for ext in ("8bitmime", "smtputf8", "pipelining", "xforward"):
            assert ext in s.esmtp_features, ext
        assert "starttls" not in s.esmtp_features
        assert set(s.esmtp_features["xforward"].split()) == {"NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE"}


def test_unchanged_message_reinjected_byte_for_byte_with_envelope(proxy: ProxyThread, scripted: ScriptedSMTP) -> None:
    # the null sender and a Bcc-only recipient (in no header) pass unchanged
    assert send(proxy.port, "<>", ["bcc-only@example.net", "other@example.org"], MSG,
                mail_options=["BODY=8BITMIME"]) == {}
    assert len(scripted.messages) == 1
    got = scripted.messages[0]
    assert untraced(got.data) == MSG  # byte for byte below the trace field (lamsonfilter.contentfilter.looptrace)
    assert got.commands[0].startswith("MAIL FROM:<>")
    assert "BODY=8BITMIME" in got.commands[0]
    assert got.commands[1:] == ["RCPT TO:<bcc-only@example.net>", "RCPT TO:<other@example.org>"]


def test_header_change_applied(proxy: ProxyThread, scripted: ScriptedSMTP) -> None:
    send(proxy.port, "alice@example.com", ["tag@lists.example.org"])
    data = scripted.messages[0].data
    assert b"X-Lamsonfilter-Test: tagged\r\n" in data.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    assert data.endswith(MSG.split(b"\r\n\r\n", 1)[1])


def test_xforward_recorded_and_passed_on(proxy: ProxyThread, scripted: ScriptedSMTP,
                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lamsonfilter")
    replies = smtp_dialogue(proxy.port, [
        b"EHLO postfix.test\r\n",
        b"XFORWARD NAME=mx.example.com ADDR=192.0.2.10 PORT=4711\r\n",
        b"XFORWARD PROTO=ESMTP HELO=mx.example.com IDENT=4XyzQ1 SOURCE=REMOTE\r\n",
        b"MAIL FROM:<alice@example.com>\r\n",
        b"RCPT TO:<bob@example.net>\r\n",
        b"DATA\r\n",
        MSG + b".\r\n",
        b"QUIT\r\n",
    ])
    assert [r[:3] for r in replies] == ["220", "250", "250", "250", "250", "250", "354", "250", "221"]
    session = scripted.sessions[-1]
    xf = " ".join(c for c in session if c.startswith("XFORWARD"))
    for attr in ("NAME=mx.example.com", "ADDR=192.0.2.10", "PORT=4711", "HELO=mx.example.com", "IDENT=4XyzQ1"):
        assert attr in xf
    assert session.index([c for c in session if c.startswith("XFORWARD")][-1]) < session.index(
        next(c for c in session if c.startswith("MAIL")))
    assert "queue_id=4XyzQ1" in caplog.text


def test_xforward_inside_a_transaction_is_refused(proxy: ProxyThread) -> None:
    replies = smtp_dialogue(proxy.port, [b"EHLO postfix.test\r\n", b"MAIL FROM:<a@example.com>\r\n",
                                         b"XFORWARD IDENT=X\r\n", b"RSET\r\n", b"XFORWARD BOGUS=1\r\n"])
    assert replies[3].startswith("503") and replies[5].startswith("501")


def test_utf8_envelope_with_smtputf8(proxy: ProxyThread, scripted: ScriptedSMTP) -> None:
    with smtplib.SMTP("127.0.0.1", proxy.port, local_hostname="client.test") as s:
        s.ehlo()
        s.sendmail("jörg@example.com", ["zoë@example.net"], MSG, mail_options=["SMTPUTF8", "BODY=8BITMIME"])
    got = scripted.messages[0]
    assert got.commands[0].startswith("MAIL FROM:<jörg@example.com>") and "SMTPUTF8" in got.commands[0]
    assert got.commands[1] == "RCPT TO:<zoë@example.net>"


def test_large_message_is_spooled_and_passed_unchanged(proxy: ProxyThread, scripted: ScriptedSMTP) -> None:
    body = b"".join(b"%07d " % i + b"x" * 70 + b"\r\n" for i in range(40000))  # ~3 MB
    msg = MSG.split(b"\r\n\r\n")[0] + b"\r\n\r\n" + b"." + body
    send(proxy.port, "alice@example.com", ["bob@example.net"], msg)
    assert untraced(scripted.messages[0].data) == msg


# --------------------------------------------------------------------------- RCPT and per-recipient outcomes
def test_unknown_address_at_app_host_refused_at_rcpt(proxy: ProxyThread) -> None:
    replies = smtp_dialogue(proxy.port, [b"EHLO postfix.test\r\n", b"MAIL FROM:<a@example.com>\r\n",
                                         b"RCPT TO:<nobody@lists.example.org>\r\n",
                                         b"RCPT TO:<somebody@elsewhere.example>\r\n"])
    assert replies[3].startswith("550 5.1.1")
    assert replies[4].startswith("250")


def test_reject_after_data_over_smtp_is_quarantined_not_bounced(proxy: ProxyThread, scripted: ScriptedSMTP,
                                                                 app_dir: Path) -> None:
    assert send(proxy.port, "alice@example.com", ["refuse@lists.example.org", "bob@example.net"]) == {}
    assert [m.commands[1:] for m in scripted.messages] == [["RCPT TO:<bob@example.net>"]]
    files = list((app_dir / "var" / "quarantine" / "new").iterdir())
    assert len(files) == 1
    kept = files[0].read_bytes()
    assert kept.startswith(b"X-Lamsonfilter-Quarantine: refuse@lists.example.org: 550 5.7.1")
    assert kept.endswith(MSG)
    assert not list((app_dir / "var" / "quarantine" / "tmp").iterdir())


def test_lmtp_one_reply_per_recipient(app_dir: Path, scripted: ScriptedSMTP) -> None:
    with ProxyThread(_config(app_dir, scripted.port, lmtp=True)) as p:
        with smtplib.LMTP("127.0.0.1", p.port, local_hostname="postfix.test") as s:
            s.ehlo_or_helo_if_needed = lambda: None  # type: ignore[method-assign]
            assert s.docmd("LHLO postfix.test")[0] == 250
            assert s.docmd("MAIL FROM:<alice@example.com>")[0] == 250
            for r in ("refuse@lists.example.org", "tag@lists.example.org", "bob@example.net"):
                assert s.docmd(f"RCPT TO:<{r}>")[0] == 250
            assert s.docmd("DATA")[0] == 354
            s.send(MSG + b".\r\n")
            codes = [s.getreply()[0] for _ in range(3)]
        assert codes == [550, 250, 250]
        assert scripted.messages[0].commands[1:] == ["RCPT TO:<tag@lists.example.org>", "RCPT TO:<bob@example.net>"]


# --------------------------------------------------------------------------- failures become 451
@pytest.mark.parametrize("script", [
    Script(refuse_rcpt={"b@example.net": "550 5.1.1 no such user"}),
    Script(refuse_rcpt={"b@example.net": "450 4.2.0 later"}),
    Script(end_of_data="451 4.3.0 queue trouble"),
    Script(end_of_data="554 5.7.1 refused"),
    Script(end_of_data="drop"),
    Script(extensions=("SIZE 1000",), refuse_rcpt={"b@example.net": "550 5.1.1 no such user"}),
], ids=["rcpt-5xx", "rcpt-4xx", "dot-4xx", "dot-5xx", "dot-hangup", "no-pipelining-rcpt-5xx"])
def test_reinjection_failure_answers_451_and_never_sends_the_dot(app_dir: Path, script: Script) -> None:
    with ScriptedSMTP(script) as downstream, ProxyThread(_config(app_dir, downstream.port)) as p:
        with pytest.raises(smtplib.SMTPException) as info:
            send(p.port, "alice@example.com", ["a@example.net", "b@example.net"])
        if isinstance(info.value, smtplib.SMTPRecipientsRefused):
            pytest.fail(f"refused at RCPT: {info.value}")
        assert code_of(info.value) == 451
        assert b"4.3.0" in info.value.smtp_error and b"Error" not in info.value.smtp_error
        assert downstream.messages == []
        if script.refuse_rcpt:  # the downstream connection was dropped after the refusal, without "."
            session = downstream.sessions[-1]
            assert "." not in session and "QUIT" not in session


def test_reinjection_port_down_answers_451(app_dir: Path) -> None:
    with ProxyThread(_config(app_dir, free_port())) as p:
        with pytest.raises(smtplib.SMTPDataError) as info:
            send(p.port, "alice@example.com", ["bob@example.net"])
        assert info.value.smtp_code == 451


def test_handler_exception_answers_451_and_sends_nothing(proxy: ProxyThread, scripted: ScriptedSMTP) -> None:
    with pytest.raises(smtplib.SMTPDataError) as info:
        send(proxy.port, "alice@example.com", ["crash@lists.example.org", "bob@example.net"])
    assert info.value.smtp_code == 451 and b"boom" not in info.value.smtp_error
    time.sleep(0.3)
    assert scripted.messages == []


def test_deadline_answers_451(app_dir: Path, scripted: ScriptedSMTP) -> None:
    (app_dir / "config" / "settings.py").write_text(
        (app_dir / "config" / "settings.py").read_text() + "\nSLOW = 3\n")
    with ProxyThread(_config(app_dir, scripted.port, deadline=1.0)) as p:
        started = time.monotonic()
        with pytest.raises(smtplib.SMTPDataError) as info:
            send(p.port, "alice@example.com", ["slow@lists.example.org"])
        assert info.value.smtp_code == 451
        assert time.monotonic() - started < 2.9  # answered at the deadline, not after the handler
    assert scripted.messages == []


def test_session_exception_is_451_not_500(proxy: ProxyThread, scripted: ScriptedSMTP,
                                          caplog: pytest.LogCaptureFixture) -> None:
    """R2: a handler that raises is one fixed 451 4.3.0 (no internals) and one ERROR line with the queue id."""
    with caplog.at_level(logging.INFO, logger="lamsonfilter"):
        replies = smtp_dialogue(proxy.port, [
            b"EHLO x.test\r\n", b"XFORWARD IDENT=4R2CRASH\r\n", b"MAIL FROM:<alice@example.com>\r\n",
            b"RCPT TO:<crash@lists.example.org>\r\n", b"RCPT TO:<bob@example.net>\r\n", b"DATA\r\n",
            MSG + b".\r\n", b"QUIT\r\n",
        ])
    assert [r[:3] for r in replies[3:7]] == ["250", "250", "250", "354"]
    final = replies[7]
    assert final.startswith("451 4.3.0") and "boom" not in final and "Error" not in final, final
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "queue_id=4R2CRASH" in errors[0] and "boom" in errors[0], errors
    assert scripted.messages == []  # the answer came after the run: nothing was reinjected


def test_an_exception_in_an_smtp_hook_is_451_not_500(proxy: ProxyThread, monkeypatch: pytest.MonkeyPatch) -> None:
    """R2 below the application: aiosmtpd would answer ``500 Error: (ValueError) ...``."""
    assert proxy.server is not None

    async def broken(*args: object) -> str:
        raise ValueError("internal detail")

    monkeypatch.setattr(proxy.server.handler, "handle_RCPT", broken)
    # aiosmtpd looked the hook up at connection time: a new connection sees the patch
    replies = smtp_dialogue(proxy.port, [b"EHLO x.test\r\n", b"MAIL FROM:<a@example.com>\r\n",
                                         b"RCPT TO:<b@example.net>\r\n"])
    assert replies[3].startswith("451 4.3.0") and "internal detail" not in replies[3]


# --------------------------------------------------------------------------- the outbox
def test_outbox_reply_goes_to_reinjection_port_with_null_sender(app_dir: Path) -> None:
    with CaptureServer() as capture, ProxyThread(_config(app_dir, capture.port)) as p:
        send(p.port, "alice@example.com", ["reply@lists.example.org"])
        msgs = capture.wait_for_count(1, timeout=20)
        assert len(msgs) == 1
        assert msgs[0].mail_from in ("", "<>")
        assert msgs[0].rcpt_tos == ("alice@example.com",)
        assert msgs[0].message["Auto-Submitted"] == "auto-replied"


# --------------------------------------------------------------------------- limits and smuggling
SMUGGLE_VARIANTS = {
    "lf-dot-lf": b"\n.\n",
    "cr-dot-cr": b"\r.\r",
    "lf-dot-crlf": b"\n.\r\n",
    "crlf-dot-lf": b"\r\n.\n",
    "cr-dot-crlf": b"\r.\r\n",
    "crlf-dot-cr": b"\r\n.\r",
    "lf-dot-cr": b"\n.\r",
}


@pytest.mark.parametrize("ending", list(SMUGGLE_VARIANTS.values()), ids=list(SMUGGLE_VARIANTS))
def test_only_crlf_dot_crlf_ends_data(proxy: ProxyThread, scripted: ScriptedSMTP, ending: bytes) -> None:
    smuggled = (b"MAIL FROM:<admin@example.com>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
                b"From: admin@example.com\r\nSubject: smuggled\r\n\r\nsmuggled\r\n")
    payload = b"Subject: real\r\n\r\nreal body" + ending + smuggled + b".\r\n"
    replies = smtp_dialogue(proxy.port, [b"EHLO client.test\r\n", b"MAIL FROM:<alice@example.com>\r\n",
                                         b"RCPT TO:<bob@example.net>\r\n", b"DATA\r\n", payload,
                                         b"QUIT\r\n"])
    assert [r[:3] for r in replies] == ["220", "250", "250", "250", "354", "250", "221"]
    assert len(scripted.messages) == 1
    got = scripted.messages[0]
    assert got.commands[1:] == ["RCPT TO:<bob@example.net>"]
    assert b"Subject: smuggled" in got.data  # content, not a second message
    assert got.data.endswith(b"smuggled\r\n")
    assert sum(c.startswith("MAIL") for c in scripted.sessions[-1]) == 1  # one transaction downstream


def test_overlong_line_without_crlf_is_cut_off_early(proxy: ProxyThread, scripted: ScriptedSMTP) -> None:
    total = 64 * 1024 * 1024  # bounded: 64 MiB of one line, never all read
    sent = 0
    reply = ""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=20) as s:
        with s.makefile("rb") as f:  # closed here: an open file keeps the socket's fd
            read_reply(f)
            for line in (b"EHLO client.test\r\n", b"MAIL FROM:<a@example.com>\r\n", b"RCPT TO:<b@example.net>\r\n",
                         b"DATA\r\n"):
                s.sendall(line)
                read_reply(f)
            block = b"x" * 65536
            try:
                while sent < total:
                    s.sendall(block)
                    sent += len(block)
            except OSError:
                pass
            try:
                reply = read_reply(f)
            except OSError:
                reply = "(reset)"
    assert sent < total // 4, f"the server kept reading: {sent} bytes"
    assert reply.startswith("500 5.5.2") or reply in ("", "(reset)")
    assert scripted.messages == []


def test_oversize_message_refused(app_dir: Path, scripted: ScriptedSMTP) -> None:
    with ProxyThread(_config(app_dir, scripted.port, max_size=20_000)) as p:
        with smtplib.SMTP("127.0.0.1", p.port) as s:
            s.ehlo()
            assert int(s.esmtp_features["size"]) == 20_000
            assert s.mail("a@example.com", ["SIZE=30000"])[0] == 452  # deferred by Postfix, not bounced
        big = MSG + b"y" * 76 + b"\r\n"
        big = MSG + (b"y" * 76 + b"\r\n") * 2000
        with pytest.raises((smtplib.SMTPException, OSError)):
            send(p.port, "a@example.com", ["b@example.net"], big)
    assert scripted.messages == []


def test_pipelined_quit_after_the_dot_is_served(proxy: ProxyThread, scripted: ScriptedSMTP) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=20) as s:
        with s.makefile("rb") as f:  # closed here: an open file keeps the socket's fd
            read_reply(f)
            s.sendall(b"EHLO client.test\r\n")
            read_reply(f)
            s.sendall(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
            assert [read_reply(f)[:3] for _ in range(3)] == ["250", "250", "354"]
            s.sendall(MSG + b".\r\nQUIT\r\n")
            assert read_reply(f)[:3] == "250"
            assert read_reply(f)[:3] == "221"
    assert len(scripted.messages) == 1


def test_reinjection_connection_is_reused(proxy: ProxyThread, scripted: ScriptedSMTP) -> None:
    for i in range(3):
        send(proxy.port, "alice@example.com", [f"bob{i}@example.net"])
    assert len(scripted.messages) == 3
    assert len(scripted.sessions) == 1
    wait_for(lambda: True, 1)


def test_half_close_after_pipelined_quit_still_gets_the_reply(proxy: ProxyThread, scripted: ScriptedSMTP) -> None:
    # Exim pipelines QUIT after the final dot and shuts down its sending side
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=20) as s:
        with s.makefile("rb") as f:  # closed here: an open file keeps the socket's fd
            read_reply(f)
            s.sendall(b"EHLO exim.test\r\n")
            read_reply(f)
            s.sendall(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
            assert [read_reply(f)[:3] for _ in range(3)] == ["250", "250", "354"]
            s.sendall(MSG + b".\r\nQUIT\r\n")
            s.shutdown(socket.SHUT_WR)
            assert read_reply(f)[:3] == "250"
            assert read_reply(f)[:3] == "221"
    assert len(scripted.messages) == 1


def test_half_close_without_quit_ends_the_session(proxy: ProxyThread, scripted: ScriptedSMTP) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=20) as s:
        with s.makefile("rb") as f:  # closed here: an open file keeps the socket's fd
            read_reply(f)
            s.sendall(b"EHLO exim.test\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
            assert [read_reply(f)[:3] for _ in range(4)] == ["250", "250", "250", "354"]
            s.sendall(MSG + b".\r\n")
            s.shutdown(socket.SHUT_WR)
            assert read_reply(f)[:3] == "250"
            assert f.read() == b""  # then closed, not a stream of error replies
    assert len(scripted.messages) == 1


# --------------------------------------------------------------------------- retries (R13)
def test_retry_after_failed_reinjection_replays_the_decision(app_dir: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lamsonfilter")
    script = Script(end_of_data="451 4.3.0 try again later")
    dialogue = [b"EHLO postfix.test\r\n", b"XFORWARD IDENT=4RetryQ1 ADDR=192.0.2.7\r\n",
                b"MAIL FROM:<alice@example.com>\r\n", b"RCPT TO:<reply@lists.example.org>\r\n",
                b"RCPT TO:<bob@example.net>\r\n", b"DATA\r\n", MSG + b".\r\n", b"QUIT\r\n"]
    with ScriptedSMTP(script) as down, ProxyThread(_config(app_dir, down.port)) as p:
        first = smtp_dialogue(p.port, dialogue)
        assert first[-2].startswith("451 4.3.0")  # bob's copy was refused downstream
        script.end_of_data = "250 2.0.0 Ok"
        second = smtp_dialogue(p.port, dialogue)  # Postfix retries the same queue file
        assert second[-2].startswith("250")

        def to(rcpt: str) -> list[object]:  # smtplib (the outbox) sends lower-case "rcpt TO:"
            return [m for m in down.messages if f"RCPT TO:<{rcpt.upper()}>" in (c.upper() for c in m.commands)]

        wait_for(lambda: to("alice@example.com"), 20, message="the automatic reply")
        time.sleep(1.5)  # the outbox worker runs every 0.5 s: a second reply would show by now
        assert len(to("bob@example.net")) == 1
        assert len(to("alice@example.com")) == 1  # the handler ran once, its reply went out once
    assert "decision replayed" in caplog.text


# --------------------------------------------------------------------------- the policy listener
def test_policy_service_refuses_unknown_app_addresses(app_dir: Path, scripted: ScriptedSMTP) -> None:
    policy = ("127.0.0.1", free_port())
    with ProxyThread(_config(app_dir, scripted.port, policy=policy)):
        with socket.create_connection(policy, timeout=10) as s:
            with s.makefile("rb") as f:  # closed here: an open file keeps the socket's fd

                def ask(rcpt: str, state: str = "RCPT") -> str:
                    s.sendall(f"request=smtpd_access_policy\nprotocol_state={state}\nprotocol_name=ESMTP\n"
                              f"sender=alice@example.com\nrecipient={rcpt}\n\n".encode())
                    answer = f.readline().decode().strip()
                    assert f.readline() == b"\n"
                    return answer

                assert ask("nobody@lists.example.org").startswith("action=550 5.1.1")
                assert ask("python@lists.example.org") == "action=DUNNO"
                assert ask("bob@example.net") == "action=DUNNO"
                assert ask("nobody@lists.example.org", state="DATA") == "action=DUNNO"
                s.sendall(b"garbage without equals sign\n\n")
                assert f.readline() == b""  # malformed: the connection is closed


# --------------------------------------------------------------------------- the command
def _cli(*args: str, timeout: float = 60) -> "subprocess.CompletedProcess[str]":
    return subprocess.run([sys.executable, "-m", "lamsonfilter.cli", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_cli_refuses_bad_configuration(app_dir: Path, tmp_path: Path) -> None:
    r = _cli("smtpproxy", "--app", str(app_dir), "--listen", "0.0.0.0:10025")
    assert r.returncode == 2 and "not a loopback address" in r.stderr and "--allow-remote" in r.stderr
    r = _cli("smtpproxy", "--app", str(app_dir), "--database", f"sqlite:///{tmp_path}/empty.db",
             "--listen", f"127.0.0.1:{free_port()}")
    assert r.returncode == 2 and "lamsonfilter db init" in r.stderr
    r = _cli("smtpproxy", "--app", str(app_dir), "--listen", "127.0.0.1:10026", "--reinject", "127.0.0.1:10026")
    assert r.returncode == 2 and "loop" in r.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = _cli("smtpproxy", "--app", str(app_dir), "--listen", f"127.0.0.1:{taken.getsockname()[1]}")
    assert r.returncode == 2 and "cannot listen on" in r.stderr
    r = _cli("smtpproxy", "--app", str(app_dir), "--deadline", "900")
    assert r.returncode == 2 and "600" in r.stderr
    assert "Traceback" not in r.stderr


@contextlib.contextmanager
def _workers(app: Path, port: int, reinject_port: int, n: int = 2) -> Iterator[subprocess.Popen[bytes]]:
    """``lamsonfilter smtpproxy --workers n`` as a process of this test; killed (by PID) if still
    running when the block ends."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "lamsonfilter.cli", "smtpproxy", "--app", str(app), "--listen",
         f"127.0.0.1:{port}", "--reinject", f"127.0.0.1:{reinject_port}", "--workers", str(n)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        if proc.poll() is None:  # a failed test: its workers would outlive a killed parent
            workers = _child_pids(proc.pid)
            proc.kill()
            proc.wait(10)
            for pid in workers:  # this daemon's own workers, by PID
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        assert proc.stderr is not None
        proc.stderr.close()


def test_cli_workers_share_the_port_and_stop_on_sigterm(app_dir: Path) -> None:
    port = free_port()
    with CaptureServer() as capture, _workers(app_dir, port, capture.port) as proc:
        wait_for(lambda: proc.poll() is not None or _children(proc.pid) == 2 and _accepts(port), 30,
                 message="two workers")
        assert proc.poll() is None
        for i in range(8):
            send(port, "alice@example.com", [f"bob{i}@example.net"])
        send(port, "alice@example.com", ["reply@lists.example.org"])  # outbox sent by the parent
        capture.wait_for_count(9, timeout=30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(40) == 0
    assert sorted(m.rcpt_tos[0] for m in capture.messages)[:1] == ["alice@example.com"]


def test_cli_workers_metrics_are_summed_over_the_workers_and_survive_a_restart(tmp_path: Path) -> None:
    """--workers 2 with METRICS: the parent's endpoint counts what both workers processed (the
    kernel spreads connections over them), and the counts of a worker killed with SIGKILL stay."""
    import urllib.request

    metrics_port = free_port()
    app = make_app(tmp_path / "app", f'\nMETRICS = "127.0.0.1:{metrics_port}"\n')
    port = free_port()

    def scrape() -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line.startswith("lamsonfilter_") and " " in line}

    def delivered() -> float:
        return scrape().get('lamsonfilter_messages_total{decision="deliver"}', 0.0)

    with CaptureServer() as capture, _workers(app, port, capture.port) as proc:
        wait_for(lambda: proc.poll() is not None or _children(proc.pid) == 2 and _accepts(port)
                 and _accepts(metrics_port), 30, message="two workers and the metrics endpoint")
        assert proc.poll() is None
        workers = set(_child_pids(proc.pid))
        for i in range(12):
            send(port, "alice@example.com", [f"bob{i}@example.net"])
        capture.wait_for_count(12, timeout=30)
        assert delivered() == 12.0
        victim = sorted(workers)[0]
        os.kill(victim, signal.SIGKILL)  # a worker this test's daemon started, by PID
        wait_for(lambda: len(set(_child_pids(proc.pid)) - {victim}) == 2 and _accepts(port), 30,
                 message="the dead worker replaced")
        for i in range(3):
            send(port, "alice@example.com", [f"carol{i}@example.net"])
        capture.wait_for_count(15, timeout=30)
        assert delivered() == 15.0  # what the killed worker had counted is still there
        assert scrape()["lamsonfilter_processing_seconds_count"] == 15.0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(40) == 0


def test_cli_workers_with_a_taken_metrics_port_exit_2_and_leave_no_worker(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        app = make_app(tmp_path / "app", f'\nMETRICS = "127.0.0.1:{taken.getsockname()[1]}"\n')
        port = free_port()
        r = _cli("smtpproxy", "--app", str(app), "--listen", f"127.0.0.1:{port}", "--reinject",
                 f"127.0.0.1:{free_port()}", "--workers", "2")
    assert r.returncode == 2 and "METRICS" in r.stderr and "Address already in use" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not _accepts(port)  # the workers forked before the endpoint failed are gone


def _child_pids(pid: int) -> list[int]:
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return []
    return [int(p) for p in out.split()]


def _children(pid: int) -> int:
    return len(_child_pids(pid))


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- the reinjection listener's processes
def test_idle_reinjection_connections_are_closed_soon(proxy: ProxyThread, scripted: ScriptedSMTP) -> None:
    # a kept connection holds one of the listener's smtpd processes (maxproc): give it back
    send(proxy.port, "alice@example.com", ["bob@example.net"])
    wait_for(lambda: scripted.sessions and scripted.sessions[0][-1:] == ["QUIT"], 10,
             message=lambda: f"QUIT on the idle connection: {scripted.sessions}")


def test_listener_that_never_greets_is_a_quick_451(app_dir: Path) -> None:
    with socket.socket() as busy:  # accepts (kernel backlog) but never answers, like a full smtpd
        busy.bind(("127.0.0.1", 0))
        busy.listen(16)
        with ProxyThread(_config(app_dir, busy.getsockname()[1], deadline=3.0)) as p:
            started = time.monotonic()
            with pytest.raises(smtplib.SMTPDataError) as info:
                send(p.port, "alice@example.com", ["bob@example.net"])
            assert info.value.smtp_code == 451
            assert time.monotonic() - started < 2.9  # the greeting timeout (deadline / 3), not the deadline
