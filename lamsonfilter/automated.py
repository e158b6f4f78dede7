"""Recognise mail that a machine sent: `classify`, `first_sign` and `Automated`.

Answering a robot is how mail loops and backscatter start: a vacation
responder answers the confirmation request, which answers the vacation
notice, and so on; a list server's notice is answered and the list server
answers the answer.  RFC 3834 asks automatic responders to mark their mail
(``Auto-Submitted``) and never to answer marked mail, but many robots do not
mark theirs.  This module gathers every sign the best detectors use (RFC
3834, RFC 5230's vacation guidance, sisimai's ``RFC3834`` and ``Lhost``
modules, Mailman's autoresponse and ``Precedence`` handling, the headers
Exchange, Apple, Gmail, Yahoo and common autoresponders set) and says which
kind of automated mail a message is:

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

# --------------------------------------------------------------------- the signs
#: Local parts (lower-cased, matched from the start) of senders that must not
#: get automatic replies: MTAs, bounce handlers, no-reply addresses, lists.
AUTOMATED_SENDERS: tuple[str, ...] = (
    r"mailer[-_.]?daemon$",  # MAILER-DAEMON
    r"mailer$",
    r"post[-_.]?master$",  # postmaster, post_master
    r"bounces?(?:$|[-_.+=])",  # bounce, bounces+x=y, bounce-123
    r".*[-_.+]bounces?(?:$|[-_.+=])",  # list-bounces, x-bounce-5
    r"(?:no|do[-_.]?not)[-_.]?reply",  # noreply, no-reply, donotreply, do_not_reply
    r"owner-",  # owner-list (sendmail lists)
    r".*-owner$",
    r".*-request$",  # list-request
    r"listserv$",
    r"majordomo$",
)
_AUTOMATED_RE = re.compile("|".join(f"(?:{p})" for p in AUTOMATED_SENDERS))

#: RFC 2369 / RFC 2919 / RFC 8058 list headers, plus the older ``Mailing-List``.
LIST_HEADERS: tuple[str, ...] = (
    "list-id",
    "list-post",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "list-subscribe",
    "list-help",
    "list-owner",
    "list-archive",
    "mailing-list",
)

#: Headers list servers put on their posts and their own notices: fml
#: (``X-MLServer``, ``X-ML-Name``, ``X-ML-Info``), Mailman 2 (``X-BeenThere``,
#: ``X-Mailman-Version``, ``X-List-Administrivia`` on its notices), majordomo and
#: vger (``X-Mailing-List``), SmartList (``X-Mailing-List``), Ecartis, LISTSERV,
#: Yahoo Groups, Google Groups.
LIST_SERVER_HEADERS: tuple[str, ...] = (
    "x-mailing-list",
    "x-ml-name",
    "x-ml-server",
    "x-mlserver",
    "x-ml-info",
    "x-ml-count",
    "x-beenthere",
    "x-mailman-version",
    "x-list-administrivia",
    "x-ecartis-version",
    "x-listserver",
    "x-listprocessor-version",
    "x-list",
    "x-yahoo-newman-property",
    "x-google-group-id",
)
#: fml's own Message-IDs: ``<20100601123456.FMLAAB12345.listname@example.org>``.
_FML_MESSAGE_ID = re.compile(r"<\d+\.FML[A-Z]{2,}\d*\.[^<>@\s]+@[^<>\s]+>")

#: Headers automatic responders set (value ignored), besides ``Auto-Submitted``.
AUTO_REPLY_HEADERS: tuple[str, ...] = (
    "x-autoreply",
    "x-autorespond",
    "x-autoresponder",
    "x-autoresponse",
    "x-auto-reply",
    "x-auto-response",
    "x-autoreply-from",  # Courier, cPanel
    "x-mail-autoreply",  # CommuniGate Pro, some webmailers
    "x-vacation",
    "x-ms-exchange-inbox-rules-loop",  # Exchange: sent by a mailbox rule (OOF, rule replies)
    "x-ms-exchange-generated-message-source",
)
#: Headers of machine-generated mail that is not a reply.
_ROBOT_HEADERS: tuple[str, ...] = ("x-autogenerated", "x-auto-generated")
#: Marks bulk senders (mail service providers) set on every message they send.
_BULK_HEADERS: tuple[str, ...] = ("feedback-id", "x-csa-complaints", "x-report-abuse", "x-mailgun-sid",
                                  "x-ses-outgoing", "x-campaign", "x-campaignid")

#: Subjects of automatic replies (matched at the start, case-insensitively):
#: Exchange/Outlook, Lotus Notes (``AUTO:``), Apple Mail, Gmail, Yahoo, Zimbra, and
#: their translations.
AUTO_REPLY_SUBJECT = re.compile(
    r"^\s*(?:"
    r"auto(?:matic)?[- ]?(?:reply|response|answer)\b|autoreply\b|auto:|"
    r"out of (?:the )?office\b|vacation (?:reply|notice|message|auto)|on vacation\b|away from (?:the )?office\b|"
    r"abwesenheits?(?:notiz|nachricht)|automatische antwort|"
    r"r[ée]ponse automatique|absence du bureau|respuesta autom[aá]tica|fuera de la oficina|"
    r"risposta automatica|fuori sede|automatisch antwoord|afwezig\b|resposta autom[aá]tica|"
    r"autosvar|automaattinen vastaus|odpowied[zź] automatyczna|"
    r"自動応答|自動返信|自动回复|不在通知"
    r")",
    re.IGNORECASE,
)
#: Display names only mail systems use.
_MTA_NAME = re.compile(
    r"mail delivery (?:sub)?system|mail(?:er)? delivery service|delivery status notification"
    r"|mail administrator|mailer[-_ ]daemon",
    re.IGNORECASE,
)
_BULK_PRECEDENCE = frozenset({"bulk", "junk"})
_SUPPRESS = frozenset({"all", "autoreply", "oof"})
_BOUNCEISH_SUBJECT = re.compile(
    r"undeliver|delivery (?:status|failure|notification|report)|returned mail|failure notice"
    r"|mail delivery|could not be delivered|not delivered|complaint|abuse",
    re.IGNORECASE,
)


def is_automated_sender(address: str) -> bool:
    """True when `address` (``local@domain`` or a bare local part) matches `AUTOMATED_SENDERS`."""
    address = address.strip().strip("<>")
    local = address.rpartition("@")[0] if "@" in address else address
    return bool(local) and _AUTOMATED_RE.match(local.lower()) is not None


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
        name = _MTA_NAME.search(value)  # "Mail Delivery Subsystem <root@...>": nobody is called that
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
        hit = {t.strip().lower() for t in value.split(",")} & _SUPPRESS
        if hit:
            return Automated(ROBOT, f"X-Auto-Response-Suppress: {sorted(hit)[0]}")
    return None


def _precedence(request: MailRequest, headers: Headers) -> Automated | None:
    for value in headers.get("precedence", []):
        token = _first_token(value)
        if token in _BULK_PRECEDENCE:
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
    if any(_FML_MESSAGE_ID.search(v) for v in headers.get("message-id", [])):
        return Automated(LIST, "list server (an fml Message-ID)")
    return None


def _auto_reply_headers(request: MailRequest, headers: Headers) -> Automated | None:
    for value in headers.get("x-apple-action", []):
        if "vacation" in value.lower():
            return Automated(AUTO_REPLY, "auto-responder (X-Apple-Action: VACATION)")
    for name in AUTO_REPLY_HEADERS:
        if name in headers:
            return Automated(AUTO_REPLY, f"auto-responder ({_title(name)})")
    for name in _ROBOT_HEADERS:
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
    for name in _BULK_HEADERS:
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
    complaint-like subject with a message attached.  When in doubt, no automatic reply."""
    if not _BOUNCEISH_SUBJECT.search(request.header("Subject")):
        return None
    try:
        attached = any(
            _content_type(p) in ("message/rfc822", "message/global", "text/rfc822-headers")
            for p in request.message.walk()
        )
    except Exception:
        attached = False
    return Automated(ROBOT, "looks automated (report-like subject, attached message)") if attached else None


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


def _content_type(part: Message) -> str:
    try:
        return part.get_content_type().lower()
    except Exception:
        return ""
