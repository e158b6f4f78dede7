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
    select,
    text,
)
from sqlalchemy.engine import Engine, make_url

from lamsonfilter.cli import main
from lamsonfilter.decisions import Decision
from lamsonfilter.state import OutboxMessage, SchemaMissingError, StateRecord
from lamsonfilter.store import replay
from lamsonfilter.store.sql import SQLAlchemyStorage
from tests.rig.storage import SQL_BACKENDS

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


@pytest.mark.parametrize("sql_url", SQL_BACKENDS, indirect=True)
def test_a_schema_4_database_keeps_its_confirmations(sql_url: str, tmp_path: Path) -> None:
    """Schema version 4 (3 plus the confirmations table, lamsonfilter.confirm before migrations):
    revision 0001 adopts the rest, 0002 finds the table and keeps its rows, the version row stays 4."""
    from lamsonfilter.store.schema import CONFIRMATIONS_TABLE

    make_schema_2(sql_url)
    engine = _engine(sql_url)
    confirmation = {"token_hash": "ab" * 32, "kind": "subscribe", "sender": "Alice@Example.com",
                    "data": '{"list": "python"}', "message": b"Subject: x\r\n\r\nbody\r\n",
                    "created_at": _at(30), "expires_at": _at(40), "used_at": None}
    try:
        with engine.begin() as conn:
            for name in ("claimed_by", "claimed_until"):
                conn.execute(text(f"ALTER TABLE lamsonfilter_outbox ADD COLUMN {name} "
                                  + ("VARCHAR(255)" if name == "claimed_by" else "TIMESTAMP WITH TIME ZONE")))
            CONFIRMATIONS_TABLE.create(conn)
            conn.execute(insert(CONFIRMATIONS_TABLE).values(**confirmation))
            conn.execute(text("UPDATE lamsonfilter_meta SET value = '4'"))
    finally:
        engine.dispose()
    result = _db("upgrade", "--app", str(_app(tmp_path)), "--database", sql_url)
    assert result.exit_code == 0, result.output
    st = SQLAlchemyStorage(sql_url)
    try:
        st.check_schema()
    finally:
        st.close()
    assert _rows(sql_url, "lamsonfilter_confirmations", "token_hash") == [confirmation]
    assert _rows(sql_url, "lamsonfilter_meta", "name") == [{"name": "schema_version", "value": "4"}]
    assert _rows(sql_url, "lamsonfilter_alembic_version", "version_num") == [{"version_num": "0002"}]
    assert len(_rows(sql_url, "lamsonfilter_outbox", "id")) == len(OUTBOX_ROWS)


# ---------------------------------------------------------------- the revisions make METADATA
@pytest.mark.parametrize("sql_url", SQL_BACKENDS, indirect=True)
def test_the_revisions_make_exactly_the_declared_tables(sql_url: str) -> None:
    """What lamsonfilter's revisions create is what `lamsonfilter.store.schema.METADATA` declares."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from lamsonfilter.store.schema import METADATA

    st = SQLAlchemyStorage(sql_url)
    try:
        st.create_schema()
    finally:
        st.close()
    engine = _engine(sql_url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={
                "compare_type": True,
                "include_name": lambda name, type_, parents: type_ != "table" or name in METADATA.tables,
            })
            assert compare_metadata(ctx, METADATA) == []
    finally:
        engine.dispose()


# ---------------------------------------------------------------- the db commands, an app with models
MODELS = '''
from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "TABLE"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(String(200))
'''
PRIORITY = "    priority: Mapped[int | None] = mapped_column(default=None)\n"


@pytest.mark.parametrize("sql_url", SQL_BACKENDS, indirect=True)
def test_db_commands_on_an_application_with_models(sql_url: str, tmp_path: Path) -> None:
    from lamsonfilter.app import StartupError
    from lamsonfilter.daemon.runtime import Runtime

    table = f"notes_{tmp_path.name[-8:].lower().replace('-', '_')}"  # the PostgreSQL schema is shared
    app = _app(tmp_path)
    models = app / "app" / "models.py"
    models.write_text(MODELS.replace("TABLE", table))
    db = ("--app", str(app), "--database", sql_url)

    r = _db("status", *db)
    assert r.exit_code in (1, 2) and "db init --app" in r.output  # no schema (PostgreSQL), no file (SQLite)
    r = _db("init", *db)  # no migrations yet: the tables from the models
    assert r.exit_code == 0, r.output
    assert f"application tables ready: {table} (made from app/models.py" in r.output
    r = _db("status", *db)
    assert r.exit_code == 0, r.output
    assert "application: no migrations, models: 1 table(s): up to date" in r.output

    r = _db("revision", *db, "-m", "notes")  # the first revision creates every model table
    assert r.exit_code == 0, r.output
    first = app / "migrations" / "0001_notes.py"
    assert f"wrote {first}" in r.output
    assert f"op.create_table('{table}'" in first.read_text()
    r = _db("upgrade", *db)  # the tables are there, unrecorded: say how to adopt them
    assert r.exit_code == 2
    assert f"has application tables ({table}) but no record of the application's migrations" in r.output
    assert f"lamsonfilter db stamp --app {app}" in r.output
    assert _db("stamp", *db, "0007").exit_code == 2
    r = _db("stamp", *db, "0001")
    assert r.exit_code == 0, r.output
    r = _db("upgrade", *db)
    assert r.exit_code == 0 and f"application tables ready: {table} (at revision 0001, the newest)" in r.output, r.output

    models.write_text(models.read_text() + PRIORITY)
    for name in [m for m in sys.modules if m.startswith("lamsonfilter_app_")]:
        del sys.modules[name]  # as a new `lamsonfilter db revision` process would import it afresh
    r = _db("revision", *db, "-m", "note priority")
    assert r.exit_code == 0, r.output
    second = (app / "migrations" / "0002_note_priority.py").read_text()
    assert "add_column(sa.Column('priority', sa.Integer(), nullable=True))" in second
    assert "lamsonfilter_" not in second  # lamsonfilter's tables are not the application's business
    r = _db("status", *db)
    assert r.exit_code == 1
    assert "application: at 0001, newest 0002: the database at" in r.output
    assert f"run `lamsonfilter db upgrade --app {app} --database" in r.output
    r = _db("revision", *db, "-m", "too early")  # a revision is the difference from the newest one
    assert r.exit_code == 2 and "run `lamsonfilter db upgrade --app" in r.output

    with pytest.raises(StartupError, match=f"application revision 0001, older than the application's "
                                           f"migrations \\(0002\\); run `lamsonfilter db upgrade --app {app}"):
        Runtime.from_directory(app, {"DATABASE_URL": sql_url})

    r = _db("upgrade", *db)
    assert r.exit_code == 0 and f"application tables ready: {table} (revision 0001 -> 0002)" in r.output, r.output
    r = _db("revision", *db, "-m", "fill priorities", "--empty")  # a data migration, by hand
    assert r.exit_code == 0, r.output
    third = app / "migrations" / "0003_fill_priorities.py"
    assert "down_revision: str | None = '0002'" in third.read_text()
    third.write_text(third.read_text().replace(
        "def upgrade() -> None:\n    pass",
        f"def upgrade() -> None:\n    op.execute(\"UPDATE {table} SET priority = 1 WHERE priority IS NULL\")"))
    r = _db("upgrade", *db)
    assert r.exit_code == 0 and "(revision 0002 -> 0003)" in r.output, r.output
    assert _db("status", *db).exit_code == 0
    runtime = Runtime.from_directory(app, {"DATABASE_URL": sql_url})
    runtime.app.storage.close()
    engine = _engine(sql_url)
    try:
        with engine.begin() as conn:
            conn.execute(text(f"INSERT INTO {table} (id, text, priority) VALUES (1, 'x', 5)"))
            assert _rows(sql_url, "app_alembic_version", "version_num") == [{"version_num": "0003"}]
            conn.execute(text(f"DROP TABLE {table}"))
    finally:
        engine.dispose()


def test_db_command_errors_are_one_clear_line(tmp_path: Path) -> None:
    app = _app(tmp_path)
    url = f"sqlite:///{tmp_path / 'state.db'}"
    r = _db("revision", "--app", str(app), "--database", url, "-m", "x")
    assert r.exit_code == 2
    assert f"{app} has no app/models.py: there are no models to generate a migration from" in r.output
    r = _db("upgrade", "--app", str(app), "--database", url)
    assert r.exit_code == 2 and f"{tmp_path / 'state.db'} does not exist yet; run `lamsonfilter db init" in r.output
    for bad, said in [("nonsense", "cannot parse the state database URL"),
                      ("mysql://u:pw-secret@db/x", "unsupported state database"),
                      ("postgresql://u:pw-secret@127.0.0.1:1/x", "connection")]:
        r = _db("init", "--app", str(app), "--database", bad)
        assert r.exit_code == 2 and said in r.output and "pw-secret" not in r.output, r.output
        assert r.output.count("\n") == 1  # one line, no traceback
    assert _db("init", "--app", str(app), "--database", url).exit_code == 0
    engine = _engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE lamsonfilter_alembic_version SET version_num = '0099'"))
    finally:
        engine.dispose()
    for command in ("init", "upgrade", "status"):
        r = _db(command, "--app", str(app), "--database", url)
        assert r.exit_code in (1, 2), r.output
        assert "lamsonfilter revision 0099, newer than this lamsonfilter knows" in r.output
        assert "upgrade lamsonfilter" in r.output


def _set_revision(url: str, table: str, rev: str) -> None:
    engine = _engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text(f"UPDATE {table} SET version_num = '{rev}'"))
            if (table, rev) == ("lamsonfilter_alembic_version", "0001"):
                conn.execute(text("DROP TABLE lamsonfilter_confirmations"))  # as revision 0001 left it
    finally:
        engine.dispose()


@pytest.mark.parametrize("rev, said", [
    ("0001", "is at lamsonfilter revision 0001, older than this lamsonfilter needs (0002); "
             "run `lamsonfilter db upgrade --app {app} --database {url}` to upgrade it"),
    ("0099", "is at lamsonfilter revision 0099, newer than this lamsonfilter knows (its newest is 0002); "
             "upgrade lamsonfilter"),
])
def test_deq_refuses_a_database_behind_or_ahead(tmp_path: Path, rev: str, said: str) -> None:
    app = _app(tmp_path)
    url = f"sqlite:///{tmp_path / 'state.db'}"
    assert _db("init", "--app", str(app), "--database", url).exit_code == 0
    _set_revision(url, "lamsonfilter_alembic_version", rev)
    proc = subprocess.run(
        [sys.executable, "-m", "lamsonfilter", "deq", "--app", str(app), "--database", url, "--once",
         "--queue", str(tmp_path / "queue"), "--quarantine", str(tmp_path / "quarantine")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert said.format(app=app, url=url) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_daemon_refuses_an_application_revision_it_does_not_have(tmp_path: Path) -> None:
    from lamsonfilter.app import StartupError
    from lamsonfilter.daemon.runtime import Runtime

    app = tmp_path / "tick"
    assert CliRunner().invoke(main, ["gen", "tick", "--dest", str(app), "--models"]).exit_code == 0
    url = f"sqlite:///{tmp_path / 'state.db'}"
    assert _db("init", "--app", str(app), "--database", url).exit_code == 0
    _set_revision(url, "app_alembic_version", "0042")
    with pytest.raises(StartupError, match=f"application revision 0042, which {app}/migrations does not have "
                                           "\\(its newest: 0001\\); deploy the application's newest migrations"):
        Runtime.from_directory(app, {"DATABASE_URL": url})


# ---------------------------------------------------------------- gen --models
def test_gen_with_models_then_db_init_then_the_dry_run_and_its_tests(tmp_path: Path) -> None:
    app = tmp_path / "tick"
    r = CliRunner().invoke(main, ["gen", "tick", "--dest", str(app), "--models"])
    assert r.exit_code == 0, r.output
    assert "lamsonfilter db init --app" in r.output
    first = (app / "migrations" / "0001_first_tables.py").read_text()
    assert "op.create_table('tick_greeting'" in first and "ix_tick_greeting_sender" in first
    assert (app / "app" / "models.py").is_file()

    r = _db("init", "--app", str(app))
    assert r.exit_code == 0 and "application tables ready: tick_greeting (revision (none) -> 0001)" in r.output, r.output
    assert _rows(f"sqlite:///{app / 'var' / 'state.db'}", "tick_greeting", "id") == []
    r = _db("status", "--app", str(app))
    assert r.exit_code == 0 and "application: at 0001, newest 0001: up to date" in r.output, r.output

    raw = b"From: a@example.com\r\nTo: hello@tick.example.org\r\nSubject: hi\r\n\r\nx\r\n"
    r = CliRunner().invoke(main, ["test", "--app", str(app), "--commit"], input=raw)
    assert r.exit_code == 0 and "state:   START -> GREETED" in r.output, r.output
    [row] = _rows(f"sqlite:///{app / 'var' / 'state.db'}", "tick_greeting", "id")  # the handler's row
    assert row["sender"] == "a@example.com"

    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("PYTEST")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                          cwd=app, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "7 passed" in proc.stdout  # the skeleton's four, its models' two and check_migrations

    plain = tmp_path / "plain"
    assert CliRunner().invoke(main, ["gen", "plain", "--dest", str(plain)]).exit_code == 0
    assert not (plain / "app" / "models.py").exists() and not (plain / "migrations").exists()


def test_a_model_changed_without_a_revision_fails_its_test_and_db_status_and_check_say_so(tmp_path: Path) -> None:
    """The tester makes the tables from the models, so only `check_migrations` (in the generated
    tests) and `db status` notice a model that no migration makes; after `db revision` both pass."""
    from lamsonfilter.testing import check_migrations

    app = tmp_path / "tick"
    assert CliRunner().invoke(main, ["gen", "tick", "--dest", str(app), "--models"]).exit_code == 0
    assert _db("init", "--app", str(app)).exit_code == 0
    models = app / "app" / "models.py"
    models.write_text(models.read_text().replace(
        "    greeted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))\n",
        "    greeted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))\n"
        "    name: Mapped[str | None] = mapped_column(String(200))\n"))
    _forget_models(app)
    with pytest.raises(AssertionError, match=r"\(add_column tick_greeting\.name\): run `lamsonfilter db revision"):
        check_migrations(app)
    r = _db("status", "--app", str(app))
    assert r.exit_code == 1, r.output
    assert ("application: at 0001, newest 0001: app/models.py differs from these tables "
            f"(add_column tick_greeting.name): run `lamsonfilter db revision --app {app} -m") in r.output, r.output
    r = CliRunner().invoke(main, ["check", "--app", str(app)])
    assert r.exit_code == 0 and "APP013 warning: app/models.py differs from the tables its migrations made " \
        "(add_column tick_greeting.name)" in r.output, r.output

    assert _db("revision", "--app", str(app), "-m", "add name").exit_code == 0
    _forget_models(app)
    check_migrations(app)
    assert _db("upgrade", "--app", str(app)).exit_code == 0
    r = _db("status", "--app", str(app))
    assert r.exit_code == 0 and "application: at 0002, newest 0002: up to date" in r.output, r.output
    r = CliRunner().invoke(main, ["check", "--app", str(app)])
    assert "APP013" not in r.output, r.output


def _forget_models(app: Path) -> None:
    """Let the next load import app/models.py afresh (as a new process would)."""
    for name in [m for m in sys.modules if m.startswith("lamsonfilter_app_")]:
        del sys.modules[name]


def test_gen_with_models_refuses_a_lamsonfilter_name_and_leaves_nothing_when_it_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = CliRunner().invoke(main, ["gen", "lamsonfilter", "--dest", str(tmp_path / "a"), "--models"])
    assert r.exit_code == 2 and "names starting with 'lamsonfilter_' are lamsonfilter's own" in r.output
    assert not (tmp_path / "a").exists()

    from lamsonfilter.state import StorageError
    from lamsonfilter.store.appschema import SQLAppSchema

    def broken(*args: Any, **kwargs: Any) -> Path:
        raise StorageError("generating a revision failed: disk full")

    monkeypatch.setattr(SQLAppSchema, "app_revision", broken)
    r = CliRunner().invoke(main, ["gen", "tick", "--dest", str(tmp_path / "b"), "--models"])
    assert r.exit_code == 2 and "making the first migration: generating a revision failed" in r.output
    assert not (tmp_path / "b").exists()  # no half-made application to trip over ("exists and is not empty")


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite:///:memory:"])
def test_db_init_refuses_a_sqlite_database_in_memory(tmp_path: Path, url: str) -> None:
    """``sqlite:///`` (a path forgotten) is SQLite without a file: db init would report the schema
    ready and keep nothing; every command refuses it, naming the setting."""
    app = tmp_path / "tick"
    assert CliRunner().invoke(main, ["gen", "tick", "--dest", str(app)]).exit_code == 0
    r = _db("init", "--app", str(app), "--database", url)
    assert r.exit_code == 2, r.output
    assert f"DATABASE_URL {url!r} is a SQLite database in memory, with no file: nothing would be kept" in r.output
    assert "ready" not in r.output


def test_every_migrations_file_is_package_data() -> None:
    """An installed lamsonfilter has its revisions: setup.cfg's package_data names every file
    of lamsonfilter/migrations (it is no Python package, so only package_data ships it)."""
    import configparser
    import fnmatch

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    globs = [g.strip() for g in cfg["options.package_data"]["lamsonfilter"].split(",")]
    package = ROOT / "lamsonfilter"
    files = [p.relative_to(package).as_posix() for p in (package / "migrations").rglob("*")
             if p.is_file() and "__pycache__" not in p.parts]
    assert {"migrations/env.py", "migrations/script.py.mako", "migrations/versions/v0001_schema_3.py",
            "migrations/versions/v0002_confirmations.py"} <= set(files)
    for f in files:
        assert any(fnmatch.fnmatch(f, g) and f.count("/") == g.count("/") for g in globs), f


def test_a_broken_revision_file_is_named_in_one_line(tmp_path: Path) -> None:
    app = tmp_path / "tick"
    assert CliRunner().invoke(main, ["gen", "tick", "--dest", str(app), "--models"]).exit_code == 0
    (app / "migrations" / "0002_broken.py").write_text(
        'revision = "0002"\ndown_revision = "0001"\nbranch_labels = None\ndepends_on = None\n'
        "import no_such_module_here\n")
    for command in ("init", "upgrade", "status"):
        r = _db(command, "--app", str(app), "--database", f"sqlite:///{tmp_path / 'state.db'}")
        assert r.exit_code == (1 if command == "status" else 2), r.output
        assert f"the application migrations in {app / 'migrations'} cannot be read (0002_broken.py, line 5): " \
               "ModuleNotFoundError: No module named 'no_such_module_here'" in r.output, r.output
        assert "Traceback" not in r.output


def test_check_reports_an_application_behind_with_the_command_to_run(tmp_path: Path) -> None:
    app = tmp_path / "tick"
    assert CliRunner().invoke(main, ["gen", "tick", "--dest", str(app), "--models"]).exit_code == 0
    url = f"sqlite:///{tmp_path / 'state.db'}"
    assert _db("init", "--app", str(app), "--database", url).exit_code == 0
    _set_revision(url, "app_alembic_version", "0001")  # and a second revision arrives with a deployment
    shutil.copy(app / "migrations" / "0001_first_tables.py", app / "migrations" / "0002_nothing.py")
    second = app / "migrations" / "0002_nothing.py"
    second.write_text(second.read_text().replace("revision: str = '0001'", "revision: str = '0002'")
                      .replace("down_revision: str | None = None", "down_revision: str | None = '0001'")
                      .split("def upgrade")[0] + "def upgrade() -> None:\n    pass\n")
    r = CliRunner().invoke(main, ["check", "--app", str(app), "--database", url])
    assert r.exit_code == 1
    assert "APP010 error: the database at" in r.output and "is at application revision 0001, older" in r.output
    assert f"fix: run: lamsonfilter db upgrade --app {app} --database {url}" in r.output


@pytest.mark.parametrize(("table", "revision", "fix"), [
    ("app_alembic_version", "0099", "deploy the application's newest migrations to {app}/migrations"),
    ("lamsonfilter_alembic_version", "9999", "upgrade lamsonfilter on this host"),
])
def test_check_reports_a_database_ahead_without_suggesting_db_init(tmp_path: Path, table: str, revision: str,
                                                                    fix: str) -> None:
    """db init cannot help a database newer than this host's code: the fix says what does."""
    app = tmp_path / "tick"
    assert CliRunner().invoke(main, ["gen", "tick", "--dest", str(app), "--models"]).exit_code == 0
    url = f"sqlite:///{tmp_path / 'state.db'}"
    assert _db("init", "--app", str(app), "--database", url).exit_code == 0
    _set_revision(url, table, revision)  # another host, with newer code, upgraded the database
    r = CliRunner().invoke(main, ["check", "--app", str(app), "--database", url])
    assert r.exit_code == 1 and "APP010 error: the database at" in r.output
    assert f"fix: {fix.format(app=app)}" in r.output and "db init" not in r.output, r.output


@pytest.mark.parametrize("sql_url", SQL_BACKENDS, indirect=True)
def test_two_hosts_upgrading_the_application_at_once_both_succeed(sql_url: str, tmp_path: Path) -> None:
    """``db upgrade`` on several hosts at once: one runs the revisions, the others find them done."""
    import threading

    from lamsonfilter.models import load_models

    app = tmp_path / "race"
    assert CliRunner().invoke(main, ["gen", "race", "--dest", str(app), "--models"]).exit_code == 0
    metadata = load_models(app)
    storages = [SQLAlchemyStorage(sql_url, lock_timeout=60) for _ in range(4)]
    start = threading.Barrier(len(storages))
    errors: list[BaseException] = []

    def upgrade(st: SQLAlchemyStorage) -> None:
        try:
            start.wait(10)
            st.create_schema()
            st.upgrade_app(app, metadata)
        except BaseException as exc:  # noqa: BLE001 -- reported below
            errors.append(exc)

    threads = [threading.Thread(target=upgrade, args=(st,)) for st in storages]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        for st in storages:
            st.check_app_schema(app, metadata)
        assert _rows(sql_url, "app_alembic_version", "version_num") == [{"version_num": "0001"}]
    finally:
        for st in storages:
            st.close()
        engine = _engine(sql_url)
        try:
            with engine.begin() as conn:
                conn.execute(text("DROP TABLE IF EXISTS race_greeting"))
        finally:
            engine.dispose()


# ---------------------------------------------------------------- the examples' migrations
@pytest.mark.parametrize("sql_url", SQL_BACKENDS, indirect=True)
@pytest.mark.parametrize("example", ["helpdesk"])
def test_an_examples_migrations_make_exactly_its_models(sql_url: str, example: str) -> None:
    """After its migrations, autogenerate finds nothing to do: a changed model needs
    `lamsonfilter db revision --app examples/EXAMPLE -m ...` (this test says so when it fails)."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from lamsonfilter.models import load_models

    app = ROOT / "examples" / example
    metadata = load_models(app)
    assert metadata is not None and (app / "migrations").is_dir()
    st = SQLAlchemyStorage(sql_url)
    engine = _engine(sql_url)
    try:
        st.create_schema()
        st.upgrade_app(app, metadata)
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={
                "compare_type": True,
                "include_name": lambda name, type_, parents: type_ != "table" or name in metadata.tables,
            })
            diff = compare_metadata(ctx, metadata)
        assert diff == [], (f"examples/{example}/app/models.py differs from its migrations: run "
                            f"`lamsonfilter db revision --app examples/{example} -m ...`: {diff}")
    finally:
        st.close()
        with engine.begin() as conn:
            for table in reversed(metadata.sorted_tables):
                conn.execute(text(f"DROP TABLE IF EXISTS {table.name}"))
        engine.dispose()
