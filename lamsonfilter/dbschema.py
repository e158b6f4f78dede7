"""Is the database ready for this code?  The check every daemon (and ``deq``) makes at start.

A database serves two lines of migrations (`lamsonfilter.store.migrate`):
lamsonfilter's own tables and the application's (``app/models.py`` with
revisions in ``APP_DIR/migrations/``).  `check_database` refuses one that
is behind either (the text names ``lamsonfilter db upgrade --app DIR``),
ahead of either (upgrade lamsonfilter, or deploy the application's newest
migrations), or without the schema at all (``lamsonfilter db init``):

    check_database(app.storage, app_dir, app.models)   # app.models: lamsonfilter.models.load_models

The in-memory store has no schema: nothing to check.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import MetaData

from .state import StateStorage

__all__ = ["check_database"]


def check_database(storage: StateStorage, app_dir: str | Path, models: MetaData | None) -> None:
    """Raise `SchemaMissingError` naming the command to run unless both lines are up to date."""
    storage.check_schema()
    from .store.appschema import SQLAppSchema

    if isinstance(storage, SQLAppSchema):
        storage.check_app_schema(app_dir, models)
