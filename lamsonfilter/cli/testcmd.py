"""``lamsonfilter test``: the dry run, the third way to run an application.

It reads messages (`lamsonfilter.cli.dryrun`), runs the application on
each as a daemon would, with the real state read but not committed (unless
``--commit``), and prints the report; nothing is ever sent.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import click

from ..app import StartupError
from ..mail import AddressError, MailRequest
from ..state import SchemaMissingError, StateStorage, StorageError
from .common import app_option, database_option, fail, load, with_app_dir

__all__ = ["test_cmd"]


#: A header field at the start of a message (RFC 5322 §2.2: printable ASCII but ':' in the name).
_FIRST_FIELD = re.compile(rb"\A(?:From [^\r\n]*\r?\n)?[!-9;-~]+[ \t]*:")


def _not_a_message(raw: bytes) -> str | None:
    """Why `raw` cannot be a mail message at all, or None when it starts with a header block.

    Only input with no header block is refused.  NUL bytes, bare CR or LF, 8-bit
    header values and over-long lines are not reasons: Postfix accepts and passes on
    such mail, so the daemons get it, and the dry run shows what they would decide.
    """
    if not raw.strip():
        return "empty input"
    if not _FIRST_FIELD.match(raw):
        return "it does not start with a header field (such as 'From: ...')"
    return None


_RETURN_PATH = re.compile(rb"(?im)^return-path[ \t]*:")


def _dry_run_storage(app_dir: Path, overrides: dict[str, Any], commit: bool) -> tuple[StateStorage, str | None]:
    """The real state store when it exists (read, not committed), else empty memory state."""
    from ..dbschema import check_database
    from ..models import empty_storage, load_models
    from ..settings import load_settings, make_storage, sqlite_path

    try:
        settings = load_settings(app_dir, overrides)
    except StartupError as exc:
        fail(str(exc))
        raise
    url = settings["DATABASE_URL"]
    path = sqlite_path(url, settings["APP_DIR"])

    def empty() -> StateStorage:  # in-memory SQLite for an application with models
        try:
            return empty_storage(app_dir)
        except StartupError as exc:
            fail(str(exc))
            raise

    if path is not None and not path.exists():
        if commit:
            fail(f"--commit: the state database {path} does not exist; run: lamsonfilter db init --app {app_dir}")
        return empty(), f"state database {path} does not exist yet: starting from empty state"
    try:
        storage = make_storage(url, settings["APP_DIR"])
        check_database(storage, settings["APP_DIR"], load_models(settings["APP_DIR"]))
    except SchemaMissingError as exc:
        if commit:
            fail(with_app_dir(str(exc), app_dir))
        return empty(), f"{with_app_dir(str(exc), app_dir)}; using empty state"
    except StorageError as exc:
        fail(str(exc))
        raise
    return storage, None




@click.command("test")
@app_option
@click.argument("messages", nargs=-1, type=click.Path(path_type=Path, allow_dash=True))
@click.option("--sender", help="Envelope sender (MAIL FROM). Default: Return-Path, else From. Use '' for <>.")
@click.option("--rcpt", multiple=True, help="Envelope recipient (RCPT TO); repeat for several. Default: To, Cc, Bcc.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per message, for scripts.")
@click.option("--commit", is_flag=True,
              help="Commit the state changes and the rows of app/models.py (default: read state, change "
                   "nothing).  The outbox is never stored, so no daemon on this database will ever send it.")
@click.option("--quiet", "-q", is_flag=True, help="Only the summary (and errors).")
@database_option
def test_cmd(
    app_dir: Path, messages: tuple[Path, ...], sender: str | None, rcpt: tuple[str, ...],
    as_json: bool, commit: bool, quiet: bool, database: str | None,
) -> None:
    """Dry run: show what the application would do with each message.

    MESSAGES are files, directories of files, Maildirs or mbox files (one
    message per From_ line); with none, standard input.  For each
    recipient: the route, the state before and after, the outcome; then the
    decision as milter actions and as what the content filter would do,
    header changes as a diff, every state key the handlers wrote, and the
    rendered outbox.  A handler that failed is shown with its file and line
    (the traceback with lamsonfilter -v test).

    Nothing is ever sent.  Nothing is changed unless --commit is given;
    --commit commits the state only: the outbox is not stored, so a daemon
    started later on the same database sends none of it.

    Input that cannot be a mail message (empty, no header at the start) is
    refused, naming the file; NUL bytes, bare CR/LF, 8-bit headers and long
    lines are processed, as Postfix passes them on.  A message with no
    usable From (and no Return-Path) gets a warning, since its sender
    becomes <>.

    Exit status: 0 when every message was handled, 1 when a handler failed
    or a message could not be read, 2 for bad usage or configuration
    (including a directory with no messages and a --rcpt that is not an address).
    """
    from ..diagnostics import Trace
    from .dryrun import (
        STDIN_HINT,
        DryRunInputError,
        check_address,
        list_sources,
        read_messages,
        report,
        routes_of,
    )
    from .dryrun import as_json as json_of

    for value in rcpt:
        why_not = check_address(value, "--rcpt")
        if why_not:
            fail(why_not)
    if sender is not None and (why_not := check_address(sender, "--sender", allow_null=True)):
        fail(why_not)
    try:
        sources = list_sources(messages)
    except DryRunInputError as exc:
        fail(str(exc))
        return
    overrides = {"DATABASE_URL": database}
    storage, note = _dry_run_storage(app_dir, overrides, commit)
    app = load(app_dir, overrides, storage=storage)
    if note and not as_json:
        click.echo(f"note: {note}", err=True)
    if sources == [None] and sys.stdin.isatty():
        click.echo(f"lamsonfilter: {STDIN_HINT}", err=True)
    verbose = int(click.get_current_context().find_root().params.get("verbose") or 0)
    show_bar = len(sources) > 1 and not as_json and sys.stderr.isatty()
    kinds: Counter[str] = Counter()
    count = replies = errors = 0
    with click.progressbar(sources, label="messages", file=sys.stderr) if show_bar else _nullbar(sources) as bar:
        for source in bar:
            for name, raw in read_messages(source):
                count += 1
                if isinstance(raw, Exception):
                    errors += 1
                    _emit_error(name, f"cannot read: {raw}", as_json)
                    continue
                why = _not_a_message(raw)
                if why is not None:
                    errors += 1
                    _emit_error(name, f"not a mail message: {why}", as_json)
                    continue
                try:
                    request = MailRequest.from_bytes(
                        raw, sender=sender, recipients=rcpt or None,
                    )
                except AddressError as exc:
                    errors += 1
                    _emit_error(name, f"bad envelope address: {exc}", as_json)
                    continue
                if not request.recipients:
                    errors += 1
                    _emit_error(name, "no recipients: give --rcpt (the message has no To, Cc or Bcc)", as_json)
                    continue
                if sender is None and not request.sender and not _RETURN_PATH.search(request.header_block):
                    click.echo(f"lamsonfilter: warning: {name}: no usable From (and no Return-Path): "
                               "the sender is <>, as for a bounce; give --sender to choose one", err=True)
                trace = Trace()
                decision = app.process(request, commit=commit, outbox=False, trace=trace)
                kinds[decision.kind] += 1
                replies += len(decision.outbox)
                if decision.error:
                    errors += 1
                routes = routes_of(app, decision)
                if as_json:
                    click.echo(json.dumps(json_of(name, request, decision, routes, trace, commit), sort_keys=True))
                elif not quiet:
                    click.echo(report(count, name, request, decision, commit, routes, trace, verbose))
    if not as_json and count > 1 or quiet:
        summary = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) or "none"
        click.echo(
            f"summary: {count} message(s); decisions: {summary}; "
            f"outbox: {replies} message(s); errors: {errors}"
        )
    sys.exit(1 if errors else 0)


class _nullbar:
    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __enter__(self) -> list[Any]:
        return self.items

    def __exit__(self, *exc: object) -> None:
        return None


def _emit_error(name: str, text: str, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"file": name, "error": text}, sort_keys=True))
    else:
        click.echo(f"lamsonfilter: {name}: {text}", err=True)

