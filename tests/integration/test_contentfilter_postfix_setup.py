"""The content filter follows Postfix's configuration (``--postfix-config``), through a real Postfix:
its SIZE is at least ``message_size_limit`` (a 12 MB message is delivered, not bounced), and a
reinjection listener that filters again after ``postfix reload`` does not loop mail through it.
"""

from __future__ import annotations

import re
import signal
import uuid
from pathlib import Path

import pytest

from tests.rig.contentfilter import ContentFilterSetup, wait_quiet
from tests.rig.fixtures import PostfixFactory
from tests.rig.postfix import CaptureServer, wait_for
from tests.rig.proxy import make_app

pytestmark = pytest.mark.postfix

WAIT = 120.0


def big_message(subject: str, size: int) -> bytes:
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789ab\r\n"
    head = (f"From: alice@example.com\r\nTo: bob@example.net\r\nSubject: {subject}\r\n"
            f"Message-ID: <{uuid.uuid4().hex}@example.com>\r\n\r\n").encode()
    return head + line * (size // len(line))


def test_a_12_mb_message_accepted_by_postfix_is_delivered_not_bounced(
        postfix_factory: PostfixFactory, capture: CaptureServer, tmp_path: Path) -> None:
    cf = ContentFilterSetup(postfix_factory, capture, make_app(tmp_path / "app"),
                            main_cf={"message_size_limit": "52428800"})
    cf.extra_args = ("--postfix-config", str(cf.postfix.config_dir))  # --max-size left at its default
    try:
        cf.start()
        assert "announcing SIZE 52428800" in cf.filter_log()
        raw = big_message("twelve megabytes", 12 * 1024 * 1024)
        assert not cf.send("alice@example.com", ["bob@example.net"], raw)
        got = capture.wait_for_count(1, timeout=WAIT)
        assert got[0].rcpt_tos == ("bob@example.net",) and len(got[0].data) >= len(raw)
        maillog = cf.postfix.maillog()
        assert "status=bounced" not in maillog and "exceeds size limit" not in maillog
    finally:
        cf.stop_filter()


def filter_passes(cf: ContentFilterSetup, status: str) -> list[str]:
    rx = re.compile(rf"relay=127\.0\.0\.1\[127\.0\.0\.1\]:{cf.filter_port},.*status={status}")
    return [line for line in cf.postfix.maillog().splitlines() if rx.search(line)]


def test_a_reinjection_listener_that_filters_again_does_not_loop_mail(
        postfix_factory: PostfixFactory, capture: CaptureServer, tmp_path: Path) -> None:
    cf = ContentFilterSetup(postfix_factory, capture, make_app(tmp_path / "app"))
    cf.extra_args = ("--postfix-config", str(cf.postfix.config_dir))
    service = f"127.0.0.1:{cf.reinject_port}/inet"
    try:
        cf.start()  # the set-up is safe at start: the loop guard lets it run
        # what the administrator did: the 10026 service loses -o content_filter=, postfix reload
        cf.postfix.postconf("-PX", f"{service}/content_filter")
        cf.postfix.reload()
        assert cf.proc is not None
        cf.proc.send_signal(signal.SIGHUP)  # the reload runs the loop guard again and says so
        wait_for(lambda: re.search(r"reload: the Postfix configuration in .* is not safe: PF111", cf.filter_log()),
                 30, message=cf.filter_log)

        cf.send("alice@example.com", ["tag@lists.example.org"],
                b"From: alice@example.com\r\nTo: tag@lists.example.org\r\nSubject: loop\r\n"
                b"Message-ID: <loop-test@example.com>\r\n\r\nhello\r\n")
        wait_for(lambda: len(filter_passes(cf, "deferred")) >= 2, WAIT,
                 message=lambda: f"two deferrals\n{cf.postfix.maillog_tail()}\n{cf.filter_log()}")
        log = cf.filter_log()
        assert "mail loop: this message was reinjected by lamsonfilter" in log
        assert all("451 4.4.6" in line for line in filter_passes(cf, "deferred"))
        assert len(filter_passes(cf, "sent")) == 1, "processed once, then held: not 49 passes"
        assert len(re.findall(r"routes=proxytest", log)) == 1, "the handlers ran once"
        assert not capture.messages and len(cf.queue_ids()) == 1  # held in Postfix's queue

        # the administrator puts the line back: the held message is passed on and delivered once
        cf.postfix.postconf("-P", f"{service}/content_filter=")
        cf.postfix.reload()
        cf.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "passes the loop guard" in cf.filter_log(), 30, message=cf.filter_log)
        got = capture.wait_for_count(1, timeout=WAIT)
        cf.wait_queue_empty(WAIT)
        wait_quiet(1.0)  # a second copy would already be on its way: the queue was empty
        assert len(capture.messages) == 1
        assert got[0].rcpt_tos == ("tag@lists.example.org",)
        assert got[0].message["X-Lamsonfilter-Test"] == "tagged"
        assert len(got[0].header_values("Received")) < 8
        assert "passed on unchanged" in cf.filter_log()
        assert len(re.findall(r"routes=proxytest", cf.filter_log())) == 1
    finally:
        cf.stop_filter()
