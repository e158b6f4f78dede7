"""Milter mode: the application runs inside Postfix's SMTP session (pymilter).

Postfix keeps port 25, the queue and delivery.  For every SMTP connection
it opens a connection to this milter, and libmilter (through pymilter)
calls one `LamsonMilter` per connection, one callback per protocol step.
The milter turns those callbacks into one `MailRequest`, asks the
application once, and turns the `Decision` back into milter actions with
the one table in `lamsonfilter.milterparts.plan`::

    connect/hello   remember the client address, name and HELO
    envfrom         a new transaction: the envelope sender (state reset here
                    and in abort: Postfix runs several transactions per
                    connection and sends ABORT after each)
    envrcpt         Runtime.check_recipient: an address at the app's hosts
                    that no route takes is refused now, 550 5.1.1
    data            no recipient routed to the app: decided now, without
                    content (ACCEPT: Postfix sends no header or body)
    header/eoh/body the raw message, rebuilt with CRLF line ends, spooled
                    to a temporary file past SPOOL_THRESHOLD bytes
    eom             Runtime.process(request) once, milter_plan(decision),
                    then each planned action (addheader, delrcpt, ...) and
                    the final ACCEPT/REJECT/TEMPFAIL/DISCARD

Run it with `serve` (what ``lamsonfilter milter`` does)::

    runtime = Runtime.from_directory("examples/mailinglist")
    serve(runtime, parse_milter_socket("unix:/run/lamsonfilter/milter.sock"))

How errors surface: every callback is wrapped.  Any exception becomes
``451 4.3.0`` (TEMPFAIL) with one log line carrying the queue id, so the
client retries and nothing passes unfiltered; pymilter's own policy for
an exception that escapes anyway stays TEMPFAIL, and Postfix's
``milter_default_action = tempfail`` covers a milter that is down.

Threads: libmilter calls back from its own threads and pymilter
serialises the callbacks on the GIL.  Debian's libmilter is built with a
worker pool, so one connection's callbacks run on *different* OS threads,
while pymilter keeps one Python thread state per connection: C code that
uses the ``PyGILState`` API in such a thread later finds a stale thread
state and the process crashes (sqlite3 does, when SQLAlchemy closes a
connection that has a registered function).  Hence the application --
`Runtime.process`, with its state store -- never runs in libmilter's
threads: `serve` gives every `LamsonMilter` a pool of ordinary Python
threads (`APP_THREADS`) and the callback waits for the result.  The
callbacks themselves stay pure Python (so does `App.process` for mail that
no route takes, which `data` decides inline).  The shared `Runtime` (router,
templates, state store) is safe to use from many threads, and two
messages for one state key serialise in the store.

With `lamsonfilter.milterparts.callbacks`, the only modules that import pymilter.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import Milter  # type: ignore[import-untyped,import-not-found,unused-ignore]
import milter as libmilter  # type: ignore[import-untyped,import-not-found,unused-ignore]  # pymilter's C extension

from .app import StartupError
from .daemon import process as daemon
from .daemon.endpoint import MilterSocket
from .daemon.runtime import Runtime

__all__ = ["LamsonMilter", "serve", "ACTION_FLAGS", "FLAGS", "SPOOL_THRESHOLD", "MilterStartError"]

log = logging.getLogger("lamsonfilter.milter")

from .milterparts.callbacks import (
    ACTION_FLAGS,
    APP_THREADS,
    FLAGS,
    SPOOL_THRESHOLD,
    LamsonMilter,
)

#: Seconds to wait for libmilter to finish after ``smfi_stop`` (it polls every 5 s).
STOP_TIMEOUT = 15.0

class MilterStartError(Exception):
    """libmilter cannot open the socket (address in use, bad path, no permission)."""




# ---------------------------------------------------------------- running it
def _register(name: str) -> None:
    """Wire libmilter's callbacks to the connection's `LamsonMilter` (as ``Milter.runmilter`` does)."""
    libmilter.set_connect_callback(Milter.connect_callback)
    libmilter.set_helo_callback(lambda ctx, host: ctx.getpriv().hello(host))
    libmilter.set_envfrom_callback(lambda ctx, *b: ctx.getpriv().envfrom_bytes(*b))
    libmilter.set_envrcpt_callback(lambda ctx, *b: ctx.getpriv().envrcpt_bytes(*b))
    libmilter.set_header_callback(lambda ctx, f, v: ctx.getpriv().header_bytes(f, v))
    libmilter.set_eoh_callback(lambda ctx: ctx.getpriv().eoh())
    libmilter.set_body_callback(lambda ctx, chunk: ctx.getpriv().body(chunk))
    libmilter.set_eom_callback(lambda ctx: ctx.getpriv().eom())
    libmilter.set_abort_callback(lambda ctx: ctx.getpriv().abort())
    libmilter.set_close_callback(Milter.close_callback)
    libmilter.register(
        name,
        data=lambda ctx: ctx.getpriv().data(),
        unknown=lambda ctx, cmd: ctx.getpriv().unknown(cmd),
        negotiate=Milter.negotiate_callback,
    )


def _listen(endpoint: MilterSocket, name: str, socket_group: str | None, timeout: int, nodelay: bool) -> str:
    """Register with libmilter and open the listening socket; returns how it was opened."""
    _register(name)
    if endpoint.kind == "unix":
        daemon.prepare_unix_socket(endpoint.path)
    libmilter.setconn(endpoint.libmilter)
    libmilter.settimeout(timeout)
    try:
        libmilter.opensocket(True)
    except libmilter.error as exc:
        raise MilterStartError(f"{endpoint}: libmilter cannot listen: {exc}") from None
    if endpoint.kind == "unix":
        return daemon.open_to_group(endpoint.path, socket_group)
    if not nodelay:
        return "Nagle on"
    # libmilter writes each modification and the final reply as separate small
    # writes; with Nagle on, the second one waits for Postfix's delayed ACK (~40 ms)
    return "TCP_NODELAY" if daemon.set_listener_nodelay(endpoint.port) else "TCP_NODELAY not set"


def _run_libmilter(failed: list[str]) -> None:
    daemon.SignalWaiter.block_here()  # before libmilter starts its signal thread: it inherits this
    try:
        libmilter.main()
    except libmilter.error as exc:
        failed.append(str(exc))


def serve(
    runtime: Runtime,
    endpoint: MilterSocket,
    *,
    service: Any = None,
    name: str = "lamsonfilter",
    socket_group: str | None = "postfix",
    timeout: int = 600,
    spool_threshold: int = SPOOL_THRESHOLD,
    tcp_nodelay: bool = True,
    postfix_value: str | None = None,
) -> int:
    """Listen on `endpoint` and serve Postfix until SIGTERM or SIGINT; SIGHUP reloads the app.

    Returns 0 after a clean stop, 1 when libmilter stopped on its own.
    Raises `MilterStartError` when the socket cannot be opened.  The
    runtime (outbox worker) is started here and stopped on the way out,
    so the outbox is flushed before the process ends.  `service` is a
    `lamsonfilter.daemon.service.Service` (systemd readiness and watchdog) or
    None.  `timeout` is libmilter's I/O timeout with the MTA; how long
    Postfix waits is its own ``milter_*_timeout``.  `tcp_nodelay=False`
    (diagnostics only) leaves Nagle on for an inet socket.  `postfix_value`
    is the ``smtpd_milters`` value the start-up line recommends (default:
    the endpoint as an unchrooted smtpd names it; the command passes
    `lamsonfilter.check.postfix.smtpd_milters_value`, which knows the chroot).

    Signals: libmilter stops at SIGHUP, SIGTERM and SIGINT in a signal
    thread of its own, so it runs in a thread and the main thread takes
    the signals first (`daemon.SignalWaiter`): SIGHUP reloads the
    application, SIGTERM and SIGINT stop libmilter with ``smfi_stop``.
    """
    Milter.set_flags(FLAGS)
    libmilter.set_exception_policy(Milter.TEMPFAIL)
    with daemon.SignalWaiter() as signals:
        app_threads = ThreadPoolExecutor(APP_THREADS, thread_name_prefix="lamsonfilter-app")
        Milter.factory = lambda: LamsonMilter(runtime, spool_threshold, app_threads)
        try:
            try:  # before the socket: a taken metrics port is a start-up error (one line, exit 2)
                runtime.start()
            except StartupError as exc:
                print(f"lamsonfilter: {exc}", file=sys.stderr)
                return 2
            how = _listen(endpoint, name, socket_group, timeout, tcp_nodelay)
            failed: list[str] = []
            thread = threading.Thread(target=_run_libmilter, args=(failed,), name="libmilter", daemon=True)
            thread.start()
            log.info("milter listening on %s (%s); Postfix: smtpd_milters = %s", endpoint, how,
                     postfix_value or endpoint.postfix)
            if service is not None:
                service.ready(f"listening on {endpoint}")
                service.start_watchdog(thread.is_alive)
            stopped_by = signals.wait(thread.is_alive, daemon.Reloader(runtime, service).request)
            if service is not None:
                service.stopping()
            libmilter.stop()
            thread.join(STOP_TIMEOUT)
            if endpoint.kind == "unix" and not thread.is_alive():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(endpoint.path)
            if stopped_by is None:
                log.error("libmilter stopped by itself: %s", "; ".join(failed) or "no reason given")
                return 1
            log.info("milter stopped; flushing the outbox")
            return 0
        finally:
            app_threads.shutdown(wait=True)  # messages in the application finish first
            runtime.stop()
