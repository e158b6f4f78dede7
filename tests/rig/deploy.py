"""A lamsonfilter deployment behind a real private Postfix, the same for every mode.

The integration scenarios are written once against `Deployment` and run in
each mode (``milter``: deploy_milter.py; ``smtpproxy``: deploy_smtpproxy.py)::

    with MilterDeployment() as dep:
        result = dep.send("alice@example.com", ["python-subscribe@lists.example.org"], "join", "hi")
        dep.assert_accepted(result)
        confirm = dep.wait_for_mail("alice@example.com", subject_contains="Confirm")

What the base class does for every mode:

* builds the application in a fresh ``/tmp/lf-MODE-*`` directory: by
  default (`lftest_app`) a copy of examples/mailinglist plus the handler
  module ``lftest`` (`TEST_HANDLER`): ``tag@lists.example.org`` adds
  ``X-Lamsonfilter-Test: tagged`` and delivers, ``crash@lists.example.org``
  raises; or whatever the ``app`` builder given makes; then appends
  ``RELAY`` (the outbox listener's port) and the ``settings`` given, and
  runs ``lamsonfilter db init``;
* starts a `CaptureServer` (the final destination of *all* mail: Postfix
  relays everything there; or uses the ``capture`` server given, which its
  owner starts and stops, e.g. one shared by several hosts), writes the
  configuration of a `PrivatePostfix` wired as the mode says
  (`postfix_main_cf`, `postfix_master_cf`), starts the filter process
  (`filter_command`), then Postfix;
* sends mail with smtplib to Postfix's smtpd and records every reply
  (`SendResult`), so a scenario can ask where a transaction failed.

A mode subclass says how its filter runs and how the client sees a
temporary failure or an unknown address (`assert_tempfailed`,
`assert_rejected_unknown`): a milter answers inside the client's SMTP
session, a content filter only after Postfix has queued the message.

Safety: everything listens on 127.0.0.1 or in the work directory; every
wait is bounded; only the PIDs this object started are signalled.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

from lamsonfilter.settings import load_settings, make_storage
from lamsonfilter.state import StateStorage
from tests.rig.handlers import handler_source
from tests.rig.postfix import (
    CapturedMessage,
    CaptureServer,
    PrivatePostfix,
    free_port,
    wait_for,
)
from tests.rig.submission import Reply, SendResult, reply_text, smtp_transaction

__all__ = ["LIST_HOST", "MAIL_TIMEOUT", "ROOT", "TEST_HANDLER", "Deployment", "lftest_app", "read_main_cf",
           "wait_quiet"]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "mailinglist"
LIST_HOST = "lists.example.org"

#: Upper bound for any wait on mail (seconds); generous, never a timing assertion.
MAIL_TIMEOUT = 60.0

#: The scenarios' extra routes (tests/fixtures/handlers/lftest.py).
TEST_HANDLER = handler_source("lftest")

#: Builds an application in the directory it is given (the return value is not used).
AppBuilder = Callable[[Path], object]


def lftest_app(target: Path) -> None:
    """The scenarios' application: examples/mailinglist plus the ``lftest`` handler."""
    shutil.copytree(EXAMPLE, target, ignore=shutil.ignore_patterns("var", "__pycache__", "*.db"))
    (target / "app" / "handlers" / "lftest.py").write_text(TEST_HANDLER)
    with open(target / "config" / "settings.py", "a") as f:
        f.write('\n# added by tests/rig/deploy.py\nHANDLERS = HANDLERS + ["lftest"]\n')


def read_main_cf(path: Path) -> dict[str, str]:
    """``name = value`` lines of a main.cf snippet (continuation lines joined, comments dropped)."""
    params: dict[str, str] = {}
    name = None
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace() and name is not None:
            params[name] += " " + line.strip()
            continue
        m = re.match(r"^([A-Za-z0-9_]+)\s*=\s*(.*)$", line)
        assert m, f"{path}: not a main.cf line: {line!r}"
        name = m.group(1)
        params[name] = m.group(2).strip()
    return params


def wait_quiet(seconds: float) -> None:
    """A bounded pause where a test must show that something does *not* happen."""
    time.sleep(seconds)


class Deployment(ABC):
    """lamsonfilter + a private Postfix + a capture server, in one work directory."""

    mode: ClassVar[str]
    #: Fixture handlers (tests/fixtures/handlers/NAME.py) a kind of deployment adds to the app's HANDLERS.
    extra_handlers: ClassVar[tuple[str, ...]] = ()
    #: Settings a kind of deployment appends to the app's config/settings.py.
    extra_settings: ClassVar[str] = ""

    def __init__(self, *, app: AppBuilder = lftest_app, settings: str = "",
                 capture: CaptureServer | None = None) -> None:
        """`app` builds the application, `settings` is appended to its config/settings.py;
        `capture` is a destination server its owner starts and stops (default: one of our own)."""
        # not below pytest's tmp_path: its 0700 ancestors are closed to the postfix user
        self.workdir = Path(tempfile.mkdtemp(prefix=f"lf-{self.mode}-", dir="/tmp"))
        self.workdir.chmod(0o755)
        self.app_dir = self.workdir / "app"
        self.app_builder = app
        self.app_settings = settings
        self.relay_port = free_port()  # the outbox listener: an smtpd that filters nothing
        self.capture = capture if capture is not None else CaptureServer()
        self._own_capture = capture is None
        self.postfix: PrivatePostfix | None = None
        self.filter_proc: subprocess.Popen[bytes] | None = None
        self.filter_log = self.workdir / "filter.log"
        self._prepared = False
        self._capture_started = False
        self._terminated = False  # SIGTERM already sent to the filter
        self._storage: StateStorage | None = None  # the app's state database, read by `outbox_due`
        #: extra environment for the filter process, e.g. lamsonfilter/devtools/faults.py's
        #: LAMSONFILTER_FAULT_POINTS; read at each start_filter()
        self.filter_env: dict[str, str] = {}

    # ------------------------------------------------------------ the application
    def prepare_app(self) -> None:
        """Build the app, add `extra_handlers`, point RELAY at the outbox listener, add the settings
        (`extra_settings`, then this deployment's), db init."""
        if self._prepared:
            return
        self.app_builder(self.app_dir)
        for name in self.extra_handlers:
            (self.app_dir / "app" / "handlers" / f"{name}.py").write_text(handler_source(name))
        with open(self.app_dir / "config" / "settings.py", "a") as f:
            f.write("\n# added by tests/rig/deploy.py\n")
            if self.extra_handlers:
                f.write(f"HANDLERS = HANDLERS + {list(self.extra_handlers)!r}\n")
            f.write(f'RELAY = "127.0.0.1:{self.relay_port}"\n{self.extra_settings}{self.app_settings}')
        # every deployment runs db init, as an operator setting up host after host would
        proc = subprocess.run(
            [sys.executable, "-m", "lamsonfilter.cli", "db", "init", "--app", str(self.app_dir)],
            capture_output=True, text=True, timeout=120, check=False,
        )
        assert proc.returncode == 0, f"lamsonfilter db init failed:\n{proc.stdout}{proc.stderr}"
        self._prepared = True

    # ------------------------------------------------------------ lifecycle
    def start(self) -> Self:
        """App, capture server (our own), Postfix's configuration, filter, Postfix -- in that order."""
        self.prepare_app()
        if self._own_capture and not self._capture_started:
            self.capture.start()
            self._capture_started = True
        self.configure_postfix()
        self.start_filter()
        self.start_postfix()
        return self

    def stop(self) -> None:
        """Stop everything this deployment started and remove its directory (LF_RIG_KEEP=1 keeps it)."""
        if self.filter_proc is not None and self.filter_proc.poll() is None:
            self.filter_proc.send_signal(signal.SIGTERM)  # it winds down while Postfix stops
            self._terminated = True
        try:
            if self.postfix is not None:
                self.postfix.stop()
        finally:
            try:
                self.stop_filter()
            finally:
                if self._capture_started:
                    self.capture.stop()
                    self._capture_started = False
                if self._storage is not None:
                    self._storage.close()
                    self._storage = None
                if os.environ.get("LF_RIG_KEEP") != "1":
                    shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # ------------------------------------------------------------ the filter process
    @abstractmethod
    def filter_command(self) -> list[str]:
        """argv of the filter daemon (started with the work directory as cwd)."""

    @abstractmethod
    def filter_ready(self) -> bool:
        """True once the filter accepts connections from Postfix."""

    def start_filter(self, timeout: float = 30.0) -> None:
        assert self.filter_proc is None or self.filter_proc.poll() is not None, "filter already running"
        log = open(self.filter_log, "ab")
        try:
            self.filter_proc = subprocess.Popen(
                self.filter_command(), cwd=self.workdir, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.filter_env},
            )
        finally:
            log.close()
        proc = self.filter_proc
        wait_for(
            lambda: proc.poll() is not None or self.filter_ready(), timeout,
            message=lambda: f"the {self.mode} filter to start; its log:\n{self.filter_log_tail()}",
        )
        assert proc.poll() is None, f"the {self.mode} filter exited with {proc.returncode}:\n{self.filter_log_tail()}"

    def stop_filter(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the filter we started and wait for it (SIGKILL at the end); its exit status."""
        proc, self.filter_proc = self.filter_proc, None
        terminated, self._terminated = self._terminated, False
        if proc is None:
            return None
        if proc.poll() is None:
            if not terminated:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        return proc.returncode

    def kill_filter(self) -> None:
        """SIGKILL the filter process this deployment started (nothing else), and reap it."""
        proc = self.filter_proc
        assert proc is not None and proc.poll() is None, "no running filter to kill"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def filter_output(self) -> str:
        """Everything the filter process logged so far (empty before it first ran)."""
        try:
            return self.filter_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def filter_log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.filter_log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no filter log)"

    # ------------------------------------------------------------ Postfix
    @abstractmethod
    def postfix_main_cf(self) -> dict[str, str | None]:
        """main.cf parameters for this mode (on top of the rig's defaults)."""

    @abstractmethod
    def postfix_master_cf(self) -> str:
        """master.cf lines for this mode: at least the outbox listener on `relay_port`."""

    @property
    def pf(self) -> PrivatePostfix:
        """The private Postfix (once `start` or `configure_postfix` made it)."""
        assert self.postfix is not None, "Postfix is not configured yet"
        return self.postfix

    def configure_postfix(self) -> PrivatePostfix:
        """The private Postfix, its configuration written (not started); made once."""
        if self.postfix is None:
            self.postfix = PrivatePostfix(
                self.workdir / "postfix", smtpd_port=free_port(), relay_port=self.capture.port,
                main_cf=self.postfix_main_cf(), master_cf_extra=self.postfix_master_cf(),
            )
        return self.postfix

    def start_postfix(self) -> None:
        self.configure_postfix().start()

    # ------------------------------------------------------------ mail
    def send(self, sender: str, rcpts: list[str], subject: str, body: str = "test\n",
             headers: dict[str, str] | None = None) -> SendResult:
        """One SMTP transaction with Postfix's smtpd; never raises for SMTP errors."""
        assert self.postfix is not None, "Postfix is not running"
        msg = EmailMessage()
        msg["From"] = sender
        msg["To"] = ", ".join(rcpts)
        msg["Subject"] = subject
        msg["Message-ID"] = f"<{uuid.uuid4().hex}@client.example.test>"
        for name, value in (headers or {}).items():
            msg[name] = value
        msg.set_content(body)
        return self.send_message_bytes(sender, rcpts, msg.as_bytes(policy=SMTP))

    def send_message_bytes(self, sender: str, rcpts: list[str], raw: bytes) -> SendResult:
        """One SMTP transaction with Postfix's smtpd carrying `raw` as is; never raises for SMTP errors."""
        assert self.postfix is not None, "Postfix is not running"
        result = SendResult()
        try:
            with smtplib.SMTP("127.0.0.1", self.postfix.smtpd_port,
                              local_hostname="client.example.test", timeout=60) as smtp:
                code, text = smtp.ehlo()
                result.replies.append(Reply("EHLO", code, reply_text(text)))
                smtp_transaction(smtp, sender, rcpts, raw, result)
        except (smtplib.SMTPException, OSError) as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        return result

    def submit(self, sender: str, rcpts: list[str], raw: bytes) -> SendResult:
        """`send_message_bytes`, asserting that Postfix took the message for every recipient."""
        result = self.send_message_bytes(sender, rcpts, raw)
        assert result.accepted and not result.refused and result.error is None, (
            f"Postfix did not take the message for all of {rcpts}: {result}\n{self.diagnostics()}")
        return result

    def messages_to(self, rcpt: str, subject_contains: str = "") -> list[CapturedMessage]:
        """Mail that reached the destination for `rcpt` (case-insensitive), optionally by subject."""
        rcpt = rcpt.lower()
        return [
            m for m in self.capture.messages
            if rcpt in (r.lower() for r in m.rcpt_tos) and subject_contains in str(m.message.get("Subject", ""))
        ]

    def wait_for_mail(self, rcpt: str, subject_contains: str = "", count: int = 1,
                      timeout: float = MAIL_TIMEOUT) -> list[CapturedMessage]:
        """Wait until `count` matching messages reached the destination; return them."""
        def enough() -> list[CapturedMessage]:
            found = self.messages_to(rcpt, subject_contains)
            return found if len(found) >= count else []

        return wait_for(
            enough,
            timeout,
            message=lambda: (f"{count} message(s) to {rcpt} with {subject_contains!r} in the Subject; "
                             f"{self.diagnostics()}"),
        )

    def settle(self, timeout: float = MAIL_TIMEOUT) -> None:
        """Wait until the mail accepted so far has gone where it was going.

        1. The filter's outbox holds nothing due (its replies and list posts
           were handed to Postfix; skipped while the filter is not running).
        2. A marker is sent through the same path (to an address no route
           takes) and reaches the destination.
        3. Postfix holds nothing in ``incoming`` or ``active``: what it took
           before the marker is delivered or deferred.

        Mail accepted before and still not at the destination afterwards was
        not going to arrive: a bounded way to check that something did *not*
        happen, without sleeping.  (Without step 1 a reply the filter was
        still handing to Postfix could arrive just after the marker.)
        """
        if self.filter_proc is not None and self.filter_proc.poll() is None:
            wait_for(lambda: self.outbox_due() == 0, timeout,
                     message=lambda: f"the filter's outbox to drain; {self.diagnostics()}")
        marker = f"marker {uuid.uuid4().hex}"
        result = self.send("marker@example.test", ["sink@example.net"], marker)
        assert result.accepted, f"marker not accepted: {result}"
        self.wait_for_mail("sink@example.net", marker, timeout=timeout)
        if self.messages_to("marker@example.test"):
            raise AssertionError("the marker bounced")
        if self.postfix is not None:
            postfix = self.postfix
            wait_for(lambda: not [m for m in postfix.queue() if m["queue_name"] in ("incoming", "active")],
                     timeout, message=lambda: f"Postfix's incoming and active queues to empty; {self.diagnostics()}")

    def queue_ids(self) -> list[str]:
        """The queue ids of the messages in Postfix's queue."""
        assert self.postfix is not None, "Postfix is not running"
        return [str(m["queue_id"]) for m in self.postfix.queue()]

    def wait_queue_empty(self, timeout: float = MAIL_TIMEOUT) -> None:
        postfix = self.postfix
        assert postfix is not None, "Postfix is not running"
        wait_for(lambda: not postfix.queue(), timeout,
                 message=lambda: f"Postfix's queue to empty; {self.diagnostics()}")

    def wait_maillog(self, count: int, pattern: str, timeout: float = MAIL_TIMEOUT) -> list[str]:
        """Wait until `count` lines of Postfix's maillog match `pattern`; return them."""
        postfix = self.postfix
        assert postfix is not None, "Postfix is not running"
        rx = re.compile(pattern)

        def found() -> list[str]:
            lines = [line for line in postfix.maillog().splitlines() if rx.search(line)]
            return lines if len(lines) >= count else []

        return wait_for(found, timeout, message=lambda: f"{count} maillog lines /{pattern}/; {self.diagnostics()}")

    def outbox_due(self) -> int:
        """Outbox messages of the application that are due and neither sent nor failed
        (read from its state database, as the filter's outbox worker does)."""
        if self._storage is None:
            settings = load_settings(self.app_dir)
            self._storage = make_storage(settings["DATABASE_URL"], settings["APP_DIR"])
        return len(self._storage.pending_outbox(1, due_before=time.time()))

    # ------------------------------------------------------------ mode-specific assertions
    def assert_accepted(self, result: SendResult) -> None:
        """Postfix accepted the message (250 to the final dot)."""
        assert result.accepted, f"not accepted: {result}\n{self.diagnostics()}"

    @abstractmethod
    def assert_tempfailed(self, result: SendResult) -> None:
        """The message was deferred: the client or Postfix will try again later; nothing delivered."""

    @abstractmethod
    def assert_rejected_unknown(self, result: SendResult, address: str) -> None:
        """`address` (at the app's host, no route) was refused, without a bounce to a forged sender."""

    # ------------------------------------------------------------ diagnostics
    def diagnostics(self) -> str:
        parts = [f"--- {self.mode} filter log (tail) ---\n{self.filter_log_tail()}"]
        if self.postfix is not None:
            parts.append(f"--- maillog (tail) ---\n{self.postfix.maillog_tail(40)}")
        parts.append(f"--- captured: {[(m.rcpt_tos, m.message.get('Subject')) for m in self.capture.messages]}")
        return "\n".join(parts)
