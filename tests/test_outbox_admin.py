"""The operator's side of the outbox (`OutboxStore.outbox_entries` ... `drop_outbox`) on every back end."""

from __future__ import annotations

import time

import pytest

from lamsonfilter.decisions import OutboxMessage
from lamsonfilter.state import OutboxBusy, OutboxNotFound, StateStorage


def fill(storage: StateStorage, n: int) -> list[int]:
    with storage.transaction() as tx:
        tx.add_outbox([OutboxMessage("s@example.org", (f"r{i}@example.org",), b"Subject: %d\r\n\r\n" % i)
                       for i in range(n)])
    return [p.id for p in storage.pending_outbox(100)]


def test_entries_counts_and_one_entry(storage: StateStorage) -> None:
    a, b, c, d = fill(storage, 4)
    storage.fail_outbox(b, ["r1@example.org"], "550 5.1.1 gone")
    storage.defer_outbox(c, ["r2@example.org"], time.time() + 600, "451 later")
    [claimed] = storage.claim_outbox("w1", limit=1, lease=300)
    assert claimed.id == a
    assert storage.outbox_counts() == {"pending": 3, "failed": 1, "claimed": 1}
    entries = storage.outbox_entries()
    assert [(e.item.id, e.state) for e in entries] == [(a, "pending"), (b, "failed"), (c, "pending"),
                                                       (d, "pending")]
    assert entries[0].claimed_by == "w1" and entries[0].held(time.time())
    assert not entries[2].held(time.time()) and entries[2].item.last_error == "451 later"
    assert [e.item.id for e in storage.outbox_entries(("failed",))] == [b]
    assert [e.item.id for e in storage.outbox_entries(("pending",), after=a, limit=1)] == [c]
    assert storage.outbox_entries(limit=0) == []
    assert storage.outbox_entry(b).item.last_error == "550 5.1.1 gone"
    with pytest.raises(OutboxNotFound):
        storage.outbox_entry(9999)


def test_retry_and_drop_refuse_a_held_message_and_not_an_expired_claim(storage: StateStorage) -> None:
    a, b, c = fill(storage, 3)
    storage.fail_outbox(b, ["r1@example.org"], "550 gone")
    storage.claim_outbox("w1", limit=1, lease=300)  # holds a
    with pytest.raises(OutboxBusy, match="w1"):
        storage.retry_outbox(a)
    with pytest.raises(OutboxBusy):
        storage.drop_outbox(a)
    assert storage.renew_claims("w1", [a]) == {a}
    later = time.time() + 3600  # the lease over: nobody holds it
    assert storage.retry_outbox(a, now=later).claimed_by is None
    assert storage.renew_claims("w1", [a]) == set()  # the old worker lost it and stops

    retried = storage.retry_outbox(b)
    assert retried.state == "pending" and retried.item.next_attempt is None
    assert storage.failed_outbox() == [] and {p.id for p in storage.pending_outbox(due_before=time.time())} == {a, b, c}
    assert [p.id for p in storage.claim_outbox("w2", limit=10)] == [a, b, c]  # the worker takes it again
    storage.release_claims("w2", [a, b, c])

    dropped = storage.drop_outbox(c)
    assert dropped.item.id == c and dropped.state == "pending"
    with pytest.raises(OutboxNotFound):
        storage.drop_outbox(c)
    storage.mark_sent([a])
    with pytest.raises(OutboxNotFound):
        storage.retry_outbox(a)
    assert [p.id for p in storage.pending_outbox()] == [b]
