"""Migrations with Alembic (issue 18): adopting a schema-2 database, the ``db`` commands, the daemons' refusal.

The schema-2 database is made here from the table definitions lamsonfilter
had before Alembic (schema version 2: the outbox without the claim
columns), filled with state rows, replay records, outbox rows (sent,
pending, deferred, failed) and idempotency tokens, upgraded by ``lamsonfilter
db upgrade``, and read back row by row, on SQLite and on PostgreSQL (the
session's own schema, emptied first: `tests.rig.storage.pg_url`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import (
    Column,
    DateTime,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Engine, make_url

from lamsonfilter.cli import main
from lamsonfilter.decisions import Decision
from lamsonfilter.state import OutboxMessage, SchemaMissingError, StateRecord
from lamsonfilter.store import replay
from lamsonfilter.store.sql import SQLAlchemyStorage
from tests.rig.storage import SQL_BACKENDS, backend_url

ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return create_engine(parsed)


def _at(seconds: int) -> datetime:
    return T0.replace(second=seconds % 60, minute=seconds // 60)


# ---------------------------------------------------------------- a schema-2 database
V2 = MetaData()
Table("lamsonfilter_state", V2,
      Column("key", String(512), primary_key=True),
      Column("state", String(64), nullable=False),
      Column("data", Text, nullable=False),
      Column("version", Integer, nullable=False),
      Column("updated_at", DateTime(timezone=True), nullable=False))
Table("lamsonfilter_outbox", V2,
      Column("id", Integer, primary_key=True, autoincrement=True),
      Column("created_at", DateTime(timezone=True), nullable=False),
      Column("sender", Text, nullable=False),
      Column("recipients", Text, nullable=False),
      Column("raw", LargeBinary, nullable=False),
      Column("kind", String(32), nullable=False),
      Column("attempts", Integer, nullable=False, default=0),
      Column("sent_at", DateTime(timezone=True), nullable=True, index=True),
      Column("next_attempt_at", DateTime(timezone=True), nullable=True),
      Column("failed_at", DateTime(timezone=True), nullable=True),
      Column("last_error", Text, nullable=True))
Table("lamsonfilter_tokens", V2,
      Column("token", String(512), primary_key=True),
      Column("created_at", DateTime(timezone=True), nullable=False))
Table("lamsonfilter_meta", V2,
      Column("name", String(64), primary_key=True),
      Column("value", String(255), nullable=False))

DECISION = Decision.deliver_all(["alice@example.org"])
REPLAY_KEY = replay.record_key("queue-id-17:message-id@example.org")
assert REPLAY_KEY is not None

STATE_ROWS = [
    {"key": "mailinglist:python@lists.example.org:alice@example.com", "state": "CONFIRMING",
     "data": json.dumps({"token": "3f9a", "name": "Ålice"}), "version": 3, "updated_at": _at(1)},
    {"key": "mailinglist:python@lists.example.org:bob@example.com", "state": "SUBSCRIBED",
     "data": "{}", "version": 1, "updated_at": _at(2)},
    {"key": REPLAY_KEY, "state": "DONE",
     "data": json.dumps({**DECISION.to_record(), "at": 1767225600.0}), "version": 1, "updated_at": _at(3)},
]
OUTBOX_ROWS = [  # sent, pending, deferred, failed
    {"id": 1, "created_at": _at(10), "sender": "", "recipients": '["a@example.org"]',
     "raw": b"Subject: 1\r\n\r\nbody \xff\x00\r\n", "kind": "reply", "attempts": 0, "sent_at": _at(11),
     "next_attempt_at": None, "failed_at": None, "last_error": None},
    {"id": 2, "created_at": _at(12), "sender": "list-bounces@example.org",
     "recipients": '["b@example.org", "c@example.net"]', "raw": b"Subject: 2\r\n\r\nbody\r\n",
     "kind": "message", "attempts": 0, "sent_at": None, "next_attempt_at": None, "failed_at": None,
     "last_error": None},
    {"id": 3, "created_at": _at(13), "sender": "", "recipients": '["d@example.org"]',
     "raw": b"Subject: 3\r\n\r\nbody\r\n", "kind": "reply", "attempts": 2, "sent_at": None,
     "next_attempt_at": _at(50), "failed_at": None, "last_error": "451 4.3.0 try later"},
    {"id": 4, "created_at": _at(14), "sender": "", "recipients": '["e@example.org"]',
     "raw": b"Subject: 4\r\n\r\nbody\r\n", "kind": "reply", "attempts": 1, "sent_at": None,
     "next_attempt_at": None, "failed_at": _at(15), "last_error": "550 5.1.1 no such user"},
]
OUTBOX_MESSAGE = OutboxMessage(sender="", recipients=("new@example.org",), raw=b"Subject: new\r\n\r\nx\r\n",
                               kind="reply")
TOKEN_ROWS = [{"token": "claim:one", "created_at": _at(20)}, {"token": "claim:two", "created_at": _at(21)}]


def make_schema_2(url: str) -> None:
    """A database as lamsonfilter schema version 2 left it, with rows in every table."""
    engine = _engine(url)
    try:
        with engine.begin() as conn:
            V2.create_all(conn)
            conn.execute(insert(V2.tables["lamsonfilter_meta"]), [{"name": "schema_version", "value": "2"}])
            conn.execute(insert(V2.tables["lamsonfilter_state"]), STATE_ROWS)
            conn.execute(insert(V2.tables["lamsonfilter_outbox"]), OUTBOX_ROWS)
            conn.execute(insert(V2.tables["lamsonfilter_tokens"]), TOKEN_ROWS)
            if conn.dialect.name == "postgresql":  # as SERIAL would be after four inserts
                conn.execute(text("SELECT setval(pg_get_serial_sequence('lamsonfilter_outbox', 'id'), 4)"))
    finally:
        engine.dispose()


def _rows(url: str, table: str, order: str) -> list[dict[str, Any]]:
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            t = Table(table, MetaData(), autoload_with=conn)
            rows = [dict(r._mapping) for r in conn.execute(select(t).order_by(t.c[order]))]
    finally:
        engine.dispose()
    for row in rows:  # SQLite gives naive datetimes back (written in UTC)
        for k, v in row.items():
            if isinstance(v, datetime) and v.tzinfo is None:
                row[k] = v.replace(tzinfo=timezone.utc)
            elif isinstance(v, memoryview):
                row[k] = bytes(v)
    return rows


def _app(tmp_path: Path) -> Path:
    app = tmp_path / "app"
    shutil.copytree(ROOT / "examples" / "mailinglist", app, ignore=shutil.ignore_patterns("var", "__pycache__"))
    return app


def _db(*args: str) -> Any:
    return CliRunner().invoke(main, ["db", *args])


@pytest.mark.parametrize("sql_url", SQL_BACKENDS, indirect=True)
def test_a_schema_2_database_upgrades_keeping_every_row(sql_url: str, tmp_path: Path) -> None:
    make_schema_2(sql_url)
    app = _app(tmp_path)
    st = SQLAlchemyStorage(sql_url)
    try:
        with pytest.raises(SchemaMissingError, match="schema version 2 .*older than this lamsonfilter needs"
                                                     ".*lamsonfilter db upgrade --app DIR"):
            st.check_schema()
        status = _db("status", "--app", str(app), "--database", sql_url)
        assert status.exit_code == 1 and "schema version 2" in status.output

        result = _db("upgrade", "--app", str(app), "--database", sql_url)
        assert result.exit_code == 0, result.output
        st.check_schema()

        assert _rows(sql_url, "lamsonfilter_state", "key") == sorted(STATE_ROWS, key=lambda r: r["key"])
        after = _rows(sql_url, "lamsonfilter_outbox", "id")
        assert [{k: v for k, v in r.items() if k in OUTBOX_ROWS[0]} for r in after] == OUTBOX_ROWS
        assert [(r["claimed_by"], r["claimed_until"]) for r in after] == [(None, None)] * 4
        assert _rows(sql_url, "lamsonfilter_tokens", "token") == TOKEN_ROWS
        assert _rows(sql_url, "lamsonfilter_meta", "name") == [{"name": "schema_version", "value": "3"}]
        assert _rows(sql_url, "lamsonfilter_alembic_version", "version_num") == [{"version_num": "0002"}]
        assert _rows(sql_url, "lamsonfilter_confirmations", "token_hash") == []

        # and the code reads them as it did: state, the replay record, the outbox's queues
        with st.transaction() as tx:
            assert tx.get(STATE_ROWS[0]["key"]) == StateRecord("CONFIRMING", {"token": "3f9a", "name": "Ålice"})
            with pytest.raises(replay.Replayed) as info:
                replay.check(tx, REPLAY_KEY)
            assert info.value.decision == DECISION
            assert tx.claim("claim:one") is False and tx.claim("claim:three") is True
        assert [p.id for p in st.pending_outbox()] == [2, 3]
        assert [p.id for p in st.pending_outbox(due_before=T0.timestamp() + 20)] == [2]
        [failed] = st.failed_outbox()
        assert failed.id == 4 and failed.last_error == "550 5.1.1 no such user"
        assert [p.id for p in st.claim_outbox("worker-1", 60)] == [2, 3]  # the claim columns work
        with st.transaction() as tx:
            tx.add_outbox([OUTBOX_MESSAGE])
        assert [p.id for p in st.pending_outbox()][-1] == 5  # the id sequence goes on

        again = _db("upgrade", "--app", str(app), "--database", sql_url)  # idempotent
        assert again.exit_code == 0, again.output
        assert _rows(sql_url, "lamsonfilter_state", "key") == sorted(STATE_ROWS, key=lambda r: r["key"])
        assert [r["token"] for r in _rows(sql_url, "lamsonfilter_tokens", "token")] == [
            "claim:one", "claim:three", "claim:two"]
    finally:
        st.close()
