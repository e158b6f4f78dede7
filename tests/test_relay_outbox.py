"""The outbox through a real SMTP relay: nothing lost, nothing repeated.

The relay side is a real SMTP server on 127.0.0.1 (aiosmtpd's
``Controller``) whose handler answers RCPT the way Postfix's smtpd can:
a chosen 4xx or 5xx per recipient, ``452 4.5.3`` past a recipient limit
(Postfix's ``smtpd_recipient_limit``, 1000 by default), with or without
SMTPUTF8.  Every test counts, per recipient, how many copies arrived.
The storage runs on every back end (memory, SQLite, PostgreSQL).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from lamsonfilter.decisions import OutboxMessage
from lamsonfilter.memorystore import MemoryStorage
from lamsonfilter.outboxworker import OutboxWorker
from lamsonfilter.relay import MAX_RECIPIENTS, Delivery, Relay, RelayError
from lamsonfilter.state import StateStorage
from lamsonfilter.store.sql import SQLAlchemyStorage
from tests.rig.fixtures import PostfixFactory
from tests.rig.postfix import CaptureServer, free_port, wait_for

POSTFIX_RECIPIENT_LIMIT = 1000  # smtpd_recipient_limit's default (postconf -d)


# ---------------------------------------------------------------- the relay side
class RelayHandler:
    """Answers RCPT per recipient (`refuse`), refuses past `limit`, records each DATA."""

    def __init__(self, limit: int | None = None) -> None:
        self.refuse: dict[str, str] = {}
        self.limit = limit
        self.received: list[tuple[str, tuple[str, ...], bytes, tuple[str, ...]]] = []
        self.transactions_seen = 0
        self._lock = threading.Lock()

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        if self.limit is not None and len(envelope.rcpt_tos) >= self.limit:
            return "452 4.5.3 Error: too many recipients"
        reply = self.refuse.get(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self._lock:
            self.received.append((str(envelope.mail_from), tuple(envelope.rcpt_tos),
                                  bytes(envelope.original_content or envelope.content),
                                  tuple(envelope.mail_options or ())))
        return "250 2.0.0 Ok: queued"

    def copies(self) -> collections.Counter[str]:
        """How many copies each recipient got."""
        with self._lock:
            return collections.Counter(r for _, rcpts, _, _ in self.received for r in rcpts)

    def wait_for_copies(self, n: int, timeout: float = 30.0) -> collections.Counter[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.copies()
            if sum(got.values()) >= n:
                return got
            time.sleep(0.05)
        raise TimeoutError(f"{sum(self.copies().values())} of {n} copies after {timeout}s")


class SMTPRelay:
    def __init__(self, *, utf8: bool = True, limit: int | None = None) -> None:
        self.handler = RelayHandler(limit)
        self.port = free_port()
        self.utf8 = utf8
        self._controller: Controller | None = None

    def start(self) -> SMTPRelay:
        self._controller = Controller(self.handler, hostname="127.0.0.1", port=self.port,
                                      server_hostname="relay.localdomain", ready_timeout=10.0,
                                      enable_SMTPUTF8=self.utf8)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None


@pytest.fixture
def smtp_relay() -> Iterator[SMTPRelay]:
    server = SMTPRelay(limit=POSTFIX_RECIPIENT_LIMIT).start()
    try:
        yield server
    finally:
        server.stop()


def message(recipients: list[str], subject: str = "post", sender: str = "list-bounces@example.org") -> OutboxMessage:
    raw = (f"From: {sender}\r\nTo: list@example.org\r\nSubject: {subject}\r\n\r\nhello\r\n").encode()
    return OutboxMessage(sender=sender, recipients=tuple(recipients), raw=raw, kind="message")


def commit(storage: StateStorage, *messages: OutboxMessage) -> None:
    with storage.transaction() as tx:
        tx.add_outbox(list(messages))


def worker(storage: StateStorage, relay: SMTPRelay, **kwargs: Any) -> OutboxWorker:
    kwargs.setdefault("min_backoff", 0.0)  # due again at once: the tests flush by hand
    return OutboxWorker(storage, Relay("127.0.0.1", relay.port, timeout=10.0), interval=3600.0, **kwargs)


def subjects(handler: RelayHandler) -> list[str]:
    return [raw.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode() for _, _, raw, _ in handler.received]


# ---------------------------------------------------------------- bug 1: partial refusal
def test_partial_refusal_never_repeats_accepted_recipients(storage: StateStorage, smtp_relay: SMTPRelay,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    h = smtp_relay.handler
    h.refuse = {"later@example.net": "451 4.3.0 try again later",
                "bad@example.net": "550 5.1.1 no such user"}
    commit(storage, message(["a@example.org", "later@example.net", "b@example.org", "bad@example.net"]))
    w = worker(storage, smtp_relay)
    with caplog.at_level(logging.WARNING, logger="lamsonfilter.relay"):
        assert w.flush() == 1
    assert h.copies() == {"a@example.org": 1, "b@example.org": 1}
    [item] = storage.pending_outbox()
    assert item.message.recipients == ("later@example.net",)  # only the 4xx one is left
    assert item.attempts == 1 and "451" in item.last_error
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(f"message {item.id} to <bad@example.net>" in e and "550" in e for e in errors), errors

    for _ in range(3):  # the 4xx goes on: only that recipient is tried, nobody gets a second copy
        w.flush()
    assert h.copies() == {"a@example.org": 1, "b@example.org": 1}
    assert storage.pending_outbox()[0].attempts == 4

    del h.refuse["later@example.net"]
    w.flush()
    assert h.copies() == {"a@example.org": 1, "b@example.org": 1, "later@example.net": 1}
    assert storage.pending_outbox() == []
    [failed] = storage.failed_outbox()  # bad@'s copy: kept, marked failed, never retried
    assert failed.message.recipients == ("bad@example.net",) and "550 5.1.1" in failed.last_error
    for _ in range(2):
        w.flush()
    assert sum(h.copies().values()) == 3  # injected 4 recipients: 3 delivered once, 1 refused, 0 duplicated


def test_a_message_refused_for_good_is_kept_as_failed(storage: StateStorage, smtp_relay: SMTPRelay) -> None:
    smtp_relay.handler.refuse = {"bad@example.net": "550 5.1.1 no such user"}
    commit(storage, message(["ok@example.org", "bad@example.net"], "one"), message(["bad@example.net"], "two"))
    worker(storage, smtp_relay).flush()
    assert smtp_relay.handler.copies() == {"ok@example.org": 1}
    assert storage.pending_outbox() == []
    failed = storage.failed_outbox()
    assert [f.message.recipients for f in failed] == [("bad@example.net",), ("bad@example.net",)]
    assert all("550" in f.last_error and f.attempts == 1 for f in failed)


def test_more_recipients_than_postfix_takes_are_split(storage: StateStorage, smtp_relay: SMTPRelay) -> None:
    """1200 recipients: Postfix's smtpd answers 452 past 1000; the relay sends 500 per transaction."""
    assert MAX_RECIPIENTS < POSTFIX_RECIPIENT_LIMIT
    rcpts = [f"member{i}@example.org" for i in range(1200)]
    commit(storage, message(rcpts, "big"), message(["after@example.org"], "after"))
    worker(storage, smtp_relay).flush()
    copies = smtp_relay.handler.copies()
    assert len(copies) == 1201 and set(copies.values()) == {1}
    assert max(len(r) for _, r, _, _ in smtp_relay.handler.received) <= MAX_RECIPIENTS
    assert storage.pending_outbox() == [] and storage.failed_outbox() == []


def test_without_chunks_the_452_is_retried_for_the_refused_only(smtp_relay: SMTPRelay) -> None:
    """A relay configured above the server's limit: the 452s are deferred, the 1000 never resent."""
    storage = MemoryStorage()
    commit(storage, message([f"m{i}@example.org" for i in range(1100)]))
    w = OutboxWorker(storage, Relay("127.0.0.1", smtp_relay.port, max_recipients=5000), min_backoff=0.0)
    w.flush()
    assert sum(smtp_relay.handler.copies().values()) == 1000
    [item] = storage.pending_outbox()
    assert len(item.message.recipients) == 100 and "452" in item.last_error
    w.flush()
    copies = smtp_relay.handler.copies()
    assert len(copies) == 1100 and set(copies.values()) == {1}


def test_a_failing_message_does_not_block_later_ones_and_is_given_up(
    storage: StateStorage, smtp_relay: SMTPRelay, caplog: pytest.LogCaptureFixture
) -> None:
    smtp_relay.handler.refuse = {"stuck@example.net": "452 4.2.2 mailbox full"}
    commit(storage, message(["stuck@example.net"], "stuck"))
    commit(storage, message(["x@example.org"], "second"), message(["y@example.org"], "third"))
    w = worker(storage, smtp_relay, max_attempts=3)
    w.flush()
    assert subjects(smtp_relay.handler) == ["second", "third"]
    with caplog.at_level(logging.ERROR, logger="lamsonfilter.relay"):
        for _ in range(5):
            w.flush()
    assert storage.pending_outbox() == []
    [failed] = storage.failed_outbox()
    assert failed.attempts == 3 and failed.message.recipients == ("stuck@example.net",)
    assert "452 4.2.2" in failed.last_error
    assert any(f"message {failed.id} given up after 3 attempt(s)" in r.getMessage() for r in caplog.records)
    assert smtp_relay.handler.copies() == {"x@example.org": 1, "y@example.org": 1}


def test_given_up_after_the_maximal_age(storage: StateStorage, smtp_relay: SMTPRelay) -> None:
    smtp_relay.handler.refuse = {"slow@example.net": "421 4.4.2 timeout"}
    commit(storage, message(["slow@example.net"]))
    worker(storage, smtp_relay, max_age=0.0).flush()
    assert storage.pending_outbox() == [] and len(storage.failed_outbox()) == 1


def test_backoff_per_message(storage: StateStorage, smtp_relay: SMTPRelay) -> None:
    smtp_relay.handler.refuse = {"later@example.net": "451 4.3.0 later"}
    commit(storage, message(["later@example.net"]))
    w = worker(storage, smtp_relay, min_backoff=300.0, max_backoff=4000.0)
    before = time.time()
    w.flush()
    [item] = storage.pending_outbox()
    assert item.next_attempt is not None and item.next_attempt >= before + 300
    assert storage.pending_outbox(due_before=time.time()) == []  # not due: the next flush leaves it
    assert w.flush() == 0 and storage.pending_outbox()[0].attempts == 1
    assert len(storage.pending_outbox(due_before=item.next_attempt)) == 1


def test_an_unreachable_relay_counts_no_attempt(storage: StateStorage, caplog: pytest.LogCaptureFixture) -> None:
    down = SMTPRelay()  # its port, nothing listening yet
    commit(storage, message(["a@example.org"], "one"), message(["b@example.org"], "two"))
    w = worker(storage, down)
    with caplog.at_level(logging.WARNING, logger="lamsonfilter.relay"):
        w.flush()
    # one WARNING naming the relay as the settings write it (host:port), not a Python repr
    [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert line.startswith(f"outbox: relay 127.0.0.1:{down.port} unreachable, messages stay pending"), line
    assert [(p.attempts, p.next_attempt) for p in storage.pending_outbox()] == [(0, None), (0, None)]
    down.start()
    try:
        w.flush()
        assert down.handler.copies() == {"a@example.org": 1, "b@example.org": 1}
    finally:
        down.stop()


def test_progress_is_recorded_per_transaction(storage: StateStorage, smtp_relay: SMTPRelay) -> None:
    """The relay goes down after the first transaction: the first chunk is never sent again."""

    class GoesDown(Relay):
        calls = 0

        def send(self, message: OutboxMessage) -> Delivery:
            self.calls += 1
            if self.calls == 2:
                smtp_relay.stop()  # a real refused connection from here on
            return super().send(message)

    rcpts = [f"r{i}@example.org" for i in range(5)]
    commit(storage, message(rcpts))
    w = OutboxWorker(storage, GoesDown("127.0.0.1", smtp_relay.port, max_recipients=2), min_backoff=0.0)
    w.flush()
    [item] = storage.pending_outbox()
    assert item.message.recipients == tuple(rcpts[2:]) and item.attempts == 0
    smtp_relay.start()
    w.flush()
    copies = smtp_relay.handler.copies()
    assert copies == {r: 1 for r in rcpts}
    assert storage.pending_outbox() == []


def test_a_421_mid_rcpt_defers_the_recipients_never_asked(storage: StateStorage, smtp_relay: SMTPRelay) -> None:
    smtp_relay.handler.refuse = {"c@example.org": "421 4.3.2 shutting down"}
    rcpts = ["a@example.org", "b@example.org", "c@example.org", "d@example.org"]
    commit(storage, message(rcpts))
    w = worker(storage, smtp_relay)
    w.flush()
    assert smtp_relay.handler.copies() == {}  # the connection closed before DATA
    assert storage.pending_outbox()[0].message.recipients == tuple(rcpts)
    smtp_relay.handler.refuse = {}
    w.flush()
    assert smtp_relay.handler.copies() == {r: 1 for r in rcpts}


# ---------------------------------------------------------------- bug 2: SMTPUTF8, a dying thread
def test_smtputf8_needed_but_missing_is_a_permanent_failure(storage: StateStorage,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    relay = SMTPRelay(utf8=False).start()
    try:
        commit(storage,
               message(["a@example.org"], "utf8 sender", sender="jörg@exämple.org"),
               message(["b@example.org", "jürgen@example.org"], "utf8 rcpt"),
               message(["c@example.org"], "plain"))
        w = worker(storage, relay)
        w.start()
        try:
            with caplog.at_level(logging.ERROR, logger="lamsonfilter.relay"):
                w.wake()
                got = relay.handler.wait_for_copies(2)
                deadline = time.monotonic() + 30
                while len(storage.failed_outbox()) < 2 and time.monotonic() < deadline:
                    time.sleep(0.05)
            assert w.alive
        finally:
            w.stop()
        assert got == {"b@example.org": 1, "c@example.org": 1}
        failed = storage.failed_outbox()
        assert [f.message.recipients for f in failed] == [("a@example.org",), ("jürgen@example.org",)]
        assert all("SMTPUTF8" in f.last_error for f in failed)
        assert storage.pending_outbox() == []
        assert any("<jürgen@example.org>" in r.getMessage() and "SMTPUTF8" in r.getMessage()
                   for r in caplog.records)
    finally:
        relay.stop()


def test_smtputf8_is_used_when_the_relay_offers_it(smtp_relay: SMTPRelay) -> None:
    storage = MemoryStorage()
    commit(storage, message(["jürgen@example.org"], sender="jörg@exämple.org"))
    worker(storage, smtp_relay).flush()
    [(sender, rcpts, _, options)] = smtp_relay.handler.received
    assert sender == "jörg@exämple.org" and rcpts == ("jürgen@example.org",) and "SMTPUTF8" in options


def test_utf8_header_fields_are_sent_with_smtputf8_and_ascii_mail_without(smtp_relay: SMTPRelay) -> None:
    """RFC 6532 headers (a reply's ``To: jörg@bücher.example``) need SMTPUTF8 even when the envelope
    is ASCII (an SRS or VERP sender); plain ASCII mail is sent without it."""
    storage = MemoryStorage()
    commit(storage, message(["joerg@example.org"], subject="Grüße"), message(["anna@example.org"]))
    worker(storage, smtp_relay).flush()
    options = {rcpts: opts for _s, rcpts, _raw, opts in smtp_relay.handler.received}
    assert "SMTPUTF8" in options[("joerg@example.org",)]
    assert "SMTPUTF8" not in options[("anna@example.org",)]


def test_the_worker_survives_an_unexpected_exception_from_the_relay(smtp_relay: SMTPRelay,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    class Flaky(Relay):
        calls = 0

        def send(self, message: OutboxMessage) -> Delivery:
            self.calls += 1
            if self.calls == 1:
                raise UnicodeEncodeError("ascii", "ü", 0, 1, "ordinal not in range(128)")
            return super().send(message)

    storage = MemoryStorage()
    commit(storage, message(["first@example.org"], "first"), message(["second@example.org"], "second"))
    w = OutboxWorker(storage, Flaky("127.0.0.1", smtp_relay.port), interval=3600.0, min_backoff=0.0)
    w.start()
    try:
        with caplog.at_level(logging.ERROR, logger="lamsonfilter.relay"):
            w.wake()
            assert smtp_relay.handler.wait_for_copies(1) == {"second@example.org": 1}
            assert w.alive
            w.wake()  # the failed attempt is due again (no backoff here)
            copies = smtp_relay.handler.wait_for_copies(2)
    finally:
        w.stop()
    assert copies == {"first@example.org": 1, "second@example.org": 1}
    assert any("unexpected error" in r.getMessage() and "UnicodeEncodeError" in r.getMessage()
               for r in caplog.records)


def test_the_worker_survives_a_failing_round(smtp_relay: SMTPRelay, caplog: pytest.LogCaptureFixture) -> None:
    """The store fails while recording an outcome: one log line, the thread goes on."""

    class Breaks(MemoryStorage):
        broken = True

        def defer_outbox(self, id: int, remaining: Any, next_attempt: float, error: str) -> None:
            if self.broken:
                self.broken = False
                raise RuntimeError("disk on fire")
            super().defer_outbox(id, remaining, next_attempt, error)

    storage = Breaks()
    smtp_relay.handler.refuse = {"later@example.org": "451 4.3.0 later"}
    commit(storage, message(["later@example.org"]))
    w = OutboxWorker(storage, Relay("127.0.0.1", smtp_relay.port), interval=3600.0, min_backoff=0.0)
    w.start()
    try:
        with caplog.at_level(logging.ERROR, logger="lamsonfilter.relay"):
            w.wake()
            deadline = time.monotonic() + 30
            while not any("round failed" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
                time.sleep(0.05)
        assert w.alive
        smtp_relay.handler.refuse = {}
        w.wake()
        assert smtp_relay.handler.wait_for_copies(1) == {"later@example.org": 1}
    finally:
        w.stop()
    lines = [r for r in caplog.records if "round failed" in r.getMessage()]
    assert len(lines) == 1 and "disk on fire" in lines[0].getMessage()


def test_relay_send_reports_each_recipient(smtp_relay: SMTPRelay) -> None:
    smtp_relay.handler.refuse = {"t@example.org": "450 4.2.0 busy", "p@example.org": "550 5.1.1 unknown"}
    d = Relay("127.0.0.1", smtp_relay.port, max_recipients=2).send(
        message(["a@example.org", "t@example.org", "p@example.org", "b@example.org", "a@example.org"]))
    assert d.accepted == ("a@example.org", "b@example.org")
    assert [r for r, _ in d.deferred] == ["t@example.org"] and [r for r, _ in d.refused] == ["p@example.org"]
    assert len(smtp_relay.handler.received) == 2  # two transactions: [a, t] and [p, b]
    with pytest.raises(RelayError):
        Relay("127.0.0.1", free_port()).send(message(["a@example.org"]))


# ---------------------------------------------------------------- through a real Postfix
@pytest.mark.postfix
def test_through_postfix_1200_recipients_once_each_and_smtputf8_refused(
    postfix_factory: PostfixFactory, capture: CaptureServer, tmp_path: Path
) -> None:
    """The reinjection listener is a real Postfix smtpd (smtpd_recipient_limit at its
    default, SMTPUTF8 off): a 1200-recipient list post reaches each member once, a
    message with a non-ASCII sender is kept as failed, the worker thread lives on."""
    pf = postfix_factory(main_cf={"smtputf8_enable": "no"})
    assert pf.postconf("-h", "smtpd_recipient_limit").strip() == str(POSTFIX_RECIPIENT_LIMIT)
    storage = SQLAlchemyStorage(f"sqlite:///{tmp_path / 'state.db'}")
    storage.create_schema()
    members = [f"member{i}@example.org" for i in range(1200)]
    commit(storage, message(members, "list post"),
           message(["a@example.org"], "utf8 sender", sender="jörg@exämple.org"),
           message(["after@example.net"], "after"))
    w = OutboxWorker(storage, Relay("127.0.0.1", pf.smtpd_port, timeout=30.0), interval=3600.0)
    w.start()
    try:
        w.wake()

        def delivered() -> collections.Counter[str]:
            return collections.Counter(r for m in capture.messages for r in m.rcpt_tos)

        wait_for(lambda: sum(delivered().values()) >= 1201, 180,
                 message=lambda: f"{sum(delivered().values())} of 1201 copies; {pf.maillog_tail(5)}")
        wait_for(lambda: storage.failed_outbox(), 30, message="the failed message")
        assert w.alive
        w.wake()  # another round: nothing is sent again
        wait_for(lambda: not storage.pending_outbox(), 30, message="an empty outbox")
    finally:
        w.stop()
    copies = delivered()
    assert len(copies) == 1201 and set(copies.values()) == {1}, "lost or duplicated copies"
    assert "a@example.org" not in copies
    [failed] = storage.failed_outbox()
    assert failed.message.sender == "jörg@exämple.org" and "SMTPUTF8" in failed.last_error
    storage.close()


# ---------------------------------------------------------------- bug 3: housekeeping
def _sqlite_statements(storage: SQLAlchemyStorage) -> list[str]:
    """Every SQL statement the storage sends from now on (SQLAlchemy's cursor event)."""
    from sqlalchemy import event

    seen: list[str] = []

    def before(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        seen.append(" ".join(statement.split()))

    event.listen(storage._engine, "before_cursor_execute", before)
    return seen


def test_housekeeping_purges_replays_and_sent_outbox_in_bounded_batches(tmp_path: Path) -> None:
    from lamsonfilter.app import App
    from lamsonfilter.confirmstore import ConfirmationRecord
    from lamsonfilter.daemon.runtime import Runtime
    from lamsonfilter.store.replay import REPLAY_PREFIX

    storage = SQLAlchemyStorage(f"sqlite:///{tmp_path / 'state.db'}")
    storage.create_schema()
    now = time.time()
    with storage.transaction() as tx:
        for i in range(1200):  # a week of replay records, older than REPLAY_TTL
            tx.set(f"{REPLAY_PREFIX}old{i:04d}", "DONE", {"at": now - 7200})
        tx.set(f"{REPLAY_PREFIX}new", "DONE", {"at": now - 60})
        tx.set("mailinglist:keep", "MEMBER", {})
        tx.add_outbox([message([f"r{i}@example.org"], f"m{i}") for i in range(1300)])
        for i, expires in enumerate((now - 7300, now - 7200, now - 60, now + 3600)):  # 2 expired long ago
            tx.add_confirmation(ConfirmationRecord(f"{i:064x}", "subscribe", "a@example.org", {}, None,
                                                   now - 9000, expires))
    pending = storage.pending_outbox(2000)
    storage.mark_sent([p.id for p in pending[:1250]])
    storage.fail_outbox(pending[-1].id, ["r1299@example.org"], "550 no")
    storage._engine.dispose()  # old sent rows: written an hour ago
    from sqlalchemy import create_engine, text

    engine = create_engine(f"sqlite:///{tmp_path / 'state.db'}")
    with engine.begin() as conn:
        conn.execute(text("UPDATE lamsonfilter_outbox SET sent_at = datetime('now', '-2 hours') "
                          "WHERE id <= :n"), {"n": pending[1199].id})
    engine.dispose()

    runtime = Runtime(App(storage=storage, settings={"REPLAY_TTL": 3600.0}))
    statements = _sqlite_statements(storage)
    runtime._housekeeping()
    statements = list(statements)  # what the housekeeping sent, not the checks below

    remaining = storage.scan(REPLAY_PREFIX, limit=5000)
    assert [k for k, _ in remaining] == [f"{REPLAY_PREFIX}new"]
    with storage.transaction() as tx:
        assert tx.get("mailinglist:keep") is not None
    assert len(storage.pending_outbox(2000)) == 49 and len(storage.failed_outbox()) == 1
    assert storage.purge_outbox(sent_before=time.time() + 1, limit=5000) == 50  # the recent sent ones were kept

    deletes = [s for s in statements if s.startswith("DELETE")]
    with storage.transaction() as tx:  # confirmations expired more than REPLAY_TTL ago are gone
        assert [tx.get_confirmation(f"{i:064x}") is not None for i in range(4)] == [False, False, True, True]
    assert len(deletes) == 3 + 3 + 1  # 1200 replay records and 1200 sent rows, 500 per DELETE; confirmations
    assert all(s.count("?") <= 500 for s in deletes)
    writes = [s for s in statements if s == "BEGIN IMMEDIATE"]
    assert len(writes) == len(deletes)  # the reads take no write lock; each DELETE its own short transaction
    storage.close()
