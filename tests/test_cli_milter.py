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

from lamsonfilter.endpoint import DEFAULT_MILTER_SOCKET
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
