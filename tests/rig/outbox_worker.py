"""An outbox worker in a process of its own: for tests with several workers on one database.

    python -m tests.rig.outbox_worker URL RELAY_PORT NAME [--lease S] [--batch N] [--deadline S]

Runs one `lamsonfilter.outboxworker.OutboxWorker` named NAME (its claims carry the
name, and it greets the relay with ``EHLO NAME``, so the capture server can
tell the workers apart) against the state database URL, sending to the SMTP
server on 127.0.0.1:RELAY_PORT.  It flushes until the outbox has nothing
pending -- neither due nor claimed by another worker -- and exits 0, or
exits 1 when `--deadline` seconds have passed.  Between flushes it polls
every 50 ms: messages claimed by a worker that died come free when the
lease passes.
"""

from __future__ import annotations

import argparse
import sys
import time

from lamsonfilter.outboxworker import OutboxWorker

from lamsonfilter.relay import Relay
from lamsonfilter.store.sql import SQLAlchemyStorage


def run(url: str, port: int, name: str, *, lease: float, batch: int, deadline: float) -> int:
    storage = SQLAlchemyStorage(url)
    worker = OutboxWorker(storage, Relay("127.0.0.1", port, timeout=10.0, helo=name), interval=3600.0,
                          batch=batch, lease=lease, worker_id=name, min_backoff=0.2)
    end = time.monotonic() + deadline
    try:
        while time.monotonic() < end:
            worker.flush()
            if not storage.pending_outbox(1):
                return 0
            time.sleep(0.05)  # polling: the rest is claimed by others, or not due yet
        print(f"{name}: outbox not empty after {deadline}s", file=sys.stderr)
        return 1
    finally:
        storage.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.rig.outbox_worker")
    parser.add_argument("url")
    parser.add_argument("port", type=int)
    parser.add_argument("name")
    parser.add_argument("--lease", type=float, default=300.0)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--deadline", type=float, default=120.0)
    args = parser.parse_args(argv)
    return run(args.url, args.port, args.name, lease=args.lease, batch=args.batch, deadline=args.deadline)


if __name__ == "__main__":
    sys.exit(main())
