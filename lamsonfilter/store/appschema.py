"""The application's own tables in the state database: upgrading, checking, new revisions.

An application with models (``app/models.py``, `lamsonfilter.models`) keeps
its tables in the same database as lamsonfilter's, so that a handler's rows
commit with the state and the outbox.  Its migrations are its own line of
Alembic revisions (`lamsonfilter.store.migrate`): files in
``APP_DIR/migrations/``, the database's revision in ``app_alembic_version``.

* With revisions, `upgrade_app` runs them up to the newest and
  `check_app_schema` (every daemon at start) refuses a database behind them
  (run ``lamsonfilter db upgrade``) or at a revision the application does
  not have (deploy the application's newest migrations).
* With models but no revisions yet, `upgrade_app` creates the missing
  tables from the models (``create_all``: it never changes a table) and the
  check wants them all there; ``lamsonfilter db revision`` makes the first
  revision, and `stamp_app` records that tables made so already match it.

    storage.upgrade_app(app_dir, metadata)      # lamsonfilter db init / upgrade
    storage.check_app_schema(app_dir, metadata)
    storage.app_model_changes(app_dir, metadata)   # ["add_column t.priority"]: run db revision
    storage.app_revision(app_dir, metadata, "add priority")   # -> the new file

Errors are `SchemaMissingError` (or its `MigrationError`) naming the
command to run, with ``--app DIR`` for the caller to fill in.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import MetaData, inspect, text
from sqlalchemy.engine import Connection

from ..state import SchemaMissingError
from . import migrate
from .engine import SQLEngine, _lock_id

__all__ = ["SQLAppSchema"]


class SQLAppSchema(SQLEngine):
    """The application's line of migrations on a SQL storage (see the module's text)."""

    def upgrade_app(self, app_dir: str | Path, metadata: MetaData | None) -> str:
        """Bring the application's tables up to date; says what it did, in one line."""
        line = migrate.app_line(app_dir, metadata)
        want = migrate.heads(line)
        with self._begin("upgrading the application's tables") as conn:
            with self._errors("upgrading the application's tables"):
                if self.backend == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(CAST(:id AS BIGINT))"),
                                 {"id": _lock_id("lamsonfilter application schema")})
                have = migrate.current(conn, line)
                if want:
                    self._refuse_unknown(line, have, want)
                    if not have:
                        self._refuse_unrecorded(conn, line, want)
                    migrate.upgrade(conn, line)
                    done = (f"at revision {', '.join(want)}, the newest" if have == want else
                            f"revision {', '.join(have) or '(none)'} -> {', '.join(want)}")
                    if metadata is None or not metadata.tables:
                        return f"application: {done}"
                    return f"application tables ready: {', '.join(sorted(metadata.tables))} ({done})"
                if have:
                    self._refuse_unknown(line, have, want)
                if metadata is None or not metadata.tables:
                    return "application: no models (app/models.py), no migrations"
                metadata.create_all(conn, checkfirst=True)
                return (f"application tables ready: {', '.join(sorted(metadata.tables))} (made from "
                        "app/models.py; no migrations yet: `lamsonfilter db revision` makes the first)")

    def check_app_schema(self, app_dir: str | Path, metadata: MetaData | None) -> None:
        """Raise `SchemaMissingError` unless the application's tables are up to date."""
        line = migrate.app_line(app_dir, metadata)
        want = migrate.heads(line)
        with self._begin("checking the application's tables", read_only=True) as conn:
            with self._errors("checking the application's tables"):
                have = migrate.current(conn, line)
                names = set(inspect(conn).get_table_names())
        self._refuse_unknown(line, have, want)
        if want and have != want:
            raise SchemaMissingError(
                f"the database at {self.url} is at application revision "
                f"{', '.join(have) or '(none)'}, older than the application's migrations "
                f"({', '.join(want)}); {self._upgrade_hint()} to upgrade it"
            )
        if not want and metadata is not None:
            missing = sorted(set(metadata.tables) - names)
            if missing:
                raise SchemaMissingError(
                    f"the database at {self.url} lacks the application's tables "
                    f"({', '.join(missing)}); {self._init_hint()}"
                )

    def app_revisions(self, app_dir: str | Path, metadata: MetaData | None) -> tuple[
            tuple[str, ...], tuple[str, ...]]:
        """(the database's application revision, the application's newest), for ``db status``."""
        line = migrate.app_line(app_dir, metadata)
        with self._begin("reading the application's revision", read_only=True) as conn:
            with self._errors("reading the application's revision"):
                have = migrate.current(conn, line)
        return have, migrate.heads(line)

    def app_model_changes(self, app_dir: str | Path, metadata: MetaData | None) -> list[str]:
        """How the models differ from the application's tables in this database (what ``db
        revision`` would write), one short text each; [] when they match."""
        line = migrate.app_line(app_dir, metadata)
        with self._begin("comparing the models with the database", read_only=True) as conn:
            with self._errors("comparing the models with the database"):
                return migrate.model_changes(conn, line)

    def framework_revisions(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(the database's lamsonfilter revision, this lamsonfilter's newest), for ``db status``."""
        with self._begin("reading the schema's revision", read_only=True) as conn:
            with self._errors("reading the schema's revision"):
                have = migrate.current(conn, migrate.FRAMEWORK)
        return have, migrate.heads(migrate.FRAMEWORK)

    def app_revision(self, app_dir: str | Path, metadata: MetaData | None, message: str, *,
                     autogenerate: bool = True) -> Path:
        """Autogenerate the application's next revision from its models (or, with
        `autogenerate` False, an empty one to write by hand); the new file.

        Nothing is written to the database (the transaction is rolled back).
        """
        line = migrate.app_line(app_dir, metadata)
        with self._begin("generating a revision", commit=False) as conn:
            with self._errors("generating a revision"):
                return migrate.revision(conn, line, message, autogenerate=autogenerate)

    def stamp_app(self, app_dir: str | Path, metadata: MetaData | None, revision: str) -> None:
        """Record that the application's tables are at `revision` (made before its migrations)."""
        line = migrate.app_line(app_dir, metadata)
        if not migrate.known(line, revision) and revision != "head":
            raise migrate.MigrationError(f"{line.versions} has no revision {revision!r}")
        with self._begin("recording the application's revision") as conn:
            with self._errors("recording the application's revision"):
                migrate.stamp(conn, line, revision)

    def _refuse_unknown(self, line: migrate.Line, have: tuple[str, ...], want: tuple[str, ...]) -> None:
        unknown = [r for r in have if not migrate.known(line, r)]
        if unknown:
            raise SchemaMissingError(
                f"the database at {self.url} is at application revision {', '.join(have)}, which "
                f"{line.versions} does not have (its newest: {', '.join(want) or 'none'}); "
                "deploy the application's newest migrations, or give the right --app"
            )

    def _refuse_unrecorded(self, conn: Connection, line: migrate.Line, want: tuple[str, ...]) -> None:
        """Tables made from the models before the application had migrations: say how to adopt them."""
        if line.metadata is None:
            return
        names = set(inspect(conn).get_table_names())
        there = sorted(set(line.metadata.tables) & names)
        if there:
            raise SchemaMissingError(
                f"the database at {self.url} has application tables ({', '.join(there)}) but no "
                f"record of the application's migrations ({migrate.APP_TABLE}): they were made "
                "from the models before the application had migrations.  If they match the "
                "revision that creates them, record it with `lamsonfilter db stamp --app DIR "
                f"--database {self.url} REVISION`, then upgrade"
            )
