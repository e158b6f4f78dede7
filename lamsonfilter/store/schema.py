"""The SQL store's tables, and checking and upgrading them with Alembic.

Five tables, all prefixed ``lamsonfilter_``: ``state`` (one row per key),
``outbox`` (messages committed), ``tokens`` (idempotency tokens),
``confirmations`` (`lamsonfilter.confirm`) and ``meta`` (the schema version
of lamsonfilter before Alembic, kept at 3).  The tables below are what the
code reads and writes; the revisions in ``lamsonfilter/migrations/versions``
make them (`lamsonfilter.store.migrate`), and ``lamsonfilter_alembic_version``
says which revision a database is at.

`SQLSchema.create_schema` (``lamsonfilter db init`` and ``db upgrade``)
upgrades the database to the newest revision: a new one gets every table,
one made before Alembic (``lamsonfilter_meta`` at schema version 1 to 4)
keeps every row and gets what it lacks.  `SQLSchema.check_schema` (every
daemon at start) refuses a database that is behind (naming ``lamsonfilter db
upgrade``) or ahead (a revision this lamsonfilter does not know: upgrade
lamsonfilter).
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
    select,
    text,
)
from sqlalchemy.engine import Connection

from ..state import SchemaMissingError
from . import migrate
from .engine import SQLEngine, _lock_id

__all__ = ["SQLSchema", "SCHEMA_VERSION", "METADATA", "STATE_TABLE", "OUTBOX_TABLE",
           "TOKENS_TABLE", "META_TABLE", "CONFIRMATIONS_TABLE"]

log = logging.getLogger("lamsonfilter.store")

#: The last schema version of lamsonfilter before Alembic, kept in ``lamsonfilter_meta``
#: (revision 0001 is that schema).  2: the outbox's ``next_attempt_at``, ``failed_at``
#: and ``last_error``; 3: the outbox's claims, ``claimed_by`` and ``claimed_until``.
#: A database at version 1, 2, 3 (or `LEGACY_NEWEST`) is adopted by `create_schema` in place.
SCHEMA_VERSION = 3

#: The newest version a database made before Alembic may say: 4 is 3 plus the confirmations
#: table (`lamsonfilter.confirm` before it had migrations); revision 0002 finds that table there
#: and keeps it.  A higher version is refused as newer than this lamsonfilter.
LEGACY_NEWEST = 4

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
    # schema version 2 (added by revision 0001 to older databases; all nullable)
    Column("next_attempt_at", DateTime(timezone=True), nullable=True),
    Column("failed_at", DateTime(timezone=True), nullable=True),
    Column("last_error", Text, nullable=True),
    # schema version 3: which worker is sending the message, and until when (its lease)
    Column("claimed_by", String(MAX_WORKER_LENGTH), nullable=True),
    Column("claimed_until", DateTime(timezone=True), nullable=True),
)

TOKENS_TABLE = Table(
    "lamsonfilter_tokens",
    METADATA,
    Column("token", String(MAX_TOKEN_LENGTH), primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

#: The confirmation engine's requests (revision 0002; `lamsonfilter.confirm`).  The token
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
    """Checking and upgrading lamsonfilter's tables (Alembic revisions, `lamsonfilter.store.migrate`)."""

    def check_schema(self) -> None:
        """Raise `SchemaMissingError` unless lamsonfilter's tables are at this code's revision.

        The text names the command to run: ``db init`` for a database without
        the schema, ``db upgrade`` for one behind, "upgrade lamsonfilter" for
        one ahead (a revision this lamsonfilter does not know).
        """
        with self._begin("checking the schema", read_only=True) as conn:
            with self._errors("checking the schema"):
                names = set(inspect(conn).get_table_names())
                if migrate.FRAMEWORK_TABLE not in names:
                    self._refuse_unmigrated(conn, names)
                have = migrate.current(conn, migrate.FRAMEWORK)
            want = migrate.heads(migrate.FRAMEWORK)
            if have != want:
                self._refuse_revision(have, want)
            missing = [t.name for t in METADATA.sorted_tables if t.name not in names]
            if missing:
                raise SchemaMissingError(
                    f"the database at {self.url} has an incomplete lamsonfilter schema "
                    f"(missing {', '.join(missing)}); {self._init_hint()}"
                )

    def create_schema(self) -> None:
        """Upgrade lamsonfilter's tables to the newest revision, in one transaction; idempotent.

        A new database gets every table; one made before Alembic is adopted
        in place (revision 0001); a database ahead of this code is refused.
        On PostgreSQL an advisory lock lets two hosts run it at once.
        """
        with self._begin("upgrading the schema") as conn:
            with self._errors("upgrading the schema"):
                self._lock_schema(conn)
                names = set(inspect(conn).get_table_names())
                if migrate.FRAMEWORK_TABLE not in names and META_TABLE.name in names:
                    self._legacy_version(conn)  # refuses a newer or unreadable one
                have = migrate.current(conn, migrate.FRAMEWORK)
                unknown = [r for r in have if not migrate.known(migrate.FRAMEWORK, r)]
                if unknown:
                    self._refuse_revision(have, migrate.heads(migrate.FRAMEWORK))
                before = have
                migrate.upgrade(conn, migrate.FRAMEWORK)
                after = migrate.current(conn, migrate.FRAMEWORK)
        if before != after:
            log.info("lamsonfilter schema on %s: %s -> %s", self.url,
                     ", ".join(before) or "(none)", ", ".join(after))

    def _lock_schema(self, conn: Connection) -> None:
        """PostgreSQL: one migration at a time (two ``db init`` on two hosts at once)."""
        if self.backend == "postgresql":
            conn.execute(
                text("SELECT pg_advisory_xact_lock(CAST(:id AS BIGINT))"),
                {"id": _lock_id("lamsonfilter schema")},
            )

    def _refuse_unmigrated(self, conn: Connection, names: set[str]) -> None:
        """No version table: no schema at all, or one made before Alembic (behind)."""
        if not names & set(METADATA.tables):
            raise SchemaMissingError(self._missing_message())
        version = self._legacy_version(conn) if META_TABLE.name in names else None
        if version is None:
            raise SchemaMissingError(
                f"the database at {self.url} has lamsonfilter tables but no schema version; "
                f"{self._init_hint()}"
            )
        raise SchemaMissingError(
            f"the database at {self.url} has lamsonfilter schema version {version} (from before "
            f"lamsonfilter used migrations), older than this lamsonfilter needs (revision "
            f"{', '.join(migrate.heads(migrate.FRAMEWORK))}); {self._upgrade_hint()} to upgrade it"
        )

    def _refuse_revision(self, have: tuple[str, ...], want: tuple[str, ...]) -> None:
        shown = ", ".join(have) or "(none)"
        unknown = [r for r in have if not migrate.known(migrate.FRAMEWORK, r)]
        if unknown:
            raise SchemaMissingError(
                f"the database at {self.url} is at lamsonfilter revision {shown}, newer than "
                f"this lamsonfilter knows (its newest is {', '.join(want)}); upgrade lamsonfilter"
            )
        raise SchemaMissingError(
            f"the database at {self.url} is at lamsonfilter revision {shown}, older than this "
            f"lamsonfilter needs ({', '.join(want)}); {self._upgrade_hint()} to upgrade it"
        )

    def _legacy_version(self, conn: Connection) -> int | None:
        """The schema version of a database made before Alembic; refuses one newer than 3."""
        value = conn.execute(
            select(META_TABLE.c.value).where(META_TABLE.c.name == _VERSION_NAME)
        ).scalar_one_or_none()
        if value is None:
            return None
        try:
            version = int(value)
        except ValueError:
            raise SchemaMissingError(
                f"the database at {self.url} has a lamsonfilter schema with an unreadable "
                f"version {value!r}; {self._init_hint()}"
            ) from None
        if version > LEGACY_NEWEST:
            raise SchemaMissingError(
                f"the database at {self.url} has lamsonfilter schema version {version}, "
                f"newer than this lamsonfilter knows ({LEGACY_NEWEST}); upgrade lamsonfilter"
            )
        return version
