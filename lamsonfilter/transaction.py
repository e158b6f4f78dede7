"""The state transaction of one message, opened only when a handler first needs it.

`App.process` runs every handler of a message inside one `LazyTransaction`:

    with LazyTransaction(storage, commit, replay_key, deadline, trace) as tx:
        ...state functions read and write through tx...
    # committed here, or rolled back on an exception

Mail whose handlers touch neither state nor the outbox opens no database
transaction at all.  When it does open, the message's replay record is
read first, and a decision committed before is replayed (`Replayed`,
`lamsonfilter.store.replay`).  A
commit after the transport's deadline is refused (`DeadlinePassed`): the
MTA was already told 4xx and sends the message again.  With a
`lamsonfilter.diagnostics.Trace`, every write is recorded for the dry run.

``ctx.db`` (`db`) is an ORM session on the same connection
(`lamsonfilter.store.session`): flushed before the commit, rolled back
with everything else; a database error inside a handler (or at that
flush) ends as the `StorageError` the state store would have raised.

The confirmation engine's rows (``ctx.confirmations``,
`lamsonfilter.confirm`) go through it too, traced as "confirmation
asked" and "confirmation used"; `undo` does not take them back, so
``ctx.defer()`` after them is refused.

`mark()` before a state function, then `undo(mark)` (``ctx.defer()``:
that call's writes are taken back, the other recipients' stay) or
`keep()`.  A mark remembers each key's record before the call's first
write to it (as the call first read it, else read then), so it costs a
read only for a key the call writes without reading it first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .confirmstore import ConfirmationRecord
from .decisions import OutboxMessage
from .diagnostics import StateWrite, Trace
from .errors import HandlerError
from .state import StateRecord, StateStore
from .store import replay
from .store.replay import Replayed

__all__ = ["LazyTransaction", "DeadlinePassed", "Replayed"]


class DeadlinePassed(Exception):
    """`MailRequest.deadline` passed before the state transaction committed: rolled back, 4xx."""


@dataclass
class _Mark:
    """What a state function's call wrote so far: each key's record before its first write."""

    seen: dict[str, StateRecord | None] = field(default_factory=dict)  # as first read in the call
    written: list[str] = field(default_factory=list)  # in the order of their first write
    trace: list[StateWrite] = field(default_factory=list)
    db_writes: int = 0  # the session's flushes with changes before the call (`AppSession.writes`)


class LazyTransaction:
    """The state transaction of one message, opened only when a handler first needs it.

    Mail whose handlers touch neither state nor the outbox (a stateless
    route that adds a header, say) costs no database round trip at all; its
    decision has no side effects, so running it again on a retry is harmless
    and no replay record is kept.  When the transaction does open, the
    replay record is looked up *first*: if this message's decision was
    already committed, `Replayed` (`lamsonfilter.store.replay`) aborts the run before anything the
    handlers did can be committed a second time (R13, M4).
    """

    def __init__(self, storage: StateStore, commit: bool, replay_key: str | None,
                 deadline: float | None = None, trace: Trace | None = None) -> None:
        self._storage = storage
        self._commit = commit
        self._replay_key = replay_key
        self._deadline = deadline
        self._trace = trace
        self._cm: Any = None
        self._tx: Any = None
        self._mark: _Mark | None = None
        self._session: Any = None

    @property
    def opened(self) -> bool:
        return self._tx is not None

    @property
    def db(self) -> Any:
        """The message's `lamsonfilter.store.session.AppSession` (``ctx.db``), opened on first use."""
        if self._session is None:
            tx = self._open()
            conn = getattr(tx, "connection", None)
            if conn is None:
                raise HandlerError(
                    "ctx.db: models need a SQL database: set DATABASE_URL (the state store is in memory, "
                    f"{type(self._storage).__name__})")
            from .store.session import open_session

            self._session = open_session(conn, self._trace)
        return self._session

    def _open(self) -> Any:
        if self._tx is None:
            cm = self._storage.transaction(commit=self._commit)
            tx = cm.__enter__()
            self._cm, self._tx = cm, tx
            replay.check(tx, self._replay_key)
        return self._tx

    def __enter__(self) -> LazyTransaction:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool | None:
        if self._cm is None:
            return None
        cm, self._cm = self._cm, None
        session, self._session = self._session, None
        if session is not None:
            from .store.session import finish, flush, translate

            original = exc
            try:
                if exc is None:
                    flush(session, self._storage)  # before the deadline check: a late flush is late too
                else:
                    exc = translate(exc, self._storage)  # a handler's database error, as the store words it
            except BaseException as failed:  # the flush failed: roll back, raise its error
                exc, tb = failed, failed.__traceback__
            finally:
                finish(session)
            if exc is not None:
                handled = cm.__exit__(type(exc), exc, tb)  # rolls back
                if exc is not original:
                    raise exc
                return handled  # type: ignore[no-any-return]
        return self._end(cm, exc_type, exc, tb)

    def _end(self, cm: Any, exc_type: Any, exc: Any, tb: Any) -> bool | None:
        """End the storage's transaction: commit, or roll back on `exc` or a passed deadline."""
        if exc_type is None and self._deadline is not None and time.monotonic() > self._deadline:
            # the transport answered 4xx already: the MTA sends the message again, so
            # nothing of this run may be committed (no reply for a message not accepted)
            late = DeadlinePassed("the transport's deadline passed before the commit; rolled back")
            cm.__exit__(DeadlinePassed, late, None)
            raise late
        return cm.__exit__(exc_type, exc, tb)  # type: ignore[no-any-return]

    def mark(self) -> _Mark:
        """Start remembering the writes of one state function's call (see `undo`)."""
        self._mark = _Mark(trace=list(self._trace.writes) if self._trace is not None else [])
        if self._session is not None:  # the earlier calls' rows are theirs: sent before this call
            self._session.flush()
            self._mark.db_writes = self._session.writes
        return self._mark

    def db_changed(self) -> bool:
        """True when the current call (since `mark`) changed rows through ``ctx.db``: those
        cannot be taken back by `undo`, so ``ctx.defer()`` refuses."""
        session, mark = self._session, self._mark
        if session is None:
            return False
        before = mark.db_writes if mark is not None else 0
        return bool(session.writes > before or session.new or session.dirty or session.deleted)

    def keep(self) -> None:
        """The call ended normally: its writes stay; stop remembering."""
        self._mark = None

    def undo(self, mark: _Mark) -> None:
        """Put back every key `mark`'s call wrote, as it was before; forget them in the trace."""
        self._mark = None
        for key in reversed(mark.written):
            record = mark.seen[key]
            if record is None:
                self._tx.clear(key)
            else:
                self._tx.set(key, record.state, record.data)
        if self._trace is not None:
            self._trace.writes[:] = mark.trace

    def _remember(self, tx: Any, key: str) -> None:
        mark = self._mark
        if mark is not None and key not in mark.seen:  # a key read first costs no second read
            mark.seen[key] = tx.get(key)
        if mark is not None and key not in mark.written:
            mark.written.append(key)

    def get(self, key: str) -> StateRecord | None:
        record: StateRecord | None = self._open().get(key)
        if self._mark is not None and key not in self._mark.seen:
            self._mark.seen[key] = record
        return record

    def set(self, key: str, state: str, data: Mapping[str, Any] | None = None, *, bookkeeping: bool = False) -> None:
        tx = self._open()
        if not bookkeeping:
            self._remember(tx, key)
        before = self._before(tx, key) if not bookkeeping else None
        tx.set(key, state, data)
        if self._trace is not None and not bookkeeping:
            stored = tx.get(key)
            self._trace.record(StateWrite(key, "set", before, state, dict(stored.data) if stored else {}))

    def clear(self, key: str) -> None:
        tx = self._open()
        self._remember(tx, key)
        before = self._before(tx, key)
        tx.clear(key)
        if self._trace is not None:
            self._trace.record(StateWrite(key, "clear", before, None))

    def _before(self, tx: Any, key: str) -> str | None:
        """The state of `key` before this write, read only when tracing."""
        if self._trace is None:
            return None
        record = tx.get(key)
        return record.state if record is not None else None

    def find(self, prefix: str, state: str | None = None) -> list[tuple[str, StateRecord]]:
        return self._open().find(prefix, state)  # type: ignore[no-any-return]

    def add_outbox(self, messages: Sequence[OutboxMessage]) -> None:
        self._open().add_outbox(messages)

    def claim(self, token: str) -> bool:
        claimed: bool = self._open().claim(token)
        if claimed and self._trace is not None:
            self._trace.record(StateWrite(token, "claim", None, "CLAIMED"))
        return claimed

    # -- the confirmation engine (`lamsonfilter.confirm`); the dry run shows "confirmation asked/used"
    def add_confirmation(self, record: ConfirmationRecord) -> None:
        self._open().add_confirmation(record)
        if self._trace is not None:
            self._trace.record(StateWrite(_trace_key(record), "confirmation asked", None, "asked",
                                          {"sender": record.sender, "expires_at": record.expires_at}))

    def get_confirmation(self, token_hash: str) -> ConfirmationRecord | None:
        return self._open().get_confirmation(token_hash)  # type: ignore[no-any-return]

    def use_confirmation(self, token_hash: str, now: float) -> bool:
        tx = self._open()
        used: bool = tx.use_confirmation(token_hash, now)
        if used and self._trace is not None:
            record = tx.get_confirmation(token_hash)
            if record is not None:
                self._trace.record(StateWrite(_trace_key(record), "confirmation used", "asked", "used",
                                              {"sender": record.sender}))
        return used

    def cancel_confirmations(self, kind: str, sender: str) -> int:
        cancelled: int = self._open().cancel_confirmations(kind, sender)
        if cancelled and self._trace is not None:
            self._trace.record(StateWrite(f"confirmation:{kind}:{sender}", "confirmation cancelled", "asked",
                                          None, {"cancelled": cancelled}))
        return cancelled


def _trace_key(record: ConfirmationRecord) -> str:
    """How the trace names a confirmation: its kind and the start of its token's hash (never the token)."""
    return f"confirmation:{record.kind}:{record.token_hash[:12]}"
