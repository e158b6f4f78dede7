"""A claim taken back from a dead ``deq`` worker runs alone (`MailQueue.release_due`, `Feeder`).

Without it, a message in flight next to a poison message at each of its
deaths was charged with them and quarantined as poison too
(tests/reliability/test_deq_faults.py found it with two workers).
"""

from __future__ import annotations

import threading
from pathlib import Path

from lamsonfilter.mailqueue.maildir import MailQueue, taken_back
from lamsonfilter.queueworker.pool import Feeder

RAW = b"From: a@example.com\r\nSubject: s\r\n\r\nbody\r\n"


def test_a_dead_claim_comes_back_marked_and_a_retry_does_not(tmp_path: Path) -> None:
    queue = MailQueue(tmp_path / "q", lease=10)
    queue.put(RAW, "a@example.com", "dead@example.org", name="dead")
    queue.put(RAW, "a@example.com", "later@example.org", name="later")
    dead = queue.claim("dead", now=1000.0)
    later = queue.claim("later", now=1000.0)
    assert dead is not None and later is not None
    queue.retry(later, delay=0, now=1000.0)
    assert queue.release_due(now=2000.0) == 2
    names = sorted(queue.scan())
    assert [taken_back(n) for n in names] == [True, False], names  # "dead;died=1;n=1", "later;n=1"
    again = queue.claim(next(n for n in names if n.startswith("dead")))
    assert again is not None and again.attempts == 1 and again.name == "dead"


def test_the_feeder_runs_a_taken_back_message_alone(tmp_path: Path) -> None:
    queue = MailQueue(tmp_path / "q", lease=10)
    for i in range(30):
        queue.put(RAW, "a@example.com", f"r{i}@example.org", name=f"m{i}")
    for i in (7, 19):  # two claims whose worker died
        assert queue.claim(f"m{i}", now=1000.0) is not None
    assert queue.release_due(now=2000.0) == 2
    lock = threading.Lock()
    running: set[str] = set()
    overlaps: list[tuple[str, frozenset[str]]] = []
    done: list[str] = []
    gate = threading.Event()

    def handle(name: str) -> None:
        msg = queue.claim(name)
        assert msg is not None
        with lock:
            running.add(msg.name)
            if msg.name in ("m7", "m19") and len(running) > 1 or running & {"m7", "m19"} - {msg.name}:
                overlaps.append((msg.name, frozenset(running)))
        gate.wait(0.005)  # give another thread the chance to overlap, if the feeder allowed it
        with lock:
            running.discard(msg.name)
            done.append(msg.name)
        queue.done(msg)

    feeder = Feeder(queue, handle, workers=4, once=True)
    feeder.run()
    assert sorted(done) == sorted(f"m{i}" for i in range(30)) and queue.count()["new"] == 0
    assert overlaps == [], overlaps
    assert feeder.peak > 1  # the others still ran side by side
