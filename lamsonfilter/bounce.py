"""Recognise bounces and feedback reports: `detect_bounce` and `BounceReport`.

A *bounce* is the mail an MTA sends back when it could not deliver a
message: normally a standard delivery status notification (RFC 3464, a
``multipart/report; report-type=delivery-status`` with a machine-readable
``message/delivery-status`` part), but many systems still send free-form
text ("Undeliverable: ...", "failure notice").  A *feedback report*
(ARF, RFC 5965) is what a mailbox provider sends when a user pressed
"this is spam".  Both are answers from machines: a mail application must
never auto-reply to them (`lamsonfilter.guards` uses this module for that)
and will often want to act on them, e.g. disable a list member whose
address bounces permanently.

    >>> report = detect_bounce(request)          # doctest: +SKIP
    >>> if report is not None and report.permanent:
    ...     for rcpt in report.recipients:
    ...         disable_member(rcpt.address)

`detect_bounce` returns a `BounceReport` whose `kind` says how sure it is:

``"dsn"``
    a machine-readable ``message/delivery-status`` part was found (the
    RFC 3464 form; also a top-level ``multipart/report`` with
    ``report-type=delivery-status`` whose status part is broken);
``"arf"``
    an RFC 5965 ``message/feedback-report``;
``"fbl"``
    a complaint report of a feedback loop that does not use ARF, such as
    Outlook.com's JMRP (`lamsonfilter.feedback`);
``"heuristic"``
    a non-standard bounce recognised from its sender (null sender,
    ``MAILER-DAEMON``, ``postmaster``, "Mail Delivery System") together
    with a typical subject or text (`BOUNCE_SUBJECT_PATTERNS`,
    `BOUNCE_TEXT_PATTERNS`).  The recipients come from the
    ``X-Failed-Recipients`` header (Exim, Gmail) or are pulled out of the
    human-readable text (``RCPT TO``, lines with an SMTP error), which is a
    best effort.

Attached messages (``message/rfc822``) are never searched for reports: a
person forwarding a bounce has not sent one.

Delivery *receipts* (MDN, RFC 8098) and vacation replies (RFC 3834) are not
bounces: `detect_bounce` returns None for them (the guards refuse to answer
them for other reasons).

Errors: `detect_bounce` never raises.  Bounces are the most malformed mail
there is; every parsing step is defensive and a message that cannot be
understood yields None (or a report with fewer details).

Bounces are not authenticated: anybody can send a message that looks like
one.  Before acting on a report (unsubscribing an address, say), check that
it answers mail you actually sent, e.g. with a VERP return path or a token
in the original Message-ID.
"""

from __future__ import annotations

import re
from email.message import Message
from email.utils import getaddresses

from .bounceparts import (
    _MAX_RECIPIENTS,
    BounceRecipient,
    BounceReport,
    _ctype,
    _dedupe,
    _header,
    _original,
    _original_message_id,
    _original_sender,
    _param,
    _part_text,
    _raw_header,
    _readable_texts,
    _safe_getaddresses,
    _unfold,
    _walk_top,
)
from .feedback import detect_feedback_loop
from .mail import MailRequest

__all__ = [
    "BounceRecipient",
    "BounceReport",
    "detect_bounce",
    "is_bounce",
    "BOUNCE_SUBJECT_PATTERNS",
    "BOUNCE_TEXT_PATTERNS",
    "is_bounce_sender",
]


#: Subjects of non-standard bounces (searched case-insensitively in the decoded subject).
BOUNCE_SUBJECT_PATTERNS: tuple[str, ...] = (
    r"undeliver",  # Undeliverable, Undelivered Mail Returned to Sender
    r"undelivered mail",
    r"delivery status notification",
    r"delivery (?:status|notification|failure|report|problem)",
    r"delivery (?:has )?failed",
    r"mail delivery (?:failed|failure|error|status)",
    r"returned mail",
    r"returned to sender",
    r"failure notice",
    r"non[- ]?deliver",
    r"could not be delivered",
    r"not (?:been )?delivered",
    r"mail system error",
    r"error sending your (?:mail|message)",
    r"message (?:you sent )?(?:blocked|rejected)",
    r"unzustellbar",
    r"non remis",
    r"onbestelbaar",
    r"no se (?:puede|pudo) entregar",
    r"не доставлен",
    r"недоставлен",
    r"配信できません",
    r"配信エラー",
    r"メールエラー",
    r"不達",
    r"退信",
)

#: Phrases of bounce texts (searched case-insensitively in the human-readable part).
BOUNCE_TEXT_PATTERNS: tuple[str, ...] = (
    r"could not be delivered",
    r"couldn't be delivered",
    r"was not delivered",
    r"delivery (?:to the following recipients? )?(?:has )?failed",
    r"delivery has failed",
    r"failed permanently",
    r"permanent(?: fatal)? errors?",
    r"undeliverable",
    r"user unknown",
    r"unknown user",
    r"no such user",
    r"mailbox (?:unavailable|is full|full|not found)",
    r"requested action not taken",
    r"invalid (?:user|recipient)",
    r"recipient address rejected",
    r"this is the mail system at host",
    r"i'm afraid i wasn't able to deliver",
    r"returned to sender",
    r"unable to deliver",
    r"message delivery has failed",
)

_SUBJECT_RE = re.compile("|".join(BOUNCE_SUBJECT_PATTERNS), re.IGNORECASE)
_TEXT_RE = re.compile("|".join(BOUNCE_TEXT_PATTERNS), re.IGNORECASE)

#: Local parts that only MTAs use (compared after removing ``-``, ``_`` and ``.``).
_MTA_LOCAL_PARTS = frozenset({"mailerdaemon", "postmaster", "mailer", "maildeliverysystem"})
_MTA_DISPLAY_RE = re.compile(
    r"mail delivery (?:sub)?system|mailer[-_ ]?daemon|postmaster|delivery status notification",
    re.IGNORECASE,
)

_DSN_TYPES = frozenset({"message/delivery-status", "message/global-delivery-status"})
_ARF_TYPES = frozenset({"message/feedback-report"})
_MDN_TYPES = frozenset({"message/disposition-notification", "message/global-disposition-notification"})

_ENHANCED = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_BASIC = re.compile(r"\b([45])\d\d\b")
_LOCAL_CHARS = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}$")
_DOMAIN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9-]{1,63}){1,10}")


# --------------------------------------------------------------------- API
def detect_bounce(request: MailRequest) -> BounceReport | None:
    """The `BounceReport` for a bounce or feedback report, None for other mail.

    Never raises: a message the parser chokes on is judged from its
    envelope and subject alone.
    """
    try:
        return _detect(request)
    except Exception:  # defensive: bounces are often malformed
        try:
            if _sender_hint(request, None) and _SUBJECT_RE.search(request.header("Subject")):
                return BounceReport("heuristic")
        except Exception:
            pass
        return None


def is_bounce(request: MailRequest) -> bool:
    """True when `detect_bounce` finds a bounce or feedback report."""
    return detect_bounce(request) is not None


def is_bounce_sender(address: str) -> bool:
    """True for the addresses MTAs send bounces from: ``""`` (null sender),
    ``MAILER-DAEMON@...``, ``postmaster@...`` (also spelt ``post_master``)."""
    if not address.strip() or address.strip() == "<>":
        return True
    local = address.strip().strip("<>").rpartition("@")[0] or address.strip().strip("<>")
    return _squash(local) in _MTA_LOCAL_PARTS


# --------------------------------------------------------------------- detection
def _detect(request: MailRequest) -> BounceReport | None:
    msg = request.message
    parts = list(_walk_top(msg))
    types = [_ctype(p) for p in parts]
    top = types[0]
    report_type = _param(msg, "report-type") if top == "multipart/report" else ""

    if report_type == "feedback-report" or any(t in _ARF_TYPES for t in types):
        return _arf(parts, types)
    if report_type in ("delivery-status", "global-delivery-status") or any(
        t in _DSN_TYPES for t in types
    ):
        return _dsn(request, parts, types)
    if report_type in ("disposition-notification", "global-disposition-notification") or any(
        t in _MDN_TYPES for t in types
    ):
        return None  # a read receipt, not a bounce
    return detect_feedback_loop(request) or _heuristic(request, parts, types)


def _dsn(request: MailRequest, parts: list[Message], types: list[str]) -> BounceReport:
    per_message: dict[str, str] = {}
    recipients: list[BounceRecipient] = []
    for part, ctype in zip(parts, types):
        if ctype not in _DSN_TYPES:
            continue
        blocks = _parse_field_blocks(_part_text(part))
        for block in blocks:
            for name, value in block:
                if name not in _RECIPIENT_FIELDS:
                    per_message.setdefault(name, value)
        recipients.extend(_dsn_recipients(blocks))
    original = _original(parts, types)
    if not recipients:
        # a DSN whose status part is missing or broken: fall back to the
        # X-Failed-Recipients header, then to the text
        recipients = _header_or_text_recipients(request, parts, types, original)
    sender = _original_sender(original)
    if sender is None and "x-postfix-sender" in per_message:
        sender = _field_address(per_message["x-postfix-sender"]) or None
    return BounceReport(
        "dsn",
        tuple(_dedupe(recipients)),
        _original_message_id(original, parts, types),
        sender,
        original,
    )


def _arf(parts: list[Message], types: list[str]) -> BounceReport:
    fields: list[tuple[str, str]] = []
    for part, ctype in zip(parts, types):
        if ctype in _ARF_TYPES:
            for block in _parse_field_blocks(_part_text(part)):
                fields.extend(block)
    feedback_type = next((v for n, v in fields if n == "feedback-type"), None)
    original = _original(parts, types)
    addresses = [
        _field_address(v) for n, v in fields if n in ("original-rcpt-to", "removal-recipient")
    ]
    if not any(addresses) and original is not None:
        addresses = [a for _n, a in getaddresses([_header(original, "To")])]
    recipients = [
        BounceRecipient(a, None, None, f"feedback-type: {feedback_type}" if feedback_type else None)
        for a in addresses
        if a and "@" in a
    ]
    sender = next(
        (_field_address(v) for n, v in fields if n == "original-mail-from" and _field_address(v)),
        None,
    ) or _original_sender(original)
    return BounceReport(
        "arf",
        tuple(_dedupe(recipients)),
        _original_message_id(original, parts, types),
        sender,
        original,
    )


def _heuristic(request: MailRequest, parts: list[Message], types: list[str]) -> BounceReport | None:
    subject = request.header("Subject")
    subject_match = bool(_SUBJECT_RE.search(subject))
    text = "\n".join(_readable_texts(parts, types))
    text_match = bool(_TEXT_RE.search(text))
    original = _original(parts, types)
    if _sender_hint(request, parts[0]):
        if not (subject_match or text_match):
            return None
    elif not (subject_match and text_match and original is not None):
        # without an MTA-ish sender we want every other sign at once
        return None
    recipients = _header_or_text_recipients(request, parts, types, original)
    return BounceReport(
        "heuristic",
        tuple(_dedupe(recipients)),
        _original_message_id(original, parts, types),
        _original_sender(original),
        original,
    )


def _sender_hint(request: MailRequest, msg: Message | None) -> bool:
    """True when the envelope or the headers name an MTA as the sender."""
    if request.envelope.is_null_sender:
        return True
    if msg is None:
        msg = request.message
    return_path = _raw_header(msg, "Return-Path")
    if return_path and is_bounce_sender(return_path.strip()):
        return True
    for name in ("From", "Sender"):
        value = _header(msg, name)
        if not value:
            continue
        if _MTA_DISPLAY_RE.search(value):
            return True
        for _display, addr in _safe_getaddresses(value):
            if addr and is_bounce_sender(addr):
                return True
        if "@" not in value and _squash(value.strip()) in _MTA_LOCAL_PARTS:
            return True  # From: mailer-daemon
    return False


# --------------------------------------------------------------------- DSN fields
_RECIPIENT_FIELDS = frozenset(
    {
        "original-recipient",
        "final-recipient",
        "action",
        "status",
        "diagnostic-code",
        "remote-mta",
        "last-attempt-date",
        "will-retry-until",
        "final-log-id",
        "x-actual-recipient",
    }
)
_FIELD_LINE = re.compile(r"([A-Za-z][A-Za-z0-9-]{0,75})[ \t]*:[ \t]*(.*)$")


def _parse_field_blocks(text: str) -> list[list[tuple[str, str]]]:
    """Split ``Name: value`` lines into blank-line separated blocks (names lower-cased)."""
    blocks: list[list[tuple[str, str]]] = []
    current: list[tuple[str, str]] = []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if not line.strip():
            if current:
                blocks.append(current)
                current = []
            continue
        if line[0] in " \t" and current:
            name, value = current[-1]
            current[-1] = (name, (value + " " + line.strip())[:2000])
            continue
        m = _FIELD_LINE.match(line[:2000])
        if m:
            current.append((m.group(1).lower(), m.group(2).strip()))
    if current:
        blocks.append(current)
    return blocks


def _dsn_recipients(blocks: list[list[tuple[str, str]]]) -> list[BounceRecipient]:
    found: list[BounceRecipient] = []

    def flush(rec: dict[str, str]) -> None:
        address = _field_address(rec.get("original-recipient", "")) or _field_address(
            rec.get("final-recipient", "")
        )
        if not address or len(found) >= _MAX_RECIPIENTS:
            return
        action = rec.get("action", "").split()[:1]
        diagnostic = rec.get("diagnostic-code")
        status = _status(rec.get("status", "")) or _status(diagnostic or "")
        found.append(
            BounceRecipient(
                address,
                action[0].lower() if action else None,
                status,
                _strip_type(diagnostic) if diagnostic else None,
            )
        )

    for block in blocks:
        rec: dict[str, str] = {}
        for name, value in block:
            if name not in _RECIPIENT_FIELDS:
                continue
            if name in rec:  # a missing blank line between two recipients
                flush(rec)
                rec = {}
            rec[name] = value
        if rec:
            flush(rec)
    return found


def _field_address(value: str) -> str:
    """``rfc822; <bob@example.org>`` → ``bob@example.org`` (``""`` when there is none)."""
    value = value.strip()
    if ";" in value:
        value = value.split(";", 1)[1]
    tokens = value.strip().split()
    if not tokens:
        return ""
    addr = tokens[0].strip("<>\"'(),;")
    if "<" in addr:  # "Name<addr>" glued together
        addr = addr.rpartition("<")[2]
    return addr if addr and len(addr) <= 320 else ""


def _strip_type(diagnostic: str) -> str:
    """``smtp; 550 5.1.1 unknown`` → ``550 5.1.1 unknown``."""
    kind, sep, rest = diagnostic.partition(";")
    if sep and kind.strip() and " " not in kind.strip():
        return rest.strip()
    return diagnostic.strip()


def _status(text: str) -> str | None:
    m = _ENHANCED.search(text)
    return ".".join(m.groups()) if m else None


# --------------------------------------------------------------------- text heuristics
_SKIP_LINE = re.compile(
    r"^\s*(?:>\s*)?(?:from|reply-to|sender|return-path|message-id|in-reply-to|references"
    r"|mail from|errors-to|x-[a-z0-9-]+)\s*:",
    re.IGNORECASE,
)
_RCPT_TO = re.compile(r"rcpt to:?\s*<?\s*([^\s<>]{1,320})", re.IGNORECASE)
_FAILURE_LINE = re.compile(
    r"\b[45]\d\d\b|\b[45]\.\d{1,3}\.\d{1,3}\b|unknown|no such|not exist|doesn't exist|invalid"
    r"|rejected|failed|undeliverable|not be delivered|mailbox|quota|refused|denied",
    re.IGNORECASE,
)


def _text_recipients(
    request: MailRequest, parts: list[Message], types: list[str], original: Message | None
) -> list[BounceRecipient]:
    """Recipients pulled out of a bounce's text: DSN-like fields, then ``RCPT TO``
    and failure lines, then any address that is not one of the known senders."""
    texts = list(_readable_texts(parts, types))
    joined = "\n".join(texts)

    # 1. DSN fields written as text (some MTAs put them in the text/plain part)
    dsn_like = _dsn_recipients(_parse_field_blocks(joined))
    if dsn_like:
        return dsn_like

    exclude = _known_senders(request, parts[0], original)
    lines = joined.split("\n")

    # 2. RCPT TO commands and addresses on lines that describe a failure
    level2: list[BounceRecipient] = []
    for i, line in enumerate(lines[:5000]):
        if _SKIP_LINE.match(line):
            continue
        addrs = [m.group(1).strip(".,;:'\"()[]") for m in _RCPT_TO.finditer(line)]
        if not addrs and (_FAILURE_LINE.search(line) or line.rstrip().endswith(">:")):
            addrs = _addresses(line)
        for addr in addrs:
            if "@" in addr and addr.lower() not in exclude:
                level2.append(_recipient_from_lines(addr, lines, i))
    if level2:
        return level2

    # 3. any other address in the text
    level3: list[BounceRecipient] = []
    for i, line in enumerate(lines[:5000]):
        if _SKIP_LINE.match(line):
            continue
        for addr in _addresses(line):
            if addr.lower() not in exclude:
                level3.append(_recipient_from_lines(addr, lines, i))
    return level3


def _header_or_text_recipients(
    request: MailRequest, parts: list[Message], types: list[str], original: Message | None
) -> list[BounceRecipient]:
    """``X-Failed-Recipients`` completed with status and text from the body, else the body's."""
    from_text = _text_recipients(request, parts, types, original)
    listed = _failed_recipients_header(parts[0])
    if not listed:
        return from_text
    details = {r.address.lower(): r for r in from_text}
    return [
        BounceRecipient(r.address, r.action, d.status, d.diagnostic)
        if (d := details.get(r.address.lower())) is not None
        else r
        for r in listed
    ]


def _failed_recipients_header(msg: Message) -> list[BounceRecipient]:
    """``X-Failed-Recipients`` (Exim, Gmail): a comma-separated address list."""
    found: list[BounceRecipient] = []
    try:
        values = [v for k, v in msg.raw_items() if k.lower() == "x-failed-recipients"]
    except Exception:
        return found
    for value in values:
        for _d, addr in _safe_getaddresses(_unfold(str(value))):
            if "@" in addr:
                found.append(BounceRecipient(addr, "failed"))
    return found


def _recipient_from_lines(address: str, lines: list[str], i: int) -> BounceRecipient:
    """A recipient with the status and diagnostic found on its line or the next two."""
    for line in lines[i : i + 3]:
        status = _status(line)
        basic = _BASIC.search(line)
        if status or basic:
            if status is None and basic is not None:
                status = f"{basic.group(1)}.0.0"
            return BounceRecipient(address, None, status, line.strip()[:500] or None)
    return BounceRecipient(address, None, None, None)


def _addresses(line: str) -> list[str]:
    """Mail addresses in one line of text (linear time: anchored on each ``@``)."""
    found: list[str] = []
    for at in [i for i, c in enumerate(line[:4000]) if c == "@"][:50]:
        left = _LOCAL_CHARS.search(line[max(0, at - 64) : at])
        right = _DOMAIN.match(line, at + 1, at + 1 + 255)
        if not left or not right:
            continue
        local = re.sub(r"^[A-Za-z]+\.[A-Za-z]+=", "", left.group(0)).lstrip(".=")
        domain = right.group(0).rstrip(".-")
        if local and "." in domain:
            found.append(f"{local}@{domain}")
    return found


def _known_senders(request: MailRequest, msg: Message, original: Message | None) -> set[str]:
    """Addresses that are not failed recipients: the bounce's own and the original sender's."""
    known = {request.sender.lower()}
    known.update(r.lower() for r in request.recipients)
    for source, names in (
        (msg, ("From", "To", "Cc", "Sender", "Reply-To", "Return-Path")),
        (original, ("From", "Sender", "Reply-To", "Return-Path")),
    ):
        if source is None:
            continue
        for name in names:
            for _d, addr in _safe_getaddresses(_header(source, name)):
                known.add(addr.lower())
    known.discard("")
    return known


# --------------------------------------------------------------------- the returned message


# --------------------------------------------------------------------- MIME helpers


def _squash(local: str) -> str:
    return re.sub(r"[-_.]", "", local.lower())


