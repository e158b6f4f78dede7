"""Errors shared by the core modules that must not import each other.

`HandlerError` is raised by `lamsonfilter.fsm` (a handler that cannot run:
a missing state, a bad route; at start-up) and by `Context.set_state` (a
state function naming a state its handler does not have).  It lives here so
that `lamsonfilter.context` need not import `lamsonfilter.fsm`, which
imports it for its types.
"""

__all__ = ["HandlerError"]


class HandlerError(Exception):
    """A handler that cannot run (missing state, bad route); raised at start-up."""
