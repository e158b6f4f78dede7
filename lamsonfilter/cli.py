"""The ``lamsonfilter`` command.

    lamsonfilter test --app DIR [FILE|MAILDIR ...]   dry run: what would the app do?
    lamsonfilter routes --app DIR [--test ADDRESS]   the routes, and who gets ADDRESS
    lamsonfilter gen NAME                            a new application skeleton
    lamsonfilter db init --app DIR                   create the state schema
    lamsonfilter state list|show --app DIR ...       the state of keys (lamsonfilter.statecmd)

Every command that loads an application refuses bad configuration at once,
with a message naming the file and setting, and exits with status 2.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import click

from . import __version__
from .app import App, StartupError
from .mail import AddressError, MailRequest
from .state import MemoryStorage, SchemaMissingError, StateStorage, StorageError

__all__ = ["main"]

APP_HELP = "Application directory (with config/settings.py). Default: $LAMSONFILTER_APP or the current directory."


def _app_option(f: Any) -> Any:
    return click.option(
        "--app", "app_dir", type=click.Path(file_okay=False, path_type=Path),
        envvar="LAMSONFILTER_APP", default=".", show_default=False, help=APP_HELP,
    )(f)


def _database_option(f: Any) -> Any:
    return click.option(
        "--database", "database", metavar="URL", default=None, envvar="LAMSONFILTER_DATABASE",
        help="State database URL (overrides DATABASE_URL; env LAMSONFILTER_DATABASE), "
             "e.g. sqlite:////var/lib/lamsonfilter/state.db or postgresql://host/db.",
    )(f)


def _fail(message: str) -> None:
    click.echo(f"lamsonfilter: {message}", err=True)
    sys.exit(2)


def _load(app_dir: Path, overrides: dict[str, Any], storage: StateStorage | None = None) -> App:
    from .settings import load_app

    try:
        return load_app(app_dir, overrides, storage=storage)
    except StartupError as exc:
        _fail(str(exc))
    except StorageError as exc:
        _fail(str(exc))
    raise AssertionError("unreachable")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lamsonfilter")
@click.option("-v", "--verbose", count=True, help="Log more (repeat for debug).")
def main(verbose: int) -> None:
    """Run a Lamson-style mail application behind Postfix or Exim.

    Try an application with no server at all:

        lamsonfilter test --app examples/mailinglist < message.eml
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="lamsonfilter: %(levelname)s %(message)s")


# ---------------------------------------------------------------- test (dry run)
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
    from .settings import load_settings, make_storage, sqlite_path

    try:
        settings = load_settings(app_dir, overrides)
    except StartupError as exc:
        _fail(str(exc))
        raise
    url = settings["DATABASE_URL"]
    path = sqlite_path(url, settings["APP_DIR"])
    if path is not None and not path.exists():
        if commit:
            _fail(f"--commit: the state database {path} does not exist; run: lamsonfilter db init --app {app_dir}")
        return MemoryStorage(), f"state database {path} does not exist yet: starting from empty state"
    try:
        storage = make_storage(url, settings["APP_DIR"])
        storage.check_schema()
    except SchemaMissingError as exc:
        if commit:
            _fail(_with_app_dir(str(exc), app_dir))
        return MemoryStorage(), f"{_with_app_dir(str(exc), app_dir)}; using empty state"
    except StorageError as exc:
        _fail(str(exc))
        raise
    return storage, None


def _with_app_dir(text: str, app_dir: Path) -> str:
    """A storage message's ``--app DIR`` hint with the real directory in it."""
    return text.replace("--app DIR", f"--app {app_dir}")


@main.command("test")
@_app_option
@click.argument("messages", nargs=-1, type=click.Path(path_type=Path, allow_dash=True))
@click.option("--sender", help="Envelope sender (MAIL FROM). Default: Return-Path, else From. Use '' for <>.")
@click.option("--rcpt", multiple=True, help="Envelope recipient (RCPT TO); repeat for several. Default: To, Cc, Bcc.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per message, for scripts.")
@click.option("--commit", is_flag=True,
              help="Commit the state changes (default: read state, change nothing).  The outbox is never "
                   "stored, so no daemon on this database will ever send it.")
@click.option("--quiet", "-q", is_flag=True, help="Only the summary (and errors).")
@_database_option
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
    from .diagnostics import Trace
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
            _fail(why_not)
    if sender is not None and (why_not := check_address(sender, "--sender", allow_null=True)):
        _fail(why_not)
    try:
        sources = list_sources(messages)
    except DryRunInputError as exc:
        _fail(str(exc))
        return
    overrides = {"DATABASE_URL": database}
    storage, note = _dry_run_storage(app_dir, overrides, commit)
    app = _load(app_dir, overrides, storage=storage)
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


# ---------------------------------------------------------------- routes
@main.command("routes")
@_app_option
@click.option("--test", "address", metavar="ADDRESS", help="Show which route and handler get ADDRESS.")
def routes_cmd(app_dir: Path, address: str | None) -> None:
    """List the routes in the order they are tried (the first match wins)."""
    app = _load(app_dir, {}, storage=MemoryStorage())
    if address is None:
        width = max((len(r.name) for r in app.router), default=0)
        for i, route in enumerate(app.router, 1):
            caps = "  ".join(f"{n}={rx}" for n, rx in route.captures)
            click.echo(f"{i:3}  {route.name:<{width}}  {route.pattern}    {caps}")
        click.echo(f"hosts: {', '.join(sorted(app.hosts)) or '(none)'}")
        return
    from .mail import normalize_address

    try:
        addr = normalize_address(address)
    except AddressError as exc:
        _fail(f"{address!r}: {exc}")
        return
    found = app.router.matches(addr)
    if not found:
        if app.owns(addr):
            click.echo(f"{addr}: no route; at an application host, so refused at RCPT with 550 5.1.1")
        else:
            click.echo(f"{addr}: no route; not at an application host, so passed on untouched")
        sys.exit(1)
    first = found[0]
    target = first.route.target
    click.echo(f"{addr}: route {first.route.name}  ({first.route.pattern})")
    click.echo(f"  handler: {target.handler.name}, event {target.event}")
    for k, v in first.args.items():
        click.echo(f"  {k} = {v}")
    for other in found[1:]:
        click.echo(f"  also matches (not used): {other.route.name}  ({other.route.pattern})")


# ---------------------------------------------------------------- gen
@main.command("gen")
@click.argument("name")
@click.option("--dest", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to create the application (default: ./NAME).")
@click.option("--host", default=None, help="The domain the application owns (default: NAME.example.org).")
def gen_cmd(name: str, dest: Path | None, host: str | None) -> None:
    """Create a new application skeleton whose own tests pass out of the box."""
    import re

    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        _fail(f"{name!r}: an application name is lower-case letters, digits and _ (a Python module name)")
    target = dest or Path(name)
    if target.exists() and any(target.iterdir()):
        _fail(f"{target} exists and is not empty; choose another --dest")
    host = host or f"{name.replace('_', '-')}.example.org"
    skeleton = Path(__file__).parent / "skeleton"
    for src in sorted(skeleton.rglob("*")):
        if "__pycache__" in src.parts:
            continue
        rel = src.relative_to(skeleton)
        out = target / str(rel).replace("NAME", name)
        if src.is_dir():
            out.mkdir(parents=True, exist_ok=True)
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        text = src.read_text(encoding="utf-8")
        out.write_text(text.replace("{{NAME}}", name).replace("{{HOST}}", host), encoding="utf-8")
    click.echo(f"created {target}/")
    click.echo(f"  try it:    lamsonfilter test --app {target} --rcpt hello@{host} < some-message.eml")
    click.echo(f"  its tests: python -m pytest {target}/tests")
    click.echo(f"  demo:      lamsonfilter demo --app {target}   (as root: behind a private Postfix on loopback)")


# ---------------------------------------------------------------- db
@main.group("db")
def db_cmd() -> None:
    """Manage the state database."""


@db_cmd.command("init")
@_app_option
@_database_option
@click.option("--owner", metavar="USER", default=None,
              help="Give the SQLite file (and its -wal/-shm files) to USER, the user the daemons run as: "
                   "for db init run as root, e.g. --owner lamsonfilter.")
def db_init(app_dir: Path, database: str | None, owner: str | None) -> None:
    """Create (or upgrade) the state schema in the application's database.

    The database is the one the daemons use with the same --app and
    --database (or $LAMSONFILTER_DATABASE, which the systemd units set):
    give the same URL here.  A relative sqlite:/// path lies inside the
    application directory; the absolute path is printed.
    """
    import os
    import pwd

    from .settings import load_settings, make_storage, resolve_database_url, sqlite_path
    from .statefile import chown_database, write_problem

    if owner is not None:
        try:
            pwd.getpwnam(owner)
        except KeyError:
            _fail(f"--owner {owner}: no such user")
    try:
        settings = load_settings(app_dir, {"DATABASE_URL": database})
        url = resolve_database_url(settings["DATABASE_URL"], settings["APP_DIR"])
        path = sqlite_path(url, settings["APP_DIR"])
        storage = make_storage(url, settings["APP_DIR"])
        storage.create_schema()
        storage.check_schema()
    except (StartupError, StorageError) as exc:
        _fail(str(exc))
        return
    storage.close()
    if path is None:
        click.echo(f"state schema ready in {_safe_url(url)}")
        return
    if owner is not None:
        chown_database(path, owner)
    click.echo(f"state schema ready in {path} ({url})")
    problem = write_problem(path, owner) if owner is not None else None
    if problem:
        click.echo(f"lamsonfilter: warning: {problem}", err=True)
    elif owner is None and os.geteuid() == 0 and path.stat().st_uid == 0:
        click.echo(f"lamsonfilter: warning: {path} belongs to root, so a daemon running as another user "
                   "(the units' lamsonfilter) cannot write it: run db init with --owner USER "
                   "(e.g. --owner lamsonfilter), or as that user", err=True)


# ---------------------------------------------------------------- check
@main.command("check")
@_app_option
@click.option("--postfix-config", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also check the Postfix set-up in this directory (e.g. /etc/postfix), read with postconf.")
@click.option("--milter-socket", default=None, metavar="SPEC", envvar="LAMSONFILTER_MILTER_SOCKET",
              help="The socket `lamsonfilter milter` listens on, to check smtpd_milters against it.")
@click.option("--max-size", type=int, default=None, metavar="BYTES", envvar="LAMSONFILTER_MAX_SIZE",
              help="The SIZE `lamsonfilter smtpproxy --max-size` announces, to check it against "
                   "Postfix's message_size_limit.")
@click.option("--relay", metavar="HOST:PORT", default=None, envvar="LAMSONFILTER_RELAY",
              help="The outbox/reinjection listener (overrides RELAY), to find it in master.cf.")
@click.option("--user", "service_user", default=None, metavar="USER",
              help="The user the daemons run as, to check that it can write the state database.  "
                   "Default: this user; as root, the owner of the database's directory.")
@_database_option
def check_cmd(app_dir: Path, postfix_config: Path | None, milter_socket: str | None, max_size: int | None,
              relay: str | None, service_user: str | None, database: str | None) -> None:
    """Find problems in the application and the Postfix set-up.

    Each finding has a stable ID (APP... application, PF... Postfix), what
    is wrong and how to fix it.  Exit status 1 when there is an error, 0
    when there are only warnings or nothing.
    """
    from .check import Finding, app001, check_app, check_postfix
    from .settings import load_app, load_settings

    findings: list[Finding] = []
    settings: dict[str, Any] = {}
    try:
        settings = load_settings(app_dir, {"DATABASE_URL": database, "RELAY": relay})
        # before anything opens the database: SQLite would replace a stale -wal file as this user
        findings.extend(_writable_finding(settings, service_user))
        app = load_app(app_dir, {"DATABASE_URL": database, "RELAY": relay})
    except StorageError as exc:  # before StartupError: a missing database file is both
        findings.append(_storage_finding(exc, app_dir, database))
    except StartupError as exc:
        findings.append(app001(str(exc)))
    else:
        findings.extend(check_app(app))
        try:
            app.storage.check_schema()
        except StorageError as exc:
            findings.append(_storage_finding(exc, app_dir, database))
    if postfix_config is not None:
        findings.extend(check_postfix(postfix_config, settings, milter_socket, max_size))
    for f in findings:
        click.echo(str(f))
    errors = sum(f.severity == "error" for f in findings)
    click.echo(f"{errors} error(s), {len(findings) - errors} warning(s)")
    sys.exit(1 if errors else 0)


def _writable_finding(settings: dict[str, Any], user: str | None) -> list[Any]:
    from .statefile import writable_finding

    return writable_finding(settings, user)


def _refuse_unwritable_database(app_dir: Path, database: str | None) -> None:
    """Exit 2 with one line when this process cannot write its SQLite state database."""
    from .settings import load_settings
    from .statefile import daemon_write_problem

    try:
        settings = load_settings(app_dir, {"DATABASE_URL": database})
    except StartupError:
        return  # the daemon's own start reports it
    problem = daemon_write_problem(settings)
    if problem:
        _fail(problem)


def _storage_finding(exc: StorageError, app_dir: Path, database: str | None = None) -> Any:
    """APP010: no schema yet (run db init), or the database cannot be reached at all (say why)."""
    from .check import Finding

    if isinstance(exc, SchemaMissingError):
        return Finding("APP010", "error", _with_app_dir(str(exc), app_dir),
                       f"run: lamsonfilter db init --app {app_dir}"
                       + (f" --database {_safe_url(database)}" if database else ""))
    return Finding("APP010", "error", f"cannot connect to the state database: {exc}",
                   "start the database server, or correct DATABASE_URL (or --database)")


# ---------------------------------------------------------------- demo
@main.command("demo")
@click.option("--app", "app_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The application to run.  Default: the example mailing list of this checkout "
                   "(examples/mailinglist), whatever the current directory.")
@click.option("--mode", type=click.Choice(["milter", "content-filter"]), default="milter", show_default=True,
              help="Where lamsonfilter sits: in Postfix's SMTP session, or after its queue.")
@click.option("--port", type=int, default=2525, show_default=True, help="Loopback port Postfix listens on.")
@click.option("--dir", "workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Work directory: Postfix's configuration and queue, the state database, the mailboxes, "
                   "the quarantine.  Default: a new /tmp/lamsonfilter-demo-XXXXXX for each run.  What an "
                   "earlier run left there is removed first, and the demo's files at exit (then DIR itself, "
                   "if nothing else is in it).")
@click.option("--keep", is_flag=True,
              help="Keep the work directory at exit (to read the mail and logs); with --dir, also start "
                   "from what an earlier run left there.")
@click.option("--stop", "stop_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              metavar="DIR", help="Stop what a demo killed with SIGKILL left running in work directory DIR "
                                  "(from DIR/demo.json), remove DIR unless --keep, and exit.")
def demo_cmd(app_dir: Path | None, mode: str, port: int, workdir: Path | None, keep: bool,
             stop_dir: Path | None) -> None:
    """Run an application behind a private Postfix on loopback, to try it by hand.

    Postfix delivers mail for example.com, example.net and example.org into
    one Maildir, DIR/mail/inbox; send mail with swaks or `lamsonfilter send`
    and watch the replies arrive.  The banner shows the application's
    routes and what to try (the application's demo.txt, if it has one).
    Ctrl-C, SIGTERM or closing the terminal stops everything it started and
    removes the work directory (unless --keep).  Needs root and Debian's
    postfix package (make run sets them up).
    """
    from .demo import Demo, DemoError, stop_leftovers

    try:
        if stop_dir is not None:
            for line in stop_leftovers(stop_dir, keep=keep):
                click.echo(line)
            return
        if app_dir is None:
            app_dir = Path(__file__).resolve().parents[1] / "examples" / "mailinglist"
        demo = Demo(app_dir, workdir, mode, port, echo=lambda text: click.echo(text), keep=keep)
        if not demo.run_until_interrupted():
            sys.exit(1)  # lamsonfilter exited on its own; the demo said where its log is
    except DemoError as exc:
        _fail(str(exc))


# ---------------------------------------------------------------- graph
@main.command("graph")
@_app_option
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write to this file: .dot as text, .svg/.png/.pdf rendered with Graphviz. Default: DOT on stdout.")
def graph_cmd(app_dir: Path, output: Path | None) -> None:
    """Draw each handler's state machine (Graphviz DOT; SVG or PNG when `dot` is installed).

    States are nodes, transitions read from the code are edges, routes
    enter as dashed edges labelled with their events.
    """
    from .graph import GraphError, render, to_dot

    app = _load(app_dir, {}, storage=MemoryStorage())
    dot = to_dot(app.handlers)
    if output is None:
        click.echo(dot, nl=False)
        return
    try:
        render(dot, output)
    except GraphError as exc:
        _fail(str(exc))
    click.echo(f"wrote {output}")


# ---------------------------------------------------------------- send
@main.command("send")
@click.option("--server", default="127.0.0.1:25", show_default=True, help="SMTP server HOST:PORT.")
@click.option("--from", "sender", required=True, help="Envelope sender (MAIL FROM); '' for <>.")
@click.option("--to", "rcpts", required=True, multiple=True, help="Envelope recipient; repeat for several.")
@click.option("--subject", default="test", show_default=True)
@click.option("--body", default="Hello from lamsonfilter send.\n", help="Body text (ignored with --file).")
@click.option("--file", "file_", type=click.File("rb"), default=None, help="Send this message file as is ('-' for stdin).")
@click.option("--trace", is_flag=True, help="Show the SMTP dialogue.")
def send_cmd(server: str, sender: str, rcpts: tuple[str, ...], subject: str, body: str,
             file_: Any, trace: bool) -> None:
    """Send one message over SMTP, for trying a set-up by hand (like swaks).

        lamsonfilter send --server 127.0.0.1:2525 --from alice@example.com \\
            --to python-subscribe@lists.example.org --trace
    """
    import smtplib

    from .settings import parse_hostport
    from .testing import make_message

    try:
        host, port = parse_hostport(server)
    except ValueError as exc:
        _fail(f"--server {exc}")
        return
    raw = file_.read() if file_ is not None else make_message(sender, rcpts, subject, body)
    try:
        with smtplib.SMTP(host, port, timeout=60) as smtp:
            smtp.set_debuglevel(1 if trace else 0)
            refused = smtp.sendmail(sender, list(rcpts), raw)
    except smtplib.SMTPRecipientsRefused as exc:
        for rcpt, (code, msg) in exc.recipients.items():
            click.echo(f"refused {rcpt}: {code} {msg.decode('utf-8', 'replace')}", err=True)
        sys.exit(1)
    except smtplib.SMTPResponseException as exc:
        err = exc.smtp_error
        click.echo(f"refused: {exc.smtp_code} {err.decode('utf-8', 'replace') if isinstance(err, bytes) else err}", err=True)
        sys.exit(1)
    except (smtplib.SMTPException, OSError) as exc:
        click.echo(f"cannot send through {server}: {exc}", err=True)
        sys.exit(1)
    for rcpt, (code, msg) in refused.items():
        click.echo(f"refused {rcpt}: {code} {msg.decode('utf-8', 'replace')}", err=True)
    accepted = [r for r in rcpts if r not in refused]
    click.echo(f"accepted for {len(accepted)} recipient(s) by {host}:{port}")
    sys.exit(1 if refused else 0)


# ---------------------------------------------------------------- milter
@main.command("milter")
@_app_option
@click.option("--socket", "socket_spec", metavar="SPEC", envvar="LAMSONFILTER_MILTER_SOCKET",
              default="unix:/run/lamsonfilter/milter.sock", show_default=True,
              help="Where Postfix connects: unix:/path (made 0660, group --socket-group) or "
                   "inet:PORT@HOST (loopback only unless --allow-remote).")
@click.option("--relay", metavar="HOST:PORT", default=None, envvar="LAMSONFILTER_RELAY",
              help="Where the outbox goes (overrides RELAY): an smtpd that runs no milters, e.g. 127.0.0.1:10026.  "
                   "Env LAMSONFILTER_RELAY.")
@_database_option
@click.option("--allow-remote", is_flag=True, help="Allow an inet socket on a non-loopback address.")
@click.option("--socket-group", default="postfix", show_default=True, metavar="GROUP",
              help="Group that may connect to a unix socket (Postfix's smtpd runs as user postfix).")
@click.option("--no-tcp-nodelay", "no_nodelay", is_flag=True, hidden=True,
              help="Diagnostics only: leave Nagle on for inet sockets (bench/milter_bench.sh shows the cost).")
@click.option("--postfix-config", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="DIR",
              envvar="LAMSONFILTER_POSTFIX_CONFIG",
              help="Postfix's configuration (e.g. /etc/postfix): the start-up line then gives the exact "
                   "smtpd_milters value for its smtpd (chrooted or not).  Env LAMSONFILTER_POSTFIX_CONFIG.")
def milter_cmd(app_dir: Path, socket_spec: str, relay: str | None, database: str | None,
               allow_remote: bool, socket_group: str, no_nodelay: bool, postfix_config: Path | None) -> None:
    """Run the application as a Postfix milter (pre-queue).

    Postfix keeps the SMTP session; lamsonfilter refuses unroutable
    addresses at RCPT (550 5.1.1), runs the application at the end of
    each message and answers with milter actions.  Any internal error
    answers 451 4.3.0.  In Postfix's main.cf (see conf/postfix/main.cf.milter):

        smtpd_milters = { unix:/run/lamsonfilter/milter.sock, default_action=tempfail }

    (a chrooted smtpd, as Debian ships it, names a socket below
    /var/spool/postfix relative to that directory: the start-up line says
    which value to write).  SIGTERM or SIGINT stop it cleanly (the outbox is flushed first); SIGHUP
    reloads the application.  Bad configuration exits with status 2.
    """
    from .daemon.endpoint import EndpointError, parse_milter_socket
    from .daemon.service import Service, setup_logging

    setup_logging(click.get_current_context().find_root().params.get("verbose", 0))
    try:
        endpoint = parse_milter_socket(socket_spec, allow_remote=allow_remote)
    except EndpointError as exc:
        _fail(str(exc))
        return
    try:
        from . import milter as milter_mode
    except ImportError as exc:
        _fail(f"milter mode needs pymilter ({exc}); install it from the clone: pip install '/path/to/clone[milter]'")
        return
    from .check_milter import smtpd_milters_value
    from .daemon.runtime import Runtime

    _refuse_unwritable_database(app_dir, database)
    try:
        runtime = Runtime.from_directory(app_dir, {"RELAY": relay, "DATABASE_URL": database})
    except (StartupError, StorageError) as exc:
        _fail(str(exc))
        return
    try:
        status = milter_mode.serve(runtime, endpoint, service=Service(), socket_group=socket_group or None,
                                   tcp_nodelay=not no_nodelay,
                                   postfix_value=smtpd_milters_value(endpoint, postfix_config))
    except milter_mode.MilterStartError as exc:
        why = _listen_problem(endpoint)
        _fail(f"cannot listen: {exc}" + (f" ({why})" if why else ""))
        return
    except OSError as exc:
        _fail(f"cannot listen on {endpoint}: {exc.strerror or exc}"
              + (f": {exc.filename}" if getattr(exc, "filename", None) else ""))
        return
    sys.exit(status)


def _listen_problem(endpoint: Any) -> str | None:
    """Why a milter socket cannot be opened, found by trying (libmilter says only "cannot opensocket")."""
    import errno
    import os
    import socket
    import stat

    if endpoint.kind == "unix":
        path = Path(endpoint.path)
        if not path.parent.is_dir():
            return f"directory {path.parent} does not exist"
        if not os.access(path.parent, os.W_OK | os.X_OK):
            return f"no permission to create a socket in {path.parent}"
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            return None
        except OSError as exc:
            return f"{path}: {exc.strerror}"
        if not stat.S_ISSOCK(mode):
            return f"{path} exists and is not a socket"
        return None
    family = socket.AF_INET6 if endpoint.kind == "inet6" else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as libmilter does
        try:
            probe.bind((endpoint.host, endpoint.port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"address already in use: another process listens on {endpoint.host} port {endpoint.port}"
            return f"{endpoint.host} port {endpoint.port}: {exc.strerror or exc}"
    return None


def _safe_url(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 -- only for display
        return url


# ---------------------------------------------------------------- smtpproxy (content filter)
def _hostport_option(value: str, flag: str) -> tuple[str, int]:
    from .settings import parse_hostport

    try:
        return parse_hostport(value)
    except ValueError as exc:
        _fail(f"{flag} {exc}")
        raise


@main.command("smtpproxy")
@_app_option
@click.option("--listen", default="127.0.0.1:10025", show_default=True, metavar="HOST:PORT",
              help="Where Postfix's content_filter transport delivers (loopback unless --allow-remote).")
@click.option("--reinject", default="127.0.0.1:10026", show_default=True, metavar="HOST:PORT",
              help="The MTA's reinjection listener (no content_filter there); the outbox goes here too.")
@click.option("--lmtp", is_flag=True, help="Speak LMTP: one reply per recipient after DATA.")
@click.option("--workers", type=int, default=1, show_default=True,
              help="Processes sharing the port (SO_REUSEPORT) when one CPU is not enough.")
@_database_option
@click.option("--allow-remote", is_flag=True, help="Allow --listen on a non-loopback address.")
@click.option("--max-size", type=int, default=10_240_000, show_default=True, metavar="BYTES",
              help="SIZE announced to Postfix: at least its message_size_limit.")
@click.option("--deadline", type=float, default=120.0, show_default=True, metavar="SECONDS",
              help="Per-message limit for processing and reinjection; then 451 (Postfix waits 600 s).")
@click.option("--quarantine", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Maildir for rejected-after-DATA and quarantined mail. Default: APP/var/quarantine.")
@click.option("--spool-dir", default=None, help="Directory for messages over 1 MiB (default: $TMPDIR).")
@click.option("--threads", type=int, default=8, show_default=True, help="Threads running the application.")
@click.option("--policy", default=None, metavar="HOST:PORT",
              help="Also answer Postfix's check_policy_service here: unknown app addresses refused before queueing.")
@click.option("--postfix-config", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="DIR",
              envvar="LAMSONFILTER_POSTFIX_CONFIG",
              help="Refuse to start when `lamsonfilter check` finds an error in this Postfix configuration "
                   "(e.g. a reinjection listener without -o content_filter=: a mail loop).  "
                   "Env LAMSONFILTER_POSTFIX_CONFIG.")
@click.pass_context
def smtpproxy_cmd(
    ctx: click.Context, app_dir: Path, listen: str, reinject: str, lmtp: bool, workers: int,
    database: str | None, allow_remote: bool, max_size: int, deadline: float, quarantine: Path | None,
    spool_dir: str | None, threads: int, policy: str | None, postfix_config: Path | None,
) -> None:
    """Run as Postfix's after-queue content filter (reinjecting to --reinject).

    Postfix: content_filter = lamsonfilter:[127.0.0.1]:10025 and a 10026
    smtpd without filtering (conf/postfix/*.content_filter).  The reply to
    Postfix's final dot is 250 only after the reinjection listener accepted
    the message; any failure is 451 4.3.0 and Postfix retries.  SIGHUP
    reloads the application.
    """
    try:
        from .smtpproxy import ProxyConfig, serve
    except ImportError as exc:
        _fail(f"smtpproxy needs aiosmtpd (from the clone: pip install '/path/to/clone[smtpproxy]'): {exc}")
        return
    from .daemon.service import setup_logging

    verbose = int((ctx.parent.params if ctx.parent else {}).get("verbose", 0))
    setup_logging(verbose)
    logging.getLogger("mail.log").setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)
    config = ProxyConfig(
        app_dir=app_dir, listen=_hostport_option(listen, "--listen"),
        reinject=_hostport_option(reinject, "--reinject"), lmtp=lmtp, workers=workers, database=database,
        allow_remote=allow_remote, max_size=max_size, deadline=deadline, quarantine=quarantine,
        spool_dir=spool_dir, threads=max(1, threads),
        policy=_hostport_option(policy, "--policy") if policy else None,
        postfix_config=postfix_config,
    )
    _refuse_unwritable_database(app_dir, database)
    try:
        sys.exit(serve(config))
    except (StartupError, StorageError) as exc:
        _fail(str(exc))


def _add_commands() -> None:
    """The command families that live in modules of their own."""
    from .cli_quarantine import quarantine_cmd
    from .statecmd import state_cmd

    main.add_command(state_cmd)
    main.add_command(quarantine_cmd)


_add_commands()


if __name__ == "__main__":  # pragma: no cover
    main()
