"""Tests of the {{NAME}} application, in process, with no mail server."""

from pathlib import Path

from lamsonfilter import Action
from lamsonfilter.testing import AppTester

APP = Path(__file__).resolve().parents[1]


def test_first_message_gets_a_reply() -> None:
    t = AppTester.from_directory(APP)
    r = t.send("alice@example.com", "hello@{{HOST}}", subject="Hi")
    assert r.action is Action.DROP
    assert (r.state_before, r.state_after) == ("START", "GREETED")
    [reply] = r.replies
    assert reply["To"] == "alice@example.com"
    assert reply["Auto-Submitted"] == "auto-replied"
    assert r.outbox[0].sender == ""  # auto-replies go out with MAIL FROM:<>


def test_second_message_gets_none() -> None:
    t = AppTester.from_directory(APP)
    t.send("alice@example.com", "hello@{{HOST}}")
    r = t.send("alice@example.com", "hello@{{HOST}}")
    assert r.state_before == "GREETED"
    assert r.outbox == ()


def test_unknown_address_is_refused() -> None:
    t = AppTester.from_directory(APP)
    r = t.send("alice@example.com", "nobody@{{HOST}}")
    assert r.action is Action.REJECT
    assert r.outcome().code == 550


def test_other_domains_pass_untouched() -> None:
    t = AppTester.from_directory(APP)
    r = t.send("alice@example.com", "bob@example.net")
    assert r.action is Action.DELIVER
    assert r.output == r.request.raw
