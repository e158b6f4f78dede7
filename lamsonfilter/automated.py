"""Recognise mail that a machine sent: `classify`, `first_sign` and `Automated`.

Answering a robot is how mail loops and backscatter start: a vacation
responder answers the confirmation request, which answers the vacation
notice, and so on; a list server's notice is answered and the list server
answers the answer.  RFC 3834 asks automatic responders to mark their mail
(``Auto-Submitted``) and never to answer marked mail, but many robots do not
mark theirs.  This module looks for every sign the best detectors use
(`lamsonfilter.robotsigns`: RFC 3834, RFC 5230's vacation guidance,
sisimai's ``RFC3834`` and ``Lhost`` modules, Mailman's autoresponse and
``Precedence`` handling, the headers Exchange, Apple, Gmail, Yahoo and
common autoresponders set) and says which kind of automated mail a message
is:

=====================  =====================================================
`BOUNCE`               a delivery status notification or a non-standard
                       bounce (`lamsonfilter.bounce`)
`FEEDBACK`             a complaint report: ARF, or a non-ARF feedback loop
                       such as Outlook.com's JMRP (`lamsonfilter.feedback`)
`AUTO_REPLY`           a vacation notice or another automatic reply, with
                       or without ``Auto-Submitted``
`LIST`                 mailing-list mail and a list server's own notices
                       (``List-*``, ``X-Mailing-List``, ``X-MLServer``...)
`BULK`                 ``Precedence: bulk``/``junk`` and bulk senders' marks
`ROBOT`                any other machine: ``Auto-Submitted: auto-generated``,
                       MAILER-DAEMON, no-reply senders, read receipts, mail
                       lamsonfilter generated, and mail that only *looks*
                       automated (when in doubt, no automatic reply)
=====================  =====================================================

::

    found = classify(request)            # the most specific kind, or None
    if found is not None and found.kind == FEEDBACK:
        unsubscribe(found.report.addresses)

    sign = first_sign(request)           # the guards: the first sign, cheapest first
    if sign is not None:
        log.info("no reply: %s", sign.reason)

The detectors live in `DETECTORS`, a dict of name to function, in the order
`first_sign` tries them; `classify` runs them all and keeps the most
specific kind (`KINDS` order).  A test can take one out to show what it
catches.  Nothing here raises: header values are read raw, the report
detectors are defensive, and a detector that fails anyway counts as a sign
(``ROBOT``, "looks automated"): when in doubt, no automatic reply.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.message import Message
from email.utils import getaddresses
from typing import Callable

from .bounce import BounceReport, detect_bounce
from .mail import MailRequest
from .robotsigns import (
    AUTO_REPLY_HEADERS,
    AUTO_REPLY_SUBJECT,
    AUTOMATED_SENDERS,
    BOUNCE_SUBJECT,
    BOUNCE_TEXT,
    BULK_HEADERS,
    BULK_PRECEDENCE,
    FML_MESSAGE_ID,
    LIST_HEADERS,
    LIST_SERVER_HEADERS,
    MTA_NAME,
    REPORT_SUBJECT,
    ROBOT_HEADERS,
    SUPPRESS_TOKENS,
    is_automated_sender,
)

__all__ = [
    "Automated", "classify", "first_sign", "header_map", "is_automated_sender", "DETECTORS", "KINDS",
    "BOUNCE", "FEEDBACK", "AUTO_REPLY", "LIST", "BULK", "ROBOT", "AUTOMATED_SENDERS", "GENERATED_HEADER",
    "LIST_HEADERS", "LIST_SERVER_HEADERS", "AUTO_REPLY_HEADERS", "AUTO_REPLY_SUBJECT",
]

BOUNCE = "bounce"
FEEDBACK = "feedback-report"
AUTO_REPLY = "auto-reply"
LIST = "list"
BULK = "bulk"
ROBOT = "robot"
#: Every kind, most specific first: `classify` keeps the first of these it finds.
KINDS: tuple[str, ...] = (BOUNCE, FEEDBACK, AUTO_REPLY, LIST, BULK, ROBOT)

#: Marks mail that lamsonfilter generated; never answered automatically.
GENERATED_HEADER = "X-Lamsonfilter-Generated"


@dataclass(frozen=True)
class Automated:
    """What `classify` found: the `kind`, a short `reason` for logs and
    decision notes, and for bounces and complaints the parsed `report`."""

    kind: str
    reason: str
    report: BounceReport | None = None


Headers = dict[str, list[str]]
Detector = Callable[[MailRequest, Headers], "Automated | None"]

# --------------------------------------------------------------------- detectors
def _return_path(request: MailRequest, headers: Headers) -> Automated | None:
    if "return-path" in headers and headers["return-path"][0].strip() in ("<>", ""):
        return Automated(ROBOT, "Return-Path: <>")
    return None


def _from_robot(request: MailRequest, headers: Headers) -> Automated | None:
    for value in headers.get("from", []):
        for addr in _addresses(value):
            if addr and is_automated_sender(addr):
                return Automated(ROBOT, f"automated sender From: {addr}")
        name = MTA_NAME.search(value)  # "Mail Delivery Subsystem <root@...>": nobody is called that
        if name is not None:
            return Automated(ROBOT, f"automated sender From: {name.group(0)}")
    return None


def _generated(request: MailRequest, headers: Headers) -> Automated | None:
    return Automated(ROBOT, "generated by lamsonfilter") if GENERATED_HEADER.lower() in headers else None


def _auto_submitted(request: MailRequest, headers: Headers) -> Automated | None:
    for value in headers.get("auto-submitted", []):
        token = _first_token(value)
        if token != "no":
            kind = AUTO_REPLY if token == "auto-replied" else ROBOT
            return Automated(kind, f"Auto-Submitted: {token or '(empty)'}")
    return None


def _microsoft(request: MailRequest, headers: Headers) -> Automated | None:
    for value in headers.get("x-auto-response-suppress", []):
        hit = {t.strip().lower() for t in value.split(",")} & SUPPRESS_TOKENS
        if hit:
            return Automated(ROBOT, f"X-Auto-Response-Suppress: {sorted(hit)[0]}")
    return None


def _precedence(request: MailRequest, headers: Headers) -> Automated | None:
    for value in headers.get("precedence", []):
        token = _first_token(value)
        if token in BULK_PRECEDENCE:
            return Automated(BULK, f"Precedence: {token}")
        if token == "list":
            return Automated(LIST, "Precedence: list")
        if token in ("auto_reply", "auto-reply"):
            return Automated(AUTO_REPLY, f"Precedence: {token}")
    return None


def _list_headers(request: MailRequest, headers: Headers) -> Automated | None:
    for name in LIST_HEADERS:
        if name in headers:
            return Automated(LIST, f"mailing list ({_title(name)})")
    return None


def _list_server(request: MailRequest, headers: Headers) -> Automated | None:
    for name in LIST_SERVER_HEADERS:
        if name in headers:
            return Automated(LIST, f"list server ({_title(name)})")
    if any(FML_MESSAGE_ID.search(v) for v in headers.get("message-id", [])):
        return Automated(LIST, "list server (an fml Message-ID)")
    return None


def _auto_reply_headers(request: MailRequest, headers: Headers) -> Automated | None:
    for value in headers.get("x-apple-action", []):
        if "vacation" in value.lower():
            return Automated(AUTO_REPLY, "auto-responder (X-Apple-Action: VACATION)")
    for name in AUTO_REPLY_HEADERS:
        if name in headers:
            return Automated(AUTO_REPLY, f"auto-responder ({_title(name)})")
    for name in ROBOT_HEADERS:
        if name in headers:
            return Automated(ROBOT, f"auto-responder ({_title(name)})")
    return None


def _auto_reply_subject(request: MailRequest, headers: Headers) -> Automated | None:
    subject = request.header("Subject")
    if AUTO_REPLY_SUBJECT.match(subject):
        return Automated(AUTO_REPLY, f"auto-reply subject ({subject[:40].strip()!r})")
    return None


def _loop(request: MailRequest, headers: Headers) -> Automated | None:
    if "x-loop" in headers:  # procmail/SmartList, fml, many autoresponders: a robot's loop guard
        return Automated(ROBOT, "X-Loop")
    return None


def _bulk_sender(request: MailRequest, headers: Headers) -> Automated | None:
    for name in BULK_HEADERS:
        if name in headers:
            return Automated(BULK, f"bulk sender ({_title(name)})")
    return None


def _report(request: MailRequest, headers: Headers) -> Automated | None:
    report = detect_bounce(request)  # DSNs, ARF, non-ARF feedback loops, non-standard bounces
    if report is not None:
        if report.complaint:
            return Automated(FEEDBACK, f"feedback report ({report.kind})", report)
        return Automated(BOUNCE, f"bounce ({report.kind})", report)
    if _content_type(request.message) == "multipart/report":
        return Automated(ROBOT, "delivery or disposition report (multipart/report)")
    return None


def _doubt(request: MailRequest, headers: Headers) -> Automated | None:
    """Mail that is none of the above but looks like a machine's report: a bounce- or
    complaint-like subject with a message attached, or with a bounce's wording in its
    text (a bounce from an address no MTA uses, which the bounce reader leaves alone).
    When in doubt, no automatic reply."""
    subject = request.header("Subject")
    if not (REPORT_SUBJECT.search(subject) or BOUNCE_SUBJECT.search(subject)):
        return None
    parts = _parts(request.message)
    if any(_content_type(p) in ("message/rfc822", "message/global", "text/rfc822-headers") for p in parts):
        return Automated(ROBOT, "looks automated (report-like subject, attached message)")
    if any(BOUNCE_TEXT.search(_text(p)) for p in parts if _content_type(p) == "text/plain"):
        return Automated(ROBOT, "looks automated (bounce-like subject and text)")
    return None


def _null_sender(request: MailRequest, headers: Headers) -> Automated | None:
    if request.envelope.is_null_sender:
        return Automated(ROBOT, "null sender <>")
    if is_automated_sender(request.sender):
        return Automated(ROBOT, f"automated sender {request.sender}")
    return None


#: name -> detector, in the order `first_sign` tries them (cheap header checks first).
DETECTORS: dict[str, Detector] = {
    "envelope-sender": _null_sender,
    "return-path": _return_path,
    "from-robot": _from_robot,
    "generated": _generated,
    "auto-submitted": _auto_submitted,
    "x-auto-response-suppress": _microsoft,
    "precedence": _precedence,
    "list-headers": _list_headers,
    "list-server": _list_server,
    "auto-reply-headers": _auto_reply_headers,
    "auto-reply-subject": _auto_reply_subject,
    "x-loop": _loop,
    "bulk-sender": _bulk_sender,
    "report": _report,
    "doubt": _doubt,
}


# --------------------------------------------------------------------- API
def first_sign(request: MailRequest) -> Automated | None:
    """The first sign that `request` is automated, trying `DETECTORS` in order; None for none.

    What the reply guards use: it stops at the first hit, so ordinary header
    signs never pay for parsing the body.
    """
    headers = header_map(request)
    for detector in list(DETECTORS.values()):
        found = _safely(detector, request, headers)
        if found is not None:
            return found
    return None


def classify(request: MailRequest) -> Automated | None:
    """The most specific kind of automated mail `request` is (`KINDS` order), or None.

    Runs every detector: a DSN from ``MAILER-DAEMON`` is a `BOUNCE` (with
    its report), not merely a `ROBOT`; among signs of the same kind the
    first in `DETECTORS` order gives the reason.
    """
    headers = header_map(request)
    best: Automated | None = None
    for detector in list(DETECTORS.values()):
        found = _safely(detector, request, headers)
        if found is not None and (best is None or KINDS.index(found.kind) < KINDS.index(best.kind)):
            best = found
    return best


def header_map(request: MailRequest) -> Headers:
    """All top-level headers as received: lower-cased name -> unfolded raw values."""
    found: Headers = {}
    try:
        for name, value in request.message.raw_items():
            unfolded = re.sub(r"\r?\n[ \t]*", " ", str(value)).strip()
            found.setdefault(name.strip().lower(), []).append(unfolded)
    except Exception:  # the parser never should, but a guard must not fail open
        pass
    return found


# --------------------------------------------------------------------- helpers
def _safely(detector: Detector, request: MailRequest, headers: Headers) -> Automated | None:
    try:
        return detector(request, headers)
    except Exception:  # a detector's bug must not let a robot through: count it as a sign
        return Automated(ROBOT, f"looks automated ({getattr(detector, '__name__', 'a detector')} failed)")


def _addresses(value: str) -> list[str]:
    try:
        addrs = [a for _d, a in getaddresses([value])]
    except Exception:
        return []
    if not any(addrs) and value.strip():
        return [value.strip()]  # "From: mailer-daemon"
    return addrs


def _first_token(value: str) -> str:
    value = re.sub(r"\([^()]*\)", " ", value)  # drop comments: "auto-generated (failure)"
    tokens = value.replace(";", " ").split()
    return tokens[0].lower() if tokens else ""


_SPELLING = {"id": "Id", "ml": "ML", "mlserver": "MLServer", "ms": "MS", "csa": "CSA", "ses": "SES",
             "autoreply": "AutoReply", "campaignid": "CampaignID", "beenthere": "BeenThere"}


def _title(name: str) -> str:
    """``x-mlserver`` -> ``X-MLServer``: a header name as its senders spell it."""
    return "-".join(_SPELLING.get(p, p.capitalize()) for p in name.split("-"))


def _parts(message: Message, limit: int = 32) -> list[Message]:
    """The message and its MIME parts (at most `limit`); what the parser cannot walk, left out."""
    found: list[Message] = []
    try:
        for part in message.walk():
            found.append(part)
            if len(found) >= limit:
                break
    except Exception:
        pass
    return found


def _text(part: Message, limit: int = 16384) -> str:
    """The start of a text part, transfer-decoded; ``""`` when it cannot be had."""
    try:
        data = part.get_payload(decode=True)
        if isinstance(data, bytes):
            return data[:limit].decode(part.get_content_charset() or "latin-1", "replace")
    except Exception:  # LookupError for an unknown charset, and the parser's surprises
        pass
    return ""


def _content_type(part: Message) -> str:
    try:
        return part.get_content_type().lower()
    except Exception:
        return ""
