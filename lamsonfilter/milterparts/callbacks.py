"""The milter's callbacks: one `LamsonMilter` per SMTP connection, one method per protocol step.

`lamsonfilter.milter` (the entry module) explains the steps and runs
libmilter; this module is the protocol code: it answers MAIL and RCPT with
the daemon layer's one step (`lamsonfilter.daemon.steps`), collects the
message, calls `Runtime.process` once at the end of message with the
replay key and deadline as arguments, and carries out the plan of
`lamsonfilter.milterparts.plan`.  Any exception in a callback is a
``451 4.3.0`` (`lamsonfilter.replies.TEMPFAIL`) with one log line.
"""

from __future__ import annotations

import functools
import logging
import time
from concurrent.futures import Executor
from email.header import Header
from typing import Any

import Milter  # type: ignore[import-untyped,import-not-found,unused-ignore]

from .. import replies
from ..devtools import faults
from ..contentfilter.spool import Spool
from ..daemon.runtime import Runtime, replay_key
from ..daemon.steps import mail_step, rcpt_step
from ..mail import Envelope, MailRequest
from .plan import MilterAction, MilterPlan, milter_plan
from .wrappers import (
    CONTINUE,
    REJECT,
    TEMPFAIL,
    decode,
    guarded,
    held,
    macro_lists,
    noreply,
    noted,
    symlist,
)

__all__ = ["LamsonMilter", "ACTION_FLAGS", "FLAGS", "SPOOL_THRESHOLD", "APP_THREADS", "APP_DEADLINE", "COMMIT_GRACE"]

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

#: The reply for any internal error: transient (RFC 5321 §4.2.1), says nothing about why.
TEMPFAIL_REPLY = replies.TEMPFAIL.milter

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
        ``@symlist`` decorators.  pymilter 1.0.5's own ``setsymlist`` hands
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

    @symlist("{client_addr}", "{client_name}")
    @noreply
    @noted
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        """A client connected to Postfix: remember who.  No reply (nothing is decided per connection)."""
        if isinstance(hostaddr, tuple) and hostaddr:
            self.client_address = str(hostaddr[0])
        else:
            self.client_address = self.getsymval("{client_addr}")
        name = hostname or self.getsymval("{client_name}") or ""
        self.client_name = None if not name or name.startswith("[") or name == "unknown" else name
        return CONTINUE

    @noreply
    @noted
    def hello(self, heloname: str) -> int:
        """HELO/EHLO: remember the name.  No reply."""
        self.helo = heloname
        return CONTINUE

    @guarded
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

    @guarded
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

    @symlist("i")
    @guarded
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

    @decode("bytes")
    @noreply
    @held
    def header(self, name: str, value: bytes) -> int:
        """One header field (Postfix's own Received: is never shown).  CONTINUE."""
        if not self._protocol & Milter.P_HDR_LEADSPC:
            value = b" " + value  # the MTA ate the first space after the colon
        value = value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        self._transaction().spool.write(name.encode("utf-8", "surrogateescape") + b":" + value + b"\r\n")
        return CONTINUE

    @noreply
    @held
    def eoh(self) -> int:
        """End of the header block.  CONTINUE."""
        self._transaction().spool.write(b"\r\n")
        return CONTINUE

    @noreply
    @held
    def body(self, chunk: bytes) -> int:
        """A body chunk, with CRLF line ends as Postfix sends them.  CONTINUE."""
        self._transaction().spool.write(chunk)
        return CONTINUE

    @symlist("i")
    @guarded
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


_MACRO_LISTS = macro_lists(LamsonMilter)
