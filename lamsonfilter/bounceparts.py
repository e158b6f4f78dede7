"""What a bounce or feedback report says, and the defensive reading of its parts.

`BounceReport` and `BounceRecipient` are the answer of `lamsonfilter.bounce.detect_bounce`
(which re-exports them: import them from there).  The helpers below read the
parts every kind of report shares -- the returned original message, its
Message-ID and sender, MIME parts without descending into attached messages,
text that is transfer-decoded and cut to a limit, raw headers -- and never
raise: bounces are the most malformed mail there is.

Both report readers build on this module: `lamsonfilter.bounce` (DSN, ARF,
heuristic bounces) and `lamsonfilter.feedback` (complaint reports without
ARF), which `lamsonfilter.bounce` consults; so neither needs the other's
internals and the two do not import each other.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from email.message import Message
from email.parser import Parser
from email.utils import collapse_rfc2231_value, getaddresses
from typing import Iterable, Iterator

from .mail import POLICY

__all__ = ["BounceRecipient", "BounceReport"]


@dataclass(frozen=True)
class BounceRecipient:
    """One recipient a report is about.

    `address` is the address the original sender used (``Original-Recipient``
    when the DSN gives it, else ``Final-Recipient``).  `action` is the DSN
    action in lower case (``failed``, ``delayed``, ``delivered``, ``relayed``,
    ``expanded``), `status` the enhanced status code such as ``5.1.1``,
    `diagnostic` the remote server's text.  Any of them may be None.
    """

    address: str
    action: str | None = None
    status: str | None = None
    diagnostic: str | None = None

    @property
    def permanent(self) -> bool:
        """True for a permanent failure (status 5.x.x or action ``failed``)."""
        return (self.status or "").startswith("5.") or self.action == "failed"


@dataclass(frozen=True)
class BounceReport:
    """What `detect_bounce` found out about one bounce or feedback report.

    `original_headers` is the returned message (``message/rfc822``) or its
    headers (``text/rfc822-headers``) when the report includes them.
    """

    kind: str  # "dsn" | "arf" | "fbl" | "heuristic"
    recipients: tuple[BounceRecipient, ...] = ()
    original_message_id: str | None = None
    original_sender: str | None = None
    original_headers: Message | None = field(default=None, compare=False, repr=False)

    @property
    def permanent(self) -> bool:
        """True when any recipient failed permanently (status 5.x.x or action ``failed``)."""
        return any(r.permanent for r in self.recipients)

    @property
    def complaint(self) -> bool:
        """True for a complaint (feedback) report, ARF or not, rather than a bounce."""
        return self.kind in ("arf", "fbl")

    @property
    def addresses(self) -> tuple[str, ...]:
        """The recipients' addresses, in report order."""
        return tuple(r.address for r in self.recipients)


_RFC822_TYPES = frozenset({"message/rfc822", "message/global"})
_HEADER_TYPES = frozenset({"text/rfc822-headers", "message/global-headers", "message/rfc822-headers"})
_TEXT_LIMIT = 64 * 1024  # characters of one part we look at
_MAX_PARTS = 64
_MAX_RECIPIENTS = 100
_MSGID = re.compile(r"<([^<>\s@]{1,250}@[^<>\s]{1,250})>")


def _original(parts: list[Message], types: list[str]) -> Message | None:
    """The returned original message or its headers, if the report carries them."""
    for part, ctype in zip(parts[1:], types[1:]):
        try:
            if ctype in _RFC822_TYPES:
                payload = part.get_payload()
                if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                    inner = payload[0]
                    if not inner.keys():  # a blank line before the headers
                        body = inner.get_payload()
                        if isinstance(body, str) and body.strip():
                            return _parse_headers(body)
                    return inner
                if isinstance(payload, str):
                    return _parse_headers(payload)
            elif ctype in _HEADER_TYPES:
                return _parse_headers(_part_text(part))
        except Exception:
            continue
    return None


def _parse_headers(text: str) -> Message | None:
    text = text.lstrip("\r\n")
    if not text:
        return None
    parsed = Parser(policy=POLICY).parsestr(text[:_TEXT_LIMIT], headersonly=True)
    return parsed if parsed.keys() else None


_BODY_MSGID = re.compile(r"^\s*message-id\s*:\s*(<[^<>\s]{1,500}>)", re.IGNORECASE | re.MULTILINE)


def _original_message_id(
    original: Message | None, parts: list[Message], types: list[str]
) -> str | None:
    if original is not None:
        mid = _msgid(_raw_header(original, "Message-ID"))
        if mid:
            return mid
    # a copy of the original headers in a text part (non-standard bounces)
    for text in _readable_texts(parts, types, attachments=True):
        for m in _BODY_MSGID.finditer(text):
            mid = _msgid(m.group(1))
            if mid:
                return mid
    # some MTAs thread the bounce to the original
    return _msgid(_raw_header(parts[0], "In-Reply-To"))


def _original_sender(original: Message | None) -> str | None:
    if original is None:
        return None
    for name in ("Return-Path", "From", "Sender"):
        for _d, addr in _safe_getaddresses(_header(original, name)):
            if addr and "@" in addr:
                return addr
    return None


def _msgid(value: str) -> str | None:
    m = _MSGID.search(value)
    return f"<{m.group(1)}>" if m else None


def _walk_top(msg: Message, depth: int = 0) -> Iterator[Message]:
    """The message and its MIME parts, without descending into attached messages."""
    yield msg
    if depth > 8:
        return
    try:
        if msg.get_content_maintype() != "multipart":
            return
        payload = msg.get_payload()
    except Exception:
        return
    if isinstance(payload, list):
        for sub in payload[:_MAX_PARTS]:
            if isinstance(sub, Message):
                yield from _walk_top(sub, depth + 1)


def _readable_texts(
    parts: list[Message], types: list[str], attachments: bool = False
) -> Iterator[str]:
    """The decoded text of the human-readable parts (text/plain, or text/html without tags)."""
    for part, ctype in zip(parts, types):
        if ctype.startswith("multipart/"):
            try:
                payload = part.get_payload()
            except Exception:
                continue
            if isinstance(payload, str):  # a multipart without a usable boundary
                yield payload[:_TEXT_LIMIT]
            continue
        if not ctype.startswith("text/") or ctype in _HEADER_TYPES:
            continue
        if not attachments and _is_attachment(part):
            continue
        text = _part_text(part)
        if ctype == "text/html":
            text = re.sub(r"<[^<>]{0,2000}>", " ", text)
        yield text


def _is_attachment(part: Message) -> bool:
    return _raw_header(part, "Content-Disposition").strip().lower().startswith("attachment")


def _part_text(part: Message) -> str:
    """A part's content as text, transfer-decoded; ``""`` when it cannot be had."""
    try:
        payload = part.get_payload()
        if isinstance(payload, list):
            # message/delivery-status and friends arrive split into header blocks
            chunks: list[str] = []
            for sub in payload[:_MAX_PARTS]:
                if not isinstance(sub, Message):
                    continue
                lines = [f"{k}: {_unfold(v)}" for k, v in sub.raw_items()]
                body = sub.get_payload()
                if isinstance(body, str) and body.strip():
                    lines.append(body)
                chunks.append("\n".join(lines))
            text = "\n\n".join(chunks)
            cte = _raw_header(part, "Content-Transfer-Encoding").strip().lower()
            if cte == "base64":
                text = _b64_text(text)
            return text[:_TEXT_LIMIT]
        data = part.get_payload(decode=True)
        if not isinstance(data, bytes):
            return payload[:_TEXT_LIMIT] if isinstance(payload, str) else ""
        data = data[: _TEXT_LIMIT * 4]
        charset = part.get_content_charset() or "utf-8"
        try:
            return data.decode(charset, "replace")[:_TEXT_LIMIT]
        except (LookupError, ValueError):
            return data.decode("latin-1")[:_TEXT_LIMIT]
    except Exception:
        return ""


def _b64_text(text: str) -> str:
    compact = re.sub(r"[^A-Za-z0-9+/=]", "", text)
    try:
        return base64.b64decode(compact + "=" * (-len(compact) % 4)).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        return text


def _ctype(part: Message) -> str:
    try:
        return part.get_content_type().lower()
    except Exception:
        return "text/plain"


def _param(part: Message, name: str) -> str:
    try:
        value = part.get_param(name)
        if isinstance(value, tuple):
            value = collapse_rfc2231_value(value)
        return str(value).strip().strip('"').lower() if value else ""
    except Exception:
        return ""


def _raw_header(msg: Message, name: str) -> str:
    """The first value of `name` as it was received (unfolded, not decoded)."""
    try:
        for key, value in msg.raw_items():
            if key.lower() == name.lower():
                return _unfold(str(value))
    except Exception:
        pass
    return ""


def _header(msg: Message, name: str) -> str:
    """The first value of `name`, decoded when possible; never raises."""
    try:
        value = msg.get(name)
        return "" if value is None else str(value)
    except Exception:
        return _raw_header(msg, name)


def _safe_getaddresses(value: str) -> list[tuple[str, str]]:
    if not value:
        return []
    try:
        return getaddresses([value])
    except Exception:
        return []


def _unfold(value: str) -> str:
    return re.sub(r"\r?\n[ \t]*", " ", value).strip()


def _dedupe(recipients: Iterable[BounceRecipient]) -> list[BounceRecipient]:
    seen: set[str] = set()
    out: list[BounceRecipient] = []
    for r in recipients:
        key = r.address.lower()
        if key not in seen:
            seen.add(key)
            out.append(r)
        if len(out) >= _MAX_RECIPIENTS:
            break
    return out
