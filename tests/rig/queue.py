"""Queue mode's Postfix side: a private Postfix that delivers the application's domains into a Maildir queue.

The configuration is the *shipped* conf/postfix/main.cf.queue and
master.cf.queue (this module is the one place that wires them into a
private Postfix), with only what names the machine replaced: the queue's
parent directory (``virtual_mailbox_base``), the owner's uid and gid (the
file's ``LAMSONFILTER_UID`` / ``LAMSONFILTER_GID``) and the outbox
listener's port::

    spool = QueueSpool(workdir / "spool")       # owned by the queue owner, 0750
    pf = PrivatePostfix(workdir / "postfix", smtpd_port=free_port(), relay_port=capture.port,
                        main_cf=queue_main_cf(spool), master_cf_extra=queue_master_cf(outbox_port))
    ...                                         # mail to lists.example.org lands in spool.queue/new/

The owner: virtual(8) refuses uid 0 (and any uid below ``virtual_minimum_uid``),
and the rig runs as root (a private Postfix needs it), so the queue belongs to
an existing unprivileged account, `QUEUE_OWNER` (``nobody``), as it belongs
to the ``lamsonfilter`` user on a server.  A test process running as root
reads and claims its files as the daemon would.
"""

from __future__ import annotations

import grp
import os
import pwd
from pathlib import Path

from lamsonfilter.devtools.localpostfix import TEST_DOMAINS
from tests.rig.deploy_smtpproxy import CONF
from tests.rig.deploy import read_main_cf

__all__ = [
    "MAIN_CF",
    "MASTER_CF",
    "QUEUE_OWNER",
    "VIRTUAL_SERVICE",
    "QueueSpool",
    "queue_main_cf",
    "queue_master_cf",
]

MAIN_CF = CONF / "main.cf.queue"
MASTER_CF = CONF / "master.cf.queue"
#: What the shipped files name, replaced by the rig.
SHIPPED_BASE = "/var/spool/lamsonfilter"
SHIPPED_MAP = "inline:{ {@lists.example.org = queue/} }"
SHIPPED_LISTENER = "127.0.0.1:10026 inet"
#: An unprivileged account that exists on Debian (uid 65534 >= virtual_minimum_uid).
QUEUE_OWNER = "nobody"
#: Debian's master.cf has this service; the rig's written-from-scratch master.cf does not.
VIRTUAL_SERVICE = "virtual   unix  -       n       n       -       -       virtual\n"


class QueueSpool:
    """``virtual_mailbox_base``: a directory owned by `QUEUE_OWNER`; the queue is its ``queue/``."""

    def __init__(self, path: Path, owner: str = QUEUE_OWNER) -> None:
        entry = pwd.getpwnam(owner)
        self.path = Path(path)
        self.uid = entry.pw_uid
        self.gid = entry.pw_gid
        self.group = grp.getgrgid(self.gid).gr_name
        self.path.mkdir(mode=0o750, parents=True, exist_ok=True)
        os.chmod(self.path, 0o750)  # what README.rst's set-up does for /var/spool/lamsonfilter
        os.chown(self.path, self.uid, self.gid)

    @property
    def queue(self) -> Path:
        """The queue directory (created by virtual(8) at the first delivery)."""
        return self.path / "queue"

    def files(self, sub: str = "new") -> list[Path]:
        try:
            return sorted(p for p in (self.queue / sub).iterdir() if not p.name.startswith("."))
        except FileNotFoundError:
            return []


#: The policy service main.cf.queue names (``deq --policy``).
SHIPPED_POLICY = "inet:127.0.0.1:10027"


def queue_main_cf(spool: QueueSpool, policy_port: int | None = None) -> dict[str, str | None]:
    """The main.cf lines of conf/postfix/main.cf.queue, with the spool's path and owner, and
    the policy service (``deq --policy``) on `policy_port`; None: without the
    ``check_policy_service`` element (no deq runs: Postfix would only log "connection refused"
    and accept, its default_action DUNNO)."""
    params: dict[str, str | None] = dict(read_main_cf(MAIN_CF))
    restrictions = params["smtpd_recipient_restrictions"] or ""
    element = f"check_policy_service {{ {SHIPPED_POLICY}, default_action=DUNNO }}, "
    assert restrictions.startswith(element), f"{MAIN_CF}: expected smtpd_recipient_restrictions = {element}..."
    params["smtpd_recipient_restrictions"] = (
        restrictions.replace(SHIPPED_POLICY, f"inet:127.0.0.1:{policy_port}") if policy_port is not None
        else restrictions[len(element):])
    assert params["virtual_mailbox_base"] == SHIPPED_BASE, f"{MAIN_CF}: expected {SHIPPED_BASE}"
    assert params["virtual_mailbox_maps"] == SHIPPED_MAP, f"{MAIN_CF}: expected {SHIPPED_MAP}"
    params["virtual_mailbox_base"] = str(spool.path)
    # a domain belongs to one address class: the rig's relay_domains lists example.org, which
    # covers lists.example.org (parent_domain_matches_subdomains) -- as main.cf.queue says, take it out
    params["relay_domains"] = ", ".join(d for d in TEST_DOMAINS.split(", ") if d != "example.org")
    for name, placeholder, value in (("virtual_uid_maps", "LAMSONFILTER_UID", spool.uid),
                                     ("virtual_gid_maps", "LAMSONFILTER_GID", spool.gid)):
        assert params[name] == f"static:{placeholder}", f"{MAIN_CF}: expected {name} = static:{placeholder}"
        params[name] = f"static:{value}"
    return params


def queue_master_cf(outbox_port: int) -> str:
    """virtual(8)'s service and conf/postfix/master.cf.queue's listener on `outbox_port`."""
    text = MASTER_CF.read_text()
    assert SHIPPED_LISTENER in text, f"{MASTER_CF}: expected the {SHIPPED_LISTENER} listener"
    return VIRTUAL_SERVICE + text.replace(SHIPPED_LISTENER, f"127.0.0.1:{outbox_port} inet")
