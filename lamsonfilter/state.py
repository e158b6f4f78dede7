"""Where the state machines keep their state: the `StateStore` and `OutboxStore` protocols.

State is stored per key (a string such as
``mailinglist:python@lists.example.org:alice@example.com``) as a
`StateRecord`: the name of the current state plus a small JSON-able dict of
data.  Everything a message changes happens inside one transaction, together
with the outbox of messages to send, so a tempfail or a crash commits
neither:

    with storage.transaction() as tx:
        rec = tx.get(key)              # locks `key` until the transaction ends
        tx.set(key, "CONFIRMING", {"token": token})
        tx.add_outbox(messages)
    # committed here; an exception inside the block rolls everything back

Two transactions touching the same key serialise: the second waits (or gets
`ConflictError`, and `App.process` runs the message again).  Implementations:
`MemoryStorage` here (tests, dry runs) and
`lamsonfilter.store.sql.SQLAlchemyStorage` (SQLite by default, PostgreSQL
when several filter hosts share state).  Both keep the two halves, the
state (`StateStore`) and the outbox (`OutboxStore`), in one database: a
`StateStorage`.
"""

from __future__ import annotations

import copy
import itertools
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Mapping, Protocol, Sequence

from .confirmstore import ConfirmationRecord, MemoryConfirmations, purge_memory
from .decisions import OutboxMessage
from .sentjournal import SentRecord, sent_token

__all__ = [
    "StateRecord",
    "StateTransaction",
    "StateStore",
    "OutboxStore",
    "StateStorage",
    "MemoryStorage",
    "StorageError",
    "StorageUnavailable",
    "ConflictError",
    "SchemaMissingError",
    "PendingOutbox",
    "OutboxEntry",
    "OutboxNotFound",
    "OutboxBusy",
]


class StorageError(Exception):
    """The state store failed; the message is deferred (451 4.3.0)."""


class StorageUnavailable(StorageError):
    """The database itself failed, whatever the message: it refused or lost the connection,
    stayed locked past the lock timeout, is read-only or full, or lacks the schema.

    The runtime marks such a tempfail ``Cause.STORAGE`` (`lamsonfilter.decisions.Cause`):
    ``deq`` then retries the message without counting an attempt towards ``POISON_LIMIT``
    and pauses its pool.  A `StorageError` that is not one of these (a value the driver
    would not bind, a constraint) may well be the message's doing and counts.
    """


class ConflictError(StorageError):
    """A concurrent transaction changed the same key; run the message again."""


class SchemaMissingError(StorageUnavailable):
    """The database has no (or an old) lamsonfilter schema; the text says what to run."""


@dataclass(frozen=True)
class StateRecord:
    state: str
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PendingOutbox:
    """An outbox message committed but not yet handed to the relay (or, from
    `StateStorage.failed_outbox`, one given up on).

    `message.recipients` are the recipients still to do: those a relay has
    accepted (or refused for good) are taken out as it goes.  `attempts`
    counts failed attempts; `created_at` and `next_attempt` are Unix times
    (`next_attempt` None: due now); `last_error` says why the last attempt failed.
    """

    id: int
    message: OutboxMessage
    attempts: int = 0
    created_at: float = 0.0
    next_attempt: float | None = None
    last_error: str = ""


@dataclass(frozen=True)
class OutboxEntry:
    """An outbox message as the operator sees it (`OutboxStore.outbox_entries`): the
    message, ``pending`` or ``failed``, and the worker holding it (``claimed_by``,
    until the Unix time ``claimed_until``; a claim whose time passed holds nothing)."""

    item: PendingOutbox
    state: str
    claimed_by: str | None = None
    claimed_until: float | None = None

    def held(self, now: float) -> bool:
        """Whether a worker holds it now (its lease has not ended)."""
        return self.claimed_until is not None and self.claimed_until >= now


class OutboxNotFound(LookupError):
    """No pending or failed outbox message with that id (never was, sent, or dropped)."""


class OutboxBusy(Exception):
    """A worker holds the outbox message (its lease has not ended): not changed under it."""


class StateTransaction(Protocol):
    def get(self, key: str) -> StateRecord | None:
        """The record for `key` (None if none), locking the key until the transaction ends."""

    def set(self, key: str, state: str, data: Mapping[str, Any] | None = None) -> None:
        """Store `state` (and `data`, default: keep the old data) for `key`."""

    def clear(self, key: str) -> None:
        """Forget `key` (back to ``START``)."""

    def find(self, prefix: str, state: str | None = None) -> list[tuple[str, StateRecord]]:
        """All keys starting with `prefix` (optionally only in `state`), sorted by key."""

    def add_outbox(self, messages: Sequence[OutboxMessage]) -> None:
        """Queue messages to send once this transaction has committed."""

    def claim(self, token: str) -> bool:
        """Record an idempotency token; False if it was already recorded (a retry)."""

    # -- the confirmation engine's rows (`lamsonfilter.confirmstore`, `lamsonfilter.confirm`)
    def add_confirmation(self, record: ConfirmationRecord) -> None:
        """Store a new confirmation request."""

    def get_confirmation(self, token_hash: str) -> ConfirmationRecord | None:
        """The request whose token has this SHA-256 (hex), or None."""

    def use_confirmation(self, token_hash: str, now: float) -> bool:
        """Mark it used at `now`; False if it was used already (by this or a concurrent transaction)."""

    def cancel_confirmations(self, kind: str, sender: str) -> int:
        """Forget the unused requests of `kind` bound to `sender`; returns how many."""


class StateStore(Protocol):
    """Where the state machines' records live: one transaction per message."""

    def transaction(self, commit: bool = True) -> Any:
        """A context manager yielding a `StateTransaction`; commits on success
        (rolls back instead when `commit` is False, for dry runs)."""

    def check_schema(self) -> None:
        """Raise `SchemaMissingError` naming the command to run when the schema is absent."""

    def create_schema(self) -> None:
        """Create (or upgrade) the tables; idempotent."""

    def scan(self, prefix: str, after: str = "", limit: int = 500) -> list[tuple[str, StateRecord]]:
        """At most `limit` records whose key starts with `prefix` and sorts after
        `after`, in key order; reads outside any transaction and locks nothing."""

    def delete_keys(self, keys: Sequence[str]) -> int:
        """Forget these keys in one short transaction (one statement); returns how many existed."""

    def purge_confirmations(self, expired_before: float, limit: int = 500) -> int:
        """Delete at most `limit` confirmation requests that expired before the Unix time
        `expired_before`, used or not (one statement); returns how many."""

    def close(self) -> None:
        """Release connections."""


class OutboxStore(Protocol):
    """Where committed outbox messages wait for `lamsonfilter.relay.OutboxWorker`.

    Messages enter the outbox only through `StateTransaction.add_outbox`,
    in the transaction that commits the state change they belong to; the
    worker then reads, sends and marks them through these methods.
    """

    def pending_outbox(self, limit: int = 100, due_before: float | None = None) -> list[PendingOutbox]:
        """Committed outbox messages neither sent nor failed, oldest first; with
        `due_before` (a Unix time) only those whose next attempt is due by then.
        Claimed or not: for counting and showing, not for sending (`claim_outbox`)."""

    def claim_outbox(self, worker: str, limit: int = 100, lease: float = 300.0,
                     due_before: float | None = None) -> list[PendingOutbox]:
        """Claim at most `limit` messages due by `due_before` that no worker holds (no
        claim, or its lease passed) for `worker`, for `lease` seconds; oldest first.
        Two workers never hold the same message (see `lamsonfilter.store.outbox`)."""

    def renew_claims(self, worker: str, ids: Sequence[int], lease: float = 300.0) -> set[int]:
        """Extend `worker`'s claims by `lease` seconds from now; returns the ids it still holds."""

    def release_claims(self, worker: str, ids: Sequence[int]) -> None:
        """Give up `worker`'s claims on these messages, unsent: any worker may take them."""

    def mark_sent(self, ids: Sequence[int]) -> None:
        """Mark outbox messages as handed to the relay (every recipient done)."""

    def outbox_progress(self, id: int, remaining: Sequence[str]) -> None:
        """Some recipients are done: only `remaining` are ever sent the message again."""

    def apply_sent(self, records: Sequence[SentRecord]) -> int:
        """Apply sent-journal lines (`lamsonfilter.sentjournal`): each line's recipients are
        done, a message with none left is sent; a line with another token changes nothing."""

    def defer_outbox(self, id: int, remaining: Sequence[str], next_attempt: float, error: str) -> None:
        """A failed attempt: count it, keep only `remaining`, try again at `next_attempt`
        (the claim ends)."""

    def fail_outbox(self, id: int, remaining: Sequence[str], error: str) -> None:
        """Give up: count the attempt and keep the message, marked failed, with the
        recipients that never got it (never deleted by `purge_outbox`; the claim ends)."""

    def fail_recipients(self, id: int, recipients: Sequence[str], error: str) -> None:
        """Keep a failed copy of message `id` for `recipients` (refused for good): a new
        row, as `fail_outbox` leaves one; the message itself goes on for the others."""

    def failed_outbox(self, limit: int = 100) -> list[PendingOutbox]:
        """Outbox messages given up on, oldest first (for the operator)."""

    def purge_outbox(self, sent_before: float, limit: int = 500) -> int:
        """Delete at most `limit` messages marked sent before the Unix time `sent_before`
        (one statement); returns how many.  Failed and pending messages stay."""

    # -- the operator's side (``lamsonfilter outbox``): reads lock nothing; each change is
    # -- one short transaction that refuses a message a worker holds (`OutboxBusy`)
    def outbox_entries(self, states: Sequence[str] = ("pending", "failed"), after: int = 0,
                       limit: int = 100) -> list[OutboxEntry]:
        """At most `limit` pending and/or failed messages with an id above `after`, by id."""

    def outbox_counts(self, now: float | None = None) -> dict[str, int]:
        """How many messages are ``pending``, ``failed``, and ``claimed`` (pending and held now)."""

    def outbox_entry(self, id: int) -> OutboxEntry:
        """One pending or failed message; `OutboxNotFound` otherwise."""

    def retry_outbox(self, id: int, now: float | None = None) -> OutboxEntry:
        """Make message `id` pending and due now (a failed one again, a waiting one at
        once); `OutboxBusy` if a worker holds it, `OutboxNotFound` if there is none."""

    def drop_outbox(self, id: int, now: float | None = None) -> OutboxEntry:
        """Delete pending or failed message `id` for good (returns what it was);
        `OutboxBusy` if a worker holds it, `OutboxNotFound` if there is none."""


class StateStorage(StateStore, OutboxStore, Protocol):
    """A store that keeps both, state and outbox, in one database (what
    `App.storage` is): `MemoryStorage`, `lamsonfilter.store.sql.SQLAlchemyStorage`.
    The outbox must share the state's database: `StateTransaction.add_outbox`
    commits messages with the state change they belong to."""


class MemoryStorage:
    """State and outbox in dicts (a `StateStorage`): for tests and dry runs.  One
    transaction at a time."""

    def __init__(self) -> None:
        self._records: dict[str, StateRecord] = {}
        self._tokens: set[str] = set()
        self._confirmations: dict[str, ConfirmationRecord] = {}
        self._outbox: dict[int, PendingOutbox] = {}  # pending
        self._sent: dict[int, float] = {}  # id -> when marked sent
        self._failed: dict[int, PendingOutbox] = {}
        self._claims: dict[int, tuple[str, float]] = {}  # id -> (worker, lease ends)
        self._ids = itertools.count(1)
        self._lock = threading.RLock()

    @contextmanager
    def transaction(self, commit: bool = True) -> Iterator["_MemoryTransaction"]:
        with self._lock:
            tx = _MemoryTransaction(copy.deepcopy(self._records), set(self._tokens), dict(self._confirmations))
            yield tx
            if commit:
                self._records = tx.records
                self._tokens = tx.tokens
                self._confirmations = tx.confirmations
                now = time.time()
                for msg in tx.outbox:
                    i = next(self._ids)
                    self._outbox[i] = PendingOutbox(i, msg, created_at=now)

    def check_schema(self) -> None:
        return None

    def create_schema(self) -> None:
        return None

    def pending_outbox(self, limit: int = 100, due_before: float | None = None) -> list[PendingOutbox]:
        with self._lock:
            items = [self._outbox[i] for i in sorted(self._outbox)]
        if due_before is not None:
            items = [p for p in items if p.next_attempt is None or p.next_attempt <= due_before]
        return items[: max(0, limit)]

    def claim_outbox(self, worker: str, limit: int = 100, lease: float = 300.0,
                     due_before: float | None = None) -> list[PendingOutbox]:
        with self._lock:
            now = time.time()
            free = [p for p in self.pending_outbox(len(self._outbox), due_before)
                    if self._claims.get(p.id, ("", 0.0))[1] < now][: max(0, limit)]
            for p in free:
                self._claims[p.id] = (worker, now + lease)
            return free

    def renew_claims(self, worker: str, ids: Sequence[int], lease: float = 300.0) -> set[int]:
        with self._lock:
            held = {i for i in ids if i in self._outbox and self._claims.get(i, ("", 0.0))[0] == worker}
            for i in held:
                self._claims[i] = (worker, time.time() + lease)
            return held

    def release_claims(self, worker: str, ids: Sequence[int]) -> None:
        with self._lock:
            for i in ids:
                if self._claims.get(i, ("", 0.0))[0] == worker:
                    del self._claims[i]

    def mark_sent(self, ids: Sequence[int]) -> None:
        with self._lock:
            now = time.time()
            for i in ids:
                self._claims.pop(i, None)
                if self._outbox.pop(i, None) is not None:
                    self._sent[i] = now

    def apply_sent(self, records: Sequence[SentRecord]) -> int:
        changed = set()
        for rec in records:
            item = self._outbox.get(rec.id)
            if item is None or sent_token(item.message.raw) != rec.token:
                continue
            left = [r for r in item.message.recipients if r not in rec.done]
            if len(left) < len(item.message.recipients):
                self.mark_sent([rec.id]) if not left else self.outbox_progress(rec.id, left)
                changed.add(rec.id)
        return len(changed)

    def outbox_progress(self, id: int, remaining: Sequence[str]) -> None:
        with self._lock:
            item = self._outbox.get(id)
            if item is not None:
                self._outbox[id] = replace(item, message=replace(item.message, recipients=tuple(remaining)))

    def defer_outbox(self, id: int, remaining: Sequence[str], next_attempt: float, error: str) -> None:
        with self._lock:
            item = self._outbox.get(id)
            if item is not None:
                self._outbox[id] = replace(
                    item, message=replace(item.message, recipients=tuple(remaining)),
                    attempts=item.attempts + 1, next_attempt=next_attempt, last_error=error,
                )
                self._claims.pop(id, None)

    def fail_outbox(self, id: int, remaining: Sequence[str], error: str) -> None:
        with self._lock:
            item = self._outbox.pop(id, None)
            self._claims.pop(id, None)
            if item is not None:
                self._failed[id] = replace(
                    item, message=replace(item.message, recipients=tuple(remaining)),
                    attempts=item.attempts + 1, next_attempt=None, last_error=error,
                )

    def fail_recipients(self, id: int, recipients: Sequence[str], error: str) -> None:
        with self._lock:
            item = self._outbox.get(id)
            if item is not None:
                i = next(self._ids)
                self._failed[i] = replace(
                    item, id=i, message=replace(item.message, recipients=tuple(recipients)),
                    attempts=item.attempts + 1, next_attempt=None, last_error=error,
                )

    def failed_outbox(self, limit: int = 100) -> list[PendingOutbox]:
        with self._lock:
            return [self._failed[i] for i in sorted(self._failed)][: max(0, limit)]

    def purge_outbox(self, sent_before: float, limit: int = 500) -> int:
        with self._lock:
            old = sorted(i for i, at in self._sent.items() if at < sent_before)[: max(0, limit)]
            for i in old:
                del self._sent[i]
            return len(old)

    def outbox_entries(self, states: Sequence[str] = ("pending", "failed"), after: int = 0,
                       limit: int = 100) -> list[OutboxEntry]:
        if set(states) - {"pending", "failed"}:
            raise ValueError(f"outbox states are pending and failed, not {list(states)}")
        with self._lock:
            ids = sorted(i for i in (*self._outbox, *self._failed) if i > after)
            found = [self._entry(i) for i in ids]
        return [e for e in found if e.state in states][: max(0, limit)]

    def outbox_counts(self, now: float | None = None) -> dict[str, int]:
        now = time.time() if now is None else now
        with self._lock:
            claimed = sum(1 for i in self._outbox if self._entry(i).held(now))
            return {"pending": len(self._outbox), "failed": len(self._failed), "claimed": claimed}

    def outbox_entry(self, id: int) -> OutboxEntry:
        with self._lock:
            return self._entry(id)

    def _entry(self, id: int) -> OutboxEntry:
        item, state = (self._outbox.get(id), "pending") if id in self._outbox else (self._failed.get(id), "failed")
        if item is None:
            raise OutboxNotFound(f"no pending or failed outbox message {id}")
        worker, until = self._claims.get(id, (None, None)) if state == "pending" else (None, None)
        return OutboxEntry(item, state, worker, until)

    def _free(self, id: int, now: float | None) -> OutboxEntry:
        entry = self._entry(id)
        if entry.held(time.time() if now is None else now):
            raise OutboxBusy(f"outbox message {id} is being sent by {entry.claimed_by}")
        return entry

    def retry_outbox(self, id: int, now: float | None = None) -> OutboxEntry:
        with self._lock:
            entry = self._free(id, now)
            self._failed.pop(id, None)
            self._claims.pop(id, None)
            self._outbox[id] = replace(entry.item, next_attempt=None)
            return self._entry(id)

    def drop_outbox(self, id: int, now: float | None = None) -> OutboxEntry:
        with self._lock:
            entry = self._free(id, now)
            self._failed.pop(id, None)
            self._outbox.pop(id, None)
            self._claims.pop(id, None)
            return entry

    def scan(self, prefix: str, after: str = "", limit: int = 500) -> list[tuple[str, StateRecord]]:
        with self._lock:
            found = sorted((k, r) for k, r in self._records.items() if k.startswith(prefix) and k > after)
        return [(k, StateRecord(r.state, copy.deepcopy(dict(r.data)))) for k, r in found[: max(0, limit)]]

    def delete_keys(self, keys: Sequence[str]) -> int:
        with self._lock:
            records = dict(self._records)
            n = sum(1 for k in set(keys) if records.pop(k, None) is not None)
            self._records = records
            return n

    def purge_confirmations(self, expired_before: float, limit: int = 500) -> int:
        with self._lock:
            return purge_memory(self._confirmations, expired_before, limit)

    def close(self) -> None:
        return None

    def __repr__(self) -> str:
        return "MemoryStorage()"


class _MemoryTransaction(MemoryConfirmations):
    def __init__(self, records: dict[str, StateRecord], tokens: set[str],
                 confirmations: dict[str, ConfirmationRecord]) -> None:
        self.records = records
        self.tokens = tokens
        self.confirmations = confirmations
        self.outbox: list[OutboxMessage] = []
        self.started = time.monotonic()

    def get(self, key: str) -> StateRecord | None:
        return self.records.get(key)

    def set(self, key: str, state: str, data: Mapping[str, Any] | None = None) -> None:
        if data is None:
            old = self.records.get(key)
            data = old.data if old else {}
        self.records[key] = StateRecord(state, copy.deepcopy(dict(data)))

    def clear(self, key: str) -> None:
        self.records.pop(key, None)

    def find(self, prefix: str, state: str | None = None) -> list[tuple[str, StateRecord]]:
        return sorted(
            (k, r)
            for k, r in self.records.items()
            if k.startswith(prefix) and (state is None or r.state == state)
        )

    def add_outbox(self, messages: Sequence[OutboxMessage]) -> None:
        self.outbox.extend(messages)

    def claim(self, token: str) -> bool:
        if token in self.tokens:
            return False
        self.tokens.add(token)
        return True
