"""A handler's exception: one log line with file and line, the traceback at DEBUG; AppTester raises it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from lamsonfilter.testing import AppTester

HANDLER = '''\
from lamsonfilter import Handler

handler = Handler("broken")


@handler.route("hello@(host)")
def START(ctx, host):
    return helper(ctx.data)


def helper(data):
    return data["count"] + 1
'''


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    app = tmp_path / "broken"
    (app / "app" / "handlers").mkdir(parents=True)
    (app / "config").mkdir()
    (app / "app" / "templates").mkdir()
    (app / "app" / "handlers" / "broken.py").write_text(HANDLER)
    (app / "config" / "settings.py").write_text('HOSTS = ["broken.example.org"]\nHANDLERS = ["broken"]\n')
    return app


def test_apptester_raises_the_handlers_exception(app_dir: Path) -> None:
    t = AppTester.from_directory(app_dir)
    with pytest.raises(KeyError, match="count") as info:
        t.send("alice@example.com", "hello@broken.example.org")
    assert info.traceback[-1].name == "helper"  # the test fails where the bug is


def test_the_tempfail_is_there_when_asked_for(app_dir: Path) -> None:
    r = AppTester.from_directory(app_dir).send("alice@example.com", "hello@broken.example.org", expect_tempfail=True)
    assert r.decision.is_tempfail and isinstance(r.error, KeyError)
    r = AppTester.from_directory(app_dir, raise_errors=False).send("a@example.com", "hello@broken.example.org")
    assert r.outcome().reply == "451 4.3.0 Temporary failure, try again later"


def test_one_log_line_names_file_and_line_the_traceback_only_at_debug(
    app_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    t = AppTester.from_directory(app_dir, raise_errors=False)
    with caplog.at_level(logging.INFO, logger="lamsonfilter"):
        r = t.send("alice@example.com", "hello@broken.example.org", queue_id="4XyZ")
    [line] = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert line == ("queue_id=4XyZ handler=broken.START rcpt=hello@broken.example.org "
                    "tempfail: KeyError: 'count' at app/handlers/broken.py:12 in helper")
    assert "Traceback" not in caplog.text
    assert r.decision.error == "broken.START: KeyError: 'count' at app/handlers/broken.py:12 in helper"
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="lamsonfilter"):
        t.send("alice@example.com", "hello@broken.example.org", queue_id="4XyZ")
    [debug] = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.DEBUG and "traceback" in
               rec.getMessage()]
    assert debug.startswith("queue_id=4XyZ handler=broken.START rcpt=hello@broken.example.org traceback:\n"
                            "Traceback (most recent call last):")
    assert 'return data["count"] + 1' in debug and "KeyError: 'count'" in debug
