"""Reply limits by kind of handler: a service answers requests, a responder answers for a person (RFC 3834)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lamsonfilter.fsm import Handler, HandlerError
from lamsonfilter.settings import SettingsError
from lamsonfilter.testing import AppTester
from tests.rig.handlers import handler_source

HANDLERS = handler_source("reply_kinds_handlers")  # tests/fixtures/handlers/reply_kinds_handlers.py


def make_app(tmp_path: Path, settings: str = "") -> Path:
    app = tmp_path / "desk"
    (app / "app" / "handlers").mkdir(parents=True)
    (app / "app" / "templates").mkdir()
    (app / "config").mkdir()
    (app / "app" / "handlers" / "desk.py").write_text(HANDLERS)
    (app / "config" / "settings.py").write_text(f'HOSTS = ["desk.example.org"]\nHANDLERS = ["desk"]\n{settings}')
    return app


def replies(t: AppTester, rcpt: str, n: int) -> list[int]:
    return [len(t.send("alice@example.com", rcpt).replies) for _ in range(n)]


def test_by_default_a_service_answers_every_request_and_a_responder_once_a_week(tmp_path: Path) -> None:
    t = AppTester.from_directory(make_app(tmp_path), now=1_800_000_000.0)
    assert replies(t, "tickets@desk.example.org", 11) == [1] * 10 + [0]  # 10 an hour per sender
    t.advance(3600)
    assert replies(t, "tickets@desk.example.org", 1) == [1]
    assert replies(t, "bob@desk.example.org", 3) == [1, 0, 0]  # RFC 3834: one per 7 days
    t.advance(6 * 24 * 3600)
    assert replies(t, "bob@desk.example.org", 1) == [0]
    t.advance(24 * 3600)
    assert replies(t, "bob@desk.example.org", 1) == [1]


def test_a_handler_knows_when_its_reply_will_not_be_sent(tmp_path: Path) -> None:
    t = AppTester.from_directory(make_app(tmp_path), now=1_800_000_000.0)
    first = t.send("alice@example.com", "bob@desk.example.org")
    assert "could reply: True; reply sent: True" in first.decision.notes
    second = t.send("alice@example.com", "bob@desk.example.org")
    assert "could reply: False; reply sent: False" in second.decision.notes
    robot = t.send("alice@example.com", "tickets@desk.example.org", headers={"Precedence": "bulk"})
    assert "reply sent: False" in robot.decision.notes


@pytest.mark.parametrize(
    ("setting", "desk", "away"),
    [
        ("REPLY_LIMIT = (2, 3600)", 2, 2),                              # a pair: every handler
        ("REPLY_LIMIT = {'service': (3, 3600)}", 3, 1),                 # by kind; the other keeps its default
        ("REPLY_LIMIT = {'away': (4, 3600), 'service': (2, 3600)}", 2, 4),  # by handler name
    ],
)
def test_reply_limit_setting_by_pair_kind_or_handler(tmp_path: Path, setting: str, desk: int, away: int) -> None:
    t = AppTester.from_directory(make_app(tmp_path, setting + "\n"), now=1_800_000_000.0)
    assert sum(replies(t, "tickets@desk.example.org", 6)) == desk
    assert sum(replies(t, "bob@desk.example.org", 6)) == away


def test_bad_reply_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="REPLY_LIMIT names 'desks'"):
        AppTester.from_directory(make_app(tmp_path, "REPLY_LIMIT = {'desks': (3, 3600)}\n"))
    with pytest.raises(HandlerError, match="replies must be 'service' or 'responder'"):
        Handler("x", replies="vacation")


def test_the_skeleton_says_which_limit_applies_and_greets_a_sender_only_once_a_reply_went(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from lamsonfilter.cli import main

    app = tmp_path / "hello"
    assert CliRunner().invoke(main, ["gen", "hello", "--dest", str(app)]).exit_code == 0
    handler = (app / "app" / "handlers" / "hello.py").read_text()
    assert 'Handler("hello", replies="service")' in handler and 'replies="responder"' in handler
    assert "REPLY_LIMIT" in (app / "config" / "settings.py").read_text()
    t = AppTester.from_directory(app)
    robot = t.send("alice@example.com", "hello@hello.example.org", headers={"Auto-Submitted": "auto-generated"})
    assert robot.outbox == () and robot.state_after == "START"  # no reply went: not GREETED yet
    person = t.send("alice@example.com", "hello@hello.example.org")
    assert len(person.replies) == 1 and person.state_after == "GREETED"
