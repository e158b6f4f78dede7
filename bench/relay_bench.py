"""Client CPU per outbox message: `lamsonfilter.relay.Relay` (the one asyncio SMTP client, run on a
loop of its own per send) against plain ``smtplib`` (what the outbox used before), through loopback.

    .venv/bin/python bench/relay_bench.py [N]

Both send N small messages, one connection each (as `Relay.send` does), to
an aiosmtpd sink in a process of its own (started here, stopped by its
PID); the figure is this process's CPU time per message, so the server's
work is not counted.  The two clients alternate in rounds, so a busy machine affects
both alike; the ratio is what to read.
"""

from __future__ import annotations

import smtplib
import subprocess
import sys
import time

from lamsonfilter.decisions import OutboxMessage
from lamsonfilter.devtools.machine import free_port, port_accepts, wait_for
from lamsonfilter.relay import Relay

RAW = (b"From: list@example.org\r\nTo: member@example.org\r\nSubject: bench\r\n"
       b"Message-ID: <bench@example.org>\r\n\r\n" + b"a line of text in the body\r\n" * 40)


def with_smtplib(port: int, message: OutboxMessage) -> None:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="lamsonfilter.localhost", timeout=60) as smtp:
        smtp.ehlo()
        smtp.sendmail(message.sender, list(message.recipients), message.raw)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    rounds = 5
    port = free_port()
    sink = subprocess.Popen([sys.executable, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{port}",
                             "-c", "aiosmtpd.handlers.Sink"])
    try:
        wait_for(lambda: port_accepts(port), 30, message="the sink")
        message = OutboxMessage("list-bounces@example.org", ("a@example.org", "b@example.org"), RAW, "message")
        relay = Relay("127.0.0.1", port, timeout=60.0)
        cpu = {"Relay (smtpclient, asyncio)": 0.0, "smtplib": 0.0}
        for _ in range(rounds):
            start = time.process_time()
            for _ in range(n // rounds):
                d = relay.send(message)
                assert len(d.accepted) == 2, d
            cpu["Relay (smtpclient, asyncio)"] += time.process_time() - start
            start = time.process_time()
            for _ in range(n // rounds):
                with_smtplib(port, message)
            cpu["smtplib"] += time.process_time() - start
    finally:
        sink.terminate()  # the process started above, by its PID
        sink.wait(10)
    sent = rounds * (n // rounds)
    for name, seconds in cpu.items():
        print(f"{name:30s} {sent} messages, {1000 * seconds / sent:.3f} ms CPU per message")
    print(f"ratio Relay/smtplib: {cpu['Relay (smtpclient, asyncio)'] / cpu['smtplib']:.2f}")


if __name__ == "__main__":
    main()
