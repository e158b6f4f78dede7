"""State and outbox in this process's memory: `MemoryStorage`, the `StateStorage` of tests and dry runs.

It behaves like the SQL store (`lamsonfilter.store.sql.SQLAlchemyStorage`)
where a test can see it (a transaction commits the state, the tokens, the
confirmations and the outbox together, or none of them; one transaction at a
time), and keeps everything in dicts that die with the process::

    storage = MemoryStorage()
    with storage.transaction() as tx:
        tx.set("mailinglist:python@lists.example.org:alice@example.com", "PENDING")
"""

from __future__ import annotations

import copy
import itertools
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Iterator, Mapping, Sequence

from .confirmstore import ConfirmationRecord, MemoryConfirmations, purge_memory
from .decisions import OutboxMessage
from .sentjournal import SentRecord, sent_token
from .state import (
    OutboxBusy,
    OutboxEntry,
    OutboxNotFound,
    PendingOutbox,
    StateRecord,
)

__all__ = ["MemoryStorage"]


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
