"""Milter mode and mail submitted locally (sendmail(1) → postdrop → pickup → cleanup): issue 12 item 3.

The shipped conf/postfix/main.cf.milter names lamsonfilter in ``non_smtpd_milters``
too, so a message a cron job or a local user sends with ``sendmail`` to the
application's address reaches the application, as SMTP mail does.  And the
domain set-up the repository ships (conf/postfix/main.cf.domains) never throws
mail for the application's domains away: what went around lamsonfilter stays
in Postfix's queue, deferred with a reason.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.rig.deploy import LIST_HOST, ROOT, read_main_cf
from tests.rig.deploy_milter import (
    MilterDeployment,
    require_pymilter,
)
from tests.rig.fixtures import POSTFIX_BINARIES, require
from tests.rig.postfix import find_binary, wait_for

DOMAINS_CF = ROOT / "conf" / "postfix" / "main.cf.domains"


def sendmail(config_dir: Path, sender: str, rcpt: str, subject: str) -> None:
    """Submit one message with the private Postfix's own sendmail(1) (postdrop, pickup)."""
    exe = find_binary("sendmail")
    assert exe is not None
    raw = f"From: {sender}\nTo: {rcpt}\nSubject: {subject}\n\nsent with sendmail(1)\n"
    proc = subprocess.run([exe, "-C", str(config_dir), "-i", "-f", sender, rcpt], input=raw,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr


class LocalDomainsDeployment(MilterDeployment):
    """The milter deployment plus the shipped domain lines for the application's domain."""

    def __init__(self, non_smtpd: bool) -> None:
        super().__init__()
        self.non_smtpd = non_smtpd

    def postfix_main_cf(self) -> dict[str, str | None]:
        params = super().postfix_main_cf()
        domains = read_main_cf(DOMAINS_CF)
        # the rig relays the other test domains to its capture server: keep them
        params["relay_domains"] = f"example.com, example.net, example.org, {domains['relay_domains']}"
        params["transport_maps"] = domains["transport_maps"]
        params["defer_transports"] = domains["defer_transports"]
        if not self.non_smtpd:
            params["non_smtpd_milters"] = ""
        return params

    def postfix_master_cf(self) -> str:
        return super().postfix_master_cf() + "\n" + (ROOT / "conf" / "postfix" / "master.cf.domains").read_text()


@pytest.fixture
def deployment(request: pytest.FixtureRequest) -> Iterator[MilterDeployment]:
    require(*POSTFIX_BINARIES, "sendmail", root=True)
    require_pymilter()
    dep = LocalDomainsDeployment(non_smtpd=request.param)
    dep.start()
    try:
        yield dep
    finally:
        dep.stop()


@pytest.mark.parametrize("deployment", [True], indirect=True)
def test_mail_submitted_with_sendmail_reaches_the_application(deployment: MilterDeployment) -> None:
    assert deployment.postfix is not None
    sendmail(deployment.postfix.config_dir, "alice@example.com", f"python-subscribe@{LIST_HOST}", "join please")
    confirm = deployment.wait_for_mail("alice@example.com", subject_contains="Confirm")
    assert confirm[0].message["From"].startswith("python-confirm-")
    # the application consumed the request: nothing was delivered to the list address itself
    deployment.settle()
    assert deployment.messages_to(f"python-subscribe@{LIST_HOST}") == []
    assert "milter configuration error" not in deployment.postfix.maillog()


@pytest.mark.parametrize("deployment", [True], indirect=True)
def test_an_unknown_address_submitted_locally_stays_queued(deployment: MilterDeployment) -> None:
    """No client to refuse: Postfix keeps the message (a milter configuration error), never loses it."""
    pf = deployment.postfix
    assert pf is not None
    sendmail(pf.config_dir, "alice@example.com", f"no-such-list-xyz@{LIST_HOST}", "unknown")
    wait_for(lambda: "milter configuration error" in pf.maillog(), 60,
             message=lambda: f"cleanup to refuse the local message; {deployment.diagnostics()}")
    assert "5.1.1" in pf.maillog()
    kept = [m for m in pf.queue() if m["queue_name"] == "maildrop"]
    assert [r["address"] for m in kept for r in m["recipients"]] == [f"no-such-list-xyz@{LIST_HOST}"], pf.queue()
    assert not deployment.messages_to("alice@example.com"), "a bounce to the local sender"


@pytest.mark.parametrize("deployment", [False], indirect=True)
def test_mail_that_went_around_lamsonfilter_is_kept_not_discarded(deployment: MilterDeployment) -> None:
    """Without non_smtpd_milters, the shipped domain lines keep the message deferred in the queue."""
    pf = deployment.postfix
    assert pf is not None
    sendmail(pf.config_dir, "bob@example.com", f"python-subscribe@{LIST_HOST}", "around the milter")
    queued = wait_for(lambda: [m for m in pf.queue() if m["queue_name"] == "deferred"], 60,
                      message=lambda: f"the message to be deferred; {deployment.diagnostics()}")
    assert [r["address"] for m in queued for r in m["recipients"]] == [f"python-subscribe@{LIST_HOST}"], queued
    reasons = " ".join(r.get("delay_reason", "") for m in queued for r in m["recipients"])
    assert "deferred transport" in reasons, queued
    assert "status=sent" not in pf.maillog() and "discard" not in pf.maillog()
