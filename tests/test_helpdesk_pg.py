"""The example help desk on one PostgreSQL shared by two filter hosts.

Ticket numbers come from the database (``helpdesk_ticket.id``, a
sequence), so no two tickets share a number however the openings of two
filter hosts interleave: two processes (nothing in memory shared), three
threads each, open tickets at once.  Messages for one ticket serialise on
the ticket's state key, so replies that two `App` objects (each with its
own engine and pool) process at once are all kept, none lost.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, text

from lamsonfilter.app import App
from lamsonfilter.cli import main
from lamsonfilter.mail import MailRequest
from lamsonfilter.settings import load_app
from lamsonfilter.testing import make_message
from tests.rig.storage import pg_admin, pg_url_for

pytestmark = pytest.mark.postgres

APP = Path(__file__).resolve().parents[1] / "examples" / "helpdesk"
HOST = "support.example.org"


@pytest.fixture
def desk_url(pg_schema: str) -> Iterator[str]:
    """A schema of its own on the test server, with `db init`'s tables (framework + help desk)."""
    schema = f"{pg_schema}_hd_{uuid.uuid4().hex[:6]}"
    with pg_admin() as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    url = pg_url_for(schema)
    try:
        r = CliRunner().invoke(main, ["db", "init", "--app", str(APP), "--database", url])
        assert r.exit_code == 0, r.output
        assert "helpdesk_message, helpdesk_ticket" in r.output
        yield url
    finally:
        with pg_admin() as admin:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


def hosts(url: str) -> list[App]:
    return [load_app(APP, {"DATABASE_URL": url}) for _ in range(2)]


def send(app: App, sender: str, rcpt: str, subject: str, body: str = "Hello.\n") -> object:
    request = MailRequest.from_bytes(make_message(sender, rcpt, subject, body), sender=sender, recipients=(rcpt,))
    decision = app.process(request)
    assert not decision.is_tempfail, decision.notes
    return decision


def run_at_once(jobs: list[tuple[App, str, str, str]]) -> list[object]:
    """Run every (app, sender, recipient, subject) in a thread of its own, released together."""
    results: list[object] = [None] * len(jobs)
    errors: list[BaseException] = []
    gate = threading.Barrier(len(jobs))

    def work(i: int, app: App, sender: str, rcpt: str, subject: str) -> None:
        try:
            gate.wait(30)
            results[i] = send(app, sender, rcpt, subject)
        except BaseException as exc:  # noqa: BLE001 -- reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i, *job)) for i, job in enumerate(jobs)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not any(th.is_alive() for th in threads), "a thread did not finish in 120 s"
    assert not errors, errors
    return results


def rows(url: str, query: str) -> list[tuple[object, ...]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(query))]
    finally:
        engine.dispose()


#: One filter host: loads the help desk on the shared database, says "ready", waits for "go" on
#: stdin, then opens its tickets from three threads at once and prints "ticket SUBJECT NUMBER".
HOST_SCRIPT = textwrap.dedent("""
    import re, sys, threading
    from lamsonfilter.mail import MailRequest
    from lamsonfilter.settings import load_app
    from lamsonfilter.testing import make_message

    app_dir, url, name, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    app = load_app(app_dir, {"DATABASE_URL": url})
    print("ready", flush=True)
    assert sys.stdin.readline().strip() == "go"
    lines = []

    def open_tickets(thread):
        for i in range(count):
            subject = f"{name}-{thread}-{i}"
            sender = f"{subject}@example.com"
            request = MailRequest.from_bytes(make_message(sender, "support@support.example.org", subject),
                                             sender=sender, recipients=("support@support.example.org",))
            decision = app.process(request)
            [reply] = [m for m in decision.outbox if m.kind == "reply"]
            number = re.search(rb"Subject: \\[#(\\d+)\\] ", reply.raw).group(1).decode()
            lines.append(f"ticket {subject} {number}")

    threads = [threading.Thread(target=open_tickets, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    print("\\n".join(lines), flush=True)
""")


def test_two_hosts_opening_tickets_at_once_never_share_a_number(desk_url: str) -> None:
    """Two processes (two filter hosts: nothing in memory is shared), three threads each."""
    hosts = [subprocess.Popen([sys.executable, "-c", HOST_SCRIPT, str(APP), desk_url, name, "4"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in ("a", "b")]
    try:
        for proc in hosts:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", proc.communicate(timeout=60)
        for proc in hosts:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outputs = [proc.communicate(timeout=120) for proc in hosts]
    finally:
        for proc in hosts:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert [proc.returncode for proc in hosts] == [0, 0], outputs
    answered = dict(line.split()[1:] for out, _err in outputs for line in out.splitlines() if line.startswith("ticket "))
    assert len(answered) == 24
    assert sorted(int(n) for n in answered.values()) == list(range(1, 25))  # 24 tickets, 24 numbers
    stored = rows(desk_url, "SELECT number, subject, requester FROM helpdesk_ticket ORDER BY number")
    assert stored == sorted((int(n), s, f"{s}@example.com") for s, n in answered.items())
    assert rows(desk_url, "SELECT count(*) FROM helpdesk_message") == [(24,)]


def test_replies_to_one_ticket_from_two_hosts_at_once_are_all_kept(desk_url: str) -> None:
    a, b = hosts(desk_url)
    send(a, "alice@example.com", f"support@{HOST}", "printer")
    jobs = [(app, sender, f"support+ticket-1@{HOST}", f"Re: [#1] printer {i}")
            for i in range(5) for app, sender in ((a, "alice@example.com"), (b, "staff@example.com"))]
    run_at_once(jobs)
    kept = rows(desk_url, "SELECT sender, subject FROM helpdesk_message ORDER BY id")
    assert len(kept) == 11 and kept[0] == ("alice@example.com", "printer")
    assert sorted(s for _who, s in kept[1:]) == sorted(subject for *_x, subject in jobs)
    assert rows(desk_url, "SELECT status FROM helpdesk_ticket") == [("open",)]
    for app in (a, b):
        app.storage.close()
