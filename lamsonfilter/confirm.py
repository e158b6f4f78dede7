"""The confirmation engine: ask somebody to confirm by mail, then verify the answer.

Lamson had a ``ConfirmationEngine``; this is it, kept in the state
database so that the answer may arrive at any filter host.  A handler
reaches it as ``ctx.confirmations``:

    from lamsonfilter.confirm import TOKEN_PATTERN, ConfirmStatus

    @handler.route("(list)-subscribe@(host)", event="subscribe")
    @handler.route("(list)-confirm-(token)@(host)", event="confirm", token=TOKEN_PATTERN)
    def START(ctx, list, host, token=""):
        asked = ctx.confirmations.ask(
            f"subscribe:{list}", template="confirm.msg", expires=3 * 24 * 3600,
            address=f"{list}-confirm-{{token}}@{host}",      # the request comes From it
            subject=f"Confirm your subscription to {list}@{host}", data={"list": list})
        if asked is None:
            return None          # the request could not be sent (the notes say why): nothing stored
        return PENDING

    @handler.state
    def PENDING(ctx, list, host, token=""):
        result = ctx.confirmations.verify(f"subscribe:{list}", token)
        if result.status is ConfirmStatus.OK:            # result.data, result.message
            return MEMBER
        ctx.reply("bad_confirm.msg", why=result.status.value)

`ask` makes an unguessable token (`TOKEN_BYTES` random bytes from
`secrets`, as hex: `TOKEN_PATTERN`), binds it to the sender, stores its
SHA-256 only (never the token) with the application's `data` and, if
given, the pending `message`, and mails the request rendered from a Mako
template.  The request to the envelope sender is an automatic reply
(``ctx.reply``: the reply guards and rate limits apply); to another
address it is a new message (``ctx.send``: the relay rule applies).  When
the request is not sent, nothing is stored and `ask` returns None.  By
default a new request cancels the sender's unused earlier ones of the same
kind (``replace=False`` keeps them).

`verify` answers with a `Verification` whose `status` is one of
`ConfirmStatus`: ``OK`` (the data and the pending message come back, and
the token is used up), ``EXPIRED``, ``USED``, ``UNKNOWN`` (never made,
cancelled, purged, or of another kind), ``WRONG_SENDER`` (bound to another
address; compared with `hmac.compare_digest`, ignoring case).

Both run inside the message's state transaction: a tempfail, an exception,
a passed deadline or a dry run without ``--commit`` stores no request and
uses no token, together with the state and the outbox.  Single use holds
across processes and hosts (`lamsonfilter.store.confirmations`).  After
`ask` or a verified token, ``ctx.defer()`` is refused (as after
``ctx.claim``): defer first.  The daemons' hourly housekeeping deletes
requests that expired more than ``REPLAY_TTL`` ago (`StateStore.purge_confirmations`).
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from .confirmstore import ConfirmationRecord, same_sender
from .contextneeds import AppServices
from .decisions import HeaderValueError
from .state import StateTransaction

__all__ = [
    "TOKEN_BYTES",
    "TOKEN_PATTERN",
    "ConfirmStatus",
    "Confirmation",
    "Confirmations",
    "Verification",
    "token_hash",
]

#: Random bytes in a token: 128 bits, written as 32 lowercase hex digits.
TOKEN_BYTES = 16

#: A route capture that matches a token (``token=TOKEN_PATTERN`` in ``handler.route``; routes
#: ignore case, and `verify` folds it).
TOKEN_PATTERN = r"[0-9a-f]{32}"

_TOKEN = re.compile(r"[0-9a-f]{32}")

#: Longest `kind` (the column's size).
MAX_KIND_LENGTH = 64
#: Longest address a token is bound to (the column's size).
MAX_SENDER_LENGTH = 512


class ConfirmStatus(enum.Enum):
    """What `Confirmations.verify` found."""

    OK = "ok"  #: valid: now used up; the data and the pending message are in the result
    EXPIRED = "expired"  #: valid once, but its time passed
    USED = "used"  #: verified before (single use)
    UNKNOWN = "unknown"  #: no such token of this kind: never made, cancelled by a newer one, or purged
    WRONG_SENDER = "wrong sender"  #: bound to another address


@dataclass(frozen=True)
class Confirmation:
    """A request `ask` stored and queued: the token (mailed, never stored) and its address."""

    kind: str
    sender: str
    token: str
    address: str | None
    expires_at: float


@dataclass(frozen=True)
class Verification:
    """What `verify` found.  `data` and `message` are filled in only when `status` is OK."""

    status: ConfirmStatus
    kind: str
    data: Mapping[str, Any] = field(default_factory=dict)
    message: bytes | None = None

    @property
    def ok(self) -> bool:
        return self.status is ConfirmStatus.OK


def token_hash(token: str) -> str:
    """The SHA-256 (hex) under which a token's request is stored."""
    return hashlib.sha256(token.encode("ascii")).hexdigest()


class AskingContext(Protocol):
    """What the engine uses of a `lamsonfilter.context.Context`."""

    app: AppServices
    recipient: str
    now: float

    @property
    def sender(self) -> str: ...
    @property
    def args(self) -> dict[str, str]: ...
    def reply(self, template: str | None = None, **kwargs: Any) -> bool: ...
    def send(self, message: Any, *, sender: str | None = ..., recipients: tuple[str, ...] | list[str] | None = ...,
             confirmed: bool = ...) -> bool: ...
    def note(self, text: str) -> None: ...


class Confirmations:
    """``ctx.confirmations``: ask for and verify confirmations in the message's state transaction.

    `kept` is called with the operation's name once something was written
    that ``ctx.defer()`` could not take back.
    """

    def __init__(self, ctx: AskingContext, tx: StateTransaction, kept: Callable[[str], None]) -> None:
        self._ctx = ctx
        self._tx = tx
        self._kept = kept

    def ask(
        self,
        kind: str,
        sender: str | None = None,
        *,
        template: str,
        expires: float,
        data: Mapping[str, Any] | None = None,
        message: bytes | None = None,
        address: str | None = None,
        subject: str | None = None,
        from_addr: str | None = None,
        replace: bool = True,
        **variables: Any,
    ) -> Confirmation | None:
        """Store a confirmation request bound to `sender` and mail it; None if it was not sent.

        `sender` defaults to the envelope sender.  `template` is rendered
        with `variables` plus ``token``, ``confirm_addr`` (`address` with
        ``{token}`` replaced, or None) and ``expires_at`` (a Unix time);
        the request comes From `from_addr`, else the confirm address, else
        this recipient, so that answering it confirms.  `expires` is in
        seconds; `data` a JSON object and `message` the pending message's
        bytes (e.g. ``ctx.request.raw``), both returned by `verify`.
        Mail from ``<>`` (or an address too long to store) asks nothing:
        None, with a note.  A bad `kind`, `expires`, `address` or `data`
        is the handler's mistake: `ValueError` or `TypeError`.
        """
        ctx = self._ctx
        sender = ctx.sender if sender is None else sender
        _check_kind(kind)
        if not expires > 0:
            raise ValueError(f"expires must be a positive number of seconds, not {expires!r}")
        if address is not None and "{token}" not in address:
            raise ValueError(f"address must contain {{token}}, e.g. 'list-confirm-{{token}}@host', not {address!r}")
        if message is not None and not isinstance(message, (bytes, bytearray)):
            raise TypeError(f"message must be the pending message's bytes, not {type(message).__name__}")
        stored = _json_object(data)
        if not sender or len(sender) > MAX_SENDER_LENGTH:  # mail data, not a mistake in the handler
            ctx.note(f"confirmation {kind} not asked: " + (
                "the sender is <>" if not sender else f"the address is longer than {MAX_SENDER_LENGTH} characters"))
            return None
        token = secrets.token_hex(TOKEN_BYTES)
        confirm_addr = address.replace("{token}", token) if address is not None else None
        expires_at = ctx.now + float(expires)
        variables = {**variables, "token": token, "confirm_addr": confirm_addr, "expires_at": expires_at}
        sent = self._send_request(sender, template, subject, from_addr or confirm_addr, variables)
        if not sent:
            ctx.note(f"confirmation {kind} not asked: the request to {sender} is not sent")
            return None
        if replace:
            self._tx.cancel_confirmations(kind, sender)
        self._tx.add_confirmation(ConfirmationRecord(
            token_hash(token), kind, sender, stored, None if message is None else bytes(message),
            created_at=ctx.now, expires_at=expires_at))
        self._kept("ctx.confirmations.ask()")
        return Confirmation(kind, sender, token, confirm_addr, expires_at)

    def _send_request(self, to: str, template: str, subject: str | None, from_addr: str | None,
                      variables: dict[str, Any]) -> bool:
        ctx = self._ctx
        if same_sender(ctx.sender, to):  # an automatic reply: guards, reply limits
            return ctx.reply(template, subject=subject, from_addr=from_addr, **variables)
        try:
            response = ctx.app.views.respond(
                template, {"ctx": ctx, "args": ctx.args, **ctx.args, **variables},
                To=to, From=from_addr or ctx.recipient, Subject=subject or "Please confirm")
            response["Auto-Submitted"] = "auto-generated"
        except HeaderValueError as exc:
            ctx.note(f"confirmation request to {to} suppressed: {exc}")
            return False
        return ctx.send(response, sender="", recipients=[to])

    def verify(self, kind: str, token: str, sender: str | None = None) -> Verification:
        """Check `token` for `kind` from `sender` (default: the envelope sender); OK uses it up."""
        _check_kind(kind)
        sender = self._ctx.sender if sender is None else sender
        token = token.strip().lower()
        if not _TOKEN.fullmatch(token):
            return Verification(ConfirmStatus.UNKNOWN, kind)
        digest = token_hash(token)
        record = self._tx.get_confirmation(digest)
        if record is None or record.kind != kind:
            return Verification(ConfirmStatus.UNKNOWN, kind)
        if not same_sender(record.sender, sender):
            return Verification(ConfirmStatus.WRONG_SENDER, kind)
        if record.used_at is not None:
            return Verification(ConfirmStatus.USED, kind)
        if self._ctx.now >= record.expires_at:
            return Verification(ConfirmStatus.EXPIRED, kind)
        if not self._tx.use_confirmation(digest, self._ctx.now):  # used meanwhile, elsewhere
            return Verification(ConfirmStatus.USED, kind)
        self._kept("ctx.confirmations.verify()")
        return Verification(ConfirmStatus.OK, kind, dict(record.data), record.message)


def _check_kind(kind: str) -> None:
    if not isinstance(kind, str) or not kind or len(kind) > MAX_KIND_LENGTH:
        raise ValueError(f"a confirmation kind is a name of 1 to {MAX_KIND_LENGTH} characters, not {kind!r}")


def _json_object(data: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of `data` as it will come back (through JSON); TypeError if it cannot be stored."""
    try:
        decoded: dict[str, Any] = json.loads(json.dumps(dict(data or {}), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"confirmation data must be a JSON object: {exc}") from exc
    return decoded
