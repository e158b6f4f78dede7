"""``lamsonfilter outbox``: list, show, retry and drop on real SQLite and PostgreSQL databases.

A failed message is made by a real `OutboxWorker` against an SMTP server that
refuses the recipient; after ``outbox retry`` the same worker sends it.  A
message another worker holds (its lease running) is refused with exit
status 1 and left as it was; one whose lease ended is not held.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Iterator

import psycopg
import pytest
from click.testing import CliRunner

from lamsonfilter.cli import main
from lamsonfilter.decisions import OutboxMessage
from lamsonfilter.outboxworker import OutboxWorker
from lamsonfilter.relay import Relay
from lamsonfilter.state import OutboxBusy
from lamsonfilter.store.sql import SQLAlchemyStorage
from tests.rig.proxy import Script, ScriptedSMTP
from tests.rig.storage import SQL_BACKENDS, open_sql

SENDER = "python-bounces@lists.example.org"


def raw(subject: str) -> bytes:
    return (f"From: {SENDER}\r\nTo: someone\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '-')}@lists.example.org>\r\n\r\nbody\r\n").encode()


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, ["outbox", *args])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    return r.exit_code, r.stdout, r.stderr


def one_line_error(err: str) -> bool:
    return err.count("\n") == 1 and err.startswith("lamsonfilter: ") and "Traceback" not in err


@pytest.fixture
def db(sql_url: str) -> Iterator[tuple[str, SQLAlchemyStorage]]:
    st = open_sql(sql_url)
    st.create_schema()
    try:
        yield sql_url, st
    finally:
        st.close()


def add(st: SQLAlchemyStorage, *messages: OutboxMessage) -> list[int]:
    with st.transaction() as tx:
        tx.add_outbox(list(messages))
    return [p.id for p in st.pending_outbox(1000)][-len(messages):]


@pytest.mark.parametrize("sql_url", SQL_BACKENDS, indirect=True)
def test_a_failed_message_is_listed_retried_and_then_sent(db: tuple[str, SQLAlchemyStorage]) -> None:
    url, st = db
    [failed, waiting] = add(st, OutboxMessage(SENDER, ("nobody@example.org",), raw("refused one"), "reply"),
                            OutboxMessage(SENDER, ("later@example.org", "b@example.org"), raw("waits")))
    refuse = Script(refuse_rcpt={"nobody@example.org": "550 5.1.1 no such user"})
    with ScriptedSMTP(refuse) as server:
        worker = OutboxWorker(st, Relay("127.0.0.1", server.port, timeout=10.0), interval=3600.0, min_backoff=0.0)
        st.defer_outbox(waiting, ["later@example.org", "b@example.org"], time.time() + 3600, "451 4.3.0 later")
        assert worker.flush() == 1  # only the due one: refused for good
    assert [p.id for p in st.failed_outbox()] == [failed]

    code, out, err = run("list", "--database", url, "--json")
    assert code == 0, err
    listing = json.loads(out)
    assert listing["counts"] == {"pending": 1, "failed": 1, "claimed": 0}
    assert (listing["total"], listing["shown"], listing["more"]) == (2, 2, 0)
    by_id = {m["id"]: m for m in listing["messages"]}
    assert by_id[failed]["state"] == "failed" and "550 5.1.1" in by_id[failed]["last_error"]
    assert by_id[failed]["recipients"] == ["nobody@example.org"] and by_id[failed]["attempts"] == 1
    assert by_id[waiting]["state"] == "pending"
    assert by_id[waiting]["next_attempt"] > by_id[waiting]["created_at"]
    assert by_id[waiting]["subject"] == "waits" and by_id[waiting]["held"] is False

    code, out, _ = run("list", "--database", url)
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:4] == ["ID", "STATE", "KIND", "TRIES"] and len(lines) == 3
    assert "550 5.1.1 no such user" in out and "<later@example.org> +1" in out and "in 59m" in out
    code, out, _ = run("list", "--database", url, "--state", "failed", "--limit", "1", "--json")
    assert [m["id"] for m in json.loads(out)["messages"]] == [failed]
    code, out, _ = run("list", "--database", url, "--limit", "1")
    assert code == 0 and out.splitlines()[-1] == "1 of 2 messages shown; --limit N for more"

    code, out, _ = run("show", str(failed), "--database", url)
    assert code == 0 and "State:" in out and "failed" in out and "RCPT TO:    <nobody@example.org>" in out
    assert "Subject: refused one" in out
    r = CliRunner().invoke(main, ["outbox", "show", str(failed), "--database", url, "--raw"])
    assert r.exit_code == 0 and r.stdout_bytes == raw("refused one")

    code, out, err = run("retry", str(failed), "--database", url, "--json")
    assert code == 0, err
    assert json.loads(out) == {"id": failed, "ok": True, "state": "pending", "was": "failed", "error": None}
    assert st.failed_outbox() == [] and {p.id for p in st.pending_outbox(due_before=time.time())} == {failed}
    with ScriptedSMTP() as server:  # the relay takes it now: the worker sends it
        worker = OutboxWorker(st, Relay("127.0.0.1", server.port, timeout=10.0), interval=3600.0, min_backoff=0.0)
        assert worker.flush() == 1
        assert [m.data for m in server.messages] == [raw("refused one")]
    assert [p.id for p in st.pending_outbox()] == [waiting]

    code, out, _ = run("retry", str(waiting), "--database", url)  # a waiting one: due now
    assert code == 0 and out == f"{waiting}: pending, due now (was waiting)\n"
    assert [p.id for p in st.pending_outbox(due_before=time.time())] == [waiting]
    code, out, err = run("show", str(failed), "--database", url)
    assert code == 2 and one_line_error(err) and "it was sent" in err


@pytest.mark.parametrize("sql_url", SQL_BACKENDS, indirect=True)
def test_a_message_a_live_worker_holds_is_neither_retried_nor_dropped(db: tuple[str, SQLAlchemyStorage]) -> None:
    url, st = db
    [held, free] = add(st, OutboxMessage(SENDER, ("a@example.org",), raw("held")),
                       OutboxMessage(SENDER, ("b@example.org",), raw("free")))
    other_host = open_sql(url)  # another filter host's worker, its own connection
    try:
        assert [p.id for p in other_host.claim_outbox("hostB:42:x", limit=1, lease=300)] == [held]
        code, out, _ = run("list", "--database", url, "--json")
        listing = json.loads(out)
        assert listing["counts"]["claimed"] == 1
        [h] = [m for m in listing["messages"] if m["id"] == held]
        assert h["held"] is True and h["claimed_by"] == "hostB:42:x" and h["claimed_until"]
        code, out, _ = run("list", "--database", url)
        assert "sending (hostB:42:x)" in out

        code, out, err = run("retry", str(held), str(free), "--database", url)
        assert code == 1 and one_line_error(err) and "is being sent by hostB:42:x" in err
        assert out == f"{free}: pending, due now (was waiting)\n"  # the free one was done
        code, _, err = run("drop", str(held), "--database", url, "--yes")
        assert code == 1 and one_line_error(err) and "try again later" in err
        code, out, _ = run("drop", str(held), "--database", url, "--yes", "--json")
        assert code == 1 and json.loads(out)["ok"] is False
        assert other_host.renew_claims("hostB:42:x", [held]) == {held}  # untouched: still its own

        # the worker dies: its lease ends (claimed again with a lease already over), nobody holds it
        other_host.release_claims("hostB:42:x", [held])
        assert other_host.claim_outbox("hostB:42:x", limit=1, lease=-60) != []
        code, out, err = run("drop", str(held), "--database", url, "--yes")
        assert code == 0, err
        assert out.startswith(f"{held}: dropped (was pending, 1 recipient(s) will not get it)")
        assert other_host.renew_claims("hostB:42:x", [held]) == set()  # a late worker sees it is gone
    finally:
        other_host.close()
    assert [p.id for p in st.pending_outbox()] == [free]


@pytest.mark.parametrize("sql_url", SQL_BACKENDS, indirect=True)
def test_drop_needs_yes_and_every_id_is_checked_first(db: tuple[str, SQLAlchemyStorage]) -> None:
    url, st = db
    [one] = add(st, OutboxMessage(SENDER, ("a@example.org",), raw("one")))
    code, _, err = run("drop", str(one), "--database", url)
    assert code == 2 and one_line_error(err) and "refused without --yes" in err
    code, _, err = run("drop", str(one), "999999", "--database", url, "--yes")
    assert code == 2 and one_line_error(err) and "no pending or failed outbox message 999999" in err
    for hostile in ("abc", "1; DROP TABLE lamsonfilter_outbox", "../1", "1e3", "٣", "99999999999999999999"):
        code, _, err = run("retry", hostile, "--database", url)
        assert code == 2 and one_line_error(err) and "is not an outbox message id" in err, hostile
    assert [p.id for p in st.pending_outbox()] == [one]
    code, out, _ = run("drop", str(one), "--database", url, "-y", "--json")
    assert code == 0 and json.loads(out) == {"id": one, "ok": True, "state": "pending", "was": "pending",
                                             "error": None}
    code, out, _ = run("list", "--database", url)
    assert code == 0 and out == "the outbox has no pending or failed messages\n"
    code, out, _ = run("list", "--database", url, "--json")
    assert json.loads(out)["messages"] == [] and json.loads(out)["total"] == 0


def test_where_the_database_is(tmp_path: Path) -> None:
    """--database, --app's DATABASE_URL, env LAMSONFILTER_DATABASE; a missing one is one line."""
    code, _, err = run("list")
    assert code == 2 and one_line_error(err) and "--database URL" in err and "--app DIR" in err
    code, _, err = run("list", "--database", f"sqlite:///{tmp_path / 'none.db'}")
    assert code == 2 and one_line_error(err) and "does not exist yet" in err
    assert not (tmp_path / "none.db").exists()
    code, _, err = run("list", "--database", "memory:")
    assert code == 2 and one_line_error(err) and "memory:" in err
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    code, _, err = run("list", "--database", f"sqlite:///{empty}")
    assert code == 2 and one_line_error(err) and "db init" in err
    code, _, err = run("list", "--app", str(tmp_path / "noapp"))
    assert code == 2 and one_line_error(err) and "no such application directory" in err

    app = tmp_path / "app"
    (app / "config").mkdir(parents=True)
    (app / "config" / "settings.py").write_text("HANDLERS = []\nDATABASE_URL = 'sqlite:///var/state.db'\n")
    (app / "var").mkdir()
    st = open_sql(f"sqlite:///{app / 'var' / 'state.db'}")
    st.create_schema()
    try:
        [one] = add(st, OutboxMessage(SENDER, ("a@example.org",), raw("one")))
    finally:
        st.close()
    code, out, err = run("list", "--app", str(app), "--json")
    assert code == 0, err
    assert [m["id"] for m in json.loads(out)["messages"]] == [one]
    r = CliRunner(env={"LAMSONFILTER_DATABASE": f"sqlite:///{app / 'var' / 'state.db'}"}).invoke(
        main, ["outbox", "show", str(one), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["recipients"] == ["a@example.org"]


@pytest.mark.postgres
@pytest.mark.parametrize("sql_url", [pytest.param("postgresql", id="postgresql")], indirect=True)
def test_a_retry_waits_for_a_claim_being_written_and_then_refuses(db: tuple[str, SQLAlchemyStorage]) -> None:
    """The check and the change are one transaction: a worker's claim committing meanwhile wins."""
    url, st = db
    [id] = add(st, OutboxMessage(SENDER, ("a@example.org",), raw("raced")))
    libpq = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(libpq, connect_timeout=5) as worker, psycopg.connect(libpq, autocommit=True) as watch:
        worker.execute("UPDATE lamsonfilter_outbox SET claimed_by = 'hostB:1:x', "
                       "claimed_until = now() + interval '300 seconds' WHERE id = %s", (id,))  # not committed
        outcome: list[BaseException | None] = []

        def retry() -> None:
            try:
                st.retry_outbox(id)
                outcome.append(None)
            except BaseException as exc:  # noqa: BLE001 -- looked at below
                outcome.append(exc)

        t = threading.Thread(target=retry)
        t.start()
        for _ in range(500):  # bounded: until the retry waits for the row lock (or 500 looks)
            waiting = watch.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                    "AND datname = current_database()").fetchone()
            if waiting and waiting[0] >= 1:
                break
            time.sleep(0.01)
        else:
            pytest.fail("the retry never waited for the worker's row lock")
        worker.commit()
        t.join(30)
    assert not t.is_alive() and len(outcome) == 1 and isinstance(outcome[0], OutboxBusy), outcome
    [entry] = st.outbox_entries()
    assert entry.claimed_by == "hostB:1:x"
