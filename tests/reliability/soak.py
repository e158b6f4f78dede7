"""Bounded soak with random SIGKILLs, both modes (docs/reliability.rst O2; issue #5).

A real deployment (`SmtpproxyDeployment` or `MilterDeployment` of
tests/integration: the example application plus a stateful ``lfsoak``
handler, a private Postfix with the shipped conf/postfix snippets, the
``lamsonfilter`` process, a `CaptureServer` as the final destination)
takes load from several injector threads while the soak SIGKILLs the
filter PID it started at random moments and starts it again::

    .venv/bin/python -m tests.reliability.soak --mode smtpproxy --minutes 60
    .venv/bin/python -m tests.reliability.soak --mode milter --minutes 60 --kill-every 300 --seed 7
    make soak MODE=milter MINUTES=60

What runs:

* ``--parallel`` injector threads (tests/rig/accounting.py's
  `Injector`: every message stamped ``X-Test-Seq``, every reply kept),
  each with its own sender, one to ``--per-session`` transactions per SMTP
  connection, each message to one recipient drawn from ``--recipients``
  (default `RECIPIENTS`: unrouted pass-through, the ``tag@`` route that
  adds a header, the stateful ``soak@`` route that writes the state store
  on every message).  Paced to ``--rate`` new messages a second (default
  30: about 10^5 an hour, the size docs/reliability.rst O2 names).  Bounded: new
  mail stops at the time limit or after ``--max-messages``; while
  Postfix's queue holds more than ``--max-queue`` entries the injectors
  pause.
  A message the client saw refused with a 4xx (milter mode while the
  filter is down) is sent again by its thread after ``--retry-pause``
  seconds, as a real client would; at most `RETRY_ATTEMPTS` times.
* Kills: every ``--kill-every`` seconds on average (uniformly 0.5x-1.5x,
  from ``random.Random(--seed)``, so a run's schedule can be repeated),
  SIGKILL of the filter PID this program started, then a fresh start.
  Each PID is one *lifetime*.
* Samples: every ``--sample-every`` seconds VmRSS, ``Threads`` (from
  /proc/PID/status) and open FDs (entries of /proc/PID/fd) of the filter.
  The state store is SQLite (``sqlite:///var/state.db``): it has no
  server-side connections to count; its file descriptors are in the FD
  count, which is all that is needed to see a connection leak.
* End: load stopped, the filter left running (restarted after the last
  kill), the tempfailed resent, ``postqueue -f``, `account`.

Invariants (exit status 1 if any breaks; 2 if the rig could not run):

* nothing lost, nothing left queued, no maillog anomaly (`account`);
* duplicates only in the R4 window: content-filter mode only, for a
  message whose original queue id Postfix logged ``status=deferred (lost
  connection ...)`` (the filter died after reinjecting, before its 250),
  each with at most 1 + kills copies; milter mode allows none;
* RSS drift after warm-up (``--warmup`` seconds into each lifetime and
  ``--warmup-messages`` delivered in it) within ``--rss-drift`` (10 %):
  last sample vs the first after warm-up, for every lifetime with two such
  samples.  The kills make lifetimes short (``--kill-every``); a run with
  ``--kill-every 0`` is one long lifetime, the strictest drift check;
* open FDs <= ``--max-fds`` and threads <= ``--max-threads`` in every sample;
* the filter never exits unless we killed it.

The summary (messages injected / delivered / lost / duplicated, kills,
RSS first/last per lifetime, max FDs, max threads) is printed and, with
``$LF_RELIABILITY_FIGURES`` (or ``--figures``), appended as a JSON line.
tests/reliability/test_soak.py runs the same code for ~30 s per mode in CI.

For diagnosing a drift, not for verdicts: ``--trace-memory FILE`` makes the
filter append tracemalloc's top growth to FILE every minute;
``--sqlite-cache-kib N`` shrinks SQLite's page cache (to rule it out).

Safety: loopback only; the only processes signalled are the filter PIDs
this program started (and the deployment's own children, via its stop());
every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.rig import accounting as accounting_mod
from tests.rig.accounting import (
    Accounting,
    Injected,
    Injector,
    bounced_seqs,
    delivered_seqs,
    maillog_anomalies,
    replies,
    seqs_in_header,
    wait_settled,
)
from tests.rig.deploy import LIST_HOST, Deployment
from tests.rig.deploy_milter import MilterDeployment
from tests.rig.deploy_smtpproxy import SmtpproxyDeployment

__all__ = [
    "Lifetime",
    "ProcSample",
    "SoakConfig",
    "SoakReport",
    "evaluate",
    "main",
    "proc_sample",
    "r4_window_seqs",
    "run_soak",
]


#: Recipients the injectors draw from: pass-through, a header-adding route, a stateful route.
RECIPIENTS = ("sink@example.net", f"tag@{LIST_HOST}", f"soak@{LIST_HOST}")
#: How often one message is resent after a 4xx during the run, at most.
RETRY_ATTEMPTS = 20
#: Bound on waiting for an injector thread to finish its current session (seconds).
JOIN_TIMEOUT = 180.0
MODES = {"smtpproxy": "smtpproxy", "content-filter": "smtpproxy", "milter": "milter"}


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class SoakConfig:
    """One soak run; every field is a command-line option of the same name."""

    mode: str = "smtpproxy"
    minutes: float = 60.0
    kill_every: float = 300.0  # mean seconds between SIGKILLs; 0 = never
    sample_every: float = 60.0
    warmup: float = 120.0  # seconds into each lifetime before RSS drift is measured ...
    warmup_messages: int = 500  # ... and messages delivered in it
    rate: float = 30.0  # new messages per second, all threads together; 0 = as fast as they go
    parallel: int = 8
    per_session: int = 5
    max_messages: int = 100_000
    max_queue: int = 2_000
    retry_pause: float = 5.0
    seed: int = 1
    rss_drift: float = 0.10
    max_fds: int = 256
    max_threads: int = 64
    drain_timeout: float = 600.0
    recipients: tuple[str, ...] = RECIPIENTS
    trace_memory: str | None = None  # file for the filter's tracemalloc growth report (diagnosis only)
    sqlite_cache_kib: int | None = None  # PRAGMA cache_size for the filter's SQLite connections (diagnosis)

    def __post_init__(self) -> None:
        assert self.mode in ("smtpproxy", "milter"), self.mode
        assert self.minutes > 0 and self.sample_every > 0 and self.kill_every >= 0
        assert 1 <= self.parallel <= 64 and self.per_session >= 1 and self.max_messages >= 1
        assert self.recipients, "no recipients"


# --------------------------------------------------------------------------- /proc sampling


@dataclass(frozen=True)
class ProcSample:
    """One look at the filter process: seconds since the soak started, its PID, RSS, FDs, threads."""

    at: float
    pid: int
    rss_kib: int
    fds: int
    threads: int
    injected: int = 0  # messages injected so far (new seqs)
    delivered: int = 0  # messages at the final destination so far


def proc_sample(pid: int, at: float = 0.0, injected: int = 0, delivered: int = 0) -> ProcSample | None:
    """VmRSS and Threads from /proc/PID/status, open FDs from /proc/PID/fd; None if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        return None
    rss = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    threads = re.search(r"^Threads:\s+(\d+)", status, re.MULTILINE)
    if rss is None or threads is None:  # a zombie has no VmRSS
        return None
    return ProcSample(at, pid, int(rss.group(1)), fds, int(threads.group(1)), injected, delivered)


@dataclass
class Lifetime:
    """One filter process from its start to its SIGKILL (or the end of the soak)."""

    index: int
    pid: int
    started: float
    delivered_before: int = 0  # messages at the destination when it started
    ended: float | None = None
    end: str = "running"  # "SIGKILL", "exited N" (not by us: an invariant breaks), "end of soak"
    samples: list[ProcSample] = field(default_factory=list)

    def warm(self, warmup: float, warmup_messages: int = 0) -> list[ProcSample]:
        """Samples after warm-up: `warmup` seconds into the lifetime *and* `warmup_messages`
        delivered since it started (a restarted filter may idle a while before Postfix retries)."""
        return [s for s in self.samples
                if s.at - self.started >= warmup and s.delivered - self.delivered_before >= warmup_messages]

    def drift(self, warmup: float, warmup_messages: int = 0) -> float | None:
        """(last RSS - first RSS after warm-up) / first; None with fewer than two warm samples."""
        warm = self.warm(warmup, warmup_messages)
        if len(warm) < 2 or warm[0].rss_kib <= 0:
            return None
        return (warm[-1].rss_kib - warm[0].rss_kib) / warm[0].rss_kib

    def figures(self, warmup: float, warmup_messages: int = 0) -> dict[str, Any]:
        warm = self.warm(warmup, warmup_messages)
        basis = warm or self.samples
        drift = self.drift(warmup, warmup_messages)
        return {
            "pid": self.pid,
            "seconds": round((self.ended or self.started) - self.started, 1),
            "end": self.end,
            "samples": len(self.samples),
            "warm_samples": len(warm),
            "rss_first_kib": basis[0].rss_kib if basis else None,
            "rss_last_kib": basis[-1].rss_kib if basis else None,
            "rss_max_kib": max((s.rss_kib for s in basis), default=None),
            "rss_drift": None if drift is None else round(drift, 4),
            "max_fds": max((s.fds for s in self.samples), default=None),
            "max_threads": max((s.threads for s in self.samples), default=None),
            "delivered": (self.samples[-1].delivered - self.delivered_before) if self.samples else 0,
        }


# --------------------------------------------------------------------------- the deployments


class _SoakApp:
    """Adds the ``lfsoak`` handler module to the deployment's copy of the example app."""

    extra_handlers = ("lfsoak",)


class SoakSmtpproxyDeployment(_SoakApp, SmtpproxyDeployment):
    pass


class SoakMilterDeployment(_SoakApp, MilterDeployment):
    def all_filter_logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.workdir.glob("filter.log*")))


def make_deployment(mode: str) -> Deployment:
    return SoakMilterDeployment() if mode == "milter" else SoakSmtpproxyDeployment()


# --------------------------------------------------------------------------- accounting at soak size

_MILTER_DISCARD = re.compile(r" ([0-9A-Za-z]+): milter-discard")


def account_soak(dep: Deployment, injected: Sequence[Injected], *, timeout: float, scenario: str) -> Accounting:
    """`accounting.account` (flush, wait, count) with linear-time discard and maillog checks.

    accounting.py's helpers search the whole maillog once per queue id, fine for a
    test's hundreds of messages, hours for a soak's 10^5 (a 100 MB maillog); the
    sets and the invariant are the same.
    """
    pf = dep.postfix
    assert pf is not None
    pf.flush()
    wait_settled(dep, timeout, 5.0)
    by_queue_id = {qid: item.seq for item in injected for qid in item.queue_ids}
    queued, queue_ids = accounting_mod._queued(dep)
    maillog = pf.maillog()
    discarded: set[str] = set()
    quarantine = dep.app_dir / "var" / "quarantine"
    for sub in ("new", "cur"):
        if (quarantine / sub).is_dir():
            for f in (quarantine / sub).iterdir():
                discarded.update(seqs_in_header(f.read_bytes()))
    logs = "".join(p.read_text(errors="replace") for p in sorted(dep.workdir.glob("filter.log*")))
    for m in accounting_mod._DECISION.finditer(logs):
        if m.group(1) in by_queue_id:
            discarded.add(by_queue_id[m.group(1)])
    discarded.update(by_queue_id[m.group(1)] for m in _MILTER_DISCARD.finditer(maillog) if m.group(1) in by_queue_id)
    captured = dep.capture.messages
    mine = {item.seq for item in injected}
    acc = Accounting(
        injected=[item.seq for item in injected],
        delivered_copies=Counter({k: n for k, n in delivered_seqs(captured).items() if k[0] in mine}),
        bounced=bounced_seqs(captured) & mine,
        queued=queued & mine,
        discarded=discarded & mine,
        rejected={item.seq for item in injected if item.rejected},
        tempfailed={item.seq for item in injected if item.tempfailed},
        replies=len(replies(captured)),
        mode=dep.mode,
        scenario=scenario,
    )
    # O4: every injected queue id's recipient reaches exactly one final status (deferred is not final),
    # counted per life of a queue id (Postfix reuses short ids)
    acc.anomalies = maillog_anomalies(maillog, by_queue_id, queue_ids, acc.discarded)
    return acc


# --------------------------------------------------------------------------- invariants

_LOST_CONNECTION = re.compile(r" ([0-9A-Za-z]+): to=<[^>]*>,.*status=deferred \(lost connection")


def r4_window_seqs(maillog: str, items: Sequence[Injected]) -> set[str]:
    """Seqs whose queue id Postfix logged ``status=deferred (lost connection ...)``: the filter
    died while holding the message -- possibly after reinjecting it (the R4 window)."""
    by_qid = {qid: item.seq for item in items for qid in item.queue_ids}
    return {by_qid[m.group(1)] for m in _LOST_CONNECTION.finditer(maillog) if m.group(1) in by_qid}


def evaluate(config: SoakConfig, acc: Accounting, lifetimes: Sequence[Lifetime], kills: int,
             r4_window: set[str], problems: Sequence[str] = ()) -> list[str]:
    """Every broken invariant, as one line each (empty: the soak passed)."""
    broken = list(problems)
    try:
        acc.assert_nothing_lost(allow_duplicates=len(acc.duplicates), allow_queued=False)
    except AssertionError as exc:
        broken.append(f"accounting: {exc}")
    for seq, copies in acc.duplicates.items():
        if config.mode != "smtpproxy" or seq not in r4_window:
            broken.append(f"duplicate outside the R4 window: {seq} ({copies} copies)")
        elif copies > 1 + kills:
            broken.append(f"duplicate {seq}: {copies} copies for {kills} kills")
    for life in lifetimes:
        drift = life.drift(config.warmup, config.warmup_messages)
        if drift is not None and drift > config.rss_drift:
            warm = life.warm(config.warmup, config.warmup_messages)
            broken.append(f"RSS drift {drift:.1%} > {config.rss_drift:.0%} in lifetime {life.index} "
                          f"(pid {life.pid}): {warm[0].rss_kib} -> {warm[-1].rss_kib} kB")
        for s in life.samples:
            if s.fds > config.max_fds:
                broken.append(f"pid {s.pid} had {s.fds} open FDs > {config.max_fds} at {s.at:.0f} s")
                break
        for s in life.samples:
            if s.threads > config.max_threads:
                broken.append(f"pid {s.pid} had {s.threads} threads > {config.max_threads} at {s.at:.0f} s")
                break
        if life.end.startswith("exited"):
            broken.append(f"the filter (pid {life.pid}) {life.end} without being killed")
    return broken


# --------------------------------------------------------------------------- the run


@dataclass
class SoakReport:
    config: SoakConfig
    accounting: Accounting
    lifetimes: list[Lifetime]
    kills: int
    r4_window: set[str]
    client_tempfails: int  # messages whose client saw at least one 4xx (then resent)
    broken: list[str]
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.broken

    def figures(self) -> dict[str, Any]:
        samples = [s for life in self.lifetimes for s in life.samples]
        return {
            "seed": self.config.seed,
            "config": asdict(self.config),
            "seconds": round(self.seconds, 1),
            "kills": self.kills,
            "lifetimes": [life.figures(self.config.warmup, self.config.warmup_messages)
                          for life in self.lifetimes],
            "max_fds": max((s.fds for s in samples), default=None),
            "max_threads": max((s.threads for s in samples), default=None),
            "client_tempfails_resent": self.client_tempfails,
            "r4_window_duplicates": sorted(set(self.accounting.duplicates) & self.r4_window),
            "state_store": "sqlite (no server connections; its files are in the FD count)",
            "broken": self.broken,
            "ok": self.ok,
        }

    def summary(self) -> str:
        f = self.figures()
        c = self.accounting.counts()
        lines = [
            (f"soak {self.config.mode}: {self.seconds:.0f} s, seed {self.config.seed}, kills {self.kills}, "
             f"lifetimes {len(self.lifetimes)}"),
            (f"  messages injected {c['injected']} delivered {c['delivered']} lost {c['lost']} "
             f"duplicated {c['duplicated']} (R4 window: {len(f['r4_window_duplicates'])}) queued {c['queued']} "
             f"bounced {c['bounced']} discarded {c['discarded']} rejected {c['rejected']}; "
             f"client 4xx then resent {self.client_tempfails}"),
            (f"  max FDs {f['max_fds']} (limit {self.config.max_fds}), max threads {f['max_threads']} "
             f"(limit {self.config.max_threads}); state store: {f['state_store']}"),
        ]
        for life, lf in zip(self.lifetimes, f["lifetimes"]):
            drift = "n/a (<2 samples after warm-up)" if lf["rss_drift"] is None else f"{lf['rss_drift']:+.1%}"
            lines.append(f"  lifetime {life.index} pid {lf['pid']} {lf['seconds']} s ({lf['end']}): "
                         f"{lf['delivered']} delivered, {lf['samples']} samples, "
                         f"RSS first {lf['rss_first_kib']} last {lf['rss_last_kib']} "
                         f"max {lf['rss_max_kib']} kB, drift {drift}, FDs <= {lf['max_fds']}, "
                         f"threads <= {lf['max_threads']}")
        lines.append("  OK: every invariant holds" if self.ok else "  BROKEN:\n    " + "\n    ".join(self.broken))
        return "\n".join(lines)


class Soak:
    """Load threads + a kill/sample loop around one deployment (see the module docstring)."""

    def __init__(self, config: SoakConfig, dep: Deployment, log: Any = print) -> None:
        self.config = config
        self.dep = dep
        self.log = log
        self.injector = Injector(dep, f"soak{config.seed}")
        self.items: dict[str, Injected] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.paused = threading.Event()  # set while Postfix's queue is over max_queue
        self.reserved = 0
        self.t0 = time.monotonic()
        self.lifetimes: list[Lifetime] = []
        self.kills = 0
        self.problems: list[str] = []

    # ------------------------------------------------------------ helpers
    def now(self) -> float:
        return time.monotonic() - self.t0

    def injected(self) -> int:
        with self.lock:
            return len(self.items)

    def _reserve(self, want: int) -> int:
        """How many new messages this thread may send now (0: the cap is reached); paced to `rate`."""
        with self.lock:
            n = max(0, min(want, self.config.max_messages - self.reserved))
            due = self.reserved / self.config.rate if self.config.rate > 0 else 0.0
            self.reserved += n
        delay = due - self.now()
        if n and delay > 0:
            self.stop.wait(delay)
        return n

    def delivered(self) -> int:
        return len(self.dep.capture.messages)

    def _pid(self) -> int | None:
        proc = self.dep.filter_proc
        return proc.pid if proc is not None and proc.poll() is None else None

    # ------------------------------------------------------------ load
    def _worker(self, idx: int) -> None:
        rng = random.Random(f"{self.config.seed}-{idx}")
        sender = f"soak-t{idx}@client.example.test"
        retry: list[tuple[float, str]] = []  # (not before, seq)
        while not self.stop.is_set():
            due = [r for r in retry if r[0] <= time.monotonic()]
            for r in due:
                retry.remove(r)
                with self.lock:
                    item = self.items[r[1]]
                item = self.injector.resend(item)
                with self.lock:
                    self.items[item.seq] = item
                if item.tempfailed and len(item.attempts) <= RETRY_ATTEMPTS:
                    retry.append((time.monotonic() + self.config.retry_pause, item.seq))
                if self.stop.is_set():
                    return
            if self.paused.is_set():
                self.stop.wait(0.5)
                continue
            n = self._reserve(rng.randint(1, self.config.per_session))
            if n == 0:
                if not retry:
                    return
                self.stop.wait(0.5)
                continue
            rcpt = rng.choice(self.config.recipients)
            items = self.injector.inject(n, sender=sender, rcpts=(rcpt,), per_session=n, subject="soak {seq}")
            with self.lock:
                self.items.update((i.seq, i) for i in items)
            failed = [i.seq for i in items if i.tempfailed]
            retry.extend((time.monotonic() + self.config.retry_pause, seq) for seq in failed)
            if failed:  # a client told "try later" backs off before new mail, too
                self.stop.wait(min(1.0, self.config.retry_pause))

    # ------------------------------------------------------------ the filter
    def _begin_lifetime(self) -> None:
        pid = self._pid()
        assert pid is not None, "the filter is not running"
        self.lifetimes.append(Lifetime(len(self.lifetimes), pid, self.now(), self.delivered()))

    def _end_lifetime(self, how: str) -> None:
        life = self.lifetimes[-1]
        life.ended, life.end = self.now(), how

    def sample(self) -> None:
        life = self.lifetimes[-1]
        proc = self.dep.filter_proc
        if proc is not None and proc.poll() is not None:  # died, and not by our hand
            self._end_lifetime(f"exited {proc.returncode}")
            self.log(f"[{self.now():7.1f}s] the filter pid {life.pid} exited by itself ({proc.returncode}); "
                     "starting it again")
            self.dep.start_filter()
            self._begin_lifetime()
            return
        s = proc_sample(life.pid, self.now(), self.injected(), self.delivered())
        if s is not None:
            life.samples.append(s)
        pf = self.dep.postfix
        queued = len(pf.queue()) if pf is not None else 0
        if queued > self.config.max_queue:
            self.paused.set()
        else:
            self.paused.clear()
        if s is not None:
            self.log(f"[{s.at:7.1f}s] pid {s.pid} rss {s.rss_kib} kB fds {s.fds} threads {s.threads}; "
                     f"injected {s.injected}, queue {queued}, delivered {s.delivered}")

    def kill(self) -> None:
        if self._pid() is None:  # it died by itself since the last sample: record that instead
            self.sample()
            return
        life = self.lifetimes[-1]
        s = proc_sample(life.pid, self.now(), self.injected(), self.delivered())
        if s is not None:
            life.samples.append(s)
        self.dep.kill_filter()  # SIGKILL of the PID the deployment started, reaped
        self.kills += 1
        self._end_lifetime("SIGKILL")
        self.log(f"[{self.now():7.1f}s] SIGKILL pid {life.pid} (kill {self.kills}); starting the filter again")
        self.dep.start_filter()
        self._begin_lifetime()

    # ------------------------------------------------------------ the run
    def run(self) -> SoakReport:
        cfg = self.config
        rng = random.Random(cfg.seed)
        end = cfg.minutes * 60.0

        def next_kill(after: float) -> float:
            return after + rng.uniform(0.5, 1.5) * cfg.kill_every if cfg.kill_every > 0 else float("inf")

        self.t0 = time.monotonic()
        self._begin_lifetime()
        self.sample()
        workers = [threading.Thread(target=self._worker, args=(i,), name=f"soak-inject-{i}", daemon=True)
                   for i in range(cfg.parallel)]
        for w in workers:
            w.start()
        kill_at, sample_at = next_kill(0.0), cfg.sample_every
        max_steps = int(end / 5.0 + end / cfg.sample_every + (end / cfg.kill_every if cfg.kill_every else 0)) + 100
        try:
            for _ in range(max_steps):  # bounded: each step waits for the next event or the end
                now = self.now()
                if now >= end or not any(w.is_alive() for w in workers):
                    break
                wake = min(end, kill_at, sample_at)
                if wake > now:
                    time.sleep(min(wake - now, 5.0))
                    continue
                if now >= kill_at:
                    self.kill()
                    kill_at = next_kill(self.now())
                if now >= sample_at:
                    self.sample()
                    sample_at += cfg.sample_every
        finally:
            self.stop.set()
            self.paused.clear()
            for w in workers:
                w.join(JOIN_TIMEOUT)
        stuck = [w.name for w in workers if w.is_alive()]
        if stuck:
            self.problems.append(f"injector threads did not finish: {stuck}")
        if self._pid() is None:  # never end the soak with the filter down
            self.sample()
        self.sample()
        self._end_lifetime("end of soak")
        self.log(f"[{self.now():7.1f}s] load stopped; resending what clients still hold, then flush and count")
        with self.lock:
            items = list(self.items.values())
        items = self.injector.resend_tempfailed(items, attempts=5, pause=cfg.retry_pause)
        client_tempfails = sum(1 for i in items if len(i.attempts) > 1 or i.tempfailed)
        acc = account_soak(self.dep, items, timeout=cfg.drain_timeout,
                           scenario=f"O2 soak {cfg.mode}, random SIGKILLs")
        pf = self.dep.postfix
        r4 = r4_window_seqs(pf.maillog(), items) if pf is not None else set()
        broken = evaluate(cfg, acc, self.lifetimes, self.kills, r4, self.problems)
        report = SoakReport(cfg, acc, self.lifetimes, self.kills, r4, client_tempfails, broken, self.now())
        acc.record(**report.figures())
        return report


def _diagnostics(dep: Deployment) -> str:
    """The filter's and Postfix's log tails (Deployment.diagnostics also lists every captured message)."""
    parts = [f"--- {dep.mode} filter log (tail) ---\n{dep.filter_log_tail(40)}"]
    if dep.postfix is not None:
        parts.append(f"--- maillog (tail) ---\n{dep.postfix.maillog_tail(40)}")
    parts.append(f"--- {len(dep.capture.messages)} messages captured")
    return "\n".join(parts)


def run_soak(config: SoakConfig, log: Any = print, keep: bool = False) -> SoakReport:
    """Start a deployment, soak it, stop it (its directory stays with ``keep`` or LF_RIG_KEEP=1)."""
    if keep:
        os.environ["LF_RIG_KEEP"] = "1"
    dep = make_deployment(config.mode)
    if config.trace_memory:
        dep.filter_env["LF_SOAK_TRACEMALLOC"] = str(Path(config.trace_memory).resolve())
    if config.sqlite_cache_kib is not None:
        dep.filter_env["LF_SOAK_SQLITE_CACHE_KIB"] = str(config.sqlite_cache_kib)
    try:
        dep.start()
        log(f"soak {config.mode}: deployment in {dep.workdir}, filter pid "
            f"{dep.filter_proc.pid if dep.filter_proc else '?'}; {config.minutes:g} min, "
            f"kill every ~{config.kill_every:g} s, sample every {config.sample_every:g} s, seed {config.seed}")
        report = Soak(config, dep, log).run()
        if not report.ok:
            log(_diagnostics(dep))
        return report
    finally:
        dep.stop()


# --------------------------------------------------------------------------- the program


def _parser() -> argparse.ArgumentParser:
    d = SoakConfig()
    p = argparse.ArgumentParser(prog="python -m tests.reliability.soak", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", choices=sorted(MODES), default=d.mode,
                   help="smtpproxy (content-filter is the same) or milter")
    p.add_argument("--minutes", type=float, default=d.minutes, help="load duration")
    p.add_argument("--kill-every", type=float, default=d.kill_every,
                   help="mean seconds between SIGKILLs of the filter (0: none)")
    p.add_argument("--sample-every", type=float, default=d.sample_every, help="seconds between /proc samples")
    p.add_argument("--warmup", type=float, default=d.warmup,
                   help="seconds into each filter lifetime before RSS drift is measured")
    p.add_argument("--warmup-messages", type=int, default=d.warmup_messages,
                   help="... and messages delivered in it")
    p.add_argument("--rate", type=float, default=d.rate, help="new messages per second (0: unpaced)")
    p.add_argument("--parallel", type=int, default=d.parallel, help="injector threads (<= 64)")
    p.add_argument("--per-session", type=int, default=d.per_session, help="most transactions per connection")
    p.add_argument("--max-messages", type=int, default=d.max_messages, help="cap on new messages")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="pause injection above this queue size")
    p.add_argument("--retry-pause", type=float, default=d.retry_pause, help="seconds before resending a 4xx")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed (kill schedule, recipients)")
    p.add_argument("--rss-drift", type=float, default=d.rss_drift, help="largest RSS drift per lifetime")
    p.add_argument("--max-fds", type=int, default=d.max_fds, help="largest open FD count")
    p.add_argument("--max-threads", type=int, default=d.max_threads, help="largest thread count")
    p.add_argument("--drain-timeout", type=float, default=d.drain_timeout,
                   help="bound on waiting for the queue to drain at the end (s)")
    p.add_argument("--recipients", default=",".join(d.recipients),
                   help="comma-separated; each message goes to one, drawn at random")
    p.add_argument("--trace-memory", metavar="FILE",
                   help="diagnosis: the filter appends tracemalloc's top growth to FILE every 60 s")
    p.add_argument("--sqlite-cache-kib", type=int, metavar="N",
                   help="diagnosis: PRAGMA cache_size = -N on the filter's SQLite connections")
    p.add_argument("--figures", help="append the summary as JSON here (default: $LF_RELIABILITY_FIGURES)")
    p.add_argument("--keep", action="store_true", help="keep the deployment's /tmp directory")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.figures:
        os.environ["LF_RELIABILITY_FIGURES"] = str(Path(args.figures).resolve())
    config = SoakConfig(
        mode=MODES[args.mode], minutes=args.minutes, kill_every=args.kill_every,
        sample_every=args.sample_every, warmup=args.warmup,
        warmup_messages=args.warmup_messages, rate=args.rate, parallel=args.parallel,
        per_session=args.per_session, max_messages=args.max_messages, max_queue=args.max_queue,
        retry_pause=args.retry_pause, seed=args.seed, rss_drift=args.rss_drift, max_fds=args.max_fds,
        max_threads=args.max_threads, drain_timeout=args.drain_timeout,
        recipients=tuple(r.strip() for r in args.recipients.split(",") if r.strip()),
        trace_memory=args.trace_memory, sqlite_cache_kib=args.sqlite_cache_kib,
    )
    from tests.rig.postfix import missing_binaries

    missing = missing_binaries("postfix", "postconf", "postqueue", "postsuper", "postcat")
    if missing or os.geteuid() != 0:
        print(f"soak: cannot run: missing {missing or '-'}, root {os.geteuid() == 0}", file=sys.stderr)
        return 2
    try:
        report = run_soak(config, log=lambda line: print(line, flush=True), keep=args.keep)
    except Exception as exc:  # noqa: BLE001 -- the rig failed (any error): no verdict on the invariants
        print(f"soak: the run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(report.summary(), flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
