"""Whose fault a tempfail is (`Decision.cause`): the database failing is not the message's.

On a real SQLite file held by another connection (``BEGIN EXCLUSIVE``: the
state database is locked past the lock timeout), `App.process` answers the
usual 451 4.3.0 with ``cause=storage``, and leaves the conversation's state
alone (no move to ERROR); a handler that raises is ``cause=message``.  The
queue's table (`queue_plan`) counts only the latter towards POISON_LIMIT.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from lamsonfilter import App, Handler, MailRequest
from lamsonfilter.decisions import Action, Cause, Decision, Outcome
from lamsonfilter.mail import Envelope
from lamsonfilter.mailqueue.maildir import MailQueue
from lamsonfilter.queueworker.outage import Outage
from lamsonfilter.queueworker.plan import queue_plan, storage_failure_plan
from lamsonfilter.queueworker.pool import Feeder
from lamsonfilter.state import StorageError, StorageUnavailable
from lamsonfilter.store.sql import SQLAlchemyStorage
from lamsonfilter.testing import make_message

HOST = "app.example"
KEY = f"h:alice@example.com:x@{HOST}"


def request(subject: str = "hi") -> MailRequest:
    to = (f"x@{HOST}",)
    raw = make_message("alice@example.com", to, subject=subject)
    return MailRequest.from_bytes(raw, sender="alice@example.com", recipients=to, queue_id="Q1")


def make_app(storage: SQLAlchemyStorage) -> App:
    h = Handler("h")

    @h.route(f"x@{HOST}")
    def START(ctx):  # type: ignore[no-untyped-def]
        if ctx.header("Subject") == "boom":
            raise RuntimeError("handler exploded")
        ctx.data["n"] = ctx.data.get("n", 0) + 1
        ctx.drop()
        return COUNTING

    @h.state
    def COUNTING(ctx):  # type: ignore[no-untyped-def]
        return START(ctx)

    @h.state
    def ERROR(ctx):  # type: ignore[no-untyped-def]
        ctx.drop()

    return App(hosts=[HOST], handlers=[h], storage=storage).start()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "state.db"
    st = SQLAlchemyStorage(f"sqlite:///{path}")
    st.create_schema()
    st.close()
    return path


def test_a_locked_database_is_a_storage_tempfail_and_the_state_stays(db: Path) -> None:
    storage = SQLAlchemyStorage(f"sqlite:///{db}", lock_timeout=0.2)
    app = make_app(storage)
    try:
        assert not app.process(request()).is_tempfail  # START -> COUNTING, n = 1
        holder = sqlite3.connect(db, isolation_level=None)
        try:
            holder.execute("BEGIN EXCLUSIVE")  # another process holds the database
            locked = app.process(request())
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert locked.is_tempfail and locked.cause is Cause.STORAGE and locked.storage_failed
        assert [o.reply for o in locked.outcomes] == ["451 4.3.0 Temporary failure, try again later"]
        with storage.transaction() as tx:  # the outage did not move the conversation to ERROR
            record = tx.get(KEY)
        assert record is not None and (record.state, record.data) == ("COUNTING", {"n": 1})

        crashed = app.process(request("boom"))  # the handler's own failure
        assert crashed.is_tempfail and crashed.cause is Cause.MESSAGE and not crashed.storage_failed
        with storage.transaction() as tx:
            record = tx.get(KEY)
        assert record is not None and record.state == "ERROR"  # as before: ERROR is for the handler's failures
    finally:
        storage.close()


def test_the_store_says_unavailable_for_a_lock_and_not_for_every_error(db: Path) -> None:
    storage = SQLAlchemyStorage(f"sqlite:///{db}", lock_timeout=0.1)
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StorageUnavailable, match="locked"):
            with storage.transaction() as tx:
                tx.get("k")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        storage.close()
    gone = SQLAlchemyStorage(f"sqlite:///{db.parent / 'no-such-dir' / 'x.db'}")
    try:  # cannot open the file: the database, not the message
        with pytest.raises(StorageUnavailable):
            with gone.transaction() as tx:
                tx.get("k")
    finally:
        gone.close()
    assert not issubclass(StorageError, StorageUnavailable)  # a plain StorageError still counts


# ------------------------------------------------------------------ the queue's table

RCPT = f"x@{HOST}"


def queued() -> MailRequest:
    return MailRequest(Envelope("alice@example.com", (RCPT,), queue_id="Q1"), b"Subject: s\r\n\r\nb\r\n",
                       from_queue=True)


@pytest.mark.parametrize("attempts", [0, 1, 4, 50])
def test_a_storage_tempfail_never_counts_nor_quarantines(attempts: int) -> None:
    down = Decision.tempfail((RCPT,), "connection refused", cause=Cause.STORAGE)
    plan = queue_plan(down, queued(), attempts=attempts, poison_limit=5, pause=8.0)
    assert plan == storage_failure_plan("connection refused", 8.0)
    assert plan.retry_after == 8.0 and not plan.counts_attempt and plan.quarantine is None
    assert str(plan) == "retry in 8 s (no attempt counted)"


def test_a_message_tempfail_still_counts_up_to_the_quarantine() -> None:
    crash = Decision.tempfail((RCPT,), "RuntimeError: boom")  # the default cause: the message
    assert crash.cause is Cause.MESSAGE
    assert queue_plan(crash, queued(), attempts=0, poison_limit=2).counts_attempt
    assert queue_plan(crash, queued(), attempts=1, poison_limit=2).quarantine is not None
    asked = Decision((Outcome(RCPT, Action.TEMPFAIL, 451, "4.7.1", "busy"),))  # ctx.tempfail(): no cause given
    assert not asked.storage_failed and queue_plan(asked, queued(), 0, 5).counts_attempt


# ------------------------------------------------------------------ the pool pauses

def test_the_pool_pauses_on_an_outage_and_probes_with_one_message(tmp_path: Path) -> None:
    queue = MailQueue(tmp_path / "q", lease=300)
    for i in range(60):
        queue.put(b"Subject: s\r\n\r\nb\r\n", "a@example.com", f"r{i}@example.org")
    outage = Outage(first=0.1, most=0.2)
    down_until = time.monotonic() + 1.0
    lock = threading.Lock()
    seen = {"failed": 0, "done": 0, "counted": 0}

    def handle(name: str) -> None:
        msg = queue.claim(name)
        assert msg is not None
        time.sleep(0.01)
        with lock:
            seen["counted"] += msg.attempts  # a failure during the outage never counts an attempt
        if time.monotonic() < down_until:
            with lock:
                seen["failed"] += 1
            queue.retry(msg, outage.failed("database down"), count=False)
        else:
            outage.cleared()
            with lock:
                seen["done"] += 1
            queue.done(msg)

    feeder = Feeder(queue, handle, workers=4, once=True, outage=outage)
    started = time.monotonic()
    feeder.run()
    assert seen["done"] == 60 and queue.count() == {"new": 0, "claimed": 0, "retry": 0}
    assert not outage.active and not feeder.gave_up
    # 1 s of outage: the 4 in flight when it began, then one probe per pause (0.1, 0.2, 0.2 ...),
    # never a walk over the 60 queued messages
    assert 1 <= seen["failed"] <= 4 + 12, seen
    assert time.monotonic() - started < 30 and seen["counted"] == 0


def test_a_message_the_storage_fails_on_alone_counts_after_all() -> None:
    """A began an outage that the next message (the probe) ended at once; when A begins one again,
    the store fails on A itself: its failure counts (None: no pause), so it cannot pause the pool
    for ever.  A message that began a real outage (a probe failed too) is not suspected."""
    outage = Outage(first=0.01, most=0.02)
    assert outage.failed("locked", "A") == 0.01
    time.sleep(0.02)
    assert outage.admits(inflight=0)  # the probe: another message, and it got through
    outage.cleared()
    assert not outage.active
    assert outage.failed("locked", "A") is None and not outage.active  # A again: A's own failure
    down = Decision.tempfail((RCPT,), "locked", cause=Cause.STORAGE)
    assert queue_plan(down, queued(), attempts=0, poison_limit=2, pause=None).counts_attempt
    assert queue_plan(down, queued(), attempts=1, poison_limit=2, pause=None).quarantine is not None

    assert outage.failed("down", "B") == 0.01  # B begins a real outage: a probe fails too
    time.sleep(0.02)
    assert outage.admits(inflight=0)
    assert outage.failed("down", "C") == 0.02
    outage.cleared()
    assert outage.failed("down", "B") == 0.01  # B is not suspected: the others failed as well


def test_only_the_database_failing_is_the_storages_fault() -> None:
    from lamsonfilter.app import cause_of
    from lamsonfilter.state import ConflictError, SchemaMissingError

    assert cause_of(StorageUnavailable("connection refused")) is Cause.STORAGE
    assert cause_of(SchemaMissingError("no lamsonfilter schema")) is Cause.STORAGE
    # a conflict that outlasted the retries may be the message's own unique row: it counts
    assert cause_of(ConflictError("still conflicting")) is Cause.MESSAGE
    assert cause_of(StorageError("cannot bind that value")) is Cause.MESSAGE
    assert cause_of(RuntimeError("handler bug")) is Cause.MESSAGE
