"""The example help desk, flow by flow, with lamsonfilter's testing helpers (no mail server).

Each test gets its own in-memory SQLite database with the framework's tables
and the help desk's (``app/models.py``); ``t.db()`` reads the rows.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest
from sqlalchemy import func, select

from lamsonfilter import Action
from lamsonfilter.testing import AppTester

APP = Path(__file__).resolve().parents[1]
HOST = "support.example.org"
SUPPORT = f"support@{HOST}"
STAFF = "staff@example.com"
NOW = 1_800_000_000.0


@pytest.fixture
def t():
    return AppTester.from_directory(APP, now=NOW)


def models(t):
    """The classes of the help desk's models, as the tester loaded them."""
    handler = next(h for h in t.app.handlers if h.name == "helpdesk")
    g = handler.states["NEW"].__globals__
    return g["Ticket"], g["TicketMessage"]


def ticket(t, number):
    Ticket, _ = models(t)
    with t.db() as db:
        row = db.scalar(select(Ticket).where(Ticket.number == number))
        if row is not None:
            db.expunge(row)
        return row


def messages(t, number):
    Ticket, TicketMessage = models(t)
    with t.db() as db:
        rows = db.scalars(select(TicketMessage).join(Ticket).where(Ticket.number == number)
                          .order_by(TicketMessage.id)).all()
        for row in rows:
            db.expunge(row)
        return rows


def count(t, model):
    with t.db() as db:
        return db.scalar(select(func.count()).select_from(model))


def open_ticket(t, who="alice@example.com", subject="The printer prints blank pages", body="Please help.\n"):
    r = t.send(who, SUPPORT, subject=subject, body=body)
    [reply] = r.replies
    number = int(reply["Subject"].split("]")[0].removeprefix("[#"))
    return r, number


def aware(dt):
    """SQLite gives naive datetimes back; PostgreSQL aware ones."""
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


# ------------------------------------------------------------------ opening

def test_support_opens_a_numbered_ticket_and_answers_with_its_number(t):
    r = t.send("Alice@Example.com", SUPPORT, subject="The printer prints blank pages",
               body="Since this morning.\n")
    assert r.route == "helpdesk.NEW" and r.action is Action.DROP
    [reply] = r.replies
    assert reply["To"] == "Alice@Example.com"
    assert reply["Subject"] == "[#1] The printer prints blank pages"
    assert reply["From"].addresses[0].addr_spec == f"support+ticket-1@{HOST}"  # replies go to the ticket
    assert reply["Auto-Submitted"] == "auto-replied"
    assert f"support+close-1@{HOST}" in reply.get_content()

    row = ticket(t, 1)
    assert (row.number, row.requester, row.subject, row.status) == (
        1, "alice@example.com", "The printer prints blank pages", "open")
    assert aware(row.opened_at) == datetime.fromtimestamp(NOW, timezone.utc) and row.closed_at is None
    [kept] = messages(t, 1)
    assert kept.sender == "alice@example.com" and kept.subject == "The printer prints blank pages"
    assert kept.body == "Since this morning.\n"
    assert kept.raw == r.request.raw  # the bytes as received
    assert kept.message_id == r.request.message["Message-ID"]
    assert t.state("helpdesk", "ticket:1") == "OPEN"


def test_the_staff_gets_a_copy_of_a_new_ticket(t):
    r, number = open_ticket(t, body="Since this morning.\n")
    [copy] = r.messages
    assert copy["To"] == STAFF
    assert copy["Subject"] == f"[#{number}] The printer prints blank pages"
    assert copy["From"].addresses[0].addr_spec == f"support+ticket-{number}@{HOST}"  # the staff answers there
    assert "Since this morning." in copy.get_content()
    [out] = [m for m in r.outbox if m.kind == "message"]
    assert out.sender == SUPPORT and out.recipients == (STAFF,)


def test_numbers_come_from_the_database_one_per_ticket(t):
    numbers = [open_ticket(t, who)[1] for who in ("a@example.com", "b@example.net", "a@example.com")]
    assert numbers == [1, 2, 3]
    Ticket, _ = models(t)
    with t.db() as db:
        assert db.scalars(select(Ticket.requester).order_by(Ticket.number)).all() == [
            "a@example.com", "b@example.net", "a@example.com"]


def test_automated_mail_opens_no_ticket(t):
    r = t.send("carol@example.org", SUPPORT, subject="Out of office",
               headers={"Auto-Submitted": "auto-replied"})
    assert r.action is Action.DROP and r.outbox == ()
    assert any("opens no ticket" in n for n in r.decision.notes)
    Ticket, TicketMessage = models(t)
    assert count(t, Ticket) == 0 and count(t, TicketMessage) == 0


def test_a_bounce_to_support_opens_no_ticket(t):
    r = t.send("", SUPPORT, subject="Undelivered Mail Returned to Sender")
    assert r.outbox == () and count(t, models(t)[0]) == 0


def test_a_subject_with_line_breaks_is_kept_on_one_line(t):
    raw = (b"From: a@example.com\r\nTo: " + SUPPORT.encode() + b"\r\n"
           b"Subject: =?UTF-8?Q?help=0D=0ABcc:_victim@example.net?=\r\n"
           b"Message-ID: <x@example.com>\r\n\r\nbody\r\n")
    r = t.send("a@example.com", SUPPORT, raw=raw)
    row = ticket(t, 1)
    assert "\n" not in row.subject and "\r" not in row.subject
    [reply] = r.replies
    assert reply.get_all("Bcc") is None


def test_a_failure_leaves_no_ticket_no_state_and_no_reply(t, monkeypatch):
    """The rows are in the message's transaction: a handler that fails after writing them keeps nothing."""
    handler = next(h for h in t.app.handlers if h.name == "helpdesk")

    def boom(*args, **kwargs):
        raise RuntimeError("the staff notification failed")

    monkeypatch.setitem(handler.states["NEW"].__globals__, "_send_on", boom)
    r = t.send("alice@example.com", SUPPORT, subject="help", expect_tempfail=True)
    assert r.decision.is_tempfail and isinstance(r.error, RuntimeError)
    Ticket, TicketMessage = models(t)
    assert count(t, Ticket) == 0 and count(t, TicketMessage) == 0
    assert t.state("helpdesk", "ticket:1") is None
    monkeypatch.undo()
    assert open_ticket(t)[1] == 1  # the retry opens the ticket


# ------------------------------------------------------------------ replies

def test_a_reply_of_the_requester_is_kept_and_sent_to_the_staff(t):
    _, number = open_ticket(t)
    r = t.send("alice@example.com", f"support+ticket-{number}@{HOST}", subject=f"Re: [#{number}] printer",
               body="It is the one near the kitchen.\n")
    assert r.route == "helpdesk.reply" and (r.state_before, r.state_after) == ("OPEN", "OPEN")
    assert r.replies == []  # no acknowledgement of every reply
    [copy] = r.messages
    assert copy["To"] == STAFF and "near the kitchen" in copy.get_content()
    assert [m.body for m in messages(t, number)] == ["Please help.\n", "It is the one near the kitchen.\n"]


def test_the_staffs_answer_is_kept_and_sent_to_the_requester(t):
    _, number = open_ticket(t)
    r = t.send(STAFF.upper(), f"support+ticket-{number}@{HOST}", subject=f"Re: [#{number}] printer",
               body="Try turning it off and on.\n")
    [answer] = r.messages
    assert answer["To"] == "alice@example.com"
    assert answer["Subject"] == f"[#{number}] The printer prints blank pages"
    assert answer["From"].addresses[0].addr_spec == f"support+ticket-{number}@{HOST}"
    assert "Try turning it off and on." in answer.get_content()
    assert [m.sender for m in messages(t, number)] == ["alice@example.com", STAFF]


def test_a_stranger_may_not_write_to_a_ticket(t):
    _, number = open_ticket(t)
    r = t.send("mallory@example.net", f"support+ticket-{number}@{HOST}", body="close\n")
    [refusal] = r.replies
    assert "only the person who opened ticket" in refusal.get_content()
    assert "printer" not in refusal.get_content()  # nothing of the ticket is told
    assert r.messages == [] and r.state_after == "OPEN"
    assert len(messages(t, number)) == 1 and ticket(t, number).status == "open"


def test_a_reply_to_an_unknown_ticket_gets_a_clear_answer(t):
    r = t.send("bob@example.net", f"support+ticket-42@{HOST}", subject="Re: [#42] old")
    assert (r.state_before, r.state_after) == ("START", "START")
    [answer] = r.replies
    assert "there is no ticket #42" in answer.get_content() and SUPPORT in answer.get_content()
    assert answer["From"].addresses[0].addr_spec == SUPPORT  # replying to it opens a ticket, as it says
    assert count(t, models(t)[1]) == 0
    assert t.state("helpdesk", "ticket:42") is None


def test_a_ticket_number_with_a_leading_zero_or_too_many_digits_is_no_route(t):
    assert t.app.router.match(f"support+ticket-01@{HOST}") is None
    assert t.app.router.match(f"support+close-1234567890@{HOST}") is None  # 10 digits: beyond INTEGER
    r = t.send("bob@example.net", f"support+ticket-999999999@{HOST}")
    assert "there is no ticket #999999999" in r.replies[0].get_content()


# ------------------------------------------------------------------ closing

def test_close_on_the_first_line_of_a_reply_closes_the_ticket(t):
    _, number = open_ticket(t)
    t.advance(3600)
    r = t.send("alice@example.com", f"support+ticket-{number}@{HOST}", subject="Re: it works",
               body="\nClose\n\nThanks, it works again.\n")
    assert (r.state_before, r.state_after) == ("OPEN", "CLOSED")
    [answer] = r.replies
    assert answer["Subject"] == f"Closed: [#{number}] The printer prints blank pages"
    assert f"ticket #{number}" in answer.get_content() and "is closed" in answer.get_content()
    [notice] = r.messages
    assert notice["To"] == STAFF and "alice@example.com closed ticket" in notice.get_content()
    row = ticket(t, number)
    assert row.status == "closed" and aware(row.closed_at) == datetime.fromtimestamp(NOW + 3600, timezone.utc)
    assert len(messages(t, number)) == 2  # the closing message is kept too


def test_the_close_address_closes_and_the_requester_hears_of_it(t):
    _, number = open_ticket(t)
    r = t.send(STAFF, f"support+close-{number}@{HOST}", subject="done")
    assert r.route == "helpdesk.close" and r.state_after == "CLOSED"
    assert r.replies[0]["To"] == STAFF
    [notice] = r.messages
    assert notice["To"] == "alice@example.com" and f"{STAFF} closed ticket #{number}" in notice.get_content()
    assert ticket(t, number).status == "closed"


def test_a_message_to_a_closed_ticket_is_not_kept_and_says_so(t):
    _, number = open_ticket(t)
    t.send("alice@example.com", f"support+close-{number}@{HOST}")
    r = t.send("alice@example.com", f"support+ticket-{number}@{HOST}", body="one more thing\n")
    assert (r.state_before, r.state_after) == ("CLOSED", "CLOSED")
    [answer] = r.replies
    assert "was closed" in answer.get_content() and SUPPORT in answer.get_content()
    assert answer["From"].addresses[0].addr_spec == SUPPORT  # replying to it opens a new ticket
    assert r.messages == [] and len(messages(t, number)) == 2
    again = t.send("alice@example.com", f"support+close-{number}@{HOST}")
    assert "was closed" in again.replies[0].get_content()


def test_a_stranger_may_not_close_a_ticket(t):
    _, number = open_ticket(t)
    r = t.send("mallory@example.net", f"support+close-{number}@{HOST}")
    assert r.state_after == "OPEN" and ticket(t, number).status == "open"
    assert "only the person who opened" in r.replies[0].get_content()


def test_tickets_are_independent(t):
    _, first = open_ticket(t, "a@example.com")
    _, second = open_ticket(t, "b@example.net")
    t.send("a@example.com", f"support+close-{first}@{HOST}")
    assert ticket(t, first).status == "closed" and ticket(t, second).status == "open"
    assert t.state("helpdesk", f"ticket:{second}") == "OPEN"
    # b cannot touch a's ticket, a cannot touch b's
    assert "only the person" in t.send("a@example.com", f"support+ticket-{second}@{HOST}").replies[0].get_content()


def test_staff_must_be_a_list_of_addresses():
    t = AppTester.from_directory(APP, overrides={"STAFF": "staff@example.com"}, now=NOW)
    r = t.send("alice@example.com", SUPPORT, expect_tempfail=True)
    assert isinstance(r.error, TypeError) and "settings.STAFF must be a list of addresses" in str(r.error)
    t = AppTester.from_directory(APP, overrides={"STAFF": []}, now=NOW)  # nobody: tickets are still opened
    assert open_ticket(t)[0].messages == []
