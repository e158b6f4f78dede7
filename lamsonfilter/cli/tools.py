"""The tools: ``routes``, ``gen``, ``check``, ``graph``, ``send`` and ``demo`` (``db``: `lamsonfilter.cli.db`).

Each command that loads an application refuses bad configuration with one
line and exit status 2 (`lamsonfilter.cli.common.fail`).  ``demo`` runs the
development tools' private Postfix (`lamsonfilter.devtools.demo`, imported
only when the command runs).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import click

from ..app import StartupError
from ..mail import AddressError
from ..memorystore import MemoryStorage
from ..state import SchemaMissingError, StorageError
from .common import app_option, database_option, fail, load, safe_url, with_app_dir

__all__ = ["check_cmd", "demo_cmd", "gen_cmd", "graph_cmd", "routes_cmd", "send_cmd"]


# ---------------------------------------------------------------- routes
@click.command("routes")
@app_option
@click.option("--test", "address", metavar="ADDRESS", help="Show which route and handler get ADDRESS.")
def routes_cmd(app_dir: Path, address: str | None) -> None:
    """List the routes in the order they are tried (the first match wins)."""
    app = load(app_dir, {}, storage=MemoryStorage())
    if address is None:
        width = max((len(r.name) for r in app.router), default=0)
        for i, route in enumerate(app.router, 1):
            caps = "  ".join(f"{n}={rx}" for n, rx in route.captures)
            click.echo(f"{i:3}  {route.name:<{width}}  {route.pattern}    {caps}")
        click.echo(f"hosts: {', '.join(sorted(app.hosts)) or '(none)'}")
        return
    from ..mail import normalize_address

    try:
        addr = normalize_address(address)
    except AddressError as exc:
        fail(f"{address!r}: {exc}")
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
@click.command("gen")
@click.argument("name")
@click.option("--dest", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to create the application (default: ./NAME).")
@click.option("--host", default=None, help="The domain the application owns (default: NAME.example.org).")
@click.option("--models", is_flag=True,
              help="Also app/models.py (SQLAlchemy models of the application's own tables) and its first "
                   "migration in migrations/ (lamsonfilter db init applies it).")
def gen_cmd(name: str, dest: Path | None, host: str | None, models: bool) -> None:
    """Create a new application skeleton whose own tests pass out of the box."""
    import re

    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        fail(f"{name!r}: an application name is lower-case letters, digits and _ (a Python module name)")
    if models and (name == "lamsonfilter" or name.startswith("lamsonfilter_")):
        fail(f"{name!r}: with --models the tables are named after the application ({name}_greeting), "
             "and names starting with 'lamsonfilter_' are lamsonfilter's own; choose another name")
    target = dest or Path(name)
    if target.exists() and any(target.iterdir()):
        fail(f"{target} exists and is not empty; choose another --dest")
    host = host or f"{name.replace('_', '-')}.example.org"
    skeleton = Path(__file__).parents[1] / "skeleton"
    for src in sorted(skeleton.rglob("*")):
        if "__pycache__" in src.parts:
            continue
        rel = src.relative_to(skeleton)
        # --models: app/models.py, and FILE.models in place of FILE (the handler that writes a row)
        if not models and (rel == Path("app", "models.py") or rel.suffix == ".models"):
            continue
        if models and src.with_name(src.name + ".models").exists():
            continue
        rel = rel.with_suffix("") if rel.suffix == ".models" else rel
        out = target / str(rel).replace("NAME", name)
        if src.is_dir():
            out.mkdir(parents=True, exist_ok=True)
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        text = src.read_text(encoding="utf-8")
        out.write_text(text.replace("{{NAME}}", name).replace("{{HOST}}", host), encoding="utf-8")
    if models:
        try:
            _first_migration(target)
        except SystemExit:  # it said why; leave no half-made application behind (it was empty)
            shutil.rmtree(target, ignore_errors=True)
            raise
    click.echo(f"created {target}/")
    if models:
        click.echo(f"  database:  lamsonfilter db init --app {target}   (the models' tables: migrations/0001)")
    click.echo(f"  try it:    lamsonfilter test --app {target} --rcpt hello@{host} < some-message.eml")
    click.echo(f"  its tests: python -m pytest {target}/tests")
    click.echo(f"  demo:      lamsonfilter demo --app {target}   (as root: behind a private Postfix on loopback)")


def _first_migration(app_dir: Path) -> None:
    """Autogenerate ``migrations/0001_first_tables.py`` from the new app's models (on an empty database)."""
    from ..models import load_models
    from ..store.sql import SQLAlchemyStorage

    storage = SQLAlchemyStorage("sqlite://")
    try:
        storage.app_revision(app_dir, load_models(app_dir), "first tables")
    except (StartupError, StorageError) as exc:
        fail(f"{app_dir}: making the first migration: {exc}")
    finally:
        storage.close()


# ---------------------------------------------------------------- check
@click.command("check")
@app_option
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
              help="The user the daemons run as, to check that it can write the state database (and, in "
                   "queue mode, owns the queue files: virtual_uid_maps).  "
                   "Default: this user; as root, the owner of the database's directory.")
@database_option
def check_cmd(app_dir: Path, postfix_config: Path | None, milter_socket: str | None, max_size: int | None,
              relay: str | None, service_user: str | None, database: str | None) -> None:
    """Find problems in the application and the Postfix set-up.

    Each finding has a stable ID (APP... application, PF... Postfix), what
    is wrong and how to fix it.  Exit status 1 when there is an error, 0
    when there are only warnings or nothing.
    """
    from ..check import Finding, app001, check_app, check_postfix
    from ..settings import load_app, load_settings

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
            from ..dbschema import check_database

            check_database(app.storage, settings["APP_DIR"], app.models)
        except StorageError as exc:
            findings.append(_storage_finding(exc, app_dir, database))
        else:
            findings.extend(_model_findings(app, app_dir))
    if postfix_config is not None:
        findings.extend(check_postfix(postfix_config, settings, milter_socket, max_size, service_user))
    for f in findings:
        click.echo(str(f))
    errors = sum(f.severity == "error" for f in findings)
    click.echo(f"{errors} error(s), {len(findings) - errors} warning(s)")
    sys.exit(1 if errors else 0)


def _model_findings(app: Any, app_dir: Path) -> list[Any]:
    """APP013: the database's tables, at the newest migration, do not match app/models.py (a model
    changed and no migration was made): handlers would fail on the missing columns or tables."""
    from ..check import Finding
    from ..store.appschema import SQLAppSchema

    if app.models is None or not isinstance(app.storage, SQLAppSchema):
        return []
    if not app.storage.app_revisions(app.settings["APP_DIR"], app.models)[1]:
        return []  # no migrations yet: db init made the tables from the models
    try:
        changes = app.storage.app_model_changes(app.settings["APP_DIR"], app.models)
    except StorageError:
        return []  # APP010 has said what is wrong with the database
    if not changes:
        return []
    return [Finding("APP013", "warning",
                    f"app/models.py differs from the tables its migrations made ({'; '.join(changes)}): "
                    "a handler using what differs fails, and its messages are deferred (451)",
                    f"lamsonfilter db revision --app {app_dir} -m \"what changed\", read the file, then "
                    "lamsonfilter db upgrade")]


def _writable_finding(settings: dict[str, Any], user: str | None) -> list[Any]:
    """APP011 (the SQLite database) and APP012 (the outbox's sent journal): can the service write?"""
    from ..statefile import journal_finding, writable_finding

    return writable_finding(settings, user) + journal_finding(settings, user)



def _storage_finding(exc: StorageError, app_dir: Path, database: str | None = None) -> Any:
    """APP010: no schema yet (run db init), one behind (db upgrade), one ahead of this code (no
    command of this host fixes that: upgrade lamsonfilter, or deploy the application's newest
    migrations), or the database cannot be reached at all (say why)."""
    from ..check import Finding

    if isinstance(exc, SchemaMissingError):
        text = str(exc)
        if "upgrade lamsonfilter" in text:  # the database is newer than this lamsonfilter
            return Finding("APP010", "error", with_app_dir(text, app_dir),
                           "upgrade lamsonfilter on this host to the version that upgraded the database")
        if "deploy the application's newest migrations" in text:  # newer than APP_DIR/migrations
            return Finding("APP010", "error", with_app_dir(text, app_dir),
                           f"deploy the application's newest migrations to {app_dir}/migrations "
                           "(or give the --app that upgraded the database)")
        command = "upgrade" if "db upgrade" in text else "init"
        return Finding("APP010", "error", with_app_dir(str(exc), app_dir),
                       f"run: lamsonfilter db {command} --app {app_dir}"
                       + (f" --database {safe_url(database)}" if database else ""))
    return Finding("APP010", "error", f"cannot connect to the state database: {exc}",
                   "start the database server, or correct DATABASE_URL (or --database)")


# ---------------------------------------------------------------- demo
@click.command("demo")
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
    from ..devtools.demo import Demo, DemoError, stop_leftovers

    try:
        if stop_dir is not None:
            for line in stop_leftovers(stop_dir, keep=keep):
                click.echo(line)
            return
        if app_dir is None:
            app_dir = Path(__file__).resolve().parents[2] / "examples" / "mailinglist"
        demo = Demo(app_dir, workdir, mode, port, echo=lambda text: click.echo(text), keep=keep)
        if not demo.run_until_interrupted():
            sys.exit(1)  # lamsonfilter exited on its own; the demo said where its log is
    except DemoError as exc:
        fail(str(exc))


# ---------------------------------------------------------------- graph
@click.command("graph")
@app_option
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write to this file: .dot as text, .svg/.png/.pdf rendered with Graphviz. Default: DOT on stdout.")
def graph_cmd(app_dir: Path, output: Path | None) -> None:
    """Draw each handler's state machine (Graphviz DOT; SVG or PNG when `dot` is installed).

    States are nodes, transitions read from the code are edges, routes
    enter as dashed edges labelled with their events.
    """
    from ..graph import GraphError, render, to_dot

    app = load(app_dir, {}, storage=MemoryStorage())
    dot = to_dot(app.handlers)
    if output is None:
        click.echo(dot, nl=False)
        return
    try:
        render(dot, output)
    except GraphError as exc:
        fail(str(exc))
    click.echo(f"wrote {output}")


# ---------------------------------------------------------------- send
@click.command("send")
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

    from ..settings import parse_hostport
    from ..testing import make_message

    try:
        host, port = parse_hostport(server)
    except ValueError as exc:
        fail(f"--server {exc}")
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


