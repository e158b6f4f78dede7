"""The `StateStorage` contract on every back end: memory, SQLite and PostgreSQL.

Most tests take the `storage` fixture and therefore run three times.  The
PostgreSQL runs use a schema of their own (``lf_test_<hex>``, dropped at the
end of the session) on the server named by ``LAMSONFILTER_TEST_PG_URL``
(default ``postgresql://postgres@127.0.0.1:5432/test``).  When that server
is unreachable they are skipped -- unless ``CI=true``, where they fail.

Requirement tags (R2, M1, D3, ...) refer to docs/reliability.rst, which states each one.
"""

from __future__ import annotations

import importlib.util
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import make_url

from lamsonfilter.decisions import OutboxMessage
from lamsonfilter.store.sql import SCHEMA_VERSION, SQLAlchemyStorage
from lamsonfilter.state import (
    ConflictError,
    SchemaMissingError,
    StateRecord,
    StateStorage,
    StorageError,
)
from tests.rig.storage import (  # noqa: F401 -- the fixtures come from tests/conftest.py
    ALL_BACKENDS,
    PG_URL,
    SQL_BACKENDS,
    TABLES,
)
from tests.rig.storage import open_sql as _open
from tests.rig.storage import pg_admin as _pg_admin
from tests.rig.storage import pg_url_for as _pg_url

INIT_HINT = "lamsonfilter db init --app DIR"
UPGRADE_HINT = "lamsonfilter db upgrade --app DIR"



def _execute(url: str, sql: str) -> None:
    """Run `sql` on the database behind `url` outside the storage (to break things)."""
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    engine = create_engine(parsed)
    try:
        with engine.begin() as conn:
            conn.execute(text(sql))
    finally:
        engine.dispose()


def msg(n: int) -> OutboxMessage:
    return OutboxMessage(
        sender="",
        recipients=(f"user{n}@example.org", "other@example.net"),
        raw=b"Subject: %d\r\n\r\nbinary \xff\x00 body\r\n" % n,
        kind="reply",
    )


def get(storage: StateStorage, key: str) -> StateRecord | None:
    with storage.transaction() as tx:
        rec: StateRecord | None = tx.get(key)
        return rec


# ---------------------------------------------------------------- basic contract
def test_get_set_clear(storage: StateStorage) -> None:
    with storage.transaction() as tx:
        assert tx.get("k") is None
        tx.set("k", "CONFIRMING", {"token": "abc"})
        assert tx.get("k") == StateRecord("CONFIRMING", {"token": "abc"})
    assert get(storage, "k") == StateRecord("CONFIRMING", {"token": "abc"})
    with storage.transaction() as tx:
        tx.set("k", "POSTING", {"n": 1})
    assert get(storage, "k") == StateRecord("POSTING", {"n": 1})
    with storage.transaction() as tx:
        tx.clear("k")
        tx.clear("never-set")  # no error
        assert tx.get("k") is None
    assert get(storage, "k") is None


def test_set_without_data_keeps_old_data(storage: StateStorage) -> None:
    with storage.transaction() as tx:
        tx.set("k", "A", {"keep": [1, 2]})
    with storage.transaction() as tx:
        tx.set("k", "B")
        tx.set("fresh", "NEW", None)
    assert get(storage, "k") == StateRecord("B", {"keep": [1, 2]})
    assert get(storage, "fresh") == StateRecord("NEW", {})
    with storage.transaction() as tx:
        tx.set("k", "C", {})  # an empty dict is data, not "keep"
    assert get(storage, "k") == StateRecord("C", {})


def test_data_round_trip(storage: StateStorage) -> None:
    data = {
        "str": "Grüße, 世界 \U0001f4e8 \"quoted\" \\ back",
        "int": 2**53 + 1,
        "neg": -7,
        "float": 1.25,
        "true": True,
        "false": False,
        "none": None,
        "list": [1, "a", None, [], {"x": [1.5]}],
        "nested": {"deep": {"deeper": ["v", {"k": False}]}},
        "": "empty key",
    }
    with storage.transaction() as tx:
        tx.set("mailinglist:python@lists.example.org:alice@example.com", "S", data)
    rec = get(storage, "mailinglist:python@lists.example.org:alice@example.com")
    assert rec is not None
    assert rec.state == "S"
    assert dict(rec.data) == data
    assert type(rec.data["int"]) is int and type(rec.data["float"]) is float


def test_find_prefix_state_and_order(storage: StateStorage) -> None:
    keys = {
        "list:b:2": "A",
        "list:a:1": "B",
        "list:B:3": "A",  # upper case sorts before lower case, as in Python
        "list:a:0": "A",
        "lists:x": "A",
        "other:list:a": "A",
        "LIST:a:9": "A",  # a different key: find is case-sensitive
    }
    with storage.transaction() as tx:
        for k, st in keys.items():
            tx.set(k, st, {"k": k})
    with storage.transaction() as tx:
        found = tx.find("list:")
        assert [k for k, _ in found] == ["list:B:3", "list:a:0", "list:a:1", "list:b:2"]
        assert found[0][1] == StateRecord("A", {"k": "list:B:3"})
        assert [k for k, _ in tx.find("list:", "A")] == ["list:B:3", "list:a:0", "list:b:2"]
        assert [k for k, _ in tx.find("list:a:", "B")] == ["list:a:1"]
        assert tx.find("list:", "NOPE") == []
        assert tx.find("nothing") == []
        assert len(tx.find("")) == len(keys)


def test_find_escapes_like_wildcards(storage: StateStorage) -> None:
    keys = [
        "p:100%:a",
        "p:100x:b",  # would match an unescaped "p:100%"... prefix
        "p:100%x:c",
        "u:a_b:1",
        "u:axb:2",  # would match an unescaped "u:a_b" prefix
        "s:a/b:1",
        "s:a\\b:2",
        "s:ab:3",
    ]
    with storage.transaction() as tx:
        for k in keys:
            tx.set(k, "S")
    with storage.transaction() as tx:
        assert [k for k, _ in tx.find("p:100%:")] == ["p:100%:a"]
        assert [k for k, _ in tx.find("p:100%")] == ["p:100%:a", "p:100%x:c"]
        assert [k for k, _ in tx.find("u:a_b")] == ["u:a_b:1"]
        assert [k for k, _ in tx.find("s:a/")] == ["s:a/b:1"]
        assert [k for k, _ in tx.find("s:a\\")] == ["s:a\\b:2"]
        assert [k for k, _ in tx.find("%")] == []
        assert [k for k, _ in tx.find("_")] == []


# ---------------------------------------------------------------- rollback
def test_commit_false_rolls_back(storage: StateStorage) -> None:
    with storage.transaction() as tx:
        tx.set("k", "OLD", {"v": 1})
    with storage.transaction(commit=False) as tx:
        tx.set("k", "NEW", {"v": 2})
        tx.set("other", "NEW")
        tx.add_outbox([msg(1)])
        assert tx.claim("token-1") is True
        assert tx.get("k") == StateRecord("NEW", {"v": 2})  # visible inside
    assert get(storage, "k") == StateRecord("OLD", {"v": 1})
    assert get(storage, "other") is None
    assert storage.pending_outbox() == []
    with storage.transaction() as tx:
        assert tx.claim("token-1") is True


def test_exception_rolls_back_state_outbox_and_tokens(storage: StateStorage) -> None:
    with storage.transaction() as tx:
        tx.set("k", "OLD", {"v": 1})
        tx.set("gone", "X")
    with pytest.raises(RuntimeError, match="handler blew up"):
        with storage.transaction() as tx:
            tx.set("k", "NEW", {"v": 2})
            tx.clear("gone")
            tx.set("fresh", "NEW")
            tx.add_outbox([msg(1), msg(2)])
            assert tx.claim("token-1") is True
            raise RuntimeError("handler blew up")
    assert get(storage, "k") == StateRecord("OLD", {"v": 1})
    assert get(storage, "gone") == StateRecord("X", {})
    assert get(storage, "fresh") is None
    assert storage.pending_outbox() == []
    with storage.transaction() as tx:
        assert tx.claim("token-1") is True  # the failed attempt recorded nothing


# ---------------------------------------------------------------- the App's one transaction
def _confirming_app(storage: StateStorage) -> Any:
    """An application whose first message for a key sends a confirmation and moves to CONFIRMING."""
    from lamsonfilter import App, Handler

    h = Handler("subscribe")

    @h.route("join@lists.example.org")
    def START(ctx: Any) -> Any:
        ctx.reply(subject="Confirm your subscription", body="Reply to confirm.\n")
        return CONFIRMING

    @h.state
    def CONFIRMING(ctx: Any) -> None:
        return None  # already asked: no second confirmation

    return App(hosts=["lists.example.org"], handlers=[h], storage=storage).start()


def _fail_outbox_insert_once(storage: SQLAlchemyStorage) -> list[str]:
    """Make the database refuse the next INSERT into the outbox table, once, as a driver error."""
    fired: list[str] = []
    dbapi = storage._engine.dialect.loaded_dbapi

    def before(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        if not fired and statement.lstrip().upper().startswith("INSERT INTO LAMSONFILTER_OUTBOX"):
            fired.append(statement)
            raise dbapi.OperationalError("injected: could not write the outbox (disk full)")

    event.listen(storage._engine, "before_cursor_execute", before)
    return fired


def test_a_failed_outbox_write_commits_no_state_and_the_retry_sends_the_confirmation(
    sql_storage: SQLAlchemyStorage,
) -> None:
    """State, replay record and outbox commit together (D3): never a state change without its mail.

    Were the outbox written in a transaction of its own after the state
    commit, the first attempt would leave the key in CONFIRMING (and its
    decision recorded for replay) with no confirmation queued, and the
    retry would send nothing.
    """
    from lamsonfilter import MailRequest
    from lamsonfilter.testing import make_message

    app = _confirming_app(sql_storage)
    sender, rcpt = "alice@example.com", "join@lists.example.org"

    def attempt() -> Any:
        raw = make_message(sender, (rcpt,), subject="subscribe")
        request = MailRequest.from_bytes(raw, sender=sender, recipients=(rcpt,), queue_id="4ABC")
        request.replay_key = "ident:4ABC"  # the transport's key: the retry is the same message
        return app.process(request)

    fired = _fail_outbox_insert_once(sql_storage)
    first = attempt()
    assert len(fired) == 1 and first.is_tempfail
    assert get(sql_storage, f"subscribe:{sender}:{rcpt}") is None  # nothing committed
    assert sql_storage.pending_outbox() == []

    second = attempt()  # the MTA's retry
    assert not second.is_tempfail and "retry: decision replayed" not in second.notes
    assert (second.outcomes[0].state_before, second.outcomes[0].state_after) == ("START", "CONFIRMING")
    assert get(sql_storage, f"subscribe:{sender}:{rcpt}") == StateRecord("CONFIRMING", {})
    pending = sql_storage.pending_outbox()
    assert [p.message.recipients for p in pending] == [(sender,)]
    assert b"Subject: Confirm your subscription" in pending[0].message.raw


# ---------------------------------------------------------------- outbox, claim
def test_outbox_pending_and_mark_sent(storage: StateStorage) -> None:
    assert storage.pending_outbox() == []
    with storage.transaction() as tx:
        tx.add_outbox([msg(1), msg(2)])
        tx.add_outbox([])
    with storage.transaction() as tx:
        tx.add_outbox([msg(3)])
    pending = storage.pending_outbox()
    assert [p.message for p in pending] == [msg(1), msg(2), msg(3)]
    assert [p.attempts for p in pending] == [0, 0, 0]
    assert len({p.id for p in pending}) == 3
    assert [p.id for p in pending] == sorted(p.id for p in pending)
    assert storage.pending_outbox(limit=2) == pending[:2]
    assert storage.pending_outbox(limit=0) == []

    storage.mark_sent([pending[0].id, pending[2].id])
    assert storage.pending_outbox() == [pending[1]]
    storage.mark_sent([])
    storage.mark_sent([pending[0].id, 999_999])  # already sent / unknown: ignored
    assert storage.pending_outbox() == [pending[1]]
    storage.mark_sent([pending[1].id])
    assert storage.pending_outbox() == []


def test_outbox_progress_defer_fail_and_purge(storage: StateStorage) -> None:
    """The outbox's life: recipients taken out as they are done, failed attempts
    counted and due later, a failure kept, sent rows purged in bounded batches."""
    with storage.transaction() as tx:
        tx.add_outbox([msg(1), msg(2), msg(3)])
    one, two, three = storage.pending_outbox()
    assert all(p.created_at > 0 and p.next_attempt is None and p.last_error == "" for p in (one, two, three))

    storage.outbox_progress(one.id, ["other@example.net"])
    storage.defer_outbox(two.id, ["user2@example.org"], next_attempt=time.time() + 3600, error="451 4.3.0 later")
    storage.defer_outbox(two.id, ["user2@example.org"], next_attempt=time.time() + 3600, error="452 4.2.2 full")
    pending = {p.id: p for p in storage.pending_outbox()}
    assert pending[one.id].message.recipients == ("other@example.net",) and pending[one.id].attempts == 0
    deferred = pending[two.id]
    assert deferred.message.recipients == ("user2@example.org",) and deferred.attempts == 2
    assert deferred.last_error == "452 4.2.2 full" and deferred.message.raw == msg(2).raw
    assert deferred.next_attempt is not None and deferred.next_attempt > time.time() + 3500
    assert [p.id for p in storage.pending_outbox(due_before=time.time())] == [one.id, three.id]
    assert [p.id for p in storage.pending_outbox(due_before=time.time() + 7200)] == [one.id, two.id, three.id]

    storage.fail_outbox(three.id, ["other@example.net"], "550 5.1.1 no such user")
    [failed] = storage.failed_outbox()
    assert failed.id == three.id and failed.attempts == 1 and failed.last_error == "550 5.1.1 no such user"
    assert failed.message.recipients == ("other@example.net",)
    storage.defer_outbox(three.id, ["x@example.org"], time.time(), "late")  # a failed one stays failed
    assert storage.failed_outbox() == [failed]
    assert [p.id for p in storage.pending_outbox()] == [one.id, two.id]

    storage.fail_recipients(two.id, ["other@example.net"], "550 5.1.1 unknown")  # a failed copy
    assert storage.failed_outbox()[0] == failed
    copy = storage.failed_outbox()[1]
    assert copy.id not in (one.id, two.id, three.id) and copy.message.raw == msg(2).raw
    assert copy.message.recipients == ("other@example.net",) and copy.attempts == 3
    assert copy.last_error == "550 5.1.1 unknown"
    assert storage.pending_outbox(due_before=time.time() + 7200)[1] == deferred  # the message goes on
    storage.fail_recipients(three.id, ["x@example.org"], "no")  # failed already: nothing
    storage.fail_outbox(99_999, ["x@example.org"], "no")  # unknown: nothing
    assert len(storage.failed_outbox()) == 2
    failed_rows = storage.failed_outbox()

    storage.mark_sent([one.id])
    assert storage.purge_outbox(sent_before=time.time() - 60) == 0  # too recent
    with storage.transaction() as tx:
        tx.add_outbox([msg(n) for n in range(4, 9)])
    storage.mark_sent([p.id for p in storage.pending_outbox() if p.id != two.id])
    assert storage.purge_outbox(sent_before=time.time() + 1, limit=4) == 4
    assert storage.purge_outbox(sent_before=time.time() + 1, limit=4) == 2
    assert storage.purge_outbox(sent_before=time.time() + 1) == 0
    assert [p.id for p in storage.pending_outbox()] == [two.id]  # pending and failed never purged
    assert storage.failed_outbox() == failed_rows


def test_scan_and_delete_keys(storage: StateStorage) -> None:
    with storage.transaction() as tx:
        for i in range(7):
            tx.set(f"done:{i}", "DONE", {"at": i})
        tx.set("DONE:upper", "X")  # SQLite's LIKE would match this; scan must not
        tx.set("done_not", "X")
        tx.set("other", "X")
    first = storage.scan("done:", limit=3)
    assert [k for k, _ in first] == ["done:0", "done:1", "done:2"]
    assert first[1][1] == StateRecord("DONE", {"at": 1})
    rest = storage.scan("done:", after=first[-1][0], limit=100)
    assert [k for k, _ in rest] == [f"done:{i}" for i in range(3, 7)]
    assert storage.scan("done:", after="done:6") == []
    assert storage.delete_keys(["done:1", "done:5", "missing"]) == 2
    assert storage.delete_keys([]) == 0
    assert [k for k, _ in storage.scan("done:")] == ["done:0", "done:2", "done:3", "done:4", "done:6"]
    assert get(storage, "other") == StateRecord("X", {}) and get(storage, "DONE:upper") == StateRecord("X", {})


def test_claim_is_idempotent_across_transactions(storage: StateStorage) -> None:
    with storage.transaction() as tx:
        assert tx.claim("<msgid@example.org>:alice") is True
        assert tx.claim("<msgid@example.org>:alice") is False
        assert tx.claim("<msgid@example.org>:bob") is True
    with storage.transaction() as tx:
        assert tx.claim("<msgid@example.org>:alice") is False
        assert tx.claim("<msgid@example.org>:bob") is False
        assert tx.claim("<msgid@example.org>:carol") is True


# ---------------------------------------------------------------- concurrency
def _run_threads(n: int, target: Callable[[int], None]) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        try:
            barrier.wait()
            target(i)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def _retrying(storage: StateStorage, body: Callable[[Any], None]) -> None:
    for _ in range(100):
        try:
            with storage.transaction() as tx:
                body(tx)
            return
        except ConflictError:
            continue
    raise AssertionError("100 conflicts in a row")


def test_no_lost_updates(storage: StateStorage) -> None:
    """8 threads x 25 read-modify-write increments of a key that starts absent."""

    def increment(tx: Any) -> None:
        rec = tx.get("counter")
        n = rec.data["n"] if rec is not None else 0
        threading.Event().wait(0.0005)  # widen the window between read and write
        tx.set("counter", "COUNTING", {"n": n + 1, "last": threading.get_ident()})

    def worker(i: int) -> None:
        for _ in range(25):
            _retrying(storage, increment)

    _run_threads(8, worker)
    rec = get(storage, "counter")
    assert rec is not None
    assert rec.data["n"] == 200


def test_concurrent_claims_of_one_token(storage: StateStorage) -> None:
    results: list[bool] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        def body(tx: Any) -> None:
            won = tx.claim("the-token")
            with lock:
                results.append(won)

        _retrying(storage, body)

    _run_threads(8, worker)
    assert sorted(results) == [False] * 7 + [True]


def _hold_key(url: str, key: str) -> tuple[threading.Thread, threading.Event]:
    """A thread that opens a transaction, gets `key` and waits until released."""
    holding, release = threading.Event(), threading.Event()
    holder = _open(url)

    def hold() -> None:
        try:
            with holder.transaction() as tx:
                tx.get(key)
                holding.set()
                release.wait(30)
        finally:
            holder.close()

    t = threading.Thread(target=hold)
    t.start()
    assert holding.wait(30), "the holder thread never got the key"
    return t, release


@pytest.mark.parametrize("sql_url", SQL_BACKENDS, indirect=True)
def test_get_locks_the_key_until_the_transaction_ends(sql_url: str) -> None:
    st = _open(sql_url)
    try:  # every storage closed even when an assertion fails: a leaked connection would
        # fail a later, unrelated test through its ResourceWarning (filterwarnings = error)
        st.create_schema()
        t, release = _hold_key(sql_url, "busy-key")
        impatient = _open(sql_url, lock_timeout=0.2)
        try:
            with pytest.raises(StorageError) as info:
                with impatient.transaction() as tx:
                    tx.get("busy-key")  # not yet existing, locked all the same
            assert not isinstance(info.value, ConflictError)
            assert info.value.__cause__ is not None
        finally:
            release.set()
            t.join()
            impatient.close()
        with st.transaction() as tx:  # released: usable again
            assert tx.get("busy-key") is None
    finally:
        st.close()


@pytest.mark.postgres
def test_postgresql_locks_per_key(pg_url: str) -> None:
    """Two read-modify-writes of one key on two connections serialise; another key does not wait (D1).

    A reads the counter and holds its transaction open; B, on another
    connection, then reads and increments the same counter.  With the
    per-key lock B waits (seen in ``pg_locks``) until A has written and
    committed, and the result is 2.  Without it B reads 0 as well and one
    increment is lost (PostgreSQL's READ COMMITTED upsert does not stop it).
    """
    setup = _open(pg_url)
    try:
        setup.create_schema()
    finally:
        setup.close()
    a, b, other = _open(pg_url), _open(pg_url, lock_timeout=30), _open(pg_url, lock_timeout=5)
    b_pid: list[int] = []
    b_done = threading.Event()
    errors: list[BaseException] = []

    def increment_in_b() -> None:
        try:
            with b.transaction() as tx:
                b_pid.append(tx._conn.execute(text("SELECT pg_backend_pid()")).scalar_one())
                rec = tx.get("counter")
                tx.set("counter", "COUNTING", {"n": (rec.data["n"] if rec else 0) + 1})
        except BaseException as exc:  # reported in the test's thread
            errors.append(exc)
        finally:
            b_done.set()

    def b_waits_for_a_lock() -> bool:
        if not b_pid:
            return False
        with _pg_admin() as admin:
            row = admin.execute(
                "SELECT count(*) FROM pg_locks WHERE pid = %s AND NOT granted", (b_pid[0],)
            ).fetchone()
        return row is not None and row[0] > 0

    try:
        with a.transaction() as tx:
            rec = tx.get("counter")
            n = rec.data["n"] if rec else 0
            t = threading.Thread(target=increment_in_b)
            t.start()
            deadline = time.monotonic() + 30
            while not (b_done.is_set() or b_waits_for_a_lock()) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not b_done.is_set(), "B changed the key while A's transaction held it"
            with other.transaction() as tx2:  # another key: does not wait for "counter"
                tx2.get("free")
                tx2.set("free", "DONE")
            tx.set("counter", "COUNTING", {"n": n + 1})
        t.join(30)
        assert errors == [] and b_done.is_set()
        assert get(a, "counter") == StateRecord("COUNTING", {"n": 2})
        assert get(other, "free") == StateRecord("DONE", {})
    finally:
        for st in (a, b, other):
            st.close()


# ---------------------------------------------------------------- schema
@pytest.mark.parametrize("sql_url", SQL_BACKENDS, indirect=True)
def test_missing_schema(sql_url: str) -> None:
    st = _open(sql_url)
    try:
        with pytest.raises(SchemaMissingError) as info:
            st.check_schema()
        assert str(info.value) == (
            f"the database at {st.url} has no lamsonfilter schema; "
            f"run `{INIT_HINT} --database {st.url}`"  # the hint names this database (issue 12 item 6)
        )
        with pytest.raises(SchemaMissingError, match=INIT_HINT):
            with st.transaction() as tx:
                tx.get("k")
        st.create_schema()
        st.check_schema()
    finally:
        st.close()


@pytest.mark.postgres
def test_messages_hide_the_password(pg_schema: str, pg_url: str) -> None:
    st = _open(_pg_url(pg_schema, password="s3cret-pw"))  # trust auth ignores it
    try:
        with pytest.raises(SchemaMissingError) as info:
            st.check_schema()
        assert "s3cret-pw" not in str(info.value)
        assert "***@" in str(info.value)
        assert "s3cret-pw" not in repr(st)
    finally:
        st.close()


def test_create_schema_is_idempotent(sql_storage: SQLAlchemyStorage) -> None:
    with sql_storage.transaction() as tx:
        tx.set("k", "KEEP", {"v": 1})
        tx.add_outbox([msg(1)])
    sql_storage.create_schema()
    sql_storage.create_schema()
    sql_storage.check_schema()
    assert get(sql_storage, "k") == StateRecord("KEEP", {"v": 1})
    assert [p.message for p in sql_storage.pending_outbox()] == [msg(1)]


@pytest.mark.parametrize("sql_url", SQL_BACKENDS, indirect=True)
def test_schema_version_mismatch(sql_url: str) -> None:
    st = _open(sql_url)
    try:
        st.create_schema()
        _execute(sql_url, "UPDATE lamsonfilter_alembic_version SET version_num = '9999'")
        with pytest.raises(SchemaMissingError, match="revision 9999, newer than this lamsonfilter knows"):
            st.check_schema()
        with pytest.raises(SchemaMissingError, match="upgrade lamsonfilter"):
            st.create_schema()  # never "downgrades"

        _execute(sql_url, "DROP TABLE lamsonfilter_confirmations")  # as revision 0001 left it
        _execute(sql_url, "UPDATE lamsonfilter_alembic_version SET version_num = '0001'")
        with pytest.raises(SchemaMissingError, match="revision 0001, older than this lamsonfilter needs") as info:
            st.check_schema()
        assert f"{UPGRADE_HINT} --database {st.url}" in str(info.value)
        st.create_schema()  # upgrades
        st.check_schema()

        _execute(sql_url, "DROP TABLE lamsonfilter_tokens")
        with pytest.raises(SchemaMissingError, match="incomplete.*lamsonfilter_tokens"):
            st.check_schema()
    finally:
        st.close()


@pytest.mark.parametrize("sql_url", SQL_BACKENDS, indirect=True)
def test_schema_version_mismatch_before_alembic(sql_url: str) -> None:
    """A database made before migrations: its ``lamsonfilter_meta`` version decides."""
    st = _open(sql_url)
    try:
        st.create_schema()
        _execute(sql_url, "DROP TABLE lamsonfilter_alembic_version")
        _execute(sql_url, "DROP TABLE lamsonfilter_confirmations")
        _execute(sql_url, "UPDATE lamsonfilter_meta SET value = '5'")  # 4: see test_migrations.py
        with pytest.raises(SchemaMissingError, match="version 5, newer than this lamsonfilter knows"):
            st.check_schema()
        with pytest.raises(SchemaMissingError, match="upgrade lamsonfilter"):
            st.create_schema()
        _execute(sql_url, "UPDATE lamsonfilter_meta SET value = 'x'")
        with pytest.raises(SchemaMissingError, match="unreadable version 'x'"):
            st.check_schema()

        _execute(sql_url, f"UPDATE lamsonfilter_meta SET value = '{SCHEMA_VERSION}'")
        with pytest.raises(SchemaMissingError, match="version 3 .* older than this lamsonfilter needs") as info:
            st.check_schema()
        assert f"{UPGRADE_HINT} --database {st.url}" in str(info.value)
        st.create_schema()
        st.check_schema()
    finally:
        st.close()


# ---------------------------------------------------------------- errors
def test_locked_sqlite_database_is_a_storage_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    ready = _open(url)
    try:
        ready.create_schema()
    finally:
        ready.close()
    blocker = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
    st = _open(url, lock_timeout=0.1)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StorageError, match="database is locked") as info:
            with st.transaction() as tx:
                tx.set("k", "S")
        assert not isinstance(info.value, ConflictError)
        assert isinstance(info.value.__cause__, Exception)
        assert str(tmp_path) in str(info.value)
        blocker.execute("ROLLBACK")
        with st.transaction() as tx:  # usable once the lock is gone
            tx.set("k", "S")
        assert get(st, "k") == StateRecord("S", {})
    finally:
        st.close()
        blocker.close()


def test_sqlite_locked_before_first_connection(tmp_path: Path) -> None:
    """Switching a fresh database to WAL on connect also fails cleanly when locked."""
    path = tmp_path / "state.db"
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("CREATE TABLE unrelated (x)")
    st = _open(f"sqlite:///{path}", lock_timeout=0.1)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StorageError, match="locked"):
            st.check_schema()
    finally:
        st.close()
        blocker.close()


def test_sqlite_in_a_missing_directory(tmp_path: Path) -> None:
    st = _open(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'state.db'}")
    try:
        with pytest.raises(StorageError, match="unable to open database file"):
            st.create_schema()
    finally:
        st.close()


def test_unreachable_postgresql_is_a_storage_error() -> None:
    st = _open("postgresql://lamson:pw-secret@127.0.0.1:1/test")
    try:
        with pytest.raises(StorageError) as info:
            st.check_schema()
        assert "127.0.0.1:1" in str(info.value)
        assert "pw-secret" not in str(info.value)
        assert info.value.__cause__ is not None
        with pytest.raises(StorageError):
            with st.transaction() as tx:
                tx.get("k")
        with pytest.raises(StorageError):
            st.pending_outbox()
    finally:
        st.close()


@pytest.mark.parametrize(
    "url, expected",
    [
        ("not a url", "cannot parse"),
        ("", "cannot parse"),
        ("postgresql+nosuchdriver://u:pw-secret@db/x", "no database driver"),
        ("postgresql+pg8000://u:pw-secret@db/x", "no database driver"),
        ("mysql://u:pw-secret@db/x", "unsupported state database"),
        ("sqlite://user:pw-secret@host/x.db", "cannot use the state database"),
    ],
)
def test_bad_urls(url: str, expected: str) -> None:
    if "pg8000" in url and importlib.util.find_spec("pg8000") is not None:
        SQLAlchemyStorage(url).close()  # installed here: a driver after all (no skip: see tests/rig)
        return
    with pytest.raises(StorageError, match=expected) as info:
        SQLAlchemyStorage(url)
    assert "pw-secret" not in str(info.value)
    assert info.value.__cause__ is not None or "unsupported" in expected


def test_postgresql_url_means_psycopg() -> None:
    for url in ("postgresql://u@db.example.org/mail", "postgres://u@db.example.org/mail"):
        st = SQLAlchemyStorage(url)
        try:
            assert st.backend == "postgresql"
            assert st._engine.dialect.driver == "psycopg"
            assert st.url == url
        finally:
            st.close()


def test_in_memory_sqlite_shared_by_threads() -> None:
    st = SQLAlchemyStorage("sqlite://")
    try:
        st.create_schema()

        def increment(tx: Any) -> None:
            rec = tx.get("n")
            tx.set("n", "S", {"n": (rec.data["n"] if rec else 0) + 1})

        def worker(i: int) -> None:
            for _ in range(10):
                _retrying(st, increment)

        _run_threads(4, worker)
        assert get(st, "n") == StateRecord("S", {"n": 40})
    finally:
        st.close()


def test_invalid_keys_and_data(sql_storage: SQLAlchemyStorage) -> None:
    with sql_storage.transaction() as tx:
        with pytest.raises(ValueError, match="longer than 512"):
            tx.set("k" * 513, "S")
        with pytest.raises(ValueError, match="longer than 64"):
            tx.set("k", "S" * 65)
        with pytest.raises(TypeError, match="JSON"):
            tx.set("k", "S", {"when": object()})
        with pytest.raises(TypeError, match="JSON"):
            tx.set("k", "S", {"nan": float("nan")})
        tx.set("k", "OK")
    assert get(sql_storage, "k") == StateRecord("OK", {})


def test_transaction_object_is_dead_after_the_block(sql_storage: SQLAlchemyStorage) -> None:
    with sql_storage.transaction() as tx:
        pass
    with pytest.raises(RuntimeError, match="ended"):
        tx.get("k")


# ---------------------------------------------------------------- upgrades
#: The tables as lamsonfilter's schema version 1 created them on SQLite (outbox
#: without next_attempt_at, failed_at, last_error).
SCHEMA_1_SQLITE = """
CREATE TABLE lamsonfilter_meta (name VARCHAR(64) NOT NULL, value VARCHAR(255) NOT NULL, PRIMARY KEY (name));
CREATE TABLE lamsonfilter_outbox (
    id INTEGER NOT NULL, created_at DATETIME NOT NULL, sender TEXT NOT NULL, recipients TEXT NOT NULL,
    raw BLOB NOT NULL, kind VARCHAR(32) NOT NULL, attempts INTEGER NOT NULL, sent_at DATETIME,
    PRIMARY KEY (id));
CREATE INDEX ix_lamsonfilter_outbox_sent_at ON lamsonfilter_outbox (sent_at);
CREATE TABLE lamsonfilter_state ("key" VARCHAR(512) NOT NULL, state VARCHAR(64) NOT NULL, data TEXT NOT NULL,
    version INTEGER NOT NULL, updated_at DATETIME NOT NULL, PRIMARY KEY ("key"));
CREATE TABLE lamsonfilter_tokens (token VARCHAR(512) NOT NULL, created_at DATETIME NOT NULL, PRIMARY KEY (token));
INSERT INTO lamsonfilter_meta VALUES ('schema_version', '1');
INSERT INTO lamsonfilter_state VALUES ('k', 'KEEP', '{"v":1}', 3, '2026-01-01 00:00:00.000000');
INSERT INTO lamsonfilter_outbox VALUES
    (1, '2026-01-01 00:00:00.000000', '', '["a@example.org"]', X'5375626a6563743a20310d0a0d0a', 'reply', 0,
     '2026-01-01 00:00:01.000000'),
    (2, '2026-01-01 00:00:00.000000', '', '["b@example.org"]', X'5375626a6563743a20320d0a0d0a', 'reply', 0, NULL);
"""


def test_db_init_upgrades_a_schema_1_sqlite_file(tmp_path: Path) -> None:
    import shutil

    from click.testing import CliRunner

    from lamsonfilter.cli import main

    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:
        conn.executescript(SCHEMA_1_SQLITE)
    url = f"sqlite:///{db}"
    st = _open(url)
    try:
        with pytest.raises(SchemaMissingError, match="older than this lamsonfilter needs"):
            st.check_schema()
        app = tmp_path / "app"
        shutil.copytree(Path(__file__).resolve().parents[1] / "examples" / "mailinglist", app,
                        ignore=shutil.ignore_patterns("var", "__pycache__"))
        result = CliRunner().invoke(main, ["db", "init", "--app", str(app), "--database", url])
        assert result.exit_code == 0, result.output
        st.check_schema()
        assert get(st, "k") == StateRecord("KEEP", {"v": 1})
        [pending] = st.pending_outbox()  # the sent one stays sent
        assert pending.id == 2 and pending.message.recipients == ("b@example.org",) and pending.attempts == 0
        assert [p.id for p in st.claim_outbox("w", 5)] == [2]  # the claim columns were added
        assert st.claim_outbox("other", 5) == []
        st.defer_outbox(2, ["b@example.org"], time.time() + 60, "451 later")
        assert st.pending_outbox(due_before=time.time()) == []
        assert st.purge_outbox(sent_before=time.time()) == 1
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT value FROM lamsonfilter_meta").fetchone() == (str(SCHEMA_VERSION),)
            assert conn.execute("SELECT count(*) FROM lamsonfilter_outbox").fetchone() == (1,)
    finally:
        st.close()


@pytest.mark.postgres
def test_create_schema_upgrades_a_schema_1_postgresql_database(pg_url: str) -> None:
    st = _open(pg_url)
    try:
        st.create_schema()
        with st.transaction() as tx:
            tx.add_outbox([msg(1)])
        _execute(pg_url, "ALTER TABLE lamsonfilter_outbox DROP COLUMN next_attempt_at, "
                         "DROP COLUMN failed_at, DROP COLUMN last_error, "
                         "DROP COLUMN claimed_by, DROP COLUMN claimed_until")
        _execute(pg_url, "UPDATE lamsonfilter_meta SET value = '1'")
        _execute(pg_url, "DROP TABLE lamsonfilter_alembic_version")  # as before migrations
        _execute(pg_url, "DROP TABLE lamsonfilter_confirmations")
        with pytest.raises(SchemaMissingError, match="older than this lamsonfilter needs"):
            st.check_schema()
        st.create_schema()
        st.check_schema()
        [pending] = st.pending_outbox()
        assert pending.message == msg(1)
        assert [p.id for p in st.claim_outbox("w", 5)] == [pending.id]  # claim columns added
        st.fail_outbox(pending.id, ["user1@example.org"], "550 no")
        assert [f.last_error for f in st.failed_outbox()] == ["550 no"]
    finally:
        st.close()
