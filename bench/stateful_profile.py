#!/usr/bin/env python3
"""stateful_profile.py - where the CPU of a stateful message goes, measured in process.

The traffic of bench/stateful_bench.sh (the example list's subscribe/confirm pairs, each pair
from a new sender) without Postfix and without a transport: `Runtime.process` (what the milter
and the content filter call for every message: App.process with its transaction, the log line)
and then the outbox sender's `OutboxWorker.flush` (claim, render nothing, send over SMTP, mark)
after every message, as the daemon's outbox thread does when a message wakes it.  The relay is
Postfix's smtp-sink on a loopback port, so the sink's CPU is not in the profile.  Application:
examples/mailinglist copied to a temporary directory, REPLY_BUDGET raised as in
stateful_bench.sh; state in SQLite (default) or in the database LAMSONFILTER_DATABASE names.

    .venv/bin/python bench/stateful_profile.py --pairs 300          # CPU per message, by step
    .venv/bin/python bench/stateful_profile.py --pairs 300 --profile cpu --top 40 --dump /tmp/p.prof

It prints CPU per message (process time: the message in, the reply out) and, by default, the
CPU time of each step (bracketed with time.process_time, so with little overhead); with
``--profile cpu`` or ``wall`` instead cProfile's share of the time by package (email,
sqlalchemy, sqlite3, mako, ...) and the top functions by cumulative time.  A measurement tool, not product code.  Loopback only; bounded (--pairs
messages, every SMTP and token wait with a time limit); stops only the smtp-sink it started.
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import os
import pstats
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
LIST, HOST = "python", "lists.example.org"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:  # bounded
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"smtp-sink on {port} did not come up")


def message(sender: str, rcpt: str, n: int) -> bytes:
    body = ("x" * 72 + "\n") * 27  # about 2 KB, as the bench
    return (f"From: {sender}\r\nTo: {rcpt}\r\nSubject: stateful profile\r\n"
            f"Message-ID: <p{n}.{os.getpid()}@bench.example>\r\n\r\n{body}").encode().replace(b"\n", b"\r\n")


def package(filename: str, func: str) -> str:
    """The package a profiled function belongs to (the bucket of the by-package table)."""
    if filename == "~":  # a builtin: name it by what it is
        if "sqlite3" in func:
            return "sqlite3 (C)"
        if "socket" in func or "select" in func or "poll" in func:
            return "socket I/O (C)"
        return "builtins (C)"
    parts = Path(filename).parts
    for marker in ("site-packages", "lamsonfilter", "app"):
        if marker in parts:
            i = parts.index(marker)
            if marker == "site-packages":
                return parts[i + 1].split(".")[0] if i + 1 < len(parts) else "?"
            if marker == "lamsonfilter" and i + 1 < len(parts):
                return "lamsonfilter/" + parts[i + 1].removesuffix(".py")
            if marker == "app":
                return "application (examples/mailinglist)"
    if "mako" in filename or filename.startswith("<template") or "_mako" in filename or "memory:" in filename:
        return "mako templates"
    name = Path(filename).stem
    stdlib = {"smtplib": "smtplib", "socket": "socket", "ssl": "socket", "selectors": "socket",
              "logging": "logging", "__init__": "stdlib other"}
    if "email" in parts:
        return "email (stdlib)"
    if "logging" in parts:
        return "logging (stdlib)"
    if "sqlite3" in parts:
        return "sqlite3 (stdlib)"
    return stdlib.get(name, "stdlib other")


SPENT: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)
PHASES: list[tuple[str, object, str]] = []


def bracket_phases() -> None:
    """Wrap the steps of a stateful message so that each adds its CPU time (inclusive) to SPENT.

    One thread runs them here (the outbox is flushed in the main thread), so process time is
    this thread's; a step that calls itself is counted once.
    """
    import functools

    import sqlalchemy.engine.base
    import sqlalchemy.engine.default

    from lamsonfilter import app, context, outboxworker, relay, views
    from lamsonfilter.daemon import runtime
    from lamsonfilter.store import outbox

    PHASES.extend([
        ("Runtime.process (one message in: the application, its transaction, the log line)",
         runtime.Runtime, "process"),
        ("  App.process", app.App, "process"),
        ("    Context.reply (guards, limits, render, build the reply, queue it)", context.Context, "reply"),
        ("      reply guards (autoreply_refusal: is the message automated?)", context, "autoreply_refusal"),
        ("      Views.respond (Mako render into a Response)", views.Views, "respond"),
        ("      Response.render (build + serialise + check the folding, once per reply)", views.Response, "render"),
        ("        Response.to_message (build the email.message)", views.Response, "to_message"),
        ("      Context._queue (the outbox row)", context.Context, "_queue"),
        ("OutboxWorker.flush (the reply out: claim, SMTP, mark)", outboxworker.OutboxWorker, "flush"),
        ("  claim_outbox", outbox.SQLOutbox, "claim_outbox"),
        ("  Relay.send (SMTP to the relay)", relay.Relay, "send"),
        ("  mark_sent", outbox.SQLOutbox, "mark_sent"),
        ("SQLAlchemy Connection.execute (compile + the driver), anywhere above", sqlalchemy.engine.base.Connection,
         "execute"),
        ("SQL COMMIT, anywhere above", sqlalchemy.engine.default.DefaultDialect, "do_commit"),
    ])
    for label, owner, name in PHASES:
        orig = getattr(owner, name)
        depth = [0]

        def wrapper(*a: Any, __orig: Any = orig, __label: str = label, __depth: list[int] = depth,
                    **k: Any) -> Any:
            if __depth[0]:
                return __orig(*a, **k)
            __depth[0] += 1
            t = time.process_time()
            try:
                return __orig(*a, **k)
            finally:
                SPENT[__label] += time.process_time() - t
                CALLS[__label] += 1
                __depth[0] -= 1

        setattr(owner, name, functools.wraps(orig)(wrapper))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=300, help="subscribe/confirm pairs measured (default 300)")
    ap.add_argument("--warmup", type=int, default=20, help="pairs before measuring (default 20)")
    ap.add_argument("--top", type=int, default=30, help="functions listed by cumulative time")
    ap.add_argument("--dump", help="write the pstats file here")
    ap.add_argument("--profile", choices=("phases", "cpu", "wall", "none"), default="phases",
                    help="phases (default): CPU time of the steps below, bracketed with time.process_time "
                         "(little overhead); cpu/wall: cProfile with a CPU-time or wall-clock timer (cProfile's "
                         "overhead inflates code with many small calls, the email package most); none")
    args = ap.parse_args(argv)
    if not 1 <= args.pairs <= 5000:
        ap.error("--pairs: 1..5000")
    sink_bin = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    work = Path(tempfile.mkdtemp(prefix="lf-stateful-profile-", dir="/tmp"))
    sink = None
    try:
        app_dir = work / "app"
        shutil.copytree(REPO / "examples" / "mailinglist", app_dir, ignore=shutil.ignore_patterns("var", "tests"))
        port = free_port()
        with open(app_dir / "config" / "settings.py", "a") as f:
            f.write(f'\n# bench/stateful_profile.py\nREPLY_BUDGET = (1000000, 30)\nRELAY = "127.0.0.1:{port}"\n')
        subprocess.run([sys.executable, "-m", "lamsonfilter.cli", "db", "init", "--app", str(app_dir)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        sink = subprocess.Popen([sink_bin, *user, f"127.0.0.1:{port}", "100"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port)
        logging.basicConfig(filename=str(work / "lamsonfilter.log"), level=logging.INFO,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")

        from lamsonfilter.daemon.runtime import Runtime
        from lamsonfilter.mail import MailRequest

        db = os.environ.get("LAMSONFILTER_DATABASE")  # as the CLI's --database
        runtime = Runtime.from_directory(app_dir, {"DATABASE_URL": db} if db else None)
        worker = runtime.worker
        assert worker is not None
        storage = runtime.app.storage
        url = runtime.app.settings["DATABASE_URL"]
        run = os.getpid()
        times = {"process": 0.0, "flush": 0.0}
        sent = 0

        def token_of(sender: str) -> str:
            key = f"mailinglist:{LIST}:{sender}"
            with storage.transaction(commit=False) as tx:
                rec = tx.get(key)
            if rec is None or not rec.data.get("token"):
                raise SystemExit(f"no token for {sender}: the subscribe did not commit")
            return str(rec.data["token"])

        def pair(k: int, measure: bool) -> None:
            nonlocal sent
            sender = f"p{run}x{k}@d{k}.bench.example"
            for step in range(2):
                rcpt = (f"{LIST}-subscribe@{HOST}" if step == 0 else f"{LIST}-confirm-{token_of(sender)}@{HOST}")
                req = MailRequest.from_bytes(message(sender, rcpt, 2 * k + step), sender=sender,
                                             recipients=(rcpt,), queue_id=f"Q{k}S{step}")
                t0 = time.process_time()
                decision = runtime.process(req, replay_key=f"Q{k}S{step}", deadline=time.monotonic() + 120,
                                           transport="profile")
                t1 = time.process_time()
                n = worker.flush()
                t2 = time.process_time()
                if decision.kind == "tempfail" or n != 1:
                    raise SystemExit(f"pair {k} step {step}: decision {decision.kind}, {n} outbox sent")
                if measure:
                    times["process"] += t1 - t0
                    times["flush"] += t2 - t1
                    sent += 1

        for k in range(args.warmup):
            pair(k, False)
        prof = None
        if args.profile in ("cpu", "wall"):
            prof = cProfile.Profile(time.perf_counter if args.profile == "wall" else time.process_time)
        elif args.profile == "phases":
            bracket_phases()
        wall0 = time.monotonic()
        if prof:
            prof.enable()
        for k in range(args.warmup, args.warmup + args.pairs):
            pair(k, True)
        if prof:
            prof.disable()
        wall = time.monotonic() - wall0
        runtime.stop()

        n = sent
        print(f"stateful_profile: {n} messages ({args.pairs} pairs), database {url.split('://')[0]}, "
              f"{'under cProfile, ' + args.profile + ' time' if prof else args.profile}, loadavg {Path('/proc/loadavg').read_text().split()[:3]}")
        print(f"  CPU per message: Runtime.process {1000 * times['process'] / n:.2f} ms, "
              f"outbox flush (claim, SMTP, mark) {1000 * times['flush'] / n:.2f} ms, "
              f"total {1000 * (times['process'] + times['flush']) / n:.2f} ms; wall {1000 * wall / n:.2f} ms")
        if args.profile == "phases":
            print("\n  CPU per message by step (inclusive: an indented step is part of the one above it;"
                  " calls per message in brackets):")
            for label, _owner, _name in PHASES:
                if CALLS[label]:
                    print(f"    {1000 * SPENT[label] / n:6.2f} ms  ({CALLS[label] / n:4.1f})  {label}")
        if prof is None:
            return 0
        stats = pstats.Stats(prof)
        if args.dump:
            stats.dump_stats(args.dump)
        total = sum(v[2] for v in stats.stats.values())  # type: ignore[attr-defined]
        by: dict[str, float] = defaultdict(float)
        for (filename, _line, func), (_cc, _nc, tt, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
            by[package(filename, func)] += tt
        print(f"\n  own time by package ({1000 * total / n:.2f} ms per message profiled, profiler overhead included):")
        for name, tt in sorted(by.items(), key=lambda kv: -kv[1])[:18]:
            print(f"    {100 * tt / total:5.1f} %  {1000 * tt / n:6.2f} ms  {name}")
        print()
        stats.sort_stats("cumulative").print_stats(args.top)
        return 0
    finally:
        if sink is not None:
            sink.terminate()
            try:
                sink.wait(10)
            except subprocess.TimeoutExpired:
                sink.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
