"""What the ``lamsonfilter`` commands share: the ``--app`` and ``--database`` options,
the one-line error with exit status 2, loading an application, opening an
existing state database (``state``, ``outbox``), and the state database
checks the daemons and ``check`` both make.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ..app import App, StartupError
from ..state import StateStorage, StorageError

__all__ = ["APP_HELP", "app_option", "database_option", "fail", "load", "open_database",
           "refuse_unwritable_database", "safe_url", "with_app_dir"]

APP_HELP = "Application directory (with config/settings.py). Default: $LAMSONFILTER_APP or the current directory."


def app_option(f: Any) -> Any:
    return click.option(
        "--app", "app_dir", type=click.Path(file_okay=False, path_type=Path),
        envvar="LAMSONFILTER_APP", default=".", show_default=False, help=APP_HELP,
    )(f)


def database_option(f: Any) -> Any:
    return click.option(
        "--database", "database", metavar="URL", default=None, envvar="LAMSONFILTER_DATABASE",
        help="State database URL (overrides DATABASE_URL; env LAMSONFILTER_DATABASE), "
             "e.g. sqlite:////var/lib/lamsonfilter/state.db or postgresql://host/db.",
    )(f)


def queue_option(f: Any) -> Any:
    return click.option(
        "--queue", "queue", metavar="DIR", default=None, envvar="LAMSONFILTER_QUEUE",
        help="The queue ctx.defer() writes into, the one lamsonfilter deq works through (overrides "
             "QUEUE; env LAMSONFILTER_QUEUE).",
    )(f)


def fail(message: str) -> None:
    click.echo(f"lamsonfilter: {message}", err=True)
    sys.exit(2)


def load(app_dir: Path, overrides: dict[str, Any], storage: StateStorage | None = None) -> App:
    from ..settings import load_app

    try:
        return load_app(app_dir, overrides, storage=storage)
    except StartupError as exc:
        fail(str(exc))
    except StorageError as exc:
        fail(str(exc))
    raise AssertionError("unreachable")


def open_database(app_dir: Path | None, database: str | None) -> StateStorage:
    """An existing state database with its schema, for the commands that look at it: `database`
    (a URL), else the application's ``DATABASE_URL``; never created here.  Exits 2 with one
    line when there is none (a SQLite file not there, ``memory:``, no schema, unreachable)."""
    from ..settings import load_settings, make_storage, sqlite_path

    base: str | None = None
    if app_dir is not None:
        try:
            settings = load_settings(app_dir, {"DATABASE_URL": database})
        except StartupError as exc:
            fail(str(exc))
            raise
        database, base = settings["DATABASE_URL"], settings["APP_DIR"]
    if not database:
        fail("say which state database: --database URL (env LAMSONFILTER_DATABASE) "
             "or --app DIR (its DATABASE_URL)")
        raise AssertionError("unreachable")
    if database in ("memory:", "memory://"):
        fail("DATABASE_URL is memory:, which keeps state inside one process only; give --database URL")
    path = sqlite_path(database, base or Path.cwd())
    if path is not None and not path.exists():
        fail(f"the state database {path} does not exist yet (no state at all); "
             f"lamsonfilter db init --app {app_dir or 'DIR'} creates it")
    try:
        storage = make_storage(database, base)
        storage.check_schema()
    except StorageError as exc:
        fail(with_app_dir(str(exc), app_dir) if app_dir is not None else str(exc))
        raise
    return storage


def with_app_dir(text: str, app_dir: Path) -> str:
    """A storage message's ``--app DIR`` hint with the real directory in it."""
    return text.replace("--app DIR", f"--app {app_dir}")



def refuse_unwritable_database(app_dir: Path, database: str | None) -> None:
    """Exit 2 with one line when this process cannot write its SQLite state database."""
    from ..settings import load_settings
    from ..statefile import daemon_write_problem

    try:
        settings = load_settings(app_dir, {"DATABASE_URL": database})
    except StartupError:
        return  # the daemon's own start reports it
    problem = daemon_write_problem(settings)
    if problem:
        fail(problem)


def safe_url(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 -- only for display
        return url

