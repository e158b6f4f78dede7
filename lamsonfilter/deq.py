"""Queue mode: the application works through a Maildir queue at its own pace (``lamsonfilter deq``).

The third transport on the contract, besides the milter and the content
filter.  Postfix delivers the application's mail into a Maildir queue (its
own Maildir delivery writes the envelope on top: ``Return-Path:``,
``Delivered-To:``), or a handler defers a message there (``ctx.defer()``);
``deq`` claims each file, builds one `MailRequest` (the file's envelope,
``from_queue=True``), calls `Runtime.process` and carries out the queue's
table (`lamsonfilter.queueworker.plan`): send on through the relay,
quarantine, retry later, or simply remove.  Same routes, handlers, state,
outbox, log line and metrics as the other two.  The rooms are in
`lamsonfilter.queueworker`; the queue is `lamsonfilter.mailqueue.maildir`.

    config = DeqConfig(app_dir=Path("examples/mailinglist"), queue=Path("/var/spool/lamsonfilter/queue"))
    runtime = Runtime.from_directory(config.app_dir)
    status = serve(runtime, config, service=Service())   # until SIGTERM, or empty with once=True

What can happen to a message (nothing lost, nothing done twice):

=====================================  =========================================
event                                  what ``deq`` does
=====================================  =========================================
two workers or hosts see one file      one rename wins the claim; the other
                                       skips it
a decision (deliver, drop, reject...)  carried out, then the file removed: one
                                       rename into ``done/``, the unlink by the
                                       remover process (``queueworker/remover``)
a tempfail, the deadline, a bug        ``retry/`` with a backoff; the
                                       ``POISON_LIMIT``-th time the quarantine
the database down (cause ``storage``)  ``retry/``, no attempt counted; the
                                       whole pool pauses, then one message
                                       probes (`queueworker.outage`)
the worker dies (kill -9, OOM)         the claim ends (``QUEUE_LEASE``) and is
                                       taken back, one attempt counted; a
                                       decision that had committed is replayed;
                                       a finished file still in ``done/`` is
                                       unlinked by the next ``deq``, never run
a file without an envelope             the quarantine with the reason
SIGTERM                                no new claims; the messages in flight
                                       finish, the outbox is flushed
SIGHUP                                 the application is loaded again
=====================================  =========================================

With ``policy`` (``--policy 127.0.0.1:10027``) it also answers Postfix's
``check_policy_service`` (`lamsonfilter.queueworker.policy`): unknown
addresses of the application's domains are refused at RCPT.
"""

from __future__ import annotations

import logging
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .app import StartupError
from .contentfilter.quarantine import Quarantine
from .daemon import process as daemon
from .daemon.runtime import Runtime
from .mailqueue.maildir import MailQueue
from .queueworker.policy import PolicyListener
from .queueworker.pool import Feeder
from .queueworker.remover import start_remover
from .queueworker.watch import NewMailWatch
from .queueworker.worker import MessageWorker
from .relay import Relay
from .settings import parse_hostport

__all__ = ["DeqConfig", "serve", "queue_path", "quarantine_path"]

log = logging.getLogger("lamsonfilter.deq")

#: Seconds a step of the relay conversation may take: an eighth of the claim, within these bounds
#: (a send starts only while a quarter of the claim is left).
RELAY_TIMEOUT = 60.0
RELAY_TIMEOUT_LEAST = 5.0
#: ``--once``: how long its end waits for the outbox's last round (seconds; ``--outbox-wait``).
OUTBOX_WAIT = 30.0
#: ``--once``'s exit status when work is left that only the relay or the database coming back
#: can finish (sysexits' EX_TEMPFAIL): outbox messages unsent, the database down.
EX_TEMPFAIL = 75


@dataclass(frozen=True)
class DeqConfig:
    """Everything ``lamsonfilter deq`` is started with."""

    app_dir: Path
    queue: Path | None = None          # None: the application's QUEUE setting
    workers: int = 4
    once: bool = False
    quarantine: Path | None = None     # None: APP/var/quarantine, as the content filter's
    outbox_wait: float = OUTBOX_WAIT   # once: how long the end waits for the outbox to send
    policy: tuple[str, int] | None = None  # answer Postfix's check_policy_service here


def queue_path(app_dir: Path, setting: str, given: Path | None = None) -> Path:
    """The queue directory: `given`, else the ``QUEUE`` setting (relative to the application)."""
    path = given if given is not None else Path(setting)
    return path if path.is_absolute() else Path(app_dir).resolve() / path


def quarantine_path(app_dir: Path, given: Path | None = None) -> Path:
    """The quarantine: `given`, else APP/var/quarantine -- the content filter's default, so
    ``lamsonfilter quarantine`` finds what both kept aside."""
    return given if given is not None else Path(app_dir).resolve() / "var" / "quarantine"


def serve(runtime: Runtime, config: DeqConfig, service: Any = None) -> int:
    """Work through the queue until SIGTERM/SIGINT (or, with `config.once`, until it is empty).

    The queue and the quarantine must exist and be writable (the command
    checks first: `MailQueue.ensure`).  Returns 0 after a clean stop, 1 when
    the feeder ended by itself (a bug: logged).  With `once`, one summary
    line on stderr, and `EX_TEMPFAIL` (75) instead of 0 when the run leaves
    work that waits for the relay or the database, not for a message's
    retry: outbox messages still unsent after `config.outbox_wait` seconds
    (one line says how many, and that the outbox sends them when deq or
    another lamsonfilter daemon runs), or a database outage that outlasted
    the run (`lamsonfilter.queueworker.outage`); the command exits 75 as well
    when the database cannot be reached at the start (`DatabaseUnreachable`,
    before this is called).  The runtime is started
    here and stopped on the way out (the outbox is flushed).
    """
    settings = runtime.app.settings
    queue = MailQueue(queue_path(config.app_dir, settings["QUEUE"], config.queue),
                      lease=float(settings["QUEUE_LEASE"]))
    quarantine = Quarantine(quarantine_path(config.app_dir, config.quarantine))
    relay = runtime.relay or Relay(*parse_hostport(settings["RELAY"]))
    timeout = min(RELAY_TIMEOUT, max(RELAY_TIMEOUT_LEAST, queue.lease / 8))
    queue.sweep_done()  # what a deq that died had finished but not yet unlinked
    remover = start_remover()  # unlinks finished files off the workers' path
    worker = MessageWorker(runtime, queue, quarantine, Relay(relay.host, relay.port, timeout=timeout),
                           remover=remover)
    watch = None if config.once else NewMailWatch(queue.path / "new")
    feeder = Feeder(queue, worker.handle, workers=max(1, config.workers), watch=watch, once=config.once,
                    outage=worker.outage)
    failed: list[BaseException] = []

    def run() -> None:
        try:
            feeder.run()
        except BaseException as exc:
            failed.append(exc)
        finally:
            remover.close()  # the workers are done: the last finished files unlinked now

    policy: PolicyListener | None = None
    with daemon.SignalWaiter() as signals:
        try:
            try:  # a taken metrics or policy port is a start-up error (one line, exit 2)
                if config.policy is not None and not config.once:
                    policy = PolicyListener(runtime, config.policy)
                runtime.start()
            except StartupError as exc:
                print(f"lamsonfilter: {exc}", file=sys.stderr)
                return 2
            if policy is not None:
                policy.start()
            how = "inotify" if watch is not None and watch.watching else "a timer"
            log.info("deq working through %s with %d worker(s)%s; quarantine %s", queue.path, feeder.workers,
                     " until it is empty" if config.once else f", sleeping on {how} when it is empty",
                     quarantine.path)
            thread = threading.Thread(target=run, name="lamsonfilter-deq-feeder", daemon=True)
            thread.start()
            if service is not None:
                service.ready(f"working through {queue.path}")
                service.start_watchdog(thread.is_alive)
            stopped_by = signals.wait(thread.is_alive, daemon.Reloader(runtime, service).request)
            if stopped_by is not None:
                if service is not None:
                    service.stopping()
                feeder.stop()
            thread.join()
            unsent = finish_outbox(runtime, config.outbox_wait) if config.once else 0
        finally:
            remover.close()
            if policy is not None:
                policy.stop()
            runtime.stop()
            if watch is not None:
                watch.close()
    tally = worker.tally
    status = 0
    if config.once:
        waiting = queue.count()["retry"]
        print(f"deq: {tally.get('done') + tally.get('quarantined')} processed, {waiting} waiting for a retry, "
              f"{tally.get('quarantined')} quarantined", file=sys.stderr)
        if unsent:
            print(f"deq: {unsent} outbox message(s) not sent yet (the relay {relay.host}:{relay.port} did not "
                  f"take them within {config.outbox_wait:g} s); they stay in the database, and the outbox "
                  "sends them when deq or another lamsonfilter daemon runs (see: lamsonfilter outbox list)",
                  file=sys.stderr)
            status = EX_TEMPFAIL
        if worker.outage.active:
            left = sum(queue.count().values())
            print(f"deq: the state database has failed for {worker.outage.since:.0f} s ({worker.outage.why}); "
                  f"{left} message(s) left in the queue for the next run", file=sys.stderr)
            status = EX_TEMPFAIL
    if failed:
        log.error("the feeder stopped: %r", failed[0])
        return 1
    return status


def finish_outbox(runtime: Runtime, wait: float) -> int:
    """``--once``'s end: let the outbox send what the run produced, at most `wait` seconds;
    returns how many outbox messages are still unsent (pending, due now or later; 0 when
    they cannot be counted -- the database is down, and said so).  Never raises."""
    outbox = runtime.worker
    if outbox is None:
        return 0
    if not outbox.stop(timeout=wait):  # its last round tries every message due now, once
        log.warning("the outbox is still sending after %g s; deq stops, what it has not sent stays "
                    "pending", wait)
    try:
        return runtime.app.storage.outbox_counts()["pending"]
    except Exception as exc:  # noqa: BLE001 -- the summary must still be printed
        log.error("cannot count the outbox's unsent messages: %s", exc)
        return 0
