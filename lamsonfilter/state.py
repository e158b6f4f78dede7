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
`lamsonfilter.memorystore.MemoryStorage` (tests, dry runs) and
`lamsonfilter.store.sql.SQLAlchemyStorage` (SQLite by default, PostgreSQL
when several filter hosts share state).  Both keep the two halves, the
state (`StateStore`) and the outbox (`OutboxStore`), in one database: a
`StateStorage`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence

from .confirmstore import ConfirmationRecord
from .decisions import OutboxMessage
from .sentjournal import SentRecord

__all__ = [
    "StateRecord",
    "StateTransaction",
    "StateStore",
    "OutboxStore",
    "StateStorage",
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
    """Where committed outbox messages wait for `lamsonfilter.outboxworker.OutboxWorker`.

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
    `App.storage` is): `lamsonfilter.memorystore.MemoryStorage`, `lamsonfilter.store.sql.SQLAlchemyStorage`.
    The outbox must share the state's database: `StateTransaction.add_outbox`
    commits messages with the state change they belong to."""
