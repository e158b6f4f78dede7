"""The confirmation engine's rows: `ConfirmationRecord`, and how a state transaction keeps them.

`lamsonfilter.confirm` (``ctx.confirmations``) asks for and verifies
confirmations; what it writes is one `ConfirmationRecord` per request,
stored through the message's state transaction (`StateTransaction`'s
``add_confirmation``, ``get_confirmation``, ``use_confirmation`` and
``cancel_confirmations``), so it commits -- or rolls back -- with the
state change and the outbox:

    with storage.transaction() as tx:
        tx.add_confirmation(ConfirmationRecord(sha256_hex, "subscribe", "alice@example.com",
                                               {"list": "python"}, None, now, now + 3600))
    with storage.transaction() as tx:        # a later message, on any filter host
        rec = tx.get_confirmation(sha256_hex)
        if rec is not None and tx.use_confirmation(sha256_hex, now):
            ...                              # this transaction used it; no other one can

The SQL store keeps the rows in ``lamsonfilter_confirmations``
(`lamsonfilter.store.confirmations`); `MemoryConfirmations` here is the
in-memory table of `lamsonfilter.memorystore.MemoryStorage`.  Only the SHA-256
of a token is ever stored.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = ["ConfirmationRecord", "MemoryConfirmations", "purge_memory", "same_sender"]


@dataclass(frozen=True)
class ConfirmationRecord:
    """One confirmation request as stored: `token_hash` is the SHA-256 (hex) of the token.

    `sender` is the address the token is bound to, as given (compared
    case-insensitively, `same_sender`); `data` the application's JSON
    object; `message` the pending message it keeps, if any; the times are
    Unix times (`used_at` None: not used yet).
    """

    token_hash: str
    kind: str
    sender: str
    data: Mapping[str, Any] = field(default_factory=dict)
    message: bytes | None = None
    created_at: float = 0.0
    expires_at: float = 0.0
    used_at: float | None = None


def same_sender(bound: str, given: str) -> bool:
    """Whether `given` is the address `bound` (ignoring case), in constant time for equal lengths."""
    return hmac.compare_digest(bound.lower().encode("utf-8", "surrogatepass"),
                               given.lower().encode("utf-8", "surrogatepass"))


class MemoryConfirmations:
    """The confirmation rows of one in-memory state transaction (a mixin of its class).

    `confirmations` is the transaction's own copy of the table; the storage
    keeps it on commit and drops it on rollback, as it does the state.
    """

    confirmations: dict[str, ConfirmationRecord]

    def add_confirmation(self, record: ConfirmationRecord) -> None:
        """Store a new request (its token hash is new: 128 random bits)."""
        if record.token_hash in self.confirmations:
            raise ValueError("a confirmation with this token hash exists already")
        self.confirmations[record.token_hash] = record

    def get_confirmation(self, token_hash: str) -> ConfirmationRecord | None:
        """The request whose token has this SHA-256, or None."""
        return self.confirmations.get(token_hash)

    def use_confirmation(self, token_hash: str, now: float) -> bool:
        """Mark the request used at `now`; False if it was used already (or is gone)."""
        record = self.confirmations.get(token_hash)
        if record is None or record.used_at is not None:
            return False
        self.confirmations[token_hash] = replace(record, used_at=now)
        return True

    def cancel_confirmations(self, kind: str, sender: str) -> int:
        """Forget the unused requests of `kind` bound to `sender`; returns how many."""
        gone = [h for h, r in self.confirmations.items()
                if r.kind == kind and r.used_at is None and same_sender(r.sender, sender)]
        for h in gone:
            del self.confirmations[h]
        return len(gone)


def purge_memory(table: dict[str, ConfirmationRecord], expired_before: float, limit: int) -> int:
    """Delete at most `limit` rows of `table` that expired before `expired_before`; how many."""
    old = sorted((r.expires_at, h) for h, r in table.items() if r.expires_at < expired_before)
    for _at, h in old[: max(0, limit)]:
        del table[h]
    return min(len(old), max(0, limit))
