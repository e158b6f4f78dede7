"""Errors shared by the core modules that must not import each other.

`HandlerError` is raised by `lamsonfilter.fsm` (a handler that cannot run:
a missing state, a bad route; at start-up) and by `Context.set_state` (a
state function naming a state its handler does not have).  It lives here so
that `lamsonfilter.context` need not import `lamsonfilter.fsm`, which
imports it for its types.  `Deferred` is what ``ctx.defer()`` raises and
`lamsonfilter.app` catches.
"""

__all__ = ["HandlerError", "Deferred"]


class HandlerError(Exception):
    """A handler that cannot run (missing state, bad route); raised at start-up."""


class Deferred(Exception):
    """Raised by ``ctx.defer()``: stop the state function; the runtime queues the message.

    `lamsonfilter.app.App` catches it (and also notices a deferral whose
    exception the state function caught itself).
    """

    def __init__(self, recipient: str) -> None:
        super().__init__(f"{recipient}: deferred to the queue")
        self.recipient = recipient
