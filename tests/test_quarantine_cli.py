"""``lamsonfilter quarantine``: exit codes, --json, and a release that the listener refuses keeps the message."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from lamsonfilter.cli import main
from lamsonfilter.contentfilter.quarantine import Quarantine
from tests.rig.proxy import Script, ScriptedSMTP

MSG = b"From: alice@example.com\r\nSubject: kept\r\n\r\nbody\r\n"


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, ["quarantine", *args])
    return r.exit_code, r.stdout, r.stderr


def test_list_show_delete_and_usage_errors(tmp_path: Path) -> None:
    q = Quarantine(tmp_path / "q")
    name = q.store(MSG, "review", "4Qid", sender="alice@example.com", recipients=["a@example.org", "b@example.net"])
    code, out, _ = run("list", "--quarantine", str(q.path), "--json")
    assert code == 0
    listing = json.loads(out)
    assert (listing["total"], listing["shown"], listing["more"]) == (1, 1, 0)
    [entry] = listing["messages"]
    assert entry["name"] == name and entry["recipients"] == ["a@example.org", "b@example.net"]
    assert entry["subject"] == "kept" and entry["queue_id"] == "4Qid"
    code, out, _ = run("show", name, "--quarantine", str(q.path), "--json")
    assert code == 0 and json.loads(out)["sender"] == "alice@example.com"
    code, _, err = run("show", "nosuch", "--quarantine", str(q.path))
    assert code == 2 and err.count("\n") == 1 and "no message nosuch" in err
    code, _, err = run("list", "--quarantine", str(tmp_path / "absent"))
    assert code == 2 and "is not a quarantine" in err
    code, _, err = run("list")
    assert code == 2 and "--quarantine DIR" in err
    code, _, err = run("delete", name, "--quarantine", str(q.path))
    assert code == 2 and "refused without --yes" in err and q.names() == [name]
    code, out, _ = run("delete", name, "--quarantine", str(q.path), "--yes")
    assert code == 0 and q.names() == []


def test_a_refused_release_keeps_the_message_and_exits_1(tmp_path: Path) -> None:
    q = Quarantine(tmp_path / "q")
    name = q.store(MSG, "review", "4Qid", sender="alice@example.com", recipients=["a@example.org"])
    with ScriptedSMTP(Script(refuse_rcpt={"a@example.org": "450 4.2.0 try later"})) as server:
        code, _, err = run("release", name, "--quarantine", str(q.path), "--reinject", f"127.0.0.1:{server.port}")
    assert code == 1 and "not released, kept in the quarantine" in err and "450 4.2.0" in err
    assert q.names() == [name]
    with ScriptedSMTP() as server:
        code, out, _ = run("release", name, "--quarantine", str(q.path), "--reinject", f"127.0.0.1:{server.port}",
                           "--json")
        assert [m.data for m in server.messages] == [MSG]
        assert server.messages[0].commands == ["MAIL FROM:<alice@example.com> SIZE=%d" % len(MSG),
                                               "RCPT TO:<a@example.org>"]
    assert code == 0 and json.loads(out)["ok"] is True and q.names() == []
    old = q.store(MSG, "kept", "4Old")
    code, _, err = run("release", old, "--quarantine", str(q.path))
    assert code == 2 and "without its envelope" in err


def test_the_same_family_as_queue_and_outbox(tmp_path: Path) -> None:
    """--limit and how many more, an empty quarantine, hostile names and headers, usage errors in one line."""
    import os

    q = Quarantine(tmp_path / "q")
    q.ensure()
    code, out, _ = run("list", "--quarantine", str(q.path))
    assert code == 0 and out == f"the quarantine {q.path} is empty\n"
    assert json.loads(run("list", "--quarantine", str(q.path), "--json")[1])["messages"] == []
    hostile = b"From: x@example.com\r\nSubject: \x1b]2;title\x07\x1b[31mred\r\n\r\nbody\r\n"
    names = [q.store(hostile, f"reason \x1b[1m{i}", "4Qid", sender="a@example.com", recipients=["b@example.org"])
             for i in range(3)]
    for i, name in enumerate(names):
        os.utime(q.path / "new" / name, (1_000_000 + i, 1_000_000 + i))
    code, out, _ = run("list", "--quarantine", str(q.path), "--limit", "2")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["NAME", "AGE", "QUEUE"] and len(lines) == 4
    assert lines[-1] == "2 of 3 messages shown; --limit N for more" and "\x1b" not in out
    listing = json.loads(run("list", "--quarantine", str(q.path), "--limit", "2", "--json")[1])
    assert [m["name"] for m in listing["messages"]] == names[:2] and listing["more"] == 1
    assert listing["messages"][0]["size"] == len(hostile)
    code, out, _ = run("show", names[0], "--quarantine", str(q.path))
    assert code == 0 and "Subject: ?]2;title??[31mred" in out and "\x1b" not in out and "\x07" not in out
    r = CliRunner().invoke(main, ["quarantine", "show", names[0], "--quarantine", str(q.path), "--raw"])
    assert r.exit_code == 0 and r.stdout_bytes == hostile
    for bad in ("../q/new/" + names[0], "/etc/passwd", "..", "a\nb"):
        code, out, err = run("show", bad, "--quarantine", str(q.path))
        assert code == 2 and err.count("\n") == 1 and out == "", bad
    code, _, err = run("delete", names[0], "nosuch", "--quarantine", str(q.path), "--yes")
    assert code == 2 and "no message nosuch" in err and len(q.names()) == 3  # all checked first
    code, out, _ = run("delete", names[0], "--quarantine", str(q.path), "--yes", "--json")
    assert code == 0 and json.loads(out) == {"name": names[0], "ok": True, "error": None}
    code, _, err = run("show", "--quarantine", str(q.path))
    assert code == 2 and err.count("\n") == 1 and "Missing argument" in err
