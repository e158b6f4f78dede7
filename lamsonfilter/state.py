"""Where the state machines keep their state: the `StateStorage` protocol.

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
`lamsonfilter.sqlstate.SQLAlchemyStorage` (SQLite by default, PostgreSQL
when several filter hosts share state).
"""

from __future__ import annotations

import copy
import itertools
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Protocol, Sequence

from .decisions import OutboxMessage

__all__ = [
    "StateRecord",
    "StateTransaction",
    "StateStorage",
    "MemoryStorage",
    "StorageError",
    "ConflictError",
    "SchemaMissingError",
    "PendingOutbox",
]


class StorageError(Exception):
    """The state store failed; the message is deferred (451 4.3.0)."""


class ConflictError(StorageError):
    """A concurrent transaction changed the same key; run the message again."""


class SchemaMissingError(StorageError):
    """The database has no (or an old) lamsonfilter schema; the text says what to run."""


@dataclass(frozen=True)
class StateRecord:
    state: str
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PendingOutbox:
    """An outbox message committed but not yet handed to the relay."""

    id: int
    message: OutboxMessage
    attempts: int = 0


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


class StateStorage(Protocol):
    def transaction(self, commit: bool = True) -> Any:
        """A context manager yielding a `StateTransaction`; commits on success
        (rolls back instead when `commit` is False, for dry runs)."""

    def check_schema(self) -> None:
        """Raise `SchemaMissingError` naming the command to run when the schema is absent."""

    def create_schema(self) -> None:
        """Create (or upgrade) the tables; idempotent."""

    def pending_outbox(self, limit: int = 100) -> list[PendingOutbox]:
        """Committed outbox messages not yet marked sent, oldest first."""

    def mark_sent(self, ids: Sequence[int]) -> None:
        """Mark outbox messages as handed to the relay."""

    def close(self) -> None:
        """Release connections."""


class MemoryStorage:
    """State in a dict: for tests and dry runs.  One transaction at a time."""

    def __init__(self) -> None:
        self._records: dict[str, StateRecord] = {}
        self._tokens: set[str] = set()
        self._outbox: dict[int, PendingOutbox] = {}
        self._ids = itertools.count(1)
        self._lock = threading.RLock()

    @contextmanager
    def transaction(self, commit: bool = True) -> Iterator["_MemoryTransaction"]:
        with self._lock:
            tx = _MemoryTransaction(copy.deepcopy(self._records), set(self._tokens))
            yield tx
            if commit:
                self._records = tx.records
                self._tokens = tx.tokens
                for msg in tx.outbox:
                    i = next(self._ids)
                    self._outbox[i] = PendingOutbox(i, msg)

    def check_schema(self) -> None:
        return None

    def create_schema(self) -> None:
        return None

    def pending_outbox(self, limit: int = 100) -> list[PendingOutbox]:
        with self._lock:
            return [self._outbox[i] for i in sorted(self._outbox)][:limit]

    def mark_sent(self, ids: Sequence[int]) -> None:
        with self._lock:
            for i in ids:
                self._outbox.pop(i, None)

    def close(self) -> None:
        return None

    def __repr__(self) -> str:
        return "MemoryStorage()"


class _MemoryTransaction:
    def __init__(self, records: dict[str, StateRecord], tokens: set[str]) -> None:
        self.records = records
        self.tokens = tokens
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
