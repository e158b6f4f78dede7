"""The mailing list end to end through a real Postfix -- the same scenarios in every mode.

The `deployment` fixture is parametrized over the modes; each mode's
`Deployment` (deploy_milter.py, deploy_smtpproxy.py, deploy_queue.py) says
how the client sees a temporary failure or an unknown address, everything
else is common.
A mode whose deployment module does not exist yet is skipped with the
reason, and fails instead under ``CI=true``.
"""

from __future__ import annotations

from email.utils import parseaddr

import pytest

from tests.rig.deploy import LIST_HOST, Deployment
from tests.rig.modes import deployment  # noqa: F401 -- the fixture, parametrized by mode

pytestmark = pytest.mark.postfix

ALICE = "alice@example.com"
BOB = "bob@example.net"
LIST = f"python@{LIST_HOST}"


# ---------------------------------------------------------------- steps
def subscribe(dep: Deployment, member: str) -> str:
    """Ask to join; return the confirmation address from the confirmation request's From."""
    dep.assert_accepted(dep.send(member, [f"python-subscribe@{LIST_HOST}"], "subscribe me", "please\n"))
    (request,) = dep.wait_for_mail(member, subject_contains="Confirm your subscription")
    confirm = parseaddr(str(request.message["From"]))[1]
    assert confirm.startswith("python-confirm-") and confirm.endswith(f"@{LIST_HOST}"), confirm
    return confirm


def join(dep: Deployment, member: str) -> None:
    """Subscribe and confirm; the welcome message must arrive."""
    confirm = subscribe(dep, member)
    dep.assert_accepted(dep.send(member, [confirm], "count me in", "yes\n"))
    (welcome,) = dep.wait_for_mail(member, subject_contains="Welcome to python@")
    assert "Welcome to python@lists.example.org" in welcome.message.get_content()


# ---------------------------------------------------------------- scenarios
def test_subscribe_sends_a_confirmation_request(deployment: Deployment) -> None:
    subscribe(deployment, ALICE)
    (request,) = deployment.messages_to(ALICE)
    assert request.mail_from in ("", "<>")  # an automatic reply: null sender, so it never bounces back
    assert request.message["Auto-Submitted"] == "auto-replied"


def test_confirm_makes_a_member(deployment: Deployment) -> None:
    join(deployment, ALICE)


def test_post_reaches_every_member(deployment: Deployment) -> None:
    join(deployment, ALICE)
    join(deployment, BOB)
    deployment.assert_accepted(deployment.send(ALICE, [LIST], "hello list", "first post\n"))
    for member in (ALICE, BOB):
        (copy,) = deployment.wait_for_mail(member, subject_contains="hello list")
        assert copy.message["List-Id"] == "Python discussion <python.lists.example.org>"
        assert "first post" in copy.message.get_content()
        # each copy goes out with its member's VERP bounce address
        assert copy.mail_from == f"python-bounce-{member.replace('@', '=')}@{LIST_HOST}"


def test_unknown_list_address_is_refused(deployment: Deployment) -> None:
    unknown = f"nosuchlist@{LIST_HOST}"
    result = deployment.send(ALICE, [unknown], "anyone there?")
    deployment.assert_rejected_unknown(result, unknown)
    deployment.settle()
    assert deployment.messages_to(unknown) == []
    assert deployment.messages_to(ALICE) == []  # no bounce, no reply


# Not in queue mode: there Postfix has already delivered the message to its final destination, the
# queue; a handler's ctx.deliver() to an address of the application's own domain is put on hold by
# the outbox listener (master.cf.queue), since delivered it would go round through the queue again.
@pytest.mark.parametrize("deployment", ["milter", "smtpproxy"], indirect=True)
def test_header_added_by_the_application_reaches_the_destination(deployment: Deployment) -> None:
    tag = f"tag@{LIST_HOST}"
    deployment.assert_accepted(deployment.send(ALICE, [tag], "tag me"))
    (msg,) = deployment.wait_for_mail(tag, subject_contains="tag me")
    assert msg.header_values("X-Lamsonfilter-Test") == ["tagged"]
    assert msg.mail_from == ALICE


def test_handler_that_raises_defers_and_sends_nothing(deployment: Deployment) -> None:
    crash = f"crash@{LIST_HOST}"
    result = deployment.send(ALICE, [crash], "this will crash")
    deployment.assert_tempfailed(result)
    deployment.settle()
    assert deployment.messages_to(crash) == []  # nothing delivered
    assert deployment.messages_to(ALICE) == []  # nothing replied
