"""Routes: patterns on the recipient address that pick a handler.

A route pattern is an address with named captures in parentheses, as in
Lamson:

    "(list)-subscribe@(host)"

Each ``(name)`` becomes a named group whose regular expression is declared
with the route (``list=r"[a-z0-9][a-z0-9.]*"``), or in the application's
route defaults (``host`` usually comes from settings), or else
`DEFAULT_CAPTURE`.  The rest of the pattern is literal text.  Matching is on
the whole address, case-insensitively.

    >>> router = Router(defaults={"host": r"lists\\.example\\.org"})
    >>> r = router.add("(list)-subscribe@(host)", target="START", list=r"[a-z0-9]+")
    >>> router.freeze()
    >>> router.match("python-subscribe@lists.example.org").args
    {'list': 'python', 'host': 'lists.example.org'}

Mistakes fail at start-up with `RoutingError` naming the route: a duplicate
pattern, an unknown capture regex that does not compile, a pattern with
nested variable repetition (``(a+)+``, ``(\\w{1,30}\\.?)+``: catastrophic
backtracking on a hostile RCPT), or a route added after `freeze`.  `handler_signature_problems`
lists the routes that do not capture a parameter their state functions
require (a typo such as ``(lsit)`` for ``list``); `App.start` refuses them.
At run time an address longer than `lamsonfilter.mail.MAX_ADDRESS_LENGTH`
matches nothing.
"""

from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

# The regex parser behind re.compile (re._parser since Python 3.11); read-only use.
sre_parse: Any = importlib.import_module("re._parser")

from .mail import MAX_ADDRESS_LENGTH

__all__ = [
    "Route", "RouteMatch", "Router", "RoutingError", "DEFAULT_CAPTURE", "check_regex",
    "capture_names", "unbound_parameters", "route_signature_problems",
]

#: What a capture matches when nobody declared a regex for it: one or more
#: characters that are not ``@`` or white space (linear-time to match).
DEFAULT_CAPTURE = r"[^@\s]+"

_CAPTURE = re.compile(r"\(([A-Za-z_][A-Za-z0-9_]*)\)")


class RoutingError(Exception):
    """A route that cannot be used; raised at start-up, naming the route."""


@dataclass(frozen=True)
class Route:
    """One compiled route: a pattern, its capture regexes, and what it leads to."""

    pattern: str
    captures: tuple[tuple[str, str], ...]
    regex: re.Pattern[str] = field(compare=False, repr=False)
    target: Any = field(compare=False, repr=False)
    name: str = ""

    def __str__(self) -> str:
        return self.name or self.pattern


@dataclass(frozen=True)
class RouteMatch:
    """A recipient address matched by a route, with the captured values."""

    route: Route
    address: str
    args: dict[str, str]


def check_regex(regex: str, where: str) -> None:
    """Refuse a regex that cannot compile or that nests variable repetition.

    A quantifier that repeats its body more than once around a sub-pattern
    that itself repeats a variable number of times backtracks exponentially
    on a near miss: ``(a+)+``, ``(a*b?)*``, ``(\\w+\\.?)+``; bounded repeats
    count too, inside (``(\\w{1,30}\\.?)+`` splits a 39-character near miss
    in 2**38 ways) and outside (``(\\w{1,30}\\.?){1,40}`` took 3.4 s on a
    25-character near miss).  A fixed inner count such as ``(\\w{2})+`` is
    linear, and so is an optional group, ``(\\w+\\.)?``.  So does a repeat of
    an alternation whose branches can match the same text, which is
    approximated here by any alternation inside such a repeat whose
    branches are not all single fixed strings of the same length.
    """
    try:
        parsed = sre_parse.parse(regex)
    except re.error as exc:
        raise RoutingError(f"{where}: invalid regular expression {regex!r}: {exc}") from None
    problem = _nested_quantifier(parsed, inside_repeat=False)
    if problem:
        raise RoutingError(
            f"{where}: {regex!r} is prone to catastrophic backtracking ({problem}); "
            "write it without nested repetition, e.g. [a-z0-9.]+ instead of ([a-z0-9]+\\.?)+"
        )


_MAXREPEAT = sre_parse.MAXREPEAT
_REPEATS = {sre_parse.MAX_REPEAT, sre_parse.MIN_REPEAT, getattr(sre_parse, "POSSESSIVE_REPEAT", None)}


def _nested_quantifier(items: Any, inside_repeat: bool) -> str | None:
    """What makes `items` backtrack badly, or None; `inside_repeat`: in a body repeated more than once."""
    for op, av in items:
        if op in _REPEATS and op is not None:
            lo, hi, sub = av
            repeats = hi == _MAXREPEAT or hi > 1  # its body's ways of matching multiply
            variable = hi != lo  # bounded or not: {1,30} is as variable as +
            if inside_repeat and variable:
                return "a repeated group contains another repetition"
            found = _nested_quantifier(sub, inside_repeat or repeats)
            if found:
                return found
        elif op is sre_parse.SUBPATTERN:
            found = _nested_quantifier(av[-1], inside_repeat)
            if found:
                return found
        elif op is sre_parse.BRANCH:
            branches = av[1]
            if inside_repeat and len(branches) > 1:
                return "a repeated group contains an alternation"
            for b in branches:
                found = _nested_quantifier(b, inside_repeat)
                if found:
                    return found
        elif op in (sre_parse.ASSERT, sre_parse.ASSERT_NOT):
            found = _nested_quantifier(av[1], inside_repeat)
            if found:
                return found
    return None


def capture_names(pattern: str) -> list[str]:
    """The capture names of a route pattern, in order: ``(list)-x@(host)`` -> ``["list", "host"]``."""
    return _CAPTURE.findall(pattern)


def unbound_parameters(func: Callable[..., Any], pattern: str) -> list[str]:
    """Required parameters of `func` (after the context) that the route `pattern` does not capture.

    A state function receives the context and the captures its signature
    accepts; a required parameter no capture fills is a ``TypeError`` on
    every message the route leads to (a typo such as ``(lsit)`` for
    ``(list)``), so start-up refuses it.  Parameters with a default,
    ``*args`` and ``**kwargs`` need no capture.
    """
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        return []
    captured = set(capture_names(pattern))
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [
        p.name for p in params[1:]
        if p.kind in kinds and p.default is inspect.Parameter.empty and p.name not in captured
    ]


def route_signature_problems(
    handler_name: str, pattern: str, functions: Iterable[tuple[str, Callable[..., Any]]]
) -> list[str]:
    """One problem per parameter that functions reachable through `pattern` require but it does not capture."""
    needers: dict[str, list[str]] = {}
    for name, func in functions:
        for missing in unbound_parameters(func, pattern):
            needers.setdefault(missing, []).append(name)
    captured = ", ".join(capture_names(pattern)) or "none"
    return [
        f"handler {handler_name}: route {pattern!r} does not capture {param!r}, which "
        f"{'state' if len(names) == 1 else 'states'} {', '.join(names)} "
        f"{'requires' if len(names) == 1 else 'require'} (the route captures: {captured})"
        for param, names in needers.items()
    ]


def compile_pattern(pattern: str, captures: dict[str, str], defaults: dict[str, str]) -> tuple[re.Pattern[str], tuple[tuple[str, str], ...]]:
    """Turn ``(name)-x@(host)`` into a compiled full-match regex."""
    where = f"route {pattern!r}"
    if not pattern or "@" not in pattern:
        raise RoutingError(f"{where}: a route pattern is an address and needs an '@'")
    names = capture_names(pattern)
    if len(names) != len(set(names)):
        raise RoutingError(f"{where}: a capture name is used twice")
    unknown = set(captures) - set(names)
    if unknown:
        raise RoutingError(f"{where}: regex given for {sorted(unknown)}, which the pattern does not capture")
    out: list[str] = []
    used: list[tuple[str, str]] = []
    pos = 0
    for m in _CAPTURE.finditer(pattern):
        out.append(re.escape(pattern[pos:m.start()]))
        name = m.group(1)
        rx = captures.get(name) or defaults.get(name) or DEFAULT_CAPTURE
        check_regex(rx, f"{where}, capture {name!r}")
        if re.compile(rx).groups:
            # keep user groups from shifting ours: make them non-capturing
            rx = re.sub(r"\((?!\?)", "(?:", rx)
        out.append(f"(?P<{name}>{rx})")
        used.append((name, rx))
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    source = "".join(out)
    check_regex(source, where)
    try:
        return re.compile(source, re.IGNORECASE), tuple(used)
    except re.error as exc:
        raise RoutingError(f"{where}: {exc}") from None


class Router:
    """An ordered list of routes, frozen at start-up.

    The first route whose pattern matches the whole address wins
    (`match`); `matches` lists every route that would match, which is what
    ``lamsonfilter routes --test ADDRESS`` shows.
    """

    def __init__(self, defaults: dict[str, str] | None = None) -> None:
        self.defaults = dict(defaults or {})
        for name, rx in self.defaults.items():
            check_regex(rx, f"route default {name!r}")
        self._routes: list[Route] = []
        self._frozen = False

    def add(self, pattern: str, target: Any, name: str = "", **captures: str) -> Route:
        if self._frozen:
            raise RoutingError(f"route {pattern!r}: added after the router was frozen (at start-up)")
        for r in self._routes:
            if r.pattern.lower() == pattern.lower():
                raise RoutingError(
                    f"route {pattern!r}: duplicate of the route for {r.name or r.pattern}"
                )
        regex, used = compile_pattern(pattern, captures, self.defaults)
        route = Route(pattern, used, regex, target, name)
        self._routes.append(route)
        return route

    def freeze(self) -> None:
        self._frozen = True

    @property
    def frozen(self) -> bool:
        return self._frozen

    def __iter__(self) -> Iterator[Route]:
        return iter(self._routes)

    def __len__(self) -> int:
        return len(self._routes)

    def matches(self, address: str) -> list[RouteMatch]:
        if len(address) > MAX_ADDRESS_LENGTH:
            return []
        found = []
        for route in self._routes:
            m = route.regex.fullmatch(address)
            if m:
                found.append(RouteMatch(route, address, {k: v for k, v in m.groupdict().items()}))
        return found

    def match(self, address: str) -> RouteMatch | None:
        if len(address) > MAX_ADDRESS_LENGTH:
            return None
        for route in self._routes:
            m = route.regex.fullmatch(address)
            if m:
                return RouteMatch(route, address, dict(m.groupdict()))
        return None
