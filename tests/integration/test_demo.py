"""The main-job command: `lamsonfilter demo` starts the example list behind a private Postfix.

As a new user would try it: start it, send a subscription with SMTP, find
the confirmation request in the demo's mailbox, press Ctrl-C, and see that
everything it started is gone.  And as a new user stops it: Ctrl-C with the
output piped through ``tee`` (which dies too, so the demo's stdout is a
broken pipe), SIGTERM, closing the terminal (SIGHUP), or SIGKILL followed by
the next run; and from a directory that holds a clone named ``lamsonfilter``.
"""

import json
import os
import shlex
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from lamsonfilter.devtools import procinfo
from lamsonfilter.devtools.demo import STATE_FILE, stop_leftovers
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
        # the `send` command the banner prints works as printed, from any directory
        line = next(l for l in banner.splitlines() if " send --server" in l and "python@" in l)
        argv = shlex.split(line.split("#")[0])
        assert argv[1] == "send" and Path(argv[0]).is_absolute()
        argv[argv.index("--from") + 1] = "carol@example.com"
        sent = subprocess.run(argv, cwd="/", capture_output=True, text=True, timeout=120, check=False)
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
    assert text.rstrip().splitlines()[-1] == f"stopped; removed {workdir / 'w'}"
    assert not (workdir / "w").exists()
    assert not port_accepts(port)
    assert not (workdir / "w" / "postfix" / "spool" / "pid" / "master.pid").exists() or \
        not _alive(int((workdir / "w" / "postfix" / "spool" / "pid" / "master.pid").read_text().strip() or 0))
    shutil.rmtree(workdir)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ------------------------------------------------------------------ stopping, whatever the way


def _start(cwd, *args, argv=None):
    """Start the demo in its own session, stdout and stderr to a pipe; return (proc, workdir, port)."""
    base = Path(tempfile.mkdtemp(prefix="lf-demo-", dir="/tmp"))
    os.chmod(base, 0o755)
    work, port = base / "w", free_port()
    proc = subprocess.Popen(
        (argv or [sys.executable, "-m", "lamsonfilter"]) + ["demo", "--dir", str(work), "--port", str(port), *args],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    return proc, work, port


def _wait_ready(proc, work, port):
    """Wait for the demo's record and its port; return the record."""
    state = work / STATE_FILE

    def ready():
        if proc.poll() is not None:
            raise AssertionError(f"the demo exited with {proc.returncode}: {proc.stdout.read().decode()}")
        if not state.exists():
            return None
        record = json.loads(state.read_text())
        return record if record["processes"]["postfix"] and port_accepts(port) else None

    return wait_for(ready, 120, message="the demo to be ready")


def _assert_all_gone(record, work):
    """No process the demo started is left (by PID and start time, and their sessions), no port
    is listening, and the work directory is gone."""
    left = [(name, entry[0]) for name, entry in record["processes"].items()
            if entry and procinfo.same_process(*entry)]
    assert not left, f"processes left: {left}"
    for sid in record["sessions"]:
        assert not procinfo.session_members(sid), [procinfo.command_line(p) for p in procinfo.session_members(sid)]
    assert [p for p in record["ports"] if port_accepts(p)] == []
    assert not work.exists(), sorted(p.name for p in work.iterdir())


def _clean_up(proc, work):
    """After a failed test: stop what is left, by the demo's own record (never by name)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    proc.stdout.close()
    if (work / STATE_FILE).exists():
        stop_leftovers(work)
    try:
        work.parent.rmdir()
    except OSError:
        pass


@pytest.mark.parametrize("sig,mode", [(signal.SIGINT, "content-filter"), (signal.SIGTERM, "milter"),
                                      (signal.SIGHUP, "content-filter")],
                         ids=["ctrl-c", "sigterm", "sighup"])
def test_demo_stops_everything_it_started_when_its_output_is_a_broken_pipe(sig, mode):
    """`make run 2>&1 | tee run.log`, then Ctrl-C: tee dies with the demo, so every write the
    demo makes while stopping hits a broken pipe; closing the terminal sends SIGHUP."""
    require("postfix", "postconf", root=True)
    proc, work, port = _start("/", "--mode", mode)  # from any directory: --app defaults to the example list
    try:
        record = _wait_ready(proc, work, port)
        assert {"demo", "postfix", "lamsonfilter"} <= {k for k, v in record["processes"].items() if v}
        assert record["processes"]["demo"][0] == proc.pid
        proc.stdout.close()  # the reader is gone: the next write raises BrokenPipeError (EPIPE)
        os.killpg(proc.pid, sig)  # as the terminal does: to the whole foreground process group
        status = proc.wait(90)
        _assert_all_gone(record, work)
        assert status == 0
    finally:
        _clean_up(proc, work)


def test_a_killed_demo_is_named_by_the_next_run_and_stop_cleans_up():
    """SIGKILL leaves Postfix and lamsonfilter running; the next run says by what its port is
    taken and how to stop it, and the command it gives does so."""
    require("postfix", "postconf", root=True)
    proc, work, port = _start(ROOT)
    try:
        record = _wait_ready(proc, work, port)
        proc.kill()
        proc.wait(10)
        again = subprocess.run([sys.executable, "-m", "lamsonfilter", "demo", "--port", str(port)],
                               cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
        assert again.returncode == 2
        message = again.stderr.strip()
        assert len(message.splitlines()) == 1, message
        assert f"127.0.0.1:{port} is in use by the Postfix of an earlier demo" in message
        assert f"master pid {record['processes']['postfix'][0]}" in message
        # the same work directory on another port: its record is not wiped, the leftovers are named
        other = subprocess.run([sys.executable, "-m", "lamsonfilter", "demo", "--dir", str(work),
                                "--port", str(free_port())],
                               cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
        assert other.returncode == 2
        assert f"an earlier demo in {work} left postfix (pid {record['processes']['postfix'][0]}), " \
               f"lamsonfilter (pid {record['processes']['lamsonfilter'][0]}) running" in other.stderr
        assert f"demo --stop {work}" in other.stderr and (work / STATE_FILE).exists()
        command = message.split("with: ", 1)[1].split("  (", 1)[0]
        argv = shlex.split(command)
        assert Path(argv[0]).is_absolute() and argv[1:] == ["demo", "--stop", str(work)]
        stopped = subprocess.run(argv, cwd="/", capture_output=True, text=True, timeout=120, check=False)
        assert stopped.returncode == 0, stopped.stderr
        assert "stopped Postfix" in stopped.stdout and "stopped lamsonfilter" in stopped.stdout
        record["processes"]["demo"] = None  # killed above
        _assert_all_gone(record, work)
    finally:
        _clean_up(proc, work)


def test_demo_of_a_generated_app_next_to_a_clone():
    """From a directory holding a clone named lamsonfilter (the cwd must not shadow the installed
    package): `lamsonfilter demo` of a `gen`-erated application starts, its banner is made from
    that application (its route, no mailing list), its commands work from any directory, and
    Ctrl-C stops it."""
    require("postfix", "postconf", root=True)
    here = Path(tempfile.mkdtemp(prefix="lf-clone-", dir="/tmp"))
    (here / "lamsonfilter").symlink_to(ROOT)  # the clone, next to the applications
    script = str(Path(sys.executable).parent / "lamsonfilter")
    gen = subprocess.run([script, "gen", "helpdesk"], cwd=here, capture_output=True, text=True, timeout=60,
                         check=False)
    assert gen.returncode == 0, gen.stderr
    printed = next(l.split(":", 1)[1] for l in gen.stdout.splitlines() if l.strip().startswith("demo:"))
    assert printed.split("(")[0].split() == ["lamsonfilter", "demo", "--app", "helpdesk"]
    proc, work, port = _start(here, "--app", "helpdesk", argv=[script])
    try:
        _wait_ready(proc, work, port)
        out = b""
        while b"\nready\n" not in out:
            chunk = proc.stdout.read1(65536)
            assert chunk, out.decode()
            out += chunk
        banner = out.decode()
        assert "helpdesk" in banner and "hello@helpdesk.example.org" in banner
        assert "python-subscribe" not in banner and "lists.example.org" not in banner
        assert "confirmation" not in banner
        commands = [shlex.split(l.split("#")[0]) for l in banner.splitlines() if l.startswith("  swaks ")
                    or " send --server" in l]
        assert commands and all(Path(a[0]).is_absolute() or a[0] == "swaks" for a in commands)
        argv = next(a for a in commands if a[1:2] == ["send"])
        sent = subprocess.run(argv, cwd="/", capture_output=True, text=True, timeout=120, check=False)
        assert sent.returncode == 0, (argv, sent.stdout, sent.stderr)
        inbox = work / "mail" / "inbox" / "new"
        wait_for(lambda: [p for p in inbox.glob("*") if b"To: alice@example.com" in p.read_bytes()]
                 if inbox.is_dir() else [], 60, message="the skeleton's reply in the demo mailbox")
        record = json.loads((work / STATE_FILE).read_text())
        os.killpg(proc.pid, signal.SIGINT)
        rest = proc.stdout.read().decode()
        assert proc.wait(90) == 0
        assert rest.strip().splitlines()[-1] == f"stopped; removed {work}"
        _assert_all_gone(record, work)
    finally:
        _clean_up(proc, work)
        shutil.rmtree(here)


def test_when_lamsonfilter_dies_the_demo_stops_postfix_and_keeps_the_log():
    require("postfix", "postconf", root=True)
    proc, work, port = _start(ROOT)
    try:
        record = _wait_ready(proc, work, port)
        os.kill(record["processes"]["lamsonfilter"][0], signal.SIGKILL)  # ours: recorded with its start time
        status = proc.wait(90)
        out = proc.stdout.read().decode()
        assert status == 1, out
        lines = out.rstrip().splitlines()
        assert lines[-2].startswith("lamsonfilter exited (status -9); see ")
        assert lines[-1] == f"stopped; kept {work} for its logs"
        assert (work / "lamsonfilter.log").exists()
        assert not procinfo.same_process(*record["processes"]["postfix"])
        assert not port_accepts(port)
    finally:
        _clean_up(proc, work)
        shutil.rmtree(work, ignore_errors=True)
        try:
            work.parent.rmdir()
        except OSError:
            pass
