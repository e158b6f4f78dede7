"""A help desk, Lamson's other classic, with its tickets in its own tables.

Addresses (HOST is one of settings.HOSTS, N a ticket number):

=============================  ===========================================
support@HOST                   opens a ticket: a row in ``helpdesk_ticket``
                               numbered by the database, the message in
                               ``helpdesk_message``; the sender gets a
                               reply whose subject carries ``[#N]``, from
                               support+ticket-N@HOST, and the staff a copy
support+ticket-N@HOST          a reply to ticket N: kept with the ticket and
                               sent on (the requester's to the staff, the
                               staff's to the requester); a reply whose
                               first line is ``close`` closes the ticket
support+close-N@HOST           closes ticket N, answered with a template
=============================  ===========================================

The router takes the ``+`` literally (it is text of the pattern, not a
regular expression), and so does Postfix unless ``recipient_delimiter``
says otherwise: these are simply three addresses.

Who may write to a ticket: its requester (the envelope sender that opened
it) and the addresses in ``settings.STAFF``, compared case-insensitively.
Anybody else gets ``not_allowed.msg`` and the ticket is not touched.  The
envelope sender is whatever the sending client says, so this keeps out
mistakes and strangers, not a forger who guesses a number; a help desk that
must resist forgery puts a secret in the ticket address or checks DKIM.

Automated mail (bounces, auto-replies, list mail: ``ctx.automated``) never
opens a ticket and is not added to one; the decision's notes say so.

One conversation per ticket (key ``ticket:N``): START (no such ticket) →
OPEN (``NEW`` puts the new ticket there) → CLOSED.  Messages for one ticket
serialise on that key's lock, so the ticket's row needs no lock of its own;
the rows are written through ``ctx.db``, in the same transaction as the
state and the replies, so a tempfail or a crash leaves no half-opened ticket
and no reply for a ticket that was not stored.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import select

from lamsonfilter import Context, Handler, stateless
from lamsonfilter.views import Response

from ..models import CLOSED as CLOSED_STATUS
from ..models import OPEN as OPEN_STATUS
from ..models import Ticket, TicketMessage

handler = Handler("helpdesk", key=lambda ctx: ("ticket", int(ctx.args["number"])))

#: A ticket number as written in an address: no leading zero (one number, one address), at
#: most 9 digits, so it fits the INTEGER column on every database (a longer one is no route:
#: 550 5.1.1 at RCPT, never a database error and a tempfail).
NUMBER = r"[1-9][0-9]{0,8}"

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def _when(ctx: Context) -> datetime:
    return datetime.fromtimestamp(ctx.now, timezone.utc)


def _clean_subject(ctx: Context) -> str:
    """The incoming Subject on one line, without control characters, at most 200 characters."""
    subject = " ".join(_CONTROL.sub(" ", ctx.header("Subject")).split())
    return subject[:200] or "(no subject)"


def _tagged(number: int, subject: str) -> str:
    """`subject` with ``[#N]`` in front, unless it carries it already (a reply to a reply)."""
    tag = f"[#{number}]"
    return subject if tag in subject else f"{tag} {subject}"


def _body_text(ctx: Context) -> str:
    """The text a person wrote: the first text/plain part, decoded, with \\n line ends ('' if none)."""
    try:
        part = ctx.message.get_body(preferencelist=("plain",))
        text = part.get_content() if part is not None else ""
    except (LookupError, ValueError):  # an unknown charset or a broken part: keep the raw only
        return ""
    return str(text).replace("\r\n", "\n")


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip().lower()
    return ""


def _info(ctx: Context, ticket: Ticket) -> dict[str, Any]:
    host = ctx.recipient.rpartition("@")[2].lower()
    return {
        "ticket": ticket,
        "host": host,
        "support_addr": f"support@{host}",
        "ticket_addr": f"support+ticket-{ticket.number}@{host}",
        "close_addr": f"support+close-{ticket.number}@{host}",
    }


def _keep(ctx: Context, ticket: Ticket, text: str) -> TicketMessage:
    """Store this message with `ticket`: who, what, when, and the bytes as received."""
    kept = TicketMessage(
        sender=ctx.sender.lower(),
        subject=_clean_subject(ctx),
        message_id=_CONTROL.sub("", ctx.header("Message-ID"))[:998],
        body=text,
        raw=ctx.request.raw,
        received_at=_when(ctx),
    )
    ticket.messages.append(kept)
    return kept


def _staff(ctx: Context) -> list[str]:
    """settings.STAFF, lower-cased (a list of addresses; one string would be read letter by letter)."""
    staff = ctx.settings.get("STAFF", [])
    if isinstance(staff, str) or not all(isinstance(a, str) and "@" in a for a in staff):
        raise TypeError(f"settings.STAFF must be a list of addresses, such as ['staff@example.com'], not {staff!r}")
    return [a.lower() for a in staff]


def _send_on(ctx: Context, ticket: Ticket, template: str, recipients: list[str], text: str,
             **extra: Any) -> None:
    """Mail `template` about `ticket` to `recipients`, from the ticket's address.

    ``confirmed=True``: the recipients come from the ticket's row and from
    settings, never from the incoming message's headers.  The envelope
    sender is support@HOST, where a bounce of it is recognised as automated
    and dropped (it opens no ticket).
    """
    if not recipients:
        return
    info = _info(ctx, ticket)
    body = ctx.render(template, ctx=ctx, text=text, **info, **extra)
    message = Response(To=recipients, From=info["ticket_addr"], Subject=_tagged(ticket.number or 0, ticket.subject),
                       Body=body)
    ctx.send(message, sender=info["support_addr"], recipients=recipients, confirmed=True)


def _ticket(ctx: Context, number: str) -> Ticket | None:
    return ctx.db.scalar(select(Ticket).where(Ticket.number == int(number)))


def _allowed(ctx: Context, ticket: Ticket) -> bool:
    sender = ctx.sender.lower()
    return bool(sender) and (sender == ticket.requester or sender in _staff(ctx))


def _ignore_automated(ctx: Context, what: str) -> bool:
    found = ctx.automated
    if found is None:
        return False
    ctx.note(f"{found.kind} from {ctx.sender or '<>'} ignored: {what}")
    return True


@handler.route("support@(host)")
@stateless
def NEW(ctx: Context, host: str) -> None:
    """support@HOST: open a ticket, answer with its number, tell the staff."""
    if _ignore_automated(ctx, "automated mail opens no ticket"):
        return
    text = _body_text(ctx)
    ticket = Ticket(requester=ctx.sender.lower(), subject=_clean_subject(ctx), status=OPEN_STATUS,
                    opened_at=_when(ctx))
    ctx.db.add(ticket)
    ctx.db.flush()  # the database numbers the ticket: unique across processes and filter hosts
    ticket.number = ticket.id
    _keep(ctx, ticket, text)
    ctx.set_state(f"ticket:{ticket.number}", "OPEN")
    info = _info(ctx, ticket)
    ctx.reply("opened.msg", subject=_tagged(ticket.number, ticket.subject), from_addr=info["ticket_addr"], **info)
    _send_on(ctx, ticket, "to_staff.msg", [a for a in _staff(ctx) if a != ticket.requester], text)


@handler.route("support+ticket-(number)@(host)", event="reply", number=NUMBER)
@handler.route("support+close-(number)@(host)", event="close", number=NUMBER)
def START(ctx: Context, number: str) -> None:
    """No such ticket (never opened here).  The answer comes from support@HOST, so that replying to
    it opens a ticket, as it advises (from the ticket's address, a reply would get this answer again)."""
    support_addr = f"support@{ctx.args['host'].lower()}"
    ctx.reply("unknown_ticket.msg", number=int(number), support_addr=support_addr, from_addr=support_addr)


@handler.state
def OPEN(ctx: Context, number: str) -> Any:
    """An open ticket: replies are kept and sent on; ``close`` closes it."""
    ticket = _ticket(ctx, number)
    if ticket is None:  # the state outlived its row (a restored database?): say so, keep nothing
        ctx.note(f"ticket {number} has state OPEN but no row in helpdesk_ticket")
        START(ctx, number)
        return None
    if not _allowed(ctx, ticket):
        ctx.reply("not_allowed.msg", **_info(ctx, ticket))
        return None
    if _ignore_automated(ctx, f"not added to ticket {ticket.number}"):
        return None
    text = _body_text(ctx)
    _keep(ctx, ticket, text)
    sender = ctx.sender.lower()
    if ctx.event == "close" or _first_line(text) == "close":
        ticket.status = CLOSED_STATUS
        ticket.closed_at = _when(ctx)
        info = _info(ctx, ticket)
        ctx.reply("closed.msg", subject=f"Closed: {_tagged(ticket.number or 0, ticket.subject)}",
                  from_addr=info["support_addr"], closed_by=sender, **info)
        others = [a for a in [ticket.requester, *_staff(ctx)] if a != sender]
        _send_on(ctx, ticket, "closed_notice.msg", sorted(set(others)), text, closed_by=sender)
        return CLOSED
    if sender in _staff(ctx) and sender != ticket.requester:
        _send_on(ctx, ticket, "answer.msg", [ticket.requester], text)  # the staff's answer
    else:
        _send_on(ctx, ticket, "to_staff.msg", [a for a in _staff(ctx) if a != sender], text)
    return None


@handler.state
def CLOSED(ctx: Context, number: str) -> None:
    """A closed ticket: nothing is added; the sender is told to open a new one (the answer comes
    from support@HOST, so that replying to it does)."""
    ticket = _ticket(ctx, number)
    if ticket is None:
        ctx.note(f"ticket {number} has state CLOSED but no row in helpdesk_ticket")
        START(ctx, number)
        return
    info = _info(ctx, ticket)
    if not _allowed(ctx, ticket):
        ctx.reply("not_allowed.msg", **info)
    else:
        ctx.reply("already_closed.msg", from_addr=info["support_addr"], **info)
