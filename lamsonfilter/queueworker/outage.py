"""A database outage, as ``deq``'s pool sees it: pause every worker, then probe with one message.

When the state database fails (`Decision.cause` is ``storage``: down,
locked past the lock timeout, full, without the schema), the message is not
at fault and neither is the next one: running the rest of the queue would
only move every file to ``retry/`` and back.  So the first worker that
meets it reports it here (`failed`); the feeder then hands out no name
until the pause is over, and after it exactly one message, alone: the
probe.  The probe either gets through (`cleared`: the pool goes on at full
width) or fails too, and the next pause is twice as long, up to
`PAUSE_MOST`::

    outage = Outage()
    outage.failed("the state database ... connection refused")   # pause 2 s
    outage.admits(inflight=0)      # False for 2 s, then True once: the probe
    outage.failed("...")           # the probe failed too: pause 4 s
    outage.cleared()               # a message went through: the pool goes on

Any message that gets through clears the outage, also one that needed no
database (a stateless route): the next message that needs it meets the
outage again and a new pause begins, after at most ``--workers`` failures.
No message counts an attempt for it (``POISON_LIMIT`` is for messages that
fail on their own), and the message that met the outage goes to ``retry/``
for the length of the pause.  One exception keeps a message from pausing
the pool for ever: a message that began an outage which the very next
message ended (the database answered it at once), and that begins one
again, is the trouble itself (the store fails on *it*): that failure
counts, with the usual backoff, up to the quarantine.  A 10-minute outage therefore costs about 15
probes, whatever the size of the queue.  `since` says how long it lasts;
``deq --once`` gives up after `ONCE_WAIT` of it (exit status 75).
Thread-safe; the feeder waits on its own condition, which `failed` and
`cleared` do not touch (the worker's end of a message notifies it anyway).
"""

from __future__ import annotations

import logging
import threading
import time

__all__ = ["Outage", "PAUSE_FIRST", "PAUSE_MOST", "ONCE_WAIT"]

log = logging.getLogger("lamsonfilter.queueworker")

#: The first pause after the database failed (seconds) ...
PAUSE_FIRST = 2.0
#: ... doubling after each failed probe up to this.
PAUSE_MOST = 60.0
#: ``deq --once`` waits out an outage this long, then stops with the rest of the queue left.
ONCE_WAIT = 60.0
#: How many messages that began a short outage are remembered (`Outage.failed`).
SUSPECTS_KEPT = 1000


class Outage:
    """Whether the state database is failing, and when the pool may try it again."""

    def __init__(self, first: float = PAUSE_FIRST, most: float = PAUSE_MOST) -> None:
        self.first = first
        self.most = most
        self._lock = threading.Lock()
        self._since: float | None = None   # monotonic start of the outage; None: no outage
        self._resume = 0.0                 # monotonic: no name before this
        self._pause = 0.0
        self._probing = False
        self.why = ""
        self.probes = 0                    # probes that failed, this outage
        self._retries_due = 0.0            # wall clock: when the last message sent to retry/ is due
        self._starter: str | None = None   # the message whose failure began this outage
        #: messages that began an outage the next message ended (insertion-ordered, bounded)
        self._suspects: dict[str, None] = {}

    @property
    def active(self) -> bool:
        with self._lock:
            return self._since is not None

    @property
    def since(self) -> float:
        """Seconds the outage lasts so far (0 when there is none)."""
        with self._lock:
            return 0.0 if self._since is None else time.monotonic() - self._since

    @property
    def pause(self) -> float:
        """The current pause (seconds): how long the message that met the outage waits in ``retry/``."""
        with self._lock:
            return self._pause if self._since is not None else self.first

    def failed(self, why: str, name: str | None = None) -> float | None:
        """Message `name` met a storage failure; returns the pause now in force (seconds): the
        message waits in ``retry/`` that long.  None when `name` alone seems to be the trouble:
        it started an outage before that the very next message ended (the database answered
        the others at once) and starts one again now; then it is its own failure, counted
        towards ``POISON_LIMIT``, and the pool does not pause for it."""
        now = time.monotonic()
        with self._lock:
            self.why = why
            if self._since is None and name is not None and name in self._suspects:
                log.warning("queue_id=%s the storage fails for this message again, while the messages "
                            "in between went through: counted as its own failure: %s", name, why)
                return None
            self._retries_due = max(self._retries_due, time.time() + self._pause_after(now))
            if self._since is None:
                self._since, self._pause, self.probes, self._starter = now, self.first, 0, name
                log.error("the state database failed: %s; deq pauses its workers for %g s, then tries "
                          "one message (no attempt is counted against the messages)", why, self._pause)
            elif self._probing or now >= self._resume:
                self.probes += 1
                self._pause = min(self._pause * 2, self.most)
                log.warning("the state database still fails after %.0f s (probe %d): %s; next try in %g s",
                            now - self._since, self.probes, why, self._pause)
            else:  # a message that was in flight when the outage began: the pause stands
                return self._pause
            self._probing = False
            self._resume = now + self._pause
            return self._pause

    def _pause_after(self, now: float) -> float:
        """The pause `failed` is about to put in force (called under the lock)."""
        if self._since is None:
            return self.first
        if self._probing or now >= self._resume:
            return min(self._pause * 2, self.most)
        return self._pause

    def retries_due_in(self, grace: float = 2.0) -> float | None:
        """Seconds until the messages this outage sent to ``retry/`` are all due (0: due now, and
        for `grace` seconds after -- a retry's time is stored in whole seconds); None when none
        waits.  ``deq --once`` waits for them rather than leave them behind."""
        with self._lock:
            left = self._retries_due - time.time()
        return None if left < -grace else max(left, 0.0)

    def cleared(self) -> None:
        """A message got through the storage: the outage (if any) is over."""
        with self._lock:
            if self._since is None:
                return
            took = time.monotonic() - self._since
            if self.probes == 0 and self._starter is not None:  # over at the first probe: note who began it
                self._suspects[self._starter] = None
                while len(self._suspects) > SUSPECTS_KEPT:
                    del self._suspects[next(iter(self._suspects))]  # the oldest
            self._since, self._probing, self._starter = None, False, None
        log.warning("the state database answers again after %.0f s; deq goes on with all its workers", took)

    def admits(self, inflight: int) -> bool:
        """Whether the feeder may hand out a name now (`inflight`: messages running).  During an
        outage: only after the pause, one message alone (it becomes the probe)."""
        with self._lock:
            if self._since is None:
                return True
            if inflight or self._probing or time.monotonic() < self._resume:
                return False
            self._probing = True
            return True

    def wait_hint(self) -> float | None:
        """How long the feeder may sleep before `admits` could change by the clock alone;
        None: only the end of a message can change it (the feeder is notified then)."""
        with self._lock:
            left = self._resume - time.monotonic()
            if self._since is None or self._probing or left <= 0:
                return None
            return left

    def probe_ended(self) -> None:
        """A message ended (the feeder calls it after each): if it was the probe and said neither
        `failed` nor `cleared` (another worker had it, no envelope...), the next name probes."""
        with self._lock:
            self._probing = False
