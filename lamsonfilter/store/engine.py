"""The SQL store's engine: connections, transactions and the errors they raise.

`SQLEngine` is what every part of `lamsonfilter.store.sql.SQLAlchemyStorage`
builds on: one SQLAlchemy engine per storage, a connection per transaction
(`_begin`), SQLite's ``BEGIN IMMEDIATE`` and WAL, PostgreSQL's
``lock_timeout``, and the translation of every driver exception into a
`lamsonfilter.state` error (`_errors`).
"""

from __future__ import annotations

import hashlib
import logging
import re
import sqlite3
import threading
import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import datetime, timezone
from typing import Any, Iterator

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    DisconnectionError,
    NoSuchModuleError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.pool import QueuePool, StaticPool

from ..state import ConflictError, SchemaMissingError, StorageError, StorageUnavailable

__all__ = ["SQLEngine", "INIT_HINT", "UPGRADE_HINT"]

log = logging.getLogger("lamsonfilter.store")

INIT_HINT = "run `lamsonfilter db init --app DIR`"
"""The command that fixes a missing schema; the messages add ``--database URL`` (`_init_hint`),
so that following the hint initialises this database and not the application's default."""

UPGRADE_HINT = "run `lamsonfilter db upgrade --app DIR`"
"""The command that brings a database behind this code's revisions up to date (as `INIT_HINT`)."""

# SQLSTATEs that mean "a concurrent transaction got in the way; run again".
_PG_CONFLICT = {"40001", "40P01", "23505"}  # serialization, deadlock, unique
_PG_UNDEFINED_TABLE = "42P01"
# SQLSTATEs (or their two-character classes) that mean "the database, not this message":
# connection exceptions, insufficient resources, operator intervention (shutdown, cancel),
# system errors, lock not available (lock_timeout), undefined column (an old schema).
_PG_UNAVAILABLE_CLASSES = {"08", "53", "57", "58"}
_PG_UNAVAILABLE = {"55P03", "55006", "42703", "25006"}
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



def _switch_to_wal(cursor: Any, timeout: float) -> None:
    """``PRAGMA journal_mode = WAL``, waiting up to `timeout` seconds for the lock it needs.

    On a file still in rollback mode (a fresh database) the switch needs an
    exclusive lock, and SQLite answers "database is locked" at once, without
    its busy handler, when another connection is in a transaction (several
    processes or hosts starting on a new file together).  Once the file is
    in WAL mode the pragma is a no-op.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)  # bounded by the deadline: a retry, not a wait for anyone


def _unavailable(exc: BaseException, orig: BaseException, sqlstate: str | None) -> bool:
    """Whether a driver error says the database failed rather than anything this message did.

    PostgreSQL says it by SQLSTATE; SQLite and the connection pool by the
    exception's kind: ``OperationalError`` (both DB-API drivers and
    SQLAlchemy use it for "cannot connect", "database is locked", "disk I/O
    error", "readonly database", "no such column"), a lost connection, a
    pool that timed out.  A value the driver would not bind or a constraint
    is not: that may be the message's doing.
    """
    if sqlstate:
        return sqlstate[:2] in _PG_UNAVAILABLE_CLASSES or sqlstate in _PG_UNAVAILABLE
    if isinstance(exc, (OperationalError, DisconnectionError, PoolTimeout)):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(orig, sqlite3.OperationalError) or type(orig).__name__ == "OperationalError"


class SQLEngine:
    """The connection side of a SQL storage (see `SQLAlchemyStorage`).

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
                        _switch_to_wal(cursor, timeout_ms / 1000)
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
        message = f"{action} failed on the state database {self.url}: {detail}"
        if _unavailable(exc, orig, sqlstate):
            return StorageUnavailable(message)
        return StorageError(message)

    def _missing_message(self) -> str:
        return f"the database at {self.url} has no lamsonfilter schema; {self._init_hint()}"

    def _init_hint(self) -> str:
        return INIT_HINT.replace("--app DIR", f"--app DIR --database {self.url}")

    def _upgrade_hint(self) -> str:
        return UPGRADE_HINT.replace("--app DIR", f"--app DIR --database {self.url}")

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

    def close(self) -> None:
        """Close all pooled connections (the storage reconnects if used again).

        An in-memory SQLite database (``sqlite://``) is gone after this.
        """
        self._engine.dispose()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

