"""``ctx.db``: an ORM session on the very connection of the message's state transaction.

An application's models (``app/models.py``, `lamsonfilter.models`) are
read and written through one `AppSession` per message, bound to the
`Connection` that already holds the message's state changes and outbox.
So there is one commit for all three, made by the framework after the
handlers ran:

    ticket = Ticket(subject=ctx.header("Subject"), opened_by=ctx.sender)
    ctx.db.add(ticket)
    ctx.db.flush()                 # sends the INSERT now: ticket.id is known
    ctx.reply("opened.msg", ticket=ticket)
    return OPEN

`lamsonfilter.transaction.LazyTransaction` opens the session (after the
replay check, like every state call), calls `flush` before its commit
and `finish` afterwards, whatever happened.  A tempfail, an exception, a
passed deadline or a dry run rolls the connection back, and with it every
row the session wrote.  That is why a handler may not end the transaction
itself: `AppSession.commit`, `rollback` and `close` raise `HandlerError`
naming what to do instead.  ``ctx.db.begin_nested()`` (a SAVEPOINT) is
allowed: it commits nothing by itself.
"""

from __future__ import annotations

from typing import Any, NoReturn

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from ..diagnostics import StateWrite, Trace
from ..errors import HandlerError
from ..state import SchemaMissingError

__all__ = ["AppSession", "finish", "flush", "open_session", "translate"]

_WHY = ("the framework commits the application's rows together with the state and the outbox "
        "once every handler of the message has run, and rolls all of them back on a tempfail")


class AppSession(Session):
    """The `Session` a handler gets as ``ctx.db``; it cannot end the message's transaction.

    `writes` counts its flushes that sent changes (``ctx.defer()`` asks whether the deferring
    call wrote rows: `lamsonfilter.transaction.LazyTransaction.db_changed`).
    """

    writes = 0

    def commit(self) -> NoReturn:
        raise HandlerError(f"ctx.db.commit() is not allowed: {_WHY}; use ctx.db.flush() to send "
                           "the changes now (e.g. to learn a new row's id)")

    def rollback(self) -> NoReturn:
        raise HandlerError(f"ctx.db.rollback() is not allowed: {_WHY}; to give up, raise an "
                           "exception or call ctx.tempfail(), which roll back everything; "
                           "for a partial undo use `with ctx.db.begin_nested():`")

    def close(self) -> NoReturn:
        raise HandlerError(f"ctx.db.close() is not allowed: {_WHY}")


def open_session(conn: Connection, trace: Trace | None = None) -> AppSession:
    """An `AppSession` joined to `conn`'s transaction (it never commits it).

    With a `Trace` (dry runs, tests), every row a flush inserts, updates or
    deletes is recorded as a `StateWrite` keyed ``table:primary key``.
    """
    session = AppSession(bind=conn, join_transaction_mode="rollback_only", expire_on_commit=False)
    event.listen(session, "after_flush", _count)
    if trace is not None:
        event.listen(session, "after_flush", lambda s, _ctx: _record(s, trace))
    return session


def flush(session: AppSession, storage: Any) -> None:
    """Send what the session holds, before the commit; errors become `StorageError` and friends."""
    try:
        session.flush()
    except DBAPIError as exc:
        raise translate(exc, storage, "writing the application's rows") from exc


def translate(exc: BaseException, storage: Any, action: str = "a handler's statement on the application's rows",
              ) -> BaseException:
    """A driver's error raised in a handler as the store's `StorageError` (a conflict: `ConflictError`,
    so the message runs again; a missing table: `SchemaMissingError` naming ``db init``); any other
    exception unchanged."""
    to_store = getattr(storage, "_translate", None)
    if not isinstance(exc, DBAPIError) or to_store is None:
        return exc
    translated: BaseException = to_store(exc, action)
    if isinstance(translated, SchemaMissingError):  # the store would say its own tables are missing
        detail = " ".join(str(exc.orig or exc).split())
        translated = SchemaMissingError(
            f"{action}: a table of the application's models is missing in {storage.url} ({detail}); "
            f"{storage._init_hint()}")
    translated.__cause__ = exc
    return translated


def finish(session: AppSession) -> None:
    """Forget the session's objects and let go of the connection (the storage ends its transaction)."""
    Session.close(session)


def _count(session: Session, _flush_context: Any) -> None:
    if isinstance(session, AppSession) and (session.new or session.dirty or session.deleted):
        session.writes += 1


def _record(session: Session, trace: Trace) -> None:
    for op, objects in (("insert", session.new), ("update", session.dirty), ("delete", session.deleted)):
        for obj in objects:
            if op == "update" and not session.is_modified(obj):
                continue
            table = getattr(obj, "__tablename__", type(obj).__name__)
            key = f"{table}:{','.join(str(v) for v in _pk(session, obj))}"
            trace.record(StateWrite(key, op, None, _AFTER[op]))


_AFTER = {"insert": "inserted", "update": "updated", "delete": None}


def _pk(session: Session, obj: Any) -> tuple[Any, ...]:
    try:
        return tuple(session.identity_key(instance=obj)[1])
    except Exception:  # noqa: BLE001 -- an object without an identity names no key
        return ()
