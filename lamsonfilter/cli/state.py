"""``lamsonfilter state``: look at the state an application keeps, key by key.

    lamsonfilter state list --app DIR [PREFIX]    keys (starting with PREFIX), their state and data
    lamsonfilter state show --app DIR KEY         one key
    ... --json                                    one JSON object per key, for scripts

A key is the handler's name and the parts of its key function, joined by
``:`` (``mailinglist:python:alice@example.com``); ``lamsonfilter test``
shows the keys a message writes.  The framework's own records live under
``lamsonfilter:`` (``lamsonfilter:rate:...``, the reply counters).

Both commands only read: they never lock a key or hold a transaction open,
so they are safe on the database of a running daemon.  A database that does
not exist yet, or has no schema, is an error (exit status 2, one line); a
key that has no state is not (``show`` says so and exits 1).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterator

import click

from ..state import StateRecord, StateStorage, StorageError

__all__ = ["state_cmd"]

#: Records read per query while listing.
PAGE = 500


def _fail(message: str) -> None:
    click.echo(f"lamsonfilter: {message}", err=True)
    sys.exit(2)


def _open(app_dir: Path, database: str | None) -> StateStorage:
    """The application's state database, read-only in spirit: never created here."""
    from .common import open_database

    return open_database(app_dir, database)


def _records(storage: StateStorage, prefix: str, limit: int | None) -> Iterator[tuple[str, StateRecord]]:
    """Every record whose key starts with `prefix`, in key order, `PAGE` at a time (at most `limit`)."""
    after, seen = "", 0
    while True:  # bounded: `after` moves forward through a finite key range
        page = storage.scan(prefix, after=after, limit=PAGE)
        for key, record in page:
            if limit is not None and seen >= limit:
                return
            seen += 1
            yield key, record
        if len(page) < PAGE:
            return
        after = page[-1][0]


def _as_json(key: str, record: StateRecord) -> dict[str, Any]:
    return {"key": key, "state": record.state, "data": dict(record.data)}


def _line(key: str, record: StateRecord) -> str:
    data = json.dumps(dict(record.data), sort_keys=True, default=str) if record.data else ""
    return f"{key}  {record.state}" + (f"  {data}" if data else "")


_app = click.option(
    "--app", "app_dir", type=click.Path(file_okay=False, path_type=Path), envvar="LAMSONFILTER_APP", default=".",
    help="Application directory (with config/settings.py). Default: $LAMSONFILTER_APP or the current directory.",
)
_database = click.option(
    "--database", "database", metavar="URL", default=None, envvar="LAMSONFILTER_DATABASE",
    help="State database URL (overrides DATABASE_URL; env LAMSONFILTER_DATABASE).",
)
_json = click.option("--json", "as_json", is_flag=True, help="One JSON object per key, for scripts.")


@click.group("state")
def state_cmd() -> None:
    """Look at the application's state: which key is in which state, with what data."""


@state_cmd.command("list")
@_app
@click.argument("prefix", default="")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Show at most this many keys.")
@_json
@_database
def list_cmd(app_dir: Path, prefix: str, limit: int | None, as_json: bool, database: str | None) -> None:
    """The keys starting with PREFIX (all keys without one), in order, with state and data.

        lamsonfilter state list --app examples/mailinglist mailinglist:python:
    """
    storage = _open(app_dir, database)
    try:
        count = 0
        for key, record in _records(storage, prefix, limit):
            count += 1
            click.echo(json.dumps(_as_json(key, record), sort_keys=True, default=str) if as_json
                       else _line(key, record))
    except StorageError as exc:
        _fail(str(exc))
    finally:
        storage.close()
    if not as_json:
        click.echo(f"{count} key(s)" + (f" starting with {prefix!r}" if prefix else ""), err=True)


@state_cmd.command("show")
@_app
@click.argument("key")
@_json
@_database
def show_cmd(app_dir: Path, key: str, as_json: bool, database: str | None) -> None:
    """The state and data of KEY (exit status 1 when it has none: it is in START).

        lamsonfilter state show --app examples/mailinglist mailinglist:python:alice@example.com
    """
    storage = _open(app_dir, database)
    try:
        found = [(k, r) for k, r in storage.scan(key, limit=1) if k == key]
    except StorageError as exc:
        _fail(str(exc))
        return
    finally:
        storage.close()
    if not found:
        if as_json:
            click.echo(json.dumps({"key": key, "state": None, "data": {}}, sort_keys=True))
        else:
            click.echo(f"{key}: no state (START)")
        sys.exit(1)
    k, record = found[0]
    if as_json:
        click.echo(json.dumps(_as_json(k, record), sort_keys=True, default=str))
        return
    click.echo(f"key:   {k}")
    click.echo(f"state: {record.state}")
    for name, value in sorted(record.data.items()):
        click.echo(f"  {name} = {json.dumps(value, default=str)}")
