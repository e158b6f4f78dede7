"""State in a SQL database: `SQLAlchemyStorage`, the production `StateStorage`.

The state machines' records, the outbox and the idempotency tokens live in
four tables (all prefixed ``lamsonfilter_``): ``state`` (one row per key:
state name, JSON data, a version counter), ``outbox`` (messages committed:
pending, sent -- purged after a while -- or failed and kept), ``tokens``
(what `claim` has recorded) and ``meta`` (the schema version).  A single-host deployment uses a SQLite
file; several filter hosts that must share state use PostgreSQL:

    storage = SQLAlchemyStorage("sqlite:////var/lib/lamsonfilter/state.db")
    storage.create_schema()            # what `lamsonfilter db init` runs
    with storage.transaction() as tx:
        rec = tx.get("mailinglist:python@lists.example.org:alice@example.com")
        tx.set("mailinglist:python@lists.example.org:alice@example.com",
               "CONFIRMING", {"token": "3f9a"})
    # committed here; an exception inside the block rolls everything back

``postgresql://user@db.example.org/mail`` works as well (it is mapped to
the psycopg 3 driver, ``postgresql+psycopg://``).

How transactions never lose an update
-------------------------------------

Every `transaction` has its own connection from one shared engine, so the
storage can be used from many threads at once (pymilter runs one thread
per SMTP connection).  Two transactions touching the same key serialise:

* **SQLite** locks the whole database for writing.  Each transaction starts
  with ``BEGIN IMMEDIATE`` (SQLAlchemy takes over transaction control from
  the sqlite3 module, as its documentation describes), so a second writer
  waits up to `lock_timeout` seconds (the SQLite busy timeout) before it
  even reads.  File databases use WAL journaling, so readers of the outbox
  do not block writers.
* **PostgreSQL** locks per key: `get`, `set` and `clear` take a
  transaction-scoped advisory lock on a 64-bit hash of the key before they
  touch the row, so even a key that does not exist yet serialises.  Other
  keys are not blocked.  Waiting is limited by PostgreSQL's
  ``lock_timeout`` (set to `lock_timeout` on every connection).

A read-modify-write is therefore safe as long as it calls `get` first
inside the transaction.

How errors surface
------------------

Nothing from SQLAlchemy or the database driver escapes; every failure is
one of the `lamsonfilter.state` errors, with the driver's exception chained
as ``__cause__`` and the database URL (password hidden) in the text:

* `StorageError` -- the database is down or unreachable, locked for longer
  than `lock_timeout`, the URL is malformed or its driver is not installed.
  `App.process` defers the message (451 4.3.0).
* `ConflictError` -- a serialisation failure, a deadlock or a unique-key
  race with a concurrent transaction; run the message again.
* `SchemaMissingError` -- the tables are missing or belong to another
  schema version; the text names the command to run
  (``lamsonfilter db init --app DIR``).

Programming errors stay what they are: data that is not JSON-serialisable
raises `TypeError`, an over-long key `ValueError`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import datetime, timezone
from typing import Any, Iterator, Mapping, Sequence

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
    delete,
    event,
    func,
    inspect,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.pool import QueuePool, StaticPool

from .decisions import OutboxMessage
from .state import (
    ConflictError,
    PendingOutbox,
    SchemaMissingError,
    StateRecord,
    StorageError,
)

__all__ = ["SQLAlchemyStorage", "SQLAlchemyTransaction", "SCHEMA_VERSION", "METADATA"]

log = logging.getLogger(__name__)

#: The schema version this code creates and expects in ``lamsonfilter_meta``.
#: 2: the outbox's ``next_attempt_at``, ``failed_at`` and ``last_error``
#: (`create_schema` adds them to a version 1 database).
SCHEMA_VERSION = 2

#: Longest key, state name and claim token accepted (the column sizes).
MAX_KEY_LENGTH = 512
MAX_STATE_LENGTH = 64
MAX_TOKEN_LENGTH = 512

INIT_HINT = "run `lamsonfilter db init --app DIR`"
"""The command that fixes a missing schema; the messages add ``--database URL`` (`_init_hint`),
so that following the hint initialises this database and not the application's default."""

METADATA = MetaData()

STATE_TABLE = Table(
    "lamsonfilter_state",
    METADATA,
    Column("key", String(MAX_KEY_LENGTH), primary_key=True),
    Column("state", String(MAX_STATE_LENGTH), nullable=False),
    Column("data", Text, nullable=False),  # JSON object as text
    Column("version", Integer, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

OUTBOX_TABLE = Table(
    "lamsonfilter_outbox",
    METADATA,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("sender", Text, nullable=False),
    Column("recipients", Text, nullable=False),  # JSON list as text: the recipients still to do
    Column("raw", LargeBinary, nullable=False),
    Column("kind", String(32), nullable=False),  # "reply" or "message"
    Column("attempts", Integer, nullable=False, default=0),
    Column("sent_at", DateTime(timezone=True), nullable=True, index=True),
    # schema version 2 (added by `create_schema` to older databases; all nullable)
    Column("next_attempt_at", DateTime(timezone=True), nullable=True),
    Column("failed_at", DateTime(timezone=True), nullable=True),
    Column("last_error", Text, nullable=True),
)

#: Columns added after version 1, in the order `create_schema` adds them.
_ADDED_COLUMNS = {OUTBOX_TABLE.name: ("next_attempt_at", "failed_at", "last_error")}

TOKENS_TABLE = Table(
    "lamsonfilter_tokens",
    METADATA,
    Column("token", String(MAX_TOKEN_LENGTH), primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

META_TABLE = Table(
    "lamsonfilter_meta",
    METADATA,
    Column("name", String(64), primary_key=True),
    Column("value", String(255), nullable=False),
)

_VERSION_NAME = "schema_version"

# SQLSTATEs that mean "a concurrent transaction got in the way; run again".
_PG_CONFLICT = {"40001", "40P01", "23505"}  # serialization, deadlock, unique
_PG_UNDEFINED_TABLE = "42P01"
_SQLITE_CONFLICT = {"SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY"}

# The execution option that chooses SQLite's BEGIN mode for one connection.
_BEGIN_OPTION = "lamsonfilter_sqlite_begin"
_BEGIN_MODES = {"IMMEDIATE", "DEFERRED"}

_MARK_SENT_CHUNK = 500


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _from_unix(t: float) -> datetime:
    return datetime.fromtimestamp(t, timezone.utc)


def _to_unix(value: datetime | None) -> float | None:
    """SQLite gives back naive datetimes: they were written in UTC."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()


def _lock_id(name: str) -> int:
    """The signed 64-bit PostgreSQL advisory lock id for a key (stable everywhere)."""
    digest = hashlib.blake2b(
        name.encode("utf-8", "surrogatepass"), digest_size=8, person=b"lamsonfilter"
    ).digest()
    return int.from_bytes(digest, "big", signed=True)


def _check_text(what: str, value: str, limit: int) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    if len(value) > limit:
        raise ValueError(f"{what} is longer than {limit} characters: {value[:60]!r}...")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not valid Unicode: {value!r}") from exc


def _redact_raw(url: str) -> str:
    """Hide the password in a URL string SQLAlchemy could not parse."""
    return re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", url)


def _display(url: URL) -> str:
    """The URL as shown in messages: password replaced, ``password=`` query dropped."""
    if "password" in url.query:
        url = url.difference_update_query(["password"])
    return url.render_as_string(hide_password=True)


class SQLAlchemyStorage:
    """`StateStorage` on SQLite or PostgreSQL through SQLAlchemy 2.

    `url` is a SQLAlchemy database URL; ``postgresql://`` and
    ``postgres://`` mean the psycopg 3 driver.  `lock_timeout` (seconds)
    bounds how long a transaction waits for another one holding the same
    key (PostgreSQL) or the database (SQLite) before `StorageError`.
    Nothing connects until the first use.
    """

    def __init__(self, url: str, *, echo: bool = False, lock_timeout: float = 30.0) -> None:
        try:
            parsed = make_url(url)
        except (ArgumentError, ValueError, TypeError) as exc:
            raise StorageError(
                f"cannot parse the state database URL {_redact_raw(str(url))!r}: {exc}"
            ) from exc
        self.url: str = _display(parsed)
        """The database URL with the password hidden, for messages and logs."""
        if parsed.drivername in ("postgresql", "postgres"):
            parsed = parsed.set(drivername="postgresql+psycopg")
        backend = parsed.get_backend_name()
        if backend not in ("sqlite", "postgresql"):
            raise StorageError(
                f"unsupported state database {self.url!r}: lamsonfilter needs "
                "SQLite (sqlite:///path/state.db) or PostgreSQL (postgresql://...)"
            )
        self.backend: str = backend
        self.lock_timeout = float(lock_timeout)
        self._memory = backend == "sqlite" and (
            parsed.database in (None, "", ":memory:") or parsed.query.get("mode") == "memory"
        )
        # An in-memory SQLite database lives in one connection, which every
        # thread shares; transactions on it take turns on this lock.
        self._serial: AbstractContextManager[Any] = (
            threading.RLock() if self._memory else nullcontext()
        )
        try:
            self._engine = self._create_engine(parsed, echo)
        except (NoSuchModuleError, ImportError) as exc:
            raise StorageError(
                f"no database driver for the state database {self.url!r}: {exc}"
            ) from exc
        except (ArgumentError, SQLAlchemyError, TypeError, ValueError) as exc:
            raise StorageError(f"cannot use the state database {self.url!r}: {exc}") from exc
        if self._engine.dialect.is_async:
            self._engine.dispose()
            raise StorageError(
                f"the state database URL {self.url!r} names an asyncio driver; "
                "use a synchronous one such as postgresql+psycopg://"
            )
        dbapi_error = getattr(self._engine.dialect.loaded_dbapi, "Error", None)
        self._dbapi_errors: tuple[type[BaseException], ...] = (SQLAlchemyError,)
        if isinstance(dbapi_error, type) and issubclass(dbapi_error, BaseException):
            self._dbapi_errors += (dbapi_error,)

    # ------------------------------------------------------------ engine
    def _create_engine(self, url: URL, echo: bool) -> Engine:
        # At least 1 ms: 0 would mean "wait forever" to PostgreSQL.
        timeout_ms = max(1, round(self.lock_timeout * 1000))
        if self.backend == "sqlite":
            memory = self._memory
            if memory:
                engine = create_engine(
                    url,
                    echo=echo,
                    poolclass=StaticPool,
                    connect_args={"check_same_thread": False},
                )
            else:
                engine = create_engine(
                    url,
                    echo=echo,
                    poolclass=QueuePool,
                    pool_size=5,
                    max_overflow=-1,  # SQLite serialises writers itself
                    connect_args={"check_same_thread": False},
                )

            def sqlite_connect(dbapi_connection: Any, connection_record: Any) -> None:
                # Take BEGIN away from the sqlite3 module (SQLAlchemy's recipe):
                # sqlite_begin() below emits it, IMMEDIATE by default.
                dbapi_connection.isolation_level = None
                cursor = dbapi_connection.cursor()
                try:
                    cursor.execute(f"PRAGMA busy_timeout = {timeout_ms}")
                    if not memory:
                        cursor.execute("PRAGMA journal_mode = WAL")
                finally:
                    cursor.close()

            def sqlite_begin(conn: Connection) -> None:
                mode = conn.get_execution_options().get(_BEGIN_OPTION, "IMMEDIATE")
                if mode not in _BEGIN_MODES:
                    raise ValueError(f"unknown SQLite BEGIN mode {mode!r}")
                conn.exec_driver_sql(f"BEGIN {mode}")

            event.listen(engine, "connect", sqlite_connect, insert=True)
            event.listen(engine, "begin", sqlite_begin)
            return engine

        connect_args: dict[str, Any] = {}
        if "connect_timeout" not in url.query:
            connect_args["connect_timeout"] = 10
        # READ COMMITTED whatever the server's default: each statement after
        # the advisory lock must see what the previous holder committed.
        engine = create_engine(
            url,
            echo=echo,
            isolation_level="READ COMMITTED",
            pool_pre_ping=True,
            connect_args=connect_args,
        )

        def pg_connect(dbapi_connection: Any, connection_record: Any) -> None:
            # The documented recipe for session settings on each new connection.
            autocommit = dbapi_connection.autocommit
            dbapi_connection.autocommit = True
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute(f"SET lock_timeout = {timeout_ms}")
            finally:
                cursor.close()
            dbapi_connection.autocommit = autocommit

        event.listen(engine, "connect", pg_connect, insert=True)
        return engine

    # ------------------------------------------------------------ errors
    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Turn SQLAlchemy and driver exceptions into `StorageError` and friends."""
        try:
            yield
        except self._dbapi_errors as exc:
            raise self._translate(exc, action) from exc

    def _translate(self, exc: BaseException, action: str) -> StorageError:
        orig: BaseException | None = exc.orig if isinstance(exc, DBAPIError) else exc
        if orig is None:
            orig = exc
        sqlstate = getattr(orig, "sqlstate", None)
        errname = getattr(orig, "sqlite_errorname", None)
        detail = " ".join(str(orig).split()) or type(orig).__name__
        if sqlstate in _PG_CONFLICT or errname in _SQLITE_CONFLICT:
            return ConflictError(
                f"{action}: a concurrent transaction got in the way on {self.url}: {detail}"
            )
        if sqlstate == _PG_UNDEFINED_TABLE or (
            self.backend == "sqlite" and "no such table" in detail
        ):
            return SchemaMissingError(self._missing_message())
        return StorageError(f"{action} failed on the state database {self.url}: {detail}")

    def _missing_message(self) -> str:
        return f"the database at {self.url} has no lamsonfilter schema; {self._init_hint()}"

    def _init_hint(self) -> str:
        return INIT_HINT.replace("--app DIR", f"--app DIR --database {self.url}")

    # ------------------------------------------------------------ connections
    @contextmanager
    def _begin(
        self, action: str, *, commit: bool = True, read_only: bool = False
    ) -> Iterator[Connection]:
        """A connection inside a transaction: committed (or rolled back) at the end."""
        with self._serial:
            with self._errors(action):
                conn = self._engine.connect()
            try:
                if read_only and self.backend == "sqlite":
                    conn.execution_options(**{_BEGIN_OPTION: "DEFERRED"})
                with self._errors(action):
                    conn.begin()
                try:
                    yield conn
                except BaseException:
                    self._rollback_quietly(conn)
                    raise
                with self._errors(action):
                    if commit:
                        conn.commit()
                    else:
                        conn.rollback()
            finally:
                try:
                    conn.close()
                except Exception:  # the pool invalidates a broken connection
                    log.debug("closing a connection to %s failed", self.url, exc_info=True)

    def _rollback_quietly(self, conn: Connection) -> None:
        try:
            conn.rollback()
        except Exception:  # the original exception matters more
            log.warning("rollback on %s failed", self.url, exc_info=True)

    # ------------------------------------------------------------ protocol
    @contextmanager
    def transaction(self, commit: bool = True) -> Iterator["SQLAlchemyTransaction"]:
        """A `SQLAlchemyTransaction`; commits on normal exit (rolls back if not `commit`).

        An exception inside the block rolls back and propagates unchanged.
        """
        with self._begin("the state transaction", commit=commit) as conn:
            tx = SQLAlchemyTransaction(self, conn)
            try:
                yield tx
            finally:
                tx._active = False

    def check_schema(self) -> None:
        """Raise `SchemaMissingError` unless the tables exist in this code's version."""
        with self._begin("checking the schema", read_only=True) as conn:
            with self._errors("checking the schema"):
                inspector = inspect(conn)
                missing = [t.name for t in METADATA.sorted_tables if not inspector.has_table(t.name)]
                if len(missing) == len(METADATA.tables):
                    raise SchemaMissingError(self._missing_message())
                if missing:
                    raise SchemaMissingError(
                        f"the database at {self.url} has an incomplete lamsonfilter schema "
                        f"(missing {', '.join(missing)}); {self._init_hint()}"
                    )
                version = self._read_version(conn)
            self._check_version(version, upgrading=False)

    def create_schema(self) -> None:
        """Create the tables if missing and record the schema version; idempotent."""
        with self._begin("creating the schema") as conn:
            with self._errors("creating the schema"):
                if self.backend == "postgresql":  # two `db init` at once
                    conn.execute(
                        text("SELECT pg_advisory_xact_lock(CAST(:id AS BIGINT))"),
                        {"id": _lock_id("lamsonfilter schema")},
                    )
                version = (
                    self._read_version(conn) if inspect(conn).has_table(META_TABLE.name) else None
                )
            self._check_version(version, upgrading=True)
            with self._errors("creating the schema"):
                METADATA.create_all(conn, checkfirst=True)
                self._add_columns(conn)
                if version is None:
                    conn.execute(
                        insert(META_TABLE).values(name=_VERSION_NAME, value=str(SCHEMA_VERSION))
                    )
                elif version != SCHEMA_VERSION:
                    conn.execute(
                        update(META_TABLE)
                        .where(META_TABLE.c.name == _VERSION_NAME)
                        .values(value=str(SCHEMA_VERSION))
                    )

    def _add_columns(self, conn: Connection) -> None:
        """Upgrade: add the columns a table created by an older version lacks.

        Every added column is nullable, so ``ALTER TABLE ... ADD COLUMN``
        works on SQLite and PostgreSQL alike and keeps the rows.
        """
        inspector = inspect(conn)
        for table_name, names in _ADDED_COLUMNS.items():
            have = {c["name"] for c in inspector.get_columns(table_name)}
            table = METADATA.tables[table_name]
            for name in names:
                if name in have:
                    continue
                column = table.c[name]
                ddl = column.type.compile(dialect=conn.dialect)
                preparer = conn.dialect.identifier_preparer
                conn.execute(text(
                    f"ALTER TABLE {preparer.quote(table_name)} ADD COLUMN {preparer.quote(name)} {ddl}"
                ))
                log.info("schema upgrade: added %s.%s", table_name, name)

    def _read_version(self, conn: Connection) -> int | None:
        value = conn.execute(
            select(META_TABLE.c.value).where(META_TABLE.c.name == _VERSION_NAME)
        ).scalar_one_or_none()
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            raise SchemaMissingError(
                f"the database at {self.url} has a lamsonfilter schema with an unreadable "
                f"version {value!r}; {self._init_hint()}"
            ) from None

    def _check_version(self, version: int | None, *, upgrading: bool) -> None:
        if version is None:
            if upgrading:
                return
            raise SchemaMissingError(
                f"the database at {self.url} has lamsonfilter tables but no schema version; "
                f"{self._init_hint()}"
            )
        if version > SCHEMA_VERSION:
            raise SchemaMissingError(
                f"the database at {self.url} has lamsonfilter schema version {version}, "
                f"newer than this lamsonfilter knows ({SCHEMA_VERSION}); upgrade lamsonfilter"
            )
        if version < SCHEMA_VERSION and not upgrading:
            raise SchemaMissingError(
                f"the database at {self.url} has lamsonfilter schema version {version}, "
                f"older than this lamsonfilter needs ({SCHEMA_VERSION}); "
                f"{self._init_hint()} to upgrade it"
            )

    def pending_outbox(self, limit: int = 100, due_before: float | None = None) -> list[PendingOutbox]:
        """Committed outbox messages neither sent nor failed, oldest first; with
        `due_before` (a Unix time) only those whose next attempt is due by then."""
        if limit <= 0:
            return []
        o = OUTBOX_TABLE.c
        stmt = select(
            o.id, o.sender, o.recipients, o.raw, o.kind, o.attempts, o.created_at,
            o.next_attempt_at, o.last_error,
        ).where(o.sent_at.is_(None), o.failed_at.is_(None))
        if due_before is not None:
            stmt = stmt.where(
                (o.next_attempt_at.is_(None)) | (o.next_attempt_at <= _from_unix(due_before))
            )
        with self._begin("reading the outbox", read_only=True) as conn:
            with self._errors("reading the outbox"):
                rows = conn.execute(stmt.order_by(o.id).limit(limit)).all()
        return [self._outbox_item(row) for row in rows]

    def failed_outbox(self, limit: int = 100) -> list[PendingOutbox]:
        """Outbox messages given up on, oldest first (for the operator)."""
        if limit <= 0:
            return []
        o = OUTBOX_TABLE.c
        stmt = select(
            o.id, o.sender, o.recipients, o.raw, o.kind, o.attempts, o.created_at,
            o.next_attempt_at, o.last_error,
        ).where(o.failed_at.is_not(None))
        with self._begin("reading the outbox", read_only=True) as conn:
            with self._errors("reading the outbox"):
                rows = conn.execute(stmt.order_by(o.id).limit(limit)).all()
        return [self._outbox_item(row) for row in rows]

    @staticmethod
    def _outbox_item(row: Any) -> PendingOutbox:
        return PendingOutbox(
            id=row.id,
            message=OutboxMessage(
                sender=row.sender,
                recipients=tuple(json.loads(row.recipients)),
                raw=bytes(row.raw),
                kind=row.kind,
            ),
            attempts=row.attempts,
            created_at=_to_unix(row.created_at) or 0.0,
            next_attempt=_to_unix(row.next_attempt_at),
            last_error=row.last_error or "",
        )

    def mark_sent(self, ids: Sequence[int]) -> None:
        """Mark outbox messages as handed to the relay (unknown ids are ignored)."""
        wanted = sorted({int(i) for i in ids})
        if not wanted:
            return
        o = OUTBOX_TABLE.c
        with self._begin("marking outbox messages sent") as conn:
            with self._errors("marking outbox messages sent"):
                now = _now()
                for start in range(0, len(wanted), _MARK_SENT_CHUNK):
                    chunk = wanted[start : start + _MARK_SENT_CHUNK]
                    conn.execute(
                        update(OUTBOX_TABLE)
                        .where(o.id.in_(chunk), o.sent_at.is_(None))
                        .values(sent_at=now)
                    )

    def _update_outbox(self, action: str, id: int, values: Mapping[str, Any]) -> None:
        o = OUTBOX_TABLE.c
        with self._begin(action) as conn:
            with self._errors(action):
                conn.execute(
                    update(OUTBOX_TABLE)
                    .where(o.id == int(id), o.sent_at.is_(None), o.failed_at.is_(None))
                    .values(**values)
                )

    @staticmethod
    def _recipients(remaining: Sequence[str]) -> str:
        if not remaining:
            raise ValueError("an outbox message needs recipients")
        return json.dumps(list(remaining), ensure_ascii=False)

    def outbox_progress(self, id: int, remaining: Sequence[str]) -> None:
        """Some recipients are done: only `remaining` are ever sent the message again."""
        self._update_outbox(
            "recording outbox progress", id, {"recipients": self._recipients(remaining)}
        )

    def defer_outbox(self, id: int, remaining: Sequence[str], next_attempt: float, error: str) -> None:
        """A failed attempt: count it, keep only `remaining`, try again at `next_attempt`."""
        self._update_outbox(
            "deferring an outbox message",
            id,
            {
                "recipients": self._recipients(remaining),
                "attempts": OUTBOX_TABLE.c.attempts + 1,
                "next_attempt_at": _from_unix(next_attempt),
                "last_error": error,
            },
        )

    def fail_outbox(self, id: int, remaining: Sequence[str], error: str) -> None:
        """Give up: count the attempt, keep the message marked failed with `remaining`."""
        self._update_outbox(
            "marking an outbox message failed",
            id,
            {
                "recipients": self._recipients(remaining),
                "attempts": OUTBOX_TABLE.c.attempts + 1,
                "next_attempt_at": None,
                "failed_at": _now(),
                "last_error": error,
            },
        )

    def fail_recipients(self, id: int, recipients: Sequence[str], error: str) -> None:
        """Keep a failed copy of message `id` for `recipients`: a new row; `id` goes on."""
        o = OUTBOX_TABLE.c
        action = "keeping refused outbox recipients"
        with self._begin(action) as conn:
            with self._errors(action):
                row = conn.execute(
                    select(o.created_at, o.sender, o.raw, o.kind, o.attempts).where(
                        o.id == int(id), o.sent_at.is_(None), o.failed_at.is_(None)
                    )
                ).first()
                if row is None:
                    return
                conn.execute(
                    insert(OUTBOX_TABLE).values(
                        created_at=row.created_at,
                        sender=row.sender,
                        recipients=self._recipients(recipients),
                        raw=row.raw,
                        kind=row.kind,
                        attempts=row.attempts + 1,
                        failed_at=_now(),
                        last_error=error,
                    )
                )

    def purge_outbox(self, sent_before: float, limit: int = 500) -> int:
        """Delete at most `limit` messages marked sent before `sent_before` (a Unix
        time) in one DELETE; returns how many.  Failed and pending messages stay."""
        if limit <= 0:
            return 0
        o = OUTBOX_TABLE.c
        oldest = (
            select(o.id)
            .where(o.sent_at.is_not(None), o.sent_at < _from_unix(sent_before))
            .order_by(o.id)
            .limit(limit)
            .scalar_subquery()
        )
        with self._begin("purging sent outbox messages") as conn:
            with self._errors("purging sent outbox messages"):
                result = conn.execute(
                    delete(OUTBOX_TABLE).where(o.id.in_(oldest)),
                    execution_options={"preserve_rowcount": True},
                )
        return int(result.rowcount)

    def scan(self, prefix: str, after: str = "", limit: int = 500) -> list[tuple[str, StateRecord]]:
        """At most `limit` records whose key starts with `prefix` and sorts after
        `after`, in key order; a read-only transaction that locks no key (and on
        SQLite does not take the write lock)."""
        _check_text("key prefix", prefix, MAX_KEY_LENGTH)
        if limit <= 0:
            return []
        s = STATE_TABLE.c
        stmt = (
            select(s.key, s.state, s.data)
            # substr, not LIKE: exact and case-sensitive on both back ends
            .where(func.substr(s.key, 1, len(prefix)) == prefix, s.key > after)
            .order_by(s.key)
            .limit(limit)
        )
        with self._begin("scanning state", read_only=True) as conn:
            with self._errors("scanning state"):
                rows = conn.execute(stmt).all()
        return [(row.key, SQLAlchemyTransaction._decode(row.state, row.data)) for row in rows]

    def delete_keys(self, keys: Sequence[str]) -> int:
        """Forget these keys in one DELETE (one short transaction); returns how many existed."""
        wanted = sorted(set(keys))
        if not wanted:
            return 0
        for key in wanted:
            _check_text("state key", key, MAX_KEY_LENGTH)
        with self._begin("deleting state") as conn:
            with self._errors("deleting state"):
                result = conn.execute(
                    delete(STATE_TABLE).where(STATE_TABLE.c.key.in_(wanted)),
                    execution_options={"preserve_rowcount": True},
                )
        return int(result.rowcount)

    def close(self) -> None:
        """Close all pooled connections (the storage reconnects if used again).

        An in-memory SQLite database (``sqlite://``) is gone after this.
        """
        self._engine.dispose()

    def __repr__(self) -> str:
        return f"SQLAlchemyStorage({self.url!r})"


class SQLAlchemyTransaction:
    """One open transaction of a `SQLAlchemyStorage` (see `StateTransaction`).

    Only valid inside its ``with storage.transaction()`` block, and only in
    the thread that opened it.
    """

    def __init__(self, storage: SQLAlchemyStorage, conn: Connection) -> None:
        self._storage = storage
        self._conn = conn
        self._active = True
        self._locked: set[str] = set()

    # ------------------------------------------------------------ helpers
    def _check_active(self) -> None:
        if not self._active:
            raise RuntimeError("this state transaction has already ended")

    def _lock(self, key: str) -> None:
        """Serialise on `key` until the transaction ends (PostgreSQL; SQLite already is)."""
        if self._storage.backend != "postgresql" or key in self._locked:
            return
        self._conn.execute(
            text("SELECT pg_advisory_xact_lock(CAST(:id AS BIGINT))"), {"id": _lock_id(key)}
        )
        self._locked.add(key)

    @staticmethod
    def _decode(state: str, data: str) -> StateRecord:
        decoded = json.loads(data)
        return StateRecord(state, decoded if isinstance(decoded, dict) else {})

    # ------------------------------------------------------------ protocol
    def get(self, key: str) -> StateRecord | None:
        """The record for `key` (None if none), locking the key until the transaction ends."""
        self._check_active()
        _check_text("state key", key, MAX_KEY_LENGTH)
        s = STATE_TABLE.c
        with self._storage._errors("reading state"):
            self._lock(key)
            row = self._conn.execute(select(s.state, s.data).where(s.key == key)).first()
        return None if row is None else self._decode(row.state, row.data)

    def set(self, key: str, state: str, data: Mapping[str, Any] | None = None) -> None:
        """Store `state` (and `data`, default: keep the old data) for `key`.

        `data` must be JSON-serialisable with str keys (tuples come back
        as lists); otherwise `TypeError`.
        """
        self._check_active()
        _check_text("state key", key, MAX_KEY_LENGTH)
        _check_text("state name", state, MAX_STATE_LENGTH)
        encoded = None
        if data is not None:
            try:
                encoded = json.dumps(
                    dict(data), ensure_ascii=False, allow_nan=False, separators=(",", ":")
                )
            except (TypeError, ValueError) as exc:
                raise TypeError(f"state data for {key!r} is not JSON-serialisable: {exc}") from exc
        values = {
            "key": key,
            "state": state,
            "data": "{}" if encoded is None else encoded,
            "version": 1,
            "updated_at": _now(),
        }
        with self._storage._errors("writing state"):
            self._lock(key)
            if self._storage.backend == "postgresql":
                pg = pg_dialect.insert(STATE_TABLE).values(values)
                changes: dict[str, Any] = {
                    "state": pg.excluded.state,
                    "version": STATE_TABLE.c.version + 1,
                    "updated_at": pg.excluded.updated_at,
                }
                if encoded is not None:
                    changes["data"] = pg.excluded.data
                self._conn.execute(
                    pg.on_conflict_do_update(index_elements=[STATE_TABLE.c.key], set_=changes)
                )
            else:
                lite = sqlite_dialect.insert(STATE_TABLE).values(values)
                changes = {
                    "state": lite.excluded.state,
                    "version": STATE_TABLE.c.version + 1,
                    "updated_at": lite.excluded.updated_at,
                }
                if encoded is not None:
                    changes["data"] = lite.excluded.data
                self._conn.execute(
                    lite.on_conflict_do_update(index_elements=[STATE_TABLE.c.key], set_=changes)
                )

    def clear(self, key: str) -> None:
        """Forget `key` (back to ``START``)."""
        self._check_active()
        _check_text("state key", key, MAX_KEY_LENGTH)
        with self._storage._errors("clearing state"):
            self._lock(key)
            self._conn.execute(delete(STATE_TABLE).where(STATE_TABLE.c.key == key))

    def find(self, prefix: str, state: str | None = None) -> list[tuple[str, StateRecord]]:
        """All keys starting with `prefix` (optionally only in `state`), sorted by key.

        ``%`` and ``_`` in `prefix` are literal characters.  The keys are not
        locked; `get` one before changing it.
        """
        self._check_active()
        _check_text("key prefix", prefix, MAX_KEY_LENGTH)
        s = STATE_TABLE.c
        stmt = select(s.key, s.state, s.data).where(s.key.startswith(prefix, autoescape=True))
        if state is not None:
            stmt = stmt.where(s.state == state)
        with self._storage._errors("searching state"):
            rows = self._conn.execute(stmt).all()
        # SQLite's LIKE ignores ASCII case and PostgreSQL sorts by collation:
        # filter and sort here so every back end answers like MemoryStorage.
        return sorted(
            ((row.key, self._decode(row.state, row.data)) for row in rows if row.key.startswith(prefix)),
            key=lambda item: item[0],
        )

    def add_outbox(self, messages: Sequence[OutboxMessage]) -> None:
        """Queue messages to send once this transaction has committed."""
        self._check_active()
        if not messages:
            return
        for m in messages:
            _check_text("outbox kind", m.kind, 32)
        now = _now()
        rows = [
            {
                "created_at": now,
                "sender": m.sender,
                "recipients": json.dumps(list(m.recipients), ensure_ascii=False),
                "raw": bytes(m.raw),
                "kind": m.kind,
                "attempts": 0,
            }
            for m in messages
        ]
        with self._storage._errors("queueing outbox messages"):
            self._conn.execute(insert(OUTBOX_TABLE), rows)

    def claim(self, token: str) -> bool:
        """Record an idempotency token; False if it was already recorded (a retry).

        A concurrent transaction claiming the same token waits for this one
        to end, then gets False (or True if this one rolled back).
        """
        self._check_active()
        _check_text("claim token", token, MAX_TOKEN_LENGTH)
        values = {"token": token, "created_at": _now()}
        with self._storage._errors("claiming a token"):
            if self._storage.backend == "postgresql":
                pg = pg_dialect.insert(TOKENS_TABLE).values(values).on_conflict_do_nothing(
                    index_elements=[TOKENS_TABLE.c.token]
                )
                result = self._conn.execute(pg, execution_options={"preserve_rowcount": True})
            else:
                lite = sqlite_dialect.insert(TOKENS_TABLE).values(values).on_conflict_do_nothing(
                    index_elements=[TOKENS_TABLE.c.token]
                )
                result = self._conn.execute(lite, execution_options={"preserve_rowcount": True})
        return result.rowcount == 1
