"""The SQL store's state: one transaction per message, keys locked as they are read.

`SQLState.transaction` opens a `SQLAlchemyTransaction` (the
`lamsonfilter.state.StateTransaction` of the SQL store); `scan` and
`delete_keys` are the short, lock-free reads and deletes of housekeeping.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

from sqlalchemy import delete, func, insert, select, text
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection

from ..confirmstore import ConfirmationRecord
from ..decisions import OutboxMessage
from ..state import StateRecord
from .confirmations import ConfirmationRows
from .engine import _check_text, _lock_id, _now
from .schema import MAX_KEY_LENGTH, MAX_STATE_LENGTH, MAX_TOKEN_LENGTH, OUTBOX_TABLE, STATE_TABLE, TOKENS_TABLE, SQLSchema

__all__ = ["SQLState", "SQLAlchemyTransaction"]


class SQLState(SQLSchema):
    """The state half of a SQL storage (`lamsonfilter.state.StateStorage` minus the outbox)."""

    # ------------------------------------------------------------ protocol
    @contextmanager
    def transaction(self, commit: bool = True) -> Iterator["SQLAlchemyTransaction"]:
        """A `SQLAlchemyTransaction`; commits on normal exit (rolls back if not `commit`).

        An exception inside the block rolls back and propagates unchanged.
        """
        with self._begin("the state transaction", commit=commit) as conn:
            tx = SQLAlchemyTransaction(self, conn)
            try:
                yield tx
            finally:
                tx._active = False


    def scan(self, prefix: str, after: str = "", limit: int = 500) -> list[tuple[str, StateRecord]]:
        """At most `limit` records whose key starts with `prefix` and sorts after
        `after`, in key order; a read-only transaction that locks no key (and on
        SQLite does not take the write lock)."""
        _check_text("key prefix", prefix, MAX_KEY_LENGTH)
        if limit <= 0:
            return []
        s = STATE_TABLE.c
        stmt = (
            select(s.key, s.state, s.data)
            # substr, not LIKE: exact and case-sensitive on both back ends
            .where(func.substr(s.key, 1, len(prefix)) == prefix, s.key > after)
            .order_by(s.key)
            .limit(limit)
        )
        with self._begin("scanning state", read_only=True) as conn:
            with self._errors("scanning state"):
                rows = conn.execute(stmt).all()
        return [(row.key, SQLAlchemyTransaction._decode(row.state, row.data)) for row in rows]

    def delete_keys(self, keys: Sequence[str]) -> int:
        """Forget these keys in one DELETE (one short transaction); returns how many existed."""
        wanted = sorted(set(keys))
        if not wanted:
            return 0
        for key in wanted:
            _check_text("state key", key, MAX_KEY_LENGTH)
        with self._begin("deleting state") as conn:
            with self._errors("deleting state"):
                result = conn.execute(
                    delete(STATE_TABLE).where(STATE_TABLE.c.key.in_(wanted)),
                    execution_options={"preserve_rowcount": True},
                )
        return int(result.rowcount)



class SQLAlchemyTransaction:
    """One open transaction of a `SQLAlchemyStorage` (see `StateTransaction`).

    Only valid inside its ``with storage.transaction()`` block, and only in
    the thread that opened it.
    """

    def __init__(self, storage: SQLState, conn: Connection) -> None:
        self._storage = storage
        self._conn = conn
        self._active = True
        self._locked: set[str] = set()

    @property
    def connection(self) -> Connection:
        """The connection this transaction runs on (``ctx.db`` joins it: `lamsonfilter.store.session`)."""
        self._check_active()
        return self._conn

    # ------------------------------------------------------------ helpers
    def _check_active(self) -> None:
        if not self._active:
            raise RuntimeError("this state transaction has already ended")

    def _lock(self, key: str) -> None:
        """Serialise on `key` until the transaction ends (PostgreSQL; SQLite already is)."""
        if self._storage.backend != "postgresql" or key in self._locked:
            return
        self._conn.execute(
            text("SELECT pg_advisory_xact_lock(CAST(:id AS BIGINT))"), {"id": _lock_id(key)}
        )
        self._locked.add(key)

    @staticmethod
    def _decode(state: str, data: str) -> StateRecord:
        decoded = json.loads(data)
        return StateRecord(state, decoded if isinstance(decoded, dict) else {})

    # ------------------------------------------------------------ protocol
    def get(self, key: str) -> StateRecord | None:
        """The record for `key` (None if none), locking the key until the transaction ends."""
        self._check_active()
        _check_text("state key", key, MAX_KEY_LENGTH)
        s = STATE_TABLE.c
        with self._storage._errors("reading state"):
            self._lock(key)
            row = self._conn.execute(select(s.state, s.data).where(s.key == key)).first()
        return None if row is None else self._decode(row.state, row.data)

    def set(self, key: str, state: str, data: Mapping[str, Any] | None = None) -> None:
        """Store `state` (and `data`, default: keep the old data) for `key`.

        `data` must be JSON-serialisable with str keys (tuples come back
        as lists); otherwise `TypeError`.
        """
        self._check_active()
        _check_text("state key", key, MAX_KEY_LENGTH)
        _check_text("state name", state, MAX_STATE_LENGTH)
        encoded = None
        if data is not None:
            try:
                encoded = json.dumps(
                    dict(data), ensure_ascii=False, allow_nan=False, separators=(",", ":")
                )
            except (TypeError, ValueError) as exc:
                raise TypeError(f"state data for {key!r} is not JSON-serialisable: {exc}") from exc
        values = {
            "key": key,
            "state": state,
            "data": "{}" if encoded is None else encoded,
            "version": 1,
            "updated_at": _now(),
        }
        with self._storage._errors("writing state"):
            self._lock(key)
            if self._storage.backend == "postgresql":
                pg = pg_dialect.insert(STATE_TABLE).values(values)
                changes: dict[str, Any] = {
                    "state": pg.excluded.state,
                    "version": STATE_TABLE.c.version + 1,
                    "updated_at": pg.excluded.updated_at,
                }
                if encoded is not None:
                    changes["data"] = pg.excluded.data
                self._conn.execute(
                    pg.on_conflict_do_update(index_elements=[STATE_TABLE.c.key], set_=changes)
                )
            else:
                lite = sqlite_dialect.insert(STATE_TABLE).values(values)
                changes = {
                    "state": lite.excluded.state,
                    "version": STATE_TABLE.c.version + 1,
                    "updated_at": lite.excluded.updated_at,
                }
                if encoded is not None:
                    changes["data"] = lite.excluded.data
                self._conn.execute(
                    lite.on_conflict_do_update(index_elements=[STATE_TABLE.c.key], set_=changes)
                )

    def clear(self, key: str) -> None:
        """Forget `key` (back to ``START``)."""
        self._check_active()
        _check_text("state key", key, MAX_KEY_LENGTH)
        with self._storage._errors("clearing state"):
            self._lock(key)
            self._conn.execute(delete(STATE_TABLE).where(STATE_TABLE.c.key == key))

    def find(self, prefix: str, state: str | None = None) -> list[tuple[str, StateRecord]]:
        """All keys starting with `prefix` (optionally only in `state`), sorted by key.

        ``%`` and ``_`` in `prefix` are literal characters.  The keys are not
        locked; `get` one before changing it.
        """
        self._check_active()
        _check_text("key prefix", prefix, MAX_KEY_LENGTH)
        s = STATE_TABLE.c
        stmt = select(s.key, s.state, s.data).where(s.key.startswith(prefix, autoescape=True))
        if state is not None:
            stmt = stmt.where(s.state == state)
        with self._storage._errors("searching state"):
            rows = self._conn.execute(stmt).all()
        # SQLite's LIKE ignores ASCII case and PostgreSQL sorts by collation:
        # filter and sort here so every back end answers like MemoryStorage.
        return sorted(
            ((row.key, self._decode(row.state, row.data)) for row in rows if row.key.startswith(prefix)),
            key=lambda item: item[0],
        )

    def add_outbox(self, messages: Sequence[OutboxMessage]) -> None:
        """Queue messages to send once this transaction has committed."""
        self._check_active()
        if not messages:
            return
        for m in messages:
            _check_text("outbox kind", m.kind, 32)
        now = _now()
        rows = [
            {
                "created_at": now,
                "sender": m.sender,
                "recipients": json.dumps(list(m.recipients), ensure_ascii=False),
                "raw": bytes(m.raw),
                "kind": m.kind,
                "attempts": 0,
            }
            for m in messages
        ]
        with self._storage._errors("queueing outbox messages"):
            self._conn.execute(insert(OUTBOX_TABLE), rows)

    def claim(self, token: str) -> bool:
        """Record an idempotency token; False if it was already recorded (a retry).

        A concurrent transaction claiming the same token waits for this one
        to end, then gets False (or True if this one rolled back).
        """
        self._check_active()
        _check_text("claim token", token, MAX_TOKEN_LENGTH)
        values = {"token": token, "created_at": _now()}
        with self._storage._errors("claiming a token"):
            if self._storage.backend == "postgresql":
                pg = pg_dialect.insert(TOKENS_TABLE).values(values).on_conflict_do_nothing(
                    index_elements=[TOKENS_TABLE.c.token]
                )
                result = self._conn.execute(pg, execution_options={"preserve_rowcount": True})
            else:
                lite = sqlite_dialect.insert(TOKENS_TABLE).values(values).on_conflict_do_nothing(
                    index_elements=[TOKENS_TABLE.c.token]
                )
                result = self._conn.execute(lite, execution_options={"preserve_rowcount": True})
        return result.rowcount == 1

    # -- the confirmation engine's rows (`lamsonfilter.store.confirmations`)
    def add_confirmation(self, record: ConfirmationRecord) -> None:
        """Store a new confirmation request."""
        self._check_active()
        ConfirmationRows(self._storage, self._conn).add(record)

    def get_confirmation(self, token_hash: str) -> ConfirmationRecord | None:
        """The request whose token has this SHA-256 (hex), or None."""
        self._check_active()
        return ConfirmationRows(self._storage, self._conn).get(token_hash)

    def use_confirmation(self, token_hash: str, now: float) -> bool:
        """Mark it used at `now`; False if it was used already (a concurrent one waits, then False)."""
        self._check_active()
        return ConfirmationRows(self._storage, self._conn).use(token_hash, now)

    def cancel_confirmations(self, kind: str, sender: str) -> int:
        """Forget the unused requests of `kind` bound to `sender`; returns how many."""
        self._check_active()
        return ConfirmationRows(self._storage, self._conn).cancel(kind, sender)
