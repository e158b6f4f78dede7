"""The help desk's own tables: tickets and the messages kept for each.

SQLAlchemy 2.x declarative models on the application's own `Base`; the
framework finds ``Base`` here and creates its tables with ``lamsonfilter db
init --app examples/helpdesk``.  Handlers read and write them through
``ctx.db``, a Session in the message's own transaction: a ticket row, the
state change and the reply commit together or not at all.

    ticket = Ticket(requester="alice@example.com", subject="Printer on fire",
                    status="open", opened_at=now)
    ctx.db.add(ticket)
    ctx.db.flush()              # the database assigns ticket.id
    ticket.number = ticket.id   # unique across filter hosts: no counter in memory

Ticket numbers come from the database's autoincrement id (a sequence on
PostgreSQL, ``AUTOINCREMENT`` on SQLite, so a deleted number is never
handed out again), so two filter hosts that open tickets at the same moment
never give out the same number.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, ForeignKey, Integer, LargeBinary, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    """The help desk's models (not the framework's: its tables start with ``lamsonfilter_``)."""


OPEN = "open"
CLOSED = "closed"


class Ticket(Base):
    """One request for help: who asked, about what, and whether it is still open."""

    __tablename__ = "helpdesk_ticket"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    #: What people see, as ``[#N]`` in subjects and in ``support+ticket-N@HOST``.  Equal to
    #: `id` (set right after the insert); a column of its own so that a help desk moved to
    #: another database can keep its numbers.
    number: Mapped[int | None] = mapped_column(Integer, unique=True)
    #: The envelope sender that opened the ticket, lower-cased.
    requester: Mapped[str] = mapped_column(String(512), index=True)
    subject: Mapped[str] = mapped_column(String(998))
    status: Mapped[str] = mapped_column(String(16), default=OPEN)
    opened_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    closed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    messages: Mapped[list["TicketMessage"]] = relationship(
        back_populates="ticket", order_by="TicketMessage.id", cascade="all, delete-orphan")

    def __repr__(self) -> str:
        return f"Ticket(#{self.number}, {self.status}, {self.requester!r}, {self.subject!r})"


class TicketMessage(Base):
    """One message of a ticket, as it arrived: the opening request and every reply."""

    __tablename__ = "helpdesk_message"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("helpdesk_ticket.id"), index=True)
    sender: Mapped[str] = mapped_column(String(512))
    subject: Mapped[str] = mapped_column(String(998))
    message_id: Mapped[str] = mapped_column(String(998), default="")
    #: The text a person reads (the first text/plain part, decoded).
    body: Mapped[str] = mapped_column(Text)
    #: The message exactly as received, to show or forward it unchanged later.
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    ticket: Mapped[Ticket] = relationship(back_populates="messages")

    def __repr__(self) -> str:
        return f"TicketMessage({self.sender!r}, {self.subject!r})"
