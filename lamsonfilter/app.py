"""The application: routes + handlers + state + views, and the one entry point `App.process`.

Every transport calls `App.process(request)` once per message and acts on
the `Decision` it returns; at RCPT time it may call `App.check_recipient` to
refuse unroutable addresses early.

    app = App(hosts=["lists.example.org"], handlers=[mailinglist.handler])
    app.start()                                 # compiles and checks routes
    decision = app.process(MailRequest.from_bytes(raw))

`start()` fails loudly (`StartupError`) on a duplicate or dangerous route, a
route to a missing state, a route that does not capture a parameter its state
functions require, or a template directory that does not exist.
`process()` never raises: any unexpected error becomes a tempfail decision
(451 4.3.0) with one log line carrying the queue id, the handler and where
in the application's code it failed (``KeyError: 'count' at
app/handlers/list.py:42 in START``; the whole traceback follows at DEBUG,
``-v`` for the daemons), and nothing of that message (state, outbox) is
committed.  The tempfail says whose fault it was (`Decision.cause`):
``storage`` when the state database failed (`StorageUnavailable`: down,
locked, full, no schema), ``message`` for everything else -- conflicts
that outlast `CONFLICT_RETRIES` included (a handler that inserts the same
unique row every time would otherwise never count).  ``process(request, trace=Trace())`` also hands back the
exception and every state key the run wrote (`lamsonfilter.diagnostics`),
for dry runs and tests.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from .context import Context
from .decisions import Action, Cause, Decision, MessageChanges, Outcome
from .diagnostics import Trace, describe_failure, format_traceback
from .errors import Deferred
from .fsm import (
    ERROR,
    START,
    Handler,
    HandlerError,
    call_state,
    handler_signature_problems,
    is_stateless,
    state_name,
)
from .guards import REPLY_KINDS, ReplyBudget, ReplyRateLimit
from .mail import MailRequest, split_address
from .memorystore import MemoryStorage
from .replies import NO_SUCH_ADDRESS
from .routing import RouteMatch, Router, RoutingError
from .state import ConflictError, StateStorage, StorageError, StorageUnavailable
from .store import replay
from .store.replay import Replayed
from .transaction import DeadlinePassed, LazyTransaction
from .views import Views

if TYPE_CHECKING:
    from sqlalchemy import MetaData

__all__ = ["App", "StartupError", "AppNotReady", "RouteTarget", "DeadlinePassed", "MAX_HOPS", "CONFLICT_RETRIES",
           "cause_of"]

log = logging.getLogger("lamsonfilter")

#: More ``Received:`` headers than this means a mail loop.  Below Postfix's
#: ``hopcount_limit`` (50), which bounces such mail before it reaches us (L3).
MAX_HOPS = 30
#: How often a message is run again when a concurrent message changed the same key.
CONFLICT_RETRIES = 8


class StartupError(Exception):
    """The application cannot start; the message names what to fix."""


class AppNotReady(Exception):
    """The application is used for mail it is not set up for: before `App.start`, or a
    template rendered without a templates directory.  Raised while mail is processed
    (so `App.process` answers a temporary failure), never at start-up."""


@dataclass(frozen=True)
class RouteTarget:
    """What a compiled route leads to."""

    handler: Handler
    function: str
    event: str


class App:
    """A lamsonfilter application.  Build it, `start` it, then `process` messages."""

    def __init__(
        self,
        *,
        name: str = "lamsonfilter",
        hosts: Iterable[str] = (),
        handlers: Iterable[Handler] = (),
        storage: StateStorage | None = None,
        views: Views | None = None,
        route_defaults: Mapping[str, str] | None = None,
        settings: Mapping[str, Any] | None = None,
        reply_limit: ReplyRateLimit | None = None,
        reply_limits: Mapping[str, ReplyRateLimit] | None = None,
        reply_budget: ReplyBudget | None = None,
        max_hops: int = MAX_HOPS,
        models: MetaData | None = None,
    ) -> None:
        self.name = name
        #: The `MetaData` of the application's own models (``app/models.py``, `lamsonfilter.models`),
        #: used by handlers through ``ctx.db``; None when it has none.
        self.models = models
        self.hosts = frozenset(h.lower() for h in hosts)
        self.handlers: list[Handler] = []
        self.storage: StateStorage = storage if storage is not None else MemoryStorage()
        self._views = views
        self.route_defaults = dict(route_defaults or {})
        self.settings: Mapping[str, Any] = dict(settings or {})
        # per (handler, sender): `reply_limit` for every handler, else `reply_limits` by handler
        # name or kind, else the kind's default (a service 10 an hour, a responder 1 a week)
        self.reply_limit = reply_limit
        self.reply_limits: dict[str, ReplyRateLimit] = {
            kind: ReplyRateLimit(n, period) for kind, (n, period) in REPLY_KINDS.items()
        }
        self.reply_limits.update(reply_limits or {})
        self.reply_budget = reply_budget or ReplyBudget(300, 30)
        # a database is shared by processes and hosts: so is the budget (in the message's transaction)
        self.reply_budget.shared = not isinstance(self.storage, MemoryStorage)
        self.max_hops = max_hops
        self.router = Router()
        self._default_handler: Handler | None = None
        self._started = False
        for h in handlers:
            self.include(h)

    # ------------------------------------------------------------ building
    def include(self, handler: Handler) -> None:
        """Add a handler (its routes are compiled at `start`)."""
        if self._started:
            raise StartupError(f"handler {handler.name}: included after start")
        if any(h.name == handler.name for h in self.handlers):
            raise StartupError(f"handler {handler.name}: included twice (handler names must be unique)")
        self.handlers.append(handler)

    def route(self, pattern: str, event: str = "", **captures: str) -> Any:
        """Sugar for a single-file application: a route on the app's own handler."""
        if self._default_handler is None:
            self._default_handler = Handler(self.name)
            self.include(self._default_handler)
        return self._default_handler.route(pattern, event, **captures)

    @property
    def views(self) -> Views:
        if self._views is None:
            raise AppNotReady("this application has no templates directory; set TEMPLATES in settings")
        return self._views

    def start(self) -> "App":
        """Compile routes, check handlers, freeze.  Raises `StartupError` naming the problem."""
        if self._started:
            return self
        problems: list[str] = []
        for handler in self.handlers:
            problems.extend(handler.check())
            problems.extend(handler_signature_problems(handler))
        if problems:
            raise StartupError("; ".join(problems))
        try:  # a bad ROUTE_DEFAULTS regex is refused by Router() itself
            router = Router(self.route_defaults) if self.route_defaults else Router()
            for handler in self.handlers:
                for spec in handler.routes:
                    target = RouteTarget(handler, spec.function, spec.event_name)
                    router.add(spec.pattern, target, name=f"{handler.name}.{spec.event_name}", **spec.captures)
        except RoutingError as exc:
            raise StartupError(str(exc)) from None
        router.freeze()
        self.router = router
        self._started = True
        return self

    # ------------------------------------------------------------ questions
    def reply_limit_for(self, handler: Handler) -> ReplyRateLimit:
        """The reply limit of `handler`: the app-wide one, else its own, else its kind's."""
        if self.reply_limit is not None:
            return self.reply_limit
        return self.reply_limits.get(handler.name) or self.reply_limits[handler.replies]

    def owns(self, address: str) -> bool:
        """True when the address is at one of the application's hosts."""
        return split_address(address)[1] in self.hosts

    def match(self, address: str) -> RouteMatch | None:
        self._require_started()
        return self.router.match(address)

    def check_recipient(self, address: str) -> Outcome | None:
        """RCPT-time check: a reject `Outcome` for an unroutable address at our hosts, else None."""
        if self.match(address) is None and self.owns(address):
            return Outcome(address, Action.REJECT, NO_SUCH_ADDRESS.code, NO_SUCH_ADDRESS.enhanced, NO_SUCH_ADDRESS.text)
        return None

    def _require_started(self) -> None:
        if not self._started:
            raise AppNotReady("call App.start() before processing mail")

    # ------------------------------------------------------------ the one flow
    def process(
        self,
        request: MailRequest,
        *,
        commit: bool = True,
        now: float | None = None,
        outbox: bool = True,
        trace: Trace | None = None,
        replay_key: str | None = None,
        deadline: float | None = None,
    ) -> Decision:
        """Decide about one message.  Never raises; see the module docstring.

        `replay_key` identifies the message across the MTA's retries (a
        retry replays the committed decision instead of running the
        handlers again); `deadline` is the ``time.monotonic()`` after which
        the transport has answered 4xx, so nothing is committed.  Transports
        pass both here (`Runtime.process`); the request's own fields of the
        same names are the fallback for callers that build one by hand.

        `commit` False rolls the state transaction back (a dry run).
        `outbox` False commits the state but never stores the outbox, so no
        daemon ever sends it (``lamsonfilter test --commit``); the decision
        still lists it.  `trace` collects the keys written and the failure.
        """
        try:
            self._require_started()
            retry = (replay_key if replay_key is not None else request.replay_key,
                     deadline if deadline is not None else request.deadline)
            return self._process(request, commit, time.time() if now is None else now, outbox, trace, retry)
        except Exception as exc:  # noqa: BLE001 -- the contract: never raise, tempfail instead
            self._log_failure(f"queue_id={request.queue_id or '-'}", exc, trace)
            return Decision.tempfail(request.recipients, f"{type(exc).__name__}: {exc}", cause=cause_of(exc))

    def _log_failure(self, prefix: str, exc: BaseException, trace: Trace | None) -> str:
        """Log one ERROR line naming where `exc` happened, the traceback at DEBUG; return the line's tail."""
        where = describe_failure(exc, self.settings.get("APP_DIR"))
        log.error("%s tempfail: %s", prefix, where)
        # a storage failure names its cause in the line; a traceback there is noise
        if log.isEnabledFor(logging.DEBUG) and not isinstance(exc, StorageError):
            log.debug("%s traceback:\n%s", prefix, format_traceback(exc))
        if trace is not None:
            trace.error = exc
        return where

    def _process(self, request: MailRequest, commit: bool, now: float, outbox: bool = True,
                 trace: Trace | None = None, retry: tuple[str | None, float | None] = (None, None)) -> Decision:
        routed: list[tuple[str, RouteMatch]] = []
        fixed: dict[str, Outcome] = {}
        for rcpt in request.recipients:
            match = self.router.match(rcpt)
            if match is not None:
                routed.append((rcpt, match))
            elif self.owns(rcpt):
                fixed[rcpt] = Outcome(rcpt, Action.REJECT, NO_SUCH_ADDRESS.code, NO_SUCH_ADDRESS.enhanced, NO_SUCH_ADDRESS.text)
            else:
                fixed[rcpt] = Outcome(rcpt, Action.DELIVER)
        if not routed:  # pass-through mail: no transaction, no parsing
            return Decision(tuple(fixed[r] for r in request.recipients))
        oversized = request.oversized_header
        if oversized is not None:  # parsing it could take minutes (X3): refuse, never retry
            for rcpt, match in routed:
                fixed[rcpt] = Outcome(
                    rcpt, Action.REJECT, 554, "5.6.0", "Message header too large to process",
                    route=str(match.route),
                )
            log.warning("queue_id=%s %s: handlers not run", request.queue_id or "-", oversized)
            return Decision(tuple(fixed[r] for r in request.recipients), notes=(f"{oversized}: handlers not run",))
        if self._hops(request) > self.max_hops:
            for rcpt, match in routed:
                fixed[rcpt] = Outcome(
                    rcpt, Action.REJECT, 554, "5.4.6", "Too many hops: mail loop detected",
                    route=str(match.route),
                )
            return Decision(tuple(fixed[r] for r in request.recipients), notes=("mail loop: handlers not run",))
        last: ConflictError | None = None
        for attempt in range(CONFLICT_RETRIES):
            if trace is not None:
                trace.reset()
            try:
                return self._run_handlers(request, routed, fixed, commit, now, outbox, trace, retry)
            except ConflictError as exc:
                last = exc
                log.info("queue_id=%s conflict on state, running again (%d)", request.queue_id or "-", attempt + 1)
        raise ConflictError(f"state still conflicting after {CONFLICT_RETRIES} attempts; the last: {last}")

    def _run_handlers(
        self,
        request: MailRequest,
        routed: Sequence[tuple[str, RouteMatch]],
        fixed: dict[str, Outcome],
        commit: bool,
        now: float,
        outbox: bool = True,
        trace: Trace | None = None,
        retry: tuple[str | None, float | None] = (None, None),
    ) -> Decision:
        changes = MessageChanges()
        request_key, deadline = retry
        outcomes = dict(fixed)
        current: Context | None = None
        replay_key = replay.record_key(request_key)
        try:
            with LazyTransaction(self.storage, commit, replay_key, deadline, trace) as tx:
                for rcpt, match in routed:
                    target: RouteTarget = match.route.target
                    ctx = current = Context(self, request, rcpt, match, target.handler, target.event, tx, changes, now)
                    outcomes[rcpt] = self._run_state(ctx, target, match, tx)
                decision = Decision(
                    outcomes=tuple(outcomes[r] for r in request.recipients),
                    header_changes=tuple(changes.headers),
                    body=changes.body,
                    sender=changes.sender,
                    quarantine=changes.quarantine,
                    outbox=tuple(changes.outbox),
                    notes=tuple(changes.notes),
                )
                if commit and outbox and changes.outbox:
                    tx.add_outbox(changes.outbox)
                if commit and replay_key is not None and tx.opened:  # a decision with side effects
                    replay.write(tx, replay_key, decision, now)
        except Replayed as replayed:  # a retry of a message whose decision committed
            log.info("queue_id=%s already processed (%s): decision replayed, handlers not run",
                     request.queue_id or "-", request_key)
            done = replayed.decision
            return replace(done, notes=(*done.notes, "retry: decision replayed"))
        except ConflictError:
            raise
        except DeadlinePassed as late:
            log.warning("queue_id=%s %s", request.queue_id or "-", late)
            return Decision.tempfail(request.recipients, str(late))
        except _HandlerTempfail as asked:
            o = asked.outcome
            log.info("queue_id=%s handler asked for a tempfail: %s", request.queue_id or "-", o.reply)
            return Decision(
                tuple(Outcome(r, Action.TEMPFAIL, o.code, o.enhanced, o.text) for r in request.recipients),
                notes=(f"{o.recipient}: handler asked for a retry; nothing committed",),
            )
        except Exception as exc:
            where = _where(current) if current else "-"
            line = self._log_failure(
                f"queue_id={request.queue_id or '-'} handler={where} rcpt={current.recipient if current else '-'}",
                exc, trace,
            )
            cause = cause_of(exc)
            # the database failing is not the conversation's error: its state stays as it was
            if cause is Cause.MESSAGE and current is not None and ERROR in current.handler.states and current.key:
                self._move_to_error(current, commit)
            return Decision.tempfail(request.recipients, f"{where}: {line}", cause=cause)
        return decision

    def _run_state(self, ctx: Context, target: RouteTarget, match: RouteMatch, tx: Any) -> Outcome:
        handler = target.handler
        routed_func = handler.states[target.function]
        stateless = is_stateless(routed_func)
        if not stateless:
            ctx.key = handler.key(ctx)
        record = None if stateless else tx.get(ctx.key)
        ctx.state = record.state if record else START
        ctx.data = dict(record.data) if record else {}
        before_data = dict(ctx.data)
        func = handler.function_for(target.function, ctx.state)
        if func is None:
            raise HandlerError(
                f"handler {handler.name}: key {ctx.key} is in state {ctx.state!r}, which this handler no longer has"
            )
        mark, before_changes = tx.mark(), ctx._changes.snapshot()
        try:
            result = call_state(func, ctx, match.args)
        except Deferred:
            result = None
        if ctx.deferred:  # ctx.defer(): nothing of this call is kept, the message goes to the queue
            tx.undo(mark)
            ctx._changes.restore(before_changes)
            ctx._note(f"{ctx.recipient}: deferred to the queue (ctx.defer())")
            state = None if stateless else ctx.state
            return Outcome(ctx.recipient, Action.DEFER, route=str(match.route), handler=handler.name,
                           state_before=state, state_after=state)
        tx.keep()
        state_before = ctx.state
        next_state = state_name(result)
        if next_state is not None and next_state not in handler.states:
            raise HandlerError(f"handler {handler.name}: {func.__name__} returned unknown state {next_state!r}")
        state_after = state_before if stateless or next_state is None else next_state
        if ctx.outcome is not None and ctx.outcome.action is Action.TEMPFAIL:
            raise _HandlerTempfail(ctx.outcome)
        if not stateless and (state_after != state_before or ctx.data != before_data or record is None):
            if state_after == START and not ctx.data:
                tx.clear(ctx.key)
            else:
                tx.set(ctx.key, state_after, ctx.data)
        outcome = ctx.outcome or Outcome(
            ctx.recipient, Action.DELIVER if handler.default_action == "deliver" else Action.DROP
        )
        return Outcome(
            outcome.recipient, outcome.action, outcome.code, outcome.enhanced, outcome.text,
            outcome.redirect_to, route=str(match.route), handler=handler.name,
            state_before=None if stateless else state_before,
            state_after=None if stateless else state_after,
        )

    def purge_replays(self, older_than: float, now: float | None = None, batch: int = 500) -> int:
        """Forget replay records (`MailRequest.replay_key`) older than `older_than` seconds.

        Keep them longer than the MTA retries a message (Postfix's
        ``maximal_queue_lifetime``, 5 days by default).  Works in batches of
        `batch` records: each is read without a write lock and its old
        records forgotten in one short transaction (one DELETE), so mail is
        never kept waiting behind the purge.  Returns how many.
        """
        return replay.purge(self.storage, older_than, now, batch)

    def _move_to_error(self, ctx: Context, commit: bool) -> None:
        try:
            with self.storage.transaction(commit=commit) as tx:
                tx.set(ctx.key, ERROR, ctx.data)
        except Exception as exc:  # noqa: BLE001 -- already deferring; log and go on
            log.error("queue_id=%s could not move %s to ERROR: %s", ctx.request.queue_id or "-", ctx.key, exc)

    @staticmethod
    def _hops(request: MailRequest) -> int:
        """``Received:`` fields in the header block, counted on the raw bytes (no parsing)."""
        return len(_RECEIVED.findall(request.header_block))


_RECEIVED = re.compile(rb"(?im)^received[ \t]*:")


def cause_of(exc: BaseException) -> Cause:
    """Whose fault a failure is: `Cause.STORAGE` when the database failed whatever the message
    (`StorageUnavailable`), else `Cause.MESSAGE` (a `ConflictError` too: after `CONFLICT_RETRIES`
    it may be the message's own unique row)."""
    return Cause.STORAGE if isinstance(exc, StorageUnavailable) else Cause.MESSAGE


def _where(ctx: Context) -> str:
    """``handler.function`` for a log line: the state's function, or the stateless route's own."""
    match = ctx.match
    assert isinstance(match, RouteMatch)  # App builds every Context with one
    target: RouteTarget = match.route.target
    func = ctx.handler.states.get(target.function)
    if func is not None and is_stateless(func):
        return f"{ctx.handler.name}.{target.function}"
    return f"{ctx.handler.name}.{ctx.state}"


class _HandlerTempfail(Exception):
    """A state function asked for a tempfail: roll back, then answer 4xx."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.text)
        self.outcome = outcome
