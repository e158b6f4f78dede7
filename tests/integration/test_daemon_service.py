"""The daemons as systemd runs them: READY/WATCHDOG/STOPPING on a real NOTIFY_SOCKET, and a
SIGHUP reload that swaps the code while a message is in flight (the message is still handled).
"""

import os
import re
import signal
import smtplib
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lamsonfilter.settings import make_storage
from tests.rig.fixtures import require, skip_or_fail
from tests.rig.postfix import CaptureServer, free_port, port_accepts, wait_for
from tests.rig.service import HANDLER, Notifications, make_app

ROOT = Path(__file__).resolve().parents[2]



def message(subject: str) -> bytes:
    return f"Subject: {subject}\r\nMessage-ID: <{subject}@t>\r\n\r\nhi\r\n".encode()


def send(port: int, rcpt: str, results: list, subject: str = "x") -> None:
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=120) as s:
            s.sendmail("alice@example.com", [rcpt], f"Subject: {subject}\r\nMessage-ID: <{subject}@t>\r\n\r\nhi\r\n".encode())
        results.append("ok")
    except Exception as exc:  # noqa: BLE001 -- reported by the test
        results.append(exc)


def test_smtpproxy_notifies_systemd_and_reloads_with_a_message_in_flight(tmp_path):
    try:
        import systemd.daemon  # noqa: F401
    except ImportError:
        skip_or_fail("systemd-python is not installed")
    app = make_app(tmp_path)
    notify = Notifications(tmp_path / "notify")
    capture = CaptureServer().start()
    port = free_port()
    env = {**os.environ, "NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "400000"}
    env.pop("WATCHDOG_PID", None)
    log = open(tmp_path / "daemon.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lamsonfilter", "smtpproxy", "--app", str(app), "--listen", f"127.0.0.1:{port}",
         "--reinject", f"127.0.0.1:{capture.port}"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        ready = notify.wait_for("READY=1")
        assert f"MAINPID={proc.pid}" in ready and "STATUS=listening on" in ready
        notify.wait_for("WATCHDOG=1")
        notify.wait_for("WATCHDOG=1")
        assert port_accepts(port)

        results: list = []
        inflight = threading.Thread(target=send, args=(port, "hold@lists.example.org", results, "held"))
        inflight.start()
        wait_for(lambda: (tmp_path / "started").exists(), 60, message="the held message to reach its handler")
        handler = app / "app" / "handlers" / "svc.py"
        handler.write_text(HANDLER.replace('VERSION = "one"', 'VERSION = "two"'))
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING=1")
        notify.wait_for("STATUS=listening on")  # back to normal after the reload
        (tmp_path / "go").touch()
        inflight.join(120)
        assert results == ["ok"]

        send(port, "tag@lists.example.org", results, "after")
        assert results == ["ok", "ok"]
        msgs = capture.wait_for_count(2, timeout=60)
        versions = {m.message["Subject"]: m.message["X-Version"] for m in msgs}
        assert versions == {"held": "one", "after": "two"}  # in flight: old code; next: new code

        # broken code: refused, the old application keeps running
        handler.write_text(HANDLER + "\ndef broken(:\n")
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING=1")
        refused = notify.wait_for("STATUS=reload refused")
        assert "SyntaxError" in refused
        send(port, "tag@lists.example.org", results, "still")
        assert results[-1] == "ok"
        assert capture.wait_for_count(3, timeout=60)[-1].message["X-Version"] == "two"

        proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1")
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
        capture.stop()
        notify.close()


#: SIGHUPs in a row the milter must take as reloads, none of them taken by libmilter's
#: own signal thread (which would stop the milter).
RELOADS = 10


def require_milter_and_systemd() -> None:
    try:
        import Milter  # noqa: F401
        import systemd.daemon  # noqa: F401
    except ImportError as exc:
        skip_or_fail(f"{exc.name} is not installed")


def start_milter(tmp_path, notify, sock, log, **env_extra):
    """`lamsonfilter milter` on a unix socket in tmp_path, notifying `notify`."""
    env = {**os.environ, "NOTIFY_SOCKET": notify.path, **env_extra}
    env.pop("WATCHDOG_PID", None)
    return subprocess.Popen(
        [sys.executable, "-m", "lamsonfilter", "milter", "--app", str(make_app(tmp_path)), "--socket",
         f"unix:{sock}", "--relay", f"127.0.0.1:{free_port()}", "--socket-group", "root"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )


def test_milter_notifies_systemd_ready_watchdog_reload_and_stopping(tmp_path):
    require_milter_and_systemd()
    notify = Notifications(tmp_path / "notify")
    sock = tmp_path / "m.sock"
    log = open(tmp_path / "milter.log", "w")
    proc = start_milter(tmp_path, notify, sock, log, WATCHDOG_USEC="400000")
    try:
        ready = notify.wait_for("READY=1")
        assert f"MAINPID={proc.pid}" in ready and f"listening on unix:{sock}" in ready
        assert sock.exists()
        notify.wait_for("WATCHDOG=1")
        notify.wait_for("WATCHDOG=1")
        # libmilter's own signal thread sigwait()s for all three signals and stops the milter
        # at any of them; each of these must reach lamsonfilter's main thread instead
        for _ in range(RELOADS):
            proc.send_signal(signal.SIGHUP)
            notify.wait_for("RELOADING=1")
            notify.wait_for("STATUS=reloaded")
        assert proc.poll() is None, "a SIGHUP stopped the milter instead of reloading it"
        proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1")
        assert proc.wait(60) == 0
        assert not sock.exists()
        assert "libmilter stopped by itself" not in (tmp_path / "milter.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
        notify.close()


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_milter_stopped_right_after_ready_exits_cleanly(tmp_path, signame):
    """A stop signal in the start-up window (READY sent, main thread not yet waiting) is kept
    and honoured: exit status 0, not libmilter stopping on its own."""
    require_milter_and_systemd()
    notify = Notifications(tmp_path / "notify")
    sock = tmp_path / "m.sock"
    with open(tmp_path / "milter.log", "w") as log:
        proc = start_milter(tmp_path, notify, sock, log)
        try:
            notify.wait_for("READY=1")
            proc.send_signal(getattr(signal, signame))
            assert proc.wait(60) == 0, (tmp_path / "milter.log").read_text()
            assert not sock.exists()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            notify.close()


def _unit_command(unit: Path, env: dict[str, str]) -> list[str]:
    """The unit's ExecStart as argv, ${VARS} expanded from its Environment= lines overridden by `env`."""
    values: dict[str, str] = {}
    command = ""
    for line in unit.read_text().splitlines():
        if line.startswith("Environment="):
            name, _, value = line[len("Environment="):].partition("=")
            values[name] = value
        elif line.startswith("ExecStart="):
            command = line[len("ExecStart="):]
    values.update(env)
    argv = command.split()
    return [re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], a) for a in argv[1:]]


@pytest.mark.parametrize("unit_name", ["lamsonfilter-smtpproxy.service", "lamsonfilter-milter.service",
                                       "lamsonfilter-deq.service"])
def test_the_units_command_runs_with_a_read_only_application_directory(tmp_path, unit_name):
    """ProtectSystem=strict leaves only the state directory writable: the unit's own command line
    must put everything the daemon writes there (the smtpproxy's quarantine used to default to
    APP/var/quarantine and the daemon exited at start).  The application directory is made
    read-only with a bind mount in a private mount namespace, as systemd's sandbox does."""
    require("unshare", root=True)  # root: a private mount namespace
    require_milter_and_systemd()
    app = make_app(tmp_path)
    state = tmp_path / "state"  # stands in for /var/lib/lamsonfilter (StateDirectory)
    state.mkdir()
    env = {
        "LAMSONFILTER_APP": str(app),
        "LAMSONFILTER_LISTEN": f"127.0.0.1:{free_port()}",
        "LAMSONFILTER_REINJECT": f"127.0.0.1:{free_port()}",
        "LAMSONFILTER_POLICY": f"127.0.0.1:{free_port()}",
        "LAMSONFILTER_QUARANTINE": str(state / "quarantine"),
        "LAMSONFILTER_MILTER_SOCKET": f"unix:{state / 'milter.sock'}",
        "LAMSONFILTER_QUEUE": str(state / "spool" / "queue"),  # stands in for /var/spool/lamsonfilter/queue
        "LAMSONFILTER_RELAY": f"127.0.0.1:{free_port()}",
    }
    unit = ROOT / "conf" / "systemd" / unit_name
    text = unit.read_text()
    env = {name: value for name, value in env.items() if f"${{{name}}}" in text}  # the unit's own
    args = _unit_command(unit, env)
    args = [a.replace("/var/lib/lamsonfilter", str(state)).replace("/run/lamsonfilter", str(state)) for a in args]
    database = f"sqlite:///{state}/state.db"
    storage = make_storage(database, app)
    storage.create_schema()
    storage.close()
    notify = Notifications(tmp_path / "notify")
    script = ('mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" && shift && exec "$@"')
    with open(tmp_path / "daemon.log", "w") as log:
        proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(app),
             sys.executable, "-m", "lamsonfilter", *args, "--database", database],
            env={**os.environ, "NOTIFY_SOCKET": notify.path}, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            notify.wait_for("READY=1")
            assert proc.poll() is None, (tmp_path / "daemon.log").read_text()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0, (tmp_path / "daemon.log").read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            notify.close()
    assert "Read-only file system" not in (tmp_path / "daemon.log").read_text()


def test_deq_notifies_systemd_and_reloads_with_a_message_in_flight(tmp_path):
    """`lamsonfilter deq` as its unit runs it (Type=notify, WatchdogSec, ExecReload=kill -HUP): READY with
    its PID, watchdog pings, a reload while a queued message is in its handler (that one finishes with
    the old code, the next runs the new), broken code refused, STOPPING and exit 0 at SIGTERM."""
    try:
        import systemd.daemon  # noqa: F401
    except ImportError:
        skip_or_fail("systemd-python is not installed")
    from lamsonfilter.mailqueue.maildir import MailQueue

    app = make_app(tmp_path)
    notify = Notifications(tmp_path / "notify")
    capture = CaptureServer().start()
    queue = MailQueue(tmp_path / "queue")
    queue.ensure()
    env = {**os.environ, "NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "400000"}
    env.pop("WATCHDOG_PID", None)
    log = open(tmp_path / "deq.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lamsonfilter", "deq", "--app", str(app), "--queue", str(queue.path),
         "--relay", f"127.0.0.1:{capture.port}", "--quarantine", str(tmp_path / "quarantine")],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )

    def deq_log() -> str:
        return (tmp_path / "deq.log").read_text(errors="replace")

    try:
        try:
            ready = notify.wait_for("READY=1")
        except TimeoutError:
            raise AssertionError(f"deq did not start (exit status {proc.poll()}):\n{deq_log()}") from None
        assert f"MAINPID={proc.pid}" in ready, deq_log()
        notify.wait_for("WATCHDOG=1")
        notify.wait_for("WATCHDOG=1")

        queue.put(message("held"), "alice@example.com", "hold@lists.example.org")
        wait_for(lambda: (tmp_path / "started").exists(), 60, message=lambda: f"the held message's handler; {deq_log()}")
        handler = app / "app" / "handlers" / "svc.py"
        handler.write_text(HANDLER.replace('VERSION = "one"', 'VERSION = "two"'))
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING=1")
        (tmp_path / "go").touch()
        assert "reload refused" not in notify.wait_for("READY=1")
        queue.put(message("after"), "alice@example.com", "tag@lists.example.org")
        msgs = capture.wait_for_count(2, timeout=60)
        versions = {m.message["Subject"]: m.message["X-Version"] for m in msgs}
        assert versions == {"held": "one", "after": "two"}  # in flight: old code; next: new code

        # broken code: refused, the old application keeps running
        handler.write_text(HANDLER + "\ndef broken(:\n")
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING=1")
        assert "SyntaxError" in notify.wait_for("STATUS=reload refused")
        queue.put(message("still"), "alice@example.com", "tag@lists.example.org")
        assert capture.wait_for_count(3, timeout=60)[-1].message["X-Version"] == "two"
        wait_for(lambda: sum(queue.count().values()) == 0, 60, message=lambda: f"an empty queue; {deq_log()}")

        proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1")
        assert proc.wait(60) == 0, deq_log()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
        capture.stop()
        notify.close()
