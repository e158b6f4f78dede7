"""The feeder's bounds and the inotify watch of ``deq`` (`lamsonfilter.queueworker.pool`, `.watch`), on a real queue."""

from __future__ import annotations

import threading
from pathlib import Path

from lamsonfilter.mailqueue.maildir import MailQueue
from lamsonfilter.queueworker.pool import Feeder
from lamsonfilter.queueworker.watch import NewMailWatch

RAW = b"From: a@example.com\r\nSubject: s\r\n\r\nbody\r\n"


def filled(path: Path, n: int) -> MailQueue:
    queue = MailQueue(path, lease=300)
    for i in range(n):
        queue.put(RAW, "a@example.com", f"r{i}@example.org")
    return queue


def test_never_more_than_workers_messages_claimed_at_once(tmp_path: Path) -> None:
    queue = filled(tmp_path / "q", 300)
    lock = threading.Lock()
    seen = {"now": 0, "most": 0, "most_claimed": 0, "most_handed": 0, "done": 0}

    def handle(name: str) -> None:
        msg = queue.claim(name)
        assert msg is not None
        with lock:
            seen["now"] += 1
            seen["most"] = max(seen["most"], seen["now"])
            seen["most_claimed"] = max(seen["most_claimed"], queue.count()["claimed"])
            seen["most_handed"] = max(seen["most_handed"], feeder.inflight)  # names handed out, not done
        with lock:
            seen["now"] -= 1
            seen["done"] += 1
        queue.done(msg)

    feeder = Feeder(queue, handle, workers=3, once=True)
    feeder.run()
    assert seen["done"] == 300 and queue.count() == {"new": 0, "claimed": 0, "retry": 0}
    assert 1 <= feeder.peak <= 3 and seen["most"] <= 3 and seen["most_claimed"] <= 3
    assert seen["most_handed"] <= 3  # the feeder waited: not the whole queue in the pool's own queue


def test_once_stops_when_only_future_retries_are_left(tmp_path: Path) -> None:
    queue = filled(tmp_path / "q", 5)
    handled: list[str] = []

    def handle(name: str) -> None:
        msg = queue.claim(name)
        assert msg is not None
        handled.append(msg.name)
        queue.retry(msg, delay=3600)

    Feeder(queue, handle, workers=2, once=True).run()
    assert len(handled) == 5 and queue.count() == {"new": 0, "claimed": 0, "retry": 5}


def test_a_due_retry_is_taken_back_in_the_same_run(tmp_path: Path) -> None:
    queue = filled(tmp_path / "q", 1)
    tries: list[int] = []

    def handle(name: str) -> None:
        msg = queue.claim(name)
        assert msg is not None
        tries.append(msg.attempts)
        if msg.attempts == 0:
            queue.retry(msg, delay=-10)  # already due
        else:
            queue.done(msg)

    Feeder(queue, handle, workers=1, once=True).run()
    assert tries == [0, 1] and queue.count() == {"new": 0, "claimed": 0, "retry": 0}


def test_a_resident_feeder_sleeps_until_stopped(tmp_path: Path) -> None:
    queue = filled(tmp_path / "q", 0)
    queue.ensure()
    watch = NewMailWatch(queue.path / "new")
    handled: list[str] = []
    arrived = threading.Event()

    def handle(name: str) -> None:
        msg = queue.claim(name)
        assert msg is not None
        handled.append(name)
        queue.done(msg)
        arrived.set()

    feeder = Feeder(queue, handle, workers=2, watch=watch)
    thread = threading.Thread(target=feeder.run)
    thread.start()
    try:
        queue.put(RAW, "a@example.com", "late@example.org")
        assert arrived.wait(60)
    finally:
        feeder.stop()
        thread.join(60)
        watch.close()
    assert not thread.is_alive() and len(handled) == 1


def test_the_watch_sees_a_new_file_and_a_wake(tmp_path: Path) -> None:
    new = tmp_path / "new"
    new.mkdir()
    watch = NewMailWatch(new)
    try:
        assert watch.watching  # Linux: inotify through ctypes
        assert watch.wait(0) is False  # nothing yet
        (tmp_path / "f").write_bytes(b"x")
        (tmp_path / "f").rename(new / "f")  # as a Maildir delivery: moved in
        assert watch.wait(30) is True
        assert watch.wait(0) is False  # the event was consumed
        watch.wake()
        assert watch.wait(30) is True
    finally:
        watch.close()


def test_without_inotify_the_watch_is_a_timer(tmp_path: Path) -> None:
    watch = NewMailWatch(tmp_path, use_inotify=False)
    try:
        assert not watch.watching
        (tmp_path / "f").write_bytes(b"x")
        assert watch.wait(0) is False  # nothing watches: the caller's rescan finds it
    finally:
        watch.close()
