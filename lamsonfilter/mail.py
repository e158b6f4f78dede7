"""The mail as it arrived: an `Envelope` and the raw bytes, wrapped in a `MailRequest`.

Every transport (milter, content filter, the dry run) builds one `MailRequest`
and hands it to `App.process`.  The request keeps the bytes exactly as they
were received; the parsed `email.message.EmailMessage` is made lazily, once,
with one policy (`POLICY`).  Unchanged mail is passed on as the original
bytes, never re-serialised, so DKIM signatures survive.

    >>> env = Envelope(sender="alice@example.org", recipients=("bob@example.net",))
    >>> req = MailRequest(env, b"Subject: hi\\r\\n\\r\\nhello\\r\\n")
    >>> req.message["Subject"]
    'hi'

Parse problems never raise: they are recorded in `MailRequest.defects` (the
email package's defects plus the ambiguities lamsonfilter looks for itself,
such as two ``Content-Type`` headers), and `MailRequest.ambiguous_mime` says
whether any of them could make two readers see different content.
"""

from __future__ import annotations

import email.policy
import re
from dataclasses import dataclass, field
from email.message import EmailMessage, Message
from email.parser import BytesParser
from email.utils import getaddresses
from functools import cached_property

__all__ = [
    "POLICY",
    "Envelope",
    "MailRequest",
    "AddressError",
    "normalize_address",
    "split_address",
    "MAX_ADDRESS_LENGTH",
]

#: The one policy used to parse and to generate mail: the modern API, CRLF
#: line ends (RFC 5321 §2.3.8), lines folded at 78.
POLICY = email.policy.SMTP

#: RFC 5321 §4.5.3.1.3: a path is at most 256 octets; we allow a little more
#: for the angle brackets and refuse anything longer before routing it.
MAX_ADDRESS_LENGTH = 320


class AddressError(ValueError):
    """An envelope address that cannot be a mailbox (too long, control characters)."""


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def normalize_address(address: str) -> str:
    """Return the bare envelope address: no angle brackets, no surrounding space.

    ``<>`` (the null sender) becomes ``""``.  Raises `AddressError` for an
    address longer than `MAX_ADDRESS_LENGTH` or carrying control characters.
    """
    addr = address.strip()
    if addr.startswith("<") and addr.endswith(">"):
        addr = addr[1:-1].strip()
    if len(addr) > MAX_ADDRESS_LENGTH:
        raise AddressError(f"address longer than {MAX_ADDRESS_LENGTH} characters")
    if _CONTROL.search(addr):
        raise AddressError("address contains control characters")
    return addr


def split_address(address: str) -> tuple[str, str]:
    """Split ``local@domain`` at the last ``@``; the domain is lower-cased."""
    local, sep, domain = address.rpartition("@")
    if not sep:
        return address, ""
    return local, domain.lower()


@dataclass(frozen=True)
class Envelope:
    """The SMTP envelope: what the MTA was told, not what the headers say.

    `sender` is ``""`` for the null sender ``<>`` (bounces).  The client
    fields are filled when the MTA passes them (milter macros, XFORWARD).
    """

    sender: str
    recipients: tuple[str, ...]
    client_address: str | None = None
    client_name: str | None = None
    helo: str | None = None
    queue_id: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "sender", normalize_address(self.sender))
        object.__setattr__(
            self, "recipients", tuple(normalize_address(r) for r in self.recipients)
        )

    @property
    def is_null_sender(self) -> bool:
        return self.sender == ""


@dataclass
class MailRequest:
    """One message as received: envelope plus raw bytes.

    The raw bytes are the source of truth.  `message` is parsed on first use
    with `POLICY`; the request is otherwise read-only for applications (they
    ask for changes through the `Decision`).
    """

    envelope: Envelope
    raw: bytes
    #: Identifies this message across retries of the MTA (set by the transport:
    #: the upstream queue id from XFORWARD IDENT, or a digest of Message-ID,
    #: sender and recipients for the milter).  With it, `App.process` runs the
    #: handlers once per message: a retry replays the committed decision.
    replay_key: str | None = None
    _extra_defects: list[str] = field(default_factory=list, repr=False)

    @classmethod
    def from_bytes(
        cls,
        raw: bytes,
        sender: str | None = None,
        recipients: tuple[str, ...] | list[str] | None = None,
        **client: str | None,
    ) -> "MailRequest":
        """Build a request from raw bytes; a missing envelope comes from the headers.

        The sender defaults to ``Return-Path`` then ``From``; the recipients
        to ``To``, ``Cc`` and ``Bcc``.  This is what the dry run uses.
        """
        headers = BytesParser(policy=email.policy.compat32).parsebytes(raw, headersonly=True)
        if sender is None:
            if headers.get_all("Return-Path"):  # "Return-Path: <>" is the null sender
                sender = _first_address(headers, "Return-Path")
            else:
                sender = _first_address(headers, "From")
        if not recipients:
            recipients = tuple(
                a
                for _name, a in getaddresses(
                    [str(v) for h in ("To", "Cc", "Bcc") for v in headers.get_all(h, [])]
                )
                if "@" in a
            )
        return cls(Envelope(sender, tuple(recipients), **client), raw)

    @property
    def sender(self) -> str:
        return self.envelope.sender

    @property
    def recipients(self) -> tuple[str, ...]:
        return self.envelope.recipients

    @property
    def queue_id(self) -> str | None:
        return self.envelope.queue_id

    @cached_property
    def message(self) -> EmailMessage:
        """The parsed message (never raises; problems land in `defects`)."""
        msg = BytesParser(policy=POLICY).parsebytes(self.raw)
        assert isinstance(msg, EmailMessage)
        return msg

    @cached_property
    def defects(self) -> tuple[str, ...]:
        """Parse defects of every part, plus lamsonfilter's own ambiguity checks."""
        found: list[str] = list(self._extra_defects)
        for part in self.message.walk():
            found.extend(type(d).__name__ for d in part.defects)
            found.extend(_ambiguities(part))
        return tuple(found)

    @property
    def ambiguous_mime(self) -> bool:
        """True when two MIME readers could disagree about what this message contains."""
        return any(d in _AMBIGUOUS for d in self.defects)

    def header(self, name: str, default: str = "") -> str:
        """The first value of header `name` as text, or `default`; never raises."""
        try:
            value = self.message.get(name)
        except Exception:  # a header the parser could not make sense of
            return default
        return default if value is None else str(value)

    def content_replay_key(self) -> str | None:
        """A replay key from Message-ID, sender and recipients (None without a Message-ID).

        For transports with no stable queue id across retries (the milter:
        a client that retries opens a new transaction with a new queue id).
        """
        import hashlib

        msgid = self.header("Message-ID").strip()
        if not msgid:
            return None
        text = "\0".join([msgid, self.sender.lower(), *sorted(r.lower() for r in self.recipients)])
        return "msgid:" + hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:32]

    @property
    def header_block(self) -> bytes:
        """The raw header block, up to (not including) the blank line."""
        end = _header_end(self.raw)
        return self.raw[:end]

    @property
    def body_bytes(self) -> bytes:
        """The raw body, after the blank line that ends the headers."""
        end = _header_end(self.raw)
        rest = self.raw[end:]
        for sep in (b"\r\n", b"\n"):
            if rest.startswith(sep):
                return rest[len(sep):]
        return rest


_AMBIGUOUS = {
    "DuplicateContentType",
    "DuplicateBoundary",
    "DuplicateContentTransferEncoding",
    "StartBoundaryNotFoundDefect",
    "MultipartInvariantViolationDefect",
    "NoBoundaryInMultipartDefect",
    "CloseBoundaryNotFoundDefect",
}


def _ambiguities(part: Message) -> list[str]:
    """Ambiguities CPython's parser accepts silently (it takes the first value)."""
    found = []
    raw = [(name.lower(), str(value)) for name, value in part.raw_items()]
    content_types = [v for n, v in raw if n == "content-type"]
    if len(content_types) > 1:
        found.append("DuplicateContentType")
    if sum(1 for n, _v in raw if n == "content-transfer-encoding") > 1:
        found.append("DuplicateContentTransferEncoding")
    if any(len(re.findall(r"(?i)(?:^|;)\s*boundary\s*=", v)) > 1 for v in content_types):
        found.append("DuplicateBoundary")
    return found


def _first_address(headers: Message, name: str) -> str:
    values = headers.get_all(name, [])
    for _display, addr in getaddresses([str(v) for v in values]):
        if addr:
            return addr
    return ""


_HEADER_END = re.compile(rb"\r?\n\r?\n")


def _header_end(raw: bytes) -> int:
    """Offset of the line break that ends the header block (len(raw) if none)."""
    if raw.startswith((b"\r\n", b"\n")):
        return 0
    m = _HEADER_END.search(raw)
    if m is None:
        return len(raw)
    # keep the CRLF/LF that ends the last header line inside the header block
    nl = raw.index(b"\n", m.start())
    return nl + 1
