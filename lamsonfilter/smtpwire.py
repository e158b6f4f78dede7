"""SMTP on the wire, both directions: xtext, XFORWARD lines, dot-stuffing, when SMTPUTF8 is needed.

The encodings the one SMTP client (`lamsonfilter.smtpclient`) sends and the
content filter's server side (`lamsonfilter.contentfilter.session`) reads:

    xtext_encode("a b")              # 'a+20b' (RFC 3461 §4)
    xforward_commands({"IDENT": "4Xyz"}, "NAME ADDR IDENT")   # [b'XFORWARD IDENT=4Xyz']
    stuff(b"line\n.dot\n")          # b'line\r\n..dot\r\n': CRLF-only, dots doubled

Pure functions; nothing here raises on odd input.
"""

from __future__ import annotations

from typing import Mapping

from .mail import header_end

__all__ = ["XFORWARD_ATTRS", "xtext_encode", "xtext_decode", "xforward_commands", "stuff",
           "utf8_addresses", "utf8_headers"]

#: XFORWARD attributes (Postfix XFORWARD_README), in the order Postfix sends them.
XFORWARD_ATTRS = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")
#: A command line, CRLF included, stays within RFC 5321 §4.5.3.1.4's 512 octets.
_MAX_COMMAND = 512


def xtext_decode(value: str) -> str:
    """RFC 3461 §4 xtext: ``+XX`` is a hex-encoded byte."""
    if "+" not in value:
        return value
    out = bytearray()
    raw = value.encode("utf-8", "surrogateescape")
    i = 0
    while i < len(raw):
        if raw[i:i + 1] == b"+" and i + 3 <= len(raw):
            try:
                out.append(int(raw[i + 1:i + 3], 16))
                i += 3
                continue
            except ValueError:
                pass
        out.append(raw[i])
        i += 1
    return out.decode("utf-8", "surrogateescape")


def xtext_encode(value: str) -> str:
    """xtext-encode: printable ASCII except ``+`` and ``=`` as is, every other byte as ``+XX``."""
    raw = value.encode("utf-8", "surrogateescape")
    return "".join(chr(b) if 33 <= b <= 126 and b not in (43, 61) else f"+{b:02X}" for b in raw)


def xforward_commands(attrs: Mapping[str, str], supported: str | None) -> list[bytes]:
    """XFORWARD lines for the attributes the server supports, each within 512 octets."""
    if supported is None or not attrs:
        return []
    allowed = set(supported.split()) or set(XFORWARD_ATTRS)
    items = [f"{k}={xtext_encode(attrs[k][:255])}" for k in XFORWARD_ATTRS if k in attrs and k in allowed]
    lines: list[bytes] = []
    line = "XFORWARD"
    for item in items:
        if len(line) + 1 + len(item) + 2 > _MAX_COMMAND and line != "XFORWARD":
            lines.append(line.encode("ascii"))
            line = "XFORWARD"
        line += " " + item
    if line != "XFORWARD":
        lines.append(line.encode("ascii"))
    return lines


def stuff(data: bytes, at_line_start: bool = True) -> bytes:
    """Make CRLF-only bytes safe to send as DATA: bare CR and LF become CRLF, leading dots doubled.

    Normalising first and stuffing second means no content, however it was
    received, can produce ``CRLF . CRLF`` on the wire (SMTP smuggling).
    """
    if data.count(b"\n") != data.count(b"\r\n") or data.count(b"\r") != data.count(b"\r\n"):
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if b"\r\n." in data:
        data = data.replace(b"\r\n.", b"\r\n..")
    if at_line_start and data.startswith(b"."):
        data = b"." + data
    return data


def utf8_addresses(sender: str, recipients: tuple[str, ...] | list[str]) -> bool:
    """Whether the envelope needs SMTPUTF8 (RFC 6531): a non-ASCII address."""
    return not (sender.isascii() and all(r.isascii() for r in recipients))


def utf8_headers(raw: bytes) -> bool:
    """Whether the header block has UTF-8 (RFC 6532), which SMTPUTF8 announces when offered."""
    return not raw[:header_end(raw)].isascii()
