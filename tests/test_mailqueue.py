"""The mail queue's claims: one winner per message, nothing removed before done, dead claims taken back."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from lamsonfilter.mailqueue.maildir import EnvelopeMissing, MailQueue, QueueError

RAW = b"From: a@example.com\r\nSubject: hi\r\n\r\nbody\r\n"


def test_put_writes_the_envelope_postfix_style_and_claim_reads_it_back(tmp_path: Path) -> None:
    q = MailQueue(tmp_path / "q")
    name = q.put(RAW, "alice@example.com", "python@lists.example.org")
    data = (tmp_path / "q" / "new" / name).read_bytes()
    assert data.startswith(b"Return-Path: <alice@example.com>\r\nDelivered-To: python@lists.example.org\r\n")
    msg = q.claim(name)
    assert msg is not None
    assert (msg.sender, msg.recipient, msg.raw, msg.attempts) == (
        "alice@example.com", "python@lists.example.org", RAW, 0)
    assert msg.path.parent.name == "claimed" and not (tmp_path / "q" / "new" / name).exists()
    assert q.done(msg) and not msg.path.exists()
    assert q.count() == {"new": 0, "claimed": 0, "retry": 0}


def test_postfix_virtual_delivery_format_with_x_original_to(tmp_path: Path) -> None:
    q = MailQueue(tmp_path)
    q.ensure()
    (tmp_path / "new" / "1.V1I2M3.host").write_bytes(
        b"Return-Path: <>\nX-Original-To: list@x.test\nDelivered-To: list@x.test\nDelivered-To: old@y.test\n"
        b"Subject: bounce\n\nbody\n")
    msg = q.claim("1.V1I2M3.host")
    assert msg is not None and (msg.sender, msg.recipient) == ("", "list@x.test")
    assert msg.raw == b"Delivered-To: old@y.test\nSubject: bounce\n\nbody\n"  # only the top lines are the envelope


@pytest.mark.parametrize("head, why", [
    (b"Subject: no envelope\n\nx\n", "Return-Path"),
    (b"Return-Path: <a@b.test>\nSubject: x\n\nx\n", "Delivered-To"),
    (b"Return-Path: a@b.test\nDelivered-To: c@d.test\n\nx\n", "not <address>"),
])
def test_a_file_without_envelope_is_refused_never_guessed(tmp_path: Path, head: bytes, why: str) -> None:
    q = MailQueue(tmp_path)
    q.ensure()
    (tmp_path / "new" / "m1").write_bytes(head + b"To: someone@x.test\n")
    with pytest.raises(EnvelopeMissing, match=why):
        q.claim("m1")


def test_two_claimers_one_winner(tmp_path: Path) -> None:
    q1, q2 = MailQueue(tmp_path), MailQueue(tmp_path)
    names = [q1.put(RAW, "a@x.test", f"r{i}@x.test") for i in range(200)]
    won: list[list[str]] = [[], []]
    barrier = threading.Barrier(2)

    def run(i: int, q: MailQueue) -> None:
        barrier.wait()
        for n in names:
            m = q.claim(n)
            if m is not None:
                won[i].append(m.name)

    ts = [threading.Thread(target=run, args=(i, q)) for i, q in enumerate((q1, q2))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert sorted(won[0] + won[1]) == sorted(names)
    assert not set(won[0]) & set(won[1])


def test_retry_waits_then_comes_back_with_the_attempt_counted(tmp_path: Path) -> None:
    q = MailQueue(tmp_path, lease=60)
    name = q.put(RAW, "a@x.test", "b@x.test")
    msg = q.claim(name, now=1000.0)
    assert msg is not None and q.retry(msg, delay=30, now=1000.0)
    assert list(q.scan()) == []
    assert q.release_due(now=1029.0) == 0
    assert q.release_due(now=1031.0) == 1
    (again,) = list(q.scan())
    m2 = q.claim(again)
    assert m2 is not None and m2.name == name and m2.attempts == 1


def test_a_dead_workers_claim_is_taken_back_after_its_lease(tmp_path: Path) -> None:
    q = MailQueue(tmp_path, lease=100)
    name = q.put(RAW, "a@x.test", "b@x.test")
    msg = q.claim(name, now=1000.0)
    assert msg is not None and msg.until == 1100.0
    assert q.release_due(now=1100.0) == 0          # still within its lease (and the grace)
    assert q.release_due(now=1106.0) == 1
    assert not q.done(msg)                           # the late worker learns it lost the claim
    m2 = q.claim(next(q.scan()))
    assert m2 is not None and m2.attempts == 1 and m2.raw == RAW


def test_operator_view_requeue_and_remove(tmp_path: Path) -> None:
    q = MailQueue(tmp_path, lease=3600)
    a = q.put(RAW, "a@x.test", "b@x.test")
    b = q.put(RAW, "a@x.test", "c@x.test")
    mb = q.claim(b)
    assert mb is not None
    assert {(e.name, e.state) for e in q.entries()} == {(a, "new"), (b, "claimed")}
    with pytest.raises(QueueError, match="being processed"):
        q.remove(b)
    assert q.retry(mb, delay=3600)
    assert q.requeue(b).state == "new"
    _, sender, rcpt, raw = q.read(b)
    assert (sender, rcpt, raw) == ("a@x.test", "c@x.test", RAW)
    q.remove(a)
    with pytest.raises(QueueError, match="no message"):
        q.find(a)
    with pytest.raises(QueueError, match="not the name"):
        q.find("../etc/passwd")


def test_put_with_a_name_is_idempotent_and_durable(tmp_path: Path) -> None:
    q = MailQueue(tmp_path)
    assert q.put(RAW, "a@x.test", "b@x.test", name="key1") == "key1"
    assert q.put(b"other", "a@x.test", "b@x.test", name="key1") == "key1"
    assert (tmp_path / "new" / "key1").read_bytes().endswith(RAW)
    assert os.listdir(tmp_path / "tmp") == []
    with pytest.raises(QueueError):
        q.put(RAW, "a@x.test\r\nX: y", "b@x.test")
