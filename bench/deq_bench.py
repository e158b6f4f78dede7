#!/usr/bin/env python3
"""deq_bench.py - how fast ``lamsonfilter deq`` drains a queue, beside Salmon in the same run.

A measurement tool, not product code and not a test.  Each round, interleaved:

- **salmon**: Salmon's QueueReceiver (salmon-mail 3.3.0 in a scratch virtualenv, one worker)
  on 1,000 queued 2 KB messages with an empty stateless handler (bench/salmon_queue_bench.py);
- **sink N**: ``lamsonfilter deq --once`` with bench/apps/sink (one stateless route that
  drops the message, no database) on N queued 2 KB messages, for each N of ``--counts``;
- **list N**: the same with the example list (examples/mailinglist, SQLite, a state
  transition and a reply through the outbox per message: N subscribe requests from N
  senders), replies to smtp-sink on loopback, for the smallest N.

The queue is filled before the timer starts (not timed).  deq's own start-up (imports, the
application, the database) is measured on an empty queue in the same round and subtracted,
as Salmon's harness starts its timer after loading.  Reported per configuration: the median
rate over the rounds, the CPU per message of the deq process (its rusage, start-up
subtracted), and for the largest sink run the resident set size sampled while draining
(first thousand drained vs the highest after it).  Ratios are within a round.

    python3 bench/deq_bench.py                        # 3 rounds, counts 1000,10000
    python3 bench/deq_bench.py --rounds 5 --counts 1000,10000 --workers 1

Needs: scripts/bootstrap.sh's .venv; PyPI for the Salmon venv (or --no-salmon); Postfix's
smtp-sink for the list runs (or --no-list).  Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAMSONFILTER = ROOT / ".venv" / "bin" / "lamsonfilter"
SALMON_VENV = Path(os.environ.get("BENCH_SALMON_VENV", "/tmp/salmon-venv"))
BODY = ("x" * 76 + "\n") * 25  # about 2 KB with the header


def fill(queue: Path, n: int, rcpt: str | None = None) -> None:
    """N files in new/ with Postfix's envelope lines (not fsynced: the fill is not measured)."""
    for sub in ("tmp", "new", "cur", "claimed", "retry"):
        (queue / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sender = f"s{i}@senders.example" if rcpt is None else f"b{i}@d{i}.bench.example"
        to = rcpt or f"list{i}@lists.example.org"
        (queue / "new" / f"{int(time.time())}.B{i}.bench").write_text(
            f"Return-Path: <{sender}>\nDelivered-To: {to}\n"
            f"From: {sender}\nTo: {to}\nSubject: m{i}\nMessage-ID: <{i}.{time.time_ns()}@bench.example>\n\n{BODY}")


def run_deq(app: Path, queue: Path, workers: int, env: dict[str, str], sample_rss: bool) -> dict[str, float]:
    """One ``deq --once``: wall seconds, CPU seconds (rusage), RSS samples (kB, by drained count)."""
    cmd = [str(LAMSONFILTER), "deq", "--app", str(app), "--queue", str(queue), "--once", "--workers", str(workers)]
    total = sum(1 for _ in os.scandir(queue / "new")) if (queue / "new").is_dir() else 0
    start = time.perf_counter()
    log = open(queue.parent / f"{queue.name}.log", "w+b")  # the per-message log lines (not a pipe: it would fill)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
    samples: list[tuple[int, int]] = []
    deadline = time.monotonic() + 600
    while True:  # wait4 with WNOHANG, not Popen.poll: the rusage is the point
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait(10)
            raise SystemExit("deq did not finish within 600 s")
        if sample_rss:
            try:
                status_text = Path(f"/proc/{proc.pid}/status").read_text()
                m = re.search(r"VmRSS:\s+(\d+)", status_text)
                left = sum(1 for _ in os.scandir(queue / "new"))
                if m:
                    samples.append((total - left, int(m.group(1))))
            except OSError:
                pass
        time.sleep(0.25 if sample_rss else 0.01)
    wall = time.perf_counter() - start
    log.seek(0)
    err = log.read().decode(errors="replace")
    log.close()
    if proc.returncode != 0:
        raise SystemExit(f"deq exited {proc.returncode}: {err.strip()[-500:]}")
    left = sum(1 for _ in os.scandir(queue / "new"))
    if left:
        raise SystemExit(f"deq --once left {left} message(s) in new/: {err.strip()[-300:]}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss": samples}  # type: ignore[dict-item]


def salmon(n: int) -> tuple[float, float]:
    """Salmon's rate (msg/s) and CPU ms per message on N messages, one worker."""
    out = subprocess.run([str(SALMON_VENV / "bin" / "python"), str(ROOT / "bench" / "salmon_queue_bench.py"),
                          str(n), "1"], capture_output=True, text=True, timeout=900, check=True).stdout
    m = re.search(r"= (\d+) msg/s, cpu ([\d.]+) ms/msg", out)
    if not m:
        raise SystemExit(f"salmon bench printed: {out}")
    return float(m.group(1)), float(m.group(2))


def ensure_salmon() -> None:
    if (SALMON_VENV / "bin" / "python").exists():
        return
    subprocess.run([sys.executable, "-m", "venv", str(SALMON_VENV)], check=True)
    subprocess.run([str(SALMON_VENV / "bin" / "pip"), "install", "-q", "salmon-mail==3.3.0"], check=True, timeout=600)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--counts", default="1000,10000")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--no-salmon", action="store_true")
    ap.add_argument("--no-list", action="store_true")
    args = ap.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    if not LAMSONFILTER.exists():
        raise SystemExit(f"{LAMSONFILTER} missing: run scripts/bootstrap.sh first")
    if not args.no_salmon:
        ensure_salmon()
    work = Path(tempfile.mkdtemp(prefix="deq-bench-"))
    env = dict(os.environ)
    sink_app = ROOT / "bench" / "apps" / "sink"
    smtp_sink = None
    list_app = work / "list"
    if not args.no_list:
        shutil.copytree(ROOT / "examples" / "mailinglist", list_app, ignore=shutil.ignore_patterns("var", "__pycache__"))
        port = free_port()
        smtp_sink = subprocess.Popen(["smtp-sink", "-u", "postfix", "-c", f"127.0.0.1:{port}", "256"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        env_list = dict(env, LAMSONFILTER_RELAY=f"127.0.0.1:{port}")
    results: dict[str, list[tuple[float, float]]] = {}
    rss_report = ""
    print(f"deq bench: {args.rounds} round(s), counts {counts}, {args.workers} worker(s), "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    try:
        for rnd in range(args.rounds):
            if not args.no_salmon:
                rate, cpu = salmon(1000)
                results.setdefault("salmon 1000", []).append((rate, cpu))
                print(f"round {rnd + 1}: salmon 1000: {rate:.0f} msg/s, {cpu:.3f} ms CPU/msg", flush=True)
            empty = work / f"empty{rnd}"
            fill(empty, 0)
            base = run_deq(sink_app, empty, args.workers, env, False)
            for n in counts:
                q = work / f"sink{rnd}-{n}"
                fill(q, n)
                r = run_deq(sink_app, q, args.workers, env, n == max(counts))
                wall, cpu = r["wall"] - base["wall"], r["cpu"] - base["cpu"]
                results.setdefault(f"sink {n}", []).append((n / wall, cpu * 1000 / n))
                print(f"round {rnd + 1}: sink {n}: {n / wall:.0f} msg/s, {cpu * 1000 / n:.3f} ms CPU/msg "
                      f"(start-up {base['wall']:.2f} s subtracted)", flush=True)
                shutil.rmtree(q, ignore_errors=True)
                samples = r["rss"]
                if n == max(counts) and n >= 2000 and samples:  # type: ignore[truthy-bool]
                    after = [rss for done, rss in samples if done >= 1000]  # type: ignore[union-attr]
                    first = after[0] if after else 0
                    if first:
                        rss_report = (f"RSS while draining {n}: {first} kB after the first thousand, "
                                      f"at most {max(after)} kB after ({(max(after) / first - 1) * 100:+.1f} %)")
                        print(f"round {rnd + 1}: {rss_report}", flush=True)
            if smtp_sink is not None:
                n = min(counts)
                db = work / f"list{rnd}.db"
                subprocess.run([str(LAMSONFILTER), "db", "init", "--app", str(list_app), "--database",
                                f"sqlite:///{db}"], check=True, capture_output=True, env=env)
                lenv = dict(env_list, LAMSONFILTER_DATABASE=f"sqlite:///{db}")
                empty = work / f"lempty{rnd}"
                fill(empty, 0)
                lbase = run_deq(list_app, empty, args.workers, lenv, False)
                q = work / f"list{rnd}-{n}"
                fill(q, n, rcpt="python-subscribe@lists.example.org")
                r = run_deq(list_app, q, args.workers, lenv, False)
                wall, cpu = r["wall"] - lbase["wall"], r["cpu"] - lbase["cpu"]
                results.setdefault(f"list {n}", []).append((n / wall, cpu * 1000 / n))
                print(f"round {rnd + 1}: list {n}: {n / wall:.0f} msg/s, {cpu * 1000 / n:.3f} ms CPU/msg", flush=True)
    finally:
        if smtp_sink is not None:
            smtp_sink.terminate()
            smtp_sink.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nmedians over {args.rounds} round(s) (load now {os.getloadavg()[0]:.2f}):")
    sal = statistics.median(r for r, _ in results["salmon 1000"]) if "salmon 1000" in results else None
    for name, vals in results.items():
        rate = statistics.median(r for r, _ in vals)
        cpu = statistics.median(c for _, c in vals)
        vs = f", {rate / sal:.1f}x Salmon's rate" if sal and not name.startswith("salmon") else ""
        print(f"  {name:12s} {rate:8.0f} msg/s  {cpu:7.3f} ms CPU/msg{vs}")
    small, large = f"sink {min(counts)}", f"sink {max(counts)}"
    if small in results and large in results and small != large:
        ratio = statistics.median(c for _, c in results[large]) / statistics.median(c for _, c in results[small])
        print(f"  CPU per message at {max(counts)} / at {min(counts)}: {ratio:.2f}")
    if rss_report:
        print(f"  {rss_report}")


if __name__ == "__main__":
    main()
