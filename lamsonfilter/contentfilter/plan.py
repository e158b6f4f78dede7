"""How a `Decision` becomes reinjection plus an SMTP reply: the content filter's one table.

`reinjection_plan(decision, request, lmtp=False)` says what to send to the
reinjection listener (envelope and bytes, or nothing), what to keep in
quarantine, and what to answer Postfix: one reply for SMTP, one per
recipient for LMTP.  ``smtpproxy.py`` carries it out and answers ``250``
only after the reinjection listener accepted the message; ``lamsonfilter
test`` prints it.  Pure data, no sockets.

==============================  ==============================================
Decision                        content filter
==============================  ==============================================
any tempfail / internal error   451 4.3.0, nothing reinjected
deliver, no change              reinject the original bytes, then 250
changes                         apply them to the bytes, reinject, 250
some recipients dropped or      reinject to the others only (a deferred one is
deferred                        in the queue already: the runtime wrote it)
all dropped or deferred         250, nothing reinjected
reject (SMTP)                   after queueing a 5xx makes Postfix bounce to a
                                possibly forged sender: the rejected
                                recipients are discarded and the message
                                quarantined instead, 250
reject (LMTP)                   5xx for that recipient only
quarantine                      keep a copy in the quarantine, 250
==============================  ==============================================
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..decisions import Action, Decision
from ..mail import MailRequest
from ..replies import DELIVERED, TEMPFAIL

__all__ = ["ReinjectionPlan", "reinjection_plan"]


@dataclass(frozen=True)
class ReinjectionPlan:
    sender: str
    recipients: tuple[str, ...]  # empty: reinject nothing
    data: bytes | None
    reply: str  # the reply to the final "." over SMTP
    rcpt_replies: tuple[tuple[str, str], ...] = ()  # LMTP: (recipient, reply) in RCPT order
    quarantine: str | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def reinjects(self) -> bool:
        return bool(self.recipients)

    def __str__(self) -> str:
        parts = []
        if self.reinjects:
            same = "original bytes" if self.notes and "unchanged" in self.notes[0] else "changed bytes"
            parts.append(f"reinject MAIL FROM:<{self.sender}> to {len(self.recipients)} "
                         f"recipient(s) ({same}), then")
        else:
            parts.append("reinject nothing;")
        if self.quarantine:
            parts.append(f"quarantine ({self.quarantine});")
        parts.append(f"answer {self.reply}")
        return " ".join(parts)


TEMPFAIL_REPLY = TEMPFAIL.line


def reinjection_plan(decision: Decision, request: MailRequest, lmtp: bool = False) -> ReinjectionPlan:
    """The one mapping from a `Decision` to the content filter's actions (see the module table)."""
    sender = decision.sender if decision.sender is not None else request.sender
    if decision.is_tempfail:
        replies = tuple((r, TEMPFAIL_REPLY) for r in request.recipients)
        return ReinjectionPlan(sender, (), None, TEMPFAIL_REPLY, replies)
    recipients = decision.delivery_recipients
    notes: list[str] = []
    quarantine = decision.quarantine
    rejects = decision.by_action(Action.REJECT)
    rcpt_replies: list[tuple[str, str]] = []
    for o in decision.outcomes:
        if o.action is Action.REJECT:
            rcpt_replies.append((o.recipient, o.reply))
        else:
            rcpt_replies.append((o.recipient, DELIVERED.line))
    if rejects and not lmtp:
        notes.append(
            "rejected after queueing: discarded and quarantined instead of a 5xx "
            "(a 5xx here would make Postfix bounce to a possibly forged sender)"
        )
        quarantine = quarantine or "; ".join(f"{o.recipient}: {o.reply}" for o in rejects)
    deferred = decision.deferred
    if deferred:
        notes.append(f"deferred to the queue, not reinjected: {', '.join(deferred)}")
    data = decision.apply(request.raw) if recipients else None
    if data is not None:
        notes.insert(0, "unchanged" if data is request.raw else "changed")
    return ReinjectionPlan(
        sender,
        recipients,
        data,
        DELIVERED.line,
        tuple(rcpt_replies) if lmtp else (),
        quarantine,
        tuple(notes),
    )
