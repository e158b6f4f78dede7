"""``systemctl reload`` of the content filter completes: after ``RELOADING=1`` comes ``READY=1``
(sd_notify(3)), for a reload that worked and for one that was refused (old application kept)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.rig.postfix import free_port
from tests.rig.service import HANDLER, Notifications, make_app


def test_smtpproxy_reload_ends_with_ready(tmp_path: Path) -> None:
    try:
        import systemd.daemon  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-python is required in CI")
        pytest.skip("systemd-python not installed")
    app = make_app(tmp_path)
    notify = Notifications(tmp_path / "notify")
    env = {**os.environ, "NOTIFY_SOCKET": notify.path}
    env.pop("WATCHDOG_USEC", None)
    env.pop("WATCHDOG_PID", None)
    with open(tmp_path / "daemon.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lamsonfilter", "smtpproxy", "--app", str(app),
             "--listen", f"127.0.0.1:{free_port()}", "--reinject", f"127.0.0.1:{free_port()}"],
            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        notify.wait_for("READY=1")
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING=1")
        done = notify.wait_for("READY=1")
        assert "STATUS=listening on" in done

        (app / "app" / "handlers" / "svc.py").write_text(HANDLER + "\ndef broken(:\n")
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING=1")
        refused = notify.wait_for("READY=1")
        assert "STATUS=reload refused" in refused and "SyntaxError" in refused
        proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1")
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        notify.close()
