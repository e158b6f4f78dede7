"""The example help desk end to end through a real private Postfix, in milter and content-filter mode.

Open a ticket at support@, answer it as the staff at support+ticket-N@,
close it at support+close-N@, write to a ticket that does not exist: each
message goes through Postfix and the filter, each answer comes back through
Postfix to the capture server, and the ticket rows are read from the
application's database (the one the filter wrote, created by ``lamsonfilter
db init`` with the help desk's tables).
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
from collections.abc import Iterator
from email.utils import parseaddr
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from lamsonfilter.settings import load_settings, resolve_database_url
from tests.rig.deploy import ROOT, Deployment
from tests.rig.fixtures import require
from tests.rig.modes import deployment_class, started
from tests.rig.postfix import free_port, wait_for

pytestmark = pytest.mark.postfix

EXAMPLE = ROOT / "examples" / "helpdesk"
HOST = "support.example.org"
SUPPORT = f"support@{HOST}"
ALICE = "alice@example.com"
BOB = "bob@example.net"
STAFF = "staff@example.com"


def helpdesk_app(target: Path) -> None:
    """A copy of examples/helpdesk (without its database or its tests)."""
    shutil.copytree(EXAMPLE, target, ignore=shutil.ignore_patterns("var", "__pycache__", "*.db", "tests"))


@pytest.fixture(params=["milter", "smtpproxy"])
def desk(request: pytest.FixtureRequest) -> Iterator[Deployment]:
    """The help desk behind a private Postfix, in the mode of the parameter."""
    with started(deployment_class(request.param)(app=helpdesk_app)) as dep:
        yield dep


def rows(dep: Deployment, query: str, **params: Any) -> list[dict[str, Any]]:
    """Rows of the application's database (the filter's), as dicts."""
    settings = load_settings(dep.app_dir)
    engine = create_engine(resolve_database_url(settings["DATABASE_URL"], settings["APP_DIR"]))
    try:
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(text(query), params)]
    finally:
        engine.dispose()


def ticket(dep: Deployment, number: int) -> dict[str, Any]:
    (row,) = rows(dep, "SELECT * FROM helpdesk_ticket WHERE number = :n", n=number)
    return row


def kept(dep: Deployment, number: int) -> list[dict[str, Any]]:
    return rows(dep, "SELECT m.* FROM helpdesk_message m JOIN helpdesk_ticket t ON t.id = m.ticket_id "
                     "WHERE t.number = :n ORDER BY m.id", n=number)


def test_open_answer_close_through_postfix(desk: Deployment) -> None:
    # open: the requester gets the number, the staff a copy
    desk.assert_accepted(desk.send(ALICE, [SUPPORT], "The printer prints blank pages", "Since this morning.\n"))
    (opened,) = desk.wait_for_mail(ALICE, subject_contains="The printer prints blank pages")
    subject = str(opened.message["Subject"])
    m = re.fullmatch(r"\[#(\d+)\] The printer prints blank pages", subject)
    assert m, subject
    number = int(m.group(1))
    ticket_addr = f"support+ticket-{number}@{HOST}"
    assert parseaddr(str(opened.message["From"]))[1] == ticket_addr
    assert opened.mail_from in ("", "<>") and opened.message["Auto-Submitted"] == "auto-replied"
    (copy,) = desk.wait_for_mail(STAFF, subject_contains=f"[#{number}]")
    assert "Since this morning." in copy.message.get_content()
    row = ticket(desk, number)
    assert (row["requester"], row["status"], row["closed_at"]) == (ALICE, "open", None)
    [first] = kept(desk, number)
    assert first["sender"] == ALICE and "Since this morning." in first["body"]
    assert b"Since this morning." in first["raw"] and first["message_id"].endswith("@client.example.test>")

    # the staff answers at the ticket's address: kept, and sent on to the requester
    desk.assert_accepted(desk.send(STAFF, [ticket_addr], f"Re: {subject}", "Turn it off and on.\n"))
    answers = desk.wait_for_mail(ALICE, subject_contains=f"[#{number}]", count=2)
    assert "Turn it off and on." in answers[-1].message.get_content()
    assert [k["sender"] for k in kept(desk, number)] == [ALICE, STAFF]

    # the requester closes it
    desk.assert_accepted(desk.send(ALICE, [f"support+close-{number}@{HOST}"], "done", "Works now.\n"))
    (closed,) = desk.wait_for_mail(ALICE, subject_contains=f"Closed: [#{number}]")
    assert "is closed" in closed.message.get_content()
    row = ticket(desk, number)
    assert row["status"] == "closed" and row["closed_at"] is not None
    assert len(kept(desk, number)) == 3

    # a reply to the closed ticket is answered, not kept
    desk.assert_accepted(desk.send(ALICE, [ticket_addr], "one more thing", "and the scanner?\n"))
    (late,) = desk.wait_for_mail(ALICE, subject_contains="one more thing")
    assert "was closed" in late.message.get_content()
    desk.settle()
    assert len(kept(desk, number)) == 3


def test_unknown_tickets_and_addresses(desk: Deployment) -> None:
    desk.assert_accepted(desk.send(BOB, [f"support+ticket-4242@{HOST}"], "Re: [#4242] old", "news?\n"))
    (answer,) = desk.wait_for_mail(BOB, subject_contains="[#4242]")
    assert "there is no ticket #4242" in answer.message.get_content()
    unknown = f"sales@{HOST}"
    desk.assert_rejected_unknown(desk.send(BOB, [unknown], "hello"), unknown)
    desk.settle()
    assert rows(desk, "SELECT * FROM helpdesk_ticket") == []
    assert rows(desk, "SELECT * FROM helpdesk_message") == []
    assert desk.messages_to(unknown) == []


def test_a_stranger_cannot_close_a_ticket(desk: Deployment) -> None:
    desk.assert_accepted(desk.send(ALICE, [SUPPORT], "VPN down", "It says error 809.\n"))
    (opened,) = desk.wait_for_mail(ALICE, subject_contains="VPN down")
    number = int(str(opened.message["Subject"]).split("]")[0].removeprefix("[#"))
    desk.assert_accepted(desk.send(BOB, [f"support+close-{number}@{HOST}"], "close it", "close\n"))
    (refusal,) = desk.wait_for_mail(BOB, subject_contains="close it")
    assert "only the person who opened" in refusal.message.get_content()
    assert ticket(desk, number)["status"] == "open"
    assert len(kept(desk, number)) == 1


@pytest.mark.parametrize("mode", ["milter", "content-filter"])
def test_the_demo_runs_the_help_desk(mode: str) -> None:
    """``make run APP=examples/helpdesk``: the demo creates the help desk's tables, and what its
    banner says to try works -- a ticket is opened and answered into the demo's mailbox."""
    require("postfix", "postconf", root=True)
    base = Path(tempfile.mkdtemp(prefix="lf-hd-demo-", dir="/tmp"))
    os.chmod(base, 0o755)
    work, port = base / "w", free_port()
    out = open(base / "demo.out", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lamsonfilter", "demo", "--app", str(EXAMPLE), "--mode", mode,
         "--dir", str(work), "--port", str(port)],
        cwd="/", stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_for(lambda: "ready" in (base / "demo.out").read_text() or proc.poll() is not None, 120,
                 message="the demo to be ready")
        banner = (base / "demo.out").read_text()
        assert proc.poll() is None, banner
        assert f"--to support@{HOST}" in banner and "helpdesk.NEW" in banner
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            smtp.sendmail(ALICE, [SUPPORT], f"From: {ALICE}\r\nTo: {SUPPORT}\r\nSubject: printer on fire\r\n"
                          "Message-ID: <hd-demo-1@example.com>\r\n\r\nhelp\r\n".encode())
        inbox = work / "mail" / "inbox" / "new"
        wait_for(lambda: inbox.is_dir() and len(list(inbox.glob("*"))) >= 2, 60,
                 message="the answer and the staff's copy in the demo's mailbox")
        found = [p.read_bytes() for p in inbox.glob("*")]
        assert any(b"To: alice@example.com" in m and b"Subject: [#1] printer on fire" in m for m in found)
        assert any(b"To: staff@example.com" in m for m in found)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        out.close()
    assert proc.returncode == 0, (base / "demo.out").read_text()
    assert not work.exists()
    shutil.rmtree(base)
