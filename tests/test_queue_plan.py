"""The queue's table (`lamsonfilter.queueworker.plan`): every Decision to the queue's actions, without a queue."""

from __future__ import annotations

import pytest

from lamsonfilter.decisions import Action, Decision, HeaderChange, Outcome
from lamsonfilter.mail import Envelope, MailRequest
from lamsonfilter.queueworker.plan import (
    RETRY_FIRST,
    RETRY_MAX,
    backoff,
    no_envelope_plan,
    poison_plan,
    queue_plan,
    relay_failure_plan,
)

RCPT = "python@lists.example.org"
RAW = b"From: alice@example.com\r\nTo: python@lists.example.org\r\nSubject: hi\r\n\r\nbody\r\n"


def request() -> MailRequest:
    return MailRequest(Envelope("alice@example.com", (RCPT,), queue_id="Q1"), RAW, from_queue=True)


def test_drop_is_finished_and_sends_nothing() -> None:
    plan = queue_plan(Decision((Outcome(RCPT, Action.DROP),)), request())
    assert plan.finished and plan.send_to == () and plan.data is None and plan.quarantine is None
    assert str(plan) == "remove from the queue"


def test_deliver_sends_the_original_bytes_then_finishes() -> None:
    plan = queue_plan(Decision.deliver_all((RCPT,)), request())
    assert (plan.sender, plan.send_to, plan.finished) == ("alice@example.com", (RCPT,), True)
    assert plan.data is RAW  # never re-serialised
    assert str(plan).startswith("send MAIL FROM:<alice@example.com> to 1 recipient(s) through the relay "
                                "(original bytes)")


def test_changes_and_a_new_sender_are_applied_to_what_is_sent() -> None:
    decision = Decision(Decision.deliver_all((RCPT,)).outcomes,
                        header_changes=(HeaderChange("add", "X-Tag", "yes"),), sender="list-bounce@lists.example.org")
    plan = queue_plan(decision, request())
    assert plan.sender == "list-bounce@lists.example.org"
    assert plan.data is not None and b"X-Tag: yes\r\n" in plan.data and "changed bytes" in str(plan)


def test_redirect_sends_to_the_new_addresses_instead() -> None:
    decision = Decision((Outcome(RCPT, Action.REDIRECT, redirect_to=("a@example.net", "b@example.net")),))
    assert queue_plan(decision, request()).send_to == ("a@example.net", "b@example.net")


def test_a_reject_is_quarantined_with_the_reply_never_bounced() -> None:
    decision = Decision((Outcome(RCPT, Action.REJECT, 550, "5.7.1", "not a member"),))
    plan = queue_plan(decision, request())
    assert plan.quarantine == f"{RCPT}: 550 5.7.1 not a member"
    assert plan.send_to == () and plan.finished and plan.quarantine_envelope


def test_a_handlers_quarantine_keeps_its_reason() -> None:
    decision = Decision((Outcome(RCPT, Action.DROP),), quarantine="looks like spam")
    plan = queue_plan(decision, request())
    assert (plan.quarantine, plan.finished) == ("looks like spam", True)


@pytest.mark.parametrize("attempts", [0, 1, 2, 3])
def test_a_tempfail_waits_with_a_backoff_until_the_poison_limit(attempts: int) -> None:
    decision = Decision.tempfail((RCPT,), "RuntimeError: boom")
    plan = queue_plan(decision, request(), attempts=attempts, poison_limit=5)
    assert plan.retry_after == backoff(attempts) and plan.counts_attempt and plan.quarantine is None
    assert plan.send_to == ()


def test_the_poison_limit_th_failed_attempt_is_quarantined_with_the_reason() -> None:
    plan = queue_plan(Decision.tempfail((RCPT,), "RuntimeError: boom"), request(), attempts=4, poison_limit=5)
    assert plan.finished and plan.quarantine == "5 attempt(s) failed; the last: RuntimeError: boom"


def test_a_poison_limit_of_0_never_quarantines() -> None:
    plan = queue_plan(Decision.tempfail((RCPT,), "boom"), request(), attempts=1000, poison_limit=0)
    assert plan.retry_after == RETRY_MAX and plan.quarantine is None


def test_a_handlers_own_tempfail_gives_its_reply_as_the_reason() -> None:
    decision = Decision((Outcome(RCPT, Action.TEMPFAIL, 451, "4.7.1", "greylisted"),))
    plan = queue_plan(decision, request(), attempts=0, poison_limit=1)
    assert plan.quarantine == "1 attempt(s) failed; the last: 451 4.7.1 greylisted"


def test_backoff_doubles_from_the_first_to_the_most() -> None:
    assert [backoff(n) for n in range(4)] == [RETRY_FIRST, 2 * RETRY_FIRST, 4 * RETRY_FIRST, 8 * RETRY_FIRST]
    assert backoff(10) == backoff(10_000) == RETRY_MAX


def test_an_unreachable_relay_retries_without_counting_an_attempt() -> None:
    plan = relay_failure_plan(attempts=4, poison_limit=5, unreachable=True)
    assert plan.retry_after is not None and not plan.counts_attempt and plan.quarantine is None
    assert "no attempt counted" in str(plan)


def test_a_relay_deferral_counts_like_a_tempfail() -> None:
    deferred = ((RCPT, "452 4.2.2 mailbox full"),)
    assert relay_failure_plan(0, 5, False, deferred).counts_attempt
    last = relay_failure_plan(4, 5, False, deferred)
    assert last.finished and last.quarantine is not None and "452 4.2.2 mailbox full" in last.quarantine


def test_poison_and_no_envelope_are_quarantined_the_latter_without_an_envelope() -> None:
    assert poison_plan(5).quarantine is not None and poison_plan(5).quarantine_envelope
    plan = no_envelope_plan("no Return-Path: line at the top (the envelope sender)")
    assert plan.finished and not plan.quarantine_envelope
    assert plan.quarantine == "no envelope in the queue file: no Return-Path: line at the top (the envelope sender)"
