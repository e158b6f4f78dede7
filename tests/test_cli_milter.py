"""``lamsonfilter milter``: start-up refuses bad configuration (exit 2, naming the problem); stops cleanly."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lamsonfilter.daemon.endpoint import DEFAULT_MILTER_SOCKET
from tests.rig.fixtures import in_ci

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "mailinglist"


def lamsonfilter(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lamsonfilter.cli", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


def need_pymilter() -> None:
    try:
        import Milter  # noqa: F401
    except ImportError as exc:
        if in_ci():
            raise
        pytest.skip(f"pymilter is not installed ({exc})")


@pytest.fixture
def app(tmp_path: Path) -> Path:
    """The example application with its schema in a fresh SQLite file."""
    target = tmp_path / "app"
    shutil.copytree(APP, target, ignore=shutil.ignore_patterns("var", "__pycache__"))
    r = lamsonfilter("db", "init", "--app", str(target))
    assert r.returncode == 0, r.stderr
    return target


def test_help_lists_milter_and_its_options() -> None:
    assert "  milter " in lamsonfilter("--help").stdout
    out = lamsonfilter("milter", "--help").stdout
    for option in ("--socket", "--relay", "--database", "--allow-remote", "--socket-group", DEFAULT_MILTER_SOCKET):
        assert option in out


def test_non_loopback_inet_socket_is_refused(app: Path) -> None:
    r = lamsonfilter("milter", "--app", str(app), "--socket", "inet:8891@0.0.0.0")
    assert r.returncode == 2
    assert "0.0.0.0 is not a loopback address" in r.stderr and "--allow-remote" in r.stderr


def test_bad_socket_spec_is_refused(app: Path) -> None:
    r = lamsonfilter("milter", "--app", str(app), "--socket", "tcp:127.0.0.1:8891")
    assert r.returncode == 2 and "expected unix:/path, inet:PORT@HOST" in r.stderr


def test_missing_application_is_refused(tmp_path: Path) -> None:
    need_pymilter()
    r = lamsonfilter("milter", "--app", str(tmp_path / "nowhere"), "--socket", f"unix:{tmp_path}/m.sock")
    assert r.returncode == 2 and "no such application directory" in r.stderr


def test_missing_schema_says_run_db_init(tmp_path: Path) -> None:
    need_pymilter()
    target = tmp_path / "app"
    shutil.copytree(APP, target, ignore=shutil.ignore_patterns("var", "__pycache__"))
    r = lamsonfilter("milter", "--app", str(target), "--socket", f"unix:{tmp_path}/m.sock")
    assert r.returncode == 2 and "lamsonfilter db init" in r.stderr, r.stderr
    assert not (tmp_path / "m.sock").exists()


def test_bad_relay_names_the_setting(app: Path, tmp_path: Path) -> None:
    need_pymilter()
    r = lamsonfilter("milter", "--app", str(app), "--socket", f"unix:{tmp_path}/m.sock", "--relay", "nowhere")
    assert r.returncode == 2 and "RELAY" in r.stderr, r.stderr


def test_socket_in_use_is_refused(app: Path, tmp_path: Path) -> None:
    need_pymilter()
    path = tmp_path / "busy.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(path))
        other.listen()
        r = lamsonfilter("milter", "--app", str(app), "--socket", f"unix:{path}")
    assert r.returncode == 2 and "already listening on this socket" in r.stderr, r.stderr


def test_starts_and_stops_cleanly_on_sigterm(app: Path, tmp_path: Path) -> None:
    need_pymilter()
    path = tmp_path / "run" / "milter.sock"  # the directory is created
    log = tmp_path / "milter.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lamsonfilter.cli", "milter", "--app", str(app),
                                 "--socket", f"unix:{path}", "--relay", "127.0.0.1:9"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while "milter listening" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        assert path.is_socket()
        mode = path.stat().st_mode & 0o777
        assert mode in (0o660, 0o666), oct(mode)  # 0660 with group postfix where that group exists
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = log.read_text()
    assert "SIGTERM: stopping" in text and "milter stopped" in text
    assert not path.exists()


def test_an_inet_socket_in_use_is_refused_with_the_reason(app: Path) -> None:
    need_pymilter()
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        r = lamsonfilter("milter", "--app", str(app), "--socket", f"inet:{port}@127.0.0.1")
    assert r.returncode == 2, r.stderr
    assert "address already in use" in r.stderr and f"port {port}" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_a_socket_path_that_is_not_a_socket_is_refused_with_the_reason(app: Path, tmp_path: Path) -> None:
    need_pymilter()
    taken = tmp_path / "taken.sock"
    taken.mkdir()
    r = lamsonfilter("milter", "--app", str(app), "--socket", f"unix:{taken}")
    assert r.returncode == 2 and f"{taken} exists and is not a socket" in r.stderr, r.stderr
    r = lamsonfilter("milter", "--app", str(app), "--socket", "unix:/proc/no-such-dir/m.sock")
    assert r.returncode == 2 and "/proc/no-such-dir" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_the_content_filter_logs_start_and_stop_at_info_like_the_milter(app: Path, tmp_path: Path) -> None:
    if not in_ci():
        pytest.importorskip("aiosmtpd")
    from tests.rig.postfix import free_port

    log = tmp_path / "proxy.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lamsonfilter.cli", "smtpproxy", "--app", str(app),
                                 "--listen", f"127.0.0.1:{free_port()}", "--reinject", f"127.0.0.1:{free_port()}"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while "listening on" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    lines = log.read_text().splitlines()
    started = [l for l in lines if "smtpproxy (pid" in l and "listening on" in l]
    stopped = [l for l in lines if "smtpproxy (pid" in l and l.endswith("stopped")]
    assert len(started) == 1 and len(stopped) == 1, lines
    assert " INFO smtpproxy (pid" in started[0] and " INFO smtpproxy (pid" in stopped[0]
