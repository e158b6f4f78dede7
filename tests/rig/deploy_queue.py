"""Queue mode for the integration scenarios: Postfix delivers into the queue, ``lamsonfilter deq`` processes it.

`QueueDeployment` runs a private Postfix configured with the *shipped*
conf/postfix/main.cf.queue and master.cf.queue (tests/rig/queue.py: only
the spool, the owner's numbers and the outbox port replaced), so mail for
lists.example.org is delivered by virtual(8) into ``spool/queue/``, and
``lamsonfilter deq`` as a resident service (ready when it says
``READY=1`` on a NOTIFY_SOCKET, as systemd would hear it) works through
it, sending its outbox to the listener of master.cf.queue.

How queue mode looks to the SMTP client: Postfix asks ``deq --policy`` at
RCPT (the shipped ``check_policy_service``) and accepts the addresses a
route takes (``250``); the application runs later, so

* an unknown list address is refused at RCPT (``550 5.1.1``, from Postfix
  itself), as in the other two modes: nothing queued, nothing bounced
  (``policy=False`` runs ``deq`` without ``--policy``: then it is accepted,
  and ``deq`` puts the message into the quarantine with the reason);
* a failing handler is invisible to the client: ``deq`` keeps the message
  in the queue (``retry/``) and tries again later; nothing is sent.

The queue belongs to `tests.rig.queue.QUEUE_OWNER`, as it belongs to the
``lamsonfilter`` user on a server; ``deq`` runs as root here, so the
queue's folders are made before it starts, owned by that user (``deq``
would otherwise create them as root, and virtual(8) could not write).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lamsonfilter.mailqueue.maildir import MailQueue
from tests.rig.deploy import MAIL_TIMEOUT, Deployment
from tests.rig.submission import SendResult
from tests.rig.postfix import free_port, port_accepts, wait_for
from tests.rig.queue import QueueSpool, queue_main_cf, queue_master_cf
from tests.rig.service import Notifications

__all__ = ["QueueDeployment"]

#: The queue's folders: Maildir's three and MailQueue's claimed/ and retry/.
QUEUE_FOLDERS = ("tmp", "new", "cur", "claimed", "retry")


class QueueDeployment(Deployment):
    mode = "queue"

    def __init__(self, *, policy: bool = True) -> None:
        super().__init__()
        self.policy = policy
        self.policy_port = free_port()
        while self.policy_port == self.relay_port:
            self.policy_port = free_port()
        self.spool = QueueSpool(self.workdir / "spool")
        self.quarantine = self.workdir / "quarantine"
        self.notify: Notifications | None = None
        self._ready = False

    @property
    def queue(self) -> MailQueue:
        return MailQueue(self.spool.queue)

    def prepare_queue(self) -> None:
        """The queue's folders, owned by the queue's owner (what the deq unit's user finds)."""
        for sub in ("", *QUEUE_FOLDERS):
            d = self.spool.queue / sub
            d.mkdir(mode=0o700, exist_ok=True)
            os.chown(d, self.spool.uid, self.spool.gid)

    # ------------------------------------------------------------ the filter process: deq
    def filter_command(self) -> list[str]:
        return [
            sys.executable, "-m", "lamsonfilter.cli", "-v", "deq", "--app", str(self.app_dir),
            "--queue", str(self.spool.queue), "--quarantine", str(self.quarantine),
            "--relay", f"127.0.0.1:{self.relay_port}",
            *(["--policy", f"127.0.0.1:{self.policy_port}"] if self.policy else []),
        ]

    def start_filter(self, timeout: float = 30.0) -> None:
        self.prepare_queue()
        if self.notify is None:
            self.notify = Notifications(self.workdir / "notify")
        self.filter_env["NOTIFY_SOCKET"] = self.notify.path
        self._ready = False
        super().start_filter(timeout)

    def filter_ready(self) -> bool:
        """deq said READY=1 on its NOTIFY_SOCKET (it listens on nothing else)."""
        if not self._ready and self.notify is not None:
            try:
                self.notify.wait_for("READY=1", timeout=0.2)
                self._ready = True
            except TimeoutError:
                pass
        return self._ready and (not self.policy or port_accepts(self.policy_port))

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            if self.notify is not None:
                self.notify.close()
                self.notify = None

    # ------------------------------------------------------------ Postfix
    def postfix_main_cf(self) -> dict[str, str | None]:
        # without --policy the shipped check stays, on a port where nothing listens (default_action DUNNO)
        return queue_main_cf(self.spool, self.policy_port)

    def postfix_master_cf(self) -> str:
        return queue_master_cf(self.relay_port)

    # ------------------------------------------------------------ waiting
    def queue_busy(self) -> int:
        """Messages in new/ or claimed/: delivered by Postfix and not yet finished by deq."""
        counts = self.queue.count()
        return counts["new"] + counts["claimed"]

    def settle(self, timeout: float = MAIL_TIMEOUT) -> None:
        """Postfix delivered what it took (into the queue or on); when deq runs, it finished
        what is queued (a message waiting in retry/ is finished for now) and what it sent went on."""
        super().settle(timeout)
        if self.filter_proc is None or self.filter_proc.poll() is not None:
            return  # deq stopped: the queue keeps what Postfix delivered
        wait_for(lambda: self.queue_busy() == 0, timeout,
                 message=lambda: f"deq to work through its queue {self.queue.count()}; {self.diagnostics()}")
        super().settle(timeout)

    # ------------------------------------------------------------ how the client sees it
    def assert_tempfailed(self, result: SendResult) -> None:
        """Accepted by Postfix (250), delivered into the queue, then held there by deq for a later
        attempt (retry/, one attempt counted); nothing bounced."""
        assert result.accepted, f"Postfix should accept first: {result}\n{self.diagnostics()}"
        wait_for(lambda: [e for e in self.queue.entries(("retry", "new", "claimed")) if e.attempts >= 1],
                 MAIL_TIMEOUT, message=lambda: f"a retry in the queue {self.queue.count()}; {self.diagnostics()}")
        assert "status=bounced" not in (self.postfix.maillog() if self.postfix else "")

    def assert_rejected_unknown(self, result: SendResult, address: str) -> None:
        """550 5.1.1 at RCPT from Postfix itself (deq's policy listener): never queued, so no bounce.
        Without --policy: accepted by Postfix (250), then moved into the quarantine by deq with its
        envelope; no bounce."""
        if self.policy:
            reply = result.rcpt(address)
            assert reply is not None and reply.code == 550 and "5.1.1" in reply.text, (
                f"expected 550 5.1.1 for RCPT <{address}>: {result}\n{self.diagnostics()}")
            assert not [p for p in self.quarantined() if f"<{address}>".encode() in p.read_bytes()]
            return
        assert result.accepted, f"Postfix should accept first: {result}\n{self.diagnostics()}"
        field = f"X-Lamsonfilter-Envelope-To: <{address}>".encode()
        wait_for(lambda: [p for p in self.quarantined() if field in p.read_bytes()], MAIL_TIMEOUT,
                 message=lambda: f"{address} in the quarantine {self.quarantine}; {self.diagnostics()}")

    def quarantined(self) -> list[Path]:
        try:
            return sorted((self.quarantine / "new").iterdir())
        except FileNotFoundError:
            return []

    def diagnostics(self) -> str:
        return f"{super().diagnostics()}\n--- queue: {self.queue.count()}, quarantined: {len(self.quarantined())}"
