"""Alembic, driven in code: two lines of migrations in one database.

A database holds two independent lines of revisions, each with its own
version table:

=================  ====================================  ================================
line               revisions                             version table
=================  ====================================  ================================
``lamsonfilter``   ``lamsonfilter/migrations/versions``  ``lamsonfilter_alembic_version``
``application``    ``APP_DIR/migrations``                ``app_alembic_version``
=================  ====================================  ================================

No ``alembic.ini`` exists: `config` builds the `alembic.config.Config` in
code, with the connection (already inside the caller's transaction) in
``Config.attributes``, and Alembic's commands run the one environment
script, ``lamsonfilter/migrations/env.py``, which calls `run_env`.  The
application's line shares that script and the template
``script.py.mako``; only its revisions live in the application.

    upgrade(conn, FRAMEWORK)                       # lamsonfilter's tables to head
    upgrade(conn, app_line(app_dir, metadata))     # the application's
    revision(conn, app_line(app_dir, metadata), "add priority")   # autogenerate

Autogenerate (`revision`) compares the application's models with the
database and sees only the tables the models name: lamsonfilter's tables,
the version tables and whatever else shares the database are left out, so a
dropped model is dropped by a hand-written ``op.drop_table``.  The first
revision of an application is generated as if the database were empty
(it creates every model table), whatever tables an earlier ``db init``
made.  Scripts are rendered in batch mode (``op.batch_alter_table``), so
the same script alters a table on SQLite and on PostgreSQL.

Errors: Alembic's own (`alembic.util.CommandError`, a broken revision
file) surface as `MigrationError` with the text naming what to do; the
database's errors are the caller's to translate (`SQLEngine._errors`).
"""

from __future__ import annotations

import logging
import re
import threading
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Alembic says "setup plugin ..." on import and "Context impl SQLiteImpl." on every check, at
# INFO: a daemon's log at INFO is not the place for it (an operator's own level is kept).
if logging.getLogger("alembic").level == logging.NOTSET:
    logging.getLogger("alembic").setLevel(logging.WARNING)

from alembic import command  # after the logger's level
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import MetaData
from sqlalchemy.engine import Connection

from ..state import SchemaMissingError

__all__ = ["APP_TABLE", "FRAMEWORK", "FRAMEWORK_TABLE", "Line", "MigrationError", "MIGRATIONS_DIR",
           "app_line", "current", "heads", "known", "revision", "run_env", "stamp", "upgrade"]

#: Where lamsonfilter's environment script, template and revisions are (package data).
MIGRATIONS_DIR = Path(__file__).resolve().parents[1] / "migrations"

FRAMEWORK_TABLE = "lamsonfilter_alembic_version"
APP_TABLE = "app_alembic_version"

_LINE = "lamsonfilter.line"
_FIRST = "lamsonfilter.first_revision"


class MigrationError(SchemaMissingError):
    """A migration cannot run (Alembic refused, a revision file is broken); the text says why."""


@dataclass(frozen=True)
class Line:
    """One line of revisions: lamsonfilter's own, or an application's.

    `versions` is the directory of revision files; `metadata` the models
    autogenerate compares with (the application's, None for lamsonfilter).
    """

    name: str
    version_table: str
    versions: Path
    metadata: MetaData | None = None


FRAMEWORK = Line("lamsonfilter", FRAMEWORK_TABLE, MIGRATIONS_DIR / "versions")


def app_line(app_dir: str | Path, metadata: MetaData | None) -> Line:
    """The application's line: revisions in ``APP_DIR/migrations``, its models' `metadata`."""
    return Line("application", APP_TABLE, Path(app_dir) / "migrations", metadata)


def config(line: Line, conn: Connection | None = None) -> Config:
    """The Alembic configuration of `line`, built in code (no ``alembic.ini``)."""
    cfg = Config(cmd_opts=Namespace(quiet=True))  # the commands say what was done
    cfg.set_main_option("script_location", _escape(str(MIGRATIONS_DIR)))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("version_locations", _escape(str(line.versions)))
    cfg.attributes[_LINE] = line
    if conn is not None:
        cfg.attributes["connection"] = conn
    return cfg


def _escape(value: str) -> str:
    return value.replace("%", "%%")  # ConfigParser interpolation


def script(line: Line) -> ScriptDirectory:
    """The revisions of `line` (an application without ``migrations/`` has none)."""
    try:
        return ScriptDirectory.from_config(config(line))
    except CommandError as exc:
        raise MigrationError(f"the {line.name} migrations in {line.versions}: {exc}") from exc


def _unreadable(line: Line, exc: BaseException) -> MigrationError:
    """A revision file that does not import, or revisions that do not chain: one line naming them."""
    if isinstance(exc, CommandError):
        return MigrationError(f"the {line.name} migrations in {line.versions}: {exc}")
    where = ""
    tb = exc.__traceback__
    while tb is not None:  # the revision file the error was raised in, if any
        if Path(tb.tb_frame.f_code.co_filename).parent == line.versions:
            where = f" ({Path(tb.tb_frame.f_code.co_filename).name}, line {tb.tb_lineno})"
        tb = tb.tb_next
    if isinstance(exc, SyntaxError) and exc.filename:
        where = f" ({Path(exc.filename).name}, line {exc.lineno})"
    return MigrationError(f"the {line.name} migrations in {line.versions} cannot be read{where}: "
                          f"{type(exc).__name__}: {exc}")


def heads(line: Line) -> tuple[str, ...]:
    """The head revision(s) of `line`, sorted; empty when it has no revisions."""
    if not line.versions.is_dir():
        return ()
    try:
        return tuple(sorted(script(line).get_heads()))
    except MigrationError:
        raise
    except Exception as exc:  # a revision file that does not import
        raise _unreadable(line, exc) from exc


def known(line: Line, rev: str) -> bool:
    """Whether `rev` is one of `line`'s revisions."""
    if not line.versions.is_dir():
        return False
    heads(line)  # a file that does not import is reported as such, not as "unknown revision"
    try:
        return script(line).get_revision(rev) is not None
    except CommandError:
        return False


def current(conn: Connection, line: Line) -> tuple[str, ...]:
    """The revision(s) the database is at on `line`, sorted; empty when never migrated."""
    ctx = MigrationContext.configure(conn, opts={"version_table": line.version_table})
    return tuple(sorted(ctx.get_current_heads()))


def upgrade(conn: Connection, line: Line, target: str = "head") -> None:
    """Run `line`'s revisions up to `target` on `conn`, inside the caller's transaction."""
    _run(line, lambda: command.upgrade(config(line, conn), target))


def stamp(conn: Connection, line: Line, target: str = "head") -> None:
    """Record `target` as `line`'s revision without running anything."""
    _run(line, lambda: command.stamp(config(line, conn), target))


def revision(conn: Connection, line: Line, message: str, *, autogenerate: bool = True) -> Path:
    """Autogenerate `line`'s next revision from its models; the new file's path.

    Revision ids count up (``0001``, ``0002``, ...) so that the files sort
    in order.  The database must be at the line's head (Alembic refuses
    otherwise: a revision is the difference from the newest one).  With
    `autogenerate` False the revision is empty, to be written by hand (a
    data migration), and needs neither models nor the database.
    """
    if line.metadata is None and autogenerate:
        raise MigrationError("the application has no models (app/models.py with a Base): "
                             "nothing to generate a revision from")
    line.versions.mkdir(parents=True, exist_ok=True)
    existing = heads(line)
    cfg = config(line, conn)
    cfg.attributes[_FIRST] = not existing
    rev_id = _next_id(line)
    made: list[Any] = []

    def run() -> None:
        made.append(command.revision(cfg, message=message, autogenerate=autogenerate, rev_id=rev_id))

    _run(line, run)
    scripts = made[0] if isinstance(made[0], list) else [made[0]]
    return Path(scripts[0].path)


def model_changes(conn: Connection, line: Line) -> list[str]:
    """What autogenerate would put into `line`'s next revision: how its models differ from the
    tables in `conn`'s database, one short text each (``add_column shop_greeting.name``); [] when
    they match, or when the line has no models."""
    if line.metadata is None or not line.metadata.tables:
        return []
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    tables = set(line.metadata.tables)
    ctx = MigrationContext.configure(conn, opts={
        "compare_type": True,
        "include_name": lambda name, type_, parents: type_ != "table" or name in tables,
    })
    with _ONE_AT_A_TIME:
        diff = compare_metadata(ctx, line.metadata)
    return [_describe(d) for d in diff]


def _describe(change: Any) -> str:
    """``op table.column`` of one of Alembic's differences (a list for a column's modify_* ops)."""
    if isinstance(change, list):
        change = change[0]
    names = [x if isinstance(x, str) else getattr(x, "name", None) for x in change[1:4]]
    return f"{change[0]} {'.'.join(n for n in names if isinstance(n, str) and n)}".strip()


def _next_id(line: Line) -> str:
    numbers = [int(m.group(1)) for p in line.versions.glob("*.py")
               if (m := re.match(r"(\d+)_", p.name))]
    ids = {r.revision for r in script(line).walk_revisions()} if line.versions.is_dir() else set()
    n = max(numbers + [len(ids)], default=0) + 1
    while f"{n:04d}" in ids:
        n += 1
    return f"{n:04d}"


#: Alembic's ``context`` and ``op`` are process-wide proxies: one command at a time per process
#: (taken after the caller's advisory lock and transaction, and never held while waiting for one).
_ONE_AT_A_TIME = threading.Lock()


def _run(line: Line, action: Any) -> None:
    try:
        with _ONE_AT_A_TIME:
            action()
    except CommandError as exc:
        text = str(exc)
        if "not up to date" in text:
            text = ("the database is behind the application's migrations: run `lamsonfilter db "
                    "upgrade --app DIR` first (a new revision is the difference from the newest one)")
        raise MigrationError(f"{line.name} migrations ({line.versions}): {text}") from exc


def run_env() -> None:
    """The body of ``env.py``: configure Alembic's context from `config`'s attributes and migrate.

    Only online migrations exist: the connection is always given (and
    already in a transaction, which Alembic leaves to its owner).
    """
    from alembic import context

    cfg = context.config
    line: Line = cfg.attributes[_LINE]
    conn: Connection = cfg.attributes["connection"]
    options: dict[str, Any] = {
        "connection": conn,
        "version_table": line.version_table,
        "target_metadata": line.metadata,
        "render_as_batch": True,
    }
    if line.metadata is not None:
        tables = set(line.metadata.tables)
        first = bool(cfg.attributes.get(_FIRST))

        def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
            if type_ != "table":
                return True
            # the first revision creates every model table; later ones see only the models' tables
            return not first and name in tables

        options["include_name"] = include_name
    context.configure(**options)
    with context.begin_transaction():
        context.run_migrations()
