"""The replies lamsonfilter gives, in one table: code, enhanced status code, text, and when.

Every transport takes its replies from here: the milter (``setreply``), the
content filter (its SMTP/LMTP lines), the policy service (``action=``) and
the dry run's report.  docs/design.rst reproduces `TABLE` (a test compares
the two)::

    >>> TEMPFAIL.line
    '451 4.3.0 Temporary failure, try again later'
    >>> BAD_RECIPIENT.with_detail("no @").milter
    ('501', '5.1.3', 'Bad recipient address: no @')

A reply an application chooses (``ctx.reject(550, "5.7.1", "not a
member")``) is the application's; the table holds the ones lamsonfilter
itself gives, and the defaults it fills in.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["Reply", "TABLE", "TEMPFAIL", "BAD_SENDER", "BAD_RECIPIENT", "NO_SUCH_ADDRESS", "REJECTED",
           "TOO_MANY_RECIPIENTS", "SENDER_OK", "RECIPIENT_OK", "DELIVERED", "QUARANTINED", "MAIL_LOOP",
           "LINE_TOO_LONG", "TOO_BIG", "TOO_BIG_FOR_SIZE"]


@dataclass(frozen=True)
class Reply:
    """One SMTP reply: ``code`` (``451``), ``enhanced`` (RFC 3463, ``4.3.0``), ``text``, and when it is given."""

    name: str
    code: int
    enhanced: str
    text: str
    when: str

    @property
    def line(self) -> str:
        """The reply as one SMTP line, e.g. ``451 4.3.0 Temporary failure, try again later``."""
        return f"{self.code} {self.enhanced} {self.text}"

    @property
    def milter(self) -> tuple[str, str, str]:
        """The arguments of pymilter's ``setreply``."""
        return (str(self.code), self.enhanced, self.text)

    def with_detail(self, detail: object) -> Reply:
        """The same reply with ``: detail`` after the text (the reason a given address was refused)."""
        return replace(self, text=f"{self.text}: {detail}")


TEMPFAIL = Reply("TEMPFAIL", 451, "4.3.0", "Temporary failure, try again later",
                 "any failure before the mail is safe: a handler error, the deadline, the database, "
                 "reinjection refused or down, a deferred message that could not be queued, an internal error "
                 "(one reply whatever the cause; the decision's cause, message or storage, is logged and "
                 "only message counts towards deq's POISON_LIMIT)")
BAD_SENDER = Reply("BAD_SENDER", 501, "5.1.7", "Bad sender address",
                   "MAIL FROM that does not parse as an address")
BAD_RECIPIENT = Reply("BAD_RECIPIENT", 501, "5.1.3", "Bad recipient address",
                      "RCPT TO that does not parse as an address (milter, content filter, policy service)")
NO_SUCH_ADDRESS = Reply("NO_SUCH_ADDRESS", 550, "5.1.1", "No such address here",
                        "RCPT TO an address at the application's hosts that no route takes")
REJECTED = Reply("REJECTED", 550, "5.7.1", "Rejected",
                 "the default code and text of a handler's reject that gave none")
TOO_MANY_RECIPIENTS = Reply("TOO_MANY_RECIPIENTS", 452, "4.5.3", "Error: too many recipients",
                            "content filter: more RCPT TO than MAX_RECIPIENTS_PER_TRANSACTION")
SENDER_OK = Reply("SENDER_OK", 250, "2.1.0", "Ok", "content filter: MAIL FROM accepted")
RECIPIENT_OK = Reply("RECIPIENT_OK", 250, "2.1.5", "Ok", "content filter: RCPT TO accepted")
DELIVERED = Reply("DELIVERED", 250, "2.0.0", "Ok",
                  "content filter: the reinjection listener accepted the message (or nothing was to go on)")
QUARANTINED = Reply("QUARANTINED", 250, "2.0.0", "Ok: quarantined",
                    "content filter: the message is kept in the quarantine (a reject after DATA, poison)")
MAIL_LOOP = Reply("MAIL_LOOP", 451, "4.4.6",
                  "Mail loop: lamsonfilter reinjected this message and it came back; "
                  "the reinjection listener must not filter again",
                  "content filter: a message carrying this filter's own trace field")
LINE_TOO_LONG = Reply("LINE_TOO_LONG", 500, "5.5.2",
                      "Line too long (RFC 5321 4.5.3.1.6: at most 1000 octets); closing connection",
                      "content filter: a DATA line over 1000 octets (Postfix defers the message)")
TOO_BIG = Reply("TOO_BIG", 552, "5.3.4", "Message size exceeds fixed maximum message size; closing connection",
                "content filter: DATA over the size limit (Postfix defers the message)")
TOO_BIG_FOR_SIZE = Reply("TOO_BIG_FOR_SIZE", 452, "4.3.4",
                         "Message larger than the content filter's SIZE; raise smtpproxy --max-size "
                         "(or give it --postfix-config)",
                         "content filter: MAIL FROM ... SIZE= above the limit (Postfix keeps the message)")

#: Every reply above, in the order docs/design.rst shows them.
TABLE: tuple[Reply, ...] = (TEMPFAIL, BAD_SENDER, BAD_RECIPIENT, NO_SUCH_ADDRESS, REJECTED, TOO_MANY_RECIPIENTS,
                            SENDER_OK, RECIPIENT_OK, DELIVERED, QUARANTINED, MAIL_LOOP, LINE_TOO_LONG, TOO_BIG,
                            TOO_BIG_FOR_SIZE)
