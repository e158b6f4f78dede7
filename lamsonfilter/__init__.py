"""lamsonfilter: Lamson's mail application model behind Postfix or Exim.

Write a mail application as routes on addresses, state-machine handlers,
Mako templates and stored state; run it as a Postfix milter
(``lamsonfilter milter``), as an after-queue content filter
(``lamsonfilter smtpproxy``), or try it with no server at all
(``lamsonfilter test < message.eml``).

The one flow: a transport builds a `MailRequest`, calls `App.process`, and
turns the returned `Decision` back into its protocol.  This package's core
opens no socket and imports neither pymilter nor aiosmtpd.
"""

from .app import App, StartupError
from .context import Context
from .decisions import Action, Decision, HeaderChange, OutboxMessage, Outcome
from .fsm import ERROR, START, Handler, stateless
from .mail import Envelope, MailRequest
from .views import Response

__version__ = "0.1.0"

__all__ = [
    "App",
    "StartupError",
    "Context",
    "Action",
    "Decision",
    "HeaderChange",
    "OutboxMessage",
    "Outcome",
    "Handler",
    "stateless",
    "START",
    "ERROR",
    "Envelope",
    "MailRequest",
    "Response",
    "__version__",
]
