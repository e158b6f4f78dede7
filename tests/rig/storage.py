"""The state storage back ends as pytest fixtures: memory, SQLite and PostgreSQL.

Tests that take `storage` run once per back end; `sql_storage` only on the
two SQL ones; `sql_url` is the URL of an empty database (no schema yet),
`sql_schema_url` of one with the schema, both on the two SQL back ends.
PostgreSQL is the server at ``LAMSONFILTER_TEST_PG_URL`` (default: the
rig's 127.0.0.1:5432, database ``test``): each test session gets a schema of
its own (`pg_schema`), dropped at the end, and `pg_url` empties it of
lamsonfilter's tables before each test.  An unreachable server skips those
cases, or fails them in CI (`tests.rig.fixtures.skip_or_fail`).

tests/conftest.py makes the fixtures available to every test module.
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import psycopg
import pytest
from sqlalchemy.engine import make_url

from lamsonfilter.memorystore import MemoryStorage
from lamsonfilter.state import StateStorage
from lamsonfilter.store.sql import SQLAlchemyStorage
from tests.rig.fixtures import skip_or_fail

__all__ = ["ALL_BACKENDS", "PG_URL", "SQL_BACKENDS", "TABLES", "backend_url", "open_sql", "pg_admin", "pg_schema",
           "pg_url", "pg_url_for", "ready_storage", "sql_schema_url", "sql_storage", "sql_url", "storage",
           "two_storages"]

PG_URL = os.environ.get("LAMSONFILTER_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
#: Every table a test may leave in the session's schema: lamsonfilter's, the version tables.
TABLES = ("lamsonfilter_state", "lamsonfilter_outbox", "lamsonfilter_tokens", "lamsonfilter_meta",
          "lamsonfilter_confirmations", "lamsonfilter_alembic_version", "app_alembic_version")


# ---------------------------------------------------------------- PostgreSQL
def pg_admin() -> psycopg.Connection[Any]:
    """An autocommit connection to the test server, as its administrator."""
    return psycopg.connect(PG_URL, autocommit=True, connect_timeout=5)


@pytest.fixture(scope="session")
def pg_schema() -> Iterator[str]:
    """A schema of this test session's own on the test server; dropped afterwards."""
    try:
        admin = pg_admin()
    except psycopg.Error as exc:
        reason = f"PostgreSQL at {make_url(PG_URL).render_as_string()} is unreachable: {exc}"
        skip_or_fail(reason)
    schema = f"lf_test_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
        try:
            yield schema
        finally:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


def pg_url_for(schema: str, password: str | None = None) -> str:
    """The test server's URL with `schema` as its search path (and `password`, if given)."""
    url = make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    if password is not None:
        url = url.set(password=password)
    return url.render_as_string(hide_password=False)


@pytest.fixture
def pg_url(pg_schema: str) -> str:
    """The session schema's URL, emptied of lamsonfilter tables first."""
    with pg_admin() as admin:
        for table in TABLES:
            admin.execute(f'DROP TABLE IF EXISTS "{pg_schema}"."{table}" CASCADE')
    return pg_url_for(pg_schema)


# ---------------------------------------------------------------- fixtures
SQL_BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
]
ALL_BACKENDS = [pytest.param("memory", id="memory"), *SQL_BACKENDS]


def open_sql(url: str, **kwargs: Any) -> SQLAlchemyStorage:
    """A `SQLAlchemyStorage` on `url` (no schema created)."""
    return SQLAlchemyStorage(url, **kwargs)


def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty database of the SQL back end in `request.param` (a file in `tmp_path`, or `pg_url`)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url


@contextmanager
def ready_storage(url: str) -> Iterator[SQLAlchemyStorage]:
    """A `SQLAlchemyStorage` on `url` with the schema created; closed at the end."""
    st = open_sql(url)
    try:
        st.create_schema()
        yield st
    finally:
        st.close()


@pytest.fixture(params=SQL_BACKENDS)
def sql_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL of an empty database (no schema) on SQLite and on PostgreSQL (or on the back end
    a test names with ``@pytest.mark.parametrize("sql_url", [...], indirect=True)``)."""
    return backend_url(request, tmp_path)


@pytest.fixture(params=SQL_BACKENDS)
def sql_schema_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL of a database with the schema created (no connection left open), on SQLite and on PostgreSQL."""
    url = backend_url(request, tmp_path)
    with ready_storage(url):
        pass
    return url


@pytest.fixture(params=ALL_BACKENDS)
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStorage]:
    """A ready storage (schema created) of each back end."""
    if request.param == "memory":
        yield MemoryStorage()
        return
    with ready_storage(backend_url(request, tmp_path)) as st:
        yield st


@pytest.fixture(params=SQL_BACKENDS)
def sql_storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SQLAlchemyStorage]:
    """A ready `SQLAlchemyStorage` on SQLite and on PostgreSQL."""
    with ready_storage(backend_url(request, tmp_path)) as st:
        yield st


@pytest.fixture
def two_storages(sql_url: str) -> Iterator[tuple[SQLAlchemyStorage, SQLAlchemyStorage]]:
    """Two storages on one SQL database, its schema made: two filter hosts sharing it."""
    a, b = SQLAlchemyStorage(sql_url), SQLAlchemyStorage(sql_url)
    a.create_schema()
    try:
        yield a, b
    finally:
        a.close()
        b.close()
