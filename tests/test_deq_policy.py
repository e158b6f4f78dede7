"""``deq --policy`` (`lamsonfilter.queueworker.policy.PolicyListener`): Postfix's policy delegation
answered by the queue worker, over a real loopback socket, as Postfix speaks it.

The answer is the content filter's (`lamsonfilter.contentfilter.policy`): 550 5.1.1 for an address
at the application's hosts that no route takes, DUNNO for the rest; the listener refuses a
non-loopback address and a port already taken at start (StartupError: deq exits 2 with one line).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lamsonfilter.app import StartupError
from lamsonfilter.daemon.runtime import Runtime
from lamsonfilter.queueworker.policy import PolicyListener
from tests.rig.postfix import free_port
from tests.rig.proxy import make_app

HOST = "lists.example.org"


def ask(port: int, recipients: list[str]) -> list[str]:
    """One connection, one request per recipient (Postfix keeps its connection open)."""
    answers = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        f = s.makefile("rwb")
        for rcpt in recipients:
            f.write(f"request=smtpd_access_policy\nprotocol_state=RCPT\nsender=alice@example.com\n"
                    f"recipient={rcpt}\nclient_address=127.0.0.1\n\n".encode())
            f.flush()
            answer = f.readline().decode().strip()
            assert f.readline() == b"\n"
            answers.append(answer)
    return answers


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[Runtime]:
    rt = Runtime.from_directory(make_app(tmp_path / "app"), {"RELAY": f"127.0.0.1:{free_port()}"})
    try:
        yield rt
    finally:
        rt.app.storage.close()


def test_unknown_addresses_are_refused_and_the_rest_left_to_postfix(runtime: Runtime) -> None:
    port = free_port()
    listener = PolicyListener(runtime, ("127.0.0.1", port))
    listener.start()
    idle = None
    try:
        assert ask(port, [f"nosuchlist@{HOST}", f"python-subscribe@{HOST}", "bob@elsewhere.example"]) == [
            "action=550 5.1.1 No such address here", "action=DUNNO", "action=DUNNO"]
        idle = socket.create_connection(("127.0.0.1", port), timeout=10)  # Postfix keeps one open
    finally:
        started = time.monotonic()
        listener.stop()
        assert time.monotonic() - started < 5  # an open connection does not hold deq's stop
    assert idle.recv(1) == b""  # closed by the listener
    idle.close()
    with pytest.raises(OSError):  # closed with deq
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_a_taken_port_or_a_remote_address_is_a_startup_error(runtime: Runtime) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(StartupError, match=rf"--policy: cannot listen on 127\.0\.0\.1:{port}"):
            PolicyListener(runtime, ("127.0.0.1", port))
    with pytest.raises(StartupError, match="not a loopback address"):
        PolicyListener(runtime, ("0.0.0.0", free_port()))
