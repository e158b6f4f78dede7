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
