"""Is the database ready for this code?  The check every daemon (and ``deq``) makes at start.

A database serves two lines of migrations (`lamsonfilter.store.migrate`):
lamsonfilter's own tables and the application's (``app/models.py`` with
revisions in ``APP_DIR/migrations/``).  `check_database` refuses one that
is behind either (the text names ``lamsonfilter db upgrade --app DIR``),
ahead of either (upgrade lamsonfilter, or deploy the application's newest
migrations), or without the schema at all (``lamsonfilter db init``):

    check_database(app.storage, app_dir, app_models(app_dir))

The in-memory store has no schema: nothing to check.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from sqlalchemy import MetaData

from .state import StateStorage

__all__ = ["app_models", "check_database"]


def app_models(app_dir: str | Path) -> MetaData | None:
    """The application's models (``app/models.py``'s ``Base.metadata``), or None without the file.

    A `lamsonfilter.settings.SettingsError` names the file when it does not import.
    """
    from .settings import SettingsError, _import_app_package

    root = Path(app_dir).resolve()
    path = root / "app" / "models.py"
    if not path.is_file():
        return None
    try:
        module = importlib.import_module(f"{_import_app_package(root)}.models")
    except Exception as exc:
        raise SettingsError(f"{path}: {type(exc).__name__}: {exc}") from exc
    metadata = getattr(getattr(module, "Base", None), "metadata", None)
    if not isinstance(metadata, MetaData):
        raise SettingsError(f"{path} has no Base: declare `class Base(DeclarativeBase): pass` "
                            "(sqlalchemy.orm) and derive the models from it")
    return metadata


def check_database(storage: StateStorage, app_dir: str | Path, models: MetaData | None) -> None:
    """Raise `SchemaMissingError` naming the command to run unless both lines are up to date."""
    storage.check_schema()
    from .store.appschema import SQLAppSchema

    if isinstance(storage, SQLAppSchema):
        storage.check_app_schema(app_dir, models)
