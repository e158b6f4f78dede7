"""Start-up problems of both daemons are one line and exit 2; log lines outside journald carry the time."""

from __future__ import annotations

import logging
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lamsonfilter.daemon.service import setup_logging
from tests.rig.proxy import make_app
from tests.rig.postfix import free_port

ROOT = Path(__file__).resolve().parents[1]


def _taken_port() -> tuple[socket.socket, int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock, sock.getsockname()[1]


@pytest.mark.parametrize("daemon", ["smtpproxy", "smtpproxy-workers", "milter"])
def test_a_metrics_port_in_use_is_one_line_and_exit_2(tmp_path: Path, daemon: str) -> None:
    if daemon == "milter":
        pytest.importorskip("Milter")
    holder, port = _taken_port()
    try:
        app = make_app(tmp_path / "app", f'METRICS = "127.0.0.1:{port}"\n')
        if daemon.startswith("smtpproxy"):
            args = ["smtpproxy", "--listen", f"127.0.0.1:{free_port()}", "--reinject", f"127.0.0.1:{free_port()}",
                    *(["--workers", "2"] if daemon.endswith("workers") else [])]
        else:
            args = ["milter", "--socket", f"inet:{free_port()}@127.0.0.1", "--relay", f"127.0.0.1:{free_port()}"]
        proc = subprocess.run([sys.executable, "-m", "lamsonfilter", *args, "--app", str(app)],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
    finally:
        holder.close()
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr  # nothing started and stopped first, no traceback
    assert f"127.0.0.1:{port}" in lines[0] and "metrics" in lines[0].lower() and "in use" in lines[0], lines


def test_log_lines_on_stderr_carry_a_utc_timestamp(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        setup_logging(0)
        logging.getLogger("lamsonfilter.test").info("queue_id=ABC something happened")
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z lamsonfilter\[\d+\]: INFO queue_id=ABC something happened$",
                    line), line
