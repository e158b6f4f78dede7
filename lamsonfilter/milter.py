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

This is the only module that imports pymilter.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import threading
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from email.header import Header
from typing import Any, Callable, TypeVar

import Milter  # type: ignore[import-untyped,import-not-found,unused-ignore]
import milter as libmilter  # type: ignore[import-untyped,import-not-found,unused-ignore]  # pymilter's C extension

from . import faults, replies
from .app import StartupError
from .contentfilter.spool import Spool
from .daemon import process as daemon
from .daemon.endpoint import MilterSocket
from .daemon.runtime import Runtime, replay_key
from .daemon.steps import mail_step, rcpt_step
from .mail import Envelope, MailRequest
from .milterparts.plan import MilterAction, MilterPlan, milter_plan

__all__ = ["LamsonMilter", "serve", "ACTION_FLAGS", "FLAGS", "SPOOL_THRESHOLD", "MilterStartError"]

log = logging.getLogger("lamsonfilter.milter")

#: Message bytes kept in memory per transaction before spooling to a temporary file.
SPOOL_THRESHOLD = 512 * 1024

#: The actions `milter_plan` can ask for, and the libmilter flag each needs.
#: Only these are negotiated (`FLAGS`); Postfix refuses any other action.
ACTION_FLAGS: dict[str, int] = {
    "addheader": Milter.ADDHDRS,
    "chgheader": Milter.CHGHDRS,
    "addrcpt": Milter.ADDRCPT,
    "delrcpt": Milter.DELRCPT,
    "replacebody": Milter.MODBODY,
    "chgfrom": Milter.CHGFROM,
    "quarantine": Milter.QUARANTINE,
}
#: What ``Milter.set_flags`` is given: the actions above plus SETSYMLIST for `@Milter.symlist`.
FLAGS: int = functools.reduce(lambda a, b: a | b, ACTION_FLAGS.values()) | Milter.SETSYMLIST

#: A plan's result → the callback's return code.
RESULTS: dict[str, int] = {
    "ACCEPT": Milter.ACCEPT,
    "REJECT": Milter.REJECT,
    "TEMPFAIL": Milter.TEMPFAIL,
    "DISCARD": Milter.DISCARD,
}

#: Python threads that run the application (see "Threads" above).  Its CPU work is
#: serialised on the GIL anyway, and the SQLite store keeps 5 pooled connections:
#: more threads would open and close an overflow connection per message.
APP_THREADS = 4
#: Seconds the application may take for one message; then 451 (main.cf.milter
#: gives Postfix's milter_content_timeout 120 s).
APP_DEADLINE = 100.0

#: Seconds the milter still waits after APP_DEADLINE for a run that was committing.
COMMIT_GRACE = 10.0

#: Seconds to wait for libmilter to finish after ``smfi_stop`` (it polls every 5 s).
STOP_TIMEOUT = 15.0

#: The reply for any internal error: transient (RFC 5321 §4.2.1), says nothing about why.
TEMPFAIL_REPLY = replies.TEMPFAIL.milter

F = TypeVar("F", bound=Callable[..., int])

# pymilter's return codes, typed
CONTINUE: int = Milter.CONTINUE
ACCEPT: int = Milter.ACCEPT
REJECT: int = Milter.REJECT
TEMPFAIL: int = Milter.TEMPFAIL


def _symlist(*macros: str) -> Callable[[F], F]:
    """``@Milter.symlist``: the macros Postfix sends for this stage (at most 5)."""
    decorate: Callable[[F], F] = Milter.symlist(*macros)
    return decorate


def _noreply(func: F) -> F:
    """``@Milter.noreply``: Postfix does not wait for this step's reply (one round trip less)."""
    decorated: F = Milter.noreply(func)
    return decorated


def _decode(strategy: str) -> Callable[[F], F]:
    """``@Milter.decode``: how pymilter hands over header and envelope values."""
    decorate: Callable[[F], F] = Milter.decode(strategy)
    return decorate


class MilterStartError(Exception):
    """libmilter cannot open the socket (address in use, bad path, no permission)."""


def _guarded(func: F) -> F:
    """Wrap a reply-bearing callback: any exception → setreply 451 4.3.0 and TEMPFAIL."""

    @functools.wraps(func)
    def wrapper(self: LamsonMilter, *args: Any) -> int:
        try:
            return func(self, *args)
        except Exception as exc:  # noqa: BLE001 -- the contract: tempfail, never leak
            return self._fail(func.__name__, exc)

    return wrapper  # type: ignore[return-value]


def _noted(func: F) -> F:
    """Wrap a callback whose reply Postfix does not wait for (`_noreply`): an exception is
    logged and kept, and the next transaction of the connection is answered 451 4.3.0."""

    @functools.wraps(func)
    def wrapper(self: LamsonMilter, *args: Any) -> int:
        try:
            return func(self, *args)
        except Exception as exc:  # noqa: BLE001 -- reported at MAIL FROM
            self._fail(func.__name__, exc)
            self._broken = f"{func.__name__} failed: {type(exc).__name__}"
            return CONTINUE

    return wrapper  # type: ignore[return-value]


def _held(func: F) -> F:
    """Wrap a content step whose reply Postfix does not wait for (header, end of header,
    body: `_noreply`): an exception is logged and kept in the transaction, and end of
    message answers 451 4.3.0 -- the message is still refused, one round trip per step
    cheaper."""

    @functools.wraps(func)
    def wrapper(self: LamsonMilter, *args: Any) -> int:
        if self._tx is not None and self._tx.failed is not None:
            return CONTINUE  # the message is refused anyway: skip the rest of its content
        try:
            return func(self, *args)
        except Exception as exc:  # noqa: BLE001 -- reported at end of message
            self._fail(func.__name__, exc)
            if self._tx is not None and self._tx.failed is None:
                self._tx.failed = f"{func.__name__} failed: {type(exc).__name__}"
            return CONTINUE

    return wrapper  # type: ignore[return-value]


def _macro_lists(cls: type) -> tuple[tuple[int, str], ...]:
    """(stage, "macro macro") for each callback of `cls` with a `_symlist`."""
    found = []
    for callback, stage in Milter.MACRO_CALLBACKS.items():
        macros = getattr(getattr(cls, callback), "_symlist", None)
        if macros:
            found.append((stage, " ".join(macros)))
    return tuple(found)


class _Transaction:
    """One MAIL FROM … end of message: the envelope so far and the message bytes."""

    def __init__(self, sender: str, threshold: int) -> None:
        self.sender = sender
        self.recipients: list[str] = []
        self.routed = False  # does a route of the application take one of the recipients?
        self.failed: str | None = None  # why a header/body step failed (answered at end of message)
        self.spool = Spool(memory=threshold)  # in RAM up to `threshold`, then a temporary file


@Milter.header_leading_space
class LamsonMilter(Milter.Base):  # type: ignore[misc]
    """One SMTP connection as seen through Postfix's milter protocol.

    Subclasses `Milter.Base` directly: pymilter caches which callbacks a
    class skips on the class, so a subclass of another milter class would
    inherit the wrong negotiation.  ``P_HDR_LEADSPC`` is asked for so that
    header values arrive with their exact leading white space and the raw
    message can be rebuilt byte for byte.
    """

    def __init__(self, runtime: Runtime, spool_threshold: int = SPOOL_THRESHOLD,
                 executor: Executor | None = None) -> None:
        self.runtime = runtime
        self.spool_threshold = spool_threshold
        self.executor = executor  # where the application runs; None: in the calling thread
        self.client_address: str | None = None
        self.client_name: str | None = None
        self.helo: str | None = None
        self._tx: _Transaction | None = None
        self._broken: str | None = None  # why connect or hello failed (no reply there)

    # ------------------------------------------------------------ callbacks
    def negotiate(self, opts: list[int]) -> int:
        """Option negotiation (``opts`` = [actions, protocol steps, 0, 0], changed in place).

        Asks only for the actions in `FLAGS`: pymilter's default hands back
        every action the MTA offers (``set_flags`` only matters to MTAs that
        do not negotiate), so Postfix would grant what lamsonfilter never
        uses.  The protocol steps follow from the overridden callbacks
        (``Milter.Base.protocol_mask``); the macro lists come from the
        ``@_symlist`` decorators.  pymilter 1.0.5's own ``setsymlist`` hands
        bytes to a C function that wants str on Python 3 (and its
        ``negotiate`` then silently falls back to "all options"), so this
        one calls the context directly; if the MTA refuses, the
        ``milter_*_macros`` lines of main.cf.milter still provide them.
        """
        self._actions = opts[0] & FLAGS
        opts[0] = self._actions
        opts[1] = self._protocol = opts[1] & ~self.protocol_mask()
        opts[2] = opts[3] = 0
        if self._actions & Milter.SETSYMLIST:
            for stage, macros in _MACRO_LISTS:
                try:
                    self._ctx.setsymlist(stage, macros)
                except Exception as exc:  # noqa: BLE001 -- main.cf's macro lines still apply
                    log.warning("setsymlist for stage %s refused: %s", stage, exc)
        return CONTINUE

    @_symlist("{client_addr}", "{client_name}")
    @_noreply
    @_noted
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        """A client connected to Postfix: remember who.  No reply (nothing is decided per connection)."""
        if isinstance(hostaddr, tuple) and hostaddr:
            self.client_address = str(hostaddr[0])
        else:
            self.client_address = self.getsymval("{client_addr}")
        name = hostname or self.getsymval("{client_name}") or ""
        self.client_name = None if not name or name.startswith("[") or name == "unknown" else name
        return CONTINUE

    @_noreply
    @_noted
    def hello(self, heloname: str) -> int:
        """HELO/EHLO: remember the name.  No reply."""
        self.helo = heloname
        return CONTINUE

    @_guarded
    def envfrom(self, mailfrom: str, *params: str) -> int:
        """MAIL FROM: a new transaction.  CONTINUE; TEMPFAIL (whole message) on an internal error,
        also one in connect or hello, whose replies Postfix does not wait for."""
        if self._broken is not None:
            raise RuntimeError(self._broken)
        self._reset()
        step = mail_step(mailfrom)
        if step.refusal is not None:  # a permanent problem of the client's: 501, as smtpproxy answers
            self._setreply(*step.refusal.milter)
            log.info("queue_id=- from=%r client=%s refused at MAIL FROM: %s", mailfrom[:100],
                     self.client_address or "-", step.reason)
            return REJECT
        self._tx = _Transaction(step.address, self.spool_threshold)
        return CONTINUE

    @_guarded
    def envrcpt(self, rcpt: str, *params: str) -> int:
        """RCPT TO.  REJECT (this recipient only, e.g. 550 5.1.1) when the application
        owns the domain but no route takes the address; otherwise CONTINUE."""
        tx = self._transaction()
        step = rcpt_step(self.runtime, rcpt)
        address = step.address
        if step.refusal is not None:
            self._setreply(*step.refusal.milter)
            if address:  # the application's refusal (bad syntax is the client's own business)
                log.info("queue_id=%s client=%s[%s] rcpt=<%s> rejected at RCPT: %s", self._queue_id() or "-",
                         self.client_name or "unknown", self.client_address or "-", address, step.reason)
            return REJECT
        tx.recipients.append(address)
        tx.routed = tx.routed or self._routed(address)
        return CONTINUE

    @_symlist("i")
    @_guarded
    def data(self) -> int:
        """DATA: every recipient is known.

        When no recipient is routed to the application, its decision cannot
        depend on the content (an address at its hosts without a route was
        refused at RCPT; other addresses pass untouched), so the message is
        decided here, without content, and ACCEPT tells Postfix not to send
        header and body at all.  Otherwise CONTINUE.

        Implemented, not negotiated away, also so that Postfix waits for a
        reply here: for a skipped step Postfix still sends the step's macros,
        on their own, just before it hands the connection to cleanup(8); over
        TCP the first header then waits for that packet's delayed ACK (Nagle
        on Postfix's side), about 40 ms per message.
        """
        tx = self._transaction()
        if tx.routed:
            return CONTINUE
        # no route, no state store: App.process answers from the routes alone, safely inline
        plan = self._decide(MailRequest(self._envelope(tx), b""), inline=True)
        if plan.actions:  # cannot happen for unrouted mail; decide at end of message then
            return CONTINUE
        self._reset()
        return self._execute(plan)

    @_decode("bytes")
    @_noreply
    @_held
    def header(self, name: str, value: bytes) -> int:
        """One header field (Postfix's own Received: is never shown).  CONTINUE."""
        if not self._protocol & Milter.P_HDR_LEADSPC:
            value = b" " + value  # the MTA ate the first space after the colon
        value = value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        self._transaction().spool.write(name.encode("utf-8", "surrogateescape") + b":" + value + b"\r\n")
        return CONTINUE

    @_noreply
    @_held
    def eoh(self) -> int:
        """End of the header block.  CONTINUE."""
        self._transaction().spool.write(b"\r\n")
        return CONTINUE

    @_noreply
    @_held
    def body(self, chunk: bytes) -> int:
        """A body chunk, with CRLF line ends as Postfix sends them.  CONTINUE."""
        self._transaction().spool.write(chunk)
        return CONTINUE

    @_symlist("i")
    @_guarded
    def eom(self) -> int:
        """End of message: run the application once and carry out its plan.

        Returns the plan's result: ACCEPT (with any header, recipient,
        sender or body changes made just before), REJECT or TEMPFAIL with
        the plan's reply, or DISCARD (consumed by the application).
        """
        tx = self._transaction()
        if tx.failed is not None:  # logged when it happened: answer, do not log again
            self._setreply(*TEMPFAIL_REPLY)
            return TEMPFAIL
        envelope = self._envelope(tx)
        request = MailRequest(envelope, tx.spool.getvalue())
        tx.spool.close()
        # a client's retry is a new transaction with a new queue id: the key comes from the content
        key = replay_key(request, queue_id_is_stable=False) if tx.routed else None
        faults.reached("milter.eom", envelope.queue_id)
        plan = self._decide(request, key)
        faults.reached("milter.after_commit", envelope.queue_id)
        for note in plan.notes:
            log.info("queue_id=%s %s", envelope.queue_id or "-", note)
        return self._execute(plan)

    def abort(self) -> int:
        """The transaction ended without our verdict being used (RSET, rejection,
        or simply after every message): drop its state.  The reply is ignored."""
        try:
            self._reset()
        except Exception as exc:  # noqa: BLE001
            log.error("queue_id=- milter abort failed: %s: %s", type(exc).__name__, exc)
        return CONTINUE

    def close(self) -> int:
        """The SMTP connection is gone.  The reply is ignored."""
        return self.abort()

    # ------------------------------------------------------------ the plan
    def _decide(self, request: MailRequest, key: str | None = None, inline: bool = False) -> MilterPlan:
        """Run the application once -- in the executor's threads unless `inline` -- and map
        its decision.  Inline only for mail no route takes (no handler, no state store)."""
        if self.executor is None or inline:
            decision = self.runtime.process(request, replay_key=key, transport="milter")
        else:
            # past the deadline App.process commits nothing; the extra seconds let a run
            # that committed just in time hand over its decision (never a 451 after a commit)
            future = self.executor.submit(self.runtime.process, request, replay_key=key,
                                          deadline=time.monotonic() + APP_DEADLINE, transport="milter")
            try:
                decision = future.result(APP_DEADLINE + COMMIT_GRACE)
            except TimeoutError:
                raise RuntimeError(f"the application took more than {APP_DEADLINE:g} s") from None
        return milter_plan(decision, request)

    def _execute(self, plan: MilterPlan) -> int:
        """Call each planned action by name, then set the reply and return the result."""
        for action in plan.actions:
            if action.method not in ACTION_FLAGS:
                raise ValueError(f"milter plan asks for unknown action {action.method!r}")
            getattr(self, action.method)(*self._wire_args(action))
        if plan.reply is not None:
            self._setreply(*plan.reply)
        return RESULTS[plan.result]

    def _wire_args(self, action: MilterAction) -> tuple[Any, ...]:
        """Header values as Postfix must receive them: RFC 2047 for non-ASCII text,
        and the leading space when ``P_HDR_LEADSPC`` was negotiated."""
        if action.method == "addheader":
            name, value = action.args
            return (name, self._header_value(name, value))
        if action.method == "chgheader":
            name, index, value = action.args
            return (name, index, None if value is None else self._header_value(name, value))
        return action.args

    def _header_value(self, name: str, value: str) -> str:
        if not value.isascii():
            value = Header(value, "utf-8", header_name=name).encode(linesep="\n")
        if self._protocol & Milter.P_HDR_LEADSPC and not value.startswith((" ", "\t")):
            value = " " + value
        return value

    # ------------------------------------------------------------ helpers
    def _envelope(self, tx: _Transaction) -> Envelope:
        return Envelope(
            tx.sender, tuple(tx.recipients),
            client_address=self.client_address, client_name=self.client_name,
            helo=self.helo, queue_id=self._queue_id(),
        )

    def _routed(self, address: str) -> bool:
        """Does a route take `address`?  On any doubt yes: the content is then passed on."""
        try:
            return self.runtime.app.match(address) is not None
        except Exception:  # noqa: BLE001 -- App.process at end of message decides
            return True

    def _transaction(self) -> _Transaction:
        if self._tx is None:
            raise RuntimeError("message data without MAIL FROM")
        return self._tx

    def _reset(self) -> None:
        if self._tx is not None:
            self._tx.spool.close()
            self._tx = None

    def _queue_id(self) -> str | None:
        try:
            value = self.getsymval("i")
        except Exception:  # noqa: BLE001 -- no context (tests, closed connection)
            return None
        return str(value) if value else None

    def _setreply(self, code: str, enhanced: str, text: str) -> None:
        """``setreply`` with text made safe: one line, ``%`` doubled (libmilter's format rule)."""
        clean = " ".join(text.split()).replace("%", "%%")
        self.setreply(code, enhanced, clean)

    def _fail(self, callback: str, exc: Exception) -> int:
        log.error(
            "queue_id=%s milter %s failed, answering 451 4.3.0: %s: %s",
            self._queue_id() or "-", callback, type(exc).__name__, exc,
        )
        log.debug("traceback of the failure above", exc_info=exc)
        try:
            self._setreply(*TEMPFAIL_REPLY)
        except Exception:  # noqa: BLE001 -- TEMPFAIL still applies (default 451 text)
            pass
        return TEMPFAIL


#: The macro lists `LamsonMilter.negotiate` asks for, computed once.
_MACRO_LISTS = _macro_lists(LamsonMilter)


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
    `lamsonfilter.check_postfix.smtpd_milters_value`, which knows the chroot).

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
