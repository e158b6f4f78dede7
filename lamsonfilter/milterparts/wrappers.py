"""How the milter's callbacks are wrapped: pymilter's decorators, typed, and the three exception rules.

`lamsonfilter.milterparts.callbacks` decorates each `LamsonMilter` method
with these; what an exception in a callback becomes depends on whether
Postfix waits for that step's reply:

    @symlist("i")
    @guarded          # Postfix waits: 451 4.3.0 (TEMPFAIL) now, with one log line
    def eom(self): ...

    @noreply
    @noted            # connection steps: logged, the next MAIL FROM is answered 451
    @held             # header/body steps: logged, end of message is answered 451

The wrapped object (the callbacks instance) provides ``_fail(callback, exc)``
(the log line and the reply), ``_broken`` and ``_tx`` (the transaction).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

__all__ = ["symlist", "noreply", "decode", "guarded", "noted", "held", "macro_lists",
           "CONTINUE", "ACCEPT", "REJECT", "TEMPFAIL"]

import Milter  # type: ignore[import-untyped,import-not-found,unused-ignore]

F = TypeVar("F", bound=Callable[..., int])

# pymilter's return codes, typed
CONTINUE: int = Milter.CONTINUE
ACCEPT: int = Milter.ACCEPT
REJECT: int = Milter.REJECT
TEMPFAIL: int = Milter.TEMPFAIL


def symlist(*macros: str) -> Callable[[F], F]:
    """``@Milter.symlist``: the macros Postfix sends for this stage (at most 5)."""
    decorate: Callable[[F], F] = Milter.symlist(*macros)
    return decorate


def noreply(func: F) -> F:
    """``@Milter.noreply``: Postfix does not wait for this step's reply (one round trip less)."""
    decorated: F = Milter.noreply(func)
    return decorated


def decode(strategy: str) -> Callable[[F], F]:
    """``@Milter.decode``: how pymilter hands over header and envelope values."""
    decorate: Callable[[F], F] = Milter.decode(strategy)
    return decorate


def guarded(func: F) -> F:
    """Wrap a reply-bearing callback: any exception → setreply 451 4.3.0 and TEMPFAIL."""

    @functools.wraps(func)
    def wrapper(self: Any, *args: Any) -> int:
        try:
            return func(self, *args)
        except Exception as exc:  # noqa: BLE001 -- the contract: tempfail, never leak
            reply: int = self._fail(func.__name__, exc)
            return reply

    return wrapper  # type: ignore[return-value]


def noted(func: F) -> F:
    """Wrap a callback whose reply Postfix does not wait for (`noreply`): an exception is
    logged and kept, and the next transaction of the connection is answered 451 4.3.0."""

    @functools.wraps(func)
    def wrapper(self: Any, *args: Any) -> int:
        try:
            return func(self, *args)
        except Exception as exc:  # noqa: BLE001 -- reported at MAIL FROM
            self._fail(func.__name__, exc)
            self._broken = f"{func.__name__} failed: {type(exc).__name__}"
            return CONTINUE

    return wrapper  # type: ignore[return-value]


def held(func: F) -> F:
    """Wrap a content step whose reply Postfix does not wait for (header, end of header,
    body: `noreply`): an exception is logged and kept in the transaction, and end of
    message answers 451 4.3.0 -- the message is still refused, one round trip per step
    cheaper."""

    @functools.wraps(func)
    def wrapper(self: Any, *args: Any) -> int:
        if self._tx is not None and self._tx.failed is not None:
            return CONTINUE  # the message is refused anyway: skip the rest of its content
        try:
            return func(self, *args)
        except Exception as exc:  # noqa: BLE001 -- reported at end of message
            self._fail(func.__name__, exc)
            if self._tx is not None and self._tx.failed is None:
                self._tx.failed = f"{func.__name__} failed: {type(exc).__name__}"
            return CONTINUE

    return wrapper  # type: ignore[return-value]


def macro_lists(cls: type) -> tuple[tuple[int, str], ...]:
    """(stage, "macro macro") for each callback of `cls` with a `symlist`."""
    found = []
    for callback, stage in Milter.MACRO_CALLBACKS.items():
        macros = getattr(getattr(cls, callback), "_symlist", None)
        if macros:
            found.append((stage, " ".join(macros)))
    return tuple(found)
