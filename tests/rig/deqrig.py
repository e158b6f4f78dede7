"""``lamsonfilter deq`` processes over a Maildir queue, counted: the rig of the queue's reliability tests.

`DeqRig` sets up, in a fresh ``/tmp/lf-deq-*`` directory:

* a copy of examples/mailinglist (plus the fixture handlers `DeqRig` is
  given) whose ``RELAY`` is a `CaptureServer`, so every reply, list copy
  and delivered message ends there and is counted; settings for the run
  (`RIG_SETTINGS`: short leases, a reply budget that 2,000 subscribers do
  not exhaust) and ``lamsonfilter db init`` (SQLite, ``var/state.db``, or
  with ``database=SharedDatabase()`` a fresh PostgreSQL database on the
  test server, dropped at the end);
* the queue ``queue/`` (`MailQueue`, as Postfix's Maildir delivery or
  ``ctx.defer()`` fills it) and the quarantine ``APP/var/quarantine`` (the
  content filter's default, so ``lamsonfilter quarantine`` finds both).

It starts ``lamsonfilter deq`` processes with the command line of issue 17
(``--app --queue --relay --quarantine --workers``, resident unless
``once``), each with its stderr (the runtime's INFO line per message) in a
log file of its own, and signals only
the PIDs it started.  `put` writes stamped messages (`stamped_message`:
``X-Test-Seq`` and a unique Message-ID) into the queue, named after their
seq, so the runtime's log line (``queue_id=NAME via=queue ...
decision=...``) says what happened to each.

`account` counts with the accounting harness (`Accounting`): a seq is
``discarded`` when a deq process logged a decision for it (the example
list consumes what it handles), ``delivered`` when a copy with the seq
reached the capture server, ``queued`` while its file is still in the
queue; anything else is lost.

Safety: loopback only; every wait is bounded; nothing but the PIDs
started here is signalled.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, NamedTuple, Self

from lamsonfilter.mailqueue.maildir import MailQueue
from tests.rig.accounting import (
    Accounting,
    delivered_seqs,
    replies,
    seqs_in_header,
    stamped_message,
)
from tests.rig.handlers import handler_source
from tests.rig.postfix import CaptureServer
from tests.rig.twohost import SharedDatabase

__all__ = [
    "OUTBOX_LEASE",
    "QUEUE_LEASE",
    "RIG_SETTINGS",
    "DeqProcess",
    "DeqRig",
    "decision_lines",
    "window_duplicates",
]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "mailinglist"
#: Seconds a claim lasts in the rig (``QUEUE_LEASE``): a killed process's claims come back after it
#: (plus `MailQueue.release_due`'s 5 s grace).  Long enough for the deadline margin before it.
QUEUE_LEASE = 20
#: Seconds an outbox claim lasts (``OUTBOX_LEASE``): a killed sender's replies go out after it.
OUTBOX_LEASE = 10
#: What the rig adds to the example's settings.
RIG_SETTINGS = (f"QUEUE_LEASE = {QUEUE_LEASE}\nOUTBOX_LEASE = {OUTBOX_LEASE}\n"
                "REPLY_BUDGET = (1000000, 30)\n")
#: One line per message from the runtime (lamsonfilter.daemon.runtime).
_DECISION = re.compile(r"queue_id=(\S+) via=queue .*?decision=(\w+)")
#: The outbox sender's line per message handed over (lamsonfilter.relay): PID and Message-ID.
_OUTBOX_SENT = re.compile(r"lamsonfilter\[(\d+)\]: INFO outbox: message \d+ (<[^>\s]*>) cause=\S+ to \d+ recipient")
#: Upper bound of any single wait for a process to stop (seconds).
STOP_TIMEOUT = 60.0


def decision_lines(log: str) -> list[tuple[str, str]]:
    """(queue name, decision) of every runtime line of the queue transport in `log`, in order."""
    return [(m.group(1), m.group(2)) for m in _DECISION.finditer(log)]


@dataclass
class DeqProcess:
    """One ``lamsonfilter deq`` the rig started: its Popen, log file, and how it ended."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]
    killed: bool = False
    started: float = field(default_factory=time.time)
    ended: float | None = None  # when SIGKILL was sent, or when it was found exited

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> int:
        """SIGKILL this PID (if it still runs) and reap it; the exit status (-9 when killed)."""
        if self.proc.poll() is None:
            self.ended = time.time()
            os.kill(self.proc.pid, signal.SIGKILL)
            self.killed = True
        return self.wait()

    def terminate(self) -> int:
        """SIGTERM (the service's stop: finish what is in flight), wait; SIGKILL after STOP_TIMEOUT."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                return self.kill()
        return self.wait()

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        code = self.proc.wait(timeout)
        if self.ended is None:
            self.ended = time.time()
        self.log_file.close()
        return code

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


@dataclass
class DeqRig:
    """See the module docstring.  ``with DeqRig(capture, handlers=("bugs",)) as rig: ...``"""

    capture: CaptureServer
    handlers: tuple[str, ...] = ()
    settings: str = ""
    workers: int = 2
    #: a fresh PostgreSQL database for the state instead of SQLite (created here, dropped at the end)
    database: SharedDatabase | None = None
    processes: list[DeqProcess] = field(default_factory=list)
    #: seq -> queue file name, for every message `put` wrote
    names: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="lf-deq-", dir="/tmp"))
        self.app_dir = self.workdir / "app"
        self.queue_dir = self.workdir / "queue"
        self.quarantine_dir = self.app_dir / "var" / "quarantine"
        self.logs = self.workdir / "logs"
        self.queue = MailQueue(self.queue_dir, lease=QUEUE_LEASE)
        self.staging = MailQueue(self.workdir / "staging", lease=QUEUE_LEASE)

    # ------------------------------------------------------------------ set-up
    def prepare(self) -> Self:
        shutil.copytree(EXAMPLE, self.app_dir, ignore=shutil.ignore_patterns("var", "__pycache__", "tests"))
        extra = list(self.handlers)
        for name in extra:
            (self.app_dir / "app" / "handlers" / f"{name}.py").write_text(handler_source(name))
        with open(self.app_dir / "config" / "settings.py", "a", encoding="utf-8") as f:
            f.write(f"\n# tests/rig/deqrig.py\nRELAY = '127.0.0.1:{self.capture.port}'\n{RIG_SETTINGS}")
            if self.database is not None:
                f.write(f"DATABASE_URL = {self.database.create().url!r}\n")
            if extra:
                f.write(f"HANDLERS = HANDLERS + {extra!r}\n")
            f.write(self.settings)
        self.logs.mkdir()
        self.queue.ensure()
        self.lamsonfilter("db", "init", "--app", str(self.app_dir))
        return self

    def __enter__(self) -> Self:
        return self.prepare()

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
        if self.database is not None:
            self.database.drop()
        if os.environ.get("LF_RIG_KEEP") != "1" and not any(exc):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def lamsonfilter(self, *args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run ``python -m lamsonfilter ARGS`` (bounded); with `check`, fail on a non-zero status."""
        done = subprocess.run([sys.executable, "-m", "lamsonfilter", *args], capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"lamsonfilter {' '.join(args)}: exit {done.returncode}\n{done.stdout}{done.stderr}")
        return done

    # ------------------------------------------------------------------ the queue
    def put(self, seq: str, sender: str, recipient: str, subject: str = "{seq}", staged: bool = False) -> str:
        """Queue one stamped message (durably, as Postfix's Maildir delivery would); its file name.
        `staged`: into a queue of its own beside the rig's, moved in by `release_staged`."""
        _mid, raw = stamped_message(seq, sender=sender, rcpts=[recipient], subject=subject)
        name = (self.staging if staged else self.queue).put(raw, sender, recipient, name=seq)
        self.names[seq] = name
        return name

    def release_staged(self) -> int:
        """Move every staged message into ``new/`` at once (one rename each, as Postfix's
        Maildir delivery ends); how many."""
        moved = 0
        for name in list(self.staging.scan()):
            os.rename(self.staging.path / "new" / name, self.queue_dir / "new" / name)
            moved += 1
        return moved

    def remaining(self) -> int:
        """Messages in the queue in any state (new, claimed, retry)."""
        return sum(self.queue.count().values())

    def queued_seqs(self) -> set[str]:
        seqs: set[str] = set()
        for entry in self.queue.entries():
            try:
                seqs.update(seqs_in_header(entry.path.read_bytes()))
            except FileNotFoundError:
                continue
        return seqs

    # ------------------------------------------------------------------ processes
    def command(self, *, once: bool = False, workers: int | None = None) -> list[str]:
        """The command line of issue 17 (Q17.md) for this rig."""
        cmd = [sys.executable, "-m", "lamsonfilter", "deq", "--app", str(self.app_dir), "--queue",
               str(self.queue_dir), "--relay", f"127.0.0.1:{self.capture.port}", "--quarantine",
               str(self.quarantine_dir), "--workers", str(workers or self.workers)]
        return [*cmd, "--once"] if once else cmd

    def start(self, *, once: bool = False, workers: int | None = None) -> DeqProcess:
        """Start one deq process (its stderr to logs/deq-K.log); it is stopped at the rig's end."""
        log_path = self.logs / f"deq-{len(self.processes)}.log"
        log_file = open(log_path, "ab")  # noqa: SIM115 -- closed when the process is reaped (DeqProcess.wait)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM", "INVOCATION_ID"):
            env.pop(name, None)  # the log goes to the file, never to the test runner's systemd
        proc = subprocess.Popen(self.command(once=once, workers=workers), stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        p = DeqProcess(proc, log_path, log_file)
        self.processes.append(p)
        return p

    def stop_all(self) -> None:
        for p in self.processes:
            if p.alive():
                p.terminate()
            elif not p.log_file.closed:
                p.log_file.close()

    def log(self) -> str:
        """Every process's log, in the order they were started."""
        return "".join(f"--- deq pid {p.pid}\n{p.log()}" for p in self.processes)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    # ------------------------------------------------------------------ the state database
    @property
    def backend(self) -> str:
        return "sqlite" if self.database is None else "postgresql"

    def sql(self, query: str, params: Iterable[object] = ()) -> list[tuple[object, ...]]:
        """Rows of a read-only query (``?`` placeholders) on the application's database."""
        if self.database is not None:
            return self.database.rows(query.replace("?", "%s"), tuple(params))
        con = sqlite3.connect(f"file:{self.app_dir / 'var' / 'state.db'}?mode=ro", uri=True, timeout=30)
        try:
            return list(con.execute(query, tuple(params)))
        finally:
            con.close()

    def outbox_pending(self) -> int:
        """Outbox messages neither sent nor given up."""
        [(n,)] = self.sql("SELECT COUNT(*) FROM lamsonfilter_outbox WHERE sent_at IS NULL AND failed_at IS NULL")
        return int(str(n))

    def left_by(self, pid: int) -> tuple[list[str], int]:
        """What a dead process `pid` left claimed: queue names (``claimed/``, ``by=HOST.PID``) and
        outbox messages (``claimed_by`` ``HOST:PID:...``, not sent)."""
        names = [e.name for e in self.queue.entries(("claimed",)) if (e.owner or "").endswith(f".{pid}")]
        [(n,)] = self.sql("SELECT COUNT(*) FROM lamsonfilter_outbox WHERE sent_at IS NULL AND claimed_by LIKE ?",
                          (f"%:{pid}:%",))
        return names, int(str(n))

    def outbox_failed(self) -> int:
        [(n,)] = self.sql("SELECT COUNT(*) FROM lamsonfilter_outbox WHERE failed_at IS NOT NULL")
        return int(str(n))

    # ------------------------------------------------------------------ waiting and counting
    def wait_until(self, done: Callable[[], bool], timeout: float, what: str, pause: float = 0.1) -> None:
        """Poll `done` until true; AssertionError naming `what` (and the log tail) after `timeout` s,
        or at once when every process the rig started has exited (nothing will change)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # bounded
            if done():
                return
            if self.processes and not any(p.alive() for p in self.processes) and not done():
                codes = [p.proc.returncode for p in self.processes]
                raise AssertionError(f"{what}: every deq process exited ({codes}); log:\n{self.log_tail()}")
            time.sleep(pause)
        raise AssertionError(f"{what}: not after {timeout:.0f} s; queue {self.queue.count()}, "
                             f"outbox pending {self.outbox_pending()}; log:\n{self.log_tail()}")

    def wait_drained(self, timeout: float) -> None:
        """Until the queue is empty and the outbox sent (a killed sender's claims: after its lease)."""
        self.wait_until(lambda: self.remaining() == 0 and self.outbox_pending() == 0, timeout,
                        "queue drained and outbox sent")

    def decisions(self) -> dict[str, list[str]]:
        """queue name -> the decisions logged for it by every process (more than one: it ran again)."""
        found: dict[str, list[str]] = {}
        for p in self.processes:
            for name, kind in decision_lines(p.log()):
                found.setdefault(name, []).append(kind)
        return found

    def outbox_sends(self) -> dict[int, list[str]]:
        """PID -> the Message-IDs its outbox sender logged as accepted by the relay, in order."""
        sends: dict[int, list[str]] = {}
        for p in self.processes:
            for m in _OUTBOX_SENT.finditer(p.log()):
                sends.setdefault(int(m.group(1)), []).append(m.group(2))
        return sends

    def lifetimes(self) -> list[Lifetime]:
        return [Lifetime(p.pid, p.started, p.ended, p.killed) for p in self.processes]

    def per_process(self) -> Counter[int]:
        """PID -> decision lines it logged."""
        return Counter({p.pid: len(decision_lines(p.log())) for p in self.processes})

    def quarantined(self) -> list[Path]:
        return sorted(p for sub in ("new", "cur") if (self.quarantine_dir / sub).is_dir()
                      for p in (self.quarantine_dir / sub).iterdir())

    def account(self, seqs: list[str], scenario: str | None = None) -> Accounting:
        """Where every seq ended up (see the module docstring); recorded when `scenario` is given."""
        by_name = {name: seq for seq, name in self.names.items()}
        decided = {by_name[n] for n, kinds in self.decisions().items()
                   if n in by_name and any(k != "tempfail" for k in kinds)}
        quarantined = {s for p in self.quarantined() for s in seqs_in_header(p.read_bytes())}
        captured = self.capture.messages
        mine = set(seqs)
        acc = Accounting(
            injected=list(seqs),
            delivered_copies=Counter({k: n for k, n in delivered_seqs(captured).items() if k[0] in mine}),
            queued=self.queued_seqs() & mine,
            discarded=(decided | quarantined) & mine,
            replies=len(replies(captured)),
            mode="deq",
            scenario=scenario,
        )
        return acc


#: How long after a kill a copy it sent may still arrive (its last bytes were in the socket).
AFTER_KILL = 2.0


class Lifetime(NamedTuple):
    """When one deq process ran (``time.time()``), and whether the rig killed it."""

    pid: int
    started: float
    ended: float | None
    killed: bool


def window_duplicates(arrivals: dict[str, list[float]], processes: Sequence[Lifetime],
                      sends: dict[int, list[str]]) -> tuple[int, list[str]]:
    """(explained, unexplained) Message-IDs the capture server got more than once.

    The outbox marks a message sent in the database after the relay's 250
    (lamsonfilter/relay.py): a process killed between the two has sent it,
    and the sender that takes its claim over sends it again -- and once
    more if that one is killed in the same window.  With the processes
    running one at a time (the kill test), every copy but the last is
    *explained* when the process running at its arrival (`arrivals`: the
    capture server's times) was then killed, logged the message as the
    last one it sent or did not log it at all (killed before its log
    line), and explains no other copy (its sender handles one message at a
    time: one per kill); and the next copy was logged by a later process.
    A copy that arrives while no process runs, within `AFTER_KILL` seconds
    of a kill, belongs to the process killed: it had written the message's
    last bytes, and the capture server finished reading them after it died.
    Anything else is unexplained.  `sends`: PID -> Message-IDs its outbox
    logged, in order.
    """
    explained_by: set[int] = set()
    explained, unexplained = 0, []
    for mid, times in sorted(arrivals.items()):
        if len(times) < 2:
            continue
        ordered = sorted(times)
        why = ""
        for at in ordered[:-1]:
            running = [p for p in processes if p.started <= at <= (p.ended or float("inf"))]
            if not running:  # the message's last bytes were in the socket when its sender was killed:
                # the capture server finished it just after the kill (before the restart)
                running = [p for p in processes
                           if p.ended is not None and p.killed and p.ended < at <= p.ended + AFTER_KILL]
            if len(running) != 1 or not running[0].killed:
                why = f"a copy at {at:.3f} while {[p.pid for p in running]} ran (not one killed process)"
                break
            p = running[0]
            mine = sends.get(p.pid, [])
            later = [q.pid for q in processes if q.started > p.started and mid in sends.get(q.pid, [])]
            if p.pid in explained_by or (mid in mine and mine[-1] != mid) or not later:
                why = f"{p.pid}: already explains one, sent others after it, or nobody sent it after it"
                break
            explained_by.add(p.pid)
        if why:
            who = {q.pid: sends[q.pid].count(mid) for q in processes if mid in sends.get(q.pid, [])}
            unexplained.append(f"{mid}: {len(times)} copies, logged by {who}: {why}")
        else:
            explained += 1
    return explained, unexplained
