"""The SQL state store: state, outbox, replay records and limits in SQLite or PostgreSQL.

The modules, by job:

* `lamsonfilter.store.engine` -- connections, transactions, error translation;
* `lamsonfilter.store.schema` -- the tables, checking and upgrading them;
* `lamsonfilter.store.migrate` -- Alembic driven in code: lamsonfilter's and the application's revisions;
* `lamsonfilter.store.appschema` -- the application's tables: upgrade, check, new revisions;
* `lamsonfilter.store.statetx` -- the state transaction of one message;
* `lamsonfilter.store.outbox` -- the outbox: claims, progress, sent/failed;
* `lamsonfilter.store.replay` -- replay records of committed decisions;
* `lamsonfilter.store.confirmations` -- the confirmation engine's requests;
* `lamsonfilter.store.sql` -- `SQLAlchemyStorage`, all of the above in one object.

The protocols they implement (`StateStorage`, `OutboxStorage`) and the
in-memory store for tests live in `lamsonfilter.state`.
"""
