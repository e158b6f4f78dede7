"""The outbox worker: the committed replies and new messages go to the MTA's reinjection port.

Handlers never send mail.  `App.process` commits the outbox together with
the state change; the transports then wake an `OutboxWorker`, which reads
the committed messages it claimed from the store, hands each to the `lamsonfilter.relay.Relay`
(Postfix's reinjection listener, which does not filter again, so generated
mail is never handled twice; the SMTP is `lamsonfilter.smtpclient`'s, the
one client the content filter's reinjection uses too) and records, per
recipient, what the relay said.  The outbox is in the database, not in memory: whatever was not
handed over is tried again later, also after a restart.

    relay = Relay("127.0.0.1", 10026)
    worker = OutboxWorker(app.storage, relay)
    worker.start()           # a background thread
    ...
    worker.wake()            # after each processed message
    worker.stop()

Nothing lost, nothing repeated (docs/design.rst, "Handlers ask, the
runtime acts" and "Claims and leases", says why each rule is so):

* The worker sends only what it claimed (`OutboxStore.claim_outbox`), so
  any number of workers, processes or hosts, share one outbox; it renews
  the lease while it sends and stops on a message it no longer holds.
* The moment the relay accepts a transaction, the worker's sent journal
  has it (`lamsonfilter.sentjournal`, one ``os.write``); the database's
  "sent" follows, and the journal is applied before every claim, so a
  sender killed in between does not make the next one send it again.
* A relay that cannot be reached (refused connection, no greeting, EHLO
  refused) stops the batch: nothing attempted, claims released, one WARNING.
* Each recipient is accounted for on its own: the accepted ones are taken
  out of the stored message after every SMTP transaction; a 5xx (or an
  address needing SMTPUTF8 the relay lacks) drops that recipient with one
  ERROR line and keeps a failed copy for it; a 4xx, a broken connection or
  a timeout keeps it for the next attempt.  At most `Relay.max_recipients`
  (500) go into one transaction, below Postfix's ``smtpd_recipient_limit``.
* A message with recipients left backs off on its own (`min_backoff`,
  doubling up to `max_backoff`, 4000 s like Postfix); after `max_age` (5
  days) or `max_attempts` (200) it is given up and its row kept, marked
  failed (`OutboxStore.failed_outbox`; housekeeping deletes only sent rows).
* Any other exception is a failed attempt of that message, logged in one
  line (the traceback at DEBUG); the thread keeps running.

Tracing: every message handed over is logged with its ``Message-ID`` and
the relay's reply to the final dot (Postfix's ``250 2.0.0 Ok: queued as
5AbcD``); `Runtime.process` logs the same ``Message-ID`` of each outbox
message with the queue id of the message that caused it, so a reply or a
list copy in Postfix's log leads back to the post that produced it:

    ... queue_id=4XyzAbc ... outbox=1 outbox_ids=<reply-1@lists.example.org>
    ... outbox: message 17 <reply-1@lists.example.org> cause=4XyzAbc to 1 recipient(s): 250 2.0.0 Ok: queued as 5AbcD

(``cause=`` names the queue id when this process handled the message;
``-`` after a restart, or when the parent of ``--workers`` sends it: the
``Message-ID`` then leads to the worker's line.)
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import replace
from typing import Callable, Sequence

from .relay import Relay, RelayError, message_id
from .sentjournal import SentJournal, sent_token
from .smtpclient import Delivery
from .state import OutboxStore, PendingOutbox

__all__ = ["MAX_ATTEMPTS", "OUTBOX_LIFETIME", "OUTBOX_LEASE", "MARK_EVERY", "OutboxWorker"]

#: The outbox's lines keep the logger name they always had (operators filter on it).
log = logging.getLogger("lamsonfilter.relay")

#: Give up on an outbox message after this many seconds: Postfix's maximal_queue_lifetime (5d).
OUTBOX_LIFETIME = 5 * 24 * 3600.0
#: ... or after this many failed attempts (with the default backoff, 5 days hold about 110).
MAX_ATTEMPTS = 200
#: How long an outbox worker's claim on a message lasts unless renewed (seconds); it
#: renews after a third of it, before each SMTP transaction (`lamsonfilter.store.outbox`).
#: The default of the application setting ``OUTBOX_LEASE``, which the daemons pass on.
OUTBOX_LEASE = 300.0
#: Seconds a sent message waits at most for its batch's "sent" in the database when the sent
#: journal covers every takeover (SQLite: one host); with several hosts each is marked at once.
MARK_EVERY = 0.5
#: Message-IDs of outbox messages whose cause (queue id) is remembered for the log.
CAUSES_KEPT = 10_000


class OutboxWorker:
    """Sends committed outbox messages in a background thread (see the module docstring)."""

    def __init__(self, storage: OutboxStore, relay: Relay, interval: float = 30.0, batch: int = 100,
                 housekeeping: Callable[[], object] | None = None, housekeeping_interval: float = 3600.0,
                 *, min_backoff: float | None = None, max_backoff: float = 4000.0,
                 max_age: float = OUTBOX_LIFETIME, max_attempts: int = MAX_ATTEMPTS,
                 lease: float = OUTBOX_LEASE, worker_id: str | None = None,
                 journal: SentJournal | None = None, mark_every: float = 0.0) -> None:
        self.storage = storage
        #: What this process handed to the relay, on disk at the ``250`` (`lamsonfilter.sentjournal`).
        self.journal = journal
        self._recovered = float("-inf")
        self._unmarked: list[int] = []  # sent and journaled; "sent" not yet in the database
        self._unmarked_since = 0.0
        #: Seconds a sent message may wait for its batch's "sent" in the database: 0 (each at once)
        #: unless the journal covers every takeover (one host: `Runtime` gives SQLite `MARK_EVERY`).
        self.mark_every = mark_every if journal is not None else 0.0
        #: The name this worker's claims carry: host, process, and a random part.
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.lease = lease
        self._held: set[int] = set()
        self._renewed = 0.0
        self.housekeeping = housekeeping
        self.housekeeping_interval = housekeeping_interval
        self._last_housekeeping = 0.0
        self.relay = relay
        self.interval = interval
        self.batch = batch
        self.min_backoff = interval if min_backoff is None else min_backoff
        self.max_backoff = max_backoff
        self.max_age = max_age
        self.max_attempts = max_attempts
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._flush_lock = threading.Lock()
        #: Message-ID -> queue id of the message whose handling produced it (`Runtime.process`
        #: fills it; bounded).  Only this process's messages: the log line says ``cause=-`` otherwise.
        self.causes: dict[str, str] = {}
        self._causes_lock = threading.Lock()

    def flush(self) -> int:
        """Try every message due now, each once; returns how many were tried.

        Raises only what the store raises while recording an outcome (the
        thread logs it and goes on); a relay that cannot be reached ends
        the round early and leaves the rest pending.
        """
        with self._flush_lock:
            tried: set[int] = set()
            # bounded: every round tries at least one message not tried before
            while True:
                try:
                    self._apply_journals()
                    pending = self.storage.claim_outbox(self.worker_id, self.batch, self.lease,
                                                        due_before=time.time())
                except Exception as exc:  # noqa: BLE001 -- the store may be down; try later
                    log.error("outbox: cannot claim pending messages: %s", exc)
                    return len(tried)
                self._held, self._renewed = {item.id for item in pending}, time.monotonic()
                fresh = [item for item in pending if item.id not in tried]
                try:
                    for item in fresh:
                        tried.add(item.id)
                        if self.journal is not None and self.journal.holds(item.id, sent_token(item.message.raw)):
                            self._unmarked.append(item.id)  # sent by this process; its "sent" failed before
                        elif self._keep_lease(item.id):
                            self._deliver(item)
                        self._held.discard(item.id)  # sent, deferred or failed: claim ended
                        if self._unmarked and time.monotonic() - self._unmarked_since >= self.mark_every:
                            self._mark_batch()
                except RelayError as exc:
                    log.warning("outbox: relay %s unreachable, messages stay pending: %s", self.relay, exc)
                    return len(tried)
                finally:
                    self._mark_batch()
                    self._release()
                if not fresh or len(pending) < self.batch:
                    return len(tried)

    def _deliver(self, item: PendingOutbox) -> None:
        """Send one message, recording after every transaction which recipients are done."""
        message = item.message
        remaining = list(message.recipients)
        accepted: list[str] = []
        deferred: list[tuple[str, str]] = []
        refused: list[tuple[str, str]] = []
        step = max(1, self.relay.max_recipients)
        record = self._recorder(item)
        for start in range(0, len(remaining), step):
            chunk = remaining[start : start + step]
            if start and not self._keep_lease(item.id):  # another worker has it now
                if refused:
                    self.storage.fail_recipients(item.id, [r for r, _ in refused], refused[-1][1])
                return
            try:
                chunk_message = replace(message, recipients=tuple(chunk))
                if getattr(type(self.relay), "send", None) is Relay.send:
                    result = self.relay.send(chunk_message, record)
                else:  # another kind of relay (a test's own send): journaled when it returns
                    result = self.relay.send(chunk_message)
                    record(result)
            except RelayError:
                if refused:
                    self.storage.fail_recipients(item.id, [r for r, _ in refused], refused[-1][1])
                if start:  # earlier chunks went out: never send them again
                    self.storage.outbox_progress(item.id, [r for r, _ in deferred] + remaining[start:])
                raise
            except Exception as exc:  # noqa: BLE001 -- an unexpected error fails this attempt only
                log.error("outbox: message %d: unexpected error from the relay, will retry: %s: %s",
                          item.id, type(exc).__name__, exc)
                log.debug("outbox: message %d: traceback", item.id, exc_info=True)
                result = Delivery(deferred=tuple((r, f"{type(exc).__name__}: {exc}") for r in chunk))
            accepted.extend(result.accepted)
            if result.accepted:
                mid = message_id(message.raw)
                log.info("outbox: message %d %s cause=%s to %d recipient(s): %s", item.id, mid,
                         self.causes.get(mid, "-"), len(result.accepted), "; ".join(result.queued) or "accepted")
            deferred.extend(result.deferred)
            refused.extend(result.refused)
            for rcpt, why in result.refused:
                log.error("outbox: message %d to <%s> refused for good, recipient dropped: %s", item.id, rcpt, why)
            rest = [r for r, _ in deferred] + remaining[start + step :]
            if rest and start + step < len(remaining) and (result.accepted or result.refused):
                self.storage.outbox_progress(item.id, rest)
        if not deferred:
            if not refused:  # the journal has it; the database learns it in this round's batch
                if not self._unmarked:
                    self._unmarked_since = time.monotonic()
                self._unmarked.append(item.id)
                return
            # done, but not for everyone: keep it, marked failed, with who never got it
            self.storage.fail_outbox(item.id, [r for r, _ in refused], refused[-1][1])
            log.error("outbox: message %d kept as failed: %d recipient(s) accepted, %d refused for good: %s",
                      item.id, len(accepted), len(refused), refused[-1][1])
            return
        if refused:  # kept, as a failed row of their own; the message goes on for the others
            self.storage.fail_recipients(item.id, [r for r, _ in refused], refused[-1][1])
        left = [r for r, _ in deferred]
        why = deferred[-1][1]
        attempts = item.attempts + 1
        age = time.time() - item.created_at if item.created_at else 0.0
        if age >= self.max_age or attempts >= self.max_attempts:
            self.storage.fail_outbox(item.id, left, why)
            log.error("outbox: message %d given up after %d attempt(s) over %.0fs, kept as failed; "
                      "%d recipient(s) never got it (%s): %s",
                      item.id, attempts, age, len(left), ", ".join(left[:5]), why)
            return
        delay = min(self.max_backoff, self.min_backoff * 2 ** min(item.attempts, 30))
        self.storage.defer_outbox(item.id, left, time.time() + delay, why)
        log.warning("outbox: message %d: %d recipient(s) deferred, attempt %d, next in %.0fs: %s",
                    item.id, len(left), attempts, delay, why)

    def _keep_lease(self, id: int) -> bool:
        """Whether this worker still holds message `id`, renewing the batch's lease
        once a third of it has passed (so a long message keeps its claim)."""
        if self._held and time.monotonic() - self._renewed > self.lease / 3:
            self._held = self.storage.renew_claims(self.worker_id, sorted(self._held), self.lease)
            self._renewed = time.monotonic()
        if id not in self._held:
            log.warning("outbox: message %d: claim lost (lease of %gs passed), left to the worker "
                        "that took it over", id, self.lease)
        return id in self._held

    def _release(self) -> None:
        """Give back the claims of messages this round did not finish (relay down, an error)."""
        held, self._held = self._held, set()
        if held:
            try:
                self.storage.release_claims(self.worker_id, sorted(held))
            except Exception as exc:  # noqa: BLE001 -- they expire after the lease anyway
                log.error("outbox: cannot release claims (they expire in %gs): %s", self.lease, exc)

    def _housekeep(self) -> None:
        now = time.monotonic()
        if self.housekeeping is None or now - self._last_housekeeping < self.housekeeping_interval:
            return
        self._last_housekeeping = now
        try:
            self.housekeeping()
        except Exception as exc:  # noqa: BLE001 -- housekeeping must not stop the outbox
            log.error("housekeeping failed: %s", exc)

    def _recorder(self, item: PendingOutbox) -> Callable[[Delivery], None]:
        """What runs the moment the relay answers a transaction of `item`: the journal line."""
        journal, token = self.journal, sent_token(item.message.raw)
        return lambda result: journal.note(item.id, token, result.accepted) if journal else None

    def _apply_journals(self) -> None:
        if self.journal is not None:  # what this host sent, the database learns before any claim
            self._recovered = self.journal.before_claim(self.storage, self._recovered, self.lease / 4)

    def _mark_batch(self) -> None:
        ids, self._unmarked = self._unmarked, []
        if not ids:
            return
        try:
            self.storage.mark_sent(ids)
        except Exception as exc:  # noqa: BLE001 -- sent twice later is better than lost
            kept = self.journal is not None and self.journal.holds(ids[0])
            log.error("outbox: sent %s but could not mark them sent (%s): %s", ids,
                      "the sent journal has them" if kept else "they may go out twice", exc)
            return
        if self.journal is not None:
            self.journal.applied(ids)

    def remember_cause(self, message_ids: Sequence[str], queue_id: str) -> None:
        """Note which queue id produced these outbox messages (for the log line when they are sent)."""
        with self._causes_lock:
            for mid in message_ids:
                if mid != "-":
                    self.causes[mid] = queue_id
            while len(self.causes) > CAUSES_KEPT:
                del self.causes[next(iter(self.causes))]  # the oldest (dicts keep insertion order)

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="lamsonfilter-outbox", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the thread after its last round (every message due now, tried once), waiting at
        most `timeout` seconds; False when that round was still running then."""
        self._stop.set()
        self._wake.set()
        ended = True
        if self._thread is not None:
            self._thread.join(timeout)
            ended = not self._thread.is_alive()
            self._thread = None
        if self.journal is not None and ended:
            self.journal.close()  # deleted when the database has every line
        return ended

    @property
    def alive(self) -> bool:
        """Whether the background thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stop.is_set():
                break
            self._round()
        self._round()  # last chance before exit: nothing is lost either way, it is in the store

    def _round(self) -> None:
        """One flush and housekeeping; an exception is logged, never the end of the thread."""
        try:
            self.flush()
            self._housekeep()
        except Exception as exc:  # noqa: BLE001 -- the outbox must keep running
            log.error("outbox: round failed, will try again: %s: %s", type(exc).__name__, exc)
            log.debug("outbox: round failed", exc_info=True)
