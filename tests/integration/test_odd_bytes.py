"""Mail with NUL bytes and other odd bytes through a real Postfix, in every mode.

Postfix accepts a message with NUL bytes, bare CR or LF, unencoded 8-bit
headers and over-long lines, and passes it on; the milter and the content
filter get it as Postfix hands it over and must decide it like any other
mail (issue 13): delivered where the application delivers, answered where it
answers, never deferred or refused for its bytes.  The `deployment` fixture
(tests/integration/test_scenarios.py) runs each test once per mode.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.rig.deploy import LIST_HOST, Deployment
from tests.rig.modes import deployment  # noqa: F401  (the fixture, parametrized by mode)

ODD = Path(__file__).resolve().parents[1] / "corpus" / "odd-bytes"
ALICE = "alice@example.com"


def odd_message(to: str, subject: str) -> bytes:
    """NUL bytes in a header and the body (and as the last byte), 8-bit header bytes, a bare LF,
    a bare CR, a line of 5,000 octets."""
    return (
        f"From: Alice <{ALICE}>\r\nTo: {to}\r\nSubject: {subject}\r\n".encode()
        + b"X-Odd: nul \x00 in a header\r\n"
        + "X-Name: J\u00fcrgen M\u00fcller\r\n".encode()
        + f"Message-ID: <{uuid.uuid4().hex}@example.com>\r\n\r\n".encode()
        + b"a NUL \x00 in the body\r\nbare LF\nbare CR\rnext\r\n" + b"y" * 5000 + b"\r\nlast line\r\n\x00"
    )


# Not in queue mode: there a handler's delivery to the application's own domain is put on hold by the
# outbox listener (master.cf.queue), as in tests/integration/test_scenarios.py.
@pytest.mark.parametrize("deployment", ["milter", "smtpproxy"], indirect=True)
def test_a_message_with_a_nul_byte_is_processed_and_delivered(deployment: Deployment) -> None:
    tag = f"tag@{LIST_HOST}"
    result = deployment.send_message_bytes(ALICE, [tag], odd_message(tag, "odd bytes to tag"))
    deployment.assert_accepted(result)
    (msg,) = deployment.wait_for_mail(tag, subject_contains="odd bytes to tag")
    # the application ran: its header is there, and the body came through
    assert msg.header_values("X-Lamsonfilter-Test") == ["tagged"]
    assert b"a NUL \x00 in the body" in msg.data and b"last line" in msg.data


def test_a_message_with_a_nul_byte_is_answered_like_any_other(deployment: Deployment) -> None:
    help_addr = f"help@{LIST_HOST}"
    result = deployment.send_message_bytes(ALICE, [help_addr], odd_message(help_addr, "odd bytes, help"))
    deployment.assert_accepted(result)
    (reply,) = deployment.wait_for_mail(ALICE, subject_contains="odd bytes, help")
    assert reply.message["Auto-Submitted"] == "auto-replied"


def test_a_real_bounce_ending_in_a_nul_byte_is_handled_and_not_answered(deployment: Deployment) -> None:
    raw = (ODD / "postfix-bounce-nul-terminated.eml").read_bytes()
    assert raw.endswith(b"\x00")
    help_addr = f"help@{LIST_HOST}"
    deployment.assert_accepted(deployment.send_message_bytes("", [help_addr], raw))
    deployment.settle()
    # consumed by the application (the help route drops what it answers), and no reply to a bounce:
    # all that reached the destination is settle()'s marker (one per listener it goes through)
    assert deployment.capture.messages
    assert {m.rcpt_tos for m in deployment.capture.messages} == {("sink@example.net",)}
