"""Feedback-loop reports that do not use ARF: `detect_feedback_loop`.

When a user of a large mailbox provider presses "this is spam", the
provider sends the sender a *complaint report*.  The standard form is ARF
(RFC 5965, a ``multipart/report; report-type=feedback-report``), which
`lamsonfilter.bounce` reads.  Outlook.com's (Hotmail's) Junk Mail Reporting
Program (JMRP) does not use it: its reports are ordinary mail,

    From: staff@hotmail.com
    Subject: complaint about message from 192.0.2.25
    Content-Type: multipart/mixed; boundary="..."

      a short text/plain part (sometimes none), then the complained-about
      message as message/rfc822, whose headers Outlook.com prefixed with
      X-HmXmrOriginalRecipient: <the user who complained>

and AOL's older reports carried ``X-Loop: scomp``.  A mail application must
never answer one (it would answer a robot about a complaint) and may want to
act on it like a bounce: stop mailing the user who complained.

    >>> report = detect_feedback_loop(request)      # doctest: +SKIP
    >>> report.kind, report.addresses               # doctest: +SKIP
    ('fbl', ('complainer@hotmail.example',))

Signs, any one of which makes a report (sisimai's ``Sisimai::ARF`` keys on
the same sender and subject; bounce handlers such as CiviCRM's on the header):

* ``X-HmXmrOriginalRecipient`` in the top-level headers or in the headers of
  an attached message (JMRP);
* ``X-Loop`` containing ``scomp`` (AOL);
* a sender that only sends complaint reports (`FEEDBACK_SENDERS`) together
  with an attached message;
* a subject ``complaint about message from ...`` or ``abuse report`` together
  with an attached message.

Never raises: a message that cannot be read is not a report (None).
"""

from __future__ import annotations

import re
from email.message import Message

from .bounceparts import (
    BounceRecipient,
    BounceReport,
    _ctype,
    _dedupe,
    _original,
    _original_message_id,
    _original_sender,
    _raw_header,
    _safe_getaddresses,
    _walk_top,
)
from .mail import MailRequest

__all__ = ["detect_feedback_loop", "FEEDBACK_SENDERS", "FEEDBACK_SUBJECT"]

#: Addresses that send complaint reports and nothing else (lower case).
FEEDBACK_SENDERS: frozenset[str] = frozenset(
    {
        "staff@hotmail.com",  # Outlook.com JMRP
        "complaints@email-abuse.amazonses.com",  # Amazon SES complaint forwarding
        "scomp@aol.net",  # AOL's old feedback loop
    }
)

#: Subjects of complaint reports (searched case-insensitively).
FEEDBACK_SUBJECT = re.compile(
    r"complaint about message from|\babuse report\b|\bspam complaint\b|\bfeedback loop\b", re.IGNORECASE
)

_JMRP_HEADER = "x-hmxmroriginalrecipient"
_RFC822 = frozenset({"message/rfc822", "message/global", "text/rfc822-headers"})


def detect_feedback_loop(request: MailRequest) -> BounceReport | None:
    """A `BounceReport` of kind ``"fbl"`` for a non-ARF complaint report, else None."""
    try:
        return _detect(request)
    except Exception:  # defensive: a guard must never fail on odd mail
        return None


def _detect(request: MailRequest) -> BounceReport | None:
    msg = request.message
    parts = list(_walk_top(msg))
    types = [_ctype(p) for p in parts]
    original = _original(parts, types)
    complainers = _jmrp_recipients(msg) or (_jmrp_recipients(original) if original is not None else [])
    attached = original is not None or any(t in _RFC822 for t in types[1:])
    sender = _from_address(msg)
    if not (
        complainers
        or "scomp" in _raw_header(msg, "X-Loop").lower()
        or (attached and sender in FEEDBACK_SENDERS)
        or (attached and FEEDBACK_SUBJECT.search(request.header("Subject")))
    ):
        return None
    if not complainers and original is not None:
        # without the provider's own field, the complained-about message names its recipient
        complainers = [a for _d, a in _safe_getaddresses(_raw_header(original, "To")) if "@" in a]
    return BounceReport(
        "fbl",
        tuple(_dedupe(BounceRecipient(a, None, None, "feedback-type: abuse") for a in complainers)),
        _original_message_id(original, parts, types),
        _original_sender(original),
        original,
    )


def _jmrp_recipients(msg: Message | None) -> list[str]:
    if msg is None:
        return []
    value = _raw_header(msg, _JMRP_HEADER)
    return [a for _d, a in _safe_getaddresses(value) if "@" in a]


def _from_address(msg: Message) -> str:
    for _d, addr in _safe_getaddresses(_raw_header(msg, "From")):
        if addr:
            return addr.lower()
    return ""
