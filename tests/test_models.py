"""An application's own models (app/models.py) in the message's transaction, through ctx.db.

The ledger fixture application (tests/fixtures/apps/ledger) writes an account
row and an entry row per message, counts in its state data and queues one
audit message: the tests check that the three commit together or not at all,
in AppTester (in-memory SQLite), on a SQLite file and on PostgreSQL.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, func, select, text

from lamsonfilter.app import StartupError
from lamsonfilter.cli import main
from lamsonfilter.mail import MailRequest
from lamsonfilter.models import ModelsError, load_models
from lamsonfilter.settings import load_app
from lamsonfilter.state import StateStorage
from lamsonfilter.testing import AppTester, make_message
from tests.rig.storage import pg_admin

LEDGER = Path(__file__).resolve().parent / "fixtures" / "apps" / "ledger"
LEDGER_TABLES = ("ledger_entry", "ledger_account")
SENDER = "someone@elsewhere.example"


@pytest.fixture
def ledger_dir(tmp_path: Path) -> Path:
    """A copy of the ledger application (its own package name, its own var/)."""
    target = tmp_path / "ledger"
    shutil.copytree(LEDGER, target)
    return target


def models_of(app_dir: Path) -> Any:
    """The application's ``app/models.py`` module, as the framework imported it."""
    load_models(app_dir)
    return next(m for name, m in sys.modules.items()
                if name.startswith("lamsonfilter_app_") and name.endswith(".models")
                and Path(m.__file__).resolve() == (app_dir / "app" / "models.py").resolve())


# ---------------------------------------------------------------- loading
def _app_with_models(tmp_path: Path, source: str) -> Path:
    app = tmp_path / "bad"
    shutil.copytree(LEDGER, app)
    (app / "app" / "models.py").write_text(source)
    return app


def test_no_models_module_is_none(tmp_path: Path) -> None:
    app = tmp_path / "plain"
    shutil.copytree(LEDGER, app)
    (app / "app" / "models.py").unlink()
    assert load_models(app) is None


def test_models_found_and_shared_with_the_handlers(ledger_dir: Path) -> None:
    app = load_app(ledger_dir, {"DATABASE_URL": "memory:"})
    assert app.models is not None and sorted(app.models.tables) == ["ledger_account", "ledger_entry"]
    handlers_module = sys.modules[app.handlers[0].states["START"].__module__]
    assert handlers_module.Account.metadata is app.models  # one package, one Base


@pytest.mark.parametrize(("source", "says"), [
    ("x = 1\n", "has no Base"),
    ("class Base:\n    metadata = None\n", "not a subclass of sqlalchemy.orm.DeclarativeBase"),
    ("from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column\n"
     "class Base(DeclarativeBase): pass\n"
     "class T(Base):\n    __tablename__ = 'lamsonfilter_mine'\n"
     "    id: Mapped[int] = mapped_column(primary_key=True)\n", "lamsonfilter_mine"),
    ("import nothing_of_that_name\n", "ModuleNotFoundError"),
])
def test_bad_models_module_refused_at_start_naming_the_file(tmp_path: Path, source: str, says: str) -> None:
    app = _app_with_models(tmp_path, source)
    with pytest.raises(ModelsError) as caught:
        load_app(app, {"DATABASE_URL": "memory:"})
    assert isinstance(caught.value, StartupError)
    assert str(app / "app" / "models.py") in str(caught.value) and says in str(caught.value)


# ---------------------------------------------------------------- AppTester
def _totals(t: AppTester, models: Any) -> tuple[int | None, int]:
    s = t.db()
    account = s.get(models.Account, "alice")
    return (account.total if account else None), s.scalar(select(func.count()).select_from(models.Entry))


def test_tester_commits_rows_state_and_outbox_together(ledger_dir: Path) -> None:
    t = AppTester.from_directory(ledger_dir)
    models = models_of(ledger_dir)
    r = t.send(SENDER, "alice@ledger.example.org", subject="add 5")
    assert r.state_after == "OPEN" and len(r.outbox) == 1
    assert _totals(t, models) == (5, 1) and t.data("ledger", "alice") == {"n": 1}
    assert ("ledger_account:alice", "insert") in [(w.key, w.op) for w in r.writes]
    t.send(SENDER, "alice@ledger.example.org", subject="add 2")
    assert _totals(t, models) == (7, 2) and t.data("ledger", "alice") == {"n": 2}


@pytest.mark.parametrize("fail", ["raise", "tempfail", "commit", "defer"])
def test_tester_failure_leaves_nothing(ledger_dir: Path, fail: str) -> None:
    t = AppTester.from_directory(ledger_dir, raise_errors=False)
    models = models_of(ledger_dir)
    t.send(SENDER, "alice@ledger.example.org", subject="add 5")
    r = t.send(SENDER, "alice@ledger.example.org", subject="add 7", headers={"X-Test-Fail": fail})
    assert r.decision.is_tempfail
    assert _totals(t, models) == (5, 1) and t.data("ledger", "alice") == {"n": 1}
    if fail in ("commit", "defer"):  # the handler is told why
        said = "ctx.db.commit() is not allowed" if fail == "commit" else "after ctx.db wrote rows"
        assert said in str(r.error)


def test_tester_defer_after_reading_rows_then_write_from_the_queue(ledger_dir: Path) -> None:
    from lamsonfilter.decisions import Action

    t = AppTester.from_directory(ledger_dir)
    models = models_of(ledger_dir)
    r = t.send(SENDER, "alice@ledger.example.org", subject="add 5", headers={"X-Test-Defer-First": "yes"})
    assert r.action is Action.DEFER and _totals(t, models) == (None, 0)
    [later] = t.run_deferred()
    assert later.state_after == "OPEN" and _totals(t, models) == (5, 1)


def test_one_recipient_defers_the_other_keeps_its_rows(ledger_dir: Path) -> None:
    from lamsonfilter.decisions import Action

    t = AppTester.from_directory(ledger_dir)
    models = models_of(ledger_dir)
    r = t.send(SENDER, ["alice@ledger.example.org", "bob@ledger.example.org"], subject="add 5",
               headers={"X-Test-Defer-First": "bob"})
    assert r.outcome("alice@ledger.example.org").state_after == "OPEN"
    assert r.outcome("bob@ledger.example.org").action is Action.DEFER
    s = t.db()
    assert [a.name for a in s.scalars(select(models.Account))] == ["alice"]
    t.run_deferred()
    assert sorted((a.name, a.total) for a in t.db().scalars(select(models.Account))) == [("alice", 5), ("bob", 5)]


def test_tester_db_arranges_rows(ledger_dir: Path) -> None:
    t = AppTester.from_directory(ledger_dir)
    models = models_of(ledger_dir)
    s = t.db()
    s.add(models.Account(name="alice", total=100))
    s.commit()
    t.send(SENDER, "alice@ledger.example.org", subject="add 1")
    assert _totals(t, models) == (101, 1)
    s.add(models.Account(name="bob", total=1))  # not committed: an error, not lost in silence
    with pytest.raises(AssertionError, match="commit"):
        t.send(SENDER, "alice@ledger.example.org", subject="add 1")


def test_tester_dry_run_commits_no_row(ledger_dir: Path) -> None:
    t = AppTester.from_directory(ledger_dir)
    models = models_of(ledger_dir)
    r = t.send(SENDER, "alice@ledger.example.org", subject="add 5", commit=False)
    assert r.state_after == "OPEN" and [w.key for w in r.writes][:1] == ["ledger_account:alice"]
    assert _totals(t, models) == (None, 0) and t.state("ledger", "alice") is None


def test_ctx_db_on_memory_state_is_a_clear_error(ledger_dir: Path) -> None:
    t = AppTester(load_app(ledger_dir, {"DATABASE_URL": "memory:"}), raise_errors=False)
    r = t.send(SENDER, "alice@ledger.example.org", subject="add 5")
    assert r.decision.is_tempfail and "models need a SQL database: set DATABASE_URL" in str(r.error)


# ---------------------------------------------------------------- SQLite file and PostgreSQL
def _drop_ledger_tables(url: str) -> None:
    """PostgreSQL's test schema outlives a test: empty it of the ledger's tables (lamsonfilter's: `pg_url`)."""
    if url.startswith("postgresql"):
        engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
        with engine.begin() as conn:
            for table in LEDGER_TABLES:
                conn.execute(text(f'DROP TABLE IF EXISTS "{table}" CASCADE'))
        engine.dispose()


@pytest.fixture
def ledger_url(sql_url: str, ledger_dir: Path) -> str:
    """`sql_url` (an empty SQLite file or PostgreSQL schema) after ``lamsonfilter db init`` of the ledger."""
    _drop_ledger_tables(sql_url)
    result = CliRunner().invoke(main, ["db", "init", "--app", str(ledger_dir), "--database", sql_url],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "application tables ready: ledger_account, ledger_entry" in result.output
    return sql_url


class Ledger:
    """The ledger app on a real database, and what is committed there."""

    def __init__(self, app_dir: Path, url: str) -> None:
        self.app = load_app(app_dir, {"DATABASE_URL": url})
        self.models = models_of(app_dir)
        self.storage: StateStorage = self.app.storage

    def process(self, subject: str, account: str = "alice", *, queue_id: str = "Q1", **kwargs: Any) -> Any:
        headers = kwargs.pop("headers", {})
        raw = make_message(SENDER, f"{account}@ledger.example.org", subject=subject, headers=headers)
        request = MailRequest.from_bytes(raw, sender=SENDER, recipients=(f"{account}@ledger.example.org",),
                                         queue_id=queue_id)
        return self.app.process(request, **kwargs)

    def committed(self, account: str = "alice") -> tuple[int | None, int, str | None, int]:
        """(the account's total, its entries, its state, outbox messages)."""
        engine = getattr(self.storage, "_engine")
        with engine.connect() as conn:
            total = conn.scalar(select(self.models.Account.total).where(self.models.Account.name == account))
            entries = conn.scalar(select(func.count()).select_from(self.models.Entry)
                                  .where(self.models.Entry.account == account))
            conn.rollback()
        with self.storage.transaction(commit=False) as tx:
            record = tx.get(f"ledger:{account}")
        return total, entries, record.state if record else None, len(self.storage.pending_outbox())

    def close(self) -> None:
        self.storage.close()


@pytest.fixture
def ledger(ledger_dir: Path, ledger_url: str) -> Any:
    led = Ledger(ledger_dir, ledger_url)
    yield led
    led.close()


def test_commit_leaves_rows_state_and_outbox(ledger: Ledger) -> None:
    d = ledger.process("add 5")
    assert not d.is_tempfail
    assert ledger.committed() == (5, 1, "OPEN", 1)


@pytest.mark.parametrize("fail", ["raise", "tempfail"])
def test_failure_leaves_no_row_no_state_no_outbox(ledger: Ledger, fail: str) -> None:
    d = ledger.process("add 5", headers={"X-Test-Fail": fail})
    assert d.is_tempfail
    assert ledger.committed() == (None, 0, None, 0)


def test_deadline_passed_rolls_the_rows_back(ledger: Ledger) -> None:
    import time

    d = ledger.process("add 5", deadline=time.monotonic() - 1)
    assert d.is_tempfail and "deadline passed" in str(d.error)
    assert ledger.committed() == (None, 0, None, 0)


def test_dry_run_rolls_the_rows_back(ledger: Ledger) -> None:
    d = ledger.process("add 5", commit=False)
    assert d.outcomes[0].state_after == "OPEN"
    assert ledger.committed() == (None, 0, None, 0)


def test_a_retry_replays_without_writing_rows_twice(ledger: Ledger) -> None:
    first = ledger.process("add 5", replay_key="postfix:Q1")
    again = ledger.process("add 5", replay_key="postfix:Q1")
    assert "retry: decision replayed" in again.notes and again.outcomes == first.outcomes
    assert ledger.committed() == (5, 1, "OPEN", 1)


def test_a_failing_flush_is_a_storage_tempfail_in_one_line(ledger: Ledger,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    ledger.process("add 5")
    caplog.set_level(logging.DEBUG, logger="lamsonfilter")
    # an entry without its amount: the INSERT fails at the flush before the commit (NOT NULL)
    d = ledger.process("add 1", headers={"X-Test-Fail": "null"}, queue_id="QNULL")
    assert d.is_tempfail
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "queue_id=QNULL" in errors[0], errors
    assert "StorageError: writing the application's rows failed" in errors[0] and "amount" in errors[0]
    assert "Traceback" not in caplog.text  # a storage error names its cause; no traceback
    assert ledger.committed() == (5, 1, "OPEN", 1)


def test_a_conflicting_flush_runs_again_then_says_why(ledger: Ledger, caplog: pytest.LogCaptureFixture) -> None:
    ledger.process("add 5")
    # a second account row with the same name: a unique conflict, as a concurrent insert would be
    d = ledger.process("add 1", headers={"X-Test-Fail": "duplicate"}, queue_id="QDUP")
    assert d.is_tempfail
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "queue_id=QDUP" in errors[0]
    assert "still conflicting after 8 attempts; the last: writing the application's rows" in errors[0]
    assert ledger.committed() == (5, 1, "OPEN", 1)


# ---------------------------------------------------------------- two messages for one key at once
def _wait_for(predicate: Any, what: str, timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.01)


def _journal(path: Path) -> list[dict[str, Any]]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_two_messages_for_one_key_serialise(ledger: Ledger, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A reads the account row and waits at a gate; B, for the same account, starts meanwhile.

    B must not read the row before A committed: it waits for A's key (PostgreSQL's advisory
    lock, SQLite's write lock).  Had it read the row early, it would write 0 + 2, losing A's 1.
    """
    import threading
    import time

    journal, gates = tmp_path / "journal", tmp_path / "gates"
    gates.mkdir()
    monkeypatch.setenv("LF_MODELS_JOURNAL", str(journal))
    monkeypatch.setenv("LF_MODELS_GATES", str(gates))
    decisions: dict[str, Any] = {}

    def send(seq: str, subject: str, gate: str = "") -> None:
        headers = {"X-Test-Seq": seq, **({"X-Test-Gate": gate} if gate else {})}
        decisions[seq] = ledger.process(subject, headers=headers, queue_id=seq)

    a = threading.Thread(target=send, args=("A", "add 1", "open"))
    a.start()
    _wait_for(lambda: any(e["seq"] == "A" for e in _journal(journal)), "A to read the row")
    b = threading.Thread(target=send, args=("B", "add 2"))
    b.start()
    time.sleep(0.3)  # B's chance to overtake A if nothing held it back (not a timing assert)
    (gates / "open").touch()
    a.join(60)
    b.join(60)
    assert not a.is_alive() and not b.is_alive()
    assert not decisions["A"].is_tempfail and not decisions["B"].is_tempfail
    events = [(e["seq"], e["event"], e["total"]) for e in _journal(journal)]
    assert events == [("A", "read", 0), ("A", "write", 1), ("B", "read", 1), ("B", "write", 3)]
    assert ledger.committed() == (3, 2, "OPEN", 2)
    with ledger.storage.transaction(commit=False) as tx:
        record = tx.get("ledger:alice")
    assert record is not None and record.data == {"n": 2}


def test_many_messages_for_one_key_lose_no_update(ledger: Ledger) -> None:
    """Two threads, ten messages each, one account: every amount is in the total."""
    import threading

    failures: list[Any] = []

    def send(thread: int) -> None:
        for i in range(10):
            d = ledger.process(f"add {thread * 100 + i}", queue_id=f"T{thread}-{i}")
            if d.is_tempfail:
                failures.append(d)

    threads = [threading.Thread(target=send, args=(n,)) for n in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads) and not failures
    expected = sum(n * 100 + i for n in (1, 2) for i in range(10))
    assert ledger.committed() == (expected, 20, "OPEN", 20)


# ---------------------------------------------------------------- the dry run
def _dry_run(app_dir: Path, tmp_path: Path, *args: str) -> Any:
    message = tmp_path / "add.eml"
    message.write_bytes(make_message(SENDER, "alice@ledger.example.org", subject="add 5"))
    return CliRunner().invoke(main, ["test", "--app", str(app_dir), *args, str(message)], catch_exceptions=False)


def test_dry_run_without_a_database_uses_an_empty_one_in_memory(ledger_dir: Path, tmp_path: Path) -> None:
    result = _dry_run(ledger_dir, tmp_path)
    assert result.exit_code == 0, result.output
    assert "rows written: 2 (ctx.db) (not committed: dry run)" in result.output
    assert "  insert ledger_account:alice\n  insert ledger_entry:1\n" in result.output
    assert "ledger:alice: (none) -> OPEN" in result.output


@pytest.mark.parametrize("sql_url", ["sqlite"], indirect=True)
def test_dry_run_commits_rows_only_with_commit(ledger_dir: Path, ledger_url: str, tmp_path: Path) -> None:
    led = Ledger(ledger_dir, ledger_url)
    try:
        result = _dry_run(ledger_dir, tmp_path, "--database", ledger_url)
        assert result.exit_code == 0, result.output
        assert "insert ledger_entry:1" in result.output
        assert led.committed() == (None, 0, None, 0)
        result = _dry_run(ledger_dir, tmp_path, "--database", ledger_url, "--commit")
        assert result.exit_code == 0, result.output
        assert led.committed() == (5, 1, "OPEN", 0)  # --commit: rows and state; the outbox never stored
    finally:
        led.close()


def test_db_init_refuses_bad_models_naming_the_file(tmp_path: Path) -> None:
    app = _app_with_models(tmp_path, "x = 1\n")
    result = CliRunner().invoke(main, ["db", "init", "--app", str(app)], catch_exceptions=False)
    assert result.exit_code == 2 and f"{app / 'app' / 'models.py'} has no Base" in result.output


def test_db_init_twice_keeps_the_rows(ledger: Ledger, ledger_dir: Path, ledger_url: str) -> None:
    ledger.process("add 5")
    result = CliRunner().invoke(main, ["db", "init", "--app", str(ledger_dir), "--database", ledger_url],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert ledger.committed() == (5, 1, "OPEN", 1)


def test_models_tables_missing_names_db_init(ledger_dir: Path, sql_schema_url: str,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """The framework's tables exist (an older db init), the models' do not: the line says what to run."""
    _drop_ledger_tables(sql_schema_url)
    led = Ledger(ledger_dir, sql_schema_url)
    try:
        d = led.process("add 5", queue_id="QMISS")
    finally:
        led.close()
    assert d.is_tempfail
    [line] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert "queue_id=QMISS" in line and "a table of the application's models is missing" in line
    assert "lamsonfilter db init --app" in line


HELPDESK = Path(__file__).resolve().parents[1] / "examples" / "helpdesk"


def test_a_row_inserted_then_updated_in_one_message_is_shown_as_an_insert(tmp_path: Path) -> None:
    """The help desk flushes a new ticket to learn its id, then numbers it: the dry run says
    ``insert helpdesk_ticket:1``, not ``update`` (the commit inserts the row)."""
    message = tmp_path / "open.eml"
    message.write_bytes(make_message("alice@example.com", "support@support.example.org", subject="Printer"))
    result = CliRunner().invoke(main, ["test", "--app", str(HELPDESK), str(message)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "rows written: 2 (ctx.db) (not committed: dry run)" in result.output
    assert "  insert helpdesk_ticket:1\n  insert helpdesk_message:1\n" in result.output
    assert "update helpdesk_ticket" not in result.output


def test_the_trace_lists_the_net_change_of_a_row() -> None:
    from lamsonfilter.diagnostics import StateWrite, Trace

    trace = Trace()
    for key, op in [("t:1", "insert"), ("t:1", "update"), ("t:2", "insert"), ("t:2", "delete"),
                    ("t:3", "update"), ("t:3", "delete"), ("s:never", "clear")]:
        trace.record(StateWrite(key, op, None, None))
    assert [(w.key, w.op) for w in trace.writes] == [("t:1", "insert"), ("t:3", "delete")]


def test_a_reply_to_an_unknown_ticket_lists_no_state_key_of_its_own() -> None:
    """START -> START on a key with no record writes nothing: the dry run does not list
    ``helpdesk:ticket:9999: (none) -> (none)``."""
    result = CliRunner().invoke(main, ["test", "--app", str(HELPDESK),
                                       str(HELPDESK / "samples" / "02-reply-to-an-unknown-ticket.eml")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "state:   START -> START" in result.output and "helpdesk:ticket:9999" not in result.output
    assert "state written: 2 key(s)" in result.output  # the reply's rate limit and budget
