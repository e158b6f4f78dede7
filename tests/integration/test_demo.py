"""The main-job command: `lamsonfilter demo` starts the example list behind a private Postfix.

As a new user would try it: start it, send a subscription with SMTP, find
the confirmation request in the demo's mailbox, press Ctrl-C, and see that
everything it started is gone.
"""

import os
import shlex
import signal
import smtplib
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.rig.fixtures import require
from tests.rig.postfix import free_port, port_accepts, wait_for

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.postfix


EXAMPLE_VAR = ROOT / "examples" / "mailinglist" / "var"


@pytest.mark.parametrize("mode", ["milter", "content-filter"])
def test_demo_runs_the_example_list_and_stops_cleanly_on_ctrl_c(mode):
    require("postfix", "postconf", root=True)
    workdir = Path(tempfile.mkdtemp(prefix="lf-demo-", dir="/tmp"))
    os.chmod(workdir, 0o755)
    # what an earlier run left in --dir: must not survive into this run
    stale = workdir / "w" / "mail" / "inbox" / "new" / "stale-from-last-run"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"From: old@example.com\r\n\r\nold\r\n")
    (workdir / "w" / "state.db").write_bytes(b"not a database: an old run's state")
    quarantine_in_source_tree = (EXAMPLE_VAR / "quarantine").exists()
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
        assert f"work directory       {workdir / 'w'}" in banner
        assert not stale.exists()
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
        # the `send` command the banner prints works as printed (from the directory `make run` uses)
        line = next(l for l in banner.splitlines() if " send --server" in l and "python@" in l)
        argv = shlex.split(line.split("#")[0])
        assert argv[1] == "send"
        argv[argv.index("--from") + 1] = "carol@example.com"
        sent = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
        assert sent.returncode == 0, (line, sent.stdout, sent.stderr)
        wait_for(lambda: [p for p in inbox.glob("*") if b"To: carol@example.com" in p.read_bytes()], 60,
                 message="the reply to the post sent with the printed command")
        if mode == "content-filter":
            assert (workdir / "w" / "quarantine" / "new").is_dir()
        assert (EXAMPLE_VAR / "quarantine").exists() == quarantine_in_source_tree
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
