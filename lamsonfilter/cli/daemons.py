"""The daemons' commands: ``lamsonfilter milter``, ``lamsonfilter smtpproxy``, ``lamsonfilter deq``.

Each refuses bad configuration before serving (one line, exit status 2)
and hands over to its transport's entry module (`lamsonfilter.milter`,
`lamsonfilter.smtpproxy`, `lamsonfilter.deq`), imported only when the command
runs so that the other commands work without pymilter or aiosmtpd.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click

from ..app import StartupError
from ..state import StorageError
from .common import app_option, database_option, fail, queue_option, refuse_unwritable_database

__all__ = ["milter_cmd", "smtpproxy_cmd", "deq_cmd"]


# ---------------------------------------------------------------- milter
@click.command("milter")
@app_option
@click.option("--socket", "socket_spec", metavar="SPEC", envvar="LAMSONFILTER_MILTER_SOCKET",
              default="unix:/run/lamsonfilter/milter.sock", show_default=True,
              help="Where Postfix connects: unix:/path (made 0660, group --socket-group) or "
                   "inet:PORT@HOST (loopback only unless --allow-remote).")
@click.option("--relay", metavar="HOST:PORT", default=None, envvar="LAMSONFILTER_RELAY",
              help="Where the outbox goes (overrides RELAY): an smtpd that runs no milters, e.g. 127.0.0.1:10026.  "
                   "Env LAMSONFILTER_RELAY.")
@database_option
@queue_option
@click.option("--allow-remote", is_flag=True, help="Allow an inet socket on a non-loopback address.")
@click.option("--socket-group", default="postfix", show_default=True, metavar="GROUP",
              help="Group that may connect to a unix socket (Postfix's smtpd runs as user postfix).")
@click.option("--no-tcp-nodelay", "no_nodelay", is_flag=True, hidden=True,
              help="Diagnostics only: leave Nagle on for inet sockets (bench/milter_bench.sh shows the cost).")
@click.option("--postfix-config", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="DIR",
              envvar="LAMSONFILTER_POSTFIX_CONFIG",
              help="Postfix's configuration (e.g. /etc/postfix): the start-up line then gives the exact "
                   "smtpd_milters value for its smtpd (chrooted or not).  Env LAMSONFILTER_POSTFIX_CONFIG.")
def milter_cmd(app_dir: Path, socket_spec: str, relay: str | None, database: str | None, queue: str | None,
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
    from ..daemon.endpoint import EndpointError, parse_milter_socket
    from ..daemon.service import Service, setup_logging

    setup_logging(click.get_current_context().find_root().params.get("verbose", 0))
    try:
        endpoint = parse_milter_socket(socket_spec, allow_remote=allow_remote)
    except EndpointError as exc:
        fail(str(exc))
        return
    try:
        from .. import milter as milter_mode
    except ImportError as exc:
        fail(f"milter mode needs pymilter ({exc}); install it from the clone: pip install '/path/to/clone[milter]'")
        return
    from ..check.milter import smtpd_milters_value
    from ..daemon.runtime import Runtime

    refuse_unwritable_database(app_dir, database)
    try:
        runtime = Runtime.from_directory(app_dir, {"RELAY": relay, "DATABASE_URL": database, "QUEUE": queue})
    except (StartupError, StorageError) as exc:
        fail(str(exc))
        return
    try:
        status = milter_mode.serve(runtime, endpoint, service=Service(), socket_group=socket_group or None,
                                   tcp_nodelay=not no_nodelay,
                                   postfix_value=smtpd_milters_value(endpoint, postfix_config))
    except milter_mode.MilterStartError as exc:
        why = _listen_problem(endpoint)
        fail(f"cannot listen: {exc}" + (f" ({why})" if why else ""))
        return
    except OSError as exc:
        fail(f"cannot listen on {endpoint}: {exc.strerror or exc}"
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


# ---------------------------------------------------------------- smtpproxy (content filter)
def _hostport_option(value: str, flag: str) -> tuple[str, int]:
    from ..settings import parse_hostport

    try:
        return parse_hostport(value)
    except ValueError as exc:
        fail(f"{flag} {exc}")
        raise


@click.command("smtpproxy")
@app_option
@click.option("--listen", default="127.0.0.1:10025", show_default=True, metavar="HOST:PORT",
              help="Where Postfix's content_filter transport delivers (loopback unless --allow-remote).")
@click.option("--reinject", default="127.0.0.1:10026", show_default=True, metavar="HOST:PORT",
              help="The MTA's reinjection listener (no content_filter there); the outbox goes here too.")
@click.option("--lmtp", is_flag=True, help="Speak LMTP: one reply per recipient after DATA.")
@click.option("--workers", type=int, default=1, show_default=True,
              help="Processes sharing the port (SO_REUSEPORT) when one CPU is not enough.")
@database_option
@queue_option
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
    database: str | None, queue: str | None, allow_remote: bool, max_size: int, deadline: float, quarantine: Path | None,
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
        from ..smtpproxy import ProxyConfig, serve
    except ImportError as exc:
        fail(f"smtpproxy needs aiosmtpd (from the clone: pip install '/path/to/clone[smtpproxy]'): {exc}")
        return
    from ..daemon.service import setup_logging

    verbose = int((ctx.parent.params if ctx.parent else {}).get("verbose", 0))
    setup_logging(verbose)
    logging.getLogger("mail.log").setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)
    config = ProxyConfig(
        app_dir=app_dir, listen=_hostport_option(listen, "--listen"),
        reinject=_hostport_option(reinject, "--reinject"), lmtp=lmtp, workers=workers, database=database,
        queue=queue,
        allow_remote=allow_remote, max_size=max_size, deadline=deadline, quarantine=quarantine,
        spool_dir=spool_dir, threads=max(1, threads),
        policy=_hostport_option(policy, "--policy") if policy else None,
        postfix_config=postfix_config,
    )
    refuse_unwritable_database(app_dir, database)
    try:
        sys.exit(serve(config))
    except (StartupError, StorageError) as exc:
        fail(str(exc))



# ---------------------------------------------------------------- deq (the queue)
@click.command("deq")
@app_option
@click.option("--queue", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="DIR",
              envvar="LAMSONFILTER_QUEUE",
              help="The Maildir queue to work through (created if missing).  Default: the application's "
                   "QUEUE setting (var/queue, relative to the application).  Env LAMSONFILTER_QUEUE.")
@click.option("--workers", type=click.IntRange(1, 256), default=4, show_default=True, metavar="N",
              help="Threads running the application: at most N messages are claimed at once, however "
                   "large the queue.")
@click.option("--once", is_flag=True,
              help="Work until new/ and the due retries are empty, then exit 0 with one summary line "
                   "on stderr: 'deq: N processed, R waiting for a retry, Q quarantined' (processed: "
                   "finished and removed from the queue, the quarantined included).  Exit status 75 "
                   "instead when work is left for the relay or the database, not for a message: outbox "
                   "messages (replies, list posts) still unsent after --outbox-wait (one more line says "
                   "how many; the outbox sends them when deq or another lamsonfilter daemon runs), or "
                   "the state database still down after 60 s of pausing (or unreachable at the start).")
@click.option("--policy", default=None, metavar="HOST:PORT",
              help="Also answer Postfix's check_policy_service here (loopback; not with --once): "
                   "addresses at the application's hosts that no route takes are refused at RCPT "
                   "(550 5.1.1) instead of queued and quarantined.  See conf/postfix/main.cf.queue.")
@click.option("--outbox-wait", type=click.FloatRange(min=1.0), default=30.0, show_default=True,
              metavar="SECONDS",
              help="With --once: how long its end waits for the outbox to send what the run produced.")
@database_option
@click.option("--relay", metavar="HOST:PORT", default=None, envvar="LAMSONFILTER_RELAY",
              help="Where delivered and redirected mail and the outbox go (overrides RELAY): an smtpd "
                   "that does not deliver into this queue again, e.g. 127.0.0.1:10026.  Env LAMSONFILTER_RELAY.")
@click.option("--quarantine", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="DIR",
              envvar="LAMSONFILTER_QUARANTINE",
              help="Maildir for rejected, poison and envelope-less messages.  Default: APP/var/quarantine "
                   "(the content filter's, so `lamsonfilter quarantine` shows both).  Env LAMSONFILTER_QUARANTINE.")
@click.pass_context
def deq_cmd(ctx: click.Context, app_dir: Path, queue: Path | None, workers: int, once: bool,
            policy: str | None, outbox_wait: float, database: str | None, relay: str | None, quarantine: Path | None) -> None:
    """Run the application over the messages in a Maildir queue (the third transport).

    Postfix delivers the application's mail into the queue with its own
    Maildir delivery (Return-Path: and Delivered-To: on top: the envelope;
    see conf/postfix/main.cf.queue), or a handler defers a message there
    with ctx.defer().  deq claims each message (a rename: two deq processes,
    also on two hosts sharing the directory, never run one message twice),
    runs the same routes and handlers as the milter and the content filter
    (ctx.from_queue is true), and removes it only after its decision
    committed:

    \b
      drop, defer        removed (replies go through the outbox)
      deliver, redirect  sent on through --relay, then removed
      reject             quarantined (never a bounce to a forged sender)
      tempfail, error    retry/ after a backoff (60 s doubling to 4000 s);
                         the POISON_LIMIT-th failed attempt: quarantined
      database down      retry/, no attempt counted: every worker pauses
                         (2 s doubling to 60 s), then one message probes
      no envelope        quarantined with the reason, never guessed from To:

    A claim lasts QUEUE_LEASE seconds (default 300); a worker that died is
    taken over after it.  Without --once it runs as a service: it sleeps
    while the queue is empty (inotify on new/, a timer for retries), tells
    systemd it is ready and pings the watchdog; SIGHUP reloads the
    application, SIGTERM stops it after the messages in flight.  Bad
    configuration (an unusable queue, a bad application) exits with status 2.

    \b
    Examples:
      lamsonfilter deq --app /srv/lists --queue /var/spool/lamsonfilter/queue
      lamsonfilter deq --app examples/mailinglist --once      # drain, then exit
      lamsonfilter queue list --app examples/mailinglist      # what is waiting
    """
    from ..daemon.service import Service, setup_logging
    from ..settings import load_settings

    setup_logging(int((ctx.parent.params if ctx.parent else {}).get("verbose", 0)))
    overrides = {"RELAY": relay, "DATABASE_URL": database}
    try:
        settings = load_settings(app_dir, overrides)
    except StartupError as exc:
        fail(str(exc))
        return
    if once and policy:
        fail("--policy answers Postfix while deq runs as a service; it makes no sense with --once")
        return
    from .. import deq
    from ..contentfilter.quarantine import Quarantine
    from ..daemon.runtime import DatabaseUnreachable, Runtime
    from ..mailqueue.maildir import MailQueue

    config = deq.DeqConfig(app_dir=app_dir, queue=queue, workers=workers, once=once, quarantine=quarantine,
                           outbox_wait=outbox_wait,
                           policy=_hostport_option(policy, "--policy") if policy else None)
    places: list[tuple[str, MailQueue | Quarantine]] = [
        ("queue", MailQueue(deq.queue_path(app_dir, settings["QUEUE"], queue))),
        ("quarantine", Quarantine(deq.quarantine_path(app_dir, quarantine))),
    ]
    for what, place in places:
        path = place.path
        try:
            place.ensure()
        except (FileExistsError, NotADirectoryError):
            blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
            fail(f"{what} {path} cannot be used: {blocker} is not a directory")
            return
        except OSError as exc:
            fail(f"{what} {path} cannot be used: {exc.strerror or exc}"
                 + (f": {exc.filename}" if getattr(exc, "filename", None) else ""))
            return
    refuse_unwritable_database(app_dir, database)
    try:
        runtime = Runtime.from_directory(app_dir, overrides)
    except (StartupError, StorageError) as exc:
        if once and isinstance(exc, DatabaseUnreachable):
            # the database down at the start is the same "try again later" as down during the
            # run (75), not bad configuration (2): a cron job retries, nothing was claimed
            click.echo(f"lamsonfilter: {exc}", err=True)
            click.echo("deq: nothing processed: the state database cannot be reached; the queue is "
                       "untouched, try again later", err=True)
            sys.exit(deq.EX_TEMPFAIL)
        fail(str(exc))
        return
    sys.exit(deq.serve(runtime, config, service=Service()))
