"""``lamsonfilter queue``: list, count, show, requeue and remove on a real Maildir queue.

Hostile input included: names with ``../`` or ``/``, a FIFO and a symbolic
link in ``new/`` (never read: the command must not hang or follow them), a
header with terminal escape sequences, files without an envelope.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

import pytest
from click.testing import CliRunner

from lamsonfilter.cli import main
from lamsonfilter.mailqueue.maildir import MailQueue, QueueEntry

MSG = b"From: alice@example.com\r\nSubject: hello \x1b[2J\x1b]0;owned\x07 there\r\nMessage-ID: <m1@x>\r\n\r\nbody\r\n"


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    r = CliRunner(env=env).invoke(main, ["queue", *args])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    return r.exit_code, r.stdout, r.stderr


def one_line_error(err: str) -> bool:
    return err.count("\n") == 1 and err.startswith("lamsonfilter: ") and "Traceback" not in err


def queue_with(tmp_path: Path, n: int) -> tuple[MailQueue, list[str]]:
    """`n` messages in new/, the first the oldest (mtimes a minute apart, in the past)."""
    q = MailQueue(tmp_path / "queue", lease=300)
    names = [q.put(MSG, f"s{i}@example.com", f"list{i}@lists.example.org") for i in range(n)]
    now = time.time()
    for i, name in enumerate(names):
        os.utime(q.path / "new" / name, (now - 3600 + 60 * i, now - 3600 + 60 * i))
    return q, names


def test_list_count_show_and_the_states(tmp_path: Path) -> None:
    q, names = queue_with(tmp_path, 5)
    q.retry(q.claim(names[1]) or _never(), delay=600)
    q.claim(names[2])  # a live worker's claim
    where = ("--queue", str(q.path))

    code, out, _ = run("list", *where, "--json")
    assert code == 0
    listing = json.loads(out)
    assert (listing["total"], listing["shown"], listing["more"]) == (5, 5, 0)
    assert [m["name"] for m in listing["messages"]] == names  # oldest first, whatever the folder
    by_name = {m["name"]: m for m in listing["messages"]}
    assert by_name[names[0]]["state"] == "new" and by_name[names[0]]["sender"] == "s0@example.com"
    assert by_name[names[0]]["recipient"] == "list0@lists.example.org" and by_name[names[0]]["age"] >= 3600
    assert by_name[names[1]]["state"] == "retry" and by_name[names[1]]["attempts"] == 1 and by_name[names[1]]["due"]
    assert by_name[names[2]]["state"] == "claimed" and by_name[names[2]]["owner"] == q.owner
    assert by_name[names[0]]["size"] == (q.path / "new" / names[0]).stat().st_size

    code, out, _ = run("list", *where)
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["NAME", "STATE", "TRIES", "SIZE", "AGE", "DUE/OWNER", "SENDER",
                                              "RECIPIENT"]
    # due times are whole seconds in the file name: 600 s may show as 9m or 10m, a 300 s claim as 4m or 5m
    assert len(lines) == 6 and re.search(r"retry in (9|10)m", out)
    assert re.search(rf"by {re.escape(q.owner)}, ends in (4|5)m", out)
    assert "<s0@example.com>" in out and "list4@lists.example.org" in out

    code, out, _ = run("list", *where, "--limit", "2")
    assert len(out.splitlines()) == 4 and out.splitlines()[-1] == "2 of 5 messages shown; --limit N for more"
    code, out, _ = run("list", *where, "--limit", "2", "--json")
    assert json.loads(out)["more"] == 3 and [m["name"] for m in json.loads(out)["messages"]] == names[:2]
    code, out, _ = run("list", *where, "--state", "retry", "--state", "claimed", "--json")
    assert [m["name"] for m in json.loads(out)["messages"]] == names[1:3]

    code, out, _ = run("count", *where, "--json")
    assert code == 0 and json.loads(out) == {"queue": str(q.path), "new": 3, "claimed": 1, "retry": 1, "total": 5}
    code, out, _ = run("count", *where)
    assert out == "new 3  claimed 1  retry 1  total 5\n"

    code, out, _ = run("show", names[1], *where)
    assert code == 0 and "State:     retry" in out and "MAIL FROM: <s1@example.com>" in out
    assert "RCPT TO:   <list1@lists.example.org>" in out and "Attempts:  1" in out
    assert "Subject: hello ?[2J?]0;owned? there" in out and "\x1b" not in out and "\x07" not in out
    code, out, _ = run("show", names[1], *where, "--json")
    shown = json.loads(out)
    assert shown["subject"] == "hello \x1b[2J\x1b]0;owned\x07 there" and shown["message_id"] == "<m1@x>"
    r = CliRunner().invoke(main, ["queue", "show", names[1], *where, "--raw"])
    assert r.exit_code == 0 and r.stdout_bytes == MSG  # the message, without the envelope lines
    filename = os.listdir(q.path / "retry")[0]  # the file name as ls shows it: also accepted
    assert ";" in filename and run("show", filename, *where, "--json")[0] == 0


def _never() -> NoReturn:
    raise AssertionError("the claim failed")


def test_requeue_and_remove_leave_a_live_claim_alone(tmp_path: Path) -> None:
    q, names = queue_with(tmp_path, 4)
    where = ("--queue", str(q.path))
    q.retry(q.claim(names[0]) or _never(), delay=600)
    live = q.claim(names[1])
    dead = MailQueue(q.path, lease=-60).claim(names[2])  # a worker that died: its claim is over
    assert live and dead

    code, out, err = run("requeue", names[0], names[1], names[2], *where)
    assert code == 1 and one_line_error(err) and f"{names[1]} is being processed by {q.owner}" in err
    assert out.splitlines() == [f"{names[0]}: requeued (new, 1 attempt(s) so far)",
                                f"{names[2]}: requeued (new, 0 attempt(s) so far)"]
    assert live.path.exists() and q.count() == {"new": 3, "claimed": 1, "retry": 0}

    code, _, err = run("remove", names[3], *where)
    assert code == 2 and one_line_error(err) and "refused without --yes" in err and q.count()["new"] == 3
    code, _, err = run("remove", names[3], "no-such-message", *where, "--yes")
    assert code == 2 and one_line_error(err) and "no message no-such-message" in err and q.count()["new"] == 3
    code, out, err = run("remove", names[3], names[1], *where, "--yes", "--json")
    assert code == 1 and [json.loads(x) for x in out.splitlines()] == [
        {"name": names[3], "ok": True, "state": "new", "error": None},
        {"name": names[1], "ok": False, "error": f"{names[1]} is being processed by {q.owner}; "
                                                 "try again after its claim ends"}]
    assert q.count() == {"new": 2, "claimed": 1, "retry": 0}
    assert q.done(live)  # the worker finishes its message as if nothing happened


def test_hostile_names_and_files(tmp_path: Path) -> None:
    q, names = queue_with(tmp_path, 1)
    where = ("--queue", str(q.path))
    secret = tmp_path / "secret"
    secret.write_bytes(b"Return-Path: <x@example.com>\nDelivered-To: y@example.com\n\nsecret\n")
    for bad in ("../secret", "../../etc/passwd", "new/" + names[0], "/etc/passwd", ".hidden", "a\nb", ""):
        for command in (("show", bad), ("requeue", bad), ("remove", bad, "--yes")):
            code, out, err = run(*command, *where)
            assert code == 2 and one_line_error(err) and out == "", (command, err)
    os.mkfifo(q.path / "new" / "fifo")
    os.symlink(secret, q.path / "new" / "link")
    (q.path / "new" / "noenvelope").write_bytes(b"Subject: no envelope\r\n\r\nx\r\n")
    code, out, _ = run("list", *where, "--json")
    by_name = {m["name"]: m for m in json.loads(out)["messages"]}
    assert code == 0 and set(by_name) == {names[0], "fifo", "link", "noenvelope"}
    assert by_name["link"]["sender"] is None and by_name["fifo"]["has_envelope"] is False
    assert by_name["noenvelope"]["has_envelope"] is False
    code, out, _ = run("list", *where)
    assert code == 0 and out.count("(no envelope)") == 3
    for name in ("fifo", "link"):  # a subprocess: a read that blocked would hang here, not pass
        p = subprocess.run([sys.executable, "-m", "lamsonfilter", "queue", "show", name, *where, "--raw"],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and one_line_error(p.stderr) and "secret" not in p.stdout, p.stderr
    code, out, _ = run("show", "noenvelope", *where)
    assert code == 0 and "no envelope at the top" in out and "Subject: no envelope" in out


def test_where_the_queue_is(tmp_path: Path) -> None:
    code, _, err = run("list")
    assert code == 2 and one_line_error(err) and "--queue DIR" in err and "--app DIR" in err
    code, _, err = run("count", "--queue", str(tmp_path / "missing"))
    assert code == 2 and one_line_error(err) and "is not a mail queue" in err
    assert not (tmp_path / "missing").exists()

    app = tmp_path / "app"
    (app / "config").mkdir(parents=True)
    (app / "config" / "settings.py").write_text("HANDLERS = []\n")
    code, _, err = run("list", "--app", str(app))
    assert code == 2 and one_line_error(err) and str(app / "var" / "queue") in err
    empty = MailQueue(app / "var" / "queue")
    empty.ensure()
    code, out, _ = run("list", "--app", str(app))
    assert code == 0 and out == f"the queue {app / 'var' / 'queue'} is empty\n"
    code, out, _ = run("list", "--app", str(app), "--json")
    assert json.loads(out)["messages"] == [] and json.loads(out)["total"] == 0
    assert json.loads(run("count", "--app", str(app), "--json")[1])["total"] == 0

    (app / "config" / "settings.py").write_text("HANDLERS = []\nQUEUE = 'spool/q'\n")
    code, _, err = run("list", "--app", str(app))
    assert code == 2 and f"{app / 'spool' / 'q'} is not a mail queue" in err  # relative to the app
    (app / "config" / "settings.py").write_text("HANDLERS = []\nQUEUE = '/nonexistent/q'\n")
    code, _, err = run("list", "--app", str(app))
    assert code == 2 and "/nonexistent/q is not a mail queue" in err
    (app / "config" / "settings.py").write_text("HANDLERS = []\nQUEUE = 42\n")
    code, _, err = run("list", "--app", str(app))
    assert code == 2 and one_line_error(err) and "QUEUE must be a directory" in err
    q, names = queue_with(tmp_path, 2)
    code, out, _ = run("count", "--json", env={"LAMSONFILTER_QUEUE": str(q.path)})
    assert code == 0 and json.loads(out)["new"] == 2
    code, _, err = run("list", "--app", str(tmp_path / "noapp"))
    assert code == 2 and one_line_error(err)


def test_remove_asks_on_a_terminal(tmp_path: Path) -> None:
    """On a terminal (a real pty) remove asks: no keeps the message (exit 1), yes removes it."""
    import pty
    import select

    q, names = queue_with(tmp_path, 1)

    def answer(reply: bytes) -> tuple[int, bytes]:
        pid, fd = pty.fork()
        if pid == 0:  # the child: the command on the pty
            os.execv(sys.executable, [sys.executable, "-m", "lamsonfilter", "queue", "remove", names[0],
                                      "--queue", str(q.path)])
        seen = b""
        try:
            for _ in range(600):  # bounded: until the question shows (at most 600 reads of 0.1 s)
                if select.select([fd], [], [], 0.1)[0]:
                    seen += os.read(fd, 4096)
                if b"[y/N]" in seen:
                    break
            os.write(fd, reply + b"\n")
            for _ in range(600):  # bounded: until the child closes the pty
                if select.select([fd], [], [], 0.1)[0]:
                    try:
                        chunk = os.read(fd, 4096)
                    except OSError:
                        break
                    if not chunk:
                        break
                    seen += chunk
        finally:
            _, status = os.waitpid(pid, 0)
            os.close(fd)
        return os.waitstatus_to_exitcode(status), seen

    code, seen = answer(b"n")
    assert code == 1 and b"Remove 1 message(s) from the queue" in seen and b"nothing done" in seen
    assert q.count()["new"] == 1
    code, seen = answer(b"y")
    assert code == 0 and f"{names[0]}: removed".encode() in seen and q.count()["new"] == 0


def test_list_reads_only_the_envelopes_it_shows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """300 queued files, --limit 5: five envelopes read, the oldest five, and "5 of 300"."""
    q = MailQueue(tmp_path / "queue")
    q.ensure()
    now = time.time()
    for i in range(300):  # written directly (as Postfix's delivery would), not one fsync each
        path = q.path / "new" / f"{1_700_000_000 + i}.M{i}P1Q1.mx"
        path.write_bytes(b"Return-Path: <a@example.com>\nDelivered-To: b@example.org\n\nx\n")
        os.utime(path, (now - 10_000 + (299 - i), now - 10_000 + (299 - i)))  # the last written is the oldest
    read: list[str] = []
    real = MailQueue.envelope

    def counting(self: MailQueue, entry: QueueEntry) -> tuple[str, str] | None:
        read.append(entry.name)
        return real(self, entry)

    monkeypatch.setattr(MailQueue, "envelope", counting)
    code, out, _ = run("list", "--queue", str(q.path), "--limit", "5", "--json")
    listing = json.loads(out)
    assert code == 0 and (listing["total"], listing["shown"], listing["more"]) == (300, 5, 295)
    assert [m["name"] for m in listing["messages"]] == [f"{1_700_000_000 + i}.M{i}P1Q1.mx" for i in range(299, 294, -1)]
    assert sorted(read) == sorted(m["name"] for m in listing["messages"])
