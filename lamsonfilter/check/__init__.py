"""``lamsonfilter check``: find problems in an application and in the Postfix set-up before mail does.

Each finding has a stable ID (``APP...`` for the application, ``PF...`` for
Postfix), a severity, what is wrong and how to fix it:

    for f in check_app(app) + check_postfix("/etc/postfix", app.settings):
        print(f)

The Postfix part lives in `lamsonfilter.check.postfix` (re-exported here).
"""

from __future__ import annotations

import inspect
import re
from typing import Any

from ..app import App
from ..fsm import ERROR, START, is_stateless
from ..graph import _moves, transitions, unknown_returns
from .findings import Finding

__all__ = ["Finding", "check_app", "check_postfix", "PostfixConfig", "MilterEntry", "parse_milters", "app001"]


# ---------------------------------------------------------------- the application
_SAMPLES = ["python", "x", "a", "test", "0" * 32, "a" * 32, "user=example.com", "a.b", "1"]


def _sample_for(regex: str, hosts: list[str]) -> str | None:
    literal = re.fullmatch(r"\(\?:([^()]*)\)|([^()\\[\]*+?{}]+(?:\|[^()\\[\]*+?{}]+)*)", regex)
    candidates = list(hosts) + _SAMPLES
    if literal:
        body = literal.group(1) or literal.group(2) or ""
        candidates = [alt.replace("\\", "") for alt in body.split("|")] + candidates
    for c in candidates:
        if re.fullmatch(regex, c, re.IGNORECASE):
            return c
    return None


def _sample_address(pattern: str, captures: tuple[tuple[str, str], ...], hosts: list[str]) -> str | None:
    out = pattern
    for name, rx in captures:
        sample = _sample_for(rx, hosts)
        if sample is None:
            return None
        out = out.replace(f"({name})", sample, 1)
    return out


def check_app(app: App) -> list[Finding]:
    findings: list[Finding] = []
    hosts = sorted(app.hosts)
    if not hosts:
        findings.append(Finding(
            "APP005", "warning", "HOSTS is empty: no domain belongs to the application, so mail to "
            "an address no route accepts is passed on instead of refused with 550 5.1.1",
            "list the application's domains in HOSTS in config/settings.py"))
    routes = list(app.router)
    for i, route in enumerate(routes):
        sample = _sample_address(route.pattern, route.captures, hosts)
        if sample is None:
            continue
        for earlier in routes[:i]:
            if earlier.regex.fullmatch(sample):
                findings.append(Finding(
                    "APP003", "warning",
                    f"route {route.name} ({route.pattern}) is shadowed by the earlier route "
                    f"{earlier.name} ({earlier.pattern}) for {sample}",
                    "declare the more specific route first (stacked decorators apply bottom-up), "
                    "or narrow the earlier route's captures"))
                break
    for handler in app.handlers:
        moves = transitions(handler)
        names = set(handler.states)
        reachable = {START} | {s for f in handler.states.values() for s in _moves(f, names)}
        reachable |= {spec.function for spec in handler.routes
                      if spec.function in handler.states and is_stateless(handler.states[spec.function])}
        frontier = list(reachable)
        while frontier:
            for nxt in moves.get(frontier.pop(), set()):
                if nxt not in reachable:
                    reachable.add(nxt)
                    frontier.append(nxt)
        for name in handler.states:
            if name not in reachable and name != ERROR:
                findings.append(Finding(
                    "APP002", "warning",
                    f"handler {handler.name}: state {name} is unreachable (no route leads to it and "
                    "no state function returns it)",
                    f"return {name} from a state function, route to it, or remove it"))
        for name, bad in sorted(unknown_returns(handler).items()):
            findings.append(Finding(
                "APP006", "error",
                f"handler {handler.name}: state {name} returns {', '.join(sorted(bad))}, which "
                f"{'is not a state' if len(bad) == 1 else 'are not states'} of this handler "
                "(every message reaching it would be deferred)",
                "return one of " + ", ".join(sorted(n for n, f in handler.states.items() if not is_stateless(f)))
                + " (or None to stay)"))
        if app._views is not None:
            for name, func in handler.states.items():
                for template in _templates_used(func):
                    if app.views.missing([template]):
                        findings.append(Finding(
                            "APP004", "error",
                            f"handler {handler.name}: state {name} uses template {template!r}, which is "
                            "not in the template directories",
                            f"create {template} in app/templates/ (or fix the name)"))
    return findings


_TEMPLATE = re.compile(r"""["']([\w.-]+\.(?:msg|txt|html|htm))["']""")


def _templates_used(func: Any) -> set[str]:
    try:
        source = inspect.getsource(inspect.getmodule(func) or func)
    except (OSError, TypeError):
        return set()
    own = inspect.getsource(func)
    used = set(_TEMPLATE.findall(own))
    # helpers called by the state function that take a template name
    for helper in re.findall(r"\b(_\w+)\(", own):
        m = re.search(rf"def {helper}\(.*?(?=\ndef |\Z)", source, re.S)
        if m:
            used |= set(_TEMPLATE.findall(m.group(0)))
    return used


def app001(error: str) -> Finding:
    """APP001, the application does not start: the error, and a fix that says what to change.

    Start-up errors begin with the file they concern (``.../config/settings.py: HANDLERS ...``,
    ``app/handlers/x.py: NameError: ...``), so the fix names that file and the problem.
    """
    where, sep, what = error.partition(": ")
    if sep and ("/" in where or where.endswith(".py")) and " " not in where:
        fix = f"edit {where}: {what}; then run check again"
    else:
        fix = f"correct this, then run check again: {error}"
    return Finding("APP001", "error", error, fix)


from .milter import MilterEntry, parse_milters  # noqa: E402
from .postfix import PostfixConfig, check_postfix  # noqa: E402
