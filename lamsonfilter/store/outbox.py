"""The SQL store's outbox: messages committed with the state, waiting for the relay.

`lamsonfilter.outboxworker.OutboxWorker` claims them (`claim_outbox`), records
per-recipient progress and marks them sent, deferred or failed.

Claims and leases
-----------------

Any number of workers -- threads, processes, filter hosts -- may send from
one database; each message goes to the relay once.  A worker *claims* the
messages it is about to send: in one short transaction it picks due
messages that nobody holds (``claimed_until`` empty or past) and writes its
name and a lease (``claimed_by``, ``claimed_until = now + lease``).  On
PostgreSQL the pick is ``SELECT ... FOR UPDATE SKIP LOCKED``, so workers
claiming at the same moment take different rows without waiting for each
other; on SQLite the transaction is ``BEGIN IMMEDIATE`` (the database's
write lock), so claims simply take turns.  While it sends, the worker
renews its lease (`renew_claims`), and a message it no longer holds is not
sent.  Deferring or failing a message ends the claim; a message sent is
marked sent.  A worker that dies (``kill -9``, a host lost, the database
connection cut) leaves its claims behind: they expire after the lease and
another worker takes the messages over, with the recipients still to do
(the progress recorded after every SMTP transaction).  What such a takeover
may repeat is only the one SMTP transaction the dead worker had handed to
the relay without recording it.  Leases are in the workers' clocks: keep
the hosts' clocks in step (NTP); the lease (minutes) dwarfs their skew.
"""

from __future__ import annotations

import json
import time
from typing import Any, Mapping, Sequence

from sqlalchemy import delete, insert, select, update

from ..decisions import OutboxMessage
from ..sentjournal import SentRecord, sent_token
from ..state import PendingOutbox
from .engine import _check_text, _from_unix, _now, _to_unix
from .schema import MAX_WORKER_LENGTH, OUTBOX_TABLE, SQLSchema

__all__ = ["SQLOutbox"]

_MARK_SENT_CHUNK = 500


_ITEM_COLUMNS = tuple(
    OUTBOX_TABLE.c[name]
    for name in ("id", "sender", "recipients", "raw", "kind", "attempts", "created_at",
                 "next_attempt_at", "last_error")
)


class SQLOutbox(SQLSchema):
    """The outbox half of a SQL storage (`lamsonfilter.state.OutboxStore`)."""

    def claim_outbox(self, worker: str, limit: int = 100, lease: float = 300.0,
                     due_before: float | None = None) -> list[PendingOutbox]:
        """Claim at most `limit` messages due by `due_before` that no worker holds, for
        `lease` seconds, oldest first; returns them (see the module docstring)."""
        _check_text("outbox worker name", worker, MAX_WORKER_LENGTH)
        if limit <= 0:
            return []
        o = OUTBOX_TABLE.c
        now = time.time()
        free = select(o.id).where(
            o.sent_at.is_(None),
            o.failed_at.is_(None),
            (o.claimed_until.is_(None)) | (o.claimed_until < _from_unix(now)),
        )
        if due_before is not None:
            free = free.where(
                (o.next_attempt_at.is_(None)) | (o.next_attempt_at <= _from_unix(due_before))
            )
        free = free.order_by(o.id).limit(limit)
        if self.backend == "postgresql":
            free = free.with_for_update(skip_locked=True)
        action = "claiming outbox messages"
        with self._begin(action) as conn:
            with self._errors(action):
                ids = list(conn.execute(free).scalars())
                if not ids:
                    return []
                conn.execute(
                    update(OUTBOX_TABLE)
                    .where(o.id.in_(ids))
                    .values(claimed_by=worker, claimed_until=_from_unix(now + lease))
                )
                rows = conn.execute(select(*_ITEM_COLUMNS).where(o.id.in_(ids)).order_by(o.id)).all()
        return [self._outbox_item(row) for row in rows]

    def renew_claims(self, worker: str, ids: Sequence[int], lease: float = 300.0) -> set[int]:
        """Extend `worker`'s lease on these messages by `lease` seconds from now; returns
        the ids it still holds (a message taken over, sent or failed is not among them)."""
        wanted = sorted({int(i) for i in ids})
        if not wanted:
            return set()
        o = OUTBOX_TABLE.c
        mine = (o.id.in_(wanted), o.claimed_by == worker, o.sent_at.is_(None), o.failed_at.is_(None))
        action = "renewing outbox claims"
        with self._begin(action) as conn:
            with self._errors(action):
                conn.execute(
                    update(OUTBOX_TABLE).where(*mine)
                    .values(claimed_until=_from_unix(time.time() + lease))
                )
                return set(conn.execute(select(o.id).where(*mine)).scalars())

    def release_claims(self, worker: str, ids: Sequence[int]) -> None:
        """Give up `worker`'s claims on these messages (not sent): any worker may take them now."""
        wanted = sorted({int(i) for i in ids})
        if not wanted:
            return
        o = OUTBOX_TABLE.c
        action = "releasing outbox claims"
        with self._begin(action) as conn:
            with self._errors(action):
                conn.execute(
                    update(OUTBOX_TABLE)
                    .where(o.id.in_(wanted), o.claimed_by == worker)
                    .values(claimed_by=None, claimed_until=None)
                )

    def pending_outbox(self, limit: int = 100, due_before: float | None = None) -> list[PendingOutbox]:
        """Committed outbox messages neither sent nor failed, oldest first; with
        `due_before` (a Unix time) only those whose next attempt is due by then."""
        if limit <= 0:
            return []
        o = OUTBOX_TABLE.c
        stmt = select(*_ITEM_COLUMNS).where(o.sent_at.is_(None), o.failed_at.is_(None))
        if due_before is not None:
            stmt = stmt.where(
                (o.next_attempt_at.is_(None)) | (o.next_attempt_at <= _from_unix(due_before))
            )
        with self._begin("reading the outbox", read_only=True) as conn:
            with self._errors("reading the outbox"):
                rows = conn.execute(stmt.order_by(o.id).limit(limit)).all()
        return [self._outbox_item(row) for row in rows]

    def failed_outbox(self, limit: int = 100) -> list[PendingOutbox]:
        """Outbox messages given up on, oldest first (for the operator)."""
        if limit <= 0:
            return []
        o = OUTBOX_TABLE.c
        stmt = select(*_ITEM_COLUMNS).where(o.failed_at.is_not(None))
        with self._begin("reading the outbox", read_only=True) as conn:
            with self._errors("reading the outbox"):
                rows = conn.execute(stmt.order_by(o.id).limit(limit)).all()
        return [self._outbox_item(row) for row in rows]

    @staticmethod
    def _outbox_item(row: Any) -> PendingOutbox:
        return PendingOutbox(
            id=row.id,
            message=OutboxMessage(
                sender=row.sender,
                recipients=tuple(json.loads(row.recipients)),
                raw=bytes(row.raw),
                kind=row.kind,
            ),
            attempts=row.attempts,
            created_at=_to_unix(row.created_at) or 0.0,
            next_attempt=_to_unix(row.next_attempt_at),
            last_error=row.last_error or "",
        )

    def mark_sent(self, ids: Sequence[int]) -> None:
        """Mark outbox messages as handed to the relay (unknown ids are ignored)."""
        wanted = sorted({int(i) for i in ids})
        if not wanted:
            return
        o = OUTBOX_TABLE.c
        with self._begin("marking outbox messages sent") as conn:
            with self._errors("marking outbox messages sent"):
                now = _now()
                for start in range(0, len(wanted), _MARK_SENT_CHUNK):
                    chunk = wanted[start : start + _MARK_SENT_CHUNK]
                    conn.execute(
                        update(OUTBOX_TABLE)
                        .where(o.id.in_(chunk), o.sent_at.is_(None))
                        .values(sent_at=now)
                    )

    def apply_sent(self, records: Sequence[SentRecord]) -> int:
        """Apply sent-journal lines (`lamsonfilter.sentjournal`) in one transaction: take each
        line's accepted recipients out of its message, or mark it sent when none is left.
        A line whose message is gone, sent, failed or has another token (a reused id, another
        database) changes nothing.  Idempotent; returns how many messages it changed."""
        done: dict[int, tuple[str, set[str]]] = {}
        for rec in records:
            token, rcpts = done.setdefault(int(rec.id), (rec.token, set()))
            if token == rec.token:
                rcpts.update(rec.done)
        if not done:
            return 0
        o = OUTBOX_TABLE.c
        stmt = select(o.id, o.raw, o.recipients).where(
            o.id.in_(sorted(done)), o.sent_at.is_(None), o.failed_at.is_(None))
        if self.backend == "postgresql":
            stmt = stmt.with_for_update()
        action = "applying the outbox's sent journal"
        changed = 0
        with self._begin(action) as conn:
            with self._errors(action):
                now = _now()
                for row in conn.execute(stmt.order_by(o.id)).all():
                    token, rcpts = done[row.id]
                    if sent_token(bytes(row.raw)) != token:
                        continue
                    before = json.loads(row.recipients)
                    left = [r for r in before if r not in rcpts]
                    if len(left) == len(before):
                        continue
                    values: dict[str, Any] = {"sent_at": now} if not left else {"recipients": self._recipients(left)}
                    conn.execute(update(OUTBOX_TABLE).where(o.id == row.id).values(**values))
                    changed += 1
        return changed

    def _update_outbox(self, action: str, id: int, values: Mapping[str, Any]) -> None:
        o = OUTBOX_TABLE.c
        with self._begin(action) as conn:
            with self._errors(action):
                conn.execute(
                    update(OUTBOX_TABLE)
                    .where(o.id == int(id), o.sent_at.is_(None), o.failed_at.is_(None))
                    .values(**values)
                )

    @staticmethod
    def _recipients(remaining: Sequence[str]) -> str:
        if not remaining:
            raise ValueError("an outbox message needs recipients")
        return json.dumps(list(remaining), ensure_ascii=False)

    def outbox_progress(self, id: int, remaining: Sequence[str]) -> None:
        """Some recipients are done: only `remaining` are ever sent the message again."""
        self._update_outbox(
            "recording outbox progress", id, {"recipients": self._recipients(remaining)}
        )

    def defer_outbox(self, id: int, remaining: Sequence[str], next_attempt: float, error: str) -> None:
        """A failed attempt: count it, keep only `remaining`, try again at `next_attempt`."""
        self._update_outbox(
            "deferring an outbox message",
            id,
            {
                "recipients": self._recipients(remaining),
                "attempts": OUTBOX_TABLE.c.attempts + 1,
                "next_attempt_at": _from_unix(next_attempt),
                "last_error": error,
                "claimed_by": None,
                "claimed_until": None,
            },
        )

    def fail_outbox(self, id: int, remaining: Sequence[str], error: str) -> None:
        """Give up: count the attempt, keep the message marked failed with `remaining`."""
        self._update_outbox(
            "marking an outbox message failed",
            id,
            {
                "recipients": self._recipients(remaining),
                "attempts": OUTBOX_TABLE.c.attempts + 1,
                "next_attempt_at": None,
                "failed_at": _now(),
                "last_error": error,
                "claimed_by": None,
                "claimed_until": None,
            },
        )

    def fail_recipients(self, id: int, recipients: Sequence[str], error: str) -> None:
        """Keep a failed copy of message `id` for `recipients`: a new row; `id` goes on."""
        o = OUTBOX_TABLE.c
        action = "keeping refused outbox recipients"
        with self._begin(action) as conn:
            with self._errors(action):
                row = conn.execute(
                    select(o.created_at, o.sender, o.raw, o.kind, o.attempts).where(
                        o.id == int(id), o.sent_at.is_(None), o.failed_at.is_(None)
                    )
                ).first()
                if row is None:
                    return
                conn.execute(
                    insert(OUTBOX_TABLE).values(
                        created_at=row.created_at,
                        sender=row.sender,
                        recipients=self._recipients(recipients),
                        raw=row.raw,
                        kind=row.kind,
                        attempts=row.attempts + 1,
                        failed_at=_now(),
                        last_error=error,
                    )
                )

    def purge_outbox(self, sent_before: float, limit: int = 500) -> int:
        """Delete at most `limit` messages marked sent before `sent_before` (a Unix
        time) in one DELETE; returns how many.  Failed and pending messages stay."""
        if limit <= 0:
            return 0
        o = OUTBOX_TABLE.c
        oldest = (
            select(o.id)
            .where(o.sent_at.is_not(None), o.sent_at < _from_unix(sent_before))
            .order_by(o.id)
            .limit(limit)
            .scalar_subquery()
        )
        with self._begin("purging sent outbox messages") as conn:
            with self._errors("purging sent outbox messages"):
                result = conn.execute(
                    delete(OUTBOX_TABLE).where(o.id.in_(oldest)),
                    execution_options={"preserve_rowcount": True},
                )
        return int(result.rowcount)
