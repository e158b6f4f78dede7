"""The {{NAME}} application's own tables: SQLAlchemy 2 models on the application's own Base.

Handlers work with them through ``ctx.db``, a session in the message's own
transaction: the rows commit with the state and the outbox, or not at all.
After changing a model, make a migration and apply it:

    lamsonfilter db revision --app . -m "what changed"   # writes migrations/NNNN_what_changed.py
    lamsonfilter db upgrade --app .
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    """The application's models derive from this; lamsonfilter finds ``Base.metadata``."""


class Greeting(Base):
    """One row per sender greeted (table names start with the application's name)."""

    __tablename__ = "{{NAME}}_greeting"

    id: Mapped[int] = mapped_column(primary_key=True)
    sender: Mapped[str] = mapped_column(String(512), index=True)
    greeted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
