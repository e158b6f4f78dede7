"""Content-filter mode behind a real private Postfix: ``lamsonfilter smtpproxy`` after Postfix's queue.

The one content-filter rig of the integration and reliability tests.
`SmtpproxyDeployment` starts ``lamsonfilter smtpproxy`` as a subprocess
(filter port and policy port free loopback ports) and a private Postfix
configured with the *shipped* conf/postfix/main.cf.content_filter and
master.cf.content_filter, only the loopback ports replaced
(`shipped_main_cf`, `shipped_master_cf`): Postfix's ``lamsonfilter`` smtp
transport (``lamsonfilter-lmtp`` with ``lmtp=True``) feeds the filter, the
filter reinjects into the 10026-style smtpd on `relay_port` (which is also
where the outbox goes).  So the tests exercise the files users copy::

    with started(SmtpproxyDeployment(app=make_app, policy=False, capture=capture)) as cf:
        cf.submit("alice@example.com", ["bob@example.net"], raw)   # into Postfix's smtpd
        cf.stop_reinjection()      # the 10026 listener leaves master.cf (postfix reload)
        cf.wait_deferred(1)
        cf.kill_filter()           # SIGKILL of the smtpproxy PID we started

(`started` is tests/rig/modes.py's.)  Options on top of `Deployment`'s
(``app``, ``settings``, ``capture``): ``policy=False`` runs the filter
without ``--policy`` (the shipped ``check_policy_service`` line then names a
port nobody listens on, and its ``default_action=DUNNO`` lets Postfix queue
mail for unknown addresses and bounce it itself); ``postfix_config=True``
passes ``--postfix-config`` with the private Postfix's configuration
directory; ``filter_args`` more arguments; ``main_cf`` more main.cf lines.

How content-filter mode looks to the SMTP client:

* an unknown list address is refused at RCPT (``550 5.1.1``) *before*
  queueing, by Postfix asking the filter's policy listener
  (``check_policy_service``, lamsonfilter.contentfilter.policy): no bounce is made;
* a failure inside lamsonfilter is invisible to the client: Postfix
  answered 250 (the message is queued); the filter answers ``451 4.3.0``
  to Postfix, which keeps the message deferred in its queue and retries.

Only PIDs started here are signalled; every wait is bounded.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from typing import Any

from tests.rig.deploy import ROOT, Deployment, read_main_cf
from tests.rig.postfix import free_port, port_accepts, wait_for
from tests.rig.submission import SendResult

__all__ = ["MAIN_CF", "MASTER_CF", "SmtpproxyDeployment", "shipped_main_cf", "shipped_master_cf", "strip_received"]

CONF = ROOT / "conf" / "postfix"
MAIN_CF = CONF / "main.cf.content_filter"
MASTER_CF = CONF / "master.cf.content_filter"
SHIPPED_FILTER = "[127.0.0.1]:10025"
SHIPPED_POLICY = "inet:127.0.0.1:10027"
SHIPPED_LISTENER = "127.0.0.1:10026 inet"


def shipped_main_cf(filter_port: int, policy_port: int, lmtp: bool = False) -> dict[str, str]:
    """The main.cf lines of conf/postfix/main.cf.content_filter, with the filter's and the policy's port."""
    params = read_main_cf(MAIN_CF)
    feed = params["content_filter"]
    assert SHIPPED_FILTER in feed, f"{MAIN_CF}: expected {SHIPPED_FILTER}"
    feed = feed.replace(SHIPPED_FILTER, f"[127.0.0.1]:{filter_port}")
    params["content_filter"] = feed.replace("lamsonfilter:", "lamsonfilter-lmtp:") if lmtp else feed
    restrictions = params["smtpd_recipient_restrictions"]
    assert SHIPPED_POLICY in restrictions, f"{MAIN_CF}: expected {SHIPPED_POLICY}"
    params["smtpd_recipient_restrictions"] = restrictions.replace(SHIPPED_POLICY, f"inet:127.0.0.1:{policy_port}")
    return params


def shipped_master_cf(reinject_port: int) -> str:
    """conf/postfix/master.cf.content_filter with the reinjection listener on `reinject_port`."""
    text = MASTER_CF.read_text()
    assert SHIPPED_LISTENER in text, f"{MASTER_CF}: expected the {SHIPPED_LISTENER} listener"
    return text.replace(SHIPPED_LISTENER, f"127.0.0.1:{reinject_port} inet")


class SmtpproxyDeployment(Deployment):
    """Postfix → ``lamsonfilter smtpproxy`` (subprocess) → Postfix's reinjection smtpd → the capture server."""

    mode = "smtpproxy"

    def __init__(self, lmtp: bool = False, *, policy: bool = True, postfix_config: bool = False,
                 filter_args: tuple[str, ...] = (), main_cf: Mapping[str, str | None] | None = None,
                 **options: Any) -> None:
        """See the module docstring; `options` are `Deployment`'s (app, settings, capture)."""
        super().__init__(**options)
        self.lmtp = lmtp
        self.policy = policy
        self.postfix_config = postfix_config
        self.filter_args = filter_args
        self.main_cf_extra = dict(main_cf or {})
        self.filter_port = free_port()
        self.policy_port = free_port()
        while self.policy_port in (self.filter_port, self.relay_port):
            self.policy_port = free_port()
        while self.filter_port == self.relay_port:
            self.filter_port = free_port()

    def filter_command(self) -> list[str]:
        args = [
            sys.executable, "-m", "lamsonfilter.cli", "-v", "smtpproxy", "--app", str(self.app_dir),
            "--listen", f"127.0.0.1:{self.filter_port}", "--reinject", f"127.0.0.1:{self.relay_port}",
        ]
        if self.policy:
            args += ["--policy", f"127.0.0.1:{self.policy_port}"]
        if self.lmtp:
            args.append("--lmtp")
        if self.postfix_config:
            args += ["--postfix-config", str(self.configure_postfix().config_dir)]
        return [*args, *self.filter_args]

    def filter_ready(self) -> bool:
        return port_accepts(self.filter_port) and (not self.policy or port_accepts(self.policy_port))

    def postfix_main_cf(self) -> dict[str, str | None]:
        params: dict[str, str | None] = dict(shipped_main_cf(self.filter_port, self.policy_port, self.lmtp))
        params.update(self.main_cf_extra)
        return params

    def postfix_master_cf(self) -> str:
        return shipped_master_cf(self.relay_port)

    # ------------------------------------------------------------ the reinjection listener
    def stop_reinjection(self, timeout: float = 30.0) -> None:
        """Take the 10026-style listener out of master.cf and reload: reinjection is refused."""
        postfix = self.postfix
        assert postfix is not None, "Postfix is not running"
        postfix._run("postconf", "-M#", f"127.0.0.1:{self.relay_port}/inet")
        postfix.reload()
        wait_for(lambda: not port_accepts(self.relay_port), timeout, message="the reinjection listener to go")

    def start_reinjection(self, timeout: float = 30.0) -> None:
        """Put the listener back (master.cf written anew) and reload."""
        postfix = self.postfix
        assert postfix is not None, "Postfix is not running"
        postfix.write_config()
        postfix.reload()
        wait_for(lambda: port_accepts(self.relay_port), timeout, message="the reinjection listener to return")

    def wait_deferred(self, count: int, pattern: str = r"status=deferred", timeout: float = 60.0) -> list[str]:
        """Wait until `count` maillog lines match `pattern` (by default: deferrals); return them."""
        return self.wait_maillog(count, pattern, timeout)

    # ------------------------------------------------------------ how the client sees it
    def assert_tempfailed(self, result: SendResult) -> None:
        """Queued by Postfix (250), then deferred with the filter's 451 4.3.0; still queued, not bounced."""
        assert result.accepted, f"Postfix should queue first: {result}\n{self.diagnostics()}"
        assert result.final is not None
        m = re.search(r"queued as ([0-9A-Za-z]+)", result.final.text)
        assert m, f"no queue id in {result.final}"
        queue_id = m.group(1)
        assert self.postfix is not None
        pf = self.postfix
        pf.wait_for(lambda: re.search(rf"{queue_id}: to=<.*status=deferred.*451 4\.3\.0", pf.maillog()), 60)
        assert queue_id in {str(q["queue_id"]) for q in pf.queue()}, f"{queue_id} not in the queue"
        assert not re.search(rf"{queue_id}: .*status=bounced", pf.maillog())

    def assert_rejected_unknown(self, result: SendResult, address: str) -> None:
        """550 5.1.1 at RCPT from Postfix itself (policy service): never queued, so no bounce."""
        reply = result.rcpt(address)
        assert reply is not None and reply.code == 550 and "5.1.1" in reply.text, (
            f"expected 550 5.1.1 for RCPT <{address}>: {result}\n{self.diagnostics()}")


def strip_received(data: bytes) -> bytes:
    """The message minus the Received: fields Postfix put on top (each with its continuation lines)
    and the filter's trace field (lamsonfilter.contentfilter.looptrace) among them."""
    lines = data.split(b"\r\n") if b"\r\n" in data else data.split(b"\n")
    sep = b"\r\n" if b"\r\n" in data else b"\n"
    i = 0
    while i < len(lines) and lines[i].lower().startswith((b"received:", b"x-lamsonfilter-trace:")):
        i += 1
        while i < len(lines) and lines[i][:1] in (b" ", b"\t"):
            i += 1
    return sep.join(lines[i:])
