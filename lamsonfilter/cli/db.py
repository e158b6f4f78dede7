"""``lamsonfilter db``: the state database's schema, lamsonfilter's tables and the application's.

    lamsonfilter db init --app DIR [--owner USER]   create everything (or bring it up to date)
    lamsonfilter db upgrade --app DIR               both lines of migrations up to their newest
    lamsonfilter db status --app DIR                where each line is, and what to run
    lamsonfilter db revision --app DIR -m MSG       autogenerate the application's next revision
                                                    (--empty: one to write by hand)
    lamsonfilter db stamp --app DIR REVISION        record the application's tables as at REVISION

Two lines of Alembic revisions share the database (`lamsonfilter.store.migrate`):
lamsonfilter's own (shipped in the package) and the application's
(``APP_DIR/migrations/``, generated from ``app/models.py`` by ``db revision``).
``init`` and ``upgrade`` differ only in that ``upgrade`` wants the database to
exist already (a SQLite file is not created by a typo).  Every problem is one
line on standard error and exit status 2 (`lamsonfilter.cli.common.fail`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..app import StartupError
from ..state import StorageError
from .common import app_option, database_option, fail, safe_url, with_app_dir

__all__ = ["db_cmd"]


@click.group("db")
def db_cmd() -> None:
    """Create, upgrade and inspect the state database's schema (lamsonfilter's and the application's)."""


def _open(app_dir: Path, database: str | None, *, create: bool) -> tuple[Any, Any, str, Path | None]:
    """(storage, the app's models, the resolved URL, the SQLite file or None); exits 2 on a problem."""
    from ..models import load_models
    from ..settings import (
        load_settings,
        make_storage,
        resolve_database_url,
        sqlite_path,
    )
    from ..store.appschema import SQLAppSchema

    try:
        settings = load_settings(app_dir, {"DATABASE_URL": database})
        url = resolve_database_url(settings["DATABASE_URL"], settings["APP_DIR"])
        path = sqlite_path(url, settings["APP_DIR"])
        if url in ("memory:", "memory://"):
            fail("DATABASE_URL is memory:, which keeps state inside one process only: there is no "
                 "schema to manage; give --database URL")
        if path is not None and not create and not path.exists():
            fail(f"the state database {path} does not exist yet; run `lamsonfilter db init --app {app_dir}"
                 + (f" --database {url}`" if database else "`"))
        models = load_models(settings["APP_DIR"])
        storage = make_storage(url, settings["APP_DIR"])
    except (StartupError, StorageError) as exc:
        fail(with_app_dir(str(exc), app_dir))
        raise
    assert isinstance(storage, SQLAppSchema)
    return storage, models, url, path


def _upgrade(app_dir: Path, database: str | None, *, create: bool) -> tuple[str, Path | None, str]:
    storage, models, url, path = _open(app_dir, database, create=create)
    try:
        storage.create_schema()
        storage.check_schema()
        said = storage.upgrade_app(app_dir, models)
        storage.check_app_schema(app_dir, models)
    except StorageError as exc:
        fail(with_app_dir(str(exc), app_dir))
        raise
    finally:
        storage.close()
    return url, path, said


@db_cmd.command("init")
@app_option
@database_option
@click.option("--owner", metavar="USER", default=None,
              help="Give the SQLite file (and its -wal/-shm files) to USER, the user the daemons run as: "
                   "for db init run as root, e.g. --owner lamsonfilter.")
def db_init(app_dir: Path, database: str | None, owner: str | None) -> None:
    """Create the schema in the application's database, or bring it up to date.

    lamsonfilter's tables and the application's (its migrations in
    APP_DIR/migrations, or its models when it has none yet).  The database
    is the one the daemons use with the same --app and --database (or
    $LAMSONFILTER_DATABASE, which the systemd units set): give the same URL
    here.  A relative sqlite:/// path lies inside the application
    directory; the absolute path is printed.
    """
    import os
    import pwd

    from ..statefile import chown_database, write_problem

    if owner is not None:
        try:
            pwd.getpwnam(owner)
        except KeyError:
            fail(f"--owner {owner}: no such user")
    url, path, said = _upgrade(app_dir, database, create=True)
    if path is None:
        click.echo(f"state schema ready in {safe_url(url)}")
        click.echo(f"  {said}")
        return
    if owner is not None:
        chown_database(path, owner)
    click.echo(f"state schema ready in {path} ({url})")
    click.echo(f"  {said}")
    problem = write_problem(path, owner) if owner is not None else None
    if problem:
        click.echo(f"lamsonfilter: warning: {problem}", err=True)
    elif owner is None and os.geteuid() == 0 and path.stat().st_uid == 0:
        click.echo(f"lamsonfilter: warning: {path} belongs to root, so a daemon running as another user "
                   "(the units' lamsonfilter) cannot write it: run db init with --owner USER "
                   "(e.g. --owner lamsonfilter), or as that user", err=True)


@db_cmd.command("upgrade")
@app_option
@database_option
def db_upgrade(app_dir: Path, database: str | None) -> None:
    """Upgrade lamsonfilter's tables and the application's to their newest revisions.

    Run it after installing a newer lamsonfilter or deploying the
    application's new migrations, before starting the daemons (they refuse
    a database behind).  A database made before lamsonfilter used Alembic
    (schema version 1 to 3) is upgraded in place, keeping every row.
    """
    url, path, said = _upgrade(app_dir, database, create=False)
    click.echo(f"state schema up to date in {path or safe_url(url)}")
    click.echo(f"  {said}")


@db_cmd.command("status")
@app_option
@database_option
def db_status(app_dir: Path, database: str | None) -> None:
    """Show which revision each line of migrations is at, and what to run.

    Also says when app/models.py has changed since the application's newest
    migration (run db revision).  Exit status 0 when both are up to date, 1
    when one is not.
    """
    import sys

    storage, models, url, path = _open(app_dir, database, create=False)
    problems = 0
    try:
        click.echo(f"database: {path or safe_url(url)}")
        for name, revisions, check in (
            ("lamsonfilter", storage.framework_revisions, storage.check_schema),
            ("application", lambda: storage.app_revisions(app_dir, models),
             lambda: storage.check_app_schema(app_dir, models)),
        ):
            have: tuple[str, ...] | None = None
            want: tuple[str, ...] = ()
            try:
                have, want = revisions()
                check()
            except StorageError as exc:
                problems += 1
                verdict = with_app_dir(str(exc), app_dir)
            else:
                verdict = "up to date"
                changes = storage.app_model_changes(app_dir, models) if name == "application" and want else []
                if changes:  # the models changed since the newest migration: deploying it would not do
                    problems += 1
                    verdict = (f"app/models.py differs from these tables ({'; '.join(changes)}): run "
                               f"`lamsonfilter db revision --app {app_dir} -m \"what changed\"`, then db upgrade")
            if have is None:  # the revisions could not be read: the verdict says why
                click.echo(f"{name}: {verdict}")
                continue
            if name == "application" and not want:
                where = "no migrations" + (f", models: {len(models.tables)} table(s)" if models else ", no models")
            else:
                where = f"at {', '.join(have) or '(none)'}, newest {', '.join(want) or '(none)'}"
            click.echo(f"{name}: {where}: {verdict}")
    finally:
        storage.close()
    sys.exit(1 if problems else 0)


@db_cmd.command("revision")
@app_option
@database_option
@click.option("-m", "--message", required=True, help="What the revision does (its file name and docstring).")
@click.option("--empty", is_flag=True,
              help="An empty revision to write by hand (a data migration): nothing compared.")
def db_revision(app_dir: Path, database: str | None, message: str, empty: bool) -> None:
    """Autogenerate the application's next migration from app/models.py.

    It compares the models with the database (which must be at the
    application's newest revision: run db upgrade first) and writes
    APP_DIR/migrations/NNNN_MESSAGE.py.  Only the tables the models name
    are compared; a dropped model needs a hand-written op.drop_table.
    Read the file before running db upgrade: autogenerate misses some
    changes (a renamed column looks like a drop and an add).  --empty
    writes a revision with empty upgrade() and downgrade() to fill in.
    """
    storage, models, url, path = _open(app_dir, database, create=True)
    if models is None and not empty:
        storage.close()
        fail(f"{app_dir} has no app/models.py: there are no models to generate a migration from "
             "(declare them on `class Base(DeclarativeBase)`)")
    try:
        storage.create_schema()
        made = storage.app_revision(app_dir, models, message, autogenerate=not empty)
    except StorageError as exc:
        fail(with_app_dir(str(exc), app_dir))
        raise
    finally:
        storage.close()
    click.echo(f"wrote {made}")
    click.echo(f"  read it, then: lamsonfilter db upgrade --app {app_dir}")


@db_cmd.command("stamp")
@app_option
@database_option
@click.argument("revision")
def db_stamp(app_dir: Path, database: str | None, revision: str) -> None:
    """Record the application's tables as at REVISION, without running anything.

    For tables db init made from the models before the application had
    migrations: once they match REVISION (usually the first), stamp it and
    db upgrade runs the revisions after it.
    """
    storage, models, url, path = _open(app_dir, database, create=False)
    try:
        storage.stamp_app(app_dir, models, revision)
    except StorageError as exc:
        fail(with_app_dir(str(exc), app_dir))
        raise
    finally:
        storage.close()
    click.echo(f"application tables recorded at revision {revision}")
