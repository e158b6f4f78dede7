"""State in a SQL database: `SQLAlchemyStorage`, the production `StateStorage`.

The state machines' records, the outbox, the idempotency tokens and the
confirmation requests live in five tables (all prefixed ``lamsonfilter_``):
``state`` (one row per key: state name, JSON data, a version counter),
``outbox`` (messages committed: pending, sent -- purged after a while -- or
failed and kept), ``tokens`` (what `claim` has recorded), ``confirmations``
(`lamsonfilter.confirm`'s requests) and ``meta`` (the schema version before
Alembic; ``lamsonfilter_alembic_version`` has the revision).  A single-host deployment uses a SQLite
file; several filter hosts that must share state use PostgreSQL:

    storage = SQLAlchemyStorage("sqlite:////var/lib/lamsonfilter/state.db")
    storage.create_schema()            # what `lamsonfilter db init` runs
    with storage.transaction() as tx:
        rec = tx.get("mailinglist:python@lists.example.org:alice@example.com")
        tx.set("mailinglist:python@lists.example.org:alice@example.com",
               "CONFIRMING", {"token": "3f9a"})
    # committed here; an exception inside the block rolls everything back

``postgresql://user@db.example.org/mail`` works as well (it is mapped to
the psycopg 3 driver, ``postgresql+psycopg://``).

How transactions never lose an update
-------------------------------------

Every `transaction` has its own connection from one shared engine, so the
storage can be used from many threads at once (pymilter runs one thread
per SMTP connection).  Two transactions touching the same key serialise:

* **SQLite** locks the whole database for writing.  Each transaction starts
  with ``BEGIN IMMEDIATE`` (SQLAlchemy takes over transaction control from
  the sqlite3 module, as its documentation describes), so a second writer
  waits up to `lock_timeout` seconds (the SQLite busy timeout) before it
  even reads.  File databases use WAL journaling, so readers of the outbox
  do not block writers.
* **PostgreSQL** locks per key: `get`, `set` and `clear` take a
  transaction-scoped advisory lock on a 64-bit hash of the key before they
  touch the row, so even a key that does not exist yet serialises.  Other
  keys are not blocked.  Waiting is limited by PostgreSQL's
  ``lock_timeout`` (set to `lock_timeout` on every connection).

A read-modify-write is therefore safe as long as it calls `get` first
inside the transaction.

How errors surface
------------------

Nothing from SQLAlchemy or the database driver escapes; every failure is
one of the `lamsonfilter.state` errors, with the driver's exception chained
as ``__cause__`` and the database URL (password hidden) in the text:

* `StorageUnavailable` (a `StorageError`) -- the database is down or
  unreachable, locked for longer than `lock_timeout`, read-only or full:
  nothing this message did.  `App.process` defers the message (451 4.3.0)
  and marks the decision ``Cause.STORAGE`` (``deq`` counts no attempt).
* `StorageError` -- any other failure of the driver (a value it would not
  bind, a constraint), the URL is malformed or its driver is not installed.
  `App.process` defers the message (451 4.3.0).
* `ConflictError` -- a serialisation failure, a deadlock or a unique-key
  race with a concurrent transaction; run the message again.
* `SchemaMissingError` -- the tables are missing or belong to another
  schema version; the text names the command to run
  (``lamsonfilter db init --app DIR``).

Programming errors stay what they are: data that is not JSON-serialisable
raises `TypeError`, an over-long key `ValueError`.
"""

from __future__ import annotations

from .appschema import SQLAppSchema
from .confirmations import SQLConfirmations
from .outbox import SQLOutbox
from .outboxops import SQLOutboxOps
from .schema import METADATA, SCHEMA_VERSION
from .statetx import SQLAlchemyTransaction, SQLState

__all__ = ["SQLAlchemyStorage", "SQLAlchemyTransaction", "SCHEMA_VERSION", "METADATA"]


class SQLAlchemyStorage(SQLState, SQLOutbox, SQLOutboxOps, SQLConfirmations, SQLAppSchema):
    """`StateStorage` and `OutboxStorage` on SQLite or PostgreSQL through SQLAlchemy 2.

    `url` is a SQLAlchemy database URL; ``postgresql://`` and
    ``postgres://`` mean the psycopg 3 driver.  `lock_timeout` (seconds)
    bounds how long a transaction waits for another one holding the same
    key (PostgreSQL) or the database (SQLite) before `StorageError`.
    Nothing connects until the first use.  The parts: `SQLEngine`
    (connections, errors), `SQLSchema` (tables, revisions), `SQLAppSchema`
    (the application's tables and migrations), `SQLState`
    (state transactions), `SQLOutbox` (the outbox), `SQLOutboxOps` (the
    operator's list, retry and drop), `SQLConfirmations` (purging the
    confirmation requests of `lamsonfilter.confirm`).
    """
