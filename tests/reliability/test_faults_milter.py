"""Milter mode under faults: M1-M4 and R4/R14 of docs/reliability.rst, counted message by message.

Each test runs the real thing: ``lamsonfilter milter`` (its own process, the
example mailing list plus the ``lffault`` handler of tests/rig/milterfaults.py), a private
Postfix with the shipped conf/postfix/*.milter snippets, and a
`CaptureServer` as the final destination.  Mail is injected with
`accounting.Injector` (every message stamped ``X-Test-Seq``, every reply
recorded) and counted with `accounting.account`.

In milter mode a message whose client saw a 4xx was never queued by
Postfix: it is the client's to send again.  These tests resend those as a
real client would (`Injector.resend_tempfailed`), then require that every
seq is accounted for: delivered exactly once (or discarded/rejected by an
explicit decision), nothing lost, no duplicate, Postfix's queue empty.

Faults: SIGKILL of the milter PID this test started (M1; at the named
fault points ``milter.eom`` and ``milter.after_commit`` of
lamsonfilter/devtools/faults.py, R4 and M4), exceptions in every reply-bearing
callback (M2), a handler slower than Postfix's milter timeout and than
the milter's own APP_DEADLINE (M3), and 50 parallel sessions (R14).

Figures go to $LF_RELIABILITY_FIGURES when set (accounting.py).  Run::

    .venv/bin/python -m pytest -q tests/reliability/test_faults_milter.py

A longer leak soak (M2/O2): ``LF_MILTER_SOAK_MESSAGES=100000`` with ``-k flat``.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.rig.accounting import (
    Accounting,
    Injected,
    Injector,
    account,
    delivered_seqs,
)
from tests.rig.deploy_milter import require_pymilter
from tests.rig.fixtures import POSTFIX_BINARIES, require
from tests.rig.milterfaults import (
    LIST_HOST,
    SECRET,
    FaultMilterDeployment,
    ProcStats,
    proc_stats,
)
from tests.rig.modes import started
from tests.rig.postfix import wait_for

pytestmark = pytest.mark.postfix

TAG = f"tag@{LIST_HOST}"  # routed: the handler adds X-Lamsonfilter-Test: tagged and delivers
PASSING = "sink@example.net"  # no route: passes untouched
SENDER = "inject@client.example.test"
#: Postfix's reply when the milter is unreachable or broke off (milter_default_action = tempfail).
POSTFIX_MILTER_TEMPFAIL = "4.7.1"
#: lamsonfilter's own reply for any internal error.
LF_TEMPFAIL = (451, "4.3.0 Temporary failure, try again later")
#: Bound for waiting on a fault point or a log line (never a timing assertion).
WAIT = 60.0


def _deployment(**kwargs: str) -> FaultMilterDeployment:
    require(*POSTFIX_BINARIES, "postcat", root=True)
    require_pymilter()
    return FaultMilterDeployment(**kwargs)


@pytest.fixture
def dep() -> Iterator[FaultMilterDeployment]:
    """A started deployment for one test (the tests that kill the milter)."""
    with started(_deployment()) as d:
        yield d


@pytest.fixture(scope="module")
def shared() -> Iterator[FaultMilterDeployment]:
    """One deployment for the tests that leave the milter running (M2, R14): saves start-up time."""
    with started(_deployment()) as d:
        yield d


# ---------------------------------------------------------------- helpers
def _refusals(item: Injected) -> list[str]:
    """Every 4xx/5xx reply text the client saw, over all attempts."""
    return [f"{r.command}: {r.code} {r.text}" for a in item.attempts for r in a.replies if r.code >= 400]


def _assert_tagged(dep: FaultMilterDeployment, items: list[Injected]) -> None:
    """Every delivered copy of these seqs went through the application (never waved through)."""
    seqs = {i.seq for i in items}
    copies = [m for m in dep.capture.messages if str(m.message.get("X-Test-Seq", "")).strip() in seqs]
    unfiltered = [str(m.message["X-Test-Seq"]) for m in copies
                  if m.header_values("X-Lamsonfilter-Test") != ["tagged"]]
    assert not unfiltered, f"delivered without passing the milter's handler: {unfiltered}"


def _resend_all(inj: Injector, items: list[Injected], rounds: int = 5) -> list[Injected]:
    items = inj.resend_tempfailed(items, attempts=rounds, pause=1.0)
    still = [i.seq for i in items if not i.accepted]
    assert not still, f"not accepted after {rounds} resends: {[(i.seq, str(i.result)) for i in items if i.seq in still]}"
    return items


def _delivered(acc: Accounting) -> set[str]:
    """Seqs of this accounting's injected messages that reached the destination."""
    return acc.delivered & set(acc.injected)


def _tempfailed(acc: Accounting) -> set[str]:
    return acc.tempfailed & set(acc.injected)


def _check(acc: Accounting, *, duplicates: int = 0) -> None:
    print(acc.summary())
    acc.assert_nothing_lost(allow_duplicates=duplicates, allow_queued=False)


def _inject_in_background(inj: Injector, n: int, **kwargs: object) -> tuple[threading.Thread, list[Injected]]:
    """Start `inj.inject(n, ...)` in a thread (the client blocks while the milter is held)."""
    out: list[Injected] = []

    def run() -> None:
        out.extend(inj.inject(n, **kwargs))  # type: ignore[arg-type]

    thread = threading.Thread(target=run, name="lf-inject", daemon=True)
    thread.start()
    return thread, out


def _reached(marker: Path) -> tuple[str, int]:
    """Wait (bounded) for a fault point's marker: (queue id, milter pid) it recorded."""
    def written() -> str:  # "QUEUE_ID PID" once complete, else ""
        text = marker.read_text().strip() if marker.exists() else ""
        return text if len(text.split()) == 2 else ""

    text = wait_for(written, WAIT, message=f"{marker.name} (the milter never reached the fault point)")
    queue_id, pid = text.split()
    return queue_id, int(pid)


def _kill_at(dep: FaultMilterDeployment, marker: Path) -> str:
    """SIGKILL the milter once it holds at the fault point; the queue id it held."""
    queue_id, pid = _reached(marker)
    assert pid == dep.filter_pid, f"the marker names pid {pid}, we started {dep.filter_pid}"
    dep.kill_filter()
    return queue_id


# ---------------------------------------------------------------- M1: the milter is killed
def test_m1_killed_milter_tempfails_then_resend_is_accepted_once(dep: FaultMilterDeployment) -> None:
    """SIGKILL → 4xx for routed and passing mail, nothing queued or delivered; restart → resends once."""
    assert dep.postfix is not None
    inj = Injector(dep, "m1")
    before = inj.inject(5, rcpts=[TAG], parallel=5)
    assert all(i.accepted for i in before), [str(i.result) for i in before]

    dep.kill_filter()  # SIGKILL of the PID this deployment started
    down = inj.inject(10, rcpts=[TAG], parallel=5) + inj.inject(5, rcpts=[PASSING], parallel=5)
    for item in down:
        assert not item.accepted and item.tempfailed, f"{item.seq}: {item.result}"
        final = item.result.final or item.result.reply("DATA") or item.result.replies[-1]
        assert 400 <= final.code < 500, f"{item.seq}: {item.result}"
    assert dep.postfix.queue() == [], "Postfix queued mail while the milter was down"
    arrived = {seq for seq, _ in delivered_seqs(dep.capture.messages)}
    assert not arrived & {i.seq for i in down}, "mail passed unfiltered while the milter was down"

    dep.restart_clean()
    down = _resend_all(inj, down)
    acc = account(dep, before + down)
    _check(acc)
    assert _delivered(acc) == {i.seq for i in before + down}
    _assert_tagged(dep, [i for i in before + down if TAG in i.rcpts])
    acc.record("M1 milter SIGKILL, client resends", tempfailed_first=len(down))


# ---------------------------------------------------------------- R4: SIGKILL at a fault point
@pytest.mark.parametrize("point", ["milter.eom", "milter.after_commit"])
def test_r4_kill_at_fault_point_loses_nothing(dep: FaultMilterDeployment, point: str) -> None:
    """12 messages over 4 sessions; the milter holds one at `point` and is SIGKILLed there.

    The held message (and any other in flight) gets a 4xx and is not queued;
    after the restart the client resends: each seq delivered exactly once,
    filtered, nothing left in Postfix's queue.
    """
    assert dep.postfix is not None
    marker = dep.restart_with_fault(point)
    inj = Injector(dep, f"r4-{point.split('.')[1]}")
    thread, items = _inject_in_background(inj, 12, rcpts=[TAG], parallel=4, per_session=3)
    held_queue_id = _kill_at(dep, marker)
    thread.join(WAIT * 3)
    assert not thread.is_alive(), "the injector did not finish after the kill"
    assert len(items) == 12

    first = {i.seq: i.result for i in items}
    tempfailed = [s for s, r in first.items() if not r.accepted]
    assert tempfailed, f"the kill at {point} interrupted nothing: {first}"
    assert all(held_queue_id not in str(r) for r in first.values() if r.accepted), (
        f"the message held at {point} ({held_queue_id}) was accepted")
    queued = {q["queue_id"] for q in dep.postfix.queue()}
    assert held_queue_id not in queued, f"the held message {held_queue_id} is in Postfix's queue"

    dep.restart_clean()
    items = _resend_all(inj, items)
    acc = account(dep, items)
    _check(acc)
    assert _delivered(acc) == {i.seq for i in items}
    _assert_tagged(dep, items)
    acc.record(f"R4 milter SIGKILL at {point}", tempfailed_first=len(tempfailed), held=held_queue_id)


# ---------------------------------------------------------------- M4: the retry replays the decision
def test_m4_retry_after_kill_sends_exactly_one_confirmation(dep: FaultMilterDeployment) -> None:
    """A subscribe request; the milter dies after committing the reply, before its verdict.

    The client saw a 4xx and resends the same message (same Message-ID):
    the milter replays the committed decision instead of running the handler
    again, so exactly one confirmation request reaches the member.
    """
    member = "m4-member@example.com"
    marker = dep.restart_with_fault("milter.after_commit")
    inj = Injector(dep, "m4")
    thread, items = _inject_in_background(inj, 1, sender=member, rcpts=[f"python-subscribe@{LIST_HOST}"],
                                          subject="subscribe me")
    _kill_at(dep, marker)
    thread.join(WAIT * 3)
    (item,) = items
    assert item.tempfailed, f"expected a 4xx after the kill: {item.result}"

    dep.restart_clean()
    (item,) = _resend_all(inj, [item])
    assert item.result.accepted
    dep.wait_for_mail(member, "Confirm your subscription")
    dep.settle()  # anything else on its way would be here by now
    confirmations = dep.messages_to(member, "Confirm your subscription")
    assert len(confirmations) == 1, f"{len(confirmations)} confirmation requests: {dep.diagnostics()}"
    assert "decision replayed" in dep.filter_log.read_text(), dep.filter_log_tail()
    acc = account(dep, [item])
    _check(acc)
    assert acc.discarded == {item.seq}  # consumed by the application (milter DISCARD)
    acc.record("M4 kill after commit, resend same Message-ID", confirmations=len(confirmations))


# ---------------------------------------------------------------- M2: exceptions in every callback
#: (case, sender, recipients, the command refused, the log line the milter must write once per attempt)
CALLBACK_FAULTS = [
    ("envfrom", "boom-envfrom@client.example.test", [PASSING], "MAIL",
     r"queue_id=\S+ milter envfrom failed, answering 451 4\.3\.0: RuntimeError"),
    ("envrcpt", SENDER, ["boom-envrcpt@example.net"], "RCPT <boom-envrcpt@example.net>",
     r"queue_id=\S+ milter envrcpt failed, answering 451 4\.3\.0: RuntimeError"),
    ("data", SENDER, ["boom-data@example.net"], "DATA",
     r"queue_id=[0-9A-F]+ milter data failed, answering 451 4\.3\.0: RuntimeError"),
    ("eom", SENDER, [f"boom-eom@{LIST_HOST}"], ".",
     r"queue_id=[0-9A-F]+ milter eom failed, answering 451 4\.3\.0: RuntimeError"),
    ("handler", SENDER, [f"crash@{LIST_HOST}"], ".",
     r"queue_id=[0-9A-F]+ handler=lftest\.\w+ rcpt=crash@\S+ tempfail: RuntimeError"),
    ("route-match", SENDER, [f"boom-match@{LIST_HOST}"], ".",
     r"queue_id=[0-9A-F]+ tempfail: RuntimeError: injected failure in route matching"),
]


@pytest.mark.parametrize("case,sender,rcpts,command,log_line", CALLBACK_FAULTS,
                         ids=[c[0] for c in CALLBACK_FAULTS])
def test_m2_exception_in_callback_is_a_plain_451(shared: FaultMilterDeployment, case: str, sender: str,
                                                 rcpts: list[str], command: str, log_line: str) -> None:
    """3 attempts, each: 451 4.3.0 with the fixed text at `command`, nothing queued or delivered,
    no internals in any reply, one log line; the milter lives on and passes normal mail."""
    dep = shared
    assert dep.postfix is not None and dep.filter_proc is not None and dep.filter_proc.poll() is None
    log_before = dep.filter_log.read_text(errors="replace")
    inj = Injector(dep, f"m2-{case}")
    items = inj.inject(3, sender=sender, rcpts=rcpts)
    for item in items:
        reply = item.result.reply(command)
        assert reply is not None and (reply.code, reply.text) == LF_TEMPFAIL, f"{case}: {item.result}"
        assert not item.accepted and item.tempfailed
        for text in _refusals(item):
            for leak in (SECRET, "Traceback", "Error", "lffault", "lamsonfilter"):
                assert leak not in text, f"{case}: reply leaks {leak!r}: {text}"
    new_log = dep.filter_log.read_text(errors="replace")[len(log_before):]
    lines = [line for line in new_log.splitlines() if re.search(log_line, line)]
    assert len(lines) == 3, f"{case}: expected one log line per attempt, got {lines}\n{new_log}"
    assert "Traceback" not in new_log, new_log

    ok = inj.inject(1, rcpts=[TAG])  # the milter still serves normal mail
    acc = account(dep, items + ok, scenario=f"M2 exception in {case}", client_keeps_tempfailed=True)
    _check(acc)
    assert _delivered(acc) == {ok[0].seq} and _tempfailed(acc) == {i.seq for i in items}
    assert dep.filter_proc.poll() is None, "the milter died"


def test_m2_rcpt_check_failure_for_one_recipient_keeps_the_other(shared: FaultMilterDeployment) -> None:
    """A broken RCPT check tempfails that recipient only; the other is delivered, filtered, once."""
    dep = shared
    inj = Injector(dep, "m2-mixed")
    (item,) = inj.inject(1, rcpts=[TAG, "boom-envrcpt@example.net"])
    assert item.result.rcpt("boom-envrcpt@example.net") is not None
    assert item.result.rcpt("boom-envrcpt@example.net").code == 451, str(item.result)  # type: ignore[union-attr]
    assert item.result.accepted, str(item.result)
    acc = account(dep, [item])
    _check(acc)
    assert (item.seq, TAG) in acc.delivered_copies
    assert (item.seq, "boom-envrcpt@example.net") not in acc.delivered_copies
    _assert_tagged(dep, [item])


# ---------------------------------------------------------------- M2: no leaks under volume
#: Messages in the warm-up, then in total.  CI-sized; a longer soak (O2) is the same test with
#: LF_MILTER_SOAK_MESSAGES=100000 (bounded by that count; about 1 s per 300 messages here).
WARMUP = 500
TOTAL = max(WARMUP * 2, int(os.environ.get("LF_MILTER_SOAK_MESSAGES", "2000")))


def test_m2_threads_fds_rss_stay_flat(shared: FaultMilterDeployment) -> None:
    """TOTAL (2000) messages (4/5 routed and delivered, 1/5 to the crashing handler, 451):
    the milter's threads and open files do not grow with the count, RSS only a little."""
    dep = shared
    assert dep.filter_proc is not None
    pid = dep.filter_pid
    inj = Injector(dep, "m2-volume")
    samples: list[tuple[int, ProcStats]] = []
    sent: list[Injected] = []
    crashed: list[Injected] = []
    for target in (WARMUP, TOTAL):
        n = target - len(sent) - len(crashed)
        good = n * 4 // 5
        sent += inj.inject(good, rcpts=[TAG], parallel=10, per_session=10)
        crashed += inj.inject(n - good, rcpts=[f"crash@{LIST_HOST}"], parallel=10, per_session=10)
        acc = account(dep, sent)  # waits until everything accepted is delivered: the milter is idle
        assert not acc.lost
        samples.append((target, proc_stats(pid)))
    (_, warm), (_, end) = samples
    print(f"M2: after {WARMUP}: {warm}; after {TOTAL}: {end}")
    assert all(i.accepted for i in sent), [str(i.result) for i in sent if not i.accepted][:5]
    assert all(i.result.final is not None and i.result.final.code == 451 for i in crashed)
    acc = account(dep, sent + crashed, client_keeps_tempfailed=True)
    _check(acc)
    assert dep.filter_proc.poll() is None, "the milter died"
    # bounded: libmilter's worker pool may differ by a few idle threads, never by the message count
    assert end.threads <= warm.threads + 4, f"threads grew: {warm} -> {end}"
    assert end.fds <= warm.fds + 4, f"open files grew: {warm} -> {end}"
    assert end.rss_kib < warm.rss_kib * 1.5, f"RSS grew by more than 50 %: {warm} -> {end}"
    acc.record("M2 volume (threads/fds/rss)", warm=str(warm), end=str(end),
               rss_growth_pct=round(100 * (end.rss_kib - warm.rss_kib) / warm.rss_kib, 1))


# ---------------------------------------------------------------- R14: overload
def test_r14_fifty_parallel_sessions_lose_nothing(shared: FaultMilterDeployment) -> None:
    """50 parallel sessions at once: 1500 routed messages (stateless, delivered) over 40 of them
    and 300 subscribe requests for *one* state key (serialised in the store, consumed) over 10.
    Every message is accepted or gets a 4xx (never a 5xx); the 4xx ones are resent; then
    every seq is delivered exactly once, filtered, or discarded by the application's decision,
    and the milter is alive."""
    dep = shared
    assert dep.filter_proc is not None and dep.postfix is not None
    member = "r14-member@example.com"
    tags, subs = Injector(dep, "r14-tag"), Injector(dep, "r14-sub")
    started = time.monotonic()
    t_sub, subscribed = _inject_in_background(subs, 300, sender=member, rcpts=[f"python-subscribe@{LIST_HOST}"],
                                              parallel=10)
    tagged = tags.inject(1500, rcpts=[TAG], parallel=40)
    t_sub.join(WAIT * 5)
    assert not t_sub.is_alive(), "the subscribe injector did not finish"
    took = time.monotonic() - started
    first = tagged + subscribed
    tempfailed_first = sum(not i.accepted for i in first)
    rejected = [str(i.result) for i in first if i.rejected]
    assert not rejected, f"5xx under load: {rejected[:5]}"
    tagged, subscribed = _resend_all(tags, tagged), _resend_all(subs, subscribed)
    acc = account(dep, tagged + subscribed)
    _check(acc)
    assert _delivered(acc) == {i.seq for i in tagged}
    assert acc.discarded & {i.seq for i in subscribed} == {i.seq for i in subscribed}
    _assert_tagged(dep, tagged)
    assert dep.filter_proc.poll() is None, "the milter died"
    confirmations = len(dep.messages_to(member, "Confirm your subscription"))
    print(f"R14: {len(first)} messages in {took:.1f} s, {tempfailed_first} tempfailed at first, "
          f"{confirmations} confirmation requests (REPLY_LIMIT applies)")
    acc.record("R14 milter: 50 sessions, 1800 messages", tempfailed_first=tempfailed_first,
               inject_seconds=round(took, 1), confirmations=confirmations)


# ---------------------------------------------------------------- M3: too slow
def test_m3_slow_handler_is_tempfailed_never_accepted_unfiltered() -> None:
    """A handler slower than Postfix's milter content timeout (4 s here): the client sees
    Postfix's default_action 4xx, nothing is queued or delivered, the milter keeps serving.
    Then the milter's own APP_DEADLINE (2 s here, 100 s shipped): lamsonfilter answers
    451 4.3.0 itself, before Postfix gives up, with one log line carrying the queue id."""
    dep = _deployment(content_timeout="4s")
    try:
        dep.start()
        assert dep.postfix is not None
        inj = Injector(dep, "m3")

        # 1. Postfix's timeout: the handler sleeps 8 s, Postfix waits 4 s
        (slow,) = inj.inject(1, rcpts=[f"slow-8@{LIST_HOST}"])
        assert not slow.accepted and slow.tempfailed, str(slow.result)
        final = slow.result.final
        assert final is not None and 400 <= final.code < 500 and POSTFIX_MILTER_TEMPFAIL in final.text, str(slow.result)
        assert dep.postfix.queue() == []
        # the handler finishes later; its verdict must not make anything pass
        wait_for(lambda: "routes=lffault.SLOW" in dep.filter_log.read_text(), WAIT,
                 message="the slow handler to finish")
        (ok,) = inj.inject(1, rcpts=[TAG])
        assert ok.accepted, f"the milter does not serve after a timeout: {ok.result}"
        acc = account(dep, [slow, ok], scenario="M3 handler past milter_content_timeout",
                      client_keeps_tempfailed=True)
        _check(acc)
        assert _delivered(acc) == {ok.seq}, "the slow message was delivered"

        # 2. lamsonfilter's own deadline, well inside Postfix's 4 s
        dep.stop_filter()
        dep.filter_env["LF_TEST_APP_DEADLINE"] = "2"
        dep.filter_env["LF_TEST_COMMIT_GRACE"] = "0.5"
        dep.start_filter()
        (late,) = inj.inject(1, rcpts=[f"slow-3@{LIST_HOST}"])
        assert late.result.final is not None and (late.result.final.code, late.result.final.text) == LF_TEMPFAIL, (
            str(late.result))
        log = dep.filter_log.read_text()
        assert re.search(r"queue_id=[0-9A-F]+ milter eom failed, answering 451 4\.3\.0: "
                         r"RuntimeError: the application took more than 2 s", log), log
        wait_for(lambda: "routes=lffault.SLOW" in dep.filter_log.read_text(), WAIT,
                 message="the slow handler to finish")
        (ok2,) = inj.inject(1, rcpts=[TAG])
        assert ok2.accepted, str(ok2.result)
        acc = account(dep, [slow, ok, late, ok2], scenario="M3 handler past APP_DEADLINE",
                      client_keeps_tempfailed=True)
        _check(acc)
        assert _delivered(acc) == {ok.seq, ok2.seq}
        assert dep.filter_proc is not None and dep.filter_proc.poll() is None
    finally:
        print(dep.diagnostics())
        dep.stop()


class LateReply(AssertionError):
    """A reply went out for a message the client was told to retry (`MailRequest.deadline` guards this)."""


def test_m3_past_app_deadline_nothing_is_sent(dep: FaultMilterDeployment) -> None:
    """A handler that replies, slower than APP_DEADLINE (2 s): the client gets 451 4.3.0, so the
    reply must not go out -- unless and until the client's resend is accepted, then exactly once."""
    sender = "m3-late@example.com"
    dep.stop_filter()
    dep.filter_env["LF_TEST_APP_DEADLINE"] = "2"
    dep.filter_env["LF_TEST_COMMIT_GRACE"] = "0.5"
    dep.start_filter()
    inj = Injector(dep, "m3-late")
    (item,) = inj.inject(1, sender=sender, rcpts=[f"slowreply-4@{LIST_HOST}"])
    assert item.result.final is not None and (item.result.final.code, item.result.final.text) == LF_TEMPFAIL, (
        str(item.result))
    wait_for(lambda: "deadline passed before the commit" in dep.filter_log.read_text(), WAIT,
             message="the slow handler to finish (and commit nothing)")
    dep.settle()  # a reply on its way would have arrived by now
    replies = dep.messages_to(sender, "lffault late reply")
    print(f"replies for a message the client saw tempfailed: {len(replies)}")
    if replies:
        raise LateReply(f"{len(replies)} reply sent although the client got {item.result.final}")
