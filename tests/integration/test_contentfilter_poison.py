"""A broken handler keeps mail in Postfix's queue; only a message that kills the filter is quarantined,
with its whole envelope, and ``lamsonfilter quarantine release`` sends it on.  Through a real Postfix.

Postfix (the shipped content-filter files, loopback ports) → ``lamsonfilter smtpproxy`` (a
subprocess) → Postfix's reinjection smtpd → the capture server.  Retries come from the rig's
short backoff (3-6 s); every wait is bounded.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.rig.deploy_smtpproxy import SmtpproxyDeployment
from tests.rig.handlers import handler_source
from tests.rig.modes import started
from tests.rig.postfix import CaptureServer, wait_for
from tests.rig.proxy import make_app

pytestmark = pytest.mark.postfix

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 2  # POISON_LIMIT of the test application
WAIT = 120.0

BROKEN = handler_source("bugs")  # tests/fixtures/handlers/bugs.py
FIXED = BROKEN.replace("ctx.add_header(\"X-Fixed\", fixed_value)  # NameError: the bug",
                       "ctx.add_header(\"X-Fixed\", \"yes\")")


def app_with_bugs(target: Path) -> Path:
    app = make_app(target, f'HANDLERS = HANDLERS + ["bugs"]\nPOISON_LIMIT = {LIMIT}\n')
    (app / "app" / "handlers" / "bugs.py").write_text(BROKEN)
    return app


def mail(subject: str, to: str) -> bytes:
    return (f"From: alice@example.com\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@example.com>\r\n\r\nbody\r\n").encode()


def filter_hops(cf: SmtpproxyDeployment) -> list[str]:
    """maillog lines of deliveries to the filter port that were deferred."""
    rx = re.compile(rf"relay=127\.0\.0\.1\[127\.0\.0\.1\]:{cf.filter_port},.*status=deferred")
    return [line for line in cf.pf.maillog().splitlines() if rx.search(line)]


def bugs_filter(capture: CaptureServer) -> SmtpproxyDeployment:
    """The shipped content-filter set-up (no policy service) running `app_with_bugs`."""
    return SmtpproxyDeployment(app=app_with_bugs, policy=False, capture=capture)


def quarantine(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lamsonfilter", "quarantine", *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_a_handler_exception_stays_deferred_past_the_poison_limit_then_delivered_once_after_the_fix(
        capture: CaptureServer) -> None:
    with started(bugs_filter(capture)) as cf:
        app = cf.app_dir
        cf.submit("alice@example.com", ["bug@lists.example.org"], mail("broken deploy", "bug@lists.example.org"))
        # more attempts than POISON_LIMIT, each answered 451 by a filter that stays up
        wait_for(lambda: len(filter_hops(cf)) >= LIMIT + 2, WAIT,
                 message=lambda: f"{LIMIT + 2} deferrals; maillog:\n{cf.pf.maillog_tail()}\n{cf.filter_output()}")
        hops = filter_hops(cf)
        assert all("451 4.3.0" in line for line in hops), hops
        assert len(cf.queue_ids()) == 1, "the message stays in Postfix's queue"
        log = cf.filter_output()
        assert "NameError" in log and "quarantined" not in log, log
        assert not list((app / "var" / "quarantine" / "new").iterdir())
        assert not capture.messages

        (app / "app" / "handlers" / "bugs.py").write_text(FIXED)
        assert cf.filter_proc is not None
        cf.filter_proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reloaded" in cf.filter_output(), 30, message=cf.filter_output)
        delivered = capture.wait_for_count(1, timeout=WAIT)
        cf.wait_queue_empty(WAIT)
        assert len(capture.messages) == 1
        assert delivered[0].rcpt_tos == ("bug@lists.example.org",)
        assert delivered[0].message["X-Fixed"] == "yes"
        assert "status=bounced" not in cf.pf.maillog()


def test_a_message_that_kills_the_filter_is_quarantined_with_its_envelope_and_released(
        capture: CaptureServer) -> None:
    rcpts = ["die@lists.example.org", "hidden.bcc@example.net"]  # the second one only in the envelope
    with started(bugs_filter(capture)) as cf:
        app = cf.app_dir
        qdir = app / "var" / "quarantine"
        cf.submit("alice@example.com", rcpts, mail("lethal", "die@lists.example.org"))
        for _ in range(LIMIT + 2):  # bounded: LIMIT deaths, then the quarantine
            proc = cf.filter_proc
            assert proc is not None
            wait_for(lambda p=proc: p.poll() is not None or "quarantined as" in cf.filter_output(), WAIT,
                     message=cf.filter_output)
            if proc.poll() is None:
                break
            assert proc.returncode == -signal.SIGKILL
            cf.start_filter()
        cf.wait_queue_empty(WAIT)
        assert "release it with: lamsonfilter quarantine release" in cf.filter_output()
        assert not capture.messages

        listed = quarantine("list", "--quarantine", str(qdir), "--json")
        assert listed.returncode == 0, listed.stderr
        entries = json.loads(listed.stdout)["messages"]
        assert len(entries) == 1
        entry = entries[0]
        assert entry["sender"] == "alice@example.com" and sorted(entry["recipients"]) == sorted(rcpts)
        assert "died 2 time(s)" in entry["reason"] and entry["subject"] == "lethal"
        shown = quarantine("show", entry["name"], "--app", str(app))
        assert shown.returncode == 0 and "RCPT TO:   <hidden.bcc@example.net>" in shown.stdout, shown.stdout

        released = quarantine("release", entry["name"], "--quarantine", str(qdir),
                              "--reinject", f"127.0.0.1:{cf.relay_port}")
        assert released.returncode == 0, released.stdout + released.stderr
        assert "released to 2 recipient(s)" in released.stdout and "queued as" in released.stdout
        wait_for(lambda: sorted(r for m in capture.messages for r in m.rcpt_tos) == sorted(rcpts), WAIT,
                 message=lambda: f"released copies: {[m.rcpt_tos for m in capture.messages]}")
        assert {m.mail_from for m in capture.messages} == {"alice@example.com"}
        assert all(m.message["Subject"] == "lethal" for m in capture.messages)
        assert json.loads(quarantine("list", "--quarantine", str(qdir), "--json").stdout)["messages"] == []
        again = quarantine("release", entry["name"], "--quarantine", str(qdir))
        assert again.returncode == 2 and "no message" in again.stderr
