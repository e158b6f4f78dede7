"""The auto-reply guards: refusals, reply headers, the per-sender rate limit."""

from __future__ import annotations

import pytest

from lamsonfilter.automated import classify
from lamsonfilter.decisions import check_header_value
from lamsonfilter.guards import (
    GENERATED_HEADER,
    ReplyBudget,
    ReplyRateLimit,
    autoreply_refusal,
    is_automated_sender,
    reply_headers,
)
from lamsonfilter.mail import Envelope, MailRequest
from lamsonfilter.memorystore import MemoryStorage
from lamsonfilter.state import StateRecord
from lamsonfilter.views import Response


def make_request(
    *headers: tuple[str, str],
    sender: str = "alice@example.org",
    body: str = "Hello, is this the help desk?\r\n",
    content_type: str | None = None,
) -> MailRequest:
    lines = [
        "From: Alice <alice@example.org>",
        "To: help@example.net",
        "Subject: A question",
        "Message-ID: <q1@example.org>",
    ]
    lines += [f"{name}: {value}" for name, value in headers]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    raw = ("\r\n".join(lines) + "\r\n\r\n" + body).encode("utf-8")
    return MailRequest(Envelope(sender, ("help@example.net",)), raw)


def test_ordinary_mail_may_be_answered() -> None:
    assert autoreply_refusal(make_request()) is None


# --------------------------------------------------------------------- senders
def test_null_sender_is_refused() -> None:
    refusal = autoreply_refusal(make_request(sender="<>"))
    assert refusal is not None and "null sender" in refusal


@pytest.mark.parametrize(
    "sender",
    [
        "MAILER-DAEMON@example.org",
        "mailer-daemon@example.org",
        "Mailer_Daemon@example.org",
        "postmaster@example.org",
        "Post_Master@example.org",
        "bounce@example.org",
        "bounces@example.org",
        "bounces+alice=example.org@lists.example.net",
        "bounce-12345-678@mail.example.com",
        "python-list-bounces@python.org",
        "python-list-bounces+alice=example.org@python.org",
        "news-bounce@example.com",
        "noreply@example.com",
        "no-reply@example.com",
        "no_reply@example.com",
        "NoReply.Notifications@example.com",
        "donotreply@example.com",
        "do-not-reply@example.com",
        "owner-python-list@python.org",
        "python-list-owner@python.org",
        "python-list-request@python.org",
        "listserv@lists.example.edu",
        "majordomo@example.org",
    ],
)
def test_automated_envelope_senders_are_refused(sender: str) -> None:
    assert is_automated_sender(sender)
    refusal = autoreply_refusal(make_request(sender=sender))
    assert refusal is not None and "automated sender" in refusal


@pytest.mark.parametrize(
    "sender",
    [
        "alice@example.org",
        "bouncer@example.org",
        "reply@example.org",
        "postmasters@example.org",
        "nora@example.org",
        "bob.owner@example.org",
    ],
)
def test_people_are_not_automated_senders(sender: str) -> None:
    assert not is_automated_sender(sender)
    assert autoreply_refusal(make_request(sender=sender)) is None


@pytest.mark.parametrize(
    "from_value",
    [
        "Mail Delivery System <MAILER-DAEMON@example.org>",
        "postmaster@example.org",
        "Example Shop <no-reply@shop.example>",
        "mailer-daemon",
    ],
)
def test_automated_from_header_is_refused_even_with_a_normal_envelope(from_value: str) -> None:
    raw = (
        f"From: {from_value}\r\nTo: help@example.net\r\nSubject: hi\r\n\r\nbody\r\n"
    ).encode()
    request = MailRequest(Envelope("someone@example.net", ("help@example.net",)), raw)
    refusal = autoreply_refusal(request)
    assert refusal is not None and "From" in refusal


def test_return_path_header_null_is_refused() -> None:
    refusal = autoreply_refusal(make_request(("Return-Path", "<>")))
    assert refusal == "Return-Path: <>"


# --------------------------------------------------------------------- headers
@pytest.mark.parametrize(
    "value", ["auto-replied", "auto-generated", "auto-notified", "Auto-Generated (failure)", ""]
)
def test_auto_submitted_other_than_no_is_refused(value: str) -> None:
    refusal = autoreply_refusal(make_request(("Auto-Submitted", value)))
    assert refusal is not None and refusal.startswith("Auto-Submitted")


@pytest.mark.parametrize("value", ["no", "No", "no (a person wrote this)"])
def test_auto_submitted_no_is_allowed(value: str) -> None:
    assert autoreply_refusal(make_request(("Auto-Submitted", value))) is None


@pytest.mark.parametrize("value", ["bulk", "list", "junk", "BULK", " Bulk "])
def test_bulk_precedence_is_refused(value: str) -> None:
    refusal = autoreply_refusal(make_request(("Precedence", value)))
    assert refusal is not None and refusal.startswith("Precedence")


def test_other_precedence_is_allowed() -> None:
    assert autoreply_refusal(make_request(("Precedence", "first-class"))) is None


@pytest.mark.parametrize(
    "header",
    [
        ("List-Id", "Python list <python-list.python.org>"),
        ("List-Unsubscribe", "<mailto:python-list-leave@python.org>"),
        ("List-Post", "<mailto:python-list@python.org>"),
        ("list-id", "lower-case name <x.example.org>"),
        ("List-Help", "<mailto:help@example.org>"),
    ],
)
def test_mailing_list_mail_is_refused(header: tuple[str, str]) -> None:
    refusal = autoreply_refusal(make_request(header))
    assert refusal is not None and "mailing list" in refusal


@pytest.mark.parametrize("value", ["All", "AutoReply", "OOF", "DR, OOF", "dr,autoreply"])
def test_x_auto_response_suppress_is_honoured(value: str) -> None:
    refusal = autoreply_refusal(make_request(("X-Auto-Response-Suppress", value)))
    assert refusal is not None and refusal.startswith("X-Auto-Response-Suppress")


def test_x_auto_response_suppress_for_other_kinds_is_allowed() -> None:
    assert autoreply_refusal(make_request(("X-Auto-Response-Suppress", "DR, RN, NRN"))) is None


def test_mail_lamsonfilter_generated_is_never_answered() -> None:
    refusal = autoreply_refusal(make_request((GENERATED_HEADER, "myapp")))
    assert refusal == "generated by lamsonfilter"
    # also when the name is spelled differently
    assert autoreply_refusal(make_request(("x-lamsonfilter-generated", "myapp"))) is not None


def test_other_autoresponder_marks_are_refused() -> None:
    assert autoreply_refusal(make_request(("X-Autoreply", "yes"))) is not None


# --------------------------------------------------------------------- reports
DSN_BODY = (
    "--b\r\n"
    "Content-Type: text/plain\r\n\r\n"
    "Your message could not be delivered.\r\n"
    "--b\r\n"
    "Content-Type: message/delivery-status\r\n\r\n"
    "Reporting-MTA: dns; mx.example.net\r\n\r\n"
    "Final-Recipient: rfc822; gone@example.net\r\n"
    "Action: failed\r\n"
    "Status: 5.1.1\r\n\r\n"
    "--b--\r\n"
)


def test_a_dsn_is_refused_even_from_a_normal_sender() -> None:
    request = make_request(
        sender="relay@example.net",
        content_type='multipart/report; report-type=delivery-status; boundary="b"',
        body=DSN_BODY,
    )
    assert autoreply_refusal(request) == "bounce (dsn)"


def test_a_read_receipt_is_refused() -> None:
    body = (
        "--b\r\nContent-Type: text/plain\r\n\r\nYour message was displayed.\r\n"
        "--b\r\nContent-Type: message/disposition-notification\r\n\r\n"
        "Final-Recipient: rfc822; bob@example.net\r\n"
        "Disposition: manual-action/MDN-sent-manually; displayed\r\n\r\n"
        "--b--\r\n"
    )
    request = make_request(
        content_type='multipart/report; report-type=disposition-notification; boundary="b"',
        body=body,
    )
    refusal = autoreply_refusal(request)
    assert refusal is not None and "multipart/report" in refusal


def test_a_non_standard_bounce_is_refused() -> None:
    raw = (
        b"From: Mail Delivery System <notify@mx.example.net>\r\n"
        b"To: alice@example.org\r\n"
        b"Subject: Undeliverable: A question\r\n\r\n"
        b"Delivery has failed to these recipients: gone@example.net\r\n"
    )
    request = MailRequest(Envelope("x@mx.example.net", ("alice@example.org",)), raw)
    # the display name already gives it away; the body makes it a bounce with a report
    assert autoreply_refusal(request) == "automated sender From: Mail Delivery System"
    found = classify(request)
    assert found is not None and found.reason == "bounce (heuristic)"
    assert found.report is not None and found.report.addresses == ("gone@example.net",)


def test_garbage_never_raises() -> None:
    for raw in (b"", b"\r\n\r\n", b"::::\r\n", b"\xff\xfe\x00", b"Content-Type: multipart/report\r\n\r\n--"):
        request = MailRequest(Envelope("a@example.org", ("b@example.org",)), raw)
        refusal = autoreply_refusal(request)
        assert refusal is None or isinstance(refusal, str)


# --------------------------------------------------------------------- reply headers
def test_reply_headers_thread_the_reply() -> None:
    headers = reply_headers(make_request())
    assert headers["Auto-Submitted"] == "auto-replied"
    assert headers["In-Reply-To"] == "<q1@example.org>"
    assert headers["References"] == "<q1@example.org>"


def test_references_extend_the_original_references() -> None:
    request = make_request(("References", "<a@x.test> <b@x.test>"), ("In-Reply-To", "<b@x.test>"))
    assert reply_headers(request)["References"] == "<a@x.test> <b@x.test> <q1@example.org>"


def test_in_reply_to_is_used_when_there_are_no_references() -> None:
    request = make_request(("In-Reply-To", "<parent@x.test>"))
    assert reply_headers(request)["References"] == "<parent@x.test> <q1@example.org>"


def test_very_long_references_are_trimmed_keeping_first_and_latest() -> None:
    ids = [f"<{i:04d}.{'x' * 40}@example.org>" for i in range(100)]
    request = make_request(("References", " ".join(ids)))
    refs = reply_headers(request)["References"].split()
    assert refs[0] == ids[0]
    assert refs[-2:] == [ids[-1], "<q1@example.org>"]
    assert len(" ".join(refs)) <= 998


@pytest.mark.parametrize(
    "message_id", ["no-angle@example.org", "<no-at-sign>", "<has space@x.test>", "<>", "<a@b", ""]
)
def test_malformed_message_ids_are_skipped(message_id: str) -> None:
    raw = (
        f"From: alice@example.org\r\nTo: help@example.net\r\nSubject: s\r\n"
        f"Message-ID: {message_id}\r\n\r\nbody\r\n"
    ).encode()
    headers = reply_headers(MailRequest(Envelope("alice@example.org", ("help@example.net",)), raw))
    assert "In-Reply-To" not in headers and "References" not in headers
    assert headers["Auto-Submitted"] == "auto-replied"


def test_missing_message_id() -> None:
    raw = b"From: alice@example.org\r\nSubject: s\r\n\r\nbody\r\n"
    headers = reply_headers(MailRequest(Envelope("alice@example.org", ("h@example.net",)), raw))
    assert "In-Reply-To" not in headers


def test_hostile_references_never_reach_the_reply() -> None:
    request = make_request(("References", "<a@x.test> =?utf-8?q?=0D=0ABcc:_v@x.test?= <b@x.test>"))
    headers = reply_headers(request)
    assert headers["References"] == "<a@x.test> <b@x.test> <q1@example.org>"


def test_reply_headers_are_valid_header_values_for_a_response() -> None:
    headers = reply_headers(make_request(("References", "<a@x.test>")))
    response = Response(To="alice@example.org", From="help@example.net", Subject="Re: A question")
    for name, value in headers.items():
        check_header_value(name, value)
        response[name] = value
    raw = response.to_bytes()
    assert b"\r\nAuto-Submitted: auto-replied\r\n" in raw
    assert b"\r\nIn-Reply-To: <q1@example.org>\r\n" in raw
    # and the reply itself would never be answered
    reply = MailRequest(Envelope("", ("alice@example.org",)), raw)
    assert autoreply_refusal(reply) is not None
    reply_from_person = MailRequest(Envelope("help@example.net", ("alice@example.org",)), raw)
    assert autoreply_refusal(reply_from_person) == "Auto-Submitted: auto-replied"


# --------------------------------------------------------------------- rate limit
def test_rate_limit_counts_per_sender_per_window() -> None:
    storage = MemoryStorage()
    limit = ReplyRateLimit(2, 100.0)
    results = []
    for now in (0.0, 1.0, 2.0, 99.9, 100.0, 101.0, 150.0):
        with storage.transaction() as tx:
            results.append(limit.allow(tx, "alice@example.org", now))
    assert results == [True, True, False, False, True, True, False]


def test_rate_limit_storage_layout() -> None:
    storage = MemoryStorage()
    limit = ReplyRateLimit(3, 60)
    with storage.transaction() as tx:
        assert limit.allow(tx, "Alice@Example.ORG", 10.0)
        assert limit.allow(tx, "alice@example.org", 11.0)
    with storage.transaction() as tx:
        record = tx.get("lamsonfilter:rate:alice@example.org")
    assert record == StateRecord("RATE", {"start": 10.0, "count": 2})


def test_rate_limit_senders_are_independent_and_case_insensitive() -> None:
    storage = MemoryStorage()
    limit = ReplyRateLimit(1, 60)
    with storage.transaction() as tx:
        assert limit.allow(tx, "alice@example.org", 0)
        assert not limit.allow(tx, "ALICE@example.org", 1)
        assert limit.allow(tx, "bob@example.org", 1)


def test_rate_limit_rolled_back_transaction_does_not_count() -> None:
    storage = MemoryStorage()
    limit = ReplyRateLimit(1, 60)
    with storage.transaction(commit=False) as tx:
        assert limit.allow(tx, "alice@example.org", 0)
    with storage.transaction() as tx:
        assert limit.allow(tx, "alice@example.org", 1)
    with storage.transaction() as tx:
        assert not limit.allow(tx, "alice@example.org", 2)


def test_rate_limit_zero_never_allows_and_refusals_do_not_store() -> None:
    storage = MemoryStorage()
    limit = ReplyRateLimit(0, 60)
    with storage.transaction() as tx:
        assert not limit.allow(tx, "alice@example.org", 0)
        assert tx.get("lamsonfilter:rate:alice@example.org") is None


def test_rate_limit_null_sender_is_never_allowed() -> None:
    with MemoryStorage().transaction() as tx:
        assert not ReplyRateLimit(5, 60).allow(tx, "", 0)


def test_rate_limit_clock_going_backwards_starts_a_new_window() -> None:
    storage = MemoryStorage()
    limit = ReplyRateLimit(1, 60)
    with storage.transaction() as tx:
        assert limit.allow(tx, "a@example.org", 1000)
        assert not limit.allow(tx, "a@example.org", 1001)
        assert limit.allow(tx, "a@example.org", 10)
        record = tx.get(limit.key("a@example.org"))
    assert record is not None and record.data == {"start": 10, "count": 1}


def test_reply_budget_does_not_reset_back_and_forth_at_a_minute_boundary() -> None:
    """Messages processed at once straddle a minute boundary out of order: 59.99 after 60.01 must
    not start the previous minute again (each switch back and forth would reset the count)."""
    budget = ReplyBudget(2, 2)
    assert budget.allow("a@x.example", 60.01)
    assert budget.allow("b@x.example", 59.99)
    assert not budget.allow("c@x.example", 60.02)  # 2 in this minute already
    assert not budget.allow("d@x.example", 59.98)
    assert budget.allow("e@x.example", 120.0)  # the next minute starts afresh


def test_rate_limit_counts_a_message_that_began_earlier_but_commits_later() -> None:
    """Two messages from one sender processed at once: the one that began first (now=999.8) commits
    second, after the other started the window at 1000.0.  It is inside the window: no second reply
    (seen under load in tests/reliability/test_checklist.py::test_a3..., two replies for five
    messages, when `now < start` still counted as a clock going backwards)."""
    storage = MemoryStorage()
    limit = ReplyRateLimit(1, 7 * 24 * 3600)
    with storage.transaction() as tx:
        assert limit.allow(tx, "a@example.org", 1000.0)
    with storage.transaction() as tx:
        assert not limit.allow(tx, "a@example.org", 999.8)
    with storage.transaction() as tx:
        assert not limit.allow(tx, "a@example.org", 1000.0 - 7 * 24 * 3600 + 1)  # less than a period back


@pytest.mark.parametrize(
    "record", [StateRecord("OTHER", {}), StateRecord("RATE", {"start": "x", "count": 9})]
)
def test_rate_limit_damaged_or_foreign_records_start_over(record: StateRecord) -> None:
    storage = MemoryStorage()
    limit = ReplyRateLimit(1, 60)
    with storage.transaction() as tx:
        tx.set(limit.key("a@example.org"), record.state, record.data)
        assert limit.allow(tx, "a@example.org", 5)
        assert tx.get(limit.key("a@example.org")) == StateRecord("RATE", {"start": 5, "count": 1})


@pytest.mark.parametrize("args", [(-1, 60), (1, 0), (1, -5), (1.5, 60), (True, 60)])
def test_rate_limit_configuration_is_checked(args: tuple[object, float]) -> None:
    with pytest.raises(ValueError):
        ReplyRateLimit(*args)  # type: ignore[arg-type]


# ---------------------------------------------------------------- per responder, budget (A3, A5)
def test_rate_limit_is_per_responder_and_sender() -> None:
    from lamsonfilter.guards import ReplyRateLimit
    from lamsonfilter.memorystore import MemoryStorage

    limit = ReplyRateLimit(1, 7 * 24 * 3600)
    storage = MemoryStorage()
    with storage.transaction() as tx:
        assert limit.allow(tx, "alice@example.com", 0.0, responder="helpdesk")
        assert not limit.allow(tx, "alice@example.com", 10.0, responder="helpdesk")
        assert limit.allow(tx, "alice@example.com", 10.0, responder="vacation")
        assert limit.allow(tx, "bob@example.com", 10.0, responder="helpdesk")
        assert limit.allow(tx, "alice@example.com", 7 * 24 * 3600.0, responder="helpdesk")


def test_reply_budget_caps_total_and_per_domain_per_minute() -> None:
    from lamsonfilter.guards import ReplyBudget

    b = ReplyBudget(per_minute=5, per_domain=2)
    assert [b.allow(f"u{i}@victim.example", 60.0) for i in range(3)] == [True, True, False]
    assert [b.allow(f"u{i}@d{i}.example", 61.0) for i in range(4)] == [True, True, True, False]
    assert b.allow("u@victim.example", 120.0)  # a new minute


def test_forged_subscription_flood_is_bounded_by_the_budget() -> None:
    """A5: 1000 subscriptions with distinct forged senders -> replies <= budget, the rest noted."""
    from pathlib import Path

    from lamsonfilter.testing import AppTester

    app = Path(__file__).resolve().parents[1] / "examples" / "mailinglist"
    t = AppTester.from_directory(app, overrides={"REPLY_BUDGET": (50, 10)}, now=6000.0)
    replies = suppressed = 0
    for i in range(1000):
        r = t.send(f"victim{i}@domain{i % 20}.example", "python-subscribe@lists.example.org")
        replies += len(r.replies)
        suppressed += sum("reply budget" in n for n in r.decision.notes)
    assert replies == 50 and suppressed == 950
