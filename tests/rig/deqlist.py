"""The example list drained by ``lamsonfilter deq`` while it is SIGKILLed at random points, counted.

`run_list` drives a prepared `DeqRig` in two phases of the list's
subscribe/confirm conversation, each a queue of messages drained by one
resident ``deq`` process that is killed (``kill -9``, by its PID) at
seeded random points and started again at once:

1. **subscribe**: subscriber *i* (``sub<i>@d<i>.example.net``, a domain
   each, so no per-domain reply budget is what is measured) asks
   ``python-subscribe@lists.example.org``: a state transition START →
   PENDING and a confirmation request carrying a token;
2. **confirm**: when every request went out, each subscriber's message to
   the token address of its request is queued: PENDING → MEMBER and a
   welcome.

A kill point is a number of messages done (gone from the queue) in the
phase, drawn with `random.Random(seed)` between 5 % and 95 % of it, plus a
random 0-20 ms; a kill waits until the process it kills finished at least
one message of its own, so every kill hits a draining process (its
handlers, its commits, its outbox sends, its claims).  A killed process's
claims come back after the rig's ``QUEUE_LEASE`` and its outbox claims
after ``OUTBOX_LEASE``: a phase ends when the queue is empty and the
outbox sent.

What comes back (`DeqListFigures`) is what the test asserts and
docs/reliability.rst reports, counted at the capture server (replies per
subscriber, per Message-ID, per token; a Message-ID twice is checked
against the logs: `window_duplicates`), in the state database (each
subscriber MEMBER at version 2: exactly two transitions; a subscribe or
confirm applied twice makes it 3 or more) and by the accounting harness
over every queued message (each decided, none lost, none left queued).
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

from tests.rig.deqrig import DeqProcess, DeqRig, window_duplicates
from tests.rig.postfix import CapturedMessage

__all__ = ["DeqListFigures", "kill_points", "run_list", "subscriber"]

LIST = "python"
LIST_HOST = "lists.example.org"
CONFIRM_SUBJECT = f"Confirm your subscription to {LIST}@{LIST_HOST}"
WELCOME_SUBJECT = f"Welcome to {LIST}@{LIST_HOST}"
_JOURNAL_SAVED = re.compile(r"outbox journal: \d+ line\(s\) of a dead process's \S+ applied: (\d+) message")
_CONFIRM_ADDR = re.compile(rf"{LIST}-confirm-([0-9a-f]{{32}})@{re.escape(LIST_HOST)}")


def subscriber(i: int) -> str:
    return f"sub{i}@d{i}.example.net"


@dataclass
class DeqListFigures:
    """One run's counts; `problems` lists every deviation from "each message once"."""

    messages: int
    subscribers: int
    kills_asked: int
    seed: int
    workers: int
    killed_pids: list[int] = field(default_factory=list)
    processes: int = 0
    processed: int = 0  # messages with a decision logged
    lost: int = 0
    left_in_queue: int = 0
    quarantined: int = 0
    reruns: int = 0  # messages that ran again after a kill (the decision replayed or never committed)
    claims_left: list[str] = field(default_factory=list)  # queue messages a killed process held
    outbox_claims_left: int = 0  # outbox messages a killed process held, not sent
    journal_saved: int = 0  # sends of killed processes only their sent journal knew: applied, not sent again
    confirm_requests: int = 0
    confirm_duplicated: int = 0
    confirm_missing: int = 0
    welcomes: int = 0
    welcome_duplicated: int = 0
    welcome_missing: int = 0
    replies_twice: int = 0  # replies (Message-IDs) the capture server got more than once ...
    replies_twice_in_window: int = 0  # ... of which in the outbox's window (`window_duplicates`)
    extra_copies: int = 0  # copies beyond the first, of all replies
    handler_ran_twice: int = 0  # subscribers given two tokens or two welcomes made apart: no replay
    transitions_twice: int = 0  # state rows past version 2
    not_member: int = 0
    refusals: int = 0  # other replies to subscribers (a confirm applied twice gets "bad confirmation")
    outbox_failed: int = 0
    seconds: float = 0.0
    drain_seconds: float = 0.0  # time the queue took to drain, without putting it
    problems: list[str] = field(default_factory=list)

    @property
    def kills(self) -> int:
        return len(self.killed_pids)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kills": self.kills, "claims_left": len(self.claims_left)}

    def summary(self) -> str:
        return (f"deq: {self.messages} messages ({self.subscribers} subscribers), {self.kills} kills "
                f"(seed {self.seed}, {self.workers} workers, {self.processes} processes): "
                f"processed {self.processed}, lost {self.lost}, left {self.left_in_queue}, "
                f"quarantined {self.quarantined}, ran again {self.reruns}; left claimed by the kills: "
                f"{len(self.claims_left)} queue messages, {self.outbox_claims_left} outbox messages; sends only the "
                f"killed processes' sent journals knew {self.journal_saved}; confirmations "
                f"{self.confirm_requests} (dup {self.confirm_duplicated}, missing {self.confirm_missing}), "
                f"welcomes {self.welcomes} (dup {self.welcome_duplicated}, missing {self.welcome_missing}), "
                f"replies sent more than once {self.replies_twice} ({self.extra_copies} extra copies; "
                f"{self.replies_twice_in_window} in the window between the relay's 250 and the outbox's commit), "
                f"handlers run twice {self.handler_ran_twice}, "
                f"transitions applied twice {self.transitions_twice}, not member {self.not_member}, "
                f"refusals {self.refusals}, outbox failed {self.outbox_failed}; "
                f"{self.seconds:.0f} s ({self.drain_seconds:.0f} s draining)")


def kill_points(rng: random.Random, total: int, kills: int) -> list[int]:
    """`kills` distinct numbers of messages done, between 5 % and 95 % of `total`, ascending."""
    low, high = max(1, total // 20), max(2, total * 19 // 20)
    if high - low < kills:
        raise ValueError(f"{kills} kill points do not fit in {total} messages")
    return sorted(rng.sample(range(low, high), kills))


def _done_at_least(rig: DeqRig, phase_total: int, target: int) -> bool:
    return phase_total - rig.remaining() >= target


def _drain_with_kills(rig: DeqRig, proc: DeqProcess, total: int, kills: int, rng: random.Random,
                      timeout: float, figures: DeqListFigures) -> DeqProcess:
    """Kill the running process at `kills` seeded points of this phase (of `total` messages),
    starting a new one each time; returns the one running at the end."""
    start_remaining = rig.remaining()
    base = total - start_remaining  # messages of the phase already done when it began (none, normally)
    for point in kill_points(rng, total, kills):
        done_before = base + start_remaining - rig.remaining()
        target = max(point, done_before + 1)  # the process to kill has finished one of its own
        rig.wait_until(partial(_done_at_least, rig, base + start_remaining, target), timeout,
                       f"{target} of {total} done before kill {figures.kills + 1}", pause=rng.uniform(0.005, 0.02))
        time.sleep(rng.uniform(0, 0.02))
        code = proc.kill()
        if not proc.killed or code != -9:
            figures.problems.append(f"deq {proc.pid} had exited by itself ({code}) before kill {figures.kills + 1}")
        else:
            figures.killed_pids.append(proc.pid)
            names, outbox = rig.left_by(proc.pid)
            figures.claims_left.extend(names)
            figures.outbox_claims_left += outbox
        proc = rig.start()
    return proc


def _to(messages: Sequence[CapturedMessage], rcpt: str, subject: str) -> list[CapturedMessage]:
    rcpt = rcpt.lower()
    return [m for m in messages if rcpt in (r.lower() for r in m.rcpt_tos)
            and str(m.message.get("Subject", "")) == subject]


def run_list(rig: DeqRig, subscribers: int, kills: int, seed: int, scenario: str | None = None) -> DeqListFigures:
    """The two phases (module docstring) through `rig`, `kills` SIGKILLs in all; the counted figures."""
    started = time.monotonic()
    rng = random.Random(seed)
    figures = DeqListFigures(2 * subscribers, subscribers, kills, seed, rig.workers)
    subs = [subscriber(i) for i in range(subscribers)]
    timeout = 300.0 + 0.5 * subscribers  # per wait; generous, never a timing assertion
    seqs: list[str] = []
    drain = 0.0

    # 1. subscribe
    for i, s in enumerate(subs):
        seqs.append(f"sub-{i}")
        rig.put(seqs[-1], s, f"{LIST}-subscribe@{LIST_HOST}", subject="subscribe {seq}")
    t0 = time.monotonic()
    proc = rig.start()
    proc = _drain_with_kills(rig, proc, subscribers, (kills + 1) // 2, rng, timeout, figures)
    rig.wait_drained(timeout)
    drain += time.monotonic() - t0

    # 2. confirm, with the token of each subscriber's (latest) request
    messages = rig.capture.messages
    for i, s in enumerate(subs):
        requests = _to(messages, s, CONFIRM_SUBJECT)
        m = _CONFIRM_ADDR.search(requests[-1].data.decode("utf-8", "replace")) if requests else None
        if m is None:  # counted below as a missing request
            continue
        seqs.append(f"confirm-{i}")
        rig.put(seqs[-1], s, m.group(0), subject="confirm {seq}")
    t0 = time.monotonic()
    proc = _drain_with_kills(rig, proc, len(seqs) - subscribers, kills // 2, rng, timeout, figures)
    rig.wait_drained(timeout)
    drain += time.monotonic() - t0
    code = proc.terminate()
    if code != 0:
        figures.problems.append(f"the last deq ({proc.pid}) stopped with {code}")
    figures.seconds, figures.drain_seconds = time.monotonic() - started, drain
    _count(rig, subs, seqs, figures)
    acc = rig.account(seqs, scenario)
    figures.processed = len(acc.discarded | acc.delivered)
    figures.lost, figures.left_in_queue = len(acc.lost), len(acc.queued)
    if acc.lost:
        figures.problems.append(f"lost: {acc.lost[:20]}")
    if scenario is not None:
        acc.record(scenario, **{k: v for k, v in figures.as_dict().items() if k not in ("problems", "killed_pids")})
    return figures


def _count(rig: DeqRig, subs: list[str], seqs: list[str], figures: DeqListFigures) -> None:
    """Fill `figures` from the capture server, the state database, the queue and the logs."""
    messages = rig.capture.messages
    figures.processes = len(rig.processes)
    figures.quarantined = len(rig.quarantined())
    figures.outbox_failed = rig.outbox_failed()
    decisions = rig.decisions()
    figures.reruns = sum(1 for kinds in decisions.values() if len(kinds) > 1)
    figures.journal_saved = sum(int(m.group(1)) for p in rig.processes for m in _JOURNAL_SAVED.finditer(p.log()))
    never = [n for n in figures.claims_left if not any(k != "tempfail" for k in decisions.get(n, []))]
    if never:
        figures.problems.append(f"claims of killed processes never decided: {never[:10]}")
    for s in subs:
        requests, welcomes = _to(messages, s, CONFIRM_SUBJECT), _to(messages, s, WELCOME_SUBJECT)
        figures.confirm_requests += len(requests)
        figures.welcomes += len(welcomes)
        figures.confirm_duplicated += len(requests) > 1
        figures.confirm_missing += not requests
        figures.welcome_duplicated += len(welcomes) > 1
        figures.welcome_missing += not welcomes
        tokens = {m.group(1) for r in requests for m in _CONFIRM_ADDR.finditer(r.data.decode("utf-8", "replace"))}
        made = {str(m.message.get("Message-ID", "")) for m in welcomes}
        figures.handler_ran_twice += len(tokens) > 1 or len(made) > 1  # copies of one reply are not this
    arrivals: dict[str, list[float]] = {}
    for m in messages:
        arrivals.setdefault(str(m.message.get("Message-ID", "")), []).append(m.received_at)
    figures.replies_twice = sum(1 for times in arrivals.values() if len(times) > 1)
    figures.extra_copies = sum(len(times) - 1 for times in arrivals.values())
    figures.replies_twice_in_window, unexplained = window_duplicates(arrivals, rig.lifetimes(), rig.outbox_sends())
    if unexplained:
        figures.problems.append(f"replies sent twice outside the window: {unexplained[:10]}")
    known = {CONFIRM_SUBJECT, WELCOME_SUBJECT}
    members = {s.lower() for s in subs}
    figures.refusals = sum(1 for m in messages if members & {r.lower() for r in m.rcpt_tos}
                           and str(m.message.get("Subject", "")) not in known)
    rows = {str(k): (str(st), int(str(v))) for k, st, v in rig.sql(
        "SELECT key, state, version FROM lamsonfilter_state WHERE key LIKE ?", (f"mailinglist:{LIST}:%",))}
    for s in subs:
        state, version = rows.get(f"mailinglist:{LIST}:{s.lower()}", ("-", 0))
        figures.transitions_twice += version > 2
        figures.not_member += state != "MEMBER"
    for name in ("confirm_missing", "welcome_missing", "handler_ran_twice", "transitions_twice", "not_member",
                 "refusals", "left_in_queue", "quarantined", "outbox_failed"):
        if getattr(figures, name):
            figures.problems.append(f"{name}: {getattr(figures, name)}")
    if figures.kills < figures.kills_asked:
        figures.problems.append(f"{figures.kills} kills of {figures.kills_asked}")
