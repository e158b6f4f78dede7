"""The queue half of ``lamsonfilter check --postfix-config``: findings PF301-PF307.

In queue mode Postfix delivers the application's domains into lamsonfilter's
queue with virtual(8) (conf/postfix/main.cf.queue), and ``lamsonfilter deq``
runs the application over it.  A domain of ``HOSTS`` listed in
``virtual_mailbox_domains`` puts the set-up in queue mode (`queue_hosts`);
then each of these would lose, bounce or hold its mail::

    PF301  the domain is in another address class too (Postfix warns, one class wins)
    PF302  virtual_mailbox_maps answers no Maildir (trailing "/") for the domain
    PF303  virtual_uid_maps / virtual_gid_maps is not a number (the shipped
           LAMSONFILTER_UID left in) or below virtual_minimum_uid: every message deferred
    PF304  the queue's owner is not the user the daemons run as (--user): deq cannot claim
    PF305  the domain's mail does not reach virtual(8) (transport_maps, virtual_transport)
    PF306  the outbox listener (RELAY) passes mail for the domain on: deq's mail to its own
           addresses would go round through the queue (master.cf.queue holds it)
    PF307  no check_policy_service on the smtpd clients talk to: an address of the domain
           that no route takes is accepted, then quarantined by deq, not refused at RCPT
           (main.cf.queue asks ``deq --policy``)
    PF308  the queue directory (or its tmp/ or new/) exists but belongs to another uid than
           virtual_uid_maps: virtual(8) cannot write there and defers every message
           (typically deq started once as root, which created the directory)
"""

from __future__ import annotations

import os
import pwd
import re
from collections.abc import Iterable

from .findings import Finding
from .postconf import ADDRESS_CLASSES, PostfixConfig, accepts_domain, tokens

__all__ = ["queue_findings", "queue_hosts"]


def queue_hosts(pc: PostfixConfig, hosts: Iterable[str]) -> list[str]:
    """The application's domains Postfix delivers with virtual(8): those in virtual_mailbox_domains."""
    return [h for h in sorted({h.lower() for h in hosts}) if accepts_domain(pc, "virtual_mailbox_domains", h)]


def _answer(pc: PostfixConfig, param: str, key: str) -> str | None:
    """The first answer of the tables in `param` for `key` (a ``static:`` table answers itself)."""
    for table in tokens(pc.expanded.get(param, "")):
        if table.startswith("static:") and not table.startswith("static:{"):
            return table[len("static:"):]
        value = pc.query(table, key)
        if value is not None:
            return value
    return None


def queue_findings(pc: PostfixConfig, hosts: list[str], user: str | None = None,
                   listener: list[str] | None = None, smtpds: list[list[str]] | None = None) -> list[Finding]:
    """The findings for `hosts` (from `queue_hosts`); `user` is who runs ``deq``, when known;
    `listener` the master.cf service at settings RELAY, when there is one; `smtpds` the smtpd
    services clients talk to (`smtpd_services`)."""
    out: list[Finding] = []
    for host in hosts:
        others = [p for p in ADDRESS_CLASSES if p != "virtual_mailbox_domains" and accepts_domain(pc, p, host)]
        if others:
            out.append(Finding(
                "PF301", "error",
                f"{host} is in virtual_mailbox_domains and in {', '.join(others)}: Postfix warns 'do not list "
                "domain in BOTH' on every message and delivers by one class only",
                f"remove {host} from {', '.join(others)} (main.cf.queue replaces main.cf.domains for it)"))
        box = _answer(pc, "virtual_mailbox_maps", f"@{host}")
        if box is not None and not box.endswith("/"):
            out.append(Finding(
                "PF302", "error",
                f"virtual_mailbox_maps answers {box!r} for @{host}: no trailing '/', so virtual(8) appends to "
                "one mailbox file instead of writing a Maildir, which lamsonfilter deq cannot read",
                f"end the path with '/': {{@{host} = queue/}} (conf/postfix/main.cf.queue)"))
        transport = _answer(pc, "transport_maps", host)
        if transport is not None:
            out.append(Finding(
                "PF305", "error",
                f"transport_maps sends {host} to {transport!r}, not to virtual(8): its mail never reaches "
                "the queue", f"remove {host} from transport_maps (the main.cf.domains line is for the other modes)"))
    if not hosts:
        return out
    out += _owner_findings(pc, hosts[0], user)
    out += _hold_findings(pc, hosts, listener)
    if smtpds and not any("check_policy_service" in pc.effective(svc, "smtpd_recipient_restrictions")
                          + pc.effective(svc, "smtpd_relay_restrictions") for svc in smtpds):
        out.append(Finding(
            "PF307", "warning",
            f"no check_policy_service asks lamsonfilter deq at RCPT time: mail to an address of "
            f"{', '.join(hosts)} that no route takes is accepted by Postfix, delivered into the queue and "
            "then quarantined by deq, instead of refused (550 5.1.1) while the client is connected",
            "add check_policy_service { inet:127.0.0.1:10027, default_action=DUNNO } first to "
            "smtpd_recipient_restrictions and run lamsonfilter deq --policy 127.0.0.1:10027 "
            "(conf/postfix/main.cf.queue, conf/systemd/lamsonfilter-deq.service)"))
    name = (pc.expanded.get("virtual_transport") or "virtual").split(":", 1)[0]
    service = pc.service(name, "unix")
    if service is None or service[7] != "virtual":
        what = "is not defined in master.cf" if service is None else f"runs {service[7]}, not virtual"
        out.append(Finding(
            "PF305", "error", f"virtual_transport's service {name!r} {what}: mail for {', '.join(hosts)} "
            "does not reach virtual(8) and the queue",
            "virtual_transport = virtual, with Debian's master.cf line: "
            "virtual unix - n n - - virtual"))
    return out


def _owner_findings(pc: PostfixConfig, host: str, user: str | None) -> list[Finding]:
    out: list[Finding] = []
    minimum_text = pc.expanded.get("virtual_minimum_uid", "100") or "100"
    minimum = int(minimum_text) if minimum_text.isdigit() else 100
    ids: dict[str, int] = {}
    for param, what in (("virtual_uid_maps", "uid"), ("virtual_gid_maps", "gid")):
        value = _answer(pc, param, f"@{host}")
        if value is None:
            continue
        if not value.isdigit() or (what == "uid" and int(value) < minimum):
            why = "not a number" if not value.isdigit() else f"below virtual_minimum_uid ({minimum})"
            out.append(Finding(
                "PF303", "error",
                f"{param} gives {value!r} for {host}, {why}: virtual(8) defers every message (\"bad {what}\")",
                f"postconf -e \"{param} = static:$(id -{what[0]} lamsonfilter)\" (the user deq runs as)"))
            continue
        ids[what] = int(value)
    if "uid" in ids:
        out += _directory_findings(pc, host, ids["uid"], ids.get("gid"))
    if user and "uid" in ids:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            return out
        if entry.pw_uid != ids["uid"]:
            out.append(Finding(
                "PF304", "error",
                f"the queue files belong to uid {ids['uid']} (virtual_uid_maps), but the daemons run as {user} "
                f"(uid {entry.pw_uid}): lamsonfilter deq cannot claim them",
                f"postconf -e \"virtual_uid_maps = static:{entry.pw_uid}\" \"virtual_gid_maps = static:{entry.pw_gid}\""))
    return out


def _directory_findings(pc: PostfixConfig, host: str, uid: int, gid: int | None) -> list[Finding]:
    """PF308: the queue directory is there but virtual(8), writing as `uid`, cannot create files in it."""
    base, box = pc.expanded.get("virtual_mailbox_base", ""), _answer(pc, "virtual_mailbox_maps", f"@{host}")
    if not base or box is None or not box.endswith("/"):
        return []  # PF302 (or no queue configured): nothing to look at
    queue = os.path.normpath(os.path.join(base, box))
    wrong = []
    for path in (queue, os.path.join(queue, "tmp"), os.path.join(queue, "new")):
        try:
            st = os.stat(path)
        except OSError:
            continue  # not made yet: virtual(8) creates it at the first delivery, as its owner
        if st.st_uid != uid:
            try:
                owner = pwd.getpwuid(st.st_uid).pw_name
            except KeyError:
                owner = f"uid {st.st_uid}"
            wrong.append(f"{path} (owner {owner})")
    if not wrong:
        return []
    return [Finding(
        "PF308", "error",
        f"the queue directory belongs to someone else than uid {uid}, the one virtual(8) writes as "
        f"(virtual_uid_maps): {', '.join(wrong)}; every message for {host} is deferred ('maildir delivery "
        "failed: Permission denied') -- was lamsonfilter deq started as root before the first delivery?",
        f"chown -R {uid}:{gid if gid is not None else uid} {queue}, and run deq as that user "
        "(the shipped unit does)")]


def _hold_findings(pc: PostfixConfig, hosts: list[str], listener: list[str] | None) -> list[Finding]:
    """PF306: the outbox listener does not put mail for `hosts` on hold (check_recipient_access ... HOLD)."""
    if listener is None:
        return []  # PF110 says so
    restrictions = re.sub(r"\$\{?(\w+)\}?", lambda m: pc.main.get(m.group(1), m.group(0)),
                          pc.effective(listener, "smtpd_recipient_restrictions"))
    items = tokens(restrictions)
    held = set()
    for i, item in enumerate(items[:-1]):
        if item == "check_recipient_access":
            held |= {h for h in hosts if (pc.query(items[i + 1], h) or "").upper().startswith("HOLD")}
    missing = [h for h in hosts if h not in held]
    if not missing:
        return []
    return [Finding(
        "PF306", "warning",
        f"the outbox listener {listener[0]} passes mail for {', '.join(missing)} on to virtual(8): what "
        "lamsonfilter deq sends to the application's own addresses goes into the queue again, round and "
        "round until Postfix's hop limit bounces it",
        "put check_recipient_access,$lamsonfilter_own_domains first in its -o smtpd_recipient_restrictions "
        "(conf/postfix/master.cf.queue), with lamsonfilter_own_domains of main.cf.queue")]
