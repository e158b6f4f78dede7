"""The milter half of ``lamsonfilter check --postfix-config``: findings PF201-PF211, and the
``smtpd_milters`` value the milter's start-up line recommends.

A chrooted smtpd (Debian's master.cf: chroot "y") resolves a unix socket path
inside its chroot, the queue directory, so the socket
``/var/spool/postfix/lamsonfilter/milter.sock`` is ``unix:/lamsonfilter/milter.sock``
in ``smtpd_milters``; an smtpd without chroot needs the full path (PF204)::

    smtpd_milters_value(parse_milter_socket("unix:/var/spool/postfix/lamsonfilter/milter.sock"),
                        "/etc/postfix")        # -> "unix:/lamsonfilter/milter.sock"
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..daemon.endpoint import DEFAULT_MILTER_SOCKET, MilterSocket
from .findings import Finding
from .postconf import DEFAULT_QUEUE_DIRECTORY, PostfixConfig, smtpd_services

__all__ = ["MilterEntry", "milter_findings", "parse_milters", "smtpd_milters_value"]


def _milter_endpoints(spec: str, queue_directory: str = DEFAULT_QUEUE_DIRECTORY) -> set[str]:
    """The ways Postfix may name the milter socket `spec` (lamsonfilter's own syntax)."""
    if spec.startswith("unix:"):
        path = spec[len("unix:"):]
        names = {f"unix:{path}", f"local:{path}"}
        root = queue_directory.rstrip("/") + "/"
        if path.startswith(root):  # a chrooted smtpd sees paths below its queue directory
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


def _our_milter(entries: list[MilterEntry], milter_socket: str | None,
                queue_directory: str = DEFAULT_QUEUE_DIRECTORY) -> MilterEntry | None:
    """lamsonfilter's entry: the one naming its socket (--milter-socket, else the default);
    else the only milter; else one whose socket names lamsonfilter; else None (unknown)."""
    names = _milter_endpoints(milter_socket or DEFAULT_MILTER_SOCKET, queue_directory)
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


def smtpd_milters_value(endpoint: MilterSocket, config_dir: str | Path | None = None) -> str:
    """What to write in ``smtpd_milters`` for the milter listening on `endpoint`.

    A chrooted smtpd (Debian's master.cf: chroot "y") resolves a unix socket path
    inside its chroot, the queue directory: the socket
    ``/var/spool/postfix/lamsonfilter/milter.sock`` is ``unix:/lamsonfilter/milter.sock``
    to it.  With `config_dir` the chroot column and queue_directory are read from
    that configuration; without it Debian's layout (chrooted, /var/spool/postfix)
    is assumed and the value for an unchrooted smtpd is given as well.
    """
    if endpoint.kind != "unix":
        return endpoint.postfix
    queue, chrooted = DEFAULT_QUEUE_DIRECTORY, None
    if config_dir is not None:
        try:
            pc = PostfixConfig.read(config_dir)
        except (OSError, RuntimeError, subprocess.SubprocessError):
            pass
        else:
            queue = pc.queue_directory
            chrooted = any(pc.chrooted(s) for s in smtpd_services(pc, None))
    inside = endpoint.path.startswith(queue + "/")
    if chrooted is False:
        return endpoint.postfix
    if not inside:
        if chrooted:
            return f"{endpoint.postfix}  (but smtpd runs chrooted in {queue} and cannot reach a socket outside it)"
        return endpoint.postfix
    relative = f"unix:{endpoint.path[len(queue):]}"
    if chrooted:
        return relative
    return f"{relative}  (smtpd chrooted in {queue}, as Debian ships it; {endpoint.postfix} when it is not)"


def milter_findings(pc: PostfixConfig, milters: str, milter_socket: str | None,
                     smtpds: list[list[str]]) -> list[Finding]:
    out = []
    queue = pc.queue_directory
    entries = parse_milters(milters)
    ours = _our_milter(entries, milter_socket, queue)
    own_action = ours.options.get("default_action") if ours is not None else None
    action = pc.main.get("milter_default_action", "")
    if own_action == "accept" and ours is not None:
        out.append(Finding("PF201", "error",
                           f"the lamsonfilter milter ({ours.socket}) has default_action=accept in "
                           "smtpd_milters: when lamsonfilter is down, mail passes unfiltered",
                           f"change default_action=accept to default_action=tempfail in its "
                           f"{{ {ours.socket}, ... }} entry of smtpd_milters"))
    elif own_action is None and action == "accept":
        out.append(Finding("PF201", "error",
                           "milter_default_action is accept: when lamsonfilter is down, mail "
                           "passes unfiltered", "set milter_default_action = tempfail in main.cf"
                           + (f" (or give its entry {{ {ours.socket}, default_action=tempfail }})"
                              if ours is not None and len(entries) > 1 else "")))
    elif own_action is None and "milter_default_action" not in pc.explicit:
        out.append(Finding("PF202", "warning",
                           "milter_default_action is not set explicitly (its default changed in "
                           "Postfix 3.11)", "set milter_default_action = tempfail in main.cf"))
    if milter_socket and not {e.socket for e in entries} & _milter_endpoints(milter_socket, queue):
        out.append(Finding(
            "PF203", "error",
            f"smtpd_milters ({milters}) does not name the socket lamsonfilter listens on ({milter_socket})",
            "make smtpd_milters name the same socket (a unix path relative to the queue directory "
            f"{queue} for a chrooted smtpd)"))
    out += _chroot_findings(pc, ours, milter_socket, smtpds)
    non_smtpd = pc.main.get("non_smtpd_milters", "")
    if ours is not None and ours.socket not in {e.socket for e in parse_milters(non_smtpd)}:
        out.append(Finding(
            "PF211", "warning",
            f"non_smtpd_milters does not name lamsonfilter's milter ({ours.socket}): mail submitted with "
            "sendmail(1) or postdrop (cron, scripts, local users) to the application's addresses never "
            "reaches the application",
            f"set non_smtpd_milters = {{ {ours.socket}, default_action=tempfail }} (conf/postfix/main.cf.milter)"))
    return out


def _chroot_findings(pc: PostfixConfig, ours: MilterEntry | None, milter_socket: str | None,
                     smtpds: list[list[str]]) -> list[Finding]:
    """PF204: a unix socket path written for the wrong side of smtpd's chroot."""
    if ours is None or not ours.socket.startswith(("unix:", "local:")):
        return []
    queue = pc.queue_directory
    path = ours.socket.split(":", 1)[1]
    chrooted = [s[0] for s in smtpds if pc.chrooted(s)]
    real = milter_socket.split(":", 1)[1] if milter_socket and milter_socket.startswith(("unix:", "local:")) else None
    if chrooted and path.startswith(queue + "/"):
        return [Finding(
            "PF204", "error",
            f"smtpd ({', '.join(chrooted)}) runs chrooted in {queue}, so smtpd_milters' {ours.socket} is looked "
            f"up as {queue}{path}: every client gets 451 4.7.1",
            f"write the path relative to the queue directory: unix:{path[len(queue):]}")]
    if chrooted and real is not None and not real.startswith(queue + "/"):
        return [Finding(
            "PF204", "error",
            f"smtpd ({', '.join(chrooted)}) runs chrooted in {queue} and cannot reach the milter socket {real}",
            f"let lamsonfilter listen below {queue} (--socket unix:{queue}/lamsonfilter/milter.sock) and write "
            "unix:/lamsonfilter/milter.sock in smtpd_milters, or use inet:")]
    if not chrooted and real is not None and real != path and real == queue + path:
        return [Finding(
            "PF204", "error",
            f"smtpd is not chrooted, so smtpd_milters' {ours.socket} (a path relative to the chroot) does not "
            f"reach the socket {real}", f"write the full path: unix:{real}")]
    return []
