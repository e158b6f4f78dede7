"""The transport contract: what the runtime does for every transport, in one place.

A transport (the milter, the content filter, a future queue worker) builds
one `MailRequest`, which it does not change afterwards, and calls
`Runtime.process` with the message's replay key and deadline as arguments
(the queue id travels in the request's envelope).  The runtime then does,
the same way for every transport: replay of a committed decision and the
deadline (through `App.process`), the per-message log line, metrics, and
waking the outbox sender.  A tempfail `Decision` carries its `Cause`
(``message``: a handler failed or ran out of time; ``storage``: the
database or the queue's disk failed, not this message), named in the log
line (``decision=tempfail cause=storage``); the milter and the content
filter answer 451 4.3.0 for both, ``deq`` counts only ``message`` as an
attempt.  Poison counting is a service next to it
(`count_attempts`, `begin_attempt`, `end_attempt`) that a transport which
can see its own process die uses.  docs/design.rst has a worked example::

    runtime = Runtime.from_directory("examples/mailinglist", {"RELAY": "127.0.0.1:10026"})
    runtime.start()                      # checks the schema, starts the outbox worker
    key = replay_key(request, queue_id_is_stable=True)
    decision = runtime.process(request, replay_key=key, deadline=time.monotonic() + 120,
                               transport="queue")   # never raises
    runtime.stop()

`from_directory` refuses to start (`StartupError`) on bad settings, bad
routes, or a database without the lamsonfilter schema (the message says to
run ``lamsonfilter db init``).  `process` never raises.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from ..app import App, StartupError
from ..decisions import Cause, Decision, Outcome
from ..mail import MailRequest
from ..mailqueue.maildir import MailQueue, QueueError
from ..outboxworker import MARK_EVERY, OUTBOX_LEASE, OutboxWorker
from ..relay import Relay, message_id
from ..sentjournal import SentJournal
from ..state import SchemaMissingError, StorageError, StorageUnavailable
from .metrics import Metrics
from .poison import DEFAULT_LIMIT, AttemptLog

__all__ = ["DatabaseUnreachable", "Runtime", "REPLAY_TTL", "replay_key", "deferral_name"]

#: Every this many messages the process gives the C heap's free pages back to the system.
TRIM_EVERY = 2000

#: How long a committed decision is kept for replay: longer than Postfix retries (5 days).
REPLAY_TTL = 7 * 24 * 3600.0
#: Sent outbox messages deleted per statement, and at most this many statements per housekeeping.
OUTBOX_PURGE_BATCH = 500
OUTBOX_PURGE_BATCHES = 200

log = logging.getLogger("lamsonfilter")


class Runtime:
    def __init__(self, app: App, relay: Relay | None = None, outbox_interval: float = 30.0,
                 directory: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> None:
        self.app = app
        self.relay = relay
        self.worker = (
            OutboxWorker(app.storage, relay, interval=outbox_interval, housekeeping=self._housekeeping,
                         lease=float(app.settings.get("OUTBOX_LEASE", OUTBOX_LEASE)), journal=_journal(app),
                         mark_every=MARK_EVERY if _one_host(app) else 0.0)
            if relay else None
        )
        self.directory = directory
        self.overrides = dict(overrides or {})
        self._reload_lock = threading.Lock()
        self.metrics: Metrics | None = None
        #: Called after a message that produced outbox mail when the outbox sender runs in
        #: another process (the content filter's workers wake their parent with it).
        self.outbox_elsewhere: Callable[[], None] | None = None
        self.attempts: AttemptLog | None = None
        self._processed = 0  # approximate (not locked): only paces release_free_memory
        self._queue: MailQueue | None = None

    @classmethod
    def from_directory(
        cls, directory: str | Path, overrides: Mapping[str, Any] | None = None, outbox_interval: float = 30.0
    ) -> "Runtime":
        from ..settings import parse_hostport

        app = _load_checked(directory, overrides, reload=False)
        host, port = parse_hostport(app.settings["RELAY"])
        return cls(app, Relay(host, port), outbox_interval, directory, overrides)

    def reload(self) -> str | None:
        """Load the application again (SIGHUP); swap it in only if it starts.

        Returns None on success, else why the old application keeps running.
        Messages in flight finish with the application they started with.
        """
        if self.directory is None:
            return "this runtime was not loaded from a directory"
        with self._reload_lock:
            try:
                new = _load_checked(self.directory, self.overrides, reload=True)
            except Exception as exc:  # noqa: BLE001 -- any failure keeps the old code
                log.error("reload failed, keeping the running application: %s", exc)
                return str(exc)
            old, self.app = self.app, new
            if self.worker is not None:
                self.worker.storage = new.storage
                self.worker.lease = float(new.settings.get("OUTBOX_LEASE", OUTBOX_LEASE))
            if self.metrics is not None:
                self.metrics.storage = new.storage
            log.info("reloaded %s", self.directory)
            if old.storage is not new.storage:
                old.storage.close()
            return None

    def start(self) -> None:
        """Serve metrics if settings ask (METRICS = "127.0.0.1:9125"), start the outbox worker."""
        metrics = self.app.settings.get("METRICS")
        if metrics and self.metrics is None:
            from ..settings import parse_hostport

            self.serve_metrics(*parse_hostport(metrics))
        if self.worker is not None:
            if self.worker.journal is not None:
                try:  # fail at start, not at the first send
                    self.worker.journal.open()
                except OSError as exc:
                    raise StartupError(str(exc)) from None
            self.worker.start()
            self.worker.wake()  # whatever a previous run left pending

    def _housekeeping(self) -> None:
        """Hourly (from the outbox thread): forget replay records, sent outbox messages
        and confirmation requests (`lamsonfilter.confirm`) that expired, all older than
        REPLAY_TTL, in batches of one DELETE each."""
        ttl = float(self.app.settings.get("REPLAY_TTL", REPLAY_TTL))
        n = self.app.purge_replays(ttl)
        if n:
            log.info("housekeeping: forgot %d replay record(s) older than %gs", n, ttl)
        cutoff, sent = time.time() - ttl, 0
        for _ in range(OUTBOX_PURGE_BATCHES):  # bounded: what is left goes next time
            purged = self.app.storage.purge_outbox(cutoff, OUTBOX_PURGE_BATCH)
            sent += purged
            if purged < OUTBOX_PURGE_BATCH:
                break
        if sent:
            log.info("housekeeping: deleted %d sent outbox message(s) older than %gs", sent, ttl)
        confirmations = 0
        for _ in range(OUTBOX_PURGE_BATCHES):
            purged = self.app.storage.purge_confirmations(cutoff, OUTBOX_PURGE_BATCH)
            confirmations += purged
            if purged < OUTBOX_PURGE_BATCH:
                break
        if confirmations:
            log.info("housekeeping: deleted %d confirmation request(s) expired more than %gs ago",
                     confirmations, ttl)

    def serve_metrics(self, host: str, port: int, allow_remote: bool = False) -> None:
        """Start the Prometheus endpoint (raises `MetricsError`)."""
        self.metrics = Metrics(self.app.storage)
        self.metrics.serve(host, port, allow_remote)

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        if self.metrics is not None:
            self.metrics.close()
        self.app.storage.close()

    def check_recipient(self, address: str) -> Outcome | None:
        """RCPT-time check; never raises (an error means no early decision)."""
        try:
            return self.app.check_recipient(address)
        except Exception as exc:  # noqa: BLE001 -- decide at end of message instead
            log.error("rcpt check for %r failed: %s", address, exc)
            return None

    def process(self, request: MailRequest, *, replay_key: str | None = None, deadline: float | None = None,
                transport: str = "") -> Decision:
        """Run the application once (replaying a committed decision for `replay_key`, committing
        nothing past `deadline`), log one line, count it in the metrics, wake the outbox sender."""
        started = time.monotonic()
        decision = self.app.process(request, replay_key=replay_key, deadline=deadline)
        if decision.deferred and not decision.is_tempfail:
            decision = self._queue_deferred(request, decision, replay_key)
        took = (time.monotonic() - started) * 1000
        routes = ",".join(sorted({o.route for o in decision.outcomes if o.route})) or "-"
        # say so when two MIME readers could disagree (mime=ambiguous) -- for the application's own (routed) mail;
        # pass-through mail is never parsed, and logging must not start parsing it
        ambiguous = routes != "-" and request.ambiguous_mime
        # the Message-IDs tie each outbox message to this queue id (relay.py logs them when sent)
        ids = [message_id(m.raw) for m in decision.outbox[:20]]
        outbox_ids = f" outbox_ids={','.join(ids)}" if ids else ""
        if ids and request.queue_id and self.worker is not None:
            self.worker.remember_cause(ids, request.queue_id)
        # a tempfail names its cause (cause=message|storage): a database outage reads apart from poison
        cause = f" cause={decision.cause}" if decision.is_tempfail and decision.cause is not None else ""
        log.info(
            "queue_id=%s%s from=<%s> rcpts=%d routes=%s decision=%s%s outbox=%d%s ms=%.1f%s",
            request.queue_id or "-", f" via={transport}" if transport else "", request.sender,
            len(request.recipients), routes, decision.kind, cause, len(decision.outbox), outbox_ids, took,
            " mime=ambiguous" if ambiguous else "",
            extra={"QUEUE_ID": request.queue_id or "", "ROUTES": routes, "DECISION": decision.kind,
                   "DURATION_MS": f"{took:.1f}", "TRANSPORT": transport},
        )
        if self.metrics is not None:
            self.metrics.observe(decision, took / 1000)
        if decision.outbox:
            self.wake_outbox()
        self._processed += 1
        if self._processed % TRIM_EVERY == 0:
            release_free_memory()
        return decision

    @property
    def queue(self) -> MailQueue:
        """The application's mail queue (the ``QUEUE`` setting, relative to the app)."""
        from ..settings import queue_dir

        path = queue_dir(self.app.settings)
        if self._queue is None or self._queue.path != path:  # a reload may have moved it
            self._queue = MailQueue(path, float(self.app.settings.get("QUEUE_LEASE", 300)))
        return self._queue

    def _queue_deferred(self, request: MailRequest, decision: Decision, key: str | None) -> Decision:
        """Put the message into the queue for each deferred recipient, durably; a tempfail if not."""
        queue = self.queue
        try:
            for rcpt in decision.deferred:
                name = deferral_name(key, rcpt)
                if name is not None and self._ran_from_queue(name):
                    log.info("queue_id=%s rcpt=<%s> deferred: %s already ran from the queue; not queued again",
                             request.queue_id or "-", rcpt, name)
                    continue
                name = queue.put(request.raw, request.sender, rcpt, name=name)
                log.info("queue_id=%s rcpt=<%s> deferred: queued as %s in %s", request.queue_id or "-",
                         rcpt, name, queue.path)
        except (OSError, QueueError) as exc:
            log.error("queue_id=%s tempfail: the deferred message could not be queued in %s: %s",
                      request.queue_id or "-", queue.path, exc)
            return Decision.tempfail(request.recipients, f"deferral not queued: {exc}", cause=Cause.STORAGE)
        return decision

    def _ran_from_queue(self, name: str) -> bool:
        """True when ``deq`` committed a decision for the queued message `name` (its replay key):
        the MTA's retry of a message deferred, queued and run since must not queue it again.
        One read that locks nothing; a message whose run committed nothing cannot be told."""
        from ..store.replay import record_key

        key = record_key(name)
        assert key is not None
        try:
            return any(k == key for k, _rec in self.app.storage.scan(key, limit=1))
        except StorageError as exc:  # cannot tell: queue it (at worst it runs once more)
            log.warning("replay record of %s not readable: %s", name, exc)
            return False

    def wake_outbox(self) -> None:
        """New outbox mail: wake the sender, here or in the process that runs it."""
        if self.worker is not None:
            self.worker.wake()
        if self.outbox_elsewhere is not None:
            self.outbox_elsewhere()

    # ------------------------------------------------------------ poison counting
    def count_attempts(self, path: str | Path) -> AttemptLog:
        """Count attempts at messages durably under `path` (`lamsonfilter.daemon.poison`); forget old counts."""
        self.attempts = AttemptLog(path)
        try:  # counts of messages that left the MTA's queue long ago
            self.attempts.purge(REPLAY_TTL)
        except OSError as exc:
            log.warning("%r: cannot purge old attempt counts: %s", self.attempts, exc)
        return self.attempts

    @property
    def poison_limit(self) -> int:
        """Attempts that died with the process before a message is poison (``POISON_LIMIT``; 0: never)."""
        return int(self.app.settings.get("POISON_LIMIT", DEFAULT_LIMIT))

    def begin_attempt(self, replay_key: str | None) -> int:
        """Count an attempt *before* the handlers run (a kill still counts); 0 when nothing is counted.

        More than `poison_limit` means the message killed the process that many
        times: the transport keeps it aside instead of running it again.
        """
        if self.attempts is None or replay_key is None or self.poison_limit <= 0:
            return 0
        return self.attempts.begin(replay_key)

    def end_attempt(self, replay_key: str, n: int, final: bool) -> None:
        """The attempt ended in this process: forget the count after a final answer, else undo
        this attempt (a 4xx from a live process is never held against the message).  Never raises."""
        if self.attempts is None:
            return
        try:
            if final:
                self.attempts.clear(replay_key)
            else:
                self.attempts.forgive(replay_key, n)
        except OSError as exc:
            log.warning("attempt count of %s not updated: %s", replay_key, exc)


def replay_key(request: MailRequest, *, queue_id_is_stable: bool) -> str | None:
    """What identifies this message across the MTA's retries, so a retry replays its decision.

    With a queue id that stays the same across retries (the content filter:
    Postfix's XFORWARD IDENT), the queue id plus the recipients (Postfix may
    split one queue file into several deliveries).  Otherwise (the milter: a
    client's retry is a new transaction with a new queue id; mail without
    XFORWARD) a digest of Message-ID, envelope and body
    (`MailRequest.content_replay_key`), None without a Message-ID.
    """
    if queue_id_is_stable and request.queue_id:
        rcpts = hashlib.sha256("\0".join(sorted(r.lower() for r in request.recipients)).encode(
            "utf-8", "surrogateescape")).hexdigest()[:16]
        return f"ident:{request.queue_id}:{rcpts}"
    return request.content_replay_key()


def deferral_name(replay_key: str | None, recipient: str) -> str | None:
    """The queue file name of a deferred message: from the replay key and the recipient, so
    the MTA's retry of a message already queued finds it there (`MailQueue.put` leaves it);
    None (a unique name) for a message without a replay key."""
    if replay_key is None:
        return None
    digest = hashlib.sha256(f"{replay_key}\0{recipient.lower()}".encode("utf-8", "surrogateescape"))
    return f"defer-{digest.hexdigest()[:40]}"


def release_free_memory() -> bool:
    """Give the free pages of the C heap back to the system (glibc's ``malloc_trim``).

    A long-running filter allocates and frees a message's buffers all day;
    glibc keeps the freed memory in its heap, where it is reused but never
    returned, so the resident size creeps although nothing is alive there:
    in a soak of the content filter the heap's bytes in use stayed flat
    (+8.5 kB over 9,000 messages) while its size grew by 676 kB.  Takes a
    few milliseconds.  Returns False where there is no ``malloc_trim``
    (another C library).
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim is False:
        return False
    _malloc_trim(0)
    return True


_malloc_trim: Any = None


def _journal(app: App) -> SentJournal | None:
    """The outbox sender's sent journal (`lamsonfilter.sentjournal`), in the OUTBOX_JOURNAL
    directory; opened at the sender's first round, so a process that never sends (a worker
    of the content filter's ``--workers``) makes no file."""
    from ..settings import journal_dir, resolve_database_url

    directory = journal_dir(app.settings)
    if directory is None:
        return None
    url = resolve_database_url(str(app.settings.get("DATABASE_URL", "")), app.settings.get("APP_DIR"))
    return SentJournal(directory, url.split("?", 1)[0])


def _one_host(app: App) -> bool:
    """Whether only this host sends this outbox (a SQLite file): then this host's sent journals
    cover every takeover, and "sent" may reach the database in batches."""
    return str(app.settings.get("DATABASE_URL", "")).startswith("sqlite:")


class DatabaseUnreachable(StartupError):
    """The state database could not be reached at start (down, locked, refused), as opposed to a
    database without the right schema: ``deq --once`` says "try again later" (75) for it."""


def _load_checked(directory: str | Path, overrides: Mapping[str, Any] | None, reload: bool) -> App:
    """Load and start the app, and refuse a database behind or ahead (`lamsonfilter.dbschema`)."""
    from ..dbschema import check_database
    from ..settings import load_app

    app = load_app(directory, overrides, reload=reload)
    try:
        check_database(app.storage, directory, app.models)
    except StorageError as exc:
        app.storage.close()
        text = str(exc).replace("--app DIR", f"--app {directory}")
        if isinstance(exc, StorageUnavailable) and not isinstance(exc, SchemaMissingError):
            raise DatabaseUnreachable(text) from None
        raise StartupError(text) from None
    return app
