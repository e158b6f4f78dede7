"""Content-filter mode for the integration scenarios: ``lamsonfilter smtpproxy`` after Postfix's queue.

`SmtpproxyDeployment` starts ``lamsonfilter smtpproxy`` as a subprocess
(filter port and policy port free loopback ports) and a private Postfix
configured with the *shipped* conf/postfix/main.cf.content_filter and
master.cf.content_filter (read by tests/rig/contentfilter.py, the one
place that wires the shipped files into a private Postfix), only the
loopback ports replaced: Postfix's
``lamsonfilter`` smtp transport feeds the filter, the filter reinjects
into the 10026-style smtpd on `relay_port` (which is also where the
outbox goes).

How content-filter mode looks to the SMTP client:

* an unknown list address is refused at RCPT (``550 5.1.1``) *before*
  queueing, by Postfix asking the filter's policy listener
  (``check_policy_service``, lamsonfilter.contentfilter.policy): no bounce is made;
* a failure inside lamsonfilter is invisible to the client: Postfix
  answered 250 (the message is queued); the filter answers ``451 4.3.0``
  to Postfix, which keeps the message deferred in its queue and retries.
"""

from __future__ import annotations

import re
import sys

from tests.rig.contentfilter import CONF, content_filter_master_cf
from tests.rig.deploy import Deployment, SendResult
from tests.rig.postfix import free_port, port_accepts

__all__ = ["SmtpproxyDeployment", "MAIN_CF", "MASTER_CF"]

MAIN_CF = CONF / "main.cf.content_filter"
MASTER_CF = CONF / "master.cf.content_filter"
SHIPPED_FILTER = "[127.0.0.1]:10025"
SHIPPED_POLICY = "inet:127.0.0.1:10027"
SHIPPED_LISTENER = "127.0.0.1:10026 inet"


class SmtpproxyDeployment(Deployment):
    mode = "smtpproxy"

    def __init__(self, lmtp: bool = False) -> None:
        super().__init__()
        self.lmtp = lmtp
        self.filter_port = free_port()
        self.policy_port = free_port()
        while self.policy_port in (self.filter_port, self.relay_port):
            self.policy_port = free_port()
        while self.filter_port == self.relay_port:
            self.filter_port = free_port()

    def filter_command(self) -> list[str]:
        return [
            sys.executable, "-m", "lamsonfilter.cli", "-v", "smtpproxy", "--app", str(self.app_dir),
            "--listen", f"127.0.0.1:{self.filter_port}", "--reinject", f"127.0.0.1:{self.relay_port}",
            "--policy", f"127.0.0.1:{self.policy_port}", *(["--lmtp"] if self.lmtp else []),
        ]

    def filter_ready(self) -> bool:
        return port_accepts(self.filter_port) and port_accepts(self.policy_port)

    def postfix_main_cf(self) -> dict[str, str | None]:
        from tests.rig.deploy_milter import read_main_cf

        params: dict[str, str | None] = dict(read_main_cf(MAIN_CF))
        feed = params["content_filter"]
        assert feed is not None and SHIPPED_FILTER in feed, f"{MAIN_CF}: expected {SHIPPED_FILTER}"
        feed = feed.replace(SHIPPED_FILTER, f"[127.0.0.1]:{self.filter_port}")
        params["content_filter"] = feed.replace("lamsonfilter:", "lamsonfilter-lmtp:") if self.lmtp else feed
        restrictions = params["smtpd_recipient_restrictions"]
        assert restrictions is not None and SHIPPED_POLICY in restrictions
        params["smtpd_recipient_restrictions"] = restrictions.replace(
            SHIPPED_POLICY, f"inet:127.0.0.1:{self.policy_port}")
        return params

    def postfix_master_cf(self) -> str:
        assert SHIPPED_LISTENER in MASTER_CF.read_text(), f"{MASTER_CF}: expected the {SHIPPED_LISTENER} listener"
        return content_filter_master_cf(self.relay_port)

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
