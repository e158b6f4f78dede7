"""The example mailing list through two filter hosts on one database (issue 16), counted.

`run_list` drives a started `TwoHostRig`:

1. **subscribe**: subscriber *i* (``sub<i>@d<i>.example.net``: a domain
   each, so the per-domain reply budget is not what is measured) sends
   ``python-subscribe@lists.example.org`` through host ``i % 2``;
2. **confirm**: when every confirmation request arrived, each subscriber
   answers the token address of *its* request through the *other* host;
3. **post**: when every welcome arrived, `posts` members post to
   ``python@lists.example.org``, alternating hosts.

Every message the clients send is made and sent by the accounting harness
(tests/reliability/accounting.py's `Injector`: an ``X-Test-Seq`` stamp and
a unique Message-ID each, every reply kept; a message refused with a 4xx,
as a milter host does while its filter is down, is sent again like a real
client would).  List copies keep the post's header, so `delivered_seqs`
counts every (post, member) copy.

`kill` (optional) is called in a thread of its own while each phase's
second half is being sent: the test of SIGKILLs passes
``lambda phase: (rig.kill(0), rig.restart(0))``.  A host killed while
sending leaves outbox messages claimed; another worker takes them over
when the claim's lease (the setting ``OUTBOX_LEASE`` the rig writes,
`tests.rig.twohost.RIG_LEASE`) has passed, so with `kill` every wait is
longer by the lease: such a run takes up to three leases more.

What comes back (`ListFigures`) is what the assertions and
docs/reliability.rst use: confirmation requests and welcomes per
subscriber, post copies per (post, member), lost and duplicated counts.

Bounded: every wait has a timeout proportional to the mail expected.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from tests.rig.accounting import Injected, Injector, delivered_seqs
from tests.rig.deploy import LIST_HOST
from tests.rig.postfix import CapturedMessage
from tests.rig.twohost import RIG_LEASE, TwoHostRig

__all__ = ["ListFigures", "run_list", "subscriber"]

LIST = "python"
CONFIRM_SUBJECT = f"Confirm your subscription to {LIST}@{LIST_HOST}"
WELCOME_SUBJECT = f"Welcome to {LIST}@{LIST_HOST}"
_CONFIRM_ADDR = re.compile(rf"{LIST}-confirm-[0-9a-f]{{32}}@{re.escape(LIST_HOST)}")
#: Client threads sending at once (the issue's measurement used 8).
PARALLEL = 8
#: Rounds of resending what a host refused with a 4xx.
RESEND_ROUNDS = 10


def subscriber(i: int) -> str:
    return f"sub{i}@d{i}.example.net"


@dataclass
class ListFigures:
    """What one run counted; `problems` lists every deviation from "exactly once"."""

    modes: tuple[str, ...]
    subscribers: int
    posts: int
    kills: int = 0
    confirm_requests: int = 0
    confirm_duplicated: int = 0  # subscribers with more than one request
    confirm_missing: int = 0
    welcomes: int = 0
    welcome_duplicated: int = 0
    welcome_missing: int = 0
    transitions_twice: int = 0  # subscribers whose state row was written more than twice by two messages
    refusals: int = 0  # other replies to subscribers (e.g. "bad confirmation": a confirm applied twice)
    post_copies: int = 0
    post_lost: int = 0  # (post, member) pairs with no copy
    post_duplicated: int = 0  # (post, member) pairs with more than one copy
    resent: int = 0  # client resends after a 4xx
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (f"{'+'.join(self.modes)}: {self.subscribers} subscribers, {self.posts} posts, "
                f"{self.kills} kills: confirmations {self.confirm_requests} "
                f"(dup {self.confirm_duplicated}, missing {self.confirm_missing}), welcomes {self.welcomes} "
                f"(dup {self.welcome_duplicated}, missing {self.welcome_missing}), "
                f"transitions applied twice {self.transitions_twice}, refusals {self.refusals}, "
                f"post copies {self.post_copies} (lost {self.post_lost}, dup {self.post_duplicated}), "
                f"resent {self.resent}, {self.seconds:.0f} s")


def _to(messages: Sequence[CapturedMessage], rcpt: str, subject: str) -> list[CapturedMessage]:
    rcpt = rcpt.lower()
    return [m for m in messages if rcpt in (r.lower() for r in m.rcpt_tos)
            and str(m.message.get("Subject", "")) == subject]


def _send_phase(rig: TwoHostRig, injectors: list[Injector], jobs: list[tuple[int, str, str]],
                phase: str, kill: Callable[[str], None] | None, figures: ListFigures) -> list[Injected]:
    """Send `jobs` ((host, sender, rcpt)), `PARALLEL` at a time; `kill` runs alongside the second half."""

    def one(job: tuple[int, str, str]) -> Injected:
        host, sender, rcpt = job
        (item,) = injectors[host].inject(1, sender=sender, rcpts=[rcpt], subject=f"{phase} {{seq}}")
        return item

    half = len(jobs) // 2
    sent: list[Injected] = []
    with ThreadPoolExecutor(max_workers=PARALLEL, thread_name_prefix=f"lf2h-{phase}") as pool:
        sent.extend(pool.map(one, jobs[:half]))
        killer = None
        if kill is not None:
            killer = threading.Thread(target=kill, args=(phase,), name=f"lf2h-kill-{phase}")
            killer.start()
            figures.kills += 1
        sent.extend(pool.map(one, jobs[half:]))
        if killer is not None:
            killer.join(120)
            assert not killer.is_alive(), "the kill/restart thread hung"
    # a real client sends again what it was refused with a 4xx (milter host while its filter is down)
    for round_ in range(RESEND_ROUNDS):
        todo = [i for i, item in enumerate(sent) if item.tempfailed]
        if not todo:
            break
        time.sleep(1 + round_)
        for i in todo:
            host = jobs[i][0]
            sent[i] = injectors[host].resend(sent[i])
            figures.resent += 1
    refused = [f"{s.seq}: {s.result}" for s in sent if not s.accepted]
    assert not refused, f"{phase}: not accepted after {RESEND_ROUNDS} rounds: {refused[:5]}"
    return sent


def _wait_count(rig: TwoHostRig, count: Callable[[], int], expected: int, what: str,
                figures: ListFigures, patience: float) -> None:
    """Wait (bounded, ~1 minute + 0.2 s a message + `patience`) until `count()` reaches `expected`;
    flush as it goes.  A shortfall is noted in `figures.problems` (the final count says what)."""
    deadline = time.monotonic() + 60 + 0.2 * expected + patience
    while time.monotonic() < deadline:  # bounded by the deadline
        if count() >= expected:
            return
        rig.flush()
        time.sleep(1)
    figures.problems.append(f"{what}: {count()} of {expected} after the time limit")


def run_list(rig: TwoHostRig, subscribers: int, posts: int,
             kill: Callable[[str], None] | None = None) -> ListFigures:
    """The three phases (see the module doc) through `rig`; the counted `ListFigures`."""
    started = time.monotonic()
    figures = ListFigures(rig.modes, subscribers, posts)
    # A SIGKILLed host leaves the outbox messages it had claimed; another worker takes them over
    # once the lease has passed (the rig's setting OUTBOX_LEASE): with kills, waits include it.
    patience = RIG_LEASE + 30 if kill is not None else 0.0
    subs = [subscriber(i) for i in range(subscribers)]
    n_hosts = len(rig.hosts)
    injectors = [Injector(h, f"h{i}") for i, h in enumerate(rig.hosts)]

    # 1. subscribe, spread over the hosts
    _send_phase(rig, injectors, [(i % n_hosts, s, f"{LIST}-subscribe@{LIST_HOST}") for i, s in enumerate(subs)],
                "subscribe", kill, figures)
    _wait_count(rig, lambda: sum(1 for s in subs if _to(rig.capture.messages, s, CONFIRM_SUBJECT)),
                subscribers, "subscribers with a confirmation request", figures, patience)
    rig.settle(120 + patience)

    # 2. confirm, each through the other host, with the token of its (first) request
    messages = rig.capture.messages
    jobs = []
    for i, s in enumerate(subs):
        requests = _to(messages, s, CONFIRM_SUBJECT)
        m = _CONFIRM_ADDR.search(requests[-1].data.decode("utf-8", "replace")) if requests else None
        if m:  # a missing request is counted below
            jobs.append(((i + 1) % n_hosts, s, m.group(0)))
    _send_phase(rig, injectors, jobs, "confirm", kill, figures)
    _wait_count(rig, lambda: sum(1 for s in subs if _to(rig.capture.messages, s, WELCOME_SUBJECT)),
                subscribers, "subscribers with a welcome", figures, patience)
    rig.settle(120 + patience)
    # two messages per subscriber, two transitions (START -> PENDING -> MEMBER): the row's version
    # counter is 2; a subscribe or confirm applied twice (a retry not replayed) makes it 3 or more
    rows = {str(k): (str(state), int(str(v))) for k, state, v in rig.database.rows(
        "SELECT key, state, version FROM lamsonfilter_state WHERE key LIKE %s", (f"mailinglist:{LIST}:%",))}
    for s in subs:
        state, version = rows.get(f"mailinglist:{LIST}:{s.lower()}", ("-", 0))
        figures.transitions_twice += version > 2
        if state != "MEMBER":
            figures.problems.append(f"{s}: state {state} (version {version}), not MEMBER")

    # 3. posts by members, alternating hosts
    post_jobs = [(p % n_hosts, subs[p % subscribers], f"{LIST}@{LIST_HOST}") for p in range(posts)]
    post_items = _send_phase(rig, injectors, post_jobs, "post", kill, figures)
    post_seqs = {item.seq for item in post_items}

    def copies() -> Counter[tuple[str, str]]:
        return Counter({k: n for k, n in delivered_seqs(rig.capture.messages).items() if k[0] in post_seqs})

    _wait_count(rig, lambda: len(copies()), posts * subscribers, "(post, member) pairs delivered", figures, patience)
    rig.settle(120 + patience)

    # the count
    messages = rig.capture.messages
    members = {s.lower() for s in subs}
    for s in subs:
        n_confirm, n_welcome = len(_to(messages, s, CONFIRM_SUBJECT)), len(_to(messages, s, WELCOME_SUBJECT))
        figures.confirm_requests += n_confirm
        figures.welcomes += n_welcome
        figures.confirm_duplicated += n_confirm > 1
        figures.confirm_missing += n_confirm == 0
        figures.welcome_duplicated += n_welcome > 1
        figures.welcome_missing += n_welcome == 0
    known = {CONFIRM_SUBJECT, WELCOME_SUBJECT}
    figures.refusals = sum(1 for m in messages if members & {r.lower() for r in m.rcpt_tos}
                           and not delivered_seqs([m]) and str(m.message.get("Subject", "")) not in known)
    got = copies()
    figures.post_copies = sum(got.values())
    for seq in sorted(post_seqs):
        for member in members:
            n = got.get((seq, member), 0)
            figures.post_lost += n == 0
            figures.post_duplicated += n > 1
    figures.seconds = time.monotonic() - started
    for name in ("confirm_duplicated", "confirm_missing", "welcome_duplicated", "welcome_missing",
                 "transitions_twice", "refusals", "post_lost", "post_duplicated"):
        if getattr(figures, name):
            figures.problems.append(f"{name}: {getattr(figures, name)}")
    return figures
