"""The operator's side of the SQL outbox: list, count, retry and drop (``lamsonfilter outbox``).

Reads lock nothing and never touch a worker's claim.  A change (`retry_outbox`,
`drop_outbox`) is one short transaction that first locks the row
(``SELECT ... FOR UPDATE`` on PostgreSQL, where a worker claiming at that
moment skips it -- its claim query says ``SKIP LOCKED`` --; SQLite's
``BEGIN IMMEDIATE`` takes the database's write lock) and refuses with
`OutboxBusy` a message whose claim has not ended: a running worker, on this
host or another, is never changed under.  A claim whose lease passed holds
nothing (its worker died or lost it; a worker that comes back checks its
claim before each message, `OutboxStore.renew_claims`, and stops).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from sqlalchemy import delete, func, select, update

from ..state import OutboxBusy, OutboxEntry, OutboxNotFound
from .engine import _from_unix, _to_unix
from .outbox import _ITEM_COLUMNS, SQLOutbox
from .schema import OUTBOX_TABLE, SQLSchema

__all__ = ["SQLOutboxOps"]

_STATES = ("pending", "failed")
_ENTRY_COLUMNS = (*_ITEM_COLUMNS, OUTBOX_TABLE.c.failed_at, OUTBOX_TABLE.c.sent_at, OUTBOX_TABLE.c.claimed_by,
                  OUTBOX_TABLE.c.claimed_until)


class SQLOutboxOps(SQLSchema):
    """`lamsonfilter.state.OutboxStore`'s operator methods on SQLite and PostgreSQL."""

    def outbox_entries(self, states: Sequence[str] = _STATES, after: int = 0,
                       limit: int = 100) -> list[OutboxEntry]:
        """At most `limit` pending and/or failed messages with an id above `after`, by id."""
        unknown = set(states) - set(_STATES)
        if unknown:
            raise ValueError(f"outbox states are pending and failed, not {sorted(unknown)}")
        if limit <= 0 or not states:
            return []
        o = OUTBOX_TABLE.c
        stmt = select(*_ENTRY_COLUMNS).where(o.sent_at.is_(None), o.id > int(after))
        if set(states) == {"pending"}:
            stmt = stmt.where(o.failed_at.is_(None))
        elif set(states) == {"failed"}:
            stmt = stmt.where(o.failed_at.is_not(None))
        with self._begin("reading the outbox", read_only=True) as conn:
            with self._errors("reading the outbox"):
                rows = conn.execute(stmt.order_by(o.id).limit(limit)).all()
        return [_entry(row) for row in rows]

    def outbox_counts(self, now: float | None = None) -> dict[str, int]:
        """How many messages are ``pending``, ``failed``, and ``claimed`` (pending and held now)."""
        o = OUTBOX_TABLE.c
        held = _from_unix(time.time() if now is None else now)
        stmt = select(
            func.count().filter(o.failed_at.is_(None)),
            func.count().filter(o.failed_at.is_not(None)),
            func.count().filter(o.failed_at.is_(None), o.claimed_until >= held),
        ).where(o.sent_at.is_(None))
        with self._begin("counting the outbox", read_only=True) as conn:
            with self._errors("counting the outbox"):
                pending, failed, claimed = conn.execute(stmt).one()
        return {"pending": int(pending), "failed": int(failed), "claimed": int(claimed)}

    def outbox_entry(self, id: int) -> OutboxEntry:
        """One pending or failed message; `OutboxNotFound` otherwise."""
        with self._begin("reading the outbox", read_only=True) as conn:
            with self._errors("reading the outbox"):
                row = conn.execute(select(*_ENTRY_COLUMNS).where(OUTBOX_TABLE.c.id == int(id))).first()
        return _found(id, row)

    def retry_outbox(self, id: int, now: float | None = None) -> OutboxEntry:
        """Make message `id` pending and due now; refuses one a worker holds (`OutboxBusy`)."""
        o = OUTBOX_TABLE.c
        action = "retrying an outbox message"
        with self._begin(action) as conn:
            with self._errors(action):
                self._lock_free_row(conn, id, now)
                conn.execute(
                    update(OUTBOX_TABLE).where(o.id == int(id))
                    .values(failed_at=None, next_attempt_at=None, claimed_by=None, claimed_until=None)
                )
                row = conn.execute(select(*_ENTRY_COLUMNS).where(o.id == int(id))).first()
        return _found(id, row)

    def drop_outbox(self, id: int, now: float | None = None) -> OutboxEntry:
        """Delete pending or failed message `id`; refuses one a worker holds (`OutboxBusy`)."""
        action = "dropping an outbox message"
        with self._begin(action) as conn:
            with self._errors(action):
                entry = self._lock_free_row(conn, id, now)
                conn.execute(delete(OUTBOX_TABLE).where(OUTBOX_TABLE.c.id == int(id)))
        return entry

    def _lock_free_row(self, conn: Any, id: int, now: float | None) -> OutboxEntry:
        """Lock row `id` for this transaction; raise unless it is pending or failed and unheld."""
        stmt = select(*_ENTRY_COLUMNS).where(OUTBOX_TABLE.c.id == int(id))
        if self.backend == "postgresql":
            stmt = stmt.with_for_update()
        entry = _found(id, conn.execute(stmt).first())
        when = time.time() if now is None else now
        if entry.held(when):
            left = (entry.claimed_until or when) - when
            raise OutboxBusy(f"outbox message {id} is being sent by {entry.claimed_by} "
                             f"(its claim ends in {left:.0f}s); try again later")
        return entry


def _found(id: int, row: Any) -> OutboxEntry:
    if row is None or row.sent_at is not None:
        why = "it was sent" if row is not None else "no such id"
        raise OutboxNotFound(f"no pending or failed outbox message {id} ({why})")
    return _entry(row)


def _entry(row: Any) -> OutboxEntry:
    return OutboxEntry(
        item=SQLOutbox._outbox_item(row),
        state="failed" if row.failed_at is not None else "pending",
        claimed_by=row.claimed_by if row.failed_at is None else None,
        claimed_until=_to_unix(row.claimed_until) if row.failed_at is None else None,
    )
