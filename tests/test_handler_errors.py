"""A handler's exception: one log line with file and line, the traceback at DEBUG; AppTester raises it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from lamsonfilter.testing import AppTester
from tests.rig.handlers import handler_source

HANDLER = handler_source("broken")  # tests/fixtures/handlers/broken.py: the tests assert its line numbers


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


def _run_smtpproxy_and_send(app_dir: Path, verbose: bool) -> str:
    """Start the real content filter, send one message to the failing route, stop it; its log."""
    import os
    import select
    import signal
    import smtplib
    import subprocess
    import sys

    from tests.rig.postfix import free_port

    port = free_port()
    args = [sys.executable, "-m", "lamsonfilter", *(["-v"] if verbose else []), "smtpproxy", "--app", str(app_dir),
            "--listen", f"127.0.0.1:{port}", "--reinject", f"127.0.0.1:{free_port()}", "--database", "memory:"]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    log = b""
    try:
        fd = proc.stderr.fileno()
        while b"listening on" not in log:  # bounded: 60 s without output, then the test fails
            ready, _, _ = select.select([fd], [], [], 60)
            chunk = os.read(fd, 65536) if ready else b""
            assert chunk, log.decode()
            log += chunk
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
            with pytest.raises(smtplib.SMTPDataError) as refused:
                smtp.sendmail("alice@example.com", ["hello@broken.example.org"],
                              b"From: alice@example.com\r\nTo: hello@broken.example.org\r\n\r\nhi\r\n")
        assert refused.value.smtp_code == 451
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        proc.stderr.close()
    return (log + rest).decode()


def test_the_daemon_logs_one_line_with_file_and_line_and_the_traceback_at_v(app_dir: Path) -> None:
    quiet = _run_smtpproxy_and_send(app_dir, verbose=False)
    [line] = [x for x in quiet.splitlines() if " ERROR " in x]
    assert line.endswith("handler=broken.START rcpt=hello@broken.example.org "
                         "tempfail: KeyError: 'count' at app/handlers/broken.py:12 in helper")
    assert "Traceback" not in quiet
    verbose = _run_smtpproxy_and_send(app_dir, verbose=True)
    assert "tempfail: KeyError: 'count' at app/handlers/broken.py:12 in helper" in verbose
    assert "traceback:\nTraceback (most recent call last):" in verbose
    assert 'return data["count"] + 1' in verbose
