"""The dry run (``lamsonfilter test``): --commit sends nothing ever, what it shows, what input it takes."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from lamsonfilter.cli import main
from lamsonfilter.mail import MailRequest
from lamsonfilter.outboxworker import OutboxWorker
from lamsonfilter.relay import Relay
from lamsonfilter.settings import load_app, make_storage
from tests.rig.postfix import CaptureServer

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "mailinglist"
SAMPLES = APP / "samples"
SUBSCRIBE = (SAMPLES / "01-subscribe.eml").read_bytes()


def invoke(*args: object, input: bytes | None = None):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)


def crashy_app(tmp_path: Path) -> Path:
    app = tmp_path / "crashy"
    assert invoke("gen", "crashy", "--dest", app).exit_code == 0
    (app / "app/handlers/crashy.py").write_text(
        "from lamsonfilter import Handler\n"
        "handler = Handler('crashy')\n"
        "\n"
        "@handler.route('hello@(host)')\n"
        "def START(ctx, host):\n"
        "    counts = {}\n"
        "    return counts['count']\n"
    )
    return app


# ---------------------------------------------------------------- item 3: --commit never sends
def test_commit_stores_state_but_no_daemon_ever_sends_its_outbox(tmp_path: Path, capture: CaptureServer) -> None:
    db = f"sqlite:///{tmp_path}/state.db"
    assert invoke("db", "init", "--app", APP, "--database", db).exit_code == 0
    r = invoke("test", "--app", APP, "--database", db, "--commit", input=SUBSCRIBE)
    assert r.exit_code == 0, r.output
    assert "never sent: --commit commits the state and the rows only" in r.output
    storage = make_storage(db)
    try:
        # the state is committed...
        with storage.transaction(commit=False) as tx:
            assert tx.get("mailinglist:python:alice@example.com").state == "PENDING"
        # ...and the outbox worker a daemon runs over this database finds nothing to send
        worker = OutboxWorker(storage, Relay("127.0.0.1", capture.port, timeout=10.0), interval=3600.0)
        assert storage.pending_outbox() == []
        assert worker.flush() == 0
        assert capture.messages == []
        # control: the same message processed as a daemon does is sent by that same worker
        app = load_app(APP, {"DATABASE_URL": db}, storage=storage)
        raw = SUBSCRIBE.replace(b"alice@example.com", b"bob@example.net")
        app.process(MailRequest.from_bytes(raw))
        assert worker.flush() == 1
        [sent] = capture.wait_for_count(1)
        assert sent.rcpt_tos == ("bob@example.net",)
    finally:
        storage.close()


def test_help_says_commit_sends_nothing() -> None:
    out = " ".join(invoke("test", "--help").output.split())
    assert "--commit commits the state only: the outbox is not stored" in out
    assert "no daemon on this database will ever send it" in out


# ---------------------------------------------------------------- item 4: where a handler failed
def test_a_failing_handler_is_shown_with_file_and_line_and_the_traceback_at_v(tmp_path: Path) -> None:
    app = crashy_app(tmp_path)
    raw = b"From: a@x.example\r\nTo: hello@crashy.example.org\r\n\r\nx\r\n"
    r = invoke("test", "--app", app, "--database", "memory:", input=raw)
    assert r.exit_code == 1
    assert "error: crashy.START: KeyError: 'count' at app/handlers/crashy.py:7 in START" in r.output
    assert "Traceback" not in r.output
    r = invoke("-v", "test", "--app", app, "--database", "memory:", input=raw)
    assert "traceback:\n  | Traceback (most recent call last):" in r.output
    assert "  |     return counts['count']" in r.output
    o = json.loads(invoke("test", "--app", app, "--database", "memory:", "--json", input=raw).output)
    assert o["error"].endswith("KeyError: 'count' at app/handlers/crashy.py:7 in START")
    assert o["traceback"].startswith("Traceback (most recent call last):")


# ---------------------------------------------------------------- item 8: what the application did
def test_the_report_shows_every_key_written_and_json_the_outbox_text(tmp_path: Path) -> None:
    app = tmp_path / "notes"
    invoke("gen", "notes", "--dest", app)
    (app / "app/handlers/notes.py").write_text(
        "from lamsonfilter import Handler\n"
        "handler = Handler('notes')\n"
        "\n"
        "@handler.route('hello@(host)')\n"
        "def START(ctx, host):\n"
        "    ctx.set_state('counter:' + host, 'COUNTED', {'n': 1})\n"
        "    ctx.claim('once')\n"
        "    ctx.reply(body='noted, thanks\\n', subject='Noted')\n"
        "    return COUNTED\n"
        "\n"
        "@handler.state\n"
        "def COUNTED(ctx, host):\n"
        "    pass\n"
    )
    raw = b"From: a@x.example\r\nTo: hello@notes.example.org\r\nSubject: hi\r\n\r\nx\r\n"
    r = invoke("test", "--app", app, "--database", "memory:", input=raw)
    assert r.exit_code == 0, r.output
    assert "state written: 4 key(s) (not committed: dry run)" in r.output
    assert '  notes:counter:notes.example.org: (none) -> COUNTED  {"n": 1}' in r.output
    assert "  notes:a@x.example:hello@notes.example.org: (none) -> COUNTED" in r.output
    assert "  notes:once: (none) -> CLAIMED" in r.output
    assert "  lamsonfilter:rate:notes:a@x.example: (none) -> RATE" in r.output
    o = json.loads(invoke("test", "--app", app, "--database", "memory:", "--json", input=raw).output)
    written = {w["key"]: w for w in o["state_written"]}
    assert written["notes:counter:notes.example.org"] == {
        "key": "notes:counter:notes.example.org", "op": "set", "state_before": None, "state_after": "COUNTED",
        "data": {"n": 1}}
    [m] = o["outbox_messages"]
    assert ["Subject", "Noted"] in m["headers"] and ["To", "a@x.example"] in m["headers"]
    assert m["text"] == "noted, thanks"


# ---------------------------------------------------------------- item 9: input
def test_an_empty_directory_is_an_error_not_a_clean_run(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    r = invoke("test", "--app", APP, "--database", "memory:", tmp_path / "empty")
    assert r.exit_code == 2
    assert r.output == f"lamsonfilter: {tmp_path / 'empty'}: no messages in this directory\n"
    md = tmp_path / "Maildir"
    for d in ("cur", "new", "tmp"):
        (md / d).mkdir(parents=True)
    r = invoke("test", "--app", APP, "--database", "memory:", md)
    assert r.exit_code == 2 and "no messages in this Maildir" in r.output


def test_an_mbox_file_is_read_as_several_messages(tmp_path: Path) -> None:
    box = tmp_path / "inbox.mbox"
    parts = []
    for f in sorted(SAMPLES.iterdir())[:3]:
        text = f.read_bytes().replace(b"\r\n", b"\n")
        parts.append(b"From someone@example.com Sat Dec  5 10:00:00 2026\n" + text.rstrip(b"\n") + b"\n\n")
    box.write_bytes(b"".join(parts))
    r = invoke("test", "--app", APP, "--database", "memory:", "--json", box)
    assert r.exit_code == 0, r.output
    objs = [json.loads(line) for line in r.output.splitlines()]
    assert [o["file"] for o in objs] == [f"{box} (message {n})" for n in (1, 2, 3)]
    assert [o["decision"] for o in objs] == ["drop", "drop", "reject"]
    r = invoke("test", "--app", APP, "--database", "memory:", "-q", box)
    assert "summary: 3 message(s)" in r.output
    # the same on standard input
    r = invoke("test", "--app", APP, "--database", "memory:", "--json", input=box.read_bytes())
    assert [json.loads(line)["decision"] for line in r.output.splitlines()] == ["drop", "drop", "reject"]


def test_a_rcpt_that_is_not_an_address_is_refused(tmp_path: Path) -> None:
    r = invoke("test", "--app", APP, "--database", "memory:", "--rcpt", "not an address", input=SUBSCRIBE)
    assert r.exit_code == 2
    assert r.output == "lamsonfilter: --rcpt 'not an address' is not an email address (local@domain)\n"
    r = invoke("test", "--app", APP, "--database", "memory:", "--sender", "nobody", input=SUBSCRIBE)
    assert r.exit_code == 2 and "--sender 'nobody' is not an email address" in r.output
    for ok in ("<python@lists.example.org>", "postmaster"):
        assert invoke("test", "--app", APP, "--database", "memory:", "--rcpt", ok, input=SUBSCRIBE).exit_code == 0
    assert invoke("test", "--app", APP, "--database", "memory:", "--sender", "", input=SUBSCRIBE).exit_code == 0


def test_at_a_terminal_it_says_it_is_reading_standard_input() -> None:
    """On a terminal with no file argument the dry run says what it waits for (then Ctrl-D ends the input)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lamsonfilter", "test", "--app", str(APP), "--database", "memory:"],
        stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
    )
    os.close(slave)
    try:
        assert proc.stderr is not None
        fd = proc.stderr.fileno()
        said = b""
        while b"\n" not in said:  # bounded: 60 s without output fails the test (no timing assumption)
            ready, _, _ = select.select([fd], [], [], 60)
            chunk = os.read(fd, 65536) if ready else b""
            assert chunk, f"nothing (more) said on standard error while waiting at a terminal: {said!r}"
            said += chunk
        line = said.decode()
        assert "reading a message from standard input; end it with Ctrl-D" in line
        os.write(master, b"\x04")  # Ctrl-D at the start of a line: end of input
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 1 and b"empty input" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        os.close(master)
