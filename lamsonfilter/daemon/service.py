"""Running as a systemd service: readiness, status, watchdog, reload, and journald logging.

Both daemons use one `Service`:

    service = Service()              # a clean no-op when not started by systemd
    setup_logging(verbose)           # journald with structured fields under systemd, else stderr
    service.ready("listening on unix:/run/lamsonfilter/milter.sock")
    service.start_watchdog()         # pings at half of WatchdogSec, in a thread
    ...
    service.stopping()

Notifications go through systemd-python (``systemd.daemon.notify``).  When
``NOTIFY_SOCKET`` is not set, every call does nothing.  When it is set but
systemd-python is not installed, start-up says so once and goes on without
notifications (the unit's ``Type=notify`` would then time out: install the
``systemd`` extra).

`Runtime.reload` (called on SIGHUP) builds the application anew from its
directory and swaps it in only if it starts; with broken code the old
application keeps running and the reason is logged and shown in ``STATUS=``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any, Callable

__all__ = ["Service", "setup_logging", "JOURNAL_FIELDS"]

log = logging.getLogger("lamsonfilter")

#: Structured journald fields lamsonfilter log records may carry (``extra=``).
JOURNAL_FIELDS = ("QUEUE_ID", "ROUTES", "DECISION", "DURATION_MS", "TRANSPORT")


def _notifier() -> Callable[[str], Any] | None:
    if not os.environ.get("NOTIFY_SOCKET"):
        return None
    try:
        from systemd import daemon
    except ImportError:
        log.warning("NOTIFY_SOCKET is set but systemd-python is not installed: "
                    "no readiness notification (pip install 'lamsonfilter[systemd]')")
        return None
    notify: Callable[[str], Any] = daemon.notify
    return notify


class Service:
    """sd_notify for one daemon; every method is a no-op outside systemd."""

    def __init__(self) -> None:
        self._notify = _notifier()
        self._watchdog: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def active(self) -> bool:
        return self._notify is not None

    def _send(self, text: str) -> None:
        if self._notify is not None:
            try:
                self._notify(text)
            except OSError as exc:  # the manager went away; nothing to do
                log.debug("sd_notify failed: %s", exc)

    def ready(self, status: str) -> None:
        self._send(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self._send(f"STATUS={status}")

    def reloading(self) -> None:
        self._send("RELOADING=1\nSTATUS=reloading")

    def reloaded(self, status: str) -> None:
        """The end of a reload, good or refused: sd_notify(3) wants READY=1 after RELOADING=1."""
        self._send(f"READY=1\nSTATUS={status}")

    def stopping(self) -> None:
        self._stop.set()
        self._send("STOPPING=1\nSTATUS=stopping")

    def watchdog_interval(self) -> float | None:
        """Half of the unit's WatchdogSec (systemd's advice), or None when not asked for."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return max(int(usec) / 2_000_000, 0.05)
        except ValueError:
            return None

    def start_watchdog(self, healthy: Callable[[], bool] = lambda: True) -> None:
        """Ping WATCHDOG=1 at half the interval while `healthy()` says so."""
        interval = self.watchdog_interval()
        if self._notify is None or interval is None or self._watchdog is not None:
            return

        def run() -> None:
            while not self._stop.wait(interval):
                if healthy():
                    self._send("WATCHDOG=1")

        self._watchdog = threading.Thread(target=run, name="lamsonfilter-watchdog", daemon=True)
        self._watchdog.start()


def setup_logging(verbose: int = 0) -> None:
    """Log to journald when systemd started us, else to stderr.

    Under journald, the upper-case ``extra=`` fields of a record (`JOURNAL_FIELDS`)
    become journal fields: ``journalctl -u lamsonfilter-milter QUEUE_ID=4XyZ``.
    """
    level = max(logging.INFO - 10 * verbose, logging.DEBUG)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler | None = None
    if os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"):
        try:
            from systemd import journal

            handler = journal.JournalHandler(SYSLOG_IDENTIFIER="lamsonfilter")
        except ImportError:
            handler = None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        # outside journald nothing else stamps the lines: the time, to the millisecond, in UTC
        formatter = logging.Formatter("%(asctime)s.%(msecs)03dZ lamsonfilter[%(process)d]: %(levelname)s %(message)s",
                                      datefmt="%Y-%m-%dT%H:%M:%S")
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(level)
