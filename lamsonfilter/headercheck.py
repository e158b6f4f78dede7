"""Header values that cannot inject lines: the framework's guard against header injection.

Header values often carry text from the incoming mail (``"Re: " + subject``),
so every value lamsonfilter writes is checked before it is used, by the
one function that fits where it goes:

    check_header_value("X-Tag", "ok")                     # the name, CR/LF/NUL as typed, length
    check_encoded_words("Subject", "=?UTF-8?Q?x=0D=0ABcc:_v@x.test?=")
    # HeaderValueError: header Subject contains a line break or NUL once
    # RFC 2047 words are decoded

`check_encoded_words` exists because ``=?UTF-8?Q?x=0D=0ABcc:_v@x.test?=``
holds no CR or LF as typed yet decodes to a line break, and the email
package of some CPython versions (3.11.7 among them, CVE-2024-6923) writes
such a value out as a real ``Bcc:`` line; a reader that decodes it (a mail
client, a later filter) may do the same.  It reads the value every way a
reader might: as typed, each encoded word's bytes and text (leniently,
nested words too), and as the email package and ``email.header`` decode it.

`lamsonfilter.decisions.HeaderChange` (``ctx.add_header``,
``change_header``) applies both checks; `lamsonfilter.views.Response`
applies both and also checks how the email package will fold the value.

Errors: `HeaderValueError` (a `ValueError`), raised at the moment the value
is set, naming the header but not echoing the value.
"""

from __future__ import annotations

import base64
import binascii
import re
from email.header import decode_header, make_header
from typing import Iterator

from .mail import POLICY

__all__ = ["HeaderValueError", "check_header_value", "check_encoded_words"]


class HeaderValueError(ValueError):
    """A header name or value that would inject lines into the message."""


_HEADER_NAME = re.compile(r"^[!-9;-~]+$")  # RFC 5322 §2.2: printable, no colon
#: Characters that end a line for the email package (str.splitlines) or the MTA.
_LINE_BREAKS = "\r\n\x00\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
_DECODABLE = re.compile(r"=\?|%|\\")
_ENCODED_WORD = re.compile(r"=\?([^?]*)\?([qQbB])\?(.*?)\?=", re.DOTALL)


def valid_header_name(name: str) -> bool:
    """True for an RFC 5322 field name: printable ASCII, no colon, not empty."""
    return _HEADER_NAME.match(name) is not None


def check_header_value(name: str, value: str) -> None:
    """Refuse a header whose name is not a field name or whose value holds CR, LF or NUL.

    Also refuses a field longer than 998 octets (RFC 5322 §2.1.1).  This
    checks the value as typed; `check_encoded_words` checks its decodings.
    """
    if not valid_header_name(name):
        raise HeaderValueError(f"invalid header name {name!r}")
    if any(c in value for c in "\r\n\x00"):
        raise HeaderValueError(f"header {name} contains CR, LF or NUL")
    if len(name) + 2 + len(value.encode("utf-8", "surrogateescape")) > 998:
        raise HeaderValueError(f"header {name} is longer than 998 octets")


def check_encoded_words(name: str, value: str) -> None:
    """Refuse `value` if any reading of it holds a line break (see the module docstring).

    A line break is CR, LF, NUL or another character ``str.splitlines``
    breaks on.  Readers make new characters only from encoded words
    (``=?``), RFC 2231 parameters (``%0D``) and quoted pairs (``\\``), so a
    value with none of those is checked as typed only (a few microseconds,
    not the email package's parse).
    """
    if not _DECODABLE.search(value):
        readings: Iterator[str] = iter((value,))
    else:
        readings = _readings(name, value)
    for reading in readings:
        if any(c in reading for c in _LINE_BREAKS):
            raise HeaderValueError(
                f"header {name} contains a line break or NUL once RFC 2047 words are decoded"
            )


def _readings(name: str, value: str) -> Iterator[str]:
    """The value as typed, as this module decodes it, and as the email package decodes it."""
    yield value
    yield from _decode_words(value, depth=0)
    try:
        yield str(POLICY.header_factory(name, value))
    except Exception:
        pass  # the email package cannot read it; whoever writes with it refuses it then
    try:
        yield str(make_header(decode_header(value)))
    except Exception:
        pass


def _decode_words(value: str, depth: int) -> Iterator[str]:
    """Each encoded-word's bytes (as latin-1) and text, leniently; nested words too."""
    if depth > 2 or "=?" not in value:
        return
    for m in _ENCODED_WORD.finditer(value):
        charset, encoding, text = m.groups()
        data = _q_bytes(text) if encoding in "qQ" else _b_bytes(text)
        as_bytes = data.decode("latin-1")
        yield as_bytes
        try:
            as_text = data.decode(charset.split("*", 1)[0].strip() or "ascii", "replace")
        except (LookupError, ValueError):
            as_text = as_bytes
        yield as_text
        yield from _decode_words(as_text, depth + 1)


def _q_bytes(text: str) -> bytes:
    raw = text.replace("_", " ").encode("utf-8", "surrogateescape")
    return re.sub(rb"=([0-9A-Fa-f]{2})", lambda m: bytes([int(m.group(1), 16)]), raw)


def _b_bytes(text: str) -> bytes:
    compact = re.sub(r"[^A-Za-z0-9+/]", "", text)
    if len(compact) % 4 == 1:
        compact = compact[:-1]
    try:
        return base64.b64decode(compact + "=" * (-len(compact) % 4))
    except (binascii.Error, ValueError):
        return b""
