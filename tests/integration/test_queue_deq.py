"""The example list end to end in queue mode: a real private Postfix delivers into the queue with the
shipped conf/postfix/main.cf.queue, ``lamsonfilter deq`` runs the application over it, and the replies
and list copies go out through master.cf.queue's listener to the final destination (a capture server).

Subscribe → the confirmation request reaches the subscriber; confirm → member (welcome); post → every
member gets a copy.  The queue is empty afterwards and nothing was quarantined.  Mail that arrives while
``deq`` is stopped waits in the queue and is processed once it runs again.
"""

from __future__ import annotations

from collections.abc import Iterator
from email.utils import parseaddr

import pytest

from tests.rig.deploy import LIST_HOST
from tests.rig.deploy_queue import QueueDeployment
from tests.rig.fixtures import POSTFIX_BINARIES, require
from tests.rig.postfix import wait_for

pytestmark = pytest.mark.postfix

ALICE = "alice@example.com"
BOB = "bob@example.net"
LIST = f"python@{LIST_HOST}"
WAIT = 60.0


@pytest.fixture
def dep() -> Iterator[QueueDeployment]:
    require(*POSTFIX_BINARIES, root=True)
    deployment = QueueDeployment()
    try:
        deployment.start()
        yield deployment
    finally:
        print(deployment.diagnostics())  # shown only when the test failed
        deployment.stop()


def queued_by_virtual(dep: QueueDeployment, rcpt: str) -> list[str]:
    """Postfix's log lines of virtual(8) delivering to `rcpt` into the queue's Maildir."""
    assert dep.postfix is not None
    return [line for line in dep.postfix.maillog().splitlines()
            if f"to=<{rcpt}>" in line and "relay=virtual" in line and "delivered to maildir" in line]


def subscribe(dep: QueueDeployment, member: str) -> str:
    """Ask to join; the confirmation request arrives; return its reply address."""
    dep.assert_accepted(dep.send(member, [f"python-subscribe@{LIST_HOST}"], "subscribe me", "please\n"))
    (request,) = dep.wait_for_mail(member, subject_contains="Confirm your subscription")
    assert request.mail_from in ("", "<>")  # an automatic reply: null sender
    assert queued_by_virtual(dep, f"python-subscribe@{LIST_HOST}")
    confirm = parseaddr(str(request.message["From"]))[1]
    assert confirm.startswith("python-confirm-") and confirm.endswith(f"@{LIST_HOST}"), confirm
    return confirm


def confirm(dep: QueueDeployment, member: str, address: str) -> None:
    dep.assert_accepted(dep.send(member, [address], "count me in", "yes\n"))
    (welcome,) = dep.wait_for_mail(member, subject_contains="Welcome to python@")
    assert "Welcome to python@lists.example.org" in welcome.message.get_content()
    assert queued_by_virtual(dep, address)


def test_subscribe_confirm_and_post_through_the_queue(dep: QueueDeployment) -> None:
    confirm(dep, ALICE, subscribe(dep, ALICE))
    confirm(dep, BOB, subscribe(dep, BOB))

    dep.assert_accepted(dep.send(ALICE, [LIST], "hello list", "first post\n"))
    for member in (ALICE, BOB):
        (copy,) = dep.wait_for_mail(member, subject_contains="hello list")
        assert copy.message["List-Id"] == "Python discussion <python.lists.example.org>"
        assert "first post" in copy.message.get_content()
        assert copy.mail_from == f"python-bounce-{member.replace('@', '=')}@{LIST_HOST}"
    assert len(queued_by_virtual(dep, LIST)) == 1

    dep.settle()
    # each message was processed once and then removed from the queue; nothing went aside
    assert dep.queue.count() == {"new": 0, "claimed": 0, "retry": 0}
    assert dep.quarantined() == []
    for member in (ALICE, BOB):
        assert len(dep.messages_to(member, "Confirm your subscription")) == 1
        assert len(dep.messages_to(member, "Welcome to python@")) == 1
        assert len(dep.messages_to(member, "hello list")) == 1


def test_mail_that_arrives_while_deq_is_stopped_waits_in_the_queue(dep: QueueDeployment) -> None:
    assert dep.stop_filter() == 0  # SIGTERM: deq stops cleanly
    dep.assert_accepted(dep.send(ALICE, [f"python-subscribe@{LIST_HOST}"], "subscribe me", "please\n"))
    # Postfix delivered it into the queue all the same; nobody processed it
    wait_for(lambda: dep.queue.count()["new"] == 1, WAIT, message=lambda: f"one queued message; {dep.diagnostics()}")
    dep.settle()
    assert dep.messages_to(ALICE) == []

    dep.start_filter()
    (request,) = dep.wait_for_mail(ALICE, subject_contains="Confirm your subscription")
    assert request.message["Auto-Submitted"] == "auto-replied"
    dep.settle()
    assert dep.queue.count() == {"new": 0, "claimed": 0, "retry": 0}


def test_an_unknown_address_is_refused_at_rcpt_and_a_known_one_goes_on(dep: QueueDeployment) -> None:
    """Postfix asks ``deq --policy`` (main.cf.queue's check_policy_service): 550 5.1.1 for the address
    no route takes, while the client is connected; the other recipient of the same message is queued."""
    unknown = f"nosuchlist@{LIST_HOST}"
    result = dep.send(ALICE, [unknown, f"python-subscribe@{LIST_HOST}"], "subscribe me", "please\n")
    refused = result.rcpt(unknown)
    assert refused is not None and (refused.code, refused.text[:5]) == (550, "5.1.1"), result
    dep.assert_accepted(result)
    dep.wait_for_mail(ALICE, subject_contains="Confirm your subscription")
    dep.settle()
    assert dep.postfix is not None and "NOQUEUE: reject: RCPT from" in dep.postfix.maillog()
    assert queued_by_virtual(dep, unknown) == [] and dep.quarantined() == []
    assert f"rcpt=<{unknown}> refused at RCPT (policy): 550 5.1.1" in dep.filter_output()


def test_without_the_policy_listener_an_unknown_address_is_accepted_and_quarantined() -> None:
    """deq without --policy (or not running): the shipped check's default_action=DUNNO accepts,
    and deq quarantines the message with its envelope; never a bounce."""
    require(*POSTFIX_BINARIES, root=True)
    dep = QueueDeployment(policy=False)
    try:
        dep.start()
        unknown = f"nosuchlist@{LIST_HOST}"
        dep.assert_rejected_unknown(dep.send(ALICE, [unknown], "anyone there?"), unknown)
        assert len(queued_by_virtual(dep, unknown)) == 1
        dep.settle()
        assert dep.messages_to(ALICE) == []
    finally:
        print(dep.diagnostics())
        dep.stop()
