"""The command line, as a user runs it: dry runs, routes, gen, db init, bad configuration."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from lamsonfilter.cli import main

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "mailinglist"
SAMPLES = APP / "samples"


def invoke(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)


def test_help_lists_the_commands():
    out = invoke("--help").output
    for cmd in ("test", "routes", "gen", "db"):
        assert f"  {cmd}" in out


def test_dry_run_report_from_stdin(tmp_path):
    raw = (SAMPLES / "01-subscribe.eml").read_bytes()
    r = invoke("test", "--app", APP, "--database", f"sqlite:///{tmp_path}/none.db", input=raw)
    assert r.exit_code == 0, r.output
    out = r.output
    assert "=== message 1: <stdin>" in out
    assert "route:   mailinglist.subscribe" in out
    assert "state:   START -> PENDING" in out
    assert "milter:    DISCARD" in out
    assert "content filter: reinject nothing; answer 250 2.0.0 Ok" in out
    assert "outbox:    1 message(s) (not sent: dry run)" in out
    assert "Subject: Confirm your subscription to python@lists.example.org" in out


def test_dry_run_shows_header_diff(tmp_path):
    app = tmp_path / "tagger"
    assert invoke("gen", "tagger", "--dest", app).exit_code == 0
    (app / "app/handlers/tagger.py").write_text(
        "from lamsonfilter import Handler\n"
        "handler = Handler('tagger', default_action='deliver')\n"
        "@handler.route('hello@(host)')\n"
        "def START(ctx, host):\n"
        "    ctx.change_header('Subject', '[tagged] ' + ctx.header('Subject'))\n"
        "    ctx.add_header('X-Tagged', 'yes')\n"
    )
    raw = b"From: a@x.example\r\nTo: hello@tagger.example.org\r\nSubject: hi\r\n\r\nbody\r\n"
    r = invoke("test", "--app", app, input=raw)
    assert r.exit_code == 0, r.output
    assert "-Subject: hi" in r.output and "+Subject: [tagged] hi" in r.output and "+X-Tagged: yes" in r.output
    assert "addheader('X-Tagged', 'yes')" in r.output


def test_json_over_many_files_with_summary_and_envelope_override(tmp_path):
    r = invoke("test", "--app", APP, "--json", "--database", "memory:", *sorted(SAMPLES.iterdir()))
    assert r.exit_code == 0, r.output
    objs = [json.loads(line) for line in r.output.splitlines()]
    assert [o["decision"] for o in objs] == ["drop", "drop", "reject", "drop", "deliver", "drop"]
    assert objs[0]["recipients"][0]["state_after"] == "PENDING"
    assert objs[0]["outbox"] == 1 and objs[2]["outbox"] == 0
    assert objs[5]["envelope"]["sender"] == ""  # Return-Path: <>
    r = invoke("test", "--app", APP, "--json", "--database", "memory:",
               "--sender", "zed@example.com", "--rcpt", "help@lists.example.org", SAMPLES / "05-other-domain.eml")
    o = json.loads(r.output)
    assert o["envelope"] == {"sender": "zed@example.com", "recipients": ["help@lists.example.org"], "queue_id": None}
    assert o["recipients"][0]["route"] == "mailinglist.help"


def test_summary_line_over_a_maildir(tmp_path):
    md = tmp_path / "Maildir"
    for d in ("cur", "new", "tmp"):
        (md / d).mkdir(parents=True)
    for f in sorted(SAMPLES.iterdir())[:3]:
        (md / "new" / f.name).write_bytes(f.read_bytes())
    r = invoke("test", "--app", APP, "--database", "memory:", "-q", md)
    assert r.exit_code == 0
    assert r.output.strip() == "summary: 3 message(s); decisions: drop 2, reject 1; outbox: 2 message(s); errors: 0"


def test_exit_status_is_1_when_a_handler_fails(tmp_path):
    app = tmp_path / "crashy"
    invoke("gen", "crashy", "--dest", app)
    (app / "app/handlers/crashy.py").write_text(
        "from lamsonfilter import Handler\nhandler = Handler('crashy')\n"
        "@handler.route('hello@(host)')\ndef START(ctx, host):\n    raise RuntimeError('bug')\n"
    )
    raw = b"From: a@x.example\r\nTo: hello@crashy.example.org\r\n\r\nx\r\n"
    r = invoke("test", "--app", app, "--json", input=raw)
    assert r.exit_code == 1
    o = json.loads(r.output.splitlines()[-1])
    assert o["decision"] == "tempfail" and "RuntimeError: bug" in o["error"]
    assert o["cause"] == "message"  # the handler failed: it would count towards deq's POISON_LIMIT
    assert o["milter"].endswith("TEMPFAIL") and o["content_filter"].startswith("reinject nothing")


def test_dry_run_changes_nothing_commit_does(tmp_path):
    db = f"sqlite:///{tmp_path}/state.db"
    raw = (SAMPLES / "01-subscribe.eml").read_bytes()
    r = invoke("test", "--app", APP, "--database", db, "--commit", input=raw)
    assert r.exit_code == 2 and "lamsonfilter db init" in r.output
    assert invoke("db", "init", "--app", APP, "--database", db).exit_code == 0
    for _ in range(2):  # a dry run twice: both see START
        o = json.loads(invoke("test", "--app", APP, "--database", db, "--json", input=raw).output)
        assert o["recipients"][0]["state_before"] == "START"
    invoke("test", "--app", APP, "--database", db, "--commit", input=raw)
    o = json.loads(invoke("test", "--app", APP, "--database", db, "--json", input=raw).output)
    assert o["recipients"][0]["state_before"] == "PENDING"


def test_unreadable_and_recipientless_messages_are_errors(tmp_path):
    (tmp_path / "norcpt.eml").write_bytes(b"Subject: x\r\n\r\nno To header\r\n")
    r = invoke("test", "--app", APP, "--database", "memory:", tmp_path / "norcpt.eml", tmp_path / "missing.eml")
    assert r.exit_code == 1
    assert "no recipients: give --rcpt" in r.output
    assert "cannot read" in r.output


def test_routes_listing_and_lookup():
    r = invoke("routes", "--app", APP)
    assert r.exit_code == 0
    lines = r.output.splitlines()
    assert any("mailinglist.subscribe" in l and "(list)-subscribe@(host)" in l for l in lines)
    r = invoke("routes", "--app", APP, "--test", "python-confirm-" + "a" * 32 + "@lists.example.org")
    assert "route mailinglist.confirm" in r.output and "token = " + "a" * 32 in r.output
    assert "also matches (not used): mailinglist.help" in r.output
    r = invoke("routes", "--app", APP, "--test", "nosuch@lists.example.org")
    assert r.exit_code == 1 and "550 5.1.1" in r.output
    r = invoke("routes", "--app", APP, "--test", "x@elsewhere.example")
    assert "passed on untouched" in r.output


@pytest.mark.parametrize(
    "settings, expected",
    [
        ("HOSTS = 'lists.example.org'\nHANDLERS = ['x']\n", "HOSTS must be a list of strings"),
        ("HANDLERS = ['nosuch']\n", "there is no app/handlers/nosuch.py"),
        ("HOSTS = []\n", "HANDLERS is required"),
        ("HANDLERS = ['x']\nRELAY = 'localhost'\n", "RELAY must be HOST:PORT"),
        ("HANDLERS = ['x']\nREPLY_LIMIT = (0, 10)\n", "REPLY_LIMIT must be"),
        ("HANDLERS = ['x'\n", "SyntaxError"),
    ],
)
def test_bad_configuration_is_refused_naming_the_setting(tmp_path, settings, expected):
    app = tmp_path / "x"
    invoke("gen", "x", "--dest", app)
    (app / "config/settings.py").write_text(settings)
    r = invoke("routes", "--app", app)
    assert r.exit_code == 2
    assert expected in r.output and "settings.py" in r.output


def test_dangerous_route_in_an_app_is_refused_at_startup(tmp_path):
    app = tmp_path / "x"
    invoke("gen", "x", "--dest", app)
    (app / "app/handlers/x.py").write_text(
        "from lamsonfilter import Handler\nhandler = Handler('x')\n"
        "@handler.route('(user)@(host)', user=r'(\\w+\\.?)+')\ndef START(ctx):\n    pass\n"
    )
    r = invoke("routes", "--app", app)
    assert r.exit_code == 2 and "(user)@(host)" in r.output and "catastrophic backtracking" in r.output


def test_gen_refuses_a_non_empty_directory_and_bad_names(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "f").write_text("x")
    assert invoke("gen", "taken", "--dest", tmp_path / "taken").exit_code == 2
    assert invoke("gen", "Bad-Name", "--dest", tmp_path / "y").exit_code == 2


def test_gen_skeleton_tests_pass_in_a_fresh_directory(tmp_path):
    r = invoke("gen", "helpdesk", "--dest", tmp_path / "helpdesk")
    assert r.exit_code == 0 and "created" in r.output
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=tmp_path / "helpdesk", capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 passed" in proc.stdout


def test_graph_shows_states_and_transitions_read_from_the_code(tmp_path):
    r = invoke("graph", "--app", APP)
    assert r.exit_code == 0
    dot = r.output
    assert dot.startswith("digraph lamsonfilter {")
    for edge in ('"mailinglist.START" -> "mailinglist.PENDING"', '"mailinglist.PENDING" -> "mailinglist.MEMBER"',
                 '"mailinglist.MEMBER" -> "mailinglist.START"', '"mailinglist.DISABLED" -> "mailinglist.PENDING"'):
        assert edge in dot
    assert '"mailinglist.MEMBER" -> "mailinglist.PENDING"' not in dot  # not a transition in the code
    assert '"mailinglist.HELP" [label="HELP", shape=box]' in dot  # stateless
    out = tmp_path / "states.dot"
    assert invoke("graph", "--app", APP, "-o", out).exit_code == 0
    assert out.read_text() == dot


def test_graph_renders_svg_with_graphviz(tmp_path):
    from tests.rig.fixtures import require

    require("dot")
    out = tmp_path / "states.svg"
    r = invoke("graph", "--app", APP, "-o", out)
    assert r.exit_code == 0, r.output
    svg = out.read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    assert "mailinglist.PENDING" in svg or ">PENDING<" in svg


def test_graph_says_what_to_install_when_dot_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no Graphviz here
    r = invoke("graph", "--app", APP, "-o", tmp_path / "states.png")
    assert r.exit_code != 0 and "apt-get install graphviz" in r.output
    assert not (tmp_path / "states.png").exists()


def test_send_talks_smtp_and_reports_refusals(tmp_path):
    from aiosmtpd.controller import Controller

    got = []

    class Handler:
        async def handle_RCPT(self, server, session, envelope, address, options):
            if address.startswith("no"):
                return "550 5.1.1 no such user"
            envelope.rcpt_tos.append(address)
            return "250 OK"

        async def handle_DATA(self, server, session, envelope):
            got.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
            return "250 OK"

    from tests.rig.postfix import free_port
    port = free_port()
    ctl = Controller(Handler(), hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        r = invoke("send", "--server", f"127.0.0.1:{port}", "--from", "a@x.example",
                   "--to", "b@y.example", "--to", "nobody@y.example", "--subject", "hi")
        assert r.exit_code == 1
        assert "refused nobody@y.example: 550" in r.output
        assert got and got[0][0] == "a@x.example" and got[0][1] == ["b@y.example"]
        assert b"Subject: hi" in got[0][2]
    finally:
        ctl.stop()
    r = invoke("send", "--server", f"127.0.0.1:{port}", "--from", "a@x.example", "--to", "b@y.example")
    assert r.exit_code == 1 and "cannot send through" in r.output


@pytest.mark.parametrize(
    "raw, why",
    [
        (b"", "empty input"),
        (b"\r\n\r\n", "empty input"),
        (b"\x7fELF\x02\x01\x01\x00\x00\x00binary", "does not start with a header field"),
        (b"\r\nFrom: a@example.com\r\n\r\na body with no header block\r\n", "does not start with a header field"),
        (b"just some text\nwith no header at all\n", "does not start with a header field"),
    ],
)
def test_input_that_is_not_a_message_is_refused_naming_the_file(tmp_path, raw, why):
    bad = tmp_path / "junk.bin"
    bad.write_bytes(raw)
    for args, input, name in (([bad], None, str(bad)), ([], raw, "<stdin>")):
        r = invoke("test", "--app", APP, "--database", "memory:", *args, input=input)
        assert r.exit_code == 1, r.output
        assert f"lamsonfilter: {name}: not a mail message: " in r.output and why in r.output
        assert "===" not in r.output and "Traceback" not in r.output


@pytest.mark.parametrize(
    "raw",
    [
        b"From: a@example.com\r\nTo: help@lists.example.org\r\n\r\nnul \x00 in the body\r\n\x00",
        b"From: a@example.com\r\nTo: help@lists.example.org\r\nSubject: nul \x00 here\r\n\r\nbody\r\n",
        b"From: a\x00b@example.com\r\nTo: help@lists.example.org, x\x00y@example.org\r\n\r\nbody\r\n",
        b"From: a@example.com\nTo: help@lists.example.org\rSubject: bare CR\r\n\nbare LF\nbare CR\rend",
        b"From: J\xc3\xbcrgen <j@example.de>\r\nTo: help@lists.example.org\r\nSubject: Gr\xfc\xdfe\r\n\r\nx\r\n",
        b"From: a@example.com\r\nTo: help@lists.example.org\r\nX-Long: " + b"x" * 5000 + b"\r\n\r\n" + b"y" * 200000,
    ],
    ids=["nul-in-body", "nul-in-header", "nul-in-addresses", "bare-cr-lf", "8bit-headers", "long-lines"],
)
def test_odd_bytes_get_a_decision_not_a_refusal(raw):
    """What Postfix passes on, the daemons get: the dry run decides it too."""
    r = invoke("test", "--app", APP, "--database", "memory:", "--json", input=raw)
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.splitlines()[-1])
    assert out["error"] is None and out["decision"] == "drop"
    assert [o["route"] for o in out["recipients"]] == ["mailinglist.help"]


def test_a_message_without_from_warns_that_the_sender_is_null(tmp_path):
    raw = b"To: help@lists.example.org\r\nSubject: x\r\n\r\nhi\r\n"
    r = invoke("test", "--app", APP, "--database", "memory:", input=raw)
    assert r.exit_code == 0
    warnings = [l for l in r.output.splitlines() if "warning:" in l]
    assert len(warnings) == 1 and "<stdin>" in warnings[0] and "sender is <>" in warnings[0]
    # a deliberate null sender (Return-Path: <>) or --sender: no warning
    for extra, args in ((b"Return-Path: <>\r\n", ()), (b"", ("--sender", "a@example.com"))):
        r = invoke("test", "--app", APP, "--database", "memory:", *args, input=extra + raw)
        assert r.exit_code == 0 and "warning:" not in r.output


def test_the_route_is_shown_when_the_handler_fails(tmp_path):
    app = tmp_path / "crashy"
    invoke("gen", "crashy", "--dest", app)
    (app / "app/handlers/crashy.py").write_text(
        "from lamsonfilter import Handler\nhandler = Handler('crashy')\n"
        "@handler.route('hello@(host)')\ndef START(ctx, host):\n    raise RuntimeError('bug')\n"
    )
    raw = b"From: a@x.example\r\nTo: hello@crashy.example.org\r\n\r\nx\r\n"
    r = invoke("test", "--app", app, "--database", "memory:", input=raw)
    assert r.exit_code == 1
    assert "  route:   crashy.START" in r.output and "(none)" not in r.output
    assert "decision:  tempfail" in r.output
    o = json.loads(invoke("test", "--app", app, "--database", "memory:", "--json", input=raw).output)
    assert o["recipients"][0]["route"] == "crashy.START"


def test_a_maildir_is_streamed_not_loaded_at_once(tmp_path):
    import tracemalloc

    md = tmp_path / "Maildir"
    for d in ("cur", "new", "tmp"):
        (md / d).mkdir(parents=True)
    body = (b"x" * 998 + b"\r\n") * 1024  # 1 MiB
    count = 40
    for i in range(count):
        (md / "new" / f"{i:03d}.eml").write_bytes(
            f"From: a@example.com\r\nTo: b@elsewhere.example\r\nSubject: {i}\r\n\r\n".encode() + body)
    tracemalloc.start()
    try:
        r = invoke("test", "--app", APP, "--database", "memory:", "-q", md)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.exit_code == 0, r.output
    assert r.output.strip().endswith(
        f"summary: {count} message(s); decisions: deliver {count}; outbox: 0 message(s); errors: 0")
    # every message at once would be >= 40 MiB; one at a time (and its working copies) far below
    assert peak < 16 * 1024 * 1024, f"peak {peak} bytes"
