"""What ``postconf`` says about one Postfix configuration directory: `PostfixConfig`.

The piece of ``lamsonfilter check`` that both the general and content-filter
checks (`lamsonfilter.check.postfix`) and the milter checks
(`lamsonfilter.check.milter`) read from; it knows nothing of findings::

    pc = PostfixConfig.read("/etc/postfix")
    pc.effective(pc.service("smtp", "inet"), "smtpd_milters")
    smtpd_services(pc, listener=None)   # the smtpd services clients talk to

The configuration is read with ``postconf -n``, ``-M``, ``-P`` and ``-x``,
so what the checks see is what Postfix sees, ``-o`` overrides included.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ADDRESS_CLASSES", "DEFAULT_QUEUE_DIRECTORY", "PostfixConfig", "accepts_domain", "smtpd_services", "tokens"]

#: Where Debian's Postfix keeps its queue, and chroots its daemons.
DEFAULT_QUEUE_DIRECTORY = "/var/spool/postfix"

#: The main.cf parameters that make Postfix accept mail for a domain (ADDRESS_CLASS_README):
#: local, virtual alias, virtual mailbox and relay domains.  A domain in none of them gets
#: "Relay access denied" from every client but mynetworks.
ADDRESS_CLASSES = ("mydestination", "virtual_alias_domains", "virtual_mailbox_domains", "relay_domains")

#: Parameters whose values (defaults included, ``$name`` expanded) the checks read.
_EXPANDED = (*ADDRESS_CLASSES, "message_size_limit", "queue_directory", "compatibility_level",
             "default_process_limit", "smtpd_recipient_restrictions", "smtpd_relay_restrictions",
             "parent_domain_matches_subdomains", "transport_maps", "virtual_transport", "virtual_mailbox_maps",
             "virtual_uid_maps", "virtual_gid_maps", "virtual_minimum_uid", "virtual_mailbox_base")


def _postconf() -> str:
    exe = shutil.which("postconf") or ("/usr/sbin/postconf" if Path("/usr/sbin/postconf").exists() else None)
    if exe is None:
        raise FileNotFoundError("postconf not found (is Postfix installed?)")
    return exe


@dataclass
class PostfixConfig:
    """What ``postconf`` says about one configuration directory."""

    main: dict[str, str]
    explicit: set[str]  # names set in main.cf (postconf -n), not defaults
    services: list[list[str]]  # postconf -M fields: name type private unpriv chroot wakeup maxproc command args
    overrides: dict[tuple[str, str], dict[str, str]]  # (name, type) -> -o name=value
    expanded: dict[str, str] = field(default_factory=dict)  # _EXPANDED, with defaults, $name expanded
    config_dir: str = ""

    @classmethod
    def read(cls, config_dir: str | Path) -> PostfixConfig:
        exe = _postconf()

        def run(*args: str) -> str:
            proc = subprocess.run(  # noqa: S603 -- argv list, no shell, no message data
                [exe, "-c", str(config_dir), *args], capture_output=True, text=True, timeout=60, check=False)
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
        expanded = dict(pairs(run("-x", *_EXPANDED)))
        services = [line.split() for line in run("-M").splitlines() if line.strip()]
        overrides: dict[tuple[str, str], dict[str, str]] = {}
        for key, value in pairs(run("-P")):
            parts = key.split("/")
            if len(parts) == 3:
                overrides.setdefault((parts[0], parts[1]), {})[parts[2]] = value
        return cls(main, explicit, services, overrides, expanded, str(config_dir))

    def service(self, name: str, type_: str) -> list[str] | None:
        for s in self.services:
            if len(s) >= 8 and s[0] == name and s[1] == type_:
                return s
        return None

    def override(self, name: str, type_: str, param: str) -> str | None:
        return self.overrides.get((name, type_), {}).get(param)

    def effective(self, service: list[str], param: str) -> str:
        """`param` as the service sees it: its ``-o`` override, else main.cf (or the default)."""
        value = self.override(service[0], service[1], param)
        if value is not None:
            return value
        return self.main.get(param, self.expanded.get(param, ""))

    @property
    def queue_directory(self) -> str:
        return self.expanded.get("queue_directory", "").rstrip("/") or DEFAULT_QUEUE_DIRECTORY

    def maxproc(self, service: list[str]) -> int:
        """The service's process limit ("-" is default_process_limit, 100 by default)."""
        value = service[6]
        if value == "-":
            value = self.expanded.get("default_process_limit", "100") or "100"
        try:
            return int(value)
        except ValueError:
            return 100

    def chrooted(self, service: list[str]) -> bool:
        """master.cf's chroot column: "y", or "-" below compatibility_level 1 (where it meant y)."""
        column = service[4]
        if column == "-":
            level = self.expanded.get("compatibility_level", "0") or "0"
            return level.split(".")[0] in ("0", "")
        return column == "y"

    def lookup(self, table: str, key: str) -> bool | None:
        """Whether lookup table `table` (``type:name``) has `key`; None when it cannot be asked."""
        exe = shutil.which("postmap") or "/usr/sbin/postmap"
        try:
            proc = subprocess.run(  # noqa: S603 -- argv list, no shell, no message data
                [exe, "-c", self.config_dir, "-q", key, table], capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return {0: True, 1: False}.get(proc.returncode)

    def query(self, table: str, key: str) -> str | None:
        """What lookup table `table` answers for `key`; None when it has no answer or cannot be asked."""
        exe = shutil.which("postmap") or "/usr/sbin/postmap"
        try:
            proc = subprocess.run(  # noqa: S603 -- argv list, no shell, no message data
                [exe, "-c", self.config_dir, "-q", key, table], capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None


def smtpd_services(pc: PostfixConfig, listener: list[str] | None) -> list[list[str]]:
    """The smtpd services clients talk to (master.cf's ``smtp inet`` and the like, not the listener)."""
    return [s for s in pc.services
            if len(s) >= 8 and s[1] == "inet" and s[7] == "smtpd" and s is not listener]


def tokens(value: str) -> list[str]:
    """A list parameter's items; a ``type:{ ... }`` inline table (braces nested) stays one item."""
    items: list[str] = []
    current = ""
    depth = 0
    for ch in value:
        if depth == 0 and (ch.isspace() or ch == ","):
            if current:
                items.append(current)
            current = ""
            continue
        depth += {"{": 1, "}": -1}.get(ch, 0)
        current += ch
    if current:
        items.append(current)
    return items


def accepts_domain(pc: PostfixConfig, param: str, host: str) -> bool | None:
    """Whether address class `param` lists `host` (None: a table that could not be asked)."""
    subdomains = param in tokens(pc.expanded.get("parent_domain_matches_subdomains", ""))
    unknown = False
    for item in tokens(pc.expanded.get(param, "")):
        if re.match(r"^[a-z0-9_]+:", item, re.IGNORECASE) and not item.startswith("/"):
            found = pc.lookup(item, host)
            if found is None:
                unknown = True
            elif found:
                return True
            continue
        item = item.lower().rstrip(".")
        if item == host or (item.startswith(".") and host.endswith(item)) \
                or (subdomains and host.endswith("." + item.lstrip("."))):
            return True
    return None if unknown else False
