"""The demo's banner: how to try *this* application, made from the application itself.

``lamsonfilter demo`` prints where things are (port, work directory,
mailbox, logs) and then what to send.  Both come from the application, so
the banner is right for the example mailing list and for anything ``gen``
made or you wrote:

- **its hosts and routes**, in the order they are tried (the data
  ``lamsonfilter routes`` prints), with an example address for each.  A
  capture whose regular expression is a literal or an alternation of
  literals (``list=python|announce``, the host) takes its first value; one
  that accepts its own name in capitals takes that (``(command)`` ->
  ``COMMAND``); any other stays a placeholder to fill in (``TOKEN``, with
  its regex shown).  An example counts as ready to send only when the
  router sends it to that very route;
- **what to try**: the text of the application's ``demo.txt`` (next to
  ``config/``), if it has one, with ``$server``, ``$port``, ``$host``,
  ``$hosts``, ``$mailbox``, ``$workdir`` and ``$lamsonfilter`` replaced
  (``string.Template``: ``$$`` is a dollar sign; lines that start with
  ``#`` are notes for the author and left out).  Without one: a ``swaks``
  command for each route whose example is ready, the same with
  ``lamsonfilter send``, and an address at the application's host that no
  route takes (refused with 550 at RCPT).

Every path is absolute -- the ``lamsonfilter`` executable too -- so the
commands work from any directory and any terminal.
"""

from __future__ import annotations

import importlib
import re
import shlex
import string
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..app import App
from ..routing import Route

__all__ = ["DEMO_TEXT", "RouteExample", "banner", "command_path", "route_examples", "try_it"]

#: The file in an application directory whose text the banner shows under "Try it".
DEMO_TEXT = "demo.txt"

#: A sender in a domain the demo's Postfix delivers locally, so replies land in the mailbox.
SENDER = "alice@example.com"

#: At most this many generated swaks commands (one per route).
MAX_COMMANDS = 6

sre_parse: Any = importlib.import_module("re._parser")

_CAPTURE = re.compile(r"\(([A-Za-z_][A-Za-z0-9_]*)\)")


@dataclass(frozen=True)
class RouteExample:
    """One route of the application and an address that shows it."""

    route: Route
    address: str
    ready: bool  #: the router sends `address` to `route` (no placeholder left to fill in)
    placeholders: tuple[tuple[str, str], ...]  #: (NAME, regex) of the captures left to fill in


def command_path() -> str:
    """The absolute path of the ``lamsonfilter`` executable that belongs to this Python.

    The console script sits next to the interpreter (``.venv/bin``); without
    one, ``python -P -m lamsonfilter`` (``-P``: the current directory cannot
    shadow the installed package).
    """
    script = Path(sys.executable).absolute().parent / "lamsonfilter"
    if script.is_file():
        return shlex.quote(str(script))
    return f"{shlex.quote(str(Path(sys.executable).absolute()))} -P -m lamsonfilter"


def _literal(items: Any) -> str | None:
    """The first string a parsed regex matches if it is made of literals and alternations only."""
    out = []
    for op, av in items:
        if op is sre_parse.LITERAL:
            out.append(chr(av))
        elif op is sre_parse.SUBPATTERN:
            sub = _literal(av[-1])
            if sub is None:
                return None
            out.append(sub)
        elif op is sre_parse.BRANCH:
            sub = _literal(av[1][0])
            if sub is None:
                return None
            out.append(sub)
        elif op is sre_parse.IN and av and av[0][0] is sre_parse.LITERAL:
            out.append(chr(av[0][1]))
        else:
            return None
    return "".join(out)


def _capture_example(name: str, regex: str) -> tuple[str, bool]:
    """(value, ready) for one capture: a literal, its name in capitals, or a placeholder."""
    try:
        value = _literal(sre_parse.parse(regex))
    except re.error:
        value = None
    if value:
        return value, True
    ready = re.fullmatch(regex, name.upper(), re.IGNORECASE) is not None
    return name.upper(), ready


def route_examples(app: App) -> list[RouteExample]:
    """An example address for each route, in the order the router tries them."""
    examples = []
    for route in app.router:
        regexes = dict(route.captures)
        parts: list[str] = []
        placeholders: list[tuple[str, str]] = []
        ready = True
        pos = 0
        for m in _CAPTURE.finditer(route.pattern):
            regex = regexes.get(m.group(1), r"[^@\s]+")
            value, ok = _capture_example(m.group(1), regex)
            if not ok:
                ready = False
                placeholders.append((value, regex))
            parts += [route.pattern[pos:m.start()], value]
            pos = m.end()
        address = "".join(parts) + route.pattern[pos:]
        found = app.router.match(address.lower())
        ready = ready and found is not None and found.route is route
        examples.append(RouteExample(route, address, ready, tuple(placeholders)))
    return examples


def _unrouted(app: App) -> str | None:
    """An address at the application's first host that no route takes (550 at RCPT), if there is one."""
    for local in ("no-such-address", "nobody-here", "x-unrouted-x"):
        address = f"{local}@{min(app.hosts)}"
        if app.router.match(address) is None:
            return address
    return None


def try_it(app: App, app_dir: Path, values: dict[str, str]) -> str:
    """The "Try it" lines: the application's demo.txt, or commands made from its routes."""
    custom = app_dir / DEMO_TEXT
    if custom.is_file():
        text = string.Template(custom.read_text(encoding="utf-8")).safe_substitute(values)
        lines = [line for line in text.rstrip().splitlines() if not line.startswith("#")]
        return "\n".join(f"  {line}" if line.strip() else "" for line in lines).strip("\n")
    server = values["server"]
    ready = [e for e in route_examples(app) if e.ready]
    lines = [f"  swaks --server {server} --from {SENDER} --to {e.address}   # route {e.route.name}"
             for e in ready[:MAX_COMMANDS]]
    if ready:
        lines.append(f"  {values['lamsonfilter']} send --server {server} --from {SENDER} "
                     f"--to {ready[0].address}   # the same without swaks")
    lines.append(f"  ls {values['mailbox']}   # what reached the mailbox: replies, mail passed on")
    unrouted = _unrouted(app)
    if unrouted is not None:
        lines.append(f"  swaks --server {server} --from {SENDER} --to {unrouted}   # no route: 550 at RCPT")
    return "\n".join(lines)


def banner(app: App, app_dir: Path, *, mode: str, port: int, workdir: Path, mail_domains: tuple[str, ...],
           logs: list[Path]) -> str:
    """The whole banner the demo prints once everything listens."""
    hosts = sorted(app.hosts)
    mailbox = workdir / "mail" / "inbox" / "new"
    values = {
        "server": f"127.0.0.1:{port}", "port": str(port), "host": hosts[0], "hosts": ", ".join(hosts),
        "mailbox": shlex.quote(f"{mailbox}/"), "workdir": shlex.quote(str(workdir)),
        "lamsonfilter": command_path(),
    }
    where = "milter (pre-queue)" if mode == "milter" else "content filter (after-queue)"
    examples = route_examples(app)
    width = max((len(e.address) for e in examples), default=0)
    route_lines = []
    for e in examples:
        hint = "".join(f"   {name}: {rx}" for name, rx in e.placeholders)
        route_lines.append(f"  {e.address:<{width}}  {e.route.name}{hint}")
    log_lines = "\n".join(f"  {'logs' if i == 0 else '':<20} {p}" for i, p in enumerate(logs))
    return f"""\
lamsonfilter demo: {app_dir.name} as a {where} behind a private Postfix

  Postfix listens on   127.0.0.1:{port}
  the application owns {', '.join(hosts)}
  work directory       {workdir}
  mailbox              {mailbox}/   (all mail to any user at {', '.join(mail_domains)})
{log_lines}

Its routes, tried in this order, with an example address for each:

{chr(10).join(route_lines) or '  (none)'}

Try it, in another terminal (the commands work from any directory):

{try_it(app, app_dir, values)}
"""
