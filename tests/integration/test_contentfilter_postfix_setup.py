"""The content filter follows Postfix's configuration (``--postfix-config``), through a real Postfix:
its SIZE is at least ``message_size_limit`` (a 12 MB message is delivered, not bounced), and a
reinjection listener that filters again after ``postfix reload`` does not loop mail through it.
"""

from __future__ import annotations

import re
import signal
import uuid

import pytest

from tests.rig.deploy import wait_quiet
from tests.rig.deploy_smtpproxy import SmtpproxyDeployment
from tests.rig.modes import started
from tests.rig.postfix import CaptureServer, wait_for
from tests.rig.proxy import make_app

pytestmark = pytest.mark.postfix

WAIT = 120.0


def big_message(subject: str, size: int) -> bytes:
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789ab\r\n"
    head = (f"From: alice@example.com\r\nTo: bob@example.net\r\nSubject: {subject}\r\n"
            f"Message-ID: <{uuid.uuid4().hex}@example.com>\r\n\r\n").encode()
    return head + line * (size // len(line))


def test_a_12_mb_message_accepted_by_postfix_is_delivered_not_bounced(capture: CaptureServer) -> None:
    # --postfix-config: the private Postfix's configuration; --max-size left at its default
    with started(SmtpproxyDeployment(app=make_app, policy=False, capture=capture, postfix_config=True,
                                     main_cf={"message_size_limit": "52428800"})) as cf:
        assert "announcing SIZE 52428800" in cf.filter_output()
        raw = big_message("twelve megabytes", 12 * 1024 * 1024)
        assert not cf.submit("alice@example.com", ["bob@example.net"], raw).refused
        got = capture.wait_for_count(1, timeout=WAIT)
        assert got[0].rcpt_tos == ("bob@example.net",) and len(got[0].data) >= len(raw)
        maillog = cf.pf.maillog()
        assert "status=bounced" not in maillog and "exceeds size limit" not in maillog


def filter_passes(cf: SmtpproxyDeployment, status: str) -> list[str]:
    rx = re.compile(rf"relay=127\.0\.0\.1\[127\.0\.0\.1\]:{cf.filter_port},.*status={status}")
    return [line for line in cf.pf.maillog().splitlines() if rx.search(line)]


def test_a_reinjection_listener_that_filters_again_does_not_loop_mail(capture: CaptureServer) -> None:
    # the set-up is safe at start: the loop guard lets it run
    with started(SmtpproxyDeployment(app=make_app, policy=False, capture=capture, postfix_config=True)) as cf:
        service = f"127.0.0.1:{cf.relay_port}/inet"
        # what the administrator did: the 10026 service loses -o content_filter=, postfix reload
        cf.pf.postconf("-PX", f"{service}/content_filter")
        cf.pf.reload()
        assert cf.filter_proc is not None
        cf.filter_proc.send_signal(signal.SIGHUP)  # the reload runs the loop guard again and says so
        wait_for(lambda: re.search(r"reload: the Postfix configuration in .* is not safe: PF111", cf.filter_output()),
                 30, message=cf.filter_output)

        cf.submit("alice@example.com", ["tag@lists.example.org"],
                b"From: alice@example.com\r\nTo: tag@lists.example.org\r\nSubject: loop\r\n"
                b"Message-ID: <loop-test@example.com>\r\n\r\nhello\r\n")
        wait_for(lambda: len(filter_passes(cf, "deferred")) >= 2, WAIT,
                 message=lambda: f"two deferrals\n{cf.pf.maillog_tail()}\n{cf.filter_output()}")
        log = cf.filter_output()
        assert "mail loop: this message was reinjected by lamsonfilter" in log
        assert all("451 4.4.6" in line for line in filter_passes(cf, "deferred"))
        assert len(filter_passes(cf, "sent")) == 1, "processed once, then held: not 49 passes"
        assert len(re.findall(r"routes=proxytest", log)) == 1, "the handlers ran once"
        assert not capture.messages and len(cf.queue_ids()) == 1  # held in Postfix's queue

        # the administrator puts the line back: the held message is passed on and delivered once
        cf.pf.postconf("-P", f"{service}/content_filter=")
        cf.pf.reload()
        cf.filter_proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "passes the loop guard" in cf.filter_output(), 30, message=cf.filter_output)
        got = capture.wait_for_count(1, timeout=WAIT)
        cf.wait_queue_empty(WAIT)
        wait_quiet(1.0)  # a second copy would already be on its way: the queue was empty
        assert len(capture.messages) == 1
        assert got[0].rcpt_tos == ("tag@lists.example.org",)
        assert got[0].message["X-Lamsonfilter-Test"] == "tagged"
        assert len(got[0].header_values("Received")) < 8
        assert "passed on unchanged" in cf.filter_output()
        assert len(re.findall(r"routes=proxytest", cf.filter_output())) == 1
