"""The outbox's sent journal (`lamsonfilter.sentjournal`): a send recorded at the relay's 250 survives
the sender, and the database learns it before any claim, so a killed sender's message is not sent again.

The store tests run on every back end (memory, SQLite, PostgreSQL); the crash test kills a real
process with SIGKILL between its journal line and the database's "sent".
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from lamsonfilter.decisions import OutboxMessage
from lamsonfilter.outboxworker import OutboxWorker
from lamsonfilter.relay import Delivery, Relay
from lamsonfilter.sentjournal import SentJournal, SentRecord, read_journal, sent_token
from lamsonfilter.settings import journal_dir
from lamsonfilter.state import StateStorage

ROOT = Path(__file__).resolve().parents[1]
DB = "sqlite:////tmp/journal-test.db"


def message(i: int, rcpts: tuple[str, ...] = ()) -> OutboxMessage:
    raw = f"Message-ID: <j{i}@journal.test>\r\nSubject: {i}\r\n\r\nhello\r\n".encode()
    return OutboxMessage("list-bounces@example.org", rcpts or (f"r{i}@example.org",), raw, "message")


def fill(storage: StateStorage, *messages: OutboxMessage) -> dict[int, OutboxMessage]:
    with storage.transaction() as tx:
        tx.add_outbox(list(messages))
    return {p.id: p.message for p in storage.pending_outbox(1000)}


class CountingRelay:
    """A relay that accepts everything and counts what it was given (no SMTP: the store is tested)."""

    max_recipients = 500

    def __init__(self) -> None:
        self.sent: list[tuple[int, tuple[str, ...]]] = []

    def send(self, message: OutboxMessage) -> Delivery:
        self.sent.append((hash(message.raw), message.recipients))
        return Delivery(accepted=message.recipients)


class FailingMarks:
    """A store whose "sent" never commits (the process dies, or the database is locked, before it)."""

    def __init__(self, storage: StateStorage) -> None:
        self._storage = storage

    def mark_sent(self, ids: Any) -> None:
        raise RuntimeError("database is locked")

    def apply_sent(self, records: Any) -> int:
        raise RuntimeError("database is locked")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)


# ---------------------------------------------------------------- the file
def test_a_line_per_transaction_read_back(tmp_path: Path) -> None:
    journal = SentJournal(tmp_path / "j", DB, host="h1", pid=101)
    journal.record(7, "tok7", ["a@x.test", "b@x.test"])
    journal.record(8, "tok8", ["ü@x.test"])
    journal.record(9, "tok9", [])  # nothing accepted: no line
    assert journal.path.name.endswith("-h1-101.log") and journal.path.name.startswith("sent-")
    assert read_journal(journal.path) == [SentRecord(7, "tok7", ("a@x.test", "b@x.test")),
                                          SentRecord(8, "tok8", ("ü@x.test",))]
    assert journal.holds(7, "tok7") and not journal.holds(7, "other") and not journal.holds(9, "tok9")
    journal.applied([7, 8])
    assert journal.unapplied() == []
    journal.close()
    assert not journal.path.exists()  # a clean stop with everything applied leaves nothing


def test_a_torn_last_line_is_skipped_and_the_rest_applied(storage: StateStorage, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    ids = fill(storage, message(1), message(2))
    (a, ma), (b, mb) = sorted(ids.items())
    dead = SentJournal(tmp_path, DB, host="h1", pid=1)
    dead.record(a, sent_token(ma.raw), ma.recipients)
    with open(dead.path, "ab") as f:  # a write cut short (a full disk, a power loss): half a line
        f.write(SentRecord(b, sent_token(mb.raw), mb.recipients).line()[:20])
    os.close(dead._fd)  # type: ignore[arg-type]  # the process is gone: its lock with it
    dead._fd = None
    with caplog.at_level(logging.WARNING, "lamsonfilter.relay"):
        assert SentJournal(tmp_path, DB, host="h1", pid=2).recover(storage) == 1
    assert "line 2 unreadable" in caplog.text
    assert [p.id for p in storage.pending_outbox()] == [b]  # the torn one may go out again: never lost
    assert not dead.path.exists()


def test_apply_takes_out_the_done_recipients_and_ignores_other_tokens(storage: StateStorage) -> None:
    ids = fill(storage, message(1, ("a@x.test", "b@x.test", "c@x.test")), message(2), message(3))
    (one, m1), (two, m2), (three, _m3) = sorted(ids.items())
    changed = storage.apply_sent([
        SentRecord(one, sent_token(m1.raw), ("a@x.test",)),
        SentRecord(one, sent_token(m1.raw), ("c@x.test",)),
        SentRecord(two, sent_token(m2.raw), m2.recipients),
        SentRecord(three, sent_token(m2.raw), ("r3@example.org",)),  # a reused id: another message's token
        SentRecord(999, "nothing", ("x@x.test",)),
    ])
    assert changed == 2
    pending = {p.id: p.message.recipients for p in storage.pending_outbox()}
    assert pending == {one: ("b@x.test",), three: ("r3@example.org",)}
    assert storage.apply_sent([SentRecord(two, sent_token(m2.raw), m2.recipients)]) == 0  # idempotent


# ---------------------------------------------------------------- the worker
def test_the_journal_line_is_written_before_the_database_hears_of_it(storage: StateStorage, tmp_path: Path) -> None:
    ids = fill(storage, message(1), message(2))
    journal = SentJournal(tmp_path, DB)
    worker = OutboxWorker(FailingMarks(storage), CountingRelay(), interval=3600.0, journal=journal)  # type: ignore[arg-type]
    assert worker.flush() == 2
    assert {r.id for r in read_journal(journal.path)} == set(ids)
    assert len(storage.pending_outbox()) == 2  # "sent" failed: only the journal knows
    assert {r.id for r in journal.unapplied()} == set(ids)


def test_a_send_whose_sent_failed_is_not_sent_again_by_its_own_process(storage: StateStorage, tmp_path: Path) -> None:
    fill(storage, message(1), message(2))
    relay, journal = CountingRelay(), SentJournal(tmp_path, DB)
    failing = OutboxWorker(FailingMarks(storage), relay, interval=3600.0, lease=0.0, journal=journal)  # type: ignore[arg-type]
    failing.flush()
    worker = OutboxWorker(storage, relay, interval=3600.0, lease=0.0, journal=journal, worker_id=failing.worker_id)
    worker.flush()  # the database works again: the lines are applied before the claim
    assert len(relay.sent) == 2 and storage.pending_outbox() == []
    assert journal.unapplied() == []


def test_a_dead_senders_journal_is_applied_before_another_process_claims(storage: StateStorage,
                                                                          tmp_path: Path) -> None:
    fill(storage, message(1), message(2), message(3))
    relay = CountingRelay()
    dead_journal = SentJournal(tmp_path, DB, pid=1)
    dead = OutboxWorker(FailingMarks(storage), relay, interval=3600.0, lease=0.0, journal=dead_journal)  # type: ignore[arg-type]
    dead.flush()  # sent all three; "sent" never reached the database; the claims expire at once (lease 0)
    os.close(dead_journal._fd)  # type: ignore[arg-type]  # the process dies: the kernel drops its lock
    alive = OutboxWorker(storage, relay, interval=3600.0, lease=0.0, journal=SentJournal(tmp_path, DB, pid=2))
    assert alive.flush() == 0  # nothing left to send
    assert len(relay.sent) == 3 and storage.pending_outbox() == []
    assert not dead_journal.path.exists()
    # a journal of another database, or of another host, is not touched
    other_db, other_host = SentJournal(tmp_path, DB + "x", pid=3), SentJournal(tmp_path, DB, host="h9", pid=4)
    other_db.record(1, "t", ["a@x.test"]), other_host.record(1, "t", ["a@x.test"])
    for j in (other_db, other_host):
        os.close(j._fd)  # type: ignore[arg-type]
    assert SentJournal(tmp_path, DB, pid=5).recover(storage) == 0
    assert other_db.path.exists() and other_host.path.exists()


def test_a_living_processes_journal_is_left_alone(storage: StateStorage, tmp_path: Path) -> None:
    ids = fill(storage, message(1))
    [(i, m)] = ids.items()
    living = SentJournal(tmp_path, DB, pid=1)
    living.record(i, sent_token(m.raw), m.recipients)
    assert SentJournal(tmp_path, DB, pid=2).recover(storage) == 0  # locked: alive
    assert living.path.exists() and len(storage.pending_outbox()) == 1


CHILD = textwrap.dedent("""
    import os, signal, sys
    from lamsonfilter.sentjournal import SentJournal
    journal = SentJournal(sys.argv[1], sys.argv[2])
    for arg in sys.argv[3:]:
        i, token, rcpt = arg.split(",")
        journal.record(int(i), token, [rcpt])
    os.kill(os.getpid(), signal.SIGKILL)   # after the 250 and the line, before any database write
""")


def test_kill9_between_the_line_and_the_database_loses_no_record(storage: StateStorage, tmp_path: Path) -> None:
    ids = fill(storage, message(1), message(2), message(3))
    args = [f"{i},{sent_token(m.raw)},{m.recipients[0]}" for i, m in sorted(ids.items())[:2]]
    child = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), DB, *args], cwd=ROOT, timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert len(list(tmp_path.glob("sent-*.log"))) == 1
    assert SentJournal(tmp_path, DB).recover(storage) == 2
    assert [p.id for p in storage.pending_outbox()] == [max(ids)]  # the third was never sent
    assert list(tmp_path.glob("sent-*.log")) == []


def test_the_journal_lives_beside_a_sqlite_database_or_in_the_apps_var(tmp_path: Path) -> None:
    app = str(tmp_path / "app")
    assert journal_dir({"APP_DIR": app, "DATABASE_URL": "sqlite:///var/state.db"}) == tmp_path / "app/var/outbox-sent"
    assert journal_dir({"APP_DIR": app, "DATABASE_URL": "sqlite:////srv/db/s.db"}) == Path("/srv/db/outbox-sent")
    assert journal_dir({"APP_DIR": app, "DATABASE_URL": "postgresql://h/db"}, {}) == tmp_path / "app/var/outbox-sent"
    # under the shipped systemd units (StateDirectory=lamsonfilter) the application is read-only
    systemd = {"STATE_DIRECTORY": "/var/lib/lamsonfilter"}
    assert journal_dir({"APP_DIR": app, "DATABASE_URL": "postgresql://h/db"}, systemd) == Path(
        "/var/lib/lamsonfilter/outbox-sent")
    assert journal_dir({"APP_DIR": app, "DATABASE_URL": "sqlite:////srv/db/s.db"}, systemd) == Path(
        "/srv/db/outbox-sent")
    assert journal_dir({"APP_DIR": app, "DATABASE_URL": "postgresql://h/db", "OUTBOX_JOURNAL": "/run/j"}) == Path("/run/j")
    assert journal_dir({"APP_DIR": app, "DATABASE_URL": "memory:"}) is None


def test_a_real_relays_250_is_journaled_before_the_database_write(storage: StateStorage, tmp_path: Path,
                                                                    capture: Any) -> None:
    ids = fill(storage, message(1, ("a@x.test", "b@x.test")))
    journal = SentJournal(tmp_path, DB)
    worker = OutboxWorker(FailingMarks(storage), Relay("127.0.0.1", capture.port, timeout=10.0,  # type: ignore[arg-type]
                                                       max_recipients=1), interval=3600.0, journal=journal)
    worker.flush()
    [(i, m)] = ids.items()
    assert len(capture.messages) == 2  # one transaction per recipient, a journal line for each
    assert read_journal(journal.path) == [SentRecord(i, sent_token(m.raw), ("a@x.test",)),
                                          SentRecord(i, sent_token(m.raw), ("b@x.test",))]


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    import shutil

    from click.testing import CliRunner

    from lamsonfilter.cli import main

    app = tmp_path / "app"
    shutil.copytree(ROOT / "examples" / "mailinglist", app, ignore=shutil.ignore_patterns("var", "__pycache__"))
    CliRunner().invoke(main, ["db", "init", "--app", str(app)], catch_exceptions=False)
    return app


def test_every_transports_runtime_sends_with_a_journal_and_an_unwritable_one_stops_the_start(app_dir: Path) -> None:
    from lamsonfilter.app import StartupError
    from lamsonfilter.daemon.runtime import Runtime

    # the milter, the content filter and deq all send through `Runtime`'s one outbox worker
    rt = Runtime.from_directory(app_dir)
    try:
        assert rt.worker is not None and rt.worker.journal is not None
        assert rt.worker.journal.directory == app_dir / "var" / "outbox-sent"  # beside var/state.db
        assert rt.worker.mark_every > 0  # SQLite: one host, "sent" in batches
        rt.start()
        assert rt.worker.journal.path.exists()
    finally:
        rt.stop()
    assert not rt.worker.journal.path.exists()  # a clean stop: nothing left to apply
    blocker = app_dir / "not-a-directory"
    blocker.write_text("")
    rt = Runtime.from_directory(app_dir, {"OUTBOX_JOURNAL": str(blocker / "journal")})
    try:
        with pytest.raises(StartupError, match="outbox journal: cannot create .*set OUTBOX_JOURNAL"):
            rt.start()
    finally:
        rt.stop()
