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
from typing import Any

__all__ = [
    "POLICY",
    "header_end",
    "Envelope",
    "MailRequest",
    "AddressError",
    "normalize_address",
    "split_address",
    "MAX_ADDRESS_LENGTH",
    "MIME_NESTING_LIMIT",
    "MAX_HEADER_BYTES",
    "MAX_STRUCTURED_FIELD",
    "PARSE_POLICY",
]

#: The one policy used to parse and to generate mail: the modern API, CRLF
#: line ends (RFC 5321 §2.3.8), lines folded at 78.
POLICY = email.policy.SMTP

#: RFC 5321 §4.5.3.1.3: a path is at most 256 octets, angle brackets included, so
#: an address is at most 254 octets (UTF-8 for SMTPUTF8 addresses); anything
#: longer is refused before it is routed.  The 255-octet domain limit follows from
#: it; the 64-octet local-part limit is deliberately not enforced (SRS and VERP
#: addresses exceed it and Postfix relays them).
MAX_ADDRESS_LENGTH = 254

#: Budget for the top-level header block, checked on the raw bytes before the
#: email package parses any header (`MailRequest.oversized_header`).  CPython's
#: header parser takes time that grows quadratically or worse with the length
#: of one field (gh-136063: minutes for a 100 KB ``Content-Type: x;;;;...``,
#: which Postfix's ``header_size_limit`` of 102400 lets through).  The whole
#: block may hold `MAX_HEADER_BYTES`; one field the email package parses
#: structurally (addresses, MIME fields, dates...) `MAX_STRUCTURED_FIELD`.
MAX_HEADER_BYTES = 102400
MAX_STRUCTURED_FIELD = 8192


class _BoundedPolicy(email.policy.EmailPolicy):
    """`POLICY` for parsing received mail: a field over budget reads as empty.

    The email package parses a header value each time it is read; a value
    over `MAX_STRUCTURED_FIELD` (for the fields it parses structurally) or
    over `MAX_HEADER_BYTES` (any field) is not parsed at all.  This holds for
    the header fields of every MIME part, which the parser reads itself.
    """

    def header_fetch_parse(self, name: str, value: str) -> Any:
        if len(value) > MAX_HEADER_BYTES or (
            len(value) > MAX_STRUCTURED_FIELD and name.lower().encode("ascii", "replace") in _STRUCTURED
        ):
            return self.header_factory(name, "")
        return super().header_fetch_parse(name, value)


#: MIME nesting deeper than this is recorded as a defect (``MimeNestingTooDeep``),
#: which makes the message ambiguous; Postfix's ``mime_nesting_limit`` is 100 too.
MIME_NESTING_LIMIT = 100

#: The policy `MailRequest.message` parses with: `POLICY`, with the header budget.
PARSE_POLICY = _BoundedPolicy(linesep="\r\n")


class AddressError(ValueError):
    """An envelope address that cannot be a mailbox (too long, control characters)."""


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def normalize_address(address: str) -> str:
    """Return the bare envelope address: no angle brackets, no surrounding space.

    ``<>`` (the null sender) becomes ``""``.  Raises `AddressError` for an
    address longer than `MAX_ADDRESS_LENGTH` octets or carrying control characters.
    """
    addr = address.strip()
    if addr.startswith("<") and addr.endswith(">"):
        addr = addr[1:-1].strip()
    if len(addr) > MAX_ADDRESS_LENGTH or (
        not addr.isascii() and len(addr.encode("utf-8", "surrogateescape")) > MAX_ADDRESS_LENGTH
    ):
        raise AddressError(f"address longer than {MAX_ADDRESS_LENGTH} octets (RFC 5321: a path of 256)")
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
    #: Identifies this message across retries of the MTA.  Transports do not set
    #: it (they pass the key to `Runtime.process`, which hands it to
    #: `App.process`); it is the fallback for code that calls `App.process`
    #: directly.  With it, the handlers run once per message: a retry replays
    #: the committed decision.
    replay_key: str | None = None
    #: ``time.monotonic()`` after which the transport has given up on this message
    #: (answered 4xx): `App.process` then commits nothing -- no state change, no reply
    #: for a message the MTA will send again.  None: no limit.  Like `replay_key`,
    #: a fallback: transports pass it to `Runtime.process`.
    deadline: float | None = None
    #: True when ``lamsonfilter deq`` runs this message from the mail queue (Postfix
    #: delivered it there, or a handler deferred it with ``ctx.defer()``).
    from_queue: bool = False
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
        to ``To``, ``Cc`` and ``Bcc``.  This is what the dry run uses.  A header
        address that could not be an envelope address (a NUL or another control
        character in it, too long) is passed over, as if it were not there: the
        mail still gets a decision.  An explicit `sender` or `recipients` is
        checked as given (`AddressError`).
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
                if "@" in a and _usable(a)
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
        """The parsed message (never raises; problems land in `defects`).

        When the email package cannot parse the MIME structure (it recurses
        once per nesting level and raises `RecursionError` on deep nesting),
        the message is parsed again with its body left unparsed, and the
        defect ``MimeNestingTooDeep`` (or ``MessageParseError``) is recorded.
        A header field too large to parse safely (see `PARSE_POLICY`) reads
        as an empty value; a top-level one is recorded as ``HeaderTooLarge``.
        """
        if self.oversized_header is not None:
            self._extra_defects.append("HeaderTooLarge")
        try:
            msg = BytesParser(policy=PARSE_POLICY).parsebytes(self.raw)
        except Exception as exc:  # noqa: BLE001 -- the contract: never raise
            self._extra_defects.append(
                "MimeNestingTooDeep" if isinstance(exc, RecursionError) else "MessageParseError"
            )
            try:
                msg = BytesParser(policy=PARSE_POLICY).parsebytes(self.raw, headersonly=True)
            except Exception:  # noqa: BLE001
                msg = EmailMessage(policy=PARSE_POLICY)
        assert isinstance(msg, EmailMessage)
        return msg

    @cached_property
    def defects(self) -> tuple[str, ...]:
        """Parse defects of every part, plus lamsonfilter's own ambiguity checks.

        Parts are visited in `Message.walk` order but without recursion, and
        not below `MIME_NESTING_LIMIT` levels: deeper nesting is itself
        recorded (``MimeNestingTooDeep``), as Postfix refuses it.
        """
        message = self.message  # first: parsing may add to _extra_defects
        found: list[str] = list(self._extra_defects)
        stack: list[tuple[Message, int]] = [(message, 0)]
        while stack:
            part, depth = stack.pop()
            found.extend(type(d).__name__ for d in part.defects)
            found.extend(_ambiguities(part))
            if not part.is_multipart():
                continue
            if depth >= MIME_NESTING_LIMIT:
                found.append("MimeNestingTooDeep")
                continue
            subparts = part.get_payload()
            if isinstance(subparts, list):
                stack.extend((sub, depth + 1) for sub in reversed(subparts) if isinstance(sub, Message))
        return tuple(found)

    @cached_property
    def oversized_header(self) -> str | None:
        """Why the top-level header block is too large to parse safely, or None.

        Looks at the raw bytes only (never parses): the header block, as the
        email package delimits it, over `MAX_HEADER_BYTES`, or one field that
        the package parses structurally over `MAX_STRUCTURED_FIELD`.
        """
        return _oversized_header(self.raw)

    @property
    def ambiguous_mime(self) -> bool:
        """True when two MIME readers could disagree about what this message contains.

        A message with one Content-Type and at most one Content-Transfer-Encoding
        field, neither multipart nor message/*, has no parts to disagree about:
        that is read off the raw header block, without parsing it.
        """
        if "message" not in self.__dict__:  # not parsed yet: parse only if it could matter
            block = self.header_block
            types = _CONTENT_TYPE.findall(block)
            if (len(types) <= 1 and len(_CONTENT_TRANSFER_ENCODING.findall(block)) <= 1
                    and not any(b"multipart" in t.lower() or b"message/" in t.lower() for t in types)):
                return False
        return any(d in _AMBIGUOUS for d in self.defects)

    def header(self, name: str, default: str = "") -> str:
        """The first value of header `name` as text, or `default`; never raises."""
        try:
            value = self.message.get(name)
        except Exception:  # a header the parser could not make sense of
            return default
        return default if value is None else str(value)

    def content_replay_key(self) -> str | None:
        """A replay key from Message-ID, sender, recipients and the body (None without a Message-ID).

        For transports with no stable queue id across retries (the milter:
        a client that retries opens a new transaction with a new queue id).
        The body is part of it because Message-IDs are not always unique
        (some clients and ticket systems reuse them): two different messages
        must never share a key, or the second would be answered with the
        first one's decision and never reach its handlers.
        """
        import hashlib

        found = _MESSAGE_ID.search(self.header_block)  # the raw field: no parsing on the hot path
        msgid = b" ".join(found.group(1).split()).decode("utf-8", "surrogateescape") if found else ""
        if not msgid:
            return None
        digest = hashlib.sha256()
        digest.update("\0".join([msgid, self.sender.lower(), *sorted(r.lower() for r in self.recipients)]).encode(
            "utf-8", "surrogateescape"))
        digest.update(b"\0")
        digest.update(self.body_bytes)
        return "msgid:" + digest.hexdigest()[:32]

    @property
    def header_block(self) -> bytes:
        """The raw header block, up to (not including) the blank line."""
        end = header_end(self.raw)
        return self.raw[:end]

    @property
    def body_bytes(self) -> bytes:
        """The raw body, after the blank line that ends the headers."""
        end = header_end(self.raw)
        rest = self.raw[end:]
        for sep in (b"\r\n", b"\n"):
            if rest.startswith(sep):
                return rest[len(sep):]
        return rest


_AMBIGUOUS = {
    "HeaderTooLarge",
    "MimeNestingTooDeep",
    "MessageParseError",
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
        if addr and _usable(addr):
            return addr
    return ""


def _usable(address: str) -> bool:
    """True when `address` passes `normalize_address` (no control characters, not too long)."""
    try:
        normalize_address(address)
    except AddressError:
        return False
    return True


#: A line the email package's feed parser takes for a header line (its ``headerRE``).
_HEADER_LINE = re.compile(rb"From |[\x21-\x39\x3b-\x7e]*:|[\t ]")
#: Fields the email package parses with a structured parser (its header registry).
_STRUCTURED = frozenset(n.encode("ascii") for n in POLICY.header_factory.registry)  # type: ignore[attr-defined]


def _oversized_header(raw: bytes) -> str | None:
    """See `MailRequest.oversized_header`; linear in the size of the header block."""
    if header_end(raw) <= MAX_STRUCTURED_FIELD:
        return None  # the usual case: the whole block is smaller than either limit
    pos = total = field = 0
    name = b""
    while pos < len(raw):
        nl = raw.find(b"\n", pos)
        end = len(raw) if nl < 0 else nl + 1
        if raw[pos:pos + 1] in (b"\n", b"\r") and raw[pos:end].strip(b"\r\n") == b"":
            break  # the blank line: end of the header block
        if raw[pos:pos + 1] in (b" ", b"\t"):
            field += end - pos  # a continuation line
        elif _HEADER_LINE.match(raw, pos):
            colon = raw.find(b":", pos, end)
            name = raw[pos:colon].strip().lower() if colon >= 0 else b""
            field = end - pos
        else:
            break  # not a header line: the parser starts the body here
        total += end - pos
        if total > MAX_HEADER_BYTES:
            return f"header block over {MAX_HEADER_BYTES} bytes"
        if field > MAX_STRUCTURED_FIELD and name in _STRUCTURED:
            return f"header field {name.decode('ascii', 'replace')} over {MAX_STRUCTURED_FIELD} bytes"
        pos = end
    return None


_HEADER_END = re.compile(rb"\r?\n\r?\n")


#: Content-Type / Content-Transfer-Encoding fields of a raw header block (value up to the line end).
_CONTENT_TYPE = re.compile(rb"(?im)^content-type[ \t]*:([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)")
_CONTENT_TRANSFER_ENCODING = re.compile(rb"(?im)^content-transfer-encoding[ \t]*:")

#: The first Message-ID field of a raw header block, with its continuation lines.
_MESSAGE_ID = re.compile(rb"(?im)^message-id[ \t]*:((?:[^\r\n]*(?:\r?\n[ \t][^\r\n]*)*))")


def header_end(raw: bytes) -> int:
    """Where the header block of `raw` ends: the offset just past its last line's line end
    (0 when the message starts with an empty line, len(raw) with no empty line).  The one
    header-block splitter: CRLF or bare LF, as the message came."""
    if raw.startswith((b"\r\n", b"\n")):
        return 0
    m = _HEADER_END.search(raw)
    if m is None:
        return len(raw)
    # keep the CRLF/LF that ends the last header line inside the header block
    nl = raw.index(b"\n", m.start())
    return nl + 1
