"""The runtime's half of ctx.defer(): the message durable in the queue before `Runtime.process`
returns, named so that a retry does not queue it twice, a tempfail when it cannot be written."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from lamsonfilter import Action, App, Handler, MailRequest
from lamsonfilter.daemon.runtime import Runtime, deferral_name
from lamsonfilter.mailqueue.maildir import MailQueue
from lamsonfilter.replies import TEMPFAIL
from lamsonfilter.testing import make_message

HOST = "app.example"
SLOW = f"slow@{HOST}"
TAG = f"tag@{HOST}"
ALICE = "alice@example.com"


def tag_handler() -> Handler:
    """A stateful handler that delivers and counts its messages (the recipient not deferred)."""
    t = Handler("tag", default_action="deliver")

    @t.route("tag@(host)")
    def START(ctx, host):
        ctx.data["n"] = ctx.data.get("n", 0) + 1
        return COUNTED

    @t.state
    def COUNTED(ctx):
        ctx.data["n"] += 1

    return t


def make_runtime(queue: Path, storage=None) -> Runtime:
    h = Handler("slow")

    @h.route("slow@(host)")
    def START(ctx, host):
        if not ctx.from_queue:
            ctx.defer()
        ctx.data["subject"] = ctx.header("Subject")
        return DONE

    @h.state
    def DONE(ctx):
        return None

    t = tag_handler()

    kw = {"storage": storage} if storage is not None else {}
    app = App(hosts=[HOST], handlers=[h, t], route_defaults={"host": r"app\.example"},
              settings={"QUEUE": str(queue), "APP_DIR": str(queue.parent)}, **kw).start()
    return Runtime(app)


def req(to, subject="slow work", message_id=True, queue_id="QID1"):
    raw = make_message(ALICE, to, subject=subject)
    if not message_id:
        raw = b"".join(line for line in raw.splitlines(keepends=True) if not line.startswith(b"Message-ID"))
    return MailRequest.from_bytes(raw, sender=ALICE, recipients=list(to), queue_id=queue_id)


def queued(queue: Path) -> list[Path]:
    return sorted((queue / "new").iterdir()) if (queue / "new").is_dir() else []


def test_the_message_is_in_the_queue_fsynced_before_process_returns(tmp_path, monkeypatch):
    queue = tmp_path / "queue"
    rt = make_runtime(queue)
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    request = req([TAG, SLOW])
    key = "ident:QID1:abc"
    d = rt.process(request, replay_key=key, transport="test")
    assert [o.action for o in d.outcomes] == [Action.DELIVER, Action.DEFER]
    (path,) = queued(queue)
    assert path.name == deferral_name(key, SLOW)
    # the file was fsynced (written under tmp/, then renamed) and so was new/ after the rename
    assert synced == [str(queue / "tmp" / path.name), str(queue / "new")]
    data = path.read_bytes()
    assert data.startswith(f"Return-Path: <{ALICE}>\r\nDelivered-To: {SLOW}\r\n".encode())
    assert data.endswith(request.raw)
    msg = MailQueue(queue).claim(path.name)
    assert msg is not None and (msg.sender, msg.recipient, msg.raw) == (ALICE, SLOW, request.raw)


def test_a_retry_does_not_queue_twice_even_while_the_message_is_claimed(tmp_path):
    queue = tmp_path / "queue"
    rt = make_runtime(queue)
    key = "ident:QID1:abc"
    rt.process(req([SLOW]), replay_key=key)
    rt.process(req([SLOW]), replay_key=key)
    (path,) = queued(queue)
    assert MailQueue(queue).claim(path.name) is not None  # a deq worker is running it
    d = rt.process(req([SLOW]), replay_key=key)
    assert d.outcomes[0].action is Action.DEFER and queued(queue) == []
    assert len(list((queue / "claimed").iterdir())) == 1


def test_without_a_replay_key_each_deferral_gets_a_name_of_its_own(tmp_path):
    queue = tmp_path / "queue"
    rt = make_runtime(queue)
    assert deferral_name(None, SLOW) is None
    rt.process(req([SLOW], message_id=False), replay_key=None)
    rt.process(req([SLOW], message_id=False), replay_key=None)
    assert len(queued(queue)) == 2


def test_an_unwritable_queue_is_a_tempfail_and_the_retry_queues_it(tmp_path, storage, caplog):
    queue = tmp_path / "queue"
    queue.write_text("not a directory")  # unwritable even for root
    rt = make_runtime(queue, storage)
    key = "ident:QID1:abc"
    with caplog.at_level(logging.INFO, logger="lamsonfilter"):
        d = rt.process(req([TAG, SLOW]), replay_key=key, transport="test")
    assert d.is_tempfail and all(o.action is Action.TEMPFAIL for o in d.outcomes)
    assert {(o.code, o.enhanced) for o in d.outcomes} == {(TEMPFAIL.code, TEMPFAIL.enhanced)}
    assert "deferred message could not be queued" in caplog.text
    assert "decision=tempfail" in caplog.text
    # nothing lost: the MTA retries; once the queue can be written the retry queues it
    queue.unlink()
    again = rt.process(req([TAG, SLOW]), replay_key=key, transport="test")
    assert [o.action for o in again.outcomes] == [Action.DELIVER, Action.DEFER]
    (path,) = queued(queue)
    assert path.name == deferral_name(key, SLOW)
    with rt.app.storage.transaction(commit=False) as tx:  # the other recipient's state: once
        assert tx.get(f"tag:{ALICE}:{TAG}").data == {"n": 1}


def test_the_queued_message_runs_from_the_queue_through_the_runtime(tmp_path, storage):
    """What ``lamsonfilter deq`` does with it (claim, from_queue, the queue name as replay key)."""
    queue = tmp_path / "queue"
    rt = make_runtime(queue, storage)
    rt.process(req([SLOW], subject="the report"), replay_key="ident:QID1:abc")
    q = MailQueue(queue)
    (name,) = list(q.scan())
    msg = q.claim(name)
    assert msg is not None
    later = MailRequest.from_bytes(msg.raw, sender=msg.sender, recipients=[msg.recipient], queue_id=msg.name)
    later.from_queue = True
    d = rt.process(later, replay_key=msg.name, transport="queue")
    o = d.outcomes[0]
    assert (o.action, o.state_before, o.state_after) == (Action.DROP, "START", "DONE")
    assert q.done(msg) and queued(queue) == []
    with rt.app.storage.transaction(commit=False) as tx:
        assert tx.get(f"slow:{ALICE}:{SLOW}").data == {"subject": "the report"}


def test_queue_setting_is_relative_to_the_app_dir(tmp_path):
    from lamsonfilter.settings import queue_dir

    assert queue_dir({"APP_DIR": str(tmp_path)}) == tmp_path / "var" / "queue"
    assert queue_dir({"APP_DIR": str(tmp_path), "QUEUE": "/srv/q"}) == Path("/srv/q")


@pytest.mark.parametrize("key", ["ident:Q:1", "<weird key>\n;=/"])
def test_deferral_names_are_usable_queue_names(key):
    name = deferral_name(key, SLOW)
    assert name is not None and name != deferral_name(key, TAG)
    assert name == deferral_name(key, SLOW.upper())
    from lamsonfilter.mailqueue.maildir import _NAME

    assert _NAME.match(name) and ";" not in name


def test_the_daemons_queue_option_overrides_the_setting(tmp_path):
    """``--queue`` / LAMSONFILTER_QUEUE (the same as deq's) reaches the runtime's queue."""
    import shutil

    from click.testing import CliRunner

    from lamsonfilter.cli import main
    from lamsonfilter.contentfilter.config import ProxyConfig
    from lamsonfilter.contentfilter.server import build_runtime

    root = Path(__file__).resolve().parents[1]
    app = tmp_path / "app"
    shutil.copytree(root / "examples" / "mailinglist", app, ignore=shutil.ignore_patterns("var", "__pycache__"))
    CliRunner().invoke(main, ["db", "init", "--app", str(app)], catch_exceptions=False)
    rt = build_runtime(ProxyConfig(app_dir=app, queue=str(tmp_path / "elsewhere")))
    try:
        assert rt.queue.path == tmp_path / "elsewhere"
    finally:
        rt.stop()
    rt = build_runtime(ProxyConfig(app_dir=app))
    try:
        assert rt.queue.path == app.resolve() / "var" / "queue"
    finally:
        rt.stop()
    for cmd in ("milter", "smtpproxy"):
        out = CliRunner().invoke(main, [cmd, "--help"]).output
        assert "--queue DIR" in out and "LAMSONFILTER_QUEUE" in out


def test_a_bounce_is_queued_with_the_null_sender(tmp_path):
    queue = tmp_path / "queue"
    rt = make_runtime(queue)
    raw = make_message("", SLOW, subject="Undelivered Mail Returned to Sender")
    request = MailRequest.from_bytes(raw, sender="", recipients=[SLOW], queue_id="QB")
    assert rt.process(request, replay_key="ident:QB:x").outcomes[0].action is Action.DEFER
    (path,) = queued(queue)
    assert path.read_bytes().startswith(f"Return-Path: <>\r\nDelivered-To: {SLOW}\r\n".encode())
    msg = MailQueue(queue).claim(path.name)
    assert msg is not None and (msg.sender, msg.recipient) == ("", SLOW)


def test_a_retry_after_the_queued_message_ran_does_not_queue_it_again(tmp_path, storage):
    """The MTA's retry after our 2xx was lost, once deq has run and removed the message."""
    queue = tmp_path / "queue"
    rt = make_runtime(queue, storage)
    key = "ident:QID1:abc"
    rt.process(req([SLOW]), replay_key=key)
    q = MailQueue(queue)
    (name,) = list(q.scan())
    msg = q.claim(name)
    assert msg is not None
    later = MailRequest.from_bytes(msg.raw, sender=msg.sender, recipients=[msg.recipient], queue_id=msg.name)
    later.from_queue = True
    assert rt.process(later, replay_key=msg.name, transport="queue").outcomes[0].action is Action.DROP
    assert q.done(msg) and queued(queue) == []
    again = rt.process(req([SLOW]), replay_key=key)  # replays the deferral ...
    assert again.outcomes[0].action is Action.DEFER
    assert queued(queue) == []  # ... but deq's replay record says it ran: not queued again
