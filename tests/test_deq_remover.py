"""Finished queue files leave in two steps: a rename into ``done/`` on the worker's path, the unlink off it.

`MailQueue.done` with ``later`` renames the claimed file into ``done/``
(nothing claims from there: a finished message is never run again, even
if the process dies before the unlink), and a remover unlinks it: a
child process (`ChildRemover`), or threads (`Remover`).  What a ``deq`` killed with ``kill -9`` left in ``done/`` is
unlinked by the next ``deq``, never run.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from lamsonfilter.mailqueue.maildir import MailQueue
from lamsonfilter.queueworker.remover import ChildRemover, Remover
from tests.rig.postfix import CaptureServer
from tests.rig.proxy import make_app
from tests.test_deq import deq, message, summary

RAW = b"From: a@example.com\r\nSubject: hi\r\n\r\nbody\r\n"


def test_done_later_renames_into_done_and_hands_the_path_over(tmp_path: Path) -> None:
    q = MailQueue(tmp_path, lease=100)
    q.ensure()
    name = q.put(RAW, "a@x.test", "b@x.test")
    msg = q.claim(name, now=1000.0)
    assert msg is not None
    handed: list[str] = []
    assert q.done(msg, later=handed.append)
    assert handed == [str(tmp_path / "done" / os.path.basename(msg.file))] and os.path.exists(handed[0])
    assert not msg.path.exists()
    # finished: not in any folder a worker claims from, not taken back, not counted
    assert list(q.scan()) == [] and q.release_due(now=10**10) == 0
    assert q.count() == {"new": 0, "claimed": 0, "retry": 0}
    assert list(q.entries()) == []
    assert q.sweep_done() == 1 and os.listdir(tmp_path / "done") == []


def test_done_later_after_the_claim_was_taken_back_is_false_and_hands_nothing(tmp_path: Path) -> None:
    q = MailQueue(tmp_path, lease=100)
    q.ensure()
    msg = q.claim(q.put(RAW, "a@x.test", "b@x.test"), now=1000.0)
    assert msg is not None and q.release_due(now=1106.0) == 1
    handed: list[str] = []
    assert not q.done(msg, later=handed.append)
    assert handed == [] and len(list(q.scan())) == 1   # the taker-over has it


def test_a_queue_without_done_folder_unlinks_in_place(tmp_path: Path) -> None:
    q = MailQueue(tmp_path)
    name = q.put(RAW, "a@x.test", "b@x.test")
    (tmp_path / "done").rmdir()   # a queue made before done/ existed, by hand
    msg = q.claim(name)
    assert msg is not None
    handed: list[str] = []
    assert q.done(msg, later=handed.append) and handed == [] and not msg.path.exists()


def test_the_remover_unlinks_everything_and_close_waits_for_the_backlog(tmp_path: Path) -> None:
    paths = [tmp_path / f"f{i}" for i in range(300)]
    for p in paths:
        p.write_bytes(b"x" * 2048)
    remover = Remover(backlog=10_000)
    for p in paths:
        remover.remove(str(p))
    remover.remove(str(tmp_path / "gone-already"))   # no error: another sweep was first
    remover.close()
    assert os.listdir(tmp_path) == [] and remover.inline == 0
    remover.remove(str(tmp_path / "late"))           # after close: in the caller's thread
    assert remover.inline == 1


def test_the_child_remover_unlinks_everything_and_close_waits_for_it(tmp_path: Path) -> None:
    paths = [tmp_path / f"f{i}" for i in range(1000)]
    for p in paths:
        p.write_bytes(b"x" * 2048)
    remover = ChildRemover()
    child = remover._proc
    for p in paths:
        remover.remove(str(p))
    remover.remove(str(tmp_path / "gone-already"))   # no error: a sweep was first
    remover.close(timeout=30)
    assert child.returncode == 0 and os.listdir(tmp_path) == []


def test_when_the_child_dies_the_worker_unlinks_itself(tmp_path: Path) -> None:
    remover = ChildRemover()
    remover._proc.kill()
    remover._proc.wait(10)
    paths = [tmp_path / f"f{i}" for i in range(3)]
    for p in paths:
        p.write_bytes(b"x")
        remover.remove(str(p))                       # EPIPE on the first: from then on here
    assert os.listdir(tmp_path) == []
    remover.close()


def test_the_backlog_is_bounded_the_caller_unlinks_past_it(tmp_path: Path) -> None:
    remover = Remover(backlog=5, threads=1)
    release = threading.Event()
    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"")
    import lamsonfilter.queueworker.remover as module

    real = module._unlink

    def slow(path: str) -> None:
        if path == str(blocker):
            release.wait(10)
        real(path)

    module._unlink = slow
    try:
        remover.remove(str(blocker))            # the one thread waits on it
        paths = [tmp_path / f"f{i}" for i in range(20)]
        for p in paths:
            p.write_bytes(b"x")
            remover.remove(str(p))
        # 5 wait (4 if the thread had not taken the blocker off the backlog yet); the rest were
        # unlinked by the caller
        assert remover.inline in (15, 16)
        assert sum(p.exists() for p in paths) == 20 - remover.inline
    finally:
        release.set()
        module._unlink = real
        remover.close()
    assert os.listdir(tmp_path) == []


def test_what_a_killed_deq_left_in_done_is_removed_never_run(tmp_path: Path, capture: CaptureServer) -> None:
    app = make_app(tmp_path / "app", "POISON_LIMIT = 2\n")
    q = MailQueue(tmp_path / "queue")
    q.ensure()
    # finished by a deq that was killed between the rename into done/ and the unlink: a
    # message that would be delivered through the relay if it ran again
    q.put(message("a@example.com", "tag@lists.example.org", "finished"), "a@example.com", "tag@lists.example.org")
    (name,) = list(q.scan())
    msg = q.claim(name)
    assert msg is not None and q.done(msg, later=lambda path: None)
    assert len(os.listdir(q.path / "done")) == 1
    # and one new message that runs
    q.put(message("b@example.com", "tag@lists.example.org", "new one"), "b@example.com", "tag@lists.example.org")
    assert summary(deq(app, q.path, capture)) == (1, 0, 0)
    assert os.listdir(q.path / "done") == [] and q.count() == {"new": 0, "claimed": 0, "retry": 0}
    subjects = [m.data for m in capture.messages]
    assert len(subjects) == 1 and b"Subject: new one" in subjects[0]


def test_the_child_outlives_sigterm_and_ends_at_the_end_of_the_pipe(tmp_path: Path) -> None:
    """systemd's stop sends SIGTERM to every process of the unit: the child keeps removing
    what deq's last messages hand over, and ends when deq closes the pipe."""
    import signal
    import time

    remover = ChildRemover()
    child = remover._proc
    first = tmp_path / "first"
    first.write_bytes(b"x")
    remover.remove(str(first))
    end = time.monotonic() + 30
    while first.exists() and time.monotonic() < end:  # unlinked: the child runs, its handlers set
        time.sleep(0.01)
    assert not first.exists()
    child.send_signal(signal.SIGTERM)
    later = tmp_path / "after-sigterm"
    later.write_bytes(b"x")
    remover.remove(str(later))
    remover.close(timeout=30)
    assert child.returncode == 0 and not later.exists()
