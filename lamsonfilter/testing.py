"""Testing helpers for application authors: send mail through an app in process.

    from lamsonfilter.testing import AppTester

    def test_subscribe():
        t = AppTester.from_directory("examples/mailinglist")   # state in memory
        r = t.send("alice@example.com", "python-subscribe@lists.example.org")
        assert r.state_after == "PENDING"
        assert r.replies[0]["To"] == "alice@example.com"
        t.advance(3600)                                        # the clock is yours

No server, no socket: `AppTester.send` builds a message, runs
`App.process` exactly as the transports do, and returns a `Result` to
assert on (routes, states, decision, outbox, the state keys written).
State is committed, so a conversation continues across calls; the clock
only moves when you say so.

A handler that defers (``ctx.defer()``) gets ``Action.DEFER``; the tester
keeps the message as the daemons would put it into the queue
(`AppTester.queued`), and `AppTester.run_deferred` runs it later, as
``lamsonfilter deq`` would, with ``ctx.from_queue`` True::

    r = t.send("alice@example.com", "report@example.org")
    assert r.action is Action.DEFER and len(t.queued) == 1
    [later] = t.run_deferred()                 # or t.send(..., from_queue=True)
    assert later.action is Action.DROP and not t.queued

A handler that raises makes `send` raise that exception, with its
traceback, so a test fails where the bug is.  (The daemons turn it into a
``451 4.3.0`` tempfail.)  To see that tempfail instead, as the MTA would::

    r = t.send(sender, rcpt, expect_tempfail=True)       # or AppTester(..., raise_errors=False)
    assert r.decision.is_tempfail and isinstance(r.error, KeyError)

The tester makes an application's tables from ``app/models.py`` directly,
so its tests pass even when a model changed and no migration was made; a
server's database, made by the migrations, would then lack the change.
`check_migrations` catches that (``lamsonfilter gen --models`` puts it in
the new application's tests)::

    def test_the_migrations_make_the_models():
        check_migrations("examples/helpdesk")      # fails naming `lamsonfilter db revision`
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from .app import App
from .decisions import Action, Decision, OutboxMessage, Outcome
from .diagnostics import StateWrite, Trace
from .mail import POLICY, MailRequest
from .state import StateStorage
from .views import _verify_serialised

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

__all__ = ["AppTester", "Result", "Queued", "check_migrations", "make_message"]


def check_migrations(directory: str | Path) -> None:
    """Raise `AssertionError` when the application's migrations do not make its models.

    Runs lamsonfilter's and the application's migrations (``migrations/``)
    on an empty in-memory SQLite database and compares the tables with
    ``app/models.py``, as ``lamsonfilter db revision`` would; the message
    names the differences and the command to run.  An application without
    models, or with models and no migrations yet, passes.
    """
    from .models import load_models
    from .store.sql import SQLAlchemyStorage

    metadata = load_models(directory)
    if metadata is None:
        return
    storage = SQLAlchemyStorage("sqlite://")
    try:
        storage.create_schema()
        storage.upgrade_app(directory, metadata)
        changes = storage.app_model_changes(directory, metadata)
    finally:
        storage.close()
    if changes:
        raise AssertionError(
            f"{Path(directory) / 'app' / 'models.py'} differs from what its migrations make "
            f"({'; '.join(changes)}): run `lamsonfilter db revision --app {directory} -m \"what changed\"` "
            "and read the new file in migrations/")


def make_message(
    sender: str,
    to: str | Iterable[str],
    subject: str = "test",
    body: str = "Hello.\n",
    headers: Mapping[str, str] | None = None,
) -> bytes:
    """A small, valid message as CRLF bytes, with Date and Message-ID.

    Raises `HeaderValueError` when the email package would write a value as
    more than the one header it was set as (an RFC 2047 encoded CR/LF on an
    unpatched CPython, CVE-2024-6923): build hostile test mail as bytes and
    pass it as ``AppTester.send(..., raw=...)``.
    """
    msg = EmailMessage(policy=POLICY)
    msg["From"] = sender or "MAILER-DAEMON@example.net"
    msg["To"] = to if isinstance(to, str) else ", ".join(to)
    msg["Subject"] = subject
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = make_msgid(domain="test.example")
    for name, value in (headers or {}).items():
        msg[name] = value
    msg.set_content(body)
    raw = msg.as_bytes()
    _verify_serialised(raw, [k.lower() for k in msg.keys()])
    return raw


def parse(raw: bytes) -> EmailMessage:
    msg = BytesParser(policy=POLICY).parsebytes(raw)
    assert isinstance(msg, EmailMessage)
    return msg


@dataclass
class Result:
    """What `App.process` decided for one message, with shortcuts for assertions."""

    request: MailRequest
    decision: Decision
    trace: Trace | None = None

    @property
    def error(self) -> BaseException | None:
        """The exception a handler raised (the decision is then a tempfail), or None."""
        return self.trace.error if self.trace is not None else None

    @property
    def writes(self) -> list[StateWrite]:
        """Every state key this message wrote (its own, `ctx.set_state`, claims, rate counters),
        and every row of the application's models (``table:primary key``, op ``insert``,
        ``update`` or ``delete``)."""
        return list(self.trace.writes) if self.trace is not None else []

    def outcome(self, recipient: str | None = None) -> Outcome:
        """The outcome for `recipient` (or the only one)."""
        if recipient is None:
            if len(self.decision.outcomes) != 1:
                raise AssertionError(f"{len(self.decision.outcomes)} recipients; name one")
            return self.decision.outcomes[0]
        for o in self.decision.outcomes:
            if o.recipient.lower() == recipient.lower():
                return o
        raise AssertionError(f"no outcome for {recipient}")

    @property
    def action(self) -> Action:
        return self.outcome().action

    @property
    def route(self) -> str | None:
        return self.outcome().route

    @property
    def state_before(self) -> str | None:
        return self.outcome().state_before

    @property
    def state_after(self) -> str | None:
        return self.outcome().state_after

    @property
    def outbox(self) -> tuple[OutboxMessage, ...]:
        return self.decision.outbox

    @property
    def replies(self) -> list[EmailMessage]:
        """Parsed automatic replies."""
        return [parse(m.raw) for m in self.decision.outbox if m.kind == "reply"]

    @property
    def messages(self) -> list[EmailMessage]:
        """Parsed new messages (not replies), e.g. list posts."""
        return [parse(m.raw) for m in self.decision.outbox if m.kind == "message"]

    @property
    def output(self) -> bytes:
        """The bytes that would be passed on downstream."""
        return self.decision.apply(self.request.raw)


@dataclass(frozen=True)
class Queued:
    """A deferred message as the runtime puts it into the queue: one recipient each."""

    sender: str
    recipient: str
    raw: bytes


class AppTester:
    """Drive an `App` in process with a clock you control.

    `raise_errors` (default True): a handler's exception is raised from
    `send`; False returns the tempfail `Result` instead (its `Result.error`
    is the exception).
    """

    def __init__(self, app: App, now: float | None = None, *, raise_errors: bool = True) -> None:
        self.app = app
        self.now = time.time() if now is None else now
        self.raise_errors = raise_errors
        self.results: list[Result] = []
        #: Deferred messages not yet run from the queue (`run_deferred`), oldest first.
        self.queued: list[Queued] = []
        self._sessions: list[Session] = []

    @classmethod
    def from_directory(
        cls,
        directory: str | Path,
        storage: StateStorage | None = None,
        overrides: Mapping[str, Any] | None = None,
        now: float | None = None,
        *,
        raise_errors: bool = True,
    ) -> "AppTester":
        """Load an application directory with in-memory state (or the given storage).

        An application with models (``app/models.py``) gets an in-memory
        SQLite database of its own instead, with the framework's tables and
        the models' created: ``ctx.db`` works, and `db` reads the rows.
        """
        from .models import empty_storage
        from .settings import load_app

        if storage is None:
            storage = empty_storage(directory)
        app = load_app(directory, overrides, storage=storage)
        return cls(app, now, raise_errors=raise_errors)

    def db(self) -> Session:
        """A SQLAlchemy `Session` on the application's database, to read rows and to arrange them.

        ``t.db().scalars(select(Ticket)).all()`` reads what the handlers committed; to arrange
        rows before a message, add them and ``commit()``.  Before each `send` (and `state`,
        `data`) the tester ends every session it handed out (``rollback()``: objects are read
        again on their next use), so its transaction never blocks the application's; a session
        with changes not yet committed is an error there, not lost in silence.
        """
        from sqlalchemy.orm import Session

        engine = getattr(self.app.storage, "_engine", None)
        if engine is None:
            raise RuntimeError(
                f"AppTester.db(): the state store is {type(self.app.storage).__name__}, not a SQL database; "
                "an application with app/models.py gets one from AppTester.from_directory")
        session = Session(engine, expire_on_commit=False)
        self._sessions.append(session)
        return session

    def _release(self) -> None:
        """End the transactions of the sessions `db` handed out (see there)."""
        for session in self._sessions:
            if session.new or session.dirty or session.deleted:
                raise AssertionError("a session from AppTester.db() has changes not committed: "
                                     "call its commit() before sending mail (or rollback() to drop them)")
            session.rollback()

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def send(
        self,
        sender: str,
        to: str | Iterable[str],
        subject: str = "test",
        body: str = "Hello.\n",
        headers: Mapping[str, str] | None = None,
        *,
        raw: bytes | None = None,
        queue_id: str | None = None,
        commit: bool = True,
        expect_tempfail: bool = False,
        from_queue: bool = False,
    ) -> Result:
        """Process one message from `sender` to `to` (a raw message may be given instead).

        `from_queue` runs it as ``lamsonfilter deq`` does (``ctx.from_queue``
        True).  A deferral (``ctx.defer()``, committed) adds the message to
        `queued` for each deferred recipient.

        Raises the handler's exception when one raised, unless
        `expect_tempfail` (or ``raise_errors=False``): then the result is
        the tempfail decision the MTA would get.
        """
        self._release()
        rcpts = (to,) if isinstance(to, str) else tuple(to)
        if raw is None:
            raw = make_message(sender, rcpts, subject, body, headers)
        request = MailRequest.from_bytes(raw, sender=sender, recipients=rcpts, queue_id=queue_id)
        request.from_queue = from_queue
        trace = Trace()
        result = Result(request, self.app.process(request, commit=commit, now=self.now, trace=trace), trace)
        self.results.append(result)
        if commit and not result.decision.is_tempfail:
            self.queued.extend(Queued(request.sender, r, raw) for r in result.decision.deferred)
        if trace.error is not None and self.raise_errors and not expect_tempfail:
            raise trace.error
        return result

    def run_deferred(self, **kwargs: Any) -> list[Result]:
        """Run every queued message (`queued`) from the queue, as ``lamsonfilter deq`` would:
        one recipient each, ``ctx.from_queue`` True.  Keyword arguments go to `send`."""
        results = []
        while self.queued:
            q = self.queued.pop(0)
            results.append(self.send(q.sender, q.recipient, raw=q.raw, from_queue=True, **kwargs))
        return results

    def state(self, handler: str, key: str) -> str | None:
        """The committed state of `key` in `handler` (None when the key has none)."""
        self._release()
        with self.app.storage.transaction(commit=False) as tx:
            record = tx.get(f"{handler}:{key}")
        return record.state if record else None

    def data(self, handler: str, key: str) -> Mapping[str, Any]:
        self._release()
        with self.app.storage.transaction(commit=False) as tx:
            record = tx.get(f"{handler}:{key}")
        return record.data if record else {}

