"""Several filter hosts on one database: what they share, tested with two `App`s.

Each "host" is an `App` with a storage of its own (its own engine and
connections) on the same database -- SQLite and PostgreSQL.  They share
the reply budget and the reply rate limit (counted in the database), the
replay records (a retry through the other host replays the decision), and
the schema (`create_schema` run by two hosts at once).  The outbox claims
are tested in test_outbox_claims.py.
"""

from __future__ import annotations

import threading
from pathlib import Path


from lamsonfilter.mail import MailRequest
from lamsonfilter.state import StateStorage
from lamsonfilter.store.sql import SCHEMA_VERSION, SQLAlchemyStorage
from lamsonfilter.testing import AppTester, make_message

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mailinglist"
LIST = "python@lists.example.org"


def outbox(storage: StateStorage) -> list[tuple[str, ...]]:
    return [p.message.recipients for p in storage.pending_outbox(10_000)]


def test_two_hosts_together_stay_within_the_reply_budget(
    two_storages: tuple[SQLAlchemyStorage, SQLAlchemyStorage],
) -> None:
    hosts = [AppTester.from_directory(EXAMPLE, st, overrides={"REPLY_BUDGET": (20, 5)}, now=6000.0)
             for st in two_storages]
    replies = 0
    for i in range(60):  # forged subscriptions, alternating between the hosts
        r = hosts[i % 2].send(f"victim{i}@domain{i % 12}.example", "python-subscribe@lists.example.org")
        replies += len(r.replies)
    assert replies == 20  # not 20 per host
    assert len(outbox(two_storages[0])) == 20


def test_two_hosts_share_the_reply_rate_limit(
    two_storages: tuple[SQLAlchemyStorage, SQLAlchemyStorage],
) -> None:
    hosts = [AppTester.from_directory(EXAMPLE, st, overrides={"REPLY_LIMIT": (2, 3600)}, now=6000.0)
             for st in two_storages]
    replies = [len(hosts[i % 2].send("alice@example.com", "python-help@lists.example.org").replies)
               for i in range(6)]
    assert sum(replies) == 2  # the limit per sender, whichever host answers


def test_a_retry_through_another_host_replays_the_committed_decision(
    two_storages: tuple[SQLAlchemyStorage, SQLAlchemyStorage],
) -> None:
    first, second = (AppTester.from_directory(EXAMPLE, st, now=6000.0).app for st in two_storages)
    raw = make_message("alice@example.com", ("python-subscribe@lists.example.org",), "subscribe", "please\n")

    def request() -> MailRequest:
        r = MailRequest.from_bytes(raw, sender="alice@example.com",
                                   recipients=("python-subscribe@lists.example.org",), queue_id="Q1")
        r.replay_key = "xforward:host-a:Q1"  # what the transport derives; the same for the retry
        return r

    done = first.process(request(), now=6000.0)
    assert len(done.outbox) == 1  # the confirmation request
    again = second.process(request(), now=6001.0)  # Postfix retried through the other host
    assert "retry: decision replayed" in again.notes
    assert [o.action for o in again.outcomes] == [o.action for o in done.outcomes]
    assert outbox(two_storages[1]) == [("alice@example.com",)]  # one confirmation, not two


def test_two_hosts_creating_the_schema_at_once_both_succeed(sql_url: str) -> None:
    storages = [SQLAlchemyStorage(sql_url) for _ in range(4)]
    start = threading.Barrier(len(storages))
    errors: list[BaseException] = []

    def init(st: SQLAlchemyStorage) -> None:
        try:
            start.wait(10)
            st.create_schema()
        except BaseException as exc:  # noqa: BLE001 -- reported below
            errors.append(exc)

    threads = [threading.Thread(target=init, args=(st,)) for st in storages]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        for st in storages:
            st.check_schema()  # complete, and in this version
        from sqlalchemy import text

        with storages[0]._begin("reading", read_only=True) as conn:
            versions = conn.execute(text("SELECT value FROM lamsonfilter_meta")).all()
            revisions = conn.execute(text("SELECT version_num FROM lamsonfilter_alembic_version")).all()
        assert versions == [(str(SCHEMA_VERSION),)]  # one row, not one per host
        assert revisions == [("0002",)]  # Alembic's version row too
    finally:
        for st in storages:
            st.close()


def test_a_host_starting_on_a_fresh_sqlite_file_waits_for_another_in_a_transaction(tmp_path: Path) -> None:
    """SQLite's switch of a new file to WAL says "database is locked" at once (no busy
    handler) while another connection writes; the storage waits for it instead."""
    import sqlite3

    db = tmp_path / "fresh.db"
    other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("CREATE TABLE elsewhere (x)")  # another host's first transaction, still open
    done = threading.Timer(0.3, other.execute, args=("COMMIT",))  # it ends well within lock_timeout
    done.start()
    st = SQLAlchemyStorage(f"sqlite:///{db}", lock_timeout=20.0)
    try:
        st.create_schema()
        st.check_schema()
    finally:
        done.join(20)
        st.close()
        other.close()
