"""Finite state machines, as in Lamson: a state is a function that returns the next state.

A `Handler` groups the states of one conversation (a mailing list, a help
desk) and the routes that lead to it.  It is plain data until an `App`
includes it; nothing is registered globally.

    handler = Handler("mailinglist", key=lambda ctx: (ctx.args["list"], ctx.sender))

    @handler.route("(list)-subscribe@(host)", list=r"[a-z0-9]+")
    def START(ctx, list, host):
        ctx.reply("confirm.msg", ...)
        return CONFIRMING

    @handler.state
    def CONFIRMING(ctx, list, host):
        ...
        return MEMBER               # or "MEMBER", or None to stay

    @handler.route("(list)-help@(host)")
    @stateless
    def HELP(ctx, list, host):      # runs whatever the state is
        ...

How a message reaches a function: the route that matched the recipient
picks the handler and names the event (``ctx.event``: the route's
``event=``, or the name of the function it decorates); the handler's
current state for the message's key picks the function (``START`` when the
key has no state yet).  A route attached to a `stateless` function calls
that function directly.  A state function receives the context and those
route captures its signature accepts (all of them with ``**kwargs``).  The key defaults to
(handler name, sender, recipient) and can be customised per handler.

Errors: when a state function raises, the runtime defers the message
(451 4.3.0) and, only if the handler defines an ``ERROR`` state, moves the key
there.  Start-up refuses a handler whose routes or returned states name a
function it does not have (`HandlerError`).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Hashable, Iterable, Mapping

from .errors import HandlerError
from .routing import route_signature_problems

if TYPE_CHECKING:
    from .context import Context

__all__ = ["call_state", "Handler", "HandlerError", "RouteSpec", "stateless", "START", "ERROR", "state_name",
           "handler_signature_problems"]

START = "START"
ERROR = "ERROR"

StateFunction = Callable[..., Any]
KeyFunction = Callable[["Context"], Iterable[Hashable] | str]


def stateless(func: StateFunction) -> StateFunction:
    """Mark a function to run whatever the state of the key (Lamson's ``@stateless``)."""
    func._lamsonfilter_stateless = True  # type: ignore[attr-defined]
    return func


def is_stateless(func: StateFunction) -> bool:
    return bool(getattr(func, "_lamsonfilter_stateless", False))


def state_name(value: Any) -> str | None:
    """The state a function returned: a function (its name), a name, or None (stay)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    name = getattr(value, "__name__", None)
    if callable(value) and isinstance(name, str):
        return name
    raise HandlerError(f"a state function returned {value!r}; return the next state function, its name, or None")


@dataclass(frozen=True)
class RouteSpec:
    """A route as declared on a handler, before the app compiles it."""

    pattern: str
    function: str
    captures: dict[str, str] = field(default_factory=dict)
    event: str = ""

    @property
    def event_name(self) -> str:
        """What the state function sees as ``ctx.event``: the declared event or the function name."""
        return self.event or self.function


class Handler:
    """The states and routes of one conversation.

    `name` prefixes every state key; `key` maps a `Context` to the rest of
    the key (default: sender and recipient, lower-cased).  `default_action`
    is the fate of a recipient whose state function chose none: ``drop``
    (the application consumed the mail, Lamson's model) or ``deliver``.

    `replies` says what kind of automatic replies (``ctx.reply``) the
    handler sends, which sets how many a sender may get
    (`lamsonfilter.guards.REPLY_KINDS`, overridable with ``REPLY_LIMIT``):
    ``"service"`` (the default: it answers requests, such as confirmations
    or tickets; 10 per hour per sender) or ``"responder"`` (it answers on a
    person's behalf, such as a vacation notice; one per sender per 7 days,
    as RFC 3834 asks).
    """

    def __init__(
        self,
        name: str,
        key: KeyFunction | None = None,
        default_action: str = "drop",
        replies: str = "service",
    ) -> None:
        if not name or ":" in name:
            raise HandlerError(f"handler name {name!r}: must be non-empty and contain no ':'")
        if name == "lamsonfilter":
            raise HandlerError("handler name 'lamsonfilter' is reserved for the framework's own state keys")
        if default_action not in ("drop", "deliver"):
            raise HandlerError(f"handler {name}: default_action must be 'drop' or 'deliver'")
        if replies not in ("service", "responder"):
            raise HandlerError(f"handler {name}: replies must be 'service' or 'responder', not {replies!r}")
        self.name = name
        self.replies = replies
        self.key_function = key
        self.default_action = default_action
        self.states: dict[str, StateFunction] = {}
        self.routes: list[RouteSpec] = []

    def __repr__(self) -> str:
        return f"Handler({self.name!r})"

    # ------------------------------------------------------------ declaring
    def state(self, func: StateFunction) -> StateFunction:
        """Declare a state function (reachable by being returned from another state)."""
        if func.__name__ in self.states and self.states[func.__name__] is not func:
            raise HandlerError(f"handler {self.name}: state {func.__name__} defined twice")
        self.states[func.__name__] = func
        return func

    def route(
        self, pattern: str, event: str = "", **captures: str
    ) -> Callable[[StateFunction], StateFunction]:
        """Route recipients matching `pattern` to this handler (and declare the function a state).

        `event` names the route for the state functions (``ctx.event``);
        it defaults to the decorated function's name.  Decorators stack:
        one function may have several routes.
        """

        def decorate(func: StateFunction) -> StateFunction:
            self.state(func)
            self.routes.append(RouteSpec(pattern, func.__name__, dict(captures), event))
            return func

        return decorate

    def add_route(self, pattern: str, function: str, event: str = "", **captures: str) -> None:
        """Declare a route to a state function by name (checked at start-up)."""
        self.routes.append(RouteSpec(pattern, function, dict(captures), event))

    # ------------------------------------------------------------ running
    def key(self, ctx: "Context") -> str:
        """The storage key of the conversation this message belongs to."""
        if self.key_function is None:
            parts: Iterable[Hashable] = (ctx.sender.lower(), ctx.recipient.lower())
        else:
            result = self.key_function(ctx)
            parts = (result,) if isinstance(result, str) else result
        return ":".join([self.name, *(str(p) for p in parts)])

    def function_for(self, route_function: str, state: str) -> StateFunction | None:
        """The function to call for a message routed to `route_function` in `state`."""
        routed = self.states[route_function]
        if is_stateless(routed):
            return routed
        return self.states.get(state)

    def check(self) -> list[str]:
        """Problems that must stop start-up: routes to missing states, bad signatures."""
        problems = []
        for spec in self.routes:
            if spec.function not in self.states:
                problems.append(
                    f"handler {self.name}: route {spec.pattern!r} leads to {spec.function!r}, "
                    "which is not a state of this handler"
                )
        if self.routes and START not in self.states and not all(
            is_stateless(self.states[s.function]) for s in self.routes if s.function in self.states
        ):
            problems.append(f"handler {self.name}: has stateful routes but no START state")
        for name, func in self.states.items():
            if not callable(func):
                problems.append(f"handler {self.name}: state {name} is not callable")
                continue
            try:
                params = list(inspect.signature(func).parameters.values())
            except (TypeError, ValueError):
                continue
            if not params:
                problems.append(
                    f"handler {self.name}: state {name} takes no arguments; it receives the context first"
                )
        return problems


def handler_signature_problems(handler: Handler) -> list[str]:
    """The routes of `handler` that do not capture what the functions they lead to require.

    A route to a stateless function leads to that function only; a route to
    a state leads to whichever state the conversation is in, so to every
    stateful function of the handler.  `App.start` refuses these.
    """
    problems: list[str] = []
    stateful = [(n, f) for n, f in handler.states.items() if callable(f) and not is_stateless(f)]
    for spec in handler.routes:
        routed = handler.states.get(spec.function)
        if routed is None:
            continue  # Handler.check reports it
        funcs = [(spec.function, routed)] if is_stateless(routed) else stateful
        for problem in route_signature_problems(handler.name, spec.pattern, funcs):
            if problem not in problems:
                problems.append(problem)
    return problems


def call_state(func: Any, ctx: Any, args: Mapping[str, str]) -> Any:
    """Call a state function with the captures its signature accepts."""
    accepted = _accepted_captures(func)
    if accepted is None:
        return func(ctx, **args)
    return func(ctx, **{k: v for k, v in args.items() if k in accepted})


@functools.lru_cache(maxsize=4096)
def _accepted_captures(func: Any) -> frozenset[str] | None:
    """The keyword parameters of `func`, or None when it takes any (``**kw``) or cannot be inspected."""
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return frozenset(params)
