"""Content-filter mode through a real private Postfix: reinjection, deferral, envelope and bytes.

Postfix (conf/postfix/*.content_filter, ports changed) → ``lamsonfilter
smtpproxy`` subprocess → Postfix's reinjection smtpd → the capture server.
"""

from __future__ import annotations

from typing import Iterator

import pytest

from tests.rig.deploy import wait_quiet
from tests.rig.deploy_smtpproxy import (
    SmtpproxyDeployment,
    shipped_main_cf,
    shipped_master_cf,
    strip_received,
)
from tests.rig.fixtures import PostfixFactory
from tests.rig.modes import started
from tests.rig.postfix import CaptureServer
from tests.rig.proxy import make_app

pytestmark = pytest.mark.postfix


def message(subject: str, extra: bytes = b"") -> bytes:
    return (
        b"From: Alice <alice@example.com>\r\n"
        b"To: list <python@lists.example.org>\r\n"
        b"Subject: " + subject.encode() + b"\r\n"
        b"Date: Sun, 22 Nov 2026 00:00:00 +0000\r\n"
        b"Message-ID: <" + subject.replace(" ", "-").encode() + b"@example.com>\r\n"
        + extra +
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n"
        b"Hello,\r\n"
        b".a line starting with a dot\r\n"
        b"8bit: \xc3\xa9t\xc3\xa9\r\n"
    )


@pytest.fixture
def setup(capture: CaptureServer) -> Iterator[SmtpproxyDeployment]:
    """The shipped set-up without the policy service: Postfix itself bounces unknown addresses."""
    with started(SmtpproxyDeployment(app=make_app, policy=False, capture=capture)) as cf:
        yield cf


def test_shipped_postfix_files_load(postfix_factory: PostfixFactory, capture: CaptureServer) -> None:
    pf = postfix_factory(relay_port=capture.port, main_cf=shipped_main_cf(10025, 10027),
                         master_cf_extra=shipped_master_cf(10026), start=False)
    n = pf.postconf("-n")
    assert "content_filter = lamsonfilter:[127.0.0.1]:10025" in n
    assert "receive_override_options = no_address_mappings" in n
    services = pf.postconf("-M")
    assert any(l.split()[:2] == ["lamsonfilter", "unix"] and l.split()[7] == "smtp" for l in services.splitlines())
    assert any(l.split()[:2] == ["lamsonfilter-lmtp", "unix"] and l.split()[7] == "lmtp"
               for l in services.splitlines())
    overrides = set(pf.postconf("-P").splitlines())
    for line in (
        "lamsonfilter/unix/smtp_send_xforward_command = yes",
        "lamsonfilter/unix/disable_mime_output_conversion = yes",
        "lamsonfilter/unix/smtp_generic_maps =",
        "lamsonfilter-lmtp/unix/lmtp_send_xforward_command = yes",
        "127.0.0.1:10026/inet/content_filter =",
        "127.0.0.1:10026/inet/receive_override_options = no_unknown_recipient_checks,no_header_body_checks,no_milters",
        "127.0.0.1:10026/inet/smtpd_recipient_restrictions = permit_mynetworks,reject",
        "127.0.0.1:10026/inet/mynetworks = 127.0.0.0/8",
        "127.0.0.1:10026/inet/smtpd_authorized_xforward_hosts = 127.0.0.0/8",
        "127.0.0.1:10026/inet/smtpd_relay_restrictions =",
    ):
        assert line in overrides, line
    pf._run("postfix", "check")


def test_unchanged_message_arrives_byte_for_byte_with_its_envelope(setup: SmtpproxyDeployment,
                                                                   capture: CaptureServer) -> None:
    raw = message("bytes check")
    # the null sender and a recipient that appears in no header (Bcc-only)
    assert not setup.submit("", ["bcc-only@example.net", "carol@example.org"], raw).refused
    got = capture.wait_for_count(1, timeout=60)
    assert len(got) == 1
    assert got[0].mail_from in ("", "<>")
    assert sorted(got[0].rcpt_tos) == ["bcc-only@example.net", "carol@example.org"]
    assert strip_received(got[0].data) == raw
    assert setup.pf.maillog().count("status=sent") >= 2  # into the filter, then to the capture
    wait_quiet(1.0)
    assert len(capture.messages) == 1


def test_header_change_reaches_the_destination(setup: SmtpproxyDeployment, capture: CaptureServer) -> None:
    setup.submit("alice@example.com", ["tag@lists.example.org"], message("tag me"))
    got = capture.wait_for_count(1, timeout=60)[0]
    assert got.message["X-Lamsonfilter-Test"] == "tagged"


def test_reinjection_down_defers_then_delivers_each_once(setup: SmtpproxyDeployment, capture: CaptureServer) -> None:
    setup.stop_reinjection()
    for i in range(3):
        setup.submit("alice@example.com", [f"bob{i}@example.net"], message(f"deferred {i}"))
    setup.wait_deferred(3, r"status=deferred.*451 4\.3\.0")
    assert len(setup.queue_ids()) == 3
    assert capture.messages == []
    assert "status=bounced" not in setup.pf.maillog()
    setup.start_reinjection()
    setup.pf.flush()
    got = capture.wait_for_count(3, timeout=90)
    setup.wait_queue_empty()
    wait_quiet(2.0)
    subjects = sorted(m.message["Subject"] for m in capture.messages)
    assert subjects == [f"deferred {i}" for i in range(3)]  # each exactly once
    assert all(m.mail_from == "alice@example.com" for m in got)


def test_filter_down_defers_then_delivers(setup: SmtpproxyDeployment, capture: CaptureServer) -> None:
    setup.kill_filter()
    setup.submit("alice@example.com", ["bob@example.net"], message("filter down"))
    setup.wait_deferred(1)
    assert capture.messages == []
    setup.start_filter()
    setup.pf.flush()
    capture.wait_for_count(1, timeout=90)
    setup.wait_queue_empty()
    assert [m.message["Subject"] for m in capture.messages] == ["filter down"]


def test_handler_exception_defers_without_bounce_or_reply(setup: SmtpproxyDeployment, capture: CaptureServer) -> None:
    setup.submit("alice@example.com", ["crash@lists.example.org"], message("crash"))
    lines = setup.wait_deferred(1, r"status=deferred.*451 4\.3\.0")
    assert "boom" not in lines[0] and "RuntimeError" not in lines[0]
    assert len(setup.queue_ids()) == 1
    wait_quiet(2.0)
    assert capture.messages == []  # neither the message, nor a reply, nor a DSN
    assert "status=bounced" not in setup.pf.maillog()


def test_unknown_address_bounces_from_postfix_to_the_sender(setup: SmtpproxyDeployment,
                                                             capture: CaptureServer) -> None:
    setup.submit("alice@example.com", ["nobody@lists.example.org"], message("unknown"))
    dsn = capture.wait_for_count(1, timeout=60)[0]
    assert dsn.mail_from in ("", "<>") and dsn.rcpt_tos == ("alice@example.com",)
    assert b"550 5.1.1" in dsn.data and b"nobody@lists.example.org" in dsn.data


def test_subscribe_confirm_post(setup: SmtpproxyDeployment, capture: CaptureServer) -> None:
    setup.submit("alice@example.com", ["python-subscribe@lists.example.org"], message("subscribe"))
    confirm = capture.wait_for_count(1, timeout=60)[0]
    assert confirm.mail_from in ("", "<>") and confirm.rcpt_tos == ("alice@example.com",)
    reply_to = str(confirm.message["From"])
    token_addr = reply_to[reply_to.index("python-confirm-"):].rstrip(">")
    setup.submit("alice@example.com", [token_addr], message("confirm"))
    welcome = capture.wait_for_count(2, timeout=60)[1]
    assert welcome.rcpt_tos == ("alice@example.com",)
    setup.submit("alice@example.com", ["python@lists.example.org"], message("a post"))
    post = capture.wait_for_count(3, timeout=60)[2]
    assert post.rcpt_tos == ("alice@example.com",)
    assert post.mail_from.startswith("python-bounce-alice=example.com@")
    assert post.message["List-Id"] and post.message["Subject"] == "a post"


def test_lmtp_feed_gives_one_status_per_recipient(capture: CaptureServer) -> None:
    with started(SmtpproxyDeployment(lmtp=True, app=make_app, policy=False, capture=capture)) as cf:
        cf.submit("alice@example.com", ["refuse@lists.example.org", "tag@lists.example.org"], message("lmtp"))
        got = capture.wait_for_count(2, timeout=60)  # tag@'s copy, and the DSN for refuse@ only
        delivered = [m for m in got if m.rcpt_tos == ("tag@lists.example.org",)]
        dsn = [m for m in got if m.rcpt_tos == ("alice@example.com",)]
        assert len(delivered) == 1 and delivered[0].message["X-Lamsonfilter-Test"] == "tagged"
        assert len(dsn) == 1 and b"refuse@lists.example.org" in dsn[0].data and b"5.7.1" in dsn[0].data
        assert "relay=127.0.0.1[127.0.0.1]:%d" % cf.filter_port in cf.pf.maillog()
        assert "lamsonfilter-lmtp" in cf.pf.postconf("-h", "content_filter")
