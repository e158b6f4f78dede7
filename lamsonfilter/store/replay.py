"""Replay records: a message's committed decision, kept so that a retry replays it.

An MTA may send the same message again after lamsonfilter committed its
decision (the answer was lost, the connection cut, or the retry went to
another filter host on the same database).  The transport gives the core a
*replay key* for the message (`MailRequest.replay_key`); when the message's
handlers touched state or the outbox, the decision is stored under
``lamsonfilter:done:<replay key>`` in the same transaction as everything
else, and a retry finds it before any handler runs:

    key = record_key(request.replay_key)       # None: no replay for this message
    with storage.transaction() as tx:
        check(tx, key)                         # raises Replayed(decision) on a retry
        ...handlers...
        write(tx, key, decision, now)

Because the record is an ordinary state key, it is shared by every process
and host on the database, and the first transaction to commit wins: the
other waits on the key's lock (PostgreSQL) or the database (SQLite) and
then replays.  `purge` forgets records older than the MTA keeps retrying.
"""

from __future__ import annotations

import time
from typing import Any

from ..decisions import Decision
from ..state import StateStorage

__all__ = ["REPLAY_PREFIX", "Replayed", "record_key", "check", "write", "purge"]

#: State keys under which committed decisions are kept for replay (`MailRequest.replay_key`).
REPLAY_PREFIX = "lamsonfilter:done:"


class Replayed(Exception):
    """The replay key has a committed decision: use it, run nothing."""

    def __init__(self, decision: Decision) -> None:
        super().__init__("decision replayed")
        self.decision = decision


def record_key(replay_key: str | None) -> str | None:
    """The state key of a message's replay record (None: the message has no replay key)."""
    return f"{REPLAY_PREFIX}{replay_key}" if replay_key else None


def check(tx: Any, key: str | None) -> None:
    """Raise `Replayed` if `key` holds a committed decision (locks `key` until the end)."""
    if key is None:
        return
    done = tx.get(key)
    if done is not None:
        raise Replayed(Decision.from_record(done.data))


def write(tx: Any, key: str, decision: Decision, now: float) -> None:
    """Store `decision` as the replay record `key`, in the message's own transaction."""
    tx.set(key, "DONE", {**decision.to_record(), "at": now}, bookkeeping=True)


def purge(storage: StateStorage, older_than: float, now: float | None = None, batch: int = 500) -> int:
    """Forget replay records older than `older_than` seconds; returns how many.

    Keep them longer than the MTA retries a message (Postfix's
    ``maximal_queue_lifetime``, 5 days by default).  Works in batches of
    `batch` records: each is read without a write lock and its old
    records forgotten in one short transaction (one DELETE), so mail is
    never kept waiting behind the purge.
    """
    limit = (time.time() if now is None else now) - older_than
    removed, after = 0, ""
    while True:  # bounded: `after` moves forward through a finite key range
        records = storage.scan(REPLAY_PREFIX, after=after, limit=batch)
        old = [k for k, rec in records if float(rec.data.get("at", 0)) < limit]
        if old:
            removed += storage.delete_keys(old)
        if len(records) < batch:
            return removed
        after = records[-1][0]
