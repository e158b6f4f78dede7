"""Fixtures shared by every test module: the state storage back ends (tests/rig/storage.py)."""

from tests.rig.storage import (  # noqa: F401 -- fixtures
    pg_schema,
    pg_url,
    sql_schema_url,
    sql_storage,
    sql_url,
    storage,
    two_storages,
)

