"""The outbox sends each message once, whatever the number of workers on one database.

Workers claim what they send (`OutboxStore.claim_outbox`) with a lease; a
claim left by a worker that died is taken over when the lease passes.  The
unit tests run on every back end (memory, SQLite, PostgreSQL); the process
tests start N workers as separate processes (`tests.rig.outbox_worker`) over
one database with 1,000 committed messages and count, at the rig's capture
server, how often each message arrived.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from lamsonfilter.decisions import OutboxMessage
from lamsonfilter.outboxworker import OutboxWorker
from lamsonfilter.relay import Relay
from lamsonfilter.state import StateStorage
from lamsonfilter.store.sql import SQLAlchemyStorage
from tests.rig.postfix import CaptureServer, _CaptureHandler

ROOT = Path(__file__).resolve().parents[1]
MESSAGES = 1000
_MID = re.compile(rb"^Message-ID: (<[^>]+>)", re.MULTILINE)


def message(i: int) -> OutboxMessage:
    raw = (f"From: list@example.org\r\nTo: r{i}@example.org\r\nMessage-ID: <m{i}@claims.test>\r\n"
           f"Subject: {i}\r\n\r\nhello\r\n").encode()
    return OutboxMessage(sender="list-bounces@example.org", recipients=(f"r{i}@example.org",), raw=raw,
                         kind="message")


def fill(storage: StateStorage, n: int) -> None:
    for start in range(0, n, 100):
        with storage.transaction() as tx:
            tx.add_outbox([message(i) for i in range(start, min(n, start + 100))])


# ---------------------------------------------------------------- claims, one process
def test_two_workers_never_hold_the_same_message(storage: StateStorage) -> None:
    fill(storage, 12)
    a = storage.claim_outbox("a", 5)
    b = storage.claim_outbox("b", 5)
    c = storage.claim_outbox("c", 5)
    ids = [p.id for p in a + b + c]
    assert len(ids) == 12 and len(set(ids)) == 12  # disjoint, and every message claimed
    assert storage.claim_outbox("d", 5) == []  # all held
    assert storage.renew_claims("a", [p.id for p in a + b]) == {p.id for p in a}


def test_an_expired_claim_is_taken_over_and_the_old_holder_knows(storage: StateStorage) -> None:
    fill(storage, 3)
    dead = storage.claim_outbox("dead", 3, lease=-1.0)  # a lease already over: the worker died
    taken = storage.claim_outbox("alive", 3, lease=300.0)
    assert [p.id for p in taken] == [p.id for p in dead]
    assert storage.renew_claims("dead", [p.id for p in dead]) == set()
    assert storage.claim_outbox("third", 3) == []


def test_deferring_and_releasing_end_the_claim(storage: StateStorage) -> None:
    fill(storage, 2)
    first, second = storage.claim_outbox("a", 2)
    storage.defer_outbox(first.id, first.message.recipients, time.time() - 1, "451 later")
    storage.release_claims("a", [second.id])
    storage.release_claims("other", [first.id])  # not its claim: no effect
    assert sorted(p.id for p in storage.claim_outbox("b", 5)) == [first.id, second.id]


def test_sent_messages_are_never_claimed_again(storage: StateStorage) -> None:
    fill(storage, 2)
    first, second = storage.claim_outbox("a", 2, lease=-1.0)
    storage.mark_sent([first.id])
    assert [p.id for p in storage.claim_outbox("b", 5)] == [second.id]


def test_two_workers_in_one_process_send_each_message_once(storage: StateStorage, capture: CaptureServer) -> None:
    fill(storage, 60)
    workers = [OutboxWorker(storage, Relay("127.0.0.1", capture.port, timeout=10.0), interval=3600.0,
                            batch=7, worker_id=f"t{i}") for i in range(2)]
    threads = [threading.Thread(target=w.flush) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(not t.is_alive() for t in threads)
    counts = collections.Counter(_MID.search(m.data).group(1) for m in capture.messages)  # type: ignore[union-attr]
    assert len(counts) == 60 and set(counts.values()) == {1}
    assert storage.pending_outbox(100) == []


# ---------------------------------------------------------------- N processes
class HoldingCapture(CaptureServer):
    """The capture server, holding the `at`-th DATA of the worker that greets as `victim`
    unanswered until `release` is set (then 451: never recorded, as for a client that died)."""

    def __init__(self, victim: str, at: int) -> None:
        super().__init__()
        self.victim, self.at = victim, at
        self.held, self.release = threading.Event(), threading.Event()
        self.victim_sent = 0

    def start(self) -> HoldingCapture:
        from aiosmtpd.controller import Controller

        self._controller = Controller(_Holding(self), hostname="127.0.0.1", port=self.port,
                                      server_hostname="capture.localdomain", ready_timeout=10.0)
        self._controller.start()
        return self


class _Holding(_CaptureHandler):
    def __init__(self, server: HoldingCapture) -> None:
        super().__init__(server)
        self._holding = server

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        cap = self._holding
        if session.host_name == cap.victim:
            cap.victim_sent += 1
            if cap.victim_sent == cap.at:
                cap.held.set()
                await asyncio.get_running_loop().run_in_executor(None, cap.release.wait, 60.0)
                return "451 4.3.0 held"
        return await super().handle_DATA(server, session, envelope)


def spawn(url: str, port: int, name: str, lease: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.rig.outbox_worker", url, str(port), name,
         "--lease", str(lease), "--batch", "10", "--deadline", "120"],
        cwd=ROOT, stderr=subprocess.PIPE,
    )


def finish(procs: list[subprocess.Popen[bytes]]) -> None:
    try:
        for p in procs:
            _, err = p.communicate(timeout=150)
            assert p.returncode == 0, err.decode(errors="replace")[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def delivered_once(capture: CaptureServer, url: str) -> None:
    counts = collections.Counter(_MID.search(m.data).group(1) for m in capture.messages)  # type: ignore[union-attr]
    twice = {mid: n for mid, n in counts.items() if n > 1}
    assert twice == {}, f"{len(twice)} message(s) sent more than once"
    assert len(counts) == MESSAGES
    st = SQLAlchemyStorage(url)
    try:
        assert st.pending_outbox(10) == [] and st.failed_outbox(10) == []
    finally:
        st.close()


@pytest.mark.parametrize("workers", [2, 8])
def test_n_worker_processes_send_each_message_once(sql_schema_url: str, workers: int, capture: CaptureServer) -> None:
    st = SQLAlchemyStorage(sql_schema_url)
    try:
        fill(st, MESSAGES)
    finally:
        st.close()
    procs = [spawn(sql_schema_url, capture.port, f"w{i}", lease=300.0) for i in range(workers)]
    finish(procs)
    delivered_once(capture, sql_schema_url)
    helos = collections.Counter(m.helo for m in capture.messages)
    assert len(helos) >= 2, f"one worker did everything: {helos}"  # they really ran side by side


@pytest.mark.parametrize("workers", [2, 8])
def test_a_worker_killed_mid_flush_is_taken_over(sql_schema_url: str, workers: int) -> None:
    st = SQLAlchemyStorage(sql_schema_url)
    try:
        fill(st, MESSAGES)
    finally:
        st.close()
    with HoldingCapture(victim="w0", at=5) as capture:
        # a short lease, so the takeover comes soon, yet longer than any one SMTP transaction
        # on a loaded machine (a stall past the lease would let another worker send it too)
        procs = [spawn(sql_schema_url, capture.port, f"w{i}", lease=6.0) for i in range(workers)]
        try:
            assert capture.held.wait(60), "the victim never reached its 5th message"
            os.kill(procs[0].pid, signal.SIGKILL)  # mid-flush: claims held, a message on the wire
            procs[0].communicate(timeout=30)
        finally:
            capture.release.set()
        finish(procs[1:])
        delivered_once(capture, sql_schema_url)
        assert procs[0].returncode == -signal.SIGKILL


class _TakenOverDuringSend(Relay):
    """A relay on which, during the first SMTP transaction, another worker takes the message over."""

    def __init__(self, storage: StateStorage) -> None:
        super().__init__(max_recipients=1)
        self.storage = storage
        self.sent: list[tuple[str, ...]] = []
        self.thief: list[int] = []

    def send(self, message: OutboxMessage) -> Any:
        from lamsonfilter.relay import Delivery

        self.sent.append(message.recipients)
        if len(self.sent) == 1:  # the lease (0 s) has passed: another worker claims the message
            self.thief = [p.id for p in self.storage.claim_outbox("thief", 5, lease=300.0)]
        return Delivery(accepted=message.recipients)


def test_a_worker_stops_sending_a_message_it_no_longer_holds(storage: StateStorage) -> None:
    with storage.transaction() as tx:
        tx.add_outbox([OutboxMessage("s@example.org", ("a@x.test", "b@x.test", "c@x.test"), b"Subject: x\r\n\r\n",
                                     "message")])
    relay = _TakenOverDuringSend(storage)
    worker = OutboxWorker(storage, relay, interval=3600.0, lease=0.0, worker_id="slow")
    worker.flush()
    assert relay.sent == [("a@x.test",)]  # renewing before the 2nd transaction found the claim gone
    [pending] = storage.pending_outbox()
    assert relay.thief == [pending.id]
    assert pending.message.recipients == ("b@x.test", "c@x.test")  # progress kept for the new holder
    assert storage.renew_claims("thief", [pending.id]) == {pending.id}


class _Clock:
    """A clock the test moves: `time.time` and `time.monotonic` of the worker and the stores."""

    def __init__(self) -> None:
        self.now = time.time()

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class _SlowRelay(Relay):
    """Each SMTP transaction takes 200 s of the test's clock; after each, a thief tries to claim."""

    def __init__(self, storage: StateStorage, clock: _Clock) -> None:
        super().__init__(max_recipients=1)
        self.storage, self.clock = storage, clock
        self.sent: list[tuple[str, ...]] = []
        self.stolen: list[int] = []

    def send(self, message: OutboxMessage) -> Any:
        from lamsonfilter.relay import Delivery

        self.clock.advance(200.0)
        self.sent.append(message.recipients)
        self.stolen += [p.id for p in self.storage.claim_outbox("thief", 5, lease=300.0)]
        return Delivery(accepted=message.recipients)


def test_the_lease_is_renewed_while_a_long_message_is_sent(
    storage: StateStorage, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import lamsonfilter.memorystore
    import lamsonfilter.outboxworker
    import lamsonfilter.store.outbox

    clock = _Clock()
    for module in (lamsonfilter.outboxworker, lamsonfilter.memorystore, lamsonfilter.store.outbox):
        monkeypatch.setattr(module, "time", clock)
    rcpts = tuple(f"r{i}@x.test" for i in range(4))
    with storage.transaction() as tx:
        tx.add_outbox([OutboxMessage("s@example.org", rcpts, b"Subject: x\r\n\r\n", "message")])
    relay = _SlowRelay(storage, clock)
    OutboxWorker(storage, relay, interval=3600.0, lease=300.0, worker_id="slow").flush()
    assert relay.stolen == []  # 800 s of sending under a 300 s lease: renewed, never free
    assert relay.sent == [(r,) for r in rcpts]
    assert storage.pending_outbox() == []
