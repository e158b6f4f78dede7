"""A private Postfix wired as an after-queue content filter to a real ``lamsonfilter smtpproxy`` process.

    setup = ContentFilterSetup(postfix_factory, capture, app_dir)
    setup.start()                  # Postfix (content_filter + 10026 listener) and the filter
    setup.send("alice@example.com", ["bob@example.net"], raw)   # into Postfix's smtpd
    capture.wait_for_count(1)
    setup.stop_reinjection()       # the 10026 listener leaves master.cf (postfix reload)
    setup.kill_filter()            # SIGKILL of the smtpproxy PID we started
    setup.stop()

The Postfix side is the shipped ``conf/postfix/main.cf.content_filter`` and
``master.cf.content_filter``, with only the two loopback ports changed, so
the tests exercise the files users copy.  Only PIDs started here are
signalled; every wait is bounded.
"""

from __future__ import annotations

import re
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.rig.postfix import (
    CaptureServer,
    PrivatePostfix,
    free_port,
    port_accepts,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf" / "postfix"


def content_filter_main_cf(filter_port: int, lmtp: bool = False) -> dict[str, str]:
    """The main.cf lines of conf/postfix/main.cf.content_filter, with the filter's port."""
    values: dict[str, str] = {}
    for line in (CONF / "main.cf.content_filter").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    transport = "lamsonfilter-lmtp" if lmtp else "lamsonfilter"
    values["content_filter"] = f"{transport}:[127.0.0.1]:{filter_port}"
    return values


def content_filter_master_cf(reinject_port: int) -> str:
    """conf/postfix/master.cf.content_filter with the reinjection listener on `reinject_port`."""
    text = (CONF / "master.cf.content_filter").read_text()
    return text.replace("127.0.0.1:10026 inet", f"127.0.0.1:{reinject_port} inet")


class ContentFilterSetup:
    """Postfix → smtpproxy (subprocess) → Postfix 10026 → `capture`."""

    def __init__(self, postfix_factory: Any, capture: CaptureServer, app_dir: Path, *, lmtp: bool = False,
                 extra_args: tuple[str, ...] = (), main_cf: dict[str, str] | None = None) -> None:
        self.capture = capture
        self.app_dir = app_dir
        self.lmtp = lmtp
        self.extra_args = extra_args
        self.filter_port = free_port()
        self.reinject_port = free_port()
        while self.reinject_port == self.filter_port:
            self.reinject_port = free_port()
        settings = content_filter_main_cf(self.filter_port, lmtp)
        settings.update(main_cf or {})
        self.postfix: PrivatePostfix = postfix_factory(
            relay_port=capture.port, main_cf=settings,
            master_cf_extra=content_filter_master_cf(self.reinject_port), start=False,
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path: Path = Path(self.postfix.workdir) / "log" / "smtpproxy.log"

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "ContentFilterSetup":
        self.postfix.start()
        self.start_filter()
        return self

    def start_filter(self, timeout: float = 30.0) -> None:
        args = [sys.executable, "-m", "lamsonfilter.cli", "-v", "smtpproxy", "--app", str(self.app_dir),
                "--listen", f"127.0.0.1:{self.filter_port}", "--reinject", f"127.0.0.1:{self.reinject_port}",
                *(["--lmtp"] if self.lmtp else []), *self.extra_args]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        log.close()
        proc = self.proc
        wait_for(lambda: proc.poll() is not None or port_accepts(self.filter_port), timeout,
                 message=lambda: f"smtpproxy on {self.filter_port}; log:\n{self.filter_log()}")
        if proc.poll() is not None:
            raise RuntimeError(f"smtpproxy exited with {proc.returncode}:\n{self.filter_log()}")

    def stop_filter(self, sig: int = signal.SIGTERM) -> None:
        """Stop the smtpproxy process we started (by its PID); SIGKILL after 20 s."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        wait_for(lambda: not port_accepts(self.filter_port), 10, message="the filter port to close")

    def kill_filter(self) -> None:
        self.stop_filter(signal.SIGKILL)

    def stop(self) -> None:
        self.stop_filter()
        self.postfix.stop()

    def filter_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    # ------------------------------------------------------------------ the reinjection listener
    def stop_reinjection(self) -> None:
        """Remove the 10026 listener from master.cf and reload: reinjection is refused."""
        self.postfix._run("postconf", "-M#", f"127.0.0.1:{self.reinject_port}/inet")
        self.postfix.reload()
        wait_for(lambda: not port_accepts(self.reinject_port), 20, message="the 10026 listener to go")

    def start_reinjection(self) -> None:
        """Put the listener back (master.cf written anew) and reload."""
        self.postfix.write_config()
        self.postfix.reload()
        wait_for(lambda: port_accepts(self.reinject_port), 20, message="the 10026 listener to return")

    # ------------------------------------------------------------------ traffic and queue
    def send(self, sender: str, recipients: list[str], raw: bytes) -> dict[str, tuple[int, bytes]]:
        """Submit to Postfix's smtpd (as a client on loopback); what smtplib returns."""
        with smtplib.SMTP("127.0.0.1", self.postfix.smtpd_port, local_hostname="client.example.com",
                          timeout=30) as s:
            return s.sendmail(sender, recipients, raw)

    def queue_ids(self) -> list[str]:
        return [str(m["queue_id"]) for m in self.postfix.queue()]

    def wait_deferred(self, count: int, pattern: str = r"status=deferred", timeout: float = 60.0) -> list[str]:
        """Wait until `count` maillog lines match `pattern`; return them."""
        rx = re.compile(pattern)

        def found() -> list[str]:
            lines = [l for l in self.postfix.maillog().splitlines() if rx.search(l)]
            return lines if len(lines) >= count else []

        return self.postfix.wait_for(found, timeout)

    def wait_queue_empty(self, timeout: float = 60.0) -> None:
        self.postfix.wait_for(lambda: not self.postfix.queue(), timeout)


def strip_received(data: bytes) -> bytes:
    """The message minus the Received: fields Postfix put on top (each with its continuation lines)
    and the filter's trace field (lamsonfilter.contentfilter.looptrace) among them."""
    lines = data.split(b"\r\n") if b"\r\n" in data else data.split(b"\n")
    sep = b"\r\n" if b"\r\n" in data else b"\n"
    i = 0
    while i < len(lines) and lines[i].lower().startswith((b"received:", b"x-lamsonfilter-trace:")):
        i += 1
        while i < len(lines) and lines[i][:1] in (b" ", b"\t"):
            i += 1
    return sep.join(lines[i:])


def wait_quiet(seconds: float) -> None:
    """A bounded pause where a test must show that something does *not* happen."""
    time.sleep(seconds)


__all__ = ["ContentFilterSetup", "content_filter_main_cf", "content_filter_master_cf", "strip_received",
           "wait_quiet"]
