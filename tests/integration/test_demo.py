"""The main-job command: `lamsonfilter demo` starts the example list behind a private Postfix.

As a new user would try it: start it, send a subscription with SMTP, find
the confirmation request in the demo's mailbox, press Ctrl-C, and see that
everything it started is gone.
"""

import os
import signal
import smtplib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.rig.fixtures import require
from tests.rig.postfix import free_port, port_accepts, wait_for

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.postfix


@pytest.mark.parametrize("mode", ["milter", "content-filter"])
def test_demo_runs_the_example_list_and_stops_cleanly_on_ctrl_c(mode):
    require("postfix", "postconf", root=True)
    workdir = Path(tempfile.mkdtemp(prefix="lf-demo-", dir="/tmp"))
    os.chmod(workdir, 0o755)
    port = free_port()
    out = open(workdir / "demo.out", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lamsonfilter", "demo", "--mode", mode, "--dir", str(workdir / "w"),
         "--port", str(port)],
        cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_for(lambda: "ready" in (workdir / "demo.out").read_text() or proc.poll() is not None, 120,
                 message="the demo to be ready")
        banner = (workdir / "demo.out").read_text()
        assert proc.poll() is None, banner
        assert f"Postfix listens on   127.0.0.1:{port}" in banner and "swaks --server" in banner
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            smtp.sendmail("alice@example.com", ["python-subscribe@lists.example.org"],
                          b"From: alice@example.com\r\nTo: python-subscribe@lists.example.org\r\n"
                          b"Subject: subscribe\r\nMessage-ID: <demo-1@example.com>\r\n\r\nplease\r\n")
            with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
                smtp.sendmail("bob@example.net", ["nosuchlist@lists.example.org"], b"Subject: x\r\n\r\nx\r\n")
            assert refused.value.recipients["nosuchlist@lists.example.org"][0] == 550
        inbox = workdir / "w" / "mail" / "inbox" / "new"
        found = wait_for(lambda: [p for p in inbox.glob("*") if b"Confirm your subscription" in p.read_bytes()]
                         if inbox.is_dir() else [], 60, message="the confirmation in the demo mailbox")
        assert b"To: alice@example.com" in found[0].read_bytes()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        out.close()
    text = (workdir / "demo.out").read_text()
    assert proc.returncode == 0, text
    assert text.rstrip().endswith("stopped")
    assert not port_accepts(port)
    assert not (workdir / "w" / "postfix" / "spool" / "pid" / "master.pid").exists() or \
        not _alive(int((workdir / "w" / "postfix" / "spool" / "pid" / "master.pid").read_text().strip() or 0))


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
