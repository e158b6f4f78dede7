"""Issue 17, "Nothing lost, nothing done twice", for ``lamsonfilter deq``: counted, with real processes.

Every test runs the real ``lamsonfilter deq`` command (subprocesses of
the rig, tests/rig/deqrig.py) over a Maildir queue filled the way Postfix's
Maildir delivery fills it, with the example mailing list as the
application (SQLite state, replies through the outbox) and a capture
server as ``RELAY``: every reply and every message sent on ends there and
is counted (tests/rig/accounting.py).  No Postfix is needed: what Postfix
does in front of the queue is issue 17's Postfix test.

* kill -9 at seeded random points while draining: every message
  processed, no handler's work done twice (one token per subscriber, one
  welcome made), no state transition applied twice (each row at version
  2), and no reply sent twice (counted per Message-ID at the capture
  server) but in the milliseconds between the relay's commit and the
  outbox's sent journal, which records each send at the relay's 250 so
  that a killed sender's replies are not sent again by the next process
  (`lamsonfilter.sentjournal`; each copy is checked against the logs,
  `window_duplicates`, and at most `WINDOW_BOUND` a run; see
  docs/reliability.rst, Q4);
* two processes on one queue: each message processed once;
* a message that kills its process ends in the quarantine after
  ``POISON_LIMIT`` attempts with its reason, the others are processed, and
  ``lamsonfilter quarantine release`` sends it on.

The kill test runs on SQLite and on PostgreSQL (a fresh database on the
test server).  Sizes: CI runs 300 messages and 10 kills, 300 messages for
two processes; ``LF_DEQ_FULL=1`` (``make deqrel``) runs 2,000 messages and
12 kills, and 2,000 (issue 17's size).  ``LF_DEQ_SEED`` picks the kill points (default 17).  The figures
are in docs/reliability.rst, "The queue transport".
"""

from __future__ import annotations

import json
import os
import time
from functools import partial
from pathlib import Path

import pytest

from tests.rig.accounting import delivered_seqs
from tests.rig.deqlist import CONFIRM_SUBJECT, run_list, subscriber
from tests.rig.deqrig import DeqProcess, DeqRig, Lifetime, window_duplicates
from tests.rig.fixtures import skip_or_fail
from tests.rig.postfix import CaptureServer
from tests.rig.storage import PG_URL, pg_admin
from tests.rig.twohost import SharedDatabase

FULL = os.environ.get("LF_DEQ_FULL", "").strip() not in ("", "0")
#: Messages queued by the kill test (two per subscriber) and by the two-process test.
MESSAGES = 2000 if FULL else 300
KILLS = 12 if FULL else 10
SEED = int(os.environ.get("LF_DEQ_SEED", "17"))
#: Replies sent twice a run may show, each in the window the sent journal cannot close (Q4):
#: measured 0-1 in CI-size runs, 0-2 in full-size ones (more kills, a faster drain).
WINDOW_BOUND = 4 if FULL else 2
#: The poison test's POISON_LIMIT and how many good messages go with the poison.
LIMIT = 2
GOOD = 40


def _postgresql() -> SharedDatabase:
    """A fresh database on the test server (skipped, or failed under CI, when it is unreachable)."""
    try:
        pg_admin().close()
    except Exception as exc:  # noqa: BLE001 -- any reason the server cannot be used
        skip_or_fail(f"PostgreSQL at {PG_URL} is unreachable: {exc}")
    return SharedDatabase(PG_URL, prefix="lf_deqrel")


def _dead_or_kept(rig: DeqRig, proc: DeqProcess) -> bool:
    return not proc.alive() or bool(rig.quarantined())


def _report(what: str, summary: str) -> None:
    print(f"\n{what}: {summary}")


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_kill9_while_draining_loses_nothing_and_does_nothing_twice(capture: CaptureServer, backend: str) -> None:
    database = _postgresql() if backend == "postgresql" else None
    with DeqRig(capture, workers=4, database=database) as rig:
        figures = run_list(rig, MESSAGES // 2, KILLS, SEED,
                           scenario=f"deq ({backend}): kill -9 x{KILLS} while draining")
        _report("kill -9 while draining", figures.summary())
        assert figures.kills >= KILLS and len(set(figures.killed_pids)) == figures.kills, figures.summary()
        assert not figures.problems, f"{figures.summary()}\n{figures.problems}\n{rig.log_tail()}"
        assert figures.processed == MESSAGES
        # the sent journal records each send at the relay's 250, and the next process applies a killed
        # one's journal before it claims (docs/reliability.rst, Q4): a reply goes out twice only when the
        # kill falls between the relay's commit and the journal's write -- the round trip of the final
        # dot and the outbox thread's wait for the GIL, milliseconds -- and the logs must show exactly
        # that (`window_duplicates`); measured 0-2 per run (before the journal: 1-12, a window up to ~1 s)
        assert figures.replies_twice == figures.replies_twice_in_window <= WINDOW_BOUND, figures.summary()


def test_two_deq_processes_on_one_queue_process_each_message_once(capture: CaptureServer) -> None:
    subscribers = MESSAGES
    # the gate messages wait for each other within the handlers' deadline (half the lease)
    with DeqRig(capture, handlers=("lfdeq",), settings="QUEUE_LEASE = 120\n", workers=2) as rig:
        gate = rig.workdir / "gate"
        gate.mkdir()
        with open(rig.app_dir / "config" / "settings.py", "a", encoding="utf-8") as f:
            f.write(f"GATE_DIRECTORY = {str(gate)!r}\n")
        # more gate messages than one process can hold (its workers): the other gets some
        gates = [rig.put(f"gate-{i}", "tester@client.example.test", "gate@lists.example.org")
                 for i in range(4 * rig.workers)]
        a, b = rig.start(), rig.start()
        rig.wait_until(lambda: len({p.name.split(".")[1] for p in gate.glob("held.*")}) >= 2, 120,
                       "both processes holding a gate message")
        seqs = []
        for i in range(subscribers):
            seqs.append(f"sub-{i}")
            rig.put(seqs[-1], subscriber(i), "python-subscribe@lists.example.org", subject="subscribe {seq}",
                    staged=True)
        rig.release_staged()  # all at once, while both processes hold a gate message
        (gate / "open").touch()
        opened = time.monotonic()
        rig.wait_drained(300 + 0.5 * subscribers)
        took = time.monotonic() - opened
        assert a.terminate() == 0 and b.terminate() == 0, rig.log_tail()

        decisions = {n: [k for k in kinds if k != "tempfail"] for n, kinds in rig.decisions().items()}
        twice = {n: k for n, k in decisions.items() if len(k) != 1}
        per_pid = rig.per_process()
        acc = rig.account(seqs, scenario="deq: two processes on one queue")
        acc.assert_nothing_lost()
        requests = {s: 0 for s in map(subscriber, range(subscribers))}
        for m in capture.messages:
            if str(m.message.get("Subject", "")) == CONFIRM_SUBJECT:
                for r in m.rcpt_tos:
                    requests[r.lower()] = requests.get(r.lower(), 0) + 1
        rows = {str(k): int(str(v)) for k, v in
                rig.sql("SELECT key, version FROM lamsonfilter_state WHERE key LIKE ?", ("mailinglist:python:%",))}
        summary = (f"{subscribers} subscribes + {len(gates)} gate messages, 2 processes "
                   f"({', '.join(f'{pid}: {n}' for pid, n in per_pid.items())} decisions); {acc.summary()}; "
                   f"confirmations {sum(requests.values())}, decided twice {len(twice)}; "
                   f"drained and sent in {took:.0f} s")
        _report("two processes", summary)
        acc.record(processes=dict(per_pid), decided_twice=len(twice), seconds=round(took, 1))
        assert len(decisions) == subscribers + len(gates) and not twice, summary
        assert all(n > 0 for n in per_pid.values()), summary
        assert sorted(set(requests.values())) == [1], summary
        assert len(rows) == subscribers and set(rows.values()) == {1}, summary  # START -> PENDING, once
        assert not rig.quarantined() and rig.outbox_failed() == 0


def test_poison_message_is_quarantined_after_the_limit_and_released_to_the_relay(capture: CaptureServer) -> None:
    # a short lease: each death costs one lease (and 5 s of grace) before the claim comes back
    with DeqRig(capture, handlers=("bugs",), settings=f"POISON_LIMIT = {LIMIT}\nQUEUE_LEASE = 8\n",
                workers=2) as rig:
        poison = rig.put("poison", "alice@example.com", "die@lists.example.org", subject="lethal")
        seqs = []
        for i in range(GOOD):
            seqs.append(f"sub-{i}")
            rig.put(seqs[-1], subscriber(i), "python-subscribe@lists.example.org", subject="subscribe {seq}")
        deaths = 0
        bystanders: set[str] = set()
        proc = rig.start()
        for _ in range(LIMIT + 2):  # bounded: LIMIT deaths, then the quarantine
            rig.wait_until(partial(_dead_or_kept, rig, proc), 300, "a death or the quarantine")
            if proc.alive():
                break
            assert proc.proc.returncode == -9, rig.log_tail()  # the handler's SIGKILL
            deaths += 1
            proc.wait()
            bystanders.update(n for n in rig.left_by(proc.pid)[0] if n != poison)  # in flight with it
            proc = rig.start()
        rig.wait_drained(300)
        assert proc.terminate() == 0, rig.log_tail()

        acc = rig.account(["poison", *seqs], scenario="deq: poison message")
        acc.assert_nothing_lost()
        assert len(rig.quarantined()) == 1, rig.quarantined()
        listed = rig.lamsonfilter("quarantine", "list", "--quarantine", str(rig.quarantine_dir), "--json")
        [entry] = json.loads(listed.stdout)["messages"]
        summary = (f"{deaths} deaths (POISON_LIMIT {LIMIT}), {len(bystanders)} other messages in flight at a "
                   f"death, quarantined {entry['name']}: {entry['reason']!r}; {acc.summary()}")
        _report("poison", summary)
        assert deaths == LIMIT, summary
        assert "poison" in entry["reason"] and str(LIMIT) in entry["reason"], summary
        assert entry["sender"] == "alice@example.com" and entry["recipients"] == ["die@lists.example.org"]
        assert entry["queue_id"] == poison and entry["subject"] == "lethal"
        assert poison in rig.log() and f"quarantine release {entry['name']}" in rig.log()
        assert not delivered_seqs(capture.messages), "nothing of the poison went on before the release"
        good = {s for s, kinds in rig.decisions().items() if s.startswith("sub-") and "tempfail" not in kinds}
        assert good == set(seqs), summary  # every other message decided: none kept aside with it
        confirmed = {r.lower() for m in capture.messages if str(m.message.get("Subject", "")) == CONFIRM_SUBJECT
                     for r in m.rcpt_tos}
        assert confirmed == {subscriber(i) for i in range(GOOD)}, summary
        acc.record(deaths=deaths, bystanders=len(bystanders), reason=entry["reason"])

        released = rig.lamsonfilter("quarantine", "release", entry["name"], "--quarantine", str(rig.quarantine_dir),
                                    "--reinject", f"127.0.0.1:{capture.port}")
        assert f"{entry['name']}: released to 1 recipient(s)" in released.stdout, released.stdout
        copies = delivered_seqs(capture.messages)
        assert copies == {("poison", "die@lists.example.org"): 1}, copies
        [sent] = [m for m in capture.messages if ("poison", "die@lists.example.org") in delivered_seqs([m])]
        assert sent.mail_from == "alice@example.com" and sent.message["Subject"] == "lethal"
        assert not list(Path(rig.quarantine_dir / "new").iterdir())


# --------------------------------------------------------------------------- the window check itself


def test_window_check_explains_only_one_resend_per_kill() -> None:
    """`window_duplicates` against made-up runs: it can fail (no processes, no Postfix here)."""
    a, b, c = Lifetime(1, 0.0, 10.0, True), Lifetime(2, 10.5, 20.0, True), Lifetime(3, 20.5, None, False)
    runs = [a, b, c]
    # <m1> sent by A as its last message, A killed, B sent it again: the window
    assert window_duplicates({"<m1>": [9.0, 11.0]}, runs, {1: ["<m0>", "<m1>"], 2: ["<m1>"]}) == (1, [])
    # A killed before it logged the send: still the window
    assert window_duplicates({"<m1>": [9.9, 11.0]}, runs, {1: ["<m0>"], 2: ["<m1>"]}) == (1, [])
    # not A's last send: A had marked it, or went on without marking it -- not the window
    assert window_duplicates({"<m1>": [9.0, 11.0]}, runs, {1: ["<m1>", "<m2>"], 2: ["<m1>"]})[0] == 0
    # two resends explained by one kill, three copies, or a process that was not killed: no
    two = window_duplicates({"<m1>": [9.0, 11.0], "<m2>": [9.5, 12.0]}, runs, {1: [], 2: ["<m1>", "<m2>"]})
    assert two[0] == 1 and len(two[1]) == 1
    # caught in the window twice: A killed, then B killed before it marked it, C sent it
    assert window_duplicates({"<m1>": [9.0, 11.0, 21.0]}, runs, {2: ["<m1>"], 3: ["<m1>"]}) == (1, [])
    assert window_duplicates({"<m1>": [9.0, 11.0, 21.0]}, runs, {2: ["<m1>", "<m2>"], 3: ["<m1>"]})[0] == 0
    assert window_duplicates({"<m1>": [21.0, 22.0]}, runs, {3: ["<m1>", "<m1>"]})[0] == 0
    # A's last bytes were still in the socket: the copy arrives after A was killed, before B started
    assert window_duplicates({"<m1>": [10.2, 11.0]}, runs, {1: ["<m0>"], 2: ["<m1>"]}) == (1, [])
    # ... but not long after the kill, nor after a process that was not killed
    assert window_duplicates({"<m1>": [10.2, 11.0]}, [Lifetime(1, 0.0, 10.0, False), b, c],
                             {2: ["<m1>"]})[0] == 0
    assert window_duplicates({"<m1>": [13.0, 14.0]}, [a, Lifetime(2, 15.0, 20.0, True), c],
                             {2: ["<m1>"]})[0] == 0
    # no later process logged the second copy: not the takeover of a claim
    assert window_duplicates({"<m1>": [9.0, 9.5]}, runs, {1: ["<m1>", "<m1>"]})[0] == 0
