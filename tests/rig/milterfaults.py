"""Helpers for the milter-mode fault suite (tests/reliability/test_faults_milter.py).

`FaultMilterDeployment` is the integration rig's `MilterDeployment` (real
``lamsonfilter milter`` process, real private Postfix with the shipped
conf/postfix/*.milter snippets, `CaptureServer` as the final destination)
plus a handler module ``lffault`` written into the deployment's app
directory (`FAULT_HANDLER`).  It adds:

* routes that behave badly on purpose: ``slow-SECONDS@lists.example.org``
  sleeps, then delivers (a handler slower than the deadline); ``slowreply-SECONDS@lists.example.org``
  sleeps, then queues a reply to the sender and consumes the message;
  ``boom-eom@lists.example.org`` is routed and then fails in the runtime (an exception
  inside a milter callback);
* fault hooks keyed on magic addresses, installed by the handler module
  inside the real milter process (it is imported there when the
  application loads), so that each reply-bearing milter callback meets an
  unexpected exception exactly where a bug would raise one:

  =====================================  ==========================================
  address                                raises in
  =====================================  ==========================================
  MAIL ``boom-envfrom@...``              the milter's transaction → envfrom
  RCPT ``boom-envrcpt@example.net``      ``Runtime.check_recipient`` → envrcpt
  RCPT ``boom-data@example.net``         ``Runtime.process`` called by data
  RCPT ``boom-eom@lists.example.org``    ``Runtime.process`` called by eom
  RCPT ``boom-match@lists.example.org``  ``Router.match`` (RCPT check, DATA, EOM)
  =====================================  ==========================================

  (A sender longer than 254 octets is refused at MAIL FROM with
  ``501 5.1.7``: a permanent problem of the client's, not an exception.)
  Every injected exception carries `SECRET`, so a test can prove that no
  reply text leaks it.  Mail to any other address is untouched;

* ``LF_TEST_APP_DEADLINE`` and ``LF_TEST_COMMIT_GRACE`` in `filter_env` set
  lamsonfilter.milterparts.callbacks' ``APP_DEADLINE`` and ``COMMIT_GRACE`` (seconds) in
  that process, so its deadline can be exercised in seconds instead of 100;
* `content_timeout` overrides Postfix's milter content timeout (both in
  ``smtpd_milters`` and ``milter_content_timeout``).

Mail is injected and counted with tests/rig/accounting.py
(`Injector`, `account`); `proc_stats` samples threads, RSS and open
files of the milter from /proc (they must stay flat while callbacks fail).

Safety: everything stays on 127.0.0.1 or in the deployment's work
directory; every wait is bounded; only the filter PID this deployment
started is signalled.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tests.rig.deploy import LIST_HOST
from tests.rig.deploy_milter import MilterDeployment
from tests.rig.handlers import handler_source

__all__ = ["FAULT_HANDLER", "LIST_HOST", "SECRET", "FaultMilterDeployment", "ProcStats", "proc_stats"]

#: Put into every injected exception's text; must never appear in an SMTP reply.
SECRET = "lffault-secret-7f3a"

#: The fault-injection handler (tests/fixtures/handlers/lffault.py); its SECRET is the one above.
FAULT_HANDLER = handler_source("lffault")
assert f'SECRET = "{SECRET}"' in FAULT_HANDLER


class FaultMilterDeployment(MilterDeployment):
    """`MilterDeployment` + the ``lffault`` handler module, optionally a shorter content timeout."""

    extra_handlers = ("lffault",)
    #: A SIGKILLed milter may have claimed the outbox message it had just committed (M4); another
    #: worker takes it over when the claim's lease has passed: 15 s here, not the default 5 minutes.
    extra_settings = "OUTBOX_LEASE = 15.0\n"

    def __init__(self, *, content_timeout: str | None = None, socket_kind: str = "unix") -> None:
        super().__init__(socket_kind=socket_kind)
        self.content_timeout = content_timeout
        self.fault_dir = self.workdir / "faults"
        self.fault_dir.mkdir()

    def postfix_main_cf(self) -> dict[str, str | None]:
        params = super().postfix_main_cf()
        if self.content_timeout is not None:
            milters = params["smtpd_milters"]
            assert milters is not None and "content_timeout=" in milters, milters
            params["smtpd_milters"] = re.sub(r"content_timeout=\w+", f"content_timeout={self.content_timeout}",
                                             milters)
            params["milter_content_timeout"] = self.content_timeout
        return params

    # ------------------------------------------------------------ fault points (lamsonfilter/devtools/faults.py)
    def restart_with_fault(self, point: str) -> Path:
        """Restart the milter armed at `point`; returns the marker file it writes when reached."""
        self.stop_filter()
        marker = self.fault_dir / f"{point}.reached"
        marker.unlink(missing_ok=True)
        self.filter_env.update(LAMSONFILTER_FAULT_POINTS=point, LAMSONFILTER_FAULT_DIR=str(self.fault_dir))
        self.start_filter()
        return marker

    def restart_clean(self) -> None:
        """Start the milter again without any fault point (after `kill_filter`)."""
        for name in ("LAMSONFILTER_FAULT_POINTS", "LAMSONFILTER_FAULT_DIR"):
            self.filter_env.pop(name, None)
        self.start_filter()

    @property
    def filter_pid(self) -> int:
        assert self.filter_proc is not None and self.filter_proc.poll() is None, "the milter is not running"
        return self.filter_proc.pid

    def all_filter_logs(self) -> str:
        """Every run's log (start_filter renames the previous one to filter.log.N)."""
        return "".join(p.read_text(errors="replace") for p in sorted(self.workdir.glob("filter.log*")))


# ---------------------------------------------------------------- the milter process
@dataclass(frozen=True)
class ProcStats:
    threads: int
    rss_kib: int
    fds: int

    def __str__(self) -> str:
        return f"threads={self.threads} rss={self.rss_kib} KiB fds={self.fds}"


def proc_stats(pid: int) -> ProcStats:
    """Threads, resident memory and open file descriptors of `pid`, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return ProcStats(
        threads=int(fields["Threads"].strip()),
        rss_kib=int(fields["VmRSS"].split()[0]),
        fds=len(list(Path(f"/proc/{pid}/fd").iterdir())),
    )
