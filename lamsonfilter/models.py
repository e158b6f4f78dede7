"""An application's own tables: ``app/models.py``, found and checked at start-up.

Beside ``app/handlers/``, an application may keep SQLAlchemy 2.x
declarative models on a base of its own, named ``Base``:

    # app/models.py
    from sqlalchemy import ForeignKey, String
    from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

    class Base(DeclarativeBase):
        pass

    class Ticket(Base):
        __tablename__ = "helpdesk_ticket"
        id: Mapped[int] = mapped_column(primary_key=True)
        subject: Mapped[str] = mapped_column(String(200))

Handlers import them (``from ..models import Ticket``) and use them through
``ctx.db``, a session in the message's own transaction
(`lamsonfilter.store.session`).  `load_models` imports the module from
the very package the handlers are imported from (`lamsonfilter.apppackage`),
so both see one `Base`; `App.models` is its ``Base.metadata``.
``lamsonfilter db init`` creates the tables (by the application's migrations,
`lamsonfilter.store.appschema`; `create_tables` makes them for tests and dry runs).

Refused at start-up (`ModelsError`, naming the file): a module without
``Base``, a ``Base`` that is not a `DeclarativeBase` subclass, a table whose
name starts with ``lamsonfilter_`` (the framework's own tables).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from sqlalchemy import MetaData
from sqlalchemy.orm import DeclarativeBase

from .app import StartupError
from .apppackage import AppPackageError, import_app_package
from .memorystore import MemoryStorage
from .state import StateStorage

__all__ = ["FRAMEWORK_PREFIX", "ModelsError", "create_app_tables", "create_tables", "empty_storage", "load_models"]

#: The prefix of the framework's own tables; an application's may not use it.
FRAMEWORK_PREFIX = "lamsonfilter_"


class ModelsError(StartupError):
    """``app/models.py`` cannot be used; the message names the file and what to fix."""


def load_models(app_dir: str | Path) -> MetaData | None:
    """The `MetaData` of ``APP_DIR/app/models.py``'s ``Base``, or None when there is no such file."""
    root = Path(app_dir).resolve()  # as `load_settings` names APP_DIR: one package, one Base
    path = root / "app" / "models.py"
    if not path.is_file():
        return None
    try:
        module = importlib.import_module(f"{import_app_package(root)}.models")
    except AppPackageError as exc:
        raise ModelsError(str(exc)) from None
    except Exception as exc:
        raise ModelsError(f"{path}: {type(exc).__name__}: {exc}") from exc
    base = getattr(module, "Base", None)
    if base is None:
        raise ModelsError(f"{path} has no Base: declare `class Base(DeclarativeBase): pass` "
                          "(sqlalchemy.orm) and derive the models from it")
    if not (isinstance(base, type) and issubclass(base, DeclarativeBase)) or base is DeclarativeBase:
        raise ModelsError(f"{path}: Base is {base!r}, not a subclass of sqlalchemy.orm.DeclarativeBase "
                          "(SQLAlchemy 2 declarative models: `class Base(DeclarativeBase): pass`)")
    metadata: MetaData = base.metadata
    taken = sorted(name for name in metadata.tables if _bare(name).startswith(FRAMEWORK_PREFIX))
    if taken:
        raise ModelsError(f"{path}: table {', '.join(taken)}: names starting with {FRAMEWORK_PREFIX!r} "
                          "belong to lamsonfilter's own tables; prefix the application's with its name")
    return metadata


def create_tables(storage: Any, metadata: MetaData | None) -> None:
    """Create the application's tables that are missing, in one transaction (``db init``).

    A simple ``metadata.create_all``: it never changes a table that exists.
    """
    if metadata is None or not metadata.tables:
        return
    with storage._begin("creating the application's tables") as conn:
        with storage._errors("creating the application's tables"):
            metadata.create_all(conn, checkfirst=True)


def create_app_tables(storage: Any, app_dir: str | Path) -> list[str]:
    """``db init``'s part for the application: load its models, create their missing tables.

    Returns the names of the application's tables (empty without ``app/models.py``).
    """
    metadata = load_models(app_dir)
    create_tables(storage, metadata)
    return sorted(metadata.tables) if metadata is not None else []


def empty_storage(app_dir: str | Path) -> StateStorage:
    """Empty state for tests and dry runs: `MemoryStorage`, or for an application with models an
    in-memory SQLite database (one connection, `StaticPool`) with every table created."""
    metadata = load_models(app_dir)
    if metadata is None:
        return MemoryStorage()
    from .store.sql import SQLAlchemyStorage

    storage = SQLAlchemyStorage("sqlite://")
    storage.create_schema()
    create_tables(storage, metadata)
    return storage


def _bare(name: str) -> str:
    """A table's name without its schema (``schema.table``)."""
    return name.rpartition(".")[2]
