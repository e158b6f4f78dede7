"""One queued message, start to end: claim, `Runtime.process`, the plan, carried out.

`MessageWorker.handle(name)` is what every thread of ``deq``'s pool runs for
one file name of ``new/``::

    worker = MessageWorker(runtime, MailQueue(path, lease=300), Quarantine(qpath), relay)
    outcome = worker.handle(name)       # "done", "quarantined", "retry" or "skipped"

It claims the file (one rename: another worker or host that got it first
makes this a "skipped"), builds the one `MailRequest` with the envelope the
file carries and ``from_queue=True``, calls `Runtime.process` with the
queue name as the replay key (``queue:NAME``: a retry of a message whose
decision committed replays it) and a deadline well before the claim ends,
and carries out `lamsonfilter.queueworker.plan.queue_plan`.  A tempfail
whose cause is the storage (the database down) counts no attempt and
pauses the whole pool (`lamsonfilter.queueworker.outage`).  The message is
removed only after everything the plan asks for is done; whatever goes
wrong on the way (the relay, the quarantine, a bug) leaves it for a retry,
so nothing is lost.  The log line is the runtime's (``via=queue``), plus
one line when a message is quarantined or waits for a retry.

A send through the relay starts only while at least a quarter of the claim
is left.  If the claim still ran out during the send (a relay slower than
that), another worker may take the message over and replay its decision:
the recipients could then get it twice -- never not at all.
"""

from __future__ import annotations

import logging
import threading
import time

from ..contentfilter.quarantine import Quarantine
from ..daemon.runtime import Runtime
from ..decisions import OutboxMessage
from ..mail import AddressError, Envelope, MailRequest
from ..mailqueue.maildir import EnvelopeMissing, MailQueue, QueuedMessage
from ..relay import Relay, RelayError
from .outage import Outage
from .plan import (
    QueuePlan,
    backoff,
    no_envelope_plan,
    poison_plan,
    queue_plan,
    relay_failure_plan,
)

__all__ = ["MessageWorker", "Tally", "OUTCOMES"]

log = logging.getLogger("lamsonfilter.queueworker")

#: What `MessageWorker.handle` returns.
OUTCOMES = ("done", "quarantined", "retry", "skipped")


class Tally:
    """How many messages ended how, counted from many threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts = dict.fromkeys(OUTCOMES, 0)

    def add(self, outcome: str) -> None:
        with self._lock:
            self.counts[outcome] += 1

    def get(self, outcome: str) -> int:
        with self._lock:
            return self.counts[outcome]


class MessageWorker:
    """Runs the application over claimed queue messages (thread-safe: one per pool)."""

    def __init__(self, runtime: Runtime, queue: MailQueue, quarantine: Quarantine, relay: Relay,
                 outage: Outage | None = None) -> None:
        self.runtime = runtime
        self.queue = queue
        self.quarantine = quarantine
        self.relay = relay
        self.tally = Tally()
        #: shared with the feeder: a storage failure pauses the whole pool (`Outage`)
        self.outage = outage if outage is not None else Outage()

    def handle(self, name: str) -> str:
        """Claim ``new/name`` and take it to its end; never raises.  Returns one of `OUTCOMES`."""
        outcome = self._handle(name)
        self.tally.add(outcome)
        return outcome

    def _handle(self, name: str) -> str:
        try:
            msg = self.queue.claim(name)
        except EnvelopeMissing as missing:
            return self._no_envelope(missing)
        except OSError as exc:  # left where it is: in new/, or claimed (taken back after the lease)
            log.error("queue_id=%s cannot claim: %s", name, exc)
            return "skipped"
        if msg is None:
            return "skipped"  # another worker has it
        try:
            return self._run(msg)
        except Exception:  # nothing lost: the message waits for a retry
            log.exception("queue_id=%s internal error, retrying later", msg.name)
            return self._give_back(msg, backoff(msg.attempts), count=True)

    def _run(self, msg: QueuedMessage) -> str:
        limit = self.runtime.poison_limit
        if limit > 0 and msg.attempts >= limit:
            return self._carry_out(poison_plan(msg.attempts), msg, None)
        try:
            request = MailRequest(Envelope(msg.sender, (msg.recipient,), queue_id=msg.name), msg.raw,
                                  from_queue=True)
        except AddressError as exc:
            return self._carry_out(no_envelope_plan(f"unusable envelope address: {exc}"), msg, None)
        lease = self.queue.lease
        # the handlers must be done (or have committed nothing) while half the claim is left
        deadline = time.monotonic() + (msg.until - time.time()) - lease / 2
        decision = self.runtime.process(request, replay_key=f"queue:{msg.name}", deadline=deadline,
                                        transport="queue")
        pause: float | None = self.outage.first
        if decision.storage_failed:  # the database, not this message: pause the pool, count nothing
            pause = self.outage.failed(decision.error or "storage failure", msg.name)  # None: it is the message
        else:
            self.outage.cleared()
        return self._carry_out(queue_plan(decision, request, msg.attempts, limit, pause), msg, request)

    def _carry_out(self, plan: QueuePlan, msg: QueuedMessage, request: MailRequest | None) -> str:
        limit = self.runtime.poison_limit
        if plan.quarantine is not None:
            with_envelope = request is not None or plan.quarantine_envelope
            if not self._keep(msg, plan.quarantine, msg.raw, msg.sender if with_envelope else None,
                              (msg.recipient,)):
                return self._give_back(msg, backoff(msg.attempts), count=False)
        if not plan.finished:
            assert plan.retry_after is not None
            log.info("queue_id=%s retry in %g s (%d failed attempt(s)): %s", msg.name, plan.retry_after,
                     msg.attempts + (1 if plan.counts_attempt else 0), "; ".join(plan.notes))
            return self._give_back(msg, plan.retry_after, plan.counts_attempt)
        if plan.send_to:
            assert plan.data is not None
            if time.time() > msg.until - self.queue.lease / 4:
                log.warning("queue_id=%s too little of the claim left to send; giving it back", msg.name)
                return self._give_back(msg, 0, count=False)
            try:
                delivery = self.relay.send(OutboxMessage(plan.sender, plan.send_to, plan.data))
            except RelayError as exc:
                log.warning("queue_id=%s relay unreachable: %s", msg.name, exc)
                failed = relay_failure_plan(msg.attempts, limit, unreachable=True)
                return self._carry_out(failed, msg, request)
            if delivery.refused:
                why = "; ".join(f"{r}: {reply}" for r, reply in delivery.refused)
                if not self._keep(msg, f"the relay refused {why}", plan.data, plan.sender,
                                  tuple(r for r, _ in delivery.refused)):
                    return self._give_back(msg, backoff(msg.attempts), count=False)
            if delivery.deferred:
                # sent again on the retry (the decision is replayed): the recipients the relay
                # took may get it twice, never none
                return self._carry_out(relay_failure_plan(msg.attempts, limit, False, delivery.deferred),
                                       msg, request)
        if not self.queue.done(msg):
            log.warning("queue_id=%s its claim was taken back before it was finished; "
                        "the worker that took it replays the decision", msg.name)
        return "quarantined" if plan.quarantine is not None else "done"

    def _keep(self, msg: QueuedMessage, reason: str, content: bytes, sender: str | None,
              recipients: tuple[str, ...]) -> bool:
        """Store in the quarantine; False (logged) when it cannot be written."""
        try:
            kept = self.quarantine.store(content, reason, msg.name, sender, recipients)
        except OSError as exc:
            log.error("queue_id=%s cannot be quarantined (%s): %s; retrying later", msg.name, reason, exc)
            return False
        log.warning("queue_id=%s quarantined as %s: %s; release it with: lamsonfilter quarantine release %s",
                    msg.name, kept, reason, kept)
        return True

    def _give_back(self, msg: QueuedMessage, delay: float, count: bool) -> str:
        try:
            if not self.queue.retry(msg, delay, count=count):
                log.warning("queue_id=%s its claim was taken back meanwhile", msg.name)
        except OSError as exc:  # still claimed: taken back when the claim ends
            log.error("queue_id=%s cannot be moved to retry/: %s", msg.name, exc)
        return "retry"

    def _no_envelope(self, missing: EnvelopeMissing) -> str:
        """A claimed file without an envelope: the quarantine with the reason, then removed."""
        plan = no_envelope_plan(missing.reason)
        assert plan.quarantine is not None
        try:
            content = missing.path.read_bytes()
            kept = self.quarantine.store(content, plan.quarantine, missing.name)
        except OSError as exc:  # stays claimed: taken back after the lease and tried again
            log.error("queue_id=%s has no envelope (%s) and cannot be quarantined: %s",
                      missing.name, missing.reason, exc)
            return "skipped"
        log.warning("queue_id=%s quarantined as %s: %s", missing.name, kept, plan.quarantine)
        try:
            missing.path.unlink()
        except FileNotFoundError:
            pass
        return "quarantined"
