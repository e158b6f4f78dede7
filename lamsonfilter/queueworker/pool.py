"""The feeder and its bounded pool: names from ``new/`` to worker threads, never too many at once.

One feeder thread runs the passes over the queue; in a pass, a pool of
`workers` threads take the file names of ``new/`` one after the other
(each runs `MessageWorker.handle` on its name)::

    feeder = Feeder(queue, worker.handle, workers=4, watch=NewMailWatch(queue.path / "new"))
    feeder.run()            # in its own thread, until feeder.stop() (or, with once=True, until empty)

Memory stays bounded however large the queue: each of the `workers`
threads takes the next name of the walk when it is free, so at most
`workers` messages are claimed or read at any time, and ``new/`` is read
lazily (`MailQueue.scan`, one ``readdir`` pass shared by the threads; the
whole queue is never listed into memory).  After each pass, once the
names taken are done, the feeder moves due retries and dead claims back
(`MailQueue.release_due`); if the pass found nothing and nothing was
moved, it sleeps: on the inotify watch
(`lamsonfilter.queueworker.watch`) until a file arrives, at most until the
next retry or claim is due, and at most `RESCAN` seconds (what another host
writes to a shared directory is seen then).  No busy polling.

A claim taken back from a worker that died (``died=1`` in its name,
`lamsonfilter.mailqueue.maildir.taken_back`) may be what killed it: it is
taken only when nothing else is in flight, and nothing else while it
is.  A poison message then dies alone, and the messages that happened to
be in flight at its first death are not charged with the next ones (each
death counts an attempt towards ``POISON_LIMIT``).

While the state database fails (`lamsonfilter.queueworker.outage`), no
name is handed out until the pool's pause is over, and then one message
alone, the probe; a storage failure never walks the whole queue.

With ``once=True`` it stops instead of sleeping: when a pass handed out
nothing and nothing became due, or when a database outage has lasted
`ONCE_WAIT` (`gave_up` says so; the rest stays in the queue).  `stop`
(SIGTERM) ends the pass; the messages in flight finish first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ..mailqueue.maildir import MailQueue, taken_back
from .outage import ONCE_WAIT, Outage
from .watch import NewMailWatch

__all__ = ["Feeder", "RESCAN"]

log = logging.getLogger("lamsonfilter.queueworker")

#: The longest sleep of an idle feeder (seconds), inotify or not.
RESCAN = 30.0
#: Claims are taken back this long after they end (`MailQueue.release_due`'s grace).
GRACE = 5.0


class Feeder:
    """Hands the names in ``new/`` to a bounded pool of threads."""

    def __init__(self, queue: MailQueue, handle: Callable[[str], object], workers: int = 4,
                 watch: NewMailWatch | None = None, once: bool = False, outage: Outage | None = None) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.queue = queue
        self.handle = handle
        self.workers = workers
        self.watch = watch
        self.once = once
        self.outage = outage if outage is not None else Outage()
        #: ``once`` only: True when it stopped because the database stayed down `ONCE_WAIT` seconds
        self.gave_up = False
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._inflight = 0
        self._alone = False    # a message taken back from a dead worker is in flight, alone
        self.peak = 0          # the most messages in flight at once (never above `workers`)
        self.passes = 0

    def stop(self) -> None:
        """End the current pass; `run` returns once the messages in flight are done (thread-safe)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self.watch is not None:
            self.watch.wake()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def inflight(self) -> int:
        with self._cond:
            return self._inflight

    def run(self) -> None:
        """Work until `stop` (or, with `once`, until nothing is left to do now)."""
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="lamsonfilter-deq")
        try:
            while not self._stop.is_set():
                if self.watch is not None:
                    self.watch.drain()  # this pass sees every file that arrived so far
                handed = self._one_pass(pool)
                self._wait_idle()
                if self._stop.is_set() or self.gave_up:
                    break
                moved = self.queue.release_due(grace=GRACE)
                self.passes += 1
                if handed or moved:
                    continue
                if self.once and not self._outage_retries_left():
                    break
                if self.once:
                    continue
                self._sleep()
        finally:
            pool.shutdown(wait=True)  # the messages in flight finish first

    def _one_pass(self, pool: ThreadPoolExecutor) -> int:
        """One walk over ``new/``: each of the `workers` threads takes the next name itself
        (the walk is shared, under a lock) until the walk ends or `stop`; returns how many
        names were taken.  No hand-off between threads per message: a busy machine does
        not make each message wait for two thread wake-ups."""
        names = self.queue.scan()
        lock = threading.Lock()
        handed = 0

        def take() -> tuple[str, bool] | None:
            nonlocal handed
            with lock:  # while one thread waits here for the others (a message to run alone), none takes more
                if self._stop.is_set():
                    return None
                name = next(names, None)
                if name is None:
                    return None
                alone = taken_back(name)
                with self._cond:
                    while not self._stop.is_set():
                        if self._alone or (alone and self._inflight):
                            self._cond.wait()
                        elif self.outage.admits(self._inflight):  # last: it may make this name the probe
                            break
                        elif self.once and self.outage.since > ONCE_WAIT:
                            self.gave_up = True
                            log.error("the state database has failed for %.0f s: deq --once stops, the rest "
                                      "stays in the queue: %s", self.outage.since, self.outage.why)
                            return None  # left in new/ for the next run
                        else:  # the pool's pause: until it ends, or until the probe in flight ends
                            self._cond.wait(self.outage.wait_hint())
                    if self._stop.is_set():
                        return None  # left in new/ for the next run
                    handed += 1
                    self._inflight += 1
                    self._alone = alone
                    self.peak = max(self.peak, self._inflight)
            return name, alone

        def drain() -> None:
            while (taken := take()) is not None:
                self._work(*taken)

        for running in [pool.submit(drain) for _ in range(self.workers)]:
            running.result()  # an error of the walk itself (new/ unreadable) ends the feeder, as before
        return handed

    def _work(self, name: str, alone: bool = False) -> None:
        try:
            self.handle(name)
        except Exception:  # handle never raises; a bug there must not stop the pool
            log.exception("queue_id=%s unexpected error in the worker", name)
        finally:
            self.outage.probe_ended()
            with self._cond:
                self._inflight -= 1
                if alone:
                    self._alone = False
                self._cond.notify_all()

    def _outage_retries_left(self) -> bool:
        """``once``: whether messages a database outage sent to ``retry/`` are due soon: wait for
        them (bounded: `ONCE_WAIT` of outage ends it) instead of leaving them behind."""
        if self.outage.active and self.outage.since > ONCE_WAIT:
            self.gave_up = True
            log.error("the state database has failed for %.0f s: deq --once stops, the rest stays in "
                      "the queue: %s", self.outage.since, self.outage.why)
            return False
        wait = self.outage.retries_due_in()
        if wait is None:
            return False
        self._stop.wait(wait + 0.5)
        return True

    def _wait_idle(self) -> None:
        with self._cond:
            while self._inflight:
                self._cond.wait()

    def _sleep(self) -> None:
        """Until a file arrives, the next retry or dead claim is due, `RESCAN`, or `stop`."""
        timeout = RESCAN
        due = self.next_due()
        if due is not None:
            timeout = min(timeout, max(due - time.time(), 0.0) + 0.5)
        log.debug("queue empty: sleeping up to %.1f s", timeout)
        if self.watch is not None:
            if self.watch.wait(timeout) and not self._stop.is_set():
                log.debug("woken: new mail in %s", self.watch.directory)
        else:
            self._stop.wait(timeout)

    def next_due(self) -> float | None:
        """When the first retry is due or the first claim (any worker's) is taken back."""
        first: float | None = None
        for entry in self.queue.entries(("retry", "claimed")):
            if entry.due is None:
                return time.time()
            due = entry.due + (GRACE if entry.state == "claimed" else 0.0)
            first = due if first is None else min(first, due)
        return first
