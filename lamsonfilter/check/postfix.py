"""``lamsonfilter check --postfix-config DIR``: find what is wrong in the Postfix set-up before mail does.

The configuration is read with ``postconf -n``, ``-M`` and ``-P`` (so the
checks see what Postfix sees, including ``-o`` overrides of master.cf), the
mode is found (a ``content_filter`` in main.cf *or* on an smtpd service of
master.cf → content filter; ``smtpd_milters`` → milter; a domain of HOSTS in
``virtual_mailbox_domains`` → queue), and the lines each
mode needs are checked (integration.md §2, §3)::

    for f in check_postfix("/etc/postfix", app.settings, milter_socket=None, max_size=None):
        print(f)

Finding IDs: PF001-PF004 general (PF004: the application's domains are in
no Postfix address class), PF101-PF123 the content filter and its
reinjection listener; the milter's PF201-PF211 are in `lamsonfilter.check.milter`,
queue mode's PF301-PF307 (virtual(8) delivering into the queue) in
`lamsonfilter.check.queue`.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .findings import Finding
from .milter import milter_findings
from .postconf import (
    ADDRESS_CLASSES,
    DEFAULT_QUEUE_DIRECTORY,
    PostfixConfig,
    accepts_domain,
    smtpd_services,
)
from .queue import queue_findings, queue_hosts

__all__ = ["ADDRESS_CLASSES", "DEFAULT_QUEUE_DIRECTORY", "PostfixConfig", "check_postfix"]


def _listener_names(host: str, port: int) -> list[str]:
    return [f"{host}:{port}", f"[{host}]:{port}", str(port)]


def check_postfix(config_dir: str | Path, settings: Mapping[str, Any],
                  milter_socket: str | None = None, max_size: int | None = None,
                  user: str | None = None) -> list[Finding]:
    """Every Postfix finding for `settings` (HOSTS, RELAY) against the configuration in `config_dir`.

    `milter_socket` is where ``lamsonfilter milter`` listens (libmilter syntax);
    `max_size` the SIZE ``lamsonfilter smtpproxy`` announces, when known;
    `user` the user the daemons run as (queue mode: the queue files' owner).
    """
    try:
        pc = PostfixConfig.read(config_dir)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return [Finding("PF001", "error", f"cannot read the Postfix configuration in {config_dir}: {exc}",
                        "point --postfix-config at the directory holding main.cf and master.cf")]
    from ..settings import parse_hostport

    findings: list[Finding] = []
    relay_host, relay_port = parse_hostport(settings.get("RELAY", "127.0.0.1:10026"))
    listener = next((s for s in pc.services
                     if len(s) >= 8 and s[1] == "inet" and s[0] in _listener_names(relay_host, relay_port)), None)
    smtpds = smtpd_services(pc, listener)
    # content_filter in main.cf, or only on some smtpd services (FILTER_README's "-o content_filter=" on smtp inet)
    filtered = [s for s in smtpds if pc.effective(s, "content_filter")]
    content_filter = pc.main.get("content_filter", "") or (pc.effective(filtered[0], "content_filter") if filtered else "")
    milters = pc.main.get("smtpd_milters", "") or next(
        (v for s in smtpds if (v := pc.override(s[0], s[1], "smtpd_milters") or "")), "")
    queued = queue_hosts(pc, settings.get("HOSTS", []))
    if not content_filter and not milters and not queued:
        findings.append(Finding("PF002", "error", "Postfix sends no mail to lamsonfilter: neither "
                                "content_filter nor smtpd_milters is set in main.cf or on an smtpd service "
                                "of master.cf, and no domain of HOSTS is delivered into the queue "
                                "(virtual_mailbox_domains)",
                                "add the lines of conf/postfix/main.cf.milter, main.cf.content_filter or main.cf.queue"))
    if pc.main.get("soft_bounce") == "yes":
        findings.append(Finding("PF003", "warning", "soft_bounce = yes turns every 5xx (also the milter's "
                                "rejections) into 4xx", "set soft_bounce = no once the set-up works"))
    findings += _address_classes(pc, settings)
    findings += _listener_findings(pc, listener, relay_host, relay_port, bool(content_filter), bool(milters),
                                   bool(queued))
    if content_filter:
        findings += _content_filter_findings(pc, content_filter, filtered or smtpds, listener, settings, max_size)
    if milters:
        findings += milter_findings(pc, milters, milter_socket, smtpds)
    if queued:
        findings += queue_findings(pc, queued, user, listener, smtpds)
    return findings


def _address_classes(pc: PostfixConfig, settings: Mapping[str, Any]) -> list[Finding]:
    """PF004: an application domain Postfix does not accept mail for (issue 14, item 6)."""
    out = []
    for host in sorted({h.lower() for h in settings.get("HOSTS", [])}):
        answers = [accepts_domain(pc, p, host) for p in ADDRESS_CLASSES]
        if any(answers) or None in answers:
            continue
        out.append(Finding(
            "PF004", "error",
            f"Postfix accepts no mail for {host} (HOSTS): it is in none of {', '.join(ADDRESS_CLASSES)}, "
            "so every client outside mynetworks gets 'Relay access denied'",
            f"add {host} to relay_domains, and give it a transport that keeps what lamsonfilter passes on "
            "(the lines of conf/postfix/main.cf.domains and master.cf.domains)"))
    return out


def _listener_findings(pc: PostfixConfig, listener: list[str] | None, relay_host: str, relay_port: int,
                       content_filter: bool, milters: bool, queued: bool = False) -> list[Finding]:
    out = []
    where = f"{relay_host}:{relay_port}"
    if listener is None:
        # the listener's lines differ per mode: name the file of the mode(s) this Postfix uses
        shipped = [f"conf/postfix/master.cf.{mode}" for mode, used in
                   (("content_filter", content_filter), ("milter", milters), ("queue", queued)) if used]
        out.append(Finding(
            "PF110", "error",
            f"no smtpd listens on the relay/reinjection address {where} (settings RELAY) in master.cf: "
            "replies and reinjected mail have nowhere to go",
            f"add the {where} smtpd service of {' or '.join(shipped or ['conf/postfix/master.cf.content_filter'])}"
            " (or give the listener's address with --relay)"))
        return out
    name, type_ = listener[0], listener[1]
    rov = pc.override(name, type_, "receive_override_options") or ""
    if content_filter and pc.effective(listener, "content_filter") != "":
        out.append(Finding(
            "PF111", "error",
            f"the reinjection listener {name} has no '-o content_filter=': reinjected mail is sent "
            "to the filter again, in an endless loop",
            f"add '-o content_filter=' to the {name} service in master.cf"))
    if milters and "no_milters" not in rov and pc.effective(listener, "smtpd_milters") != "":
        out.append(Finding(
            "PF112", "error",
            f"the listener {name} runs the milters: mail lamsonfilter generates or reinjects is "
            "processed by its handlers again",
            f"add no_milters to '-o receive_override_options=' of {name} (or '-o smtpd_milters=')"))
    if name.isdigit() or name.startswith(("0.0.0.0:", "[::]:")):
        out.append(Finding("PF113", "error", f"the listener {name} listens on every address and "
                           "relays for anyone in its mynetworks", f"bind it to loopback: 127.0.0.1:{relay_port}"))
    return out


def _content_filter_findings(pc: PostfixConfig, content_filter: str, filtered: list[list[str]],
                             listener: list[str] | None, settings: Mapping[str, Any],
                             max_size: int | None) -> list[Finding]:
    out = []
    transport = content_filter.split(":", 1)[0]
    svc = pc.service(transport, "unix")
    if svc is None:
        out.append(Finding("PF101", "error", f"content_filter names transport {transport!r}, which master.cf "
                           "does not define", f"add the {transport} service of conf/postfix/master.cf.content_filter"))
    else:
        proto = "lmtp" if svc[7] == "lmtp" else "smtp"
        if pc.override(transport, "unix", f"{proto}_send_xforward_command") != "yes":
            out.append(Finding("PF102", "warning", f"transport {transport} does not send XFORWARD: the filter "
                               "and the reinjection logs do not see the real client or the queue id",
                               f"add '-o {proto}_send_xforward_command=yes' to {transport}"))
        if pc.override(transport, "unix", "disable_mime_output_conversion") != "yes":
            out.append(Finding("PF103", "warning", f"transport {transport} may convert 8-bit mail to 7-bit on "
                               "the way to the filter, which breaks DKIM signatures",
                               f"add '-o disable_mime_output_conversion=yes' to {transport}"))
        if listener is not None and pc.maxproc(listener) < pc.maxproc(svc):
            out.append(Finding(
                "PF122", "warning",
                f"the reinjection listener {listener[0]} allows {pc.maxproc(listener)} processes, fewer than the "
                f"{pc.maxproc(svc)} deliveries transport {transport} may run into the filter at once: each needs "
                "a reinjection connection, and a listener with every process busy never greets (deliveries stall)",
                f"raise the maxproc column of {listener[0]} in master.cf to at least {pc.maxproc(svc)} "
                "(conf/postfix/master.cf.content_filter: 20 for 10)"))
    if not all("no_address_mappings" in pc.effective(s, "receive_override_options") for s in filtered):
        out.append(Finding("PF120", "warning", "receive_override_options lacks no_address_mappings: aliases and "
                           "virtual mappings run before the filter and again after reinjection",
                           "set receive_override_options = no_address_mappings in main.cf"))
    if settings.get("HOSTS") and not any(
            "check_policy_service" in pc.effective(s, "smtpd_recipient_restrictions")
            + pc.effective(s, "smtpd_relay_restrictions") for s in filtered):
        out.append(Finding(
            "PF121", "warning",
            "no check_policy_service asks lamsonfilter at RCPT time: mail to an unknown address at the "
            "application's domains is queued, then refused by the filter and bounced to its (often forged) "
            "sender: backscatter",
            "add check_policy_service { inet:127.0.0.1:10027, default_action=DUNNO } to "
            "smtpd_recipient_restrictions and run lamsonfilter smtpproxy --policy 127.0.0.1:10027 "
            "(conf/postfix/main.cf.content_filter)"))
    limit_text = pc.expanded.get("message_size_limit", "10240000") or "10240000"
    limit = int(limit_text) if limit_text.isdigit() else 10240000
    if max_size is not None and (limit == 0 or limit > max_size):
        accepted = "messages of any size" if limit == 0 else f"messages up to {limit} bytes"
        out.append(Finding(
            "PF123", "error",
            f"Postfix accepts {accepted} (message_size_limit = {limit}), but the content filter announces "
            f"SIZE {max_size}: a larger message is queued, then bounced by the filter (5.3.4)",
            f"run lamsonfilter smtpproxy with --max-size {limit or 'at least the largest message'} "
            "(or with --postfix-config, which follows message_size_limit), or lower message_size_limit"))
    return out
