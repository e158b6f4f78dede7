"""ctx.defer() behind a real private Postfix, in milter and in content-filter mode.

A handler that defers (tests/fixtures/handlers/lfdefer.py) gets the message into the
application's queue (``var/queue``) before Postfix hears the filter's 2xx; the other
recipient of the same message is delivered as if nothing happened; the deferral's own
changes reach nobody.  With the queue unwritable the message is not accepted (milter: 4xx to
the client; content filter: deferred in Postfix's queue), nothing is lost, and once the queue
can be written it is queued, once.  The queued message carries the envelope, and
``lamsonfilter deq --once`` runs it: the handler, from the queue, delivers it.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from email.message import EmailMessage
from email.policy import SMTP

import pytest

from lamsonfilter.daemon.runtime import Runtime
from lamsonfilter.mail import MailRequest
from tests.rig.deferral import DeferralMixin, deferral_deployment
from tests.rig.deploy import LIST_HOST, Deployment, SendResult
from tests.rig.fixtures import POSTFIX_BINARIES, require
from tests.rig.postfix import wait_for

pytestmark = pytest.mark.postfix

ALICE = "alice@example.com"
SLOW = f"slow@{LIST_HOST}"
TAG = f"tag@{LIST_HOST}"


@pytest.fixture(params=["milter", "smtpproxy"])
def dep(request: pytest.FixtureRequest) -> Iterator[Deployment]:
    require(*POSTFIX_BINARIES, root=True)
    d = deferral_deployment(request.param)
    try:
        d.start()
        yield d
    finally:
        print(d.diagnostics())  # shown only when the test fails
        d.stop()


def message(subject: str) -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = ALICE, SLOW, subject
    msg["Message-ID"] = f"<{uuid.uuid4().hex}@client.example.test>"
    msg.set_content("test\n")
    return msg.as_bytes(policy=SMTP)


@contextmanager
def runtime_of(dep: Deployment) -> Iterator[Runtime]:
    runtime = Runtime.from_directory(dep.app_dir)
    try:
        yield runtime
    finally:
        runtime.stop()


def mixin(dep: Deployment) -> DeferralMixin:
    assert isinstance(dep, DeferralMixin)
    return dep


def filter_answered(dep: Deployment, result: SendResult, rcpt: str) -> None:
    """Wait until the filter gave its answer for this message: the milter answered inside the
    client's session; the content filter answered Postfix's delivery to it (status=sent)."""
    assert result.accepted, f"{result}\n{dep.diagnostics()}"
    if dep.mode == "milter":
        return
    assert result.final is not None
    m = re.search(r"queued as ([0-9A-Za-z]+)", result.final.text)
    assert m, result.final
    pf = dep.postfix
    assert pf is not None
    pf.wait_for(lambda: re.search(rf"{m.group(1)}: to=<{re.escape(rcpt)}>.*status=sent", pf.maillog()), 60)


def test_deferral_is_queued_before_the_2xx_and_runs_from_the_queue(dep: Deployment) -> None:
    q = mixin(dep)
    result = dep.send(ALICE, [TAG, SLOW], "slow work")
    filter_answered(dep, result, SLOW)
    # the 2xx has been given: the queue must hold the message already (no waiting here)
    (name,) = q.queued()
    # the other recipient is delivered as usual, without anything the deferred call asked for
    (tagged,) = dep.wait_for_mail(TAG, "slow work")
    assert tagged.header_values("X-Lamsonfilter-Test") == ["tagged"]
    assert tagged.header_values("X-Lamsonfilter-Deferred") == []
    assert [r.lower() for r in tagged.rcpt_tos] == [TAG]
    dep.settle()
    assert dep.messages_to(SLOW) == []  # consumed: Postfix did not deliver it
    # the queued message carries the envelope ...
    _entry, sender, rcpt, raw = q.queue.read(name)
    assert (sender, rcpt) == (ALICE, SLOW)
    queued = MailRequest.from_bytes(raw, sender=sender, recipients=[rcpt])
    assert str(queued.message["Subject"]) == "slow work" and not queued.message["X-Lamsonfilter-Deferred"]
    # ... and lamsonfilter deq runs it: the handler, from the queue, delivers it through the relay
    assert q.run_deq() == (1, 0, 0)
    (done,) = dep.wait_for_mail(SLOW, "slow work")
    assert done.header_values("X-Lamsonfilter-Deferred") == ["ran from the queue"]
    assert done.mail_from == ALICE and [r.lower() for r in done.rcpt_tos] == [SLOW]
    assert q.queued() == [] and q.queue.count() == {"new": 0, "claimed": 0, "retry": 0}
    with runtime_of(dep) as runtime:  # the state the run from the queue committed
        with runtime.app.storage.transaction(commit=False) as tx:
            record = tx.get(f"lfdefer:{ALICE}:{SLOW}")
        assert record is not None and record.data == {"subject": "slow work"}
    dep.settle()
    assert len(dep.messages_to(SLOW)) == 1  # once


def test_unwritable_queue_loses_nothing_and_queues_once_mended(dep: Deployment) -> None:
    q = mixin(dep)
    q.break_queue()
    raw = message("while the queue is broken")
    result = dep.send_message_bytes(ALICE, [SLOW], raw)
    dep.assert_tempfailed(result)  # milter: 4xx to the client; content filter: deferred in Postfix
    assert "could not be queued" in dep.filter_log_tail(200)
    q.mend_queue()
    assert q.queued() == []
    pf = dep.postfix
    assert pf is not None
    if dep.mode == "milter":
        retry = dep.send_message_bytes(ALICE, [SLOW], raw)  # the client's retry: the same message
        filter_answered(dep, retry, SLOW)
    else:
        pf.flush()  # Postfix's retry of the message it kept
        wait_for(lambda: pf.queue() == [], 90, message=lambda: f"still queued: {pf.queue()}\n{dep.diagnostics()}")
    names = q.queued()
    assert len(names) == 1, names
    _entry, sender, rcpt, queued = q.queue.read(names[0])
    assert (sender, rcpt) == (ALICE, SLOW) and b"while the queue is broken" in queued
    dep.settle()
    assert dep.messages_to(SLOW) == [] and "status=bounced" not in pf.maillog()
    assert q.run_deq() == (1, 0, 0)
    dep.wait_for_mail(SLOW, "while the queue is broken")
    dep.settle()
    assert len(dep.messages_to(SLOW, "while the queue is broken")) == 1  # nothing lost, nothing twice
