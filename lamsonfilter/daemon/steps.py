"""The MAIL and RCPT step, the same for every transport: normalise the address, ask the application.

The milter (``envfrom``/``envrcpt``), the content filter (``MAIL``/``RCPT``)
and the policy service (Postfix's RCPT-time question) all call these two
functions and turn the answer into their protocol::

    step = rcpt_step(runtime, "<nobody@lists.example.org>")
    step.address         # 'nobody@lists.example.org' (normalised; '' when it did not parse)
    step.refusal         # a `Reply` (501 5.1.3 for bad syntax, 550 5.1.1 for an unknown
                         # address at the application's hosts), or None: accepted

A refusal is final for that address; an error inside the application's
check is no refusal (`Runtime.check_recipient` logs it and the message is
decided at the end of DATA instead).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..decisions import Action
from ..mail import AddressError, normalize_address
from ..replies import BAD_RECIPIENT, BAD_SENDER, NO_SUCH_ADDRESS, REJECTED, Reply
from .runtime import Runtime

__all__ = ["Step", "mail_step", "rcpt_step"]


@dataclass(frozen=True)
class Step:
    """The answer to MAIL or RCPT: the normalised address, and the refusal if there is one."""

    address: str
    refusal: Reply | None = None
    reason: str = ""  # why, for the log line (the parse error, or the application's reply)


def mail_step(address: str) -> Step:
    """MAIL FROM: ``501 5.1.7`` for an address that does not parse, else accepted."""
    try:
        return Step(normalize_address(address))
    except AddressError as exc:
        return Step("", BAD_SENDER.with_detail(exc), str(exc))


def rcpt_step(runtime: Runtime, address: str) -> Step:
    """RCPT TO: ``501 5.1.3`` for bad syntax, the application's refusal (``550 5.1.1``), else accepted."""
    try:
        addr = normalize_address(address)
    except AddressError as exc:
        return Step("", BAD_RECIPIENT.with_detail(exc), str(exc))
    if not addr:
        return Step(addr)
    outcome = runtime.check_recipient(addr)
    if outcome is not None and outcome.action is Action.REJECT:
        reply = Reply("APPLICATION", outcome.code or NO_SUCH_ADDRESS.code,
                      outcome.enhanced or NO_SUCH_ADDRESS.enhanced, outcome.text or REJECTED.text,
                      "the application's RCPT-time refusal")
        return Step(addr, reply, reply.line)
    return Step(addr)
