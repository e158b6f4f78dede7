"""The SQL store's tables and their versions: creating, checking and upgrading the schema.

Five tables, all prefixed ``lamsonfilter_``: ``state`` (one row per key),
``outbox`` (messages committed), ``tokens`` (idempotency tokens),
``confirmations`` (the confirmation engine's requests, `lamsonfilter.confirm`)
and ``meta`` (the schema version).  `SQLSchema.create_schema` (``lamsonfilter db
init``) creates them or upgrades an older version in place; a storage
refuses a database whose version is newer than `SCHEMA_VERSION`.
"""

from __future__ import annotations

import logging

from sqlalchemy import (
    Column,
    DateTime,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    inspect,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection

from ..state import SchemaMissingError
from .engine import SQLEngine, _lock_id

__all__ = ["SQLSchema", "SCHEMA_VERSION", "METADATA", "STATE_TABLE", "OUTBOX_TABLE",
           "TOKENS_TABLE", "CONFIRMATIONS_TABLE", "META_TABLE"]

log = logging.getLogger("lamsonfilter.store")

#: The schema version this code creates and expects in ``lamsonfilter_meta``.
#: 2: the outbox's ``next_attempt_at``, ``failed_at`` and ``last_error``;
#: 3: the outbox's claims, ``claimed_by`` and ``claimed_until`` (several
#: outbox workers, processes or hosts, on one database).
#: 4: the confirmations table (`lamsonfilter.confirm`).
#: `create_schema` adds the columns and tables to an older database in place.
SCHEMA_VERSION = 4

#: Longest worker name stored in a claim (``host:pid:random``).
MAX_WORKER_LENGTH = 255

#: Longest key, state name and claim token accepted (the column sizes).
MAX_KEY_LENGTH = 512
MAX_STATE_LENGTH = 64
MAX_TOKEN_LENGTH = 512

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
    # schema version 3: which worker is sending the message, and until when (its lease)
    Column("claimed_by", String(MAX_WORKER_LENGTH), nullable=True),
    Column("claimed_until", DateTime(timezone=True), nullable=True),
)

#: Columns added after version 1, in the order `create_schema` adds them.
_ADDED_COLUMNS = {
    OUTBOX_TABLE.name: ("next_attempt_at", "failed_at", "last_error", "claimed_by", "claimed_until"),
}

TOKENS_TABLE = Table(
    "lamsonfilter_tokens",
    METADATA,
    Column("token", String(MAX_TOKEN_LENGTH), primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

#: The confirmation engine's requests (schema version 4; `lamsonfilter.confirm`).  The token
#: itself is never stored, only its SHA-256; `sender` is the address it is bound to, as given.
CONFIRMATIONS_TABLE = Table(
    "lamsonfilter_confirmations",
    METADATA,
    Column("token_hash", String(64), primary_key=True),  # sha256 hex of the token
    Column("kind", String(64), nullable=False),  # what is confirmed, chosen by the app
    Column("sender", String(512), nullable=False),  # compared case-insensitively
    Column("data", Text, nullable=False),  # JSON object as text
    Column("message", LargeBinary, nullable=True),  # the pending message, when the app keeps one
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False, index=True),
    Column("used_at", DateTime(timezone=True), nullable=True),
)

META_TABLE = Table(
    "lamsonfilter_meta",
    METADATA,
    Column("name", String(64), primary_key=True),
    Column("value", String(255), nullable=False),
)

_VERSION_NAME = "schema_version"


class SQLSchema(SQLEngine):
    """Checking, creating and upgrading the schema of a SQL storage."""

    def check_schema(self) -> None:
        """Raise `SchemaMissingError` unless the tables exist in this code's version."""
        with self._begin("checking the schema", read_only=True) as conn:
            with self._errors("checking the schema"):
                inspector = inspect(conn)
                missing = [t.name for t in METADATA.sorted_tables if not inspector.has_table(t.name)]
                if len(missing) == len(METADATA.tables):
                    raise SchemaMissingError(self._missing_message())
                version = self._read_version(conn) if META_TABLE.name not in missing else None
                behind = version is not None and version < SCHEMA_VERSION  # tables added since: "older"
                if missing and not behind:
                    raise SchemaMissingError(
                        f"the database at {self.url} has an incomplete lamsonfilter schema "
                        f"(missing {', '.join(missing)}); {self._init_hint()}"
                    )
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
