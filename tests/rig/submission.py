"""What an SMTP client sees of one transaction: every reply, in order (`SendResult`).

`smtp_transaction` runs MAIL, RCPT..., DATA and the final dot on an open
``smtplib.SMTP`` connection and records each reply, so a test can ask
where a transaction failed (`SendResult.rcpt`, `final`, `refused`,
`temporary`) instead of catching smtplib's exceptions.  The deployments
(tests/rig/deploy.py) and the accounting harness (tests/rig/accounting.py)
send with it.
"""

from __future__ import annotations

import re
import smtplib
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Reply", "SendResult", "reply_text", "smtp_transaction"]


@dataclass(frozen=True)
class Reply:
    """One SMTP reply the client got: the command it answered, code and text."""

    command: str  # "EHLO", "MAIL", "RCPT <addr>", "DATA", "."
    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.command}: {self.code} {self.text}"


@dataclass
class SendResult:
    """Every reply of one SMTP transaction, in order; `error` if the connection broke."""

    replies: list[Reply] = field(default_factory=list)
    error: str | None = None

    def reply(self, command: str) -> Reply | None:
        return next((r for r in self.replies if r.command == command), None)

    def rcpt(self, address: str) -> Reply | None:
        return self.reply(f"RCPT <{address}>")

    @property
    def final(self) -> Reply | None:
        """The reply to the final dot (None when DATA was never reached)."""
        return self.reply(".")

    @property
    def accepted(self) -> bool:
        return self.final is not None and 200 <= self.final.code < 300

    @property
    def temporary(self) -> list[Reply]:
        return [r for r in self.replies if 400 <= r.code < 500]

    @property
    def refused(self) -> list[Reply]:
        """The RCPT replies that were not 2xx."""
        return [r for r in self.replies if r.command.startswith("RCPT ") and not 200 <= r.code < 300]

    def __str__(self) -> str:
        lines = [str(r) for r in self.replies]
        if self.error:
            lines.append(f"error: {self.error}")
        return "; ".join(lines) or "(no reply)"


def smtp_transaction(smtp: smtplib.SMTP, sender: str, rcpts: Sequence[str], raw: bytes,
                     result: SendResult) -> bool:
    """MAIL, RCPT..., DATA, the message, dot; every reply into `result`.  True if the dot got 2xx.

    The message goes as it is (only dot-stuffed and given a final CRLF):
    smtplib's ``data()`` would rewrite bare line ends."""
    code, text = smtp.mail(sender)
    result.replies.append(Reply("MAIL", code, reply_text(text)))
    if code != 250:
        return False
    accepted = 0
    for rcpt in rcpts:
        code, text = smtp.rcpt(rcpt)
        result.replies.append(Reply(f"RCPT <{rcpt}>", code, reply_text(text)))
        accepted += code in (250, 251)
    if not accepted:
        return False
    code, text = smtp.docmd("DATA")
    if code != 354:
        result.replies.append(Reply("DATA", code, reply_text(text)))
        return False
    data = re.sub(rb"(?m)^\.", b"..", raw)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    smtp.send(data + b".\r\n")
    code, text = smtp.getreply()
    result.replies.append(Reply(".", code, reply_text(text)))
    return 200 <= code < 300


def reply_text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
