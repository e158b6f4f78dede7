#!/usr/bin/env python3
"""deq_bench.py - how fast ``lamsonfilter deq`` drains a queue, beside Salmon in the same run.

A measurement tool, not product code and not a test.  Each round, interleaved (the order of
the deq runs alternates between rounds):

- **salmon**: Salmon's QueueReceiver (salmon-mail 3.3.0 in a scratch virtualenv, one worker)
  on 1,000 queued 2 KB messages with an empty stateless handler (bench/salmon_queue_bench.py);
- **sink N**: ``lamsonfilter deq --once`` with bench/apps/sink (one stateless route that
  drops the message, no database) on N queued 2 KB messages, for each N of ``--counts``;
- **list N**: the same with the example list (examples/mailinglist, SQLite, a state
  transition and a reply through the outbox per message: N subscribe requests from N
  senders; its REPLY_BUDGET raised so that every one is answered), replies to smtp-sink on
  loopback, for the smallest N.

The queue is filled and written out (``sync``) before deq starts (not measured).  How start-up is left out:

- **rate**: from deq's own log, whose lines carry the time to the millisecond: from the
  first message's line to the last message's (for the list: to the last outbox line, the
  replies are part of the work), N - 1 messages.  Imports, loading the application and
  opening the database come before the first line; the first message (which pays for the
  lazy imports) is not counted.  Salmon's harness likewise starts its timer after loading.
- **CPU per message**: the deq process's CPU time (rusage at its exit) less its CPU time
  when the harness saw the first message's line (/proc/PID/stat, polled every 2 ms until
  then), less what the same command spent after that line on a queue of one message (the
  way out: the outbox's last round, the interpreter's exit), over the messages logged
  after the sample.

Reported per configuration: the median over the rounds of the rate and of the CPU per
message; each round's ratio to Salmon's rate in that round and the median of those; the cost
at the largest N over the cost at the smallest (wall and CPU, per round); the rate over each
thousand of the largest N (the first thousand leaves the fullest queue); and the resident
set size of deq sampled while it drains the largest N (at the first thousand drained against
the highest after it).  The machine's load average is printed at the start and the end.

    python3 bench/deq_bench.py                        # 3 rounds, counts 1000,10000
    python3 bench/deq_bench.py --rounds 5 --counts 1000,10000 --workers 1
    make bench-deq                                    # the same as the first line

Needs: scripts/bootstrap.sh's .venv; PyPI for the Salmon venv (or --no-salmon); Postfix's
smtp-sink for the list runs (or --no-list).  Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import calendar
import itertools
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAMSONFILTER = ROOT / ".venv" / "bin" / "lamsonfilter"
SALMON_VENV = Path(os.environ.get("BENCH_SALMON_VENV", "/tmp/salmon-venv"))
BODY = ("x" * 76 + "\n") * 25  # about 2 KB with the header
#: The longest one deq run may take (seconds).
RUN_LIMIT = 900
#: A log line's time: 2026-12-06T08:32:30.584Z
_STAMP = re.compile(rb"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{3})Z ")


def fill(queue: Path, n: int, rcpt: str | None = None) -> None:
    """N files in new/ with Postfix's envelope lines, then written out (the fill is not measured)."""
    for sub in ("tmp", "new", "cur", "claimed", "retry"):
        (queue / sub).mkdir(parents=True, exist_ok=True)
    stamp = int(time.time())
    for i in range(n):
        sender = f"s{i}@senders.example" if rcpt is None else f"b{i}@d{i}.bench.example"
        to = rcpt or f"list{i}@lists.example.org"
        (queue / "new" / f"{stamp}.B{i}.bench").write_text(
            f"Return-Path: <{sender}>\nDelivered-To: {to}\n"
            f"From: {sender}\nTo: {to}\nSubject: m{i}\nMessage-ID: <{i}.{time.time_ns()}@bench.example>\n\n{BODY}")
    # on disk before deq starts, as Postfix's fsynced deliveries are: the drain must not pay for
    # the fill's writeback (with 10,000 files it otherwise runs during the drain)
    os.sync()


def _stamp(line: bytes) -> float | None:
    m = _STAMP.match(line)
    if not m:
        return None
    return calendar.timegm(time.strptime(m.group(1).decode(), "%Y-%m-%dT%H:%M:%S")) + int(m.group(2)) / 1000


@dataclass
class Run:
    """One ``deq --once``: what the harness saw."""

    n: int
    wall: float                 # process start to exit (start-up included)
    cpu: float                  # the process's user + system CPU seconds (rusage)
    processed: int              # the runtime's per-message log lines (``via=queue``)
    sent: int                   # outbox lines (replies handed to the relay)
    first: float | None         # time of the first message's log line
    last: float | None          # time of the last message's (or outbox) line
    at_first: tuple[int, float]  # (messages done, CPU seconds) when the harness saw the first line
    rss: list[tuple[int, int]] = field(default_factory=list)  # (drained so far, VmRSS kB)
    other: list[str] = field(default_factory=list)  # the log's other lines
    stamps: list[float] = field(default_factory=list)  # the time of each message's line

    @property
    def tail_cpu(self) -> float:
        """CPU seconds after the first message's line was seen."""
        return self.cpu - self.at_first[1]

    @property
    def drain(self) -> float:
        """Seconds from the first message's line to the last line of the work."""
        assert self.first is not None and self.last is not None
        return self.last - self.first


def run_deq(app: Path, queue: Path, workers: int, env: dict[str, str], sample_rss: bool) -> Run:
    """One ``deq --once`` on the filled `queue`; checks that it emptied the queue."""
    cmd = [str(LAMSONFILTER), "deq", "--app", str(app), "--queue", str(queue), "--once", "--workers", str(workers)]
    total = sum(1 for _ in os.scandir(queue / "new"))
    logpath = queue.parent / f"{queue.name}.log"
    start = time.perf_counter()
    with open(logpath, "wb") as log, open(logpath, "rb") as tail:  # a file, not a pipe: a pipe would fill
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
        samples: list[tuple[int, int]] = []
        drained = 0
        partial = b""
        at_first: tuple[int, float] | None = None  # (messages logged, CPU seconds) when the first line came
        deadline = time.monotonic() + RUN_LIMIT
        while True:  # wait4 with WNOHANG, not Popen.poll: the rusage is the point
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait(10)
                raise SystemExit(f"deq did not finish within {RUN_LIMIT} s")
            # drained so far: the log lines written so far (cheaper than listing new/)
            chunk = partial + tail.read()
            cut = chunk.rfind(b"\n") + 1
            drained += chunk[:cut].count(b" via=queue ")
            partial = chunk[cut:]
            if at_first is None and drained:
                cpu = _cpu(proc.pid)
                chunk = partial + tail.read()  # the lines written meanwhile: count half of them
                cut = chunk.rfind(b"\n") + 1
                more = chunk[:cut].count(b" via=queue ")
                partial = chunk[cut:]
                if cpu is not None:
                    at_first = (drained + more // 2, cpu)
                drained += more
            if sample_rss:
                try:
                    m = re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{proc.pid}/status").read_text())
                except OSError:
                    m = None
                if m:
                    samples.append((drained, int(m.group(1))))
            # fine steps until the first message, so little work goes by before the CPU sample
            time.sleep(0.002 if at_first is None else 0.25 if sample_rss else 0.02)
    wall = time.perf_counter() - start
    err = logpath.read_bytes()
    if proc.returncode != 0:
        raise SystemExit(f"deq exited {proc.returncode}: {err.decode(errors='replace').strip()[-500:]}")
    left = sum(1 for _ in os.scandir(queue / "new")) + sum(1 for _ in os.scandir(queue / "claimed"))
    if left:
        raise SystemExit(f"deq --once left {left} message(s) in the queue: {err.decode(errors='replace')[-300:]}")
    first = last = None
    processed = sent = 0
    other: list[str] = []
    stamps: list[float] = []
    for line in err.splitlines():
        is_msg, is_out = b" via=queue " in line, b" INFO outbox: message " in line
        # the work ends when the last finished file is unlinked, too (deq's remover process ended)
        is_end = b" the remover process ended " in line
        if is_end and (t := _stamp(line)) is not None:
            last = t if last is None else max(last, t)
            continue
        if not (is_msg or is_out):
            other.append(line.decode(errors="replace"))
            continue
        t = _stamp(line)
        processed += is_msg
        sent += is_out
        if is_msg and t is not None:
            stamps.append(t)
        if is_msg and first is None:
            first = t
        last = t
    if processed != total:
        raise SystemExit(f"deq logged {processed} message(s) of {total}")
    if at_first is None:
        raise SystemExit("deq ended before the harness saw its first message line")
    return Run(total, wall, usage.ru_utime + usage.ru_stime, processed, sent, first, last, at_first, samples, other, stamps)


def _cpu(pid: int) -> float | None:
    """The process's user + system CPU seconds so far (/proc/PID/stat, clock ticks)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def salmon(n: int) -> tuple[float, float]:
    """Salmon's rate (msg/s) and CPU ms per message on N messages, one worker."""
    out = subprocess.run([str(SALMON_VENV / "bin" / "python"), str(ROOT / "bench" / "salmon_queue_bench.py"),
                          str(n), "1"], capture_output=True, text=True, timeout=900, check=True).stdout
    m = re.search(r"(\d+) handled in ([\d.]+) s = \d+ msg/s, cpu ([\d.]+) ms/msg", out)
    if not m or int(m.group(1)) != n:
        raise SystemExit(f"salmon bench printed: {out}")
    return n / float(m.group(2)), float(m.group(3))


def ensure_salmon() -> None:
    if (SALMON_VENV / "bin" / "python").exists():
        return
    subprocess.run([sys.executable, "-m", "venv", str(SALMON_VENV)], check=True)
    subprocess.run([str(SALMON_VENV / "bin" / "pip"), "install", "-q", "salmon-mail==3.3.0"], check=True, timeout=600)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(app: Path, work: Path, tag: str, n: int, workers: int, env: dict[str, str], rcpt: str | None,
            sample_rss: bool, base: Run) -> tuple[float, float, Run]:
    """(msg/s, CPU ms per message, the run) for N messages; `base` is the one-message run."""
    q = work / f"{tag}-{n}"
    fill(q, n, rcpt)
    r = run_deq(app, q, workers, env, sample_rss)
    shutil.rmtree(q, ignore_errors=True)
    if rcpt is not None and r.sent < n:
        raise SystemExit(f"{tag} {n}: only {r.sent} of {n} replies sent before deq --once ended; "
                         f"other lines of the log:\n" + "\n".join(r.other[-20:]))
    # CPU after the first message's line, less what the one-message run spent after its line (exit)
    return (n - 1) / r.drain, (r.tail_cpu - base.tail_cpu) * 1000 / (n - r.at_first[0]), r


def thousands_line(n: int, stamps: list[float]) -> str | None:
    """The rate over each thousand drained, in one run: the first thousand leaves a queue of N,
    the last a queue of 1,000 (Salmon's QueueReceiver slows down as its queue grows)."""
    if len(stamps) < 2001:
        return None
    bounds = [*range(0, len(stamps) - 1, 1000), len(stamps) - 1]
    rates = [(b - a) / max(stamps[b] - stamps[a], 0.001) for a, b in itertools.pairwise(bounds)]
    return (f"msg/s over each thousand while draining {n}: {', '.join(f'{x:.0f}' for x in rates)}; "
            f"the first thousand's time per message over the last's: {rates[-1] / rates[0]:.2f}")


def rss_line(n: int, samples: list[tuple[int, int]]) -> str | None:
    after = [(done, kb) for done, kb in samples if done >= 1000]
    if not after:
        return None
    first = after[0][1]
    top = max(kb for _, kb in after)
    return (f"RSS while draining {n}: {first} kB at {after[0][0]} drained, at most {top} kB after "
            f"({(top / first - 1) * 100:+.1f} %), {samples[-1][1]} kB at the end ({len(samples)} samples)")


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--counts", default="1000,10000")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--no-salmon", action="store_true")
    ap.add_argument("--no-list", action="store_true")
    args = ap.parse_args()
    counts = sorted(int(c) for c in args.counts.split(","))
    if counts[0] < 2:
        raise SystemExit("counts must be at least 2")
    if not LAMSONFILTER.exists():
        raise SystemExit(f"{LAMSONFILTER} missing: run scripts/bootstrap.sh first")
    if not args.no_salmon:
        ensure_salmon()
    work = Path(tempfile.mkdtemp(prefix="deq-bench-"))
    env = dict(os.environ)
    sink_app = ROOT / "bench" / "apps" / "sink"
    smtp_sink = None
    list_app = work / "list"
    env_list = env
    if not args.no_list:
        shutil.copytree(ROOT / "examples" / "mailinglist", list_app, ignore=shutil.ignore_patterns("var", "__pycache__"))
        with open(list_app / "config" / "settings.py", "a") as f:  # every subscribe gets its reply
            f.write("\n# bench/deq_bench.py: N confirmations within a minute, not the default 300\n"
                    "REPLY_BUDGET = (1_000_000, 1_000)\n")
        port = free_port()
        smtp_sink = subprocess.Popen(["smtp-sink", "-u", "postfix", "-c", f"127.0.0.1:{port}", "256"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        env_list = dict(env, LAMSONFILTER_RELAY=f"127.0.0.1:{port}")
    rates: dict[str, list[float]] = {}
    cpus: dict[str, list[float]] = {}
    vs_salmon: dict[str, list[float]] = {}
    cpu_vs_salmon: dict[str, list[float]] = {}
    growth_wall: list[float] = []
    growth_cpu: list[float] = []
    rss_report: list[str] = []
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"deq bench {started}: {args.rounds} round(s), counts {counts}, {args.workers} worker(s), "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPU(s)", flush=True)

    def note(rnd: int, name: str, rate: float, cpu: float, extra: str = "") -> None:
        rates.setdefault(name, []).append(rate)
        cpus.setdefault(name, []).append(cpu)
        print(f"round {rnd}: {name}: {rate:.0f} msg/s, {cpu:.3f} ms CPU/msg{extra}", flush=True)

    try:
        for rnd in range(1, args.rounds + 1):
            sal = sal_cpu = None
            if not args.no_salmon:
                sal, sal_cpu = salmon(1000)
                note(rnd, "salmon 1000", sal, sal_cpu)
            fill(work / f"one{rnd}", 1)
            base = run_deq(sink_app, work / f"one{rnd}", args.workers, env, False)
            this: dict[int, tuple[float, float]] = {}
            for n in counts if rnd % 2 else counts[::-1]:
                rate, cpu, r = measure(sink_app, work, f"sink{rnd}", n, args.workers, env, None,
                                       n == counts[-1], base)
                this[n] = (rate, cpu)
                extra = ""
                if sal and sal_cpu:
                    vs_salmon.setdefault(f"sink {n}", []).append(rate / sal)
                    cpu_vs_salmon.setdefault(f"sink {n}", []).append(sal_cpu / cpu)
                    extra = f", {rate / sal:.1f}x Salmon's rate, {sal_cpu / cpu:.1f}x less CPU"
                note(rnd, f"sink {n}", rate, cpu, extra + f" (whole run {r.wall:.2f} s, {r.cpu:.2f} s CPU; "
                     f"one-message run {base.wall:.2f} s, {base.cpu:.2f} s CPU)")
                if n == counts[-1] and n >= 2000:
                    line = thousands_line(n, r.stamps)
                    if line:
                        print(f"round {rnd}: {line}", flush=True)
                    line = rss_line(n, r.rss)
                    if line:
                        rss_report.append(f"round {rnd}: {line}")
                        print(f"round {rnd}: {line}", flush=True)
            if len(counts) > 1:
                (r1, c1), (r2, c2) = this[counts[0]], this[counts[-1]]
                growth_wall.append(r1 / r2)
                growth_cpu.append(c2 / c1)
                print(f"round {rnd}: cost per message at {counts[-1]} / at {counts[0]}: wall {r1 / r2:.2f}, "
                      f"CPU {c2 / c1:.2f}", flush=True)
            if smtp_sink is not None:
                n = counts[0]
                db = work / f"list{rnd}.db"
                subprocess.run([str(LAMSONFILTER), "db", "init", "--app", str(list_app), "--database",
                                f"sqlite:///{db}"], check=True, capture_output=True, env=env)
                lenv = dict(env_list, LAMSONFILTER_DATABASE=f"sqlite:///{db}")
                rcpt = "python-subscribe@lists.example.org"
                fill(work / f"lone{rnd}", 1, rcpt)
                lbase = run_deq(list_app, work / f"lone{rnd}", args.workers, lenv, False)
                rate, cpu, r = measure(list_app, work, f"list{rnd}", n, args.workers, lenv, rcpt, False, lbase)
                extra = f", {rate / sal:.2f}x Salmon's (stateless) rate" if sal else ""
                note(rnd, f"list {n}", rate, cpu, extra + f" ({r.sent} replies sent)")
    finally:
        if smtp_sink is not None:
            smtp_sink.terminate()
            smtp_sink.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nmedians over {args.rounds} round(s) (load average now "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}):")
    for name, name_rates in rates.items():
        vs = vs_salmon.get(name)
        extra = (f", {statistics.median(vs):.1f}x Salmon's rate (per round: "
                 f"{', '.join(f'{v:.1f}' for v in vs)}), {statistics.median(cpu_vs_salmon[name]):.1f}x "
                 f"less CPU per message") if vs else ""
        print(f"  {name:12s} {statistics.median(name_rates):8.0f} msg/s  "
              f"{statistics.median(cpus[name]):7.3f} ms CPU/msg{extra}")
    if growth_wall:
        print(f"  cost per message at {counts[-1]} / at {counts[0]}: wall {statistics.median(growth_wall):.2f} "
              f"(per round: {', '.join(f'{g:.2f}' for g in growth_wall)}), CPU {statistics.median(growth_cpu):.2f} "
              f"(per round: {', '.join(f'{g:.2f}' for g in growth_cpu)})")
    for line in rss_report:
        print(f"  {line}")


if __name__ == "__main__":
    main()
