"""Queue mode's Postfix side: the shipped conf/postfix/main.cf.queue makes a real Postfix deliver the
application's domains into the queue with virtual(8), in the form `MailQueue` reads.

A private Postfix on loopback (tests/rig/queue.py applies the shipped lines), mail sent to it over
SMTP; what lands in the queue directory is read back with `MailQueue.claim`, as ``deq`` does.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import stat
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lamsonfilter.mailqueue.maildir import MailQueue, QueuedMessage
from tests.rig.fixtures import PostfixFactory
from tests.rig.postfix import CaptureServer, PrivatePostfix, free_port, wait_for
from tests.rig.queue import QUEUE_OWNER, QueueSpool, queue_main_cf, queue_master_cf

pytestmark = pytest.mark.postfix

WAIT = 60.0
LIST = "python@lists.example.org"


@dataclass
class QueuePostfix:
    postfix: PrivatePostfix
    spool: QueueSpool
    outbox_port: int

    def send(self, sender: str, rcpts: list[str], raw: bytes) -> None:
        with smtplib.SMTP("127.0.0.1", self.postfix.smtpd_port, local_hostname="client.example.com",
                          timeout=30) as s:
            refused = s.sendmail(sender, rcpts, raw)
        assert not refused, refused

    def wait_queued(self, count: int) -> list[Path]:
        """Wait until `count` files are in the queue's new/ and Postfix's own queue is empty."""
        files = wait_for(lambda: (f if len(f := self.spool.files()) >= count else []), WAIT,
                         message=lambda: f"{count} files in {self.spool.queue}/new; {self.postfix.maillog_tail()}")
        self.postfix.wait_for(lambda: not self.postfix.queue(), WAIT)
        assert len(self.spool.files()) == count, self.spool.files()
        return files

    def claim_all(self) -> dict[str, QueuedMessage]:
        """Every queued message claimed, by recipient."""
        queue = MailQueue(self.spool.queue)
        queue.ensure()
        claimed = [queue.claim(name) for name in list(queue.scan())]
        assert all(m is not None for m in claimed)
        return {m.recipient: m for m in claimed if m is not None}


@pytest.fixture
def qpf(postfix_factory: PostfixFactory, capture: CaptureServer) -> Iterator[QueuePostfix]:
    # not below tmp_path: virtual(8) works as the queue's owner, who must reach the directory
    top = Path(tempfile.mkdtemp(prefix="lf-q-", dir="/tmp"))
    top.chmod(0o755)
    try:
        spool = QueueSpool(top / "lamsonfilter")
        outbox = free_port()
        pf = postfix_factory(relay_port=capture.port, main_cf=queue_main_cf(spool),
                             master_cf_extra=queue_master_cf(outbox))
        yield QueuePostfix(pf, spool, outbox)
    finally:
        if os.environ.get("LF_RIG_KEEP") != "1":
            shutil.rmtree(top, ignore_errors=True)


def message(subject: str, to: str = LIST, sender: str = "alice@example.com", body: str = "hello") -> bytes:
    return "\r\n".join([f"From: {sender}", f"To: {to}", f"Subject: {subject}",
                         f"Message-ID: <{uuid.uuid4().hex}@example.com>", "", body, ""]).encode()


def test_mail_for_the_domain_lands_in_the_queue_with_its_envelope(qpf: QueuePostfix) -> None:
    raw = message("to the list")
    qpf.send("alice@example.com", [LIST], raw)
    (path,) = qpf.wait_queued(1)
    # virtual(8) wrote it as the queue's owner (the uid of virtual_uid_maps), readable by it only
    st = path.stat()
    assert (st.st_uid, st.st_gid) == (qpf.spool.uid, qpf.spool.gid)
    assert stat.S_IMODE(st.st_mode) == 0o600
    # virtual(8) made the Maildir itself, as that user, private (README.rst's "Queue set-up")
    for d in (qpf.spool.queue, *(qpf.spool.queue / sub for sub in ("tmp", "new", "cur"))):
        assert (d.stat().st_uid, stat.S_IMODE(d.stat().st_mode)) == (qpf.spool.uid, 0o700), d
    data = path.read_bytes()
    assert data.startswith(b"Return-Path: <alice@example.com>\nX-Original-To: python@lists.example.org\n"
                           b"Delivered-To: python@lists.example.org\n"), data[:200]

    (msg,) = qpf.claim_all().values()
    assert (msg.sender, msg.recipient, msg.attempts) == ("alice@example.com", LIST, 0)
    # the message below the envelope lines: Postfix's Received: on top, the bytes sent below it
    assert msg.raw.startswith(b"Received: from client.example.com")
    assert b"Return-Path:" not in msg.raw and b"Delivered-To:" not in msg.raw
    assert msg.raw.endswith(raw.split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n"))
    assert b"\nSubject: to the list\n" in msg.raw
    maillog = qpf.postfix.maillog()
    assert "status=sent (delivered to maildir)" in maillog
    assert "warning:" not in maillog, maillog  # e.g. "do not list domain ... in BOTH ..."


def test_each_recipient_gets_its_own_file_bcc_included(qpf: QueuePostfix) -> None:
    """One message to two list addresses, one of them only in the envelope (Bcc): two queue files,
    each with its one recipient; the Bcc recipient appears in no header."""
    bcc = "python-subscribe@lists.example.org"
    qpf.send("alice@example.com", [LIST, bcc], message("two recipients"))
    qpf.wait_queued(2)
    by_rcpt = qpf.claim_all()
    assert sorted(by_rcpt) == sorted([LIST, bcc])
    for msg in by_rcpt.values():
        assert msg.sender == "alice@example.com"
        assert bcc.encode() not in msg.raw  # neither in To: nor in an envelope line left behind
        assert b"Subject: two recipients" in msg.raw
    assert by_rcpt[LIST].name != by_rcpt[bcc].name


def test_the_null_sender_and_an_address_in_capitals(qpf: QueuePostfix) -> None:
    """A bounce (MAIL FROM:<>) keeps its empty sender; the recipient is the address as the client
    wrote it (virtual(8) folds case only for its lookups: the catch-all matches it)."""
    qpf.send("", ["Python-Bounce@Lists.Example.ORG"], message("a bounce", sender="MAILER-DAEMON@example.net"))
    (path,) = qpf.wait_queued(1)
    assert path.read_bytes().startswith(b"Return-Path: <>\nX-Original-To: Python-Bounce@Lists.Example.ORG\n")
    (msg,) = qpf.claim_all().values()
    assert (msg.sender, msg.recipient) == ("", "Python-Bounce@Lists.Example.ORG")


def test_other_domains_are_not_queued(qpf: QueuePostfix, capture: CaptureServer) -> None:
    """Only the application's domains go to the queue: other mail is relayed as before."""
    qpf.send("alice@example.com", ["bob@example.net", LIST], message("mixed", to="bob@example.net"))
    qpf.wait_queued(1)
    (got,) = capture.wait_for_count(1, timeout=WAIT)
    assert got.rcpt_tos == ("bob@example.net",)
    assert list(qpf.claim_all()) == [LIST]


def test_the_outbox_listener_relays_out_and_holds_mail_for_the_own_domains(
        qpf: QueuePostfix, capture: CaptureServer) -> None:
    """master.cf.queue's listener (settings RELAY) takes deq's outbox: mail to others goes out; mail to
    the application's own domains is put on hold, not delivered into the queue again (a loop)."""
    def outbox(rcpt: str, subject: str) -> None:
        with smtplib.SMTP("127.0.0.1", qpf.outbox_port, local_hostname="lamsonfilter.localdomain",
                          timeout=30) as s:
            assert not s.sendmail("", [rcpt], message(subject, to=rcpt))

    outbox("alice@example.com", "confirm")
    outbox("python-confirm-x@lists.example.org", "back to itself")
    (got,) = capture.wait_for_count(1, timeout=WAIT)
    assert got.rcpt_tos == ("alice@example.com",)
    held = qpf.postfix.wait_for(lambda: [m for m in qpf.postfix.queue() if m["queue_name"] == "hold"], WAIT)
    assert [r["address"] for r in held[0]["recipients"]] == ["python-confirm-x@lists.example.org"]
    assert "sent back to its own domain by lamsonfilter deq" in qpf.postfix.maillog()
    assert qpf.spool.files() == []
    # the same address from outside (port 25) is the application's mail: into the queue
    qpf.send("alice@example.com", ["python-confirm-x@lists.example.org"], message("from outside"))
    qpf.postfix.wait_for(lambda: qpf.spool.files(), WAIT)


def test_check_finds_nothing_wrong_in_the_queue_setup(qpf: QueuePostfix, tmp_path: Path) -> None:
    """`lamsonfilter check --postfix-config` knows queue mode: the shipped lines raise no finding;
    without their check_policy_service (this rig's Postfix runs no deq) it names PF307."""
    from tests.rig.deploy import EXAMPLE

    def pf_findings() -> tuple[list[str], str]:
        proc = subprocess.run(
            [sys.executable, "-m", "lamsonfilter.cli", "check", "--app", str(EXAMPLE),
             "--database", f"sqlite:///{tmp_path}/state.db", "--postfix-config", str(qpf.postfix.config_dir),
             "--relay", f"127.0.0.1:{qpf.outbox_port}", "--user", QUEUE_OWNER],
            capture_output=True, text=True, timeout=120, check=False)
        return [line for line in proc.stdout.splitlines() if line.startswith("PF")], proc.stdout + proc.stderr

    lines, out = pf_findings()
    assert [line.split(" ", 1)[0] for line in lines] == ["PF307"], out
    shipped = queue_main_cf(qpf.spool, policy_port=free_port())["smtpd_recipient_restrictions"]
    subprocess.run(["postconf", "-c", str(qpf.postfix.config_dir), "-e", f"smtpd_recipient_restrictions={shipped}"],
                   check=True, capture_output=True, timeout=60)
    lines, out = pf_findings()
    assert lines == [], out


def test_without_the_spool_directory_postfix_keeps_the_mail(qpf: QueuePostfix) -> None:
    """virtual(8) cannot make /var/spool/lamsonfilter itself (it works as the queue's owner): the
    message is deferred, kept in Postfix's queue, and delivered once the directory is there."""
    qpf.spool.path.rmdir()
    qpf.send("alice@example.com", [LIST], message("early"))
    qpf.postfix.wait_for(lambda: "status=deferred" in qpf.postfix.maillog(), WAIT)
    assert [m["queue_name"] for m in qpf.postfix.queue()] == ["deferred"]
    QueueSpool(qpf.spool.path)  # what the unit's ExecStartPre and install-server.sh do
    (path,) = qpf.wait_queued(1)
    assert b"Subject: early" in path.read_bytes()
    assert "status=bounced" not in qpf.postfix.maillog()
