"""The envelope at the top of a queue file: ``Return-Path:`` and ``Delivered-To:``, as Postfix writes them.

Postfix's Maildir delivery (virtual(8), local(8)) and `MailQueue.put` write
the envelope sender and the one recipient as the file's first lines; the
message follows::

    sender, recipient, start = parse_envelope(name, path, data)   # data[start:] is the message

A file without them raises `EnvelopeMissing` with the reason: its caller
moves it aside, the envelope is never guessed from ``To:``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ENVELOPE_MAX", "EnvelopeMissing", "parse_envelope"]

#: At most this many bytes of leading envelope lines are read.
ENVELOPE_MAX = 4096


class EnvelopeMissing(Exception):
    """A queue file without ``Return-Path:`` and ``Delivered-To:`` lines at its top."""

    def __init__(self, name: str, path: Path | str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name, self.path, self.reason = name, Path(path), reason


def parse_envelope(name: str, path: Path | str, data: bytes) -> tuple[str, str, int]:
    """(sender, recipient, offset of the message) from the file's leading envelope lines:
    ``Return-Path:``, an optional ``X-Original-To:``, then ``Delivered-To:`` (Postfix's order)."""
    sender: str | None = None
    recipient: str | None = None
    pos = 0
    limit = min(len(data), ENVELOPE_MAX)
    while pos < limit:
        end = data.find(b"\n", pos, limit)
        if end < 0:
            break
        line = data[pos:end].rstrip(b"\r")
        key, sep, value = line.partition(b":")
        key = key.lower()
        if not sep or key not in (b"return-path", b"delivered-to", b"x-original-to"):
            break
        text = value.strip().decode("utf-8", "replace")
        if key == b"return-path" and sender is None:
            if not (text.startswith("<") and text.endswith(">")):
                raise EnvelopeMissing(name, path, f"Return-Path {text!r} is not <address>")
            sender = text[1:-1]
        pos = end + 1
        if key == b"delivered-to":  # Postfix writes it last; later ones are the message's own
            recipient = text
            break
    if sender is None:
        raise EnvelopeMissing(name, path, "no Return-Path: line at the top (the envelope sender)")
    if not recipient:
        raise EnvelopeMissing(name, path, "no Delivered-To: line at the top (the envelope recipient)")
    return sender, recipient, pos
