"""The confirmation engine (`lamsonfilter.confirm`, ``ctx.confirmations``) on every back end.

Every result of `verify` (ok, expired, used, unknown, wrong sender) on
MemoryStorage, SQLite and PostgreSQL; that a request and a use commit or
roll back with the message's transaction (exception, dry run); that only
the token's SHA-256 is stored; the housekeeping's purge; and a request
asked through one filter host and confirmed through another (two storages
on one database, as tests/test_several_hosts.py does).
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from lamsonfilter import App, Handler, stateless
from lamsonfilter.confirm import TOKEN_PATTERN, ConfirmStatus, Verification
from lamsonfilter.mail import MailRequest
from lamsonfilter.memorystore import MemoryStorage
from lamsonfilter.state import StateStorage
from lamsonfilter.store.sql import SQLAlchemyStorage
from lamsonfilter.testing import AppTester, make_message
from lamsonfilter.views import Views

HOST = "app.example"
ALICE = "alice@example.com"
MALLORY = "mallory@example.net"
TTL = 3600


def confirm_app(storage: StateStorage, templates: Path, seen: list[Verification]) -> App:
    """``ask@`` asks (kind "post", data and the pending message); ``confirm-TOKEN@`` verifies;
    ``other-TOKEN@`` verifies another kind; ``boom-TOKEN@`` verifies, then raises."""
    h = Handler("approve")

    @h.route("ask@(host)")
    @stateless
    def ASK(ctx: Any, host: str) -> None:
        asked = ctx.confirmations.ask(
            "post", template="ask.msg", expires=TTL, address=f"confirm-{{token}}@{HOST}",
            subject="Please confirm", data={"n": 1, "who": ctx.sender}, message=ctx.request.raw,
            replace=ctx.header("X-Replace", "yes") == "yes")
        if asked is not None and ctx.header("Subject") == "boom":
            raise RuntimeError("after asking")

    @h.route("confirm-(token)@(host)", token=TOKEN_PATTERN)
    @stateless
    def CONFIRM(ctx: Any, token: str, host: str) -> None:
        seen.append(ctx.confirmations.verify("post", token))

    @h.route("other-(token)@(host)", token=TOKEN_PATTERN)
    @stateless
    def OTHER(ctx: Any, token: str, host: str) -> None:
        seen.append(ctx.confirmations.verify("another kind", token))

    @h.route("boom-(token)@(host)", token=TOKEN_PATTERN)
    @stateless
    def BOOM(ctx: Any, token: str, host: str) -> None:
        seen.append(ctx.confirmations.verify("post", token))
        raise RuntimeError("after verifying")

    @h.route("later-(token)@(host)", token=TOKEN_PATTERN)
    @stateless
    def LATER(ctx: Any, token: str, host: str) -> None:
        seen.append(ctx.confirmations.verify("post", token))
        ctx.defer()

    @h.route("invite@(host)")
    @stateless
    def INVITE(ctx: Any, host: str) -> None:
        ctx.confirmations.ask("invite", "bob@example.org", template="ask.msg", expires=TTL,
                              address=f"confirm-{{token}}@{HOST}")

    return App(name="approve", hosts=[HOST], handlers=[h], storage=storage, views=Views(templates),
               route_defaults={"host": r"app\.example"}).start()


@pytest.fixture
def templates(tmp_path: Path) -> Path:
    d = tmp_path / "templates"
    d.mkdir()
    (d / "ask.msg").write_text("Confirm by writing to ${confirm_addr} (token ${token}), before ${expires_at}.\n")
    return d


class Host:
    """One filter host: an `AppTester` on a storage, and what its verifications returned."""

    def __init__(self, storage: StateStorage, templates: Path, now: float = 1_800_000_000.0) -> None:
        self.seen: list[Verification] = []
        self.t = AppTester(confirm_app(storage, templates, self.seen), now=now)

    def ask(self, sender: str = ALICE, **headers: str) -> str:
        r = self.t.send(sender, f"ask@{HOST}", subject="please", headers=headers)
        [reply] = r.replies
        addr: str = reply["From"].addresses[0].addr_spec
        assert addr in reply.get_content()
        return addr.split("@")[0].removeprefix("confirm-")

    def verify(self, token: str, sender: str = ALICE, prefix: str = "confirm", **kwargs: Any) -> Verification:
        before = len(self.seen)
        self.t.send(sender, f"{prefix}-{token}@{HOST}", **kwargs)
        assert len(self.seen) == before + 1
        return self.seen[-1]


@pytest.fixture
def host(storage: StateStorage, templates: Path) -> Host:
    return Host(storage, templates)


# ---------------------------------------------------------------- every result, every back end
def test_ok_returns_the_data_and_the_pending_message_once(host: Host) -> None:
    token = host.ask()
    assert len(token) == 32 and int(token, 16) >= 0  # 128 bits, hex
    result = host.verify(token)
    assert result.status is ConfirmStatus.OK and result.ok
    assert result.data == {"n": 1, "who": ALICE}
    assert result.message is not None and b"Subject: please" in result.message
    again = host.verify(token)
    assert again.status is ConfirmStatus.USED and again.data == {} and again.message is None


def test_a_token_expires(host: Host) -> None:
    token = host.ask()
    host.t.advance(TTL)  # at the expiry time it is over
    assert host.verify(token).status is ConfirmStatus.EXPIRED
    host.t.advance(-1)  # (the clock is the tester's): one second before, it still works
    assert host.verify(token).status is ConfirmStatus.OK


def test_unknown_tokens(host: Host) -> None:
    token = host.ask()
    assert host.verify("0" * 32).status is ConfirmStatus.UNKNOWN
    assert host.verify(token, prefix="other").status is ConfirmStatus.UNKNOWN  # another kind
    assert host.verify(token.upper()).status is ConfirmStatus.OK  # case folded by an MTA: the same token


def test_a_token_is_bound_to_its_sender(host: Host) -> None:
    token = host.ask()
    wrong = host.verify(token, sender=MALLORY)
    assert wrong.status is ConfirmStatus.WRONG_SENDER and wrong.data == {} and wrong.message is None
    assert host.verify(token, sender="Alice@Example.COM").status is ConfirmStatus.OK  # case-insensitive


def test_a_new_request_cancels_the_earlier_one_unless_told_not_to(host: Host) -> None:
    first = host.ask()
    second = host.ask()
    assert host.verify(first).status is ConfirmStatus.UNKNOWN
    third = host.ask(**{"X-Replace": "no"})
    assert host.verify(third).status is ConfirmStatus.OK
    assert host.verify(second).status is ConfirmStatus.OK  # kept by replace=False


def test_an_exception_rolls_back_the_use_and_the_request(host: Host) -> None:
    token = host.ask()
    host.t.raise_errors = False
    assert host.verify(token, prefix="boom").status is ConfirmStatus.OK  # ... then the handler raised
    assert host.verify(token).status is ConfirmStatus.OK  # rolled back: still unused
    r = host.t.send(ALICE, f"ask@{HOST}", subject="boom")  # asks, then raises
    assert r.decision.is_tempfail and r.outbox == ()
    assert _rows(host.t.app.storage) == 1  # the first request only, not the rolled-back one


def test_a_dry_run_stores_and_uses_nothing_and_reports_both(host: Host) -> None:
    r = host.t.send(ALICE, f"ask@{HOST}", commit=False)
    assert len(r.replies) == 1 and _rows(host.t.app.storage) == 0
    assert [w.op for w in r.writes if w.op.startswith("confirmation")] == ["confirmation asked"]
    token = host.ask()
    before = len(host.seen)
    dry = host.t.send(ALICE, f"confirm-{token}@{HOST}", commit=False)
    assert host.seen[before].status is ConfirmStatus.OK
    assert [w.op for w in dry.writes if w.op.startswith("confirmation")] == ["confirmation used"]
    assert host.verify(token).status is ConfirmStatus.OK  # the dry run did not use it


def test_no_request_and_no_row_when_the_guards_refuse_the_reply(host: Host) -> None:
    r = host.t.send(ALICE, f"ask@{HOST}", headers={"Auto-Submitted": "auto-generated"})
    assert r.replies == [] and _rows(host.t.app.storage) == 0
    assert any("confirmation post not asked" in n for n in r.decision.notes)


def test_a_request_to_another_address_is_a_new_message_bound_to_it(host: Host) -> None:
    r = host.t.send(ALICE, f"invite@{HOST}")
    [m] = r.outbox
    assert m.kind == "message" and m.recipients == ("bob@example.org",) and m.sender == ""
    assert _rows(host.t.app.storage) == 1


def test_defer_after_a_verified_token_is_refused(host: Host) -> None:
    token = host.ask()
    host.t.raise_errors = False
    assert host.verify(token, prefix="later").status is ConfirmStatus.OK
    assert host.t.results[-1].decision.is_tempfail
    assert "after ctx.confirmations.verify()" in str(host.t.results[-1].trace.error)
    assert host.verify(token).status is ConfirmStatus.OK  # the tempfail rolled the use back


def test_only_the_hash_of_the_token_is_stored(storage: StateStorage, templates: Path) -> None:
    host = Host(storage, templates)
    token = host.ask()
    digest = hashlib.sha256(token.encode()).hexdigest()
    with storage.transaction(commit=False) as tx:
        record = tx.get_confirmation(digest)
    assert record is not None and record.sender == ALICE and record.kind == "post"
    assert record.expires_at == host.t.now + TTL and record.used_at is None
    if isinstance(storage, SQLAlchemyStorage):
        engine = create_engine(storage.url)
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT token_hash, kind, sender, data FROM lamsonfilter_confirmations")).all()
        engine.dispose()
        assert [r[0] for r in rows] == [digest] and all(token not in str(r) for r in rows)


def test_purge_deletes_what_expired_before_the_cutoff(storage: StateStorage, templates: Path) -> None:
    host = Host(storage, templates)
    old, used = host.ask(), host.ask(MALLORY)
    assert host.verify(used, sender=MALLORY).ok
    host.t.advance(2 * TTL)
    fresh = host.ask("carol@example.org")
    assert storage.purge_confirmations(host.t.now, limit=1) == 1
    assert storage.purge_confirmations(host.t.now) == 1
    assert storage.purge_confirmations(host.t.now) == 0
    assert host.verify(old).status is ConfirmStatus.UNKNOWN
    assert host.verify(fresh, sender="carol@example.org").ok


def _rows(storage: StateStorage) -> int:
    if isinstance(storage, MemoryStorage):
        return len(storage._confirmations)
    assert isinstance(storage, SQLAlchemyStorage)
    engine = create_engine(storage.url)
    with engine.connect() as conn:
        n = conn.execute(text("SELECT count(*) FROM lamsonfilter_confirmations")).scalar_one()
    engine.dispose()
    return int(n)


# ---------------------------------------------------------------- two filter hosts, one database
def test_asked_through_one_host_confirmed_through_the_other(
    two_storages: tuple[SQLAlchemyStorage, SQLAlchemyStorage], templates: Path,
) -> None:
    first, second = (Host(st, templates) for st in two_storages)
    token = first.ask()
    assert second.verify(token, sender=MALLORY).status is ConfirmStatus.WRONG_SENDER
    result = second.verify(token)
    assert result.ok and result.data == {"n": 1, "who": ALICE}
    assert first.verify(token).status is ConfirmStatus.USED  # single use across hosts


def test_one_token_verified_at_once_on_two_hosts_is_used_once(
    two_storages: tuple[SQLAlchemyStorage, SQLAlchemyStorage], templates: Path,
) -> None:
    first, second = (Host(st, templates) for st in two_storages)
    tokens = [first.ask(f"user{i}@example.org") for i in range(8)]
    barrier = threading.Barrier(2, timeout=30)

    def run(host: Host) -> None:
        barrier.wait()
        for i, token in enumerate(tokens):
            raw = make_message(f"user{i}@example.org", (f"confirm-{token}@{HOST}",), "yes", "yes\n")
            req = MailRequest.from_bytes(raw, sender=f"user{i}@example.org", recipients=(f"confirm-{token}@{HOST}",))
            host.t.app.process(req, now=host.t.now)

    threads = [threading.Thread(target=run, args=(h,)) for h in (first, second)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads)
    statuses = [v.status for v in first.seen + second.seen]
    assert statuses.count(ConfirmStatus.OK) == len(tokens)  # each token exactly once
    assert statuses.count(ConfirmStatus.USED) == len(tokens)


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mailinglist"


def test_the_example_list_subscribes_through_one_host_and_confirms_through_the_other(
    two_storages: tuple[SQLAlchemyStorage, SQLAlchemyStorage],
) -> None:
    a, b = (AppTester.from_directory(EXAMPLE, st, now=6000.0) for st in two_storages)
    r = a.send(ALICE, "python-subscribe@lists.example.org")
    confirm = r.replies[0]["From"].addresses[0].addr_spec
    assert b.send(ALICE, confirm).state_after == "MEMBER"
    assert a.state("mailinglist", f"python:{ALICE}") == "MEMBER"
    bye = b.send(ALICE, "python-unsubscribe@lists.example.org")  # leaving: asked through b ...
    leave = bye.replies[0]["From"].addresses[0].addr_spec
    assert a.send(ALICE, leave).state_after == "START"  # ... confirmed through a
    assert b.state("mailinglist", f"python:{ALICE}") is None


# ---------------------------------------------------------------- the table on an existing database
def test_a_version_3_database_is_refused_as_older_then_gets_the_table_keeping_its_rows(sql_url: str) -> None:
    from lamsonfilter.state import SchemaMissingError
    from lamsonfilter.store.schema import SCHEMA_VERSION

    st = SQLAlchemyStorage(sql_url)
    st.create_schema()
    with st.transaction() as tx:
        tx.set("k", "KEEP", {"v": 1})
        assert tx.claim("replayed")
    st.close()
    engine = create_engine(SQLAlchemyStorage(sql_url).url)  # as lamsonfilter schema version 3 left it
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE lamsonfilter_confirmations"))
        conn.execute(text("DROP TABLE lamsonfilter_alembic_version"))  # from before migrations
        conn.execute(text("UPDATE lamsonfilter_meta SET value = '3'"))
    st = SQLAlchemyStorage(sql_url)
    try:
        with pytest.raises(SchemaMissingError, match="older than this lamsonfilter needs.*db upgrade"):
            st.check_schema()
        st.create_schema()
        st.check_schema()
        with st.transaction() as tx:
            assert tx.get("k") is not None and not tx.claim("replayed")
            assert tx.get_confirmation("0" * 64) is None
        with engine.connect() as conn:
            assert conn.execute(text("SELECT value FROM lamsonfilter_meta")).scalar_one() == str(SCHEMA_VERSION)
    finally:
        st.close()
        engine.dispose()


def test_mail_from_the_null_sender_asks_nothing(host: Host) -> None:
    r = host.t.send("", f"ask@{HOST}")
    assert r.outbox == () and not r.decision.is_tempfail and _rows(host.t.app.storage) == 0
    assert any("confirmation post not asked: the sender is <>" in n for n in r.decision.notes)


def test_the_dry_run_report_shows_the_confirmation_asked() -> None:
    from click.testing import CliRunner

    from lamsonfilter.cli import main

    raw = (EXAMPLE / "samples" / "01-subscribe.eml").read_bytes()
    r = CliRunner().invoke(main, ["test", "--app", str(EXAMPLE), "--database", "memory:"], input=raw,
                           catch_exceptions=False)
    assert r.exit_code == 0
    [line] = [x for x in r.output.splitlines() if "confirmation asked:" in x]
    assert line.strip().startswith("confirmation asked: subscribe:python:") and '"sender": "alice@example.com"' in line
