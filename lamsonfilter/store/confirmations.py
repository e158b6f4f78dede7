"""The SQL store's confirmation requests: ``lamsonfilter_confirmations``, row by row.

`ConfirmationRows` does, on the Connection of one state transaction, what
`lamsonfilter.confirmstore.MemoryConfirmations` does in memory (the
`SQLAlchemyTransaction` delegates to it); `SQLConfirmations.purge_confirmations`
is the housekeeping's short DELETE.

Single use holds across processes and hosts: `use` is one ``UPDATE ...
WHERE used_at IS NULL``.  On PostgreSQL a second transaction using the same
token waits for the first one's row lock, then finds ``used_at`` set and
updates nothing (False); on SQLite writers are serialised anyway.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.engine import Connection

from ..confirmstore import ConfirmationRecord, same_sender
from .engine import SQLEngine, _check_text, _from_unix, _to_unix
from .schema import CONFIRMATIONS_TABLE

__all__ = ["ConfirmationRows", "SQLConfirmations"]

_C = CONFIRMATIONS_TABLE.c


class ConfirmationRows:
    """The confirmation rows seen through one open transaction's connection."""

    def __init__(self, storage: SQLEngine, conn: Connection) -> None:
        self._storage = storage
        self._conn = conn

    def add(self, record: ConfirmationRecord) -> None:
        _check_text("confirmation token hash", record.token_hash, 64)
        _check_text("confirmation kind", record.kind, 64)
        _check_text("confirmation sender", record.sender, 512)
        try:
            data = json.dumps(dict(record.data), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"confirmation data is not JSON-serialisable: {exc}") from exc
        with self._storage._errors("storing a confirmation request"):
            self._conn.execute(insert(CONFIRMATIONS_TABLE).values(
                token_hash=record.token_hash, kind=record.kind, sender=record.sender, data=data,
                message=None if record.message is None else bytes(record.message),
                created_at=_from_unix(record.created_at), expires_at=_from_unix(record.expires_at),
                used_at=None if record.used_at is None else _from_unix(record.used_at),
            ))

    def get(self, token_hash: str) -> ConfirmationRecord | None:
        _check_text("confirmation token hash", token_hash, 64)
        with self._storage._errors("reading a confirmation request"):
            row = self._conn.execute(select(CONFIRMATIONS_TABLE).where(_C.token_hash == token_hash)).first()
        if row is None:
            return None
        decoded: Any = json.loads(row.data)
        return ConfirmationRecord(
            token_hash=row.token_hash, kind=row.kind, sender=row.sender,
            data=decoded if isinstance(decoded, dict) else {},
            message=None if row.message is None else bytes(row.message),
            created_at=_to_unix(row.created_at) or 0.0, expires_at=_to_unix(row.expires_at) or 0.0,
            used_at=_to_unix(row.used_at),
        )

    def use(self, token_hash: str, now: float) -> bool:
        _check_text("confirmation token hash", token_hash, 64)
        with self._storage._errors("using a confirmation"):
            result = self._conn.execute(
                update(CONFIRMATIONS_TABLE)
                .where(_C.token_hash == token_hash, _C.used_at.is_(None))
                .values(used_at=_from_unix(now)),
                execution_options={"preserve_rowcount": True},
            )
        return int(result.rowcount) == 1

    def cancel(self, kind: str, sender: str) -> int:
        """Delete the unused requests of `kind` bound to `sender` (ignoring case).

        The database's ``lower()`` narrows the rows (SQLite's folds ASCII
        only); the exact case-insensitive comparison is Python's, as in
        `same_sender`.
        """
        _check_text("confirmation kind", kind, 64)
        _check_text("confirmation sender", sender, 512)
        with self._storage._errors("cancelling confirmation requests"):
            rows = self._conn.execute(
                select(_C.token_hash, _C.sender)
                .where(_C.kind == kind, _C.used_at.is_(None),
                       (func.lower(_C.sender) == sender.lower()) | (_C.sender == sender))
            ).all()
            gone = [r.token_hash for r in rows if same_sender(r.sender, sender)]
            if gone:
                self._conn.execute(delete(CONFIRMATIONS_TABLE).where(_C.token_hash.in_(gone)))
        return len(gone)


class SQLConfirmations(SQLEngine):
    """The housekeeping of the confirmation requests (a part of `SQLAlchemyStorage`)."""

    def purge_confirmations(self, expired_before: float, limit: int = 500) -> int:
        """Delete at most `limit` requests that expired before the Unix time `expired_before`,
        used or not, in one DELETE; returns how many."""
        if limit <= 0:
            return 0
        oldest = (
            select(_C.token_hash)
            .where(_C.expires_at < _from_unix(expired_before))
            .order_by(_C.expires_at)
            .limit(limit)
            .scalar_subquery()
        )
        with self._begin("purging confirmation requests") as conn:
            with self._errors("purging confirmation requests"):
                result = conn.execute(
                    delete(CONFIRMATIONS_TABLE).where(_C.token_hash.in_(oldest)),
                    execution_options={"preserve_rowcount": True},
                )
        return int(result.rowcount)
