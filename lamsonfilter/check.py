"""``lamsonfilter check``: find problems in an application and in the Postfix set-up before mail does.

Each finding has a stable ID (``APP...`` for the application, ``PF...`` for
Postfix), a severity, what is wrong and how to fix it:

    for f in check_app(app) + check_postfix("/etc/postfix", app.settings):
        print(f)

The Postfix part reads the configuration with ``postconf -n``, ``-M`` and
``-P`` (so it sees what Postfix sees, including ``-o`` overrides), decides
which mode is wired (``content_filter`` → content filter, ``smtpd_milters``
→ milter) and checks the lines each mode needs (integration.md §2, §3).
"""

from __future__ import annotations

import inspect
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .app import App
from .endpoint import DEFAULT_MILTER_SOCKET
from .fsm import ERROR, START, is_stateless
from .graph import _moves, transitions, unknown_returns

__all__ = ["Finding", "check_app", "check_postfix", "PostfixConfig", "MilterEntry", "parse_milters"]


@dataclass(frozen=True)
class Finding:
    id: str
    severity: str  # "error" | "warning"
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.id} {self.severity}: {self.message}\n    fix: {self.fix}"


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


# ---------------------------------------------------------------- Postfix
@dataclass
class PostfixConfig:
    """What ``postconf`` says about one configuration directory."""

    main: dict[str, str]
    explicit: set[str]  # names set in main.cf (postconf -n), not defaults
    services: list[list[str]]  # postconf -M fields: name type private unpriv chroot wakeup maxproc command args
    overrides: dict[tuple[str, str], dict[str, str]]  # (name, type) -> -o name=value

    @classmethod
    def read(cls, config_dir: str | Path) -> "PostfixConfig":
        exe = shutil.which("postconf") or ("/usr/sbin/postconf" if Path("/usr/sbin/postconf").exists() else None)
        if exe is None:
            raise FileNotFoundError("postconf not found (is Postfix installed?)")

        def run(*args: str) -> str:
            proc = subprocess.run(  # noqa: S603 -- argv list, no shell, no message data
                [exe, "-c", str(config_dir), *args], capture_output=True, text=True, timeout=60)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr.strip() or f"postconf {' '.join(args)} failed")
            return proc.stdout

        def pairs(text: str) -> list[tuple[str, str]]:  # "name = value", "name =" when empty
            out = []
            for line in text.splitlines():
                m = re.match(r"^(\S+) =(?: (.*))?$", line)
                if m:
                    out.append((m.group(1), (m.group(2) or "").strip()))
            return out

        main = dict(pairs(run("-n")))
        explicit = set(main)
        # a few defaults the checks depend on
        for name in ("milter_default_action", "soft_bounce", "receive_override_options", "non_smtpd_milters"):
            if name not in main:
                main[name] = run("-h", name).strip()
        services = [line.split() for line in run("-M").splitlines() if line.strip()]
        overrides: dict[tuple[str, str], dict[str, str]] = {}
        for key, value in pairs(run("-P")):
            parts = key.split("/")
            if len(parts) == 3:
                overrides.setdefault((parts[0], parts[1]), {})[parts[2]] = value
        return cls(main, explicit, services, overrides)

    def service(self, name: str, type_: str) -> list[str] | None:
        for s in self.services:
            if len(s) >= 8 and s[0] == name and s[1] == type_:
                return s
        return None

    def override(self, name: str, type_: str, param: str) -> str | None:
        return self.overrides.get((name, type_), {}).get(param)


def _listener_names(host: str, port: int) -> list[str]:
    return [f"{host}:{port}", f"[{host}]:{port}", str(port)]


def _milter_endpoints(spec: str) -> set[str]:
    """The ways Postfix may name the milter socket `spec` (lamsonfilter's own syntax)."""
    if spec.startswith("unix:"):
        path = spec[len("unix:"):]
        names = {f"unix:{path}", f"local:{path}"}
        for root in ("/var/spool/postfix/",):  # Debian's chrooted smtpd sees paths below its queue
            if path.startswith(root):
                rel = "/" + path[len(root):]
                names |= {f"unix:{rel}", f"local:{rel}"}
        return names
    if spec.startswith(("inet:", "inet6:")):
        port, _, host = spec.split(":", 1)[1].partition("@")
        host = host or "127.0.0.1"
        return {f"inet:{host}:{port}", f"inet:[{host}]:{port}"}
    return {spec}


@dataclass(frozen=True)
class MilterEntry:
    """One milter of ``smtpd_milters``: its socket and its ``{ ..., name=value }`` options."""

    socket: str
    options: dict[str, str]


def parse_milters(value: str) -> list[MilterEntry]:
    """Split ``smtpd_milters`` into its milters (Postfix syntax: names separated by
    white space or commas, a milter with options written ``{ socket, name=value, ... }``)."""
    entries: list[MilterEntry] = []
    for m in re.finditer(r"\{([^}]*)\}?|([^\s,{}]+)", value):
        if m.group(1) is not None:
            parts = [p.strip() for p in m.group(1).split(",") if p.strip()]
            if not parts:
                continue
            options = {}
            for opt in parts[1:]:
                name, _, val = opt.partition("=")
                options[name.strip()] = val.strip()
            entries.append(MilterEntry(parts[0], options))
        else:
            entries.append(MilterEntry(m.group(2), {}))
    return entries


def _our_milter(entries: list[MilterEntry], milter_socket: str | None) -> MilterEntry | None:
    """lamsonfilter's entry: the one naming its socket (--milter-socket, else the default);
    else the only milter; else one whose socket names lamsonfilter; else None (unknown)."""
    names = _milter_endpoints(milter_socket or DEFAULT_MILTER_SOCKET)
    for e in entries:
        if e.socket in names:
            return e
    if milter_socket is None:
        if len(entries) == 1:
            return entries[0]
        named = [e for e in entries if "lamsonfilter" in e.socket]
        if len(named) == 1:
            return named[0]
    return None


def check_postfix(config_dir: str | Path, settings: Mapping[str, Any],
                  milter_socket: str | None = None) -> list[Finding]:
    from .settings import parse_hostport

    try:
        pc = PostfixConfig.read(config_dir)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return [Finding("PF001", "error", f"cannot read the Postfix configuration in {config_dir}: {exc}",
                        "point --postfix-config at the directory holding main.cf and master.cf")]
    findings: list[Finding] = []
    relay_host, relay_port = parse_hostport(settings.get("RELAY", "127.0.0.1:10026"))
    content_filter = pc.main.get("content_filter", "")
    milters = pc.main.get("smtpd_milters", "")
    if not content_filter and not milters:
        findings.append(Finding("PF002", "error", "Postfix sends no mail to lamsonfilter: neither "
                                "content_filter nor smtpd_milters is set in main.cf",
                                "add the lines of conf/postfix/main.cf.milter or main.cf.content_filter"))
    if pc.main.get("soft_bounce") == "yes":
        findings.append(Finding("PF003", "warning", "soft_bounce = yes turns every 5xx (also the milter's "
                                "rejections) into 4xx", "set soft_bounce = no once the set-up works"))

    listener = next((s for s in pc.services
                     if len(s) >= 8 and s[1] == "inet" and s[0] in _listener_names(relay_host, relay_port)), None)
    where = f"{relay_host}:{relay_port}"
    if listener is None:
        findings.append(Finding(
            "PF110", "error",
            f"no smtpd listens on the relay/reinjection address {where} (settings RELAY) in master.cf: "
            "replies and reinjected mail have nowhere to go",
            f"add the {where} smtpd service of conf/postfix/master.cf.content_filter"))
    else:
        name, type_ = listener[0], listener[1]
        rov = pc.override(name, type_, "receive_override_options") or ""
        if content_filter and pc.override(name, type_, "content_filter") != "":
            findings.append(Finding(
                "PF111", "error",
                f"the reinjection listener {name} has no '-o content_filter=': reinjected mail is sent "
                "to the filter again, in an endless loop",
                f"add '-o content_filter=' to the {name} service in master.cf"))
        if milters and "no_milters" not in rov and pc.override(name, type_, "smtpd_milters") != "":
            findings.append(Finding(
                "PF112", "error",
                f"the listener {name} runs the milters: mail lamsonfilter generates or reinjects is "
                "processed by its handlers again",
                f"add no_milters to '-o receive_override_options=' of {name} (or '-o smtpd_milters=')"))
        if name.isdigit() or name.startswith(("0.0.0.0:", "[::]:")):
            findings.append(Finding("PF113", "error", f"the listener {name} listens on every address and "
                                    "relays for anyone in its mynetworks",
                                    f"bind it to loopback: 127.0.0.1:{relay_port}"))

    if content_filter:
        transport = content_filter.split(":", 1)[0]
        svc = pc.service(transport, "unix")
        if svc is None:
            findings.append(Finding("PF101", "error",
                                    f"content_filter names transport {transport!r}, which master.cf does not define",
                                    f"add the {transport} service of conf/postfix/master.cf.content_filter"))
        else:
            if pc.override(transport, "unix", "smtp_send_xforward_command") != "yes":
                findings.append(Finding("PF102", "warning",
                                        f"transport {transport} does not send XFORWARD: the filter and the "
                                        "reinjection logs do not see the real client or the queue id",
                                        f"add '-o smtp_send_xforward_command=yes' to {transport}"))
            if pc.override(transport, "unix", "disable_mime_output_conversion") != "yes":
                findings.append(Finding("PF103", "warning",
                                        f"transport {transport} may convert 8-bit mail to 7-bit on the way "
                                        "to the filter, which breaks DKIM signatures",
                                        f"add '-o disable_mime_output_conversion=yes' to {transport}"))
        if "no_address_mappings" not in pc.main.get("receive_override_options", ""):
            findings.append(Finding("PF120", "warning",
                                    "receive_override_options lacks no_address_mappings: aliases and "
                                    "virtual mappings run before the filter and again after reinjection",
                                    "set receive_override_options = no_address_mappings in main.cf"))
    if milters:
        entries = parse_milters(milters)
        ours = _our_milter(entries, milter_socket)
        own_action = ours.options.get("default_action") if ours is not None else None
        action = pc.main.get("milter_default_action", "")
        if own_action == "accept" and ours is not None:
            findings.append(Finding("PF201", "error",
                                    f"the lamsonfilter milter ({ours.socket}) has default_action=accept in "
                                    "smtpd_milters: when lamsonfilter is down, mail passes unfiltered",
                                    f"change default_action=accept to default_action=tempfail in its "
                                    f"{{ {ours.socket}, ... }} entry of smtpd_milters"))
        elif own_action is None and action == "accept":
            findings.append(Finding("PF201", "error",
                                    "milter_default_action is accept: when lamsonfilter is down, mail "
                                    "passes unfiltered", "set milter_default_action = tempfail in main.cf"
                                    + (f" (or give its entry {{ {ours.socket}, default_action=tempfail }})"
                                       if ours is not None and len(entries) > 1 else "")))
        elif own_action is None and "milter_default_action" not in pc.explicit:
            findings.append(Finding("PF202", "warning",
                                    "milter_default_action is not set explicitly (its default changed in "
                                    "Postfix 3.11)", "set milter_default_action = tempfail in main.cf"))
        if milter_socket:
            if not {e.socket for e in entries} & _milter_endpoints(milter_socket):
                findings.append(Finding(
                    "PF203", "error",
                    f"smtpd_milters ({milters}) does not name the socket lamsonfilter listens on ({milter_socket})",
                    "make smtpd_milters name the same socket (a unix path relative to /var/spool/postfix "
                    "for Debian's chrooted smtpd)"))
        if "lamsonfilter" in pc.main.get("non_smtpd_milters", ""):
            findings.append(Finding("PF210", "warning",
                                    "non_smtpd_milters includes lamsonfilter: Postfix simulates the SMTP "
                                    "session there and a rejected recipient becomes a configuration error",
                                    "leave non_smtpd_milters empty"))
    return findings

