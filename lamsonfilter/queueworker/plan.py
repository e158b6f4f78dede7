"""How a `Decision` becomes queue actions: ``lamsonfilter deq``'s one table.

`queue_plan(decision, request, attempts, poison_limit)` says what to send on
through the relay (envelope and bytes, or nothing), what to keep in the
quarantine, and whether the message is finished (removed from the queue)
or waits for a retry.  ``lamsonfilter.queueworker.worker`` carries it out;
``lamsonfilter test`` prints it.  Pure data, no files, no sockets.

==============================  ==============================================
Decision                        queue (``lamsonfilter deq``)
==============================  ==============================================
a tempfail of the message       back to ``retry/``, one attempt more, after a
(cause ``message``: a handler   backoff (60 s doubling up to 4000 s)
raised, asked for a retry, ran
out of time; an internal error)
... the POISON_LIMIT-th time    the quarantine with the reason, then removed
a tempfail of the storage       back to ``retry/`` for the pool's pause, no
(cause ``storage``: the         attempt counted, never the quarantine; the
database down, locked, full,    whole pool pauses and probes with one
without the schema)             message (`lamsonfilter.queueworker.outage`)
... for this message alone      as a tempfail of the message (`Outage.failed`
(``pause`` None)                said so: the next message went through)
drop (consumed)                 removed (the handlers' outbox is already
                                stored and being sent)
defer                           removed, as drop (the application refuses a
                                deferral from the queue: it arrives as a
                                tempfail)
deliver, no change              send the original bytes through the relay to
                                the recipient, then removed
changes                         apply them, send, removed
redirect                        send to the new addresses instead, removed
reject                          no bounce (the sender may be forged): the
                                quarantine with the reply as the reason,
                                then removed
quarantine                      keep a copy in the quarantine, removed
no envelope in the file         the quarantine with the reason and no
                                envelope (never guessed from ``To:``)
==============================  ==============================================

When the relay answers a send: every recipient accepted -- removed; a
recipient deferred -- a retry like a tempfail (the decision is replayed,
not made again); a recipient refused for good -- the quarantine for that
recipient; the relay unreachable -- a retry that counts no attempt (the
message is not at fault; see `relay_failure_plan`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..decisions import Action, Decision
from ..mail import MailRequest

__all__ = ["QueuePlan", "queue_plan", "retry_plan", "poison_plan", "no_envelope_plan", "relay_failure_plan",
           "storage_failure_plan", "backoff", "RETRY_FIRST", "RETRY_MAX"]

#: The first retry waits this long (seconds); each further one twice as long ...
RETRY_FIRST = 60.0
#: ... up to this (Postfix's maximal_backoff_time, as the outbox).
RETRY_MAX = 4000.0


@dataclass(frozen=True)
class QueuePlan:
    """What ``deq`` does with one claimed message."""

    sender: str = ""
    send_to: tuple[str, ...] = ()       # empty: nothing goes on through the relay
    data: bytes | None = None           # the bytes to send (header changes applied)
    quarantine: str | None = None       # keep a copy in the quarantine, with this reason
    quarantine_envelope: bool = True    # False: the file had no readable envelope
    retry_after: float | None = None    # seconds: back to retry/ (None: finished, removed)
    counts_attempt: bool = True         # the retry counts against POISON_LIMIT
    notes: tuple[str, ...] = field(default=())

    @property
    def finished(self) -> bool:
        return self.retry_after is None

    def __str__(self) -> str:
        parts: list[str] = []
        if self.send_to:
            same = "original bytes" if "unchanged" in self.notes else "changed bytes"
            parts.append(f"send MAIL FROM:<{self.sender}> to {len(self.send_to)} recipient(s) "
                         f"through the relay ({same}), then")
        if self.quarantine is not None:
            parts.append(f"quarantine ({self.quarantine}),")
        if self.retry_after is None:
            parts.append("remove from the queue")
        else:
            parts.append(f"retry in {self.retry_after:g} s"
                         + ("" if self.counts_attempt else " (no attempt counted)"))
        return " ".join(parts)


def backoff(attempts: int) -> float:
    """Seconds before the next attempt, after `attempts` earlier ones."""
    return min(RETRY_FIRST * float(2 ** min(max(attempts, 0), 16)), RETRY_MAX)


def retry_plan(attempts: int, poison_limit: int, why: str) -> QueuePlan:
    """A failed attempt (number `attempts` + 1): a retry, or the quarantine once it is the
    `poison_limit`-th (0: never)."""
    n = attempts + 1
    if poison_limit > 0 and n >= poison_limit:
        return QueuePlan(quarantine=f"{n} attempt(s) failed; the last: {why}",
                         notes=(f"attempt {n} of {poison_limit}: quarantined",))
    return QueuePlan(retry_after=backoff(attempts), notes=(f"attempt {n} failed: {why}",))


def storage_failure_plan(why: str, pause: float) -> QueuePlan:
    """The storage failed (`Cause.STORAGE`): not this message's fault.  Back to ``retry/`` for the
    pool's `pause` (seconds), no attempt counted, whatever the earlier attempts."""
    return QueuePlan(retry_after=pause, counts_attempt=False,
                     notes=(f"the storage failed, not the message: {why}",))


def queue_plan(decision: Decision, request: MailRequest, attempts: int = 0, poison_limit: int = 5,
               pause: float | None = 2.0) -> QueuePlan:
    """The one mapping from a `Decision` to the queue's actions (see the module table).

    `attempts`: earlier attempts at this message that ended without a decision;
    `pause`: how long the pool pauses after a storage failure (`Outage.failed`); None when
    the storage fails for this message alone: then it counts as the message's failure.
    """
    if decision.storage_failed and pause is not None:
        return storage_failure_plan(decision.error or "storage failure", pause)
    if decision.is_tempfail:
        tempfails = decision.by_action(Action.TEMPFAIL)
        why = decision.error or (tempfails[0].reply if tempfails else "temporary failure")
        return retry_plan(attempts, poison_limit, why)
    sender = decision.sender if decision.sender is not None else request.sender
    recipients = decision.delivery_recipients
    quarantine = decision.quarantine
    notes: list[str] = []
    rejects = decision.by_action(Action.REJECT)
    if rejects:
        notes.append("rejected from the queue: quarantined instead of a bounce "
                     "(the envelope sender may be forged)")
        quarantine = quarantine or "; ".join(f"{o.recipient}: {o.reply}" for o in rejects)
    data = decision.apply(request.raw) if recipients else None
    if data is not None:
        notes.insert(0, "unchanged" if data is request.raw else "changed")
    # DROP (and anything else consumed, DEFER included) sends nothing: the message is finished
    return QueuePlan(sender, recipients, data, quarantine, notes=tuple(notes))


def poison_plan(attempts: int) -> QueuePlan:
    """A claimed message whose earlier `attempts` all ended without a decision (the worker
    died or its claim ran out each time), `POISON_LIMIT` or more: not run again."""
    return QueuePlan(quarantine=f"poison message: {attempts} attempt(s) ended without a decision "
                                "(the worker died or its claim ran out each time)")


def no_envelope_plan(reason: str) -> QueuePlan:
    """A file without a readable envelope: kept aside with the reason, never guessed from ``To:``."""
    return QueuePlan(quarantine=f"no envelope in the queue file: {reason}", quarantine_envelope=False)


def relay_failure_plan(attempts: int, poison_limit: int, unreachable: bool,
                       deferred: Sequence[tuple[str, str]] = ()) -> QueuePlan:
    """The relay did not take the message: unreachable (no attempt counted: the message is not
    at fault) or it deferred a recipient (a failed attempt, as a tempfail)."""
    if unreachable:
        return QueuePlan(retry_after=backoff(attempts), counts_attempt=False, notes=("relay unreachable",))
    why = "; ".join(f"{r}: {reply}" for r, reply in deferred) or "deferred by the relay"
    return retry_plan(attempts, poison_limit, f"relay deferred {why}")
