"""Content-filter mode: Postfix delivers to lamsonfilter over SMTP or LMTP after queueing.

``lamsonfilter smtpproxy`` listens on 127.0.0.1:10025 (Postfix's
``content_filter = lamsonfilter:[127.0.0.1]:10025``), turns each message
into one `MailRequest`, runs `Runtime.process`, and carries out the
content filter's table (`lamsonfilter.contentfilter.plan`): reinject to
127.0.0.1:10026 (a Postfix smtpd that does not filter again), quarantine,
and only then reply.  This module is the entry; the rooms are in
`lamsonfilter.contentfilter` (`handler`: the per-message work; `session`: the
SMTP/LMTP session; `server`: start-up, workers, signals), the only package
that imports aiosmtpd.

    config = ProxyConfig(app_dir=Path("examples/mailinglist"))
    serve(config)                       # until SIGTERM (lamsonfilter.contentfilter.server.run)

How Postfix reacts to what this module answers (integration.md §3.5):

=====================================  =========================================
we answer                              Postfix does
=====================================  =========================================
``550 5.1.1`` at RCPT (unroutable      that recipient bounces (the address was
address at an application host)        at our own domain: the bounce is right)
``250`` to the final ``.``             done; only after the reinjection
                                       listener accepted every recipient
``451 4.3.0`` to the final ``.``       keeps the message queued, retries later:
                                       reinjection refused/down, a recipient
                                       refused, a handler error, the deadline
connection closed mid-DATA             deferred (over-long line, oversize)
LMTP: one reply per recipient          per recipient: 250, 5xx (bounce) or 451
=====================================  =========================================

Over SMTP a reject decided after DATA is never a ``5xx`` (that would bounce
to a possibly forged sender): those recipients are discarded and the
message is quarantined in a Maildir, with its envelope.  A handler
exception or the deadline is ``451`` for as long as it lasts; only a
message that killed the process ``POISON_LIMIT`` times is quarantined
(`lamsonfilter.daemon.poison`).  Reinjected mail carries a trace field, and mail
that comes back with it is held instead of looping (`lamsonfilter.contentfilter.looptrace`).
"""

from __future__ import annotations

from .contentfilter.handler import (
    MAX_RECIPIENTS_PER_TRANSACTION,
    ProxyConfig,
    ProxyHandler,
)
from .contentfilter.server import run
from .contentfilter.session import FilterLMTP, FilterSMTP, protocol_factory

__all__ = ["ProxyConfig", "ProxyHandler", "FilterSMTP", "FilterLMTP", "protocol_factory", "serve",
           "MAX_RECIPIENTS_PER_TRANSACTION"]


def serve(config: ProxyConfig) -> int:
    """Run until SIGTERM/SIGINT; returns the exit status (`lamsonfilter.contentfilter.server.run`)."""
    return run(config)
