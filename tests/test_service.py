"""sd_notify through systemd-python, against a real NOTIFY_SOCKET; a no-op outside systemd."""

import os
import socket

import pytest

from lamsonfilter.daemon.service import Service
from tests.rig.fixtures import skip_or_fail


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    try:
        import systemd.daemon  # noqa: F401
    except ImportError:
        skip_or_fail("systemd-python (the systemd extra) is not installed")
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield sock
    sock.close()


def test_no_notify_socket_means_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    s = Service()
    assert not s.active
    s.ready("x"), s.status("y"), s.stopping()  # nothing to send to, nothing raised


def test_ready_status_stopping_reach_the_socket(notify_socket):
    s = Service()
    assert s.active
    s.ready("listening on 127.0.0.1:10025")
    msg = notify_socket.recv(4096).decode()
    assert "READY=1" in msg and "STATUS=listening on 127.0.0.1:10025" in msg and f"MAINPID={os.getpid()}" in msg
    s.reloading()
    assert "RELOADING=1" in notify_socket.recv(4096).decode()
    s.stopping()
    assert "STOPPING=1" in notify_socket.recv(4096).decode()


def test_watchdog_pings_at_half_the_interval(notify_socket, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    s = Service()
    assert s.watchdog_interval() == pytest.approx(0.1)
    s.start_watchdog()
    try:
        assert notify_socket.recv(4096).decode() == "WATCHDOG=1"
        assert notify_socket.recv(4096).decode() == "WATCHDOG=1"
    finally:
        s.stopping()


def test_watchdog_for_another_pid_is_not_ours(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert Service().watchdog_interval() is None
