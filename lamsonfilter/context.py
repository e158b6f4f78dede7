"""What a state function receives: the `Context` of one recipient of one message.

A state function is called as ``func(ctx, **captures)``.  Through `ctx` it
reads the message and the conversation's state data, and *asks* for things;
nothing happens until the runtime acts on the resulting `Decision`:

    def START(ctx, list, host):
        if ctx.event == "subscribe":
            ctx.data["token"] = token = new_token()
            ctx.reply("confirm.msg", subject=f"Confirm your subscription to {list}",
                      token=token, list=list, host=host)
            return PENDING
        ctx.reject("You are not subscribed", code=550, enhanced="5.7.1")

Per-recipient outcomes: `deliver`, `drop` (the default for routed mail:
the application consumed it), `redirect`, `reject`, `tempfail`, and
`defer` (take the message now, run this state function again later from
the queue, where `from_queue` is True).  Message
changes (shared by all recipients of the message): `add_header`,
`change_header`, `remove_header`, `replace_body`, `change_sender`,
`quarantine`.  New mail: `reply` (an automatic reply, subject to the
framework's guards: never to bounces, lists, ``<>``..., rate-limited) and
`send` (any new message, e.g. a list post), `confirmations` (ask somebody
to confirm, verify the answer: `lamsonfilter.confirm`).  Other
conversations' state: `find`, `get_state`, `set_state`, all inside the
message's transaction.  The application's own rows (``app/models.py``):
`db`, an ORM session in that same transaction, committed with the state
and the outbox or rolled back with them.
"""

from __future__ import annotations

import logging
import re
from email.message import EmailMessage
from email.utils import formataddr, getaddresses, parseaddr
from typing import TYPE_CHECKING, Any, Mapping, NoReturn

from .automated import Automated, classify
from .bounce import BounceReport, detect_bounce
from .confirm import Confirmations
from .contextneeds import AppServices, HandlerInfo, RouteArgs
from .decisions import (Action, HeaderChange, HeaderValueError, MessageChanges, OutboxMessage, Outcome,
                        check_header_value)
from .errors import Deferred, HandlerError
from .guards import GENERATED_HEADER, addresses_written, autoreply_refusal, one_mailbox, reply_headers
from .mail import MailRequest, header_end, normalize_address
from .state import StateRecord, StateTransaction
from .views import Response, check_decoded_header_value, serialise

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

__all__ = ["Context", "MessageChanges", "GENERATED_HEADER"]

log = logging.getLogger("lamsonfilter")

class Context:
    """One recipient of one message, as seen by a state function."""

    def __init__(
        self,
        app: AppServices,
        request: MailRequest,
        recipient: str,
        match: RouteArgs,
        handler: HandlerInfo,
        event: str,
        tx: StateTransaction,
        changes: MessageChanges,
        now: float,
    ) -> None:
        self.app = app
        self.request = request
        self.recipient = recipient
        self.match = match
        self.handler = handler
        self.event = event
        self.now = now
        self._tx = tx
        self._changes = changes
        self.key = ""
        self.state = "START"
        self.data: dict[str, Any] = {}
        self.outcome: Outcome | None = None
        self.deferred = False
        self._kept: str | None = None  # what wrote something ctx.defer() cannot take back
        self._answer_addresses: dict[str, str] | None = None

    # ------------------------------------------------------------ reading
    @property
    def sender(self) -> str:
        """The envelope sender (``""`` for ``<>``)."""
        return self.request.sender

    @property
    def message(self) -> EmailMessage:
        return self.request.message

    @property
    def args(self) -> dict[str, str]:
        """The route's captures, e.g. ``{"list": "python", "host": "lists.example.org"}``."""
        return self.match.args

    @property
    def settings(self) -> Mapping[str, Any]:
        return self.app.settings

    @property
    def bounce(self) -> BounceReport | None:
        """The delivery report this message is, if it is one (`lamsonfilter.bounce`)."""
        return detect_bounce(self.request)

    @property
    def automated(self) -> Automated | None:
        """Which kind of automated mail this is, if any (`lamsonfilter.automated.classify`):
        ``kind`` is ``"bounce"``, ``"feedback-report"``, ``"auto-reply"``, ``"list"``,
        ``"bulk"`` or ``"robot"``; ``report`` holds a bounce's or complaint's details."""
        return classify(self.request)

    def header(self, name: str, default: str = "") -> str:
        return self.request.header(name, default)

    # ------------------------------------------------------------ outcomes
    def _set(self, outcome: Outcome) -> None:
        self.outcome = outcome

    def deliver(self) -> None:
        """Pass the message on to this recipient."""
        self._set(Outcome(self.recipient, Action.DELIVER))

    def drop(self) -> None:
        """The application consumed the message; nobody gets it for this recipient."""
        self._set(Outcome(self.recipient, Action.DROP))

    def redirect(self, *addresses: str) -> None:
        """Deliver to `addresses` instead of this recipient."""
        self._set(
            Outcome(self.recipient, Action.REDIRECT, redirect_to=tuple(normalize_address(a) for a in addresses))
        )

    @property
    def from_queue(self) -> bool:
        """True when this run comes from the queue (``lamsonfilter deq``), e.g. after `defer`."""
        return self.request.from_queue

    def defer(self) -> NoReturn:
        """Take the message now; run this state function again later, from the queue (`from_queue`).

        Raises (a handler that catches it is still deferred).  Nothing this
        call did is kept (state, outbox, message changes); the other
        recipients' outcomes stand.  The recipient counts as consumed; the
        runtime has the message in the queue (``QUEUE``) before the 2xx.
        A `HandlerError` (a tempfail) from the queue, or after `claim` or
        rows written with `db` (neither can be given back): defer first.
        """
        if self.from_queue:
            raise HandlerError(
                f"ctx.defer() for {self.recipient} in a run from the queue: the message was deferred "
                "already; do the slow work when ctx.from_queue is True instead of deferring again")
        if self._kept is None and getattr(self._tx, "db_changed", bool)():
            self._kept = "ctx.db wrote rows"
        if self._kept is not None:
            raise HandlerError(
                f"ctx.defer() for {self.recipient} after {self._kept}: a claimed token, a confirmation "
                f"or the application's rows cannot be given back; call ctx.defer() before {self._kept}")
        self.deferred = True
        raise Deferred(self.recipient)

    def reject(self, text: str = "Rejected", code: int = 550, enhanced: str = "5.7.1") -> None:
        """Refuse permanently (the milter rejects; the content filter discards and says so)."""
        check_header_value("X-Reply", text)  # one line, no control characters
        self._set(Outcome(self.recipient, Action.REJECT, code, enhanced, text))

    def tempfail(self, text: str = "Try again later", code: int = 451, enhanced: str = "4.3.0") -> None:
        """Ask the sender's MTA to retry later; nothing of this message is committed."""
        check_header_value("X-Reply", text)
        self._set(Outcome(self.recipient, Action.TEMPFAIL, code, enhanced, text))

    # ------------------------------------------------------------ message changes
    def add_header(self, name: str, value: str) -> None:
        self._changes.headers.append(HeaderChange("add", name, value))

    def change_header(self, name: str, value: str, index: int = 1) -> None:
        self._changes.headers.append(HeaderChange("change", name, value, index))

    def remove_header(self, name: str, index: int = 1) -> None:
        self._changes.headers.append(HeaderChange("remove", name, None, index))

    def replace_body(self, body: bytes | str) -> None:
        """Replace the body (bytes as they should appear after the blank line; line ends become CRLF)."""
        data = body.encode("utf-8") if isinstance(body, str) else body
        self._changes.body = _crlf(data)

    def change_sender(self, sender: str) -> None:
        self._changes.sender = normalize_address(sender)

    def quarantine(self, reason: str) -> None:
        check_header_value("X-Reason", reason)
        self._changes.quarantine = reason

    # ------------------------------------------------------------ new mail
    def render(self, template: str, **variables: Any) -> str:
        return self.app.views.render(template, **variables)

    def reply(
        self,
        template: str | None = None,
        *,
        subject: str | None = None,
        body: str | None = None,
        html_template: str | None = None,
        sender: str | None = None,
        from_addr: str | None = None,
        **variables: Any,
    ) -> bool:
        """Queue an automatic reply to the envelope sender, from this recipient.

        Returns True when the reply is queued, and False (recording why in
        the decision's notes) when the guards refuse: the sender is ``<>``
        or a daemon, the message is a bounce, a list or bulk message, an
        auto-reply, mail lamsonfilter generated, or the sender already had
        its share of replies this period (the handler's reply limit:
        ``Handler(replies="service"|"responder")``, ``REPLY_LIMIT``).  A
        handler whose next state depends on the reply arriving (a token it
        mails) checks the result, or asks `can_reply` first.  The reply
        comes From `from_addr` (default: this recipient) and goes out with
        envelope sender `sender` (default ``<>``).  A reply whose headers
        would carry CR/LF (a hostile Subject copied into the reply) is
        refused the same way, never sent.
        """
        refusal = self.reply_refusal(count_limits=False)
        if refusal is None:
            to_addr = self.sender
            if not self.app.reply_limit_for(self.handler).allow(self._tx, to_addr, self.now,
                                                                 responder=self.handler.name):
                refusal = f"reply rate limit reached for {to_addr}"
            elif not self.app.reply_budget.allow(to_addr, self.now, self._tx):
                refusal = "the reply budget of this minute is spent (REPLY_BUDGET)"
        if refusal is not None:
            self._note(f"reply to {self.sender or '<>'} suppressed: {refusal}")
            return False
        if subject is None:
            original = self.header("Subject")
            subject = original if original.lower().startswith("re:") else f"Re: {original}".strip()
        headers = reply_headers(self.request)
        try:
            if template is not None:
                vars_ = {"ctx": self, "args": self.args, **self.args, **variables}
                response = self.app.views.respond(
                    template,
                    vars_,
                    html_template=html_template,
                    To=self.sender,
                    From=from_addr or self.recipient,
                    Subject=subject,
                )
            else:
                response = Response(To=self.sender, From=from_addr or self.recipient, Subject=subject, Body=body or "")
            for name, value in headers.items():
                response[name] = value
            response[GENERATED_HEADER] = self.app.name
            rendered = response.render()  # built once: checked here, queued as it is
            written = addresses_written(rendered[1], "To")
            if written != [self.sender]:  # e.g. a long non-ASCII sender folded apart (found by O3's fuzzer)
                raise HeaderValueError(f"the To header would read {written!r}, not the envelope sender")
        except HeaderValueError as exc:
            self._note(f"reply to {self.sender} suppressed: {exc}")
            return False
        self._queue(response, sender=sender if sender is not None else "", recipients=(self.sender,), kind="reply",
                    rendered=rendered)
        return True

    def reply_refusal(self, *, count_limits: bool = True) -> str | None:
        """Why an automatic reply to this message would not be sent now, or None if it would.

        Asks the same guards as `reply`, including the reply limit and the
        budget (unless `count_limits` is False), but counts nothing.
        """
        refusal = autoreply_refusal(self.request)
        if refusal is None and not one_mailbox(self.sender):
            refusal = "the envelope sender is not one mailbox a To header can name"
        if refusal is None and count_limits:
            limit = self.app.reply_limit_for(self.handler)
            if not limit.would_allow(self._tx, self.sender, self.now, responder=self.handler.name):
                refusal = f"reply rate limit reached for {self.sender}"
            elif not self.app.reply_budget.would_allow(self.sender, self.now, self._tx):
                refusal = "the reply budget of this minute is spent (REPLY_BUDGET)"
        return refusal

    def can_reply(self) -> bool:
        """True when `reply` would send a reply now (see `reply_refusal` for why not)."""
        return self.reply_refusal() is None

    def note(self, text: str) -> None:
        """Add a line to the decision's notes (shown by the dry run, logged at INFO)."""
        check_header_value("X-Note", text)
        self._note(text)

    def respond(self, template: str, **headers: str) -> Response:
        """Render `template` into a `Response` with the given headers (To, From, Subject...)."""
        vars_ = {"ctx": self, "args": self.args, **self.args}
        return self.app.views.respond(template, vars_, **headers)

    def send(
        self,
        message: Response | EmailMessage | bytes,
        *,
        sender: str | None = None,
        recipients: tuple[str, ...] | list[str] | None = None,
        confirmed: bool = False,
    ) -> bool:
        """Queue a new message (not an auto-reply: no reply guards, but still marked as generated).

        Returns False when no recipient is left to send it to (see below), True when queued.

        The envelope defaults to the message's From and To/Cc; give
        `sender` (e.g. a VERP bounce address) and `recipients` explicitly for
        list posts.  A recipient taken from the incoming From, Reply-To or
        Sender header (other than the envelope sender, outside the
        application's hosts) is dropped and the refusal noted: handlers
        never relay for whoever wrote those headers (reliability S2).

        ``confirmed=True`` says the application has its own proof that the
        `recipients` asked for this mail -- members of a list who confirmed
        their subscription, read from the state store -- so that the header
        rule does not drop a member whose address the post happens to name
        (``Reply-To: another-member``).  Never pass it for addresses taken
        from the message.
        """
        return self._queue(message, sender=sender, recipients=tuple(recipients) if recipients else None,
                           kind="message", confirmed=confirmed)

    def _queue(
        self,
        message: Response | EmailMessage | bytes,
        *,
        sender: str | None,
        recipients: tuple[str, ...] | None,
        kind: str,
        confirmed: bool = False,
        rendered: tuple[EmailMessage, bytes] | None = None,
    ) -> bool:
        msg: EmailMessage | None
        if isinstance(message, Response):
            if rendered is None:
                message[GENERATED_HEADER] = self.app.name
                rendered = message.render()
            msg, raw = rendered
        elif isinstance(message, EmailMessage):
            del message[GENERATED_HEADER]
            message[GENERATED_HEADER] = self.app.name
            for name, value in message.items():
                check_decoded_header_value(name, str(value))
            raw = serialise(message)
            msg = message
        else:
            raw = _crlf(message)
            msg = None
            head = raw[:header_end(raw)]
            if not _GENERATED_FIELD.search(head):
                raw = f"{GENERATED_HEADER}: {self.app.name}\r\n".encode() + raw
        if sender is None:
            sender = parseaddr(str(msg["From"]))[1] if msg is not None and msg["From"] else self.recipient
        if recipients is None:
            if msg is None:
                raise ValueError("send(bytes) needs recipients=")
            recipients = tuple(
                a for _n, a in getaddresses([str(v) for h in ("To", "Cc") for v in msg.get_all(h, [])]) if a
            )
        recipients = tuple(normalize_address(r) for r in recipients)
        relayed = [] if confirmed else [(r, f) for r in recipients if (f := self._answer_field(r)) is not None]
        if relayed:  # S2: never write to a forgeable header's address for a stranger
            self._note("; ".join(
                f"{kind} to {r} blocked: the address comes from the {f} header, not the envelope sender"
                for r, f in relayed))
            recipients = tuple(r for r in recipients if r not in {r for r, _f in relayed})
            if not recipients:
                return False
        self._changes.outbox.append(OutboxMessage(normalize_address(sender), recipients, raw, kind))
        return True

    def _answer_field(self, recipient: str) -> str | None:
        """The header (From, Reply-To, Sender) `recipient` was found in, when writing to it would relay.

        The envelope sender and addresses at the application's hosts are
        never "relayed"; neither is an address the message does not name.
        """
        rcpt = recipient.lower()
        if rcpt == self.sender.lower() or self.app.owns(recipient):
            return None
        if self._answer_addresses is None:
            found: dict[str, str] = {}
            for name in _ANSWER_FIELDS:
                try:
                    values = [str(v) for v in self.message.get_all(name, [])]
                    pairs = getaddresses(values)
                except Exception:  # noqa: BLE001 -- an unreadable field names nobody
                    continue
                for _n, addr in pairs:
                    found.setdefault(addr.lower(), name)
            self._answer_addresses = found
        return self._answer_addresses.get(rcpt)

    def _note(self, text: str) -> None:
        self._changes.notes.append(text)
        log.info("queue_id=%s %s", self.request.queue_id or "-", text)

    # ------------------------------------------------------------ other conversations
    def find(self, prefix: str = "", state: str | None = None) -> list[tuple[str, StateRecord]]:
        """Keys of this handler starting with `prefix` (the handler name is added), optionally in `state`."""
        full = f"{self.handler.name}:{prefix}"
        return [(k[len(self.handler.name) + 1:], r) for k, r in self._tx.find(full, state)]

    def get_state(self, key: str) -> StateRecord | None:
        """Another conversation of this handler (key without the handler name)."""
        return self._tx.get(f"{self.handler.name}:{key}")

    def set_state(self, key: str, state: str, data: Mapping[str, Any] | None = None) -> None:
        if state not in self.handler.states:
            raise HandlerError(f"handler {self.handler.name}: no state {state!r}")
        self._tx.set(f"{self.handler.name}:{key}", state, data)

    @property
    def db(self) -> Session:
        """The application's models (``app/models.py``): a SQLAlchemy ORM `Session` on the very
        connection of this message's state transaction, shared by every recipient of the message.

        No ``commit()``: the framework flushes it and commits its rows together with the state
        and the outbox, or rolls all three back (a tempfail, an exception, a passed deadline, a
        dry run).  ``ctx.db.flush()`` sends the changes early (a new row's id).  This key is
        locked; a row other keys' messages also change needs ``with_for_update()`` (PostgreSQL).
        """
        session: Session = getattr(self._tx, "db")  # `LazyTransaction.db`
        return session

    def claim(self, token: str) -> bool:
        """Record a one-time token (e.g. a confirmation); False if it was used before."""
        self._kept = self._kept or "ctx.claim()"
        return self._tx.claim(f"{self.handler.name}:{token}")

    @property
    def confirmations(self) -> Confirmations:
        """The confirmation engine (`lamsonfilter.confirm`): ``ask`` and ``verify``, in this transaction."""
        return Confirmations(self, self._tx, self._keep)

    def _keep(self, what: str) -> None:
        self._kept = self._kept or what

    def address(self, local: str, domain: str | None = None, name: str = "") -> str:
        """Format an address, e.g. ``ctx.address("python-confirm-XYZ", host)``."""
        addr = f"{local}@{domain or self.recipient.rpartition('@')[2]}"
        return formataddr((name, addr)) if name else addr


#: Header fields a reply could be steered by.  Outbox mail to an address found there that is not
#: the envelope sender (or at the application's hosts) is refused: the fields are forgeable, and
#: writing to them would let anybody relay through a handler (reliability S2).
_ANSWER_FIELDS = ("From", "Reply-To", "Sender")

#: A header line naming `GENERATED_HEADER` (not merely the text somewhere in the header block).
_GENERATED_FIELD = re.compile(rb"(?im)^" + re.escape(GENERATED_HEADER.encode("ascii")) + rb"[ \t]*:")


def _crlf(data: bytes) -> bytes:
    """Normalise line ends to CRLF (RFC 5321 §2.3.8)."""
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
