"""What the application decided about one message: the `Decision` value.

A `Decision` is immutable data.  It says, per recipient, what happens
(`Outcome`: deliver, drop as consumed, defer to the queue, redirect, reject,
tempfail), what
changes on the message (`HeaderChange`, a new body, a new sender, quarantine)
and which new messages the handlers produced (the **outbox**).  Transports
turn it into protocol: `lamsonfilter.milterparts.plan` into milter actions, the
content filter into reinjection plus an SMTP reply.  Handlers never send
mail; the runtime sends the outbox after the state change has committed.

    >>> d = Decision.tempfail(("bob@example.org",), "database down", cause=Cause.STORAGE)
    >>> d.is_tempfail, d.outcomes[0].code, d.cause.value
    (True, 451, 'storage')

A tempfail says whose fault it was (`Cause`): ``message`` (a handler raised,
asked for a retry or ran out of time: this message may be poison) or
``storage`` (the database failed, whatever the message).  The milter and
the content filter answer the same 451 4.3.0 for both; ``deq`` counts only
``message`` towards ``POISON_LIMIT``.

`Decision.apply(raw)` returns the bytes to pass on: the original bytes when
nothing changed (never re-serialised), otherwise the original header block
with the edits applied textually and the body replaced if asked.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field, fields
from email.header import Header
from enum import Enum
from typing import Any, Iterable, Mapping

from .headercheck import (
    HeaderValueError,
    check_encoded_words,
    check_header_value,
    valid_header_name,
)
from .replies import TEMPFAIL

__all__ = [
    "Action",
    "Cause",
    "Outcome",
    "HeaderChange",
    "OutboxMessage",
    "MessageChanges",
    "Decision",
    "check_header_value",
    "HeaderValueError",
]


class Action(str, Enum):
    """The fate of one recipient."""

    DELIVER = "deliver"  #: pass the message on to this recipient
    DROP = "drop"  #: consumed by the application; nobody else gets it
    REDIRECT = "redirect"  #: deliver to other addresses instead
    REJECT = "reject"  #: permanent failure with code, enhanced code, text
    TEMPFAIL = "tempfail"  #: try again later (4xx)
    #: consumed now (as DROP), and the runtime puts the message into the queue for this
    #: recipient before the transport answers; ``lamsonfilter deq`` runs the handler later
    DEFER = "defer"

    def __str__(self) -> str:
        return self.value


class Cause(str, Enum):
    """Why a decision is a tempfail: whether retrying the message could ever end otherwise."""

    #: this message: a handler raised, asked for a retry (``ctx.tempfail()``) or ran out of time;
    #: the same message may fail the same way again (poison)
    MESSAGE = "message"
    #: the state database (or the queue's disk) failed, whatever the message: down, locked
    #: past the lock timeout, full, without the schema; it will pass once that is mended
    STORAGE = "storage"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Outcome:
    """One recipient's fate plus how it was reached (route, states) for reports."""

    recipient: str
    action: Action
    code: int | None = None
    enhanced: str | None = None
    text: str | None = None
    redirect_to: tuple[str, ...] = ()
    route: str | None = None
    handler: str | None = None
    state_before: str | None = None
    state_after: str | None = None

    def __post_init__(self) -> None:
        if self.action is Action.REJECT:
            if self.code is None or not 500 <= self.code <= 599:
                raise ValueError("a reject needs a 5xx code")
        if self.action is Action.TEMPFAIL:
            if self.code is None or not 400 <= self.code <= 499:
                raise ValueError("a tempfail needs a 4xx code")
        if self.action is Action.REDIRECT and not self.redirect_to:
            raise ValueError("a redirect needs at least one address")

    @property
    def reply(self) -> str:
        """The SMTP reply line for reject/tempfail, e.g. ``550 5.1.1 no such list``."""
        parts = [str(self.code or 250)]
        if self.enhanced:
            parts.append(self.enhanced)
        parts.append(self.text or "")
        return " ".join(p for p in parts if p)


@dataclass(frozen=True)
class HeaderChange:
    """Add, change or remove a header.

    For ``change`` and ``remove``, `index` is the 1-based occurrence of the
    header (as pymilter's ``chgheader``); ``add`` appends at the end of the
    header block.
    """

    op: str  # "add" | "change" | "remove"
    name: str
    value: str | None = None
    index: int = 1

    def __post_init__(self) -> None:
        if self.op not in ("add", "change", "remove"):
            raise ValueError(f"unknown header operation {self.op!r}")
        if self.op != "remove":
            if self.value is None:
                raise ValueError(f"{self.op} needs a value")
            check_header_value(self.name, self.value)
            check_encoded_words(self.name, self.value)  # README: checked after RFC 2047 decoding
        elif not valid_header_name(self.name):
            raise HeaderValueError(f"invalid header name {self.name!r}")
        if self.index < 1:
            raise ValueError("header index is 1-based")


@dataclass(frozen=True)
class OutboxMessage:
    """A message the application wants sent: envelope plus CRLF bytes.

    `kind` is ``reply`` for automatic replies (sent with ``MAIL FROM:<>``
    unless the application chose a sender) or ``message`` for new mail such
    as list posts.
    """

    sender: str
    recipients: tuple[str, ...]
    raw: bytes
    kind: str = "message"

    def __post_init__(self) -> None:
        if not self.recipients:
            raise ValueError("an outbox message needs recipients")


@dataclass
class MessageChanges:
    """The message-level part of a decision, collected from every recipient's handler."""

    headers: list[HeaderChange] = field(default_factory=list)
    body: bytes | None = None
    sender: str | None = None
    quarantine: str | None = None
    outbox: list[OutboxMessage] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def snapshot(self) -> tuple[Any, ...]:
        """What `restore` puts back: the changes as they are before one state function's call."""
        return (len(self.headers), self.body, self.sender, self.quarantine, len(self.outbox))

    def restore(self, snapshot: tuple[Any, ...]) -> None:
        """Drop what one call added (``ctx.defer()``); its notes stay, they explain the run."""
        headers, self.body, self.sender, self.quarantine, outbox = snapshot
        del self.headers[headers:]
        del self.outbox[outbox:]


@dataclass(frozen=True)
class Decision:
    """The whole answer for one message."""

    outcomes: tuple[Outcome, ...]
    header_changes: tuple[HeaderChange, ...] = ()
    body: bytes | None = None
    sender: str | None = None
    quarantine: str | None = None
    outbox: tuple[OutboxMessage, ...] = ()
    error: str | None = None
    notes: tuple[str, ...] = field(default=())
    #: for a tempfail, whose fault (`Cause`); None for every other decision
    cause: Cause | None = None

    # ------------------------------------------------------------ constructors
    @classmethod
    def deliver_all(cls, recipients: Iterable[str]) -> "Decision":
        return cls(tuple(Outcome(r, Action.DELIVER) for r in recipients))

    @classmethod
    def tempfail(
        cls, recipients: Iterable[str], error: str, text: str = TEMPFAIL.text,
        cause: Cause = Cause.MESSAGE,
    ) -> "Decision":
        """Every recipient deferred with ``451 4.3.0`` (the reply never says why, nor the cause)."""
        outcomes = tuple(
            Outcome(r, Action.TEMPFAIL, TEMPFAIL.code, TEMPFAIL.enhanced, text) for r in recipients
        )
        return cls(outcomes, error=error, cause=cause)

    # ------------------------------------------------------------ questions
    @property
    def is_tempfail(self) -> bool:
        """True when the message as a whole must be deferred (SMTP and milter have one reply)."""
        return self.error is not None or any(o.action is Action.TEMPFAIL for o in self.outcomes)

    @property
    def storage_failed(self) -> bool:
        """True for a tempfail the storage caused (`Cause.STORAGE`): not this message's fault."""
        return self.is_tempfail and self.cause is Cause.STORAGE

    @property
    def deferred(self) -> tuple[str, ...]:
        """The recipients whose message goes into the queue (``ctx.defer()``)."""
        return tuple(o.recipient for o in self.outcomes if o.action is Action.DEFER)

    @property
    def changes_message(self) -> bool:
        return bool(self.header_changes) or self.body is not None

    def by_action(self, action: Action) -> tuple[Outcome, ...]:
        return tuple(o for o in self.outcomes if o.action is action)

    @property
    def delivery_recipients(self) -> tuple[str, ...]:
        """Where the message goes on to: delivered recipients plus redirect targets, in order, once each."""
        seen: dict[str, None] = {}
        for o in self.outcomes:
            if o.action is Action.DELIVER:
                seen.setdefault(o.recipient)
            elif o.action is Action.REDIRECT:
                for r in o.redirect_to:
                    seen.setdefault(r)
        return tuple(seen)

    @property
    def kind(self) -> str:
        """A one-word summary for logs and reports."""
        if self.is_tempfail:
            return "tempfail"
        actions = {o.action for o in self.outcomes}
        if self.quarantine:
            return "quarantine"
        if actions == {Action.REJECT}:
            return "reject"
        if actions == {Action.DEFER}:
            return "defer"
        if not self.delivery_recipients:
            return "drop"
        if self.changes_message or self.sender is not None or actions - {Action.DELIVER}:
            return "modify"
        return "deliver"

    # ------------------------------------------------------------ storage
    def to_record(self) -> dict[str, Any]:
        """JSON-able form, without the outbox (it is committed on its own): the replay record.

        Every value is stored under its field's name, with the record's
        version (`RECORD_VERSION`), so a record written before a field was
        added reads back with the field's default, and one written by a
        newer lamsonfilter (another host, mid-upgrade) reads back without
        the fields this one does not know.
        """
        return {
            "v": RECORD_VERSION,
            "outcomes": [_named(o) for o in self.outcomes],
            "headers": [_named(h) for h in self.header_changes],
            "body": None if self.body is None else base64.b64encode(self.body).decode("ascii"),
            "sender": self.sender,
            "quarantine": self.quarantine,
            "notes": list(self.notes),
        }

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> "Decision":
        """The decision `to_record` stored (any version; version 1 was positional lists)."""
        body = rec.get("body")
        return cls(
            outcomes=tuple(_outcome(o) for o in rec["outcomes"]),
            header_changes=tuple(_header(h) for h in rec.get("headers", ())),
            body=None if body is None else base64.b64decode(body),
            sender=rec.get("sender"),
            quarantine=rec.get("quarantine"),
            notes=tuple(rec.get("notes", ())),
        )

    # ------------------------------------------------------------ bytes
    def apply(self, raw: bytes) -> bytes:
        """The message bytes to pass on; `raw` itself when nothing changed."""
        if not self.changes_message:
            return raw
        return apply_changes(raw, self.header_changes, self.body)


def _split_raw(raw: bytes) -> tuple[list[bytes], bytes, bytes]:
    """Split raw bytes into header fields (each with its continuation lines), the eol and the body."""
    # the header block's own line end (its first line's), not one seen later in the body
    first = raw.find(b"\n")
    eol = b"\n" if first >= 0 and raw[first - 1:first] != b"\r" else b"\r\n"
    lines = raw.split(b"\n")
    fields: list[bytes] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line in (b"", b"\r"):
            break
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\n" + line
        else:
            fields.append(line)
        i += 1
    if i >= len(lines):  # no blank line: headers only
        return fields, eol, b""
    body = b"\n".join(lines[i + 1:])
    return fields, eol, body


def apply_changes(
    raw: bytes, changes: Iterable[HeaderChange], body: bytes | None
) -> bytes:
    """Apply header edits and a body replacement to raw bytes, textually.

    Untouched header lines keep their exact bytes.  New values are encoded as
    RFC 2047 only when they are not ASCII.
    """
    fields, eol, old_body = _split_raw(raw)
    for ch in changes:
        name_b = ch.name.encode("ascii")
        matches = [
            i for i, f in enumerate(fields) if f.split(b":", 1)[0].strip().lower() == name_b.lower()
        ]
        if ch.op == "add":
            fields.append(_field(ch.name, ch.value or ""))
        elif ch.op == "change":
            if len(matches) >= ch.index:
                fields[matches[ch.index - 1]] = _field(ch.name, ch.value or "")
            else:  # as Postfix does for chgheader of a missing header
                fields.append(_field(ch.name, ch.value or ""))
        else:
            if len(matches) >= ch.index:
                del fields[matches[ch.index - 1]]
    head = b"\n".join(fields) + b"\n" if fields else b""
    if eol == b"\r\n":
        head = head.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    new_body = old_body if body is None else body
    return head + eol + new_body


def _field(name: str, value: str) -> bytes:
    """One header field, LF-separated continuation lines (the caller fixes line ends)."""
    if value.isascii():
        return f"{name}: {value}".encode("ascii")
    encoded = Header(value, "utf-8", header_name=name).encode(linesep="\n")
    return f"{name}: {encoded}".encode("ascii")


#: The version of `Decision.to_record`'s form.  1: positional lists (read, never written);
#: 2: every value under its field's name.
RECORD_VERSION = 2

_OUTCOME_FIELDS = tuple(f.name for f in fields(Outcome))
_HEADER_FIELDS = tuple(f.name for f in fields(HeaderChange))


def _named(value: Outcome | HeaderChange) -> dict[str, Any]:
    """A dataclass as {field name: JSON-able value} (enums by value, tuples as lists)."""
    out: dict[str, Any] = {}
    for f in fields(value):
        v = getattr(value, f.name)
        out[f.name] = v.value if isinstance(v, Enum) else list(v) if isinstance(v, tuple) else v
    return out


def _known(rec: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """The fields this version knows; a field missing takes its default, an unknown one is ignored."""
    return {name: rec[name] for name in names if name in rec}


def _outcome(rec: Any) -> Outcome:
    if isinstance(rec, (list, tuple)):  # version 1
        rec = dict(zip(_OUTCOME_FIELDS, rec))
    kw = _known(rec, _OUTCOME_FIELDS)
    kw["action"] = Action(kw["action"])
    if "redirect_to" in kw:
        kw["redirect_to"] = tuple(kw["redirect_to"])
    return Outcome(**kw)


def _header(rec: Any) -> HeaderChange:
    if isinstance(rec, (list, tuple)):  # version 1
        rec = dict(zip(_HEADER_FIELDS, rec))
    return HeaderChange(**_known(rec, _HEADER_FIELDS))
