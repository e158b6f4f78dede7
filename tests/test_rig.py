"""The integration-test rig itself: a private Postfix relays to the capture server."""

from __future__ import annotations

import re
import smtplib
import subprocess
from email.message import EmailMessage

import pytest

from tests.rig.fixtures import PostfixFactory, require
from tests.rig.postfix import CaptureServer, by_subject, find_binary

pytestmark = pytest.mark.postfix

# Postfix's smtpd writes e.g.
#   Received: from client.example.test (unknown [127.0.0.1])
#           by rig.localdomain (Postfix) with ESMTP id 4Xyz...
POSTFIX_RECEIVED = re.compile(r"^from (\S+) \(unknown \[([0-9.]+)\]\)\s+by rig\.localdomain \(Postfix\) with E?SMTP")


def postfix_received(value: str) -> tuple[str, str]:
    m = POSTFIX_RECEIVED.match(value)
    assert m, f"not a Received: header of the private Postfix: {value!r}"
    return m.group(1), m.group(2)


def swaks(*args: str) -> subprocess.CompletedProcess[str]:
    require("swaks")
    binary = find_binary("swaks")
    assert binary is not None
    proc = subprocess.run(
        [binary, "--timeout", "20", *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, f"swaks exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_relays_swaks_and_smtplib_mail_to_capture(
    postfix_factory: PostfixFactory, capture: CaptureServer
) -> None:
    require("swaks")
    pf = postfix_factory()
    assert pf.postconf("-h", "inet_interfaces").strip() == "loopback-only"
    assert pf.postconf("-h", "default_transport").strip() == f"smtp:[127.0.0.1]:{capture.port}"

    swaks(
        "--server", f"127.0.0.1:{pf.smtpd_port}",
        "--helo", "client.example.test",
        "--from", "alice@example.test",
        "--to", "bob@example.org",
        "--header", "Subject: rig swaks",
        "--body", "sent with swaks",
    )
    capture.wait_for_count(1, timeout=30)

    msg = EmailMessage()
    msg["From"] = "carol@example.test"
    msg["To"] = "dave@example.org, erin@example.net"
    msg["Subject"] = "rig smtplib"
    msg.set_content("sent with smtplib\n")
    with smtplib.SMTP("127.0.0.1", pf.smtpd_port, local_hostname="client.example.test", timeout=20) as s:
        refused = s.send_message(msg, "carol@example.test", ["dave@example.org", "erin@example.net"])
    assert refused == {}
    messages = capture.wait_for_count(2, timeout=30)
    assert len(messages) == 2

    m1 = by_subject(messages, "rig swaks")
    assert m1.mail_from == "alice@example.test"
    assert m1.rcpt_tos == ("bob@example.org",)
    assert postfix_received(m1.header_values("Received")[0]) == ("client.example.test", "127.0.0.1")
    assert b"sent with swaks" in m1.data
    assert m1.peer is not None and m1.peer[0] == "127.0.0.1"
    assert m1.helo == "rig.localdomain"

    m2 = by_subject(messages, "rig smtplib")
    assert m2.mail_from == "carol@example.test"
    assert sorted(m2.rcpt_tos) == ["dave@example.org", "erin@example.net"]
    assert postfix_received(m2.header_values("Received")[0]) == ("client.example.test", "127.0.0.1")
    assert m2.data.endswith(b"\r\n\r\nsent with smtplib\r\n")  # wire format: CRLF

    pf.wait_for(lambda: pf.queue() == [], timeout=10)
    log = pf.maillog()
    assert "status=sent" in log
    assert f"relay=127.0.0.1[127.0.0.1]:{capture.port}" in log


def test_xclient_client_poses_as_remote(postfix_factory: PostfixFactory, capture: CaptureServer) -> None:
    pf = postfix_factory()
    swaks(
        "--server", f"127.0.0.1:{pf.smtpd_port}",
        "--xclient-addr", "192.0.2.10",
        "--xclient-name", "[UNAVAILABLE]",
        "--helo", "remote.example.net",
        "--from", "remote@example.net",
        "--to", "list@example.test",
        "--header", "Subject: rig xclient",
    )
    (m,) = capture.wait_for_count(1, timeout=30)
    assert m.rcpt_tos == ("list@example.test",)
    assert postfix_received(m.header_values("Received")[0])[1] == "192.0.2.10"


def test_deferred_mail_is_delivered_after_flush(
    postfix_factory: PostfixFactory, capture: CaptureServer
) -> None:
    capture.reply = "451 4.3.0 rig: try again later"  # the destination tempfails
    pf = postfix_factory()
    with smtplib.SMTP("127.0.0.1", pf.smtpd_port, local_hostname="client.example.test", timeout=20) as s:
        s.sendmail("a@example.test", ["b@example.org"], b"Subject: rig deferred\r\n\r\nlater\r\n")
    queued = pf.wait_for(
        lambda: [q for q in pf.queue() if q["queue_name"] == "deferred"], timeout=20
    )
    assert queued[0]["sender"] == "a@example.test"
    (rcpt,) = queued[0]["recipients"]
    assert rcpt["address"] == "b@example.org"
    assert "451 4.3.0 rig: try again later" in rcpt["delay_reason"]
    assert capture.messages == []

    capture.reply = "250 2.0.0 Ok: captured"
    pf.flush()
    (m,) = capture.wait_for_count(1, timeout=30)
    assert m.rcpt_tos == ("b@example.org",)
    pf.wait_for(lambda: pf.queue() == [], timeout=10)
