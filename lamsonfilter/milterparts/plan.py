"""How a `Decision` becomes milter actions: the milter transport's one table.

`milter_plan(decision, request)` returns a `MilterPlan`: the modification
actions to call in ``eom`` (pymilter method names and arguments) and the
final return code, with the reply for REJECT/TEMPFAIL.  ``milter.py``
executes the plan; ``lamsonfilter test`` prints it.  Pure data, no pymilter.

==============================  ==============================================
Decision                        milter
==============================  ==============================================
any tempfail / internal error   TEMPFAIL, setreply 451 4.3.0
every recipient rejected        REJECT, setreply with the first reject's text
every recipient dropped or      DISCARD
deferred
rejected ones, the rest dropped REJECT with the first reject's text (noted:
or deferred                     the client must hear of the refusal)
quarantine                      modifications, quarantine(reason), ACCEPT
otherwise                       chgfrom, delrcpt (dropped, rejected,
                                redirected, deferred), addrcpt (redirect
                                targets),
                                header changes, replacebody; then ACCEPT
                                (CONTINUE when nothing changes is not needed:
                                ACCEPT skips the rest of the message)
==============================  ==============================================

A deferred recipient (``Action.DEFER``) is consumed like a dropped one:
the runtime has already put the message into the queue for it
(`lamsonfilter.daemon.runtime.Runtime.process`), so Postfix must not
deliver it too.

After DATA a milter cannot refuse one recipient of several: a rejected
recipient among delivered ones is removed with ``delrcpt`` and noted (refuse
at RCPT time where possible: `App.check_recipient`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..decisions import Action, Decision
from ..mail import MailRequest
from ..replies import REJECTED, TEMPFAIL

__all__ = ["MilterAction", "MilterPlan", "milter_plan"]


@dataclass(frozen=True)
class MilterAction:
    """One pymilter action call in ``eom``: method name and arguments."""

    method: str
    args: tuple[Any, ...]

    def __str__(self) -> str:
        shown = ", ".join(
            (f"<{len(a)} bytes>" if isinstance(a, bytes) else repr(a)) for a in self.args
        )
        return f"{self.method}({shown})"


@dataclass(frozen=True)
class MilterPlan:
    actions: tuple[MilterAction, ...]
    result: str  # ACCEPT | REJECT | TEMPFAIL | DISCARD
    reply: tuple[str, str, str] | None = None  # (rcode, xcode, text) for setreply
    notes: tuple[str, ...] = field(default=())

    def __str__(self) -> str:
        lines = [str(a) for a in self.actions]
        if self.reply:
            lines.append(f"setreply{self.reply!r}")
        lines.append(self.result)
        return "; ".join(lines)


def _bracket(addr: str) -> str:
    return f"<{addr}>"


def milter_plan(decision: Decision, request: MailRequest) -> MilterPlan:
    """The one mapping from a `Decision` to milter actions (see the module table)."""
    if decision.is_tempfail:
        o = next((o for o in decision.outcomes if o.action is Action.TEMPFAIL), None)
        text = (o.text if o and o.text else TEMPFAIL.text)
        return MilterPlan((), "TEMPFAIL", (str(o.code if o and o.code else TEMPFAIL.code),
                                           (o.enhanced if o and o.enhanced else TEMPFAIL.enhanced), text))
    outcomes = decision.outcomes
    rejects = decision.by_action(Action.REJECT)
    if outcomes and len(rejects) == len(outcomes):
        first = rejects[0]
        return MilterPlan((), "REJECT", (str(first.code), first.enhanced or REJECTED.enhanced, first.text or REJECTED.text))
    if not decision.delivery_recipients and not decision.quarantine:
        if rejects:  # the others were consumed: the client must still hear of the refusal
            first = rejects[0]
            return MilterPlan((), "REJECT", (str(first.code), first.enhanced or REJECTED.enhanced, first.text or REJECTED.text),
                              (f"{len(outcomes) - len(rejects)} recipient(s) consumed by the application; the "
                               f"message is refused for {', '.join(o.recipient for o in rejects)}",))
        return MilterPlan((), "DISCARD")
    actions: list[MilterAction] = []
    notes: list[str] = []
    if decision.sender is not None:
        actions.append(MilterAction("chgfrom", (_bracket(decision.sender),)))
    delivered = set(decision.delivery_recipients)
    for o in outcomes:
        if o.action is Action.DELIVER:
            continue
        if o.recipient not in delivered:
            actions.append(MilterAction("delrcpt", (_bracket(o.recipient),)))
        if o.action is Action.REJECT:
            notes.append(f"{o.recipient}: rejected after DATA with others delivered; removed with delrcpt")
        elif o.action is Action.DEFER:
            notes.append(f"{o.recipient}: deferred to the queue; removed with delrcpt")
    original = {r.lower() for r in request.recipients}
    for r in decision.delivery_recipients:
        if r.lower() not in original:
            actions.append(MilterAction("addrcpt", (_bracket(r),)))
    for ch in decision.header_changes:
        if ch.op == "add":
            actions.append(MilterAction("addheader", (ch.name, ch.value)))
        elif ch.op == "change":
            actions.append(MilterAction("chgheader", (ch.name, ch.index, ch.value)))
        else:
            actions.append(MilterAction("chgheader", (ch.name, ch.index, None)))
    if decision.body is not None:
        actions.append(MilterAction("replacebody", (decision.body,)))
    if decision.quarantine:
        actions.append(MilterAction("quarantine", (decision.quarantine,)))
    return MilterPlan(tuple(actions), "ACCEPT", None, tuple(notes))
