"""Deployments whose application defers (``ctx.defer()``), in both modes, and a look at their queue.

`deferral_deployment(mode)` is the mode's `Deployment` (tests/rig/deploy_milter.py or
deploy_smtpproxy.py) plus the fixture handler ``lfdefer``
(tests/fixtures/handlers/lfdefer.py: ``slow@lists.example.org`` defers, and
delivers when run from the queue).  The queue is the application's default,
``var/queue`` inside the app directory, so the test also checks that
default.  `break_queue` makes it unwritable even for root (a regular file
where the directory should be; the filter runs as root in the rig) and
`mend_queue` puts the directory back with what it held.  `run_deq` runs
``lamsonfilter deq --once`` over it, sending through the deployment's outbox
listener (so the capture server sees what deq delivers).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from lamsonfilter.mailqueue.maildir import MailQueue
from tests.rig.deploy import Deployment
from tests.rig.modes import deployment_class

__all__ = ["DeferralMixin", "deferral_deployment"]

class DeferralMixin:
    """Adds ``lfdefer`` to the deployment's application; the queue's helpers."""

    extra_handlers: tuple[str, ...] = ("lfdefer",)

    app_dir: Path
    relay_port: int
    _prepared: bool

    @property
    def queue_dir(self) -> Path:
        return self.app_dir / "var" / "queue"  # the QUEUE setting's default

    @property
    def queue(self) -> MailQueue:
        return MailQueue(self.queue_dir)

    def queued(self) -> list[str]:
        """The names waiting in the queue's ``new/``."""
        return sorted(self.queue.scan())

    def break_queue(self) -> None:
        """Make the queue unwritable for the filter (root too): a file where the directory was."""
        aside = self.queue_dir.with_name("queue.aside")
        if self.queue_dir.is_dir():
            self.queue_dir.rename(aside)
        self.queue_dir.parent.mkdir(parents=True, exist_ok=True)
        self.queue_dir.write_text("the queue is broken on purpose (tests/rig/deferral.py)\n")

    def mend_queue(self) -> None:
        """Undo `break_queue`: the directory back, with whatever it held."""
        self.queue_dir.unlink()
        aside = self.queue_dir.with_name("queue.aside")
        if aside.is_dir():
            aside.rename(self.queue_dir)

    def drop_queue(self) -> None:
        shutil.rmtree(self.queue_dir, ignore_errors=True)

    def run_deq(self) -> tuple[int, int, int]:
        """``lamsonfilter deq --once`` on the application (its default queue), sending through the
        deployment's outbox listener (an smtpd that filters nothing); its summary
        (processed, waiting for a retry, quarantined)."""
        proc = subprocess.run(
            [sys.executable, "-m", "lamsonfilter", "deq", "--app", str(self.app_dir), "--once",
             "--relay", f"127.0.0.1:{self.relay_port}"],
            capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, f"deq: {proc.returncode}\n{proc.stdout}{proc.stderr}"
        m = re.search(r"^deq: (\d+) processed, (\d+) waiting for a retry, (\d+) quarantined$", proc.stderr,
                      re.MULTILINE)
        assert m, proc.stderr
        return int(m.group(1)), int(m.group(2)), int(m.group(3))


def deferral_deployment(mode: str) -> Deployment:
    """A (not yet started) deployment of `mode` with the deferring handler."""
    base = deployment_class(mode)
    cls: Any = type(f"Deferral{base.__name__}", (DeferralMixin, base), {})
    dep: Deployment = cls()
    return dep
