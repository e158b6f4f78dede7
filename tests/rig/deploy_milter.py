"""Milter mode for the integration scenarios: ``lamsonfilter milter`` inside Postfix's SMTP session.

`MilterDeployment` starts ``lamsonfilter milter`` as a subprocess on a unix
socket in its work directory (or on a loopback TCP port with
``socket_kind="inet"``) and a private Postfix whose configuration is the
*shipped* snippets, conf/postfix/main.cf.milter and master.cf.milter, with
only the socket path and the outbox listener's port replaced.  So the
scenarios also test what users copy into their Postfix.

How milter mode looks to the SMTP client: an unknown list address is
refused at RCPT (550 5.1.1); a failure inside lamsonfilter, or a milter
that is down, is a 4xx during the session, and Postfix never queues the
message.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest

from tests.rig.deploy import ROOT, Deployment, read_main_cf
from tests.rig.fixtures import in_ci
from tests.rig.postfix import free_port
from tests.rig.submission import SendResult

__all__ = ["MilterDeployment", "require_pymilter", "MAIN_CF", "MASTER_CF"]

MAIN_CF = ROOT / "conf" / "postfix" / "main.cf.milter"
MASTER_CF = ROOT / "conf" / "postfix" / "master.cf.milter"
#: The socket Postfix is told about in the shipped main.cf.milter (chrooted smtpd).
SHIPPED_SOCKET = "unix:/lamsonfilter/milter.sock"
#: The outbox listener's address in the shipped master.cf.milter.
SHIPPED_LISTENER = "127.0.0.1:10026"


def require_pymilter() -> None:
    """Skip when pymilter is not importable (scripts/bootstrap.sh installs it); fail under CI=true."""
    try:
        import Milter  # noqa: F401
    except ImportError as exc:
        reason = f"milter mode needs pymilter ({exc}); run scripts/bootstrap.sh"
        if in_ci():
            pytest.fail(f"{reason} -- CI=true, so this is a failure, not a skip", pytrace=False)
        pytest.skip(reason)


class MilterDeployment(Deployment):
    mode = "milter"

    def __init__(self, socket_kind: str = "unix", **options: Any) -> None:
        """`options`: `Deployment`'s (app, settings, capture)."""
        super().__init__(**options)
        assert socket_kind in ("unix", "inet")
        self.socket_kind = socket_kind
        self.socket_path = self.workdir / "milter.sock"
        self.milter_port = free_port() if socket_kind == "inet" else 0

    @property
    def milter_spec(self) -> str:
        """The socket in libmilter syntax (what ``lamsonfilter milter --socket`` takes)."""
        if self.socket_kind == "inet":
            return f"inet:{self.milter_port}@127.0.0.1"
        return f"unix:{self.socket_path}"

    @property
    def postfix_milter(self) -> str:
        """The same socket as Postfix's smtpd_milters names it (the rig's smtpd is not chrooted)."""
        if self.socket_kind == "inet":
            return f"inet:127.0.0.1:{self.milter_port}"
        return f"unix:{self.socket_path}"

    def filter_command(self) -> list[str]:
        return [
            sys.executable, "-m", "lamsonfilter.cli", "milter",
            "--app", str(self.app_dir), "--socket", self.milter_spec,
            "--relay", f"127.0.0.1:{self.relay_port}",
        ]

    def filter_ready(self) -> bool:
        try:
            return "milter listening on" in self.filter_log.read_text(errors="replace")
        except FileNotFoundError:
            return False

    def start_filter(self, timeout: float = 30.0) -> None:
        # a restarted filter must not be taken for ready because of the last run's log line
        if self.filter_log.exists():
            self.filter_log.rename(self.filter_log.with_name(f"filter.log.{len(list(self.workdir.glob('filter.log*')))}"))
        super().start_filter(timeout)

    def postfix_main_cf(self) -> dict[str, str | None]:
        params: dict[str, str | None] = dict(read_main_cf(MAIN_CF))
        milters = params["smtpd_milters"]
        assert milters is not None and SHIPPED_SOCKET in milters, f"{MAIN_CF}: expected {SHIPPED_SOCKET}"
        params["smtpd_milters"] = milters.replace(SHIPPED_SOCKET, self.postfix_milter)
        local = params.get("non_smtpd_milters") or ""
        params["non_smtpd_milters"] = local.replace(SHIPPED_SOCKET, self.postfix_milter)
        return params

    def postfix_master_cf(self) -> str:
        text = MASTER_CF.read_text()
        assert SHIPPED_LISTENER in text, f"{MASTER_CF}: expected the {SHIPPED_LISTENER} listener"
        return text.replace(SHIPPED_LISTENER, f"127.0.0.1:{self.relay_port}")

    # ------------------------------------------------------------ how the client sees it
    def assert_tempfailed(self, result: SendResult) -> None:
        """A 4xx inside the client's session, and the message never entered Postfix's queue."""
        assert result.temporary, f"expected a 4xx reply: {result}\n{self.diagnostics()}"
        assert not result.accepted, f"accepted although it should have been deferred: {result}"
        postfix = self.postfix
        assert postfix is not None
        assert postfix.queue() == [], f"queued: {postfix.queue()}"

    def assert_rejected_unknown(self, result: SendResult, address: str) -> None:
        """550 5.1.1 at RCPT, during the client's session (no bounce is ever made)."""
        reply = result.rcpt(address)
        assert reply is not None and reply.code == 550 and "5.1.1" in reply.text, (
            f"expected 550 5.1.1 for RCPT <{address}>: {result}\n{self.diagnostics()}")
