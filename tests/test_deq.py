"""``lamsonfilter deq`` as a process: the example list run from a Maildir queue, a capture server as the relay.

Each test fills a queue with `MailQueue.put` (the envelope on top, as
Postfix's Maildir delivery writes it), runs ``lamsonfilter deq`` as a
subprocess (``--once``, or resident and stopped with SIGTERM) and looks at
what reached the relay (`tests.rig.postfix.CaptureServer`), the queue and
the quarantine.  The application is the example list plus the content
filter tests' handler (`tests.rig.proxy.make_app`: ``tag@`` delivers with a
header added, ``crash@`` raises, ``refuse@`` rejects), or, under a
NOTIFY_SOCKET, the service tests' (`tests.rig.service`: ``hold@`` waits for
the test's go).
Every wait is on a condition with a bounded timeout.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lamsonfilter.contentfilter.quarantine import Quarantine
from lamsonfilter.daemon.runtime import Runtime
from lamsonfilter.mail import Envelope, MailRequest
from lamsonfilter.mailqueue.maildir import MailQueue
from tests.rig.fixtures import require_module
from tests.rig.postfix import CaptureServer
from tests.rig.proxy import make_app
from tests.rig.service import Notifications
from tests.rig.service import make_app as service_app

ROOT = Path(__file__).resolve().parents[1]
HOST = "lists.example.org"
SUMMARY = re.compile(r"^deq: (\d+) processed, (\d+) waiting for a retry, (\d+) quarantined$", re.MULTILINE)
CONFIRM = re.compile(rf"python-confirm-[0-9a-f]{{32}}@{re.escape(HOST)}")


def message(sender: str, to: str, subject: str, body: str = "hello\n") -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '-')}.{time.monotonic_ns()}@example.com>\r\n\r\n{body}"
            ).encode()


def deq(app: Path, queue: Path, relay: CaptureServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lamsonfilter", "deq", "--app", str(app), "--queue", str(queue),
         "--relay", f"127.0.0.1:{relay.port}", "--once", *args],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )


def summary(proc: subprocess.CompletedProcess[str]) -> tuple[int, int, int]:
    assert proc.returncode == 0, proc.stderr
    found = SUMMARY.findall(proc.stderr)
    assert len(found) == 1, proc.stderr
    processed, waiting, quarantined = found[0]
    return int(processed), int(waiting), int(quarantined)


def wait_until(what: str, check: Callable[[], object], timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise TimeoutError(f"{what}: not after {timeout:g} s")
        time.sleep(0.05)


@pytest.fixture
def app(tmp_path: Path) -> Path:
    return make_app(tmp_path / "app", "POISON_LIMIT = 2\n")


@pytest.fixture
def queue(tmp_path: Path) -> MailQueue:
    return MailQueue(tmp_path / "queue")


def quarantined(app: Path) -> list[tuple[str, str | None, tuple[str, ...], bytes]]:
    q = Quarantine(app / "var" / "quarantine")
    return [(m.reason, m.sender, m.recipients, m.raw) for m in map(q.load, q.names())]


def test_the_list_runs_from_the_queue(app: Path, queue: MailQueue, capture: CaptureServer) -> None:
    members = ("alice@example.com", "bob@example.net")
    for who in members:  # subscribe -> a confirmation to the sender
        queue.put(message(who, f"python-subscribe@{HOST}", f"subscribe {who}"), who, f"python-subscribe@{HOST}")
    assert summary(deq(app, queue.path, capture)) == (2, 0, 0)
    confirmations = capture.wait_for_count(2)
    assert sorted(r for m in confirmations for r in m.rcpt_tos) == sorted(members)
    assert queue.count() == {"new": 0, "claimed": 0, "retry": 0}

    for m in confirmations:  # confirm -> member (a welcome)
        who, token = m.rcpt_tos[0], CONFIRM.search(m.data.decode())
        assert token, m.data
        queue.put(message(who, token.group(0), "confirm"), who, token.group(0))
    capture.clear()
    assert summary(deq(app, queue.path, capture)) == (2, 0, 0)
    welcomes = capture.wait_for_count(2)
    assert sorted(r for m in welcomes for r in m.rcpt_tos) == sorted(members)

    capture.clear()  # a member's post -> every member
    queue.put(message(members[0], f"python@{HOST}", "the first post"), members[0], f"python@{HOST}")
    assert summary(deq(app, queue.path, capture)) == (1, 0, 0)
    wait_until("the post reached every member",
               lambda: sorted(r for m in capture.messages for r in m.rcpt_tos) == sorted(members))
    assert all(m.message["Subject"].endswith("the first post") for m in capture.messages)
    assert quarantined(app) == []


def test_a_message_whose_decision_committed_is_replayed_not_run_again(app: Path, queue: MailQueue,
                                                                       capture: CaptureServer) -> None:
    """A worker that died after the commit, before removing the file: the next run replays."""
    raw = message("carol@example.com", f"python-subscribe@{HOST}", "subscribe carol")
    name = queue.put(raw, "carol@example.com", f"python-subscribe@{HOST}")
    runtime = Runtime.from_directory(app, {"RELAY": f"127.0.0.1:{capture.port}"})
    try:  # what the dead worker did: the decision committed (state, outbox), the file left in new/
        request = MailRequest(Envelope("carol@example.com", (f"python-subscribe@{HOST}",), queue_id=name), raw,
                              from_queue=True)
        first = runtime.process(request, replay_key=f"queue:{name}", transport="queue")
        assert len(first.outbox) == 1
    finally:
        runtime.app.storage.close()  # not started: nothing sent from here
    proc = deq(app, queue.path, capture)
    assert summary(proc) == (1, 0, 0)
    assert "decision replayed, handlers not run" in proc.stderr
    assert [m.rcpt_tos for m in capture.messages] == [("carol@example.com",)]  # one confirmation, not two


def test_deliver_goes_through_the_relay_with_the_changes(app: Path, queue: MailQueue,
                                                         capture: CaptureServer) -> None:
    queue.put(message("alice@example.com", f"tag@{HOST}", "tag me"), "alice@example.com", f"tag@{HOST}")
    assert summary(deq(app, queue.path, capture)) == (1, 0, 0)
    [sent] = capture.wait_for_count(1)
    assert (sent.mail_from, sent.rcpt_tos) == ("alice@example.com", (f"tag@{HOST}",))
    assert sent.message["X-Lamsonfilter-Test"] == "tagged"
    assert b"Return-Path" not in sent.data and b"Delivered-To" not in sent.data  # the envelope lines stay here


def test_a_tempfail_waits_in_retry_and_the_poison_limit_quarantines(app: Path, queue: MailQueue,
                                                                     capture: CaptureServer) -> None:
    raw = message("alice@example.com", f"crash@{HOST}", "crash")
    name = queue.put(raw, "alice@example.com", f"crash@{HOST}")
    first = deq(app, queue.path, capture)
    assert summary(first) == (0, 1, 0)
    [entry] = queue.entries()
    assert (entry.name, entry.state, entry.attempts) == (name, "retry", 1)
    assert entry.due is not None and entry.due > time.time()  # a backoff, not at once
    assert "via=queue" in first.stderr and "decision=tempfail" in first.stderr

    queue.requeue(name)  # its time has come (as `lamsonfilter queue requeue` does)
    assert summary(deq(app, queue.path, capture)) == (1, 0, 1)  # POISON_LIMIT = 2
    assert queue.count() == {"new": 0, "claimed": 0, "retry": 0}
    [(reason, sender, rcpts, kept)] = quarantined(app)
    assert "2 attempt(s) failed" in reason and "boom from the crash handler" in reason
    assert (sender, rcpts, kept) == ("alice@example.com", (f"crash@{HOST}",), raw)
    assert capture.messages == []


def test_a_reject_is_quarantined_never_bounced(app: Path, queue: MailQueue, capture: CaptureServer) -> None:
    queue.put(message("forged@example.com", f"refuse@{HOST}", "refuse"), "forged@example.com", f"refuse@{HOST}")
    assert summary(deq(app, queue.path, capture)) == (1, 0, 1)
    [(reason, sender, rcpts, _)] = quarantined(app)
    assert reason == f"refuse@{HOST}: 550 5.7.1 not wanted here"
    assert (sender, rcpts) == ("forged@example.com", (f"refuse@{HOST}",))
    assert capture.messages == []  # no bounce to a possibly forged sender


def test_a_file_without_an_envelope_is_quarantined_never_guessed(app: Path, queue: MailQueue,
                                                                  capture: CaptureServer) -> None:
    queue.ensure()
    raw = message("alice@example.com", f"python-subscribe@{HOST}", "no envelope")
    (queue.path / "new" / "1700000000.noenvelope.host").write_bytes(raw)
    assert summary(deq(app, queue.path, capture)) == (1, 0, 1)
    [(reason, sender, rcpts, kept)] = quarantined(app)
    assert reason.startswith("no envelope in the queue file: no Return-Path:")
    assert (sender, rcpts, kept) == (None, (), raw)
    assert capture.messages == [] and queue.count() == {"new": 0, "claimed": 0, "retry": 0}


@pytest.mark.parametrize("bad", ["queue", "app"])
def test_bad_configuration_is_one_line_and_exit_2(app: Path, tmp_path: Path, capture: CaptureServer,
                                                  bad: str) -> None:
    (tmp_path / "a-file").write_text("not a directory\n")
    if bad == "queue":  # a queue that cannot be made
        proc = deq(app, tmp_path / "a-file" / "queue", capture)
    else:  # an application that does not load
        (app / "config" / "settings.py").write_text('HANDLERS = ["mailinglist"]\nQUEUE_LEASE = -1\n')
        proc = deq(app, tmp_path / "queue", capture)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, lines
    assert ("a-file" in lines[0]) if bad == "queue" else ("QUEUE_LEASE must be a positive number" in lines[0])


class Resident:
    """``lamsonfilter -v -v deq`` without --once; its log in a file."""

    def __init__(self, app: Path, queue: MailQueue, relay: CaptureServer, log: Path) -> None:
        self.log = log
        self._out = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lamsonfilter", "-v", "-v", "deq", "--app", str(app), "--queue",
             str(queue.path), "--relay", f"127.0.0.1:{relay.port}", "--workers", "2"],
            stdout=self._out, stderr=subprocess.STDOUT, cwd=ROOT)

    def text(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        finally:
            self._out.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._out.close()


def test_resident_deq_wakes_on_new_mail_and_stops_cleanly(app: Path, queue: MailQueue, capture: CaptureServer,
                                                           tmp_path: Path) -> None:
    deq_proc = Resident(app, queue, capture, tmp_path / "deq.log")
    try:
        wait_until("deq idle on inotify", lambda: "queue empty: sleeping" in deq_proc.text())
        assert "sleeping on inotify" in deq_proc.text()
        queue.put(message("alice@example.com", f"tag@{HOST}", "after start"), "alice@example.com", f"tag@{HOST}")
        [sent] = capture.wait_for_count(1, timeout=60)
        assert sent.message["Subject"] == "after start"
        wait_until("the message removed", lambda: queue.count() == {"new": 0, "claimed": 0, "retry": 0})
        assert "woken: new mail in" in deq_proc.text()  # inotify woke it, not the rescan timer
        assert deq_proc.stop() == 0
    finally:
        deq_proc.kill()
    assert "SIGTERM: stopping" in deq_proc.text()


def test_under_systemd_ready_watchdog_reload_and_a_stop_after_the_message_in_flight(
        tmp_path: Path, queue: MailQueue, capture: CaptureServer, monkeypatch: pytest.MonkeyPatch) -> None:
    require_module("systemd.daemon")
    app = service_app(tmp_path)
    notify = Notifications(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", notify.path)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    deq_proc = Resident(app, queue, capture, tmp_path / "deq.log")
    try:
        assert "STATUS=working through" in notify.wait_for("READY=1")
        notify.wait_for("WATCHDOG=1")
        queue.put(message("alice@example.com", f"tag@{HOST}", "one"), "alice@example.com", f"tag@{HOST}")
        assert capture.wait_for_count(1)[0].message["X-Version"] == "one"

        handler = app / "app" / "handlers" / "svc.py"  # SIGHUP: the new code runs the next message
        handler.write_text(handler.read_text().replace('VERSION = "one"', 'VERSION = "two"'))
        deq_proc.proc.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING=1")
        assert "STATUS=reloaded" in notify.wait_for("READY=1")
        queue.put(message("alice@example.com", f"tag@{HOST}", "two"), "alice@example.com", f"tag@{HOST}")
        assert capture.wait_for_count(2)[1].message["X-Version"] == "two"

        # SIGTERM while a message is in the handler: it finishes, then deq exits 0
        queue.put(message("alice@example.com", f"hold@{HOST}", "held"), "alice@example.com", f"hold@{HOST}")
        wait_until("the message in the handler", lambda: (tmp_path / "started").exists())
        deq_proc.proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1")
        assert deq_proc.proc.poll() is None  # still finishing the message
        (tmp_path / "go").touch()
        assert deq_proc.proc.wait(timeout=60) == 0
    finally:
        deq_proc.kill()
        notify.close()
    assert capture.wait_for_count(3)[2].message["Subject"] == "held"
    assert queue.count() == {"new": 0, "claimed": 0, "retry": 0}


def test_the_queue_is_the_applications_queue_setting_by_default(app: Path, capture: CaptureServer) -> None:
    queue = MailQueue(app / "var" / "queue")  # QUEUE = "var/queue", relative to the application
    queue.put(message("alice@example.com", f"tag@{HOST}", "default"), "alice@example.com", f"tag@{HOST}")
    proc = subprocess.run(
        [sys.executable, "-m", "lamsonfilter", "deq", "--app", str(app), "--relay", f"127.0.0.1:{capture.port}",
         "--once"], capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
        env={k: v for k, v in os.environ.items() if k != "LAMSONFILTER_QUEUE"})
    assert summary(proc) == (1, 0, 0)
    assert capture.wait_for_count(1)[0].message["Subject"] == "default"
