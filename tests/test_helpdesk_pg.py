"""The example help desk on one PostgreSQL shared by two filter hosts.

Two `App` objects loaded from examples/helpdesk stand for two filter hosts
(each has its own engine and connection pool, as two processes would) and
process mail from several threads at once against one database.  Ticket
numbers come from the database (``helpdesk_ticket.id``, a sequence), so no
two tickets share a number however the openings interleave; messages for
one ticket serialise on the ticket's state key, so concurrent replies are
all kept, none lost to a lost update.
"""

from __future__ import annotations

import re
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


def test_two_hosts_opening_tickets_at_once_never_share_a_number(desk_url: str) -> None:
    a, b = hosts(desk_url)
    jobs = [(a if i % 2 else b, f"user{i}@example.com", f"support@{HOST}", f"request {i}") for i in range(12)]
    decisions = run_at_once(jobs)
    answered = {}
    for decision in decisions:
        [reply] = [m for m in decision.outbox if m.kind == "reply"]  # type: ignore[attr-defined]
        m = re.search(rb"Subject: \[#(\d+)\] request (\d+)", reply.raw)
        assert m, reply.raw[:400]
        answered[int(m.group(2))] = int(m.group(1))
    assert sorted(answered.values()) == list(range(1, 13))  # twelve tickets, twelve numbers
    stored = rows(desk_url, "SELECT number, requester, subject FROM helpdesk_ticket ORDER BY number")
    assert [(n, f"user{i}@example.com", f"request {i}") for i, n in sorted(answered.items(), key=lambda x: x[1])] \
        == stored
    assert rows(desk_url, "SELECT count(*) FROM helpdesk_message") == [(12,)]
    for app in (a, b):
        app.storage.close()


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
