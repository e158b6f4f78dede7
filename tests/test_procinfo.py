"""/proc facts the demo relies on to stop exactly what it started and to name what holds its port."""

import os
import socket
import subprocess
import sys

from lamsonfilter.devtools import procinfo
from lamsonfilter.devtools.demostop import port_in_use_message


def _sleeper(**kwargs):
    """A child that has exec'd (it says so) and then sleeps."""
    child = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE, **kwargs)
    assert child.stdout.readline() == b"up\n"
    return child


def test_listeners_names_the_process_holding_a_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert procinfo.listeners(port) == [os.getpid()]
        message = port_in_use_message(port)
        assert message.startswith(f"127.0.0.1:{port} is in use by pid {os.getpid()} (")
        assert f"kill {os.getpid()}" in message and "choose another --port" in message
        assert "\n" not in message
    assert procinfo.listeners(port) == []
    assert port_in_use_message(port) == f"127.0.0.1:{port} is in use; choose another --port"


def test_a_session_and_its_members_by_pid_and_start_time():
    child = _sleeper(start_new_session=True)
    try:
        started = procinfo.start_time(child.pid)
        assert started is not None and procinfo.same_process(child.pid, started)
        assert not procinfo.same_process(child.pid, started + 1)  # a reused PID is not ours
        assert procinfo.session_members(child.pid) == [child.pid]
        assert "time.sleep(60)" in procinfo.command_line(child.pid)
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert not procinfo.alive(child.pid)
    assert procinfo.session_members(child.pid) == []
    assert not procinfo.same_process(child.pid, started)


def test_environ_value_reads_a_process_environment():
    child = _sleeper(env={**os.environ, "MAIL_CONFIG": "/tmp/x/postfix/etc"})
    try:
        assert procinfo.environ_value(child.pid, "MAIL_CONFIG") == "/tmp/x/postfix/etc"
        assert procinfo.environ_value(child.pid, "NO_SUCH_VARIABLE_HERE") is None
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
