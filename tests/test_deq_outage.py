"""``lamsonfilter deq`` when the state database goes away, and when the relay does (``--once``'s end).

A resident ``deq`` (`tests.test_deq.Resident`) runs the example list on a
private PostgreSQL (`tests.rig.pgcluster`); the test stops the cluster,
queues subscriptions, and starts it again: every message is processed, none
is quarantined, no attempt is counted, and the pool probed with one message
at a time instead of walking the queue.  A handler that raises still ends
in the quarantine after POISON_LIMIT attempts.  Then ``deq --once`` with
the relay down: exit status 75 and a line naming the unsent replies, which
a later run sends; and ``deq --once`` (`deq.serve`) over a database that
stays down: it gives up after ONCE_WAIT with exit status 75, nothing lost,
nothing counted; SIGTERM during an outage stops deq at once.  Every wait is bounded.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lamsonfilter import deq
from lamsonfilter.daemon.runtime import Runtime
from lamsonfilter.mailqueue.maildir import MailQueue
from lamsonfilter.queueworker import pool
from lamsonfilter.settings import make_storage
from tests.rig.pgcluster import PgCluster, pgcluster  # noqa: F401 -- pgcluster: fixture
from tests.rig.postfix import CaptureServer, free_port
from tests.rig.proxy import make_app
from tests.test_deq import HOST, ROOT, SUMMARY, Resident, message, quarantined, summary, wait_until

POISON_LIMIT = 2
SUBSCRIBERS = 12


def subscribe(queue: MailQueue, who: str) -> str:
    return queue.put(message(who, f"python-subscribe@{HOST}", f"subscribe {who}"), who, f"python-subscribe@{HOST}")


def app_and_queue_on(tmp_path: Path, pgcluster: PgCluster) -> tuple[Path, MailQueue]:
    """The example list on the cluster's database (its schema made) and an empty queue."""
    app = make_app(tmp_path / "app", f"POISON_LIMIT = {POISON_LIMIT}\nDATABASE_URL = {pgcluster.url!r}\n")
    storage = make_storage(pgcluster.url)
    storage.create_schema()
    storage.close()
    queue = MailQueue(tmp_path / "queue")
    queue.ensure()
    return app, queue


def test_a_database_outage_quarantines_nothing_and_poison_still_is(tmp_path: Path, pgcluster: PgCluster,
                                                                    capture: CaptureServer) -> None:
    app, queue = app_and_queue_on(tmp_path, pgcluster)
    deq_proc = Resident(app, queue, capture, tmp_path / "deq.log")
    try:
        wait_until("deq idle", lambda: "queue empty: sleeping" in deq_proc.text())
        pgcluster.stop()
        people = [f"user{i}@example.com" for i in range(SUBSCRIBERS)]
        for who in people:
            subscribe(queue, who)
        wait_until("the pool paused", lambda: "deq pauses its workers" in deq_proc.text())
        wait_until("two probes failed", lambda: "(probe 2)" in deq_proc.text(), timeout=60)
        during = deq_proc.text()
        assert quarantined(app) == [] and capture.messages == []
        entries = list(queue.entries())
        assert len(entries) == SUBSCRIBERS and all(e.attempts == 0 for e in entries), entries
        # the 2 workers' first messages, then one probe per pause: not a walk over the queue
        storage_failures = during.count("decision=tempfail cause=storage")
        assert 1 <= storage_failures <= 2 + during.count("still fails"), during

        pgcluster.start()
        confirmations = capture.wait_for_count(SUBSCRIBERS, timeout=120)
        assert sorted(r for m in confirmations for r in m.rcpt_tos) == sorted(people)
        wait_until("the queue drained", lambda: queue.count() == {"new": 0, "claimed": 0, "retry": 0}, 60)
        assert "the state database answers again after" in deq_proc.text()
        assert quarantined(app) == []

        # a handler that raises is this message's failure: counted, quarantined at the limit
        crash = queue.put(message("alice@example.com", f"crash@{HOST}", "crash"), "alice@example.com",
                          f"crash@{HOST}")
        wait_until("the first failed attempt", lambda: queue.find(crash).state == "retry", 60)
        assert queue.find(crash).attempts == 1
        queue.requeue(crash)  # its time has come (as `lamsonfilter queue requeue` does)
        wait_until("the poison message quarantined", lambda: len(quarantined(app)) == 1, 60)
        [(reason, _sender, rcpts, _raw)] = quarantined(app)
        assert f"{POISON_LIMIT} attempt(s) failed" in reason and rcpts == (f"crash@{HOST}",)
        assert "decision=tempfail cause=message" in deq_proc.text()
        assert deq_proc.stop() == 0
    finally:
        deq_proc.kill()
        if not pgcluster.running:
            pgcluster.start()  # the fixture's own teardown stops it


def run_once(app: Path, queue: MailQueue, relay_port: int, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "lamsonfilter", "deq", "--app", str(app), "--queue", str(queue.path),
         "--relay", f"127.0.0.1:{relay_port}", "--once", *args],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
    )
    return proc, time.monotonic() - started


def test_once_with_the_relay_down_exits_75_naming_the_unsent_replies(tmp_path: Path,
                                                                      capture: CaptureServer) -> None:
    app = make_app(tmp_path / "app", f"POISON_LIMIT = {POISON_LIMIT}\n")
    queue = MailQueue(tmp_path / "queue")
    for who in ("alice@example.com", "bob@example.net"):
        subscribe(queue, who)
    down = free_port()  # nothing listens there: the relay is down
    proc, took = run_once(app, queue, down, "--outbox-wait", "3")
    assert proc.returncode == 75, proc.stderr
    found = SUMMARY.findall(proc.stderr)
    assert found == [("2", "0", "0")], proc.stderr  # the messages themselves are done ...
    unsent = re.search(r"^deq: (\d+) outbox message\(s\) not sent yet \(the relay 127\.0\.0\.1:(\d+) did not "
                       r"take them within 3 s\).*lamsonfilter outbox list", proc.stderr, re.MULTILINE)
    assert unsent and unsent.groups() == ("2", str(down)), proc.stderr  # ... their replies are not
    assert took < 60, took
    assert queue.count() == {"new": 0, "claimed": 0, "retry": 0}

    again, _ = run_once(app, queue, capture.port)  # the relay is back: the next run sends them
    assert summary(again) == (0, 0, 0) and "not sent yet" not in again.stderr
    sent = capture.wait_for_count(2, timeout=60)
    assert sorted(r for m in sent for r in m.rcpt_tos) == ["alice@example.com", "bob@example.net"]


def test_once_gives_up_on_a_long_outage_with_exit_75_and_loses_nothing(tmp_path: Path, pgcluster: PgCluster,
                                                                       capture: CaptureServer,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """``deq --once`` (`deq.serve`) while the database stays down: it pauses and probes, gives up
    after ONCE_WAIT (3 s here instead of 60) with exit status 75; every message is still queued,
    none counted an attempt, none quarantined."""
    monkeypatch.setattr(pool, "ONCE_WAIT", 3.0)
    app, queue = app_and_queue_on(tmp_path, pgcluster)
    for i in range(8):
        subscribe(queue, f"user{i}@example.com")
    runtime = Runtime.from_directory(app, {"RELAY": f"127.0.0.1:{capture.port}"})  # checks the schema: up
    pgcluster.stop()
    try:
        status = deq.serve(runtime, deq.DeqConfig(app_dir=app, queue=queue.path, workers=2, once=True,
                                                  outbox_wait=1.0))
    finally:
        pgcluster.start()
    err = capsys.readouterr().err
    assert status == 75, err
    assert re.search(r"^deq: the state database has failed for \d+ s \(.*StorageUnavailable.*\); 8 message\(s\) "
                     r"left in the queue for the next run$", err, re.MULTILINE), err
    entries = list(queue.entries())
    assert len(entries) == 8 and all(e.attempts == 0 for e in entries), entries
    assert quarantined(app) == []


def test_sigterm_during_an_outage_stops_at_once_and_keeps_every_message(tmp_path: Path, pgcluster: PgCluster,
                                                                         capture: CaptureServer) -> None:
    """The pool waits out the pause on a condition, not in a sleep: SIGTERM ends it at once."""
    app, queue = app_and_queue_on(tmp_path, pgcluster)
    deq_proc = Resident(app, queue, capture, tmp_path / "deq.log")
    try:
        wait_until("deq idle", lambda: "queue empty: sleeping" in deq_proc.text())
        pgcluster.stop()
        for i in range(5):
            subscribe(queue, f"user{i}@example.com")
        wait_until("the pool paused", lambda: "deq pauses its workers" in deq_proc.text())
        wait_until("a long pause", lambda: "(probe 2)" in deq_proc.text(), timeout=60)  # next try in 8 s
        started = time.monotonic()
        assert deq_proc.stop() == 0, deq_proc.text()
        assert time.monotonic() - started < 5, deq_proc.text()
    finally:
        deq_proc.kill()
        if not pgcluster.running:
            pgcluster.start()
    entries = list(queue.entries())
    assert len(entries) == 5 and all(e.attempts == 0 for e in entries), entries
    assert quarantined(app) == []


def test_once_with_the_database_unreachable_at_the_start_exits_75_and_claims_nothing(tmp_path: Path) -> None:
    """The database down before the run begins is "try again later" (75) for a cron job, as it is
    when it goes down during the run; a database without the schema stays bad configuration (2)."""
    down = free_port()  # nothing listens there: PostgreSQL is down
    app = make_app(tmp_path / "app", f"DATABASE_URL = 'postgresql://127.0.0.1:{down}/lamsonfilter'\n")
    queue = MailQueue(tmp_path / "queue")
    queue.ensure()
    subscribe(queue, "alice@example.com")
    proc, took = run_once(app, queue, free_port())
    assert proc.returncode == 75, proc.stderr
    assert f"127.0.0.1:{down}" in proc.stderr and "the queue is untouched, try again later" in proc.stderr
    assert took < 60, took
    assert queue.count() == {"new": 1, "claimed": 0, "retry": 0}

    no_schema = make_app(tmp_path / "app2", f"DATABASE_URL = 'sqlite:///{tmp_path / 'empty.db'}'\n")
    (tmp_path / "empty.db").touch()
    proc, _ = run_once(no_schema, queue, free_port())
    assert proc.returncode == 2 and "db init" in proc.stderr, proc.stderr
    assert queue.count() == {"new": 1, "claimed": 0, "retry": 0}
